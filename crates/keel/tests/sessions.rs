//! Sessions through the library API: tokens the Hub issues and checks, a resume
//! refused to a connection authenticated as another client, and one allowed to
//! the same client, with its user data and rooms back. Real sockets.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use keel::{Config, ErrorKind, Hub};

fn hub() -> Hub {
    let mut c = Config::default();
    c.set("reconnect_secret", "library-test-secret-0123456789ab")
        .unwrap();
    Hub::new(c)
}

#[tokio::test]
async fn tokens_name_their_session_and_resume_checks_the_authenticated_client() {
    let hub = hub();
    let addr = serve(&hub).await;
    let alice = connect(addr, "alice").await;
    eventually("alice registered", || hub.connection("alice").is_some()).await;
    hub.join_room("alice", "lobby").await.unwrap();
    hub.set_user_data("alice", "theme", serde_json::json!("dark"))
        .unwrap();
    let conn = hub.connection("alice").unwrap();
    let token = hub.generate_reconnect_token("alice").unwrap();
    let claims = hub.validate_reconnect_token(&token).unwrap();
    assert_eq!(claims.client_id, "alice");
    assert_eq!(claims.session_id, conn.session_id());
    assert_eq!(
        hub.generate_reconnect_token("nobody").unwrap_err().kind(),
        &ErrorKind::ConnectionNotFound
    );
    // Another Hub (another key) does not accept it.
    assert_eq!(
        Hub::new(Config::default())
            .validate_reconnect_token(&token)
            .unwrap_err()
            .kind(),
        &ErrorKind::InvalidToken
    );

    drop(alice);
    eventually("alice's session detached", || {
        hub.detached_session_count() == 1
    })
    .await;

    // Bob, authenticated as bob, presents alice's token: refused, nothing moves.
    let _bob = connect(addr, "bob").await;
    eventually("bob registered", || hub.connection("bob").is_some()).await;
    let bob = hub.connection("bob").unwrap();
    let err = hub
        .resume(&bob, &token, &[], Some("bob"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Forbidden);
    assert_eq!(&*bob.client_id(), "bob");
    assert_eq!(hub.detached_session_count(), 1);
    assert_eq!(hub.user_data("bob", "theme"), None);

    // A connection authenticated as alice gets her session back.
    let _again = connect(addr, "alice-new-tab").await;
    eventually("registered", || hub.connection("alice-new-tab").is_some()).await;
    let again = hub.connection("alice-new-tab").unwrap();
    let lobby = vec![("lobby".to_string(), None)];
    let resumed = hub
        .resume(&again, &token, &lobby, Some("alice"))
        .await
        .unwrap();
    assert_eq!(resumed.client_id, "alice");
    assert_eq!(resumed.session_id, claims.session_id);
    assert!(resumed.restored_state);
    assert_ne!(resumed.reconnect_token, token);
    assert_eq!(&*again.client_id(), "alice");
    assert_eq!(
        hub.user_data("alice", "theme"),
        Some(serde_json::json!("dark"))
    );
    assert_eq!(hub.channel_members("lobby"), vec!["alice".to_string()]);
    assert!(hub.connection("alice-new-tab").is_none());
    assert_eq!(hub.detached_session_count(), 0);
    // The used token is spent; its successor names the next generation.
    assert_eq!(
        hub.resume(&bob, &token, &[], None)
            .await
            .unwrap_err()
            .kind(),
        &ErrorKind::InvalidToken
    );
    let next = hub
        .validate_reconnect_token(&resumed.reconnect_token)
        .unwrap();
    assert_eq!(next.generation, claims.generation + 1);
}

/// A Hub for a test that moves tokio's clock: presence lasts `presence_ttl`,
/// sessions 10 min, and no heartbeat round falls within the test's span of
/// virtual time.
fn on_a_paused_clock(presence_ttl: &str) -> Config {
    let mut c = Config::default();
    c.set("reconnect_secret", "library-test-secret-0123456789ab")
        .unwrap();
    c.set("reconnect_token_ttl", "10m").unwrap();
    c.set("presence_ttl", presence_ttl).unwrap();
    c.set("heartbeat_interval", "1h").unwrap();
    c.set("heartbeat_timeout", "1h").unwrap();
    c
}

/// The Hub reads tokio's clock: a vanished client's presence and its detached
/// session end on that clock, so the test moves it instead of sleeping through
/// a 30 s presence TTL and a 10 min session TTL.
#[tokio::test]
async fn lingering_presence_and_detached_sessions_end_on_the_hubs_clock() {
    use std::time::Duration;
    let hub = Hub::new(on_a_paused_clock("30s"));
    let addr = serve(&hub).await;
    let alice = connect(addr, "alice").await;
    eventually("alice registered", || hub.connection("alice").is_some()).await;
    hub.join_room("alice", "lobby").await.unwrap();
    hub.set_user_data("alice", "theme", serde_json::json!("dark"))
        .unwrap();
    // Gone without a Close: the session is kept and presence lingers.
    drop(alice);
    eventually("the session detached", || hub.detached_session_count() == 1).await;
    async fn present(hub: &Hub) -> Vec<String> {
        let entries = hub.presence("lobby").await.unwrap();
        entries.into_iter().map(|p| p.client_id).collect()
    }
    assert_eq!(present(&hub).await, ["alice"]);

    // From here on only the Hub's timers and our own moves of the clock count.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(present(&hub).await, ["alice"], "present until presence_ttl");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(present(&hub).await.is_empty(), "gone after presence_ttl");

    // 9 min 21 s after the disconnect, with the sweeper (a tick of 7.5 s here)
    // having run since the clock got there: the session is still there.
    tokio::time::advance(Duration::from_secs(9 * 60 - 20)).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(hub.detached_session_count(), 1);
    // Past the 10 min TTL the sweeper (a tick of a quarter of the shortest
    // TTL) reclaims it; virtual sleeps let its timer fire.
    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..20 {
        if hub.detached_session_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(hub.detached_session_count(), 0);
    assert_eq!(hub.metrics_snapshot().sessions_expired_total, 1);
}

/// A member silent past `presence_ttl` drops out of presence, and its leave is
/// announced; when it shows a sign of life again, the next sweep makes it present
/// again and announces the join, so the stream's events stay in pairs.
#[tokio::test]
async fn a_silent_member_leaves_and_joins_again_when_it_speaks() {
    use std::time::Duration;
    let mut c = on_a_paused_clock("30s");
    c.set("presence_events", "true").unwrap();
    let hub = Hub::new(c);
    let addr = serve(&hub).await;
    let _quiet = connect(addr, "quiet").await;
    eventually("registered", || hub.connection("quiet").is_some()).await;
    hub.join_room("quiet", "room").await.unwrap();
    async fn events(hub: &Hub) -> Vec<String> {
        let all = keel::HistoryQuery {
            after: 0,
            epoch: None,
            limit: 100,
        };
        let h = hub.history("room", all).await.unwrap();
        h.publications
            .iter()
            .map(|p| {
                let v: serde_json::Value = serde_json::from_str(p.data.get()).unwrap();
                format!(
                    "{} {}",
                    v["presence"].as_str().unwrap(),
                    v["client_id"].as_str().unwrap()
                )
            })
            .collect()
    }
    assert_eq!(events(&hub).await, ["join quiet"]);

    tokio::time::pause();
    // Silent for more than the TTL: the sweeper (every 7.5 s here) expires it.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if events(&hub).await.len() == 2 {
            break;
        }
    }
    assert_eq!(events(&hub).await, ["join quiet", "leave quiet"]);
    assert!(hub.presence("room").await.unwrap().is_empty());
    // A sign of life (what a JSON pong records), then a sweep.
    hub.handle_pong("quiet").unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if events(&hub).await.len() == 3 {
            break;
        }
    }
    assert_eq!(
        events(&hub).await,
        ["join quiet", "leave quiet", "join quiet"]
    );
    assert_eq!(hub.presence("room").await.unwrap().len(), 1);
}

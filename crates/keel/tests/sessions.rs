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

//! Sessions over the wire: `resume` with reconnect tokens, one use per token,
//! refusals that leave the connection open, replacement, reclaiming abandoned
//! sessions, presence that lingers for `presence_ttl`, and `since` while a
//! publisher keeps publishing. Real gateway, real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use futures::FutureExt;

use common::*;
use serde_json::{json, Value};

fn token(c: &Client) -> String {
    c.welcome["payload"]["reconnect_token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn publish(gw: &keel_server::Running, channel: &str, n: u64) -> u64 {
    let raw = serde_json::value::to_raw_value(&json!({ "n": n })).unwrap();
    gw.hub.publish(channel, &raw, None).await.unwrap().offset
}

/// Drops a client without a close handshake (the server sees the socket end).
async fn vanish(gw: &keel_server::Running, c: Client) {
    let before = gw.hub.detached_session_count();
    drop(c);
    eventually("the server to detach the session", || {
        gw.hub.detached_session_count() > before
    })
    .await;
}

/// Who is present, sorted. Read at once: the gateway's memory broker answers on
/// the first poll (this is called from `eventually`'s condition).
fn present(gw: &keel_server::Running, channel: &str) -> Vec<String> {
    let mut ids: Vec<String> = gw
        .hub
        .presence(channel)
        .now_or_never()
        .expect("the memory broker answers at once")
        .unwrap()
        .into_iter()
        .map(|p| p.client_id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn resume_restores_identity_subscriptions_user_data_and_replays() {
    let gw = gateway(config()).await;
    let mut a = Client::connect(gw.addr).await;
    let id = a.client_id();
    let session = a.welcome["payload"]["session_id"].clone();
    let tok = token(&a);
    let sub = a.subscribe("news").await;
    let epoch = sub["payload"]["epoch"].as_str().unwrap().to_string();
    publish(&gw, "news", 1).await;
    let m = a.recv().await;
    assert_eq!(m["payload"]["offset"], 1);
    gw.hub.set_user_data(&id, "cart", json!([1, 2, 3])).unwrap();

    vanish(&gw, a).await;
    for n in 2..=4 {
        publish(&gw, "news", n).await;
    }

    let mut b = Client::connect(gw.addr).await;
    assert_ne!(
        b.client_id(),
        id,
        "a new connection starts as a new session"
    );
    b.send(json!({
        "type": "resume",
        "request_id": "9",
        "payload": {"reconnect_token": tok, "positions": {"news": {"offset": 1, "epoch": epoch}}}
    }))
    .await;
    // What was missed comes first, in order, then the reply.
    for n in 2..=4u64 {
        let m = b.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["payload"]["offset"], n);
        assert_eq!(m["payload"]["data"]["n"], n);
    }
    let r = b.recv().await;
    assert_eq!(r["type"], "resume_response", "{r}");
    assert_eq!(r["request_id"], "9");
    let p = &r["payload"];
    assert_eq!(p["client_id"], id.as_str());
    assert_eq!(p["session_id"], session);
    assert_eq!(p["recovered"], json!({"news": true}));
    assert_eq!(p["replayed"], 3);
    let next = p["reconnect_token"].as_str().unwrap();
    assert_ne!(next, tok);
    assert!(gw.hub.validate_reconnect_token(next).is_ok());

    // The identity, user data and subscription are this connection's now.
    assert_eq!(gw.hub.user_data(&id, "cart"), Some(json!([1, 2, 3])));
    assert_eq!(gw.hub.connection_count(), 1);
    assert_eq!(gw.hub.detached_session_count(), 0);
    publish(&gw, "news", 5).await;
    let m = b.recv().await;
    assert_eq!(
        (
            m["payload"]["offset"].as_u64(),
            m["payload"]["data"]["n"].as_u64()
        ),
        (Some(5), Some(5))
    );
    assert_eq!(m["payload"]["channel"], "news");
}

#[tokio::test]
async fn a_token_is_good_for_one_resume_and_refusals_leave_the_connection_open() {
    let gw = gateway(config()).await;
    let a = Client::connect(gw.addr).await;
    let tok = token(&a);
    vanish(&gw, a).await;

    let mut b = Client::connect(gw.addr).await;
    let r = b
        .request("resume", json!({"reconnect_token": tok, "positions": {}}))
        .await;
    assert_eq!(r["type"], "resume_response", "{r}");
    let successor = r["payload"]["reconnect_token"]
        .as_str()
        .unwrap()
        .to_string();

    // Replayed: the session's generation moved on, so the old token is refused,
    // on a fresh connection too, and that connection carries on as a new session.
    let mut c = Client::connect(gw.addr).await;
    let own_id = c.client_id();
    let r = c
        .request("resume", json!({"reconnect_token": tok, "positions": {}}))
        .await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["payload"]["code"], "invalid_token");
    assert_eq!(r["request_id"], "r");
    let pong = c.request("ping", json!({})).await;
    assert_eq!(pong["type"], "pong");
    let sub = c.subscribe("still-here").await;
    assert_eq!(sub["payload"]["channel"], "still-here");
    assert!(gw.hub.connection(&own_id).is_some());

    // The successor works (and replaces b, which still holds the session: 4002).
    let mut d = Client::connect(gw.addr).await;
    let r = d
        .request(
            "resume",
            json!({"reconnect_token": successor, "positions": {}}),
        )
        .await;
    assert_eq!(r["type"], "resume_response", "{r}");
    assert_eq!(b.expect_close().await, 4002);
}

#[tokio::test]
async fn tampered_foreign_and_malformed_tokens_are_invalid() {
    let mut other_cfg = config();
    other_cfg
        .set("reconnect_secret", "another-node-secret-0123456789")
        .unwrap();
    let other = gateway(other_cfg).await;
    let foreign = token(&Client::connect(other.addr).await);

    let gw = gateway(config()).await;
    let a = Client::connect(gw.addr).await;
    let good = token(&a);
    let a_id = a.client_id();
    vanish(&gw, a).await;

    // Flip one character of the claims part: the MAC no longer matches.
    let mut tampered = good.clone().into_bytes();
    tampered[4] = if tampered[4] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    // Claims of another client under the good signature.
    let parts: Vec<&str> = good.split('.').collect();
    let forged_claims = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        claims["c"] = json!("mallory");
        b64.encode(claims.to_string())
    };
    let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);

    let mut c = Client::connect(gw.addr).await;
    for bad in [
        tampered.as_str(),
        forged.as_str(),
        foreign.as_str(),
        "",
        "k1.x.y",
        "not a token",
    ] {
        let r = c
            .request("resume", json!({"reconnect_token": bad, "positions": {}}))
            .await;
        assert_eq!(r["type"], "error", "{bad}: {r}");
        assert_eq!(r["payload"]["code"], "invalid_token", "{bad}: {r}");
        // The detail never echoes the token.
        if !bad.is_empty() {
            assert!(!r["payload"]["detail"].as_str().unwrap().contains(bad));
        }
    }
    // A payload without a token is a bad message, not a bad token.
    let r = c.request("resume", json!({"positions": {}})).await;
    assert_eq!(r["payload"]["code"], "invalid_message", "{r}");
    // None of that touched the session: the good token still resumes it.
    let r = c
        .request("resume", json!({"reconnect_token": good, "positions": {}}))
        .await;
    assert_eq!(r["type"], "resume_response", "{r}");
    assert_eq!(r["payload"]["client_id"], a_id.as_str());
}

#[tokio::test]
async fn an_expired_token_gets_token_expired() {
    let mut cfg = config();
    cfg.set("reconnect_token_ttl", "300ms").unwrap();
    let gw = gateway(cfg).await;
    let a = Client::connect(gw.addr).await;
    let tok = token(&a);
    vanish(&gw, a).await;
    // Observed, not assumed: the Hub itself says the token is past its expiry.
    let hub = gw.hub.clone();
    eventually("the token to expire", || {
        hub.validate_reconnect_token(&tok)
            .is_err_and(|e| e.kind() == &keel::ErrorKind::TokenExpired)
    })
    .await;
    let mut b = Client::connect(gw.addr).await;
    let r = b
        .request("resume", json!({"reconnect_token": tok, "positions": {}}))
        .await;
    assert_eq!(r["payload"]["code"], "token_expired", "{r}");
    assert_eq!(b.request("ping", json!({})).await["type"], "pong");
}

#[tokio::test]
async fn resume_disabled_gives_no_token_and_refuses() {
    let mut cfg = config();
    cfg.set("enable_reconnect", "false").unwrap();
    let gw = gateway(cfg).await;
    let a = Client::connect(gw.addr).await;
    assert_eq!(a.welcome["payload"]["reconnect_token"], Value::Null);
    drop(a);
    eventually("the server to see the drop", || {
        gw.hub.connection_count() == 0
    })
    .await;
    assert_eq!(gw.hub.detached_session_count(), 0, "nothing kept");
    let mut b = Client::connect(gw.addr).await;
    let r = b
        .request(
            "resume",
            json!({"reconnect_token": "k1.a.b", "positions": {}}),
        )
        .await;
    assert_eq!(r["type"], "error", "{r}");
}

#[tokio::test]
async fn resuming_while_the_old_connection_is_open_replaces_it() {
    let gw = gateway(config()).await;
    let mut a = Client::connect(gw.addr).await;
    let id = a.client_id();
    a.subscribe("room").await;
    let mut b = Client::connect(gw.addr).await;
    let r = b
        .request(
            "resume",
            json!({"reconnect_token": token(&a), "positions": {"room": null}}),
        )
        .await;
    assert_eq!(r["type"], "resume_response", "{r}");
    assert_eq!(r["payload"]["client_id"], id.as_str());
    assert_eq!(a.expect_close().await, 4002);
    eventually("one connection left", || gw.hub.connection_count() == 1).await;
    // A replaced connection leaves no detached session behind.
    assert_eq!(gw.hub.detached_session_count(), 0);
    assert_eq!(gw.hub.channel_members("room"), vec![id.clone()]);
    publish(&gw, "room", 1).await;
    assert_eq!(b.recv().await["payload"]["offset"], 1);
}

#[tokio::test]
async fn ten_thousand_abandoned_sessions_are_reclaimed() {
    let mut cfg = config();
    cfg.set("reconnect_token_ttl", "1s").unwrap();
    cfg.set("heartbeat_interval", "200ms").unwrap();
    let gw = gateway(cfg).await;
    const N: usize = 10_000;
    const BATCH: usize = 500;
    // Raw handshakes (no WebSocket client state) in batches, each socket then
    // dropped with a reset: 10k sessions lost without a goodbye, each holding
    // some user data.
    let mut made = 0;
    while made < N {
        let mut batch = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            batch.push(tokio::spawn(Raw::connect(gw.addr)));
        }
        let mut raws = Vec::with_capacity(BATCH);
        for t in batch {
            raws.push(t.await.unwrap());
        }
        let hub = gw.hub.clone();
        eventually("the batch to register", || hub.connection_count() >= BATCH).await;
        for conn in hub.client_ids() {
            let _ = hub.set_user_data(&conn, "blob", json!("x".repeat(200)));
        }
        for r in raws {
            r.tcp.set_zero_linger().unwrap();
        }
        made += BATCH;
        eventually("the batch to be detached", || hub.connection_count() == 0).await;
    }
    let hub = gw.hub.clone();
    eventually("every abandoned session to be reclaimed", || {
        hub.detached_session_count() == 0
    })
    .await;
    let snap = gw.hub.metrics_snapshot();
    assert_eq!(snap.connects_total, N as u64);
    assert_eq!(
        snap.sessions_expired_total, N as u64,
        "each one was kept, then freed"
    );
    assert_eq!(snap.user_data_bytes, 0, "their user data is freed too");
    assert_eq!(gw.hub.memory_usage().total_memory, 0);
}

#[tokio::test]
async fn presence_lingers_for_a_vanished_client_and_ends_at_once_on_a_clean_leave() {
    // Long enough that a loaded machine still tells "at once" from "after the
    // TTL" (at 600 ms a clean leave on a busy box had little margin).
    const TTL: Duration = Duration::from_millis(1500);
    let mut cfg = config();
    cfg.set("presence_ttl", &format!("{}ms", TTL.as_millis()))
        .unwrap();
    let gw = gateway(cfg).await;
    let mut stays = Client::connect(gw.addr).await;
    stays.subscribe("lobby").await;
    let mut leaves = Client::connect(gw.addr).await;
    leaves.subscribe("lobby").await;
    let mut vanishes = Client::connect(gw.addr).await;
    // The server hears this client for the last time no earlier than this.
    let last_frame = Instant::now();
    vanishes.subscribe("lobby").await;
    let mut all = vec![stays.client_id(), leaves.client_id(), vanishes.client_id()];
    all.sort();
    assert_eq!(present(&gw, "lobby"), all);

    // A clean close (1000) leaves now, long before presence_ttl.
    let closed_at = Instant::now();
    use futures::SinkExt;
    leaves
        .ws
        .send(yawc::Frame::close(yawc::close::CloseCode::Normal, b"bye"))
        .await
        .unwrap();
    let gone = leaves.client_id();
    eventually("the clean leave", || !present(&gw, "lobby").contains(&gone)).await;
    assert!(closed_at.elapsed() < TTL);

    // A vanished client stays present until presence_ttl after its last frame...
    let vid = vanishes.client_id();
    vanish(&gw, vanishes).await;
    if last_frame.elapsed() < TTL - Duration::from_millis(100) {
        assert!(
            present(&gw, "lobby").contains(&vid),
            "lingers while its session may return"
        );
    }
    // ...then it is gone (the server's clock has millisecond resolution).
    eventually("the vanished client's presence to expire", || {
        !present(&gw, "lobby").contains(&vid)
    })
    .await;
    assert!(last_frame.elapsed() >= TTL - Duration::from_millis(10));
    // The one that stayed (and just spoke) is all that is left.
    let answer = stays.request("presence", json!({"channel": "lobby"})).await;
    assert_eq!(answer["type"], "presence_response", "{answer}");
    assert_eq!(
        answer["payload"]["clients"],
        json!([{"client_id": stays.client_id(), "info": null}])
    );
}

#[tokio::test]
async fn presence_events_announce_joins_and_leaves_in_the_stream() {
    let mut cfg = config();
    cfg.set("presence_events", "true").unwrap();
    cfg.set("presence_ttl", "300ms").unwrap();
    let gw = gateway(cfg).await;
    let mut watcher = Client::connect(gw.addr).await;
    watcher.subscribe("room").await;
    let mut joiner = Client::connect(gw.addr).await;
    let jid = joiner.client_id();
    joiner.subscribe("room").await;
    let join = watcher.recv().await;
    assert_eq!(join["type"], "message", "{join}");
    assert_eq!(join["payload"]["data"]["presence"], "join");
    assert_eq!(join["payload"]["data"]["client_id"], jid.as_str());
    let r = joiner
        .request("unsubscribe", json!({"channel": "room"}))
        .await;
    assert_eq!(r["type"], "unsubscribe_response");
    let leave = watcher.recv().await;
    assert_eq!(leave["payload"]["data"]["presence"], "leave");
    assert_eq!(leave["payload"]["data"]["client_id"], jid.as_str());
    // Events are stream messages: contiguous offsets, recoverable from history.
    assert_eq!(
        leave["payload"]["offset"].as_u64().unwrap(),
        join["payload"]["offset"].as_u64().unwrap() + 1
    );
    // A vanished member's leave comes when its presence expires.
    joiner.subscribe("room").await;
    assert_eq!(watcher.recv().await["payload"]["data"]["presence"], "join");
    vanish(&gw, joiner).await;
    let started = Instant::now();
    let leave = watcher.recv().await;
    assert_eq!(leave["payload"]["data"]["presence"], "leave", "{leave}");
    assert!(started.elapsed() < WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_with_since_while_publishing_loses_and_repeats_nothing() {
    let mut cfg = config();
    cfg.set("history_size", "100000").unwrap();
    // This test is about the merge of replay and live stream, not backpressure: on a
    // loaded machine a subscriber can fall more than the default 1024 messages
    // behind, and drop_oldest would then (rightly) drop some.
    cfg.set("send_queue_max_messages", "100000").unwrap();
    cfg.set("send_queue_max_bytes", "67108864").unwrap();
    let gw = gateway(cfg).await;
    let hub = gw.hub.clone();
    const TOTAL: u64 = 3000;
    // The publisher keeps going (10 publications a millisecond) while the
    // subscribers join, each with `since` some way behind the head.
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for n in 1..=TOTAL {
            if n % 10 == 0 {
                tick.tick().await;
            }
            let raw = serde_json::value::to_raw_value(&json!({ "n": n })).unwrap();
            hub.publish("stream", &raw, None).await.unwrap();
        }
    });
    eventually("the stream to start", || {
        gw.hub
            .channel_position("stream")
            .now_or_never()
            .and_then(|p| p.ok().flatten())
            .is_some_and(|p| p.offset > 0)
    })
    .await;
    let mut subscribers = Vec::new();
    for k in 0..6u64 {
        let addr = gw.addr;
        let pos = gw.hub.channel_position("stream").await.unwrap().unwrap();
        let since = pos.offset.saturating_sub(37 * k);
        subscribers.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.send(json!({"type": "subscribe", "payload": {
                "channel": "stream", "since": {"offset": since, "epoch": pos.epoch}}}))
                .await;
            let mut offsets = Vec::new();
            let mut replied = false;
            // Live messages published after the join may come before the reply.
            while !replied || offsets.last().copied().unwrap_or(since) != TOTAL {
                let v = c.recv().await;
                match v["type"].as_str() {
                    Some("subscribe_response") => {
                        assert_eq!(v["payload"]["recovered"], true, "{v}");
                        replied = true;
                    }
                    Some("message") => {
                        let off = v["payload"]["offset"].as_u64().unwrap();
                        assert_eq!(v["payload"]["data"]["n"].as_u64(), Some(off));
                        offsets.push(off);
                    }
                    _ => panic!("unexpected {v}"),
                }
            }
            assert_eq!(
                offsets,
                (since + 1..=TOTAL).collect::<Vec<_>>(),
                "subscriber {k} from {since}: every offset once, in order"
            );
            pos.offset
        }));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut heads = Vec::new();
    for s in subscribers {
        heads.push(s.await.unwrap());
    }
    // The test means something only if most subscriptions raced the publisher.
    assert!(
        heads.iter().filter(|&&h| h < TOTAL).count() >= 3,
        "subscriptions did not overlap the publishing: heads {heads:?}"
    );
    publisher.await.unwrap();
}

//! Abuse limits against a real gateway: one client flooding over its message
//! rate is told `rate_limited`, loses only its own excess, and is closed with
//! 4003 when it keeps on, while a well-behaved client on the same node gets every
//! one of its messages; per-address connection caps (503) and connect rates
//! (429), with `X-Forwarded-For` believed only from trusted proxies. Source
//! addresses 127.0.0.x stand for different clients.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_limited_and_closed_while_others_get_everything() {
    let mut cfg = config();
    cfg.set("rate_limit_messages", "50").unwrap();
    cfg.set("rate_limit_burst", "20").unwrap();
    cfg.set("rate_limit_close_after", "500ms").unwrap();
    let gw = gateway(cfg).await;

    let mut good = Client::connect(gw.addr).await;
    good.subscribe("news").await;
    // Under the rate, nothing is refused: 15 publications at about 30/s.
    for i in 0..15 {
        let r = good
            .request("publish", json!({"channel": "mine", "data": i}))
            .await;
        assert_eq!(r["type"], "publish_response", "{r}");
        tokio::time::sleep(Duration::from_millis(33)).await;
    }

    const NEWS: u64 = 200;
    let hub = gw.hub.clone();
    let news = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        for n in 1..=NEWS {
            tick.tick().await;
            let raw = serde_json::value::to_raw_value(&json!({ "n": n })).unwrap();
            hub.publish("news", &raw, None).await.unwrap();
        }
    });

    let mut bad = Client::connect(gw.addr).await;
    let spam = json!({"type": "publish", "payload": {"channel": "spam", "data": "x"}}).to_string();
    let (mut limited, mut close) = (0, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    'flood: while tokio::time::Instant::now() < deadline {
        for _ in 0..20 {
            if bad.ws.send(yawc::Frame::text(spam.clone())).await.is_err() {
                break 'flood;
            }
        }
        // Read what came back without waiting long.
        while let Ok(frame) = tokio::time::timeout(Duration::from_millis(1), bad.ws.next()).await {
            let Some(frame) = frame else { break 'flood };
            match frame.opcode() {
                yawc::frame::OpCode::Text => {
                    let v: serde_json::Value = serde_json::from_slice(frame.payload()).unwrap();
                    if v["payload"]["code"] == "rate_limited" {
                        limited += 1;
                    }
                }
                yawc::frame::OpCode::Close => {
                    close = frame.close_code().map(u16::from);
                    break 'flood;
                }
                _ => {}
            }
        }
    }
    assert_eq!(close, Some(4003), "the flood ends with 4003");
    // One notice when the streak starts, then at most one a second.
    assert!((1..=2).contains(&limited), "{limited} rate_limited errors");
    news.await.unwrap();

    let mut got = Vec::new();
    while got.len() < NEWS as usize {
        let m = good.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        got.push(m["payload"]["data"]["n"].as_u64().unwrap());
    }
    assert_eq!(
        got,
        (1..=NEWS).collect::<Vec<_>>(),
        "every message, in order"
    );
    let snap = gw.hub.metrics_snapshot();
    assert!(snap.rate_limited_total > 0);
    eventually("the flooder's disconnect counted", || {
        gw.hub
            .metrics_snapshot()
            .disconnects_total
            .iter()
            .any(|(r, n)| *r == "rate_limited" && *n == 1)
    })
    .await;
    // The limit is per connection: the good client still publishes.
    let r = good
        .request("publish", json!({"channel": "mine", "data": "after"}))
        .await;
    assert_eq!(r["type"], "publish_response", "{r}");
}

fn from(last: u8) -> Option<std::net::IpAddr> {
    Some(std::net::IpAddr::from([127, 0, 0, last]))
}

fn status(r: &Result<Raw, String>) -> u16 {
    match r {
        Ok(_) => 101,
        Err(head) => head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    }
}

#[tokio::test]
async fn connections_per_address_are_capped_and_freed_on_disconnect() {
    let mut cfg = config();
    cfg.set("max_connections_per_ip", "2").unwrap();
    let gw = gateway(cfg).await;
    let a1 = Raw::connect_from(from(2), gw.addr, "/ws", "").await;
    let a2 = Raw::connect_from(from(2), gw.addr, "/ws", "").await;
    let a3 = Raw::connect_from(from(2), gw.addr, "/ws", "").await;
    assert_eq!((status(&a1), status(&a2), status(&a3)), (101, 101, 503));
    assert!(a3
        .err()
        .unwrap()
        .to_ascii_lowercase()
        .contains("retry-after"));
    // Another address is not affected.
    let b = Raw::connect_from(from(3), gw.addr, "/ws", "").await;
    assert_eq!(status(&b), 101);
    // A place frees up when one of them leaves.
    drop(a1);
    eventually("the first to be gone", || gw.hub.connection_count() == 2).await;
    let a4 = Raw::connect_from(from(2), gw.addr, "/ws", "").await;
    assert_eq!(status(&a4), 101);
    let rejected = gw.hub.metrics_snapshot().rejected_total;
    assert!(rejected.contains(&("ip_limit", 1)), "{rejected:?}");
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let mut cfg = config();
    cfg.set("max_connections_per_ip", "1").unwrap();
    cfg.set("trusted_proxies", "127.0.0.10, 10.0.0.0/8")
        .unwrap();
    let gw = gateway(cfg).await;
    let xff = |chain: &str| format!("X-Forwarded-For: {chain}\r\n");
    // Through the trusted proxy, the client is the right-most untrusted hop.
    let c1 = Raw::connect_from(from(10), gw.addr, "/ws", &xff("1.2.3.4")).await;
    let c2 = Raw::connect_from(from(10), gw.addr, "/ws", &xff("9.9.9.9, 1.2.3.4, 10.0.0.5")).await;
    let c3 = Raw::connect_from(from(10), gw.addr, "/ws", &xff("5.6.7.8")).await;
    assert_eq!((status(&c1), status(&c2), status(&c3)), (101, 503, 101));
    // From an untrusted peer the header is ignored: both count as 127.0.0.11.
    let d1 = Raw::connect_from(from(11), gw.addr, "/ws", &xff("20.0.0.1")).await;
    let d2 = Raw::connect_from(from(11), gw.addr, "/ws", &xff("20.0.0.2")).await;
    assert_eq!((status(&d1), status(&d2)), (101, 503));
}

#[tokio::test]
async fn connect_rate_per_address_answers_429() {
    let mut cfg = config();
    cfg.set("connection_rate_per_ip", "1").unwrap();
    cfg.set("connection_burst_per_ip", "3").unwrap();
    let gw = gateway(cfg).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = Raw::connect_from(from(20), gw.addr, "/ws", "").await;
        seen.push(status(&r));
        if let Err(head) = &r {
            assert!(head.to_ascii_lowercase().contains("retry-after"), "{head}");
        }
    }
    assert_eq!(
        seen,
        vec![101, 101, 101, 429],
        "a burst of 3, then the rate"
    );
    let other = Raw::connect_from(from(21), gw.addr, "/ws", "").await;
    assert_eq!(status(&other), 101);
    let rejected = gw.hub.metrics_snapshot().rejected_total;
    assert!(rejected.contains(&("ip_rate", 1)), "{rejected:?}");
}

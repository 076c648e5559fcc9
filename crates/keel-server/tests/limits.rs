//! Abuse limits against a real gateway: one client flooding over its message
//! rate is told `rate_limited`, loses only its own excess, and is closed with
//! 4003 when it keeps on; a well-behaved client on the same node meanwhile gets
//! every one of its messages.
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
            hub.publish("news", &raw, None).unwrap();
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

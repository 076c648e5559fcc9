//! The gateway's wire protocol over real sockets: welcome, channels and offsets,
//! rpc, every bad-input row of PROTOCOL.md, heartbeats and slow consumers.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_carries_identity_and_heartbeat_settings() {
    let mut c = config();
    c.set("heartbeat_interval", "7s").unwrap();
    c.set("heartbeat_timeout", "8s").unwrap();
    c.set("node_id", "node-a").unwrap();
    let gw = gateway(c).await;
    let a = Client::connect(gw.addr).await;
    let b = Client::connect(gw.addr).await;
    let p = &a.welcome["payload"];
    assert_eq!(p["heartbeat"]["interval_ms"], 7000);
    assert_eq!(p["heartbeat"]["timeout_ms"], 8000);
    assert_eq!(p["heartbeat"]["mode"], "both");
    assert_eq!(p["node"], "node-a");
    assert!(a.welcome["timestamp"].as_str().unwrap().ends_with('Z'));
    // Anonymous clients get distinct server-generated UUIDs.
    assert_eq!(a.client_id().len(), 36);
    assert_ne!(a.client_id(), b.client_id());
    assert_ne!(p["session_id"], b.welcome["payload"]["session_id"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fans_out_with_contiguous_offsets() {
    let gw = gateway(config()).await;
    let mut publisher = Client::connect(gw.addr).await;
    let mut subs = Vec::new();
    for _ in 0..2 {
        let mut s = Client::connect(gw.addr).await;
        let r = s.subscribe("room:1").await;
        assert_eq!(r["request_id"], "r");
        assert_eq!(r["payload"]["channel"], "room:1");
        assert_eq!(r["payload"]["offset"], 0);
        subs.push(s);
    }
    let n = 300u64;
    let mut epoch = None;
    for i in 0..n {
        publisher
            .send(json!({"type": "publish", "payload": {"channel": "room:1", "data": {"i": i}}, "request_id": i}))
            .await;
    }
    for i in 0..n {
        let r = publisher.recv().await;
        assert_eq!(r["type"], "publish_response", "{r}");
        assert_eq!(r["request_id"], i);
        assert_eq!(r["payload"]["offset"], i + 1);
        epoch.get_or_insert_with(|| r["payload"]["epoch"].clone());
    }
    for s in subs.iter_mut() {
        for i in 0..n {
            let m = s.recv().await;
            assert_eq!(m["type"], "message", "{m}");
            assert_eq!(m["payload"]["channel"], "room:1");
            assert_eq!(
                m["payload"]["offset"],
                i + 1,
                "strictly increasing, no gap, no duplicate"
            );
            assert_eq!(m["payload"]["data"]["i"], i);
            assert_eq!(m["payload"]["publisher"], publisher.client_id());
            assert_eq!(Some(&m["payload"]["epoch"]), epoch.as_ref());
        }
    }
    // Unsubscribed clients get nothing more.
    let r = subs[0]
        .request("unsubscribe", json!({"channel": "room:1"}))
        .await;
    assert_eq!(r["type"], "unsubscribe_response");
    publisher
        .send(json!({"type": "publish", "payload": {"channel": "room:1", "data": "last"}}))
        .await;
    assert_eq!(subs[1].recv().await["payload"]["data"], "last");
    let r = subs[0].request("ping", json!({})).await;
    assert_eq!(
        r["type"], "pong",
        "the unsubscribed client saw {r} before its pong"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_since_recovers_or_says_it_cannot() {
    let mut c = config();
    c.set("history_size", "5").unwrap();
    let gw = gateway(c).await;
    let mut a = Client::connect(gw.addr).await;
    let first = a.subscribe("h").await;
    let epoch = first["payload"]["epoch"].as_str().unwrap().to_string();
    for i in 0..8 {
        a.request("publish", json!({"channel": "h", "data": i}))
            .await;
    }
    let mut b = Client::connect(gw.addr).await;
    // Offsets 6..8 are in history (5 kept: 4..8): recovered, replayed in order.
    b.send(json!({"type": "subscribe", "payload": {"channel": "h", "since": {"offset": 5, "epoch": epoch}}}))
        .await;
    for off in 6..=8 {
        let m = b.recv().await;
        assert_eq!(m["payload"]["offset"], off, "{m}");
    }
    let r = b.recv().await;
    assert_eq!(r["type"], "subscribe_response");
    assert_eq!(r["payload"]["recovered"], true);
    assert_eq!(r["payload"]["replayed"], 3);
    // Offset 1 is gone: no partial replay.
    let mut c2 = Client::connect(gw.addr).await;
    let r = c2
        .request(
            "subscribe",
            json!({"channel": "h", "since": {"offset": 1, "epoch": epoch}}),
        )
        .await;
    assert_eq!(r["payload"]["recovered"], false);
    assert_eq!(r["payload"]["replayed"], 0);
    assert_eq!(r["payload"]["offset"], 8);
    // Another epoch: not recovered either.
    let r = c2
        .request(
            "subscribe",
            json!({"channel": "h", "since": {"offset": 7, "epoch": "other"}}),
        )
        .await;
    assert_eq!(r["payload"]["recovered"], false);
    // history returns what is kept.
    let r = c2
        .request(
            "history",
            json!({"channel": "h", "since": {"offset": 6, "epoch": epoch}}),
        )
        .await;
    let offsets: Vec<u64> = r["payload"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![7, 8]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_errors_and_the_connection_stays_open() {
    let gw = gateway(config()).await;
    let mut c = Client::connect(gw.addr).await;
    c.send_text("{not json").await;
    let e = c.recv().await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["payload"]["code"], "invalid_json");

    c.send_text(r#"["an","array"]"#).await;
    assert_eq!(c.recv().await["payload"]["code"], "invalid_message");

    let e = c.request("teleport", json!({})).await;
    assert_eq!(e["payload"]["code"], "unknown_type");
    assert_eq!(e["request_id"], "r", "errors echo the request_id");

    let e = c.request("subscribe", json!({"chanel": "typo"})).await;
    assert_eq!(e["payload"]["code"], "invalid_message");

    let e = c.request("subscribe", json!({"channel": ""})).await;
    assert_eq!(e["payload"]["code"], "invalid_message");

    let e = c
        .request("subscribe", json!({"channel": "x".repeat(300)}))
        .await;
    assert_eq!(e["payload"]["code"], "invalid_message");

    let e = c.request("rpc", json!({"method": "nope"})).await;
    assert_eq!(e["payload"]["code"], "not_found");

    let r = c
        .request(
            "rpc",
            json!({"method": "echo", "data": {"deep": [1, "two", null]}}),
        )
        .await;
    assert_eq!(r["type"], "rpc_response");
    assert_eq!(r["payload"]["data"], json!({"deep": [1, "two", null]}));

    // Still open and working after all of that.
    let r = c.request("ping", json!({})).await;
    assert_eq!(r["type"], "pong");
    assert_eq!(r["request_id"], "r");
    assert_eq!(gw.hub.connection_count(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_closes_1009() {
    let mut c = config();
    c.set("max_message_size", "1024").unwrap();
    c.set("send_queue_max_bytes", "65536").unwrap();
    let gw = gateway(c).await;
    let mut ok = Client::connect(gw.addr).await;
    let mut big = Client::connect(gw.addr).await;
    // Exactly at the limit is fine.
    let shell = r#"{"type":"ping","pad":""}"#.len();
    let at_limit = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(1024 - shell));
    assert_eq!(at_limit.len(), 1024);
    big.send_text(&at_limit).await;
    assert_eq!(big.recv().await["type"], "pong");
    big.send_text(&"x".repeat(1025)).await;
    assert_eq!(big.expect_close().await, 1009);
    // The other connection is unaffected.
    assert_eq!(ok.request("ping", json!({})).await["type"], "pong");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frame_closes_1003() {
    let gw = gateway(config()).await;
    let mut raw = Raw::connect(gw.addr).await;
    raw.send_frame(true, 0x2, b"\x00\x01binary").await;
    assert_eq!(raw.expect_close().await, 1003);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_1007() {
    let gw = gateway(config()).await;
    let mut raw = Raw::connect(gw.addr).await;
    raw.send_frame(true, 0x1, b"{\"type\":\"\xff\xfe\"}").await;
    assert_eq!(raw.expect_close().await, 1007);
    // Split across fragments too.
    let mut raw = Raw::connect(gw.addr).await;
    raw.send_frame(false, 0x1, b"{\"type\":\"\xe2\x82").await;
    raw.send_frame(true, 0x0, b"\x28\"}").await;
    assert_eq!(raw.expect_close().await, 1007);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_evicted_after_interval_plus_timeout() {
    let mut c = config();
    c.set("heartbeat_interval", "300ms").unwrap();
    c.set("heartbeat_timeout", "300ms").unwrap();
    let gw = gateway(c).await;
    // A zombie: handshake done, then never reads or writes (no pong, nothing).
    let _zombie = Raw::connect(gw.addr).await;
    // A live client that answers pings (the client library answers while reading).
    let mut live = Client::connect(gw.addr).await;
    let start = Instant::now();
    eventually("two connections registered", || {
        gw.hub.connection_count() == 2
    })
    .await;
    // While waiting, keep the live client reading so it answers Ping frames and
    // sees JSON pings.
    let mut pings = 0;
    while gw.hub.connection_count() == 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "zombie not evicted"
        );
        if let Ok(v) =
            tokio::time::timeout(Duration::from_millis(50), recv_json(&mut live.ws)).await
        {
            if v["type"] == "ping" {
                pings += 1;
                live.send(json!({"type": "pong"})).await;
            }
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(550),
        "evicted too early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(600 + 150 + 1500),
        "evicted too late: {took:?}"
    );
    assert!(pings >= 1, "the server sent JSON pings");
    // The live client is still there, well past interval + timeout.
    let keep_until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < keep_until {
        if let Ok(v) =
            tokio::time::timeout(Duration::from_millis(50), recv_json(&mut live.ws)).await
        {
            if v["type"] == "ping" {
                live.send(json!({"type": "pong"})).await;
            }
        }
    }
    assert_eq!(gw.hub.connection_count(), 1);
    let m = gw.hub.metrics_snapshot();
    assert_eq!(m.heartbeat_timeouts_total, 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_does_not_slow_others_and_stays_bounded() {
    let mut c = config();
    c.set("send_queue_max_messages", "64").unwrap();
    c.set("send_queue_max_bytes", "262144").unwrap();
    // The publisher sends 2,000 messages as fast as the fast reader takes them.
    c.set("rate_limit_messages", "0").unwrap();
    let gw = gateway(c).await;
    // The slow one subscribes, then never reads again.
    let mut slow = Client::connect(gw.addr).await;
    slow.subscribe("feed").await;
    let mut fast = Client::connect(gw.addr).await;
    fast.subscribe("feed").await;
    let payload = "p".repeat(16 * 1024);
    let n = 2000u64;
    let mut publisher = Client::connect(gw.addr).await;
    // The publisher stays at most WINDOW messages ahead of the fast reader, so the
    // fast one's queue (16 messages of 16 KiB fit its bound) never overflows
    // however the machine schedules the reader, while the slow one's does.
    const WINDOW: u64 = 8;
    let (received, mut progress) = tokio::sync::watch::channel(0u64);
    let reader = tokio::spawn(async move {
        let mut next = 1u64;
        while next <= n {
            let m = fast.recv().await;
            assert_eq!(
                m["payload"]["offset"], next,
                "fast subscriber lost or reordered"
            );
            received.send_replace(next);
            next += 1;
        }
    });
    let mut max_queue = 0usize;
    for i in 0..n {
        let alive = tokio::time::timeout(WAIT, progress.wait_for(|got| got + WINDOW > i))
            .await
            .expect("the fast subscriber keeps receiving while the slow one is stuck")
            .is_ok();
        if !alive {
            break; // the reader failed: awaiting it below says why
        }
        publisher
            .send(json!({"type": "publish", "payload": {"channel": "feed", "data": {"i": i, "pad": payload}}}))
            .await;
        let r = publisher.recv().await;
        assert_eq!(r["type"], "publish_response");
        if i % 100 == 0 {
            max_queue = max_queue.max(gw.hub.metrics_snapshot().send_queue_bytes);
        }
    }
    tokio::time::timeout(WAIT * 3, reader)
        .await
        .expect("the fast subscriber received everything in time")
        .expect("fast reader ok");
    // The slow one's queue hit its bound and dropped instead of growing.
    assert!(
        gw.hub.dropped_total() > 0,
        "the slow subscriber's queue dropped messages"
    );
    let bound = 262144 + 64 * 1024; // queue bound + one message in flight
    assert!(
        max_queue <= bound * 2,
        "queued bytes {max_queue} exceed the bounds"
    );
    let stats = gw.hub.metrics_snapshot();
    assert!(
        stats.send_queue_bytes <= bound,
        "{} bytes queued",
        stats.send_queue_bytes
    );
    drop(slow);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_closes_slow_consumer_with_4000() {
    let mut c = config();
    c.set("send_queue_max_messages", "8").unwrap();
    c.set("slow_consumer_policy", "disconnect").unwrap();
    c.set("slow_consumer_timeout", "200ms").unwrap();
    // Regression: the timeout was checked on the sweeper's tick, a quarter of the
    // heartbeat (here 15 s, past the deadline); the test used to set 100 ms
    // heartbeats to hide that.
    c.set("heartbeat_interval", "60s").unwrap();
    c.set("heartbeat_timeout", "60s").unwrap();
    c.set("presence_ttl", "60s").unwrap();
    // The slow one never takes our Close: do not wait 3 s for it.
    c.set("close_timeout", "200ms").unwrap();
    let gw = gateway(c).await;
    let mut slow = Raw::connect(gw.addr).await;
    // Subscribe, then stop reading.
    slow.send_frame(
        true,
        1,
        br#"{"type":"subscribe","payload":{"channel":"s"}}"#,
    )
    .await;
    eventually("slow subscribed", || gw.hub.channel_members("s").len() == 1).await;
    let data =
        serde_json::value::RawValue::from_string(format!("\"{}\"", "z".repeat(60_000))).unwrap();
    let deadline = Instant::now() + WAIT;
    while gw.hub.connection_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "slow consumer never disconnected"
        );
        gw.hub.publish("s", &data, None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Counted before it left the registry.
    let slow_count = gw
        .hub
        .metrics_snapshot()
        .disconnects_total
        .iter()
        .find(|(r, _)| *r == "slow_consumer")
        .map_or(0, |(_, n)| *n);
    assert_eq!(slow_count, 1);
    gw.shutdown().await;
}

/// Regression (found by the `protocol_decode` fuzz target): JSON numbers no f64
/// holds are valid JSON; `publish` and the `echo` rpc forward `data` verbatim
/// instead of re-parsing it, so they reach subscribers unchanged.
#[tokio::test]
async fn data_is_forwarded_verbatim_even_numbers_beyond_f64() {
    let gw = gateway(config()).await;
    let mut sub = Client::connect(gw.addr).await;
    sub.subscribe("big").await;
    let mut publisher = Raw::connect(gw.addr).await;
    let text =
        r#"{"type":"publish","payload":{"channel":"big","data":{"n":[4,8.806679214089E828]}}}"#;
    publisher.send_frame(true, 1, text.as_bytes()).await;
    use futures::StreamExt;
    let frame = tokio::time::timeout(WAIT, async {
        loop {
            let f = sub.ws.next().await.expect("open");
            if f.opcode() == yawc::frame::OpCode::Text
                && f.payload().starts_with(br#"{"type":"message""#)
            {
                return f;
            }
        }
    })
    .await
    .expect("the message arrives");
    let body = String::from_utf8(frame.payload().to_vec()).unwrap();
    assert!(
        body.contains(r#""data":{"n":[4,8.806679214089E828]}"#),
        "{body}"
    );
    let mut c = Client::connect(gw.addr).await;
    c.send_text(r#"{"type":"rpc","payload":{"method":"echo","data":1e999},"request_id":"e"}"#)
        .await;
    let raw = tokio::time::timeout(WAIT, async {
        loop {
            let f = c.ws.next().await.expect("open");
            if f.opcode() == yawc::frame::OpCode::Text
                && f.payload().starts_with(br#"{"type":"rpc_response""#)
            {
                return String::from_utf8(f.payload().to_vec()).unwrap();
            }
        }
    })
    .await
    .expect("the echo arrives");
    assert!(raw.contains(r#""data":1e999"#), "{raw}");
}

#[tokio::test]
async fn data_nested_deeper_than_max_data_depth_is_refused_before_anyone_gets_it() {
    let gw = gateway(config()).await;
    let mut sub = Client::connect(gw.addr).await;
    sub.subscribe("deep").await;
    let mut c = Client::connect(gw.addr).await;
    // 5,000 arrays inside one another: valid JSON that most clients cannot parse.
    let bomb = "[".repeat(5000) + &"]".repeat(5000);
    c.send_text(&format!(
        r#"{{"type":"publish","payload":{{"channel":"deep","data":{bomb}}},"request_id":"d"}}"#
    ))
    .await;
    let e = c.recv().await;
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["payload"]["code"], "invalid_message");
    assert!(
        e["payload"]["detail"]
            .as_str()
            .unwrap()
            .contains("max_data_depth (64)"),
        "{e}"
    );
    assert_eq!(e["request_id"], "d");
    // At the limit it goes through, and it is the first the subscriber sees.
    let ok = "[".repeat(64) + "1" + &"]".repeat(64);
    c.send_text(&format!(
        r#"{{"type":"publish","payload":{{"channel":"deep","data":{ok}}}}}"#
    ))
    .await;
    assert_eq!(c.recv().await["type"], "publish_response");
    let m = sub.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["payload"]["offset"].as_u64()),
        (Some("message"), Some(1))
    );
    // The HTTP API applies the same rule.
    let deeper: serde_json::Value =
        serde_json::from_str(&("[".repeat(100) + &"]".repeat(100))).unwrap();
    let (status, body) = http(
        gw.addr,
        "POST",
        "/api/publish",
        Some("test-key"),
        Some(json!({"channel": "deep", "data": deeper})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("max_data_depth"), "{body}");
    // Nothing else was published, and the publisher is still connected.
    assert_eq!(c.request("ping", json!({})).await["type"], "pong");
    let h = c.request("history", json!({"channel": "deep"})).await;
    assert_eq!(h["payload"]["messages"].as_array().unwrap().len(), 1, "{h}");
    gw.shutdown().await;
}

//! The client against a real gateway through a proxy that fails the way networks
//! fail: resets, refusals, silence, a restarted server.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use keel_client::{Client, ErrorKind, Event};
use serde_json::json;

/// Collects the `Message` events of `channel` until `n` have arrived; returns the
/// data's `n` fields and offsets, and any Unrecovered / Resumed events seen.
async fn collect(
    events: &mut keel_client::Events,
    channel: &str,
    n: usize,
) -> (Vec<u64>, Vec<u64>, Vec<Event>, usize) {
    let mut values = Vec::new();
    let mut offsets = Vec::new();
    let mut unrecovered = Vec::new();
    let mut resumed = 0;
    tokio::time::timeout(Duration::from_secs(60), async {
        while values.len() < n {
            match events.next().await.expect("events open") {
                Event::Message(m) if m.channel == channel => {
                    values.push(m.data["n"].as_u64().unwrap());
                    offsets.push(m.offset);
                }
                e @ Event::Unrecovered { .. } => unrecovered.push(e),
                Event::Resumed { .. } => resumed += 1,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {n} messages arrived", values.len()));
    (values, offsets, unrecovered, resumed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_lost_or_repeated_across_repeated_cuts() {
    let mut cfg = config();
    cfg.set("history_size", "10000").unwrap();
    let gw = gateway(cfg).await;
    let proxy = Proxy::start(gw.addr).await;

    let (sub, mut events) = Client::connect(&proxy.ws_url(), fast()).unwrap();
    sub.subscribe("feed").await.unwrap();
    let (publisher, _pub_events) =
        Client::connect(&format!("ws://{}/ws", gw.addr), fast()).unwrap();

    const N: u64 = 600;
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        for i in 0..N {
            tick.tick().await;
            publisher.publish("feed", json!({ "n": i })).await.unwrap();
        }
    });
    // Cut the subscriber's connection every 60 ms while the publisher runs.
    let cutting = {
        let mut cuts = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(60));
        tick.tick().await;
        while !publishing.is_finished() {
            tick.tick().await;
            cuts += proxy.cut().min(1);
        }
        cuts
    };
    publishing.await.unwrap();

    let (values, offsets, unrecovered, resumed) = collect(&mut events, "feed", N as usize).await;
    assert_eq!(
        values,
        (0..N).collect::<Vec<_>>(),
        "every message, in order, once"
    );
    assert_eq!(offsets, (1..=N).collect::<Vec<_>>());
    assert!(unrecovered.is_empty(), "{unrecovered:?}");
    assert!(cutting >= 5, "only {cutting} cuts happened");
    assert!(resumed >= 5, "only {resumed} resumes for {cutting} cuts");
    // Nothing more (no duplicate tail) is pending: a marker published now is next.
    let (marker, _m) = Client::connect(&format!("ws://{}/ws", gw.addr), fast()).unwrap();
    marker.publish("feed", json!({ "n": N })).await.unwrap();
    let (values, _, _, _) = collect(&mut events, "feed", 1).await;
    assert_eq!(values, vec![N]);
}

#[tokio::test]
async fn gap_larger_than_history_is_reported_never_partial() {
    let mut cfg = config();
    cfg.set("history_size", "10").unwrap();
    let gw = gateway(cfg).await;
    let proxy = Proxy::start(gw.addr).await;
    let (sub, mut events) = Client::connect(&proxy.ws_url(), fast()).unwrap();
    sub.subscribe("c").await.unwrap();
    let publish = |n: u64| {
        let hub = gw.hub.clone();
        async move {
            let raw = serde_json::value::to_raw_value(&json!({ "n": n })).unwrap();
            hub.publish("c", &raw, None).await.unwrap();
        }
    };
    publish(0).await;
    let (v, _, _, _) = collect(&mut events, "c", 1).await;
    assert_eq!(v, vec![0]);

    // Down long enough for 30 publications; history keeps 10.
    proxy.block(true);
    proxy.cut();
    disconnected(&mut events).await;
    for n in 1..=30 {
        publish(n).await;
    }
    proxy.block(false);
    let recovered = resumed(&mut events).await;
    assert_eq!(recovered, BTreeMap::from([("c".to_string(), false)]));
    let lost = unrecovered(&mut events).await;
    assert_eq!(
        lost,
        Event::Unrecovered {
            channel: "c".into(),
            from: 2,
            to: Some(31)
        }
    );
    // Nothing of the gap was delivered; the stream continues after it.
    publish(31).await;
    let (v, offsets, unrecovered, _) = collect(&mut events, "c", 1).await;
    assert_eq!((v, offsets), (vec![31], vec![32]));
    assert!(unrecovered.is_empty());
}

#[tokio::test]
async fn gap_past_history_ttl_is_reported() {
    let mut cfg = config();
    cfg.set("history_ttl", "300ms").unwrap();
    let gw = gateway(cfg).await;
    let proxy = Proxy::start(gw.addr).await;
    let (sub, mut events) = Client::connect(&proxy.ws_url(), fast()).unwrap();
    sub.subscribe("c").await.unwrap();
    proxy.block(true);
    proxy.cut();
    disconnected(&mut events).await;
    let raw = serde_json::value::to_raw_value(&json!({ "n": 1 })).unwrap();
    gw.hub.publish("c", &raw, None).await.unwrap();
    // Wait until history has expired it (observed, not assumed).
    let hub = gw.hub.clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    let all = keel::HistoryQuery {
        after: 0,
        epoch: None,
        limit: 10,
    };
    while !hub.history("c", all).await.unwrap().publications.is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.block(false);
    let recovered = resumed(&mut events).await;
    assert!(!recovered["c"]);
    let lost = unrecovered(&mut events).await;
    assert_eq!(
        lost,
        Event::Unrecovered {
            channel: "c".into(),
            from: 1,
            to: Some(1)
        }
    );
}

#[tokio::test]
async fn restarted_gateway_new_epoch_gives_recovered_false() {
    let gw = gateway(config()).await;
    let proxy = Proxy::start(gw.addr).await;
    let (sub, mut events) = Client::connect(&proxy.ws_url(), fast()).unwrap();
    let first = sub.subscribe("c").await.unwrap();
    let raw = serde_json::value::to_raw_value(&json!({ "n": 1 })).unwrap();
    gw.hub.publish("c", &raw, None).await.unwrap();
    collect(&mut events, "c", 1).await;

    // Restart: a new process in memory mode (same secret, so the token is valid).
    gw.shutdown().await;
    let gw2 = gateway(config()).await;
    proxy.retarget(gw2.addr);
    proxy.cut();
    let recovered = resumed(&mut events).await;
    assert!(!recovered["c"], "a new epoch cannot be recovered");
    let Event::Unrecovered { from, to, .. } = unrecovered(&mut events).await else {
        unreachable!()
    };
    assert_eq!((from, to), (2, None));
    // The subscription came back on the new node: its messages arrive, in the new epoch.
    gw2.hub.publish("c", &raw, None).await.unwrap();
    let m = next_matching(&mut events, "Message", |e| matches!(e, Event::Message(_))).await;
    let Event::Message(m) = m else { unreachable!() };
    assert_eq!(m.offset, 1);
    assert_ne!(m.epoch, first.epoch);
}

#[tokio::test]
async fn silent_server_is_detected_by_the_watchdog() {
    let mut cfg = config();
    cfg.set("heartbeat_interval", "150ms").unwrap();
    cfg.set("heartbeat_timeout", "150ms").unwrap();
    let gw = gateway(cfg).await;
    let proxy = Proxy::start(gw.addr).await;
    let (sub, mut events) = Client::connect(&proxy.ws_url(), fast()).unwrap();
    // The client last hears the server no earlier than this: the subscribe's
    // answer (or a ping after it) comes later. Taken after the freeze, the bound
    // would be up to a frame's age too late.
    let started = tokio::time::Instant::now();
    sub.subscribe("c").await.unwrap();
    // A zombie path: no FIN, no RST, nothing.
    proxy.freeze();
    let (code, reason, will_reconnect) = disconnected(&mut events).await;
    assert_eq!(code, None);
    assert!(reason.contains("nothing heard"), "{reason}");
    assert!(will_reconnect);
    // Not before interval + timeout of silence.
    assert!(started.elapsed() >= Duration::from_millis(300));
    resumed(&mut events).await;
}

#[tokio::test]
async fn server_shutdown_delay_is_honoured() {
    let mut cfg = config();
    cfg.set("shutdown_reconnect_window", "400ms").unwrap();
    let gw = gateway(cfg).await;
    let (_c, mut events) = Client::connect(&format!("ws://{}/ws", gw.addr), fast()).unwrap();
    connected(&mut events).await;
    let drain = {
        let addr = gw.addr;
        tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(
                b"POST /admin/drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
        })
    };
    let Event::ServerShutdown { delay } = next_matching(&mut events, "ServerShutdown", |e| {
        matches!(e, Event::ServerShutdown { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert!(delay <= Duration::from_millis(400));
    let (code, _, _) = disconnected(&mut events).await;
    assert_eq!(code, Some(1012));
    let Event::Reconnecting {
        attempt,
        delay: waited,
    } = next_matching(&mut events, "Reconnecting", |e| {
        matches!(e, Event::Reconnecting { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (attempt, waited),
        (1, delay),
        "the first wait is the server's hint"
    );
    drain.await.unwrap();
}

#[tokio::test]
async fn no_reconnect_after_1008_or_own_close() {
    let gw = gateway(config()).await;
    let url = format!("ws://{}/ws", gw.addr);
    let (_c, mut events) = Client::connect(&url, fast()).unwrap();
    let Event::Connected { client_id, .. } = next_matching(&mut events, "Connected", |e| {
        matches!(e, Event::Connected { .. })
    })
    .await
    else {
        unreachable!()
    };
    gw.hub.disconnect_with(&client_id, 1008, "go away").unwrap();
    let (code, _, will_reconnect) = disconnected(&mut events).await;
    assert_eq!((code, will_reconnect), (Some(1008), false));
    let closed = next_matching(&mut events, "Closed", |e| matches!(e, Event::Closed { .. })).await;
    assert!(matches!(closed, Event::Closed { .. }));
    assert!(events.next().await.is_none(), "nothing after Closed");

    let (c, mut events) = Client::connect(&url, fast()).unwrap();
    connected(&mut events).await;
    c.close().await;
    let (code, _, will_reconnect) = disconnected(&mut events).await;
    assert_eq!((code, will_reconnect), (Some(1000), false));
    next_matching(&mut events, "Closed", |e| matches!(e, Event::Closed { .. })).await;
    let err = c.publish("c", json!(1)).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Closed);
    // A client close (1000) leaves no session behind on the server.
    eventually("server saw the close", || gw.hub.connection_count() == 0).await;
    assert_eq!(gw.hub.detached_session_count(), 0);
}

#[tokio::test]
async fn calls_made_offline_are_sent_after_reconnecting_up_to_the_bound() {
    let gw = gateway(config()).await;
    let proxy = Proxy::start(gw.addr).await;
    let mut opts = fast();
    opts.max_queued = 2;
    let (c, mut events) = Client::connect(&proxy.ws_url(), opts).unwrap();
    c.subscribe("c").await.unwrap();
    proxy.block(true);
    proxy.cut();
    disconnected(&mut events).await;
    // Three calls race into a queue that holds two: exactly one is refused, at
    // once, while the path is still down.
    let calls: Vec<_> = (1..=3)
        .map(|n| {
            let c = c.clone();
            tokio::spawn(async move { (n, c.publish("c", json!({ "n": n })).await) })
        })
        .collect();
    eventually("one call to be refused", || {
        calls.iter().any(|t| t.is_finished())
    })
    .await;
    let mut refused = None;
    let mut waiting = Vec::new();
    for t in calls {
        if t.is_finished() && refused.is_none() {
            let (n, r) = t.await.unwrap();
            let e = r.expect_err("the finished call is the refused one");
            assert_eq!(e.kind(), &ErrorKind::QueueFull);
            assert!(e.detail().contains("max_queued"), "{}", e.detail());
            refused = Some(n);
        } else {
            waiting.push(t);
        }
    }
    assert_eq!(waiting.len(), 2);
    proxy.block(false);
    let mut sent = Vec::new();
    for t in waiting {
        let (n, r) = t.await.unwrap();
        sent.push((r.unwrap().offset, n));
    }
    sent.sort();
    assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2]);
    assert!(!sent.iter().any(|s| Some(s.1) == refused));
    let (v, _, _, _) = collect(&mut events, "c", 2).await;
    assert_eq!(v, sent.iter().map(|s| s.1).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_from_slow_consumer_drops_is_repaired_from_history() {
    let mut cfg = config();
    cfg.set("history_size", "1000").unwrap();
    // 600 x 16 KiB: past the default 4 MiB a channel keeps.
    cfg.set("history_max_bytes", "0").unwrap();
    cfg.set("send_queue_max_messages", "8").unwrap();
    cfg.set("slow_consumer_policy", "drop_oldest").unwrap();
    let gw = gateway(cfg).await;
    let proxy = Proxy::start(gw.addr).await;
    let (sub, mut events) = Client::connect(&proxy.ws_url(), fast()).unwrap();
    sub.subscribe("big").await.unwrap();
    // The path stalls; the server's queue for this client overflows and drops.
    proxy.freeze();
    let pad = "x".repeat(16 * 1024);
    const N: u64 = 600;
    for n in 0..N {
        let raw = serde_json::value::to_raw_value(&json!({ "n": n, "pad": pad })).unwrap();
        gw.hub.publish("big", &raw, None).await.unwrap();
    }
    assert!(
        gw.hub.dropped_total() > 0,
        "the test needs the server to drop"
    );
    proxy.thaw();
    let (values, _, unrecovered, _) = collect(&mut events, "big", N as usize).await;
    assert_eq!(values, (0..N).collect::<Vec<_>>());
    assert!(unrecovered.is_empty(), "{unrecovered:?}");
}

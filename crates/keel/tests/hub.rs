//! The library's public API over real sockets: replacement, panic isolation,
//! rooms, broadcasts, user data and memory limits, several Hubs in one process.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use keel::{Config, Connection, Deferred, DisconnectReason, ErrorKind, Handler, Hub, Message};

/// Echoes text, panics on "boom", counts disconnects.
#[derive(Default, Clone)]
struct Echo {
    gone: Arc<AtomicUsize>,
    last_reason: Arc<Mutex<Option<(DisconnectReason, u16)>>>,
}

impl Handler for Echo {
    fn on_message(&self, _hub: &Hub, conn: &Connection, msg: Message<'_>) -> Option<Deferred> {
        if let Message::Text(t) = msg {
            assert!(t != "boom", "handler panics on purpose");
            conn.send_text(bytes::Bytes::copy_from_slice(t.as_bytes()));
        }
        None
    }

    fn on_disconnect(&self, _hub: &Hub, _conn: &Connection, reason: DisconnectReason, code: u16) {
        self.gone.fetch_add(1, Ordering::SeqCst);
        *self.last_reason.lock().unwrap() = Some((reason, code));
    }
}

fn cfg() -> Config {
    Config::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_client_id_replaces_the_old_connection() {
    let handler = Echo::default();
    let hub = Hub::with_handler(cfg(), handler.clone());
    let addr = serve(&hub).await;
    let mut old = connect(addr, "alice").await;
    eventually("old registered", || hub.connection_count() == 1).await;
    hub.join_room("alice", "r1").await.unwrap();
    let first = hub.connection("alice").unwrap();

    let mut new = connect(addr, "alice").await;
    assert_eq!(expect_close(&mut old).await, 4002);
    eventually("old unregistered", || {
        handler.gone.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(
        *handler.last_reason.lock().unwrap(),
        Some((DisconnectReason::Replaced, 4002))
    );
    // Exactly one registered connection, and it is the new one.
    assert_eq!(hub.connection_count(), 1);
    assert!(!hub.connection("alice").unwrap().same(&first));
    // The old connection's rooms went with it; the new one starts clean.
    assert!(hub.channel_members("r1").is_empty());
    hub.join_room("alice", "r1").await.unwrap();
    send(&mut new, "hello").await;
    assert_eq!(recv(&mut new).await, "hello");
    assert_eq!(hub.channel_members("r1"), vec!["alice"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_closes_only_its_own_connection() {
    let handler = Echo::default();
    let hub = Hub::with_handler(cfg(), handler.clone());
    let addr = serve(&hub).await;
    let mut a = connect(addr, "a").await;
    let mut b = connect(addr, "b").await;
    send(&mut a, "boom").await;
    assert_eq!(expect_close(&mut a).await, 1011);
    send(&mut b, "still here").await;
    assert_eq!(recv(&mut b).await, "still here");
    eventually("a unregistered", || hub.connection_count() == 1).await;
    let m = hub.metrics_snapshot();
    let internal = m
        .disconnects_total
        .iter()
        .find(|(r, _)| *r == "internal_error")
        .unwrap()
        .1;
    assert_eq!(internal, 1);
    // The Hub keeps working for new connections.
    let mut c = connect(addr, "c").await;
    send(&mut c, "x").await;
    assert_eq!(recv(&mut c).await, "x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_and_broadcasts() {
    let hub = Hub::new(cfg());
    let addr = serve(&hub).await;
    let mut socks = Vec::new();
    for id in ["a", "b", "c"] {
        socks.push(connect(addr, id).await);
    }
    eventually("3 registered", || hub.connection_count() == 3).await;
    let mut ids = hub.client_ids();
    ids.sort();
    assert_eq!(ids, vec!["a", "b", "c"]);
    hub.join_room("a", "red").await.unwrap();
    hub.join_room("b", "red").await.unwrap();
    hub.join_room("b", "blue").await.unwrap();
    let mut rooms = hub.channels_of("b");
    rooms.sort();
    assert_eq!(rooms, vec!["blue", "red"]);
    let mut members = hub.channel_members("red");
    members.sort();
    assert_eq!(members, vec!["a", "b"]);

    let r = hub.broadcast_to_channel("red", "to red", Some("a"));
    assert_eq!((r.sent, r.dropped, r.failed), (1, 0, 0));
    assert_eq!(recv(&mut socks[1]).await, "to red");

    let r = hub.broadcast("to all", &["c"]).await;
    assert_eq!(r.sent, 2);
    assert_eq!(recv(&mut socks[0]).await, "to all");
    assert_eq!(recv(&mut socks[1]).await, "to all");

    assert!(hub.send_to_client("c", "just c"));
    assert_eq!(recv(&mut socks[2]).await, "just c");
    assert!(!hub.send_to_client("nobody", "x"));

    assert!(hub.leave_room("b", "red").unwrap());
    assert!(!hub.leave_room("b", "red").unwrap());
    assert_eq!(hub.channel_members("red"), vec!["a"]);

    assert_eq!(
        hub.join_room("nobody", "red").await.unwrap_err().kind(),
        &ErrorKind::ConnectionNotFound
    );
    assert_eq!(
        hub.join_room("a", "").await.unwrap_err().kind(),
        &ErrorKind::InvalidArgument
    );
    assert_eq!(
        hub.disconnect("nobody").unwrap_err().kind(),
        &ErrorKind::ConnectionNotFound
    );
    assert_eq!(
        hub.handle_pong("nobody").unwrap_err().kind(),
        &ErrorKind::ConnectionNotFound
    );
    hub.handle_pong("a").unwrap();

    hub.disconnect("a").unwrap();
    assert_eq!(expect_close(&mut socks[0]).await, 1000);
    eventually("a gone", || hub.connection_count() == 2).await;
    assert!(
        hub.channel_members("red").is_empty(),
        "a left its rooms on disconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_data_is_accounted_and_limited() {
    let mut c = cfg();
    c.set("max_memory_per_connection", "100").unwrap();
    c.set("max_total_memory", "150").unwrap();
    let hub = Hub::new(c);
    let addr = serve(&hub).await;
    let mut a = connect(addr, "a").await;
    let _b = connect(addr, "b").await;
    eventually("registered", || hub.connection_count() == 2).await;

    hub.set_user_data("a", "name", serde_json::json!("alice"))
        .unwrap();
    assert_eq!(hub.user_data("a", "name"), Some(serde_json::json!("alice")));
    assert_eq!(hub.user_data("a", "missing"), None);
    assert_eq!(hub.user_data("nobody", "name"), None);
    let used = hub.memory_usage();
    assert_eq!(used.total_memory, 4 + 7);
    assert_eq!(used.connection_count, 2);

    // Over the per-connection limit: refused, nothing changed.
    let e = hub
        .set_user_data("a", "big", serde_json::json!("x".repeat(100)))
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::MemoryLimitExceeded);
    assert_eq!(hub.user_data("a", "big"), None);
    assert_eq!(hub.memory_usage().total_memory, 11);

    // Within per-connection, but over the total across connections.
    hub.set_user_data("a", "k", serde_json::json!("y".repeat(80)))
        .unwrap();
    let e = hub
        .set_user_data("b", "k", serde_json::json!("z".repeat(80)))
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::MemoryLimitExceeded);

    // Replacing a value counts the difference, not the sum.
    hub.set_user_data("a", "k", serde_json::json!("y")).unwrap();
    assert_eq!(hub.memory_usage().total_memory, 11 + 1 + 3);

    // Freed on disconnect.
    hub.disconnect("a").unwrap();
    expect_close(&mut a).await;
    eventually("a gone", || hub.connection_count() == 1).await;
    assert_eq!(hub.memory_usage().total_memory, 0);
    // Uncounted before it left the registry.
    assert_eq!(hub.metrics_snapshot().user_data_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_output_over_total_memory_evicts_by_policy() {
    let mut c = cfg();
    c.set("max_total_memory", "200000").unwrap();
    c.set("memory_check_interval", "50ms").unwrap();
    // Regression: memory was checked only on the sweeper's tick (a quarter of the
    // heartbeat, here 15 s, past the test's deadline), whatever the interval said.
    c.set("heartbeat_interval", "60s").unwrap();
    c.set("heartbeat_timeout", "60s").unwrap();
    c.set("presence_ttl", "60s").unwrap();
    // "slow" never reads, so it never takes our Close: do not wait 3 s for it.
    c.set("close_timeout", "200ms").unwrap();
    c.set("send_queue_max_bytes", "1000000").unwrap();
    c.set("send_queue_max_messages", "100000").unwrap();
    let hub = Hub::new(c);
    let addr = serve(&hub).await;
    // "slow" never reads after connecting; "fast" reads every publication before
    // the next one goes out, so it never holds more than one (50 kB) while the
    // total is over 200 kB: only "slow" can be the one filling memory.
    let _slow = connect(addr, "slow").await;
    let mut fast = connect(addr, "fast").await;
    eventually("registered", || hub.connection_count() == 2).await;
    hub.join_room("slow", "feed").await.unwrap();
    hub.join_room("fast", "feed").await.unwrap();
    // Random letters: permessage-deflate (on by default) shrinks a run of one
    // letter to a few hundred bytes, and the kernel's socket buffers then hold
    // thousands of them before anything queues in the hub.
    let text: String =
        rand::Rng::sample_iter(rand::thread_rng(), rand::distributions::Alphanumeric)
            .take(50_000)
            .map(char::from)
            .collect();
    let data = keel::RawValue::from_string(format!("\"{text}\"")).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub.connection("slow").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "slow never evicted");
        hub.publish("feed", &data, None).await.unwrap();
        let got = recv(&mut fast).await;
        assert!(got.len() > 50_000, "fast gets each publication whole");
    }
    assert!(
        hub.connection("fast").is_some(),
        "only the one holding memory went"
    );
    // Counted before it left the registry (a clean-clone CI run on 2f02e73 caught
    // the count lagging behind).
    let evicted = hub
        .metrics_snapshot()
        .disconnects_total
        .iter()
        .find(|(r, _)| *r == "memory_evicted")
        .map_or(0, |(_, n)| *n);
    assert_eq!(evicted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_are_values_not_globals() {
    let h1 = Hub::new(cfg());
    let h2 = Hub::new(cfg());
    let a1 = serve(&h1).await;
    let a2 = serve(&h2).await;
    let mut x = connect(a1, "same-id").await;
    let mut y = connect(a2, "same-id").await;
    eventually("both registered", || {
        h1.connection_count() == 1 && h2.connection_count() == 1
    })
    .await;
    h1.broadcast("only h1", &[]).await;
    h2.broadcast("only h2", &[]).await;
    assert_eq!(recv(&mut x).await, "only h1");
    assert_eq!(recv(&mut y).await, "only h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_reports_and_refuses_new_connections() {
    let mut c = cfg();
    c.set("shutdown_reconnect_window", "0s").unwrap();
    let hub = Hub::new(c);
    let addr = serve(&hub).await;
    let mut socks = Vec::new();
    for i in 0..10 {
        socks.push(connect(addr, &format!("c{i}")).await);
    }
    eventually("10 registered", || hub.connection_count() == 10).await;
    let closer = tokio::spawn(async move {
        let mut codes = Vec::new();
        for s in socks.iter_mut() {
            let notice: serde_json::Value = serde_json::from_str(&recv(s).await).unwrap();
            assert_eq!(notice["type"], "server_shutdown");
            assert_eq!(notice["payload"]["delay_ms"], 0);
            codes.push(expect_close(s).await);
        }
        codes
    });
    let report = hub.graceful_shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.connections_at_start, 10);
    assert_eq!(report.closed_gracefully, 10);
    assert_eq!(report.force_closed, 0);
    assert_eq!(closer.await.unwrap(), vec![1012; 10]);
    assert!(hub.is_draining());
    assert_eq!(
        hub.check_admission().unwrap_err().kind(),
        &ErrorKind::Shutdown
    );
    assert_eq!(hub.connection_count(), 0);
}

/// Publications reach each subscriber whole, once and in order, whether its
/// socket keeps up or is full and the rest waits in its queue (the socket taking
/// only part of a batch, cut in a header or a payload). Three subscribers: one
/// that stops reading while frames of every length form pile up and then catches
/// up, one that reads in fits and starts (its socket keeps filling and making
/// room), and one that keeps reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_arrive_whole_and_in_order_however_fast_subscribers_read() {
    let mut c = cfg();
    c.set("send_queue_max_bytes", "100000000").unwrap();
    c.set("send_queue_max_messages", "100000").unwrap();
    let hub = Hub::new(c);
    let addr = serve(&hub).await;
    let mut stalled = connect(addr, "stalled").await;
    let mut fitful = connect(addr, "fitful").await;
    let mut fast = connect(addr, "fast").await;
    eventually("registered", || hub.connection_count() == 3).await;
    for id in ["stalled", "fitful", "fast"] {
        hub.join_room(id, "feed").await.unwrap();
    }

    const N: u64 = 1_000;
    // Sizes in every length form (7-bit, 16-bit, 64-bit), so partial writes cut
    // frames in their headers and their payloads at varied places.
    const SIZES: [usize; 8] = [10, 200, 70_000, 3, 1_000, 20_000, 125, 65_600];
    fn check(text: &str, want: u64) {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let v = &v["payload"];
        assert_eq!(v["offset"], want, "offsets in order");
        assert_eq!(v["data"][0], want, "the data of that offset");
        let pad = v["data"][1].as_str().unwrap();
        assert_eq!(pad.len(), SIZES[want as usize % SIZES.len()]);
        assert!(pad.bytes().all(|b| b == b'p'), "payload intact");
    }
    let fast_reader = tokio::spawn(async move {
        for i in 1..=N {
            check(&recv(&mut fast).await, i);
        }
    });
    let fitful_reader = tokio::spawn(async move {
        for i in 1..=N {
            check(&recv(&mut fitful).await, i);
            if i % 16 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    for i in 1..=N {
        let pad = "p".repeat(SIZES[i as usize % SIZES.len()]);
        let data = keel::RawValue::from_string(format!("[{i},\"{pad}\"]")).unwrap();
        let p = hub.publish("feed", &data, None).await.unwrap();
        assert_eq!((p.offset, p.delivered, p.dropped), (i, 3, 0));
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // About 20 MB went to "stalled", more than loopback's buffers hold: the rest
    // waits in its queue.
    assert!(
        hub.memory_usage().total_memory > 1_000_000,
        "the stalled subscriber's socket filled"
    );
    for i in 1..=N {
        check(&recv(&mut stalled).await, i);
    }
    for reader in [fast_reader, fitful_reader] {
        tokio::time::timeout(WAIT, reader).await.unwrap().unwrap();
    }
}

// Regression: a snapshot read the live connections and the closed totals at
// different moments, so a connection leaving in between was counted twice (or not
// at all) once, and the next scrape went down: Prometheus reads a counter that goes
// down as a restart, and `rate()` spikes by the whole total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_totals_never_go_down_while_connections_come_and_go() {
    let hub = Hub::with_handler(cfg(), Echo::default());
    let addr = serve(&hub).await;
    let churn = tokio::spawn(async move {
        for round in 0..60 {
            let mut batch = Vec::new();
            for i in 0..10 {
                batch.push(tokio::spawn(async move {
                    let mut ws = connect(addr, &format!("c{round}-{i}")).await;
                    for _ in 0..5 {
                        send(&mut ws, "x").await;
                        assert_eq!(recv(&mut ws).await, "x");
                    }
                    // Dropped without a close: the server sees it leave at once.
                }));
            }
            for t in batch {
                t.await.unwrap();
            }
        }
    });
    let mut last = hub.metrics_snapshot();
    let mut scrapes = 0u32;
    while !churn.is_finished() {
        let now = hub.metrics_snapshot();
        for (what, before, after) in [
            ("messages_in", last.messages_in_total, now.messages_in_total),
            ("bytes_in", last.bytes_in_total, now.bytes_in_total),
            (
                "messages_out",
                last.messages_out_total,
                now.messages_out_total,
            ),
            ("bytes_out", last.bytes_out_total, now.bytes_out_total),
        ] {
            assert!(after >= before, "{what} went down: {before} -> {after}");
        }
        last = now;
        scrapes += 1;
        tokio::task::yield_now().await;
    }
    churn.await.unwrap();
    assert!(
        scrapes > 10,
        "the check ran alongside the churn ({scrapes})"
    );
    eventually("every churned connection gone", || {
        hub.connection_count() == 0
    })
    .await;
    let end = hub.metrics_snapshot();
    assert_eq!(end.messages_in_total, 60 * 10 * 5);
    assert_eq!(end.messages_out_total, 60 * 10 * 5);
}

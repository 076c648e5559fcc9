//! What one client can make the gateway hold stays bounded: a client that sprays
//! large publications over thousands of new channels leaves history at
//! `max_history_memory`, and the process's RSS within that bound plus a stated
//! slack. Its own test binary, so no other test's memory shares the process.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

/// Resident memory of this process, in bytes.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spraying_large_publications_over_new_channels_keeps_history_and_rss_bounded() {
    const BOUND: usize = 8 << 20;
    const SLACK: usize = 48 << 20;
    const CHANNELS: usize = 2000;
    let mut cfg = config();
    cfg.set("max_history_memory", &BOUND.to_string()).unwrap();
    // One client sprays as fast as it can: past the default message rate.
    cfg.set("rate_limit_messages", "0").unwrap();
    let gw = gateway(cfg).await;
    let mut c = Client::connect(gw.addr).await;
    let payload = "x".repeat(60_000);
    // Warm up the paths (buffers, allocator arenas) before the baseline.
    for i in 0..20 {
        let r = c
            .request(
                "publish",
                json!({"channel": format!("warm{i}"), "data": payload}),
            )
            .await;
        assert_eq!(r["type"], "publish_response", "{r}");
    }
    let before = rss();
    // 2,000 x 60 KB = 120 MB offered, each to a channel of its own.
    for i in 0..CHANNELS {
        let r = c
            .request(
                "publish",
                json!({"channel": format!("spray{i}"), "data": payload}),
            )
            .await;
        assert_eq!(r["type"], "publish_response", "{r}");
    }
    let grown = rss().saturating_sub(before);
    let m = gw.hub.metrics_snapshot();
    assert!(
        m.history_bytes <= BOUND,
        "history {} over {BOUND}",
        m.history_bytes
    );
    assert!(
        m.history_bytes > BOUND / 2,
        "history {} far below the bound",
        m.history_bytes
    );
    assert!(
        m.channels < CHANNELS,
        "channels whose history went are forgotten: {}",
        m.channels
    );
    assert!(
        grown <= BOUND + SLACK,
        "RSS grew {grown} bytes for a {BOUND}-byte history bound (slack {SLACK})"
    );
    // The newest publications are still there to recover.
    let h = c
        .request(
            "history",
            json!({"channel": format!("spray{}", CHANNELS - 1)}),
        )
        .await;
    assert_eq!(h["payload"]["messages"].as_array().unwrap().len(), 1, "{h}");
    println!(
        "history {} B, channels {}, RSS grew {} B for {} B offered",
        m.history_bytes,
        m.channels,
        grown,
        CHANNELS * 60_000
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_presence_stay_within_their_bounds_and_stats_show_each_part() {
    let mut cfg = config();
    cfg.set("max_detached_sessions", "20").unwrap();
    cfg.set("max_presence_entries", "30").unwrap();
    let gw = gateway(cfg).await;
    // Clients that connect and vanish, in a loop: each leaves a detached session
    // behind.
    for _ in 0..60 {
        drop(Client::connect(gw.addr).await);
    }
    eventually("every session detached", || {
        gw.hub.metrics_snapshot().connections == 0
    })
    .await;
    let m = gw.hub.metrics_snapshot();
    assert!(m.sessions_detached <= 20, "{m:?}");
    assert!(
        m.sessions_detached >= 18,
        "dropped far more than needed: {m:?}"
    );
    // Presence: one client fills it, the next subscribe that needs an entry is
    // refused; a channel it already has goes on.
    let mut c = Client::connect(gw.addr).await;
    let mut refused = None;
    for i in 0..40 {
        let r = c
            .request("subscribe", json!({"channel": format!("p{i}")}))
            .await;
        if r["type"] == "error" {
            refused = Some((i, r));
            break;
        }
    }
    let (at, r) = refused.expect("presence is bounded");
    assert_eq!(r["payload"]["code"], "limit_exceeded", "{r}");
    assert!(
        r["payload"]["detail"]
            .as_str()
            .unwrap()
            .contains("max_presence_entries"),
        "{r}"
    );
    assert!(at <= 30, "refused at {at}");
    let (s, body) = http(
        gw.addr,
        "GET",
        "/api/stats",
        Some(keel_testkit::gateway::API_KEY),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    let parts = &stats["memory"]["parts"];
    assert_eq!(parts["presence_entries"], 30, "{stats}");
    assert_eq!(parts["sessions_detached"], m.sessions_detached, "{stats}");
    for key in [
        "history_bytes",
        "user_data_bytes",
        "send_queue_bytes",
        "tickets",
        "channels",
    ] {
        assert!(parts[key].is_u64(), "{key} in {stats}");
    }
    assert!(
        stats["memory"]["rss_bytes"].as_u64().unwrap() > 1 << 20,
        "{stats}"
    );
    let text = gw.hub.metrics_text();
    assert!(text.contains("keel_presence_entries 30"), "{text}");
    gw.shutdown().await;
}

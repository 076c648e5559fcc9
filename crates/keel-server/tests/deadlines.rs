//! Connections that are not WebSockets yet have deadlines and a cap of their own
//! (issue 17, part 2): silent and half-sent sockets, idle keep-alive connections
//! and trickled `/api` bodies are closed within `handshake_timeout` (plus a second
//! of slack) while well-behaved clients are served throughout; past
//! `max_pending_connections`, accepting waits, and an upgraded connection gives
//! its place back. Descriptor exhaustion is in `process.rs` (it needs a process
//! with a low `ulimit -n`).

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use keel_testkit::gateway::API_KEY;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(2);
/// How late a close may come: a second, as the issue says.
const SLACK: Duration = Duration::from_secs(1);

fn settings() -> keel_server::settings::Settings {
    let mut s = config();
    s.set("handshake_timeout", "2s").unwrap();
    s
}

/// Opens a connection, sends `first`, and returns when the server closes it with
/// how long after `since` (the send, or `None`: the connect) that was.
async fn closed_after(addr: SocketAddr, first: Vec<u8>) -> Duration {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let t0 = Instant::now();
    tcp.write_all(&first).await.unwrap();
    wait_closed(&mut tcp, t0).await
}

/// Reads (and discards) until the server closes; the time from `t0`.
async fn wait_closed(tcp: &mut TcpStream, t0: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    let deadline = TIMEOUT + SLACK + WAIT;
    loop {
        match tokio::time::timeout(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return t0.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("still open {deadline:?} after it was opened ({tcp:?})"),
        }
    }
}

fn assert_in_window(what: &str, took: Duration) {
    assert!(
        took + Duration::from_millis(150) >= TIMEOUT && took <= TIMEOUT + SLACK,
        "{what}: closed after {took:?}, expected within {TIMEOUT:?} + {SLACK:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_connections_close_in_time_while_others_are_served() {
    let gw = gateway(settings()).await;
    let addr = gw.addr;
    const EACH: usize = 200;
    let mut bad = tokio::task::JoinSet::new();
    for i in 0..EACH * 3 {
        let first: Vec<u8> = match i % 3 {
            // Nothing at all.
            0 => Vec::new(),
            // Half an upgrade: the listener's own reader holds it.
            1 => b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: web".to_vec(),
            // A head longer than that reader takes, never finished: hyper holds it.
            _ => {
                let mut h = b"GET /health HTTP/1.1\r\nHost: x\r\n".to_vec();
                h.extend(std::iter::repeat_n(b"X-Pad: 0123456789\r\n", 500).flatten());
                h
            }
        };
        bad.spawn(async move {
            let took = closed_after(addr, first).await;
            (i % 3, took)
        });
    }
    // A keep-alive connection that asks once and then idles.
    let idle = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "answered first");
        let t0 = Instant::now();
        wait_closed(&mut tcp, t0).await
    });

    // Meanwhile a well-behaved client connects, subscribes and publishes, and the
    // health check answers, over and over, each within its own deadline.
    let mut rounds = 0;
    let started = Instant::now();
    while started.elapsed() < TIMEOUT + SLACK {
        let mut c = Client::connect(addr).await;
        c.subscribe("room").await;
        let mut p = Client::connect(addr).await;
        let r = p
            .request("publish", json!({"channel": "room", "data": rounds}))
            .await;
        assert_eq!(r["type"], "publish_response", "{r}");
        let m = c.recv().await;
        assert_eq!(m["payload"]["data"], rounds, "{m}");
        let (s, _) = http(addr, "GET", "/health", None, None).await;
        assert_eq!(s, 200);
        rounds += 1;
    }
    assert!(rounds > 3, "served throughout: {rounds} rounds");

    let mut by_kind = [0usize; 3];
    while let Some(done) = bad.join_next().await {
        let (kind, took) = done.unwrap();
        assert_in_window(&format!("kind {kind}"), took);
        by_kind[kind] += 1;
    }
    assert_eq!(by_kind, [EACH; 3]);
    assert_in_window("idle keep-alive", idle.await.unwrap());
    let m = gw.hub.metrics_snapshot();
    assert_eq!(m.handshake_timeouts_total, (EACH * 3 + 1) as u64);
    // The clients of the rounds were served and gave their places back.
    eventually("no pending connection left", || {
        gw.hub.metrics_snapshot().pending_connections == 0
    })
    .await;
    let text = gw.hub.metrics_text();
    assert!(
        text.contains(&format!("keel_handshake_timeouts_total {}", EACH * 3 + 1)),
        "{text}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_api_body_gets_408_in_time_and_a_whole_one_is_served() {
    let gw = gateway(settings()).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let body = json!({"channel": "c", "data": 1}).to_string();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body.as_bytes()[..5]).await.unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT + SLACK + WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("answered and closed")
        .unwrap();
    assert_in_window("trickled body", t0.elapsed());
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("handshake_timeout"), "{text}");
    assert_eq!(
        gw.hub.metrics_snapshot().publications_total,
        0,
        "nothing published from half a body"
    );

    let (s, body) = http(
        gw.addr,
        "POST",
        "/api/publish",
        Some(API_KEY),
        Some(json!({"channel": "c", "data": 1})),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_pending_cap_accepting_waits_and_upgraded_connections_give_their_place_back() {
    let mut s = settings();
    s.set("max_pending_connections", "20").unwrap();
    let gw = gateway(s).await;
    // Upgraded connections hold no place: many more than the cap connect at once.
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(Client::connect(gw.addr).await);
    }
    eventually("upgraded connections left the gate", || {
        gw.hub.metrics_snapshot().pending_connections == 0
    })
    .await;
    // Twenty silent sockets fill the cap.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    eventually("twenty pending", || {
        gw.hub.metrics_snapshot().pending_connections == 20
    })
    .await;
    // The next client waits in the kernel's backlog until the silent ones time
    // out, then is served.
    let t0 = Instant::now();
    let mut late = tokio::time::timeout(TIMEOUT + SLACK + WAIT, Client::connect(gw.addr))
        .await
        .expect("served once the silent ones are gone");
    let waited = t0.elapsed();
    assert!(
        waited + Duration::from_millis(500) >= TIMEOUT,
        "it waited for a place ({waited:?})"
    );
    let r = late.subscribe("after").await;
    assert_eq!(r["type"], "subscribe_response", "{r}");
    for mut s in silent {
        assert_eq!(
            tokio::time::timeout(WAIT, s.read(&mut [0u8; 16]))
                .await
                .expect("closed")
                .unwrap_or(0),
            0
        );
    }
    let m = gw.hub.metrics_snapshot();
    assert!(m.accept_paused_total >= 1, "{m:?}");
    assert_eq!(m.handshake_timeouts_total, 20);
    // The first sixty were never disturbed.
    for c in clients.iter_mut() {
        let r = c.subscribe("still").await;
        assert_eq!(r["type"], "subscribe_response", "{r}");
    }
    gw.shutdown().await;
}

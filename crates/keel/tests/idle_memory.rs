//! Heap cost of an idle connection, heartbeats running, measured with a counting
//! allocator. Clients are blocking `std` sockets on their own threads' stacks, so
//! the only heap they use is a few bytes of the test's Vec: what is counted is the
//! server side (Hub, connection task, queue, transport buffers, hyper's upgraded
//! stream).
//!
//! Then the clients vanish and the same region tells what a session kept for
//! `resume` costs once its connection is gone.
//!
//! The figures are printed (run with `--nocapture`). The checks are regression
//! guards: 2 KB for a connection without an extension (Keel's own framing;
//! measured about 1.8 KB) and 3 KB for one that negotiated permessage-deflate
//! (yawc; about 2.7 KB), see `docs/benchmarks.md`. A change that adds a buffer per
//! connection fails here rather than in a benchmark nobody ran.

#![allow(clippy::unwrap_used)]

mod common;

use std::alloc::System;
use std::io::{Read, Write};

use keel::{Config, Hub};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const CONNS: usize = 2000;

fn handshake(addr: std::net::SocketAddr, i: usize, deflate: bool) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let req = format!(
        "GET /ws?id=c{i} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// Both framings, one after the other (the allocator's counters are global, so
/// the two must not overlap): without an extension offer, Keel's own framing
/// (`transport::plain`), what load generators, servers and most non-browser
/// clients get; with permessage-deflate offered (browsers do), yawc's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_heap_cost() {
    measure(false, 2048.0).await;
    measure(true, 3072.0).await;
}

/// Opens CONNS connections, holds them through heartbeats, and checks the heap
/// they cost against `guard` bytes each; then lets them vanish and checks what
/// their retained sessions cost.
async fn measure(deflate: bool, guard: f64) {
    let mut c = Config::default();
    c.set("heartbeat_interval", "100ms").unwrap();
    c.set("heartbeat_timeout", "60s").unwrap();
    c.set("heartbeat_mode", "both").unwrap();
    let hub = Hub::new(c);
    let addr = common::serve(&hub).await;

    // Warm up allocator and runtime paths with one connection that stays.
    let warm = tokio::task::spawn_blocking(move || handshake(addr, usize::MAX, deflate))
        .await
        .unwrap();
    common::eventually("warm-up registered", || hub.connection_count() == 1).await;
    // Its JSON pings count as messages written: wait for two heartbeat rounds.
    common::eventually("warm-up heartbeats", || {
        hub.metrics_snapshot().messages_out_total >= 2
    })
    .await;

    let region = Region::new(GLOBAL);
    let clients = tokio::task::spawn_blocking(move || {
        let mut v = Vec::with_capacity(CONNS);
        for i in 0..CONNS {
            v.push(handshake(addr, i, deflate));
        }
        v
    })
    .await
    .unwrap();
    common::eventually("all registered", || hub.connection_count() == CONNS + 1).await;
    // Hold them through heartbeat rounds: wait until every connection has been sent
    // at least two JSON pings (counted as messages written) since the warm-up.
    let sent_before = hub.metrics_snapshot().messages_out_total;
    common::eventually("two heartbeat rounds for every connection", || {
        hub.metrics_snapshot().messages_out_total >= sent_before + 2 * CONNS as u64
    })
    .await;
    let stats = region.change();
    let net = stats.bytes_allocated as i64 - stats.bytes_deallocated as i64;
    let client_vec = (CONNS * std::mem::size_of::<std::net::TcpStream>()) as i64;
    let per_conn = (net - client_vec) as f64 / CONNS as f64;
    let kind = if deflate {
        "deflate offered"
    } else {
        "no extension"
    };
    println!(
        "idle connection heap: {per_conn:.0} bytes per connection ({CONNS} connections, \
         heartbeats every 100ms, {kind}; net {net} bytes)"
    );
    assert!(
        per_conn < guard,
        "idle connection ({kind}) costs {per_conn:.0} bytes of heap, over the {guard} B guard"
    );

    // Now every client vanishes (FIN, no close frame): each session is kept for
    // resume. What stays on the heap is what a retained session costs.
    drop(clients);
    common::eventually("all sessions detached", || {
        hub.detached_session_count() == CONNS
    })
    .await;
    common::eventually("connections gone", || hub.connection_count() == 1).await;
    let stats = region.change();
    let net = stats.bytes_allocated as i64 - stats.bytes_deallocated as i64;
    let per_session = net as f64 / CONNS as f64;
    println!(
        "retained session heap: {per_session:.0} bytes per detached session ({CONNS} sessions)"
    );
    assert!(
        per_session < 1024.0,
        "a detached session costs {per_session:.0} bytes of heap, over the 1 KB guard"
    );
    drop(warm);
}

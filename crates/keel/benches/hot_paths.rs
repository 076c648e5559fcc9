//! Micro-benchmarks of the hot paths, so a regression shows without a load test:
//! encoding one publication, decoding a client envelope, a publish that queues
//! one encoded frame to N subscribers (real loopback connections, measured on the
//! publisher's side: encode once, N queue pushes, no socket awaited), and a
//! registry lookup by client_id among 1000 live connections.
//!
//! `cargo bench -p keel --bench hot_paths`

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::io::{Read, Write};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::FutureExt;
use keel::{Config, Hub, RawValue};
use keel_protocol::{ClientEnvelope, PublishPayload};

fn encode_publication(c: &mut Criterion) {
    let data =
        RawValue::from_string(format!(r#"{{"t":1234567890,"p":"{}"}}"#, "x".repeat(80))).unwrap();
    c.bench_function("encode one publication (100 B data)", |b| {
        b.iter(|| {
            keel_protocol::encode::message(
                black_box("room:42"),
                &data,
                black_box(12345),
                "a1b2c3d40",
                Some("3f1c2e8a-7d1b-4e5f-9a0b-1c2d3e4f5a6b"),
            )
        })
    });
}

fn decode_envelope(c: &mut Criterion) {
    let text = format!(
        r#"{{"type":"publish","payload":{{"channel":"room:42","data":{{"t":1234567890,"p":"{}"}}}},"request_id":"17"}}"#,
        "x".repeat(80)
    );
    c.bench_function("decode a publish envelope", |b| {
        b.iter(|| {
            let env = ClientEnvelope::parse(black_box(&text)).unwrap();
            let p: PublishPayload<'_> = env.payload().unwrap();
            black_box((env.kind.len(), p.channel.len(), p.data.get().len()))
        })
    });
}

fn handshake(addr: std::net::SocketAddr, id: usize) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /ws?id=c{id} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
    }
    s
}

/// A started Hub with `n` live connections (`c0`..), each read and discarded by a
/// client task so queues stay short as in normal operation; the tasks go with
/// the returned handles.
fn hub_with_clients(
    rt: &tokio::runtime::Runtime,
    n: usize,
) -> (Hub, Vec<tokio::task::JoinHandle<()>>) {
    let hub = Hub::new(Config::default());
    let addr = rt.block_on(async {
        hub.start();
        let h = hub.clone();
        let app = axum::Router::new().route(
            "/ws",
            axum::routing::get(
                move |q: axum::extract::Query<std::collections::HashMap<String, String>>,
                      up: keel::Upgrade| async move {
                    h.connect(q.0["id"].clone(), up, serde_json::Value::Null)
                        .unwrap()
                },
            ),
        );
        let listener = keel::Listener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .route_upgrades(app.clone());
        let addr = listener.local_addr().unwrap();
        let app = app.into_make_service_with_connect_info::<keel::Peer>();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });
    let readers = (0..n)
        .map(|i| {
            let s = handshake(addr, i);
            s.set_nonblocking(true).unwrap();
            rt.spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut s = tokio::net::TcpStream::from_std(s).unwrap();
                let mut buf = vec![0u8; 65536];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            })
        })
        .collect();
    while hub.connection_count() < n {
        std::thread::sleep(Duration::from_millis(5));
    }
    (hub, readers)
}

fn publish_to_subscribers(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("publish to N subscribers (queue side)");
    group.measurement_time(Duration::from_secs(3));
    for n in [100usize, 1000] {
        let (hub, readers) = hub_with_clients(&rt, n);
        for i in 0..n {
            rt.block_on(hub.join_room(&format!("c{i}"), "bench"))
                .unwrap();
        }
        let data = RawValue::from_string(
            r#"{"t":1,"p":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#.into(),
        )
        .unwrap();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            // The memory broker answers on the first poll: no runtime round trip.
            b.iter(|| {
                hub.publish("bench", &data, None)
                    .now_or_never()
                    .expect("the memory broker is ready at once")
                    .unwrap()
            })
        });
        for r in readers {
            r.abort();
        }
    }
    group.finish();
}

fn registry_lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (hub, readers) = hub_with_clients(&rt, 1000);
    let mut group = c.benchmark_group("registry lookup among 1000 connections");
    group.bench_function("hit", |b| {
        b.iter(|| hub.connection(black_box("c517")).is_some())
    });
    group.bench_function("miss", |b| {
        b.iter(|| hub.connection(black_box("nobody")).is_none())
    });
    group.finish();
    for r in readers {
        r.abort();
    }
}

criterion_group!(
    benches,
    encode_publication,
    decode_envelope,
    publish_to_subscribers,
    registry_lookup
);
criterion_main!(benches);

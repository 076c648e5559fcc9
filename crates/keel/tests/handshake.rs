//! The WebSocket handshake and both framings behind it: a client that offers no
//! extension gets Keel's own framing, one that offers permessage-deflate gets it
//! (when the Hub's `compression` is on). Raw sockets, so every byte is checked.
#![allow(clippy::unwrap_used)]

mod common;

use keel_testkit::ws::client_frame;

use std::net::SocketAddr;

use axum::response::IntoResponse;
use futures::StreamExt;
use keel::{Config, Hub};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yawc::frame::OpCode;

/// The sample key of RFC 6455 section 1.3 and its accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Sends a handshake with `extra` header lines; returns the stream and the
/// response head, lower-cased.
async fn handshake(addr: SocketAddr, id: &str, extra: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws?id={id} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(common::WAIT, s.read(&mut b))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "closed during the handshake: {head:?}");
        head.push(b[0]);
    }
    (s, String::from_utf8(head).unwrap().to_ascii_lowercase())
}

fn standard(key: &str) -> String {
    format!("Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
}

/// Reads one unmasked server frame: (first byte, payload).
async fn frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    tokio::time::timeout(common::WAIT, s.read_exact(&mut h))
        .await
        .expect("a frame in time")
        .unwrap();
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => s.read_u16().await.unwrap() as usize,
        127 => s.read_u64().await.unwrap() as usize,
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await.unwrap();
    (h[0], p)
}

/// Skips Pings and JSON heartbeats until a text frame with `want` arrives.
async fn text_frame(s: &mut TcpStream, want: &str) {
    loop {
        let (b0, p) = frame(s).await;
        if b0 == 0x81 && p == want.as_bytes() {
            return;
        }
        assert!(b0 == 0x89 || b0 == 0x81, "unexpected frame {b0:#x}");
    }
}

#[tokio::test]
async fn a_client_without_extensions_gets_keels_framing_end_to_end() {
    let hub = Hub::new(Config::default());
    plain_framing_end_to_end(&hub, common::serve(&hub).await).await;
    // The same through hyper, with the 101 held for the first message.
    let hub = Hub::new(Config::default());
    plain_framing_end_to_end(&hub, common::serve_through_hyper(&hub).await).await;
    // The same over a tokio listener, where the 101 is written on its own.
    let hub = Hub::new(Config::default());
    plain_framing_end_to_end(&hub, common::serve_on_tokio_listener(&hub).await).await;
}

async fn plain_framing_end_to_end(hub: &Hub, addr: SocketAddr) {
    let (mut s, head) = handshake(addr, "plain", &standard(KEY)).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains(&format!(
        "sec-websocket-accept: {}",
        ACCEPT.to_ascii_lowercase()
    )));
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    common::eventually("registered", || hub.connection("plain").is_some()).await;

    // Server to client: small and 70 kB messages arrive whole, unmasked.
    assert!(hub.send_to_client("plain", "hello"));
    text_frame(&mut s, "hello").await;
    let big = "z".repeat(70_000);
    assert!(hub.send_to_client("plain", big.clone()));
    text_frame(&mut s, &big).await;

    // A Ping is answered with its payload; a Close is echoed and the socket ends.
    s.write_all(&client_frame(0x89, b"are you there"))
        .await
        .unwrap();
    loop {
        let (b0, p) = frame(&mut s).await;
        if b0 == 0x8A {
            assert_eq!(p, b"are you there");
            break;
        }
    }
    s.write_all(&client_frame(0x88, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    loop {
        let (b0, p) = frame(&mut s).await;
        if b0 == 0x88 {
            assert_eq!(p, 1000u16.to_be_bytes());
            break;
        }
    }
    let mut rest = [0u8; 16];
    let n = tokio::time::timeout(common::WAIT, s.read(&mut rest))
        .await
        .expect("the server ends the TCP connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing after the Close");
    common::eventually("unregistered", || hub.connection_count() == 0).await;
}

#[tokio::test]
async fn a_deflate_offer_is_taken_up_only_when_compression_is_on() {
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let hub = Hub::new(Config::default());
    let addr = common::serve(&hub).await;
    let (_s, head) = handshake(addr, "d1", &format!("{}{offer}", standard(KEY))).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains(&format!(
        "sec-websocket-accept: {}",
        ACCEPT.to_ascii_lowercase()
    )));
    assert!(
        head.contains("sec-websocket-extensions: permessage-deflate"),
        "{head}"
    );

    let mut off = Config::default();
    off.set("compression", "none").unwrap();
    let hub = Hub::new(off);
    let addr = common::serve(&hub).await;
    let (_s, head) = handshake(addr, "d2", &format!("{}{offer}", standard(KEY))).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
}

#[tokio::test]
async fn a_compressed_connection_delivers_through_the_hub() {
    let hub = Hub::new(Config::default());
    let addr = common::serve(&hub).await;
    let mut ws = yawc::WebSocket::connect(format!("ws://{addr}/ws?id=z").parse().unwrap())
        .with_options(yawc::Options::default().with_low_latency_compression())
        .await
        .expect("connects with compression offered");
    common::eventually("registered", || hub.connection("z").is_some()).await;
    // Well above the compression threshold: this one is sent compressed.
    let big = "compressible ".repeat(1000);
    assert!(hub.send_to_client("z", big.clone()));
    loop {
        let f = tokio::time::timeout(common::WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open");
        if f.opcode() == OpCode::Text && f.as_str() == big {
            break;
        }
    }
}

#[tokio::test]
async fn handshakes_without_a_key_or_with_another_version_are_400() {
    let hub = Hub::new(Config::default());
    let addr = common::serve(&hub).await;
    let (_s, head) = handshake(addr, "n1", "Sec-WebSocket-Version: 13\r\n").await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    let extra = format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 12\r\n");
    let (_s, head) = handshake(addr, "n2", &extra).await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert_eq!(hub.connection_count(), 0);
}

/// Sends a message as each connection registers, the way the gateway's `welcome` goes.
struct Hello;

impl keel::Handler for Hello {
    fn on_connect(&self, _hub: &Hub, conn: &keel::Connection) -> Option<keel::Deferred> {
        conn.send_text(bytes::Bytes::from_static(b"hello"));
        None
    }
}

#[tokio::test]
async fn over_keels_listener_the_first_message_follows_the_101_and_the_peer_is_known() {
    // keel::Listener sends the 101 with the first message; the client sees the
    // same bytes in the same order as from any listener. Both ways: answered by
    // the listener itself, and through hyper.
    let mut config = Config::default();
    config.max_connections_per_ip = Some(1);
    let hub = Hub::with_handler(config.clone(), Hello);
    first_message_and_peer(&hub, common::serve(&hub).await).await;
    let hub = Hub::with_handler(config, Hello);
    first_message_and_peer(&hub, common::serve_through_hyper(&hub).await).await;
}

async fn first_message_and_peer(hub: &Hub, addr: SocketAddr) {
    let (mut s, head) = handshake(addr, "first", &standard(KEY)).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    text_frame(&mut s, "hello").await;
    assert!(hub.send_to_client("first", "and then"));
    text_frame(&mut s, "and then").await;

    // keel::Peer carries the client's address to the per-address limit: a second
    // connection from 127.0.0.1 is refused, with an ordinary HTTP response.
    let (_s2, head) = handshake(addr, "second", &standard(KEY)).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(hub.connection("second").is_none());
}

#[tokio::test]
async fn a_head_that_comes_in_pieces_and_a_frame_right_behind_it_are_both_read() {
    // The listener reads the head itself: however the client's writes are cut,
    // it gets all of it, and a frame sent behind it in the same write is the
    // connection's first to read.
    let hub = Hub::with_handler(Config::default(), Hello);
    let addr = common::serve(&hub).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let head = format!(
        "GET /ws?id=pieces HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\n{}\r\n",
        standard(KEY)
    );
    let (head, last) = head.as_bytes().split_at(head.len() - 3);
    for piece in head.chunks(7) {
        s.write_all(piece).await.unwrap();
        // Separate segments, most of the time; the test holds either way.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let mut last = last.to_vec();
    last.extend_from_slice(&client_frame(0x89, b"behind the head"));
    s.write_all(&last).await.unwrap();

    let mut response = Vec::new();
    let mut b = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(common::WAIT, s.read_exact(&mut b))
            .await
            .expect("a response in time")
            .unwrap();
        response.push(b[0]);
    }
    let response = String::from_utf8(response).unwrap().to_ascii_lowercase();
    assert!(response.starts_with("http/1.1 101"), "{response}");
    assert!(response.contains(&format!(
        "sec-websocket-accept: {}",
        ACCEPT.to_ascii_lowercase()
    )));
    text_frame(&mut s, "hello").await;
    loop {
        let (b0, p) = frame(&mut s).await;
        if b0 == 0x8A {
            assert_eq!(p, b"behind the head", "the Ping behind the head was read");
            break;
        }
    }
}

/// Everything the server sends until it closes the connection.
async fn until_closed(s: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(common::WAIT, s.read_to_end(&mut all))
        .await
        .expect("the server closes in time")
        .unwrap();
    String::from_utf8(all).unwrap()
}

#[tokio::test]
async fn requests_that_are_not_plain_upgrades_reach_hyper_with_every_byte() {
    let hub = Hub::new(Config::default());
    let addr = common::serve(&hub).await;
    // Two requests in one write, on a keep-alive connection: the listener read
    // both before it handed the connection on, and hyper answers both.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let get = format!("GET /ws?id=a HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let last = format!("GET /nowhere HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(format!("{get}{last}").as_bytes())
        .await
        .unwrap();
    let all = until_closed(&mut s).await;
    assert!(all.starts_with("HTTP/1.1 400"), "{all}");
    assert!(all.contains("expected a WebSocket upgrade"), "{all}");
    assert!(all.contains("HTTP/1.1 404"), "{all}");

    // An upgrade with a body, or to HTTP/1.0, is not taken here either: hyper's
    // answer is what the client gets.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws?id=b HTTP/1.0\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\n{}\r\n",
        standard(KEY)
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let all = until_closed(&mut s).await;
    assert!(!all.starts_with("HTTP/1.1 101"), "{all}");
    assert_eq!(hub.connection_count(), 0);

    // A client that connects and goes away without a byte costs nothing.
    drop(TcpStream::connect(addr).await.unwrap());
    let (_s, head) = handshake(addr, "after", &standard(KEY)).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
}

#[tokio::test]
async fn an_upgrade_that_a_middleware_turns_down_gets_its_answer_and_frees_its_place() {
    // The handler accepted (so the Hub reserved a place), then a middleware
    // replaced the 101: the client gets the middleware's answer, and the place is
    // given back (with room for one, the second attempt is not refused as full).
    let mut config = Config::default();
    config.max_connections = Some(1);
    let hub = Hub::new(config);
    hub.start();
    let app = axum::Router::new()
        .route("/ws", axum::routing::get(common::ws))
        .layer(axum::middleware::map_response(
            |r: axum::response::Response| async move {
                if r.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
                    (axum::http::StatusCode::FORBIDDEN, "not today").into_response()
                } else {
                    r
                }
            },
        ))
        .with_state(hub.clone());
    let addr = common::serve_app(app).await;
    for id in ["one", "two"] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /ws?id={id} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\n{}\r\n",
            standard(KEY)
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let all = until_closed(&mut s).await;
        assert!(all.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{all}");
        assert!(all.contains("content-length: 9\r\n"), "{all}");
        assert!(all.ends_with("\r\n\r\nnot today"), "{all}");
    }
    assert_eq!(hub.connection_count(), 0);
}

#[tokio::test]
async fn plain_upgrades_are_answered_without_hyper_and_deflate_offers_through_it() {
    // hyper puts its upgrade handle in every request it serves; the listener's
    // own requests have none. A middleware notes which each handshake had.
    let hub = Hub::new(Config::default());
    hub.start();
    let through_hyper = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = through_hyper.clone();
    let app = axum::Router::new()
        .route("/ws", axum::routing::get(common::ws))
        .layer(axum::middleware::map_request(
            move |r: axum::extract::Request| {
                let seen = seen.clone();
                async move {
                    let hyper = r.extensions().get::<hyper::upgrade::OnUpgrade>().is_some();
                    seen.lock().push(hyper);
                    r
                }
            },
        ))
        .with_state(hub.clone());
    let addr = common::serve_app(app).await;
    let (_plain, head) = handshake(addr, "plain", &standard(KEY)).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let offer = "Sec-WebSocket-Extensions: permessage-deflate\r\n";
    let (_deflate, head) = handshake(addr, "deflate", &format!("{}{offer}", standard(KEY))).await;
    assert!(
        head.contains("sec-websocket-extensions: permessage-deflate"),
        "{head}"
    );
    assert_eq!(*through_hyper.lock(), [false, true]);
    common::eventually("both registered", || hub.connection_count() == 2).await;
}

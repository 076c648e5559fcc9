//! The WebSocket handshake and both framings behind it: a client that offers no
//! extension gets Keel's own framing, one that offers permessage-deflate gets it
//! (when the Hub's `compression` is on). Raw sockets, so every byte is checked.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

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
    common::eventually("registered", || hub.get_connection("plain").is_some()).await;

    // Server to client: small and 70 kB messages arrive whole, unmasked.
    assert!(hub.send_to_client("plain", "hello"));
    text_frame(&mut s, "hello").await;
    let big = "z".repeat(70_000);
    assert!(hub.send_to_client("plain", big.clone()));
    text_frame(&mut s, &big).await;

    // A Ping is answered with its payload; a Close is echoed and the socket ends.
    let mask = [1u8, 2, 3, 4];
    let masked = |b0: u8, p: &[u8]| {
        let mut f = vec![b0, 0x80 | p.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    };
    s.write_all(&masked(0x89, b"are you there")).await.unwrap();
    loop {
        let (b0, p) = frame(&mut s).await;
        if b0 == 0x8A {
            assert_eq!(p, b"are you there");
            break;
        }
    }
    s.write_all(&masked(0x88, &1000u16.to_be_bytes()))
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
    common::eventually("unregistered", || hub.get_connection_count() == 0).await;
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
    common::eventually("registered", || hub.get_connection("z").is_some()).await;
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
    assert_eq!(hub.get_connection_count(), 0);
}

/// Sends a message as each connection registers, the way the gateway's `welcome` goes.
struct Hello;

impl keel::Handler for Hello {
    fn on_connect(&self, hub: &Hub, conn: &keel::Connection) {
        conn.send_text(hub, bytes::Bytes::from_static(b"hello"));
    }
}

#[tokio::test]
async fn over_keels_listener_the_first_message_follows_the_101_and_the_peer_is_known() {
    // keel::Listener sends the 101 with the first message; the client sees the
    // same bytes in the same order as from any listener.
    let mut config = Config::default();
    config.max_connections_per_ip = Some(1);
    let hub = Hub::with_handler(config, Hello);
    let addr = common::serve(&hub).await;
    let (mut s, head) = handshake(addr, "first", &standard(KEY)).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    text_frame(&mut s, "hello").await;
    assert!(hub.send_to_client("first", "and then"));
    text_frame(&mut s, "and then").await;

    // keel::Peer carries the client's address to the per-address limit: a second
    // connection from 127.0.0.1 is refused, with an ordinary HTTP response.
    let (_s2, head) = handshake(addr, "second", &standard(KEY)).await;
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(hub.get_connection("second").is_none());
}

//! Test helpers: a gateway on 127.0.0.1 port 0, a protocol client over a real
//! WebSocket, a raw-TCP client for frames no well-behaved client sends, and a tiny
//! HTTP/1.1 client. Every wait has a deadline; nothing sleeps and hopes.
#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used
)]

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use keel_server::Running;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yawc::frame::OpCode;
use yawc::{Frame, TcpWebSocket};

/// A directory under the system's temp dir for one test's files, removed when
/// dropped (also when the test fails), so runs leave nothing behind.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// Creates `keel-{tag}-{pid}` afresh.
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("keel-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub use keel_testkit::gateway::{gateway, settings as config};
pub use keel_testkit::ws::{client_frame, expect_close};
pub use keel_testkit::{eventually, WAIT};

pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws")
}

/// A protocol client: JSON envelopes over a real WebSocket.
pub struct Client {
    pub ws: TcpWebSocket,
    pub welcome: Value,
}

/// A WebSocket to `url`, with nothing read yet.
pub async fn open(url: &str) -> TcpWebSocket {
    yawc::WebSocket::connect(url.parse().unwrap())
        .await
        .expect("websocket connects")
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::connect_url(&ws_url(addr)).await
    }

    /// Connects to `url` (with `?token=` or `?ticket=`, say) and reads `welcome`.
    pub async fn connect_url(url: &str) -> Client {
        let mut ws = open(url).await;
        let welcome = recv_json(&mut ws).await;
        assert_eq!(
            welcome["type"], "welcome",
            "first frame is welcome: {welcome}"
        );
        Client { ws, welcome }
    }

    pub fn client_id(&self) -> String {
        self.welcome["payload"]["client_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Frame::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws
            .send(Frame::text(s.to_string()))
            .await
            .expect("send");
    }

    /// The next JSON envelope, skipping heartbeat pings.
    pub async fn recv(&mut self) -> Value {
        loop {
            let v = recv_json(&mut self.ws).await;
            if v["type"] != "ping" {
                return v;
            }
        }
    }

    /// Sends a request and returns the next non-ping, non-message envelope.
    pub async fn request(&mut self, kind: &str, payload: Value) -> Value {
        self.send(json!({"type": kind, "payload": payload, "request_id": "r"}))
            .await;
        loop {
            let v = self.recv().await;
            if v["type"] != "message" {
                return v;
            }
        }
    }

    pub async fn subscribe(&mut self, channel: &str) -> Value {
        let v = self.request("subscribe", json!({"channel": channel})).await;
        assert_eq!(v["type"], "subscribe_response", "{v}");
        v
    }

    /// Waits for the server's Close and returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        expect_close(&mut self.ws).await
    }
}

pub async fn recv_json(ws: &mut TcpWebSocket) -> Value {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame within the deadline")
            .expect("connection still open");
        match frame.opcode() {
            OpCode::Text => {
                return serde_json::from_slice(frame.payload()).expect("server sends JSON")
            }
            OpCode::Close => panic!("unexpected close {:?}", frame.close_code()),
            _ => continue,
        }
    }
}

/// A client that speaks raw RFC 6455 over TCP, for frames a library won't send.
pub struct Raw {
    pub tcp: TcpStream,
    pub leftover: Vec<u8>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Self::connect_with(addr, "").await.expect("101")
    }

    /// Handshakes with extra header lines; Err(status line) if not 101.
    pub async fn connect_with(addr: SocketAddr, extra_headers: &str) -> Result<Raw, String> {
        Self::connect_to(addr, "/ws", extra_headers).await
    }

    /// Handshakes at `path` (with a query string, say) with extra header lines;
    /// Err(status line and headers) if not 101.
    pub async fn connect_to(
        addr: SocketAddr,
        path: &str,
        extra_headers: &str,
    ) -> Result<Raw, String> {
        Self::connect_from(None, addr, path, extra_headers).await
    }

    /// Like [`connect_to`](Self::connect_to), from source address `from`
    /// (127.0.0.x: every loopback address is this machine's).
    pub async fn connect_from(
        from: Option<std::net::IpAddr>,
        addr: SocketAddr,
        path: &str,
        extra_headers: &str,
    ) -> Result<Raw, String> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(ip) = from {
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
        }
        let mut tcp = socket.connect(addr).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
                .await
                .expect("handshake answer in time")
                .unwrap();
            assert!(n > 0, "server closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        if !head.starts_with("HTTP/1.1 101") {
            // Read the body too (by Content-Length), so callers can check it.
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + len {
                let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
                    .await
                    .expect("body in time")
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Err(String::from_utf8_lossy(&buf).to_string());
        }
        Ok(Raw {
            tcp,
            leftover: buf[end..].to_vec(),
        })
    }

    /// Sends one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let f = client_frame((if fin { 0x80 } else { 0 }) | opcode, payload);
        self.tcp.write_all(&f).await.unwrap();
    }

    /// Reads frames until a Close; returns its code. Panics if the socket ends first.
    pub async fn expect_close(&mut self) -> u16 {
        let mut buf = std::mem::take(&mut self.leftover);
        let mut chunk = vec![0u8; 65536];
        loop {
            // Parse whole frames from buf.
            while buf.len() >= 2 {
                let opcode = buf[0] & 0x0f;
                let mut len = (buf[1] & 0x7f) as usize;
                let mut off = 2;
                if len == 126 {
                    if buf.len() < 4 {
                        break;
                    }
                    len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
                    off = 4;
                } else if len == 127 {
                    if buf.len() < 10 {
                        break;
                    }
                    len = u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize;
                    off = 10;
                }
                if buf.len() < off + len {
                    break;
                }
                if opcode == 8 {
                    return if len >= 2 {
                        u16::from_be_bytes([buf[off], buf[off + 1]])
                    } else {
                        1005
                    };
                }
                buf.drain(..off + len);
            }
            let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
                .await
                .expect("a close within the deadline")
                .unwrap_or(0);
            assert!(n > 0, "socket ended without a Close frame");
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, key, body).await;
    (status, body)
}

pub async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("http answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

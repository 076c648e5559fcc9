//! The upgrade path without hyper: a connection whose first request is a plain
//! WebSocket upgrade is read, routed and answered by the listener itself.
//!
//! Through hyper, a connect costs three tasks (hyper's connection, the wait for
//! the upgrade, the connection's own), hyper's buffers and dispatcher, a sniff
//! for HTTP/2 that reads the first 24 bytes on their own, and for the socket's
//! whole life a boxed `Upgraded` in front of it. Here it costs one short task
//! that reads the head into one buffer, parses it with `httparse` (hyper's own
//! parser), calls the app as hyper would, writes nothing itself for a 101 (the
//! [`Stream`] holds it for the first message), and hands the socket to the Hub.
//!
//! What it must not do: answer anything it is not sure of, or lose a byte. A
//! request it does not take (not a `GET` upgrade to HTTP/1.1 with no extension
//! and no body, a head over 8 KiB or one that does not parse) goes to hyper with
//! everything read so far still to be read, so hyper answers it exactly as it
//! would have. A client that has not sent its whole head within the gate's
//! `handshake_timeout` of its accept is closed. Error answers to an upgrade (a
//! limit's 503, a rejection's 400) are written here with `connection: close`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{self, header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tower_service::Service;

use super::{Gate, Peer, Stream, Ticket};

/// The largest request head read here; a longer one goes to hyper.
const MAX_HEAD: usize = 8 * 1024;
/// Headers parsed here; a request with more goes to hyper.
const MAX_HEADERS: usize = 48;
/// The largest error body written here (they are a line of text).
const MAX_BODY: usize = 64 * 1024;

/// What a [`Listener`](super::Listener) set up with `route_upgrades` keeps.
pub(super) struct Direct {
    app: axum::Router,
    /// Connections the reader did not take, for `axum::serve`.
    hand_on: mpsc::UnboundedSender<(Stream, SocketAddr)>,
    /// The other end, read by the listener's `accept`.
    pub(super) handed_on: mpsc::UnboundedReceiver<(Stream, SocketAddr)>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").finish_non_exhaustive()
    }
}

impl Direct {
    pub(super) fn new(app: axum::Router) -> Self {
        let (hand_on, handed_on) = mpsc::unbounded_channel();
        Direct {
            app,
            hand_on,
            handed_on,
        }
    }

    /// Reads and answers `tcp`'s first request in a task of its own, or hands the
    /// connection on to hyper.
    pub(super) fn answer(&self, tcp: TcpStream, addr: SocketAddr, gate: &Gate, ticket: Ticket) {
        let app = self.app.clone();
        let hand_on = self.hand_on.clone();
        let gate = gate.clone();
        tokio::spawn(async move {
            if let Some(stream) = answer(app, tcp, addr, gate, ticket).await {
                // Fails only once the listener is gone (the server stopped).
                let _ = hand_on.send((stream, addr));
            }
        });
    }
}

/// The callback an accepted upgrade leaves for the listener: it gets the socket
/// once the 101 is on its way, or `None` if the answer was not a 101 after all.
type Start = Box<dyn FnOnce(Option<Stream>) + Send>;

/// Passed from the listener to the [`Upgrade`](crate::Upgrade) extractor (in the
/// request's extensions) and back: the Hub leaves in it what starts the
/// connection.
#[derive(Default)]
pub(crate) struct Handoff {
    start: Mutex<Option<Start>>,
}

impl Handoff {
    /// Leaves `start`, to be called with the socket once the 101 is on its way
    /// (or with `None` if the response is something else).
    pub(crate) fn on_upgrade(&self, start: impl FnOnce(Option<Stream>) + Send + 'static) {
        *self.start.lock() = Some(Box::new(start));
    }

    fn take(&self) -> Option<Start> {
        self.start.lock().take()
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        // Never left uncalled: the Hub's reservation is released through it.
        if let Some(start) = self.start.get_mut().take() {
            start(None);
        }
    }
}

/// The request extension that marks an upgrade the listener is answering.
#[derive(Clone)]
pub(crate) struct DirectUpgrade(pub(crate) Arc<Handoff>);

/// Reads `tcp`'s request head and answers it if it is a plain upgrade; otherwise
/// returns the connection, with what was read still to be read, for hyper.
/// `None`: answered, closed for silence, or nothing left to serve.
async fn answer(
    mut app: axum::Router,
    mut tcp: TcpStream,
    addr: SocketAddr,
    gate: Gate,
    ticket: Ticket,
) -> Option<Stream> {
    let mut buf = Vec::with_capacity(1024);
    let timeout = gate.handshake_timeout();
    let read = tokio::time::timeout(timeout, read_head(&mut tcp, &mut buf)).await;
    let (mut request, head_len) = match read {
        Ok(Ok(Head::Upgrade(request, len))) => (request, len),
        Ok(Ok(Head::Other)) => return Some(Stream::accepted(tcp, buf, ticket)),
        Err(_) => {
            // Silent, or a head sent a byte at a time: the descriptor is worth more.
            gate.timed_out();
            tracing::debug!(%addr, "closed: no request within handshake_timeout");
            return None;
        }
        Ok(Ok(Head::Closed)) | Ok(Err(_)) => return None,
    };
    // A client may send frames right behind its handshake: they are read first.
    let mut stream = Stream::accepted(tcp, buf.split_off(head_len), ticket);
    drop(buf);
    let handoff = Arc::new(Handoff::default());
    let ext = request.extensions_mut();
    ext.insert(ConnectInfo(Peer::of(&stream, addr)));
    ext.insert(DirectUpgrade(handoff.clone()));
    let response = match call(&mut app, request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let start = handoff.take();
    match start {
        Some(start) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            // Kept back for the connection's first message: one write for both.
            stream.hold_back(response_head(&response, None));
            start(Some(stream));
        }
        start => {
            // A middleware answered instead, or the handler refused.
            if let Some(start) = start {
                start(None);
            }
            let _ = tokio::time::timeout(timeout, write_response(stream, response)).await;
        }
    }
    None
}

/// Calls the app as `axum::serve` would.
async fn call(
    app: &mut axum::Router,
    request: Request<Body>,
) -> Result<Response<Body>, Infallible> {
    std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(app, cx)).await?;
    app.call(request).await
}

/// What a connection's first bytes turned out to be.
#[allow(clippy::large_enum_variant)] // on the stack for one call; a box would be an allocation
enum Head {
    /// A plain upgrade, and the length of its head.
    Upgrade(Request<Body>, usize),
    /// Anything else: for hyper.
    Other,
    /// The client went away before it sent a byte.
    Closed,
}

/// Reads until `buf` holds a complete head (or is not worth reading on).
async fn read_head(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Head> {
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= MAX_HEAD {
                return Ok(Head::Other);
            }
            buf.reserve(buf.len());
        }
        if tcp.read_buf(buf).await? == 0 {
            return Ok(if buf.is_empty() {
                Head::Closed
            } else {
                Head::Other
            });
        }
        if let Some(head) = parse(buf) {
            return Ok(head);
        }
    }
}

/// Parses a request head and builds the request, if it is one taken here: `GET`,
/// HTTP/1.1, `Upgrade: websocket` with `Connection: upgrade`, no
/// `Sec-WebSocket-Extensions` (a deflate offer goes to hyper, where yawc
/// negotiates it), no body. `None` while the head is not whole yet.
fn parse(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some(Head::Other),
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return Some(Head::Other);
    }
    let (Some(path), mut upgrade, mut connection) = (req.path, false, false) else {
        return Some(Head::Other);
    };
    let has_token = |v: &[u8], token: &str| {
        std::str::from_utf8(v)
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let mut map = http::HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Some(Head::Other);
        };
        if name == header::UPGRADE {
            upgrade |= has_token(h.value, "websocket");
        } else if name == header::CONNECTION {
            connection |= has_token(h.value, "upgrade");
        } else if name == header::SEC_WEBSOCKET_EXTENSIONS
            || name == header::TRANSFER_ENCODING
            || (name == header::CONTENT_LENGTH && h.value != b"0")
        {
            return Some(Head::Other);
        }
        let Ok(value) = HeaderValue::from_bytes(h.value) else {
            return Some(Head::Other);
        };
        map.append(name, value);
    }
    if !(upgrade && connection) {
        return Some(Head::Other);
    }
    let Ok(uri) = path.parse::<http::Uri>() else {
        return Some(Head::Other);
    };
    let mut request = Request::new(Body::empty());
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri;
    *request.version_mut() = http::Version::HTTP_11;
    *request.headers_mut() = map;
    Some(Head::Upgrade(request, len))
}

/// The status line and headers of `response` (with `content-length: body_len`
/// and `connection: close` when `body_len` is given), ending in the blank line.
fn response_head(response: &Response<Body>, body_len: Option<usize>) -> Vec<u8> {
    let mut head = Vec::with_capacity(192);
    let status = response.status();
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        if body_len.is_some()
            && [
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::CONNECTION,
            ]
            .contains(name)
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(len) = body_len {
        head.extend_from_slice(
            format!("content-length: {len}\r\nconnection: close\r\n").as_bytes(),
        );
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Writes a response that is not a 101, and closes the connection.
async fn write_response(mut stream: Stream, response: Response<Body>) {
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .unwrap_or_default();
    let response = Response::from_parts(parts, Body::empty());
    let mut out = response_head(&response, Some(body.len()));
    out.extend_from_slice(&body);
    if stream.write_all(&out).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str) -> Option<Request<Body>> {
        match parse(head.as_bytes()) {
            Some(Head::Upgrade(r, len)) => {
                assert_eq!(len, head.len());
                Some(r)
            }
            _ => None,
        }
    }

    const UPGRADE: &str = "GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn a_plain_upgrade_is_taken_with_its_uri_and_headers() {
        let r = parsed(UPGRADE).expect("taken");
        assert_eq!(r.uri().path(), "/ws");
        assert_eq!(r.uri().query(), Some("x=1"));
        assert_eq!(r.headers()["sec-websocket-version"], "13");
        assert_eq!(r.headers().len(), 5);
    }

    #[test]
    fn anything_else_goes_to_hyper() {
        let other = |h: &str| matches!(parse(h.as_bytes()), Some(Head::Other));
        assert!(other("GET /health HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(other(&UPGRADE.replace("GET", "POST")));
        assert!(other(&UPGRADE.replace("HTTP/1.1", "HTTP/1.0")));
        assert!(other(&UPGRADE.replace(
            "Host: a\r\n",
            "Host: a\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
        )));
        assert!(other(
            &UPGRADE.replace("Host: a\r\n", "Host: a\r\nContent-Length: 5\r\n")
        ));
        assert!(other(&UPGRADE.replace(
            "Host: a\r\n",
            "Host: a\r\nTransfer-Encoding: chunked\r\n"
        )));
        assert!(other(&UPGRADE.replace("keep-alive, Upgrade", "keep-alive")));
        assert!(other(
            &UPGRADE.replace("Upgrade: websocket", "Upgrade: h2c")
        ));
        assert!(other("GET /ws HTTP/1.1\r\nBad Header\r\n\r\n"));
        let many: String = (0..MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        assert!(other(
            &UPGRADE.replace("Host: a\r\n", &format!("Host: a\r\n{many}"))
        ));
        assert!(parse(&UPGRADE.as_bytes()[..40]).is_none(), "not whole yet");
    }

    #[test]
    fn an_error_answer_says_how_long_it_is_and_that_the_connection_closes() {
        let response = Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("content-length", "99")
            .header("x-a", "b")
            .body(Body::empty())
            .expect("response");
        let head = String::from_utf8(response_head(&response, Some(4))).expect("utf-8");
        assert_eq!(
            head,
            "HTTP/1.1 503 Service Unavailable\r\nx-a: b\r\ncontent-length: 4\r\nconnection: close\r\n\r\n"
        );
    }
}

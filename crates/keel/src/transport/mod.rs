//! The one place that knows how WebSocket frames are read and written.
//!
//! Everything else in the library sees [`Upgrade`] (the axum extractor), [`Socket`]
//! and the small frame vocabulary below. It must not grow protocol logic: it moves
//! frames, nothing more.
//!
//! Two framings sit behind [`Socket`]:
//! - [`plain`]: our own RFC 6455 framing, for connections that negotiated no
//!   extension (most clients of a gateway: load generators, servers, mobile
//!   libraries). 144 bytes per connection and no buffer while idle.
//! - yawc, for connections that negotiated permessage-deflate (browsers offer it):
//!   no context takeover and a shared compressor pool. Boxed, so a compressed
//!   connection costs its own memory and not every connection's. yawc is named in
//!   this file only.
//!
//! Why yawc for compression (see `docs/decisions.md`): permessage-deflate with no
//! context takeover and a shared compressor pool, buffers that start small and
//! shrink back, and Autobahn in its own CI.

mod plain;

use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{FutureExt, Sink, SinkExt};
use hyper_util::rt::TokioIo;

use crate::config::{Compression, Config};
use crate::listener::{DirectUpgrade, Handoff};

/// The accepted WebSocket: the upgraded HTTP connection with framing on top.
pub(crate) enum Socket {
    /// No extension: Keel's own framing.
    Plain(plain::PlainSocket<Io>),
    /// permessage-deflate: yawc.
    Deflate(Box<yawc::WebSocket<yawc::HttpStream>>),
}

/// A pending WebSocket upgrade, extracted from an axum request.
///
/// Hand it to [`Hub::connect`](crate::Hub::connect), which checks the Hub's limits,
/// answers the handshake and runs the connection. Rejections (not a WebSocket
/// request, wrong version) are answered with 400 before any handler runs.
pub struct Upgrade {
    /// `Sec-WebSocket-Key`, checked present.
    key: axum::http::HeaderValue,
    /// The one permessage-deflate offer kept (see [`choose_deflate_offer`]).
    deflate_offer: Option<axum::http::HeaderValue>,
    /// How the raw connection arrives once the 101 is on its way.
    pending: Pending,
    /// The TCP peer, when the server was built with connect info
    /// (`into_make_service_with_connect_info::<Peer>` or `::<SocketAddr>`).
    pub(crate) peer: Option<std::net::SocketAddr>,
    /// Served by a [`Listener`](crate::Listener): asks it to send the 101 with the
    /// connection's first message.
    hold: Option<std::sync::Arc<crate::listener::Hold>>,
    /// `X-Forwarded-For`, believed only from `trusted_proxies`.
    pub(crate) forwarded: Option<Box<str>>,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade").finish_non_exhaustive()
    }
}

/// Why an [`Upgrade`] could not be extracted: the request is not a valid
/// WebSocket handshake. Answers 400.
#[derive(Debug)]
pub struct UpgradeRejection(StatusCode);

impl IntoResponse for UpgradeRejection {
    fn into_response(self) -> Response {
        (
            self.0,
            "expected a WebSocket upgrade (RFC 6455, version 13)",
        )
            .into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        choose_deflate_offer(&mut parts.headers);
        let bad = || UpgradeRejection(StatusCode::BAD_REQUEST);
        let key = parts
            .headers
            .get(axum::http::header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or_else(bad)?;
        if parts
            .headers
            .get(axum::http::header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            return Err(bad());
        }
        let deflate_offer = parts
            .headers
            .get(axum::http::header::SEC_WEBSOCKET_EXTENSIONS)
            .cloned();
        let pending = match parts.extensions.remove::<DirectUpgrade>() {
            Some(DirectUpgrade(handoff)) => Pending::Direct(handoff),
            None => Pending::Hyper(
                parts
                    .extensions
                    .remove::<hyper::upgrade::OnUpgrade>()
                    .ok_or_else(bad)?,
            ),
        };
        let direct = matches!(pending, Pending::Direct(_));
        let (peer, hold) = match parts
            .extensions
            .get::<axum::extract::ConnectInfo<crate::Peer>>()
        {
            // The listener answering the upgrade itself holds the 101 itself.
            Some(info) => (
                Some(info.0.addr()),
                Some(info.0.hold.clone()).filter(|_| !direct),
            ),
            None => (
                parts
                    .extensions
                    .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                    .map(|c| c.0),
                None,
            ),
        };
        let forwarded = parts
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .map(Box::from);
        Ok(Upgrade {
            key,
            deflate_offer,
            pending,
            peer,
            hold,
            forwarded,
        })
    }
}

/// Leaves one permessage-deflate offer in `Sec-WebSocket-Extensions`.
///
/// A client may offer the extension several times, in order of preference (RFC
/// 7692 section 5); yawc reads only a header holding a single offer and treats
/// anything else as no offer at all. So the first offer whose terms can be kept
/// is chosen here: one that does not ask the server for a window under 15 bits
/// (yawc, built without zlib, always compresses with 15), or, if every offer asks
/// for that, the first (which yawc accepts without the window parameter, as it
/// does for a single such offer). Other extensions are dropped: none is supported.
fn choose_deflate_offer(headers: &mut axum::http::HeaderMap) {
    let name = axum::http::header::SEC_WEBSOCKET_EXTENSIONS;
    let offers: Vec<String> = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|o| o.trim().to_string())
        .filter(|o| {
            o.split(';')
                .next()
                .is_some_and(|n| n.trim().eq_ignore_ascii_case("permessage-deflate"))
        })
        .collect();
    let lines: Vec<&axum::http::HeaderValue> = headers.get_all(&name).iter().collect();
    let single = lines.len() == 1 && offers.len() == 1 && !lines[0].as_bytes().contains(&b',');
    if lines.is_empty() || single {
        return;
    }
    let keepable = |offer: &str| {
        !offer.split(';').skip(1).any(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            k.trim() == "server_max_window_bits"
                && v.trim()
                    .trim_matches('"')
                    .parse::<u8>()
                    .is_ok_and(|b| b < 15)
        })
    };
    let chosen = offers
        .iter()
        .find(|o| keepable(o))
        .or_else(|| offers.first())
        .and_then(|o| axum::http::HeaderValue::from_str(o).ok());
    headers.remove(&name);
    if let Some(v) = chosen {
        headers.insert(name, v);
    }
}

/// Shared per-Hub transport settings: the yawc options, with one compressor pool.
#[derive(Clone)]
pub(crate) struct Transport {
    options: yawc::Options,
    /// Whether an offer of permessage-deflate is taken up.
    deflate: bool,
    max_message: usize,
}

impl Transport {
    pub(crate) fn new(config: &Config) -> Self {
        let mut options = yawc::Options::default()
            .with_max_payload_read(config.max_message_size + 1)
            .with_max_read_buffer(config.max_message_size + 1)
            .with_read_buffer_capacity(config.read_buffer_size)
            .with_write_buffer_capacity(config.write_buffer_size)
            // yawc keeps a write buffer that grew below this boundary, and gives back
            // one that grew past it once flushed. A small boundary means an idle
            // connection keeps nothing of its last burst (or of its `welcome`); the
            // writer still batches, since it moves up to WRITE_BATCH frames into the
            // buffer per readiness check before the flush.
            .with_backpressure_boundary(config.write_buffer_size.max(256))
            .with_utf8()
            .with_no_delay();
        if config.compression == Compression::Deflate {
            options = options
                .with_low_latency_compression()
                .server_no_context_takeover()
                .client_no_context_takeover()
                .with_compression_threshold(128)
                .with_deflate_pool(yawc::DeflatePool::new(64));
        } else {
            options = options.without_compression();
        }
        Transport {
            options,
            deflate: config.compression == Compression::Deflate,
            max_message: config.max_message_size,
        }
    }

    /// Answers the handshake. `start` gets the socket once the 101 is on its way,
    /// or `None` if the handshake did not finish. Through hyper, the returned
    /// future waits for that and is to be spawned; a [`Listener`](crate::Listener)
    /// answering the upgrade itself calls `start` from its own task (no future).
    pub(crate) fn accept(
        &self,
        upgrade: Upgrade,
        start: impl FnOnce(Option<Socket>) + Send + 'static,
    ) -> Result<(Response, Option<impl std::future::Future<Output = ()>>), crate::Error> {
        let handshake = |e: String| crate::Error::new(crate::ErrorKind::Handshake, e);
        let (on_upgrade, offer) = match (
            upgrade.pending,
            upgrade.deflate_offer.filter(|_| self.deflate),
        ) {
            (Pending::Direct(handoff), None) => {
                let response = self.switching_protocols(&upgrade.key)?;
                let max = self.max_message;
                handoff.on_upgrade(move |stream| {
                    start(
                        stream.map(|s| Socket::Plain(plain::PlainSocket::new(Io::Direct(s), max))),
                    );
                });
                return Ok((response, None));
            }
            (Pending::Direct(_), Some(_)) => {
                // The listener leaves upgrades offering an extension to hyper.
                return Err(handshake("an extension offer outside hyper".into()));
            }
            (Pending::Hyper(on_upgrade), offer) => (on_upgrade, offer),
        };
        match offer {
            Some(offer) => {
                // yawc writes the 101 and its frames itself: nothing to hold.
                if let Some(hold) = &upgrade.hold {
                    hold.dismiss();
                }
                // yawc negotiates the extension: hand it the request's parts again.
                let (mut parts, ()) = axum::http::Request::new(()).into_parts();
                let h = &mut parts.headers;
                h.insert(axum::http::header::SEC_WEBSOCKET_KEY, upgrade.key);
                h.insert(
                    axum::http::header::SEC_WEBSOCKET_VERSION,
                    axum::http::HeaderValue::from_static("13"),
                );
                h.insert(axum::http::header::SEC_WEBSOCKET_EXTENSIONS, offer);
                parts.extensions.insert(on_upgrade);
                let incoming = yawc::IncomingUpgrade::from_request_parts(&mut parts, &())
                    .now_or_never()
                    .ok_or_else(|| handshake("the upgrade did not complete at once".into()))?
                    .map_err(|s| handshake(s.to_string()))?;
                let (response, fut) = incoming
                    .upgrade(self.options.clone())
                    .map_err(|e| handshake(e.to_string()))?;
                let (parts, body) = response.into_parts();
                let response = Response::from_parts(parts, axum::body::Body::new(body));
                let socket = fut.map(|r| start(r.ok().map(|ws| Socket::Deflate(Box::new(ws)))));
                Ok((response, Some(socket.left_future())))
            }
            None => {
                let response = self.switching_protocols(&upgrade.key)?;
                let max = self.max_message;
                // The 101 waits in the listener for the first message (the
                // gateway's `welcome`): one write instead of two.
                if let Some(hold) = &upgrade.hold {
                    hold.engage();
                }
                let socket = on_upgrade.map(move |r| {
                    start(r.ok().map(|io| {
                        Socket::Plain(plain::PlainSocket::new(Io::Hyper(TokioIo::new(io)), max))
                    }))
                });
                Ok((response, Some(socket.right_future())))
            }
        }
    }

    /// The 101 for a plain upgrade (no extension).
    fn switching_protocols(&self, key: &axum::http::HeaderValue) -> Result<Response, crate::Error> {
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(axum::http::header::UPGRADE, "websocket")
            .header(axum::http::header::CONNECTION, "Upgrade")
            .header(
                axum::http::header::SEC_WEBSOCKET_ACCEPT,
                accept_key(key.as_bytes()),
            )
            .body(axum::body::Body::empty())
            .map_err(|e| crate::Error::new(crate::ErrorKind::Handshake, e.to_string()))
    }
}

/// How an accepted upgrade's raw connection arrives.
enum Pending {
    /// hyper hands it over once it has written the 101.
    Hyper(hyper::upgrade::OnUpgrade),
    /// The [`Listener`](crate::Listener) answered the request itself, and hands
    /// it to what the Hub leaves in here.
    Direct(std::sync::Arc<Handoff>),
}

/// The byte stream under a plain WebSocket.
pub(crate) enum Io {
    /// Upgraded by hyper: its boxed connection.
    Hyper(TokioIo<hyper::upgrade::Upgraded>),
    /// Answered by the listener: the accepted stream itself.
    Direct(crate::listener::Stream),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Hyper(io) => std::pin::Pin::new(io).poll_read(cx, buf),
            Io::Direct(io) => std::pin::Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Hyper(io) => std::pin::Pin::new(io).poll_write(cx, buf),
            Io::Direct(io) => std::pin::Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Hyper(io) => std::pin::Pin::new(io).poll_write_vectored(cx, bufs),
            Io::Direct(io) => std::pin::Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Hyper(io) => io.is_write_vectored(),
            Io::Direct(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Hyper(io) => std::pin::Pin::new(io).poll_flush(cx),
            Io::Direct(io) => std::pin::Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Hyper(io) => std::pin::Pin::new(io).poll_shutdown(cx),
            Io::Direct(io) => std::pin::Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// `Sec-WebSocket-Accept` for a client's key (RFC 6455 section 4.2.2).
fn accept_key(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::choose_deflate_offer;
    use axum::http::{header::SEC_WEBSOCKET_EXTENSIONS as EXT, HeaderMap, HeaderValue};

    fn chosen(values: &[&str]) -> Option<String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(EXT, HeaderValue::from_str(v).unwrap());
        }
        choose_deflate_offer(&mut h);
        h.get(EXT).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn one_offer_is_left_as_it_is() {
        let one = "permessage-deflate; client_max_window_bits";
        assert_eq!(chosen(&[one]).as_deref(), Some(one));
        assert_eq!(chosen(&[]), None);
    }

    #[test]
    fn the_first_offer_that_can_be_kept_wins() {
        // Autobahn 13.7: a small server window first, then two it can have.
        let v = "permessage-deflate; server_no_context_takeover; server_max_window_bits=9, \
                 permessage-deflate; server_no_context_takeover, permessage-deflate";
        assert_eq!(
            chosen(&[v]).as_deref(),
            Some("permessage-deflate; server_no_context_takeover")
        );
        // Offers split over two header lines, with an unknown extension.
        assert_eq!(
            chosen(&["x-webkit-deflate-frame", "permessage-deflate"]).as_deref(),
            Some("permessage-deflate")
        );
        // Nothing keepable: the first, as yawc takes a single such offer.
        let a = "permessage-deflate; server_max_window_bits=8";
        let b = "permessage-deflate; server_max_window_bits=10";
        assert_eq!(chosen(&[&format!("{a}, {b}")]).as_deref(), Some(a));
        assert_eq!(chosen(&["x-unknown"]), None);
    }
}

/// One frame read from a client, classified.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A complete text message, its UTF-8 checked once, by the transport.
    Text(String),
    /// A complete binary message.
    Binary(Bytes),
    /// A Ping (already answered by the transport) or a Pong.
    Control,
    /// The peer's Close, with its code if any.
    Close(Option<u16>),
}

/// Why reading failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The connection is gone (EOF, reset, or the close handshake finished).
    Closed,
    /// A protocol violation; the transport has queued a Close with this code.
    Protocol(u16, String),
}

/// Polls the next complete message.
pub(crate) fn poll_read(
    socket: &mut Socket,
    cx: &mut Context<'_>,
) -> Poll<Result<Incoming, ReadError>> {
    use yawc::frame::OpCode;
    let socket = match socket {
        Socket::Plain(s) => return s.poll_read(cx),
        Socket::Deflate(s) => s,
    };
    socket.poll_next_frame(cx).map(|r| match r {
        Ok(frame) => Ok(match frame.opcode() {
            // yawc checked the UTF-8 already (`with_utf8`), but hands over bytes;
            // `Vec::from` takes them without a copy when they are not shared.
            OpCode::Text => match String::from_utf8(Vec::from(frame.into_payload())) {
                Ok(text) => Incoming::Text(text),
                Err(_) => return Err(ReadError::Protocol(1007, "invalid utf-8".into())),
            },
            OpCode::Binary => Incoming::Binary(frame.into_payload()),
            OpCode::Close => Incoming::Close(frame.close_code().map(u16::from)),
            _ => Incoming::Control,
        }),
        Err(e) => Err(read_error(e)),
    })
}

fn read_error(e: yawc::WebSocketError) -> ReadError {
    use yawc::WebSocketError as E;
    let code = match e {
        E::FrameTooLarge => 1009,
        E::InvalidUTF8 => 1007,
        E::InvalidOpCode(_) => 1003,
        E::ReservedBitsNotZero
        | E::ControlFrameFragmented
        | E::PingFrameTooLarge
        | E::InvalidFragment
        | E::InvalidCloseFrame
        | E::InvalidCloseCode
        | E::FragmentTimeout
        | E::InvalidContinuationFrame
        | E::CompressionNotSupported => 1002,
        _ => return ReadError::Closed,
    };
    ReadError::Protocol(code, e.to_string())
}

/// A frame to write.
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    /// A text message (pre-encoded JSON, shared between subscribers).
    Text(Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A Ping heartbeat.
    Ping,
    /// A Close with code and reason.
    Close(u16, String),
}

impl Outgoing {
    /// Bytes of a data frame's payload; 0 for control frames.
    pub(crate) fn size(&self) -> usize {
        match self {
            Outgoing::Text(b) | Outgoing::Binary(b) => b.len(),
            Outgoing::Ping | Outgoing::Close(..) => 0,
        }
    }

    fn into_frame(self) -> yawc::Frame {
        match self {
            Outgoing::Text(b) => yawc::Frame::text(b),
            Outgoing::Binary(b) => yawc::Frame::binary(b),
            Outgoing::Ping => yawc::Frame::ping(Bytes::new()),
            Outgoing::Close(code, reason) => {
                yawc::Frame::close(yawc::close::CloseCode::from(code), truncate(&reason, 123))
            }
        }
    }
}

/// One frame as a send queue and a [`Batch`] hold it, in 16 bytes where an
/// [`Outgoing`] takes 40. A fan-out writes one into every member's queue, far
/// apart in memory: at 40 bytes nearly every push (and every pop) was a cache miss
/// of its own, at 16 four share a line. A publication stays one shared buffer
/// until the socket has written it.
pub(crate) enum Slot {
    /// A frame many queues share (a publication): a count on its one copy.
    Shared(Arc<Bytes>),
    /// Anything else (replies, direct sends, the Close), boxed.
    Own(Box<Outgoing>),
}

impl Slot {
    pub(crate) fn size(&self) -> usize {
        match self {
            Slot::Shared(b) => b.len(),
            Slot::Own(o) => o.size(),
        }
    }

    pub(crate) fn is_close(&self) -> bool {
        matches!(self, Slot::Own(o) if matches!(**o, Outgoing::Close(..)))
    }

    pub(crate) fn into_outgoing(self) -> Outgoing {
        match self {
            Slot::Shared(b) => Outgoing::Text(Arc::unwrap_or_clone(b)),
            Slot::Own(o) => *o,
        }
    }
}

impl From<Outgoing> for Slot {
    fn from(o: Outgoing) -> Self {
        Slot::Own(Box::new(o))
    }
}

/// Most frames a [`Batch`] holds, and so one write carries (as a vectored write,
/// two buffers a frame, it stays below the kernel's 1024). A subscriber that fell
/// behind catches up in as few writes as this allows, and a write's fixed cost is
/// most of what a busy server spends: 128 against 32 raised one core's fan-out
/// ceiling from about 2.1 to 2.75 M deliveries/s (docs/benchmarks.md); 256 gained
/// nothing more.
pub(crate) const BATCH_MAX: usize = 128;

/// Frames taken from a send queue under one lock, held on the caller's stack until
/// the socket has them. A publication stays its one shared buffer until the plain
/// socket copies the batch into the buffer of a single write (or, for large
/// frames, writes from the frames' own buffers).
pub(crate) struct Batch {
    items: [Option<Slot>; BATCH_MAX],
    len: usize,
}

impl Batch {
    /// An empty batch.
    pub(crate) fn new() -> Self {
        Batch {
            items: [const { None }; BATCH_MAX],
            len: 0,
        }
    }

    /// Adds a frame; false (and the frame is dropped) when full, which callers
    /// prevent by taking at most [`BATCH_MAX`].
    pub(crate) fn push(&mut self, item: Slot) -> bool {
        match self.items.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(item);
                self.len += 1;
                true
            }
            None => false,
        }
    }

    /// How many frames it holds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The frames, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.items[..self.len].iter().flatten()
    }

    /// Takes the frames out, in order, leaving the batch empty.
    fn drain(&mut self) -> impl Iterator<Item = Slot> + '_ {
        let n = std::mem::take(&mut self.len);
        self.items[..n].iter_mut().filter_map(Option::take)
    }
}

/// Hands a batch of frames to the socket, emptying the batch. The plain socket
/// writes what it can at once, straight from the frames' buffers, and buffers the
/// rest for [`poll_flush`]; the deflate socket encodes each frame into its buffer.
pub(crate) fn send_batch(
    socket: &mut Socket,
    cx: &mut Context<'_>,
    batch: &mut Batch,
) -> Result<(), ()> {
    if let Socket::Plain(s) = socket {
        return s.send_batch(cx, batch);
    }
    for item in batch.drain() {
        start_send(socket, item.into_outgoing())?;
    }
    Ok(())
}

/// Close reasons are limited to 123 bytes by RFC 6455; cut at a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether the socket can take another frame now (registers the waker if not).
pub(crate) fn poll_ready(socket: &mut Socket, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
    match socket {
        Socket::Plain(s) => s.poll_ready(cx),
        Socket::Deflate(s) => {
            Sink::<yawc::Frame>::poll_ready(std::pin::Pin::new(&mut **s), cx).map_err(|_| ())
        }
    }
}

/// Encodes a frame into the socket's write buffer (after `poll_ready` said yes).
pub(crate) fn start_send(socket: &mut Socket, frame: Outgoing) -> Result<(), ()> {
    match socket {
        Socket::Plain(s) => s.start_send(frame),
        Socket::Deflate(s) => s.start_send_unpin(frame.into_frame()).map_err(|_| ()),
    }
}

/// Writes what is buffered; `Ready(Ok)` once the buffer is empty.
pub(crate) fn poll_flush(socket: &mut Socket, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
    match socket {
        Socket::Plain(s) => s.poll_flush(cx),
        Socket::Deflate(s) => s.poll_flush_unpin(cx).map_err(|_| ()),
    }
}

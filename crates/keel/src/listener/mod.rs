//! A TCP listener that sends a WebSocket's `101 Switching Protocols` and its
//! first message in one write and can answer plain upgrades without hyper; the
//! [`Gate`] that bounds connections until they are WebSockets; and [`serve`], the
//! HTTP serve loop that keeps the gate's deadlines.
//!
//! Without it, a new connection costs the server two writes before the client has
//! anything to act on: hyper writes the 101 and flushes it, and only then does the
//! connection's task get the socket and write its first message (the gateway's
//! `welcome`). On loopback and in a data centre, a write is mostly the kernel
//! delivering a segment and waking the reader, so this is about a tenth of what a
//! connect costs. [`Listener`] accepts like `tokio::net::TcpListener` (and sets
//! `TCP_NODELAY`); its [`Stream`] can hold back the bytes of one HTTP response
//! until the next write, when an accepted plain WebSocket upgrade asks it to
//! through [`Peer`], the connect info that comes with it.
//!
//! # The upgrade path without hyper
//!
//! With [`Listener::route_upgrades`], a connection whose first request is a plain
//! WebSocket upgrade does not meet hyper at all (`direct.rs`): the listener reads
//! the head itself, calls the app with the request hyper would have built, and
//! hands the socket to the Hub, with the 101 held for the first message. That
//! saves hyper's connection task and buffers, its 24-byte HTTP/2 sniff (a read of
//! its own), the task that waits for the upgrade, and the box hyper's `Upgraded`
//! puts in front of the socket for the connection's whole life. Anything else
//! goes to `axum::serve` with every byte read so far still to be read.
//!
//! What it must not do: lose or reorder a byte, or keep one back for longer than
//! the connection's next read, write or flush. Whatever was held goes out before
//! anything else is written, read or shut down, so a response that is not followed
//! by a message (an upgrade a middleware turned into an error, a WebSocket whose
//! handler sends nothing) still leaves at once. Everything but a plain upgrade goes
//! straight through: HTTP requests and permessage-deflate connections. [`Wrap`]
//! gives any other listener the same hold (the gateway wraps its TLS listener: the
//! hold sits above TLS, so the 101 and the first message share a TLS record).
//!
//! ```no_run
//! # async fn run(app: axum::Router, hub: keel::Hub) -> std::io::Result<()> {
//! let gate = hub.gate();
//! let listener = keel::Listener::bind("127.0.0.1:3000")
//!     .await?
//!     .route_upgrades(app.clone())
//!     .gate(gate.clone());
//! keel::listener::serve(listener, app, gate, std::future::pending()).await;
//! # Ok(())
//! # }
//! ```
//!
//! `axum::serve(listener, app.into_make_service_with_connect_info::<keel::Peer>())`
//! works too, but hyper then runs without a timer: an HTTP connection (one the
//! listener handed on) has no header or keep-alive deadline.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};

mod direct;
mod gate;
mod serve;

pub(crate) use direct::{DirectUpgrade, Handoff};
pub use gate::{Gate, GateStats, Ticket};
pub use serve::serve;

/// Accepts TCP connections for `axum::serve`, with `TCP_NODELAY` set, as
/// [`Stream`]s that can send an upgrade's 101 together with the first message.
///
/// Serve with `into_make_service_with_connect_info::<Peer>()` so that the
/// [`Upgrade`](crate::Upgrade) extractor finds each connection's [`Peer`]; with
/// any other make-service it works as a plain listener.
#[derive(Debug)]
pub struct Listener {
    inner: TcpListener,
    /// Set by [`route_upgrades`](Self::route_upgrades): the app that answers
    /// upgrades here, and the connections handed on to axum.
    direct: Option<direct::Direct>,
    /// The bounds on connections until they are WebSockets.
    gate: Gate,
}

impl Listener {
    /// Binds to `addr` like `tokio::net::TcpListener::bind`, with a listen
    /// backlog of [`BACKLOG`] (see [`bind_tcp`]).
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Self> {
        bind_tcp(addr).await.map(Listener::from)
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Answers WebSocket upgrades with `app` here, without hyper: a connection
    /// whose first request is a plain upgrade (`GET`, HTTP/1.1, no extension
    /// offered, no body) is routed through `app` by the listener's own small
    /// request reader, and its socket goes straight to the Hub. Every other
    /// connection (HTTP requests, upgrades offering permessage-deflate, anything
    /// the reader does not take) goes to `axum::serve` as before, with every byte
    /// read so far still to be read. See [the module docs](self#the-upgrade-path-without-hyper).
    ///
    /// `app` should be the Router `axum::serve` gets (a clone is cheap), and its
    /// WebSocket routes must take Keel's [`Upgrade`](crate::Upgrade): handlers see
    /// the same request they would see from hyper (method, URI, headers,
    /// [`Peer`] as `ConnectInfo`), but there is no hyper upgrade in it.
    pub fn route_upgrades(mut self, app: axum::Router) -> Self {
        self.direct = Some(direct::Direct::new(app));
        self
    }

    /// Bounds its connections until they are WebSockets with `gate` (see
    /// [`Gate`]); usually the Hub's, [`Hub::gate`](crate::Hub::gate), so that its
    /// metrics count them. Without it, a default [`Gate`] applies: a 10 s
    /// `handshake_timeout` and no cap.
    pub fn gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }
}

/// The listen backlog [`bind_tcp`] asks for (the kernel caps it at
/// `net.core.somaxconn`, 4096 on current Linux). The standard library's 128 is
/// too short for a reconnection storm, or for clients waiting while accepting
/// pauses at `max_pending_connections`: past it the kernel drops handshakes, and
/// clients retry only after 1 s, 3 s, 7 s.
pub const BACKLOG: u32 = 4096;

/// Binds a TCP listener to the first address `addr` resolves to that binds, with
/// `SO_REUSEADDR` (a restarted server need not wait out `TIME_WAIT`) and a
/// backlog of [`BACKLOG`].
pub async fn bind_tcp(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind")))
}

impl From<TcpListener> for Listener {
    fn from(inner: TcpListener) -> Self {
        Listener {
            inner,
            direct: None,
            gate: Gate::default(),
        }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Stream, SocketAddr) {
        let Listener {
            inner,
            direct,
            gate,
        } = self;
        loop {
            // The gate waits below its cap of pending connections, and counts, logs
            // and backs off when accepting fails (out of descriptors).
            let (tcp, addr, ticket) = match direct {
                None => gate.accept(inner).await,
                Some(d) => tokio::select! {
                    biased;
                    Some(handed_on) = d.handed_on.recv() => return handed_on,
                    accepted = gate.accept(inner) => accepted,
                },
            };
            // Without TCP_NODELAY, Nagle holds a small write back while an earlier
            // one is unacknowledged, and the client's delayed ACK turns that into 40 ms.
            let _ = tcp.set_nodelay(true);
            match direct {
                None => return (Stream::accepted(tcp, Vec::new(), ticket), addr),
                Some(d) => d.answer(tcp, addr, gate, ticket),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A held response and a `welcome` up to this size go out copied into one buffer.
const SMALL: usize = 2048;

/// The stream passes everything through (and may be asked to hold).
const IDLE: u8 = 0;
/// An accepted plain upgrade asked: the response being written is kept back, and
/// the flush that ends it is not passed on. That flush makes it `IDLE` again.
const ENGAGED: u8 = 1;
/// The upgrade went another way (permessage-deflate): nothing will be held; the
/// stream lets go of the handle.
const DISMISSED: u8 = 2;

/// What a connection's [`Stream`] and its [`Peer`] share.
#[derive(Debug, Default)]
pub(crate) struct Hold {
    /// `IDLE`, `ENGAGED` or `DISMISSED`.
    state: AtomicU8,
    /// The response kept back; written in front of whatever comes next. Only the
    /// stream's own task touches it: the lock is never contended.
    held: Mutex<Vec<u8>>,
    /// Bytes read off the socket before the stream was made (the request head
    /// the listener read, or what a client sent behind it): read before the
    /// socket is.
    unread: Mutex<Vec<u8>>,
    /// The connection's place under its [`Gate`]'s cap: given back when the hold
    /// goes (the connection is a WebSocket, or closed).
    _ticket: Ticket,
}

impl Hold {
    /// Asks the stream to keep back the response about to be written (the 101)
    /// and send it with the first message.
    pub(crate) fn engage(&self) {
        self.state.store(ENGAGED, Ordering::Relaxed);
    }

    /// Tells the stream nothing will be held on this connection (it became a
    /// WebSocket that writes through another framing), so it can let go.
    pub(crate) fn dismiss(&self) {
        self.state.store(DISMISSED, Ordering::Relaxed);
    }
}

/// Connect info for `into_make_service_with_connect_info::<Peer>()` with a
/// [`Listener`] or a [`Wrap`]: the client's address, and the handle through which the
/// [`Upgrade`](crate::Upgrade) extractor asks for the 101 to ride with the first
/// message.
#[derive(Debug, Clone)]
pub struct Peer {
    addr: SocketAddr,
    pub(crate) hold: Arc<Hold>,
}

impl Peer {
    /// The client's TCP address (not `X-Forwarded-For`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Self {
        Peer::of(stream.io(), *stream.remote_addr())
    }
}

impl<L> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Wrap<L>>> for Peer
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Wrap<L>>) -> Self {
        Peer::of(stream.io(), *stream.remote_addr())
    }
}

impl Peer {
    fn of<S>(stream: &Stream<S>, addr: SocketAddr) -> Self {
        Peer {
            addr,
            // Every new stream starts with one; a connection whose handle has
            // been let go has nothing to hold back and ignores this one.
            hold: stream.hold.clone().unwrap_or_default(),
        }
    }
}

/// Any other axum listener (one that terminates TLS, say), its connections
/// wrapped in [`Stream`]s: serve it with [`Peer`] as connect info and an
/// upgrade's 101 goes out with the first message, as with [`Listener`]. Above TLS
/// that saves a TLS record as well as a write. It sets nothing on the sockets
/// (`TCP_NODELAY` is the wrapped listener's business).
#[derive(Debug)]
pub struct Wrap<L>(pub L);

impl<L> axum::serve::Listener for Wrap<L>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    type Io = Stream<L::Io>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        let (io, addr) = self.0.accept().await;
        (Stream::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// An accepted connection (a `TcpStream` unless a [`Wrap`] wraps another
/// stream) that can keep back one response until the next write (see the
/// [module docs](self)). Tests drive it over a stream that takes a few bytes
/// per write.
#[derive(Debug)]
pub struct Stream<S = TcpStream> {
    io: S,
    /// Shared with the connection's [`Peer`]. Let go once a held response is out
    /// or the handle is dismissed, so a long-lived WebSocket keeps nothing of it
    /// and its writes go straight through.
    hold: Option<Arc<Hold>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream<S> {
    fn new(io: S) -> Self {
        Stream::accepted(io, Vec::new(), Ticket::default())
    }

    /// A stream over a connection just accepted under a [`Gate`] (a listener
    /// that terminates TLS makes its streams with this): `ticket` is given back
    /// once the connection is a WebSocket or closed, and `unread` (bytes read off
    /// the connection already) is read before the connection is.
    pub fn accepted(io: S, unread: Vec<u8>, ticket: Ticket) -> Self {
        Stream {
            io,
            hold: Some(Arc::new(Hold {
                state: AtomicU8::new(IDLE),
                held: Mutex::default(),
                unread: Mutex::new(unread),
                _ticket: ticket,
            })),
        }
    }

    /// Keeps `response` back, to go out in front of the next write (or at the
    /// next read, flush or shutdown).
    fn hold_back(&mut self, response: Vec<u8>) {
        let hold = self.hold.get_or_insert_with(Default::default);
        hold.state.store(IDLE, Ordering::Relaxed);
        *hold.held.lock() = response;
    }

    /// Lets go of the handle once it has nothing left to hold or to read.
    fn let_go_if_done(hold: &mut Option<Arc<Hold>>) {
        if hold
            .as_ref()
            .is_some_and(|h| h.held.lock().is_empty() && h.unread.lock().is_empty())
        {
            *hold = None;
        }
    }

    /// Writes what is held, with `extra` behind it in the same vectored write,
    /// until nothing is held; returns how much of `extra` went out with it (the
    /// rest is the caller's to write). `Ready(Ok(0))` at once when nothing is
    /// held, or while a response is being kept back.
    fn poll_release(
        &mut self,
        cx: &mut Context<'_>,
        extra: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Stream { io, hold } = self;
        let Some(shared) = hold.as_ref() else {
            return Poll::Ready(Ok(0));
        };
        match shared.state.load(Ordering::Relaxed) {
            ENGAGED => return Poll::Ready(Ok(0)),
            DISMISSED => {
                shared.held.lock().clear();
                Self::let_go_if_done(hold);
                return Poll::Ready(Ok(0));
            }
            _ => {}
        }
        let mut held = shared.held.lock();
        if held.is_empty() {
            // Nothing yet: a later request on this connection may still upgrade.
            return Poll::Ready(Ok(0));
        }
        let mut of_extra = 0;
        while !held.is_empty() {
            let before = held.len();
            let extra_len: usize = extra.iter().map(|b| b.len()).sum();
            let n = if before + extra_len <= SMALL {
                // A 101 and a `welcome`: one copy and a `send`, which costs the
                // kernel less than a `writev` of two buffers.
                let mut buf = [0u8; SMALL];
                buf[..before].copy_from_slice(&held);
                let mut at = before;
                for b in extra {
                    buf[at..at + b.len()].copy_from_slice(b);
                    at += b.len();
                }
                ready!(Pin::new(&mut *io).poll_write(cx, &buf[..at]))?
            } else {
                let mut all = Vec::with_capacity(extra.len() + 1);
                all.push(IoSlice::new(&held));
                all.extend_from_slice(extra);
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &all))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            held.drain(..n.min(before));
            of_extra = n.saturating_sub(before);
        }
        drop(held);
        Self::let_go_if_done(hold);
        Poll::Ready(Ok(of_extra))
    }

    /// Writes `bufs`: kept back while engaged, behind what is held otherwise.
    fn poll_send(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        if let Some(shared) = &self.hold {
            if shared.state.load(Ordering::Relaxed) == ENGAGED {
                // The response an accepted upgrade is answered with: keep it.
                let mut held = shared.held.lock();
                let total: usize = bufs.iter().map(|b| b.len()).sum();
                held.reserve(total);
                for b in bufs {
                    held.extend_from_slice(b);
                }
                return Poll::Ready(Ok(total));
            }
            let n = ready!(self.poll_release(cx, bufs))?;
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            // Nothing was held, or only the held bytes went out: `bufs` goes on its
            // own below.
        }
        match bufs {
            [one] => Pin::new(&mut self.io).poll_write(cx, one),
            _ => Pin::new(&mut self.io).poll_write_vectored(cx, bufs),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // A held response goes out before the peer is expected to answer it. If the
        // socket has no room, reading goes on: write readiness wakes this task.
        if let Poll::Ready(Err(e)) = self.poll_release(cx, &[]) {
            return Poll::Ready(Err(e));
        }
        if let Some(hold) = &self.hold {
            let mut unread = hold.unread.lock();
            if !unread.is_empty() {
                let n = unread.len().min(buf.remaining());
                buf.put_slice(&unread[..n]);
                unread.drain(..n);
                drop(unread);
                // A handle a `Peer` still shares may yet be engaged (hyper is
                // reading a request that may upgrade): kept. One no `Peer` shares
                // never will be: let go once it holds nothing either.
                if Arc::strong_count(hold) == 1 {
                    Self::let_go_if_done(&mut self.hold);
                }
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.hold.is_none() {
            return Pin::new(&mut self.io).poll_write(cx, buf);
        }
        self.poll_send(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.hold.is_none() {
            return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        }
        self.poll_send(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(hold) = &self.hold {
            if hold.state.load(Ordering::Relaxed) == ENGAGED && !hold.held.lock().is_empty() {
                // The end of the held response: it goes out with the next write.
                hold.state.store(IDLE, Ordering::Relaxed);
                return Poll::Ready(Ok(()));
            }
        }
        ready!(self.poll_release(cx, &[]))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(hold) = &self.hold {
            if hold.state.load(Ordering::Relaxed) == ENGAGED {
                hold.state.store(IDLE, Ordering::Relaxed);
            }
        }
        ready!(self.poll_release(cx, &[]))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// One end of an in-memory pipe that takes at most `max` bytes per write and
    /// counts the writes that reach it (a vectored write is one).
    struct Chunky {
        io: DuplexStream,
        max: usize,
        writes: usize,
    }

    impl AsyncRead for Chunky {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Chunky {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            all.truncate(self.max);
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &all))?;
            self.writes += 1;
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    const RESPONSE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
    const WELCOME: &[u8] = b"\x81\x1b{\"type\":\"welcome\",\"id\":\"c1\"}";

    /// A stream over a pipe taking `max` bytes a write, its peer end, and the
    /// handle an upgrade engages.
    fn holding(max: usize) -> (Stream<Chunky>, DuplexStream, Arc<Hold>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let s = Stream::new(Chunky {
            io: a,
            max,
            writes: 0,
        });
        let hold = s.hold.clone().expect("a new stream has a handle");
        (s, b, hold)
    }

    /// What hyper does with a response: one vectored write of its head, then a flush.
    async fn write_response(s: &mut Stream<Chunky>) {
        let (head, tail) = RESPONSE.split_at(20);
        let bufs = [IoSlice::new(head), IoSlice::new(tail)];
        let n = std::future::poll_fn(|cx| Pin::new(&mut *s).poll_write_vectored(cx, &bufs))
            .await
            .expect("write");
        assert_eq!(n, RESPONSE.len(), "the whole response is taken");
        s.flush().await.expect("flush");
    }

    /// Whatever the peer has been sent so far.
    async fn sent(peer: &mut DuplexStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while let Some(r) = peer.read(&mut buf).now_or_never() {
            let n = r.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn the_backlog_holds_a_burst_of_connects_while_nobody_accepts() {
        // With the standard library's backlog of 128, connects past it wait for
        // the kernel's SYN retry (1 s): they would miss the deadline.
        let l = bind_tcp("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let connects = (0..1000).map(|_| {
            tokio::time::timeout(
                std::time::Duration::from_millis(500),
                TcpStream::connect(addr),
            )
        });
        let done = futures::future::join_all(connects).await;
        let ok = done.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(ok, 1000, "connects completed while nobody accepted");
    }

    #[tokio::test]
    async fn an_engaged_response_goes_out_with_the_first_message_in_one_write() {
        let (mut s, mut peer, hold) = holding(usize::MAX);
        hold.engage();
        write_response(&mut s).await;
        assert_eq!(s.io.writes, 0, "the response was kept back");
        assert!(sent(&mut peer).await.is_empty());

        s.write_all(WELCOME).await.expect("write");
        assert_eq!(s.io.writes, 1, "response and message in one write");
        assert_eq!(sent(&mut peer).await, [RESPONSE, WELCOME].concat());

        // Once out, the stream lets go of the handle and writes straight through.
        assert!(s.hold.is_none());
        assert_eq!(Arc::strong_count(&hold), 1);
        s.write_all(b"next").await.expect("write");
        assert_eq!(s.io.writes, 2);
        assert_eq!(sent(&mut peer).await, b"next");
    }

    #[tokio::test]
    async fn a_socket_taking_a_few_bytes_at_a_time_gets_every_byte_in_order() {
        let (mut s, mut peer, hold) = holding(7);
        hold.engage();
        write_response(&mut s).await;
        // The held bytes go first, a few at a time; the message follows them, cut
        // wherever the socket cuts it; `write_all` sees only the message's bytes.
        s.write_all(WELCOME).await.expect("write_all");
        s.write_all(b"more").await.expect("write_all");
        assert_eq!(sent(&mut peer).await, [RESPONSE, WELCOME, b"more"].concat());
        assert!(s.io.writes > (RESPONSE.len() + WELCOME.len()) / 7);
    }

    #[tokio::test]
    async fn a_held_response_with_no_message_after_it_goes_out_at_the_next_read_or_flush() {
        // A WebSocket whose handler sends nothing: the task's first read sends it.
        let (mut s, mut peer, hold) = holding(usize::MAX);
        hold.engage();
        write_response(&mut s).await;
        let mut buf = [0u8; 16];
        assert!(
            s.read(&mut buf).now_or_never().is_none(),
            "nothing to read yet"
        );
        assert_eq!(sent(&mut peer).await, RESPONSE);

        // Anyone flushing again sends it too.
        let (mut s, mut peer, hold) = holding(usize::MAX);
        hold.engage();
        write_response(&mut s).await;
        s.flush().await.expect("flush");
        assert_eq!(sent(&mut peer).await, RESPONSE);

        // And a shutdown sends it before the end of the stream.
        let (mut s, mut peer, hold) = holding(3);
        hold.engage();
        write_response(&mut s).await;
        s.shutdown().await.expect("shutdown");
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.expect("read to end");
        assert_eq!(all, RESPONSE);
    }

    #[tokio::test]
    async fn nothing_is_kept_back_unless_an_upgrade_asks() {
        let (mut s, mut peer, _hold) = holding(usize::MAX);
        write_response(&mut s).await;
        assert_eq!(
            s.io.writes, 1,
            "an HTTP response is written when it is written"
        );
        assert_eq!(sent(&mut peer).await, RESPONSE);
        s.write_all(WELCOME).await.expect("write");
        assert_eq!(s.io.writes, 2);
        assert_eq!(sent(&mut peer).await, WELCOME);
        assert!(s.hold.is_some(), "a later request may still upgrade");

        // A compressed upgrade dismisses the handle: the stream lets go of it.
        let (mut s, mut peer, hold) = holding(usize::MAX);
        hold.dismiss();
        write_response(&mut s).await;
        assert_eq!(s.io.writes, 1);
        assert_eq!(sent(&mut peer).await, RESPONSE);
        assert!(s.hold.is_none());
        assert_eq!(Arc::strong_count(&hold), 1);
    }

    #[tokio::test]
    async fn bytes_read_ahead_are_read_first_and_a_shared_handle_stays_for_an_upgrade() {
        // Handed on to hyper: the head the listener read comes first, then the
        // socket; the Peer hyper's connection holds can still engage the hold.
        let (a, mut peer) = tokio::io::duplex(1 << 16);
        let chunky = Chunky {
            io: a,
            max: usize::MAX,
            writes: 0,
        };
        let mut s = Stream::accepted(chunky, b"GET / HTTP/1.1\r\n".to_vec(), Ticket::default());
        let shared = s.hold.clone().expect("a handle");
        peer.write_all(b"\r\n").await.expect("write");
        let mut got = vec![0u8; 5];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(got, b"GET /");
        let mut rest = Vec::new();
        let mut buf = [0u8; 64];
        while rest.len() < 13 {
            let n = s.read(&mut buf).await.expect("read");
            rest.extend_from_slice(&buf[..n]);
        }
        assert_eq!(rest, b" HTTP/1.1\r\n\r\n");
        assert!(s.hold.is_some(), "a Peer shares it: kept");
        shared.engage();
        write_response(&mut s).await;
        assert_eq!(s.io.writes, 0, "held for the first message");

        // Answered by the listener: nobody else has the handle, so it goes once
        // the bytes are read and nothing is held.
        let (a, _peer) = tokio::io::duplex(1 << 16);
        let chunky = Chunky {
            io: a,
            max: usize::MAX,
            writes: 0,
        };
        let mut s = Stream::accepted(chunky, b"frame".to_vec(), Ticket::default());
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"frame");
        assert!(s.hold.is_none());
    }
}

//! One connection: its shared state ([`Connection`], a cheap handle anyone may hold)
//! and the task that owns its socket (`Driver`).
//!
//! Each socket has exactly one task, a hand-written future (`Driver`), which both
//! reads and writes it in one `poll`: it drains the send queue into the socket's
//! write buffer, flushes, and reads the next message, all on one waker. There is no
//! second task, no channel between a reader and a writer, and no timer while the
//! connection is healthy (heartbeats come from the per-Hub sweeper in `heartbeat`).
//! A timer exists only while a close handshake is in flight.
//!
//! The task is the only owner of the socket and of the registry entry's lifetime:
//! it unregisters on every exit path (clean close, error, kill, panic) in its
//! `Drop`. It never waits on anything but its own socket; handler hooks run
//! synchronously inside its `poll`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::auth::Identity;
use crate::handler::Deferred;
use crate::hub::Hub;
use crate::memory::UserData;
use crate::queue::{Pushed, SendQueue};
use crate::rate::{Bucket, Verdict};
use crate::transport::{self, Batch, Incoming, Outgoing, ReadError, Slot, Socket};

/// Why a connection ended. Carried in logs, metrics and `on_disconnect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The client sent a Close frame.
    ClientClosed,
    /// The socket ended without a close handshake (reset, EOF).
    ConnectionLost,
    /// The application closed it (`Hub::disconnect`, `/api/disconnect`).
    ServerClosed,
    /// A newer connection with the same client_id replaced it (4002).
    Replaced,
    /// Nothing received for `heartbeat_interval + heartbeat_timeout` (4001).
    HeartbeatTimeout,
    /// Send queue stayed full under the `disconnect` policy (4000).
    SlowConsumer,
    /// The client broke the WebSocket or Keel protocol (1002, 1003, 1007, 1009).
    ProtocolError,
    /// Graceful shutdown (1012).
    Shutdown,
    /// Closed to bring total memory under `max_total_memory` (1013).
    MemoryEvicted,
    /// The handler panicked on one of its messages (1011).
    InternalError,
    /// Authentication failed, timed out, or the credential expired without a
    /// `refresh` (1008).
    AuthFailed,
    /// Kept sending over `rate_limit_messages` for `rate_limit_close_after` (4003).
    RateLimited,
}

impl DisconnectReason {
    /// Every reason, for metrics.
    pub const ALL: [DisconnectReason; 12] = [
        DisconnectReason::ClientClosed,
        DisconnectReason::ConnectionLost,
        DisconnectReason::ServerClosed,
        DisconnectReason::Replaced,
        DisconnectReason::HeartbeatTimeout,
        DisconnectReason::SlowConsumer,
        DisconnectReason::ProtocolError,
        DisconnectReason::Shutdown,
        DisconnectReason::MemoryEvicted,
        DisconnectReason::InternalError,
        DisconnectReason::AuthFailed,
        DisconnectReason::RateLimited,
    ];

    /// The name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientClosed => "client_closed",
            DisconnectReason::ConnectionLost => "connection_lost",
            DisconnectReason::ServerClosed => "server_closed",
            DisconnectReason::Replaced => "replaced",
            DisconnectReason::HeartbeatTimeout => "heartbeat_timeout",
            DisconnectReason::SlowConsumer => "slow_consumer",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::MemoryEvicted => "memory_evicted",
            DisconnectReason::InternalError => "internal_error",
            DisconnectReason::AuthFailed => "auth_failed",
            DisconnectReason::RateLimited => "rate_limited",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// A message handed to [`Handler::on_message`](crate::Handler::on_message).
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    /// A text message (valid UTF-8).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

/// Counters a connection's own task writes (uncontended); folded into the Hub's
/// totals when it ends. In this order (`repr(C)`): the outbound pair is written
/// with every batch a fan-out sends, and sits next to the queue (see `ConnInner`).
#[derive(Default)]
#[repr(C)]
pub(crate) struct ConnStats {
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

/// A connection's identity: the registry key and the session it carries.
#[derive(Clone)]
pub(crate) struct Ident {
    pub(crate) client_id: Arc<str>,
    /// A UUID; survives disconnects through resume (a connection that replaced
    /// another by client_id alone gets a new one).
    pub(crate) session_id: u128,
    /// The generation the session's current reconnect token carries; a resume
    /// must present exactly this one, and moves it on.
    pub(crate) generation: u64,
}

/// What a credential said about a connection; absent for anonymous connections.
pub(crate) struct AuthState {
    /// Who it is (None while it waits for a first-message `auth`).
    pub(crate) identity: Option<Identity>,
    /// Set once `token_expired` was sent: closed with 1008 at this instant unless
    /// a `refresh` comes first.
    pub(crate) refresh_deadline: Option<Instant>,
}

impl AuthState {
    /// The state of a connection that authenticated as `identity` (or, with
    /// `None`, waits for its first-message `auth`).
    pub(crate) fn boxed(identity: Option<Identity>) -> Option<Box<AuthState>> {
        Some(Box::new(AuthState {
            identity,
            refresh_deadline: None,
        }))
    }
}

/// A connection's shared state. `repr(C)`, in this order: a fan-out touches
/// every member's queue, and each member's task then touches its queue, kill
/// flag and outbound counters; with those first they share the first 128 bytes
/// (left to itself, the compiler put the counters 160 bytes and the flag 230
/// bytes past the queue), and a broadcast to ten thousand cold connections waits
/// for one or two cache misses fewer per member. `close_reason` fills the gap
/// after the flags, so the struct is no larger than before (336 bytes).
#[repr(C)]
pub(crate) struct ConnInner {
    pub(crate) queue: SendQueue,
    /// Set to end the task at once, without a close handshake.
    pub(crate) kill: AtomicBool,
    /// Set when unregistering starts: a channel join racing with it undoes itself.
    pub(crate) gone: AtomicBool,
    /// Set when a resume on another connection took this one's session over: its
    /// end must not leave a detached copy of the session behind.
    pub(crate) taken_over: AtomicBool,
    /// Why the server closed it, if it did; decided by whoever queued the Close.
    pub(crate) close_reason: Mutex<Option<(DisconnectReason, u16)>>,
    pub(crate) stats: ConnStats,
    /// Milliseconds since the Hub started at the last inbound frame; read by the sweeper.
    pub(crate) last_seen: AtomicU64,
    /// Whatever the application attached at connect time (presence info, claims).
    /// Boxed: most connections carry none, and a `Value` inline costs 32 bytes each.
    pub(crate) metadata: Option<Box<serde_json::Value>>,
    pub(crate) connected_at: Instant,
    /// Channels this connection is in, for cleanup and `get_client_rooms`.
    /// A Vec, not a set: a connection is in few channels, and an empty Vec is 24
    /// bytes where an empty `HashSet` with its hasher is 48.
    pub(crate) channels: Mutex<Vec<Arc<str>>>,
    /// Lazily allocated: most connections never store user data.
    pub(crate) user_data: Mutex<Option<Box<UserData>>>,
    /// Boxed and optional: anonymous connections pay 8 bytes for it.
    pub(crate) auth: Mutex<Option<Box<AuthState>>>,
    /// The client address counted against per-address limits (set only when
    /// they are on).
    pub(crate) peer: Option<Box<std::net::IpAddr>>,
    /// The message rate limit's bucket, made at the first message when a limit
    /// is configured. Here and not in the `Driver`: the task's allocation is
    /// padded to 128 bytes, and 8 more bytes there cost 128 per connection.
    pub(crate) bucket: Mutex<Option<Box<Bucket>>>,
    /// Who the client is and which session it is in. Changes at most on a resume,
    /// while the connection is briefly out of the registry and of every channel.
    pub(crate) ident: RwLock<Ident>,
}

/// A handle to one live connection. Cheap to clone; holding one does not keep the
/// socket open.
#[derive(Clone)]
pub struct Connection {
    pub(crate) inner: Arc<ConnInner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("client_id", &self.client_id())
            .field("session_id", &self.session_id())
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(crate) fn new(
        client_id: Arc<str>,
        metadata: serde_json::Value,
        auth: Option<Box<AuthState>>,
        peer: Option<std::net::IpAddr>,
        now_ms: u64,
    ) -> Self {
        Connection {
            inner: Arc::new(ConnInner {
                ident: RwLock::new(Ident {
                    client_id,
                    session_id: rand::random(),
                    generation: 0,
                }),
                metadata: (!metadata.is_null()).then(|| Box::new(metadata)),
                connected_at: Instant::now(),
                last_seen: AtomicU64::new(now_ms),
                queue: SendQueue::default(),
                kill: AtomicBool::new(false),
                gone: AtomicBool::new(false),
                taken_over: AtomicBool::new(false),
                close_reason: Mutex::new(None),
                channels: Mutex::new(Default::default()),
                user_data: Mutex::new(None),
                auth: Mutex::new(auth),
                peer: peer.map(Box::new),
                bucket: Mutex::new(None),
                stats: ConnStats::default(),
            }),
        }
    }

    /// The client's id (it changes only when the connection resumes a session).
    pub fn client_id(&self) -> Arc<str> {
        self.inner.ident.read().client_id.clone()
    }

    /// The session id (a UUID): new per connection, carried over by a resume.
    pub fn session_id(&self) -> String {
        uuid::Uuid::from_u128(self.inner.ident.read().session_id).to_string()
    }

    pub(crate) fn ident(&self) -> Ident {
        self.inner.ident.read().clone()
    }

    /// What the application attached at connect time.
    pub fn metadata(&self) -> &serde_json::Value {
        static NULL: serde_json::Value = serde_json::Value::Null;
        self.inner.metadata.as_deref().unwrap_or(&NULL)
    }

    /// Who the connection authenticated as; `None` for an anonymous connection
    /// or one still waiting for its first-message `auth`.
    pub fn identity(&self) -> Option<Identity> {
        self.inner
            .auth
            .lock()
            .as_ref()
            .and_then(|a| a.identity.clone())
    }

    /// Whether the connection authenticated with a credential.
    pub fn is_authenticated(&self) -> bool {
        self.inner
            .auth
            .lock()
            .as_ref()
            .is_some_and(|a| a.identity.is_some())
    }

    /// Whether the connection waits for a first-message `auth`.
    pub fn awaiting_auth(&self) -> bool {
        self.inner
            .auth
            .lock()
            .as_ref()
            .is_some_and(|a| a.identity.is_none())
    }

    /// What presence shows about the client: its credential's `info`, or the
    /// metadata given at connect time.
    pub fn info(&self) -> serde_json::Value {
        match self
            .inner
            .auth
            .lock()
            .as_ref()
            .and_then(|a| a.identity.as_ref())
        {
            Some(id) => id.info.clone(),
            None => self.metadata().clone(),
        }
    }

    /// Checks the credential's expiry (called by the sweeper): at expiry the client
    /// gets `error token_expired`; `grace` later, unless it refreshed, the
    /// connection is closed with 1008. A first-message client that has not
    /// authenticated within `auth_timeout` is closed with 1008 too.
    pub(crate) fn check_auth(
        &self,
        hub: &Hub,
        now: Instant,
        unix_s: u64,
        grace: std::time::Duration,
        auth_timeout: std::time::Duration,
    ) {
        let mut guard = self.inner.auth.lock();
        let Some(st) = guard.as_mut() else { return };
        let Some(id) = &st.identity else {
            if now.duration_since(self.inner.connected_at) >= auth_timeout {
                drop(guard);
                let err = keel_protocol::encode::error(
                    keel_protocol::ErrorCode::Unauthorized,
                    "no auth within auth_timeout",
                    None,
                );
                self.send_then_close(
                    DisconnectReason::AuthFailed,
                    err,
                    keel_protocol::close::POLICY_VIOLATION,
                    "auth timeout",
                );
            }
            return;
        };
        let Some(exp) = id.expires_at else { return };
        if unix_s < exp {
            return;
        }
        match st.refresh_deadline {
            None => {
                st.refresh_deadline = Some(now + grace);
                drop(guard);
                self.send_text(
                    hub,
                    keel_protocol::encode::error(
                        keel_protocol::ErrorCode::TokenExpired,
                        "token expired: send refresh with a new token",
                        None,
                    ),
                );
            }
            Some(deadline) if now >= deadline => {
                drop(guard);
                self.close_as(
                    DisconnectReason::AuthFailed,
                    keel_protocol::close::POLICY_VIOLATION,
                    "token expired",
                    false,
                );
            }
            Some(_) => {}
        }
    }

    /// When it connected.
    pub fn connected_at(&self) -> Instant {
        self.inner.connected_at
    }

    /// Messages dropped for this connection by the slow-consumer policy.
    pub fn dropped(&self) -> u64 {
        self.inner.stats.dropped.load(Ordering::Relaxed)
    }

    /// Whether `other` is the same connection (not merely the same client_id).
    pub fn same(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Queues a text message (already-encoded JSON, usually). Never waits on the
    /// socket; returns false if it was dropped or the connection is closing.
    pub fn send_text(&self, hub: &Hub, text: Bytes) -> bool {
        self.push(hub, Outgoing::Text(text))
    }

    /// Queues a binary message; see [`send_text`](Self::send_text).
    pub fn send_binary(&self, hub: &Hub, data: Bytes) -> bool {
        self.push(hub, Outgoing::Binary(data))
    }

    pub(crate) fn push(&self, hub: &Hub, item: Outgoing) -> bool {
        matches!(
            self.push_counted(hub, item),
            Pushed::Queued | Pushed::DroppedOldest(_)
        )
    }

    /// Queues `item`, counting what the slow-consumer policy dropped.
    pub(crate) fn push_counted(&self, hub: &Hub, item: Outgoing) -> Pushed {
        self.counted(hub, self.inner.queue.push(item, hub.limits()))
    }

    /// Queues a publication's shared frame (a text message), counting drops.
    pub(crate) fn push_shared_counted(&self, hub: &Hub, frame: &Arc<Bytes>) -> Pushed {
        self.counted(hub, self.inner.queue.push_shared(frame, hub.limits()))
    }

    /// Counts what a push's slow-consumer policy dropped, and hands the result on.
    fn counted(&self, hub: &Hub, pushed: Pushed) -> Pushed {
        match pushed {
            Pushed::DroppedOldest(n) => self.count_drops(hub, n as u64),
            Pushed::DroppedNewest => self.count_drops(hub, 1),
            Pushed::Queued | Pushed::Closed => {}
        }
        pushed
    }

    fn count_drops(&self, hub: &Hub, n: u64) {
        if n > 0 {
            self.inner.stats.dropped.fetch_add(n, Ordering::Relaxed);
            hub.metrics().dropped(hub.limits().policy, n);
        }
    }

    /// Starts a close handshake with `code`: what is queued goes out first, then
    /// the Close. Returns false if a close was already under way.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        self.close_as(DisconnectReason::ServerClosed, code, reason, false)
    }

    pub(crate) fn close_as(
        &self,
        why: DisconnectReason,
        code: u16,
        reason: &str,
        discard: bool,
    ) -> bool {
        if self.inner.queue.close(code, reason, discard) {
            self.inner.close_reason.lock().get_or_insert((why, code));
            true
        } else {
            false
        }
    }

    /// Queues `text` (an `error`, typically), then a Close with `code`, with
    /// nothing in between. A 1008 counts as an auth failure in metrics and logs.
    pub fn send_and_close(&self, text: Bytes, code: u16, reason: &str) -> bool {
        let why = if code == keel_protocol::close::POLICY_VIOLATION {
            DisconnectReason::AuthFailed
        } else {
            DisconnectReason::ServerClosed
        };
        self.send_then_close(why, text, code, reason)
    }

    /// Queues `text`, then a Close, with nothing in between.
    pub(crate) fn send_then_close(
        &self,
        why: DisconnectReason,
        text: Bytes,
        code: u16,
        reason: &str,
    ) -> bool {
        if self
            .inner
            .queue
            .push_then_close(Outgoing::Text(text), code, reason)
        {
            self.inner.close_reason.lock().get_or_insert((why, code));
            true
        } else {
            false
        }
    }

    /// Ends the connection at once, without a close handshake.
    pub(crate) fn kill(&self, why: DisconnectReason, code: u16) {
        self.inner.close_reason.lock().get_or_insert((why, code));
        self.inner.kill.store(true, Ordering::Release);
        self.inner.queue.wake();
    }

    /// Bytes queued plus user data: what `max_total_memory` counts for this connection.
    pub(crate) fn memory(&self) -> usize {
        let queued = self.inner.queue.depth().0;
        let user = self.inner.user_data.lock().as_ref().map_or(0, |u| u.bytes);
        queued + user
    }
}

/// Drives one connection until it ends: a hand-written future, so the task holds
/// exactly these fields (176 bytes with the plain socket, most of it the socket) and no
/// compiler-generated state machine around them. Registration already happened;
/// dropping the driver, however it ends (completion, panic, runtime shutdown),
/// unregisters.
pub(crate) struct Driver {
    hub: Hub,
    conn: Connection,
    socket: Socket,
    /// Our Close frame has been handed to the socket: send nothing more.
    close_sent: bool,
    /// Runs only while a close handshake is in flight.
    close_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// How it ended as this task saw it, if the server did not decide it first.
    end: (DisconnectReason, u16),
    /// A message's handling that waits (see [`Deferred`]): finished before the
    /// next message is read.
    deferred: Option<Deferred>,
}

/// Inbound messages handled per poll before yielding to other tasks.
const BUDGET: usize = 64;

/// Frames taken from the send queue per queue lock (and per readiness check):
/// what one vectored write carries under load.
const WRITE_BATCH: usize = transport::BATCH_MAX;

/// Bytes moved per queue lock, about; bounds the write buffer's overshoot.
const WRITE_BATCH_BYTES: usize = 32 * 1024;

enum Step {
    Continue,
    Stop,
}

impl Driver {
    /// Registers nothing; calls `on_connect` and returns the future to spawn.
    pub(crate) fn new(hub: Hub, conn: Connection, socket: Socket) -> Self {
        let handler = hub.handler();
        let deferred =
            match std::panic::catch_unwind(AssertUnwindSafe(|| handler.on_connect(&hub, &conn))) {
                Ok(deferred) => deferred,
                Err(_) => {
                    handler_panicked(&conn);
                    None
                }
            };
        Driver {
            hub,
            conn,
            socket,
            close_sent: false,
            close_timer: None,
            end: (DisconnectReason::ConnectionLost, 1006),
            deferred,
        }
    }

    fn start_close_timer(&mut self) {
        if self.close_timer.is_none() {
            let t = self.hub.config().close_timeout;
            self.close_timer = Some(Box::pin(tokio::time::sleep(t)));
        }
    }

    /// Takes queued frames in batches (up to `WRITE_BATCH` frames or about
    /// `WRITE_BATCH_BYTES` per queue lock) and hands each batch to the socket,
    /// which writes it at once if it can and buffers what it cannot; then flushes
    /// what is buffered. Stops when the queue is empty, the socket is full, or our
    /// Close is out. Returns whether the connection is closing (a Close queued).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        let inner = &self.conn.inner;
        let hub = &self.hub;
        let mut closing = None;
        while !self.close_sent {
            match transport::poll_ready(&mut self.socket, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(())) => return Err(()),
                Poll::Pending => break,
            }
            let mut batch = Batch::new();
            let drained = inner.queue.drain_into(
                || hub.json_ping(),
                WRITE_BATCH,
                WRITE_BATCH_BYTES,
                // Never full: the drain takes at most WRITE_BATCH (= BATCH_MAX)
                // frames. Were it full, the frame would be lost, so end the
                // connection rather than carry on without it.
                |item| if batch.push(item) { Ok(()) } else { Err(()) },
            )?;
            closing = Some(drained.closing);
            if batch.len() == 0 {
                break;
            }
            let (mut messages, mut bytes) = (0, 0);
            for item in batch.iter() {
                match item {
                    Slot::Shared(b) => {
                        messages += 1;
                        bytes += b.len() as u64;
                    }
                    Slot::Own(o) => match &**o {
                        Outgoing::Text(b) | Outgoing::Binary(b) => {
                            messages += 1;
                            bytes += b.len() as u64;
                        }
                        Outgoing::Close(..) => self.close_sent = true,
                        Outgoing::Ping => {}
                    },
                }
            }
            if messages > 0 {
                inner
                    .stats
                    .messages_out
                    .fetch_add(messages, Ordering::Relaxed);
                inner.stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
            }
            transport::send_batch(&mut self.socket, cx, &mut batch)?;
            if drained.empty {
                break;
            }
        }
        if let Poll::Ready(Err(())) = transport::poll_flush(&mut self.socket, cx) {
            return Err(());
        }
        Ok(self.close_sent || closing.unwrap_or_else(|| inner.queue.is_closing()))
    }

    /// One non-waiting attempt to tell the peer why it is being cut off.
    fn send_close_now(&mut self, cx: &mut Context<'_>) {
        if let Some(close) = self.conn.inner.queue.take_close() {
            if let Poll::Ready(Ok(())) = transport::poll_ready(&mut self.socket, cx) {
                if transport::start_send(&mut self.socket, close).is_ok() {
                    let _ = transport::poll_flush(&mut self.socket, cx);
                }
            }
        }
    }

    /// Whether a data message may reach the handler under the rate limit.
    fn admit(&mut self, now_ms: u64) -> bool {
        let Some(limit) = self.hub.inner.rate.as_ref() else {
            return true;
        };
        let verdict = self
            .conn
            .inner
            .bucket
            .lock()
            .get_or_insert_with(|| Box::new(Bucket::new(limit, now_ms)))
            .check(limit, now_ms);
        match verdict {
            Verdict::Pass => true,
            Verdict::Drop { notify } => {
                self.hub
                    .metrics()
                    .rate_limited
                    .fetch_add(1, Ordering::Relaxed);
                if notify {
                    self.conn.send_text(
                        &self.hub,
                        keel_protocol::encode::error(
                            keel_protocol::ErrorCode::RateLimited,
                            "too many messages: this one was dropped",
                            None,
                        ),
                    );
                }
                false
            }
            Verdict::Close => {
                self.hub
                    .metrics()
                    .rate_limited
                    .fetch_add(1, Ordering::Relaxed);
                self.conn.close_as(
                    DisconnectReason::RateLimited,
                    keel_protocol::close::RATE_LIMITED,
                    "rate limited",
                    true,
                );
                false
            }
        }
    }

    fn on_frame(&mut self, frame: Incoming) {
        let now_ms = self.hub.now_ms();
        self.conn.inner.last_seen.store(now_ms, Ordering::Relaxed);
        if matches!(frame, Incoming::Text(_) | Incoming::Binary(_)) && !self.admit(now_ms) {
            return;
        }
        let inner = &self.conn.inner;
        match frame {
            Incoming::Text(text) => {
                count_in(inner, text.len());
                self.deferred = dispatch(&self.hub, &self.conn, Message::Text(&text));
            }
            Incoming::Binary(bytes) => {
                count_in(inner, bytes.len());
                self.deferred = dispatch(&self.hub, &self.conn, Message::Binary(&bytes));
            }
            Incoming::Control => {}
            Incoming::Close(code) => {
                // The transport answers the Close; keep polling until the socket
                // reports the end, so the answer is flushed.
                let end = (DisconnectReason::ClientClosed, code.unwrap_or(1005));
                self.end = end;
                inner.close_reason.lock().get_or_insert(end);
                self.start_close_timer();
            }
        }
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        if self.conn.inner.kill.load(Ordering::Acquire) {
            self.send_close_now(cx);
            return Poll::Ready(Step::Stop);
        }
        self.conn.inner.queue.register(cx.waker());
        let Ok(closing) = self.poll_write(cx) else {
            return Poll::Ready(Step::Stop);
        };
        // The close deadline runs from when the close was asked for, not from when
        // the Close frame got out: a peer that does not read may never take it.
        if closing {
            self.start_close_timer();
        }
        if let Some(timer) = self.close_timer.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Step::Stop);
            }
        }
        if let Some(deferred) = self.deferred.as_mut() {
            match std::panic::catch_unwind(AssertUnwindSafe(|| deferred.as_mut().poll(cx))) {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(())) => self.deferred = None,
                Err(_) => {
                    self.deferred = None;
                    handler_panicked(&self.conn);
                }
            }
            // Its answers were queued: write them before reading on.
            return Poll::Ready(Step::Continue);
        }
        match transport::poll_read(&mut self.socket, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(frame)) => {
                self.on_frame(frame);
                Poll::Ready(Step::Continue)
            }
            Poll::Ready(Err(ReadError::Closed)) => Poll::Ready(Step::Stop),
            Poll::Ready(Err(ReadError::Protocol(code, detail))) => {
                tracing::debug!(client_id = %self.conn.client_id(), code, %detail, "protocol error");
                // Some layers of the transport answer with a Close themselves, some
                // do not: queue ours; if theirs went first, the socket refuses the
                // second and the connection ends with theirs.
                self.conn
                    .close_as(DisconnectReason::ProtocolError, code, &detail, true);
                Poll::Ready(Step::Continue)
            }
        }
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        for _ in 0..BUDGET {
            match this.step(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Step::Stop) => return Poll::Ready(()),
                Poll::Ready(Step::Continue) => {}
            }
        }
        // A busy client: let other connections run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let (reason, code) = self.conn.inner.close_reason.lock().unwrap_or(self.end);
        let reason = if std::thread::panicking() {
            DisconnectReason::InternalError
        } else {
            reason
        };
        self.hub.unregister(&self.conn, reason, code);
    }
}

fn count_in(inner: &ConnInner, len: usize) {
    inner.stats.messages_in.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .bytes_in
        .fetch_add(len as u64, Ordering::Relaxed);
}

/// Hands a message to the handler; a panic closes this connection with 1011 and
/// touches nothing else. Returns the handler's deferred work, if any.
fn dispatch(hub: &Hub, conn: &Connection, msg: Message<'_>) -> Option<Deferred> {
    let handler = hub.handler();
    match std::panic::catch_unwind(AssertUnwindSafe(|| handler.on_message(hub, conn, msg))) {
        Ok(deferred) => deferred,
        Err(_) => {
            handler_panicked(conn);
            None
        }
    }
}

fn handler_panicked(conn: &Connection) {
    tracing::error!(client_id = %conn.client_id(), "handler panicked; closing the connection with 1011");
    conn.close_as(
        DisconnectReason::InternalError,
        keel_protocol::close::INTERNAL_ERROR,
        "internal error",
        true,
    );
}

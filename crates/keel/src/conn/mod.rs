//! One connection's shared state: [`Connection`], a cheap handle anyone may hold,
//! with its bounded send queue (`queue`), its message rate limit (`rate`), its
//! identity, session and user data.
//!
//! Sending is queuing: [`Connection::send_text`] pushes onto the queue under the
//! slow-consumer policy of the connection's [`Delivery`] context and returns at
//! once; the connection's task (`hub::driver`) writes the socket.
//!
//! What it must not do: know the Hub, the registry or channels beyond the list of
//! names the connection is in, or wait on anything. The Hub hands each connection
//! its delivery context when it makes it; that is all a push needs.

pub(crate) mod queue;
pub(crate) mod rate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::config::SlowConsumerPolicy;
use crate::transport::Outgoing;
use queue::{Limits, Pushed, SendQueue};
use rate::Bucket;

/// What pushing onto a connection's queue needs: the queue limits and the
/// counters of what the slow-consumer policy dropped. One per Hub, shared by its
/// connections.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) limits: Limits,
    /// When the Hub started: the zero of `last_seen` and `connected_ms`.
    pub(crate) started: Instant,
    dropped_oldest: AtomicU64,
    dropped_newest: AtomicU64,
}

impl Delivery {
    pub(crate) fn new(limits: Limits) -> Self {
        Delivery {
            limits,
            started: Instant::now(),
            dropped_oldest: AtomicU64::new(0),
            dropped_newest: AtomicU64::new(0),
        }
    }

    fn dropped(&self, n: u64) {
        match self.limits.policy {
            SlowConsumerPolicy::DropOldest => &self.dropped_oldest,
            _ => &self.dropped_newest,
        }
        .fetch_add(n, Ordering::Relaxed);
    }

    /// Messages dropped by `drop_oldest` and by `drop_newest` (or `disconnect`).
    pub(crate) fn dropped_counts(&self) -> (u64, u64) {
        (
            self.dropped_oldest.load(Ordering::Relaxed),
            self.dropped_newest.load(Ordering::Relaxed),
        )
    }
}

/// Who a client is, once its credential checked out.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The client id (a JWT's `sub`).
    pub client_id: String,
    /// What presence shows about the client (a JWT's `info` claim).
    #[serde(default)]
    pub info: serde_json::Value,
    /// Channels the client may subscribe to (a JWT's `channels` claim); `None`:
    /// whatever the namespace rules allow.
    #[serde(default)]
    pub channels: Option<Vec<String>>,
    /// When the credential expires, seconds since the Unix epoch (`exp`); `None`
    /// for a ticket, which is spent at the upgrade.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

/// One connection's user data.
#[derive(Debug)]
pub(crate) struct UserData {
    pub(crate) map: HashMap<String, serde_json::Value>,
    /// Estimated bytes held (keys plus JSON sizes of values).
    pub(crate) bytes: usize,
    /// When data was first written, for the `oldest` eviction policy.
    pub(crate) first_write: Instant,
}

impl UserData {
    pub(crate) fn new() -> Self {
        UserData {
            map: HashMap::new(),
            bytes: 0,
            first_write: Instant::now(),
        }
    }
}

/// The estimated size of one user-data entry: the key plus the value's JSON.
pub(crate) fn entry_size(key: &str, value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    let _ = serde_json::to_writer(&mut c, value);
    key.len() + c.0
}

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
    /// Milliseconds since the Hub started when it connected (a `u64` and not an
    /// `Instant`: 8 bytes fewer, which keeps the struct at 336 bytes).
    pub(crate) connected_ms: u64,
    /// Queue limits, drop counters and the Hub's start, the Hub's. Here, beside
    /// `connected_ms`, so the two take the 16 bytes the `Instant` took and the
    /// fields after them keep their alignment.
    pub(crate) delivery: Arc<Delivery>,
    /// Channels this connection is in, for cleanup and `Hub::channels_of`.
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
        delivery: Arc<Delivery>,
    ) -> Self {
        Connection {
            inner: Arc::new(ConnInner {
                ident: RwLock::new(Ident {
                    client_id,
                    session_id: rand::random(),
                    generation: 0,
                }),
                metadata: (!metadata.is_null()).then(|| Box::new(metadata)),
                connected_ms: now_ms,
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
                delivery,
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
        now: Instant,
        unix_s: u64,
        grace: std::time::Duration,
        auth_timeout: std::time::Duration,
    ) {
        let mut guard = self.inner.auth.lock();
        let Some(st) = guard.as_mut() else { return };
        let Some(id) = &st.identity else {
            if now.duration_since(self.connected_instant()) >= auth_timeout {
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
                self.send_text(keel_protocol::encode::error(
                    keel_protocol::ErrorCode::TokenExpired,
                    "token expired: send refresh with a new token",
                    None,
                ));
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
    pub fn connected_at(&self) -> std::time::Instant {
        self.connected_instant().into_std()
    }

    /// When it connected, on the library's clock.
    pub(crate) fn connected_instant(&self) -> Instant {
        self.inner.delivery.started + std::time::Duration::from_millis(self.inner.connected_ms)
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
    pub fn send_text(&self, text: Bytes) -> bool {
        self.push(Outgoing::Text(text))
    }

    /// Queues a binary message; see [`send_text`](Self::send_text).
    pub fn send_binary(&self, data: Bytes) -> bool {
        self.push(Outgoing::Binary(data))
    }

    pub(crate) fn push(&self, item: Outgoing) -> bool {
        matches!(
            self.push_counted(item),
            Pushed::Queued | Pushed::DroppedOldest(_)
        )
    }

    /// Queues `item`, counting what the slow-consumer policy dropped.
    pub(crate) fn push_counted(&self, item: Outgoing) -> Pushed {
        let limits = &self.inner.delivery.limits;
        self.counted(self.inner.queue.push(item, limits))
    }

    /// Queues a publication's shared frame (a text message), counting drops.
    pub(crate) fn push_shared_counted(&self, frame: &Arc<Bytes>) -> Pushed {
        self.push_shared_with(&self.inner.delivery, frame)
    }

    /// [`push_shared_counted`](Self::push_shared_counted) with the delivery
    /// context given: what a fan-out calls for every member, so it does not load
    /// each connection's own pointer to the same context (a cache line a member's
    /// queue does not share).
    pub(crate) fn push_shared_with(&self, delivery: &Delivery, frame: &Arc<Bytes>) -> Pushed {
        self.counted_with(
            delivery,
            self.inner.queue.push_shared(frame, &delivery.limits),
        )
    }

    /// Counts what a push's slow-consumer policy dropped, and hands the result on.
    fn counted(&self, pushed: Pushed) -> Pushed {
        self.counted_with(&self.inner.delivery, pushed)
    }

    fn counted_with(&self, delivery: &Delivery, pushed: Pushed) -> Pushed {
        let n = match pushed {
            Pushed::DroppedOldest(n) => n as u64,
            Pushed::DroppedNewest => 1,
            Pushed::Queued | Pushed::Closed => 0,
        };
        if n > 0 {
            self.inner.stats.dropped.fetch_add(n, Ordering::Relaxed);
            delivery.dropped(n);
        }
        pushed
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
    /// nothing in between. `why` is what metrics and logs count the disconnect as
    /// ([`DisconnectReason::AuthFailed`] for a refused credential, say).
    pub fn send_and_close(
        &self,
        why: DisconnectReason,
        text: Bytes,
        code: u16,
        reason: &str,
    ) -> bool {
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

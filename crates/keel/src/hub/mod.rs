//! [`Hub`]: the public face of the library, and its connection registry.
//!
//! A Hub is a value: cheap to clone (an `Arc` inside), many per process, no global
//! state. This file holds the Hub itself, the connect path and the registry (a
//! sharded map of client_id to [`Connection`]); its other parts are submodules:
//! the connection task (`driver`), local fan-out and the last hop (`fanout`),
//! sessions and resume (`sessions`), the sweeper (`sweeper`), user data and
//! eviction (`user_data`), graceful shutdown (`shutdown`), and the application's
//! hooks (`handler`). Channel streams live in the [`Broker`] the Hub was given.
//!
//! What it must not do: await a socket (sending is queuing), hold a lock across an
//! await, or call a hook while holding one of its locks.

pub(crate) mod driver;
pub(crate) mod fanout;
pub(crate) mod handler;
pub(crate) mod sessions;
pub(crate) mod shutdown;
pub(crate) mod sweeper;
pub(crate) mod user_data;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::Response;
use bytes::Bytes;
use parking_lot::RwLock;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::PresenceEntry;
use crate::broker::{
    Broker, BrokerLimits, Deliver, Delivered, DetachedSession, History, HistoryQuery, MemoryBroker,
    NodeId, Publication, StreamPosition, StreamPublication, StreamRules,
};
use crate::config::Config;
use crate::conn::queue::Limits;
use crate::conn::{AuthState, Connection, Delivery, DisconnectReason, UserData};
use crate::error::{Error, ErrorKind, Result};
use crate::hub::fanout::{Fanout, Subscribed};
use crate::hub::handler::{Handler, NoopHandler};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::policy::auth::Identity;
use crate::policy::token::TokenSigner;
use crate::transport::Socket;
use crate::transport::{Outgoing, Transport, Upgrade};

type Shard = RwLock<HashMap<Arc<str>, Connection>>;

pub(crate) struct HubInner {
    pub(crate) config: Config,
    /// Queue limits and drop counters, shared with every connection.
    pub(crate) delivery: Arc<Delivery>,
    /// The per-connection message rate limit, if one is configured.
    pub(crate) rate: Option<crate::conn::rate::RateLimit>,
    /// Per-address connection caps and rates, if configured.
    pub(crate) ip_limits: Option<crate::policy::ip_limits::IpLimits>,
    handler: Arc<dyn Handler>,
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    /// This node's channel members and the last hop of delivery.
    pub(crate) fanout: Fanout,
    /// Channel streams: offsets, epochs, history, cross-node delivery.
    pub(crate) broker: Arc<dyn Broker>,
    /// This Hub's sink in the broker.
    node: NodeId,
    /// The key reconnect tokens are signed with.
    pub(crate) signer: TokenSigner,
    pub(crate) metrics: Metrics,
    /// The bounds on connections until they are WebSockets, for its listener.
    gate: crate::listener::Gate,
    transport: Transport,
    /// Connections registered plus upgrades answered but not yet registered; what
    /// `max_connections` is checked against.
    reserved: AtomicUsize,
    /// Sum of all connections' user-data bytes.
    pub(crate) user_data_bytes: AtomicUsize,
    pub(crate) draining: AtomicBool,
    running: AtomicBool,
    /// Tracks connection tasks, so shutdown can wait for them (axum does not).
    pub(crate) tasks: TaskTracker,
    /// Stops the background sweeper.
    pub(crate) stop: CancellationToken,
    /// The JSON `ping` envelope of the current heartbeat round, encoded once by the
    /// sweeper and shared by every connection that sends one.
    pub(crate) json_ping: parking_lot::Mutex<Bytes>,
    /// The broker's last answer to `usage`, for a broker that cannot answer at once.
    last_usage: parking_lot::Mutex<crate::broker::BrokerUsage>,
}

impl Drop for HubInner {
    fn drop(&mut self) {
        self.broker.detach(self.node);
    }
}

/// A Hub's delivery sink in its broker. Weak: the broker must not keep a Hub
/// alive, and a Hub being dropped delivers nothing.
struct NodeSink(std::sync::Weak<HubInner>);

impl Deliver for NodeSink {
    fn deliver(&self, publication: &Arc<StreamPublication>) -> Delivered {
        match self.0.upgrade() {
            Some(inner) => {
                let hub = Hub { inner };
                hub.inner.fanout.deliver(&hub.inner.delivery, publication)
            }
            None => Delivered::default(),
        }
    }

    fn signal(&self, signal: &crate::broker::Signal) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let hub = Hub { inner };
        match signal {
            crate::broker::Signal::Disconnect {
                client_id,
                code,
                reason,
            } => {
                // Not here: another node has it, or nobody does.
                let _ = hub.disconnect_with(client_id, *code, reason);
            }
        }
    }
}

/// A channel's rules, from its namespace or the top-level options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelRules {
    /// History size and TTL, handed to the broker.
    pub(crate) stream: StreamRules,
    /// Whether joins and leaves are published into the stream.
    pub(crate) presence_events: bool,
}

/// The connection hub. See the crate documentation for a tour.
#[derive(Clone)]
pub struct Hub {
    pub(crate) inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("connections", &self.connection_count())
            .finish_non_exhaustive()
    }
}

/// What a broadcast did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BroadcastResult {
    /// Connections the message was queued to.
    pub sent: usize,
    /// Connections whose queue dropped a message for it (it or an older one).
    pub dropped: usize,
    /// Connections that could not take it (closing, or `drop_newest` refused it).
    pub failed: usize,
}

impl Hub {
    /// A Hub with the default handler (binary frames closed with 1003, nothing else
    /// done with messages). Call [`start`](Self::start) inside a tokio runtime.
    pub fn new(config: Config) -> Self {
        Self::with_handler(config, NoopHandler)
    }

    /// A Hub whose connections call `handler`'s hooks.
    pub fn with_handler(config: Config, handler: impl Handler) -> Self {
        let broker = Arc::new(
            MemoryBroker::new(config.num_shards).with_limits(BrokerLimits {
                max_history_bytes: config.max_history_memory,
                max_channels: config.max_channels,
                max_sessions: config.max_detached_sessions,
                max_presence: config.max_presence_entries,
                ..BrokerLimits::default()
            }),
        );
        Self::with_broker(config, handler, broker)
    }

    /// A Hub whose channel streams live in `broker`: the default is a
    /// [`MemoryBroker`] of its own; Hubs that share one broker share channels
    /// (offsets, history, delivery), as the nodes of a cluster do.
    pub fn with_broker(config: Config, handler: impl Handler, broker: Arc<dyn Broker>) -> Self {
        let shards = config.num_shards.max(1);
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<HubInner>| {
            let node = broker.attach(Arc::new(NodeSink(weak.clone())));
            HubInner {
                delivery: Arc::new(Delivery::new(Limits {
                    max_messages: config.send_queue_max_messages,
                    max_bytes: config.send_queue_max_bytes,
                    policy: config.slow_consumer_policy,
                })),
                rate: crate::conn::rate::RateLimit::from_config(&config),
                ip_limits: crate::policy::ip_limits::IpLimits::from_config(&config),
                handler: Arc::new(handler),
                shards: (0..shards).map(|_| RwLock::default()).collect(),
                hasher: Default::default(),
                fanout: Fanout::new(shards),
                broker,
                node,
                signer: TokenSigner::new(config.reconnect_secret.as_deref()),
                metrics: Metrics::default(),
                gate: crate::listener::Gate::new(
                    config.handshake_timeout,
                    config.max_pending_connections,
                ),
                transport: Transport::new(&config),
                reserved: AtomicUsize::new(0),
                user_data_bytes: AtomicUsize::new(0),
                draining: AtomicBool::new(false),
                running: AtomicBool::new(false),
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
                json_ping: parking_lot::Mutex::new(keel_protocol::encode::ping()),
                last_usage: parking_lot::Mutex::default(),
                config,
            }
        });
        Hub { inner }
    }

    /// Starts the background sweeper (heartbeats, timeouts, slow consumers, memory,
    /// history expiry). Idempotent; must be called inside a tokio runtime.
    pub fn start(&self) {
        if !self.inner.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(crate::hub::sweeper::sweeper(
                Arc::downgrade(&self.inner),
                self.inner.stop.clone(),
            ));
        }
    }

    /// The configuration the Hub was built with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The current JSON `ping` frame.
    pub(crate) fn json_ping(&self) -> Bytes {
        self.inner.json_ping.lock().clone()
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The application's hooks (borrowed: no reference count touched per message).
    pub(crate) fn handler(&self) -> &dyn Handler {
        &*self.inner.handler
    }

    /// The bounds its listener keeps on connections until they are WebSockets
    /// (`handshake_timeout`, `max_pending_connections`), whose counters this Hub's
    /// metrics report: give it to [`Listener::gate`](crate::Listener::gate) and
    /// [`serve`](crate::listener::serve).
    pub fn gate(&self) -> crate::listener::Gate {
        self.inner.gate.clone()
    }

    /// The broker that holds this Hub's channel streams.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// This Hub's node in its broker.
    pub(crate) fn node(&self) -> NodeId {
        self.inner.node
    }

    /// The rules of channel `name`: its namespace's where it sets them, else the
    /// top-level options.
    pub(crate) fn channel_rules(&self, name: &str) -> ChannelRules {
        let c = &self.inner.config;
        let ns = crate::policy::permissions::namespace(&c.namespaces, name);
        ChannelRules {
            stream: StreamRules {
                history_size: ns.and_then(|n| n.history_size).unwrap_or(c.history_size),
                history_ttl: ns.and_then(|n| n.history_ttl).unwrap_or(c.history_ttl),
                history_bytes: ns
                    .and_then(|n| n.history_max_bytes)
                    .unwrap_or(c.history_max_bytes),
            },
            presence_events: ns
                .and_then(|n| n.presence_events)
                .unwrap_or(c.presence_events),
        }
    }

    /// Publishes a presence `join` or `leave` into `channel`'s stream.
    pub(crate) async fn publish_presence_event(
        &self,
        channel: &str,
        event: &str,
        client_id: &str,
        info: &Value,
    ) {
        let data = serde_json::json!({ "presence": event, "client_id": client_id, "info": info });
        let Ok(raw) = serde_json::value::to_raw_value(&data) else {
            return;
        };
        let rules = self.channel_rules(channel).stream;
        if let Err(e) = self.inner.broker.publish(channel, &raw, None, rules).await {
            tracing::warn!(channel, event, error = %e, "presence event not published");
        }
    }

    /// [`publish_presence_event`](Self::publish_presence_event) from code that
    /// cannot wait: done at once where the broker answers at once, else on a task.
    pub(crate) fn presence_event_detached(
        &self,
        channel: &str,
        event: &'static str,
        client_id: &str,
        info: Value,
    ) {
        let hub = self.clone();
        let (channel, client_id) = (channel.to_string(), client_id.to_string());
        run_detached(Box::pin(async move {
            hub.publish_presence_event(&channel, event, &client_id, &info)
                .await
        }));
    }

    /// Ends `client_id`'s presence in `channel` now (a clean leave, or a resumed
    /// session that did not take the channel back), with a `leave` event where
    /// the channel has them; from code that cannot wait.
    pub(crate) fn end_presence_detached(&self, channel: &str, client_id: &str) {
        let hub = self.clone();
        let (channel, client_id) = (channel.to_string(), client_id.to_string());
        run_detached(Box::pin(async move {
            match hub.inner.broker.presence_remove(&channel, &client_id).await {
                Ok(Some(gone)) if hub.channel_rules(&channel).presence_events => {
                    hub.publish_presence_event(&channel, "leave", &client_id, &gone.info)
                        .await
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(channel, error = %e, "presence not removed"),
            }
        }));
    }

    /// Runs a broker call about `channel` from code that cannot wait (done at once
    /// where the broker answers at once, else on a task); failures are logged.
    pub(crate) fn detached_broker_call(
        &self,
        channel: Arc<str>,
        call: impl FnOnce(Arc<dyn Broker>, NodeId, Arc<str>) -> crate::broker::BrokerFuture<'static, ()>
            + Send
            + 'static,
    ) {
        let fut = call(self.inner.broker.clone(), self.inner.node, channel.clone());
        run_detached(Box::pin(async move {
            if let Err(e) = fut.await {
                tracing::warn!(channel = %channel, error = %e, "broker call failed");
            }
        }));
    }

    /// Milliseconds since the Hub was created (the clock of `last_seen`).
    pub(crate) fn now_ms(&self) -> u64 {
        self.inner.delivery.started.elapsed().as_millis() as u64
    }

    /// How long the Hub has existed.
    pub fn uptime(&self) -> Duration {
        self.inner.delivery.started.elapsed()
    }

    fn shard(&self, client_id: &str) -> &Shard {
        let i = (self.inner.hasher.hash_one(client_id) as usize) % self.inner.shards.len();
        &self.inner.shards[i]
    }

    pub(crate) fn shards(&self) -> &[Shard] {
        &self.inner.shards
    }

    /// Whether the Hub is draining (refusing new connections).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Checks whether a new connection would be accepted now, without reserving a
    /// place: `Err` with [`ErrorKind::Shutdown`] while draining,
    /// [`ErrorKind::ConnectionLimitExceeded`] at `max_connections`. A refusal is
    /// counted in the metrics as [`connect`](Self::connect)'s would be, so a
    /// caller that checks first (before spending a one-time ticket, say) and then
    /// connects counts each refused client once.
    pub fn check_admission(&self) -> Result<()> {
        if self.is_draining() {
            self.inner
                .metrics
                .rejected_draining
                .fetch_add(1, Ordering::Relaxed);
            return Err(Error::new(ErrorKind::Shutdown, "server is draining"));
        }
        match self.inner.config.max_connections {
            Some(max) if self.inner.reserved.load(Ordering::Acquire) >= max => {
                Err(self.at_max_connections(max))
            }
            _ => Ok(()),
        }
    }

    /// Counts a refusal at `max_connections` and returns its error.
    fn at_max_connections(&self, max: usize) -> Error {
        self.inner
            .metrics
            .rejected_limit
            .fetch_add(1, Ordering::Relaxed);
        Error::new(
            ErrorKind::ConnectionLimitExceeded,
            format!("at max_connections ({max})"),
        )
    }

    /// Claims a place: [`check_admission`](Self::check_admission), then the claim
    /// itself, undone if a concurrent connect took the last place in between.
    fn reserve(&self) -> Result<()> {
        self.check_admission()?;
        let prev = self.inner.reserved.fetch_add(1, Ordering::AcqRel);
        if let Some(max) = self.inner.config.max_connections {
            if prev >= max {
                self.inner.reserved.fetch_sub(1, Ordering::AcqRel);
                return Err(self.at_max_connections(max));
            }
        }
        Ok(())
    }

    /// Accepts a WebSocket upgrade for `client_id` and runs the connection.
    ///
    /// Returns the handshake response for the axum handler to return. Past
    /// `max_connections` or while draining it returns an error (whose
    /// [`http_status`](Error::http_status) is 503) and answers no handshake. A
    /// client_id that is already connected is taken over: the older connection is
    /// closed with 4002 once the new one is registered. `metadata` is kept on the
    /// connection (presence info, claims) and never sent anywhere by the Hub.
    pub fn connect(
        &self,
        client_id: impl Into<String>,
        upgrade: Upgrade,
        metadata: serde_json::Value,
    ) -> Result<Response> {
        self.connect_inner(Arc::from(client_id.into()), upgrade, metadata, None)
    }

    /// Like [`connect`](Self::connect), for a client whose credential checked out:
    /// the connection's client_id is the identity's, presence shows its `info`,
    /// [`Connection::identity`] returns it, and when it carries an expiry the
    /// client gets `error token_expired` at that time and is closed with 1008
    /// `auth_refresh_grace` later unless it [`refresh`](Self::refresh_identity)es.
    pub fn connect_as(&self, identity: Identity, upgrade: Upgrade) -> Result<Response> {
        let client_id = Arc::from(identity.client_id.as_str());
        self.connect_inner(
            client_id,
            upgrade,
            Value::Null,
            AuthState::boxed(Some(identity)),
        )
    }

    /// Accepts a connection that will authenticate with its first message: it is
    /// registered under a generated client_id, [`Connection::awaiting_auth`] is
    /// true, and it is closed with 1008 unless [`authenticate`](Self::authenticate)
    /// is called within `auth_timeout`.
    pub fn connect_awaiting_auth(&self, upgrade: Upgrade) -> Result<Response> {
        // A v4 UUID from the thread's generator: `Uuid::new_v4` asks the OS for
        // randomness, one syscall per connection.
        let client_id = Arc::from(
            uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .to_string(),
        );
        self.connect_inner(client_id, upgrade, Value::Null, AuthState::boxed(None))
    }

    fn connect_inner(
        &self,
        client_id: Arc<str>,
        upgrade: Upgrade,
        metadata: serde_json::Value,
        auth: Option<Box<AuthState>>,
    ) -> Result<Response> {
        // Per-address limits first: a flood from one address must not use up the
        // node's places.
        let ip = match &self.inner.ip_limits {
            Some(limits) => {
                let ip = crate::policy::ip_limits::client_ip(
                    &self.inner.config.trusted_proxies,
                    upgrade.peer,
                    upgrade.forwarded.as_deref(),
                );
                if let Some(ip) = ip {
                    if let Err(e) = limits.admit(ip) {
                        let m = &self.inner.metrics;
                        let counter = if e.kind() == &ErrorKind::RateLimited {
                            &m.rejected_ip_rate
                        } else {
                            &m.rejected_ip_limit
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                ip
            }
            None => None,
        };
        let release_ip = move |hub: &Hub| {
            if let (Some(limits), Some(ip)) = (&hub.inner.ip_limits, ip) {
                limits.release(ip);
            }
        };
        if let Err(e) = self.reserve() {
            release_ip(self);
            return Err(e);
        }
        let hub = self.clone();
        let tasks = self.inner.tasks.clone();
        // The connection's driver gets a task of its own, so a long-lived
        // connection's task holds no leftover state from its upgrade.
        let start = move |socket: Option<Socket>| {
            let Some(socket) = socket else {
                hub.inner.reserved.fetch_sub(1, Ordering::AcqRel);
                release_ip(&hub);
                return;
            };
            // `ip` is set only when per-address limits are on: it is what releases
            // the address's count when the connection ends.
            let delivery = hub.inner.delivery.clone();
            let conn = Connection::new(client_id, metadata, auth, ip, hub.now_ms(), delivery);
            hub.register(&conn);
            tasks.spawn(driver::Driver::new(hub, conn, socket));
        };
        let (response, later) = match self.inner.transport.accept(upgrade, start) {
            Ok(r) => r,
            Err(e) => {
                self.inner.reserved.fetch_sub(1, Ordering::AcqRel);
                release_ip(self);
                return Err(e);
            }
        };
        // Through hyper, a task waits for the handshake to finish; a listener that
        // answers the upgrade itself starts the connection from its own task.
        if let Some(later) = later {
            self.inner.tasks.spawn(later);
        }
        Ok(response)
    }

    /// Completes a first-message authentication: `conn` (which must be
    /// [awaiting auth](Connection::awaiting_auth)) takes `identity`'s client_id,
    /// replacing (4002) a connection that holds it. Errors with
    /// [`ErrorKind::InvalidArgument`] if `conn` is not waiting for auth.
    pub fn authenticate(&self, conn: &Connection, identity: Identity) -> Result<()> {
        {
            let mut auth = conn.inner.auth.lock();
            match auth.as_mut() {
                Some(st) if st.identity.is_none() => st.identity = Some(identity.clone()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        "this connection is not waiting for auth",
                    ))
                }
            }
        }
        let mut ident = conn.ident();
        ident.client_id = Arc::from(identity.client_id.as_str());
        self.rebind(conn, ident);
        Ok(())
    }

    /// Replaces an authenticated connection's credential with a newer one for the
    /// same client (`refresh`): its expiry moves on and a pending `token_expired`
    /// close is called off. [`ErrorKind::Forbidden`] for another client_id,
    /// [`ErrorKind::InvalidArgument`] for a connection that never authenticated.
    pub fn refresh_identity(&self, conn: &Connection, identity: Identity) -> Result<()> {
        let mut auth = conn.inner.auth.lock();
        let Some(st) = auth.as_mut().filter(|st| st.identity.is_some()) else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "this connection did not authenticate",
            ));
        };
        if st.identity.as_ref().map(|i| i.client_id.as_str()) != Some(identity.client_id.as_str()) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "the new token is for another client",
            ));
        }
        st.identity = Some(identity);
        st.refresh_deadline = None;
        Ok(())
    }

    /// Moves `conn` to identity `ident`: out of every channel and of the registry
    /// under its current client_id, then into the registry under the new one
    /// (replacing, 4002, whoever holds it).
    fn rebind(&self, conn: &Connection, ident: crate::conn::Ident) {
        let mine = conn.ident();
        let joined: Vec<Arc<str>> = std::mem::take(&mut *conn.inner.channels.lock());
        for ch in &joined {
            self.inner.fanout.leave(self, ch, conn, None);
        }
        {
            let mut shard = self.shard(&mine.client_id).write();
            if shard.get(&mine.client_id).is_some_and(|c| c.same(conn)) {
                shard.remove(&mine.client_id);
            }
        }
        *conn.inner.ident.write() = ident;
        self.insert_registry(conn);
    }

    fn register(&self, conn: &Connection) {
        self.inner.metrics.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            client_id = %conn.client_id(),
            session_id = %conn.session_id(),
            "connect"
        );
        self.insert_registry(conn);
    }

    /// Puts `conn` in the registry under its client_id, replacing (4002) whoever
    /// held it.
    fn insert_registry(&self, conn: &Connection) {
        let id = conn.client_id();
        let old = self.shard(&id).write().insert(id.clone(), conn.clone());
        if let Some(old) = old {
            old.close_as(
                DisconnectReason::Replaced,
                keel_protocol::close::REPLACED,
                "replaced by a newer connection",
                true,
            );
        }
    }

    /// Called by the connection task as it ends, on every path.
    ///
    /// Everything a watcher might check once the connection is out of the registry
    /// is settled before it leaves it: its place under `max_connections` and its
    /// address's allowance are free, its disconnect is counted and its user data
    /// uncounted. Then it leaves the registry (its traffic moving to the closed
    /// totals in the same step), leaves its channels and hands its session over.
    pub(crate) fn unregister(&self, conn: &Connection, reason: DisconnectReason, code: u16) {
        conn.inner.gone.store(true, Ordering::Release);
        let keep = self.keeps_session(conn, reason, code);
        let user_data = self.settle(conn, reason);
        self.leave_registry(conn);
        let channels = self.leave_channels(conn, keep);
        if keep {
            self.detach_session(conn, user_data, &channels);
        }
        tracing::info!(
            client_id = %conn.client_id(),
            session_id = %conn.session_id(),
            reason = reason.as_str(),
            code,
            duration_ms = conn.connected_at().elapsed().as_millis() as u64,
            "disconnect"
        );
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.handler().on_disconnect(self, conn, reason, code)
        }));
    }

    /// Whether the session is kept for a resume: not if the client said goodbye
    /// (1000), the server ended it on purpose, or another connection has it now.
    fn keeps_session(&self, conn: &Connection, reason: DisconnectReason, code: u16) -> bool {
        self.inner.config.enable_reconnect
            && !conn.inner.taken_over.load(Ordering::Acquire)
            && match reason {
                DisconnectReason::ClientClosed => code != keel_protocol::close::NORMAL,
                DisconnectReason::ConnectionLost
                | DisconnectReason::HeartbeatTimeout
                | DisconnectReason::SlowConsumer
                | DisconnectReason::Shutdown
                | DisconnectReason::InternalError => true,
                _ => false,
            }
    }

    /// What a watcher may check once the connection is out of the registry,
    /// settled before it leaves: its user data out of this node's count (gone,
    /// or handed to the broker with the session; returned for that), its place
    /// under `max_connections` and its address's allowance free, its disconnect
    /// counted.
    fn settle(&self, conn: &Connection, reason: DisconnectReason) -> Option<Box<UserData>> {
        let user_data = conn.inner.user_data.lock().take();
        if let Some(ud) = &user_data {
            self.inner
                .user_data_bytes
                .fetch_sub(ud.bytes, Ordering::Relaxed);
        }
        self.inner.reserved.fetch_sub(1, Ordering::AcqRel);
        if let (Some(limits), Some(ip)) = (&self.inner.ip_limits, conn.inner.peer.as_deref()) {
            limits.release(*ip);
        }
        let m = &self.inner.metrics;
        m.disconnects[reason.index()].fetch_add(1, Ordering::Relaxed);
        if reason == DisconnectReason::HeartbeatTimeout {
            m.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        user_data
    }

    /// Out of the registry (unless a newer connection holds the client_id now),
    /// with its traffic moved to the closed totals in the same step, under the
    /// lock a snapshot holds while it sums: counted once, never twice or not at
    /// all.
    fn leave_registry(&self, conn: &Connection) {
        let id = conn.client_id();
        let mut shard = self.shard(&id).write();
        if shard.get(&id).is_some_and(|c| c.same(conn)) {
            shard.remove(&id);
        }
        self.inner.metrics.fold(&conn.inner.stats);
    }

    /// Out of every channel; returns them. With a kept session, a vanished client
    /// stays present until `presence_ttl` after its last frame.
    fn leave_channels(&self, conn: &Connection, keep: bool) -> Vec<Arc<str>> {
        let linger = keep.then(|| {
            self.inner.delivery.started
                + Duration::from_millis(conn.inner.last_seen.load(Ordering::Relaxed))
                + self.inner.config.presence_ttl
        });
        let channels: Vec<Arc<str>> = std::mem::take(&mut *conn.inner.channels.lock());
        for ch in &channels {
            self.inner.fanout.leave(self, ch, conn, linger);
        }
        channels
    }

    /// Hands the session to the broker for `reconnect_token_ttl`.
    fn detach_session(
        &self,
        conn: &Connection,
        user_data: Option<Box<UserData>>,
        channels: &[Arc<str>],
    ) {
        let ident = conn.ident();
        let session = DetachedSession {
            client_id: ident.client_id.to_string(),
            generation: ident.generation,
            user_data: user_data.map(|ud| ud.map).unwrap_or_default(),
            channels: channels.iter().map(|c| c.to_string()).collect(),
        };
        let key = uuid::Uuid::from_u128(ident.session_id).to_string();
        let ttl = self.inner.config.reconnect_token_ttl;
        let broker = self.inner.broker.clone();
        run_detached(Box::pin(async move {
            if let Err(e) = broker.session_put(&key, session, ttl).await {
                tracing::warn!(error = %e, "session not kept for resume");
            }
        }));
    }

    /// The connection of `client_id`, if connected.
    pub fn connection(&self, client_id: &str) -> Option<Connection> {
        self.shard(client_id).read().get(client_id).cloned()
    }

    fn require(&self, client_id: &str) -> Result<Connection> {
        self.connection(client_id)
            .ok_or_else(|| Error::not_found(client_id))
    }

    /// Closes `client_id`'s connection with 1000. What is queued is sent first.
    pub fn disconnect(&self, client_id: &str) -> Result<()> {
        self.disconnect_with(
            client_id,
            keel_protocol::close::NORMAL,
            "disconnected by server",
        )
    }

    /// Closes `client_id`'s connection with `code` and `reason`.
    pub fn disconnect_with(&self, client_id: &str, code: u16, reason: &str) -> Result<()> {
        self.require(client_id)?.close(code, reason);
        Ok(())
    }

    /// Closes `client_id`'s connection wherever it is: here if it is here
    /// (`Ok(true)`), else, with a broker shared by a cluster, by asking every
    /// node (`Ok(false)`: asked; whoever has it closes it). With a broker of
    /// its own, a client not here is [`ErrorKind::ConnectionNotFound`].
    pub async fn disconnect_anywhere(
        &self,
        client_id: &str,
        code: u16,
        reason: &str,
    ) -> Result<bool> {
        match self.disconnect_with(client_id, code, reason) {
            Ok(()) => Ok(true),
            Err(e) if self.inner.broker.shared() && e.kind() == &ErrorKind::ConnectionNotFound => {
                self.inner
                    .broker
                    .signal(crate::broker::Signal::Disconnect {
                        client_id: client_id.to_string(),
                        code,
                        reason: reason.to_string(),
                    })
                    .await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Queues a text message to one client. False if not connected, closing, or the
    /// message was refused by a full queue.
    pub fn send_to_client(&self, client_id: &str, text: impl Into<Bytes>) -> bool {
        match self.connection(client_id) {
            Some(c) => c.push(Outgoing::Text(text.into())),
            None => false,
        }
    }

    /// Queues a text message to every connection but those in `exclude`. The
    /// message is one buffer shared by all queues; no socket is awaited. Yields to
    /// other tasks every `max_concurrent_broadcast` queues.
    pub async fn broadcast(&self, text: impl Into<Bytes>, exclude: &[&str]) -> BroadcastResult {
        let frame = Arc::new(text.into());
        let mut result = BroadcastResult::default();
        let batch = self.inner.config.max_concurrent_broadcast;
        for shard in self.inner.shards.iter() {
            let conns: Vec<Connection> = shard.read().values().cloned().collect();
            for (i, c) in conns.iter().enumerate() {
                if exclude.contains(&&*c.client_id()) {
                    continue;
                }
                result.add(c.push_shared_with(&self.inner.delivery, &frame));
                if (i + 1) % batch == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        result
    }

    /// Client ids of all open connections.
    pub fn client_ids(&self) -> Vec<String> {
        let mut v = Vec::with_capacity(self.connection_count());
        for s in self.inner.shards.iter() {
            v.extend(s.read().keys().map(|k| k.to_string()));
        }
        v
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.inner.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Records proof of life for `client_id` (a JSON `pong`, or anything the
    /// application counts as one). Frames received already count by themselves.
    pub fn handle_pong(&self, client_id: &str) -> Result<()> {
        let c = self.require(client_id)?;
        c.inner.last_seen.store(self.now_ms(), Ordering::Relaxed);
        Ok(())
    }

    /// Adds `client_id` to channel `room`; returns the channel's position, after
    /// which every publication reaches it. A room is a channel: this is
    /// [`subscribe`](Self::subscribe) without `since`, by client_id.
    pub async fn join_room(&self, client_id: &str, room: &str) -> Result<StreamPosition> {
        let c = self.require(client_id)?;
        Ok(self.subscribe(&c, room, None).await?.position)
    }

    /// Subscribes `conn` to `channel`, first replaying what it missed after `since`
    /// when the channel's history still holds all of it (same epoch); on
    /// `recovered == false` nothing was replayed (never a partial replay).
    /// Publications that arrive while the replay is read follow it, none twice.
    pub async fn subscribe(
        &self,
        conn: &Connection,
        channel: &str,
        since: Option<&StreamPosition>,
    ) -> Result<Subscribed> {
        self.check_channel_name(channel)?;
        self.inner.fanout.join(self, channel, conn, since).await
    }

    /// Removes `conn` from `channel`; false if it was not in it.
    pub fn unsubscribe(&self, conn: &Connection, channel: &str) -> bool {
        self.inner.fanout.leave(self, channel, conn, None)
    }

    /// Removes `client_id` from `room`. Ok(false) if it was not in it.
    pub fn leave_room(&self, client_id: &str, room: &str) -> Result<bool> {
        let c = self.require(client_id)?;
        Ok(self.unsubscribe(&c, room))
    }

    /// Whether `conn` may do `action` on `channel` under this Hub's configuration
    /// ([`policy::permissions::authorize`](crate::policy::permissions::authorize)).
    pub fn authorize(
        &self,
        conn: &Connection,
        action: crate::policy::permissions::Action,
        channel: &str,
    ) -> Result<()> {
        crate::policy::permissions::authorize(&self.inner.config, conn, action, channel)
    }

    /// Who is present in `channel`, on every node sharing the broker: connected
    /// members with a sign of life within `presence_ttl`, and clients that
    /// vanished without a clean close less than `presence_ttl` after their last
    /// frame.
    pub async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>> {
        // This node's members as of their last frame, then the broker's entries
        // (other nodes' members, and clients that vanished) for everyone else.
        let mut out = self.inner.fanout.live_presence(self, channel);
        let ours: std::collections::HashSet<String> =
            out.iter().map(|e| e.client_id.clone()).collect();
        let local = |e: &PresenceEntry| {
            self.connection(&e.client_id)
                .is_some_and(|c| c.inner.channels.lock().iter().any(|ch| **ch == *channel))
        };
        for e in self.inner.broker.presence(channel).await? {
            // A member of this node that is not live by its last frame is not
            // present, whatever its (not yet refreshed) entry says.
            if !ours.contains(&e.client_id) && !local(&e) {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Client ids in `channel` on this node.
    pub fn channel_members(&self, channel: &str) -> Vec<String> {
        self.inner
            .fanout
            .members(channel)
            .iter()
            .map(|c| c.client_id().to_string())
            .collect()
    }

    /// Channels `client_id` is in (empty if not connected).
    pub fn channels_of(&self, client_id: &str) -> Vec<String> {
        self.connection(client_id)
            .map(|c| {
                c.inner
                    .channels
                    .lock()
                    .iter()
                    .map(|r| r.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Queues a text message to every member of `channel` on this node except
    /// `exclude`, without an offset (it is not part of the channel's stream; see
    /// [`publish`](Self::publish)).
    pub fn broadcast_to_channel(
        &self,
        channel: &str,
        text: impl Into<Bytes>,
        exclude: Option<&str>,
    ) -> BroadcastResult {
        self.inner.fanout.broadcast(channel, text.into(), exclude)
    }

    /// Publishes `data` to `channel`'s stream: the broker assigns the next offset
    /// and keeps it in history, and every subscriber of every node gets it (this
    /// node encodes one `message` envelope and queues it to its members).
    /// `publisher` is the client_id shown to subscribers (None for server-side
    /// publications). Fails with [`ErrorKind::InvalidArgument`] for a bad channel
    /// name or `data` nested deeper than `max_data_depth`, or with the broker's
    /// error.
    pub async fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        publisher: Option<&str>,
    ) -> Result<Publication> {
        self.check_channel_name(channel)?;
        let max_depth = self.inner.config.max_data_depth;
        if keel_protocol::depth::nests_deeper_than(data.get(), max_depth) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("data nests deeper than max_data_depth ({max_depth})"),
            ));
        }
        self.inner
            .metrics
            .publications
            .fetch_add(1, Ordering::Relaxed);
        let rules = self.channel_rules(channel).stream;
        self.inner
            .broker
            .publish(channel, data, publisher, rules)
            .await
    }

    /// The channel's current position; `None` if it has no stream (nobody
    /// subscribed and nothing kept).
    pub async fn channel_position(&self, channel: &str) -> Result<Option<StreamPosition>> {
        let query = HistoryQuery {
            after: 0,
            epoch: None,
            limit: 0,
        };
        Ok(self.history(channel, query).await?.position)
    }

    /// `channel`'s history: see [`HistoryQuery`] (a recovery after a position
    /// answers all that followed it or nothing; a browse answers what is kept).
    pub async fn history(&self, channel: &str, query: HistoryQuery<'_>) -> Result<History> {
        self.check_channel_name(channel)?;
        let rules = self.channel_rules(channel).stream;
        self.inner.broker.history(channel, query, rules).await
    }

    /// A snapshot of the counters and gauges.
    ///
    /// Traffic totals never go down from one snapshot to the next: every shard's
    /// read lock is held while the closed totals and the live connections are
    /// summed, and a leaving connection moves its traffic from one to the other
    /// under its shard's write lock. Connects and disconnects wait while it sums
    /// (one pass over the connections, no allocation per connection).
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        // Read before the registry's locks: while those are held, only each
        // connection's queue lock is taken, and nothing holding a queue lock ever
        // waits on the registry.
        let broker = self.broker_usage();
        let user_data_bytes = self.inner.user_data_bytes.load(Ordering::Relaxed);
        let gate = self.inner.gate.stats();
        let shards: Vec<_> = self.inner.shards.iter().map(|s| s.read()).collect();
        MetricsSnapshot::collect(
            &self.inner.metrics,
            shards.iter().flat_map(|s| s.values()),
            user_data_bytes,
            self.inner.delivery.dropped_counts(),
            &broker,
            gate,
        )
    }

    /// What the broker holds: its answer if it has one at once (the memory
    /// broker always does), else the last answer it gave, while a fresh one is
    /// asked for in the background.
    pub(crate) fn broker_usage(&self) -> crate::broker::BrokerUsage {
        use futures::FutureExt;
        if let Some(Ok(now)) = self.inner.broker.usage().now_or_never() {
            *self.inner.last_usage.lock() = now;
            return now;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&self.inner);
            rt.spawn(async move {
                let Some(inner) = weak.upgrade() else { return };
                if let Ok(u) = inner.broker.usage().await {
                    *inner.last_usage.lock() = u;
                }
            });
        }
        *self.inner.last_usage.lock()
    }

    /// The counters in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.metrics_snapshot().to_prometheus()
    }

    /// Messages dropped by slow-consumer policies since start.
    pub fn dropped_total(&self) -> u64 {
        let (oldest, newest) = self.inner.delivery.dropped_counts();
        oldest + newest
    }
}

impl BroadcastResult {
    /// Counts one queue's answer.
    pub(crate) fn add(&mut self, p: crate::conn::queue::Pushed) {
        use crate::conn::queue::Pushed;
        match p {
            Pushed::Queued => self.sent += 1,
            Pushed::DroppedOldest(_) => {
                self.sent += 1;
                self.dropped += 1;
            }
            Pushed::DroppedNewest => {
                self.dropped += 1;
                self.failed += 1;
            }
            Pushed::Closed => self.failed += 1,
        }
    }
}

impl Hub {
    /// Channel names are 1 to `max_channel_name_length` bytes without control
    /// characters.
    fn check_channel_name(&self, name: &str) -> Result<()> {
        let max = self.inner.config.max_channel_name_length;
        if name.is_empty() || name.len() > max || name.chars().any(char::is_control) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("channel names are 1 to {max} bytes without control characters"),
            ));
        }
        Ok(())
    }
}

/// Runs `fut` to completion now if it is ready on its first poll (the memory
/// broker's always are), else on a task of the current runtime; without a
/// runtime (one shutting down) it is dropped.
fn run_detached(mut fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
    use futures::FutureExt;
    if fut.as_mut().now_or_never().is_some() {
        return;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(fut);
    }
}

//! [`Hub`]: the registry of connections and the public face of the library.
//!
//! A Hub is a value: cheap to clone (an `Arc` inside), many per process, no global
//! state. It owns a sharded map of client_id to [`Connection`], the channels, the
//! counters, and the background sweeper started by [`Hub::start`]. Every operation
//! the gateway performs is a method here. Methods never await a socket: sending is
//! queuing.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::Response;
use bytes::Bytes;
use parking_lot::RwLock;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Identity;
use crate::broker::{
    Broker, Deliver, Delivered, History, HistoryQuery, MemoryBroker, NodeId, Publication,
    StreamPosition, StreamPublication, StreamRules,
};
use crate::config::Config;
use crate::connection::{self, AuthState, Connection, DisconnectReason};
use crate::error::{Error, ErrorKind, Result};
use crate::fanout::{Fanout, PresenceEntry, Subscribed};
use crate::handler::{Handler, NoopHandler};
use crate::memory::{self, MemoryUsage, UserData};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::queue::Limits;
use crate::session::{Detached, Resumed, Sessions};
use crate::token::{self, ReconnectClaims};
use crate::transport::Socket;
use crate::transport::{Outgoing, Transport, Upgrade};

type Shard = RwLock<HashMap<Arc<str>, Connection>>;

pub(crate) struct HubInner {
    pub(crate) config: Config,
    limits: Limits,
    /// The per-connection message rate limit, if one is configured.
    pub(crate) rate: Option<crate::rate::RateLimit>,
    /// Per-address connection caps and rates, if configured.
    pub(crate) ip_limits: Option<crate::ip_limits::IpLimits>,
    handler: Arc<dyn Handler>,
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    /// This node's channel members and the last hop of delivery.
    pub(crate) fanout: Fanout,
    /// Channel streams: offsets, epochs, history, cross-node delivery.
    pub(crate) broker: Arc<dyn Broker>,
    /// This Hub's sink in the broker.
    node: NodeId,
    /// Detached sessions and the reconnect-token key.
    pub(crate) sessions: Sessions,
    pub(crate) metrics: Metrics,
    transport: Transport,
    started: Instant,
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
                hub.inner.fanout.deliver(&hub, publication)
            }
            None => Delivered::default(),
        }
    }
}

/// The connection hub. See the crate documentation for a tour.
#[derive(Clone)]
pub struct Hub {
    pub(crate) inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("connections", &self.get_connection_count())
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
        let broker = Arc::new(MemoryBroker::new(config.num_shards));
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
                limits: Limits {
                    max_messages: config.send_queue_max_messages,
                    max_bytes: config.send_queue_max_bytes,
                    policy: config.slow_consumer_policy,
                },
                rate: crate::rate::RateLimit::from_config(&config),
                ip_limits: crate::ip_limits::IpLimits::from_config(&config),
                handler: Arc::new(handler),
                shards: (0..shards).map(|_| RwLock::default()).collect(),
                hasher: Default::default(),
                fanout: Fanout::new(shards),
                broker,
                node,
                sessions: Sessions::new(
                    config.reconnect_secret.as_deref(),
                    config.reconnect_token_ttl,
                ),
                metrics: Metrics::default(),
                transport: Transport::new(&config),
                started: Instant::now(),
                reserved: AtomicUsize::new(0),
                user_data_bytes: AtomicUsize::new(0),
                draining: AtomicBool::new(false),
                running: AtomicBool::new(false),
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
                json_ping: parking_lot::Mutex::new(keel_protocol::encode::ping()),
                config,
            }
        });
        Hub { inner }
    }

    /// Starts the background sweeper (heartbeats, timeouts, slow consumers, memory,
    /// history expiry). Idempotent; must be called inside a tokio runtime.
    pub fn start(&self) {
        if !self.inner.running.swap(true, Ordering::AcqRel) {
            tokio::spawn(crate::heartbeat::sweeper(
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

    pub(crate) fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The application's hooks (borrowed: no reference count touched per message).
    pub(crate) fn handler(&self) -> &dyn Handler {
        &*self.inner.handler
    }

    /// The broker that holds this Hub's channel streams.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// This Hub's node in its broker.
    pub(crate) fn node(&self) -> NodeId {
        self.inner.node
    }

    /// The stream rules (history size and TTL) and whether presence events are on,
    /// for channel `name`: its namespace's where it sets them, else the top-level
    /// options.
    pub(crate) fn stream_rules(&self, name: &str) -> (StreamRules, bool) {
        let c = &self.inner.config;
        let ns = crate::permissions::namespace(&c.namespaces, name);
        let rules = StreamRules {
            history_size: ns.and_then(|n| n.history_size).unwrap_or(c.history_size),
            history_ttl: ns.and_then(|n| n.history_ttl).unwrap_or(c.history_ttl),
        };
        let events = ns
            .and_then(|n| n.presence_events)
            .unwrap_or(c.presence_events);
        (rules, events)
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
        let (rules, _) = self.stream_rules(channel);
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
        self.inner.started.elapsed().as_millis() as u64
    }

    /// How long the Hub has existed.
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
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
                let ip = crate::ip_limits::client_ip(
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
            let conn = Connection::new(client_id, metadata, auth, ip, hub.now_ms());
            hub.register(&conn);
            tasks.spawn(connection::Driver::new(hub, conn, socket));
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
    fn rebind(&self, conn: &Connection, ident: crate::connection::Ident) {
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
        // Keep the session for a resume unless the client said goodbye (1000), the
        // server ended it on purpose, or another connection has it now.
        let keep = self.inner.config.enable_reconnect
            && !conn.inner.taken_over.load(Ordering::Acquire)
            && match reason {
                DisconnectReason::ClientClosed => code != keel_protocol::close::NORMAL,
                DisconnectReason::ConnectionLost
                | DisconnectReason::HeartbeatTimeout
                | DisconnectReason::SlowConsumer
                | DisconnectReason::Shutdown
                | DisconnectReason::InternalError => true,
                _ => false,
            };
        let user_data = conn.inner.user_data.lock().take();
        if let (false, Some(ud)) = (keep, &user_data) {
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
        {
            let id = conn.client_id();
            let mut shard = self.shard(&id).write();
            if shard.get(&id).is_some_and(|c| c.same(conn)) {
                shard.remove(&id);
            }
            // Its traffic moves to the closed totals in the same step, under the
            // lock a snapshot holds while it sums: counted once, never twice or
            // not at all.
            m.fold(&conn.inner.stats);
        }
        // A vanished client stays present until `presence_ttl` after its last frame.
        let linger = keep.then(|| {
            self.inner.started
                + Duration::from_millis(conn.inner.last_seen.load(Ordering::Relaxed))
                + self.inner.config.presence_ttl
        });
        let channels: Vec<Arc<str>> = std::mem::take(&mut *conn.inner.channels.lock());
        for ch in &channels {
            self.inner.fanout.leave(self, ch, conn, linger);
        }
        if keep {
            let ident = conn.ident();
            self.inner.sessions.detach(
                ident.session_id,
                Detached {
                    client_id: ident.client_id,
                    generation: ident.generation,
                    user_data,
                    channels,
                    expires: Instant::now() + self.inner.sessions.ttl,
                },
            );
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

    /// The connection of `client_id`, if connected.
    pub fn get_connection(&self, client_id: &str) -> Option<Connection> {
        self.shard(client_id).read().get(client_id).cloned()
    }

    fn require(&self, client_id: &str) -> Result<Connection> {
        self.get_connection(client_id)
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

    /// Queues a text message to one client. False if not connected, closing, or the
    /// message was refused by a full queue.
    pub fn send_to_client(&self, client_id: &str, text: impl Into<Bytes>) -> bool {
        match self.get_connection(client_id) {
            Some(c) => c.push(self, Outgoing::Text(text.into())),
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
                result.add(c.push_shared_counted(self, &frame));
                if (i + 1) % batch == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        result
    }

    /// Client ids of all open connections.
    pub fn get_active_connections(&self) -> Vec<String> {
        let mut v = Vec::with_capacity(self.get_connection_count());
        for s in self.inner.shards.iter() {
            v.extend(s.read().keys().map(|k| k.to_string()));
        }
        v
    }

    /// Number of open connections.
    pub fn get_connection_count(&self) -> usize {
        self.inner.shards.iter().map(|s| s.read().len()).sum()
    }

    /// Records proof of life for `client_id` (a JSON `pong`, or anything the
    /// application counts as one). Frames received already count by themselves.
    pub fn handle_pong(&self, client_id: &str) -> Result<()> {
        let c = self.require(client_id)?;
        c.inner.last_seen.store(self.now_ms(), Ordering::Relaxed);
        Ok(())
    }

    /// Memory held by connections: user data plus queued output.
    pub fn get_memory_usage(&self) -> MemoryUsage {
        let mut total = 0;
        let mut count = 0;
        for s in self.inner.shards.iter() {
            for c in s.read().values() {
                total += c.memory();
                count += 1;
            }
        }
        MemoryUsage {
            total_memory: total,
            connection_count: count,
            per_connection_average: if count == 0 {
                0.0
            } else {
                total as f64 / count as f64
            },
        }
    }

    /// Stores `value` under `key` for `client_id`. Fails with
    /// [`ErrorKind::MemoryLimitExceeded`] if it would take the connection past
    /// `max_memory_per_connection` or all connections past `max_total_memory`;
    /// nothing is changed then.
    pub fn set_user_data(
        &self,
        client_id: &str,
        key: &str,
        value: serde_json::Value,
    ) -> Result<()> {
        let c = self.require(client_id)?;
        let cfg = &self.inner.config;
        let add = memory::entry_size(key, &value);
        let mut slot = c.inner.user_data.lock();
        let ud = slot.get_or_insert_with(|| Box::new(UserData::new()));
        let old = ud.map.get(key).map_or(0, |v| memory::entry_size(key, v));
        let new_conn = ud.bytes - old + add;
        if let Some(max) = cfg.max_memory_per_connection {
            if new_conn > max {
                return Err(Error::new(
                    ErrorKind::MemoryLimitExceeded,
                    format!("user data of {client_id} would be {new_conn} bytes, over max_memory_per_connection ({max})"),
                ));
            }
        }
        if let Some(max) = cfg.max_total_memory {
            let total = self.inner.user_data_bytes.load(Ordering::Relaxed) - old + add;
            if total > max {
                return Err(Error::new(
                    ErrorKind::MemoryLimitExceeded,
                    format!("user data would total {total} bytes, over max_total_memory ({max})"),
                ));
            }
        }
        ud.map.insert(key.to_string(), value);
        ud.bytes = new_conn;
        self.inner.user_data_bytes.fetch_add(add, Ordering::Relaxed);
        self.inner.user_data_bytes.fetch_sub(old, Ordering::Relaxed);
        Ok(())
    }

    /// The value under `key` for `client_id`, if any.
    pub fn get_user_data(&self, client_id: &str, key: &str) -> Option<serde_json::Value> {
        let c = self.get_connection(client_id)?;
        let slot = c.inner.user_data.lock();
        slot.as_ref()?.map.get(key).cloned()
    }

    /// Adds `client_id` to room (channel) `room`; returns the channel's position,
    /// after which every publication reaches it. Rooms and channels are one thing:
    /// this is [`subscribe`](Self::subscribe) without `since`, by client_id.
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

    /// Who is present in `channel`: connected members with a sign of life within
    /// `presence_ttl`, and clients that vanished without a clean close less than
    /// `presence_ttl` after their last frame.
    pub fn presence(&self, channel: &str) -> Vec<PresenceEntry> {
        self.inner.fanout.presence(self, channel)
    }

    /// Client ids in `room` on this node.
    pub fn get_room_members(&self, room: &str) -> Vec<String> {
        self.inner
            .fanout
            .members(room)
            .iter()
            .map(|c| c.client_id().to_string())
            .collect()
    }

    /// Rooms `client_id` is in (empty if not connected).
    pub fn get_client_rooms(&self, client_id: &str) -> Vec<String> {
        self.get_connection(client_id)
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

    /// Queues a text message to every member of `room` except `exclude`, without an
    /// offset (it is not part of the channel's stream; see [`publish`](Self::publish)).
    pub fn broadcast_to_room(
        &self,
        room: &str,
        text: impl Into<Bytes>,
        exclude: Option<&str>,
    ) -> BroadcastResult {
        self.inner
            .fanout
            .broadcast(self, room, text.into(), exclude)
    }

    /// Publishes `data` to `channel`'s stream: the broker assigns the next offset
    /// and keeps it in history, and every subscriber of every node gets it (this
    /// node encodes one `message` envelope and queues it to its members).
    /// `publisher` is the client_id shown to subscribers (None for server-side
    /// publications). Fails with [`ErrorKind::InvalidArgument`] for a bad channel
    /// name, or with the broker's error.
    pub async fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        publisher: Option<&str>,
    ) -> Result<Publication> {
        self.check_channel_name(channel)?;
        self.inner
            .metrics
            .publications
            .fetch_add(1, Ordering::Relaxed);
        let (rules, _) = self.stream_rules(channel);
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
        let (rules, _) = self.stream_rules(channel);
        self.inner.broker.history(channel, query, rules).await
    }

    /// A reconnect token for `client_id`'s current session and generation, valid
    /// for `reconnect_token_ttl`. The gateway puts one in `welcome` and each
    /// `resume_response`.
    pub fn generate_reconnect_token(&self, client_id: &str) -> Result<String> {
        let c = self.require(client_id)?;
        Ok(self.token_for(&c))
    }

    /// A reconnect token for `conn`'s session as it is now (what `welcome` carries).
    pub fn reconnect_token(&self, conn: &Connection) -> String {
        self.token_for(conn)
    }

    fn token_for(&self, conn: &Connection) -> String {
        let ident = conn.ident();
        self.inner.sessions.signer.sign(&ReconnectClaims {
            client_id: ident.client_id.to_string(),
            session_id: uuid::Uuid::from_u128(ident.session_id).to_string(),
            generation: ident.generation,
            expires_at_ms: token::unix_ms() + self.inner.sessions.ttl.as_millis() as u64,
            authenticated: conn.is_authenticated(),
        })
    }

    /// The claims of `token` if it was signed with this Hub's `reconnect_secret`
    /// and has not expired: [`ErrorKind::InvalidToken`] for a malformed, tampered
    /// or foreign token, [`ErrorKind::TokenExpired`] for one past its expiry. Says
    /// nothing about whether it was already used (that is [`resume`](Self::resume)'s
    /// business).
    pub fn validate_reconnect_token(&self, token: &str) -> Result<ReconnectClaims> {
        self.inner.sessions.signer.verify(token, token::unix_ms())
    }

    /// Detached sessions waiting for a resume.
    pub fn get_detached_session_count(&self) -> usize {
        self.inner.sessions.count()
    }

    /// Resumes the session `token` names on connection `conn`: `conn` takes the
    /// session's client_id and session_id (a connection still holding them is
    /// closed with 4002), gets its user data back, and is subscribed to each channel
    /// in `positions`, with what it missed after each position replayed (or nothing,
    /// and `recovered: false`, where history no longer has all of it).
    ///
    /// Refused, with `conn` left as it was (a new session): a forged, malformed or
    /// already used token ([`ErrorKind::InvalidToken`]), an expired one or a session
    /// already reclaimed ([`ErrorKind::TokenExpired`]), a session of another client
    /// when `conn` authenticated as someone (`authenticated_as`), or the session
    /// of an authenticated client when `conn` did not authenticate
    /// ([`ErrorKind::Forbidden`] both), and resume when `enable_reconnect` is off
    /// ([`ErrorKind::InvalidArgument`]).
    ///
    /// A token is good for one resume: the result carries its successor. On a node
    /// that does not hold the session (another node of a cluster, or after a
    /// restart), a valid unexpired token still restores the identity and the
    /// subscriptions, without user data (`restored_state: false`).
    pub async fn resume(
        &self,
        conn: &Connection,
        token: &str,
        positions: &[(String, Option<keel_protocol::StreamPosition>)],
        authenticated_as: Option<&str>,
    ) -> Result<Resumed> {
        let m = &self.inner.metrics;
        let result = self
            .resume_inner(conn, token, positions, authenticated_as)
            .await;
        let outcome = match &result {
            Ok(_) => 0,
            Err(e) if e.kind() == &ErrorKind::TokenExpired => 2,
            Err(e) if e.kind() == &ErrorKind::Forbidden => 3,
            Err(_) => 1,
        };
        m.resumes[outcome].fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(r) => tracing::info!(
                client_id = %r.client_id,
                session_id = %r.session_id,
                replayed = r.replayed,
                restored_state = r.restored_state,
                "resume"
            ),
            Err(e) => tracing::info!(
                client_id = %conn.client_id(),
                error = ?e.kind(),
                "resume refused"
            ),
        }
        result
    }

    async fn resume_inner(
        &self,
        conn: &Connection,
        token: &str,
        positions: &[(String, Option<keel_protocol::StreamPosition>)],
        authenticated_as: Option<&str>,
    ) -> Result<Resumed> {
        if !self.inner.config.enable_reconnect {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "session resume is disabled on this server",
            ));
        }
        for (channel, _) in positions {
            self.check_channel_name(channel)?;
        }
        let sessions = &self.inner.sessions;
        let claims = sessions.signer.verify_signature(token)?;
        let invalid = |why: &str| Error::new(ErrorKind::InvalidToken, why.to_string());
        let session_id = uuid::Uuid::parse_str(&claims.session_id)
            .map_err(|_| invalid("invalid reconnect token"))?
            .as_u128();
        if authenticated_as.is_some_and(|me| me != claims.client_id) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "the session belongs to another client",
            ));
        }
        // A reconnect token is not a credential: the session of an authenticated
        // client goes only to a connection that authenticated as that client.
        if claims.authenticated && authenticated_as.is_none() {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "the session belongs to an authenticated client: authenticate first",
            ));
        }
        let mine = conn.ident();
        if mine.session_id == session_id {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "this connection already is that session",
            ));
        }
        let now = Instant::now();
        // Where is the session? Detached here, still attached to an open
        // connection here, or nowhere on this node.
        let same =
            |d: &Detached| d.generation == claims.generation && *d.client_id == *claims.client_id;
        let (user_data, lingering, restored_state) = match sessions.take_if(session_id, same) {
            Ok(d) if d.expires <= now => {
                self.free_user_data(d.user_data);
                return Err(Error::new(ErrorKind::TokenExpired, "session expired"));
            }
            Ok(d) => (d.user_data, d.channels, true),
            Err(true) => return Err(invalid("reconnect token already used")),
            Err(false) => match self.get_connection(&claims.client_id) {
                Some(old) if old.ident().session_id == session_id => {
                    if old.ident().generation != claims.generation {
                        return Err(invalid("reconnect token already used"));
                    }
                    // Still open (a zombie, or two tabs): take it over.
                    old.inner.taken_over.store(true, Ordering::Release);
                    let ud = old.inner.user_data.lock().take();
                    (ud, Vec::new(), true)
                }
                _ => {
                    if claims.expires_at_ms < token::unix_ms() {
                        return Err(Error::new(
                            ErrorKind::TokenExpired,
                            "reconnect token expired",
                        ));
                    }
                    (None, Vec::new(), false)
                }
            },
        };

        // Rebind to the session's identity, with its user data.
        self.rebind(
            conn,
            crate::connection::Ident {
                client_id: Arc::from(claims.client_id.as_str()),
                session_id,
                generation: claims.generation + 1,
            },
        );
        let previous = std::mem::replace(&mut *conn.inner.user_data.lock(), user_data);
        self.free_user_data(previous);
        // A copy detached by a connection that ended while we took it over.
        if let Some(stale) = sessions.take(session_id) {
            let mut slot = conn.inner.user_data.lock();
            if slot.is_none() {
                *slot = stale.user_data;
            } else {
                self.free_user_data(stale.user_data);
            }
        }

        let mut resumed = Resumed {
            client_id: claims.client_id.clone(),
            session_id: claims.session_id.clone(),
            reconnect_token: self.token_for(conn),
            recovered: Default::default(),
            positions: Default::default(),
            replayed: 0,
            restored_state,
        };
        for (channel, since) in positions {
            let s = self
                .inner
                .fanout
                .join(self, channel, conn, since.as_ref())
                .await?;
            resumed.recovered.insert(channel.clone(), s.recovered);
            resumed.positions.insert(channel.clone(), s.position);
            resumed.replayed += s.replayed;
        }
        // Channels the session was in but did not ask back: its presence ends now.
        for ch in lingering {
            if !resumed.recovered.contains_key(&*ch) {
                self.inner.fanout.end_presence(self, &ch, &claims.client_id);
            }
        }
        Ok(resumed)
    }

    fn free_user_data(&self, ud: Option<Box<crate::memory::UserData>>) {
        if let Some(ud) = ud {
            self.inner
                .user_data_bytes
                .fetch_sub(ud.bytes, Ordering::Relaxed);
        }
    }

    /// Frees detached sessions past their TTL. Called by the sweeper.
    pub(crate) fn reclaim_sessions(&self) {
        let (freed, bytes) = self.inner.sessions.reclaim(Instant::now());
        if freed > 0 {
            self.inner
                .user_data_bytes
                .fetch_sub(bytes, Ordering::Relaxed);
            self.inner
                .metrics
                .sessions_expired
                .fetch_add(freed as u64, Ordering::Relaxed);
            tracing::debug!(freed, "detached sessions reclaimed");
        }
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
        let channels = self.inner.broker.channel_count();
        let user_data_bytes = self.inner.user_data_bytes.load(Ordering::Relaxed);
        let sessions = self.inner.sessions.count();
        let shards: Vec<_> = self.inner.shards.iter().map(|s| s.read()).collect();
        MetricsSnapshot::collect(
            &self.inner.metrics,
            shards.iter().flat_map(|s| s.values()),
            channels,
            user_data_bytes,
            sessions,
        )
    }

    /// The counters in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.metrics_snapshot().to_prometheus()
    }

    /// Messages dropped by slow-consumer policies since start.
    pub fn dropped_total(&self) -> u64 {
        self.inner.metrics.dropped_total()
    }
}

impl BroadcastResult {
    /// Counts one queue's answer.
    pub(crate) fn add(&mut self, p: crate::queue::Pushed) {
        use crate::queue::Pushed;
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

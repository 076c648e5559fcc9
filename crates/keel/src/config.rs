//! [`Config`]: every option of the Hub and the gateway, with its default, and the
//! one function ([`Config::set`]) that reads an option from text.
//!
//! Files, environment variables and command-line flags all go through
//! [`Config::set`], so an option is spelled, parsed and refused the same way
//! wherever it comes from, and an error always names the option. This module does
//! not read files or the environment itself: the gateway decides where text comes
//! from; a library user can build a `Config` in code.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// How the server sends heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatMode {
    /// WebSocket Ping control frames (browsers answer them without the app).
    Ws,
    /// JSON `ping` envelopes, answered by the client with `pong`.
    Json,
    /// Both: a Ping frame and a JSON `ping` each interval.
    Both,
}

impl HeartbeatMode {
    /// The name as written in config and in `welcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            HeartbeatMode::Ws => "ws",
            HeartbeatMode::Json => "json",
            HeartbeatMode::Both => "both",
        }
    }
}

/// What happens when a connection's send queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// Drop the oldest queued messages to make room (QoS 0: latest data wins).
    DropOldest,
    /// Drop the new message; what is queued is kept.
    DropNewest,
    /// Drop new messages, and close the connection with 4000 once the queue has
    /// stayed full for `slow_consumer_timeout`.
    Disconnect,
}

/// Which connections go first when `max_total_memory` is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionPolicy {
    /// The connection whose last inbound frame is the oldest.
    Lru,
    /// The connection that connected first.
    Fifo,
    /// The connection whose user data was first written the longest ago.
    Oldest,
}

/// Whether permessage-deflate is offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// permessage-deflate, no context takeover, compressors from a shared pool.
    Deflate,
    /// No compression.
    None,
}

/// Log output format of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event.
    Json,
}

/// Which broker carries publications, history and presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// In-process, one node (the default).
    Memory,
    /// Redis, for clusters.
    Redis,
}

/// A channel namespace: the rules for channels named `<name>:...`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Namespace {
    /// The prefix before `:`.
    pub name: String,
    /// Who may subscribe (and read presence and history).
    pub subscribe: SubscribeRule,
    /// Whether clients may publish.
    pub publish: bool,
    /// Whether clients may ask for presence.
    pub presence: bool,
    /// Join/leave events in the stream (`None`: the top-level `presence_events`).
    pub presence_events: Option<bool>,
    /// History size (`None`: the top-level `history_size`).
    pub history_size: Option<usize>,
    /// History TTL (`None`: the top-level `history_ttl`).
    pub history_ttl: Option<Duration>,
}

impl Namespace {
    /// A namespace with the defaults: authenticated subscribers, no client
    /// publishing, presence on, the top-level history settings.
    pub fn new(name: &str) -> Self {
        Namespace {
            name: name.to_string(),
            subscribe: SubscribeRule::Authenticated,
            publish: false,
            presence: true,
            presence_events: None,
            history_size: None,
            history_ttl: None,
        }
    }
}

/// Every option of Keel, defaulted. See `docs/configuration.md` for the table.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Address the gateway listens on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Path of the WebSocket endpoint.
    pub ws_path: String,
    /// This node's name, in `welcome` and `/api/stats`.
    pub node_id: String,
    /// Bearer key for `/api/*` and `/admin/*`; generated at start when unset.
    pub api_key: Option<String>,
    /// Time between heartbeats; keep it below every idle timeout on the path.
    pub heartbeat_interval: Duration,
    /// Grace after an interval with no inbound frame before the connection is
    /// terminated (so a connection dies after `interval + timeout` of silence).
    pub heartbeat_timeout: Duration,
    /// WS Ping frames, JSON pings, or both.
    pub heartbeat_mode: HeartbeatMode,
    /// Most connections at once (`None`: unlimited); the gateway answers 503 past it.
    pub max_connections: Option<usize>,
    /// Largest inbound frame or reassembled message, in bytes (close 1009 past it).
    pub max_message_size: usize,
    /// How long a reconnect token (and a detached session) stays valid.
    pub reconnect_token_ttl: Duration,
    /// Whether sessions can be resumed after a disconnect.
    pub enable_reconnect: bool,
    /// Key of the reconnect tokens' HMAC-SHA256. Every node of a cluster needs the
    /// same one; `None` generates a random key at start, valid on this node only.
    pub reconnect_secret: Option<String>,
    /// permessage-deflate on or off.
    pub compression: Compression,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or an env-filter string).
    pub log_level: String,
    /// Text or JSON logs.
    pub log_format: LogFormat,
    /// Whether `/metrics` is served.
    pub enable_metrics: bool,
    /// Shards of the connection and channel registries (contention vs. memory).
    pub num_shards: usize,
    /// Connections closed per batch during shutdown and eviction.
    pub max_concurrent_cleanup: usize,
    /// Queues filled by a broadcast before it yields to other tasks.
    pub max_concurrent_broadcast: usize,
    /// Most bytes of user data plus queued output one connection may hold.
    pub max_memory_per_connection: Option<usize>,
    /// Most bytes of user data plus queued output all connections may hold.
    pub max_total_memory: Option<usize>,
    /// Which connections are closed first when `max_total_memory` is exceeded.
    pub memory_eviction_policy: EvictionPolicy,
    /// How often total memory is checked against `max_total_memory`.
    pub memory_check_interval: Duration,
    /// Publications kept per channel for recovery.
    pub history_size: usize,
    /// How long a publication stays in history.
    pub history_ttl: Duration,
    /// How long presence survives a client that vanished without a clean close.
    pub presence_ttl: Duration,
    /// Whether channels get `join` / `leave` events as channel messages.
    pub presence_events: bool,
    /// Most messages queued for one connection.
    pub send_queue_max_messages: usize,
    /// Most bytes queued for one connection.
    pub send_queue_max_bytes: usize,
    /// What a full send queue does.
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Under `disconnect`, how long a queue may stay full before close 4000.
    pub slow_consumer_timeout: Duration,
    /// Origins allowed to open a WebSocket (`https://app.example.com`,
    /// `https://*.example.com`); empty allows same-origin and no Origin header.
    pub allowed_origins: Vec<String>,
    /// `[auth] jwt_secret`: HMAC key of HS256/384/512 JWTs (`None`: no HS tokens).
    pub auth_jwt_secret: Option<String>,
    /// `[auth] jwt_public_key_file`: PEM public key (RSA or EC) of RS*/PS*/ES* JWTs.
    pub auth_jwt_public_key_file: Option<std::path::PathBuf>,
    /// `[auth] allow_anonymous`: whether a client without credentials may connect
    /// (with a generated client_id).
    pub auth_allow_anonymous: bool,
    /// `[auth] first_message`: whether a client without credentials at the
    /// upgrade may send `auth` as its first frame instead.
    pub auth_first_message: bool,
    /// `[auth] timeout`: how long a first-message client has to authenticate.
    pub auth_timeout: Duration,
    /// `[auth] cookie_name`: the cookie carrying a JWT (a session cookie).
    pub auth_cookie_name: String,
    /// `[auth] ticket_ttl`: how long a one-time ticket stays redeemable.
    pub auth_ticket_ttl: Duration,
    /// `[auth] refresh_grace`: how long a connection whose JWT expired has to send
    /// `refresh` before it is closed with 1008.
    pub auth_refresh_grace: Duration,
    /// Channel namespaces (`[[namespaces]]` in the file; `namespaces.NAME.KEY` as
    /// a flag), each with its own permissions and history.
    pub namespaces: Vec<Namespace>,
    /// Most channels one connection may be subscribed to (`None`: unlimited).
    pub max_subscriptions_per_connection: Option<usize>,
    /// Longest channel name accepted, in bytes.
    pub max_channel_name_length: usize,
    /// Most connections one client address may hold (`None`: unlimited).
    pub max_connections_per_ip: Option<usize>,
    /// New connections per second one client address may open (0: no limit).
    pub connection_rate_per_ip: u32,
    /// How many connections an address may open at once above that rate.
    pub connection_burst_per_ip: u32,
    /// Proxies whose `X-Forwarded-For` is believed (addresses or CIDR blocks).
    pub trusted_proxies: Vec<Cidr>,
    /// Messages per second one connection may send (0: no limit).
    pub rate_limit_messages: u32,
    /// How many messages above the rate a connection may send in a burst.
    pub rate_limit_burst: u32,
    /// How long a connection may keep exceeding the rate before close 4003.
    pub rate_limit_close_after: Duration,
    /// PEM certificate chain for `wss://` served by the gateway itself (`None`:
    /// plain `ws://`, TLS terminated by a proxy if at all).
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<std::path::PathBuf>,
    /// Broker: `memory` (one node) or `redis`.
    pub broker: BrokerKind,
    /// Redis URL for `broker = "redis"`.
    pub redis_url: String,
    /// How long a graceful shutdown waits before force-closing stragglers.
    pub drain_timeout: Duration,
    /// Window over which clients' reconnect delays (`server_shutdown.delay_ms`) are spread.
    pub shutdown_reconnect_window: Duration,
    /// How long to wait for the peer's close frame before dropping the socket.
    pub close_timeout: Duration,
    /// Initial read buffer per connection; it grows for large frames and shrinks back.
    pub read_buffer_size: usize,
    /// Initial write buffer per connection; it grows for bursts and shrinks back.
    pub write_buffer_size: usize,
    /// Runtime worker threads of the gateway (0: one per core it may run on; with
    /// one, the current-thread scheduler). The library ignores it: it runs on the
    /// application's runtime.
    pub worker_threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            ws_path: "/ws".into(),
            node_id: String::new(),
            api_key: None,
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(25),
            heartbeat_mode: HeartbeatMode::Both,
            max_connections: None,
            max_message_size: 1024 * 1024,
            reconnect_token_ttl: Duration::from_secs(3600),
            enable_reconnect: true,
            reconnect_secret: None,
            compression: Compression::Deflate,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            enable_metrics: true,
            num_shards: 16,
            max_concurrent_cleanup: 100,
            max_concurrent_broadcast: 1000,
            max_memory_per_connection: None,
            max_total_memory: None,
            memory_eviction_policy: EvictionPolicy::Lru,
            memory_check_interval: Duration::from_secs(60),
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            presence_ttl: Duration::from_secs(51),
            presence_events: false,
            send_queue_max_messages: 1024,
            send_queue_max_bytes: 512 * 1024,
            slow_consumer_policy: SlowConsumerPolicy::DropOldest,
            slow_consumer_timeout: Duration::from_secs(5),
            allowed_origins: Vec::new(),
            auth_jwt_secret: None,
            auth_jwt_public_key_file: None,
            auth_allow_anonymous: true,
            auth_first_message: false,
            auth_timeout: Duration::from_secs(5),
            auth_cookie_name: "keel_token".into(),
            auth_ticket_ttl: Duration::from_secs(30),
            auth_refresh_grace: Duration::from_secs(30),
            namespaces: Vec::new(),
            max_subscriptions_per_connection: Some(1000),
            max_channel_name_length: 255,
            max_connections_per_ip: None,
            connection_rate_per_ip: 0,
            connection_burst_per_ip: 20,
            trusted_proxies: Vec::new(),
            rate_limit_messages: 0,
            rate_limit_burst: 50,
            rate_limit_close_after: Duration::from_secs(10),
            tls_cert: None,
            tls_key: None,
            broker: BrokerKind::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            drain_timeout: Duration::from_secs(30),
            shutdown_reconnect_window: Duration::from_secs(5),
            close_timeout: Duration::from_secs(3),
            read_buffer_size: 128,
            write_buffer_size: 0,
            worker_threads: 0,
        }
    }
}

/// An option that could not be set, naming the option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The option's name (`heartbeat_interval`).
    pub option: String,
    /// What was wrong with the value.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value for option `{}`: {}",
            self.option, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

/// One option's name, its default as text, and what it does; the table
/// `docs/configuration.md` is written from.
#[derive(Debug, Clone, Copy)]
pub struct OptionInfo {
    /// Name in TOML (a `section_key` here is `key` under `[section]`) and, upper-cased
    /// with `KEEL_` in front, in the environment.
    pub name: &'static str,
    /// The default, written as it would be in a file.
    pub default: &'static str,
    /// One line on what it does.
    pub doc: &'static str,
}

macro_rules! options {
    ($( $name:literal, $default:literal, $doc:literal; )*) => {
        /// Every option, in the order of `docs/configuration.md`.
        pub const OPTIONS: &[OptionInfo] = &[ $( OptionInfo { name: $name, default: $default, doc: $doc }, )* ];
    };
}

options! {
    "listen", "127.0.0.1:8000", "Address the gateway listens on; port 0 picks a free one (logged as `listening on ADDR`).";
    "ws_path", "/ws", "Path of the WebSocket endpoint.";
    "node_id", "", "This node's name in `welcome` and `/api/stats`; empty means `keel-<random>`.";
    "api_key", "", "Bearer key for `/api/*` and `/admin/*`; empty means one is generated at start and printed once.";
    "heartbeat_interval", "25s", "Time between server heartbeats; keep it below every idle timeout on the path.";
    "heartbeat_timeout", "25s", "Grace after an interval of silence; a connection silent for interval + timeout is closed (4001).";
    "heartbeat_mode", "both", "`ws` (Ping frames), `json` (`ping` envelopes) or `both`. `heartbeat_type` is accepted as an alias.";
    "max_connections", "0", "Most connections at once; 0 is unlimited. Past it upgrades get 503 with Retry-After.";
    "max_message_size", "1048576", "Largest inbound frame or message in bytes; larger closes with 1009.";
    "reconnect_token_ttl", "1h", "How long a reconnect token and a detached session stay valid.";
    "enable_reconnect", "true", "Whether sessions can be resumed.";
    "reconnect_secret", "", "Key (at least 16 bytes) of the reconnect tokens' HMAC-SHA256; give every node of a cluster the same one. Empty: random at start, tokens valid on this node only.";
    "compression", "deflate", "`deflate` (permessage-deflate, no context takeover, shared pool) or `none`.";
    "log_level", "info", "`error`, `warn`, `info`, `debug`, `trace`, or a tracing env-filter string.";
    "log_format", "text", "`text` or `json`.";
    "enable_metrics", "true", "Whether `/metrics` is served.";
    "num_shards", "16", "Shards of the connection and channel registries.";
    "max_concurrent_cleanup", "100", "Connections closed per batch in shutdown and eviction.";
    "max_concurrent_broadcast", "1000", "Queues a broadcast fills before yielding to other tasks.";
    "max_memory_per_connection", "0", "Most bytes of user data one connection may hold (0: unlimited); over it `set_user_data` fails.";
    "max_total_memory", "0", "Most bytes of user data plus queued output in all (0: unlimited); over it connections are evicted (1013).";
    "memory_eviction_policy", "lru", "`lru` (least recent inbound frame), `fifo` (first connected) or `oldest` (oldest user data).";
    "memory_check_interval", "60s", "How often total memory is checked.";
    "history_size", "100", "Publications kept per channel for recovery.";
    "history_ttl", "5m", "How long a publication stays in history.";
    "presence_ttl", "51s", "How long presence outlives a client's last sign of life when it vanished without a clean close.";
    "presence_events", "false", "Whether channels carry `join` / `leave` events as channel messages (`data: {\"presence\": \"join\", \"client_id\", \"info\"}`).";
    "send_queue_max_messages", "1024", "Most messages queued for one connection.";
    "send_queue_max_bytes", "524288", "Most bytes queued for one connection.";
    "slow_consumer_policy", "drop_oldest", "`drop_oldest`, `drop_newest` or `disconnect` (4000 after `slow_consumer_timeout` full).";
    "slow_consumer_timeout", "5s", "Under `disconnect`, how long a queue may stay full.";
    "allowed_origins", "", "Comma-separated origins allowed to connect (`https://*.example.com` matches subdomains); empty allows same-origin and no Origin.";
    "auth_jwt_secret", "", "`[auth] jwt_secret`: HMAC key (at least 16 bytes) of HS256/384/512 JWTs in `?token=`, the cookie or `auth`. Empty: no HS tokens.";
    "auth_jwt_public_key_file", "", "`[auth] jwt_public_key_file`: PEM public key (RSA or EC) of RS256/ES256 JWTs.";
    "auth_allow_anonymous", "true", "`[auth] allow_anonymous`: clients without credentials connect with a generated client_id; false answers them 401 (unless `first_message`).";
    "auth_first_message", "false", "`[auth] first_message`: a client without credentials may send `auth` as its first frame within `auth_timeout` (else close 1008).";
    "auth_timeout", "5s", "`[auth] timeout`: time a first-message client has to authenticate.";
    "auth_cookie_name", "keel_token", "`[auth] cookie_name`: cookie whose value is checked like a `?token=` JWT.";
    "auth_ticket_ttl", "30s", "`[auth] ticket_ttl`: lifetime of a one-time ticket from `POST /api/ticket`.";
    "auth_refresh_grace", "30s", "`[auth] refresh_grace`: after its JWT expires (error `token_expired`), a connection has this long to `refresh` before close 1008.";
    "max_subscriptions_per_connection", "1000", "Most channels one connection may be subscribed to (0: unlimited); past it `subscribe` gets `limit_exceeded`.";
    "max_channel_name_length", "255", "Longest channel name in bytes; longer names get `invalid_message`.";
    "max_connections_per_ip", "0", "Most connections one client address may hold (0: unlimited); past it upgrades get 503.";
    "connection_rate_per_ip", "0", "New connections per second one client address may open (0: no limit); over it upgrades get 429.";
    "connection_burst_per_ip", "20", "Connections an address may open at once above `connection_rate_per_ip`.";
    "trusted_proxies", "", "Comma-separated addresses or CIDR blocks of proxies whose `X-Forwarded-For` names the client; from anyone else the header is ignored.";
    "rate_limit_messages", "0", "Messages per second one connection may send (token bucket; 0: no limit). Over it: `error rate_limited` and the message is dropped.";
    "rate_limit_burst", "50", "Depth of the bucket: messages a connection may send at once above the rate.";
    "rate_limit_close_after", "10s", "A connection that keeps exceeding the rate this long is closed with 4003.";
    "tls_cert", "", "PEM certificate chain: the gateway serves `wss://` and `https://` itself (with `tls_key`). Empty: plain TCP (TLS at a proxy).";
    "tls_key", "", "PEM private key of `tls_cert`.";
    "broker", "memory", "`memory` (one node) or `redis` (cluster; arrives with the Redis broker).";
    "redis_url", "redis://127.0.0.1:6379", "Redis URL for `broker = \"redis\"`.";
    "drain_timeout", "30s", "How long a graceful shutdown waits before force-closing.";
    "shutdown_reconnect_window", "5s", "Clients' reconnect delays after a shutdown are spread uniformly over this window.";
    "close_timeout", "3s", "How long to wait for the peer's close frame before dropping the socket.";
    "read_buffer_size", "128", "Initial read buffer per connection in bytes (grows for larger frames, shrinks back): a client message that fits is one read; memory per idle connection grows with it.";
    "write_buffer_size", "0", "Initial write buffer per connection in bytes (grows for bursts, shrinks back).";
    "worker_threads", "0", "Gateway runtime threads; 0 is one per core the process may use (taskset, cgroup), and one means tokio's current-thread scheduler.";
}

impl Config {
    /// Sets option `name` from its text form, as written in a file, a `KEEL_*`
    /// variable or a flag. Unknown names and bad values are refused, naming the option.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        let err = |message: String| ConfigError {
            option: name.to_string(),
            message,
        };
        let v = value.trim();
        match name {
            "listen" => {
                self.listen = v
                    .parse()
                    .map_err(|_| err(format!("`{v}` is not an address like 127.0.0.1:8000")))?
            }
            "ws_path" => {
                if !v.starts_with('/') {
                    return Err(err(format!("`{v}` must start with `/`")));
                }
                self.ws_path = v.into()
            }
            "node_id" => self.node_id = v.into(),
            "api_key" => self.api_key = (!v.is_empty()).then(|| v.to_string()),
            "heartbeat_interval" => self.heartbeat_interval = positive_duration(v).map_err(err)?,
            "heartbeat_timeout" => self.heartbeat_timeout = positive_duration(v).map_err(err)?,
            "heartbeat_mode" | "heartbeat_type" => {
                self.heartbeat_mode = match v {
                    "ws" | "ping" => HeartbeatMode::Ws,
                    "json" | "custom" => HeartbeatMode::Json,
                    "both" => HeartbeatMode::Both,
                    _ => return Err(err(format!("`{v}` is not one of ws, json, both"))),
                }
            }
            "max_connections" => self.max_connections = optional_count(v).map_err(err)?,
            "max_message_size" => self.max_message_size = positive(v).map_err(err)?,
            "reconnect_token_ttl" => {
                self.reconnect_token_ttl = positive_duration(v).map_err(err)?
            }
            "enable_reconnect" => self.enable_reconnect = boolean(v).map_err(err)?,
            "reconnect_secret" => {
                if !v.is_empty() && v.len() < 16 {
                    return Err(err("must be at least 16 bytes long".into()));
                }
                self.reconnect_secret = (!v.is_empty()).then(|| v.to_string())
            }
            "compression" => {
                self.compression = match v {
                    "deflate" => Compression::Deflate,
                    "none" => Compression::None,
                    _ => return Err(err(format!("`{v}` is not one of deflate, none"))),
                }
            }
            "log_level" => {
                if v.is_empty() {
                    return Err(err("must not be empty".into()));
                }
                self.log_level = v.to_ascii_lowercase()
            }
            "log_format" => {
                self.log_format = match v {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(err(format!("`{v}` is not one of text, json"))),
                }
            }
            "enable_metrics" => self.enable_metrics = boolean(v).map_err(err)?,
            "num_shards" => self.num_shards = positive(v).map_err(err)?,
            "max_concurrent_cleanup" => self.max_concurrent_cleanup = positive(v).map_err(err)?,
            "max_concurrent_broadcast" => {
                self.max_concurrent_broadcast = positive(v).map_err(err)?
            }
            "max_memory_per_connection" => {
                self.max_memory_per_connection = optional_count(v).map_err(err)?
            }
            "max_total_memory" => self.max_total_memory = optional_count(v).map_err(err)?,
            "memory_eviction_policy" => {
                self.memory_eviction_policy = match v.to_ascii_lowercase().as_str() {
                    "lru" => EvictionPolicy::Lru,
                    "fifo" => EvictionPolicy::Fifo,
                    "oldest" => EvictionPolicy::Oldest,
                    _ => return Err(err(format!("`{v}` is not one of lru, fifo, oldest"))),
                }
            }
            "memory_check_interval" => {
                self.memory_check_interval = positive_duration(v).map_err(err)?
            }
            "history_size" => self.history_size = count(v).map_err(err)?,
            "history_ttl" => self.history_ttl = positive_duration(v).map_err(err)?,
            "presence_ttl" => self.presence_ttl = positive_duration(v).map_err(err)?,
            "presence_events" => self.presence_events = boolean(v).map_err(err)?,
            "send_queue_max_messages" => self.send_queue_max_messages = positive(v).map_err(err)?,
            "send_queue_max_bytes" => self.send_queue_max_bytes = positive(v).map_err(err)?,
            "slow_consumer_policy" => {
                self.slow_consumer_policy = match v {
                    "drop_oldest" => SlowConsumerPolicy::DropOldest,
                    "drop_newest" => SlowConsumerPolicy::DropNewest,
                    "disconnect" => SlowConsumerPolicy::Disconnect,
                    _ => {
                        return Err(err(format!(
                            "`{v}` is not one of drop_oldest, drop_newest, disconnect"
                        )))
                    }
                }
            }
            "slow_consumer_timeout" => {
                self.slow_consumer_timeout = positive_duration(v).map_err(err)?
            }
            "allowed_origins" => {
                self.allowed_origins = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.trim_end_matches('/').to_ascii_lowercase())
                    .collect()
            }
            "auth_jwt_secret" => {
                if !v.is_empty() && v.len() < 16 {
                    return Err(err("must be at least 16 bytes long".into()));
                }
                self.auth_jwt_secret = (!v.is_empty()).then(|| v.to_string())
            }
            "auth_jwt_public_key_file" => {
                self.auth_jwt_public_key_file = (!v.is_empty()).then(|| v.into())
            }
            "auth_allow_anonymous" => self.auth_allow_anonymous = boolean(v).map_err(err)?,
            "auth_first_message" => self.auth_first_message = boolean(v).map_err(err)?,
            "auth_timeout" => self.auth_timeout = positive_duration(v).map_err(err)?,
            "auth_cookie_name" => {
                if v.is_empty()
                    || !v
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(err(format!("`{v}` is not a cookie name")));
                }
                self.auth_cookie_name = v.into()
            }
            "auth_ticket_ttl" => self.auth_ticket_ttl = positive_duration(v).map_err(err)?,
            "auth_refresh_grace" => self.auth_refresh_grace = duration(v).map_err(err)?,
            "max_subscriptions_per_connection" => {
                self.max_subscriptions_per_connection = optional_count(v).map_err(err)?
            }
            "max_channel_name_length" => {
                let n = positive(v).map_err(err)?;
                if n > 1024 {
                    return Err(err("must be at most 1024".into()));
                }
                self.max_channel_name_length = n
            }
            ns if ns.starts_with("namespaces.") => self.set_namespace(ns, v).map_err(err)?,
            "max_connections_per_ip" => {
                self.max_connections_per_ip = optional_count(v).map_err(err)?
            }
            "connection_rate_per_ip" => {
                self.connection_rate_per_ip = count(v)
                    .map_err(err)?
                    .try_into()
                    .map_err(|_| err(format!("`{v}` is too large")))?
            }
            "connection_burst_per_ip" => {
                self.connection_burst_per_ip = positive(v)
                    .map_err(err)?
                    .try_into()
                    .map_err(|_| err(format!("`{v}` is too large")))?
            }
            "trusted_proxies" => {
                self.trusted_proxies = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(Cidr::parse)
                    .collect::<Result<_, _>>()
                    .map_err(err)?
            }
            "rate_limit_messages" => {
                self.rate_limit_messages = count(v)
                    .map_err(err)?
                    .try_into()
                    .map_err(|_| err(format!("`{v}` is too large")))?
            }
            "rate_limit_burst" => {
                self.rate_limit_burst = positive(v)
                    .map_err(err)?
                    .try_into()
                    .map_err(|_| err(format!("`{v}` is too large")))?
            }
            "rate_limit_close_after" => {
                self.rate_limit_close_after = positive_duration(v).map_err(err)?
            }
            "tls_cert" => self.tls_cert = (!v.is_empty()).then(|| v.into()),
            "tls_key" => self.tls_key = (!v.is_empty()).then(|| v.into()),
            "broker" => {
                self.broker = match v {
                    "memory" => BrokerKind::Memory,
                    "redis" => BrokerKind::Redis,
                    _ => return Err(err(format!("`{v}` is not one of memory, redis"))),
                }
            }
            "redis_url" => {
                if !(v.starts_with("redis://") || v.starts_with("rediss://")) {
                    return Err(err(format!("`{v}` is not a redis:// URL")));
                }
                self.redis_url = v.into()
            }
            "drain_timeout" => self.drain_timeout = positive_duration(v).map_err(err)?,
            "shutdown_reconnect_window" => {
                self.shutdown_reconnect_window = duration(v).map_err(err)?
            }
            "close_timeout" => self.close_timeout = positive_duration(v).map_err(err)?,
            "read_buffer_size" => self.read_buffer_size = count(v).map_err(err)?,
            "write_buffer_size" => self.write_buffer_size = count(v).map_err(err)?,
            "worker_threads" => self.worker_threads = count(v).map_err(err)?,
            _ => return Err(err("unknown option".into())),
        }
        Ok(())
    }

    /// `namespaces.NAME` (creates it) or `namespaces.NAME.KEY` with `value`.
    fn set_namespace(&mut self, option: &str, v: &str) -> Result<(), String> {
        let rest = &option["namespaces.".len()..];
        let (name, key) = match rest.split_once('.') {
            Some((n, k)) => (n, Some(k)),
            None => (rest, None),
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(format!(
                "`{name}` is not a namespace name (letters, digits, - and _)"
            ));
        }
        let i = match self.namespaces.iter().position(|n| n.name == name) {
            Some(i) => i,
            None => {
                self.namespaces.push(Namespace::new(name));
                self.namespaces.len() - 1
            }
        };
        let n = &mut self.namespaces[i];
        use SubscribeRule as S;
        match key {
            None | Some("name") => {}
            Some("subscribe") => {
                n.subscribe = match v {
                    "anyone" => S::Anyone,
                    "authenticated" => S::Authenticated,
                    "claim" => S::Claim,
                    _ => return Err(format!("`{v}` is not one of anyone, authenticated, claim")),
                }
            }
            Some("publish") => n.publish = boolean(v)?,
            Some("presence") => n.presence = boolean(v)?,
            Some("presence_events") => n.presence_events = Some(boolean(v)?),
            Some("history_size") => n.history_size = Some(count(v)?),
            Some("history_ttl") => n.history_ttl = Some(positive_duration(v)?),
            Some(other) => return Err(format!("unknown namespace setting `{other}`")),
        }
        Ok(())
    }

    /// Whether any credential is configured (a JWT key of either kind).
    pub fn auth_configured(&self) -> bool {
        self.auth_jwt_secret.is_some() || self.auth_jwt_public_key_file.is_some()
    }

    /// Checks relations between options that no single value can break alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |option: &str, message: &str| ConfigError {
            option: option.into(),
            message: message.into(),
        };
        if self.max_message_size < 16 {
            return Err(err("max_message_size", "must be at least 16 bytes"));
        }
        if self.send_queue_max_bytes < self.max_message_size.min(64 * 1024) {
            return Err(err(
                "send_queue_max_bytes",
                "must hold at least one message of max_message_size (or 64 KiB)",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(err("tls_cert", "tls_cert and tls_key go together"));
        }
        if self.num_shards > 4096 {
            return Err(err("num_shards", "must be at most 4096"));
        }
        Ok(())
    }

    /// The name under which an option is read from the environment (`KEEL_HEARTBEAT_INTERVAL`).
    pub fn env_name(option: &str) -> String {
        format!("KEEL_{}", option.to_ascii_uppercase())
    }
}

/// Parses `25s`, `500ms`, `5m`, `1h`, `2d` (also `1.5s`).
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let bad = || format!("`{v}` is not a duration like 25s, 500ms, 5m or 1h");
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn duration(v: &str) -> Result<Duration, String> {
    parse_duration(v)
}

fn positive_duration(v: &str) -> Result<Duration, String> {
    let d = parse_duration(v)?;
    if d.is_zero() {
        return Err(format!("`{v}` must be greater than zero"));
    }
    Ok(d)
}

fn count(v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .map_err(|_| format!("`{v}` is not a whole number"))
}

fn positive(v: &str) -> Result<usize, String> {
    match count(v)? {
        0 => Err(format!("`{v}` must be greater than zero")),
        n => Ok(n),
    }
}

fn optional_count(v: &str) -> Result<Option<usize>, String> {
    Ok(match count(v)? {
        0 => None,
        n => Some(n),
    })
}

fn boolean(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("`{v}` is not true or false")),
    }
}

/// Who may subscribe to a namespace's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRule {
    /// Any connection, anonymous ones included.
    Anyone,
    /// Connections that authenticated with a credential.
    Authenticated,
    /// Only channels listed in the connection's JWT `channels` claim.
    Claim,
}

/// An address or a CIDR block, from `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `192.168.1.7` or `::1`.
    pub fn parse(s: &str) -> std::result::Result<Cidr, String> {
        let bad = || format!("`{s}` is not an address or CIDR block");
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside the block.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        match (self.addr, ip) {
            (std::net::IpAddr::V4(net), std::net::IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (std::net::IpAddr::V6(net), std::net::IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_defaults_are_the_real_defaults() {
        let mut c = Config::default();
        for o in OPTIONS {
            c.set(o.name, o.default)
                .unwrap_or_else(|e| panic!("default of {} does not parse: {e}", o.name));
        }
        assert_eq!(c, Config::default());
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("25").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn bad_values_name_the_option() {
        let mut c = Config::default();
        let e = c.set("heartbeat_interval", "soon").unwrap_err();
        assert_eq!(e.option, "heartbeat_interval");
        assert!(e.to_string().contains("heartbeat_interval"));
        assert_eq!(c.set("nope", "1").unwrap_err().message, "unknown option");
        assert!(c.set("heartbeat_interval", "0s").is_err());
        assert!(c.set("slow_consumer_policy", "yolo").is_err());
    }

    #[test]
    fn aliases_and_lists() {
        let mut c = Config::default();
        c.set("heartbeat_type", "json").expect("alias");
        assert_eq!(c.heartbeat_mode, HeartbeatMode::Json);
        c.set("allowed_origins", "https://A.example.com/, https://*.x.org")
            .expect("list");
        assert_eq!(
            c.allowed_origins,
            vec!["https://a.example.com", "https://*.x.org"]
        );
        c.set("max_connections", "0").expect("zero");
        assert_eq!(c.max_connections, None);
    }
}

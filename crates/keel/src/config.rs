//! [`Config`]: every option the library reads, with its default, and the one
//! function ([`Config::set`]) that reads an option from text.
//!
//! Each option is declared once (`declare_options!`: field, type, default,
//! parser, doc); the struct, its defaults, the `OPTIONS` table behind
//! `docs/configuration.md` and the `KEEL_*` names, and the parsing in
//! [`Config::set`] all come from that declaration. The gateway declares its own
//! options (listen address, TLS, API key, logs, broker) the same way, beside a
//! `Config`.
//!
//! Files, environment variables and command-line flags all go through `set`, so
//! an option is spelled, parsed and refused the same way wherever it comes from,
//! and an error always names the option. This module does not read files or the
//! environment itself, and it imports nothing else of the crate (a leaf).

use std::fmt;
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
    /// History bytes per channel (`None`: the top-level `history_max_bytes`).
    pub history_max_bytes: Option<usize>,
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
            history_max_bytes: None,
        }
    }
}

/// Declares a struct of options once: for each option its field, type, default
/// (as text), parser and doc. From that come the struct, its `Default` (each
/// default parsed by the option's own parser), its `OPTIONS` table (name, default,
/// doc: what `docs/configuration.md` and the `KEEL_*` names are made from) and
/// `set_declared`, which sets one option from text. Used for [`Config`] and for
/// the gateway's settings, which contain a `Config`.
#[doc(hidden)]
#[macro_export]
macro_rules! declare_options {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            options {
                $(
                    $(#[doc = $doc:literal])+
                    $field:ident : $ty:ty = $default:literal, $parse:expr $(, alias $alias:literal)? ;
                )*
            }
            extra {
                $(
                    $(#[doc = $edoc:literal])+
                    $efield:ident : $ety:ty = $edefault:expr ;
                )*
            }
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[doc = $doc])+ pub $field: $ty, )*
            $( $(#[doc = $edoc])+ pub $efield: $ety, )*
        }

        impl ::std::default::Default for $name {
            fn default() -> Self {
                $name {
                    $( $field: match ($parse)($default) {
                        ::std::result::Result::Ok(v) => v,
                        ::std::result::Result::Err(e) => {
                            panic!("the default of `{}` does not parse: {}", stringify!($field), e)
                        }
                    }, )*
                    $( $efield: $edefault, )*
                }
            }
        }

        impl $name {
            /// Every option declared here, in order: its name, its default as
            /// text and what it does.
            pub const OPTIONS: &'static [$crate::config::OptionInfo] = &[
                $( $crate::config::OptionInfo {
                    name: stringify!($field),
                    default: $default,
                    doc: concat!($($doc),+),
                }, )*
            ];

            /// Sets option `name` from text if it is declared here; `None` for a
            /// name that is not.
            fn set_declared(
                &mut self,
                name: &str,
                value: &str,
            ) -> ::std::option::Option<::std::result::Result<(), $crate::config::ConfigError>> {
                let value = value.trim();
                let parsed = match name {
                    $( stringify!($field) $(| $alias)? => ($parse)(value).map(|v| self.$field = v), )*
                    _ => return ::std::option::Option::None,
                };
                ::std::option::Option::Some(parsed.map_err(|message| $crate::config::ConfigError {
                    option: name.to_string(),
                    message,
                }))
            }
        }
    };
}

declare_options! {
    /// Every option the library reads, defaulted. The gateway's settings contain
    /// one, with the gateway's own options beside it; see
    /// `docs/configuration.md` for the table.
    #[derive(Debug, Clone, PartialEq)]
    #[non_exhaustive]
    pub struct Config {
        options {
            /// Time between server heartbeats; keep it below every idle timeout on the path.
            heartbeat_interval: Duration = "25s", parse::positive_duration;
            /// Grace after an interval of silence; a connection silent for interval + timeout is closed (4001).
            heartbeat_timeout: Duration = "25s", parse::positive_duration;
            /// `ws` (Ping frames), `json` (`ping` envelopes) or `both`. `heartbeat_type` is accepted as an alias.
            heartbeat_mode: HeartbeatMode = "both", parse::heartbeat_mode, alias "heartbeat_type";
            /// Most connections at once; 0 is unlimited. Past it upgrades get 503 with Retry-After.
            max_connections: Option<usize> = "0", parse::optional_count;
            /// Largest inbound frame or message in bytes; larger closes with 1009.
            max_message_size: usize = "1048576", parse::positive;
            /// How long a reconnect token and a detached session stay valid.
            reconnect_token_ttl: Duration = "1h", parse::positive_duration;
            /// Whether sessions can be resumed.
            enable_reconnect: bool = "true", parse::boolean;
            /// Key (at least 16 bytes) of the reconnect tokens' HMAC-SHA256; give every node of a cluster the same one. Empty: random at start, tokens valid on this node only.
            reconnect_secret: Option<String> = "", parse::optional_secret;
            /// `deflate` (permessage-deflate, no context takeover, shared pool) or `none`.
            compression: Compression = "deflate", parse::compression;
            /// Shards of the connection and channel registries.
            num_shards: usize = "16", parse::positive;
            /// Connections closed per batch in shutdown and eviction.
            max_concurrent_cleanup: usize = "100", parse::positive;
            /// Queues a broadcast fills before yielding to other tasks.
            max_concurrent_broadcast: usize = "1000", parse::positive;
            /// Most bytes of user data one connection may hold (0: unlimited); over it `set_user_data` fails.
            max_memory_per_connection: Option<usize> = "0", parse::optional_count;
            /// Most bytes of user data plus queued output in all (0: unlimited); over it connections are evicted (1013) by `memory_eviction_policy`. Without it, 19,000 slow readers with full 512 KiB queues would hold 9.7 GB.
            max_total_memory: Option<usize> = "1073741824", parse::optional_count;
            /// `lru` (least recent inbound frame), `fifo` (first connected) or `oldest` (oldest user data).
            memory_eviction_policy: EvictionPolicy = "lru", parse::eviction_policy;
            /// How often total memory is checked.
            memory_check_interval: Duration = "10s", parse::positive_duration;
            /// Publications kept per channel for recovery.
            history_size: usize = "100", parse::count;
            /// Most bytes of history one channel keeps (0: only `history_size` bounds it); past it its oldest publications go first. Without it, `history_size` messages near `max_message_size` would be 100 MiB in one channel.
            history_max_bytes: usize = "4194304", parse::count;
            /// Most bytes of history in all channels together (0: unbounded); past it the oldest publications of the channels holding most go first, and a recovery that needed them answers `recovered: false`.
            max_history_memory: Option<usize> = "268435456", parse::optional_count;
            /// Most channels at once (with subscribers, history or presence; 0: unbounded); past it a subscribe or publish that would create one gets `limit_exceeded`.
            max_channels: Option<usize> = "100000", parse::optional_count;
            /// Most detached sessions kept for a resume (0: unbounded); past it the ones closest to expiry go first (their resume answers `token_expired`), so clients that connect and vanish in a loop cannot fill memory for `reconnect_token_ttl`.
            max_detached_sessions: Option<usize> = "100000", parse::optional_count;
            /// Most presence entries in all channels together (0: unbounded); past it a subscribe that would add one gets `limit_exceeded`.
            max_presence_entries: Option<usize> = "1000000", parse::optional_count;
            /// How long a publication stays in history.
            history_ttl: Duration = "5m", parse::positive_duration;
            /// How long presence outlives a client's last sign of life when it vanished without a clean close.
            presence_ttl: Duration = "51s", parse::positive_duration;
            /// Whether channels carry `join` / `leave` events as channel messages (`data: {"presence": "join", "client_id", "info"}`).
            presence_events: bool = "false", parse::boolean;
            /// Most messages queued for one connection.
            send_queue_max_messages: usize = "1024", parse::positive;
            /// Most bytes queued for one connection.
            send_queue_max_bytes: usize = "524288", parse::positive;
            /// `drop_oldest`, `drop_newest` or `disconnect` (4000 after `slow_consumer_timeout` full).
            slow_consumer_policy: SlowConsumerPolicy = "drop_oldest", parse::slow_consumer_policy;
            /// Under `disconnect`, how long a queue may stay full.
            slow_consumer_timeout: Duration = "5s", parse::positive_duration;
            /// `[auth] jwt_secret`: HMAC key (at least 16 bytes) of HS256/384/512 JWTs in `?token=`, the cookie or `auth`. Empty: no HS tokens.
            auth_jwt_secret: Option<String> = "", parse::optional_secret;
            /// `[auth] jwt_public_key_file`: PEM public key (RSA or EC) of RS256/ES256 JWTs.
            auth_jwt_public_key_file: Option<std::path::PathBuf> = "", parse::optional_path;
            /// `[auth] first_message`: a client without credentials may send `auth` as its first frame within `auth_timeout` (else close 1008).
            auth_first_message: bool = "false", parse::boolean;
            /// `[auth] timeout`: time a first-message client has to authenticate.
            auth_timeout: Duration = "5s", parse::positive_duration;
            /// `[auth] refresh_grace`: after its JWT expires (error `token_expired`), a connection has this long to `refresh` before close 1008.
            auth_refresh_grace: Duration = "30s", parse::duration;
            /// Most channels one connection may be subscribed to (0: unlimited); past it `subscribe` gets `limit_exceeded`.
            max_subscriptions_per_connection: Option<usize> = "1000", parse::optional_count;
            /// Longest channel name in bytes; longer names get `invalid_message`.
            max_channel_name_length: usize = "255", parse::channel_name_length;
            /// Deepest nesting of arrays and objects in a publication's `data`; deeper is refused (`invalid_message`, HTTP 400) before anyone receives it: many clients' JSON parsers stop near 100 levels and could never read it.
            max_data_depth: usize = "64", parse::positive;
            /// How long a new connection may take from its accept to a whole request head (a TLS handshake gets as long again before it), and an HTTP keep-alive connection may stay idle; past it the connection is closed, so silent sockets cannot hold descriptors.
            handshake_timeout: Duration = "10s", parse::positive_duration;
            /// Most connections open at once that are not WebSockets (handshaking, or plain HTTP; 0: unlimited); past it accepting waits until one upgrades, closes or times out, so they cannot take the descriptors WebSockets need.
            max_pending_connections: Option<usize> = "2048", parse::optional_count;
            /// Most connections one client address may hold (0: unlimited); past it upgrades get 503.
            max_connections_per_ip: Option<usize> = "0", parse::optional_count;
            /// New connections per second one client address may open (0: no limit); over it upgrades get 429.
            connection_rate_per_ip: u32 = "0", parse::count_u32;
            /// Connections an address may open at once above `connection_rate_per_ip`.
            connection_burst_per_ip: u32 = "20", parse::positive_u32;
            /// Comma-separated addresses or CIDR blocks of proxies whose `X-Forwarded-For` names the client; from anyone else the header is ignored.
            trusted_proxies: Vec<Cidr> = "", parse::cidrs;
            /// Messages per second one connection may send (token bucket; 0: no limit). Over it: `error rate_limited` and the message is dropped. The default is above what an interactive client sends and stops one connection from flooding; load generators raise it.
            rate_limit_messages: u32 = "100", parse::count_u32;
            /// Depth of the bucket: messages a connection may send at once above the rate (a client resubscribing to hundreds of channels after a reconnect fits).
            rate_limit_burst: u32 = "500", parse::positive_u32;
            /// A connection that keeps exceeding the rate this long is closed with 4003.
            rate_limit_close_after: Duration = "10s", parse::positive_duration;
            /// Clients' reconnect delays after a shutdown are spread uniformly over this window.
            shutdown_reconnect_window: Duration = "5s", parse::duration;
            /// How long to wait for the peer's close frame before dropping the socket.
            close_timeout: Duration = "3s", parse::positive_duration;
            /// Initial read buffer per connection in bytes (grows for larger frames, shrinks back): a client message that fits is one read; memory per idle connection grows with it.
            read_buffer_size: usize = "128", parse::count;
            /// Initial write buffer per connection in bytes (grows for bursts, shrinks back).
            write_buffer_size: usize = "0", parse::count;
        }
        extra {
            /// Channel namespaces (`[[namespaces]]` in the file; `namespaces.NAME.KEY` as
            /// a flag), each with its own permissions and history.
            namespaces: Vec<Namespace> = Vec::new();
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

impl Config {
    /// Sets option `name` from its text form, as written in a file, a `KEEL_*`
    /// variable or a flag (`namespaces.NAME.KEY` for a namespace's settings).
    /// Unknown names and bad values are refused, naming the option.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        if let Some(done) = self.set_declared(name, value) {
            return done;
        }
        let err = |message: String| ConfigError {
            option: name.to_string(),
            message,
        };
        if name.starts_with("namespaces.") {
            return self.set_namespace(name, value.trim()).map_err(err);
        }
        Err(err("unknown option".into()))
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
            Some("publish") => n.publish = parse::boolean(v)?,
            Some("presence") => n.presence = parse::boolean(v)?,
            Some("presence_events") => n.presence_events = Some(parse::boolean(v)?),
            Some("history_size") => n.history_size = Some(parse::count(v)?),
            Some("history_ttl") => n.history_ttl = Some(parse::positive_duration(v)?),
            Some("history_max_bytes") => n.history_max_bytes = Some(parse::count(v)?),
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
    parse::duration(v)
}

/// Parsers of option values: each takes the text as written in a file, a
/// `KEEL_*` variable or a flag, and returns the value or what is wrong with it.
pub mod parse {
    use std::time::Duration;

    use super::{Cidr, Compression, EvictionPolicy, HeartbeatMode, SlowConsumerPolicy};

    /// Parses `25s`, `500ms`, `5m`, `1h`, `2d` (also `1.5s`).
    pub fn parse_duration_impl(v: &str) -> Result<Duration, String> {
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

    /// A duration, zero allowed.
    pub fn duration(v: &str) -> Result<Duration, String> {
        parse_duration_impl(v)
    }

    /// A duration greater than zero.
    pub fn positive_duration(v: &str) -> Result<Duration, String> {
        let d = parse_duration_impl(v)?;
        if d.is_zero() {
            return Err(format!("`{v}` must be greater than zero"));
        }
        Ok(d)
    }

    /// A whole number.
    pub fn count(v: &str) -> Result<usize, String> {
        v.parse::<usize>()
            .map_err(|_| format!("`{v}` is not a whole number"))
    }

    /// A whole number greater than zero.
    pub fn positive(v: &str) -> Result<usize, String> {
        match count(v)? {
            0 => Err(format!("`{v}` must be greater than zero")),
            n => Ok(n),
        }
    }

    /// A whole number, 0 meaning none (unlimited).
    pub fn optional_count(v: &str) -> Result<Option<usize>, String> {
        Ok(match count(v)? {
            0 => None,
            n => Some(n),
        })
    }

    /// `true`/`false` (also 1/0, yes/no, on/off).
    pub fn boolean(v: &str) -> Result<bool, String> {
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("`{v}` is not true or false")),
        }
    }

    /// Any text.
    pub fn text(v: &str) -> Result<String, String> {
        Ok(v.to_string())
    }

    /// Text, empty meaning none.
    pub fn optional_text(v: &str) -> Result<Option<String>, String> {
        Ok((!v.is_empty()).then(|| v.to_string()))
    }

    /// A file path, empty meaning none.
    pub fn optional_path(v: &str) -> Result<Option<std::path::PathBuf>, String> {
        Ok((!v.is_empty()).then(|| v.into()))
    }

    /// A secret key of at least 16 bytes, empty meaning none.
    pub fn optional_secret(v: &str) -> Result<Option<String>, String> {
        if !v.is_empty() && v.len() < 16 {
            return Err("must be at least 16 bytes long".into());
        }
        optional_text(v)
    }

    /// A whole number that fits 32 bits.
    pub fn count_u32(v: &str) -> Result<u32, String> {
        count(v)?
            .try_into()
            .map_err(|_| format!("`{v}` is too large"))
    }

    /// A whole number greater than zero that fits 32 bits.
    pub fn positive_u32(v: &str) -> Result<u32, String> {
        positive(v)?
            .try_into()
            .map_err(|_| format!("`{v}` is too large"))
    }

    /// A comma-separated list; blanks are dropped.
    pub fn list(v: &str) -> Result<Vec<String>, String> {
        Ok(v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// One of `choices` (name, value), by name.
    pub fn one_of<T: Copy>(v: &str, choices: &[(&str, T)]) -> Result<T, String> {
        choices
            .iter()
            .find(|(name, _)| *name == v)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                format!("`{v}` is not one of {}", names.join(", "))
            })
    }

    /// `ws` (also `ping`), `json` (also `custom`) or `both`.
    pub fn heartbeat_mode(v: &str) -> Result<HeartbeatMode, String> {
        match v {
            "ping" => Ok(HeartbeatMode::Ws),
            "custom" => Ok(HeartbeatMode::Json),
            _ => one_of(
                v,
                &[
                    ("ws", HeartbeatMode::Ws),
                    ("json", HeartbeatMode::Json),
                    ("both", HeartbeatMode::Both),
                ],
            ),
        }
    }

    /// `deflate` or `none`.
    pub fn compression(v: &str) -> Result<Compression, String> {
        one_of(
            v,
            &[
                ("deflate", Compression::Deflate),
                ("none", Compression::None),
            ],
        )
    }

    /// `lru`, `fifo` or `oldest` (any case).
    pub fn eviction_policy(v: &str) -> Result<EvictionPolicy, String> {
        one_of(
            &v.to_ascii_lowercase(),
            &[
                ("lru", EvictionPolicy::Lru),
                ("fifo", EvictionPolicy::Fifo),
                ("oldest", EvictionPolicy::Oldest),
            ],
        )
    }

    /// `drop_oldest`, `drop_newest` or `disconnect`.
    pub fn slow_consumer_policy(v: &str) -> Result<SlowConsumerPolicy, String> {
        one_of(
            v,
            &[
                ("drop_oldest", SlowConsumerPolicy::DropOldest),
                ("drop_newest", SlowConsumerPolicy::DropNewest),
                ("disconnect", SlowConsumerPolicy::Disconnect),
            ],
        )
    }

    /// A channel name length limit: 1 to 1024.
    pub fn channel_name_length(v: &str) -> Result<usize, String> {
        match positive(v)? {
            n if n > 1024 => Err("must be at most 1024".into()),
            n => Ok(n),
        }
    }

    /// Comma-separated addresses or CIDR blocks.
    pub fn cidrs(v: &str) -> Result<Vec<Cidr>, String> {
        list(v)?.iter().map(|s| Cidr::parse(s)).collect()
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
        for o in Config::OPTIONS {
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
        c.set("trusted_proxies", "10.0.0.0/8, ,::1").expect("list");
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(c.set("trusted_proxies", "10.0.0.0/99").is_err());
        c.set("max_connections", "0").expect("zero");
        assert_eq!(c.max_connections, None);
    }
}

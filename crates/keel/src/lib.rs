//! Keel: a WebSocket stabilization layer for tokio and axum.
//!
//! A [`Hub`] tracks connections, sends heartbeats and closes the silent ones,
//! keeps channels (rooms) with per-channel offsets, fans publications out without
//! ever waiting on a slow client, enforces connection, message-size and memory
//! limits, keeps per-connection user data, and shuts down gracefully with a
//! report. The `keel` gateway binary is built on this public API only.
//!
//! What it must not do: block a publisher on a socket, keep global state (a Hub is
//! a value; make as many as you like), or let one connection's failure (a panic in
//! a handler included) reach another.
//!
//! # Quick start
//!
//! ```no_run
//! use axum::{routing::get, Router, extract::State, response::IntoResponse};
//! use keel::{Config, Hub, Upgrade};
//!
//! async fn ws(State(hub): State<Hub>, upgrade: Upgrade) -> axum::response::Response {
//!     let id = uuid_like();
//!     match hub.connect(id, upgrade, serde_json::Value::Null) {
//!         Ok(response) => response,
//!         Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
//!     }
//! }
//! # fn uuid_like() -> String { "client-1".into() }
//!
//! # async fn run() {
//! let hub = Hub::new(Config::default());
//! hub.start();
//! let app: Router = Router::new().route("/ws", get(ws)).with_state(hub);
//! // keel::Listener sets TCP_NODELAY on accepted sockets, sends each upgrade's
//! // 101 with its first message and (route_upgrades) answers plain upgrades
//! // without hyper; `Peer` is the connect info that links the two (and gives
//! // per-address limits the client's address).
//! let listener = keel::Listener::bind("127.0.0.1:3000")
//!     .await
//!     .unwrap()
//!     .route_upgrades(app.clone());
//! axum::serve(listener, app.into_make_service_with_connect_info::<keel::Peer>())
//!     .await
//!     .unwrap();
//! # }
//! ```
//!
//! # Layout
//!
//! - [`hub`]: the [`Hub`] and its registry: connect, disconnect, send, broadcast,
//!   rooms, user data, metrics.
//! - [`connection`]: a [`Connection`] handle and the one task that owns each socket.
//! - `queue` (internal): the bounded per-connection send queue and the
//!   slow-consumer policies.
//! - [`ip_limits`]: per-address connection caps and rates, trusted proxies.
//! - [`listener`]: a TCP [`Listener`] for `axum::serve` that sends an upgrade's
//!   101 with the connection's first message and can answer plain upgrades
//!   without hyper, and its connect info [`Peer`].
//! - `rate` (internal): the per-connection message rate limit (token bucket).
//! - `heartbeat` (internal): the sweeper: pings, timeouts, slow consumers, memory
//!   checks.
//! - [`channel`]: channels, offsets, epochs, history and presence (the in-memory
//!   broker).
//! - [`session`]: sessions kept after a disconnect, for `resume`.
//! - [`token`]: reconnect tokens (HMAC-SHA256).
//! - [`auth`]: JWT verification, one-time tickets, [`Identity`].
//! - [`permissions`]: namespaces, private channels, [`Hub::authorize`].
//! - [`memory`]: user data accounting and eviction.
//! - [`shutdown`]: graceful shutdown and its [`ShutdownReport`].
//! - [`metrics`]: counters and the Prometheus rendering.
//! - [`config`]: [`Config`], every option with its default.
//! - [`handler`]: the [`Handler`] hooks.
//! - [`error`]: [`Error`] and [`ErrorKind`].
//! - `transport` (internal): WebSocket framing: our own (`transport::plain`) for
//!   connections without an extension, yawc for permessage-deflate; the only module
//!   that knows the WebSocket crate.

pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod error;
mod fanout;
pub mod handler;
mod heartbeat;
pub mod hub;
pub mod ip_limits;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod permissions;
mod queue;
mod rate;
pub mod session;
pub mod shutdown;
pub mod token;
mod transport;

pub use auth::{Authenticator, Identity, Tickets};
pub use broker::{
    Broker, History, HistoryQuery, MemoryBroker, Publication, StreamPosition, StreamPublication,
};
pub use config::Config;
pub use connection::{Connection, DisconnectReason, Message};
pub use error::{Error, ErrorKind, Result};
pub use fanout::{PresenceEntry, Subscribed};
pub use handler::{Deferred, Handler, NoopHandler};
pub use hub::{BroadcastResult, Hub};
pub use listener::{Listener, Peer};
pub use memory::MemoryUsage;
pub use metrics::MetricsSnapshot;
pub use permissions::Action;
pub use session::Resumed;
pub use shutdown::ShutdownReport;
pub use token::ReconnectClaims;
pub use transport::{Upgrade, UpgradeRejection};

/// Re-exported so applications can build raw JSON for [`Hub::publish`].
pub use serde_json::value::RawValue;

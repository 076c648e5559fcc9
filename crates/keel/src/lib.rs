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
//! let gate = hub.gate();
//! let app: Router = Router::new().route("/ws", get(ws)).with_state(hub);
//! // keel::Listener sets TCP_NODELAY on accepted sockets, sends each upgrade's
//! // 101 with its first message and (route_upgrades) answers plain upgrades
//! // without hyper. The Hub's gate bounds connections until they are
//! // WebSockets: handshake_timeout, max_pending_connections, and what happens
//! // when accept runs out of descriptors; keel::listener::serve is axum::serve
//! // with those deadlines (and `Peer` as each request's connect info).
//! let listener = keel::Listener::bind("127.0.0.1:3000")
//!     .await
//!     .unwrap()
//!     .route_upgrades(app.clone())
//!     .gate(gate.clone());
//! keel::listener::serve(listener, app, gate, std::future::pending()).await;
//! # }
//! ```
//!
//! # Layout
//!
//! The modules form layers; each uses only those above it in this list (and
//! `error`), never one below. `docs/architecture.md` draws them and follows one
//! publication from `publish` to the socket and one inbound frame to its handler.
//!
//! - [`error`], [`config`], `clock`: the [`Error`] type, [`Config`] (every
//!   option the library reads) and the library's clock (tokio's, so tests can
//!   pause it). Leaves: they import nothing else of the crate.
//! - [`listener`] and `transport` (internal): the I/O edge. A TCP [`Listener`]
//!   that sends an upgrade's 101 with the connection's first message and can
//!   answer plain upgrades without hyper, the [`Gate`] that bounds connections
//!   until they are WebSockets, and the HTTP serve loop that keeps its
//!   deadlines; WebSocket framing (our own for connections without an
//!   extension, yawc for permessage-deflate).
//! - [`broker`]: the [`Broker`] trait and the embedded [`MemoryBroker`]: what
//!   the nodes of a cluster share (channel streams with offsets, epochs and
//!   history as data, node interest and delivery, presence with TTLs, one-use
//!   tickets, detached sessions); knows nothing of connections.
//! - `conn` (internal; [`Connection`] and friends re-exported): one connection's
//!   shared state ([`Identity`], user data), its bounded send queue with the
//!   slow-consumer policies, and its message rate limit. Knows nothing of the
//!   Hub: pushing needs only the connection's delivery context (queue limits and
//!   drop counters).
//! - [`policy`]: who may connect and do what, as functions of their inputs:
//!   JWTs and tickets (kept in the broker), reconnect tokens, namespaces and
//!   channel permissions, per-address limits.
//! - [`metrics`]: counters and the Prometheus rendering.
//! - `hub` (internal; [`Hub`] and friends re-exported): the façade. Its parts:
//!   the registry and connect path (`hub/mod.rs`), the connection task
//!   (`driver`), local fan-out and the last hop (`fanout`), sessions and resume
//!   (`sessions`), the sweeper (`sweeper`: heartbeats, timeouts, slow consumers,
//!   expiry), user data and memory eviction (`user_data`), graceful shutdown
//!   (`shutdown`), and the application's [`Handler`] hooks (`handler`).

pub mod broker;
mod clock;
pub mod config;
mod conn;
pub mod error;
mod hub;
pub mod listener;
pub mod metrics;
pub mod policy;
mod transport;

pub use broker::{
    Broker, History, HistoryQuery, MemoryBroker, PresenceEntry, Publication, StreamPosition,
    StreamPublication,
};
pub use config::Config;
pub use conn::{Connection, DisconnectReason, Message};
pub use error::{Error, ErrorKind, Result};
pub use hub::fanout::Subscribed;
pub use hub::handler::{Deferred, Handler, NoopHandler};
pub use hub::sessions::Resumed;
pub use hub::shutdown::ShutdownReport;
pub use hub::user_data::MemoryUsage;
pub use hub::{BroadcastResult, Hub};
pub use listener::{Gate, Listener, Peer};
pub use metrics::MetricsSnapshot;
pub use policy::auth::{Authenticator, Identity, Tickets};
pub use policy::permissions::Action;
pub use policy::token::ReconnectClaims;
pub use transport::{Upgrade, UpgradeRejection};

/// Re-exported so applications can build raw JSON for [`Hub::publish`].
pub use serde_json::value::RawValue;

//! The `keel` gateway: Keel's wire protocol, HTTP API, health, metrics and graceful
//! drain, on top of the `keel` library's public API.
//!
//! It adds no connection logic of its own: everything about sockets, queues,
//! heartbeats and channels is the library's. What lives here is what only a
//! server process needs: where config comes from, the HTTP routes, logging, and
//! signals.
//!
//! # Layout
//!
//! - [`settings`]: the gateway's own options beside the library's `Config`, and
//!   where they come from: file, `KEEL_*` environment and flags.
//! - [`protocol`]: the protocol handler (a [`keel::Handler`]).
//! - [`app`]: the HTTP router, API-key check and the serve/drain loop.
//! - [`error`]: [`ApiError`](error::ApiError), every HTTP error answer.
//! - [`tls`]: `wss://` with rustls (`tls_cert`, `tls_key`).
//! - [`lb`]: `keel lb-config`, the load balancer's settings matching these.

pub mod app;
pub mod error;
pub mod lb;
pub mod protocol;
pub mod settings;
pub mod tls;

pub use app::{start, Running};

//! The Rust client for a Keel gateway: a connection that takes care of itself.
//!
//! [`Client::connect`] returns at once with a handle and a stream of [`Event`]s;
//! a background task connects, and when the connection drops (network switch,
//! proxy timeout, server restart, a silent server caught by the heartbeat
//! watchdog) it reconnects with exponential backoff and jitter, resumes the
//! session with its reconnect token, and replays what each channel missed, so the
//! application sees every message once and in order. Where that promise cannot be
//! kept (history no longer holds the gap), it says so with
//! [`Event::Unrecovered`] instead of delivering silently partial data.
//!
//! It must not retry anything whose outcome is unknown, and it never reconnects
//! after a close it was asked to make, after 1008 (refused), or after 4002
//! (another connection took the session over).
//!
//! ```no_run
//! # async fn run() -> keel_client::Result<()> {
//! use keel_client::{Client, ClientOptions, Event};
//! let (client, mut events) = Client::connect("ws://127.0.0.1:8000/ws", ClientOptions::default())?;
//! client.subscribe("chat").await?;
//! client.publish("chat", serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         println!("{} #{}: {}", m.channel, m.offset, m.data);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - `client`: [`Client`], [`ClientOptions`], and the task that owns the socket.
//! - [`backoff`]: reconnect delays ([`ReconnectOptions`]).
//! - `stream`: per-channel offsets, gap detection and repair.
//! - [`event`]: [`Event`], what the application is told.
//! - [`error`]: [`Error`] and [`ErrorKind`].
//! - `transport` (internal): the only module that knows the WebSocket crate.

pub mod backoff;
mod client;
pub mod error;
pub mod event;
mod stream;
mod transport;

pub use backoff::ReconnectOptions;
pub use client::{Client, ClientOptions, Events, Published, Subscribed};
pub use error::{Error, ErrorKind, Result};
pub use event::Event;
pub use stream::Publication;

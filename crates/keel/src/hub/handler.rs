//! [`Handler`]: the application's hooks into a Hub's connections (on_connect,
//! on_message, on_disconnect).
//!
//! Hooks run on the connection's own task, synchronously: they should queue work
//! (send, spawn), not block. Work that must wait (a publish or subscribe through a
//! broker) is handed back from `on_message` as a [`Deferred`]: the connection's
//! task runs it to the end before it reads the connection's next message, so one
//! connection's requests are handled in order while its writes go on. A panicking
//! hook closes only its own connection (1011). The Hub never calls a hook while
//! holding one of its locks.

use std::future::Future;
use std::pin::Pin;

use crate::conn::{Connection, DisconnectReason, Message};
use crate::hub::Hub;

/// Work that `on_connect` or `on_message` hands back to the connection's task: polled there
/// before the next message of the connection is read.
pub type Deferred = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Application hooks. Every method has a default that does nothing, except
/// `on_message`, which by default closes the connection with 1003 on binary
/// frames (text-only protocols are the common case).
pub trait Handler: Send + Sync + 'static {
    /// A connection was registered; nothing has been read from it yet. Return
    /// `Some` for work that must wait (joining a channel, say): the connection
    /// reads nothing until it is done.
    fn on_connect(&self, hub: &Hub, conn: &Connection) -> Option<Deferred> {
        let _ = (hub, conn);
        None
    }

    /// A complete message arrived. Return `Some` to finish handling it
    /// asynchronously (awaiting the Hub's `publish`, say): the connection reads
    /// nothing more until that future is done.
    fn on_message(&self, hub: &Hub, conn: &Connection, msg: Message<'_>) -> Option<Deferred> {
        let _ = hub;
        if let Message::Binary(_) = msg {
            conn.close(
                keel_protocol::close::UNSUPPORTED_DATA,
                "binary frames are not supported",
            );
        }
        None
    }

    /// The connection ended and was unregistered (it is in no channel any more).
    fn on_disconnect(&self, hub: &Hub, conn: &Connection, reason: DisconnectReason, code: u16) {
        let _ = (hub, conn, reason, code);
    }
}

/// A handler with the default behaviour.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopHandler;

impl Handler for NoopHandler {}

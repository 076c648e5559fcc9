//! [`Handler`]: the application's hooks into a Hub's connections (on_connect,
//! on_message, on_disconnect).
//!
//! Hooks run on the connection's own task, synchronously: they should queue work
//! (send, publish, spawn), not block. A panicking hook closes only its own
//! connection (1011). The Hub never calls a hook while holding one of its locks.

use crate::connection::{Connection, DisconnectReason, Message};
use crate::hub::Hub;

/// Application hooks. Every method has a default that does nothing, except
/// `on_message`, which by default closes the connection with 1003 on binary
/// frames (text-only protocols are the common case).
pub trait Handler: Send + Sync + 'static {
    /// A connection was registered; nothing has been read from it yet.
    fn on_connect(&self, hub: &Hub, conn: &Connection) {
        let _ = (hub, conn);
    }

    /// A complete message arrived.
    fn on_message(&self, hub: &Hub, conn: &Connection, msg: Message<'_>) {
        let _ = hub;
        if let Message::Binary(_) = msg {
            conn.close(
                keel_protocol::close::UNSUPPORTED_DATA,
                "binary frames are not supported",
            );
        }
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

//! What the client tells the application: connection changes, messages in order,
//! and the places where it could not keep its promise of no loss.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::stream::Publication;

/// One event of a client, in the order they happened.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A connection is up (`welcome` received). The identity is the welcome's; a
    /// [`Event::Resumed`] follows when the previous session came back.
    Connected {
        /// The client id the server assigned or confirmed.
        client_id: String,
        /// The session id.
        session_id: String,
        /// The node that answered.
        node: String,
    },
    /// The previous session was restored on the new connection.
    Resumed {
        /// The session's client id (now this connection's).
        client_id: String,
        /// Per channel: whether everything missed was replayed.
        recovered: BTreeMap<String, bool>,
    },
    /// The previous session could not be restored (token expired, invalid, or
    /// refused): the client continues as a new session and has subscribed again,
    /// recovering from history where it still can.
    SessionLost {
        /// The server's error code (`token_expired`, `invalid_token`, `forbidden`).
        code: String,
    },
    /// The connection ended.
    Disconnected {
        /// The close code, if the server sent one.
        code: Option<u16>,
        /// Why (the server's close reason, or what the client observed).
        reason: String,
        /// Whether the client will try again.
        will_reconnect: bool,
    },
    /// The client waits `delay` before attempt `attempt` (from 1).
    Reconnecting {
        /// Which attempt follows.
        attempt: u32,
        /// How long it waits first.
        delay: Duration,
    },
    /// A publication, in offset order per channel, each once.
    Message(Publication),
    /// Publications of `channel` from offset `from` to `to` (unknown when the
    /// channel's epoch changed) were lost: history no longer had them. What
    /// follows continues from after the gap.
    Unrecovered {
        /// The channel.
        channel: String,
        /// First lost offset.
        from: u64,
        /// Last lost offset, when known.
        to: Option<u64>,
    },
    /// The server announced a shutdown; the client reconnects after `delay`.
    ServerShutdown {
        /// The server's jittered hint.
        delay: Duration,
    },
    /// An `error` the server sent that answers no request of the application,
    /// or a frame the client could not parse (code [`INVALID_FRAME`]; the
    /// connection stays up and the frame is skipped).
    Error {
        /// The protocol error code, or [`INVALID_FRAME`].
        code: String,
        /// The detail.
        detail: String,
    },
    /// The client stopped for good: closed by the application, refused (1008),
    /// replaced (4002), or out of reconnect attempts. No event follows.
    Closed {
        /// Why it stopped.
        reason: String,
    },
}

/// The [`Event::Error`] code for a text frame the client could not parse (not
/// JSON, or nested deeper than its parser goes).
pub const INVALID_FRAME: &str = "invalid_frame";

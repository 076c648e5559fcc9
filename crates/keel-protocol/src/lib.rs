//! Keel's wire protocol, version 1, as types: the envelope a client sends, the
//! envelopes a server sends, message kinds, error codes and close codes.
//!
//! The contract itself is `docs/protocol.md`; this crate is its executable form and
//! the one place both the server and the Rust client take names and numbers from.
//!
//! It does no I/O, holds no state and knows nothing about sockets, channels or
//! sessions: it parses and encodes. Encoding produces [`bytes::Bytes`] so that one
//! publication is serialized once and the same buffer is queued to every subscriber.
//!
//! # Layout
//!
//! - [`ClientEnvelope`]: what a client sends, parsed lazily (the payload stays raw
//!   JSON until the handler of its `type` reads it).
//! - [`encode`]: the server-side envelopes (`reply`, `error`, `message`, `ping`,
//!   `server_shutdown`), each written straight into one buffer.
//! - [`ErrorCode`] and [`close`]: the error codes and close codes tables.
//! - [`timestamp`]: the RFC 3339 UTC timestamp every server envelope carries.

pub mod close;
pub mod depth;
pub mod encode;
mod error_code;
pub mod timestamp;

pub use error_code::ErrorCode;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The protocol version this crate implements.
pub const PROTOCOL_VERSION: u32 = 1;

/// A client's envelope, borrowed from the frame's text.
///
/// `payload` is kept as raw JSON: each message kind parses only the fields it
/// needs, and a publication's `data` is forwarded without being re-serialized.
/// Unknown top-level fields are ignored, as the protocol requires.
#[derive(Debug, Deserialize)]
pub struct ClientEnvelope<'a> {
    /// The message kind (`subscribe`, `publish`, ...).
    #[serde(rename = "type", borrow)]
    pub kind: std::borrow::Cow<'a, str>,
    /// The kind-specific fields; absent means `{}`.
    #[serde(borrow, default)]
    pub payload: Option<&'a RawValue>,
    /// Echoed on the reply and on any error this request causes (string or number).
    #[serde(borrow, default)]
    pub request_id: Option<&'a RawValue>,
}

/// Why a text frame could not be read as a [`ClientEnvelope`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// The text is not JSON at all (`invalid_json`).
    InvalidJson(String),
    /// JSON, but not an object with a string `type` (`invalid_message`).
    InvalidMessage(String),
}

impl EnvelopeError {
    /// The protocol error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            EnvelopeError::InvalidJson(_) => ErrorCode::InvalidJson,
            EnvelopeError::InvalidMessage(_) => ErrorCode::InvalidMessage,
        }
    }

    /// A human-readable detail for the `error` envelope.
    pub fn detail(&self) -> &str {
        match self {
            EnvelopeError::InvalidJson(d) | EnvelopeError::InvalidMessage(d) => d,
        }
    }
}

impl<'a> ClientEnvelope<'a> {
    /// Parses one text frame.
    ///
    /// Distinguishes text that is not JSON ([`EnvelopeError::InvalidJson`]) from JSON
    /// of the wrong shape ([`EnvelopeError::InvalidMessage`]), since the protocol
    /// answers them with different codes.
    pub fn parse(text: &'a str) -> Result<Self, EnvelopeError> {
        // serde would read a JSON array as a struct's fields in order: refuse
        // anything but an object first.
        if !text.trim_start().starts_with('{') {
            return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => Err(EnvelopeError::InvalidMessage(
                    "an envelope is a JSON object".into(),
                )),
                Err(e) => Err(EnvelopeError::InvalidJson(e.to_string())),
            };
        }
        match serde_json::from_str::<ClientEnvelope<'a>>(text) {
            Ok(env) => Ok(env),
            Err(e) => match e.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    Err(EnvelopeError::InvalidJson(e.to_string()))
                }
                _ => Err(EnvelopeError::InvalidMessage(e.to_string())),
            },
        }
    }

    /// Parses the payload into `T`; an absent payload is read as `{}`.
    pub fn payload<T: Deserialize<'a>>(&self) -> Result<T, serde_json::Error> {
        match self.payload {
            Some(raw) => serde_json::from_str(raw.get()),
            None => serde_json::from_str("{}"),
        }
    }
}

/// Message kinds a client sends.
pub mod kind {
    /// Authenticate with a token as the first frame.
    pub const AUTH: &str = "auth";
    /// Join a channel.
    pub const SUBSCRIBE: &str = "subscribe";
    /// Leave a channel.
    pub const UNSUBSCRIBE: &str = "unsubscribe";
    /// Publish to a channel.
    pub const PUBLISH: &str = "publish";
    /// Call a server-side method.
    pub const RPC: &str = "rpc";
    /// Who is in a channel.
    pub const PRESENCE: &str = "presence";
    /// A channel's recent publications.
    pub const HISTORY: &str = "history";
    /// Resume a session after a reconnect.
    pub const RESUME: &str = "resume";
    /// Replace an expiring JWT.
    pub const REFRESH: &str = "refresh";
    /// JSON heartbeat (either direction).
    pub const PING: &str = "ping";
    /// Answer to a JSON heartbeat (either direction).
    pub const PONG: &str = "pong";
}

/// Payload of `subscribe`.
#[derive(Debug, Deserialize)]
pub struct SubscribePayload {
    /// The channel to join.
    pub channel: String,
    /// Where the client stopped, for recovery.
    #[serde(default)]
    pub since: Option<StreamPosition>,
}

/// Payload of `unsubscribe` and `presence`.
#[derive(Debug, Deserialize)]
pub struct ChannelPayload {
    /// The channel named by the request.
    pub channel: String,
}

/// Payload of `publish`.
#[derive(Debug, Deserialize)]
pub struct PublishPayload<'a> {
    /// The channel to publish to.
    pub channel: String,
    /// Any JSON value, forwarded verbatim to subscribers.
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// Payload of `rpc`.
#[derive(Debug, Deserialize)]
pub struct RpcPayload<'a> {
    /// The method name.
    pub method: String,
    /// The argument, any JSON value (absent means `null`).
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
}

/// Payload of `history`.
#[derive(Debug, Deserialize)]
pub struct HistoryPayload {
    /// The channel to read.
    pub channel: String,
    /// Only publications after this position.
    #[serde(default)]
    pub since: Option<StreamPosition>,
    /// At most this many publications.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Payload of `auth` and `refresh`: a JWT. Its `Debug` never shows the token.
#[derive(Deserialize)]
pub struct AuthPayload {
    /// The JWT.
    pub token: String,
}

impl std::fmt::Debug for AuthPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthPayload").finish_non_exhaustive()
    }
}

/// Payload of `resume`.
#[derive(Debug, Deserialize)]
pub struct ResumePayload {
    /// The token from `welcome` or the last `resume_response`.
    pub reconnect_token: String,
    /// The channels to take back and where the client stopped in each (`null`:
    /// take the channel back without recovery).
    #[serde(default)]
    pub positions: std::collections::BTreeMap<String, Option<StreamPosition>>,
}

/// A position in a channel's stream: an offset within an epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct StreamPosition {
    /// The last offset seen (0 before the first publication).
    pub offset: u64,
    /// The epoch the offset belongs to.
    pub epoch: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_envelope() {
        let env = ClientEnvelope::parse(r#"{"type":"ping"}"#).expect("valid");
        assert_eq!(env.kind, "ping");
        assert!(env.payload.is_none());
        assert!(env.request_id.is_none());
    }

    #[test]
    fn keeps_payload_raw_and_ignores_unknown_fields() {
        let env = ClientEnvelope::parse(
            r#"{"type":"publish","extra":1,"payload":{"channel":"c","data":{"a":[1,2]}},"request_id":"7"}"#,
        )
        .expect("valid");
        let p: PublishPayload<'_> = env.payload().expect("payload");
        assert_eq!(p.channel, "c");
        assert_eq!(p.data.get(), r#"{"a":[1,2]}"#);
        assert_eq!(env.request_id.map(|r| r.get()), Some(r#""7""#));
    }

    #[test]
    fn distinguishes_invalid_json_from_invalid_message() {
        assert_eq!(
            ClientEnvelope::parse("{not json")
                .map(|_| ())
                .unwrap_err()
                .code(),
            ErrorCode::InvalidJson
        );
        assert_eq!(
            ClientEnvelope::parse(r#"{"payload":{}}"#)
                .map(|_| ())
                .unwrap_err()
                .code(),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            ClientEnvelope::parse("[1,2]")
                .map(|_| ())
                .unwrap_err()
                .code(),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            ClientEnvelope::parse(r#"{"type":5}"#)
                .map(|_| ())
                .unwrap_err()
                .code(),
            ErrorCode::InvalidMessage
        );
    }

    #[test]
    fn escaped_type_is_decoded() {
        let env = ClientEnvelope::parse(r#"{"type":"pi\u006eg"}"#).expect("valid");
        assert_eq!(env.kind, "ping");
    }
}

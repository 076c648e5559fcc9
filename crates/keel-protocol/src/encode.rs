//! Server-side envelopes, each encoded once into [`Bytes`].
//!
//! Every function here writes one complete envelope
//! (`{"type", "payload", "request_id"?, "timestamp"}`) into a fresh buffer. The
//! result is what a connection's send queue holds: it is shared, not copied, when
//! the same publication goes to many subscribers.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::ErrorCode;

#[derive(Serialize)]
struct Envelope<'a, P: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    payload: P,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a RawValue>,
    timestamp: String,
}

/// Encodes an envelope of `kind` with `payload`, echoing `request_id`.
pub fn envelope<P: Serialize>(kind: &str, payload: P, request_id: Option<&RawValue>) -> Bytes {
    let env = Envelope {
        kind,
        payload,
        request_id,
        timestamp: crate::timestamp::now(),
    };
    // Serializing plain structs, strings and raw JSON into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
}

/// The reply to a request: `<kind>_response` (e.g. `subscribe_response`).
pub fn reply<P: Serialize>(request_kind: &str, payload: P, request_id: Option<&RawValue>) -> Bytes {
    let mut kind = String::with_capacity(request_kind.len() + 9);
    kind.push_str(request_kind);
    kind.push_str("_response");
    envelope(&kind, payload, request_id)
}

#[derive(Serialize)]
struct ErrorPayload<'a> {
    code: &'a str,
    detail: &'a str,
}

/// An `error` envelope.
pub fn error(code: ErrorCode, detail: &str, request_id: Option<&RawValue>) -> Bytes {
    envelope(
        "error",
        ErrorPayload {
            code: code.as_str(),
            detail,
        },
        request_id,
    )
}

#[derive(Serialize)]
struct MessagePayload<'a> {
    channel: &'a str,
    data: &'a RawValue,
    offset: u64,
    epoch: &'a str,
    publisher: Option<&'a str>,
}

/// A `message` envelope: one publication as every subscriber receives it.
pub fn message(
    channel: &str,
    data: &RawValue,
    offset: u64,
    epoch: &str,
    publisher: Option<&str>,
) -> Bytes {
    envelope(
        "message",
        MessagePayload {
            channel,
            data,
            offset,
            epoch,
            publisher,
        },
        None,
    )
}

#[derive(Serialize)]
struct Empty {}

/// A JSON heartbeat `ping`.
pub fn ping() -> Bytes {
    envelope("ping", Empty {}, None)
}

/// A `pong`, answering a client's JSON `ping`.
pub fn pong(request_id: Option<&RawValue>) -> Bytes {
    envelope("pong", Empty {}, request_id)
}

#[derive(Serialize)]
struct ShutdownPayload<'a> {
    reason: &'a str,
    reconnect: bool,
    delay_ms: u64,
}

/// A `server_shutdown` notice with a (jittered) reconnect delay.
pub fn server_shutdown(reason: &str, reconnect: bool, delay_ms: u64) -> Bytes {
    envelope(
        "server_shutdown",
        ShutdownPayload {
            reason,
            reconnect,
            delay_ms,
        },
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &Bytes) -> serde_json::Value {
        serde_json::from_slice(b).expect("valid json")
    }

    #[test]
    fn message_embeds_raw_data_once() {
        let data = RawValue::from_string(r#"{"n":1,"s":"x"}"#.into()).expect("raw");
        let b = message("chat", &data, 7, "e1", Some("alice"));
        let v = parse(&b);
        assert_eq!(v["type"], "message");
        assert_eq!(v["payload"]["channel"], "chat");
        assert_eq!(v["payload"]["data"]["n"], 1);
        assert_eq!(v["payload"]["offset"], 7);
        assert_eq!(v["payload"]["epoch"], "e1");
        assert_eq!(v["payload"]["publisher"], "alice");
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(v.get("request_id").is_none());
    }

    #[test]
    fn reply_and_error_echo_request_id() {
        let rid = RawValue::from_string("42".into()).expect("raw");
        let v = parse(&reply("subscribe", Empty {}, Some(&rid)));
        assert_eq!(v["type"], "subscribe_response");
        assert_eq!(v["request_id"], 42);
        let v = parse(&error(ErrorCode::UnknownType, "nope", Some(&rid)));
        assert_eq!(v["type"], "error");
        assert_eq!(v["payload"]["code"], "unknown_type");
        assert_eq!(v["payload"]["detail"], "nope");
        assert_eq!(v["request_id"], 42);
    }
}

//! Fuzzes what the gateway does with a client's text frame before any Hub
//! state is touched: envelope parsing, every payload kind, and the replies and
//! errors that echo the client's `request_id` and `data` back.
#![no_main]

use keel_protocol::{
    encode, AuthPayload, ChannelPayload, ClientEnvelope, ErrorCode, HistoryPayload, PublishPayload,
    ResumePayload, RpcPayload, SubscribePayload,
};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

#[derive(serde::Serialize)]
struct Echo<'a> {
    data: &'a RawValue,
}

/// Valid JSON text. Not `Value`: JSON allows numbers no f64 holds (`1e999`),
/// and those are forwarded verbatim. (Found by this target: a first version
/// re-parsed `data` into a `Value` and panicked on one.)
fn is_json(b: &[u8]) -> bool {
    serde_json::from_slice::<Box<RawValue>>(b).is_ok()
}

fuzz_target!(|data: &[u8]| {
    // The transport hands the handler valid UTF-8 only.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = match ClientEnvelope::parse(text) {
        Ok(env) => env,
        Err(e) => {
            let _ = encode::error(e.code(), e.detail(), None);
            return;
        }
    };
    let rid = env.request_id;
    let _ = env.payload::<SubscribePayload>();
    let _ = env.payload::<ChannelPayload>();
    let _ = env.payload::<HistoryPayload>();
    let _ = env.payload::<AuthPayload>();
    let _ = env.payload::<ResumePayload>();
    if let Ok(p) = env.payload::<RpcPayload<'_>>() {
        if let Some(data) = p.data {
            // As the gateway's echo does: the raw data, never re-parsed.
            let reply = encode::reply(&env.kind, Echo { data }, rid);
            assert!(is_json(&reply));
        }
    }
    if let Ok(p) = env.payload::<PublishPayload<'_>>() {
        // What every subscriber would get, and it must be JSON again.
        let frame = encode::message(&p.channel, p.data, 1, "e", Some("c"));
        assert!(is_json(&frame));
    }
    let reply = encode::reply(&env.kind, serde_json::json!({}), rid);
    assert!(is_json(&reply));
    let err = encode::error(ErrorCode::InvalidMessage, text, rid);
    assert!(is_json(&err));
    let _ = encode::pong(rid);
});

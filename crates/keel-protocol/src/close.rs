//! Close codes of the protocol's table, as numbers.
//!
//! Only the numbers and their meaning live here; when to use them is the server's
//! and the client's business.

/// Normal close, either side; also `POST /api/disconnect`.
pub const NORMAL: u16 = 1000;
/// Binary frame where the protocol expects JSON text.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// Text frame that is not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// No status code in the peer's Close (RFC 6455 7.4.1): never sent, only reported.
pub const NO_STATUS: u16 = 1005;
/// The connection ended without a Close (RFC 6455 7.4.1): never sent, only
/// reported.
pub const ABNORMAL: u16 = 1006;
/// Auth failed or timed out, token expired without refresh.
pub const POLICY_VIOLATION: u16 = 1008;
/// Frame or message larger than `max_message_size`.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// Internal error.
pub const INTERNAL_ERROR: u16 = 1011;
/// Graceful shutdown or restart: reconnect after `delay_ms`.
pub const SERVICE_RESTART: u16 = 1012;
/// Node overloaded or at a limit: try again later.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Slow consumer: send queue stayed full under the `disconnect` policy.
pub const SLOW_CONSUMER: u16 = 4000;
/// Heartbeat timeout.
pub const HEARTBEAT_TIMEOUT: u16 = 4001;
/// Replaced by a newer connection of the same client_id.
pub const REPLACED: u16 = 4002;
/// Rate limited for too long.
pub const RATE_LIMITED: u16 = 4003;

/// Whether a client should reconnect after the server closed with `code`.
///
/// 1008 (policy) and 1003 (protocol misuse) are not retried; a normal close asked
/// for by the application is not retried either.
pub fn should_reconnect(code: u16) -> bool {
    !matches!(
        code,
        NORMAL | UNSUPPORTED_DATA | POLICY_VIOLATION | REPLACED
    )
}

//! The protocol's error codes, carried in the `code` field of an `error` envelope.

use std::fmt;

/// An error code of the protocol's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame's text is not JSON.
    InvalidJson,
    /// JSON, but not a valid envelope or payload for its type.
    InvalidMessage,
    /// The `type` is not one the server knows.
    UnknownType,
    /// No or bad credentials.
    Unauthorized,
    /// Not allowed for this client.
    Forbidden,
    /// Over a rate limit.
    RateLimited,
    /// A token that has expired.
    TokenExpired,
    /// A token that is malformed or fails its signature.
    InvalidToken,
    /// Over a configured limit.
    LimitExceeded,
    /// The thing named does not exist.
    NotFound,
    /// A broker or backend the request needs cannot answer now: retry later.
    Unavailable,
    /// The server failed.
    Internal,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

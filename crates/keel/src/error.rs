//! The library's error type: an [`Error`] carrying an [`ErrorKind`], one kind per
//! failure a caller can act on (the stabilizer's exception list, typed).
//!
//! Errors know the HTTP status the gateway should answer with, so handlers do not
//! re-decide it; they do not carry secrets (no tokens, no user data).

use std::fmt;

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No connection with that client_id.
    ConnectionNotFound,
    /// `max_connections` (or another connection limit) reached.
    ConnectionLimitExceeded,
    /// The connection was terminated for not answering heartbeats.
    HeartbeatTimeout,
    /// A token past its expiry.
    TokenExpired,
    /// A token that is malformed or fails its signature.
    InvalidToken,
    /// A broadcast could not be delivered to anyone it should have reached.
    BroadcastFailed,
    /// The Hub is draining or shut down.
    Shutdown,
    /// Over `max_memory_per_connection` or `max_total_memory`.
    MemoryLimitExceeded,
    /// A channel name or other argument the Hub refuses.
    InvalidArgument,
    /// The WebSocket handshake could not be completed.
    Handshake,
    /// Authenticated, but not allowed to do this (resume another client's session).
    Forbidden,
    /// No valid credential where one is required.
    Unauthorized,
    /// Over a rate limit.
    RateLimited,
    /// Over a per-connection limit (subscriptions, say).
    LimitExceeded,
    /// The broker (or another service the request needs) cannot answer now; the
    /// same request may succeed later.
    Unavailable,
}

/// A Keel error: a kind and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    detail: String,
}

impl Error {
    /// Creates an error of `kind` with `detail`.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Error {
            kind,
            detail: detail.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The detail text.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The HTTP status that answers this error.
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode as S;
        match self.kind {
            ErrorKind::ConnectionNotFound => S::NOT_FOUND,
            ErrorKind::ConnectionLimitExceeded | ErrorKind::Shutdown | ErrorKind::Unavailable => {
                S::SERVICE_UNAVAILABLE
            }
            ErrorKind::TokenExpired | ErrorKind::InvalidToken | ErrorKind::Unauthorized => {
                S::UNAUTHORIZED
            }
            ErrorKind::RateLimited | ErrorKind::LimitExceeded => S::TOO_MANY_REQUESTS,
            ErrorKind::Forbidden => S::FORBIDDEN,
            ErrorKind::MemoryLimitExceeded => S::INSUFFICIENT_STORAGE,
            ErrorKind::InvalidArgument | ErrorKind::Handshake => S::BAD_REQUEST,
            ErrorKind::HeartbeatTimeout | ErrorKind::BroadcastFailed => S::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn not_found(client_id: &str) -> Self {
        Error::new(
            ErrorKind::ConnectionNotFound,
            format!("no connection for client_id {client_id}"),
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for Error {}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

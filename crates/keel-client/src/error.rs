//! The client's error type: an [`Error`] with an [`ErrorKind`] a caller can match
//! on, and a detail for people. Never carries a token.

use std::fmt;

/// What went wrong with a client call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The URL could not be used.
    InvalidUrl,
    /// The outgoing queue (calls made while disconnected) is at `max_queued`.
    QueueFull,
    /// No answer within `request_timeout`.
    Timeout,
    /// The connection dropped while the request was in flight: it may or may not
    /// have been carried out (publications are not retried, to avoid duplicates).
    Disconnected,
    /// The client was closed, or gave up reconnecting.
    Closed,
    /// The server answered with an `error` envelope; the code is in
    /// [`Error::server_code`].
    Server,
}

/// A client error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    detail: String,
    server_code: Option<String>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Error {
            kind,
            detail: detail.into(),
            server_code: None,
        }
    }

    pub(crate) fn server(code: &str, detail: &str) -> Self {
        Error {
            kind: ErrorKind::Server,
            detail: detail.to_string(),
            server_code: Some(code.to_string()),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The human-readable detail.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The protocol error code (`forbidden`, `invalid_message`, ...) when the
    /// server refused the request.
    pub fn server_code(&self) -> Option<&str> {
        self.server_code.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.server_code {
            Some(code) => write!(f, "server error {code}: {}", self.detail),
            None => write!(f, "{:?}: {}", self.kind, self.detail),
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

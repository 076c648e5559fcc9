//! [`ApiError`]: every error answer of the gateway's HTTP surface, built in one
//! place. A library error knows its status ([`keel::Error::http_status`]); here it
//! becomes a response: `{"error": detail}` as JSON, with `Retry-After` where the
//! client should come back (503: 5 s, 429: 1 s).
//!
//! What it must not do: put a credential in a detail (library errors never carry
//! one), or answer `/api` key failures with a body (those stay empty).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answer: a status and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The detail, in the body's `error`.
    pub detail: String,
}

impl ApiError {
    /// An answer with `status` and `detail`.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
        }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    /// 401: missing or bad credentials.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, detail)
    }

    /// 503: not now (draining, at a limit, a broker that cannot answer).
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, detail)
    }
}

impl From<keel::Error> for ApiError {
    fn from(e: keel::Error) -> Self {
        ApiError::new(e.http_status(), e.detail())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = match self.status {
            StatusCode::SERVICE_UNAVAILABLE => Some("5"),
            StatusCode::TOO_MANY_REQUESTS => Some("1"),
            _ => None,
        };
        let mut r = (
            self.status,
            Json(serde_json::json!({ "error": self.detail })),
        )
            .into_response();
        if let Some(secs) = retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_keep_their_status_and_get_retry_after_where_it_helps() {
        let e = keel::Error::new(keel::ErrorKind::Shutdown, "draining");
        let r = ApiError::from(e).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        let e = keel::Error::new(keel::ErrorKind::RateLimited, "slow down");
        let r = ApiError::from(e).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = ApiError::bad_request("no").into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }
}

//! Errors of the HTTP layer: E2B's REST error bodies ([`ApiError`]) and
//! what can stop the server from serving ([`ServeError`]).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, Response, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;

use crate::auth::AuthError;
use crate::backend::BackendError;

/// A REST error as E2B sends it: the HTTP status and a JSON body
/// `{"code": <status>, "message": "…"}` (the control plane's `Error`
/// schema, and envd's `/files` errors).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status (also the body's `code`).
    pub status: StatusCode,
    /// What went wrong, for people.
    pub message: String,
    /// Sent as `Retry-After` (429 from a quota).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 501: an E2B feature nanoclaw does not have.
    pub fn not_supported(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("{what} is not supported by nanoclaw"),
        )
    }

    /// A backend error on the control plane (sandbox lifecycle).
    pub fn control(err: BackendError) -> Self {
        Self::from_backend(err, StatusCode::SERVICE_UNAVAILABLE)
    }

    /// A backend error on the data plane (`/files`). An unavailable
    /// sandbox is 502 there, as E2B's proxy answers (the SDK reads 502 as
    /// "the sandbox is not running").
    pub fn envd(err: BackendError) -> Self {
        Self::from_backend(err, StatusCode::BAD_GATEWAY)
    }

    fn from_backend(err: BackendError, unavailable: StatusCode) -> Self {
        let status = match &err {
            BackendError::NotFound(_) => StatusCode::NOT_FOUND,
            BackendError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            BackendError::AlreadyExists(_) | BackendError::Conflict(_) => StatusCode::CONFLICT,
            BackendError::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            BackendError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            BackendError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
            BackendError::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
            BackendError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            BackendError::Unavailable(_) => unavailable,
            BackendError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let retry_after = match &err {
            BackendError::QuotaExceeded { retry_after, .. } => *retry_after,
            _ => None,
        };
        ApiError {
            status,
            message: err.to_string(),
            retry_after,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response<Body> {
        let body = json!({ "code": self.status.as_u16(), "message": self.message });
        let mut response = Response::new(Body::from(body.to_string()));
        *response.status_mut() = self.status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(after) = self.retry_after {
            if let Ok(value) = HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
                response.headers_mut().insert(RETRY_AFTER, value);
            }
        }
        response
    }
}

/// Why [`crate::listen::serve`] could not start or went down.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No listener was given.
    #[error("no listener given: pass at least one of unix:PATH or tcp:HOST:PORT")]
    NoListeners,
    /// A listener address that is neither `unix:PATH` nor `tcp:HOST:PORT`.
    #[error("bad listener {0:?}: expected unix:PATH or tcp:HOST:PORT (e.g. tcp:127.0.0.1:3000)")]
    BadAddress(String),
    /// A TCP listener without any API key configured.
    #[error(
        "refusing to listen on tcp:{0} without API keys: anyone who can reach the port could \
         run code; configure at least one API key, or listen on a unix socket"
    )]
    TcpWithoutAuth(String),
    /// The key store could not be asked whether keys exist.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Something that is not a socket is at a unix listener's path.
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A live server already listens on a unix listener's path.
    #[error("{0}: another server is listening on this socket")]
    SocketInUse(PathBuf),
    /// Binding or preparing a listener failed.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// The listener (and step) that failed.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// Installing the SIGTERM/SIGINT handler failed.
    #[error("cannot install the signal handler: {0}")]
    Signals(io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_map_to_rest_statuses() {
        assert_eq!(
            ApiError::control(BackendError::NotFound("x".into())).status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            ApiError::control(BackendError::Unavailable("x".into())).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::envd(BackendError::Unavailable("x".into())).status,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            ApiError::envd(BackendError::NoSpace("x".into())).status,
            StatusCode::INSUFFICIENT_STORAGE
        );
    }
}

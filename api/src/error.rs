//! The API's one error type: every failure leaves as `{"code": "...", "message": "..."}`
//! with a status that says whose fault it was. A 500 only ever says "internal server
//! error"; its cause is logged where it happened.

use flotilla_raft::{ErrorKind, NodeError};
use flotilla_store::CommandError;

pub use flotilla_client::types::ErrorBody;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(400, "bad_request", m)
    }
    pub fn unauthorized() -> Self {
        Self::new(401, "unauthorized", "missing or wrong bearer token")
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(404, "not_found", m)
    }
    pub fn method_not_allowed() -> Self {
        Self::new(405, "method_not_allowed", "method not allowed on this route")
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(409, "conflict", m)
    }
    pub fn payload_too_large(limit: u64) -> Self {
        Self::new(413, "payload_too_large", format!("request body is larger than {limit} bytes"))
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(503, "unavailable", m)
    }
    pub fn internal() -> Self {
        Self::new(500, "internal", "internal server error")
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.code.to_string(), message: self.message.clone() }
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e.kind {
            ErrorKind::BadRequest => ApiError::bad_request(e.message),
            ErrorKind::NotFound => ApiError::not_found(e.message),
            ErrorKind::Conflict => ApiError::conflict(e.message),
            ErrorKind::Unavailable => ApiError::unavailable(e.message),
            ErrorKind::Internal => ApiError::internal(),
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::RevisionMismatch { .. } => ApiError::new(409, "revision_mismatch", e.to_string()),
            CommandError::KeyNotFound { .. } => ApiError::not_found(e.to_string()),
            CommandError::Invalid { .. } => ApiError::bad_request(e.to_string()),
            CommandError::ObjectNotFound { .. } => ApiError::not_found(e.to_string()),
            CommandError::Conflict { .. } => ApiError::conflict(e.to_string()),
            CommandError::KeyReused { .. } => ApiError::new(422, "idempotency_key_reused", e.to_string()),
            // Only the scheduler proposes decisions; a client never sees this.
            CommandError::StaleDecision { .. } => ApiError::conflict(e.to_string()),
        }
    }
}

impl From<flotilla_store::ost::OstError> for ApiError {
    fn from(e: flotilla_store::ost::OstError) -> Self {
        use flotilla_store::ost::OstError as O;
        match &e {
            O::NotFound { .. } => ApiError::not_found(e.to_string()),
            O::InvalidKey { .. } => ApiError::bad_request(e.to_string()),
            O::Conflict { .. } => ApiError::conflict(e.to_string()),
            O::TooLarge { .. } => ApiError::new(413, "payload_too_large", e.to_string()),
            // The object storage is outside this node: say what failed, with a 503 the
            // caller may retry.
            O::Config(_) | O::Io { .. } | O::Backend { .. } => {
                tracing::warn!(error = %e, "object storage request failed");
                ApiError::new(503, "ost_unavailable", e.to_string())
            }
        }
    }
}

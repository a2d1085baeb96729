//! The one place server errors become HTTP: a status and a `{"error": {"code", "message"}}` body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::blobs::BlobError;
use super::store::StoreError;
use crate::protocol::{ErrorBody, ErrorInfo, PathError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid path: {0}")]
    InvalidPath(#[from] PathError),
    #[error("block bytes hash to {actual}, not to {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("{message}")]
    Conflict {
        message: String,
        current_rev: Option<i64>,
    },
    #[error("{0}")]
    PathConflict(String),
    #[error("{} referenced block(s) are missing, first {}; upload them, then commit again", .0.len(), .0.first().map(String::as_str).unwrap_or(""))]
    MissingBlocks(Vec<String>),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::Conflict {
                message,
                current_rev,
            } => ApiError::Conflict {
                message,
                current_rev,
            },
            StoreError::PathConflict(m) => ApiError::PathConflict(m),
            StoreError::MissingBlocks(m) => ApiError::MissingBlocks(m),
            StoreError::AlreadyExists(m) => ApiError::PathConflict(m),
            StoreError::Invalid(m) => ApiError::BadRequest(m),
            e @ StoreError::Db(_) => ApiError::Store(e),
        }
    }
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::InvalidPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            ApiError::HashMismatch { .. } => (StatusCode::BAD_REQUEST, "hash_mismatch"),
            ApiError::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            ApiError::PathConflict(_) => (StatusCode::CONFLICT, "path_conflict"),
            ApiError::MissingBlocks(_) => (StatusCode::BAD_REQUEST, "missing_blocks"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            _ if self.is_storage_full() => (StatusCode::INSUFFICIENT_STORAGE, "storage_full"),
            // Lost, not busy: asking again will not bring it back.
            ApiError::Blob(BlobError::Corrupt(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "block_corrupt")
            }
            ApiError::Store(_) | ApiError::Blob(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        }
    }
}

impl ApiError {
    /// The server's disk (blocks or database) is full: not worth a client's retry, and the
    /// admin's to fix. Nothing was acknowledged, so nothing is half-stored.
    fn is_storage_full(&self) -> bool {
        match self {
            ApiError::Blob(BlobError::Io(e)) => e.kind() == std::io::ErrorKind::StorageFull,
            ApiError::Store(StoreError::Db(e)) => crate::sqlite::is_full(e),
            _ => false,
        }
    }

    /// The error as the body's `error` object (also used per item in batch answers).
    pub fn info(self) -> ErrorInfo {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, code, "request refused");
        }
        // The log has the details (which file, which device); the client needs what to do.
        let message = if self.is_storage_full() {
            "the server's disk is full, so nothing was stored: its administrator must free some \
             space, then run the command again"
                .to_string()
        } else {
            self.to_string()
        };
        let mut info = ErrorInfo {
            code: code.to_string(),
            message,
            missing: None,
            current_rev: None,
        };
        match self {
            ApiError::MissingBlocks(m) => info.missing = Some(m),
            ApiError::Conflict { current_rev, .. } => info.current_rev = current_rev,
            _ => {}
        }
        info
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        (status, Json(ErrorBody { error: self.info() })).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_507_storage_full() {
        let full = ApiError::Blob(BlobError::Io(std::io::ErrorKind::StorageFull.into()));
        assert_eq!(
            full.status_and_code(),
            (StatusCode::INSUFFICIENT_STORAGE, "storage_full")
        );
        let told = ApiError::Blob(BlobError::Io(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "at /srv/dbx/blocks/tmp/.tmp1234",
        )))
        .info();
        assert!(
            told.message.starts_with("the server's disk is full"),
            "{told:?}"
        );
        assert!(!told.message.contains("/srv"), "no server path: {told:?}");
        let other = ApiError::Blob(BlobError::Io(std::io::ErrorKind::PermissionDenied.into()));
        assert_eq!(
            other.status_and_code(),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
    }
}

//! `ApiError`: the one shape in which every failure of the HTTP API leaves, an HTTP
//! status with the protocol's `ErrorBody`, and how a store error maps onto it.
//!
//! It lives apart from the routes so that whatever answers HTTP (the API's handlers, the
//! release directory in `releases`) can speak the same JSON errors without importing
//! the router that serves it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use delegate_protocol::{ErrorBody, ErrorCode, ErrorDetail};
use tracing::error;

use crate::error::StoreError;

/// An error answer: HTTP status plus the protocol's error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code,
                    message: message.into(),
                    expected_offset: None,
                },
            },
        }
    }

    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub(super) fn invalid_spec(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidSpec, message)
    }

    pub(super) fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let code = e.code();
        let status = match (&e, code) {
            (StoreError::TokenExists(_), _) => StatusCode::CONFLICT,
            (_, ErrorCode::NotFound) => StatusCode::NOT_FOUND,
            (_, ErrorCode::Unauthorized) => StatusCode::UNAUTHORIZED,
            (_, ErrorCode::TagsNotAllowed) => StatusCode::FORBIDDEN,
            (_, ErrorCode::BadRequest) => StatusCode::BAD_REQUEST,
            (_, ErrorCode::Internal) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::CONFLICT,
        };
        let text = crate::error::chain(&e);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            error!("{text}");
        }
        let mut err = ApiError::new(status, code, text);
        if let StoreError::LogGap { expected, .. } = e {
            err.body.error.expected_offset = Some(expected);
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// What a handler returns: its answer, or an `ApiError`.
pub(super) type ApiResult<T> = Result<T, ApiError>;

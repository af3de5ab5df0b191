//! Every HTTP error goes through [`AppError`], rendered in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to a client. Messages say what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Malformed JSON, a wrong type, or an out-of-range or unsupported parameter.
    #[error("{message}")]
    BadRequest {
        message: String,
        /// The offending request field, when there is one.
        param: Option<String>,
    },
    #[error("the prompt has {n_prompt} tokens but at most {n_fit} fit in this server's context of {n_ctx} tokens per request; shorten the prompt or restart the server with a larger --ctx")]
    PromptTooLong {
        n_prompt: usize,
        n_fit: usize,
        n_ctx: usize,
    },
    #[error("missing or wrong API key: send the header 'Authorization: Bearer <key>' with the key the server was started with (--api-key / --api-key-file)")]
    Unauthorized,
    #[error("the model '{requested}' does not exist on this server; it serves '{served}' (GET /v1/models lists it)")]
    ModelNotFound { requested: String, served: String },
    #[error("no route for {method} {path}; see GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/embeddings, /tokenize, /detokenize, GET /health, /metrics")]
    RouteNotFound { method: String, path: String },
    #[error("the request body is larger than this server's limit of {limit} bytes; send a smaller body or restart the server with a larger --max-body")]
    PayloadTooLarge { limit: usize },
    #[error("the server is busy: {max_queue} requests are already waiting; retry later (or start the server with a larger --max-queue or --parallel)")]
    QueueFull { max_queue: usize },
    #[error("the server is shutting down; retry on another instance or after it restarts")]
    ShuttingDown,
    #[error("{0}")]
    NotSupported(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn bad(message: impl Into<String>) -> Self {
        AppError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// A bad value of the request field `param`.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        AppError::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest { .. } | AppError::PromptTooLong { .. } => StatusCode::BAD_REQUEST,
            AppError::NotSupported(_) => StatusCode::BAD_REQUEST,
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::ModelNotFound { .. } | AppError::RouteNotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            AppError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            AppError::BadRequest { .. }
            | AppError::PromptTooLong { .. }
            | AppError::NotSupported(_)
            | AppError::ModelNotFound { .. }
            | AppError::RouteNotFound { .. }
            | AppError::PayloadTooLarge { .. } => "invalid_request_error",
            AppError::Unauthorized => "authentication_error",
            AppError::QueueFull { .. } => "rate_limit_error",
            AppError::ShuttingDown => "service_unavailable_error",
            AppError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `code` field.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            AppError::BadRequest { .. } => None,
            AppError::PromptTooLong { .. } => Some("context_length_exceeded"),
            AppError::NotSupported(_) => Some("unsupported"),
            AppError::Unauthorized => Some("invalid_api_key"),
            AppError::ModelNotFound { .. } => Some("model_not_found"),
            AppError::RouteNotFound { .. } => Some("not_found"),
            AppError::PayloadTooLarge { .. } => Some("request_too_large"),
            AppError::QueueFull { .. } => Some("queue_full"),
            AppError::ShuttingDown => Some("shutting_down"),
            AppError::Internal(_) => None,
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            AppError::BadRequest { param, .. } => param.as_deref(),
            AppError::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    /// The JSON body, also used for an error in the middle of an SSE stream.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        match self {
            AppError::Unauthorized => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            AppError::QueueFull { .. } | AppError::ShuttingDown => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

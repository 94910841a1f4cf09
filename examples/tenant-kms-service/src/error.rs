//! The one error shape of the API, and the request context.
//!
//! Every 4xx and 5xx answer, axum's own included (unknown path, wrong
//! method, a body that is not JSON), has the body
//!
//! ```json
//! {"error": "code", "message": "what happened and what to do", "field": "the field at fault", "request_id": "..."}
//! ```
//!
//! (`field` only when one is at fault; some codes add fields of their own,
//! listed in the service README). Internal detail (SQLite errors, SDK output,
//! remote bodies) never goes to the client: it is written to the operator log
//! (stderr) under the request id, which the client sees in `request_id` and
//! in the `x-request-id` header.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::tenants::CLIENT_IP;

tokio::task_local! {
    /// The id of the request being served (for error bodies and the operator log).
    pub static REQUEST_ID: String;
}

/// The response header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The current request's id, or `-` outside a request.
pub fn request_id() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| "-".to_owned())
}

/// Writes `detail` to the operator log under the current request id.
pub fn operator_log(detail: impl std::fmt::Display) {
    eprintln!("[request {}] {detail}", request_id());
}

/// An API error: status, a stable code, a message for the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
    extra: Map<String, Value>,
    retry_after: Option<u64>,
}

/// Marks a response whose body already has the error shape.
#[derive(Debug, Clone, Copy)]
struct Shaped;

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Self {
        ApiError {
            status,
            code: code.to_owned(),
            message: message.to_string(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    /// Adds a field to the body (`field`, `step`, `records`...).
    #[must_use]
    pub fn with(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.extra.insert(key.to_owned(), json!(value));
        self
    }

    /// Names the request field at fault.
    #[must_use]
    pub fn field(self, field: &str) -> Self {
        self.with("field", field)
    }

    /// Sets `Retry-After` (seconds, at least 1).
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// 400 with `code`.
    pub fn bad_request(code: &str, message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 500 `internal`: `detail` goes to the operator log only.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        operator_log(format_args!("internal error: {detail}"));
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the operator log has the details under this request id",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The error code.
    pub fn code(&self) -> &str {
        &self.code
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), Value::String(self.code));
        body.insert("message".into(), Value::String(self.message));
        body.extend(self.extra);
        body.insert("request_id".into(), Value::String(request_id()));
        let mut response = (self.status, axum::Json(Value::Object(body))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(Shaped);
        response
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(e: crate::db::DbError) -> Self {
        ApiError::internal(format_args!("database: {e}"))
    }
}

/// The code of an error answer that did not come from a handler (axum's
/// rejections and fallbacks).
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// Gives the request an id and the client address (for audit entries and
/// the operator log), and turns every error answer that is not already in
/// the error shape into it.
pub async fn request_context(
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let id = crate::config::random_hex(8).unwrap_or_else(|_| "no-id".to_owned());
    let run = async move {
        let response = next.run(req).await;
        let status = response.status();
        let mut response = if status.as_u16() >= 400
            && response.extensions().get::<Shaped>().is_none()
        {
            let (parts, body) = response.into_parts();
            let text = axum::body::to_bytes(body, 16 * 1024)
                .await
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let message = if status.is_server_error() {
                operator_log(format_args!("{status}: {text}"));
                "internal error; the operator log has the details under this request id".to_owned()
            } else if text.is_empty() {
                match status {
                    StatusCode::NOT_FOUND => "no such endpoint (see the service README)".to_owned(),
                    StatusCode::METHOD_NOT_ALLOWED => {
                        "this endpoint does not take this method (see the service README)"
                            .to_owned()
                    }
                    s => s.canonical_reason().unwrap_or("error").to_owned(),
                }
            } else {
                text
            };
            let mut shaped = ApiError::new(status, code_for(status), message).into_response();
            // Keep `Allow` (405) and the like.
            for (name, value) in &parts.headers {
                if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                    shaped.headers_mut().insert(name.clone(), value.clone());
                }
            }
            shaped
        } else {
            response
        };
        if let Ok(v) = HeaderValue::from_str(&request_id()) {
            response.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        response
    };
    let response: Response<Body> = REQUEST_ID
        .scope(id, CLIENT_IP.scope(addr.ip().to_string(), run))
        .await;
    response
}

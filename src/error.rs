//! Errors a message can meet, and their one mapping to HTTP responses.
//!
//! Every error reply has the same shape, `{"error": CODE, "message": TEXT, "details": [...]}`,
//! with a stable `CODE` per kind of failure. 5xx replies say what failed but not why: the
//! reason goes to the log, once.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

/// The most violations an error reply lists; `message` gives the total.
pub const MAX_VIOLATIONS: usize = 100;

/// One way a body breaks a schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON pointer to the offending value in the body (`""` for the body itself).
    pub pointer: String,
    /// What is wrong with it.
    pub message: String,
}

/// Why a flow could not handle a message.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The body breaks the schema of a `validate` step.
    #[error("the body does not match the schema \"{schema}\"{}", listed(violations.len(), *total))]
    Invalid {
        /// The schema file.
        schema: String,
        /// The violations found, at most [`MAX_VIOLATIONS`].
        violations: Vec<Violation>,
        /// How many there are in all.
        total: usize,
    },
    /// A step could not produce its output from this message, such as a template reading a
    /// field the message lacks.
    #[error("{context}: {}", crate::redact::error_text(reason))]
    Unprocessable {
        /// The step, as `step 2 (transform)`.
        context: String,
        /// What went wrong.
        reason: String,
    },
    /// No rule of a `route` step matched.
    #[error("no route matches the message")]
    NoRoute,
    /// A `correlate` step found no record by any of its keys.
    #[error("no {context} matches {}", keys.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(" or "))]
    NotCorrelated {
        /// The record's namespace.
        context: String,
        /// The keys tried.
        keys: Vec<String>,
    },
    /// The store could not be reached.
    #[error("store unavailable: {}", crate::redact::error_text(.0))]
    Unavailable(String),
    /// The target did not take the message.
    #[error("target \"{target}\" failed: {}", crate::redact::error_text(reason))]
    Target {
        /// The target's name.
        target: String,
        /// The status it answered, when it answered.
        status: Option<u16>,
        /// What went wrong, for the log.
        reason: String,
        /// How long the target asked to be left alone (its `Retry-After`), passed on to the
        /// caller.
        retry_after: Option<std::time::Duration>,
    },
}

/// Says how many violations a reply leaves out, when it leaves some out.
fn listed(shown: usize, total: usize) -> String {
    if total > shown {
        format!(" ({total} violations; the first {shown} are listed)")
    } else {
        String::new()
    }
}

/// Why a request got an error reply. The single place that decides status codes.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The body is not JSON.
    #[error("the body is not valid JSON: {reason}")]
    MalformedJson {
        /// The parser's explanation.
        reason: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
    /// The body is declared HL7 v2 and is not.
    #[error("the body is not valid HL7 v2 (ER7): {0}")]
    MalformedHl7(String),
    /// The body is neither declared JSON nor HL7 v2.
    #[error(
        "the body must be JSON (content-type application/json) or HL7 v2 (x-application/hl7-v2+er7), not \"{0}\""
    )]
    UnsupportedMediaType(String),
    /// The body exceeds the trigger's limit.
    #[error("the body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// No flow serves the path.
    #[error("no flow serves {0}")]
    NotFound(String),
    /// The admin API knows nothing by this id or key.
    #[error("no {what} \"{id}\"")]
    Missing {
        /// What was asked for: `message`, or `journey`.
        what: &'static str,
        /// The id or key asked for.
        id: String,
    },
    /// A flow serves the path, but not with this method.
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    /// The body is JSON, but not JSON ferry accepts: nested too deep, or an object with a
    /// key twice (which readers would resolve differently).
    #[error("the body is refused: {reason} at {pointer}")]
    RefusedJson {
        /// What is wrong.
        reason: String,
        /// JSON pointer to where it is.
        pointer: String,
    },
    /// A replay asked for without a reason.
    #[error("a replay needs a reason: say why in `reason`")]
    MissingReason,
    /// Credentials are missing or wrong; which part was wrong is not said.
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// Valid credentials that are not allowed here.
    #[error("not allowed")]
    Forbidden,
    /// An idempotency key already used for a different request (another body, method or
    /// path): nothing is done, and the first request's reply is not given to this one.
    #[error("idempotency key \"{}\" was already used for a different request", crate::redact::error_text(.0))]
    IdempotencyConflict(String),
    /// The client sent more than its rate limit allows.
    #[error("too many requests; try again later")]
    TooManyRequests {
        /// Seconds until the next request is allowed.
        retry_after: u64,
    },
    /// ferry is at its concurrency limit.
    #[error("overloaded; try again later")]
    Overloaded,
    /// The request took longer than the server's request timeout.
    #[error("the request took too long")]
    Timeout,
    /// The flow refused or failed the message.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// A fault in ferry itself.
    #[error("internal error")]
    Internal(String),
}

impl ServeError {
    /// How long a failed target asked to be left alone (its `Retry-After`): the caller's to
    /// honour.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Flow(FlowError::Target { retry_after, .. }) => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status of the reply.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson { .. } | Self::MalformedHl7(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RefusedJson { .. } | Self::MissingReason => StatusCode::BAD_REQUEST,
            Self::IdempotencyConflict(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::NotFound(_) | Self::Missing { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Flow(
                FlowError::Invalid { .. } | FlowError::Unprocessable { .. } | FlowError::NoRoute,
            ) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Flow(FlowError::Target { .. }) => StatusCode::BAD_GATEWAY,
            Self::Flow(FlowError::NotCorrelated { .. }) => StatusCode::NOT_FOUND,
            Self::Flow(FlowError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable error code of the reply.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson { .. } => "malformed_json",
            Self::MalformedHl7(_) => "malformed_hl7",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RefusedJson { .. } => "refused_json",
            Self::MissingReason => "missing_reason",
            Self::IdempotencyConflict(_) => "idempotency_conflict",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::TooManyRequests { .. } => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::Timeout => "timeout",
            Self::NotFound(_) | Self::Missing { .. } => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Flow(FlowError::Invalid { .. }) => "validation_failed",
            Self::Flow(FlowError::Unprocessable { .. }) => "unprocessable",
            Self::Flow(FlowError::NoRoute) => "no_route",
            Self::Flow(FlowError::Target { .. }) => "target_failed",
            Self::Flow(FlowError::NotCorrelated { .. }) => "not_correlated",
            Self::Flow(FlowError::Unavailable(_)) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    fn details(&self) -> Vec<Value> {
        match self {
            Self::MalformedJson { line, column, .. } => {
                vec![json!({"line": line, "column": column})]
            }
            Self::PayloadTooLarge { limit } => vec![json!({"limit_bytes": limit})],
            Self::Missing { what, id } => vec![json!({"missing": what, "id": id})],
            Self::RefusedJson { pointer, .. } => vec![json!({"pointer": pointer})],
            Self::Flow(FlowError::Invalid {
                schema, violations, ..
            }) => violations
                .iter()
                .map(|v| json!({"pointer": v.pointer, "message": v.message, "schema": schema}))
                .collect(),
            Self::Flow(FlowError::Target { target, status, .. }) => {
                vec![json!({"target": target, "status": status})]
            }
            Self::Flow(FlowError::NotCorrelated { context, keys }) => {
                vec![json!({"context": context, "keys": keys})]
            }
            _ => Vec::new(),
        }
    }

    /// The message of the reply; 5xx replies keep their reason for the log.
    pub(crate) fn public_message(&self) -> String {
        match self {
            Self::Flow(FlowError::Target { target, .. }) => {
                format!("target \"{target}\" did not take the message")
            }
            Self::Flow(FlowError::Unavailable(_)) => "temporarily unavailable; try again".into(),
            other => other.to_string(),
        }
    }
}

impl ServeError {
    /// What the log says of the error: the reason a 5xx reply keeps to itself, redacted.
    fn log_text(&self) -> String {
        match self {
            Self::Internal(detail) => crate::redact::error_text(detail),
            other => other.to_string(),
        }
    }

    /// The JSON body of the reply.
    pub fn body(&self) -> Value {
        json!({"error": self.code(), "message": self.public_message(), "details": self.details()})
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && !matches!(self, Self::Overloaded) {
            tracing::warn!(error = %self.log_text(), code = self.code(), "request failed");
        }
        let retry_after = match &self {
            Self::TooManyRequests { retry_after } => Some(retry_after.max(&1).to_string()),
            Self::Overloaded => Some("1".to_owned()),
            // Whole seconds, rounded up: the caller waits at least as long as the target asked.
            _ => self
                .retry_after()
                .map(|wait| wait.as_secs_f64().ceil().max(1.0).to_string()),
        };
        let mut response = (status, Json(self.body())).into_response();
        if let Some(seconds) = retry_after.and_then(|s| s.parse().ok()) {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::MAX_ERROR_LEN;
    use crate::targets::{Attempt, RetryAction};

    #[test]
    fn no_error_text_carries_a_url_secret_or_grows_without_bound() {
        let url = "https://user:pw-SECRET@lab.example/hook?api_key=SECRET&ref=SECRET";
        let reason = format!(
            "error sending request for url ({url}): {}",
            "x".repeat(100_000)
        );
        let errors: Vec<ServeError> = vec![
            FlowError::Unprocessable {
                context: "target \"lab\"".into(),
                reason: reason.clone(),
            }
            .into(),
            FlowError::Target {
                target: "lab".into(),
                status: None,
                reason: reason.clone(),
                retry_after: None,
            }
            .into(),
            FlowError::Unavailable(reason.clone()).into(),
            ServeError::Internal(reason.clone()),
            ServeError::IdempotencyConflict(reason.clone()),
        ];
        for error in &errors {
            for text in [
                error.to_string(),
                error.body().to_string(),
                error.log_text(),
            ] {
                assert!(!text.contains("SECRET"), "{}: {text:.200}", error.code());
                assert!(
                    text.len() < 2 * MAX_ERROR_LEN,
                    "{}: {} bytes",
                    error.code(),
                    text.len()
                );
            }
        }
        let attempt = Attempt::failed(RetryAction::Retry, None, &reason);
        let stored = attempt.error.unwrap();
        assert!(!stored.contains("SECRET"), "{stored:.200}");
        assert!(stored.len() < 2 * MAX_ERROR_LEN);
        assert!(stored.contains("api_key=[redacted]"), "{stored:.200}");
    }

    #[test]
    fn a_failed_targets_retry_after_reaches_the_caller_in_whole_seconds() {
        let failed = |retry_after| {
            ServeError::from(FlowError::Target {
                target: "lab".into(),
                status: Some(503),
                reason: "maintenance".into(),
                retry_after,
            })
            .into_response()
        };
        let waited = failed(Some(std::time::Duration::from_millis(1200)));
        assert_eq!(waited.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(waited.headers()["retry-after"], "2");
        assert!(!failed(None).headers().contains_key("retry-after"));
    }
}

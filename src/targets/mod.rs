//! Targets: where a flow delivers messages.
//!
//! Each kind makes its own attempt ([`Target::attempt`]) with what [`Reach`] gives it. An
//! HTTP target renders its request from the message ([`HttpTarget::prepare`], no I/O) at
//! every attempt — the outbox keeps the message, not the request — and [`send`]s it;
//! [`classify`] decides what the answer means for retries. [`Mocks`] stand behind every
//! target in `ferry test` and `ferry run`.

mod flow;
mod http;
mod mllp;
mod mock;
mod outbound;
mod queue;

pub use flow::FlowTarget;
pub use http::HttpTarget;
pub use mllp::MllpTarget;
pub use mock::{MockAnswer, Mocks, Received};
pub use outbound::is_private;
pub use queue::QueueTarget;
pub(crate) use queue::queue_spec;

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method};
use bytes::Bytes;

use crate::compile::Ctx;
use crate::config::TargetConfig;
use crate::message::Message;
use crate::template::Templates;
use outbound::Credentials;

pub use crate::retry::{RetryAction, classify_status};

/// The HTTP client targets share, so connections to partners are reused.
///
/// # Errors
///
/// When the TLS backend cannot be initialised.
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    http_client_builder().build()
}

/// How every HTTP client of ferry starts: its user agent, and no redirects (a partner that
/// redirects could send ferry, and the message, anywhere).
pub fn http_client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
}

/// A compiled target.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per flow, built once at load"
)]
pub enum Target {
    /// An HTTP call.
    Http(HttpTarget),
    /// A queue.
    Queue(QueueTarget),
    /// An HL7 v2 partner over MLLP.
    Mllp(MllpTarget),
    /// Another flow.
    Flow(FlowTarget),
}

/// A request rendered from a message, ready to send.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    /// The target's name.
    pub target: String,
    /// HTTP method.
    pub method: Method,
    /// Absolute URL.
    pub url: reqwest::Url,
    /// Headers, including content type and idempotency key.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body.
    pub body: Bytes,
    /// How long to wait for the whole response.
    pub timeout: Duration,
}

/// A target's answer.
#[derive(Debug, Clone)]
pub struct TargetResponse {
    /// HTTP status.
    pub status: u16,
    /// The `Retry-After` header, when present.
    pub retry_after: Option<String>,
    /// The body.
    pub body: Bytes,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No answer within the timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The connection failed.
    #[error("{0}")]
    Connect(String),
}

/// Classifies an attempt: 2xx is done; no answer, 408, 429 and 5xx are worth retrying; any
/// other status is permanent.
pub fn classify(outcome: &Result<TargetResponse, SendError>) -> RetryAction {
    match outcome {
        Err(_) => RetryAction::Retry,
        Ok(response) => classify_status(response.status),
    }
}

impl Target {
    /// Compiles a target named `name`, recording problems in `ctx`.
    pub(crate) fn compile(name: &str, config: &TargetConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        match config {
            TargetConfig::Http(c) => HttpTarget::compile(name, c, ctx).map(Self::Http),
            TargetConfig::Queue(c) => QueueTarget::compile(name, c, ctx).map(Self::Queue),
            TargetConfig::Mllp(c) => MllpTarget::compile(name, c, ctx).map(Self::Mllp),
            TargetConfig::Flow(flow) => Some(Self::Flow(FlowTarget::new(name, &flow.value))),
        }
    }

    /// How long one attempt may take, where the target bounds it (HTTP and MLLP calls).
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            Self::Http(t) => Some(t.timeout()),
            Self::Mllp(t) => Some(t.timeout()),
            Self::Queue(_) | Self::Flow(_) => None,
        }
    }

    /// Makes one delivery attempt of `message`: each kind its own. On success, what the
    /// target answered is captured into `message`'s vars.
    pub async fn attempt(
        &self,
        message: &mut Message,
        templates: &Templates,
        reach: &Reach<'_>,
    ) -> Attempt {
        match self {
            Self::Http(http) => http.attempt(message, templates, reach.client).await,
            Self::Queue(queue) => queue.attempt(message, reach).await,
            Self::Mllp(mllp) => mllp.attempt(message).await,
            Self::Flow(call) => call.attempt(message, reach.calls).await,
        }
    }

    /// What kind of target it is: `http`, `queue`, `mllp` or `flow`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Queue(_) => "queue",
            Self::Mllp(_) => "mllp",
            Self::Flow(_) => "flow",
        }
    }

    /// The target's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Http(t) => t.name(),
            Self::Queue(t) => t.name(),
            Self::Mllp(t) => t.name(),
            Self::Flow(t) => t.name(),
        }
    }
}

/// Compiles a target's `capture`: each var's JSONPath over the answer. `None` when one is
/// invalid (reported in `ctx`).
pub(crate) fn compile_captures(
    config: &std::collections::BTreeMap<String, crate::config::Spanned<String>>,
    ctx: &mut Ctx<'_>,
) -> Option<Vec<(String, crate::jsonpath::JsonPath)>> {
    let mut captures = Vec::with_capacity(config.len());
    for (var, path) in config {
        match crate::jsonpath::JsonPath::parse(&path.value) {
            Ok(compiled) => captures.push((var.clone(), compiled)),
            Err(reason) => ctx.error(
                path.referenced,
                format!("invalid JSONPath \"{}\": {reason}", path.value),
            ),
        }
    }
    (captures.len() == config.len()).then_some(captures)
}

/// Locks `mutex`, whatever a panic elsewhere left in it: what targets keep under a lock
/// (idle connections, recorded mocks) stays usable.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What targets reach through: the network's HTTP client, the brokers, the store (for
/// embedded queues), and the message path (for flow calls).
pub struct Reach<'a> {
    /// The HTTP client targets share.
    pub client: &'a reqwest::Client,
    /// Broker connections.
    pub brokers: &'a crate::queue::Brokers,
    /// The store, for embedded queues.
    pub store: Option<&'a crate::store::Store>,
    /// The message path, for flow calls.
    pub calls: &'a dyn Calls,
    /// How long the flow retries a delivery: a broker that drops duplicates by id keeps ids
    /// that long.
    pub retried_for: Duration,
}

/// What a `flow` target calls: the message path, delivering a message through another flow.
pub trait Calls: Send + Sync {
    /// Delivers `caller` through the flow named `flow` as target `target` of the caller: one
    /// attempt, answered as the called flow's own target answered it. On success the called
    /// flow's reply fields become `caller`'s vars.
    fn call<'a>(
        &'a self,
        flow: &'a str,
        target: &'a str,
        caller: &'a mut Message,
    ) -> CallAttempt<'a>;
}

/// A flow call's attempt, to be awaited.
pub type CallAttempt<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Attempt> + Send + 'a>>;

/// What one delivery attempt came to.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Done, retry, or give up.
    pub action: RetryAction,
    /// The status the target answered, when it answered one.
    pub status: Option<u16>,
    /// What went wrong, when something did.
    pub error: Option<String>,
    /// How long the target asked to wait before the next attempt.
    pub retry_after: Option<Duration>,
    /// The start of what the target answered, for operators.
    pub answer: Option<String>,
}

impl Attempt {
    /// A delivered message.
    pub fn done(status: Option<u16>) -> Self {
        Self {
            action: RetryAction::Done,
            status,
            error: None,
            retry_after: None,
            answer: None,
        }
    }

    /// This attempt with the start of the target's answer `body` kept (bounded as an error is).
    #[must_use]
    pub fn answered(self, body: &[u8]) -> Self {
        let excerpt =
            String::from_utf8_lossy(&body[..body.len().min(crate::redact::MAX_ERROR_LEN)]);
        Self {
            answer: (!body.is_empty()).then(|| crate::redact::error_text(&excerpt)),
            ..self
        }
    }

    /// A failed attempt. The error is kept as it may be logged and stored: URLs in it
    /// redacted, its length bounded ([`crate::redact::error_text`]).
    pub fn failed(action: RetryAction, status: Option<u16>, error: impl AsRef<str>) -> Self {
        Self {
            action,
            status,
            error: Some(crate::redact::error_text(error.as_ref())),
            retry_after: None,
            answer: None,
        }
    }
}

impl HttpTarget {
    /// Adds credentials and the signature (both may change between attempts), then sends.
    async fn send_secured(
        &self,
        client: &reqwest::Client,
        request: &mut OutboundRequest,
        fresh_token: bool,
    ) -> Result<TargetResponse, SendError> {
        if let Some(credentials) = &self.credentials {
            credentials
                .apply(request, client, fresh_token)
                .await
                .map_err(SendError::Connect)?;
        }
        if let Some(signer) = &self.signer {
            request
                .headers
                .retain(|(n, _)| !n.as_str().starts_with("webhook-"));
            signer.sign(request);
        }
        send(client, request).await
    }

    /// Renders, sends and classifies one attempt; a successful answer's captures go into
    /// `message`'s vars.
    pub async fn attempt(
        &self,
        message: &mut Message,
        templates: &Templates,
        client: &reqwest::Client,
    ) -> Attempt {
        let mut request = match self.prepare(message, templates) {
            Ok(request) => request,
            Err(error) => return Attempt::failed(RetryAction::Drop, None, error.to_string()),
        };
        let client = self.client.as_ref().unwrap_or(client);
        let mut outcome = self.send_secured(client, &mut request, false).await;
        // A token the target no longer takes is fetched again, once.
        if let Ok(response) = &outcome
            && response.status == 401
            && self
                .credentials
                .as_ref()
                .is_some_and(Credentials::refreshes)
        {
            outcome = self.send_secured(client, &mut request, true).await;
        }
        let action = classify(&outcome);
        match outcome {
            Ok(response) if action == RetryAction::Done => {
                self.capture(&response, message);
                Attempt::done(Some(response.status)).answered(&response.body)
            }
            Ok(TargetResponse {
                status,
                retry_after,
                body,
            }) => {
                let excerpt = String::from_utf8_lossy(&body[..body.len().min(500)]);
                Attempt {
                    retry_after: retry_after
                        .as_deref()
                        .and_then(crate::retry::parse_retry_after),
                    ..Attempt::failed(
                        action,
                        Some(status),
                        format!("answered {status}: {excerpt}"),
                    )
                    .answered(&body)
                }
            }
            Err(error) => Attempt::failed(action, None, error.to_string()),
        }
    }
}

/// Sends a prepared request with `client`.
///
/// # Errors
///
/// [`SendError`] when no answer came: connection failure or timeout.
pub async fn send(
    client: &reqwest::Client,
    request: &OutboundRequest,
) -> Result<TargetResponse, SendError> {
    let mut builder = client
        .request(request.method.clone(), request.url.clone())
        .timeout(request.timeout)
        .body(request.body.clone());
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    let failed = |error: reqwest::Error| {
        if error.is_timeout() {
            SendError::Timeout(request.timeout)
        } else {
            SendError::Connect(crate::redact::error_text(&error_chain(&error)))
        }
    };
    let response = builder.send().await.map_err(failed)?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.bytes().await.map_err(failed)?;
    Ok(TargetResponse {
        status,
        retry_after,
        body,
    })
}

/// reqwest's top-level message is vague ("error sending request"); the cause says why.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A stand-in for the message path in unit tests of targets: every flow called answers
/// the same attempt, and the calls are recorded.
#[cfg(test)]
pub(crate) mod called {
    use std::sync::Mutex;

    use super::{Attempt, CallAttempt, Calls};
    use crate::message::Message;

    /// Answers every call with `answer`; `calls` holds each flow and target called, and the
    /// body it got.
    pub(crate) struct Called {
        pub(crate) answer: Attempt,
        pub(crate) calls: Mutex<Vec<(String, String, serde_json::Value)>>,
    }

    impl Called {
        pub(crate) fn answering(answer: Attempt) -> Self {
            Self {
                answer,
                calls: Mutex::default(),
            }
        }
    }

    impl Calls for Called {
        fn call<'a>(
            &'a self,
            flow: &'a str,
            target: &'a str,
            caller: &'a mut Message,
        ) -> CallAttempt<'a> {
            let mut calls = self.calls.lock().unwrap();
            calls.push((flow.to_owned(), target.to_owned(), caller.body().clone()));
            let answer = self.answer.clone();
            Box::pin(async move { answer })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> Result<TargetResponse, SendError> {
        Ok(TargetResponse {
            status,
            retry_after: None,
            body: Bytes::new(),
        })
    }

    #[test]
    fn classification_follows_http_semantics() {
        assert_eq!(classify(&status(202)), RetryAction::Done);
        for retry in [408, 429, 500, 503] {
            assert_eq!(classify(&status(retry)), RetryAction::Retry, "{retry}");
        }
        for permanent in [400, 401, 404, 422] {
            assert_eq!(
                classify(&status(permanent)),
                RetryAction::Drop,
                "{permanent}"
            );
        }
        assert_eq!(
            classify(&Err(SendError::Connect("refused".into()))),
            RetryAction::Retry
        );
    }
}

//! A compiled flow: its trigger, steps, targets and reply, ready to run messages.

use std::path::PathBuf;

use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use serde_json::Value;

use crate::config::DeliveryMode;
use crate::error::FlowError;
use crate::jsonpath::JsonPath;
use crate::message::Message;
use crate::retry::RetryPolicy;
use crate::steps::{Route, Rule, Step, StepState};
use crate::store::{CorrelationWrite, RecordChange, Store};
use crate::targets::{OutboundRequest, Target};
use crate::template::{JsonTemplate, Templates, TextTemplate};

/// Request bodies are capped at 1 MiB unless a trigger says otherwise.
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;

/// A flow ready to run.
#[derive(Debug)]
pub struct Flow {
    /// The flow's name.
    pub name: String,
    /// Its `description`, for people.
    pub description: Option<String>,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// What starts it.
    pub trigger: Trigger,
    pub(crate) steps: Vec<(String, Step)>,
    /// Where each step is written, for diagnostics found after compiling.
    pub(crate) step_locations: Vec<serde_saphyr::Location>,
    pub(crate) targets: Vec<Target>,
    pub(crate) default_target: Option<usize>,
    /// Other flows' claims (`takes`) on its messages, when it has no `route` step to hold
    /// them: tried after the steps, before the default target.
    pub(crate) claims: Route,
    /// Other flows subscribed to its messages (`subscribes`), each a rule for one target.
    pub(crate) subscribers: Vec<Rule>,
    pub(crate) delivery: DeliveryPolicy,
    pub(crate) reply: Reply,
    pub(crate) templates: Templates,
    pub(crate) sensitive: crate::redact::Sensitive,
    pub(crate) meters: crate::observe::FlowMeters,
}

/// How a flow delivers.
#[derive(Debug)]
pub(crate) struct DeliveryPolicy {
    pub(crate) mode: DeliveryMode,
    pub(crate) retry: RetryPolicy,
    /// Whether the flow sets `retry` itself (else `retry` is the default).
    pub(crate) retry_declared: bool,
    pub(crate) concurrency: u32,
    pub(crate) on_delivered: Option<AfterDelivery>,
    pub(crate) on_failed: Option<AfterDelivery>,
}

/// A correlation change after delivery, compiled.
#[derive(Debug)]
pub(crate) struct AfterDelivery {
    pub(crate) state: Option<String>,
    pub(crate) keys: Vec<TextTemplate>,
    pub(crate) data: Option<JsonTemplate>,
}

/// What the steps decided for a message.
#[derive(Debug, Default)]
pub struct Processed {
    /// The indices of the targets it goes to: the one (or the list) its route chose, and
    /// every subscriber whose condition holds.
    pub targets: Vec<usize>,
    /// Correlation changes to commit with it.
    pub correlation: Vec<CorrelationWrite>,
}

/// What starts a flow.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per flow, built once at load"
)]
pub enum Trigger {
    /// Nothing: other flows call it.
    Called,
    /// An HTTP endpoint.
    Http(HttpTrigger),
    /// A queue consumer.
    Queue(QueueTrigger),
    /// An MLLP listener.
    Mllp(MllpTrigger),
}

impl Trigger {
    /// What starts the flow, in a few words: `POST /lab-results`, `MLLP on 0.0.0.0:2575`.
    pub fn describe(&self) -> String {
        match self {
            Self::Called => "called by other flows".to_owned(),
            Self::Http(t) => format!("{} {}", t.method, t.path),
            Self::Queue(t) => format!("queue {}", t.spec),
            Self::Mllp(t) => format!("MLLP on {}", t.listen),
        }
    }
}

/// A compiled MLLP trigger.
#[derive(Debug)]
pub struct MllpTrigger {
    /// The address to listen on, as configured (port 0 takes a free one).
    pub listen: String,
    /// The largest message accepted, in bytes.
    pub max_message: usize,
    /// How long a connection may stay silent.
    pub idle_timeout: std::time::Duration,
    /// Most connections at once.
    pub max_connections: u32,
    /// Where a message's identity comes from, when not its control id.
    pub idempotency_key: Option<JsonPath>,
    /// The certificate to serve TLS with.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

/// A compiled queue trigger.
#[derive(Debug, Clone)]
pub struct QueueTrigger {
    /// The queue.
    pub spec: crate::queue::QueueSpec,
    /// Messages in flight at once.
    pub prefetch: u16,
    /// Attempts before a dead letter.
    pub attempts: u32,
    /// First backoff; it doubles with each attempt.
    pub backoff: std::time::Duration,
    /// Where a message's identity comes from, when not the publisher's key.
    pub idempotency_key: Option<JsonPath>,
}

impl QueueTrigger {
    /// How a message that keeps failing is retried: `attempts` times, after a backoff from
    /// `backoff` doubling up to five minutes, with full jitter — the policy durable delivery
    /// uses, with the trigger's count as its budget.
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            attempts: Some(self.attempts),
            budget: None,
            initial: self.backoff,
            max: std::time::Duration::from_secs(300),
        }
    }
}

/// A compiled HTTP trigger.
#[derive(Debug)]
pub struct HttpTrigger {
    /// The method it answers.
    pub method: Method,
    /// The axum route path, such as `/orders/{id}`.
    pub path: String,
    /// The largest body accepted, in bytes.
    pub max_body: u64,
    /// The deepest JSON nesting accepted.
    pub max_depth: u32,
    /// Where a submission's identity comes from, when not the `Idempotency-Key` header.
    pub idempotency_key: Option<JsonPath>,
    /// Who may call.
    pub auth: crate::auth::Auth,
    /// How often one client may call.
    pub rate_limit: Option<RateLimit>,
}

/// A flow's reply, compiled.
#[derive(Debug)]
pub(crate) struct Reply {
    /// Whether the flow declares its reply (else a called flow's reply stands in).
    pub(crate) declared: bool,
    pub(crate) status: StatusCode,
    pub(crate) headers: Vec<(HeaderName, TextTemplate)>,
    pub(crate) body: JsonTemplate,
    /// The body's template as written, for documents that describe the reply's shape.
    pub(crate) body_source: Value,
}

/// The reply rendered for one message.
#[derive(Debug, Clone)]
pub struct RenderedReply {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: Vec<(HeaderName, String)>,
    /// JSON body.
    pub body: Value,
}

impl From<RenderedReply> for crate::store::StoredReply {
    fn from(reply: RenderedReply) -> Self {
        Self {
            status: reply.status.as_u16(),
            headers: reply
                .headers
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
            body: reply.body,
        }
    }
}

impl Flow {
    /// The fields the flow marks sensitive.
    pub fn sensitive(&self) -> &crate::redact::Sensitive {
        &self.sensitive
    }

    /// The flow's targets.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The HTTP trigger, if the flow has one.
    pub fn http_trigger(&self) -> Option<&HttpTrigger> {
        match &self.trigger {
            Trigger::Http(http) => Some(http),
            _ => None,
        }
    }

    /// The queue trigger, if the flow has one.
    pub fn queue_trigger(&self) -> Option<&QueueTrigger> {
        match &self.trigger {
            Trigger::Queue(queue) => Some(queue),
            _ => None,
        }
    }

    /// The MLLP trigger, if the flow has one.
    pub fn mllp_trigger(&self) -> Option<&MllpTrigger> {
        match &self.trigger {
            Trigger::Mllp(mllp) => Some(mllp),
            _ => None,
        }
    }

    /// The content type every message of the trigger has, whatever its sender declares:
    /// HL7 v2 for MLLP. `ferry test` and `ferry run` read their inputs by it.
    pub fn trigger_content_type(&self) -> Option<&'static str> {
        self.mllp_trigger().map(|_| crate::message::HL7_MEDIA_TYPE)
    }

    /// Whether the flow declares its own reply.
    pub fn declares_reply(&self) -> bool {
        self.reply.declared
    }

    /// Whether accepted messages are stored and delivered in the background.
    pub fn is_durable(&self) -> bool {
        self.delivery.mode == DeliveryMode::Durable && !self.targets.is_empty()
    }

    /// How durable delivery retries.
    pub fn retry(&self) -> RetryPolicy {
        self.delivery.retry
    }

    /// Whether the flow sets its own retry policy.
    pub fn declares_retry(&self) -> bool {
        self.delivery.retry_declared
    }

    /// How many deliveries to one target may run at once.
    pub fn concurrency(&self) -> u32 {
        self.delivery.concurrency
    }

    /// The submission's idempotency key: the trigger's JSONPath when the flow names one,
    /// else the caller's `Idempotency-Key` header (which a queue consumer sets from the
    /// publisher's key).
    pub fn idempotency_key(&self, message: &Message) -> Option<String> {
        let path = match &self.trigger {
            Trigger::Http(http) => http.idempotency_key.as_ref(),
            Trigger::Queue(queue) => queue.idempotency_key.as_ref(),
            Trigger::Mllp(mllp) => mllp.idempotency_key.as_ref(),
            Trigger::Called => None,
        };
        let value = match path {
            Some(path) => path.extract(message.root()),
            None => message.root()["meta"]["headers"]["idempotency-key"].clone(),
        };
        match value {
            Value::Null => None,
            Value::String(key) if key.is_empty() => None,
            Value::String(key) => Some(key),
            other => Some(other.to_string()),
        }
    }

    /// Refuses a message its chosen target could never be sent (see
    /// [`crate::targets::HttpTarget::check_request`]).
    ///
    /// # Errors
    ///
    /// [`FlowError::Unprocessable`] saying why.
    pub fn check_request(&self, targets: &[usize], message: &Message) -> Result<(), FlowError> {
        for &index in targets {
            match &self.targets[index] {
                Target::Http(http) => http.check_request(message, &self.templates)?,
                Target::Mllp(mllp) => {
                    mllp.prepare(message)?;
                }
                Target::Queue(_) | Target::Flow(_) => {}
            }
        }
        Ok(())
    }

    /// The change `on_delivered` (or `on_failed`) makes to the message's correlation record
    /// once `target` has the message (or never will). None for a subscriber's target: the
    /// flow's states are about its own targets.
    pub fn after_delivery(
        &self,
        target: &Target,
        delivered: bool,
        message: &Message,
    ) -> Option<RecordChange> {
        if matches!(target, Target::Flow(call) if call.subscribed) {
            return None;
        }
        let outcome = if delivered {
            &self.delivery.on_delivered
        } else {
            &self.delivery.on_failed
        };
        let outcome = outcome.as_ref()?;
        let keys = outcome
            .keys
            .iter()
            .filter_map(|k| self.templates.render_text(k, message).ok())
            .filter(|k| !k.is_empty())
            .collect();
        let data = match &outcome.data {
            Some(template) => self
                .templates
                .render_json(template, message)
                .unwrap_or(Value::Null),
            None => Value::Null,
        };
        Some(RecordChange {
            keys,
            data,
            state: outcome.state.clone(),
        })
    }

    /// Runs every step on `message` and returns what they decided. `store` serves
    /// `correlate` lookups.
    ///
    /// # Errors
    ///
    /// The first step that refuses the message.
    pub async fn run_steps(
        &self,
        message: &mut Message,
        store: Option<&Store>,
    ) -> Result<Processed, FlowError> {
        self.run_steps_watched(message, store, &mut |_, _| {}).await
    }

    /// [`Flow::run_steps`], showing `watch` the message after each step, for `ferry run`.
    ///
    /// # Errors
    ///
    /// The first step that refuses the message.
    pub async fn run_steps_watched(
        &self,
        message: &mut Message,
        store: Option<&Store>,
        watch: &mut (dyn FnMut(&str, &Message) + Send),
    ) -> Result<Processed, FlowError> {
        let mut state = StepState::default();
        for (index, (label, step)) in self.steps.iter().enumerate() {
            let started = std::time::Instant::now();
            if let Err(mut error) = step
                .apply(message, &self.templates, &mut state, store, label)
                .await
            {
                match &mut error {
                    FlowError::Invalid { violations, .. } if !self.sensitive.is_empty() => {
                        for violation in violations {
                            violation.message =
                                self.sensitive.scrub(message.body(), &violation.message);
                        }
                    }
                    // Where the step is written, so the integrator goes straight to it.
                    FlowError::Unprocessable { context, .. } => {
                        if let Some(at) = self.step_locations.get(index) {
                            context.push_str(&format!(" at line {}", at.line()));
                        }
                    }
                    _ => {}
                }
                return Err(error);
            }
            self.meters.steps[index]
                .get(|| metrics::histogram!("ferry_step_duration_seconds", "flow" => self.name.clone(), "step" => label.clone()))
                .record(started.elapsed().as_secs_f64());
            watch(label, message);
        }
        let mut targets = match state.route {
            Some(targets) => targets,
            None => match self.claims.first_match(message, &self.templates)? {
                Some(claimed) => claimed.to_vec(),
                None => self.default_target.into_iter().collect(),
            },
        };
        for subscriber in &self.subscribers {
            let holds = match &subscriber.condition {
                None => true,
                Some(condition) => condition.holds(message, &self.templates)?,
            };
            if holds {
                // One delivery to each target, however many of its subscriptions hold (a rule
                // never lists a target twice).
                for target in &subscriber.targets {
                    if !targets.contains(target) {
                        targets.push(*target);
                    }
                }
            }
        }
        Ok(Processed {
            targets,
            correlation: state.correlation,
        })
    }

    /// The schema the flow's first step validates its input against, if it starts so.
    pub fn input_schema(&self) -> Option<&str> {
        match self.steps.first() {
            Some((_, Step::Validate(validate))) => Some(validate.schema_name()),
            _ => None,
        }
    }

    /// The label of the step after the one labelled `label` (the step that refused, when
    /// `label` is the last that passed); the first step's when `label` is empty.
    pub fn steps_after(&self, label: &str) -> Option<String> {
        let next = if label.is_empty() {
            0
        } else {
            self.steps.iter().position(|(l, _)| l == label)? + 1
        };
        self.steps.get(next).map(|(l, _)| l.clone())
    }

    /// Where the step labelled `label` is written.
    pub fn step_location(&self, label: &str) -> Option<serde_saphyr::Location> {
        let index = self.steps.iter().position(|(l, _)| l == label)?;
        self.step_locations.get(index).copied()
    }

    /// The labels of the steps, as `step 2 (transform)`, for timelines.
    pub fn step_labels(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|(label, _)| label.as_str())
    }

    /// Renders the request an HTTP `target` would get for `message`.
    ///
    /// # Errors
    ///
    /// [`FlowError::Unprocessable`] when a template cannot render from this message.
    pub fn prepare(
        &self,
        target: &crate::targets::HttpTarget,
        message: &Message,
    ) -> Result<OutboundRequest, FlowError> {
        target.prepare(message, &self.templates)
    }

    /// The flow's compiled templates.
    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    /// Renders the reply for a handled message.
    ///
    /// # Errors
    ///
    /// [`FlowError::Unprocessable`] when a reply template cannot render.
    pub fn render_reply(&self, message: &Message) -> Result<RenderedReply, FlowError> {
        let unprocessable = |reason| FlowError::Unprocessable {
            context: "reply".into(),
            reason,
        };
        let body = self
            .templates
            .render_json(&self.reply.body, message)
            .map_err(unprocessable)?;
        let mut headers = Vec::with_capacity(self.reply.headers.len());
        for (name, template) in &self.reply.headers {
            let value = self
                .templates
                .render_text(template, message)
                .map_err(unprocessable)?;
            if HeaderValue::from_str(&value).is_err() {
                return Err(unprocessable(format!(
                    "header {name} would hold characters a header cannot (a line break or another control character)"
                )));
            }
            headers.push((name.clone(), value));
        }
        Ok(RenderedReply {
            status: self.reply.status,
            headers,
            body,
        })
    }
}

/// A token bucket per client address.
pub struct RateLimit {
    limiter: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RateLimit")
    }
}

impl RateLimit {
    /// A bucket per client address with `quota`.
    pub(crate) fn new(quota: governor::Quota) -> Self {
        Self {
            limiter: governor::RateLimiter::keyed(quota),
        }
    }

    /// Takes a token for `client`.
    ///
    /// # Errors
    ///
    /// The seconds until one is free, when none is.
    pub fn check(&self, client: std::net::IpAddr) -> Result<(), u64> {
        use governor::clock::Clock as _;
        if self.limiter.len() > 100_000 {
            self.limiter.retain_recent(); // forget clients whose buckets are full again
        }
        self.limiter.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

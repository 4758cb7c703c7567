//! The flow file format: plain serde types, exactly as an integrator writes them.
//!
//! Nothing here is compiled or checked beyond its shape; [`crate::compile`] turns a
//! [`FlowConfig`] into a runnable [`crate::flow::Flow`]. Every struct rejects unknown keys,
//! and values that are compiled later (templates, JSONPaths, file names) are
//! [`Spanned`] so their errors point at the exact line and column.

pub mod load;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

pub use serde_saphyr::Spanned;

/// One flow file: a trigger, the steps a message goes through, where it goes, and the reply.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// Unique name of the flow, used in logs, errors and references from other flows.
    pub name: Spanned<String>,
    /// A sentence for people reading the flow; ferry ignores it.
    #[serde(default)]
    pub description: Option<String>,
    /// What starts the flow.
    pub trigger: TriggerConfig,
    /// Steps run in order on every message.
    #[serde(default)]
    pub steps: Vec<Spanned<StepConfig>>,
    /// Named targets. With one target, every message goes there; with several, a `route`
    /// step chooses.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    /// The answer sent to the caller once the message has been handled.
    #[serde(default)]
    pub reply: Option<ReplyConfig>,
}

/// What starts a flow. One key, naming the kind of trigger.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TriggerConfig {
    /// An HTTP endpoint that ferry serves.
    Http(HttpTriggerConfig),
}

/// An HTTP endpoint served by `ferry serve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTriggerConfig {
    /// HTTP method, such as `POST` or `GET`.
    pub method: Spanned<String>,
    /// Path, starting with `/`; `{name}` captures a path segment into `meta.params.name`.
    pub path: Spanned<String>,
    /// Largest accepted request body, such as `1MiB` or `64KiB` (default 1 MiB).
    #[serde(default)]
    pub max_body: Option<Spanned<String>>,
}

/// One step. One key, naming the kind of step: `- validate: {...}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum StepConfig {
    /// Check the body against a JSON Schema; reject the message with every violation.
    Validate(ValidateConfig),
    /// Extract values with JSONPath into named vars: `var_name: $.body.field`.
    Set(BTreeMap<String, Spanned<String>>),
    /// Build a new body from a template.
    Transform(TransformConfig),
    /// Choose a target by the first rule whose condition holds.
    Route(Vec<RouteRuleConfig>),
}

impl StepConfig {
    /// The step's kind as written in YAML, for diagnostics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Validate(_) => "validate",
            Self::Set(_) => "set",
            Self::Transform(_) => "transform",
            Self::Route(_) => "route",
        }
    }
}

/// `validate`: JSON Schema validation of the message body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    /// Schema file, relative to the schemas folder (by default `schemas/` beside `flows/`).
    pub schema: Spanned<String>,
}

/// `transform`: replaces the body with a rendered template, either a JSON tree or text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Structural template: a YAML tree whose string leaves are Handlebars templates.
    /// A leaf that is exactly one `{{path}}` keeps the JSON type of what it reads.
    #[serde(default)]
    pub body: Option<Spanned<Value>>,
    /// Text template for non-JSON bodies; every value is escaped for `content_type`.
    #[serde(default)]
    pub text: Option<Spanned<String>>,
    /// Content type of a `text` body: `text/plain`, `text/csv`, `application/xml`,
    /// `text/html` or `application/json`.
    #[serde(default)]
    pub content_type: Option<Spanned<String>>,
}

/// One rule of a `route` step: a condition and the target it selects.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRuleConfig {
    /// Condition; a rule without one always matches (the default route).
    #[serde(default)]
    pub when: Option<ConditionConfig>,
    /// Name of the target (a key of `targets`) this rule selects.
    pub to: Spanned<String>,
}

/// A condition on the message: a JSONPath and what its result must be.
///
/// With neither `equals` nor `in`, the condition holds when the path selects anything
/// (`exists: true`) or nothing (`exists: false`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    /// JSONPath over the message (`$.body…`, `$.vars…`, `$.meta…`).
    pub path: Spanned<String>,
    /// Holds when the selected value equals this value.
    #[serde(default)]
    pub equals: Option<Value>,
    /// Holds when the selected value equals one of these values.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<Value>>,
    /// Holds when the path selects something (`true`) or nothing (`false`).
    #[serde(default)]
    pub exists: Option<bool>,
}

/// Where messages go. One key, naming the kind of target.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TargetConfig {
    /// An HTTP call.
    Http(HttpTargetConfig),
}

/// An HTTP call to a partner system.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTargetConfig {
    /// URL template; values from the message are percent-encoded.
    pub url: Spanned<String>,
    /// HTTP method (default `POST`).
    #[serde(default)]
    pub method: Option<Spanned<String>>,
    /// Request headers; values are templates.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    /// How long to wait for the whole response, such as `10s` (default 30s).
    #[serde(default)]
    pub timeout: Option<Spanned<String>>,
    /// JSONPaths over the response body whose values are saved into vars:
    /// `var_name: $.field`.
    #[serde(default)]
    pub capture: BTreeMap<String, Spanned<String>>,
}

/// The answer to the caller.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyConfig {
    /// HTTP status (default 200).
    #[serde(default)]
    pub status: Option<Spanned<u16>>,
    /// Response headers; values are templates.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    /// Structural template of the response body, like `transform.body`.
    #[serde(default)]
    pub body: Option<Spanned<Value>>,
}

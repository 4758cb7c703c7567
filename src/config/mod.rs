//! The flow file format: plain serde types, exactly as an integrator writes them.
//!
//! Nothing here is compiled or checked beyond its shape; [`crate::compile`] turns a
//! [`FlowConfig`] into a runnable [`crate::flow::Flow`]. Every struct rejects unknown keys,
//! and values that are compiled later (templates, JSONPaths, file names) are
//! [`Spanned`] so their errors point at the exact line and column.

pub mod load;
mod security;
pub mod shape;

pub use security::*;

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

pub use serde_saphyr::Spanned;

/// The flow format's JSON Schema, generated from these types, for editors: the shipped
/// `schemas/flow.schema.json` (a test keeps it current; `ferry schema` prints it).
pub fn json_schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(FlowConfig)).unwrap_or(Value::Null);
    allow_variables_in_numbers(&mut schema);
    schema
}

/// A number may be written as `${VAR}` (interpolated before parsing): say so, so editors do
/// not flag it.
fn allow_variables_in_numbers(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is_number = |t: &Value| t == "integer" || t == "number";
            let numeric = match map.get("type") {
                Some(Value::Array(types)) => types.iter().any(is_number),
                Some(t) => is_number(t),
                None => false,
            };
            if numeric {
                let number = Value::Object(std::mem::take(map));
                map.insert(
                    "anyOf".into(),
                    serde_json::json!([number, {"type": "string", "pattern": "^\\$\\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\\}$"}]),
                );
                return;
            }
            map.values_mut().for_each(allow_variables_in_numbers);
        }
        Value::Array(items) => items.iter_mut().for_each(allow_variables_in_numbers),
        _ => {}
    }
}

/// The shape of a structural template, for editors: YAML shaped like the output, whose
/// strings may hold `{{expressions}}`, with `$each` and `$if` objects (see the README's
/// transform reference). Only the flow format's JSON Schema uses it; flows are read as values.
pub struct StructuralTemplate;

impl JsonSchema for StructuralTemplate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StructuralTemplate".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let this = generator.subschema_for::<Self>();
        let expression = |what: &str| serde_json::json!({"type": "string", "pattern": "^\\{\\{.*\\}\\}$", "description": what});
        schemars::json_schema!({
            "description": "A structural template: YAML shaped like the output. A string that is one `{{expression}}` keeps its value's JSON type; other strings with `{{…}}` are text. `$each` builds an array item by item, `$if` chooses a subtree, and a key ending in `?` is left out when its value is missing, null or \"\".",
            "anyOf": [
                {"type": ["string", "number", "integer", "boolean", "null"]},
                {"type": "array", "items": this},
                {
                    "type": "object",
                    "description": "An array built from an array: the other keys (or `$value`) are what each item becomes.",
                    "required": ["$each"],
                    "properties": {
                        "$each": expression("One `{{…}}` naming the array, such as `{{body.samples}}`."),
                        "$as": {"type": "string", "description": "The name each item is read by (default `item`)."},
                        "$where": expression("Keeps the items for which this `{{…}}` is truthy."),
                        "$flatten": {"type": "boolean", "description": "Joins items that are arrays into one array."},
                        "$value": this
                    },
                    "additionalProperties": this
                },
                {
                    "type": "object",
                    "description": "One subtree or another.",
                    "required": ["$if", "$then"],
                    "properties": {
                        "$if": expression("One `{{…}}`: truthy chooses `$then`, else `$else`."),
                        "$then": this,
                        "$else": this
                    },
                    "additionalProperties": false
                },
                {"type": "object", "additionalProperties": this}
            ]
        })
    }
}

/// One flow file: a trigger, the steps a message goes through, where it goes, and the reply.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// Unique name of the flow, used in logs, errors and references from other flows.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// A sentence for people reading the flow; ferry ignores it.
    #[serde(default)]
    pub description: Option<String>,
    /// What starts the flow. A flow without one runs only when another flow calls it
    /// (`flow:` target or route rule).
    #[serde(default)]
    pub trigger: Option<TriggerConfig>,
    /// Steps run in order on every message.
    #[serde(default)]
    #[schemars(with = "Vec<StepConfig>")]
    pub steps: Vec<Spanned<StepConfig>>,
    /// Named targets. With one target, every message goes there; with several, a `route`
    /// step chooses.
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
    /// Shares of other flows' messages this flow takes in place of their own targets: how a
    /// partner's folder joins a shipped flow without editing it.
    #[serde(default)]
    pub takes: Vec<TakesConfig>,
    /// Other flows whose messages this flow receives too, besides their own targets.
    #[serde(default)]
    pub subscribes: Vec<SubscribesConfig>,
    /// How messages reach the targets: stored and retried (the default), or synchronously.
    #[serde(default)]
    pub delivery: Option<DeliveryConfig>,
    /// The answer sent to the caller once the message has been handled.
    #[serde(default)]
    pub reply: Option<ReplyConfig>,
    /// Lookup tables templates read with `{{table "NAME" KEY DEFAULT}}`: each maps keys
    /// (a partner's codes, say) to values, such as `priority: {routine: R, urgent: S}`.
    #[serde(default)]
    pub tables: BTreeMap<String, serde_json::Map<String, Value>>,
    /// Fields holding personal or secret data, as JSON pointers into the body such as
    /// `/customer/email`: their values are redacted in logs, errors, timelines and the
    /// admin API (targets still receive them).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub sensitive: Vec<Spanned<String>>,
}

/// What starts a flow. One key, naming the kind of trigger.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
#[allow(
    clippy::large_enum_variant,
    reason = "one per flow, built once at load"
)]
pub enum TriggerConfig {
    /// An HTTP endpoint that ferry serves.
    Http(HttpTriggerConfig),
    /// A queue that ferry consumes.
    Queue(QueueTriggerConfig),
    /// An MLLP listener: HL7 v2 messages over TCP, each acknowledged.
    Mllp(MllpTriggerConfig),
}

/// An MLLP listener served by `ferry serve`: HL7 v2 messages framed over TCP. Each message
/// is acknowledged once the flow has it for good: committed (a durable flow) or delivered
/// (a sync flow).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MllpTriggerConfig {
    /// Address to listen on, such as `0.0.0.0:2575` or `${LAB_MLLP_LISTEN}`. Port 0 takes a
    /// free port, which `ferry serve` prints.
    #[schemars(with = "String")]
    pub listen: Spanned<String>,
    /// Largest message accepted, such as `1MiB` (default 1 MiB). A larger one is answered
    /// `AE` and its connection closed.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub max_message: Option<Spanned<String>>,
    /// How long a connection may stay silent before ferry closes it, such as `5m` (the
    /// default).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub idle_timeout: Option<Spanned<String>>,
    /// Most connections served at once (default 64); more wait to be accepted.
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub max_connections: Option<Spanned<u32>>,
    /// JSONPath over the message whose value identifies it. Without it, the control id
    /// (`MSH-10`) does: a message sent again is acknowledged again and, by a durable flow,
    /// handled once.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub idempotency_key: Option<Spanned<String>>,
    /// Serve MLLP over TLS with this certificate and key.
    #[serde(default)]
    pub tls: Option<MllpTlsConfig>,
}

/// The certificate an MLLP listener presents.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MllpTlsConfig {
    /// PEM certificate chain, relative to the flow file.
    #[schemars(with = "String")]
    pub cert_file: Spanned<String>,
    /// PEM private key, relative to the flow file.
    #[schemars(with = "String")]
    pub key_file: Spanned<String>,
}

/// Which queue implementation carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QueueDriver {
    /// A durable queue inside ferry's store; no broker needed.
    Embedded,
    /// RabbitMQ (AMQP 0-9-1).
    Amqp,
    /// NATS JetStream.
    Nats,
}

/// A queue that a flow consumes.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueTriggerConfig {
    /// `embedded` (default), `amqp` or `nats`.
    #[serde(default)]
    pub driver: Option<QueueDriver>,
    /// The queue (AMQP queue, NATS subject, embedded queue name).
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Broker URL for `amqp` and `nats`, such as `${AMQP_URL}`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub url: Option<Spanned<String>>,
    /// How many messages may be in flight at once (default 16).
    #[serde(default)]
    #[schemars(with = "Option<u16>")]
    pub prefetch: Option<Spanned<u16>>,
    /// Attempts before a message that keeps failing becomes a dead letter (default 5).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub attempts: Option<Spanned<u32>>,
    /// Backoff before a failed message is tried again, such as `1s` (default 1s, doubling).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub backoff: Option<Spanned<String>>,
    /// JSONPath over the message whose value identifies it, such as `$.body.result_id`: a
    /// message delivered again is then handled once by a durable flow even when its publisher
    /// gave it no id. Without it, the publisher's `ferry-idempotency-key` header or message id
    /// does this, and a message with neither is handled each time it is delivered.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub idempotency_key: Option<Spanned<String>>,
}

/// An HTTP endpoint served by `ferry serve`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpTriggerConfig {
    /// HTTP method, such as `POST` or `GET`.
    #[schemars(with = "String")]
    pub method: Spanned<String>,
    /// Path, starting with `/`; `{name}` captures a path segment into `meta.params.name`.
    #[schemars(with = "String")]
    pub path: Spanned<String>,
    /// Largest accepted request body, such as `1MiB` or `64KiB` (default 1 MiB).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub max_body: Option<Spanned<String>>,
    /// JSONPath over the message whose value identifies a submission, such as
    /// `$.body.portal_ref`: a repeated submission gets the first one's reply and is not
    /// delivered again (by a durable flow; a sync flow keeps no messages). Without it, the
    /// caller's `Idempotency-Key` header does this.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub idempotency_key: Option<Spanned<String>>,
    /// Who may call: `none`, `api_key`, `webhook_signature` or `jwt`. Required: an endpoint
    /// open to anyone says `auth: none`.
    #[serde(default)]
    #[schemars(with = "Option<AuthConfig>")]
    pub auth: Option<Spanned<AuthConfig>>,
    /// A per-client rate limit; over it, `429` with `Retry-After`.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Deepest JSON nesting accepted in a body (default 64, at most 128).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub max_depth: Option<Spanned<u32>>,
}

/// One step. One key, naming the kind of step: `- validate: {...}`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum StepConfig {
    /// Check the body against a JSON Schema; reject the message with every violation.
    Validate(ValidateConfig),
    /// Extract values with JSONPath into named vars: `var_name: $.body.field`.
    #[schemars(with = "BTreeMap<String, String>")]
    Set(BTreeMap<String, Spanned<String>>),
    /// Build a new body from a template.
    Transform(TransformConfig),
    /// Choose a target by the first rule whose condition holds.
    Route(Vec<RouteRuleConfig>),
    /// Save or find a correlation record shared across flows.
    Correlate(CorrelateConfig),
}

impl FlowConfig {
    /// The rules of its `route` steps, in order.
    pub fn route_rules(&self) -> impl Iterator<Item = &RouteRuleConfig> {
        self.steps
            .iter()
            .filter_map(|s| match &s.value {
                StepConfig::Route(rules) => Some(rules),
                _ => None,
            })
            .flatten()
    }
}

impl StepConfig {
    /// The step's kind as written in YAML, for diagnostics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Validate(_) => "validate",
            Self::Set(_) => "set",
            Self::Transform(_) => "transform",
            Self::Route(_) => "route",
            Self::Correlate(_) => "correlate",
        }
    }
}

/// `validate`: JSON Schema validation of the message body.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateConfig {
    /// Schema file, relative to the schemas folder (by default `schemas/` beside `flows/`).
    #[schemars(with = "String")]
    pub schema: Spanned<String>,
    /// Fill in the `default` the schema declares for each property the body lacks, before
    /// checking it, so later steps read it (default false).
    #[serde(default)]
    pub defaults: bool,
}

/// `transform`: replaces the body with a rendered template, either a JSON tree or text.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Structural template: a YAML tree whose string leaves are Handlebars templates.
    /// A leaf that is exactly one `{{path}}` keeps the JSON type of what it reads.
    #[serde(default)]
    #[schemars(with = "Option<StructuralTemplate>")]
    pub body: Option<Spanned<Value>>,
    /// Text template for non-JSON bodies; every value is escaped for `content_type`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub text: Option<Spanned<String>>,
    /// Content type of a `text` body: `text/plain`, `text/csv`, `application/xml`,
    /// `text/html`, `application/json` or `x-application/hl7-v2+er7` (HL7 v2).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub content_type: Option<Spanned<String>>,
}

/// One rule of a `route` step: a condition and the target it selects.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRuleConfig {
    /// Condition; a rule without one always matches (the default route).
    #[serde(default)]
    pub when: Option<ConditionConfig>,
    /// The target (a key of `targets`) this rule selects, or a list of targets that all
    /// receive the message: `to: [portal, archive]`.
    #[serde(default)]
    #[schemars(with = "Option<OneOrMany>")]
    pub to: Option<Spanned<TargetNames>>,
    /// Name of a flow this rule hands the message to, as if it were a `flow:` target (a
    /// partner in its own folder rather `takes` its share).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub flow: Option<Spanned<String>>,
}

/// One target name, or several: `to: lab` or `to: [portal, archive]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetNames(pub Vec<String>);

impl<'de> Deserialize<'de> for TargetNames {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Names;
        impl<'de> serde::de::Visitor<'de> for Names {
            type Value = TargetNames;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a target name or a list of target names")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<TargetNames, E> {
                Ok(TargetNames(vec![name.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TargetNames, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                if names.is_empty() {
                    return Err(serde::de::Error::custom("list at least one target"));
                }
                Ok(TargetNames(names))
            }
        }
        deserializer.deserialize_any(Names)
    }
}

/// How the flow schema describes [`TargetNames`].
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code, reason = "describes the YAML for editors; never built")]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `takes`: a share of another flow's messages that this flow delivers instead of that
/// flow's own target, so a partner (another lab, say) joins by adding its own folder, with
/// no edit to the flow it joins.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TakesConfig {
    /// The flow whose messages it takes, such as `portal-to-lab`.
    #[schemars(with = "String")]
    pub from: Spanned<String>,
    /// Which of them: a condition as in a `route` rule, read where that flow routes (at its
    /// `route` step, or after its last step when it has none). Claims are tried before the
    /// flow's own rules.
    pub when: ConditionConfig,
}

/// `subscribes`: another flow's messages that this flow receives too, besides that flow's
/// own targets (a billing system that gets every result, say). Each subscriber's deliveries
/// are its own: own retries, own dead letters, and a slow one holds up no one else.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribesConfig {
    /// The flow whose messages it receives, such as `lab-to-portal`.
    #[schemars(with = "String")]
    pub to: Spanned<String>,
    /// Which of them (all when absent): a condition as in a `route` rule, read on the
    /// message as that flow's steps leave it.
    #[serde(default)]
    pub when: Option<ConditionConfig>,
}

/// A condition on the message: a JSONPath and what its result must be, or a `test`
/// expression.
///
/// With neither `equals` nor `in`, a path condition holds when the path selects anything
/// (`exists: true`) or nothing (`exists: false`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    /// JSONPath over the message (`$.body…`, `$.vars…`, `$.meta…`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
    /// Instead of `path`: one `{{expression}}` that holds when its value is truthy, such as
    /// `"{{in (upper body.lab) 'NORTH' 'NORTHWIND'}}"`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub test: Option<Spanned<String>>,
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

/// `correlate`: a record that messages of several flows share, such as a Test Request and
/// its results, found by any of its keys. Exactly one of `save` and `find`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CorrelateConfig {
    /// Namespace of the records, such as `test-request`.
    #[schemars(with = "String")]
    pub context: Spanned<String>,
    /// Templates of the keys to save the record under; the first is its main key. Creates the
    /// record, or updates the one an existing key names.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub save: Option<Vec<Spanned<String>>>,
    /// Templates of keys to look the record up by, in order; the first that names a record
    /// wins. A message that finds none is refused with 404 and kept as a dead letter.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    pub find: Option<Vec<Spanned<String>>>,
    /// The var that receives the found record: `{key, keys, data, state, history}`
    /// (default `correlation`).
    #[serde(default)]
    pub into: Option<String>,
    /// Structural template of fields merged into the record's data.
    #[serde(default)]
    #[schemars(with = "Option<StructuralTemplate>")]
    pub data: Option<Spanned<Value>>,
    /// Lifecycle state to record, such as `accepted`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub state: Option<Spanned<String>>,
}

/// How a flow delivers to its targets.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// `durable` (default): the message is stored before the reply and delivered in the
    /// background, retried until the target takes it. `sync`: the reply waits for the target.
    #[serde(default)]
    pub mode: Option<DeliveryMode>,
    /// How durable delivery retries.
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// How many deliveries to each target may run at once (default 8).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub concurrency: Option<Spanned<u32>>,
    /// Changes to the message's correlation record once a target took it.
    #[serde(default)]
    pub on_delivered: Option<AfterDeliveryConfig>,
    /// Changes to the message's correlation record once delivery failed for good (a durable
    /// flow's: a sync flow's failure fails the request and changes nothing).
    #[serde(default)]
    pub on_failed: Option<AfterDeliveryConfig>,
}

/// Delivery modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// Stored, then delivered in the background with retries.
    Durable,
    /// Delivered before the reply; a failure is the caller's 502.
    Sync,
}

/// Retries of durable delivery: capped exponential backoff with full jitter, within a budget
/// of time, of attempts, or both (whichever ends first). Without either, `for: 72h`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// How long after it was accepted a message is still tried, such as `72h` (default
    /// 72h when `attempts` is not given either). A last attempt is made when it ends.
    #[serde(default, rename = "for")]
    #[schemars(with = "Option<String>")]
    pub budget: Option<Spanned<String>>,
    /// Attempts before the message becomes a dead letter (default: as many as `for`
    /// allows).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub attempts: Option<Spanned<u32>>,
    /// Backoff before the second attempt, such as `500ms` (default 500ms).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub initial: Option<Spanned<String>>,
    /// Longest backoff, such as `5m` (default 5m).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub max: Option<Spanned<String>>,
}

/// A change to the correlation record of a message after delivery.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AfterDeliveryConfig {
    /// Lifecycle state to record, such as `delivered_to_lab`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub state: Option<Spanned<String>>,
    /// Templates of more keys to find the record by, such as `{{vars.lab_order_id}}`;
    /// templates read the message and what the target's answer captured.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub keys: Vec<Spanned<String>>,
    /// Structural template of fields merged into the record's data.
    #[serde(default)]
    #[schemars(with = "Option<StructuralTemplate>")]
    pub data: Option<Spanned<Value>>,
}

/// Where messages go. One key, naming the kind of target.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
#[allow(
    clippy::large_enum_variant,
    reason = "one per flow, built once at load"
)]
pub enum TargetConfig {
    /// An HTTP call.
    Http(HttpTargetConfig),
    /// A queue: embedded, RabbitMQ or NATS JetStream.
    Queue(QueueTargetConfig),
    /// An HL7 v2 partner over MLLP: the message is sent and its acknowledgement awaited.
    Mllp(MllpTargetConfig),
    /// Another flow, called in-process: its reply fields become this flow's vars.
    #[schemars(with = "String")]
    Flow(Spanned<String>),
}

/// A queue that a flow publishes to.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueTargetConfig {
    /// `embedded` (default), `amqp` or `nats`.
    #[serde(default)]
    pub driver: Option<QueueDriver>,
    /// The queue (AMQP queue, NATS subject, embedded queue name).
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Broker URL for `amqp` and `nats`, such as `${AMQP_URL}`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub url: Option<Spanned<String>>,
}

/// An HL7 v2 partner reached over MLLP. The body sent is the message's HL7 text (a
/// `transform` with `content_type: x-application/hl7-v2+er7` renders it). `AA` or `CA` is
/// delivery; `AR`, `CR` and no answer are tried again; `AE` or `CE` is a dead letter.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MllpTargetConfig {
    /// The partner's `host:port`, such as `${LAB_MLLP}`.
    #[schemars(with = "String")]
    pub address: Spanned<String>,
    /// How long to wait for the acknowledgement, such as `30s` (the default).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Spanned<String>>,
    /// JSONPaths over the acknowledgement (read as HL7 into JSON) whose values are saved
    /// into vars: `var_name: $.MSA[0]['2']`. An application acknowledgement such as
    /// `ORL^O22` carries the lab's own order number in its `ORC`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    pub capture: BTreeMap<String, Spanned<String>>,
    /// Send over TLS: `tls: {}` trusts the public web's certificate authorities, and
    /// `ca_file` a partner's own CA besides.
    #[serde(default)]
    pub tls: Option<TargetTlsConfig>,
}

/// An HTTP call to a partner system.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpTargetConfig {
    /// URL template; values from the message are percent-encoded.
    #[schemars(with = "String")]
    pub url: Spanned<String>,
    /// HTTP method (default `POST`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub method: Option<Spanned<String>>,
    /// Request headers; values are templates.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    pub headers: BTreeMap<String, Spanned<String>>,
    /// How long to wait for the whole response, such as `10s` (default 30s).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Spanned<String>>,
    /// JSONPaths over the response body whose values are saved into vars:
    /// `var_name: $.field`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    pub capture: BTreeMap<String, Spanned<String>>,
    /// Credentials to present: `bearer`, `basic` or `oauth2`.
    #[serde(default)]
    pub auth: Option<TargetAuthConfig>,
    /// Sign each request the Standard Webhooks way.
    #[serde(default)]
    pub sign: Option<SignConfig>,
    /// Certificates to trust.
    #[serde(default)]
    pub tls: Option<TargetTlsConfig>,
    /// Hosts a URL may name when its host comes from the message, such as
    /// `["portal.example", "*.portal.example"]`. Required for such a URL.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Allow addresses that are private, loopback or link-local when the host comes from the
    /// message (refused by default).
    #[serde(default)]
    pub allow_private_addresses: bool,
}

/// The answer to the caller.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplyConfig {
    /// HTTP status (default 200).
    #[serde(default)]
    #[schemars(with = "Option<u16>")]
    pub status: Option<Spanned<u16>>,
    /// Response headers; values are templates.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    pub headers: BTreeMap<String, Spanned<String>>,
    /// Structural template of the response body, like `transform.body`.
    #[serde(default)]
    #[schemars(with = "Option<StructuralTemplate>")]
    pub body: Option<Spanned<Value>>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shipped_flow_schema_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/flow.schema.json");
        let shipped: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(
            shipped == super::json_schema(),
            "schemas/flow.schema.json is stale: run `cargo run -- schema > schemas/flow.schema.json`"
        );
    }
}

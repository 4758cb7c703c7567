//! The message that moves through a flow: its `body`, the `vars` that steps set, and `meta`
//! (ids, time, and what the trigger received).
//!
//! Templates and JSONPaths read all three as one JSON document
//! `{"body": …, "vars": {…}, "meta": {…}}`. The message keeps that document inside a
//! Handlebars [`Context`] so rendering a template never copies the body.

use std::collections::BTreeMap;

use handlebars::Context;
use serde_json::{Map, Value};

/// What the trigger received, readable as `meta.*` in templates and `$.meta.*` in JSONPaths.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The id ferry gives the message: a UUIDv7 (time-ordered), or for a called message one
    /// derived from its caller's ([`Meta::for_call`]).
    pub id: String,
    /// The caller's `X-Correlation-Id`, or the message id when absent.
    pub correlation_id: String,
    /// The flow handling the message.
    pub flow: String,
    /// When ferry received the message (RFC 3339, UTC).
    pub received_at: String,
    /// HTTP method of the request.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Path parameters captured by `{name}` segments.
    pub params: BTreeMap<String, String>,
    /// Query parameters (the last value wins when repeated).
    pub query: BTreeMap<String, String>,
    /// Request headers, names lowercased; credentials are left out.
    pub headers: BTreeMap<String, String>,
}

impl Meta {
    /// Fresh metadata for a message of `flow`: a new id and the current time.
    pub fn new(flow: &str) -> Self {
        let id = uuid::Uuid::now_v7().to_string();
        let received_at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Self {
            correlation_id: id.clone(),
            id,
            flow: flow.to_owned(),
            received_at,
            method: String::new(),
            path: String::new(),
            params: BTreeMap::new(),
            query: BTreeMap::new(),
            headers: BTreeMap::new(),
        }
    }
}

impl From<Meta> for Value {
    /// The metadata as the document's `meta`, its strings moved in, not copied.
    fn from(meta: Meta) -> Self {
        fn strings(map: BTreeMap<String, String>) -> Value {
            Value::Object(
                map.into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect(),
            )
        }
        // Built at once from its fields (a map built from a list sorts it and fills its nodes
        // in one go), not inserted one by one.
        let fields = [
            ("correlation_id", Value::String(meta.correlation_id)),
            ("flow", Value::String(meta.flow)),
            ("headers", strings(meta.headers)),
            ("id", Value::String(meta.id)),
            ("method", Value::String(meta.method)),
            ("params", strings(meta.params)),
            ("path", Value::String(meta.path)),
            ("query", strings(meta.query)),
            ("received_at", Value::String(meta.received_at)),
        ];
        Value::Object(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }
}

/// Header carrying the id of the message a queue message was published from.
pub const MESSAGE_ID: &str = "ferry-message-id";
/// Header carrying the correlation id across a queue.
pub const CORRELATION_ID: &str = "ferry-correlation-id";
/// Header carrying the key a consumer drops duplicates by: `<message id>:<target>`.
pub const IDEMPOTENCY_KEY: &str = "ferry-idempotency-key";
/// A content type's media type, lowercase, without parameters: `Text/CSV; charset=x` → `text/csv`.
/// Borrowed from `content_type` when it is lowercase already, as it nearly always is.
pub fn media_type(content_type: &str) -> std::borrow::Cow<'_, str> {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence.bytes().any(|b| b.is_ascii_uppercase()) {
        essence.to_ascii_lowercase().into()
    } else {
        essence.into()
    }
}

/// The [`CONTENT_TYPE`] among `headers`, whatever the case of its name.
pub fn content_type_of(headers: &BTreeMap<String, String>) -> Option<&str> {
    headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(CONTENT_TYPE))
        .map(|(_, value)| value.as_str())
}

/// The queue message header saying what its payload is (`application/json` when absent);
/// AMQP carries it as the message's `content_type` property.
pub const CONTENT_TYPE: &str = "content-type";

/// The media type ferry gives HL7 v2 in ER7 (what HAPI and most interface engines send).
pub const HL7_MEDIA_TYPE: &str = "x-application/hl7-v2+er7";

/// Headers that carry credentials: they never reach `meta.headers`, so no template, timeline
/// or log sees them (nor does the header a trigger's `auth` names).
const HIDDEN_HEADERS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "webhook-signature",
];

/// What an HTTP request (or a test's stand-in for one) brings to a message.
#[derive(Debug, Default, Clone)]
pub struct Request {
    /// The method.
    pub method: String,
    /// The path, as requested.
    pub path: String,
    /// Path parameters.
    pub params: BTreeMap<String, String>,
    /// Query parameters.
    pub query: BTreeMap<String, String>,
    /// Headers, any case.
    pub headers: Vec<(String, String)>,
}

impl Meta {
    /// A message of `flow` from an HTTP request. Header names are lowercased; credentials,
    /// and `secret` (the header the trigger's auth reads), are left out; the caller's
    /// `X-Correlation-Id` (up to 128 characters) becomes the correlation id, so one id
    /// follows a request across systems.
    pub fn for_http(flow: &str, request: Request, secret: Option<&str>) -> Self {
        let mut meta = Self::new(flow);
        meta.method = request.method;
        meta.path = request.path;
        meta.params = request.params;
        meta.query = request.query;
        for (mut name, value) in request.headers {
            name.make_ascii_lowercase();
            let hidden = HIDDEN_HEADERS.contains(&name.as_str())
                || secret.is_some_and(|s| s.eq_ignore_ascii_case(&name));
            if !hidden {
                meta.headers.insert(name, value);
            }
        }
        if let Some(id) = meta
            .headers
            .get("x-correlation-id")
            .filter(|id| !id.is_empty() && id.len() <= 128)
        {
            meta.correlation_id = id.clone();
        }
        meta
    }

    /// A message of `flow` consumed from `queue` with `headers`: the publisher's correlation
    /// id goes on, and its key ([`IDEMPOTENCY_KEY`]) is the message's idempotency key.
    pub fn for_queue(flow: &str, queue: &str, headers: BTreeMap<String, String>) -> Self {
        let mut meta = Self::new(flow);
        meta.method = "QUEUE".into();
        meta.path = queue.to_owned();
        meta.headers = headers
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        if let Some(id) = meta.headers.get(CORRELATION_ID).filter(|id| !id.is_empty()) {
            meta.correlation_id = id.clone();
        }
        if let Some(key) = meta.headers.get(IDEMPOTENCY_KEY).cloned() {
            meta.headers.insert("idempotency-key".into(), key);
        }
        meta
    }

    /// A message of `flow` received over MLLP on `listen` from `peer`, read into `body`:
    /// its control id (MSH-10) is its idempotency key, so a message sent again is handled
    /// once.
    pub fn for_mllp(flow: &str, listen: &str, peer: &str, body: &serde_json::Value) -> Self {
        let mut meta = Self::new(flow);
        meta.method = "MLLP".into();
        meta.path = listen.to_owned();
        meta.headers
            .insert(CONTENT_TYPE.to_owned(), HL7_MEDIA_TYPE.to_owned());
        meta.headers
            .insert("x-peer-address".into(), peer.to_owned());
        if let Some(id) = body["MSH"][0]["10"].as_str().filter(|id| !id.is_empty()) {
            meta.headers.insert("idempotency-key".into(), id.to_owned());
        }
        meta
    }

    /// A message of flow `callee`, called by `caller`'s flow through its target `target`:
    /// the same conversation (its correlation id), and an id derived from the caller's id and
    /// the target's name. Every attempt, restart and replay of the call makes the same id,
    /// so the called flow's targets get the same `Idempotency-Key` each time, and a called
    /// flow that keeps messages recognises a call it already took (its idempotency key).
    pub fn for_call(callee: &str, caller: &Message, target: &str) -> Self {
        let mut meta = Self::new(callee);
        let derived = format!("{}:{target}", caller.id());
        meta.id = uuid::Uuid::new_v5(&CALL_NAMESPACE, derived.as_bytes()).to_string();
        meta.method = "CALL".into();
        meta.path = caller.root()["meta"]["flow"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        meta.correlation_id = match caller.root()["meta"]["correlation_id"].as_str() {
            Some(id) => id.to_owned(),
            None => meta.id.clone(),
        };
        meta.headers.insert("idempotency-key".into(), derived);
        meta
    }
}

/// The namespace of the ids of called messages (UUIDv5): any fixed value would do; this
/// one is ferry's own.
const CALL_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a1f_1e6c_0f3a_4c1e_9b7d_5f0e_2d4c_8a31);

/// The `traceparent` to send onwards: the trace of the message's own `traceparent` header
/// (W3C Trace Context), with a new parent id for ferry's hop; `None` without a valid one.
pub fn child_traceparent(message: &Message) -> Option<String> {
    let incoming = message.root()["meta"]["headers"]["traceparent"].as_str()?;
    let parts: Vec<&str> = incoming.trim().split('-').collect();
    let [version, trace, _parent, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    if *version != "00" || !hex(trace, 32) || trace.bytes().all(|b| b == b'0') || !hex(flags, 2) {
        return None;
    }
    let span = loop {
        let candidate = fastrand::u64(..);
        if candidate != 0 {
            break candidate;
        }
    };
    Some(format!("00-{trace}-{span:016x}-{flags}"))
}

/// A message in flight.
#[derive(Debug, Clone)]
pub struct Message {
    context: Context,
    /// Content type of a body rendered by a text template; `None` means JSON.
    content_type: Option<String>,
}

impl Message {
    /// A message with `body`, no vars, and `meta`.
    pub fn new(body: Value, meta: Meta) -> Self {
        Self::from_parts(body, meta.into())
    }

    /// A message with `body`, no vars, and `meta` as stored.
    pub fn from_parts(body: Value, meta: Value) -> Self {
        let mut root = Map::with_capacity(3);
        root.insert("body".into(), body);
        root.insert("vars".into(), Value::Object(Map::new()));
        root.insert("meta".into(), meta);
        Self {
            context: Context::from(Value::Object(root)),
            content_type: None,
        }
    }

    /// A message as stored after its steps: the whole document and a text body's type.
    pub fn from_document(document: Value, content_type: Option<String>) -> Self {
        Self {
            context: Context::from(document),
            content_type,
        }
    }

    /// The whole document and a text body's type, as [`Message::from_document`] takes them.
    pub fn into_document(mut self) -> (Value, Option<String>) {
        (std::mem::take(self.context.data_mut()), self.content_type)
    }

    /// What identifies this request besides an idempotency key: a SHA-256 over its method,
    /// path and body (object keys in order), in hex. Two submissions under one key are the
    /// same request when their fingerprints agree. `body` is this message's body as JSON
    /// text ([`crate::json::text`] of [`Message::body`]), which the store keeps too: written
    /// once for both.
    pub fn fingerprint(&self, body: &str) -> String {
        use sha2::Digest as _;
        let root = self.root();
        let mut hash = sha2::Sha256::new();
        for part in [&root["meta"]["method"], &root["meta"]["path"]] {
            hash.update(part.as_str().unwrap_or_default().as_bytes());
            hash.update([0]);
        }
        hash.update(body.as_bytes());
        hex::encode(hash.finalize())
    }

    /// The whole document `{"body", "vars", "meta"}` that templates and JSONPaths read.
    pub fn root(&self) -> &Value {
        self.context.data()
    }

    /// The same document as a Handlebars context, for rendering.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The body.
    pub fn body(&self) -> &Value {
        &self.root()["body"]
    }

    /// The message id (`meta.id`).
    pub fn id(&self) -> &str {
        self.root()["meta"]["id"].as_str().unwrap_or_default()
    }

    /// Replaces the body with JSON.
    pub fn set_body(&mut self, body: Value) {
        self.slot("body", body);
        self.content_type = None;
    }

    /// Changes the body in place.
    pub fn update_body(&mut self, change: impl FnOnce(&mut Value)) {
        if let Some(body) = self.root_mut().get_mut("body") {
            change(body);
        }
    }

    /// Replaces the body with text of the given content type.
    pub fn set_text_body(&mut self, text: String, content_type: &str) {
        self.slot("body", Value::String(text));
        self.content_type = Some(content_type.to_owned());
    }

    /// The content type of a text body, or `None` for JSON.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    /// Sets `vars.<name>`.
    pub fn set_var(&mut self, name: &str, value: Value) {
        if let Some(Value::Object(vars)) = self.root_mut().get_mut("vars") {
            vars.insert(name.to_owned(), value);
        }
    }

    /// Sets a var for every field of `fields`, when it is an object: how a called flow's
    /// reply becomes the caller's vars.
    pub fn merge_vars(&mut self, fields: &Value) {
        if let Value::Object(fields) = fields {
            for (name, value) in fields {
                self.set_var(name, value.clone());
            }
        }
    }

    fn slot(&mut self, key: &str, value: Value) {
        self.root_mut().insert(key.to_owned(), value);
    }

    fn root_mut(&mut self) -> &mut Map<String, Value> {
        let data = self.context.data_mut();
        if !data.is_object() {
            *data = Value::Object(Map::new());
        }
        data.as_object_mut()
            .expect("the root was just made an object")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exposes_body_vars_and_meta_as_one_document() {
        let meta = Meta::new("orders");
        let mut message = Message::new(json!({"a": 1}), meta.clone());
        message.set_var("ref", json!("PR-1"));
        assert_eq!(message.root()["body"], json!({"a": 1}));
        assert_eq!(message.root()["vars"]["ref"], json!("PR-1"));
        assert_eq!(message.root()["meta"]["flow"], json!("orders"));
        assert_eq!(message.id(), meta.id);
        assert_eq!(message.root()["meta"]["correlation_id"], json!(meta.id));
    }

    #[test]
    fn metadata_reads_as_its_fields() {
        let mut meta = Meta::new("orders");
        meta.method = "POST".into();
        meta.path = "/orders/7".into();
        meta.params.insert("id".into(), "7".into());
        meta.query.insert("dry".into(), "1".into());
        meta.headers.insert("x-correlation-id".into(), "c-1".into());
        assert_eq!(
            Value::from(meta.clone()),
            json!({
                "id": meta.id,
                "correlation_id": meta.correlation_id,
                "flow": "orders",
                "received_at": meta.received_at,
                "method": "POST",
                "path": "/orders/7",
                "params": {"id": "7"},
                "query": {"dry": "1"},
                "headers": {"x-correlation-id": "c-1"},
            })
        );
    }

    #[test]
    fn trace_context_goes_on_with_a_new_parent() {
        let mut meta = Meta::new("f");
        meta.headers.insert(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        let next = child_traceparent(&Message::new(json!({}), meta.clone())).unwrap();
        assert!(
            next.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{next}"
        );
        assert!(next.ends_with("-01"));
        assert_ne!(&next[36..52], "00f067aa0ba902b7");
        meta.headers.insert("traceparent".into(), "garbage".into());
        assert_eq!(
            child_traceparent(&Message::new(json!({}), meta.clone())),
            None
        );
    }

    #[test]
    fn text_bodies_remember_their_content_type() {
        let mut message = Message::new(json!({}), Meta::new("f"));
        message.set_text_body("a,b".into(), "text/csv");
        assert_eq!(message.content_type(), Some("text/csv"));
        message.set_body(json!([1]));
        assert_eq!(message.content_type(), None);
    }
}

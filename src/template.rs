//! Handlebars templates, compiled once when a flow loads.
//!
//! Two forms:
//! - [`TextTemplate`]: one Handlebars string whose values are escaped for where the text
//!   goes ([`Escape`]): a URL, XML, CSV, a JSON string, or nothing for plain text.
//! - [`JsonTemplate`]: a structural template, a JSON tree whose string leaves are text
//!   templates. The output is built as a JSON value, never as JSON text, so a value from a
//!   message can hold any character without breaking the output or adding fields. A leaf
//!   that is exactly one `{{path}}` is a lookup and keeps the JSON type of what it reads.

use std::collections::HashMap;

use handlebars::Handlebars;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value};

use crate::message::Message;

/// A content type's media type, lowercase, without parameters: `Text/CSV; charset=x` → `text/csv`.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// How values are escaped when a text template renders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Escape {
    /// No escaping: structural leaves and header values.
    Plain,
    /// Percent-encoding of everything but unreserved characters: URLs.
    Url,
    /// XML/HTML entities.
    Markup,
    /// The inside of a JSON string.
    JsonString,
    /// CSV fields: quoted when they hold a comma, quote or line break.
    Csv,
}

impl Escape {
    /// The escaping a text body of `content_type` needs.
    ///
    /// # Errors
    ///
    /// A message naming the supported content types.
    pub fn for_content_type(content_type: &str) -> Result<Self, String> {
        match media_type(content_type).as_str() {
            "text/plain" => Ok(Self::Plain),
            "text/csv" => Ok(Self::Csv),
            "application/json" => Ok(Self::JsonString),
            "application/xml" | "text/xml" | "text/html" => Ok(Self::Markup),
            e if e.ends_with("+json") => Ok(Self::JsonString),
            e if e.ends_with("+xml") => Ok(Self::Markup),
            _ => Err(format!(
                "unsupported content_type \"{content_type}\"; use text/plain, text/csv, application/json, application/xml or text/html"
            )),
        }
    }

    fn apply(self, value: &str) -> String {
        match self {
            Self::Plain => value.to_owned(),
            Self::Url => utf8_percent_encode(value, URL_UNSAFE).to_string(),
            Self::Markup => handlebars::html_escape(value),
            Self::JsonString => {
                let quoted = Value::String(value.to_owned()).to_string();
                quoted[1..quoted.len() - 1].to_owned()
            }
            Self::Csv => {
                // A cell that starts like a formula runs when a spreadsheet opens the file
                // (OWASP "CSV injection"): a leading `'` makes it text. Numbers stay numbers.
                let formula = value.starts_with(['=', '+', '-', '@', '\t', '\r'])
                    && value.parse::<f64>().is_err();
                if formula {
                    format!("\"'{}\"", value.replace('"', "\"\""))
                } else if value.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", value.replace('"', "\"\""))
                } else {
                    value.to_owned()
                }
            }
        }
    }
}

/// Everything but RFC 3986's unreserved characters is percent-encoded in URL values, so a
/// value can never add a path segment, a query parameter or change the host.
const URL_UNSAFE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The compiled templates of one flow.
pub struct Templates {
    registries: HashMap<Escape, Handlebars<'static>>,
    count: usize,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("count", &self.count)
            .finish()
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

/// A compiled text template.
#[derive(Debug, Clone)]
pub enum TextTemplate {
    /// Text with no `{{`: rendered as itself.
    Literal(String),
    /// A template registered under `name` in the registry for `escape`.
    Compiled {
        /// Registry key.
        name: String,
        /// The registry it lives in.
        escape: Escape,
        /// When the template is exactly `{{path}}`: read scalars directly, without Handlebars.
        lookup: Option<Lookup>,
    },
}

/// A compiled structural template.
#[derive(Debug, Clone)]
pub enum JsonTemplate {
    /// A subtree with no templates in it.
    Literal(Value),
    /// A leaf that is exactly `{{path}}`: the value at `path`, whatever its type.
    Lookup(Lookup),
    /// Any other string leaf: rendered to a string.
    Text(TextTemplate),
    /// An array of templates.
    Array(Vec<JsonTemplate>),
    /// An object whose values are templates.
    Object(Vec<(String, JsonTemplate)>),
}

/// A dotted path into the message, as Handlebars writes it: `body.tests.[0].code`.
#[derive(Debug, Clone)]
pub struct Lookup {
    segments: Vec<String>,
}

/// The roots a template may read.
pub const ROOTS: [&str; 3] = ["body", "vars", "meta"];

impl Templates {
    /// An empty set of templates.
    pub fn new() -> Self {
        Self {
            registries: HashMap::new(),
            count: 0,
        }
    }

    /// Compiles a text template whose values are escaped with `escape`.
    ///
    /// # Errors
    ///
    /// The Handlebars syntax error, with its line and column inside the template.
    pub fn compile_text(&mut self, source: &str, escape: Escape) -> Result<TextTemplate, String> {
        if !source.contains("{{") {
            return Ok(TextTemplate::Literal(source.to_owned()));
        }
        let registry = self.registries.entry(escape).or_insert_with(|| {
            let mut registry = Handlebars::new();
            registry.set_strict_mode(true);
            registry.register_escape_fn(move |value| escape.apply(value));
            registry
        });
        self.count += 1;
        let name = format!("t{}", self.count);
        registry
            .register_template_string(&name, source)
            .map_err(|error| {
                let mut reason = error.reason().to_string();
                if reason.starts_with("invalid handlebars syntax") {
                    // The parser lists every token it could have taken; that helps nobody.
                    reason = "invalid Handlebars syntax (an unclosed {{#block}} or stray braces?)"
                        .into();
                }
                match error.pos() {
                    Some((line, column)) => format!("template error at {line}:{column}: {reason}"),
                    None => format!("template error: {reason}"),
                }
            })?;
        Ok(TextTemplate::Compiled {
            name,
            escape,
            lookup: Lookup::parse(source),
        })
    }

    /// Compiles a structural template.
    ///
    /// # Errors
    ///
    /// One `(JSON pointer of the leaf, message)` pair for every leaf that does not compile.
    pub fn compile_json(&mut self, tree: &Value) -> Result<JsonTemplate, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let template = self.compile_node(tree, String::new(), &mut errors);
        if errors.is_empty() {
            Ok(template)
        } else {
            Err(errors)
        }
    }

    fn compile_node(
        &mut self,
        node: &Value,
        pointer: String,
        errors: &mut Vec<(String, String)>,
    ) -> JsonTemplate {
        match node {
            Value::String(source) => {
                if let Some(lookup) = Lookup::parse(source) {
                    if !ROOTS.contains(&lookup.segments[0].as_str()) {
                        errors.push((
                            pointer,
                            format!(
                                "\"{source}\" reads `{}`; templates read `body`, `vars` or `meta`",
                                lookup.segments[0]
                            ),
                        ));
                    }
                    return JsonTemplate::Lookup(lookup);
                }
                match self.compile_text(source, Escape::Plain) {
                    Ok(TextTemplate::Literal(text)) => JsonTemplate::Literal(Value::String(text)),
                    Ok(text) => JsonTemplate::Text(text),
                    Err(message) => {
                        errors.push((pointer, message));
                        JsonTemplate::Literal(Value::Null)
                    }
                }
            }
            Value::Array(items) => {
                let items: Vec<_> = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.compile_node(item, format!("{pointer}/{i}"), errors))
                    .collect();
                if items.iter().all(|i| matches!(i, JsonTemplate::Literal(_))) {
                    JsonTemplate::Literal(node.clone())
                } else {
                    JsonTemplate::Array(items)
                }
            }
            Value::Object(map) => {
                let fields: Vec<_> = map
                    .iter()
                    .map(|(key, value)| {
                        let escaped = key.replace('~', "~0").replace('/', "~1");
                        (
                            key.clone(),
                            self.compile_node(value, format!("{pointer}/{escaped}"), errors),
                        )
                    })
                    .collect();
                if fields
                    .iter()
                    .all(|(_, f)| matches!(f, JsonTemplate::Literal(_)))
                {
                    JsonTemplate::Literal(node.clone())
                } else {
                    JsonTemplate::Object(fields)
                }
            }
            other => JsonTemplate::Literal(other.clone()),
        }
    }

    /// Renders a text template against the message.
    ///
    /// # Errors
    ///
    /// Handlebars' explanation, such as a variable the message does not have.
    pub fn render_text(
        &self,
        template: &TextTemplate,
        message: &Message,
    ) -> Result<String, String> {
        match template {
            TextTemplate::Literal(text) => Ok(text.clone()),
            TextTemplate::Compiled {
                name,
                escape,
                lookup,
            } => {
                // The common `{{meta.id}}` needs no template engine: same text, far cheaper.
                let found = lookup.as_ref().and_then(|l| l.find(message.root()));
                let text = match found {
                    Some(Value::String(text)) => Some(text.clone()),
                    Some(Value::Number(number)) => Some(number.to_string()),
                    Some(Value::Bool(flag)) => Some(flag.to_string()),
                    Some(Value::Null) => Some(String::new()),
                    _ => None,
                };
                match text {
                    Some(text) => Ok(escape.apply(&text)),
                    None => self.registries[escape]
                        .render_with_context(name, message.context())
                        .map_err(|error| render_error(&error)),
                }
            }
        }
    }

    /// Renders a structural template against the message.
    ///
    /// # Errors
    ///
    /// The first leaf that cannot render, named by its JSON pointer.
    pub fn render_json(&self, template: &JsonTemplate, message: &Message) -> Result<Value, String> {
        match template {
            JsonTemplate::Literal(value) => Ok(value.clone()),
            // Like a singular JSONPath in `set`, a lookup that finds nothing is `null`; a
            // `validate` step after the transform decides whether that is acceptable.
            JsonTemplate::Lookup(lookup) => {
                Ok(lookup.find(message.root()).cloned().unwrap_or(Value::Null))
            }
            JsonTemplate::Text(text) => self.render_text(text, message).map(Value::String),
            JsonTemplate::Array(items) => items
                .iter()
                .map(|item| self.render_json(item, message))
                .collect::<Result<_, _>>()
                .map(Value::Array),
            JsonTemplate::Object(fields) => {
                let mut map = Map::with_capacity(fields.len());
                for (key, field) in fields {
                    let value = self
                        .render_json(field, message)
                        .map_err(|e| format!("at /{key}: {e}"))?;
                    map.insert(key.clone(), value);
                }
                Ok(Value::Object(map))
            }
        }
    }
}

/// Handlebars' render errors name the template by its registry key; say what it read.
fn render_error(error: &handlebars::RenderError) -> String {
    match error.reason() {
        handlebars::RenderErrorReason::MissingVariable(Some(path)) => {
            format!("`{path}` is missing from the message")
        }
        reason => reason.to_string(),
    }
}

/// The path a template that is exactly `{{path}}` reads, as segments; `None` for any other.
pub fn lookup_segments(source: &str) -> Option<Vec<String>> {
    Lookup::parse(source).map(|lookup| lookup.segments)
}

impl Lookup {
    /// Parses a leaf that is exactly `{{path}}`, or returns `None` for any other template.
    fn parse(source: &str) -> Option<Self> {
        let inner = source.strip_prefix("{{")?.strip_suffix("}}")?.trim();
        if inner.is_empty() || inner.contains(['{', '}']) {
            return None;
        }
        let mut segments = Vec::new();
        for part in inner.split('.') {
            let segment = match part.strip_prefix('[').and_then(|p| p.strip_suffix(']')) {
                Some(quoted) if !quoted.is_empty() => quoted,
                _ if !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_alphanumeric() || c == '_' || c == '-') =>
                {
                    part
                }
                _ => return None,
            };
            segments.push(segment.to_owned());
        }
        Some(Self { segments })
    }

    fn find<'a>(&self, root: &'a Value) -> Option<&'a Value> {
        self.segments
            .iter()
            .try_fold(root, |value, segment| match value {
                Value::Object(map) => map.get(segment),
                Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Meta;
    use serde_json::json;

    fn message() -> Message {
        Message::new(
            json!({"name": "A \"q\" {{x}} \\ \n ü", "tests": [{"code": "PH"}], "n": 7.5}),
            &Meta::new("f"),
        )
    }

    proptest::proptest! {
        /// Whatever a string holds (quotes, braces, backslashes, control characters, any
        /// Unicode), a structural template passes it through unchanged, alone or in text.
        #[test]
        fn any_string_round_trips_through_a_structural_template(value in proptest::prelude::any::<String>()) {
            let mut templates = Templates::new();
            let template = templates
                .compile_json(&json!({"alone": "{{body.value}}", "in_text": "<{{body.value}}>", "nested": ["{{body.value}}"]}))
                .unwrap();
            let message = Message::new(json!({"value": value}), &Meta::new("f"));
            let out = templates.render_json(&template, &message).unwrap();
            proptest::prop_assert_eq!(&out["alone"], &json!(value));
            proptest::prop_assert_eq!(&out["in_text"], &json!(format!("<{value}>")));
            proptest::prop_assert_eq!(&out["nested"][0], &json!(value));
            proptest::prop_assert_eq!(out.as_object().unwrap().len(), 3);
        }
    }

    #[test]
    fn lone_lookups_keep_their_type_and_text_leaves_become_strings() {
        let mut templates = Templates::new();
        let tree = json!({
            "tests": "{{body.tests}}",
            "first": "{{ body.tests.[0].code }}",
            "n": "{{body.n}}",
            "label": "Customer: {{body.name}}",
            "fixed": [1, "two"],
        });
        let template = templates.compile_json(&tree).unwrap();
        let out = templates.render_json(&template, &message()).unwrap();
        assert_eq!(out["tests"], json!([{"code": "PH"}]));
        assert_eq!(out["first"], json!("PH"));
        assert_eq!(out["n"], json!(7.5));
        assert_eq!(out["label"], json!("Customer: A \"q\" {{x}} \\ \n ü"));
        assert_eq!(out["fixed"], json!([1, "two"]));
    }

    #[test]
    fn missing_values_are_null_in_lookups_and_errors_in_text() {
        let mut templates = Templates::new();
        let template = templates
            .compile_json(&json!({"a": {"b": "{{body.nope}}"}}))
            .unwrap();
        assert_eq!(
            templates.render_json(&template, &message()).unwrap(),
            json!({"a": {"b": null}})
        );
        let template = templates
            .compile_json(&json!({"a": ["x {{body.nope}}"]}))
            .unwrap();
        let error = templates.render_json(&template, &message()).unwrap_err();
        assert!(error.contains("body.nope"), "{error}");
    }

    #[test]
    fn compile_errors_carry_the_leaf_pointer() {
        let mut templates = Templates::new();
        let errors = templates
            .compile_json(&json!({"a": ["ok", "{{#if x}}"], "b": "{{nope}}"}))
            .unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].0, "/a/1");
        assert!(errors[0].1.starts_with("template error"), "{}", errors[0].1);
        assert_eq!(errors[1].0, "/b");
    }

    #[test]
    fn text_templates_escape_for_their_destination() {
        let mut templates = Templates::new();
        let message = Message::new(json!({"v": "a/b?c=d&<x>,\"y\""}), &Meta::new("f"));
        let cases = [
            (Escape::Url, "a%2Fb%3Fc%3Dd%26%3Cx%3E%2C%22y%22"),
            (Escape::Markup, "a/b?c&#x3D;d&amp;&lt;x&gt;,&quot;y&quot;"),
            (Escape::JsonString, "a/b?c=d&<x>,\\\"y\\\""),
            (Escape::Csv, "\"a/b?c=d&<x>,\"\"y\"\"\""),
            (Escape::Plain, "a/b?c=d&<x>,\"y\""),
        ];
        for (escape, expected) in cases {
            let template = templates.compile_text("{{body.v}}", escape).unwrap();
            assert_eq!(
                templates.render_text(&template, &message).unwrap(),
                expected,
                "{escape:?}"
            );
        }
    }

    #[test]
    fn csv_cells_that_start_like_formulas_become_text() {
        let mut templates = Templates::new();
        let template = templates.compile_text("{{body.v}}", Escape::Csv).unwrap();
        let cases = [
            (
                "=HYPERLINK(\"http://x\")",
                "\"'=HYPERLINK(\"\"http://x\"\")\"",
            ),
            ("+1+cmd|' /C calc'!A0", "\"'+1+cmd|' /C calc'!A0\""),
            ("-2+3", "\"'-2+3\""),
            ("@SUM(A1)", "\"'@SUM(A1)\""),
            ("\t=1", "\"'\t=1\""),
            ("-7.25", "-7.25"),
            ("+3", "+3"),
            ("a=b", "a=b"),
        ];
        for (value, expected) in cases {
            let message = Message::new(json!({ "v": value }), &Meta::new("f"));
            assert_eq!(
                templates.render_text(&template, &message).unwrap(),
                expected,
                "{value:?}"
            );
        }
    }

    #[test]
    fn content_types_map_to_escapes() {
        assert_eq!(
            Escape::for_content_type("text/csv; charset=utf-8"),
            Ok(Escape::Csv)
        );
        assert_eq!(
            Escape::for_content_type("application/fhir+json"),
            Ok(Escape::JsonString)
        );
        assert!(Escape::for_content_type("image/png").is_err());
    }
}

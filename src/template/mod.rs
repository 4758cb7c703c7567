//! Templates, compiled once when a flow loads.
//!
//! Two forms:
//! - [`TextTemplate`]: text with `{{expressions}}` whose values are escaped for where the
//!   text goes ([`Escape`]): a URL, XML, CSV, a JSON string, or nothing for plain text. Text
//!   with Handlebars block syntax (`{{#each}}`, `{{#if}}`) is rendered by Handlebars, with
//!   the same helpers.
//! - [`JsonTemplate`]: a structural template, a JSON tree built as a JSON value, never as
//!   JSON text, so a value from a message can hold any character without breaking the output
//!   or adding fields. A leaf that is exactly one `{{expression}}` keeps the JSON type of its
//!   value; other string leaves are text. Objects with `$each` build an array item by item,
//!   `$if` chooses a subtree, and a key ending in `?` is left out when its value is absent.
//!
//! The expressions ([`expr`]) and helpers ([`helpers`]) are ferry's own, in Handlebars'
//! syntax: compiled at load (a misspelt helper or table is a `ferry check` error), evaluated
//! per message without copying the message.

mod body;
pub mod expr;
pub mod helpers;

use std::collections::HashMap;
use std::sync::Arc;

use handlebars::Handlebars;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value};

pub use body::BodyTemplate;
use expr::{Binding, Expr, Names, Root, Scope, text_of};
pub use expr::{Env, ExprError, ROOTS, Table};

use crate::message::Message;

pub use crate::message::media_type;

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
    /// HL7 v2 (ER7) values: delimiters and line breaks as escape sequences.
    Hl7,
}

impl Escape {
    /// The escaping a text body of `content_type` needs.
    ///
    /// # Errors
    ///
    /// A message naming the supported content types.
    pub fn for_content_type(content_type: &str) -> Result<Self, String> {
        match &*media_type(content_type) {
            "text/plain" => Ok(Self::Plain),
            "text/csv" => Ok(Self::Csv),
            "application/json" => Ok(Self::JsonString),
            "application/xml" | "text/xml" | "text/html" => Ok(Self::Markup),
            e if e.ends_with("+json") => Ok(Self::JsonString),
            e if e.ends_with("+xml") => Ok(Self::Markup),
            e if crate::hl7::is_hl7(e) => Ok(Self::Hl7),
            _ => Err(format!(
                "unsupported content_type \"{content_type}\"; use text/plain, text/csv, application/json, application/xml, text/html or x-application/hl7-v2+er7"
            )),
        }
    }

    fn apply(self, value: &str) -> String {
        match self {
            Self::Plain => value.to_owned(),
            Self::Hl7 => crate::hl7::escape(value),
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

/// The compiled templates of one flow, with its lookup tables.
pub struct Templates {
    /// Handlebars registries for text templates with block syntax, one per escaping.
    registries: HashMap<Escape, Handlebars<'static>>,
    count: usize,
    env: Arc<Env>,
    table_names: Vec<String>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("count", &self.count)
            .field("tables", &self.table_names)
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
    /// Text and `{{expressions}}`, each value escaped.
    Parts {
        /// The pieces, in order.
        parts: Vec<Part>,
        /// How values are escaped.
        escape: Escape,
    },
    /// A template with block syntax, registered under `name` in the registry for `escape`.
    Handlebars {
        /// Registry key.
        name: String,
        /// The registry it lives in.
        escape: Escape,
        /// What it reads of the message, found when it compiled.
        reads: Vec<Read>,
    },
}

/// A piece of a text template.
#[derive(Debug, Clone)]
pub enum Part {
    /// Text as written.
    Text(String),
    /// An expression, with its source for errors.
    Expr(Expr, String),
}

/// A compiled structural template.
#[derive(Debug, Clone)]
pub enum JsonTemplate {
    /// A subtree with no templates in it.
    Literal(Value),
    /// A leaf that is exactly one `{{expression}}`: its value, whatever its type.
    Expr(Expr, String),
    /// Any other string leaf: rendered to a string.
    Text(TextTemplate),
    /// An array of templates; an item that renders to nothing (a `$if` without `$else`)
    /// is left out.
    Array(Vec<JsonTemplate>),
    /// An object whose values are templates.
    Object(Vec<Field>),
    /// `$each`: an array built from an array, item by item.
    Each(Box<Each>),
    /// `$if`: one subtree or another.
    If(Box<Branch>),
}

/// A key of a structural object.
#[derive(Debug, Clone)]
pub struct Field {
    key: String,
    value: JsonTemplate,
    /// Written `key?`: left out when the value is missing, `null` or `""`.
    optional: bool,
}

/// `$each` compiled.
#[derive(Debug, Clone)]
pub struct Each {
    source: Expr,
    source_text: String,
    /// `$as`: the name items are read by.
    name: String,
    /// `$where`: which items are kept.
    filter: Option<Expr>,
    /// What each item becomes.
    item: JsonTemplate,
    /// `$flatten`: items that render to arrays are joined into one.
    flatten: bool,
}

/// `$if` compiled.
#[derive(Debug, Clone)]
pub struct Branch {
    condition: Expr,
    then: JsonTemplate,
    otherwise: Option<JsonTemplate>,
}

/// A problem in a structural template: where (a JSON pointer into it) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// The JSON pointer of the offending node.
    pub pointer: String,
    /// What is wrong, and what to write instead.
    pub error: ExprError,
}

/// A field of the message that a template reads, for `ferry check`'s schema checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// From the root: `body`, `samples`, `0`, `matrix` (an item of an array is `0`).
    pub path: Vec<String>,
    /// Whether a `$each` iterates over it (so it must be an array).
    pub iterated: bool,
    /// Where in the template it is read (a JSON pointer; empty for a text template).
    pub pointer: String,
}

/// The keys a `$each` object may have besides the item's own.
const EACH_KEYS: [&str; 5] = ["$each", "$as", "$where", "$flatten", "$value"];
/// The keys of a `$if` object.
const IF_KEYS: [&str; 3] = ["$if", "$then", "$else"];

impl Templates {
    /// An empty set of templates, without tables.
    pub fn new() -> Self {
        Self::with_tables(Vec::new())
    }

    /// An empty set of templates that can read `tables`.
    pub fn with_tables(tables: Vec<Table>) -> Self {
        Self {
            registries: HashMap::new(),
            count: 0,
            table_names: tables.iter().map(|t| t.name.clone()).collect(),
            env: Arc::new(Env { tables }),
        }
    }

    fn names<'a>(&'a self, items: &'a [String]) -> Names<'a> {
        Names {
            items,
            tables: &self.table_names,
        }
    }

    /// Compiles a text template whose values are escaped with `escape`.
    ///
    /// # Errors
    ///
    /// What does not compile: a Handlebars syntax error with its line and column inside
    /// the template, or an expression's mistake with advice.
    pub fn compile_text(
        &mut self,
        source: &str,
        escape: Escape,
    ) -> Result<TextTemplate, ExprError> {
        self.compile_text_in(source, escape, &[])
    }

    fn compile_text_in(
        &mut self,
        source: &str,
        escape: Escape,
        items: &[String],
    ) -> Result<TextTemplate, ExprError> {
        if !source.contains("{{") {
            return Ok(TextTemplate::Literal(source.to_owned()));
        }
        if !uses_blocks(source) {
            return self
                .parts(source, items)
                .map(|parts| TextTemplate::Parts { parts, escape });
        }
        if !items.is_empty() {
            return Err(ExprError {
                message: "block syntax ({{#…}}) cannot read the items of `$each`".into(),
                hint: Some("build the value with `$each` and `$if` instead".into()),
            });
        }
        let env = Arc::clone(&self.env);
        let registry = self.registries.entry(escape).or_insert_with(|| {
            let mut registry = Handlebars::new();
            registry.set_strict_mode(true);
            registry.register_escape_fn(move |value| escape.apply(value));
            helpers::register(&mut registry, &env);
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
                ExprError {
                    message: match error.pos() {
                        Some((line, column)) => {
                            format!("template error at {line}:{column}: {reason}")
                        }
                        None => format!("template error: {reason}"),
                    },
                    hint: None,
                }
            })?;
        Ok(TextTemplate::Handlebars {
            name,
            escape,
            reads: handlebars_reads(source),
        })
    }

    /// Splits text into its literal pieces and compiled `{{expressions}}`.
    fn parts(&self, source: &str, items: &[String]) -> Result<Vec<Part>, ExprError> {
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or_else(|| ExprError {
                message: format!("`{{{{` without its `}}}}` in \"{source}\""),
                hint: None,
            })?;
            let inner = &after[..close];
            let expr = expr::parse(inner.trim(), self.names(items))?;
            parts.push(Part::Expr(expr, format!("{{{{{inner}}}}}")));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(parts)
    }

    /// Compiles a structural template.
    ///
    /// # Errors
    ///
    /// Every node that does not compile, each named by its JSON pointer.
    pub fn compile_json(&mut self, tree: &Value) -> Result<JsonTemplate, Vec<TemplateError>> {
        let mut errors = Vec::new();
        let template = self.compile_node(tree, "", &mut Vec::new(), &mut errors);
        if errors.is_empty() {
            Ok(template)
        } else {
            Err(errors)
        }
    }

    fn compile_node(
        &mut self,
        node: &Value,
        pointer: &str,
        items: &mut Vec<String>,
        errors: &mut Vec<TemplateError>,
    ) -> JsonTemplate {
        match node {
            Value::String(source) => {
                if let Some(inner) = lone(source) {
                    return match expr::parse(inner, self.names(items)) {
                        Ok(expr) => JsonTemplate::Expr(expr, source.clone()),
                        Err(error) => failed(errors, pointer, error),
                    };
                }
                match self.compile_text_in(source, Escape::Plain, items) {
                    Ok(TextTemplate::Literal(text)) => JsonTemplate::Literal(Value::String(text)),
                    Ok(text) => JsonTemplate::Text(text),
                    Err(error) => failed(errors, pointer, error),
                }
            }
            Value::Array(values) => {
                let compiled: Vec<_> = values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.compile_node(v, &format!("{pointer}/{i}"), items, errors))
                    .collect();
                if compiled
                    .iter()
                    .all(|i| matches!(i, JsonTemplate::Literal(_)))
                {
                    JsonTemplate::Literal(node.clone())
                } else {
                    JsonTemplate::Array(compiled)
                }
            }
            Value::Object(map) if map.contains_key("$each") => {
                self.compile_each(map, pointer, items, errors)
            }
            Value::Object(map) if map.contains_key("$if") => {
                self.compile_if(map, pointer, items, errors)
            }
            Value::Object(map) => {
                let mut fields = Vec::with_capacity(map.len());
                for (key, value) in map {
                    let escaped = key.replace('~', "~0").replace('/', "~1");
                    let at = format!("{pointer}/{escaped}");
                    let (key, optional) = match key_of(key) {
                        Ok(found) => found,
                        Err(error) => {
                            failed(errors, &at, error);
                            continue;
                        }
                    };
                    let value = self.compile_node(value, &at, items, errors);
                    fields.push(Field {
                        key,
                        value,
                        optional,
                    });
                }
                let literal = fields.iter().all(|f| {
                    !f.optional
                        && !f.key.starts_with('$')
                        && matches!(f.value, JsonTemplate::Literal(_))
                }) && map.keys().all(|k| !k.starts_with('$') && !k.ends_with('?'));
                if literal {
                    JsonTemplate::Literal(node.clone())
                } else {
                    JsonTemplate::Object(fields)
                }
            }
            other => JsonTemplate::Literal(other.clone()),
        }
    }

    fn compile_each(
        &mut self,
        map: &Map<String, Value>,
        pointer: &str,
        items: &mut Vec<String>,
        errors: &mut Vec<TemplateError>,
    ) -> JsonTemplate {
        let error = |message: String, hint: Option<String>| ExprError { message, hint };
        let push = |errors: &mut Vec<TemplateError>, at: &str, e: ExprError| {
            failed(errors, at, e);
        };
        for key in map
            .keys()
            .filter(|k| k.starts_with('$') && !k.starts_with("$$"))
        {
            if !EACH_KEYS.contains(&key.as_str()) {
                let hint = crate::diagnostic::closest(key, EACH_KEYS.iter().copied())
                    .map(|best| format!("did you mean `{best}`?"));
                push(
                    errors,
                    pointer,
                    error(
                        format!(
                            "`{key}` is not a key of `$each` (it has {})",
                            EACH_KEYS.join(", ")
                        ),
                        hint,
                    ),
                );
            }
        }
        let source_text = match &map["$each"] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let source = match lone(&source_text) {
            Some(inner) => expr::parse(inner, self.names(items)),
            None => Err(error(
                format!("`$each` takes one `{{{{…}}}}` naming an array, not \"{source_text}\""),
                Some("write e.g. `$each: \"{{body.samples}}\"`".into()),
            )),
        };
        let source = source.unwrap_or_else(|e| {
            push(errors, &format!("{pointer}/$each"), e);
            Expr::Literal(Value::Null)
        });
        let name = match map.get("$as") {
            None => "item".to_owned(),
            Some(Value::String(name)) if expr::segments(name).is_some_and(|s| s.len() == 1) => {
                if expr::ROOTS.contains(&name.as_str()) {
                    push(
                        errors,
                        &format!("{pointer}/$as"),
                        error(
                            format!("`$as: {name}` would hide the message's `{name}`"),
                            Some("choose another name, such as `sample`".into()),
                        ),
                    );
                }
                name.clone()
            }
            Some(other) => {
                push(
                    errors,
                    &format!("{pointer}/$as"),
                    error(
                        format!("`$as` takes a name such as `sample`, not {other}"),
                        None,
                    ),
                );
                "item".to_owned()
            }
        };
        let flatten = match map.get("$flatten") {
            None => false,
            Some(Value::Bool(flag)) => *flag,
            Some(other) => {
                push(
                    errors,
                    &format!("{pointer}/$flatten"),
                    error(format!("`$flatten` is true or false, not {other}"), None),
                );
                false
            }
        };
        items.push(name.clone());
        let filter = match map.get("$where") {
            None => None,
            Some(Value::String(text)) => match lone(text) {
                Some(inner) => match expr::parse(inner, self.names(items)) {
                    Ok(filter) => Some(filter),
                    Err(e) => {
                        push(errors, &format!("{pointer}/$where"), e);
                        None
                    }
                },
                None => {
                    push(
                        errors,
                        &format!("{pointer}/$where"),
                        error(
                            format!("`$where` takes one `{{{{…}}}}`, not \"{text}\""),
                            None,
                        ),
                    );
                    None
                }
            },
            Some(other) => {
                push(
                    errors,
                    &format!("{pointer}/$where"),
                    error(format!("`$where` takes one `{{{{…}}}}`, not {other}"), None),
                );
                None
            }
        };
        let own: Map<String, Value> = map
            .iter()
            .filter(|(k, _)| !k.starts_with('$') || k.starts_with("$$"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let item = match map.get("$value") {
            Some(value) if own.is_empty() => {
                self.compile_node(value, &format!("{pointer}/$value"), items, errors)
            }
            Some(_) => {
                push(
                    errors,
                    pointer,
                    error(
                        "`$each` takes either `$value` or the item's keys, not both".into(),
                        None,
                    ),
                );
                JsonTemplate::Literal(Value::Null)
            }
            None => self.compile_node(&Value::Object(own), pointer, items, errors),
        };
        items.pop();
        JsonTemplate::Each(Box::new(Each {
            source,
            source_text,
            name,
            filter,
            item,
            flatten,
        }))
    }

    fn compile_if(
        &mut self,
        map: &Map<String, Value>,
        pointer: &str,
        items: &mut Vec<String>,
        errors: &mut Vec<TemplateError>,
    ) -> JsonTemplate {
        let error = |message: String, hint: Option<String>| ExprError { message, hint };
        for key in map.keys() {
            if !IF_KEYS.contains(&key.as_str()) {
                let hint = crate::diagnostic::closest(key, IF_KEYS.iter().copied())
                    .map(|best| format!("did you mean `{best}`?"));
                errors.push(TemplateError {
                    pointer: pointer.to_owned(),
                    error: error(
                        format!("`{key}` is not a key of `$if` (it has $if, $then, $else)"),
                        hint,
                    ),
                });
            }
        }
        let text = match &map["$if"] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let condition = match lone(&text) {
            Some(inner) => expr::parse(inner, self.names(items)),
            None => Err(error(
                format!("`$if` takes one `{{{{…}}}}`, not \"{text}\""),
                Some("write e.g. `$if: \"{{eq body.status 'completed'}}\"`".into()),
            )),
        }
        .unwrap_or_else(|e| {
            errors.push(TemplateError {
                pointer: format!("{pointer}/$if"),
                error: e,
            });
            Expr::Literal(Value::Null)
        });
        let then = match map.get("$then") {
            Some(then) => self.compile_node(then, &format!("{pointer}/$then"), items, errors),
            None => {
                errors.push(TemplateError {
                    pointer: pointer.to_owned(),
                    error: error("`$if` needs `$then`".into(), None),
                });
                JsonTemplate::Literal(Value::Null)
            }
        };
        let otherwise = map
            .get("$else")
            .map(|e| self.compile_node(e, &format!("{pointer}/$else"), items, errors));
        JsonTemplate::If(Box::new(Branch {
            condition,
            then,
            otherwise,
        }))
    }

    /// Renders a text template against the message.
    ///
    /// # Errors
    ///
    /// What went wrong, naming the expression: a field the message lacks, or what a helper
    /// refused.
    pub fn render_text(
        &self,
        template: &TextTemplate,
        message: &Message,
    ) -> Result<String, String> {
        self.render_text_in(
            template,
            Scope {
                root: message.root(),
                items: &[],
            },
            message,
        )
    }

    fn render_text_in(
        &self,
        template: &TextTemplate,
        scope: Scope<'_>,
        message: &Message,
    ) -> Result<String, String> {
        match template {
            TextTemplate::Literal(text) => Ok(text.clone()),
            TextTemplate::Parts { parts, escape } => {
                let mut out = String::new();
                for part in parts {
                    match part {
                        Part::Text(text) => out.push_str(text),
                        Part::Expr(expr, source) => {
                            let value = expr
                                .eval(scope, &self.env)
                                .map_err(|e| format!("{source}: {e}"))?;
                            let Some(value) = value else {
                                return Err(missing(expr, source));
                            };
                            out.push_str(&escape.apply(&text_of(Some(&value))));
                        }
                    }
                }
                Ok(out)
            }
            TextTemplate::Handlebars { name, escape, .. } => self.registries[escape]
                .render_with_context(name, message.context())
                .map_err(|error| render_error(&error)),
        }
    }

    /// Renders a structural template against the message.
    ///
    /// # Errors
    ///
    /// The first node that cannot render, named by its JSON pointer.
    pub fn render_json(&self, template: &JsonTemplate, message: &Message) -> Result<Value, String> {
        let scope = Scope {
            root: message.root(),
            items: &[],
        };
        Ok(self
            .render_node(template, scope, message)?
            .unwrap_or(Value::Null))
    }

    /// Renders one node; `None` when it renders to nothing (a `$if` without `$else`).
    fn render_node(
        &self,
        template: &JsonTemplate,
        scope: Scope<'_>,
        message: &Message,
    ) -> Result<Option<Value>, String> {
        match template {
            JsonTemplate::Literal(value) => Ok(Some(value.clone())),
            // Like a singular JSONPath in `set`, an expression that finds nothing is `null`;
            // a `validate` step after the transform decides whether that is acceptable.
            JsonTemplate::Expr(expr, source) => {
                let value = expr
                    .eval(scope, &self.env)
                    .map_err(|e| format!("{source}: {e}"))?;
                Ok(Some(
                    value.map_or(Value::Null, std::borrow::Cow::into_owned),
                ))
            }
            JsonTemplate::Text(text) => self
                .render_text_in(text, scope, message)
                .map(|t| Some(Value::String(t))),
            JsonTemplate::Array(templates) => {
                let mut out = Vec::with_capacity(templates.len());
                for (index, item) in templates.iter().enumerate() {
                    let rendered = self
                        .render_node(item, scope, message)
                        .map_err(|e| format!("at /{index}{}", nested(&e)))?;
                    out.extend(rendered);
                }
                Ok(Some(Value::Array(out)))
            }
            JsonTemplate::Object(fields) => {
                let mut map = Map::with_capacity(fields.len());
                for field in fields {
                    let rendered = self
                        .render_node(&field.value, scope, message)
                        .map_err(|e| format!("at /{}{}", field.key, nested(&e)))?;
                    match rendered {
                        Some(value) if !(field.optional && absent(&value)) => {
                            map.insert(field.key.clone(), value);
                        }
                        _ => {}
                    }
                }
                Ok(Some(Value::Object(map)))
            }
            JsonTemplate::Each(each) => self.render_each(each, scope, message).map(Some),
            JsonTemplate::If(branch) => {
                let condition = branch
                    .condition
                    .eval(scope, &self.env)
                    .map_err(|e| format!("$if: {e}"))?;
                match (helpers::truthy(condition.as_deref()), &branch.otherwise) {
                    (true, _) => self.render_node(&branch.then, scope, message),
                    (false, Some(otherwise)) => self.render_node(otherwise, scope, message),
                    (false, None) => Ok(None),
                }
            }
        }
    }

    fn render_each(
        &self,
        each: &Each,
        scope: Scope<'_>,
        message: &Message,
    ) -> Result<Value, String> {
        let source = each
            .source
            .eval(scope, &self.env)
            .map_err(|e| format!("$each {}: {e}", each.source_text))?;
        let values: &[Value] = match source.as_deref() {
            Some(Value::Array(values)) => values,
            None | Some(Value::Null) => &[],
            Some(other) => std::slice::from_ref(other),
        };
        let mut bindings: Vec<Binding<'_>> = Vec::with_capacity(scope.items.len() + 1);
        bindings.extend_from_slice(scope.items);
        // `$where` first, so that @index, @position and @last count the items kept.
        let kept: Vec<&Value> = match &each.filter {
            None => values.iter().collect(),
            Some(filter) => {
                let mut kept = Vec::new();
                for (index, value) in values.iter().enumerate() {
                    bindings.truncate(scope.items.len());
                    bindings.push(Binding {
                        value,
                        index,
                        len: values.len(),
                    });
                    let inner = Scope {
                        root: scope.root,
                        items: &bindings,
                    };
                    let keep = filter
                        .eval(inner, &self.env)
                        .map_err(|e| format!("$where: {e}"))?;
                    if helpers::truthy(keep.as_deref()) {
                        kept.push(value);
                    }
                }
                kept
            }
        };
        let mut out = Vec::with_capacity(kept.len());
        for (index, value) in kept.iter().enumerate() {
            bindings.truncate(scope.items.len());
            bindings.push(Binding {
                value,
                index,
                len: kept.len(),
            });
            let inner = Scope {
                root: scope.root,
                items: &bindings,
            };
            let rendered = self
                .render_node(&each.item, inner, message)
                .map_err(|e| format!("$each item {index} ({}){}", each.name, nested(&e)))?;
            match rendered {
                Some(Value::Array(values)) if each.flatten => out.extend(values),
                Some(value) => out.push(value),
                None => {}
            }
        }
        Ok(Value::Array(out))
    }
}

impl JsonTemplate {
    /// Every field of the message the template reads (items of `$each` as `…/0/…`).
    pub fn reads(&self) -> Vec<Read> {
        let mut out = Vec::new();
        self.collect_reads("", &mut Vec::new(), &mut out);
        out
    }

    /// `sources[d]`: where the items of the `$each` at depth `d` come from, when a plain path.
    fn collect_reads(
        &self,
        pointer: &str,
        sources: &mut Vec<Option<Vec<String>>>,
        out: &mut Vec<Read>,
    ) {
        match self {
            Self::Literal(_) => {}
            Self::Expr(expr, _) => expr_reads(expr, pointer, sources, out),
            Self::Text(text) => text.collect_reads(pointer, sources, out),
            Self::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    item.collect_reads(&format!("{pointer}/{index}"), sources, out);
                }
            }
            Self::Object(fields) => {
                for field in fields {
                    let key = field.key.replace('~', "~0").replace('/', "~1");
                    field
                        .value
                        .collect_reads(&format!("{pointer}/{key}"), sources, out);
                }
            }
            Self::If(branch) => {
                expr_reads(&branch.condition, &format!("{pointer}/$if"), sources, out);
                branch
                    .then
                    .collect_reads(&format!("{pointer}/$then"), sources, out);
                if let Some(otherwise) = &branch.otherwise {
                    otherwise.collect_reads(&format!("{pointer}/$else"), sources, out);
                }
            }
            Self::Each(each) => {
                let at = format!("{pointer}/$each");
                let source = each.source.as_path().and_then(|p| absolute(p, sources));
                match &source {
                    Some(path) => out.push(Read {
                        path: path.clone(),
                        iterated: true,
                        pointer: at,
                    }),
                    None => expr_reads(&each.source, &at, sources, out),
                }
                sources.push(source);
                if let Some(filter) = &each.filter {
                    expr_reads(filter, &format!("{pointer}/$where"), sources, out);
                }
                each.item.collect_reads(pointer, sources, out);
                sources.pop();
            }
        }
    }
}

/// The reads of one expression at `pointer`.
fn expr_reads(expr: &Expr, pointer: &str, sources: &[Option<Vec<String>>], out: &mut Vec<Read>) {
    let mut paths = Vec::new();
    expr.paths(&mut paths);
    out.extend(
        paths
            .iter()
            .filter_map(|p| absolute(p, sources))
            .map(|path| Read {
                path,
                iterated: false,
                pointer: pointer.to_owned(),
            }),
    );
}

impl TextTemplate {
    /// Whether the template is fixed text, and which.
    pub fn literal(&self) -> Option<&str> {
        match self {
            Self::Literal(text) => Some(text),
            _ => None,
        }
    }

    /// Every field of the message the template reads (expressions only; a template with
    /// Handlebars block syntax is not looked into).
    pub fn reads(&self) -> Vec<Read> {
        let mut out = Vec::new();
        self.collect_reads("", &[], &mut out);
        out
    }

    fn collect_reads(&self, pointer: &str, sources: &[Option<Vec<String>>], out: &mut Vec<Read>) {
        match self {
            Self::Parts { parts, .. } => {
                for part in parts {
                    if let Part::Expr(expr, _) = part {
                        expr_reads(expr, pointer, sources, out);
                    }
                }
            }
            Self::Handlebars { reads, .. } => out.extend(reads.iter().map(|r| Read {
                pointer: pointer.to_owned(),
                ..r.clone()
            })),
            Self::Literal(_) => {}
        }
    }
}

/// What a Handlebars template reads of the message, following `{{#each}}` and `{{#with}}`
/// into their items (`{{#each body.tests}}{{code}}{{/each}}` reads `body.tests.0.code`).
fn handlebars_reads(source: &str) -> Vec<Read> {
    use handlebars::template::{Parameter, TemplateElement};
    fn raw(path: &handlebars::Path) -> &str {
        match path {
            handlebars::Path::Relative((_, raw)) | handlebars::Path::Local((_, _, raw)) => raw,
        }
    }
    fn path_of(raw: &str, context: &[Option<Vec<String>>]) -> Option<Vec<String>> {
        if raw.starts_with('@') {
            return None;
        }
        let mut depth = context.len().checked_sub(1)?;
        let mut rest = raw;
        while let Some(up) = rest.strip_prefix("../") {
            depth = depth.checked_sub(1)?;
            rest = up;
        }
        let rest = rest
            .strip_prefix("this")
            .map_or(rest, |r| r.trim_start_matches(['.', '/']));
        let mut path = context[depth].clone()?;
        if !rest.is_empty() {
            path.extend(expr::segments(rest.trim_start_matches("./"))?);
        }
        Some(path)
    }
    fn param(
        p: &Parameter,
        context: &[Option<Vec<String>>],
        out: &mut Vec<Read>,
    ) -> Option<Vec<String>> {
        match p {
            Parameter::Path(path) => {
                let found = path_of(raw(path), context)?;
                out.push(Read {
                    path: found.clone(),
                    iterated: false,
                    pointer: String::new(),
                });
                Some(found)
            }
            Parameter::Subexpression(sub) => {
                for inner in sub.params().into_iter().flatten() {
                    param(inner, context, out);
                }
                None
            }
            _ => None,
        }
    }
    fn walk(
        elements: &[TemplateElement],
        context: &mut Vec<Option<Vec<String>>>,
        out: &mut Vec<Read>,
    ) {
        for element in elements {
            let (TemplateElement::Expression(t)
            | TemplateElement::HtmlExpression(t)
            | TemplateElement::HelperBlock(t)) = element
            else {
                continue;
            };
            let helper = match &t.name {
                Parameter::Name(name) => Some(name.as_str()),
                Parameter::Path(path) if !t.params.is_empty() || t.block => Some(raw(path)),
                other => {
                    param(other, context, out);
                    None
                }
            };
            let first = t.params.first().and_then(|p| param(p, context, out));
            for rest in t.params.iter().skip(1) {
                param(rest, context, out);
            }
            let inner = match (helper, first) {
                (Some("each"), Some(mut list)) => {
                    if let Some(read) = out.last_mut() {
                        read.iterated = true;
                    }
                    list.push("0".to_owned());
                    Some(list)
                }
                (Some("with"), Some(found)) => Some(found),
                (Some("each" | "with"), None) => None,
                _ => context.last().cloned().flatten(),
            };
            context.push(inner);
            for block in [&t.template, &t.inverse].into_iter().flatten() {
                walk(&block.elements, context, out);
            }
            context.pop();
        }
    }
    let Ok(template) = handlebars::Template::compile(source) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk(&template.elements, &mut vec![Some(Vec::new())], &mut out);
    out.retain(|r| {
        r.path
            .first()
            .is_some_and(|root| ROOTS.contains(&root.as_str()))
    });
    out
}

/// A path from the message's root: item paths continue their `$each`'s source.
fn absolute(path: &expr::Path, sources: &[Option<Vec<String>>]) -> Option<Vec<String>> {
    let mut out = match path.root {
        Root::Message(root) => vec![root.to_owned()],
        Root::Item(depth) => {
            let mut source = sources.get(depth)?.clone()?;
            source.push("0".to_owned());
            source
        }
    };
    out.extend(path.segments.iter().cloned());
    Some(out)
}

/// Records a compile error at `pointer`; what stands in for the node meanwhile.
fn failed(errors: &mut Vec<TemplateError>, pointer: &str, error: ExprError) -> JsonTemplate {
    errors.push(TemplateError {
        pointer: pointer.to_owned(),
        error,
    });
    JsonTemplate::Literal(Value::Null)
}

/// The inside of a string that is exactly one `{{…}}`.
fn lone(source: &str) -> Option<&str> {
    let inner = source.strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}") && !uses_blocks(source)).then(|| inner.trim())
}

/// Whether text uses Handlebars block syntax, comments, partials or raw output, which
/// Handlebars renders.
fn uses_blocks(source: &str) -> bool {
    ["{{#", "{{/", "{{^", "{{else", "{{>", "{{!", "{{{", "{{~"]
        .iter()
        .any(|b| source.contains(b))
}

/// A structural key: `name`, `name?` (optional), or `$$name` for a key that starts with `$`.
fn key_of(key: &str) -> Result<(String, bool), ExprError> {
    let (key, optional) = match key.strip_suffix("??") {
        Some(literal) => (format!("{literal}?"), false),
        None => match key.strip_suffix('?') {
            Some(name) => (name.to_owned(), true),
            None => (key.to_owned(), false),
        },
    };
    if let Some(literal) = key.strip_prefix("$$") {
        return Ok((format!("${literal}"), optional));
    }
    if key.starts_with('$') {
        let known: Vec<&str> = EACH_KEYS.iter().chain(&IF_KEYS).copied().collect();
        return Err(ExprError {
            message: format!("`{key}` is not a construct (those are `$each` and `$if`)"),
            hint: Some(
                match crate::diagnostic::closest(&key, known.iter().copied()) {
                    Some(best) => {
                        format!("did you mean `{best}`? For a key that starts with `$`, write `$$`")
                    }
                    None => "for a key that starts with `$`, write `$$`".into(),
                },
            ),
        });
    }
    Ok((key, optional))
}

/// Whether an optional key's value counts as absent.
fn absent(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(text) => text.is_empty(),
        _ => false,
    }
}

/// The rest of an error's place, after a pointer segment.
fn nested(error: &str) -> String {
    match error.strip_prefix("at ") {
        Some(rest) => rest.to_owned(),
        None => format!(": {error}"),
    }
}

/// The error of an expression whose path found nothing.
fn missing(expr: &Expr, source: &str) -> String {
    match expr.as_path() {
        Some(path) => {
            let root = match path.root {
                Root::Message(root) => root.to_owned(),
                Root::Item(_) => "the item".to_owned(),
            };
            let mut read = vec![root];
            read.extend(path.segments.iter().cloned());
            format!("{source}: `{}` is missing from the message", read.join("."))
        }
        None => format!("{source}: missing from the message"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Meta;
    use serde_json::json;

    fn message() -> Message {
        Message::new(
            json!({"name": "A \"q\" {{x}} \\ \n ü", "tests": [{"code": "PH"}], "n": 7.5}),
            Meta::new("f"),
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
            let message = Message::new(json!({"value": value}), Meta::new("f"));
            let out = templates.render_json(&template, &message).unwrap();
            proptest::prop_assert_eq!(&out["alone"], &json!(value));
            proptest::prop_assert_eq!(&out["in_text"], &json!(format!("<{value}>")));
            proptest::prop_assert_eq!(&out["nested"][0], &json!(value));
            proptest::prop_assert_eq!(out.as_object().unwrap().len(), 3);
        }
    }

    proptest::proptest! {
        /// The same holds for items that `$each` builds: a value stays data, whatever it holds.
        #[test]
        fn any_string_round_trips_through_each(value in proptest::prelude::any::<String>()) {
            let mut templates = Templates::new();
            let template = templates
                .compile_json(&json!({"items": {"$each": "{{body.list}}", "$as": "x", "alone": "{{x.v}}", "in_text": "<{{x.v}}>", "upper_kept": "{{concat x.v}}"}}))
                .unwrap();
            let message = Message::new(json!({"list": [{"v": value}]}), Meta::new("f"));
            let out = templates.render_json(&template, &message).unwrap();
            let item = &out["items"][0];
            proptest::prop_assert_eq!(&item["alone"], &json!(value));
            proptest::prop_assert_eq!(&item["in_text"], &json!(format!("<{value}>")));
            proptest::prop_assert_eq!(&item["upper_kept"], &json!(value));
            proptest::prop_assert_eq!(item.as_object().unwrap().len(), 3);
            proptest::prop_assert_eq!(out["items"].as_array().unwrap().len(), 1);
        }
    }

    #[test]
    fn constructs_leave_out_what_is_absent_and_escape_dollar_keys() {
        let mut templates = Templates::new();
        let template = templates
            .compile_json(&json!({
                "a?": "{{body.missing}}",
                "b?": "{{body.empty}}",
                "c?": "{{body.zero}}",
                "$$schema": "https://example/s",
                "q??": 1,
                "list": ["x", {"$if": "{{body.zero}}", "$then": "never"}, {"$if": "{{body.n}}", "$then": "{{body.n}}"}],
                "deep": {"$each": "{{body.rows}}", "$as": "r", "$flatten": true,
                         "$value": {"$each": "{{r.cells}}", "$as": "c", "$value": "{{concat r.name ':' c}}"}}
            }))
            .unwrap();
        let message = Message::new(
            json!({"empty": "", "zero": 0, "n": 2, "rows": [{"name": "A", "cells": [1, 2]}, {"name": "B", "cells": []}]}),
            Meta::new("f"),
        );
        let out = templates.render_json(&template, &message).unwrap();
        assert_eq!(
            out,
            json!({"c": 0, "$schema": "https://example/s", "q?": 1, "list": ["x", 2], "deep": ["A:1", "A:2"]})
        );
    }

    #[test]
    fn expressions_work_in_urls_and_headers_with_their_escaping() {
        let mut templates = Templates::new();
        let message = Message::new(json!({"lab": "north west", "ref": "a/b"}), Meta::new("f"));
        let url = templates
            .compile_text(
                "https://lab.example/{{upper body.lab}}/{{body.ref}}",
                Escape::Url,
            )
            .unwrap();
        assert_eq!(
            templates.render_text(&url, &message).unwrap(),
            "https://lab.example/NORTH%20WEST/a%2Fb"
        );
        let header = templates
            .compile_text(
                "{{concat (upper body.lab) '-' (length body.ref)}}",
                Escape::Plain,
            )
            .unwrap();
        assert_eq!(
            templates.render_text(&header, &message).unwrap(),
            "NORTH WEST-3"
        );
    }

    #[test]
    fn block_text_templates_have_the_same_helpers_and_missing_fields_compare_false() {
        let mut templates = Templates::new();
        let template = templates
            .compile_text(
                "{{#each body.tests}}{{upper code}}{{#if (eq priority 'urgent')}}!{{/if}};{{/each}}",
                Escape::Csv,
            )
            .unwrap();
        let message = Message::new(
            json!({"tests": [{"code": "ph"}, {"code": "pb", "priority": "urgent"}]}),
            Meta::new("f"),
        );
        assert_eq!(
            templates.render_text(&template, &message).unwrap(),
            "PH;PB!;"
        );
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
        assert_eq!(errors[0].pointer, "/a/1");
        assert!(
            errors[0].error.message.starts_with("template error"),
            "{:?}",
            errors[0]
        );
        assert_eq!(errors[1].pointer, "/b");
    }

    #[test]
    fn text_templates_escape_for_their_destination() {
        let mut templates = Templates::new();
        let message = Message::new(json!({"v": "a/b?c=d&<x>,\"y\""}), Meta::new("f"));
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
            let message = Message::new(json!({ "v": value }), Meta::new("f"));
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

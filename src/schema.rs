//! JSON Schemas for `validate` steps, read from the schemas folder and compiled once.
//!
//! A schema may `$ref` other files in the schemas folder; references outside it, and any
//! remote (`http://`, `https://`) reference, are refused, so loading a flow never reaches
//! the network or the rest of the disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{Retrieve, Uri, Validator};
use serde_json::Value;

use crate::error::Violation;

/// Why a schema could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchemaError {
    /// The name climbs out of the schemas folder or is absolute.
    #[error("schema \"{0}\" is outside the schemas folder")]
    Outside(String),
    /// The file cannot be read.
    #[error("cannot read schema file {}: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The file is not JSON.
    #[error("{reason}")]
    NotJson {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's explanation.
        reason: String,
    },
    /// The JSON is not a valid schema, or a `$ref` cannot be resolved.
    #[error("invalid schema {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The explanation.
        reason: String,
    },
}

/// Loads and compiles schemas from one folder, each file once however many flows use it.
#[derive(Debug)]
pub struct Schemas {
    dirs: Vec<PathBuf>,
    compiled: HashMap<String, Result<Arc<Validator>, SchemaError>>,
    examples: HashMap<String, Vec<Value>>,
    raw: HashMap<String, Value>,
}

/// The defaults a schema declares, ready to fill into bodies: compiled once with the
/// schema, so a message only walks what it has.
#[derive(Debug, Clone, Default)]
pub struct Defaults {
    /// Each property with a default, or with defaults inside it.
    fields: Vec<(String, Option<Value>, Defaults)>,
    /// The defaults inside each item of an array.
    items: Option<Box<Defaults>>,
}

impl Defaults {
    fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.items.is_none()
    }

    /// Fills in what `value` lacks.
    pub fn apply(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, default, inner) in &self.fields {
                    if let (false, Some(default)) = (map.contains_key(key), default) {
                        map.insert(key.clone(), default.clone());
                    }
                    if let Some(child) = map.get_mut(key) {
                        inner.apply(child);
                    }
                }
            }
            Value::Array(items) => {
                if let Some(inner) = &self.items {
                    items.iter_mut().for_each(|item| inner.apply(item));
                }
            }
            _ => {}
        }
    }
}

/// Where following a path through a schema ends.
enum Walk<'a> {
    /// At this node of this file.
    Found(&'a Value, String),
    /// At a level the schema leaves open.
    Open,
    /// At a field it does not declare.
    Undeclared(Declared),
}

/// Whether a schema declares the field a path reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Declared {
    /// It does, or the schema leaves it open.
    Yes,
    /// It does not: the object at `at` has only `known` properties.
    No {
        /// The path read up to the undeclared field.
        at: String,
        /// The field read.
        field: String,
        /// The fields that object declares.
        known: Vec<String>,
    },
}

impl Schemas {
    /// Schemas found in `dirs`, searched in order.
    pub fn new(dirs: &[PathBuf]) -> Self {
        Self {
            dirs: dirs.to_vec(),
            compiled: HashMap::new(),
            examples: HashMap::new(),
            raw: HashMap::new(),
        }
    }

    /// The names of the JSON files in the schemas folders, for a did-you-mean.
    pub fn file_names(&self) -> Vec<String> {
        self.dirs
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flatten()
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".json"))
            .collect()
    }

    /// The compiled schema named `name` (a path relative to the schemas folder).
    ///
    /// # Errors
    ///
    /// A [`SchemaError`] saying which file is missing, not JSON, or not a valid schema.
    pub fn get(&mut self, name: &str) -> Result<Arc<Validator>, SchemaError> {
        if let Some(found) = self.compiled.get(name) {
            return found.clone();
        }
        let result = self.compile(name);
        self.compiled.insert(name.to_owned(), result.clone());
        result
    }

    /// Whether schema `name` (already compiled) declares the field that `path` (names and
    /// indices under the body) reads. Schemas that leave a level open (no `properties`, or
    /// combinators ferry does not follow) declare everything under it. A name read from an
    /// array is read from its items.
    pub fn declares(&self, name: &str, path: &[String]) -> Declared {
        match self.walk(name, path) {
            Walk::Undeclared(declared) => declared,
            Walk::Found(..) | Walk::Open => Declared::Yes,
        }
    }

    /// The fields schema `name` (already compiled) declares in the object `path` reads (an
    /// array's items for an array), each with its `description`; empty where it leaves the
    /// object open or declares none.
    pub fn fields(&self, name: &str, path: &[String]) -> Vec<(String, Option<String>)> {
        let Walk::Found(node, file) = self.walk(name, path) else {
            return Vec::new();
        };
        let Some((node, file)) = self.resolve(node, &file) else {
            return Vec::new();
        };
        let node = match node.get("items") {
            Some(items) => match self.resolve(items, &file) {
                Some((resolved, _)) => resolved,
                None => return Vec::new(),
            },
            None => node,
        };
        let Some(Value::Object(properties)) = node.get("properties") else {
            return Vec::new();
        };
        properties
            .iter()
            .map(|(field, schema)| {
                let description = schema
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                (field.clone(), description)
            })
            .collect()
    }

    /// The `type` schema `name` declares for what `path` reads, when it declares one.
    pub fn kind(&self, name: &str, path: &[String]) -> Option<String> {
        let Walk::Found(node, file) = self.walk(name, path) else {
            return None;
        };
        let (node, _) = self.resolve(node, &file)?;
        node.get("type").and_then(Value::as_str).map(str::to_owned)
    }

    /// Whether schema `name` (already compiled) lets `value` stand where `path` reads, by the
    /// `const`, `enum` and `type` it declares there: `Some(false)` only when it surely does
    /// not; `None` when the schema does not say.
    pub fn admits(&self, name: &str, path: &[String], value: &Value) -> Option<bool> {
        let Walk::Found(node, file) = self.walk(name, path) else {
            return None;
        };
        let (node, _) = self.resolve(node, &file)?;
        if let Some(constant) = node.get("const") {
            return Some(constant == value);
        }
        if let Some(Value::Array(allowed)) = node.get("enum") {
            return Some(allowed.contains(value));
        }
        let kinds: Vec<&str> = match node.get("type")? {
            Value::String(kind) => vec![kind.as_str()],
            Value::Array(kinds) => kinds.iter().filter_map(Value::as_str).collect(),
            _ => return None,
        };
        let kind = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        Some(kinds.contains(&kind) || (kind == "integer" && kinds.contains(&"number")))
    }

    fn walk<'a>(&'a self, name: &str, path: &[String]) -> Walk<'a> {
        let Some(root) = self.raw.get(name) else {
            return Walk::Open;
        };
        let mut node = root;
        let mut file = name.to_owned();
        for (depth, segment) in path.iter().enumerate() {
            let Some((resolved, in_file)) = self.resolve(node, &file) else {
                return Walk::Open;
            };
            node = resolved;
            file = in_file;
            if let Some(items) = node.get("items") {
                if segment.parse::<usize>().is_ok() {
                    node = items;
                    continue;
                }
                // A name on an array reads every item's field.
                let Some((resolved, in_file)) = self.resolve(items, &file) else {
                    return Walk::Open;
                };
                node = resolved;
                file = in_file;
            }
            let Some(Value::Object(properties)) = node.get("properties") else {
                return Walk::Open;
            };
            match properties.get(segment) {
                Some(next) => node = next,
                None if node.get("patternProperties").is_some() => return Walk::Open,
                None => {
                    return Walk::Undeclared(Declared::No {
                        at: path[..depth].join("."),
                        field: segment.clone(),
                        known: properties.keys().cloned().collect(),
                    });
                }
            }
        }
        Walk::Found(node, file)
    }

    /// The defaults schema `name` (already compiled) declares, as a plan to fill them in:
    /// each property's `default`, and the defaults inside objects and array items, through
    /// `$ref`s and `allOf`. `None` when it declares none.
    pub fn defaults(&self, name: &str) -> Option<Defaults> {
        let root = self.raw.get(name)?;
        let plan = self.defaults_of(root, name, 0);
        (!plan.is_empty()).then_some(plan)
    }

    fn defaults_of(&self, node: &Value, file: &str, depth: usize) -> Defaults {
        let mut plan = Defaults::default();
        let Some((node, file)) = self.resolve(node, file).filter(|_| depth < 32) else {
            return plan;
        };
        if let Some(Value::Object(properties)) = node.get("properties") {
            for (key, property) in properties {
                let value = self
                    .resolve(property, &file)
                    .and_then(|(p, _)| p.get("default").cloned());
                let inner = self.defaults_of(property, &file, depth + 1);
                if value.is_some() || !inner.is_empty() {
                    plan.fields.push((key.clone(), value, inner));
                }
            }
        }
        if let Some(items) = node.get("items") {
            let inner = self.defaults_of(items, &file, depth + 1);
            if !inner.is_empty() {
                plan.items = Some(Box::new(inner));
            }
        }
        for part in node
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let inner = self.defaults_of(part, &file, depth + 1);
            plan.fields.extend(inner.fields);
            if plan.items.is_none() {
                plan.items = inner.items;
            }
        }
        plan
    }

    /// Keeps the files `schema` (the file `name`) refers to, so [`Schemas::declares`] can
    /// follow references across files. Files it cannot read are left to the validator's errors.
    fn load_references(&mut self, schema: &Value, name: &str) {
        let mut files = Vec::new();
        collect_references(schema, &mut files);
        for target in files {
            let file = Path::new(name)
                .parent()
                .unwrap_or(Path::new(""))
                .join(&target)
                .to_string_lossy()
                .into_owned();
            if self.raw.contains_key(&file) {
                continue;
            }
            let found = self
                .dirs
                .iter()
                .map(|d| d.join(&file))
                .find(|p| p.is_file());
            if let Some(document) = found.and_then(|path| read_json(&path).ok()) {
                self.raw.insert(file.clone(), document.clone());
                self.load_references(&document, &file);
            }
        }
    }

    /// Follows `$ref`s from `node` (in schema file `file`) to the schema they name.
    fn resolve<'a>(&'a self, mut node: &'a Value, file: &str) -> Option<(&'a Value, String)> {
        let mut file = file.to_owned();
        for _ in 0..16 {
            let Some(reference) = node.get("$ref").and_then(Value::as_str) else {
                return Some((node, file));
            };
            let (target, pointer) = reference.split_once('#').unwrap_or((reference, ""));
            if !target.is_empty() {
                file = Path::new(&file)
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join(target)
                    .to_string_lossy()
                    .into_owned();
            }
            let document = self.raw.get(&file)?;
            node = if pointer.is_empty() {
                document
            } else {
                document.pointer(pointer)?
            };
        }
        None
    }

    /// Schema file `name` as written, once loaded: compiled with [`Schemas::get`], or named
    /// by the `$ref`s of one that was (by its path from the schemas folder).
    pub fn raw(&self, name: &str) -> Option<&Value> {
        self.raw.get(name)
    }

    /// The `examples` the schema named `name` gives, once it has been compiled.
    pub fn examples(&self, name: &str) -> &[Value] {
        self.examples.get(name).map_or(&[], Vec::as_slice)
    }

    fn compile(&mut self, name: &str) -> Result<Arc<Validator>, SchemaError> {
        let relative = Path::new(name);
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(SchemaError::Outside(name.to_owned()));
        }
        // The first folder that has the file; if none has it, the error names the first.
        let dir = self
            .dirs
            .iter()
            .find(|d| d.join(relative).is_file())
            .or(self.dirs.first());
        let dir = dir.ok_or_else(|| SchemaError::Outside(name.to_owned()))?;
        let path = dir.join(relative);
        let roots: Vec<PathBuf> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect();
        let schema = read_json(&path)?;
        if let Some(Value::Array(examples)) = schema.get("examples") {
            self.examples.insert(name.to_owned(), examples.clone());
        }
        self.raw.insert(name.to_owned(), schema.clone());
        self.load_references(&schema, name);
        let canonical = std::fs::canonicalize(&path).map_err(|e| SchemaError::Unreadable {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let base = reqwest::Url::from_file_path(&canonical).map_err(|()| SchemaError::Invalid {
            path: path.clone(),
            reason: "the path cannot be made a file URL".into(),
        })?;
        jsonschema::options()
            .with_base_uri(base.to_string())
            .with_retriever(LocalFiles { roots })
            .should_validate_formats(true)
            .build(&schema)
            .map(Arc::new)
            .map_err(|e| SchemaError::Invalid {
                path,
                reason: e.to_string(),
            })
    }
}

/// The files that `$ref`s in `schema` name (not the `#…` part).
fn collect_references(schema: &Value, files: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(reference)) = map.get("$ref") {
                let target = reference.split('#').next().unwrap_or_default();
                if !target.is_empty()
                    && !target.contains("://")
                    && !files.iter().any(|f| f == target)
                {
                    files.push(target.to_owned());
                }
            }
            map.values().for_each(|v| collect_references(v, files));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_references(v, files)),
        _ => {}
    }
}

fn read_json(path: &Path) -> Result<Value, SchemaError> {
    let text = std::fs::read_to_string(path).map_err(|e| SchemaError::Unreadable {
        path: path.to_path_buf(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".into(),
            _ => e.to_string(),
        },
    })?;
    serde_json::from_str(&text).map_err(|e| SchemaError::NotJson {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
        reason: format!("schema is not valid JSON: {}", without_position(&e)),
    })
}

/// serde_json ends its messages with the position, which diagnostics carry already.
fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// Resolves `$ref`s to files inside the schemas folder, and nothing else.
struct LocalFiles {
    roots: Vec<PathBuf>,
}

impl Retrieve for LocalFiles {
    fn retrieve(
        &self,
        uri: &Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        let url = reqwest::Url::parse(uri.as_str())?;
        if url.scheme() != "file" {
            return Err(format!(
                "remote $ref \"{uri}\" is refused; copy the schema into the schemas folder"
            )
            .into());
        }
        let path = url
            .to_file_path()
            .map_err(|()| format!("$ref \"{uri}\" is not a file path"))?;
        // A schema may refer by name to a file in another schemas folder: a partner's
        // schema to the shipped common definitions, say.
        let canonical = std::fs::canonicalize(&path).or_else(|error| {
            let parent = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
            let relative = parent
                .and_then(|p| {
                    self.roots
                        .iter()
                        .find_map(|root| p.strip_prefix(root).ok().map(Path::to_path_buf))
                })
                .map(|dir| dir.join(path.file_name().unwrap_or_default()));
            relative
                .and_then(|rel| {
                    self.roots
                        .iter()
                        .find_map(|root| std::fs::canonicalize(root.join(&rel)).ok())
                })
                .ok_or_else(|| format!("$ref \"{uri}\": {error}"))
        })?;
        if !self.roots.iter().any(|root| canonical.starts_with(root)) {
            return Err(format!("$ref \"{uri}\" is outside the schemas folder").into());
        }
        Ok(read_json(&canonical)?)
    }
}

/// Every way `body` breaks `schema`, in document order.
pub fn violations(schema: &Validator, body: &Value) -> Vec<Violation> {
    violations_up_to(schema, body, usize::MAX).0
}

/// The first `limit` ways `body` breaks `schema`, and how many there are in all. Only the
/// ones kept are described, so a body that breaks a schema a hundred thousand times costs
/// little more than counting.
pub fn violations_up_to(schema: &Validator, body: &Value, limit: usize) -> (Vec<Violation>, usize) {
    let mut errors = schema.iter_errors(body);
    let kept: Vec<Violation> = errors
        .by_ref()
        .take(limit)
        .map(|error| {
            let mut pointer = error.instance_path().to_string();
            // A missing property is best pointed at where it should be.
            if let ValidationErrorKind::Required { property } = error.kind()
                && let Some(name) = property.as_str()
            {
                let escaped = name.replace('~', "~0").replace('/', "~1");
                pointer = format!("{pointer}/{escaped}");
            }
            // One violation can quote much of the body (every unexpected property, say).
            Violation {
                pointer,
                message: crate::redact::truncate(&error.to_string()),
            }
        })
        .collect();
    let total = kept.len() + errors.count();
    (kept, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn local_refs_resolve_and_every_violation_is_reported() {
        let dir = folder(&[
            (
                "a.json",
                r#"{"type":"object","required":["c"],"properties":{"c":{"$ref":"common/c.json"},"n":{"type":"integer"}}}"#,
            ),
            (
                "common/c.json",
                r#"{"type":"object","required":["id"],"properties":{"email":{"format":"email"}}}"#,
            ),
        ]);
        let mut schemas = Schemas::new(&[dir.path().to_path_buf()]);
        let schema = schemas.get("a.json").unwrap();
        assert!(violations(&schema, &json!({"c": {"id": 1}})).is_empty());
        let found = violations(&schema, &json!({"c": {"email": "nope"}, "n": "x"}));
        let pointers: Vec<_> = found.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(pointers, ["/c/id", "/c/email", "/n"], "{found:?}");
    }

    #[test]
    fn remote_and_escaping_refs_are_refused() {
        let dir = folder(&[
            ("remote.json", r#"{"$ref":"https://example.com/s.json"}"#),
            ("up.json", r#"{"$ref":"../secret.json"}"#),
        ]);
        std::fs::write(dir.path().parent().unwrap().join("secret.json"), "{}").ok();
        let mut schemas = Schemas::new(&[dir.path().to_path_buf()]);
        let error = schemas.get("remote.json").unwrap_err().to_string();
        assert!(error.contains("remote $ref"), "{error}");
        let error = schemas.get("up.json").unwrap_err().to_string();
        assert!(
            error.contains("outside the schemas folder") || error.contains("No such file"),
            "{error}"
        );
        assert!(matches!(
            schemas.get("../x.json"),
            Err(SchemaError::Outside(_))
        ));
    }

    #[test]
    fn bad_json_reports_line_and_column() {
        let dir = folder(&[("bad.json", "{\n  \"type\": \"object\",\n}")]);
        match Schemas::new(&[dir.path().to_path_buf()]).get("bad.json") {
            Err(SchemaError::NotJson { line, column, .. }) => assert_eq!((line, column), (3, 1)),
            other => panic!("{other:?}"),
        }
    }
}

#[cfg(test)]
mod declares_tests {
    use super::*;

    #[test]
    fn paths_are_followed_through_refs_across_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), r#"{"type":"object","properties":{"customer":{"$ref":"defs.json#/$defs/customer"},"tests":{"type":"array","items":{"type":"object","properties":{"code":{}}}},"free":{}}}"#).unwrap();
        std::fs::write(
            dir.path().join("defs.json"),
            r#"{"$defs":{"customer":{"type":"object","properties":{"name":{},"email":{}}}}}"#,
        )
        .unwrap();
        let mut schemas = Schemas::new(&[dir.path().to_path_buf()]);
        schemas.get("a.json").unwrap();
        let path = |p: &str| p.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            schemas.declares("a.json", &path("customer.name")),
            Declared::Yes
        );
        assert_eq!(
            schemas.declares("a.json", &path("tests.0.code")),
            Declared::Yes
        );
        assert_eq!(
            schemas.declares("a.json", &path("free.anything.below")),
            Declared::Yes
        );
        assert_eq!(
            schemas.declares("a.json", &path("customer.nam")),
            Declared::No {
                at: "customer".into(),
                field: "nam".into(),
                known: vec!["email".into(), "name".into()]
            }
        );
    }
}

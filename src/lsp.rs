//! `ferry lsp`: a language server for flow files, over stdio (the Language Server Protocol,
//! through `lsp-server`).
//!
//! - **Diagnostics as you type**: the project of the edited file (its folder, with the
//!   folders `ferry lsp` was given) is checked as `ferry check` checks it, with the unsaved
//!   text of every open file; each problem at its place.
//! - **Completion**: flow keys and the kinds of steps, triggers and targets (from the flow
//!   format's own schema), schema files after `schema:`, flow names after `flow:` and
//!   `from:`; inside `{{…}}` and JSONPaths, the helpers, `body`, `vars` and `meta`, and the
//!   fields of `body` that the schema in force at that step declares.
//! - **Hover**: what a flow key or a helper does; a schema file's title and description; a
//!   flow's description.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use lsp_server::{Connection, Message, Notification, Request, Response};
use serde_json::{Value, json};

use crate::config::shape::{Segment, keys_at};
use crate::diagnostic::{Diagnostic, Severity};
use crate::project::ProjectPaths;

/// Serves the protocol on stdin and stdout until the client asks it to stop. Files are
/// checked with the flows of `flows` and the schemas of `schemas` besides their own folder.
///
/// # Errors
///
/// When the connection fails.
pub fn serve_stdio(flows: Vec<PathBuf>, schemas: Vec<PathBuf>) -> anyhow::Result<()> {
    let (connection, threads) = Connection::stdio();
    let capabilities = json!({
        "textDocumentSync": 1,
        "completionProvider": {"triggerCharacters": [".", "{", " ", ":", "$"]},
        "hoverProvider": true,
    });
    connection.initialize(capabilities)?;
    let mut server = Server {
        flows,
        schemas,
        open: HashMap::new(),
        published: BTreeSet::new(),
    };
    for message in &connection.receiver {
        match message {
            Message::Request(request) => {
                if connection.handle_shutdown(&request)? {
                    break;
                }
                connection
                    .sender
                    .send(Message::Response(server.answer(request)))?;
            }
            Message::Notification(notification) => {
                for out in server.notice(&notification) {
                    connection.sender.send(Message::Notification(out))?;
                }
            }
            Message::Response(_) => {}
        }
    }
    drop(connection);
    threads.join()?;
    Ok(())
}

/// What the server holds: the open files' text, and where it published diagnostics.
struct Server {
    flows: Vec<PathBuf>,
    schemas: Vec<PathBuf>,
    open: HashMap<PathBuf, String>,
    published: BTreeSet<PathBuf>,
}

impl Server {
    fn notice(&mut self, notification: &Notification) -> Vec<Notification> {
        let params = &notification.params;
        let Some(path) = file_of(&params["textDocument"]["uri"]) else {
            return Vec::new();
        };
        match notification.method.as_str() {
            "textDocument/didOpen" => {
                let text = params["textDocument"]["text"].as_str().unwrap_or_default();
                self.open.insert(path.clone(), text.to_owned());
            }
            "textDocument/didChange" => {
                let changes = params["contentChanges"].as_array();
                if let Some(text) = changes.and_then(|c| c.last()?["text"].as_str()) {
                    self.open.insert(path.clone(), text.to_owned());
                }
            }
            "textDocument/didClose" => {
                self.open.remove(&path);
                return Vec::new();
            }
            "textDocument/didSave" => {}
            _ => return Vec::new(),
        }
        self.diagnose(&path)
    }

    /// The project `file` belongs to: its folder, with the folders the server was given.
    fn paths(&self, file: &Path) -> ProjectPaths {
        let mut flows = self.flows.clone();
        if let Some(folder) = file.parent()
            && !flows.iter().any(|f| f == folder)
        {
            flows.push(folder.to_path_buf());
        }
        ProjectPaths::many(&flows, &self.schemas)
    }

    /// Checks `file`'s project; the diagnostics to publish, by file (an empty list clears a
    /// file's earlier ones).
    fn diagnose(&mut self, file: &Path) -> Vec<Notification> {
        let paths = self.paths(file);
        let edited = |path: &Path| self.open.get(&absolute(path)).cloned();
        let env = |name: &str| std::env::var(name).ok();
        let found = match crate::project::load_edited(&paths, &env, &edited) {
            Ok(project) => project.warnings,
            Err(diagnostics) => diagnostics,
        };
        let mut by_file: HashMap<PathBuf, Vec<Value>> = HashMap::new();
        for diagnostic in &found {
            let path = absolute(&diagnostic.file);
            let text = self.text(&path);
            by_file
                .entry(path)
                .or_default()
                .push(lsp_diagnostic(diagnostic, text.as_deref()));
        }
        let stale: Vec<PathBuf> = self
            .published
            .iter()
            .filter(|p| !by_file.contains_key(*p))
            .cloned()
            .collect();
        for path in stale {
            by_file.insert(path, Vec::new());
        }
        by_file.entry(absolute(file)).or_default();
        self.published = by_file
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .map(|(p, _)| p.clone())
            .collect();
        by_file
            .into_iter()
            .filter_map(|(path, diagnostics)| {
                let uri = reqwest::Url::from_file_path(&path).ok()?;
                Some(Notification::new(
                    "textDocument/publishDiagnostics".into(),
                    json!({"uri": uri.as_str(), "diagnostics": diagnostics}),
                ))
            })
            .collect()
    }

    /// A file's text: as the editor holds it, else as saved.
    fn text(&self, path: &Path) -> Option<String> {
        self.open
            .get(path)
            .cloned()
            .or_else(|| std::fs::read_to_string(path).ok())
    }

    fn answer(&self, request: Request) -> Response {
        let params = &request.params;
        let position = (
            params["position"]["line"].as_u64().unwrap_or(0) as usize,
            params["position"]["character"].as_u64().unwrap_or(0) as usize,
        );
        let file = file_of(&params["textDocument"]["uri"]);
        let text = file
            .as_deref()
            .and_then(|f| self.text(f))
            .unwrap_or_default();
        let result = match (request.method.as_str(), &file) {
            ("textDocument/completion", Some(file)) => {
                json!({"isIncomplete": false, "items": self.complete(file, &text, position)})
            }
            ("textDocument/hover", Some(file)) => self
                .hover_value(file, &text, position)
                .unwrap_or_else(|| hover(&text, position)),
            _ => Value::Null,
        };
        Response::new_ok(request.id, result)
    }

    fn complete(&self, file: &Path, text: &str, (line, column): (usize, usize)) -> Vec<Value> {
        let line_text = text.lines().nth(line).unwrap_or_default();
        let before = prefix(line_text, column);
        if let Some(expression) = expression_at(before) {
            return self.complete_expression(file, text, line, expression);
        }
        let content = before.trim_start().trim_start_matches("- ");
        // In a flow mapping (`http: { url: …, `), what follows its last `{` or `,`.
        let (outer, inner) = match content.rfind(['{', ',']) {
            Some(at) => (&content[..=at], &content[at + 1..]),
            None => ("", content),
        };
        if let Some((key, _)) = inner.split_once(':') {
            return match key.trim() {
                "schema" => self
                    .schema_files(file)
                    .into_iter()
                    .map(|name| item(&name, 17, "a schema file"))
                    .collect(),
                "flow" | "from" | "to" => flow_names(&self.paths(file))
                    .into_iter()
                    .map(|name| item(&name, 18, "a flow"))
                    .collect(),
                _ => Vec::new(),
            };
        }
        keys_at(&key_path(text, line, before, outer))
            .into_iter()
            .map(|(name, doc)| item(&name, 10, &doc))
            .collect()
    }

    /// Completions inside `{{…}}` or a JSONPath, where `expression` is what is written up to
    /// the cursor.
    fn complete_expression(
        &self,
        file: &Path,
        text: &str,
        line: usize,
        expression: &str,
    ) -> Vec<Value> {
        let word: String = expression
            .chars()
            .rev()
            .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '-' | '@'))
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let parts: Vec<&str> = word.split('.').collect();
        let Some((_, parents)) = parts.split_last() else {
            return Vec::new();
        };
        match parents.first().copied() {
            None => {
                let roots = [
                    ("body", "the message's body"),
                    ("vars", "values set by earlier steps and captures"),
                    ("meta", "the message's id, times, headers…"),
                ];
                let helpers = crate::template::helpers::HELPERS
                    .iter()
                    .map(|h| item(h.name, 3, &format!("{} {}: {}", h.name, h.signature, h.doc)));
                roots
                    .iter()
                    .map(|(name, doc)| item(name, 6, doc))
                    .chain(helpers)
                    .collect()
            }
            Some("body") => {
                let Some(schema) = schema_in_force(text, line) else {
                    return Vec::new();
                };
                let mut schemas = crate::schema::Schemas::new(&self.paths(file).schemas);
                if schemas.get(&schema).is_err() {
                    return Vec::new();
                }
                let path: Vec<String> = parents[1..].iter().map(|p| (*p).to_owned()).collect();
                schemas
                    .fields(&schema, &path)
                    .into_iter()
                    .map(|(name, doc)| item(&name, 5, doc.as_deref().unwrap_or(&schema)))
                    .collect()
            }
            Some("vars") if parents.len() == 1 => vars_named(text, line)
                .into_iter()
                .map(|name| item(&name, 6, "a var"))
                .collect(),
            Some("meta") if parents.len() == 1 => {
                META.iter().map(|(name, doc)| item(name, 5, doc)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// What the value under the cursor names: a schema file (its title and description) or
    /// a flow (its description).
    fn hover_value(
        &self,
        file: &Path,
        text: &str,
        (line, column): (usize, usize),
    ) -> Option<Value> {
        let line_text = text.lines().nth(line)?;
        let before = prefix(line_text, column);
        let after = &line_text[before.len()..];
        let start = before.rfind([' ', '{', ',']).map_or(0, |at| at + 1);
        let end = after.find([' ', '}', ',']).unwrap_or(after.len());
        let value = format!("{}{}", &before[start..], &after[..end]);
        let key = before[..start].trim_end().trim_end_matches(':');
        let key = key.rsplit([' ', '{', ',', '-']).next().unwrap_or_default();
        let doc = match key {
            "schema" => {
                let mut schemas = crate::schema::Schemas::new(&self.paths(file).schemas);
                schemas.get(&value).ok()?;
                let schema = schemas.raw(&value)?;
                let title = schema["title"].as_str().unwrap_or(&value);
                let description = schema["description"].as_str().unwrap_or_default();
                format!("**{title}** ({value})\n\n{description}")
            }
            "flow" | "from" | "to" => {
                let flow = flows_of(&self.paths(file))
                    .into_iter()
                    .find(|f| f.config.name.value == value)?;
                let description = flow.config.description.unwrap_or_default();
                format!(
                    "flow **{value}** ({})\n\n{description}",
                    flow.file.display()
                )
            }
            _ => return None,
        };
        Some(json!({"contents": {"kind": "markdown", "value": doc}}))
    }

    /// The schema files `file`'s `validate` steps may name.
    fn schema_files(&self, file: &Path) -> Vec<String> {
        crate::schema::Schemas::new(&self.paths(file).schemas).file_names()
    }
}

/// What `meta` holds.
const META: [(&str, &str); 9] = [
    ("id", "the id ferry gave the message (a UUIDv7)"),
    (
        "correlation_id",
        "the caller's X-Correlation-Id, else the id",
    ),
    ("flow", "the flow handling it"),
    ("received_at", "when ferry received it (RFC 3339, UTC)"),
    (
        "method",
        "the HTTP method (QUEUE, MLLP or CALL for other ways in)",
    ),
    ("path", "the request path (the queue, the listen address)"),
    ("params", "path parameters"),
    ("query", "query parameters"),
    (
        "headers",
        "request headers, names lowercase, credentials left out",
    ),
];

/// A completion item.
fn item(label: &str, kind: u8, documentation: &str) -> Value {
    json!({"label": label, "kind": kind, "documentation": documentation})
}

/// The local file a `file://` URI names.
fn file_of(uri: &Value) -> Option<PathBuf> {
    reqwest::Url::parse(uri.as_str()?).ok()?.to_file_path().ok()
}

/// `path` made absolute, as URIs name files.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The text of `line` before `column` (UTF-16 units, as LSP counts, read as characters).
fn prefix(line: &str, column: usize) -> &str {
    let end = line
        .char_indices()
        .nth(column)
        .map_or(line.len(), |(at, _)| at);
    &line[..end]
}

/// What is written of a `{{…}}` expression or a JSONPath before the cursor, when the cursor
/// is inside one.
fn expression_at(before: &str) -> Option<&str> {
    if let Some(open) = before.rfind("{{")
        && !before[open..].contains("}}")
    {
        return Some(&before[open + 2..]);
    }
    let word_start = before
        .rfind(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '[' | ','))
        .map_or(0, |at| at + 1);
    before[word_start..].strip_prefix("$.")
}

/// The keys above line `line` of a flow file, found by indentation, and the list items the
/// line itself opens (`- `) before the cursor.
fn yaml_path(text: &str, line: usize, before: &str) -> Vec<Segment> {
    let mut items = Vec::new();
    let mut rest = before.trim_start();
    let mut indent = before.len() - rest.len();
    while let Some(after) = rest.strip_prefix("- ") {
        items.push(Segment::Item);
        rest = after.trim_start();
    }
    let mut path = Vec::new();
    for above in text
        .lines()
        .take(line)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        if indent == 0 {
            break;
        }
        let trimmed = above.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut at = above.len() - trimmed.len();
        let mut tokens = Vec::new();
        let mut rest = trimmed;
        while let Some(after) = rest.strip_prefix("- ") {
            tokens.push((at, Segment::Item));
            at += 2 + (after.len() - after.trim_start().len());
            rest = after.trim_start();
        }
        if let Some((key, _)) = rest.split_once(':')
            && !key.is_empty()
            && !key.contains([' ', '{', '"', '\''])
        {
            tokens.push((at, Segment::Key(key.to_owned())));
        }
        for (column, segment) in tokens.into_iter().rev() {
            if column < indent {
                path.push(segment);
                indent = column;
            }
        }
    }
    path.reverse();
    path.extend(items);
    path
}

/// Where a key written at the end of `before` (on line `line`) stands: the keys above it,
/// and, inside a flow mapping (`http: { url: …, `; `outer` is the line up to its last `{`
/// or `,`), the key that opens the mapping.
fn key_path(text: &str, line: usize, before: &str, outer: &str) -> Vec<Segment> {
    let mut path = yaml_path(text, line, before);
    if let Some(open) = outer.rfind('{') {
        let owner = outer[..open].trim_end().trim_end_matches(':');
        let owner = owner.rsplit(['{', ',', ' ']).next().unwrap_or_default();
        path.push(Segment::Key(owner.to_owned()));
    }
    path
}

/// The schema a `validate` step named last before line `line`, unless a `transform` has
/// replaced the body since: the schema `body` is known by there.
fn schema_in_force(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    // The step the line is in reads the body the steps before it left.
    let current = (0..=line.min(lines.len().saturating_sub(1)))
        .rev()
        .find(|&n| step_kind(lines[n]).is_some())
        .unwrap_or(line);
    for n in (0..current).rev() {
        match step_kind(lines[n]) {
            Some("transform") => return None,
            Some("validate") => {
                return lines[n..current].iter().find_map(|l| {
                    let (_, after) = l.split_once("schema:")?;
                    let name = after
                        .trim()
                        .trim_matches(|c| matches!(c, '"' | '\'' | '}' | ' ' | ','));
                    let name = name.split([',', ' ', '}']).next()?;
                    (!name.is_empty()).then(|| name.to_owned())
                });
            }
            _ => {}
        }
        if lines[n].starts_with("steps:") {
            break;
        }
    }
    None
}

/// The kind of step a line opens (`  - validate:`), if it opens one.
fn step_kind(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("- ")?;
    let (kind, _) = rest.split_once(':')?;
    matches!(
        kind,
        "validate" | "set" | "transform" | "route" | "correlate"
    )
    .then_some(kind)
}

/// The vars a flow file sets before line `before`: `set` step keys, `correlate` steps'
/// `into`, target captures (which the reply and the delivery outcomes read).
fn vars_named(text: &str, before: usize) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut block: Option<usize> = None;
    for line in text.lines().take(before) {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(parent) = block {
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if indent > parent {
                if let Some((key, _)) = trimmed.split_once(':') {
                    names.insert(key.trim().to_owned());
                }
                continue;
            }
            block = None;
        }
        let key = trimmed.trim_start_matches("- ");
        if key.starts_with("set:") || key.starts_with("capture:") {
            block = Some(indent);
        }
        if let Some(into) = key.strip_prefix("into:") {
            names.insert(into.trim().to_owned());
        }
    }
    names
}

/// The names of the flows in the project's folders.
fn flow_names(paths: &ProjectPaths) -> Vec<String> {
    flows_of(paths)
        .into_iter()
        .map(|flow| flow.config.name.value)
        .collect()
}

/// The flows in the project's folders, as saved.
fn flows_of(paths: &ProjectPaths) -> Vec<crate::config::load::LoadedFlow> {
    paths
        .flows
        .iter()
        .flat_map(|folder| crate::config::load::load_dir(folder, &|_| None).0)
        .collect()
}

/// What the word under the cursor is: a helper inside `{{…}}`, or a flow key.
fn hover(text: &str, (line, column): (usize, usize)) -> Value {
    let line_text = text.lines().nth(line).unwrap_or_default();
    let chars: Vec<char> = line_text.chars().collect();
    let is_word = |c: &char| c.is_alphanumeric() || *c == '_';
    let start = (0..column.min(chars.len()))
        .rev()
        .take_while(|&i| is_word(&chars[i]))
        .last()
        .unwrap_or(column.min(chars.len()));
    let end = (column..chars.len())
        .take_while(|&i| is_word(&chars[i]))
        .last()
        .map_or(column, |i| i + 1);
    let word: String = chars.get(start..end).unwrap_or_default().iter().collect();
    if word.is_empty() {
        return Value::Null;
    }
    let before = prefix(line_text, start);
    let doc = if expression_at(before).is_some() {
        crate::template::helpers::HELPERS
            .iter()
            .find(|h| h.name == word)
            .map(|h| format!("`{} {}`\n\n{}", h.name, h.signature, h.doc))
    } else {
        let outer = before.rfind(['{', ',']).map_or("", |at| &before[..=at]);
        keys_at(&key_path(text, line, before, outer))
            .into_iter()
            .find(|(name, _)| *name == word)
            .map(|(name, doc)| format!("`{name}`\n\n{doc}"))
    };
    doc.map_or(
        Value::Null,
        |doc| json!({"contents": {"kind": "markdown", "value": doc}}),
    )
}

/// A diagnostic as LSP writes it: 0-based, over the word it points at.
fn lsp_diagnostic(diagnostic: &Diagnostic, text: Option<&str>) -> Value {
    let (line, column) = diagnostic.position.map_or((0, 0), |(l, c)| {
        (l.saturating_sub(1) as usize, c.saturating_sub(1) as usize)
    });
    let width = text.and_then(|t| t.lines().nth(line)).map_or(1, |l| {
        l.chars()
            .skip(column)
            .take_while(|c| !c.is_whitespace() && !matches!(c, ':' | ',' | '}'))
            .count()
            .max(1)
    });
    let mut message = diagnostic.message.clone();
    if let Some(hint) = &diagnostic.hint {
        message.push_str(&format!("\n{hint}"));
    }
    json!({
        "range": {
            "start": {"line": line, "character": column},
            "end": {"line": line, "character": column + width},
        },
        "severity": if diagnostic.severity == Severity::Error { 1 } else { 2 },
        "code": diagnostic.code,
        "source": "ferry",
        "message": message,
    })
}

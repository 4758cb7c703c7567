//! What compiling a part of a flow has at hand: `Ctx`, which every component's `compile`
//! receives (steps, targets, triggers, auth) — where the part is written, where problems go,
//! and the compilers parts share (schemas, templates, JSONPaths, durations, secrets).
//!
//! It sits below the components and knows none of them, so each component compiles its own
//! config; [`crate::project`] compiles whole flows and projects with it.

use std::path::Path;
use std::sync::Arc;

use serde_saphyr::Location;

use crate::diagnostic::{Diagnostic, Severity};
use crate::schema::{SchemaError, Schemas};
use crate::template::Templates;

/// What compiling one flow needs: where to report problems and the shared compilers.
pub(crate) struct Ctx<'a> {
    pub(crate) file: &'a Path,
    pub(crate) flow: &'a str,
    pub(crate) part: String,
    /// Where the part being compiled starts, for problems with no more precise place.
    pub(crate) at: Location,
    pub(crate) templates: &'a mut Templates,
    pub(crate) schemas: &'a mut Schemas,
    pub(crate) diagnostics: &'a mut Vec<Diagnostic>,
    /// Target names, in declaration order; routes refer to them.
    pub(crate) targets: Vec<String>,
    /// Where secrets named by environment variable come from.
    pub(crate) env: &'a dyn Fn(&str) -> Option<String>,
    /// The schema the body last passed (a `validate` step) where the part being compiled
    /// reads it: what templates read of `body` is checked against it.
    pub(crate) body_schema: Option<String>,
}

impl Ctx<'_> {
    /// Records an error at `at`.
    pub(crate) fn error(&mut self, at: Location, message: impl Into<String>) {
        let d = self.diagnostic(message).at_location(at);
        self.diagnostics.push(d);
    }

    /// Records an error of kind `code` at `at`, with advice when there is some.
    pub(crate) fn error_with(
        &mut self,
        at: Location,
        code: &'static str,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        let mut d = self.diagnostic(message).at_location(at).with_code(code);
        d.hint = hint;
        self.diagnostics.push(d);
    }

    /// Records a warning of kind `code` at `at`.
    pub(crate) fn warn_with(
        &mut self,
        at: Location,
        code: &'static str,
        message: impl Into<String>,
    ) {
        let mut d = self.diagnostic(message).at_location(at).with_code(code);
        d.severity = Severity::Warning;
        self.diagnostics.push(d);
    }

    /// An environment variable, read through the loader's environment.
    pub(crate) fn env(&self, name: &str) -> Option<String> {
        (self.env)(name)
    }

    /// The secret in the environment variable `name`; unset is a `secret-unset` warning (on
    /// which `ferry serve` refuses to start) and an empty secret.
    pub(crate) fn secret(&mut self, name: &crate::config::Spanned<String>) -> String {
        let value = self.env(&name.value).filter(|v| !v.is_empty());
        if value.is_none() {
            self.warn_with(
                name.referenced,
                "secret-unset",
                format!("environment variable {} is not set", name.value),
            );
        }
        value.unwrap_or_default()
    }

    /// Parses a header name, reporting a problem at `at`.
    pub(crate) fn header_name(
        &mut self,
        name: &str,
        at: Location,
    ) -> Option<axum::http::HeaderName> {
        match axum::http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(header) => Some(header),
            Err(_) => {
                self.error(at, format!("invalid header name \"{name}\""));
                None
            }
        }
    }

    /// Reads a file the flow names (see [`Ctx::project_file`]), reporting a problem at `at`.
    pub(crate) fn read_project_file(&mut self, name: &str, at: Location) -> Option<Vec<u8>> {
        let path = self.existing_project_file(name, at)?;
        std::fs::read(&path)
            .map_err(|e| self.error(at, format!("cannot read {name}: {e}")))
            .ok()
    }

    /// A file the flow names (see [`Ctx::project_file`]) that must exist: one that does not
    /// is reported at `at` with the nearest name in its folder.
    pub(crate) fn existing_project_file(
        &mut self,
        name: &str,
        at: Location,
    ) -> Option<std::path::PathBuf> {
        let path = self.project_file(name, at)?;
        if path.is_file() {
            return Some(path);
        }
        let siblings: Vec<String> = path
            .parent()
            .and_then(|folder| std::fs::read_dir(folder).ok())
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|file| !file.starts_with('.'))
            .collect();
        let wanted = path.file_name().and_then(|f| f.to_str()).unwrap_or(name);
        let hint =
            crate::diagnostic::closest(wanted, siblings.iter().map(String::as_str)).map(|file| {
                let meant = Path::new(name).with_file_name(file);
                format!("did you mean `{}`?", meant.display())
            });
        self.error_with(
            at,
            "missing-file",
            format!("{name} does not exist (next to the flow file)"),
            hint,
        );
        None
    }

    /// A file the flow names, relative to the flow file's folder; one outside it is refused.
    pub(crate) fn project_file(&mut self, name: &str, at: Location) -> Option<std::path::PathBuf> {
        if !stays_inside(name) {
            self.error_with(
                at,
                "file-escape",
                format!("\"{name}\" is outside the flow's folder"),
                Some("name files relative to the flow file, without `..`".into()),
            );
            return None;
        }
        Some(self.file.parent().unwrap_or(Path::new(".")).join(name))
    }

    fn diagnostic(&self, message: impl Into<String>) -> Diagnostic {
        Diagnostic::error(self.file, message)
            .in_flow(self.flow)
            .in_context(self.part.clone())
    }

    /// Compiles a schema, reporting a problem at `at` (or inside the schema file when its
    /// JSON is broken).
    pub(crate) fn schema(
        &mut self,
        name: &str,
        at: Location,
    ) -> Option<Arc<jsonschema::Validator>> {
        match self.schemas.get(name) {
            Ok(schema) => Some(schema),
            Err(SchemaError::NotJson {
                path,
                line,
                column,
                reason,
            }) => {
                let inside = Diagnostic::error(&path, reason).at(line as u64, column as u64);
                self.diagnostics.push(inside.with_code("schema"));
                self.error_with(
                    at,
                    "schema",
                    format!("schema \"{name}\" is not valid JSON"),
                    None,
                );
                None
            }
            Err(error) => {
                let hint = match &error {
                    SchemaError::Unreadable { .. } => {
                        let files = self.schemas.file_names();
                        crate::diagnostic::closest(name, files.iter().map(String::as_str))
                            .map(|file| format!("did you mean `{file}`?"))
                    }
                    _ => None,
                };
                self.error_with(at, "schema", error.to_string(), hint);
                None
            }
        }
    }

    /// Parses a JSONPath that reads the message, reporting a problem at `at`.
    pub(crate) fn message_path(
        &mut self,
        source: &str,
        at: Location,
    ) -> Option<crate::jsonpath::JsonPath> {
        let path = match crate::jsonpath::JsonPath::parse(source) {
            Ok(path) => path,
            Err(reason) => {
                self.error_with(
                    at,
                    "jsonpath",
                    format!("invalid JSONPath \"{source}\": {reason}"),
                    None,
                );
                return None;
            }
        };
        match path.root_name() {
            Some(root) if crate::template::ROOTS.contains(&root) => Some(path),
            _ => {
                self.error_with(
                    at,
                    "jsonpath",
                    format!("JSONPath \"{source}\" must start with $.body, $.vars or $.meta"),
                    None,
                );
                None
            }
        }
    }

    /// Compiles a structural template, reporting each bad node at `at` with its pointer,
    /// and what it reads of a body the schema does not declare.
    pub(crate) fn json_template(
        &mut self,
        tree: &serde_json::Value,
        at: Location,
    ) -> Option<crate::template::JsonTemplate> {
        match self.templates.compile_json(tree) {
            Ok(template) => {
                self.check_reads(template.reads(), at);
                Some(template)
            }
            Err(errors) => {
                // Each mistake at the line of its own key, found in the file's text.
                let text = std::fs::read_to_string(self.file).unwrap_or_default();
                for crate::template::TemplateError { pointer, error } in errors {
                    let place = if pointer.is_empty() {
                        String::new()
                    } else {
                        format!("at {pointer}: ")
                    };
                    let (line, column) =
                        crate::diagnostic::locate(&text, at.line(), at.column(), &pointer)
                            .unwrap_or((at.line(), at.column()));
                    let mut d = self
                        .diagnostic(format!("{place}{}", error.message))
                        .with_code("template")
                        .at(line, column);
                    d.hint = error.hint;
                    self.diagnostics.push(d);
                }
                None
            }
        }
    }

    /// Compiles a text template, reporting a problem at `at`, and what it reads of a body
    /// the schema does not declare.
    pub(crate) fn text_template(
        &mut self,
        source: &str,
        escape: crate::template::Escape,
        at: Location,
    ) -> Option<crate::template::TextTemplate> {
        match self.templates.compile_text(source, escape) {
            Ok(template) => {
                self.check_reads(template.reads(), at);
                Some(template)
            }
            Err(error) => {
                self.error_with(at, "template", error.message, error.hint);
                None
            }
        }
    }

    /// Compiles a header value's template; a fixed value must already be one a header can
    /// hold.
    pub(crate) fn header_template(
        &mut self,
        source: &str,
        at: Location,
    ) -> Option<crate::template::TextTemplate> {
        let template = self.text_template(source, crate::template::Escape::Plain, at)?;
        if let crate::template::TextTemplate::Literal(text) = &template
            && axum::http::HeaderValue::from_str(text).is_err()
        {
            self.error(
                at,
                "a header value cannot hold line breaks or other control characters",
            );
            return None;
        }
        Some(template)
    }

    /// Checks what the JSONPaths of `step` (in `set` and `route`) read of the body.
    pub(crate) fn check_paths(&mut self, step: &crate::config::StepConfig) {
        use crate::config::StepConfig;
        let path_of = |source: &str| {
            crate::jsonpath::JsonPath::parse(source)
                .ok()
                .and_then(|p| p.segments())
        };
        let mut paths: Vec<(Vec<String>, Location)> = Vec::new();
        match step {
            StepConfig::Set(vars) => paths.extend(
                vars.values()
                    .filter_map(|p| path_of(&p.value).map(|s| (s, p.referenced))),
            ),
            StepConfig::Route(rules) => {
                for when in rules.iter().filter_map(|r| r.when.as_ref()) {
                    if let Some(path) = &when.path {
                        paths.extend(path_of(&path.value).map(|s| (s, path.referenced)));
                    }
                }
            }
            _ => {}
        }
        for (path, at) in paths {
            self.check_reads(
                vec![crate::template::Read {
                    path,
                    iterated: false,
                    pointer: String::new(),
                }],
                at,
            );
        }
    }

    /// Warns about every read of `body` that the schema the body last passed does not
    /// declare (most likely a misspelt field), and errs where a `$each` iterates over what
    /// the schema says is not an array.
    pub(crate) fn check_reads(&mut self, reads: Vec<crate::template::Read>, at: Location) {
        let Some(schema) = self.body_schema.clone() else {
            return;
        };
        let text = if reads.iter().any(|r| !r.pointer.is_empty()) {
            std::fs::read_to_string(self.file).unwrap_or_default()
        } else {
            String::new()
        };
        for read in reads {
            // Each read at the line of its own key, when the file's text shows it.
            let (line, column) =
                crate::diagnostic::locate(&text, at.line(), at.column(), &read.pointer)
                    .filter(|_| !read.pointer.is_empty())
                    .unwrap_or((at.line(), at.column()));
            let Some(("body", path)) = read
                .path
                .split_first()
                .map(|(root, rest)| (root.as_str(), rest))
            else {
                continue;
            };
            let shown = format!("body.{}", path.join(".")).replace(".0.", "[].");
            if read.iterated
                && let Some(kind) = self.schemas.kind(&schema, path)
                && kind != "array"
            {
                let d = self
                    .diagnostic(format!("`$each` goes over `{shown}`, which {schema} says is {kind}, not an array"))
                    .with_code("template")
                    .with_hint("give `$each` an array; to make one of a single value, write `$value` without `$each`")
                    .at(line, column);
                self.diagnostics.push(d);
                continue;
            }
            if let crate::schema::Declared::No {
                at: parent,
                field,
                known,
            } = self.schemas.declares(&schema, path)
            {
                let owner = if parent.is_empty() {
                    "the body".to_owned()
                } else {
                    format!("body.{parent}")
                        .replace(".0.", "[].")
                        .replace(".0", "[]")
                };
                let hint =
                    match crate::diagnostic::closest(&field, known.iter().map(String::as_str)) {
                        Some(best) => format!(
                            "did you mean `{best}`? {owner} declares: {}",
                            known.join(", ")
                        ),
                        None => format!("{owner} declares: {}", known.join(", ")),
                    };
                let mut d = self
                    .diagnostic(format!("reads `{shown}`, which {schema} does not declare"))
                    .with_code("undeclared-field")
                    .with_hint(hint)
                    .at(line, column);
                d.severity = Severity::Warning;
                self.diagnostics.push(d);
            }
        }
    }

    /// Parses a size such as `64KiB` or `1MiB` into bytes, reporting a problem at `at`.
    pub(crate) fn size(&mut self, source: &str, at: Location) -> Option<u64> {
        match source.parse::<bytesize::ByteSize>() {
            Ok(size) => Some(size.as_u64()),
            Err(_) => {
                self.error(
                    at,
                    format!("invalid size \"{source}\"; write e.g. 64KiB or 1MiB"),
                );
                None
            }
        }
    }

    /// Parses a duration such as `500ms` or `10s`, reporting a problem at `at`.
    pub(crate) fn duration(&mut self, source: &str, at: Location) -> Option<std::time::Duration> {
        match humantime::parse_duration(source) {
            Ok(duration) => Some(duration),
            Err(error) => {
                self.error(
                    at,
                    format!("invalid duration \"{source}\": {error}; write e.g. 500ms, 10s or 5m"),
                );
                None
            }
        }
    }
}

/// Whether `path`, as a flow names it, stays inside the flow's folder.
fn stays_inside(path: &str) -> bool {
    let path = Path::new(path);
    !path.is_absolute()
        && path.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

/// A bench for unit tests of one component: compiles its config from YAML with a [`Ctx`]
/// of its own, and runs it on messages.
#[cfg(test)]
pub(crate) mod bench {
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use super::Ctx;
    use crate::diagnostic::{Diagnostic, Severity};
    use crate::message::{Message, Meta};
    use crate::schema::Schemas;
    use crate::template::Templates;

    /// A scratch project folder with schemas, target names and an environment.
    pub(crate) struct Bench {
        dir: tempfile::TempDir,
        /// The templates components compiled into.
        pub(crate) templates: Templates,
        /// Everything the last compile reported, warnings included.
        pub(crate) diagnostics: Vec<Diagnostic>,
        targets: Vec<String>,
        env: Vec<(String, String)>,
    }

    impl Bench {
        pub(crate) fn new() -> Self {
            Self {
                dir: tempfile::tempdir().expect("a scratch folder"),
                templates: Templates::new(),
                diagnostics: Vec::new(),
                targets: Vec::new(),
                env: Vec::new(),
            }
        }

        /// Adds `schemas/NAME`.
        pub(crate) fn schema(self, name: &str, schema: &Value) -> Self {
            let path = self.dir.path().join("schemas").join(name);
            std::fs::create_dir_all(path.parent().expect("a folder")).expect("schemas folder");
            std::fs::write(path, schema.to_string()).expect("a schema file");
            self
        }

        /// The flow's targets, in order, for routes to name.
        pub(crate) fn targets(mut self, names: &[&str]) -> Self {
            self.targets = names.iter().map(|&n| n.to_owned()).collect();
            self
        }

        /// An environment variable the flow reads.
        pub(crate) fn env(mut self, name: &str, value: &str) -> Self {
            self.env.push((name.to_owned(), value.to_owned()));
            self
        }

        /// Compiles `yaml` as the config `compile` takes.
        ///
        /// # Errors
        ///
        /// The errors reported, one per line.
        pub(crate) fn compile<C: DeserializeOwned, T>(
            &mut self,
            yaml: &str,
            compile: impl FnOnce(&C, &mut Ctx<'_>) -> Option<T>,
        ) -> Result<T, String> {
            let config: C = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
            let file = self.dir.path().join("flows").join("bench.yaml");
            let mut schemas = Schemas::new(&[self.dir.path().join("schemas")]);
            let env = self.env.clone();
            let lookup =
                move |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
            self.diagnostics.clear();
            let mut ctx = Ctx {
                file: &file,
                flow: "bench",
                part: "bench".into(),
                at: serde_saphyr::Location::UNKNOWN,
                templates: &mut self.templates,
                schemas: &mut schemas,
                diagnostics: &mut self.diagnostics,
                targets: self.targets.clone(),
                env: &lookup,
                body_schema: None,
            };
            let compiled = compile(&config, &mut ctx);
            let errors: Vec<String> = self
                .diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Error)
                .map(|d| d.message.clone())
                .collect();
            match compiled {
                Some(compiled) if errors.is_empty() => Ok(compiled),
                _ => Err(errors.join("\n")),
            }
        }

        /// The warnings of the last compile, by code.
        pub(crate) fn warnings(&self) -> Vec<&str> {
            self.diagnostics
                .iter()
                .filter(|d| d.severity == Severity::Warning)
                .map(|d| d.code)
                .collect()
        }
    }

    /// A message of flow `bench` with `body`, as an HTTP trigger would make it.
    pub(crate) fn message(body: Value) -> Message {
        Message::new(body, Meta::new("bench"))
    }
}

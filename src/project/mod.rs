//! Turns flow files into runnable flows, collecting every problem on the way: the project
//! compiler (`project::flow` compiles one flow).
//!
//! The phases run in order: parse ([`crate::config::load`]), structure (names resolve, no two
//! flows claim one endpoint), and compile (schemas, templates, JSONPaths, URLs, durations).
//! Each phase reports all it finds, so `ferry check` shows every problem at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::load::{LoadedFlow, load_dir_edited};
use crate::diagnostic::{self, Diagnostic, Severity};
use crate::flow::Flow;
use crate::schema::Schemas;

mod flow;
mod links;

/// Where a project's flows and schemas are.
#[derive(Debug, Clone)]
pub struct ProjectPaths {
    /// The flows folders.
    pub flows: Vec<PathBuf>,
    /// The schemas folders that `validate` steps name files in, searched in order.
    pub schemas: Vec<PathBuf>,
}

impl ProjectPaths {
    /// `flows` and, unless given, the `schemas` folder beside it.
    pub fn new(flows: &Path, schemas: Option<&Path>) -> Self {
        let schemas: Vec<PathBuf> = schemas.map(Path::to_path_buf).into_iter().collect();
        Self::many(&[flows.to_path_buf()], &schemas)
    }

    /// Several flows folders (or flow files), as one project. Schemas are searched in
    /// `schemas`, then in the `schemas` folder beside each flows folder, so a partner's
    /// folder can bring its own.
    pub fn many(flows: &[PathBuf], schemas: &[PathBuf]) -> Self {
        let mut search = schemas.to_vec();
        for path in flows {
            // A flow file stands for the folder it is in.
            let folder = match path.parent() {
                Some(parent) if path.is_file() => parent,
                _ => path.as_path(),
            };
            let beside = folder.parent().unwrap_or(Path::new(".")).join("schemas");
            if beside.is_dir() && !search.contains(&beside) {
                search.push(beside);
            }
        }
        if search.is_empty() {
            let first = flows.first().map_or(Path::new("flows"), PathBuf::as_path);
            search.push(first.parent().unwrap_or(Path::new(".")).join("schemas"));
        }
        Self {
            flows: flows.to_vec(),
            schemas: search,
        }
    }
}

/// Every flow of a project, compiled and ready to serve.
#[derive(Debug)]
pub struct Project {
    /// The flows, in file order.
    pub flows: Vec<Arc<Flow>>,
    /// Warnings found while compiling; errors prevent a project from existing.
    pub warnings: Vec<Diagnostic>,
}

impl Project {
    /// The flow named `name`.
    pub fn flow(&self, name: &str) -> Option<&Arc<Flow>> {
        self.flows.iter().find(|f| f.name == name)
    }
}

/// Loads, checks and compiles every flow under `paths.flows`, reading `${VAR}`s from the
/// process environment.
///
/// # Errors
///
/// Every diagnostic found, sorted by file and line, when any of them is an error.
pub fn load(paths: &ProjectPaths) -> Result<Project, Vec<Diagnostic>> {
    load_with_env(paths, &|name| std::env::var(name).ok())
}

/// [`load`] with `${VAR}`s read through `env`.
///
/// # Errors
///
/// Every diagnostic found, sorted by file and line, when any of them is an error.
pub fn load_with_env(
    paths: &ProjectPaths,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Project, Vec<Diagnostic>> {
    load_edited(paths, env, &|_| None)
}

/// [`load_with_env`], with the text of some flow files as an editor holds it: `edited`
/// gives a file's unsaved text, or `None` to read the file.
///
/// # Errors
///
/// As [`load_with_env`].
pub fn load_edited(
    paths: &ProjectPaths,
    env: &dyn Fn(&str) -> Option<String>,
    edited: &dyn Fn(&Path) -> Option<String>,
) -> Result<Project, Vec<Diagnostic>> {
    // Every value read from the environment, so no diagnostic shows one (they may be
    // secrets, and CI runs `ferry check` with them set).
    let read: std::cell::RefCell<Vec<(String, String)>> = std::cell::RefCell::default();
    let recording = |name: &str| {
        let value = env(name);
        if let Some(value) = &value {
            read.borrow_mut().push((name.to_owned(), value.clone()));
        }
        value
    };
    let env: &dyn Fn(&str) -> Option<String> = &recording;
    let mut loaded = Vec::new();
    let mut diagnostics = Vec::new();
    for folder in &paths.flows {
        let (mut flows, mut found) = load_dir_edited(folder, env, edited);
        loaded.append(&mut flows);
        diagnostics.append(&mut found);
    }
    let mut schemas = Schemas::new(&paths.schemas);
    check_unique_names(&loaded, &mut diagnostics);
    check_endpoints(&loaded, &mut diagnostics);
    check_mllp_listeners(&loaded, &mut diagnostics);
    let links = links::collect(&loaded, &mut diagnostics);
    let mut flows = Vec::new();
    for flow in &loaded {
        let joined = links
            .get(flow.config.name.value.as_str())
            .map_or(&[][..], Vec::as_slice);
        links::check_overlaps(flow, joined, &mut diagnostics);
        if let Some(compiled) = flow::compile(flow, joined, &mut schemas, &mut diagnostics, env) {
            flows.push(Arc::new(compiled));
        }
    }
    check_calls(&loaded, &links, &mut diagnostics);
    check_examples(&flows, &schemas, &mut diagnostics);
    hide_environment(&mut diagnostics, read.take());
    diagnostic::sort(&mut diagnostics);
    if diagnostics.iter().any(|d| d.severity == Severity::Error) {
        return Err(diagnostics);
    }
    Ok(Project {
        flows,
        warnings: diagnostics,
    })
}

/// Values shorter than this are left in diagnostics: too common to be secrets, and hiding
/// every `1` or `on` would garble the messages.
const HIDDEN_MIN_LEN: usize = 4;

/// Shows each environment value that a diagnostic quotes as the `${NAME}` it came from.
fn hide_environment(diagnostics: &mut [Diagnostic], mut read: Vec<(String, String)>) {
    read.retain(|(_, value)| value.len() >= HIDDEN_MIN_LEN);
    // Longest first, so a value that holds another is replaced whole.
    read.sort_by_key(|(_, value)| std::cmp::Reverse(value.len()));
    read.dedup();
    for diagnostic in diagnostics {
        for text in std::iter::once(&mut diagnostic.message).chain(diagnostic.hint.as_mut()) {
            for (name, value) in &read {
                if text.contains(value.as_str()) {
                    *text = text.replace(value.as_str(), &format!("${{{name}}}"));
                }
            }
        }
    }
}

fn check_unique_names(flows: &[LoadedFlow], diagnostics: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for flow in flows {
        let name = &flow.config.name;
        if let Some(first) = seen.insert(&name.value, &flow.file) {
            diagnostics.push(
                Diagnostic::error(
                    &flow.file,
                    format!(
                        "flow name \"{}\" is already used by {}",
                        name.value,
                        first.display()
                    ),
                )
                .with_code("duplicate-name")
                .at_location(name.referenced),
            );
        }
    }
}

/// Two flows may not serve the same method and path; `{id}` and `{key}` in the same place
/// are the same path.
fn check_endpoints(flows: &[LoadedFlow], diagnostics: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<(String, String), (&str, &Path)> = HashMap::new();
    for flow in flows {
        let Some(crate::config::TriggerConfig::Http(http)) = &flow.config.trigger else {
            continue;
        };
        let key = (
            http.method.value.to_ascii_uppercase(),
            route_shape(&http.path.value),
        );
        let name = flow.config.name.value.as_str();
        if let Some((other, file)) = seen.get(&key) {
            diagnostics.push(
                Diagnostic::error(
                    &flow.file,
                    format!(
                        "{} {} is already served by flow \"{other}\" ({})",
                        key.0,
                        http.path.value,
                        file.display()
                    ),
                )
                .in_flow(name)
                .in_context("trigger")
                .with_code("route-collision")
                .at_location(http.path.referenced),
            );
        } else {
            seen.insert(key, (name, &flow.file));
        }
    }
}

/// Two flows may not listen for MLLP on the same address (port 0 takes a free port each
/// time, so it never collides).
fn check_mllp_listeners(flows: &[LoadedFlow], diagnostics: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<&str, (&str, &Path)> = HashMap::new();
    for flow in flows {
        let Some(crate::config::TriggerConfig::Mllp(mllp)) = &flow.config.trigger else {
            continue;
        };
        let listen = mllp.listen.value.as_str();
        if listen.ends_with(":0") {
            continue;
        }
        let name = flow.config.name.value.as_str();
        match seen.get(listen) {
            Some((other, file)) => diagnostics.push(
                Diagnostic::error(
                    &flow.file,
                    format!(
                        "{listen} is already listened on by flow \"{other}\" ({})",
                        file.display()
                    ),
                )
                .in_flow(name)
                .in_context("trigger")
                .with_code("listen-collision")
                .at_location(mllp.listen.referenced),
            ),
            None => {
                seen.insert(listen, (name, &flow.file));
            }
        }
    }
}

/// Runs each example of a flow's input schema through its steps: an example the flow's own
/// steps refuse (a transform whose output breaks the next schema, say) is a mistake found
/// without traffic.
fn check_examples(flows: &[Arc<Flow>], schemas: &Schemas, diagnostics: &mut Vec<Diagnostic>) {
    for flow in flows {
        let Some(schema) = flow.input_schema() else {
            continue;
        };
        for (index, example) in schemas.examples(schema).iter().enumerate() {
            let mut message = crate::message::Message::new(
                example.clone(),
                crate::message::Meta::new(&flow.name),
            );
            let mut label = String::new();
            let outcome = {
                let mut watch = |step: &str, _: &crate::message::Message| label = step.to_owned();
                let steps = flow.run_steps_watched(&mut message, None, &mut watch);
                // Without a store nothing awaits, so one poll finishes the steps; a flow that
                // needs a store to go on (a correlation lookup) is left to `ferry test`.
                let mut steps = std::pin::pin!(steps);
                let mut context = std::task::Context::from_waker(std::task::Waker::noop());
                steps.as_mut().poll(&mut context)
            };
            let std::task::Poll::Ready(Err(error)) = outcome else {
                continue;
            };
            if matches!(
                error,
                crate::error::FlowError::Unavailable(_)
                    | crate::error::FlowError::NotCorrelated { .. }
            ) {
                continue;
            }
            let failed = flow.steps_after(&label).unwrap_or(label.clone());
            let mut diagnostic = Diagnostic::error(
                &flow.file,
                format!("example {} of {schema} is refused: {error}{}", index + 1, violations(&error)),
            )
            .with_code("example")
            .in_flow(&flow.name)
            .in_context(failed.clone())
            .with_hint(format!("the flow's own steps should accept every example of {schema}: check the transform before {failed}"));
            if let Some(at) = flow.step_location(&failed) {
                diagnostic = diagnostic.at_location(at);
            }
            diagnostics.push(diagnostic);
        }
    }
}

/// The violations of a validation error, for a diagnostic.
fn violations(error: &crate::error::FlowError) -> String {
    match error {
        crate::error::FlowError::Invalid { violations, .. } => violations
            .iter()
            .map(|v| {
                format!(
                    "; {}: {}",
                    if v.pointer.is_empty() {
                        "/"
                    } else {
                        &v.pointer
                    },
                    v.message
                )
            })
            .collect(),
        _ => String::new(),
    }
}

/// The flows `flow` calls: its `flow:` targets and route rules, each where it is written.
fn calls(flow: &LoadedFlow) -> Vec<&crate::config::Spanned<String>> {
    let targets = flow.config.targets.values().filter_map(|t| match t {
        crate::config::TargetConfig::Flow(name) => Some(name),
        _ => None,
    });
    let routes = flow.config.route_rules().filter_map(|r| r.flow.as_ref());
    targets.chain(routes).collect()
}

/// Every `flow:` call names a flow, and no flow calls itself, however indirectly (through
/// other flows' claims and subscriptions too).
fn check_calls(
    flows: &[LoadedFlow],
    links: &HashMap<&str, Vec<links::Link<'_>>>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let names: Vec<&str> = flows.iter().map(|f| f.config.name.value.as_str()).collect();
    for flow in flows {
        for call in calls(flow) {
            if !names.contains(&call.value.as_str()) {
                diagnostics.push(
                    Diagnostic::error(&flow.file, format!("unknown flow \"{}\"", call.value))
                        .with_code("unknown-flow")
                        .with_hint(known_flows(&call.value, &names))
                        .in_flow(&flow.config.name.value)
                        .at_location(call.referenced),
                );
            }
        }
    }
    // Depth-first from each flow; a call back into the current path closes a cycle.
    fn cycle_from<'a>(
        flows: &'a [LoadedFlow],
        links: &HashMap<&str, Vec<links::Link<'a>>>,
        name: &'a str,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(start) = path.iter().position(|p| *p == name) {
            let mut cycle = path[start..].to_vec();
            cycle.push(name);
            return Some(cycle);
        }
        let flow = flows.iter().find(|f| f.config.name.value == name)?;
        path.push(name);
        let linked = links
            .get(name)
            .into_iter()
            .flatten()
            .map(|l| l.partner.config.name.value.as_str());
        let called: Vec<&str> = calls(flow)
            .into_iter()
            .map(|c| c.value.as_str())
            .chain(linked)
            .collect();
        for call in called {
            if let Some(cycle) = cycle_from(flows, links, call, path) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut reported: Vec<&str> = Vec::new();
    for flow in flows {
        let name = flow.config.name.value.as_str();
        let Some(cycle) = cycle_from(flows, links, name, &mut Vec::new()) else {
            continue;
        };
        if cycle[0] != name || cycle.iter().any(|n| reported.contains(n)) {
            continue;
        }
        let mut diagnostic = Diagnostic::error(
            &flow.file,
            format!("flows call each other in a cycle: {}", cycle.join(" → ")),
        )
        .with_code("call-cycle")
        .in_flow(name);
        if let Some(call) = calls(flow).first() {
            diagnostic = diagnostic.at_location(call.referenced);
        }
        diagnostics.push(diagnostic);
        reported.extend(cycle);
    }
}

/// Advice for a name that is no flow's: the nearest flow name, and every flow's.
fn known_flows(name: &str, names: &[&str]) -> String {
    match crate::diagnostic::closest(name, names.iter().copied()) {
        Some(best) if best != name => {
            format!("did you mean `{best}`? known flows: {}", names.join(", "))
        }
        _ => format!("known flows: {}", names.join(", ")),
    }
}

/// The path with parameter names erased: `/a/{id}` → `/a/{}`.
fn route_shape(path: &str) -> String {
    path.split('/')
        .map(|segment| match segment.strip_prefix("{*") {
            Some(_) => "{*}",
            None if segment.starts_with('{') => "{}",
            None => segment,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_shapes_erase_parameter_names() {
        assert_eq!(route_shape("/a/{id}/b"), route_shape("/a/{key}/b"));
        assert_ne!(route_shape("/a/{id}"), route_shape("/a/id"));
        assert_eq!(route_shape("/f/{*rest}"), "/f/{*}");
    }
}

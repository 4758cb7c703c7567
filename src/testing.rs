//! `ferry test`: flows unit-tested with their targets mocked, in-process, with no network.
//!
//! A test file (`*.test.yaml`, beside the flows) names a flow and lists cases: the input
//! message, what each target answers (mocks), and what must come out — the reply, what each
//! target received, the vars. Correlation records live in a scratch in-memory store per file,
//! so a case can find what an earlier case saved; nothing is left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::project::Project;
use crate::config::Spanned;
use crate::diagnostic::Diagnostic;
use crate::error::{FlowError, ServeError};
use crate::flow::{Flow, Trigger};
use crate::jsonpath::JsonPath;
use crate::message::{Message, Meta};
use crate::store::Store;
use crate::targets::{RetryAction, Target, TargetResponse, classify_status};
use crate::template::helpers::same;

/// A test file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// The flow under test.
    pub flow: String,
    /// Correlation records that exist before the first case, as an earlier flow would have
    /// saved them.
    #[serde(default)]
    pub given: Vec<GivenCorrelation>,
    /// The cases, run in order.
    #[schemars(with = "Vec<TestCase>")]
    pub tests: Vec<Spanned<TestCase>>,
}

/// A correlation record to start from.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GivenCorrelation {
    /// Its namespace, such as `test-request`.
    pub context: String,
    /// Its keys; the first is its main key.
    pub keys: Vec<String>,
    /// Its data.
    #[serde(default)]
    pub data: Value,
    /// Its state.
    #[serde(default)]
    pub state: Option<String>,
}

/// One case.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    /// What the case shows.
    pub name: String,
    /// The message that comes in.
    pub input: Input,
    /// What each target answers, by target name (default: `200` with an empty body).
    #[serde(default)]
    pub mocks: BTreeMap<String, Mock>,
    /// What must come out.
    #[serde(default)]
    pub expect: Expect,
}

/// The message of a case.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The JSON body.
    #[serde(default)]
    pub body: Option<Value>,
    /// A file holding the JSON body, relative to the test file.
    #[serde(default)]
    pub body_file: Option<String>,
    /// Request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Path parameters.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Query parameters.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
}

/// What a mocked target answers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mock {
    /// HTTP status (default 200); a called flow's reply status.
    #[serde(default = "ok_status")]
    pub status: u16,
    /// The JSON body.
    #[serde(default)]
    pub body: Value,
    /// `timeout` or `connect`: the target does not answer at all.
    #[serde(default)]
    pub fail: Option<String>,
}

fn ok_status() -> u16 {
    200
}

/// What a case expects.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The reply to the caller.
    #[serde(default)]
    pub reply: Option<JsonExpect>,
    /// What each target received, by name.
    #[serde(default)]
    pub targets: BTreeMap<String, JsonExpect>,
    /// Targets that must receive nothing.
    #[serde(default)]
    pub no_output_from: Vec<String>,
    /// Vars after the steps (and the target's captures): each must contain these values.
    #[serde(default)]
    pub vars: BTreeMap<String, Value>,
}

/// Expectations on a JSON document: a reply or what a target received.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonExpect {
    /// HTTP status of a reply.
    #[serde(default)]
    pub status: Option<u16>,
    /// The body, exactly (numbers by value: `-5` equals `-5.0`).
    #[serde(default)]
    pub json_equals: Option<Value>,
    /// The body, exactly as the JSON file at this path (relative to the test file) holds it.
    #[serde(default)]
    pub json_equals_file: Option<String>,
    /// The body contains this: every field given, recursively; arrays element by element.
    #[serde(default)]
    pub json_contains: Option<Value>,
    /// JSONPath assertions over the body: `$.tests[0].code: PH`.
    #[serde(default)]
    pub paths: BTreeMap<String, Value>,
    /// Headers sent (names lowercase), exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The test file.
    pub file: PathBuf,
    /// The line the case starts at.
    pub line: u64,
    /// The case's name.
    pub name: String,
    /// Every failed expectation; empty when the case passed.
    pub failures: Vec<String>,
}

/// What a target got in a case.
#[derive(Debug, Clone)]
struct Output {
    headers: BTreeMap<String, String>,
    body: Value,
}

/// Finds `*.test.yaml` files under `dirs`, recursively, in name order.
pub fn find_test_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if crate::config::load::is_hidden(&path) {
                continue;
            }
            if path.is_dir() {
                walk(&path, found);
            } else if path.to_string_lossy().ends_with(".test.yaml") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    for dir in dirs {
        walk(dir, &mut found);
    }
    found.sort();
    found
}

/// Runs every case of the test file at `file` against `project`.
///
/// # Errors
///
/// A diagnostic when the file cannot be read or parsed, or names an unknown flow.
pub async fn run_file(project: &Project, file: &Path) -> Result<Vec<CaseResult>, Diagnostic> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Diagnostic::error(file, format!("cannot read file: {e}")).with_code("io"))?;
    let tests: TestFile =
        crate::config::load::parse_yaml(file, &text).map_err(|mut d| d.remove(0))?;
    let flow = project.flow(&tests.flow).ok_or_else(|| {
        Diagnostic::error(file, format!("unknown flow \"{}\"", tests.flow))
            .with_code("unknown-flow")
    })?;
    let store = Store::open("sqlite::memory:")
        .await
        .map_err(|e| Diagnostic::error(file, format!("cannot open a scratch store: {e}")))?;
    let given = tests
        .given
        .iter()
        .map(|g| crate::store::CorrelationWrite::Save {
            context: g.context.clone(),
            keys: g.keys.clone(),
            data: g.data.clone(),
            state: g.state.clone(),
        })
        .collect();
    store
        .correlate(given)
        .await
        .map_err(|e| Diagnostic::error(file, format!("given: {e}")))?;
    let mut results = Vec::new();
    for case in &tests.tests {
        let failures = match run_case(flow, &case.value, file, &store).await {
            Ok(failures) => failures,
            Err(problem) => vec![problem],
        };
        results.push(CaseResult {
            file: file.to_path_buf(),
            line: case.referenced.line(),
            name: case.value.name.clone(),
            failures,
        });
    }
    store.close().await;
    Ok(results)
}

async fn run_case(
    flow: &Arc<Flow>,
    case: &TestCase,
    file: &Path,
    store: &Store,
) -> Result<Vec<String>, String> {
    let body = match (&case.input.body, &case.input.body_file) {
        (Some(body), None) => body.clone(),
        (None, Some(name)) => {
            let path = file.parent().unwrap_or(Path::new(".")).join(name);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("body_file {}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("body_file {}: {e}", path.display()))?
        }
        (None, None) => Value::Null,
        (Some(_), Some(_)) => return Err("input has both `body` and `body_file`".into()),
    };
    let mut meta = Meta::new(&flow.name);
    if let Trigger::Http(http) = &flow.trigger {
        meta.method = http.method.to_string();
        meta.path = http.path.clone();
    }
    meta.headers = case
        .input
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    meta.adopt_correlation_id();
    meta.params = case.input.params.clone();
    meta.query = case.input.query.clone();
    let mut message = Message::new(body, &meta);

    let mut outputs: BTreeMap<String, Output> = BTreeMap::new();
    let reply = match flow.run_steps(&mut message, Some(store)).await {
        Err(error) => refusal(error),
        Ok(processed) => {
            store
                .correlate(processed.correlation)
                .await
                .map_err(|e| e.to_string())?;
            let target = processed.target.map(|i| &flow.targets()[i]);
            let mock = target.and_then(|t| case.mocks.get(t.name()));
            let delivered = match target {
                Some(target) => deliver(flow, target, mock, &mut message, &mut outputs),
                None => Ok(()),
            };
            match delivered {
                // A durable flow has replied before delivery: its reply stands whatever the target says.
                Err(error) if !flow.is_durable() => refusal(error),
                // A sync flow without a reply of its own answers what the flow it called answered.
                Ok(())
                    if matches!(target, Some(Target::Flow(_)))
                        && !flow.declares_reply()
                        && !flow.is_durable() =>
                {
                    mock.map_or((200, Value::Null), |m| (m.status, m.body.clone()))
                }
                _ => match flow.render_reply(&message) {
                    Ok(reply) => (reply.status.as_u16(), reply.body),
                    Err(error) => refusal(error),
                },
            }
        }
    };

    let mut failures = Vec::new();
    let base = file.parent().unwrap_or(Path::new("."));
    if let Some(expected) = &case.expect.reply {
        check_json(
            base,
            "reply",
            expected,
            reply.0,
            &BTreeMap::new(),
            &reply.1,
            &mut failures,
        );
    }
    for (target, expected) in &case.expect.targets {
        match outputs.get(target) {
            Some(got) => check_json(
                base,
                &format!("target \"{target}\""),
                expected,
                0,
                &got.headers,
                &got.body,
                &mut failures,
            ),
            None => failures.push(format!("target \"{target}\" received nothing")),
        }
    }
    for target in &case.expect.no_output_from {
        if outputs.contains_key(target) {
            failures.push(format!(
                "target \"{target}\" received {}, but should have received nothing",
                outputs[target].body
            ));
        }
    }
    for (name, expected) in &case.expect.vars {
        let actual = &message.root()["vars"][name];
        if !contains(actual, expected) {
            failures.push(format!("var \"{name}\" is {actual}, expected {expected}"));
        }
    }
    Ok(failures)
}

/// A message's metadata as the flow's trigger would give it, with these headers.
fn meta_for(flow: &Flow, headers: &BTreeMap<String, String>) -> Meta {
    let mut meta = Meta::new(&flow.name);
    if let Trigger::Http(http) = &flow.trigger {
        meta.method = http.method.to_string();
        meta.path = http.path.clone();
    }
    meta.headers = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    meta.adopt_correlation_id();
    meta
}

/// The status and body a caller gets for an error.
fn refusal(error: FlowError) -> (u16, Value) {
    let error = ServeError::Flow(error);
    (error.status().as_u16(), error.body())
}

/// Records what `target` would receive and answers with its mock.
fn deliver(
    flow: &Flow,
    target: &Target,
    mock: Option<&Mock>,
    message: &mut Message,
    outputs: &mut BTreeMap<String, Output>,
) -> Result<(), FlowError> {
    let (headers, body) = match target {
        Target::Http(http) => {
            let request = flow.prepare(http, message)?;
            let headers = request
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        v.to_str().unwrap_or_default().to_owned(),
                    )
                })
                .chain([
                    ("x-ferry-url".to_owned(), request.url.to_string()),
                    ("x-ferry-method".to_owned(), request.method.to_string()),
                ])
                .collect();
            let body = serde_json::from_slice(&request.body).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&request.body).into_owned())
            });
            (headers, body)
        }
        Target::Queue(_) | Target::Flow(_) => (BTreeMap::new(), message.body().clone()),
    };
    outputs.insert(target.name().to_owned(), Output { headers, body });
    let failed = |status: Option<u16>, reason: String| FlowError::Target {
        target: target.name().to_owned(),
        status,
        reason,
    };
    let Some(mock) = mock else {
        return Ok(());
    };
    if let Some(kind) = &mock.fail {
        return Err(failed(None, format!("mocked {kind}")));
    }
    if classify_status(mock.status) != RetryAction::Done {
        return Err(failed(
            Some(mock.status),
            format!("answered {}", mock.status),
        ));
    }
    match target {
        Target::Http(http) => {
            let body = Bytes::from(mock.body.to_string());
            let response = TargetResponse {
                status: mock.status,
                retry_after: None,
                body,
            };
            http.capture(&response, message);
        }
        Target::Flow(_) => message.merge_vars(&mock.body),
        Target::Queue(_) => {}
    }
    Ok(())
}

fn check_json(
    base: &Path,
    what: &str,
    expected: &JsonExpect,
    status: u16,
    headers: &BTreeMap<String, String>,
    actual: &Value,
    failures: &mut Vec<String>,
) {
    if let Some(want) = expected.status.filter(|want| *want != status) {
        failures.push(format!(
            "{what}: status {status}, expected {want}\n{}",
            pretty(actual)
        ));
    }
    let from_file = expected.json_equals_file.as_ref().map(|name| {
        let path = base.join(name);
        std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str::<Value>(&text).map_err(|e| e.to_string()))
            .map_err(|e| format!("{what}: json_equals_file {}: {e}", path.display()))
    });
    let wanted = match from_file {
        Some(Err(error)) => {
            failures.push(error);
            None
        }
        Some(Ok(value)) => Some(value),
        None => expected.json_equals.clone(),
    };
    if let Some(want) = wanted
        && !same(&want, actual)
    {
        failures.push(format!(
            "{what}: body differs\n--- expected\n{}\n--- actual\n{}",
            pretty(&want),
            pretty(actual)
        ));
    }
    if let Some(want) = &expected.json_contains
        && !contains(actual, want)
    {
        failures.push(format!(
            "{what}: body does not contain\n{}\n--- actual\n{}",
            pretty(want),
            pretty(actual)
        ));
    }
    for (path, want) in &expected.paths {
        match JsonPath::parse(path) {
            Ok(compiled) => {
                let got = compiled.extract(actual);
                if !same(&got, want) {
                    failures.push(format!("{what}: {path} is {got}, expected {want}"));
                }
            }
            Err(error) => failures.push(format!("{what}: invalid JSONPath \"{path}\": {error}")),
        }
    }
    for (name, want) in &expected.headers {
        match headers.get(&name.to_ascii_lowercase()) {
            Some(got) if got == want => {}
            Some(got) => failures.push(format!(
                "{what}: header {name} is \"{got}\", expected \"{want}\""
            )),
            None => failures.push(format!("{what}: no header {name}")),
        }
    }
}

/// Runs one message through `flow` step by step for `ferry run`, and describes each step's
/// output, the request the target gets, and the reply. The target is mocked (answering `200`
/// with an empty body) unless `live`, when an HTTP target is really called.
pub async fn trace(
    flow: &Flow,
    body: Value,
    headers: &BTreeMap<String, String>,
    live: bool,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let meta = meta_for(flow, headers);
    let mut message = Message::new(body, &meta);
    let _ = writeln!(out, "== input\n{}", pretty(message.root()));
    let Ok(store) = Store::open("sqlite::memory:").await else {
        return out + "cannot open a scratch store\n";
    };
    let mut previous = message.root().clone();
    let mut watch = |label: &str, message: &Message| {
        let _ = writeln!(out, "\n== {label}");
        let now = message.root();
        let mut changed = false;
        for part in ["body", "vars"] {
            if now[part] != previous[part] {
                let _ = writeln!(out, "{part}:\n{}", pretty(&now[part]));
                changed = true;
            }
        }
        if !changed {
            out.push_str("ok, the message is unchanged\n");
        }
        previous = now.clone();
    };
    let processed = flow
        .run_steps_watched(&mut message, Some(&store), &mut watch)
        .await;
    let processed = match processed {
        Ok(processed) => processed,
        Err(error) => {
            let (status, body) = refusal(error);
            let _ = writeln!(out, "\n== refused: {status}\n{}", pretty(&body));
            return out;
        }
    };
    for write in &processed.correlation {
        let (what, keys, data, state) = match write {
            crate::store::CorrelationWrite::Save {
                context,
                keys,
                data,
                state,
            } => (format!("save {context} under"), keys, data, state),
            crate::store::CorrelationWrite::Update {
                keys, data, state, ..
            } => (
                "update the found record, adding".to_owned(),
                keys,
                data,
                state,
            ),
        };
        let _ = writeln!(
            out,
            "\n== correlation: {what} {keys:?}, state {}\n{}",
            state.as_deref().unwrap_or("-"),
            pretty(data)
        );
    }
    if let Some(target) = processed.target.map(|i| &flow.targets()[i]) {
        let mut outputs = BTreeMap::new();
        let delivered = match (target, live) {
            (Target::Http(http), true) => {
                let client = crate::targets::http_client().unwrap_or_default();
                let attempt = http.attempt(&mut message, flow.templates(), &client).await;
                let _ = writeln!(
                    out,
                    "\n== target \"{}\" called: {:?} {:?} {}",
                    target.name(),
                    attempt.action,
                    attempt.status,
                    attempt.error.unwrap_or_default()
                );
                Ok(())
            }
            _ => deliver(flow, target, None, &mut message, &mut outputs),
        };
        for (name, output) in &outputs {
            let kind = match target {
                Target::Http(_) => "http",
                Target::Queue(_) => "queue",
                Target::Flow(_) => "flow",
            };
            let _ = writeln!(out, "\n== target \"{name}\" ({kind}) would get (mocked)");
            for (header, value) in &output.headers {
                let _ = writeln!(out, "{header}: {value}");
            }
            let _ = writeln!(out, "{}", pretty(&output.body));
        }
        if let Err(error) = delivered {
            let _ = writeln!(out, "\n== delivery failed: {error}");
        }
    }
    match flow.render_reply(&message) {
        Ok(reply) => {
            let _ = writeln!(
                out,
                "\n== reply {}\n{}",
                reply.status.as_u16(),
                pretty(&reply.body)
            );
        }
        Err(error) => {
            let _ = writeln!(out, "\n== reply failed: {error}");
        }
    }
    store.close().await;
    out
}

/// Whether `actual` contains `expected`: objects field by field, arrays element by element
/// (same length), anything else equal.
pub fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(actual), Value::Object(expected)) => expected
            .iter()
            .all(|(key, want)| actual.get(key).is_some_and(|got| contains(got, want))),
        (Value::Array(actual), Value::Array(expected)) => {
            actual.len() == expected.len()
                && actual
                    .iter()
                    .zip(expected)
                    .all(|(got, want)| contains(got, want))
        }
        _ => same(actual, expected),
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// The results as a JUnit XML report.
pub fn junit(results: &[CaseResult]) -> String {
    fn escape(text: &str) -> String {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    }
    let failed = results.iter().filter(|r| !r.failures.is_empty()).count();
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"ferry\" tests=\"{}\" failures=\"{failed}\">\n",
        results.len()
    );
    for result in results {
        let class = escape(&result.file.display().to_string());
        xml.push_str(&format!(
            "  <testcase classname=\"{class}\" name=\"{}\"",
            escape(&result.name)
        ));
        if result.failures.is_empty() {
            xml.push_str("/>\n");
        } else {
            let message = escape(&result.failures.join("\n"));
            xml.push_str(&format!(">\n    <failure message=\"{} failed expectation(s)\">{message}</failure>\n  </testcase>\n", result.failures.len()));
        }
    }
    xml.push_str("</testsuite>\n");
    xml
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn contains_is_recursive_and_arrays_are_positional() {
        let actual = json!({"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}});
        assert!(contains(&actual, &json!({"b": {"c": [1, {"d": 2}]}})));
        assert!(!contains(&actual, &json!({"b": {"c": [1]}})));
        assert!(!contains(&actual, &json!({"a": 2})));
        assert!(!contains(&actual, &json!({"z": null})));
    }

    #[test]
    fn junit_reports_failures_escaped() {
        let results = vec![
            CaseResult {
                file: "f.test.yaml".into(),
                line: 3,
                name: "ok".into(),
                failures: vec![],
            },
            CaseResult {
                file: "f.test.yaml".into(),
                line: 9,
                name: "bad <one>".into(),
                failures: vec!["x & y".into()],
            },
        ];
        let xml = junit(&results);
        assert!(xml.contains("tests=\"2\" failures=\"1\""));
        assert!(xml.contains("name=\"bad &lt;one&gt;\""));
        assert!(xml.contains(">x &amp; y</failure>"));
    }
}

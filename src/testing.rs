//! `ferry test`: flows unit-tested with their targets mocked, in-process, with no network.
//!
//! A test file (`*.test.yaml`, beside the flows) names a flow and lists cases: the input
//! message, what each target answers (mocks), and what must come out — the reply, what each
//! target received, the vars. Correlation records live in a scratch in-memory store per file,
//! so a case can find what an earlier case saved; nothing is left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use crate::config::Spanned;
use crate::diagnostic::Diagnostic;
use crate::engine::{Engine, Observe, Transport};
use crate::error::ServeError;
use crate::flow::{Flow, Trigger};
use crate::jsonpath::JsonPath;
use crate::message::{Message, Meta, Request};
use crate::project::Project;
use crate::store::{CorrelationWrite, Store, StoredReply};
use crate::targets::{MockAnswer, Mocks, Target};
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
    /// Flows the flow under test calls (`flow` targets, partners that take or subscribe to
    /// its messages) that run for real instead of answering as mocks: their steps run, and
    /// their own targets are mocked, named `flow/target` in `mocks` and `expect`.
    #[serde(default)]
    pub run_flows: Vec<String>,
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

impl GivenCorrelation {
    /// The record, as a step would save it.
    fn to_write(&self) -> CorrelationWrite {
        CorrelationWrite::Save {
            context: self.context.clone(),
            keys: self.keys.clone(),
            data: self.data.clone(),
            state: self.state.clone(),
        }
    }
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
    /// The JSON body; for a body of another format (a `content-type` header of HL7 v2),
    /// its text.
    #[serde(default)]
    pub body: Option<Value>,
    /// A file holding the body, relative to the test file.
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
    /// For an `mllp` target, the acknowledgement it answers: `AA` (the default), `AE`,
    /// `AR`, `CA`, `CE` or `CR`; a string `body` is the reason an `AE` or `AR` gives.
    #[serde(default)]
    pub ack: Option<String>,
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
    /// For a flow with an `mllp` trigger, the acknowledgement the message gets: `AA`
    /// (taken), `AE` (refused for what it holds) or `AR` (not taken now).
    #[serde(default)]
    pub ack: Option<String>,
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

/// Runs every case of the test file at `file` against `project`: each message goes through
/// the engine `serve` runs, with every target mocked and a scratch store.
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
    let given = tests.given.iter().map(GivenCorrelation::to_write).collect();
    store
        .correlate(given, Vec::new())
        .await
        .map_err(|e| Diagnostic::error(file, format!("given: {e}")))?;
    let known = target_names(project, flow, &tests.run_flows)
        .map_err(|problem| Diagnostic::error(file, problem).with_code("unknown-flow"))?;
    let mocks = Arc::new(Mocks::default());
    mocks.run_for_real(&flow.name, &tests.run_flows);
    let engine = Engine::new(
        project.flows.clone(),
        Transport::Mocks(Arc::clone(&mocks)),
        Some(store.clone()),
    );
    let mut results = Vec::new();
    for case in &tests.tests {
        let unknown = unknown_names(&case.value, &known, flow);
        let failures = if !unknown.is_empty() {
            unknown
        } else {
            match run_case(&engine, &mocks, flow, &case.value, file).await {
                Ok(failures) => failures,
                Err(problem) => vec![problem],
            }
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

/// The names a test of `flow` may give targets in `mocks` and `expect`: the flow's own, and
/// `flow/target` for each target of a flow in `run_flows`, which must be flows it calls.
fn target_names(
    project: &Project,
    flow: &Flow,
    run_flows: &[String],
) -> Result<Vec<String>, String> {
    let mut names: Vec<String> = flow.targets().iter().map(|t| t.name().to_owned()).collect();
    let mut callers = vec![flow];
    for name in run_flows {
        let called = callers.iter().any(|caller| {
            caller
                .targets()
                .iter()
                .any(|t| matches!(t, Target::Flow(call) if call.flow == *name))
        });
        let Some(real) = project.flow(name).filter(|_| called) else {
            return Err(format!(
                "run_flows: \"{name}\" is not a flow that {} calls",
                flow.name
            ));
        };
        names.extend(
            real.targets()
                .iter()
                .map(|t| format!("{name}/{}", t.name())),
        );
        callers.push(real);
    }
    Ok(names)
}

/// A failure for every target a case names that `known` does not hold.
fn unknown_names(case: &TestCase, known: &[String], flow: &Flow) -> Vec<String> {
    let named = case
        .mocks
        .keys()
        .map(|n| ("mocks", n))
        .chain(case.expect.targets.keys().map(|n| ("expect.targets", n)))
        .chain(
            case.expect
                .no_output_from
                .iter()
                .map(|n| ("no_output_from", n)),
        );
    named
        .filter(|(_, name)| !known.contains(name))
        .map(|(place, name)| {
            let hint = match crate::diagnostic::closest(name, known.iter().map(String::as_str)) {
                Some(best) => format!("did you mean `{best}`? "),
                None => String::new(),
            };
            format!(
                "{place} names \"{name}\", which is no target of {}: {hint}its targets: {}",
                flow.name,
                known.join(", ")
            )
        })
        .collect()
}

/// What the engine made of a message, seen by a test or `ferry run`: each step (for
/// `ferry run`'s listing), the message after its steps, and the correlation changes.
#[derive(Default)]
struct Seen {
    /// The listing `ferry run` prints, when it is for `ferry run`.
    listing: Option<String>,
    previous: Option<Value>,
    vars: Value,
    /// Whether the steps took the message.
    processed: bool,
}

impl Observe for Seen {
    fn step(&mut self, label: &str, message: &Message) {
        use std::fmt::Write as _;
        let Some(out) = &mut self.listing else { return };
        let _ = writeln!(out, "\n== {label}");
        let now = message.root();
        let mut changed = false;
        if let Some(previous) = &self.previous {
            for part in ["body", "vars"] {
                if now[part] != previous[part] {
                    let _ = writeln!(out, "{part}:\n{}", pretty(&now[part]));
                    changed = true;
                }
            }
        }
        if !changed {
            out.push_str("ok, the message is unchanged\n");
        }
        self.previous = Some(now.clone());
    }

    fn processed(&mut self, message: &Message, correlation: &[CorrelationWrite]) {
        use std::fmt::Write as _;
        self.vars = message.root()["vars"].clone();
        self.processed = true;
        let Some(out) = &mut self.listing else { return };
        for write in correlation {
            let (what, keys, data, state) = match write {
                CorrelationWrite::Save {
                    context,
                    keys,
                    data,
                    state,
                } => (format!("save {context} under"), keys, data, state),
                CorrelationWrite::Update {
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
    }
}

/// The message a case (or `ferry run`) sends `flow`, as its trigger would make it.
fn message_for(flow: &Flow, input: &Input, body: Value) -> Message {
    let headers = input.headers.clone();
    let meta = match &flow.trigger {
        Trigger::Queue(queue) => Meta::for_queue(&flow.name, &queue.spec.name, headers),
        Trigger::Mllp(mllp) => Meta::for_mllp(&flow.name, &mllp.listen, "ferry-test", &body),
        trigger => {
            let (method, mut path, secret) = match trigger {
                Trigger::Http(http) => (
                    http.method.to_string(),
                    http.path.clone(),
                    http.auth.secret_header().map(|h| h.as_str().to_owned()),
                ),
                _ => ("CALL".to_owned(), String::new(), None),
            };
            for (name, value) in &input.params {
                path = path.replace(&format!("{{{name}}}"), value);
            }
            let request = Request {
                method,
                path,
                params: input.params.clone(),
                query: input.query.clone(),
                headers: headers.into_iter().collect(),
            };
            Meta::for_http(&flow.name, request, secret.as_deref())
        }
    };
    Message::new(body, meta)
}

/// A case's body: JSON as written (or in `body_file`), or, when its `content-type` header
/// declares another format (HL7 v2), the text read the way `serve` reads a request's body;
/// `Err` inside when `serve` would refuse it. The outer error is a mistake in the test file.
fn input_body(
    input: &Input,
    file: &Path,
    flow: &Flow,
) -> Result<Result<Value, ServeError>, String> {
    let content_type = flow
        .trigger_content_type()
        .or_else(|| crate::message::content_type_of(&input.headers));
    let written = match (&input.body, &input.body_file) {
        (Some(body), None) => Written::Value(body.clone()),
        (None, Some(name)) => {
            let path = file.parent().unwrap_or(Path::new(".")).join(name);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("body_file {}: {e}", path.display()))?;
            Written::Text(text, path)
        }
        (None, None) => Written::Value(Value::Null),
        (Some(_), Some(_)) => return Err("input has both `body` and `body_file`".into()),
    };
    match (content_type, written) {
        (Some(content_type), written) if !crate::json::is_json(content_type) => {
            let text = match written {
                Written::Text(text, _) => text,
                Written::Value(Value::String(text)) => text,
                Written::Value(_) => {
                    return Err(format!(
                        "input is {content_type}: give its text as `body: |` or in `body_file`"
                    ));
                }
            };
            let max_depth = crate::json::DEFAULT_MAX_DEPTH;
            Ok(crate::json::read_body(
                content_type,
                text.as_bytes(),
                max_depth,
            ))
        }
        (_, Written::Value(body)) => Ok(Ok(body)),
        (_, Written::Text(text, path)) => serde_json::from_str(&text)
            .map(Ok)
            .map_err(|e| format!("body_file {}: {e}", path.display())),
    }
}

/// A case's body as the test file gives it.
enum Written {
    Value(Value),
    Text(String, PathBuf),
}

/// What a caller is answered, as status and body.
fn answered(reply: Result<StoredReply, ServeError>) -> (u16, Value) {
    match reply {
        Ok(reply) => (reply.status, reply.body),
        Err(error) => (error.status().as_u16(), error.body()),
    }
}

/// Handles `message` as `serve` would, then makes its durable deliveries at once. Returns
/// the answer, and the message's vars after its steps and its target's captures.
async fn run_message(
    engine: &Engine,
    flow: &Flow,
    message: Message,
    seen: &mut Seen,
) -> (u16, Value) {
    let id = message.id().to_owned();
    let reply = answered(engine.handle_observed(flow, message, Some(seen)).await);
    if let Some(delivered) = crate::delivery::deliver_now(engine, flow, &id).await {
        seen.vars = delivered.root()["vars"].clone();
    }
    reply
}

async fn run_case(
    engine: &Engine,
    mocks: &Mocks,
    flow: &Flow,
    case: &TestCase,
    file: &Path,
) -> Result<Vec<String>, String> {
    let body = input_body(&case.input, file, flow)?;
    mocks.answer(
        case.mocks
            .iter()
            .map(|(name, mock)| {
                let ack = match mock.ack.as_deref() {
                    Some(code) => Some(crate::mllp::AckCode::parse(code).ok_or_else(|| {
                        format!("mock \"{name}\": ack \"{code}\" is none of AA, AE, AR, CA, CE, CR")
                    })?),
                    None => None,
                };
                let answer = MockAnswer {
                    status: mock.status,
                    body: mock.body.clone(),
                    fail: mock.fail.clone(),
                    ack,
                };
                Ok((name.clone(), answer))
            })
            .collect::<Result<_, String>>()?,
    );
    mocks.take_received();
    let mut seen = Seen::default();
    let reply = match body {
        Ok(body) => {
            let message = message_for(flow, &case.input, body);
            run_message(engine, flow, message, &mut seen).await
        }
        // Refused before any step, as `serve` refuses it.
        Err(refused) => answered(Err(refused)),
    };
    let outputs = mocks.take_received();

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
    if let Some(expected) = &case.expect.ack {
        let reply = StoredReply {
            status: reply.0,
            headers: Vec::new(),
            body: reply.1.clone(),
        };
        let (code, refusal) = crate::mllp::verdict(&Ok(reply));
        let got = code.code(false);
        if got != expected {
            let why = refusal
                .map(|r| format!(" ({})", r.text))
                .unwrap_or_default();
            failures.push(format!("ack is {got}{why}, expected {expected}"));
        }
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
        if let Some(got) = outputs.get(target) {
            failures.push(format!(
                "target \"{target}\" received {}, but should have received nothing",
                got.body
            ));
        }
    }
    for (name, expected) in &case.expect.vars {
        let actual = &seen.vars[name];
        if !contains(actual, expected) {
            failures.push(format!("var \"{name}\" is {actual}, expected {expected}"));
        }
    }
    Ok(failures)
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

/// What `ferry run` made of a message.
#[derive(Debug)]
pub struct RunReport {
    /// Each step's output, the correlation changes, what the targets get, and the reply.
    pub listing: String,
    /// Whether the message was refused (the reply is 4xx or 5xx).
    pub refused: bool,
}

/// Runs one message through `flow` for `ferry run`, and describes each step's output, the
/// correlation changes, what the target gets, and the reply. It goes through the same engine
/// as `serve`, on a scratch store holding `given`; targets are mocked (answering `200 {}`)
/// unless `live`, when they are really called.
pub async fn trace(
    project: &Project,
    flow: &Flow,
    body: Value,
    headers: &BTreeMap<String, String>,
    given: &[GivenCorrelation],
    live: bool,
) -> RunReport {
    use std::fmt::Write as _;
    let input = Input {
        headers: headers.clone(),
        ..Input::default()
    };
    let message = message_for(flow, &input, body);
    let mut seen = Seen {
        listing: Some(format!("== input\n{}\n", pretty(message.root()))),
        previous: Some(message.root().clone()),
        ..Seen::default()
    };
    let refused = |listing: Option<String>, why: String| RunReport {
        listing: listing.unwrap_or_default() + &why,
        refused: true,
    };
    let Ok(store) = Store::open("sqlite::memory:").await else {
        return refused(seen.listing, "cannot open a scratch store\n".into());
    };
    if let Err(error) = store
        .correlate(
            given.iter().map(GivenCorrelation::to_write).collect(),
            Vec::new(),
        )
        .await
    {
        return refused(seen.listing, format!("given: {error}\n"));
    }
    let mocks = Arc::new(Mocks::default());
    mocks.run_for_real(&flow.name, &[]);
    let transport = match (live, crate::targets::http_client()) {
        (true, Ok(client)) => Transport::Network(client),
        _ => Transport::Mocks(Arc::clone(&mocks)),
    };
    let engine = Engine::new(project.flows.clone(), transport, Some(store.clone()));
    let (status, reply) = run_message(&engine, flow, message, &mut seen).await;
    let mut out = seen.listing.unwrap_or_default();
    if !seen.processed {
        let _ = writeln!(out, "\n== refused: {status}\n{}", pretty(&reply));
        store.close().await;
        return RunReport {
            listing: out,
            refused: true,
        };
    }
    for (name, received) in mocks.take_received() {
        let kind = match flow.targets().iter().find(|t| t.name() == name) {
            Some(Target::Http(_)) => "http",
            Some(Target::Queue(_)) => "queue",
            Some(Target::Mllp(_)) => "mllp",
            _ => "flow",
        };
        let _ = writeln!(out, "\n== target \"{name}\" ({kind}) would get (mocked)");
        for (header, value) in &received.headers {
            let _ = writeln!(out, "{header}: {value}");
        }
        let _ = writeln!(out, "{}", pretty(&received.body));
    }
    let _ = writeln!(out, "\n== reply {status}\n{}", pretty(&reply));
    store.close().await;
    RunReport {
        listing: out,
        refused: status >= 400,
    }
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

//! `ferry check` (every problem in every file, each at its file:line:column) and `ferry test`
//! (flows unit-tested with mocked targets), with their exit codes.

use std::process::Command;

use crate::util::process::succeeded;
use crate::util::repo;

/// `ferry` with `args` and the feature flows' target URLs pointing nowhere.
fn ferry_on_features(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .current_dir(repo())
        .envs(
            ["NORTH_URL", "METALS_URL", "SOUTH_URL", "SINK_URL"].map(|n| (n, "http://127.0.0.1:9")),
        )
        .output()
        .unwrap()
}

fn ferry(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .current_dir(repo())
        .env_remove("FERRY_CHECK_UNSET_URL")
        .env_remove("FERRY_CHECK_UNSET_KEY")
        .env_remove("FERRY_CHECK_UNSET_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn broken_flows_report_every_problem_at_its_location() {
    let output = ferry(&["check", "tests/fixtures/check/broken/flows"]);
    assert_eq!(output.status.code(), Some(1));
    let expected =
        std::fs::read_to_string(repo().join("tests/fixtures/check/broken/expected.stderr"))
            .unwrap();
    assert_eq_text!(expected, String::from_utf8_lossy(&output.stderr));
}

#[test]
fn a_misspelt_schema_file_gets_the_file_meant() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("typo.yaml"),
        "name: typo\ntrigger:\n  http: { method: POST, path: /typo, auth: none }\nsteps:\n  - validate: { schema: test-requst.schema.json }\n",
    )
    .unwrap();
    let flows = dir.path().to_str().unwrap();
    let output = ferry(&["check", flows, "--schemas", "schemas"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("= help: did you mean `test-request.schema.json`?"),
        "{stderr}"
    );
}

#[test]
fn every_structural_mistake_of_a_file_is_reported_in_one_run() {
    let output = ferry(&[
        "check",
        "--format",
        "json",
        "tests/fixtures/check/broken/flows/u-many-mistakes.yaml",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let found: Vec<(String, u64, String)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .map(|d| {
            (
                d["code"].as_str().unwrap().to_owned(),
                d["line"].as_u64().unwrap(),
                d["hint"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    // The five, and what the later phases find in the rest of the file.
    let expected = [
        ("unknown-key", 4, "description"),
        ("unknown-key", 6, "max_body"),
        ("unknown-kind", 8, "transform"),
        ("schema", 10, "order-in.schema.json"),
        ("unknown-key", 13, "timeout"),
        ("unknown-key", 15, "retry"),
    ]
    .map(|(code, line, meant)| (code.to_owned(), line, format!("did you mean `{meant}`?")));
    assert_eq!(found, expected);
}

#[test]
fn a_missing_file_gets_the_file_meant() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["partner-ca.pem", "server.crt", "server.key"] {
        std::fs::write(dir.path().join(file), "not used").unwrap();
    }
    std::fs::write(
        dir.path().join("calls.yaml"),
        "name: calls\ntrigger:\n  http: { method: POST, path: /calls, auth: none }\ntargets:\n  partner:\n    http:\n      url: https://partner.example/in\n      tls: { ca_file: partner-ca.pme }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("listens.yaml"),
        "name: listens\ntrigger:\n  mllp:\n    listen: 127.0.0.1:0\n    tls: { cert_file: server.cert, key_file: server.key }\ntargets:\n  partner:\n    http: { url: https://partner.example/in }\n",
    )
    .unwrap();
    let output = ferry(&[
        "check",
        "--format",
        "json",
        &dir.path().display().to_string(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let found: Vec<(String, String)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .map(|d| {
            (
                d["code"].as_str().unwrap().to_owned(),
                d["hint"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            (
                "missing-file".to_owned(),
                "did you mean `partner-ca.pem`?".to_owned()
            ),
            (
                "missing-file".to_owned(),
                "did you mean `server.crt`?".to_owned()
            ),
        ]
    );
}

/// The OpenAPI document `ferry openapi` prints for `folders`, as JSON.
fn openapi_of(folders: &[&str]) -> serde_json::Value {
    let mut args = vec!["openapi", "--format", "json"];
    args.extend_from_slice(folders);
    serde_json::from_str(&succeeded(&ferry(&args))).unwrap()
}

/// Every way `document` breaks the official OpenAPI 3.1 schema.
fn openapi_violations(document: &serde_json::Value) -> Vec<String> {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/openapi/oas-3.1.schema.json"))
            .unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    validator
        .iter_errors(document)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn the_openapi_document_describes_each_endpoint_and_is_valid_openapi_3_1() {
    let document = openapi_of(&[
        "flows",
        "examples/second-lab/flows",
        "examples/fhir-lab/flows",
        "examples/hl7-lab/flows",
    ]);
    assert_eq!(openapi_violations(&document), Vec::<String>::new());
    let submit = &document["paths"]["/api/v1/test-requests"]["post"];
    assert_eq!(submit["operationId"], "portal-to-lab");
    assert_eq!(
        submit["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/test-request"
    );
    assert!(submit["responses"]["202"].is_object(), "{submit}");
    assert_eq!(
        submit["responses"]["422"]["$ref"],
        "#/components/responses/Unprocessable"
    );
    assert_eq!(submit["security"][0].as_object().unwrap().len(), 1);
    // A schema's references to another file point into the document, and that file is in it.
    let schemas = &document["components"]["schemas"];
    let text = schemas["test-request"].to_string();
    assert!(
        text.contains("\"#/components/schemas/common/$defs/"),
        "{text}"
    );
    assert!(schemas["common"].is_object());
    // Each kind of auth is a security scheme.
    let schemes = document["components"]["securitySchemes"]
        .as_object()
        .unwrap();
    assert!(schemes.contains_key("standard_webhooks"), "{schemes:?}");
    assert!(schemes.contains_key("api_key_x-api-key"), "{schemes:?}");
    assert!(
        schemes.contains_key("api_key_x-meridian-key"),
        "{schemes:?}"
    );
    // A status endpoint's path parameter; MLLP triggers are no HTTP endpoints.
    let status = &document["paths"]["/api/v1/test-requests/{request_id}"]["get"];
    assert_eq!(status["parameters"][0]["name"], "request_id");
    assert_eq!(document["paths"].as_object().unwrap().len(), 5);
}

#[tokio::test]
async fn serve_openapi_serves_the_document_of_the_flows_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let (child, url) = crate::util::process::spawn_on(
        &store,
        &["--flows", "flows", "--openapi"],
        &[],
        std::process::Stdio::null(),
    );
    let served: serde_json::Value = reqwest::get(format!("{url}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, openapi_of(&["flows"]));
    crate::util::process::terminate(child).await;
}

#[test]
fn the_shipped_flows_openapi_document_is_checked_in_and_current() {
    let output = ferry(&["openapi", "flows"]);
    let current = succeeded(&output);
    let path = repo().join("docs/openapi.yaml");
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        shipped == current,
        "docs/openapi.yaml is stale: run `FERRY_BLESS=1 cargo test --test integration openapi`"
    );
}

#[test]
fn json_output_has_one_object_per_diagnostic() {
    let output = ferry(&[
        "check",
        "--format",
        "json",
        "tests/fixtures/check/broken/flows",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 54, "a corpus of 54 distinct mistakes");
    let unknown_key = lines.iter().find(|d| d["code"] == "unknown-key").unwrap();
    assert_eq!(
        unknown_key,
        &serde_json::json!({
            "file": "tests/fixtures/check/broken/flows/b-unknown-key.yaml",
            "line": 5, "column": 5, "severity": "error", "code": "unknown-key",
            "message": "unknown field `pathh`, expected one of method, path, max_body, idempotency_key, auth, rate_limit, max_depth",
            "flow": null, "context": null, "hint": "did you mean `path`?",
        })
    );
    for code in [
        "yaml-syntax",
        "missing-key",
        "schema",
        "jsonpath",
        "template",
        "unknown-target",
        "environment",
        "route-collision",
        "listen-collision",
        "call-cycle",
        "unknown-flow",
        "unknown-key",
        "unknown-kind",
        "invalid-value",
        "duplicate-name",
        "example",
        "unreachable-route",
        "undeclared-field",
        "auth-missing",
        "ssrf",
        "secret-unset",
        "file-escape",
        "jwt",
    ] {
        assert!(
            lines.iter().any(|d| d["code"] == code),
            "no {code} diagnostic"
        );
    }
}

#[test]
fn the_shipped_flows_are_clean() {
    let output = ferry(&["check", "flows"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "3 flow(s) ok\n");
    let features = ferry(&["check", "tests/fixtures/features/flows"]);
    // The feature flows need their partners' URLs; without them, check says so and fails.
    assert_eq!(features.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&features.stderr).contains("NORTH_URL is not set"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(ferry(&["frobnicate"]).status.code(), Some(2));
    // A folder that cannot be read is an I/O error, not a problem in a flow.
    let missing = ferry(&["check", "no/such/folder"]);
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.starts_with("error[io]: cannot read flows folder"),
        "{stderr}"
    );
    assert!(stderr.contains("--> no/such/folder"), "{stderr}");
}

/// `ferry check` of the flows in `dir` (with the shipped schemas), with `args` and `env`.
fn check_folder(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["check", "--schemas", "schemas"])
        .args(args)
        .arg(dir)
        .current_dir(repo())
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn check_never_prints_a_value_from_the_environment() {
    // A JSONPath and a URL built from variables, both broken: the errors quote them, and
    // must show the variables, not their values (CI runs `check` with secrets set).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("leaky.yaml"),
        r#"name: leaky
trigger:
  http:
    method: POST
    path: /leaky
    auth: none
steps:
  - set:
      x: "$.body[${CHECK_SECRET_PATH}"
targets:
  partner:
    http:
      url: "ftp://${CHECK_SECRET_HOST}/x"
"#,
    )
    .unwrap();
    let env = [
        ("CHECK_SECRET_PATH", "'sk-live-path-secret'"),
        ("CHECK_SECRET_HOST", "host-secret-value.example"),
    ];
    let output = check_folder(dir.path(), &["--format", "text"], &env);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("${CHECK_SECRET_PATH}"), "{stderr}");
    assert!(stderr.contains("${CHECK_SECRET_HOST}"), "{stderr}");
    for secret in ["sk-live-path-secret", "host-secret-value"] {
        assert!(!stderr.contains(secret), "{secret} shown:\n{stderr}");
    }
    let json = check_folder(dir.path(), &["--format", "json"], &env);
    let stdout = String::from_utf8_lossy(&json.stdout);
    assert!(stdout.contains("CHECK_SECRET_PATH"), "{stdout}");
    assert!(!stdout.contains("sk-live-path-secret"), "{stdout}");
}

#[test]
fn check_warns_of_a_retry_budget_that_ends_within_minutes_and_refuses_a_broken_whsec() {
    let dir = tempfile::tempdir().unwrap();
    let flow = |name: &str, retry: &str| {
        format!(
            r#"name: {name}
trigger:
  http:
    method: POST
    path: /{name}
    auth:
      webhook_signature:
        from_env: [CHECK_WHSEC]
targets:
  partner:
    http:
      url: http://partner.example/x
delivery:
  retry: {retry}
"#
        )
    };
    std::fs::write(
        dir.path().join("short.yaml"),
        flow("short", "{ attempts: 12 }"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("long.yaml"),
        flow("long", "{ attempts: 1000, for: 72h }"),
    )
    .unwrap();
    let check = |secret: &str| check_folder(dir.path(), &[], &[("CHECK_WHSEC", secret)]);
    let output = check("whsec_c2lnbmluZy1zZWNyZXQ=");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    // Twelve attempts of at most 500 ms, 1 s, 2 s, … capped at 5 min end within 18 minutes.
    assert_eq!(
        stderr.matches("warning[retry-budget]").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("short.yaml"), "{stderr}");
    assert!(stderr.contains("for: 72h"), "{stderr}");

    let output = check("whsec_not*base64!");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error[secret-invalid]"), "{stderr}");
    assert!(!stderr.contains("not*base64"), "{stderr}");
}

#[test]
fn a_sync_flows_on_failed_and_idempotency_key_are_reported_as_never_applying() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sync.yaml"),
        "name: sync\ntrigger:\n  http: { method: POST, path: /sync, auth: none, idempotency_key: $.body.ref }\ntargets:\n  partner:\n    http: { url: http://partner.example/x }\ndelivery:\n  mode: sync\n  on_delivered: { state: sent }\n  on_failed:\n    state: failed\n",
    )
    .unwrap();
    let output = check_folder(dir.path(), &[], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.matches("warning[sync-on-failed]").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("sync.yaml:11:12"), "{stderr}");
    assert_eq!(
        stderr.matches("warning[sync-idempotency]").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("sync.yaml:3:67"), "{stderr}");
}

#[test]
fn template_mistakes_are_reported_at_their_own_line_with_what_to_write() {
    let output = ferry(&["check", "tests/fixtures/check/templates/flows"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for (line, message, help) in [
        (11, "unknown helper `uper`", "did you mean `upper`?"),
        (
            12,
            "`upper` takes 1 argument(s), not 2",
            "write `{{upper TEXT}}`",
        ),
        (
            13,
            "no table \"priorty\" in this flow",
            "did you mean \"priority\"?",
        ),
        (17, "reads `smaple`", "did you mean `sample`?"),
        (18, "`$eachh` is not a construct", "did you mean `$each`?"),
        (19, "\"Mars/Base\" is not a time zone", "datetime"),
    ] {
        let at = format!("--> tests/fixtures/check/templates/flows/mistakes.yaml:{line}:");
        let block = stderr
            .split("\n\n")
            .find(|b| b.contains(&at))
            .unwrap_or_else(|| panic!("nothing at line {line}:\n{stderr}"));
        assert!(block.contains(message), "line {line}: {block}");
        assert!(block.contains(help), "line {line}: {block}");
    }
    for (line, message) in [
        (
            10,
            "`$each` goes over `body.ref`, which order.schema.json says is string, not an array",
        ),
        (
            15,
            "reads `body.samples[].sampel_id`, which order.schema.json does not declare",
        ),
        (16, "reads `body.reff`"),
        (16, "reads `body.samples.matrx`"),
    ] {
        let at = format!("--> tests/fixtures/check/templates/flows/reads.yaml:{line}:");
        assert!(
            stderr
                .split("\n\n")
                .any(|b| b.contains(&at) && b.contains(message)),
            "{message} at line {line}:\n{stderr}"
        );
    }
    // Inside a Handlebars block of a text template too.
    assert!(
        stderr
            .split("\n\n")
            .any(|b| b.contains("text-reads.yaml:10:")
                && b.contains("reads `body.samples[].sampel_id`")
                && b.contains("did you mean `sample_id`?")),
        "{stderr}"
    );
}

#[test]
fn every_shipped_flow_and_example_matches_the_flow_schema() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("schemas/flow.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut files = Vec::new();
    for folder in [
        "flows",
        "examples/lab-results-amqp/flows",
        "examples/second-lab/flows",
        "examples/layered/flows",
        "examples/mapping-cases/flows",
        "examples/hl7-lab/flows",
        "examples/fhir-lab/flows",
    ] {
        for entry in std::fs::read_dir(repo().join(folder)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.to_string_lossy();
            if name.ends_with(".yaml") && !name.ends_with(".test.yaml") {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 8);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema="),
            "{} has no schema modeline",
            file.display()
        );
        let flow: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&flow)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
    }
}

#[test]
fn ferry_test_passes_the_shipped_flows_and_examples() {
    let output = ferry(&[
        "test",
        "flows",
        "examples/lab-results-amqp/flows",
        "examples/second-lab/flows",
        "examples/layered/flows",
        "examples/mapping-cases/flows",
        "examples/billing/flows",
        "examples/hl7-lab/flows",
        "examples/fhir-lab/flows",
    ]);
    let stdout = succeeded(&output);
    assert!(
        stdout.contains("running 43 tests from 27 file(s)"),
        "{stdout}"
    );
    assert!(
        stdout
            .trim_end()
            .ends_with("test result: ok. 43 passed; 0 failed"),
        "{stdout}"
    );
}

#[test]
fn ferry_test_reports_a_failure_at_its_line_with_the_difference() {
    let output = ferry(&[
        "test",
        "tests/fixtures/flow-tests/flows",
        "--schemas",
        "schemas",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("test passes ... ok"), "{stdout}");
    assert!(
        stdout.contains("test expects the wrong state ... FAILED"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "expects the wrong state [tests/fixtures/flow-tests/flows/status.test.yaml:13]:"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"status\": \"accepted\""),
        "the actual body is shown: {stdout}"
    );
    // A wrong transform is caught, with what the target really got.
    assert!(
        stdout.contains("test the lab gets the customer's name ... FAILED"),
        "{stdout}"
    );
    assert!(stdout.contains("target \"lab\": body differs"), "{stdout}");
    assert!(stdout.contains("\"name\": \"C-1\""), "{stdout}");
    assert!(
        stdout
            .trim_end()
            .ends_with("test result: FAILED. 1 passed; 2 failed"),
        "{stdout}"
    );

    let junit = ferry(&[
        "test",
        "tests/fixtures/flow-tests/flows",
        "--schemas",
        "schemas",
        "--format",
        "junit",
    ]);
    let xml = String::from_utf8_lossy(&junit.stdout);
    assert!(
        xml.contains("<testsuite name=\"ferry\" tests=\"3\" failures=\"2\">"),
        "{xml}"
    );
    assert!(
        xml.contains("<failure message=\"1 failed expectation(s)\">"),
        "{xml}"
    );
}

#[test]
fn ferry_test_reads_hl7_bodies_as_serve_does() {
    let output = ferry_on_features(&[
        "test",
        "tests/fixtures/features/flows",
        "--schemas",
        "tests/fixtures/features/schemas",
    ]);
    let stdout = succeeded(&output);
    assert!(
        stdout
            .trim_end()
            .ends_with("test result: ok. 3 passed; 0 failed"),
        "{stdout}"
    );
}

#[test]
fn ferry_test_refuses_what_serve_refuses() {
    // One path: the flow test goes through the same handling as `serve`, so a destination
    // `serve` answers 422 for cannot pass as accepted.
    let output = ferry(&["test", "tests/fixtures/one-path/flows"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("reply: status 422, expected 202"),
        "{stdout}"
    );
    assert!(stdout.contains("evil.example"), "{stdout}");
    assert!(stdout.contains("is not in allow_hosts"), "{stdout}");
}

#[test]
fn ferry_run_shows_each_step_the_target_request_and_the_reply() {
    let output = ferry(&[
        "run",
        "portal-to-lab",
        "--input",
        "tests/fixtures/payloads/test-request.json",
        "--header",
        "X-Correlation-Id: run-1",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let order = [
        "== input",
        "== step 1 (validate)\nok, the message is unchanged",
        "== step 3 (set)\nvars:",
        "== step 5 (transform)\nbody:",
        "== correlation: save test-request under",
        "== target \"lab\" (http) would get (mocked)\ncontent-type: application/json",
        "x-correlation-id: run-1",
        "== reply 202",
    ];
    let mut from = 0;
    for part in order {
        let at = stdout[from..]
            .find(part)
            .unwrap_or_else(|| panic!("{part:?} missing or out of order in\n{stdout}"));
        from += at + part.len();
    }
    let refused = ferry(&[
        "run",
        "portal-to-lab",
        "--input",
        "tests/fixtures/payloads/test-result.json",
    ]);
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert!(stdout.contains("== refused: 422"), "{stdout}");
}

#[test]
fn ferry_run_reads_an_hl7_body_by_its_content_type() {
    let run = |content_type: &str| {
        ferry_on_features(&[
            "run",
            "hl7-results",
            "--flows",
            "tests/fixtures/features/flows",
            "--schemas",
            "tests/fixtures/features/schemas",
            "--input",
            "tests/fixtures/features/flows/oru-r01.hl7",
            "--header",
            &format!("Content-Type: {content_type}"),
        ])
    };
    let stdout = succeeded(&run("x-application/hl7-v2+er7"));
    assert!(
        stdout.contains("\"portal_ref\": \"PR-2026-0417\""),
        "{stdout}"
    );
    // Without the content type it is no JSON, and `run` says so.
    let output = run("application/json");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("oru-r01.hl7 is not a body ferry reads"),
        "{stderr}"
    );
}

#[test]
fn the_deploy_files_parse_and_name_metrics_ferry_has() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let alerts: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("deploy/alerts.yaml")).unwrap(),
    )
    .unwrap();
    let known = [
        "ferry_messages_received_total",
        "ferry_messages_rejected_total",
        "ferry_deliveries_total",
        "ferry_delivery_attempt_duration_seconds_bucket",
        "ferry_outbox_pending",
        "ferry_outbox_oldest_age_seconds",
        "ferry_step_duration_seconds_bucket",
        "ferry_store_commit_duration_seconds_bucket",
        "ferry_queue_depth",
        "ferry_queue_consumer_lag",
        "ferry_requests_shed_total",
    ];
    let mut expressions: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["targets"][0]["expr"].as_str().unwrap().to_owned())
        .collect();
    expressions.extend(
        alerts["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["expr"].as_str().unwrap().to_owned()),
    );
    assert!(expressions.len() >= 12);
    for expression in expressions {
        let names = expression
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("ferry_"));
        for name in names {
            assert!(
                known.contains(&name),
                "{name} in {expression:?} is not a ferry metric"
            );
        }
    }
}

/// `deploy/kubernetes/flows.yaml` as the shipped flows and schemas make it: two ConfigMaps,
/// one file each (flow tests and the editors' flow schema left out).
fn flows_config_maps() -> String {
    let mut text = String::from(
        "# The shipped flows and schemas as ConfigMaps, for deploy/kubernetes/ferry.yaml.\n\
         # Generated from flows/ and schemas/: FERRY_BLESS=1 cargo test kubernetes rewrites it.\n",
    );
    for (name, folder, keep) in [
        (
            "ferry-flows",
            "flows",
            (|f: &str| f.ends_with(".yaml") && !f.ends_with(".test.yaml")) as fn(&str) -> bool,
        ),
        ("ferry-schemas", "schemas", |f: &str| {
            f.ends_with(".json") && f != "flow.schema.json"
        }),
    ] {
        let mut files: Vec<String> = std::fs::read_dir(repo().join(folder))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| keep(f))
            .collect();
        files.sort();
        text +=
            &format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n");
        for file in files {
            text += &format!("  {file}: |\n");
            for line in std::fs::read_to_string(repo().join(folder).join(&file))
                .unwrap()
                .lines()
            {
                text += &if line.is_empty() {
                    "\n".to_owned()
                } else {
                    format!("    {line}\n")
                };
            }
        }
    }
    text
}

#[test]
fn the_kubernetes_config_maps_hold_the_shipped_flows_as_they_are() {
    let path = repo().join("deploy/kubernetes/flows.yaml");
    let expected = flows_config_maps();
    if std::env::var_os("FERRY_BLESS").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "deploy/kubernetes/flows.yaml is stale: run FERRY_BLESS=1 cargo test kubernetes"
    );
    // Each ConfigMap parses, and holds each file exactly.
    for document in actual.split("\n---\n").skip(1) {
        let map: serde_json::Value = serde_saphyr::from_str(document).unwrap();
        let folder = if map["metadata"]["name"] == "ferry-flows" {
            "flows"
        } else {
            "schemas"
        };
        for (file, content) in map["data"].as_object().unwrap() {
            let on_disk = std::fs::read_to_string(repo().join(folder).join(file)).unwrap();
            assert_eq!(content.as_str().unwrap(), on_disk, "{file}");
        }
    }
    let manifests = std::fs::read_to_string(repo().join("deploy/kubernetes/ferry.yaml")).unwrap();
    for document in manifests.split("\n---\n") {
        let _: serde_json::Value = serde_saphyr::from_str(document).unwrap();
    }
    assert!(manifests.contains("path: /readyz") && manifests.contains("path: /healthz"));
}

#[test]
fn partner_claims_are_checked_at_the_partners_line() {
    let output = ferry(&["check", "flows", "tests/fixtures/claims"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for expected in [
        // Two partners claiming the same messages.
        "error[claim-conflict]: helix2-order takes the same messages of portal-to-lab as helix-order (tests/fixtures/claims/helix.yaml:3)\n --> tests/fixtures/claims/helix2.yaml:4:19",
        // A claim on a flow that does not exist.
        "error[unknown-flow]: unknown flow \"portal-to-lbb\"\n --> tests/fixtures/claims/helix2.yaml:5:11",
        "did you mean `portal-to-lab`?",
        // Claims that can never match: a field the body does not have where the flow
        // routes, and a value its schema refuses.
        "error[never-matches]: this can never match: where the message is read, its body is test-request.schema.json, which declares no `labb` (did you mean `lab`?)\n --> tests/fixtures/claims/never.yaml:4:19",
        "error[never-matches]: this can never match: portal-result.schema.json does not allow 7 at $.body.status\n --> tests/fixtures/claims/never.yaml:6:19",
    ] {
        assert!(stderr.contains(expected), "{expected}\nnot in\n{stderr}");
    }
    assert!(stderr.contains("4 error(s)"), "{stderr}");
}

#[test]
fn ferry_test_refuses_expectations_about_targets_that_do_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo().join("flows/portal-to-lab.test.yaml")).unwrap();
    std::fs::write(
        dir.path().join("portal-to-lab.test.yaml"),
        shipped.replacen("no_output_from: [lab]", "no_output_from: [labb]", 1),
    )
    .unwrap();
    // A folder of tests alone, for flows kept in another folder.
    let tests = dir.path().display().to_string();
    let output = ferry(&["test", "flows", &tests]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("no_output_from names \"labb\", which is no target of portal-to-lab: did you mean `lab`?"),
        "{stdout}"
    );
    std::fs::write(dir.path().join("portal-to-lab.test.yaml"), shipped).unwrap();
    let output = ferry(&["test", "flows", &tests]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn ferry_run_takes_given_records_a_flow_file_and_exits_1_when_refused() {
    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("result.json");
    std::fs::write(
        &result,
        r#"{"order_ref": "req-1", "lab_order_id": "L-1", "status": "completed",
            "completed_at": "2026-11-22T15:04:05Z", "results": []}"#,
    )
    .unwrap();
    let given = dir.path().join("given.yaml");
    std::fs::write(
        &given,
        "- context: test-request\n  keys: [req-1]\n  data: { portal_ref: PR-1 }\n",
    )
    .unwrap();
    let (result, given) = (result.display().to_string(), given.display().to_string());

    // Before the request exists, the results are refused: exit 1.
    let refused = ferry(&["run", "lab-to-portal", "--input", &result]);
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(refused.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("== refused: 404"), "{stdout}");

    // With the record given, they reach the portal.
    let taken = ferry(&[
        "run",
        "flows/lab-to-portal.yaml",
        "--input",
        &result,
        "--given",
        &given,
    ]);
    let stdout = String::from_utf8_lossy(&taken.stdout);
    assert_eq!(taken.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("== target \"portal\" (http) would get (mocked)"),
        "{stdout}"
    );
    assert!(stdout.contains("\"portal_ref\": \"PR-1\""), "{stdout}");

    // A flow file outside the flows folders is loaded with them.
    let billing = ferry(&[
        "run",
        "examples/billing/flows/billing-results.yaml",
        "--input",
        &result,
    ]);
    let stdout = String::from_utf8_lossy(&billing.stdout);
    assert_eq!(billing.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("== target \"billing\" (http) would get (mocked)"),
        "{stdout}"
    );
}

//! The `ferry` binary: `serve` with the shipped flows, a crash that loses nothing, and the
//! operator commands `trace` and `dlq` against the running server.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::json;

use crate::util::process::{
    TOKEN, json_lines, spawn_on, spawn_on_one_cpu, stderr_lines, succeeded, terminate, thread_names,
};
use crate::util::{Partner, SECRETS, payload, post_json, repo, wait_for_state, wait_until};

/// Starts `ferry serve` on an ephemeral port with the shipped flows and a store in `dir`.
fn spawn_ferry(dir: &Path, lab: &Partner) -> (Child, String) {
    spawn_serving(dir, "flows", &[("LAB_URL", &lab.url)])
}

/// Starts `ferry serve` on an ephemeral port with the flows of `flows`, `env`, and a store
/// in `dir`.
fn spawn_serving(dir: &Path, flows: &str, env: &[(&str, &str)]) -> (Child, String) {
    spawn_with(dir, &["--flows", flows], env, Stdio::null())
}

/// Starts `ferry serve` on an ephemeral port with a store in `dir`, more `args`, `env`, and
/// stderr going to `stderr`; returns the process and its URL.
fn spawn_with(dir: &Path, args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> (Child, String) {
    let store = format!("sqlite://{}/ferry.db", dir.display());
    spawn_on(&store, args, env, stderr)
}

/// Runs an operator command against the ferry at `url`.
fn operate(url: &str, args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_ADMIN_URL", url)
        .env("FERRY_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn serve_runs_the_shipped_flows_and_stops_on_sigterm() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-1"})).await;
    let dir = tempfile::tempdir().unwrap();
    let (child, url) = spawn_ferry(dir.path(), &lab);
    let (status, reply) = post_json(
        &format!("{url}/api/v1/test-requests"),
        &payload("test-request.json"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    wait_until("the lab has the order", || lab.accepted().len() == 1).await;
    terminate(child).await;
}

/// Allowed one CPU, ferry runs on one thread, not a pool of one worker: the round trip works
/// there, both ways, under concurrent requests, and SIGTERM stops it.
#[tokio::test]
async fn serve_on_one_cpu_runs_the_round_trip_on_one_thread() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-ONE"})).await;
    let portal = Partner::start(200, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let env = [("LAB_URL", lab.url.as_str()), ("PORTAL_URL", &portal.url)];
    let (child, url) = spawn_on_one_cpu(&store, &["--flows", "flows"], &env);
    let threads = thread_names(child.id());
    assert!(
        !threads
            .iter()
            .any(|name| name.starts_with("tokio-rt-worker")),
        "{threads:?}"
    );

    let mut sent = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut request = payload("test-request.json");
        request["portal_ref"] = json!(format!("PR-ONE-{i}"));
        let orders = format!("{url}/api/v1/test-requests");
        sent.spawn(async move { post_json(&orders, &request).await });
    }
    let mut ids = BTreeSet::new();
    while let Some(answer) = sent.join_next().await {
        let (status, reply) = answer.unwrap();
        assert_eq!(status, 202, "{reply}");
        ids.insert(reply["request_id"].as_str().unwrap().to_owned());
    }
    wait_until("the lab has every order", || {
        lab.idempotency_keys().len() == 20
    })
    .await;
    let one = ids.first().unwrap();
    wait_for_state(&url, one, "delivered_to_lab").await;

    let mut result = payload("test-result.json");
    result["order_ref"] = json!(one);
    let (status, reply) = post_json(&format!("{url}/api/v1/lab-results"), &result).await;
    assert_eq!(status, 202, "{reply}");
    wait_until("the portal has the results", || {
        portal.received().len() == 1
    })
    .await;
    assert_eq!(portal.received()[0].json()["request_id"], one.as_str());
    terminate(child).await;
}

#[tokio::test]
async fn serve_handles_signals_sent_as_soon_as_it_says_it_listens() {
    // Supervisors may reload or stop a replica the moment it has started: the handlers must
    // already be in place when the listening line appears, or the signal's default action
    // (for SIGHUP as for SIGTERM) kills ferry.
    let lab = Partner::start(201, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    for reload_first in [false, true, false, true, false, true] {
        let (child, _) = spawn_ferry(dir.path(), &lab);
        if reload_first {
            let sent = Command::new("kill")
                .args(["-HUP", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
        }
        terminate(child).await;
    }
}

#[tokio::test]
async fn a_killed_ferry_loses_nothing_it_accepted() {
    let lab = Partner::start(503, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = spawn_ferry(dir.path(), &lab);
    let mut ids = BTreeSet::new();
    for i in 0..50 {
        let mut request = payload("test-request.json");
        request["portal_ref"] = json!(format!("PR-CRASH-{i}"));
        let (status, reply) = post_json(&format!("{url}/api/v1/test-requests"), &request).await;
        assert_eq!(status, 202, "{reply}");
        ids.insert(reply["request_id"].as_str().unwrap().to_owned());
    }
    wait_until("the lab refused some orders", || lab.received().len() >= 10).await;
    child.kill().unwrap(); // SIGKILL: no shutdown, deliveries in flight
    child.wait().unwrap();

    // The restarted ferry reaches the lab at a new address. The old one may yet answer
    // requests the killed process sent (this test's runtime serves it only when the test
    // waits): taken there, nobody heard the answer, and ferry rightly sends them again.
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-C"})).await;
    let (child, url) = spawn_ferry(dir.path(), &lab);
    wait_until("the lab took all 50 orders", || lab.accepted().len() >= 50).await;
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for received in lab.accepted() {
        *per_key
            .entry(
                received.headers["idempotency-key"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            )
            .or_default() += 1;
    }
    let expected: BTreeSet<String> = ids.iter().map(|id| format!("{id}:lab")).collect();
    assert_eq!(per_key.keys().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");

    // Resubmitting after the restart is still recognised.
    let mut again = payload("test-request.json");
    again["portal_ref"] = json!("PR-CRASH-0");
    let (status, reply) = post_json(&format!("{url}/api/v1/test-requests"), &again).await;
    assert_eq!(status, 202);
    assert!(ids.contains(reply["request_id"].as_str().unwrap()));

    // Operators find the journey by the portal's reference.
    let (code, trace) = operate(&url, &["trace", "PR-CRASH-3"]);
    assert_eq!(code, 0, "{trace}");
    assert!(trace.contains("test-request"), "{trace}");
    assert!(trace.contains("state: delivered_to_lab"), "{trace}");
    assert!(trace.contains("attempt"), "{trace}");
    assert!(
        trace.contains("steps=step 1 (validate), step 2 (correlate)"),
        "{trace}"
    );
    let (code, listed) = operate(&url, &["dlq", "list"]);
    assert_eq!(code, 0, "{listed}");
    assert!(listed.contains("0 dead letter(s)"), "{listed}");
    let (code, missing) = operate(&url, &["trace", "no-such-thing"]);
    assert_eq!(code, 1, "{missing}");
    terminate(child).await;
}

#[tokio::test]
async fn dlq_commands_list_show_and_replay_dead_letters() {
    let lab = Partner::start(422, json!({"error": "bad order"})).await;
    let dir = tempfile::tempdir().unwrap();
    let (child, url) = spawn_ferry(dir.path(), &lab);
    let (_, reply) = post_json(
        &format!("{url}/api/v1/test-requests"),
        &payload("test-request.json"),
    )
    .await;
    let id = reply["request_id"].as_str().unwrap().to_owned();
    wait_until("the lab refused the order", || lab.received().len() == 1).await;
    let mut listed = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        listed = operate(&url, &["dlq", "list"]).1;
        if listed.contains(&id) {
            break;
        }
        // Waits without blocking: the mock lab answers on this runtime.
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        listed.contains(&id) && listed.contains("answered 422"),
        "{listed}"
    );
    let (code, shown) = operate(&url, &["dlq", "show", &id]);
    assert_eq!(code, 0);
    assert!(shown.contains("\"status\": \"dead\""), "{shown}");
    let (_, to_lab) = operate(&url, &["dlq", "list", "--target", "lab"]);
    assert!(to_lab.contains(&id), "{to_lab}");
    let (_, to_portal) = operate(&url, &["dlq", "list", "--target", "portal"]);
    assert!(to_portal.contains("0 dead letter(s)"), "{to_portal}");

    lab.set_reply(201, json!({}));
    let (code, replayed) = operate(
        &url,
        &[
            "dlq",
            "replay",
            "--all",
            "--flow",
            "portal-to-lab",
            "--target",
            "lab",
            "--reason",
            "the lab is back",
        ],
    );
    assert_eq!(code, 0, "{replayed}");
    assert!(replayed.contains("1 replayed, 0 not"), "{replayed}");
    wait_until("the lab took the replayed order", || {
        lab.accepted().len() == 1
    })
    .await;
    terminate(child).await;
}

#[tokio::test]
async fn consumers_killed_mid_batch_lose_nothing() {
    let sink = Partner::start(200, json!({})).await;
    sink.set_delay(std::time::Duration::from_millis(50)); // keep a batch in hand when the kill comes
    let (amqp_queue, nats_queue) = (crate::util::unique("amqp"), crate::util::unique("nats"));
    let env = [
        ("AMQP_QUEUE", amqp_queue.as_str()),
        ("AMQP_URL", crate::util::rabbitmq()),
        ("NATS_QUEUE", nats_queue.as_str()),
        ("NATS_URL", crate::util::nats()),
        ("EMBEDDED_QUEUE", "unused"),
        ("SINK_URL", sink.url.as_str()),
    ];
    const COUNT: u64 = 40;
    for n in 0..COUNT {
        let body = json!({"driver": "amqp", "n": n}).to_string();
        crate::util::amqp_publish(&amqp_queue, body.as_bytes(), Some(&format!("m-{n}"))).await;
        crate::util::nats_publish(
            &nats_queue,
            json!({"driver": "nats", "n": n}).to_string().as_bytes(),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = spawn_serving(dir.path(), "tests/fixtures/queues/flows", &env);
    let seen = |driver: &str| -> BTreeSet<u64> {
        sink.received()
            .iter()
            .filter(|r| r.path == format!("/{driver}"))
            .filter_map(|r| r.json()["n"].as_u64())
            .collect()
    };
    wait_until("both consumers are mid-batch", || {
        seen("amqp").len() >= 5 && seen("nats").len() >= 5
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen("amqp").len() < COUNT as usize || seen("nats").len() < COUNT as usize,
        "killed too late to test anything"
    );

    let (child, _) = spawn_serving(dir.path(), "tests/fixtures/queues/flows", &env);
    let all: BTreeSet<u64> = (0..COUNT).collect();
    wait_until("every AMQP message reached the sink", || {
        seen("amqp") == all
    })
    .await;
    // JetStream hands out again what the killed consumer held once its ack wait (10 s) passes.
    crate::util::wait_until_within("every NATS message reached the sink", 30, || {
        seen("nats") == all
    })
    .await;
    terminate(child).await;
}

#[test]
fn the_demo_shows_the_whole_round_trip() {
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["demo", "--delay", "100ms"])
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = succeeded(&output);
    let mut from = 0;
    for part in [
        "202 Accepted",
        "[accepted",
        "[delivered_to_lab",
        "[results_received",
        "[delivered_to_portal",
        "the portal received:",
        "lab-to-portal  attempt",
        "round trip complete",
    ] {
        let at = stdout[from..]
            .find(part)
            .unwrap_or_else(|| panic!("{part:?} missing or out of order in\n{stdout}"));
        from += at + part.len();
    }
}

/// Copies the shipped flows and schemas into `dir`, to edit them while ferry serves them.
fn copy_shipped(dir: &Path) {
    for folder in ["flows", "schemas"] {
        std::fs::create_dir_all(dir.join(folder)).unwrap();
        for entry in std::fs::read_dir(repo().join(folder)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(folder).join(path.file_name().unwrap())).unwrap();
        }
    }
}

fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", file.display());
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

#[tokio::test]
async fn a_reload_under_load_loses_no_request() {
    let lab = Partner::start(201, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    copy_shipped(dir.path());
    let flows = dir.path().join("flows");
    let (child, url) = spawn_with(
        dir.path(),
        &["--watch", "--flows", flows.to_str().unwrap()],
        &[("LAB_URL", &lab.url)],
        Stdio::null(),
    );

    const CLIENTS: usize = 8;
    const EACH: usize = 40;
    let (versions, load) = {
        let versions = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut load = tokio::task::JoinSet::new();
        for client in 0..CLIENTS {
            let (url, versions) = (url.clone(), std::sync::Arc::clone(&versions));
            load.spawn(async move {
                for n in 0..EACH {
                    let mut request = payload("test-request.json");
                    request["portal_ref"] = json!(format!("PR-R{client}-{n}"));
                    let (status, reply) =
                        post_json(&format!("{url}/api/v1/test-requests"), &request).await;
                    assert_eq!(status, 202, "{reply}");
                    versions.lock().unwrap().push(reply["version"].clone());
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            });
        }
        (versions, load)
    };
    wait_until("the load is under way", || {
        versions.lock().unwrap().len() >= 40
    })
    .await;
    // A clean change is served as soon as it is saved...
    edit(
        &flows.join("portal-to-lab.yaml"),
        "    status: accepted\n",
        "    status: accepted\n    version: 2\n",
    );
    wait_until("the new flow answers", || {
        versions.lock().unwrap().contains(&json!(2))
    })
    .await;
    // ...and a broken one is refused while the last clean set goes on serving.
    edit(
        &flows.join("lab-to-portal.yaml"),
        "    path: /api/v1/lab-results",
        "    pathh: /api/v1/lab-results",
    );
    let mut load = load;
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    let versions = versions.lock().unwrap().clone();
    assert_eq!(versions.len(), CLIENTS * EACH, "every request was answered");
    assert_eq!(
        versions.last(),
        Some(&json!(2)),
        "the broken edit did not replace the clean set"
    );
    wait_until("the lab has every order", || {
        lab.accepted().len() >= CLIENTS * EACH
    })
    .await;
    let keys: BTreeSet<String> = lab
        .accepted()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys.len(),
        CLIENTS * EACH,
        "each order reached the lab once"
    );
    terminate(child).await;
}

#[tokio::test]
async fn sighup_reloads_the_flows() {
    let lab = Partner::start(201, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    copy_shipped(dir.path());
    let flows = dir.path().join("flows");
    let (child, url) = spawn_serving(
        dir.path(),
        flows.to_str().unwrap(),
        &[("LAB_URL", &lab.url)],
    );
    edit(
        &flows.join("portal-to-lab.yaml"),
        "    status: accepted\n",
        "    status: accepted\n    version: 3\n",
    );
    let (_, reply) = post_json(
        &format!("{url}/api/v1/test-requests"),
        &payload("test-request.json"),
    )
    .await;
    assert_eq!(
        reply["version"],
        json!(null),
        "without --watch, nothing reloads by itself"
    );
    assert!(
        Command::new("kill")
            .args(["-HUP", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut request = payload("test-request.json");
    request["portal_ref"] = json!("PR-HUP");
    let mut reloaded = false;
    for _ in 0..500 {
        let (_, reply) = post_json(&format!("{url}/api/v1/test-requests"), &request).await;
        if reply["version"] == json!(3) {
            reloaded = true;
            break;
        }
        request["portal_ref"] = json!(format!("PR-HUP-{}", uuid::Uuid::now_v7().simple()));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(reloaded, "SIGHUP did not reload the flows");
    terminate(child).await;
}

#[tokio::test]
async fn metrics_count_a_scripted_run_exactly_and_logs_are_json() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-M"})).await;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("LAB_URL", lab.url.as_str()),
        (
            "RUST_LOG",
            "debug,sqlx=warn,hyper=warn,reqwest=warn,h2=warn,lapin=warn,async_nats=warn",
        ),
    ];
    let (mut child, url) = spawn_with(dir.path(), &["--log-format", "json"], &env, Stdio::piped());
    let logs = stderr_lines(&mut child);

    let mut request_id = String::new();
    for n in 0..3 {
        let mut request = payload("test-request.json");
        request["portal_ref"] = json!(format!("PR-M-{n}"));
        let (status, reply) = post_json(&format!("{url}/api/v1/test-requests"), &request).await;
        assert_eq!(status, 202);
        request_id = reply["request_id"].as_str().unwrap().to_owned();
    }
    assert_eq!(
        post_json(
            &format!("{url}/api/v1/test-requests"),
            &json!({"portal_ref": 1})
        )
        .await
        .0,
        422
    );
    let malformed = crate::util::client()
        .post(format!("{url}/api/v1/test-requests"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    wait_until("the lab took three orders", || lab.accepted().len() == 3).await;

    let expected = [
        "ferry_messages_received_total{flow=\"portal-to-lab\"} 5",
        "ferry_messages_accepted_total{flow=\"portal-to-lab\"} 3",
        "ferry_messages_rejected_total{flow=\"portal-to-lab\",reason=\"validation_failed\"} 1",
        "ferry_messages_rejected_total{flow=\"portal-to-lab\",reason=\"malformed_json\"} 1",
        "ferry_deliveries_total{flow=\"portal-to-lab\",target=\"lab\",outcome=\"delivered\"} 3",
    ];
    let mut scraped = String::new();
    for _ in 0..500 {
        scraped = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if expected
            .iter()
            .all(|line| scraped.lines().any(|l| l == *line))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for line in expected {
        assert!(
            scraped.lines().any(|l| l == line),
            "no {line:?} in\n{scraped}"
        );
    }
    assert!(
        scraped.contains(
            "ferry_step_duration_seconds_bucket{flow=\"portal-to-lab\",step=\"step 1 (validate)\""
        ),
        "{scraped}"
    );
    assert!(
        scraped.contains("ferry_store_commit_duration_seconds_count"),
        "{scraped}"
    );
    assert!(!scraped.contains(&request_id), "no id in a label");

    terminate(child).await;
    let logs = logs.join().unwrap();
    let entries: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        entries.len(),
        logs.len(),
        "every log line is JSON: {logs:#?}"
    );
    let about: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["message_id"] == request_id.as_str())
        .collect();
    assert!(!about.is_empty(), "no log line names message {request_id}");
    assert!(
        about.iter().all(|e| e["flow"] == "portal-to-lab"),
        "{about:#?}"
    );
}

#[tokio::test]
async fn admin_listen_serves_metrics_and_the_admin_api_apart() {
    let lab = Partner::start(201, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--store",
            &store,
        ])
        .current_dir(repo())
        .env("LAB_URL", &lab.url)
        .env("FERRY_ADMIN_TOKEN", TOKEN)
        .envs(SECRETS)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let main = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("ferry listening on ")
        .unwrap()
        .to_owned();
    let admin = lines
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("ferry admin listening on ")
        .unwrap()
        .to_owned();
    let get = |url: String| async move {
        reqwest::Client::new()
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        post_json(
            &format!("{main}/api/v1/test-requests"),
            &payload("test-request.json")
        )
        .await
        .0,
        202
    );
    assert_eq!(get(format!("{main}/metrics")).await, 404);
    assert_eq!(get(format!("{main}/admin/v1/dead-letters")).await, 404);
    assert_eq!(get(format!("{main}/readyz")).await, 200);
    assert_eq!(get(format!("{admin}/metrics")).await, 200);
    assert_eq!(get(format!("{admin}/admin/v1/dead-letters")).await, 200);
    assert_eq!(
        get(format!("{admin}/api/v1/test-requests/x")).await,
        404,
        "flows are not served on the admin address"
    );
    terminate(child).await;
}

#[tokio::test]
async fn json_logs_follow_one_correlation_id_both_ways() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-J"})).await;
    let portal = Partner::start(200, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("RUST_LOG", "warn,ferry=debug"),
    ];
    let (mut child, url) = spawn_with(dir.path(), &["--log-format", "json"], &env, Stdio::piped());
    let logs = stderr_lines(&mut child);

    let response = crate::util::client()
        .post(format!("{url}/api/v1/test-requests"))
        .header("x-correlation-id", "corr-both-ways")
        .json(&payload("test-request.json"))
        .send()
        .await
        .unwrap();
    let request_id = response.json::<serde_json::Value>().await.unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until("the lab has the order", || lab.accepted().len() == 1).await;
    // A well-behaved lab sends its results with the correlation id it was given.
    let echoed = lab.accepted()[0].headers["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut result = payload("test-result.json");
    result["order_ref"] = json!(request_id);
    let answer = crate::util::signed_post(
        &format!("{url}/api/v1/lab-results"),
        serde_json::to_vec(&result).unwrap(),
    )
    .header("x-correlation-id", &echoed)
    .send()
    .await
    .unwrap();
    assert_eq!(answer.status(), 202);
    wait_until("the portal has the results", || {
        portal.accepted().len() == 1
    })
    .await;
    terminate(child).await;

    let entries = json_lines(logs);
    let journey: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e["correlation_id"] == "corr-both-ways")
        .map(|e| {
            (
                e["flow"].as_str().unwrap_or_default(),
                e["message"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    for step in [
        ("portal-to-lab", "message handled"),
        ("portal-to-lab", "delivered"),
        ("lab-to-portal", "message handled"),
        ("lab-to-portal", "delivered"),
    ] {
        assert!(
            journey.contains(&step),
            "{step:?} missing from {journey:#?}"
        );
    }
}

#[tokio::test]
async fn a_failing_partner_is_one_info_line_per_attempt_and_a_warning_when_dead() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-L"})).await;
    lab.answer_once(503, json!({"error": "maintenance"}));
    let dir = tempfile::tempdir().unwrap();
    // The default level: what an operator sees without asking for more.
    let env = [("LAB_URL", lab.url.as_str()), ("RUST_LOG", "info")];
    let (mut child, url) = spawn_with(dir.path(), &["--log-format", "json"], &env, Stdio::piped());
    let logs = stderr_lines(&mut child);
    let (_, reply) = post_json(
        &format!("{url}/api/v1/test-requests"),
        &payload("test-request.json"),
    )
    .await;
    let id = reply["request_id"].as_str().unwrap().to_owned();
    wait_until("the lab took it the second time", || {
        lab.accepted().len() == 1
    })
    .await;
    // A refusal for good: a dead letter.
    lab.set_reply(422, json!({"error": "unknown test code"}));
    let mut other = payload("test-request.json");
    other["portal_ref"] = json!("PR-LOG-2");
    let (_, reply) = post_json(&format!("{url}/api/v1/test-requests"), &other).await;
    let dead = reply["request_id"].as_str().unwrap().to_owned();
    wait_until("the lab refused it", || lab.received().len() == 3).await;
    // Its dead-letter line is written before the outcome is recorded.
    wait_for_state(&url, &dead, "failed").await;
    terminate(child).await;

    let entries = json_lines(logs);
    let failed: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| {
            e["message_id"] == id.as_str() && e["message"] == "delivery attempt failed; retrying"
        })
        .collect();
    assert_eq!(failed.len(), 1, "{entries:#?}");
    let line = failed[0];
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(
        (&line["flow"], &line["target"]),
        (&json!("portal-to-lab"), &json!("lab")),
        "{line}"
    );
    assert_eq!(
        (&line["status"], &line["attempt"]),
        (&json!(503), &json!(1)),
        "{line}"
    );
    assert!(
        line["error"].as_str().unwrap().contains("maintenance"),
        "{line}"
    );
    assert!(
        line["next_attempt"].as_str().unwrap().ends_with('Z'),
        "{line}"
    );
    let dead_line = entries
        .iter()
        .find(|e| {
            e["message_id"] == dead.as_str()
                && e["message"] == "delivery failed for good: dead letter"
        })
        .unwrap_or_else(|| panic!("no dead letter line in {entries:#?}"));
    assert_eq!(
        (&dead_line["level"], &dead_line["status"]),
        (&json!("WARN"), &json!(422)),
        "{dead_line}"
    );
}

#[tokio::test]
async fn embedded_queue_depth_is_a_gauge() {
    let lab = Partner::start(201, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let (child, url) = spawn_serving(
        dir.path(),
        "flows,examples/layered/flows",
        &[("LAB_URL", &lab.url)],
    );
    let mut scraped = String::new();
    for _ in 0..500 {
        scraped = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if scraped.contains("ferry_queue_depth{queue=\"lab-orders\"} 0") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(
        scraped.contains("ferry_queue_depth{queue=\"lab-orders\"} 0"),
        "{scraped}"
    );
    assert!(
        scraped.contains("ferry_queue_consumer_lag{queue=\"lab-orders\"} 0"),
        "{scraped}"
    );
    terminate(child).await;
}

/// With the `otlp` feature: spans reach an OTLP/HTTP collector, in the caller's trace.
#[cfg(feature = "otlp")]
#[tokio::test]
async fn traces_are_exported_over_otlp_in_the_callers_trace() {
    let lab = Partner::start(201, json!({})).await;
    let collector = Partner::start(200, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let (child, url) = spawn_with(
        dir.path(),
        &["--otlp-endpoint", &collector.url],
        &[("LAB_URL", &lab.url)],
        Stdio::null(),
    );
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = crate::util::client()
        .post(format!("{url}/api/v1/test-requests"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&payload("test-request.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    wait_until("the lab has the order", || lab.accepted().len() == 1).await;
    terminate(child).await; // flushes the batch
    let exported = collector.received();
    assert!(!exported.is_empty(), "nothing exported");
    assert_eq!(exported[0].path, "/v1/traces");
    let raw_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let spans = exported
        .iter()
        .flat_map(|r| r.body.windows(16))
        .filter(|w| *w == raw_id)
        .count();
    assert!(
        spans >= 2,
        "the message and its delivery continue the caller's trace ({spans})"
    );
}

#[tokio::test]
async fn serve_warns_when_a_target_may_outlast_its_claim() {
    let lab = Partner::start(201, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    // The shipped lab target waits up to 30 s for an answer: a 5 s lease is too short.
    let (mut child, _) = spawn_with(
        dir.path(),
        &["--lease", "5s"],
        &[("LAB_URL", &lab.url)],
        Stdio::piped(),
    );
    let logs = stderr_lines(&mut child);
    terminate(child).await;
    let logs = logs.join().unwrap();
    assert!(
        logs.iter()
            .any(|l| l.contains("not shorter than the lease") && l.contains("portal-to-lab")),
        "{logs:#?}"
    );
}

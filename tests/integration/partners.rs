//! Partners added by YAML alone, each in a folder of its own served beside the shipped
//! flows: the second lab of `examples/second-lab` takes the Test Requests meant for it, and
//! a partner reached through a flow keeps every delivery guarantee of ferry's own targets.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};

use crate::util::process::{spawn_on, terminate};
use crate::util::{FAST_RETRY, Ferry, Partner, payload, post_json, repo, wait_until};
use crate::util::{status_of, wait_for_state};

const NORTHWIND_KEY: &str = "northwind-test-key";

/// The shipped flows and the second lab's folder, delivering to the mocks.
async fn serve_with_second_lab(lab: &Partner, northwind: &Partner, portal: &Partner) -> Ferry {
    let mut env = vec![
        ("LAB_URL", lab.url.as_str()),
        ("NORTHWIND_URL", northwind.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("NORTHWIND_API_KEY", NORTHWIND_KEY),
    ];
    env.extend(FAST_RETRY);
    let flows = [
        repo().join("flows"),
        repo().join("examples/second-lab/flows"),
    ];
    Ferry::start_many(&flows, &env).await
}

#[tokio::test]
async fn a_second_lab_takes_the_requests_meant_for_it_and_only_those() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-MAIN"})).await;
    let northwind = Partner::start(201, json!({"submission_id": "NW-77"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = serve_with_second_lab(&lab, &northwind, &portal).await;

    let mut ids = Vec::new();
    for (i, partner) in [
        Some("northwind"),
        None,
        Some("northwind"),
        None,
        Some("other"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut request = payload("test-request.json");
        request["portal_ref"] = json!(format!("PR-P-{i}"));
        if let Some(partner) = partner {
            request["lab"] = json!(partner);
        }
        let (status, reply) =
            post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
        assert_eq!(status, 202, "{reply}");
        ids.push((
            reply["request_id"].as_str().unwrap().to_owned(),
            partner == Some("northwind"),
        ));
    }
    wait_until("both labs have their orders", || {
        northwind.received().len() == 2 && lab.received().len() == 3
    })
    .await;

    // Northwind gets its own format, at its own endpoint, and nothing else.
    for (got, (id, _)) in northwind
        .received()
        .iter()
        .zip(ids.iter().filter(|(_, nw)| *nw))
    {
        assert_eq!(got.path, "/api/submissions");
        let submission = got.json();
        assert_eq!(submission["submission"]["reference"], id.as_str());
        assert_eq!(submission["submission"]["account"], "C-1001");
        assert_eq!(submission["analyses"][1]["analysis"], "PB-ICPMS");
        assert_eq!(submission["specimens"][0]["matrix"], "WATER");
    }
    for got in lab.received() {
        assert_eq!(got.path, "/orders");
        let order = got.json();
        let to_northwind = ids
            .iter()
            .any(|(id, nw)| *nw && order["order_ref"] == id.as_str());
        assert!(!to_northwind, "the default lab got a Northwind order");
    }
    // Northwind's own id becomes the request's lab_order_id, as with the default lab.
    let (northwind_id, _) = ids.iter().find(|(_, nw)| *nw).unwrap();
    let state = wait_for_state(&ferry.url, northwind_id, "delivered_to_lab").await;
    assert_eq!(state["lab_order_id"], "NW-77");
    let (default_id, _) = ids.iter().find(|(_, nw)| !*nw).unwrap();
    assert_eq!(
        wait_for_state(&ferry.url, default_id, "delivered_to_lab").await["lab_order_id"],
        "LAB-MAIN"
    );
}

#[tokio::test]
async fn a_second_lab_that_is_down_is_retried_like_the_first() {
    let lab = Partner::start(201, json!({})).await;
    let northwind = Partner::start(503, json!({"error": "maintenance"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = serve_with_second_lab(&lab, &northwind, &portal).await;
    let mut request = payload("test-request.json");
    request["lab"] = json!("northwind");
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    let id = reply["request_id"].as_str().unwrap().to_owned();
    wait_until("northwind refused twice", || {
        northwind.received().len() >= 2
    })
    .await;
    northwind.set_reply(201, json!({"submission_id": "NW-1"}));
    wait_for_state(&ferry.url, &id, "delivered_to_lab").await;
    assert!(lab.received().is_empty());
}

#[tokio::test]
async fn a_second_labs_report_in_its_own_format_reaches_the_portal_in_the_portals() {
    let lab = Partner::start(201, json!({})).await;
    let northwind = Partner::start(201, json!({"submission_id": "NW-9"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = serve_with_second_lab(&lab, &northwind, &portal).await;
    let mut request = payload("test-request.json");
    request["lab"] = json!("northwind");
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    let id = reply["request_id"].as_str().unwrap().to_owned();
    wait_for_state(&ferry.url, &id, "delivered_to_lab").await;

    // Northwind reports by its own id, in its own shapes, to its own endpoint.
    let report = json!({
        "submission_id": "NW-9", "reference": "not-echoed", "state": "FINAL",
        "finished": "2026-11-22T16:04:05+01:00",
        "panels": [{"barcode": "S-1", "readings": [
            {"analysis": "PH", "reading": "7.20", "units": "pH", "flag": "N"},
            {"analysis": "PB-ICPMS", "reading": "<0.5", "units": "ug/L", "flag": ""}
        ]}]
    });
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/northwind/reports", ferry.url))
        .header("x-northwind-key", NORTHWIND_KEY)
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    wait_until("the portal has the results", || {
        portal.accepted().len() == 1
    })
    .await;
    let result = portal.accepted()[0].json();
    assert_eq!(result["request_id"], id.as_str());
    assert_eq!(result["lab_order_id"], "NW-9");
    assert_eq!(result["status"], "completed");
    assert_eq!(result["completed_at"], "2026-11-22T15:04:05Z");
    assert_eq!(
        result["results"],
        json!([
            {"sample_id": "S-1", "code": "PH", "value": 7.2, "unit": "pH", "flag": "normal"},
            {"sample_id": "S-1", "code": "PB-ICPMS", "value": "<0.5", "unit": "ug/L"}
        ])
    );
    wait_for_state(&ferry.url, &id, "delivered_to_portal").await;
}

#[tokio::test]
async fn the_route_line_of_old_still_hands_a_partner_its_requests() {
    // A project that keeps its partners in its own copy of the shipped flows.
    let dir = tempfile::tempdir().unwrap();
    for folder in ["flows", "schemas"] {
        std::fs::create_dir(dir.path().join(folder)).unwrap();
        for entry in std::fs::read_dir(repo().join(folder)).unwrap() {
            let path = entry.unwrap().path();
            let to = dir.path().join(folder).join(path.file_name().unwrap());
            std::fs::copy(&path, to).unwrap();
        }
    }
    let file = dir.path().join("flows/portal-to-lab.yaml");
    let shipped = std::fs::read_to_string(&file).unwrap();
    let line = "      - { when: { path: $.body.lab, equals: helix }, flow: helix-order }\n";
    let patched = shipped.replacen("      - to: lab\n", &format!("{line}      - to: lab\n"), 1);
    std::fs::write(&file, patched).unwrap();
    std::fs::write(
        dir.path().join("flows/helix-order.yaml"),
        "name: helix-order\ntargets:\n  helix:\n    http: {url: \"${HELIX_URL}/orders\"}\n",
    )
    .unwrap();
    let (lab, helix) = (
        Partner::start(201, json!({})).await,
        Partner::start(201, json!({})).await,
    );
    let env = [
        ("LAB_URL", lab.url.as_str()),
        ("HELIX_URL", helix.url.as_str()),
    ];
    let ferry = Ferry::start(&dir.path().join("flows"), &env).await;
    let mut request = payload("test-request.json");
    request["lab"] = json!("helix");
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    wait_for_state(
        &ferry.url,
        reply["request_id"].as_str().unwrap(),
        "delivered_to_lab",
    )
    .await;
    assert_eq!((helix.accepted().len(), lab.received().len()), (1, 0));
}

/// A partner folder holding one lab, Helix, whose flow takes portal-to-lab's requests for
/// it and delivers them with `mode` (`sync` or `durable`).
fn helix_folder(mode: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("flows")).unwrap();
    let flow = format!(
        r#"name: helix-order
takes:
  - from: portal-to-lab
    when: {{ path: $.body.lab, equals: helix }}
steps:
  - transform:
      body: {{ reference: "{{{{body.order_ref}}}}", tests: "{{{{count body.tests}}}}" }}
targets:
  helix:
    http:
      url: ${{HELIX_URL}}/orders
      timeout: ${{HELIX_TIMEOUT:-10s}}
      capture: {{ lab_order_id: $.id }}
delivery:
  mode: {mode}
  retry: {{ initial: 50ms, max: 100ms, for: 1m }}
reply:
  body: {{ lab_order_id: "{{{{vars.lab_order_id}}}}" }}
"#
    );
    std::fs::write(dir.path().join("flows/helix-order.yaml"), flow).unwrap();
    dir
}

/// The shipped flows with Helix's folder, in this process.
async fn serve_with_helix(
    folder: &Path,
    lab: &Partner,
    helix: &Partner,
    env: &[(&str, &str)],
) -> Ferry {
    let mut env = env.to_vec();
    env.extend([
        ("LAB_URL", lab.url.as_str()),
        ("HELIX_URL", helix.url.as_str()),
    ]);
    env.extend(FAST_RETRY);
    let flows: [PathBuf; 2] = [repo().join("flows"), folder.join("flows")];
    Ferry::start_many(&flows, &env).await
}

/// Sends a Test Request for Helix and returns ferry's id for it.
async fn request_for_helix(url: &str) -> String {
    let mut request = payload("test-request.json");
    request["lab"] = json!("helix");
    let (status, reply) = post_json(&format!("{url}/api/v1/test-requests"), &request).await;
    assert_eq!(status, 202, "{reply}");
    reply["request_id"].as_str().unwrap().to_owned()
}

/// The `Idempotency-Key` of each request `partner` received.
fn keys(partner: &Partner) -> Vec<String> {
    partner
        .received()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_partner_flows_retry_after_key_and_answer_reach_the_delivery_unchanged() {
    for mode in ["sync", "durable"] {
        let folder = helix_folder(mode);
        let lab = Partner::start(201, json!({})).await;
        let helix = Partner::start(201, json!({"id": "HX-1"})).await;
        helix.answer_once_with_header(429, json!({"error": "slow down"}), ("retry-after", "1"));
        helix.answer_once(503, json!({"error": "maintenance"}));
        let ferry = serve_with_helix(folder.path(), &lab, &helix, &[]).await;
        let id = request_for_helix(&ferry.url).await;

        wait_until("helix answered 429", || helix.received().len() == 1).await;
        // Not delivered while the partner has not taken it.
        let (_, state) = status_of(&ferry.url, &id).await;
        assert_eq!(state["status"], "accepted", "{mode}: {state}");

        let state = wait_for_state(&ferry.url, &id, "delivered_to_lab").await;
        assert_eq!(state["lab_order_id"], "HX-1", "{mode}");
        let received = helix.received();
        assert_eq!(received.len(), 3, "{mode}");
        let waited = received[1].at - received[0].at;
        assert!(
            waited >= std::time::Duration::from_millis(950),
            "{mode}: Retry-After: 1 honoured, waited {waited:?}"
        );
        let keys = keys(&helix);
        assert!(
            keys.iter().all(|k| *k == keys[0]),
            "{mode}: one key for every attempt: {keys:?}"
        );
        assert_eq!(
            received[2].json(),
            json!({"reference": id, "tests": 2}),
            "{mode}"
        );
        assert!(lab.received().is_empty(), "{mode}");

        // The timeline says what the partner answered, attempt by attempt.
        let (_, detail) = ferry.admin(&format!("/messages/{id}")).await;
        let statuses: Vec<&Value> = detail["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "attempt")
            .map(|e| &e["detail"]["status"])
            .collect();
        assert_eq!(
            statuses,
            [&json!(429), &json!(503), &json!(201)],
            "{mode}: {detail}"
        );
    }
}

#[tokio::test]
async fn a_partner_whose_answer_is_lost_gets_the_order_again_under_the_same_key() {
    for mode in ["sync", "durable"] {
        let folder = helix_folder(mode);
        let lab = Partner::start(201, json!({})).await;
        let helix = Partner::start(201, json!({"id": "HX-2"})).await;
        // It takes the order, and answers after ferry has stopped waiting.
        helix.set_delay(std::time::Duration::from_millis(1500));
        let ferry =
            serve_with_helix(folder.path(), &lab, &helix, &[("HELIX_TIMEOUT", "500ms")]).await;
        let id = request_for_helix(&ferry.url).await;
        wait_until("helix took the order", || helix.received().len() == 1).await;
        helix.set_delay(std::time::Duration::ZERO);
        wait_for_state(&ferry.url, &id, "delivered_to_lab").await;
        let keys = keys(&helix);
        assert!(
            keys.len() >= 2 && keys.iter().all(|k| *k == keys[0]),
            "{mode}: {keys:?}"
        );
    }
}

#[tokio::test]
async fn ferry_dying_between_a_partner_flows_answer_and_its_commit_sends_again_with_the_same_key() {
    for mode in ["sync", "durable"] {
        let folder = helix_folder(mode);
        let helix = Partner::start(201, json!({"id": "HX-3"})).await;
        let store_dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite://{}/ferry.db", store_dir.path().display());
        let partner_flows = folder.path().join("flows").display().to_string();
        let args = ["--flows", "flows", "--flows", &partner_flows];
        let env = [
            ("HELIX_URL", helix.url.as_str()),
            ("LAB_URL", "http://127.0.0.1:9"),
        ];
        let mut armed = env.to_vec();
        armed.push(("FERRY_FAULT", "after-target-answer"));
        let (mut child, url) = spawn_on(&store, &args, &armed, Stdio::null());
        let id = request_for_helix(&url).await;
        let exit = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(
            !exit.success(),
            "{mode}: the fault point was not reached: {exit:?}"
        );
        assert_eq!(helix.accepted().len(), 1, "{mode}");

        let (child, url) = spawn_on(&store, &args, &env, Stdio::null());
        wait_until("the order is sent again", || helix.accepted().len() == 2).await;
        let keys = keys(&helix);
        assert_eq!(keys[0], keys[1], "{mode}");
        // The answer is recorded just after the partner has it.
        let status = wait_for_state(&url, &id, "delivered_to_lab").await;
        assert_eq!(status["lab_order_id"], "HX-3", "{mode}: {status}");
        terminate(child).await;
    }
}

/// The shipped flows and the billing folder, delivering to the mocks.
async fn serve_with_billing(lab: &Partner, portal: &Partner, billing: &Partner) -> Ferry {
    let mut env = vec![
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("BILLING_URL", billing.url.as_str()),
        ("BILLING_RETRY_INITIAL", "20ms"),
        ("BILLING_RETRY_MAX", "100ms"),
    ];
    env.extend(FAST_RETRY);
    let flows = [repo().join("flows"), repo().join("examples/billing/flows")];
    Ferry::start_many(&flows, &env).await
}

/// Sends a Test Request, waits until the lab has it, and sends its results with `status`.
async fn request_and_results(ferry: &Ferry, portal_ref: &str, status: &str) -> String {
    let mut request = payload("test-request.json");
    request["portal_ref"] = json!(portal_ref);
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    let id = reply["request_id"].as_str().unwrap().to_owned();
    wait_for_state(&ferry.url, &id, "delivered_to_lab").await;
    let mut result = payload("test-result.json");
    result["order_ref"] = json!(id);
    result["status"] = json!(status);
    let (code, reply) = post_json(&format!("{}/api/v1/lab-results", ferry.url), &result).await;
    assert_eq!(code, 202, "{reply}");
    id
}

/// What the status endpoint says of each recipient: `(flow, target, state)`.
async fn recipients(ferry: &Ferry, id: &str) -> Vec<(String, String, String)> {
    let (_, status) = status_of(&ferry.url, id).await;
    status["recipients"]
        .as_array()
        .unwrap_or_else(|| panic!("no recipients in {status}"))
        .iter()
        .map(|r| {
            let field = |name: &str| r[name].as_str().unwrap().to_owned();
            (field("flow"), field("target"), field("state"))
        })
        .collect()
}

#[tokio::test]
async fn a_subscriber_gets_its_own_deliveries_and_holds_up_no_one() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-1"})).await;
    let portal = Partner::start(200, json!({})).await;
    let billing = Partner::start(503, json!({"error": "maintenance"})).await;
    let ferry = serve_with_billing(&lab, &portal, &billing).await;
    let id = request_and_results(&ferry, "PR-BILL-1", "completed").await;

    // Billing is down: the portal has the results regardless, and the state says so.
    wait_until("billing refused twice", || billing.received().len() >= 2).await;
    wait_for_state(&ferry.url, &id, "delivered_to_portal").await;
    assert_eq!(portal.accepted().len(), 1);
    let to = |flow: &str, target: &str, state: &str| {
        (flow.to_owned(), target.to_owned(), state.to_owned())
    };
    let listed = recipients(&ferry, &id).await;
    assert!(
        listed.contains(&to("portal-to-lab", "lab", "delivered")),
        "{listed:?}"
    );
    assert!(
        listed.contains(&to("lab-to-portal", "portal", "delivered")),
        "{listed:?}"
    );
    assert!(
        listed
            .iter()
            .any(|(f, t, s)| f == "lab-to-portal" && t == "billing-results" && s != "delivered"),
        "{listed:?}"
    );

    billing.set_reply(201, json!({}));
    wait_until("billing has the charge", || billing.accepted().len() == 1).await;
    let charge = billing.accepted()[0].json();
    assert_eq!(charge["charge_ref"], id.as_str());
    assert_eq!(charge["analyses"], 2);
    // One key for every attempt, and not the portal's.
    let billing_keys = keys(&billing);
    assert!(
        billing_keys.iter().all(|k| *k == billing_keys[0]),
        "{billing_keys:?}"
    );
    assert_ne!(billing_keys[0], keys(&portal)[0]);
    wait_for(
        &ferry,
        &id,
        to("lab-to-portal", "billing-results", "delivered"),
    )
    .await;
    // Billing's delivery is no state of the request's: it stays delivered to the portal, once.
    let (_, status) = status_of(&ferry.url, &id).await;
    assert_eq!(status["status"], "delivered_to_portal");
    let states = crate::round_trip::history_states(&status);
    assert_eq!(
        states
            .iter()
            .filter(|s| **s == "delivered_to_portal")
            .count(),
        1,
        "{states:?}"
    );

    // The trace shows every recipient too.
    let (_, trace) = ferry.admin(&format!("/trace/{id}")).await;
    let traced = trace["correlation"]["recipients"].as_array().unwrap();
    assert_eq!(traced.len(), 3, "{trace}");

    // A partial result is not billed.
    let partial = request_and_results(&ferry, "PR-BILL-2", "partial").await;
    wait_for_state(&ferry.url, &partial, "delivered_to_portal").await;
    let listed = recipients(&ferry, &partial).await;
    assert!(
        !listed.iter().any(|(_, t, _)| t == "billing-results"),
        "{listed:?}"
    );
    assert_eq!(billing.accepted().len(), 1);
}

/// Waits until the status endpoint lists `recipient`.
async fn wait_for(ferry: &Ferry, id: &str, recipient: (String, String, String)) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed = recipients(ferry, id).await;
        if listed.contains(&recipient) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never {recipient:?}: {listed:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_route_may_send_each_message_to_several_targets_each_delivered_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fan-out.yaml"),
        r#"name: fan-out
trigger: { http: { method: POST, path: /events, auth: none } }
steps:
  - route:
      - to: [portal, archive]
targets:
  portal: { http: { url: "${PORTAL_URL}/events" } }
  archive: { http: { url: "${ARCHIVE_URL}/events" } }
delivery: { retry: { initial: 20ms, max: 50ms } }
reply: { status: 202, body: { id: "{{meta.id}}" } }
"#,
    )
    .unwrap();
    let portal = Partner::start(200, json!({})).await;
    let archive = Partner::start(503, json!({})).await;
    let env = [
        ("PORTAL_URL", portal.url.as_str()),
        ("ARCHIVE_URL", archive.url.as_str()),
    ];
    let ferry = Ferry::start(dir.path(), &env).await;
    let (status, reply) = post_json(&format!("{}/events", ferry.url), &json!({"n": 1})).await;
    assert_eq!(status, 202, "{reply}");
    wait_until("the archive refused twice", || {
        archive.received().len() >= 2
    })
    .await;
    assert_eq!(
        portal.accepted().len(),
        1,
        "the portal is not held up by the archive"
    );
    archive.set_reply(200, json!({}));
    wait_until("the archive has it", || archive.accepted().len() == 1).await;
    let id = reply["id"].as_str().unwrap();
    let (_, detail) = ferry.admin(&format!("/messages/{id}")).await;
    assert_eq!(
        detail["deliveries"].as_array().unwrap().len(),
        2,
        "{detail}"
    );
    assert_eq!(portal.accepted().len(), 1, "the portal got it once");
}

#[tokio::test]
async fn a_flow_subscribed_twice_to_a_message_gets_it_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("events.yaml"),
        r#"name: events
trigger: { http: { method: POST, path: /events, auth: none } }
targets:
  portal: { http: { url: "${PORTAL_URL}/events" } }
reply: { status: 202, body: { id: "{{meta.id}}" } }
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("archive.yaml"),
        r#"name: archive
subscribes:
  - to: events
    when: { path: $.body.kind, equals: order }
  - to: events
    when: { path: $.body.urgent, equals: true }
targets:
  archive: { http: { url: "${ARCHIVE_URL}/events" } }
"#,
    )
    .unwrap();
    let portal = Partner::start(200, json!({})).await;
    let archive = Partner::start(200, json!({})).await;
    let env = [
        ("PORTAL_URL", portal.url.as_str()),
        ("ARCHIVE_URL", archive.url.as_str()),
    ];
    let ferry = Ferry::start(dir.path(), &env).await;
    let event = json!({"kind": "order", "urgent": true});
    let (status, reply) = post_json(&format!("{}/events", ferry.url), &event).await;
    assert_eq!(status, 202, "{reply}");
    wait_until("the archive has it", || archive.accepted().len() == 1).await;
    let id = reply["id"].as_str().unwrap();
    let (_, detail) = ferry.admin(&format!("/messages/{id}")).await;
    assert_eq!(
        detail["deliveries"].as_array().unwrap().len(),
        2,
        "one delivery to the portal, one to the archive flow: {detail}"
    );
    wait_until("the portal has it", || portal.accepted().len() == 1).await;
    assert_eq!(archive.accepted().len(), 1, "the archive got it once");
}

#[tokio::test]
async fn a_dead_subscriber_is_a_dead_letter_whose_replay_sends_to_it_alone() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-2"})).await;
    let portal = Partner::start(200, json!({})).await;
    let billing = Partner::start(422, json!({"error": "no such account"})).await;
    let ferry = serve_with_billing(&lab, &portal, &billing).await;
    let id = request_and_results(&ferry, "PR-BILL-3", "completed").await;
    wait_for(
        &ferry,
        &id,
        (
            "lab-to-portal".into(),
            "billing-results".into(),
            "dead".into(),
        ),
    )
    .await;
    assert_eq!(portal.accepted().len(), 1);

    // The results' message is a dead letter, for billing's sake.
    let (_, dead) = ferry.admin("/dead-letters").await;
    let message = dead["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["flow"] == "lab-to-portal")
        .unwrap_or_else(|| panic!("no dead letter in {dead}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    billing.set_reply(201, json!({}));
    let (status, _) = ferry
        .admin_post(
            &format!("/messages/{message}/replay"),
            &json!({"reason": "the request exists now"}),
        )
        .await;
    assert_eq!(status, 200);
    wait_until("billing has the charge", || billing.accepted().len() == 1).await;
    wait_for(
        &ferry,
        &id,
        (
            "lab-to-portal".into(),
            "billing-results".into(),
            "delivered".into(),
        ),
    )
    .await;
    assert_eq!(
        portal.received().len(),
        1,
        "the portal had it already: not sent again"
    );
}

#[tokio::test]
async fn a_called_flows_on_delivered_is_committed_with_its_record() {
    // Helix's flow keeps a record of its own for each order, and says in it when Helix has
    // the order: called from portal-to-lab's delivery, it runs as part of that delivery and
    // stores no message, so its record and its `on_delivered` commit together.
    let folder = helix_folder("durable");
    let flow = folder.path().join("flows/helix-order.yaml");
    let text = std::fs::read_to_string(&flow).unwrap();
    let text = text
        .replace(
            "steps:\n",
            "steps:\n  - correlate: { context: helix-order, save: [\"{{body.order_ref}}\"], state: sent }\n",
        )
        .replace(
            "delivery:\n",
            "delivery:\n  on_delivered: { state: taken, keys: [\"{{vars.lab_order_id}}\"], data: { helix_id: \"{{vars.lab_order_id}}\" } }\n",
        );
    std::fs::write(&flow, text).unwrap();
    let lab = Partner::start(201, json!({})).await;
    let helix = Partner::start(201, json!({"id": "HX-9"})).await;
    let ferry = serve_with_helix(folder.path(), &lab, &helix, &[]).await;
    let id = request_for_helix(&ferry.url).await;
    wait_for_state(&ferry.url, &id, "delivered_to_lab").await;

    let store = ferry.runtime.store().unwrap();
    let record = store
        .find_correlation("helix-order", &["HX-9".to_owned()])
        .await
        .unwrap()
        .expect("found by the key on_delivered added");
    assert_eq!(record.key, id);
    assert_eq!(record.data, json!({"helix_id": "HX-9"}));
    assert_eq!(record.state.as_deref(), Some("taken"));
    let states: Vec<&str> = record.history.iter().map(|h| h.state.as_str()).collect();
    assert_eq!(states, ["sent", "taken"]);
}

#[tokio::test]
async fn a_sync_flows_on_delivered_waits_for_a_partner_a_durable_flow_it_calls_has_not_reached() {
    for mode in ["sync", "durable"] {
        let partner = Partner::start(201, json!({})).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("caller.yaml"),
            r#"name: caller
trigger: { http: { method: POST, path: /caller, auth: none } }
steps:
  - correlate: { context: order, save: ["{{body.ref}}"], state: received }
targets:
  next: { flow: callee }
delivery: { mode: sync, on_delivered: { state: passed_on } }
"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("callee.yaml"),
            format!(
                "name: callee\ntargets:\n  partner: {{ http: {{ url: \"${{PARTNER_URL}}/in\" }} }}\ndelivery: {{ mode: {mode} }}\n"
            ),
        )
        .unwrap();
        let ferry = Ferry::start(dir.path(), &[("PARTNER_URL", &partner.url)]).await;
        let (status, reply) =
            post_json(&format!("{}/caller", ferry.url), &json!({"ref": "R-1"})).await;
        assert!(status < 300, "{mode}: {status} {reply}");
        let record = ferry
            .runtime
            .store()
            .unwrap()
            .find_correlation("order", &["R-1".to_owned()])
            .await
            .unwrap()
            .unwrap();
        let states: Vec<&str> = record.history.iter().map(|h| h.state.as_str()).collect();
        // A sync flow called has delivered it; a durable one has only kept it.
        let expected: &[&str] = match mode {
            "sync" => &["received", "passed_on"],
            _ => &["received"],
        };
        assert_eq!(states, expected, "{mode}");
        wait_until("the partner has it", || partner.received().len() == 1).await;
    }
}

//! The reference case end to end: portal → ferry → lab, then lab → ferry → portal, with the
//! request's status answered along the way.

use serde_json::{Value, json};

use crate::util::{Ferry, Partner, payload, post_json, status_of, wait_for_state, wait_until};

/// The states a status reply's history went through, oldest first.
pub(crate) fn history_states(status: &Value) -> Vec<&str> {
    status["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn a_test_request_reaches_the_lab_and_its_results_reach_the_portal() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-884211", "accepted": true})).await;
    let portal = Partner::start(200, json!({"ok": true})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let request = payload("test-request.json");

    // Portal → lab.
    let (status, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["status"], "accepted");
    assert_eq!(reply["portal_ref"], "PR-2026-0001");
    let request_id = reply["request_id"]
        .as_str()
        .expect("a request_id")
        .to_owned();

    wait_until("the lab has the order", || lab.received().len() == 1).await;
    let orders = lab.received();
    let order = orders[0].json();
    assert_eq!(orders[0].method, "POST");
    assert_eq!(orders[0].path, "/orders");
    assert_eq!(orders[0].headers["content-type"], "application/json");
    assert_eq!(
        orders[0].headers["idempotency-key"],
        format!("{request_id}:lab").as_str()
    );
    assert_eq!(orders[0].headers["x-correlation-id"], request_id.as_str());
    assert_eq!(
        crate::util::schema_violations("lab-order.schema.json", &order),
        vec![]
    );
    assert_eq!(order["order_ref"], request_id.as_str());
    assert_eq!(order["portal_ref"], "PR-2026-0001");
    assert_eq!(
        order["client"],
        json!({"account": "C-1001", "name": "Acme Water Ltd", "contact_email": "qa@acme-water.example"})
    );
    // Lone lookups keep the JSON type: arrays arrive as arrays, not strings.
    assert_eq!(order["tests"], request["tests"]);
    assert_eq!(order["samples"], request["samples"]);
    assert_eq!(order["notes"], json!(null));
    let state = wait_for_state(&ferry.url, &request_id, "delivered_to_lab").await;
    assert_eq!(state["lab_order_id"], "LAB-884211");

    // Lab → portal, echoing the order_ref.
    let mut result = payload("test-result.json");
    result["order_ref"] = json!(request_id);
    let (status, reply) = post_json(&format!("{}/api/v1/lab-results", ferry.url), &result).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(
        reply,
        json!({"request_id": request_id, "lab_order_id": "LAB-884211", "status": "accepted"})
    );

    wait_until("the portal has the results", || {
        portal.received().len() == 1
    })
    .await;
    let deliveries = portal.received();
    assert_eq!(deliveries[0].path, "/test-results");
    let delivered = deliveries[0].json();
    assert_eq!(
        crate::util::schema_violations("portal-result.schema.json", &delivered),
        vec![]
    );
    assert_eq!(delivered["request_id"], request_id.as_str());
    // The portal's reference came back through the correlation record, not through the lab.
    assert_eq!(delivered["portal_ref"], "PR-2026-0001");
    assert_eq!(delivered["lab_order_id"], "LAB-884211");
    assert_eq!(delivered["results"], result["results"]);
    assert_eq!(delivered["results"][0]["value"], json!(7.2));
    let state = wait_for_state(&ferry.url, &request_id, "delivered_to_portal").await;
    let states = history_states(&state);
    assert_eq!(
        states,
        [
            "accepted",
            "delivered_to_lab",
            "results_received",
            "delivered_to_portal"
        ]
    );
    for change in state["history"].as_array().unwrap() {
        assert!(change["at"].as_str().unwrap().ends_with('Z'), "{change}");
    }
}

#[tokio::test]
async fn results_correlate_by_the_labs_own_order_id() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-77"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let (_, reply) = post_json(
        &format!("{}/api/v1/test-requests", ferry.url),
        &payload("test-request.json"),
    )
    .await;
    let request_id = reply["request_id"].as_str().unwrap().to_owned();
    wait_for_state(&ferry.url, &request_id, "delivered_to_lab").await;

    results_by_lab_order_id(&ferry, &portal, "LAB-77", &request_id).await;
}

/// The lab lost our order_ref and sends results under its own `lab_order_id`: they reach
/// the portal as the results of `request_id`.
async fn results_by_lab_order_id(
    ferry: &Ferry,
    portal: &Partner,
    lab_order_id: &str,
    request_id: &str,
) {
    let mut result = payload("test-result.json");
    result["order_ref"] = json!("lab-internal-9");
    result["lab_order_id"] = json!(lab_order_id);
    let (status, reply) = post_json(&format!("{}/api/v1/lab-results", ferry.url), &result).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["request_id"], request_id);
    wait_until("the portal has the results", || {
        portal.received().len() == 1
    })
    .await;
    assert_eq!(portal.received()[0].json()["request_id"], request_id);
}

#[tokio::test]
async fn results_for_no_known_request_are_refused_and_kept_as_dead_letters() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;

    // The reference payload, as it stands, answers no request this ferry knows.
    let (status, body) = post_json(
        &format!("{}/api/v1/lab-results", ferry.url),
        &payload("test-result.json"),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_correlated");
    assert_eq!(
        body["details"],
        json!([{"context": "test-request", "keys": ["<the request_id>", "LAB-884211"]}])
    );
    assert!(portal.received().is_empty(), "nothing reaches the portal");

    let (status, dead) = ferry.admin("/dead-letters").await;
    assert_eq!(status, 200);
    let dead = dead["dead_letters"].as_array().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["flow"], "lab-to-portal");
    assert!(
        dead[0]["error"]
            .as_str()
            .unwrap()
            .contains("no test-request matches"),
        "{}",
        dead[0]
    );

    // Unknown ids get 404 from the status endpoint too.
    let (status, body) = status_of(&ferry.url, "no-such-request").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_correlated");
}

#[tokio::test]
async fn caller_correlation_ids_are_passed_on() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let response = crate::util::client()
        .post(format!("{}/api/v1/test-requests", ferry.url))
        .header("x-correlation-id", "trace-42")
        .json(&payload("test-request.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    wait_until("the lab has the order", || lab.received().len() == 1).await;
    assert_eq!(lab.received()[0].headers["x-correlation-id"], "trace-42");
}

/// The shipped flows and schemas in `dir`, with portal-to-lab delivering synchronously (its
/// `on_delivered` kept).
fn sync_portal_to_lab(dir: &std::path::Path) -> std::path::PathBuf {
    let repo = crate::util::repo();
    for folder in ["flows", "schemas"] {
        std::fs::create_dir_all(dir.join(folder)).unwrap();
        for entry in std::fs::read_dir(repo.join(folder)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(folder).join(path.file_name().unwrap())).unwrap();
        }
    }
    let flow = dir.join("flows/portal-to-lab.yaml");
    let shipped = std::fs::read_to_string(&flow).unwrap();
    assert!(shipped.contains("\ndelivery:\n"));
    std::fs::write(
        &flow,
        shipped.replace("\ndelivery:\n", "\ndelivery:\n  mode: sync\n"),
    )
    .unwrap();
    dir.join("flows")
}

#[tokio::test]
async fn a_sync_flows_on_delivered_is_in_the_record_when_it_replies() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-55"})).await;
    let portal = Partner::start(200, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let flows = sync_portal_to_lab(dir.path());
    let ferry = Ferry::start(
        &flows,
        &[("LAB_URL", &lab.url), ("PORTAL_URL", &portal.url)],
    )
    .await;
    let url = format!("{}/api/v1/test-requests", ferry.url);

    // A lab that fails it: the portal gets 502, told to wait as long as the lab asked, and
    // no record is made.
    lab.answer_once_with_header(503, json!({"error": "maintenance"}), ("retry-after", "7"));
    let body = serde_json::to_vec(&payload("test-request.json")).unwrap();
    let response = crate::util::signed_post(&url, body).send().await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(status_of(&ferry.url, "PR-2026-0001").await.0, 404);

    // Sent again, the lab takes it: by the reply, the record says so, with the lab's id as
    // a key and in its data, in one commit with the record itself.
    let (status, reply) = post_json(&url, &payload("test-request.json")).await;
    assert_eq!(status, 202, "{reply}");
    let request_id = reply["request_id"].as_str().unwrap().to_owned();
    let (status, state) = status_of(&ferry.url, "LAB-55").await;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["request_id"], request_id.as_str());
    assert_eq!(state["status"], "delivered_to_lab");
    assert_eq!(state["portal_ref"], "PR-2026-0001");
    assert_eq!(state["lab_order_id"], "LAB-55");
    assert_eq!(history_states(&state), ["accepted", "delivered_to_lab"]);

    results_by_lab_order_id(&ferry, &portal, "LAB-55", &request_id).await;
}

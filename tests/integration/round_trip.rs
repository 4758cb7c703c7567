//! The reference case end to end: portal → ferry → lab, then lab → ferry → portal.

use serde_json::json;

use crate::util::{Ferry, Partner, payload, post_json, schema_violations};

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

    let orders = lab.received();
    assert_eq!(orders.len(), 1);
    let order = orders[0].json();
    assert_eq!(orders[0].method, "POST");
    assert_eq!(orders[0].path, "/orders");
    assert_eq!(orders[0].headers["content-type"], "application/json");
    assert_eq!(
        orders[0].headers["idempotency-key"],
        format!("{request_id}:lab").as_str()
    );
    assert_eq!(orders[0].headers["x-correlation-id"], request_id.as_str());
    assert_eq!(schema_violations("lab-order.schema.json", &order), vec![]);
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

    // Lab → portal, echoing the order_ref.
    let mut result = payload("test-result.json");
    result["order_ref"] = json!(request_id);
    result["portal_ref"] = order["portal_ref"].clone();
    let (status, reply) = post_json(&format!("{}/api/v1/lab-results", ferry.url), &result).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(
        reply,
        json!({"request_id": request_id, "lab_order_id": "LAB-884211", "status": "accepted"})
    );

    let deliveries = portal.received();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].path, "/test-results");
    let delivered = deliveries[0].json();
    assert_eq!(
        schema_violations("portal-result.schema.json", &delivered),
        vec![]
    );
    assert_eq!(delivered["request_id"], request_id.as_str());
    assert_eq!(delivered["portal_ref"], "PR-2026-0001");
    assert_eq!(delivered["lab_order_id"], "LAB-884211");
    assert_eq!(delivered["results"], result["results"]);
    assert_eq!(delivered["results"][0]["value"], json!(7.2));
}

#[tokio::test]
async fn the_reference_result_payload_is_accepted_as_it_stands() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(204, json!(null)).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let (status, reply) = post_json(
        &format!("{}/api/v1/lab-results", ferry.url),
        &payload("test-result.json"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    let delivered = portal.received()[0].json();
    // Without the portal_ref echoed by the lab it is null, which the portal's schema allows.
    assert_eq!(delivered["portal_ref"], json!(null));
    assert_eq!(delivered["request_id"], "<the request_id>");
}

#[tokio::test]
async fn correlation_ids_given_by_the_caller_are_passed_on() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/test-requests", ferry.url))
        .header("x-correlation-id", "trace-42")
        .json(&payload("test-request.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(lab.received()[0].headers["x-correlation-id"], "trace-42");
}

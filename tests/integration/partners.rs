//! A partner added by YAML alone: the second lab of `examples/second-lab` takes the Test
//! Requests routed to it, in its own format, with one line added to the shipped flows.

use std::path::Path;

use serde_json::json;

use crate::round_trip::wait_for_state;
use crate::util::{FAST_RETRY, Ferry, Partner, payload, post_json, repo, wait_until};

const NORTHWIND_KEY: &str = "northwind-test-key";

const ROUTE_LINE: &str =
    "      - { when: { path: $.body.lab, equals: northwind }, flow: northwind-order }\n";

/// Copies the shipped flows and schemas into `dir`, adding the one routing line.
fn shipped_with_second_lab(dir: &Path) -> usize {
    for folder in ["flows", "schemas"] {
        std::fs::create_dir(dir.join(folder)).unwrap();
        for entry in std::fs::read_dir(repo().join(folder)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(folder).join(path.file_name().unwrap())).unwrap();
        }
    }
    let file = dir.join("flows/portal-to-lab.yaml");
    let original = std::fs::read_to_string(&file).unwrap();
    let patched = original.replacen(
        "      - to: lab\n",
        &format!("{ROUTE_LINE}      - to: lab\n"),
        1,
    );
    std::fs::write(&file, &patched).unwrap();
    patched.lines().count() - original.lines().count()
}

/// The patched shipped flows in `dir` with the second lab's folder, delivering to the mocks.
async fn serve_with_second_lab(
    dir: &Path,
    lab: &Partner,
    northwind: &Partner,
    portal: &Partner,
) -> Ferry {
    let mut env = vec![
        ("LAB_URL", lab.url.as_str()),
        ("NORTHWIND_URL", northwind.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("NORTHWIND_API_KEY", NORTHWIND_KEY),
    ];
    env.extend(FAST_RETRY);
    let flows = [dir.join("flows"), repo().join("examples/second-lab/flows")];
    Ferry::start_many(&flows, &env).await
}

#[tokio::test]
async fn a_second_lab_takes_the_requests_routed_to_it_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        shipped_with_second_lab(dir.path()),
        1,
        "the shipped flows change by one line"
    );

    let lab = Partner::start(201, json!({"lab_order_id": "LAB-MAIN"})).await;
    let northwind = Partner::start(201, json!({"submission_id": "NW-77"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = serve_with_second_lab(dir.path(), &lab, &northwind, &portal).await;

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
    let state = wait_for_state(&ferry, northwind_id, "delivered_to_lab").await;
    assert_eq!(state["lab_order_id"], "NW-77");
    let (default_id, _) = ids.iter().find(|(_, nw)| !*nw).unwrap();
    assert_eq!(
        wait_for_state(&ferry, default_id, "delivered_to_lab").await["lab_order_id"],
        "LAB-MAIN"
    );
}

#[tokio::test]
async fn a_second_lab_that_is_down_is_retried_like_the_first() {
    let dir = tempfile::tempdir().unwrap();
    shipped_with_second_lab(dir.path());
    let lab = Partner::start(201, json!({})).await;
    let northwind = Partner::start(503, json!({"error": "maintenance"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = serve_with_second_lab(dir.path(), &lab, &northwind, &portal).await;
    let mut request = payload("test-request.json");
    request["lab"] = json!("northwind");
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    let id = reply["request_id"].as_str().unwrap().to_owned();
    wait_until("northwind refused twice", || {
        northwind.received().len() >= 2
    })
    .await;
    northwind.set_reply(201, json!({"submission_id": "NW-1"}));
    wait_for_state(&ferry, &id, "delivered_to_lab").await;
    assert!(lab.received().is_empty());
}

#[tokio::test]
async fn a_second_labs_report_in_its_own_format_reaches_the_portal_in_the_portals() {
    let dir = tempfile::tempdir().unwrap();
    shipped_with_second_lab(dir.path());
    let lab = Partner::start(201, json!({})).await;
    let northwind = Partner::start(201, json!({"submission_id": "NW-9"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = serve_with_second_lab(dir.path(), &lab, &northwind, &portal).await;
    let mut request = payload("test-request.json");
    request["lab"] = json!("northwind");
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    let id = reply["request_id"].as_str().unwrap().to_owned();
    wait_for_state(&ferry, &id, "delivered_to_lab").await;

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
    wait_for_state(&ferry, &id, "delivered_to_portal").await;
}

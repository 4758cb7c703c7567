//! A lab whose system is a FHIR R4 server (`examples/fhir-lab`), added beside the shipped
//! flows: orders go to it as conditional transaction Bundles, its DiagnosticReports come
//! back to the portal. The FHIR server is an HTTP server on loopback that creates resources
//! as a FHIR server does, honouring `ifNoneExist`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::util::{
    FAST_RETRY, Ferry, Partner, payload, post_json, repo, serve, wait_for_state, wait_until,
};

const MERIDIAN_KEY: &str = "meridian-test-key";

/// What the FHIR server holds: each resource by its identifier search, and the transactions
/// it was sent.
#[derive(Default)]
struct FhirServer {
    /// `ifNoneExist` search → the resource's `Type/id`.
    created: BTreeMap<String, String>,
    transactions: Vec<Value>,
    /// Transactions still to answer 500 after processing them (an answer lost on the way).
    lose_answers: usize,
}

type Shared = Arc<Mutex<FhirServer>>;

/// Processes a transaction: each entry is created unless its `ifNoneExist` finds one.
async fn transaction(
    State(server): State<Shared>,
    Json(bundle): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let mut server = server.lock().unwrap();
    server.transactions.push(bundle.clone());
    let mut responses = Vec::new();
    for entry in bundle["entry"].as_array().unwrap() {
        let kind = entry["request"]["url"].as_str().unwrap().to_owned();
        let search = format!(
            "{kind}?{}",
            entry["request"]["ifNoneExist"].as_str().unwrap()
        );
        let next = server.created.len() + 100;
        let (status, location) = match server.created.get(&search) {
            Some(found) => ("200 OK", found.clone()),
            None => {
                let location = format!("{kind}/{next}");
                server.created.insert(search, location.clone());
                ("201 Created", location)
            }
        };
        responses.push(
            json!({"response": {"status": status, "location": format!("{location}/_history/1")}}),
        );
    }
    if server.lose_answers > 0 {
        server.lose_answers -= 1;
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"resourceType": "OperationOutcome"})),
        );
    }
    (
        StatusCode::OK,
        Json(json!({"resourceType": "Bundle", "type": "transaction-response", "entry": responses})),
    )
}

#[tokio::test]
async fn a_fhir_lab_gets_each_order_once_however_often_it_is_sent_and_its_reports_reach_the_portal()
{
    let server: Shared = Arc::new(Mutex::new(FhirServer {
        lose_answers: 1,
        ..FhirServer::default()
    }));
    let router = axum::Router::new()
        .route("/fhir", axum::routing::post(transaction))
        .with_state(Arc::clone(&server));
    let (fhir_url, _fhir) = serve(router).await;
    let (lab, portal) = (
        Partner::start(201, json!({})).await,
        Partner::start(200, json!({})).await,
    );
    let fhir = format!("{fhir_url}/fhir");
    let mut env = vec![
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("MERIDIAN_FHIR_URL", fhir.as_str()),
        ("MERIDIAN_API_KEY", MERIDIAN_KEY),
    ];
    env.extend(FAST_RETRY);
    let ferry = Ferry::start_many(
        &[repo().join("flows"), repo().join("examples/fhir-lab/flows")],
        &env,
    )
    .await;

    let mut request = payload("test-request.json");
    request["lab"] = json!("meridian");
    let (status, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    assert_eq!(status, 202, "{reply}");
    let request_id = reply["request_id"].as_str().unwrap().to_owned();

    // The first answer is lost: the order is sent again, and creates nothing twice.
    let state = wait_for_state(&ferry.url, &request_id, "delivered_to_lab").await;
    let (transactions, created) = {
        let server = server.lock().unwrap();
        (server.transactions.clone(), server.created.clone())
    };
    assert_eq!(transactions.len(), 2, "sent again after the lost answer");
    assert_eq!(
        transactions[0], transactions[1],
        "the same transaction each time"
    );
    let tests = request["tests"].as_array().unwrap().len();
    let samples = request["samples"].as_array().unwrap().len();
    assert_eq!(
        created.len(),
        tests + samples + 1,
        "created once: {created:?}"
    );
    let first = &transactions[0]["entry"][0];
    assert_eq!(first["resource"]["resourceType"], "ServiceRequest");
    assert_eq!(
        first["resource"]["requisition"]["value"],
        request_id.as_str()
    );
    assert!(lab.received().is_empty(), "the default lab gets nothing");
    // The server's id of the first ServiceRequest is the request's lab order id.
    let service_request = created
        [&format!("ServiceRequest?identifier=urn:ferry:test-request|{request_id}/1")]
        .clone();
    let lab_order_id = service_request
        .trim_start_matches("ServiceRequest/")
        .to_owned();
    assert_eq!(state["lab_order_id"], lab_order_id.as_str());

    // The report, based on that ServiceRequest, reaches the portal in the portal's format.
    let mut report: Value = serde_json::from_slice(
        &std::fs::read(repo().join("examples/fhir-lab/flows/meridian-report.json")).unwrap(),
    )
    .unwrap();
    report["entry"][0]["resource"]["basedOn"] = json!([{"reference": service_request}]);
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/meridian/reports", ferry.url))
        .header("content-type", "application/fhir+json")
        .header("x-meridian-key", MERIDIAN_KEY)
        .body(report.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    wait_until("the portal has the results", || {
        portal.accepted().len() == 1
    })
    .await;
    let delivered = portal.accepted()[0].json();
    assert_eq!(delivered["request_id"], request_id.as_str());
    assert_eq!(delivered["lab_order_id"], lab_order_id.as_str());
    assert_eq!(delivered["status"], "completed");
    assert_eq!(
        delivered["results"][1],
        json!({"sample_id": "S-1", "code": "PB-ICPMS", "value": 12.5, "unit": "ug/L", "flag": "high", "comment": "above the limit"})
    );
    wait_for_state(&ferry.url, &request_id, "delivered_to_portal").await;
}

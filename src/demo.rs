//! `ferry demo`: the whole round trip on one machine, with nothing to set up.
//!
//! ferry serves the shipped flows on a temporary store, beside a simulated lab (it takes the
//! order, then posts results to ferry's webhook a moment later) and a simulated portal (it
//! takes the results). The demo submits the sample Test Request and prints each step of the
//! journey as it happens, then the whole timeline.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::project::{ProjectPaths, load_with_env};
use crate::runtime::Runtime;
use crate::store::Store;

/// The Test Request the demo submits.
const SAMPLE: &str = include_str!("../tests/fixtures/payloads/test-request.json");

/// Runs the demo with the flows of `paths`; the lab answers with results after `delay`.
/// Returns whether the results reached the portal.
///
/// # Errors
///
/// When the flows do not load or a server cannot start.
pub async fn run(paths: &ProjectPaths, delay: Duration) -> anyhow::Result<bool> {
    let (portal_url, portal_got) = simulated_portal().await?;
    let ferry_listener = TcpListener::bind("127.0.0.1:0").await?;
    let ferry_url = format!("http://{}", ferry_listener.local_addr()?);
    // Secrets of this run only: the portal's API key and the lab's webhook secret.
    let portal_key = format!("demo-{:016x}", fastrand::u64(..));
    let lab_secret = format!("demo-{:016x}", fastrand::u64(..));
    let lab_url = simulated_lab(ferry_url.clone(), delay, lab_secret.clone()).await?;

    let overrides = [
        ("LAB_URL", lab_url.clone()),
        ("PORTAL_URL", portal_url.clone()),
        ("PORTAL_API_KEY", portal_key.clone()),
        ("LAB_WEBHOOK_SECRET", lab_secret),
    ];
    let env = |name: &str| {
        overrides
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var(name).ok())
    };
    let project = load_with_env(paths, &env).map_err(|diagnostics| {
        let text: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("the flows do not load:\n{}", text.join("\n"))
    })?;
    let scratch = tempfile::tempdir().context("creating a temporary store")?;
    let store_path: PathBuf = scratch.path().join("ferry.db");
    let store = Store::open(&format!("sqlite://{}", store_path.display())).await?;
    let ferry = Runtime::start(
        &project,
        crate::targets::http_client()?,
        Some(store.clone()),
    );
    let router = crate::server::router(&ferry, None);
    tokio::spawn(async move { axum::serve(ferry_listener, router).await });

    println!(
        "ferry demo: the shipped flows, served on {ferry_url} (store {})",
        store_path.display()
    );
    println!("  simulated lab    {lab_url}  (takes orders, posts results {delay:?} later)");
    println!("  simulated portal {portal_url}  (takes results)\n");

    let sample: Value = serde_json::from_str(SAMPLE)?;
    println!(
        "portal → ferry   POST /api/v1/test-requests  (Test Request {})",
        sample["portal_ref"]
    );
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{ferry_url}/api/v1/test-requests"))
        .header("x-api-key", &portal_key)
        .json(&sample)
        .send()
        .await?;
    let status = response.status();
    let reply: Value = response.json().await?;
    println!("ferry → portal   {status} {reply}");
    let Some(request_id) = reply["request_id"].as_str().map(str::to_owned) else {
        return Ok(false);
    };

    let started = Instant::now();
    let mut shown = 0;
    let mut done = false;
    while started.elapsed() < delay + Duration::from_secs(30) {
        let status: Value = client
            .get(format!("{ferry_url}/api/v1/test-requests/{request_id}"))
            .header("x-api-key", &portal_key)
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        let history = status["history"].as_array().cloned().unwrap_or_default();
        for change in history.iter().skip(shown) {
            let state = change["state"].as_str().unwrap_or_default();
            let detail = match state {
                "accepted" => "stored; the portal has its answer".to_owned(),
                "delivered_to_lab" => {
                    format!("the lab took the order as {}", status["lab_order_id"])
                }
                "results_received" => {
                    "the lab posted results; they matched this request".to_owned()
                }
                "delivered_to_portal" => "the portal took the results".to_owned(),
                other => other.to_owned(),
            };
            println!(
                "  [{:<19}] {}  {detail}",
                state,
                change["at"].as_str().unwrap_or_default()
            );
        }
        shown = history.len();
        if status["status"] == "delivered_to_portal" || status["status"] == "failed" {
            done = status["status"] == "delivered_to_portal";
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(results) = portal_got.lock().await.first() {
        println!(
            "\nthe portal received:\n{}",
            serde_json::to_string_pretty(results)?
        );
    }
    if let Some(trace) = store.trace(&request_id).await? {
        println!("\ntimeline of request {request_id}, both directions:");
        for event in &trace.timeline {
            let detail = event.detail.as_object().map(|d| {
                d.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            println!(
                "  {}  {:<14} {:<9} {}",
                event.at,
                event.flow,
                event.kind,
                detail.unwrap_or_default()
            );
        }
    }
    println!(
        "\n{}",
        if done {
            "round trip complete"
        } else {
            "the round trip did not complete in time"
        }
    );
    ferry.shutdown(Duration::from_secs(2)).await;
    Ok(done)
}

/// A lab that takes every order with an id of its own and, `delay` later, posts results for
/// it to ferry's webhook.
async fn simulated_lab(
    ferry_url: String,
    delay: Duration,
    secret: String,
) -> anyhow::Result<String> {
    async fn take_order(
        State((ferry_url, delay, secret)): State<(String, Duration, String)>,
        axum::Json(order): axum::Json<Value>,
    ) -> (StatusCode, axum::Json<Value>) {
        let lab_order_id = format!("LAB-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        let id = lab_order_id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let results: Vec<Value> = order["tests"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| json!({"sample_id": t["sample_id"], "code": t["code"], "value": 7.2, "unit": "pH", "flag": "normal"}))
                .collect();
            let result = json!({
                "order_ref": order["order_ref"], "lab_order_id": id, "status": "completed",
                "completed_at": crate::store::rfc3339(crate::store::now_ms()), "results": results,
            });
            // Signed the Standard Webhooks way, as the lab-to-portal flow requires.
            let body = result.to_string();
            let id = format!("msg_{}", uuid::Uuid::now_v7().simple());
            let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
            // The flows loaded with this secret, so it is a valid one.
            let Ok(key) = crate::auth::webhook_key(&secret) else {
                return;
            };
            let mut request = reqwest::Client::new()
                .post(format!("{ferry_url}/api/v1/lab-results"))
                .header("content-type", "application/json");
            for (name, value) in crate::auth::webhook_headers(&key, &id, timestamp, body.as_bytes())
            {
                request = request.header(name, value);
            }
            let _ = request.body(body).send().await;
        });
        (
            StatusCode::CREATED,
            axum::Json(json!({"lab_order_id": lab_order_id})),
        )
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = Router::new()
        .route("/orders", axum::routing::post(take_order))
        .with_state((ferry_url, delay, secret));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// A portal that takes results and keeps them.
async fn simulated_portal() -> anyhow::Result<(String, Arc<tokio::sync::Mutex<Vec<Value>>>)> {
    let got: Arc<tokio::sync::Mutex<Vec<Value>>> = Arc::default();
    let keep = Arc::clone(&got);
    let app = Router::new().route(
        "/test-results",
        axum::routing::post(move |axum::Json(results): axum::Json<Value>| {
            let keep = Arc::clone(&keep);
            async move {
                keep.lock().await.push(results);
                StatusCode::OK
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, got))
}

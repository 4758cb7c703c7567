//! What callers send ferry: the portal's key, the lab's signed webhooks, JSON requests.

use serde_json::Value;

use super::{repo, unique};

/// The portal's API key in tests.
pub(crate) const PORTAL_KEY: &str = "test-portal-key";
/// The lab's webhook secret in tests.
pub(crate) const LAB_SECRET: &str = "test-lab-webhook-secret";
/// The secrets the shipped flows read, as tests set them.
pub(crate) const SECRETS: [(&str, &str); 2] = [
    ("PORTAL_API_KEY", PORTAL_KEY),
    ("LAB_WEBHOOK_SECRET", LAB_SECRET),
];

/// A client that sends the portal's API key with every request.
pub(crate) fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", PORTAL_KEY.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// The Standard Webhooks headers signing `body` with `secret`, now, under a fresh id.
pub(crate) fn webhook_headers(secret: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    let id = format!("msg_{}", unique("wh"));
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    ferry::auth::webhook_headers(
        &ferry::auth::webhook_key(secret).unwrap(),
        &id,
        timestamp,
        body,
    )
    .to_vec()
}

/// POSTs `body` with the portal's key and signed as the lab signs its webhooks, so it passes
/// whichever shipped flow serves `url`.
pub(crate) fn signed_post(url: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
    let mut request = client()
        .post(url)
        .header("content-type", "application/json");
    for (name, value) in webhook_headers(LAB_SECRET, &body) {
        request = request.header(name, value);
    }
    request.body(body)
}

/// POSTs JSON (with credentials, see [`signed_post`]) and returns the status and JSON reply.
pub(crate) async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let response = signed_post(url, serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Validates `instance` against a shipped schema and returns every violation.
pub(crate) fn schema_violations(schema: &str, instance: &Value) -> Vec<ferry::error::Violation> {
    let mut schemas = ferry::schema::Schemas::new(&[repo().join("schemas")]);
    ferry::schema::violations(&schemas.get(schema).unwrap(), instance)
}

/// A Test Request's status, as the shipped status endpoint of the ferry at `url` answers it.
pub(crate) async fn status_of(url: &str, request_id: &str) -> (u16, Value) {
    let response = client()
        .get(format!("{url}/api/v1/test-requests/{request_id}"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Waits until the status of a Test Request at `url` is `state`, and returns it.
pub(crate) async fn wait_for_state(url: &str, request_id: &str, state: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, last) = status_of(url, request_id).await;
        if last["status"] == state {
            return last;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request never became {state}: {last}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

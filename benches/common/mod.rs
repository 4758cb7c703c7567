//! What the HTTP benchmarks share: the key their ferries accept, the Test Request they send,
//! a server on a free loopback port, and one submission.

use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;

/// The portal API key (and lab webhook secret) the benchmarked ferries are given.
pub(crate) const KEY: &str = "bench-key";

/// The shipped example Test Request; senders give each copy its own `portal_ref`.
pub(crate) fn test_request() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/payloads/test-request.json"
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Serves `router` on 127.0.0.1 and returns its URL.
pub(crate) async fn serve(router: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// Posts `body` to `url` with the key, and insists on `202 Accepted`.
pub(crate) async fn submit(http: &reqwest::Client, url: &str, body: &Value) {
    let response = http
        .post(url)
        .header("x-api-key", KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let _ = response.bytes().await;
}

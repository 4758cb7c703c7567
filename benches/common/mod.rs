//! What the HTTP benchmarks share: the key their ferries accept, the Test Request they send,
//! a server on a free loopback port, and one submission. Fixtures and the server come from
//! `tests/support`, which the integration tests use too.

use axum::Router;
use serde_json::Value;

#[path = "../../tests/support/mod.rs"]
#[allow(dead_code, reason = "each benchmark uses part of what the tests share")]
pub(crate) mod support;

/// The portal API key (and lab webhook secret) the benchmarked ferries are given.
pub(crate) const KEY: &str = "bench-key";

/// The shipped example Test Request; senders give each copy its own `portal_ref`.
pub(crate) fn test_request() -> Value {
    support::payload("test-request.json")
}

/// Serves `router` on 127.0.0.1 for as long as the benchmark runs, and returns its URL.
pub(crate) async fn serve(router: Router) -> String {
    let (url, stop) = support::serve(router).await;
    std::mem::forget(stop);
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

//! What the integration tests and the benchmarks share: fixtures, a server on a free
//! loopback port, and the URL a spawned server says it listens on.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::Child;

use axum::Router;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A payload from `tests/fixtures/payloads`.
pub(crate) fn payload(name: &str) -> Value {
    let path = repo().join("tests/fixtures/payloads").join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Serves `router` on an ephemeral loopback port until the returned sender is dropped.
pub(crate) async fn serve(router: Router) -> (String, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (url, tx)
}

/// The URL `child` (spawned with its stdout piped) prints first, after `prefix` (such as
/// `"ferry listening on "`).
pub(crate) fn listening_url(child: &mut Child, prefix: &str) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .to_owned()
}

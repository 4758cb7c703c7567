//! Waiting until something holds, bounded, instead of sleeping.

/// Polls `check` every 10 ms until it holds, failing after 10 s with `what`.
pub(crate) async fn wait_until<F: FnMut() -> bool>(what: &str, check: F) {
    wait_until_within(what, 10, check).await;
}

/// Polls `check` every 10 ms until it holds, failing after `seconds` with `what`.
pub(crate) async fn wait_until_within<F: FnMut() -> bool>(what: &str, seconds: u64, mut check: F) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`], for checks that must await.
pub(crate) async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

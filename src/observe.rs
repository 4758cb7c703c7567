//! Metrics in Prometheus' text format, served at `GET /metrics`.
//!
//! Names follow Prometheus conventions (`_total` counters, units in names) and labels stay
//! bounded: flow, step, target, outcome and error code — never a message id.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets, in seconds: from a millisecond to a minute.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0,
];

/// Installs the process-wide recorder; until then, recording metrics costs nothing.
///
/// # Errors
///
/// When a recorder is already installed.
pub fn install() -> Result<(), String> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    HANDLE
        .set(handle)
        .map_err(|_| "metrics are already installed".to_owned())
}

/// The metrics now, in Prometheus' text format, if they are installed.
pub fn render() -> Option<String> {
    HANDLE.get().map(PrometheusHandle::render)
}

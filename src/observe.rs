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

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(1);

/// Installs the process-wide recorder; until then, recording metrics costs nothing.
///
/// The recorder keeps each histogram sample until it is folded into its buckets, which
/// rendering does; a thread does it every second as well, so memory stays flat when
/// nobody scrapes `/metrics`.
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
        .map_err(|_| "metrics are already installed".to_owned())?;
    std::thread::Builder::new()
        .name("ferry-metrics-upkeep".into())
        .spawn(|| {
            loop {
                std::thread::sleep(UPKEEP);
                if let Some(handle) = HANDLE.get() {
                    handle.run_upkeep();
                }
            }
        })
        .map_err(|e| format!("starting the metrics upkeep: {e}"))?;
    Ok(())
}

/// The metrics now, in Prometheus' text format, if they are installed.
pub fn render() -> Option<String> {
    HANDLE.get().map(PrometheusHandle::render)
}

/// A metric with fixed labels, registered with the recorder once and reused: registering
/// looks the metric up by name and labels, which no message should pay for again.
///
/// Before [`install`] nothing is kept, so a message handled that early (a delivery left from
/// the last run, say) does not tie the metric to no recorder for good.
pub(crate) struct Registered<T>(OnceLock<T>);

impl<T: Clone> Registered<T> {
    /// The metric, registered by `register` when not yet.
    pub(crate) fn get(&self, register: impl FnOnce() -> T) -> T {
        if HANDLE.get().is_none() {
            return register();
        }
        self.0.get_or_init(register).clone()
    }
}

impl<T> Default for Registered<T> {
    fn default() -> Self {
        Self(OnceLock::new())
    }
}

impl<T> std::fmt::Debug for Registered<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registered")
    }
}

/// A flow's metrics whose labels are fixed when it loads: each registered once.
#[derive(Debug, Default)]
pub(crate) struct FlowMeters {
    pub(crate) received: Registered<metrics::Counter>,
    pub(crate) accepted: Registered<metrics::Counter>,
    /// Each step's duration, by the step's index.
    pub(crate) steps: Vec<Registered<metrics::Histogram>>,
    /// Each target's deliveries, by the target's index.
    pub(crate) targets: Vec<TargetMeters>,
}

impl FlowMeters {
    /// The meters of a flow with `steps` steps and `targets` targets.
    pub(crate) fn new(steps: usize, targets: usize) -> Self {
        Self {
            steps: std::iter::repeat_with(Registered::default)
                .take(steps)
                .collect(),
            targets: std::iter::repeat_with(TargetMeters::default)
                .take(targets)
                .collect(),
            ..Self::default()
        }
    }
}

/// A target's delivery metrics.
#[derive(Debug, Default)]
pub(crate) struct TargetMeters {
    pub(crate) in_flight: Registered<metrics::Gauge>,
    pub(crate) duration: Registered<metrics::Histogram>,
    pub(crate) delivered: Registered<metrics::Counter>,
    pub(crate) retried: Registered<metrics::Counter>,
    pub(crate) dead_lettered: Registered<metrics::Counter>,
}

/// Trace export over OTLP/HTTP, compiled in only with the `otlp` feature.
#[cfg(feature = "otlp")]
pub mod otlp {
    use std::collections::HashMap;
    use std::sync::OnceLock;

    use opentelemetry::propagation::TextMapPropagator as _;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    /// A tracing layer exporting spans, in batches, to the collector at `endpoint` (such as
    /// `http://127.0.0.1:4318`; `/v1/traces` is added when missing).
    ///
    /// # Errors
    ///
    /// When the exporter cannot be built.
    pub fn layer<S>(endpoint: &str) -> Result<impl tracing_subscriber::Layer<S>, String>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let endpoint = if endpoint.ends_with("/v1/traces") {
            endpoint.to_owned()
        } else {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| e.to_string())?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("ferry")
                    .build(),
            )
            .build();
        let tracer = provider.tracer("ferry");
        let _ = PROVIDER.set(provider);
        Ok(tracing_opentelemetry::layer().with_tracer(tracer))
    }

    /// Sends the spans not yet exported.
    pub fn shutdown() {
        if let Some(provider) = PROVIDER.get() {
            let _ = provider.shutdown();
        }
    }

    /// A span named `name` continuing the W3C trace of `traceparent`, when there is one.
    pub fn span(name: &'static str, flow: &str, traceparent: Option<&str>) -> tracing::Span {
        let span = tracing::info_span!("ferry", otel.name = name, flow);
        if let Some(traceparent) = traceparent {
            let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
            let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
        }
        span
    }
}

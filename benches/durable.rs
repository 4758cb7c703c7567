//! Accepted Test Requests per second, and latency, through the real HTTP server with the
//! shipped portal-to-lab flow: the durable SQLite store (every commit synced to disk) beside
//! the same flow on an in-memory store (`sqlite::memory:`, nothing synced), at 1, 16 and 64
//! concurrent clients, in one run. The lab is a mock on loopback that accepts every order.
//!
//! Then observability's cost: Prometheus metrics and JSON logs switched on and off in turns
//! on one server, so both sides see the same machine, store and moment.
//!
//! Run with `cargo bench --bench durable`. Each cell runs for a bounded time
//! (`FERRY_BENCH_SECONDS`, default 3 s).
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use ferry::project::{ProjectPaths, load_with_env};
use ferry::runtime::Runtime;
use ferry::store::Store;
use serde_json::json;

mod common;

use common::{KEY, serve, submit, test_request};

/// A metrics recorder that records into Prometheus while `on`, and nowhere otherwise.
struct Toggle {
    inner: metrics_exporter_prometheus::PrometheusRecorder,
    on: Arc<AtomicBool>,
}

impl metrics::Recorder for Toggle {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Counter {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_counter(key, metadata)
        } else {
            metrics::Counter::noop()
        }
    }

    fn register_gauge(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Gauge {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_gauge(key, metadata)
        } else {
            metrics::Gauge::noop()
        }
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if self.on.load(Ordering::Relaxed) {
            self.inner.register_histogram(key, metadata)
        } else {
            metrics::Histogram::noop()
        }
    }
}

struct Cell {
    requests: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Cell {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let at =
            ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[at]
    }
}

async fn load(url: &str, clients: usize, seconds: u64, run: &str) -> Cell {
    let http = reqwest::Client::new();
    let template = test_request();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (http, url, mut body, run) = (
            http.clone(),
            url.to_owned(),
            template.clone(),
            run.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                body["portal_ref"] = json!(format!("PR-{run}-{client}-{n}"));
                let sent = Instant::now();
                submit(&http, &url, &body).await;
                latencies.push(sent.elapsed());
                n += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    Cell {
        requests: latencies.len() as u64,
        elapsed: started.elapsed(),
        latencies,
    }
}

fn main() {
    let seconds: u64 = std::env::var("FERRY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let lab = serve(Router::new().fallback(|| async { (axum::http::StatusCode::CREATED, axum::Json(json!({"lab_order_id": "LAB-1"}))) })).await;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let env = move |name: &str| match name {
            "LAB_URL" => Some(lab.clone()),
            "PORTAL_API_KEY" | "LAB_WEBHOOK_SECRET" => Some(KEY.to_owned()),
            _ => None,
        };
        let project = load_with_env(&ProjectPaths::new(&root.join("flows"), None), &env).unwrap();
        let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let stores = [
            ("durable (SQLite file, synced)", format!("sqlite://{}/bench.db", scratch.path().display())),
            ("in-memory (sqlite::memory:, no sync)", "sqlite::memory:".to_owned()),
        ];
        let mut results = Vec::new();
        for (run, (name, url)) in stores.iter().enumerate() {
            let store = Store::open(url).await.unwrap();
            let ferry = Runtime::start(&project, ferry::targets::http_client().unwrap(), Some(store.clone()));
            let base = serve(ferry::server::router(&ferry, None)).await;
            let endpoint = format!("{base}/api/v1/test-requests");
            load(&endpoint, 4, 1, &format!("W{run}")).await;
            for clients in [1, 16, 64] {
                let before = store.commit_stats();
                let mut cell = load(&endpoint, clients, seconds, &format!("R{run}-{clients}")).await;
                let after = store.commit_stats();
                let messages = after.messages - before.messages;
                let commits = after.commits - before.commits;
                let p50 = cell.percentile(0.50);
                let p99 = cell.percentile(0.99);
                println!(
                    "{name:<38} clients {clients:>3}: {:>7.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  {:.1} writes/commit ({messages} messages, {commits} commits)",
                    cell.per_second(),
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3,
                    (after.writes - before.writes) as f64 / commits.max(1) as f64,
                );
                results.push((name.to_owned(), clients, cell.per_second(), p99));
            }
            ferry.shutdown(Duration::from_secs(5)).await;
        }
        // Observability's cost: the durable store at 16 clients, with Prometheus metrics and
        // JSON logs (to a sink) switched on and off in turns, so noise hits both sides alike.
        let on = Arc::new(AtomicBool::new(false));
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::set_global_recorder(Toggle { inner: recorder, on: Arc::clone(&on) }).unwrap();
        let (filter, logs) = tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new("off"));
        {
            use tracing_subscriber::layer::SubscriberExt as _;
            use tracing_subscriber::util::SubscriberInitExt as _;
            tracing_subscriber::registry()
                .with(filter)
                .with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(std::io::sink))
                .init();
        }
        let store = Store::open(&format!("sqlite://{}/observed.db", scratch.path().display())).await.unwrap();
        let ferry = Runtime::start(&project, ferry::targets::http_client().unwrap(), Some(store));
        let base = serve(ferry::server::router(&ferry, None)).await;
        let endpoint = format!("{base}/api/v1/test-requests");
        load(&endpoint, 4, 1, "OW").await;
        // One-second turns, off-on then on-off (ABBA), so the store's slow drift as it grows
        // weighs on both sides alike.
        let rounds = 2 * seconds.max(2);
        for level in ["info", "ferry=debug"] {
            let (mut off, mut observed) = (0.0, 0.0);
            for round in 0..rounds {
                for observing in if round % 2 == 0 { [false, true] } else { [true, false] } {
                    on.store(observing, Ordering::Relaxed);
                    let filter = if observing { level } else { "off" };
                    logs.modify(|f| *f = tracing_subscriber::EnvFilter::new(filter)).unwrap();
                    let rate = load(&endpoint, 16, 1, &format!("O{round}-{}-{}", level.len(), u8::from(observing))).await.per_second();
                    if observing { observed += rate } else { off += rate }
                }
            }
            let rounds = rounds as f64;
            let (off, observed) = (off / rounds, observed / rounds);
            println!(
                "\nmetrics + JSON logs at {level:<11}, 16 clients, durable: {off:.0} req/s off, {observed:.0} req/s on: ratio {:.3} ({:+.1}%)",
                observed / off,
                100.0 * (observed - off) / off
            );
        }
        ferry.shutdown(Duration::from_secs(5)).await;
        println!();
        for clients in [1, 16, 64] {
            let rate = |store: &str| results.iter().find(|r| r.0 == store && r.1 == clients).map(|r| (r.2, r.3)).unwrap();
            let (durable, durable_p99) = rate(stores[0].0);
            let (memory, memory_p99) = rate(stores[1].0);
            println!(
                "clients {clients:>3}: durable keeps {:.0}% of in-memory throughput; p99 {:.2} ms vs {:.2} ms",
                100.0 * durable / memory,
                durable_p99.as_secs_f64() * 1e3,
                memory_p99.as_secs_f64() * 1e3
            );
        }
    });
}

//! Messages per second from a queue, through a flow, to an HTTP target, with acks on: for the
//! embedded queue, RabbitMQ and NATS JetStream, in one run. Each driver's queue is filled
//! first, then ferry starts and drains it; the clock runs from ferry's start until the target
//! has every message. The flow is the queue fixture's consumer (`delivery: sync`: each
//! message is acknowledged once the target took it). Then the other way: how fast a durable
//! flow publishes to each queue.
//!
//! Run with `cargo bench --bench queues` (RabbitMQ on 127.0.0.1:5672 and NATS JetStream on
//! 127.0.0.1:4222 must answer). `FERRY_BENCH_MESSAGES` sets the count (default 2000).
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use ferry::project::{ProjectPaths, load_with_env};
use ferry::runtime::Runtime;
use ferry::store::Store;
use serde_json::json;
use tokio::net::TcpListener;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const NATS: &str = "nats://127.0.0.1:4222";

async fn fill(driver: &str, queue: &str, store: &Store, count: u64) {
    match driver {
        "embedded" => {
            for n in 0..count {
                store
                    .enqueue(queue, json!({"n": n}).to_string(), Default::default())
                    .await
                    .unwrap();
            }
        }
        "amqp" => {
            use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
            let connection =
                lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
                    .await
                    .unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let durable = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(queue.into(), durable, lapin::types::FieldTable::default())
                .await
                .unwrap();
            for n in 0..count {
                let body = json!({"n": n}).to_string();
                let properties = lapin::BasicProperties::default().with_delivery_mode(2);
                channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        properties,
                    )
                    .await
                    .unwrap();
            }
            channel.wait_for_confirms().await.unwrap();
            let _ = connection.close(0, "filled".into()).await;
        }
        _ => {
            let context = async_nats::jetstream::new(async_nats::connect(NATS).await.unwrap());
            context
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: ferry::queue::nats_stream_name(queue),
                    subjects: vec![queue.to_owned()],
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut acks = Vec::new();
            for n in 0..count {
                acks.push(
                    context
                        .publish(queue.to_owned(), json!({"n": n}).to_string().into())
                        .await
                        .unwrap(),
                );
            }
            for ack in acks {
                ack.await.unwrap();
            }
        }
    }
}

fn main() {
    let count: u64 = std::env::var("FERRY_BENCH_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        let sink = Router::new().fallback(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            async { axum::Json(json!({})) }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, sink).await.unwrap() });
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for driver in ["embedded", "amqp", "nats"] {
            let queue = format!("bench.{driver}.{}", uuid::Uuid::now_v7().simple());
            let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let store = Store::open(&format!("sqlite://{}/bench.db", scratch.path().display())).await.unwrap();
            fill(driver, &queue, &store, count).await;
            let env = {
                let (queue, sink_url) = (queue.clone(), sink_url.clone());
                move |name: &str| match name {
                    "EMBEDDED_QUEUE" | "AMQP_QUEUE" | "NATS_QUEUE" => Some(queue.clone()),
                    "AMQP_URL" => Some(AMQP.to_owned()),
                    "NATS_URL" => Some(NATS.to_owned()),
                    "SINK_URL" => Some(sink_url.clone()),
                    _ => None,
                }
            };
            let flows = root.join("tests/fixtures/queues/flows");
            let mut project = load_with_env(&ProjectPaths::new(&flows, Some(&root.join("schemas"))), &env).unwrap();
            // Only this driver's consumer runs.
            project.flows.retain(|f| f.name == format!("{driver}-consume"));
            received.store(0, Ordering::Relaxed);
            let started = Instant::now();
            let ferry = Runtime::start(&project, ferry::targets::http_client().unwrap(), Some(store));
            let deadline = started + Duration::from_secs(120);
            while received.load(Ordering::Relaxed) < count && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let elapsed = started.elapsed();
            let done = received.load(Ordering::Relaxed);
            println!(
                "{driver:<9} {done:>6} messages in {:>6.2} s: {:>7.0} messages/s (queue → flow → HTTP target, acked)",
                elapsed.as_secs_f64(),
                done as f64 / elapsed.as_secs_f64()
            );
            ferry.shutdown(Duration::from_secs(5)).await;
        }
        for driver in ["embedded", "amqp", "nats"] {
            publish(root, driver, count).await;
        }
    });
}

/// Messages per second a durable flow publishes to a queue: `count` accepted by the flow
/// from 64 tasks at once, the clock running until the store has every one delivered
/// (committed to the embedded queue, or confirmed by the broker).
async fn publish(root: &std::path::Path, driver: &str, count: u64) {
    let queue = format!("bench.publish.{driver}.{}", uuid::Uuid::now_v7().simple());
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Store::open(&format!("sqlite://{}/bench.db", scratch.path().display()))
        .await
        .unwrap();
    let env = move |name: &str| match name {
        "EMBEDDED_QUEUE" | "AMQP_QUEUE" | "NATS_QUEUE" => Some(queue.clone()),
        "AMQP_URL" => Some(AMQP.to_owned()),
        "NATS_URL" => Some(NATS.to_owned()),
        // The consumers' target: they are not run here.
        "SINK_URL" => Some("http://127.0.0.1:9".to_owned()),
        _ => None,
    };
    let flows = root.join("tests/fixtures/queues/flows");
    let mut project = load_with_env(
        &ProjectPaths::new(&flows, Some(&root.join("schemas"))),
        &env,
    )
    .unwrap();
    project
        .flows
        .retain(|f| f.name == format!("{driver}-publish"));
    let ferry = Runtime::start(
        &project,
        ferry::targets::http_client().unwrap(),
        Some(store.clone()),
    );
    let flow = Arc::clone(&ferry.flows()[0]);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (ferry, flow, next) = (Arc::clone(&ferry), Arc::clone(&flow), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let meta = ferry::message::Meta::new(&flow.name);
                let message = ferry::message::Message::new(json!({"n": 1}), meta);
                ferry.handle(&flow, message).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let deadline = started + Duration::from_secs(120);
    while store.undelivered().await.unwrap() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    println!(
        "{driver:<9} {count:>6} messages in {:>6.2} s: {:>7.0} messages/s (HTTP flow → queue, durable, confirmed)",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    ferry.shutdown(Duration::from_secs(5)).await;
}

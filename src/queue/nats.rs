//! NATS JetStream through async-nats: a stream per subject, publishes acknowledged by the
//! stream (and deduplicated by `Nats-Msg-Id`), durable pull consumers with explicit acks.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, Context};
use tokio::sync::Mutex;

use super::{PublishError, QueueSpec};

/// One JetStream context per server URL, opened again after a failure.
#[derive(Debug, Default)]
pub(super) struct Publishers {
    contexts: Mutex<HashMap<String, Context>>,
}

/// Connects to the server at `url`.
pub(crate) async fn connect(url: &str) -> Result<Context, String> {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(Some(1))
        .connection_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| format!("nats: {e}"))?;
    Ok(jetstream::new(client))
}

/// The shortest duplicate window a stream is given: JetStream's own default.
const MIN_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The longest: JetStream keeps every message id of the window in memory.
const MAX_DUPLICATE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// The stream that holds `subject`: named after it, created on first use. A publisher names
/// how long it may retry one message (`dedup`): the stream then drops a repeated
/// `Nats-Msg-Id` for at least that long (within [`MIN_DUPLICATE_WINDOW`] and
/// [`MAX_DUPLICATE_WINDOW`]), widening the window of a stream that has a shorter one, so a
/// late retry of a publish that did land is not stored twice.
pub(crate) async fn stream(
    context: &Context,
    subject: &str,
    dedup: Option<Duration>,
) -> Result<jetstream::stream::Stream, String> {
    let failed = |e: &dyn std::fmt::Display| format!("nats stream for \"{subject}\": {e}");
    let window = dedup.map(|d| d.clamp(MIN_DUPLICATE_WINDOW, MAX_DUPLICATE_WINDOW));
    let stream = context
        .get_or_create_stream(jetstream::stream::Config {
            name: super::nats_stream_name(subject),
            subjects: vec![subject.to_owned()],
            duplicate_window: window.unwrap_or(MIN_DUPLICATE_WINDOW),
            ..Default::default()
        })
        .await
        .map_err(|e| failed(&e))?;
    let config = &stream.cached_info().config;
    if let Some(window) = window
        && config.duplicate_window < window
    {
        let wider = jetstream::stream::Config {
            duplicate_window: window,
            ..config.clone()
        };
        context
            .update_stream(&wider)
            .await
            .map_err(|e| failed(&e))?;
    }
    Ok(stream)
}

impl Publishers {
    /// From the consumer's own count: messages not yet delivered, and delivered unacked.
    pub(super) async fn backlog(
        &self,
        spec: &QueueSpec,
        consumer: &str,
    ) -> Result<super::Backlog, PublishError> {
        let context = connect(&spec.url).await.map_err(PublishError)?;
        let stream = stream(&context, &spec.name, None)
            .await
            .map_err(PublishError)?;
        let info = stream
            .consumer_info(consumer)
            .await
            .map_err(|e| PublishError(format!("nats consumer info: {e}")))?;
        Ok(super::Backlog {
            depth: info.num_pending + info.num_ack_pending as u64,
            lag: info.num_pending,
        })
    }

    pub(super) async fn publish(
        &self,
        spec: &QueueSpec,
        payload: Vec<u8>,
        headers: &BTreeMap<String, String>,
        dedup: Duration,
    ) -> Result<(), PublishError> {
        let mut contexts = self.contexts.lock().await;
        if !contexts.contains_key(&spec.url) {
            let context = connect(&spec.url).await.map_err(PublishError)?;
            contexts.insert(spec.url.clone(), context);
        }
        let context = contexts[&spec.url].clone();
        drop(contexts);
        let result = publish_on(&context, spec, payload, headers, dedup).await;
        if result.is_err() {
            self.contexts.lock().await.remove(&spec.url);
        }
        result
    }
}

async fn publish_on(
    context: &Context,
    spec: &QueueSpec,
    payload: Vec<u8>,
    headers: &BTreeMap<String, String>,
    dedup: Duration,
) -> Result<(), PublishError> {
    stream(context, &spec.name, Some(dedup))
        .await
        .map_err(PublishError)?;
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers {
        map.insert(name.as_str(), value.as_str());
    }
    if let Some(key) = headers.get(super::IDEMPOTENCY_KEY) {
        // The stream drops a second publish with the same id within its window, which
        // `stream` keeps as long as this publish may be retried.
        map.insert("Nats-Msg-Id", key.as_str());
    }
    context
        .publish_with_headers(spec.name.clone(), map, payload.into())
        .await
        .map_err(|e| PublishError(format!("nats: {e}")))?
        .await
        .map_err(|e| PublishError(format!("nats: {e}")))?;
    Ok(())
}

/// Reads a message's headers as text.
pub(crate) fn headers_of(message: &async_nats::Message) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    if let Some(map) = &message.headers {
        for (name, values) in map.iter() {
            if let Some(value) = values.first() {
                headers.insert(name.to_string(), value.to_string());
            }
        }
    }
    headers
}

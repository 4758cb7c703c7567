//! Queue consumers: one per flow with a `queue` trigger.
//!
//! Each consumer hands every message to its flow and settles it by the outcome: done
//! (acknowledged once the flow committed its outputs), retried later (a passing failure), or
//! dead (a permanent failure, or too many attempts: kept among ferry's dead letters, then
//! acknowledged so the queue does not redeliver it forever). A broker that goes away is
//! reconnected to with backoff; until then nothing is acknowledged, so nothing is lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::QueueDriver;
use crate::engine::Engine;
use crate::flow::{Flow, QueueTrigger};
use crate::message::{IDEMPOTENCY_KEY, Message, Meta};
use crate::queue::{QueueSpec, amqp, nats};
use crate::store::now_ms;

/// How often an idle embedded consumer looks for messages.
const POLL: Duration = Duration::from_millis(50);
/// How long JetStream waits for an ack before delivering a message again: what a consumer
/// killed mid-batch costs. Messages that take longer are kept by progress acks.
const NATS_ACK_WAIT: Duration = Duration::from_secs(10);
/// The wait before reconnecting to a broker after a connection that worked was lost.
const FIRST_RECONNECT: Duration = Duration::from_millis(200);
/// The longest wait before reconnecting to a broker.
const MAX_RECONNECT: Duration = Duration::from_secs(30);

/// What became of one queue message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Handled: acknowledge it.
    Done,
    /// A passing failure: deliver it again after this long.
    Retry(Duration),
    /// Kept among the dead letters: acknowledge it so it is not delivered again.
    Dead,
}

/// The running consumers.
#[derive(Debug)]
pub struct Consumers {
    stop: CancellationToken,
    tasks: tokio::sync::Mutex<JoinSet<()>>,
}

impl Consumers {
    /// Starts a consumer for every flow of `engine` with a queue trigger.
    pub fn start(engine: &Arc<Engine>) -> Self {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for flow in engine.flows() {
            if flow.queue_trigger().is_some() {
                let consumer = Consumer {
                    engine: Arc::clone(engine),
                    flow: Arc::clone(flow),
                    stop: stop.clone(),
                    connected: AtomicBool::new(false),
                };
                tasks.spawn(consumer.run());
            }
        }
        Self {
            stop,
            tasks: tokio::sync::Mutex::new(tasks),
        }
    }

    /// Stops taking messages and waits up to `grace` for those in hand. Unsettled messages
    /// are delivered again later.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        let mut tasks = self.tasks.lock().await;
        if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tasks.abort_all();
        }
    }
}

struct Consumer {
    engine: Arc<Engine>,
    flow: Arc<Flow>,
    stop: CancellationToken,
    /// Set once the broker took the consumer: the connection that follows a good one is
    /// tried again at once, not after the backoff of earlier outages.
    connected: AtomicBool,
}

impl Consumer {
    fn trigger(&self) -> &QueueTrigger {
        self.flow
            .queue_trigger()
            .expect("consumers run only for queue triggers")
    }

    async fn run(self) {
        let spec = self.trigger().spec.clone();
        let mut wait = FIRST_RECONNECT;
        loop {
            let result = match spec.driver {
                QueueDriver::Embedded => self.embedded(&spec).await,
                QueueDriver::Amqp => self.amqp(&spec).await,
                QueueDriver::Nats => self.nats(&spec).await,
            };
            if self.stop.is_cancelled() {
                break;
            }
            // A new outage starts the backoff over: each one is waited out on its own terms.
            if self.connected.swap(false, Ordering::Relaxed) {
                wait = FIRST_RECONNECT;
            }
            if let Err(error) = result {
                self.engine.brokers().mark(&spec.url, false);
                tracing::warn!(flow = %self.flow.name, queue = %spec, %error, retry_in = ?wait, "consumer lost its queue");
            }
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(MAX_RECONNECT);
        }
    }

    /// Records that the broker took the consumer.
    fn took(&self, spec: &QueueSpec) {
        self.connected.store(true, Ordering::Relaxed);
        self.engine.brokers().mark(&spec.url, true);
    }

    async fn embedded(&self, spec: &QueueSpec) -> Result<(), String> {
        let store = self
            .engine
            .store()
            .ok_or("embedded queues need a store")?
            .clone();
        let prefetch = u32::from(self.trigger().prefetch);
        while !self.stop.is_cancelled() {
            let items = store
                .claim_queue(&spec.name, prefetch)
                .await
                .map_err(|e| e.to_string())?;
            if items.is_empty() {
                tokio::select! {
                    () = self.stop.cancelled() => break,
                    () = tokio::time::sleep(POLL) => continue,
                }
            }
            let mut handling = JoinSet::new();
            for item in items {
                let (engine, flow, store) = (
                    Arc::clone(&self.engine),
                    Arc::clone(&self.flow),
                    store.clone(),
                );
                handling.spawn(async move {
                    let settled = handle(&engine, &flow, item.payload.as_bytes(), item.headers, item.attempts + 1).await;
                    let retry_at = match settled {
                        Settled::Retry(wait) => Some(now_ms() + wait.as_millis() as i64),
                        Settled::Done | Settled::Dead => {
                            crate::fault::pass(crate::fault::Point::BeforeQueueAck);
                            None
                        }
                    };
                    if let Err(error) = store.finish_queue(item.id, retry_at).await {
                        // Left in flight: its lease runs out and it is delivered again.
                        tracing::error!(flow = %flow.name, %error, "settling a queue message failed");
                    }
                });
            }
            while handling.join_next().await.is_some() {}
        }
        Ok(())
    }

    async fn amqp(&self, spec: &QueueSpec) -> Result<(), String> {
        use lapin::options::{
            BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
        };
        let (connection, channel) = amqp::connect(&spec.url).await.map_err(|e| e.to_string())?;
        amqp::declare(&channel, &spec.name)
            .await
            .map_err(|e| e.to_string())?;
        let prefetch = self.trigger().prefetch;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let tag = format!("ferry-{}", self.flow.name);
        let mut deliveries = channel
            .basic_consume(
                spec.name.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.took(spec);
        // AMQP keeps no count of deliveries; ferry counts attempts per message while it runs.
        let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let mut handling = JoinSet::new();
        let result = loop {
            while handling.try_join_next().is_some() {}
            let next = tokio::select! {
                () = self.stop.cancelled() => break Ok(()),
                next = deliveries.next() => next,
            };
            let delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => break Err(error.to_string()),
                None => break Err("the broker closed the consumer".into()),
            };
            let mut headers = amqp::headers_of(&delivery.properties);
            // Only the publisher's own id identifies a message: delivery tags start again at 1
            // on every channel, so one taken as a key would make a new message a "duplicate"
            // of an old one. Without an id, each delivery is handled as new (at least once).
            let key = headers.get(IDEMPOTENCY_KEY).cloned().or_else(|| {
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
            });
            if let Some(key) = &key {
                headers
                    .entry(IDEMPOTENCY_KEY.to_owned())
                    .or_insert_with(|| key.clone());
            }
            // Attempts are counted by the id, or by the content of a message without one.
            let counted = key.unwrap_or_else(|| content_key(&delivery.data));
            let attempt = {
                let mut counts = attempts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let count = counts.entry(counted.clone()).or_default();
                *count += 1;
                *count
            };
            let (engine, flow, attempts) = (
                Arc::clone(&self.engine),
                Arc::clone(&self.flow),
                Arc::clone(&attempts),
            );
            handling.spawn(async move {
                let settled = handle(&engine, &flow, &delivery.data, headers, attempt).await;
                let outcome = match settled {
                    Settled::Done | Settled::Dead => {
                        crate::fault::pass(crate::fault::Point::BeforeQueueAck);
                        attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&counted);
                        delivery.ack(BasicAckOptions::default()).await
                    }
                    Settled::Retry(wait) => {
                        // AMQP has no delayed requeue: hold the message (and its prefetch
                        // slot) for the backoff, then hand it back.
                        tokio::time::sleep(wait).await;
                        delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await
                    }
                };
                if let Err(error) = outcome {
                    tracing::warn!(flow = %flow.name, %error, "settling an AMQP message failed; it will be delivered again");
                }
            });
        };
        // Unsettled deliveries go back to the queue when the channel closes.
        handling.abort_all();
        let _ = connection.close(0, "ferry stopping".into()).await;
        result
    }

    async fn nats(&self, spec: &QueueSpec) -> Result<(), String> {
        use async_nats::jetstream::AckKind;
        use async_nats::jetstream::consumer::{AckPolicy, pull};
        let trigger = self.trigger();
        let context = nats::connect(&spec.url).await?;
        let stream = nats::stream(&context, &spec.name, None).await?;
        let durable = crate::queue::nats_consumer_name(&self.flow.name);
        let consumer: pull::Stream = stream
            .get_or_create_consumer(
                &durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: NATS_ACK_WAIT,
                    // One more than ferry's own attempts: the last delivery becomes the dead letter.
                    max_deliver: i64::from(trigger.attempts) + 1,
                    max_ack_pending: i64::from(trigger.prefetch),
                    filter_subject: spec.name.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("nats consumer: {e}"))?
            .stream()
            .max_messages_per_batch(usize::from(trigger.prefetch))
            .messages()
            .await
            .map_err(|e| format!("nats consumer: {e}"))?;
        self.took(spec);
        let mut messages = consumer;
        let slots = Arc::new(Semaphore::new(usize::from(trigger.prefetch)));
        let mut handling = JoinSet::new();
        let result = loop {
            while handling.try_join_next().is_some() {}
            let next = tokio::select! {
                () = self.stop.cancelled() => break Ok(()),
                next = messages.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => break Err(format!("nats: {error}")),
                None => break Err("the server closed the consumer".into()),
            };
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                break Ok(());
            };
            let (engine, flow) = (Arc::clone(&self.engine), Arc::clone(&self.flow));
            handling.spawn(async move {
                let info = message.info().ok();
                let attempt = info.as_ref().map_or(1, |i| u32::try_from(i.delivered).unwrap_or(1));
                let mut headers = nats::headers_of(&message.message);
                // Without the publisher's key, the stream's sequence number names the message
                // across redeliveries; with the time it was stored, even a stream deleted and
                // made again (which numbers from 1 again) cannot give an old key to a new one.
                if let (false, Some(info)) = (headers.contains_key(IDEMPOTENCY_KEY), &info) {
                    headers.insert(
                        IDEMPOTENCY_KEY.to_owned(),
                        format!("nats:{}:{}:{}", info.stream, info.stream_sequence, info.published.unix_timestamp_nanos()),
                    );
                }
                let handling = handle(&engine, &flow, &message.message.payload, headers, attempt);
                tokio::pin!(handling);
                let mut progress = tokio::time::interval(NATS_ACK_WAIT / 3);
                progress.tick().await;
                let settled = loop {
                    tokio::select! {
                        settled = &mut handling => break settled,
                        _ = progress.tick() => {
                            // Still working on it: JetStream must not hand it to someone else.
                            let _ = message.ack_with(AckKind::Progress).await;
                        }
                    }
                };

                if !matches!(settled, Settled::Retry(_)) {
                    crate::fault::pass(crate::fault::Point::BeforeQueueAck);
                }
                let outcome = match settled {
                    Settled::Done => message.double_ack().await,
                    Settled::Dead => message.ack_with(AckKind::Term).await,
                    Settled::Retry(wait) => message.ack_with(AckKind::Nak(Some(wait))).await,
                };
                if let Err(error) = outcome {
                    tracing::warn!(flow = %flow.name, %error, "settling a NATS message failed; it will be delivered again");
                }
                drop(slot);
            });
        };
        handling.abort_all();
        result
    }
}

/// A name for a message without an id, by its content, to count its attempts by.
fn content_key(payload: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(payload)))
}

/// Runs one queue message through `flow` and decides what becomes of it.
pub async fn handle(
    engine: &Engine,
    flow: &Flow,
    payload: &[u8],
    headers: BTreeMap<String, String>,
    attempt: u32,
) -> Settled {
    let trigger = flow.queue_trigger().expect("queue-triggered flow");
    let content_type = crate::message::content_type_of(&headers).map(str::to_owned);
    let meta = Meta::for_queue(&flow.name, &trigger.spec.name, headers);
    let body = match read_payload(payload, content_type.as_deref()) {
        Ok(body) => body,
        Err(error) => {
            let inbound = Value::String(String::from_utf8_lossy(payload).into_owned());
            engine.dead_letter(flow, inbound, &meta, error).await;
            return Settled::Dead;
        }
    };
    let (failure, retry_after) = match engine
        .handle(flow, Message::new(body.clone(), meta.clone()))
        .await
    {
        Ok(reply) if reply.status < 500 => return Settled::Done,
        Ok(reply) => (format!("the flow answered {}", reply.status), None),
        Err(error) if error.status().is_client_error() => {
            // A durable flow already keeps what it could not correlate.
            if !(flow.is_durable()
                && matches!(
                    error,
                    crate::error::ServeError::Flow(crate::error::FlowError::NotCorrelated { .. })
                ))
            {
                engine
                    .dead_letter(flow, body, &meta, error.to_string())
                    .await;
            }
            return Settled::Dead;
        }
        // A sync flow's target that asked for time (`Retry-After`) gets it.
        Err(error) => (error.to_string(), error.retry_after()),
    };
    retry_or_dead(engine, flow, body, &meta, attempt, failure, retry_after).await
}

/// A queue message's payload as a body: HL7 v2 when its content type says so, else JSON.
fn read_payload(payload: &[u8], content_type: Option<&str>) -> Result<Value, String> {
    if content_type.is_some_and(crate::hl7::is_hl7) {
        return crate::hl7::read(payload).map_err(|e| format!("the message is not HL7 v2: {e}"));
    }
    serde_json::from_slice(payload).map_err(|e| format!("the message is not JSON: {e}"))
}

/// Tries the message again after the trigger's backoff (never sooner than `retry_after`), or
/// keeps it as a dead letter once its attempts are spent.
async fn retry_or_dead(
    engine: &Engine,
    flow: &Flow,
    body: Value,
    meta: &Meta,
    attempt: u32,
    error: String,
    retry_after: Option<Duration>,
) -> Settled {
    let trigger = flow.queue_trigger().expect("queue-triggered flow");
    if attempt >= trigger.attempts {
        engine
            .dead_letter(
                flow,
                body,
                meta,
                format!("gave up after {attempt} attempts: {error}"),
            )
            .await;
        return Settled::Dead;
    }
    tracing::debug!(flow = %flow.name, attempt, %error, "queue message will be retried");
    Settled::Retry(trigger.retry().backoff(attempt, retry_after))
}

//! Queues: publishing to and consuming from embedded queues (in ferry's store), RabbitMQ
//! (AMQP 0-9-1) and NATS JetStream, behind one interface.
//!
//! Every queue message carries ferry's headers ([`MESSAGE_ID`], [`CORRELATION_ID`],
//! [`IDEMPOTENCY_KEY`]), so the consuming flow continues the same timeline and drops
//! redelivered duplicates, and its payload's [`CONTENT_TYPE`] (JSON, or the text a
//! `transform` rendered, HL7 v2 say), so the consumer reads it as what it is. Consumers acknowledge a message only after the consuming flow has
//! committed what it does with it; a message that fails for good ends among ferry's dead
//! letters, never redelivered forever.

pub(crate) mod amqp;
pub(crate) mod nats;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::config::QueueDriver;
use crate::store::Store;

pub use crate::message::{CONTENT_TYPE, CORRELATION_ID, IDEMPOTENCY_KEY, MESSAGE_ID};

/// `name` with every character NATS does not take in stream and consumer names replaced by
/// `_`.
pub fn nats_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The JetStream stream ferry keeps `subject`'s messages in.
pub fn nats_stream_name(subject: &str) -> String {
    format!("ferry_{}", nats_safe(subject))
}

/// Where a queue is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueSpec {
    /// Which implementation.
    pub driver: QueueDriver,
    /// The queue (AMQP queue, NATS subject, embedded queue name).
    pub name: String,
    /// The broker's URL (`amqp`, `nats`).
    pub url: String,
}

impl std::fmt::Display for QueueSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let driver = match self.driver {
            QueueDriver::Embedded => "embedded",
            QueueDriver::Amqp => "amqp",
            QueueDriver::Nats => "nats",
        };
        write!(f, "{driver} queue \"{}\"", self.name)
    }
}

/// A queue's backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Messages in the queue not yet settled (for RabbitMQ: ready, not yet delivered).
    pub depth: u64,
    /// Messages ferry's consumer has not taken yet.
    pub lag: u64,
}

/// The durable JetStream consumer of `flow`.
pub fn nats_consumer_name(flow: &str) -> String {
    nats_safe(&format!("ferry-{flow}"))
}

/// Why a publish failed; publishing again later may work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PublishError(pub String);

/// Connections to brokers, opened on first use and opened again after they fail, and
/// whether each broker is reachable now (for readiness).
#[derive(Debug, Default)]
pub struct Brokers {
    amqp: amqp::Publishers,
    nats: nats::Publishers,
    status: Mutex<HashMap<String, bool>>,
}

impl Brokers {
    /// Publishes `payload` with `headers` to `spec`'s queue; returns once the queue holds it
    /// (the store committed it, the broker confirmed it). `retried_for` is how long the
    /// publisher may retry this message: a broker that drops duplicates by id keeps ids at
    /// least that long.
    ///
    /// # Errors
    ///
    /// [`PublishError`] when the queue could not take it.
    pub async fn publish(
        &self,
        store: Option<&Store>,
        spec: &QueueSpec,
        payload: Vec<u8>,
        headers: BTreeMap<String, String>,
        retried_for: std::time::Duration,
    ) -> Result<(), PublishError> {
        let result = match spec.driver {
            QueueDriver::Embedded => {
                let store =
                    store.ok_or_else(|| PublishError("embedded queues need a store".into()))?;
                let payload =
                    String::from_utf8(payload).map_err(|e| PublishError(e.to_string()))?;
                return store
                    .enqueue(&spec.name, payload, headers)
                    .await
                    .map_err(|e| PublishError(e.to_string()));
            }
            QueueDriver::Amqp => self.amqp.publish(spec, payload, &headers).await,
            // Boxed, as NATS's futures are large (see `Store`'s backends).
            QueueDriver::Nats => {
                Box::pin(self.nats.publish(spec, payload, &headers, retried_for)).await
            }
        };
        self.mark(&spec.url, result.is_ok());
        result
    }

    /// How many messages wait in the queue a flow consumes, and how many its consumer has
    /// yet to take.
    ///
    /// # Errors
    ///
    /// When the store or broker cannot say.
    pub async fn backlog(
        &self,
        store: Option<&Store>,
        spec: &QueueSpec,
        flow: &str,
    ) -> Result<Backlog, PublishError> {
        match spec.driver {
            QueueDriver::Embedded => {
                let store =
                    store.ok_or_else(|| PublishError("embedded queues need a store".into()))?;
                let depth = store
                    .queue_depth(&spec.name)
                    .await
                    .map_err(|e| PublishError(e.to_string()))?;
                Ok(Backlog { depth, lag: depth })
            }
            QueueDriver::Amqp => self.amqp.backlog(spec).await,
            QueueDriver::Nats => Box::pin(self.nats.backlog(spec, &nats_consumer_name(flow))).await,
        }
    }

    /// Records whether the broker at `url` answers.
    pub fn mark(&self, url: &str, up: bool) {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let was = status.insert(url.to_owned(), up);
        if was != Some(up) {
            let url = redact(url);
            if up {
                tracing::info!(broker = %url, "broker connected");
            } else {
                tracing::warn!(broker = %url, "broker unreachable");
            }
        }
    }

    /// Each broker used so far (credentials removed from its URL) and whether it answers.
    pub fn status(&self) -> BTreeMap<String, bool> {
        let status = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        status.iter().map(|(url, up)| (redact(url), *up)).collect()
    }
}

/// A broker URL without its password, for logs and readiness.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

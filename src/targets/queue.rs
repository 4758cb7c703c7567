//! `queue` target: publishes the message to an embedded queue, RabbitMQ or NATS JetStream.

use std::collections::BTreeMap;

use super::{Attempt, Reach, RetryAction};
use crate::compile::Ctx;
use crate::config::{QueueDriver, QueueTargetConfig};
use crate::message::{CORRELATION_ID, IDEMPOTENCY_KEY, MESSAGE_ID, Message};
use crate::queue::QueueSpec;

/// A compiled `queue` target.
#[derive(Debug)]
pub struct QueueTarget {
    name: String,
    /// Where it publishes.
    pub spec: QueueSpec,
}

impl QueueTarget {
    pub(crate) fn compile(
        name: &str,
        config: &QueueTargetConfig,
        ctx: &mut Ctx<'_>,
    ) -> Option<Self> {
        let spec = queue_spec(config.driver, &config.name, config.url.as_ref(), ctx)?;
        Some(Self {
            name: name.to_owned(),
            spec,
        })
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Publishes `message` with ferry's headers (its id, correlation id, and the key a
    /// consumer drops duplicates by, the same on every attempt); done once the queue holds it.
    pub(crate) async fn attempt(&self, message: &Message, reach: &Reach<'_>) -> Attempt {
        let payload = match message.content_type() {
            None => message.body().to_string().into_bytes(),
            Some(_) => message
                .body()
                .as_str()
                .unwrap_or_default()
                .as_bytes()
                .to_vec(),
        };
        let mut headers = BTreeMap::from([
            (MESSAGE_ID.to_owned(), message.id().to_owned()),
            (
                CORRELATION_ID.to_owned(),
                message.root()["meta"]["correlation_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            (
                IDEMPOTENCY_KEY.to_owned(),
                format!("{}:{}", message.id(), self.name),
            ),
        ]);
        if let Some(traceparent) = crate::message::child_traceparent(message) {
            headers.insert("traceparent".to_owned(), traceparent);
        }
        match reach
            .brokers
            .publish(reach.store, &self.spec, payload, headers, reach.retried_for)
            .await
        {
            Ok(()) => Attempt::done(None),
            Err(error) => Attempt::failed(RetryAction::Retry, None, error.to_string()),
        }
    }
}

/// Checks a queue's driver, name and URL, which triggers and targets share.
pub(crate) fn queue_spec(
    driver: Option<QueueDriver>,
    name: &crate::config::Spanned<String>,
    url: Option<&crate::config::Spanned<String>>,
    ctx: &mut Ctx<'_>,
) -> Option<QueueSpec> {
    let driver = driver.unwrap_or(QueueDriver::Embedded);
    if name.value.trim().is_empty() {
        ctx.error(name.referenced, "a queue needs a name");
        return None;
    }
    let url = match (driver, url) {
        (QueueDriver::Embedded, None) => String::new(),
        (QueueDriver::Embedded, Some(url)) => {
            ctx.error(
                url.referenced,
                "an embedded queue lives in ferry's store and takes no `url`",
            );
            return None;
        }
        (_, None) => {
            ctx.error(
                name.referenced,
                "a broker queue needs `url`, such as ${AMQP_URL} or ${NATS_URL}",
            );
            return None;
        }
        (driver, Some(url)) => {
            let schemes: &[&str] = if driver == QueueDriver::Amqp {
                &["amqp", "amqps"]
            } else {
                &["nats", "tls"]
            };
            match reqwest::Url::parse(&url.value) {
                Ok(parsed) if schemes.contains(&parsed.scheme()) => url.value.clone(),
                _ => {
                    ctx.error(
                        url.referenced,
                        format!("invalid broker URL; write {}://host:port", schemes[0]),
                    );
                    return None;
                }
            }
        }
    };
    Some(QueueSpec {
        driver,
        name: name.value.clone(),
        url,
    })
}

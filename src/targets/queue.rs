//! `queue` target: publishes the message to an embedded queue, RabbitMQ or NATS JetStream.

use std::collections::BTreeMap;

use super::{Attempt, Reach, RetryAction};
use crate::compile::Ctx;
use crate::config::{QueueDriver, QueueTargetConfig};
use crate::message::{CONTENT_TYPE, CORRELATION_ID, IDEMPOTENCY_KEY, MESSAGE_ID, Message};
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
            None => crate::json::text(message.body()).into_bytes(),
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
        let content_type = message.content_type().unwrap_or("application/json");
        headers.insert(CONTENT_TYPE.to_owned(), content_type.to_owned());
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::QueueTarget;
    use crate::compile::bench::{Bench, message};
    use crate::config::QueueTargetConfig;
    use crate::message::{IDEMPOTENCY_KEY, MESSAGE_ID};
    use crate::queue::Brokers;
    use crate::retry::RetryAction;
    use crate::store::Store;
    use crate::targets::called::Called;
    use crate::targets::{Attempt, Reach};

    fn compile(bench: &mut Bench, yaml: &str) -> Result<QueueTarget, String> {
        bench.compile(yaml, |config: &QueueTargetConfig, ctx| {
            QueueTarget::compile("results", config, ctx)
        })
    }

    #[test]
    fn a_queue_is_named_and_a_broker_queue_has_a_url_of_its_scheme() {
        let mut bench = Bench::new();
        for (yaml, says) in [
            ("name: ' '", "a queue needs a name"),
            ("name: q\nurl: amqp://localhost", "takes no `url`"),
            ("name: q\ndriver: amqp", "a broker queue needs `url`"),
            (
                "name: q\ndriver: nats\nurl: amqp://localhost",
                "write nats://host:port",
            ),
        ] {
            let error = compile(&mut bench, yaml).unwrap_err();
            assert!(error.contains(says), "{yaml}: {error}");
        }
        compile(
            &mut bench,
            "name: q\ndriver: amqp\nurl: amqps://broker:5671",
        )
        .unwrap();
    }

    #[tokio::test]
    async fn an_attempt_is_done_once_the_queue_holds_the_message_with_ferrys_headers() {
        let mut bench = Bench::new();
        let target = compile(&mut bench, "name: lab-results").unwrap();
        let store = Store::open("sqlite::memory:").await.unwrap();
        let reach = Reach {
            client: &crate::targets::http_client().unwrap(),
            brokers: &Brokers::default(),
            store: Some(&store),
            calls: &Called::answering(Attempt::done(None)),
            retried_for: Duration::from_secs(60),
        };
        let message = message(json!({"ref": "R-1"}));
        let attempt = target.attempt(&message, &reach).await;
        assert_eq!(attempt.action, RetryAction::Done, "{:?}", attempt.error);

        let held = store.claim_queue("lab-results", 10).await.unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&held[0].payload).unwrap(),
            json!({"ref": "R-1"})
        );
        assert_eq!(held[0].headers[MESSAGE_ID], message.id());
        assert_eq!(
            held[0].headers[IDEMPOTENCY_KEY],
            format!("{}:results", message.id())
        );
    }

    #[tokio::test]
    async fn a_broker_that_cannot_be_reached_is_worth_another_try() {
        let mut bench = Bench::new();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let target = compile(
            &mut bench,
            &format!("name: lab-results\ndriver: amqp\nurl: amqp://{closed}"),
        )
        .unwrap();
        let reach = Reach {
            client: &crate::targets::http_client().unwrap(),
            brokers: &Brokers::default(),
            store: None,
            calls: &Called::answering(Attempt::done(None)),
            retried_for: Duration::from_secs(60),
        };
        let attempt = target.attempt(&message(json!({})), &reach).await;
        assert_eq!((attempt.action, attempt.status), (RetryAction::Retry, None));
    }
}

//! `queue` target: publishes the message to an embedded queue, RabbitMQ or NATS JetStream.

use crate::compile::Ctx;
use crate::config::{QueueDriver, QueueTargetConfig};
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

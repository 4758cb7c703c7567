//! RabbitMQ (AMQP 0-9-1) through lapin: durable queues, persistent messages, publisher
//! confirms; consumers with manual acks and a prefetch limit.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;

use super::{PublishError, QueueSpec};

/// One connection per broker URL with a confirmed channel that every publish to that broker
/// shares, opened again after a failure. Publishes do not wait for each other: each waits
/// only for its own confirm, so the broker confirms many at a time.
#[derive(Debug, Default)]
pub(super) struct Publishers {
    links: Mutex<HashMap<String, Arc<Link>>>,
}

#[derive(Debug)]
struct Link {
    connection: Connection,
    channel: Channel,
    /// The queues declared on this connection: a declare is a round trip, once is enough.
    declared: std::sync::Mutex<HashSet<String>>,
}

/// Opens a channel on a new connection to `url`, giving up after 10 s (a peer that takes
/// the TCP connection but never speaks AMQP must not hold a consumer forever).
pub(crate) async fn connect(url: &str) -> Result<(Connection, Channel), PublishError> {
    let open = async {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        Ok::<_, lapin::Error>((connection, channel))
    };
    match tokio::time::timeout(std::time::Duration::from_secs(10), open).await {
        Ok(opened) => Ok(opened?),
        Err(_) => Err(PublishError("amqp: no answer within 10 s".into())),
    }
}

/// Declares `queue` durable, so it and its persistent messages survive a broker restart.
pub(crate) async fn declare(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

impl Publishers {
    /// The link to `url`, opened if there is none.
    async fn link(&self, url: &str) -> Result<Arc<Link>, PublishError> {
        let mut links = self.links.lock().await;
        if let Some(link) = links.get(url)
            && link.channel.status().connected()
        {
            return Ok(Arc::clone(link));
        }
        let (connection, channel) = connect(url).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let link = Arc::new(Link {
            connection,
            channel,
            declared: std::sync::Mutex::default(),
        });
        links.insert(url.to_owned(), Arc::clone(&link));
        Ok(link)
    }

    /// Forgets `link` after a failure, unless it was replaced already: the next publish
    /// opens a new one.
    async fn forget(&self, url: &str, link: &Arc<Link>) {
        let mut links = self.links.lock().await;
        if links.get(url).is_some_and(|l| Arc::ptr_eq(l, link)) {
            links.remove(url);
        }
    }

    /// The queue's ready messages, by a passive declare (which creates nothing) on a channel
    /// of its own (a passive declare of a missing queue closes its channel) over the
    /// publishing connection.
    pub(super) async fn backlog(&self, spec: &QueueSpec) -> Result<super::Backlog, PublishError> {
        let link = self.link(&spec.url).await?;
        let channel = match link.connection.create_channel().await {
            Ok(channel) => channel,
            Err(error) => {
                self.forget(&spec.url, &link).await;
                return Err(error.into());
            }
        };
        let declared = channel
            .queue_declare(
                spec.name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = channel.close(0, "".into()).await;
        let ready = u64::from(declared?.message_count());
        Ok(super::Backlog {
            depth: ready,
            lag: ready,
        })
    }

    pub(super) async fn publish(
        &self,
        spec: &QueueSpec,
        payload: Vec<u8>,
        headers: &BTreeMap<String, String>,
    ) -> Result<(), PublishError> {
        let link = self.link(&spec.url).await?;
        let result = async {
            let known = link
                .declared
                .lock()
                .expect("not poisoned")
                .contains(&spec.name);
            if !known {
                declare(&link.channel, &spec.name).await?;
                link.declared
                    .lock()
                    .expect("not poisoned")
                    .insert(spec.name.clone());
            }
            publish_on(&link.channel, spec, payload, headers).await
        }
        .await;
        if result.is_err() {
            // A failed channel is not used again: the next attempt opens a new one.
            self.forget(&spec.url, &link).await;
        }
        result
    }
}

async fn publish_on(
    channel: &Channel,
    spec: &QueueSpec,
    payload: Vec<u8>,
    headers: &BTreeMap<String, String>,
) -> Result<(), PublishError> {
    let mut table = FieldTable::default();
    // The content type travels as the property made for it.
    for (name, value) in headers.iter().filter(|(n, _)| *n != super::CONTENT_TYPE) {
        table.insert(
            ShortString::from(name.as_str()),
            AMQPValue::LongString(value.as_str().into()),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(
            headers
                .get(super::CONTENT_TYPE)
                .map_or("application/json", String::as_str)
                .into(),
        )
        .with_headers(table);
    if let Some(id) = headers.get(super::IDEMPOTENCY_KEY) {
        properties = properties.with_message_id(id.as_str().into());
    }
    if let Some(id) = headers.get(super::CORRELATION_ID) {
        properties = properties.with_correlation_id(id.as_str().into());
    }
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(
            "".into(),
            spec.name.as_str().into(),
            options,
            &payload,
            properties,
        )
        .await?
        .await?;
    // A mandatory message no queue takes comes back *and* is acked: only a plain ack counts.
    if confirm.is_ack() && confirm.take_message().is_none() {
        Ok(())
    } else {
        Err(PublishError(format!(
            "the broker did not take the message for queue \"{}\"",
            spec.name
        )))
    }
}

impl From<lapin::Error> for PublishError {
    fn from(error: lapin::Error) -> Self {
        Self(format!("amqp: {error}"))
    }
}

/// Reads a delivery's headers as text.
pub(crate) fn headers_of(properties: &BasicProperties) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    if let Some(table) = properties.headers() {
        for (name, value) in table {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                other => format!("{other:?}"),
            };
            headers.insert(name.as_str().to_owned(), text);
        }
    }
    if let Some(content_type) = properties.content_type() {
        headers.insert(super::CONTENT_TYPE.to_owned(), content_type.to_string());
    }
    headers
}

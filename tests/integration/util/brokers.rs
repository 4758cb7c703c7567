//! The real brokers the queue tests use: RabbitMQ and NATS JetStream on loopback.

/// Fails, saying how to start it, unless `service` answers on 127.0.0.1:`port`.
pub(crate) fn require(service: &str, port: u16, start: &str) {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    if std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(2)).is_err() {
        panic!(
            "{service} is not answering on {address}; these tests need it. Start it with: {start}"
        );
    }
}

/// RabbitMQ's URL, after checking it answers.
pub(crate) fn rabbitmq() -> &'static str {
    require("RabbitMQ", 5672, "rabbitmq-server -detached");
    "amqp://guest:guest@127.0.0.1:5672/%2f"
}

/// NATS's URL, after checking it answers.
pub(crate) fn nats() -> &'static str {
    require(
        "NATS (with JetStream)",
        4222,
        "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log",
    );
    "nats://127.0.0.1:4222"
}

/// A name no other test uses, for queues on the shared brokers.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", uuid::Uuid::now_v7().simple())
}

/// Publishes `payload` to RabbitMQ queue `queue` (declared durable) and waits for the confirm;
/// with `message_id` as its AMQP message id, or none (as a plain client may).
pub(crate) async fn amqp_publish(queue: &str, payload: &[u8], message_id: Option<&str>) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    let connection = lapin::Connection::connect(rabbitmq(), lapin::ConnectionProperties::default())
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
    let mut properties = lapin::BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            payload,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(0, "done".into()).await;
}

/// Messages waiting in RabbitMQ queue `queue` (ready, not counting unacknowledged ones).
pub(crate) async fn amqp_depth(queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    let connection = lapin::Connection::connect(rabbitmq(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .unwrap();
    let _ = connection.close(0, "done".into()).await;
    declared.message_count()
}

/// Publishes `payload` to NATS JetStream subject `subject`, creating its stream as ferry does.
pub(crate) async fn nats_publish(subject: &str, payload: &[u8]) {
    let client = async_nats::connect(nats()).await.unwrap();
    let context = async_nats::jetstream::new(client);
    context
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: ferry::queue::nats_stream_name(subject),
            subjects: vec![subject.to_owned()],
            ..Default::default()
        })
        .await
        .unwrap();
    context
        .publish(subject.to_owned(), payload.to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

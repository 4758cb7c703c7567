//! Queues with real brokers: the embedded queue, RabbitMQ at 127.0.0.1:5672 and NATS
//! JetStream at 127.0.0.1:4222. Publish → consume → deliver, retries of a failing consumer,
//! poison messages ending among the dead letters, and the examples built on queues.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::util::wait_for_state;
use crate::util::{
    Ferry, Partner, amqp_depth, amqp_publish, nats, nats_publish, payload, post_json, rabbitmq,
    repo, unique, wait_for, wait_until,
};

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The queue fixture flows, with a fresh queue per driver, delivering to `sink`.
async fn queue_flows(sink: &Partner) -> (Ferry, [String; 3]) {
    let names = [unique("embedded"), unique("amqp"), unique("nats")];
    (queue_flows_on(sink, &names).await, names)
}

/// The queue fixture flows on the embedded queue, AMQP queue and NATS subject `names`,
/// delivering to `sink`.
pub(crate) async fn queue_flows_on(sink: &Partner, names: &[String; 3]) -> Ferry {
    let env = [
        ("EMBEDDED_QUEUE", names[0].as_str()),
        ("AMQP_QUEUE", names[1].as_str()),
        ("AMQP_URL", rabbitmq()),
        ("NATS_QUEUE", names[2].as_str()),
        ("NATS_URL", nats()),
        ("SINK_URL", sink.url.as_str()),
    ];
    Ferry::start(&repo().join("tests/fixtures/queues/flows"), &env).await
}

#[tokio::test]
async fn each_driver_carries_messages_from_a_flow_to_a_flow() {
    let sink = Partner::start(200, json!({})).await;
    let (ferry, _) = queue_flows(&sink).await;
    for driver in ["embedded", "amqp", "nats"] {
        let response = reqwest::Client::new()
            .post(format!("{}/{driver}/publish", ferry.url))
            .header("traceparent", TRACE)
            .json(&json!({"driver": driver, "n": 1}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let reply: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "{driver}: {reply}");
        let id = reply["id"].as_str().unwrap().to_owned();
        wait_until(&format!("the sink has the {driver} message"), || {
            sink.received()
                .iter()
                .any(|r| r.path == format!("/{driver}"))
        })
        .await;
        let got = sink
            .received()
            .into_iter()
            .find(|r| r.path == format!("/{driver}"))
            .unwrap();
        assert_eq!(got.json(), json!({"driver": driver, "n": 1}), "{driver}");
        // The queue carried the message id as the correlation id of the consuming flow.
        assert_eq!(got.headers["x-correlation-id"], id.as_str(), "{driver}");
        // The W3C trace goes on across the queue: same trace id, ferry's hops as parents.
        let traceparent = got.headers["traceparent"].to_str().unwrap();
        assert_eq!(&traceparent[..36], &TRACE[..36], "{driver}: {traceparent}");
        assert_ne!(traceparent, TRACE, "{driver}");
    }
}

#[tokio::test]
async fn hl7_v2_messages_cross_every_driver_and_are_read_by_their_content_type() {
    let sink = Partner::start(200, json!({})).await;
    let (ferry, _) = queue_flows(&sink).await;
    let (status, reply) = post_json(
        &format!("{}/hl7/publish", ferry.url),
        &json!({"customer_id": "CUST-7", "name": "Doe|X\rPID|2"}),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    for driver in ["embedded", "amqp", "nats"] {
        let path = format!("/{driver}");
        wait_until(&format!("the sink has the {driver} message"), || {
            sink.received().iter().any(|r| r.path == path)
        })
        .await;
        let got = sink
            .received()
            .into_iter()
            .find(|r| r.path == path)
            .unwrap();
        let body = got.json();
        assert_eq!(body["MSH"][0]["10"], reply["id"], "{driver}: {body}");
        assert_eq!(body["PID"].as_array().unwrap().len(), 1, "{driver}: {body}");
        assert_eq!(body["PID"][0]["5"], "Doe|X\rPID|2", "{driver}: {body}");
    }
}

#[tokio::test]
async fn a_failing_consumer_retries_then_dead_letters_and_poison_leaves_the_queue() {
    let sink = Partner::start(503, json!({"error": "busy"})).await;
    let (ferry, names) = queue_flows(&sink).await;
    for driver in ["embedded", "amqp", "nats"] {
        post_json(
            &format!("{}/{driver}/publish", ferry.url),
            &json!({"driver": driver}),
        )
        .await;
    }
    // attempts: 3 — each message is tried three times, then kept as a dead letter.
    for driver in ["embedded", "amqp", "nats"] {
        wait_until(
            &format!("the {driver} message was tried three times"),
            || {
                sink.received()
                    .iter()
                    .filter(|r| r.path == format!("/{driver}"))
                    .count()
                    >= 3
            },
        )
        .await;
    }
    wait_for("three dead letters", || async {
        ferry.admin("/dead-letters").await.1["dead_letters"]
            .as_array()
            .map_or(0, Vec::len)
            == 3
    })
    .await;
    let attempts = |driver: &str| {
        sink.received()
            .iter()
            .filter(|r| r.path == format!("/{driver}"))
            .count()
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for driver in ["embedded", "amqp", "nats"] {
        assert_eq!(attempts(driver), 3, "{driver} was not retried forever");
    }

    // Poison: not JSON at all. Dead-lettered at once, and gone from the queue.
    ferry
        .runtime
        .store()
        .unwrap()
        .enqueue(&names[0], "{not json".into(), Default::default())
        .await
        .unwrap();
    amqp_publish(&names[1], b"{not json", Some("poison-1")).await;
    nats_publish(&names[2], b"{not json").await;
    wait_for("six dead letters", || async {
        ferry.admin("/dead-letters").await.1["dead_letters"]
            .as_array()
            .map_or(0, Vec::len)
            == 6
    })
    .await;
    let (_, dead) = ferry.admin("/dead-letters").await;
    let poison = dead["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["error"].as_str().unwrap().contains("not JSON"))
        .count();
    assert_eq!(poison, 3, "{dead:#}");
    assert_eq!(
        ferry
            .runtime
            .store()
            .unwrap()
            .queue_depth(&names[0])
            .await
            .unwrap(),
        0
    );
    wait_for("the RabbitMQ queue is empty", || async {
        amqp_depth(&names[1]).await == 0
    })
    .await;

    // The sink is back: the messages given up on are replayed through their sync flows,
    // reach it, and are dead letters no more. A replay that fails again leaves one dead.
    let given_up: Vec<String> = dead["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| !d["error"].as_str().unwrap().contains("not JSON"))
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    sink.set_reply(200, json!({}));
    sink.answer_once(503, json!({"error": "busy"}));
    let (status, replayed) = ferry
        .admin_post(
            "/dead-letters/replay",
            &json!({"ids": given_up, "reason": "the sink is back"}),
        )
        .await;
    assert_eq!(status, 200, "{replayed}");
    let outcomes: Vec<bool> = replayed["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["replayed"].as_bool().unwrap())
        .collect();
    assert_eq!(outcomes, [false, true, true], "{replayed:#}");
    for driver in ["embedded", "amqp", "nats"] {
        assert_eq!(attempts(driver), 4, "{driver}: tried once more");
    }
    let (_, dead) = ferry.admin("/dead-letters").await;
    assert_eq!(
        dead["dead_letters"].as_array().unwrap().len(),
        4,
        "{dead:#}"
    );
    let (_, detail) = ferry.admin(&format!("/messages/{}", given_up[1])).await;
    assert_eq!(detail["status"], "delivered", "{detail:#}");
    let kinds: Vec<&str> = detail["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.last(), Some(&"replayed"), "{detail:#}");
    let (_, detail) = ferry.admin(&format!("/messages/{}", given_up[0])).await;
    assert_eq!(detail["status"], "dead", "{detail:#}");
}

#[tokio::test]
async fn the_embedded_queue_survives_a_restart() {
    let sink = Partner::start(200, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let store_url = format!("sqlite://{}/ferry.db", dir.path().display());
    let queue = unique("embedded");
    {
        let store = ferry::store::Store::open(&store_url).await.unwrap();
        for n in 0..3 {
            store
                .enqueue(&queue, json!({"n": n}).to_string(), Default::default())
                .await
                .unwrap();
        }
        store.close().await;
    }
    let env = [
        ("EMBEDDED_QUEUE", queue.as_str()),
        ("AMQP_QUEUE", "unused"),
        ("AMQP_URL", rabbitmq()),
        ("NATS_QUEUE", "unused"),
        ("NATS_URL", nats()),
        ("SINK_URL", sink.url.as_str()),
    ];
    let flows = [repo().join("tests/fixtures/queues/flows")];
    let _ferry = Ferry::start_with_store(&flows, &env, &store_url, dir).await;
    wait_until("the sink has the three queued messages", || {
        sink.received().len() == 3
    })
    .await;
    let mut got: Vec<Value> = sink
        .received()
        .iter()
        .map(|r| r.json()["n"].clone())
        .collect();
    got.sort_by_key(|n| n.as_i64());
    assert_eq!(got, [json!(0), json!(1), json!(2)]);
}

fn with_examples(example: &str) -> [PathBuf; 2] {
    [
        repo().join("flows"),
        repo().join("examples").join(example).join("flows"),
    ]
}

#[tokio::test]
async fn lab_results_published_on_rabbitmq_reach_the_portal() {
    let queue = unique("lab.results");
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-Q1"})).await;
    let portal = Partner::start(200, json!({})).await;
    let mut env = vec![
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("AMQP_URL", rabbitmq()),
        ("LAB_RESULTS_QUEUE", queue.as_str()),
    ];
    env.extend(crate::util::FAST_RETRY);
    let ferry = Ferry::start_many(&with_examples("lab-results-amqp"), &env).await;
    let (_, reply) = post_json(
        &format!("{}/api/v1/test-requests", ferry.url),
        &payload("test-request.json"),
    )
    .await;
    let request_id = reply["request_id"].as_str().unwrap().to_owned();
    wait_for_state(&ferry.url, &request_id, "delivered_to_lab").await;

    let mut result = payload("test-result.json");
    result["order_ref"] = json!(request_id);
    amqp_publish(&queue, result.to_string().as_bytes(), Some("result-1")).await;
    wait_until("the portal has the results", || {
        portal.received().len() == 1
    })
    .await;
    let delivered = portal.received()[0].json();
    assert_eq!(
        crate::util::schema_violations("portal-result.schema.json", &delivered),
        vec![]
    );
    assert_eq!(delivered["request_id"], request_id.as_str());
    assert_eq!(delivered["portal_ref"], "PR-2026-0001");
    wait_for_state(&ferry.url, &request_id, "delivered_to_portal").await;

    // A result for no known request: a dead letter, and off the queue.
    amqp_publish(
        &queue,
        payload("test-result.json").to_string().as_bytes(),
        Some("result-2"),
    )
    .await;
    wait_for("a dead letter", || async {
        ferry.admin("/dead-letters?flow=lab-results-amqp").await.1["dead_letters"]
            .as_array()
            .map_or(0, Vec::len)
            == 1
    })
    .await;
    wait_for("the queue is empty", || async {
        amqp_depth(&queue).await == 0
    })
    .await;
    assert_eq!(portal.received().len(), 1);
}

#[tokio::test]
async fn layered_flows_pass_a_request_through_process_and_an_embedded_queue() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let mut env = vec![
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
    ];
    env.extend(crate::util::FAST_RETRY);
    let ferry = Ferry::start_many(&with_examples("layered"), &env).await;

    // The experience flow answers with the process flow's reply.
    let (status, reply) = post_json(
        &format!("{}/api/v2/test-requests", ferry.url),
        &payload("test-request.json"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["status"], "accepted");
    let request_id = reply["request_id"].as_str().unwrap().to_owned();
    wait_until("the lab has the order", || lab.received().len() == 1).await;
    let order = lab.received()[0].json();
    assert_eq!(
        crate::util::schema_violations("lab-order.schema.json", &order),
        vec![]
    );
    assert_eq!(order["order_ref"], request_id.as_str());
    // The request is known to the rest of the journey (status, results) as with the shipped flow.
    let (status, _) = crate::util::status_of(&ferry.url, &request_id).await;
    assert_eq!(status, 200);

    // The experience layer's validation refuses before anything is accepted.
    let (status, body) = post_json(
        &format!("{}/api/v2/test-requests", ferry.url),
        &json!({"portal_ref": "x"}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(lab.received().len(), 1);
}

#[tokio::test]
async fn readiness_says_when_a_broker_is_down() {
    let sink = Partner::start(200, json!({})).await;
    // Nothing listens on this port: the AMQP consumer cannot connect.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nowhere = format!("amqp://guest:guest@127.0.0.1:{closed}/%2f");
    let env = [
        ("EMBEDDED_QUEUE", "q"),
        ("AMQP_QUEUE", "q"),
        ("AMQP_URL", nowhere.as_str()),
        ("NATS_QUEUE", "q"),
        ("NATS_URL", nats()),
        ("SINK_URL", sink.url.as_str()),
    ];
    let ferry = Ferry::start(&repo().join("tests/fixtures/queues/flows"), &env).await;
    let health = reqwest::get(format!("{}/healthz", ferry.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let readiness = || async {
        let response = reqwest::get(format!("{}/readyz", ferry.url)).await.unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().await.unwrap(),
        )
    };
    wait_for("readiness reports the broker down", || async {
        let (status, body) = readiness().await;
        status == 503
            && body["brokers"]
                .as_object()
                .is_some_and(|b| b.values().any(|up| up == false))
    })
    .await;
    let (_, last) = readiness().await;
    assert_eq!(last["ready"], false);
    assert!(
        !last.to_string().contains("guest:guest"),
        "credentials stay out: {last}"
    );
}

#[tokio::test]
async fn readiness_turns_false_while_draining() {
    let sink = Partner::start(200, json!({})).await;
    let (ferry, _) = queue_flows(&sink).await;
    let ready = reqwest::get(format!("{}/readyz", ferry.url)).await.unwrap();
    assert_eq!(ready.status(), 200);
    ferry.runtime.mark_draining();
    let draining = reqwest::get(format!("{}/readyz", ferry.url)).await.unwrap();
    assert_eq!(draining.status(), 503);
    assert_eq!(draining.json::<Value>().await.unwrap()["draining"], true);
}

#[tokio::test]
async fn queue_backlogs_are_read_from_the_store_and_each_broker() {
    use ferry::config::QueueDriver;
    use ferry::queue::{Backlog, Brokers, QueueSpec};
    let brokers = Brokers::default();
    let spec = |driver, name: &str, url: &str| QueueSpec {
        driver,
        name: name.to_owned(),
        url: url.to_owned(),
    };

    // RabbitMQ: three messages ready in a queue no one consumes yet.
    let queue = unique("backlog-amqp");
    for n in 0..3 {
        amqp_publish(&queue, b"{}", Some(&format!("m{n}"))).await;
    }
    let amqp = spec(QueueDriver::Amqp, &queue, rabbitmq());
    assert_eq!(
        brokers.backlog(None, &amqp, "any").await.unwrap(),
        Backlog { depth: 3, lag: 3 }
    );

    // NATS: the durable consumer a flow would use, with three messages not yet taken.
    let subject = unique("backlog-nats");
    nats_publish(&subject, b"{}").await;
    let client = async_nats::connect(nats()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream(ferry::queue::nats_stream_name(&subject))
        .await
        .unwrap();
    let name = ferry::queue::nats_consumer_name("backlog-flow");
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(name),
            filter_subject: subject.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    nats_publish(&subject, b"{}").await;
    nats_publish(&subject, b"{}").await;
    let queue = spec(QueueDriver::Nats, &subject, nats());
    assert_eq!(
        brokers.backlog(None, &queue, "backlog-flow").await.unwrap(),
        Backlog { depth: 3, lag: 3 }
    );

    // Embedded: what the store holds.
    let dir = tempfile::tempdir().unwrap();
    let store = ferry::store::Store::open(&format!("sqlite://{}/ferry.db", dir.path().display()))
        .await
        .unwrap();
    for _ in 0..2 {
        store
            .enqueue("backlog-embedded", "{}".into(), Default::default())
            .await
            .unwrap();
    }
    let embedded = spec(QueueDriver::Embedded, "backlog-embedded", "");
    assert_eq!(
        brokers
            .backlog(Some(&store), &embedded, "any")
            .await
            .unwrap(),
        Backlog { depth: 2, lag: 2 }
    );
}

async fn readiness(ferry: &Ferry) -> (u16, Value) {
    let response = reqwest::get(format!("{}/readyz", ferry.url)).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn readiness_follows_a_broker_that_goes_away_and_comes_back() {
    rabbitmq();
    let mut proxy = crate::util::Proxy::start("127.0.0.1:5672").await;
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let sink = Partner::start(200, json!({})).await;
    let queue = unique("readiness");
    let env = [
        ("EMBEDDED_QUEUE", "readiness-embedded"),
        ("AMQP_QUEUE", queue.as_str()),
        ("AMQP_URL", url.as_str()),
        ("NATS_QUEUE", "readiness-nats"),
        ("NATS_URL", nats()),
        ("SINK_URL", sink.url.as_str()),
    ];
    let ferry = Ferry::start(&repo().join("tests/fixtures/queues/flows"), &env).await;
    // Ready, with the consumer connected through the proxy (not merely no broker known yet).
    wait_for("ready with the broker up", || async {
        let (status, body) = readiness(&ferry).await;
        status == 200 && body["brokers"].as_object().is_some_and(|b| b.len() == 2)
    })
    .await;
    proxy.cut();
    wait_for("not ready with the broker gone", || async {
        let (status, body) = readiness(&ferry).await;
        status == 503 && body["store"] == true && body["brokers"].to_string().contains("false")
    })
    .await;
    proxy.restore().await;
    wait_for("ready again once the broker is back", || async {
        readiness(&ferry).await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn readiness_follows_a_store_that_cannot_be_written() {
    use sqlx::Connection as _;
    let sink = Partner::start(200, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.db");
    let store = format!("sqlite://{}", path.display());
    let flows = [repo().join("tests/fixtures/features/flows")];
    let env = [
        ("SINK_URL", sink.url.as_str()),
        ("NORTH_URL", "http://127.0.0.1:9"),
        ("METALS_URL", "http://127.0.0.1:9"),
        ("SOUTH_URL", "http://127.0.0.1:9"),
    ];
    let ferry = Ferry::start_with_store(&flows, &env, &store, dir).await;
    assert_eq!(readiness(&ferry).await.0, 200);
    // Another process takes the database's write lock and keeps it.
    let mut other = sqlx::sqlite::SqliteConnection::connect(&store)
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let (status, body) = readiness(&ferry).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["store"], false);
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    wait_for("ready again once the lock is gone", || async {
        readiness(&ferry).await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn a_sync_consumers_target_that_asks_for_time_gets_it_on_every_driver() {
    let sink = Partner::start(200, json!({})).await;
    let (ferry, _) = queue_flows(&sink).await;
    for driver in ["embedded", "amqp", "nats"] {
        // The flows back off 50 ms; the sink asks for a second.
        sink.answer_once_with_header(503, json!({"error": "busy"}), ("retry-after", "1"));
        let path = format!("/{driver}");
        post_json(
            &format!("{}/{driver}/publish", ferry.url),
            &json!({"driver": driver}),
        )
        .await;
        let tries = || -> Vec<_> {
            sink.received()
                .into_iter()
                .filter(|r| r.path == path)
                .collect()
        };
        wait_until(&format!("the {driver} message was tried again"), || {
            tries().len() >= 2
        })
        .await;
        let tries = tries();
        let waited = tries[1].at - tries[0].at;
        assert!(
            waited >= std::time::Duration::from_millis(950),
            "{driver}: tried again after {waited:?}"
        );
    }
}

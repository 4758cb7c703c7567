//! The fault suite: brokers cut off and back, a disk that fills, connections that never
//! speak, clients that write before they read, partners whose answers are lost, ferry killed
//! in the narrowest windows. Each test first proves it reached the window it is about, then
//! that nothing was lost or done twice. Regression tests for
//! <https://github.com/ferry/ferry/issues/12>.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::process::{spawn_on, terminate};
use crate::util::{
    Ferry, LAB_SECRET, PORTAL_KEY, Partner, Proxy, amqp_publish, nats, payload, post_json,
    rabbitmq, repo, signed_post, unique, wait_for, wait_until, wait_until_within, webhook_headers,
};

fn faults_flows() -> PathBuf {
    repo().join("tests/fixtures/faults/flows")
}

/// The queue-results flow consuming a fresh queue through `proxy`, delivering to `portal`.
async fn queue_results(proxy: &Proxy, portal: &Partner) -> (Ferry, String) {
    let queue = unique("results");
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let env = [
        ("RESULTS_QUEUE", queue.as_str()),
        ("AMQP_URL", url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("PARTNER_URL", "http://127.0.0.1:9"),
        ("BUDGET", "1m"),
    ];
    (Ferry::start(&faults_flows(), &env).await, queue)
}

fn broker_up(ferry: &Ferry) -> bool {
    let status = ferry.runtime.brokers().status();
    !status.is_empty() && status.values().all(|up| *up)
}

/// The bodies a partner took, as text.
fn bodies(partner: &Partner) -> BTreeSet<String> {
    partner
        .accepted()
        .iter()
        .map(|r| r.json().to_string())
        .collect()
}

#[tokio::test]
async fn issue_12_queue_messages_without_ids_are_each_handled_after_a_reconnect() {
    rabbitmq();
    let portal = Partner::start(200, json!({})).await;
    let mut proxy = Proxy::start("127.0.0.1:5672").await;
    let (ferry, queue) = queue_results(&proxy, &portal).await;
    wait_until("the consumer is connected", || broker_up(&ferry)).await;
    for n in 0..5 {
        amqp_publish(&queue, json!({"n": n}).to_string().as_bytes(), None).await;
    }
    wait_until("the portal has the first five", || {
        bodies(&portal).len() == 5
    })
    .await;

    // A new connection, a new channel: its delivery tags count from 1 again.
    proxy.cut();
    wait_until("the consumer noticed", || !broker_up(&ferry)).await;
    proxy.restore().await;
    wait_until_within("the consumer is back", 15, || broker_up(&ferry)).await;
    for n in 5..10 {
        amqp_publish(&queue, json!({"n": n}).to_string().as_bytes(), None).await;
    }
    // Each new message reaches the portal: none is taken for an old one.
    wait_until("the portal has all ten", || bodies(&portal).len() == 10).await;
    let expected: BTreeSet<String> = (0..10).map(|n| json!({"n": n}).to_string()).collect();
    assert_eq!(bodies(&portal), expected);
}

#[tokio::test]
async fn issue_12_a_consumer_reconnects_promptly_after_every_broker_outage() {
    rabbitmq();
    let portal = Partner::start(200, json!({})).await;
    let mut proxy = Proxy::start("127.0.0.1:5672").await;
    let (ferry, _) = queue_results(&proxy, &portal).await;
    wait_until("the consumer is connected", || broker_up(&ferry)).await;
    for outage in 1..=4 {
        proxy.cut();
        wait_until("the consumer noticed", || !broker_up(&ferry)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        proxy.restore().await;
        let restored = Instant::now();
        wait_until_within("the consumer is back", 30, || broker_up(&ferry)).await;
        // Within one outage the pause grows (0.2 s, 0.4 s, 0.8 s, 1.6 s…); the next outage
        // starts again from the shortest instead of where the last one stopped.
        let took = restored.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "outage {outage}: back {took:?} after the broker was"
        );
    }
}

/// A small tmpfs volume, mounted for the test and unmounted when it ends. `None` (with the
/// reason printed) where the test does not run as root.
struct Volume {
    dir: tempfile::TempDir,
}

impl Volume {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!(
                "SKIPPED: mounting a tmpfs volume needs root; run the suite as root to fill a real disk"
            );
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the volume to the last byte with a file; returns it.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        let mut small = vec![0u8; 512];
        loop {
            if file.write_all(&block).is_err() {
                // Then the last scraps.
                while file.write_all(&small).is_ok() {}
                small.truncate(1);
                while file.write_all(&small).is_ok() {}
                return filler;
            }
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn issue_12_a_full_disk_is_recovered_from_without_a_restart() {
    let Some(volume) = Volume::mount("8m") else {
        return;
    };
    let lab = Partner::start(503, json!({})).await; // orders stay in the store
    let portal = Partner::start(200, json!({})).await;
    let store = format!("sqlite://{}/ferry.db", volume.path().display());
    let env = [
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
    ];
    let ferry = Ferry::start_with_store(
        &[repo().join("flows")],
        &env,
        &store,
        tempfile::tempdir().unwrap(),
    )
    .await;
    let url = format!("{}/api/v1/test-requests", ferry.url);
    let submit = |n: usize| {
        let url = url.clone();
        async move {
            let mut request = payload("test-request.json");
            request["portal_ref"] = json!(format!("PR-DISK-{n}"));
            request["notes"] = json!("x".repeat(2000));
            post_json(&url, &request).await.0
        }
    };
    let ready = || async {
        reqwest::get(format!("{}/readyz", ferry.url))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(submit(0).await, 202);
    let filler = volume.fill();
    // Nothing unstored is accepted: the disk refuses, and ferry says so.
    let mut refused = 0;
    for n in 1..=200 {
        match submit(n).await {
            503 => refused += 1,
            202 => {}
            other => panic!("request {n}: {other}"),
        }
        if refused >= 3 {
            break;
        }
    }
    assert!(refused >= 3, "the full disk never refused a write");
    assert_eq!(ready().await, 503, "readiness reports the store fault");
    let health = reqwest::get(format!("{}/healthz", ferry.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // The cause goes away: ferry takes messages again, with no restart.
    std::fs::remove_file(filler).unwrap();
    wait_for("readiness is back", || async { ready().await == 200 }).await;
    for n in 1000..1010 {
        assert_eq!(submit(n).await, 202, "request {n} after the disk has room");
    }
}

#[tokio::test]
async fn issue_12_connections_that_send_nothing_are_closed() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let options = ferry::server::ServeOptions {
        header_timeout: Duration::from_secs(1),
        ..ferry::server::ServeOptions::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let env = [
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
    ];
    let ferry = Ferry::start_guarded(&[repo().join("flows")], &env, &store, dir, options).await;
    let address = ferry.url.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let silent: Vec<TcpStream> = (0..100)
            .map(|_| TcpStream::connect(&address).unwrap())
            .collect();
        // And one that sent a request and then fell silent on a kept-alive connection.
        let mut kept = TcpStream::connect(&address).unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: ferry\r\n\r\n")
            .unwrap();
        let mut buffer = [0u8; 512];
        let read = kept.read(&mut buffer).unwrap();
        assert!(String::from_utf8_lossy(&buffer[..read]).starts_with("HTTP/1.1 200"));
        let started = Instant::now();
        for mut connection in silent.into_iter().chain([kept]) {
            connection
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            // Closed by ferry: the read ends, with no bytes (or a reset), well before 5 s.
            match connection.read(&mut buffer) {
                Ok(0) | Err(_) if started.elapsed() < Duration::from_secs(4) => {}
                outcome => panic!("still open after {:?}: {outcome:?}", started.elapsed()),
            }
        }
    })
    .await
    .unwrap();
}

/// Sends a request head and then `body_len` bytes of body, all before reading anything, as
/// many HTTP libraries do; returns the status line of whatever answer arrives.
fn write_all_then_read(address: &str, head: &str, body_len: usize) -> String {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b' '; 64 * 1024];
    let mut left = body_len;
    while left > 0 {
        let n = left.min(chunk.len());
        // Such a client stops at a failed write, before reading anything.
        if let Err(error) = stream.write_all(&chunk[..n]) {
            return format!("network error while writing: {error}");
        }
        left -= n;
    }
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buffer[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(error) => return format!("network error: {error}"),
        }
    }
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("nothing")
        .to_owned()
}

#[tokio::test]
async fn issue_12_a_client_that_writes_its_whole_body_first_reads_the_early_reply() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let address = ferry.url.trim_start_matches("http://").to_owned();
    tokio::task::spawn_blocking(move || {
        let too_large = 3 * 1024 * 1024; // the portal flow takes 1 MiB
        for round in 0..10 {
            let declared = format!(
                "POST /api/v1/test-requests HTTP/1.1\r\nhost: ferry\r\nx-api-key: {PORTAL_KEY}\r\ncontent-type: application/json\r\ncontent-length: {too_large}\r\n\r\n"
            );
            assert_eq!(
                write_all_then_read(&address, &declared, too_large),
                "HTTP/1.1 413 Payload Too Large",
                "round {round}, declared length"
            );
            let chunked = format!(
                "POST /api/v1/test-requests HTTP/1.1\r\nhost: ferry\r\nx-api-key: {PORTAL_KEY}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{too_large:x}\r\n"
            );
            assert_eq!(
                write_all_then_read(&address, &chunked, too_large),
                "HTTP/1.1 413 Payload Too Large",
                "round {round}, chunked"
            );
            let unauthenticated = format!(
                "POST /api/v1/test-requests HTTP/1.1\r\nhost: ferry\r\ncontent-type: application/json\r\ncontent-length: {too_large}\r\n\r\n"
            );
            assert_eq!(
                write_all_then_read(&address, &unauthenticated, too_large),
                "HTTP/1.1 401 Unauthorized",
                "round {round}, no key"
            );
        }
        // A client that asks first gets the refusal instead of leave to send.
        let mut stream = TcpStream::connect(&address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "POST /api/v1/test-requests HTTP/1.1\r\nhost: ferry\r\nx-api-key: {PORTAL_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
            100 * 1024 * 1024
        )
        .unwrap();
        let mut buffer = [0u8; 1024];
        let read = stream.read(&mut buffer).unwrap();
        let answer = String::from_utf8_lossy(&buffer[..read]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    })
    .await
    .unwrap();
    assert!(lab.received().is_empty());
}

async fn forward(partner: &Partner, budget: &str) -> Ferry {
    let env = [
        ("PARTNER_URL", partner.url.as_str()),
        ("BUDGET", budget),
        ("RESULTS_QUEUE", "unused"),
        ("AMQP_URL", "amqp://127.0.0.1:9"),
        ("PORTAL_URL", "http://127.0.0.1:9"),
    ];
    Ferry::start(&faults_flows(), &env).await
}

async fn send_forward(ferry: &Ferry, body: &Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("{}/forward", ferry.url))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn issue_12_a_delivery_is_retried_for_its_time_budget_then_kept() {
    let partner = Partner::start(503, json!({})).await;
    let ferry = forward(&partner, "3s").await;
    let id = send_forward(&ferry, &json!({"n": 1})).await;
    // Down for longer than ten attempts take: still retried, then taken.
    wait_until("the partner refused more than ten attempts", || {
        partner.received().len() > 12
    })
    .await;
    partner.set_reply(201, json!({}));
    wait_until("the partner took it", || partner.accepted().len() == 1).await;
    wait_for("the message is delivered", || async {
        ferry.admin(&format!("/messages/{id}")).await.1["status"] == "delivered"
    })
    .await;

    // Down for longer than the budget: a dead letter once it is spent, not before.
    partner.set_reply(503, json!({}));
    let started = Instant::now();
    let id = send_forward(&ferry, &json!({"n": 2})).await;
    wait_for("the message is a dead letter", || async {
        ferry.admin(&format!("/messages/{id}")).await.1["status"] == "dead"
    })
    .await;
    let lasted = started.elapsed();
    assert!(
        lasted >= Duration::from_millis(2900),
        "dead after {lasted:?}"
    );
}

#[tokio::test]
async fn issue_12_a_partner_whose_answer_was_lost_gets_the_resend_with_the_same_key() {
    // The partner takes the order, but its answer comes after ferry stopped waiting.
    let partner = Partner::start(201, json!({})).await;
    partner.set_delay(Duration::from_secs(1));
    let ferry = forward(&partner, "1m").await;
    send_forward(&ferry, &json!({"order": "A-1"})).await;
    wait_until("the partner took the order", || {
        !partner.received().is_empty()
    })
    .await;
    partner.set_delay(Duration::ZERO);
    wait_until("the resend arrived", || partner.received().len() >= 2).await;
    let received = partner.received();
    // The window: the first attempt was taken (2xx), and ferry did not see it.
    assert_eq!(received[0].status, 201);
    let keys: BTreeSet<&str> = received
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 1, "every attempt carries one key: {keys:?}");
    assert_eq!(received[0].body, received[1].body);
}

#[tokio::test]
async fn issue_12_an_idempotency_key_reused_for_another_request_is_refused() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let url = format!("{}/api/v1/test-requests", ferry.url);
    let mut first = payload("test-request.json");
    first["portal_ref"] = json!("PR-KEY-1");
    let (status, reply) = post_json(&url, &first).await;
    assert_eq!(status, 202, "{reply}");
    // The same request again: the first reply.
    let (status, again) = post_json(&url, &first).await;
    assert_eq!((status, &again), (202, &reply));
    // The same key (the portal_ref) for another request: refused, nothing happens.
    let mut other = first.clone();
    other["notes"] = json!("a different request");
    let (status, conflict) = post_json(&url, &other).await;
    assert_eq!(status, 422, "{conflict}");
    assert_eq!(conflict["error"], "idempotency_conflict");
    // Even one that breaks the schema is a conflict, not the first reply.
    let mut broken = first.clone();
    broken["samples"] = json!("not a list");
    let (status, conflict) = post_json(&url, &broken).await;
    assert_eq!(
        (status, conflict["error"].as_str()),
        (422, Some("idempotency_conflict"))
    );

    // Concurrent first requests with one key: one message. The same body: one reply for all;
    // other bodies: one wins, the rest are conflicts.
    let mut same = tokio::task::JoinSet::new();
    let mut different = tokio::task::JoinSet::new();
    for n in 0..8 {
        let mut request = payload("test-request.json");
        request["portal_ref"] = json!("PR-KEY-SAME");
        let to = url.clone();
        same.spawn(async move { post_json(&to, &request).await });
        let mut request = payload("test-request.json");
        request["portal_ref"] = json!("PR-KEY-RACE");
        request["notes"] = json!(format!("request {n}"));
        let to = url.clone();
        different.spawn(async move { post_json(&to, &request).await });
    }
    let same: Vec<(u16, Value)> = same.join_all().await;
    assert!(same.iter().all(|(status, _)| *status == 202), "{same:?}");
    let ids: BTreeSet<String> = same
        .iter()
        .map(|(_, r)| r["request_id"].to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{same:?}");
    let different: Vec<(u16, Value)> = different.join_all().await;
    let statuses: Vec<u16> = different.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{different:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 422).count(),
        7,
        "{different:?}"
    );
    wait_until("the lab has three orders", || lab.accepted().len() == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lab.accepted().len(), 3, "one per key");
}

#[tokio::test]
async fn issue_12_a_body_breaking_a_schema_everywhere_gets_a_bounded_reply() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let mut request = payload("test-request.json");
    // Within the 1 MiB limit: ten thousand broken samples and thirty thousand unknown keys.
    let samples: Vec<Value> = (0..10_000).map(|n| json!({"sample_id": n})).collect();
    request["samples"] = json!(samples);
    for n in 0..30_000 {
        request[format!("extra_{n}")] = json!(n);
    }
    let body = serde_json::to_vec(&request).unwrap();
    let response = signed_post(&format!("{}/api/v1/test-requests", ferry.url), body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let text = response.text().await.unwrap();
    assert!(text.len() < 200_000, "a reply of {} bytes", text.len());
    let reply: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reply["error"], "validation_failed");
    assert_eq!(reply["details"].as_array().unwrap().len(), 100);
    let message = reply["message"].as_str().unwrap();
    assert!(message.contains("the first 100 are listed"), "{message}");
}

#[tokio::test]
async fn issue_12_jetstream_keeps_ids_as_long_as_a_publish_is_retried() {
    // A stream made elsewhere with a one-minute window; a ferry flow that retries its
    // publishes for longer widens it, so a late retry is still recognised.
    let subject = unique("window");
    let client = async_nats::connect(nats()).await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: ferry::queue::nats_stream_name(&subject),
            subjects: vec![subject.clone()],
            duplicate_window: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .unwrap();
    let sink = Partner::start(200, json!({})).await;
    let names = [unique("embedded"), unique("amqp"), subject.clone()];
    // The nats-publish fixture retries for 60 s; JetStream's floor is 2 minutes.
    let ferry = crate::queues::queue_flows_on(&sink, &names).await;
    let (status, _) = post_json(&format!("{}/nats/publish", ferry.url), &json!({"n": 1})).await;
    assert_eq!(status, 202);
    wait_for("the stream's window is widened", || async {
        let mut stream = jetstream
            .get_stream(ferry::queue::nats_stream_name(&subject))
            .await
            .unwrap();
        let info = stream.info().await.unwrap();
        info.config.duplicate_window >= Duration::from_secs(120)
    })
    .await;
}

#[tokio::test]
async fn issue_12_operator_commands_fail_when_they_reach_no_admin_api() {
    let run = |url: &str, args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .env("FERRY_ADMIN_URL", url)
            .env("FERRY_ADMIN_TOKEN", "some-token")
            .env("FERRY_ADMIN_TIMEOUT", "1s")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    // A server that is not ferry's admin API (a flows-only port, a wrong one).
    let elsewhere = Partner::start(404, json!({"error": "not_found"})).await;
    let url = elsewhere.url.clone();
    let (code, out) = tokio::task::spawn_blocking(move || run(&url, &["dlq", "list"]))
        .await
        .unwrap();
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no ferry admin API"), "{out}");
    assert!(!out.contains("0 dead letter(s)"), "{out}");
    // One that never answers.
    let silent = Partner::start(200, json!({"dead_letters": []})).await;
    silent.set_delay(Duration::from_secs(30));
    let url = silent.url.clone();
    let started = Instant::now();
    let (code, out) = tokio::task::spawn_blocking(move || run(&url, &["dlq", "list"]))
        .await
        .unwrap();
    assert_eq!(code, Some(2), "{out}");
    assert!(started.elapsed() < Duration::from_secs(10), "{out}");

    // An id with a slash stays one id.
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let url = ferry.url.clone();
    let (code, out) = tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["dlq", "show", "../dead-letters"])
            .env("FERRY_ADMIN_URL", &url)
            .env("FERRY_ADMIN_TOKEN", crate::util::ADMIN_TOKEN)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no message ../dead-letters"), "{out}");
}

#[tokio::test]
async fn issue_12_the_same_signed_webhook_twice_at_once_is_taken_once() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-TWICE"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let (status, reply) = post_json(
        &format!("{}/api/v1/test-requests", ferry.url),
        &payload("test-request.json"),
    )
    .await;
    assert_eq!(status, 202);
    let request_id = reply["request_id"].as_str().unwrap().to_owned();
    crate::util::wait_for_state(&ferry.url, &request_id, "delivered_to_lab").await;
    let mut result = payload("test-result.json");
    result["order_ref"] = json!(request_id);
    let body = serde_json::to_vec(&result).unwrap();
    let headers = webhook_headers(LAB_SECRET, &body);
    let send = || {
        let mut request = reqwest::Client::new()
            .post(format!("{}/api/v1/lab-results", ferry.url))
            .header("content-type", "application/json")
            .body(body.clone());
        for (name, value) in &headers {
            request = request.header(*name, value);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let (a, b) = tokio::join!(send(), send());
    let mut statuses = [a, b];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 401]);
    wait_until("the portal has the results", || {
        portal.accepted().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(portal.received().len(), 1);
}

/// Whether `status` says the process was killed by SIGABRT (a fault point fired).
fn aborted(status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    status.signal() == Some(6)
}

#[tokio::test]
async fn issue_12_ferry_dying_between_a_partners_answer_and_its_commit_delivers_again_with_the_same_key()
 {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-FAULT"})).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let lab_url = [("LAB_URL", lab.url.as_str())];
    let mut armed = lab_url.to_vec();
    armed.push(("FERRY_FAULT", "after-target-answer"));
    let (mut child, url) = spawn_on(&store, &["--flows", "flows"], &armed, Stdio::null());
    let (status, reply) = post_json(
        &format!("{url}/api/v1/test-requests"),
        &payload("test-request.json"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    // The window: the lab took the order, and ferry died before it could record that.
    assert!(aborted(exit), "the fault point was not reached: {exit:?}");
    assert_eq!(lab.accepted().len(), 1);

    let (child, url) = spawn_on(&store, &["--flows", "flows"], &lab_url, Stdio::null());
    wait_until("the order is sent again", || lab.accepted().len() == 2).await;
    let keys: Vec<String> = lab
        .accepted()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    let request_id = reply["request_id"].as_str().unwrap();
    assert_eq!(
        keys,
        [format!("{request_id}:lab"), format!("{request_id}:lab")]
    );
    crate::util::wait_for_state(&url, request_id, "delivered_to_lab").await;
    terminate(child).await;
}

#[tokio::test]
async fn issue_12_a_queue_message_committed_but_not_acknowledged_is_handled_once() {
    let portal = Partner::start(200, json!({})).await;
    let queue = unique("unacked");
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let env = [
        ("RESULTS_QUEUE", queue.as_str()),
        ("AMQP_URL", rabbitmq()),
        ("PORTAL_URL", portal.url.as_str()),
        ("PARTNER_URL", "http://127.0.0.1:9"),
        ("BUDGET", "1m"),
    ];
    let flows = faults_flows().display().to_string();
    let mut armed = env.to_vec();
    armed.push(("FERRY_FAULT", "before-queue-ack"));
    let (mut child, _) = spawn_on(&store, &["--flows", &flows], &armed, Stdio::null());
    // The publisher's message id is what recognises the message when it comes again.
    amqp_publish(&queue, br#"{"result": "R-1"}"#, Some("result-R-1")).await;
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(aborted(exit), "the fault point was not reached: {exit:?}");
    // Committed but never acknowledged: the broker has it again for the next consumer.
    let (child, _) = spawn_on(&store, &["--flows", &flows], &env, Stdio::null());
    wait_for("the broker handed the message out again", || async {
        crate::util::amqp_depth(&queue).await == 0
    })
    .await;
    wait_until("the portal has the result", || {
        !portal.accepted().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One message, one key: the portal may see a delivery in flight at the abort again, but
    // under the same key, never as a second message.
    let keys = portal.idempotency_keys();
    assert_eq!(keys.len(), 1, "handled once: {keys:?}");
    terminate(child).await;
}

#[tokio::test]
async fn issue_12_kill_9_under_load_loses_nothing_and_resends_are_recognised() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-K"})).await;
    lab.set_delay(Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let env = [("LAB_URL", lab.url.as_str())];
    let (mut child, url) = spawn_on(&store, &["--flows", "flows"], &env, Stdio::null());
    let url = Arc::new(std::sync::Mutex::new(url));
    const REQUESTS: usize = 400;
    let next = Arc::new(AtomicUsize::new(0));
    let answered: Arc<std::sync::Mutex<BTreeMap<usize, Vec<String>>>> = Arc::default();
    let lost: Arc<std::sync::Mutex<Vec<usize>>> = Arc::default();
    let request = |n: usize| {
        let mut request = payload("test-request.json");
        request["portal_ref"] = json!(format!("PR-KILL-{n}"));
        serde_json::to_vec(&request).unwrap()
    };
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (url, next, answered, lost) = (
            Arc::clone(&url),
            Arc::clone(&next),
            Arc::clone(&answered),
            Arc::clone(&lost),
        );
        clients.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= REQUESTS {
                    return;
                }
                let base = url.lock().unwrap().clone();
                match signed_post(&format!("{base}/api/v1/test-requests"), request(n))
                    .send()
                    .await
                {
                    Ok(response) if response.status() == 202 => {
                        let reply: Value = response.json().await.unwrap();
                        let id = reply["request_id"].as_str().unwrap().to_owned();
                        answered.lock().unwrap().entry(n).or_default().push(id);
                    }
                    Ok(response) => panic!("request {n}: {}", response.status()),
                    // The reply was lost (ferry died, or was not there): resent later.
                    Err(_) => lost.lock().unwrap().push(n),
                }
            }
        });
    }
    wait_until_within("ferry is under load", 60, || {
        next.load(Ordering::Relaxed) >= REQUESTS / 3
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = next.load(Ordering::Relaxed);
    // Requests sent while ferry is down fail at once; let the clients finish their run.
    while clients.join_next().await.is_some() {}
    let lost_replies = lost.lock().unwrap().clone();
    assert!(
        lost_replies.iter().any(|n| *n < killed),
        "no request was in flight when ferry died: the test missed its window"
    );

    // The restarted ferry reaches the lab at a new address: what the old one takes late
    // (requests the killed process sent) is told apart from what the new process sends.
    let lab_after = Partner::start(201, json!({"lab_order_id": "LAB-K"})).await;
    let env = [("LAB_URL", lab_after.url.as_str())];
    let (child, restarted) = spawn_on(&store, &["--flows", "flows"], &env, Stdio::null());
    for n in &lost_replies {
        let response = signed_post(&format!("{restarted}/api/v1/test-requests"), request(*n))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "resend of {n}");
        let reply: Value = response.json().await.unwrap();
        let id = reply["request_id"].as_str().unwrap().to_owned();
        answered.lock().unwrap().entry(*n).or_default().push(id);
    }
    let answered = answered.lock().unwrap().clone();
    assert_eq!(
        answered.len(),
        REQUESTS,
        "every request was answered 202 in the end"
    );
    // Never answered twice with different ids.
    let mut ids = BTreeSet::new();
    for (n, got) in &answered {
        let distinct: BTreeSet<&String> = got.iter().collect();
        assert_eq!(distinct.len(), 1, "request {n} got {got:?}");
        ids.insert(got[0].clone());
    }
    // Each accepted request reaches the lab, under its one key.
    let expected: BTreeSet<String> = ids.iter().map(|id| format!("{id}:lab")).collect();
    let keys = |lab: &Partner| -> Vec<String> {
        lab.accepted()
            .iter()
            .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
            .collect()
    };
    wait_until_within("the lab has every order", 60, || {
        let mut all: BTreeSet<String> = keys(&lab).into_iter().collect();
        all.extend(keys(&lab_after));
        all == expected
    })
    .await;
    // Each process sends an order once: what comes twice is what the killed one had sent
    // (or had been answered for) without committing it, sent again after the restart under
    // the same key — at least once, never as another order.
    for (process, lab) in [("killed", &lab), ("restarted", &lab_after)] {
        let sent = keys(lab);
        let distinct: BTreeSet<&String> = sent.iter().collect();
        assert_eq!(
            distinct.len(),
            sent.len(),
            "the {process} ferry sent an order twice"
        );
    }
    terminate(child).await;
}

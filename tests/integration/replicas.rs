//! Several `ferry serve` processes sharing one PostgreSQL store: they split the work, a killed
//! one's work is finished by the others once its claims run out, and a conversation can go
//! through any of them. Also: the database going away and coming back.

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::util::process::{spawn_on, terminate};
use crate::util::{
    Backend, Ferry, LAB_SECRET, Partner, Proxy, TestStore, client, payload, post_json, repo,
    signed_post, wait_for, wait_until_within, webhook_headers,
};

/// How long a replica's claim holds in these tests.
const LEASE: &str = "2s";

/// Running replicas, killed when the test ends however it ends.
struct Replicas(Vec<(Child, String)>);

impl Replicas {
    fn start(n: usize, store: &TestStore, lab: &Partner, portal: &Partner) -> Self {
        Self((0..n).map(|_| replica(store, lab, portal)).collect())
    }

    fn urls(&self) -> Vec<String> {
        self.0.iter().map(|(_, url)| url.clone()).collect()
    }

    /// Stops each replica with SIGTERM and checks it shut down cleanly.
    async fn stop(mut self) {
        for (child, _) in std::mem::take(&mut self.0) {
            terminate(child).await;
        }
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn replica(store: &TestStore, lab: &Partner, portal: &Partner) -> (Child, String) {
    spawn_on(
        &store.url,
        &[
            "--flows",
            "flows",
            "--lease",
            LEASE,
            "--store-connections",
            "6",
        ],
        &[("LAB_URL", &lab.url), ("PORTAL_URL", &portal.url)],
        Stdio::null(),
    )
}

fn request(i: usize) -> Value {
    let mut request = payload("test-request.json");
    request["portal_ref"] = json!(format!("PR-REPLICA-{i}"));
    request
}

/// Submits request `i` to the replica it falls to, or to the next one up when that one does
/// not answer (as a load balancer would); returns the request id.
async fn submit(urls: &[String], i: usize) -> String {
    for turn in 0..urls.len() {
        let url = &urls[(i + turn) % urls.len()];
        let body = serde_json::to_vec(&request(i)).unwrap();
        let Ok(response) = signed_post(&format!("{url}/api/v1/test-requests"), body)
            .send()
            .await
        else {
            continue;
        };
        let status = response.status().as_u16();
        let reply: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "{reply}");
        return reply["request_id"].as_str().unwrap().to_owned();
    }
    panic!("no replica took request {i}");
}

#[tokio::test]
async fn three_replicas_share_1000_requests_and_finish_the_work_of_a_killed_one() {
    let store = TestStore::new(Backend::Postgres).await;
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-R"})).await;
    lab.set_delay(Duration::from_millis(20));
    let portal = Partner::start(200, json!({})).await;
    let mut replicas = Replicas::start(3, &store, &lab, &portal);
    let urls = Arc::new(replicas.urls());

    let next = Arc::new(AtomicUsize::new(0));
    let mut clients = JoinSet::new();
    for _ in 0..16 {
        let (urls, next) = (Arc::clone(&urls), Arc::clone(&next));
        clients.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 1000 {
                    return ids;
                }
                ids.push(submit(&urls, i).await);
            }
        });
    }
    // Mid-run, with deliveries in flight: replica 0 dies without a word. The lab holds its
    // answers a while first, so every replica surely has deliveries at the lab, unanswered,
    // when it dies: the window this test is about.
    wait_until_within("the lab has 300 orders", 120, || {
        lab.received().len() >= 300
    })
    .await;
    lab.set_delay(Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut killed, _) = replicas.0.remove(0);
    killed.kill().unwrap();
    killed.wait().unwrap();
    lab.set_delay(Duration::from_millis(20));

    let mut request_ids = BTreeSet::new();
    while let Some(ids) = clients.join_next().await {
        request_ids.extend(ids.unwrap());
    }
    assert_eq!(request_ids.len(), 1000, "every request was accepted once");
    let expected: BTreeSet<String> = request_ids.iter().map(|id| format!("{id}:lab")).collect();
    wait_until_within("the lab has every order", 120, || {
        keys(&lab.received()) == expected
    })
    .await;

    let mut per_key: HashMap<String, Vec<Instant>> = HashMap::new();
    for received in lab.received() {
        per_key
            .entry(idempotency_key(&received))
            .or_default()
            .push(received.at);
    }
    let repeated: Vec<_> = per_key.iter().filter(|(_, at)| at.len() > 1).collect();
    // What the killed replica had in flight (at most its concurrency, 8) reaches the lab
    // twice, with the same idempotency key, so the lab does it once; and only once its claim
    // has run out, not while it might still have been delivering.
    assert!(
        !repeated.is_empty(),
        "the killed replica had nothing in flight: the test missed its window"
    );
    assert!(
        repeated.len() <= 8 && repeated.iter().all(|(_, at)| at.len() == 2),
        "{repeated:?}"
    );
    for (key, at) in &repeated {
        let waited = at[1] - at[0];
        assert!(
            waited >= Duration::from_millis(1500),
            "{key} was taken over after {waited:?}, before its claim ran out"
        );
    }
    let opened = store.open().await;
    wait_for("nothing is left to deliver", || async {
        opened.undelivered().await.unwrap() == 0
    })
    .await;
    let delivered = opened
        .list_messages(Some("portal-to-lab"), Some("delivered"), 2000)
        .await
        .unwrap();
    assert_eq!(delivered.len(), 1000);
    opened.close().await;
    replicas.stop().await;
}

fn idempotency_key(received: &crate::util::Received) -> String {
    received.headers["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned()
}

fn keys(received: &[crate::util::Received]) -> BTreeSet<String> {
    received.iter().map(idempotency_key).collect()
}

#[tokio::test]
async fn a_result_arriving_at_another_replica_reaches_the_right_request() {
    let store = TestStore::new(Backend::Postgres).await;
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-ELSEWHERE"})).await;
    let portal = Partner::start(200, json!({})).await;
    let replicas = Replicas::start(2, &store, &lab, &portal);
    let [url_a, url_b] = <[String; 2]>::try_from(replicas.urls()).unwrap();

    let (status, reply) = post_json(&format!("{url_a}/api/v1/test-requests"), &request(1)).await;
    assert_eq!(status, 202, "{reply}");
    let request_id = reply["request_id"].as_str().unwrap().to_owned();
    // The lab's order id is known once ferry has recorded the lab's answer, a moment after
    // the lab has the order.
    let status_url = format!("{url_a}/api/v1/test-requests/{request_id}");
    wait_for("ferry recorded the lab's order id", || async {
        let status: Value = client()
            .get(&status_url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        status["status"] == "delivered_to_lab"
    })
    .await;
    assert_eq!(lab.accepted().len(), 1);

    // The lab answers through replica B, by its own order id.
    let mut result = payload("test-result.json");
    result["order_ref"] = json!("unknown-to-us");
    result["lab_order_id"] = json!("LAB-ELSEWHERE");
    let body = serde_json::to_vec(&result).unwrap();
    let headers = webhook_headers(LAB_SECRET, &body);
    let deliver = |url: &str| {
        let mut request = client()
            .post(format!("{url}/api/v1/lab-results"))
            .header("content-type", "application/json")
            .body(body.clone());
        for (name, value) in &headers {
            request = request.header(*name, value);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(deliver(&url_b).await, 202);
    wait_until_within("the portal has the results", 30, || {
        portal.accepted().len() == 1
    })
    .await;
    // The same signed webhook again, at the other replica: a replay there too.
    assert_eq!(deliver(&url_a).await, 401);
    assert_eq!(
        portal.accepted()[0].json()["request_id"],
        request_id.as_str()
    );

    // Either replica tells the same status.
    for url in [&url_a, &url_b] {
        let (_, status) = crate::util::status_of(url, &request_id).await;
        assert_eq!(status["lab_order_id"], "LAB-ELSEWHERE", "{status}");
    }
    replicas.stop().await;
}

#[tokio::test]
async fn a_store_opened_before_its_database_answers_waits_for_it() {
    let store = TestStore::new(Backend::Postgres).await;
    let mut proxy = Proxy::start("127.0.0.1:5432").await;
    proxy.cut();
    let url = store.url.replace(":5432/", &format!(":{}/", proxy.port));
    let opening = tokio::spawn(async move { ferry::store::Store::open(&url).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!opening.is_finished(), "still waiting for the database");
    proxy.restore().await;
    let opened = opening
        .await
        .unwrap()
        .expect("opened once the database answered");
    opened.writable().await.unwrap();
    opened.close().await;
}

#[tokio::test]
async fn a_database_that_goes_away_is_not_ready_and_is_used_again_when_back() {
    let store = TestStore::new(Backend::Postgres).await;
    let mut proxy = Proxy::start("127.0.0.1:5432").await;
    let through_proxy = TestStore::at(store.url.replace(":5432/", &format!(":{}/", proxy.port)));
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-BACK"})).await;
    let portal = Partner::start(200, json!({})).await;
    let env = [
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
    ];
    let ferry = Ferry::start_on(
        &[repo().join("flows")],
        &env,
        through_proxy,
        ferry::server::ServeOptions::default(),
    )
    .await;
    let ready = || async {
        client()
            .get(format!("{}/readyz", ferry.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready().await, 200);

    proxy.cut();
    assert_eq!(ready().await, 503, "the database is away");
    let (status, _) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request(1)).await;
    assert_eq!(status, 503, "nothing is accepted that cannot be stored");

    proxy.restore().await;
    wait_for("ready again", || async { ready().await == 200 }).await;
    let (status, reply) =
        post_json(&format!("{}/api/v1/test-requests", ferry.url), &request(2)).await;
    assert_eq!(status, 202, "{reply}");
    wait_until_within("the lab has the order", 30, || lab.accepted().len() == 1).await;
    drop(store);
}

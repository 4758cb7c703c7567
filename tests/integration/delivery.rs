//! Durable delivery: accepted means stored; delivery retries until the target takes it, once
//! per idempotency key; permanent refusals become dead letters that replay can deliver.

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::round_trip::history_states;
use crate::util::{Backend, Ferry, Partner, features, payload, post_json, wait_for, wait_until};
use crate::util::{TestStore, status_of, wait_for_state, wait_until_within};

on_both_stores!(
    a_lab_down_while_200_requests_arrive_gets_each_once_when_it_is_back,
    retry_after_from_the_lab_is_honoured,
    a_permanent_refusal_dead_letters_at_once_and_replay_delivers_it,
    a_repeated_submission_gets_the_same_reply_and_one_delivery,
    the_status_endpoint_walks_through_each_lifecycle_state,
    a_slow_lab_holds_up_nothing_else,
);

fn request(i: usize) -> Value {
    let mut request = payload("test-request.json");
    request["portal_ref"] = json!(format!("PR-LOAD-{i}"));
    request
}

fn keys(received: &[crate::util::Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect()
}

async fn a_lab_down_while_200_requests_arrive_gets_each_once_when_it_is_back(backend: Backend) {
    let lab = Partner::start(503, json!({"error": "maintenance"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped_on(&lab, &portal, backend).await;
    let url = format!("{}/api/v1/test-requests", ferry.url);

    let mut submissions = JoinSet::new();
    for i in 0..200 {
        let url = url.clone();
        submissions.spawn(async move { post_json(&url, &request(i)).await });
    }
    let mut request_ids = BTreeSet::new();
    while let Some(answer) = submissions.join_next().await {
        let (status, reply) = answer.unwrap();
        assert_eq!(status, 202, "{reply}");
        request_ids.insert(reply["request_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(request_ids.len(), 200, "every request got its own id");
    wait_until("the lab refused every order at least once", || {
        keys(&lab.received())
            .into_iter()
            .collect::<BTreeSet<_>>()
            .len()
            == 200
    })
    .await;
    assert!(lab.accepted().is_empty());

    lab.set_reply(201, json!({"lab_order_id": "LAB-X"}));
    wait_until("the lab took all 200 orders", || {
        lab.accepted().len() >= 200
    })
    .await;
    let store = ferry.runtime.store().unwrap();
    wait_for("nothing is left to deliver", || async {
        store.undelivered().await.unwrap() == 0
    })
    .await;
    let accepted = keys(&lab.accepted());
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    for key in &accepted {
        *per_key.entry(key.as_str()).or_default() += 1;
    }
    assert_eq!(per_key.len(), 200);
    assert!(
        per_key.values().all(|n| *n == 1),
        "an order reached the lab twice: {per_key:?}"
    );
    let expected: BTreeSet<String> = request_ids.iter().map(|id| format!("{id}:lab")).collect();
    assert_eq!(
        per_key
            .keys()
            .map(|k| (*k).to_owned())
            .collect::<BTreeSet<_>>(),
        expected
    );
    let stats = store.commit_stats();
    assert!(stats.messages >= 200 && stats.commits > 0, "{stats:?}");
}

async fn retry_after_from_the_lab_is_honoured(backend: Backend) {
    let lab = Partner::start(201, json!({})).await;
    lab.set_reply_with_header(503, json!({}), ("retry-after", "1"));
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped_on(&lab, &portal, backend).await;
    let (status, _) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request(1)).await;
    assert_eq!(status, 202);
    wait_until("the lab refused the order once", || {
        lab.received().len() == 1
    })
    .await;
    lab.set_reply(201, json!({}));
    wait_until("the lab took the order", || lab.accepted().len() == 1).await;
    let received = lab.received();
    let gap = received[1].at - received[0].at;
    // The flow's own backoff is at most 100 ms here; only Retry-After explains a second.
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
}

async fn a_permanent_refusal_dead_letters_at_once_and_replay_delivers_it(backend: Backend) {
    let lab = Partner::start(400, json!({"error": "unknown test code PB-ICPMS"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped_on(&lab, &portal, backend).await;
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request(7)).await;
    let id = reply["request_id"].as_str().unwrap().to_owned();

    let state = wait_for_state(&ferry.url, &id, "failed").await;
    assert_eq!(state["history"].as_array().unwrap().len(), 2);
    let (status, message) = ferry.admin(&format!("/messages/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(message["status"], "dead");
    assert_eq!(
        message["deliveries"][0]["attempts"], 1,
        "a 400 is not retried"
    );
    assert_eq!(message["deliveries"][0]["last_status"], 400);
    assert!(
        message["error"]
            .as_str()
            .unwrap()
            .contains("unknown test code PB-ICPMS"),
        "the lab's answer is kept"
    );
    assert_eq!(lab.received().len(), 1);
    let (_, dead) = ferry.admin("/dead-letters").await;
    assert_eq!(dead["dead_letters"][0]["id"], id.as_str());

    // A replay says why; without a reason nothing is replayed.
    let (status, refused) = ferry
        .admin_post(&format!("/messages/{id}/replay"), &json!({}))
        .await;
    assert_eq!((status, &refused["error"]), (400, &json!("missing_reason")));

    // The lab is fixed; replay delivers the same message, with the same idempotency key.
    lab.set_reply(201, json!({"lab_order_id": "LAB-9"}));
    let (status, answer) = ferry
        .admin_post(
            &format!("/messages/{id}/replay"),
            &json!({"reason": "the portal fixed its data"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["replayed"], true, "{answer}");
    wait_until("the lab took the replayed order", || {
        lab.accepted().len() == 1
    })
    .await;
    assert_eq!(
        lab.accepted()[0].headers["idempotency-key"],
        format!("{id}:lab").as_str()
    );
    let state = wait_for_state(&ferry.url, &id, "delivered_to_lab").await;
    assert_eq!(state["lab_order_id"], "LAB-9");
    let (_, message) = ferry.admin(&format!("/messages/{id}")).await;
    assert_eq!(message["status"], "delivered");
    // The timeline says who replayed it (the admin token's name) and why.
    let replayed = message["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "replayed")
        .unwrap_or_else(|| panic!("no replay in {message}"));
    assert_eq!(replayed["detail"]["by"], "admin", "{replayed}");
    assert_eq!(replayed["detail"]["reason"], "the portal fixed its data");
    let (_, dead) = ferry.admin("/dead-letters").await;
    assert_eq!(dead["dead_letters"], json!([]));
}

async fn a_repeated_submission_gets_the_same_reply_and_one_delivery(backend: Backend) {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped_on(&lab, &portal, backend).await;
    let url = format!("{}/api/v1/test-requests", ferry.url);
    let mut submissions = JoinSet::new();
    for _ in 0..10 {
        let url = url.clone();
        submissions.spawn(async move { post_json(&url, &request(3)).await });
    }
    let mut replies = BTreeSet::new();
    while let Some(answer) = submissions.join_next().await {
        let (status, reply) = answer.unwrap();
        assert_eq!(status, 202);
        replies.insert(reply.to_string());
    }
    assert_eq!(
        replies.len(),
        1,
        "every submission got the first one's reply: {replies:?}"
    );
    let store = ferry.runtime.store().unwrap();
    wait_for("nothing is left to deliver", || async {
        store.undelivered().await.unwrap() == 0
    })
    .await;
    assert_eq!(lab.received().len(), 1);
    let (_, listed) = ferry.admin("/messages?flow=portal-to-lab").await;
    assert_eq!(listed["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn the_idempotency_key_header_makes_submissions_idempotent() {
    let sink = Partner::start(200, json!({})).await;
    let ferry = features(&[("SINK_URL", &sink.url)]).await;
    let post = |key: Option<&'static str>| {
        let url = format!("{}/durable", ferry.url);
        async move {
            let mut request = reqwest::Client::new().post(url).json(&json!({"n": 1}));
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            request.send().await.unwrap().json::<Value>().await.unwrap()
        }
    };
    let first = post(Some("abc")).await;
    assert_eq!(post(Some("abc")).await, first);
    assert_ne!(post(None).await, post(None).await);
    wait_until("the sink has three messages", || sink.received().len() == 3).await;
    let store = ferry.runtime.store().unwrap();
    wait_for("nothing is left to deliver", || async {
        store.undelivered().await.unwrap() == 0
    })
    .await;
    assert_eq!(sink.received().len(), 3);
}

async fn the_status_endpoint_walks_through_each_lifecycle_state(backend: Backend) {
    let lab = Partner::start(503, json!({})).await;
    let portal = Partner::start(503, json!({})).await;
    let ferry = Ferry::shipped_on(&lab, &portal, backend).await;
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request(5)).await;
    let id = reply["request_id"].as_str().unwrap().to_owned();
    let (status, state) = status_of(&ferry.url, &id).await;
    assert_eq!(status, 200);
    assert_eq!(state["status"], "accepted");
    assert_eq!(state["portal_ref"], "PR-LOAD-5");

    lab.set_reply(201, json!({"lab_order_id": "LAB-5"}));
    wait_for_state(&ferry.url, &id, "delivered_to_lab").await;

    let mut result = payload("test-result.json");
    result["order_ref"] = json!(id);
    result["lab_order_id"] = json!("LAB-5");
    let (status, _) = post_json(&format!("{}/api/v1/lab-results", ferry.url), &result).await;
    assert_eq!(status, 202);
    wait_until("the portal refused the results once", || {
        !portal.received().is_empty()
    })
    .await;
    assert_eq!(
        status_of(&ferry.url, &id).await.1["status"],
        "results_received"
    );

    portal.set_reply(200, json!({}));
    let state = wait_for_state(&ferry.url, &id, "delivered_to_portal").await;
    let history = history_states(&state);
    assert_eq!(
        history,
        [
            "accepted",
            "delivered_to_lab",
            "results_received",
            "delivered_to_portal"
        ]
    );
    assert_eq!(state["lab_order_id"], "LAB-5");

    // The request's own timeline: its arrival, the steps it went through, where it was
    // queued, then each attempt at the lab.
    let (status, message) = ferry.admin(&format!("/messages/{id}")).await;
    assert_eq!(status, 200);
    let timeline = message["timeline"].as_array().unwrap();
    let kinds: Vec<&str> = timeline
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[..3], ["received", "steps", "queued"], "{kinds:?}");
    assert!(kinds[3..].iter().all(|k| *k == "attempt"), "{kinds:?}");
    assert_eq!(timeline[0]["detail"]["idempotency_key"], "PR-LOAD-5");
    assert_eq!(timeline[0]["detail"].get("steps"), None);
    assert_eq!(timeline[1]["detail"]["steps"].as_array().unwrap().len(), 6);
    assert_eq!(timeline[2]["detail"], json!({"target": "lab"}));
    assert!(timeline[..3].iter().all(|e| e["at"] == timeline[0]["at"]));

    // The trace joins both directions into one timeline, found by any key.
    for key in [id.as_str(), "PR-LOAD-5", "LAB-5"] {
        let (status, trace) = ferry.admin(&format!("/trace/{key}")).await;
        assert_eq!(status, 200, "{key}");
        let flows: BTreeSet<&str> = trace["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["flow"].as_str().unwrap())
            .collect();
        assert_eq!(
            flows,
            BTreeSet::from(["lab-to-portal", "portal-to-lab"]),
            "{key}"
        );
    }
}

#[tokio::test]
async fn the_admin_api_wants_its_token() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let without = reqwest::get(format!("{}/admin/v1/dead-letters", ferry.url))
        .await
        .unwrap();
    assert_eq!(without.status(), 401);
    let wrong = reqwest::Client::new()
        .get(format!("{}/admin/v1/dead-letters", ferry.url))
        .bearer_auth("guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
}

async fn a_slow_lab_holds_up_nothing_else(backend: Backend) {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-S"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped_on(&lab, &portal, backend).await;
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request(0)).await;
    let id = reply["request_id"].as_str().unwrap().to_owned();
    wait_for_state(&ferry.url, &id, "delivered_to_lab").await;

    // The lab slows to a crawl while orders pile up: more than its worker may have in flight.
    lab.set_delay(Duration::from_secs(3));
    for i in 1..=20 {
        let (status, _) =
            post_json(&format!("{}/api/v1/test-requests", ferry.url), &request(i)).await;
        assert_eq!(status, 202, "accepting does not wait for the lab");
    }
    wait_until("the lab's worker is saturated", || {
        lab.received().len() >= 9
    })
    .await;

    // Results still reach the portal at once.
    let mut result = payload("test-result.json");
    result["order_ref"] = json!(id);
    let sent = std::time::Instant::now();
    let (status, _) = post_json(&format!("{}/api/v1/lab-results", ferry.url), &result).await;
    assert_eq!(status, 202);
    wait_until("the portal has the results", || {
        portal.received().len() == 1
    })
    .await;
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "the portal waited {:?}",
        sent.elapsed()
    );
    // The lab never had more orders in flight than the flow's concurrency (8) allows.
    assert!(
        lab.received().len() <= 9,
        "{} orders in flight",
        lab.received().len() - 1
    );
}

/// A ferry that stops gives back the deliveries it took over as their messages committed and
/// has not sent: the next ferry delivers them at once, not when their claims run out. On
/// PostgreSQL, where nothing else frees them (a SQLite store frees every claim at start).
#[tokio::test]
async fn deliveries_taken_over_and_not_sent_are_given_back_when_ferry_stops() {
    use crate::util::process::{spawn_on, terminate};

    let store = TestStore::new(Backend::Postgres).await;
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-G"})).await;
    // Slow enough that most orders still wait in memory when ferry is told to stop.
    lab.set_delay(Duration::from_millis(500));
    let env = [("LAB_URL", lab.url.as_str())];
    let (child, url) = spawn_on(&store.url, &["--flows", "flows"], &env, Stdio::null());
    const REQUESTS: usize = 40;
    let mut sent = JoinSet::new();
    for i in 0..REQUESTS {
        let url = format!("{url}/api/v1/test-requests");
        sent.spawn(async move { post_json(&url, &request(i)).await.0 });
    }
    while let Some(status) = sent.join_next().await {
        assert_eq!(status.unwrap(), 202);
    }
    terminate(child).await;
    let before = lab.accepted().len();
    assert!(
        before < REQUESTS,
        "the lab had every order before ferry stopped: the test missed its window"
    );

    // Claims hold for the default lease (60 s): only orders given back are due now.
    lab.set_delay(Duration::ZERO);
    let (child, _) = spawn_on(&store.url, &["--flows", "flows"], &env, Stdio::null());
    wait_until_within("the next ferry delivered every order", 20, || {
        lab.idempotency_keys().len() == REQUESTS
    })
    .await;
    assert_eq!(
        lab.accepted().len(),
        REQUESTS,
        "an order reached the lab twice"
    );
    terminate(child).await;
}

/// A caller that gives up while its message waits for the store (here ferry's own request
/// timeout, the database locked by another process) does not strand the delivery: SQLite
/// commits the message all the same, and its worker gets it at once, not when the claim it was
/// committed under runs out.
#[tokio::test]
async fn a_message_committed_after_its_caller_gave_up_is_delivered_at_once() {
    use crate::util::process::{spawn_on, terminate};

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferry.db");
    let store = format!("sqlite://{}", file.display());
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-T"})).await;
    let env = [("LAB_URL", lab.url.as_str())];
    let args = ["--flows", "flows", "--request-timeout", "1s"];
    let (child, url) = spawn_on(&store, &args, &env, Stdio::null());
    let orders = format!("{url}/api/v1/test-requests");
    assert_eq!(post_json(&orders, &request(0)).await.0, 202);
    wait_until("the lab has the first order", || lab.accepted().len() == 1).await;

    // Another process holds the database's write lock past the request timeout.
    let locker = rusqlite::Connection::open(&file).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (status, _) = post_json(&orders, &request(1)).await;
    assert_eq!(status, 408, "the caller is told it timed out");
    locker.execute_batch("COMMIT").unwrap();

    // Claims hold for the default lease (60 s): only a delivery handed over is sent now.
    wait_until_within("the lab has the order whose caller gave up", 20, || {
        lab.accepted().len() == 2
    })
    .await;
    terminate(child).await;
}

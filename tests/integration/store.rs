//! The store's conformance suite: every test runs on SQLite and on the real PostgreSQL, and
//! the PostgreSQL-only tests show what several processes sharing one database rely on.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry::store::{
    Acceptance, Accepted, AfterAttempt, AttemptRecord, Claimed, CorrelationWrite, MessageFilter,
    MessageStatus, NewEvent, Queued, RecordChange, Store, StoreError, StoreOptions, StoredReply,
    now_ms,
};
use serde_json::json;
use tokio::task::JoinSet;

use crate::util::{Backend, TestStore, postgres};

fn accepted(id: &str, key: Option<&str>) -> Accepted {
    Accepted {
        id: id.into(),
        flow: "f".into(),
        correlation_id: id.into(),
        idempotency_key: key.map(Into::into),
        fingerprint: key.map(|k| format!("fingerprint-of-{k}")),
        received_at: now_ms(),
        inbound: json!({"a": 1}).to_string(),
        meta: json!({"id": id}).to_string(),
        document: json!({"body": {"a": 1}, "vars": {}, "meta": {"id": id}}).to_string(),
        content_type: None,
        status: MessageStatus::Accepted,
        error: None,
        reply: StoredReply {
            status: 202,
            headers: vec![],
            body: json!({"id": id}),
        },
        targets: vec![Queued::pending("lab")],
        correlation: vec![CorrelationWrite::Save {
            context: "req".into(),
            keys: vec![id.into(), format!("ref-{id}")],
            data: json!({"ref": format!("ref-{id}")}),
            state: Some("accepted".into()),
        }],
        events: vec![NewEvent {
            kind: "received",
            detail: json!({}),
        }],
        replay: false,
    }
}

fn delivered(claimed: &Claimed, correlation: Option<CorrelationWrite>) -> AttemptRecord {
    AttemptRecord {
        outbox_id: claimed.outbox_id,
        message_id: claimed.message_id.clone(),
        target: "lab".into(),
        attempt: claimed.attempts + 1,
        outcome: AfterAttempt::Delivered,
        status: Some(201),
        error: None,
        answer: None,
        latency_ms: 3,
        correlation,
        lease_until: claimed.lease_until,
    }
}

async fn with_lease(store: &TestStore, lease: Duration) -> Store {
    let options = StoreOptions {
        lease,
        ..StoreOptions::default()
    };
    Store::open_with(&store.url, options).await.unwrap()
}

on_both_stores!(
    accept_claim_deliver_and_trace,
    a_claim_that_runs_out_is_taken_over_and_the_late_outcome_is_refused,
    claims_take_the_oldest_first_and_entries_given_back_are_due_at_once,
    embedded_queue_messages_are_claimed_retried_and_removed,
    a_replay_delivers_a_dead_letter_again,
    a_webhook_id_is_taken_once,
    a_failing_write_is_undone_alone_and_its_neighbours_commit,
    operators_find_messages_by_any_key_and_see_each_targets_backlog,
    a_record_is_found_by_the_first_of_many_keys_that_names_one,
    a_save_that_names_a_kept_record_changes_it_and_makes_none,
    a_delivery_accepted_claimed_is_sent_without_a_claim_and_due_again_when_given_back,
    what_a_sync_delivery_changes_commits_with_the_record,
    records_stored_before_they_kept_their_keys_keep_them_in_order,
    a_message_whose_deliveries_finish_at_once_is_delivered,
    a_message_reads_delivered_from_its_last_delivery_and_is_kept_a_retention_after_it,
);

/// A delivery taken over as its message commits is stored in flight under the lease it was
/// given: nobody claims it, its outcome is recorded under that lease, and given back it is due
/// at once.
async fn a_delivery_accepted_claimed_is_sent_without_a_claim_and_due_again_when_given_back(
    backend: Backend,
) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    let lease_until = store.lease_until();
    let mut both = accepted("m1", None);
    both.targets = vec![
        Queued::pending("lab"),
        Queued {
            target: "archive".into(),
            claimed_until: Some(lease_until),
        },
    ];
    let Acceptance::Stored(stored) = store.accept(both).await.unwrap() else {
        panic!("a new message is stored");
    };
    let [None, Some(archive)] = stored.claimed[..] else {
        panic!("only the archive's entry is claimed: {:?}", stored.claimed);
    };
    let record = stored.record_id.expect("the message saved a record");
    assert!(stored.queued_at <= now_ms());
    assert!(store.claim("f", "archive", 10).await.unwrap().is_empty());
    assert_eq!(store.claim("f", "lab", 10).await.unwrap().len(), 1);
    assert_eq!(store.undelivered().await.unwrap(), 2);
    let handed = Claimed {
        outbox_id: archive,
        message_id: "m1".into(),
        attempts: 0,
        queued_at: stored.queued_at,
        document: json!({}),
        content_type: None,
        record_id: Some(record),
        lease_until,
    };
    store
        .record_attempt(delivered(&handed, None))
        .await
        .unwrap();
    let detail = store.message("m1").await.unwrap().unwrap();
    let states: Vec<(&str, &str)> = detail
        .deliveries
        .iter()
        .map(|d| (d.target.as_str(), d.state.as_str()))
        .collect();
    assert_eq!(states, [("lab", "in_flight"), ("archive", "delivered")]);
    assert_eq!(detail.correlation.map(|c| c.id), Some(record));

    let mut again = accepted("m2", None);
    again.targets = vec![Queued {
        target: "archive".into(),
        claimed_until: Some(lease_until),
    }];
    let Acceptance::Stored(stored) = store.accept(again).await.unwrap() else {
        panic!("a new message is stored");
    };
    let id = stored.claimed[0].unwrap();
    store.release(vec![(id, lease_until)]).await.unwrap();
    let claimed = store.claim("f", "archive", 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].message_id, "m2");
    assert_eq!(claimed[0].document["body"], json!({"a": 1}));
    store.close().await;
}

/// A message's status and last change are its deliveries': accepted while one is still to be
/// made, wherever it is read (its detail, a search, the overview), then delivered as of the
/// last one, and kept until a retention has passed since then, not since it came in.
async fn a_message_reads_delivered_from_its_last_delivery_and_is_kept_a_retention_after_it(
    backend: Backend,
) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    let mut both = accepted("m1", None);
    both.targets = vec![Queued::pending("lab"), Queued::pending("archive")];
    store.accept(both).await.unwrap();
    let received = store.message("m1").await.unwrap().unwrap().summary;
    let lab = store.claim("f", "lab", 10).await.unwrap();
    let archive = store.claim("f", "archive", 10).await.unwrap();
    let mut first = delivered(&archive[0], None);
    first.target = "archive".into();
    store.record_attempt(first).await.unwrap();

    let stands = |status: &'static str| {
        let store = store.clone();
        async move {
            let detail = store.message("m1").await.unwrap().unwrap().summary;
            assert_eq!(detail.status, status, "detail");
            let found = store
                .find_messages(&MessageFilter {
                    status: Some(status.into()),
                    limit: 10,
                    ..MessageFilter::default()
                })
                .await
                .unwrap();
            assert_eq!(found.len(), 1, "found as {status}");
            assert_eq!(found[0].status, status);
            let trace = store.trace("m1").await.unwrap().unwrap();
            assert_eq!(trace.messages[0].status, status, "trace");
            let counts = store.overview().await.unwrap().flows.remove(0);
            assert_eq!(
                (counts.accepted, counts.delivered),
                match status {
                    "accepted" => (1, 0),
                    _ => (0, 1),
                }
            );
            detail
        }
    };
    stands("accepted").await;
    // Retention counted from before the last delivery: too soon to prune.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let before_last = now_ms();
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .record_attempt(delivered(&lab[0], None))
        .await
        .unwrap();
    let done = stands("delivered").await;
    assert!(
        done.updated_at > received.updated_at,
        "last changed by its delivery: {} after {}",
        done.updated_at,
        received.updated_at
    );
    assert_eq!(store.prune(before_last).await.unwrap(), 0);
    assert_eq!(store.prune(now_ms() + 1).await.unwrap(), 1);
    assert!(store.message("m1").await.unwrap().is_none());
    store.close().await;
}

/// A message is delivered once all its targets have it, however close together their
/// deliveries finish: two replicas recording the last two at the same moment each see the
/// other's, and neither leaves the message merely accepted.
async fn a_message_whose_deliveries_finish_at_once_is_delivered(backend: Backend) {
    let test = TestStore::new(backend).await;
    let stores = [test.open().await, test.open().await];
    const MESSAGES: usize = 40;
    for i in 0..MESSAGES {
        let mut both = accepted(&format!("m{i}"), None);
        both.targets = vec![Queued::pending("lab"), Queued::pending("archive")];
        stores[0].accept(both).await.unwrap();
    }
    let labs = stores[0].claim("f", "lab", 100).await.unwrap();
    let archives = stores[1].claim("f", "archive", 100).await.unwrap();
    assert_eq!((labs.len(), archives.len()), (MESSAGES, MESSAGES));
    let mut finishing = JoinSet::new();
    for (lab, archive) in labs.iter().zip(&archives) {
        assert_eq!(lab.message_id, archive.message_id);
        for (store, entry, target) in [(&stores[0], lab, "lab"), (&stores[1], archive, "archive")] {
            let (store, mut record) = (store.clone(), delivered(entry, None));
            record.target = target.into();
            finishing.spawn(async move { store.record_attempt(record).await });
        }
    }
    while let Some(done) = finishing.join_next().await {
        done.unwrap().unwrap();
    }
    let delivered = stores[0]
        .list_messages(None, Some("delivered"), 1000)
        .await
        .unwrap();
    assert_eq!(
        delivered.len(),
        MESSAGES,
        "every message has both deliveries"
    );
    for store in stores {
        store.close().await;
    }
}

/// A sync delivery's `on_delivered` goes in with the record the steps saved or found: its keys
/// added (not looked up), its data merged over theirs, its state after theirs.
async fn what_a_sync_delivery_changes_commits_with_the_record(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    let delivered = |key: &str, state: &str| RecordChange {
        keys: vec![key.into()],
        data: json!({ "lab_order_id": key, "seen": state }),
        state: Some(state.into()),
    };
    let save = CorrelationWrite::Save {
        context: "req".into(),
        keys: vec!["R-1".into(), "PR-1".into()],
        data: json!({ "portal_ref": "PR-1", "seen": "accepted" }),
        state: Some("accepted".into()),
    };
    // A key another record already has is added to neither and finds nothing new.
    let other = CorrelationWrite::Save {
        context: "req".into(),
        keys: vec!["R-0".into(), "LAB-0".into()],
        data: json!({}),
        state: None,
    };
    store.correlate(vec![other], Vec::new()).await.unwrap();
    store
        .correlate(
            vec![save],
            vec![
                delivered("LAB-1", "delivered"),
                delivered("LAB-0", "copied"),
            ],
        )
        .await
        .unwrap();
    let record = store
        .find_correlation("req", &["LAB-1".into()])
        .await
        .unwrap()
        .expect("found by the key the delivery added");
    assert_eq!(record.key, "R-1");
    assert_eq!(record.keys, ["R-1", "PR-1", "LAB-1"]);
    assert_eq!(
        record.data,
        json!({ "portal_ref": "PR-1", "lab_order_id": "LAB-0", "seen": "copied" })
    );
    let states: Vec<&str> = record.history.iter().map(|h| h.state.as_str()).collect();
    assert_eq!(states, ["accepted", "delivered", "copied"]);
    let first = store
        .find_correlation("req", &["LAB-0".into()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.key, "R-0");

    // After a found record's update, too.
    let update = CorrelationWrite::Update {
        record_id: record.id,
        keys: Vec::new(),
        data: serde_json::Value::Null,
        state: Some("results_received".into()),
    };
    store
        .correlate(
            vec![update],
            vec![delivered("LAB-2", "delivered_to_portal")],
        )
        .await
        .unwrap();
    let record = store
        .find_correlation("req", &["LAB-2".into()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.data["seen"], "delivered_to_portal");
    assert_eq!(
        record.state.as_deref(),
        Some("delivered_to_portal"),
        "{:?}",
        record.history
    );
    assert_eq!(record.history.len(), 5);
    store.close().await;
}

/// A save is tried as a new record first; one of its keys naming a kept record makes it a
/// change of that record (the one its first such key names), and no new record is left.
async fn a_save_that_names_a_kept_record_changes_it_and_makes_none(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    let save = |keys: &[&str], data: serde_json::Value, state: &str| CorrelationWrite::Save {
        context: "req".into(),
        keys: keys.iter().map(|key| (*key).into()).collect(),
        data,
        state: Some(state.into()),
    };
    for (key, name) in [("A-1", "a"), ("B-1", "b")] {
        let first = save(&[key], json!({ "name": name }), "accepted");
        store.correlate(vec![first], Vec::new()).await.unwrap();
    }
    let again = save(&["NEW-1", "B-1", "A-1"], json!({ "again": true }), "again");
    let lab = RecordChange {
        keys: vec!["LAB-9".into()],
        data: json!({ "lab": "LAB-9" }),
        state: Some("delivered".into()),
    };
    store.correlate(vec![again], vec![lab]).await.unwrap();
    let record = store
        .find_correlation("req", &["NEW-1".into()])
        .await
        .unwrap()
        .expect("the new key finds the record changed");
    assert_eq!(record.key, "B-1");
    assert_eq!(record.keys, ["B-1", "NEW-1", "LAB-9"]);
    assert_eq!(
        record.data,
        json!({ "name": "b", "again": true, "lab": "LAB-9" })
    );
    let states: Vec<&str> = record.history.iter().map(|h| h.state.as_str()).collect();
    assert_eq!(states, ["accepted", "again", "delivered"]);
    let other = store
        .find_correlation("req", &["A-1".into()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (other.keys, other.data),
        (vec!["A-1".to_owned()], json!({ "name": "a" }))
    );
    store.close().await;
    let count = "SELECT COUNT(*) FROM correlations";
    let records: i64 = match backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&test.url).await.unwrap();
            sqlx::query_scalar(count).fetch_one(&pool).await.unwrap()
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&test.url).await.unwrap();
            sqlx::query_scalar(count).fetch_one(&pool).await.unwrap()
        }
    };
    assert_eq!(records, 2);
}

/// More keys than SQLite joins in one statement: the lookup takes several, and still finds
/// the record by the first key, in the order given, that names one.
async fn a_record_is_found_by_the_first_of_many_keys_that_names_one(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    for (name, key) in [("early", "K-640"), ("late", "K-700")] {
        store
            .correlate(
                vec![CorrelationWrite::Save {
                    context: "req".into(),
                    keys: vec![key.into()],
                    data: json!({ "name": name }),
                    state: None,
                }],
                Vec::new(),
            )
            .await
            .unwrap();
    }
    let keys: Vec<String> = (0..800).map(|n| format!("K-{n}")).collect();
    let found = store.find_correlation("req", &keys).await.unwrap().unwrap();
    assert_eq!(found.data, json!({"name": "early"}));
    let mut backwards = keys.clone();
    backwards.reverse();
    let found = store
        .find_correlation("req", &backwards)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.data, json!({"name": "late"}));
    assert!(
        store
            .find_correlation("req", &keys[..600])
            .await
            .unwrap()
            .is_none()
    );
    store.close().await;
}

/// A store made before records kept their keys and states in their own rows opens with
/// each record's keys and states as they were, in the order they came, and goes on from
/// there.
async fn records_stored_before_they_kept_their_keys_keep_them_in_order(backend: Backend) {
    let test = TestStore::new(backend).await;
    // The keys in an order of their own (not sorted), the states with and without a message.
    let earlier = "
        INSERT INTO correlations (context, key, data, created_at, updated_at)
            VALUES ('req', 'K-b', '{\"n\": 1}', 1000, 2000);
        INSERT INTO correlation_keys (context, key, correlation_id)
            SELECT 'req', k, (SELECT id FROM correlations) FROM (
                SELECT 'K-b' AS k, 1 AS o UNION ALL SELECT 'K-a', 2 UNION ALL SELECT 'K-c', 3
            ) AS ordered ORDER BY o;
        INSERT INTO correlation_states (correlation_id, state, message_id, at)
            SELECT id, 'accepted', 'm-1', 1000 FROM correlations;
        INSERT INTO correlation_states (correlation_id, state, message_id, at)
            SELECT id, 'sent', NULL, 2000 FROM correlations;";
    match backend {
        Backend::Sqlite => sqlite_as_of(&test.url, 7, earlier).await,
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&test.url).await.unwrap();
            sqlx::migrate!("migrations/postgres")
                .run_to(5, &pool)
                .await
                .unwrap();
            sqlx::raw_sql(earlier).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }
    let store = test.open().await;
    let record = store
        .find_correlation("req", &["K-c".into()])
        .await
        .unwrap()
        .expect("found by a key it had");
    assert_eq!(record.keys, ["K-b", "K-a", "K-c"]);
    assert_eq!(record.data, json!({"n": 1}));
    let history: Vec<(&str, Option<&str>, &str)> = record
        .history
        .iter()
        .map(|h| (h.state.as_str(), h.message_id.as_deref(), h.at.as_str()))
        .collect();
    assert_eq!(
        history,
        [
            ("accepted", Some("m-1"), "1970-01-01T00:00:01.000Z"),
            ("sent", None, "1970-01-01T00:00:02.000Z"),
        ]
    );
    let update = CorrelationWrite::Update {
        record_id: record.id,
        keys: vec!["K-d".into(), "K-a".into()],
        data: json!({"m": 2}),
        state: Some("done".into()),
    };
    store.correlate(vec![update], Vec::new()).await.unwrap();
    let record = store
        .find_correlation("req", &["K-d".into()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.keys, ["K-b", "K-a", "K-c", "K-d"]);
    assert_eq!(record.data, json!({"n": 1, "m": 2}));
    assert_eq!(record.state.as_deref(), Some("done"));
    assert_eq!(record.history.len(), 3);
    store.close().await;
}

async fn a_webhook_id_is_taken_once(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    let until = now_ms() + 60_000;
    assert!(store.first_sight("f", "msg_1", until).await.unwrap());
    assert!(
        !store.first_sight("f", "msg_1", until).await.unwrap(),
        "a replay"
    );
    assert!(
        store.first_sight("g", "msg_1", until).await.unwrap(),
        "another flow's"
    );
    // Expired ids go with pruning; the signature check refuses their replays anyway.
    assert!(
        store
            .first_sight("f", "msg_old", now_ms() - 1)
            .await
            .unwrap()
    );
    store.prune(0).await.unwrap();
    assert!(store.first_sight("f", "msg_old", until).await.unwrap());
    assert!(!store.first_sight("f", "msg_1", until).await.unwrap());
    store.close().await;
}

async fn accept_claim_deliver_and_trace(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    assert!(matches!(
        store.accept(accepted("m1", Some("k1"))).await.unwrap(),
        Acceptance::Stored(_)
    ));
    // The same idempotency key gives the original reply, with what identified the request.
    let again = store.accept(accepted("m2", Some("k1"))).await.unwrap();
    assert!(matches!(&again, Acceptance::Duplicate(p) if p.reply.body == json!({"id": "m1"})));
    let prior = store.reply_for("f", "k1").await.unwrap().unwrap();
    assert_eq!(prior.reply.body, json!({"id": "m1"}));
    assert_eq!(prior.fingerprint.as_deref(), Some("fingerprint-of-k1"));
    assert!(prior.repeated_by(Some("fingerprint-of-k1")));
    assert!(!prior.repeated_by(Some("another")));
    store.writable().await.unwrap();
    assert_eq!(store.undelivered().await.unwrap(), 1);
    assert!(store.oldest_undelivered().await.unwrap().is_some());

    let claimed = store.claim("f", "lab", 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(
        store.claim("f", "lab", 10).await.unwrap().is_empty(),
        "claimed once"
    );
    let record = claimed[0].record_id.unwrap();
    let update = CorrelationWrite::Update {
        record_id: record,
        keys: vec!["LAB-1".into()],
        data: json!({"lab_order_id": "LAB-1"}),
        state: Some("sent".into()),
    };
    store
        .record_attempt(delivered(&claimed[0], Some(update)))
        .await
        .unwrap();

    let found = store
        .find_correlation("req", &["nope".into(), "LAB-1".into()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.key, "m1");
    assert_eq!(found.keys, ["m1", "ref-m1", "LAB-1"]);
    assert_eq!(
        found.data,
        json!({"ref": "ref-m1", "lab_order_id": "LAB-1"})
    );
    assert_eq!(found.state.as_deref(), Some("sent"));
    assert_eq!(found.history.len(), 2);
    let trace = store.trace("ref-m1").await.unwrap().unwrap();
    assert_eq!(trace.messages.len(), 1);
    assert_eq!(trace.messages[0].status, "delivered");
    let mut kinds: Vec<&str> = trace.timeline.iter().map(|e| e.kind.as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["attempt", "received", "state", "state"]);
    let detail = store.message("m1").await.unwrap().unwrap();
    assert_eq!(detail.deliveries[0].state, "delivered");
    assert_eq!(detail.deliveries[0].last_status, Some(201));
    let listed = store
        .list_messages(Some("f"), Some("delivered"), 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        store
            .list_messages(None, Some("dead"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.undelivered().await.unwrap(), 0);
    store.writable().await.unwrap();
    assert_eq!(store.prune(now_ms() + 1).await.unwrap(), 1);
    assert!(store.message("m1").await.unwrap().is_none());
    assert!(store.trace("ref-m1").await.unwrap().is_none());
    // The record went with its keys: one saved under them again is a new one.
    assert!(
        store
            .find_correlation("req", &["LAB-1".into()])
            .await
            .unwrap()
            .is_none()
    );
    store.close().await;
}

async fn a_failing_write_is_undone_alone_and_its_neighbours_commit(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    // Sent at once, these share commits (SQLite commits whatever queued up together).
    let mut writes = JoinSet::new();
    for n in 0..20 {
        let shared = store.clone();
        writes.spawn(async move { shared.accept(accepted(&format!("m{n}"), None)).await });
        if n == 10 {
            // Fails after its message is written: a correlation record needs a key.
            let mut broken = accepted("broken", None);
            broken.correlation = vec![CorrelationWrite::Save {
                context: "req".into(),
                keys: vec![String::new()],
                data: json!({}),
                state: None,
            }];
            let shared = store.clone();
            writes.spawn(async move { shared.accept(broken).await });
        }
    }
    let results = writes.join_all().await;
    assert_eq!(
        results.iter().filter(|r| r.is_err()).count(),
        1,
        "{results:?}"
    );
    assert!(
        store.message("broken").await.unwrap().is_none(),
        "the failing write left nothing behind"
    );
    let claimed = store.claim("f", "lab", 100).await.unwrap();
    assert_eq!(claimed.len(), 20, "every other write committed");
    store.close().await;
}

async fn a_claim_that_runs_out_is_taken_over_and_the_late_outcome_is_refused(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = with_lease(&test, Duration::from_millis(300)).await;
    store.accept(accepted("m1", None)).await.unwrap();
    let first = store.claim("f", "lab", 10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert!(store.claim("f", "lab", 10).await.unwrap().is_empty());

    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = store.claim("f", "lab", 10).await.unwrap();
    assert_eq!(second.len(), 1, "the claim ran out: the entry is due again");
    assert_eq!(second[0].outbox_id, first[0].outbox_id);

    // The first worker's word comes too late: it neither wins nor undoes the second's.
    let late = store.record_attempt(delivered(&first[0], None)).await;
    assert!(matches!(late, Err(StoreError::LeaseLost)), "{late:?}");
    let mut failed = delivered(&second[0], None);
    failed.outcome = AfterAttempt::Dead;
    failed.status = Some(400);
    store.record_attempt(failed).await.unwrap();
    let detail = store.message("m1").await.unwrap().unwrap();
    assert_eq!(detail.summary.status, "dead");
    assert_eq!(detail.deliveries[0].state, "dead");
    store.close().await;
}

async fn claims_take_the_oldest_first_and_entries_given_back_are_due_at_once(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    for id in ["m1", "m2", "m3"] {
        store.accept(accepted(id, None)).await.unwrap();
    }
    let first = store.claim("f", "lab", 2).await.unwrap();
    let ids: Vec<&str> = first.iter().map(|c| c.message_id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2"], "at most the limit, oldest first");
    assert!(first.iter().all(|c| c.document["body"].is_object()));

    // m2 goes back; a give-back under a claim that is not the entry's own changes nothing.
    store
        .release(vec![
            (first[1].outbox_id, first[1].lease_until),
            (first[0].outbox_id, first[0].lease_until - 1),
        ])
        .await
        .unwrap();
    let second = store.claim("f", "lab", 10).await.unwrap();
    let ids: Vec<&str> = second.iter().map(|c| c.message_id.as_str()).collect();
    assert_eq!(ids, ["m2", "m3"], "m2 due again at once, m1 still claimed");
    store.close().await;
}

async fn embedded_queue_messages_are_claimed_retried_and_removed(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    let headers = BTreeMap::from([("ferry-message-id".to_owned(), "m1".to_owned())]);
    store
        .enqueue("q", "{\"n\":1}".into(), headers.clone())
        .await
        .unwrap();
    store
        .enqueue("q", "{\"n\":2}".into(), BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(store.queue_depth("q").await.unwrap(), 2);
    let items = store.claim_queue("q", 10).await.unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].payload, "{\"n\":1}");
    assert_eq!(items[0].headers, headers);
    assert!(store.claim_queue("q", 10).await.unwrap().is_empty());

    store.finish_queue(items[0].id, None).await.unwrap();
    store
        .finish_queue(items[1].id, Some(now_ms() + 200))
        .await
        .unwrap();
    assert_eq!(store.queue_depth("q").await.unwrap(), 1);
    assert!(
        store.claim_queue("q", 10).await.unwrap().is_empty(),
        "not due yet"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let again = store.claim_queue("q", 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1);
    store.finish_queue(again[0].id, None).await.unwrap();
    assert_eq!(store.queue_depth("q").await.unwrap(), 0);
    store.close().await;
}

async fn a_replay_delivers_a_dead_letter_again(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    store.accept(accepted("m1", Some("k1"))).await.unwrap();
    let claimed = store.claim("f", "lab", 1).await.unwrap();
    let mut dead = delivered(&claimed[0], None);
    dead.outcome = AfterAttempt::Dead;
    dead.error = Some("lab answered 422".into());
    store.record_attempt(dead).await.unwrap();
    let dead_letters = store.list_messages(None, Some("dead"), 10).await.unwrap();
    assert_eq!(dead_letters.len(), 1);
    assert_eq!(dead_letters[0].error.as_deref(), Some("lab answered 422"));

    let source = store.replay_source("m1").await.unwrap().unwrap();
    assert_eq!(source.inbound, json!({"a": 1}));
    let mut replay = accepted("m1", Some("k1"));
    replay.replay = true;
    store.accept(replay).await.unwrap();
    let claimed = store.claim("f", "lab", 1).await.unwrap();
    assert_eq!(claimed.len(), 1, "the replay is due");
    store
        .record_attempt(delivered(&claimed[0], None))
        .await
        .unwrap();
    let detail = store.message("m1").await.unwrap().unwrap();
    assert_eq!(detail.summary.status, "delivered");
    let states: Vec<&str> = detail.deliveries.iter().map(|d| d.state.as_str()).collect();
    assert_eq!(states, ["replayed", "delivered"]);
    store.close().await;
}

async fn operators_find_messages_by_any_key_and_see_each_targets_backlog(backend: Backend) {
    let test = TestStore::new(backend).await;
    let store = test.open().await;
    for n in 1..=3 {
        let mut message = accepted(&format!("m{n}"), Some(&format!("k{n}")));
        message.correlation_id = format!("req-{n}");
        store.accept(message).await.unwrap();
    }
    let claimed = store.claim("f", "lab", 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let outcome = |i: usize| {
        let mut attempt = delivered(&claimed[i], None);
        match claimed[i].message_id.as_str() {
            "m1" => attempt.answer = Some("{\"lab_order_id\": \"LAB-1\"}".into()),
            "m2" => {
                attempt.outcome = AfterAttempt::RetryAt(now_ms() + 60_000);
                attempt.status = Some(503);
                attempt.error = Some("answered 503: busy".into());
            }
            _ => {
                attempt.outcome = AfterAttempt::Dead;
                attempt.status = Some(422);
                attempt.error = Some("answered 422: unknown test".into());
            }
        }
        attempt
    };
    for i in 0..3 {
        store.record_attempt(outcome(i)).await.unwrap();
    }

    let overview = store.overview().await.unwrap();
    assert_eq!(overview.flows.len(), 1);
    let counts = &overview.flows[0];
    assert_eq!(
        (
            counts.flow.as_str(),
            counts.accepted,
            counts.delivered,
            counts.dead
        ),
        ("f", 1, 1, 1)
    );
    assert_eq!(overview.targets.len(), 1);
    let lab = &overview.targets[0];
    assert_eq!((lab.open, lab.retrying, lab.dead), (1, 1, 1));
    assert!(lab.oldest_open.is_some());
    assert_eq!(lab.failing.as_deref(), Some("answered 503: busy"));

    let ids = |found: Vec<ferry::store::MessageSummary>| -> Vec<String> {
        found.into_iter().map(|m| m.id).collect()
    };
    let all = MessageFilter {
        limit: 10,
        ..MessageFilter::default()
    };
    let find = |filter: MessageFilter| {
        let store = store.clone();
        async move { ids(store.find_messages(&filter).await.unwrap()) }
    };
    assert_eq!(find(all.clone()).await, ["m3", "m2", "m1"]);
    let dead_to = |target: &str| MessageFilter {
        status: Some("dead".into()),
        dead_target: Some(target.into()),
        ..all.clone()
    };
    assert_eq!(find(dead_to("lab")).await, ["m3"]);
    assert!(find(dead_to("portal")).await.is_empty());
    let later = MessageFilter {
        since: Some(now_ms() + 60_000),
        ..all.clone()
    };
    assert!(find(later).await.is_empty());
    let earlier = MessageFilter {
        until: Some(now_ms() + 60_000),
        status: Some("accepted".into()),
        ..all.clone()
    };
    assert_eq!(find(earlier).await, ["m2"]);

    // A request id or an idempotency key finds its message as its id does.
    for key in ["req-2", "k2", "m2", "ref-m2"] {
        let trace = store.trace(key).await.unwrap().unwrap();
        assert_eq!(ids(trace.messages), ["m2"], "{key}");
    }
    assert!(store.trace("req-9").await.unwrap().is_none());
    let m1 = store.message("m1").await.unwrap().unwrap();
    let attempt = m1.timeline.iter().find(|e| e.kind == "attempt").unwrap();
    assert_eq!(attempt.detail["answer"], "{\"lab_order_id\": \"LAB-1\"}");
    store.close().await;
}

/// Several processes, modelled as several stores on one database.
async fn replicas(test: &TestStore, n: usize) -> Vec<Store> {
    let mut opening = JoinSet::new();
    for _ in 0..n {
        let url = test.url.clone();
        opening.spawn(async move { Store::open(&url).await });
    }
    let mut stores = Vec::new();
    while let Some(opened) = opening.join_next().await {
        stores.push(
            opened
                .unwrap()
                .expect("replicas starting together all migrate"),
        );
    }
    stores
}

/// Saves a record of context `req` under `keys`, as a `correlate` step does: the store is
/// taken by value, so the save can run as a task of its own.
async fn save(
    store: Store,
    keys: Vec<String>,
    data: serde_json::Value,
    state: Option<String>,
) -> Result<(), StoreError> {
    let write = CorrelationWrite::Save {
        context: "req".into(),
        keys,
        data,
        state,
    };
    store.correlate(vec![write], Vec::new()).await
}

#[tokio::test]
async fn postgres_replicas_claim_each_entry_once_between_them() {
    let test = TestStore::new(Backend::Postgres).await;
    let stores = replicas(&test, 4).await;
    for i in 0..300 {
        stores[i % 4]
            .accept(accepted(&format!("m{i}"), None))
            .await
            .unwrap();
    }
    let mut workers = JoinSet::new();
    for store in stores.clone() {
        workers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = store.claim("f", "lab", 7).await.unwrap();
                if claimed.is_empty() {
                    return mine;
                }
                for entry in claimed {
                    store.record_attempt(delivered(&entry, None)).await.unwrap();
                    mine.push(entry.outbox_id);
                }
            }
        });
    }
    let mut all = Vec::new();
    let mut busy = 0;
    while let Some(mine) = workers.join_next().await {
        let mine = mine.unwrap();
        busy += usize::from(!mine.is_empty());
        all.extend(mine);
    }
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 300, "every entry was claimed exactly once");
    assert_eq!(unique.len(), 300);
    assert!(busy >= 2, "the replicas shared the work");
    assert_eq!(stores[0].undelivered().await.unwrap(), 0);
    let delivered = stores[1]
        .list_messages(None, Some("delivered"), 1000)
        .await
        .unwrap();
    assert_eq!(delivered.len(), 300);
}

#[tokio::test]
async fn postgres_replicas_take_each_queue_message_once_between_them() {
    let test = TestStore::new(Backend::Postgres).await;
    let stores = replicas(&test, 3).await;
    for i in 0..200 {
        stores[i % 3]
            .enqueue("q", format!("{{\"n\":{i}}}"), BTreeMap::new())
            .await
            .unwrap();
    }
    let mut consumers = JoinSet::new();
    for store in stores.clone() {
        consumers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let items = store.claim_queue("q", 5).await.unwrap();
                if items.is_empty() {
                    return mine;
                }
                for item in items {
                    store.finish_queue(item.id, None).await.unwrap();
                    mine.push(item.payload);
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(mine) = consumers.join_next().await {
        all.extend(mine.unwrap());
    }
    let unique: BTreeSet<&String> = all.iter().collect();
    assert_eq!(
        (all.len(), unique.len()),
        (200, 200),
        "each message consumed once"
    );
    assert_eq!(stores[0].queue_depth("q").await.unwrap(), 0);
}

#[tokio::test]
async fn postgres_replicas_share_idempotency_and_correlation() {
    let test = TestStore::new(Backend::Postgres).await;
    let stores = replicas(&test, 2).await;
    // The same submission reaching both replicas at once is stored once.
    let mut racing = JoinSet::new();
    for (n, store) in stores.iter().enumerate() {
        let store = store.clone();
        racing.spawn(async move { store.accept(accepted(&format!("m{n}"), Some("k"))).await });
    }
    let mut outcomes = Vec::new();
    while let Some(outcome) = racing.join_next().await {
        outcomes.push(outcome.unwrap().unwrap());
    }
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, Acceptance::Stored(_)))
            .count(),
        1,
        "{outcomes:?}"
    );

    // Saves of one key from both replicas at once make one record with both changes.
    let mut saving = JoinSet::new();
    for (n, store) in stores.iter().enumerate() {
        saving.spawn(save(
            store.clone(),
            vec!["PR-9".into(), format!("LAB-{n}")],
            json!({ format!("from_{n}"): true }),
            Some(format!("seen_by_{n}")),
        ));
    }
    while let Some(saved) = saving.join_next().await {
        saved.unwrap().unwrap();
    }
    let on_0 = stores[0]
        .find_correlation("req", &["LAB-1".into()])
        .await
        .unwrap()
        .unwrap();
    let on_1 = stores[1]
        .find_correlation("req", &["LAB-0".into()])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(on_0, on_1, "one record, found by either replica's key");
    assert_eq!(on_0.data, json!({"from_0": true, "from_1": true}));
    assert_eq!(on_0.history.len(), 2);
}

/// Saves naming the same keys in other orders, from two replicas at once, take the keys in
/// one order: each pair makes one record, and none is refused for a deadlock.
#[tokio::test]
async fn postgres_replicas_saving_overlapping_keys_at_once_make_one_record_each() {
    let test = TestStore::new(Backend::Postgres).await;
    let stores = replicas(&test, 2).await;
    const PAIRS: usize = 40;
    let mut saving = JoinSet::new();
    for pair in 0..PAIRS {
        let keys = [
            format!("A-{pair}"),
            format!("B-{pair}"),
            format!("C-{pair}"),
        ];
        for (n, store) in stores.iter().enumerate() {
            let mut keys = keys.to_vec();
            if n == 1 {
                keys.reverse();
            }
            let data = json!({ format!("from_{n}"): true });
            saving.spawn(save(store.clone(), keys, data, None));
        }
    }
    while let Some(saved) = saving.join_next().await {
        saved.unwrap().unwrap();
    }
    for pair in 0..PAIRS {
        let by_first = stores[0]
            .find_correlation("req", &[format!("A-{pair}")])
            .await
            .unwrap()
            .unwrap();
        let by_last = stores[1]
            .find_correlation("req", &[format!("C-{pair}")])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(by_first.id, by_last.id, "pair {pair}: one record");
        assert_eq!(by_first.data, json!({"from_0": true, "from_1": true}));
    }
}

/// A save takes the keys it looks up before its record goes in: while another transaction
/// holds one (a save of that key by another replica, not yet committed), it waits.
#[tokio::test]
async fn postgres_a_save_waits_while_another_holds_its_key() {
    let test = TestStore::new(Backend::Postgres).await;
    let store = test.open().await;
    let key = format!("held-{}", std::process::id());
    let pool = sqlx::PgPool::connect(&test.url).await.unwrap();
    let mut other = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 0))")
        .bind("req")
        .bind(&key)
        .execute(&mut *other)
        .await
        .unwrap();
    let keys = vec!["free".into(), key.clone()];
    let saving = tokio::spawn(save(store.clone(), keys, json!({}), None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!saving.is_finished(), "the save waits for the key");
    other.commit().await.unwrap();
    saving.await.unwrap().unwrap();
    assert!(
        store
            .find_correlation("req", &[key])
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn postgres_prunes_on_one_replica_at_a_time() {
    let test = TestStore::new(Backend::Postgres).await;
    let store = test.open().await;
    store.accept(accepted("m1", None)).await.unwrap();
    let claimed = store.claim("f", "lab", 1).await.unwrap();
    store
        .record_attempt(delivered(&claimed[0], None))
        .await
        .unwrap();

    // Another replica pruning: hold its lock in a transaction of our own.
    let mut other = <sqlx::PgConnection as sqlx::Connection>::connect(&postgres())
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN; SELECT pg_advisory_xact_lock(1717924466, 1)")
        .execute(&mut other)
        .await
        .unwrap();
    assert_eq!(
        store.prune(now_ms() + 1).await.unwrap(),
        0,
        "skipped its turn"
    );
    sqlx::raw_sql("COMMIT").execute(&mut other).await.unwrap();
    assert_eq!(store.prune(now_ms() + 1).await.unwrap(), 1);
}

/// A SQLite store made while deliveries and timeline entries took AUTOINCREMENT ids keeps
/// them, ids included, still removed with their message; new ones take the ids after them,
/// with no sequence kept for them any more.
#[tokio::test]
async fn sqlite_deliveries_and_timelines_from_before_rowids_keep_their_ids_and_order() {
    let test = TestStore::new(Backend::Sqlite).await;
    let earlier = r#"
        INSERT INTO messages (id, flow, correlation_id, status, inbound, meta, document, reply,
                              received_at, updated_at)
            VALUES ('old', 'f', 'old', 'accepted', '{"a":1}', '{"id":"old"}',
                    '{"body":{"a":1},"vars":{},"meta":{"id":"old"}}', '{}', 1000, 1000);
        INSERT INTO outbox (id, message_id, flow, target, state, attempts, next_attempt_at,
                            created_at, updated_at)
            VALUES (40, 'old', 'f', 'lab', 'pending', 0, 1000, 1000, 1000);
        INSERT INTO events (id, message_id, at, kind, detail)
            VALUES (70, 'old', 1000, 'received', '{"n":1}'), (71, 'old', 1001, 'note', '{"n":2}');"#;
    sqlite_as_of(&test.url, 9, earlier).await;

    let store = test.open().await;
    let claimed = store.claim("f", "lab", 10).await.unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.outbox_id).collect::<Vec<_>>(),
        [40]
    );
    store
        .record_attempt(delivered(&claimed[0], None))
        .await
        .unwrap();
    let acceptance = store.accept(accepted("new", None)).await.unwrap();
    assert!(
        matches!(acceptance, Acceptance::Stored(_)),
        "{acceptance:?}"
    );
    let old = store.message("old").await.unwrap().unwrap();
    assert_eq!(old.summary.status, "delivered");
    assert_eq!(
        old.timeline
            .iter()
            .map(|e| e.kind.as_str())
            .collect::<Vec<_>>(),
        ["received", "note", "attempt"]
    );
    let new = store.claim("f", "lab", 10).await.unwrap();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].outbox_id, 41);
    store.close().await;

    let pool = sqlx::SqlitePool::connect(&test.url).await.unwrap();
    let (sequences, autoincrement): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM sqlite_sequence WHERE name IN ('outbox', 'events')),
                (SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('outbox', 'events')
                                                    AND sql LIKE '%AUTOINCREMENT%')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((sequences, autoincrement), (0, 0));
    let (newest_event,): (i64,) = sqlx::query_as("SELECT MAX(id) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        newest_event > 71,
        "new entries come after the old: {newest_event}"
    );
    // Removing a message still removes its deliveries and timeline.
    sqlx::raw_sql("PRAGMA foreign_keys = ON; DELETE FROM messages WHERE id = 'old';")
        .execute(&pool)
        .await
        .unwrap();
    let (left,): (i64,) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM outbox WHERE message_id = 'old')
              + (SELECT COUNT(*) FROM events WHERE message_id = 'old')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    pool.close().await;
}

/// Makes the SQLite store at `url` as migration `version` left it, holding what `sql` writes.
async fn sqlite_as_of(url: &str, version: i64, sql: &'static str) {
    let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url)
        .unwrap()
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::migrate!("migrations/sqlite")
        .run_to(version, &pool)
        .await
        .unwrap();
    sqlx::raw_sql(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

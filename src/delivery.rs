//! Durable delivery: workers that drain the outbox, one per flow and target.
//!
//! Each worker claims due entries, sends them with at most `concurrency` in flight, and
//! records the outcome: delivered, retried later with capped exponential backoff and full
//! jitter (or the target's `Retry-After`), or dead. A slow or dead target only ever holds its
//! own worker, never another target's. A message accepted while its worker keeps up reaches
//! it without a claim, through its [`Handoff`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::flow::Flow;
use crate::handoff::Handoff;
use crate::message::Message;
use crate::retry::RetryAction;
use crate::store::{AfterAttempt, AttemptRecord, Claimed, Millis, Store, now_ms};
use crate::targets::Attempt;

/// The longest a worker waits before claiming again after the store failed.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(30);
/// How often an idle worker looks for due entries when nothing wakes it.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// How many entries a worker claims at a time, as a multiple of its concurrency: claims come
/// in batches ahead of need, not one per finished attempt.
const CLAIM_AHEAD: usize = 2;
/// The most entries a worker claims at a time. Each claim waits for a commit, so while claims
/// come back full (a backlog) they grow, doubling up to this, and delivery is not held to a
/// few entries per commit.
const MAX_CLAIM: usize = 128;
/// Attempts answered whose outcome is not committed yet, at most, per worker.
const MAX_UNRECORDED: usize = 1024;
/// The running delivery workers.
#[derive(Debug)]
pub struct Delivery {
    stop: CancellationToken,
    workers: tokio::sync::Mutex<JoinSet<()>>,
}

impl Delivery {
    /// Starts a worker for every target of every durable flow of `engine`, which must have a
    /// store. Each waits on the engine's wake-up signal for its target.
    pub fn start(engine: &Arc<Engine>) -> Self {
        let store = engine.store().expect("durable delivery needs a store");
        let stop = CancellationToken::new();
        let mut workers = JoinSet::new();
        for flow in engine.flows().iter().filter(|f| f.is_durable()) {
            for (index, target) in flow.targets().iter().enumerate() {
                if let Some(timeout) = target.timeout()
                    && timeout >= store.lease()
                {
                    // An attempt may outlast its claim; another worker would then send it too.
                    tracing::warn!(
                        flow = %flow.name, target = %target.name(), ?timeout, lease = ?store.lease(),
                        "the target's timeout is not shorter than the lease: raise --lease above it"
                    );
                }
                let worker = Worker {
                    store: store.clone(),
                    engine: Arc::clone(engine),
                    flow: Arc::clone(flow),
                    target: index,
                    handoff: engine
                        .handoff(&flow.name, index)
                        .cloned()
                        .unwrap_or_default(),
                    stop: stop.clone(),
                };
                workers.spawn(worker.run());
            }
        }
        Self {
            stop,
            workers: tokio::sync::Mutex::new(workers),
        }
    }

    /// Stops claiming, and waits up to `grace` for attempts in flight. Entries left in flight
    /// are due again at the next start.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        let mut workers = self.workers.lock().await;
        let drained = tokio::time::timeout(grace, async {
            while workers.join_next().await.is_some() {}
        });
        if drained.await.is_err() {
            tracing::warn!(
                "delivery did not finish within {grace:?}; the rest resumes at next start"
            );
            workers.abort_all();
        }
    }
}

struct Worker {
    store: Store,
    engine: Arc<Engine>,
    flow: Arc<Flow>,
    target: usize,
    handoff: Arc<Handoff>,
    stop: CancellationToken,
}

impl Worker {
    /// Claims due entries ahead, in batches, and sends them with at most `concurrency` in
    /// flight. A sending slot is free again as soon as the target has answered: the outcome
    /// is committed meanwhile, in the store's next batch, so one slot's deliveries never wait
    /// for a commit between them.
    async fn run(self) {
        let target = self.flow.targets()[self.target].name().to_owned();
        let concurrency = self.flow.concurrency() as usize;
        let sending = Arc::new(Semaphore::new(concurrency));
        let unrecorded = Arc::new(Semaphore::new(MAX_UNRECORDED));
        // What an entry's claim must still have left when it is sent: the attempt's longest,
        // or half the lease where the attempt may outlast it anyway (warned about at start).
        let lease = i64::try_from(self.store.lease().as_millis()).unwrap_or(i64::MAX);
        let margin = self.flow.targets()[self.target]
            .timeout()
            .map_or(0, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX))
            .min(lease / 2);
        let mut ready: VecDeque<Claimed> = VecDeque::new();
        let mut attempts = JoinSet::new();
        let this = Arc::new(self);
        let mut backoff = Duration::from_millis(500);
        // Whether the store had nothing more due at the last claim, and until when to wait.
        let mut drained: Option<Instant> = None;
        let mut slot = None;
        let least = CLAIM_AHEAD * concurrency;
        let mut ahead = least;
        this.handoff.open();
        loop {
            while let Some(outcome) = attempts.try_join_next() {
                retry_at(&mut drained, outcome);
            }
            if this.stop.is_cancelled() {
                break;
            }
            if ready.len() < least {
                ready.extend(this.handoff.take(least - ready.len()));
            }
            if drained.is_none() && ready.len() < concurrency {
                let wanted = ahead - ready.len();
                match this
                    .store
                    .claim(&this.flow.name, &target, wanted as u32)
                    .await
                {
                    Ok(claimed) => {
                        backoff = Duration::from_millis(500);
                        if claimed.len() < wanted {
                            // Nothing more due: what is accepted from now on can be handed over.
                            this.handoff.caught_up();
                            drained = Some(this.idle_until(&target).await);
                            ahead = least;
                        } else {
                            ahead = (ahead * 2).min(MAX_CLAIM.max(least));
                        }
                        ready.extend(claimed);
                    }
                    Err(error) => {
                        // The store is away (a database restarting, say): try again, less and less often.
                        tracing::warn!(flow = %this.flow.name, %target, %error, ?backoff, "claiming deliveries failed");
                        tokio::select! {
                            () = this.stop.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_STORE_BACKOFF);
                        continue;
                    }
                }
            }
            let mut expired = Vec::new();
            while !ready.is_empty() {
                let Some(send) = slot
                    .take()
                    .or_else(|| Arc::clone(&sending).try_acquire_owned().ok())
                else {
                    break;
                };
                let Ok(recording) = Arc::clone(&unrecorded).try_acquire_owned() else {
                    slot = Some(send);
                    break;
                };
                let entry = ready.pop_front().expect("not empty");
                if entry.lease_until - now_ms() <= margin {
                    // Held too long to finish within its claim: back to the store, for a new one.
                    expired.push((entry.outbox_id, entry.lease_until));
                    slot = Some(send);
                    continue;
                }
                let worker = Arc::clone(&this);
                attempts.spawn(async move {
                    let (message, record) = attempt(
                        &worker.engine,
                        &worker.flow,
                        worker.target,
                        entry,
                        Some(send),
                    )
                    .await;
                    // Only the record waits for the commit, not the message.
                    drop(message);
                    let outcome = record_outcome(&worker.store, &worker.flow, record).await;
                    drop(recording);
                    outcome
                });
            }
            this.give_back(expired).await;
            if drained.is_none() && ready.len() < concurrency {
                continue;
            }
            let idle = drained.unwrap_or_else(|| Instant::now() + IDLE_POLL);
            tokio::select! {
                () = this.stop.cancelled() => break,
                () = this.handoff.due() => drained = None,
                () = this.handoff.handed() => {}
                () = tokio::time::sleep_until(idle.into()) => drained = None,
                permit = Arc::clone(&sending).acquire_owned(), if !ready.is_empty() && slot.is_none() => {
                    slot = permit.ok();
                }
                Some(outcome) = attempts.join_next(), if !attempts.is_empty() => {
                    retry_at(&mut drained, outcome);
                }
            }
        }
        // Entries claimed or handed over but not sent are due again at once, for whichever
        // worker comes next.
        ready.extend(this.handoff.close());
        let unsent = ready.iter().map(|e| (e.outbox_id, e.lease_until)).collect();
        this.give_back(unsent).await;
        // Let attempts in flight finish; `Delivery::shutdown` bounds how long.
        while attempts.join_next().await.is_some() {}
    }

    /// When a worker that found nothing more due claims again unless woken: when the next
    /// pending entry is due, and at least every [`IDLE_POLL`].
    async fn idle_until(&self, target: &str) -> Instant {
        let wait = match self.store.next_due(&self.flow.name, target).await {
            Ok(Some(due)) => {
                Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0)).min(IDLE_POLL)
            }
            _ => IDLE_POLL,
        };
        Instant::now() + wait
    }

    async fn give_back(&self, entries: Vec<(i64, Millis)>) {
        if let Err(error) = self.store.release(entries).await {
            // Their claims run out instead: later, not lost.
            tracing::warn!(flow = %self.flow.name, %error, "giving back claimed deliveries failed");
        }
    }
}

/// Brings an idle worker's next claim forward to when a retry it just scheduled is due.
fn retry_at(drained: &mut Option<Instant>, outcome: Result<AfterAttempt, tokio::task::JoinError>) {
    if let (Some(idle), Ok(AfterAttempt::RetryAt(at))) = (drained.as_mut(), outcome) {
        let due = Instant::now() + Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0));
        *idle = (*idle).min(due);
    }
}

/// Delivers message `id` of `flow` now, as a worker would, and returns it as its attempt
/// left it (with what the target's answer captured): for `ferry test` and `ferry run`, which
/// run no workers. Other due entries it claims on the way stay claimed until their lease
/// runs out, so a case delivers its own message and no other.
pub async fn deliver_now(engine: &Engine, flow: &Flow, id: &str) -> Option<Message> {
    let store = engine.store()?;
    let mut delivered = None;
    for (index, target) in flow.targets().iter().enumerate() {
        let Ok(claimed) = store.claim(&flow.name, target.name(), 1000).await else {
            continue;
        };
        for entry in claimed.into_iter().filter(|e| e.message_id == id) {
            let (message, record) = attempt(engine, flow, index, entry, None).await;
            record_outcome(store, flow, record).await;
            delivered = Some(message);
        }
    }
    delivered
}

/// One attempt of a claimed entry to target number `target` of `flow`, and its outcome:
/// delivered, retried later, or dead. `sending` is the worker's slot, given back when the
/// target has answered. Returns the message as the attempt left it, and the record for
/// [`record_outcome`].
async fn attempt(
    engine: &Engine,
    flow: &Flow,
    target: usize,
    entry: Claimed,
    sending: Option<OwnedSemaphorePermit>,
) -> (Message, AttemptRecord) {
    let meters = &flow.meters.targets[target];
    let target = &flow.targets()[target];
    let number = entry.attempts + 1;
    let mut message = Message::from_document(entry.document, entry.content_type);
    let started = Instant::now();
    let labels = || {
        [
            ("flow", flow.name.clone()),
            ("target", target.name().to_owned()),
        ]
    };
    let in_flight = meters
        .in_flight
        .get(|| metrics::gauge!("ferry_deliveries_in_flight", &labels()));
    in_flight.increment(1.0);
    let Attempt {
        action,
        status,
        error,
        retry_after,
        answer,
    } = {
        #[cfg(feature = "otlp")]
        let span = crate::observe::otlp::span(
            "ferry.delivery",
            &flow.name,
            message.root()["meta"]["headers"]["traceparent"].as_str(),
        );
        let attempt = engine.attempt(flow, target, &mut message);
        #[cfg(feature = "otlp")]
        let attempt = tracing::Instrument::instrument(attempt, span);
        attempt.await
    };
    in_flight.decrement(1.0);
    drop(sending);
    if action == RetryAction::Done {
        crate::fault::pass(crate::fault::Point::AfterTargetAnswer);
    }
    meters
        .duration
        .get(|| metrics::histogram!("ferry_delivery_attempt_duration_seconds", &labels()))
        .record(started.elapsed().as_secs_f64());
    let outcome = match action {
        RetryAction::Done => AfterAttempt::Delivered,
        RetryAction::Retry => engine
            .retry_policy(flow, target)
            .next_attempt(number, entry.queued_at, now_ms(), retry_after)
            .map_or(AfterAttempt::Dead, AfterAttempt::RetryAt),
        RetryAction::Drop => AfterAttempt::Dead,
    };
    let correlation = match (outcome, entry.record_id) {
        (AfterAttempt::Delivered | AfterAttempt::Dead, Some(record)) => flow
            .after_delivery(target, outcome == AfterAttempt::Delivered, &message)
            .map(|change| change.to(record)),
        _ => None,
    };
    let latency_ms = started.elapsed().as_millis() as u64;
    let (counted, counter) = match outcome {
        AfterAttempt::Delivered => ("delivered", &meters.delivered),
        AfterAttempt::RetryAt(_) => ("retried", &meters.retried),
        AfterAttempt::Dead => ("dead_lettered", &meters.dead_lettered),
    };
    counter
        .get(|| {
            let [flow, target] = labels();
            let labels = [flow, target, ("outcome", counted.to_owned())];
            metrics::counter!("ferry_deliveries_total", &labels)
        })
        .increment(1);
    let correlation_id = message.root()["meta"]["correlation_id"]
        .as_str()
        .unwrap_or_default();
    let error_text = error.as_deref().unwrap_or_default();
    match outcome {
        AfterAttempt::Delivered => tracing::debug!(
            flow = %flow.name, target = %target.name(), message_id = %entry.message_id, correlation_id,
            attempt = number, ?status, "delivered"
        ),
        // Each failed attempt is one line an operator sees without raising the log level.
        AfterAttempt::RetryAt(at) => tracing::info!(
            flow = %flow.name, target = %target.name(), message_id = %entry.message_id, correlation_id,
            attempt = number, status, error = error_text, next_attempt = %crate::store::rfc3339(at),
            "delivery attempt failed; retrying"
        ),
        AfterAttempt::Dead => tracing::warn!(
            flow = %flow.name, target = %target.name(), message_id = %entry.message_id, correlation_id,
            attempt = number, status, error = error_text, "delivery failed for good: dead letter"
        ),
    }
    let record = AttemptRecord {
        outbox_id: entry.outbox_id,
        message_id: entry.message_id.clone(),
        target: target.name().to_owned(),
        attempt: number,
        outcome,
        status,
        error,
        answer,
        latency_ms,
        correlation,
        lease_until: entry.lease_until,
    };
    (message, record)
}

/// Commits an attempt's record; returns where the delivery stands.
async fn record_outcome(store: &Store, flow: &Flow, record: AttemptRecord) -> AfterAttempt {
    let (outcome, target, message_id) = (
        record.outcome,
        record.target.clone(),
        record.message_id.clone(),
    );
    match store.record_attempt(record).await {
        Ok(()) => {}
        Err(crate::store::StoreError::LeaseLost) => tracing::warn!(
            flow = %flow.name, %target, %message_id,
            "this attempt outlasted its claim and another worker took the delivery over: its outcome counts"
        ),
        // The lease runs out and the entry is attempted again: at least once, never lost.
        Err(error) => {
            tracing::error!(flow = %flow.name, %error, "recording a delivery attempt failed");
        }
    }
    outcome
}

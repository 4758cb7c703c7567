//! The message path: what happens to one message, however it came in — an HTTP request, a
//! queue, a flow call, `ferry test`, `ferry run`, a replay. [`Engine::handle`] runs its steps,
//! checks the request its target would get, then commits it for durable delivery (or
//! delivers it synchronously), and answers the reply; [`Engine::attempt`] makes one delivery
//! attempt to any target. `serve` and the test tools differ only in what stands behind the
//! targets ([`Transport`]) and which store the engine has.
//!
//! The engine drives nothing by itself: the delivery workers and queue consumers that call
//! it are started and stopped by their owner, [`crate::runtime::Runtime`]. It hands the
//! messages it accepts to the delivery workers, or tells them new deliveries are due in the
//! store, through their [`Handoff`]s ([`Engine::handoff`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::error::{FlowError, ServeError};
use crate::flow::{Flow, Processed};
use crate::handoff::{Handoff, Reservation};
use crate::json;
use crate::message::{Message, Meta};
use crate::queue::Brokers;
use crate::retry::RetryAction;
use crate::store::{
    Acceptance, Accepted, Claimed, CorrelationWrite, MessageStatus, NewEvent, Prior, Queued, Store,
    Stored, StoredReply, now_ms,
};
use crate::targets::{Attempt, Calls, FlowTarget, Mocks, Reach, Target};

/// What stands behind the targets.
#[derive(Debug, Clone)]
pub enum Transport {
    /// The network: HTTP through this client, queues through the brokers.
    Network(reqwest::Client),
    /// Mocks (`ferry test`, `ferry run`): every target renders and records what it would
    /// send, and answers as the mocks say.
    Mocks(Arc<Mocks>),
}

/// Sees a message as the engine handles it (`ferry test`, `ferry run`): after each step, and
/// once the steps are done with what they decided.
pub trait Observe: Send {
    /// After the step labelled `label`.
    fn step(&mut self, _label: &str, _message: &Message) {}
    /// After the steps and the check of the target's request, with the correlation changes
    /// they make; and again after a synchronous delivery (with none).
    fn processed(&mut self, _message: &Message, _correlation: &[CorrelationWrite]) {}
}

/// The flows and what they run on.
#[derive(Debug)]
pub struct Engine {
    flows: Vec<Arc<Flow>>,
    transport: Transport,
    brokers: Brokers,
    store: Option<Store>,
    /// Every durable flow's ways to its targets' delivery workers, in the order of its targets.
    handoffs: HashMap<String, Vec<Arc<Handoff>>>,
    draining: AtomicBool,
}

impl Engine {
    /// An engine for `flows` with targets behind `transport`. Without a store every flow
    /// delivers synchronously.
    pub fn new(flows: Vec<Arc<Flow>>, transport: Transport, store: Option<Store>) -> Self {
        let handoffs = flows
            .iter()
            .filter(|f| f.is_durable())
            .map(|f| {
                let handoffs = f.targets().iter().map(|_| Arc::default()).collect();
                (f.name.clone(), handoffs)
            })
            .collect();
        Self {
            flows,
            transport,
            brokers: Brokers::default(),
            store,
            handoffs,
            draining: AtomicBool::new(false),
        }
    }

    /// The flows.
    pub fn flows(&self) -> &[Arc<Flow>] {
        &self.flows
    }

    /// The flow named `name`.
    pub fn flow(&self, name: &str) -> Option<&Arc<Flow>> {
        self.flows.iter().find(|f| f.name == name)
    }

    /// The store, when there is one.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// The store that keeps `flow`'s messages: none for a sync flow, or without a store
    /// (where every flow delivers synchronously).
    fn keeping(&self, flow: &Flow) -> Option<&Store> {
        self.store.as_ref().filter(|_| flow.is_durable())
    }

    /// The broker connections.
    pub fn brokers(&self) -> &Brokers {
        &self.brokers
    }

    /// The way to the delivery worker of target number `target` of durable flow `flow`.
    pub fn handoff(&self, flow: &str, target: usize) -> Option<&Arc<Handoff>> {
        self.handoffs.get(flow)?.get(target)
    }

    /// Marks the engine as stopping, so readiness answers 503 while requests drain.
    pub fn mark_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether it is stopping: it finishes what it holds and takes nothing new.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Handles one message of `flow` and returns the reply for the caller.
    ///
    /// # Errors
    ///
    /// A [`ServeError`] when a step refuses the message, a synchronous target fails, or the
    /// store cannot commit it (then nothing was accepted).
    pub async fn handle(&self, flow: &Flow, message: Message) -> Result<StoredReply, ServeError> {
        self.handle_observed(flow, message, None).await
    }

    /// [`Engine::handle`], shown to `observe` on the way.
    ///
    /// # Errors
    ///
    /// As [`Engine::handle`].
    pub async fn handle_observed(
        &self,
        flow: &Flow,
        mut message: Message,
        observe: Option<&mut (dyn Observe + 'static)>,
    ) -> Result<StoredReply, ServeError> {
        let Some(store) = self.keeping(flow) else {
            return self.handle_sync(flow, &mut message, observe).await;
        };
        // Written out once, before the steps change the message: for the store, and for the
        // fingerprint.
        let inbound = json::text(message.body());
        let key = flow.idempotency_key(&message);
        let fingerprint = key.as_ref().map(|_| message.fingerprint(&inbound));
        let source = Arrival {
            inbound,
            meta: json::text(&message.root()["meta"]),
            key,
            fingerprint,
            received_at: now_ms(),
            replay: None,
        };
        let steps = self.process(flow, &mut message, observe).await;
        // A resubmission gets the first submission's reply. A new key, the usual case, costs
        // no read for that: the commit finds a key already taken (`Acceptance::Duplicate`).
        // Only a refusal asks first, as a resubmission of an accepted message is never refused.
        if steps.is_err()
            && let Some(key) = &source.key
            && let Some(prior) = store.reply_for(&flow.name, key).await?
        {
            return repeat(prior, key, source.fingerprint.as_deref());
        }
        self.commit(flow, store, message, steps, source).await
    }

    /// Runs the steps and checks the request the chosen target would get.
    async fn process(
        &self,
        flow: &Flow,
        message: &mut Message,
        observe: Option<&mut (dyn Observe + 'static)>,
    ) -> Result<Processed, FlowError> {
        let processed = match observe {
            Some(observe) => {
                let processed = flow
                    .run_steps_watched(message, self.store.as_ref(), &mut |label, m| {
                        observe.step(label, m);
                    })
                    .await?;
                flow.check_request(&processed.targets, message)?;
                observe.processed(message, &processed.correlation);
                processed
            }
            None => {
                let processed = flow.run_steps(message, self.store.as_ref()).await?;
                flow.check_request(&processed.targets, message)?;
                processed
            }
        };
        Ok(processed)
    }

    /// Runs a sync flow on `message`: its steps, then each target, then its correlation
    /// changes, and renders the reply. `message` is left as the targets saw it.
    async fn handle_sync(
        &self,
        flow: &Flow,
        message: &mut Message,
        mut observe: Option<&mut (dyn Observe + 'static)>,
    ) -> Result<StoredReply, ServeError> {
        let processed = self.process(flow, message, observe.as_deref_mut()).await?;
        // Each target in turn; the first that fails fails the message.
        let mut called = None;
        let mut delivered = Vec::new();
        for &index in &processed.targets {
            let target = &flow.targets()[index];
            match self.real_call(target) {
                // A called flow's refusal is the caller's, status and all.
                Some(call) => {
                    let callee = self.called(&call.flow)?;
                    let reply = self.hand_over(callee, call.name(), message).await?;
                    message.merge_vars(&reply.body);
                    called = Some(reply);
                    // A flow that keeps the message has only kept it: its partner has it
                    // later, and the record says so then (the called flow's `on_delivered`).
                    if self.keeping(callee).is_some() {
                        continue;
                    }
                }
                None => {
                    let attempt = self.attempt(flow, target, message).await;
                    if attempt.action != RetryAction::Done {
                        return Err(FlowError::Target {
                            target: target.name().to_owned(),
                            status: attempt.status,
                            reason: attempt.error.unwrap_or_default(),
                            retry_after: attempt.retry_after,
                        }
                        .into());
                    }
                    // A mocked flow call answers as the mock says, like the flow it stands for.
                    if let (Target::Flow(_), Transport::Mocks(mocks)) = (target, &self.transport) {
                        let answer = mocks.answer_of(&mocks.name_of(&flow.name, target.name()));
                        called = Some(StoredReply {
                            status: answer.status,
                            headers: Vec::new(),
                            body: answer.body,
                        });
                    }
                }
            }
            delivered.extend(flow.after_delivery(target, true, message));
        }
        if let Some(observe) = observe {
            observe.processed(message, &[]);
        }
        if let (Some(store), false) = (&self.store, processed.correlation.is_empty()) {
            store.correlate(processed.correlation, delivered).await?;
        }
        match called {
            Some(reply) if !flow.declares_reply() => Ok(reply),
            _ => Ok(flow.render_reply(message)?.into()),
        }
    }

    /// Hands `caller` over to `callee` (target `target` of a synchronous flow): the called
    /// flow handles it as a message of its own ([`Meta::for_call`]), and a durable one keeps
    /// it and answers that it did.
    async fn hand_over(
        &self,
        callee: &Flow,
        target: &str,
        caller: &Message,
    ) -> Result<StoredReply, ServeError> {
        let meta = Meta::for_call(&callee.name, caller, target);
        let message = Message::new(caller.body().clone(), meta);
        Box::pin(self.handle(callee, message)).await
    }

    /// Delivers `caller` through the flow named `name` as target `target` of a durable
    /// flow's delivery: the called flow's steps, then one attempt to each target they
    /// choose, as part of the caller's attempt. The called flow keeps nothing of its own, so
    /// the caller's delivery is done only when the called flow's target has the message;
    /// what that target answered (status, `Retry-After`, retry or not) is the caller's
    /// attempt. On success the called flow's reply fields become `caller`'s vars.
    async fn deliver_through(&self, name: &str, target: &str, caller: &mut Message) -> Attempt {
        let refused = |error: &ServeError| {
            let status = error.status().as_u16();
            Attempt::failed(
                crate::retry::classify_status(status),
                Some(status),
                format!("flow \"{name}\": {error}"),
            )
        };
        let callee = match self.called(name) {
            Ok(callee) => callee,
            Err(error) => return refused(&error),
        };
        let meta = Meta::for_call(&callee.name, caller, target);
        let mut message = Message::new(caller.body().clone(), meta);
        let processed = match self.process(callee, &mut message, None).await {
            Ok(processed) => processed,
            Err(error) => return refused(&error.into()),
        };
        let mut last = Attempt::done(None);
        let mut delivered = Vec::new();
        for &index in &processed.targets {
            let target = &callee.targets()[index];
            last = Box::pin(self.attempt(callee, target, &mut message)).await;
            if last.action != RetryAction::Done {
                let error = last.error.take().unwrap_or_default();
                last.error = Some(format!(
                    "flow \"{name}\", target \"{}\": {error}",
                    target.name()
                ));
                return last;
            }
            delivered.extend(callee.after_delivery(target, true, &message));
        }
        if let (Some(store), false) = (&self.store, processed.correlation.is_empty())
            && let Err(error) = store.correlate(processed.correlation, delivered).await
        {
            return refused(&error.into());
        }
        match callee.render_reply(&message) {
            Ok(reply) => caller.merge_vars(&reply.body),
            Err(error) => return refused(&error.into()),
        }
        last
    }

    /// The flow a `flow` target names.
    fn called(&self, name: &str) -> Result<&Arc<Flow>, ServeError> {
        self.flow(name)
            .ok_or_else(|| ServeError::Internal(format!("flow \"{name}\" is not loaded")))
    }

    /// `target`, when it is a flow target whose flow runs for real: always on the network;
    /// with mocks, when the test says so.
    fn real_call<'t>(&self, target: &'t Target) -> Option<&'t FlowTarget> {
        let Target::Flow(call) = target else {
            return None;
        };
        match &self.transport {
            Transport::Network(_) => Some(call),
            Transport::Mocks(mocks) => mocks.runs(&call.flow).then_some(call),
        }
    }

    /// How deliveries of `flow` to `target` are retried: by the called flow's own policy for
    /// a `flow` target whose flow sets one (it knows its partner), else by `flow`'s.
    pub fn retry_policy(&self, flow: &Flow, target: &Target) -> crate::retry::RetryPolicy {
        match target {
            Target::Flow(call) => self
                .flow(&call.flow)
                .filter(|callee| callee.declares_retry())
                .map_or_else(|| flow.retry(), |callee| callee.retry()),
            _ => flow.retry(),
        }
    }

    /// Makes one delivery attempt of `message` to `target` of `flow`; on success, what the
    /// target answers is captured into `message`'s vars.
    pub async fn attempt(&self, flow: &Flow, target: &Target, message: &mut Message) -> Attempt {
        match &self.transport {
            Transport::Mocks(mocks) => match self.real_call(target) {
                Some(call) => call.attempt(message, self).await,
                None => mocks.attempt(&flow.name, target, message, flow.templates()),
            },
            Transport::Network(client) => {
                let reach = Reach {
                    client,
                    brokers: &self.brokers,
                    store: self.store.as_ref(),
                    calls: self,
                    retried_for: flow.retry().span(),
                };
                target.attempt(message, flow.templates(), &reach).await
            }
        }
    }

    /// Commits a durable flow's message, or a dead letter when it could not be correlated.
    async fn commit(
        &self,
        flow: &Flow,
        store: &Store,
        message: Message,
        steps: Result<Processed, FlowError>,
        source: Arrival,
    ) -> Result<StoredReply, ServeError> {
        let mut events = vec![match &source.replay {
            Some(audit) => replayed(flow, audit),
            None => NewEvent {
                kind: "received",
                detail: json!({"flow": flow.name, "idempotency_key": source.key}),
            },
        }];
        let processed = match steps {
            Ok(processed) => processed,
            Err(error @ FlowError::NotCorrelated { .. }) => {
                // Valid, but it answers nothing known: keep it as a dead letter to replay once
                // what it answers exists. Without its idempotency key, so a resend is new.
                let reason = error.to_string();
                let refusal = ServeError::Flow(error);
                events.push(dead(&reason));
                let accepted = Accepted {
                    status: MessageStatus::Dead,
                    error: Some(reason),
                    reply: refusal_reply(&refusal),
                    events,
                    idempotency_key: None,
                    ..source.into_accepted(flow, &message)
                };
                store.accept(accepted).await?;
                return Err(refusal);
            }
            Err(error) => return Err(error.into()),
        };
        let reply: StoredReply = flow.render_reply(&message)?.into();
        // The steps it went through and the targets it is queued for ride on its arrival's
        // entry: one row to write, which reads as one entry each (`store::arrival_entries`).
        let steps: Vec<&str> = flow.step_labels().collect();
        let queued: Vec<&str> = (processed.targets.iter())
            .map(|&index| flow.targets()[index].name())
            .collect();
        if let Value::Object(arrival) = &mut events[0].detail {
            if !steps.is_empty() {
                arrival.insert("steps".into(), json!(steps));
            }
            if !queued.is_empty() {
                arrival.insert("queued".into(), json!(queued));
            }
        }
        let status = if processed.targets.is_empty() {
            MessageStatus::Delivered
        } else {
            MessageStatus::Accepted
        };
        // A new message goes straight to the workers that keep up; a replay waits its turn.
        let deliveries: Vec<Delivery> = (processed.targets.iter())
            .map(|&index| {
                let handoff = self.handoff(&flow.name, index).cloned();
                let reserved = match (&source.replay, &handoff) {
                    (None, Some(handoff)) => handoff.reserve(),
                    _ => None,
                };
                (handoff, reserved)
            })
            .collect();
        let claimed_until = store.lease_until();
        let targets = (processed.targets.iter())
            .zip(&deliveries)
            .map(|(&index, (_, reserved))| Queued {
                target: flow.targets()[index].name().to_owned(),
                claimed_until: reserved.as_ref().map(|_| claimed_until),
            })
            .collect();
        let (key, fingerprint) = (source.key.clone(), source.fingerprint.clone());
        let accepted = Accepted {
            status,
            reply: reply.clone(),
            targets,
            correlation: processed.correlation,
            events,
            ..source.into_accepted(flow, &message)
        };
        // The commit and the hand-over are a task of their own: a caller that gives up
        // meanwhile (its timeout, a dropped connection) does not stop a commit that lands all
        // the same from reaching the workers, which would leave its deliveries claimed by nobody.
        let (store, name) = (store.clone(), flow.name.clone());
        let committed = tokio::spawn(async move {
            let acceptance = store.accept(accepted).await?;
            if let Acceptance::Stored(stored) = &acceptance {
                hand_over(&store, &name, deliveries, stored, claimed_until, message).await;
            }
            Ok::<_, ServeError>(acceptance)
        });
        let acceptance = committed
            .await
            .map_err(|e| ServeError::Internal(format!("committing the message failed: {e}")))??;
        match acceptance {
            Acceptance::Stored(_) => Ok(reply),
            // Another submission with the same key committed first.
            Acceptance::Duplicate(prior) => repeat(
                prior,
                key.as_deref().unwrap_or_default(),
                fingerprint.as_deref(),
            ),
        }
    }

    /// Keeps a message that `flow` could not handle among the dead letters, so an operator
    /// sees it and can replay it.
    pub async fn dead_letter(&self, flow: &Flow, inbound: Value, meta: &Meta, error: String) {
        let error = crate::redact::error_text(&error);
        tracing::warn!(flow = %flow.name, message_id = %meta.id, %error, "dead letter");
        let Some(store) = &self.store else {
            tracing::error!(flow = %flow.name, "no store to keep the dead letter in");
            return;
        };
        let meta_value = Value::from(meta.clone());
        let source = Arrival {
            inbound: json::text(&inbound),
            meta: json::text(&meta_value),
            key: None,
            fingerprint: None,
            received_at: now_ms(),
            replay: None,
        };
        let message = Message::from_parts(inbound, meta_value);
        let accepted = Accepted {
            status: MessageStatus::Dead,
            error: Some(error.clone()),
            events: vec![
                NewEvent {
                    kind: "received",
                    detail: json!({"flow": flow.name}),
                },
                dead(&error),
            ],
            ..source.into_accepted(flow, &message)
        };
        if let Err(error) = store.accept(accepted).await {
            tracing::error!(flow = %flow.name, %error, "keeping a dead letter failed");
        }
    }

    /// Runs stored message `id` through its flow again, as the flow is now, keeping its id
    /// so receivers see the same idempotency key. Returns `None` for an unknown id.
    ///
    /// # Errors
    ///
    /// A [`ServeError`] when there is no store, the flow is gone, or the flow refuses it.
    pub async fn replay(
        &self,
        id: &str,
        audit: &ReplayAudit,
    ) -> Result<Option<StoredReply>, ServeError> {
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| ServeError::Internal("replay needs a store".into()))?;
        let Some(source) = store.replay_source(id).await? else {
            return Ok(None);
        };
        let flow = self.flow(&source.flow).ok_or_else(|| {
            ServeError::Internal(format!("flow \"{}\" is no longer loaded", source.flow))
        })?;
        let mut message = Message::from_parts(source.inbound, source.meta);
        if !flow.is_durable() {
            return self
                .replay_sync(flow, store, message, audit)
                .await
                .map(Some);
        }
        let steps = self.process(flow, &mut message, None).await;
        self.commit(flow, store, message, steps, Arrival::replay(audit))
            .await
            .map(Some)
    }

    /// Replays a sync flow's dead letter (a queue message it gave up on, say): the flow runs
    /// on it as on any message, then the stored message says what came of it, delivered or
    /// still dead, with the replay in its timeline.
    async fn replay_sync(
        &self,
        flow: &Flow,
        store: &Store,
        mut message: Message,
        audit: &ReplayAudit,
    ) -> Result<StoredReply, ServeError> {
        let outcome = self.handle_sync(flow, &mut message, None).await;
        let mut events = vec![replayed(flow, audit)];
        let (status, error, reply) = match &outcome {
            Ok(reply) => (MessageStatus::Delivered, None, reply.clone()),
            Err(refusal) => {
                let error = refusal.to_string();
                events.push(dead(&error));
                (MessageStatus::Dead, Some(error), refusal_reply(refusal))
            }
        };
        store
            .accept(Accepted {
                status,
                error,
                reply,
                events,
                ..Arrival::replay(audit).into_accepted(flow, &message)
            })
            .await?;
        outcome
    }
}

impl Calls for Engine {
    fn call<'a>(
        &'a self,
        flow: &'a str,
        target: &'a str,
        caller: &'a mut Message,
    ) -> crate::targets::CallAttempt<'a> {
        Box::pin(self.deliver_through(flow, target, caller))
    }
}

/// A delivery of a message being committed: its target's way to the delivery worker, and the
/// room reserved there when the worker takes the message over.
type Delivery = (Option<Arc<Handoff>>, Option<Reservation>);

/// Hands `message` of flow `flow`, just committed as `stored`, to the delivery worker of each
/// of `deliveries` that has room reserved for it, and wakes the others' workers to claim it
/// from the store.
async fn hand_over(
    store: &Store,
    flow: &str,
    deliveries: Vec<Delivery>,
    stored: &Stored,
    claimed_until: i64,
    message: Message,
) {
    let mut handed = Vec::new();
    for ((handoff, reserved), outbox_id) in deliveries.into_iter().zip(&stored.claimed) {
        match (reserved, outbox_id) {
            (Some(reserved), Some(id)) => handed.push((reserved, *id)),
            _ => {
                if let Some(handoff) = handoff {
                    handoff.wake();
                }
            }
        }
    }
    let Some(last) = handed.len().checked_sub(1) else {
        return;
    };
    let message_id = message.id().to_owned();
    let (mut document, content_type) = message.into_document();
    let mut released = Vec::new();
    for (n, (reserved, outbox_id)) in handed.into_iter().enumerate() {
        let entry = Claimed {
            outbox_id,
            message_id: message_id.clone(),
            attempts: 0,
            queued_at: stored.queued_at,
            // Each target its own copy; the last takes the message's.
            document: if n == last {
                std::mem::take(&mut document)
            } else {
                document.clone()
            },
            content_type: content_type.clone(),
            record_id: stored.record_id,
            lease_until: claimed_until,
        };
        if !reserved.hand_over(entry) {
            // The worker stopped meanwhile: due again at once, for whichever comes next.
            released.push((outbox_id, claimed_until));
        }
    }
    if let Err(error) = store.release(released).await {
        // Their claims run out instead: later, not lost.
        tracing::warn!(%flow, %error, "giving back deliveries failed");
    }
}

/// Who asked for a replay, and why: recorded in the replayed message's timeline.
#[derive(Debug, Clone)]
pub struct ReplayAudit {
    /// The name of the admin token that asked.
    pub by: String,
    /// The reason the operator gave.
    pub reason: String,
}

/// The reply kept with a message `refusal` refused.
fn refusal_reply(refusal: &ServeError) -> StoredReply {
    StoredReply {
        status: refusal.status().as_u16(),
        headers: Vec::new(),
        body: refusal.body(),
    }
}

/// The timeline entry of a message that became a dead letter, and why.
fn dead(error: &str) -> NewEvent {
    NewEvent {
        kind: "dead",
        detail: json!({ "error": error }),
    }
}

/// The timeline entry of a replay of a message of `flow`: who asked, and why.
fn replayed(flow: &Flow, audit: &ReplayAudit) -> NewEvent {
    NewEvent {
        kind: "replayed",
        detail: json!({"flow": flow.name, "by": audit.by, "reason": audit.reason}),
    }
}

/// A message as it arrived, for the store.
struct Arrival {
    /// The body as received, as JSON text.
    inbound: String,
    /// `meta` as received, as JSON text.
    meta: String,
    key: Option<String>,
    fingerprint: Option<String>,
    received_at: i64,
    /// Who replayed it and why, for a replay.
    replay: Option<ReplayAudit>,
}

impl Arrival {
    /// A replay, by `audit`: it keeps the message's first arrival, so only what the flow
    /// makes of it is written.
    fn replay(audit: &ReplayAudit) -> Self {
        Self {
            inbound: String::new(),
            meta: String::new(),
            key: None,
            fingerprint: None,
            received_at: now_ms(),
            replay: Some(audit.clone()),
        }
    }

    fn into_accepted(self, flow: &Flow, message: &Message) -> Accepted {
        let meta = &message.root()["meta"];
        Accepted {
            id: meta["id"].as_str().unwrap_or_default().to_owned(),
            flow: flow.name.clone(),
            correlation_id: meta["correlation_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            idempotency_key: self.key,
            fingerprint: self.fingerprint,
            received_at: self.received_at,
            inbound: self.inbound,
            meta: self.meta,
            document: json::text(message.root()),
            content_type: message.content_type().map(str::to_owned),
            status: MessageStatus::Accepted,
            error: None,
            reply: StoredReply {
                status: 200,
                headers: Vec::new(),
                body: Value::Null,
            },
            targets: Vec::new(),
            correlation: Vec::new(),
            events: Vec::new(),
            replay: self.replay.is_some(),
        }
    }
}

/// The answer to a submission under an idempotency key already taken: the first reply when
/// it repeats the first request, a conflict when it is another request.
fn repeat(prior: Prior, key: &str, fingerprint: Option<&str>) -> Result<StoredReply, ServeError> {
    if prior.repeated_by(fingerprint) {
        Ok(prior.reply)
    } else {
        Err(ServeError::IdempotencyConflict(key.to_owned()))
    }
}

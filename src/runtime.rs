//! What happens to one message: the steps, then a synchronous delivery or a durable commit,
//! then the reply. One delivery attempt to any kind of target. Replay runs a stored message
//! through its flow again.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};

use crate::project::Project;
use crate::delivery::Delivery;
use crate::error::{FlowError, ServeError};
use crate::flow::{Flow, Processed, RenderedReply};
use crate::message::{Message, Meta};
use crate::queue::consume::Consumers;
use crate::queue::{Brokers, CORRELATION_ID, IDEMPOTENCY_KEY, MESSAGE_ID};
use crate::store::{
    AcceptOutcome, Accepted, MessageStatus, NewEvent, Prior, Store, StoredReply, now_ms,
};
use crate::targets::{Attempt, RetryAction, Target, classify_status};

/// The flows with what they run on: the HTTP client, the store, brokers, the delivery
/// workers and the queue consumers.
#[derive(Debug)]
pub struct Runtime {
    flows: Vec<Arc<Flow>>,
    client: reqwest::Client,
    store: Option<Store>,
    brokers: Brokers,
    delivery: OnceLock<Delivery>,
    consumers: OnceLock<Consumers>,
    draining: std::sync::atomic::AtomicBool,
}

impl Runtime {
    /// Starts a runtime for `project`. With a store, durable flows get delivery workers and
    /// queue-triggered flows get consumers; without one, every flow delivers synchronously.
    pub fn start(project: &Project, client: reqwest::Client, store: Option<Store>) -> Arc<Self> {
        let runtime = Arc::new(Self {
            flows: project.flows.clone(),
            client,
            store,
            brokers: Brokers::default(),
            delivery: OnceLock::new(),
            consumers: OnceLock::new(),
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        if runtime.store.is_some() {
            let _ = runtime.delivery.set(Delivery::start(&runtime));
        }
        let _ = runtime.consumers.set(Consumers::start(&runtime));
        runtime
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

    /// Marks the runtime as stopping, so readiness answers 503 while requests drain.
    pub fn mark_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the runtime is stopping: it finishes what it holds and takes nothing new.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The broker connections.
    pub fn brokers(&self) -> &Brokers {
        &self.brokers
    }

    /// Handles one message of `flow` and returns the reply for the caller.
    ///
    /// # Errors
    ///
    /// A [`ServeError`] when a step refuses the message, a synchronous target fails, or the
    /// store cannot commit it (then nothing was accepted).
    pub async fn handle(
        &self,
        flow: &Flow,
        mut message: Message,
    ) -> Result<StoredReply, ServeError> {
        let store = match &self.store {
            Some(store) if flow.is_durable() => store,
            _ => return self.handle_sync(flow, message).await,
        };
        let key = flow.idempotency_key(&message);
        let fingerprint = key.as_ref().map(|_| message.fingerprint());
        if let Some(key) = &key
            && let Some(prior) = store.reply_for(&flow.name, key).await?
        {
            return repeat(prior, key, fingerprint.as_deref());
        }
        let inbound = message.body().clone();
        let meta = message.root()["meta"].clone();
        let received_at = now_ms();
        let steps = flow
            .run_steps(&mut message, Some(store))
            .await
            .and_then(|p| flow.check_request(p.target, &message).map(|()| p));
        let source = Source {
            inbound,
            meta,
            key,
            fingerprint,
            received_at,
            replay: false,
        };
        self.commit(flow, store, message, steps, source).await
    }

    async fn handle_sync(
        &self,
        flow: &Flow,
        mut message: Message,
    ) -> Result<StoredReply, ServeError> {
        let processed = flow.run_steps(&mut message, self.store.as_ref()).await?;
        flow.check_request(processed.target, &message)?;
        let mut called = None;
        if let Some(target) = processed.target.map(|i| &flow.targets()[i]) {
            if let Target::Flow(call) = target {
                // A called flow's refusal is the caller's, status and all.
                let reply = self.call(&call.flow, &message).await?;
                message.merge_vars(&reply.body);
                called = Some(reply);
            } else {
                let attempt = self.attempt(flow, target, &mut message).await;
                if attempt.action != RetryAction::Done {
                    return Err(FlowError::Target {
                        target: target.name().to_owned(),
                        status: attempt.status,
                        reason: attempt.error.unwrap_or_default(),
                    }
                    .into());
                }
            }
        }
        if let (Some(store), false) = (&self.store, processed.correlation.is_empty()) {
            store.correlate(processed.correlation).await?;
        }
        match called {
            Some(reply) if !flow.declares_reply() => Ok(reply),
            _ => Ok(stored(flow.render_reply(&message)?)),
        }
    }

    /// Runs `message` through the flow named `name`, as a new message of the same
    /// conversation: same correlation id, and an idempotency key derived from the caller's
    /// id so a retried call is recognised.
    async fn call(&self, name: &str, caller: &Message) -> Result<StoredReply, ServeError> {
        let callee = self
            .flow(name)
            .ok_or_else(|| ServeError::Internal(format!("flow \"{name}\" is not loaded")))?;
        let mut meta = Meta::new(&callee.name);
        meta.method = "CALL".into();
        meta.path = caller.root()["meta"]["flow"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(id) = caller.root()["meta"]["correlation_id"].as_str() {
            meta.correlation_id = id.to_owned();
        }
        meta.headers
            .insert("idempotency-key".into(), format!("{}:{name}", caller.id()));
        let message = Message::new(caller.body().clone(), &meta);
        Box::pin(self.handle(callee, message)).await
    }

    /// Makes one delivery attempt of `message` to `target`; on success, what the target
    /// answers is captured into `message`'s vars.
    pub async fn attempt(&self, flow: &Flow, target: &Target, message: &mut Message) -> Attempt {
        match target {
            Target::Http(http) => http.attempt(message, flow.templates(), &self.client).await,
            Target::Queue(queue) => {
                let payload = match message.content_type() {
                    None => message.body().to_string().into_bytes(),
                    Some(_) => message
                        .body()
                        .as_str()
                        .unwrap_or_default()
                        .as_bytes()
                        .to_vec(),
                };
                let mut headers = BTreeMap::from([
                    (MESSAGE_ID.to_owned(), message.id().to_owned()),
                    (
                        CORRELATION_ID.to_owned(),
                        message.root()["meta"]["correlation_id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ),
                    (
                        IDEMPOTENCY_KEY.to_owned(),
                        format!("{}:{}", message.id(), target.name()),
                    ),
                ]);
                if let Some(traceparent) = crate::message::child_traceparent(message) {
                    headers.insert("traceparent".to_owned(), traceparent);
                }
                match self
                    .brokers
                    .publish(
                        self.store.as_ref(),
                        &queue.spec,
                        payload,
                        headers,
                        flow.retry().span(),
                    )
                    .await
                {
                    Ok(()) => Attempt::done(None),
                    Err(error) => Attempt::failed(RetryAction::Retry, None, error.to_string()),
                }
            }
            Target::Flow(call) => match self.call(&call.flow, message).await {
                Ok(reply) if (200..300).contains(&reply.status) => {
                    message.merge_vars(&reply.body);
                    Attempt::done(Some(reply.status))
                }
                Ok(reply) => {
                    let action = classify_status(reply.status);
                    Attempt::failed(
                        action,
                        Some(reply.status),
                        format!(
                            "flow \"{}\" answered {}: {}",
                            call.flow, reply.status, reply.body
                        ),
                    )
                }
                Err(error) => {
                    let status = error.status().as_u16();
                    Attempt::failed(
                        classify_status(status),
                        Some(status),
                        format!("flow \"{}\": {error}", call.flow),
                    )
                }
            },
        }
    }

    /// Commits a durable flow's message, or a dead letter when it could not be correlated.
    async fn commit(
        &self,
        flow: &Flow,
        store: &Store,
        message: Message,
        steps: Result<Processed, FlowError>,
        source: Source,
    ) -> Result<StoredReply, ServeError> {
        let mut events = vec![NewEvent {
            kind: if source.replay {
                "replayed"
            } else {
                "received"
            },
            detail: json!({"flow": flow.name, "idempotency_key": source.key}),
        }];
        let processed = match steps {
            Ok(processed) => processed,
            Err(error @ FlowError::NotCorrelated { .. }) => {
                // Valid, but it answers nothing known: keep it as a dead letter to replay once
                // what it answers exists. Without its idempotency key, so a resend is new.
                let reason = error.to_string();
                let refusal = ServeError::Flow(error);
                events.push(NewEvent {
                    kind: "dead",
                    detail: json!({"error": reason}),
                });
                let accepted = Accepted {
                    status: MessageStatus::Dead,
                    error: Some(reason),
                    reply: StoredReply {
                        status: refusal.status().as_u16(),
                        headers: Vec::new(),
                        body: refusal.body(),
                    },
                    events,
                    idempotency_key: None,
                    ..source.into_accepted(flow, &message)
                };
                store.accept(accepted).await?;
                return Err(refusal);
            }
            Err(error) => return Err(error.into()),
        };
        let reply = stored(flow.render_reply(&message)?);
        events.extend(flow.step_labels().map(|label| NewEvent {
            kind: "step",
            detail: json!({"step": label}),
        }));
        let targets: Vec<String> = processed
            .target
            .map(|i| flow.targets()[i].name().to_owned())
            .into_iter()
            .collect();
        for target in &targets {
            events.push(NewEvent {
                kind: "queued",
                detail: json!({"target": target}),
            });
        }
        let status = if targets.is_empty() {
            MessageStatus::Delivered
        } else {
            MessageStatus::Accepted
        };
        let (key, fingerprint) = (source.key.clone(), source.fingerprint.clone());
        let accepted = Accepted {
            status,
            reply: reply.clone(),
            targets: targets.clone(),
            correlation: processed.correlation,
            events,
            ..source.into_accepted(flow, &message)
        };
        match store.accept(accepted).await? {
            AcceptOutcome::Stored => {
                if let Some(delivery) = self.delivery.get() {
                    for target in &targets {
                        delivery.wake(&flow.name, target);
                    }
                }
                Ok(reply)
            }
            // Another submission with the same key committed first.
            AcceptOutcome::Duplicate(prior) => repeat(
                prior,
                key.as_deref().unwrap_or_default(),
                fingerprint.as_deref(),
            ),
        }
    }

    /// Keeps a message that `flow` could not handle among the dead letters, so an operator
    /// sees it and can replay it.
    pub async fn dead_letter(&self, flow: &Flow, inbound: Value, meta: &Meta, error: String) {
        tracing::warn!(flow = %flow.name, message_id = %meta.id, %error, "dead letter");
        let Some(store) = &self.store else {
            tracing::error!(flow = %flow.name, "no store to keep the dead letter in");
            return;
        };
        let meta_value = serde_json::to_value(meta).unwrap_or(Value::Null);
        let message = Message::from_parts(inbound.clone(), meta_value.clone());
        let source = Source {
            inbound,
            meta: meta_value,
            key: None,
            fingerprint: None,
            received_at: now_ms(),
            replay: false,
        };
        let accepted = Accepted {
            status: MessageStatus::Dead,
            error: Some(error.clone()),
            events: vec![
                NewEvent {
                    kind: "received",
                    detail: json!({"flow": flow.name}),
                },
                NewEvent {
                    kind: "dead",
                    detail: json!({"error": error}),
                },
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
    pub async fn replay(&self, id: &str) -> Result<Option<StoredReply>, ServeError> {
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
        if !flow.is_durable() {
            return Err(ServeError::Internal(format!(
                "flow \"{}\" does not deliver durably",
                flow.name
            )));
        }
        let mut message = Message::from_parts(source.inbound.clone(), source.meta.clone());
        let steps = flow.run_steps(&mut message, Some(store)).await;
        let source = Source {
            inbound: source.inbound,
            meta: source.meta,
            key: None,
            fingerprint: None,
            received_at: now_ms(),
            replay: true,
        };
        self.commit(flow, store, message, steps, source)
            .await
            .map(Some)
    }

    /// Stops consumers and delivery, waiting up to `grace` for the work they hold. The store
    /// stays open: another runtime may go on with it (a reload).
    pub async fn stop(&self, grace: Duration) {
        self.mark_draining();
        if let Some(consumers) = self.consumers.get() {
            consumers.shutdown(grace).await;
        }
        if let Some(delivery) = self.delivery.get() {
            delivery.shutdown(grace).await;
        }
    }

    /// [`Runtime::stop`], then closes the store.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop(grace).await;
        if let Some(store) = &self.store {
            store.close().await;
        }
    }
}

/// A message as it came in, for the store.
struct Source {
    inbound: Value,
    meta: Value,
    key: Option<String>,
    fingerprint: Option<String>,
    received_at: i64,
    replay: bool,
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

impl Source {
    fn into_accepted(self, flow: &Flow, message: &Message) -> Accepted {
        let meta = &self.meta;
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
            document: message.root().clone(),
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
            replay: self.replay,
        }
    }
}

fn stored(reply: RenderedReply) -> StoredReply {
    StoredReply {
        status: reply.status.as_u16(),
        headers: reply
            .headers
            .into_iter()
            .map(|(name, value)| (name.to_string(), value))
            .collect(),
        body: reply.body,
    }
}

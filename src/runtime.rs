//! What happens to one message: the steps, then a synchronous delivery or a durable commit,
//! then the reply. Replay runs a stored message through its flow again.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::compile::Project;
use crate::delivery::Delivery;
use crate::error::{FlowError, ServeError};
use crate::flow::{Flow, RenderedReply};
use crate::message::Message;
use crate::store::{AcceptOutcome, Accepted, MessageStatus, NewEvent, Store, StoredReply, now_ms};

/// The flows with what they run on: the HTTP client, the store and the delivery workers.
#[derive(Debug)]
pub struct Runtime {
    flows: Vec<Arc<Flow>>,
    client: reqwest::Client,
    store: Option<Store>,
    delivery: Option<Delivery>,
}

impl Runtime {
    /// A runtime for `project`. With a store, durable flows get delivery workers; without
    /// one, every flow delivers synchronously.
    pub fn new(project: &Project, client: reqwest::Client, store: Option<Store>) -> Self {
        let delivery = store
            .as_ref()
            .map(|store| Delivery::start(store, &project.flows, &client));
        Self {
            flows: project.flows.clone(),
            client,
            store,
            delivery,
        }
    }

    /// The flows.
    pub fn flows(&self) -> &[Arc<Flow>] {
        &self.flows
    }

    /// The store, when there is one.
    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
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
        if let Some(key) = &key {
            let stored = store.reply_for(&flow.name, key).await?;
            if let Some(reply) = stored {
                return Ok(reply);
            }
        }
        let inbound = message.body().clone();
        let meta = message.root()["meta"].clone();
        let received_at = now_ms();
        let steps = flow.run_steps(&mut message, Some(store)).await;
        self.commit(
            flow,
            store,
            message,
            steps,
            Source {
                inbound,
                meta,
                key,
                received_at,
                replay: false,
            },
        )
        .await
    }

    async fn handle_sync(
        &self,
        flow: &Flow,
        mut message: Message,
    ) -> Result<StoredReply, ServeError> {
        let processed = flow.run_steps(&mut message, self.store.as_ref()).await?;
        if let Some(index) = processed.target {
            flow.deliver_sync(&flow.targets()[index], &mut message, &self.client)
                .await?;
        }
        if let (Some(store), false) = (&self.store, processed.correlation.is_empty()) {
            store.correlate(processed.correlation).await?;
        }
        Ok(stored(flow.render_reply(&message)?))
    }

    /// Commits a durable flow's message, or a dead letter when it could not be correlated.
    async fn commit(
        &self,
        flow: &Flow,
        store: &Store,
        message: Message,
        steps: Result<crate::flow::Processed, FlowError>,
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
                    targets: Vec::new(),
                    correlation: Vec::new(),
                    events,
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
        let accepted = Accepted {
            status,
            error: None,
            reply: reply.clone(),
            targets: targets.clone(),
            correlation: processed.correlation,
            events,
            ..source.into_accepted(flow, &message)
        };
        match store.accept(accepted).await? {
            AcceptOutcome::Stored => {
                if let Some(delivery) = &self.delivery {
                    for target in &targets {
                        delivery.wake(&flow.name, target);
                    }
                }
                Ok(reply)
            }
            AcceptOutcome::Duplicate(original) => Ok(original),
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
        let flow = self
            .flows
            .iter()
            .find(|f| f.name == source.flow)
            .ok_or_else(|| {
                ServeError::Internal(format!("flow \"{}\" is no longer loaded", source.flow))
            })?;
        if !flow.is_durable() {
            return Err(ServeError::Internal(format!(
                "flow \"{}\" no longer delivers durably",
                flow.name
            )));
        }
        let mut message = Message::from_parts(source.inbound.clone(), source.meta.clone());
        let steps = flow.run_steps(&mut message, Some(store)).await;
        let source = Source {
            inbound: source.inbound,
            meta: source.meta,
            key: None,
            received_at: now_ms(),
            replay: true,
        };
        self.commit(flow, store, message, steps, source)
            .await
            .map(Some)
    }

    /// Stops delivery (waiting up to `grace` for attempts in flight) and closes the store.
    pub async fn shutdown(&self, grace: Duration) {
        if let Some(delivery) = &self.delivery {
            delivery.shutdown(grace).await;
        }
        if let Some(store) = &self.store {
            store.close().await;
        }
    }
}

/// A message as it came in, for the store.
struct Source {
    inbound: serde_json::Value,
    meta: serde_json::Value,
    key: Option<String>,
    received_at: i64,
    replay: bool,
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
                body: serde_json::Value::Null,
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

//! The running flows: the [`Engine`] that handles messages, the delivery workers that drain
//! its outbox, and the queue consumers that feed it. The runtime starts them together and
//! stops them together; the workers and consumers are handed the engine, and never reach
//! back into their owner.

use std::sync::Arc;
use std::time::Duration;

use crate::consume::Consumers;
use crate::delivery::Delivery;
use crate::engine::{Engine, Transport};
use crate::error::ServeError;
use crate::flow::Flow;
use crate::message::Message;
use crate::project::Project;
use crate::queue::Brokers;
use crate::store::{Store, StoredReply};

/// The flows with what they run on, and the workers that drive them.
#[derive(Debug)]
pub struct Runtime {
    engine: Arc<Engine>,
    delivery: Option<Delivery>,
    consumers: Consumers,
}

impl Runtime {
    /// Starts a runtime for `project` whose targets are reached over the network with
    /// `client`; see [`Runtime::start_with`].
    pub fn start(project: &Project, client: reqwest::Client, store: Option<Store>) -> Arc<Self> {
        Self::start_with(project, Transport::Network(client), store)
    }

    /// Starts a runtime for `project` with targets behind `transport`. With a store, durable
    /// flows get delivery workers and queue-triggered flows get consumers; without one, every
    /// flow delivers synchronously.
    pub fn start_with(project: &Project, transport: Transport, store: Option<Store>) -> Arc<Self> {
        let engine = Arc::new(Engine::new(project.flows.clone(), transport, store));
        let delivery = engine.store().is_some().then(|| Delivery::start(&engine));
        let consumers = Consumers::start(&engine);
        Arc::new(Self {
            engine,
            delivery,
            consumers,
        })
    }

    /// The engine every message goes through.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The flows.
    pub fn flows(&self) -> &[Arc<Flow>] {
        self.engine.flows()
    }

    /// The flow named `name`.
    pub fn flow(&self, name: &str) -> Option<&Arc<Flow>> {
        self.engine.flow(name)
    }

    /// The store, when there is one.
    pub fn store(&self) -> Option<&Store> {
        self.engine.store()
    }

    /// The broker connections.
    pub fn brokers(&self) -> &Brokers {
        self.engine.brokers()
    }

    /// Marks the runtime as stopping, so readiness answers 503 while requests drain.
    pub fn mark_draining(&self) {
        self.engine.mark_draining();
    }

    /// Whether the runtime is stopping.
    pub fn is_draining(&self) -> bool {
        self.engine.is_draining()
    }

    /// Handles one message of `flow` ([`Engine::handle`]).
    ///
    /// # Errors
    ///
    /// As [`Engine::handle`].
    pub async fn handle(&self, flow: &Flow, message: Message) -> Result<StoredReply, ServeError> {
        self.engine.handle(flow, message).await
    }

    /// Replays stored message `id` ([`Engine::replay`]).
    ///
    /// # Errors
    ///
    /// As [`Engine::replay`].
    pub async fn replay(
        &self,
        id: &str,
        audit: &crate::engine::ReplayAudit,
    ) -> Result<Option<StoredReply>, ServeError> {
        self.engine.replay(id, audit).await
    }

    /// Stops consumers and delivery, waiting up to `grace` for the work they hold. The store
    /// stays open: another runtime may go on with it (a reload).
    pub async fn stop(&self, grace: Duration) {
        self.engine.mark_draining();
        self.consumers.shutdown(grace).await;
        if let Some(delivery) = &self.delivery {
            delivery.shutdown(grace).await;
        }
    }

    /// [`Runtime::stop`], then closes the store.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop(grace).await;
        if let Some(store) = self.engine.store() {
            store.close().await;
        }
    }
}

//! The `mllp` trigger: a TCP listener per flow, reading framed HL7 v2 messages and
//! answering each with its acknowledgement once the flow has it for good — committed (a
//! durable flow) or delivered (a sync flow). A message goes through the same
//! [`crate::engine::Engine::handle`] as any other; what it came to becomes `AA`, `AE` or
//! `AR` ([`crate::mllp::verdict`]).
//!
//! The listeners outlive a reload: each connection asks for the flows being served when a
//! message arrives, and [`Listeners::update`] opens and closes listeners as flows come and
//! go.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::flow::MllpTrigger;
use crate::message::{Message, Meta};
use crate::mllp::{AckCode, FrameError, Frames, Refusal, acknowledgement, verdict, write_frame};
use crate::runtime::Runtime;

/// The runtime being served now (a reload replaces it).
pub type Current = Arc<dyn Fn() -> Arc<Runtime> + Send + Sync>;

/// The MLLP listeners of the flows being served.
pub struct Listeners {
    current: Current,
    bound: Mutex<BTreeMap<String, Bound>>,
    connections: TaskTracker,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("bound", &self.addresses())
            .finish_non_exhaustive()
    }
}

/// One flow's listener.
#[derive(Debug)]
struct Bound {
    /// The address as configured, to tell whether a reload changed it.
    listen: String,
    tls: bool,
    address: SocketAddr,
    stop: CancellationToken,
}

impl Listeners {
    /// Opens a listener for every flow of the runtime `current` gives that has an `mllp`
    /// trigger.
    ///
    /// # Errors
    ///
    /// When an address cannot be bound.
    pub async fn start(current: Current) -> std::io::Result<Arc<Self>> {
        let listeners = Arc::new(Self {
            current,
            bound: Mutex::new(BTreeMap::new()),
            connections: TaskTracker::new(),
        });
        listeners.update().await?;
        Ok(listeners)
    }

    /// Opens listeners for flows that gained an `mllp` trigger (or changed its address) and
    /// closes those of flows that lost one: after a reload.
    ///
    /// # Errors
    ///
    /// When an address cannot be bound; the listeners opened before it stay.
    pub async fn update(self: &Arc<Self>) -> std::io::Result<()> {
        let runtime = (self.current)();
        let wanted: BTreeMap<String, (String, bool)> = runtime
            .flows()
            .iter()
            .filter_map(|f| {
                let trigger = f.mllp_trigger()?;
                Some((
                    f.name.clone(),
                    (trigger.listen.clone(), trigger.tls.is_some()),
                ))
            })
            .collect();
        {
            let mut bound = lock(&self.bound);
            bound.retain(|flow, b| {
                let keep = wanted.get(flow) == Some(&(b.listen.clone(), b.tls));
                if !keep {
                    b.stop.cancel();
                }
                keep
            });
        }
        for (flow, (listen, tls)) in wanted {
            if lock(&self.bound).contains_key(&flow) {
                continue;
            }
            let listener = TcpListener::bind(&listen).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("flow \"{flow}\": binding {listen}: {e}"))
            })?;
            let address = listener.local_addr()?;
            let stop = CancellationToken::new();
            tracing::info!(flow = %flow, %address, tls, "MLLP listener open");
            tokio::spawn(Arc::clone(self).accept(flow.clone(), listener, stop.clone()));
            lock(&self.bound).insert(
                flow,
                Bound {
                    listen,
                    tls,
                    address,
                    stop,
                },
            );
        }
        Ok(())
    }

    /// Each flow with a listener, and the address it listens on.
    pub fn addresses(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.bound)
            .iter()
            .map(|(flow, b)| (flow.clone(), b.address))
            .collect()
    }

    /// The address `flow` listens on.
    pub fn address(&self, flow: &str) -> Option<SocketAddr> {
        lock(&self.bound).get(flow).map(|b| b.address)
    }

    /// Closes every listener, then waits up to `grace` for the messages being handled to be
    /// acknowledged.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        for bound in lock(&self.bound).values() {
            bound.stop.cancel();
        }
        self.connections.close();
        let _ = tokio::time::timeout(grace, self.connections.wait()).await;
    }

    /// Accepts connections for `flow` until `stop`, at most `max_connections` at once.
    async fn accept(self: Arc<Self>, flow: String, listener: TcpListener, stop: CancellationToken) {
        let Some(limit) = self.trigger(&flow, |t| t.max_connections) else {
            return;
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(limit as usize));
        loop {
            let permit = tokio::select! {
                () = stop.cancelled() => return,
                permit = Arc::clone(&permits).acquire_owned() => permit,
            };
            let Ok(permit) = permit else { return };
            let (stream, peer) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(flow = %flow, %error, "MLLP accept failed");
                        continue;
                    }
                },
            };
            let (listeners, flow, stop) = (Arc::clone(&self), flow.clone(), stop.clone());
            self.connections.spawn(async move {
                listeners.connection(&flow, stream, peer, stop).await;
                drop(permit);
            });
        }
    }

    /// A setting of `flow`'s trigger in the flows being served now.
    fn trigger<T>(&self, flow: &str, read: impl FnOnce(&MllpTrigger) -> T) -> Option<T> {
        (self.current)().flow(flow)?.mllp_trigger().map(read)
    }

    /// Serves one connection: over TLS when the trigger says so.
    async fn connection(
        &self,
        flow: &str,
        stream: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) {
        let Some((tls, idle, max)) =
            self.trigger(flow, |t| (t.tls.clone(), t.idle_timeout, t.max_message))
        else {
            return;
        };
        let _ = stream.set_nodelay(true);
        match tls {
            None => self.messages(flow, stream, peer, stop, idle, max).await,
            Some(config) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                match tokio::time::timeout(idle, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => self.messages(flow, stream, peer, stop, idle, max).await,
                    Ok(Err(error)) => {
                        tracing::debug!(flow = %flow, %peer, %error, "MLLP TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(flow = %flow, %peer, "MLLP TLS handshake timed out"),
                }
            }
        }
    }

    /// Reads messages off `stream` and acknowledges each, until the peer closes, stays
    /// silent for `idle`, sends what is not MLLP, or the listener stops (between messages:
    /// one being handled is acknowledged first).
    async fn messages<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        flow: &str,
        stream: S,
        peer: SocketAddr,
        stop: CancellationToken,
        idle: std::time::Duration,
        max: usize,
    ) {
        let peer_text = peer.to_string();
        let mut frames = Frames::new(stream, max);
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = tokio::time::timeout(idle, frames.next()) => next,
            };
            let ack = match next {
                Err(_) => {
                    tracing::debug!(flow = %flow, peer = %peer_text, "MLLP connection idle: closed");
                    return;
                }
                Ok(Ok(None)) => return,
                Ok(Ok(Some(frame))) => self.handle(flow, &frame, &peer_text).await,
                Ok(Err(error @ FrameError::TooLarge(_))) => {
                    // The rest of the message is not read: answer, then close.
                    let refusal = Refusal::internal(error.to_string());
                    if let Some(ack) = answer(flow, None, AckCode::Error, Some(&refusal)) {
                        let _ = write_frame(frames.stream(), ack.as_bytes()).await;
                    }
                    return;
                }
                Ok(Err(error)) => {
                    tracing::warn!(flow = %flow, peer = %peer_text, %error, "MLLP connection closed");
                    return;
                }
            };
            if let Some(ack) = ack
                && let Err(error) = write_frame(frames.stream(), ack.as_bytes()).await
            {
                tracing::debug!(flow = %flow, peer = %peer_text, %error, "MLLP acknowledgement not sent");
                return;
            }
        }
    }

    /// Handles one message of `flow` through the flows being served now; its
    /// acknowledgement, unless the sender asked for none.
    async fn handle(&self, flow: &str, frame: &[u8], peer: &str) -> Option<String> {
        let runtime = (self.current)();
        let Some(served) = runtime.flow(flow).cloned() else {
            let refusal = Refusal::internal(format!("flow \"{flow}\" is not served any more"));
            return answer(flow, None, AckCode::Reject, Some(&refusal));
        };
        let body = match crate::hl7::read(frame) {
            Ok(body) => body,
            Err(reason) => {
                tracing::info!(flow = %flow, %peer, %reason, "MLLP message is not HL7 v2");
                let refusal = Refusal::malformed(reason);
                return answer(flow, None, AckCode::Error, Some(&refusal));
            }
        };
        let (code, refusal) = if runtime.is_draining() {
            let refusal = Refusal::internal("ferry is shutting down: send it again");
            (AckCode::Reject, Some(refusal))
        } else {
            let listen = served.mllp_trigger().map_or("", |t| t.listen.as_str());
            let meta = Meta::for_mllp(flow, listen, peer, &body);
            let result = runtime
                .handle(&served, Message::new(body.clone(), meta))
                .await;
            match &result {
                Ok(_) => crate::fault::pass(crate::fault::Point::BeforeMllpAck),
                Err(error) => {
                    tracing::info!(flow = %flow, %peer, %error, "MLLP message not accepted")
                }
            }
            verdict(&result)
        };
        answer(flow, Some(&body), code, refusal.as_ref())
    }
}

/// The acknowledgement of `message` (`None` when it could not be read), counted by its code.
fn answer(
    flow: &str,
    message: Option<&serde_json::Value>,
    code: AckCode,
    refusal: Option<&Refusal>,
) -> Option<String> {
    metrics::counter!(
        "ferry_mllp_messages_total",
        "flow" => flow.to_owned(),
        "ack" => code.code(false),
    )
    .increment(1);
    acknowledgement(message, code, refusal)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

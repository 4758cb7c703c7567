//! `flow` target: hands the message to another flow, in-process.
//!
//! Delivered by a durable flow, the called flow runs as part of that delivery: its steps,
//! then one attempt to its target, answered as that target answered (status, `Retry-After`,
//! retry or not), under a message id derived from the caller's and this target's name
//! ([`crate::message::Meta::for_call`]), so every attempt carries the same
//! `Idempotency-Key`. The called flow's reply fields become the caller's vars. `ferry check`
//! refuses unknown flows and call cycles.

use super::{Attempt, Calls};
use crate::message::Message;

/// A compiled `flow` target.
#[derive(Debug)]
pub struct FlowTarget {
    name: String,
    /// The flow it calls.
    pub flow: String,
    /// Whether the called flow subscribed to these messages (`subscribes`), rather than
    /// being a target of the flow's own: the flow's `on_delivered` and `on_failed` are not
    /// about it.
    pub subscribed: bool,
}

impl FlowTarget {
    pub(crate) fn new(name: &str, flow: &str) -> Self {
        Self {
            name: name.to_owned(),
            flow: flow.to_owned(),
            subscribed: false,
        }
    }

    /// The target of a flow that subscribed: named after it.
    pub(crate) fn subscription(flow: &str) -> Self {
        Self {
            subscribed: true,
            ..Self::new(flow, flow)
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Delivers `message` through the flow it calls (see the module's description).
    pub(crate) async fn attempt(&self, message: &mut Message, calls: &dyn Calls) -> Attempt {
        calls.call(&self.flow, &self.name, message).await
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::FlowTarget;
    use crate::compile::bench::message;
    use crate::retry::RetryAction;
    use crate::targets::Attempt;
    use crate::targets::called::Called;

    #[tokio::test]
    async fn the_called_flows_attempt_is_the_targets_unchanged() {
        let target = FlowTarget::new("helix", "helix-order");
        let answer = Attempt {
            retry_after: Some(std::time::Duration::from_secs(2)),
            ..Attempt::failed(RetryAction::Retry, Some(429), "answered 429")
        };
        let calls = Called::answering(answer);
        let mut message = message(json!({"ref": "R-1"}));
        let attempt = target.attempt(&mut message, &calls).await;
        assert_eq!(
            (attempt.action, attempt.status, attempt.retry_after),
            (
                RetryAction::Retry,
                Some(429),
                Some(std::time::Duration::from_secs(2))
            )
        );
        let calls = calls.calls.lock().unwrap();
        assert_eq!(
            *calls,
            [(
                "helix-order".to_owned(),
                "helix".to_owned(),
                json!({"ref": "R-1"})
            )]
        );
    }
}

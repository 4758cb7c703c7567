//! `flow` target: hands the message to another flow, in-process. The called flow's reply
//! fields become the caller's vars; in a `sync` flow without its own `reply`, the called
//! flow's reply is the caller's. `ferry check` refuses unknown flows and call cycles.

use super::{Attempt, Calls, classify_status};
use crate::message::Message;

/// A compiled `flow` target.
#[derive(Debug)]
pub struct FlowTarget {
    name: String,
    /// The flow it calls.
    pub flow: String,
}

impl FlowTarget {
    pub(crate) fn new(name: &str, flow: &str) -> Self {
        Self {
            name: name.to_owned(),
            flow: flow.to_owned(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

impl FlowTarget {
    /// Calls the flow with `message`: done when it answers 2xx (its reply's fields become
    /// `message`'s vars); its refusal or failure is classified like an HTTP status.
    pub(crate) async fn attempt(&self, message: &mut Message, calls: &dyn Calls) -> Attempt {
        match calls.call(&self.flow, message).await {
            Ok(reply) if (200..300).contains(&reply.status) => {
                message.merge_vars(&reply.body);
                Attempt::done(Some(reply.status))
            }
            Ok(reply) => Attempt::failed(
                classify_status(reply.status),
                Some(reply.status),
                format!(
                    "flow \"{}\" answered {}: {}",
                    self.flow, reply.status, reply.body
                ),
            ),
            Err(error) => {
                let status = error.status().as_u16();
                Attempt::failed(
                    classify_status(status),
                    Some(status),
                    format!("flow \"{}\": {error}", self.flow),
                )
            }
        }
    }
}

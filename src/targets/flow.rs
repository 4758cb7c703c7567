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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::FlowTarget;
    use crate::compile::bench::message;
    use crate::error::{FlowError, ServeError};
    use crate::retry::RetryAction;
    use crate::store::StoredReply;
    use crate::targets::called::{Answer, Called};

    fn reply(status: u16, body: serde_json::Value) -> Result<StoredReply, ServeError> {
        Ok(StoredReply {
            status,
            headers: Vec::new(),
            body,
        })
    }

    #[tokio::test]
    async fn a_2xx_reply_is_done_and_its_fields_become_vars() {
        let target = FlowTarget::new("lab", "northwind-order");
        let calls = Called::answering(|| reply(202, json!({"lab_ref": "NW-1"})));
        let mut message = message(json!({"ref": "R-1"}));
        let attempt = target.attempt(&mut message, &calls).await;
        assert_eq!(
            (attempt.action, attempt.status),
            (RetryAction::Done, Some(202))
        );
        assert_eq!(message.root()["vars"]["lab_ref"], "NW-1");
        let calls = calls.calls.lock().unwrap();
        assert_eq!(
            *calls,
            [("northwind-order".to_owned(), json!({"ref": "R-1"}))]
        );
    }

    #[tokio::test]
    async fn a_refusal_or_failure_is_classified_like_an_http_status() {
        let target = FlowTarget::new("lab", "northwind-order");
        let cases: [(Answer, RetryAction, u16); 4] = [
            (
                || reply(422, json!({"error": "invalid"})),
                RetryAction::Drop,
                422,
            ),
            (|| reply(503, json!({})), RetryAction::Retry, 503),
            (
                || {
                    Err(ServeError::Flow(FlowError::Unavailable(
                        "store down".into(),
                    )))
                },
                RetryAction::Retry,
                503,
            ),
            (
                || Err(ServeError::Flow(FlowError::NoRoute)),
                RetryAction::Drop,
                422,
            ),
        ];
        for (answer, action, status) in cases {
            let attempt = target
                .attempt(&mut message(json!({})), &Called::answering(answer))
                .await;
            assert_eq!((attempt.action, attempt.status), (action, Some(status)));
            let error = attempt.error.unwrap();
            assert!(error.starts_with("flow \"northwind-order\""), "{error}");
        }
    }
}

//! Mocked targets: what stands behind a flow's targets in `ferry test` and `ferry run`. A
//! mock renders exactly what the real target would send (the same request, checked the same
//! way), records it, and answers as a test says; the answer is classified and captured as a
//! real one would be. Nothing else about handling a message differs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use serde_json::Value;

use super::{Attempt, RetryAction, Target, TargetResponse, classify_status, lock};
use crate::message::Message;
use crate::mllp::{AckCode, Refusal, acknowledgement};
use crate::template::Templates;

/// What a mocked target answers.
#[derive(Debug, Clone)]
pub struct MockAnswer {
    /// The status (for a queue: 2xx took it; for a flow: its reply's status).
    pub status: u16,
    /// The body.
    pub body: Value,
    /// `timeout` or `connect`: no answer at all.
    pub fail: Option<String>,
    /// For an `mllp` target: the acknowledgement code (`AA` unless said); a `body` that is
    /// a string is the reason it gives.
    pub ack: Option<AckCode>,
}

impl Default for MockAnswer {
    fn default() -> Self {
        Self {
            status: 200,
            body: Value::Object(serde_json::Map::new()),
            fail: None,
            ack: None,
        }
    }
}

/// What a mocked target received.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The headers it got, names lowercase, with `x-ferry-url` and `x-ferry-method` for an
    /// HTTP target.
    pub headers: BTreeMap<String, String>,
    /// The body: JSON, or a text body as a string.
    pub body: Value,
}

/// Every target of every flow, mocked. Targets are named as the flow under test names
/// them, and a target of another flow (one run for real, see [`Mocks::run_for_real`]) as
/// `flow/target`.
#[derive(Debug, Default)]
pub struct Mocks {
    answers: Mutex<BTreeMap<String, MockAnswer>>,
    received: Mutex<BTreeMap<String, Received>>,
    /// The flow under test, and the flows it calls that run for real.
    scope: Mutex<(String, Vec<String>)>,
}

impl Mocks {
    /// From now on `flow` is under test, and a call to one of `real` runs that flow (its own
    /// targets mocked) rather than answering as a mock.
    pub fn run_for_real(&self, flow: &str, real: &[String]) {
        *lock(&self.scope) = (flow.to_owned(), real.to_vec());
    }

    /// Whether a call to `flow` runs it for real.
    pub fn runs(&self, flow: &str) -> bool {
        lock(&self.scope).1.iter().any(|f| f == flow)
    }

    /// The name mocks and expectations give `target` of `flow` (with no flow under test,
    /// every target by its own name).
    pub fn name_of(&self, flow: &str, target: &str) -> String {
        let home = &lock(&self.scope).0;
        if home.is_empty() || home == flow {
            target.to_owned()
        } else {
            format!("{flow}/{target}")
        }
    }

    /// From now on, the targets named in `answers` answer so; the others `200 {}`.
    pub fn answer(&self, answers: BTreeMap<String, MockAnswer>) {
        *lock(&self.answers) = answers;
    }

    /// What the target named `name` answers.
    pub fn answer_of(&self, name: &str) -> MockAnswer {
        lock(&self.answers).get(name).cloned().unwrap_or_default()
    }

    /// What each target received since the last call, by target name.
    pub fn take_received(&self) -> BTreeMap<String, Received> {
        std::mem::take(&mut *lock(&self.received))
    }

    /// One attempt to `target` of `flow`: renders what it would receive, records it, and
    /// answers.
    pub(crate) fn attempt(
        &self,
        flow: &str,
        target: &Target,
        message: &mut Message,
        templates: &Templates,
    ) -> Attempt {
        let name = self.name_of(flow, target.name());
        let received = match target {
            Target::Http(http) => match http.prepare(message, templates) {
                Ok(request) => Received {
                    headers: request
                        .headers
                        .iter()
                        .map(|(n, v)| {
                            let value = v.to_str().unwrap_or_default().to_owned();
                            (n.as_str().to_owned(), value)
                        })
                        .chain([
                            ("x-ferry-url".to_owned(), request.url.to_string()),
                            ("x-ferry-method".to_owned(), request.method.to_string()),
                        ])
                        .collect(),
                    body: serde_json::from_slice(&request.body).unwrap_or_else(|_| {
                        Value::String(String::from_utf8_lossy(&request.body).into_owned())
                    }),
                },
                Err(error) => return Attempt::failed(RetryAction::Drop, None, error.to_string()),
            },
            Target::Mllp(mllp) => match mllp.prepare(message) {
                Ok((text, _)) => Received {
                    headers: BTreeMap::new(),
                    body: Value::String(text),
                },
                Err(error) => return Attempt::failed(RetryAction::Drop, None, error.to_string()),
            },
            Target::Queue(_) | Target::Flow(_) => Received {
                headers: BTreeMap::new(),
                body: message.body().clone(),
            },
        };
        let answer = self.answer_of(&name);
        lock(&self.received).insert(name, received.clone());
        if let Some(kind) = answer.fail {
            return Attempt::failed(RetryAction::Retry, None, format!("mocked {kind}"));
        }
        if let (Target::Mllp(mllp), Value::String(sent)) = (target, &received.body) {
            let sent = crate::hl7::parse(sent).ok();
            let code = answer.ack.unwrap_or(AckCode::Accept);
            let refusal = (code != AckCode::Accept).then(|| Refusal {
                code: 207,
                text: answer
                    .body
                    .as_str()
                    .map_or_else(|| "mocked".to_owned(), str::to_owned),
            });
            let control_id = sent.as_ref().map_or_else(String::new, |s| {
                s["MSH"][0]["10"].as_str().unwrap_or_default().to_owned()
            });
            let ack = acknowledgement(sent.as_ref(), code, refusal.as_ref()).unwrap_or_default();
            return mllp.settle(ack.as_bytes(), &control_id, message);
        }
        let action = classify_status(answer.status);
        if action != RetryAction::Done {
            return Attempt::failed(
                action,
                Some(answer.status),
                format!("answered {}: {}", answer.status, answer.body),
            );
        }
        match target {
            Target::Http(http) => http.capture(
                &TargetResponse {
                    status: answer.status,
                    retry_after: None,
                    body: Bytes::from(crate::json::text(&answer.body)),
                },
                message,
            ),
            Target::Flow(_) => message.merge_vars(&answer.body),
            Target::Queue(_) | Target::Mllp(_) => {}
        }
        Attempt::done(Some(answer.status))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::{MockAnswer, Mocks};
    use crate::compile::bench::{Bench, message};
    use crate::config::HttpTargetConfig;
    use crate::retry::RetryAction;
    use crate::targets::{FlowTarget, HttpTarget, Target};

    fn http(bench: &mut Bench, yaml: &str) -> Target {
        let compiled = bench.compile(yaml, |config: &HttpTargetConfig, ctx| {
            HttpTarget::compile("lab", config, ctx)
        });
        Target::Http(compiled.unwrap())
    }

    #[test]
    fn a_mock_records_the_request_the_real_target_would_send_and_captures_its_answer() {
        let mut bench = Bench::new();
        let lab = http(
            &mut bench,
            "url: \"https://lab.example/orders/{{body.ref}}\"\ncapture: {lab_ref: $.id}",
        );
        let mocks = Mocks::default();
        mocks.answer(BTreeMap::from([(
            "lab".to_owned(),
            MockAnswer {
                status: 201,
                body: json!({"id": "L-1"}),
                fail: None,
                ack: None,
            },
        )]));
        let mut message = message(json!({"ref": "R 1"}));
        let attempt = mocks.attempt("bench", &lab, &mut message, &bench.templates);
        assert_eq!(
            (attempt.action, attempt.status),
            (RetryAction::Done, Some(201))
        );
        assert_eq!(message.root()["vars"]["lab_ref"], "L-1");

        let received = mocks.take_received().remove("lab").unwrap();
        assert_eq!(received.body, json!({"ref": "R 1"}));
        assert_eq!(
            received.headers["x-ferry-url"],
            "https://lab.example/orders/R%201"
        );
        assert_eq!(received.headers["x-ferry-method"], "POST");
        assert_eq!(
            received.headers["idempotency-key"],
            format!("{}:lab", message.id())
        );
        assert!(mocks.take_received().is_empty(), "taken once");
    }

    #[test]
    fn answers_are_classified_as_the_real_ones_would_be() {
        let mut bench = Bench::new();
        let lab = http(&mut bench, "url: https://lab.example/orders");
        let portal = Target::Flow(FlowTarget::new("portal", "portal-results"));
        let mocks = Mocks::default();
        for (answer, action, status) in [
            (
                MockAnswer {
                    status: 503,
                    ..MockAnswer::default()
                },
                RetryAction::Retry,
                Some(503),
            ),
            (
                MockAnswer {
                    status: 409,
                    ..MockAnswer::default()
                },
                RetryAction::Drop,
                Some(409),
            ),
            (
                MockAnswer {
                    fail: Some("timeout".into()),
                    ..MockAnswer::default()
                },
                RetryAction::Retry,
                None,
            ),
        ] {
            for target in [&lab, &portal] {
                mocks.answer(BTreeMap::from([(target.name().to_owned(), answer.clone())]));
                let attempt =
                    mocks.attempt("bench", target, &mut message(json!({})), &bench.templates);
                assert_eq!(
                    (attempt.action, attempt.status),
                    (action, status),
                    "{answer:?}"
                );
            }
        }
        // Unnamed targets answer 200 {}; a flow's reply body becomes vars.
        mocks.answer(BTreeMap::new());
        let attempt = mocks.attempt("bench", &portal, &mut message(json!({})), &bench.templates);
        assert_eq!(attempt.status, Some(200));
    }

    #[test]
    fn a_request_the_real_target_would_refuse_is_refused_for_good() {
        let mut bench = Bench::new();
        let callback = http(
            &mut bench,
            "url: \"{{body.callback_url}}\"\nallow_hosts: [portal.example]",
        );
        let mocks = Mocks::default();
        let mut elsewhere = message(json!({"callback_url": "https://evil.example/x"}));
        let attempt = mocks.attempt("bench", &callback, &mut elsewhere, &bench.templates);
        assert_eq!(attempt.action, RetryAction::Drop);
        assert!(attempt.error.unwrap().contains("not in allow_hosts"));
        assert!(mocks.take_received().is_empty(), "nothing was sent");
    }
}

//! Mocked targets: what stands behind a flow's targets in `ferry test` and `ferry run`. A
//! mock renders exactly what the real target would send (the same request, checked the same
//! way), records it, and answers as a test says; the answer is classified and captured as a
//! real one would be. Nothing else about handling a message differs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use serde_json::Value;

use super::{Attempt, RetryAction, Target, TargetResponse, classify_status};
use crate::message::Message;
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
}

impl Default for MockAnswer {
    fn default() -> Self {
        Self {
            status: 200,
            body: Value::Object(serde_json::Map::new()),
            fail: None,
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

/// Every target of every flow, mocked.
#[derive(Debug, Default)]
pub struct Mocks {
    answers: Mutex<BTreeMap<String, MockAnswer>>,
    received: Mutex<BTreeMap<String, Received>>,
}

impl Mocks {
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

    /// One attempt to `target`: renders what it would receive, records it, and answers.
    pub(crate) fn attempt(
        &self,
        target: &Target,
        message: &mut Message,
        templates: &Templates,
    ) -> Attempt {
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
            Target::Queue(_) | Target::Flow(_) => Received {
                headers: BTreeMap::new(),
                body: message.body().clone(),
            },
        };
        lock(&self.received).insert(target.name().to_owned(), received);
        let answer = self.answer_of(target.name());
        if let Some(kind) = answer.fail {
            return Attempt::failed(RetryAction::Retry, None, format!("mocked {kind}"));
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
                    body: Bytes::from(answer.body.to_string()),
                },
                message,
            ),
            Target::Flow(_) => message.merge_vars(&answer.body),
            Target::Queue(_) => {}
        }
        Attempt::done(Some(answer.status))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

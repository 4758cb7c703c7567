//! The console's pages: what each shows and the forms that replay.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Console, failure, page};
use crate::admin::{self, Operator};
use crate::error::ServeError;
use crate::session::Session;
use crate::store::{Event, MessageFilter, Millis, now_ms};

/// Most messages a list shows.
const LISTED: u32 = 200;

/// A page for `error`, with the status the admin API would answer.
fn refused(session: &Session, error: &ServeError) -> Response {
    let message = error.body()["message"]
        .as_str()
        .map_or_else(|| error.to_string(), str::to_owned);
    failure(error.status(), Some(session), &message)
}

/// The page for a form without the session's CSRF token.
pub(super) fn forged(session: &Session) -> Response {
    failure(
        StatusCode::FORBIDDEN,
        Some(session),
        "This form is out of date or was not sent from the console: reload the page and try again.",
    )
}

/// Flows with their counts and each target's backlog.
pub(super) async fn flows(
    State(console): State<Arc<Console>>,
    Extension(session): Extension<Session>,
) -> Response {
    let runtime = &console.runtime;
    let overview = async { Ok::<_, ServeError>(admin::store(runtime)?.overview().await?) };
    let overview = match overview.await {
        Ok(overview) => overview,
        Err(error) => return refused(&session, &error),
    };
    let now = now_ms();
    let flows: Vec<Value> = runtime
        .flows()
        .iter()
        .map(|flow| {
            let counts = overview
                .flows
                .iter()
                .find(|c| c.flow == flow.name)
                .cloned()
                .unwrap_or_default();
            let targets: Vec<Value> = flow
                .targets()
                .iter()
                .map(|target| {
                    let backlog = overview
                        .targets
                        .iter()
                        .find(|b| b.flow == flow.name && b.target == target.name())
                        .cloned()
                        .unwrap_or_default();
                    json!({
                        "name": target.name(),
                        "kind": target.kind(),
                        "open": backlog.open,
                        "retrying": backlog.retrying,
                        "dead": backlog.dead,
                        "oldest": backlog.oldest_open.map(|at| age(now - at)),
                        "failing": backlog.failing,
                    })
                })
                .collect();
            let retrying: u64 = overview
                .targets
                .iter()
                .filter(|b| b.flow == flow.name)
                .map(|b| b.retrying)
                .sum();
            json!({
                "name": flow.name,
                "description": flow.description,
                "trigger": flow.trigger.describe(),
                "mode": if flow.is_durable() { "durable" } else { "sync" },
                "accepted": counts.accepted,
                "delivered": counts.delivered,
                "retrying": retrying,
                "dead": counts.dead,
                "targets": targets,
            })
        })
        .collect();
    let data = json!({"flows": flows, "at": crate::store::rfc3339(now)});
    page(StatusCode::OK, "flows", "Flows", Some(&session), &data)
}

/// The search form's fields; an empty field is no filter.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Search {
    #[serde(default)]
    q: String,
    #[serde(default)]
    flow: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
}

fn given(text: &str) -> Option<String> {
    Some(text.trim().to_owned()).filter(|t| !t.is_empty())
}

/// A `datetime-local` field (or RFC 3339) as unix milliseconds; an unset field is `None`.
fn instant(field: &str, text: &str) -> Result<Option<Millis>, String> {
    let Some(text) = given(text) else {
        return Ok(None);
    };
    let local = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]");
    let parsed = time::PrimitiveDateTime::parse(&text, local)
        .map(time::PrimitiveDateTime::assume_utc)
        .or_else(|_| {
            time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        })
        .map_err(|_| format!("{field}: \"{text}\" is not a time like 2026-04-17T09:30 (UTC)"))?;
    Ok(Some(
        i64::try_from(parsed.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX),
    ))
}

/// Messages found by any of their keys, or listed by flow, state and time.
pub(super) async fn search(
    State(console): State<Arc<Console>>,
    Extension(session): Extension<Session>,
    Query(search): Query<Search>,
) -> Response {
    let runtime = &console.runtime;
    let store = match admin::store(runtime) {
        Ok(store) => store,
        Err(error) => return refused(&session, &error),
    };
    let (since, until) = match (instant("From", &search.since), instant("To", &search.until)) {
        (Ok(since), Ok(until)) => (since, until),
        (Err(problem), _) | (_, Err(problem)) => {
            return failure(StatusCode::BAD_REQUEST, Some(&session), &problem);
        }
    };
    let filter = MessageFilter {
        flow: given(&search.flow),
        status: given(&search.state),
        since,
        until,
        limit: LISTED,
        ..MessageFilter::default()
    };
    let mut journey = Value::Null;
    let messages = match given(&search.q) {
        Some(key) => match store.trace(&key).await {
            Ok(Some(trace)) => {
                // A message id leads straight to its page, which shows its whole journey.
                if trace.messages.iter().any(|m| m.id == key) {
                    return Redirect::to(&message_path(&key)).into_response();
                }
                journey = json!({
                    "count": trace.messages.len(),
                    "context": trace.correlation.as_ref().map(|c| c.context.as_str()),
                    "state": trace.correlation.as_ref().and_then(|c| c.state.as_deref()),
                });
                let found: Vec<_> = trace
                    .messages
                    .into_iter()
                    .filter(|m| filter.flow.as_ref().is_none_or(|f| *f == m.flow))
                    .filter(|m| filter.status.as_ref().is_none_or(|s| *s == m.status))
                    .collect();
                if found.len() == 1 && filter.since.is_none() && filter.until.is_none() {
                    return Redirect::to(&message_path(&found[0].id)).into_response();
                }
                found
            }
            Ok(None) => Vec::new(),
            Err(error) => return refused(&session, &error.into()),
        },
        None => match store.find_messages(&filter).await {
            Ok(found) => found,
            Err(error) => return refused(&session, &error.into()),
        },
    };
    let flows: Vec<Value> = runtime
        .flows()
        .iter()
        .map(|f| json!({"name": f.name, "selected": f.name == search.flow.trim()}))
        .collect();
    let states: Vec<Value> = ["accepted", "delivered", "dead"]
        .iter()
        .map(|s| json!({"name": s, "selected": *s == search.state.trim()}))
        .collect();
    let data = json!({
        "q": search.q.trim(),
        "since": search.since,
        "until": search.until,
        "flows": flows,
        "states": states,
        "journey": journey,
        "searched": given(&search.q).is_some(),
        "messages": messages,
        "limited": messages.len() >= LISTED as usize,
    });
    page(
        StatusCode::OK,
        "messages",
        "Messages",
        Some(&session),
        &data,
    )
}

/// The page of message `id`: the id encoded as one path segment.
fn message_path(id: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    format!(
        "/console/messages/{}",
        percent_encoding::utf8_percent_encode(id, SEGMENT)
    )
}

/// One message: its journey across flows as one story, its attempts, its bodies.
pub(super) async fn message(
    State(console): State<Arc<Console>>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    let runtime = &console.runtime;
    let detail = match admin::message(runtime, &id).await {
        Ok(Some(detail)) => detail,
        Ok(None) => {
            return failure(
                StatusCode::NOT_FOUND,
                Some(&session),
                &format!("No message has the id \"{id}\"."),
            );
        }
        Err(error) => return refused(&session, &error),
    };
    let trace = async { Ok::<_, ServeError>(admin::store(runtime)?.trace(&id).await?) };
    let trace = match trace.await {
        Ok(trace) => trace,
        Err(error) => return refused(&session, &error),
    };
    let (journey, story) = trace.map_or_else(Default::default, |t| {
        // This message's own entries as `admin::message` prepared them (sensitive values
        // hidden); the journey's other messages and the record's states from the trace.
        let mut timeline = detail.timeline.clone();
        timeline.extend(
            t.timeline
                .into_iter()
                .filter(|e| e.message_id != id || e.kind == "state"),
        );
        // Stable: entries of one instant keep this message's order, then the others'.
        timeline.sort_by(|a, b| a.at.cmp(&b.at));
        let story = story(&timeline, &id);
        let journey: Vec<Value> = t
            .messages
            .iter()
            .map(|m| json!({"id": m.id, "flow": m.flow, "status": m.status, "received_at": m.received_at, "current": m.id == id}))
            .collect();
        (journey, story)
    });
    let attempts: Vec<Value> = detail
        .timeline
        .iter()
        .filter(|e| e.kind == "attempt")
        .map(|e| e.detail.clone())
        .collect();
    let steps: Vec<&str> = detail.timeline.iter().flat_map(step_labels).collect();
    let data = json!({
        "message": detail.summary,
        "path": message_path(&id),
        "csrf": session.csrf,
        "journey": journey,
        "story": story,
        "steps": steps,
        "attempts": attempts,
        "deliveries": detail.deliveries,
        "correlation": detail.correlation,
        "inbound": shown(&detail.inbound),
        "after_steps": shown(&json!({"body": detail.document["body"], "vars": detail.document["vars"]})),
        "reply": shown(&detail.reply),
    });
    let title = format!("Message {id}");
    page(StatusCode::OK, "message", &title, Some(&session), &data)
}

/// A body as an operator reads it: HL7 text with its segments on lines, JSON indented.
fn shown(body: &Value) -> String {
    match body {
        Value::String(text) => text.replace('\r', "\n"),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}

/// The timeline as lines of a story, a message's steps in one line.
fn story(timeline: &[Event], this: &str) -> Vec<Value> {
    let mut lines: Vec<Value> = Vec::with_capacity(timeline.len());
    for event in timeline {
        // Timelines written before the steps shared one entry have an entry per step.
        if let Some(last) = lines.last_mut()
            && event.kind == "step"
            && last["kind"] == "step"
            && last["message_id"] == event.message_id.as_str()
        {
            let what = format!(
                "{}, {}",
                last["what"].as_str().unwrap_or_default(),
                step_kinds(event)
            );
            last["what"] = json!(what);
            continue;
        }
        lines.push(chapter(event, this));
    }
    lines
}

/// The steps a `steps` entry (or an older `step` entry) names, as `step 1 (validate)`.
fn step_labels(event: &Event) -> Vec<&str> {
    match event.kind.as_str() {
        "steps" => event.detail["steps"]
            .as_array()
            .map(|steps| steps.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default(),
        "step" => event.detail["step"].as_str().into_iter().collect(),
        _ => Vec::new(),
    }
}

/// The kinds of an entry's steps, in order: `validate, transform` for `step 1 (validate)`
/// and `step 2 (transform)`.
fn step_kinds(event: &Event) -> String {
    step_labels(event)
        .into_iter()
        .map(|label| {
            label
                .split_once('(')
                .and_then(|(_, kind)| kind.strip_suffix(')'))
                .unwrap_or(label)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One timeline entry as a line of the story.
fn chapter(event: &Event, this: &str) -> Value {
    let d = &event.detail;
    let text = |key: &str| d[key].as_str().unwrap_or_default().to_owned();
    let what = match event.kind.as_str() {
        "received" => match d["idempotency_key"].as_str() {
            Some(key) => format!("received (idempotency key {key})"),
            None => "received".to_owned(),
        },
        "replayed" => format!("replayed by {}: {}", text("by"), text("reason")),
        "steps" | "step" => format!("steps: {}", step_kinds(event)),
        "queued" => format!("queued for {}", text("target")),
        "attempt" => {
            let status = d["status"]
                .as_u64()
                .map_or_else(|| "no answer".to_owned(), |s| format!("answered {s}"));
            format!(
                "{} attempt {}: {status} in {} ms, {}",
                text("target"),
                d["attempt"],
                d["latency_ms"],
                text("outcome")
            )
        }
        "dead" => "dead letter".to_owned(),
        "state" => format!("{} is now {}", text("context"), text("state")),
        other => other.to_owned(),
    };
    json!({
        "at": event.at,
        "flow": event.flow,
        "message_id": event.message_id,
        "path": message_path(&event.message_id),
        "current": event.message_id == this,
        "kind": event.kind,
        "what": what,
        "error": d["error"].as_str(),
        // A failure's error quotes the answer already.
        "answer": d["answer"].as_str().filter(|_| d["error"].is_null()),
    })
}

/// How long ago, for people: `2h 5m`, `4m 12s`, `9s`.
fn age(ms: Millis) -> String {
    let seconds = ms.max(0) / 1000;
    match seconds {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// Which dead letters the page lists.
#[derive(Debug, Default, Deserialize)]
pub(super) struct DeadFilter {
    #[serde(default)]
    flow: String,
    #[serde(default)]
    target: String,
}

/// Dead letters by flow and target, to replay one, a selection, or all that match.
pub(super) async fn dead_letters(
    State(console): State<Arc<Console>>,
    Extension(session): Extension<Session>,
    Query(filter): Query<DeadFilter>,
) -> Response {
    let runtime = &console.runtime;
    let store = match admin::store(runtime) {
        Ok(store) => store,
        Err(error) => return refused(&session, &error),
    };
    let (flow, target) = (given(&filter.flow), given(&filter.target));
    let wanted = MessageFilter::dead_letters(flow.clone(), target.clone(), LISTED);
    let (overview, dead) = match tokio::try_join!(store.overview(), store.find_messages(&wanted)) {
        Ok(found) => found,
        Err(error) => return refused(&session, &error.into()),
    };
    let groups: Vec<Value> = overview
        .targets
        .iter()
        .filter(|t| t.dead > 0)
        .map(|t| {
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("flow", &t.flow)
                .append_pair("target", &t.target)
                .finish();
            json!({"flow": t.flow, "target": t.target, "dead": t.dead, "query": query})
        })
        .collect();
    let data = json!({
        "flow": flow,
        "target": target,
        "filtered": flow.is_some() || target.is_some(),
        "groups": groups,
        "dead": dead,
        "limited": dead.len() >= LISTED as usize,
        "csrf": session.csrf,
    });
    page(
        StatusCode::OK,
        "dead-letters",
        "Dead letters",
        Some(&session),
        &data,
    )
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct ReplayOne {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// Replays one message, recording who and why.
pub(super) async fn replay_one(
    State(console): State<Arc<Console>>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    axum::Form(form): axum::Form<ReplayOne>,
) -> Response {
    if !session.csrf_matches(&form.csrf) {
        return forged(&session);
    }
    replay(&console, &session, vec![id], &form.reason).await
}

/// Replays the dead letters ticked (`id`, repeated), or every one matching `flow` and
/// `target` (`scope=all`), recording who and why.
pub(super) async fn replay_many(
    State(console): State<Arc<Console>>,
    Extension(session): Extension<Session>,
    body: Bytes,
) -> Response {
    let (mut csrf, mut reason, mut scope) = (String::new(), String::new(), String::new());
    let (mut flow, mut target, mut ids) = (String::new(), String::new(), Vec::new());
    for (name, value) in form_urlencoded::parse(&body) {
        let value = value.into_owned();
        match name.as_ref() {
            "csrf" => csrf = value,
            "reason" => reason = value,
            "scope" => scope = value,
            "flow" => flow = value,
            "target" => target = value,
            "id" => ids.push(value),
            _ => {}
        }
    }
    if !session.csrf_matches(&csrf) {
        return forged(&session);
    }
    if scope == "all" {
        ids = match admin::dead_letters(&console.runtime, given(&flow), given(&target)).await {
            Ok(ids) => ids,
            Err(error) => return refused(&session, &error),
        };
    }
    if ids.is_empty() {
        return failure(
            StatusCode::BAD_REQUEST,
            Some(&session),
            "No dead letter was selected: tick the ones to replay, or replay all that match.",
        );
    }
    replay(&console, &session, ids, &reason).await
}

async fn replay(console: &Console, session: &Session, ids: Vec<String>, reason: &str) -> Response {
    let audit = match admin::audit(Operator(session.operator.clone()), reason) {
        Ok(audit) => audit,
        Err(error) => return refused(session, &error),
    };
    tracing::info!(operator = %audit.by, reason = %audit.reason, count = ids.len(), "replay from the console");
    let results: Vec<Value> = admin::replay_each(&console.runtime, ids, &audit)
        .await
        .into_iter()
        .map(|mut result| {
            let id = result["id"].as_str().unwrap_or_default().to_owned();
            result["path"] = json!(message_path(&id));
            if let Some(message) = result["error"]["message"].as_str() {
                result["error"] = json!(message);
            }
            result
        })
        .collect();
    let replayed = results.iter().filter(|r| r["replayed"] == true).count();
    let data = json!({
        "results": results,
        "replayed": replayed,
        "failed": results.len() - replayed,
        "by": audit.by,
        "reason": audit.reason,
    });
    page(StatusCode::OK, "replayed", "Replayed", Some(session), &data)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{age, instant, story};
    use crate::store::Event;

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(age(9_400), "9s");
        assert_eq!(age(252_000), "4m 12s");
        assert_eq!(age(7_500_000), "2h 5m");
        assert_eq!(age(90_000_000), "1d 1h");
    }

    #[test]
    fn times_are_read_from_the_form_in_utc() {
        assert_eq!(instant("From", " ").unwrap(), None);
        assert_eq!(
            instant("From", "2026-04-17T09:30").unwrap(),
            Some(1_776_418_200_000)
        );
        assert_eq!(
            instant("To", "2026-04-17T09:30:00Z").unwrap(),
            Some(1_776_418_200_000)
        );
        let wrong = instant("From", "yesterday").unwrap_err();
        assert!(wrong.starts_with("From: \"yesterday\""), "{wrong}");
    }

    #[test]
    fn a_messages_steps_make_one_line_of_its_story() {
        let event = |kind: &str, detail| Event {
            at: "2026-04-17T09:30:00Z".into(),
            message_id: "m1".into(),
            flow: "portal-to-lab".into(),
            kind: kind.into(),
            detail,
        };
        let steps = json!({"steps": ["step 1 (validate)", "step 2 (transform)"]});
        let lines = story(&[event("steps", steps)], "m1");
        assert_eq!(lines[0]["what"], "steps: validate, transform");
        // A timeline kept from before the steps shared one entry reads the same.
        let older = [
            event("step", json!({"step": "step 1 (validate)"})),
            event("step", json!({"step": "step 2 (transform)"})),
        ];
        let lines = story(&older, "m1");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["what"], "steps: validate, transform");
    }
}

//! `ferry dlq` and `ferry trace`: operator commands that talk to a running ferry's admin API.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{AdminArgs, DlqAction};

/// Talks to a running ferry's admin API.
pub(super) struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Option<Value>> {
        let url = format!("{}/admin/v1{path}", self.base.trim_end_matches('/'));
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let body = response.json::<Value>().await;
        match (status.as_u16(), body) {
            (200..=299, Ok(body)) if body.is_object() => Ok(Some(body)),
            // The admin API says it knows no such message; any other 404 means there is no
            // admin API here, which must not read as "nothing found".
            (404, Ok(body)) if body["details"][0]["missing"].is_string() => Ok(None),
            (401, _) => anyhow::bail!("the admin token was refused"),
            (200..=299 | 404, _) => anyhow::bail!(
                "no ferry admin API at {}: check the URL (with --admin-listen, the admin API has its own address) and that ferry runs with FERRY_ADMIN_TOKEN set",
                self.base
            ),
            (_, body) => anyhow::bail!("{url} answered {status}: {}", body.unwrap_or(Value::Null)),
        }
    }
}

pub(super) fn operate<F, Fut>(admin: &AdminArgs, action: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(AdminClient) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let token = admin
        .admin_token
        .clone()
        .context("set FERRY_ADMIN_TOKEN (or --admin-token) to the token ferry runs with")?;
    let http = reqwest::Client::builder()
        .timeout(admin.admin_timeout)
        .connect_timeout(admin.admin_timeout.min(Duration::from_secs(5)))
        .build()
        .context("building the HTTP client")?;
    let client = AdminClient {
        base: admin.admin_url.clone(),
        token,
        http,
    };
    super::runtime()?.block_on(action(client))
}

pub(super) async fn dlq(client: AdminClient, action: DlqAction) -> anyhow::Result<ExitCode> {
    match action {
        DlqAction::List { flow, target } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (name, value) in [("flow", flow), ("target", target)] {
                if let Some(value) = value {
                    query.append_pair(name, &value);
                }
            }
            let path = format!("/dead-letters?{}", query.finish());
            let body = client
                .call(reqwest::Method::GET, &path, None)
                .await?
                .unwrap_or_default();
            let dead = body["dead_letters"].as_array().cloned().unwrap_or_default();
            println!("{:<36}  {:<16}  {:<20}  ERROR", "ID", "FLOW", "RECEIVED");
            for message in &dead {
                println!(
                    "{:<36}  {:<16}  {:<20}  {}",
                    text(&message["id"]),
                    text(&message["flow"]),
                    text(&message["received_at"]),
                    text(&message["error"])
                );
            }
            println!("{} dead letter(s)", dead.len());
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Show { id } => match client
            .call(
                reqwest::Method::GET,
                &format!("/messages/{}", encoded(&id)),
                None,
            )
            .await?
        {
            Some(message) => {
                println!("{}", serde_json::to_string_pretty(&message)?);
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("no message {id}");
                Ok(ExitCode::from(1))
            }
        },
        DlqAction::Replay {
            ids,
            all,
            flow,
            target,
            reason,
        } => {
            if ids.is_empty() && !all {
                anyhow::bail!("name message ids, or --all");
            }
            let body = json!({"ids": ids, "flow": flow, "target": target, "reason": reason});
            let answer = client
                .call(reqwest::Method::POST, "/dead-letters/replay", Some(body))
                .await?
                .unwrap_or_default();
            let results = answer["results"].as_array().cloned().unwrap_or_default();
            let mut failed = 0;
            for result in &results {
                if result["replayed"] == json!(true) {
                    println!("{}  replayed", text(&result["id"]));
                } else {
                    failed += 1;
                    println!("{}  not replayed: {}", text(&result["id"]), result["error"]);
                }
            }
            println!("{} replayed, {failed} not", results.len() - failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

pub(super) async fn trace(client: AdminClient, key: String) -> anyhow::Result<ExitCode> {
    let path = format!("/trace/{}", encoded(&key));
    let Some(trace) = client.call(reqwest::Method::GET, &path, None).await? else {
        eprintln!("nothing is known by \"{key}\"");
        return Ok(ExitCode::from(1));
    };
    if let Some(record) = trace["correlation"].as_object() {
        println!(
            "{} {}  state: {}  keys: {}",
            text(&record["context"].clone()),
            text(&record["key"].clone()),
            text(&record["state"].clone()),
            record["keys"]
                .as_array()
                .map(|k| k.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        );
    }
    for message in trace["messages"].as_array().into_iter().flatten() {
        println!(
            "  message {}  flow {}  {}",
            text(&message["id"]),
            text(&message["flow"]),
            text(&message["status"])
        );
    }
    for recipient in trace["correlation"]["recipients"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "  to {} (from {})  {}  after {} attempt(s)",
            text(&recipient["target"]),
            text(&recipient["flow"]),
            text(&recipient["state"]),
            text(&recipient["attempts"])
        );
    }
    println!();
    for event in trace["timeline"].as_array().into_iter().flatten() {
        let id = text(&event["message_id"]);
        let short = id.get(id.len().saturating_sub(8)..).unwrap_or(&id);
        println!(
            "{}  {:<14} {:<8}  {:<9} {}",
            text(&event["at"]),
            text(&event["flow"]),
            short,
            text(&event["kind"]),
            describe(&event["detail"])
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` as one path segment or query value: every byte but letters and digits escaped.
fn encoded(text: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC)
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.iter().map(text).collect::<Vec<_>>().join(", ")
        }
        other => other.to_string(),
    }
}

/// A timeline detail as `key=value` pairs, nulls left out.
fn describe(detail: &Value) -> String {
    match detail.as_object() {
        Some(fields) => fields
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect::<Vec<_>>()
            .join(" "),
        None => text(detail),
    }
}

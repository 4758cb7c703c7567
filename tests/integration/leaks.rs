//! Nothing secret or unbounded leaves ferry by an error path: a partner's key in a target URL
//! stays out of logs, stored errors, timelines and the admin API; values that a header or a
//! URL cannot hold are the message's fault (422), never ferry's (500) or the partner's (502).
//! Regression tests for <https://github.com/ferry/ferry/issues/13>.

use std::process::Stdio;

use serde_json::{Value, json};

use crate::util::process::{TOKEN, spawn_on, stderr_lines, terminate};
use crate::util::{Ferry, Partner, repo, wait_for};

const KEY: &str = "sk-live-9f8e7d6c5b4a3210";

#[tokio::test]
async fn issue_13_a_secret_in_a_target_url_never_leaves_and_log_lines_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let env = [
        ("LEAK_URL", "http://127.0.0.1:9"), // nothing listens: every attempt fails
        ("LEAK_KEY", KEY),
        ("PARTNER_URL", "http://127.0.0.1:9"),
        ("RUST_LOG", "debug"),
    ];
    let (mut child, url) = spawn_on(
        &store,
        &[
            "--flows",
            "tests/fixtures/leaks/flows",
            "--log-format",
            "json",
        ],
        &env,
        Stdio::piped(),
    );
    let logs = stderr_lines(&mut child);
    // A message whose own data goes into the URL too, 200,000 characters of it.
    let huge = "r".repeat(200_000);
    let reply: Value = reqwest::Client::new()
        .post(format!("{url}/secret"))
        .json(&json!({"ref": huge}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = reply["id"].as_str().unwrap().to_owned();
    let admin = |path: String| {
        let url = format!("{url}/admin/v1{path}");
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    wait_for("the message is a dead letter", || async {
        admin(format!("/messages/{id}"))
            .await
            .contains(r#""status":"dead""#)
    })
    .await;
    let message = admin(format!("/messages/{id}")).await;
    let parsed: Value = serde_json::from_str(&message).unwrap();
    let last_error = parsed["deliveries"][0]["last_error"].as_str().unwrap();
    // The window: the error is about the URL, as the partner was unreachable.
    assert!(
        last_error.contains("127.0.0.1:9/hook?api_key=[redacted]"),
        "{last_error}"
    );
    assert!(last_error.len() <= 1100, "{} bytes", last_error.len());
    let timeline = admin(format!("/trace/{id}")).await;
    let dead = admin("/dead-letters".into()).await;
    terminate(child).await;
    let logs = logs.join().unwrap();
    for (what, text) in [
        ("message", &message),
        ("trace", &timeline),
        ("dead letters", &dead),
    ] {
        assert!(
            !text.contains(KEY),
            "the key is in the admin API's {what}: {text}"
        );
    }
    assert!(
        logs.iter().any(|l| l.contains("api_key=[redacted]")),
        "no log line names the failed URL"
    );
    for line in &logs {
        assert!(!line.contains(KEY), "the key is in a log line: {line}");
        assert!(
            line.len() < 4096,
            "a log line of {} bytes: {}…",
            line.len(),
            &line[..200]
        );
    }
}

#[tokio::test]
async fn issue_13_values_a_header_or_url_cannot_hold_are_the_messages_fault() {
    let partner = Partner::start(200, json!({})).await;
    let ferry = Ferry::start(
        &repo().join("tests/fixtures/leaks/flows"),
        &[
            ("PARTNER_URL", partner.url.as_str()),
            ("LEAK_URL", "http://127.0.0.1:9"),
            ("LEAK_KEY", KEY),
        ],
    )
    .await;
    let post = |path: &str, body: Value| {
        let url = format!("{}{path}", ferry.url);
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    for bad in ["abc\r\nX-Injected: yes", "line\nbreak", "nul\u{0}byte"] {
        let (status, reply) = post("/echo", json!({"ref": bad})).await;
        assert_eq!(status, 422, "reply header, {bad:?}: {reply}");
        assert_eq!(reply["error"], "unprocessable");
        assert!(
            reply["message"].as_str().unwrap().contains("x-echo"),
            "{reply}"
        );

        let (status, reply) = post("/header", json!({"ref": bad})).await;
        assert_eq!(status, 422, "target header, {bad:?}: {reply}");
        assert_eq!(reply["error"], "unprocessable");
        assert!(
            reply["message"].as_str().unwrap().contains("x-ref"),
            "{reply}"
        );

        let callback = format!("{}/callback{bad}", partner.url);
        let (status, reply) = post("/callback", json!({"callback": callback})).await;
        assert_eq!(status, 422, "target URL, {bad:?}: {reply}");
        assert!(
            reply["message"].as_str().unwrap().contains("URL"),
            "{reply}"
        );
    }
    assert!(partner.received().is_empty(), "nothing reached the partner");
    // A value that fits goes through.
    let (status, _) = post("/header", json!({"ref": "fine"})).await;
    assert_eq!(status, 200);
    assert_eq!(partner.received()[0].headers["x-ref"], "fine");
}

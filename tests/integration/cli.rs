//! The `ferry serve` binary with the shipped flows: it prints where it listens, serves, and
//! stops cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::json;

use crate::util::{Partner, payload, post_json, repo};

#[tokio::test]
async fn serve_runs_the_shipped_flows_and_stops_on_sigterm() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-1"})).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(repo())
        .env("LAB_URL", &lab.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("ferry listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line}"))
        .to_owned();

    let (status, reply) = post_json(
        &format!("{url}/api/v1/test-requests"),
        &payload("test-request.json"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(lab.received().len(), 1);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

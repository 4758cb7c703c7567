//! ferry as a child process: `ferry serve` on a free port, its stderr, and its end.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use super::{FAST_RETRY, SECRETS, repo};

/// The admin token child ferries run with.
pub(crate) const TOKEN: &str = "cli-test-token";

/// Starts `ferry serve` on an ephemeral port on the store at `store`, with more `args`, `env`,
/// and stderr going to `stderr`; returns the process and its URL.
pub(crate) fn spawn_on(
    store: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stderr: Stdio,
) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", store])
        .args(args)
        .current_dir(repo())
        .envs(env.iter().copied())
        .env("FERRY_ADMIN_TOKEN", TOKEN)
        .envs(FAST_RETRY)
        .envs(SECRETS)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("ferry listening on ")
        .unwrap_or_else(|| panic!("unexpected: {line}"));
    (child, url.to_owned())
}

/// Collects the lines `child` writes to its (piped) stderr until it exits.
pub(crate) fn stderr_lines(child: &mut Child) -> std::thread::JoinHandle<Vec<String>> {
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect()
    })
}

pub(crate) async fn terminate(child: Child) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut child = child;
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

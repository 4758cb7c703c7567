//! ferry as a child process: `ferry serve` on a free port, its stderr, and its end.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use super::{FAST_RETRY, SECRETS, listening_url, repo};

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
    start(
        Command::new(env!("CARGO_BIN_EXE_ferry")),
        store,
        args,
        env,
        stderr,
    )
}

/// [`spawn_on`], the process allowed one CPU (through `taskset`), as a container's quota or
/// a pinned process allows it.
pub(crate) fn spawn_on_one_cpu(
    store: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Child, String) {
    let mut taskset = Command::new("taskset");
    taskset.args(["--cpu-list", "0", env!("CARGO_BIN_EXE_ferry")]);
    start(taskset, store, args, env, Stdio::null())
}

/// Runs `command`, which starts `ferry`, as `ferry serve` with what [`spawn_on`] takes.
fn start(
    mut command: Command,
    store: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stderr: Stdio,
) -> (Child, String) {
    let mut child = command
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
    let url = listening_url(&mut child, "ferry listening on ");
    (child, url)
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

/// The names of the threads of process `pid`.
pub(crate) fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).unwrap())
        .map(|name| name.trim_end().to_owned())
        .collect()
}

/// The JSON log entries among the lines [`stderr_lines`] collected, once the child has exited.
pub(crate) fn json_lines(lines: std::thread::JoinHandle<Vec<String>>) -> Vec<serde_json::Value> {
    lines
        .join()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
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

/// The standard output of a finished ferry command that must have succeeded; fails the test
/// with both outputs otherwise.
pub(crate) fn succeeded(output: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

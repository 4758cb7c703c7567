//! ferry's speed beside a floor, in one run, so every figure reads as a ratio.
//!
//! Each server is a process of its own, started on CPU 0 (so it sizes its runtime for one CPU);
//! this benchmark (the load and the mock lab) runs on the others. The same Test Request (1.2 KB)
//! is sent by 32 connections:
//!
//! - **floor**: a minimal forwarding proxy on the same HTTP stack (axum in, reqwest out):
//!   no validation, no transform, the request's body POSTed to the lab;
//! - **sync**: the shipped portal-to-lab flow with `delivery: {mode: sync}`: validated,
//!   reshaped and sent to the lab before the reply;
//! - **durable**: the shipped flow as it ships (SQLite, synchronous commits): accepted,
//!   answered `202`, delivered by the outbox.
//!
//! The three take turns at the load, five rounds each, so that a shared machine slowing down
//! for a while slows them alike and their ratios hold. A turn ends when the lab has every order
//! the server accepted, so a durable turn counts its deliveries (and their CPU) in full.
//!
//! For each: requests per second, server CPU per request (from `/proc`), and memory. For the
//! durable flow also orders delivered per second and its throughput end to end against sync's;
//! then, with the load held on it for the whole time at once, how long the lab waits for the
//! last accepted order once the load stops, and how long a burst of
//! 10,000 requests takes to reach the lab. The durable flow's CPU per request there covers
//! both halves of its work, accepting and delivering; a second durable run splits them: the
//! lab holds its answers while the load runs (accepting alone), then takes the backlog
//! (delivering alone). Then start-up (process start to `/readyz` 200) and `ferry check` of
//! 1,000 flows.
//!
//! Run with `cargo bench --bench speed`; `FERRY_BENCH_SECONDS` (default 10) is how long each
//! load is held. `FERRY_BENCH_BASELINE`, the path of another ferry binary (an earlier build),
//! makes it a third to take turns with the floor and the sync flow, and the run ends there:
//! two builds compared in one run, where figures of two runs differ by more than most
//! changes do.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;

#[allow(dead_code, reason = "each benchmark uses part of what they share")]
mod common;

use common::{KEY, serve, test_request};

/// How many connections send at once.
const CONNECTIONS: usize = 32;
/// How many turns the floor and the sync flow take at the load, in alternation.
const ROUNDS: u32 = 5;
/// How many turns each takes when two builds are compared: shorter and more of them, as a
/// loaded machine changes speed from one second to the next.
const COMPARE_ROUNDS: u32 = 15;
/// The requests of a burst.
const BURST: u64 = 10_000;
/// Where the portal submits Test Requests.
const PATH: &str = "/api/v1/test-requests";
/// The longest the lab holds its answers: under the shipped flow's 10 s timeout, so that ferry
/// gives up on no order and sends none twice.
const HOLD_LIMIT: Duration = Duration::from_secs(8);
/// The longest the lab may take to have every order a load's requests were answered for.
const DRAIN_LIMIT: Duration = Duration::from_secs(300);
/// The environment variable that makes this program the floor proxy, forwarding to its URL.
const PROXY_ROLE: &str = "FERRY_SPEED_PROXY_TO";
/// The environment variable naming another ferry binary to compare the sync flow with.
const BASELINE: &str = "FERRY_BENCH_BASELINE";

fn main() {
    if let Ok(lab) = std::env::var(PROXY_ROLE) {
        return proxy(&lab);
    }
    // `cargo bench` passes `--bench`; a filter that is not ours means another benchmark.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && a != "speed")
    {
        return;
    }
    // The servers get CPU 0; the load and the lab the others.
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    pin(std::process::id(), &format!("1-{}", cpus.max(2) - 1));
    let seconds = std::env::var("FERRY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let held = Duration::from_secs(seconds);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(run(held));
}

async fn run(held: Duration) {
    let lab = Lab::start().await;
    let scratch = tempfile::tempdir().unwrap();
    let body = test_request();

    println!(
        "load: {CONNECTIONS} connections, {} s each, servers on CPU 0\n",
        held.as_secs()
    );
    println!(
        "{:<34} {:>9} {:>8} {:>12} {:>8} {:>9}",
        "", "req/s", "ratio", "CPU µs/req", "ratio", "RSS MiB"
    );

    let floor = Server::proxy(&lab.url);
    let sync_flows = sync_project(scratch.path());
    let sync = Server::ferry(&sync_flows, &scratch.path().join("sync.db"), &lab.url);
    if let Some(baseline) = std::env::var_os(BASELINE) {
        return compare(
            &floor,
            &sync,
            baseline,
            &sync_flows,
            scratch.path(),
            &lab,
            held,
        )
        .await;
    }
    let shipped = common::support::repo().join("flows");
    let durable = Server::ferry(&shipped, &scratch.path().join("durable.db"), &lab.url);
    let servers = [(&floor, "/orders"), (&sync, PATH), (&durable, PATH)];
    let [floor_run, sync_run, durable_run] = alternate(servers, &body, held, ROUNDS, &lab).await;
    floor_run.print("floor: forwarding proxy", &floor_run);
    sync_run.print("ferry, sync", &floor_run);
    durable_run.print("ferry, durable: accepting", &floor_run);
    drop((floor, sync));
    // Each turn of the durable flow ends when the lab has every order it accepted: its
    // figures end to end count that wait too.
    let end_to_end =
        durable_run.requests as f64 / (durable_run.held + durable_run.drained).as_secs_f64();
    println!(
        "{:<34} {:>9.0} {:>8.2}",
        "ferry, durable: delivered",
        end_to_end,
        end_to_end / floor_run.per_second()
    );
    println!(
        "durable end to end (accepted and delivered): {end_to_end:.0}/s, {:.2} of sync",
        end_to_end / sync_run.per_second()
    );

    // Held at once for the whole time: whether delivery keeps up with a load that lasts.
    let held_run = measure(&durable, PATH, &body, held, &lab, |_| {}).await;
    let drained = lab
        .wait_for(held_run.lab_before + held_run.requests, DRAIN_LIMIT)
        .await;
    println!(
        "\ndurable, the load held {} s at once: {:.0} accepted/s, {:.0} delivered/s; the lab had the last accepted order {:.2} s after the load ended",
        held.as_secs(),
        held_run.per_second(),
        held_run.requests as f64 / (held + drained).as_secs_f64(),
        drained.as_secs_f64()
    );
    let before = lab.count();
    let started = Instant::now();
    let sent = burst(&durable.url, &body, BURST).await;
    let accepted_in = started.elapsed();
    lab.wait_for(before + sent, DRAIN_LIMIT).await;
    println!(
        "burst of {sent}: accepted in {:.2} s, all at the lab after {:.2} s",
        accepted_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(durable);

    // The same flow again, its two halves apart: accepting while the lab holds every order,
    // then delivering the backlog once the lab takes orders again.
    let split = Server::ferry(&shipped, &scratch.path().join("split.db"), &lab.url);
    let accepting = measure(&split, PATH, &body, held.min(HOLD_LIMIT), &lab, Lab::hold).await;
    println!("\ndurable, the lab holding its answers during the load, then taking the backlog:");
    accepting.print("ferry, durable: accepting alone", &floor_run);
    let cpu = split.cpu();
    lab.release();
    let drained = lab
        .wait_for(accepting.lab_before + accepting.requests, DRAIN_LIMIT)
        .await;
    let delivering = Measured {
        held: drained,
        cpu: split.cpu() - cpu,
        rss_mib: split.peak_rss_mib(),
        ..accepting
    };
    delivering.print("ferry, durable: delivering alone", &floor_run);
    drop(split);

    let startup = Server::startup(&shipped, &scratch.path().join("startup.db"), &lab.url).await;
    println!(
        "\nstart-up (process start to /readyz 200): {:.0} ms",
        startup.as_secs_f64() * 1000.0
    );
    let check = check_thousand_flows(scratch.path());
    println!(
        "ferry check of 1,000 flows: {:.0} ms",
        check.as_secs_f64() * 1000.0
    );
}

/// The floor, this build's sync flow and `baseline`'s, taking turns at the load.
async fn compare(
    floor: &Server,
    sync: &Server,
    baseline: std::ffi::OsString,
    flows: &Path,
    scratch: &Path,
    lab: &Lab,
    held: Duration,
) {
    let store = scratch.join("baseline.db");
    let earlier = Server::spawn(ferry_command(baseline, flows, &store, &lab.url), "ferry");
    let servers = [(floor, "/orders"), (sync, PATH), (&earlier, PATH)];
    let [floor_run, sync_run, earlier_run] =
        alternate(servers, &test_request(), held, COMPARE_ROUNDS, lab).await;
    floor_run.print("floor: forwarding proxy", &floor_run);
    sync_run.print("ferry, sync", &floor_run);
    earlier_run.print("ferry, sync: the baseline binary", &floor_run);
    println!(
        "{:<34} {:>9.3} {:>8} {:>12.3}",
        "this build against the baseline",
        sync_run.per_second() / earlier_run.per_second(),
        "",
        sync_run.cpu_per_request_us() / earlier_run.cpu_per_request_us(),
    );
}

/// A mock lab on loopback: counts the orders it takes, answering `201` at once, or once it
/// opens again when it is held.
struct Lab {
    url: String,
    taken: Arc<AtomicU64>,
    open: tokio::sync::watch::Sender<bool>,
}

impl Lab {
    async fn start() -> Self {
        let taken = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&taken);
        let (open, gate) = tokio::sync::watch::channel(true);
        let router = Router::new().route(
            "/orders",
            post(move |_body: Bytes| {
                let counter = Arc::clone(&counter);
                let mut gate = gate.clone();
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    // Each order its own id, as a lab gives: its request's record gains a key.
                    let order = counter.fetch_add(1, Ordering::Relaxed);
                    (
                        axum::http::StatusCode::CREATED,
                        [("content-type", "application/json")],
                        format!(r#"{{"lab_order_id":"LAB-{order}"}}"#),
                    )
                }
            }),
        );
        Self {
            url: serve(router).await,
            taken,
            open,
        }
    }

    /// Holds every order that comes until [`Lab::release`].
    fn hold(&self) {
        self.open.send_replace(false);
    }

    fn release(&self) {
        self.open.send_replace(true);
    }

    fn count(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Waits until the lab has taken `total` orders; returns how long that took.
    async fn wait_for(&self, total: u64, limit: Duration) -> Duration {
        let started = Instant::now();
        while self.count() < total {
            assert!(
                started.elapsed() < limit,
                "the lab has {} of {total} orders after {limit:?}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        started.elapsed()
    }
}

/// A server under test: a child process on CPU 0.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// The floor: this program again, as a forwarding proxy to the lab.
    fn proxy(lab: &str) -> Self {
        let mut command = on_cpu_zero(std::env::current_exe().unwrap());
        command.env(PROXY_ROLE, lab);
        Self::spawn(command, "proxy")
    }

    /// `ferry serve` with the flows of `flows` on a SQLite store at `store`.
    fn ferry(flows: &Path, store: &Path, lab: &str) -> Self {
        Self::spawn(ferry_command(FERRY, flows, store, lab), "ferry")
    }

    /// How long `ferry serve` takes from process start to `/readyz` answering 200.
    async fn startup(flows: &Path, store: &Path, lab: &str) -> Duration {
        let started = Instant::now();
        let server = Self::spawn(ferry_command(FERRY, flows, store, lab), "ferry");
        let client = reqwest::Client::new();
        loop {
            let ready = client
                .get(format!("{}/readyz", server.url))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Spawns a server that prints `<what> listening on <url>` first.
    fn spawn(mut command: Command, what: &str) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let url = common::support::listening_url(&mut child, &format!("{what} listening on "));
        Self { child, url }
    }

    /// CPU time the process has used so far (user and system).
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_secs_f64(ticks as f64 / 100.0)
    }

    /// The process's resident memory at its peak, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This build's ferry.
const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// `ferry serve` of the binary `ferry`, as the servers under test run.
fn ferry_command(
    ferry: impl AsRef<std::ffi::OsStr>,
    flows: &Path,
    store: &Path,
    lab: &str,
) -> Command {
    let mut command = on_cpu_zero(ferry);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
        .arg(flows)
        .arg("--store")
        .arg(format!("sqlite://{}", store.display()))
        .env("LAB_URL", lab)
        .env("PORTAL_API_KEY", KEY)
        .env("LAB_WEBHOOK_SECRET", KEY)
        .env("RUST_LOG", "warn");
    command
}

/// A command for `program` born on CPU 0 (through `taskset`, which runs it in its own
/// process): its runtime sees one CPU and sizes itself for it, as in a one-CPU container.
/// Pinned after start, it would keep a worker thread per CPU of the machine, all on CPU 0.
fn on_cpu_zero(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", "0"]).arg(program);
    command
}

/// Pins process `pid` to the CPUs in `cpus` (as `taskset` writes them).
fn pin(pid: u32, cpus: &str) {
    let _ = Command::new("taskset")
        .args(["-a", "-c", "-p", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status();
}

/// What one load did to one server.
struct Measured {
    requests: u64,
    /// The orders the lab had when the measured load began (after the warm-up's).
    lab_before: u64,
    held: Duration,
    /// How long, over all its turns, the lab waited for the last order once the load stopped.
    drained: Duration,
    cpu: Duration,
    rss_mib: f64,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.held.as_secs_f64()
    }

    fn cpu_per_request_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests as f64
    }

    fn print(&self, what: &str, floor: &Measured) {
        println!(
            "{what:<34} {:>9.0} {:>8.2} {:>12.1} {:>8.2} {:>9.1}",
            self.per_second(),
            self.per_second() / floor.per_second(),
            self.cpu_per_request_us(),
            self.cpu_per_request_us() / floor.cpu_per_request_us(),
            self.rss_mib
        );
    }
}

/// Holds the load on `server` for `held` after a one-second warm-up (then `before_load`).
async fn measure(
    server: &Server,
    path: &str,
    body: &serde_json::Value,
    held: Duration,
    lab: &Lab,
    before_load: fn(&Lab),
) -> Measured {
    let url = format!("{}{path}", server.url);
    let before = lab.count();
    let warmed = load(&url, body, Duration::from_secs(1)).await;
    // Warm-up deliveries out of the way, so the measured load starts on an empty outbox.
    lab.wait_for(before + warmed, Duration::from_secs(120))
        .await;
    before_load(lab);
    let cpu = server.cpu();
    let lab_before = lab.count();
    let requests = load(&url, body, held).await;
    Measured {
        requests,
        lab_before,
        held,
        drained: Duration::ZERO,
        cpu: server.cpu() - cpu,
        rss_mib: server.peak_rss_mib(),
    }
}

/// Holds the load on each of `servers` in turn, `rounds` times for a share of `held` each,
/// after a one-second warm-up each. A shared machine that slows down for a while slows them
/// alike, so their ratios hold; measured one after the other, the sync flow's ratio moved
/// between 2.6 and 4.3 from run to run. A turn ends when the lab has every order the server
/// answered 2xx (at once for a server that answers after the lab does): the next server
/// starts on a quiet CPU, and a durable flow's turn counts its deliveries, and their CPU, in
/// full.
async fn alternate<const N: usize>(
    servers: [(&Server, &str); N],
    body: &serde_json::Value,
    held: Duration,
    rounds: u32,
    lab: &Lab,
) -> [Measured; N] {
    let urls = servers.map(|(server, path)| format!("{}{path}", server.url));
    for url in &urls {
        let before = lab.count();
        let warmed = load(url, body, Duration::from_secs(1)).await;
        lab.wait_for(before + warmed, DRAIN_LIMIT).await;
    }
    let share = held / rounds;
    let mut runs = servers.map(|_| Measured {
        requests: 0,
        lab_before: 0,
        held: Duration::ZERO,
        drained: Duration::ZERO,
        cpu: Duration::ZERO,
        rss_mib: 0.0,
    });
    for _ in 0..rounds {
        for ((server, _), (url, run)) in servers.iter().zip(urls.iter().zip(&mut runs)) {
            let (cpu, before) = (server.cpu(), lab.count());
            let answered = load(url, body, share).await;
            let drained = lab.wait_for(before + answered, DRAIN_LIMIT).await;
            run.requests += answered;
            run.cpu += server.cpu() - cpu;
            run.held += share;
            run.drained += drained;
        }
    }
    for ((server, _), run) in servers.iter().zip(&mut runs) {
        run.rss_mib = server.peak_rss_mib();
    }
    runs
}

/// Sends from every connection until `held` has passed; returns the requests answered 2xx.
async fn load(url: &str, body: &serde_json::Value, held: Duration) -> u64 {
    let deadline = Instant::now() + held;
    send(url, body, move |_| Instant::now() < deadline).await
}

/// Sends `total` requests from every connection at once; returns those answered 2xx.
async fn burst(base: &str, body: &serde_json::Value, total: u64) -> u64 {
    let url = format!("{base}/api/v1/test-requests");
    send(&url, body, move |n| n < total).await
}

/// Sends requests from [`CONNECTIONS`] connections while `more(n)` holds for the `n`th; each
/// has its own `portal_ref`, so each is a new Test Request.
async fn send(
    url: &str,
    body: &serde_json::Value,
    more: impl Fn(u64) -> bool + Copy + Send + 'static,
) -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let ok = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let text = body.to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONNECTIONS)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (client, url, text) = (client.clone(), url.to_owned(), text.clone());
        let (ok, started) = (Arc::clone(&ok), Arc::clone(&started));
        tasks.push(tokio::spawn(async move {
            loop {
                let n = started.fetch_add(1, Ordering::Relaxed);
                if !more(n) {
                    break;
                }
                let reference = format!("PR-SPEED-{}", NEXT.fetch_add(1, Ordering::Relaxed));
                let body = text.replacen("PR-2026-0001", &reference, 1);
                let response = client
                    .post(&url)
                    .header("x-api-key", KEY)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                if let Ok(response) = response {
                    let good = response.status().is_success();
                    let _ = response.bytes().await;
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    ok.load(Ordering::Relaxed)
}

/// The shipped flows with portal-to-lab delivering synchronously, and the shipped schemas.
fn sync_project(dir: &Path) -> PathBuf {
    let repo = common::support::repo();
    let flows = dir.join("sync/flows");
    std::fs::create_dir_all(&flows).unwrap();
    let schemas = dir.join("sync/schemas");
    std::fs::create_dir_all(&schemas).unwrap();
    for entry in std::fs::read_dir(repo.join("schemas")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, schemas.join(path.file_name().unwrap())).unwrap();
    }
    let shipped = std::fs::read_to_string(repo.join("flows/portal-to-lab.yaml")).unwrap();
    let start = shipped.find("\ndelivery:").unwrap();
    let end = shipped.find("\nreply:").unwrap();
    let sync = format!(
        "{}\ndelivery:\n  mode: sync{}",
        &shipped[..start],
        &shipped[end..]
    );
    // A sync flow keeps no messages to answer a resubmission from: no key to name.
    let key = "    idempotency_key: $.body.portal_ref\n";
    assert!(sync.contains(key));
    let sync = sync.replace(key, "");
    std::fs::write(flows.join("portal-to-lab.yaml"), sync).unwrap();
    flows
}

/// How long `ferry check` takes over 1,000 flows (copies of portal-to-lab).
fn check_thousand_flows(dir: &Path) -> Duration {
    let repo = common::support::repo();
    let flows = dir.join("thousand/flows");
    std::fs::create_dir_all(&flows).unwrap();
    let shipped = std::fs::read_to_string(repo.join("flows/portal-to-lab.yaml")).unwrap();
    for n in 0..1000 {
        let copy = shipped
            .replace("name: portal-to-lab", &format!("name: portal-to-lab-{n}"))
            .replace(PATH, &format!("/api/v1/test-requests-{n}"));
        std::fs::write(flows.join(format!("flow-{n}.yaml")), copy).unwrap();
    }
    let started = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["check", "--schemas"])
        .arg(repo.join("schemas"))
        .arg(&flows)
        .env("PORTAL_API_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "ferry check of 1,000 flows failed");
    started.elapsed()
}

/// The floor: forwards each request's body to the lab and answers with the lab's status.
fn proxy(lab: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let target = format!("{lab}/orders");
        let router = Router::new().route(
            "/orders",
            post(move |body: Bytes| {
                let (client, target) = (client.clone(), target.clone());
                async move {
                    let answer = client
                        .post(&target)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await;
                    match answer {
                        Ok(answer) => {
                            let status = answer.status();
                            (status, answer.bytes().await.unwrap_or_default())
                        }
                        Err(_) => (reqwest::StatusCode::BAD_GATEWAY, Bytes::new()),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!(
            "proxy listening on http://{}",
            listener.local_addr().unwrap()
        );
        // Its handler made into a service once, as ferry's are, not again per request.
        axum::serve(listener, router.with_state::<()>(()))
            .await
            .unwrap();
    });
}

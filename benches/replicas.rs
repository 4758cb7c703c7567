//! Scaling out: Test Requests accepted and delivered per second by 1, 2 and 3 `ferry serve`
//! processes sharing one PostgreSQL store, beside one process on SQLite, in one run.
//!
//! Each cell starts its replicas (the release binary, the shipped flows) on a fresh store,
//! sends `FERRY_BENCH_REQUESTS` Test Requests (default 3000) from 32 clients spread evenly
//! over the replicas, and times how long until every one is accepted (202) and until the mock
//! lab has every order. Needs the PostgreSQL at 127.0.0.1:5432 (`FERRY_BENCH_POSTGRES` names
//! another). Run with `cargo bench --bench replicas`.
#![allow(missing_docs)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use serde_json::json;
use sqlx::Connection;

mod common;

use common::{KEY, serve, submit, test_request};

const CLIENTS: usize = 32;

fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A lab that takes every order, gives each an id of its own (as a lab does: the id becomes
/// a key of the order's correlation record) and counts them.
async fn lab() -> (String, Arc<AtomicUsize>) {
    let orders = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&orders);
    let router = Router::new().fallback(move || {
        let order = counted.fetch_add(1, Ordering::Relaxed);
        async move {
            (
                axum::http::StatusCode::CREATED,
                axum::Json(json!({"lab_order_id": format!("LAB-{order}")})),
            )
        }
    });
    (serve(router).await, orders)
}

/// `ferry serve` on `store`, delivering to `lab`; returns the process and its URL.
fn replica(store: &str, lab: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            store,
            "--flows",
            "flows",
        ])
        .current_dir(root())
        .env("LAB_URL", lab)
        .env("PORTAL_URL", lab)
        .env("PORTAL_API_KEY", KEY)
        .env("LAB_WEBHOOK_SECRET", KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = common::support::listening_url(&mut child, "ferry listening on ");
    (child, url)
}

/// CPU seconds (user and system) the processes matching `which` have used so far, by
/// `/proc/PID/stat` (Linux; 100 ticks a second).
fn cpu_seconds(which: impl Fn(u32, &str) -> bool) -> f64 {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !which(pid, &stat[open + 1..close]) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        ticks += fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    }
    ticks as f64 / 100.0
}

struct Cell {
    accepted: Duration,
    delivered: Duration,
}

/// Sends `requests` Test Requests over `urls` and waits until the lab has them all.
async fn load(urls: &[String], requests: usize, orders: &AtomicUsize, run: &str) -> Cell {
    let http = reqwest::Client::new();
    let template = test_request();
    let next = Arc::new(AtomicUsize::new(0));
    let before = orders.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (http, urls, mut body, next, run) = (
            http.clone(),
            urls.to_vec(),
            template.clone(),
            Arc::clone(&next),
            run.to_owned(),
        );
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return;
                }
                body["portal_ref"] = json!(format!("PR-{run}-{i}"));
                let url = format!("{}/api/v1/test-requests", urls[i % urls.len()]);
                submit(&http, &url, &body).await;
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let accepted = started.elapsed();
    while orders.load(Ordering::Relaxed) - before < requests {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the lab did not get every order"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Cell {
        accepted,
        delivered: started.elapsed(),
    }
}

fn main() {
    let requests: usize = std::env::var("FERRY_BENCH_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let postgres = std::env::var("FERRY_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (lab, orders) = lab().await;
        let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let cells: [(&str, usize); 4] =
            [("SQLite", 1), ("PostgreSQL", 1), ("PostgreSQL", 2), ("PostgreSQL", 3)];
        let mut baseline = None;
        for (run, (backend, n)) in cells.into_iter().enumerate() {
            let schema = format!("ferry_bench_{}_{run}", std::process::id());
            let store = if backend == "SQLite" {
                format!("sqlite://{}/bench.db", scratch.path().display())
            } else {
                let mut admin = sqlx::PgConnection::connect(&postgres).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                format!("{postgres}?options=-c%20search_path%3D{schema}")
            };
            let mut replicas: Vec<(Child, String)> = (0..n).map(|_| replica(&store, &lab)).collect();
            let urls: Vec<String> = replicas.iter().map(|(_, url)| url.clone()).collect();
            load(&urls, 200, &orders, &format!("W{run}")).await; // warm-up
            let pids: Vec<u32> = replicas.iter().map(|(child, _)| child.id()).collect();
            let me = std::process::id();
            let cpu = || {
                [
                    cpu_seconds(|pid, _| pids.contains(&pid)),
                    cpu_seconds(|_, name| name == "postgres"),
                    cpu_seconds(|pid, _| pid == me),
                ]
            };
            let cpu_before = cpu();
            let cell = load(&urls, requests, &orders, &format!("R{run}")).await;
            let cpu_after = cpu();
            let [ferry_cpu, postgres_cpu, load_cpu] =
                std::array::from_fn(|i| cpu_after[i] - cpu_before[i]);
            let accepted = requests as f64 / cell.accepted.as_secs_f64();
            let delivered = requests as f64 / cell.delivered.as_secs_f64();
            let (base_accepted, base_delivered) = *baseline.get_or_insert((accepted, delivered));
            let wall = cell.delivered.as_secs_f64();
            println!(
                "{backend:<10} x{n}: accepted {accepted:>6.0}/s ({:.2}x)  delivered {delivered:>6.0}/s ({:.2}x)  \
                 CPU busy {:.0}% of 2 cores: ferry {ferry_cpu:.1} s, PostgreSQL {postgres_cpu:.1} s, load and lab {load_cpu:.1} s in {wall:.1} s",
                accepted / base_accepted,
                delivered / base_delivered,
                (ferry_cpu + postgres_cpu + load_cpu) / wall / 2.0 * 100.0,
            );
            for (child, _) in &mut replicas {
                let _ = child.kill();
                let _ = child.wait();
            }
            if backend != "SQLite" {
                let mut admin = sqlx::PgConnection::connect(&postgres).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                    .execute(&mut admin)
                    .await
                    .unwrap();
            }
        }
        println!("(ratios against SQLite x1 in this run; {requests} requests, {CLIENTS} clients)");
    });
}

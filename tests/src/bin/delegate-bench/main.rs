//! `delegate-bench`: pick-up latency, throughput and idle memory of the real binaries.
//!
//! Prints numbers; asserts nothing. Build in release first:
//! `cargo build --release --workspace --bins && target/release/delegate-bench`.
//! Everything runs on 127.0.0.1 with a bounded number of tasks.
//!
//! `delegate-bench fleet --delegates N` measures the manager alone against N simulated
//! delegates instead (see `fleet.rs` beside this file).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod fleet;

use anyhow::{Context, Result, bail};
use delegate_protocol::{TaskState, TaskView};
use delegate_tests::docker::TEST_IMAGE;
use delegate_tests::{Agent, AgentOptions, Manager, wait_for};
use nix::sys::signal::Signal;
use serde_json::json;

const LATENCY_TASKS: usize = 1000;
const THROUGHPUT_TASKS: usize = 3000;
const THROUGHPUT_CONCURRENCY: u32 = 16;
const IDLE_SECS: u64 = 60;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// `delegate-bench fleet`: one manager, N simulated delegates (protocol v1, loopback).
#[derive(clap::Parser, Debug)]
#[command(name = "delegate-bench fleet")]
struct FleetArgs {
    /// Simulated delegates, each long-polling `acquire?wait=30` and heartbeating.
    #[arg(long, default_value_t = 1000)]
    delegates: usize,
    /// Tasks submitted one at a time for the pick-up latency.
    #[arg(long, default_value_t = 200)]
    tasks: usize,
    /// Tasks submitted at once for the lease rate (0: skip).
    #[arg(long, default_value_t = 1000)]
    burst: usize,
    /// Seconds the connected fleet idles before memory and CPU are read.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Also have one delegate write a log of this many bytes, then read it whole while the
    /// fleet heartbeats (e.g. 1073741824 for 1 GiB).
    #[arg(long, default_value_t = 0)]
    log_bytes: u64,
    /// Give up after this many seconds in all.
    #[arg(long, default_value_t = 900)]
    limit_secs: u64,
    /// Two manager nodes sharing a PostgreSQL started for the run (Debian's postgresql
    /// binaries) instead of one node on SQLite; delegates alternate between the nodes.
    #[arg(long)]
    postgres: bool,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("fleet") {
        use clap::Parser;
        let a = FleetArgs::parse_from(&args[1..]);
        return fleet::run(&fleet::FleetOptions {
            delegates: a.delegates,
            tasks: a.tasks,
            burst: a.burst,
            idle_secs: a.idle_secs,
            log_bytes: a.log_bytes,
            limit: Duration::from_secs(a.limit_secs),
            postgres: a.postgres,
        });
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let tmp = tempfile::Builder::new()
        .prefix("delegate-bench-")
        .tempdir()?;
    let manager = Manager::start(tmp.path())?;
    let token = manager.token("bench")?;
    println!(
        "delegate-bench: manager {} ({} cores)",
        manager.url(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    // 1. Pick-up latency: one task at a time, submit → the script's first instruction.
    let mut agent = Agent::start(
        tmp.path(),
        &manager.url(),
        &token,
        &AgentOptions {
            name: "bench-latency".into(),
            concurrency: THROUGHPUT_CONCURRENCY,
            log_filter: "warn",
            ..AgentOptions::default()
        },
    )?;
    wait_for(Duration::from_secs(20), "the agent to connect", || {
        manager
            .delegates()
            .ok()?
            .iter()
            .any(|d| d.connected)
            .then_some(())
    })?;
    let n = LATENCY_TASKS / scale;
    let mut observed = Vec::with_capacity(n);
    let mut recorded = Vec::with_capacity(n);
    let mut submit_rtt = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let t0 = now_ns();
        let id = manager.submit(&json!({"kind": "shell", "spec": {"script": "date +%s%N"}}))?;
        let t1 = now_ns();
        // follow=true returns when the task is finished: no client-side polling.
        let log = manager.get(&format!("/api/v1/tasks/{id}/logs?follow=true"))?;
        let started: u128 = String::from_utf8_lossy(&log)
            .trim()
            .parse()
            .with_context(|| format!("task {id} printed {log:?}"))?;
        if i < 20 {
            continue; // warm-up
        }
        observed.push((started.saturating_sub(t0)) as f64 / 1e6);
        submit_rtt.push((t1 - t0) as f64 / 1e6);
        let t = manager.task(&id)?;
        if let (Some(s), c) = (t.started_at, t.created_at) {
            recorded.push((s - c) as f64);
        }
    }
    observed.sort_by(f64::total_cmp);
    recorded.sort_by(f64::total_cmp);
    submit_rtt.sort_by(f64::total_cmp);
    println!(
        "submit request round trip (part of the above): p50 {:.2} ms, p99 {:.2} ms",
        percentile(&submit_rtt, 0.5),
        percentile(&submit_rtt, 0.99)
    );
    println!(
        "pick-up latency, submit → script running, {} tasks: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        observed.len(),
        percentile(&observed, 0.5),
        percentile(&observed, 0.99),
        percentile(&observed, 1.0)
    );
    println!(
        "pick-up latency, manager's created_at → started_at (1 ms resolution): p50 {:.0} ms, p99 {:.0} ms",
        percentile(&recorded, 0.5),
        percentile(&recorded, 0.99)
    );
    agent.signal(Signal::SIGTERM);
    agent.wait_exit(Duration::from_secs(30))?;

    // 2. Throughput: queue N trivial tasks with no agent, then let one agent at
    //    concurrency 16 work through them. Timed on the manager's clock.
    let n = THROUGHPUT_TASKS / scale;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(manager.submit(&json!({"kind": "shell", "spec": {"script": "true"}}))?);
    }
    let wall = Instant::now();
    let _agent = Agent::start(
        tmp.path(),
        &manager.url(),
        &token,
        &AgentOptions {
            name: "bench-throughput".into(),
            concurrency: THROUGHPUT_CONCURRENCY,
            log_filter: "warn",
            ..AgentOptions::default()
        },
    )?;
    let last = ids.last().cloned().unwrap_or_default();
    manager.wait_done(&last, Duration::from_secs(600))?;
    let mut views: Vec<TaskView> = Vec::with_capacity(n);
    for id in &ids {
        views.push(manager.wait_done(id, Duration::from_secs(120))?);
    }
    let wall = wall.elapsed();
    let ok = views
        .iter()
        .filter(|v| v.state == TaskState::Succeeded)
        .count();
    if ok != n {
        bail!("only {ok} of {n} tasks succeeded");
    }
    let first = views
        .iter()
        .filter_map(|v| v.assigned_at)
        .min()
        .unwrap_or(0);
    let end = views
        .iter()
        .filter_map(|v| v.finished_at)
        .max()
        .unwrap_or(0);
    let span = (end - first).max(1) as f64 / 1000.0;
    println!(
        "throughput, {n} trivial shell tasks at concurrency {THROUGHPUT_CONCURRENCY}: {:.0} tasks/s (first lease → last result {:.2} s; wall incl. agent start {:.2} s)",
        n as f64 / span,
        span,
        wall.as_secs_f64()
    );

    // 3. Idle memory and CPU: a fresh agent connected to the manager, doing nothing.
    let idle = Agent::start(
        tmp.path(),
        &manager.url(),
        &token,
        &AgentOptions {
            name: "bench-idle".into(),
            log_filter: "warn",
            ..AgentOptions::default()
        },
    )?;
    let secs = if quick { 5 } else { IDLE_SECS };
    std::thread::sleep(Duration::from_secs(2));
    let cpu0 = idle.cpu_ticks()?;
    std::thread::sleep(Duration::from_secs(secs));
    let cpu = idle.cpu_ticks()? - cpu0;
    println!(
        "idle agent after {secs} s: RSS {:.1} MiB, CPU {} ticks ({:.3} % of a core)",
        idle.rss_kib()? as f64 / 1024.0,
        cpu,
        cpu as f64 / secs as f64
    );
    drop(idle);

    // 4. Docker task overhead, when a test engine is given (scripts/test's set-up).
    match delegate_tests::docker::test_socket() {
        Ok(sock) => docker_overhead(&manager, &token, tmp.path(), &sock, 50 / scale.min(5))?,
        Err(_) => println!(
            "docker overhead: skipped (set DELEGATE_TEST_DOCKER_SOCKET to a dockerd with {TEST_IMAGE})"
        ),
    }
    Ok(())
}

/// Submit → container started, and container exit → result at the manager, from the
/// engine's own StartedAt/FinishedAt and the manager's timestamps.
fn docker_overhead(
    manager: &Manager,
    token: &str,
    root: &std::path::Path,
    sock: &std::path::Path,
    n: usize,
) -> Result<()> {
    let agent = Agent::start(
        root,
        &manager.url(),
        token,
        &AgentOptions {
            name: "bench-docker".into(),
            // The throughput agent is still connected; route docker tasks here only.
            tags: vec!["bench-docker".into()],
            extra: delegate_tests::docker::agent_config(sock),
            log_filter: "warn,delegate=info",
            ..AgentOptions::default()
        },
    )?;
    agent.wait_log("offering the docker target", Duration::from_secs(20))?;
    let (mut to_start, mut to_result) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let id = manager.submit(&json!({
            "kind": "docker",
            "spec": {"image": TEST_IMAGE, "pull": "never", "network_mode": "none",
                     "command": ["true"], "keep": true},
            "selectors": ["bench-docker"],
        }))?;
        let t = manager.wait_done(&id, Duration::from_secs(60))?;
        if t.state != TaskState::Succeeded {
            bail!("docker task {id} ended {:?}: {:?}", t.state, t.message);
        }
        let containers = delegate_tests::docker::task_containers(sock, &id)?;
        let c = containers.first().context("kept container")?;
        let times = delegate_tests::docker::cli(
            sock,
            &[
                "inspect",
                "-f",
                "{{.State.StartedAt}} {{.State.FinishedAt}}",
                c,
            ],
        )?;
        let mut it = times
            .split_whitespace()
            .map(delegate_tests::docker::rfc3339_millis);
        let (Some(Some(started)), Some(Some(finished))) = (it.next(), it.next()) else {
            bail!("cannot read the container's times from {times:?}");
        };
        to_start.push((started - t.created_at) as f64);
        to_result.push((t.finished_at.unwrap_or(finished) - finished) as f64);
        delegate_tests::docker::cli(sock, &["rm", "-f", c])?;
    }
    to_start.sort_by(f64::total_cmp);
    to_result.sort_by(f64::total_cmp);
    println!(
        "docker task overhead, {n} tasks: submit → container started p50 {:.0} ms, p90 {:.0} ms; container exit → result at the manager p50 {:.0} ms, p90 {:.0} ms",
        percentile(&to_start, 0.5),
        percentile(&to_start, 0.9),
        percentile(&to_result, 0.5),
        percentile(&to_result, 0.9)
    );
    Ok(())
}

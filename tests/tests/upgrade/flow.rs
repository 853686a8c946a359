//! The whole upgrade against real processes: a private dbus-daemon as the system bus, a
//! real manager, the real agent at two versions under a supervisor standing in for
//! systemd, and the real upgrader — including rollback, a kill at every step and two
//! upgraders at once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use delegate_protocol::TaskState;
use delegate_tests::prereq::Missing;
use delegate_tests::upgrade::{
    DBus, Monitor, Run, Supervised, World, agent_v2, fake_binary, require_dbus, write_executable,
};
use delegate_tests::{Manager, bin, require};

const RUN_LIMIT: Duration = Duration::from_secs(180);

/// A host running the workspace's agent (0.1.0) under the supervisor, registered with a
/// real manager, with the private bus as its system bus.
struct Host {
    // Drop order: agent first, then the manager and the bus.
    sup: Supervised,
    w: World,
    manager: Manager,
    _bus: DBus,
    _bus_dir: tempfile::TempDir,
    v1: String,
}

fn v1_version() -> String {
    let out = std::process::Command::new(bin("delegate").expect("delegate built"))
        .arg("version")
        .output()
        .expect("delegate version");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The host of one test, or the tool it lacks (`dbus`): take it with `require!`.
fn host() -> Result<Host, Missing> {
    host_with("")
}

/// [`host`] with `agent_extra` appended to the agent's delegate.toml.
fn host_with(agent_extra: &str) -> Result<Host, Missing> {
    require_dbus()?;
    let bus_dir = tempfile::tempdir().expect("tempdir");
    let bus = DBus::start(bus_dir.path()).expect("dbus-daemon");
    let w = World::new(&bus.address).expect("world");
    let manager = Manager::start(&w.dir).expect("manager");
    let token = manager.token("upgrade").expect("token");
    let v1 = v1_version();
    w.install_initial(&bin("delegate").expect("delegate"), &v1)
        .expect("install v1");
    let cfg = w
        .agent_config(&manager.url(), &token)
        .expect("agent config");
    if !agent_extra.is_empty() {
        let mut text = std::fs::read_to_string(&cfg).expect("read agent config");
        text.push_str(agent_extra);
        std::fs::write(&cfg, text).expect("write agent config");
    }
    let sup = w.start_supervisor(&cfg).expect("supervisor");
    w.wait_healthy(&v1, Duration::from_secs(60))
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\nagent log:\n{}\nmanager log:\n{}",
                tail(&sup.log_text(), 80),
                tail(&manager.log_text(), 40)
            )
        });
    Ok(Host {
        sup,
        w,
        manager,
        _bus: bus,
        _bus_dir: bus_dir,
        v1,
    })
}

impl Host {
    fn publish_v2(&self) {
        self.w
            .publish(&agent_v2().expect("agent 0.2.0"), None, "1h")
            .expect("publish 0.2.0");
    }

    fn generation(&self) -> u64 {
        self.w
            .supervisor_state
            .exists()
            .then(|| std::fs::read(&self.w.supervisor_state).ok())
            .flatten()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["generation"].as_u64())
            .unwrap_or(0)
    }

    /// The run ended in `unhealthy` (exit 3): it rolled back.
    fn rolled_back(&self, r: &Run) {
        assert_eq!(
            r.error_code().as_deref(),
            Some("unhealthy"),
            "{r:#?}\n{}",
            self.context()
        );
        assert_eq!(r.code, Some(3), "{r:#?}");
    }

    fn context(&self) -> String {
        format!("agent log (tail):\n{}", tail(&self.sup.log_text(), 60))
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn full_upgrade_drains_a_running_task_then_swaps_and_rolls_back_by_hand() {
    let h = require!(host());
    h.publish_v2();
    let task = h
        .manager
        .submit_shell("sleep 4; echo finished-before-swap", 120, 0)
        .expect("submit");
    h.manager
        .wait_state(&task, &[TaskState::Running], Duration::from_secs(30))
        .expect("task running");

    let start = Instant::now();
    let r = h.w.upgrader(&["run"], None, RUN_LIMIT).expect("run");
    let took = start.elapsed();
    assert_eq!(r.code, Some(0), "{r:#?}\n{}", h.context());
    assert!(
        r.stdout.contains(&format!("upgraded {} → 0.2.0", h.v1)),
        "{r:#?}"
    );
    for n in 1..=7 {
        assert!(
            r.stderr.contains(&format!("step {n}:")),
            "step {n} not logged: {r:#?}"
        );
    }
    assert!(r.stderr.contains("step 4: agent drained"), "{r:#?}");
    eprintln!("upgrade with a 4 s task in flight took {took:?}");

    // The task ran to its end on the old agent, once, before the swap.
    let t = h
        .manager
        .wait_done(&task, Duration::from_secs(30))
        .expect("done");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.attempt, 1, "the task was retried: {t:?}");
    let logs = h.manager.logs(&task).expect("logs");
    assert!(String::from_utf8_lossy(&logs).contains("finished-before-swap"));

    let status =
        h.w.wait_healthy("0.2.0", Duration::from_secs(30))
            .expect("0.2.0 healthy");
    assert!(status.contains("delegate id: d"), "{status}");
    assert_eq!(h.w.current().as_deref(), Some("0.2.0"));
    let prev = std::fs::read_link(h.w.root.join("previous")).expect("previous");
    assert!(prev.ends_with(&h.v1), "{prev:?}");

    // The new agent takes tasks.
    let after = h.manager.submit_shell("echo after", 60, 0).expect("submit");
    let t = h
        .manager
        .wait_done(&after, Duration::from_secs(30))
        .expect("done");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");

    let s = h.w.upgrader(&["status"], None, RUN_LIMIT).expect("status");
    assert!(s.stdout.contains("current:     0.2.0"), "{s:#?}");
    assert!(
        s.stdout.contains("last check:") && s.stdout.contains("installed"),
        "{s:#?}"
    );

    // A second run has nothing to do.
    let r = h.w.upgrader(&["run"], None, RUN_LIMIT).expect("run");
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.starts_with("up-to-date"), "{r:#?}");

    // `rollback` goes back to the previous version and skips the abandoned one.
    let r =
        h.w.upgrader(&["rollback"], None, RUN_LIMIT)
            .expect("rollback");
    assert_eq!(r.code, Some(0), "{r:#?}\n{}", h.context());
    h.w.wait_healthy(&h.v1, Duration::from_secs(30))
        .expect("v1 healthy again");
    let state = h.w.state().expect("state");
    assert_eq!(state["skip"], serde_json::json!(["0.2.0"]), "{state}");
}

/// `upgrade_mode = "handover"` with a docker task running: the upgrade does not wait for
/// the container (the task is still running when the upgrade has finished), the new agent
/// re-attaches to it, and its log arrives once, in order, with the real exit code, on the
/// first attempt.
#[test]
fn a_handover_upgrade_leaves_a_docker_task_running_and_the_new_agent_adopts_it() {
    let socket = require!(delegate_tests::docker::test_socket());
    let h = require!(host_with(&delegate_tests::docker::agent_config(&socket)));
    h.publish_v2();
    h.w.edit_config("upgrade_mode = \"drain\"", "upgrade_mode = \"handover\"")
        .expect("handover mode");
    let ticks = 30;
    let task = h
        .manager
        .submit(&serde_json::json!({
            "kind": "docker",
            "spec": {
                "image": delegate_tests::docker::TEST_IMAGE,
                "pull": "never",
                "network_mode": "none",
                "command": ["sh", "-c", format!("i=1; while [ $i -le {ticks} ]; do echo tick $i; i=$((i+1)); sleep 1; done; exit 7")],
            },
            "timeout_secs": 300,
            "retries": 0,
        }))
        .expect("submit");
    delegate_tests::wait_for(
        Duration::from_secs(60),
        "the task's first ticks at the manager",
        || {
            let log = h.manager.logs(&task).ok()?;
            String::from_utf8_lossy(&log)
                .contains("tick 2\n")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", h.context()));

    let start = Instant::now();
    let r = h.w.upgrader(&["run"], None, RUN_LIMIT).expect("run");
    let took = start.elapsed();
    assert_eq!(r.code, Some(0), "{r:#?}\n{}", h.context());
    assert!(r.stderr.contains("step 4: agent handed over"), "{r:#?}");
    eprintln!("handover upgrade with a docker task in flight took {took:?}");
    // Not waited for: the container still runs, now under 0.2.0.
    let mid = h.manager.task(&task).expect("task");
    assert_eq!(mid.state, TaskState::Running, "{mid:?}\n{}", h.context());
    assert!(
        !String::from_utf8_lossy(&h.manager.logs(&task).expect("logs"))
            .contains(&format!("tick {ticks}\n")),
        "the task ended before the upgrade did: it was waited for"
    );
    h.w.wait_healthy("0.2.0", Duration::from_secs(30))
        .expect("0.2.0 healthy");

    let t = h
        .manager
        .wait_done(&task, Duration::from_secs(120))
        .expect("done");
    let log = String::from_utf8_lossy(&h.manager.logs(&task).expect("logs")).into_owned();
    let expected: String = (1..=ticks).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(
        log,
        expected,
        "the log is not every line once, in order\n{}",
        h.context()
    );
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert_eq!(t.exit_code, Some(7), "{t:?}");
    assert_eq!(t.attempt, 1, "the task was retried: {t:?}");
    assert!(
        h.sup
            .log_text()
            .contains("re-attaching to the container of a task"),
        "{}",
        h.context()
    );
    let left = delegate_tests::docker::task_containers(&socket, &task).expect("docker ps");
    delegate_tests::wait_for(
        Duration::from_secs(20),
        "the container to be removed",
        || {
            delegate_tests::docker::task_containers(&socket, &task)
                .ok()
                .filter(|c| c.is_empty())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: {left:?}"));
}

#[test]
fn a_release_that_cannot_start_is_rolled_back_and_skipped() {
    let h = require!(host());
    let broken = fake_binary(&h.w.dir.join("bin"), "0.3.0").expect("fake");
    h.w.publish(&broken, None, "1h").expect("publish");
    let start = Instant::now();
    let r = h.w.upgrader(&["run"], None, RUN_LIMIT).expect("run");
    eprintln!("failed upgrade + rollback took {:?}", start.elapsed());
    h.rolled_back(&r);
    assert_eq!(h.w.current().as_deref(), Some(h.v1.as_str()));
    h.w.wait_healthy(&h.v1, Duration::from_secs(30))
        .expect("previous version running again");
    let state = h.w.state().expect("state");
    assert_eq!(state["skip"], serde_json::json!(["0.3.0"]), "{state}");
    assert!(state["in_progress"].is_null(), "{state}");
    assert!(
        !h.w.root.join("versions/0.3.0").exists(),
        "broken version kept"
    );
    // The next timer run leaves it out, with a notice and without failing.
    let r = h.w.upgrader(&["run"], None, RUN_LIMIT).expect("run");
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.starts_with("skipped: "), "{r:#?}");
    assert_eq!(h.w.current().as_deref(), Some(h.v1.as_str()));
}

#[test]
fn operator_cli_drains_and_resumes_over_dbus() {
    let h = require!(host());
    let delegate = bin("delegate").expect("delegate");
    let cli = |args: &[&str]| {
        std::process::Command::new(&delegate)
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &h.w.bus_address)
            .output()
            .expect("delegate cli")
    };
    // Watch PropertiesChanged on the bus while draining and resuming.
    let mut monitor = Monitor::start(
        &h.w.bus_address,
        "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',path='/dev/delegate/Agent1'",
    )
    .expect("dbus-monitor");
    let out = cli(&["drain", "--wait", "--timeout", "20s"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        h.w.agent_status()
            .expect("status")
            .contains("state:       drained")
    );
    let out = cli(&["resume"]);
    assert!(out.status.success(), "{out:?}");
    h.w.wait_healthy(&h.v1, Duration::from_secs(10))
        .expect("running");
    monitor
        .wait_for(
            &["\"State\"", "\"drained\"", "\"running\""],
            Duration::from_secs(10),
        )
        .expect("PropertiesChanged for drained and running");
    // Without an agent on the bus the CLI says so.
    let out = std::process::Command::new(&delegate)
        .arg("status")
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
        .output()
        .expect("status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the system bus"));
}

/// Kill the upgrader at `fault`; `current` must point at a complete version, and a
/// second run must converge on 0.2.0, healthy.
fn killed_at(fault: &str) {
    let h = require!(host());
    h.publish_v2();
    let r = h.w.upgrader(&["run"], Some(fault), RUN_LIMIT).expect("run");
    assert_eq!(r.code, None, "expected an abort at {fault}: {r:#?}");
    assert!(
        r.stderr.contains(&format!("fault point {fault} reached")),
        "{r:#?}"
    );
    let current = h.w.current().expect("current link");
    assert!(
        h.w.is_complete(&current),
        "current → {current} is not complete"
    );

    let r = h.w.upgrader(&["run"], None, RUN_LIMIT).expect("second run");
    assert_eq!(r.code, Some(0), "{r:#?}\n{}", h.context());
    assert_eq!(h.w.current().as_deref(), Some("0.2.0"), "{r:#?}");
    h.w.wait_healthy("0.2.0", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", h.context()));
    let state = h.w.state().expect("state");
    assert!(state["in_progress"].is_null(), "{state}");
    let versions: Vec<PathBuf> = std::fs::read_dir(h.w.root.join("versions"))
        .expect("ls")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(versions.len() <= 2, "{versions:?}");
}

#[test]
fn killed_after_step_1_then_converges() {
    killed_at("after-step-1");
}
#[test]
fn killed_after_step_2_then_converges() {
    killed_at("after-step-2");
}
#[test]
fn killed_after_step_3_then_converges() {
    killed_at("after-step-3");
}
#[test]
fn killed_after_step_4_then_converges() {
    killed_at("after-step-4");
}
#[test]
fn killed_between_swap_and_restart_then_converges() {
    killed_at("after-swap");
}
#[test]
fn killed_after_step_5_then_converges() {
    killed_at("after-step-5");
}
#[test]
fn killed_after_step_6_then_converges() {
    killed_at("after-step-6");
}
#[test]
fn killed_after_step_7_then_converges() {
    killed_at("after-step-7");
}

#[test]
fn two_upgraders_at_once_upgrade_once() {
    let h = require!(host());
    h.publish_v2();
    let gen_before = h.generation();
    let a = h.w.spawn_upgrader(&["run"]).expect("first");
    let b = h.w.spawn_upgrader(&["run"]).expect("second");
    let wait = |c: std::process::Child| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(c.wait_with_output());
        });
        rx.recv_timeout(RUN_LIMIT)
            .expect("upgrader finished in time")
            .expect("output")
    };
    let (oa, ob) = (wait(a), wait(b));
    let outs: Vec<String> = [&oa, &ob]
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    assert!(oa.status.success() && ob.status.success(), "{oa:?}\n{ob:?}");
    assert_eq!(
        outs.iter().filter(|o| o.starts_with("installed")).count(),
        1,
        "{outs:?}"
    );
    assert_eq!(
        outs.iter().filter(|o| o.starts_with("up-to-date")).count(),
        1,
        "{outs:?}"
    );
    assert_eq!(
        h.generation(),
        gen_before + 1,
        "the agent restarted more than once"
    );
    h.w.wait_healthy("0.2.0", Duration::from_secs(30))
        .expect("healthy");
}

#[test]
fn offline_install_of_a_signed_archive() {
    let h = require!(host());
    h.publish_v2();
    let archive = h.w.releases.join(h.w.artifact_rel().expect("rel"));
    let sig = format!("{}.minisig", archive.display());
    // A signature over other bytes is refused before anything changes.
    let other = h.w.dir.join("other.tar.gz");
    std::fs::write(&other, b"not the archive").expect("write");
    let arch = archive.display().to_string();
    let r =
        h.w.upgrader(
            &["install", &other.display().to_string(), "--signature", &sig],
            None,
            RUN_LIMIT,
        )
        .expect("install");
    assert_eq!(r.error_code().as_deref(), Some("bad-signature"), "{r:#?}");
    assert_eq!(h.w.current().as_deref(), Some(h.v1.as_str()));

    let r =
        h.w.upgrader(&["install", &arch, "--signature", &sig], None, RUN_LIMIT)
            .expect("install");
    assert_eq!(r.code, Some(0), "{r:#?}\n{}", h.context());
    assert!(r.stdout.starts_with("installed"), "{r:#?}");
    h.w.wait_healthy("0.2.0", Duration::from_secs(30))
        .expect("0.2.0 healthy");
}

/// A rollback whose restart failed once left `in_progress` behind, and the
/// next run guessed from the `current` link (already back on the old version) that the
/// upgrade had "not swapped yet": it only resumed and cleared the state, so the abandoned
/// release kept running. The phase is now recorded; the next run finishes the rollback.
#[test]
fn a_restart_that_fails_during_rollback_is_finished_by_the_next_run() {
    let h = require!(host());
    // Starts and keeps running, but never comes onto the bus: the gate fails.
    let hang = h.w.dir.join("bin").join("hang-0.3.0");
    std::fs::create_dir_all(h.w.dir.join("bin")).expect("bin dir");
    write_executable(
        &hang,
        b"#!/bin/sh\nif [ \"$1\" = version ]; then echo 0.3.0; exit 0; fi\nexec sleep 600\n",
    )
    .expect("fake");
    h.w.publish(&hang, None, "1h").expect("publish");
    h.w.edit_config("health_timeout = \"30s\"", "health_timeout = \"5s\"")
        .expect("cfg");

    let r =
        h.w.upgrader(&["run"], Some("rollback-restart-fails"), RUN_LIMIT)
            .expect("run");
    assert_eq!(
        r.error_code().as_deref(),
        Some("rollback-restart-failed"),
        "{r:#?}\n{}",
        h.context()
    );
    let state = h.w.state().expect("state");
    assert_eq!(
        state["in_progress"]["phase"]["rolling_back"]["back_to"].as_str(),
        Some(h.v1.as_str()),
        "{state}"
    );
    assert_eq!(h.w.current().as_deref(), Some(h.v1.as_str()));

    let r = h.w.upgrader(&["run"], None, RUN_LIMIT).expect("second run");
    h.rolled_back(&r);
    h.w.wait_healthy(&h.v1, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", h.context()));
    let state = h.w.state().expect("state");
    assert!(state["in_progress"].is_null(), "{state}");
    assert_eq!(state["skip"], serde_json::json!(["0.3.0"]), "{state}");
}

/// A manual `rollback` once recorded nothing, so killed between its steps it
/// left `current` on the old version with the new one still running, and the next run
/// refused the (now skipped) new version and changed nothing. It now records its phase.
fn manual_rollback_killed_at(fault: &str) {
    let h = require!(host());
    h.publish_v2();
    let r = h.w.upgrader(&["run"], None, RUN_LIMIT).expect("run");
    assert_eq!(r.code, Some(0), "{r:#?}\n{}", h.context());
    h.w.wait_healthy("0.2.0", Duration::from_secs(30))
        .expect("0.2.0 healthy");

    let r =
        h.w.upgrader(&["rollback"], Some(fault), RUN_LIMIT)
            .expect("rollback");
    assert_eq!(r.code, None, "expected an abort at {fault}: {r:#?}");
    let state = h.w.state().expect("state");
    assert_eq!(
        state["in_progress"]["phase"]["rolling_back"]["manual"].as_bool(),
        Some(true),
        "{state}"
    );
    let s = h.w.upgrader(&["status"], None, RUN_LIMIT).expect("status");
    assert!(
        s.stdout
            .contains(&format!("rolling back 0.2.0 → {} (the next run", h.v1)),
        "{s:#?}"
    );

    let r = h.w.upgrader(&["run"], None, RUN_LIMIT).expect("next run");
    assert_eq!(r.code, Some(0), "{r:#?}\n{}", h.context());
    assert!(r.stdout.starts_with("rolled-back"), "{r:#?}");
    h.w.wait_healthy(&h.v1, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", h.context()));
    assert_eq!(h.w.current().as_deref(), Some(h.v1.as_str()));
    let state = h.w.state().expect("state");
    assert!(state["in_progress"].is_null(), "{state}");
    assert_eq!(state["skip"], serde_json::json!(["0.2.0"]), "{state}");
}

#[test]
fn a_manual_rollback_killed_after_the_drain_is_finished_by_the_next_run() {
    manual_rollback_killed_at("rollback-after-drain");
}

#[test]
fn a_manual_rollback_killed_after_the_links_is_finished_by_the_next_run() {
    manual_rollback_killed_at("rollback-after-links");
}

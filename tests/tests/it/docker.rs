//! Docker tasks against a real dockerd: output and exit codes, timeout and cancel, policy
//! refusals, the engine going away, and containers adopted after `kill -9` of the agent.
//!
//! They need the engine `scripts/test` starts (`DELEGATE_TEST_DOCKER_SOCKET`); without it
//! they fail with a message saying so.

use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::docker::{
    PrivateEngine, TEST_IMAGE, agent_config, cli, task_containers, test_socket,
};
use delegate_tests::{Agent, AgentOptions, require, wait_for};
use serde_json::{Value, json};

use crate::util::{LONG, World};

fn docker_agent(w: &World, name: &str, socket: &std::path::Path, extra: &str) -> Agent {
    let a = w.agent(AgentOptions {
        name: name.into(),
        extra: format!("{}{extra}", agent_config(socket)),
        ..AgentOptions::default()
    });
    a.wait_log("offering the docker target", Duration::from_secs(20))
        .expect("the agent sees the engine");
    // The engine probe comes before registration; tests read the delegate list.
    a.wait_log("registered with the manager", Duration::from_secs(20))
        .expect("the agent registers");
    a
}

/// A docker task on the test image with no network.
fn task(script: &str, timeout_secs: u64, extra: Value) -> Value {
    let mut spec = json!({
        "image": TEST_IMAGE,
        "pull": "never",
        "network_mode": "none",
        "command": ["sh", "-c", script],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({ "kind": "docker", "spec": spec, "timeout_secs": timeout_secs, "retries": 0 })
}

fn no_containers_left(socket: &std::path::Path, id: &str) {
    wait_for(
        Duration::from_secs(20),
        "the container to be removed",
        || {
            task_containers(socket, id)
                .ok()
                .filter(|c| c.is_empty())
                .map(|_| ())
        },
    )
    .expect("container removed");
}

fn numbered(n: u32) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

const COUNT_TO_50_THEN_EXIT_3: &str =
    "for i in $(seq 1 50); do echo line $i; sleep 0.1; done; exit 3";

#[test]
fn container_task_succeeds_with_its_output_as_the_log() {
    let sock = require!(test_socket());
    let w = World::new();
    let _a = docker_agent(&w, "agent-1", &sock, "");
    let d = w.manager.delegates().expect("delegates");
    assert!(
        d[0].targets.iter().any(|t| t.kind == "docker"),
        "docker target advertised: {d:?}"
    );
    let id = w
        .manager
        .submit(&task(
            "echo hello; sleep 0.1; echo to-stderr >&2; sleep 0.1; echo \"task=$DELEGATE_TASK_ID\"",
            60,
            json!({}),
        ))
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.exit_code, Some(0));
    let log = String::from_utf8(w.manager.logs(&id).expect("logs")).expect("utf8");
    assert_eq!(log, format!("hello\nto-stderr\ntask={id}\n"));
    no_containers_left(&sock, &id);
}

#[test]
fn non_zero_exit_fails_with_that_code_and_keep_leaves_the_container() {
    let sock = require!(test_socket());
    let w = World::new();
    let _a = docker_agent(&w, "agent-1", &sock, "");
    let id = w
        .manager
        .submit(&task("echo oops; exit 7", 60, json!({"keep": true})))
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert_eq!(t.exit_code, Some(7));
    assert_eq!(w.manager.logs(&id).expect("logs"), b"oops\n");
    let kept = task_containers(&sock, &id).expect("list");
    assert_eq!(kept.len(), 1, "kept: {kept:?}");
    let labels = cli(
        &sock,
        &["inspect", "-f", "{{json .Config.Labels}}", &kept[0]],
    )
    .expect("inspect");
    assert!(
        labels.contains("\"dev.delegate.delegate\":\"agent-1\""),
        "{labels}"
    );
    cli(&sock, &["rm", "-f", &kept[0]]).expect("clean up");
}

#[test]
fn timeout_stops_and_removes_the_container() {
    let sock = require!(test_socket());
    let w = World::new();
    let _a = docker_agent(&w, "agent-1", &sock, "");
    let id = w
        .manager
        .submit(&task("echo started; sleep 600", 2, json!({})))
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::TimedOut, "{t:?}");
    assert_eq!(w.manager.logs(&id).expect("logs"), b"started\n");
    no_containers_left(&sock, &id);
}

#[test]
fn cancel_stops_and_removes_the_container() {
    let sock = require!(test_socket());
    let w = World::new();
    let _a = docker_agent(&w, "agent-1", &sock, "");
    let id = w
        .manager
        .submit(&task("echo started; sleep 600", 120, json!({})))
        .expect("submit");
    wait_for(LONG, "the container to print", || {
        (w.manager.logs(&id).ok()? == b"started\n").then_some(())
    })
    .expect("running");
    w.manager.cancel(&id).expect("cancel");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
    no_containers_left(&sock, &id);
}

#[test]
fn refused_specs_fail_clearly_and_the_agent_keeps_working() {
    let sock = require!(test_socket());
    let w = World::new();
    let allowed = w.tmp.path().join("allowed");
    std::fs::create_dir_all(&allowed).expect("mkdir");
    let extra = format!("allowed_mounts = [{:?}]\n", allowed.display().to_string());
    let _a = docker_agent(&w, "agent-1", &sock, &extra);
    let cases = [
        (
            json!({"image": "delegate-test/not-here:1", "pull": "never", "network_mode": "none"}),
            "is not on this host's Docker engine and the pull policy is never",
        ),
        (
            json!({"image": TEST_IMAGE, "pull": "never", "network_mode": "none",
                   "mounts": [{"source": "/etc", "target": "/host-etc"}]}),
            "bind mount of /etc is not allowed on delegate agent-1",
        ),
        (
            json!({"image": TEST_IMAGE, "pull": "never", "network_mode": "none", "privileged": true}),
            "privileged containers are not allowed on delegate agent-1",
        ),
    ];
    for (spec, expect) in cases {
        let id = w
            .manager
            .submit(&json!({"kind": "docker", "spec": spec, "timeout_secs": 60}))
            .expect("submit");
        let t = w.manager.wait_done(&id, LONG).expect("finishes");
        assert_eq!(t.state, TaskState::Failed, "{t:?}");
        let msg = t.message.clone().unwrap_or_default();
        assert!(msg.contains(expect), "{expect:?} not in {msg:?}");
        assert!(task_containers(&sock, &id).expect("list").is_empty());
    }
    // An allowed bind mount works, and the agent is still fine.
    std::fs::write(allowed.join("f"), "from the host\n").expect("write");
    let id = w
        .manager
        .submit(&task(
            "cat /data/f",
            60,
            json!({"mounts": [{"source": allowed.display().to_string(), "target": "/data", "read_only": true}]}),
        ))
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(w.manager.logs(&id).expect("logs"), b"from the host\n");
}

#[test]
fn engine_stopped_while_the_agent_runs_fails_docker_tasks_and_recovers() {
    require!(delegate_tests::docker::private_engines());
    let w = World::new();
    // A private engine: stopping the shared one would break the other tests.
    let root = tempfile::Builder::new()
        .prefix("dlg-eng-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let mut engine = PrivateEngine::start(root.path()).expect("private dockerd");
    let a = docker_agent(&w, "agent-1", &engine.socket, "");
    let ok = w
        .manager
        .submit(&task("echo one", 60, json!({})))
        .expect("submit");
    assert_eq!(
        w.manager.wait_done(&ok, LONG).expect("done").state,
        TaskState::Succeeded
    );

    engine.stop().expect("stop dockerd");
    let id = w
        .manager
        .submit(&task("echo two", 60, json!({})))
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let msg = t.message.clone().unwrap_or_default();
    assert!(
        msg.contains("Docker engine") && msg.contains(&engine.socket.display().to_string()),
        "{msg}"
    );
    let sh = w.manager.submit_shell("echo shell", 60, 0).expect("submit");
    let t = w.manager.wait_done(&sh, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");

    engine.resume().expect("restart dockerd");
    let id = w
        .manager
        .submit(&task("echo three", 60, json!({})))
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(w.manager.logs(&id).expect("logs"), b"three\n");
    drop(a);
}

/// An engine that comes up after the agent is probed again with each heartbeat and the
/// delegate re-registers, so `docker` shows among its targets without a restart.
#[test]
fn engine_started_after_the_agent_is_offered_once_it_answers() {
    require!(delegate_tests::docker::private_engines());
    let w = World::new();
    let root = tempfile::Builder::new()
        .prefix("dlg-eng-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let mut engine = PrivateEngine::start(root.path()).expect("private dockerd");
    engine.stop().expect("stop dockerd");
    let a = w.agent(AgentOptions {
        name: "late-engine".into(),
        extra: agent_config(&engine.socket),
        ..AgentOptions::default()
    });
    a.wait_log("docker target not offered", Duration::from_secs(20))
        .expect("the agent reports the missing engine");
    w.wait_connected(1);
    let offers_docker = || {
        w.manager
            .delegates()
            .ok()
            .and_then(|d| d.into_iter().next())
            .is_some_and(|d| d.targets.iter().any(|t| t.kind == "docker"))
    };
    assert!(!offers_docker(), "docker offered while the engine is down");

    engine.resume().expect("start dockerd");
    // Heartbeats come every 10 s (a third of the 30 s lease TTL).
    wait_for(Duration::from_secs(30), "docker to be offered", || {
        offers_docker().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    let id = w
        .manager
        .submit(&task("echo late", 60, json!({})))
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(w.manager.logs(&id).expect("logs"), b"late\n");
    assert_eq!(
        w.manager.delegates().expect("list").len(),
        1,
        "re-registration made a second delegate"
    );
}

/// Submit the counting container and wait until the manager holds `bytes` of its log.
fn start_counting(w: &World, bytes: u64) -> String {
    let id = w
        .manager
        .submit(&task(COUNT_TO_50_THEN_EXIT_3, 120, json!({})))
        .expect("submit");
    wait_for(LONG, "some lines shipped", || {
        (w.manager.task(&id).ok()?.log_bytes >= bytes).then_some(())
    })
    .expect("output flows");
    id
}

/// The counting task ended as it really did: failed with code 3, all 50 lines once, in
/// order, on its first attempt, and its container is gone.
fn assert_counted_to_50_and_exited_3(w: &World, sock: &std::path::Path, id: &str) {
    let t = w.manager.wait_done(id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert_eq!(t.exit_code, Some(3), "{t:?}");
    assert_eq!(t.attempt, 1, "not retried: {t:?}");
    let log = String::from_utf8(w.manager.logs(id).expect("logs")).expect("utf8");
    assert_eq!(log, numbered(50));
    no_containers_left(sock, id);
}

#[test]
fn agent_killed_while_the_container_prints_reports_exit_3_and_every_line_once() {
    let sock = require!(test_socket());
    let w = World::new();
    let mut a = docker_agent(&w, "agent-1", &sock, "");
    // Let it print (and the agent ship) a good part, then kill the agent mid-stream.
    let id = start_counting(&w, 60);
    a.kill9();
    let shipped = w.manager.task(&id).expect("task").log_bytes;
    assert!(
        shipped < numbered(50).len() as u64,
        "the container finished before the kill"
    );
    // The container goes on printing while the agent is down: the restarted agent must
    // pick up exactly where the manager's copy ends.
    let name = format!("delegate-{id}-1");
    wait_for(LONG, "the container to print past what was shipped", || {
        let printed = cli(&sock, &["logs", &name]).ok()?.len() as u64;
        (printed >= shipped + 30).then_some(())
    })
    .expect("container prints on");
    assert_eq!(task_containers(&sock, &id).expect("list").len(), 1);
    a.restart().expect("restart");
    assert_counted_to_50_and_exited_3(&w, &sock, &id);
    assert!(a.log_text().contains("re-attaching"), "{}", a.log_text());
}

#[test]
fn container_that_finished_while_the_agent_was_down_is_reported() {
    let sock = require!(test_socket());
    let w = World::new();
    let mut a = docker_agent(&w, "agent-1", &sock, "");
    let id = start_counting(&w, 30);
    a.kill9();
    let t = w.manager.task(&id).expect("task");
    let name = format!("delegate-{id}-{}", t.attempt);
    let code = cli(&sock, &["wait", &name]).expect("docker wait");
    assert_eq!(code.trim(), "3");
    a.restart().expect("restart");
    assert_counted_to_50_and_exited_3(&w, &sock, &id);
}

#[test]
fn container_removed_while_the_agent_was_down_makes_the_task_lost() {
    let sock = require!(test_socket());
    let w = World::new();
    let mut a = docker_agent(&w, "agent-1", &sock, "");
    let id = w
        .manager
        .submit(&task("echo started; sleep 600", 120, json!({})))
        .expect("submit");
    wait_for(LONG, "the container to print", || {
        (w.manager.logs(&id).ok()? == b"started\n").then_some(())
    })
    .expect("running");
    a.kill9();
    for c in task_containers(&sock, &id).expect("list") {
        cli(&sock, &["rm", "-f", &c]).expect("remove behind the agent's back");
    }
    a.restart().expect("restart");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Lost, "{t:?}");
    let msg = t.message.unwrap_or_default();
    assert!(msg.contains("is gone"), "{msg}");
}

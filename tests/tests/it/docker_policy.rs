//! The docker policy against a real dockerd: what a task may ask of the engine is checked,
//! and the engine gets exactly what was checked (docs/security.md, first review,
//! finding 3).
//!
//! Needs the engine `scripts/test` starts (`DELEGATE_TEST_DOCKER_SOCKET`).

use std::path::Path;
use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::docker::{TEST_IMAGE, agent_config, cli, test_socket};
use delegate_tests::{Agent, AgentOptions, require};
use serde_json::{Value, json};

use crate::util::{LONG, World};

/// An agent on the test engine; `docker_lines` go into its `[docker]` table.
fn docker_agent(w: &World, name: &str, socket: &Path, docker_lines: &str) -> Agent {
    let a = w.agent(AgentOptions {
        name: name.into(),
        extra: format!("{}{docker_lines}", agent_config(socket)),
        ..AgentOptions::default()
    });
    a.wait_log("offering the docker target", Duration::from_secs(20))
        .expect("the agent sees the engine");
    a.wait_log("registered with the manager", Duration::from_secs(20))
        .expect("the agent registers");
    a
}

fn docker_task(spec: Value) -> Value {
    let mut s = json!({"image": TEST_IMAGE, "pull": "never"});
    if let (Some(s), Some(e)) = (s.as_object_mut(), spec.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({"kind": "docker", "spec": s, "timeout_secs": 60, "retries": 0})
}

/// Run a task to its end; its final view.
fn run(w: &World, spec: Value) -> delegate_protocol::TaskView {
    let id = w.manager.submit(&docker_task(spec)).expect("submit");
    w.manager.wait_done(&id, LONG).expect("finishes")
}

/// The reproduced escape was a symlink under an allowed directory, checked and then
/// swapped before the engine resolved it. The engine now gets the resolved path: the
/// container's mount names the real directory, never the link.
#[test]
fn the_engine_gets_the_resolved_bind_path_not_the_symlink_that_was_checked() {
    let sock = require!(test_socket());
    let w = World::new();
    let allowed = w.tmp.path().join("allowed");
    let data = allowed.join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("f"), "real data\n").expect("write");
    let link = allowed.join("link");
    std::os::unix::fs::symlink(&data, &link).expect("symlink");
    let lines = format!("allowed_mounts = [{:?}]\n", allowed.display().to_string());
    let _a = docker_agent(&w, "agent-1", &sock, &lines);
    let t = run(
        &w,
        json!({"command": ["cat", "/d/f"], "network_mode": "none", "keep": true,
               "mounts": [{"source": link.display().to_string(), "target": "/d", "read_only": true}]}),
    );
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let name = format!("delegate-{}-{}", t.id, t.attempt);
    let mounts = cli(
        &sock,
        &[
            "inspect",
            "-f",
            "{{range .HostConfig.Mounts}}{{.Source}}{{end}}",
            &name,
        ],
    )
    .expect("inspect");
    let real = std::fs::canonicalize(&data).expect("canonical");
    let _ = cli(&sock, &["rm", "-f", &name]);
    assert_eq!(mounts.trim(), real.display().to_string());
}

#[test]
fn host_and_container_network_modes_are_refused_unless_the_operator_lists_them() {
    let sock = require!(test_socket());
    let w = World::new();
    let a = docker_agent(&w, "agent-1", &sock, "");
    for mode in ["host", "container:some-other-container"] {
        let t = run(&w, json!({"command": ["true"], "network_mode": mode}));
        assert_eq!(t.state, TaskState::Failed, "{mode}: {t:?}");
        let msg = t.message.clone().unwrap_or_default();
        assert!(
            msg.contains(&format!(
                "network mode {mode:?} is not allowed on delegate agent-1 (allowed: none, bridge)"
            )) && msg.contains("allowed_network_modes"),
            "{mode}: {msg}"
        );
    }
    // Listed by the operator, host networking is allowed.
    drop(a);
    let _b = docker_agent(
        &w,
        "agent-host",
        &sock,
        "allowed_network_modes = [\"none\", \"host\"]\n",
    );
    let t = run(&w, json!({"command": ["true"], "network_mode": "host"}));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.delegate_name.as_deref(), Some("agent-host"));
}

/// A `local` volume made with `device=/etc, o=bind` is a bind mount of `/etc` under
/// another name; it is refused like one.
#[test]
fn a_named_volume_whose_driver_options_bind_a_host_path_is_refused() {
    let sock = require!(test_socket());
    let w = World::new();
    let _a = docker_agent(&w, "agent-1", &sock, "");
    let volume = format!(
        "delegate-test-etc-{}",
        w.tmp
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "")
    );
    cli(
        &sock,
        &[
            "volume",
            "create",
            "--driver",
            "local",
            "--opt",
            "type=none",
            "--opt",
            "o=bind",
            "--opt",
            "device=/etc",
            &volume,
        ],
    )
    .expect("create volume");
    let t = run(
        &w,
        json!({"command": ["cat", "/v/hostname"], "network_mode": "none",
               "mounts": [{"type": "volume", "source": volume, "target": "/v"}]}),
    );
    let _ = cli(&sock, &["volume", "rm", "-f", &volume]);
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let msg = t.message.clone().unwrap_or_default();
    assert!(
        msg.contains(&format!(
            "volume {volume} is not allowed on delegate agent-1"
        )) && msg.contains("device=/etc"),
        "{msg}"
    );
}

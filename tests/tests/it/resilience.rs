//! The agent against failure: manager crashes, agent crashes, stop signals, bad config,
//! unreachable manager (a wrong token: trust_agent.rs).

use std::process::Command;
use std::time::{Duration, Instant};

use delegate_protocol::{DelegateState, TaskState};
use delegate_tests::{Agent, AgentOptions, Manager, bin, process_with_cmdline, wait_for};
use nix::sys::signal::Signal;

use crate::util::{LONG, World, marked};

/// Every numbered line exactly once, in order.
fn numbered(n: u32) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

/// A task printing `line 1` … `line 40` a tenth of a second apart, then exiting 3; returns
/// once some of its log reached the manager and it still runs. The premise of the tests
/// that take the manager away mid-task: both the shipped part and the rest must come out
/// right.
fn submit_40_lines_and_wait_until_some_are_shipped(manager: &Manager) -> String {
    let id = manager
        .submit_shell(
            "for i in $(seq 1 40); do echo \"line $i\"; sleep 0.1; done; exit 3",
            120,
            0,
        )
        .expect("submit");
    wait_for(LONG, "a log line to reach the manager", || {
        let t = manager.task(&id).ok()?;
        (t.log_bytes > 0).then_some(t)
    })
    .map(|t| assert_eq!(t.state, TaskState::Running, "{t:?}"))
    .expect("log shipped");
    id
}

/// The task of [`submit_40_lines_and_wait_until_some_are_shipped`] ended once: failed with
/// exit code 3 on attempt 1, every line once and in order.
fn assert_40_lines_and_exit_3_once(manager: &Manager, id: &str, agent: &Agent) {
    let t = manager.wait_done(id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{}", agent.log_text());
    assert_eq!(t.exit_code, Some(3));
    assert_eq!(t.attempt, 1);
    let log = String::from_utf8(manager.logs(id).expect("logs")).expect("utf8");
    assert_eq!(log, numbered(40));
    assert_eq!(t.log_bytes, numbered(40).len() as u64);
}

#[test]
fn manager_killed_mid_task_and_back_20s_later_gets_every_log_byte_and_the_result_once() {
    let mut w = World::new();
    let a = w.named_agent("agent-1");
    let id = submit_40_lines_and_wait_until_some_are_shipped(&w.manager);
    let addr = w.manager.addr.clone();
    w.manager.kill9();
    std::thread::sleep(Duration::from_secs(20));
    w.manager = Manager::start_with(w.tmp.path(), &addr, &[]).expect("manager restarts");
    assert_40_lines_and_exit_3_once(&w.manager, &id, &a);
}

/// A manager of several nodes (one database behind them): the agent lists every node and
/// moves on when the one it uses dies. Here the nodes take turns on one SQLite database:
/// the first listed is down at the start, the second dies mid-task, and the first then
/// comes up; nothing of the task may be lost or repeated.
#[test]
fn an_agent_listing_two_manager_nodes_moves_to_the_live_one_and_loses_nothing() {
    let mut w = World::new();
    let up = w.manager.addr.clone();
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("its address").to_string()
    };
    let dir = w.tmp.path().join("agent-1");
    std::fs::create_dir_all(&dir).expect("agent dir");
    let config = dir.join("delegate.toml");
    std::fs::write(
        &config,
        format!(
            "manager_url = [\"http://{down}\", \"http://{up}\"]\ntoken = {token:?}\nname = \"agent-1\"\nstate_dir = {state:?}\n",
            token = w.token,
            state = dir.join("state").display().to_string(),
        ),
    )
    .expect("config");
    let a = Agent::start_config(&dir, &config, "info,delegate=debug").expect("agent starts");
    w.wait_connected(1);
    let id = submit_40_lines_and_wait_until_some_are_shipped(&w.manager);
    w.manager.kill9();
    w.manager = Manager::start_with(w.tmp.path(), &down, &[]).expect("the other node starts");
    assert_40_lines_and_exit_3_once(&w.manager, &id, &a);
    let moved = a.log_text().matches("trying the next one").count();
    assert!(moved >= 2, "moved on {moved} times:\n{}", a.log_text());
}

#[test]
fn agent_killed_mid_task_reports_it_within_seconds_of_restart_and_the_retry_runs() {
    let w = World::new();
    let mut a = w.named_agent("agent-1");
    let id = w
        .manager
        .submit_shell(&marked("if [ \"$DELEGATE_TASK_ATTEMPT\" = 1 ]; then sleep 987621; fi; echo attempt $DELEGATE_TASK_ATTEMPT"),
            300,
            1,
        )
        .expect("submit");
    w.manager
        .wait_state(&id, &[TaskState::Running], LONG)
        .expect("running");
    wait_for(Duration::from_secs(10), "the sleep to start", || {
        process_with_cmdline(&marked("sleep 987621")).then_some(())
    })
    .expect("started");
    a.kill9();
    // The orphaned process group outlives a kill -9 of the agent...
    assert!(process_with_cmdline(&marked("sleep 987621")));
    let restarted = Instant::now();
    a.restart().expect("restart");
    // ...until the restarted agent finds it in its journal. The lease TTL is 30 s: seeing
    // the retry well before that proves the journal path, not the lease path.
    let t = w
        .manager
        .wait_done(&id, Duration::from_secs(20))
        .expect("finishes");
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{}", a.log_text());
    assert_eq!(t.attempt, 2);
    assert_eq!(w.manager.logs(&id).expect("logs"), b"attempt 2\n");
    assert!(
        !process_with_cmdline(&marked("sleep 987621")),
        "the old group was not killed"
    );
}

#[test]
fn agent_killed_mid_task_without_retries_marks_it_lost_with_a_reason() {
    let w = World::new();
    let mut a = w.named_agent("agent-1");
    let id = w
        .manager
        .submit_shell(&marked("echo begun; sleep 987631"), 300, 0)
        .expect("submit");
    w.manager
        .wait_state(&id, &[TaskState::Running], LONG)
        .expect("running");
    wait_for(Duration::from_secs(10), "the sleep to start", || {
        process_with_cmdline(&marked("sleep 987631")).then_some(())
    })
    .expect("started");
    // Output still in the pipe when the agent dies is gone with it; wait until it shipped.
    wait_for(
        Duration::from_secs(10),
        "the first line at the manager",
        || (w.manager.task(&id).ok()?.log_bytes >= 6).then_some(()),
    )
    .expect("shipped");
    a.kill9();
    a.restart().expect("restart");
    let t = w
        .manager
        .wait_done(&id, Duration::from_secs(10))
        .expect("finishes");
    assert_eq!(t.state, TaskState::Lost, "{t:?}");
    assert!(
        t.message
            .unwrap_or_default()
            .contains("restarted while this task was running")
    );
    assert_eq!(w.manager.logs(&id).expect("logs"), b"begun\n");
    assert!(
        !process_with_cmdline(&marked("sleep 987631")),
        "the old group was not killed"
    );
}

#[test]
fn sigterm_lets_the_running_task_finish_takes_nothing_new_and_exits_zero() {
    let w = World::new();
    let mut a = w.agent(AgentOptions {
        concurrency: 2,
        ..AgentOptions::default()
    });
    let id = w
        .manager
        .submit_shell("sleep 5; echo finished", 60, 0)
        .expect("submit");
    w.manager
        .wait_state(&id, &[TaskState::Running], LONG)
        .expect("running");
    a.signal(Signal::SIGTERM);
    // The premise: the manager knows the delegate drains. (The agent's "draining" log line
    // comes just before its heartbeat says so; a task leased in between is in flight and
    // is run, as it should be.)
    wait_for(
        Duration::from_secs(5),
        "the manager to see the delegate draining",
        || {
            let ds = w.manager.delegates().ok()?;
            ds.iter()
                .any(|d| matches!(d.state, DelegateState::Draining | DelegateState::Drained))
                .then_some(())
        },
    )
    .expect("drain starts");
    let later = w
        .manager
        .submit_shell("echo should-not-run-here", 60, 0)
        .expect("submit");
    let st = a.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(st.code(), Some(0), "{}", a.log_text());
    let t = w.manager.task(&id).expect("task");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{}", a.log_text());
    assert_eq!(w.manager.logs(&id).expect("logs"), b"finished\n");
    let t = w.manager.task(&later).expect("task");
    assert_eq!(t.state, TaskState::Queued, "taken while draining: {t:?}");
}

#[test]
fn second_sigterm_cancels_running_tasks_at_once() {
    let w = World::new();
    let mut a = w.agent(AgentOptions {
        drain_timeout: "10m",
        ..AgentOptions::default()
    });
    let id = w
        .manager
        .submit_shell(&marked("sleep 987641"), 600, 0)
        .expect("submit");
    w.manager
        .wait_state(&id, &[TaskState::Running], LONG)
        .expect("running");
    a.signal(Signal::SIGTERM);
    a.wait_log("draining", Duration::from_secs(5))
        .expect("drain starts");
    a.signal(Signal::SIGTERM);
    let st = a.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(st.code(), Some(0));
    let t = w.manager.task(&id).expect("task");
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}\n{}", a.log_text());
    assert!(!process_with_cmdline(&marked("sleep 987641")));
}

#[test]
fn bad_config_exits_78_and_names_the_line() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("delegate.toml");
    std::fs::write(
        &cfg,
        "token = \"dlg_x\"\nmanager_url = \"htp://x\"\nconcurrency = 0\n",
    )
    .expect("write");
    for args in [
        &["run", "--config"][..],
        &["config", "check", "--config"][..],
    ] {
        let out = Command::new(bin("delegate").expect("bin"))
            .args(args)
            .arg(&cfg)
            .env_remove("DELEGATE_MANAGER_URL")
            .env_remove("DELEGATE_TOKEN")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
        let p = cfg.display();
        assert!(
            err.contains(&format!(
                "{p}:2: manager_url \"htp://x\" is not a valid URL (expected http:// or https://)"
            )),
            "{err}"
        );
        assert!(
            err.contains(&format!("{p}:3: concurrency must be")),
            "{err}"
        );
    }
}

#[test]
fn with_the_manager_unreachable_the_agent_uses_almost_no_cpu() {
    let tmp = tempfile::tempdir().expect("tmp");
    // A port nobody listens on: bind, note, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let a = Agent::start(
        tmp.path(),
        &format!("http://127.0.0.1:{port}"),
        "dlg_x",
        &AgentOptions::default(),
    )
    .expect("start");
    std::thread::sleep(Duration::from_secs(3));
    let before = a.cpu_ticks().expect("ticks");
    std::thread::sleep(Duration::from_secs(10));
    let used = a.cpu_ticks().expect("ticks") - before;
    // Clock ticks are 1/100 s: 10 ticks in 10 s is 1 % of one core.
    assert!(
        used <= 10,
        "agent used {used} ticks in 10 s:\n{}",
        a.log_text()
    );
    assert!(a.log_text().contains("registration failed"));
}

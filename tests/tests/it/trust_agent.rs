//! The agent trusts its token, its manager and its host only as far as it must: a revoked
//! token stops it cleanly, a misbehaving manager cannot make it spin or over-commit, and
//! corrupt or full local storage is said out loud (docs/security.md, first review).

use std::sync::atomic::Ordering;
use std::time::Duration;

use delegate_protocol::{Assignment, Outcome, TaskState};
use delegate_tests::{Agent, AgentOptions, process_with_cmdline, wait_for};
use serde_json::json;

use crate::fake_manager::{Behaviour, FakeManager};
use crate::util::{LONG, World, marked};

/// A token revoked while a task runs: the agent kills the task, reports nothing more about
/// it, says what happened and how to fix it in one line, and exits with 78 (EX_CONFIG,
/// which the unit's `RestartPreventExitStatus` keeps from restarting in a loop).
#[test]
fn a_token_revoked_while_a_task_runs_stops_the_task_reports_nothing_and_exits_78() {
    let w = World::new();
    let mut a = w.named_agent("revoked");
    let sleeper = marked("sleep 987660");
    let id = w
        .manager
        .submit_shell(&format!("echo started; {sleeper}"), 600, 0)
        .expect("submit");
    w.manager
        .wait_state(&id, &[TaskState::Running], LONG)
        .expect("running");
    wait_for(LONG, "the task's sleep to run", || {
        process_with_cmdline(&sleeper).then_some(())
    })
    .expect("sleep runs");

    w.manager
        .post("/api/v1/tokens/test/revoke", &json!({}))
        .expect("revoke");
    let status = a.wait_exit(Duration::from_secs(40)).expect("agent exits");
    let log = a.log_text();
    assert_eq!(status.code(), Some(78), "{log}");
    assert_eq!(
        log.matches("rejected the delegate token").count(),
        1,
        "said once:\n{log}"
    );
    assert!(log.contains("stopped 1 running task(s)"), "{log}");
    assert!(log.contains("token create"), "no hint in:\n{log}");
    assert!(
        !process_with_cmdline(&sleeper),
        "the task's process lives on"
    );
    // Nothing was reported: the manager still has the task running on its lease (or lost
    // once the lease lapsed), never a result from the agent.
    let t = w.manager.task(&id).expect("task");
    assert!(
        matches!(t.state, TaskState::Running | TaskState::Lost),
        "{t:?}"
    );
    assert!(
        t.message.as_deref().is_none_or(|m| !m.contains("cancel")),
        "{t:?}"
    );
    let spooled = std::fs::read_dir(a.dir.join("state/tasks"))
        .expect("spool")
        .count();
    assert_eq!(spooled, 0, "the revoked task stays in the spool");
}

/// A wrong token at start is the same operator error: one line, exit 78, no retry loop.
#[test]
fn a_wrong_token_at_start_exits_78_with_one_clear_line() {
    let w = World::new();
    let mut a = Agent::start(
        w.tmp.path(),
        &w.manager.url(),
        "dlg_not_a_real_token",
        &AgentOptions::default(),
    )
    .expect("start");
    let status = a.wait_exit(Duration::from_secs(20)).expect("agent exits");
    let log = a.log_text();
    assert_eq!(status.code(), Some(78), "{log}");
    assert_eq!(
        log.matches("rejected the delegate token").count(),
        1,
        "{log}"
    );
    assert!(log.contains("token create"), "no hint in:\n{log}");
    assert!(w.manager.delegates().expect("list").is_empty());
}

/// A name another token owns (or tags outside the token's set) is refused at registration
/// with a message that says how to free it; the agent says so once and exits 78 instead of
/// retrying a registration that only an operator can make succeed.
#[test]
fn a_name_owned_by_another_token_exits_78_with_the_managers_hint() {
    let w = World::new();
    let owner = w.manager.token("owner").expect("token");
    let first = Agent::start(
        &w.tmp.path().join("first"),
        &w.manager.url(),
        &owner,
        &AgentOptions::default(),
    )
    .expect("start");
    wait_for(LONG, "the first agent to register", || {
        (!w.manager.delegates().ok()?.is_empty()).then_some(())
    })
    .expect("registered");
    let other = w.manager.token("other").expect("token");
    let mut second = Agent::start(
        &w.tmp.path().join("second"),
        &w.manager.url(),
        &other,
        &AgentOptions::default(),
    )
    .expect("start");
    let status = second.wait_exit(Duration::from_secs(20)).expect("exits");
    let log = second.log_text();
    assert_eq!(status.code(), Some(78), "{log}");
    assert_eq!(
        log.matches("refused to register this delegate").count(),
        1,
        "said once:\n{log}"
    );
    assert!(log.contains("delegates forget"), "no hint in:\n{log}");
    // The owner was not disturbed: still the one delegate, still connected.
    let ds = w.manager.delegates().expect("list");
    assert_eq!(ds.len(), 1, "{ds:?}");
    assert!(ds[0].connected, "{ds:?}");
    assert!(
        first
            .log_text()
            .matches("registered with the manager")
            .count()
            == 1,
        "the owner had to register again:\n{}",
        first.log_text()
    );
}

fn shell_assignment(id: &str, script: &str) -> Assignment {
    Assignment {
        task_id: id.into(),
        attempt: 1,
        kind: "shell".into(),
        spec: json!({ "script": script }),
        timeout_secs: 60,
    }
}

/// An agent pointed at a fake manager.
fn agent_on(fake: &FakeManager, tmp: &std::path::Path, concurrency: u32) -> Agent {
    Agent::start(
        tmp,
        &fake.url,
        "dlg_fake",
        &AgentOptions {
            concurrency,
            ..AgentOptions::default()
        },
    )
    .expect("agent starts")
}

/// The reproduced case: a manager answering every log chunk with `stored: 0` made the
/// agent resend about 20 times a second forever. Now it backs off with jitter and the
/// log stays in the spool (nothing is reported as delivered).
#[test]
fn a_log_ack_that_never_advances_backs_off_and_keeps_the_log_in_the_spool() {
    let fake = FakeManager::start(Behaviour {
        stuck_log_ack: true,
        first_lease: vec![shell_assignment("t_stuck", "echo hello")],
        ..Behaviour::default()
    });
    let tmp = tempfile::tempdir().expect("tmp");
    let a = agent_on(&fake, tmp.path(), 4);
    wait_for(LONG, "the first log chunk", || {
        (fake.seen.log_posts.load(Ordering::SeqCst) > 0).then_some(())
    })
    .expect("log shipped");
    let first = fake.seen.log_posts.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(6));
    let posts = fake.seen.log_posts.load(Ordering::SeqCst) - first;
    // Backoff from 0.5 s doubling (jitter floor a tenth): under 10 tries in 6 s; the old
    // loop made hundreds.
    assert!(posts <= 12, "{posts} log posts in 6 s:\n{}", a.log_text());
    assert!(
        fake.seen.results.lock().expect("lock").is_empty(),
        "a result went out before its log"
    );
    let spooled = std::fs::read(a.dir.join("state/tasks/t_stuck.1/log")).expect("spooled log");
    assert_eq!(spooled, b"hello\n");
    assert!(
        a.log_text().contains("the manager acknowledged 0 bytes"),
        "{}",
        a.log_text()
    );
}

#[test]
fn an_acquire_answer_with_more_tasks_than_free_slots_runs_one_and_reports_the_rest_lost() {
    let fake = FakeManager::start(Behaviour {
        first_lease: ["t_1", "t_2", "t_3"]
            .map(|id| shell_assignment(id, "echo ran"))
            .to_vec(),
        ..Behaviour::default()
    });
    let tmp = tempfile::tempdir().expect("tmp");
    let a = agent_on(&fake, tmp.path(), 1);
    let results = wait_for(LONG, "three results", || {
        let r = fake.seen.results.lock().ok()?.clone();
        (r.len() >= 3).then_some(r)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", a.log_text()));
    assert_eq!(*fake.seen.started.lock().expect("lock"), ["t_1"]);
    for (id, r) in &results {
        if id == "t_1" {
            assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        } else {
            assert_eq!(r.outcome, Outcome::Lost, "{id}: {r:?}");
            let msg = r.message.clone().unwrap_or_default();
            assert!(msg.contains("had 1 free slot(s) but was leased 3"), "{msg}");
        }
    }
}

#[test]
fn a_reply_larger_than_the_limit_is_refused_unread() {
    let fake = FakeManager::start(Behaviour {
        register_reply_bytes: 8 * 1024 * 1024,
        ..Behaviour::default()
    });
    let tmp = tempfile::tempdir().expect("tmp");
    let a = agent_on(&fake, tmp.path(), 1);
    a.wait_log("the reply is larger than 262144 bytes", LONG)
        .expect("refused");
    assert_eq!(
        fake.seen.heartbeats.load(Ordering::SeqCst),
        0,
        "registered on an oversized reply"
    );
}

/// A tmpfs mounted for one test (the tests run as root, as the docker tests do), unmounted
/// when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).expect("mkdir");
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (as the docker tests do): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// On a full disk the task goes on; the dropped output is said once in the journal and
/// in the task's result (it was silently `let _ =` before).
#[test]
fn a_full_disk_drops_output_once_out_loud_and_the_task_still_reports() {
    let w = World::new();
    let name = "full-disk";
    let _disk = SmallDisk::mount(&w.tmp.path().join(name).join("state"), "256k");
    let a = w.named_agent(name);
    let id = w
        .manager
        .submit_shell(
            "head -c 2000000 /dev/zero | tr '\\0' x; echo; echo finished",
            60,
            0,
        )
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    let log = a.log_text();
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let msg = t.message.clone().unwrap_or_default();
    assert!(
        msg.contains("bytes of the task's output were dropped")
            && msg.contains("No space left on device"),
        "{msg}"
    );
    assert_eq!(
        log.matches("task output is being dropped").count(),
        1,
        "said once:\n{log}"
    );
    assert!(
        log.matches("cannot record the log acknowledgement").count() <= 1,
        "said once:\n{log}"
    );
    let held = w.manager.logs(&id).expect("logs");
    assert!(
        !held.is_empty() && held.len() < 2_000_000,
        "{} bytes",
        held.len()
    );
}

/// A corrupt `assignment.json` or `result.json` was skipped at every start forever and the
/// task waited for its lease to lapse; now it is moved aside, said, and the task reported
/// lost at once (well before the 30 s lease).
#[test]
fn a_corrupt_journal_is_quarantined_and_its_task_reported_lost_at_once() {
    let w = World::new();
    let mut a = w.named_agent("corrupt");
    let sleepers = [marked("sleep 987670"), marked("sleep 987671")];
    let ids: Vec<String> = sleepers
        .iter()
        .map(|s| w.manager.submit_shell(s, 600, 0).expect("submit"))
        .collect();
    for (id, s) in ids.iter().zip(&sleepers) {
        w.manager
            .wait_state(id, &[TaskState::Running], LONG)
            .expect("running");
        wait_for(LONG, "the sleep to run", || {
            process_with_cmdline(s).then_some(())
        })
        .expect("sleeps");
    }
    a.kill9();
    let tasks = a.dir.join("state/tasks");
    std::fs::write(
        tasks.join(format!("{}.1/assignment.json", ids[0])),
        b"\0garbage",
    )
    .expect("garble assignment");
    std::fs::write(
        tasks.join(format!("{}.1/result.json", ids[1])),
        b"{\"outcome\":",
    )
    .expect("garble result");
    a.restart().expect("restart");
    for id in &ids {
        let t = w
            .manager
            .wait_done(id, Duration::from_secs(10))
            .expect("reported at once");
        assert_eq!(t.state, TaskState::Lost, "{t:?}");
        let msg = t.message.clone().unwrap_or_default();
        assert!(msg.contains("journal of this task was corrupt"), "{msg}");
    }
    for s in &sleepers {
        wait_for(Duration::from_secs(5), "the orphan to be killed", || {
            (!process_with_cmdline(s)).then_some(())
        })
        .expect("orphan killed");
    }
    assert_eq!(std::fs::read_dir(&tasks).expect("spool").count(), 0);
    let quarantine = a.dir.join("state/quarantine");
    assert_eq!(
        std::fs::read_dir(&quarantine).expect("quarantine").count(),
        2
    );
    // Said once: another start finds nothing to skip or report.
    a.restart().expect("restart again");
    // Recovery is done before "delegate started" is logged; this is the third start.
    wait_for(LONG, "the third start", || {
        (a.log_text().matches("delegate started").count() >= 3).then_some(())
    })
    .expect("started again");
    let log = a.log_text();
    assert_eq!(log.matches("was corrupt").count(), 2, "{log}");
}

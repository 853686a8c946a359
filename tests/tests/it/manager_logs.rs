//! The manager's bounded logs: reads stream in pages so its memory does not
//! follow a log's size, a per-task cap cuts a log with a marker, and retention deletes
//! finished tasks and their logs. A small simulated delegate speaks the protocol over
//! loopback, so the tests control every byte that is sent.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use delegate_protocol::{AcquireResponse, LogAck, TaskState};
use delegate_tests::{Manager, proc_status_kib, wait_for};
use serde_json::json;

/// A delegate that is only its HTTP calls.
pub(crate) struct SimDelegate {
    http: reqwest::blocking::Client,
    base: String,
    token: String,
    id: String,
}

impl SimDelegate {
    pub(crate) fn register(m: &Manager, name: &str) -> Result<SimDelegate> {
        let token = m.token(name)?;
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let base = format!("{}/api/v1", m.url());
        let reg: serde_json::Value = http
            .post(format!("{base}/delegates/register"))
            .bearer_auth(&token)
            .json(&json!({"name": name, "hostname": "h", "version": "0.1.0", "tags": [], "capacity": 1}))
            .send()?
            .error_for_status()?
            .json()?;
        let id = reg["delegate_id"]
            .as_str()
            .context("no delegate_id")?
            .to_string();
        Ok(SimDelegate {
            http,
            base,
            token,
            id,
        })
    }

    /// Lease one task (waits up to 10 s).
    pub(crate) fn lease(&self) -> Result<(String, u32)> {
        let r: AcquireResponse = self
            .http
            .post(format!(
                "{}/delegates/{}/acquire?wait=10&max=1",
                self.base, self.id
            ))
            .bearer_auth(&self.token)
            .send()?
            .error_for_status()?
            .json()?;
        let a = r.tasks.first().context("no task leased within 10 s")?;
        Ok((a.task_id.clone(), a.attempt))
    }

    pub(crate) fn log(&self, task: &str, attempt: u32, offset: u64, data: Vec<u8>) -> Result<u64> {
        let r = self
            .http
            .post(format!(
                "{}/tasks/{task}/logs?attempt={attempt}&offset={offset}",
                self.base
            ))
            .bearer_auth(&self.token)
            .body(data)
            .send()?;
        if !r.status().is_success() {
            bail!("log chunk → {}: {}", r.status(), r.text()?);
        }
        Ok(r.json::<LogAck>()?.stored)
    }

    pub(crate) fn succeed(&self, task: &str, attempt: u32) -> Result<()> {
        self.http
            .post(format!(
                "{}/tasks/{task}/result?attempt={attempt}",
                self.base
            ))
            .bearer_auth(&self.token)
            .json(&json!({"outcome": "succeeded", "exit_code": 0}))
            .send()?
            .error_for_status()?;
        Ok(())
    }
}

fn started(tmp: &tempfile::TempDir, extra: &[&str]) -> Manager {
    Manager::start_with(tmp.path(), "127.0.0.1:0", extra).expect("manager starts")
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("delegate-it-")
        .tempdir()
        .expect("temp dir")
}

/// Reading a log once loaded it whole (a 200 MiB log took the manager to 217 MiB).
#[test]
fn reading_a_big_log_streams_it_without_holding_it_in_memory() {
    const MIB: usize = 1024 * 1024;
    const SIZE_MIB: usize = 96;
    let tmp = tmp();
    let m = started(&tmp, &[]);
    let d = SimDelegate::register(&m, "big").expect("register");
    let task = m.submit_shell("true", 60, 0).expect("submit");
    let (id, attempt) = d.lease().expect("lease");
    assert_eq!(id, task);
    for i in 0..SIZE_MIB {
        // Each MiB says where it is, so a byte out of place shows.
        let page = vec![b'a' + (i % 26) as u8; MIB];
        let stored = d
            .log(&id, attempt, (i * MIB) as u64, page)
            .expect("log chunk");
        assert_eq!(stored, ((i + 1) * MIB) as u64);
    }
    d.succeed(&id, attempt).expect("result");
    let pid = m.pid().expect("manager pid");
    let before = proc_status_kib(pid, "VmHWM:").expect("VmHWM");
    let log = m.logs(&id).expect("read the log");
    let after = proc_status_kib(pid, "VmHWM:").expect("VmHWM");
    assert_eq!(log.len(), SIZE_MIB * MIB);
    for (i, page) in log.chunks(MIB).enumerate() {
        assert!(
            page.iter().all(|b| *b == b'a' + (i % 26) as u8),
            "MiB {i} of the log is not what was written"
        );
    }
    let grew_mib = (after.saturating_sub(before)) / 1024;
    assert!(
        grew_mib < 32,
        "serving a {SIZE_MIB} MiB log raised the manager's peak RSS by {grew_mib} MiB \
         ({before} → {after} KiB)"
    );
}

#[test]
fn a_log_over_the_cap_is_cut_with_a_marker_and_the_task_says_so() {
    let tmp = tmp();
    let m = started(&tmp, &["--max-log-bytes", "1000"]);
    let d = SimDelegate::register(&m, "chatty").expect("register");
    m.submit_shell("true", 60, 0).expect("submit");
    let (id, attempt) = d.lease().expect("lease");
    assert_eq!(d.log(&id, attempt, 0, vec![b'x'; 600]).expect("log"), 600);
    // Crosses the cap: acknowledged whole, so the delegate moves on; kept up to the cap.
    assert_eq!(
        d.log(&id, attempt, 600, vec![b'y'; 600]).expect("log"),
        1200
    );
    // Past the cap: acknowledged, dropped. A resend of an old range is fine too.
    assert_eq!(
        d.log(&id, attempt, 1200, vec![b'z'; 100]).expect("log"),
        1300
    );
    assert_eq!(d.log(&id, attempt, 0, vec![b'x'; 600]).expect("log"), 600);
    d.succeed(&id, attempt).expect("result");
    let log = m.logs(&id).expect("logs");
    let text = String::from_utf8_lossy(&log);
    assert!(log.starts_with(&[b'x'; 600]), "{text}");
    assert_eq!(&log[600..1000], &[b'y'; 400][..]);
    let tail = &text[1000..];
    assert!(
        tail.starts_with("\n[delegate-manager] log truncated:") && tail.contains("1000 bytes"),
        "the log does not end with the marker: {tail:?}"
    );
    assert!(!text.contains('z'), "bytes past the cap were kept");
    let view = m.task(&id).expect("task");
    assert_eq!(view.state, TaskState::Succeeded);
    assert!(view.log_truncated, "{view:?}");
    assert_eq!(view.log_bytes, log.len() as u64);
    let (_, show, _) = m.cli(&["task", "show", &id]).expect("task show");
    assert!(show.contains("truncated"), "task show: {show}");
}

#[test]
fn retention_deletes_finished_tasks_and_their_logs_and_keeps_the_rest() {
    let tmp = tmp();
    let m = started(&tmp, &["--retention", "1s"]);
    let d = SimDelegate::register(&m, "r").expect("register");
    let done = m.submit_shell("true", 60, 0).expect("submit");
    let (id, attempt) = d.lease().expect("lease");
    assert_eq!(id, done);
    d.log(&id, attempt, 0, b"old output\n".to_vec())
        .expect("log");
    d.succeed(&id, attempt).expect("result");
    let queued = m
        .submit(&json!({"kind": "shell", "spec": {"script": "true"}, "selectors": ["nobody"]}))
        .expect("submit");
    wait_for(
        Duration::from_secs(15),
        "the finished task to be deleted",
        || {
            m.get(&format!("/api/v1/tasks/{done}"))
                .is_err()
                .then_some(())
        },
    )
    .expect("retention ran");
    let err = m.logs(&done).expect_err("its log is gone too");
    assert!(err.to_string().contains("404"), "{err:#}");
    assert_eq!(
        m.task(&queued).expect("queued task kept").state,
        TaskState::Queued
    );
    assert!(
        m.log_text().contains("retention: deleted finished tasks"),
        "{}",
        m.log_text()
    );
}

/// The agent enforces the cap too, before the bytes leave the host.
#[test]
fn an_agent_cuts_a_log_at_its_max_log_bytes_and_its_result_says_so() {
    use delegate_tests::AgentOptions;
    let world = crate::util::World::new();
    let _agent = world.agent(AgentOptions {
        name: "capped".into(),
        extra: "max_log_bytes = 2048\n".into(),
        ..AgentOptions::default()
    });
    world.wait_connected(1);
    let id = world
        .manager
        .submit_shell(
            "head -c 10000 /dev/zero | tr '\\0' x; echo; echo done",
            60,
            0,
        )
        .expect("submit");
    let view = world
        .manager
        .wait_done(&id, crate::util::LONG)
        .expect("task ends");
    assert_eq!(view.state, TaskState::Succeeded, "{view:?}");
    let log = world.manager.logs(&id).expect("logs");
    let text = String::from_utf8_lossy(&log);
    assert!(log.starts_with(&[b'x'; 2048]), "{text}");
    assert!(
        text[2048..].starts_with("\n[delegate] log truncated:"),
        "no marker after the cap: {:?}",
        &text[2048..]
    );
    assert!(!text.contains("done"), "output past the cap was kept");
    let message = view.message.unwrap_or_default();
    assert!(
        message.contains("bytes of the task's output were dropped")
            && message.contains("cap of 2048 bytes"),
        "the result does not say the log was cut: {message:?}"
    );
}

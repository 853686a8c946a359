//! The agent's opt-in Prometheus listener, scraped over loopback and checked with a real
//! OpenMetrics parser (Python `prometheus_client`, Debian's `python3-prometheus-client`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::prereq::Missing;
use delegate_tests::{Agent, AgentOptions, Manager, require, wait_for};

use crate::util::{LONG, World, marked};

/// Parses an exposition strictly and prints `name{k="v",...} value` per sample.
const PARSER: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        print("%s{%s} %s" % (s.name, labels, s.value))
"#;

/// GET /metrics; returns the content type and the body.
fn scrape(addr: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics listener");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nhost: {addr}\r\n\r\n").expect("send");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read the answer");
    let (head, body) = reply.split_once("\r\n\r\n").expect("HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_string();
    (ctype, body.to_string())
}

/// Is the parser here (`/usr/bin/python3` with `prometheus_client`)? Take it with
/// `require!`: the tests that parse skip loudly without it (fail in CI).
pub(crate) fn openmetrics_parser() -> Result<(), Missing> {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(Missing::absent(
            "Python's `prometheus_client` (the OpenMetrics parser)",
            "apt-get install python3-prometheus-client",
        ))
    }
}

/// Samples by `name{labels}`, as the parser read them; panics on a parse error.
pub(crate) fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3 (install python3-prometheus-client)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed the parser");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition (is python3-prometheus-client installed?): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn metrics_addr(agent: &Agent) -> String {
    let needle = "serving metrics on http://";
    agent
        .wait_log(needle, Duration::from_secs(20))
        .expect("metrics listener");
    let log = agent.log_text();
    let rest = &log[log.find(needle).expect("line") + needle.len()..];
    rest.split('/').next().expect("address").to_string()
}

#[test]
fn agent_metrics_count_tasks_and_reconnects_and_parse_as_openmetrics() {
    require!(openmetrics_parser());
    let mut w = World::new();
    let agent = w.agent(AgentOptions {
        extra: "metrics_listen = \"127.0.0.1:0\"".into(),
        ..AgentOptions::default()
    });
    let addr = metrics_addr(&agent);
    w.wait_connected(1);

    let ok = w.manager.submit_shell("true", 60, 0).expect("submit");
    let bad = w.manager.submit_shell("exit 3", 60, 0).expect("submit");
    for id in [&ok, &bad] {
        w.manager.wait_done(id, LONG).expect("finishes");
    }
    let long = w
        .manager
        .submit_shell(&marked("sleep 987641"), 600, 0)
        .expect("submit");
    w.manager
        .wait_state(&long, &[TaskState::Running], LONG)
        .expect("running");

    let (ctype, text) = scrape(&addr);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let m = parse(&text);
    let version = env!("CARGO_PKG_VERSION");
    for (key, want) in [
        ("delegate_tasks_running{}", 1.0),
        ("delegate_tasks_finished_total{outcome=\"succeeded\"}", 1.0),
        ("delegate_tasks_finished_total{outcome=\"failed\"}", 1.0),
        ("delegate_tasks_finished_total{outcome=\"cancelled\"}", 0.0),
        ("delegate_manager_connected{}", 1.0),
        ("delegate_manager_reconnects_total{}", 0.0),
        (
            &*format!("delegate_build_info{{version=\"{version}\"}}"),
            1.0,
        ),
    ] {
        assert_eq!(m.get(key), Some(&want), "{key} in\n{text}");
    }
    // The running task's journal and log are in the spool.
    assert!(m["delegate_spool_bytes{}"] > 0.0, "{text}");

    // Cancel it, and take the manager away and back: one reconnect.
    w.manager.cancel(&long).expect("cancel");
    w.manager.wait_done(&long, LONG).expect("cancelled");
    let addr_m = w.manager.addr.clone();
    w.manager.kill9();
    let has_line = |line: &str| scrape(&addr).1.lines().any(|l| l == line);
    wait_for(LONG, "the agent to notice the manager is gone", || {
        has_line("delegate_manager_connected 0").then_some(())
    })
    .expect("disconnected");
    w.manager = Manager::start_with(w.tmp.path(), &addr_m, &[]).expect("manager restarts");
    wait_for(LONG, "the agent to reconnect", || {
        has_line("delegate_manager_connected 1").then_some(())
    })
    .expect("reconnected");
    let m = parse(&scrape(&addr).1);
    assert_eq!(m["delegate_manager_reconnects_total{}"], 1.0);
    assert_eq!(
        m["delegate_tasks_finished_total{outcome=\"cancelled\"}"],
        1.0
    );
    assert_eq!(m["delegate_tasks_running{}"], 0.0);
}

/// Descriptors the process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Descriptors for metrics scrapes are bounded: a local user holding idle connections to `metrics_listen` took all
/// of the agent's 1,024 descriptors (a task then failed to journal). Now at most 16 are
/// kept and the rest closed at once: 300 held connections cost the agent no more than
/// that, and tasks still run. (The old listener kept each for its 5 s header timeout.)
#[test]
fn idle_metrics_connections_do_not_take_the_agents_file_descriptors() {
    let w = World::new();
    let agent = w.agent(AgentOptions {
        extra: "metrics_listen = \"127.0.0.1:0\"".into(),
        ..AgentOptions::default()
    });
    let addr = metrics_addr(&agent);
    w.wait_connected(1);
    let pid = agent.pid().expect("pid");
    let before = open_fds(pid);
    let held: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Give the agent time to accept them all (well within the old 5 s timeout).
    std::thread::sleep(Duration::from_millis(1500));
    let during = open_fds(pid);
    assert!(
        during <= before + 16 + 8,
        "{held} held connections took {} descriptors of the agent ({before} before)",
        during - before.min(during),
        held = held.len()
    );
    let id = w
        .manager
        .submit_shell("echo still-journalled", 60, 0)
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    drop(held);
    wait_for(
        Duration::from_secs(10),
        "a scrape to be answered again",
        || {
            let mut s = TcpStream::connect(&addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(s, "GET /metrics HTTP/1.1\r\nhost: {addr}\r\n\r\n").ok()?;
            let mut reply = String::new();
            s.read_to_string(&mut reply).ok()?;
            reply.starts_with("HTTP/1.1 200").then_some(())
        },
    )
    .expect("scrapes answered");
}

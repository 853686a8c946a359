//! Several manager nodes on one PostgreSQL (issue 12): a submit on one node wakes a long
//! poll waiting on another (`LISTEN/NOTIFY`), and killing a node mid-task loses nothing
//! and runs nothing twice — the agent goes on with the other node through a small TCP
//! relay that stands in for the load balancer in front of the nodes. A bad `--database`
//! stops the start with a message that says what to fix. TLS to the database verifies the
//! server against the URL's `sslrootcert`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use delegate_protocol::{AcquireResponse, TaskState};
use delegate_tests::postgres::Postgres;
use delegate_tests::{Agent, AgentOptions, Manager, bin, wait_for};
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

/// A loopback TCP relay to one manager node at a time: what a load balancer does when a
/// node dies (new connections go to a live node; those to the dead one break).
struct Relay {
    addr: String,
    target: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(target: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr").to_string();
        let target = Arc::new(Mutex::new(target.to_string()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (target.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let to = t.lock().map(|g| g.clone()).unwrap_or_default();
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(&to) {
                            pipe(client, server);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Relay {
            addr,
            target,
            stop,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn switch_to(&self, target: &str) {
        if let Ok(mut t) = self.target.lock() {
            *t = target.to_string();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// Copy both ways until either side closes, then close both.
fn pipe(a: TcpStream, b: TcpStream) {
    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => (a2, b2),
        _ => return,
    };
    let one_way = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        });
    };
    one_way(a, b2);
    one_way(b, a2);
}

/// Two nodes on one database; node B holds a copy of node A's admin token, as an
/// operator would copy it (or set DELEGATE_ADMIN_TOKEN) on every node.
fn two_nodes(root: &Path, pg: &Postgres, extra: &[&str]) -> (Manager, Manager) {
    let url = pg.url();
    let mut args = vec!["--database", url.as_str()];
    args.extend_from_slice(extra);
    std::fs::create_dir_all(root.join("a")).expect("node A root");
    let a = Manager::start_with(&root.join("a"), "127.0.0.1:0", &args).expect("node A starts");
    let b_data = root.join("b").join("manager");
    std::fs::create_dir_all(&b_data).expect("node B data dir");
    std::fs::copy(a.data.join("admin.token"), b_data.join("admin.token")).expect("token copy");
    let b = Manager::start_with(&root.join("b"), "127.0.0.1:0", &args).expect("node B starts");
    (a, b)
}

fn numbered(n: u32) -> String {
    (1..=n).map(|i| format!("line {i}\n")).collect()
}

#[test]
fn a_submit_on_one_node_wakes_a_long_poll_waiting_on_the_other_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pg = Postgres::start().expect("PostgreSQL starts");
    let (a, b) = two_nodes(tmp.path(), &pg, &[]);
    let token = a.token("sim").expect("token");
    let http = reqwest::blocking::Client::builder()
        .timeout(LONG)
        .build()
        .expect("client");
    let reg: serde_json::Value = http
        .post(format!("{}/api/v1/delegates/register", b.url()))
        .bearer_auth(&token)
        .json(&json!({"name": "sim", "hostname": "h", "version": "0.1.0", "tags": ["sim"], "capacity": 1}))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .expect("register on node B");
    let id = reg["delegate_id"]
        .as_str()
        .expect("delegate id")
        .to_string();
    let registered = b.delegates().expect("delegates")[0]
        .last_heartbeat
        .expect("seen");
    // A 30 s long poll on node B. Its first look at the database stamps `last_seen`
    // after registering the waiter, so once the stamp moves the poll waits for a wake-up.
    let poll = {
        let (http, url, token) = (http.clone(), b.url(), token.clone());
        let id = id.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let resp = http
                .post(format!("{url}/api/v1/delegates/{id}/acquire?wait=30&max=1"))
                .bearer_auth(&token)
                .send()
                .and_then(|r| r.error_for_status())
                .expect("acquire");
            // 204: the poll ran out without a task.
            let r: AcquireResponse = match resp.status().as_u16() {
                204 => AcquireResponse::default(),
                _ => resp.json().expect("acquire body"),
            };
            (r, started.elapsed())
        })
    };
    wait_for(LONG, "the poll on node B to look once", || {
        let seen = b.delegates().ok()?.first()?.last_heartbeat?;
        (seen > registered).then_some(())
    })
    .expect("poll started");
    let submitted = Instant::now();
    let task = a
        .submit(&json!({"kind": "shell", "spec": {"script": "true"}, "selectors": ["sim"]}))
        .expect("submit on node A");
    let (got, _) = poll.join().expect("poll thread");
    let waited = submitted.elapsed();
    assert_eq!(
        got.tasks.first().map(|t| t.task_id.as_str()),
        Some(task.as_str()),
        "node B's poll leased the task submitted on node A"
    );
    assert!(
        waited < Duration::from_secs(5),
        "picked up {waited:?} after the submit: not woken across nodes (the poll waits 30 s)\n\
         node A:\n{}\nnode B:\n{}",
        a.log_text(),
        b.log_text()
    );
}

#[test]
fn a_node_killed_mid_task_loses_nothing_and_the_task_runs_once_through_the_other() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pg = Postgres::start().expect("PostgreSQL starts");
    let (mut a, b) = two_nodes(tmp.path(), &pg, &["--lease-ttl", "10s"]);
    let relay = Relay::start(&a.addr);
    let token = b.token("agent").expect("token");
    let agent = Agent::start(
        tmp.path(),
        &relay.url(),
        &token,
        &AgentOptions {
            name: "agent-1".into(),
            acquire_wait: "10s",
            ..Default::default()
        },
    )
    .expect("agent starts");
    let runs = tmp.path().join("runs");
    let script = format!(
        "echo run >> {runs}; for i in $(seq 1 40); do echo \"line $i\"; sleep 0.1; done; exit 3",
        runs = runs.display()
    );
    let id = b.submit_shell(&script, 120, 2).expect("submit on node B");
    // The premise: part of the log went through node A and the task still runs when
    // node A dies.
    let t = wait_for(
        LONG,
        "a log line to reach the database through node A",
        || {
            let t = b.task(&id).ok()?;
            (t.log_bytes > 0).then_some(t)
        },
    )
    .expect("log shipped");
    assert_eq!(t.state, TaskState::Running, "{t:?}");
    relay.switch_to(&b.addr);
    a.kill9();
    let t = b.wait_done(&id, LONG).expect("finishes");
    assert_eq!(
        (t.state, t.exit_code, t.attempt),
        (TaskState::Failed, Some(3), 1),
        "{t:?}\nagent:\n{}\nnode B:\n{}",
        agent.log_text(),
        b.log_text()
    );
    let log = String::from_utf8(b.logs(&id).expect("logs")).expect("utf8");
    assert_eq!(log, numbered(40), "every line once, in order");
    assert_eq!(t.log_bytes, numbered(40).len() as u64);
    let ran = std::fs::read_to_string(&runs).expect("runs file");
    assert_eq!(ran, "run\n", "the script ran once");
}

#[test]
fn a_database_that_is_malformed_or_unreachable_stops_the_start_and_says_what_to_fix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let cases = [
        (
            format!("postgres://delegate:hunter2@127.0.0.1:{closed}/delegate"),
            "cannot connect to the PostgreSQL database",
        ),
        (
            "postgres://delegate@127.0.0.1:notaport/delegate".to_string(),
            "not a PostgreSQL connection URL",
        ),
        (
            "postgres://delegate@127.0.0.1/delegate?sslrootcert=/etc/ssl/ca.pem".to_string(),
            "sslmode=verify-full",
        ),
        (
            "mysql://delegate@127.0.0.1/delegate".to_string(),
            "not supported",
        ),
    ];
    for (i, (url, says)) in cases.iter().enumerate() {
        let data = tmp.path().join(format!("data-{i}"));
        let out = Command::new(bin("delegate-manager").expect("bin"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database",
                url,
                "--data",
            ])
            .arg(&data)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: started\n{err}");
        assert!(err.contains(says), "{url}: {err}");
        assert!(!err.contains("hunter2"), "the password is shown: {err}");
        assert!(
            err.contains("postgres://") || err.contains("--database"),
            "{url}: the message names neither the URL nor the flag: {err}"
        );
        assert!(
            !data.join("admin.token").exists(),
            "{url}: an admin token was written for a manager that did not start"
        );
    }
}

/// `sslmode=verify-full` with the CA that signed the server's certificate: the node works
/// and its connections are TLS ones (`pg_stat_ssl`); with another CA the start is refused
/// naming the certificate; `sslmode=disable` still talks plain.
#[test]
fn tls_to_postgresql_verifies_the_server_with_sslrootcert_and_refuses_another_ca() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pg = Postgres::start().expect("PostgreSQL starts");
    let pki = delegate_tests::tls::make_pki(tmp.path(), "pg").expect("pki");
    let stranger = delegate_tests::tls::make_pki(tmp.path(), "stranger").expect("pki");
    pg.enable_tls(&pki).expect("TLS on");
    let tls_url = |ca: &Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.url(),
            ca.display()
        )
    };

    let url = tls_url(&pki.ca_cert);
    std::fs::create_dir_all(tmp.path().join("node")).expect("root");
    let node = Manager::start_with(
        &tmp.path().join("node"),
        "127.0.0.1:0",
        &["--database", &url],
    )
    .expect("a node on TLS starts");
    let token = node.token("tls").expect("a token is stored through TLS");
    assert!(token.starts_with("dlg_"), "{token}");
    let tls_connections = pg
        .psql(
            "delegate",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'delegate-manager' AND ssl",
        )
        .expect("pg_stat_ssl");
    let plain_connections = pg
        .psql(
            "delegate",
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'delegate-manager' AND NOT ssl",
        )
        .expect("pg_stat_ssl");
    assert!(
        tls_connections.parse::<u32>().expect("a count") >= 1,
        "no TLS connection of the node: {tls_connections}"
    );
    assert_eq!(plain_connections, "0", "the node has plain connections too");
    drop(node);

    let data = tmp.path().join("refused");
    let out = Command::new(bin("delegate-manager").expect("bin"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database"])
        .arg(tls_url(&stranger.ca_cert))
        .arg("--data")
        .arg(&data)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with a CA that did not sign the server's certificate\n{err}"
    );
    assert!(
        err.contains("cannot connect to the PostgreSQL database"),
        "{err}"
    );
    assert!(
        err.to_lowercase().contains("certificate"),
        "the cause is not named: {err}"
    );
    assert!(!data.join("admin.token").exists(), "{err}");
}

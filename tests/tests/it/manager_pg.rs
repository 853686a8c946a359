//! Several manager nodes on one PostgreSQL: a submit on one node wakes a long
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
    let pg = delegate_tests::require!(Postgres::for_test());
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
    let pg = delegate_tests::require!(Postgres::for_test());
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
    let pg = delegate_tests::require!(Postgres::for_test());
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

/// A `?password=` in the URL must not be logged at INFO at every start, nor a mistyped
/// URL echoed whole by the argument parser: both show `***`. The password can live in a file instead (`--database-password-file`), here
/// against a role that must log in with it.
#[test]
fn postgres_passwords_stay_out_of_logs_and_errors_and_a_password_file_works() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pg = delegate_tests::require!(Postgres::for_test());
    // Trust on loopback for this role: any password gets in, so the start succeeds.
    let url = format!(
        "postgres://delegate:hunter2@127.0.0.1:{}/delegate?application_name=x&password=hunter3",
        pg.port()
    );
    std::fs::create_dir_all(tmp.path().join("a")).expect("dir");
    let m = Manager::start_with(&tmp.path().join("a"), "127.0.0.1:0", &["--database", &url])
        .expect("node starts");
    let log = m.log_text();
    assert!(log.contains("(PostgreSQL)"), "{log}");
    assert!(
        !log.contains("hunter2") && !log.contains("hunter3"),
        "a password is in the log:\n{log}"
    );
    assert!(
        !log.contains("plain text"),
        "a loopback connection is not worth a warning:\n{log}"
    );
    drop(m);

    // A mistyped scheme, and a URL the client library cannot parse.
    for url in [
        "postgress://delegate:hunter2@127.0.0.1/delegate?password=hunter3".to_string(),
        format!(
            "postgres://delegate:hunter2@127.0.0.1:{}/delegate?password=hunter3&sslmode=bogus",
            pg.port()
        ),
    ] {
        let out = Command::new(bin("delegate-manager").expect("bin"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database",
                &url,
                "--data",
            ])
            .arg(tmp.path().join("bad"))
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: started");
        assert!(
            !err.contains("hunter2") && !err.contains("hunter3"),
            "the password is shown: {err}"
        );
        assert!(err.contains("***"), "{err}");
    }

    // A role that needs its password: from the file it starts, without it it does not.
    pg.add_password_user("pwuser", "s3cret-pw")
        .expect("password role");
    let url = format!("postgres://pwuser@127.0.0.1:{}/pwuser", pg.port());
    let file = tmp.path().join("pg-password");
    std::fs::write(&file, "s3cret-pw\n").expect("write");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    std::fs::create_dir_all(tmp.path().join("b")).expect("dir");
    let file_arg = file.to_str().expect("utf-8 path");
    let m = Manager::start_with(
        &tmp.path().join("b"),
        "127.0.0.1:0",
        &["--database", &url, "--database-password-file", file_arg],
    )
    .expect("starts with the password from the file");
    assert!(!m.log_text().contains("s3cret-pw"));
    drop(m);
    let out = Command::new(bin("delegate-manager").expect("bin"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            &url,
            "--data",
        ])
        .arg(tmp.path().join("c"))
        .output()
        .expect("run");
    assert!(!out.status.success(), "started without the password");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect"), "{err}");
    // The file and a password in the URL: one place only.
    let both = format!("postgres://pwuser:other@127.0.0.1:{}/pwuser", pg.port());
    let out = Command::new(bin("delegate-manager").expect("bin"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database", &both])
        .args(["--database-password-file", file_arg, "--data"])
        .arg(tmp.path().join("d"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("one place"), "{err}");
    assert!(!err.contains("other@"), "{err}");
}

/// GET /api/v1/tasks on `m` with `token`: the status.
fn admin_status(m: &Manager, token: &str) -> u16 {
    reqwest::blocking::Client::new()
        .get(format!("{}/api/v1/tasks", m.url()))
        .bearer_auth(token)
        .send()
        .expect("request")
        .status()
        .as_u16()
}

/// Every node reads the admin token's hash from the database, not from its start: after
/// a rotation (one node restarted with the hash deleted, writing a new token) the old
/// token must stop working on the other nodes too, and the new one work there.
#[test]
fn a_rotated_admin_token_stops_working_on_every_node_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pg = delegate_tests::require!(Postgres::for_test());
    let (a, b) = two_nodes(tmp.path(), &pg, &[]);
    let old = a.admin_token.clone();
    assert_eq!(admin_status(&b, &old), 200);
    drop(a);
    pg.psql(
        postgres_db(),
        "DELETE FROM meta WHERE key = 'admin_token_sha256'",
    )
    .expect("delete the hash");
    let a = Manager::start_with(
        &tmp.path().join("a"),
        "127.0.0.1:0",
        &["--database", &pg.url()],
    )
    .expect("node A starts again");
    let new = a.admin_token.clone();
    assert_ne!(new, old, "no new token was written");
    assert_eq!(
        admin_status(&b, &old),
        401,
        "the old token still works on node B"
    );
    assert_eq!(
        admin_status(&b, &new),
        200,
        "the new token does not work on node B"
    );
    assert_eq!(admin_status(&a, &new), 200);
}

fn postgres_db() -> &'static str {
    delegate_tests::postgres::DATABASE
}

/// A `delegate-manager serve` started without waiting for it, killed on drop.
struct Starting {
    child: std::process::Child,
    data: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Starting {
    fn spawn(root: &Path, name: &str, url: &str) -> Starting {
        let data = root.join(name);
        let log = root.join(format!("{name}.log"));
        let child = Command::new(bin("delegate-manager").expect("bin"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database",
                url,
                "--data",
            ])
            .arg(&data)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn");
        Starting { child, data, log }
    }

    fn url(&self) -> String {
        let addr = wait_for(Duration::from_secs(20), "the node to listen", || {
            let text = std::fs::read_to_string(&self.log).ok()?;
            let line = text.lines().find(|l| l.contains("listening on "))?;
            Some(
                line.split("listening on ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
        .expect("listening");
        format!("http://{addr}")
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nodes started at once on a new database must not each write an admin token (the
/// database kept the last one, and the other node's token file held a token that worked
/// nowhere): the first claim wins, and only the winner writes a
/// token file. Several rounds, each on a fresh database, because the race is one of
/// timing.
#[test]
fn nodes_starting_together_on_a_new_database_agree_on_one_admin_token() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pg = delegate_tests::require!(Postgres::for_test());
    for round in 0..6 {
        let db = format!("round{round}");
        pg.psql("postgres", &format!("CREATE DATABASE {db}"))
            .expect("create database");
        let url = format!("postgres://delegate@127.0.0.1:{}/{db}", pg.port());
        let root = tmp.path().join(&db);
        std::fs::create_dir_all(&root).expect("dir");
        let nodes = [
            Starting::spawn(&root, "a", &url),
            Starting::spawn(&root, "b", &url),
        ];
        let urls: Vec<String> = nodes.iter().map(Starting::url).collect();
        let tokens: Vec<String> = nodes
            .iter()
            .filter_map(|n| std::fs::read_to_string(n.data.join("admin.token")).ok())
            .map(|t| t.trim().to_string())
            .collect();
        assert!(
            !tokens.is_empty(),
            "round {round}: no node wrote an admin token"
        );
        for token in &tokens {
            for url in &urls {
                let status = reqwest::blocking::Client::new()
                    .get(format!("{url}/api/v1/tasks"))
                    .bearer_auth(token)
                    .send()
                    .expect("request")
                    .status()
                    .as_u16();
                assert_eq!(
                    status, 200,
                    "round {round}: an admin.token a node wrote does not work on {url}"
                );
            }
        }
    }
}

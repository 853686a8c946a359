//! The manager's trust boundaries (docs/security.md), tried as an attacker would against the real
//! binary on loopback: a token holder must not become another delegate, nor lease work
//! after its token is revoked, nor read files outside the release directory, nor starve
//! the manager of connections.

use std::time::Duration;

use delegate_protocol::{ErrorBody, ErrorCode};
use delegate_tests::Manager;
use serde_json::{Value, json};

use crate::util::World;

/// A delegate's HTTP calls, with its bearer token.
struct Caller {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Caller {
    fn new(m: &Manager, token: &str) -> Caller {
        Caller {
            base: m.url(),
            token: token.to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        }
    }

    /// POST JSON; the status and the JSON answer (Null when there is none).
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .expect("send");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn register(&self, name: &str, hostname: &str, tags: &[&str]) -> (u16, Value) {
        self.post(
            "/delegates/register",
            &json!({"name": name, "hostname": hostname, "version": "0.1.0",
                    "tags": tags, "capacity": 1}),
        )
    }
}

fn error_of(v: &Value) -> ErrorBody {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("not an error body ({e}): {v}"))
}

/// Identity takeover, reproduced: a second token registered with the victim's name and
/// hostname and took its id, its leased task (secrets in the spec) and could post its
/// result.
#[test]
fn a_second_token_cannot_take_over_a_delegate_by_name_and_host() {
    let w = World::new();
    let m = &w.manager;
    let victim = Caller::new(m, &w.token);
    let (status, reg) = victim.register("victim", "vm-1", &["linux"]);
    assert_eq!(status, 200, "{reg}");
    let victim_id = reg["delegate_id"].as_str().expect("id").to_string();
    let task = m
        .submit(&json!({"kind": "shell", "spec": {"script": "echo $SECRET",
                        "env": {"SECRET": "hunter2"}}}))
        .expect("submit");
    let (status, got) = victim.post(
        &format!("/delegates/{victim_id}/acquire?wait=0"),
        &json!({}),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["tasks"][0]["task_id"], task.as_str());

    let attacker_token = m.token("attacker").expect("token");
    let attacker = Caller::new(m, &attacker_token);
    let (status, body) = attacker.register("victim", "vm-1", &["linux"]);
    assert_eq!(status, 409, "the takeover must be refused: {body}");
    let err = error_of(&body);
    assert_eq!(err.error.code, ErrorCode::NameTaken);
    assert!(
        err.error.message.contains("token \"test\"")
            && err
                .error
                .message
                .contains("delegate-manager delegates forget victim --host vm-1"),
        "{}",
        err.error.message
    );
    // Not the victim's id, so nothing of its task either.
    let (status, _) = attacker.post(
        &format!("/tasks/{task}/result?attempt=1"),
        &json!({"outcome": "succeeded", "exit_code": 0}),
    );
    assert_eq!(
        status, 409,
        "the attacker must not report the victim's task"
    );
    assert_eq!(
        m.task(&task).expect("task").delegate_id.as_deref(),
        Some(victim_id.as_str())
    );

    // An admin moves the name: `delegates forget` frees it and re-queues the task.
    let (st, _, err) = m
        .cli(&["delegates", "forget", "victim", "--host", "vm-1"])
        .expect("cli");
    assert!(st.success(), "{err}");
    assert!(err.contains("forgotten"), "{err}");
    let (status, body) = attacker.register("victim", "vm-1", &[]);
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["delegate_id"].as_str(), Some(victim_id.as_str()));
}

#[test]
fn revoking_a_token_frees_the_names_it_held() {
    let w = World::new();
    let m = &w.manager;
    let first = Caller::new(m, &w.token);
    assert_eq!(first.register("web-1", "vm-1", &[]).0, 200);
    let second = Caller::new(m, &m.token("rotated").expect("token"));
    assert_eq!(second.register("web-1", "vm-1", &[]).0, 409);
    let (st, _, err) = m.cli(&["token", "revoke", "test"]).expect("cli");
    assert!(st.success(), "{err}");
    let (status, body) = second.register("web-1", "vm-1", &[]);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn a_token_with_a_tag_set_cannot_register_other_tags() {
    let w = World::new();
    let m = &w.manager;
    let (st, token, err) = m
        .cli(&[
            "token", "create", "--name", "eu-hosts", "--tags", "linux,eu",
        ])
        .expect("cli");
    assert!(st.success(), "{err}");
    let c = Caller::new(m, token.trim());
    let (status, body) = c.register("eu-1", "vm-1", &["linux", "gpu"]);
    assert_eq!(status, 403, "{body}");
    let err = error_of(&body);
    assert_eq!(err.error.code, ErrorCode::TagsNotAllowed);
    assert!(err.error.message.contains("[gpu]"), "{}", err.error.message);
    assert_eq!(c.register("eu-1", "vm-1", &["eu"]).0, 200);
    let (_, list, _) = m.cli(&["token", "list"]).expect("cli");
    assert!(list.contains("linux,eu"), "{list}");
}

/// Release files outside the directory, reproduced: `/releases/` followed `rel/pw -> /etc/passwd` and served
/// it, unauthenticated.
#[test]
fn releases_do_not_follow_symlinks_out_of_the_release_directory() {
    use std::os::unix::fs::symlink;
    let tmp = tempfile::tempdir().expect("tempdir");
    let rel = tmp.path().join("rel");
    std::fs::create_dir_all(rel.join("channels")).expect("mkdir");
    std::fs::write(rel.join("channels/stable.json"), b"{\"version\":\"1.0.0\"}").expect("write");
    symlink("/etc/passwd", rel.join("pw")).expect("symlink");
    symlink("..", rel.join("up")).expect("symlink");
    symlink("channels/stable.json", rel.join("latest.json")).expect("symlink");
    let rel_arg = rel.to_str().expect("utf-8 path");
    let m =
        Manager::start_with(tmp.path(), "127.0.0.1:0", &["--releases", rel_arg]).expect("manager");
    let http = reqwest::blocking::Client::new();
    let get = |path: &str| {
        let r = http
            .get(format!("{}/releases/{path}", m.url()))
            .send()
            .expect("get");
        (r.status().as_u16(), r.text().unwrap_or_default())
    };
    for path in [
        "pw",
        "up/manager/admin.token",
        "channels",
        "../manager/admin.token",
    ] {
        let (status, body) = get(path);
        assert_eq!(status, 404, "{path} answered {status}: {body}");
        assert!(
            !body.contains("root:") && !body.contains("adm_"),
            "{path} leaked: {body}"
        );
    }
    assert_eq!(
        get("channels/stable.json"),
        (200, "{\"version\":\"1.0.0\"}".into())
    );
    assert_eq!(
        get("latest.json").0,
        200,
        "a link inside the directory is served"
    );
}

/// Connection exhaustion, reproduced: 300 half-open connections (a request head never
/// finished) made `/healthz` time out; nothing ever closed them.
#[test]
fn half_open_connections_neither_starve_the_manager_nor_stay_open() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    const HALF_OPEN: usize = 300;
    let header_timeout = Duration::from_secs(2);
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = Manager::start_with(
        tmp.path(),
        "127.0.0.1:0",
        &["--header-timeout", "2s", "--idle-timeout", "2s"],
    )
    .expect("manager");
    let token = m.token("t").expect("token");
    let caller = Caller::new(&m, &token);
    let (status, reg) = caller.register("d", "h", &[]);
    assert_eq!(status, 200, "{reg}");
    let id = reg["delegate_id"].as_str().expect("id").to_string();

    // A long poll that outlives the header timeout: the manager is the one waiting.
    let poll_url = format!("{}/api/v1/delegates/{id}/acquire?wait=4", m.url());
    let poll_token = token.clone();
    let poll = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = reqwest::blocking::Client::new()
            .post(poll_url)
            .bearer_auth(poll_token)
            .send()
            .expect("long poll");
        (r.status().as_u16(), t0.elapsed())
    });

    let opened = Instant::now();
    let mut half_open: Vec<TcpStream> = (0..HALF_OPEN)
        .map(|_| {
            let mut s = TcpStream::connect(&m.addr).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .expect("half a request");
            s
        })
        .collect();

    let t0 = Instant::now();
    let r = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
        .get(format!("{}/healthz", m.url()))
        .send()
        .expect("/healthz answers while 300 half-open connections are held");
    assert_eq!(r.status().as_u16(), 200);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "/healthz took {took:?}");

    // A stalled request body is refused after the idle timeout.
    let mut stalled = TcpStream::connect(&m.addr).expect("connect");
    write!(
        stalled,
        "POST /api/v1/delegates/register HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    )
    .expect("stalled body");

    // Every half-open connection is closed by the manager after the header timeout.
    let limit = header_timeout + Duration::from_secs(5);
    for s in &mut half_open {
        let left = limit
            .saturating_sub(opened.elapsed())
            .max(Duration::from_millis(10));
        s.set_read_timeout(Some(left)).expect("timeout");
        let mut buf = Vec::new();
        if let Err(e) = s.read_to_end(&mut buf) {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "a half-open connection was still open {:?} after it was made",
                opened.elapsed()
            );
        }
    }
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= header_timeout - Duration::from_millis(200),
        "{closed_after:?}"
    );

    stalled
        .set_read_timeout(Some(Duration::from_secs(6)))
        .expect("timeout");
    let mut answer = String::new();
    let _ = stalled.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "stalled body got: {answer:?}"
    );

    let (status, took) = poll.join().expect("poll thread");
    assert_eq!(status, 204, "the long poll ran its course");
    assert!(
        took >= Duration::from_secs(4),
        "the long poll was cut after {took:?}"
    );
}

/// Run the manager CLI against `server` with extra global flags; (success, stdout, stderr).
fn cli_at(server: &str, admin: &str, flags: &[&str], args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(delegate_tests::bin("delegate-manager").expect("bin"))
        .args(["--server", server, "--admin-token", admin])
        .args(flags)
        .args(args)
        .env_remove("DELEGATE_MANAGER_CA_FILE")
        .output()
        .expect("run the CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// No clear-text secrets: the manager serves HTTPS with the certificate it is given, and the CLI
/// trusts exactly the CA in `--ca-file`, refusing another with a clear error.
#[test]
fn manager_serves_tls_and_the_cli_trusts_only_the_given_ca() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let good = delegate_tests::tls::make_pki(tmp.path(), "good").expect("pki");
    let other = delegate_tests::tls::make_pki(tmp.path(), "other").expect("pki");
    let path = |p: &std::path::Path| p.to_str().expect("utf-8 path").to_string();
    let (cert, key) = (path(&good.server_cert), path(&good.server_key));
    let m = Manager::start_with(
        tmp.path(),
        "127.0.0.1:0",
        &["--tls-cert", &cert, "--tls-key", &key],
    )
    .expect("manager");
    assert!(m.log_text().contains("(https)"), "{}", m.log_text());
    let server = format!("https://{}", m.addr);
    let admin = m.admin_token.clone();

    let ca = path(&good.ca_cert);
    let (ok, token, err) = cli_at(
        &server,
        &admin,
        &["--ca-file", &ca],
        &["token", "create", "--name", "tls"],
    );
    assert!(ok, "{err}");
    assert!(token.starts_with("dlg_"), "{token}");

    let wrong = path(&other.ca_cert);
    let (ok, _, err) = cli_at(&server, &admin, &["--ca-file", &wrong], &["token", "list"]);
    assert!(!ok, "a certificate from another CA was trusted");
    assert!(
        err.contains("did not verify")
            && err.contains("--ca-file")
            && err.contains("UnknownIssuer"),
        "unclear refusal: {err}"
    );
    // Without --ca-file the test CA is not among the trusted roots either.
    let (ok, _, err) = cli_at(&server, &admin, &[], &["token", "list"]);
    assert!(!ok && err.contains("--ca-file"), "{err}");
    // Plain http to the TLS port gets no answer from the API.
    let (ok, _, _) = cli_at(
        &format!("http://{}", m.addr),
        &admin,
        &[],
        &["token", "list"],
    );
    assert!(!ok);
}

/// No clear-text secrets at rest: the database (specs hold secrets) is private even when the data
/// directory existed with a loose mode.
#[test]
fn data_dir_and_database_are_private_even_when_the_dir_existed() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("manager");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let m = Manager::start(tmp.path()).expect("manager");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&m.data), 0o700);
    assert_eq!(mode(&m.data.join("manager.db")), 0o600);
}

/// Found while testing the above: with its stderr pipe closed (a log reader that died),
/// the manager's stop line panicked the logger and SIGTERM no longer stopped it.
#[test]
fn sigterm_stops_the_manager_even_when_its_stderr_is_gone() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    let tmp = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(delegate_tests::bin("delegate-manager").expect("bin"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("m"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let listening = lines
        .by_ref()
        .take(20)
        .map_while(Result::ok)
        .any(|l| l.contains("listening on"));
    assert!(listening, "the manager did not say it listens");
    drop(lines); // the reader goes away
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the manager did not stop within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

/// A long poll of delegate `id` with `token` on a connection of its own, in a thread:
/// (status, how long it took).
fn long_poll(
    m: &Manager,
    token: &str,
    id: &str,
    wait: u64,
) -> std::thread::JoinHandle<(u16, Duration)> {
    let url = format!("{}/api/v1/delegates/{id}/acquire?wait={wait}", m.url());
    let token = token.to_string();
    std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let r = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client")
            .post(url)
            .bearer_auth(token)
            .send()
            .expect("long poll");
        (r.status().as_u16(), t0.elapsed())
    })
}

/// Long polls per token, reproduced: the delegates of one token opened as many long polls as
/// the manager has connection slots, and another token's delegate could not heartbeat
/// (its connection waited in the backlog until the polls ran out). Now a token holds at
/// most half the slots (more polls get 429 and their connection is closed), and a
/// delegate holds one poll: a second one ends the first.
#[test]
fn one_tokens_long_polls_cannot_hold_every_connection_slot() {
    const SLOTS: usize = 8;
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = Manager::start_with(
        tmp.path(),
        "127.0.0.1:0",
        &["--max-connections", &SLOTS.to_string()],
    )
    .expect("manager");
    let greedy = m.token("greedy").expect("token");
    let other = m.token("other").expect("token");
    let g = Caller::new(&m, &greedy);
    let ids: Vec<String> = (0..SLOTS)
        .map(|i| {
            let (status, reg) = g.register(&format!("g{i}"), "h", &[]);
            assert_eq!(status, 200, "{reg}");
            reg["delegate_id"].as_str().expect("id").to_string()
        })
        .collect();
    let victim = Caller::new(&m, &other);
    let (status, reg) = victim.register("victim", "h2", &[]);
    assert_eq!(status, 200, "{reg}");
    let victim_id = reg["delegate_id"].as_str().expect("id").to_string();
    drop((g, victim));

    let polls: Vec<_> = ids.iter().map(|id| long_poll(&m, &greedy, id, 8)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let t0 = std::time::Instant::now();
    let hb = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
        .post(format!(
            "{}/api/v1/delegates/{victim_id}/heartbeat",
            m.url()
        ))
        .bearer_auth(&other)
        .json(&json!({"state": "running", "in_flight": []}))
        .send()
        .expect("another token's heartbeat is answered while one token polls on every slot");
    assert_eq!(hb.status().as_u16(), 200);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    let mut statuses: Vec<u16> = polls
        .into_iter()
        .map(|p| p.join().expect("poll thread").0)
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [204, 204, 204, 204, 429, 429, 429, 429],
        "half the slots for one token"
    );

    // One delegate, two polls: the second ends the first at once.
    let first = long_poll(&m, &greedy, &ids[0], 30);
    std::thread::sleep(Duration::from_millis(500));
    let second = long_poll(&m, &greedy, &ids[0], 1);
    let (status, took) = first.join().expect("first poll");
    assert_eq!(status, 204);
    assert!(
        took < Duration::from_secs(10),
        "the first poll ran {took:?}"
    );
    assert_eq!(second.join().expect("second poll").0, 204);
}

/// Terminal escapes in names, reproduced: a delegate registered a name holding terminal escapes,
/// and `delegate-manager delegates` wrote them raw to the admin's terminal (here an OSC
/// title change and a screen clear). Registration now refuses such a name, hostname,
/// version or tag with a 400 naming the field; what a delegate still controls (a task's
/// result message, its log) reaches the terminal escaped: `task show` always, `task logs`
/// on a terminal unless `--raw`.
#[test]
fn strings_a_delegate_chooses_cannot_drive_the_admins_terminal() {
    const EVIL: &str = "x\u{1b}]0;pwned\u{7}\u{1b}[2J";
    let w = World::new();
    let m = &w.manager;
    let d = Caller::new(m, &w.token);
    for (field, body) in [
        (
            "name",
            json!({"name": EVIL, "hostname": "h", "version": "1.0.0", "capacity": 1}),
        ),
        (
            "hostname",
            json!({"name": "n", "hostname": EVIL, "version": "1.0.0", "capacity": 1}),
        ),
        (
            "version",
            json!({"name": "n", "hostname": "h", "version": EVIL, "capacity": 1}),
        ),
        (
            "tags[0]",
            json!({"name": "n", "hostname": "h", "version": "1.0.0", "capacity": 1,
                          "tags": [EVIL]}),
        ),
    ] {
        let (status, got) = d.post("/delegates/register", &body);
        assert_eq!(status, 400, "{field}: {got}");
        let err = error_of(&got);
        assert_eq!(err.error.code, ErrorCode::BadRequest);
        assert!(
            err.error
                .message
                .starts_with(&format!("register: {field}: ")),
            "{}",
            err.error.message
        );
        assert!(
            !err.error.message.contains('\u{1b}'),
            "{}",
            err.error.message
        );
    }
    let (st, out, _) = m.cli(&["delegates"]).expect("cli");
    assert!(st.success());
    assert!(
        !out.contains("pwned"),
        "a refused delegate is listed:\n{out}"
    );

    // A task's result message and log are the delegate's to choose.
    let (status, reg) = d.register("honest", "h", &[]);
    assert_eq!(status, 200, "{reg}");
    let id = reg["delegate_id"].as_str().expect("id").to_string();
    let task = m.submit_shell("true", 60, 0).expect("submit");
    let (status, got) = d.post(&format!("/delegates/{id}/acquire?wait=0"), &json!({}));
    assert_eq!(status, 200, "{got}");
    let resp = reqwest::blocking::Client::new()
        .post(format!(
            "{}/api/v1/tasks/{task}/logs?attempt=1&offset=0",
            m.url()
        ))
        .bearer_auth(&w.token)
        .body(format!("line one\n{EVIL}\n"))
        .send()
        .expect("log");
    assert_eq!(resp.status().as_u16(), 200);
    let (status, got) = d.post(
        &format!("/tasks/{task}/result?attempt=1"),
        &json!({"outcome": "failed", "exit_code": 1, "message": EVIL}),
    );
    assert_eq!(status, 200, "{got}");
    let (st, out, err) = m.cli(&["task", "show", &task]).expect("cli");
    assert!(st.success(), "{err}");
    assert!(
        !out.contains('\u{1b}') && !out.contains('\u{7}'),
        "raw escape in:\n{out:?}"
    );
    assert!(out.contains("x\\u{1b}]0;pwned\\u{7}\\u{1b}[2J"), "{out}");

    // `task logs` into a pipe stays byte for byte; on a terminal (script(1) gives it one)
    // it is escaped unless --raw.
    let (st, out, _) = m.cli(&["task", "logs", &task]).expect("cli");
    assert!(st.success());
    assert_eq!(out, format!("line one\n{EVIL}\n"));
    let on_tty = |extra: &str| -> String {
        let cmd = format!(
            "{} --server {} --admin-token {} task logs {task} {extra}",
            delegate_tests::bin("delegate-manager")
                .expect("bin")
                .display(),
            m.url(),
            m.admin_token
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .output()
            .expect("script(1) runs (util-linux)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let escaped = on_tty("");
    assert!(
        !escaped.contains('\u{1b}'),
        "raw escape on a terminal: {escaped:?}"
    );
    assert!(
        escaped.contains("x\\u{1b}]0;pwned\\u{7}\\u{1b}[2J"),
        "{escaped:?}"
    );
    assert!(on_tty("--raw").contains(EVIL));
}

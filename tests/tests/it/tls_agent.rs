//! The agent's `ca_file`: a manager behind a certificate from a private CA is trusted when
//! that CA is configured, and refused with an error saying what to set when it is not
//! (clear-text secrets, docs/security.md). The server is the fake manager serving HTTPS; the CA and the
//! certificate are made by the test with `openssl`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::tls::{TestPki, make_pki};
use delegate_tests::{Agent, AgentOptions, Manager, wait_for};

use crate::fake_manager::{Behaviour, FakeManager};
use crate::util::LONG;

/// A fake manager on HTTPS with a certificate from the CA `ca`, and a second, unrelated CA.
fn tls_manager() -> (FakeManager, tempfile::TempDir, TestPki, TestPki) {
    let tmp = tempfile::tempdir().expect("tmp");
    let ca = make_pki(tmp.path(), "ca").expect("pki");
    let other = make_pki(tmp.path(), "other-ca").expect("pki");
    let fake = FakeManager::start(Behaviour {
        tls: Some((ca.server_cert.clone(), ca.server_key.clone())),
        ..Behaviour::default()
    });
    assert!(fake.url.starts_with("https://127.0.0.1:"), "{}", fake.url);
    (fake, tmp, ca, other)
}

fn agent_with_ca(url: &str, token: &str, tmp: &Path, ca: &Path) -> Agent {
    Agent::start(
        tmp,
        url,
        token,
        &AgentOptions {
            extra: format!("ca_file = {:?}\n", ca.display().to_string()),
            ..AgentOptions::default()
        },
    )
    .expect("agent starts")
}

#[test]
fn with_ca_file_the_agent_trusts_a_manager_certificate_from_a_private_ca() {
    let (fake, tmp, ca, _) = tls_manager();
    let a = agent_with_ca(&fake.url, "dlg_fake", tmp.path(), &ca.ca_cert);
    wait_for(LONG, "a heartbeat over TLS", || {
        (fake.seen.heartbeats.load(Ordering::SeqCst) > 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", a.log_text()));
    assert!(!a.log_text().contains("clear text"), "{}", a.log_text());
}

#[test]
fn a_certificate_from_another_ca_is_refused_with_an_error_that_names_ca_file() {
    let (fake, tmp, _, other) = tls_manager();
    let a = agent_with_ca(&fake.url, "dlg_fake", tmp.path(), &other.ca_cert);
    a.wait_log(
        "presented a TLS certificate this agent does not trust",
        LONG,
    )
    .expect("refused");
    let log = a.log_text();
    assert!(log.contains("set ca_file"), "{log}");
    assert!(log.contains("UnknownIssuer"), "{log}");
    assert_eq!(fake.seen.registers.load(Ordering::SeqCst), 0, "{log}");
}

/// The whole path over TLS against the real manager (`serve --tls-cert --tls-key`): the
/// agent with `ca_file` registers, runs a task and ships its log and result.
#[test]
fn a_task_runs_end_to_end_against_the_real_manager_over_tls() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = make_pki(tmp.path(), "ca").expect("pki");
    let m = Manager::start_tls(tmp.path(), &pki).expect("manager");
    assert!(m.url().starts_with("https://"), "{}", m.url());
    let token = m.token("tls-agent").expect("token");
    let a = agent_with_ca(&m.url(), &token, tmp.path(), &pki.ca_cert);
    let id = m.submit_shell("echo over-tls", 30, 0).expect("submit");
    let t = m
        .wait_state(&id, &[TaskState::Succeeded], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}:\n{}", a.log_text()));
    assert_eq!(t.exit_code, Some(0));
    assert_eq!(m.logs(&id).expect("logs"), b"over-tls\n");
}

/// `delegate run` whose system roots are `system_roots` only: `SSL_CERT_FILE`, which the
/// TLS stack's platform verifier reads on Linux, stands for a public CA the host trusts.
struct AgentWithRoots {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl AgentWithRoots {
    fn start(url: &str, dir: &Path, system_roots: &Path, ca_file: Option<&Path>) -> Self {
        std::fs::create_dir_all(dir).expect("dir");
        let ca = ca_file
            .map(|c| format!("ca_file = {:?}\n", c.display().to_string()))
            .unwrap_or_default();
        let config = dir.join("delegate.toml");
        std::fs::write(
            &config,
            format!(
                "manager_url = {url:?}\ntoken = \"dlg_fake\"\nname = \"pinned\"\nstate_dir = {:?}\n{ca}",
                dir.join("state").display().to_string()
            ),
        )
        .expect("config");
        let empty = dir.join("no-cert-dir");
        std::fs::create_dir_all(&empty).expect("dir");
        let log = dir.join("agent.log");
        let child = std::process::Command::new(delegate_tests::bin("delegate").expect("binary"))
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("DELEGATE_TOKEN")
            .env_remove("DELEGATE_MANAGER_URL")
            .env_remove("DELEGATE_CA_FILE")
            .env("SSL_CERT_FILE", system_roots)
            .env("SSL_CERT_DIR", &empty)
            .env("RUST_LOG", "info,delegate=debug")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn delegate");
        AgentWithRoots { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentWithRoots {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `ca_file`, only that CA is trusted. The manager's certificate
/// here is from a CA the system trusts (`SSL_CERT_FILE`) but not from `ca_file`'s: the old
/// agent merged `ca_file` into the system's roots and registered; now it refuses. Without
/// `ca_file` the same system roots are trusted, which shows the stand-in works.
#[test]
fn with_ca_file_a_manager_certificate_from_a_system_trusted_ca_is_refused() {
    let (fake, tmp, public, private) = tls_manager();
    let pinned = AgentWithRoots::start(
        &fake.url,
        &tmp.path().join("pinned"),
        &public.ca_cert,
        Some(&private.ca_cert),
    );
    // Whichever comes first: the refusal, or (the old agent) a registration.
    wait_for(LONG, "the agent to refuse the certificate", || {
        (fake.seen.registers.load(Ordering::SeqCst) > 0
            || pinned
                .log_text()
                .contains("presented a TLS certificate this agent does not trust"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", pinned.log_text()));
    assert_eq!(
        fake.seen.registers.load(Ordering::SeqCst),
        0,
        "{}",
        pinned.log_text()
    );
    drop(pinned);

    let unpinned = AgentWithRoots::start(
        &fake.url,
        &tmp.path().join("unpinned"),
        &public.ca_cert,
        None,
    );
    wait_for(
        LONG,
        "the agent to register through the system roots",
        || (fake.seen.registers.load(Ordering::SeqCst) > 0).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}", unpinned.log_text()));
}

//! The agent's `ca_file`: a manager behind a certificate from a private CA is trusted when
//! that CA is configured, and refused with an error saying what to set when it is not
//! (issue 7, item 8). The server is the fake manager serving HTTPS; the CA and the
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

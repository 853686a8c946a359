//! The agent's `ca_file`: a manager behind a certificate from a private CA is trusted when
//! that CA is configured, and refused with an error saying what to set when it is not
//! (issue 7, item 8). The server is the fake manager serving HTTPS; the CA and the
//! certificate are made by the test with `openssl`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

use delegate_tests::{Agent, AgentOptions, wait_for};

use crate::fake_manager::{Behaviour, FakeManager};
use crate::util::LONG;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the TLS tests need the openssl CLI (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `NAME.pem`/`NAME.key` in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (pem, key) = (format!("{name}.pem"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &format!("/CN=delegate test {name}"),
        ],
    );
    dir.join(pem)
}

/// A server certificate for 127.0.0.1 signed by the CA `ca`; (cert, key).
fn make_server_cert(dir: &Path, ca: &str) -> (PathBuf, PathBuf) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    (dir.join("server.pem"), dir.join("server.key"))
}

/// A fake manager on HTTPS with a certificate from `ca`, and the test's temp dir.
fn tls_manager() -> (FakeManager, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tmp");
    make_ca(tmp.path(), "ca");
    make_ca(tmp.path(), "other-ca");
    let cert = make_server_cert(tmp.path(), "ca");
    let fake = FakeManager::start(Behaviour {
        tls: Some(cert),
        ..Behaviour::default()
    });
    assert!(fake.url.starts_with("https://127.0.0.1:"), "{}", fake.url);
    (fake, tmp)
}

fn agent_with_ca(fake: &FakeManager, tmp: &Path, ca: &str) -> Agent {
    Agent::start(
        tmp,
        &fake.url,
        "dlg_fake",
        &AgentOptions {
            extra: format!(
                "ca_file = {:?}\n",
                tmp.join(format!("{ca}.pem")).display().to_string()
            ),
            ..AgentOptions::default()
        },
    )
    .expect("agent starts")
}

#[test]
fn with_ca_file_the_agent_trusts_a_manager_certificate_from_a_private_ca() {
    let (fake, tmp) = tls_manager();
    let a = agent_with_ca(&fake, tmp.path(), "ca");
    wait_for(LONG, "a heartbeat over TLS", || {
        (fake.seen.heartbeats.load(Ordering::SeqCst) > 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", a.log_text()));
    assert!(!a.log_text().contains("clear text"), "{}", a.log_text());
}

#[test]
fn a_certificate_from_another_ca_is_refused_with_an_error_that_names_ca_file() {
    let (fake, tmp) = tls_manager();
    let a = agent_with_ca(&fake, tmp.path(), "other-ca");
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

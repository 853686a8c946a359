//! A cluster that does not answer when the agent starts is offered once it does, without
//! restarting the agent, and is warned about once while it does not.

use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::{require, wait_for};
use serde_json::json;

use crate::world::{World, configmap, control_plane};

/// A TCP relay from a loopback port to the API server: the cluster "comes up" when it
/// starts. TLS passes through untouched (the server's certificate is for 127.0.0.1).
struct Relay {
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(port: u16, upstream: u16) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the relay port");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                            continue;
                        };
                        let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
                            continue;
                        };
                        std::thread::spawn(move || pipe(down, up));
                        std::thread::spawn(move || pipe(up2, down2));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => return,
                }
            }
        });
        Relay { stop }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_cluster_unreachable_at_start_is_offered_once_it_answers_without_a_restart() {
    let cp = require!(control_plane());
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let dir = tempfile::tempdir().expect("tmp");
    let kc = dir.path().join("late.yaml");
    let text = cp
        .kubeconfig_text(delegate_tests::kube::ADMIN_TOKEN)
        .replace(&cp.url(), &format!("https://127.0.0.1:{port}"));
    std::fs::write(&kc, text).expect("write");
    let w = require!(World::new(
        "late",
        &format!(
            "[[kubernetes]]\nname = \"late\"\nkubeconfig = {:?}\n",
            kc.display().to_string()
        ),
    ));
    let offered = || {
        w.manager.delegates().ok().is_some_and(|d| {
            d.iter()
                .flat_map(|d| d.targets.iter())
                .any(|t| t.kind == "kubernetes" && t.name.as_deref() == Some("late"))
        })
    };
    assert!(!offered(), "not offered while it does not answer");
    // At least one re-check has failed (quietly) before the cluster comes up.
    w.agent
        .wait_log("cluster still not answering", Duration::from_secs(30))
        .expect("a re-check");
    let pid = w.agent.pid();

    let _relay = Relay::start(port, cp.port);
    wait_for(Duration::from_secs(40), "kubernetes:late offered", || {
        offered().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.agent.log_text()));
    assert_eq!(w.agent.pid(), pid, "the same agent process");
    let log = w.agent.log_text();
    assert_eq!(
        log.matches("kubernetes:late not offered").count(),
        1,
        "warned once: {log}"
    );
    assert!(
        log.contains("Kubernetes cluster late answers"),
        "said when it came up: {log}"
    );
    let (t, tlog) =
        w.run(json!({"cluster": "late", "action": "apply", "manifest": configmap("came-up", "1")}));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{tlog}");
}

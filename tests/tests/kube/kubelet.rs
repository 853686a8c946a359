//! A kubelet stand-in (not a kubelet): there is no container runtime here, so this plays
//! the node's part against the real API server, and nothing more.
//!
//! It registers a Ready node without taints, and for every pod the scheduler binds to it
//! runs the pod's first container's `command` + `args` as a local process (the image is
//! ignored), with the container's `env`: the pod goes Running, then Succeeded or Failed
//! with the process's exit code, so a test chooses the exit code and the output in its
//! script. The output is kept with nanosecond timestamps and served over HTTPS at
//! `/containerLogs/{ns}/{pod}/{container}` with `follow`, `timestamps` and `sinceTime`,
//! which the real API server proxies for `pods/log`. A container whose env has
//! `STANDIN_CUT_FOLLOW_AFTER=N` has each follow stream ended after N lines, as a kubelet's
//! log rotation or a proxy timeout does; with `STANDIN_HOLD_FOLLOW=1` follow streams
//! stay open after the container has ended, as a stuck kubelet or proxy's do (the
//! test counts them in `held`). With `STANDIN_FAIL_FOLLOW=1` every follow request is
//! answered 500 (a kubelet that cannot stream), while a plain read works. Output is kept as
//! bytes as the process writes them, partial lines too (a runtime's log keeps a long line
//! in pieces, and the kubelet serves it as one line with one timestamp), and bytes that are
//! not UTF-8 are served as they are. Log requests and the entries served are counted per
//! namespace (`log_requests`, `served`). A pod being deleted has its process sent SIGTERM
//! (SIGKILL after 2 s), its container reported terminated with that exit code, as a
//! kubelet does within the grace period, and then its deletion confirmed.
//!
//! Infrastructure failures are chosen by the container's env `STANDIN_SIMULATE`:
//! `OOMKilled` (the script runs, then the container is reported terminated with reason
//! OOMKilled and exit code 137), `Evicted` (the script runs, then the pod is reported
//! Failed with reason Evicted and its container exit code 137), `ErrImagePull` (nothing
//! runs; the container waits with ErrImagePull, then ImagePullBackOff, until deleted).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use delegate_tests::kube::{ADMIN_TOKEN, ControlPlane};
use delegate_tests::tls::{TlsListener, acceptor};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

/// Output of one container so far.
#[derive(Default)]
struct ContainerLog {
    /// (unix nanos, bytes without newline, whether a newline ended them): a piece of a
    /// line without its newline is an entry too, as a runtime's partial log line is.
    lines: Mutex<Vec<(i128, Vec<u8>, bool)>>,
    done: std::sync::atomic::AtomicBool,
    changed: Notify,
    /// End each follow stream of this container after this many lines (0: never), set by
    /// the container's env `STANDIN_CUT_FOLLOW_AFTER`.
    cut_follow_after: usize,
    /// Keep follow streams open after the container ended (`STANDIN_HOLD_FOLLOW=1`).
    hold_follow: bool,
    /// Answer follow requests with 500 (`STANDIN_FAIL_FOLLOW=1`).
    fail_follow: bool,
}

impl ContainerLog {
    fn push(&self, bytes: Vec<u8>, full: bool) {
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        // Strictly increasing timestamps, as a runtime's log file has in practice.
        let mut now = now_nanos();
        if let Some((last, _, _)) = l.last()
            && now <= *last
        {
            now = *last + 1;
        }
        l.push((now, bytes, full));
        drop(l);
        self.changed.notify_waiters();
    }

    fn finish(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

struct Shared {
    api: String,
    http: reqwest::Client,
    node: String,
    logs: Mutex<HashMap<String, Arc<ContainerLog>>>,
    /// Follow streams ended early so far.
    cuts: AtomicUsize,
    /// Follow streams kept open after their container ended (`STANDIN_HOLD_FOLLOW`).
    held: AtomicUsize,
    /// Per namespace: (follow requests, other log requests).
    requests: Mutex<HashMap<String, (usize, usize)>>,
    /// Per namespace: log entries served.
    served: Mutex<HashMap<String, usize>>,
    /// Pods with a process (or an image pull) of ours going, by uid: told when the pod
    /// is being deleted; the pod's task confirms the deletion then.
    running: Mutex<HashMap<String, Arc<Notify>>>,
}

pub struct Kubelet {
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

impl Kubelet {
    /// Register node `node` with the control plane and start serving it.
    pub fn start(cp: &ControlPlane, node: &str) -> Kubelet {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let ca = reqwest::Certificate::from_pem(&std::fs::read(cp.pki.ca()).expect("ca"))
            .expect("ca pem");
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client");
        let shared = Arc::new(Shared {
            api: cp.url(),
            http,
            node: node.to_string(),
            logs: Mutex::new(HashMap::new()),
            cuts: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            requests: Mutex::new(HashMap::new()),
            served: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
        });
        let (cert, key) = cp.pki.serving(&format!("kubelet-{node}")).expect("cert");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let app = Router::new()
            .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
            .with_state(shared.clone());
        let tls = TlsListener {
            tcp: listener,
            acceptor: acceptor(&cert, &key),
        };
        runtime.spawn(async move {
            let _ = axum::serve(tls, app).await;
        });
        runtime
            .block_on(register(&shared, port))
            .expect("node registers");
        runtime.spawn(run_pods(shared.clone()));
        Kubelet {
            shared,
            _runtime: runtime,
        }
    }

    /// How many follow streams were ended early.
    pub fn cuts(&self) -> usize {
        self.shared.cuts.load(Ordering::SeqCst)
    }

    /// How many follow streams were held open after their container ended.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }

    /// Log requests for pods of namespace `ns` so far: (follow, not follow).
    pub fn log_requests(&self, ns: &str) -> (usize, usize) {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(ns)
            .copied()
            .unwrap_or_default()
    }

    /// Log entries (lines or pieces of lines) served for pods of namespace `ns` so far.
    pub fn served(&self, ns: &str) -> usize {
        self.shared
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(ns)
            .copied()
            .unwrap_or_default()
    }
}

async fn api(
    s: &Shared,
    method: reqwest::Method,
    path: &str,
    body: Option<(&str, Value)>,
) -> Result<Value, String> {
    let mut req = s
        .http
        .request(method, format!("{}{path}", s.api))
        .bearer_auth(ADMIN_TOKEN);
    if let Some((ct, b)) = body {
        req = req.header("content-type", ct).body(b.to_string());
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status();
    let text = r.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{path}: {status}: {text}"));
    }
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

async fn register(s: &Shared, port: u16) -> Result<(), String> {
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": s.node, "labels": {"kubernetes.io/hostname": s.node, "kubernetes.io/os": "linux"}},
        "spec": {},
        "status": {
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet stand-in is ready"}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": s.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "stand-in://0", "kubeletVersion": "v1.20.2", "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64"}
        }
    });
    api(
        s,
        reqwest::Method::POST,
        "/api/v1/nodes",
        Some(("application/json", node)),
    )
    .await?;
    // Some API servers drop status on create: set it again through the status endpoint.
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet stand-in is ready"}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": s.node}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"},
        "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"}
    }});
    api(
        s,
        reqwest::Method::PATCH,
        &format!("/api/v1/nodes/{}/status", s.node),
        Some(("application/merge-patch+json", status)),
    )
    .await?;
    // The API server's admission taints a new node not-ready; a kubelet clears it once it
    // is ready (the node lifecycle controller, which would re-add it, is off).
    api(
        s,
        reqwest::Method::PATCH,
        &format!("/api/v1/nodes/{}", s.node),
        Some((
            "application/merge-patch+json",
            json!({"spec": {"taints": null}}),
        )),
    )
    .await?;
    Ok(())
}

/// Find pods bound to this node and run each once; stop and confirm deletions.
async fn run_pods(s: Arc<Shared>) {
    let mut started: HashSet<String> = HashSet::new();
    loop {
        let path = format!("/api/v1/pods?fieldSelector=spec.nodeName%3D{}", s.node);
        if let Ok(list) = api(&s, reqwest::Method::GET, &path, None).await {
            for pod in list["items"].as_array().cloned().unwrap_or_default() {
                let ns = pod["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
                let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
                if !pod["metadata"]["deletionTimestamp"].is_null() {
                    let going = s
                        .running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&uid)
                        .cloned();
                    match going {
                        // Its task stops it, reports it and confirms the deletion.
                        Some(stop) => stop.notify_one(),
                        None => confirm_deletion(&s, &ns, &name, &uid).await,
                    }
                    continue;
                }
                if started.insert(uid.clone()) {
                    let stop = Arc::new(Notify::new());
                    s.running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(uid, stop.clone());
                    tokio::spawn(run_pod(s.clone(), pod, stop));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn confirm_deletion(s: &Shared, ns: &str, name: &str, uid: &str) {
    let _ = api(
        s,
        reqwest::Method::DELETE,
        &format!("/api/v1/namespaces/{ns}/pods/{name}"),
        Some((
            "application/json",
            json!({"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}),
        )),
    )
    .await;
}

async fn patch_status(s: &Shared, ns: &str, name: &str, status: Value) {
    let _ = api(
        s,
        reqwest::Method::PATCH,
        &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
        Some(("application/merge-patch+json", json!({ "status": status }))),
    )
    .await;
}

async fn run_pod(s: Arc<Shared>, pod: Value, stop: Arc<Notify>) {
    let uid = pod["metadata"]["uid"].as_str().unwrap_or("").to_string();
    let deleted = run_container(&s, &pod, &stop).await;
    s.running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&uid);
    if deleted {
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("");
        let name = pod["metadata"]["name"].as_str().unwrap_or("");
        confirm_deletion(&s, ns, name, &uid).await;
    }
}

/// Run the pod's container to its end and report it; true when it was stopped because
/// the pod is being deleted.
async fn run_container(s: &Shared, pod: &Value, stop: &Notify) -> bool {
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let name = pod["metadata"]["name"].as_str().unwrap_or("").to_string();
    let c = &pod["spec"]["containers"][0];
    let cname = c["name"].as_str().unwrap_or("main").to_string();
    let image = c["image"].as_str().unwrap_or("").to_string();
    let argv: Vec<String> = c["command"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(c["args"].as_array().into_iter().flatten())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let env_var = |key: &str| {
        c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == key)
            .and_then(|e| e["value"].as_str().map(str::to_string))
    };
    let cut_follow_after = env_var("STANDIN_CUT_FOLLOW_AFTER")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let simulate = env_var("STANDIN_SIMULATE").unwrap_or_default();
    let log = Arc::new(ContainerLog {
        cut_follow_after,
        hold_follow: env_var("STANDIN_HOLD_FOLLOW").as_deref() == Some("1"),
        fail_follow: env_var("STANDIN_FAIL_FOLLOW").as_deref() == Some("1"),
        ..ContainerLog::default()
    });
    s.logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(format!("{ns}/{name}/{cname}"), log.clone());
    let started = rfc3339_nanos(now_nanos());
    let container_status = |state: Value, ready: bool| json!([{ "name": cname, "image": image, "imageID": "", "ready": ready, "restartCount": 0, "started": ready, "state": state }]);
    if simulate == "ErrImagePull" {
        log.finish();
        // What a kubelet reports for an image it cannot pull: ErrImagePull, then back-off.
        for reason in ["ErrImagePull", "ImagePullBackOff"].iter().cycle() {
            let waiting = json!({"waiting": {"reason": reason, "message": format!("rpc error: code = Unknown desc = failed to pull and unpack image \"{image}\": pull access denied (kubelet stand-in)")}});
            patch_status(
                s,
                &ns,
                &name,
                json!({"phase": "Pending", "containerStatuses": container_status(waiting, false)}),
            )
            .await;
            if tokio::time::timeout(Duration::from_millis(500), stop.notified())
                .await
                .is_ok()
            {
                return true;
            }
        }
    }
    let Some((prog, args)) = argv.split_first() else {
        log.finish();
        patch_status(s, &ns, &name, json!({"phase": "Failed", "containerStatuses": container_status(json!({"terminated": {"exitCode": 128, "reason": "ContainerCannotRun", "message": "the kubelet stand-in runs command + args; this container has none"}}), false)})).await;
        return false;
    };
    // Under a guardian shell that leads the process group and kills it when the test
    // process is gone: a Deployment's `sleep 3600` must not outlive the test binary.
    let guard = format!(
        "\"$@\" & c=$!; ( while kill -0 {} 2>/dev/null; do sleep 1; done; kill -KILL -$$ ) >/dev/null 2>&1 & w=$!; trap 'kill -TERM $c 2>/dev/null' TERM; wait $c; r=$?; if [ $r -gt 128 ] && kill -0 $c 2>/dev/null; then wait $c; r=$?; fi; kill $w 2>/dev/null; exit $r",
        std::process::id()
    );
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(guard)
        .arg("pod")
        .arg(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for e in c["env"].as_array().into_iter().flatten() {
        if let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
            cmd.env(k, v);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            log.finish();
            patch_status(s, &ns, &name, json!({"phase": "Failed", "containerStatuses": container_status(json!({"terminated": {"exitCode": 128, "reason": "ContainerCannotRun", "message": e.to_string()}}), false)})).await;
            return false;
        }
    };
    patch_status(
        s,
        &ns,
        &name,
        json!({
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": started,
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}, {"type": "Initialized", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": container_status(json!({"running": {"startedAt": started}}), true),
        }),
    )
    .await;
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    // Bytes as they come, split at newlines; what a read brings after the last newline
    // is a partial entry at once (a runtime's pieces of a long line).
    let pump = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>, log: Arc<ContainerLog>| async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let mut rest = &buf[..n];
            while let Some(at) = rest.iter().position(|&b| b == b'\n') {
                log.push(rest[..at].to_vec(), true);
                rest = &rest[at + 1..];
            }
            if !rest.is_empty() {
                log.push(rest.to_vec(), false);
            }
        }
    };
    let a = tokio::spawn(pump(Box::new(out), log.clone()));
    let b = tokio::spawn(pump(Box::new(err), log.clone()));
    let group = child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32));
    let signal = |sig| {
        if let Some(pg) = group {
            let _ = nix::sys::signal::killpg(pg, sig);
        }
    };
    let mut deleted = false;
    let code = tokio::select! {
        st = child.wait() => st.ok().and_then(|s| s.code()).unwrap_or(137),
        _ = stop.notified() => {
            // Deleted: TERM, then KILL after a short grace period, as a kubelet does.
            deleted = true;
            signal(nix::sys::signal::Signal::SIGTERM);
            match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                Ok(st) => st.ok().and_then(|s| s.code()).unwrap_or(137),
                Err(_) => {
                    signal(nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait().await;
                    137
                }
            }
        }
    };
    if deleted {
        // A `sleep` under `sh -c` may hold the output pipes open.
        signal(nix::sys::signal::Signal::SIGKILL);
        a.abort();
        b.abort();
    } else {
        let _ = a.await;
        let _ = b.await;
    }
    if !deleted {
        log.finish();
    }
    let finished = rfc3339_nanos(now_nanos());
    let (phase, code, reason, pod_reason) = match simulate.as_str() {
        _ if deleted => ("Failed", code, "Error", None),
        "OOMKilled" => ("Failed", 137, "OOMKilled", None),
        "Evicted" => ("Failed", 137, "Error", Some("Evicted")),
        _ if code == 0 => ("Succeeded", 0, "Completed", None),
        _ => ("Failed", code, "Error", None),
    };
    let mut status = json!({
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}, {"type": "Initialized", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
        "containerStatuses": container_status(json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished}}), false),
    });
    if let Some(r) = pod_reason {
        status["reason"] = json!(r);
        status["message"] = json!("The node was low on resource: memory. (kubelet stand-in)");
    }
    patch_status(s, &ns, &name, status).await;
    if deleted {
        // The killed container is reported while the pod still exists (a kubelet's status
        // sync comes before its final delete): an agent that looks now sees exit code 143.
        log.finish();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    deleted
}

fn truthy(q: &HashMap<String, String>, key: &str) -> bool {
    q.get(key).is_some_and(|v| v == "true" || v == "1")
}

async fn container_logs(
    State(s): State<Arc<Shared>>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(log) = s
        .logs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&format!("{ns}/{pod}/{container}"))
        .cloned()
    else {
        return (axum::http::StatusCode::NOT_FOUND, "container not found").into_response();
    };
    let follow = truthy(&q, "follow");
    let stamps = truthy(&q, "timestamps");
    {
        let mut r = s.requests.lock().unwrap_or_else(|p| p.into_inner());
        let e = r.entry(ns.clone()).or_default();
        if follow {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    if follow && log.fail_follow {
        return (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "the kubelet stand-in cannot stream (STANDIN_FAIL_FOLLOW)",
        )
            .into_response();
    }
    let since = q
        .get("sinceTime")
        .and_then(|t| parse_rfc3339(t))
        .unwrap_or(i128::MIN);
    let cut = if follow { log.cut_follow_after } else { 0 };
    // (next index, lines sent, ended, whether the entry sent last ended its line)
    let stream = futures_util::stream::unfold(
        (0usize, 0usize, false, true),
        move |(mut i, sent, ended, at_line_start)| {
            let log = log.clone();
            let s = s.clone();
            let ns = ns.clone();
            async move {
                if ended {
                    return None;
                }
                let mut held = false;
                loop {
                    let notified = log.changed.notified();
                    let next = {
                        let l = log.lines.lock().unwrap_or_else(|p| p.into_inner());
                        while i < l.len() && l[i].0 < since {
                            i += 1;
                        }
                        l.get(i).cloned()
                    };
                    if let Some((ts, bytes, full)) = next {
                        // A kubelet stamps a line once, at its first piece.
                        let mut text = Vec::with_capacity(bytes.len() + 32);
                        if stamps && at_line_start {
                            text.extend_from_slice(format!("{} ", rfc3339_nanos(ts)).as_bytes());
                        }
                        text.extend_from_slice(&bytes);
                        if full {
                            text.push(b'\n');
                        }
                        let sent = sent + usize::from(full);
                        let end_now = full && cut > 0 && sent >= cut;
                        if end_now {
                            s.cuts.fetch_add(1, Ordering::SeqCst);
                        }
                        *s.served
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(ns.clone())
                            .or_default() += 1;
                        return Some((
                            Ok::<_, std::io::Error>(Bytes::from(text)),
                            (i + 1, sent, end_now, full),
                        ));
                    }
                    if !follow {
                        return None;
                    }
                    if log.done.load(Ordering::SeqCst) {
                        if !log.hold_follow {
                            return None;
                        }
                        if !held {
                            held = true;
                            s.held.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "text/plain")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn now_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-30T07:45:44.123456789Z`
pub fn rfc3339_nanos(n: i128) -> String {
    let secs = n.div_euclid(1_000_000_000) as i64;
    let nanos = n.rem_euclid(1_000_000_000);
    let (y, mo, d) = civil(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Parse `YYYY-MM-DDTHH:MM:SS[.frac]Z` to unix nanos.
pub fn parse_rfc3339(s: &str) -> Option<i128> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut dp = date.split('-');
    let y: i64 = dp.next()?.parse().ok()?;
    let mo: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut tp = hms.split(':');
    let h: i64 = tp.next()?.parse().ok()?;
    let mi: i64 = tp.next()?.parse().ok()?;
    let sec: i64 = tp.next()?.parse().ok()?;
    let mut nanos: i128 = 0;
    if !frac.is_empty() {
        let digits = &frac[..frac.len().min(9)];
        nanos = digits.parse::<i128>().ok()? * 10i128.pow(9 - digits.len() as u32);
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec;
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

#[test]
fn timestamps_round_trip() {
    let n = 1_796_024_744_123_456_789i128;
    let s = rfc3339_nanos(n);
    assert_eq!(parse_rfc3339(&s), Some(n));
    assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Some(1_000_000_000));
}

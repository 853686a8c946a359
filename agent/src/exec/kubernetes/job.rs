//! The `job` action of the kubernetes executor: a Job whose pod's log is the task log and
//! whose container's exit code is the result.
//!
//! The Job outlives the agent, like a docker task's container, so nothing is lost to a
//! restart: the Job's namespace and name, with a random nonce of the attempt that is part
//! of the name and a label, are journalled in the task's directory before the Job is
//! created, and its uid as soon as the server has answered. A restarted agent takes up
//! only that Job (its uid, or before the uid was journalled its nonce), never one someone
//! else made under the name, and deletes only with the uid as a precondition.
//!
//! Every log line the agent keeps is recorded with its kubelet timestamp and the log
//! length after it ("log cursor"). A restarted agent finds the Job again, works out from
//! the log length which lines it already holds, and resumes the pod's log from there:
//! kubelet timestamps plus a count of lines at the same timestamp skip exactly what is
//! held, so no line is lost or repeated. A follow stream that ends early (kubelet log
//! rotation, a proxy timeout) is resumed the same way; the end of the task is decided from
//! the container's state, never from the end of a stream.
//!
//! Nothing a pod prints grows the agent without bound: its log is read as bytes, each line
//! capped ([`log_lines`]) and decoded lossily; the cursor gets entries only for lines the
//! log keeps (none past `max_log_bytes`); and a stream that brings nothing new is asked
//! for again after a wait that doubles up to 5 s.
//!
//! Script failures (a non-zero exit code) and infrastructure failures (OOMKilled, Evicted,
//! DeadlineExceeded, image pull errors, the pod or Job deleted) are told apart: the first
//! is the task's exit code, the second a message starting "infrastructure failure". A
//! container that ends while its pod is being deleted (a kubelet reports the kill's 143 or
//! 137 before the pod goes) did not fail by itself: the Job's own verdict names the cause
//! when it has one (DeadlineExceeded: the controller deletes the pod, then writes it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use delegate_protocol::Env;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, PostParams, Preconditions, PropagationPolicy,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::apply::yaml_options;
use super::client::{Failure, api_message, is_status};
use crate::exec::{ExecContext, ExecOutcome, JournalError};
use delegate_durable::Durability;

mod log_lines;

/// Labels every Job of ours carries.
pub const LABEL_TASK: &str = "delegate.dev/task-id";
pub const LABEL_ATTEMPT: &str = "delegate.dev/attempt";
/// The attempt's nonce: random, journalled before the Job is created, part of its name.
pub const LABEL_NONCE: &str = "delegate.dev/nonce";
/// Finished Jobs stay this long (for a restarted agent and for post-mortems): longer than
/// an agent outage. Servers without the TTL controller keep them until deleted.
const TTL_AFTER_FINISHED_SECS: i32 = 86_400;
/// Between looks at a pod that is not running yet.
const POLL: Duration = Duration::from_millis(300);

/// What a restarted agent needs to find the Job again. Written twice: with the nonce
/// and no uid before the Job is created (so a Job made just before a crash is known by its
/// nonce), then with the uid the server gave it (which binds the task to that very Job).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeJobRecord {
    pub namespace: String,
    pub name: String,
    /// Empty until the create has answered.
    pub uid: String,
    /// Empty in records of agents before the nonce.
    #[serde(default)]
    pub nonce: String,
}

/// Where the pod's log stands: the timestamp of the last line kept and how many lines
/// with exactly that timestamp are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Cursor {
    ts: Option<jiff::Timestamp>,
    same: usize,
}

impl Cursor {
    /// Is a line with timestamp `ts` already held? Advances the count of lines at the
    /// cursor's timestamp that have been seen in this stream.
    fn already_held(&self, ts: jiff::Timestamp, seen_at_cursor: &mut usize) -> bool {
        match self.ts {
            None => false,
            Some(c) if ts < c => true,
            Some(c) if ts == c => {
                *seen_at_cursor += 1;
                *seen_at_cursor <= self.same
            }
            Some(_) => false,
        }
    }

    fn advance(&mut self, ts: jiff::Timestamp) {
        if self.ts == Some(ts) {
            self.same += 1;
        } else {
            self.ts = Some(ts);
            self.same = 1;
        }
    }
}

/// The record of the attempt's Job ([`KubeJobRecord`]), fsynced (file and directory):
/// without it a restart would make a second Job.
pub const JOB_RECORD: &str = "kube-job.json";

fn cursor_path(dir: &Path) -> PathBuf {
    dir.join("kube-log.cursor")
}

/// The journalled Job could not be read from the API server.
fn cannot_read(rec: &KubeJobRecord, e: &kube::Error) -> Failure {
    Failure(format!(
        "cannot read Job {}/{}: {}",
        rec.namespace,
        rec.name,
        api_message(e)
    ))
}

fn write_record(ctx: &ExecContext, rec: &KubeJobRecord) -> Result<(), JournalError> {
    ctx.journal.put(JOB_RECORD, rec, Durability::PowerLoss)
}

/// The cursor of the lines the log holds: entries `TS END` were written before their
/// line was appended, so those whose END is beyond the log's length were not kept.
fn load_cursor(dir: &Path, log_len: u64) -> Cursor {
    let text = std::fs::read_to_string(cursor_path(dir)).unwrap_or_default();
    let mut c = Cursor::default();
    for line in text.lines() {
        let Some((ts, end)) = line.split_once(' ') else {
            continue;
        };
        let (Ok(ts), Ok(end)) = (ts.parse::<jiff::Timestamp>(), end.parse::<u64>()) else {
            continue;
        };
        if end > log_len {
            break;
        }
        c.advance(ts);
    }
    c
}

/// A Job name from the task id, attempt and the attempt's nonce: deterministic given
/// the journalled nonce (a restarted agent and a retried create land on the same Job),
/// unpredictable without it (nobody can create a Job under the name first), DNS-1123, at
/// most 63 characters.
pub fn job_name(task_id: &str, attempt: u32, nonce: &str) -> String {
    let mut id: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let suffix = format!("-{attempt}-{nonce}");
    id.truncate(63 - "delegate-".len() - suffix.len());
    let name = format!("delegate-{}{suffix}", id.trim_matches('-'));
    name.replace("--", "-")
}

/// A fresh nonce for one attempt's Job: 8 characters of `[a-z0-9]` (41 bits).
fn new_nonce() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..8)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

/// Whether `job` is the one this attempt created: the server's uid when the journal has
/// it, else the attempt's nonce label.
fn is_ours(job: &Job, rec: &KubeJobRecord) -> bool {
    let uid_ok = rec.uid.is_empty() || job.metadata.uid.as_deref() == Some(rec.uid.as_str());
    let nonce_ok = rec.nonce.is_empty()
        || job
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_NONCE))
            .is_some_and(|n| *n == rec.nonce);
    // An old record (no nonce) is bound by its uid alone; a new one by both.
    uid_ok && nonce_ok && !(rec.uid.is_empty() && rec.nonce.is_empty())
}

/// The Job to create for `rec`: the user's full Job or the shorthand, with our name,
/// labels and the settings that make it safe to supervise.
fn build_job(ctx: &ExecContext, rec: &KubeJobRecord, req: &JobRequest<'_>) -> Result<Job, Failure> {
    let JobRequest {
        full,
        image,
        command,
        env,
        ..
    } = *req;
    let (name, ns, nonce) = (&rec.name, &rec.namespace, &rec.nonce);
    let mut job: Job = match full {
        Some(text) => serde_saphyr::from_str_with_options(text, yaml_options())
            .map_err(|e| Failure(format!("spec.job is not a batch/v1 Job: {e}")))?,
        None => {
            let env: Vec<_> = env
                .iter()
                .map(|(k, v)| json!({"name": k, "value": v}))
                .collect();
            let mut container =
                json!({"name": "main", "image": image.unwrap_or_default(), "env": env});
            if !command.is_empty() {
                container["command"] = json!(command);
            }
            serde_json::from_value(json!({
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {},
                "spec": {"template": {"spec": {"containers": [container]}}}
            }))
            .map_err(|e| Failure(format!("cannot build the Job: {e}")))?
        }
    };
    job.metadata.name = Some(name.to_string());
    job.metadata.namespace = Some(ns.to_string());
    let labels = job.metadata.labels.get_or_insert_with(Default::default);
    labels.insert(LABEL_TASK.into(), label_value(&ctx.task_id));
    labels.insert(LABEL_ATTEMPT.into(), ctx.attempt.to_string());
    labels.insert(LABEL_NONCE.into(), nonce.to_string());
    let spec = job.spec.get_or_insert_with(Default::default);
    // One pod, never restarted: its exit code is the task's.
    spec.backoff_limit = Some(0);
    spec.ttl_seconds_after_finished = Some(TTL_AFTER_FINISHED_SECS);
    let tmeta = spec.template.metadata.get_or_insert_with(Default::default);
    let tlabels = tmeta.labels.get_or_insert_with(Default::default);
    tlabels.insert(LABEL_TASK.into(), label_value(&ctx.task_id));
    let pod = spec
        .template
        .spec
        .as_mut()
        .ok_or_else(|| Failure("spec.job has no spec.template.spec".into()))?;
    pod.restart_policy = Some("Never".into());
    if pod.containers.is_empty() {
        return Err(Failure("spec.job has no containers".into()));
    }
    Ok(job)
}

/// A label value (63 characters of `[A-Za-z0-9._-]`).
fn label_value(s: &str) -> String {
    let mut v: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    v.truncate(63);
    v
}

pub(super) struct JobRequest<'a> {
    pub full: Option<&'a str>,
    pub image: Option<&'a str>,
    pub command: &'a [String],
    pub env: &'a Env,
    pub namespace: &'a str,
}

/// Create (or find again) the Job, follow its pod's log and report how it ended.
pub(super) async fn run(
    client: &Client,
    ctx: &mut ExecContext,
    req: JobRequest<'_>,
    stop: &CancellationToken,
) -> Result<ExecOutcome, Failure> {
    let dir = ctx.dir.clone();
    let journalled = ctx.journal.get::<KubeJobRecord>(JOB_RECORD);
    // Lines held are decided before the agent writes anything more to the log.
    let cursor = match &journalled {
        Some(_) => load_cursor(&dir, ctx.log.written()),
        None => Cursor::default(),
    };
    let rec = match journalled {
        // Journalled with its uid: that very Job, or none at all.
        Some(rec) if !rec.uid.is_empty() => {
            let jobs: Api<Job> = Api::namespaced(client.clone(), &rec.namespace);
            match jobs.get_opt(&rec.name).await {
                Ok(Some(j)) if is_ours(&j, &rec) => {}
                Ok(_) => {
                    return Ok(ExecOutcome::Lost(format!(
                        "infrastructure failure: Job {}/{} was deleted while the delegate was down",
                        rec.namespace, rec.name
                    )));
                }
                Err(e) => return Err(cannot_read(&rec, &e)),
            }
            ctx.note(&format!(
                "re-attached to Job {}/{} after a delegate restart",
                rec.namespace, rec.name
            ));
            rec
        }
        // The nonce was journalled and the create's answer was not: the create is sent
        // (again); a Job of that name with this nonce is the one made before the crash.
        Some(rec) => create_job(client, ctx, &req, rec).await?,
        None => {
            let nonce = new_nonce();
            let rec = KubeJobRecord {
                namespace: req.namespace.to_string(),
                name: job_name(&ctx.task_id, ctx.attempt, &nonce),
                uid: String::new(),
                nonce,
            };
            // Without this journal a restart would make a second Job: nothing is created.
            write_record(ctx, &rec).map_err(|e| Failure(format!("cannot journal the Job: {e}")))?;
            create_job(client, ctx, &req, rec).await?
        }
    };
    let follow = follow_job(client, ctx, &rec, cursor, &dir);
    tokio::select! {
        r = follow => r,
        _ = stop.cancelled() => {
            // Stopped (timeout, cancel, drain limit): the Job and its pod go too.
            let jobs: Api<Job> = Api::namespaced(client.clone(), &rec.namespace);
            match jobs.delete(&rec.name, &delete_params(&rec)).await {
                Ok(_) => ctx.note(&format!("deleted Job {}/{} and its pod", rec.namespace, rec.name)),
                Err(e) => ctx.note(&format!("could not delete Job {}/{}: {}", rec.namespace, rec.name, api_message(&e))),
            }
            Err(Failure("stopped".into()))
        }
    }
}

/// Create the Job of the journalled `rec` (whose nonce is on disk) and journal its uid.
async fn create_job(
    client: &Client,
    ctx: &mut ExecContext,
    req: &JobRequest<'_>,
    mut rec: KubeJobRecord,
) -> Result<KubeJobRecord, Failure> {
    let (ns, name) = (rec.namespace.clone(), rec.name.clone());
    let job = build_job(ctx, &rec, req)?;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let created = match jobs.create(&PostParams::default(), &job).await {
        Ok(j) => {
            ctx.note(&format!("created Job {ns}/{name}"));
            j
        }
        // Created by this attempt before a crash that came before its uid was journalled.
        Err(e) if is_status(&e, 409) => {
            let j = jobs.get(&name).await.map_err(|e| {
                Failure(format!("cannot read Job {ns}/{name}: {}", api_message(&e)))
            })?;
            if !is_ours(&j, &rec) {
                return Err(Failure(format!(
                    "a Job {ns}/{name} exists that this attempt did not create (its {LABEL_NONCE} label is not this attempt's); it is left alone"
                )));
            }
            ctx.note(&format!(
                "re-attached to Job {ns}/{name} after a delegate restart"
            ));
            j
        }
        Err(e) => {
            return Err(Failure(format!(
                "cannot create Job {ns}/{name}: {}",
                api_message(&e)
            )));
        }
    };
    rec.uid = created.metadata.uid.clone().unwrap_or_default();
    if rec.uid.is_empty() {
        return Err(Failure(format!(
            "the API server gave Job {ns}/{name} no uid"
        )));
    }
    if let Err(e) = write_record(ctx, &rec) {
        // A restart then finds the Job by its nonce.
        tracing::warn!("cannot journal the Job's uid: {e}");
    }
    Ok(rec)
}

/// How the pod's one container stands.
enum PodState {
    /// Not running yet; `Some` names an infrastructure problem that will not clear.
    Waiting(Option<String>),
    Running,
    /// The container ended with this code and reason.
    Terminated {
        code: i32,
        reason: String,
    },
    /// The pod failed without a container exit (Evicted...).
    PodFailed(String),
}

fn pod_state(pod: &Pod) -> PodState {
    let Some(status) = &pod.status else {
        return PodState::Waiting(None);
    };
    if status.phase.as_deref() == Some("Failed")
        && let Some(reason) = &status.reason
    {
        let msg = status.message.clone().unwrap_or_default();
        return PodState::PodFailed(format!("pod {reason}: {msg}"));
    }
    let cs = status.container_statuses.as_ref().and_then(|v| v.first());
    let Some(cs) = cs else {
        return PodState::Waiting(None);
    };
    let Some(state) = &cs.state else {
        return PodState::Waiting(None);
    };
    if let Some(t) = &state.terminated {
        return PodState::Terminated {
            code: t.exit_code,
            reason: t.reason.clone().unwrap_or_default(),
        };
    }
    if state.running.is_some() {
        return PodState::Running;
    }
    if let Some(w) = &state.waiting {
        let reason = w.reason.clone().unwrap_or_default();
        const FATAL: &[&str] = &[
            "ErrImagePull",
            "ImagePullBackOff",
            "InvalidImageName",
            "CreateContainerConfigError",
            "CreateContainerError",
        ];
        if FATAL.contains(&reason.as_str()) {
            let msg = w.message.clone().unwrap_or_default();
            return PodState::Waiting(Some(format!("{reason}: {msg}")));
        }
    }
    PodState::Waiting(None)
}

/// The Job's failure condition, if it has failed (DeadlineExceeded...).
fn job_failed(job: &Job) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default()
            )
        })
}

async fn follow_job(
    client: &Client,
    ctx: &mut ExecContext,
    rec: &KubeJobRecord,
    mut cursor: Cursor,
    dir: &Path,
) -> Result<ExecOutcome, Failure> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &rec.namespace);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &rec.namespace);
    let infra = |what: String| {
        Ok(ExecOutcome::Done {
            success: false,
            message: format!("infrastructure failure: {what}"),
        })
    };
    // Step 1: the pod, running or ended.
    let mut said_waiting = false;
    let pod_name = loop {
        let job = match jobs.get_opt(&rec.name).await {
            Ok(Some(j)) if is_ours(&j, rec) => j,
            Ok(_) => return infra(format!("Job {}/{} was deleted", rec.namespace, rec.name)),
            Err(e) => return Err(cannot_read(rec, &e)),
        };
        let lp = ListParams::default().labels(&format!("controller-uid={}", rec.uid));
        let list = pods
            .list(&lp)
            .await
            .map_err(|e| Failure(format!("cannot list the Job's pods: {}", api_message(&e))))?;
        let pod = list
            .items
            .into_iter()
            .max_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
        match pod.as_ref().map(pod_state) {
            Some(PodState::Waiting(Some(problem))) => {
                delete_job(&jobs, rec).await;
                return infra(format!("the pod cannot start: {problem}"));
            }
            Some(PodState::Waiting(None)) | None => {
                if let Some(why) = job_failed(&job) {
                    return infra(format!("Job failed before its pod ran: {why}"));
                }
                if !said_waiting {
                    ctx.note("waiting for the Job's pod to start");
                    said_waiting = true;
                }
                tokio::time::sleep(POLL).await;
            }
            Some(_) => break pod.and_then(|p| p.metadata.name).unwrap_or_default(),
        }
    };
    // Step 2: its log, resumed from the cursor until the container has ended and a last
    // read after that has returned everything.
    let mut cursor_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cursor_path(dir))
        .map_err(|e| {
            Failure(format!(
                "cannot write the log cursor in {}: {e}",
                dir.display()
            ))
        })?;
    let mut ended: Option<(i32, String)> = None;
    let mut keeping = true;
    let mut retry = RETRY_FIRST;
    loop {
        let last_pass = ended.is_some();
        let mut lp = LogParams {
            follow: !last_pass,
            timestamps: true,
            ..LogParams::default()
        };
        if let Some(ts) = cursor.ts {
            // Whole seconds, rounded down: the kubelet's sinceTime is second-precise, and
            // the lines of that second already held are skipped below.
            lp.since_time = jiff::Timestamp::from_second(ts.as_second()).ok();
        }
        let mut progress = false;
        match pods.log_stream(&pod_name, &lp).await {
            Ok(stream) => {
                let mut lines = log_lines::CappedLines::new(stream);
                let mut seen_at_cursor = 0usize;
                let start = cursor.clone();
                // A follow stream may stay open after its container has ended (a kubelet
                // or proxy that never closes it): look at the container now and then.
                // Once it is over, take what the stream still brings, and after a quiet
                // FOLLOW_CHECK leave the stream to the code below, which decides from the
                // container (and reads any rest from the cursor).
                let mut look = tokio::time::interval(FOLLOW_CHECK);
                look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                look.reset();
                let mut over = false;
                loop {
                    let line = tokio::select! {
                        line = lines.next_line() => line,
                        _ = look.tick(), if !last_pass => {
                            if over {
                                break;
                            }
                            over = container_over(&pods, &pod_name).await;
                            continue;
                        }
                    };
                    if over {
                        look.reset();
                    }
                    let Some(line) = line else { break };
                    let Ok(line) = line else { break };
                    let (ts, text) = split_timestamp(&line.bytes);
                    if let Some(t) = ts
                        && start.already_held(t, &mut seen_at_cursor)
                    {
                        continue;
                    }
                    progress = true;
                    // Lossy: a pod's log is text, and one bad byte (or a line cut inside
                    // a character) must cost that character, not the lines after it.
                    let mut kept = String::from_utf8_lossy(text).into_owned();
                    kept.push('\n');
                    if line.cut {
                        kept.push_str(&format!(
                            "[delegate] the line above was longer than {} KiB; the rest of it was dropped\n",
                            log_lines::LINE_CAP / 1024
                        ));
                    }
                    let before = ctx.log.written();
                    let end = before + kept.len() as u64;
                    match ts {
                        // Intent first: a line whose entry is beyond the log's length
                        // after a crash was not kept.
                        Some(t) if keeping => {
                            let _ = writeln!(cursor_file, "{t} {end}");
                        }
                        _ => {}
                    }
                    ctx.log.append(kept.as_bytes());
                    // A log at its cap (max_log_bytes) keeps no more lines: no entry
                    // for them, so the cursor is bounded by the log, not by the pod.
                    // Should the log keep lines again (a disk that was full), the first
                    // such line gets its entry now that it is known to be kept.
                    let was_keeping = keeping;
                    keeping = ctx.log.written() >= end;
                    if let Some(t) = ts {
                        if keeping && !was_keeping {
                            let _ = writeln!(cursor_file, "{t} {end}");
                        }
                        cursor.advance(t);
                    }
                }
            }
            Err(e) if is_status(&e, 404) => {
                let why = why_the_pod_went(&jobs, rec, &pod_name).await;
                // The Job controller would start a new pod: this attempt is over.
                delete_job(&jobs, rec).await;
                return infra(why);
            }
            Err(e) => {
                tracing::debug!("pod log stream failed: {}; retrying", api_message(&e));
            }
        }
        if let Some((code, reason)) = &ended {
            let code = *code;
            return Ok(outcome(code, reason));
        }
        // A stream that brought nothing new is asked for again later and later, so a
        // stream that keeps failing or ending at once costs little.
        if progress {
            retry = RETRY_FIRST;
        }
        // The stream ended: decide from the container, not from the end of the stream.
        match pods.get_opt(&pod_name).await {
            // Being deleted: whatever its container reports now (143, 137) is the
            // kill's exit code, not the script's.
            Ok(Some(p)) if p.metadata.deletion_timestamp.is_some() => {
                let why = why_the_pod_went(&jobs, rec, &pod_name).await;
                delete_job(&jobs, rec).await;
                return infra(why);
            }
            Ok(Some(p)) => match pod_state(&p) {
                PodState::Terminated { code, reason } => ended = Some((code, reason)),
                PodState::PodFailed(why) => return infra(why),
                _ => {
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            },
            Ok(None) => {
                let why = why_the_pod_went(&jobs, rec, &pod_name).await;
                delete_job(&jobs, rec).await;
                return infra(why);
            }
            Err(e) => {
                tracing::debug!("cannot read the pod: {}; retrying", api_message(&e));
                tokio::time::sleep(retry.max(POLL)).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// The first wait before a pod's log is asked for again after a stream that brought
/// nothing new; it doubles up to [`RETRY_MAX`] while streams keep bringing nothing.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A log line's kubelet timestamp (RFC 3339, before the first space) and its text.
fn split_timestamp(line: &[u8]) -> (Option<jiff::Timestamp>, &[u8]) {
    let Some(at) = line.iter().position(|&b| b == b' ') else {
        return (None, line);
    };
    match std::str::from_utf8(&line[..at])
        .ok()
        .and_then(|ts| ts.parse::<jiff::Timestamp>().ok())
    {
        Some(t) => (Some(t), &line[at + 1..]),
        None => (None, line),
    }
}

/// How often a follow stream's container is looked at while its lines come.
const FOLLOW_CHECK: Duration = Duration::from_secs(2);

/// Whether the pod's container has ended, or the pod is going or gone: a follow stream of
/// it that is still open has nothing more to wait for. A failed read says no (the stream
/// goes on; the read after it decides).
async fn container_over(pods: &Api<Pod>, pod_name: &str) -> bool {
    match pods.get_opt(pod_name).await {
        Ok(Some(p)) => {
            p.metadata.deletion_timestamp.is_some()
                || matches!(
                    pod_state(&p),
                    PodState::Terminated { .. } | PodState::PodFailed(_)
                )
        }
        Ok(None) => true,
        Err(_) => false,
    }
}

/// How long the Job controller gets to write its verdict after it deleted the pod of a
/// Job past its `activeDeadlineSeconds` (it deletes first, then writes the condition).
const VERDICT_LIMIT: Duration = Duration::from_secs(10);

/// Why the pod was deleted before its container ended on its own: the Job's verdict
/// (DeadlineExceeded) when it has one, else a deletion by someone else.
async fn why_the_pod_went(jobs: &Api<Job>, rec: &KubeJobRecord, pod_name: &str) -> String {
    let deleted = format!("pod {}/{pod_name} was deleted", rec.namespace);
    let give_up = tokio::time::Instant::now() + VERDICT_LIMIT;
    loop {
        let job = match jobs.get_opt(&rec.name).await {
            Ok(Some(j)) if is_ours(&j, rec) => j,
            Ok(_) => return format!("{deleted} with its Job"),
            Err(_) => return deleted,
        };
        // Only the deadline deletes pods; a BackoffLimitExceeded written now was caused
        // by this very deletion (the killed pod counted as failed).
        if let Some(why) = job_failed(&job).filter(|w| w.starts_with("DeadlineExceeded")) {
            return format!("Job {}/{} failed: {why}", rec.namespace, rec.name);
        }
        let Some(secs) = past_active_deadline(&job) else {
            return deleted;
        };
        if tokio::time::Instant::now() >= give_up {
            return format!(
                "Job {}/{} failed: DeadlineExceeded: it was active longer than its activeDeadlineSeconds ({secs}s)",
                rec.namespace, rec.name
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The Job's `activeDeadlineSeconds` when it has passed.
fn past_active_deadline(job: &Job) -> Option<i64> {
    let secs = job.spec.as_ref()?.active_deadline_seconds?;
    let start = job.status.as_ref()?.start_time.as_ref()?.0;
    let end = start
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .ok()?;
    (jiff::Timestamp::now() >= end).then_some(secs)
}

fn outcome(code: i32, reason: &str) -> ExecOutcome {
    match reason {
        "OOMKilled" => ExecOutcome::Done {
            success: false,
            message: format!(
                "infrastructure failure: the container was OOMKilled (exit code {code})"
            ),
        },
        "DeadlineExceeded" | "Evicted" => ExecOutcome::Done {
            success: false,
            message: format!("infrastructure failure: {reason} (exit code {code})"),
        },
        _ => ExecOutcome::Exited(code),
    }
}

/// Delete the Job (and, in the background, its pod) only if it is still the very Job
/// this attempt created: a Job someone made under the same name since has another uid,
/// and the server refuses the delete (409).
fn delete_params(rec: &KubeJobRecord) -> DeleteParams {
    DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        preconditions: Some(Preconditions {
            uid: Some(rec.uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    }
}

async fn delete_job(jobs: &Api<Job>, rec: &KubeJobRecord) {
    if let Err(e) = jobs.delete(&rec.name, &delete_params(rec)).await
        && !is_status(&e, 404)
    {
        tracing::info!(
            "Job {}/{} not deleted: {}",
            rec.namespace,
            rec.name,
            api_message(&e)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_are_deterministic_dns_labels() {
        let n = job_name("t_01JABCDEF", 2, "k3x9a0qz");
        assert_eq!(n, "delegate-t-01jabcdef-2-k3x9a0qz");
        assert_eq!(job_name("t_01JABCDEF", 2, "k3x9a0qz"), n);
        let long = job_name(&"x".repeat(100), 1, &new_nonce());
        assert!(long.len() <= 63, "{long}");
        assert_ne!(new_nonce(), new_nonce(), "a fresh nonce per attempt");
    }

    #[test]
    fn only_the_job_of_this_attempt_is_ours() {
        let rec = KubeJobRecord {
            namespace: "ns".into(),
            name: "delegate-t-1-abc".into(),
            uid: String::new(),
            nonce: "abc".into(),
        };
        let job = |uid: &str, nonce: Option<&str>| {
            let mut j = Job::default();
            j.metadata.uid = Some(uid.into());
            if let Some(n) = nonce {
                j.metadata.labels = Some([(LABEL_NONCE.to_string(), n.to_string())].into());
            }
            j
        };
        // Before the uid is journalled, the nonce decides.
        assert!(is_ours(&job("u1", Some("abc")), &rec));
        assert!(!is_ours(&job("u1", Some("xyz")), &rec));
        assert!(!is_ours(&job("u1", None), &rec));
        // After, the uid too: a Job made again under the name, nonce copied, is not ours.
        let rec = KubeJobRecord {
            uid: "u1".into(),
            ..rec
        };
        assert!(is_ours(&job("u1", Some("abc")), &rec));
        assert!(!is_ours(&job("u2", Some("abc")), &rec));
        // A record of an agent before the nonce: the uid alone.
        let old = KubeJobRecord {
            nonce: String::new(),
            ..rec
        };
        assert!(is_ours(&job("u1", None), &old));
        assert!(!is_ours(&job("u2", None), &old));
    }

    #[test]
    fn the_cursor_skips_exactly_the_lines_held() {
        let t = |s: &str| s.parse::<jiff::Timestamp>().expect("ts");
        let mut c = Cursor::default();
        c.advance(t("2026-01-01T00:00:01.5Z"));
        c.advance(t("2026-01-01T00:00:02Z"));
        c.advance(t("2026-01-01T00:00:02Z"));
        let mut seen = 0;
        assert!(c.already_held(t("2026-01-01T00:00:01.9Z"), &mut seen));
        assert!(c.already_held(t("2026-01-01T00:00:02Z"), &mut seen));
        assert!(c.already_held(t("2026-01-01T00:00:02Z"), &mut seen));
        assert!(
            !c.already_held(t("2026-01-01T00:00:02Z"), &mut seen),
            "a third line at the same instant is new"
        );
        assert!(!c.already_held(t("2026-01-01T00:00:03Z"), &mut seen));
    }

    #[test]
    fn cursor_entries_beyond_the_log_were_not_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            cursor_path(dir.path()),
            "2026-01-01T00:00:01Z 10\n2026-01-01T00:00:02Z 20\n2026-01-01T00:00:03Z 30\n",
        )
        .expect("write");
        let c = load_cursor(dir.path(), 20);
        assert_eq!(c.ts, Some("2026-01-01T00:00:02Z".parse().expect("ts")));
        assert_eq!(c.same, 1);
    }
}

//! The `kubernetes` executor: work on a remote cluster named in `[[kubernetes]]`.
//!
//! The agent reaches clusters with a kubeconfig file it is given (never `$HOME`, which a
//! service does not have) or, inside a pod, its service account. `apply` is server-side
//! apply with field manager `delegate`, every kind resolved through API discovery of its
//! group/version (so custom resources work, and no list of kinds goes stale); CRDs of the
//! same manifest go first and are waited for until Established. Server-side apply is
//! idempotent, so an apply interrupted by an agent restart is simply run again. The
//! cluster's optional policy ([`policy`]) is checked for every object before anything
//! changes.
//!
//! The actions are files of their own: [`apply`], [`job`], [`rollout`] (with `delete`),
//! all over [`client`] (reaching the cluster, reading its errors) and [`policy`].

use delegate_protocol::{KubeAction, KubernetesSpec};
use kube::discovery::Scope;

use super::{ExecContext, ExecOutcome, Facts, Restart};
use crate::config::Config;

mod apply;
mod client;
mod job;
pub(super) mod policy;
mod rollout;

pub use apply::FIELD_MANAGER;
pub use client::{ClusterError, connect, error_text, probe};
pub use job::{JOB_RECORD, LABEL_ATTEMPT, LABEL_NONCE, LABEL_TASK};

use client::{Failure, cause_chain};

/// Kubernetes tasks run where a `[[kubernetes]]` cluster is configured (one down right now
/// fails its task naming the problem). Their work lives in the cluster, so a new agent
/// takes them up.
pub(super) fn facts(config: &Config) -> Facts {
    Facts {
        runs: !config.kubernetes.is_empty(),
        adoptable: true,
    }
}

/// Kubernetes actions are idempotent (server-side apply; a Job is found again by its
/// record): an interrupted one is run again rather than reported lost.
pub(super) fn on_restart(runs: bool) -> Restart {
    if runs {
        Restart::Adopt("running again a kubernetes task that ran when the delegate stopped")
    } else {
        Restart::Lost
    }
}

/// Run one kubernetes task to its end.
pub async fn run(spec: &KubernetesSpec, mut ctx: ExecContext) -> ExecOutcome {
    let Some(cluster) = ctx
        .kubernetes
        .iter()
        .find(|c| c.name == spec.cluster)
        .cloned()
    else {
        let known: Vec<&str> = ctx.kubernetes.iter().map(|c| c.name.as_str()).collect();
        return ExecOutcome::CouldNotStart(format!(
            "spec.cluster: delegate {} has no cluster {:?} (it has: {}); add a [[kubernetes]] table to its delegate.toml or route the task to a delegate that reaches the cluster",
            ctx.delegate_name,
            spec.cluster,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ));
    };
    let (client, config) = match connect(&cluster).await {
        Ok(c) => c,
        Err(e) => return ExecOutcome::CouldNotStart(cause_chain(&e)),
    };
    if ctx.adopt {
        ctx.note("the delegate restarted during this task; running it again (it is idempotent)");
    }
    let stop = ctx.stop.clone();
    let default_ns = |ns: &Option<String>| {
        ns.clone()
            .or_else(|| cluster.namespace.clone())
            .unwrap_or_else(|| config.default_namespace.clone())
    };
    let result = match &spec.action {
        KubeAction::Apply {
            manifest,
            namespace,
            force,
        } => {
            let ns = default_ns(namespace);
            tokio::select! {
                r = apply::apply(&client, &cluster, &mut ctx, manifest, &ns, *force, &stop) => r.map(|message| ExecOutcome::Done { success: true, message }),
                _ = stop.cancelled() => Err(Failure("stopped before the action finished".into())),
            }
        }
        KubeAction::Job {
            job,
            image,
            command,
            env,
            namespace,
        } => {
            let ns = default_ns(namespace);
            let job_target = policy::Target {
                group: "batch",
                kind: "Job",
                scope: Scope::Namespaced,
                namespace: &ns,
                name: "",
            };
            if let Some(why) = policy::refusal(&cluster.policy, &cluster.name, &job_target) {
                return ExecOutcome::CouldNotStart(format!(
                    "refused by the delegate's policy: {why}"
                ));
            }
            let req = job::JobRequest {
                full: job.as_deref(),
                image: image.as_deref(),
                command,
                env,
                namespace: &ns,
            };
            job::run(&client, &mut ctx, req, &stop).await
        }
        KubeAction::Rollout {
            object_kind,
            name,
            namespace,
        } => {
            let ns = default_ns(namespace);
            let kind = delegate_protocol::rollout_kind(object_kind).unwrap_or("Deployment");
            let target = policy::Target {
                group: "apps",
                kind,
                scope: Scope::Namespaced,
                namespace: &ns,
                name,
            };
            if let Some(why) = policy::refusal(&cluster.policy, &cluster.name, &target) {
                return ExecOutcome::CouldNotStart(format!(
                    "refused by the delegate's policy: {why}"
                ));
            }
            rollout::rollout(&client, &mut ctx, kind, name, &ns, &stop)
                .await
                .map(|message| ExecOutcome::Done {
                    success: true,
                    message,
                })
        }
        KubeAction::Delete {
            manifest,
            object_kind,
            name,
            namespace,
            propagation,
        } => {
            let ns = default_ns(namespace);
            tokio::select! {
                r = rollout::delete(&client, &cluster, &mut ctx, manifest.as_deref(), object_kind.as_deref(), name.as_deref(), &ns, propagation.as_deref()) => r.map(|message| ExecOutcome::Done { success: true, message }),
                _ = stop.cancelled() => Err(Failure("stopped before the action finished".into())),
            }
        }
    };
    match result {
        Ok(outcome) => outcome,
        Err(Failure(message)) => ExecOutcome::Done {
            success: false,
            message: format!(
                "cluster {} ({}): {message}",
                cluster.name,
                config.cluster_url.to_string().trim_end_matches('/')
            ),
        },
    }
}

//! The `rollout` and `delete` actions of the kubernetes executor.
//!
//! `rollout` ports the rules of `kubectl rollout status` (its `DeploymentStatusViewer`,
//! `StatefulSetStatusViewer` and `DaemonSetStatusViewer`), because kube's
//! `is_deployment_completed` ignores `observedGeneration` (it reports success before the
//! controller has seen the new spec) and there is nothing for StatefulSets and DaemonSets.
//! A Deployment that exceeded its progress deadline fails at once; on failure the log gets
//! the object's recent events. `delete` always sends a propagation policy: a bare DELETE
//! of a Job orphans its pods.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PropagationPolicy};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use tokio_util::sync::CancellationToken;

use super::apply::{Resolver, parse_manifest};
use super::client::{Failure, api_message, is_status};
use super::policy;
use crate::config::KubeCluster;
use crate::exec::ExecContext;

/// Between looks at the object.
const POLL: Duration = Duration::from_millis(500);

/// Where a rollout stands, as kubectl says it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Rollout {
    Waiting(String),
    Done(String),
    Failed(String),
}

pub(crate) fn deployment_status(d: &Deployment) -> Rollout {
    let name = d.metadata.name.as_deref().unwrap_or("");
    let generation = d.metadata.generation.unwrap_or(0);
    let Some(st) = &d.status else {
        return Rollout::Waiting("waiting for deployment spec update to be observed".into());
    };
    if generation > st.observed_generation.unwrap_or(0) {
        return Rollout::Waiting(format!(
            "waiting for deployment {name:?} spec update to be observed"
        ));
    }
    let deadline = st.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    if deadline {
        return Rollout::Failed(format!(
            "deployment {name:?} exceeded its progress deadline"
        ));
    }
    let updated = st.updated_replicas.unwrap_or(0);
    let replicas = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    if let Some(want) = d.spec.as_ref().and_then(|s| s.replicas)
        && updated < want
    {
        return Rollout::Waiting(format!(
            "waiting for deployment {name:?} rollout to finish: {updated} out of {want} new replicas have been updated"
        ));
    }
    if replicas > updated {
        return Rollout::Waiting(format!(
            "waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination",
            replicas - updated
        ));
    }
    if available < updated {
        return Rollout::Waiting(format!(
            "waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available"
        ));
    }
    Rollout::Done(format!("deployment {name:?} successfully rolled out"))
}

pub(crate) fn statefulset_status(s: &StatefulSet) -> Rollout {
    let name = s.metadata.name.as_deref().unwrap_or("");
    let spec = s.spec.as_ref();
    let strategy = spec
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.type_.as_deref())
        .unwrap_or("RollingUpdate");
    if strategy != "RollingUpdate" {
        return Rollout::Failed(format!(
            "rollout status is only available for the RollingUpdate strategy (statefulset {name:?} uses {strategy})"
        ));
    }
    let Some(st) = &s.status else {
        return Rollout::Waiting("waiting for statefulset spec update to be observed".into());
    };
    let observed = st.observed_generation.unwrap_or(0);
    if observed == 0 || s.metadata.generation.unwrap_or(0) > observed {
        return Rollout::Waiting(format!(
            "waiting for statefulset {name:?} spec update to be observed"
        ));
    }
    let want = spec.and_then(|s| s.replicas).unwrap_or(1);
    let ready = st.ready_replicas.unwrap_or(0);
    if ready < want {
        return Rollout::Waiting(format!("waiting for {} pods to be ready", want - ready));
    }
    let partition = spec
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.partition);
    if let Some(p) = partition.filter(|p| *p > 0) {
        let updated = st.updated_replicas.unwrap_or(0);
        if updated < want - p {
            return Rollout::Waiting(format!(
                "waiting for partitioned roll out to finish: {updated} out of {} new pods have been updated",
                want - p
            ));
        }
        return Rollout::Done(format!(
            "partitioned roll out complete: {updated} new pods have been updated"
        ));
    }
    if st.update_revision != st.current_revision {
        return Rollout::Waiting(format!(
            "waiting for statefulset {name:?} rolling update to complete {} pods at revision {}",
            st.updated_replicas.unwrap_or(0),
            st.update_revision.as_deref().unwrap_or("")
        ));
    }
    Rollout::Done(format!(
        "statefulset {name:?} rolling update complete {ready} pods at revision {}",
        st.current_revision.as_deref().unwrap_or("")
    ))
}

pub(crate) fn daemonset_status(d: &DaemonSet) -> Rollout {
    let name = d.metadata.name.as_deref().unwrap_or("");
    let strategy = d
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.type_.as_deref())
        .unwrap_or("RollingUpdate");
    if strategy != "RollingUpdate" {
        return Rollout::Failed(format!(
            "rollout status is only available for the RollingUpdate strategy (daemon set {name:?} uses {strategy})"
        ));
    }
    let Some(st) = &d.status else {
        return Rollout::Waiting("waiting for daemon set spec update to be observed".into());
    };
    if d.metadata.generation.unwrap_or(0) > st.observed_generation.unwrap_or(0) {
        return Rollout::Waiting(format!(
            "waiting for daemon set {name:?} spec update to be observed"
        ));
    }
    let desired = st.desired_number_scheduled;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    if updated < desired {
        return Rollout::Waiting(format!(
            "waiting for daemon set {name:?} rollout to finish: {updated} out of {desired} new pods have been updated"
        ));
    }
    let available = st.number_available.unwrap_or(0);
    if available < desired {
        return Rollout::Waiting(format!(
            "waiting for daemon set {name:?} rollout to finish: {available} of {desired} updated pods are available"
        ));
    }
    Rollout::Done(format!("daemon set {name:?} successfully rolled out"))
}

/// Wait for the rollout of `kind`/`name`; progress lines go to the log when they change.
pub(super) async fn rollout(
    client: &Client,
    ctx: &mut ExecContext,
    kind: &'static str,
    name: &str,
    ns: &str,
    stop: &CancellationToken,
) -> Result<String, Failure> {
    let mut last = String::new();
    loop {
        let got = match kind {
            "Deployment" => Api::<Deployment>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .map(|d| deployment_status(&d)),
            "StatefulSet" => Api::<StatefulSet>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .map(|s| statefulset_status(&s)),
            _ => Api::<DaemonSet>::namespaced(client.clone(), ns)
                .get(name)
                .await
                .map(|d| daemonset_status(&d)),
        };
        let state = match got {
            Ok(s) => s,
            Err(e) if is_status(&e, 404) => {
                return Err(Failure(format!("{kind} {ns}/{name} does not exist")));
            }
            Err(e) => {
                return Err(Failure(format!(
                    "cannot read {kind} {ns}/{name}: {}",
                    api_message(&e)
                )));
            }
        };
        match state {
            Rollout::Done(msg) => {
                ctx.note(&msg);
                return Ok(msg);
            }
            Rollout::Failed(msg) => {
                ctx.note(&msg);
                log_events(client, ctx, kind, name, ns).await;
                return Err(Failure(msg));
            }
            Rollout::Waiting(msg) => {
                if msg != last {
                    ctx.note(&msg);
                    last = msg;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.cancelled() => {
                log_events(client, ctx, kind, name, ns).await;
                return Err(Failure(format!("stopped while {last}")));
            }
        }
    }
}

/// The object's recent events into the log (best effort).
async fn log_events(client: &Client, ctx: &mut ExecContext, kind: &str, name: &str, ns: &str) {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind={kind},involvedObject.name={name}"
    ));
    let Ok(list) = events.list(&lp).await else {
        return;
    };
    let mut items = list.items;
    items.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
    let from = items.len().saturating_sub(10);
    if items.is_empty() {
        return;
    }
    ctx.note(&format!("recent events of {kind} {ns}/{name}:"));
    for e in &items[from..] {
        ctx.note(&format!(
            "  {} {}: {}",
            e.type_.as_deref().unwrap_or(""),
            e.reason.as_deref().unwrap_or(""),
            e.message.as_deref().unwrap_or("").trim()
        ));
    }
}

fn propagation(p: Option<&str>) -> PropagationPolicy {
    match p {
        Some("foreground") => PropagationPolicy::Foreground,
        Some("orphan") => PropagationPolicy::Orphan,
        _ => PropagationPolicy::Background,
    }
}

/// `kind` as `Deployment`, `apps/v1 Deployment` or `v1 ConfigMap`: the group/version/kind.
fn parse_kind(kind: &str) -> Result<GroupVersionKind, Failure> {
    let parts: Vec<&str> = kind.split_whitespace().collect();
    let (av, k) = match parts.as_slice() {
        [k] => (None, *k),
        [av, k] => (Some(*av), *k),
        _ => {
            return Err(Failure(format!(
                "spec.kind {kind:?} is not KIND or APIVERSION KIND"
            )));
        }
    };
    let k = kubectl_kind(k);
    let av = av.unwrap_or(match k {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => "apps/v1",
        "Job" => "batch/v1",
        "CronJob" => "batch/v1beta1",
        "Ingress" => "networking.k8s.io/v1",
        "Role" | "RoleBinding" | "ClusterRole" | "ClusterRoleBinding" => {
            "rbac.authorization.k8s.io/v1"
        }
        _ => "v1",
    });
    let (group, version) = av.split_once('/').unwrap_or(("", av));
    Ok(GroupVersionKind::gvk(group, version, k))
}

/// The Kind for the names kubectl accepts for common kinds (`deployment`, `deploy`,
/// `cm`...), so `deployment/web` works as it does in kubectl; anything else as given.
fn kubectl_kind(k: &str) -> &str {
    const KINDS: &[(&[&str], &str)] = &[
        (&["deployment", "deployments", "deploy"], "Deployment"),
        (&["statefulset", "statefulsets", "sts"], "StatefulSet"),
        (&["daemonset", "daemonsets", "ds"], "DaemonSet"),
        (&["replicaset", "replicasets", "rs"], "ReplicaSet"),
        (&["job", "jobs"], "Job"),
        (&["cronjob", "cronjobs", "cj"], "CronJob"),
        (&["configmap", "configmaps", "cm"], "ConfigMap"),
        (&["secret", "secrets"], "Secret"),
        (&["service", "services", "svc"], "Service"),
        (&["pod", "pods", "po"], "Pod"),
        (&["namespace", "namespaces", "ns"], "Namespace"),
        (
            &["serviceaccount", "serviceaccounts", "sa"],
            "ServiceAccount",
        ),
        (&["ingress", "ingresses", "ing"], "Ingress"),
    ];
    let lower = k.to_ascii_lowercase();
    KINDS
        .iter()
        .find(|(names, _)| names.contains(&lower.as_str()))
        .map_or(k, |(_, kind)| kind)
}

/// Delete the objects of a manifest (in reverse order) or one object.
#[allow(clippy::too_many_arguments)]
pub(super) async fn delete(
    client: &Client,
    cluster: &KubeCluster,
    ctx: &mut ExecContext,
    manifest: Option<&str>,
    kind: Option<&str>,
    name: Option<&str>,
    default_ns: &str,
    policy: Option<&str>,
) -> Result<String, Failure> {
    let mut targets: Vec<(GroupVersionKind, String, Option<String>)> = Vec::new();
    if let Some(m) = manifest {
        for (index, obj) in parse_manifest(m)? {
            let types = obj.types.clone().unwrap_or_default();
            let gvk = GroupVersionKind::try_from(&types)
                .map_err(|e| Failure(format!("manifest document {index}: {e}")))?;
            targets.push((
                gvk,
                obj.metadata.name.unwrap_or_default(),
                obj.metadata.namespace,
            ));
        }
        // Dependents before what they depend on (a CR before its CRD).
        targets.reverse();
    } else if let (Some(k), Some(n)) = (kind, name) {
        targets.push((parse_kind(k)?, n.to_string(), None));
    }
    let dp = DeleteParams {
        propagation_policy: Some(propagation(policy)),
        ..DeleteParams::default()
    };
    let mut resolver = Resolver::default();
    // Every target resolved and checked against the cluster's policy before the first
    // delete, so a refused manifest deletes nothing.
    let mut resolved = Vec::with_capacity(targets.len());
    for (gvk, name, ns) in &targets {
        let (ar, caps) = resolver.resolve(client, gvk).await.map_err(|e| {
            Failure(format!(
                "{} {name}: API discovery failed: {}",
                gvk.kind,
                api_message(&e)
            ))
        })?;
        let target = policy::Target {
            group: &gvk.group,
            kind: &gvk.kind,
            scope: caps.scope.clone(),
            namespace: ns.as_deref().unwrap_or(default_ns),
            name,
        };
        if let Some(why) = policy::refusal(&cluster.policy, &cluster.name, &target) {
            return Err(Failure(format!(
                "{} {name}: refused by the delegate's policy, nothing was deleted: {why}",
                gvk.kind
            )));
        }
        resolved.push((ar, caps, name, ns));
    }
    let (mut deleted, mut absent) = (0, 0);
    for (ar, caps, name, ns) in resolved {
        let (api, label): (Api<DynamicObject>, String) = match caps.scope {
            Scope::Namespaced => {
                let ns = ns.clone().unwrap_or_else(|| default_ns.to_string());
                let l = format!("{}/{name} in namespace {ns}", ar.kind.to_lowercase());
                (Api::namespaced_with(client.clone(), &ns, &ar), l)
            }
            Scope::Cluster => (
                Api::all_with(client.clone(), &ar),
                format!("{}/{name}", ar.kind.to_lowercase()),
            ),
        };
        match api.delete(name, &dp).await {
            Ok(_) => {
                deleted += 1;
                ctx.note(&format!("{label} deleted"));
            }
            Err(e) if is_status(&e, 404) => {
                absent += 1;
                ctx.note(&format!("{label} was already gone"));
            }
            Err(e) => {
                return Err(Failure(format!(
                    "{label}: delete failed: {}",
                    api_message(&e)
                )));
            }
        }
    }
    Ok(format!("deleted {deleted} objects ({absent} already gone)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};

    #[test]
    fn kubectl_names_of_kinds_resolve_and_others_stay_as_given() {
        let gvk = |k: &str| parse_kind(k).map_err(|f| f.0).expect("kind");
        assert_eq!(
            gvk("deployment"),
            GroupVersionKind::gvk("apps", "v1", "Deployment")
        );
        assert_eq!(
            gvk("sts"),
            GroupVersionKind::gvk("apps", "v1", "StatefulSet")
        );
        assert_eq!(gvk("cm"), GroupVersionKind::gvk("", "v1", "ConfigMap"));
        assert_eq!(
            gvk("example.dev/v1 Widget"),
            GroupVersionKind::gvk("example.dev", "v1", "Widget")
        );
    }

    fn deployment(generation: i64, observed: i64, status: DeploymentStatus) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.name = Some("web".into());
        d.metadata.generation = Some(generation);
        d.spec = Some(DeploymentSpec {
            replicas: Some(2),
            ..DeploymentSpec::default()
        });
        d.status = Some(DeploymentStatus {
            observed_generation: Some(observed),
            ..status
        });
        d
    }

    #[test]
    fn a_deployment_whose_new_spec_is_not_observed_is_not_rolled_out() {
        // All counts look complete, but the controller has not seen generation 3 yet:
        // kube's is_deployment_completed would say done here.
        let full = DeploymentStatus {
            replicas: Some(2),
            updated_replicas: Some(2),
            available_replicas: Some(2),
            ..DeploymentStatus::default()
        };
        assert!(matches!(
            deployment_status(&deployment(3, 2, full.clone())),
            Rollout::Waiting(m) if m.contains("spec update to be observed")
        ));
        assert!(matches!(
            deployment_status(&deployment(3, 3, full)),
            Rollout::Done(_)
        ));
        let old_pending = DeploymentStatus {
            replicas: Some(3),
            updated_replicas: Some(2),
            available_replicas: Some(2),
            ..DeploymentStatus::default()
        };
        assert!(matches!(
            deployment_status(&deployment(3, 3, old_pending)),
            Rollout::Waiting(m) if m.contains("1 old replicas are pending termination")
        ));
    }

    #[test]
    fn kinds_for_delete_default_their_api_version() {
        let g = parse_kind("Deployment").ok().expect("kind");
        assert_eq!((g.group.as_str(), g.version.as_str()), ("apps", "v1"));
        let g = parse_kind("example.dev/v2 Widget").ok().expect("kind");
        assert_eq!(
            (g.group.as_str(), g.version.as_str(), g.kind.as_str()),
            ("example.dev", "v2", "Widget")
        );
    }
}

//! The agent's own bound on what a cluster's tasks touch (`allowed_namespaces`,
//! `allowed_kinds` in `[[kubernetes]]`), as the `[docker]` table bounds a docker task.
//!
//! The credential's RBAC is the cluster's bound, but one credential often serves many
//! task authors, and a kubeconfig made for a person reaches far more than a delegate
//! should. The policy is checked for every object of an action before the first request
//! that changes anything, so a refused manifest changes nothing. A cluster-scoped kind
//! reaches past every namespace, so with a policy set it is refused unless
//! `allowed_kinds` names it, and a Namespace object must also be an allowed namespace.

use kube::discovery::Scope;

use crate::config::KubePolicy;

/// One object an action would touch.
pub(crate) struct Target<'a> {
    /// API group (`""` for the core group).
    pub group: &'a str,
    pub kind: &'a str,
    pub scope: Scope,
    /// The namespace of a namespaced object.
    pub namespace: &'a str,
    pub name: &'a str,
}

/// Does `entry` (`Kind`, or `Kind.group` with `core` for the core group) name this kind?
fn kind_matches(entry: &str, group: &str, kind: &str) -> bool {
    match entry.split_once('.') {
        Some((k, g)) => {
            k.eq_ignore_ascii_case(kind) && (g == group || (g == "core" && group.is_empty()))
        }
        None => entry.eq_ignore_ascii_case(kind),
    }
}

/// `Deployment.apps`, `ConfigMap.core`: how `allowed_kinds` would name it.
fn kind_label(group: &str, kind: &str) -> String {
    if group.is_empty() {
        format!("{kind}.core")
    } else {
        format!("{kind}.{group}")
    }
}

/// Why `t` is refused on `cluster`, or nothing when the policy allows it (or is off).
pub(crate) fn refusal(policy: &KubePolicy, cluster: &str, t: &Target<'_>) -> Option<String> {
    if !policy.is_set() {
        return None;
    }
    let how = |key: &str| {
        format!("an operator may add it to {key} in [[kubernetes]] {cluster:?} of delegate.toml")
    };
    let what = kind_label(t.group, t.kind);
    let listed = policy
        .allowed_kinds
        .as_ref()
        .map(|l| l.iter().any(|e| kind_matches(e, t.group, t.kind)));
    match (t.scope.clone(), listed) {
        (Scope::Cluster, None | Some(false)) => {
            return Some(format!(
                "{what} {:?} is cluster-scoped, which cluster {cluster}'s policy does not allow unless allowed_kinds names it; {}",
                t.name,
                how("allowed_kinds")
            ));
        }
        (_, Some(false)) => {
            return Some(format!(
                "kind {what} is not allowed on cluster {cluster} (allowed_kinds: {}); {}",
                policy
                    .allowed_kinds
                    .as_deref()
                    .unwrap_or_default()
                    .join(", "),
                how("allowed_kinds")
            ));
        }
        _ => {}
    }
    let Some(namespaces) = &policy.allowed_namespaces else {
        return None;
    };
    let namespace = match t.scope {
        Scope::Namespaced => t.namespace,
        // A Namespace object is the namespace itself.
        Scope::Cluster if t.group.is_empty() && t.kind == "Namespace" => t.name,
        Scope::Cluster => return None,
    };
    if namespaces.iter().any(|n| n == namespace) {
        return None;
    }
    Some(format!(
        "namespace {namespace:?} is not allowed on cluster {cluster} (allowed_namespaces: {}); {}",
        namespaces.join(", "),
        how("allowed_namespaces")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t<'a>(group: &'a str, kind: &'a str, scope: Scope, ns: &'a str) -> Target<'a> {
        Target {
            group,
            kind,
            scope,
            namespace: ns,
            name: "x",
        }
    }

    #[test]
    fn no_policy_allows_everything() {
        let p = KubePolicy::default();
        assert_eq!(
            refusal(
                &p,
                "c",
                &t(
                    "rbac.authorization.k8s.io",
                    "ClusterRoleBinding",
                    Scope::Cluster,
                    ""
                )
            ),
            None
        );
    }

    #[test]
    fn a_namespace_policy_refuses_other_namespaces_and_every_cluster_scoped_kind() {
        let p = KubePolicy {
            allowed_namespaces: Some(vec!["apps".into()]),
            allowed_kinds: None,
        };
        assert_eq!(
            refusal(&p, "c", &t("apps", "Deployment", Scope::Namespaced, "apps")),
            None
        );
        let e = refusal(
            &p,
            "c",
            &t("apps", "Deployment", Scope::Namespaced, "kube-system"),
        )
        .expect("refused");
        assert!(
            e.starts_with("namespace \"kube-system\" is not allowed on cluster c"),
            "{e}"
        );
        assert!(e.contains("allowed_namespaces"), "{e}");
        let e = refusal(
            &p,
            "c",
            &t(
                "rbac.authorization.k8s.io",
                "ClusterRoleBinding",
                Scope::Cluster,
                "",
            ),
        )
        .expect("refused");
        assert!(
            e.contains("ClusterRoleBinding.rbac.authorization.k8s.io \"x\" is cluster-scoped"),
            "{e}"
        );
        let e = refusal(&p, "c", &t("", "Namespace", Scope::Cluster, "")).expect("refused");
        assert!(e.contains("Namespace.core"), "{e}");
    }

    #[test]
    fn kinds_match_by_name_or_name_and_group_and_a_listed_cluster_kind_is_allowed() {
        let p = KubePolicy {
            allowed_namespaces: Some(vec!["apps".into()]),
            allowed_kinds: Some(vec![
                "Deployment.apps".into(),
                "configmap".into(),
                "Namespace".into(),
            ]),
        };
        assert_eq!(
            refusal(&p, "c", &t("apps", "Deployment", Scope::Namespaced, "apps")),
            None
        );
        assert!(
            refusal(
                &p,
                "c",
                &t("evil.io", "Deployment", Scope::Namespaced, "apps")
            )
            .is_some()
        );
        assert_eq!(
            refusal(&p, "c", &t("", "ConfigMap", Scope::Namespaced, "apps")),
            None
        );
        let e = refusal(&p, "c", &t("", "Secret", Scope::Namespaced, "apps")).expect("refused");
        assert!(
            e.starts_with("kind Secret.core is not allowed on cluster c"),
            "{e}"
        );
        // A Namespace object must be an allowed namespace too.
        let ns = |name| Target {
            name,
            ..t("", "Namespace", Scope::Cluster, "")
        };
        assert_eq!(refusal(&p, "c", &ns("apps")), None);
        assert!(refusal(&p, "c", &ns("kube-system")).is_some());
        assert!(kind_matches("ConfigMap.core", "", "ConfigMap"));
    }
}

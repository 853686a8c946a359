//! Reaching a cluster named in `[[kubernetes]]`: its client (from a kubeconfig file the
//! agent is given, never `$HOME`, or inside a pod its service account), the probe that
//! decides whether it is advertised, and how API errors read in a task's message. Every
//! action (apply, job, rollout, delete) uses these, so they live below all of them and the
//! actions never import each other.

use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::config::{KubeCluster, KubeSource};

/// How long a cluster gets to answer a probe (start-up and re-checks).
const PROBE_LIMIT: Duration = Duration::from_secs(5);

/// Why a cluster cannot be used at all; each says which cluster and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cluster {cluster}: kubeconfig {path} cannot be used; check the file (kubectl --kubeconfig {path} version) or fix kubeconfig in [[kubernetes]] of delegate.toml"
    )]
    Kubeconfig {
        cluster: String,
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cluster {cluster}: in_cluster = true, but this is not a pod with a service account (KUBERNETES_SERVICE_HOST and the token under /var/run/secrets/kubernetes.io/serviceaccount)"
    )]
    InCluster {
        cluster: String,
        #[source]
        source: kube::config::InClusterError,
    },
    #[error("cluster {cluster}: cannot build a client for {url}")]
    Client {
        cluster: String,
        url: String,
        #[source]
        source: kube::Error,
    },
    #[error("cluster {cluster}: the API server at {url} does not answer ({reason})")]
    Unreachable {
        cluster: String,
        url: String,
        reason: String,
    },
}

/// A client for `cluster`, with the server URL for messages.
pub async fn connect(cluster: &KubeCluster) -> Result<(Client, Config), ClusterError> {
    let config = match &cluster.source {
        KubeSource::Kubeconfig { path, context } => {
            let bad = |source| ClusterError::Kubeconfig {
                cluster: cluster.name.clone(),
                path: path.display().to_string(),
                source,
            };
            let kc = Kubeconfig::read_from(path).map_err(bad)?;
            let opts = KubeConfigOptions {
                context: context.clone(),
                ..KubeConfigOptions::default()
            };
            Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(bad)?
        }
        KubeSource::InCluster => Config::incluster().map_err(|source| ClusterError::InCluster {
            cluster: cluster.name.clone(),
            source,
        })?,
    };
    let client = Client::try_from(config.clone()).map_err(|source| ClusterError::Client {
        cluster: cluster.name.clone(),
        url: config.cluster_url.to_string(),
        source,
    })?;
    Ok((client, config))
}

/// Ask the cluster for its version: whether it answers decides whether it is advertised.
pub async fn probe(cluster: &KubeCluster) -> Result<String, ClusterError> {
    let (client, config) = connect(cluster).await?;
    let unreachable = |reason: String| ClusterError::Unreachable {
        cluster: cluster.name.clone(),
        url: config.cluster_url.to_string(),
        reason,
    };
    match tokio::time::timeout(PROBE_LIMIT, client.apiserver_version()).await {
        Ok(Ok(v)) => Ok(v.git_version),
        Ok(Err(e)) => Err(unreachable(cause_chain(&e))),
        Err(_) => Err(unreachable(format!(
            "no answer within {}s",
            PROBE_LIMIT.as_secs()
        ))),
    }
}

/// A cluster error with its causes, for log lines and task messages.
pub fn error_text(e: &ClusterError) -> String {
    cause_chain(e)
}

/// An error and its causes on one line, each once.
pub(super) fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Why an action failed, as the task's message.
pub(super) struct Failure(pub String);

impl<T: Into<String>> From<T> for Failure {
    fn from(s: T) -> Failure {
        Failure(s.into())
    }
}

/// A server's refusal in its own words, or the transport problem.
pub(super) fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => cause_chain(other),
    }
}

pub(super) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

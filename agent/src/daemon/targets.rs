//! Target probing: whether the Docker engine and each configured Kubernetes cluster
//! answer, at start and again later, so that only targets that work are offered to the
//! manager and one that comes up later is advertised by a new registration.
//!
//! A target that does not answer is said once (at start) with how to fix it, then
//! re-checked quietly; the other targets run as usual meanwhile.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::Shared;
use crate::exec;

/// Ask the Docker engine whether it answers: at start, and again with each heartbeat while
/// it does not. The target is offered only when it answers; an engine that cannot be used
/// gets one log line at start that says how to fix it (`quiet` for the retries). Returns
/// true when the engine answers now and did not before.
pub(super) async fn probe_docker(shared: &Shared, quiet: bool) -> bool {
    if !shared.config.docker.enabled || shared.docker_up.load(Ordering::Relaxed) {
        return false;
    }
    match exec::docker::probe(&shared.docker).await {
        Ok(version) => {
            shared.docker_up.store(true, Ordering::Relaxed);
            info!(socket = %shared.docker.socket.display(), "Docker engine {version} answers; offering the docker target");
            true
        }
        Err(e) if quiet => {
            debug!("Docker engine still not usable: {e}");
            false
        }
        Err(e) => {
            warn!(
                "docker target not offered: {e} (other targets run as usual; set enabled = false in [docker] to silence this)"
            );
            false
        }
    }
}

/// How often clusters that did not answer are asked again.
const CLUSTER_RECHECK: Duration = Duration::from_secs(10);

/// Ask every cluster not yet seen up for its version. Each one that does not answer is
/// logged once as a warning naming the cluster and the cause (`first`), then quietly
/// re-checked; one that answers is advertised from the next registration on. Returns true
/// when a cluster came up.
pub(super) async fn probe_clusters(shared: &Shared, first: bool) -> bool {
    let mut came_up = false;
    for cluster in shared.kubernetes.iter() {
        let known = shared
            .kube_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&cluster.name);
        if known {
            continue;
        }
        match exec::kubernetes::probe(cluster).await {
            Ok(version) => {
                info!(cluster = %cluster.name, "Kubernetes cluster {} answers (server {version}); offering target kubernetes:{}", cluster.name, cluster.name);
                shared
                    .kube_up
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cluster.name.clone());
                came_up = true;
            }
            Err(e) if first => warn!(
                cluster = %cluster.name,
                "kubernetes:{} not offered: {} (re-checked every {}s; other targets run as usual)",
                cluster.name,
                exec::kubernetes::error_text(&e),
                CLUSTER_RECHECK.as_secs()
            ),
            Err(e) => {
                debug!(cluster = %cluster.name, "cluster still not answering: {}", exec::kubernetes::error_text(&e))
            }
        }
    }
    came_up
}

/// Re-check clusters that did not answer until every one has.
pub(super) async fn watch_clusters(shared: Arc<Shared>) {
    loop {
        let all_up = shared
            .kube_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            == shared.kubernetes.len();
        if all_up {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(CLUSTER_RECHECK) => {}
            _ = shared.stopped() => return,
        }
        if probe_clusters(&shared, false).await {
            shared.targets_changed.store(true, Ordering::Relaxed);
        }
    }
}

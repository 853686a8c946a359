//! The manager's figures in the Prometheus text format (OpenMetrics), served at `/metrics`.
//!
//! Counts that the database already holds — delegates by state and version, tasks by
//! state and kind, log bytes stored — are read with a few grouped queries, so no code path
//! can forget to update them. Those queries scan whole tables, and `/metrics` needs no
//! token, so a scrape never runs them itself: it takes the [`ScrapeCache`]'s snapshot,
//! computed at most once a second and once at a time however many clients scrape (issue
//! 17 item 4: eight clients scraping a million tasks held a heartbeat up for 36 s). What
//! only the moment knows — how long a task waited in the queue before a delegate held it,
//! how long it ran, how many leases lapsed — is recorded where it happens, in the store.
//! The page holds counts and versions only (no names, ids or secrets), like `/healthz` it
//! needs no token.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DelegateLabels {
    state: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    state: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

type HistogramFamily = Family<KindLabel, Histogram, fn() -> Histogram>;

/// Pick-up: 0.5 ms … ~16 s.
fn pickup_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Task run time: 10 ms … ~1.5 days.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 14))
}

/// What a scrape reads from the database.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// (state, version) → delegates; a delegate not heard from within the lease TTL is
    /// counted as `disconnected`.
    pub delegates: BTreeMap<(String, String), i64>,
    /// (state, kind) → tasks.
    pub tasks: BTreeMap<(String, String), i64>,
    pub queue_depth: i64,
    pub log_bytes: i64,
}

pub struct Metrics {
    registry: Registry,
    delegates: Family<DelegateLabels, Gauge>,
    tasks: Family<TaskLabels, Gauge>,
    queue_depth: Gauge,
    log_bytes: Gauge,
    lease_expiries: Counter,
    pickup: HistogramFamily,
    duration: HistogramFamily,
    /// Snapshots the store computed (full-table aggregates run) since start.
    snapshots: AtomicU64,
    /// `render` sets the gauges, then encodes them: two scrapes at once take turns.
    rendering: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("delegate_manager");
        let delegates = Family::<DelegateLabels, Gauge>::default();
        let tasks = Family::<TaskLabels, Gauge>::default();
        let queue_depth = Gauge::default();
        let log_bytes = Gauge::default();
        let lease_expiries = Counter::default();
        let pickup: HistogramFamily = Family::new_with_constructor(pickup_histogram);
        let duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        registry.register(
            "delegates",
            "Registered delegates by the state they last reported (disconnected: not heard from within the lease TTL) and version",
            delegates.clone(),
        );
        registry.register(
            "tasks",
            "Tasks in the database by state and kind",
            tasks.clone(),
        );
        registry.register(
            "queue_depth",
            "Tasks queued and not yet held by a delegate",
            queue_depth.clone(),
        );
        registry.register(
            "log_bytes_stored",
            "Bytes of task logs stored (current attempts)",
            log_bytes.clone(),
        );
        registry.register(
            "lease_expiries",
            "Held tasks whose lease lapsed (re-queued, lost or cancelled by the reaper)",
            lease_expiries.clone(),
        );
        registry.register(
            "pickup_seconds",
            "Time from a task being queued to a delegate leasing it, by kind",
            pickup.clone(),
        );
        registry.register(
            "task_duration_seconds",
            "Run time of finished task attempts (started to result), by kind",
            duration.clone(),
        );
        registry.register(
            "build",
            "Version of this manager",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Metrics {
            registry,
            delegates,
            tasks,
            queue_depth,
            log_bytes,
            lease_expiries,
            pickup,
            duration,
            snapshots: AtomicU64::new(0),
            rendering: std::sync::Mutex::new(()),
        }
    }

    /// The store ran the aggregates of a [`Snapshot`] (called by the store).
    pub fn snapshot_computed(&self) {
        self.snapshots.fetch_add(1, Ordering::Relaxed);
    }

    /// How many snapshots the store computed since start: what scrapes cost the database.
    pub fn snapshots_computed(&self) -> u64 {
        self.snapshots.load(Ordering::Relaxed)
    }

    /// A delegate leased a task of `kind` that was queued `secs` ago.
    pub fn picked_up(&self, kind: &str, secs: f64) {
        self.pickup
            .get_or_create(&KindLabel { kind: kind.into() })
            .observe(secs);
    }

    /// A task reached a terminal state: its run time from `started` (from the lease when
    /// a delegate never said it started).
    pub fn task_finished(&self, view: &delegate_protocol::TaskView) {
        if let (true, Some(started), Some(ended)) = (
            view.state.is_terminal(),
            view.started_at.or(view.assigned_at),
            view.finished_at,
        ) {
            self.finished(&view.kind, (ended - started).max(0) as f64 / 1000.0);
        }
    }

    /// An attempt of `kind` ended after running `secs`.
    pub fn finished(&self, kind: &str, secs: f64) {
        self.duration
            .get_or_create(&KindLabel { kind: kind.into() })
            .observe(secs);
    }

    pub fn leases_lapsed(&self, n: u64) {
        self.lease_expiries.inc_by(n);
    }

    /// The exposition, with the database's counts as of `snap`.
    pub fn render(&self, snap: &Snapshot) -> String {
        let _turn = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        self.delegates.clear();
        for ((state, version), n) in &snap.delegates {
            self.delegates
                .get_or_create(&DelegateLabels {
                    state: state.clone(),
                    version: version.clone(),
                })
                .set(*n);
        }
        self.tasks.clear();
        for ((state, kind), n) in &snap.tasks {
            self.tasks
                .get_or_create(&TaskLabels {
                    state: state.clone(),
                    kind: kind.clone(),
                })
                .set(*n);
        }
        self.queue_depth.set(snap.queue_depth);
        self.log_bytes.set(snap.log_bytes);
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }
}

/// How old a snapshot may be and still answer a scrape: Prometheus scrapes every 15 s or
/// more, so a second of staleness costs nothing, and it caps the aggregates any number of
/// clients can cause at one a second.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);

/// The last snapshot and when its computation started; scrapes share it.
///
/// A scrape takes the cached snapshot when it is younger than [`SNAPSHOT_MAX_AGE`], or
/// when its computation started after the scrape arrived (it then shows everything the
/// scrape could expect; see `Cached::serves` for a slow database). Otherwise the scrape computes a new one while holding the cache's
/// lock, so at most one computation runs at a time and scrapes that arrive meanwhile wait
/// for it and share it instead of starting their own.
#[derive(Default)]
pub struct ScrapeCache {
    last: tokio::sync::Mutex<Option<Cached>>,
}

struct Cached {
    started: tokio::time::Instant,
    took: Duration,
    snap: Arc<Snapshot>,
}

impl Cached {
    /// Usable for a scrape that arrived at `arrived`: computed since, or young enough. On
    /// a database so big that a snapshot takes long, it stays usable for four times what
    /// it took, so scrapes keep the aggregates' share of one thread under a fifth.
    fn serves(&self, arrived: tokio::time::Instant) -> bool {
        self.started >= arrived
            || (self.started + self.took).elapsed() < SNAPSHOT_MAX_AGE.max(self.took * 4)
    }
}

impl ScrapeCache {
    /// The snapshot for a scrape that arrived now; `compute` runs only when no usable one
    /// is cached (see the type's doc).
    pub async fn get<E, F, Fut>(&self, compute: F) -> Result<Arc<Snapshot>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Snapshot, E>>,
    {
        let arrived = tokio::time::Instant::now();
        let mut last = self.last.lock().await;
        if let Some(c) = last.as_ref().filter(|c| c.serves(arrived)) {
            return Ok(c.snap.clone());
        }
        let started = tokio::time::Instant::now();
        let snap = Arc::new(compute().await?);
        *last = Some(Cached {
            started,
            took: started.elapsed(),
            snap: snap.clone(),
        });
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_figure() {
        let m = Metrics::new();
        m.picked_up("shell", 0.002);
        m.finished("shell", 1.5);
        m.leases_lapsed(2);
        let mut snap = Snapshot {
            queue_depth: 3,
            log_bytes: 42,
            ..Snapshot::default()
        };
        snap.delegates.insert(("running".into(), "1.2.3".into()), 5);
        snap.tasks.insert(("queued".into(), "shell".into()), 3);
        let text = m.render(&snap);
        for line in [
            "delegate_manager_delegates{state=\"running\",version=\"1.2.3\"} 5",
            "delegate_manager_tasks{state=\"queued\",kind=\"shell\"} 3",
            "delegate_manager_queue_depth 3",
            "delegate_manager_log_bytes_stored 42",
            "delegate_manager_lease_expiries_total 2",
            "delegate_manager_pickup_seconds_count{kind=\"shell\"} 1",
            "delegate_manager_task_duration_seconds_count{kind=\"shell\"} 1",
            "delegate_manager_build_info{version=",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        // A state that emptied is gone at the next scrape, not stuck at its last value.
        let text = m.render(&Snapshot::default());
        assert!(!text.contains("state=\"running\""), "{text}");
    }
}

//! The manager's `/metrics`, scraped over loopback and checked with a real
//! OpenMetrics parser (Python `prometheus_client`), as the agent's metrics are.

use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::{Manager, wait_for};

use crate::manager_logs::SimDelegate;
use crate::metrics::parse;

#[test]
fn manager_metrics_count_delegates_tasks_leases_and_logs_and_parse_as_openmetrics() {
    delegate_tests::require!(crate::metrics::openmetrics_parser());
    let tmp = tempfile::Builder::new()
        .prefix("delegate-it-")
        .tempdir()
        .expect("temp dir");
    let m = Manager::start_with(
        tmp.path(),
        "127.0.0.1:0",
        &["--lease-ttl", "2s", "--heartbeat-interval", "1s"],
    )
    .expect("manager starts");
    let d = SimDelegate::register(&m, "m1").expect("register");
    // One task runs through with a log; one is leased and abandoned (its lease lapses
    // and it is queued again); one waits for a tag nobody has.
    let done = m.submit_shell("true", 60, 0).expect("submit");
    let (id, attempt) = d.lease().expect("lease");
    assert_eq!(id, done);
    d.log(&id, attempt, 0, b"hello metrics\n".to_vec())
        .expect("log");
    d.succeed(&id, attempt).expect("result");
    let abandoned = m.submit_shell("true", 60, 1).expect("submit");
    let (id, _) = d.lease().expect("lease");
    assert_eq!(id, abandoned);
    m.submit(
        &serde_json::json!({"kind": "shell", "spec": {"script": "true"}, "selectors": ["nobody"]}),
    )
    .expect("submit");
    wait_for(
        Duration::from_secs(15),
        "the abandoned lease to lapse",
        || {
            let t = m.task(&abandoned).ok()?;
            (t.state == TaskState::Queued && t.attempt == 2).then_some(())
        },
    )
    .expect("lease lapsed");

    let resp = reqwest::blocking::get(format!("{}/metrics", m.url())).expect("scrape");
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let text = resp.text().expect("body");
    let samples = parse(&text);
    let get = |k: &str| -> f64 {
        *samples
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing in:\n{text}"))
    };
    // The delegate never heartbeats: after the lease TTL it counts as disconnected.
    let version = env!("CARGO_PKG_VERSION");
    let delegates: f64 = samples
        .iter()
        .filter(|(k, _)| {
            k.starts_with("delegate_manager_delegates{") && k.contains("version=\"0.1.0\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(delegates, 1.0, "{text}");
    assert_eq!(
        get("delegate_manager_tasks{kind=\"shell\",state=\"succeeded\"}"),
        1.0
    );
    assert_eq!(
        get("delegate_manager_tasks{kind=\"shell\",state=\"queued\"}"),
        2.0
    );
    assert_eq!(get("delegate_manager_queue_depth{}"), 2.0);
    assert_eq!(get("delegate_manager_lease_expiries_total{}"), 1.0);
    assert_eq!(get("delegate_manager_log_bytes_stored{}"), 14.0);
    assert_eq!(
        get("delegate_manager_pickup_seconds_count{kind=\"shell\"}"),
        2.0
    );
    assert_eq!(
        get("delegate_manager_task_duration_seconds_count{kind=\"shell\"}"),
        1.0
    );
    assert_eq!(
        get(&format!(
            "delegate_manager_build_info{{version=\"{version}\"}}"
        )),
        1.0
    );
}

/// Scrapes must not starve the store, reproduced in count: every scrape of the unauthenticated `/metrics`
/// ran the full-table aggregates itself (eight clients scraping a million tasks held a
/// heartbeat up for 36 s). Now concurrent scrapes share one computation, a burst within
/// a second computes nothing new, and a scrape after that sees fresh counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapes_share_one_store_aggregate_instead_of_one_each() {
    use delegate_manager::server::{self, ServeConfig};
    let tmp = tempfile::tempdir().expect("tmp");
    let server = server::bind(&ServeConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        tmp.path().join("data"),
    ))
    .await
    .expect("bind");
    let (addr, app) = (server.local_addr(), server.app());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let scrape_burst = |n: usize| {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let req = http.get(format!("http://{addr}/metrics")).send();
            set.spawn(async move {
                let r = req.await.expect("scrape");
                assert_eq!(r.status().as_u16(), 200);
                r.text().await.expect("body")
            });
        }
        set.join_all()
    };
    const SCRAPERS: usize = 8;
    let before = app.store.metrics().snapshots_computed();
    let pages = scrape_burst(SCRAPERS).await;
    assert_eq!(pages.len(), SCRAPERS);
    assert!(
        pages
            .iter()
            .all(|p| p.contains("delegate_manager_queue_depth"))
    );
    assert_eq!(
        app.store.metrics().snapshots_computed() - before,
        1,
        "{SCRAPERS} concurrent scrapes ran the store's aggregates more than once"
    );
    // Within the second, more scrapes reuse it too.
    scrape_burst(SCRAPERS).await;
    assert_eq!(app.store.metrics().snapshots_computed() - before, 1);
    // Later, a scrape counts afresh.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    scrape_burst(SCRAPERS).await;
    assert_eq!(app.store.metrics().snapshots_computed() - before, 2);
    let _ = stop.send(());
    serving.await.expect("join").expect("stop");
}

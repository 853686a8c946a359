//! Numbers, printed and not asserted beyond success: apply of 50 objects, and the agent's
//! RSS with three clusters configured.

use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::require;

use crate::world::{World, configmap, control_plane};

/// Numbers for the issue (printed, not asserted beyond success): apply of a 50-object
/// manifest, and the agent's RSS with three clusters configured.
#[test]
fn measure_apply_of_50_objects_and_rss_with_three_clusters() {
    let cp = require!(control_plane());
    let extra: String = ["two", "three"]
        .iter()
        .map(|n| {
            format!(
                "[[kubernetes]]\nname = \"{n}\"\nkubeconfig = {:?}\n",
                cp.admin_kubeconfig().display().to_string()
            )
        })
        .collect();
    let w = require!(World::new("measure", &extra));
    let manifest: Vec<String> = (1..=50)
        .map(|i| configmap(&format!("cm-{i}"), "v"))
        .collect();
    let manifest = manifest.join("---\n");
    let started = std::time::Instant::now();
    let (t, log) = w.apply(&manifest, false);
    let wall = started.elapsed();
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let ran = match (t.started_at, t.finished_at) {
        (Some(s), Some(f)) => Duration::from_millis(u64::try_from(f - s).unwrap_or(0)),
        _ => wall,
    };
    let rss = w.agent.rss_kib().expect("rss");
    println!(
        "MEASURE apply of 50 objects: {:.2} s in the agent ({:.0} objects/s), {:.2} s submit-to-result; agent RSS with 3 clusters after it: {rss} KiB",
        ran.as_secs_f64(),
        50.0 / ran.as_secs_f64().max(0.001),
        wall.as_secs_f64()
    );
}

//! `delete` removes what it names and takes a Job's pods along (never a bare DELETE that
//! would orphan them).

use delegate_protocol::TaskState;
use delegate_tests::kube::kubectl;
use delegate_tests::{require, wait_for};
use serde_json::json;

use crate::world::{LONG, World, node};

#[test]
fn deleting_a_job_takes_its_pods_along() {
    let w = require!(World::new("delete-job", ""));
    node();
    let job = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: sleeper\nspec:\n  template:\n    metadata:\n      labels: {app: sleeper}\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: main\n        image: stand-in/sh\n        command: [sleep, \"3600\"]\n";
    let (t, log) = w.apply(job, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    wait_for(LONG, "the Job's pod to run", || {
        let out = kubectl(
            &w.admin(),
            &[
                "-n",
                "delete-job",
                "get",
                "pods",
                "-l",
                "app=sleeper",
                "-o",
                "jsonpath={.items[*].status.phase}",
            ],
        )
        .ok()?;
        (out == "Running").then_some(())
    })
    .expect("pod running");
    let (t, log) =
        w.run(json!({"cluster": "test", "action": "delete", "kind": "Job", "name": "sleeper"}));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("job/sleeper in namespace delete-job deleted"),
        "{log}"
    );
    // A bare DELETE of a Job would orphan the pod; with propagation it goes too.
    wait_for(LONG, "the Job's pod to go", || {
        let out = kubectl(
            &w.admin(),
            &[
                "-n",
                "delete-job",
                "get",
                "pods",
                "-l",
                "app=sleeper",
                "-o",
                "name",
            ],
        )
        .ok()?;
        out.trim().is_empty().then_some(())
    })
    .expect("pod deleted with its Job");
    let (t, log) = w.run(json!({"cluster": "test", "action": "delete", "manifest": job}));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("job/sleeper in namespace delete-job was already gone"),
        "{log}"
    );
}

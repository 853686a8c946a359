//! `delegate-manager task submit --cluster ...` through the real binary, for each action.

use delegate_tests::kube::kubectl;
use delegate_tests::require;

use crate::world::{World, deployment, node};

/// `delegate-manager task submit --cluster ...` through the real binary: each action,
/// followed with `--wait`, whose exit status is the task's.
#[test]
fn the_manager_cli_submits_each_kubernetes_action_and_waits_for_it() {
    let w = require!(World::new("cli", ""));
    node();
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("web.yaml");
    std::fs::write(&file, deployment("web", "1", "", "")).expect("write");
    let file = file.display().to_string();
    let submit = |args: &[&str]| {
        let mut all = vec!["task", "submit", "--cluster", "test", "--wait"];
        all.extend_from_slice(args);
        let (status, stdout, stderr) = w.manager.cli(&all).expect("run the CLI");
        (status.code(), stdout, stderr)
    };

    let (code, out, err) = submit(&["--action", "apply", "--manifest", &file]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("deployment.apps/web in namespace cli created"),
        "{out}"
    );
    assert!(err.contains("succeeded"), "{err}");

    let (code, out, err) = submit(&["--action", "rollout", "--object", "deployment/web"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("deployment \"web\" successfully rolled out"),
        "{out}"
    );

    let (code, out, err) = submit(&[
        "--action",
        "job",
        "--image",
        "stand-in/sh",
        "--env",
        "GREETING=hi",
        "--",
        "sh",
        "-c",
        "echo greeting $GREETING; exit 3",
    ]);
    assert_eq!(code, Some(3), "the Job's exit code: {out}\n{err}");
    assert!(out.contains("greeting hi"), "{out}");
    assert!(err.contains("failed (exit 3)"), "{err}");

    let (code, out, err) = submit(&["--action", "delete", "--object", "deployment/web"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("deployment/web in namespace cli deleted"),
        "{out}"
    );
    assert!(
        kubectl(&w.admin(), &["-n", "cli", "get", "deployment", "web"]).is_err(),
        "deleted"
    );

    // A flag the action does not take is refused before anything is submitted.
    let (code, out, err) = submit(&[
        "--action",
        "rollout",
        "--object",
        "deployment/web",
        "--force",
    ]);
    assert_eq!((code, out.as_str()), (Some(1), ""), "no task id: {err}");
    assert!(
        err.contains("--force does not go with --action rollout"),
        "{err}"
    );
}

//! `task submit`'s flags turned into a `SubmitTask`: the kind inferred or named, each
//! kind's spec built from its flags, and a flag that the kind or kubernetes action does
//! not take refused rather than dropped, so a typo never submits a different task.

use std::path::Path;

use delegate_protocol::{
    DockerSpec, Env, HttpSpec, KubeAction, KubernetesSpec, ShellSpec, SubmitTask, TaskSpec,
};

use super::defs::SubmitArgs;
use crate::error::CliError;

/// Build the submission from `--spec` or from the kind's flags.
pub(super) fn submission(args: &SubmitArgs) -> Result<SubmitTask, CliError> {
    let mut task = if let Some(path) = &args.spec {
        let text = read_input(path)?;
        serde_json::from_str::<SubmitTask>(&text).map_err(|e| {
            CliError::Usage(format!(
                "{}: not a task submission: {e} (expected {{\"kind\": ..., \"spec\": {{...}}}})",
                path.display()
            ))
        })?
    } else {
        let kind = match (&args.kind, &args.script, &args.url, &args.image) {
            (Some(k), _, _, _) => k.clone(),
            (None, Some(_), _, _) => "shell".to_string(),
            (None, None, Some(_), _) => "http".to_string(),
            (None, None, None, _) if args.kube.cluster.is_some() => "kubernetes".to_string(),
            (None, None, None, Some(_)) => "docker".to_string(),
            (None, None, None, None) => {
                return Err(CliError::Usage(
                    "say what to run: --kind shell --script '...', --kind http --url URL, \
                     --kind docker --image IMAGE -- CMD ARG..., --kind kubernetes --cluster \
                     NAME --action ACTION ..., or --spec FILE"
                        .to_string(),
                ));
            }
        };
        let spec = match kind.as_str() {
            "shell" => TaskSpec::Shell(ShellSpec {
                script: args.script.clone().ok_or_else(|| {
                    CliError::Usage("--kind shell needs --script 'COMMANDS'".to_string())
                })?,
                interpreter: args.interpreter.clone(),
                env: pairs(&args.env, '=', "--env", "K=V")?,
                working_dir: args.workdir.clone(),
                ..Default::default()
            }),
            "http" => TaskSpec::Http(HttpSpec {
                url: args
                    .url
                    .clone()
                    .ok_or_else(|| CliError::Usage("--kind http needs --url URL".to_string()))?,
                method: args.method.clone(),
                headers: pairs(&args.headers, ':', "--header", "'K: V'")?,
                body: args.body.clone(),
                expect_status: args.expect_status.clone(),
            }),
            "docker" => TaskSpec::Docker(DockerSpec {
                image: args.image.clone().ok_or_else(|| {
                    CliError::Usage("--kind docker needs --image IMAGE".to_string())
                })?,
                pull: args.pull.unwrap_or_default(),
                command: args.command.clone(),
                env: pairs(&args.env, '=', "--env", "K=V")?,
                working_dir: args.workdir.clone(),
                user: args.user.clone(),
                network_mode: args.network.clone(),
                keep: args.keep,
                ..DockerSpec::default()
            }),
            "kubernetes" => TaskSpec::Kubernetes(kube_spec(args)?),
            other => {
                return Err(CliError::Usage(format!(
                    "unknown task kind {other:?} (known kinds: {}); other kinds need --spec FILE",
                    TaskSpec::KINDS.join(", ")
                )));
            }
        };
        SubmitTask {
            spec,
            selectors: Vec::new(),
            timeout_secs: None,
            retries: 0,
        }
    };
    if !args.selectors.is_empty() {
        task.selectors = args.selectors.clone();
    }
    if let Some(t) = args.timeout {
        task.timeout_secs = Some(t.as_secs().max(1));
    }
    if let Some(r) = args.retries {
        task.retries = r;
    }
    Ok(task)
}

/// A file's text, or stdin's for `-`.
fn read_input(path: &Path) -> Result<String, CliError> {
    let read = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    };
    read.map_err(|source| CliError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

/// A kubernetes spec from `--cluster`, `--action` and the action's flags; a flag the
/// action does not use is refused rather than silently dropped.
fn kube_spec(args: &SubmitArgs) -> Result<KubernetesSpec, CliError> {
    let k = &args.kube;
    let usage = |m: &str| CliError::Usage(m.to_string());
    let cluster = k.cluster.clone().ok_or_else(|| {
        usage("--kind kubernetes needs --cluster NAME (a [[kubernetes]] cluster of the delegate)")
    })?;
    let action = k
        .action
        .as_deref()
        .ok_or_else(|| usage("--kind kubernetes needs --action apply|job|rollout|delete"))?;
    let given: [(&str, bool); 8] = [
        ("--manifest", k.manifest.is_some()),
        ("--job", k.job.is_some()),
        ("--object", k.object.is_some()),
        ("--force", k.force),
        ("--propagation", k.propagation.is_some()),
        ("--image", args.image.is_some()),
        ("--env", !args.env.is_empty()),
        ("a command after --", !args.command.is_empty()),
    ];
    let allowed: &[&str] = match action {
        "apply" => &["--manifest", "--force"],
        "job" => &["--job", "--image", "--env", "a command after --"],
        "rollout" => &["--object"],
        _ => &["--manifest", "--object", "--propagation"],
    };
    if let Some((flag, _)) = given.iter().find(|(f, on)| *on && !allowed.contains(f)) {
        return Err(CliError::Usage(format!(
            "{flag} does not go with --action {action} (it takes {})",
            allowed.join(", ")
        )));
    }
    let namespace = k.namespace.clone();
    let manifest = k.manifest.as_deref().map(read_input).transpose()?;
    let object = match k.object.as_deref() {
        Some(o) => Some(
            o.rsplit_once('/')
                .filter(|(kind, name)| !kind.is_empty() && !name.is_empty())
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "--object {o:?} is not KIND/NAME, e.g. deployment/web"
                    ))
                })?,
        ),
        None => None,
    };
    let action = match action {
        "apply" => KubeAction::Apply {
            manifest: manifest.ok_or_else(|| usage("--action apply needs --manifest FILE"))?,
            namespace,
            force: k.force,
        },
        "job" => {
            if k.job.is_none() && args.image.is_none() {
                return Err(usage(
                    "--action job needs --image IMAGE -- CMD ARG..., or --job FILE",
                ));
            }
            KubeAction::Job {
                job: k.job.as_deref().map(read_input).transpose()?,
                image: args.image.clone(),
                command: args.command.clone(),
                env: pairs(&args.env, '=', "--env", "K=V")?,
                namespace,
            }
        }
        "rollout" => {
            let (kind, name) =
                object.ok_or_else(|| usage("--action rollout needs --object KIND/NAME"))?;
            KubeAction::Rollout {
                object_kind: kind.to_string(),
                name: name.to_string(),
                namespace,
            }
        }
        _ => {
            if manifest.is_some() == object.is_some() {
                return Err(usage(
                    "--action delete needs either --manifest FILE or --object KIND/NAME",
                ));
            }
            KubeAction::Delete {
                manifest,
                object_kind: object.map(|(kind, _)| kind.to_string()),
                name: object.map(|(_, name)| name.to_string()),
                namespace,
                propagation: k.propagation.clone(),
            }
        }
    };
    Ok(KubernetesSpec { cluster, action })
}

/// Parse `K=V` / `K: V` pairs.
fn pairs(items: &[String], sep: char, flag: &str, form: &str) -> Result<Env, CliError> {
    let mut env = Env::new();
    for item in items {
        let (k, v) = item
            .split_once(sep)
            .ok_or_else(|| CliError::Usage(format!("{flag} {item:?} is not of the form {form}")))?;
        let v = if sep == ':' { v.trim() } else { v };
        env.insert(k.trim().to_string(), v.to_string());
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use delegate_protocol::{KubeAction, PullPolicy, SubmitTask, TaskSpec};

    use super::submission;
    use crate::cli::defs::{Cli, Command, SubmitArgs, TaskCmd};

    fn args(extra: &[&str]) -> SubmitArgs {
        let mut argv = vec!["delegate-manager", "task", "submit"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parse").command {
            Command::Task(TaskCmd::Submit(a)) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn shell_flags_make_a_shell_task() {
        let a = args(&[
            "--script",
            "echo hi",
            "--env",
            "A=1=2",
            "--selector",
            "linux",
            "--timeout",
            "90s",
            "--retries",
            "2",
        ]);
        let t = submission(&a).expect("submission");
        match &t.spec {
            TaskSpec::Shell(s) => {
                assert_eq!(s.script, "echo hi");
                assert_eq!(s.env.get("A").map(String::as_str), Some("1=2"));
            }
            other => panic!("wrong kind {other:?}"),
        }
        assert_eq!(t.selectors, ["linux"]);
        assert_eq!((t.timeout_secs, t.retries), (Some(90), 2));
    }

    #[test]
    fn http_headers_split_on_colon() {
        let a = args(&[
            "--kind",
            "http",
            "--url",
            "http://x/y",
            "--header",
            "X-A: b: c",
            "--expect-status",
            "204",
        ]);
        match submission(&a).expect("submission").spec {
            TaskSpec::Http(h) => {
                assert_eq!(h.headers.get("X-A").map(String::as_str), Some("b: c"));
                assert_eq!(h.expect_status, [204]);
            }
            other => panic!("wrong kind {other:?}"),
        }
    }

    #[test]
    fn docker_flags_make_a_docker_task_with_the_command_after_the_separator() {
        let a = args(&[
            "--kind",
            "docker",
            "--image",
            "busybox:1",
            "--pull",
            "never",
            "--network",
            "none",
            "--env",
            "A=1",
            "--keep",
            "--",
            "sh",
            "-c",
            "echo --not-a-flag",
        ]);
        match submission(&a).expect("submission").spec {
            TaskSpec::Docker(d) => {
                assert_eq!(d.image, "busybox:1");
                assert_eq!(d.pull, PullPolicy::Never);
                assert_eq!(d.network_mode.as_deref(), Some("none"));
                assert_eq!(d.command, ["sh", "-c", "echo --not-a-flag"]);
                assert_eq!(d.env.get("A").map(String::as_str), Some("1"));
                assert!(d.keep);
            }
            other => panic!("wrong kind {other:?}"),
        }
        let e = submission(&args(&["--kind", "docker"])).expect_err("no image");
        assert!(e.to_string().contains("--image"), "{e}");
    }

    #[test]
    fn kubernetes_flags_make_each_action_and_refuse_flags_the_action_does_not_take() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("m.yaml");
        std::fs::write(&file, "apiVersion: v1\nkind: ConfigMap\n").expect("write");
        let m = file.to_str().expect("utf-8 path");
        let spec = |extra: &[&str]| match submission(&args(extra)) {
            Ok(SubmitTask {
                spec: TaskSpec::Kubernetes(k),
                ..
            }) => Ok(k),
            Ok(other) => panic!("wrong kind {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        // --cluster alone says the kind.
        let k = spec(&[
            "--cluster",
            "prod",
            "--action",
            "apply",
            "--manifest",
            m,
            "--namespace",
            "web",
            "--force",
        ])
        .expect("apply");
        assert_eq!(k.cluster, "prod");
        assert_eq!(
            k.action,
            KubeAction::Apply {
                manifest: "apiVersion: v1\nkind: ConfigMap\n".into(),
                namespace: Some("web".into()),
                force: true
            }
        );
        let k = spec(&[
            "--kind",
            "kubernetes",
            "--cluster",
            "prod",
            "--action",
            "job",
            "--image",
            "busybox:1",
            "--env",
            "A=1",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .expect("job");
        match k.action {
            KubeAction::Job {
                job: None,
                image: Some(i),
                command,
                env,
                namespace: None,
            } => {
                assert_eq!(i, "busybox:1");
                assert_eq!(command, ["sh", "-c", "exit 3"]);
                assert_eq!(env.get("A").map(String::as_str), Some("1"));
            }
            other => panic!("{other:?}"),
        }
        let k = spec(&[
            "--cluster",
            "prod",
            "--action",
            "rollout",
            "--object",
            "apps/v1 Deployment/web",
        ])
        .expect("rollout");
        assert_eq!(
            k.action,
            KubeAction::Rollout {
                object_kind: "apps/v1 Deployment".into(),
                name: "web".into(),
                namespace: None
            }
        );
        let k = spec(&[
            "--cluster",
            "prod",
            "--action",
            "delete",
            "--object",
            "job/x",
            "--propagation",
            "foreground",
        ])
        .expect("delete");
        assert!(matches!(
            k.action,
            KubeAction::Delete { manifest: None, object_kind: Some(ref o), name: Some(ref n), propagation: Some(ref p), .. }
                if o == "job" && n == "x" && p == "foreground"
        ));
        let e = spec(&[
            "--cluster",
            "prod",
            "--action",
            "rollout",
            "--force",
            "--object",
            "deploy/w",
        ])
        .expect_err("force is for apply");
        assert!(
            e.contains("--force does not go with --action rollout"),
            "{e}"
        );
        let e = spec(&["--cluster", "prod", "--action", "delete"]).expect_err("what to delete");
        assert!(e.contains("--manifest FILE or --object KIND/NAME"), "{e}");
        let e = spec(&[
            "--cluster",
            "prod",
            "--action",
            "rollout",
            "--object",
            "web",
        ])
        .expect_err("no kind");
        assert!(e.contains("not KIND/NAME"), "{e}");
        let e = spec(&["--kind", "kubernetes", "--action", "job"]).expect_err("no cluster");
        assert!(e.contains("--cluster NAME"), "{e}");
    }

    #[test]
    fn unknown_kind_and_missing_script_are_usage_errors() {
        let e = submission(&args(&["--kind", "cobol"])).expect_err("unknown kind");
        assert!(e.to_string().contains("unknown task kind \"cobol\""), "{e}");
        let e = submission(&args(&["--kind", "shell"])).expect_err("no script");
        assert!(e.to_string().contains("--script"), "{e}");
    }
}

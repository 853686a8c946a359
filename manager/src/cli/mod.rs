//! The operator's command line: `run` dispatches a parsed command line (declared in
//! `defs`) to the client commands (`token`, `task`, `delegates`) that talk HTTP to a
//! running manager; `submit` builds a task from flags and `show` renders what comes back.
//!
//! Output is made for both people and scripts: commands that create something print only
//! its id or token on stdout (`T=$(delegate-manager token create --name x)` works), tables
//! and summaries are for people, and `--json` prints the API's own JSON.

mod defs;
mod show;
mod submit;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use delegate_protocol::{
    CreateToken, CreatedToken, DelegateView, ForgetDelegate, ForgottenDelegate, SubmitResponse,
    TaskState, TaskView, TokenView,
};

pub use self::defs::{
    Cli, Command, DatabaseParser, DelegatesCmd, KubeArgs, ServeArgs, SubmitArgs, TaskCmd, TokenCmd,
};
use self::show::{delegates_table, show_text, summary, tasks_table, tokens_table};
use self::submit::submission;
use crate::client::Client;
use crate::error::CliError;
use crate::server::ADMIN_TOKEN_FILE;
use crate::text::shown;

/// Run a client command (anything but `serve`).
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let token = admin_token(cli.admin_token.as_deref(), &cli.data)?;
    let client = Client::new(&cli.server, token, cli.ca_file.as_deref())?;
    match cli.command {
        Command::Serve(_) => Err(CliError::Usage("serve is not a client command".to_string())),
        Command::Token(cmd) => token_cmd(&client, cmd).await,
        Command::Task(cmd) => task_cmd(&client, cmd).await,
        Command::Delegates { cmd: None, json } => delegates(&client, json).await,
        Command::Delegates {
            cmd: Some(DelegatesCmd::Forget { name, host }),
            ..
        } => forget(&client, name, host).await,
    }
}

/// The admin token from the flag or environment, else from the data directory.
fn admin_token(given: Option<&str>, data: &Path) -> Result<String, CliError> {
    if let Some(t) = given.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(t.to_string());
    }
    let path = data.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => Err(CliError::MissingAdminToken {
            path,
            reason: "the file is empty".to_string(),
        }),
        Err(e) => Err(CliError::MissingAdminToken {
            path,
            reason: e.to_string(),
        }),
    }
}

fn out(s: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{s}").map_err(CliError::Stdout)
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::Usage(format!("cannot format JSON: {e}")))?;
    out(&s)
}

async fn token_cmd(client: &Client, cmd: TokenCmd) -> Result<ExitCode, CliError> {
    match cmd {
        TokenCmd::Create { name, tags } => {
            let tags = tags.as_deref().map(delegate_protocol::parse_tags);
            let created: CreatedToken = client
                .post("/tokens", Some(&CreateToken { name, tags }))
                .await?;
            out(&created.token)?;
        }
        TokenCmd::List { json } => {
            let tokens: Vec<TokenView> = client.get("/tokens", &[]).await?;
            if json {
                print_json(&tokens)?;
            } else {
                out(&tokens_table(&tokens))?;
            }
        }
        TokenCmd::Revoke { name } => {
            let _: TokenView = client
                .post::<(), _>(&format!("/tokens/{name}/revoke"), None)
                .await?;
            eprintln!("token {name} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn task_cmd(client: &Client, cmd: TaskCmd) -> Result<ExitCode, CliError> {
    match cmd {
        TaskCmd::Submit(args) => submit(client, *args).await,
        TaskCmd::Show { id, json } => {
            let t: TaskView = client.get(&format!("/tasks/{id}"), &[]).await?;
            if json {
                print_json(&t)?;
            } else {
                out(&show_text(&t))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Logs {
            id,
            follow,
            offset,
            raw,
        } => {
            print_log(client, &id, offset, follow, raw).await?;
            if follow {
                finished_task(client, &id).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Cancel { id } => {
            let t: TaskView = client
                .post::<(), _>(&format!("/tasks/{id}/cancel"), None)
                .await?;
            if t.state == TaskState::Cancelled {
                eprintln!("task {id} cancelled");
            } else {
                eprintln!(
                    "cancel requested for task {id} ({}); delegate {} will stop it",
                    t.state,
                    shown(t.delegate_name.as_deref().unwrap_or("?"))
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::List { state, limit, json } => {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(s) = state {
                let st = TaskState::parse(&s).ok_or_else(|| {
                    let known: Vec<_> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
                    CliError::Usage(format!(
                        "--state {s:?} is not a task state (one of: {})",
                        known.join(", ")
                    ))
                })?;
                query.push(("state", st.as_str().to_string()));
            }
            let tasks: Vec<TaskView> = client.get("/tasks", &query).await?;
            if json {
                print_json(&tasks)?;
            } else {
                out(&tasks_table(&tasks))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Copy a task's log to stdout: as it is into a pipe or file, or with `raw`; escaped on
/// a terminal, where the task's bytes must not drive the operator's terminal.
async fn print_log(
    client: &Client,
    id: &str,
    offset: u64,
    follow: bool,
    raw: bool,
) -> Result<(), CliError> {
    use std::io::IsTerminal;
    let stdout = std::io::stdout();
    if raw || !stdout.is_terminal() {
        let mut stdout = stdout.lock();
        client.copy_log(id, offset, follow, &mut stdout).await?;
        return Ok(());
    }
    let mut out = crate::text::EscapeWriter::new(stdout.lock());
    client.copy_log(id, offset, follow, &mut out).await?;
    out.finish().map(drop).map_err(CliError::Stdout)?;
    Ok(())
}

async fn submit(client: &Client, args: SubmitArgs) -> Result<ExitCode, CliError> {
    let task = submission(&args)?;
    let resp: SubmitResponse = client.post("/tasks", Some(&task)).await?;
    let id = resp.task_id;
    out(&id)?;
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    {
        print_log(client, &id, 0, true, false).await?;
    }
    let t = finished_task(client, &id).await?;
    eprintln!("{}", shown(&summary(&t)));
    Ok(task_exit_code(&t))
}

/// The task after its followed log ended: that happens when it finished, but also when
/// the manager shut down, which must not look like success.
async fn finished_task(client: &Client, id: &str) -> Result<TaskView, CliError> {
    let t: TaskView = client.get(&format!("/tasks/{id}"), &[]).await?;
    if !t.state.is_terminal() {
        return Err(CliError::StreamEnded {
            task: id.to_string(),
            state: t.state,
        });
    }
    Ok(t)
}

/// 0 when the task succeeded, its exit code when it has one, else 1.
fn task_exit_code(t: &TaskView) -> ExitCode {
    if t.state == TaskState::Succeeded {
        return ExitCode::SUCCESS;
    }
    match t.exit_code {
        Some(c) if (1..=255).contains(&c) => ExitCode::from(c as u8),
        _ => ExitCode::FAILURE,
    }
}

async fn delegates(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let ds: Vec<DelegateView> = client.get("/delegates", &[]).await?;
    if json {
        print_json(&ds)?;
        return Ok(ExitCode::SUCCESS);
    }
    out(&delegates_table(&ds, crate::store::now_ms()))?;
    Ok(ExitCode::SUCCESS)
}

async fn forget(client: &Client, name: String, host: Option<String>) -> Result<ExitCode, CliError> {
    let req = ForgetDelegate {
        name,
        hostname: host,
    };
    let gone: ForgottenDelegate = client.post("/delegates/forget", Some(&req)).await?;
    eprintln!(
        "{}",
        shown(&format!(
            "delegate {} on {} ({}, token {}) forgotten; {} held task(s) released; any token \
             may register the name now",
            gone.name, gone.hostname, gone.id, gone.token_name, gone.released_tasks
        ))
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_follows_the_task() {
        let mut t: TaskView = serde_json::from_value(serde_json::json!({
            "id": "t_1", "kind": "shell", "spec": {}, "selectors": [], "state": "failed",
            "attempt": 1, "retries": 0, "timeout_secs": 1, "cancel_requested": false,
            "delegate_id": null, "delegate_name": null, "exit_code": 3, "signal": null,
            "message": null, "created_at": 0, "assigned_at": null, "started_at": null,
            "finished_at": null, "log_bytes": 0
        }))
        .expect("view");
        assert_eq!(task_exit_code(&t), ExitCode::from(3));
        t.exit_code = None;
        assert_eq!(task_exit_code(&t), ExitCode::FAILURE);
        t.state = TaskState::Succeeded;
        assert_eq!(task_exit_code(&t), ExitCode::SUCCESS);
    }

    #[test]
    fn missing_admin_token_names_the_three_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = admin_token(None, dir.path()).expect_err("no token");
        let msg = e.to_string();
        assert!(msg.contains("--admin-token") && msg.contains("DELEGATE_ADMIN_TOKEN"));
        assert!(msg.contains("--data"), "{msg}");
        std::fs::write(dir.path().join(ADMIN_TOKEN_FILE), "adm_x\n").expect("write");
        assert_eq!(admin_token(None, dir.path()).expect("read"), "adm_x");
        assert_eq!(
            admin_token(Some("adm_y"), dir.path()).expect("flag"),
            "adm_y"
        );
    }
}

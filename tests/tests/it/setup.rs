//! `delegate setup` and its token: a token on the command line is
//! visible to every local user in `ps` while setup runs (minutes, while the restart drains
//! the agent). Read from standard input it never is; given as an argument it still works,
//! with a warning. (Where the token is written is tested in `delegate setup::tests`; a
//! host without the `delegate` group stops setup before it writes, which the test uses.)

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use delegate_tests::{bin, wait_for};

const TOKEN: &str = "dlg_issue17_item7_secret";

fn setup(args: &[&str], config: &std::path::Path) -> Command {
    let mut c = Command::new(bin("delegate").expect("binary"));
    c.args([
        "setup",
        "--manager",
        "http://127.0.0.1:9",
        "--no-restart",
        "--config",
    ])
    .arg(config)
    .args(args)
    .env_remove("DELEGATE_TOKEN")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

#[test]
fn a_token_on_stdin_is_in_no_command_line_and_one_given_as_an_argument_is_warned_about() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("delegate.toml");

    // `--token -`: setup waits for the token on standard input, and meanwhile every local
    // user's view of it (`/proc/PID/cmdline`, what `ps` shows) holds none.
    let mut child = setup(&["--token", "-"], &config)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    // Right after the fork the command line is the test's own, or empty: wait for exec.
    let cmdline = wait_for(Duration::from_secs(5), "setup's command line", || {
        let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        c.contains(" setup ").then_some(c)
    })
    .expect("cmdline");
    assert!(cmdline.contains("--token -"), "{cmdline}");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{TOKEN}").expect("send the token");
    drop(stdin);
    let out = child.wait_with_output().expect("setup ends");
    let err = String::from_utf8_lossy(&out.stderr);
    // It read the token (an empty or bad one is said first) and went on to the next step.
    assert!(!err.contains("visible to every local user"), "{err}");
    assert!(!err.contains("token"), "{err}");
    assert!(
        out.status.success() || err.contains("group \"delegate\" does not exist"),
        "{err}"
    );

    // What comes on standard input is the token that is checked (the old setup took the
    // `-` itself for the token).
    let mut child = setup(&["--token", "-"], &config)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "dlg two words").expect("send");
    drop(stdin);
    let out = child.wait_with_output().expect("setup ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("contains whitespace"), "{err}");

    // `--token-file`, and DELEGATE_TOKEN: the same, without a warning.
    let file = tmp.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).expect("write");
    let file = file.display().to_string();
    for (args, env) in [
        (vec!["--token-file", file.as_str()], None),
        (vec![], Some(TOKEN)),
    ] {
        let mut c = setup(&args, &config);
        if let Some(t) = env {
            c.env("DELEGATE_TOKEN", t);
        }
        let out = c.stdin(Stdio::null()).output().expect("setup");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("token"), "{args:?}: {err}");
    }

    // Nothing at all: setup says every way to give it.
    let out = setup(&[], &config)
        .stdin(Stdio::null())
        .output()
        .expect("setup");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--token -") && err.contains("--token-file") && err.contains("DELEGATE_TOKEN"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(78), "{err}");

    // `--token TOKEN` still works, and says who can see it.
    let out = setup(&["--token", TOKEN], &config)
        .stdin(Stdio::null())
        .output()
        .expect("setup");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("visible to every local user") && err.contains("--token -"),
        "{err}"
    );
}

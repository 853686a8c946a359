//! A world per test: a temp directory, a manager in it and a delegate token.

use std::time::Duration;

use delegate_tests::{Agent, AgentOptions, Manager};
use tempfile::TempDir;

pub const LONG: Duration = Duration::from_secs(60);

pub struct World {
    pub manager: Manager,
    pub token: String,
    // Dropped last: the processes above die first.
    pub tmp: TempDir,
}

impl World {
    pub fn new() -> World {
        let tmp = tempfile::Builder::new()
            .prefix("delegate-it-")
            .tempdir()
            .expect("temp dir");
        let manager = Manager::start(tmp.path()).expect("manager starts");
        let token = manager.token("test").expect("token");
        World {
            manager,
            token,
            tmp,
        }
    }

    pub fn agent(&self, opts: AgentOptions) -> Agent {
        Agent::start(self.tmp.path(), &self.manager.url(), &self.token, &opts)
            .expect("agent starts")
    }

    /// An agent named `name` with defaults otherwise.
    pub fn named_agent(&self, name: &str) -> Agent {
        self.agent(AgentOptions {
            name: name.into(),
            ..AgentOptions::default()
        })
    }

    /// Wait until `n` delegates are connected.
    pub fn wait_connected(&self, n: usize) {
        delegate_tests::wait_for(Duration::from_secs(20), "delegates to connect", || {
            let d = self.manager.delegates().ok()?;
            (d.iter().filter(|d| d.connected).count() >= n).then_some(())
        })
        .expect("delegates connected");
    }
}

/// Make the `sleep 9876NN` markers of a script unique to this test run, so that
/// `process_with_cmdline` never matches a process left by another run (or another CI
/// checkout on the same machine): `sleep 987621` becomes `sleep 987621.<run>`.
pub fn marked(script: &str) -> String {
    static RUN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("{}{nanos:09}", std::process::id())
    });
    let mut out = String::with_capacity(script.len() + 32);
    let mut rest = script;
    while let Some(i) = rest.find("sleep 9876") {
        let start = i + "sleep ".len();
        let digits = rest[start..].bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(&rest[..start + digits]);
        out.push('.');
        out.push_str(run);
        rest = &rest[start + digits..];
    }
    out.push_str(rest);
    out
}

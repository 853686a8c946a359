//! Many tasks at once over several agents: every task runs exactly once.

use std::collections::HashMap;
use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::{AgentOptions, wait_for};

use crate::util::World;

#[test]
fn two_hundred_tasks_finish_exactly_once_spread_over_two_agents() {
    let w = World::new();
    let agents: Vec<_> = ["agent-a", "agent-b"]
        .iter()
        .map(|n| {
            w.agent(AgentOptions {
                name: (*n).into(),
                concurrency: 8,
                ..AgentOptions::default()
            })
        })
        .collect();
    w.wait_connected(2);
    let ids: Vec<String> = (0..200)
        .map(|_| {
            w.manager
                .submit_shell("echo \"$DELEGATE_TASK_ID\"", 60, 0)
                .expect("submit")
        })
        .collect();
    let mut per_agent: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let t = w
            .manager
            .wait_done(id, Duration::from_secs(120))
            .expect("finishes");
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(t.attempt, 1, "ran more than once: {t:?}");
        // The log holds the task's own id once: it ran exactly once, on one delegate.
        let log = w.manager.logs(id).expect("logs");
        assert_eq!(String::from_utf8_lossy(&log), format!("{id}\n"));
        *per_agent
            .entry(t.delegate_name.unwrap_or_default())
            .or_default() += 1;
    }
    assert_eq!(per_agent.values().sum::<usize>(), 200);
    for name in ["agent-a", "agent-b"] {
        assert!(
            per_agent.get(name).copied().unwrap_or(0) > 0,
            "{name} got nothing: {per_agent:?}"
        );
    }
    // Everything was delivered: both spools empty.
    for a in &agents {
        let spool = a.dir.join("state/tasks");
        wait_for(Duration::from_secs(10), "the spool to empty", || {
            (std::fs::read_dir(&spool).ok()?.count() == 0).then_some(())
        })
        .expect("spool empty");
    }
}

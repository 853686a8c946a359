//! A host's upgrade group (issue 19, first slice): from `upgrade_group` in the agent's
//! config, through register, to the manager's `delegates` list; a bad value stops the
//! agent with the rule.

use std::process::Command;

use delegate_tests::{AgentOptions, bin};

use crate::util::World;

#[test]
fn an_agent_with_an_upgrade_group_is_listed_in_it_and_one_without_shows_none() {
    let w = World::new();
    let _canary = w.agent(AgentOptions {
        name: "agent-canary".into(),
        extra: "upgrade_group = \"canary\"\n".into(),
        ..AgentOptions::default()
    });
    let _plain = w.named_agent("agent-plain");
    w.wait_connected(2);

    let (st, out, err) = w.manager.cli(&["delegates", "--json"]).expect("cli");
    assert!(st.success(), "{err}");
    let ds: serde_json::Value = serde_json::from_str(&out).expect("json");
    let ds = ds.as_array().expect("a list");
    let by_name = |name: &str| {
        ds.iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {out}"))
    };
    assert_eq!(by_name("agent-canary")["upgrade_group"], "canary", "{out}");
    // None is not sent: a delegate without a group has no such field.
    assert!(
        by_name("agent-plain").get("upgrade_group").is_none(),
        "{out}"
    );

    let (st, out, err) = w.manager.cli(&["delegates"]).expect("cli");
    assert!(st.success(), "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][3], "GROUP", "{out}");
    let group = |name: &str| {
        rows.iter()
            .find(|r| r[0] == name)
            .map(|r| r[3])
            .unwrap_or_else(|| panic!("{name} in the table: {out}"))
    };
    assert_eq!(group("agent-canary"), "canary", "{out}");
    assert_eq!(group("agent-plain"), "-", "{out}");
}

#[test]
fn a_bad_upgrade_group_is_refused_with_the_key_the_value_and_the_rule() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("delegate.toml");
    std::fs::write(
        &cfg,
        "manager_url = \"http://127.0.0.1:9\"\ntoken = \"dlg_x\"\nupgrade_group = \"Canary_1\"\n",
    )
    .expect("write");
    for args in [
        &["config", "check", "--config"][..],
        &["run", "--config"][..],
    ] {
        let out = Command::new(bin("delegate").expect("bin"))
            .args(args)
            .arg(&cfg)
            .env_remove("DELEGATE_MANAGER_URL")
            .env_remove("DELEGATE_TOKEN")
            .env_remove("DELEGATE_UPGRADE_GROUP")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "{}:3: upgrade_group \"Canary_1\" is not a valid group name: use 1 to 63 \
                 characters of a-z, 0-9 and '-', starting with a letter or digit",
                cfg.display()
            )),
            "{args:?}: {err}"
        );
    }
}

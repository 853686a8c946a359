//! An action the credential's RBAC forbids fails with the API server's own words.

use delegate_protocol::TaskState;
use delegate_tests::kube::LIMITED_TOKEN;
use delegate_tests::require;
use serde_json::json;

use crate::world::{World, configmap, control_plane};

#[test]
fn an_action_rbac_forbids_fails_with_the_servers_message() {
    let cp = require!(control_plane());
    let kc = cp
        .write_kubeconfig("limited", LIMITED_TOKEN)
        .expect("kubeconfig");
    let w = require!(World::new(
        "rbac",
        &format!(
            "[[kubernetes]]\nname = \"limited\"\nkubeconfig = {:?}\n",
            kc.display().to_string()
        ),
    ));
    let (t, log) = w.run(json!({ "cluster": "limited", "action": "apply", "namespace": "rbac", "manifest": configmap("x", "1") }));
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("configmaps \"x\" is forbidden: User \"limited\" cannot"),
        "the server's own words: {msg}"
    );
    assert!(msg.contains("403"), "{msg}");
}

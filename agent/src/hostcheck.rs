//! Checks of the host around the agent that its config file cannot show: whether the
//! agent's user can reach the root Docker engine (`config check` and the start say so).
//!
//! Access to the Docker socket of a rootful engine is root on the host: whoever can call
//! it can `docker run --privileged -v /:/host`. The agent's own policy (`allowed_mounts`,
//! no privileged containers) binds the tasks it runs, not a process that talks to the
//! socket directly, so operators must know what the `docker` group grants.

use std::path::Path;

use nix::unistd::{Gid, Group, User, getgroups};

use crate::config::Config;

/// The user the packaged unit runs the agent as.
pub const AGENT_USER: &str = "delegate";

/// A warning when the agent's user (the packaged `delegate`, or this process) can use the
/// Docker engine's socket through the `docker` group.
pub fn docker_group_warning(config: &Config) -> Option<String> {
    if !config.docker.enabled {
        return None;
    }
    let group = Group::from_name("docker").ok()??;
    let packaged = User::from_name(AGENT_USER)
        .ok()
        .flatten()
        .is_some_and(|u| u.gid == group.gid || group.mem.iter().any(|m| m == AGENT_USER));
    let this_process =
        getgroups().map(|g| g.contains(&group.gid)).unwrap_or(false) || Gid::current() == group.gid;
    if !packaged && !this_process {
        return None;
    }
    let who = if packaged {
        format!("user {AGENT_USER}")
    } else {
        "this agent's user".to_string()
    };
    // A rootless engine's socket (under /run/user) is only its user's; no socket, no engine.
    let socket = &config.docker.socket;
    if socket.starts_with("/run/user") || !Path::new(socket).exists() {
        return None;
    }
    let socket = socket.display();
    Some(format!(
        "{who} is in the docker group: the Docker socket {socket} is root on this host, for the agent and for anything that runs as it (docker tasks are checked against allowed_mounts, a process with the socket is not). Use rootless Docker (dockerd-rootless-setuptool.sh, then [docker] socket = \"/run/user/UID/docker.sock\"), or a socket proxy that allows only the calls the docker target makes (containers, images, volumes inspect), and take {AGENT_USER} out of the docker group. Shell tasks run as delegate-task@ units are never in the group."
    ))
}

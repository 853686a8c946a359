//! What the agent and the upgrader share on a host: the `dev.delegate.Agent1` D-Bus proxy,
//! the systemd D-Bus proxies they call, the journald logging set-up, and how a config
//! error finds its line.
//!
//! Both binaries run on every host and must agree on these contracts; declaring them once
//! keeps the proxy from drifting from the interface the agent serves, and keeps the two
//! journals' fields alike. It is small on purpose: the upgrader links it instead of the
//! whole agent.

#![forbid(unsafe_code)]

pub mod agent1;
pub mod logging;
pub mod systemd1;

/// 1-based line of a byte `offset` into a config file's text, for `file:line:` messages
/// (toml reports spans as byte offsets; both programs' configs are edited by hand).
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    #[test]
    fn line_of_counts_from_one_and_clamps() {
        let t = "a = 1\nb = 2\n";
        assert_eq!(super::line_of(t, 0), 1);
        assert_eq!(super::line_of(t, 6), 2);
        assert_eq!(super::line_of(t, 1000), 3);
    }
}

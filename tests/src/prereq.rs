//! The one policy every suite follows when a test needs something this machine may lack
//! (a tool, a Docker engine, a PostgreSQL server, a Kubernetes control plane, a booted
//! container): a test never passes quietly without having checked anything.
//!
//! - Missing here: the test is skipped *loudly* — a banner on stderr naming the test, what
//!   is missing and what to install — and passes.
//! - Missing under `DELEGATE_E2E_REQUIRED=1` (`.ci/run` sets it): the test fails with the
//!   same words. CI never skips.
//! - Left out on purpose by `scripts/test --fast` (`DELEGATE_TEST_FAST=1`): tests that
//!   need a Docker engine, PostgreSQL or Kubernetes skip with one quiet line, whether the
//!   service is there or not (a warm edit-test loop should not start them).
//! - An opt-in target nobody configured (a real cluster in `DELEGATE_TEST_KUBECONFIG`):
//!   one notice per run, also in CI, which has no such target.
//!
//! A prerequisite check returns `Result<T, Missing>`; the test takes the value with
//! [`require!`](crate::require), which returns from the test when it must skip:
//!
//! ```ignore
//! let socket = delegate_tests::require!(delegate_tests::docker::test_socket());
//! ```

use std::fmt;
use std::io::Write;

/// Set to `1` by `.ci/run`: every missing prerequisite fails its test.
pub const REQUIRED_ENV: &str = "DELEGATE_E2E_REQUIRED";
/// Set to `1` by `scripts/test --fast`: tests that need a service skip quietly.
pub const FAST_ENV: &str = "DELEGATE_TEST_FAST";

/// What a test needs and did not get, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// Not installed or not set up here: `what` is missing, `install` says how to get it.
    Absent { what: String, install: String },
    /// A service (Docker engine, PostgreSQL, Kubernetes) that `scripts/test --fast` leaves
    /// out, present or not.
    LeftOut { what: String },
    /// An opt-in target that was not configured: `how` says how to run against it.
    NotAsked { what: String, how: String },
}

impl Missing {
    /// `what` is not here; `install` is the command or step that gets it.
    pub fn absent(what: impl Into<String>, install: impl Into<String>) -> Missing {
        Missing::Absent {
            what: what.into(),
            install: install.into(),
        }
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Absent { what, install } => write!(f, "{what} is missing: {install}"),
            Missing::LeftOut { what } => {
                write!(f, "needs {what}, which scripts/test --fast leaves out")
            }
            Missing::NotAsked { what, how } => write!(f, "{what} not configured: {how}"),
        }
    }
}

/// What happens to a test whose prerequisite is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pass without running, with one line on stderr.
    SkipQuietly(String),
    /// Pass without running, with a banner on stderr that is hard to miss.
    SkipLoudly(String),
    /// Fail the test with this message.
    Fail(String),
}

/// The policy itself, pure: `test` misses `missing`; `required` is
/// `DELEGATE_E2E_REQUIRED=1`.
pub fn verdict(test: &str, missing: &Missing, required: bool) -> Verdict {
    match missing {
        // An opt-in target is never part of what CI must run.
        Missing::NotAsked { .. } => {
            Verdict::SkipQuietly(format!("note: {test} skipped: {missing}"))
        }
        _ if required => Verdict::Fail(format!(
            "{test} cannot run: {missing} ({REQUIRED_ENV}=1 makes a missing prerequisite a failure)"
        )),
        Missing::LeftOut { .. } => Verdict::SkipQuietly(format!("skipped {test}: {missing}")),
        Missing::Absent { .. } => Verdict::SkipLoudly(format!(
            "\n!!!!! SKIPPED {test}: {missing} (with {REQUIRED_ENV}=1, as in CI, this fails) !!!!!\n"
        )),
    }
}

/// Is `name` set to `1`?
fn flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| v == "1")
}

/// `DELEGATE_TEST_FAST=1`: `scripts/test --fast` is running.
pub fn fast() -> bool {
    flag(FAST_ENV)
}

/// A check for a service that `scripts/test --fast` leaves out: under `--fast` it is
/// [`Missing::LeftOut`] without probing, else whatever `probe` finds.
pub fn service<T>(what: &str, probe: impl FnOnce() -> Result<T, Missing>) -> Result<T, Missing> {
    if fast() {
        return Err(Missing::LeftOut {
            what: what.to_string(),
        });
    }
    probe()
}

/// The running test's name (libtest names each test's thread after it).
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("this test")
        .to_string()
}

/// Apply the policy for `test`: the value when it is there; `None` (the test should
/// return) after saying why it skips; a panic when it must not skip.
pub fn require_for<T>(test: &str, found: Result<T, Missing>) -> Option<T> {
    let missing = match found {
        Ok(v) => return Some(v),
        Err(m) => m,
    };
    match verdict(test, &missing, flag(REQUIRED_ENV)) {
        Verdict::Fail(why) => panic!("{why}"),
        // Straight to stderr: the harness captures print! and eprintln! of passing tests.
        Verdict::SkipQuietly(line) | Verdict::SkipLoudly(line) => {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
    None
}

/// [`require_for`] the running test.
pub fn require<T>(found: Result<T, Missing>) -> Option<T> {
    require_for(&current_test(), found)
}

/// The value of a prerequisite check, or return from the test (skipping it, loudly or
/// quietly) — or fail it under `DELEGATE_E2E_REQUIRED=1`. See [`crate::prereq`].
#[macro_export]
macro_rules! require {
    ($check:expr) => {
        match $crate::prereq::require($check) {
            Some(v) => v,
            None => return,
        }
    };
    // For a test that returns a value (a `Result`): `require!(check, Ok(()))`.
    ($check:expr, $skipped:expr) => {
        match $crate::prereq::require($check) {
            Some(v) => v,
            None => return $skipped,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absent() -> Missing {
        Missing::absent("`minisign`", "apt-get install minisign")
    }

    #[test]
    fn a_missing_tool_skips_loudly_naming_the_test_and_what_to_install() {
        let Verdict::SkipLoudly(text) = verdict("checks::sig", &absent(), false) else {
            panic!("not a loud skip");
        };
        assert!(text.contains("!!!!! SKIPPED checks::sig"), "{text}");
        assert!(text.contains("apt-get install minisign"), "{text}");
        assert!(text.contains("DELEGATE_E2E_REQUIRED=1"), "{text}");
    }

    #[test]
    fn a_missing_tool_fails_when_the_suite_is_required() {
        let Verdict::Fail(text) = verdict("checks::sig", &absent(), true) else {
            panic!("not a failure");
        };
        assert!(text.contains("checks::sig cannot run"), "{text}");
        assert!(text.contains("apt-get install minisign"), "{text}");
    }

    #[test]
    fn fast_mode_skips_services_quietly_but_never_in_a_required_run() {
        let left_out = Missing::LeftOut {
            what: "a Docker engine".into(),
        };
        assert!(matches!(
            verdict("docker::runs", &left_out, false),
            Verdict::SkipQuietly(t) if t.contains("--fast") && !t.contains("!!!!!")
        ));
        assert!(matches!(
            verdict("docker::runs", &left_out, true),
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn an_opt_in_target_is_a_notice_also_in_a_required_run() {
        let m = Missing::NotAsked {
            what: "DELEGATE_TEST_KUBECONFIG".into(),
            how: "set it to a kubeconfig".into(),
        };
        for required in [false, true] {
            assert!(matches!(
                verdict("real_cluster::x", &m, required),
                Verdict::SkipQuietly(t) if t.starts_with("note:")
            ));
        }
    }

    #[test]
    fn require_hands_over_what_is_there_and_none_for_a_skip() {
        assert_eq!(require_for::<u8>("t", Ok(7)), Some(7));
        // A left-out service skips (as long as this process is not a required run).
        if !flag(REQUIRED_ENV) {
            let skipped: Option<u8> = require_for(
                "t",
                Err(Missing::LeftOut {
                    what: "PostgreSQL".into(),
                }),
            );
            assert_eq!(skipped, None);
        }
    }

    #[test]
    fn the_test_name_comes_from_the_harness_thread() {
        assert_eq!(
            current_test(),
            "prereq::tests::the_test_name_comes_from_the_harness_thread"
        );
    }
}

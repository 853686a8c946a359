//! Exponential backoff with full jitter for every retry loop of the agent.
//!
//! Hundreds of agents lose their manager at the same moment when it restarts; "full jitter"
//! (sleep a uniformly random time up to the exponential ceiling) spreads their retries so
//! the manager is not hit by a reconnect storm when it comes back.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            failures: 0,
        }
    }

    /// Retries of calls to the manager: 0.5 s doubling up to 30 s.
    pub fn manager() -> Backoff {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// The ceiling for the next delay: `min(cap, base * 2^failures)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random delay in `[ceiling/10, ceiling]`, and one more failure counted. The small
    /// floor keeps an unlucky run of near-zero draws from becoming a tight loop.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        Duration::from_millis(rand::rng().random_range(ms / 10..=ms))
    }

    /// Consecutive failures so far; the first one is logged as a warning, later ones quieter.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_delays_stay_under_them() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            let c = b.ceiling();
            let d = b.next_delay();
            assert!(d <= c && d >= c / 10, "{d:?} outside [{:?}, {c:?}]", c / 10);
            ceilings.push(c.as_millis());
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_spread_not_identical() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
            seen.insert(b.next_delay().as_millis());
        }
        assert!(seen.len() > 10, "jitter too narrow: {seen:?}");
    }
}

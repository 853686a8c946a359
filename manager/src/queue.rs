//! The queued tasks in memory, grouped by their selector sets, so that a lease finds the
//! oldest task a delegate may take without scanning the queue.
//!
//! SQLite stays the truth; this is an index over its `queued` rows, kept by the store in
//! step with its commits (a task is added when it is queued or re-queued and removed when
//! it is leased or cancelled) and rebuilt from the database at start. A delegate's tags
//! satisfy a whole group or none of it, so a lease looks at one head per group: the cost
//! grows with the number of distinct selector sets (a handful in practice), not with the
//! number of queued tasks or of waiting delegates. The store also keeps here the tasks
//! queued since the API last asked (`take_fresh`), so the API can wake one matching long
//! poll for each (see `hub`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use delegate_protocol::{UnixMillis, selectors_match};

/// A selector set as a group key: sorted, no duplicates.
pub type Selectors = Arc<[String]>;

/// Normalise selectors into a group key (order and repeats do not change what matches).
pub fn selector_key(selectors: &[String]) -> Selectors {
    let mut v: Vec<String> = selectors.to_vec();
    v.sort();
    v.dedup();
    v.into()
}

/// Position in the queue: oldest first, submission order among equals.
type Place = (UnixMillis, i64);

/// A task that was queued since the API last asked, to wake one poll for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fresh {
    pub task: String,
    pub selectors: Selectors,
}

#[derive(Debug, Default)]
pub struct Queue {
    groups: HashMap<Selectors, BTreeMap<Place, String>>,
    /// Its group, its place, and since when it waits (for the pick-up figure).
    by_id: HashMap<String, (Selectors, Place, Instant)>,
    fresh: Vec<Fresh>,
}

impl Queue {
    /// Add a queued task (`created_at`, `seq` order it); adding it again moves nothing.
    pub fn add(&mut self, id: &str, selectors: &[String], created_at: UnixMillis, seq: i64) {
        if self.by_id.contains_key(id) {
            return;
        }
        let key = selector_key(selectors);
        let place = (created_at, seq);
        self.groups
            .entry(key.clone())
            .or_default()
            .insert(place, id.to_string());
        self.by_id
            .insert(id.to_string(), (key.clone(), place, Instant::now()));
        self.fresh.push(Fresh {
            task: id.to_string(),
            selectors: key,
        });
    }

    /// The task left the queue (leased or ended).
    pub fn remove(&mut self, id: &str) {
        if let Some((key, place, _)) = self.by_id.remove(id)
            && let Some(group) = self.groups.get_mut(&key)
        {
            group.remove(&place);
            if group.is_empty() {
                self.groups.remove(&key);
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// The selectors of a queued task.
    pub fn selectors(&self, id: &str) -> Option<Selectors> {
        self.by_id.get(id).map(|(k, _, _)| k.clone())
    }

    /// How long a queued task has waited (since it was queued, or since the manager
    /// started for a task queued before).
    pub fn waited(&self, id: &str) -> Option<Duration> {
        self.by_id.get(id).map(|(_, _, since)| since.elapsed())
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Up to `max` queued tasks a delegate with `tags` may take, oldest first, not
    /// counting `skip`. Looks at the first `max` of each matching group only.
    pub fn oldest_for(&self, tags: &[String], max: usize, skip: &[String]) -> Vec<String> {
        let mut found: Vec<(Place, &String)> = Vec::new();
        for (key, group) in &self.groups {
            if !selectors_match(key, tags) {
                continue;
            }
            found.extend(
                group
                    .iter()
                    .filter(|(_, id)| !skip.contains(id))
                    .take(max)
                    .map(|(p, id)| (*p, id)),
            );
        }
        found.sort_unstable_by_key(|(p, _)| *p);
        found
            .into_iter()
            .take(max)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Tasks queued since the last call.
    pub fn take_fresh(&mut self) -> Vec<Fresh> {
        std::mem::take(&mut self.fresh)
    }

    /// Say a queued task again as fresh (a wake-up for it was not used).
    pub fn refresh(&mut self, id: &str) {
        if let Some((key, _, _)) = self.by_id.get(id) {
            self.fresh.push(Fresh {
                task: id.to_string(),
                selectors: key.clone(),
            });
        }
    }

    /// Queued tasks per selector set (for metrics and tests).
    pub fn depth_by_group(&self) -> impl Iterator<Item = (&Selectors, usize)> {
        self.groups.iter().map(|(k, g)| (k, g.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn oldest_matching_first_across_groups() {
        let mut q = Queue::default();
        q.add("gpu1", &s(&["gpu"]), 5, 1);
        q.add("any1", &s(&[]), 7, 2);
        q.add("any0", &s(&[]), 3, 3);
        q.add("eu", &s(&["linux", "eu"]), 1, 4);
        assert_eq!(q.oldest_for(&s(&[]), 10, &[]), ["any0", "any1"]);
        assert_eq!(q.oldest_for(&s(&["gpu"]), 2, &[]), ["any0", "gpu1"]);
        assert_eq!(
            q.oldest_for(&s(&["eu", "linux", "gpu"]), 10, &[]),
            ["eu", "any0", "gpu1", "any1"]
        );
        assert_eq!(
            q.oldest_for(&s(&["gpu"]), 10, &s(&["any0"])),
            ["gpu1", "any1"]
        );
        q.remove("any0");
        q.remove("eu");
        q.remove("nope");
        assert_eq!(q.len(), 2);
        assert!(!q.contains("eu"));
        assert_eq!(q.depth_by_group().count(), 2, "an empty group is dropped");
        let fresh: Vec<_> = q.take_fresh().into_iter().map(|f| f.task).collect();
        assert_eq!(fresh, ["gpu1", "any1", "any0", "eu"]);
        assert!(q.take_fresh().is_empty());
    }

    #[test]
    fn selector_order_and_repeats_make_one_group() {
        let mut q = Queue::default();
        q.add("a", &s(&["x", "y"]), 1, 1);
        q.add("b", &s(&["y", "x", "x"]), 2, 2);
        q.add("a", &s(&["x", "y"]), 9, 9);
        assert_eq!(q.depth_by_group().collect::<Vec<_>>().len(), 1);
        assert_eq!(q.oldest_for(&s(&["y", "x"]), 5, &[]), ["a", "b"]);
        assert!(q.oldest_for(&s(&["x"]), 5, &[]).is_empty());
    }
}

//! `/health`'s check of the bucket, shared for a second: the check is a
//! request to the hub (a JetStream stream info), and `/health` needs no
//! token, so without sharing every call to it would be one more request to
//! the hub.

use crate::store::PresenceStore;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long one answer of the hub serves `/health`.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

/// The hub's last answer, and when it came.
pub struct KvProbe {
    last: Mutex<Option<(Instant, Result<u64, String>)>>,
    fresh_for: Duration,
}

impl Default for KvProbe {
    fn default() -> Self {
        KvProbe::fresh_for(FRESH_FOR)
    }
}

impl KvProbe {
    /// A probe whose answers serve for `fresh_for` (tests take a long one,
    /// so a slow machine can't make them check twice).
    pub fn fresh_for(fresh_for: Duration) -> Self {
        KvProbe {
            last: Mutex::new(None),
            fresh_for,
        }
    }

    /// The bucket's last revision as the hub tells it (or why it can't),
    /// at most its freshness ([`FRESH_FOR`] in a node) old. Callers meanwhile wait for the one check
    /// under way instead of starting their own.
    pub async fn last_revision(&self, store: &dyn PresenceStore) -> Result<u64, String> {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() < self.fresh_for
        {
            return answer.clone();
        }
        let answer = store
            .identity()
            .await
            .map(|id| id.last_revision)
            .map_err(|err| err.to_string());
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn one_answer_serves_while_it_is_fresh() {
        let store = MemoryStore::default();
        let probe = KvProbe::fresh_for(Duration::from_secs(3600));
        let first = probe.last_revision(&store).await;
        assert!(first.is_ok(), "{first:?}");
        // An answer from the last second is shared: its time is kept.
        let stamped = probe.last.lock().await.as_ref().map(|(at, _)| *at);
        assert_eq!(probe.last_revision(&store).await, first);
        let again = probe.last.lock().await.as_ref().map(|(at, _)| *at);
        assert_eq!(stamped, again, "no second check within the second");
    }
}

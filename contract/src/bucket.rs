//! The presence bucket: its default name, where it lives, and its settings.
//!
//! The operator provisions the bucket and the center's `presence-service`
//! creates it when it is missing (so a cluster without the operator works);
//! both create it from [`config`], so neither can drift from the other.

use async_nats::jetstream::{kv, stream};
use std::time::Duration;

/// Bucket name when none is configured (the Go service's).
pub const DEFAULT_NAME: &str = "PRESENCE";
/// JetStream domain of the hub when none is configured.
pub const DEFAULT_JS_DOMAIN: &str = "hub";
/// Values kept per key: only the latest state of a key matters.
pub const HISTORY: i64 = 1;
/// How long the bucket keeps the delete markers of expired keys, so a
/// watcher that was away for less than this still learns of the expiry.
pub const MARKER_TTL: Duration = Duration::from_secs(3600);
/// How long the removal marker of an ended session stays. Ended sessions
/// leave no key behind for longer, so session IDs don't pile up.
pub const ENDED_SESSION_MARKER_TTL: Duration = MARKER_TTL;
/// Safety margin between the marker lifetime and what a resuming stream
/// may rely on: revision ages are only known to checkpoint granularity.
const RESUME_MARGIN: Duration = Duration::from_secs(600);
/// How far back a change stream can resume without a full snapshot: a
/// removal younger than this still has its marker in the bucket.
pub const RESUME_HORIZON: Duration = MARKER_TTL.saturating_sub(RESUME_MARGIN);

/// The JetStream stream behind a KV bucket.
pub fn stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The bucket's configuration: one value per key, on disk, with per-key TTL
/// markers (session expiry depends on them, and they can't be enabled on an
/// existing bucket).
pub fn config(name: &str, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: name.to_owned(),
        description: "PresenceCluster presences (one key per user)".into(),
        history: HISTORY,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        limit_markers: Some(MARKER_TTL),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_resume_only_while_markers_last() {
        assert!(RESUME_HORIZON < MARKER_TTL);
        assert_eq!(RESUME_HORIZON, Duration::from_secs(50 * 60));
    }

    #[test]
    fn config_has_markers_and_one_value_per_key() {
        let c = config("P", 3);
        assert_eq!((c.bucket.as_str(), c.history, c.num_replicas), ("P", 1, 3));
        assert_eq!(c.limit_markers, Some(MARKER_TTL));
        assert_eq!(c.storage, stream::StorageType::File);
    }
}

//! Where presences live. `PresenceStore` is the seam between the API and the
//! storage engine: NATS JetStream KV in production, a map for `--store memory`
//! and unit tests.

pub mod memory;
pub mod nats;

use crate::model::{Presence, decode_key};
use futures::stream::BoxStream;
use std::time::Duration;
use time::OffsetDateTime;

/// Why the store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The bucket has not been opened yet (startup, or a leaf waiting for the hub).
    #[error("the presence store is not ready: {0}")]
    NotReady(String),
    /// JetStream did not answer in time; the outcome of a write is unknown.
    #[error("timed out after {0:?} waiting for the presence store")]
    Timeout(Duration),
    /// The hub or the local NATS server can't be reached.
    #[error("the presence store is unavailable: {0}")]
    Unavailable(String),
    /// A stored value that this service can't read (written by another tool).
    #[error("stored value for {key:?} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
}

/// One change observed by a watch.
#[derive(Debug, Clone)]
pub struct Change {
    pub user_id: String,
    pub revision: u64,
    /// `None` when the key was deleted, purged or expired.
    pub presence: Option<Presence>,
    /// When the hub stored the change; the watch lag is measured from it.
    pub stored_at: OffsetDateTime,
}

/// Where a watch begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// The latest value of every key, then live changes (cold start).
    LatestPerKey,
    /// Every change after this revision (resume after a reconnect).
    After(u64),
}

/// A live sequence of changes in revision order.
pub type ChangeStream = BoxStream<'static, Result<Change, StoreError>>;

/// Which incarnation of the bucket exists: a bucket deleted and created
/// again has a new creation time and starts its revisions at 1 again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketIdentity {
    pub created: OffsetDateTime,
    pub last_revision: u64,
}

/// Whether the node can serve reads, as `/health/readiness` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Connectivity {
    /// The node's regional NATS server is connected.
    pub connected: bool,
    /// The bucket has been opened at least once.
    pub bucket_open: bool,
}

/// The storage operations the API needs.
#[async_trait::async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Reads one user's presence with its revision.
    async fn get(&self, user_id: &str) -> Result<Option<Presence>, StoreError>;
    /// Stores a presence and returns the revision once it is durable.
    async fn put(&self, presence: &Presence) -> Result<u64, StoreError>;
    /// Streams changes from `start` on.
    async fn watch(&self, start: WatchStart) -> Result<ChangeStream, StoreError>;
    /// Asks the store itself (not a cache) which bucket exists and its
    /// latest revision; `NotReady` when the bucket is missing.
    async fn identity(&self) -> Result<BucketIdentity, StoreError>;
    /// Recreates the bucket if it is missing, where this node may (center).
    async fn ensure_bucket(&self) -> Result<(), StoreError>;
    /// Creation time of the bucket as it was when first opened: everything
    /// cached since came from it (or from a later incarnation noticed by sync).
    fn opened_bucket(&self) -> Option<OffsetDateTime>;
    /// Connection state, without I/O.
    fn connectivity(&self) -> Connectivity;
    /// Name for `/health` (`nats` or `memory`).
    fn kind(&self) -> &'static str;
}

/// The stored bytes of a presence (JSON without the revision).
pub fn encode_value(presence: &Presence) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(presence).map_err(|e| StoreError::Corrupt {
        key: presence.user_id.clone(),
        reason: e.to_string(),
    })
}

/// Reads stored bytes back, attaching the revision the store assigned.
pub fn decode_value(key: &str, bytes: &[u8], revision: u64) -> Result<Presence, StoreError> {
    let mut presence: Presence =
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
    let user_id = decode_key(key).map_err(|e| StoreError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    if presence.user_id != user_id {
        return Err(StoreError::Corrupt {
            key: key.to_owned(),
            reason: format!("value names user {:?}", presence.user_id),
        });
    }
    presence.revision = revision;
    Ok(presence)
}

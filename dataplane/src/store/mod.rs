//! Where presences live. `PresenceStore` is the seam between the API and the
//! storage engine: NATS JetStream KV in production, a map for `--store memory`
//! and unit tests.

pub mod memory;
pub mod nats;

use crate::keys::{Part, key_of, parse_key};
use crate::model::Presence;
use crate::record::Update;
use crate::session::{Seen, Session};
use futures::stream::BoxStream;
use std::sync::Arc;
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

/// One change observed by a watch, or one key read by [`PresenceStore::load`].
#[derive(Debug, Clone)]
pub struct Change {
    pub user_id: String,
    /// The key's new value, or its removal (deleted, purged or expired).
    pub update: Update,
    pub revision: u64,
    /// When the hub stored the change; the watch lag is measured from it.
    pub stored_at: OffsetDateTime,
    /// How many changes of the initial replay are still to come (0 once live).
    pub pending: u64,
}

/// Where a watch begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// The latest value of every key, then live changes (cold start).
    LatestPerKey,
    /// Every change after this revision (resume after a reconnect).
    After(u64),
}

/// Every change the watch applied, in revision order, for the change
/// streams: one KV watch per node, fanned out in process.
pub type ChangeFeed = tokio::sync::broadcast::Sender<std::sync::Arc<Change>>;

/// A live sequence of changes in revision order.
pub type ChangeStream = BoxStream<'static, Result<Change, StoreError>>;

/// Which incarnation of the bucket exists: a bucket deleted and created
/// again has a new creation time and starts its revisions at 1 again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketIdentity {
    pub created: OffsetDateTime,
    pub last_revision: u64,
    /// Messages (keys and removal markers) the bucket holds now.
    pub messages: u64,
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
    /// Reads every key of one user (removal markers included), so the
    /// caller can build a complete [`crate::record::UserRecord`].
    async fn load(&self, user_id: &str) -> Result<Vec<Change>, StoreError>;
    /// Stores `update` (a removal writes a delete marker) for `user_id`,
    /// optionally with a TTL after which the bucket removes the key by
    /// itself; returns the revision once it is durable.
    async fn write(
        &self,
        user_id: &str,
        update: &Update,
        ttl: Option<Duration>,
    ) -> Result<u64, StoreError>;
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

/// The stored bytes of an update; `None` for a removal.
pub fn encode_value(user_id: &str, update: &Update) -> Result<Option<Vec<u8>>, StoreError> {
    let encoded = match update {
        Update::Manual(value) => value.as_ref().map(|p| serde_json::to_vec(p.as_ref())),
        Update::Seen(value) => value.as_ref().map(serde_json::to_vec),
        Update::Session(_, value) => value.as_ref().map(|s| serde_json::to_vec(s.as_ref())),
    };
    encoded.transpose().map_err(|e| StoreError::Corrupt {
        key: key_of(user_id, &update.part()),
        reason: e.to_string(),
    })
}

/// Reads a key and its stored bytes back into a change; `bytes` is `None`
/// for a removal marker.
pub fn decode_change(
    key: &str,
    bytes: Option<&[u8]>,
    revision: u64,
    stored_at: OffsetDateTime,
    pending: u64,
) -> Result<Change, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.to_owned(),
        reason,
    };
    let (user_id, part) = parse_key(key).map_err(|e| corrupt(e.to_string()))?;
    let update = match bytes {
        None => Update::removal(part),
        Some(bytes) => match part {
            Part::Manual => {
                let mut presence: Presence =
                    serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
                if presence.user_id != user_id {
                    return Err(corrupt(format!("value names user {:?}", presence.user_id)));
                }
                presence.revision = revision;
                Update::Manual(Some(Arc::new(presence)))
            }
            Part::Seen => Update::Seen(Some(
                serde_json::from_slice::<Seen>(bytes).map_err(|e| corrupt(e.to_string()))?,
            )),
            Part::Session(id) => Update::Session(
                id,
                Some(Arc::new(
                    serde_json::from_slice::<Session>(bytes).map_err(|e| corrupt(e.to_string()))?,
                )),
            ),
        },
    };
    Ok(Change {
        user_id,
        update,
        revision,
        stored_at,
        pending,
    })
}

//! Where presences live. `PresenceStore` is the seam between the API and the
//! storage engine: NATS JetStream KV in production, a map for `--store memory`
//! and unit tests.

pub mod memory;
pub mod nats;

use crate::keys::{Part, key_of, parse_key};
use crate::model::{Presence, validate_user_id};
use crate::record::Update;
use crate::session::{Seen, Session, validate_session_id};
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
    /// The bucket no longer holds what the write expected: another write
    /// got there first. Nothing was written.
    #[error("another write changed this value first; nothing was written")]
    Conflict,
}

/// What a write expects the bucket to hold, checked by the bucket itself
/// when the write arrives. A write that arrives late (after its caller was
/// told it failed) or races another can therefore never replace a value it
/// has not seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key's last revision, removal markers included; 0: the key holds
    /// nothing at all.
    Key(u64),
    /// The last revision among all of the user's session keys (`<user>.s.>`);
    /// 0: none. A new session is written only if no session changed since
    /// its writer counted them, which keeps the per-user cap exact.
    Sessions(u64),
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

/// One bucket entry as this service reads it.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A change of one of a user's keys.
    Change(Change),
    /// The echo of one of this node's own writes, claimed by the watch's
    /// [`EchoFilter`] and left undecoded: the cache holds its effect
    /// already and no stream follows its user.
    Echo {
        /// The user whose key it is (a skipped echo still names its user).
        user_id: String,
        /// As [`Change::revision`], [`Change::stored_at`] and
        /// [`Change::pending`].
        revision: u64,
        stored_at: OffsetDateTime,
        pending: u64,
    },
    /// An entry that is no user's key this service knows (another tool's,
    /// or one skipped on purpose): it only moves the watch on.
    Other {
        revision: u64,
        stored_at: OffsetDateTime,
        pending: u64,
    },
}

impl Entry {
    /// The KV revision of the entry.
    pub fn revision(&self) -> u64 {
        self.position().0
    }

    /// (revision, when stored, how many replayed entries follow).
    pub fn position(&self) -> (u64, OffsetDateTime, u64) {
        match self {
            Entry::Change(c) => (c.revision, c.stored_at, c.pending),
            Entry::Echo {
                revision,
                stored_at,
                pending,
                ..
            }
            | Entry::Other {
                revision,
                stored_at,
                pending,
            } => (*revision, *stored_at, *pending),
        }
    }

    /// The user whose key the entry is, if it is a user's key.
    pub fn user_id(&self) -> Option<&str> {
        match self {
            Entry::Change(c) => Some(&c.user_id),
            Entry::Echo { user_id, .. } => Some(user_id),
            Entry::Other { .. } => None,
        }
    }

    /// The same place in the bucket with nothing to apply.
    pub fn into_other(self) -> Entry {
        let (revision, stored_at, pending) = self.position();
        Entry::Other {
            revision,
            stored_at,
            pending,
        }
    }
}

/// Where a watch begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// The latest value of every key, then live changes (cold start).
    LatestPerKey,
    /// Every change after this revision (resume after a reconnect).
    After(u64),
}

/// Claims a watched entry, by its revision and its user, as the echo of a
/// write of this node whose effect the cache holds already and whose
/// value nobody needs: the store hands it over as [`Entry::Echo`] without
/// decoding the value (a JSON parse per write, a few per cent of a write's
/// CPU). Asked once per entry of a user's key; a claim is final, so the
/// filter forgets what it claimed.
pub type EchoFilter = Arc<dyn Fn(u64, &str) -> bool + Send + Sync>;

/// An [`EchoFilter`] that claims nothing: every entry comes decoded.
pub fn decode_every_entry() -> EchoFilter {
    Arc::new(|_, _| false)
}

/// A live sequence of entries in revision order.
pub type ChangeStream = BoxStream<'static, Result<Entry, StoreError>>;

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
    /// itself, if the bucket still holds what `expect` says; returns the
    /// revision once it is durable, or [`StoreError::Conflict`].
    async fn write(
        &self,
        user_id: &str,
        update: &Update,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<u64, StoreError>;
    /// Streams changes from `start` on; the entries `echoes` claims come
    /// as [`Entry::Echo`].
    async fn watch(
        &self,
        start: WatchStart,
        echoes: EchoFilter,
    ) -> Result<ChangeStream, StoreError>;
    /// Asks the store itself (not a cache) which bucket exists and its
    /// latest revision; `NotReady` when the bucket is missing.
    async fn identity(&self) -> Result<BucketIdentity, StoreError>;
    /// The revision of the first entry stored after `revision`, as the
    /// bucket's leader (not some replica) knows it; `None`: there is none.
    /// Tells a watch that stopped short (its consumer served by a replica
    /// behind the leader) from one that saw everything.
    async fn first_after(&self, revision: u64) -> Result<Option<u64>, StoreError>;
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
        Update::Manual(value) => value.as_ref().map(|p| p.to_stored_json(user_id)),
        Update::Seen(value) => value.as_ref().map(serde_json::to_vec),
        Update::Session(_, value) => value.as_ref().map(|s| serde_json::to_vec(s.as_ref())),
    };
    encoded.transpose().map_err(|e| StoreError::Corrupt {
        key: key_of(user_id, &update.part()),
        reason: e.to_string(),
    })
}

/// A bucket entry read back, and why its stored value was not used, if it
/// wasn't.
#[derive(Debug)]
pub struct Decoded {
    pub entry: Entry,
    /// What was skipped: a key outside the layout becomes [`Entry::Other`];
    /// a value of a user's key that can't be decoded, or is out of range,
    /// counts as that key's removal (nothing usable is stored there).
    pub skipped: Option<StoreError>,
}

/// Reads a key and its stored bytes back into an entry; `bytes` is `None`
/// for a removal marker. A user's key that `echoes` claims is left
/// undecoded ([`Entry::Echo`]). Never fails: what can't be used is
/// reported in [`Decoded::skipped`] for the caller to log and count.
pub fn decode_entry(
    key: &str,
    bytes: Option<&[u8]>,
    (revision, stored_at, pending): (u64, OffsetDateTime, u64),
    echoes: &dyn Fn(u64, &str) -> bool,
) -> Decoded {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.to_owned(),
        reason,
    };
    let other = Entry::Other {
        revision,
        stored_at,
        pending,
    };
    let parsed = parse_key(key)
        .map_err(|e| e.to_string())
        .and_then(|(user_id, part)| check_ids(&user_id, &part).map(|()| (user_id, part)));
    let (user_id, part) = match parsed {
        Ok(parsed) => parsed,
        Err(reason) => {
            return Decoded {
                entry: other,
                skipped: Some(corrupt(reason)),
            };
        }
    };
    if echoes(revision, &user_id) {
        return Decoded {
            entry: Entry::Echo {
                user_id,
                revision,
                stored_at,
                pending,
            },
            skipped: None,
        };
    }
    let (update, skipped) = match bytes {
        None => (Update::removal(part), None),
        Some(bytes) => match decode_value(&user_id, part.clone(), bytes) {
            Ok(update) => (update, None),
            Err(reason) => (Update::removal(part), Some(corrupt(reason))),
        },
    };
    Decoded {
        entry: Entry::Change(Change {
            user_id,
            update,
            revision,
            stored_at,
            pending,
        }),
        skipped,
    }
}

/// IDs in a key that the API could have written.
fn check_ids(user_id: &str, part: &Part) -> Result<(), String> {
    validate_user_id(user_id).map_err(|e| e.to_string())?;
    if let Part::Session(id) = part {
        validate_session_id(id).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn decode_value(user_id: &str, part: Part, bytes: &[u8]) -> Result<Update, String> {
    Ok(match part {
        Part::Manual => Update::Manual(Some(Presence::from_stored_json(user_id, bytes)?)),
        Part::Seen => {
            let seen: Seen = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            seen.check()?;
            Update::Seen(Some(seen))
        }
        Part::Session(id) => {
            let session: Session = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            session.check()?;
            Update::Session(id, Some(Arc::new(session)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(key: &str, bytes: Option<&[u8]>) -> Decoded {
        decode_entry(key, bytes, (7, OffsetDateTime::UNIX_EPOCH, 0), &|_, _| {
            false
        })
    }

    #[test]
    fn unusable_values_are_reported_and_never_trusted() {
        let good = br#"{"lastSeen":"2026-01-01T00:00:00Z","nodeID":"n"}"#;
        let decoded = decode("ann.seen", Some(good));
        assert!(decoded.skipped.is_none());
        assert!(matches!(
            decoded.entry,
            Entry::Change(Change {
                update: Update::Seen(Some(_)),
                ..
            })
        ));
        // A user's key holding something unusable counts as removed.
        for (key, bytes) in [
            ("ann.seen", &b"not json"[..]),
            ("ann", br#"{"userID":"bob","status":"busy","lastSeen":"2026-01-01T00:00:00Z","updatedAt":"2026-01-01T00:00:00Z"}"#),
            ("ann.s.x", br#"{"status":"online","lastSeen":"2026-01-01T00:00:00Z","ttlSeconds":9223372036854775807}"#),
        ] {
            let decoded = decode(key, Some(bytes));
            assert!(decoded.skipped.is_some(), "{key}");
            let Entry::Change(change) = decoded.entry else {
                panic!("{key} is a user's key");
            };
            assert_eq!(change.update, Update::removal(change.update.part()), "{key}");
            assert_eq!(change.revision, 7);
        }
        // A key outside the layout only moves the watch on.
        let decoded = decode("a.b.c.d", Some(b"{}"));
        assert!(decoded.skipped.is_some());
        assert!(matches!(decoded.entry, Entry::Other { revision: 7, .. }));
        assert!(
            decode("ann.s.x", None).skipped.is_none(),
            "a removal marker is fine"
        );
    }

    /// A claimed entry of a user's key comes undecoded, even one that could
    /// not be decoded; the filter is asked about users' keys only, with the
    /// entry's revision and user.
    #[test]
    fn an_entry_the_filter_claims_comes_undecoded() {
        let asked = std::sync::Mutex::new(Vec::new());
        let claim = |revision: u64, user_id: &str| {
            asked
                .lock()
                .expect("asked")
                .push((revision, user_id.to_owned()));
            user_id == "ann"
        };
        let at = (9, OffsetDateTime::UNIX_EPOCH, 3);
        let decoded = decode_entry("ann.seen", Some(b"not json"), at, &claim);
        assert!(decoded.skipped.is_none());
        assert!(matches!(
            decoded.entry,
            Entry::Echo { ref user_id, revision: 9, pending: 3, .. } if user_id == "ann"
        ));
        assert_eq!(decoded.entry.user_id(), Some("ann"));
        let decoded = decode_entry("bob.s.x", None, at, &claim);
        assert!(matches!(decoded.entry, Entry::Change(_)));
        let decoded = decode_entry("a.b.c.d", Some(b"{}"), at, &claim);
        assert!(matches!(decoded.entry, Entry::Other { revision: 9, .. }));
        assert_eq!(
            *asked.lock().expect("asked"),
            [(9, "ann".to_owned()), (9, "bob".to_owned())]
        );
    }
}

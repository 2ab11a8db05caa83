//! The node's presence cache: moka in front of the KV bucket.
//!
//! Each slot remembers the KV revision it reflects and is only ever replaced
//! by a newer one, so the watch, the writer's own read-your-writes update and
//! a slow cache-miss read can race without a stale value winning. A miss
//! reserves the user's slot before it reads the store, so the watch's
//! changes during the read are kept, and completes only that slot: one
//! evicted, dropped or cleared meanwhile may have missed changes. A slot can
//! also record that a user has no presence (a negative entry), so repeated
//! lookups of unknown users don't all go to the hub.
//!
//! Reads are a plain lookup. Every change to a user's slot (a merge, a load)
//! holds one of a few striped locks, chosen by the user, across its lookup
//! and insert: that makes the read-modify-write atomic for the user without
//! moka's per-key compute machinery, which cost about a quarter of a write's
//! CPU (a waiter registered in a map of its own for every merge).
//!
//! Clients choose user IDs, so the cache and the stripes hash them with a
//! keyed hash ([`KeyHasher`]) whose keys are random per process: nobody
//! can pick IDs that collide. It is aHash rather than the standard
//! library's SipHash, which was a tenth of a warm-up's CPU (three hashes
//! per replayed change: the stripe, moka's lookup and its insert).

use crate::metrics::CacheCounters;
use crate::record::UserRecord;
use crate::store::Change;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Hashes user IDs for the cache and its stripes: keyed at random per
/// process (see the module docs).
pub type KeyHasher = ahash::RandomState;

/// How many locks the users' slot changes are spread over: far more than
/// the threads that change slots at once, so two users rarely share one.
const STRIPES: usize = 64;

/// What the cache knows about one user.
#[derive(Debug, Clone)]
struct Slot {
    record: Arc<UserRecord>,
    /// Every key of the user is in `record`. A slot is incomplete while a
    /// read from the store is filling it.
    complete: bool,
    /// Which slot of the user this is: a new one is numbered each time the
    /// user's slot is created, so a read from the store that reserved a
    /// slot since evicted, abandoned or cleared cannot complete the next
    /// one with what it read before that slot existed (and caught the
    /// watch's changes). In the padding after `complete`: no extra bytes.
    generation: u32,
}

/// What [`PresenceCache::apply`] did with a change.
#[derive(Debug)]
pub enum Applied {
    /// The user's complete record changed from `before` to `after`.
    Changed {
        before: Arc<UserRecord>,
        after: Arc<UserRecord>,
    },
    /// The record already held this or a newer revision of the key.
    Stale,
    /// The user is not (completely) cached, so what changed is not known here.
    Unknown,
}

/// Fixed per-entry overhead estimate (moka's node, the `Arc`, the key's
/// headers, timestamps) added to the variable-length bytes.
const ENTRY_OVERHEAD: usize = 160;

/// The JSON a read keeps beside a record (see `UserRecord::view_json`):
/// field names, times and IDs, plus the record's own strings again. Counted
/// up front, as moka weighs an entry only when it is inserted.
const RENDERED_OVERHEAD: usize = 200;

fn weight(key: &str, slot: &Slot) -> u32 {
    let record = slot.record.weight();
    let rendered = RENDERED_OVERHEAD + key.len() + record / 2;
    u32::try_from(ENTRY_OVERHEAD + key.len() + record + rendered).unwrap_or(u32::MAX)
}

/// How many of this node's own recent write revisions the cache remembers
/// for the watch (see [`OwnWrites`]).
const OWN_WRITES: usize = 4096;

/// Revisions of this node's own writes that the cache applied already, so
/// the watch's echo of each is answered without a cache lookup. A
/// direct-mapped table: revision `r` lives in slot `r % OWN_WRITES` until a
/// later one takes the slot, and then its echo just takes the lookup.
/// Bucket revisions are consecutive, so the last 4096 writes of the whole
/// bucket never collide.
struct OwnWrites(Box<[AtomicU64]>);

impl OwnWrites {
    fn new() -> Self {
        OwnWrites((0..OWN_WRITES).map(|_| AtomicU64::new(0)).collect())
    }

    fn slot(&self, revision: u64) -> &AtomicU64 {
        // The modulo is below OWN_WRITES, so it fits a usize and indexes.
        &self.0[(revision % OWN_WRITES as u64) as usize]
    }

    fn remember(&self, revision: u64) {
        self.slot(revision).store(revision, Ordering::Release);
    }

    /// Whether `revision` was remembered; forgets it either way.
    fn take(&self, revision: u64) -> bool {
        revision != 0
            && self
                .slot(revision)
                .compare_exchange(revision, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Whether `revision` is remembered, leaving it there.
    fn holds(&self, revision: u64) -> bool {
        revision != 0 && self.slot(revision).load(Ordering::Acquire) == revision
    }

    fn forget_all(&self) {
        for slot in &self.0 {
            slot.store(0, Ordering::Release);
        }
    }
}

/// Snapshot for `/api/v2/cache/metrics`.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub keys_added: u64,
    pub keys_evicted: u64,
    pub cost_added: u64,
    pub cost_evicted: u64,
    pub entries: u64,
    pub weighted_size: u64,
    pub max_cost: u64,
    pub hit_ratio: f64,
}

/// The cache and its counters.
#[derive(Clone)]
pub struct PresenceCache {
    /// Keyed by user ID as a `Box<str>`: moka keeps each key in an `Arc`
    /// of its own, and a boxed `str` makes that one 16 bytes smaller than
    /// a `String` would.
    inner: Cache<Box<str>, Slot, KeyHasher>,
    /// Held across each change of a slot (see the module docs).
    stripes: Arc<Stripes>,
    counters: CacheCounters,
    max_cost: u64,
    /// Holds every user of the bucket: set when a full replay finished,
    /// cleared before anything can be evicted (see `held`). While set, a
    /// user the cache doesn't know has no keys at all, so nobody needs to
    /// ask the store.
    replica: Arc<AtomicBool>,
    /// Entries evicted for size since start; a replay that saw any can't
    /// have left a replica.
    evictions: Arc<AtomicU64>,
    /// The cost of every slot inserted and not yet reported removed: added
    /// before each insert, taken off by the removal listener (whatever the
    /// cause). moka evicts only when its count would pass `max_cost`, so an
    /// insert that takes `held` past it ends the replica *before* the
    /// insert: moka removes an evicted entry before its listener runs, and
    /// a replica told of the eviction only by the listener would meanwhile
    /// answer the evicted user as one with no presence (or start a new,
    /// "complete" slot for it from a single change).
    ///
    /// For that, `held` must never fall below moka's count as moka will
    /// see it when it decides. moka reports a replaced value, or one
    /// removed by `invalidate`, before it queues the write that lowers its
    /// count: those removals are paid in advance (see [`PresenceCache::put`]
    /// and [`PresenceCache::abandon_load`]), so their reports only cancel
    /// the advance until the call that caused them has returned.
    held: Arc<AtomicU64>,
    /// This node's own writes that are in the cache already.
    own: Arc<OwnWrites>,
}

impl PresenceCache {
    /// `max_cost` bounds the estimated bytes held; `initial_capacity` pre-sizes
    /// the table for the expected number of users.
    pub fn new(max_cost: u64, initial_capacity: usize, counters: CacheCounters) -> Self {
        let evicted = counters.clone();
        let replica = Arc::new(AtomicBool::new(false));
        let evictions = Arc::new(AtomicU64::new(0));
        let held = Arc::new(AtomicU64::new(0));
        let (lost, evicted_count, released) = (replica.clone(), evictions.clone(), held.clone());
        let inner = Cache::<Box<str>, Slot>::builder()
            .max_capacity(max_cost)
            .initial_capacity(initial_capacity)
            .weigher(|key, slot| weight(key, slot))
            .eviction_listener(move |key: Arc<Box<str>>, slot: Slot, cause| {
                let cost = u64::from(weight(&key, &slot));
                if cause == RemovalCause::Size {
                    // Counted before `held` drops, so a replay's end that
                    // finds `held` back under the budget sees the eviction.
                    evicted_count.fetch_add(1, Ordering::SeqCst);
                    lost.store(false, Ordering::SeqCst);
                    evicted.keys_evicted.inc();
                    evicted.cost_evicted.inc_by(cost);
                }
                released.fetch_sub(cost, Ordering::SeqCst);
            })
            .build_with_hasher(KeyHasher::new());
        PresenceCache {
            inner,
            counters,
            max_cost,
            replica,
            evictions,
            held,
            own: Arc::new(OwnWrites::new()),
            stripes: Arc::new(Stripes::new()),
        }
    }

    /// What the cache alone can say about a user, counting the hit or miss:
    /// the record of a complete slot; an empty record when the cache is a
    /// replica and holds no slot for the user at all; `None` when only the
    /// store can tell. An incomplete slot says nothing, replica or not: its
    /// load is under way or failed, and the changes merged into it meanwhile
    /// may be all it holds. Taken for the user's absence, a load that failed
    /// before a replay made the cache a replica would hide the user until
    /// the slot was evicted.
    pub fn known(&self, user_id: &str) -> Option<Arc<UserRecord>> {
        let (record, hit) = match self.inner.get(user_id) {
            Some(slot) if slot.complete => (Some(slot.record), true),
            Some(_) => (None, false),
            None => (self.is_replica().then(Arc::default), false),
        };
        if hit {
            self.counters.hits.inc();
        } else {
            self.counters.misses.inc();
        }
        record
    }

    /// Whether the cache holds every user of the bucket (see `replica`).
    pub fn is_replica(&self) -> bool {
        self.replica.load(Ordering::SeqCst)
    }

    /// How many entries were evicted for size so far.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::SeqCst)
    }

    /// Whether what the cache holds (see `held`) fits its budget, so that
    /// moka has nothing to evict.
    fn within_budget(&self) -> bool {
        self.held.load(Ordering::SeqCst) <= self.max_cost
    }

    /// A full replay of the bucket, begun when [`PresenceCache::evictions`]
    /// was `evictions_before`, has been applied: the cache holds every user
    /// unless something was evicted meanwhile (pending evictions are
    /// settled first) or the cache is past its budget, with evictions to
    /// come. Returns whether the cache is now a replica.
    pub fn mark_replica(&self, evictions_before: u64) -> bool {
        self.inner.run_pending_tasks();
        self.replica.store(true, Ordering::SeqCst);
        // Checked after the store, so an insert or an eviction racing it is
        // not missed (both clear the flag too). The budget first: when an
        // eviction brought `held` back under it, its count is up already.
        let complete = self.within_budget() && self.evictions() == evictions_before;
        if !complete {
            self.replica.store(false, Ordering::SeqCst);
        }
        complete
    }

    /// Stores `slot` for the user whose stripe the caller holds, in place
    /// of `old` (what the caller found there), counting a new key or the
    /// cost added.
    fn put(&self, user_id: &str, slot: Slot, old: Option<&Slot>) {
        let cost = u64::from(weight(user_id, &slot));
        let old_cost = old.map_or(0, |old| u64::from(weight(user_id, old)));
        // The old slot's removal is paid in advance (see `held`); the
        // check leaves the advance out but still counts the old slot, as
        // moka may not have seen it replaced when it next decides.
        let held = self.held.fetch_add(cost + old_cost, Ordering::SeqCst) + cost;
        if held > self.max_cost {
            // moka may evict once this is in: no replica from here on.
            self.replica.store(false, Ordering::SeqCst);
        }
        self.inner.insert(user_id.into(), slot);
        self.held.fetch_sub(old_cost, Ordering::SeqCst);
        if old.is_none() {
            self.counters.keys_added.inc();
        }
        self.counters.cost_added.inc_by(cost);
    }

    /// Applies one change to the user's record if it is newer than what the
    /// record holds. A user not cached yet gets a slot only when the cache
    /// is a replica (or `replaying`); otherwise the change would be all the
    /// slot knows, and the next read loads the user from the store instead.
    pub fn apply(&self, change: &Change, replaying: bool) -> Applied {
        // The watch's echo of a write this node applied already: its own
        // writes are remembered by revision; anything else the merge's
        // lookup answers before the record is copied.
        if self.own.take(change.revision) {
            return Applied::Stale;
        }
        self.merge(change, replaying, !replaying)
    }

    /// Whether `revision` is one of this node's own writes that the cache
    /// applied already, so its echo can be passed over without even being
    /// decoded; forgets it either way ([`PresenceCache::apply`] of it is
    /// then an ordinary merge).
    pub fn claim_echo(&self, revision: u64) -> bool {
        self.own.take(revision)
    }

    /// Whether `revision` is one of this node's own writes that the cache
    /// applied already, without forgetting it: one atomic load, so the
    /// watch asks it of every change before anything dearer.
    pub fn is_own_write(&self, revision: u64) -> bool {
        self.own.holds(revision)
    }

    /// Applies this node's own acknowledged write, and remembers its
    /// revision so the watch's echo of it costs no lookup.
    ///
    /// `before_echo` sees the outcome while the user is still locked and
    /// before the revision is remembered, so whatever it records (the
    /// event log's local change) is in place before the watch can find the
    /// echo stale: the echo either waits for the lock or finds the table.
    pub fn apply_own(&self, change: &Change, before_echo: impl FnOnce(&Applied)) -> Applied {
        let _user = self.stripes.lock(&change.user_id);
        let applied = self.merge_locked(change, false, true);
        before_echo(&applied);
        if !matches!(applied, Applied::Unknown) {
            self.own.remember(change.revision);
        }
        applied
    }

    /// Merges `change` into the user's slot (see [`PresenceCache::apply`]).
    /// With `skip_older`, a change no newer than the record's revision of
    /// its key is stale without copying the record to merge it. Without,
    /// the merge decides, so an older session value can still raise the
    /// latest `lastSeen` a record keeps (a replay, which may meet keys this
    /// node wrote meanwhile, merges every value it brings).
    fn merge(&self, change: &Change, replaying: bool, skip_older: bool) -> Applied {
        let _user = self.stripes.lock(&change.user_id);
        self.merge_locked(change, replaying, skip_older)
    }

    /// [`PresenceCache::merge`] with the user's stripe held by the caller.
    fn merge_locked(&self, change: &Change, replaying: bool, skip_older: bool) -> Applied {
        let user_id = change.user_id.as_str();
        let current = self.inner.get(user_id);
        let (base, complete, generation) = match &current {
            Some(slot) => (Some(&slot.record), slot.complete, slot.generation),
            None if replaying || self.is_replica() => (None, true, self.stripes.new_generation()),
            None => return Applied::Unknown,
        };
        // Stale for a slot that is not complete says nothing either: it may
        // be this node's own write, applied there without a note for the
        // event log, whose echo must then leave a gap.
        let stale = if complete {
            Applied::Stale
        } else {
            Applied::Unknown
        };
        if skip_older
            && base.is_some_and(|record| record.revision_for(&change.update) >= change.revision)
        {
            return stale;
        }
        let mut record = base.map(|r| (**r).clone()).unwrap_or_default();
        if !record.merge(change.update.clone(), change.revision) {
            return stale;
        }
        let after = Arc::new(record);
        let slot = Slot {
            record: after.clone(),
            complete,
            generation,
        };
        self.put(user_id, slot, current.as_ref());
        match (complete, current) {
            (true, before) => Applied::Changed {
                before: before.map(|slot| slot.record).unwrap_or_default(),
                after,
            },
            (false, _) => Applied::Unknown,
        }
    }

    /// Reserves an incomplete slot before reading the user from the store,
    /// so that watch changes arriving during the read are kept; a read of
    /// a user whose slot exists already (another read filling it, or one
    /// left incomplete) joins that slot. The read's result goes in with
    /// [`Reservation::finish`]; a reservation dropped unfinished (the read
    /// failed, or its request was cancelled) abandons the slot.
    pub fn begin_load<'a>(&'a self, user_id: &'a str) -> Reservation<'a> {
        let _user = self.stripes.lock(user_id);
        let generation = match self.inner.get(user_id) {
            Some(slot) => slot.generation,
            None => self.put_empty(user_id, None),
        };
        Reservation {
            cache: self,
            user_id,
            generation,
            finished: false,
        }
    }

    /// An unfinished read's slot goes if it is still the one reserved and
    /// nothing was merged into it (else the next read completes it). Reads
    /// refused during an outage leave no empty slots behind to crowd out
    /// cached users. Another read that shared the slot then finishes
    /// without caching what it read.
    fn abandon_load(&self, user_id: &str, generation: u32) {
        let _user = self.stripes.lock(user_id);
        let untouched = self.inner.get(user_id).filter(|slot| {
            slot.generation == generation && !slot.complete && slot.record.revision() == 0
        });
        // In a cache that holds every user, a missing slot means "no such
        // user": a slot put there by [`PresenceCache::distrust`] stays.
        if let Some(slot) = untouched
            && !self.is_replica()
        {
            // Paid in advance: moka reports the removal before it queues
            // it (see `held`).
            let cost = u64::from(weight(user_id, &slot));
            self.held.fetch_add(cost, Ordering::SeqCst);
            self.inner.invalidate(user_id);
            self.held.fetch_sub(cost, Ordering::SeqCst);
        }
    }

    /// Merges what the store returned into the reserved slot and marks it
    /// complete. When that slot is gone (evicted, abandoned, cleared; a
    /// later one may be in its place), changes may have been missed since
    /// the read began: the result is answered without being cached.
    fn finish_load(&self, user_id: &str, generation: u32, changes: Vec<Change>) -> Arc<UserRecord> {
        let merged = |base: &UserRecord| {
            let mut record = base.clone();
            for change in &changes {
                record.merge(change.update.clone(), change.revision);
            }
            Arc::new(record)
        };
        let _user = self.stripes.lock(user_id);
        let current = self.inner.get(user_id);
        let Some(current) = current.filter(|slot| slot.generation == generation) else {
            return merged(&UserRecord::default());
        };
        let record = merged(&current.record);
        let slot = Slot {
            record: record.clone(),
            complete: true,
            generation,
        };
        self.put(user_id, slot, Some(&current));
        record
    }

    /// The watch passed over a change of `user_id` that it could not apply:
    /// the user's slot answers nothing until a read from the store fills
    /// it again, while the cache still answers for every other user.
    pub fn distrust(&self, user_id: &str) {
        let _user = self.stripes.lock(user_id);
        let current = self.inner.get(user_id);
        self.put_empty(user_id, current.as_ref());
    }

    /// Stores a new, empty and incomplete slot for the user whose stripe
    /// the caller holds, in place of `old`; returns its generation.
    fn put_empty(&self, user_id: &str, old: Option<&Slot>) -> u32 {
        let generation = self.stripes.new_generation();
        let slot = Slot {
            record: Arc::new(UserRecord::default()),
            complete: false,
            generation,
        };
        self.put(user_id, slot, old);
        generation
    }

    /// Forgets everything (the bucket was recreated: every revision we hold
    /// belongs to data that no longer exists).
    pub fn clear(&self) {
        self.replica.store(false, Ordering::SeqCst);
        self.own.forget_all();
        self.inner.invalidate_all();
    }

    /// Counter snapshot, for the JSON metrics endpoint.
    pub fn stats(&self) -> CacheStats {
        self.inner.run_pending_tasks();
        let c = &self.counters;
        let (hits, misses) = (c.hits.get(), c.misses.get());
        let lookups = hits + misses;
        CacheStats {
            hits,
            misses,
            keys_added: c.keys_added.get(),
            keys_evicted: c.keys_evicted.get(),
            cost_added: c.cost_added.get(),
            cost_evicted: c.cost_evicted.get(),
            entries: self.inner.entry_count(),
            weighted_size: self.inner.weighted_size(),
            max_cost: self.max_cost,
            hit_ratio: if lookups == 0 {
                0.0
            } else {
                hits as f64 / lookups as f64
            },
        }
    }
}

/// A user's slot held for a read from the store (see
/// [`PresenceCache::begin_load`]).
#[must_use = "a reservation dropped unfinished abandons its slot"]
pub struct Reservation<'a> {
    cache: &'a PresenceCache,
    user_id: &'a str,
    generation: u32,
    finished: bool,
}

impl Reservation<'_> {
    /// Completes the slot with what the store returned, keeping the
    /// changes the watch merged into it during the read.
    pub fn finish(mut self, changes: Vec<Change>) -> Arc<UserRecord> {
        self.finished = true;
        self.cache
            .finish_load(self.user_id, self.generation, changes)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.cache.abandon_load(self.user_id, self.generation);
        }
    }
}

/// The striped locks behind every change of a slot.
struct Stripes {
    locks: Box<[Mutex<()>]>,
    hasher: KeyHasher,
    /// Numbers the slots as they are created (see `Slot::generation`).
    generations: AtomicU32,
}

impl Stripes {
    fn new() -> Self {
        Stripes {
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hasher: KeyHasher::new(),
            generations: AtomicU32::new(0),
        }
    }

    /// The number of a slot about to be created. It wraps after 2^32
    /// slots; a read would have to stay in flight that long to be fooled.
    fn new_generation(&self) -> u32 {
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    /// The lock of `user_id`'s stripe, held. A poisoned lock guards no
    /// data (the slot is written last, in one insert), so it is taken as is.
    fn lock(&self, user_id: &str) -> MutexGuard<'_, ()> {
        // The modulo is below STRIPES, so it fits a usize and indexes.
        let stripe = (self.hasher.hash_one(user_id) % STRIPES as u64) as usize;
        self.locks[stripe]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_log::{EventLog, visible_change};
    use crate::metrics::Metrics;
    use crate::model::{Presence, Status, ValidUpdate};
    use crate::record::Update;
    use time::OffsetDateTime;

    fn change(user: &str, revision: u64, message: Option<&str>) -> Change {
        let presence = message.map(|message| {
            Presence::accepted(
                ValidUpdate {
                    user_id: user.into(),
                    status: Status::Online,
                    message: message.into(),
                    expires_at: None,
                },
                "n",
                OffsetDateTime::UNIX_EPOCH,
            )
        });
        Change {
            user_id: user.into(),
            update: Update::Manual(presence),
            revision,
            stored_at: OffsetDateTime::UNIX_EPOCH,
            pending: 0,
        }
    }

    fn cache(max_cost: u64) -> PresenceCache {
        PresenceCache::new(max_cost, 16, Metrics::new().unwrap().cache)
    }

    fn message(record: &UserRecord) -> Option<String> {
        record
            .view("u", OffsetDateTime::UNIX_EPOCH)
            .map(|v| v.message)
    }

    #[test]
    fn an_own_write_is_merged_once_and_its_echo_is_stale() {
        let c = cache(1 << 20);
        assert!(c.mark_replica(0));
        let write = change("u", 3, Some("mine"));
        assert!(matches!(
            c.apply_own(&write, |_| {}),
            Applied::Changed { .. }
        ));
        // The echo is answered by its revision alone, without the record:
        // a change at that revision is stale whatever key it names.
        let same_revision = session_change(3, Some(1));
        assert!(matches!(c.apply(&same_revision, false), Applied::Stale));
        // Remembered once: another copy goes through the record, which
        // holds the manual key at 3 but no session yet.
        assert!(matches!(c.apply(&write, false), Applied::Stale));
        assert!(matches!(
            c.apply(&same_revision, false),
            Applied::Changed { .. }
        ));
        assert_eq!(message(&c.known("u").unwrap()).as_deref(), Some("mine"));
    }

    /// The watch may find an own write's echo stale the moment the write is
    /// in the cache; what the writer notes for the event log must be there
    /// by then, or a resuming stream misses the change.
    #[test]
    fn an_own_write_is_noted_before_the_watch_can_find_its_echo_stale() {
        let c = Arc::new(cache(1 << 20));
        assert!(c.mark_replica(0));
        let log = Arc::new(EventLog::default());
        log.start_after(0);
        let write = change("u", 1, Some("mine"));
        let mut watch = None;
        c.apply_own(&write, |applied| {
            let Applied::Changed { before, after } = applied else {
                panic!("a new user's write changes the cache");
            };
            let (cache, watched, echo) = (c.clone(), log.clone(), write.clone());
            watch = Some(std::thread::spawn(move || {
                let applied = cache.apply(&echo, false);
                watched.watched(&echo, &applied);
            }));
            // Give the echo every chance to overtake the note.
            std::thread::sleep(std::time::Duration::from_millis(50));
            log.note_local(1, visible_change("u", before, after).unwrap());
        });
        watch.unwrap().join().unwrap();
        let logged = log.replay(0, 1, &["u"].into()).unwrap();
        assert_eq!(logged.len(), 1, "the change is in the log once");
    }

    #[test]
    fn a_recreated_bucket_forgets_the_own_writes_of_the_old_one() {
        let c = cache(1 << 20);
        assert!(c.mark_replica(0));
        c.apply_own(&change("u", 3, Some("old bucket")), |_| {});
        c.clear();
        assert!(c.mark_replica(0));
        // Revision 3 of the new bucket is someone else's write.
        assert!(matches!(
            c.apply(&change("v", 3, Some("new bucket")), false),
            Applied::Changed { .. }
        ));
        assert_eq!(
            message(&c.known("v").unwrap()).as_deref(),
            Some("new bucket")
        );
    }

    fn session_change(revision: u64, seen_secs: Option<i64>) -> Change {
        use crate::session::Session;
        let value = seen_secs.map(|secs| {
            Arc::new(Session {
                device: String::new(),
                status: Status::Online,
                last_seen: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(secs),
                ttl_seconds: 30,
                node_id: "n".into(),
            })
        });
        Change {
            user_id: "u".into(),
            update: Update::Session("tab".into(), value),
            revision,
            stored_at: OffsetDateTime::UNIX_EPOCH,
            pending: 0,
        }
    }

    #[test]
    fn a_replayed_older_session_value_still_raises_last_seen() {
        let c = cache(1 << 20);
        c.apply(&change("u", 1, Some("m")), true);
        // This node ended the session (revision 3) before the replay
        // brought the session's earlier value (revision 2).
        c.apply_own(&session_change(3, None), |_| {});
        c.apply(&session_change(2, Some(100)), true);
        let view = c.known("u").unwrap().view("u", OffsetDateTime::UNIX_EPOCH);
        let last_seen = view.and_then(|v| v.last_seen);
        assert_eq!(
            last_seen,
            Some(OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(100))
        );
    }

    #[test]
    fn concurrent_changes_of_one_user_all_land() {
        use crate::session::Session;
        let c = cache(1 << 20);
        assert!(c.mark_replica(0));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..8u64 {
                        let session = Session {
                            device: String::new(),
                            status: Status::Online,
                            last_seen: OffsetDateTime::UNIX_EPOCH,
                            ttl_seconds: 30,
                            node_id: "n".into(),
                        };
                        let update = Update::Session(format!("s{t}-{i}"), Some(Arc::new(session)));
                        let change = Change {
                            user_id: "u".into(),
                            update,
                            revision: 1 + t * 8 + i,
                            stored_at: OffsetDateTime::UNIX_EPOCH,
                            pending: 0,
                        };
                        c.apply(&change, false);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let record = c.known("u").unwrap();
        let sessions = record.live_sessions(OffsetDateTime::UNIX_EPOCH).count();
        assert_eq!(sessions, 32, "a concurrent merge was lost");
        assert_eq!(record.revision(), 32);
    }

    #[test]
    fn older_revisions_never_replace_newer_ones() {
        let c = cache(1 << 20);
        c.apply(&change("u", 5, Some("five")), true);
        c.apply(&change("u", 3, Some("three")), true);
        c.apply(&change("u", 4, None), true);
        let record = c.known("u").unwrap();
        assert_eq!(record.revision(), 5);
        assert_eq!(message(&record).as_deref(), Some("five"));
        c.apply(&change("u", 6, None), true);
        let record = c.known("u").unwrap();
        assert_eq!(record.revision(), 6);
        assert_eq!(message(&record), None);
    }

    #[test]
    fn unknown_users_are_created_only_while_the_cache_is_a_replica() {
        let c = cache(1 << 20);
        c.apply(&change("u", 1, Some("x")), false);
        assert!(c.known("u").is_none());
        assert!(c.mark_replica(0));
        c.apply(&change("u", 2, Some("y")), false);
        assert_eq!(message(&c.known("u").unwrap()).as_deref(), Some("y"));
        c.clear();
        assert!(!c.is_replica());
    }

    #[test]
    fn a_load_keeps_changes_that_arrived_while_it_ran() {
        let c = cache(1 << 20);
        let load = c.begin_load("u");
        assert!(c.known("u").is_none(), "an incomplete slot is a miss");
        // The watch delivers revision 7 while the store read (which saw
        // revision 6) is still under way.
        c.apply(&change("u", 7, Some("new")), false);
        let record = load.finish(vec![change("u", 6, Some("old"))]);
        assert_eq!(record.revision(), 7);
        assert_eq!(message(&c.known("u").unwrap()).as_deref(), Some("new"));
    }

    /// The flake of the dev multi-cluster test: a read made while a node
    /// started could not reach the store, and left its reserved slot; the
    /// replay then merged the user's change into that slot and made the
    /// cache a replica, which took the incomplete slot for the user's
    /// absence.
    #[test]
    fn a_replica_does_not_take_a_failed_load_for_the_users_absence() {
        let c = cache(1 << 20);
        let failed = c.begin_load("u");
        c.apply(&change("u", 2, Some("replayed")), true);
        assert!(c.mark_replica(0));
        drop(failed);
        // The slot keeps what the replay merged into it, but only the
        // store can complete it.
        assert!(c.known("u").is_none(), "only the store can tell");
        assert!(c.known("nobody").is_some_and(|r| r.revision() == 0));
        let record = c
            .begin_load("u")
            .finish(vec![change("u", 2, Some("replayed"))]);
        assert_eq!(message(&record).as_deref(), Some("replayed"));
        assert_eq!(message(&c.known("u").unwrap()).as_deref(), Some("replayed"));
    }

    /// Failed or cancelled (its request gone), a load drops its
    /// reservation.
    #[test]
    fn a_load_that_never_finished_leaves_no_empty_slot() {
        let c = cache(1 << 20);
        drop(c.begin_load("u"));
        assert_eq!(c.stats().entries, 0);
        // Once abandoned, the user is the watch's to create again.
        assert!(c.mark_replica(0));
        assert!(c.known("u").is_some_and(|r| r.revision() == 0));
        c.apply(&change("u", 1, Some("later")), false);
        assert_eq!(message(&c.known("u").unwrap()).as_deref(), Some("later"));
    }

    /// Two reads of a user share a slot; one fails and its untouched slot
    /// goes, a change lands that nobody caches, and a third read reserves
    /// a new slot. The second read, which read the store before the
    /// change, must not complete the new slot with what it read.
    #[test]
    fn a_read_cannot_complete_a_slot_reserved_after_its_own_went() {
        let c = cache(1 << 20);
        let failed = c.begin_load("u");
        let slow = c.begin_load("u");
        drop(failed);
        assert!(matches!(
            c.apply(&change("u", 7, Some("new")), false),
            Applied::Unknown
        ));
        let later = c.begin_load("u");
        let answered = slow.finish(vec![change("u", 6, Some("old"))]);
        assert_eq!(answered.revision(), 6);
        assert!(
            c.known("u").is_none(),
            "the old read completed the new slot"
        );
        later.finish(vec![change("u", 7, Some("new"))]);
        assert_eq!(message(&c.known("u").unwrap()).as_deref(), Some("new"));
    }

    /// A read of a bucket since recreated cannot bring its values into the
    /// cache of the new one.
    #[test]
    fn a_read_of_a_recreated_bucket_stays_out_of_the_new_cache() {
        let c = cache(1 << 20);
        let old = c.begin_load("u");
        c.clear();
        c.apply(&change("u", 1, Some("new bucket")), true);
        old.finish(vec![change("u", 9, Some("old bucket"))]);
        assert!(c.mark_replica(0));
        assert_eq!(
            message(&c.known("u").unwrap()).as_deref(),
            Some("new bucket")
        );
    }

    #[test]
    fn a_slot_keeps_its_generation_in_padding() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }

    /// A user whose change the watch passed over is read from the store
    /// again, even in a cache that holds every user, and even when that
    /// read fails at first.
    #[test]
    fn a_distrusted_user_is_read_again() {
        let c = cache(1 << 20);
        assert!(c.mark_replica(0));
        c.apply(&change("u", 5, Some("before")), false);
        c.distrust("u");
        assert!(c.known("u").is_none());
        drop(c.begin_load("u"));
        assert!(c.known("u").is_none(), "a failed read made it unknown");
        let record = c
            .begin_load("u")
            .finish(vec![change("u", 6, Some("after"))]);
        assert_eq!(message(&record).as_deref(), Some("after"));
        assert_eq!(message(&c.known("u").unwrap()).as_deref(), Some("after"));
    }

    /// A change the record already holds, in a slot that is not complete,
    /// is unknown rather than stale: it may be this node's own write,
    /// applied there without a note for the event log.
    #[test]
    fn an_echo_into_an_incomplete_slot_is_unknown() {
        let c = cache(1 << 20);
        let load = c.begin_load("u");
        assert!(matches!(
            c.apply_own(&change("u", 4, Some("mine")), |_| {}),
            Applied::Unknown
        ));
        assert!(matches!(
            c.apply(&change("u", 4, Some("mine")), false),
            Applied::Unknown
        ));
        load.finish(vec![]);
        assert!(matches!(
            c.apply(&change("u", 3, Some("older")), false),
            Applied::Stale
        ));
    }

    #[test]
    fn counts_hits_misses_and_additions() {
        let c = cache(1 << 20);
        assert!(c.known("a").is_none());
        c.apply(&change("a", 1, Some("")), true);
        c.apply(&change("a", 2, Some("")), true);
        assert!(c.known("a").is_some());
        let stats = c.stats();
        assert_eq!((stats.hits, stats.misses, stats.keys_added), (1, 1, 1));
        assert_eq!(stats.entries, 1);
        assert!((stats.hit_ratio - 0.5).abs() < f64::EPSILON);
        assert!(stats.cost_added >= 2 * ENTRY_OVERHEAD as u64);
    }

    #[test]
    fn stays_within_its_cost_budget_and_stops_being_a_replica() {
        let c = cache(64 * 1024);
        assert!(c.mark_replica(0));
        for i in 0..5_000u64 {
            let user = format!("user-{i}");
            c.apply(&change(&user, i + 1, Some("m")), false);
        }
        let stats = c.stats();
        assert!(stats.weighted_size <= 64 * 1024, "{stats:?}");
        assert!(stats.keys_evicted > 0, "{stats:?}");
        assert!(stats.cost_evicted > 0, "{stats:?}");
        assert!(!c.is_replica());
        // A replay that overflowed the cache does not make it a replica.
        assert!(!c.mark_replica(0));
        assert!(!c.is_replica());
    }

    /// moka removes an evicted entry before its listener runs; a replica
    /// that learnt of evictions only from the listener answered the evicted
    /// user as one with no presence in between.
    #[test]
    fn a_replica_ends_before_its_first_eviction() {
        let c = cache(2_000);
        assert!(c.mark_replica(0));
        let mut users = 0u64;
        while c.within_budget() {
            users += 1;
            assert!(c.is_replica(), "ended within its budget, at user {users}");
            c.apply(&change(&format!("user-{users}"), users, Some("m")), false);
        }
        assert!(users > 1, "the budget holds more than one user");
        // No replica already, whether or not moka's housekeeping has run
        // (it runs on its own only every 300 ms or 64 writes).
        assert!(!c.is_replica());
        c.inner.run_pending_tasks();
        assert!(c.evictions() > 0);
        for i in 1..=users {
            let user = format!("user-{i}");
            if c.inner.get(user.as_str()).is_none() {
                assert!(c.known(&user).is_none(), "{user} was evicted, not absent");
            }
        }
    }

    /// Every removal gives back what its insert counted, so a cache that
    /// was full and then cleared can be a replica again.
    #[test]
    fn what_the_cache_holds_is_given_back_by_every_removal() {
        let c = cache(1 << 20);
        for i in 1..=20u64 {
            let user = format!("user-{}", i % 7);
            c.apply(&change(&user, i, Some("m")), true);
        }
        drop(c.begin_load("absent"));
        let load = c.begin_load("read");
        load.finish(vec![change("read", 30, Some("r"))]);
        c.distrust("user-1");
        c.inner.run_pending_tasks();
        assert_eq!(c.held.load(Ordering::SeqCst), c.inner.weighted_size());
        c.clear();
        c.inner.run_pending_tasks();
        assert_eq!(c.held.load(Ordering::SeqCst), 0);
        assert!(c.mark_replica(0));
    }
}

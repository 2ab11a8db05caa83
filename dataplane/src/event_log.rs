//! The node's recent presence events, so a change stream that resumes with
//! `Last-Event-ID` gets every change it missed, in order.
//!
//! The watch records each visible change it applies; this node's own
//! writes are recorded when their echo arrives, so the log is in watch
//! (revision) order on every node.

use crate::cache::Applied;
use crate::record::{PresenceView, UserRecord};
use crate::store::Change;
use std::collections::HashMap;
use std::sync::Arc;

/// How many presence changes the node remembers for exact resumes.
pub const EVENT_LOG_CAPACITY: usize = 32 * 1024;
/// The log's default byte budget (`STREAM_EVENT_LOG_MAX_BYTES`).
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The node's recent presence events (every visible change of every user,
/// as the watch applied them), so a stream resuming after `Last-Event-ID`
/// gets each change it missed, not only each user's latest state.
///
/// Bounded twice: at most [`EVENT_LOG_CAPACITY`] events, and at most
/// `max_bytes` of their estimated size (one event may be ~24 KB: a full
/// message and 32 sessions). Events are shared (`Arc`), so a resume copies
/// references, not views.
pub struct EventLog {
    inner: std::sync::Mutex<LogInner>,
    max_bytes: usize,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::with_max_bytes(DEFAULT_MAX_BYTES)
    }
}

#[derive(Default)]
struct LogInner {
    events: std::collections::VecDeque<(u64, Arc<PresenceView>)>,
    /// Estimated bytes of `events`.
    bytes: usize,
    /// Visible changes this node wrote and applied itself, by revision,
    /// until the watch brings them in order (it then finds them stale).
    local: HashMap<u64, Arc<PresenceView>>,
    /// Estimated bytes of `local`.
    local_bytes: usize,
    /// Every visible change after this revision is in `events`; `None`
    /// while nothing is known (start, replay, recreated bucket).
    complete_after: Option<u64>,
    /// While nothing is known: the newest revision given up on meanwhile
    /// (notes dropped during a replay), which the log, once it starts,
    /// cannot be complete before.
    lost_through: u64,
}

impl LogInner {
    /// Forgets the oldest event; the log is then complete only after it.
    fn drop_oldest(&mut self) {
        if let Some((dropped, view)) = self.events.pop_front() {
            self.bytes = self.bytes.saturating_sub(view.weight());
            self.complete_after = self.complete_after.map(|after| after.max(dropped));
        }
    }
}

impl EventLog {
    /// A log keeping at most `max_bytes` of events.
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        EventLog {
            inner: std::sync::Mutex::default(),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (events held, their estimated bytes), for metrics.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.events.len(), inner.bytes)
    }

    /// From now on every change is recorded: the log is complete after
    /// `revision`. Own writes after it that wait for their echo keep their
    /// notes: made while a replay ran, their echo comes after it, and
    /// without the note the log would claim a change it lacks.
    pub fn start_after(&self, revision: u64) {
        let mut inner = self.lock();
        let mut local = std::mem::take(&mut inner.local);
        local.retain(|r, _| *r > revision);
        let local_bytes = local.values().map(|view| view.weight()).sum();
        *inner = LogInner {
            complete_after: Some(revision.max(inner.lost_through)),
            local,
            local_bytes,
            ..LogInner::default()
        };
    }

    /// A replay begins: nothing is known until it ends (see
    /// [`EventLog::start_after`]), but own writes waiting for their echo
    /// keep their notes.
    pub fn begin_replay(&self) {
        let mut inner = self.lock();
        inner.events.clear();
        inner.bytes = 0;
        inner.complete_after = None;
    }

    /// Forgets everything, own writes' notes included (the bucket was
    /// recreated: their revisions belong to data that no longer exists).
    pub fn reset(&self) {
        *self.lock() = LogInner::default();
    }

    /// A visible change of a user at `revision`.
    fn push(&self, revision: u64, view: Arc<PresenceView>) {
        let mut inner = self.lock();
        if inner.complete_after.is_none() {
            return;
        }
        inner.bytes += view.weight();
        inner.events.push_back((revision, view));
        while inner.events.len() > EVENT_LOG_CAPACITY || inner.bytes > self.max_bytes {
            inner.drop_oldest();
        }
    }

    /// A visible change this node wrote and already applied to its cache:
    /// the watch will find it stale, and records it then, in order.
    pub fn note_local(&self, revision: u64, view: PresenceView) {
        let weight = view.weight();
        let mut inner = self.lock();
        if inner.local.len() >= MAX_LOCAL || inner.local_bytes + weight > self.max_bytes / 4 {
            // Echoes that never came (a watch restart, a recreated
            // bucket): give up exactness up to the newest dropped note
            // rather than grow (writers apply out of revision order).
            let newest = inner.local.keys().copied().fold(revision, u64::max);
            inner.local.clear();
            inner.local_bytes = 0;
            drop(inner);
            self.gap(newest);
            return;
        }
        inner.local_bytes += weight;
        inner.local.insert(revision, Arc::new(view));
    }

    /// The watch found the change at `revision` already applied: if this
    /// node wrote it, it is recorded now, and its view returned. During a
    /// replay nothing is recorded, but the note still goes, so notes don't
    /// pile up.
    pub fn echo(&self, revision: u64) -> Option<Arc<PresenceView>> {
        let view = {
            let mut inner = self.lock();
            let view = inner.local.remove(&revision);
            if let Some(view) = &view {
                inner.local_bytes = inner.local_bytes.saturating_sub(view.weight());
            }
            view
        }?;
        self.push(revision, view.clone());
        Some(view)
    }

    /// Records what applying a watched `change` did, so subscribers can
    /// resume exactly: a visible change, the echo of this node's own
    /// write, or a change whose effect is unknown here. Returns the visible
    /// change's view, for the change feed to share.
    pub fn watched(&self, change: &Change, applied: &Applied) -> Option<Arc<PresenceView>> {
        match applied {
            Applied::Changed { before, after } => {
                let view = Arc::new(visible_change(&change.user_id, before, after)?);
                self.push(change.revision, view.clone());
                Some(view)
            }
            Applied::Stale => self.echo(change.revision),
            Applied::Unknown => {
                self.gap(change.revision);
                None
            }
        }
    }

    /// A change at `revision` whose effect is unknown here (its user is
    /// not cached): nothing up to it can be replayed exactly any more.
    pub fn gap(&self, revision: u64) {
        let mut inner = self.lock();
        match inner.complete_after {
            Some(after) => inner.complete_after = Some(after.max(revision)),
            None => inner.lost_through = inner.lost_through.max(revision),
        }
        while inner.events.front().is_some_and(|(r, _)| *r <= revision) {
            inner.drop_oldest();
        }
    }

    /// Every event of `users` after revision `after` up to `through`, in
    /// order; `None` when the log can't vouch for that whole range. The
    /// events are shared with the log, not copied.
    pub fn replay(
        &self,
        after: u64,
        through: u64,
        users: &std::collections::HashSet<&str>,
    ) -> Option<Vec<(u64, Arc<PresenceView>)>> {
        let inner = self.lock();
        if inner.complete_after.is_none_or(|complete| complete > after) || after > through {
            return None;
        }
        Some(
            inner
                .events
                .iter()
                .filter(|(r, v)| *r > after && *r <= through && users.contains(v.user_id.as_str()))
                .cloned()
                .collect(),
        )
    }
}

/// Most local writes waiting for their watch echo.
const MAX_LOCAL: usize = 4096;

/// The presence a subscriber sees after a record went from `before` to
/// `after`, if it differs in a way a client shows.
pub fn visible_change(
    user_id: &str,
    before: &UserRecord,
    after: &UserRecord,
) -> Option<PresenceView> {
    (!before.same_stored_state(after)).then(|| after.stored_view(user_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_log_replays_only_ranges_it_covers() {
        let log = EventLog::default();
        let users: std::collections::HashSet<&str> = ["a", "b"].into();
        let ids = |events: Option<Vec<(u64, Arc<PresenceView>)>>| {
            events.map(|e| e.iter().map(|(r, _)| *r).collect::<Vec<_>>())
        };
        log.push(1, Arc::new(PresenceView::unknown("a")));
        assert_eq!(ids(log.replay(0, 10, &users)), None, "not started");
        log.start_after(5);
        log.push(6, Arc::new(PresenceView::unknown("a")));
        log.push(7, Arc::new(PresenceView::unknown("c")));
        log.note_local(8, PresenceView::unknown("b"));
        log.echo(8);
        log.echo(8);
        log.push(9, Arc::new(PresenceView::unknown("b")));
        assert_eq!(ids(log.replay(5, 9, &users)), Some(vec![6, 8, 9]));
        assert_eq!(ids(log.replay(6, 9, &users)), Some(vec![8, 9]));
        assert_eq!(ids(log.replay(5, 8, &users)), Some(vec![6, 8]));
        assert_eq!(ids(log.replay(4, 9, &users)), None, "before the log");
        assert_eq!(ids(log.replay(10, 9, &users)), None, "ahead of the node");
        // A change this node could not see the effect of.
        log.gap(8);
        assert_eq!(ids(log.replay(6, 9, &users)), None);
        assert_eq!(ids(log.replay(8, 9, &users)), Some(vec![9]));
        log.reset();
        assert_eq!(ids(log.replay(8, 9, &users)), None);
    }

    /// An own write made while a replay runs: its echo comes after the
    /// replay ended, and must still find its note.
    #[test]
    fn an_own_write_noted_during_a_replay_is_recorded_at_its_echo() {
        let log = EventLog::default();
        let users: std::collections::HashSet<&str> = ["a"].into();
        log.start_after(0);
        log.note_local(3, PresenceView::unknown("a"));
        log.begin_replay();
        log.note_local(12, PresenceView::unknown("a"));
        log.note_local(8, PresenceView::unknown("a"));
        log.start_after(10);
        log.echo(8);
        log.echo(12);
        log.echo(3);
        let replayed = log.replay(10, 12, &users).expect("covered");
        assert_eq!(replayed.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [12]);
        assert_eq!(log.size().0, 1, "notes at or before the replay's end went");
        log.note_local(14, PresenceView::unknown("a"));
        log.reset();
        log.start_after(13);
        log.echo(14);
        assert_eq!(log.size().0, 0, "a recreated bucket drops every note");
    }

    /// Notes dropped while a replay runs (they overflowed) still leave
    /// their gap once the log starts.
    #[test]
    fn notes_dropped_during_a_replay_leave_their_gap() {
        let log = EventLog::default();
        let users: std::collections::HashSet<&str> = ["a"].into();
        log.begin_replay();
        for revision in 11..=(MAX_LOCAL as u64 + 11) {
            log.note_local(revision, PresenceView::unknown("a"));
        }
        log.start_after(10);
        assert_eq!(log.replay(10, 5000, &users), None);
        let newest = MAX_LOCAL as u64 + 11;
        assert!(log.replay(newest, 5000, &users).is_some());
        // An echo during a replay takes its note with it.
        log.begin_replay();
        log.note_local(6000, PresenceView::unknown("a"));
        log.echo(6000);
        log.start_after(5000);
        log.echo(6000);
        assert_eq!(log.size().0, 0);
    }

    /// Writers apply their writes out of revision order: when the notes
    /// overflow, the log gives up exactness up to the newest one dropped.
    #[test]
    fn dropped_notes_leave_a_gap_up_to_the_newest() {
        let log = EventLog::default();
        let users: std::collections::HashSet<&str> = ["a"].into();
        log.start_after(0);
        for revision in 2..=(MAX_LOCAL as u64 + 1) {
            log.note_local(revision, PresenceView::unknown("a"));
        }
        log.note_local(1, PresenceView::unknown("a"));
        assert_eq!(log.replay(1, 5000, &users), None);
        assert!(log.replay(MAX_LOCAL as u64 + 1, 5000, &users).is_some());
    }

    fn big(user: &str) -> PresenceView {
        PresenceView {
            message: "m".repeat(256),
            ..PresenceView::unknown(user)
        }
    }

    #[test]
    fn the_log_is_bounded_in_bytes_and_shares_its_events() {
        let weight = big("a").weight();
        let log = EventLog::with_max_bytes(3 * weight);
        log.start_after(0);
        let users: std::collections::HashSet<&str> = ["a"].into();
        for revision in 1..=5 {
            log.push(revision, Arc::new(big("a")));
        }
        let (entries, bytes) = log.size();
        assert_eq!((entries, bytes), (3, 3 * weight));
        assert_eq!(log.replay(0, 5, &users), None, "the oldest events are gone");
        let replayed = log.replay(2, 5, &users).expect("covered");
        assert_eq!(
            replayed.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        // A resume holds the log's own events, not copies.
        assert_eq!(Arc::strong_count(&replayed[0].1), 2);
    }
}

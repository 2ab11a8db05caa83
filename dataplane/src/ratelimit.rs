//! Per-user write rate limits: a token bucket per written user ID, so one
//! flapping client (or one abusive token) can't flood the bucket with writes
//! for a user. Limits are per node; with N nodes behind a load balancer a
//! user can reach at most N times the configured rate.

use crate::cache::KeyHasher;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest wait a refusal names (a rate of 0.001/s, the slowest allowed,
/// needs 1000 s), and the refill time of a limit whose own can't be a
/// `Duration`.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The limit as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Sustained writes per second per user.
    pub rate: f64,
    /// Writes allowed at once after a quiet period.
    pub burst: f64,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(limit: Limit, now: Instant) -> Self {
        Bucket {
            tokens: limit.burst,
            updated: now,
        }
    }

    /// Takes one token at `now`; `Err(wait)` says when one will be available.
    pub fn take(&mut self, limit: Limit, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate).min(limit.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            // Settings keep the rate sane; the cap keeps a bad one from
            // panicking in the conversion.
            let wait = (1.0 - self.tokens) / limit.rate;
            Err(Duration::try_from_secs_f64(wait).map_or(MAX_WAIT, |w| w.min(MAX_WAIT)))
        }
    }

    /// Whether the bucket is full again at `now`, as if it were new.
    fn refilled(&self, limit: Limit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * limit.rate >= limit.burst
    }
}

/// Users whose buckets a node keeps at most, so no caller can grow the
/// table without bound by writing for new IDs: a stripe that fills its
/// share forgets its users (see [`Stripe::sweep`]), who then get a full
/// bucket each, never a tighter limit.
const MAX_TRACKED: usize = 1_000_000;
/// How many locks the buckets are spread over: far more than the threads
/// that check at once.
const STRIPES: usize = 64;
const PER_STRIPE: usize = MAX_TRACKED / STRIPES;
/// A stripe sweeps out refilled buckets once it holds this many, then
/// whenever it doubled since the last sweep (so a sweep costs no more
/// steps than the inserts before it), and at least once per refill time.
const FIRST_SWEEP: usize = 64;

/// Buckets of recently written users; a bucket that has refilled is
/// forgotten (a forgotten bucket is a full one, so forgetting never limits
/// anyone more).
///
/// Striped hash maps rather than a cache: every write checks its user
/// here, and moka's bookkeeping for that (an entry and an idle timer per
/// user, the per-key insert lock, SipHash over the ID) was about 6% of the
/// center's CPU under batches of new users, against under 1% now.
///
/// A bucket is found by the user ID's 64-bit hash, keyed at random per
/// process as the presence cache's is, and no copy of the ID is kept:
/// nobody can choose IDs that share a bucket, and two users share one by
/// chance with odds of about n²/2⁶⁵ (3·10⁻⁸ at a million users), which
/// would only make them share a rate.
#[derive(Clone)]
pub struct RateLimiter {
    policy: Option<Policy>,
    stripes: Arc<[Mutex<Stripe>]>,
    hasher: KeyHasher,
}

/// The limit, and how long an untouched bucket takes to refill.
#[derive(Debug, Clone, Copy)]
struct Policy {
    limit: Limit,
    refill: Duration,
}

/// One lock's share of the buckets, by user hash.
struct Stripe {
    buckets: HashMap<u64, Bucket, BuildHasherDefault<Prehashed>>,
    /// The size at which the next new user sweeps first.
    sweep_at: usize,
    swept: Instant,
}

impl Stripe {
    fn new(now: Instant) -> Self {
        Stripe {
            buckets: HashMap::default(),
            sweep_at: FIRST_SWEEP,
            swept: now,
        }
    }

    /// Takes a token of the bucket of the user hashed to `user`, made full
    /// if there is none.
    fn take(&mut self, user: u64, policy: Policy, now: Instant) -> Result<(), Duration> {
        let limit = policy.limit;
        if let Some(bucket) = self.buckets.get_mut(&user) {
            return bucket.take(limit, now);
        }
        if self.buckets.len() >= self.sweep_at
            || now.saturating_duration_since(self.swept) >= policy.refill
        {
            self.sweep(limit, now);
        }
        let mut bucket = Bucket::full(limit, now);
        let taken = bucket.take(limit, now);
        self.buckets.insert(user, bucket);
        taken
    }

    /// Forgets the buckets that have refilled, and every bucket if more
    /// than half the stripe's share is still draining (so the next sweep
    /// is at least as many inserts away as it has entries to scan); then
    /// sets the next sweep's size.
    fn sweep(&mut self, limit: Limit, now: Instant) {
        self.buckets
            .retain(|_, bucket| !bucket.refilled(limit, now));
        if self.buckets.len() > PER_STRIPE / 2 {
            self.buckets.clear();
        }
        let len = self.buckets.len();
        if self.buckets.capacity() > 4 * len.max(FIRST_SWEEP) {
            self.buckets.shrink_to_fit();
        }
        self.sweep_at = (2 * len).clamp(FIRST_SWEEP, PER_STRIPE);
        self.swept = now;
    }
}

/// Hashes the stripes' keys, which are keyed hashes already, as themselves.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is ever called (the keys are `u64`).
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

impl RateLimiter {
    /// `None` disables limiting.
    pub fn new(limit: Option<Limit>) -> Self {
        let now = Instant::now();
        RateLimiter {
            policy: limit.map(|limit| Policy {
                limit,
                refill: Duration::try_from_secs_f64(limit.burst / limit.rate).unwrap_or(MAX_WAIT),
            }),
            stripes: (0..STRIPES).map(|_| Mutex::new(Stripe::new(now))).collect(),
            hasher: KeyHasher::new(),
        }
    }

    /// Admits one write for `user_id`, or says how long to wait.
    pub fn check(&self, user_id: &str) -> Result<(), Duration> {
        self.check_at(user_id, Instant::now())
    }

    fn check_at(&self, user_id: &str, now: Instant) -> Result<(), Duration> {
        let Some(policy) = self.policy else {
            return Ok(());
        };
        let user = self.hasher.hash_one(user_id);
        // Bits the maps use neither to index (the low ones) nor to tag (the
        // top seven) pick the stripe.
        let index = ((user >> 32) % STRIPES as u64) as usize;
        let mut stripe = self.stripes[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stripe.take(user, policy, now)
    }

    /// Buckets held now, over all stripes.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.stripes
            .iter()
            .map(|stripe| stripe.lock().map_or(0, |s| s.buckets.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        rate: 2.0,
        burst: 3.0,
    };
    /// LIMIT refills in 1.5 s.
    const POLICY: Policy = Policy {
        limit: LIMIT,
        refill: Duration::from_millis(1500),
    };

    #[test]
    fn burst_then_sustained_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::full(LIMIT, t0);
        for _ in 0..3 {
            assert!(b.take(LIMIT, t0).is_ok());
        }
        let wait = b.take(LIMIT, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.take(LIMIT, t0 + Duration::from_millis(499)).is_err());
        assert!(b.take(LIMIT, t0 + Duration::from_millis(1000)).is_ok());
        // A long pause refills to the burst, never beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.take(LIMIT, later).is_ok());
        }
        assert!(b.take(LIMIT, later).is_err());
    }

    #[test]
    fn an_absurd_rate_waits_a_bounded_time_instead_of_panicking() {
        let tiny = Limit {
            rate: 1e-20,
            burst: 1.0,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(tiny, t0);
        assert!(b.take(tiny, t0).is_ok());
        assert_eq!(b.take(tiny, t0), Err(MAX_WAIT));
    }

    #[test]
    fn refilled_buckets_are_forgotten_and_drained_ones_kept() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(Some(LIMIT));
        let users = 10 * STRIPES * FIRST_SWEEP;
        for i in 0..users {
            assert!(limiter.check_at(&format!("u{i}"), t0).is_ok());
        }
        assert_eq!(limiter.tracked(), users);
        // ann drains her bucket just before `later`; everyone else refilled
        // long before it (LIMIT refills in 1.5 s).
        let drained = t0 + Duration::from_millis(1900);
        for _ in 0..3 {
            assert!(limiter.check_at("ann", drained).is_ok());
        }
        let later = t0 + Duration::from_secs(2);
        for i in 0..users {
            assert!(limiter.check_at(&format!("v{i}"), later).is_ok());
        }
        // Every stripe swept once its refill time had passed: the buckets
        // taken at `later` and ann's are left.
        assert_eq!(limiter.tracked(), users + 1);
        assert!(
            limiter.check_at("ann", later).is_err(),
            "a drained bucket survives the sweeps"
        );
    }

    #[test]
    fn a_full_stripe_forgets_its_users_instead_of_growing() {
        let t0 = Instant::now();
        let mut stripe = Stripe::new(t0);
        for user in 0..(PER_STRIPE + 10) as u64 {
            // Each user drained, so no sweep finds a refilled bucket.
            for _ in 0..3 {
                assert!(stripe.take(user, POLICY, t0).is_ok());
            }
            assert!(stripe.buckets.len() <= PER_STRIPE);
        }
        // A forgotten user starts over with a full bucket, never a tighter one.
        assert!(stripe.take(0, POLICY, t0).is_ok());
    }

    #[test]
    fn a_small_stripe_sweeps_once_per_refill_time() {
        let t0 = Instant::now();
        let mut stripe = Stripe::new(t0);
        for user in 0..10 {
            assert!(stripe.take(user, POLICY, t0).is_ok());
        }
        // Refilled by now, but the stripe is below its sweep size and the
        // refill time since its last sweep hasn't passed.
        assert!(stripe.take(10, POLICY, t0 + Duration::from_secs(1)).is_ok());
        assert_eq!(stripe.buckets.len(), 11);
        assert!(stripe.take(11, POLICY, t0 + POLICY.refill).is_ok());
        assert_eq!(stripe.buckets.len(), 1, "only the user just taken is left");
    }

    #[test]
    fn users_are_limited_independently_and_none_means_off() {
        let limiter = RateLimiter::new(Some(LIMIT));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check_at("ann", t0).is_ok());
        }
        assert!(limiter.check_at("ann", t0).is_err());
        assert!(limiter.check_at("bob", t0).is_ok());
        let off = RateLimiter::new(None);
        for _ in 0..100 {
            assert!(off.check("ann").is_ok());
        }
    }
}

//! Per-user write rate limits: a token bucket per written user ID, so one
//! flapping client (or one abusive token) can't flood the bucket with writes
//! for a user. Limits are per node; with N nodes behind a load balancer a
//! user can reach at most N times the configured rate.

use moka::sync::Cache;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest wait a refusal names (a rate of 0.001/s, the slowest allowed,
/// needs 1000 s).
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
}

/// Buckets of recently written users; idle ones are forgotten (a forgotten
/// bucket is a full one, so forgetting never limits anyone more).
#[derive(Clone)]
pub struct RateLimiter {
    limit: Option<Limit>,
    buckets: Cache<String, Arc<Mutex<Bucket>>>,
}

impl RateLimiter {
    /// `None` disables limiting.
    pub fn new(limit: Option<Limit>) -> Self {
        // A bucket idle for burst/rate seconds is full again: no need to keep it.
        let idle = limit.map_or(Duration::from_secs(1), |l| {
            Duration::from_secs_f64((l.burst / l.rate).clamp(1.0, 3600.0))
        });
        RateLimiter {
            limit,
            buckets: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(idle)
                .build(),
        }
    }

    /// Admits one write for `user_id`, or says how long to wait.
    pub fn check(&self, user_id: &str) -> Result<(), Duration> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let now = Instant::now();
        let bucket = self
            .buckets
            .get_with_by_ref(user_id, || Arc::new(Mutex::new(Bucket::full(limit, now))));
        let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
        bucket.take(limit, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        rate: 2.0,
        burst: 3.0,
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
    fn users_are_limited_independently_and_none_means_off() {
        let limiter = RateLimiter::new(Some(LIMIT));
        for _ in 0..3 {
            assert!(limiter.check("ann").is_ok());
        }
        assert!(limiter.check("ann").is_err());
        assert!(limiter.check("bob").is_ok());
        let off = RateLimiter::new(None);
        for _ in 0..100 {
            assert!(off.check("ann").is_ok());
        }
    }
}

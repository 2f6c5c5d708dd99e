//! Per-user and per-organisation rate limits: a token bucket per token `sub` and per token
//! `org`, checked after authentication and before any upstream work.
//!
//! # Why our own small bucket and not `governor`
//! The buckets run on tokio's clock, so refill and `Retry-After` are tested on a paused
//! clock like every other timing rule here, and memory is bounded by the same code that
//! fills it: buckets that have refilled to full say nothing a new bucket would not, so
//! [`KeyedLimiter::sweep`] drops them (run every [`SWEEP_EVERY`] checks and from a timer).

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

/// A rate: `per_second` tokens refill each second, up to `burst`. A zero rate is no limit;
/// configuration refuses positive rates below [`Rate::MIN_PER_SECOND`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    pub const OFF: Rate = Rate {
        per_second: 0.0,
        burst: 0,
    };

    /// The smallest rate configuration accepts (one request in about 17 minutes): below it a
    /// limit is a mistake, not a policy.
    pub const MIN_PER_SECOND: f64 = 0.001;

    pub fn is_off(&self) -> bool {
        self.per_second <= 0.0
    }
}

/// Checks made between two sweeps of full buckets.
pub const SWEEP_EVERY: u64 = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One token bucket per key (a `sub`, or an ODS code).
#[derive(Debug)]
pub struct KeyedLimiter {
    rate: Rate,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    buckets: HashMap<String, Bucket>,
    checks: u64,
}

impl KeyedLimiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Takes a token for `key`; `Err` is how long until one is free.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        let now = Instant::now();
        let burst = f64::from(self.rate.burst.max(1));
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.checks += 1;
        if inner.checks.is_multiple_of(SWEEP_EVERY) {
            Self::sweep_locked(&mut inner, self.rate, now);
        }
        let bucket = inner.buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.saturating_duration_since(bucket.at).as_secs_f64() * self.rate.per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            // A tiny rate makes the wait longer than a Duration holds: wait "for ever".
            Err(
                Duration::try_from_secs_f64((1.0 - bucket.tokens) / self.rate.per_second)
                    .unwrap_or(Duration::MAX),
            )
        }
    }

    /// Drops the buckets that have refilled to full: they hold no state a new one would not.
    pub fn sweep(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::sweep_locked(&mut inner, self.rate, Instant::now());
    }

    fn sweep_locked(inner: &mut Inner, rate: Rate, now: Instant) {
        let burst = f64::from(rate.burst.max(1));
        inner.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate.per_second < burst
        });
    }

    /// Keys with a bucket now (for tests and diagnostics).
    pub fn keys(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Sub,
    Org,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Sub => "sub",
            Scope::Org => "org",
        }
    }
}

/// The facade's two limits.
#[derive(Debug)]
pub struct RateLimits {
    pub sub: KeyedLimiter,
    pub org: KeyedLimiter,
}

impl RateLimits {
    pub fn new(sub: Rate, org: Rate) -> Self {
        Self {
            sub: KeyedLimiter::new(sub),
            org: KeyedLimiter::new(org),
        }
    }

    /// Checks the user's bucket, then the organisation's; `Err` names the scope and the wait.
    /// A request refused by the user's limit takes nothing from the organisation's.
    pub fn check(&self, sub: &str, org: &str) -> Result<(), (Scope, Duration)> {
        self.sub.check(sub).map_err(|d| (Scope::Sub, d))?;
        self.org.check(org).map_err(|d| (Scope::Org, d))
    }

    /// Drops full buckets every `every` until the returned task is aborted or the limits
    /// are dropped (the task holds them weakly, so it cannot outlive the server).
    pub fn sweeper(
        limits: &std::sync::Arc<RateLimits>,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let limits = std::sync::Arc::downgrade(limits);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(limits) = limits.upgrade() else {
                    break;
                };
                limits.sub.sweep();
                limits.org.sweep();
            }
        })
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    secs.max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let l = KeyedLimiter::new(Rate {
            per_second: 2.0,
            burst: 3,
        });
        for _ in 0..3 {
            assert!(l.check("alice").is_ok());
        }
        let wait = l.check("alice").unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        assert!(l.check("bob").is_ok(), "another key has its own bucket");
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(l.check("alice").is_err());
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(l.check("alice").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn full_buckets_are_swept_so_many_keys_do_not_grow_memory() {
        let l = KeyedLimiter::new(Rate {
            per_second: 10.0,
            burst: 2,
        });
        for i in 0..1000 {
            l.check(&format!("user-{i}")).unwrap();
        }
        assert_eq!(l.keys(), 1000);
        l.sweep();
        assert_eq!(
            l.keys(),
            1000,
            "not yet refilled: still state worth keeping"
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        l.sweep();
        assert_eq!(l.keys(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_user_limit_is_checked_before_the_organisation_limit() {
        let limits = RateLimits::new(
            Rate {
                per_second: 1.0,
                burst: 1,
            },
            Rate {
                per_second: 1.0,
                burst: 2,
            },
        );
        assert!(limits.check("a", "RXL").is_ok());
        assert_eq!(limits.check("a", "RXL").unwrap_err().0, Scope::Sub);
        assert!(
            limits.check("b", "RXL").is_ok(),
            "the refusal took no org token"
        );
        assert_eq!(limits.check("c", "RXL").unwrap_err().0, Scope::Org);
        assert!(limits.check("d", "RAE").is_ok());
        let off = RateLimits::new(Rate::OFF, Rate::OFF);
        for _ in 0..100 {
            assert!(off.check("a", "RXL").is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tiny_rate_refuses_with_a_wait_that_does_not_overflow() {
        // (1 - tokens) / 1e-20 seconds does not fit a Duration: it once panicked here.
        let l = KeyedLimiter::new(Rate {
            per_second: 1e-20,
            burst: 1,
        });
        assert!(l.check("alice").is_ok());
        let wait = l.check("alice").unwrap_err();
        assert_eq!(wait, Duration::MAX);
        assert_eq!(retry_after_secs(wait), u64::MAX);
        assert_eq!(retry_after_secs(Duration::new(u64::MAX, 1)), u64::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_ends_when_the_limits_are_dropped() {
        let limits = std::sync::Arc::new(RateLimits::new(Rate::OFF, Rate::OFF));
        let sweeper = RateLimits::sweeper(&limits, Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(61)).await;
        tokio::task::yield_now().await;
        assert!(!sweeper.is_finished(), "sweeps while the limits live");
        drop(limits);
        tokio::time::advance(Duration::from_secs(61)).await;
        tokio::time::timeout(Duration::from_secs(1), sweeper)
            .await
            .expect("the sweeper outlived its limits")
            .unwrap();
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}

//! Token buckets: the node-wide budget for credential-source calls, and one bucket per caller
//! (a pod, or a peer address in link mode) for requests and for the calls they may start.
//!
//! Time is `tokio::time::Instant`, so tests drive these with a paused clock.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::token::PodUid;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
    }
}

/// Who is asking for an upstream call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A pod is waiting for the answer.
    Request,
    /// A refresh ahead of expiry; nobody waits.
    Background,
}

/// Node-wide budget for EKS Auth calls. Request-path calls go first: a background refresh
/// waits while any request-path call waits, and leaves the last token for one.
pub struct UpstreamLimiter {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
    requests_waiting: AtomicUsize,
}

/// The budget did not allow a call before the deadline.
#[derive(Debug, PartialEq, Eq)]
pub struct BudgetExhausted;

impl UpstreamLimiter {
    pub fn new(qps: f64, burst: u32) -> UpstreamLimiter {
        let burst = f64::from(burst.max(1));
        UpstreamLimiter {
            rate: qps.max(0.001),
            burst,
            bucket: Mutex::new(Bucket::full(burst, Instant::now())),
            requests_waiting: AtomicUsize::new(0),
        }
    }

    /// Waits for a token until `deadline`. Returns how long it waited.
    pub async fn acquire(
        &self,
        priority: Priority,
        deadline: Instant,
    ) -> Result<Duration, BudgetExhausted> {
        let started = Instant::now();
        let _waiting =
            (priority == Priority::Request).then(|| WaitingGuard::new(&self.requests_waiting));
        loop {
            let wait = {
                let now = Instant::now();
                let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
                bucket.refill(self.rate, self.burst, now);
                let needed = match priority {
                    Priority::Request => 1.0,
                    Priority::Background if self.requests_waiting.load(Ordering::Acquire) > 0 => {
                        f64::INFINITY
                    }
                    // Keep one token for a request-path call that may come next.
                    Priority::Background => 2.0f64.min(self.burst),
                };
                if bucket.tokens >= needed {
                    bucket.tokens -= 1.0;
                    return Ok(started.elapsed());
                }
                if needed.is_finite() {
                    Duration::from_secs_f64((needed - bucket.tokens) / self.rate)
                } else {
                    Duration::from_millis(10)
                }
            };
            if Instant::now() + wait > deadline {
                return Err(BudgetExhausted);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

struct WaitingGuard<'a>(&'a AtomicUsize);

impl<'a> WaitingGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        WaitingGuard(counter)
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whom a share of a budget is counted against: the pod the kernel attributed a caller to, or
/// its peer address where nothing attributes callers (link mode), so that claims no one has
/// verified never pick whose share is spent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    Pod(PodUid),
    Peer(IpAddr),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Pod(uid) => write!(f, "pod {uid}"),
            Owner::Peer(ip) => write!(f, "peer {ip}"),
        }
    }
}

/// One bucket per owner, so one noisy caller cannot starve the others. Each bucket has its own
/// lock: a connection finds its owner's bucket once, and its requests touch nothing shared.
pub struct OwnerRateLimits {
    rate: f64,
    burst: f64,
    buckets: RwLock<HashMap<Owner, Arc<OwnerBucket>>>,
}

/// One owner's bucket.
pub struct OwnerBucket {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

impl OwnerBucket {
    /// Takes a token; false when the owner is over its limit.
    pub fn allow(&self) -> bool {
        let now = Instant::now();
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        bucket.refill(self.rate, self.burst, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled and has not been used for `idle`: forgetting it changes
    /// nothing its owner could notice.
    fn idle(&self, idle: Duration, now: Instant) -> bool {
        let bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let since = now.saturating_duration_since(bucket.last);
        let tokens = bucket.tokens + since.as_secs_f64() * self.rate;
        tokens >= self.burst && since >= idle
    }
}

impl OwnerRateLimits {
    pub fn new(rps: f64, burst: u32) -> OwnerRateLimits {
        OwnerRateLimits {
            rate: rps.max(0.001),
            burst: f64::from(burst.max(1)),
            buckets: RwLock::new(HashMap::new()),
        }
    }

    /// The owner's bucket, created full on first use.
    pub fn bucket(&self, owner: &Owner) -> Arc<OwnerBucket> {
        if let Some(b) = self
            .buckets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(owner)
        {
            return b.clone();
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(owner.clone())
            .or_insert_with(|| {
                Arc::new(OwnerBucket {
                    rate,
                    burst,
                    bucket: Mutex::new(Bucket::full(burst, Instant::now())),
                })
            })
            .clone()
    }

    /// Takes a token for `owner`; false when it is over its limit.
    pub fn allow(&self, owner: &Owner) -> bool {
        self.bucket(owner).allow()
    }

    /// Forgets pods that no longer exist. Nothing is gone on almost every maintenance pass,
    /// and then the request path's lock is not taken.
    pub fn forget(&self, gone: &HashSet<PodUid>) {
        if gone.is_empty() {
            return;
        }
        self.buckets
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|owner, _| !matches!(owner, Owner::Pod(uid) if gone.contains(uid)));
    }

    /// Forgets the buckets of peers idle for `idle` that no connection holds: peers come and go
    /// (any address on the network may connect), so their buckets must not pile up.
    pub fn forget_idle_peers(&self, idle: Duration) {
        let now = Instant::now();
        let stale = |owner: &Owner, bucket: &Arc<OwnerBucket>| {
            matches!(owner, Owner::Peer(_))
                && Arc::strong_count(bucket) == 1
                && bucket.idle(idle, now)
        };
        let any = self
            .buckets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(o, b)| stale(o, b));
        if any {
            self.buckets
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|o, b| !stale(o, b));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u8) -> PodUid {
        PodUid::parse(&format!("00000000-0000-0000-0000-0000000000{n:02x}")).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn pod_burst_then_rate() {
        let limits = OwnerRateLimits::new(10.0, 50);
        let a = Owner::Pod(uid(1));
        assert!((0..50).all(|_| limits.allow(&a)), "a burst of 50 is served");
        assert!(!limits.allow(&a));
        // Another pod is unaffected.
        assert!(limits.allow(&Owner::Pod(uid(2))));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(limits.allow(&a));
        assert!(!limits.allow(&a));
        limits.forget(&HashSet::from([uid(1)]));
        assert_eq!(limits.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_peers_are_forgotten_once_their_bucket_is_full() {
        let limits = OwnerRateLimits::new(10.0, 50);
        let peer = Owner::Peer([198, 18, 0, 9].into());
        assert!(limits.allow(&peer));
        let held = limits.bucket(&Owner::Peer([198, 18, 0, 10].into()));
        limits.forget_idle_peers(Duration::from_secs(60));
        assert_eq!(limits.len(), 2, "used a moment ago");
        tokio::time::advance(Duration::from_secs(61)).await;
        limits.forget_idle_peers(Duration::from_secs(60));
        assert_eq!(
            limits.len(),
            1,
            "the idle peer goes; the one a connection holds stays"
        );
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_budget_waits_and_gives_up_at_the_deadline() {
        let limiter = UpstreamLimiter::new(2.0, 2);
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            limiter.acquire(Priority::Request, far).await,
            Ok(Duration::ZERO)
        );
        assert_eq!(
            limiter.acquire(Priority::Request, far).await,
            Ok(Duration::ZERO)
        );
        // Empty: the next token comes after 1/rate.
        assert_eq!(
            limiter.acquire(Priority::Request, far).await,
            Ok(Duration::from_millis(500))
        );
        let soon = Instant::now() + Duration::from_millis(100);
        assert_eq!(
            limiter.acquire(Priority::Request, soon).await,
            Err(BudgetExhausted)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_go_before_background_refreshes() {
        let limiter = std::sync::Arc::new(UpstreamLimiter::new(1.0, 1));
        let far = Instant::now() + Duration::from_secs(60);
        limiter.acquire(Priority::Request, far).await.unwrap();
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let bg = {
            let (l, o) = (limiter.clone(), order.clone());
            tokio::spawn(async move {
                l.acquire(Priority::Background, far).await.unwrap();
                o.lock().unwrap().push("background");
            })
        };
        tokio::task::yield_now().await;
        let fg = {
            let (l, o) = (limiter.clone(), order.clone());
            tokio::spawn(async move {
                l.acquire(Priority::Request, far).await.unwrap();
                o.lock().unwrap().push("request");
            })
        };
        fg.await.unwrap();
        bg.await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec!["request", "background"]);
    }
}

//! The credential cache, sized for dense nodes.
//!
//! * Keyed by the SHA-256 of the token, indexed by pod UID; at most `max_entries`, least recently
//!   used evicted first.
//! * True coalescing: concurrent misses for one token share one upstream call, and every waiter
//!   gets its answer or error.
//! * Upstream calls run as their own tasks with their own deadline: a client that gives up does
//!   not cancel the call, and its result is cached for the next request. Transient failures are
//!   retried with exponential backoff and jitter inside the deadline.
//! * Refresh ahead: once half the credential lifetime has passed (earlier if needed so that
//!   handed-out credentials keep more than `fresh_for` left), with jitter, if the token was used
//!   since its last fetch began and its pod still exists.
//! * Outages: on a transient failure the cached credentials keep being served while more than
//!   `min_remaining` is left; terminal errors evict and are remembered for `negative_ttl`.
//! * A pod's new token supersedes its old entry; a pod that is gone loses its entries.
//!
//! All scheduling uses `tokio::time::Instant`, so the unit tests run on a paused clock.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{BuildHasher as _, Hasher as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use crate::{
    credentials::TokenDigest,
    metrics::Metrics,
    ratelimit::{PodRateLimits, Priority, UpstreamLimiter},
    token::PodUid,
    upstream::{AssumedRole, Upstream, UpstreamError},
};

#[derive(Clone, Debug)]
pub struct CacheSettings {
    pub max_entries: usize,
    /// Deadline of one upstream call, retries included.
    pub upstream_timeout: Duration,
    /// During an upstream outage, cached credentials are served while more than this is left.
    pub min_remaining: Duration,
    /// How long a terminal error is answered from memory.
    pub negative_ttl: Duration,
    /// Credentials are handed out as fresh only with more than this left (SDKs refresh 10-15
    /// minutes before expiry).
    pub fresh_for: Duration,
    /// How long a request waits for a refresh when it could be served stale credentials.
    pub stale_wait: Duration,
    /// Upstream calls one pod's requests may start: sustained per second, and at once. A pod
    /// needs about one per token; this stops a pod with a stream of distinct tokens from using
    /// up the node's EKS Auth budget. Coalesced waits and background refreshes are free.
    pub pod_upstream_qps: f64,
    pub pod_upstream_burst: u32,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_entries: 4096,
            upstream_timeout: Duration::from_secs(5),
            min_remaining: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            fresh_for: Duration::from_secs(15 * 60),
            stale_wait: Duration::from_millis(500),
            pod_upstream_qps: 0.2,
            pod_upstream_burst: 5,
        }
    }
}

/// How a request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Fresh cached credentials.
    Hit,
    /// This request started the upstream call.
    Fetched,
    /// Another request's upstream call answered this one too.
    Coalesced,
    /// The refresh failed or was slow; still-valid cached credentials were served.
    Stale,
}

/// Counters for /metrics; monotonic.
#[derive(Default, Debug)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub coalesced: AtomicU64,
    pub stale_served: AtomicU64,
    pub negative_hits: AtomicU64,
    pub refreshes: AtomicU64,
    pub upstream_calls: AtomicU64,
    pub evicted_lru: AtomicU64,
    pub evicted_superseded: AtomicU64,
    pub evicted_pod_gone: AtomicU64,
    pub evicted_expired: AtomicU64,
    pub evicted_terminal: AtomicU64,
}

type FetchResult = Result<Arc<AssumedRole>, UpstreamError>;

struct Cached {
    role: Arc<AssumedRole>,
    expires_at: Instant,
    refresh_at: Instant,
}

struct Entry {
    /// Kept in memory to refresh ahead; never logged.
    token: Arc<str>,
    pod: PodUid,
    /// `namespace/pod`, for logs.
    label: Arc<str>,
    lru_seq: u64,
    /// When the entry last moved in the LRU order.
    lru_moved: Instant,
    last_used: Instant,
    /// When the latest upstream call for this token began.
    fetch_started: Instant,
    value: Option<Cached>,
    negative: Option<(UpstreamError, Instant)>,
    inflight: Option<watch::Receiver<Option<FetchResult>>>,
    /// Background retry after a failed refresh.
    failures: u32,
    retry_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    entries: HashMap<TokenDigest, Entry>,
    /// The newest token of each pod.
    pods: HashMap<PodUid, TokenDigest>,
    lru: BTreeMap<u64, TokenDigest>,
    next_seq: u64,
}

/// How stale an entry's place in the LRU order may get before a use moves it: moving is a
/// remove and an insert in a tree, too much for every cached request, and eviction order at a
/// one-second grain is as good.
const LRU_GRAIN: Duration = Duration::from_secs(1);

impl State {
    fn touch(&mut self, digest: TokenDigest, now: Instant) {
        let Some(e) = self.entries.get_mut(&digest) else {
            return;
        };
        let moved_recently = now.saturating_duration_since(e.lru_moved) < LRU_GRAIN;
        e.last_used = now;
        if moved_recently {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.lru.remove(&e.lru_seq);
        e.lru_seq = seq;
        e.lru_moved = now;
        self.lru.insert(seq, digest);
    }

    fn remove(&mut self, digest: &TokenDigest) -> Option<Entry> {
        let e = self.entries.remove(digest)?;
        self.lru.remove(&e.lru_seq);
        if self.pods.get(&e.pod) == Some(digest) {
            self.pods.remove(&e.pod);
        }
        Some(e)
    }
}

pub struct CredentialCache<U> {
    inner: Arc<Inner<U>>,
}

struct Inner<U> {
    upstream: U,
    settings: CacheSettings,
    limiter: UpstreamLimiter,
    pod_upstream: PodRateLimits,
    state: Mutex<State>,
    stats: CacheStats,
    metrics: Arc<Metrics>,
}

impl<U: Upstream> CredentialCache<U> {
    pub fn new(
        upstream: U,
        settings: CacheSettings,
        limiter: UpstreamLimiter,
        metrics: Arc<Metrics>,
    ) -> CredentialCache<U> {
        CredentialCache {
            inner: Arc::new(Inner {
                upstream,
                pod_upstream: PodRateLimits::new(
                    settings.pod_upstream_qps,
                    settings.pod_upstream_burst,
                ),
                settings,
                limiter,
                state: Mutex::new(State::default()),
                stats: CacheStats::default(),
                metrics,
            }),
        }
    }

    pub fn stats(&self) -> &CacheStats {
        &self.inner.stats
    }

    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Credentials for `token` (whose SHA-256 is `digest`), which the caller has bound to `pod`
    /// (`label` is its `namespace/name`, for logs).
    pub async fn get(
        &self,
        token: &str,
        digest: TokenDigest,
        pod: &PodUid,
        label: &str,
    ) -> Result<(Arc<AssumedRole>, Outcome), UpstreamError> {
        let inner = &self.inner;
        let now = Instant::now();
        let (mut rx, outcome, has_stale) = {
            let mut st = inner.lock();
            if st.entries.contains_key(&digest) {
                st.touch(digest, now);
                let e = st.entries.get_mut(&digest).expect("present");
                if let Some((err, until)) = &e.negative {
                    if *until > now {
                        inner.stats.negative_hits.fetch_add(1, Ordering::Relaxed);
                        return Err(err.clone());
                    }
                    e.negative = None;
                }
                if let Some(c) = &e.value
                    && c.expires_at.saturating_duration_since(now) > inner.settings.fresh_for
                {
                    inner.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok((c.role.clone(), Outcome::Hit));
                }
                let has_stale = e.value.as_ref().is_some_and(|c| {
                    c.expires_at.saturating_duration_since(now) > inner.settings.min_remaining
                });
                match &e.inflight {
                    Some(rx) => {
                        inner.stats.coalesced.fetch_add(1, Ordering::Relaxed);
                        (rx.clone(), Outcome::Coalesced, has_stale)
                    }
                    None if !inner.pod_upstream.allow(pod) => {
                        drop(st);
                        return self
                            .serve_stale(&digest)
                            .ok_or_else(|| UpstreamError::pod_budget_exhausted(label));
                    }
                    None => {
                        inner.stats.misses.fetch_add(1, Ordering::Relaxed);
                        (
                            Inner::start_fetch(inner, &mut st, digest, Priority::Request, now),
                            Outcome::Fetched,
                            has_stale,
                        )
                    }
                }
            } else {
                if !inner.pod_upstream.allow(pod) {
                    return Err(UpstreamError::pod_budget_exhausted(label));
                }
                inner.stats.misses.fetch_add(1, Ordering::Relaxed);
                // A pod's new token supersedes its previous one: no renewals for the old token.
                if let Some(old) = st.pods.get(pod).copied()
                    && old != digest
                    && st.remove(&old).is_some()
                {
                    inner
                        .stats
                        .evicted_superseded
                        .fetch_add(1, Ordering::Relaxed);
                }
                while st.entries.len() >= inner.settings.max_entries.max(1) {
                    let Some((_, oldest)) = st.lru.pop_first() else {
                        break;
                    };
                    st.remove(&oldest);
                    inner.stats.evicted_lru.fetch_add(1, Ordering::Relaxed);
                }
                let seq = st.next_seq;
                st.next_seq += 1;
                st.lru.insert(seq, digest);
                st.pods.insert(pod.clone(), digest);
                st.entries.insert(
                    digest,
                    Entry {
                        token: Arc::from(token),
                        pod: pod.clone(),
                        label: Arc::from(label),
                        lru_seq: seq,
                        lru_moved: now,
                        last_used: now,
                        fetch_started: now,
                        value: None,
                        negative: None,
                        inflight: None,
                        failures: 0,
                        retry_at: None,
                    },
                );
                (
                    Inner::start_fetch(inner, &mut st, digest, Priority::Request, now),
                    Outcome::Fetched,
                    false,
                )
            }
        };

        // With still-valid credentials in hand, a slow refresh must not make the client wait
        // past its own timeout.
        let result = if has_stale {
            match tokio::time::timeout(inner.settings.stale_wait, wait(&mut rx)).await {
                Ok(result) => result,
                Err(_) => {
                    return self.serve_stale(&digest).ok_or_else(|| {
                        UpstreamError::timeout(
                            inner.upstream.name(),
                            inner.settings.upstream_timeout,
                        )
                    });
                }
            }
        } else {
            wait(&mut rx).await
        };
        match result {
            Ok(role) => Ok((role, outcome)),
            Err(e) if !e.is_terminal() => self.serve_stale(&digest).ok_or(e),
            Err(e) => Err(e),
        }
    }

    fn serve_stale(&self, digest: &TokenDigest) -> Option<(Arc<AssumedRole>, Outcome)> {
        let now = Instant::now();
        let st = self.inner.lock();
        let c = st.entries.get(digest)?.value.as_ref()?;
        (c.expires_at.saturating_duration_since(now) > self.inner.settings.min_remaining).then(
            || {
                self.inner
                    .stats
                    .stale_served
                    .fetch_add(1, Ordering::Relaxed);
                (c.role.clone(), Outcome::Stale)
            },
        )
    }

    /// Periodic upkeep: drop expired entries and entries of pods that are `gone`, then refresh
    /// what is due. Returns the number of refreshes started.
    pub fn maintain(&self, gone: &HashSet<PodUid>) -> usize {
        let inner = &self.inner;
        let now = Instant::now();
        let mut st = inner.lock();
        let mut drop_list = Vec::new();
        let mut due = Vec::new();
        for (digest, e) in &st.entries {
            if gone.contains(&e.pod) {
                drop_list.push((*digest, &inner.stats.evicted_pod_gone));
                continue;
            }
            let negative_live = e.negative.as_ref().is_some_and(|(_, until)| *until > now);
            let value_live = e.value.as_ref().is_some_and(|c| c.expires_at > now);
            if !negative_live && !value_live && e.inflight.is_none() {
                drop_list.push((*digest, &inner.stats.evicted_expired));
                continue;
            }
            let Some(c) = &e.value else { continue };
            if e.inflight.is_some() || !value_live {
                continue;
            }
            let next = e.retry_at.unwrap_or(c.refresh_at);
            // Refresh only tokens that were used since their last fetch began.
            if now >= next && e.last_used >= e.fetch_started {
                due.push(*digest);
            }
        }
        inner.pod_upstream.forget(gone);
        for (digest, counter) in drop_list {
            if st.remove(&digest).is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        for digest in &due {
            inner.stats.refreshes.fetch_add(1, Ordering::Relaxed);
            drop(Inner::start_fetch(
                inner,
                &mut st,
                *digest,
                Priority::Background,
                now,
            ));
        }
        due.len()
    }
}

async fn wait(rx: &mut watch::Receiver<Option<FetchResult>>) -> FetchResult {
    match rx.wait_for(Option::is_some).await {
        Ok(value) => value.clone().expect("waited for Some"),
        // The fetch task cannot drop its sender without sending, short of a runtime shutdown.
        Err(_) => Err(UpstreamError {
            status: 503,
            code: "AgentShuttingDown".into(),
            message: "the agent is shutting down".into(),
            request_id: None,
        }),
    }
}

impl<U: Upstream> Inner<U> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the upstream call for `digest` as its own task; the entry must exist. `now` is the
    /// caller's clock reading: a request that triggers the fetch passes the same instant it
    /// recorded as `last_used`, so its use counts as a use since this fetch began.
    fn start_fetch(
        self: &Arc<Self>,
        st: &mut State,
        digest: TokenDigest,
        priority: Priority,
        now: Instant,
    ) -> watch::Receiver<Option<FetchResult>> {
        let (tx, rx) = watch::channel(None);
        let e = st
            .entries
            .get_mut(&digest)
            .expect("start_fetch on a present entry");
        e.inflight = Some(rx.clone());
        e.fetch_started = now;
        let token = e.token.clone();
        let label = e.label.clone();
        let inner = self.clone();
        tokio::spawn(async move {
            let result = inner.call_with_retries(&token, priority, &label).await;
            inner.complete(digest, &label, &result);
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// One upstream exchange: the source's own check of the token, then attempts with backoff
    /// until success, a non-transient error, or the deadline. Logs one line per attempt (one
    /// HTTP request to EKS Auth or STS).
    async fn call_with_retries(&self, token: &str, priority: Priority, label: &str) -> FetchResult {
        let timeout = self.settings.upstream_timeout;
        let deadline = Instant::now() + timeout;
        // A token the source refuses locally spends none of the node's budget and is no
        // upstream call: a pod flooding forged tokens is held back by its own budget only.
        let checked = tokio::time::timeout_at(deadline, self.upstream.precheck(token))
            .await
            .unwrap_or_else(|_| Err(UpstreamError::timeout(self.upstream.name(), timeout)));
        if let Err(error) = checked {
            warn!(
                upstream = self.upstream.name(),
                pod = label,
                status = error.status,
                code = %error.code,
                message = %error.message,
                "token refused before any upstream call"
            );
            return Err(error);
        }
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            match self.limiter.acquire(priority, deadline).await {
                Ok(waited) => self.metrics.observe_budget_wait(waited),
                Err(_) => {
                    warn!(
                        pod = label,
                        ?priority,
                        upstream = self.upstream.name(),
                        "no upstream budget left before the deadline"
                    );
                    return Err(UpstreamError::budget_exhausted(self.upstream.name()));
                }
            }
            self.stats.upstream_calls.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let error =
                match tokio::time::timeout_at(deadline, self.upstream.assume_role(token)).await {
                    Err(_) => UpstreamError::timeout(self.upstream.name(), timeout),
                    Ok(Ok(role)) => {
                        self.metrics.observe_upstream(started.elapsed(), None);
                        info!(
                            upstream = self.upstream.name(),
                            pod = label,
                            ?priority,
                            attempt,
                            role_arn = %role.role_arn,
                            association_id = %role.association_id,
                            request_id = role.request_id.as_deref().unwrap_or("-"),
                            latency_ms = started.elapsed().as_millis() as u64,
                            "upstream call succeeded"
                        );
                        return Ok(Arc::new(role));
                    }
                    Ok(Err(e)) => e,
                };
            self.metrics
                .observe_upstream(started.elapsed(), Some(&error.code));
            warn!(
                upstream = self.upstream.name(),
                pod = label,
                ?priority,
                attempt,
                status = error.status,
                code = %error.code,
                message = %error.message,
                request_id = error.request_id.as_deref().unwrap_or("-"),
                latency_ms = started.elapsed().as_millis() as u64,
                "upstream call failed"
            );
            if error.status == 504 {
                return Err(error);
            }
            if !error.is_transient() {
                return Err(error);
            }
            let backoff = jittered(
                Duration::from_millis(50)
                    .saturating_mul(1 << attempt.min(6))
                    .min(Duration::from_secs(1)),
            );
            if Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tokio::time::sleep(backoff).await;
        }
    }

    fn complete(&self, digest: TokenDigest, label: &str, result: &FetchResult) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(e) = st.entries.get_mut(&digest) else {
            debug!(
                pod = label,
                "upstream answer for an entry that is gone (superseded, evicted or pod deleted)"
            );
            return;
        };
        e.inflight = None;
        match result {
            Ok(role) => {
                e.value = Some(cached(role.clone(), now, &self.settings));
                e.negative = None;
                e.failures = 0;
                e.retry_at = None;
            }
            Err(err) if err.is_terminal() => {
                e.value = None;
                e.negative = Some((err.clone(), now + self.settings.negative_ttl));
                self.stats.evicted_terminal.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // Keep what we have; retry in the background with backoff while it is valid.
                e.failures += 1;
                let backoff = Duration::from_secs(1)
                    .saturating_mul(1 << e.failures.min(6))
                    .min(Duration::from_secs(60));
                e.retry_at = Some(now + jittered(backoff));
            }
        }
    }
}

fn cached(role: Arc<AssumedRole>, now: Instant, settings: &CacheSettings) -> Cached {
    let lifetime = role
        .expiration
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let half = lifetime / 2;
    // Refresh at half-life, and early enough that what we hand out keeps `fresh_for` left.
    let latest_fresh = lifetime.saturating_sub(settings.fresh_for + Duration::from_secs(1));
    let base = half.min(latest_fresh);
    let refresh_in = base.saturating_sub(jittered(base / 10));
    Cached {
        role,
        expires_at: now + lifetime,
        refresh_at: now + refresh_in,
    }
}

/// A uniformly random duration in [max/2, max]: spreads refreshes and retries of many entries.
fn jittered(max: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    max.mul_f64(0.5 + unit / 2.0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::credentials::Credentials;

    const POD_A: &str = "00000000-0000-0000-0000-00000000000a";
    const POD_B: &str = "00000000-0000-0000-0000-00000000000b";

    fn pod(s: &str) -> PodUid {
        PodUid::parse(s).unwrap()
    }

    /// Answers from a script; counts calls; can be slow.
    #[derive(Clone, Default)]
    struct Scripted(Arc<ScriptState>);

    #[derive(Default)]
    struct ScriptState {
        calls: AtomicUsize,
        latency: Mutex<Duration>,
        errors: Mutex<Vec<UpstreamError>>,
        lifetime: Mutex<Option<Duration>>,
    }

    impl Scripted {
        fn calls(&self) -> usize {
            self.0.calls.load(Ordering::SeqCst)
        }
        fn fail_next(&self, errors: Vec<UpstreamError>) {
            *self.0.errors.lock().unwrap() = errors;
        }
        fn latency(&self, d: Duration) {
            *self.0.latency.lock().unwrap() = d;
        }
        fn lifetime(&self, d: Duration) {
            *self.0.lifetime.lock().unwrap() = Some(d);
        }
    }

    impl Upstream for Scripted {
        fn name(&self) -> &'static str {
            "the scripted upstream"
        }

        async fn assume_role(&self, token: &str) -> Result<AssumedRole, UpstreamError> {
            let n = self.0.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let latency = *self.0.latency.lock().unwrap();
            tokio::time::sleep(latency).await;
            let error = {
                let mut errors = self.0.errors.lock().unwrap();
                (!errors.is_empty()).then(|| errors.remove(0))
            };
            if let Some(e) = error {
                return Err(e);
            }
            let lifetime = self
                .0
                .lifetime
                .lock()
                .unwrap()
                .unwrap_or(Duration::from_secs(6 * 3600));
            Ok(AssumedRole::new(
                Credentials {
                    access_key_id: format!("ASIA-{token}-{n}"),
                    secret_access_key: "s".into(),
                    session_token: "t".into(),
                    account_id: "123456789012".into(),
                    expiration: SystemTime::now() + lifetime,
                },
                "arn:aws:iam::123456789012:role/r".into(),
                "a-1".into(),
                None,
            ))
        }
    }

    fn err(status: u16, code: &str) -> UpstreamError {
        UpstreamError {
            status,
            code: code.into(),
            message: "m".into(),
            request_id: None,
        }
    }

    fn cache(up: &Scripted, settings: CacheSettings) -> Arc<CredentialCache<Scripted>> {
        Arc::new(CredentialCache::new(
            up.clone(),
            settings,
            UpstreamLimiter::new(1000.0, 1000),
            Metrics::new(false, 4096),
        ))
    }

    fn uids(pods: &[&str]) -> HashSet<PodUid> {
        pods.iter().map(|p| pod(p)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_make_one_call() {
        let up = Scripted::default();
        up.latency(Duration::from_millis(300));
        let c = cache(&up, CacheSettings::default());
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
                        .await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            let (role, outcome) = t.await.unwrap().unwrap();
            assert_eq!(role.access_key_id(), "ASIA-tok-1");
            outcomes.push(outcome);
        }
        assert_eq!(up.calls(), 1);
        assert_eq!(
            outcomes.iter().filter(|o| **o == Outcome::Fetched).count(),
            1
        );
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == Outcome::Coalesced)
                .count(),
            199
        );
        assert_eq!(
            c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
                .await
                .unwrap()
                .1,
            Outcome::Hit
        );
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_share_an_error_too() {
        let up = Scripted::default();
        up.latency(Duration::from_millis(100));
        up.fail_next(vec![err(404, "ResourceNotFoundException")]);
        let c = cache(&up, CacheSettings::default());
        let a_pod = pod(POD_A);
        let (a, b) = tokio::join!(
            c.get("tok", TokenDigest::of("tok"), &a_pod, "ns/p"),
            c.get("tok", TokenDigest::of("tok"), &a_pod, "ns/p")
        );
        assert_eq!(a.unwrap_err().status, 404);
        assert_eq!(b.unwrap_err().status, 404);
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_gives_up_does_not_cancel_the_call() {
        let up = Scripted::default();
        up.latency(Duration::from_millis(1500));
        let c = cache(&up, CacheSettings::default());
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p"),
        )
        .await;
        assert!(gave_up.is_err());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
                .await
                .unwrap()
                .1,
            Outcome::Hit
        );
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_within_the_deadline() {
        let up = Scripted::default();
        up.fail_next(vec![
            err(503, "ServiceUnavailableException"),
            err(429, "ThrottlingException"),
        ]);
        let c = cache(&up, CacheSettings::default());
        let (role, _) = c
            .get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        assert_eq!(role.access_key_id(), "ASIA-tok-3");
        assert_eq!(up.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_a_hanging_upstream() {
        let up = Scripted::default();
        up.latency(Duration::from_secs(30));
        let settings = CacheSettings {
            upstream_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let c = cache(&up, settings);
        let started = Instant::now();
        let e = c
            .get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
            .await
            .unwrap_err();
        assert_eq!(e.status, 504);
        assert!(
            started.elapsed() >= Duration::from_secs(5)
                && started.elapsed() < Duration::from_secs(6)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn terminal_errors_are_remembered_for_the_negative_ttl() {
        let up = Scripted::default();
        up.fail_next(vec![err(404, "ResourceNotFoundException")]);
        let c = cache(&up, CacheSettings::default());
        assert_eq!(
            c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
                .await
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
                .await
                .unwrap_err()
                .code,
            "ResourceNotFoundException"
        );
        assert_eq!(up.calls(), 1, "negative hit");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
                .await
                .is_ok()
        );
        assert_eq!(up.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn outage_serves_cached_credentials_until_min_remaining() {
        let up = Scripted::default();
        up.lifetime(Duration::from_secs(20 * 60));
        let c = cache(&up, CacheSettings::default());
        let (first, _) = c
            .get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        // 6 minutes on, 14 left: no longer fresh, so a refresh is tried; it fails; cached served.
        tokio::time::advance(Duration::from_secs(6 * 60)).await;
        up.fail_next(vec![err(500, "InternalServerException"); 100]);
        let (served, outcome) = c
            .get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Stale);
        assert_eq!(served.access_key_id(), first.access_key_id());
        // Inside the last minute nothing stale is handed out.
        tokio::time::advance(Duration::from_secs(13 * 60 + 10)).await;
        let e = c
            .get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
            .await
            .unwrap_err();
        assert_eq!(e.status, 500);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_ahead_keeps_handed_out_credentials_fresh() {
        let up = Scripted::default();
        let c = cache(&up, CacheSettings::default());
        c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        assert_eq!(c.maintain(&HashSet::new()), 0, "not due yet");
        tokio::time::advance(Duration::from_secs(3 * 3600)).await;
        assert_eq!(c.maintain(&HashSet::new()), 1, "half-life passed");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(up.calls(), 2);
        let (role, outcome) = c
            .get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        assert_eq!(
            (role.access_key_id().as_str(), outcome),
            ("ASIA-tok-2", Outcome::Hit)
        );
        tokio::time::advance(Duration::from_secs(3 * 3600)).await;
        c.get("other", TokenDigest::of("other"), &pod(POD_B), "ns/p")
            .await
            .unwrap();
        assert_eq!(
            c.maintain(&HashSet::new()),
            1,
            "tok was used after its refresh began"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        tokio::time::advance(Duration::from_secs(3 * 3600)).await;
        assert_eq!(
            c.maintain(&HashSet::new()),
            1,
            "other (fetched for a request) is due; tok was not used since its refresh"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        tokio::time::advance(Duration::from_secs(3 * 3600)).await;
        assert_eq!(
            c.maintain(&HashSet::new()),
            0,
            "neither token was used since its last fetch began"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn short_lived_credentials_refresh_before_they_stop_being_fresh() {
        let up = Scripted::default();
        up.lifetime(Duration::from_secs(16 * 60));
        let c = cache(&up, CacheSettings::default());
        c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            c.maintain(&HashSet::new()),
            1,
            "half-life (8 min) would be too late"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gone_pods_lose_their_entries_and_get_no_refresh() {
        let up = Scripted::default();
        let c = cache(&up, CacheSettings::default());
        c.get("tok-a", TokenDigest::of("tok-a"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        c.get("tok-b", TokenDigest::of("tok-b"), &pod(POD_B), "ns/p")
            .await
            .unwrap();
        assert_eq!(c.maintain(&uids(&[POD_A])), 0);
        assert_eq!(c.len(), 1);
        tokio::time::advance(Duration::from_secs(4 * 3600)).await;
        c.get("tok-b", TokenDigest::of("tok-b"), &pod(POD_B), "ns/p")
            .await
            .unwrap();
        assert_eq!(
            c.maintain(&HashSet::new()),
            1,
            "only pod B's token refreshes"
        );
        assert_eq!(c.stats().evicted_pod_gone.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotated_token_supersedes_the_old_one() {
        let up = Scripted::default();
        let c = cache(&up, CacheSettings::default());
        c.get("old", TokenDigest::of("old"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        c.get("new", TokenDigest::of("new"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c.stats().evicted_superseded.load(Ordering::Relaxed), 1);
        tokio::time::advance(Duration::from_secs(4 * 3600)).await;
        c.get("new", TokenDigest::of("new"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        assert_eq!(
            c.maintain(&HashSet::new()),
            1,
            "only the new token is refreshed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn size_is_bounded_by_lru_eviction() {
        let up = Scripted::default();
        let settings = CacheSettings {
            max_entries: 3,
            ..Default::default()
        };
        let c = cache(&up, settings);
        let pods = [
            "00000000-0000-0000-0000-000000000001",
            "00000000-0000-0000-0000-000000000002",
            "00000000-0000-0000-0000-000000000003",
            "00000000-0000-0000-0000-000000000004",
        ];
        for (i, p) in pods.iter().enumerate().take(3) {
            let token = format!("t{i}");
            c.get(&token, TokenDigest::of(&token), &pod(p), "ns/p")
                .await
                .unwrap();
        }
        // Uses within LRU_GRAIN of an entry's last move do not reorder it.
        tokio::time::advance(LRU_GRAIN + Duration::from_millis(1)).await;
        c.get("t0", TokenDigest::of("t0"), &pod(pods[0]), "ns/p")
            .await
            .unwrap(); // t1 is now the least recently used
        c.get("t3", TokenDigest::of("t3"), &pod(pods[3]), "ns/p")
            .await
            .unwrap();
        assert_eq!(c.len(), 3);
        let calls = up.calls();
        assert_eq!(
            c.get("t0", TokenDigest::of("t0"), &pod(pods[0]), "ns/p")
                .await
                .unwrap()
                .1,
            Outcome::Hit
        );
        assert_eq!(
            c.get("t1", TokenDigest::of("t1"), &pod(pods[1]), "ns/p")
                .await
                .unwrap()
                .1,
            Outcome::Fetched
        );
        assert_eq!(up.calls(), calls + 1);
        for i in 0..1000 {
            let token = format!("flood-{i}");
            let _ = c
                .get(&token, TokenDigest::of(&token), &pod(pods[3]), "ns/p")
                .await;
        }
        assert!(c.len() <= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_with_endless_new_tokens_cannot_drain_the_upstream_budget() {
        let up = Scripted::default();
        let c = cache(
            &up,
            CacheSettings {
                pod_upstream_qps: 0.2,
                pod_upstream_burst: 5,
                ..Default::default()
            },
        );
        let mut refused = 0;
        for i in 0..100 {
            let token = format!("flood-{i}");
            match c
                .get(&token, TokenDigest::of(&token), &pod(POD_A), "ns/p")
                .await
            {
                Err(e) => {
                    assert_eq!(
                        (e.status, e.code.as_str()),
                        (429, "PodUpstreamBudgetExhausted")
                    );
                    refused += 1;
                }
                Ok(_) => {}
            }
        }
        assert_eq!((up.calls(), refused), (5, 95), "the burst, then nothing");
        // Another pod is unaffected; the flooding pod gets one more call after 5 s.
        assert!(
            c.get("other", TokenDigest::of("other"), &pod(POD_B), "ns/q")
                .await
                .is_ok()
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            c.get(
                "flood-again",
                TokenDigest::of("flood-again"),
                &pod(POD_A),
                "ns/p"
            )
            .await
            .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_are_dropped() {
        let up = Scripted::default();
        up.lifetime(Duration::from_secs(20 * 60));
        let c = cache(&up, CacheSettings::default());
        c.get("tok", TokenDigest::of("tok"), &pod(POD_A), "ns/p")
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(21 * 60)).await;
        c.maintain(&HashSet::new());
        assert_eq!(c.len(), 0);
    }
}

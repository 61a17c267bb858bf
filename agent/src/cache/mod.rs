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
//! * A pod's new token supersedes its old entry once the credential source has accepted it
//!   (never before: a token anyone can forge must not evict a pod's credentials); a pod that is
//!   gone loses its entries.
//! * A new token is checked by the source first (`Upstream::precheck`: signature, issuer,
//!   audience, expiry where the source knows the cluster's keys): a forged one creates no entry
//!   and spends no budget. Each caller (`ratelimit::Owner`: the pod, or the peer address in link
//!   mode) has its own budget of upstream calls for new tokens.
//! * During an outage, a pod presenting a new token (kubelet rotated it) is served the
//!   credentials it already holds, when the new token is its own for the same service account:
//!   verified by the source, or presented by the pod the kernel attributed the caller to.
//!
//! All scheduling uses `tokio::time::Instant`, so the unit tests run on a paused clock.

mod fetch;
pub mod metrics;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tracing::debug;

use self::metrics::{CacheMetrics, Eviction, Lookup};
use crate::{
    credentials::TokenDigest,
    ratelimit::{Owner, OwnerRateLimits, Priority, UpstreamLimiter},
    token::PodUid,
    upstream::{AssumedRole, Checked, Upstream, UpstreamError},
};

/// How long a peer's budget is kept once unused and full again (link mode: peers come and go).
const IDLE_PEER: Duration = Duration::from_secs(60);

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

type FetchResult = Result<Arc<AssumedRole>, UpstreamError>;

struct Cached {
    role: Arc<AssumedRole>,
    expires_at: Instant,
    refresh_at: Instant,
}

struct Entry {
    /// Kept in memory to refresh ahead; never logged. The same allocation as the pod's memo in
    /// the server holds.
    token: Arc<str>,
    pod: PodUid,
    /// `namespace/service-account` the token names: a rotated token of the same pod and account
    /// may be served this entry's credentials during an outage.
    account: Arc<str>,
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
    /// Each pod's newest token the credential source accepted.
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

    /// Adds `entry`, most recently used. It becomes its pod's token only once accepted.
    fn insert(&mut self, digest: TokenDigest, mut entry: Entry) {
        entry.lru_seq = self.next_seq;
        self.next_seq += 1;
        self.lru.insert(entry.lru_seq, digest);
        self.entries.insert(digest, entry);
    }

    /// `digest` was accepted: it becomes its pod's token, and the pod's previous one (rotated
    /// away) goes. Returns whether one went.
    fn accepted(&mut self, digest: TokenDigest) -> bool {
        let Some(pod) = self.entries.get(&digest).map(|e| e.pod) else {
            return false;
        };
        match self.pods.insert(pod, digest) {
            Some(old) if old != digest => self.remove(&old).is_some(),
            _ => false,
        }
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
    /// Each caller's budget of upstream calls for tokens new to the cache.
    owner_upstream: OwnerRateLimits,
    state: Mutex<State>,
    metrics: CacheMetrics,
}

/// One request for credentials, as the server bound it.
pub struct Request<'a> {
    /// The token as presented (trimmed): shared with the pod's memo, never copied.
    pub token: &'a Arc<str>,
    pub digest: TokenDigest,
    /// The pod the token names: kernel-checked in eBPF mode, the claims' word in link mode.
    pub pod: &'a PodUid,
    /// `namespace/service-account` the token names.
    pub account: &'a str,
    /// Whose budget a new token spends.
    pub owner: &'a Owner,
    /// Whether the kernel attributed the caller to `pod` (eBPF mode): then its own previous
    /// credentials may be served for a new token during an outage even unverified.
    pub attributed: bool,
    /// `namespace/pod`, for logs.
    pub label: &'a str,
}

/// What a lookup found under the lock: an answer, or an upstream call to wait for.
enum Claim {
    Answer(Result<(Arc<AssumedRole>, Outcome), UpstreamError>),
    Wait {
        rx: watch::Receiver<Option<FetchResult>>,
        outcome: Outcome,
        /// Whether still-valid credentials are at hand should the call be slow or fail.
        has_stale: bool,
    },
}

impl<U: Upstream> CredentialCache<U> {
    pub fn new(
        upstream: U,
        settings: CacheSettings,
        limiter: UpstreamLimiter,
        metrics: CacheMetrics,
    ) -> CredentialCache<U> {
        CredentialCache {
            inner: Arc::new(Inner {
                upstream,
                owner_upstream: OwnerRateLimits::new(
                    settings.pod_upstream_qps,
                    settings.pod_upstream_burst,
                ),
                settings,
                limiter,
                state: Mutex::new(State::default()),
                metrics,
            }),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Credentials for `req`'s token, which the caller has bound to `req.pod`.
    pub async fn get(
        &self,
        req: &Request<'_>,
    ) -> Result<(Arc<AssumedRole>, Outcome), UpstreamError> {
        let known = self.inner.lock().entries.contains_key(&req.digest);
        // A token new to the cache is checked first: a forged one costs no entry and no budget.
        let verified = if known {
            false
        } else {
            match self.inner.upstream.precheck(req.token).await {
                Ok(checked) => checked == Checked::Verified,
                Err(e) => {
                    debug!(
                        pod = req.label,
                        code = e.code(),
                        "token refused before any upstream call"
                    );
                    return Err(e);
                }
            }
        };
        let now = Instant::now();
        let claim = {
            let mut st = self.inner.lock();
            if st.entries.contains_key(&req.digest) {
                self.claim_existing(&mut st, req, now)
            } else {
                self.claim_new(&mut st, req, now)
            }
        };
        let (mut rx, outcome, has_stale) = match claim {
            Claim::Answer(answer) => return answer,
            Claim::Wait {
                rx,
                outcome,
                has_stale,
            } => (rx, outcome, has_stale),
        };
        // With still-valid credentials in hand, a slow refresh must not make the client wait
        // past its own timeout.
        let result = if has_stale {
            let settings = &self.inner.settings;
            match tokio::time::timeout(settings.stale_wait, wait(&mut rx)).await {
                Ok(result) => result,
                Err(_) => {
                    let name = self.inner.upstream.name();
                    let timeout = UpstreamError::timeout(name, settings.upstream_timeout);
                    return self.serve_stale(&req.digest).ok_or(timeout);
                }
            }
        } else {
            wait(&mut rx).await
        };
        match result {
            Ok(role) => Ok((role, outcome)),
            Err(e) if e.is_terminal() => Err(e),
            Err(e) => self
                .serve_stale(&req.digest)
                .or_else(|| {
                    (verified || req.attributed)
                        .then(|| self.previous(req))
                        .flatten()
                })
                .ok_or(e),
        }
    }

    /// A lookup of a token the cache holds: a fresh or negative answer, or the call to wait for.
    fn claim_existing(&self, st: &mut State, req: &Request<'_>, now: Instant) -> Claim {
        let inner = &self.inner;
        let digest = req.digest;
        st.touch(digest, now);
        let e = st.entries.get_mut(&digest).expect("present");
        if let Some((err, until)) = &e.negative {
            if *until > now {
                inner.metrics.lookup(Lookup::Negative);
                return Claim::Answer(Err(err.clone()));
            }
            e.negative = None;
        }
        if let Some(c) = &e.value
            && c.expires_at.saturating_duration_since(now) > inner.settings.fresh_for
        {
            inner.metrics.lookup(Lookup::Hit);
            return Claim::Answer(Ok((c.role.clone(), Outcome::Hit)));
        }
        let has_stale = e.value.as_ref().is_some_and(|c| {
            c.expires_at.saturating_duration_since(now) > inner.settings.min_remaining
        });
        if let Some(rx) = &e.inflight {
            inner.metrics.lookup(Lookup::Coalesced);
            return Claim::Wait {
                rx: rx.clone(),
                outcome: Outcome::Coalesced,
                has_stale,
            };
        }
        if !inner.owner_upstream.allow(req.owner) {
            let stale = self.stale(st, &digest, now);
            let exhausted = || UpstreamError::pod_budget_exhausted(&req.owner.to_string());
            return Claim::Answer(stale.ok_or_else(exhausted));
        }
        inner.metrics.lookup(Lookup::Miss);
        let rx = Inner::start_fetch(inner, st, digest, Priority::Request, now);
        Claim::Wait {
            rx,
            outcome: Outcome::Fetched,
            has_stale,
        }
    }

    /// A lookup of a token the cache does not hold: a new entry and its upstream call. The
    /// entry does not replace the pod's current one until the source accepts it.
    fn claim_new(&self, st: &mut State, req: &Request<'_>, now: Instant) -> Claim {
        let inner = &self.inner;
        if !inner.owner_upstream.allow(req.owner) {
            let exhausted = UpstreamError::pod_budget_exhausted(&req.owner.to_string());
            return Claim::Answer(Err(exhausted));
        }
        inner.metrics.lookup(Lookup::Miss);
        while st.entries.len() >= inner.settings.max_entries.max(1) {
            let Some((_, oldest)) = st.lru.pop_first() else {
                break;
            };
            st.remove(&oldest);
            inner.metrics.evicted(Eviction::Lru);
        }
        st.insert(req.digest, Entry::new(req, now));
        inner.metrics.set_entries(st.entries.len());
        let rx = Inner::start_fetch(inner, st, req.digest, Priority::Request, now);
        Claim::Wait {
            rx,
            outcome: Outcome::Fetched,
            has_stale: false,
        }
    }

    fn serve_stale(&self, digest: &TokenDigest) -> Option<(Arc<AssumedRole>, Outcome)> {
        let st = self.inner.lock();
        self.stale(&st, digest, Instant::now())
    }

    /// Cached credentials with more than `min_remaining` left, served while a refresh fails.
    fn stale(
        &self,
        st: &State,
        digest: &TokenDigest,
        now: Instant,
    ) -> Option<(Arc<AssumedRole>, Outcome)> {
        let c = st.entries.get(digest)?.value.as_ref()?;
        let left = c.expires_at.saturating_duration_since(now);
        (left > self.inner.settings.min_remaining).then(|| {
            self.inner.metrics.lookup(Lookup::Stale);
            (c.role.clone(), Outcome::Stale)
        })
    }

    /// The credentials the pod's accepted token holds, for a new token of the same pod and
    /// account that the source could not answer for (an outage while kubelet rotated it).
    fn previous(&self, req: &Request<'_>) -> Option<(Arc<AssumedRole>, Outcome)> {
        let st = self.inner.lock();
        let current = *st.pods.get(req.pod)?;
        let entry = st.entries.get(&current)?;
        if current == req.digest || *entry.account != *req.account {
            return None;
        }
        self.stale(&st, &current, Instant::now())
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
            match e.upkeep(gone, now) {
                Upkeep::Keep => {}
                Upkeep::Evict(reason) => drop_list.push((*digest, reason)),
                Upkeep::Refresh => due.push(*digest),
            }
        }
        inner.owner_upstream.forget(gone);
        inner.owner_upstream.forget_idle_peers(IDLE_PEER);
        for (digest, reason) in drop_list {
            if st.remove(&digest).is_some() {
                inner.metrics.evicted(reason);
            }
        }
        inner.metrics.set_entries(st.entries.len());
        for digest in &due {
            inner.metrics.refresh_started();
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

    #[cfg(test)]
    fn metrics(&self) -> &CacheMetrics {
        &self.inner.metrics
    }
}

/// What periodic upkeep does with an entry.
enum Upkeep {
    Keep,
    Evict(Eviction),
    Refresh,
}

impl Entry {
    fn new(req: &Request<'_>, now: Instant) -> Entry {
        Entry {
            token: req.token.clone(),
            pod: *req.pod,
            account: Arc::from(req.account),
            label: Arc::from(req.label),
            lru_seq: 0,
            lru_moved: now,
            last_used: now,
            fetch_started: now,
            value: None,
            negative: None,
            inflight: None,
            failures: 0,
            retry_at: None,
        }
    }

    fn upkeep(&self, gone: &HashSet<PodUid>, now: Instant) -> Upkeep {
        if gone.contains(&self.pod) {
            return Upkeep::Evict(Eviction::PodGone);
        }
        let negative_live = self
            .negative
            .as_ref()
            .is_some_and(|(_, until)| *until > now);
        let value_live = self.value.as_ref().is_some_and(|c| c.expires_at > now);
        if !negative_live && !value_live && self.inflight.is_none() {
            return Upkeep::Evict(Eviction::Expired);
        }
        let Some(c) = &self.value else {
            return Upkeep::Keep;
        };
        if self.inflight.is_some() || !value_live {
            return Upkeep::Keep;
        }
        let next = self.retry_at.unwrap_or(c.refresh_at);
        // Refresh only tokens that were used since their last fetch began.
        if now >= next && self.last_used >= self.fetch_started {
            Upkeep::Refresh
        } else {
            Upkeep::Keep
        }
    }
}

async fn wait(rx: &mut watch::Receiver<Option<FetchResult>>) -> FetchResult {
    match rx.wait_for(Option::is_some).await {
        Ok(value) => value.clone().expect("waited for Some"),
        // The fetch task cannot drop its sender without sending, short of a runtime shutdown.
        Err(_) => Err(UpstreamError::shutting_down()),
    }
}

impl<U> Inner<U> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

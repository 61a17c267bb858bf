//! The cache's calls to the credential source: each runs as its own task with its own deadline,
//! retried with backoff and jitter inside it, and its answer is stored for every waiter and the
//! next request.

use std::{
    hash::{BuildHasher as _, Hasher as _},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use super::{CacheSettings, Cached, FetchResult, Inner, State, metrics::Eviction};
use crate::{
    credentials::TokenDigest,
    ratelimit::Priority,
    upstream::{AssumedRole, Upstream, UpstreamError},
};

impl<U: Upstream> Inner<U> {
    /// Starts the upstream call for `digest` as its own task; the entry must exist. `now` is the
    /// caller's clock reading: a request that triggers the fetch passes the same instant it
    /// recorded as `last_used`, so its use counts as a use since this fetch began.
    pub(super) fn start_fetch(
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
        let deadline = Instant::now() + self.settings.upstream_timeout;
        // A request's new token was checked before its entry was made; a refresh checks again
        // (the token may have expired since).
        if priority == Priority::Background {
            self.precheck(token, label, deadline).await?;
        }
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            match self.limiter.acquire(priority, deadline).await {
                Ok(waited) => self.metrics.observe_budget_wait(waited),
                Err(_) => {
                    let upstream = self.upstream.name();
                    warn!(
                        pod = label,
                        ?priority,
                        upstream,
                        "no upstream budget left before the deadline"
                    );
                    return Err(UpstreamError::budget_exhausted(upstream));
                }
            }
            let error = match self
                .attempt(token, priority, label, attempt, deadline)
                .await
            {
                Ok(role) => return Ok(role),
                Err(error) => error,
            };
            if error.status() == 504 || !error.is_transient() {
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

    /// The source's own check of the token. A token the source refuses locally spends none of
    /// the node's budget and is no upstream call: a pod flooding forged tokens is held back by
    /// its own budget only.
    async fn precheck(
        &self,
        token: &str,
        label: &str,
        deadline: Instant,
    ) -> Result<(), UpstreamError> {
        let timeout = self.settings.upstream_timeout;
        let checked = tokio::time::timeout_at(deadline, self.upstream.precheck(token))
            .await
            .unwrap_or_else(|_| Err(UpstreamError::timeout(self.upstream.name(), timeout)));
        if let Err(error) = &checked {
            warn!(
                upstream = self.upstream.name(),
                pod = label,
                status = error.status(),
                code = %error.code(),
                message = %error.message(),
                detail = error.detail(),
                "token refused before any upstream call"
            );
        }
        checked.map(drop)
    }

    /// One call to the source, timed, counted and logged.
    async fn attempt(
        &self,
        token: &str,
        priority: Priority,
        label: &str,
        attempt: u32,
        deadline: Instant,
    ) -> FetchResult {
        self.metrics.upstream_call();
        let started = Instant::now();
        let upstream = self.upstream.name();
        let error = match tokio::time::timeout_at(deadline, self.upstream.assume_role(token)).await
        {
            Err(_) => UpstreamError::timeout(upstream, self.settings.upstream_timeout),
            Ok(Ok(role)) => {
                self.metrics.observe_upstream(started.elapsed(), None);
                info!(
                    upstream,
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
            .observe_upstream(started.elapsed(), Some(error.code()));
        warn!(
            upstream,
            pod = label,
            ?priority,
            attempt,
            status = error.status(),
            code = %error.code(),
            message = %error.message(),
            detail = error.detail(),
            request_id = error.request_id().unwrap_or("-"),
            latency_ms = started.elapsed().as_millis() as u64,
            "upstream call failed"
        );
        Err(error)
    }

    /// Stores a call's answer in its entry, if the entry is still there.
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
                // Accepted: the pod's previous token (rotated away) gets no more renewals.
                if st.accepted(digest) {
                    self.metrics.evicted(Eviction::Superseded);
                    self.metrics.set_entries(st.entries.len());
                }
            }
            Err(err) if err.is_terminal() => {
                e.value = None;
                e.negative = Some((err.clone(), now + self.settings.negative_ttl));
                self.metrics.evicted(Eviction::Terminal);
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

/// Credentials as cached: when they expire, and when to refresh them.
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

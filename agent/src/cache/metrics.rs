//! The cache's own series: lookups by result, evictions by reason, refreshes, its size, and the
//! calls it makes to the credential source (their count, duration, errors and budget waits).

use std::time::Duration;

use crate::metrics::{AtomicHistogram, Counter, EncodeLabelSet, Family, Gauge, Registry, Unit};

/// How a lookup was answered (the `result` label of `cache_lookups`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
    Coalesced,
    Stale,
    Negative,
}

impl Lookup {
    const ALL: [Lookup; 5] = [
        Lookup::Hit,
        Lookup::Miss,
        Lookup::Coalesced,
        Lookup::Stale,
        Lookup::Negative,
    ];

    fn as_label(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Coalesced => "coalesced",
            Lookup::Stale => "stale",
            Lookup::Negative => "negative",
        }
    }
}

/// Why an entry left the cache (the `reason` label of `cache_evictions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    Lru,
    Superseded,
    PodGone,
    Expired,
    Terminal,
}

impl Eviction {
    const ALL: [Eviction; 5] = [
        Eviction::Lru,
        Eviction::Superseded,
        Eviction::PodGone,
        Eviction::Expired,
        Eviction::Terminal,
    ];

    fn as_label(self) -> &'static str {
        match self {
            Eviction::Lru => "lru",
            Eviction::Superseded => "superseded",
            Eviction::PodGone => "pod_gone",
            Eviction::Expired => "expired",
            Eviction::Terminal => "terminal",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorCodeLabels {
    code: String,
}

/// Handles on the cache's series; every update is an atomic add or store.
#[derive(Clone)]
pub struct CacheMetrics {
    lookups: [Counter; Lookup::ALL.len()],
    evictions: [Counter; Eviction::ALL.len()],
    refreshes: Counter,
    entries: Gauge,
    upstream_calls: Counter,
    upstream_duration: AtomicHistogram,
    upstream_errors: Family<ErrorCodeLabels, Counter>,
    budget_waits: Counter,
    budget_wait_seconds: Counter<f64>,
}

impl CacheMetrics {
    /// Registers the cache's series; `capacity` is `--max-cache-entries`.
    pub fn register(registry: &mut Registry, capacity: usize) -> CacheMetrics {
        let entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Credentials held in the cache",
            entries.clone(),
        );
        let capacity_gauge = Gauge::<i64>::default();
        capacity_gauge.set(capacity as i64);
        registry.register(
            "cache_capacity",
            "Most credentials the cache holds (--max-cache-entries)",
            capacity_gauge,
        );
        let lookups = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Credential lookups by result: hit, miss (started an upstream call), coalesced (waited for another request's call), stale (served cached credentials while the refresh failed), negative (terminal error answered from memory)",
            lookups.clone(),
        );
        let evictions = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "cache_evictions",
            "Cache entries removed, by reason: lru, superseded (the pod's token rotated), pod_gone, expired, terminal (the credential source refused the token)",
            evictions.clone(),
        );
        let refreshes = Counter::default();
        registry.register(
            "cache_refreshes",
            "Background refreshes started ahead of expiry",
            refreshes.clone(),
        );
        let metrics = CacheMetrics {
            lookups: Lookup::ALL.map(|l| {
                lookups.get_or_create_owned(&ResultLabels {
                    result: l.as_label(),
                })
            }),
            evictions: Eviction::ALL.map(|e| {
                evictions.get_or_create_owned(&ReasonLabels {
                    reason: e.as_label(),
                })
            }),
            refreshes,
            entries,
            upstream_calls: Counter::default(),
            upstream_duration: AtomicHistogram::exponential(0.005, 2.0, 12),
            upstream_errors: Family::default(),
            budget_waits: Counter::default(),
            budget_wait_seconds: Counter::default(),
        };
        metrics.register_upstream(registry);
        metrics
    }

    fn register_upstream(&self, registry: &mut Registry) {
        registry.register(
            "upstream_calls",
            "Attempts at the credential source (EKS Auth, or STS), retries included",
            self.upstream_calls.clone(),
        );
        registry.register_with_unit(
            "upstream_call_duration",
            "Duration of each attempt at the credential source (an HTTP request to EKS Auth, or STS and the local token check in sts mode)",
            Unit::Seconds,
            self.upstream_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed credential-source attempts by error code (ThrottlingException, UpstreamUnreachable, UpstreamTimeout, InvalidTokenException, ...)",
            self.upstream_errors.clone(),
        );
        registry.register(
            "upstream_budget_waits",
            "Credential-source calls that waited for the node-wide budget (--upstream-qps/--upstream-burst)",
            self.budget_waits.clone(),
        );
        registry.register_with_unit(
            "upstream_budget_wait",
            "Total time credential-source calls waited for the node-wide budget",
            Unit::Seconds,
            self.budget_wait_seconds.clone(),
        );
    }

    pub fn lookup(&self, result: Lookup) {
        self.lookups[result as usize].inc();
    }

    pub fn evicted(&self, reason: Eviction) {
        self.evictions[reason as usize].inc();
    }

    pub fn refresh_started(&self) {
        self.refreshes.inc();
    }

    pub fn set_entries(&self, n: usize) {
        self.entries.set(n as i64);
    }

    /// One attempt at the credential source is starting.
    pub fn upstream_call(&self) {
        self.upstream_calls.inc();
    }

    /// One attempt took `elapsed`; `error` is its error code when it failed.
    pub fn observe_upstream(&self, elapsed: Duration, error: Option<&str>) {
        self.upstream_duration.observe(elapsed);
        if let Some(code) = error {
            self.upstream_errors
                .get_or_create(&ErrorCodeLabels {
                    code: code.to_owned(),
                })
                .inc();
        }
    }

    /// A call waited `waited` for the node-wide budget.
    pub fn observe_budget_wait(&self, waited: Duration) {
        if !waited.is_zero() {
            self.budget_waits.inc();
            self.budget_wait_seconds.inc_by(waited.as_secs_f64());
        }
    }

    #[cfg(test)]
    pub fn evictions(&self, reason: Eviction) -> u64 {
        self.evictions[reason as usize].get()
    }
}

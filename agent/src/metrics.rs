//! Prometheus metrics (OpenMetrics text). Label values are bounded: status codes and address
//! families, never pods or tokens.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{cache::CacheStats, kernel::RedirectCounts};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<CodeLabels, Counter>,
    request_duration: Histogram,
    kernel_redirects: Family<FamilyLabels, Counter>,
    cache_entries: Gauge,
    cache_lookups: Family<ResultLabels, Counter>,
    cache_evictions: Family<ReasonLabels, Counter>,
    cache_refreshes: Counter,
    upstream_calls: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("pod_identity_agent");
        let requests = Family::<CodeLabels, Counter>::default();
        registry.register("requests", "Credential endpoint responses by HTTP status code", requests.clone());
        let request_duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.5, 14));
        registry.register_with_unit(
            "request_duration",
            "Time from request to response on the credential endpoint",
            prometheus_client::registry::Unit::Seconds,
            request_duration.clone(),
        );
        let kernel_redirects = Family::<FamilyLabels, Counter>::default();
        registry.register(
            "kernel_redirected_connects",
            "Connects to the credential address redirected by the kernel programs, by address family",
            kernel_redirects.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register("cache_entries", "Credentials held in the cache", cache_entries.clone());
        let cache_lookups = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Credential lookups by result: hit, miss (started an upstream call), coalesced (waited for another request's call), stale (served cached credentials while the refresh failed), negative (terminal error answered from memory)",
            cache_lookups.clone(),
        );
        let cache_evictions = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "cache_evictions",
            "Cache entries removed, by reason: lru, superseded (the pod's token rotated), pod_gone, expired, terminal (EKS Auth refused the token)",
            cache_evictions.clone(),
        );
        let cache_refreshes = Counter::default();
        registry.register("cache_refreshes", "Background refreshes started ahead of expiry", cache_refreshes.clone());
        let upstream_calls = Counter::default();
        registry.register("upstream_calls", "HTTP requests made to EKS Auth (retries included)", upstream_calls.clone());
        Arc::new(Metrics {
            registry,
            requests,
            request_duration,
            kernel_redirects,
            cache_entries,
            cache_lookups,
            cache_evictions,
            cache_refreshes,
            upstream_calls,
        })
    }

    pub fn observe_request(&self, code: u16, elapsed: Duration) {
        self.requests.get_or_create(&CodeLabels { code }).inc();
        self.request_duration.observe(elapsed.as_secs_f64());
    }

    /// Renders the registry, after copying in the values that live elsewhere (kernel counters,
    /// cache size).
    pub fn render(&self, redirects: Option<RedirectCounts>, cache_entries: usize, cache: &CacheStats) -> String {
        if let Some(counts) = redirects {
            for (family, value) in [("ipv4", counts.v4), ("ipv6", counts.v6)] {
                self.kernel_redirects.get_or_create(&FamilyLabels { family }).inner().store(value, Ordering::Relaxed);
            }
        }
        self.cache_entries.set(cache_entries as i64);
        let copy = |counter: &Counter, from: &std::sync::atomic::AtomicU64| counter.inner().store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        for (result, from) in [
            ("hit", &cache.hits),
            ("miss", &cache.misses),
            ("coalesced", &cache.coalesced),
            ("stale", &cache.stale_served),
            ("negative", &cache.negative_hits),
        ] {
            copy(&self.cache_lookups.get_or_create(&ResultLabels { result }), from);
        }
        for (reason, from) in [
            ("lru", &cache.evicted_lru),
            ("superseded", &cache.evicted_superseded),
            ("pod_gone", &cache.evicted_pod_gone),
            ("expired", &cache.evicted_expired),
            ("terminal", &cache.evicted_terminal),
        ] {
            copy(&self.cache_evictions.get_or_create(&ReasonLabels { reason }), from);
        }
        copy(&self.cache_refreshes, &cache.refreshes);
        copy(&self.upstream_calls, &cache.upstream_calls);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

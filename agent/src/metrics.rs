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

use crate::kernel::RedirectCounts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<CodeLabels, Counter>,
    request_duration: Histogram,
    kernel_redirects: Family<FamilyLabels, Counter>,
    cache_entries: Gauge,
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
        Arc::new(Metrics { registry, requests, request_duration, kernel_redirects, cache_entries })
    }

    pub fn observe_request(&self, code: u16, elapsed: Duration) {
        self.requests.get_or_create(&CodeLabels { code }).inc();
        self.request_duration.observe(elapsed.as_secs_f64());
    }

    /// Renders the registry, after copying in the values that live elsewhere (kernel counters,
    /// cache size).
    pub fn render(&self, redirects: Option<RedirectCounts>, cache_entries: usize) -> String {
        if let Some(counts) = redirects {
            for (family, value) in [("ipv4", counts.v4), ("ipv6", counts.v6)] {
                self.kernel_redirects.get_or_create(&FamilyLabels { family }).inner().store(value, Ordering::Relaxed);
            }
        }
        self.cache_entries.set(cache_entries as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

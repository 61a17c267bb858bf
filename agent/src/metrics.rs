//! Prometheus metrics (OpenMetrics text). Label values are bounded: status codes, reasons, error
//! codes and address families. Pods appear as labels only with `--metrics-per-pod`.
//!
//! Counters that live elsewhere (the kernel's per-CPU counters, the cache's statistics, the
//! process's figures from /proc) are copied in when /metrics is scraped.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorCodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The serving agent's figures that live outside the registry, copied in at each scrape.
pub struct Live<'a> {
    pub redirects: Option<RedirectCounts>,
    pub cache_entries: usize,
    pub cache: &'a CacheStats,
    pub open_connections: usize,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<CodeLabels, Counter>,
    /// The counters of the statuses the endpoint answers, resolved once: counting a response
    /// touches no lock.
    requests_by_status: [(u16, Counter); 10],
    request_duration: AtomicHistogram,
    refused: Family<ReasonLabels, Counter>,
    upstream_duration: AtomicHistogram,
    attribution_duration: AtomicHistogram,
    upstream_errors: Family<ErrorCodeLabels, Counter>,
    upstream_budget_waits: Counter,
    upstream_budget_wait_seconds: Counter<f64>,
    kernel_redirects: Family<FamilyLabels, Counter>,
    cache_entries: Gauge,
    ready: Gauge,
    cache_lookups: Family<ResultLabels, Counter>,
    cache_evictions: Family<ReasonLabels, Counter>,
    cache_refreshes: Counter,
    upstream_calls: Counter,
    pod_requests: Option<Family<PodLabels, Counter>>,
    mode: Family<ModeLabels, Gauge>,
    rejected_connections: Family<ReasonLabels, Counter>,
    open_connections: Gauge,
    process: ProcessMetrics,
}

struct ProcessMetrics {
    #[cfg(feature = "count-allocations")]
    allocations: Counter,
    #[cfg(feature = "count-allocations")]
    live_bytes: Gauge,
    resident_memory_bytes: Gauge,
    cpu_seconds: Counter<f64>,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time_seconds: Gauge,
}

impl Metrics {
    /// `per_pod` adds a request counter with `namespace` and `pod` labels (small clusters only:
    /// one series per pod and status code).
    pub fn new(per_pod: bool, cache_capacity: usize) -> Arc<Metrics> {
        let mut r = Registry::default();
        let requests = Family::<CodeLabels, Counter>::default();
        r.register(
            "pod_identity_agent_requests",
            "Credential endpoint responses by HTTP status code",
            requests.clone(),
        );
        let requests_by_status = [200u16, 400, 403, 404, 405, 429, 500, 502, 503, 504]
            .map(|code| (code, requests.get_or_create_owned(&CodeLabels { code })));
        let request_duration = AtomicHistogram::exponential(0.0001, 2.5, 14);
        r.register_with_unit(
            "pod_identity_agent_request_duration",
            "Time from request to response on the credential endpoint",
            Unit::Seconds,
            request_duration.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        r.register(
            "pod_identity_agent_refused_requests",
            "Requests answered with an error, by reason: not_redirected, cgroup_unknown, not_a_pod (attribution); host_not_allowed; token_invalid, token_pod_mismatch (token binding); pod_rate_limited; upstream_error",
            refused.clone(),
        );
        let upstream_duration = AtomicHistogram::exponential(0.005, 2.0, 12);
        let attribution_duration = AtomicHistogram::exponential(0.000_000_5, 2.0, 16);
        r.register_with_unit(
            "pod_identity_agent_attribution_duration",
            "Time to take an accepted connection's record from the kernel map: one lookup-and-delete (two map commands before Linux 5.14)",
            Unit::Seconds,
            attribution_duration.clone(),
        );
        r.register_with_unit(
            "pod_identity_agent_upstream_call_duration",
            "Duration of each attempt at the credential source (an HTTP request to EKS Auth, or STS and the local token check in sts mode)",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let upstream_errors = Family::<ErrorCodeLabels, Counter>::default();
        r.register(
            "pod_identity_agent_upstream_errors",
            "Failed credential-source attempts by error code (ThrottlingException, UpstreamUnreachable, UpstreamTimeout, InvalidTokenException, ...)",
            upstream_errors.clone(),
        );
        let upstream_budget_waits = Counter::default();
        r.register(
            "pod_identity_agent_upstream_budget_waits",
            "Credential-source calls that waited for the node-wide budget (--upstream-qps/--upstream-burst)",
            upstream_budget_waits.clone(),
        );
        let upstream_budget_wait_seconds = Counter::<f64>::default();
        r.register_with_unit(
            "pod_identity_agent_upstream_budget_wait",
            "Total time credential-source calls waited for the node-wide budget",
            Unit::Seconds,
            upstream_budget_wait_seconds.clone(),
        );
        let kernel_redirects = Family::<FamilyLabels, Counter>::default();
        r.register(
            "pod_identity_agent_kernel_redirected_connects",
            "Connects to the credential address redirected by the kernel programs, by address family",
            kernel_redirects.clone(),
        );
        let cache_entries = Gauge::default();
        r.register(
            "pod_identity_agent_cache_entries",
            "Credentials held in the cache",
            cache_entries.clone(),
        );
        let capacity = Gauge::<i64>::default();
        capacity.set(cache_capacity as i64);
        r.register(
            "pod_identity_agent_cache_capacity",
            "Most credentials the cache holds (--max-cache-entries)",
            capacity.clone(),
        );
        let ready = Gauge::default();
        r.register("pod_identity_agent_ready", "1 when /readyz answers ready, else 0 (starting, waiting for the cgroup root, shutting down)", ready.clone());
        let cache_lookups = Family::<ResultLabels, Counter>::default();
        r.register(
            "pod_identity_agent_cache_lookups",
            "Credential lookups by result: hit, miss (started an upstream call), coalesced (waited for another request's call), stale (served cached credentials while the refresh failed), negative (terminal error answered from memory)",
            cache_lookups.clone(),
        );
        let cache_evictions = Family::<ReasonLabels, Counter>::default();
        r.register(
            "pod_identity_agent_cache_evictions",
            "Cache entries removed, by reason: lru, superseded (the pod's token rotated), pod_gone, expired, terminal (the credential source refused the token)",
            cache_evictions.clone(),
        );
        let cache_refreshes = Counter::default();
        r.register(
            "pod_identity_agent_cache_refreshes",
            "Background refreshes started ahead of expiry",
            cache_refreshes.clone(),
        );
        let upstream_calls = Counter::default();
        r.register(
            "pod_identity_agent_upstream_calls",
            "Attempts at the credential source (EKS Auth, or STS), retries included",
            upstream_calls.clone(),
        );
        let pod_requests = per_pod.then(|| {
            let f = Family::<PodLabels, Counter>::default();
            r.register(
                "pod_identity_agent_pod_requests",
                "Credential endpoint responses per pod and status code (--metrics-per-pod)",
                f.clone(),
            );
            f
        });
        let mode = Family::<ModeLabels, Gauge>::default();
        r.register("pod_identity_agent_mode", "How pods reach the agent: 1 for the active mode, ebpf (attributed) or link (token-only checks)", mode.clone());
        let rejected_connections = Family::<ReasonLabels, Counter>::default();
        r.register(
            "pod_identity_agent_rejected_connections",
            "Connections closed at accept, by reason: pod_limit (--max-connections-per-pod), total_limit (--max-connections)",
            rejected_connections.clone(),
        );
        let open_connections = Gauge::default();
        r.register(
            "pod_identity_agent_open_connections",
            "Open connections on the credential listeners",
            open_connections.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register(
            "pod_identity_agent_build_info",
            "Version of the running agent (value is always 1)",
            build,
        );
        let process = ProcessMetrics {
            #[cfg(feature = "count-allocations")]
            allocations: Counter::default(),
            #[cfg(feature = "count-allocations")]
            live_bytes: Gauge::default(),
            resident_memory_bytes: Gauge::default(),
            cpu_seconds: Counter::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            start_time_seconds: Gauge::default(),
        };
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory size",
            Unit::Bytes,
            process.resident_memory_bytes.clone(),
        );
        r.register_with_unit(
            "process_cpu",
            "User and system CPU time spent",
            Unit::Seconds,
            process.cpu_seconds.clone(),
        );
        r.register(
            "process_open_fds",
            "Open file descriptors",
            process.open_fds.clone(),
        );
        r.register(
            "process_max_fds",
            "Limit on open file descriptors",
            process.max_fds.clone(),
        );
        #[cfg(feature = "count-allocations")]
        {
            r.register(
                "process_heap_allocations",
                "Heap allocations since start (count-allocations builds only)",
                process.allocations.clone(),
            );
            r.register_with_unit(
                "process_heap_live",
                "Heap bytes in use (count-allocations builds only)",
                Unit::Bytes,
                process.live_bytes.clone(),
            );
        }
        r.register_with_unit(
            "process_start_time",
            "Start time of the process since the Unix epoch",
            Unit::Seconds,
            process.start_time_seconds.clone(),
        );
        Arc::new(Metrics {
            registry: r,
            requests,
            requests_by_status,
            request_duration,
            refused,
            upstream_duration,
            attribution_duration,
            upstream_errors,
            upstream_budget_waits,
            upstream_budget_wait_seconds,
            kernel_redirects,
            cache_entries,
            ready,
            cache_lookups,
            cache_evictions,
            cache_refreshes,
            upstream_calls,
            pod_requests,
            mode,
            rejected_connections,
            open_connections,
            process,
        })
    }

    pub fn observe_rejected_connection(&self, reason: &'static str) {
        self.rejected_connections
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn set_mode(&self, mode: &'static str) {
        self.mode.get_or_create(&ModeLabels { mode }).set(1);
    }

    /// One response of the credential endpoint; `pod` is (namespace, name) when known.
    pub fn observe_request(
        &self,
        code: u16,
        elapsed: Duration,
        refused: Option<&'static str>,
        pod: Option<(&str, &str)>,
    ) {
        match self.requests_by_status.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => counter.inc(),
            None => self.requests.get_or_create(&CodeLabels { code }).inc(),
        };
        self.request_duration.observe(elapsed);
        if let Some(reason) = refused {
            self.refused.get_or_create(&ReasonLabels { reason }).inc();
        }
        if let (Some(family), Some((namespace, pod))) = (&self.pod_requests, pod) {
            family
                .get_or_create(&PodLabels {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    code,
                })
                .inc();
        }
    }

    /// Drops the per-pod series of a pod that is gone.
    pub fn forget_pod(&self, namespace: &str, pod: &str) {
        if let Some(family) = &self.pod_requests {
            for code in [200u16, 400, 403, 404, 405, 429, 500, 502, 503, 504] {
                family.remove(&PodLabels {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    code,
                });
            }
        }
    }

    /// One HTTP request to EKS Auth; `error` is its error code when it failed.
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

    /// Taking an accepted connection's kernel record took `elapsed`.
    pub fn observe_attribution(&self, elapsed: Duration) {
        self.attribution_duration.observe(elapsed);
    }

    /// An EKS Auth call waited `waited` for the node-wide budget.
    pub fn observe_budget_wait(&self, waited: Duration) {
        if !waited.is_zero() {
            self.upstream_budget_waits.inc();
            self.upstream_budget_wait_seconds
                .inc_by(waited.as_secs_f64());
        }
    }

    /// Renders the registry after copying in the values that live elsewhere; `live` is `None`
    /// while the agent is still starting.
    pub fn render(&self, ready: bool, live: Option<Live<'_>>) -> String {
        self.ready.set(i64::from(ready));
        if let Some(live) = live {
            self.copy_live(live);
        }
        self.read_process();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    fn copy_live(&self, live: Live<'_>) {
        let Live {
            redirects,
            cache_entries,
            cache,
            open_connections,
        } = live;
        self.open_connections.set(open_connections as i64);
        if let Some(counts) = redirects {
            for (family, value) in [("ipv4", counts.v4), ("ipv6", counts.v6)] {
                self.kernel_redirects
                    .get_or_create(&FamilyLabels { family })
                    .inner()
                    .store(value, Ordering::Relaxed);
            }
        }
        self.cache_entries.set(cache_entries as i64);
        let copy = |counter: &Counter, from: &std::sync::atomic::AtomicU64| {
            counter
                .inner()
                .store(from.load(Ordering::Relaxed), Ordering::Relaxed)
        };
        for (result, from) in [
            ("hit", &cache.hits),
            ("miss", &cache.misses),
            ("coalesced", &cache.coalesced),
            ("stale", &cache.stale_served),
            ("negative", &cache.negative_hits),
        ] {
            copy(
                &self.cache_lookups.get_or_create(&ResultLabels { result }),
                from,
            );
        }
        for (reason, from) in [
            ("lru", &cache.evicted_lru),
            ("superseded", &cache.evicted_superseded),
            ("pod_gone", &cache.evicted_pod_gone),
            ("expired", &cache.evicted_expired),
            ("terminal", &cache.evicted_terminal),
        ] {
            copy(
                &self.cache_evictions.get_or_create(&ReasonLabels { reason }),
                from,
            );
        }
        copy(&self.cache_refreshes, &cache.refreshes);
        copy(&self.upstream_calls, &cache.upstream_calls);
    }

    /// Figures about this process from /proc (best effort: a failed read leaves the old value).
    fn read_process(&self) {
        #[cfg(feature = "count-allocations")]
        {
            self.process
                .allocations
                .inner()
                .store(crate::alloc_count::allocations(), Ordering::Relaxed);
            self.process
                .live_bytes
                .set(crate::alloc_count::live_bytes() as i64);
        }
        let Ok(me) = procfs::process::Process::myself() else {
            return;
        };
        let ticks = procfs::ticks_per_second() as f64;
        if let Ok(stat) = me.stat() {
            self.process
                .resident_memory_bytes
                .set(stat.rss as i64 * procfs::page_size() as i64);
            let cpu = (stat.utime + stat.stime) as f64 / ticks;
            self.process
                .cpu_seconds
                .inner()
                .store(cpu.to_bits(), Ordering::Relaxed);
            if let Ok(boot) = procfs::boot_time_secs() {
                self.process
                    .start_time_seconds
                    .set(boot as i64 + (stat.starttime as f64 / ticks) as i64);
            }
        }
        if let Ok(n) = me.fd_count() {
            self.process.open_fds.set(n as i64);
        }
        if let Ok(limits) = me.limits()
            && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
        {
            self.process.max_fds.set(max as i64);
        }
    }
}

/// A histogram of durations whose observations are atomic adds: no lock is shared by the
/// requests that observe it (prometheus-client's own histogram takes a write lock per
/// observation). Encoded like any OpenMetrics histogram.
#[derive(Clone, Debug)]
pub struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug)]
struct HistogramCells {
    /// Upper bounds in nanoseconds, increasing; the last is `u64::MAX` (+Inf).
    bounds: Vec<u64>,
    /// Observations per bucket (not cumulative).
    counts: Vec<std::sync::atomic::AtomicU64>,
    sum_nanos: std::sync::atomic::AtomicU64,
}

impl AtomicHistogram {
    /// `count` buckets from `start` seconds, each `factor` times the one before, and +Inf.
    pub fn exponential(start: f64, factor: f64, count: u16) -> AtomicHistogram {
        let mut bounds: Vec<u64> = (0..i32::from(count))
            .map(|i| (start * factor.powi(i) * 1e9) as u64)
            .collect();
        bounds.push(u64::MAX);
        let counts = bounds
            .iter()
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect();
        AtomicHistogram(Arc::new(HistogramCells {
            bounds,
            counts,
            sum_nanos: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let cells = &self.0;
        let bucket = cells.bounds.partition_point(|bound| *bound < nanos);
        cells.counts[bucket.min(cells.counts.len() - 1)].fetch_add(1, Ordering::Relaxed);
        cells.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let cells = &self.0;
        let buckets: Vec<(f64, u64)> = cells
            .bounds
            .iter()
            .zip(&cells.counts)
            .map(|(bound, count)| {
                (
                    if *bound == u64::MAX {
                        f64::MAX
                    } else {
                        *bound as f64 / 1e9
                    },
                    count.load(Ordering::Relaxed),
                )
            })
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = cells.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

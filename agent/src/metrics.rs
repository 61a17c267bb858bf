//! The metrics toolkit (OpenMetrics text): the registry every component registers its own series
//! in, a lock-free histogram, series read at scrape time, and the process's own figures.
//!
//! A leaf: it names no other module of the agent. Each component owns its series where it lives
//! (`server::metrics`, `cache::metrics`, `kernel::metrics`, the daemon's state in `ops`) and
//! registers them once at start. Label values are bounded: status codes, reasons, error codes,
//! address families; pods appear as labels only with `--metrics-per-pod`.

use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, counter::ConstCounter, gauge::ConstGauge},
};
pub use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

/// Prefix of every series of the agent's own (the process's figures are `process_*`).
pub const PREFIX: &str = "pod_identity_agent";

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry in OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// Registers a gauge whose value is read at each scrape (the size of a map another component
/// holds, a readiness flag).
pub fn register_sampled_gauge(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    read: impl Fn() -> i64 + Send + Sync + 'static,
) {
    registry.register_collector(Box::new(Sampled {
        name,
        help,
        series: Series::Gauge(Box::new(read)),
    }));
}

/// Registers a counter whose value is read at each scrape (a count kept elsewhere: the counting
/// allocator's, in the benchmark's build).
#[cfg(feature = "count-allocations")]
pub fn register_sampled_counter(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    read: impl Fn() -> u64 + Send + Sync + 'static,
) {
    registry.register_collector(Box::new(Sampled {
        name,
        help,
        series: Series::Counter(Box::new(read)),
    }));
}

/// Registers a counter family whose values are read at each scrape, one series per value of
/// `label` (counters kept elsewhere, such as the kernel programs' per-CPU counts). `read` gives
/// nothing while there is nothing to count yet.
pub fn register_sampled_counters(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    label: &'static str,
    read: impl Fn() -> Vec<(&'static str, u64)> + Send + Sync + 'static,
) {
    registry.register_collector(Box::new(Sampled {
        name,
        help,
        series: Series::Counters(label, Box::new(read)),
    }));
}

type ReadGauge = Box<dyn Fn() -> i64 + Send + Sync>;
#[cfg(feature = "count-allocations")]
type ReadCounter = Box<dyn Fn() -> u64 + Send + Sync>;
type ReadCounters = Box<dyn Fn() -> Vec<(&'static str, u64)> + Send + Sync>;

struct Sampled {
    name: &'static str,
    help: &'static str,
    series: Series,
}

enum Series {
    Gauge(ReadGauge),
    #[cfg(feature = "count-allocations")]
    Counter(ReadCounter),
    Counters(&'static str, ReadCounters),
}

impl fmt::Debug for Sampled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampled")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        match &self.series {
            Series::Gauge(read) => {
                let gauge = ConstGauge::new(read());
                gauge.encode(encoder.encode_descriptor(
                    self.name,
                    self.help,
                    None,
                    MetricType::Gauge,
                )?)
            }
            #[cfg(feature = "count-allocations")]
            Series::Counter(read) => {
                let counter = ConstCounter::new(read());
                let metric =
                    encoder.encode_descriptor(self.name, self.help, None, MetricType::Counter)?;
                counter.encode(metric)
            }
            Series::Counters(label, read) => {
                let values = read();
                if values.is_empty() {
                    return Ok(());
                }
                let mut family =
                    encoder.encode_descriptor(self.name, self.help, None, MetricType::Counter)?;
                for (value, count) in values {
                    ConstCounter::new(count).encode(family.encode_family(&[(*label, value)])?)?;
                }
                Ok(())
            }
        }
    }
}

/// The process's own figures, read from /proc at each scrape (`process_*`, as Prometheus'
/// client libraries name them). A failed read leaves the series out of that scrape.
#[derive(Debug)]
pub struct ProcessCollector;

impl ProcessCollector {
    pub fn register(registry: &mut Registry) {
        registry.register_collector(Box::new(ProcessCollector));
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Ok(me) = procfs::process::Process::myself() else {
            return Ok(());
        };
        let ticks = procfs::ticks_per_second() as f64;
        if let Ok(stat) = me.stat() {
            let resident = stat.rss as i64 * procfs::page_size() as i64;
            gauge(
                &mut encoder,
                "process_resident_memory",
                "Resident memory size",
                Some(Unit::Bytes),
                resident,
            )?;
            let cpu = (stat.utime + stat.stime) as f64 / ticks;
            ConstCounter::new(cpu).encode(encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?)?;
            if let Ok(boot) = procfs::boot_time_secs() {
                let start = boot as i64 + (stat.starttime as f64 / ticks) as i64;
                let help = "Start time of the process since the Unix epoch";
                gauge(
                    &mut encoder,
                    "process_start_time",
                    help,
                    Some(Unit::Seconds),
                    start,
                )?;
            }
        }
        if let Ok(n) = me.fd_count() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Open file descriptors",
                None,
                n as i64,
            )?;
        }
        if let Ok(limits) = me.limits()
            && let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit
        {
            let help = "Limit on open file descriptors";
            gauge(&mut encoder, "process_max_fds", help, None, max as i64)?;
        }
        Ok(())
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: i64,
) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
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

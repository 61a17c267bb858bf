//! The node agent, `pod-identity-agent run`: the operator endpoints first (alive, not ready),
//! then interception (`intercept`), the credential source and the server, listening once all
//! is in place, upkeep (`maintain`) while serving, and an orderly shutdown on SIGTERM.

mod intercept;
mod maintain;

use std::{
    process::ExitCode,
    sync::{Arc, OnceLock},
};

use anyhow::Context as _;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::{signal::unix::SignalKind, sync::watch, task::JoinHandle};
use tracing::{debug, error, info, warn};

use self::intercept::{Cgroup2, Interception};
use crate::{
    cache::{CredentialCache, metrics::CacheMetrics},
    config::{ImdsMode, LogFormat, RunArgs, Settings},
    connlimit::ConnectionLimits,
    imds::ImdsGuard,
    kernel::{self, Attachment, metrics::KernelMetrics},
    metrics::{self, ProcessCollector, Registry},
    ops::{self, AgentInfo, Readiness, StateMetrics},
    ratelimit::{OwnerRateLimits, UpstreamLimiter},
    request,
    server::{self, CredentialServer, LogOnce, metrics::ServerMetrics},
    source::CredentialSource,
    stats::PodStatsRegistry,
};

/// Runs the agent until SIGTERM or SIGINT; the exit code says whether it stopped cleanly.
pub fn run(args: RunArgs) -> ExitCode {
    init_logging(args.log_format, &args.log_level);
    maintain::limit_malloc_arenas();
    raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async { serve(Settings::resolve(args)?).await }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runtime workers: one per core up to two. Two serve a dense node's pods many times over
/// (docs/performance.md: tens of thousands of requests a second on the bench's two cores); one
/// per core on a 96-core node would only hold memory, each worker with its stack and its share
/// of the allocator's caches.
fn worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(2))
}

/// Blocking threads: the cgroup walks (a missed cgroup id, the maintenance pass), and the
/// resolver's lookups. Each is short; a few in parallel are plenty, and a crowd of new cgroups
/// cannot make the agent start hundreds of threads.
const MAX_BLOCKING_THREADS: usize = 8;

/// The soft limit on open files up to the hard one: `--max-connections` (8192 by default) is the
/// agent's bound on connections, not a soft limit of 1024 some runtimes leave.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("invalid --log-level {level:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

/// What exists before interception: the parts that need nothing from the kernel or AWS, with
/// their series registered, so `/metrics` answers from the first second.
struct Early {
    readiness: Arc<Readiness>,
    stats: Arc<PodStatsRegistry>,
    info: Arc<OnceLock<AgentInfo>>,
    state: StateMetrics,
    server: ServerMetrics,
    cache: CacheMetrics,
    kernel: KernelMetrics,
    imds: Arc<ImdsGuard>,
    connections: Arc<ConnectionLimits>,
    registry: Arc<Registry>,
}

impl Early {
    fn new(settings: &Settings) -> Early {
        let f = &settings.flags;
        let readiness = Readiness::new("kernel programs not attached yet");
        let mut registry = Registry::default();
        ProcessCollector::register(&mut registry);
        #[cfg(feature = "count-allocations")]
        register_allocation_counts(&mut registry);
        let agent = registry.sub_registry_with_prefix(metrics::PREFIX);
        Early {
            state: StateMetrics::register(agent, &readiness),
            server: ServerMetrics::register(agent, f.metrics_per_pod),
            cache: CacheMetrics::register(agent, f.max_cache_entries),
            kernel: KernelMetrics::register(agent),
            imds: Arc::new(ImdsGuard::register(agent, f.imds, f.metrics_per_pod)),
            connections: ConnectionLimits::new(f.max_connections, f.max_connections_per_pod, agent),
            registry: Arc::new(registry),
            readiness,
            stats: Arc::new(PodStatsRegistry::default()),
            info: Arc::new(OnceLock::new()),
        }
    }

    /// Probes and metrics first, so a kubelet and Prometheus see "alive, not ready" while the
    /// programs load or the cgroup root is awaited.
    async fn serve_operator_endpoints(
        &self,
        settings: &Settings,
        shutdown: &watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let f = &settings.flags;
        let probes = ops::probes(
            self.readiness.clone(),
            self.stats.clone(),
            self.info.clone(),
        );
        ops::serve(f.probe_addr, probes, shutdown.clone())
            .await
            .with_context(|| format!("binding the probe address {}", f.probe_addr))?;
        let metrics = ops::metrics_endpoint(self.registry.clone());
        ops::serve(f.metrics_addr, metrics, shutdown.clone())
            .await
            .with_context(|| format!("binding the metrics address {}", f.metrics_addr))
    }
}

/// `process_heap_allocations` and `process_heap_live_bytes`, read at each scrape, in the
/// benchmark's build.
#[cfg(feature = "count-allocations")]
fn register_allocation_counts(registry: &mut Registry) {
    use crate::allocator::{allocations, live_bytes};
    metrics::register_sampled_counter(
        registry,
        "process_heap_allocations",
        "Heap allocations since start (count-allocations builds only)",
        allocations,
    );
    metrics::register_sampled_gauge(
        registry,
        "process_heap_live_bytes",
        "Heap bytes in use (count-allocations builds only)",
        || live_bytes() as i64,
    );
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let early = Early::new(&settings);
    early
        .serve_operator_endpoints(&settings, &shutdown_rx)
        .await?;
    kernel::raise_memlock_limit();
    let cgroup2 = intercept::cgroup2(&settings);
    let interception = intercept::intercept(&settings, cgroup2.as_ref(), &early.readiness).await?;
    // Start-up milestones, so a slow start shows where its time went.
    debug!(mode = interception.mode, "interception in place");
    early.state.set_mode(interception.mode);
    if let Some(redirector) = &interception.redirector {
        early.kernel.attached(redirector);
        learn_node_netns(&settings, redirector);
    }
    let (server, source) = build_server(&settings, &early, cgroup2.as_ref(), &interception).await?;
    let info = agent_info(&settings, &cgroup2, &interception, source);
    let running = start_serving(
        &settings,
        &early,
        &server,
        &cgroup2,
        interception,
        info,
        &shutdown_rx,
    )?;
    wait_for_signal().await?;
    info!("shutting down: no new connections; finishing in-flight requests");
    early.readiness.not_ready("shutting down");
    let _ = shutdown_tx.send(true);
    running.stop(&settings, server).await
}

/// `--imds deny` tells the node's network namespace from pods' by the programs' sight of one of
/// the agent's own connects: made here, once the programs are attached.
fn learn_node_netns(settings: &Settings, redirector: &kernel::Redirector) {
    if settings.flags.imds != ImdsMode::Deny {
        return;
    }
    let Some(address) = settings.flags.intercept.first() else {
        return;
    };
    if !redirector.learn_node_netns(*address) {
        warn!(
            "--imds deny: the node's network namespace is not known yet, so no IMDS connect is refused until one of the agent's own connects shows it"
        );
    }
}

/// What the credential source says of itself, for `/v1/agent`.
struct SourceFacts {
    kind: &'static str,
    /// The region its client signs for, once found.
    region: Option<String>,
}

/// The credential source, the cache and the server, ready to accept.
async fn build_server(
    settings: &Settings,
    early: &Early,
    cgroup2: Result<&Cgroup2, &anyhow::Error>,
    interception: &Interception,
) -> anyhow::Result<(Arc<CredentialServer>, SourceFacts)> {
    let f = &settings.flags;
    let cgroups = intercept::index_cgroups(cgroup2, interception.redirector.is_some())?;
    debug!(
        cgroups = cgroups.as_ref().map(|c| c.len()),
        "cgroup index built"
    );
    let upstream = CredentialSource::from_settings(settings).await?;
    let source = SourceFacts {
        kind: upstream.kind(),
        region: upstream.region().await,
    };
    debug!(region = source.region, "credential source configured");
    let limiter = UpstreamLimiter::new(f.upstream_qps, f.upstream_burst);
    let server = Arc::new(CredentialServer {
        redirector: interception.redirector.clone(),
        cgroups: cgroups.map(Arc::new),
        walking: tokio::sync::Mutex::new(()),
        cache: CredentialCache::new(upstream, settings.cache(), limiter, early.cache.clone()),
        rate_limits: OwnerRateLimits::new(f.pod_rps, f.pod_burst),
        connection_limits: early.connections.clone(),
        stats: early.stats.clone(),
        metrics: early.server.clone(),
        allowed_hosts: request::allowed_hosts(&f.intercept),
        pods: Default::default(),
        refused_sources: LogOnce::default(),
        http1: server::http1(),
    });
    Ok((server, source))
}

/// What runs while the agent serves: the accept loops, upkeep, and the programs' handle.
struct Running {
    accept_loops: Vec<JoinHandle<()>>,
    maintenance: JoinHandle<()>,
    graceful: Arc<GracefulShutdown>,
    redirector: Option<Arc<kernel::Redirector>>,
}

/// Listens (only now: a socket that listens gets a share of the port's connections, and this
/// agent can serve them from here on), says so, and turns ready.
fn start_serving(
    settings: &Settings,
    early: &Early,
    server: &Arc<CredentialServer>,
    cgroup2: &anyhow::Result<Cgroup2>,
    interception: Interception,
    info: AgentInfo,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Running> {
    let Interception {
        redirector,
        listeners,
        mode,
        note,
    } = interception;
    let listen = info.listen.clone();
    let listeners = listeners.listen()?;
    let graceful = Arc::new(GracefulShutdown::new());
    let accept_loops = listeners
        .into_iter()
        .map(|l| tokio::spawn(server.clone().serve(l, shutdown.clone(), graceful.clone())))
        .collect();
    // The guard's counts are kept only where the programs count (eBPF mode, guard on).
    let imds =
        (redirector.is_some() && settings.flags.imds != ImdsMode::Off).then(|| early.imds.clone());
    let maintenance = tokio::spawn(maintain::maintain(server.clone(), imds));
    let _ = early.info.set(info);
    // Logged before readiness flips, so whoever sees /readyz answer 200 also finds this line in
    // the log (tests read it right after readiness; so does an operator tailing the pod).
    info!(
        mode,
        note = %note,
        attachment = ?redirector.as_ref().map(|r| r.attachment),
        listen = ?listen,
        target_v4 = ?settings.target_v4,
        target_v6 = ?settings.target_v6,
        intercept = ?settings.flags.intercept,
        cgroup_root = ?cgroup2.as_ref().ok().map(|c| c.root.display()),
        own_cgroup = ?cgroup2.as_ref().ok().map(|c| c.own.display()),
        "serving credentials"
    );
    early.readiness.ready(note);
    Ok(Running {
        accept_loops,
        maintenance,
        graceful,
        redirector,
    })
}

/// What `/v1/agent` says: how the agent was started and what it resolved.
fn agent_info(
    settings: &Settings,
    cgroup2: &anyhow::Result<Cgroup2>,
    interception: &Interception,
    source: SourceFacts,
) -> AgentInfo {
    let f = &settings.flags;
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: interception.mode.to_owned(),
        cluster_name: f.cluster_name.clone(),
        credential_source: source.kind.to_owned(),
        region: source.region,
        eks_auth_endpoint: f.eks_auth_endpoint.clone(),
        fips: f.fips,
        listen: interception.listeners.addrs(),
        serve: if interception.redirector.is_some() {
            settings.listen.clone()
        } else {
            Vec::new()
        },
        intercept: f.intercept.clone(),
        cgroup_root: cgroup2.as_ref().ok().map(|c| c.root.clone()),
        cgroup_id: cgroup2.as_ref().ok().map(|c| c.id),
        metrics_addr: f.metrics_addr,
        pin: f.pin.clone(),
        imds: if interception.redirector.is_some() {
            f.imds.as_str().to_owned()
        } else {
            "unavailable in link mode".to_owned()
        },
        programs: interception
            .redirector
            .as_ref()
            .map(|r| r.program_ids())
            .unwrap_or_default(),
        // Absolute, symlinks kept: a ConfigMap volume swaps what they point to.
        associations_file: f
            .associations_file
            .as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
    }
}

impl Running {
    /// Stops accepting, lets open connections finish within the grace period, and detaches the
    /// programs unless they are pinned for the next agent.
    async fn stop(self, settings: &Settings, server: Arc<CredentialServer>) -> anyhow::Result<()> {
        self.maintenance.abort();
        let _ = self.maintenance.await;
        for handle in self.accept_loops {
            let _ = handle.await;
        }
        let graceful = Arc::try_unwrap(self.graceful)
            .map_err(|_| anyhow::anyhow!("accept loops still hold the connection tracker"))?;
        let grace = settings.shutdown_grace();
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            warn!(
                ?grace,
                "connections still open after the grace period; closing them"
            );
        }
        drop(server);
        match self.redirector.map(Arc::try_unwrap) {
            // Dropping the last handle closes owned links: the kernel detaches the programs.
            Some(Ok(redirector)) if redirector.attachment == Attachment::Owned => drop(redirector),
            Some(Ok(_)) => info!(
                pin = ?settings.flags.pin,
                "programs stay attached through their pinned links for the next agent"
            ),
            Some(Err(_)) => {
                warn!("kernel programs still referenced at exit; they detach when the process ends")
            }
            None => {}
        }
        info!("stopped");
        Ok(())
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each component registers its own series; together they must keep the names the alerts,
    /// the dashboard and operators' queries use.
    #[test]
    fn every_series_keeps_its_name() {
        let args = <RunArgsParser as clap::Parser>::parse_from([
            "run",
            "--cluster-name",
            "c",
            "--listen",
            "198.18.0.1:2704",
            "--metrics-per-pod",
        ])
        .args;
        let early = Early::new(&Settings::resolve(args).unwrap());
        early
            .server
            .observe_request(200, std::time::Duration::ZERO, None, Some(("ns", "p")));
        let text = metrics::render(&early.registry);
        for name in [
            "pod_identity_agent_requests_total{code=\"200\"} 1",
            "pod_identity_agent_request_duration_seconds_count 1",
            "pod_identity_agent_refused_requests_total{reason=\"token_pod_mismatch\"} 0",
            "pod_identity_agent_attribution_duration_seconds_count 0",
            "pod_identity_agent_pod_requests_total{namespace=\"ns\",pod=\"p\",code=\"200\"} 1",
            "pod_identity_agent_cache_entries 0",
            "pod_identity_agent_cache_capacity 4096",
            "pod_identity_agent_cache_lookups_total{result=\"negative\"} 0",
            "pod_identity_agent_cache_evictions_total{reason=\"pod_gone\"} 0",
            "pod_identity_agent_cache_refreshes_total 0",
            "pod_identity_agent_upstream_calls_total 0",
            "pod_identity_agent_upstream_call_duration_seconds_count 0",
            "pod_identity_agent_upstream_budget_waits_total 0",
            "pod_identity_agent_upstream_budget_wait_seconds_total 0",
            "pod_identity_agent_rejected_connections_total{reason=\"total_limit\"} 0",
            "pod_identity_agent_open_connections 0",
            "pod_identity_agent_ready 0",
            "pod_identity_agent_build_info{version=",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(
            !text.contains("kernel_redirected_connects_total{"),
            "no series before the programs attach"
        );
        early.readiness.ready("");
        early.state.set_mode("ebpf");
        let text = metrics::render(&early.registry);
        assert!(text.contains("pod_identity_agent_ready 1"), "{text}");
        assert!(
            text.contains("pod_identity_agent_mode{mode=\"ebpf\"} 1"),
            "{text}"
        );
    }

    #[derive(clap::Parser)]
    struct RunArgsParser {
        #[command(flatten)]
        args: RunArgs,
    }
}

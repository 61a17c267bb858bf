//! pod-identity-agent: hands EKS Pod Identity credentials to the pods of one node.
//!
//! Rooms: `kernel` (load and attach the eBPF programs, read their records), `attribution`
//! (cgroup id -> pod), `token` (service-account token claims), `upstream` (EKS Auth),
//! `credentials` (wire format and cache), `server` (the credential endpoint), `ops` and
//! `metrics` (probes and Prometheus), `config` (flags and defaults).

mod attribution;
mod cache;
mod config;
mod connlimit;
mod credentials;
mod kernel;
mod link;
mod metrics;
mod ops;
mod pods_view;
mod ratelimit;
mod request;
mod server;
mod stats;
mod token;
mod upstream;

use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use http::StatusCode;
use tokio::{net::TcpListener, signal::unix::SignalKind, sync::watch};
use tracing::{error, info, warn};

use crate::{
    attribution::CgroupIndex,
    cache::CredentialCache,
    config::{Cli, Command, LogFormat, Mode, Settings},
    kernel::{Attachment, RedirectSpec, Redirector},
    metrics::Metrics,
    ops::Readiness,
    ratelimit::{PodRateLimits, UpstreamLimiter},
    server::CredentialServer,
    stats::PodStatsRegistry,
    upstream::{EksAuth, EksAuthOptions},
};

/// How often the cache and per-pod state are checked against the pods that exist (a deleted
/// pod's state is gone within this) and refreshes that are due are started.
const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Pods(args) => {
            return match pods_view::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pod-identity-agent pods: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Cleanup { pin } => {
            return match kernel::cleanup(&pin) {
                Ok(n) => {
                    println!("removed {n} pinned objects from {}", pin.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pod-identity-agent cleanup: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Run(args) => args,
    };
    init_logging(args.log_format, &args.log_level);
    limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async { run(Settings::resolve(args)?).await }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("invalid --log-level {level:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let readiness = Readiness::new("kernel programs not attached yet");
    let metrics = Metrics::new(settings.metrics_per_pod);
    let stats = Arc::new(PodStatsRegistry::default());

    // Probes first, so a kubelet sees "alive, not ready" while the programs load.
    ops::serve(settings.probe_addr, ops::probes(readiness.clone(), stats.clone()), shutdown_rx.clone())
        .await
        .with_context(|| format!("binding the probe address {}", settings.probe_addr))?;

    raise_memlock_limit();
    let mount = attribution::cgroup2_mount()?;
    let cgroup_root = settings.cgroup_root.clone().unwrap_or_else(|| mount.clone());
    let (own_cgroup, agent_cgroup_id) = attribution::own_cgroup(&mount)?;
    let Interception { redirector, listeners, mode, note } =
        intercept(&settings, &cgroup_root, agent_cgroup_id, &readiness).await?;
    metrics.set_mode(mode);
    let cgroups = match CgroupIndex::build(&mount, &cgroup_root) {
        Ok(index) => index,
        // In link mode the index only tells which pods still exist; the whole hierarchy will do
        // when the configured root is what made eBPF mode impossible.
        Err(e) if redirector.is_none() => {
            warn!(error = %e, root = %cgroup_root.display(), "cannot index the cgroup root; indexing the whole cgroup2 hierarchy");
            CgroupIndex::build(&mount, &mount).with_context(|| format!("indexing cgroups below {}", mount.display()))?
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("indexing cgroups below {}", cgroup_root.display()))),
    };
    let upstream = EksAuth::new(EksAuthOptions {
        cluster_name: settings.cluster_name.clone(),
        region: settings.region.clone(),
        endpoint: settings.eks_auth_endpoint.clone(),
        fips: settings.fips,
        node_name: settings.node_name.clone(),
    })
    .await?;
    let server = Arc::new(CredentialServer {
        redirector: redirector.clone(),
        cgroups,
        cache: CredentialCache::new(
            upstream,
            settings.cache.clone(),
            UpstreamLimiter::new(settings.upstream_qps, settings.upstream_burst),
            metrics.clone(),
        ),
        pod_limits: PodRateLimits::new(settings.pod_rps, settings.pod_burst),
        connection_limits: connlimit::ConnectionLimits::new(settings.max_connections, settings.max_connections_per_pod),
        stats,
        metrics: metrics.clone(),
        allowed_hosts: request::allowed_hosts(&settings.intercept),
    });

    let metrics_handler: ops::Handler = {
        let (server, metrics) = (server.clone(), metrics.clone());
        Arc::new(move |path| match path {
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.render(
                    server.redirector.as_ref().map(|r| r.counts()),
                    server.cache.len(),
                    server.cache.stats(),
                    server.connection_limits.open(),
                ),
            ),
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        })
    };
    ops::serve(settings.metrics_addr, metrics_handler, shutdown_rx.clone())
        .await
        .with_context(|| format!("binding the metrics address {}", settings.metrics_addr))?;

    let listen_addrs: Vec<_> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let maintenance = tokio::spawn(maintain(server.clone()));
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let mut accept_loops = Vec::new();
    for listener in listeners {
        accept_loops.push(tokio::spawn(server.clone().serve(listener, shutdown_rx.clone(), graceful.clone())));
    }
    readiness.ready(note.clone());
    info!(
        mode,
        note = %note,
        attachment = ?redirector.as_ref().map(|r| r.attachment),
        listen = ?listen_addrs,
        target_v4 = ?settings.target_v4,
        target_v6 = ?settings.target_v6,
        intercept = ?settings.intercept,
        cgroup_root = %cgroup_root.display(),
        own_cgroup = %own_cgroup.display(),
        "serving credentials"
    );

    wait_for_signal().await?;
    info!("shutting down: no new connections; finishing in-flight requests");
    readiness.not_ready("shutting down");
    let _ = shutdown_tx.send(true);
    maintenance.abort();
    let _ = maintenance.await;
    for handle in accept_loops {
        let _ = handle.await;
    }
    let graceful = Arc::try_unwrap(graceful).map_err(|_| anyhow::anyhow!("accept loops still hold the connection tracker"))?;
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await.is_err() {
        warn!(grace = ?settings.shutdown_grace, "connections still open after the grace period; closing them");
    }
    drop(server);
    match redirector.map(Arc::try_unwrap) {
        // Dropping the last handle closes owned links: the kernel detaches the programs.
        Some(Ok(redirector)) if redirector.attachment == Attachment::Owned => drop(redirector),
        Some(Ok(_)) => info!(pin = ?settings.pin, "programs stay attached through their pinned links for the next agent"),
        Some(Err(_)) => warn!("kernel programs still referenced at exit; they detach when the process ends"),
        None => {}
    }
    info!("stopped");
    Ok(())
}

/// How pods' connections reach this agent.
struct Interception {
    redirector: Option<Arc<Redirector>>,
    listeners: Vec<TcpListener>,
    mode: &'static str,
    /// Shown in /readyz and the start-up log.
    note: String,
}

/// eBPF interception, or link mode: as `--mode` says, `auto` falling back with the reason.
async fn intercept(settings: &Settings, cgroup_root: &std::path::Path, agent_cgroup_id: u64, readiness: &Readiness) -> anyhow::Result<Interception> {
    if settings.mode != Mode::Link {
        let attempt = async {
            let listeners = bind_all(&settings.listen)?;
            wait_for_cgroup_root(cgroup_root, settings.cgroup_root_wait, readiness).await?;
            let redirector = Redirector::attach(&RedirectSpec {
                cgroup_root: cgroup_root.to_path_buf(),
                intercept: settings.intercept.clone(),
                target_v4: settings.target_v4,
                target_v6: settings.target_v6,
                agent_cgroup_id,
                pin: settings.pin.clone(),
            })?;
            anyhow::Ok((listeners, redirector))
        }
        .await;
        match attempt {
            Ok((listeners, redirector)) => {
                return Ok(Interception { redirector: Some(Arc::new(redirector)), listeners, mode: "ebpf", note: String::new() });
            }
            Err(e) if settings.mode == Mode::Ebpf => return Err(e.context("cannot intercept pods' connections")),
            Err(e) => warn!("eBPF interception unavailable, falling back to link mode: {e:#}"),
        }
    }
    let addresses: Vec<_> = settings.intercept.iter().map(|a| a.ip()).collect();
    let link = link::ensure(&addresses)?;
    let on_link: Vec<_> = settings.intercept.iter().copied().filter(|a| link.addresses.contains(&a.ip())).collect();
    let listeners = bind_all(&on_link)?;
    warn!(device = %link.device, addresses = ?link.addresses, "link mode: callers are not attributed to pods; requests are checked by their token alone");
    Ok(Interception {
        redirector: None,
        listeners,
        mode: "link",
        note: format!("link mode on {}: callers are not attributed; token-only checks", link.device),
    })
}

/// The credential listeners, shared with an agent starting beside this one during a roll.
fn bind_all(addrs: &[std::net::SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    addrs
        .iter()
        .map(|addr| ops::shared_listener(*addr, 1024).with_context(|| format!("binding the credential listener {addr}")))
        .collect()
}

/// glibc gives each thread that allocates its own arena, and keeps freed memory in them: bursts
/// of connections on several runtime and blocking threads then leave the resident set high.
/// Two arenas suffice for a service on a few threads; trimming returns freed pages.
fn limit_malloc_arenas() {
    // SAFETY: mallopt before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

fn return_freed_memory() {
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the cgroup.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_MEMLOCK (fine on Linux >= 5.11)");
    }
}

/// Drops the state of pods that are gone and starts refreshes that are due, every
/// [`MAINTENANCE_INTERVAL`].
async fn maintain(server: Arc<CredentialServer>) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let walker = server.clone();
        let present = match tokio::task::spawn_blocking(move || walker.cgroups.present_pods()).await {
            Ok(Ok(present)) => present,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot walk the cgroup tree; keeping cached state until the next try");
                continue;
            }
            Err(_) => continue,
        };
        server.cache.maintain(&present);
        server.pod_limits.retain(&present);
        for (namespace, pod) in server.stats.retain(&present) {
            server.metrics.forget_pod(&namespace, &pod);
        }
        return_freed_memory();
    }
}

/// Waits for the attach point to exist (kubelet creates kubepods.slice), reporting not ready
/// with the reason meanwhile.
async fn wait_for_cgroup_root(root: &std::path::Path, wait: std::time::Duration, readiness: &Readiness) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    while !root.exists() {
        if started.elapsed() >= wait {
            anyhow::bail!("cgroup root {} does not exist (waited {wait:?}); check --cgroup-root", root.display());
        }
        readiness.not_ready(format!("waiting for cgroup root {} to appear", root.display()));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    readiness.not_ready("kernel programs not attached yet");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    Ok(())
}

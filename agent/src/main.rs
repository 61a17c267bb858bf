//! pod-identity-agent: hands EKS Pod Identity credentials to the pods of one node.
//!
//! The daemon's rooms: `kernel` (load and attach the eBPF programs, read their records),
//! `attribution` (cgroup id -> pod), `token` (service-account token claims), `upstream` (what a
//! credential source is to the cache), `source` (the one the daemon runs with: `eks_auth`, or
//! `sts` with its own token verification and associations), `aws` (the SDK configuration
//! everything shares), `credentials` and `cache` (wire format and cache), `server` (the
//! credential endpoint), `ops` and `metrics` (probes and Prometheus), `config` (flags and
//! defaults). The operator's commands (`pods`, `associations`, `doctor`)
//! live in `operator`, which reads the daemon's rooms and is never read by them.

#[cfg(feature = "count-allocations")]
mod alloc_count;
mod attribution;
mod aws;
mod cache;
mod config;
mod connlimit;
mod credentials;
mod eks_auth;
mod kernel;
mod link;
mod metrics;
mod operator;
mod ops;
mod ratelimit;
mod request;
mod server;
mod source;
mod stats;
mod sts;
mod token;
mod upstream;

use std::{
    collections::HashSet,
    process::ExitCode,
    sync::{Arc, OnceLock},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use http::StatusCode;
use tokio::{net::TcpSocket, signal::unix::SignalKind, sync::watch};
use tracing::{debug, error, info, warn};

use crate::{
    attribution::CgroupIndex,
    cache::CredentialCache,
    config::{LogFormat, Mode, RunArgs, Settings, SourceSettings},
    eks_auth::{EksAuth, EksAuthOptions},
    kernel::{Attachment, RedirectSpec, Redirector},
    metrics::{Live, Metrics},
    ops::{AgentInfo, Readiness},
    ratelimit::{PodRateLimits, UpstreamLimiter},
    server::CredentialServer,
    source::CredentialSource,
    stats::PodStatsRegistry,
    sts::{Sts, StsOptions},
};

/// How often the cache and per-pod state are checked against the pods that exist (a deleted
/// pod's state is gone within this) and refreshes that are due are started.
const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Parser, Debug)]
#[command(
    name = "pod-identity-agent",
    version,
    about = "Serves EKS Pod Identity credentials to pods through an eBPF redirect"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent: attach the kernel programs and serve credentials.
    Run(RunArgs),
    /// Show per-pod statistics of a running agent (reads /v1/pods on its probe address).
    Pods(operator::pods::PodsArgs),
    /// List the cluster's pod identity associations (EKS API), join a node's pods to them, or
    /// create and delete them.
    Associations(operator::associations::AssociationsArgs),
    /// Check this node's set-up end to end: cgroups, kernel programs, the running agent, node
    /// credentials, EKS Auth, the cluster.
    Doctor(operator::doctor::DoctorArgs),
    /// Remove what `run --pin DIR` left pinned (detaches the programs): for uninstalling.
    Cleanup {
        /// The directory given to `run --pin`.
        #[arg(long)]
        pin: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, result) = match cli.command {
        Command::Run(args) => return run_daemon(args),
        Command::Pods(args) => (
            "pods",
            operator::pods::run(&args).map(|()| ExitCode::SUCCESS),
        ),
        Command::Associations(args) => ("associations", operator::associations::run(args)),
        Command::Doctor(args) => ("doctor", operator::doctor::run(args)),
        Command::Cleanup { pin } => (
            "cleanup",
            kernel::cleanup(&pin).map(|n| {
                println!("removed {n} pinned objects from {}", pin.display());
                ExitCode::SUCCESS
            }),
        ),
    };
    result.unwrap_or_else(|e| {
        eprintln!("pod-identity-agent {name}: {e:#}");
        ExitCode::FAILURE
    })
}

fn run_daemon(args: RunArgs) -> ExitCode {
    init_logging(args.log_format, &args.log_level);
    limit_malloc_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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

async fn run(settings: Settings) -> anyhow::Result<()> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let readiness = Readiness::new("kernel programs not attached yet");
    let metrics = Metrics::new(settings.metrics_per_pod, settings.cache.max_entries);
    let stats = Arc::new(PodStatsRegistry::default());
    let info = Arc::new(OnceLock::new());
    let serving: Arc<OnceLock<Arc<CredentialServer>>> = Arc::new(OnceLock::new());

    // Probes and metrics first, so a kubelet and Prometheus see "alive, not ready" while the
    // programs load or the cgroup root is awaited.
    ops::serve(
        settings.probe_addr,
        ops::probes(readiness.clone(), stats.clone(), info.clone()),
        shutdown_rx.clone(),
    )
    .await
    .with_context(|| format!("binding the probe address {}", settings.probe_addr))?;
    let metrics_handler: ops::Handler = {
        let (serving, metrics, readiness) = (serving.clone(), metrics.clone(), readiness.clone());
        Arc::new(move |path| match path {
            "/metrics" => {
                let live = serving.get().map(|server: &Arc<CredentialServer>| Live {
                    redirects: server.redirector.as_ref().map(|r| r.counts()),
                    cache_entries: server.cache.len(),
                    cache: server.cache.stats(),
                    open_connections: server.connection_limits.open(),
                });
                (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.render(readiness.is_ready(), live),
                )
            }
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        })
    };
    ops::serve(settings.metrics_addr, metrics_handler, shutdown_rx.clone())
        .await
        .with_context(|| format!("binding the metrics address {}", settings.metrics_addr))?;

    kernel::raise_memlock_limit();
    // cgroup v2 is where the programs attach and how callers are attributed. A node without it
    // (cgroup v1: Amazon Linux 2 unless booted with systemd.unified_cgroup_hierarchy=1) can
    // only be served in link mode.
    let cgroup2 = attribution::cgroup2_mount(settings.cgroup_root.as_deref()).and_then(|mount| {
        let (own, id) = attribution::own_cgroup(&mount)?;
        let root = settings
            .cgroup_root
            .clone()
            .unwrap_or_else(|| mount.clone());
        anyhow::Ok(Cgroup2 {
            mount,
            root,
            own,
            id,
        })
    });
    let Interception {
        redirector,
        listeners,
        mode,
        note,
    } = intercept(&settings, cgroup2.as_ref(), &readiness).await?;
    // Start-up milestones, so a slow start shows where its time went.
    debug!(mode, "interception in place");
    metrics.set_mode(mode);
    let cgroups = match &cgroup2 {
        Ok(c) => Some(match CgroupIndex::build(&c.mount, &c.root) {
            Ok(index) => index,
            // In link mode the index only tells which pods still exist; the whole hierarchy will
            // do when the configured root is what made eBPF mode impossible.
            Err(e) if redirector.is_none() => {
                warn!(error = %e, root = %c.root.display(), "cannot index the cgroup root; indexing the whole cgroup2 hierarchy");
                CgroupIndex::build(&c.mount, &c.mount)
                    .with_context(|| format!("indexing cgroups below {}", c.mount.display()))?
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("indexing cgroups below {}", c.root.display())));
            }
        }),
        Err(e) => {
            warn!(
                "{e:#}: deleted pods are not noticed; their cached credentials expire or age out (--max-cache-entries)"
            );
            None
        }
    };
    debug!(
        cgroups = cgroups.as_ref().map(CgroupIndex::len),
        pods = cgroups.as_ref().map(CgroupIndex::pods),
        "cgroup index built"
    );
    let upstream = match &settings.source {
        SourceSettings::EksAuth => CredentialSource::EksAuth(
            EksAuth::new(EksAuthOptions {
                cluster_name: settings.cluster_name.clone(),
                region: settings.region.clone(),
                endpoint: settings.eks_auth_endpoint.clone(),
                fips: settings.fips,
                node_name: settings.node_name.clone(),
            })
            .await?,
        ),
        SourceSettings::Sts {
            associations_file,
            keys,
            issuer,
            audience,
            cluster_arn,
        } => CredentialSource::Sts(Box::new(
            Sts::new(StsOptions {
                cluster_name: settings.cluster_name.clone(),
                cluster_arn: cluster_arn.clone(),
                region: settings.region.clone(),
                fips: settings.fips,
                node_name: settings.node_name.clone(),
                associations_file: associations_file.clone(),
                keys: keys.clone(),
                issuer: issuer.clone(),
                audience: audience.clone(),
            })
            .await?,
        )),
    };
    let region = upstream.region().await;
    debug!(region, "credential source configured");
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
        connection_limits: connlimit::ConnectionLimits::new(
            settings.max_connections,
            settings.max_connections_per_pod,
        ),
        stats,
        metrics: metrics.clone(),
        allowed_hosts: request::allowed_hosts(&settings.intercept),
        pods: Default::default(),
    });

    let _ = serving.set(server.clone());

    let listen_addrs: Vec<_> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    // Listening only now: a socket that listens gets a share of the port's connections, and this
    // agent can serve them from here on.
    let listeners = listeners
        .into_iter()
        .zip(&listen_addrs)
        .map(|(socket, addr)| {
            socket
                .listen(1024)
                .with_context(|| format!("listening on {addr}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let maintenance = tokio::spawn(maintain(server.clone()));
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let mut accept_loops = Vec::new();
    for listener in listeners {
        accept_loops.push(tokio::spawn(server.clone().serve(
            listener,
            shutdown_rx.clone(),
            graceful.clone(),
        )));
    }
    let _ = info.set(AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: mode.to_owned(),
        cluster_name: settings.cluster_name.clone(),
        credential_source: match settings.source {
            SourceSettings::EksAuth => "eks-auth",
            SourceSettings::Sts { .. } => "sts",
        }
        .to_owned(),
        region,
        eks_auth_endpoint: settings.eks_auth_endpoint.clone(),
        fips: settings.fips,
        listen: listen_addrs.clone(),
        intercept: settings.intercept.clone(),
        cgroup_root: cgroup2.as_ref().ok().map(|c| c.root.clone()),
        cgroup_id: cgroup2.as_ref().ok().map(|c| c.id),
        metrics_addr: settings.metrics_addr,
        pin: settings.pin.clone(),
    });
    // Logged before readiness flips, so whoever sees /readyz answer 200 also finds this line in
    // the log (tests read it right after readiness; so does an operator tailing the pod).
    info!(
        mode,
        note = %note,
        attachment = ?redirector.as_ref().map(|r| r.attachment),
        listen = ?listen_addrs,
        target_v4 = ?settings.target_v4,
        target_v6 = ?settings.target_v6,
        intercept = ?settings.intercept,
        cgroup_root = ?cgroup2.as_ref().ok().map(|c| c.root.display()),
        own_cgroup = ?cgroup2.as_ref().ok().map(|c| c.own.display()),
        "serving credentials"
    );
    readiness.ready(note);

    wait_for_signal().await?;
    info!("shutting down: no new connections; finishing in-flight requests");
    readiness.not_ready("shutting down");
    let _ = shutdown_tx.send(true);
    maintenance.abort();
    let _ = maintenance.await;
    for handle in accept_loops {
        let _ = handle.await;
    }
    let graceful = Arc::try_unwrap(graceful)
        .map_err(|_| anyhow::anyhow!("accept loops still hold the connection tracker"))?;
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(grace = ?settings.shutdown_grace, "connections still open after the grace period; closing them");
    }
    drop(server);
    match redirector.map(Arc::try_unwrap) {
        // Dropping the last handle closes owned links: the kernel detaches the programs.
        Some(Ok(redirector)) if redirector.attachment == Attachment::Owned => drop(redirector),
        Some(Ok(_)) => {
            info!(pin = ?settings.pin, "programs stay attached through their pinned links for the next agent")
        }
        Some(Err(_)) => {
            warn!("kernel programs still referenced at exit; they detach when the process ends")
        }
        None => {}
    }
    info!("stopped");
    Ok(())
}

/// The cgroup2 hierarchy as this agent sees it.
struct Cgroup2 {
    mount: std::path::PathBuf,
    /// Where the programs attach (`--cgroup-root`, else the mount).
    root: std::path::PathBuf,
    /// The agent's own cgroup, and its id: its connects are never redirected.
    own: std::path::PathBuf,
    id: u64,
}

/// How pods' connections reach this agent.
struct Interception {
    redirector: Option<Arc<Redirector>>,
    /// Bound, not yet listening.
    listeners: Vec<TcpSocket>,
    mode: &'static str,
    /// Shown in /readyz and the start-up log.
    note: String,
}

/// eBPF interception, or link mode: as `--mode` says, `auto` falling back with the reason.
async fn intercept(
    settings: &Settings,
    cgroup2: Result<&Cgroup2, &anyhow::Error>,
    readiness: &Readiness,
) -> anyhow::Result<Interception> {
    if settings.mode != Mode::Link {
        let attempt = async {
            let cgroup2 = cgroup2.map_err(|e| {
                anyhow::anyhow!("{e:#}: eBPF mode attributes callers by their cgroup v2 and attaches its programs there (cgroup v1 nodes, such as Amazon Linux 2 by default, have none)")
            })?;
            let listeners = bind_all(&settings.listen)?;
            wait_for_cgroup_root(&cgroup2.root, settings.cgroup_root_wait, readiness).await?;
            let redirector = Redirector::attach(&RedirectSpec {
                cgroup_root: cgroup2.root.clone(),
                intercept: settings.intercept.clone(),
                target_v4: settings.target_v4,
                target_v6: settings.target_v6,
                agent_cgroup_id: cgroup2.id,
                pin: settings.pin.clone(),
            })?;
            anyhow::Ok((listeners, redirector))
        }
        .await;
        let fallback_reason = match attempt {
            Ok((listeners, redirector)) => {
                return Ok(Interception {
                    redirector: Some(Arc::new(redirector)),
                    listeners,
                    mode: "ebpf",
                    note: String::new(),
                });
            }
            Err(e) if settings.mode == Mode::Ebpf => {
                return Err(e.context("cannot intercept pods' connections"));
            }
            Err(e) => {
                warn!("eBPF interception unavailable, falling back to link mode: {e:#}");
                Some(e.to_string())
            }
        };
        return link_mode(settings, fallback_reason);
    }
    link_mode(settings, None)
}

/// Link mode: the credential addresses on a local interface. `fallback_reason` says why eBPF
/// mode was not possible, when `auto` fell back.
fn link_mode(settings: &Settings, fallback_reason: Option<String>) -> anyhow::Result<Interception> {
    let addresses: Vec<_> = settings.intercept.iter().map(|a| a.ip()).collect();
    let link = link::ensure(&addresses)?;
    let on_link: Vec<_> = settings
        .intercept
        .iter()
        .copied()
        .filter(|a| link.addresses.contains(&a.ip()))
        .collect();
    let listeners = bind_all(&on_link)?;
    warn!(device = %link.device, addresses = ?link.addresses, "link mode: callers are not attributed to pods; requests are checked by their token alone");
    Ok(Interception {
        redirector: None,
        listeners,
        mode: "link",
        note: match fallback_reason {
            Some(reason) => format!(
                "link mode on {}: callers are not attributed; token-only checks; eBPF mode unavailable: {reason}",
                link.device
            ),
            None => format!(
                "link mode on {}: callers are not attributed; token-only checks",
                link.device
            ),
        },
    })
}

/// The credential listeners' sockets, shared with an agent starting beside this one during a
/// roll; bound, not listening yet.
fn bind_all(addrs: &[std::net::SocketAddr]) -> anyhow::Result<Vec<TcpSocket>> {
    addrs
        .iter()
        .map(|addr| {
            ops::shared_socket(*addr)
                .with_context(|| format!("binding the credential listener {addr}"))
        })
        .collect()
}

/// glibc gives each thread that allocates its own arena, and keeps freed memory in them: bursts
/// of connections on several runtime and blocking threads then leave the resident set high.
/// Two arenas suffice for a service on a few threads; trimming returns freed pages.
/// (musl, the static aarch64 build: one allocator state, which returns freed pages itself.)
fn limit_malloc_arenas() {
    // SAFETY: mallopt before any other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2)
    };
}

fn return_freed_memory() {
    // SAFETY: malloc_trim has no preconditions.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0)
    };
}

/// Drops the state of pods that are gone and starts refreshes that are due, every
/// [`MAINTENANCE_INTERVAL`].
async fn maintain(server: Arc<CredentialServer>) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let walker = server.clone();
        let known = server.pod_uids();
        // Without a cgroup index (link mode) no pod is known to be gone.
        let gone = match tokio::task::spawn_blocking(move || {
            walker
                .cgroups
                .as_ref()
                .map(|index| index.gone(&known))
                .transpose()
        })
        .await
        {
            Ok(Ok(gone)) => gone.unwrap_or_default(),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot walk the cgroup tree; keeping every pod's state until the next try");
                HashSet::new()
            }
            Err(_) => HashSet::new(),
        };
        server.cache.maintain(&gone);
        server.forget_gone_pods(&gone);
        return_freed_memory();
    }
}

/// Waits for the attach point to exist (kubelet creates kubepods.slice), reporting not ready
/// with the reason meanwhile.
async fn wait_for_cgroup_root(
    root: &std::path::Path,
    wait: std::time::Duration,
    readiness: &Readiness,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    while !root.exists() {
        if started.elapsed() >= wait {
            anyhow::bail!(
                "cgroup root {} does not exist (waited {wait:?}); check --cgroup-root",
                root.display()
            );
        }
        readiness.not_ready(format!(
            "waiting for cgroup root {} to appear",
            root.display()
        ));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    readiness.not_ready("kernel programs not attached yet");
    Ok(())
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

    fn parse(argv: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("pod-identity-agent").chain(argv.iter().copied()))
            .map(|cli| cli.command)
    }

    #[test]
    fn associations_take_cluster_flags_before_or_after_the_action() {
        for argv in [
            &[
                "associations",
                "--cluster-name",
                "prod",
                "create",
                "--namespace",
                "ns",
                "--service-account",
                "sa",
                "--role-arn",
                "arn:aws:iam::1:role/r",
            ][..],
            &[
                "associations",
                "create",
                "--namespace",
                "ns",
                "--service-account",
                "sa",
                "--role-arn",
                "arn:aws:iam::1:role/r",
                "--cluster-name",
                "prod",
            ][..],
        ] {
            match parse(argv).unwrap() {
                Command::Associations(a) => {
                    assert_eq!(a.cluster.cluster_name.as_deref(), Some("prod"), "{argv:?}");
                    assert!(
                        matches!(a.action, Some(operator::associations::Action::Create(ref c)) if c.namespace == "ns")
                    );
                }
                other => panic!("parsed {other:?}"),
            }
        }
        match parse(&[
            "associations",
            "--namespace",
            "ns",
            "--json",
            "--cluster-name",
            "prod",
        ])
        .unwrap()
        {
            Command::Associations(a) => {
                assert!(a.action.is_none() && a.json && a.namespace.as_deref() == Some("ns"))
            }
            other => panic!("parsed {other:?}"),
        }
        // Listing flags do not mix with an action.
        match parse(&["associations", "--json", "delete", "a-1"]).unwrap() {
            Command::Associations(a) => assert!(
                a.check()
                    .unwrap_err()
                    .to_string()
                    .contains("are for listing")
            ),
            other => panic!("parsed {other:?}"),
        }
    }
}

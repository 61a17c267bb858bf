//! The operator endpoints: probes (`/healthz`, `/readyz`, `/v1/pods`, `/v1/agent`) and
//! `/metrics`, each a small HTTP server on its own address, and the series that say what state
//! the agent is in (ready, mode, version).

pub mod listener;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
};

use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    metrics::{self, EncodeLabelSet, Family, Gauge, Registry},
    stats::PodStatsRegistry,
};

/// Whether the agent can do its job: `Ok(note)` when it can (the note qualifies how, e.g. link
/// mode), `Err(reason)` when it cannot.
pub struct Readiness(Mutex<Result<String, String>>);

impl Readiness {
    pub fn new(reason: &str) -> Arc<Readiness> {
        Arc::new(Readiness(Mutex::new(Err(reason.to_owned()))))
    }

    pub fn not_ready(&self, reason: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Err(reason.into());
    }

    pub fn ready(&self, note: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Ok(note.into());
    }

    fn state(&self) -> Result<String, String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_ready(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_ok()
    }
}

/// What a running agent says about itself at `/v1/agent` (probe address): how it was started and
/// what it resolved, so `doctor` needs no flags.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentInfo {
    pub version: String,
    /// `ebpf` or `link`.
    pub mode: String,
    pub cluster_name: String,
    /// `eks-auth` or `sts` (`--credential-source`).
    #[serde(default = "eks_auth")]
    pub credential_source: String,
    /// The region EKS Auth calls are signed for.
    pub region: Option<String>,
    /// `--eks-auth-endpoint`, when given.
    pub eks_auth_endpoint: Option<String>,
    pub fips: bool,
    /// The credential listeners' sockets: the intercepted addresses themselves in link mode;
    /// private loopback sockets in eBPF mode, which the kernel hands redirected connections.
    pub listen: Vec<SocketAddr>,
    /// eBPF mode: the addresses the agent serves, where pods' connects are redirected; nothing
    /// binds them.
    #[serde(default)]
    pub serve: Vec<SocketAddr>,
    /// Credential addresses whose connects are redirected (eBPF mode) or served (link mode).
    pub intercept: Vec<SocketAddr>,
    /// `None` on a node without cgroup v2 (link mode).
    pub cgroup_root: Option<PathBuf>,
    /// The agent's own cgroup id: its connects are never redirected.
    pub cgroup_id: Option<u64>,
    pub metrics_addr: SocketAddr,
    pub pin: Option<PathBuf>,
    /// eBPF mode: the kernel's id of each of the agent's programs, by name, so the doctor can
    /// find this agent's attachments.
    #[serde(default)]
    pub programs: BTreeMap<String, u32>,
    /// The IMDS guard: `off`, `audit`, `deny`, or why there is none.
    #[serde(default)]
    pub imds: String,
    /// sts mode: the associations file the agent reads (`doctor` reads it too).
    #[serde(default)]
    pub associations_file: Option<PathBuf>,
}

fn eks_auth() -> String {
    "eks-auth".to_owned()
}

pub type Handler = Arc<dyn Fn(&str) -> (StatusCode, &'static str, String) + Send + Sync>;

/// A socket bound with SO_REUSEPORT: during a surge roll two agents run on a node
/// (hostNetwork) and share every port, the credential listeners and the probes alike. It joins
/// the port's group of listeners, and gets a share of its connections, only once it listens: an
/// agent binds early (a conflict fails fast) and listens when it is ready to accept.
pub fn shared_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Serves `handler` (path -> status, content type, body) on `addr` until `shutdown` flips, with
/// the bounds of [`listener`].
pub async fn serve(
    addr: SocketAddr,
    handler: Handler,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = shared_socket(addr)?.listen(128)?;
    tokio::spawn(listener::accept_loop(listener, addr, handler, shutdown));
    Ok(())
}

/// `/healthz`: the process serves. `/readyz`: it can do its job, else 503 with the reason.
/// `/v1/pods`: per-pod statistics as JSON (the probe address is loopback by default).
/// `/v1/agent`: [`AgentInfo`], once the agent has started.
pub fn probes(
    readiness: Arc<Readiness>,
    stats: Arc<PodStatsRegistry>,
    info: Arc<OnceLock<AgentInfo>>,
) -> Handler {
    Arc::new(move |path| match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match readiness.state() {
            Ok(note) if note.is_empty() => (StatusCode::OK, "text/plain", "ready\n".into()),
            Ok(note) => (StatusCode::OK, "text/plain", format!("ready ({note})\n")),
            Err(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
        "/v1/pods" => {
            let body = serde_json::to_string(&stats.snapshot()).expect("stats serialise");
            (StatusCode::OK, "application/json", body)
        }
        "/v1/agent" => match info.get() {
            Some(info) => (
                StatusCode::OK,
                "application/json",
                serde_json::to_string(info).expect("agent info serialises"),
            ),
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "starting\n".into(),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

/// `/metrics`: everything registered in `registry`, rendered at each scrape.
pub fn metrics_endpoint(registry: Arc<Registry>) -> Handler {
    Arc::new(move |path| match path {
        "/metrics" => (
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::render(&registry),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The agent's state in the metrics: `ready` (read from `readiness` at each scrape), `mode` and
/// `build_info`. Served from start, so a scrape while the agent waits says so.
#[derive(Clone)]
pub struct StateMetrics {
    mode: Family<ModeLabels, Gauge>,
}

impl StateMetrics {
    pub fn register(registry: &mut Registry, readiness: &Arc<Readiness>) -> StateMetrics {
        let ready = readiness.clone();
        metrics::register_sampled_gauge(
            registry,
            "ready",
            "1 when /readyz answers ready, else 0 (starting, waiting for the cgroup root, shutting down)",
            move || i64::from(ready.is_ready()),
        );
        let mode = Family::<ModeLabels, Gauge>::default();
        registry.register(
            "mode",
            "How pods reach the agent: 1 for the active mode, ebpf (attributed) or link (token-only checks)",
            mode.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Version of the running agent (value is always 1)",
            build,
        );
        StateMetrics { mode }
    }

    /// How pods reach the agent, once decided: `ebpf` or `link`.
    pub fn set_mode(&self, mode: &'static str) {
        self.mode.get_or_create(&ModeLabels { mode }).set(1);
    }
}

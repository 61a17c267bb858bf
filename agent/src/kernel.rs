//! Loads the kernel programs (agent-ebpf), configures them, attaches them at the cgroup root, and
//! answers "who opened this accepted connection?".
//!
//! The programs are attached as bpf links owned by this process: when the [`Redirector`] is
//! dropped, or the process dies, the kernel detaches them.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps},
};
use pod_identity_common::{
    Attribution, ConnectionKey, Endpoint, RedirectConfig,
    counter::{REDIRECTED_V4, REDIRECTED_V6},
    names,
};
use tokio::io::unix::AsyncFd;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pod-identity-ebpf"));

/// What to intercept and where to send it.
#[derive(Clone, Debug)]
pub struct RedirectSpec {
    /// The cgroup2 directory the programs attach to; it and every cgroup below it are covered.
    pub cgroup_root: PathBuf,
    pub intercept: Vec<SocketAddr>,
    pub target_v4: Option<SocketAddr>,
    pub target_v6: Option<SocketAddr>,
    /// Connects from this cgroup (the agent's own) are never redirected.
    pub agent_cgroup_id: u64,
}

/// Connects redirected by the kernel since the programs were attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectCounts {
    pub v4: u64,
    pub v6: u64,
}

pub struct Redirector {
    /// Owns the programs and their links; dropping it detaches everything.
    _ebpf: Ebpf,
    connections: Mutex<BpfHashMap<MapData, ConnectionKey, Attribution>>,
    counts: PerCpuArray<MapData, u64>,
    _logger: tokio::task::JoinHandle<()>,
}

pub fn endpoint(addr: SocketAddr) -> Endpoint {
    let port = addr.port().to_be_bytes();
    match addr.ip() {
        IpAddr::V4(ip) => Endpoint::v4(ip.octets(), port),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            // Keep one canonical form: IPv4 peers on a dual-stack socket look like IPv4 peers.
            Some(v4) => Endpoint::v4(v4.octets(), port),
            None => Endpoint { addr: ip.octets(), port },
        },
    }
}

impl Redirector {
    /// Loads, configures and attaches the programs. Must run inside a tokio runtime (the kernel
    /// log reader is a task).
    pub fn attach(spec: &RedirectSpec) -> anyhow::Result<Redirector> {
        let config = RedirectConfig {
            target_v4: spec.target_v4.map_or(Endpoint::NONE, endpoint),
            target_v6: spec.target_v6.map_or(Endpoint::NONE, endpoint),
            _pad: [0; 4],
            agent_cgroup_id: spec.agent_cgroup_id,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global(names::CONFIG, &config, true)
            .load(OBJECT)
            .map_err(|e| explain(anyhow::Error::new(e).context("loading the kernel object")))?;
        // The log reader must exist before the programs load (they reference its ring buffer).
        let logger = aya_log::EbpfLogger::init(&mut ebpf).context("starting the kernel log reader")?;
        let logger = tokio::spawn(forward_kernel_logs(logger));

        let mut intercepted: BpfHashMap<_, Endpoint, u8> =
            BpfHashMap::try_from(ebpf.map_mut(names::INTERCEPTED).context("INTERCEPTED map missing")?)?;
        for addr in &spec.intercept {
            intercepted.insert(endpoint(*addr), 1, 0).context("filling the intercept map")?;
        }

        let cgroup = File::open(&spec.cgroup_root).map_err(|e| {
            anyhow::anyhow!("cannot open cgroup root {}: {e} (it must be a directory in the cgroup2 hierarchy)", spec.cgroup_root.display())
        })?;
        // sock_ops first: once connect4/6 redirect, every redirected connection gets its record.
        let sock_ops: &mut SockOps = program(&mut ebpf, names::SOCK_OPS)?;
        sock_ops.load().map_err(|e| explain(anyhow::Error::new(e).context("loading the sock_ops program")))?;
        sock_ops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| explain(anyhow::Error::new(e).context(attach_context(names::SOCK_OPS, &spec.cgroup_root))))?;
        for name in [names::CONNECT4, names::CONNECT6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| explain(anyhow::Error::new(e).context(format!("loading the {name} program"))))?;
            prog.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|e| explain(anyhow::Error::new(e).context(attach_context(name, &spec.cgroup_root))))?;
        }

        let connections = BpfHashMap::try_from(ebpf.take_map(names::CONNECTIONS).context("CONNECTIONS map missing")?)?;
        let counts = PerCpuArray::try_from(ebpf.take_map(names::REDIRECT_COUNTS).context("REDIRECT_COUNTS map missing")?)?;
        Ok(Redirector { _ebpf: ebpf, connections: Mutex::new(connections), counts, _logger: logger })
    }

    /// The attribution of an accepted connection, removed from the kernel map: each record is
    /// read exactly once. `None` when the connection did not come through the redirect.
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<Attribution> {
        let key = ConnectionKey { client: endpoint(peer), server: endpoint(local) };
        let mut map = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let found = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(found)
    }

    pub fn counts(&self) -> RedirectCounts {
        let sum = |i: u32| self.counts.get(&i, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0);
        RedirectCounts { v4: sum(REDIRECTED_V4), v6: sum(REDIRECTED_V6) }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).with_context(|| format!("program {name} missing from the kernel object"))?;
    Ok(prog.try_into()?)
}

fn attach_context(name: &str, root: &Path) -> String {
    format!("attaching {name} to {}", root.display())
}

/// Adds the likely cause to an error from the kernel, from the errno deepest in the chain.
fn explain(err: anyhow::Error) -> anyhow::Error {
    let errno = err.chain().find_map(|e| e.downcast_ref::<io::Error>()).and_then(io::Error::raw_os_error);
    let hint = match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "permission denied: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN), i.e. run it privileged or as root"
        }
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
            "the kernel rejected the program or attachment: it needs Linux >= 5.7 with cgroup v2 BPF (cgroup/connect4, connect6, sock_ops) and bpf links"
        }
        Some(libc::ENOENT) => "not found: is the kernel built with CONFIG_CGROUP_BPF and is the path a cgroup2 directory?",
        Some(libc::EBADF) => "the cgroup root is not a cgroup2 directory",
        _ => return err,
    };
    err.context(hint.to_string())
}

/// Forwards records written by the kernel programs (aya-log) to the agent's log.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, until the
    // AsyncFd (which owns the logger) is dropped.
    let Ok(mut fd) = (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

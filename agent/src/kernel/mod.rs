//! Loads the kernel programs (agent-ebpf), configures them, attaches them (the connect and
//! sock_ops programs at the cgroup root, `steer` in the node's network namespace), hands them the
//! agent's listening sockets, and answers "who opened this accepted connection?".
//!
//! Without a pin directory the programs are attached as bpf links owned by this process: when the
//! [`Redirector`] is dropped, or the process dies, the kernel detaches them.
//!
//! With a pin directory (`--pin`, on a bpffs) the links and the shared maps are pinned there
//! (`pins`) and outlive the process. The next agent of the same layout reuses the maps and swaps
//! its programs into the pinned links atomically (`BPF_LINK_UPDATE`), so interception never stops
//! across a restart; while no agent runs, `steer` refuses redirected connections rather than hand
//! them to whatever binds the target. `pod-identity-agent cleanup --pin DIR` removes them for good.

mod bpf_sys;
mod diagnose;
mod install;
pub mod metrics;
mod pins;

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuHashMap, SockMap},
    programs::{CgroupSockAddr, SkLookup, SockOps},
};
use pod_identity_common::{
    Attribution, ConnectionKey, Endpoint, ImdsCount, RedirectConfig,
    counter::{NO_AGENT, REDIRECTED_V4, REDIRECTED_V6, STEERED},
    intercept, listener, names,
};
use tokio::{io::unix::AsyncFd, net::TcpListener};

pub use self::diagnose::attached;
use self::{
    diagnose::explain,
    install::{Target, install},
    pins::PinDir,
};
use crate::config::ImdsMode;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pod-identity-ebpf"));

/// The network namespace `steer` attaches to: the agent's own, which is the node's (the
/// DaemonSet runs with hostNetwork).
const OWN_NETNS: &str = "/proc/self/ns/net";

/// What to intercept and where to send it.
#[derive(Clone, Debug)]
pub struct RedirectSpec {
    /// The cgroup2 directory the programs attach to; it and every cgroup below it are covered.
    pub cgroup_root: PathBuf,
    pub intercept: Vec<SocketAddr>,
    pub target_v4: Option<SocketAddr>,
    pub target_v6: Option<SocketAddr>,
    /// The addresses the agent serves: redirected connections to them go to its own sockets.
    pub serve: Vec<SocketAddr>,
    /// Connects from this cgroup (the agent's own) are never redirected.
    pub agent_cgroup_id: u64,
    /// Pin links and maps here (a bpffs directory) so they outlive this process.
    pub pin: Option<PathBuf>,
    /// The IMDS guard: what the connect programs do with connects to IMDS.
    pub imds: ImdsMode,
}

/// The instance metadata service's addresses (IPv4, which also matches its v4-mapped form, and
/// IPv6 on Nitro instances).
pub const IMDS_ADDRESSES: [SocketAddr; 2] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80),
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
        80,
    ),
];

/// How the programs got attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Links owned by this process; detached at exit.
    Owned,
    /// New links, pinned.
    Pinned,
    /// Pinned links of a previous agent, now running this agent's programs.
    TakenOver,
}

/// Maps that are pinned with `--pin`, so records survive a handover between agents. The
/// listening sockets are each agent's own (`LISTENERS` is not shared).
const PINNED_MAPS: [&str; 6] = [
    names::INTERCEPTED,
    names::PENDING,
    names::CONNECTIONS,
    names::REDIRECT_COUNTS,
    names::NODE_NETNS,
    names::IMDS_CALLERS,
];

/// What the kernel programs counted since they were attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectCounts {
    /// Connects redirected, per family.
    pub v4: u64,
    pub v6: u64,
    /// Redirected connections handed to the agent's socket.
    pub steered: u64,
    /// Redirected connections refused while no agent socket was there.
    pub no_agent: u64,
}

pub struct Redirector {
    /// Owns the programs and their links; dropping it detaches everything not pinned.
    ebpf: Ebpf,
    pub attachment: Attachment,
    /// Pinned objects of another layout that this agent detached, for the log and /readyz.
    pub detached: Vec<PathBuf>,
    /// 4-tuple -> attribution, read with raw map commands (no lock: each is one syscall).
    connections: MapData,
    /// Whether the kernel has lookup-and-delete for hash maps (Linux >= 5.14); else a lookup
    /// and a delete.
    lookup_and_delete: AtomicBool,
    counts: PerCpuArray<MapData, u64>,
    /// cgroup id -> connects to IMDS, taken (read and deleted) by the agent.
    /// Read and emptied by the maintenance pass alone; the lock is for `remove`'s `&mut`.
    imds_callers: std::sync::Mutex<PerCpuHashMap<MapData, u64, ImdsCount>>,
    node_netns: Array<MapData, u64>,
    _logger: tokio::task::JoinHandle<()>,
}

/// A record older than this at accept cannot belong to the connection being accepted (a
/// connect waits seconds at most in the accept queue): it is refused as stale.
pub const MAX_RECORD_AGE: Duration = Duration::from_secs(30);

pub fn endpoint(addr: SocketAddr) -> Endpoint {
    let port = addr.port().to_be_bytes();
    match addr.ip() {
        IpAddr::V4(ip) => Endpoint::v4(ip.octets(), port),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            // Keep one canonical form: IPv4 peers on a dual-stack socket look like IPv4 peers.
            Some(v4) => Endpoint::v4(v4.octets(), port),
            None => Endpoint {
                addr: ip.octets(),
                port,
            },
        },
    }
}

/// The intercepted addresses' distinct ports for the programs' first check; all zero (no
/// filter) when there are more than it holds.
fn port_filter(intercept: &[SocketAddr]) -> [[u8; 2]; 4] {
    let mut ports: Vec<[u8; 2]> = intercept.iter().map(|a| a.port().to_be_bytes()).collect();
    ports.sort_unstable();
    ports.dedup();
    let mut filter = [[0u8; 2]; 4];
    if ports.len() <= filter.len() {
        filter[..ports.len()].copy_from_slice(&ports);
    }
    filter
}

impl Redirector {
    /// The kernel's id of each of the agent's programs, by name: what `BPF_PROG_QUERY` on the
    /// attach points shows, so the doctor can tell this agent's attachments from any other's.
    pub fn program_ids(&self) -> BTreeMap<String, u32> {
        [
            names::CONNECT4,
            names::CONNECT6,
            names::SOCK_OPS,
            names::SK_LOOKUP,
        ]
        .into_iter()
        .filter_map(|name| {
            let id = self.ebpf.program(name)?.info().ok()?.id();
            Some((name.to_owned(), id))
        })
        .collect()
    }

    /// Loads, configures and attaches the programs, handing `listeners` (the agent's own
    /// sockets, listening) the redirected connections from the moment the programs take over:
    /// a surge roll's new agent has them in place before its programs replace the old agent's.
    /// Must run inside a tokio runtime (the kernel log reader is a task).
    pub fn attach(spec: &RedirectSpec, listeners: &[TcpListener]) -> anyhow::Result<Redirector> {
        // Fail before attaching anything, rather than halfway (sock_ops in, connect4 refused).
        if let Some(in_the_way) = diagnose::exclusive_in_the_way(&spec.cgroup_root) {
            anyhow::bail!(
                "attaching the programs to {}: {in_the_way}",
                spec.cgroup_root.display()
            );
        }
        let pins = spec.pin.as_deref().map(PinDir::open).transpose()?;
        let config = redirect_config(spec);
        let mut ebpf = loader(&config, pins.as_ref()).load(OBJECT).map_err(|e| {
            explain(
                anyhow::Error::new(e).context("loading the kernel object"),
                None,
            )
        })?;
        // The log reader must exist before the programs load (they reference its ring buffer).
        let logger =
            aya_log::EbpfLogger::init(&mut ebpf).context("starting the kernel log reader")?;
        let logger = tokio::spawn(forward_kernel_logs(logger));
        fill_intercepted(&mut ebpf, &spec.intercept, spec.imds)?;
        fill_listeners(&mut ebpf, listeners)?;
        let cgroup = open_cgroup(&spec.cgroup_root)?;
        let netns = File::open(OWN_NETNS).with_context(|| format!("opening {OWN_NETNS}"))?;
        let sites = Sites {
            cgroup: Target {
                file: &cgroup,
                path: &spec.cgroup_root,
                cgroup: true,
            },
            netns: Target {
                file: &netns,
                path: Path::new(OWN_NETNS),
                cgroup: false,
            },
        };
        let attachment =
            load_and_attach(&mut ebpf, Some(&sites), pins.as_ref())?.unwrap_or(Attachment::Owned);
        // Only now, with this agent's programs in place, do the other layout's go.
        let detached = match (&pins, &spec.pin) {
            (Some(pins), Some(root)) if !pins.foreign.is_empty() => {
                pins::detach(root, &pins.foreign).with_context(|| {
                    format!("detaching the pinned objects under {}", root.display())
                })?;
                pins.foreign.clone()
            }
            _ => Vec::new(),
        };
        Redirector::from_loaded(ebpf, attachment, detached, logger)
    }

    fn from_loaded(
        mut ebpf: Ebpf,
        attachment: Attachment,
        detached: Vec<PathBuf>,
        logger: tokio::task::JoinHandle<()>,
    ) -> anyhow::Result<Redirector> {
        let connections = match ebpf
            .take_map(names::CONNECTIONS)
            .context("CONNECTIONS map missing")?
        {
            Map::LruHashMap(data) | Map::HashMap(data) => data,
            other => anyhow::bail!("CONNECTIONS is a {other:?}, not a hash map"),
        };
        let counts = PerCpuArray::try_from(
            ebpf.take_map(names::REDIRECT_COUNTS)
                .context("REDIRECT_COUNTS map missing")?,
        )?;
        let imds_callers = PerCpuHashMap::try_from(
            ebpf.take_map(names::IMDS_CALLERS)
                .context("IMDS_CALLERS map missing")?,
        )
        .context("IMDS_CALLERS is not a per-CPU hash map of cgroup ids")
        .map(std::sync::Mutex::new)?;
        let node_netns = Array::try_from(
            ebpf.take_map(names::NODE_NETNS)
                .context("NODE_NETNS map missing")?,
        )?;
        Ok(Redirector {
            ebpf,
            attachment,
            detached,
            connections,
            lookup_and_delete: AtomicBool::new(true),
            counts,
            imds_callers,
            node_netns,
            _logger: logger,
        })
    }

    /// Makes the programs learn the node's network namespace (`--imds deny` refuses IMDS
    /// connects from any other): a connect from the agent's own cgroup to a credential address,
    /// which they never redirect. It goes nowhere (nothing routes it, and it is given a
    /// millisecond); only the programs' look at it matters. Returns whether the namespace is now
    /// known.
    pub fn learn_node_netns(&self, credential_address: SocketAddr) -> bool {
        let _ = std::net::TcpStream::connect_timeout(&credential_address, Duration::from_millis(1));
        self.node_netns.get(&0, 0).is_ok_and(|cookie| cookie != 0)
    }

    /// The connects to IMDS the programs counted since the last call, per cgroup id, summed
    /// over the CPUs; each entry is deleted once read (a connect between the read and the
    /// delete is lost to the count).
    pub fn take_imds_callers(&self) -> Vec<(u64, ImdsCount)> {
        let mut map = self
            .imds_callers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let keys: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        keys.into_iter()
            .filter_map(|cgroup_id| {
                let per_cpu = map.get(&cgroup_id, 0).ok()?;
                let _ = map.remove(&cgroup_id);
                let sum = per_cpu
                    .iter()
                    .fold(ImdsCount::default(), |sum, c| ImdsCount {
                        connects: sum.connects + c.connects,
                        denied: sum.denied + c.denied,
                        last_ns: sum.last_ns.max(c.last_ns),
                    });
                Some((cgroup_id, sum))
            })
            .collect()
    }

    /// The attribution of an accepted connection, removed from the kernel map: each record is
    /// read exactly once. `None` when the connection did not come through the redirect.
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<Attribution> {
        let key = ConnectionKey {
            client: endpoint(peer),
            server: endpoint(local),
        };
        let map = self.connections.fd().as_fd();
        // SAFETY: Attribution is plain #[repr(C)] integers and bytes: all zeroes is a value.
        let mut found: Attribution = unsafe { std::mem::zeroed() };
        if self.lookup_and_delete.load(Ordering::Relaxed) {
            match bpf_sys::map_lookup_and_delete(map, &key, &mut found) {
                Ok(bpf_sys::Lookup::Found) => return Some(found),
                Ok(bpf_sys::Lookup::Missing) | Err(_) => return None,
                Ok(bpf_sys::Lookup::Unsupported) => {
                    tracing::info!(
                        "this kernel has no lookup-and-delete for hash maps (Linux < 5.14): two map commands per accepted connection"
                    );
                    self.lookup_and_delete.store(false, Ordering::Relaxed);
                }
            }
        }
        match bpf_sys::map_lookup(map, &key, &mut found) {
            Ok(bpf_sys::Lookup::Found) => {
                let _ = bpf_sys::map_delete(map, &key);
                Some(found)
            }
            _ => None,
        }
    }

    pub fn counts(&self) -> RedirectCounts {
        let sum = |i: u32| {
            self.counts
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        RedirectCounts {
            v4: sum(REDIRECTED_V4),
            v6: sum(REDIRECTED_V6),
            steered: sum(STEERED),
            no_agent: sum(NO_AGENT),
        }
    }
}

/// How old a record is: the kernel stamped it with `CLOCK_MONOTONIC` at `connect()`.
pub fn record_age(attribution: &Attribution) -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `now`, a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now_ns = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    Duration::from_nanos(now_ns.saturating_sub(attribution.created_ns))
}

/// What the programs are told at load time.
fn redirect_config(spec: &RedirectSpec) -> RedirectConfig {
    RedirectConfig {
        target_v4: spec.target_v4.map_or(Endpoint::NONE, endpoint),
        target_v6: spec.target_v6.map_or(Endpoint::NONE, endpoint),
        _pad: [0; 4],
        agent_cgroup_id: spec.agent_cgroup_id,
        intercept_ports: port_filter(&watched(spec)),
        serve_v4: spec
            .serve
            .iter()
            .find(|a| a.is_ipv4())
            .map_or(Endpoint::NONE, |a| endpoint(*a)),
        serve_v6: spec
            .serve
            .iter()
            .find(|a| a.is_ipv6())
            .map_or(Endpoint::NONE, |a| endpoint(*a)),
        _pad2: [0; 4],
    }
}

/// Every address the connect programs look at: the credential addresses, and IMDS's when the
/// guard is on.
fn watched(spec: &RedirectSpec) -> Vec<SocketAddr> {
    let mut addrs = spec.intercept.clone();
    if spec.imds != ImdsMode::Off {
        addrs.extend(IMDS_ADDRESSES);
    }
    addrs
}

/// A loader with the programs' configuration set and, with a pin directory, the shared maps'
/// pin paths.
fn loader<'a>(config: &'a RedirectConfig, pins: Option<&PinDir>) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader.override_global(names::CONFIG, config, true);
    if let Some(pins) = pins {
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pins.map(name));
        }
    }
    loader
}

/// The addresses the connect programs act on: the credential addresses (redirected), and the
/// IMDS addresses unless the guard is off. The map may be a previous agent's (pinned): what this
/// agent wants goes in first, then what it does not want (an IMDS entry when the guard is now
/// off) comes out, so the credential addresses are never missing.
fn fill_intercepted(
    ebpf: &mut Ebpf,
    intercept: &[SocketAddr],
    imds: ImdsMode,
) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(names::INTERCEPTED)
        .context("INTERCEPTED map missing")?;
    let mut intercepted: BpfHashMap<_, Endpoint, u8> = BpfHashMap::try_from(map)?;
    let imds_kind = match imds {
        ImdsMode::Off => None,
        ImdsMode::Audit => Some(intercept::IMDS_AUDIT),
        ImdsMode::Deny => Some(intercept::IMDS_DENY),
    };
    let wanted: Vec<(Endpoint, u8)> = intercept
        .iter()
        .map(|a| (endpoint(*a), intercept::CREDENTIALS))
        .chain(
            imds_kind
                .into_iter()
                .flat_map(|kind| IMDS_ADDRESSES.iter().map(move |a| (endpoint(*a), kind))),
        )
        .collect();
    for (endpoint, kind) in &wanted {
        intercepted
            .insert(endpoint, kind, 0)
            .context("filling the intercept map")?;
    }
    let unwanted: Vec<Endpoint> = intercepted
        .keys()
        .flatten()
        .filter(|k| !wanted.iter().any(|(w, _)| w == k))
        .collect();
    for key in unwanted {
        let _ = intercepted.remove(&key);
    }
    Ok(())
}

/// The agent's listening sockets, one per family's slot, where `steer` hands redirected
/// connections.
fn fill_listeners(ebpf: &mut Ebpf, listeners: &[TcpListener]) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(names::LISTENERS)
        .context("LISTENERS map missing")?;
    let mut map = SockMap::try_from(map)?;
    for listener in listeners {
        let local = listener.local_addr()?;
        let slot = if local.is_ipv4() {
            listener::V4
        } else {
            listener::V6
        };
        map.set(slot, listener, 0)
            .with_context(|| format!("handing {local} to the kernel's steering (LISTENERS)"))?;
    }
    Ok(())
}

/// Where the programs attach: the cgroup root, and the node's network namespace.
struct Sites<'a> {
    cgroup: Target<'a>,
    netns: Target<'a>,
}

/// Loads the programs and, given where, attaches them (sock_ops first: once connect4/6
/// redirect, every redirected connection gets its record; `steer` before the connect programs,
/// so a redirected connection always finds it). Returns how they were attached.
fn load_and_attach(
    ebpf: &mut Ebpf,
    sites: Option<&Sites<'_>>,
    pins: Option<&PinDir>,
) -> anyhow::Result<Option<Attachment>> {
    let loading = |name: &str| format!("loading the {name} program");
    let sock_ops: &mut SockOps = program(ebpf, names::SOCK_OPS)?;
    sock_ops
        .load()
        .map_err(|e| explain(anyhow::Error::new(e).context(loading("sock_ops")), None))?;
    if let Some(sites) = sites {
        install(sock_ops, names::SOCK_OPS, &sites.cgroup, pins)?;
    }
    let steer: &mut SkLookup = program(ebpf, names::SK_LOOKUP)?;
    steer.load().map_err(|e| {
        let e = anyhow::Error::new(e).context(loading("sk_lookup"));
        explain(e.context("the sk_lookup program needs Linux >= 5.9"), None)
    })?;
    if let Some(sites) = sites {
        install(steer, names::SK_LOOKUP, &sites.netns, pins)?;
    }
    let mut attachment = None;
    for name in [names::CONNECT4, names::CONNECT6] {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load()
            .map_err(|e| explain(anyhow::Error::new(e).context(loading(name)), None))?;
        if let Some(sites) = sites {
            attachment = Some(install(prog, name, &sites.cgroup, pins)?);
        }
    }
    Ok(attachment)
}

fn open_cgroup(path: &Path) -> anyhow::Result<File> {
    File::open(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot open cgroup root {}: {e} (it must be a directory in the cgroup2 hierarchy)",
            path.display()
        )
    })
}

/// Proves the kernel accepts the programs: loads them and, given a cgroup, attaches them there
/// (and `steer` to this process's network namespace), then detaches everything. Nothing is
/// redirected meanwhile (no address is intercepted, no target is set).
pub fn dry_run(cgroup: Option<&Path>) -> anyhow::Result<()> {
    let mut ebpf = EbpfLoader::new().load(OBJECT).map_err(|e| {
        explain(
            anyhow::Error::new(e).context("loading the kernel object"),
            None,
        )
    })?;
    // The programs reference the log ring buffer: its reader must exist while they load.
    let _logger = aya_log::EbpfLogger::init(&mut ebpf).context("starting the kernel log reader")?;
    let file = cgroup.map(open_cgroup).transpose()?;
    let netns = File::open(OWN_NETNS).with_context(|| format!("opening {OWN_NETNS}"))?;
    let sites = file.as_ref().zip(cgroup).map(|(file, path)| Sites {
        cgroup: Target {
            file,
            path,
            cgroup: true,
        },
        netns: Target {
            file: &netns,
            path: Path::new(OWN_NETNS),
            cgroup: false,
        },
    });
    load_and_attach(&mut ebpf, sites.as_ref(), None)?;
    // Dropping `ebpf` closes the links: the kernel detaches the programs.
    Ok(())
}

/// Removes what `--pin DIR` left (every layout's): for uninstalling.
pub fn cleanup(dir: &Path) -> anyhow::Result<usize> {
    pins::cleanup(dir)
}

/// Whether anything is pinned under `dir` (any layout): pinned links may still be redirecting
/// pods' connects, so the agent must not serve in link mode beside them.
pub fn pinned(dir: &Path) -> Vec<PathBuf> {
    pins::all(dir)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the cgroup.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot raise RLIMIT_MEMLOCK (fine on Linux >= 5.11)");
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the kernel object"))?;
    Ok(prog.try_into()?)
}

/// Forwards records written by the kernel programs (aya-log) to the agent's log.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged, until the
    // AsyncFd (which owns the logger) is dropped.
    let Ok(mut fd) =
        (unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) })
    else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_filter_lists_each_port_once_or_stands_aside() {
        let a: Vec<SocketAddr> = ["169.254.170.23:80", "[fd00:ec2::23]:80"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(port_filter(&a), [[0, 80], [0, 0], [0, 0], [0, 0]]);
        let many: Vec<SocketAddr> = (1..=5)
            .map(|p| SocketAddr::from(([169, 254, 170, 23], p)))
            .collect();
        assert_eq!(
            port_filter(&many),
            [[0, 0]; 4],
            "more ports than slots: no filter, the map decides"
        );
    }
}

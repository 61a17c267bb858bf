//! Loads the kernel programs (agent-ebpf), configures them, attaches them at the cgroup root, and
//! answers "who opened this accepted connection?".
//!
//! Without a pin directory the programs are attached as bpf links owned by this process: when the
//! [`Redirector`] is dropped, or the process dies, the kernel detaches them.
//!
//! With a pin directory (`--pin`, on a bpffs) the links and the maps are pinned there and
//! outlive the process. The next agent reuses the maps and swaps its programs into the pinned
//! links atomically (`BPF_LINK_UPDATE`), so interception never stops across a restart.
//! `pod-identity-agent cleanup --pin DIR` removes them for good.

use std::{
    fs::{self, File},
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramFd, SockOps, links::FdLink},
};
use pod_identity_common::{
    Attribution, ConnectionKey, Endpoint, RedirectConfig,
    counter::{REDIRECTED_V4, REDIRECTED_V6},
    names,
};
use tokio::io::unix::AsyncFd;

mod bpf_sys;
mod diagnose;
pub mod metrics;

use self::diagnose::{AttachSite, explain};

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
    /// Pin links and maps here (a bpffs directory) so they outlive this process.
    pub pin: Option<PathBuf>,
}

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

/// Maps that are pinned with `--pin`, so records survive a handover between agents.
const PINNED_MAPS: [&str; 4] = [
    names::INTERCEPTED,
    names::PENDING,
    names::CONNECTIONS,
    names::REDIRECT_COUNTS,
];

/// Connects redirected by the kernel since the programs were attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectCounts {
    pub v4: u64,
    pub v6: u64,
}

pub struct Redirector {
    /// Owns the programs and their links; dropping it detaches everything not pinned.
    _ebpf: Ebpf,
    pub attachment: Attachment,
    /// 4-tuple -> attribution, read with raw map commands (no lock: each is one syscall).
    connections: MapData,
    /// Whether the kernel has lookup-and-delete for hash maps (Linux >= 5.14); else a lookup
    /// and a delete.
    lookup_and_delete: AtomicBool,
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
    /// Loads, configures and attaches the programs. Must run inside a tokio runtime (the kernel
    /// log reader is a task).
    pub fn attach(spec: &RedirectSpec) -> anyhow::Result<Redirector> {
        // Fail before attaching anything, rather than halfway (sock_ops in, connect4 refused).
        if let Some(in_the_way) = diagnose::exclusive_in_the_way(&spec.cgroup_root) {
            anyhow::bail!(
                "{}: {in_the_way}",
                attach_context("the programs", &spec.cgroup_root)
            );
        }
        let config = redirect_config(spec);
        let mut loader = loader(spec, &config)?;
        let mut ebpf = loader.load(OBJECT).map_err(|e| {
            explain(
                anyhow::Error::new(e).context("loading the kernel object"),
                None,
            )
        })?;
        // The log reader must exist before the programs load (they reference its ring buffer).
        let logger =
            aya_log::EbpfLogger::init(&mut ebpf).context("starting the kernel log reader")?;
        let logger = tokio::spawn(forward_kernel_logs(logger));

        fill_intercepted(&mut ebpf, &spec.intercept)?;

        let cgroup = open_cgroup(&spec.cgroup_root)?;
        let attachment = load_and_attach(
            &mut ebpf,
            Some((&cgroup, &spec.cgroup_root)),
            spec.pin.as_deref(),
        )?
        .unwrap_or(Attachment::Owned);

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
        Ok(Redirector {
            _ebpf: ebpf,
            attachment,
            connections,
            lookup_and_delete: AtomicBool::new(true),
            counts,
            _logger: logger,
        })
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
        }
    }
}

/// What the programs are told at load time.
fn redirect_config(spec: &RedirectSpec) -> RedirectConfig {
    RedirectConfig {
        target_v4: spec.target_v4.map_or(Endpoint::NONE, endpoint),
        target_v6: spec.target_v6.map_or(Endpoint::NONE, endpoint),
        _pad: [0; 4],
        agent_cgroup_id: spec.agent_cgroup_id,
        intercept_ports: port_filter(&spec.intercept),
    }
}

/// A loader with the programs' configuration set and, with a pin directory, the shared maps'
/// pin paths.
fn loader<'a>(spec: &RedirectSpec, config: &'a RedirectConfig) -> anyhow::Result<EbpfLoader<'a>> {
    let mut loader = EbpfLoader::new();
    loader.override_global(names::CONFIG, config, true);
    if let Some(dir) = &spec.pin {
        check_bpffs(dir)?;
        fs::create_dir_all(dir.join("maps"))
            .and_then(|()| fs::create_dir_all(dir.join("links")))
            .with_context(|| format!("creating {}", dir.display()))?;
        for name in PINNED_MAPS {
            loader.map_pin_path(name, dir.join("maps").join(name));
        }
    }
    Ok(loader)
}

/// The addresses whose connects are redirected.
fn fill_intercepted(ebpf: &mut Ebpf, intercept: &[SocketAddr]) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(names::INTERCEPTED)
        .context("INTERCEPTED map missing")?;
    let mut intercepted: BpfHashMap<_, Endpoint, u8> = BpfHashMap::try_from(map)?;
    for addr in intercept {
        intercepted
            .insert(endpoint(*addr), 1, 0)
            .context("filling the intercept map")?;
    }
    Ok(())
}

/// Loads the programs and, given a cgroup, attaches them there (sock_ops first: once connect4/6
/// redirect, every redirected connection gets its record). Returns how they were attached.
fn load_and_attach(
    ebpf: &mut Ebpf,
    cgroup: Option<(&File, &Path)>,
    pin: Option<&Path>,
) -> anyhow::Result<Option<Attachment>> {
    let sock_ops: &mut SockOps = program(ebpf, names::SOCK_OPS)?;
    sock_ops.load().map_err(|e| {
        explain(
            anyhow::Error::new(e).context("loading the sock_ops program"),
            None,
        )
    })?;
    let mut attachment = match cgroup {
        Some((file, path)) => Some(install(sock_ops, names::SOCK_OPS, file, path, pin)?),
        None => None,
    };
    for name in [names::CONNECT4, names::CONNECT6] {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?;
        prog.load().map_err(|e| {
            explain(
                anyhow::Error::new(e).context(format!("loading the {name} program")),
                None,
            )
        })?;
        if let Some((file, path)) = cgroup {
            attachment = Some(install(prog, name, file, path, pin)?);
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

/// Proves the kernel accepts the programs: loads them and, given a cgroup, attaches them there,
/// then detaches everything. Nothing is redirected meanwhile (no address is intercepted).
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
    load_and_attach(&mut ebpf, file.as_ref().zip(cgroup), None)?;
    // Dropping `ebpf` closes the links: the kernel detaches the programs.
    Ok(())
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

fn attach_context(name: &str, root: &Path) -> String {
    format!("attaching {name} to {}", root.display())
}

/// A cgroup program aya can attach and hand its link over.
trait CgroupProgram {
    type LinkId;
    type Link;
    fn attach_to(&mut self, cgroup: &File) -> Result<Self::LinkId, ProgramError>;
    fn take(&mut self, id: Self::LinkId) -> Result<Self::Link, ProgramError>;
    fn program_fd(&self) -> Result<&ProgramFd, ProgramError>;
}

macro_rules! cgroup_program {
    ($ty:ty, $id:ty, $link:ty) => {
        impl CgroupProgram for $ty {
            type LinkId = $id;
            type Link = $link;
            fn attach_to(&mut self, cgroup: &File) -> Result<$id, ProgramError> {
                // Single is right for links on kernels >= 5.7: they coexist with other programs.
                self.attach(cgroup, CgroupAttachMode::Single)
            }
            fn take(&mut self, id: $id) -> Result<$link, ProgramError> {
                self.take_link(id)
            }
            fn program_fd(&self) -> Result<&ProgramFd, ProgramError> {
                self.fd()
            }
        }
    };
}

cgroup_program!(
    CgroupSockAddr,
    aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
    aya::programs::cgroup_sock_addr::CgroupSockAddrLink
);
cgroup_program!(
    SockOps,
    aya::programs::sock_ops::SockOpsLinkId,
    aya::programs::sock_ops::SockOpsLink
);

/// Attaches `prog`: owned by the program without a pin directory; otherwise into the pinned link
/// of a previous agent (swapping programs in place) or as a new pinned link.
fn install<P>(
    prog: &mut P,
    name: &str,
    cgroup: &File,
    root: &Path,
    pin: Option<&Path>,
) -> anyhow::Result<Attachment>
where
    P: CgroupProgram,
    FdLink: TryFrom<P::Link>,
    <FdLink as TryFrom<P::Link>>::Error: std::error::Error + Send + Sync + 'static,
{
    let attach_err = |e: ProgramError| {
        explain(
            anyhow::Error::new(e).context(attach_context(name, root)),
            Some(AttachSite {
                cgroup: root,
                program: name,
            }),
        )
    };
    let Some(dir) = pin else {
        prog.attach_to(cgroup).map_err(attach_err)?;
        return Ok(Attachment::Owned);
    };
    let path = dir.join("links").join(name);
    if path.exists() {
        let link = bpf_sys::obj_get(&path)
            .with_context(|| format!("opening pinned link {}", path.display()))?;
        let prog_fd = prog.program_fd()?;
        bpf_sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(|e| {
            explain(
                anyhow::Error::new(e).context(format!(
                    "swapping {name} into pinned link {}",
                    path.display()
                )),
                None,
            )
        })?;
        return Ok(Attachment::TakenOver);
    }
    let id = prog.attach_to(cgroup).map_err(attach_err)?;
    let link = FdLink::try_from(prog.take(id)?).map_err(|e| {
        anyhow::anyhow!("{name}: link is not a bpf link ({e}); pinning needs Linux >= 5.7")
    })?;
    link.pin(&path)
        .map_err(|e| anyhow::anyhow!("pinning {name} at {}: {e}", path.display()))?;
    Ok(Attachment::Pinned)
}

/// Fails unless `dir` is on a bpffs (pins elsewhere are refused by the kernel with a vague error).
fn check_bpffs(dir: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).context("pin path")?;
    // SAFETY: libc::statfs is a plain C struct of integers: all zeroes is a value of it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into `st`, a properly sized struct.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", probe.display()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        anyhow::bail!(
            "--pin {}: not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        );
    }
    Ok(())
}

/// Removes what `--pin DIR` left: unpinning the links detaches the programs, unpinning the maps
/// frees them once nothing uses them.
pub fn cleanup(dir: &Path) -> anyhow::Result<usize> {
    let mut removed = 0;
    for sub in ["links", "maps"] {
        let Ok(entries) = fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            fs::remove_file(entry.path())
                .with_context(|| format!("unpinning {}", entry.path().display()))?;
            removed += 1;
        }
        let _ = fs::remove_dir(dir.join(sub));
    }
    Ok(removed)
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

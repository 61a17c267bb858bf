//! How pods' connections reach the agent: the kernel programs redirecting them (eBPF mode), or
//! the credential addresses on a local interface (link mode), as `--mode` says, `auto` falling
//! back with the reason.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpSocket};
use tracing::warn;

use crate::{
    attribution::{self, CgroupIndex},
    config::{ImdsMode, Mode, Settings},
    kernel::{self, RedirectSpec, Redirector},
    link,
    ops::{self, Readiness},
};

/// The cgroup2 hierarchy as this agent sees it.
pub struct Cgroup2 {
    pub mount: PathBuf,
    /// Where the programs attach (`--cgroup-root`, else the mount).
    pub root: PathBuf,
    /// The agent's own cgroup, and its id: its connects are never redirected.
    pub own: PathBuf,
    pub id: u64,
}

/// How pods' connections reach this agent.
pub struct Interception {
    pub redirector: Option<Arc<Redirector>>,
    /// eBPF mode's private sockets, listening since the programs were handed them; link mode's
    /// sockets, bound (they listen once the agent can serve: they share a port with an agent
    /// beside this one).
    pub listeners: Listeners,
    pub mode: &'static str,
    /// Shown in /readyz and the start-up log.
    pub note: String,
}

pub enum Listeners {
    Listening(Vec<TcpListener>),
    Bound(Vec<TcpSocket>),
}

impl Listeners {
    /// Their addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Listeners::Listening(l) => l.iter().filter_map(|l| l.local_addr().ok()).collect(),
            Listeners::Bound(b) => b.iter().filter_map(|b| b.local_addr().ok()).collect(),
        }
    }

    /// Listening, all of them.
    pub fn listen(self) -> anyhow::Result<Vec<TcpListener>> {
        match self {
            Listeners::Listening(l) => Ok(l),
            Listeners::Bound(bound) => bound
                .into_iter()
                .map(|socket| {
                    let addr = socket.local_addr()?;
                    socket
                        .listen(1024)
                        .with_context(|| format!("listening on {addr}"))
                })
                .collect(),
        }
    }
}

/// The cgroup2 hierarchy, which is where the programs attach and how callers are attributed. A
/// node without it (cgroup v1: Amazon Linux 2 unless booted with
/// systemd.unified_cgroup_hierarchy=1) can only be served in link mode.
pub fn cgroup2(settings: &Settings) -> anyhow::Result<Cgroup2> {
    let configured = settings.flags.cgroup_root.as_deref();
    let mount = attribution::cgroup2_mount(configured)?;
    let (own, id) = attribution::own_cgroup(&mount)?;
    let root = configured.map_or_else(|| mount.clone(), PathBuf::from);
    Ok(Cgroup2 {
        mount,
        root,
        own,
        id,
    })
}

/// eBPF interception, or link mode: as `--mode` says, `auto` falling back with the reason.
pub async fn intercept(
    settings: &Settings,
    cgroup2: Result<&Cgroup2, &anyhow::Error>,
    readiness: &Readiness,
) -> anyhow::Result<Interception> {
    let mode = settings.flags.mode;
    if mode == Mode::Link {
        return link_mode(settings, None);
    }
    match attach(settings, cgroup2, readiness).await {
        Ok((listeners, redirector)) => {
            let note = match redirector.detached.as_slice() {
                [] => String::new(),
                detached => {
                    let names: Vec<_> = detached.iter().map(|p| p.display().to_string()).collect();
                    warn!(detached = ?names, "pinned objects of another layout (an older agent's) were detached; this agent's programs replace them");
                    format!(
                        "pinned objects of another layout detached: {}",
                        names.join(", ")
                    )
                }
            };
            Ok(Interception {
                redirector: Some(Arc::new(redirector)),
                listeners: Listeners::Listening(listeners),
                mode: "ebpf",
                note,
            })
        }
        Err(e) if mode == Mode::Ebpf => Err(e.context("cannot intercept pods' connections")),
        Err(e) if settings.flags.imds == ImdsMode::Deny => Err(e.context(
            "eBPF interception is unavailable, and --imds deny cannot be kept in link mode (it does not see pods' connects): not falling back",
        )),
        Err(e) => {
            warn!("eBPF interception unavailable, falling back to link mode: {e:#}");
            link_mode(settings, Some(e.to_string()))
        }
    }
}

/// eBPF mode: the agent's private sockets listening, then the programs attached once the
/// cgroup root exists, with the sockets in hand from the start.
async fn attach(
    settings: &Settings,
    cgroup2: Result<&Cgroup2, &anyhow::Error>,
    readiness: &Readiness,
) -> anyhow::Result<(Vec<TcpListener>, Redirector)> {
    let cgroup2 = cgroup2.map_err(|e| {
        anyhow::anyhow!(
            "{e:#}: eBPF mode attributes callers by their cgroup v2 and attaches its programs there (cgroup v1 nodes, such as Amazon Linux 2 by default, have none)"
        )
    })?;
    let listeners = listen_private(settings)?;
    wait_for_cgroup_root(&cgroup2.root, settings.flags.cgroup_root_wait, readiness).await?;
    let redirector = Redirector::attach(
        &RedirectSpec {
            cgroup_root: cgroup2.root.clone(),
            intercept: settings.flags.intercept.clone(),
            target_v4: settings.target_v4,
            target_v6: settings.target_v6,
            serve: settings.listen.clone(),
            agent_cgroup_id: cgroup2.id,
            pin: settings.flags.pin.clone(),
            imds: settings.flags.imds,
        },
        &listeners,
    )?;
    Ok((listeners, redirector))
}

/// Link mode: the credential addresses on a local interface. `fallback_reason` says why eBPF
/// mode was not possible, when `auto` fell back.
fn link_mode(settings: &Settings, fallback_reason: Option<String>) -> anyhow::Result<Interception> {
    let detached = detach_pins(settings)?;
    let intercept = &settings.flags.intercept;
    let addresses: Vec<_> = intercept.iter().map(SocketAddr::ip).collect();
    let link = link::ensure(&addresses)?;
    let on_link: Vec<_> = intercept
        .iter()
        .copied()
        .filter(|a| link.addresses.contains(&a.ip()))
        .collect();
    let listeners = bind_all(&on_link)?;
    warn!(
        device = %link.device,
        addresses = ?link.addresses,
        "link mode: callers are not attributed to pods; requests are checked by their token alone"
    );
    let mut note = format!(
        "link mode on {}: callers are not attributed; token-only checks",
        link.device
    );
    if let Some(reason) = fallback_reason {
        note.push_str(&format!("; eBPF mode unavailable: {reason}"));
    }
    if settings.flags.imds != ImdsMode::Off {
        warn!(
            "link mode: the IMDS guard is off (pods' connects are not seen); pods that fall back to IMDS get the node role's credentials unnoticed"
        );
        note.push_str("; the IMDS guard is off: link mode does not see pods' connects");
    }
    if !detached.is_empty() {
        note.push_str(&format!(
            "; pinned programs detached: {}",
            detached.join(", ")
        ));
    }
    Ok(Interception {
        redirector: None,
        listeners: Listeners::Bound(listeners),
        mode: "link",
        note,
    })
}

/// Link mode never serves beside pinned programs that still redirect pods' connects elsewhere:
/// whatever `--pin` holds is detached first, or the agent does not start.
fn detach_pins(settings: &Settings) -> anyhow::Result<Vec<String>> {
    let Some(dir) = &settings.flags.pin else {
        return Ok(Vec::new());
    };
    let pinned = kernel::pinned(dir);
    if pinned.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = pinned.iter().map(|p| p.display().to_string()).collect();
    kernel::cleanup(dir).with_context(|| {
        format!(
            "link mode cannot serve while pinned programs under {} may redirect pods' connects elsewhere, and they could not be detached",
            dir.display()
        )
    })?;
    warn!(detached = ?names, "link mode: detached the pinned programs, which would send pods' connects to a port this agent does not serve");
    Ok(names)
}

/// eBPF mode's listeners: one per family of the addresses the agent serves (`--listen`), on
/// loopback with a port of the kernel's choosing, listening (connections the kernel hands them
/// before the server accepts wait in the backlog). Nothing binds the served address itself:
/// `steer` hands these sockets the redirected connections, so no other process can receive them
/// by binding it, and no one off the node can reach the sockets.
fn listen_private(settings: &Settings) -> anyhow::Result<Vec<TcpListener>> {
    let mut sockets = Vec::new();
    let served = |v4: bool| settings.listen.iter().copied().find(|a| a.is_ipv4() == v4);
    for (target, loopback) in [
        (served(true), IpAddr::V4(Ipv4Addr::LOCALHOST)),
        (served(false), IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ] {
        let Some(target) = target else { continue };
        let addr = SocketAddr::new(loopback, 0);
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        };
        match socket.and_then(|s| s.bind(addr).and_then(|()| s.listen(1024))) {
            Ok(listener) => sockets.push(listener),
            Err(e) if target.is_ipv6() => {
                warn!(error = %e, %target, "no IPv6 loopback: IPv6 connects to the credential address are not served");
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("binding the credential listener on {addr}"));
            }
        }
    }
    Ok(sockets)
}

/// The credential listeners' sockets, shared with an agent starting beside this one during a
/// roll; bound, not listening yet.
fn bind_all(addrs: &[SocketAddr]) -> anyhow::Result<Vec<TcpSocket>> {
    addrs
        .iter()
        .map(|addr| {
            ops::shared_socket(*addr)
                .with_context(|| format!("binding the credential listener {addr}"))
        })
        .collect()
}

/// Waits for the attach point to exist (kubelet creates kubepods.slice), reporting not ready
/// with the reason meanwhile.
async fn wait_for_cgroup_root(
    root: &std::path::Path,
    wait: Duration,
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    readiness.not_ready("kernel programs not attached yet");
    Ok(())
}

/// The index of cgroups below the attach root: it attributes callers (eBPF mode) and tells
/// which pods are gone. `None` without cgroup v2, where deleted pods are not noticed.
pub fn index_cgroups(
    cgroup2: Result<&Cgroup2, &anyhow::Error>,
    ebpf: bool,
) -> anyhow::Result<Option<CgroupIndex>> {
    let c = match cgroup2 {
        Ok(c) => c,
        Err(e) => {
            warn!(
                "{e:#}: deleted pods are not noticed; their cached credentials expire or age out (--max-cache-entries)"
            );
            return Ok(None);
        }
    };
    match CgroupIndex::build(&c.mount, &c.root) {
        Ok(index) => Ok(Some(index)),
        // In link mode the index only tells which pods still exist; the whole hierarchy will
        // do when the configured root is what made eBPF mode impossible.
        Err(e) if !ebpf => {
            warn!(error = %e, root = %c.root.display(), "cannot index the cgroup root; indexing the whole cgroup2 hierarchy");
            CgroupIndex::build(&c.mount, &c.mount)
                .map(Some)
                .with_context(|| format!("indexing cgroups below {}", c.mount.display()))
        }
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("indexing cgroups below {}", c.root.display())))
        }
    }
}

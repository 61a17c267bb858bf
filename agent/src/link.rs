//! Link mode: the reference agent's way, for nodes where the kernel programs cannot load.
//!
//! The credential addresses are put on a local interface and the server listens on them
//! directly. Without the kernel's record of who connected, callers cannot be attributed: requests
//! are checked by their token alone (EKS Auth still verifies it). Setting up is idempotent and
//! the interface is left in place at exit, so restarts find it ready.
//!
//! The interface is a `dummy` device; kernels built without it get an `ifb` device, and failing
//! that the addresses go on `lo`. A missing IPv6 stack skips the IPv6 address with a warning: a
//! node without IPv6 never makes the agent fail.

use std::{net::IpAddr, process::Command};

use anyhow::{Context as _, bail};
use tracing::{info, warn};

pub const INTERFACE: &str = "pod-id-link";

/// The device holding the addresses and the addresses it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub device: String,
    pub addresses: Vec<IpAddr>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2 is needed in link mode)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates (or finds) the interface and puts `addresses` on it.
pub fn ensure(addresses: &[IpAddr]) -> anyhow::Result<Link> {
    let device = if ip(&["link", "show", INTERFACE]).is_ok()
        || ip(&["link", "add", INTERFACE, "type", "dummy"]).is_ok()
    {
        INTERFACE.to_owned()
    } else if ip(&["link", "add", INTERFACE, "type", "ifb"]).is_ok() {
        info!(
            "no dummy link driver in this kernel; using an ifb device for the credential addresses"
        );
        INTERFACE.to_owned()
    } else {
        warn!("cannot create a dummy or ifb device; putting the credential addresses on lo");
        "lo".to_owned()
    };
    ip(&["link", "set", &device, "up"])?;
    let mut configured = Vec::new();
    for addr in addresses {
        let result = match addr {
            IpAddr::V4(a) => ip(&["addr", "replace", &format!("{a}/32"), "dev", &device]),
            IpAddr::V6(a) => ip(&[
                "-6",
                "addr",
                "replace",
                &format!("{a}/128"),
                "dev",
                &device,
                "nodad",
            ]),
        };
        match result {
            Ok(()) => configured.push(*addr),
            Err(e) if addr.is_ipv6() => {
                warn!(%addr, error = %e, "IPv6 credential address not configured (no IPv6 on this node?); serving IPv4 only")
            }
            Err(e) => return Err(e),
        }
    }
    if configured.is_empty() {
        bail!("no credential address could be configured on {device}");
    }
    Ok(Link {
        device,
        addresses: configured,
    })
}

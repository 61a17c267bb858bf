//! Link mode: the reference agent's way, for nodes where the kernel programs cannot load.
//!
//! The credential addresses are put on a local interface and the server listens on them
//! directly. Without the kernel's record of who connected, callers cannot be attributed: requests
//! are checked by their token alone (EKS Auth still verifies it). Setting up is idempotent and
//! the interface is left in place at exit, so restarts find it ready.
//!
//! The interface is a `dummy` device; kernels built without it get an `ifb` device, and failing
//! that the addresses go on `lo`. A missing IPv6 stack skips the IPv6 address with a warning: a
//! node without IPv6 never makes the agent fail. It is all done over rtnetlink, with no `ip`
//! binary: the agent's image holds the agent and nothing else.

use std::{
    ffi::CString,
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, bail};
use tracing::{info, warn};

pub const INTERFACE: &str = "pod-id-link";

/// The device holding the addresses and the addresses it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub device: String,
    pub addresses: Vec<IpAddr>,
}

/// Creates (or finds) the interface and puts `addresses` on it.
pub fn ensure(addresses: &[IpAddr]) -> anyhow::Result<Link> {
    let mut nl =
        Netlink::open().context("opening an rtnetlink socket (link mode needs NET_ADMIN)")?;
    let device = if index(INTERFACE).is_some() || nl.create_link(INTERFACE, "dummy").is_ok() {
        INTERFACE.to_owned()
    } else if nl.create_link(INTERFACE, "ifb").is_ok() {
        info!(
            "no dummy link driver in this kernel; using an ifb device for the credential addresses"
        );
        INTERFACE.to_owned()
    } else {
        warn!("cannot create a dummy or ifb device; putting the credential addresses on lo");
        "lo".to_owned()
    };
    let ifindex = index(&device).with_context(|| format!("no interface {device}"))?;
    nl.set_up(ifindex)
        .with_context(|| format!("setting {device} up"))?;
    let mut configured = Vec::new();
    for addr in addresses {
        match nl.add_address(ifindex, *addr) {
            Ok(()) => configured.push(*addr),
            Err(e) if addr.is_ipv6() => {
                warn!(%addr, error = %e, "IPv6 credential address not configured (no IPv6 on this node?); serving IPv4 only")
            }
            Err(e) => return Err(e).with_context(|| format!("adding {addr} to {device}")),
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

fn index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// An rtnetlink socket: one request at a time, each acknowledged.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: socket(2) with constant arguments; the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd from the kernel, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink { fd, seq: 0 })
    }

    /// `ip link add NAME type KIND`.
    fn create_link(&mut self, name: &str, kind: &str) -> io::Result<()> {
        let mut msg = ifinfomsg(0, 0, 0);
        attr(&mut msg, libc::IFLA_IFNAME, &nul_terminated(name));
        let mut info = Vec::new();
        attr(&mut info, libc::IFLA_INFO_KIND, &nul_terminated(kind));
        attr(&mut msg, libc::IFLA_LINKINFO, &info);
        let flags = libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        self.request(libc::RTM_NEWLINK, flags as u16, &msg)
    }

    /// `ip link set DEV up`.
    fn set_up(&mut self, ifindex: u32) -> io::Result<()> {
        let up = libc::IFF_UP as u32;
        self.request(libc::RTM_NEWLINK, 0, &ifinfomsg(ifindex, up, up))
    }

    /// `ip addr replace ADDR/32 dev DEV` (/128 `nodad` for IPv6).
    fn add_address(&mut self, ifindex: u32, addr: IpAddr) -> io::Result<()> {
        let (family, prefix, flags, bytes) = match addr {
            IpAddr::V4(a) => (libc::AF_INET, 32, 0, a.octets().to_vec()),
            IpAddr::V6(a) => (libc::AF_INET6, 128, libc::IFA_F_NODAD, a.octets().to_vec()),
        };
        // struct ifaddrmsg: family, prefixlen, flags, scope (universe), index.
        let mut msg = vec![family as u8, prefix, flags as u8, 0];
        msg.extend_from_slice(&ifindex.to_ne_bytes());
        attr(&mut msg, libc::IFA_LOCAL, &bytes);
        attr(&mut msg, libc::IFA_ADDRESS, &bytes);
        let flags = libc::NLM_F_CREATE | libc::NLM_F_REPLACE;
        self.request(libc::RTM_NEWADDR, flags as u16, &msg)
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, kind: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
        self.seq += 1;
        let len = (16 + payload.len()) as u32;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        let flags = flags | (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        // SAFETY: send(2) reads `msg`, a live buffer of its length, from our own fd.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        self.ack()
    }

    /// The kernel's answer to the last request: an `NLMSG_ERROR` whose code is 0 on success.
    fn ack(&self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let reply = &buf[..n as usize];
            if reply.len() < 20 {
                return Err(io::Error::other("short rtnetlink reply"));
            }
            let kind = u16::from_ne_bytes([reply[4], reply[5]]);
            let seq = u32::from_ne_bytes([reply[8], reply[9], reply[10], reply[11]]);
            if kind == libc::NLMSG_ERROR as u16 && seq == self.seq {
                let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
                return if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
        }
    }
}

/// struct ifinfomsg for interface `index` (0: none yet), changing `change` of its flags to
/// `flags`.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut msg = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    msg.extend_from_slice(&index.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&change.to_ne_bytes());
    msg
}

/// Appends a netlink attribute (`struct rtattr` and its data, padded to 4 bytes).
fn attr(msg: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = (4 + data.len()) as u16;
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(data);
    msg.resize(msg.len().next_multiple_of(4), 0);
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut msg = Vec::new();
        attr(&mut msg, libc::IFLA_IFNAME, &nul_terminated("pod-id-link"));
        assert_eq!(msg.len(), 16, "4 header bytes, 12 of name and NUL");
        assert_eq!(u16::from_ne_bytes([msg[0], msg[1]]), 16);
        attr(&mut msg, 1, &[1, 2, 3]);
        assert_eq!(msg.len(), 24, "7 rounded up to 8");
    }
}

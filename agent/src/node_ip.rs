//! The node's own addresses, where the credential listeners go when `--listen` is not given.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use anyhow::{Context as _, bail};

/// `NODE_IP` (from the downward API: `status.hostIP`, or `status.hostIPs` on dual-stack
/// clusters, comma-separated), else the IPv4 address the node's default route sends from.
pub fn node_ips() -> anyhow::Result<Vec<IpAddr>> {
    if let Ok(value) = std::env::var("NODE_IP") {
        return parse_node_ips(&value);
    }
    Ok(vec![default_route_ip()?])
}

/// Node addresses from `NODE_IP`, at most one per family (the first of each).
fn parse_node_ips(value: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ip: IpAddr = part
            .parse()
            .with_context(|| format!("NODE_IP={value:?}: {part:?} is not an IP address"))?;
        if !ips.iter().any(|have| have.is_ipv4() == ip.is_ipv4()) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        bail!("NODE_IP is empty");
    }
    Ok(ips)
}

/// The source address the kernel picks for the default route: a UDP socket "connected" to an
/// address outside every local network learns it without sending a packet.
fn default_route_ip() -> anyhow::Result<IpAddr> {
    /// TEST-NET-2 (RFC 5737): routed by the default route on any node, never a real peer.
    const OUTSIDE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 9);
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("opening a UDP socket")?;
    socket
        .connect(OUTSIDE)
        .context("no NODE_IP and no IPv4 default route; pass --listen IP:PORT")?;
    let local = socket
        .local_addr()
        .context("reading the default route's source address")?;
    if local.ip().is_unspecified() {
        bail!("the IPv4 default route has no source address; pass --listen");
    }
    Ok(local.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ip_lists_give_one_address_per_family() {
        let ips = parse_node_ips("198.18.0.1, 2001:2::1,198.18.0.2").unwrap();
        let want: Vec<IpAddr> = vec!["198.18.0.1".parse().unwrap(), "2001:2::1".parse().unwrap()];
        assert_eq!(ips, want);
        assert_eq!(parse_node_ips("2001:2::1").unwrap().len(), 1);
        assert!(parse_node_ips("").is_err());
        assert!(parse_node_ips("node-1").is_err());
    }
}

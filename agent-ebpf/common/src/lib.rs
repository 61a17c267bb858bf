//! Map keys, values and the load-time configuration shared by the kernel programs and the agent.
//!
//! [`CONTRACT_VERSION`] names this layout: pinned maps and links live under `<pin>/v<version>`, so
//! an agent never takes over pinned objects whose layout it does not know.
//!
//! Every type is `#[repr(C)]`, built only from byte arrays and `u64`s, with any padding spelled
//! out as a zeroed field: the kernel compares keys byte for byte, so a key with undefined padding
//! would make every lookup miss.
#![no_std]

/// The version of the layout below (maps, their keys and values, programs and pin names). Bump
/// it with any change to them: an agent finding pins of another version detaches them instead of
/// reusing them.
pub const CONTRACT_VERSION: u32 = 3;

/// An IP address and TCP port exactly as the kernel holds them: the address as 16 bytes (IPv4 as
/// the v4-mapped `::ffff:a.b.c.d`) and the port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Endpoint {
    pub addr: [u8; 16],
    pub port: [u8; 2],
}

impl Endpoint {
    /// The all-zero endpoint; used in [`RedirectConfig`] to mean "no target for this family".
    pub const NONE: Endpoint = Endpoint {
        addr: [0; 16],
        port: [0; 2],
    };

    /// `addr` and `port` in network byte order.
    #[inline(always)]
    pub const fn v4(addr: [u8; 4], port: [u8; 2]) -> Endpoint {
        Endpoint {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
            ],
            port,
        }
    }

    #[inline(always)]
    pub const fn is_none(&self) -> bool {
        self.port[0] == 0 && self.port[1] == 0
    }

    /// True when the address is a v4-mapped IPv6 address (`::ffff:a.b.c.d`).
    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        let a = &self.addr;
        a[0] == 0
            && a[1] == 0
            && a[2] == 0
            && a[3] == 0
            && a[4] == 0
            && a[5] == 0
            && a[6] == 0
            && a[7] == 0
            && a[8] == 0
            && a[9] == 0
            && a[10] == 0xff
            && a[11] == 0xff
    }

    /// The IPv4 address of a v4-mapped endpoint, in network byte order.
    #[inline(always)]
    pub const fn ipv4(&self) -> [u8; 4] {
        [self.addr[12], self.addr[13], self.addr[14], self.addr[15]]
    }
}

/// Set once by the agent at load time (a read-only global in the kernel object).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Where redirected IPv4 (and v4-mapped) connects go; [`Endpoint::NONE`] when the agent has
    /// no IPv4 listener.
    pub target_v4: Endpoint,
    /// Where redirected IPv6 connects go; [`Endpoint::NONE`] when the agent has no IPv6 listener.
    pub target_v6: Endpoint,
    pub _pad: [u8; 4],
    /// The agent's own cgroup id: its connects are never redirected.
    pub agent_cgroup_id: u64,
    /// The ports of the intercepted addresses, in network byte order, unused slots zero: a
    /// connect to any other port is let through before any map lookup (the common case, and the
    /// one every connect on the node pays for). All zero: no port filter, the map decides.
    pub intercept_ports: [[u8; 2]; 4],
    /// The addresses the agent serves (`--listen`), per family: a redirected connection to one
    /// of them is handed to the agent's own socket. Usually the targets themselves; a target
    /// elsewhere (another server, as the benchmark's baselines are) is left alone.
    pub serve_v4: Endpoint,
    pub serve_v6: Endpoint,
    pub _pad2: [u8; 4],
}

impl RedirectConfig {
    pub const UNSET: RedirectConfig = RedirectConfig {
        target_v4: Endpoint::NONE,
        target_v6: Endpoint::NONE,
        _pad: [0; 4],
        agent_cgroup_id: 0,
        intercept_ports: [[0; 2]; 4],
        serve_v4: Endpoint::NONE,
        serve_v6: Endpoint::NONE,
        _pad2: [0; 4],
    };

    /// Whether a connect to `port` (network byte order) may be to an intercepted address.
    #[inline(always)]
    pub fn may_intercept(ports: &[[u8; 2]; 4], port: [u8; 2]) -> bool {
        let unfiltered = ports[0] == [0, 0];
        unfiltered || ports[0] == port || ports[1] == port || ports[2] == port || ports[3] == port
    }
}

/// Who opened a redirected connection, as the kernel saw it at `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribution {
    /// cgroup v2 id (the inode number of the cgroup directory) of the connecting task.
    pub cgroup_id: u64,
    /// `tgid << 32 | pid` of the connecting task.
    pub pid_tgid: u64,
    /// `CLOCK_MONOTONIC` nanoseconds at `connect()`: the agent refuses a record too old to
    /// belong to the connection it accepts.
    pub created_ns: u64,
    /// The address the client dialled before the redirect.
    pub original_dst: Endpoint,
    pub _pad: [u8; 6],
}

/// A redirected connection as the agent sees it after `accept()`: (peer, local).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    /// The pod's end: source address and port chosen by its kernel.
    pub client: Endpoint,
    /// The agent's end: the redirect target.
    pub server: Endpoint,
}

/// What an `INTERCEPTED` entry does with a connect to its endpoint.
pub mod intercept {
    /// A credential address: the connect is redirected to the agent.
    pub const CREDENTIALS: u8 = 1;
    /// An IMDS address (`--imds audit`): the connect is counted per cgroup and allowed.
    pub const IMDS_AUDIT: u8 = 2;
    /// An IMDS address (`--imds deny`): counted, and refused (EPERM) from a network namespace
    /// other than the node's.
    pub const IMDS_DENY: u8 = 3;
}

/// One cgroup's connects to IMDS since the agent last read them (`IMDS_CALLERS`, keyed by cgroup
/// id; the agent takes each entry and deletes it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImdsCount {
    /// Connects seen, refused ones included.
    pub connects: u64,
    /// Connects refused (`--imds deny`, from a pod's own network namespace).
    pub denied: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the last connect.
    pub last_ns: u64,
}

/// Slots of the `LISTENERS` socket map: the agent's listening socket per address family.
pub mod listener {
    pub const V4: u32 = 0;
    pub const V6: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Indices into the `REDIRECT_COUNTS` per-CPU array.
pub mod counter {
    /// IPv4 connects (and v4-mapped connects on IPv6 sockets) redirected.
    pub const REDIRECTED_V4: u32 = 0;
    /// IPv6 connects redirected.
    pub const REDIRECTED_V6: u32 = 1;
    /// Redirected connects whose 4-tuple was recorded for attribution.
    pub const RECORDED: u32 = 2;
    /// Redirected connections handed to the agent's socket by `steer`.
    pub const STEERED: u32 = 3;
    /// Redirected connections refused because no agent socket was there to take them (the agent
    /// was down or restarting): never handed to whatever else listens on the target.
    pub const NO_AGENT: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// Names of the programs and maps in the kernel object, shared so that neither side can drift.
pub mod names {
    pub const CONNECT4: &str = "connect4";
    pub const CONNECT6: &str = "connect6";
    pub const SOCK_OPS: &str = "record_connection";
    pub const SK_LOOKUP: &str = "steer";
    pub const CONFIG: &str = "CONFIG";
    pub const INTERCEPTED: &str = "INTERCEPTED";
    pub const PENDING: &str = "PENDING";
    pub const CONNECTIONS: &str = "CONNECTIONS";
    pub const REDIRECT_COUNTS: &str = "REDIRECT_COUNTS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const NODE_NETNS: &str = "NODE_NETNS";
    pub const IMDS_CALLERS: &str = "IMDS_CALLERS";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data (this and each below): repr(C), only byte arrays and u64s, padding
    // spelled out as zeroed fields, so every bit pattern is a value and none is uninitialised.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RedirectConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Attribution {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnectionKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ImdsCount {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Endpoint>(), 18);
        assert_eq!(size_of::<ConnectionKey>(), 36);
        assert_eq!(size_of::<Attribution>(), 8 + 8 + 8 + 18 + 6);
        assert_eq!(size_of::<ImdsCount>(), 24);
        assert_eq!(
            size_of::<RedirectConfig>(),
            18 + 18 + 4 + 8 + 8 + 18 + 18 + 4
        );
    }

    #[test]
    fn the_port_filter_passes_only_intercepted_ports() {
        let p80 = 80u16.to_be_bytes();
        let ports = [p80, [0, 0], [0, 0], [0, 0]];
        assert!(RedirectConfig::may_intercept(&ports, p80));
        assert!(!RedirectConfig::may_intercept(&ports, 443u16.to_be_bytes()));
        // A zero port is never an intercepted one when the filter is on.
        assert!(!RedirectConfig::may_intercept(
            &[p80, 8080u16.to_be_bytes(), [0, 0], [0, 0]],
            [1, 0]
        ));
        // No filter: the map decides.
        assert!(RedirectConfig::may_intercept(
            &[[0, 0]; 4],
            443u16.to_be_bytes()
        ));
    }

    #[test]
    fn v4_mapped_round_trip() {
        let e = Endpoint::v4([169, 254, 170, 23], 80u16.to_be_bytes());
        assert!(e.is_v4_mapped());
        assert_eq!(e.ipv4(), [169, 254, 170, 23]);
        assert!(!e.is_none());
        assert!(Endpoint::NONE.is_none());
    }
}

//! Kernel side of the agent.
//!
//! * `connect4` / `connect6` (cgroup/connect4, cgroup/connect6; process context): a TCP connect to
//!   an intercepted address (the EKS Pod Identity link-local address) is rewritten to the agent's
//!   listener, and `socket cookie -> who connected` is remembered in `PENDING`.
//! * `record_connection` (sock_ops, `BPF_SOCK_OPS_TCP_CONNECT_CB`): runs inside the same
//!   `connect()` once the source port is chosen and before the SYN leaves, so the connection's
//!   4-tuple is known. It moves the record from `PENDING` to `CONNECTIONS`, keyed by the 4-tuple the
//!   agent will see after `accept()`. The cookie bridge is needed because sock_ops may not call
//!   `bpf_get_current_cgroup_id` before kernel 6.4. It also asks for the socket's state changes,
//!   and drops the record when the socket closes before the agent took it, so a record never
//!   outlives its connection for another socket to reuse.
//! * `steer` (sk_lookup, the node's network namespace): a connection to an address the agent
//!   serves that has a record is handed to the agent's own listening socket (the `LISTENERS`
//!   socket map), whatever else is bound to that address; with no agent socket there (the agent
//!   is down) it is refused. A connection without a record goes where the kernel would send it.
//!
//! * The IMDS guard (`--imds`), in the same connect programs: a connect to an IMDS address is
//!   counted per cgroup in `IMDS_CALLERS` and, with `--imds deny`, refused (EPERM) when it comes
//!   from a network namespace other than the node's. The node's namespace is learned from the
//!   agent's own connects (`NODE_NETNS`): the agent runs in it.
//!
//! Interception never makes a connect fail; only the IMDS guard in deny mode refuses one.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use core::{
        ffi::c_void,
        ptr::{read_volatile, write_volatile},
    };

    use aya_ebpf::{
        bindings::{
            BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
            BPF_TCP_CLOSE,
            sk_action::{SK_DROP, SK_PASS},
        },
        helpers::{
            bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_ktime_get_ns,
        },
        macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
        maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, SockMap},
        programs::{SkLookupContext, SockAddrContext, SockOpsContext},
    };
    use aya_log_ebpf::warn;
    use pod_identity_common::{
        Attribution, ConnectionKey, Endpoint, ImdsCount, RedirectConfig,
        counter::{COUNT, NO_AGENT, RECORDED, REDIRECTED_V4, REDIRECTED_V6, STEERED},
        intercept, listener,
    };

    /// Return values of cgroup/connect programs: let the connect proceed, or fail it with EPERM.
    const ALLOW: i32 = 1;
    const DENY: i32 = 0;
    const IPPROTO_TCP: u32 = 6;
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;

    /// Written by the agent before load (read-only data section).
    #[unsafe(no_mangle)]
    static CONFIG: RedirectConfig = RedirectConfig::UNSET;

    /// Intercepted destinations (IPv4 in v4-mapped form, so connect6 on a dual-stack socket
    /// matches the same entry), each with what to do ([`intercept`]). Filled by the agent before
    /// the programs are attached.
    #[map]
    static INTERCEPTED: HashMap<Endpoint, u8> = HashMap::with_max_entries(16, 0);

    /// The node's network namespace cookie: that of the agent's own connects to an intercepted
    /// address (the agent runs in the node's namespace). 0 until one is seen.
    #[map]
    static NODE_NETNS: Array<u64> = Array::with_max_entries(1, 0);

    /// cgroup id -> its connects to IMDS since the agent last took the entry, per CPU: each
    /// CPU adds to its own copy (the BPF target has no atomic add), the agent sums them.
    #[map]
    static IMDS_CALLERS: LruPerCpuHashMap<u64, ImdsCount> =
        LruPerCpuHashMap::with_max_entries(8_192, 0);

    /// socket cookie -> attribution, between connect and sock_ops. Entries live for the
    /// microseconds between the two hooks; LRU covers connects that fail in between.
    #[map]
    static PENDING: LruHashMap<u64, Attribution> = LruHashMap::with_max_entries(16_384, 0);

    /// 4-tuple -> attribution, read and deleted by the agent right after accept().
    #[map]
    static CONNECTIONS: LruHashMap<ConnectionKey, Attribution> =
        LruHashMap::with_max_entries(65_536, 0);

    #[map]
    static REDIRECT_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNT, 0);

    /// The agent's listening sockets, one per address family ([`listener`]); a socket leaves the
    /// map when it closes.
    #[map]
    static LISTENERS: SockMap = SockMap::with_max_entries(listener::COUNT, 0);

    #[inline(always)]
    fn config() -> RedirectConfig {
        // SAFETY: a plain read of a global the agent fixed at load time. Volatile so the compiler
        // cannot fold in the UNSET initialiser.
        unsafe { read_volatile(&raw const CONFIG) }
    }

    /// The intercepted ports alone: read per connect, so not the whole configuration.
    #[inline(always)]
    fn intercept_ports() -> [[u8; 2]; 4] {
        // SAFETY: as in config(), for one field.
        unsafe { read_volatile(&raw const CONFIG.intercept_ports) }
    }

    #[inline(always)]
    fn count(index: u32) {
        if let Some(slot) = REDIRECT_COUNTS.get_ptr_mut(index) {
            // SAFETY: per-CPU slot; no other writer on this CPU while we run.
            unsafe { *slot += 1 }
        }
    }

    /// What to do with a connect to `dst`: `None` when it is not intercepted (a lookup of a
    /// connect whose port already matched).
    #[inline(always)]
    fn intercepted(dst: &Endpoint) -> Option<u8> {
        // SAFETY: the value is copied out at once.
        unsafe { INTERCEPTED.get(dst) }.copied()
    }

    /// The target to send a connect to the credential address `dst` to, or None when it must go
    /// where it was going (the agent's own connects, a family without a target).
    #[inline(always)]
    fn redirect_target(ctx: &SockAddrContext, dst: &Endpoint) -> Option<(Endpoint, u64)> {
        let config = config();
        // SAFETY: helper without preconditions.
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        if cgroup_id == config.agent_cgroup_id {
            learn_node_netns(ctx);
            return None;
        }
        let target = if dst.is_v4_mapped() {
            config.target_v4
        } else {
            config.target_v6
        };
        if target.is_none() {
            return None;
        }
        Some((target, cgroup_id))
    }

    /// The agent's own connect: its network namespace is the node's.
    #[inline(always)]
    fn learn_node_netns(ctx: &SockAddrContext) {
        // SAFETY: ctx is the program's own context pointer.
        let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
        if let Some(slot) = NODE_NETNS.get_ptr_mut(0) {
            // SAFETY: the array's only slot; every writer writes the same value.
            unsafe { *slot = cookie }
        }
    }

    /// A connect to an IMDS address (`kind`: audit or deny): counted for its cgroup, and in deny
    /// mode refused unless it comes from the node's network namespace (node processes and
    /// hostNetwork pods). Until the node's namespace is known nothing is refused.
    #[inline(always)]
    fn imds_guard(ctx: &SockAddrContext, kind: u8) -> i32 {
        // SAFETY: helper without preconditions.
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        if cgroup_id == config().agent_cgroup_id {
            // The agent's own (its node credentials, on EC2): neither counted nor refused.
            learn_node_netns(ctx);
            return ALLOW;
        }
        let deny = kind == intercept::IMDS_DENY && !in_node_netns(ctx);
        count_imds(cgroup_id, deny);
        if deny { DENY } else { ALLOW }
    }

    #[inline(always)]
    fn in_node_netns(ctx: &SockAddrContext) -> bool {
        let node = NODE_NETNS.get(0).copied().unwrap_or(0);
        // SAFETY: ctx is the program's own context pointer.
        node == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) } == node
    }

    /// Adds one connect to the cgroup's count on this CPU.
    #[inline(always)]
    fn count_imds(cgroup_id: u64, denied: bool) {
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        if let Some(entry) = IMDS_CALLERS.get_ptr_mut(&cgroup_id) {
            // SAFETY: this CPU's copy of a live map value; programs on one CPU do not interleave.
            unsafe {
                (*entry).connects += 1;
                (*entry).denied += denied as u64;
                (*entry).last_ns = now;
            }
            return;
        }
        // A new key: this CPU's copy is set, the others start at zero.
        let fresh = ImdsCount {
            connects: 1,
            denied: denied as u64,
            last_ns: now,
        };
        let _ = IMDS_CALLERS.insert(&cgroup_id, &fresh, 0);
    }

    #[inline(always)]
    fn remember(ctx: &SockAddrContext, cgroup_id: u64, original_dst: Endpoint) {
        let attribution = Attribution {
            cgroup_id,
            pid_tgid: bpf_get_current_pid_tgid(),
            // SAFETY: helper without preconditions.
            created_ns: unsafe { bpf_ktime_get_ns() },
            original_dst,
            _pad: [0; 6],
        };
        // SAFETY: ctx is the program's own context pointer.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
        if PENDING.insert(&cookie, &attribution, 0).is_err() {
            warn!(
                ctx,
                "pod-identity: PENDING insert failed for cgroup {}", cgroup_id
            );
        }
    }

    #[cgroup_sock_addr(connect4)]
    pub fn connect4(ctx: SockAddrContext) -> i32 {
        let sa = ctx.sock_addr;
        // SAFETY: sa is the kernel-provided context; fields are read with 4-byte loads.
        unsafe {
            if read_volatile(&raw const (*sa).protocol) != IPPROTO_TCP {
                return ALLOW;
            }
            // user_port holds the big-endian port in its low 16 bits.
            let port = read_volatile(&raw const (*sa).user_port) as u16;
            if !RedirectConfig::may_intercept(&intercept_ports(), port.to_ne_bytes()) {
                return ALLOW;
            }
            let ip = read_volatile(&raw const (*sa).user_ip4);
            let dst = Endpoint::v4(ip.to_ne_bytes(), port.to_ne_bytes());
            match intercepted(&dst) {
                None => return ALLOW,
                Some(intercept::CREDENTIALS) => {}
                Some(imds) => return imds_guard(&ctx, imds),
            }
            let Some((target, cgroup_id)) = redirect_target(&ctx, &dst) else {
                return ALLOW;
            };
            remember(&ctx, cgroup_id, dst);
            write_volatile(&raw mut (*sa).user_ip4, u32::from_ne_bytes(target.ipv4()));
            write_volatile(
                &raw mut (*sa).user_port,
                u16::from_ne_bytes(target.port) as u32,
            );
        }
        count(REDIRECTED_V4);
        ALLOW
    }

    #[inline(always)]
    fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
        let (a, b, c, d) = (
            w[0].to_ne_bytes(),
            w[1].to_ne_bytes(),
            w[2].to_ne_bytes(),
            w[3].to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    #[inline(always)]
    fn word(bytes: &[u8; 16], i: usize) -> u32 {
        u32::from_ne_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    }

    #[cgroup_sock_addr(connect6)]
    pub fn connect6(ctx: SockAddrContext) -> i32 {
        let sa = ctx.sock_addr;
        // SAFETY: as in connect4; user_ip6 must be read and written one 4-byte word at a time.
        unsafe {
            if read_volatile(&raw const (*sa).protocol) != IPPROTO_TCP {
                return ALLOW;
            }
            let port = read_volatile(&raw const (*sa).user_port) as u16;
            if !RedirectConfig::may_intercept(&intercept_ports(), port.to_ne_bytes()) {
                return ALLOW;
            }
            let ip = [
                read_volatile(&raw const (*sa).user_ip6[0]),
                read_volatile(&raw const (*sa).user_ip6[1]),
                read_volatile(&raw const (*sa).user_ip6[2]),
                read_volatile(&raw const (*sa).user_ip6[3]),
            ];
            let dst = Endpoint {
                addr: words_to_bytes(ip),
                port: port.to_ne_bytes(),
            };
            match intercepted(&dst) {
                None => return ALLOW,
                Some(intercept::CREDENTIALS) => {}
                Some(imds) => return imds_guard(&ctx, imds),
            }
            // A v4-mapped destination gets the v4-mapped IPv4 target, which is how target_v4 is
            // stored, so the same bytes serve both cases.
            let Some((target, cgroup_id)) = redirect_target(&ctx, &dst) else {
                return ALLOW;
            };
            remember(&ctx, cgroup_id, dst);
            write_volatile(&raw mut (*sa).user_ip6[0], word(&target.addr, 0));
            write_volatile(&raw mut (*sa).user_ip6[1], word(&target.addr, 1));
            write_volatile(&raw mut (*sa).user_ip6[2], word(&target.addr, 2));
            write_volatile(&raw mut (*sa).user_ip6[3], word(&target.addr, 3));
            write_volatile(
                &raw mut (*sa).user_port,
                u16::from_ne_bytes(target.port) as u32,
            );
            count(if dst.is_v4_mapped() {
                REDIRECTED_V4
            } else {
                REDIRECTED_V6
            });
        }
        ALLOW
    }

    #[sock_ops]
    pub fn record_connection(ctx: SockOpsContext) -> u32 {
        match ctx.op() {
            BPF_SOCK_OPS_TCP_CONNECT_CB => record(&ctx),
            // Only sockets `record` asked it for: a redirected connection closing. Its record
            // goes with it, unless the agent already took it at accept.
            BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
                if let Some(key) = connection_key(&ctx) {
                    let _ = CONNECTIONS.remove(&key);
                }
            }
            _ => {}
        }
        1
    }

    /// Moves a redirected connect's record from its socket cookie to its 4-tuple.
    #[inline(always)]
    fn record(ctx: &SockOpsContext) {
        // SAFETY: ctx is the program's own context pointer.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
        // SAFETY: the value is copied out at once.
        let Some(attribution) = (unsafe { PENDING.get(&cookie) }).copied() else {
            return;
        };
        let Some(key) = connection_key(ctx) else {
            return;
        };
        if CONNECTIONS.insert(&key, &attribution, 0).is_err() {
            warn!(
                ctx,
                "pod-identity: CONNECTIONS insert failed for cgroup {}", attribution.cgroup_id
            );
        } else {
            count(RECORDED);
            // Hear of this socket's close, to drop the record if the agent never takes it.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        let _ = PENDING.remove(&cookie);
    }

    /// The connection's 4-tuple, as the agent sees it after `accept()`: (client, server).
    #[inline(always)]
    fn connection_key(ctx: &SockOpsContext) -> Option<ConnectionKey> {
        let ops = ctx.ops;
        // SAFETY: context fields read with 4-byte loads. Every field is read unconditionally,
        // before any branch: the verifier only accepts loads at constant offsets from the context
        // pointer, and per-family branches let LLVM merge them into one computed pointer.
        // remote_port holds the big-endian port in its high 16 bits; local_port is host order.
        let (family, local4, remote4, local6, remote6, local_port, remote_port) = unsafe {
            (
                read_volatile(&raw const (*ops).family),
                read_volatile(&raw const (*ops).local_ip4),
                read_volatile(&raw const (*ops).remote_ip4),
                [
                    read_volatile(&raw const (*ops).local_ip6[0]),
                    read_volatile(&raw const (*ops).local_ip6[1]),
                    read_volatile(&raw const (*ops).local_ip6[2]),
                    read_volatile(&raw const (*ops).local_ip6[3]),
                ],
                [
                    read_volatile(&raw const (*ops).remote_ip6[0]),
                    read_volatile(&raw const (*ops).remote_ip6[1]),
                    read_volatile(&raw const (*ops).remote_ip6[2]),
                    read_volatile(&raw const (*ops).remote_ip6[3]),
                ],
                read_volatile(&raw const (*ops).local_port),
                read_volatile(&raw const (*ops).remote_port),
            )
        };
        let client_port = (local_port as u16).to_be_bytes();
        let server_port = ((remote_port >> 16) as u16).to_ne_bytes();
        match family {
            AF_INET => Some(ConnectionKey {
                client: Endpoint::v4(local4.to_ne_bytes(), client_port),
                server: Endpoint::v4(remote4.to_ne_bytes(), server_port),
            }),
            AF_INET6 => Some(ConnectionKey {
                client: Endpoint {
                    addr: words_to_bytes(local6),
                    port: client_port,
                },
                server: Endpoint {
                    addr: words_to_bytes(remote6),
                    port: server_port,
                },
            }),
            _ => None,
        }
    }

    /// Hands a redirected connection to the agent's own socket, so that only the agent can
    /// receive it: a process that binds the target address (the agent restarting, a port any
    /// user may bind) gets nothing the kernel redirected.
    #[sk_lookup]
    pub fn steer(ctx: SkLookupContext) -> u32 {
        let lookup = ctx.lookup;
        // SAFETY: context fields read one at a time with their documented load sizes, all before
        // any branch (as in `connection_key`). remote_port holds the port in network order in its
        // low 16 bits, local_port in host order.
        let (protocol, family, local4, remote4, local6, remote6, local_port, remote_port) = unsafe {
            (
                read_volatile(&raw const (*lookup).protocol),
                read_volatile(&raw const (*lookup).family),
                read_volatile(&raw const (*lookup).local_ip4),
                read_volatile(&raw const (*lookup).remote_ip4),
                [
                    read_volatile(&raw const (*lookup).local_ip6[0]),
                    read_volatile(&raw const (*lookup).local_ip6[1]),
                    read_volatile(&raw const (*lookup).local_ip6[2]),
                    read_volatile(&raw const (*lookup).local_ip6[3]),
                ],
                [
                    read_volatile(&raw const (*lookup).remote_ip6[0]),
                    read_volatile(&raw const (*lookup).remote_ip6[1]),
                    read_volatile(&raw const (*lookup).remote_ip6[2]),
                    read_volatile(&raw const (*lookup).remote_ip6[3]),
                ],
                read_volatile(&raw const (*lookup).local_port),
                read_volatile(&raw const (*lookup).remote_port),
            )
        };
        if protocol != IPPROTO_TCP {
            return SK_PASS;
        }
        let server_port = (local_port as u16).to_be_bytes();
        let client_port = (remote_port as u16).to_ne_bytes();
        let (key, served, slot) = match family {
            AF_INET => (
                ConnectionKey {
                    client: Endpoint::v4(remote4.to_ne_bytes(), client_port),
                    server: Endpoint::v4(local4.to_ne_bytes(), server_port),
                },
                // SAFETY: as in config(), for one field.
                unsafe { read_volatile(&raw const CONFIG.serve_v4) },
                listener::V4,
            ),
            AF_INET6 => (
                ConnectionKey {
                    client: Endpoint {
                        addr: words_to_bytes(remote6),
                        port: client_port,
                    },
                    server: Endpoint {
                        addr: words_to_bytes(local6),
                        port: server_port,
                    },
                },
                // SAFETY: as in config(), for one field.
                unsafe { read_volatile(&raw const CONFIG.serve_v6) },
                listener::V6,
            ),
            _ => return SK_PASS,
        };
        if served.is_none() || key.server != served {
            return SK_PASS;
        }
        // SAFETY: only the presence of the record is read.
        if unsafe { CONNECTIONS.get(&key) }.is_none() {
            // Not redirected: it goes wherever the kernel sends it (nowhere, unless something
            // listens on the target), and never to the agent.
            return SK_PASS;
        }
        match LISTENERS.redirect_sk_lookup(&ctx, slot, 0) {
            Ok(()) => {
                count(STEERED);
                SK_PASS
            }
            Err(_) => {
                count(NO_AGENT);
                SK_DROP
            }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // SAFETY: the verifier rejects any program with a reachable panic path.
        unsafe { core::hint::unreachable_unchecked() }
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

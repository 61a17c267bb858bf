//! The harness's own view of BPF at a cgroup, through bpf(2) directly, so it works the same on
//! every kernel (bpftool from Debian bookworm cannot list cgroup programs on 5.10):
//!
//! * [`attached`]: which programs are attached to a cgroup, how, and their names.
//! * [`Neighbour`]: a stand-in for another tool's cgroup program (Cilium's socket load balancer,
//!   say): a `cgroup/connect4` program that rewrites connects to a service address to a backend,
//!   attached as a bpf link, as a legacy `BPF_F_ALLOW_MULTI` attachment, or as a legacy exclusive
//!   one. Its bytecode is assembled here, so no compiler is needed.

use std::{
    ffi::CString,
    fs::File,
    io,
    net::SocketAddrV4,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_F_ALLOW_MULTI: u32 = 2;

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK (64 KiB by default): lift it once for
/// this process, as the agent does for itself.
fn lift_memlock() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct; failure leaves the limit as it was.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    });
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    lift_memlock();
    // SAFETY: `attr` is a valid, zero-padded bpf_attr prefix for `cmd` that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// One program attached to a cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub attach_type: u32,
    /// The cgroup's attach flags for this type (`BPF_F_ALLOW_MULTI` for links).
    pub flags: u32,
    pub id: u32,
    pub name: String,
}

/// Every program attached directly to `cgroup` for connect4, connect6 and sock_ops.
pub fn attached(cgroup: &Path) -> Vec<Attached> {
    let dir = File::open(cgroup).unwrap_or_else(|e| panic!("open {}: {e}", cgroup.display()));
    let mut out = Vec::new();
    for attach_type in [
        BPF_CGROUP_INET4_CONNECT,
        BPF_CGROUP_INET6_CONNECT,
        BPF_CGROUP_SOCK_OPS,
    ] {
        #[repr(C)]
        struct Query {
            target_fd: u32,
            attach_type: u32,
            query_flags: u32,
            attach_flags: u32,
            prog_ids: u64,
            prog_cnt: u32,
            _pad: u32,
        }
        let mut ids = [0u32; 32];
        let mut q = Query {
            target_fd: dir.as_raw_fd() as u32,
            attach_type,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            _pad: 0,
        };
        bpf(BPF_PROG_QUERY, &mut q)
            .unwrap_or_else(|e| panic!("BPF_PROG_QUERY on {}: {e}", cgroup.display()));
        for &id in &ids[..q.prog_cnt as usize] {
            out.push(Attached {
                attach_type,
                flags: q.attach_flags,
                id,
                name: program_name(id),
            });
        }
    }
    out
}

fn program_name(id: u32) -> String {
    #[repr(C)]
    struct GetFd {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let Ok(fd) = bpf(
        BPF_PROG_GET_FD_BY_ID,
        &mut GetFd {
            prog_id: id,
            next_id: 0,
            open_flags: 0,
        },
    ) else {
        return String::new();
    };
    // SAFETY: a new fd from the kernel, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_prog_info up to and including `name` (offset 64, 16 bytes).
    let mut info = [0u8; 80];
    let mut attr = GetInfo {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: info.len() as u32,
        info: info.as_mut_ptr() as u64,
    };
    if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).is_err() {
        return String::new();
    }
    let name = &info[64..80];
    String::from_utf8_lossy(&name[..name.iter().position(|b| *b == 0).unwrap_or(16)]).into_owned()
}

/// How a [`Neighbour`] attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// A bpf link (BPF_LINK_CREATE), as modern tools and the agent attach.
    Link,
    /// Legacy BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI.
    Multi,
    /// Legacy BPF_PROG_ATTACH with no flags: exclusive.
    Exclusive,
}

/// Another tool's connect4 program at a cgroup, rewriting `service` to `backend`. Detached on
/// drop.
pub struct Neighbour {
    prog: OwnedFd,
    cgroup: File,
    how: Attach,
    link: Option<OwnedFd>,
}

/// The name the program is loaded under, as `attached` and the agent's messages show it.
pub const NEIGHBOUR_NAME: &str = "svc_lb_connect4";

impl Neighbour {
    pub fn attach(
        cgroup: &Path,
        how: Attach,
        service: SocketAddrV4,
        backend: SocketAddrV4,
    ) -> io::Result<Neighbour> {
        let prog = load_connect4(service, backend)?;
        let cgroup = File::open(cgroup)?;
        let link = match how {
            Attach::Link => {
                #[repr(C)]
                struct LinkCreate {
                    prog_fd: u32,
                    target_fd: u32,
                    attach_type: u32,
                    flags: u32,
                }
                let mut attr = LinkCreate {
                    prog_fd: prog.as_raw_fd() as u32,
                    target_fd: cgroup.as_raw_fd() as u32,
                    attach_type: BPF_CGROUP_INET4_CONNECT,
                    flags: 0,
                };
                let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
                // SAFETY: a new fd from the kernel, owned here.
                Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
            }
            Attach::Multi | Attach::Exclusive => {
                let flags = if how == Attach::Multi {
                    BPF_F_ALLOW_MULTI
                } else {
                    0
                };
                bpf(BPF_PROG_ATTACH, &mut attach_attr(&cgroup, &prog, flags))?;
                None
            }
        };
        Ok(Neighbour {
            prog,
            cgroup,
            how,
            link,
        })
    }

    pub fn how(&self) -> Attach {
        self.how
    }

    /// Pins the neighbour's link at `path` (a bpffs path): it stays attached after this handle
    /// is dropped, as an agent's pinned programs do after it exits.
    pub fn pin(&self, path: &Path) -> io::Result<()> {
        let link = self
            .link
            .as_ref()
            .ok_or_else(|| io::Error::other("only a link can be pinned"))?;
        pin_fd(link, path)
    }
}

/// Pins `fd` (a link or a map) at `path`.
fn pin_fd(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// A small array map (4-byte keys, `value_size`-byte values), pinned at `path`: what another
/// layout's map looks like to an agent that must not reuse it.
pub fn pin_array_map(path: &Path, value_size: u32) -> io::Result<()> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size,
        max_entries: 1,
        map_flags: 0,
    };
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: a new fd from the kernel, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    pin_fd(&fd, path)
}

#[repr(C)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn attach_attr(cgroup: &File, prog: &OwnedFd, flags: u32) -> AttachAttr {
    AttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_INET4_CONNECT,
        attach_flags: flags,
        replace_bpf_fd: 0,
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        // A link detaches when its last fd closes; a legacy attachment must be detached.
        if self.link.take().is_none() {
            let _ = bpf(
                BPF_PROG_DETACH,
                &mut attach_attr(&self.cgroup, &self.prog, 0),
            );
        }
    }
}

/// The address as `bpf_sock_addr.user_ip4` holds it: network byte order, read as a u32.
fn ip4(addr: &SocketAddrV4) -> i32 {
    u32::from_ne_bytes(addr.ip().octets()) as i32
}

/// The port as `bpf_sock_addr.user_port` holds it: network byte order in the low 16 bits.
fn port(addr: &SocketAddrV4) -> i32 {
    i32::from(u16::from_ne_bytes(addr.port().to_be_bytes()))
}

/// One instruction: opcode, registers (dst in the low nibble), offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = (src << 4) | dst;
    i[2..4].copy_from_slice(&off.to_ne_bytes());
    i[4..8].copy_from_slice(&imm.to_ne_bytes());
    i
}

/// Loads: if the connect is to `service`, rewrite it to `backend`; always allow.
fn load_connect4(service: SocketAddrV4, backend: SocketAddrV4) -> io::Result<OwnedFd> {
    // Offsets in struct bpf_sock_addr.
    const USER_IP4: i16 = 4;
    const USER_PORT: i16 = 24;
    const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
    const STX_W: u8 = 0x63; // *(u32 *)(r_dst + off) = r_src
    const JNE32_K: u8 = 0x56; // if (u32)r_dst != imm goto +off
    const MOV64_K: u8 = 0xb7; // r_dst = imm
    const EXIT: u8 = 0x95;
    let program = [
        insn(LDX_W, 2, 1, USER_IP4, 0),
        insn(JNE32_K, 2, 0, 6, ip4(&service)),
        insn(LDX_W, 2, 1, USER_PORT, 0),
        insn(JNE32_K, 2, 0, 4, port(&service)),
        insn(MOV64_K, 2, 0, 0, ip4(&backend)),
        insn(STX_W, 1, 2, USER_IP4, 0),
        insn(MOV64_K, 2, 0, 0, port(&backend)),
        insn(STX_W, 1, 2, USER_PORT, 0),
        insn(MOV64_K, 0, 0, 0, 1),
        insn(EXIT, 0, 0, 0, 0),
    ];
    let license = CString::new("GPL").unwrap();
    let mut log = vec![0u8; 4096];
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let mut name = [0u8; 16];
    name[..NEIGHBOUR_NAME.len()].copy_from_slice(NEIGHBOUR_NAME.as_bytes());
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_INET4_CONNECT,
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let text = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)])
            .into_owned();
        io::Error::new(
            e.kind(),
            format!("loading the neighbour program: {e}; verifier: {text}"),
        )
    })?;
    // SAFETY: a new fd from the kernel, owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

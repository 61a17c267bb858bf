//! The bpf(2) commands aya does not expose: open a pinned object, swap a link's program, and ask
//! a cgroup which programs are attached to it.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

// From the kernel's uapi `enum bpf_cmd` (also aya-obj's generated bindings).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `attach_flags` of a cgroup attachment: what else may attach at and below the cgroup.
pub const BPF_F_ALLOW_OVERRIDE: u32 = 1;
pub const BPF_F_ALLOW_MULTI: u32 = 2;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The `query` member of `union bpf_attr`, up to `prog_cnt`: what every kernel since 4.15
/// accepts (later fields must be zero on older kernels, so they are left out).
#[repr(C)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix for `cmd` that outlives the
    // call; the kernel reads at most size_of::<T>() bytes and writes only within them.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// The programs attached directly to `cgroup` for `attach_type` (not inherited ones), and the
/// flags of the legacy attachment there (0 when none, or when only bpf links are attached).
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<(u32, Vec<u32>)> {
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok((attr.attach_flags, ids))
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
/// Hash maps support it from Linux 5.14.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `map_elem` member of `union bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// What a lookup found.
pub enum Lookup {
    Found,
    Missing,
    /// The kernel does not offer the command for this map type.
    Unsupported,
}

fn map_elem<K, V>(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    key: &K,
    value: Option<&mut V>,
) -> io::Result<Lookup> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value.map_or(0, |v| v as *mut V as u64),
        flags: 0,
    };
    match bpf(cmd, &mut attr) {
        Ok(_) => Ok(Lookup::Found),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Lookup::Missing),
        // ENOTSUPP (524, kernel-internal) or EINVAL from kernels without the command.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL) | Some(524) | Some(libc::EOPNOTSUPP)
            ) =>
        {
            Ok(Lookup::Unsupported)
        }
        Err(e) => Err(e),
    }
}

/// Reads and removes `key` in one command; `value` is written when found. The key and value
/// must be the map's `#[repr(C)]` types, with padding zeroed.
pub fn map_lookup_and_delete<K, V>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &mut V,
) -> io::Result<Lookup> {
    map_elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, map, key, Some(value))
}

pub fn map_lookup<K, V>(map: BorrowedFd<'_>, key: &K, value: &mut V) -> io::Result<Lookup> {
    map_elem(BPF_MAP_LOOKUP_ELEM, map, key, Some(value))
}

pub fn map_delete<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<Lookup> {
    map_elem::<K, u8>(BPF_MAP_DELETE_ELEM, map, key, None)
}

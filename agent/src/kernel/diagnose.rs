//! Turns a kernel error into its cause, in one sentence an operator can act on.
//!
//! EPERM from an attach has two causes that call for opposite fixes: capabilities that are
//! missing, or a program another tool attached to the same cgroup (or one above it) in the legacy
//! exclusive way, which the kernel lets nothing else join. The effective capability set tells the
//! first; `BPF_PROG_QUERY` on the cgroup and its ancestors names the second.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use pod_identity_common::names;

use super::bpf_sys::{self, BPF_F_ALLOW_MULTI, BPF_F_ALLOW_OVERRIDE};

/// Where an attach was tried: the cgroup and the program's name in the kernel object.
pub struct AttachSite<'a> {
    pub cgroup: &'a Path,
    pub program: &'a str,
}

/// Adds the likely cause to an error from the kernel, from the errno deepest in the chain; for an
/// attach (`site`), EPERM is traced to missing capabilities or to the program in the way.
pub fn explain(err: anyhow::Error, site: Option<AttachSite<'_>>) -> anyhow::Error {
    let errno = err
        .chain()
        .find_map(|e| e.downcast_ref::<io::Error>())
        .and_then(io::Error::raw_os_error);
    let hint = match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => match missing_capabilities() {
            Some(missing) => format!(
                "permission denied: the agent lacks {missing} in its effective capability set; it needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN): run it privileged or grant them"
            ),
            None => match site.and_then(|site| program_in_the_way(&site)) {
                Some(in_the_way) => in_the_way,
                None => "permission denied by the kernel although the agent holds CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON: a security module (SELinux, AppArmor, lockdown) or a seccomp profile refuses bpf()".to_owned(),
            },
        },
        // A seccomp profile's default action: containerd's RuntimeDefault answers ENOSYS for
        // bpf() unless the container was granted CAP_BPF (or CAP_SYS_ADMIN).
        Some(libc::ENOSYS) => match missing_capabilities() {
            Some(missing) => format!(
                "bpf() is blocked (ENOSYS): the agent lacks {missing}, and a seccomp profile such as containerd's RuntimeDefault allows bpf() only to a container granted CAP_BPF (or CAP_SYS_ADMIN); grant CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
            ),
            None => "bpf() is blocked (ENOSYS): a seccomp profile refuses it although the agent holds CAP_BPF, or the kernel lacks CONFIG_BPF_SYSCALL".to_owned(),
        },
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
            "the kernel rejected the program or attachment: it needs Linux >= 5.7 with cgroup v2 BPF (cgroup/connect4, connect6, sock_ops) and bpf links".to_owned()
        }
        Some(libc::ENOENT) => "not found: is the kernel built with CONFIG_CGROUP_BPF and is the path a cgroup2 directory?".to_owned(),
        Some(libc::EBADF) => "the cgroup root is not a cgroup2 directory".to_owned(),
        _ => return err,
    };
    err.context(hint)
}

// Capability numbers from linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities the agent needs but does not hold, by name; `None` when it holds them.
fn missing_capabilities() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())?;
    missing_from(effective)
}

fn missing_from(effective: u64) -> Option<String> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON; attaching to a cgroup needs
    // CAP_NET_ADMIN either way.
    let needed: &[(u32, &str)] = if has(CAP_SYS_ADMIN) {
        &[(CAP_NET_ADMIN, "CAP_NET_ADMIN")]
    } else {
        &[
            (CAP_BPF, "CAP_BPF"),
            (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
            (CAP_PERFMON, "CAP_PERFMON"),
        ]
    };
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// The kernel's attach type for each of the agent's programs (uapi `enum bpf_attach_type`).
fn attach_type(program: &str) -> Option<u32> {
    match program {
        names::SOCK_OPS => Some(3),
        names::CONNECT4 => Some(10),
        names::CONNECT6 => Some(11),
        names::SK_LOOKUP => Some(36),
        _ => None,
    }
}

/// The ids of the programs the kernel has attached where the agent's go, per program name: the
/// cgroup programs' attach types directly at `cgroup` (the attach root), `steer`'s at this
/// process's network namespace. Only ids: naming a program by id takes CAP_SYS_ADMIN, which the
/// agent's container does not have; the running agent reports its own ids (`/v1/agent`).
pub fn attached(cgroup: &Path) -> BTreeMap<&'static str, Vec<u32>> {
    let netns = File::open("/proc/self/ns/net");
    let cgroup = File::open(cgroup);
    [
        names::CONNECT4,
        names::CONNECT6,
        names::SOCK_OPS,
        names::SK_LOOKUP,
    ]
    .into_iter()
    .map(|program| {
        let target = if program == names::SK_LOOKUP {
            &netns
        } else {
            &cgroup
        };
        let ids = match (target, attach_type(program)) {
            (Ok(target), Some(attach_type)) => bpf_sys::prog_query(target.as_fd(), attach_type)
                .map(|(_, ids)| ids)
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        (program, ids)
    })
    .collect()
}

/// Before anything is attached: a sentence naming a program that would make one of the agent's
/// attachments fail (see [`program_in_the_way`]), so the agent fails cleanly instead of halfway.
/// `None` when nothing is in the way, or when the cgroup cannot be asked.
pub fn exclusive_in_the_way(cgroup: &Path) -> Option<String> {
    [names::SOCK_OPS, names::CONNECT4, names::CONNECT6]
        .into_iter()
        .find_map(|program| program_in_the_way(&AttachSite { cgroup, program }))
}

/// A sentence naming the program attached without `BPF_F_ALLOW_MULTI` at the cgroup or one of
/// its ancestors: with it there, the kernel refuses every other attachment of that type.
fn program_in_the_way(site: &AttachSite<'_>) -> Option<String> {
    let attach_type = attach_type(site.program)?;
    let mut dir: Option<PathBuf> = Some(site.cgroup.to_path_buf());
    while let Some(cgroup) = dir {
        let Ok(file) = File::open(&cgroup) else { break };
        if let Ok((flags, ids)) = bpf_sys::prog_query(file.as_fd(), attach_type)
            && !ids.is_empty()
            && flags & BPF_F_ALLOW_MULTI == 0
        {
            let how = if flags & BPF_F_ALLOW_OVERRIDE != 0 {
                "with BPF_F_ALLOW_OVERRIDE"
            } else {
                "exclusively (no flags)"
            };
            let programs: Vec<String> = ids.iter().map(|id| describe_program(*id)).collect();
            let place = if cgroup == site.cgroup {
                "to this cgroup".to_owned()
            } else {
                format!("to the parent cgroup {}", cgroup.display())
            };
            let kind = site.program;
            return Some(format!(
                "{} is attached {place} {how} as a {kind} program: a legacy attachment that lets no other {kind} program attach at or below it, and the agent does not displace it; re-attach it with BPF_F_ALLOW_MULTI or as a bpf link, or run the agent with --mode link",
                programs.join(", ")
            ));
        }
        // Only cgroup2 directories answer the query: stop at the top of the hierarchy.
        dir = cgroup
            .parent()
            .filter(|p| p.join("cgroup.procs").exists())
            .map(Path::to_path_buf);
    }
    None
}

/// A loaded program's name, when the kernel has one for it.
fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
        .filter(|n| !n.is_empty())
}

/// `program 'name' (id N)`, as much as the kernel tells.
fn describe_program(id: u32) -> String {
    match program_name(id) {
        Some(name) => format!("program '{name}' (id {id})"),
        None => format!("program id {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_are_named() {
        let all = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON);
        assert_eq!(missing_from(all), None);
        assert_eq!(
            missing_from((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)),
            None
        );
        assert_eq!(
            missing_from(1 << CAP_NET_ADMIN).as_deref(),
            Some("CAP_BPF, CAP_PERFMON")
        );
        assert_eq!(
            missing_from(0).as_deref(),
            Some("CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON")
        );
        assert_eq!(
            missing_from(1 << CAP_SYS_ADMIN).as_deref(),
            Some("CAP_NET_ADMIN")
        );
    }
}

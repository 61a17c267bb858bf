//! From the cgroup id the kernel recorded for a connection to the pod that opened it.
//!
//! A cgroup id is the inode number of the cgroup's directory in the cgroup2 hierarchy. The index
//! maps ids to paths by walking the tree below the attach root. A miss walks again only when the
//! last walk began before the connection was accepted: the caller's cgroup existed before it
//! connected, so a walk that began after the accept has seen it if it still exists. Concurrent
//! misses therefore share one walk, and a miss never waits on a timer.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use crate::token::PodUid;

/// Who is behind a cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A process in a pod's cgroup (also a hostNetwork pod).
    Pod { uid: PodUid, cgroup: String },
    /// A process in a cgroup that belongs to no pod (a host daemon, a shell on the node).
    Host { cgroup: String },
}

/// The pod UID in a cgroup path, from the first segment that names one.
///
/// Handles the systemd driver (`kubepods-burstable-pod<uid with _>.slice`, `kubepods-pod<uid>.slice`)
/// and the cgroupfs driver (`kubepods/burstable/pod<uid>`), with any container runtime's scope
/// below and nested cgroups below that.
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<PodUid> {
    path.split('/').find_map(pod_uid_in_segment)
}

fn pod_uid_in_segment(segment: &str) -> Option<PodUid> {
    let mut rest = segment;
    while let Some(at) = rest.find("pod") {
        let candidate = &rest[at + 3..];
        if let Some(uid) = candidate.get(..36).and_then(PodUid::parse) {
            // The UID must end the segment or be followed by the systemd unit suffix.
            let after = &candidate[36..];
            let preceded_ok = at == 0 || rest.as_bytes()[at - 1] == b'-';
            if preceded_ok && (after.is_empty() || after.starts_with('.')) {
                return Some(uid);
            }
        }
        rest = &rest[at + 3..];
    }
    None
}

pub struct CgroupIndex {
    /// The cgroup2 mount point: paths are shown relative to it, as /proc/PID/cgroup shows them.
    mount: PathBuf,
    /// Where walks start: the attach root, the only part of the tree that is redirected.
    root: PathBuf,
    state: Mutex<IndexState>,
}

struct IndexState {
    /// Each cgroup's caller, worked out once per walk: resolving is a lookup and a clone of a
    /// pointer.
    by_id: HashMap<u64, Arc<Caller>>,
    /// When the walk that produced `by_id` began.
    walked_at: Instant,
}

impl CgroupIndex {
    /// Builds the index with one walk; fails if `root` cannot be read.
    pub fn build(mount: &Path, root: &Path) -> std::io::Result<CgroupIndex> {
        let walked_at = Instant::now();
        let by_id = walk(mount, root)?;
        Ok(CgroupIndex {
            mount: mount.to_path_buf(),
            root: root.to_path_buf(),
            state: Mutex::new(IndexState { by_id, walked_at }),
        })
    }

    /// Resolves the cgroup id of a connection accepted at `accepted_at`; `None` when no cgroup
    /// with that id exists below the root (it was removed since the connect).
    pub fn resolve(&self, cgroup_id: u64, accepted_at: Instant) -> Option<Arc<Caller>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.by_id.contains_key(&cgroup_id) && state.walked_at <= accepted_at {
            let walked_at = Instant::now();
            if let Ok(by_id) = walk(&self.mount, &self.root) {
                *state = IndexState { by_id, walked_at };
            }
        }
        state.by_id.get(&cgroup_id).cloned()
    }
}

impl CgroupIndex {
    /// Cgroups known from the last walk.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).by_id.len()
    }

    /// Walks the tree now and returns the pods that have a cgroup: the agent's view of which pods
    /// exist on the node.
    pub fn present_pods(&self) -> std::io::Result<std::collections::HashSet<PodUid>> {
        let walked_at = Instant::now();
        let by_id = walk(&self.mount, &self.root)?;
        let pods = by_id
            .values()
            .filter_map(|caller| match &**caller {
                Caller::Pod { uid, .. } => Some(uid.clone()),
                Caller::Host { .. } => None,
            })
            .collect();
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = IndexState { by_id, walked_at };
        Ok(pods)
    }
}

/// The caller behind a cgroup path (relative to the mount).
fn caller_of(path: String) -> Arc<Caller> {
    Arc::new(match pod_uid_from_cgroup_path(&path) {
        Some(uid) => Caller::Pod { uid, cgroup: path },
        None => Caller::Host { cgroup: path },
    })
}

/// Every cgroup directory at or below `root`, by inode number, with its caller.
fn walk(mount: &Path, root: &Path) -> std::io::Result<HashMap<u64, Arc<Caller>>> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    let root_meta = fs::metadata(root)?;
    out.insert(root_meta.ino(), caller_of(display_path(mount, root)));
    while let Some(dir) = stack.pop() {
        // A cgroup can vanish mid-walk: skip it rather than fail the walk.
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if !kind.is_dir() {
                continue;
            }
            let path = entry.path();
            if let Ok(meta) = entry.metadata() {
                out.insert(meta.ino(), caller_of(display_path(mount, &path)));
                stack.push(path);
            }
        }
    }
    Ok(out)
}

fn display_path(mount: &Path, path: &Path) -> String {
    match path.strip_prefix(mount) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => path.display().to_string(),
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = procfs::process::Process::myself()?.mountinfo()?;
    mounts
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .ok_or_else(|| anyhow::anyhow!("no cgroup2 filesystem is mounted (see /proc/self/mountinfo); the agent needs cgroup v2"))
}

/// The directory and id of the cgroup this process runs in.
pub fn own_cgroup(mount: &Path) -> anyhow::Result<(PathBuf, u64)> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| anyhow::anyhow!("/proc/self/cgroup has no cgroup v2 entry"))?;
    let dir = mount.join(rel.trim_start_matches('/'));
    let id = fs::metadata(&dir).map_err(|e| anyhow::anyhow!("cannot stat own cgroup {}: {e}", dir.display()))?.ino();
    Ok((dir, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn uid(path: &str) -> Option<String> {
        pod_uid_from_cgroup_path(path).map(|u| u.to_string())
    }

    #[test]
    fn systemd_driver_paths() {
        let u = UID.replace('-', "_");
        for qos in ["burstable", "besteffort"] {
            for runtime in ["cri-containerd-abc123.scope", "crio-abc.scope", "docker-abc.scope"] {
                let p = format!("/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice/{runtime}");
                assert_eq!(uid(&p).as_deref(), Some(UID), "{p}");
            }
        }
        // Guaranteed pods sit directly under kubepods.slice.
        let p = format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-1.scope");
        assert_eq!(uid(&p).as_deref(), Some(UID));
        // The pod-level cgroup itself, and cgroups nested below a container.
        assert_eq!(uid(&format!("/kubepods.slice/kubepods-pod{u}.slice")).as_deref(), Some(UID));
        let p = format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-1.scope/init/worker");
        assert_eq!(uid(&p).as_deref(), Some(UID));
    }

    #[test]
    fn cgroupfs_driver_paths() {
        assert_eq!(uid(&format!("/kubepods/burstable/pod{UID}/0123abcd")).as_deref(), Some(UID));
        assert_eq!(uid(&format!("/kubepods/pod{UID}/0123abcd")).as_deref(), Some(UID));
        // Below a per-test or per-node prefix.
        assert_eq!(uid(&format!("/pia-test/kubepods/besteffort/pod{UID}/c")).as_deref(), Some(UID));
    }

    #[test]
    fn host_paths_have_no_pod() {
        for p in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            "/kubepods.slice/kubepods-burstable.slice",
            "/podman.slice/podxyz",
            &format!("/kubepods/burstable/xpod{UID}/c"),
            &format!("/kubepods/burstable/pod{UID}x/c"),
        ] {
            assert_eq!(uid(p), None, "{p}");
        }
    }

    #[test]
    fn index_walks_and_rescans() {
        let dir = std::env::temp_dir().join(format!("pia-index-{}", std::process::id()));
        let pod = dir.join(format!("kubepods/burstable/pod{UID}/ctr"));
        fs::create_dir_all(&pod).unwrap();
        let index = CgroupIndex::build(&dir, &dir).unwrap();
        let pod_ino = fs::metadata(&pod).unwrap().ino();
        match index.resolve(pod_ino, Instant::now()).as_deref() {
            Some(Caller::Pod { uid, cgroup }) => {
                assert_eq!(uid.as_str(), UID);
                assert_eq!(*cgroup, format!("/kubepods/burstable/pod{UID}/ctr"));
            }
            other => panic!("unexpected {other:?}"),
        }
        // Created (and connected from) after the last walk: found by a new walk.
        let host = dir.join("system.slice");
        fs::create_dir_all(&host).unwrap();
        let host_ino = fs::metadata(&host).unwrap().ino();
        assert_eq!(index.resolve(host_ino, Instant::now()).as_deref(), Some(&Caller::Host { cgroup: "/system.slice".into() }));
        // A miss for a connection accepted before the last walk does not walk again; one accepted
        // after it does.
        let before = Instant::now();
        assert!(index.resolve(u64::MAX, Instant::now()).is_none());
        let late = dir.join("late.slice");
        fs::create_dir_all(&late).unwrap();
        let late_ino = fs::metadata(&late).unwrap().ino();
        assert!(index.resolve(late_ino, before).is_none());
        assert_eq!(index.resolve(late_ino, Instant::now()).as_deref(), Some(&Caller::Host { cgroup: "/late.slice".into() }));
        fs::remove_dir_all(&dir).unwrap();
    }
}

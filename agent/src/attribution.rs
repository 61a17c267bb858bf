//! From the cgroup id the kernel recorded for a connection to the pod that opened it.
//!
//! A cgroup id is the inode number of the cgroup's directory in the cgroup2 hierarchy. The index
//! maps ids to paths by walking the tree below the attach root. A miss needs a walk only when the
//! last walk began before the connection was accepted: the caller's cgroup existed before it
//! connected, so a walk that began after the accept has seen it if it still exists. The walk
//! itself is the caller's to schedule ([`CgroupIndex::rewalk`], blocking): the server runs it
//! off the async runtime, one at a time, and concurrent misses share it. An id a walk did not
//! find is remembered for a while, so a caller whose cgroup is gone cannot make the agent walk
//! the tree again and again.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
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

/// What the index says of a cgroup id without walking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    Caller(Arc<Caller>),
    /// No such cgroup below the root: a walk that began after the connection did not find it.
    Gone,
    /// Not seen yet: a walk that begins now will tell.
    Unknown,
}

/// How long an id a walk did not find is answered as gone without walking again, and how many
/// such ids are remembered.
const MISS_MEMORY: Duration = Duration::from_secs(30);
const MISSES_KEPT: usize = 4096;

struct IndexState {
    /// Each cgroup's caller, worked out once per walk: resolving is a lookup and a clone of a
    /// pointer.
    by_id: HashMap<u64, Arc<Caller>>,
    /// Ids a walk did not find, and when.
    missed: HashMap<u64, Instant>,
    /// Each pod's own cgroup directory (relative to the mount), to tell whether it still exists
    /// with one `stat` rather than a walk.
    pod_dirs: HashMap<PodUid, String>,
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
            state: Mutex::new(IndexState::new(by_id, walked_at)),
        })
    }

    /// What the index knows of the cgroup id of a connection accepted at `accepted_at`, without
    /// walking.
    pub fn lookup(&self, cgroup_id: u64, accepted_at: Instant) -> Resolved {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(caller) = state.by_id.get(&cgroup_id) {
            return Resolved::Caller(caller.clone());
        }
        let missed_lately = state
            .missed
            .get(&cgroup_id)
            .is_some_and(|at| at.elapsed() < MISS_MEMORY);
        if missed_lately || state.walked_at > accepted_at {
            Resolved::Gone
        } else {
            Resolved::Unknown
        }
    }

    /// Walks the tree again (blocking) unless a walk began after `accepted_at`, then answers
    /// for `cgroup_id`, remembering it as gone if the walk did not find it.
    pub fn rewalk(&self, cgroup_id: u64, accepted_at: Instant) -> std::io::Result<Resolved> {
        let stale = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .walked_at
            <= accepted_at;
        if stale {
            let walked_at = Instant::now();
            let by_id = walk(&self.mount, &self.root)?;
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let missed = std::mem::take(&mut state.missed);
            *state = IndexState::new(by_id, walked_at);
            state.missed = missed;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(caller) = state.by_id.get(&cgroup_id) {
            return Ok(Resolved::Caller(caller.clone()));
        }
        if state.missed.len() >= MISSES_KEPT {
            state.missed.retain(|_, at| at.elapsed() < MISS_MEMORY);
            if state.missed.len() >= MISSES_KEPT {
                state.missed.clear();
            }
        }
        state.missed.insert(cgroup_id, Instant::now());
        Ok(Resolved::Gone)
    }
}

impl CgroupIndex {
    /// Cgroups known from the last walk.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .len()
    }

    /// Pods the last walk saw.
    pub fn pods(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pod_dirs
            .len()
    }

    /// Of `pods`, those whose cgroups are gone: one `stat` per pod the index knows, and one walk
    /// at most for pods it does not know yet. This runs every few seconds on a node of hundreds
    /// of pods, where walking the whole tree each time would cost a core's share.
    ///
    /// It names the gone rather than the present so that a caller forgets only what it asked
    /// about: a pod first seen while this ran is not in `pods`, and must not be taken for gone.
    pub fn gone(&self, pods: &HashSet<PodUid>) -> std::io::Result<HashSet<PodUid>> {
        let unknown = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            pods.iter().any(|p| !state.pod_dirs.contains_key(p))
        };
        if unknown {
            let walked_at = Instant::now();
            let by_id = walk(&self.mount, &self.root)?;
            *self.state.lock().unwrap_or_else(|e| e.into_inner()) =
                IndexState::new(by_id, walked_at);
        }
        // A pod even a fresh walk did not find has no cgroup left.
        let dirs: Vec<(PodUid, Option<PathBuf>)> = {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            pods.iter()
                .map(|p| {
                    (
                        *p,
                        state
                            .pod_dirs
                            .get(p)
                            .map(|d| self.mount.join(d.trim_start_matches('/'))),
                    )
                })
                .collect()
        };
        let gone: HashSet<PodUid> = dirs
            .into_iter()
            .filter(|(_, dir)| !dir.as_ref().is_some_and(|d| d.exists()))
            .map(|(uid, _)| uid)
            .collect();
        if !gone.is_empty() {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.pod_dirs.retain(|uid, _| !gone.contains(uid));
            state.by_id.retain(
                |_, caller| !matches!(&**caller, Caller::Pod { uid, .. } if gone.contains(uid)),
            );
        }
        Ok(gone)
    }
}

impl IndexState {
    fn new(by_id: HashMap<u64, Arc<Caller>>, walked_at: Instant) -> IndexState {
        let mut pod_dirs = HashMap::new();
        for caller in by_id.values() {
            if let Caller::Pod { uid, cgroup } = &**caller {
                let dir = pod_dir(cgroup);
                // The shortest path naming the pod is its own directory.
                let entry = pod_dirs.entry(*uid).or_insert_with(|| dir.to_owned());
                if dir.len() < entry.len() {
                    dir.clone_into(entry);
                }
            }
        }
        IndexState {
            by_id,
            missed: HashMap::new(),
            pod_dirs,
            walked_at,
        }
    }
}

/// The path up to and including the segment that names the pod.
fn pod_dir(path: &str) -> &str {
    let mut end = 0;
    for segment in path.split('/') {
        end += segment.len();
        if pod_uid_in_segment(segment).is_some() {
            return &path[..end];
        }
        end += 1;
    }
    path
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
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
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

/// The cgroup2 mount point, from /proc/self/mountinfo: the one that holds `root` when it is
/// given (in a container, the first cgroup2 mount is often the container's own view of its
/// cgroup namespace, not the host hierarchy mounted at `--cgroup-root`), else the first.
pub fn cgroup2_mount(root: Option<&Path>) -> anyhow::Result<PathBuf> {
    let mounts: Vec<PathBuf> = procfs::process::Process::myself()?
        .mountinfo()?
        .into_iter()
        .filter(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
        .collect();
    let holding = root.and_then(|root| {
        mounts
            .iter()
            .filter(|m| root.starts_with(m))
            .max_by_key(|m| m.components().count())
    });
    holding.or(mounts.first()).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo); the agent needs cgroup v2"
        )
    })
}

/// The directory and id of the cgroup this process runs in, below `mount`.
///
/// `/proc/self/cgroup` names it relative to the process's cgroup namespace; in a container
/// with a private cgroup namespace (containerd's default on cgroup v2) that is `/`, which says
/// nothing about where the host hierarchy mounted at `mount` has it. So the answer is checked:
/// the cgroup's `cgroup.procs` must list this process, and if it does not, the hierarchy is
/// searched for the cgroup that does.
pub fn own_cgroup(mount: &Path) -> anyhow::Result<(PathBuf, u64)> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| anyhow::anyhow!("/proc/self/cgroup has no cgroup v2 entry"))?;
    let pid = std::process::id();
    let listed = |dir: &Path| {
        fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)))
    };
    let named = mount.join(rel.trim_start_matches('/'));
    let dir = if listed(&named) {
        named
    } else {
        find_cgroup_listing(mount, &listed)
            .ok_or_else(|| anyhow::anyhow!("this process (pid {pid}) is in no cgroup below {}: is it the host's cgroup2 hierarchy?", mount.display()))?
    };
    let id = fs::metadata(&dir)
        .map_err(|e| anyhow::anyhow!("cannot stat own cgroup {}: {e}", dir.display()))?
        .ino();
    Ok((dir, id))
}

/// The first cgroup at or below `root` for which `listed` holds.
fn find_cgroup_listing(root: &Path, listed: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if listed(&dir) {
            return Some(dir);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        stack.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    None
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
            for runtime in [
                "cri-containerd-abc123.scope",
                "crio-abc.scope",
                "docker-abc.scope",
            ] {
                let p = format!(
                    "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice/{runtime}"
                );
                assert_eq!(uid(&p).as_deref(), Some(UID), "{p}");
            }
        }
        // Guaranteed pods sit directly under kubepods.slice.
        let p = format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-1.scope");
        assert_eq!(uid(&p).as_deref(), Some(UID));
        // The pod-level cgroup itself, and cgroups nested below a container.
        assert_eq!(
            uid(&format!("/kubepods.slice/kubepods-pod{u}.slice")).as_deref(),
            Some(UID)
        );
        let p = format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-1.scope/init/worker");
        assert_eq!(uid(&p).as_deref(), Some(UID));
    }

    #[test]
    fn cgroupfs_driver_paths() {
        assert_eq!(
            uid(&format!("/kubepods/burstable/pod{UID}/0123abcd")).as_deref(),
            Some(UID)
        );
        assert_eq!(
            uid(&format!("/kubepods/pod{UID}/0123abcd")).as_deref(),
            Some(UID)
        );
        // Below a per-test or per-node prefix.
        assert_eq!(
            uid(&format!("/pia-test/kubepods/besteffort/pod{UID}/c")).as_deref(),
            Some(UID)
        );
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
    fn own_cgroup_is_found_by_the_process_list_when_the_name_says_nothing() {
        let dir = std::env::temp_dir().join(format!("pia-own-{}", std::process::id()));
        let mine = dir.join("kubepods/burstable/podx/agent");
        fs::create_dir_all(&mine).unwrap();
        fs::create_dir_all(dir.join("kubepods/besteffort/pody/other")).unwrap();
        fs::write(
            dir.join("kubepods/besteffort/pody/other/cgroup.procs"),
            "1\n2\n",
        )
        .unwrap();
        fs::write(
            mine.join("cgroup.procs"),
            format!("7\n{}\n", std::process::id()),
        )
        .unwrap();
        let pid = std::process::id();
        let listed = |d: &Path| {
            fs::read_to_string(d.join("cgroup.procs"))
                .is_ok_and(|p| p.lines().any(|l| l.parse() == Ok(pid)))
        };
        assert_eq!(find_cgroup_listing(&dir, &listed), Some(mine));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn presence_is_checked_per_pod() {
        let dir = std::env::temp_dir().join(format!("pia-presence-{}", std::process::id()));
        let u = UID.replace('-', "_");
        let pod = dir.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"
        ));
        fs::create_dir_all(pod.join("cri-containerd-1.scope/nested")).unwrap();
        assert_eq!(
            pod_dir(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-1.scope"
            )),
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
        );
        let index = CgroupIndex::build(&dir, &dir).unwrap();
        let uid = PodUid::parse(UID).unwrap();
        let other = PodUid::parse("00000000-0000-0000-0000-0000000000ff").unwrap();
        let asked = HashSet::from([uid, other]);
        assert_eq!(index.gone(&asked).unwrap(), HashSet::from([other]));
        assert_eq!(index.pods(), 1);
        fs::remove_dir_all(&pod).unwrap();
        assert_eq!(index.gone(&asked).unwrap(), asked);
        assert_eq!(index.pods(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// What the server does: the index's answer, walking again when it does not know.
    fn resolve(index: &CgroupIndex, id: u64, accepted_at: Instant) -> Option<Arc<Caller>> {
        let resolved = match index.lookup(id, accepted_at) {
            Resolved::Unknown => index.rewalk(id, accepted_at).unwrap(),
            known => known,
        };
        match resolved {
            Resolved::Caller(caller) => Some(caller),
            Resolved::Gone | Resolved::Unknown => None,
        }
    }

    #[test]
    fn index_walks_and_rescans() {
        let dir = std::env::temp_dir().join(format!("pia-index-{}", std::process::id()));
        let pod = dir.join(format!("kubepods/burstable/pod{UID}/ctr"));
        fs::create_dir_all(&pod).unwrap();
        let index = CgroupIndex::build(&dir, &dir).unwrap();
        let pod_ino = fs::metadata(&pod).unwrap().ino();
        match resolve(&index, pod_ino, Instant::now()).as_deref() {
            Some(Caller::Pod { uid, cgroup }) => {
                assert_eq!(uid.as_str(), UID);
                assert_eq!(*cgroup, format!("/kubepods/burstable/pod{UID}/ctr"));
            }
            other => panic!("unexpected {other:?}"),
        }
        // Created (and connected from) after the last walk: unknown until a new walk finds it.
        let host = dir.join("system.slice");
        fs::create_dir_all(&host).unwrap();
        let host_ino = fs::metadata(&host).unwrap().ino();
        assert_eq!(index.lookup(host_ino, Instant::now()), Resolved::Unknown);
        assert_eq!(
            resolve(&index, host_ino, Instant::now()).as_deref(),
            Some(&Caller::Host {
                cgroup: "/system.slice".into()
            })
        );
        // A miss for a connection accepted before the last walk needs no walk; one accepted
        // after it does.
        let before = Instant::now();
        assert!(resolve(&index, u64::MAX, Instant::now()).is_none());
        let late = dir.join("late.slice");
        fs::create_dir_all(&late).unwrap();
        let late_ino = fs::metadata(&late).unwrap().ino();
        assert_eq!(index.lookup(late_ino, before), Resolved::Gone);
        assert_eq!(
            resolve(&index, late_ino, Instant::now()).as_deref(),
            Some(&Caller::Host {
                cgroup: "/late.slice".into()
            })
        );
        // An id a walk did not find is answered as gone without walking again.
        assert_eq!(index.lookup(u64::MAX, Instant::now()), Resolved::Gone);
        fs::remove_dir_all(&dir).unwrap();
    }
}

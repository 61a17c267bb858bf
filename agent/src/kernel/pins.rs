//! Where `--pin DIR` keeps the programs' links and shared maps: `DIR/v<N>/links` and
//! `DIR/v<N>/maps`, `N` being the kernel/user contract's version. An agent takes over only the
//! pins of its own version; pins of another layout (an older agent's `DIR/links`, another
//! `DIR/v<M>`) are named and detached once this agent's programs are in place, never reused.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use pod_identity_common::CONTRACT_VERSION;

/// This agent's pin directory, and the pins of other layouts found beside it.
pub struct PinDir {
    /// `DIR/v<CONTRACT_VERSION>`.
    current: PathBuf,
    /// Pinned objects of other layouts: detached once this agent's programs are attached.
    pub foreign: Vec<PathBuf>,
}

impl PinDir {
    /// Prepares `root/v<N>` on a bpffs and lists what else is pinned under `root`.
    pub fn open(root: &Path) -> anyhow::Result<PinDir> {
        check_bpffs(root)?;
        let current = root.join(format!("v{CONTRACT_VERSION}"));
        for sub in ["links", "maps"] {
            fs::create_dir_all(current.join(sub))
                .with_context(|| format!("creating {}", current.join(sub).display()))?;
        }
        let mut foreign = Vec::new();
        for entry in fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
            let path = entry?.path();
            if path != current && is_layout(&path) {
                pinned_files(&path, &mut foreign);
            }
        }
        foreign.sort();
        Ok(PinDir { current, foreign })
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.current.join("links").join(name)
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.current.join("maps").join(name)
    }
}

/// Whether `path` is an agent's pin layout: the first one's `links` and `maps`, or a later
/// one's `v<N>`. Nothing else under the pin directory is the agent's to touch.
fn is_layout(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    matches!(name, "links" | "maps")
        || name
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The pinned objects at or below `path`.
fn pinned_files(path: &Path, out: &mut Vec<PathBuf>) {
    match fs::read_dir(path) {
        Ok(entries) => entries.flatten().for_each(|e| pinned_files(&e.path(), out)),
        Err(_) => out.push(path.to_path_buf()),
    }
}

/// Unpins `objects` and removes the directories they leave empty: a link detaches once no
/// process holds it either (an older agent still running keeps its own until it exits).
pub fn detach(root: &Path, objects: &[PathBuf]) -> io::Result<()> {
    for object in objects {
        match fs::remove_file(object) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut dir = object.parent();
        while let Some(d) = dir.filter(|d| *d != root && d.starts_with(root)) {
            if fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
    }
    Ok(())
}

/// Every pinned object under `root`, of any version.
pub fn all(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir(root) {
        entries
            .flatten()
            .for_each(|e| pinned_files(&e.path(), &mut found));
    }
    found.sort();
    found
}

/// Removes what `--pin DIR` left, every version of it: unpinning the links detaches the
/// programs, unpinning the maps frees them once nothing uses them.
pub fn cleanup(root: &Path) -> anyhow::Result<usize> {
    let objects = all(root);
    detach(root, &objects).with_context(|| format!("unpinning under {}", root.display()))?;
    Ok(objects.len())
}

/// Fails unless `dir` is on a bpffs (pins elsewhere are refused by the kernel with a vague error).
fn check_bpffs(dir: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).context("pin path")?;
    // SAFETY: libc::statfs is a plain C struct of integers: all zeroes is a value of it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into `st`, a properly sized struct.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", probe.display()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        anyhow::bail!(
            "--pin {}: not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_agents_layouts_are_its_to_detach() {
        for ours in ["links", "maps", "v1", "v2", "v10"] {
            assert!(is_layout(Path::new(ours)), "{ours}");
        }
        for theirs in ["cilium", "tc", "v", "vx", "vmlinux", "linksx"] {
            assert!(!is_layout(Path::new(theirs)), "{theirs}");
        }
    }
}

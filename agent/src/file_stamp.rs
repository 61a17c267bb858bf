//! What identifies one version of a watched file. A ConfigMap or Secret volume is updated by
//! swapping a symlink to new content, so the file is known by what its path resolves to.

use std::{os::unix::fs::MetadataExt as _, path::Path};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    inode: u64,
    size: u64,
    modified: (i64, i64),
}

impl FileStamp {
    pub fn of(path: &Path) -> std::io::Result<FileStamp> {
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            inode: m.ino(),
            size: m.size(),
            modified: (m.mtime(), m.mtime_nsec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_changes_the_stamp_and_a_missing_file_has_none() {
        let dir = std::env::temp_dir().join(format!("pia-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, "one").unwrap();
        let first = FileStamp::of(&path).unwrap();
        assert_eq!(FileStamp::of(&path).unwrap(), first);
        std::fs::write(dir.join("g"), "three").unwrap();
        std::fs::rename(dir.join("g"), &path).unwrap();
        assert_ne!(
            FileStamp::of(&path).unwrap(),
            first,
            "a swapped file is a new version"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(FileStamp::of(&path).is_err());
    }
}

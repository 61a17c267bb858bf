//! The cgroup path parser: no input panics, and a UID it finds is really in the path.
#![no_main]

use pod_identity_agent_fuzz::attribution::pod_uid_from_cgroup_path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(uid) = pod_uid_from_cgroup_path(path) {
        let canonical = path.to_ascii_lowercase().replace('_', "-");
        assert!(
            canonical.contains(&format!("pod{}", uid.as_str())),
            "{uid:?} not in {path:?}"
        );
    }
});

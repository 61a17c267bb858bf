//! A real node for the end-to-end tests: Debian's containerd with its CRI plugin, runc, and the
//! CNI bridge, started with a private root, state and socket; images imported as a node's
//! would be; pods run through the CRI as the kubelet runs them (`cri`), from the rendered
//! DaemonSet for the agent and from a pod spec for workloads (`pods`).
//!
//! It runs inside the kernel matrix's 6.1 VM (`cargo xtask test`), where cgroup v2 is the only
//! hierarchy, as on an Amazon Linux 2023 node. Paths come from the environment xtask sets:
//! `PIA_CRI_BIN` (containerd, ctr and the shim), `PIA_CNI_BIN` (the CNI plugins) and
//! `PIA_IMAGES` (the OCI archives).

pub mod containerd;
pub mod cri;
pub mod node;
pub mod pods;

use std::path::PathBuf;

/// A directory named by an environment variable xtask sets.
pub fn env_dir(name: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os(name)
            .unwrap_or_else(|| panic!("{name} is not set: run through cargo xtask test")),
    )
}

//! End-to-end harness: a simulated node (its own network namespace and cgroup subtree), simulated
//! pods (a network namespace joined to the node by veth, plus a kubepods-shaped cgroup), a fake
//! EKS Auth API, the real agent binary, and real clients.
//!
//! Everything a test creates lives inside namespaces and cgroups it made, and is removed when the
//! owning value drops, including when the test panics. The node namespace has no route off the
//! machine: a connect that is not redirected fails at once instead of leaving the host.
//!
//! Needs root (network namespaces, cgroups, BPF).

pub mod agent;
pub mod bpf;
pub mod fake_aws;
pub mod fake_imds;
pub mod jwt;
pub mod manifests;
pub mod node;
pub mod oci;
pub mod pki;
pub mod proxy;
pub mod secrets;

pub use agent::Agent;
pub use fake_aws::FakeAws;
pub use node::{BpfFs, CgroupShape, Node, Pod};

/// The region the fake EKS Auth serves and the agent is configured with.
pub const REGION: &str = "us-west-2";
pub const CLUSTER: &str = "e2e-cluster";
pub const ACCOUNT: &str = "123456789012";
/// The node's own credentials: they sign the agent's EKS Auth calls (and the doctor's).
pub const NODE_ACCESS_KEY: &str = "AKIDNODEEXAMPLE";
pub const NODE_SECRET: &str = "node-secret-example-0123456789abcdef";
/// An operator's credentials, for the `associations` command run from a laptop.
pub const OPERATOR_ACCESS_KEY: &str = "AKIDOPERATOREXAMPLE";
pub const OPERATOR_SECRET: &str = "operator-secret-example-0123456789ab";

/// `timeout` stretched by `PIA_TIME_SCALE` (a whole number, 1 when unset). The kernel matrix
/// sets it: under QEMU's emulation an agent's start (most of it reading and parsing the
/// system's CA certificates) takes seconds rather than milliseconds, and a deadline sized for
/// the host would fail a test that is only slow.
pub fn patient(timeout: std::time::Duration) -> std::time::Duration {
    let scale = std::env::var("PIA_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(1);
    timeout * scale
}

/// Fails early, with the reason, when the harness cannot work here.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests need root (netns, cgroups, BPF): run them through `cargo xtask test`"
    );
}

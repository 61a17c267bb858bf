//! The real node: the tests of `tests/cri` (containerd's CRI runs the agent's image and the
//! workload pods) inside the kernel matrix's 6.1 VM, where cgroup v2 is the only hierarchy, as
//! on Amazon Linux 2023.
//!
//! containerd, its shim and `ctr`, and the CNI plugins come from Debian's packages, downloaded
//! through the matrix's private apt configuration and unpacked under `target/cri` (nothing is
//! installed on the machine: containerd's package would want to run as the machine's service);
//! runc is the machine's (`runc`, a test package). The images are `cargo xtask image`'s and
//! [`image::node_images`].

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{image, install, target_dir, vm};

/// Debian's packages the node is made of (bookworm's containerd 1.6 and CNI plugins 1.1).
const PACKAGES: [&str; 2] = ["containerd", "containernetworking-plugins"];
/// The VM's kernel: the series AL2023 nodes run.
const SERIES: &str = "6.1";

fn root() -> PathBuf {
    target_dir().join("cri/root")
}

/// Downloads and unpacks containerd and the CNI plugins, once.
pub fn setup() -> anyhow::Result<()> {
    let root = root();
    install::step(
        "containerd and the CNI plugins (Debian, unpacked under target/cri)",
        root.join(".ok").exists(),
        || {
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root)?;
            for package in PACKAGES {
                let deb = vm::download(vm::Arch::Amd64, package)?;
                install::quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
            }
            fs::write(root.join(".ok"), "")?;
            Ok(())
        },
    )
}

/// Builds the images and the tests, boots the VM and runs every test of `tests/cri` there.
pub fn run() -> anyhow::Result<vm::Outcome> {
    image::build()?;
    image::node_images()?;
    let binary = crate::test_binary(&["-p", "pod-identity-cri"], "real_node")?;
    let tests = vm::list_tests(&binary)?;
    let kernel = vm::KERNELS
        .iter()
        .find(|k| k.series == SERIES)
        .context("the matrix has no 6.1 kernel")?;
    let root = root();
    let env = [
        ("PIA_CRI_BIN", dir(&root, "usr/bin")?),
        ("PIA_CNI_BIN", dir(&root, "usr/lib/cni")?),
        (
            "PIA_IMAGES",
            target_dir().join("image").display().to_string(),
        ),
    ];
    let args: Vec<String> = ["--test-threads", "1"].map(String::from).to_vec();
    let outcome = vm::run_in_vm(
        kernel,
        &vm::GuestRun {
            name: "real-node",
            binary: &binary,
            tests: &tests,
            args: &args,
            env: &env,
            // The bridge and veth modules load on demand; asked for here, a missing one says so.
            before: "modprobe -a bridge veth overlay",
            memory: "3G",
        },
    )?;
    let table = format!(
        "\nreal node (containerd {} CRI, runc, CNI bridge; inside QEMU):\n{}",
        containerd_version(&root),
        outcome.row(kernel.distributions)
    );
    eprintln!("{table}");
    fs::write(target_dir().join("vm/results/real-node-table.txt"), &table)?;
    if !outcome.failed.is_empty() {
        bail!("real-node failures:\n  {}", outcome.failed.join("\n  "));
    }
    Ok(outcome)
}

fn dir(root: &Path, sub: &str) -> anyhow::Result<String> {
    let dir = root.join(sub);
    if !dir.is_dir() {
        bail!("{} is missing: run `cargo xtask setup`", dir.display());
    }
    Ok(dir.display().to_string())
}

fn containerd_version(root: &Path) -> String {
    crate::output(Command::new(root.join("usr/bin/containerd")).arg("--version"))
        .split_whitespace()
        .nth(2)
        .unwrap_or("?")
        .to_owned()
}

//! arm64 (Graviton): the agent cross-built on this x86_64 machine as a static aarch64 binary,
//! and the slice proven on Debian's arm64 kernel in a QEMU VM.
//!
//! How, as measured on this machine kind:
//! * `cargo zigbuild` (zig from PyPI as the C cross compiler and linker) builds for
//!   `aarch64-unknown-linux-musl`: aws-lc-sys's C included, a static binary that needs nothing
//!   from the VM. The kernel programs are the same BPF bytecode on every architecture; build.rs
//!   passes the target architecture to them.
//! * The kernel and busybox come from Debian's archive through a private arm64 apt configuration
//!   (`target/vm/apt-arm64`). `qemu-system-aarch64 -M virt` boots them under TCG with an
//!   initramfs of busybox, the agent and `arm64-smoke` (tests/src/bin), which runs the checks and
//!   prints one line per check on the console.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    run, succeeds,
    vm::{self, Arch, Kernel, Pattern},
};

/// The Rust target: musl for a static binary.
pub const TARGET: &str = "aarch64-unknown-linux-musl";
/// The arm64 kernel the smoke test boots: the series Amazon Linux 2023 on Graviton runs.
pub const KERNEL: Kernel = Kernel {
    series: "6.1",
    distributions: "Amazon Linux 2023 on Graviton",
    arch: Arch::Arm64,
    package: Pattern::Newest("linux-image-6.1.0-", "-arm64-unsigned"),
};
/// Host packages: qemu-system-arm provides qemu-system-aarch64 (busybox-static, for cpio, comes
/// with the matrix's).
const PACKAGES: &[&str] = &["qemu-system-arm"];
/// Time the VM may take, boot included.
const VM_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Installs the cross toolchain and the VM's host packages, idempotently.
pub fn setup() -> anyhow::Result<()> {
    crate::install::apt(PACKAGES)?;
    crate::image::zig()?;
    crate::image::rust_target(TARGET)
}

/// The release build for aarch64: the agent as the image ships it (so the smoke test runs the
/// shipped allocator, and the image's build is reused rather than repeated), and with `smoke`
/// the smoke-test program, built apart so its dependencies' features do not change the agent's.
/// Returns the directory that holds them.
pub fn build(smoke: bool) -> anyhow::Result<PathBuf> {
    let agent = crate::image::binary(TARGET)?;
    if smoke {
        let mut cmd = crate::cargo();
        cmd.args([
            "zigbuild",
            "--release",
            "--target",
            TARGET,
            "-p",
            "pod-identity-e2e",
            "--bin",
            "arm64-smoke",
        ]);
        run(&mut cmd).context(
            "cross-building the smoke program for aarch64 (cargo xtask setup installs zig and cargo-zigbuild)",
        )?;
    }
    eprintln!(
        "xtask: {}: {} bytes, static",
        agent.display(),
        fs::metadata(&agent)?.len()
    );
    Ok(crate::target_dir().join(TARGET).join("release"))
}

/// Boots the arm64 kernel with the agent and the smoke program, and reports each check.
pub fn smoke(binaries: &Path) -> anyhow::Result<vm::Outcome> {
    let (version, kernel_dir) = vm::fetch(&KERNEL)?;
    let initrd = initramfs(binaries)?;
    let kernel = kernel_dir.join("boot").join(format!("vmlinuz-{version}"));
    eprintln!(
        "xtask: booting {version} (arm64) under qemu-system-aarch64 (TCG) for the smoke test"
    );
    let started = Instant::now();
    let out = Command::new("timeout")
        .args(["-k", "20", &VM_TIMEOUT.as_secs().to_string()])
        .arg("qemu-system-aarch64")
        .args([
            "-M",
            "virt",
            "-cpu",
            "cortex-a57",
            "-smp",
            "2",
            "-m",
            "1G",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyAMA0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .output()
        .context("running qemu-system-aarch64 (cargo xtask setup installs qemu-system-arm)")?;
    let took = started.elapsed();
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    for line in console.lines() {
        if let Some(name) = line.strip_prefix("SMOKE ok ") {
            passed.push(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("SMOKE FAIL ") {
            failed.push(rest.to_owned());
        }
    }
    for check in &passed {
        eprintln!("xtask: arm64 smoke ok: {check}");
    }
    if !console.lines().any(|l| l.starts_with("SMOKE DONE")) {
        failed.push(format!(
            "the smoke test did not finish (qemu exit {:?}); console:\n{console}",
            out.status.code()
        ));
    } else if !failed.is_empty() {
        eprintln!("xtask: arm64 console:\n{console}");
    }
    Ok(vm::Outcome {
        series: KERNEL.series,
        version,
        passed,
        failed,
        took,
    })
}

/// busybox, the agent and the smoke program, and an init that mounts what the agent needs and
/// runs the smoke test, as a gzipped newc cpio.
fn initramfs(binaries: &Path) -> anyhow::Result<PathBuf> {
    let dir = crate::target_dir().join("vm/arm64");
    let root = dir.join("initramfs");
    let _ = fs::remove_dir_all(&root);
    for sub in ["bin", "proc", "sys", "dev", "tmp", "run"] {
        fs::create_dir_all(root.join(sub))?;
    }
    let busybox_deb = vm::download(Arch::Arm64, "busybox-static")?;
    let unpacked = dir.join("busybox");
    let _ = fs::remove_dir_all(&unpacked);
    fs::create_dir_all(&unpacked)?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&busybox_deb)
        .arg(&unpacked))?;
    fs::copy(unpacked.join("bin/busybox"), root.join("bin/busybox"))?;
    fs::copy(
        binaries.join("pod-identity-agent"),
        root.join("pod-identity-agent"),
    )?;
    fs::copy(binaries.join("arm64-smoke"), root.join("arm64-smoke"))?;
    let init = "#!/bin/busybox sh\n\
        /bin/busybox --install -s /bin\n\
        export PATH=/bin\n\
        mount -t proc proc /proc\n\
        mount -t sysfs sysfs /sys\n\
        mount -t devtmpfs devtmpfs /dev\n\
        mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
        mount -t bpf bpf /sys/fs/bpf 2>/dev/null\n\
        mount -t tmpfs tmpfs /tmp\n\
        echo +cpu +memory > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null\n\
        ip link set lo up\n\
        ip addr add 198.18.0.1/32 dev lo\n\
        echo \"kernel $(uname -r) $(uname -m)\"\n\
        /arm64-smoke /pod-identity-agent\n\
        poweroff -f\n";
    fs::write(root.join("init"), init)?;
    run(Command::new("chmod").arg("0755").arg(root.join("init")))?;
    let initrd = dir.join("initrd.cpio.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
            root.display(),
            initrd.display()
        ))
        .status()?;
    if !status.success() {
        bail!("building the initramfs failed");
    }
    Ok(initrd)
}

/// Builds, boots and fails unless every check passed; prints the result next to the matrix's.
pub fn run_smoke() -> anyhow::Result<vm::Outcome> {
    if !succeeds(Command::new("qemu-system-aarch64").arg("--version")) {
        bail!("qemu-system-aarch64 is missing: run `cargo xtask setup`");
    }
    let binaries = build(true)?;
    let outcome = smoke(&binaries)?;
    let table = format!(
        "\narm64 smoke (static aarch64 binaries, inside qemu-system-aarch64):\n{}",
        outcome.row(KERNEL.distributions)
    );
    eprintln!("{table}");
    fs::create_dir_all(crate::target_dir().join("vm/results"))?;
    fs::write(crate::target_dir().join("vm/results/arm64.txt"), &table)?;
    if !outcome.failed.is_empty() {
        bail!("arm64 smoke failures:\n  {}", outcome.failed.join("\n  "));
    }
    Ok(outcome)
}

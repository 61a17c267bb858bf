//! What each task needs on a fresh machine, installed idempotently: each step checks first and
//! does nothing when its piece is there. A step prints one line; the tools' own output goes to
//! `target/xtask-install.log`, which a failing step names.

use std::{
    fs::{self, OpenOptions},
    io::Write as _,
    path::PathBuf,
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{arm64, output, succeeds, target_dir, vm, workspace_root};

pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Building the agent: bpf-linker links the kernel programs with Debian's LLVM 22, and the
/// nightly toolchain builds them (and formats with aya's import grouping).
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// The demo's simulated node and pods, and its clients.
const DEMO_PACKAGES: &[&str] = &["iproute2", "curl"];
const DEMO_PIP: &[(&str, &str)] = &[("boto3", "boto3")];
/// The tests': BPF introspection, Prometheus (promtool and a server), a forward proxy,
/// certificates, OCI runtimes, the CRI API's compiler.
const TEST_PACKAGES: &[&str] = &[
    "bpftool",
    "prometheus",
    "tinyproxy-bin",
    "openssl",
    "runc",
    "protobuf-compiler",
    // The real node's sandbox (pause) image is Debian's static busybox.
    "busybox-static",
];
/// (module to import, PyPI package): the tests' other clients and checkers.
const TEST_PIP: &[(&str, &str)] = &[
    ("awscli", "awscli<2"),
    ("prometheus_client", "prometheus-client"),
    // Manifests against the Kubernetes schemas (kubectl renders them).
    ("kubernetes_validate", "kubernetes-validate>=1.37"),
    // The admission policy's CEL, evaluated (tests/admission/check_policy.py).
    ("celpy", "cel-python"),
    ("yaml", "pyyaml"),
];

fn log_path() -> PathBuf {
    target_dir().join("xtask-install.log")
}

/// One install step: skipped when `present`, else `install` runs with its output in the log.
pub fn step(
    name: &str,
    present: bool,
    install: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if present {
        return Ok(());
    }
    eprint!("xtask: installing {name} ... ");
    let started = Instant::now();
    match install() {
        Ok(()) => {
            eprintln!("done ({:.0} s)", started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(e) => {
            eprintln!("failed");
            Err(e.context(format!(
                "installing {name} failed; the tools' output is in {}",
                log_path().display()
            )))
        }
    }
}

/// Runs `cmd`, its output appended to the install log.
pub fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    fs::create_dir_all(target_dir())?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path())?;
    writeln!(log, "\n$ {cmd:?}")?;
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    log.write_all(&out.stdout)?;
    log.write_all(&out.stderr)?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    Ok(())
}

/// Installs the Debian packages of `packages` that are missing (without recommends).
pub fn apt(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .contains("install ok installed")
        })
        .collect();
    step(
        &format!("Debian packages {}", missing.join(" ")),
        missing.is_empty(),
        || {
            if !crate::is_root() {
                bail!(
                    "install them as root: apt-get update && apt-get install -y {}",
                    missing.join(" ")
                );
            }
            quiet(Command::new("apt-get").args(["update", "-qq"]))?;
            quiet(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        },
    )
}

/// PyPI packages whose module does not import yet.
fn pip(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    for (module, package) in packages {
        let present = succeeds(Command::new("python3").args(["-c", &format!("import {module}")]));
        step(&format!("{package} (PyPI)"), present, || {
            quiet(Command::new("python3").args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                package,
            ]))
        })?;
    }
    Ok(())
}

/// What `cargo xtask build` needs: the kernel programs' toolchain.
pub fn build() -> anyhow::Result<()> {
    apt(BUILD_PACKAGES)?;
    let nightly = succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]));
    step("the nightly toolchain", nightly, || {
        quiet(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
    })?;
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    for component in ["rust-src", "rustfmt"] {
        let present = components.lines().any(|l| l.starts_with(component));
        step(&format!("{component} (nightly)"), present, || {
            quiet(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                "nightly",
            ]))
        })?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).contains(BPF_LINKER_VERSION);
    step(
        &format!("bpf-linker {BPF_LINKER_VERSION} (built against LLVM 22, 2-3 minutes)"),
        linker,
        || {
            quiet(
                Command::new("cargo")
                    .args([
                        "install",
                        "bpf-linker",
                        "--version",
                        BPF_LINKER_VERSION,
                        "--locked",
                        "--force",
                    ])
                    .args(["--no-default-features", "--features", "llvm-22"])
                    .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
            )
        },
    )
}

/// What `cargo xtask lint` needs: the build's, and protoc for the CRI API (clippy builds every
/// crate, the real-node tests' among them).
pub fn lint() -> anyhow::Result<()> {
    build()?;
    apt(&["protobuf-compiler"])
}

/// What `cargo xtask demo` needs: the build's, the simulated node's tools, boto3.
pub fn demo() -> anyhow::Result<()> {
    build()?;
    apt(DEMO_PACKAGES)?;
    pip(DEMO_PIP)
}

/// What `cargo xtask test` needs: the demo's, and every test's tools, the kernels' VMs, the
/// arm64 cross toolchain and image builder, the container runtimes and the real node's.
pub fn test() -> anyhow::Result<()> {
    demo()?;
    apt(TEST_PACKAGES)?;
    pip(TEST_PIP)?;
    node_sdk()?;
    fuzz()?;
    vm::setup()?;
    arm64::setup()?;
    crate::image::setup()?;
    crate::real_node::setup()?;
    crate::fetch_containers_seccomp()
}

/// The AWS SDK for JavaScript v3 credential provider, from tests/node/package-lock.json.
fn node_sdk() -> anyhow::Result<()> {
    let node_dir = workspace_root().join("tests").join("node");
    let present = node_dir
        .join("node_modules/@aws-sdk/credential-provider-http")
        .is_dir();
    step("the AWS SDK for JavaScript (npm)", present, || {
        if !succeeds(Command::new("npm").arg("--version")) {
            bail!(
                "npm is missing (the Node SDK client test needs it): apt-get install -y nodejs npm"
            );
        }
        quiet(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--silent"])
                .current_dir(&node_dir),
        )
    })
}

pub fn fuzz() -> anyhow::Result<()> {
    let present = succeeds(Command::new("cargo").args(["fuzz", "--version"]));
    step("cargo-fuzz", present, || {
        quiet(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
    })
}

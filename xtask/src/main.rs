//! `cargo xtask <task>`: everything a fresh machine needs, installed idempotently, then the
//! build, the gates, the tests, the demo or the benchmark (`cargo xtask --help` lists them).

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod arm64;
mod bench;
mod docs;
mod house;
mod image;
mod install;
mod real_node;
mod vm;

/// Build orchestration for pod-identity-agent. Every command installs what it needs first
/// (idempotently), so a fresh machine needs nothing else.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build, the demo and the tests need (idempotent).
    Setup,
    /// Setup, then build the agent.
    Build {
        /// `aarch64`: a static aarch64 (Graviton) binary, cross-built. Default: the host's.
        #[arg(long, value_parser = ["aarch64", "arm64", arm64::TARGET])]
        target: Option<String>,
    },
    /// Setup, build, the format and lint gates, unit and end-to-end tests, the kernel matrix
    /// and the arm64 smoke test (root).
    Test,
    /// Setup, build, simulated pods get credentials through the eBPF redirect (root).
    Demo,
    /// Setup, release builds (the shipped static binary and its variants), every performance
    /// scenario against its baseline, the allocators compared (root).
    Bench {
        /// Flame graphs of the keep-alive and burst runs too.
        #[arg(long)]
        profile: bool,
        /// The call site of each allocation a cached request makes (dhat).
        #[arg(long)]
        heap_profile: bool,
    },
    /// Every fuzz target for a while (cargo-fuzz, nightly).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
    },
    /// 100 pods under upstream faults and churn (root).
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// The kernel-facing end-to-end tests inside VMs of 5.10, 6.1 and 6.12 (root).
    Matrix {
        /// One kernel series only (5.10, 6.1 or 6.12).
        #[arg(long)]
        kernel: Option<String>,
        /// Only the kernel-facing tests whose name contains this (e.g. `imds_guard`).
        #[arg(long)]
        only: Option<String>,
    },
    /// Cross-build for aarch64, the smoke test on Debian's arm64 6.1 kernel under QEMU.
    Arm64,
    /// The agent's image on a real node: containerd's CRI, runc and a CNI bridge inside the
    /// 6.1 VM, pods with SDK clients (root).
    RealNode,
    /// The format and lint gates alone: rustfmt, clippy with warnings denied, the house rules
    /// (no import circle, short functions) and the docs' links and commands.
    Lint,
    /// The agent's OCI image, for x86_64 and aarch64 (static musl binaries, FROM scratch), as an
    /// OCI layout and archive under target/image.
    Image,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Task::Setup => install::test(),
        Task::Build { target: None } => install::build().and_then(|()| build()),
        Task::Build { target: Some(_) } => install::build()
            .and_then(|()| arm64::setup())
            .and_then(|()| arm64::build(false))
            .map(drop),
        Task::Test => install::test().and_then(|()| build()).and_then(|()| test()),
        Task::Demo => install::demo().and_then(|()| build()).and_then(|()| demo()),
        Task::Bench {
            profile,
            heap_profile,
        } => install::demo().and_then(|()| {
            bench::run_bench(&bench::Options {
                profile,
                heap_profile,
            })
        }),
        Task::Fuzz { seconds } => install::build()
            .and_then(|()| install::fuzz())
            .and_then(|()| fuzz(seconds)),
        Task::Soak { minutes } => install::demo()
            .and_then(|()| build())
            .and_then(|()| soak(minutes)),
        Task::Matrix { kernel, only } => install::demo()
            .and_then(|()| vm::setup())
            .and_then(|()| build())
            .and_then(|()| matrix(kernel.as_deref(), only.as_deref())),
        Task::Arm64 => install::build()
            .and_then(|()| arm64::setup())
            .and_then(|()| arm64::run_smoke())
            .map(drop),
        Task::RealNode => install::test()
            .and_then(|()| build())
            .and_then(|()| real_node::run())
            .map(drop),
        Task::Lint => install::lint().and_then(|()| build()).and_then(|()| lint()),
        Task::Image => install::build()
            .and_then(|()| image::setup())
            .and_then(|()| image::build())
            .map(drop),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).trim() == "0"
}

/// The seccomp profile Debian's containers-common package ships (CRI-O's and Podman's default),
/// for the container tests: taken from the package without installing it (it would pull in a
/// container network stack).
fn fetch_containers_seccomp() -> anyhow::Result<()> {
    let dir = target_dir().join("oci");
    let profile = dir.join("containers-common-seccomp.json");
    install::step(
        "containers-common's seccomp profile",
        profile.exists(),
        || {
            let deb = vm::download(vm::Arch::Amd64, "golang-github-containers-common")?;
            let unpacked = dir.join("containers-common");
            std::fs::create_dir_all(&unpacked)?;
            install::quiet(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
            std::fs::copy(unpacked.join("usr/share/containers/seccomp.json"), &profile)
                .context("containers-common has no seccomp.json")?;
            Ok(())
        },
    )
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn agent_binary() -> PathBuf {
    target_dir().join("debug").join("pod-identity-agent")
}

/// Every cargo invocation names the same packages, so features resolve the same way each time
/// and no dependency is compiled twice.
const PACKAGES: &[&str] = &[
    "-p",
    "pod-identity-common",
    "-p",
    "pod-identity-agent",
    "-p",
    "pod-identity-e2e",
];

fn build() -> anyhow::Result<()> {
    run(cargo().arg("build").args(PACKAGES))
}

/// Seconds each fuzz target runs within `cargo xtask test`.
const TEST_FUZZ_SECONDS: f64 = 20.0;
/// Minutes of the soak within `cargo xtask test`: two whole cycles of its faults (about 42 s
/// each); `cargo xtask soak` runs longer.
const TEST_SOAK_MINUTES: f64 = 1.5;

/// The format and lint gates: one format (rustfmt.toml, nightly rustfmt for its import
/// grouping), clippy with warnings denied, the house rules, and the docs.
fn lint() -> anyhow::Result<()> {
    // Through rustup: under `cargo xtask`, CARGO names the stable toolchain's cargo itself,
    // which knows no `+nightly`.
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "fmt", "--all", "--check"])
        .current_dir(workspace_root()))
    .context("the code is not formatted: run `cargo +nightly fmt --all`")?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--keep-going",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found something: fix it (or say why in an #[expect(..., reason)])")?;
    house::check(&workspace_root())?;
    docs::check(&workspace_root(), &agent_binary())
}

fn test() -> anyhow::Result<()> {
    lint()?;
    // Explicit targets: no doc-test runs, and the last summary line is the e2e suite's.
    run(cargo()
        .arg("test")
        .args(PACKAGES)
        .args(["-p", "xtask", "--lib", "--bins"]))?;
    run(cargo().args(["test", "-p", "pod-identity-cri", "--lib"]))?;
    fuzz(TEST_FUZZ_SECONDS)?;
    if !is_root() {
        bail!(
            "the end-to-end tests create network namespaces, cgroups and BPF programs: run `cargo xtask test` as root"
        );
    }
    soak(TEST_SOAK_MINUTES)?;
    run(cargo()
        .arg("test")
        .args(PACKAGES)
        .args(["--test", "e2e", "--", "--test-threads", "4"])
        .env("PIA_AGENT_BIN", agent_binary()))?;
    matrix(None, None)?;
    real_node::run()?;
    arm64::run_smoke().map(drop)
}

/// The kernel-facing end-to-end tests on every kernel of the matrix (or one `series`).
fn matrix(series: Option<&str>, only: Option<&str>) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the kernel matrix boots VMs that create namespaces, cgroups and BPF programs: run it as root"
        );
    }
    let e2e = e2e_binary()?;
    match series {
        None => vm::run_matrix(&e2e, &agent_binary(), only).map(drop),
        Some(series) => {
            let kernel = vm::KERNELS
                .iter()
                .find(|k| k.series == series)
                .with_context(|| format!("no kernel {series} in the matrix"))?;
            let outcome = vm::run_matrix_on(kernel, &e2e, &agent_binary(), only)?;
            eprintln!(
                "xtask: {}: {} passed, {} failed in {:.0}s",
                outcome.version,
                outcome.passed.len(),
                outcome.failed.len(),
                outcome.took.as_secs_f64()
            );
            if outcome.failed.is_empty() {
                Ok(())
            } else {
                bail!("failed on {}: {:?}", outcome.version, outcome.failed)
            }
        }
    }
}

/// The end-to-end test executable, built with the shared package set.
fn e2e_binary() -> anyhow::Result<PathBuf> {
    test_binary(PACKAGES, "e2e")
}

/// The executable of integration test `test` of `packages`, built (not run).
fn test_binary(packages: &[&str], test: &str) -> anyhow::Result<PathBuf> {
    let out = cargo()
        .arg("test")
        .args(packages)
        .args(["--test", test, "--no-run", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building test {test} failed");
    }
    let name = format!("\"name\":\"{test}\"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter(|l| l.contains(&name) && l.contains("\"test\":true"))
        .find_map(|l| {
            l.split("\"executable\":\"")
                .nth(1)?
                .split('"')
                .next()
                .map(PathBuf::from)
        })
        .with_context(|| format!("cargo did not report the {test} test executable"))
}

const FUZZ_TARGETS: &[&str] = &["token_claims", "cgroup_path", "http_request"];

/// Runs every target of `agent/fuzz` for `seconds` (cargo-fuzz, nightly, AddressSanitizer),
/// starting from the checked-in seeds. A crash fails the run and leaves its input in
/// `agent/fuzz/artifacts/`.
fn fuzz(seconds: f64) -> anyhow::Result<()> {
    let fuzz_dir = workspace_root().join("agent").join("fuzz");
    for target in FUZZ_TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        run(Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg(&corpus)
            .arg(fuzz_dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={}", seconds.round() as u64))
            .current_dir(workspace_root().join("agent")))
        .with_context(|| {
            format!("fuzz target {target} failed: see agent/fuzz/artifacts/{target}/")
        })?;
    }
    Ok(())
}

/// 100 pods under upstream faults and churn (`tests/src/bin/soak.rs`).
fn soak(minutes: f64) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the soak creates network namespaces, cgroups and BPF programs: run it as root");
    }
    run(Command::new(agent_binary().with_file_name("soak"))
        .args(["--minutes", &minutes.to_string()])
        .current_dir(workspace_root())
        .env("PIA_AGENT_BIN", agent_binary())
        // Per-request debug lines for 100 pods over minutes are not what the soak is about.
        .env("PIA_AGENT_LOG", "info"))
}

fn demo() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the demo creates network namespaces, cgroups and BPF programs: run `cargo xtask demo` as root"
        );
    }
    // Built by `build` with the shared package set; `cargo run` would resolve features anew.
    let demo = agent_binary().with_file_name("demo");
    run(Command::new(&demo)
        .current_dir(workspace_root())
        .env("PIA_AGENT_BIN", agent_binary()))
}

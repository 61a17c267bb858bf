//! `cargo xtask bench`: the builds the benchmark measures, then `tests/src/bin/bench.rs`.
//!
//! What is measured is what ships: the image's static musl binary for x86_64, with jemalloc.
//! Beside it, each kept under `target/bench/bin`: the same with a counting allocator (allocations
//! per request, live heap), the same with musl's own allocator and with mimalloc, and the glibc
//! build, for the allocator comparison; with `--heap-profile`, a build with the dhat heap
//! profiler, which names the call site of every allocation a request makes.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{PACKAGES, cargo, image, install, is_root, run, succeeds, target_dir, workspace_root};

/// The image's amd64 target.
const TARGET: &str = "x86_64-unknown-linux-musl";

pub struct Options {
    /// Flame graphs of the keep-alive and burst runs (perf, inferno).
    pub profile: bool,
    /// Allocation sites per request (dhat).
    pub heap_profile: bool,
}

pub fn run_bench(options: &Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmark creates network namespaces, cgroups and BPF programs: run `cargo xtask bench` as root"
        );
    }
    // nginx for the static-file baseline, taskset, valgrind's callgrind for instruction counts.
    install::apt(&["nginx-light", "util-linux", "valgrind"])?;
    image::setup()?;
    if options.profile {
        install::apt(&["linux-perf"])?;
        if !succeeds(Command::new("inferno-flamegraph").arg("--version")) {
            run(Command::new("cargo").args(["install", "inferno", "--locked"]))?;
        }
    }
    let dir = target_dir().join("bench/bin");
    fs::create_dir_all(&dir)?;
    // Each variant is built and kept aside; the shipped build goes last, so the binary the image
    // takes is left in place.
    let variant = |name: &str, features: &[&str]| -> anyhow::Result<PathBuf> {
        let built = image::binary_with(TARGET, features)?;
        let kept = dir.join(format!("pod-identity-agent-{name}"));
        fs::copy(&built, &kept).with_context(|| format!("keeping the {name} build"))?;
        Ok(kept)
    };
    let counting = variant("counting", &["count-allocations", "alloc-jemalloc"])?;
    let mut allocators = vec![
        ("musl (system)".to_owned(), variant("musl", &[])?),
        (
            "mimalloc".to_owned(),
            variant("mimalloc", &["alloc-mimalloc"])?,
        ),
    ];
    let dhat = if options.heap_profile {
        Some(variant("dhat", &["dhat-heap"])?)
    } else {
        None
    };
    let shipped = variant("shipped", image::SHIPPED_FEATURES)?;
    allocators.insert(0, ("jemalloc (shipped)".to_owned(), shipped.clone()));
    // The glibc build, and the bench's own programs (load generator, baseline server).
    run(cargo().args(["build", "--release"]).args(PACKAGES))?;
    let release = target_dir().join("release");
    let glibc = dir.join("pod-identity-agent-glibc");
    fs::copy(release.join("pod-identity-agent"), &glibc).context("keeping the glibc build")?;
    allocators.push(("glibc (system)".to_owned(), glibc));

    let list: Vec<String> = allocators
        .iter()
        .map(|(name, path)| format!("{name}={}", path.display()))
        .collect();
    let mut bench = Command::new(release.join("bench"));
    bench
        .current_dir(workspace_root())
        .env("PIA_AGENT_BIN", &shipped)
        .env("PIA_AGENT_COUNTING_BIN", &counting)
        .env("PIA_BENCH_ALLOCATORS", list.join(";"))
        // Per-request debug lines would be measured too.
        .env("PIA_AGENT_LOG", "warn")
        .env("PIA_BENCH_OUT", target_dir().join("bench"));
    if options.profile {
        bench.env("PIA_BENCH_PROFILE", "1");
    }
    if let Some(dhat) = dhat {
        bench.env("PIA_AGENT_DHAT_BIN", dhat);
    }
    run(&mut bench)
}

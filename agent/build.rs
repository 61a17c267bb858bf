//! Compiles the kernel programs (agent-ebpf) for the BPF target and leaves the object in OUT_DIR,
//! where src/kernel embeds it. Needs the nightly toolchain with rust-src and bpf-linker: `cargo
//! xtask setup` installs both.
//!
//! The nested cargo's output is kept, and shown only when it fails: a successful build prints
//! nothing (cargo would show every line a build script prints as a warning).
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const PACKAGE: &str = "pod-identity-ebpf";
const TOOLCHAIN: &str = "nightly";

fn main() {
    if let Err(e) = build() {
        // The whole message, kernel compiler output included, as one error.
        eprintln!("{e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let ebpf_dir = manifest
        .join("../agent-ebpf")
        .canonicalize()
        .map_err(|e| format!("agent-ebpf: {e}"))?;
    for watched in ["src", "common/src", "Cargo.toml", "common/Cargo.toml"] {
        println!(
            "cargo:rerun-if-changed={}",
            ebpf_dir.join(watched).display()
        );
    }
    let ok = |cmd: &mut Command| cmd.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok(Command::new("bpf-linker").arg("--version")) {
        return Err("bpf-linker is not installed; run `cargo xtask setup` to install it".into());
    }
    if !ok(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--version"])) {
        return Err("the nightly toolchain is missing; run `cargo xtask setup`".into());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").map_err(|e| e.to_string())?;
    let target = if endian == "big" {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    // aya-ebpf reads this cfg for architecture-specific helpers: the architecture of the
    // machine the agent will run on, which is cargo's target, not the build host.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").map_err(|e| e.to_string())?;
    // Its own target directory: the outer cargo holds a lock on ours.
    let target_dir = out_dir.join("ebpf-target");

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        TOOLCHAIN,
        "cargo",
        "build",
        "--package",
        PACKAGE,
        "--bins",
        "--release",
    ])
    .args(["--target", target, "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&ebpf_dir)
    // BTF for the verifier's messages, debug info for bpftool; separated by 0x1f.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    )
    // The outer build's compiler settings belong to the host toolchain.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_BUILD_TARGET");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the kernel programs failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let object = target_dir.join(target).join("release").join(PACKAGE);
    copy(&object, &out_dir.join(PACKAGE))
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}

//! Compiles the kernel programs (agent-ebpf) for the BPF target and leaves the object in OUT_DIR,
//! where src/kernel embeds it. Needs the nightly toolchain with rust-src and bpf-linker: `cargo
//! xtask setup` installs both.
use std::process::Command;

fn main() -> anyhow::Result<()> {
    let ok = |cmd: &mut Command| cmd.output().map(|o| o.status.success()).unwrap_or(false);
    if std::env::var_os("AYA_BUILD_SKIP").is_none() {
        if !ok(Command::new("bpf-linker").arg("--version")) {
            anyhow::bail!("bpf-linker is not installed; run `cargo xtask setup` to install it");
        }
        if !ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
            anyhow::bail!("the nightly toolchain is missing; run `cargo xtask setup`");
        }
    }
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("../agent-ebpf").canonicalize()?;
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "pod-identity-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

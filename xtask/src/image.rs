//! `cargo xtask image`: the agent's OCI image, built here with nothing to pull. For each
//! architecture a static binary (musl, cross-built with `cargo zigbuild`), FROM scratch: the
//! binary, the CA roots it trusts for EKS Auth and STS, and the user the DaemonSet runs it as.
//! Both go into one multi-arch image index, written as an OCI layout
//! (`target/image/pod-identity-agent/`) and as an archive of it
//! (`target/image/pod-identity-agent.oci.tar`) that `ctr images import` takes. The real-node
//! tests' sandbox and workload images are written the same way ([`node_images`]). The layers are plain tar plus gzip, with fixed owners and times: the same source gives
//! the same digests. `deploy/Dockerfile` builds the same image with `docker buildx`; a test keeps
//! the two in step (the constants below are what it compares).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

use crate::{install, output, run, target_dir};

/// Pinned: the versions these steps were measured with.
pub const ZIGLANG: &str = "0.17.1";
pub const CARGO_ZIGBUILD: &str = "0.24.1";
/// The image's name, as the manifests and `ctr images import` know it.
pub const NAME: &str = "localhost/pod-identity-agent";
/// The agent's path in the image, and the image's entrypoint; its default command.
pub const ENTRYPOINT: &str = "/pod-identity-agent";
pub const CMD: &str = "run";
/// The CA roots in the image (Debian's ca-certificates bundle), and the variable that names
/// them to the agent's TLS stack.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
pub const CA_ENV: &str = "SSL_CERT_FILE";
/// The DaemonSet's user: root, the only one a container's capabilities reach without ambient
/// capabilities (CAP_BPF and the rest are granted, everything else dropped).
pub const USER: &str = "0:0";

/// One architecture of the image.
pub struct Platform {
    /// OCI's name (`amd64`, `arm64`).
    pub arch: &'static str,
    /// Rust's target.
    pub target: &'static str,
}

pub const PLATFORMS: [Platform; 2] = [
    Platform {
        arch: "amd64",
        target: "x86_64-unknown-linux-musl",
    },
    Platform {
        arch: "arm64",
        target: "aarch64-unknown-linux-musl",
    },
];

/// The cross toolchain: zig (from PyPI) and cargo-zigbuild, the musl targets, the CA bundle.
pub fn setup() -> anyhow::Result<()> {
    zig()?;
    for p in &PLATFORMS {
        rust_target(p.target)?;
    }
    install::apt(&["ca-certificates", "gzip"])
}

/// zig as the C cross compiler and linker, and cargo-zigbuild to drive it.
pub fn zig() -> anyhow::Result<()> {
    let zig =
        output(Command::new("python3").args(["-m", "ziglang", "version"])).starts_with(ZIGLANG);
    install::step(&format!("zig {ZIGLANG} (PyPI)"), zig, || {
        install::quiet(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            &format!("ziglang=={ZIGLANG}"),
        ]))
    })?;
    let zigbuild = output(Command::new("cargo-zigbuild").arg("--version")).contains(CARGO_ZIGBUILD);
    install::step(
        &format!("cargo-zigbuild {CARGO_ZIGBUILD}"),
        zigbuild,
        || {
            install::quiet(Command::new("cargo").args([
                "install",
                "cargo-zigbuild",
                "--version",
                CARGO_ZIGBUILD,
                "--locked",
                "--force",
            ]))
        },
    )
}

/// The Rust standard library for `target`.
pub fn rust_target(target: &str) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))
        .lines()
        .any(|t| t == target);
    install::step(&format!("Rust target {target}"), installed, || {
        install::quiet(Command::new("rustup").args(["target", "add", target]))
    })
}

/// The features of the shipped build: jemalloc, tuned in `agent/src/allocator` (chosen over
/// musl's, mimalloc and glibc's by `cargo xtask bench`; docs/performance.md has the table).
pub const SHIPPED_FEATURES: &[&str] = &["alloc-jemalloc"];

/// The static release binary for `target`, as the image carries it.
pub fn binary(target: &str) -> anyhow::Result<PathBuf> {
    binary_with(target, SHIPPED_FEATURES)
}

/// The static release binary for `target` with the agent's `features` (the bench's variants).
pub fn binary_with(target: &str, features: &[&str]) -> anyhow::Result<PathBuf> {
    let mut cmd = crate::cargo();
    cmd.args([
        "zigbuild",
        "--release",
        "--target",
        target,
        "-p",
        "pod-identity-agent",
        "--bin",
        "pod-identity-agent",
    ]);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    if target.starts_with("aarch64") {
        // jemalloc fixes its page size at build time and, cross-compiled, assumes 4 KiB: it would
        // refuse to start on arm64 kernels with 16 or 64 KiB pages (RHEL, some Ubuntu and
        // custom AMIs). 64 KiB works on all three, and costs little: the arm64 smoke test's
        // agent held 24.7 MiB resident with it, 24.3 MiB with 4 KiB.
        cmd.env("JEMALLOC_SYS_WITH_LG_PAGE", "16");
    }
    run(&mut cmd).with_context(|| {
        format!("cross-building for {target} (cargo xtask image installs zig and cargo-zigbuild)")
    })?;
    Ok(target_dir()
        .join(target)
        .join("release")
        .join("pod-identity-agent"))
}

/// Builds both architectures and writes the image; returns the archive.
pub fn build() -> anyhow::Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let mut platforms = Vec::new();
    for platform in &PLATFORMS {
        let agent = binary(platform.target)?;
        eprintln!(
            "xtask: {} binary: {:.1} MiB, static",
            platform.arch,
            mib(fs::metadata(&agent)?.len())
        );
        platforms.push(agent_platform(platform, &agent, version)?);
    }
    let archive = write_image(
        "pod-identity-agent",
        &format!("{NAME}:{version}"),
        platforms,
    )?;
    eprintln!(
        "xtask: image {NAME}:{version} (amd64, arm64): {} ({:.1} MiB)",
        archive.display(),
        mib(fs::metadata(&archive)?.len())
    );
    Ok(archive)
}

/// The node's images besides the agent's, for the real-node tests (amd64, the VM's): the
/// sandbox ("pause") image containerd starts every pod with, and a workload image whose
/// userland is the node's own `/usr`, mounted by the pod spec (so curl, Python, boto3 and the
/// AWS CLI run in CRI containers without an image of their own). Returns their archives.
pub fn node_images() -> anyhow::Result<Vec<PathBuf>> {
    // Debian's busybox-static: one static binary. Its `sleep` is the pause process: CRI stops a
    // sandbox with SIGKILL and the pods here do not share a PID namespace, so nothing is reaped.
    let busybox = fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    let mut pause = Tar::default();
    pause.dir("bin/");
    pause.file("bin/busybox", &busybox, 0o755);
    let pause = PlatformImage {
        arch: "amd64",
        layer: pause.finish(),
        config: serde_json::json!({"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]}),
    };
    let mut workload = Tar::default();
    for dir in ["usr/", "etc/", "tmp/", "root/"] {
        workload.dir(dir);
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        workload.symlink(link, to);
    }
    let workload = PlatformImage {
        arch: "amd64",
        layer: workload.finish(),
        config: serde_json::json!({
            "Cmd": ["/usr/bin/sleep", "infinity"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        }),
    };
    Ok(vec![
        write_image("pod-identity-pause", PAUSE, vec![pause])?,
        write_image("pod-identity-workload", WORKLOAD, vec![workload])?,
    ])
}

/// The sandbox and workload images' names (the real-node tests name them to the CRI).
pub const PAUSE: &str = "localhost/pod-identity-pause:1";
pub const WORKLOAD: &str = "localhost/pod-identity-workload:1";

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// One architecture of an image: its single layer (an uncompressed tar) and the image config's
/// `config` (entrypoint, environment, user).
struct PlatformImage {
    arch: &'static str,
    layer: Vec<u8>,
    config: serde_json::Value,
}

/// The agent's layer: the binary and the CA roots.
fn agent_platform(
    platform: &Platform,
    agent: &Path,
    version: &str,
) -> anyhow::Result<PlatformImage> {
    let mut tar = Tar::default();
    tar.file(ENTRYPOINT.trim_start_matches('/'), &fs::read(agent)?, 0o755);
    for dir in ["etc/", "etc/ssl/", "etc/ssl/certs/"] {
        tar.dir(dir);
    }
    let ca = fs::read(CA_BUNDLE)
        .with_context(|| format!("reading {CA_BUNDLE} (Debian's ca-certificates)"))?;
    tar.file(CA_BUNDLE.trim_start_matches('/'), &ca, 0o644);
    Ok(PlatformImage {
        arch: platform.arch,
        layer: tar.finish(),
        config: serde_json::json!({
            "Entrypoint": [ENTRYPOINT],
            "Cmd": [CMD],
            "Env": [format!("{CA_ENV}={CA_BUNDLE}")],
            "User": USER,
            "Labels": {
                "org.opencontainers.image.title": "pod-identity-agent",
                "org.opencontainers.image.version": version,
            },
        }),
    })
}

/// Writes an image named `name` (`repository:tag`) as an OCI layout, `target/image/<stem>/`,
/// and as an archive of it, `target/image/<stem>.oci.tar`; returns the archive. More than one
/// platform makes a multi-arch index.
fn write_image(stem: &str, name: &str, platforms: Vec<PlatformImage>) -> anyhow::Result<PathBuf> {
    let dir = target_dir().join("image");
    let layout = dir.join(stem);
    let _ = fs::remove_dir_all(&layout);
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    let mut manifests = Vec::new();
    for platform in platforms {
        let unpacked = platform.layer.len() as u64;
        let arch = platform.arch;
        let (descriptor, compressed) = write_platform(&layout, platform)?;
        eprintln!(
            "xtask: image {name} {arch}: layer {:.1} MiB (gzip), {:.1} MiB unpacked",
            mib(compressed),
            mib(unpacked)
        );
        manifests.push(descriptor);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    });
    let index = blob(&layout, index.to_string().as_bytes())?;
    let top = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index.0,
            "size": index.1,
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name,
            },
        }],
    });
    fs::write(layout.join("index.json"), top.to_string())?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = dir.join(format!("{stem}.oci.tar"));
    let mut tar = Tar::default();
    tar.tree(&layout, "")?;
    fs::write(&archive, tar.finish())?;
    Ok(archive)
}

/// One architecture's layer (gzip), config and manifest; returns the manifest's descriptor and
/// the compressed layer's size.
fn write_platform(
    layout: &Path,
    platform: PlatformImage,
) -> anyhow::Result<(serde_json::Value, u64)> {
    let diff_id = format!("sha256:{:x}", Sha256::digest(&platform.layer));
    let layer_blob = blob(layout, &gzip(&platform.layer)?)?;
    let config = serde_json::json!({
        "architecture": platform.arch,
        "os": "linux",
        "config": platform.config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config_blob = blob(layout, config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_blob.0, "size": config_blob.1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_blob.0, "size": layer_blob.1}],
    });
    let manifest_blob = blob(layout, manifest.to_string().as_bytes())?;
    let descriptor = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_blob.0,
        "size": manifest_blob.1,
        "platform": {"architecture": platform.arch, "os": "linux"},
    });
    Ok((descriptor, layer_blob.1))
}

/// Writes `content` as a blob of the layout; returns its digest and size.
fn blob(layout: &Path, content: &[u8]) -> anyhow::Result<(String, u64)> {
    let hex = format!("{:x}", Sha256::digest(content));
    fs::write(layout.join("blobs/sha256").join(&hex), content)?;
    Ok((format!("sha256:{hex}"), content.len() as u64))
}

/// gzip, without a name or a time in the header (`-n`), so the same layer gives the same blob.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-n", "-9", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running gzip")?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer.join().expect("gzip's writer")?;
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}

/// A ustar archive with fixed owners (root) and times (the epoch): reproducible.
#[derive(Default)]
pub struct Tar {
    out: Vec<u8>,
}

impl Tar {
    pub fn file(&mut self, path: &str, content: &[u8], mode: u32) {
        self.header(path, content.len() as u64, mode, b'0');
        self.out.extend_from_slice(content);
        self.pad();
    }

    pub fn dir(&mut self, path: &str) {
        self.header(path, 0, 0o755, b'5');
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.header(path, 0, 0o777, b'2');
        let at = self.out.len() - 512;
        assert!(target.len() <= 100, "symlink target too long: {target}");
        self.out[at + 157..at + 157 + target.len()].copy_from_slice(target.as_bytes());
        self.checksum(at);
    }

    /// Every file below `dir`, as `prefix/relative path`, in a stable order.
    pub fn tree(&mut self, dir: &Path, prefix: &str) -> anyhow::Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.file_type()?.is_dir() {
                self.dir(&format!("{name}/"));
                self.tree(&entry.path(), &format!("{name}/"))?;
            } else {
                self.file(&name, &fs::read(entry.path())?, 0o644);
            }
        }
        Ok(())
    }

    fn header(&mut self, path: &str, size: u64, mode: u32, kind: u8) {
        assert!(path.len() <= 100, "tar path too long: {path}");
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        let octal = |field: &mut [u8], value: u64| {
            let text = format!("{value:0width$o}", width = field.len() - 1);
            field[..text.len()].copy_from_slice(text.as_bytes());
        };
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], 0);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        self.out.extend_from_slice(&h);
        self.checksum(self.out.len() - 512);
    }

    /// The header at `at`'s checksum: the byte sum with the checksum field as spaces.
    fn checksum(&mut self, at: usize) {
        let h = &mut self.out[at..at + 512];
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn pad(&mut self) {
        self.out.resize(self.out.len().next_multiple_of(512), 0);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        self.out
    }
}

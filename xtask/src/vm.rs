//! The kernel matrix: the end-to-end tests that touch the kernel, run inside QEMU VMs booted with
//! Debian's builds of the kernels EKS nodes run (5.10 for Amazon Linux 2, 6.1 and 6.12 for
//! Amazon Linux 2023 and Bottlerocket).
//!
//! How, as measured on this machine kind:
//! * Kernels come from Debian's archive through a private apt configuration (its own sources
//!   list, lists and cache under `target/vm/apt`), so the machine's apt state is untouched. They
//!   are unpacked under `target/vm/kernels` and kept there.
//! * virtme-ng boots each one with the host's root filesystem shared read-only over 9p, so the
//!   binaries built on the host run unchanged inside. KVM fails on this machine kind (`failed to
//!   set MSR 0x10a`), so QEMU emulates (TCG). virtme-ng needs the host's `udev` to reach the
//!   guest's console ports; without it no output or exit status comes back.
//! * Build once on the host, boot once per kernel, run the tests in one go inside, one VM at a
//!   time (two at once are slower than one after the other on two cores).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{output, run, succeeds};

/// The kernels of the matrix: what EKS nodes run, as Debian builds them.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        series: "5.10",
        distributions: "Amazon Linux 2",
        arch: Arch::Amd64,
        package: Pattern::Exact("linux-image-5.10.0-32-amd64-unsigned"),
    },
    Kernel {
        series: "6.1",
        distributions: "Amazon Linux 2023, Bottlerocket",
        arch: Arch::Amd64,
        package: Pattern::Newest("linux-image-6.1.0-", "-amd64-unsigned"),
    },
    Kernel {
        series: "6.12",
        distributions: "Amazon Linux 2023, Bottlerocket",
        arch: Arch::Amd64,
        package: Pattern::Newest("linux-image-6.12.", "+deb12-amd64-unsigned"),
    },
];

/// The end-to-end tests that run on every kernel: those that declare themselves kernel-facing by
/// living in a `matrix` module of the e2e suite (`tests/README.md`), listed from the test binary
/// itself, so naming or adding one needs no change here.
/// With `only`, just those whose name contains it.
pub fn matrix_tests(e2e: &Path, only: Option<&str>) -> anyhow::Result<Vec<String>> {
    let tests: Vec<String> = list_tests(e2e)?
        .into_iter()
        .filter(|name| name.starts_with("matrix::") || name.contains("::matrix::"))
        .filter(|name| only.is_none_or(|only| name.contains(only)))
        .collect();
    if tests.is_empty() {
        bail!("the e2e suite declares no kernel-facing tests (a `matrix` module)");
    }
    Ok(tests)
}

/// The tests of a libtest binary.
pub fn list_tests(binary: &Path) -> anyhow::Result<Vec<String>> {
    let listed = Command::new(binary)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("listing the tests of {}", binary.display()))?;
    if !listed.status.success() {
        bail!("{} --list failed", binary.display());
    }
    Ok(String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

pub struct Kernel {
    pub series: &'static str,
    pub distributions: &'static str,
    pub arch: Arch,
    pub package: Pattern,
}

/// A Debian architecture: packages of each come from a private apt configuration of its own.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Its apt state and downloads: `target/vm/apt` and `debs` for amd64 (as before arm64
    /// came), with a suffix for the others.
    fn dir(self, base: &str) -> PathBuf {
        match self {
            Arch::Amd64 => vm_dir().join(base),
            other => vm_dir().join(format!("{base}-{}", other.name())),
        }
    }
}

/// Which Debian package holds a kernel.
pub enum Pattern {
    Exact(&'static str),
    /// The newest package named `prefix<version>suffix`.
    Newest(&'static str, &'static str),
}

/// virtme-ng, pinned: the version these steps were measured with.
const VIRTME_NG: &str = "virtme-ng==1.42";
/// Host packages the VMs need (qemu without recommends: a backported qemu-utils conflicts).
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    "udev",
    "python3-venv",
];
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
";
/// Time one VM may take, boot and tests included (5.10 under TCG is the slowest).
const VM_TIMEOUT: Duration = Duration::from_secs(25 * 60);
/// How much longer than on the host the tests wait in a VM (`PIA_TIME_SCALE`). Under TCG an
/// agent takes 7 to 20 s to start on 5.10, against 30 s the tests allow on the host, and CI
/// machines are slower still. Most of that start is the system's CA certificates: the guest
/// reads them from the one bundle (`SSL_CERT_FILE`), the same certificates without opening
/// each of the ~150 files of /etc/ssl/certs over 9p.
const TIME_SCALE: u32 = 4;

/// One kernel's result (the matrix's, or the arm64 smoke test's).
pub struct Outcome {
    pub series: &'static str,
    pub version: String,
    pub passed: Vec<String>,
    pub failed: Vec<String>,
    pub took: Duration,
}

impl Outcome {
    /// The result's line in a results table; `runs_on` names the distributions with the kernel.
    pub fn row(&self, runs_on: &str) -> String {
        format!(
            "  {:<6} {:<24} {:<34} {:>6} {:>6} {:>7.0}s\n",
            self.series,
            self.version,
            runs_on,
            self.passed.len(),
            self.failed.len(),
            self.took.as_secs_f64()
        )
    }
}

fn vm_dir() -> PathBuf {
    crate::target_dir().join("vm")
}

/// Installs what the VMs need, idempotently.
pub fn setup() -> anyhow::Result<()> {
    crate::install::apt(VM_PACKAGES)?;
    let venv = vm_dir().join("venv");
    let present = output(Command::new(venv.join("bin/vng")).arg("--version")).contains("1.42");
    crate::install::step(VIRTME_NG, present, || {
        crate::install::quiet(
            Command::new("/usr/bin/python3")
                .arg("-m")
                .arg("venv")
                .arg(&venv),
        )?;
        crate::install::quiet(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "--disable-pip-version-check",
            VIRTME_NG,
        ]))
    })
}

/// `program` (apt-get or apt-cache) on the private apt configuration of `arch` under
/// `target/vm/apt*`.
fn apt(arch: Arch, program: &str, args: &[&str]) -> Command {
    let apt = arch.dir("apt");
    let mut cmd = Command::new(program);
    for option in [
        format!(
            "Dir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "Dir::Etc::SourceParts=/dev/null".to_owned(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        "APT::Sandbox::User=root".to_owned(),
        "Acquire::Languages=none".to_owned(),
        format!("APT::Architecture={}", arch.name()),
        format!("APT::Architectures::={}", arch.name()),
    ] {
        cmd.arg("-o").arg(option);
    }
    cmd.arg("-q").args(args);
    cmd
}

/// The kernel's package, fetched and unpacked once: its version and directory.
pub fn fetch(kernel: &Kernel) -> anyhow::Result<(String, PathBuf)> {
    let kernels = vm_dir().join("kernels");
    let chosen = match kernel.arch {
        Arch::Amd64 => kernels.join(format!("{}.package", kernel.series)),
        other => kernels.join(format!("{}-{}.package", other.name(), kernel.series)),
    };
    if let Ok(package) = fs::read_to_string(&chosen) {
        let version = version_of(package.trim());
        let dir = kernels.join(&version);
        if dir.join(".ok").exists() {
            return Ok((version, dir));
        }
    }
    apt_lists(kernel.arch)?;
    let package = match kernel.package {
        Pattern::Exact(name) => name.to_owned(),
        Pattern::Newest(prefix, suffix) => {
            let listing = output(&mut apt(kernel.arch, "apt-cache", &["pkgnames", prefix]));
            listing
                .lines()
                .filter(|p| {
                    p.ends_with(suffix)
                        && p[prefix.len()..p.len() - suffix.len()]
                            .chars()
                            .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
                })
                .max_by(|a, b| compare_versions(a, b))
                .with_context(|| format!("no {prefix}*{suffix} package in Debian's archive"))?
                .to_owned()
        }
    };
    let deb = download(kernel.arch, &package)?;
    let version = version_of(&package);
    let dir = kernels.join(&version);
    let unpacking = kernels.join(format!("{version}.tmp"));
    let _ = fs::remove_dir_all(&unpacking);
    fs::create_dir_all(&unpacking)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacking))?;
    // The packages ship no modules.dep; the guest's modprobe needs it.
    run(Command::new("depmod")
        .arg("-a")
        .arg("-b")
        .arg(&unpacking)
        .arg(&version))?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&unpacking, &dir)?;
    fs::write(dir.join(".ok"), "")?;
    fs::write(&chosen, &package)?;
    Ok((version, dir))
}

/// The private apt configuration's lists, fetched once.
fn apt_lists(arch: Arch) -> anyhow::Result<()> {
    let apt_dir = arch.dir("apt");
    fs::create_dir_all(apt_dir.join("lists/partial"))?;
    fs::create_dir_all(apt_dir.join("cache/archives/partial"))?;
    fs::write(apt_dir.join("sources.list"), SOURCES)?;
    if !apt_dir
        .join("lists")
        .read_dir()?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
    {
        crate::install::quiet(&mut apt(arch, "apt-get", &["update"]))
            .context("updating the private apt lists (Debian's archive)")?;
    }
    Ok(())
}

/// A Debian package's .deb, downloaded once (kept under target/vm/debs) without touching the
/// machine's apt state.
pub fn download(arch: Arch, package: &str) -> anyhow::Result<PathBuf> {
    apt_lists(arch)?;
    let debs = arch.dir("debs");
    fs::create_dir_all(&debs)?;
    let find = || {
        fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    crate::install::quiet(apt(arch, "apt-get", &["download", package]).current_dir(&debs))
        .with_context(|| format!("downloading {package}"))?;
    find().context("downloaded package not found")
}

/// `linux-image-6.1.0-57-amd64-unsigned` -> `6.1.0-57-amd64`.
fn version_of(package: &str) -> String {
    package
        .trim_start_matches("linux-image-")
        .trim_end_matches("-unsigned")
        .to_owned()
}

/// Orders dotted and dashed version strings by their numbers.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let numbers = |s: &str| {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<u64>().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    numbers(a).cmp(&numbers(b))
}

/// Boots `kernel` and runs the end-to-end binary `e2e` inside with the [`matrix_tests`].
pub fn run_matrix_on(
    kernel: &Kernel,
    e2e: &Path,
    agent: &Path,
    only: Option<&str>,
) -> anyhow::Result<Outcome> {
    let tests = matrix_tests(e2e, only)?;
    let mut args = vec![
        "--exact".to_owned(),
        "--test-threads".to_owned(),
        "2".to_owned(),
    ];
    args.extend(tests.iter().cloned());
    run_in_vm(
        kernel,
        &GuestRun {
            name: kernel.series,
            binary: e2e,
            tests: &tests,
            args: &args,
            env: &[("PIA_AGENT_BIN", agent.display().to_string())],
            before: "",
            memory: "2G",
        },
    )
}

/// A test binary's run inside a VM.
pub struct GuestRun<'a> {
    /// Names the results file (`target/vm/results/<name>.txt`).
    pub name: &'a str,
    pub binary: &'a Path,
    /// The tests that must report.
    pub tests: &'a [String],
    /// The binary's arguments (the test filter among them).
    pub args: &'a [String],
    /// The variables the tests read, besides the common ones.
    pub env: &'a [(&'a str, String)],
    /// Shell lines the guest runs first.
    pub before: &'a str,
    pub memory: &'a str,
}

/// Boots `kernel` under virtme-ng (the host's root read-only) and runs `run` inside, in the
/// tests' directory, as root; every test of `run.tests` that does not report counts as failed.
pub fn run_in_vm(kernel: &Kernel, run: &GuestRun<'_>) -> anyhow::Result<Outcome> {
    let (version, dir) = fetch(kernel)?;
    let out_dir = vm_dir().join("results");
    fs::create_dir_all(&out_dir)?;
    let results = out_dir.join(format!("{}.txt", run.name));
    let _ = fs::remove_file(&results);
    let script = vm_dir().join(format!("guest-{}.sh", run.name));
    fs::write(&script, guest_script(run, &results))?;
    let kernel_image = dir.join("boot").join(format!("vmlinuz-{version}"));
    eprintln!(
        "xtask: booting {version} under QEMU (TCG) for {} tests of {}",
        run.tests.len(),
        run.binary.file_name().unwrap_or_default().to_string_lossy()
    );
    let started = Instant::now();
    let venv_bin = vm_dir().join("venv/bin");
    let path = format!(
        "{}:{}",
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let status = Command::new("timeout")
        .args(["-k", "20", &VM_TIMEOUT.as_secs().to_string()])
        .arg(venv_bin.join("vng"))
        .args([
            "--disable-kvm",
            "--cpus",
            "2",
            "--memory",
            run.memory,
            "--run",
        ])
        .arg(&kernel_image)
        .arg("--rwdir")
        .arg(&out_dir)
        .arg("--exec")
        .arg(format!(
            "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; sh {}",
            script.display()
        ))
        .env("PATH", path)
        .stdin(Stdio::null())
        // Pipes, not files: QEMU reopens its stdout and stderr with O_TRUNC.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("running vng (cargo xtask setup installs it)")?;
    let took = started.elapsed();
    let report = fs::read_to_string(&results).unwrap_or_default();
    let (passed, mut failed) = reported(&report);
    if passed.len() + failed.len() < run.tests.len() {
        eprintln!(
            "xtask: {version}: {} of {} tests reported (vng exit {:?}); guest output:\n{}{}",
            passed.len() + failed.len(),
            run.tests.len(),
            status.status.code(),
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        );
        for name in run.tests {
            if !passed.iter().chain(&failed).any(|n| n == name) {
                failed.push(format!("{name} (did not report)"));
            }
        }
    } else if !failed.is_empty() {
        eprintln!("xtask: {version}: failures:\n{report}");
    }
    Ok(Outcome {
        series: kernel.series,
        version,
        passed,
        failed,
        took,
    })
}

/// The guest's script: the host's Python and tools on the PATH, the tests' variables, then the
/// binary with its output in `results`.
fn guest_script(run: &GuestRun<'_>, results: &Path) -> String {
    // The host's Python (boto3 and the rest of the test clients are installed there) and tools.
    let python = output(Command::new("python3").args([
        "-c",
        "import sys, os; print(os.path.dirname(sys.executable))",
    ]));
    let env: String = run
        .env
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    let args: Vec<String> = run.args.iter().map(|a| format!("'{a}'")).collect();
    format!(
        "set -u\n\
         export PATH={python}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export RUST_BACKTRACE=0\n\
         export PIA_TIME_SCALE={TIME_SCALE}\n\
         export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt\n\
         {env}\
         ulimit -l unlimited 2>/dev/null\n\
         {before}\n\
         cd {tests}\n\
         echo \"kernel $(uname -r)\"\n\
         {binary} {args} > {results} 2>&1\n\
         status=$?\n\
         cat {results}\n\
         exit $status\n",
        python = python.trim(),
        before = run.before,
        tests = crate::workspace_root().join("tests").display(),
        binary = run.binary.display(),
        args = args.join(" "),
        results = results.display(),
    )
}

/// The tests a libtest report says passed, and those it says failed.
fn reported(report: &str) -> (Vec<String>, Vec<String>) {
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    for line in report.lines() {
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        if let Some(name) = rest.strip_suffix(" ... ok") {
            passed.push(name.to_owned());
        } else if let Some(name) = rest.strip_suffix(" ... FAILED") {
            failed.push(name.to_owned());
        }
    }
    (passed, failed)
}

/// Runs the matrix on every kernel, one VM after the other; fails if any test failed anywhere.
pub fn run_matrix(e2e: &Path, agent: &Path, only: Option<&str>) -> anyhow::Result<Vec<Outcome>> {
    if !succeeds(Command::new(vm_dir().join("venv/bin/vng")).arg("--version")) {
        bail!("virtme-ng is missing: run `cargo xtask setup`");
    }
    let mut outcomes = Vec::new();
    for kernel in KERNELS {
        outcomes.push(run_matrix_on(kernel, e2e, agent, only)?);
    }
    let mut table = String::from("\nkernel matrix (the same tests on each kernel, inside QEMU):\n");
    table.push_str(&format!(
        "  {:<6} {:<24} {:<34} {:>6} {:>6} {:>8}\n",
        "series", "kernel", "runs on", "passed", "failed", "time"
    ));
    for (o, k) in outcomes.iter().zip(KERNELS) {
        table.push_str(&o.row(k.distributions));
    }
    eprintln!("{table}");
    fs::write(vm_dir().join("results/matrix.txt"), &table)?;
    let failures: Vec<String> = outcomes
        .iter()
        .flat_map(|o| {
            o.failed
                .iter()
                .map(move |t| format!("{} on {}", t, o.version))
        })
        .collect();
    if !failures.is_empty() {
        bail!("kernel matrix failures:\n  {}", failures.join("\n  "));
    }
    Ok(outcomes)
}

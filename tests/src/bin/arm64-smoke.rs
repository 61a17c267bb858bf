//! The slice of the agent proven on an arm64 kernel, inside a QEMU VM that `cargo xtask test`
//! boots with this program and the agent (both static aarch64 binaries) in its initramfs. It
//! runs as root in the VM's only namespaces, with cgroup2 at /sys/fs/cgroup:
//!
//! * the fake EKS Auth on 127.0.0.1; the agent in eBPF mode, attached at the cgroup root,
//!   listening on 198.18.0.1 (an address on `lo`: a concrete one pods route to, as a node IP);
//! * the programs are attached (read back with BPF_PROG_QUERY);
//! * a process in a kubepods-shaped pod cgroup dials 169.254.170.23:80, is redirected, is
//!   attributed to its pod, and gets that pod's credentials from the fake;
//! * another pod presenting that token is refused (403);
//! * the IMDS guard (`--imds deny`): a pod process in a network namespace of its own is refused
//!   a connect to 169.254.169.254:80 with EPERM, one in the node's namespace is not;
//! * SIGTERM: the agent exits 0 and nothing stays attached.
//!
//! `arm64-smoke AGENT` runs the checks and prints `SMOKE ok <check>` or `SMOKE FAIL <check>:
//! <why>` for each, then `SMOKE DONE passed=N failed=M`; `arm64-smoke client CGROUP TOKEN` is the
//! pod's process (it moves itself into CGROUP and makes the request).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pod_identity_e2e::{
    CLUSTER, FakeAws, NODE_ACCESS_KEY, NODE_SECRET, REGION, bpf,
    fake_aws::access_key_for,
    jwt::{self, TokenSpec},
};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const NODE_IP: &str = "198.18.0.1";
const PROBE: &str = "127.0.0.1:2703";
/// The checks that follow "the agent starts".
const CHECKS_AFTER_READY: u32 = 7;
/// Half the DaemonSet's memory limit (128 MiB).
const RESIDENT_LIMIT_MIB: u64 = 64;

/// `VmRSS` of `pid`, in KiB.
fn resident_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("client") => client(Path::new(&args[1]), &args[2]),
        Some("imds") => imds_client(Path::new(&args[1]), &args[2] == "own-netns"),
        Some(agent) => smoke(Path::new(agent)),
        None => {
            eprintln!("usage: arm64-smoke AGENT | arm64-smoke client CGROUP TOKEN");
            std::process::exit(2);
        }
    }
}

/// One HTTP GET over a fresh connection: (status, body).
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token
        .map(|t| format!("Authorization: {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((
        status,
        raw.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

/// The pod's process: into its cgroup, then the request an SDK makes.
fn client(cgroup: &Path, token: &str) {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .expect("join the pod cgroup");
    match get(
        "169.254.170.23:80".parse().unwrap(),
        "/v1/credentials",
        Some(token),
    ) {
        Ok((status, body)) => println!("{status} {body}"),
        Err(e) => println!("0 {e}"),
    }
}

/// A pod's process reaching for IMDS: into its cgroup and, with `own_netns`, a network
/// namespace of its own; prints the connect's errno (0 when it connected or timed out).
fn imds_client(cgroup: &Path, own_netns: bool) {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .expect("join the pod cgroup");
    // SAFETY: unshare on this single-threaded process.
    if own_netns && unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        println!("unshare failed: {}", std::io::Error::last_os_error());
        return;
    }
    let errno = TcpStream::connect_timeout(
        &"169.254.169.254:80".parse().unwrap(),
        Duration::from_millis(500),
    )
    .err()
    .and_then(|e| e.raw_os_error())
    .unwrap_or(0);
    println!("{errno}");
}

/// The errno a pod process's connect to IMDS got.
fn imds_errno(cgroup: &Path, own_netns: bool) -> i32 {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("imds")
        .arg(cgroup)
        .arg(if own_netns { "own-netns" } else { "node-netns" })
        .output()
        .expect("imds client");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(-1)
}

struct Pod {
    uid: String,
    name: String,
    cgroup: PathBuf,
}

/// A pod with kubelet's systemd-driver cgroup layout and one container.
fn pod(name: &str, n: u32) -> Pod {
    let uid = format!("{n:08x}-a64a-4a64-8a64-0000000000{n:02x}");
    let slice = format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_"));
    let cgroup = Path::new(CGROUP_ROOT)
        .join("kubepods.slice/kubepods-burstable.slice")
        .join(slice)
        .join(format!(
            "cri-containerd-{}.scope",
            format!("{n:02x}").repeat(32)
        ));
    std::fs::create_dir_all(&cgroup).expect("pod cgroup");
    Pod {
        uid,
        name: name.to_owned(),
        cgroup,
    }
}

impl Pod {
    fn token(&self) -> String {
        jwt::mint(&TokenSpec {
            namespace: "payments".into(),
            pod_name: self.name.clone(),
            pod_uid: self.uid.clone(),
            service_account: "api".into(),
            expires_in: 3600,
        })
    }

    /// The request, from a process in this pod's cgroup: (status, body).
    fn request(&self, token: &str) -> (u16, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .arg("client")
            .arg(&self.cgroup)
            .arg(token)
            .output()
            .expect("client");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (status, body) = text.split_once(' ').unwrap_or((&text, ""));
        (status.parse().unwrap_or(0), body.to_owned())
    }
}

struct Report {
    passed: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("SMOKE ok {name}");
            }
            Err(why) => {
                self.failed += 1;
                println!("SMOKE FAIL {name}: {why}");
            }
        }
    }
}

fn smoke(agent_binary: &Path) {
    let mut report = Report {
        passed: 0,
        failed: 0,
    };
    let root = Path::new(CGROUP_ROOT);
    let fake = FakeAws::start_here("127.0.0.1:0".parse().unwrap());
    fake.associate("payments", "api", "payments-api-role");
    // The agent in a cgroup of its own, as a DaemonSet pod would be.
    let agent_cgroup = root.join("system.slice/pod-identity-agent.scope");
    std::fs::create_dir_all(&agent_cgroup).expect("agent cgroup");
    let log = std::fs::File::create("/tmp/agent.log").unwrap();
    let mut agent = Command::new(agent_binary)
        .args([
            "run",
            "--cluster-name",
            CLUSTER,
            "--mode",
            "ebpf",
            "--cgroup-root",
            CGROUP_ROOT,
            "--region",
            REGION,
            "--imds",
            "deny",
        ])
        .args([
            "--listen",
            &format!("{NODE_IP}:2704"),
            "--probe-addr",
            PROBE,
            "--metrics-addr",
            "127.0.0.1:2705",
        ])
        .args(["--eks-auth-endpoint", &fake.endpoint()])
        .env("AWS_ACCESS_KEY_ID", NODE_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", NODE_SECRET)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the agent");
    std::fs::write(agent_cgroup.join("cgroup.procs"), agent.id().to_string())
        .expect("agent into its cgroup");
    let agent_log = || std::fs::read_to_string("/tmp/agent.log").unwrap_or_default();

    // TCG is slow: the kernel object's load and verification take a while.
    let deadline = Instant::now() + Duration::from_secs(300);
    let ready = loop {
        match get(PROBE.parse().unwrap(), "/readyz", None) {
            Ok((200, body)) => break Ok(body),
            _ if Instant::now() > deadline => {
                break Err(format!("not ready within 300 s:\n{}", agent_log()));
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let ready_ok = ready.as_ref().is_ok_and(|b| b.trim() == "ready");
    report.check(
        "the agent starts in eBPF mode",
        ready.and_then(|b| {
            if b.trim() == "ready" {
                Ok(())
            } else {
                Err(format!("/readyz: {b}"))
            }
        }),
    );
    if !ready_ok {
        let _ = agent.kill();
        let _ = agent.wait();
        // The checks that could not run count as failed.
        println!(
            "SMOKE DONE passed={} failed={}",
            report.passed,
            report.failed + CHECKS_AFTER_READY
        );
        return;
    }

    let attached = bpf::attached(root);
    let names: Vec<&str> = attached.iter().map(|a| a.name.as_str()).collect();
    report.check(
        "connect4, connect6 and sock_ops are attached at the cgroup root",
        if attached.len() == 3 {
            Ok(())
        } else {
            Err(format!("attached: {names:?}"))
        },
    );

    let api = pod("api-0", 1);
    let token = api.token();
    let (status, body) = api.request(&token);
    let key = access_key_for("payments", "api");
    report.check(
        "a pod's connect to 169.254.170.23:80 is redirected and answered with its credentials",
        if status == 200 && body.contains(&key) {
            Ok(())
        } else {
            Err(format!("{status} {body}\n{}", agent_log()))
        },
    );
    let calls = fake.calls();
    report.check(
        "the connection is attributed to its pod",
        if calls.len() == 1
            && calls[0].pod_uid == api.uid
            && !agent_log().contains("token_pod_mismatch")
        {
            // The pods view names the pod by its cgroup, which only attribution can know.
            match get(PROBE.parse().unwrap(), "/v1/pods", None) {
                Ok((200, pods)) if pods.contains(&api.uid) => Ok(()),
                other => Err(format!("/v1/pods: {other:?}")),
            }
        } else {
            Err(format!("{calls:?}"))
        },
    );

    let thief = pod("api-1", 2);
    let (status, body) = thief.request(&token);
    report.check(
        "another pod presenting that token is refused",
        if status == 403 && body.contains("token belongs to pod payments/api-0") {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        },
    );

    let legacy = pod("legacy-0", 3);
    let (own, node) = (
        imds_errno(&legacy.cgroup, true),
        imds_errno(&legacy.cgroup, false),
    );
    report.check(
        "--imds deny: a pod's own network namespace is refused IMDS (EPERM), the node's is not",
        if own == libc::EPERM && node != libc::EPERM {
            Ok(())
        } else {
            Err(format!(
                "errno {own} from a pod's namespace, {node} from the node's\n{}",
                agent_log()
            ))
        },
    );

    // The shipped allocator (jemalloc, built for pages of up to 64 KiB so that arm64 kernels
    // with 16 or 64 KiB pages run it too) on this 4 KiB-page kernel: resident memory stays in
    // the bounds the manifests give.
    let resident = resident_kib(agent.id());
    report.check(
        &format!(
            "after serving, the agent holds {:.1} MiB resident (below {RESIDENT_LIMIT_MIB} MiB)",
            resident.unwrap_or(0) as f64 / 1024.0
        ),
        match resident {
            Some(kib) if kib < RESIDENT_LIMIT_MIB * 1024 => Ok(()),
            other => Err(format!("VmRSS: {other:?} KiB")),
        },
    );

    // SAFETY: kill(2) on the agent's pid.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let exit = agent.wait().expect("agent exit");
    let left = bpf::attached(root);
    report.check(
        "SIGTERM: the agent exits 0 and leaves nothing attached",
        if exit.success() && left.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "exit {exit}, still attached {left:?}\n{}",
                agent_log()
            ))
        },
    );
    println!(
        "SMOKE DONE passed={} failed={}",
        report.passed, report.failed
    );
}

//! Simulated node and pods.
//!
//! Node `k`: network namespace `pia-<pid>-<k>` holding the node addresses `198.18.k.1` and
//! `2001:2:0:k::1` on its loopback, and cgroup `<cgroup2>/pia-<pid>-<k>` where the agent attaches.
//! Pod `i`: network namespace `pia-<pid>-<k>-p<i>` with `eth0` (`198.18.k.(10+i)`,
//! `2001:2:0:k::(10+i)`), its peer `veth<i>` in the node namespace, and a cgroup shaped the way
//! kubelet lays out pods. A hostNetwork pod has only the cgroup and runs in the node namespace.

use std::{
    ffi::CString,
    fs::{self, File},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use crate::jwt::{self, TokenSpec};

static NEXT_NODE: AtomicU32 = AtomicU32::new(1);

/// How kubelet's cgroup driver names a pod's cgroups.
#[derive(Clone, Copy, Debug)]
pub enum CgroupShape {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`
    SystemdBurstable,
    /// `kubepods.slice/kubepods-pod<uid_>.slice/crio-<id>.scope` (Guaranteed QoS)
    SystemdGuaranteed,
    /// `kubepods/besteffort/pod<uid>/<id>`
    CgroupfsBestEffort,
}

pub struct Node {
    pub index: u32,
    pub netns: String,
    /// Where the agent attaches: every pod cgroup of this node is below it.
    pub cgroup_root: PathBuf,
    /// The agent's own cgroup (inside the root, so its exclusion is exercised).
    pub agent_cgroup: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// False for a node whose kernel has IPv6 disabled (its namespaces and its pods').
    pub ipv6: bool,
    pods: Mutex<u32>,
    pod_netns: Mutex<Vec<String>>,
}

pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    /// The pod's network namespace; the node's for a hostNetwork pod.
    pub netns: String,
    pub cgroup: PathBuf,
    pub ip4: Option<Ipv4Addr>,
    dir: PathBuf,
}

/// The cgroup2 mount point of this machine.
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if let Some(sep) = fields.iter().position(|f| *f == "-")
            && fields.get(sep + 1) == Some(&"cgroup2")
        {
            return PathBuf::from(fields[4]);
        }
    }
    panic!("no cgroup2 mount: the agent and its tests need cgroup v2");
}

/// Runs a command and panics with its output if it fails.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A connect that is not redirected must fail at once (EHOSTUNREACH) rather than wait for a SYN
/// to time out, so tests can tell "not redirected" from "slow".
fn unreachable_credential_addresses(netns: &str, ipv6: bool) {
    sh(
        "ip",
        &[
            "-n",
            netns,
            "route",
            "add",
            "unreachable",
            "169.254.170.23/32",
        ],
    );
    if ipv6 {
        sh(
            "ip",
            &[
                "-n",
                netns,
                "-6",
                "route",
                "add",
                "unreachable",
                "fd00:ec2::23/128",
            ],
        );
    }
}

fn disable_ipv6(netns: &str) {
    sh(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
    );
}

/// Runs `f` on a thread that has joined network namespace `netns` (sockets made there stay there).
pub fn in_netns<R: Send + 'static>(netns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on this thread only; the fd is valid.
        let joined = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(joined, 0, "setns {path}");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A `Command` that starts in `cgroup` (when given) and network namespace `netns`.
pub fn command_in(program: &str, cgroup: Option<&Path>, netns: &str) -> Command {
    let mut cmd = Command::new(program);
    let procs = cgroup.map(|c| CString::new(c.join("cgroup.procs").to_str().unwrap()).unwrap());
    let ns = File::open(format!("/run/netns/{netns}"))
        .unwrap_or_else(|e| panic!("open netns {netns}: {e}"));
    // SAFETY: the closure only makes async-signal-safe syscalls on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            // Join the cgroup first: entering the namespace does not change what /sys shows, but
            // the order keeps this independent of mounts.
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if wrote != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A plain HTTP/1.1 GET from inside `netns`: (status, body).
pub fn http_get(netns: &str, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_owned();
    in_netns(netns, move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        let status = raw
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    })
}

impl Node {
    #[expect(
        clippy::new_without_default,
        reason = "a node is namespaces and cgroups made on the machine, not a default value"
    )]
    pub fn new() -> Node {
        Node::create(true)
    }

    /// A node (and pods) with IPv6 disabled, as on nodes booted with ipv6.disable=1.
    pub fn without_ipv6() -> Node {
        Node::create(false)
    }

    fn create(ipv6: bool) -> Node {
        crate::require_root();
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| remove_leftovers(|pid| !Path::new(&format!("/proc/{pid}")).exists()));
        let index = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        assert!(index < 250, "too many nodes in one run");
        let name = format!("pia-{}-{index}", std::process::id());
        let cgroup_root = cgroup2_mount().join(&name);
        let agent_cgroup = cgroup_root.join("pod-identity-agent");
        let node = Node {
            index,
            netns: name.clone(),
            cgroup_root,
            agent_cgroup,
            ip4: Ipv4Addr::new(198, 18, index as u8, 1),
            ip6: format!("2001:2:0:{index:x}::1").parse().unwrap(),
            ipv6,
            pods: Mutex::new(0),
            pod_netns: Mutex::new(Vec::new()),
        };
        // From here on, Drop cleans up whatever was made.
        fs::create_dir_all(&node.agent_cgroup).expect("create node cgroup");
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        sh(
            "ip",
            &[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/32", node.ip4),
                "dev",
                "lo",
            ],
        );
        if ipv6 {
            sh(
                "ip",
                &[
                    "-n",
                    &name,
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/128", node.ip6),
                    "dev",
                    "lo",
                    "nodad",
                ],
            );
        } else {
            disable_ipv6(&name);
        }
        unreachable_credential_addresses(&name, ipv6);
        node
    }

    /// Where the agent listens: the node addresses, one per family.
    pub fn listen_addrs(&self, port: u16) -> [SocketAddr; 2] {
        [
            SocketAddr::new(self.ip4.into(), port),
            SocketAddr::new(self.ip6.into(), port),
        ]
    }

    /// A pod with its own network namespace.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
        shape: CgroupShape,
    ) -> Pod {
        let i = {
            let mut n = self.pods.lock().unwrap();
            *n += 1;
            *n
        };
        let mut pod = self.pod_cgroup(namespace, name, service_account, shape, i);
        let netns = format!("{}-p{i}", self.netns);
        sh("ip", &["netns", "add", &netns]);
        self.pod_netns.lock().unwrap().push(netns.clone());
        let veth = format!("veth{i}");
        let ip4 = Ipv4Addr::new(198, 18, self.index as u8, (10 + i) as u8);
        let ip6: Ipv6Addr = format!("2001:2:0:{:x}::{:x}", self.index, 10 + i)
            .parse()
            .unwrap();
        let n = self.netns.as_str();
        sh(
            "ip",
            &[
                "-n", n, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &netns,
            ],
        );
        sh("ip", &["-n", n, "link", "set", &veth, "up"]);
        sh(
            "ip",
            &["-n", n, "route", "add", &format!("{ip4}/32"), "dev", &veth],
        );
        sh("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        sh(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip4}/32"),
                "dev",
                "eth0",
            ],
        );
        if self.ipv6 {
            sh(
                "ip",
                &[
                    "-n",
                    n,
                    "-6",
                    "addr",
                    "add",
                    "fe80::1/64",
                    "dev",
                    &veth,
                    "nodad",
                ],
            );
            sh(
                "ip",
                &[
                    "-n",
                    n,
                    "-6",
                    "route",
                    "add",
                    &format!("{ip6}/128"),
                    "dev",
                    &veth,
                ],
            );
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &netns,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.eth0.accept_dad=0",
                ],
            );
            sh(
                "ip",
                &[
                    "-n",
                    &netns,
                    "-6",
                    "addr",
                    "add",
                    &format!("{ip6}/128"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            );
        } else {
            disable_ipv6(&netns);
        }
        sh("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        sh(
            "ip",
            &[
                "-n",
                &netns,
                "route",
                "add",
                &format!("{}/32", self.ip4),
                "dev",
                "eth0",
            ],
        );
        sh(
            "ip",
            &[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                &self.ip4.to_string(),
                "dev",
                "eth0",
            ],
        );
        if self.ipv6 {
            sh(
                "ip",
                &[
                    "-n", &netns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
                ],
            );
        }
        unreachable_credential_addresses(&netns, self.ipv6);
        pod.netns = netns;
        pod.ip4 = Some(ip4);
        pod
    }

    /// A hostNetwork pod: a pod cgroup, the node's network namespace.
    pub fn add_host_network_pod(&self, namespace: &str, name: &str, service_account: &str) -> Pod {
        let i = {
            let mut n = self.pods.lock().unwrap();
            *n += 1;
            *n
        };
        self.pod_cgroup(
            namespace,
            name,
            service_account,
            CgroupShape::SystemdBurstable,
            i,
        )
    }

    /// A process group on the node that is not a pod (e.g. a system daemon).
    pub fn host_cgroup(&self, relative: &str) -> PathBuf {
        let dir = self.cgroup_root.join(relative);
        fs::create_dir_all(&dir).expect("create host cgroup");
        dir
    }

    fn pod_cgroup(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
        shape: CgroupShape,
        i: u32,
    ) -> Pod {
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            std::process::id(),
            self.index,
            i,
            i,
            u64::from(i) * 7919
        );
        let u = uid.replace('-', "_");
        let container = format!("{:064x}", u64::from(i) * 104_729 + u64::from(self.index));
        let rel = match shape {
            CgroupShape::SystemdBurstable => format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{container}.scope"
            ),
            CgroupShape::SystemdGuaranteed => {
                format!("kubepods.slice/kubepods-pod{u}.slice/crio-{container}.scope")
            }
            CgroupShape::CgroupfsBestEffort => format!("kubepods/besteffort/pod{uid}/{container}"),
        };
        let cgroup = self.cgroup_root.join(rel);
        fs::create_dir_all(&cgroup).expect("create pod cgroup");
        let dir = std::env::temp_dir().join(format!("{}-pod{i}", self.netns));
        fs::create_dir_all(&dir).expect("create pod dir");
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            service_account: service_account.into(),
            netns: self.netns.clone(),
            cgroup,
            ip4: None,
            dir,
        }
    }

    /// A command in the node's network namespace, in `cgroup` (or the caller's cgroup).
    pub fn command(&self, program: &str, cgroup: Option<&Path>) -> Command {
        command_in(program, cgroup, &self.netns)
    }

    pub fn http_get(&self, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
        http_get(&self.netns, addr, path)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill_cgroup_tree(&self.cgroup_root);
        for netns in self.pod_netns.lock().unwrap().drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        remove_cgroup_tree(&self.cgroup_root);
        let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("{}-pod", self.netns)));
        for i in 1..=*self.pods.lock().unwrap() {
            let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("{}-pod{i}", self.netns)));
        }
    }
}

/// Removes the namespaces and cgroups of harness processes whose pid matches `owner_gone` (a run
/// killed before its Drop ran, or this process on Ctrl-C). Names are `pia-<pid>-...`.
pub fn remove_leftovers(owner_gone: impl Fn(u32) -> bool) {
    let pid_of = |name: &str| {
        name.strip_prefix("pia-")?
            .split('-')
            .next()?
            .parse::<u32>()
            .ok()
    };
    let mount = cgroup2_mount();
    if let Ok(entries) = fs::read_dir(&mount) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if pid_of(&name).is_some_and(&owner_gone) {
                kill_cgroup_tree(&e.path());
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    for line in String::from_utf8_lossy(&list).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if pid_of(name).is_some_and(&owner_gone) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// Kills every process in a cgroup subtree: `cgroup.kill` (Linux >= 5.14), else each pid listed
/// in the subtree's `cgroup.procs` files (older kernels, e.g. 5.10).
pub fn kill_cgroup_tree(root: &Path) {
    if root.join("cgroup.kill").exists() {
        let _ = fs::write(root.join("cgroup.kill"), "1");
        return;
    }
    fn kill_in(dir: &Path) {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    kill_in(&e.path());
                }
            }
        }
    }
    // A process forked while the walk ran is caught by the next pass.
    for _ in 0..3 {
        kill_in(root);
    }
}

/// Removes a cgroup subtree, deepest first, waiting briefly for killed processes to leave.
pub fn remove_cgroup_tree(root: &Path) {
    fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    collect(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut dirs = Vec::new();
    collect(root, &mut dirs);
    for dir in dirs {
        for _ in 0..50 {
            if fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// What an HTTP client in a pod got.
#[derive(Debug)]
pub struct HttpResult {
    pub status: u16,
    pub body: String,
}

/// The environment EKS injects into a pod for Pod Identity, with nothing of this machine's AWS
/// configuration left to fall back on.
fn sdk_env(cmd: &mut Command, full_uri: &str, token_file: &Path) {
    cmd.env("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri)
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file)
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_REGION", "us-west-2")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE");
}

/// Directory of the test crate (node client, helper binaries).
fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A private bpf filesystem for `--pin` tests, unmounted on drop.
/// The directory of a pin directory where the agent pins its links and maps: `v<N>`, N the
/// kernel/user contract's version.
pub fn pins_of_this_version() -> String {
    format!("v{}", pod_identity_common::CONTRACT_VERSION)
}

pub struct BpfFs {
    pub dir: PathBuf,
}

impl BpfFs {
    pub fn mount(name: &str) -> BpfFs {
        let dir = std::env::temp_dir().join(format!("pia-{}-bpffs-{name}", std::process::id()));
        fs::create_dir_all(&dir).expect("create bpffs dir");
        sh("mount", &["-t", "bpf", "bpf", dir.to_str().unwrap()]);
        BpfFs { dir }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).output();
        let _ = fs::remove_dir(&self.dir);
    }
}

impl Pod {
    /// Lets the pod route the credential addresses to the node (link mode serves them there);
    /// by default they are unreachable in a pod so a connect that is not redirected fails fast.
    pub fn route_credential_addresses_via_node(&self) {
        sh(
            "ip",
            &[
                "-n",
                &self.netns,
                "route",
                "del",
                "unreachable",
                "169.254.170.23/32",
            ],
        );
        // Absent on pods of a node without IPv6.
        let _ = Command::new("ip")
            .args([
                "-n",
                &self.netns,
                "-6",
                "route",
                "del",
                "unreachable",
                "fd00:ec2::23/128",
            ])
            .output();
    }

    /// Deletes the pod as kubelet would: its processes end, its cgroups and network go away.
    pub fn delete(&self) {
        let pod_cgroup = self
            .cgroup
            .parent()
            .expect("container cgroup has a pod parent");
        kill_cgroup_tree(pod_cgroup);
        remove_cgroup_tree(pod_cgroup);
        assert!(
            !pod_cgroup.exists(),
            "pod cgroup {} still exists",
            pod_cgroup.display()
        );
    }

    pub fn token_spec(&self) -> TokenSpec {
        TokenSpec {
            namespace: self.namespace.clone(),
            pod_name: self.name.clone(),
            pod_uid: self.uid.clone(),
            service_account: self.service_account.clone(),
            expires_in: 24 * 3600,
        }
    }

    /// A fresh projected token for this pod.
    pub fn token(&self) -> String {
        jwt::mint(&self.token_spec())
    }

    /// Writes `token` where an SDK reads it (no trailing newline) and returns the path.
    pub fn write_token_file(&self, token: &str) -> PathBuf {
        let path = self.dir.join("eks-pod-identity-token");
        fs::write(&path, token).expect("write token file");
        path
    }

    /// A command running in this pod (its cgroup and network namespace).
    pub fn command(&self, program: &str) -> Command {
        command_in(program, Some(&self.cgroup), &self.netns)
    }

    /// `curl` in the pod: GET `url` with the raw token as Authorization.
    pub fn curl(&self, url: &str, token: &str) -> HttpResult {
        curl(self.command("curl"), url, token, &[])
    }

    /// boto3 in the pod, configured only through the variables EKS injects. Ok(access key id,
    /// secret, session token) or Err(what botocore said).
    pub fn boto3(&self, full_uri: &str, token_file: &Path) -> Result<[String; 3], String> {
        let mut cmd = self.command("python3");
        cmd.arg("-c").arg(BOTO3_CREDENTIALS);
        sdk_env(&mut cmd, full_uri, token_file);
        let out = cmd.output().expect("run python3");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("unexpected boto3 output: {e}"))
    }

    /// boto3's default chain in the pod with nothing of Pod Identity set, as in a pod without an
    /// association: it falls back to IMDS. (The access key it found, if any; seconds the chain
    /// took, measured in the script.)
    pub fn boto3_default_chain(&self) -> (Option<String>, f64) {
        let script = r#"
import json, time, boto3
t = time.monotonic()
c = boto3.Session(region_name="us-west-2").get_credentials()
took = time.monotonic() - t
print(json.dumps([c.get_frozen_credentials().access_key if c else None, took]))
"#;
        let mut cmd = self.command("python3");
        cmd.arg("-c").arg(script);
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            "AWS_EC2_METADATA_DISABLED",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent");
        let out = cmd.output().expect("run python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the script's JSON");
        (
            v[0].as_str().map(str::to_owned),
            v[1].as_f64().unwrap_or(f64::NAN),
        )
    }

    /// The AWS CLI v1 in the pod: `aws configure list` resolves credentials through the CLI's
    /// provider chain and shows the access key's last four characters and where it came from.
    /// Ok(those four characters, when the source is the container provider) or Err(what the CLI
    /// said).
    pub fn aws_cli(&self, full_uri: &str, token_file: &Path) -> Result<String, String> {
        let mut cmd = self.command("python3");
        cmd.args(["-m", "awscli", "configure", "list"]);
        sdk_env(&mut cmd, full_uri, token_file);
        let out = cmd.output().expect("run aws cli");
        aws_configure_list_key(
            out.status.success(),
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// The Rust SDK's ECS (container) credentials provider from aws-config, in the pod.
    pub fn rust_sdk(&self, full_uri: &str, token_file: &Path) -> Result<String, String> {
        let exe = std::env::var_os("PIA_ECS_CLIENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::agent::binary().with_file_name("ecs-credentials"));
        let mut cmd = self.command(exe.to_str().expect("utf-8 path"));
        sdk_env(&mut cmd, full_uri, token_file);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `@aws-sdk/credential-provider-http` (AWS SDK for JavaScript v3) under Node, in the pod.
    pub fn node_sdk(&self, full_uri: &str, token_file: &Path) -> Result<String, String> {
        let mut cmd = self.command("node");
        cmd.arg(crate_dir().join("node").join("credentials.js"));
        sdk_env(&mut cmd, full_uri, token_file);
        let out = cmd.output().expect("run node");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// A Python program that prints the credentials boto3's default chain resolves, as JSON:
/// [access key id, secret, session token].
pub const BOTO3_CREDENTIALS: &str = r#"
import json, boto3
c = boto3.Session(region_name="us-west-2").get_credentials()
if c is None:
    raise SystemExit("no credentials")
f = c.get_frozen_credentials()
print(json.dumps([f.access_key, f.secret_key, f.token]))
"#;

/// From the output of `aws configure list`: Ok(the access key's last four characters) when the
/// CLI resolved them from the container provider, else Err(what the CLI said).
pub fn aws_configure_list_key(success: bool, stdout: &str, stderr: &str) -> Result<String, String> {
    let said = format!("{stdout}{stderr}");
    if !success {
        return Err(said);
    }
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("access_key"))
        .ok_or_else(|| said.clone())?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields.as_slice() {
        ["access_key", masked, "container-role", ..] => {
            Ok(masked.trim_start_matches('*').to_owned())
        }
        _ => Err(said),
    }
}

/// Runs `cmd` (a `curl` command placed in some cgroup and namespace): GET `url` with the raw
/// token as Authorization and `extra` curl arguments.
pub fn curl(mut cmd: Command, url: &str, token: &str, extra: &[&str]) -> HttpResult {
    let out = cmd
        .args([
            "-sS",
            "-g",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-H",
        ])
        .arg(format!("Authorization: {token}"))
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    parse_curl(out)
}

/// Splits curl's `-w "\n%{http_code}"` trailer off its output.
fn parse_curl(out: Output) -> HttpResult {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    HttpResult {
        status: code.trim().parse().unwrap_or(0),
        body: body.to_owned(),
    }
}

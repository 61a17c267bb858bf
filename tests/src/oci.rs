//! The DaemonSet's container, run by a real OCI runtime (Debian's runc), as a node's container
//! runtime would run it: the bundle is generated from the kustomize-rendered manifest (args,
//! env, capabilities added and dropped, user, read-only root, no privilege escalation, seccomp,
//! the hostPath mounts), with a private cgroup namespace, a private mount namespace, and the
//! node's network namespace (hostNetwork). Pods run as runc containers too, each in a cgroup runc
//! creates at a kubelet-shaped cgroupfs path, in the pod's network namespace.
//!
//! The containers' root filesystem is the host's, read-only, through an overlay whose upper
//! layer (where runc creates mount points) is the test's: nothing is written to the host, and
//! what the container wrote shows in that layer.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::{Value, json};

use crate::node::{Node, sh};

static NEXT: AtomicU32 = AtomicU32::new(1);

/// A runc state directory and a read-only view of the host as containers' root.
pub struct Runc {
    dir: PathBuf,
    state: PathBuf,
    pub rootfs: PathBuf,
    /// The overlay's upper layer: everything written to the root filesystem lands here.
    pub upper: PathBuf,
}

impl Runc {
    pub fn new(name: &str) -> Runc {
        let dir = std::env::temp_dir().join(format!("pia-{}-runc-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (state, rootfs, upper, work) = (
            dir.join("state"),
            dir.join("rootfs"),
            dir.join("upper"),
            dir.join("work"),
        );
        for d in [&state, &rootfs, &upper, &work] {
            fs::create_dir_all(d).unwrap();
        }
        sh(
            "mount",
            &[
                "-t",
                "overlay",
                "overlay",
                "-o",
                &format!(
                    "lowerdir=/,upperdir={},workdir={}",
                    upper.display(),
                    work.display()
                ),
                rootfs.to_str().unwrap(),
            ],
        );
        Runc {
            dir,
            state,
            rootfs,
            upper,
        }
    }

    fn runc(&self) -> Command {
        let mut c = Command::new("runc");
        c.arg("--root").arg(&self.state);
        c
    }

    /// Writes `config` as a bundle and starts it: `runc run` in the foreground, its output in
    /// files of the bundle.
    pub fn start(&self, id_prefix: &str, config: &Value) -> Container {
        let id = format!(
            "{id_prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let bundle = self.dir.join(&id);
        fs::create_dir_all(&bundle).unwrap();
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .unwrap();
        let out = fs::File::create(bundle.join("stdout")).unwrap();
        let err = fs::File::create(bundle.join("stderr")).unwrap();
        let child = self
            .runc()
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("runc (cargo xtask setup installs it)");
        Container {
            id,
            bundle,
            child: Some(child),
            state: self.state.clone(),
        }
    }

    /// Runs `config` to completion: its output.
    pub fn run(&self, id_prefix: &str, config: &Value) -> Output {
        let mut c = self.start(id_prefix, config);
        let status = c.child.take().unwrap().wait().unwrap();
        let output = Output {
            status,
            stdout: fs::read(c.bundle.join("stdout")).unwrap_or_default(),
            stderr: fs::read(c.bundle.join("stderr")).unwrap_or_default(),
        };
        drop(c);
        output
    }

    /// Files and directories written to the root filesystem so far (paths relative to it).
    pub fn written(&self) -> Vec<PathBuf> {
        fn collect(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = e.path();
                out.push(path.strip_prefix(base).unwrap().to_path_buf());
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    collect(base, &path, out);
                }
            }
        }
        let mut out = Vec::new();
        collect(&self.upper, &self.upper, &mut out);
        out
    }
}

impl Drop for Runc {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.rootfs).output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub struct Container {
    pub id: String,
    bundle: PathBuf,
    child: Option<Child>,
    state: PathBuf,
}

impl Container {
    /// What the container wrote to standard error so far (the agent's log).
    pub fn log(&self) -> String {
        fs::read_to_string(self.bundle.join("stderr")).unwrap_or_default()
    }

    /// Sends `signal` (TERM, KILL) to the container's first process.
    pub fn kill(&self, signal: &str) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["kill", &self.id, signal])
            .output();
    }

    /// Waits for the container to exit: its status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().unwrap()
    }

    /// `runc exec` in the running container (same namespaces and cgroup): its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["exec", &self.id])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.kill("KILL");
            let _ = child.wait();
        }
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .output();
        if std::thread::panicking() {
            eprintln!("--- container {} stderr ---\n{}", self.id, self.log());
        }
    }
}

/// The capabilities this process may grant (its bounding set), as `CAP_*` names.
pub fn grantable_capabilities() -> Vec<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    CAPABILITY_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bounding & (1 << i) != 0)
        .map(|(_, n)| format!("CAP_{n}"))
        .collect()
}

/// Linux capabilities in bit order.
const CAPABILITY_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// How the bundle's seccomp filter is chosen.
#[derive(Clone, Debug)]
pub enum Seccomp {
    /// What the manifest's `securityContext.seccompProfile` says (`RuntimeDefault` is containerd's
    /// default profile, as [`containerd_default`] derives it; absent or `Unconfined`: none).
    FromManifest,
    /// A profile in the Docker/containers-common JSON format, evaluated for the container's
    /// capabilities and architecture as the container engines do.
    Profile(Value),
}

/// The container of a rendered DaemonSet and where its hostPaths lead in the test.
pub struct AgentBundle<'a> {
    pub daemonset: &'a Value,
    /// The agent binary (the image's entrypoint).
    pub binary: &'a Path,
    /// hostPath -> the directory the test gives it (the node's cgroup root for `/sys/fs/cgroup`,
    /// the agent's directory in a private bpffs for `/sys/fs/bpf/pod-identity-agent`).
    pub host_paths: BTreeMap<String, PathBuf>,
    /// Values of the ConfigMap the container reads with `envFrom`.
    pub config_map: BTreeMap<String, String>,
    /// `fieldRef` values by field path (`status.hostIP`, `spec.nodeName`), as the kubelet fills
    /// them in.
    pub field_refs: BTreeMap<String, String>,
    /// More environment: what the test's node provides besides the manifest (AWS endpoints).
    pub extra_env: Vec<(String, String)>,
    pub seccomp: Seccomp,
}

/// The OCI config of the DaemonSet's container, in `node`'s network namespace and in `cgroup`
/// (relative to the cgroup2 root). Returns it, and the capabilities the manifest asks for that
/// this machine cannot grant (left out).
pub fn agent_config(
    b: &AgentBundle<'_>,
    runc: &Runc,
    node: &Node,
    cgroup: &str,
) -> (Value, Vec<String>) {
    let pod = &b.daemonset["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    let mut args = vec![b.binary.display().to_string()];
    args.extend(
        c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    let mut env: Vec<String> =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()];
    env.extend(
        crate::manifests::container_env(c, &b.config_map, &b.field_refs, &b.extra_env)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}")),
    );
    let wanted: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| format!("CAP_{}", c.as_str().unwrap()))
        .collect();
    assert_eq!(
        sc["capabilities"]["drop"],
        json!(["ALL"]),
        "the manifest drops every capability it does not add"
    );
    let grantable = grantable_capabilities();
    let (caps, withheld): (Vec<String>, Vec<String>) =
        wanted.into_iter().partition(|c| grantable.contains(c));
    let uid = sc["runAsUser"].as_u64().unwrap_or(0);
    let mut mounts = base_mounts();
    let volumes = pod["volumes"].as_array().unwrap();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let volume = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume {}", m["name"]));
        let host = volume["hostPath"]["path"]
            .as_str()
            .expect("only hostPath volumes");
        let source = b
            .host_paths
            .get(host)
            .unwrap_or_else(|| panic!("the test gives no directory for hostPath {host}"));
        // As the kubelet does for `DirectoryOrCreate`.
        if volume["hostPath"]["type"] == "DirectoryOrCreate" {
            std::fs::create_dir_all(source).expect("create the hostPath directory");
        }
        let mut options = vec!["rbind", "nosuid", "nodev"];
        if m["readOnly"] == true {
            options.push("ro");
        }
        mounts.push(json!({"destination": m["mountPath"], "type": "bind", "source": source, "options": options}));
    }
    let seccomp = match &b.seccomp {
        Seccomp::FromManifest => match sc["seccompProfile"]["type"]
            .as_str()
            .or(pod["securityContext"]["seccompProfile"]["type"].as_str())
        {
            Some("RuntimeDefault") => Some(oci_seccomp(&containerd_default(), &caps)),
            None | Some("Unconfined") => None,
            Some(other) => panic!("seccompProfile {other} is not supported by the test"),
        },
        Seccomp::Profile(p) => Some(oci_seccomp(p, &caps)),
    };
    let mut linux = json!({
        "cgroupsPath": cgroup,
        "namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"},
            {"type": "network", "path": format!("/run/netns/{}", node.netns)},
        ],
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    });
    if let Some(seccomp) = seccomp {
        linux["seccomp"] = seccomp;
    }
    let config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": uid},
            "args": args,
            "env": env,
            "cwd": "/",
            "noNewPrivileges": sc["allowPrivilegeEscalation"] == false,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": caps, "ambient": caps},
        },
        "root": {"path": runc.rootfs, "readonly": sc["readOnlyRootFilesystem"] == true},
        "hostname": node.netns,
        "mounts": mounts,
        "linux": linux,
    });
    (config, withheld)
}

/// A pod's container: `args` in the pod's network namespace and a cgroup at `cgroup` (relative to
/// the cgroup2 root), as an unprivileged pod runs (no capabilities, read-only root).
pub fn pod_config(runc: &Runc, netns: &str, cgroup: &str, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 65534, "gid": 65534},
            "args": args,
            "env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "cwd": "/",
            "noNewPrivileges": true,
            "capabilities": {"bounding": [], "effective": [], "permitted": [], "inheritable": [], "ambient": []},
        },
        "root": {"path": runc.rootfs, "readonly": true},
        "mounts": base_mounts(),
        "linux": {
            "cgroupsPath": cgroup,
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}, {"type": "network", "path": format!("/run/netns/{netns}")}],
        },
    })
}

fn base_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ]
}

/// Debian's containers-common seccomp profile (`/usr/share/containers/seccomp.json`, the
/// default of CRI-O and Podman), fetched by `cargo xtask setup` into target/oci.
pub fn containers_common_profile() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/oci/containers-common-seccomp.json");
    serde_json::from_str(
        &fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} (cargo xtask setup fetches it): {e}", path.display())),
    )
    .unwrap()
}

/// containerd's default profile (what `seccompProfile: RuntimeDefault` gives on EKS nodes), as far
/// as this agent is concerned: containerd's `contrib/seccomp/seccomp_default.go` (v1.6.9 and
/// later, all of 1.7 and 2.x) allows the same base syscalls as the profile above, and
/// additionally `bpf` when the container's bounding set has CAP_BPF and `perf_event_open` when
/// it has CAP_PERFMON; CRI-O's profile gates both on CAP_SYS_ADMIN only, and refuses them with an
/// explicit EPERM rule otherwise (a rule containerd's profile does not have: it would win over the
/// capability rules).
pub fn containerd_default() -> Value {
    let mut profile = containers_common_profile();
    let syscalls = profile["syscalls"].as_array_mut().unwrap();
    for rule in syscalls
        .iter_mut()
        .filter(|r| r["action"] == "SCMP_ACT_ERRNO")
    {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| n != "bpf" && n != "perf_event_open");
        }
    }
    syscalls.retain(|r| r["names"].as_array().is_none_or(|n| !n.is_empty()));
    syscalls.push(json!({"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_BPF"]}, "excludes": {}}));
    syscalls.push(json!({"names": ["perf_event_open"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_PERFMON"]}, "excludes": {}}));
    profile
}

/// A Docker-format profile turned into the OCI `linux.seccomp` a runtime is given: each rule
/// kept when the container's capabilities and this architecture match its `includes` and not
/// its `excludes`, the way the engines build it.
pub fn oci_seccomp(profile: &Value, caps: &[String]) -> Value {
    let arch = "SCMP_ARCH_X86_64";
    let caps_match = |list: &Value| {
        list.as_array().map(|l| {
            l.iter()
                .all(|c| caps.iter().any(|have| have == c.as_str().unwrap_or("")))
        })
    };
    let arches_match = |list: &Value| {
        list.as_array()
            .map(|l| l.iter().any(|a| a == arch || a == "amd64"))
    };
    let mut syscalls = Vec::new();
    for rule in profile["syscalls"].as_array().unwrap() {
        let inc = &rule["includes"];
        let exc = &rule["excludes"];
        if caps_match(&inc["caps"]) == Some(false)
            || arches_match(&inc["arches"]) == Some(false)
            || inc.get("minKernel").is_some_and(|k| !k.is_null())
        {
            continue;
        }
        let excluded_by_caps = exc["caps"].as_array().is_some_and(|l| {
            l.iter()
                .any(|c| caps.iter().any(|have| have == c.as_str().unwrap_or("")))
        });
        if excluded_by_caps || arches_match(&exc["arches"]) == Some(true) {
            continue;
        }
        let mut oci = json!({"names": rule["names"], "action": rule["action"]});
        if let Some(args) = rule.get("args").filter(|a| !a.is_null()) {
            oci["args"] = args.clone();
        }
        if let Some(errno) = rule.get("errnoRet").filter(|e| !e.is_null()) {
            oci["errnoRet"] = errno.clone();
        }
        syscalls.push(oci);
    }
    let mut oci = json!({
        "defaultAction": profile["defaultAction"],
        "architectures": [arch, "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    });
    if let Some(errno) = profile.get("defaultErrnoRet").filter(|e| !e.is_null()) {
        oci["defaultErrnoRet"] = errno.clone();
    }
    oci
}

//! containerd 1.6 with its CRI plugin, private to the test: its root, state, socket and CNI
//! configuration live in a tmpfs (overlayfs, the snapshotter EKS nodes use, cannot take an
//! overlay-backed upper directory, which is what the VM's /tmp and /var are), runc is the
//! runtime with the cgroupfs driver, and pods go on the bridge `pia0` with addresses from
//! 198.18.128.0/24 and 2001:2:0:80::/64.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::env_dir;

/// The bridge's gateway: where a pod's default routes lead.
pub const GATEWAY_V4: &str = "198.18.128.1";
pub const GATEWAY_V6: &str = "2001:2:0:80::1";
/// The images `cargo xtask image` and `xtask`'s node images write (`PIA_IMAGES`): the sandbox
/// (pause) image the CRI plugin starts every pod with, the workload image, and the agent's.
pub const PAUSE_IMAGE: &str = "localhost/pod-identity-pause:1";
pub const WORKLOAD_IMAGE: &str = "localhost/pod-identity-workload:1";
const ARCHIVES: [&str; 3] = [
    "pod-identity-pause",
    "pod-identity-workload",
    "pod-identity-agent",
];

/// The agent's image as `cargo xtask image` names it (the workspace's version).
pub fn agent_image() -> String {
    format!("localhost/pod-identity-agent:{}", env!("CARGO_PKG_VERSION"))
}

pub struct Containerd {
    pub base: PathBuf,
    pub socket: PathBuf,
    child: Child,
}

impl Containerd {
    /// Starts containerd under `base` (a fresh tmpfs) in network namespace `netns` (the node's:
    /// hostNetwork pods share it, the CNI bridge is made in it) and `cgroup` (a system service's,
    /// outside kubepods), and waits until its CRI answers.
    pub fn start(base: &Path, netns: &str, cgroup: &Path) -> anyhow::Result<Containerd> {
        std::fs::create_dir_all(base)?;
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "mode=0700",
                "pia-cri",
                base.to_str().unwrap(),
            ],
        )?;
        for dir in [
            "root",
            "state",
            "runc",
            "cni/net.d",
            "cni/ipam",
            "logs",
            "opt",
        ] {
            std::fs::create_dir_all(base.join(dir))?;
        }
        std::fs::write(base.join("config.toml"), config(base))?;
        std::fs::write(base.join("cni/net.d/10-pia.conflist"), conflist(base))?;
        let bin = env_dir("PIA_CRI_BIN");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(base.join("containerd.log"))?;
        let child = pod_identity_e2e::node::command_in(
            bin.join("containerd").to_str().unwrap(),
            Some(cgroup),
            netns,
        )
        .arg("--config")
        .arg(base.join("config.toml"))
        .env("PATH", path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting containerd")?;
        let containerd = Containerd {
            socket: base.join("containerd.sock"),
            base: base.to_path_buf(),
            child,
        };
        containerd.wait_for_cri()?;
        Ok(containerd)
    }

    fn wait_for_cri(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.socket.exists() && self.ctr(&["version"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!("containerd did not answer within 120 s:\n{}", self.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.base.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` on this containerd, in the CRI plugin's namespace.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(env_dir("PIA_CRI_BIN").join("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!("ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports the node's images, as a node pulls them: the CRI plugin finds them by name.
    pub fn import_images(&self) -> anyhow::Result<()> {
        for stem in ARCHIVES {
            let archive = env_dir("PIA_IMAGES").join(format!("{stem}.oci.tar"));
            self.ctr(&[
                "images",
                "import",
                "--snapshotter",
                "overlayfs",
                archive.to_str().unwrap(),
            ])
            .with_context(|| format!("importing {}", archive.display()))?;
        }
        Ok(())
    }

    /// Gives image `from` a second name, as a registry holding a newer tag would.
    pub fn tag(&self, from: &str, to: &str) -> anyhow::Result<()> {
        self.ctr(&["images", "tag", "--force", from, to]).map(drop)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The shims outlive containerd (the pods' processes die with the node's cgroup tree, and
        // the bridge with its network namespace).
        let shims = format!(
            "containerd-shim-runc-v2 .*-address {}",
            self.socket.display()
        );
        let _ = Command::new("pkill").args(["-KILL", "-f", &shims]).status();
        let _ = Command::new("umount")
            .args(["-R", "-l", self.base.to_str().unwrap()])
            .status();
    }
}

fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// containerd's configuration: everything under `base`, the CRI plugin with runc and cgroupfs.
fn config(base: &Path) -> String {
    let b = base.display();
    let cni = env_dir("PIA_CNI_BIN");
    format!(
        r#"version = 2
root = "{b}/root"
state = "{b}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{b}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{b}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}"
    conf_dir = "{b}/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        Root = "{b}/runc"
        SystemdCgroup = false
"#,
        cni = cni.display()
    )
}

/// The pods' network: a bridge with the node as gateway, no masquerading.
fn conflist(base: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "pia-pods",
        "plugins": [{
            "type": "bridge",
            "bridge": "pia0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [
                    [{"subnet": "198.18.128.0/24", "gateway": GATEWAY_V4}],
                    [{"subnet": "2001:2:0:80::/64", "gateway": GATEWAY_V6}]
                ],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                "dataDir": base.join("cni/ipam"),
            }
        }]
    })
    .to_string()
}

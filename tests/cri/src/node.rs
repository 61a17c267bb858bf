//! A node made the way EKS makes one: containerd (in the node's network namespace and a system
//! cgroup) runs the agent's image from the rendered DaemonSet, and workload pods on the CNI
//! bridge, below the kubelet's `kubepods` cgroup. The AWS side is the suite's fakes: IMDS for the
//! node's credentials and region, EKS Auth checking the cluster's token signatures.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use pod_identity_e2e::{
    FakeAws,
    fake_imds::FakeImds,
    jwt::{self, TokenSpec},
    manifests,
    node::{self, BpfFs, Node},
};

use crate::{
    containerd::Containerd,
    cri::{Cri, Exec},
    pods::{self, FromManifest, PodSpec},
};

/// The agent's probe address in the DaemonSet (`--probe-addr`), on the node.
pub const PROBE: &str = "127.0.0.1:2703";

pub struct RealNode {
    pub cri: Cri,
    pub containerd: Containerd,
    pub fake: FakeAws,
    pub node: Node,
    _imds: FakeImds,
    bpffs: BpfFs,
    /// Tokens and the pods' logs: a directory of the test's own.
    dir: PathBuf,
    next_pod: u32,
}

/// A pod the node runs: its spec, its sandbox and its (current) container.
pub struct RunningPod {
    pub spec: PodSpec,
    pub sandbox: String,
    pub container: String,
    /// The pod's projected token, as the node holds it (workloads only).
    pub token: String,
    attempt: u32,
}

impl RealNode {
    pub fn start() -> RealNode {
        let node = Node::new();
        let fake = FakeAws::start_in(&node.netns);
        let imds = FakeImds::start_in(&node.netns, &fake);
        let dir = std::env::temp_dir().join(format!("pia-cri-{}", std::process::id()));
        fs::create_dir_all(dir.join("tokens")).expect("test directory");
        // The shims' sockets go below /run/containerd whatever the configuration says.
        let base = PathBuf::from(format!("/run/pia-cri-{}", std::process::id()));
        let cgroup = node.host_cgroup("system.slice/containerd.service");
        let containerd = Containerd::start(&base, &node.netns, &cgroup).expect("containerd");
        containerd
            .import_images()
            .expect("importing the node's images");
        let cri = Cri::connect(&containerd.socket).expect("CRI");
        RealNode {
            bpffs: BpfFs::mount("cri"),
            cri,
            containerd,
            fake,
            node,
            _imds: imds,
            dir,
            next_pod: 0,
        }
    }

    /// The kubelet's `kubepods` cgroup, as an absolute cgroup path (the node's cgroup root is
    /// the kubelet's `--cgroup-root`).
    fn kubepods(&self) -> String {
        let rel = self
            .node
            .cgroup_root
            .strip_prefix(node::cgroup2_mount())
            .unwrap();
        format!("/{}/kubepods", rel.display())
    }

    fn pod_spec(
        &mut self,
        namespace: &str,
        name: &str,
        sa: &str,
        host_network: bool,
        qos: &'static str,
    ) -> PodSpec {
        self.next_pod += 1;
        let uid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            self.next_pod
        );
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            service_account: sa.into(),
            host_network,
            qos,
        }
    }

    /// The DaemonSet's pod, from the rendered base manifests, with the agent's image `image`.
    pub fn run_agent(&mut self, image: &str) -> RunningPod {
        // The bridge gives pods both families: a dual-stack cluster's manifest.
        let (ds, mut config_map) = manifests::daemonset("deploy/kubernetes/overlays/dual-stack");
        config_map.insert("CLUSTER_NAME".into(), pod_identity_e2e::CLUSTER.into());
        let field_refs = BTreeMap::from([
            (
                "status.hostIPs".to_owned(),
                format!("{},{}", self.node.ip4, self.node.ip6),
            ),
            ("spec.nodeName".to_owned(), "node-1".to_owned()),
        ]);
        // What the node provides besides the manifest: the EKS APIs' endpoints (as VPC
        // endpoints' DNS would), and the log level the tests read.
        let extra = [
            ("AWS_ENDPOINT_URL_EKS_AUTH".to_owned(), self.fake.endpoint()),
            ("AWS_ENDPOINT_URL_EKS".to_owned(), self.fake.endpoint()),
            (
                "RUST_LOG".to_owned(),
                "info,pod_identity_agent=debug".to_owned(),
            ),
        ];
        let container = ds["spec"]["template"]["spec"]["containers"][0].clone();
        let env = manifests::container_env(&container, &config_map, &field_refs, &extra);
        let host_paths = BTreeMap::from([
            ("/sys/fs/cgroup".to_owned(), self.node.cgroup_root.clone()),
            (
                "/sys/fs/bpf/pod-identity-agent".to_owned(),
                self.bpffs.dir.join("pod-identity-agent"),
            ),
        ]);
        fs::create_dir_all(self.bpffs.dir.join("pod-identity-agent")).expect("bpffs directory");
        let spec = self.pod_spec(
            "kube-system",
            "pod-identity-agent",
            "pod-identity-agent",
            pods::daemonset_host_network(&ds),
            "burstable",
        );
        let sandbox_config = spec.sandbox(&self.kubepods(), &self.dir.join("logs"));
        let sandbox = self
            .cri
            .run_pod(&sandbox_config)
            .expect("RunPodSandbox (agent)");
        let config = pods::daemonset_container(&FromManifest {
            daemonset: &ds,
            image,
            env,
            host_paths: &host_paths,
            attempt: 0,
        });
        let container = self
            .cri
            .start(&sandbox, &sandbox_config, config)
            .expect("the agent's container");
        RunningPod {
            spec,
            sandbox,
            container,
            token: String::new(),
            attempt: 0,
        }
    }

    /// A workload pod whose service account has an association: a sandbox on the bridge (or
    /// the node's network), one container with the webhook's env and the projected token.
    pub fn run_workload(
        &mut self,
        namespace: &str,
        name: &str,
        sa: &str,
        host_network: bool,
    ) -> RunningPod {
        let spec = self.pod_spec(namespace, name, sa, host_network, "besteffort");
        let token = jwt::mint(&TokenSpec {
            namespace: namespace.into(),
            pod_name: name.into(),
            pod_uid: spec.uid.clone(),
            service_account: sa.into(),
            expires_in: 24 * 3600,
        });
        let tokens = self.token_dir(&spec.uid);
        fs::create_dir_all(&tokens).expect("token directory");
        fs::write(tokens.join("eks-pod-identity-token"), &token).expect("token file");
        let sandbox_config = spec.sandbox(&self.kubepods(), &self.dir.join("logs"));
        let sandbox = self
            .cri
            .run_pod(&sandbox_config)
            .expect("RunPodSandbox (workload)");
        let mut pod = RunningPod {
            spec,
            sandbox,
            container: String::new(),
            token,
            attempt: 0,
        };
        pod.container = self.start_workload_container(&pod);
        pod
    }

    fn token_dir(&self, uid: &str) -> PathBuf {
        self.dir.join("tokens").join(uid)
    }

    fn start_workload_container(&mut self, pod: &RunningPod) -> String {
        let sandbox_config = pod.spec.sandbox(&self.kubepods(), &self.dir.join("logs"));
        let config = pods::workload_container(
            "app",
            pod.attempt,
            &self.token_dir(&pod.spec.uid),
            &python_prefix(),
        );
        self.cri
            .start(&pod.sandbox, &sandbox_config, config)
            .expect("the workload's container")
    }

    /// The container exits and the kubelet starts it again: a new container (the next attempt)
    /// in the same sandbox, so in a new cgroup below the same pod cgroup.
    pub fn restart_container(&mut self, pod: &mut RunningPod) {
        self.cri
            .remove_container(&pod.container, Duration::from_secs(1))
            .expect("stopping the container");
        pod.attempt += 1;
        pod.container = self.start_workload_container(pod);
    }

    /// The pod is deleted: the kubelet stops and removes its sandbox through the CRI, then
    /// removes the pod's cgroup, which containerd leaves behind.
    pub fn delete_pod(&mut self, pod: &RunningPod) {
        self.cri
            .remove_pod(&pod.sandbox)
            .expect("removing the sandbox");
        let cgroup = self.pod_cgroup(&pod.spec);
        node::remove_cgroup_tree(&cgroup);
        assert!(
            !cgroup.exists(),
            "pod cgroup {} is still there",
            cgroup.display()
        );
    }

    /// The pod's cgroup directory on the node.
    pub fn pod_cgroup(&self, spec: &PodSpec) -> PathBuf {
        self.node
            .cgroup_root
            .join("kubepods")
            .join(spec.qos)
            .join(format!("pod{}", spec.uid))
    }

    /// Another container in a workload pod, running `script` under `sh`; returns its id.
    pub fn add_container(&mut self, pod: &RunningPod, name: &str, script: &str) -> String {
        let sandbox_config = pod.spec.sandbox(&self.kubepods(), &self.dir.join("logs"));
        let mut config =
            pods::workload_container(name, 0, &self.token_dir(&pod.spec.uid), &python_prefix());
        config.command = vec!["/bin/sh".into(), "-c".into(), script.into()];
        self.cri
            .start(&pod.sandbox, &sandbox_config, config)
            .expect("the added container")
    }

    /// The pod's current container's log as the CRI writes it (`<time> <stream> <tag> <line>`
    /// per line).
    pub fn log(&self, pod: &RunningPod) -> String {
        self.read_log(pod, container_name(pod), pod.attempt)
    }

    /// The log of the pod's container `name` (first attempt).
    pub fn container_log(&self, pod: &RunningPod, name: &str) -> String {
        self.read_log(pod, name, 0)
    }

    fn read_log(&self, pod: &RunningPod, name: &str, attempt: u32) -> String {
        let path = self
            .dir
            .join("logs")
            .join(&pod.spec.uid)
            .join(format!("{name}/{attempt}.log"));
        fs::read_to_string(path).unwrap_or_default()
    }

    /// Waits until the agent's container logged that it serves, and the probe says ready.
    pub fn wait_serving(&mut self, agent: &RunningPod) {
        let deadline = Instant::now() + pod_identity_e2e::patient(Duration::from_secs(60));
        loop {
            let ready = self
                .node
                .http_get(PROBE.parse().unwrap(), "/readyz")
                .is_ok_and(|(s, _)| s == 200);
            if ready && self.log(agent).contains("serving credentials") {
                return;
            }
            let running = self.cri.running(&agent.container).unwrap_or(false);
            assert!(
                running && Instant::now() < deadline,
                "the agent's container did not start serving (running: {running}):\n{}",
                self.log(agent)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `sh -c script` in the pod's container.
    pub fn sh(&mut self, pod: &RunningPod, script: &str) -> Exec {
        self.cri
            .exec(&pod.container, &["/bin/sh", "-c", script])
            .expect("ExecSync")
    }

    /// curl in the pod: GET `url` with `token` as Authorization; (status, body).
    pub fn curl(&mut self, pod: &RunningPod, url: &str, token: &str) -> (u16, String) {
        let script = format!(
            "curl -sS --max-time 20 -w '\\n%{{http_code}}' -H 'Authorization: {token}' '{url}'"
        );
        let out = self.sh(pod, &script);
        let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", &out.stdout));
        (
            code.trim().parse().unwrap_or(0),
            format!("{body}{}", out.stderr),
        )
    }

    /// boto3 in the pod, from the container's env alone (with the credential URI `full_uri`).
    pub fn boto3(&mut self, pod: &RunningPod, full_uri: &str) -> Result<[String; 3], String> {
        let out = self
            .cri
            .exec(
                &pod.container,
                &[
                    "env",
                    &format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={full_uri}"),
                    "python3",
                    "-c",
                    node::BOTO3_CREDENTIALS,
                ],
            )
            .expect("ExecSync");
        if out.code != 0 {
            return Err(out.stderr);
        }
        serde_json::from_str(&out.stdout)
            .map_err(|e| format!("unexpected boto3 output {:?}: {e}", out.stdout))
    }

    /// The AWS CLI in the pod: the last four characters of the access key it resolved from
    /// the container provider.
    pub fn aws_cli(&mut self, pod: &RunningPod, full_uri: &str) -> Result<String, String> {
        let out = self
            .cri
            .exec(
                &pod.container,
                &[
                    "env",
                    &format!("AWS_CONTAINER_CREDENTIALS_FULL_URI={full_uri}"),
                    "python3",
                    "-m",
                    "awscli",
                    "configure",
                    "list",
                ],
            )
            .expect("ExecSync");
        node::aws_configure_list_key(out.code == 0, &out.stdout, &out.stderr)
    }

    /// The agent's per-pod statistics (`/v1/pods` on its probe address).
    pub fn pods(&self) -> Vec<serde_json::Value> {
        let (status, body) = self
            .node
            .http_get(PROBE.parse().unwrap(), "/v1/pods")
            .expect("/v1/pods");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("/v1/pods is JSON")
    }

    /// The agent's metrics, scraped on the node as Prometheus would.
    pub fn metrics(&self) -> String {
        let (status, body) = self
            .node
            .http_get("127.0.0.1:2705".parse().unwrap(), "/metrics")
            .expect("/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }
}

fn container_name(pod: &RunningPod) -> &'static str {
    if pod.spec.name == "pod-identity-agent" {
        "agent"
    } else {
        "app"
    }
}

/// Where the tests' Python (with boto3 and the AWS CLI) is installed: mounted into workloads.
fn python_prefix() -> PathBuf {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .expect("python3");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A value of a metric family without labels, or with exactly `labels`, in a scrape.
pub fn metric(scrape: &str, name_and_labels: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

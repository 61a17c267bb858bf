//! The DaemonSet's container as a real OCI runtime runs it, generated from the
//! kustomize-rendered manifest: its args, env, capabilities, user, read-only root, no privilege
//! escalation, seccomp profile and hostPath mounts, with a private cgroup namespace, a private
//! mount namespace and the node's network namespace. Node credentials and region come from IMDS.
//! Pods are runc containers in kubelet-shaped cgroups. A manifest change that breaks the agent
//! (a capability removed) breaks this test.

use std::{collections::BTreeMap, path::PathBuf, process::Command, time::Duration};

use pod_identity_e2e::{
    CgroupShape, FakeAws, Node, Pod,
    fake_imds::FakeImds,
    node::BpfFs,
    oci::{self, AgentBundle, Container, Runc, Seccomp},
};
use serde_json::Value;

use super::V4_URL;

/// The rendered base DaemonSet and its ConfigMap's values.
fn rendered() -> (Value, BTreeMap<String, String>) {
    pod_identity_e2e::manifests::base_daemonset()
}

/// A node with IMDS, the fake AWS APIs (reached through the standard endpoint variable), a
/// private bpffs, and a runc set-up.
struct ContainerNode {
    node: Node,
    fake: FakeAws,
    _imds: FakeImds,
    bpffs: BpfFs,
    runc: Runc,
}

impl ContainerNode {
    fn new(name: &str) -> ContainerNode {
        let node = Node::new();
        let fake = FakeAws::start_in(&node.netns);
        fake.associate("payments", "api", "payments-api-role");
        let imds = FakeImds::start_in(&node.netns, &fake);
        ContainerNode {
            bpffs: BpfFs::mount(&format!("oci-{name}")),
            runc: Runc::new(name),
            node,
            fake,
            _imds: imds,
        }
    }

    /// The cgroup of a pod's container, as kubelet's cgroupfs driver names it, relative to the
    /// cgroup2 root (runc's cgroupsPath).
    fn cgroup_path(&self, qos: &str, uid: &str, container: &str) -> String {
        let mount = pod_identity_e2e::node::cgroup2_mount();
        let root = self.node.cgroup_root.strip_prefix(&mount).unwrap();
        format!("/{}/kubepods/{qos}/pod{uid}/{container}", root.display())
    }

    /// Starts the agent's container from `ds`, in a pod cgroup of its own.
    fn agent(
        &self,
        ds: &Value,
        config_map: &BTreeMap<String, String>,
        seccomp: Seccomp,
    ) -> (Container, Vec<String>) {
        let binary = pod_identity_e2e::agent::binary();
        let host_paths = BTreeMap::from([
            ("/sys/fs/cgroup".to_owned(), self.node.cgroup_root.clone()),
            // The agent's directory of the node's (here: the test's own) bpffs.
            (
                "/sys/fs/bpf/pod-identity-agent".to_owned(),
                self.bpffs.dir.join("pod-identity-agent"),
            ),
        ]);
        let field_refs = BTreeMap::from([
            ("status.hostIP".to_owned(), self.node.ip4.to_string()),
            ("spec.nodeName".to_owned(), "node-1".to_owned()),
        ]);
        let mut config_map = config_map.clone();
        config_map.insert("CLUSTER_NAME".into(), pod_identity_e2e::CLUSTER.into());
        let bundle = AgentBundle {
            daemonset: ds,
            binary: &binary,
            host_paths,
            config_map,
            field_refs,
            // The node reaches EKS Auth at the fake (the standard variable, as a VPC endpoint's
            // DNS would); credentials and region come from IMDS.
            extra_env: vec![
                ("AWS_ENDPOINT_URL_EKS_AUTH".into(), self.fake.endpoint()),
                ("RUST_LOG".into(), "info,pod_identity_agent=debug".into()),
            ],
            seccomp,
        };
        let uid = format!("{:08x}-0000-4000-8000-00000000a9e7", std::process::id());
        let (config, withheld) = oci::agent_config(
            &bundle,
            &self.runc,
            &self.node,
            &self.cgroup_path("burstable", &uid, "agent"),
        );
        (self.runc.start("pia-agent", &config), withheld)
    }

    /// `curl` from `pod` as a runc container in a new container cgroup of the pod.
    fn curl(&self, pod: &Pod, token: &str) -> (u16, String) {
        let container = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let cgroup = self.cgroup_path("besteffort", &pod.uid, &container);
        let auth = format!("Authorization: {token}");
        let config = oci::pod_config(
            &self.runc,
            &pod.netns,
            &cgroup,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
                "-H",
                &auth,
                V4_URL,
            ],
        );
        let out = self.runc.run("pia-pod", &config);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (
            code.trim().parse().unwrap_or(0),
            format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
        )
    }

    fn wait_ready(&self, agent: &Container) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self
            .node
            .http_get("127.0.0.1:2703".parse().unwrap(), "/readyz")
            .map(|(s, _)| s)
            .ok()
            != Some(200)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent's container never became ready:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn readyz(&self) -> String {
        self.node
            .http_get("127.0.0.1:2703".parse().unwrap(), "/readyz")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

/// A pod: its network namespace (and a kubelet-shaped cgroup, beside which runc makes each
/// container's).
fn pod(node: &Node, namespace: &str, name: &str, sa: &str) -> Pod {
    node.add_pod(namespace, name, sa, CgroupShape::CgroupfsBestEffort)
}

impl Drop for ContainerNode {
    fn drop(&mut self) {
        // On a host with cgroup v1 controllers too, runc made the same paths in each v1
        // hierarchy; the node's own cleanup only knows the cgroup2 tree.
        let name = self.node.cgroup_root.file_name().unwrap().to_owned();
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = hierarchy.path().join(&name);
            if dir.exists() && hierarchy.path() != pod_identity_e2e::node::cgroup2_mount() {
                pod_identity_e2e::node::remove_cgroup_tree(&dir);
            }
        }
    }
}

#[test]
fn the_daemonsets_container_serves_pods_under_runc() {
    let (ds, config_map) = rendered();
    let c = ContainerNode::new("serve");
    let (agent, withheld) = c.agent(&ds, &config_map, Seccomp::FromManifest);
    // This sandbox cannot grant CAP_SYS_RESOURCE (its own bounding set lacks it); it is only
    // needed on kernels before 5.11, where BPF memory counts against RLIMIT_MEMLOCK.
    assert!(
        withheld.iter().all(|c| c == "CAP_SYS_RESOURCE"),
        "only SYS_RESOURCE may be withheld here: {withheld:?}"
    );
    c.wait_ready(&agent);
    assert_eq!(
        c.readyz().trim(),
        "ready",
        "eBPF mode, not a fallback: {}",
        agent.log()
    );

    let api = pod(&c.node, "payments", "api-0", "api");
    let other = pod(&c.node, "payments", "api-1", "api");
    let (status, body) = c.curl(&api, &api.token());
    assert_eq!(status, 200, "{body}\n{}", agent.log());
    assert!(body.contains("\"AccessKeyId\""), "{body}");
    // Signed with IMDS's keys, for IMDS's region: nothing about AWS came from the manifest.
    assert!(
        c.fake
            .calls()
            .iter()
            .all(|call| call.signed_by.starts_with("ASIAIMDSNODE")),
        "{:?}",
        c.fake.calls()
    );
    // A stolen token is refused by the binding.
    let (status, body) = c.curl(&other, &api.token());
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("token belongs to pod payments/api-0"),
        "{body}"
    );

    // The agent's own connects are not redirected: from its container (kubectl exec), the
    // credential address is not the agent.
    // (The node routes the credential address nowhere: a connect that is not redirected fails.)
    let own = agent.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "3",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        V4_URL,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&own.stdout),
        "000",
        "the agent's own cgroup must not be redirected: {}",
        String::from_utf8_lossy(&own.stderr)
    );
    // Metrics and probes answer.
    let (status, metrics) = c
        .node
        .http_get("127.0.0.1:2705".parse().unwrap(), "/metrics")
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("pod_identity_agent_mode{mode=\"ebpf\"} 1"),
        "{metrics}"
    );
    assert_eq!(
        c.node
            .http_get("127.0.0.1:2703".parse().unwrap(), "/healthz")
            .unwrap()
            .0,
        200
    );

    // Nothing was written to the (read-only) root: only the mount points runc made.
    let written: Vec<PathBuf> = c
        .runc
        .written()
        .into_iter()
        .filter(|p| {
            !p.starts_with("host")
                && !p.starts_with("sys")
                && !p.starts_with("dev")
                && !p.starts_with("proc")
        })
        .collect();
    assert!(
        written.is_empty(),
        "the container wrote outside its mounts: {written:?}"
    );
    // The pins went where the manifest said, in the host's bpffs.
    assert!(
        c.bpffs
            .dir
            .join("pod-identity-agent")
            .join(pod_identity_e2e::node::pins_of_this_version())
            .join("links/connect4")
            .exists()
    );
    drop(agent);
    let _ = Command::new(pod_identity_e2e::agent::binary())
        .args(["cleanup", "--pin"])
        .arg(c.bpffs.dir.join("pod-identity-agent"))
        .output();
}

#[test]
fn a_pinned_handover_between_two_containers_keeps_serving() {
    let (ds, config_map) = rendered();
    let c = ContainerNode::new("handover");
    let (mut old, _) = c.agent(&ds, &config_map, Seccomp::FromManifest);
    c.wait_ready(&old);
    let api = pod(&c.node, "payments", "api-0", "api");
    let token = api.token();
    assert_eq!(c.curl(&api, &token).0, 200);
    // The surge: the new container starts beside the old one and takes the pinned programs over.
    let (new, _) = c.agent(&ds, &config_map, Seccomp::FromManifest);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !new.log().contains("serving credentials") {
        assert!(std::time::Instant::now() < deadline, "{}", new.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(new.log().contains("TakenOver"), "{}", new.log());
    old.kill("TERM");
    assert!(
        old.wait().success(),
        "the old agent exits cleanly on SIGTERM:\n{}",
        old.log()
    );
    let (status, body) = c.curl(&api, &token);
    assert_eq!(status, 200, "{body}\n{}", new.log());
    drop(new);
    let _ = Command::new(pod_identity_e2e::agent::binary())
        .args(["cleanup", "--pin"])
        .arg(c.bpffs.dir.join("pod-identity-agent"))
        .output();
}

#[test]
fn under_seccomp_the_runtime_default_lets_the_agent_load_its_programs_and_crio_s_does_not() {
    let (ds, config_map) = rendered();
    assert_eq!(
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault",
        "the manifest asks for the runtime's default profile"
    );
    // containerd's default (what EKS nodes apply): bpf is allowed with CAP_BPF.
    let c = ContainerNode::new("seccomp-containerd");
    let (agent, _) = c.agent(
        &ds,
        &config_map,
        Seccomp::Profile(oci::containerd_default()),
    );
    c.wait_ready(&agent);
    assert_eq!(c.readyz().trim(), "ready", "{}", agent.log());
    let api = pod(&c.node, "payments", "api-0", "api");
    assert_eq!(c.curl(&api, &api.token()).0, 200);
    drop(agent);
    let _ = Command::new(pod_identity_e2e::agent::binary())
        .args(["cleanup", "--pin"])
        .arg(c.bpffs.dir.join("pod-identity-agent"))
        .output();

    // containers-common's (CRI-O, Podman): bpf only with CAP_SYS_ADMIN. The agent says so, and
    // serves in link mode.
    let c = ContainerNode::new("seccomp-crio");
    let (agent, _) = c.agent(
        &ds,
        &config_map,
        Seccomp::Profile(oci::containers_common_profile()),
    );
    c.wait_ready(&agent);
    let ready = c.readyz();
    assert!(
        ready.contains("link mode") && ready.contains("seccomp"),
        "{ready}\n{}",
        agent.log()
    );
}

#[test]
fn a_manifest_without_cap_bpf_cannot_serve_in_ebpf_mode() {
    let (mut ds, config_map) = rendered();
    let add =
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
            .as_array_mut()
            .unwrap();
    add.retain(|c| c != "BPF");
    let c = ContainerNode::new("nobpf");
    let (agent, _) = c.agent(&ds, &config_map, Seccomp::FromManifest);
    c.wait_ready(&agent);
    let ready = c.readyz();
    assert!(
        ready.contains("link mode") && ready.contains("lacks CAP_BPF"),
        "{ready}\n{}",
        agent.log()
    );
}

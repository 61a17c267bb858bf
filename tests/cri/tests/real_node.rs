//! The agent on a real node: its own image, run by containerd's CRI plugin from the rendered
//! DaemonSet under containerd's RuntimeDefault seccomp profile, serving workload pods that
//! containerd and the CNI bridge made, with SDK clients inside CRI containers. Runs inside the
//! kernel matrix's 6.1 VM (`cargo xtask test`; `tests/README.md`).

use std::{
    sync::{Mutex, MutexGuard, OnceLock},
    thread,
    time::Duration,
};

use pod_identity_cri::{
    containerd::agent_image,
    node::{RealNode, RunningPod, metric},
    pods::{FULL_URI_V4, FULL_URI_V6},
};
use pod_identity_e2e::{fake_aws::access_key_for, node::curl};

/// Connects to the credential address, as an SDK makes them.
const V4_URL: &str = "http://169.254.170.23/v1/credentials";

/// The node with the agent's pod serving, and the associations the tests use. One for every
/// test: containerd, its images and the agent take a minute or more to start under QEMU. The
/// tests take turns (`--test-threads 1`; the lock makes sure) and each makes its own pods; the
/// upgrade replaces the agent. The node lives until the process ends, and the VM with it.
struct Shared {
    node: RealNode,
    agent: RunningPod,
}

fn shared() -> MutexGuard<'static, Shared> {
    static SHARED: OnceLock<Mutex<Shared>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let mut node = RealNode::start();
            node.fake.associate("payments", "api", "payments-api-role");
            node.fake.associate("reports", "batch", "reports-role");
            let agent = node.run_agent(&agent_image());
            node.wait_serving(&agent);
            Mutex::new(Shared { node, agent })
        })
        .lock()
        // A failed test leaves the node as it was: the next one carries on with it.
        .unwrap_or_else(|e| e.into_inner())
}

fn access_key(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v["AccessKeyId"].as_str().unwrap_or_default().to_owned()
}

/// The process status lines of the agent, read on the node from its container's cgroup.
fn agent_status(node: &RealNode, agent: &RunningPod) -> String {
    let procs = node
        .pod_cgroup(&agent.spec)
        .join(&agent.container)
        .join("cgroup.procs");
    let pids = std::fs::read_to_string(&procs).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: containerd put the agent elsewhere",
            procs.display()
        )
    });
    let pid = pids
        .lines()
        .next()
        .expect("the agent's container has a process");
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status")
}

#[test]
fn the_agents_image_runs_as_the_daemonsets_pod_and_serves_in_ebpf_mode() {
    let shared = shared();
    let (node, agent) = (&shared.node, &shared.agent);
    let status = agent_status(node, agent);
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    // containerd's own profile (filter mode), no privilege escalation, and exactly the
    // capabilities the manifest adds: BPF, PERFMON, NET_ADMIN, SYS_RESOURCE, NET_BIND_SERVICE.
    assert_eq!(field("Seccomp:"), "2", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("CapEff:"), "000000c001001400", "{status}");
    let (code, info) = node
        .node
        .http_get("127.0.0.1:2703".parse().unwrap(), "/v1/agent")
        .unwrap();
    assert_eq!(code, 200);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["mode"], "ebpf", "{info}");
    assert_eq!(info["cgroup_root"], "/host/cgroup", "{info}");
    // The doctor, as an operator runs it with `kubectl exec`: every check is ok, those of the
    // node (its cgroup root, the kernel programs, the agent, its listeners, the redirect, its
    // metrics) and those of AWS (the node's credentials, EKS Auth, the cluster, the add-on).
    let doctor = node_exec(node, agent, &["/pod-identity-agent", "doctor"]);
    let checks: Vec<&str> = doctor.lines().filter(|l| !l.starts_with(' ')).collect();
    for check in [
        "cgroup root",
        "kernel programs",
        "agent",
        "listeners",
        "redirect",
        "metrics",
        "node credentials",
        "EKS Auth",
        "cluster",
    ] {
        assert!(
            checks
                .iter()
                .any(|l| l.get(6..).is_some_and(|rest| rest.starts_with(check))),
            "the doctor has no {check} check:\n{doctor}"
        );
    }
    assert!(
        checks.iter().all(|l| l.starts_with("ok ")),
        "a check is not ok:\n{doctor}"
    );
}

/// Runs `cmd` in a container whose image has no shell (the agent's), with its own CRI client.
fn node_exec(node: &RealNode, pod: &RunningPod, cmd: &[&str]) -> String {
    let mut cri = pod_identity_cri::cri::Cri::connect(&node.containerd.socket).unwrap();
    let out = cri.exec(&pod.container, cmd).unwrap();
    format!("{}{}", out.stdout, out.stderr)
}

#[test]
fn sdks_in_cri_containers_get_their_own_pods_credentials_and_nothing_else() {
    let mut shared = shared();
    let node = &mut shared.node;
    let api = node.run_workload("payments", "api-7d9f8", "api", false);
    let batch = node.run_workload("reports", "batch-28h4x", "batch", false);
    // Where containerd put the workload: its container's cgroup below the kubelet's pod cgroup.
    assert!(node.pod_cgroup(&api.spec).join(&api.container).is_dir());

    let payments = access_key_for("payments", "api");
    let (code, body) = node.curl(&api, V4_URL, &api.token);
    assert_eq!((code, access_key(&body)), (200, payments.clone()), "{body}");
    let creds = node.boto3(&api, FULL_URI_V4).expect("boto3 over IPv4");
    assert_eq!(creds[0], payments);
    let creds = node.boto3(&api, FULL_URI_V6).expect("boto3 over IPv6");
    assert_eq!(creds[0], payments);
    let last4 = node.aws_cli(&api, FULL_URI_V4).expect("the AWS CLI");
    assert!(
        payments.ends_with(&last4),
        "{last4} is not the end of {payments}"
    );
    let (code, body) = node.curl(&batch, V4_URL, &batch.token);
    assert_eq!(
        (code, access_key(&body)),
        (200, access_key_for("reports", "batch"))
    );

    // A token copied into another pod's container is refused, and so is one used on the host.
    let (code, body) = node.curl(&batch, V4_URL, &api.token);
    assert_eq!(code, 403, "{body}");
    assert!(!body.contains(&payments), "{body}");
    let sshd = node.node.host_cgroup("system.slice/sshd.service");
    let host = curl(
        node.node.command("curl", Some(&sshd)),
        V4_URL,
        &api.token,
        &[],
    );
    assert_eq!(host.status, 403, "{}", host.body);

    // A hostNetwork workload pod: no network namespace of its own, attributed by its cgroup.
    let hostnet = node.run_workload("payments", "api-hostnet", "api", true);
    let (code, body) = node.curl(&hostnet, V4_URL, &hostnet.token);
    assert_eq!((code, access_key(&body)), (200, payments), "{body}");
    let rows = node.pods();
    let row = rows
        .iter()
        .find(|r| r["pod_uid"] == hostnet.spec.uid.as_str())
        .unwrap_or_else(|| panic!("the hostNetwork pod has no row: {rows:?}"));
    assert_eq!(row["pod"], "api-hostnet");
    assert_eq!(row["requests"], 1);
}

#[test]
fn a_restarted_container_is_served_from_the_cache_and_a_deleted_pod_is_forgotten() {
    let mut shared = shared();
    let node = &mut shared.node;
    let mut api = node.run_workload("payments", "api-5c6b7", "api", false);
    let token = api.token.clone();
    assert_eq!(node.curl(&api, V4_URL, &token).0, 200);
    assert_eq!(node.fake.calls_for(&api.spec.uid), 1);
    let first = api.container.clone();

    node.restart_container(&mut api);
    assert_ne!(api.container, first);
    assert!(!node.pod_cgroup(&api.spec).join(&first).exists());
    let (code, body) = node.curl(&api, V4_URL, &token);
    assert_eq!(code, 200, "{body}");
    // The same pod, the same token: the cached credentials, no new EKS Auth call.
    assert_eq!(node.fake.calls_for(&api.spec.uid), 1);
    let rows = node.pods();
    let row = rows
        .iter()
        .find(|r| r["pod_uid"] == api.spec.uid.as_str())
        .expect("the pod's row");
    assert_eq!(
        (row["requests"].as_u64(), row["cache_hits"].as_u64()),
        (Some(2), Some(1))
    );

    let evicted = metric(
        &node.metrics(),
        "pod_identity_agent_cache_evictions_total{reason=\"pod_gone\"}",
    );
    node.delete_pod(&api);
    let deadline = std::time::Instant::now() + pod_identity_e2e::patient(Duration::from_secs(10));
    while node
        .pods()
        .iter()
        .any(|r| r["pod_uid"] == api.spec.uid.as_str())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the deleted pod is still listed"
        );
        thread::sleep(Duration::from_millis(250));
    }
    let now = metric(
        &node.metrics(),
        "pod_identity_agent_cache_evictions_total{reason=\"pod_gone\"}",
    );
    assert_eq!(
        now,
        evicted + 1.0,
        "the deleted pod's credentials were not dropped"
    );
}

#[test]
fn an_upgrade_to_a_newer_image_drops_no_request() {
    let mut shared = shared();
    let Shared { node, agent: old } = &mut *shared;
    let api = node.run_workload("payments", "api-upgrade", "api", false);
    // A second container of the pod asks for credentials every 200 ms for the whole upgrade and
    // logs each status.
    let asker = node.add_container(
        &api,
        "asker",
        "trap 'exit 0' TERM; while :; do \
         curl -s -o /dev/null --max-time 10 -w '%{http_code}\\n' \
         -H \"Authorization: $(cat $AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)\" \
         $AWS_CONTAINER_CREDENTIALS_FULL_URI; sleep 0.2; done",
    );
    let answers = |node: &RealNode| -> Vec<String> {
        node.container_log(&api, "asker")
            .lines()
            .filter_map(|l| l.rsplit(' ').next().map(str::to_owned))
            .collect()
    };
    let wait_for = |node: &RealNode, n: usize| {
        let deadline =
            std::time::Instant::now() + pod_identity_e2e::patient(Duration::from_secs(30));
        while answers(node).len() < n {
            assert!(std::time::Instant::now() < deadline, "{:?}", answers(node));
            thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for(node, 5);

    // The newer image, as the registry would have it; the DaemonSet's surge pod starts beside
    // the old one and takes over the pinned programs.
    let next = format!("{}-next", agent_image());
    node.containerd.tag(&agent_image(), &next).unwrap();
    let new = node.run_agent(&next);
    node.wait_serving(&new);
    let before_stop = answers(node).len();
    node.cri
        .remove_container(&old.container, Duration::from_secs(30))
        .unwrap();
    let old_log = node.log(old);
    node.delete_pod(old);
    // The new agent is the node's from here on, for the tests after this one too.
    *old = new;
    wait_for(node, before_stop + 10);
    let all = answers(node);
    node.cri
        .remove_container(&asker, Duration::from_secs(5))
        .unwrap();
    assert!(
        all.iter().all(|code| code == "200"),
        "a request failed during the upgrade: {all:?}\nold agent:\n{old_log}\nnew agent:\n{}",
        node.log(old)
    );
}

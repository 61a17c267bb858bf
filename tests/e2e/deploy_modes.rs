//! Link mode and the auto fallback, IPv6-only and IPv6-less nodes, the least privilege
//! that works, and restarts with and without pinned programs under load.

use std::time::{Duration, Instant};

use pod_identity_e2e::{
    Agent, CgroupShape, FakeAws, Node,
    agent::{PORT, PROBE_ADDR, binary},
    node::BpfFs,
};

use super::{Setup, V4_URL, V6_URL, assert_credentials, metric};

fn readyz(node: &Node) -> (u16, String) {
    node.http_get(PROBE_ADDR.parse().unwrap(), "/readyz")
        .expect("probe")
}

#[test]
fn link_mode_setup_is_idempotent_across_restarts() {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api-role");
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    pod.route_credential_addresses_via_node();
    for round in 0..2 {
        let mut agent = Agent::start(&node, &fake, &["--mode", "link"]);
        assert_eq!(
            pod.curl(V4_URL, &pod.token()).status,
            200,
            "round {round}:\n{}",
            agent.log()
        );
        assert!(agent.stop().success());
    }
}

/// Runs the agent in a mount namespace where no cgroup2 filesystem is mounted: a cgroup v1 node
/// (Amazon Linux 2's default).
const WITHOUT_CGROUP2: [&str; 7] = [
    "unshare",
    "-m",
    "--propagation",
    "private",
    "sh",
    "-c",
    "for m in $(findmnt -rn -t cgroup2 -o TARGET); do umount -l \"$m\"; done; exec \"$0\" \"$@\"",
];

#[test]
fn a_node_without_cgroup_v2_is_served_in_link_mode_and_says_why() {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api-role");
    let mut strict = Agent::spawn_wrapped(&node, &fake, &["--mode", "ebpf"], &WITHOUT_CGROUP2);
    assert!(!strict.wait_exit(Duration::from_secs(30)).success());
    let log = strict.log();
    assert!(
        log.contains("no cgroup2 filesystem is mounted")
            && log.contains("cgroup v1 nodes, such as Amazon Linux 2"),
        "{log}"
    );
    drop(strict);

    let agent = Agent::start_wrapped(&node, &fake, &["--mode", "auto"], &WITHOUT_CGROUP2);
    let (status, ready) = readyz(&node);
    assert_eq!(status, 200);
    assert!(
        ready.contains("link mode") && ready.contains("no cgroup2 filesystem"),
        "{ready}"
    );
    assert!(
        agent.log().contains("deleted pods are not noticed"),
        "{}",
        agent.log()
    );
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    pod.route_credential_addresses_via_node();
    let r = pod.curl(V4_URL, &pod.token());
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
}

#[test]
fn ipv6_only_node_serves_over_ipv6() {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api-role");
    let [_, listen6] = node.listen_addrs(PORT);
    let agent = Agent::start(
        &node,
        &fake,
        &["--mode", "ebpf", "--listen", &listen6.to_string()],
    );
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let token_file = pod.write_token_file(&pod.token());
    let [key, ..] = pod
        .boto3(V6_URL, &token_file)
        .unwrap_or_else(|e| panic!("boto3 over IPv6: {e}\n{}", agent.log()));
    assert_eq!(
        key,
        pod_identity_e2e::fake_aws::access_key_for("payments", "api")
    );
    // No IPv4 target: IPv4 connects are left alone (and fail here, where nothing listens).
    let out = pod
        .command("curl")
        .args(["-sS", "--max-time", "5", V4_URL])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(agent.log().contains("no IPv4 redirect target"));
}

#[test]
fn a_node_without_ipv6_never_makes_the_agent_fail() {
    let node = Node::without_ipv6();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api-role");
    let [listen4, _] = node.listen_addrs(PORT);
    for mode in ["ebpf", "link"] {
        let mut agent = Agent::start(
            &node,
            &fake,
            &["--mode", mode, "--listen", &listen4.to_string()],
        );
        let pod = node.add_pod(
            "payments",
            &format!("api-{mode}"),
            "api",
            CgroupShape::SystemdBurstable,
        );
        if mode == "link" {
            pod.route_credential_addresses_via_node();
            assert!(
                agent
                    .log()
                    .contains("IPv6 credential address not configured"),
                "{}",
                agent.log()
            );
        }
        assert_eq!(
            pod.curl(V4_URL, &pod.token()).status,
            200,
            "{mode}:\n{}",
            agent.log()
        );
        assert!(agent.stop().success());
    }
}

/// The capabilities the DaemonSet grants (deploy/kubernetes/base/daemonset.yaml), and nothing
/// else, as a non-root user: enough for eBPF mode.
pub const AGENT_CAPABILITIES: &[&str] = &["bpf", "net_admin", "perfmon"];

/// Runs a client loop in each pod for `seconds`: a request every 100 ms, each with the retry
/// policy of botocore's container provider (3 attempts, 2 s timeout, 1 s apart). Returns, per
/// pod, (requests that got credentials, requests that failed after all retries).
fn load(pods: &[pod_identity_e2e::Pod], seconds: f64) -> Vec<std::process::Child> {
    let script = r#"
import sys, time, http.client
token, seconds = sys.argv[1], float(sys.argv[2])
ok = failed = 0
end = time.time() + seconds
while time.time() < end:
    for attempt in range(3):
        try:
            c = http.client.HTTPConnection("169.254.170.23", 80, timeout=2)
            c.request("GET", "/v1/credentials", headers={"Authorization": token})
            if c.getresponse().status == 200:
                ok += 1
                break
        except Exception:
            pass
        if attempt < 2:
            time.sleep(1)
    else:
        failed += 1
    time.sleep(0.1)
print(ok, failed)
"#;
    pods.iter()
        .map(|p| {
            p.command("python3")
                .args(["-c", script, &p.token(), &seconds.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn results(clients: Vec<std::process::Child>) -> (u64, u64) {
    clients.into_iter().fold((0, 0), |(ok, failed), c| {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        (ok + it.next().unwrap(), failed + it.next().unwrap())
    })
}

fn twenty_pods(node: &Node) -> Vec<pod_identity_e2e::Pod> {
    (0..20)
        .map(|i| {
            node.add_pod(
                "payments",
                &format!("api-{i}"),
                "api",
                CgroupShape::SystemdBurstable,
            )
        })
        .collect()
}

#[test]
fn restart_without_pin_under_load_stays_within_the_sdk_retry_budget() {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api-role");
    let pods = twenty_pods(&node);
    let mut agent = Agent::start(&node, &fake, &["--mode", "ebpf"]);
    let clients = load(&pods, 6.0);
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.stop().success());
    let restarted = Instant::now();
    let agent = Agent::start(&node, &fake, &["--mode", "ebpf"]);
    let gap = restarted.elapsed();
    let (ok, failed) = results(clients);
    eprintln!(
        "restart without --pin: gap {gap:?}, {ok} requests served, {failed} failed after retries"
    );
    assert_eq!(
        failed,
        0,
        "every client got credentials within its retry budget (gap {gap:?})\n{}",
        agent.log()
    );
    assert!(ok > 200);
}

#[test]
fn pinned_programs_survive_the_agent_and_are_taken_over_without_a_gap() {
    let bpffs = BpfFs::mount("handover");
    let pin_dir = bpffs.dir.join("pod-identity-agent");
    let pin = pin_dir.to_str().unwrap().to_owned();
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api-role");
    let pods = twenty_pods(&node);
    let mut first = Agent::start(&node, &fake, &["--mode", "ebpf", "--pin", &pin]);
    assert!(
        first.log().contains("attachment: Some(Pinned)")
            || first.log().contains("attachment=Some(Pinned)"),
        "{}",
        first.log()
    );

    // A surge roll: the new agent starts beside the old one, takes over the pinned links, and
    // only then is the old one stopped.
    let clients = load(&pods, 6.0);
    std::thread::sleep(Duration::from_secs(1));
    let mut second = Agent::spawn(&node, &fake, &["--mode", "ebpf", "--pin", &pin]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !second.log().contains("serving credentials") {
        assert!(
            Instant::now() < deadline,
            "second agent never served:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(second.log().contains("TakenOver"), "{}", second.log());
    assert!(first.stop().success());
    let (ok, failed) = results(clients);
    eprintln!("surge handover with --pin: {ok} requests served, {failed} failed after retries");
    assert_eq!(failed, 0);
    assert!(ok > 200);

    // Interception outlives the agent: after the last one stops, connects are still redirected
    // (refused: nobody listens on the agent's port now) until `cleanup` unpins everything.
    assert!(second.stop().success());
    assert_eq!(
        connect_errno(&pods[0]),
        libc::ECONNREFUSED,
        "still redirected to the agent's port"
    );
    assert!(connect4_attached(&node), "pinned programs stay attached");
    let out = std::process::Command::new(binary())
        .args(["cleanup", "--pin", &pin])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        connect_errno(&pods[0]),
        libc::EHOSTUNREACH,
        "after cleanup nothing redirects"
    );
    assert!(
        !connect4_attached(&node),
        "programs still attached after cleanup"
    );
}

/// The errno of a TCP connect to the IPv4 credential address from `pod` (0 on success).
fn connect_errno(pod: &pod_identity_e2e::Pod) -> i32 {
    let script = "import socket; s = socket.socket(); s.settimeout(3); print(s.connect_ex(('169.254.170.23', 80)))";
    let out = pod
        .command("python3")
        .args(["-c", script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Whether the agent's connect4 program is attached at the node's cgroup root.
fn connect4_attached(node: &Node) -> bool {
    pod_identity_e2e::bpf::attached(&node.cgroup_root)
        .iter()
        .any(|a| a.name == "connect4")
}

/// The tests that run on every kernel of the matrix (`cargo xtask matrix`), inside a VM per
/// kernel, as well as on the host: each touches the kernel programs.
mod matrix {
    use super::*;

    #[test]
    fn link_mode_serves_pods_with_token_only_checks() {
        let s = Setup::with_args(&["--mode", "link"]);
        let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        pod.route_credential_addresses_via_node();
        let r = pod.curl(V4_URL, &pod.token());
        assert_eq!(r.status, 200, "{}\n{}", r.body, s.agent.log());
        assert_credentials(&r.body, "payments", "api");
        let r = pod.curl(V6_URL, &pod.token());
        assert_eq!(r.status, 200, "{}", r.body);
        let (status, body) = readyz(&s.node);
        assert_eq!(status, 200);
        assert!(
            body.contains("link mode") && body.contains("token-only"),
            "{body}"
        );
        let m = s.agent.metrics();
        assert_eq!(
            metric(&m, r#"pod_identity_agent_mode{mode="link"}"#),
            1.0,
            "{m}"
        );
        assert!(s.agent.log().contains("callers are not attributed"));
    }

    #[test]
    fn auto_mode_falls_back_to_link_mode_when_attach_is_impossible() {
        let node = Node::new();
        let fake = FakeAws::start_in(&node.netns);
        fake.associate("payments", "api", "payments-api-role");
        let not_a_cgroup = std::env::temp_dir().join(format!("{}-plain-dir", node.netns));
        std::fs::create_dir_all(&not_a_cgroup).unwrap();
        let agent = Agent::start(
            &node,
            &fake,
            &[
                "--mode",
                "auto",
                "--cgroup-root",
                not_a_cgroup.to_str().unwrap(),
            ],
        );
        let _ = std::fs::remove_dir_all(&not_a_cgroup);
        let log = agent.log();
        assert!(
            log.contains("eBPF interception unavailable, falling back to link mode"),
            "{log}"
        );
        assert!(log.contains("attaching"), "the reason is given: {log}");
        assert!(readyz(&node).1.contains("link mode"));
        let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        pod.route_credential_addresses_via_node();
        assert_eq!(pod.curl(V4_URL, &pod.token()).status, 200);
    }

    #[test]
    fn the_listed_capabilities_are_enough_as_non_root() {
        let s = Setup::new();
        drop(s.agent);
        let caps: Vec<String> = AGENT_CAPABILITIES.iter().map(|c| format!("+{c}")).collect();
        let caps = caps.join(",");
        let (inh, amb, bounding) = (
            format!("-all,{caps}"),
            format!("-all,{caps}"),
            format!("-all,{caps}"),
        );
        let wrapper = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps",
            inh.as_str(),
            "--ambient-caps",
            amb.as_str(),
            "--bounding-set",
            bounding.as_str(),
        ];
        let agent = Agent::start_wrapped(&s.node, &s.fake, &["--mode", "ebpf"], &wrapper);
        let pod = s
            .node
            .add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        let r = pod.curl(V4_URL, &pod.token());
        assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
        // And without them it fails with the cause named.
        let mut weak = Agent::spawn_wrapped(
            &s.node,
            &s.fake,
            &[
                "--mode",
                "ebpf",
                "--probe-addr",
                "127.0.0.1:2713",
                "--metrics-addr",
                "127.0.0.1:2715",
            ],
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--bounding-set",
                "-all",
            ],
        );
        let status = weak.wait_exit(Duration::from_secs(30));
        assert!(!status.success());
        assert!(
            weak.log()
                .contains("permission denied: the agent lacks CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"),
            "{}",
            weak.log()
        );
    }
}

//! The IMDS guard (`--imds`): a fake IMDSv2 on the node at 169.254.169.254; pods whose SDK finds
//! no Pod Identity variables fall back to it. In audit mode their connects are counted per pod
//! and let through; in deny mode a pod with its own network namespace is refused at once, while
//! hostNetwork pods and node processes still get through.

use std::{process::Output, time::Duration};

use pod_identity_e2e::{Agent, CgroupShape, FakeAws, Node, Pod, fake_imds::FakeImds};

use super::{V4_URL, metric, wait_for};

const IMDS_V4: &str = "http://169.254.169.254/latest/api/token";
const IMDS_V6: &str = "http://[fd00:ec2::254]/latest/api/token";
const IMDS_V4_MAPPED: &str = "http://[::ffff:169.254.169.254]/latest/api/token";

/// A node with the fake AWS APIs, a fake IMDS, and the agent with `imds` (`--imds ...`).
struct Guarded {
    agent: Agent,
    imds: FakeImds,
    fake: FakeAws,
    node: Node,
}

impl Guarded {
    fn new(imds: &[&str]) -> Guarded {
        let node = Node::new();
        let fake = FakeAws::start_in(&node.netns);
        fake.associate("payments", "api", "payments-api-role");
        let imds_fake = FakeImds::start_in(&node.netns, &fake);
        let agent = Agent::start(&node, &fake, imds);
        Guarded {
            agent,
            imds: imds_fake,
            fake,
            node,
        }
    }

    /// The pod's row in `/v1/pods`, once the agent's upkeep (every 2 s) has counted `n` IMDS
    /// connects for it.
    fn row_with_imds(&self, pod: &Pod, n: u64) -> serde_json::Value {
        let mut row = serde_json::Value::Null;
        wait_for(
            "the pod's IMDS connects in /v1/pods",
            Duration::from_secs(10),
            || {
                row = self
                    .agent
                    .pods_json()
                    .into_iter()
                    .find(|r| r["pod_uid"] == pod.uid.as_str())
                    .unwrap_or_default();
                row["imds_connects"].as_u64().unwrap_or(0) >= n
            },
        );
        row
    }
}

/// The errno of a TCP connect to `host` port 80 by `cmd` (python3 in a pod or on the node); 0
/// when it connected.
fn connect_errno(mut cmd: std::process::Command, host: &str) -> i32 {
    let out = cmd
        .args([
            "-c",
            "import socket, sys\nhost = sys.argv[1]\nfamily = socket.AF_INET6 if ':' in host else socket.AF_INET\ns = socket.socket(family, socket.SOCK_STREAM)\ns.settimeout(5)\ntry:\n    s.connect((host, 80))\n    print(0)\nexcept OSError as e:\n    print(e.errno or -1)\n",
            host,
        ])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(-1)
}

/// An IMDSv2 token request (`PUT`) with curl in `cmd`'s place: its HTTP status, or curl's
/// error.
fn token_request(mut cmd: std::process::Command, url: &str) -> Result<u16, String> {
    let out: Output = cmd
        .args([
            "-sS",
            "-g",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args([
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            url,
        ])
        .output()
        .expect("curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

pub(crate) mod matrix {
    use super::*;

    #[test]
    fn audit_counts_a_pods_imds_connects_and_lets_them_through() {
        let g = Guarded::new(&[]);
        let pod = g.node.add_pod(
            "legacy",
            "batch-0",
            "default",
            CgroupShape::SystemdBurstable,
        );
        assert_eq!(token_request(pod.command("curl"), IMDS_V4), Ok(200));
        let (key, _) = pod.boto3_default_chain();
        assert_eq!(
            key.as_deref(),
            Some(g.imds.access_key().as_str()),
            "the SDK found the node role"
        );
        // The token request, and boto3's (its token PUT and credential GETs share one
        // keep-alive connection: at least one more connect).
        let row = g.row_with_imds(&pod, 2);
        assert_eq!(row["imds_denied"], 0, "{row}");
        assert!(
            row["cgroup"].as_str().unwrap().contains("kubepods"),
            "{row}"
        );
        let metrics = g.agent.metrics();
        assert!(
            metric(
                &metrics,
                r#"pod_identity_agent_imds_connects_total{verdict="allowed"}"#
            ) >= 2.0,
            "{metrics}"
        );
        let log = g.agent.log();
        assert!(
            log.contains(&format!("pod uid {}", pod.uid))
                && log.contains("connected to IMDS")
                && log.contains("it gets the node role's credentials"),
            "{log}"
        );
        let table = g.agent.pods_cli(&["--sort", "imds"]);
        assert!(table.lines().next().unwrap().contains("IMDS"), "{table}");
    }

    #[test]
    fn deny_refuses_pods_at_once_and_never_the_node() {
        let g = Guarded::new(&["--imds", "deny"]);
        let pod = g.node.add_pod(
            "legacy",
            "batch-0",
            "default",
            CgroupShape::CgroupfsBestEffort,
        );
        for (url, host) in [
            (IMDS_V4, "169.254.169.254"),
            (IMDS_V6, "fd00:ec2::254"),
            (IMDS_V4_MAPPED, "::ffff:169.254.169.254"),
        ] {
            // Refused at the connect (curl's error 7), not timed out (28).
            let refused = token_request(pod.command("curl"), url);
            assert!(
                refused
                    .as_ref()
                    .is_err_and(|e| e.contains("(7) Failed to connect")),
                "{url}: {refused:?}"
            );
            assert_eq!(
                connect_errno(pod.command("python3"), host),
                libc::EPERM,
                "{host}"
            );
        }
        // The SDK gives up at once: no timeout, no retry wait. botocore waits 1 s per IMDS
        // attempt (the token, then IMDSv1): a chain that timed out takes 2 s at least, so even
        // under emulation (the patient scale, capped) a refusal is told from a timeout.
        let (key, took) = pod.boto3_default_chain();
        assert_eq!(key, None);
        let limit = pod_identity_e2e::patient(Duration::from_millis(500))
            .min(Duration::from_millis(1500))
            .as_secs_f64();
        assert!(
            took < limit,
            "boto3's chain took {took:.2} s (limit {limit:.2} s)"
        );
        // hostNetwork pods and node processes (the VPC CNI, kube-proxy) still reach IMDS.
        let hostnet = g
            .node
            .add_host_network_pod("kube-system", "aws-node-x", "aws-node");
        assert_eq!(token_request(hostnet.command("curl"), IMDS_V4), Ok(200));
        let daemon = g.node.host_cgroup("system.slice/kubelet.service");
        assert_eq!(
            token_request(g.node.command("curl", Some(&daemon)), IMDS_V4),
            Ok(200)
        );

        let row = g.row_with_imds(&pod, 4);
        assert_eq!(row["imds_denied"], row["imds_connects"], "{row}");
        let hostnet_row = g.row_with_imds(&hostnet, 1);
        assert_eq!(hostnet_row["imds_denied"], 0, "{hostnet_row}");
        let metrics = g.agent.metrics();
        assert!(
            metric(
                &metrics,
                r#"pod_identity_agent_imds_connects_total{verdict="denied"}"#
            ) >= 4.0,
            "{metrics}"
        );
        assert!(
            g.agent.log().contains("refused (--imds deny)"),
            "{}",
            g.agent.log()
        );
    }
}

#[test]
fn deny_leaves_pod_identity_working() {
    let g = Guarded::new(&["--imds", "deny"]);
    let pod = g
        .node
        .add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let token_file = pod.write_token_file(&pod.token());
    let [key, ..] = pod
        .boto3(V4_URL, &token_file)
        .unwrap_or_else(|e| panic!("boto3: {e}\n{}", g.agent.log()));
    assert_eq!(
        key,
        pod_identity_e2e::fake_aws::access_key_for("payments", "api")
    );
    assert!(token_request(pod.command("curl"), IMDS_V4).is_err());
    assert_eq!(g.fake.calls_for(&pod.uid), 1);
}

#[test]
fn off_leaves_imds_alone() {
    let g = Guarded::new(&["--imds", "off"]);
    let pod = g.node.add_pod(
        "legacy",
        "batch-0",
        "default",
        CgroupShape::SystemdBurstable,
    );
    assert_eq!(token_request(pod.command("curl"), IMDS_V4), Ok(200));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        g.agent
            .pods_json()
            .iter()
            .all(|r| r["imds_connects"].as_u64().unwrap_or(0) == 0),
        "{:?}",
        g.agent.pods_json()
    );
}

#[test]
fn link_mode_cannot_guard_imds_and_says_so() {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    let mut refused = Agent::spawn(&node, &fake, &["--mode", "link", "--imds", "deny"]);
    let status = refused.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    assert!(
        refused.log().contains("--imds deny needs eBPF mode"),
        "{}",
        refused.log()
    );
    drop(refused);
    let link = Agent::start(&node, &fake, &["--mode", "link"]);
    let (_, readyz) = node
        .http_get(
            pod_identity_e2e::agent::PROBE_ADDR.parse().unwrap(),
            "/readyz",
        )
        .unwrap();
    assert!(readyz.contains("the IMDS guard is off"), "{readyz}");
    assert!(
        link.log().contains("the IMDS guard is off"),
        "{}",
        link.log()
    );
}

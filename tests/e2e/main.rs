//! End-to-end: the real agent binary with its kernel programs attached to a simulated node's
//! cgroup, simulated pods, real clients (curl, boto3), and the fake EKS Auth API.

mod admission;
mod attacks;
mod cache;
mod container;
mod deploy_manifests;
mod deploy_modes;
mod hostile;
mod imds_guard;
mod monitoring;
mod neighbours;
mod node_credentials;
mod operator;
mod operator_tools;
mod sdk_clients;
mod sts;

use std::time::{Duration, Instant};

use pod_identity_e2e::{
    ACCOUNT, Agent, CgroupShape, FakeAws, Node, Pod,
    fake_aws::{Fault, access_key_for},
    jwt,
};

pub(crate) const V4_URL: &str = "http://169.254.170.23/v1/credentials";
pub(crate) const V6_URL: &str = "http://[fd00:ec2::23]/v1/credentials";
const V4_MAPPED_URL: &str = "http://[::ffff:169.254.170.23]/v1/credentials";

/// Polls `ok` every 200 ms until it holds, failing the test after `timeout`.
pub(crate) fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let timeout = pod_identity_e2e::patient(timeout);
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A node with the fake EKS Auth and a running agent; pods are added per test.
struct Setup {
    agent: Agent,
    fake: FakeAws,
    node: Node,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_args(&[])
    }

    /// A setup whose agent gets `args` on top of the harness's own.
    fn with_args(args: &[&str]) -> Setup {
        let node = Node::new();
        let fake = FakeAws::start_in(&node.netns);
        fake.associate("payments", "api", "payments-api-role");
        fake.associate("search", "indexer", "search-indexer-role");
        let agent = Agent::start(&node, &fake, args);
        Setup { agent, fake, node }
    }

    fn pod(&self, namespace: &str, name: &str, sa: &str, shape: CgroupShape) -> Pod {
        self.node.add_pod(namespace, name, sa, shape)
    }
}

/// The value of one series in a Prometheus text exposition (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().expect("metric value"))
        .unwrap_or(0.0)
}

fn assert_credentials(body: &str, namespace: &str, sa: &str) {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(v["AccessKeyId"], access_key_for(namespace, sa), "{body}");
    assert!(
        v["SecretAccessKey"]
            .as_str()
            .is_some_and(|s| s.starts_with("fakeSecret")),
        "{body}"
    );
    assert!(
        v["Token"]
            .as_str()
            .is_some_and(|s| s.starts_with("fakeSession")),
        "{body}"
    );
    assert_eq!(v["AccountId"], ACCOUNT);
    let exp = v["Expiration"].as_str().expect("Expiration");
    assert!(
        exp.ends_with('Z') && exp.len() == 20,
        "Expiration {exp:?} must be RFC 3339 UTC with Z"
    );
}

#[test]
fn boto3_resolves_credentials_over_ipv6_link_local() {
    let s = Setup::new();
    let pod = s.pod(
        "search",
        "indexer-0",
        "indexer",
        CgroupShape::SystemdGuaranteed,
    );
    let token_file = pod.write_token_file(&pod.token());
    let [key, ..] = pod
        .boto3(V6_URL, &token_file)
        .unwrap_or_else(|e| panic!("boto3: {e}\n{}", s.agent.log()));
    assert_eq!(key, access_key_for("search", "indexer"));
    let redirected = s.agent.metrics();
    assert!(
        redirected
            .contains(r#"pod_identity_agent_kernel_redirected_connects_total{family="ipv6"} 1"#),
        "{redirected}"
    );
}

#[test]
fn malformed_and_expired_tokens_get_400() {
    let s = Setup::new();
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let empty = pod.curl(V4_URL, "");
    assert_eq!(empty.status, 400, "{}", empty.body);
    assert!(empty.body.contains("cannot be empty"), "{}", empty.body);
    let garbage = pod.curl(V4_URL, "not-a-jwt");
    assert_eq!(garbage.status, 400, "{}", garbage.body);
    let mut spec = pod.token_spec();
    spec.expires_in = -60;
    let expired = pod.curl(V4_URL, &jwt::mint(&spec));
    assert_eq!(expired.status, 400, "{}", expired.body);
    assert!(expired.body.contains("expired"), "{}", expired.body);
    assert!(s.fake.calls().is_empty());
    // A redirected request that names another host (DNS rebinding, a proxy) is refused.
    let r = pod_identity_e2e::node::curl(
        pod.command("curl"),
        V4_URL,
        &pod.token(),
        &["-H", "Host: attacker.example"],
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("not a credential address"), "{}", r.body);
    // Other paths and methods.
    let out = pod
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://169.254.170.23/latest",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
    let out = pod
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            V4_URL,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "405");
}

#[test]
fn upstream_errors_pass_through_with_their_status() {
    let s = Setup::new();
    let unassociated = s.pod(
        "payments",
        "batch-0",
        "batch",
        CgroupShape::SystemdBurstable,
    );
    let r = unassociated.curl(V4_URL, &unassociated.token());
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.body.contains("(ResourceNotFoundException)") && r.body.ends_with("fault: client"),
        "{}",
        r.body
    );
    assert!(r.body.starts_with("[fake-"), "request id first: {}", r.body);

    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    s.fake.set_fault(Some(Fault {
        status: 403,
        code: "AccessDeniedException".into(),
    }));
    let r = pod.curl(V4_URL, &pod.token());
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("(AccessDeniedException)"), "{}", r.body);
    s.fake.set_fault(None);
    let r = pod.curl(V4_URL, &pod.token());
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The tests that run on every kernel of the matrix (`cargo xtask matrix`), inside a VM per
/// kernel, as well as on the host: each touches the kernel programs.
mod matrix {
    use super::*;

    #[test]
    fn curl_in_pod_gets_its_credentials() {
        let s = Setup::new();
        let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        let token = pod.token();
        for url in [V4_URL, V6_URL] {
            let r = pod.curl(url, &token);
            assert_eq!(r.status, 200, "{url}: {}\n{}", r.body, s.agent.log());
            assert_credentials(&r.body, "payments", "api");
        }
        let calls = s.fake.calls();
        assert_eq!(calls.len(), 1, "the second request is a cache hit");
        assert_eq!(calls[0].pod_uid, pod.uid);
        assert_eq!(calls[0].cluster, pod_identity_e2e::CLUSTER);
        let m = s.agent.metrics();
        for family in ["ipv4", "ipv6"] {
            assert_eq!(
                metric(
                    &m,
                    &format!(
                        "pod_identity_agent_kernel_redirected_connects_total{{family=\"{family}\"}}"
                    )
                ),
                1.0,
                "{m}"
            );
        }
    }

    #[test]
    fn boto3_resolves_credentials_over_ipv4_link_local() {
        let s = Setup::new();
        let pod = s.pod("payments", "api-0", "api", CgroupShape::CgroupfsBestEffort);
        let token_file = pod.write_token_file(&pod.token());
        let [key, secret, session] = pod
            .boto3(V4_URL, &token_file)
            .unwrap_or_else(|e| panic!("boto3: {e}\n{}", s.agent.log()));
        assert_eq!(key, access_key_for("payments", "api"));
        assert!(secret.starts_with("fakeSecret") && session.starts_with("fakeSession"));
    }

    #[test]
    fn v4_mapped_address_on_a_dual_stack_socket_is_redirected() {
        let s = Setup::new();
        let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        let r = pod.curl(V4_MAPPED_URL, &pod.token());
        assert_eq!(r.status, 200, "{}", r.body);
        assert_credentials(&r.body, "payments", "api");
    }

    #[test]
    fn host_network_pod_gets_credentials() {
        let s = Setup::new();
        let pod = s
            .node
            .add_host_network_pod("payments", "node-exporter-x", "api");
        let r = pod.curl(V4_URL, &pod.token());
        assert_eq!(r.status, 200, "{}\n{}", r.body, s.agent.log());
        assert_credentials(&r.body, "payments", "api");
    }

    #[test]
    fn every_cgroup_shape_is_attributed_to_its_pod() {
        let s = Setup::new();
        let shapes = [
            CgroupShape::SystemdBurstable,
            CgroupShape::SystemdGuaranteed,
            CgroupShape::CgroupfsBestEffort,
        ];
        for (i, shape) in shapes.into_iter().enumerate() {
            let pod = s.pod("payments", &format!("api-{i}"), "api", shape);
            let r = pod.curl(V4_URL, &pod.token());
            assert_eq!(r.status, 200, "{shape:?}: {}\n{}", r.body, s.agent.log());
            // A process in a cgroup nested below the container's is still that pod.
            let nested = pod.cgroup.join("workers/w-1");
            std::fs::create_dir_all(&nested).unwrap();
            let cmd = pod_identity_e2e::node::command_in("curl", Some(&nested), &pod.netns);
            let r = pod_identity_e2e::node::curl(cmd, V4_URL, &pod.token(), &[]);
            assert_eq!(r.status, 200, "{shape:?}, nested: {}", r.body);
            // And another pod's token is refused from either.
            let other = s.pod("payments", &format!("other-{i}"), "api", shape);
            assert_eq!(pod.curl(V4_URL, &other.token()).status, 403, "{shape:?}");
        }
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&s.agent.pods_cli(&["--json"])).unwrap();
        for i in 0..3 {
            let row = rows
                .iter()
                .find(|r| r["pod"] == format!("api-{i}"))
                .unwrap_or_else(|| panic!("api-{i} not attributed: {rows:?}"));
            assert_eq!(row["requests"], 3, "{row}");
        }
    }

    #[test]
    fn token_of_another_pod_is_refused() {
        let s = Setup::new();
        let a = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        let b = s.pod("payments", "api-1", "api", CgroupShape::SystemdBurstable);
        let r = b.curl(V4_URL, &a.token());
        assert_eq!(r.status, 403, "{}", r.body);
        assert!(
            r.body.contains("token belongs to pod payments/api-0"),
            "{}",
            r.body
        );
        assert!(r.body.contains(&b.uid), "{}", r.body);
        assert!(
            s.fake.calls().is_empty(),
            "a refused token must not reach EKS Auth"
        );
    }

    #[test]
    fn process_outside_any_pod_is_refused() {
        let s = Setup::new();
        let a = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        let daemon = s.node.host_cgroup("system.slice/node-daemon.service");
        let r = pod_identity_e2e::node::curl(
            s.node.command("curl", Some(&daemon)),
            V4_URL,
            &a.token(),
            &[],
        );
        assert_eq!(r.status, 403, "{}", r.body);
        assert!(r.body.contains("belongs to no pod"), "{}", r.body);
    }

    #[test]
    fn direct_connection_to_the_listener_is_refused() {
        use std::io::{Read as _, Write as _};
        let s = Setup::new();
        let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        // Nothing listens on the address the agent serves: only redirected connects are handed
        // to the agent, so a direct one finds no one.
        let [listen4, _] = s.node.listen_addrs(pod_identity_e2e::agent::PORT);
        let r = pod.curl(&format!("http://{listen4}/v1/credentials"), &pod.token());
        assert_eq!(r.status, 0, "refused, not answered: {}", r.body);
        // The agent's own socket, dialled by a process on the node: closed before a byte is read.
        let info = s.node.http_get(
            pod_identity_e2e::agent::PROBE_ADDR.parse().unwrap(),
            "/v1/agent",
        );
        let info: serde_json::Value = serde_json::from_str(&info.unwrap().1).unwrap();
        let private: std::net::SocketAddr = info["listen"][0].as_str().unwrap().parse().unwrap();
        assert!(private.ip().is_loopback(), "{info}");
        let token = pod.token();
        let answer = pod_identity_e2e::node::in_netns(&s.node.netns, move || {
            let mut stream = std::net::TcpStream::connect(private).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let _ = write!(
                stream,
                "GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\nAuthorization: {token}\r\n\r\n"
            );
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            answer
        });
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        let m = s.agent.metrics();
        assert_eq!(
            metric(
                &m,
                r#"pod_identity_agent_rejected_connections_total{reason="not_redirected"}"#
            ),
            1.0,
            "{m}"
        );
        assert!(
            s.agent.log().contains("closed a connection at accept"),
            "{}",
            s.agent.log()
        );
        assert!(s.fake.calls().is_empty());
    }

    #[test]
    fn agents_own_cgroup_is_not_redirected() {
        let s = Setup::new();
        let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        // Something really listening on the credential address inside the pod's namespace: a
        // connect that is not redirected reaches it.
        pod_identity_e2e::node::sh(
            "ip",
            &[
                "-n",
                &pod.netns,
                "addr",
                "add",
                "169.254.170.23/32",
                "dev",
                "lo",
            ],
        );
        let body = std::env::temp_dir().join(format!("{}-direct", s.node.netns));
        std::fs::write(&body, "direct").unwrap();
        let server_bin = pod_identity_e2e::agent::binary().with_file_name("baseline-server");
        let mut server = pod
            .command(server_bin.to_str().unwrap())
            .args(["--listen", "169.254.170.23:80", "--body-file"])
            .arg(&body)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let from_agent_cgroup = || {
            let out =
                pod_identity_e2e::node::command_in("curl", Some(&s.node.agent_cgroup), &pod.netns)
                    .args([
                        "-sS",
                        "--max-time",
                        "5",
                        "http://169.254.170.23/v1/credentials",
                    ])
                    .output()
                    .unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = from_agent_cgroup();
        while seen != "direct" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            seen = from_agent_cgroup();
        }
        assert_eq!(
            seen, "direct",
            "a connect from the agent's cgroup must not be redirected"
        );
        // The same address from the pod's cgroup goes to the agent.
        let r = pod.curl(V4_URL, &pod.token());
        assert_eq!(r.status, 200, "{}", r.body);
        assert_credentials(&r.body, "payments", "api");
        let _ = server.kill();
        let _ = server.wait();
        let _ = std::fs::remove_file(&body);
    }

    #[test]
    fn sigterm_exits_zero_and_leaves_nothing_attached() {
        let mut s = Setup::new();
        let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        assert_eq!(pod.curl(V4_URL, &pod.token()).status, 200);
        let status = s.agent.stop();
        assert!(
            status.success(),
            "agent exit status {status}; log:\n{}",
            s.agent.log()
        );
        // Nothing redirects any more: the connect goes where it was addressed, and the node has no
        // route there, so curl fails to connect (exit 7) instead of reaching an agent.
        let out = pod
            .command("curl")
            .args(["-sS", "--max-time", "5", V4_URL])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(7),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let left = pod_identity_e2e::bpf::attached(&s.node.cgroup_root);
        assert!(left.is_empty(), "still attached: {left:?}");
    }

    #[test]
    fn attach_failure_is_a_clear_error() {
        let node = Node::new();
        let fake = FakeAws::start_in(&node.netns);
        let not_a_cgroup = std::env::temp_dir().join(format!("{}-not-a-cgroup", node.netns));
        std::fs::create_dir_all(&not_a_cgroup).unwrap();
        let mut agent = Agent::spawn(
            &node,
            &fake,
            &[
                "--mode",
                "ebpf",
                "--cgroup-root",
                not_a_cgroup.to_str().unwrap(),
            ],
        );
        let status = agent.wait_exit(Duration::from_secs(30));
        let log = agent.log();
        let _ = std::fs::remove_dir_all(&not_a_cgroup);
        assert!(!status.success(), "agent must fail; log:\n{log}");
        assert!(log.contains("cannot intercept pods' connections"), "{log}");
        assert!(
            log.contains("attaching") && log.contains("not-a-cgroup"),
            "{log}"
        );
    }
}

//! A real node is never empty. Another tool's cgroup program (a stand-in for Cilium's
//! socket load balancer: connects to a service address go to a backend) sits at the same cgroup
//! root as the agent. Both redirects work whichever attached first, through agent restarts with
//! and without `--pin`, and the neighbour outlives the agent. A legacy exclusive attachment is
//! never displaced: eBPF mode fails naming it, auto mode falls back to link mode saying why.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpListener},
    time::Duration,
};

use pod_identity_e2e::{
    Agent, CgroupShape, FakeAws, Node, Pod,
    bpf::{Attach, BPF_CGROUP_INET4_CONNECT, NEIGHBOUR_NAME, Neighbour, attached},
    node::{BpfFs, in_netns},
};

use super::V4_URL;

/// The service address the neighbour load-balances.
const SERVICE: &str = "198.19.0.1:80";
const BACKEND_PORT: u16 = 8080;

/// A backend in the node's network namespace that answers every request with `backend`.
fn start_backend(node: &Node) -> SocketAddrV4 {
    let addr = SocketAddrV4::new(node.ip4, BACKEND_PORT);
    let listener = in_netns(&node.netns, move || {
        TcpListener::bind(addr).expect("bind backend")
    });
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nbackend",
            );
        }
    });
    addr
}

/// What a pod gets from the service address: the backend's answer, or curl's failure.
fn service(pod: &Pod) -> String {
    let out = pod
        .command("curl")
        .args(["-sS", "--max-time", "3", &format!("http://{SERVICE}/")])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn both_redirects_work(pod: &Pod, agent: &Agent) {
    let r = pod.curl(V4_URL, &pod.token());
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    assert_eq!(service(pod), "backend");
}

fn neighbour_attached(node: &Node) -> bool {
    attached(&node.cgroup_root)
        .iter()
        .any(|a| a.name == NEIGHBOUR_NAME && a.attach_type == BPF_CGROUP_INET4_CONNECT)
}

fn node_with_pod() -> (Node, FakeAws, Pod, SocketAddrV4) {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api-role");
    let backend = start_backend(&node);
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    (node, fake, pod, backend)
}

/// The neighbour attached `how`, beside the agent in either order, through restarts with and
/// without `--pin`; it stays attached and working after the agent is gone.
fn coexists(how: Attach) {
    for neighbour_first in [true, false] {
        let (node, fake, pod, backend) = node_with_pod();
        let attach = || {
            Neighbour::attach(&node.cgroup_root, how, SERVICE.parse().unwrap(), backend)
                .expect("attach the neighbour")
        };
        let (neighbour, mut agent) = if neighbour_first {
            let n = attach();
            (n, Agent::start(&node, &fake, &["--mode", "ebpf"]))
        } else {
            let a = Agent::start(&node, &fake, &["--mode", "ebpf"]);
            (attach(), a)
        };
        assert_eq!(neighbour.how(), how);
        both_redirects_work(&pod, &agent);

        // A restart without --pin: the neighbour keeps redirecting while the agent is down.
        assert!(agent.stop().success());
        assert_eq!(
            service(&pod),
            "backend",
            "the neighbour works while the agent is down"
        );
        let agent = Agent::start(&node, &fake, &["--mode", "ebpf"]);
        both_redirects_work(&pod, &agent);
        drop(agent);

        // Restarts with --pin: the pinned links are taken over; the neighbour is untouched.
        let bpffs = BpfFs::mount(&format!("nbr-{}", node.index));
        let pin = bpffs.dir.join("agent");
        let pin = pin.to_str().unwrap();
        let mut first = Agent::start(&node, &fake, &["--mode", "ebpf", "--pin", pin]);
        both_redirects_work(&pod, &first);
        assert!(first.stop().success());
        assert_eq!(service(&pod), "backend");
        let mut second = Agent::start(&node, &fake, &["--mode", "ebpf", "--pin", pin]);
        assert!(second.log().contains("TakenOver"), "{}", second.log());
        both_redirects_work(&pod, &second);
        assert!(second.stop().success());
        let cleanup = node
            .command(pod_identity_e2e::agent::binary().to_str().unwrap(), None)
            .args(["cleanup", "--pin", pin])
            .output()
            .unwrap();
        assert!(
            cleanup.status.success(),
            "{}",
            String::from_utf8_lossy(&cleanup.stderr)
        );

        // The agent is gone; the neighbour is still attached and still works.
        assert!(
            neighbour_attached(&node),
            "{:?}",
            attached(&node.cgroup_root)
        );
        assert_eq!(service(&pod), "backend");
        assert!(
            attached(&node.cgroup_root)
                .iter()
                .all(|a| a.name == NEIGHBOUR_NAME),
            "only the neighbour is left: {:?}",
            attached(&node.cgroup_root)
        );
    }
}

/// The tests that run on every kernel of the matrix (`cargo xtask matrix`), inside a VM per
/// kernel, as well as on the host: each touches the kernel programs.
mod matrix {
    use super::*;

    #[test]
    fn a_neighbour_attached_as_a_link_and_the_agent_both_redirect() {
        coexists(Attach::Link);
    }

    #[test]
    fn a_neighbour_attached_with_allow_multi_and_the_agent_both_redirect() {
        coexists(Attach::Multi);
    }

    #[test]
    fn an_exclusive_neighbour_is_never_displaced_and_is_named() {
        let (node, fake, pod, backend) = node_with_pod();
        let _neighbour = Neighbour::attach(
            &node.cgroup_root,
            Attach::Exclusive,
            SERVICE.parse().unwrap(),
            backend,
        )
        .expect("attach exclusively");
        assert_eq!(service(&pod), "backend");

        // eBPF mode refuses to start, and says which program is in the way (not "needs CAP_BPF").
        let mut agent = Agent::spawn(&node, &fake, &["--mode", "ebpf"]);
        assert!(!agent.wait_exit(Duration::from_secs(30)).success());
        let log = agent.log();
        assert!(
            log.contains(&format!("program '{NEIGHBOUR_NAME}'"))
                && log.contains("is attached to this cgroup exclusively"),
            "{log}"
        );
        assert!(
            log.contains("does not displace it") && log.contains("BPF_F_ALLOW_MULTI"),
            "{log}"
        );
        assert!(
            !log.contains("lacks CAP_")
                && !log.contains("needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or"),
            "capabilities are not the problem: {log}"
        );
        drop(agent);
        assert!(
            attached(&node.cgroup_root)
                .iter()
                .all(|a| a.name == NEIGHBOUR_NAME),
            "nothing of the agent's left attached: {:?}",
            attached(&node.cgroup_root)
        );

        // auto falls back to link mode and says why; pods are served the link-mode way.
        let agent = Agent::start(&node, &fake, &["--mode", "auto"]);
        let log = agent.log();
        assert!(
            log.contains("falling back to link mode") && log.contains(NEIGHBOUR_NAME),
            "{log}"
        );
        let (_, ready) = node
            .http_get(
                pod_identity_e2e::agent::PROBE_ADDR.parse().unwrap(),
                "/readyz",
            )
            .unwrap();
        assert!(
            ready.contains("link mode") && ready.contains(NEIGHBOUR_NAME),
            "{ready}"
        );
        pod.route_credential_addresses_via_node();
        let r = pod.curl(V4_URL, &pod.token());
        assert_eq!(r.status, 200, "{}\n{log}", r.body);

        // The neighbour is still the one attached, and still works, with the agent running and after.
        assert!(neighbour_attached(&node));
        assert_eq!(service(&pod), "backend");
        drop(agent);
        assert!(neighbour_attached(&node));
        assert_eq!(service(&pod), "backend");
    }
}

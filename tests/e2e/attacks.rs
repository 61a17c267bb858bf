//! Attacks on the agent, made for real against the real binary: slow request heads on the
//! operator ports, connection floods from pods, from node processes and from other network
//! namespaces, a squatter on the served port while a pinned agent is down, pins of another
//! layout, floods of forged tokens, and forged names. Each test measures what the pods see
//! (status codes, latency) and what the agent holds (resident memory, connections), and prints
//! one `ATTACK` line with the figures.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use pod_identity_e2e::{
    Agent, BpfFs, CgroupShape, Pod, bpf, jwt,
    node::{in_netns, pins_of_this_version},
};

use super::{Setup, V4_URL, assert_credentials, metric, wait_for};

/// The agent's resident set now, in MiB.
fn resident_mib(pid: u32) -> f64 {
    status_kib(pid, "VmRSS:") / 1024.0
}

/// The agent's peak resident set since [`reset_peak`], in MiB.
fn peak_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:") / 1024.0
}

fn status_kib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a kB figure")
}

/// Restarts the peak resident set's count (`VmHWM`) from the current resident set.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak RSS");
}

/// `n` connections from `netns` to `addr`, each sent `head` (a request head never finished).
/// Connections the far end refuses are counted, not kept.
fn open_many(
    netns: &str,
    addr: SocketAddr,
    n: usize,
    head: &'static [u8],
) -> (Vec<TcpStream>, usize) {
    in_netns(netns, move || {
        let mut open = Vec::with_capacity(n);
        let mut refused = 0;
        for _ in 0..n {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(mut s) => {
                    let _ = s.write_all(head);
                    open.push(s);
                }
                Err(_) => refused += 1,
            }
        }
        (open, refused)
    })
}

/// How many of `streams` the far end has closed by `deadline` (read gives end of file or an
/// error; anything it sends first is read and dropped).
fn closed_by(streams: &mut [TcpStream], deadline: Instant) -> usize {
    let mut closed = vec![false; streams.len()];
    for s in streams.iter() {
        s.set_nonblocking(true).unwrap();
    }
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && closed.iter().any(|c| !c) {
        for (s, done) in streams
            .iter_mut()
            .zip(closed.iter_mut())
            .filter(|(_, d)| !**d)
        {
            match s.read(&mut buf) {
                Ok(0) => *done = true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *done = true,
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    closed.iter().filter(|c| **c).count()
}

/// A GET from `netns`, timed.
fn timed_get(netns: &str, addr: SocketAddr, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let status = pod_identity_e2e::node::http_get(netns, addr, path).map_or(0, |(s, _)| s);
    (status, started.elapsed())
}

/// Requests from `pod` with its own token, each timed: (statuses, slowest).
fn pod_requests(pod: &Pod, n: usize) -> (Vec<u16>, Duration) {
    let token = pod.token();
    let mut slowest = Duration::ZERO;
    let statuses = (0..n)
        .map(|_| {
            let started = Instant::now();
            let status = pod.curl(V4_URL, &token).status;
            slowest = slowest.max(started.elapsed());
            status
        })
        .collect();
    (statuses, slowest)
}

#[test]
fn slow_heads_on_the_probe_and_metrics_ports_are_closed_and_hold_nothing() {
    const PER_PORT: usize = 300;
    const SLOW: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: agent\r\nX-Slow: ";
    let s = Setup::with_args(&["--metrics-addr", "0.0.0.0:2705"]);
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let pid = s.agent.pid();
    let before = resident_mib(pid);
    reset_peak(pid);
    let probe: SocketAddr = pod_identity_e2e::agent::PROBE_ADDR.parse().unwrap();
    let metrics = SocketAddr::new(s.node.ip4.into(), 2705);
    let started = Instant::now();
    // The probe port from a process on the node, the metrics port from a pod.
    let (mut held, _) = open_many(&s.node.netns, probe, PER_PORT, SLOW);
    let (from_pod, _) = open_many(&pod.netns, metrics, PER_PORT, SLOW);
    held.extend(from_pod);
    let opened = held.len();
    let mut slowest = Duration::ZERO;
    for _ in 0..6 {
        let (ready, took) = timed_get(&s.node.netns, probe, "/readyz");
        assert_eq!(ready, 200, "/readyz during the attack");
        let (scrape, took_m) = timed_get(&pod.netns, metrics, "/metrics");
        assert_eq!(scrape, 200, "/metrics during the attack");
        slowest = slowest.max(took).max(took_m);
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every connection that never finished its head is gone within the header timeout.
    let closed = closed_by(&mut held, started + Duration::from_secs(9));
    let peak = peak_mib(pid);
    eprintln!(
        "ATTACK slow heads: {opened} connections on the probe and metrics ports; {closed} closed within {:.1} s; probes' slowest answer {} ms; resident {before:.1} MiB before, peak {peak:.1} MiB",
        started.elapsed().as_secs_f64(),
        slowest.as_millis()
    );
    assert_eq!(opened, 2 * PER_PORT);
    assert_eq!(
        closed, opened,
        "every slow connection closed within the header timeout"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "probes stay prompt: {slowest:?}"
    );
    assert!(
        peak - before < 24.0,
        "bounded: {before:.1} -> {peak:.1} MiB"
    );
    assert_eq!(pod.curl(V4_URL, &pod.token()).status, 200);
}

#[test]
fn connections_that_were_not_redirected_are_closed_and_starve_no_pod() {
    const FLOOD: usize = 200;
    let s = Setup::with_args(&["--max-connections", "64"]);
    let pods: Vec<Pod> = (0..3)
        .map(|i| {
            s.pod(
                "payments",
                &format!("api-{i}"),
                "api",
                CgroupShape::SystemdBurstable,
            )
        })
        .collect();
    let attacker = s.pod(
        "search",
        "indexer-0",
        "indexer",
        CgroupShape::SystemdBurstable,
    );
    let pid = s.agent.pid();
    reset_peak(pid);
    let before = resident_mib(pid);
    // Another namespace dials the address the agent serves, directly: nothing listens there.
    let [served, _] = s.node.listen_addrs(pod_identity_e2e::agent::PORT);
    let (held, refused) = open_many(&attacker.netns, served, FLOOD, b"GET / HTTP/1.1\r\n");
    assert_eq!(
        (held.len(), refused),
        (0, FLOOD),
        "the served address has no listener"
    );
    // A node process dials the agent's own socket: closed at accept, before a byte is read.
    let info = s.node.http_get(
        pod_identity_e2e::agent::PROBE_ADDR.parse().unwrap(),
        "/v1/agent",
    );
    let info: serde_json::Value = serde_json::from_str(&info.unwrap().1).unwrap();
    let private: SocketAddr = info["listen"][0].as_str().unwrap().parse().unwrap();
    let started = Instant::now();
    let (mut held, _) = open_many(
        &s.node.netns,
        private,
        FLOOD,
        b"GET /v1/credentials HTTP/1.1\r\n",
    );
    let (statuses, slowest) = pod_requests(&pods[0], 20);
    let others: Vec<u16> = pods[1..]
        .iter()
        .flat_map(|p| pod_requests(p, 10).0)
        .collect();
    let closed = closed_by(&mut held, Instant::now() + Duration::from_secs(3));
    let m = s.agent.metrics();
    let rejected = metric(
        &m,
        r#"pod_identity_agent_rejected_connections_total{reason="not_redirected"}"#,
    );
    eprintln!(
        "ATTACK unredirected: {FLOOD} direct connects refused by the kernel, {FLOOD} to the agent's socket closed at accept ({closed} seen closed in {} ms); pods: {} of {} answered 200, slowest {} ms; resident {before:.1} MiB, peak {:.1} MiB",
        started.elapsed().as_millis(),
        statuses
            .iter()
            .chain(&others)
            .filter(|s| **s == 200)
            .count(),
        statuses.len() + others.len(),
        slowest.as_millis(),
        peak_mib(pid)
    );
    assert!(
        statuses.iter().chain(&others).all(|s| *s == 200),
        "{statuses:?} {others:?}"
    );
    assert_eq!(closed, FLOOD);
    assert_eq!(rejected, FLOOD as f64, "{m}");
    assert_eq!(
        metric(&m, "pod_identity_agent_open_connections"),
        0.0,
        "{m}"
    );
    // Logged once for the source, not once per connection.
    let lines = s
        .agent
        .log()
        .matches("closed a connection at accept")
        .count();
    assert_eq!(lines, 1, "{}", s.agent.log());
}

/// Opens `n` connections to the credential address from inside `pod` (its cgroup and network
/// namespace, so the kernel redirects and attributes them), sends each an unfinished request
/// head, and reports after `hold` how many connected and how many the agent has closed.
const HOLD_HEADS: &str = r#"
import select, socket, sys, time
n, hold = int(sys.argv[1]), float(sys.argv[2])
conns, failed = [], 0
for _ in range(n):
    try:
        s = socket.create_connection(("169.254.170.23", 80), timeout=2)
        s.sendall(b"GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\n")
        conns.append(s)
    except OSError:
        failed += 1
print("ready", flush=True)
by_fd = {c.fileno(): c for c in conns}
poller = select.poll()
for fd in by_fd:
    poller.register(fd, select.POLLIN)
closed, deadline = set(), time.time() + hold
while time.time() < deadline and len(closed) < len(conns):
    for fd, _ in poller.poll(200):
        try:
            gone = not by_fd[fd].recv(4096)
        except OSError:
            gone = True
        if gone:
            closed.add(fd)
            poller.unregister(fd)
print(len(conns), failed, len(conns) - len(closed), flush=True)
"#;

/// Starts [`HOLD_HEADS`] in `pod`; returns it once every connection was made.
fn hold_heads(pod: &Pod, n: usize, hold: Duration) -> std::process::Child {
    let mut child = pod
        .command("python3")
        .args([
            "-c",
            HOLD_HEADS,
            &n.to_string(),
            &hold.as_secs_f64().to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the attacker");
    let mut ready = [0u8; 6];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .expect("the attacker connects");
    child
}

/// (connected, failed to connect, still open at the end) from [`HOLD_HEADS`].
fn held(child: std::process::Child) -> (usize, usize, usize) {
    let out = child.wait_with_output().expect("the attacker ends");
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<usize> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(
        numbers.len(),
        3,
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (numbers[0], numbers[1], numbers[2])
}

/// Thousands of request heads that never finish, from pods, in both modes: each caller holds at
/// most its share, the rest are closed at accept, memory stays flat, and others are served.
fn unfinished_heads(mode: &str) {
    const PER_ATTACKER: usize = 2000;
    const SHARE: usize = 32;
    let share = SHARE.to_string();
    let s = Setup::with_args(&["--mode", mode, "--max-connections-per-pod", &share]);
    let attackers: Vec<Pod> = (0..2)
        .map(|i| {
            s.pod(
                "search",
                &format!("indexer-{i}"),
                "indexer",
                CgroupShape::SystemdBurstable,
            )
        })
        .collect();
    let victim = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    for pod in attackers.iter().chain([&victim]) {
        if mode == "link" {
            pod.route_credential_addresses_via_node();
        }
    }
    let pid = s.agent.pid();
    let before = resident_mib(pid);
    reset_peak(pid);
    // Held for less than the header timeout: what stays open is what the agent let in.
    let hold = Duration::from_secs(3);
    let running: Vec<_> = attackers
        .iter()
        .map(|a| hold_heads(a, PER_ATTACKER, hold))
        .collect();
    let (statuses, slowest) = pod_requests(&victim, 20);
    let results: Vec<(usize, usize, usize)> = running.into_iter().map(held).collect();
    let connected: usize = results.iter().map(|r| r.0).sum();
    let still_open: usize = results.iter().map(|r| r.2).sum();
    let m = s.agent.metrics();
    let peak = peak_mib(pid);
    eprintln!(
        "ATTACK unfinished heads ({mode} mode): {connected} connections from 2 pods, {still_open} still open after {} s (share {SHARE} each), {} closed at accept; victim: {} of 20 answered 200, slowest {} ms; resident {before:.1} MiB, peak {peak:.1} MiB",
        hold.as_secs(),
        metric(
            &m,
            r#"pod_identity_agent_rejected_connections_total{reason="pod_limit"}"#
        ),
        statuses.iter().filter(|s| **s == 200).count(),
        slowest.as_millis()
    );
    assert_eq!(connected, 2 * PER_ATTACKER, "{results:?}");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        still_open <= 2 * SHARE,
        "each attacker holds its share at most: {results:?}"
    );
    assert!(
        metric(
            &m,
            r#"pod_identity_agent_rejected_connections_total{reason="pod_limit"}"#
        ) >= (2 * (PER_ATTACKER - SHARE)) as f64,
        "{m}"
    );
    assert!(
        peak - before < 24.0,
        "bounded: {before:.1} -> {peak:.1} MiB"
    );
}

#[test]
fn unfinished_heads_from_pods_hold_a_bounded_share_in_ebpf_mode() {
    unfinished_heads("ebpf");
}

#[test]
fn unfinished_heads_from_pods_hold_a_bounded_share_per_peer_in_link_mode() {
    unfinished_heads("link");
}

/// A listener that stands in for an unprivileged squatter: it binds `addr` as `nobody` in
/// `netns` and appends whatever it receives to `received`.
fn squatter(netns: &str, addr: SocketAddr, received: &std::path::Path) -> std::process::Child {
    std::fs::write(received, "").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(received, std::fs::Permissions::from_mode(0o666)).unwrap();
    let script = format!(
        "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('{}', {}))\ns.listen(64)\nprint('listening', flush=True)\nwhile True:\n    c, _ = s.accept()\n    c.settimeout(2)\n    try:\n        data = c.recv(65536)\n    except Exception:\n        data = b''\n    open('{}', 'ab').write(data)\n    c.close()\n",
        addr.ip(),
        addr.port(),
        received.display()
    );
    let mut child = pod_identity_e2e::node::command_in("setpriv", None, netns)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the squatter");
    let mut line = [0u8; 9];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .expect("the squatter listens");
    child
}

/// `pod-identity-agent cleanup --pin DIR`.
fn cleanup(pin: &std::path::Path) {
    let _ = std::process::Command::new(pod_identity_e2e::agent::binary())
        .args(["cleanup", "--pin"])
        .arg(pin)
        .output();
}

/// Sends every token of the file `argv[1]` (one per line) to the credential address from the
/// calling pod, over one kept-alive connection at a time, and prints the status counts.
const SEND_TOKENS: &str = r#"
import http.client, json, sys
counts = {}
conn = None
for token in open(sys.argv[1]).read().split():
    for attempt in range(2):
        try:
            if conn is None:
                conn = http.client.HTTPConnection("169.254.170.23", 80, timeout=10)
            conn.request("GET", "/v1/credentials", headers={"Authorization": token})
            r = conn.getresponse()
            r.read()
            counts[r.status] = counts.get(r.status, 0) + 1
            break
        except (OSError, http.client.HTTPException):
            conn = None
print(json.dumps(counts))
"#;

/// Starts [`SEND_TOKENS`] in `pod` with `tokens`.
fn send_tokens(pod: &Pod, tokens: &[String]) -> std::process::Child {
    let file = std::env::temp_dir().join(format!("{}-tokens", pod.netns));
    std::fs::write(&file, tokens.join("\n")).unwrap();
    pod.command("python3")
        .args(["-c", SEND_TOKENS, file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the sender")
}

/// The spec of a pod that does not exist: a random UID.
fn stranger(i: usize) -> jwt::TokenSpec {
    let mut uid = [0u8; 16];
    aws_lc_rs::rand::fill(&mut uid).unwrap();
    let hex: String = uid.iter().map(|b| format!("{b:02x}")).collect();
    jwt::TokenSpec {
        namespace: "default".into(),
        pod_name: format!("stranger-{i}"),
        pod_uid: format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        ),
        service_account: "default".into(),
        expires_in: 3600,
    }
}

#[test]
fn thousands_of_forged_tokens_cost_the_real_pods_nothing() {
    const FORGED: usize = 3000;
    let s = Setup::with_args(&["--mode", "link"]);
    let real = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let attacker = s.pod(
        "search",
        "indexer-0",
        "indexer",
        CgroupShape::SystemdBurstable,
    );
    for pod in [&real, &attacker] {
        pod.route_credential_addresses_via_node();
    }
    let token = real.token();
    assert_eq!(real.curl(V4_URL, &token).status, 200);
    let pid = s.agent.pid();
    let before = resident_mib(pid);
    reset_peak(pid);
    // Random pods, and every tenth naming the real pod (its UID, namespace, account).
    let tokens: Vec<String> = (0..FORGED)
        .map(|i| {
            if i % 10 == 0 {
                jwt::forge(&real.token_spec())
            } else {
                jwt::forge(&stranger(i))
            }
        })
        .collect();
    let started = Instant::now();
    let flood = send_tokens(&attacker, &tokens);
    // Meanwhile a new pod arrives and is served.
    let newcomer = s.pod("payments", "api-1", "api", CgroupShape::SystemdBurstable);
    newcomer.route_credential_addresses_via_node();
    let first = Instant::now();
    let r = newcomer.curl(V4_URL, &newcomer.token());
    let newcomer_served_in = first.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    let out = flood.wait_with_output().unwrap();
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout).expect("counts");
    let took = started.elapsed();
    // The real pod's entry survived: served from the cache, no new call for it.
    let r = real.curl(V4_URL, &token);
    assert_eq!(r.status, 200, "{}", r.body);
    let forged_calls = s.fake.calls().iter().filter(|c| c.status == 400).count();
    let rows = s.agent.pods_json();
    let peak = peak_mib(pid);
    eprintln!(
        "ATTACK forged tokens (link mode): {FORGED} in {:.1} s from one peer, answered {counts}; {forged_calls} reached EKS Auth (refused there); the newcomer served in {} ms; calls naming the real pod: {} (the first its own); /v1/pods rows: {}; resident {before:.1} MiB, peak {peak:.1} MiB",
        took.as_secs_f64(),
        newcomer_served_in.as_millis(),
        s.fake.calls_for(&real.uid),
        rows.len()
    );
    assert!(!counts.as_object().unwrap().contains_key("200"), "{counts}");
    let real_served = s
        .fake
        .calls()
        .iter()
        .filter(|c| c.pod_uid == real.uid && c.status == 200)
        .count();
    assert_eq!(
        real_served, 1,
        "the real pod's credentials were fetched once, and kept"
    );
    // The peer's budget of new tokens: its burst, then one per 5 s.
    assert!(
        forged_calls <= 5 + (took.as_secs() as usize) / 5 + 1,
        "{forged_calls}"
    );
    assert!(newcomer_served_in < Duration::from_secs(3));
    assert_eq!(
        rows.len(),
        2,
        "only pods the source accepted have rows: {rows:?}"
    );
    assert!(
        peak - before < 24.0,
        "bounded: {before:.1} -> {peak:.1} MiB"
    );
}

/// The cluster issuer's keys in a file, for `--jwks-file`.
fn cluster_jwks(tag: &str) -> String {
    let path = std::env::temp_dir().join(format!("pia-{}-{tag}-jwks.json", std::process::id()));
    std::fs::write(&path, jwt::cluster_issuer().jwks().to_string()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn with_the_clusters_keys_forged_tokens_never_reach_eks_auth() {
    let jwks = cluster_jwks("forged");
    let s = Setup::with_args(&["--jwks-file", &jwks, "--token-issuer", jwt::CLUSTER_ISSUER]);
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let forged: Vec<u16> = (0..50)
        .map(|_| pod.curl(V4_URL, &jwt::forge(&pod.token_spec())).status)
        .collect();
    assert!(forged.iter().all(|s| *s == 400), "{forged:?}");
    assert!(s.fake.calls().is_empty(), "{:?}", s.fake.calls());
    let r = pod.curl(V4_URL, &pod.token());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.fake.calls().len(), 1);
    eprintln!(
        "ATTACK forged tokens with the cluster's keys: 50 refused locally (400), 0 EKS Auth calls; the pod's own token: 200 with 1 call"
    );
}

/// A pod whose token kubelet rotated during an EKS Auth outage: link mode, where nothing but
/// the token's signature says whose it is.
fn rotation_during_an_outage(with_keys: bool) -> (u16, String) {
    let jwks = cluster_jwks(if with_keys { "rotation" } else { "unused" });
    let args: Vec<&str> = if with_keys {
        vec!["--mode", "link", "--jwks-file", &jwks]
    } else {
        vec!["--mode", "link"]
    };
    let s = Setup::with_args(&args);
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    pod.route_credential_addresses_via_node();
    assert_eq!(pod.curl(V4_URL, &pod.token()).status, 200);
    s.fake.set_fault(Some(pod_identity_e2e::fake_aws::Fault {
        status: 503,
        code: "ServiceUnavailableException".into(),
    }));
    let r = pod.curl(V4_URL, &pod.token());
    let m = s.agent.metrics();
    assert!(s.fake.calls().iter().filter(|c| c.status == 200).count() == 1);
    if r.status == 200 {
        assert_credentials(&r.body, "payments", "api");
        assert_eq!(
            metric(
                &m,
                r#"pod_identity_agent_cache_lookups_total{result="stale"}"#
            ),
            1.0,
            "{m}"
        );
    }
    (r.status, r.body)
}

#[test]
fn with_the_clusters_keys_a_rotated_token_rides_out_an_eks_auth_outage() {
    let (status, body) = rotation_during_an_outage(true);
    assert_eq!(status, 200, "the pod keeps its cached credentials: {body}");
    // Without the keys nothing proves the new token is the pod's: it gets the outage's answer.
    let (status, body) = rotation_during_an_outage(false);
    assert_eq!(status, 503, "{body}");
}

/// Runs in a pod while the agent is stopped: connection A sends its request and waits; B is
/// reset at once (SO_LINGER 0), which closes its socket. After `argv[1]` seconds it prints what
/// A received.
const BEHIND_A_STOPPED_AGENT: &str = r#"
import socket, struct, sys, time
a = socket.create_connection(("169.254.170.23", 80), timeout=60)
a.sendall(b"GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\nAuthorization: " + sys.argv[2].encode() + b"\r\n\r\n")
b = socket.create_connection(("169.254.170.23", 80), timeout=5)
b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
b.close()
print("sent", flush=True)
a.settimeout(float(sys.argv[1]))
try:
    print(repr(a.recv(4096)[:12]), flush=True)
except OSError as e:
    print("error", e, flush=True)
"#;

#[test]
fn connects_from_ever_new_cgroups_do_not_hold_up_other_pods() {
    const CGROUPS: usize = 100;
    let s = Setup::new();
    let attacker = s.pod(
        "search",
        "indexer-0",
        "indexer",
        CgroupShape::CgroupfsBestEffort,
    );
    let victim = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let token = attacker.token();
    // Each connect from a cgroup the agent has not seen: each needs a walk of the tree.
    let started = Instant::now();
    let curls: Vec<std::process::Child> = (0..CGROUPS)
        .map(|i| {
            let dir = attacker.cgroup.join(format!("fresh-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            pod_identity_e2e::node::command_in("curl", Some(&dir), &attacker.netns)
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "20",
                    "-H",
                ])
                .arg(format!("Authorization: {token}"))
                .arg(V4_URL)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let (statuses, slowest) = pod_requests(&victim, 20);
    let attacker_statuses: Vec<String> = curls
        .into_iter()
        .map(|c| String::from_utf8_lossy(&c.wait_with_output().unwrap().stdout).into_owned())
        .collect();
    eprintln!(
        "ATTACK fresh cgroups: {CGROUPS} connects from new cgroups in {} ms, all attributed ({} answered 200); victim: {} of 20 answered 200, slowest {} ms",
        started.elapsed().as_millis(),
        attacker_statuses.iter().filter(|s| *s == "200").count(),
        statuses.iter().filter(|s| **s == 200).count(),
        slowest.as_millis()
    );
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        attacker_statuses.iter().all(|s| s == "200"),
        "{attacker_statuses:?}"
    );
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
}

#[test]
fn a_forged_tokens_names_reach_no_label_row_or_table() {
    let s = Setup::with_args(&["--metrics-per-pod"]);
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    // The pod's own UID (the kernel checks that much), names of someone else's.
    let mut spec = pod.token_spec();
    spec.namespace = "kube-system".into();
    spec.pod_name = "coredns-impostor".into();
    spec.service_account = "coredns".into();
    assert_eq!(pod.curl(V4_URL, &jwt::forge(&spec)).status, 400);
    let seen = format!(
        "{:?}\n{}\n{}",
        s.agent.pods_json(),
        s.agent.metrics(),
        s.agent.pods_cli(&[])
    );
    assert!(
        !seen.contains("kube-system") && !seen.contains("coredns"),
        "{seen}"
    );
    assert_eq!(pod.curl(V4_URL, &pod.token()).status, 200);
    let rows = s.agent.pods_json();
    assert_eq!(
        (rows[0]["namespace"].as_str(), rows[0]["pod"].as_str()),
        (Some("payments"), Some("api-0"))
    );
    assert!(
        s.agent
            .metrics()
            .contains(r#"namespace="payments",pod="api-0""#)
    );
    // Rows from anywhere (an older agent, a file) reach the operator's terminal escaped.
    let crafted = serde_json::json!([{
        "pod_uid": pod.uid,
        "namespace": "payments\u{1b}]0;owned\u{7}",
        "pod": "api-0\u{1b}[2J",
        "service_account": "api",
        "last_error": {"status": 404, "code": "ResourceNotFoundException", "age_seconds": 1.0}
    }]);
    let file = std::env::temp_dir().join(format!("{}-crafted.json", s.node.netns));
    std::fs::write(&file, crafted.to_string()).unwrap();
    let out = pod_identity_e2e::agent::cli(
        &s.node,
        None,
        &s.fake,
        pod_identity_e2e::agent::Caller::Operator,
        &["associations", "--pods", file.to_str().unwrap()],
    );
    assert!(out.stdout.contains("api-0"), "{}", out.stdout);
    assert!(
        out.stdout.lines().all(|l| !l.chars().any(char::is_control)),
        "no control character reaches the terminal: {:?}",
        out.stdout
    );
    eprintln!(
        "ATTACK forged names: a forged token's namespace and names reach no /v1/pods row, metric label or table; escape sequences in a pods file print escaped"
    );
}

/// The tests that run on every kernel of the matrix (`cargo xtask matrix`), inside a VM per
/// kernel, as well as on the host: each touches the kernel programs.
mod matrix {
    use super::*;

    #[test]
    fn a_squatter_on_the_served_port_gets_no_token_while_a_pinned_agent_is_down() {
        let bpffs = BpfFs::mount("squat");
        let pin = bpffs.dir.join("pod-identity-agent");
        let pin_arg = pin.to_str().unwrap().to_owned();
        let mut s = Setup::with_args(&["--pin", &pin_arg]);
        let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        assert_eq!(pod.curl(V4_URL, &pod.token()).status, 200);
        // The agent dies (an OOM kill); its pinned programs keep redirecting pods.
        // SAFETY: kill(2) on the agent's pid, which this test owns.
        unsafe { libc::kill(s.agent.pid() as i32, libc::SIGKILL) };
        s.agent.wait_exit(Duration::from_secs(10));
        let [served, _] = s.node.listen_addrs(pod_identity_e2e::agent::PORT);
        let received = std::env::temp_dir().join(format!("{}-squatter", s.node.netns));
        let mut squat = squatter(&s.node.netns, served, &received);
        // The pod's credential request, with its token: refused at once, never handed over.
        let token = pod.token();
        let started = Instant::now();
        let r = pod.curl(V4_URL, &token);
        let refused_in = started.elapsed();
        assert_eq!(r.status, 0, "{}", r.body);
        // The squatter does listen: a connection that was not redirected reaches it. Asked
        // again until heard: a direct connection whose client port is that of the refused
        // redirected one (whose record the kernel keeps until the LRU drops it) is refused too.
        wait_for(
            "the squatter hears the direct request",
            Duration::from_secs(10),
            || {
                let _ = pod_identity_e2e::node::http_get(&s.node.netns, served, "/direct");
                std::fs::read_to_string(&received)
                    .unwrap_or_default()
                    .contains("/direct")
            },
        );
        // A new agent, the squatter still in place: it serves the pod.
        s.agent = Agent::start(&s.node, &s.fake, &["--pin", &pin_arg]);
        let r = pod.curl(V4_URL, &pod.token());
        assert_eq!(r.status, 200, "{}\n{}", r.body, s.agent.log());
        assert_credentials(&r.body, "payments", "api");
        let m = s.agent.metrics();
        let heard = std::fs::read_to_string(&received).unwrap();
        eprintln!(
            "ATTACK squatter: the pod's request while the agent was down refused in {} ms; the squatter received {} bytes, none of a token; after restart: 200; no_agent refusals counted: {}",
            refused_in.as_millis(),
            heard.len(),
            metric(
                &m,
                r#"pod_identity_agent_kernel_steered_connections_total{result="no_agent"}"#
            )
        );
        assert!(
            !heard.contains("Authorization") && !heard.contains(&token),
            "{heard}"
        );
        assert!(heard.contains("/direct"));
        assert!(
            metric(
                &m,
                r#"pod_identity_agent_kernel_steered_connections_total{result="no_agent"}"#
            ) >= 1.0,
            "{m}"
        );
        let _ = squat.kill();
        let _ = squat.wait();
        drop(s);
        cleanup(&pin);
    }

    #[test]
    fn pins_of_another_layout_are_named_and_detached_never_reused() {
        let bpffs = BpfFs::mount("legacy");
        let pin = bpffs.dir.join("pod-identity-agent");
        let node = pod_identity_e2e::Node::new();
        let fake = pod_identity_e2e::FakeAws::start_in(&node.netns);
        fake.associate("payments", "api", "payments-api-role");
        let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        // An older agent's layout (`DIR/links`, `DIR/maps`): its connect4 sends the credential
        // address to a port nothing serves, and its map has another value layout. Beside them, an
        // object that is no agent layout's.
        std::fs::create_dir_all(pin.join("links")).unwrap();
        std::fs::create_dir_all(pin.join("maps")).unwrap();
        let stale_target = std::net::SocketAddrV4::new(node.ip4, 9);
        let service = "169.254.170.23:80".parse().unwrap();
        let old =
            bpf::Neighbour::attach(&node.cgroup_root, bpf::Attach::Link, service, stale_target)
                .expect("attach the older layout's program");
        old.pin(&pin.join("links/connect4")).unwrap();
        drop(old);
        bpf::pin_array_map(&pin.join("maps/CONNECTIONS"), 40).unwrap();
        bpf::pin_array_map(&pin.join("notes"), 8).unwrap();
        assert_eq!(
            pod.curl(V4_URL, &pod.token()).status,
            0,
            "the old layout still redirects"
        );

        let agent = Agent::start(&node, &fake, &["--pin", pin.to_str().unwrap()]);
        let r = pod.curl(V4_URL, &pod.token());
        assert_eq!(
            r.status,
            200,
            "{}
    {}",
            r.body,
            agent.log()
        );
        let log = agent.log();
        assert!(
            log.contains("pinned objects of another layout")
                && log.contains("links/connect4")
                && log.contains("maps/CONNECTIONS"),
            "the log names them: {log}"
        );
        let (_, readyz) = node
            .http_get(
                pod_identity_e2e::agent::PROBE_ADDR.parse().unwrap(),
                "/readyz",
            )
            .unwrap();
        assert!(
            readyz.contains("pinned objects of another layout detached"),
            "{readyz}"
        );
        let names: Vec<String> = bpf::attached(&node.cgroup_root)
            .into_iter()
            .map(|a| a.name)
            .collect();
        assert!(
            !names.iter().any(|n| n == bpf::NEIGHBOUR_NAME),
            "the older program is detached: {names:?}"
        );
        assert!(!pin.join("links").exists() && !pin.join("maps").exists());
        assert!(
            pin.join(pins_of_this_version())
                .join("links/connect4")
                .exists()
                && pin.join("notes").exists()
        );
        eprintln!(
            "ATTACK legacy pins: detached {:?}; pod served 200",
            ["links/connect4", "maps/CONNECTIONS"]
        );
        drop(agent);
        cleanup(&pin);
    }

    #[test]
    fn link_mode_does_not_serve_beside_pins_that_redirect_elsewhere() {
        let bpffs = BpfFs::mount("pinlink");
        let pin = bpffs.dir.join("pod-identity-agent");
        let pin_arg = pin.to_str().unwrap().to_owned();
        let mut s = Setup::with_args(&["--pin", &pin_arg]);
        let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        // SAFETY: kill(2) on the agent's pid, which this test owns.
        unsafe { libc::kill(s.agent.pid() as i32, libc::SIGKILL) };
        s.agent.wait_exit(Duration::from_secs(10));
        assert!(
            pin.join(pins_of_this_version())
                .join("links/connect4")
                .exists(),
            "the dead agent's programs stay pinned"
        );
        s.agent = Agent::start(&s.node, &s.fake, &["--mode", "link", "--pin", &pin_arg]);
        pod.route_credential_addresses_via_node();
        let r = pod.curl(V4_URL, &pod.token());
        assert_eq!(
            r.status,
            200,
            "{}
    {}",
            r.body,
            s.agent.log()
        );
        assert!(
            s.agent
                .log()
                .contains("link mode: detached the pinned programs"),
            "{}",
            s.agent.log()
        );
        let (_, readyz) = s
            .node
            .http_get(
                pod_identity_e2e::agent::PROBE_ADDR.parse().unwrap(),
                "/readyz",
            )
            .unwrap();
        assert!(readyz.contains("pinned programs detached"), "{readyz}");
        assert!(!pin.join(pins_of_this_version()).exists());
        assert!(
            bpf::attached(&s.node.cgroup_root).is_empty(),
            "nothing redirects pods elsewhere"
        );
    }

    #[test]
    fn records_older_than_their_connection_and_of_closed_sockets_are_refused() {
        let s = Setup::new();
        let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
        let pid = s.agent.pid() as i32;
        // SAFETY: kill(2) on the agent's pid, which this test owns.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let mut behind = pod
            .command("python3")
            .args(["-c", BEHIND_A_STOPPED_AGENT, "60", &pod.token()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut sent = [0u8; 5];
        behind
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut sent)
            .unwrap();
        // Longer than a connection waits to be accepted: the agent finds A's record too old.
        std::thread::sleep(Duration::from_secs(31));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        let out = behind.wait_with_output().unwrap();
        let answer = String::from_utf8_lossy(&out.stdout);
        let m = s.agent.metrics();
        let stale = metric(
            &m,
            r#"pod_identity_agent_rejected_connections_total{reason="stale_record"}"#,
        );
        let unredirected = metric(
            &m,
            r#"pod_identity_agent_rejected_connections_total{reason="not_redirected"}"#,
        );
        eprintln!(
            "ATTACK stale records: a connection accepted 31 s after its connect closed without an answer ({}); stale_record {stale}, not_redirected {unredirected} (the reset socket's record went with it)",
            answer.trim().replace('\n', " / ")
        );
        assert!(
            answer.contains("b''") || answer.contains("error"),
            "closed, not answered: {answer}"
        );
        assert_eq!(stale, 1.0, "{m}");
        assert_eq!(
            unredirected, 1.0,
            "the reset socket's record was dropped when it closed: {m}"
        );
        assert_eq!(pod.curl(V4_URL, &pod.token()).status, 200);
    }
}

//! Hostile clients are bounded and well-behaved pods keep being served; SIGTERM drains
//! in-flight requests.

use std::time::{Duration, Instant};

use pod_identity_e2e::CgroupShape;

use super::{Setup, V4_URL, metric};

/// Runs a Python script in `pod` with the credential address and `token` as arguments; returns
/// its stdout.
fn py(pod: &pod_identity_e2e::Pod, script: &str, token: &str) -> String {
    let out = pod
        .command("python3")
        .args(["-c", script, token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

const RAW: &str = r#"
import socket, sys, time
token = sys.argv[1]
def exchange(payload, wait=3.0):
    s = socket.create_connection(("169.254.170.23", 80), timeout=wait)
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        # The agent answered and closed before the whole payload was sent (an oversized
        # head is refused as soon as it passes the limit): read what it answered.
        pass
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    return data
"#;

#[test]
fn malformed_and_foreign_protocols_get_errors_not_crashes() {
    let s = Setup::new();
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let token = pod.token();
    let script = format!(
        "{RAW}
huge = b'X-Filler: ' + b'a' * 100000
print(exchange(b'GET /v1/credentials HTTP/1.1\\r\\nHost: 169.254.170.23\\r\\n' + huge + b'\\r\\n\\r\\n')[:12])
print(exchange(b'GET /v1/credentials HTTP/1.1\\r\\nHost: 169.254.170.23\\r\\nAuthorization: ' + b'x' * 20000 + b'\\r\\n\\r\\n')[:12])
print(exchange(b'GET /v1/credentials HTTP/1.1\\r\\nHost: 169.254.170.23\\r\\nAuthorization: ' + token.encode() + b'\\r\\n\\r\\n\\x00\\x01garbage\\xff\\r\\n\\r\\nmore garbage\\r\\n\\r\\n').count(b'HTTP/1.1 '))
print(exchange(b'GET /v1/credentials HTTP/1.0\\r\\nHost: 169.254.170.23\\r\\nAuthorization: ' + token.encode() + b'\\r\\n\\r\\n')[:12])
print(exchange(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + b'\\x00\\x00\\x12\\x04\\x00\\x00\\x00\\x00\\x00')[:12])
"
    );
    let lines: Vec<String> = py(&pod, &script, &token)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(
        lines[0] == "b'HTTP/1.1 431'" || lines[0] == "b'HTTP/1.1 400'",
        "oversized headers are refused: {lines:?}"
    );
    // Larger than a connection may buffer: refused whole, before any token check.
    assert!(
        lines[1] == "b'HTTP/1.1 431'" || lines[1] == "b'HTTP/1.1 400'",
        "oversized token: {lines:?}"
    );
    // One credential response, then an error for the garbage, then the connection closes.
    assert_eq!(lines[2], "2", "pipelined garbage: {lines:?}");
    assert!(
        lines[3] == "b'HTTP/1.1 200'" || lines[3] == "b'HTTP/1.0 200'",
        "HTTP/1.0 is served: {lines:?}"
    );
    assert!(
        !lines[4].contains(" 200"),
        "HTTP/2 prior knowledge is refused: {lines:?}"
    );
    assert_eq!(pod.curl(V4_URL, &token).status, 200, "still serving");
}

#[test]
fn slowloris_and_idle_floods_are_bounded_and_others_are_served() {
    let s = Setup::with_args(&["--max-connections-per-pod", "64"]);
    let attacker = s.pod(
        "payments",
        "attacker-0",
        "api",
        CgroupShape::SystemdBurstable,
    );
    let victim = s.pod(
        "search",
        "indexer-0",
        "indexer",
        CgroupShape::SystemdBurstable,
    );
    // 10,000 idle connections plus a slowloris that sends a header byte per second.
    let script = r#"
import resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
slow = socket.create_connection(("169.254.170.23", 80))
slow.sendall(b"GET /v1/credentials HTTP/1.1\r\n")
socks, refused = [], 0
for i in range(10000):
    try:
        socks.append(socket.create_connection(("169.254.170.23", 80), timeout=5))
    except OSError:
        refused += 1
time.sleep(1.0)
# A connection the agent closed at once reads EOF; one it kept would block.
open_ = 0
for s in socks:
    s.setblocking(False)
    try:
        open_ += 1 if s.recv(1) != b"" else 0
    except BlockingIOError:
        open_ += 1
    except OSError:
        pass
# Slowloris: keep dripping bytes until the agent gives up on the headers.
start = time.time()
closed_after = None
while time.time() - start < 15:
    try:
        slow.sendall(b"X")
        slow.setblocking(False)
        try:
            if slow.recv(1024) == b"" or True:
                pass
        except BlockingIOError:
            pass
        slow.setblocking(True)
        time.sleep(1)
    except OSError:
        closed_after = time.time() - start
        break
print(open_, refused, closed_after)
"#;
    let attack = attacker
        .command("python3")
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Meanwhile another pod is served at normal speed.
    std::thread::sleep(Duration::from_secs(2));
    let token = victim.token();
    for _ in 0..20 {
        let started = Instant::now();
        let r = victim.curl(V4_URL, &token);
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "served promptly: {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = s.agent.metrics();
    assert!(
        metric(
            &m,
            r#"pod_identity_agent_rejected_connections_total{reason="pod_limit"}"#
        ) > 9000.0,
        "{m}"
    );
    assert!(
        metric(&m, "process_open_fds") < 400.0,
        "file descriptors stay bounded: {m}"
    );
    let out = attack.wait_with_output().unwrap();
    let fields: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let kept: u32 = fields[0].parse().unwrap();
    assert!(
        kept <= 64,
        "at most --max-connections-per-pod kept open, got {kept}"
    );
    let closed_after: f64 = fields[2]
        .parse()
        .unwrap_or_else(|_| panic!("the slowloris connection was never closed: {fields:?}"));
    assert!(
        closed_after < 10.0,
        "header read timeout closes a slowloris: {closed_after}"
    );
}

#[test]
fn sigterm_lets_in_flight_requests_finish() {
    let mut s = Setup::new();
    s.fake.set_latency(Duration::from_millis(1500));
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let token = pod.token();
    let client = pod
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "-H",
        ])
        .arg(format!("Authorization: {token}"))
        .arg(V4_URL)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let stopped = Instant::now();
    assert!(s.agent.stop().success());
    let out = client.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "the in-flight request was answered"
    );
    assert!(
        stopped.elapsed() >= Duration::from_millis(1000),
        "the agent waited for it"
    );
}

//! What an operator sees. Metrics read by a real Prometheus parser, per-pod statistics
//! through the `pods` command, readiness, and (in every test, at agent drop) no secret in the
//! logs.

use std::time::{Duration, Instant};

use pod_identity_e2e::{Agent, CgroupShape, FakeAws, Node, agent::PROBE_ADDR};

use super::{Setup, V4_URL};

/// The OpenMetrics text parsed by the Python `prometheus_client` parser, as
/// `{"name{label=value,...}": value}`.
fn parse_metrics(text: &str) -> serde_json::Map<String, serde_json::Value> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn value(m: &serde_json::Map<String, serde_json::Value>, series: &str) -> f64 {
    m.get(series)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| panic!("{series} missing from {:?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_and_pod_statistics_equal_the_traffic_sent() {
    let s = Setup::new();
    let a = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let b = s.pod(
        "search",
        "indexer-0",
        "indexer",
        CgroupShape::CgroupfsBestEffort,
    );
    let token = a.token();
    for _ in 0..5 {
        assert_eq!(a.curl(V4_URL, &token).status, 200);
    }
    assert_eq!(a.curl(V4_URL, "garbage").status, 400);
    for _ in 0..2 {
        assert_eq!(b.curl(V4_URL, &token).status, 403, "b presents a's token");
    }
    // Not redirected: nothing listens there, so it never reaches the agent.
    let [listen4, _] = s.node.listen_addrs(pod_identity_e2e::agent::PORT);
    assert_eq!(
        a.curl(&format!("http://{listen4}/v1/credentials"), &token)
            .status,
        0
    );

    let m = parse_metrics(&s.agent.metrics());
    assert_eq!(
        value(&m, "pod_identity_agent_requests_total{code=200}"),
        5.0
    );
    assert_eq!(
        value(&m, "pod_identity_agent_requests_total{code=400}"),
        1.0
    );
    assert_eq!(
        value(&m, "pod_identity_agent_requests_total{code=403}"),
        2.0
    );
    assert_eq!(
        value(&m, "pod_identity_agent_request_duration_seconds_count{}"),
        8.0
    );
    assert_eq!(
        value(
            &m,
            "pod_identity_agent_refused_requests_total{reason=token_invalid}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "pod_identity_agent_refused_requests_total{reason=token_pod_mismatch}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "pod_identity_agent_kernel_steered_connections_total{result=steered}"
        ),
        8.0
    );
    assert_eq!(
        value(
            &m,
            "pod_identity_agent_kernel_redirected_connects_total{family=ipv4}"
        ),
        8.0
    );
    assert_eq!(value(&m, "pod_identity_agent_upstream_calls_total{}"), 1.0);
    assert_eq!(
        value(
            &m,
            "pod_identity_agent_upstream_call_duration_seconds_count{}"
        ),
        1.0
    );
    assert_eq!(
        value(&m, "pod_identity_agent_cache_lookups_total{result=miss}"),
        1.0
    );
    assert_eq!(
        value(&m, "pod_identity_agent_cache_lookups_total{result=hit}"),
        4.0
    );
    assert_eq!(value(&m, "pod_identity_agent_cache_entries{}"), 1.0);
    assert_eq!(
        value(&m, "pod_identity_agent_build_info{version=0.1.0}"),
        1.0
    );
    assert!(value(&m, "process_resident_memory_bytes{}") > 1e6);
    assert!(value(&m, "process_open_fds{}") > 5.0);
    assert!(value(&m, "process_start_time_seconds{}") > 1.7e9);
    assert!(
        !m.keys()
            .any(|k| k.contains("pod=") || k.contains("namespace=")),
        "no per-pod labels by default"
    );

    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&s.agent.pods_cli(&["--json"])).unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let row = |uid: &str| {
        rows.iter()
            .find(|r| r["pod_uid"] == uid)
            .unwrap_or_else(|| panic!("no row for {uid}: {rows:?}"))
    };
    let ra = row(&a.uid);
    assert_eq!(
        (
            ra["namespace"].as_str(),
            ra["pod"].as_str(),
            ra["service_account"].as_str()
        ),
        (Some("payments"), Some("api-0"), Some("api"))
    );
    assert_eq!(ra["requests"], 6, "5 served, 1 bad token: {ra}");
    assert_eq!(
        (ra["cache_hits"].as_u64(), ra["upstream_calls"].as_u64()),
        (Some(4), Some(1))
    );
    assert_eq!(ra["errors"]["bad_token"], 1);
    assert_eq!(
        ra["kernel_redirects"], 6,
        "the direct connection was not redirected: {ra}"
    );
    assert!(
        ra["role_arn"]
            .as_str()
            .unwrap()
            .contains("payments-api-role")
    );
    assert!(ra["association_id"].as_str().unwrap().starts_with("a-"));
    assert!(ra["credential_expiry"].as_str().unwrap().ends_with('Z'));
    assert!(ra["latency_p50_ms"].as_f64().unwrap() <= ra["latency_p99_ms"].as_f64().unwrap());
    let rb = row(&b.uid);
    assert_eq!(
        (
            rb["requests"].as_u64(),
            rb["errors"]["refused"].as_u64(),
            rb["kernel_redirects"].as_u64()
        ),
        (Some(2), Some(2), Some(2))
    );
    assert_eq!(
        rb["pod"], "",
        "a pod that never presented its own token is shown by uid"
    );

    let table = s.agent.pods_cli(&["--sort", "requests"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAMESPACE") && lines[0].contains("P99"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("payments") && lines[1].contains("api-0"),
        "sorted by requests: {table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
}

#[test]
fn per_pod_metrics_only_when_asked() {
    let s = Setup::with_args(&["--metrics-per-pod"]);
    let a = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    assert_eq!(a.curl(V4_URL, &a.token()).status, 200);
    let m = parse_metrics(&s.agent.metrics());
    assert_eq!(
        value(
            &m,
            "pod_identity_agent_pod_requests_total{code=200,namespace=payments,pod=api-0}"
        ),
        1.0
    );
}

#[test]
fn readyz_fails_before_attach_and_passes_after() {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    let late_root = node.cgroup_root.join("kubepods.slice");
    let agent = Agent::spawn(
        &node,
        &fake,
        &["--cgroup-root", late_root.to_str().unwrap()],
    );
    let probe = PROBE_ADDR.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let not_ready = loop {
        if let Ok((status, body)) = node.http_get(probe, "/readyz") {
            break (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "probe never answered:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(not_ready.0, 503, "{not_ready:?}");
    assert!(
        not_ready.1.contains("waiting for cgroup root"),
        "{not_ready:?}"
    );
    assert_eq!(
        node.http_get(probe, "/healthz").unwrap().0,
        200,
        "alive while not ready"
    );
    std::fs::create_dir_all(&late_root).unwrap();
    loop {
        let (status, body) = node.http_get(probe, "/readyz").unwrap();
        if status == 200 {
            assert_eq!(body.trim(), "ready");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready: {status} {body}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Attached at the new root: a pod below it is served.
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    fake.associate("payments", "api", "payments-api-role");
    assert_eq!(pod.curl(V4_URL, &pod.token()).status, 200);
}

#[test]
fn json_logs_carry_pod_reason_and_latency() {
    let s = Setup::with_args(&["--log-format", "json"]);
    let a = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let b = s.pod("payments", "api-1", "api", CgroupShape::SystemdBurstable);
    assert_eq!(a.curl(V4_URL, &a.token()).status, 200);
    assert_eq!(b.curl(V4_URL, &a.token()).status, 403);
    std::thread::sleep(Duration::from_millis(200));
    let log = s.agent.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let call = lines
        .iter()
        .find(|l| l["message"] == "upstream call succeeded")
        .expect("one line per upstream call");
    assert_eq!(call["pod"], "payments/api-0");
    assert_eq!(call["upstream"], "EKS Auth");
    assert!(
        call["latency_ms"].is_u64() && call["request_id"].as_str().unwrap().starts_with("fake-"),
        "{call}"
    );
    let refused = lines
        .iter()
        .find(|l| l["message"] == "refused credential request")
        .expect("refusal logged");
    assert_eq!(refused["reason"], "token_pod_mismatch");
    assert_eq!(refused["status"], 403);
    assert!(refused["latency_ms"].is_u64(), "{refused}");
}

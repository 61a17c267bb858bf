//! The cache and upstream behaviour, end to end against the fake EKS Auth's faults.

use std::time::{Duration, Instant};

use pod_identity_e2e::{CgroupShape, fake_aws::Fault};

use super::{Setup, V4_URL, metric};

/// Fires `n` requests at once from inside `pod` (one thread each, one connection each) and
/// returns their status codes.
fn burst(pod: &pod_identity_e2e::Pod, token: &str, n: usize) -> Vec<u16> {
    let script = r#"
import sys, threading, http.client
token, n = sys.argv[1], int(sys.argv[2])
codes = [0] * n
start = threading.Barrier(n)
def one(i):
    start.wait()
    try:
        c = http.client.HTTPConnection("169.254.170.23", 80, timeout=20)
        c.request("GET", "/v1/credentials", headers={"Authorization": token})
        codes[i] = c.getresponse().status
    except Exception as e:
        codes[i] = -1
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(" ".join(map(str, codes)))
"#;
    let out = pod
        .command("python3")
        .args(["-c", script, token, &n.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect()
}

#[test]
fn two_hundred_concurrent_first_requests_make_one_upstream_call() {
    let s = Setup::new();
    s.fake.set_latency(Duration::from_millis(500));
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let codes = burst(&pod, &pod.token(), 200);
    assert_eq!(codes.len(), 200);
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    assert_eq!(
        s.fake.calls().len(),
        1,
        "200 concurrent misses for one token must coalesce into one call"
    );
    let m = s.agent.metrics();
    eprintln!(
        "after 200 concurrent requests: resident memory {} bytes",
        metric(&m, "process_resident_memory_bytes")
    );
    assert_eq!(
        metric(
            &m,
            r#"pod_identity_agent_cache_lookups_total{result="miss"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"pod_identity_agent_cache_lookups_total{result="coalesced"}"#
        ) + metric(
            &m,
            r#"pod_identity_agent_cache_lookups_total{result="hit"}"#
        ),
        199.0
    );
}

#[test]
fn a_client_that_gives_up_does_not_cancel_the_upstream_call() {
    let s = Setup::new();
    s.fake.set_latency(Duration::from_millis(1500));
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let token = pod.token();
    let out = pod
        .command("curl")
        .args(["-s", "--max-time", "0.1", "-H"])
        .arg(format!("Authorization: {token}"))
        .arg(V4_URL)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(28),
        "the client must have timed out"
    );
    std::thread::sleep(Duration::from_millis(2000));
    let started = Instant::now();
    let r = pod.curl(V4_URL, &token);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "a cache hit does not wait for EKS Auth"
    );
    assert_eq!(
        s.fake.calls().len(),
        1,
        "the abandoned call's answer was cached"
    );
}

#[test]
fn pods_keep_getting_credentials_through_an_upstream_outage() {
    let s = Setup::new();
    // Credentials that stop being fresh (15 minutes left) 3 s after issue: every request then
    // tries to refresh, so each fault below is really met.
    s.fake.set_lifetime(Duration::from_secs(15 * 60 + 3));
    let pods: Vec<_> = (0..2)
        .map(|i| {
            s.pod(
                "payments",
                &format!("api-{i}"),
                "api",
                CgroupShape::SystemdBurstable,
            )
        })
        .collect();
    let tokens: Vec<_> = pods.iter().map(|p| p.token()).collect();
    let keys: Vec<_> = pods
        .iter()
        .zip(&tokens)
        .map(|(p, t)| {
            let r = p.curl(V4_URL, t);
            assert_eq!(r.status, 200, "{}", r.body);
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["SecretAccessKey"].clone()
        })
        .collect();
    // The outage starts right away, so the refresh-ahead (due ~2 s after issue) fails too;
    // after 4 s the credentials have less than 15 minutes left and every request tries upstream.
    let before = s.fake.calls().len();
    s.fake.set_fault(Some(Fault {
        status: 500,
        code: "InternalServerException".into(),
    }));
    std::thread::sleep(Duration::from_secs(4));
    for fault in [
        Some(Fault {
            status: 500,
            code: "InternalServerException".into(),
        }),
        Some(Fault {
            status: 503,
            code: "ServiceUnavailableException".into(),
        }),
        Some(Fault {
            status: 429,
            code: "ThrottlingException".into(),
        }),
        None, // connection resets
    ] {
        s.fake.set_fault(fault.clone());
        s.fake.set_reset(fault.is_none());
        for ((pod, token), key) in pods.iter().zip(&tokens).zip(&keys) {
            let r = pod.curl(V4_URL, token);
            assert_eq!(r.status, 200, "during {fault:?}: {}", r.body);
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(
                &v["SecretAccessKey"], key,
                "the cached credentials are served"
            );
        }
    }
    s.fake.set_reset(false);
    let during = s.fake.calls().len() - before;
    let resets = s.fake.resets();
    eprintln!("outage: {during} upstream calls answered with faults, {resets} connections reset");
    assert!(
        during >= 6,
        "each status fault was met by the refreshes ({during} calls)"
    );
    assert!(resets >= 1, "the resets were met");
    let m = s.agent.metrics();
    assert!(
        metric(
            &m,
            r#"pod_identity_agent_cache_lookups_total{result="stale"}"#
        ) >= 8.0,
        "{m}"
    );
    // After the outage a refresh succeeds and new credentials are served. A refresh may still
    // be backing off from the last fault, so allow it a few seconds; stale answers meanwhile are
    // fine.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = pods[0].curl(V4_URL, &tokens[0]);
        assert_eq!(r.status, 200, "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        if v["SecretAccessKey"] != keys[0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refresh within 10 s of the outage ending"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn resource_not_found_is_a_404_then_a_negative_cache_hit() {
    let s = Setup::new();
    let pod = s.pod(
        "payments",
        "batch-0",
        "batch",
        CgroupShape::SystemdBurstable,
    );
    let token = pod.token();
    for _ in 0..3 {
        let r = pod.curl(V4_URL, &token);
        assert_eq!(r.status, 404, "{}", r.body);
        assert!(r.body.contains("(ResourceNotFoundException)"), "{}", r.body);
    }
    assert_eq!(
        s.fake.calls().len(),
        1,
        "repeats within --negative-ttl are answered from memory"
    );
    let m = s.agent.metrics();
    assert_eq!(
        metric(
            &m,
            r#"pod_identity_agent_cache_lookups_total{result="negative"}"#
        ),
        2.0,
        "{m}"
    );
}

#[test]
fn a_deleted_pod_gets_no_refresh() {
    let s = Setup::new();
    // Refresh is due ~2 s after issue for these credentials (to keep 15 minutes left).
    s.fake.set_lifetime(Duration::from_secs(15 * 60 + 3));
    let kept = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let deleted = s.pod(
        "search",
        "indexer-0",
        "indexer",
        CgroupShape::CgroupfsBestEffort,
    );
    assert_eq!(kept.curl(V4_URL, &kept.token()).status, 200);
    assert_eq!(deleted.curl(V4_URL, &deleted.token()).status, 200);
    deleted.delete();
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        s.fake.calls_for(&kept.uid) >= 2,
        "the live pod's credentials were refreshed ahead (control)"
    );
    assert_eq!(
        s.fake.calls_for(&deleted.uid),
        1,
        "nothing renewed for the deleted pod"
    );
    let m = s.agent.metrics();
    assert_eq!(metric(&m, "pod_identity_agent_cache_entries"), 1.0, "{m}");
    assert_eq!(
        metric(
            &m,
            r#"pod_identity_agent_cache_evictions_total{reason="pod_gone"}"#
        ),
        1.0,
        "{m}"
    );
}

#[test]
fn a_rotated_token_supersedes_the_old_entry() {
    let s = Setup::new();
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let (old, new) = (pod.token(), pod.token());
    assert_ne!(old, new);
    assert_eq!(pod.curl(V4_URL, &old).status, 200);
    assert_eq!(pod.curl(V4_URL, &new).status, 200);
    let m = s.agent.metrics();
    assert_eq!(metric(&m, "pod_identity_agent_cache_entries"), 1.0, "{m}");
    assert_eq!(
        metric(
            &m,
            r#"pod_identity_agent_cache_evictions_total{reason="superseded"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(s.fake.calls().len(), 2);
}

#[test]
fn a_noisy_pod_gets_429_and_the_others_are_served() {
    let s = Setup::with_args(&["--pod-rps", "1", "--pod-burst", "5"]);
    let noisy = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let quiet = s.pod(
        "search",
        "indexer-0",
        "indexer",
        CgroupShape::SystemdBurstable,
    );
    let codes = burst(&noisy, &noisy.token(), 12);
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 5, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 7, "{codes:?}");
    let r = noisy.curl(V4_URL, &noisy.token());
    assert!(
        r.status == 429 && r.body.contains("payments/api-0"),
        "{} {}",
        r.status,
        r.body
    );
    assert_eq!(quiet.curl(V4_URL, &quiet.token()).status, 200);
}

#[test]
fn a_hanging_upstream_is_a_504_within_the_deadline() {
    let s = Setup::with_args(&["--upstream-timeout", "1s"]);
    s.fake.set_latency(Duration::from_secs(10));
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let started = Instant::now();
    let r = pod.curl(V4_URL, &pod.token());
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(r.body.contains("UpstreamTimeout"), "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

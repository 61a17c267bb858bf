//! `cargo xtask soak --minutes N` (a 2-minute run is part of `cargo xtask test`).
//!
//! 100 simulated pods query continuously while the fake EKS Auth cycles through 5xx, throttling,
//! latency spikes and connection resets, and pods are deleted and created. At the end:
//! - no request was answered with another pod's credentials;
//! - no pod was refused after it held credentials (they stay valid for the whole run);
//! - the agent's resident memory and file descriptors stayed flat;
//! - the agent's request counters equal the responses the clients saw.
//!
//! Credentials are issued with 15 minutes and 20 seconds to live, so they stop being "fresh" during
//! the run: refreshes meet the faults, and cached credentials must carry the pods through them.

use std::{
    fs,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use pod_identity_e2e::{
    Agent, CgroupShape, FakeAws, Node, Pod,
    agent::binary,
    fake_aws::{Fault, access_key_for},
};

struct Client {
    pod: Pod,
    loadgen: Child,
}

fn start_client(pod: Pod, seconds: f64) -> Client {
    let key = access_key_for(&pod.namespace, &pod.service_account);
    let loadgen = pod
        .command(binary().with_file_name("loadgen").to_str().unwrap())
        .args([
            "--token",
            &pod.token(),
            "--rate",
            "5",
            "--concurrency",
            "1",
            "--seconds",
            &seconds.to_string(),
        ])
        .args(["--expect-key", &key])
        .stdout(Stdio::piped())
        .spawn()
        .expect("loadgen");
    Client { pod, loadgen }
}

#[derive(Default, Debug)]
struct Seen {
    responses: u64,
    ok: u64,
    wrong: u64,
    refused_after_ok: u64,
    connection_errors: u64,
}

fn finish(client: Client, seen: &mut Seen, stop: bool) -> Pod {
    if stop {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(client.loadgen.id() as i32, libc::SIGTERM) };
    }
    let out = client.loadgen.wait_with_output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("loadgen result");
    let statuses: u64 = v["statuses"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    seen.responses += statuses;
    seen.ok += v["ok"].as_u64().unwrap();
    seen.wrong += v["wrong"].as_u64().unwrap();
    seen.refused_after_ok += v["refused_after_ok"].as_u64().unwrap();
    seen.connection_errors += v["failed"].as_u64().unwrap() + v["ok"].as_u64().unwrap() - statuses;
    client.pod
}

fn proc_figures(pid: u32) -> (u64, usize) {
    let rss = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

fn main() {
    pod_identity_e2e::require_root();
    let minutes: f64 = std::env::args()
        .skip_while(|a| a != "--minutes")
        .nth(1)
        .map(|m| m.parse().expect("--minutes N"))
        .unwrap_or(2.0);
    let total = Duration::from_secs_f64(minutes * 60.0);
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    for i in 0..10 {
        fake.associate(&format!("team-{i}"), "app", &format!("team-{i}-role"));
    }
    fake.set_lifetime(Duration::from_secs(15 * 60 + 20));
    let agent = Agent::start(&node, &fake, &["--mode", "ebpf"]);
    let started = Instant::now();
    let seconds = total.as_secs_f64() + 60.0;
    let mut serial = 0;
    let mut new_pod = |node: &Node| {
        serial += 1;
        let ns = format!("team-{}", serial % 10);
        let name = format!("app-{serial}");
        if serial % 2 == 0 {
            node.add_pod(&ns, &name, "app", CgroupShape::SystemdBurstable)
        } else {
            node.add_host_network_pod(&ns, &name, "app")
        }
    };
    eprintln!("soak: starting 100 pods");
    let mut clients: Vec<Client> = (0..100)
        .map(|_| start_client(new_pod(&node), seconds))
        .collect();
    let mut seen = Seen::default();
    let faults = [
        ("healthy", None, Duration::ZERO, false),
        (
            "503s",
            Some(Fault {
                status: 503,
                code: "ServiceUnavailableException".into(),
            }),
            Duration::ZERO,
            false,
        ),
        ("healthy", None, Duration::ZERO, false),
        (
            "throttling",
            Some(Fault {
                status: 429,
                code: "ThrottlingException".into(),
            }),
            Duration::ZERO,
            false,
        ),
        ("latency spikes", None, Duration::from_millis(2500), false),
        (
            "500s",
            Some(Fault {
                status: 500,
                code: "InternalServerException".into(),
            }),
            Duration::ZERO,
            false,
        ),
        ("resets", None, Duration::ZERO, true),
    ];
    let mut baseline: Option<(u64, usize)> = None;
    let mut step = 0;
    let mut deleted = 0;
    while started.elapsed() < total {
        let (name, fault, latency, reset) = &faults[step % faults.len()];
        fake.set_fault(fault.clone());
        fake.set_latency(*latency);
        fake.set_reset(*reset);
        eprintln!("soak: {:>5.0}s {name}", started.elapsed().as_secs_f64());
        step += 1;
        // Churn: one pod leaves, a new one arrives, every period.
        for _ in 0..5 {
            std::thread::sleep(Duration::from_secs(1));
            let victim = clients.remove(deleted % clients.len());
            let pod = finish(victim, &mut seen, true);
            pod.delete();
            deleted += 1;
            clients.push(start_client(new_pod(&node), seconds));
        }
        if baseline.is_none() && started.elapsed() > Duration::from_secs(25) {
            baseline = Some(proc_figures(agent.pid()));
        }
    }
    fake.set_fault(None);
    fake.set_latency(Duration::ZERO);
    fake.set_reset(false);
    std::thread::sleep(Duration::from_secs(2));
    let end = proc_figures(agent.pid());
    for client in clients.drain(..) {
        finish(client, &mut seen, true);
    }
    std::thread::sleep(Duration::from_millis(500));
    let metrics = agent.metrics();
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("pod_identity_agent_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    let (rss0, fds0) = baseline.unwrap_or(end);
    let report = format!(
        "soak {minutes} min: {} responses ({} with credentials), {} pods deleted and replaced, {} wrong, {} refused after holding credentials, {} connection errors; agent counted {counted}; resident {:.1} -> {:.1} MiB, fds {fds0} -> {}; {} EKS Auth calls",
        seen.responses,
        seen.ok,
        deleted,
        seen.wrong,
        seen.refused_after_ok,
        seen.connection_errors,
        rss0 as f64 / 1024.0,
        end.0 as f64 / 1024.0,
        end.1,
        fake.calls().len()
    );
    println!("{report}");
    let mut failures = Vec::new();
    if seen.wrong > 0 {
        failures.push("requests answered with the wrong credentials");
    }
    if seen.refused_after_ok > 0 {
        failures.push("pods refused while holding cached credentials");
    }
    if seen.connection_errors > 0 {
        failures.push("connection errors");
    }
    if counted as u64 != seen.responses {
        failures.push("agent counters differ from what the clients saw");
    }
    if end.0 > rss0 + rss0 / 5 + 2048 {
        failures.push("resident memory grew");
    }
    if end.1 > fds0 + 20 {
        failures.push("file descriptors grew");
    }
    if seen.ok < seen.responses / 2 {
        failures.push("fewer than half the requests got credentials");
    }
    drop(agent);
    if failures.is_empty() {
        println!("soak: 1 passed, 0 failed");
    } else {
        println!("soak FAILED: {}", failures.join("; "));
        println!("soak: 0 passed, 1 failed");
        std::process::exit(1);
    }
}

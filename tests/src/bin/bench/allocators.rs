//! The allocators compared: the same agent built with each (`PIA_BENCH_ALLOCATORS`, from xtask:
//! `name=path;...`), measured on what a dense node cares about, memory first, then CPU: the
//! start-up peak, the idle agent, 1,000 pods cached (just after loading and once settled, which
//! shows whether the allocator returns what a burst left), 250 first requests at once, and
//! throughput with the server's CPU per request.

use std::{path::PathBuf, thread, time::Duration};

use pod_identity_e2e::{Agent, FakeAws, Node, Pod};

use super::{UNLIMITED, args, cpu_seconds, load, now, peak_kib, rss_kib};

struct Variant {
    name: String,
    binary: PathBuf,
}

fn variants() -> Vec<Variant> {
    std::env::var("PIA_BENCH_ALLOCATORS")
        .unwrap_or_default()
        .split(';')
        .filter_map(|v| v.split_once('='))
        .map(|(name, path)| Variant {
            name: name.to_owned(),
            binary: PathBuf::from(path),
        })
        .collect()
}

#[derive(Default)]
struct Measured {
    peak_kib: u64,
    idle_kib: u64,
    /// (req/s, server CPU µs per request)
    new_connection: (f64, f64),
    keepalive: (f64, f64),
    burst_p99_ms: f64,
    burst_failed: u64,
    loaded_kib: u64,
    steady_kib: u64,
}

/// Pods of their own for the burst and the 1,000 cached, and their tokens.
struct Crowd {
    node: Node,
    fake: FakeAws,
    pods: Vec<Pod>,
    tokens: Vec<String>,
}

impl Crowd {
    fn new() -> Crowd {
        let node = Node::new();
        let fake = FakeAws::start_in(&node.netns);
        fake.associate("bench", "app", "bench-role");
        let pods: Vec<Pod> = (0..1000)
            .map(|i| node.add_host_network_pod("bench", &format!("alloc-{i}"), "app"))
            .collect();
        let tokens = pods.iter().map(Pod::token).collect();
        Crowd {
            node,
            fake,
            pods,
            tokens,
        }
    }

    fn token_of(&self, pod: &Pod) -> String {
        let i = self.pods.iter().position(|p| p.uid == pod.uid).unwrap();
        self.tokens[i].clone()
    }
}

/// Measures every variant; returns the markdown table (empty when xtask named none).
pub fn compare(
    node: &Node,
    fake: &FakeAws,
    pods: &[Pod],
    token_of: &dyn Fn(&Pod) -> String,
) -> String {
    let variants = variants();
    if variants.is_empty() {
        return String::new();
    }
    let crowd = Crowd::new();
    let mut md = String::from(
        "| allocator | start-up peak MiB | idle MiB | 1,000 pods cached MiB (after loading / settled) | 250 first requests p99 ms | new connection req/s (CPU µs/req) | keep-alive req/s (CPU µs/req) |\n|---|---|---|---|---|---|---|\n",
    );
    for v in &variants {
        eprintln!("bench: allocator {}", v.name);
        let mut m = Measured::default();
        throughput(&mut m, &v.binary, node, fake, pods, token_of);
        crowded(&mut m, &v.binary, &crowd);
        let mib = |kib: u64| kib as f64 / 1024.0;
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} / {:.1} | {:.1}{} | {:.0} ({:.1}) | {:.0} ({:.1}) |\n",
            v.name,
            mib(m.peak_kib),
            mib(m.idle_kib),
            mib(m.loaded_kib),
            mib(m.steady_kib),
            m.burst_p99_ms,
            if m.burst_failed > 0 {
                format!(", {} failed", m.burst_failed)
            } else {
                String::new()
            },
            m.new_connection.0,
            m.new_connection.1,
            m.keepalive.0,
            m.keepalive.1,
        ));
    }
    md
}

/// Start-up peak, idle, and throughput with CPU per request on the bench's 50 pods.
fn throughput(
    m: &mut Measured,
    binary: &std::path::Path,
    node: &Node,
    fake: &FakeAws,
    pods: &[Pod],
    token_of: &dyn Fn(&Pod) -> String,
) {
    let mut agent = Agent::start_binary(node, fake, &UNLIMITED, &[], binary);
    let pid = agent.pid();
    m.peak_kib = peak_kib(pid);
    thread::sleep(Duration::from_secs(3));
    m.idle_kib = rss_kib(pid);
    let p50 = &pods[..50];
    load(p50, &args(&["--once"]), token_of);
    let run = |keepalive: bool| {
        let mut a = args(&["--seconds", "3", "--concurrency", "2"]);
        if keepalive {
            a.push("--keepalive".into());
        }
        let before = cpu_seconds(pid, false);
        let l = load(p50, &a, token_of);
        (
            l.rps,
            (cpu_seconds(pid, false) - before) * 1e6 / l.ok.max(1) as f64,
        )
    };
    m.new_connection = run(false);
    m.keepalive = run(true);
    assert!(agent.stop().success());
}

/// 250 first requests at once (EKS Auth answering in 50 ms), then 750 more pods' first
/// requests: memory just after, and once the agent has settled.
fn crowded(m: &mut Measured, binary: &std::path::Path, crowd: &Crowd) {
    crowd.fake.set_latency(Duration::from_millis(50));
    let mut agent = Agent::start_binary(&crowd.node, &crowd.fake, &["--mode", "ebpf"], &[], binary);
    let start_at = (now() + 2.0).to_string();
    let token_of = |p: &Pod| crowd.token_of(p);
    let burst = load(
        &crowd.pods[..250],
        &args(&["--once", "--start-at", &start_at]),
        token_of,
    );
    m.burst_p99_ms = burst.p99_ms;
    m.burst_failed = burst.failed;
    crowd.fake.set_latency(Duration::ZERO);
    for chunk in crowd.pods[250..].chunks(50) {
        load(chunk, &args(&["--once"]), token_of);
    }
    m.loaded_kib = rss_kib(agent.pid());
    // As in the memory scenario: idle EKS Auth connections close (20 s) and upkeep runs.
    thread::sleep(Duration::from_secs(25));
    m.steady_kib = rss_kib(agent.pid());
    assert!(agent.stop().success());
}

//! Instructions per cached request, counted by valgrind's callgrind for the agent and for the
//! hyper floor alike, on keep-alive and on new connections. This machine kind has no hardware
//! counters, and instruction counts, unlike time, do not move with a shared machine's load.
//! Counted in user space only (the kernel's share, the TCP stack, is the same for both), from
//! the moment counting is switched on (`callgrind_control`) to the dump after the load.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use pod_identity_e2e::{Agent, FakeAws, Node, Pod, agent::Launch};

use super::{HYPER_PORT, Row, UNLIMITED, args, load, tool};

/// The floor under callgrind listens here (the bench's plain floor keeps its own port).
const COUNTED_FLOOR_PORT: u16 = HYPER_PORT + 2;

/// (keep-alive, new connection) instructions per request of the process `pid` under callgrind.
fn per_request(
    pid: u32,
    out: &Path,
    pods: &[Pod],
    token_of: &dyn Fn(&Pod) -> String,
) -> (f64, f64) {
    callgrind_control(&["--instr=on", &pid.to_string()]);
    let measure = |keepalive: bool| {
        callgrind_control(&["--zero", &pid.to_string()]);
        let mut a = args(&["--seconds", "4", "--concurrency", "1"]);
        if keepalive {
            a.push("--keepalive".into());
        }
        let l = load(&pods[..1], &a, token_of);
        callgrind_control(&["--dump", &pid.to_string()]);
        totals(out) / l.ok.max(1) as f64
    };
    (measure(true), measure(false))
}

fn callgrind_control(args: &[&str]) {
    let out = Command::new("callgrind_control")
        .args(args)
        .output()
        .expect("callgrind_control (cargo xtask bench installs valgrind)");
    assert!(
        out.status.success(),
        "callgrind_control {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The instruction total of the newest dump whose name starts with `out`.
fn totals(out: &Path) -> f64 {
    let dir = out.parent().unwrap();
    let prefix = out.file_name().unwrap().to_string_lossy().into_owned();
    let newest = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .expect("a callgrind dump");
    let text = fs::read_to_string(newest.path()).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn valgrind(out: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--instr-atstart=no".into(),
        format!("--callgrind-out-file={}.%p", out.display()),
    ]
}

/// The two rows: instructions per request against the floor's, keep-alive and new connection.
pub fn rows(
    node: &Node,
    fake: &FakeAws,
    pods: &[Pod],
    token_of: &dyn Fn(&Pod) -> String,
    body: &Path,
    work: &Path,
) -> Vec<Row> {
    eprintln!("bench: instructions per request (callgrind)");
    // The agent, counted.
    let out = work.join("callgrind-agent");
    let wrapper = valgrind(&out);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut agent = Agent::launch(
        node,
        fake,
        &UNLIMITED,
        &Launch {
            wrapper: &wrapper,
            ..Launch::default()
        },
    );
    agent.wait_ready_for(node, Duration::from_secs(300));
    load(&pods[..1], &args(&["--once"]), token_of);
    let ours = per_request(agent.pid(), &prefixed(&out, agent.pid()), pods, token_of);
    assert!(agent.stop().success());

    // The floor, counted, reached through the agent's redirect (not counted).
    let out = work.join("callgrind-floor");
    let listen = SocketAddr::new(node.ip4.into(), COUNTED_FLOOR_PORT).to_string();
    let mut floor = node
        .command("valgrind", None)
        .args(&valgrind(&out)[1..])
        .arg(tool("baseline-server"))
        .args(["--listen", &listen, "--body-file"])
        .arg(body)
        .spawn()
        .expect("baseline-server under valgrind");
    std::thread::sleep(Duration::from_secs(5));
    let redirect = Agent::start(
        node,
        fake,
        &[&UNLIMITED[..], &["--redirect-target", &listen]].concat(),
    );
    let floor_pid = floor.id();
    let hyper = per_request(floor_pid, &prefixed(&out, floor_pid), pods, token_of);
    drop(redirect);
    let _ = floor.kill();
    let _ = floor.wait();

    [
        ("cached, keep-alive, 1 pod", ours.0, hyper.0),
        ("cached, new connection per request, 1 pod", ours.1, hyper.1),
    ]
    .into_iter()
    .map(|(scenario, ours, hyper)| Row {
        scenario,
        measure: format!(
            "user-space instructions per request, callgrind ({ours:.0} vs {hyper:.0})"
        ),
        ours,
        baseline_name: "minimal hyper server",
        baseline: hyper,
        ratio: ours / hyper,
        target: "<= 1.15x",
        met: Some(ours / hyper <= 1.15),
    })
    .collect()
}

/// Callgrind's file for process `pid` (`--callgrind-out-file=<out>.%p`); dumps add `.<n>`.
fn prefixed(out: &Path, pid: u32) -> PathBuf {
    PathBuf::from(format!("{}.{pid}", out.display()))
}

//! Where a cached request's allocations are made (`cargo xtask bench --heap-profile`): the
//! agent built with the dhat heap profiler serves one pod's requests, on one keep-alive
//! connection and then on a new connection each, in a run of its own each. The profile it
//! writes at exit counts the allocations of every call stack; those that allocated a whole number
//! of times per request are the request's, named by the first frames outside the allocator. The profiles stay in the bench's output directory
//! (`dhat-keep-alive.json`, `dhat-new-connection.json`) for dhat's viewer.

use std::{fs, path::Path, time::Duration};

use pod_identity_e2e::{Agent, FakeAws, Node, Pod, agent::Launch};
use serde_json::Value;

use super::{UNLIMITED, args, load};

/// The markdown section: per kind of request, each site with its allocations per request.
pub fn report(
    binary: &Path,
    node: &Node,
    fake: &FakeAws,
    pods: &[Pod],
    token_of: &dyn Fn(&Pod) -> String,
    out_dir: &Path,
) -> String {
    let mut md = String::from("\n### Allocation sites per cached request (dhat)\n");
    for keepalive in [true, false] {
        let kind = if keepalive {
            "keep-alive"
        } else {
            "new connection"
        };
        eprintln!("bench: heap profile, {kind}");
        let out = out_dir.join(format!("dhat-{}.json", kind.replace(' ', "-")));
        let mut agent = Agent::launch(
            node,
            fake,
            &UNLIMITED,
            &Launch {
                binary: Some(binary),
                env: vec![("PIA_DHAT_OUT".into(), out.display().to_string())],
                ..Launch::default()
            },
        );
        agent.wait_ready_for(node, Duration::from_secs(120));
        load(&pods[..1], &args(&["--once"]), token_of);
        let mut a = args(&["--seconds", "3", "--concurrency", "1"]);
        if keepalive {
            a.push("--keepalive".into());
        }
        let requests = load(&pods[..1], &a, token_of).ok.max(1);
        assert!(agent.stop().success());
        let profile: Value = serde_json::from_slice(&fs::read(&out).expect("the dhat profile"))
            .expect("dhat's JSON");
        let sites = request_sites(&profile, requests);
        let total: f64 = sites.iter().map(|(n, _)| n).sum();
        md.push_str(&format!(
            "\n{kind}: {total:.2} allocations per request over {requests} requests\n\n| per request | where |\n|---|---|\n"
        ));
        for (n, frames) in sites {
            md.push_str(&format!("| {n:.2} | {frames} |\n"));
        }
    }
    md
}

/// The call stacks that allocated a whole number of times per request, with that number and
/// their first frames outside the allocator, most first.
fn request_sites(profile: &Value, requests: u64) -> Vec<(f64, String)> {
    let frames: Vec<&str> = profile["ftbl"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut sites: Vec<(f64, String)> = profile["pps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pp| {
            let per_request = pp["tbk"].as_f64()? / requests as f64;
            // A request's allocations come a whole number of times per request; what start-up
            // made (the kernel's BTF parsed, the cgroup tree walked) does not.
            let whole =
                per_request.round() >= 1.0 && (per_request - per_request.round()).abs() < 0.05;
            whole.then(|| {
                let named: Vec<String> = pp["fs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| frames.get(i.as_u64()? as usize))
                    .map(|f| function_of(f))
                    .filter(|f| !is_allocator(f))
                    .take(6)
                    .collect();
                (per_request, named.join(" ← "))
            })
        })
        .collect();
    sites.sort_by(|a, b| b.0.total_cmp(&a.0));
    sites
}

/// `0x1234: path::to::function (file:line:col)` -> `path::to::function`, without closures'
/// noise; the agent's own frames keep their file and line (with a build that has line tables).
fn function_of(frame: &str) -> String {
    let name = frame.split_once(": ").map_or(frame, |(_, rest)| rest);
    let (function, place) = name.split_once(" (").unwrap_or((name, ""));
    let function = function.replace("::{{closure}}", "").replace('|', "\\|");
    match place.split_once("agent/src/") {
        Some((_, at)) => {
            let at = at.trim_end_matches(')');
            let line = at.rsplit_once(':').map(|x| x.0).unwrap_or(at);
            format!("{function} ({line})")
        }
        None => function,
    }
}

fn is_allocator(function: &str) -> bool {
    // Frames inlined into others carry a bare name: those of the allocator and of the standard
    // collections say nothing of where a request allocates.
    if !function.contains("::") && !function.ends_with(')') {
        return true;
    }
    [
        "alloc::",
        "<alloc::",
        "dhat::",
        "<dhat::",
        "core::",
        "<core::",
        "std::alloc",
        "__rust",
        "[root]",
        "hashbrown::raw",
    ]
    .iter()
    .any(|p| function.starts_with(p))
}

//! `cargo xtask demo`: three simulated pods in two namespaces get credentials through the real
//! eBPF redirect, from the real agent, backed by the fake EKS Auth API. Prints what each pod got
//! (secrets redacted) and whom the agent attributed each request to; a pod without Pod Identity
//! falls back to the node's (fake) IMDS, and the IMDS guard names it. Then removes everything,
//! also on Ctrl-C.

use std::time::Duration;

use pod_identity_e2e::{
    Agent, CgroupShape, FakeAws, Node, Pod,
    agent::{Caller, cli, cli_with_stdin},
    fake_imds::FakeImds,
    node::{HttpResult, remove_leftovers},
};

const V4_URL: &str = "http://169.254.170.23/v1/credentials";
const V6_URL: &str = "http://[fd00:ec2::23]/v1/credentials";

fn main() {
    // The agent logs each attribution at debug level; the demo shows those lines.
    // SAFETY: set before any other thread exists.
    unsafe { std::env::set_var("PIA_AGENT_LOG", "info,pod_identity_agent::server=debug") };
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        eprintln!("\ninterrupted: removing the simulated node and pods");
        remove_leftovers(|pid| pid == std::process::id());
        std::process::exit(130);
    });

    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api");
    fake.associate("payments", "worker", "payments-worker");
    fake.associate("search", "indexer", "search-indexer");
    let pods = [
        node.add_pod(
            "payments",
            "api-7d9f8-x2k4p",
            "api",
            CgroupShape::SystemdBurstable,
        ),
        node.add_pod(
            "payments",
            "worker-0",
            "worker",
            CgroupShape::SystemdGuaranteed,
        ),
        node.add_pod(
            "search",
            "indexer-5c6b7-q8w2e",
            "indexer",
            CgroupShape::CgroupfsBestEffort,
        ),
    ];
    // A service account nobody created an association for.
    let crawler = node.add_pod(
        "search",
        "crawler-0",
        "crawler",
        CgroupShape::SystemdBurstable,
    );
    // The node's instance metadata service (fake), and a pod without Pod Identity variables
    // whose SDK falls back to it: the IMDS guard (audit, the default) counts it.
    let imds = FakeImds::start_in(&node.netns, &fake);
    let legacy = node.add_pod(
        "reports",
        "legacy-cron-0",
        "default",
        CgroupShape::CgroupfsBestEffort,
    );
    println!("pod-identity-agent demo: real eBPF redirect, real agent, fake EKS Auth\n");
    println!(
        "node: network namespace {}, addresses {} and {}",
        node.netns, node.ip4, node.ip6
    );
    println!(
        "      programs attach at cgroup {}\n",
        node.cgroup_root.display()
    );
    let agent = Agent::start(&node, &fake, &[]);
    println!("simulated pods:");
    for pod in &pods {
        println!(
            "  {:<30} uid {}  ip {}\n  {:<30} cgroup {}",
            format!("{}/{}", pod.namespace, pod.name),
            pod.uid,
            pod.ip4.map(|ip| ip.to_string()).unwrap_or_default(),
            "",
            pod.cgroup
                .strip_prefix(&node.cgroup_root)
                .unwrap_or(&pod.cgroup)
                .display()
        );
    }

    println!(
        "\nrequests (each pod dials the link-local address; the kernel sends it to the agent):"
    );
    for pod in &pods {
        let token = pod.token();
        show(pod, "curl  ", V4_URL, &pod.curl(V4_URL, &token));
        show(pod, "curl  ", V6_URL, &pod.curl(V6_URL, &token));
        let token_file = pod.write_token_file(&token);
        match pod.boto3(V4_URL, &token_file) {
            Ok([key, secret, _]) => println!(
                "  {:<30} boto3  {:<40} AccessKeyId={key} SecretAccessKey={}",
                who(pod),
                V4_URL,
                redact(&secret)
            ),
            Err(e) => println!(
                "  {:<30} boto3  {:<40} FAILED: {}",
                who(pod),
                V4_URL,
                e.lines().last().unwrap_or("")
            ),
        }
    }
    let stolen = pods[0].token();
    let r = pods[2].curl(V4_URL, &stolen);
    println!(
        "  {:<30} curl   with {}'s token                -> {} {}",
        who(&pods[2]),
        who(&pods[0]),
        r.status,
        r.body.trim()
    );

    let r = crawler.curl(V4_URL, &crawler.token());
    println!(
        "  {:<30} curl   {:<40} -> {} {}",
        who(&crawler),
        V4_URL,
        r.status,
        r.body.trim()
    );

    let (key, _) = legacy.boto3_default_chain();
    println!(
        "  {:<30} boto3  (no Pod Identity variables: the SDK falls back to IMDS) -> AccessKeyId={} (the node role's: {})",
        who(&legacy),
        key.as_deref().unwrap_or("none"),
        imds.access_key()
    );

    // Let the agent's log catch up, and its upkeep (every 2 s) count the IMDS connects.
    std::thread::sleep(Duration::from_millis(2500));
    println!("\nwhom the agent attributed each request to (its log, debug level):");
    for line in agent.log().lines() {
        if let Some(at) = line
            .find("served credentials")
            .or_else(|| line.find("refused credential request"))
            .or_else(|| line.find("pod uid"))
        {
            let fields = &line[at..];
            println!("  {}", fields);
        }
    }
    println!(
        "\nper-pod statistics (`pod-identity-agent pods`, as an operator runs it in the agent's pod):"
    );
    for line in agent.pods_cli(&[]).lines() {
        println!("  {line}");
    }
    let calls = fake.calls();
    println!(
        "\nEKS Auth calls: {} for {} credential responses (one per token; the other requests were served from the agent's cache)",
        calls.len(),
        pods.len() * 3
    );
    let metrics = agent.metrics();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("pod_identity_agent_kernel_redirected_connects_total"))
    {
        println!("kernel: {line}");
    }

    println!(
        "\nthe cluster's associations (`pod-identity-agent associations`, an operator's credentials, the fake EKS API):"
    );
    indent(&cli(&node, None, &fake, Caller::Operator, &["associations"]).stdout);
    println!(
        "\nthis node's pods joined to them (`pod-identity-agent pods --json | pod-identity-agent associations --pods -`):"
    );
    indent(
        &cli_with_stdin(
            &node,
            &fake,
            Caller::Operator,
            &["associations", "--pods", "-"],
            &agent.pods_cli(&["--json"]),
        )
        .stdout,
    );
    println!("\nthe node's set-up checked (`pod-identity-agent doctor`, run on the node):");
    let doctor = cli(
        &node,
        Some(&node.host_cgroup("system.slice/doctor.scope")),
        &fake,
        Caller::Node,
        &["doctor"],
    );
    indent(&doctor.stdout);
    drop(agent);
    drop(fake);
    drop(node);
    println!("\ncleaned up: agent stopped, programs detached, namespaces and cgroups removed");
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("  {line}");
    }
}

fn who(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

fn redact(secret: &str) -> String {
    format!(
        "{}…(redacted, {} chars)",
        &secret[..secret.len().min(4)],
        secret.len()
    )
}

fn show(pod: &Pod, client: &str, url: &str, r: &HttpResult) {
    if r.status == 200 {
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        println!(
            "  {:<30} {client} {:<40} -> 200 AccessKeyId={} SecretAccessKey={} Token={} Expiration={}",
            who(pod),
            url,
            v["AccessKeyId"].as_str().unwrap_or("?"),
            redact(v["SecretAccessKey"].as_str().unwrap_or("")),
            redact(v["Token"].as_str().unwrap_or("")),
            v["Expiration"].as_str().unwrap_or("?")
        );
    } else {
        println!(
            "  {:<30} {client} {:<40} -> {} {}",
            who(pod),
            url,
            r.status,
            r.body.trim()
        );
    }
}

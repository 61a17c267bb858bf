//! The alerts and the dashboard under deploy/monitoring. promtool checks and unit-tests
//! the rules; then Debian's Prometheus server scrapes real agents in the harness while traffic
//! flows with faults injected, and every dashboard query and every alert expression is run
//! through its HTTP API.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use pod_identity_e2e::{Agent, CgroupShape, FakeAws, Node, fake_aws::Fault};

use super::V4_URL;

fn monitoring_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy/monitoring")
}

fn yaml(path: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rules() -> Vec<serde_json::Value> {
    yaml(&monitoring_dir().join("alerts.rules.yaml"))["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// Every query of every dashboard panel, with Grafana's variables set as "All instances" and a
/// one-minute rate window.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring_dir().join("dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    queries
}

const ALERTS: [&str; 10] = [
    "PodIdentityAgentDown",
    "PodIdentityAgentNotReady",
    "PodIdentityAgentEksAuthErrors",
    "PodIdentityAgentEksAuthSlow",
    "PodIdentityAgentServingStale",
    "PodIdentityAgentTokenPodMismatch",
    "PodIdentityAgentCacheNearCapacity",
    "PodIdentityAgentPodsThrottled",
    "PodIdentityAgentLinkMode",
    "PodIdentityAgentPodsUsingNodeRole",
];

#[test]
fn alert_rules_pass_promtool_and_the_prometheus_rule_holds_the_same_rules() {
    let dir = monitoring_dir();
    for args in [
        vec!["check", "rules", "alerts.rules.yaml"],
        vec!["test", "rules", "alerts.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool (cargo xtask setup installs prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let plain = yaml(&dir.join("alerts.rules.yaml"));
    let operator = yaml(&dir.join("prometheusrule.yaml"));
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["metadata"]["namespace"], "kube-system");
    assert_eq!(
        operator["spec"], plain,
        "prometheusrule.yaml's spec must equal alerts.rules.yaml"
    );
    let rules = rules();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    assert_eq!(
        names, ALERTS,
        "one alert per condition an operator is paged for"
    );
    for rule in &rules {
        for annotation in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][annotation]
                    .as_str()
                    .is_some_and(|s| s.len() > 20),
                "{} lacks a {annotation}",
                rule["alert"]
            );
        }
        assert!(
            ["critical", "warning"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{}",
            rule["alert"]
        );
    }
    // The dashboard covers what the issue lists.
    let titles: Vec<String> = dashboard_queries()
        .into_iter()
        .map(|(t, _)| t.to_lowercase())
        .collect();
    for wanted in [
        "status code",
        "latency",
        "cache lookups",
        "eks auth calls",
        "eks auth errors",
        "eks auth latency",
        "refused",
        "connections",
        "memory",
        "mode",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no dashboard panel about {wanted}: {titles:?}"
        );
    }
}

/// Debian's Prometheus in the node's network namespace, scraping `targets` every second and
/// evaluating the project's rules every second. Killed on drop.
struct Prometheus {
    child: Child,
    netns: String,
    dir: PathBuf,
}

const PROMETHEUS_ADDR: &str = "127.0.0.1:9090";

impl Prometheus {
    fn start(node: &Node, targets: &[String]) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("{}-prometheus", node.netns));
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [monitoring_dir().join("alerts.rules.yaml")],
            "scrape_configs": [{"job_name": "pod-identity-agent", "static_configs": [{"targets": targets}]}],
        });
        // JSON is YAML.
        std::fs::write(dir.join("prometheus.yml"), config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = node
            .command("prometheus", None)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS_ADDR}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (cargo xtask setup installs it)");
        let p = Prometheus {
            child,
            netns: node.netns.clone(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.ready() {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    fn ready(&self) -> bool {
        pod_identity_e2e::node::http_get(&self.netns, PROMETHEUS_ADDR.parse().unwrap(), "/-/ready")
            .is_ok_and(|(status, _)| status == 200)
    }

    /// The result vector of an instant query.
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let v = self.api(
            "/api/v1/query",
            &["--data-urlencode", &format!("query={expr}")],
        );
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// `GET path` of the HTTP API, as JSON.
    fn api(&self, path: &str, args: &[&str]) -> serde_json::Value {
        let out = pod_identity_e2e::node::command_in("curl", None, &self.netns)
            .args([
                "-sS",
                "-G",
                "--max-time",
                "10",
                &format!("http://{PROMETHEUS_ADDR}{path}"),
            ])
            .args(args)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{path} {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(v["status"], "success", "{path} {args:?}: {v}");
        v
    }

    /// Alert name -> state (`pending` or `firing`).
    fn alerts(&self) -> Vec<(String, String)> {
        self.api("/api/v1/alerts", &[])["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap().to_owned(),
                    a["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_scrapes_the_agents_and_every_panel_and_alert_answers_for_the_traffic() {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api-role");
    fake.associate("search", "indexer", "search-indexer-role");
    // Credentials with 14 minutes left are never "fresh" (15): every request tries a refresh,
    // so an outage shows as stale serving at once.
    fake.set_lifetime(Duration::from_secs(14 * 60));
    // The serving agent: a small cache and a tight per-pod rate limit, so both alerts can fire.
    let agent = Agent::start(
        &node,
        &fake,
        &[
            "--max-cache-entries",
            "2",
            "--pod-rps",
            "1",
            "--pod-burst",
            "2",
            "--upstream-timeout",
            "10s",
        ],
    );
    // An agent that is alive but not ready (waiting for a cgroup root), and one in link mode.
    let missing = node.cgroup_root.join("never-created.slice");
    let _waiting = Agent::spawn(
        &node,
        &fake,
        &[
            "--cgroup-root",
            missing.to_str().unwrap(),
            "--mode",
            "ebpf",
            "--probe-addr",
            "127.0.0.1:2713",
            "--metrics-addr",
            "127.0.0.1:2715",
        ],
    );
    let _link = Agent::start(
        &node,
        &fake,
        &[
            "--mode",
            "link",
            "--probe-addr",
            "127.0.0.1:2723",
            "--metrics-addr",
            "127.0.0.1:2725",
        ],
    );
    // And a target where nothing answers: a node whose agent is down.
    let targets = [
        "127.0.0.1:2705",
        "127.0.0.1:2715",
        "127.0.0.1:2725",
        "127.0.0.1:2735",
    ]
    .map(str::to_owned);
    let prometheus = Prometheus::start(&node, &targets);
    // Every counter and histogram exists with its zero before the traffic.
    std::thread::sleep(Duration::from_secs(3));

    let api = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let indexer = node.add_pod(
        "search",
        "indexer-0",
        "indexer",
        CgroupShape::CgroupfsBestEffort,
    );
    let thief = node.add_pod(
        "search",
        "thief-0",
        "indexer",
        CgroupShape::SystemdGuaranteed,
    );
    // A pod whose SDK falls back to IMDS (the serving agent's guard counts it).
    let _imds = pod_identity_e2e::fake_imds::FakeImds::start_in(&node.netns, &fake);
    let legacy = node.add_pod("legacy", "cron-0", "default", CgroupShape::SystemdBurstable);
    let reach_imds = || {
        let reached = legacy
            .command("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "http://169.254.169.254/latest/meta-data/",
            ])
            .status()
            .unwrap();
        assert!(
            reached.success(),
            "the pod reaches the fake IMDS in audit mode"
        );
    };
    let api_token = api.token();
    let indexer_token = indexer.token();
    assert_eq!(indexer.curl(V4_URL, &indexer_token).status, 200);
    assert_eq!(api.curl(V4_URL, &api_token).status, 200);
    // Over several scrapes: a token copied from another pod, and a pod over its request rate.
    for _ in 0..4 {
        // Across scrapes, so that the counter's increase shows (a series first seen at 1 has
        // none).
        reach_imds();
        assert_eq!(thief.curl(V4_URL, &api_token).status, 403);
        let throttled = (0..4)
            .filter(|_| indexer.curl(V4_URL, &indexer_token).status == 429)
            .count();
        assert!(
            throttled > 0,
            "--pod-burst 2 lets at most 2 of 4 requests through at once"
        );
        std::thread::sleep(Duration::from_millis(1100));
    }
    // An outage, slow and failing: cached credentials keep being served.
    fake.set_latency(Duration::from_millis(2500));
    fake.set_fault(Some(Fault {
        status: 503,
        code: "ServiceUnavailableException".into(),
    }));
    for _ in 0..4 {
        let r = api.curl(V4_URL, &api_token);
        assert_eq!(
            r.status, 200,
            "cached credentials are served during the outage: {}",
            r.body
        );
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Two more scrapes and rule evaluations after the last request.
    std::thread::sleep(Duration::from_secs(3));

    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        if prometheus.query(&expr).is_empty() {
            empty.push(format!("panel {title:?}: {expr}"));
        }
    }
    for rule in rules() {
        let expr = rule["expr"].as_str().unwrap();
        if prometheus.query(expr).is_empty() {
            empty.push(format!("alert {}: {expr}", rule["alert"]));
        }
    }
    assert!(
        empty.is_empty(),
        "queries without series for the traffic sent:\n{}",
        empty.join("\n")
    );

    let active = prometheus.alerts();
    for alert in ALERTS {
        assert!(
            active
                .iter()
                .any(|(name, state)| name == alert && (state == "pending" || state == "firing")),
            "{alert} is neither pending nor firing: {active:?}"
        );
    }
    // The mismatch is attributed to the serving agent's instance; the down alert to the dead one.
    let on = |alert: &str, instance: &str| {
        prometheus
            .query(&format!(
                "ALERTS{{alertname=\"{alert}\",instance=\"{instance}\"}}"
            ))
            .len()
            == 1
    };
    assert!(on("PodIdentityAgentTokenPodMismatch", "127.0.0.1:2705"));
    assert!(on("PodIdentityAgentDown", "127.0.0.1:2735"));
    assert!(on("PodIdentityAgentNotReady", "127.0.0.1:2715"));
    assert!(on("PodIdentityAgentLinkMode", "127.0.0.1:2725"));
    assert!(on("PodIdentityAgentPodsUsingNodeRole", "127.0.0.1:2705"));
    drop(agent);
}

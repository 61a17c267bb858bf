//! The kustomize base and overlays render, pass the Kubernetes schemas, and say what the
//! agent needs; the Dockerfile builds the way xtask does and grants what the agent needs. This
//! machine has no container engine, so the image is checked for consistency, not built.

use std::{path::PathBuf, process::Command};

use pod_identity_e2e::agent::binary;

use super::deploy_modes::AGENT_CAPABILITIES;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `kubectl kustomize` of `dir`, validated with `kubernetes-validate --strict`, as JSON documents.
fn render(dir: &str) -> Vec<serde_json::Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("deploy/kubernetes").join(dir))
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!(
        "pia-{}-{}-{n}.yaml",
        std::process::id(),
        dir.replace('/', "-")
    ));
    std::fs::write(&file, &out.stdout).unwrap();
    let v = Command::new("kubernetes-validate")
        .args(["--strict", "-k", "1.31.0"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (cargo xtask setup installs it)");
    let report =
        String::from_utf8_lossy(&v.stdout).into_owned() + &String::from_utf8_lossy(&v.stderr);
    assert!(
        v.status.success(),
        "{dir} fails schema validation:\n{report}"
    );
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            line.contains("PodMonitor"),
            "unexpected warning for {dir}: {line}"
        );
    }
    let json = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))"])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    serde_json::from_slice(&json.stdout).unwrap()
}

fn kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn container(docs: &[serde_json::Value]) -> &serde_json::Value {
    &kind(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
}

fn args(docs: &[serde_json::Value]) -> Vec<String> {
    container(docs)["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn base_daemonset_is_what_an_eks_node_needs() {
    let docs = render("base");
    let ds = kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "tolerates all taints"
    );
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        (
            rolling["maxSurge"].as_str(),
            rolling["maxUnavailable"].as_i64()
        ),
        (Some("10%"), Some(0))
    );
    assert_eq!(ds["metadata"]["namespace"], "kube-system");

    let c = container(&docs);
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()["valueFrom"]["fieldRef"]["fieldPath"]
            .clone()
    };
    assert_eq!(env("NODE_IP"), "status.hostIP");
    assert_eq!(env("NODE_NAME"), "spec.nodeName");
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(
            (
                get["path"].as_str(),
                get["port"].as_i64(),
                get["host"].as_str()
            ),
            (Some(path), Some(2703), Some("127.0.0.1")),
            "{probe}"
        );
    }
    let ports = c["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(
        (
            ports[0]["name"].as_str(),
            ports[0]["containerPort"].as_i64()
        ),
        (Some("metrics"), Some(2705))
    );
    let rendered = serde_json::to_string(&docs).unwrap();
    assert!(!rendered.contains("hostPort"), "nothing binds a host port");
    assert!(
        ports.iter().all(|p| p["containerPort"] != 80),
        "nothing binds port 80"
    );
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(
        (
            annotations["prometheus.io/scrape"].as_str(),
            annotations["prometheus.io/port"].as_str()
        ),
        (Some("true"), Some("2705"))
    );

    let mounts: Vec<(&str, &str)> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap(),
                v["hostPath"]["path"].as_str().unwrap(),
            )
        })
        .collect();
    // The host's bpffs only as far as the agent's own directory: other tools' pins are not
    // the agent's to reach.
    assert!(
        mounts.contains(&("cgroup", "/sys/fs/cgroup"))
            && mounts.contains(&("pins", "/sys/fs/bpf/pod-identity-agent"))
            && mounts.len() == 2,
        "{mounts:?}"
    );
    let a = args(&docs);
    assert!(
        a.contains(&"--cgroup-root=/host/cgroup".to_owned())
            && a.contains(&"--pin=/sys/fs/bpf".to_owned()),
        "{a:?}"
    );

    // Least privilege: not privileged, ALL dropped, and exactly the named capabilities added,
    // which include every one the non-root end-to-end test runs with.
    let sc = &c["securityContext"];
    assert_eq!(
        (
            sc["privileged"].as_bool(),
            sc["allowPrivilegeEscalation"].as_bool(),
            sc["readOnlyRootFilesystem"].as_bool()
        ),
        (Some(false), Some(false), Some(true))
    );
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let added: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        added,
        [
            "BPF",
            "PERFMON",
            "NET_ADMIN",
            "SYS_RESOURCE",
            "NET_BIND_SERVICE"
        ]
    );
    for cap in AGENT_CAPABILITIES {
        assert!(
            added.contains(&cap.to_uppercase()),
            "{cap} is proven necessary but not granted"
        );
    }
    assert!(
        c["resources"]["requests"]["memory"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );

    let monitor = kind(&docs, "PodMonitor");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(monitor["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(
        kind(&docs, "ServiceAccount")["automountServiceAccountToken"],
        false
    );
}

#[test]
fn every_flag_in_the_manifests_is_one_the_agent_accepts() {
    let help = Command::new(binary())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for dir in [
        "base",
        "overlays/ipv6",
        "overlays/dual-stack",
        "overlays/link",
        "overlays/hybrid",
        "overlays/imds-deny",
    ] {
        let a = args(&render(dir));
        assert_eq!(a[0], "run");
        for flag in a.iter().skip(1) {
            let name = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")),
                "{dir}: unknown flag {name}"
            );
        }
    }
}

#[test]
fn overlays_change_what_they_say() {
    assert!(args(&render("overlays/link")).contains(&"--mode=link".to_owned()));
    let imds_mode = |dir: &str| {
        kind(&render(dir), "ConfigMap")["data"]["IMDS_MODE"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(imds_mode("base").as_deref(), Some("audit"));
    assert_eq!(imds_mode("overlays/imds-deny").as_deref(), Some("deny"));
    assert!(args(&render("overlays/ipv6")).contains(&"--intercept=[fd00:ec2::23]:80".to_owned()));
    let dual = render("overlays/dual-stack");
    let env = &container(&dual)["env"][0];
    assert_eq!(
        (
            env["name"].as_str(),
            env["valueFrom"]["fieldRef"]["fieldPath"].as_str()
        ),
        (Some("NODE_IP"), Some("status.hostIPs"))
    );

    // Hybrid nodes: a DaemonSet of its own, on hybrid nodes only, reading nodeadm's credentials
    // file, with the region configured and IMDS not consulted. The base one avoids them.
    let affinity = |docs: &[serde_json::Value]| {
        let term = &kind(docs, "DaemonSet")["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
            [0];
        (
            term["key"].as_str().unwrap().to_owned(),
            term["operator"].as_str().unwrap().to_owned(),
            term["values"][0].as_str().unwrap().to_owned(),
        )
    };
    let base = render("base");
    assert_eq!(
        affinity(&base),
        (
            "eks.amazonaws.com/compute-type".into(),
            "NotIn".into(),
            "hybrid".into()
        )
    );
    let hybrid = render("overlays/hybrid");
    assert_eq!(
        affinity(&hybrid),
        (
            "eks.amazonaws.com/compute-type".into(),
            "In".into(),
            "hybrid".into()
        )
    );
    let ds = kind(&hybrid, "DaemonSet");
    assert_eq!(ds["metadata"]["name"], "pod-identity-agent-hybrid");
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"], "hybrid",
        "selectors never overlap the base's"
    );
    let c = container(&hybrid);
    let env_value = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap_or("").to_owned())
    };
    assert_eq!(
        env_value("AWS_SHARED_CREDENTIALS_FILE").as_deref(),
        Some("/eks-hybrid/.aws/credentials")
    );
    assert_eq!(
        env_value("AWS_EC2_METADATA_DISABLED").as_deref(),
        Some("true")
    );
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/eks-hybrid/.aws")
        .expect("credentials mount");
    assert_eq!(mount["readOnly"], true);
    let config = kind(&hybrid, "ConfigMap");
    assert!(
        config["data"]["AWS_REGION"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "the region is configured: no IMDS to ask"
    );
    assert!(
        hybrid.iter().all(|d| d["kind"] != "PodMonitor"),
        "the base PodMonitor covers these pods"
    );
}

#[test]
fn dockerfile_builds_the_image_xtask_builds() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let image = std::fs::read_to_string(repo().join("xtask/src/image.rs")).unwrap();
    let install = std::fs::read_to_string(repo().join("xtask/src/install.rs")).unwrap();
    let workspace = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let constant = |text: &str, name: &str| {
        text.split(&format!("pub const {name}: &str = \""))
            .nth(1)
            .unwrap_or_else(|| panic!("no {name}"))
            .split('"')
            .next()
            .unwrap()
            .to_owned()
    };
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "multi-stage: build and runtime");
    // The toolchain the workspace asks for, on an amd64 builder whatever the target platform.
    let rust = workspace
        .split("rust-version = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert!(
        stages[0].starts_with("FROM --platform=linux/amd64 ")
            && stages[0].contains(&format!("rust:{rust}-"))
            && stages[0].ends_with(" AS build"),
        "{stages:?}"
    );
    // The pins xtask installs with.
    assert!(dockerfile.contains(&format!("ziglang=={}", constant(&image, "ZIGLANG"))));
    assert!(dockerfile.contains(&format!(
        "cargo install cargo-zigbuild --version {} --locked",
        constant(&image, "CARGO_ZIGBUILD")
    )));
    assert!(dockerfile.contains(&format!(
        "cargo install bpf-linker --version {} --locked",
        constant(&install, "BPF_LINKER_VERSION")
    )));
    for package in [
        "llvm-22-dev",
        "libpolly-22-dev",
        "libzstd-dev",
        "zlib1g-dev",
    ] {
        assert!(
            dockerfile.contains(package) && install.contains(&format!("\"{package}\"")),
            "{package}"
        );
    }
    // Each architecture cross-built to a static musl binary, as xtask builds it.
    for (arch, target) in [
        ("amd64", "x86_64-unknown-linux-musl"),
        ("arm64", "aarch64-unknown-linux-musl"),
    ] {
        // Compared without whitespace: the formatter decides how xtask lays it out.
        let flat: String = image.split_whitespace().collect();
        assert!(
            flat.contains(&format!("arch:\"{arch}\",target:\"{target}\"")),
            "{arch}"
        );
        assert!(
            dockerfile.contains(&format!("{arch}) target={target}")),
            "{arch}"
        );
        assert!(dockerfile.contains(target) && dockerfile.contains("rustup target add"));
    }
    assert!(
        dockerfile.contains(
            "cargo zigbuild --release --locked --target \"$target\" -p pod-identity-agent --bin pod-identity-agent"
        )
    );
    assert!(
        image.split_whitespace().collect::<String>().contains(
            "\"zigbuild\",\"--release\",\"--target\",target,\"-p\",\"pod-identity-agent\",\"--bin\",\"pod-identity-agent\""
        )
    );
    // The runtime: what `cargo xtask image` puts in its layer and config.
    let entrypoint = constant(&image, "ENTRYPOINT");
    let ca = constant(&image, "CA_BUNDLE");
    assert_eq!(stages[1], "FROM scratch");
    for line in [
        format!("COPY --from=build /out/pod-identity-agent {entrypoint}"),
        format!("COPY --from=build {ca} {ca}"),
        format!("ENV {}={ca}", constant(&image, "CA_ENV")),
        format!("USER {}", constant(&image, "USER")),
        format!("ENTRYPOINT [\"{entrypoint}\"]"),
        format!("CMD [\"{}\"]", constant(&image, "CMD")),
    ] {
        assert!(
            dockerfile.lines().any(|l| l == line),
            "the Dockerfile lacks `{line}`"
        );
    }
}

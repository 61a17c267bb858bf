//! `--credential-source sts` manifests: the `sts` overlay renders, passes the schemas of a
//! Kubernetes release with MutatingAdmissionPolicy, and configures the agent for STS; the agent's
//! associations and the admission policy's list name the same service accounts; the policy's CEL
//! injects what EKS's webhook does (tests/admission/check_policy.py, evaluated with cel-python).

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use pod_identity_e2e::agent::binary;

/// The newest release kubernetes-validate knows: MutatingAdmissionPolicy is GA (v1) from 1.36.
const KUBERNETES: &str = "1.37.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every document of a YAML stream, as JSON.
fn yaml_docs(yaml: &[u8]) -> Vec<serde_json::Value> {
    let mut python = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    python.stdin.take().unwrap().write_all(yaml).unwrap();
    let out = python.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `kubectl kustomize` of `dir`, validated with `kubernetes-validate --strict` for `version`;
/// every object must have been checked against a schema (PodMonitor, a CRD, excepted).
fn render(dir: &str, version: &str) -> Vec<serde_json::Value> {
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
        "pia-admission-{}-{}-{n}.yaml",
        std::process::id(),
        dir.replace('/', "-")
    ));
    std::fs::write(&file, &out.stdout).unwrap();
    let v = Command::new("kubernetes-validate")
        .args(["--strict", "-k", version])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (cargo xtask setup installs it)");
    let _ = std::fs::remove_file(&file);
    let report =
        String::from_utf8_lossy(&v.stdout).into_owned() + &String::from_utf8_lossy(&v.stderr);
    assert!(
        v.status.success(),
        "{dir} fails schema validation for Kubernetes {version}:\n{report}"
    );
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            line.contains("PodMonitor"),
            "{dir}: not checked against Kubernetes {version}: {line}"
        );
    }
    yaml_docs(&out.stdout)
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn args(docs: &[serde_json::Value]) -> Vec<String> {
    find(docs, "DaemonSet", "pod-identity-agent")["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn sts_overlay_runs_the_agent_with_sts_and_keeps_both_lists_in_step() {
    let docs = render("overlays/sts", KUBERNETES);
    let pod = &find(&docs, "DaemonSet", "pod-identity-agent")["spec"]["template"]["spec"];
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "the agent reads the JWKS with its own token"
    );
    assert!(
        pod.get("affinity").is_none(),
        "off EKS the DaemonSet runs on every node"
    );

    let a = args(&docs);
    for flag in [
        "--credential-source=sts",
        "--associations-file=/etc/pod-identity-agent/associations.yaml",
        "--jwks-url=https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)/openid/v1/jwks",
        "--jwks-token-file=/var/run/secrets/kubernetes.io/serviceaccount/token",
        "--jwks-ca-file=/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
    ] {
        assert!(a.contains(&flag.to_owned()), "{flag} missing: {a:?}");
    }
    assert!(
        a.iter().any(|x| x.starts_with("--token-issuer=https://")),
        "{a:?}"
    );

    // The associations: a ConfigMap of a fixed name (edited in place, no roll), mounted read-only.
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/etc/pod-identity-agent")
        .expect("associations mount");
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("associations volume");
    assert_eq!(volume["configMap"]["name"], "pod-identity-associations");
    let associations = find(&docs, "ConfigMap", "pod-identity-associations");
    assert_eq!(associations["metadata"]["namespace"], "kube-system");
    let config = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("pod-identity-agent-"))
        })
        .expect("agent ConfigMap");
    assert!(
        config["data"]["AWS_REGION"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "the region is configured"
    );

    // The admission policy, cluster-scoped, bound to the params ConfigMap the overlay ships.
    let policy = find(&docs, "MutatingAdmissionPolicy", "pod-identity-injection");
    let binding = find(
        &docs,
        "MutatingAdmissionPolicyBinding",
        "pod-identity-injection",
    );
    assert!(
        policy["metadata"].get("namespace").is_none()
            && binding["metadata"].get("namespace").is_none(),
        "cluster-scoped"
    );
    assert_eq!(binding["spec"]["policyName"], "pod-identity-injection");
    let reference = &binding["spec"]["paramRef"];
    let params = find(&docs, "ConfigMap", reference["name"].as_str().unwrap());
    assert_eq!(params["metadata"]["namespace"], reference["namespace"]);

    // Same service accounts in both: `namespace.serviceAccount` -> role.
    let file = associations["data"]["associations.yaml"]
        .as_str()
        .expect("associations.yaml key");
    let from_file: BTreeMap<String, String> = yaml_docs(file.as_bytes())[0]["associations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                format!(
                    "{}.{}",
                    e["namespace"].as_str().unwrap(),
                    e["serviceAccount"].as_str().unwrap()
                ),
                e["roleArn"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let listed: BTreeMap<String, String> = params["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    assert!(!from_file.is_empty());
    assert_eq!(
        from_file, listed,
        "associations.yaml and pod-identity-injection.yaml disagree"
    );
}

#[test]
fn sts_overlay_flags_are_ones_the_agent_accepts() {
    let help = Command::new(binary())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args(&render("overlays/sts", KUBERNETES)).iter().skip(1) {
        let name = flag.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")),
            "unknown flag {name}"
        );
    }
}

#[test]
fn admission_policy_validates_in_each_api_version() {
    for (dir, version, api) in [
        ("admission", KUBERNETES, "admissionregistration.k8s.io/v1"),
        (
            "admission/v1beta1",
            "1.35.0",
            "admissionregistration.k8s.io/v1beta1",
        ),
        (
            "admission/v1alpha1",
            "1.33.0",
            "admissionregistration.k8s.io/v1alpha1",
        ),
    ] {
        let docs = render(dir, version);
        let kinds: Vec<(&str, &str)> = docs
            .iter()
            .map(|d| {
                (
                    d["kind"].as_str().unwrap(),
                    d["apiVersion"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("MutatingAdmissionPolicy", api),
                ("MutatingAdmissionPolicyBinding", api)
            ],
            "{dir}"
        );
    }
}

#[test]
fn admission_policy_cel_injects_what_eks_does() {
    let out = Command::new("python3")
        .arg("tests/admission/check_policy.py")
        .current_dir(repo())
        .output()
        .expect("python3");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check_policy.py (needs cel-python):\n{report}"
    );
    assert!(report.contains("checks passed"), "{report}");
}

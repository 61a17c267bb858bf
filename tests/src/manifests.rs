//! The deploy manifests as a cluster would get them: rendered with `kubectl kustomize`, and the
//! DaemonSet's container environment filled in as the kubelet fills it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The documents of a kustomize directory (`deploy/kubernetes/base`, an overlay), as JSON.
pub fn render(dir: &Path) -> Vec<Value> {
    let yaml = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl");
    assert!(
        yaml.status.success(),
        "{}",
        String::from_utf8_lossy(&yaml.stderr)
    );
    let out = Command::new("python3")
        .args(["-c", "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(&yaml.stdout)?;
            c.wait_with_output()
        })
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The rendered base DaemonSet and its ConfigMap's values.
pub fn base_daemonset() -> (Value, BTreeMap<String, String>) {
    daemonset("deploy/kubernetes/base")
}

/// The DaemonSet and its ConfigMap's values, rendered from `dir` (the base or an overlay,
/// relative to the repository).
pub fn daemonset(dir: &str) -> (Value, BTreeMap<String, String>) {
    let docs = render(&repo().join(dir));
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap()
        .clone();
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let data = cm["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    (ds, data)
}

/// The environment of `container` (a DaemonSet container) as the kubelet gives it: the
/// ConfigMap of its `envFrom`, its `env` with each `fieldRef` resolved from `field_refs` (keyed
/// by field path: `status.hostIP`, `spec.nodeName`), and `extra` (what the test's node provides
/// besides the manifest).
pub fn container_env(
    container: &Value,
    config_map: &BTreeMap<String, String>,
    field_refs: &BTreeMap<String, String>,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if container["envFrom"]
        .as_array()
        .is_some_and(|e| !e.is_empty())
    {
        env.extend(config_map.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap();
        let value = match e["value"].as_str() {
            Some(v) => v.to_owned(),
            None => {
                let path = e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_else(|| panic!("env {name}: neither a value nor a fieldRef"));
                field_refs
                    .get(path)
                    .unwrap_or_else(|| panic!("env {name}: the node has no {path}"))
                    .clone()
            }
        };
        env.push((name.to_owned(), value));
    }
    env.extend(extra.iter().cloned());
    env
}

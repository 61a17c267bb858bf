//! Pod specs turned into CRI requests as the kubelet turns them: the sandbox (namespaces, cgroup
//! parent, seccomp), and containers from the rendered DaemonSet (the agent) or from the shape of
//! a workload EKS Pod Identity has mutated (its env and projected token).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use k8s_cri::v1::{
    Capability, ContainerConfig, ContainerMetadata, DnsConfig, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, SecurityProfile, security_profile::ProfileType,
};
use serde_json::Value;

/// Where EKS mounts the projected token, and the variables its admission webhook injects.
pub const TOKEN_DIR: &str = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount";
pub const TOKEN_FILE: &str =
    "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token";
pub const FULL_URI_V4: &str = "http://169.254.170.23/v1/credentials";
pub const FULL_URI_V6: &str = "http://[fd00:ec2::23]/v1/credentials";

/// A pod as the kubelet knows it when it asks for a sandbox.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub host_network: bool,
    /// The QoS class's cgroup (`burstable`, `besteffort`); Guaranteed pods have none.
    pub qos: &'static str,
}

impl PodSpec {
    /// The sandbox config: the pod cgroup goes below `kubepods` (the kubelet's
    /// `<cgroup root>/kubepods`, an absolute cgroup path), as the cgroupfs driver names it.
    pub fn sandbox(&self, kubepods: &str, logs: &Path) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            // The kubelet leaves a hostNetwork pod's hostname empty: it has no UTS namespace of
            // its own, and runc refuses to set one.
            hostname: if self.host_network {
                String::new()
            } else {
                self.name.clone()
            },
            log_directory: logs.join(&self.uid).display().to_string(),
            // With a server given, containerd writes the pod's resolv.conf instead of copying the
            // node's; nothing here resolves names.
            dns_config: Some(DnsConfig {
                servers: vec!["198.18.0.53".into()],
                ..Default::default()
            }),
            labels: HashMap::from([
                ("io.kubernetes.pod.name".into(), self.name.clone()),
                ("io.kubernetes.pod.namespace".into(), self.namespace.clone()),
                ("io.kubernetes.pod.uid".into(), self.uid.clone()),
            ]),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("{kubepods}/{}/pod{}", self.qos, self.uid),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: if self.host_network {
                            NamespaceMode::Node
                        } else {
                            NamespaceMode::Pod
                        } as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    seccomp: Some(runtime_default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// `seccompProfile: RuntimeDefault`: containerd's own profile. (Leaving the field out would
/// mean unconfined to containerd 1.6; RuntimeDefault is the enum's zero, sent explicitly.)
fn runtime_default() -> SecurityProfile {
    SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    }
}

/// What a DaemonSet container is made of besides its manifest: its image and the values the
/// kubelet fills in.
pub struct FromManifest<'a> {
    /// The rendered DaemonSet.
    pub daemonset: &'a Value,
    pub image: &'a str,
    /// The container's environment, as [`pod_identity_e2e::manifests::container_env`] resolves it.
    pub env: Vec<(String, String)>,
    /// The test node's stand-in for each hostPath the manifest names (its cgroup tree, its bpffs
    /// directory); a hostPath with none is refused.
    pub host_paths: &'a BTreeMap<String, PathBuf>,
    /// The container's restart count.
    pub attempt: u32,
}

/// Whether the rendered DaemonSet asks for the node's network.
pub fn daemonset_host_network(ds: &Value) -> bool {
    ds["spec"]["template"]["spec"]["hostNetwork"]
        .as_bool()
        .unwrap_or(false)
}

/// The DaemonSet's (single) container as a CRI container config, field by field as the kubelet
/// translates it. A field the translation does not know fails the test rather than being
/// dropped: the manifest is what runs.
pub fn daemonset_container(m: &FromManifest<'_>) -> ContainerConfig {
    let pod = &m.daemonset["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "the DaemonSet has one container");
    let c = &containers[0];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|s| s.as_str().expect("a string").to_owned())
            .collect()
    };
    let name = c["name"].as_str().expect("container name");
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: m.attempt,
        }),
        image: Some(ImageSpec {
            image: m.image.into(),
            ..Default::default()
        }),
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        envs: m
            .env
            .iter()
            .map(|(key, value)| KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        mounts: volume_mounts(pod, c, m.host_paths),
        log_path: format!("{name}/{}.log", m.attempt),
        linux: Some(LinuxContainerConfig {
            resources: Some(resources(&c["resources"])),
            security_context: Some(security_context(&c["securityContext"])),
        }),
        ..Default::default()
    }
}

/// `volumeMounts` of hostPath volumes, with the test's stand-ins for the host paths.
fn volume_mounts(pod: &Value, c: &Value, host_paths: &BTreeMap<String, PathBuf>) -> Vec<Mount> {
    let volumes = pod["volumes"].as_array().expect("volumes");
    c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|vm| {
            let name = vm["name"].as_str().expect("volume name");
            let volume = volumes
                .iter()
                .find(|v| v["name"] == name)
                .expect("the mount's volume");
            let path = volume["hostPath"]["path"]
                .as_str()
                .unwrap_or_else(|| panic!("volume {name}: only hostPath volumes are translated"));
            let host = host_paths
                .get(path)
                .unwrap_or_else(|| panic!("no stand-in for hostPath {path}"));
            Mount {
                container_path: vm["mountPath"].as_str().expect("mountPath").into(),
                host_path: host.display().to_string(),
                readonly: vm["readOnly"].as_bool().unwrap_or(false),
                ..Default::default()
            }
        })
        .collect()
}

/// `resources` as the kubelet passes them: CPU shares from the request, the memory limit.
fn resources(r: &Value) -> LinuxContainerResources {
    let cpu = r["requests"]["cpu"].as_str().map_or(0.0, cpu_quantity);
    LinuxContainerResources {
        // The kubelet's milliCPUToShares: 1024 per CPU, at least 2.
        cpu_shares: ((cpu * 1024.0) as i64).max(2),
        cpu_period: 100_000,
        memory_limit_in_bytes: r["limits"]["memory"].as_str().map_or(0, byte_quantity),
        ..Default::default()
    }
}

fn cpu_quantity(q: &str) -> f64 {
    match q.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().expect("milli-CPU") / 1000.0,
        None => q.parse().expect("CPU"),
    }
}

fn byte_quantity(q: &str) -> i64 {
    let (number, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let scale = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("memory quantity unit {other:?} is not translated"),
    };
    number.parse::<i64>().expect("a byte count") * scale
}

/// The container's `securityContext`, with the kubelet's defaults for what it leaves out.
fn security_context(sc: &Value) -> LinuxContainerSecurityContext {
    let known = [
        "runAsUser",
        "runAsNonRoot",
        "seccompProfile",
        "privileged",
        "allowPrivilegeEscalation",
        "readOnlyRootFilesystem",
        "capabilities",
    ];
    for key in sc.as_object().expect("securityContext").keys() {
        assert!(
            known.contains(&key.as_str()),
            "securityContext.{key} is not translated"
        );
    }
    assert_eq!(
        sc["privileged"].as_bool(),
        Some(false),
        "the agent is not privileged"
    );
    assert_eq!(
        sc["seccompProfile"]["type"], "RuntimeDefault",
        "only RuntimeDefault is translated"
    );
    let caps = |key: &str| -> Vec<String> {
        sc["capabilities"][key]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c.as_str().expect("a capability").to_owned())
            .collect()
    };
    LinuxContainerSecurityContext {
        capabilities: Some(Capability {
            add_capabilities: caps("add"),
            drop_capabilities: caps("drop"),
            add_ambient_capabilities: Vec::new(),
        }),
        run_as_user: sc["runAsUser"].as_i64().map(|value| Int64Value { value }),
        readonly_rootfs: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
        no_new_privs: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
        seccomp: Some(runtime_default()),
        ..Default::default()
    }
}

/// A workload container as EKS Pod Identity's webhook leaves it: the credential variables, the
/// projected token's directory (`token_dir` on the node) mounted read-only. Its userland is the
/// node's `/usr` (and `python`, the directory of the tests' Python with boto3 and the AWS CLI,
/// when it lives elsewhere), under the workload image's symlinks; it runs as nobody, with no
/// capabilities, under RuntimeDefault.
pub fn workload_container(
    name: &str,
    attempt: u32,
    token_dir: &Path,
    python: &Path,
) -> ContainerConfig {
    let bind = |container: &Path, host: &Path| Mount {
        container_path: container.display().to_string(),
        host_path: host.display().to_string(),
        readonly: true,
        ..Default::default()
    };
    let mut mounts = vec![
        bind(Path::new("/usr"), Path::new("/usr")),
        bind(Path::new("/etc/ssl"), Path::new("/etc/ssl")),
        bind(Path::new(TOKEN_DIR), token_dir),
    ];
    if !python.starts_with("/usr") {
        mounts.push(bind(python, python));
    }
    let env = [
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", FULL_URI_V4.to_owned()),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            TOKEN_FILE.to_owned(),
        ),
        ("AWS_DEFAULT_REGION", pod_identity_e2e::REGION.to_owned()),
        (
            "PATH",
            format!("{}/bin:/usr/local/bin:/usr/bin:/bin", python.display()),
        ),
        ("HOME", "/tmp".to_owned()),
        ("PYTHONDONTWRITEBYTECODE", "1".to_owned()),
    ];
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt,
        }),
        image: Some(ImageSpec {
            image: crate::containerd::WORKLOAD_IMAGE.into(),
            ..Default::default()
        }),
        envs: env
            .into_iter()
            .map(|(key, value)| KeyValue {
                key: key.into(),
                value,
            })
            .collect(),
        mounts,
        log_path: format!("{name}/{attempt}.log"),
        linux: Some(LinuxContainerConfig {
            resources: None,
            security_context: Some(LinuxContainerSecurityContext {
                run_as_user: Some(Int64Value { value: 65534 }),
                no_new_privs: true,
                capabilities: Some(Capability {
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                }),
                seccomp: Some(runtime_default()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_read_as_the_kubelet_reads_them() {
        assert_eq!(cpu_quantity("10m"), 0.01);
        assert_eq!(cpu_quantity("2"), 2.0);
        assert_eq!(byte_quantity("128Mi"), 128 << 20);
        assert_eq!(byte_quantity("512"), 512);
        assert_eq!(
            resources(&serde_json::json!({"requests": {"cpu": "10m"}})).cpu_shares,
            10
        );
        assert_eq!(
            resources(&serde_json::json!({"requests": {"cpu": "1m"}})).cpu_shares,
            2
        );
    }
}

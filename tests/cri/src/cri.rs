//! The CRI, as the kubelet speaks it (runtime.v1 over containerd's socket), behind a blocking
//! API for the tests: run a pod sandbox, create and start its containers, exec in them, stop and
//! remove them.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ContainerConfig, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest,
    PodSandboxConfig, PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
    runtime_service_client::RuntimeServiceClient,
};
use tokio::{net::UnixStream, runtime::Runtime};
use tonic::transport::{Channel, Endpoint, Uri};

pub struct Cri {
    rt: Runtime,
    client: RuntimeServiceClient<Channel>,
}

/// What a command run in a container printed, and how it ended.
#[derive(Debug)]
pub struct Exec {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Cri {
    pub fn connect(socket: &Path) -> anyhow::Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let socket = socket.to_path_buf();
        let channel = rt.block_on(async move {
            // The URI is required and unused: every connection goes to the socket.
            Endpoint::try_from("http://[::]:50051")?
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(120))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }))
                .await
                .context("connecting to containerd's CRI")
        })?;
        Ok(Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        })
    }

    /// A pod sandbox: its namespaces, its cgroup parent, its network (CNI) unless hostNetwork.
    pub fn run_pod(&mut self, config: &PodSandboxConfig) -> anyhow::Result<String> {
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let c = &mut self.client;
        Ok(self
            .rt
            .block_on(c.run_pod_sandbox(request))
            .context("RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id)
    }

    /// The pod's IPv4 address, and its others.
    pub fn pod_ips(&mut self, sandbox: &str) -> anyhow::Result<(String, Vec<String>)> {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.to_owned(),
            verbose: false,
        };
        let c = &mut self.client;
        let status = self
            .rt
            .block_on(c.pod_sandbox_status(request))?
            .into_inner();
        let network = status
            .status
            .and_then(|s| s.network)
            .context("no network status")?;
        Ok((
            network.ip,
            network.additional_ips.into_iter().map(|i| i.ip).collect(),
        ))
    }

    /// Creates and starts a container in `sandbox`.
    pub fn start(
        &mut self,
        sandbox: &str,
        pod: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> anyhow::Result<String> {
        let request = CreateContainerRequest {
            pod_sandbox_id: sandbox.to_owned(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        };
        let c = &mut self.client;
        let id = self
            .rt
            .block_on(c.create_container(request))
            .context("CreateContainer")?
            .into_inner()
            .container_id;
        let c = &mut self.client;
        self.rt
            .block_on(c.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .context("StartContainer")?;
        Ok(id)
    }

    /// Whether the container runs (CONTAINER_RUNNING).
    pub fn running(&mut self, container: &str) -> anyhow::Result<bool> {
        let request = ContainerStatusRequest {
            container_id: container.to_owned(),
            verbose: false,
        };
        let c = &mut self.client;
        let status = self.rt.block_on(c.container_status(request))?.into_inner();
        Ok(status.status.is_some_and(|s| s.state == 1))
    }

    /// Runs `cmd` in the container, as `kubectl exec` does.
    pub fn exec(&mut self, container: &str, cmd: &[&str]) -> anyhow::Result<Exec> {
        let request = ExecSyncRequest {
            container_id: container.to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 120,
        };
        let c = &mut self.client;
        let out = self
            .rt
            .block_on(c.exec_sync(request))
            .context("ExecSync")?
            .into_inner();
        Ok(Exec {
            code: out.exit_code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Stops (SIGTERM, then SIGKILL after `grace`) and removes a container.
    pub fn remove_container(&mut self, container: &str, grace: Duration) -> anyhow::Result<()> {
        let stop = StopContainerRequest {
            container_id: container.to_owned(),
            timeout: grace.as_secs() as i64,
        };
        let c = &mut self.client;
        self.rt
            .block_on(c.stop_container(stop))
            .context("StopContainer")?;
        let c = &mut self.client;
        self.rt
            .block_on(c.remove_container(RemoveContainerRequest {
                container_id: container.to_owned(),
            }))
            .context("RemoveContainer")?;
        Ok(())
    }

    /// Stops and removes a pod sandbox, as the kubelet does when a pod is deleted.
    pub fn remove_pod(&mut self, sandbox: &str) -> anyhow::Result<()> {
        let c = &mut self.client;
        self.rt
            .block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox.to_owned(),
            }))
            .context("StopPodSandbox")?;
        let c = &mut self.client;
        self.rt
            .block_on(c.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox.to_owned(),
            }))
            .context("RemovePodSandbox")?;
        Ok(())
    }
}

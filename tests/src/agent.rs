//! The real agent binary, started inside a simulated node.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{CLUSTER, NODE_ACCESS_KEY, NODE_SECRET, REGION, fake_aws::FakeAws, node::Node};

/// Port of the credential listener in tests (the agent's default).
pub const PORT: u16 = 2704;
pub const PROBE_ADDR: &str = "127.0.0.1:2703";
pub const METRICS_ADDR: &str = "127.0.0.1:2705";

static NEXT_LOG: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Where the agent's own AWS credentials and region come from.
#[derive(Clone, Debug, Default)]
pub enum NodeAws {
    /// Static keys in the environment, and `--region` (the harness's default).
    #[default]
    StaticKeys,
    /// Nothing configured: the default chain finds IMDS, which also gives the region.
    Imds,
    /// A hybrid node: a shared credentials file and/or a config file (e.g. with a
    /// `credential_process`), and `--region`.
    Files {
        credentials: Option<PathBuf>,
        config: Option<PathBuf>,
    },
}

/// How to start the agent, beyond its arguments.
pub struct Launch<'a> {
    /// A command the agent runs under (setpriv, taskset, unshare ...).
    pub wrapper: &'a [&'a str],
    /// Another build of the agent.
    pub binary: Option<&'a std::path::Path>,
    pub aws: NodeAws,
    /// Pass `--eks-auth-endpoint` of the fake (else the SDK resolves the endpoint itself).
    pub endpoint: bool,
    /// More environment (after the harness's own).
    pub env: Vec<(String, String)>,
}

impl Default for Launch<'_> {
    fn default() -> Self {
        Launch {
            wrapper: &[],
            binary: None,
            aws: NodeAws::StaticKeys,
            endpoint: true,
            env: Vec::new(),
        }
    }
}

pub struct Agent {
    child: Option<Child>,
    netns: String,
    log_path: PathBuf,
    /// Its probe address: the harness's, unless the test gave `--probe-addr`.
    probe: SocketAddr,
}

/// The agent binary: `PIA_AGENT_BIN`, else next to this test executable's target directory.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PIA_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("pod-identity-agent");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "pod-identity-agent binary not found; build it first (cargo xtask test does) or set PIA_AGENT_BIN"
    );
}

impl Agent {
    /// Starts the agent in `node` (its network namespace and own cgroup) against `fake`, with
    /// `extra` arguments appended, and waits until /readyz says ready.
    pub fn start(node: &Node, fake: &FakeAws, extra: &[&str]) -> Agent {
        let mut agent = Agent::spawn(node, fake, extra);
        agent.wait_ready(node);
        agent
    }

    /// Starts the agent without waiting for readiness.
    pub fn spawn(node: &Node, fake: &FakeAws, extra: &[&str]) -> Agent {
        Agent::spawn_wrapped(node, fake, extra, &[])
    }

    /// Starts the agent and waits for readiness; it runs under `wrapper` (e.g. setpriv with a
    /// reduced set of capabilities).
    pub fn start_wrapped(node: &Node, fake: &FakeAws, extra: &[&str], wrapper: &[&str]) -> Agent {
        let mut agent = Agent::spawn_wrapped(node, fake, extra, wrapper);
        agent.wait_ready(node);
        agent
    }

    /// Starts `wrapper... agent run ...` without waiting. The harness passes the node's cgroup
    /// root and listen addresses unless `extra` gives its own.
    pub fn spawn_wrapped(node: &Node, fake: &FakeAws, extra: &[&str], wrapper: &[&str]) -> Agent {
        Agent::launch(
            node,
            fake,
            extra,
            &Launch {
                wrapper,
                ..Launch::default()
            },
        )
    }

    /// Starts another build of the agent (e.g. the bench's allocation-counting one) under
    /// `wrapper`, and waits for readiness.
    pub fn start_binary(
        node: &Node,
        fake: &FakeAws,
        extra: &[&str],
        wrapper: &[&str],
        binary: &std::path::Path,
    ) -> Agent {
        let mut agent = Agent::launch(
            node,
            fake,
            extra,
            &Launch {
                wrapper,
                binary: Some(binary),
                ..Launch::default()
            },
        );
        agent.wait_ready(node);
        agent
    }

    /// Starts the agent as `launch` describes, without waiting for readiness.
    pub fn launch(node: &Node, fake: &FakeAws, extra: &[&str], launch: &Launch<'_>) -> Agent {
        let [listen4, listen6] = node.listen_addrs(PORT);
        let log_path = std::env::temp_dir().join(format!(
            "{}-agent-{}.log",
            node.netns,
            NEXT_LOG.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let log = fs::File::create(&log_path).expect("create agent log");
        crate::secrets::remember(NODE_SECRET);
        let default_binary = binary();
        let binary = launch.binary.unwrap_or(&default_binary);
        let (program, prefix) = match launch.wrapper.split_first() {
            Some((first, rest)) => (*first, rest.to_vec()),
            None => (binary.to_str().unwrap(), Vec::new()),
        };
        let mut command = node.command(program, Some(&node.agent_cgroup));
        command.args(prefix);
        if !launch.wrapper.is_empty() {
            command.arg(binary);
        }
        command.args(["run", "--cluster-name", CLUSTER]);
        // The node's defaults, each unless `extra` gives that flag itself.
        let cgroup_root = node.cgroup_root.to_str().unwrap().to_owned();
        let mut defaults: Vec<(&str, Vec<String>)> = vec![
            ("--cgroup-root", vec![cgroup_root]),
            ("--listen", vec![listen4.to_string(), listen6.to_string()]),
            ("--probe-addr", vec![PROBE_ADDR.to_owned()]),
            ("--metrics-addr", vec![METRICS_ADDR.to_owned()]),
        ];
        if launch.endpoint {
            defaults.push(("--eks-auth-endpoint", vec![fake.endpoint()]));
        }
        if !matches!(launch.aws, NodeAws::Imds) {
            // Everywhere but on EC2 the region is configured.
            defaults.push(("--region", vec![REGION.to_owned()]));
        }
        for (flag, values) in &defaults {
            if !extra.contains(flag) {
                for value in values {
                    command.args([flag, value.as_str()]);
                }
            }
        }
        command.args(extra);
        // Nothing of this machine's AWS or TLS configuration may leak in.
        for var in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_EKS_AUTH",
            "AWS_ENDPOINT_URL_STS",
            "AWS_USE_FIPS_ENDPOINT",
            "AWS_CA_BUNDLE",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "NO_PROXY",
            "no_proxy",
            "ALL_PROXY",
        ] {
            command.env_remove(var);
        }
        command
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        match &launch.aws {
            // The node's own credentials sign the EKS Auth calls.
            NodeAws::StaticKeys => {
                command
                    .env("AWS_ACCESS_KEY_ID", NODE_ACCESS_KEY)
                    .env("AWS_SECRET_ACCESS_KEY", NODE_SECRET);
            }
            NodeAws::Imds => {
                command.env_remove("AWS_EC2_METADATA_DISABLED");
            }
            NodeAws::Files {
                credentials,
                config,
            } => {
                if let Some(file) = credentials {
                    command.env("AWS_SHARED_CREDENTIALS_FILE", file);
                }
                if let Some(file) = config {
                    command.env("AWS_CONFIG_FILE", file);
                }
            }
        }
        for (k, v) in &launch.env {
            command.env(k, v);
        }
        let child = command
            // Our own debug lines are on, so the secret scan at drop covers them too.
            .env(
                "RUST_LOG",
                std::env::var("PIA_AGENT_LOG")
                    .unwrap_or_else(|_| "info,pod_identity_agent=debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agent");
        let probe = extra
            .iter()
            .position(|a| *a == "--probe-addr")
            .and_then(|i| extra.get(i + 1))
            .unwrap_or(&PROBE_ADDR)
            .parse()
            .expect("--probe-addr IP:PORT");
        Agent {
            child: Some(child),
            netns: node.netns.clone(),
            log_path,
            probe,
        }
    }

    pub fn wait_ready(&mut self, node: &Node) {
        self.wait_ready_for(node, crate::patient(Duration::from_secs(30)));
    }

    /// Waits for readiness up to `timeout` (an agent under valgrind starts in minutes).
    pub fn wait_ready_for(&mut self, node: &Node, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = node.http_get(self.probe, "/readyz") {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "agent exited with {status} before it was ready; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// Everything the agent wrote to stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `pod-identity-agent pods` run in the node, as an operator would through `kubectl exec`.
    pub fn pods_cli(&self, args: &[&str]) -> String {
        let out = crate::node::command_in(binary().to_str().unwrap(), None, &self.netns)
            .args(["pods", "--addr", PROBE_ADDR])
            .args(args)
            .output()
            .expect("run pods");
        assert!(
            out.status.success(),
            "pods failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The rows of `/v1/pods`.
    pub fn pods_json(&self) -> Vec<serde_json::Value> {
        let (status, body) =
            crate::node::http_get(&self.netns, PROBE_ADDR.parse().unwrap(), "/v1/pods")
                .expect("read /v1/pods");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("/v1/pods is JSON")
    }

    pub fn metrics(&self) -> String {
        let (status, body) =
            crate::node::http_get(&self.netns, METRICS_ADDR.parse().unwrap(), "/metrics")
                .expect("scrape metrics");
        assert_eq!(status, 200);
        body
    }

    /// Sends SIGTERM and waits for the exit status (at most 30 s).
    pub fn stop(&mut self) -> ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(30))
    }

    /// Waits for the agent to exit (on its own, e.g. after a start-up failure, or after SIGTERM).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        let timeout = crate::patient(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait agent") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "agent still running after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = self.log();
        let _ = fs::remove_file(&self.log_path);
        if std::thread::panicking() {
            eprintln!("--- agent log ({}) ---\n{log}", self.log_path.display());
        } else if let Some(secret) = crate::secrets::leaked_in(&log) {
            panic!("the agent's log contains a secret ({secret}); nothing secret may be logged");
        }
    }
}

/// What a run of the agent's CLI printed, and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Panics with everything printed unless the command exited 0.
    pub fn ok(self) -> CliOutput {
        assert_eq!(
            self.code, 0,
            "command failed:\n{}{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Whose AWS credentials a CLI run carries.
#[derive(Clone, Copy, Debug)]
pub enum Caller {
    /// An operator on a laptop (`associations`).
    Operator,
    /// The node itself (`doctor` on the node or in the agent's pod).
    Node,
    /// No credentials at all.
    Nobody,
}

/// `pod-identity-agent ARGS` in `node`'s network namespace and `cgroup` (or the test's own),
/// reaching `fake` for every AWS API through the standard `AWS_ENDPOINT_URL_*` variables, with
/// `caller`'s credentials and nothing else of this machine's AWS configuration.
pub fn cli(
    node: &Node,
    cgroup: Option<&std::path::Path>,
    fake: &FakeAws,
    caller: Caller,
    args: &[&str],
) -> CliOutput {
    cli_wrapped(node, cgroup, fake, caller, &[], args)
}

/// Like [`cli`], run under `wrapper` (e.g. setpriv with fewer privileges).
pub fn cli_wrapped(
    node: &Node,
    cgroup: Option<&std::path::Path>,
    fake: &FakeAws,
    caller: Caller,
    wrapper: &[&str],
    args: &[&str],
) -> CliOutput {
    run_cli(node, cgroup, fake, caller, wrapper, args, None)
}

/// Like [`cli`], with `stdin` as the command's standard input.
pub fn cli_with_stdin(
    node: &Node,
    fake: &FakeAws,
    caller: Caller,
    args: &[&str],
    stdin: &str,
) -> CliOutput {
    run_cli(node, None, fake, caller, &[], args, Some(stdin))
}

fn run_cli(
    node: &Node,
    cgroup: Option<&std::path::Path>,
    fake: &FakeAws,
    caller: Caller,
    wrapper: &[&str],
    args: &[&str],
    stdin: Option<&str>,
) -> CliOutput {
    crate::secrets::remember(NODE_SECRET);
    crate::secrets::remember(crate::OPERATOR_SECRET);
    let binary = binary();
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = node.command(first, cgroup);
            c.args(rest).arg(&binary);
            c
        }
        None => node.command(binary.to_str().unwrap(), cgroup),
    };
    command
        .args(args)
        .env("AWS_ENDPOINT_URL_EKS", fake.endpoint())
        .env("AWS_ENDPOINT_URL_EKS_AUTH", fake.endpoint())
        .env("AWS_ENDPOINT_URL_STS", fake.endpoint())
        .env("AWS_REGION", REGION)
        .env("CLUSTER_NAME", CLUSTER)
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE");
    match caller {
        Caller::Operator => command
            .env("AWS_ACCESS_KEY_ID", crate::OPERATOR_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", crate::OPERATOR_SECRET),
        Caller::Node => command
            .env("AWS_ACCESS_KEY_ID", NODE_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", NODE_SECRET),
        Caller::Nobody => command
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY"),
    };
    let out = match stdin {
        None => command.output().expect("run the agent's CLI"),
        Some(input) => {
            use std::io::Write as _;
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run the agent's CLI");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
            child.wait_with_output().expect("wait for the agent's CLI")
        }
    };
    let output = CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if let Some(secret) = crate::secrets::leaked_in(&format!("{}{}", output.stdout, output.stderr))
    {
        panic!(
            "`pod-identity-agent {}` printed a secret ({secret})",
            args.join(" ")
        );
    }
    output
}

//! The real agent binary, started inside a simulated node.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::{CLUSTER, REGION, fake_eks_auth::FakeEksAuth, node::Node};

/// Port of the credential listener in tests (the agent's default).
pub const PORT: u16 = 2704;
pub const PROBE_ADDR: &str = "127.0.0.1:2703";
pub const METRICS_ADDR: &str = "127.0.0.1:2705";
/// The node's own secret key (signs EKS Auth calls); must never be logged either.
const NODE_SECRET: &str = "node-secret-example-0123456789abcdef";

static NEXT_LOG: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

pub struct Agent {
    child: Option<Child>,
    netns: String,
    log_path: PathBuf,
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
    panic!("pod-identity-agent binary not found; build it first (cargo xtask test does) or set PIA_AGENT_BIN");
}

impl Agent {
    /// Starts the agent in `node` (its network namespace and own cgroup) against `fake`, with
    /// `extra` arguments appended, and waits until /readyz says ready.
    pub fn start(node: &Node, fake: &FakeEksAuth, extra: &[&str]) -> Agent {
        let mut agent = Agent::spawn(node, fake, extra);
        agent.wait_ready(node);
        agent
    }

    /// Starts the agent without waiting for readiness.
    pub fn spawn(node: &Node, fake: &FakeEksAuth, extra: &[&str]) -> Agent {
        Agent::spawn_wrapped(node, fake, extra, &[])
    }

    /// Starts the agent and waits for readiness; it runs under `wrapper` (e.g. setpriv with a
    /// reduced set of capabilities).
    pub fn start_wrapped(node: &Node, fake: &FakeEksAuth, extra: &[&str], wrapper: &[&str]) -> Agent {
        let mut agent = Agent::spawn_wrapped(node, fake, extra, wrapper);
        agent.wait_ready(node);
        agent
    }

    /// Starts `wrapper... agent run ...` without waiting. The harness passes the node's cgroup
    /// root and listen addresses unless `extra` gives its own.
    pub fn spawn_wrapped(node: &Node, fake: &FakeEksAuth, extra: &[&str], wrapper: &[&str]) -> Agent {
        let [listen4, listen6] = node.listen_addrs(PORT);
        let log_path = std::env::temp_dir().join(format!("{}-agent-{}.log", node.netns, NEXT_LOG.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
        let log = fs::File::create(&log_path).expect("create agent log");
        crate::secrets::remember(NODE_SECRET);
        let binary = binary();
        let (program, prefix) = match wrapper.split_first() {
            Some((first, rest)) => (*first, rest.to_vec()),
            None => (binary.to_str().unwrap(), Vec::new()),
        };
        let mut command = node.command(program, Some(&node.agent_cgroup));
        command.args(prefix);
        if !wrapper.is_empty() {
            command.arg(&binary);
        }
        command.args(["run", "--cluster-name", CLUSTER, "--region", REGION]);
        // The node's defaults, each unless `extra` gives that flag itself.
        let cgroup_root = node.cgroup_root.to_str().unwrap().to_owned();
        let defaults: [(&str, Vec<String>); 4] = [
            ("--cgroup-root", vec![cgroup_root]),
            ("--listen", vec![listen4.to_string(), listen6.to_string()]),
            ("--probe-addr", vec![PROBE_ADDR.to_owned()]),
            ("--metrics-addr", vec![METRICS_ADDR.to_owned()]),
        ];
        for (flag, values) in &defaults {
            if !extra.contains(flag) {
                for value in values {
                    command.args([flag, value.as_str()]);
                }
            }
        }
        let child = command
            .args(["--eks-auth-endpoint", &fake.endpoint()])
            .args(extra)
            // The node's own credentials sign the EKS Auth calls; nothing else of this machine's
            // AWS configuration may leak in.
            .env("AWS_ACCESS_KEY_ID", "AKIDNODEEXAMPLE")
            .env("AWS_SECRET_ACCESS_KEY", NODE_SECRET)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL_EKS_AUTH")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            // Our own debug lines are on, so the secret scan at drop covers them too.
            .env("RUST_LOG", std::env::var("PIA_AGENT_LOG").unwrap_or_else(|_| "info,pod_identity_agent=debug".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agent");
        Agent { child: Some(child), netns: node.netns.clone(), log_path }
    }

    pub fn wait_ready(&mut self, node: &Node) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe: SocketAddr = PROBE_ADDR.parse().unwrap();
        loop {
            if let Ok((200, _)) = node.http_get(probe, "/readyz") {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("agent exited with {status} before it was ready; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "agent not ready after 30 s; log:\n{}", self.log());
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
        assert!(out.status.success(), "pods failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn metrics(&self) -> String {
        let (status, body) = crate::node::http_get(&self.netns, METRICS_ADDR.parse().unwrap(), "/metrics").expect("scrape metrics");
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
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait agent") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent still running after {timeout:?}; log:\n{}", self.log());
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

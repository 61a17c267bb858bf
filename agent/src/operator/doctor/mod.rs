//! `pod-identity-agent doctor`: checks a node's set-up end to end, on the node or in the agent's
//! pod. Each check prints `ok`, `warn` or `fail` with what it found and, when it is not ok, one
//! sentence on how to fix it. Any `fail` makes the exit status non-zero.
//!
//! What the running agent reports about itself (`/v1/agent` on its probe address) fills in what
//! the flags do not give, so `kubectl exec ... -- pod-identity-agent doctor` needs no flags.

mod sessions;

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use clap::Args;
use pod_identity_common::names;

use super::eks::{ClusterArgs, Eks};
use crate::{
    attribution,
    aws::{self, ApiErrorKind},
    eks_auth::{EksAuth, EksAuthOptions},
    kernel,
    ops::AgentInfo,
    upstream::Upstream as _,
};

/// The stock add-on that serves the same addresses.
const STOCK_ADDON: &str = "eks-pod-identity-agent";
/// Sent to EKS Auth to prove the path works without a pod's token: it must come back refused as
/// an invalid token, which EKS Auth only says after it has checked the signature and the caller's
/// permission.
const PROBE_TOKEN: &str = "pod-identity-agent-doctor.invalid.token";

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The running agent's probe address.
    #[arg(long, default_value = "127.0.0.1:2703")]
    pub probe_addr: SocketAddr,
    /// EKS cluster name (default: CLUSTER_NAME, else what the running agent reports).
    #[arg(long, env = "CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// AWS region (default: the running agent's, else the AWS SDK chain).
    #[arg(long)]
    pub region: Option<String>,
    /// EKS Auth endpoint URL (default: the running agent's, else AWS_ENDPOINT_URL_EKS_AUTH or the
    /// regional endpoint).
    #[arg(long, value_name = "URL")]
    pub eks_auth_endpoint: Option<String>,
    /// EKS API endpoint URL for the cluster and add-on checks (default: AWS_ENDPOINT_URL_EKS, else
    /// the regional endpoint).
    #[arg(long, value_name = "URL")]
    pub eks_endpoint: Option<String>,
    /// Use the FIPS endpoints.
    #[arg(long)]
    pub fips: bool,
    /// cgroup2 directory where the agent attaches (default: the running agent's, else the cgroup2
    /// mount).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's verdict.
#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// How to fix it, when not ok.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn print(&self) {
        let status = match self.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        };
        println!(
            "{status:<5} {:<17} {}",
            self.name,
            super::printable(&self.detail)
        );
        if let Some(fix) = &self.fix {
            println!("{:<23} fix: {}", "", super::printable(fix));
        }
        let _ = std::io::stdout().flush();
    }
}

/// An error's message with the detail only the log is told: the doctor runs for the operator.
fn full_message(e: &crate::upstream::UpstreamError) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.message()),
        None => e.message().to_owned(),
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let failed = runtime.block_on(async move {
        let mut failed = false;
        let mut report = |check: Check| {
            check.print();
            failed |= check.status == Status::Fail;
        };
        check_all(&args, &mut report).await;
        failed
    });
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs every check in order, handing each verdict to `report` as soon as it is known.
pub async fn check_all(args: &DoctorArgs, report: &mut dyn FnMut(Check)) {
    let agent = check_node(args, report).await;
    let credentials_found = check_node_credentials(
        args.region
            .as_deref()
            .or_else(|| agent.as_ref().and_then(|a| a.region.as_deref())),
        report,
    )
    .await;
    if agent.as_ref().is_some_and(|a| a.credential_source == "sts") {
        // Off EKS: no EKS Auth, no cluster or add-on to ask EKS about; the node's STS identity
        // is what every association role must trust.
        let region = args
            .region
            .clone()
            .or_else(|| agent.as_ref().and_then(|a| a.region.clone()));
        report(if credentials_found {
            check_sts(region).await
        } else {
            Check::fail(
                "STS",
                "not tried: no node credentials to sign with",
                "fix the node credentials first",
            )
        });
        if let Some(agent) = &agent {
            report(sessions::check_sts(agent, args.probe_addr));
        }
        return;
    }
    check_eks(args, agent.as_ref(), credentials_found, report).await;
}

/// The node-local checks: the cgroup root, the kernel, and the running agent with its
/// listeners, redirect and metrics. Returns the agent's account of itself, when it answered.
async fn check_node(args: &DoctorArgs, report: &mut dyn FnMut(Check)) -> Option<AgentInfo> {
    let agent = running_agent(args.probe_addr);
    let cgroup_root = args
        .cgroup_root
        .clone()
        .or_else(|| agent.as_ref().ok().and_then(|a| a.cgroup_root.clone()));
    let mount = attribution::cgroup2_mount(cgroup_root.as_deref()).ok();
    let cgroup_root = cgroup_root.or_else(|| mount.clone());
    report(check_cgroup_root(cgroup_root.as_deref()));
    report(check_kernel(cgroup_root.as_deref(), agent.as_ref().ok()).await);
    match agent {
        Ok(agent) => {
            report(Check::ok(
                "agent",
                format!(
                    "{}: ready, {} mode, credentials from {}, version {}",
                    args.probe_addr, agent.mode, agent.credential_source, agent.version
                ),
            ));
            report(check_listeners(&agent));
            report(check_redirect(&agent, mount.as_deref()));
            report(check_metrics(&agent));
            report(check_imds(&agent, args.probe_addr));
            Some(agent)
        }
        Err(check) => {
            report(check);
            None
        }
    }
}

/// EKS Auth with an invalid token, then the cluster and the add-on (EKS API).
async fn check_eks(
    args: &DoctorArgs,
    agent: Option<&AgentInfo>,
    credentials_found: bool,
    report: &mut dyn FnMut(Check),
) {
    let Some(cluster) = args
        .cluster_name
        .clone()
        .or_else(|| agent.map(|a| a.cluster_name.clone()))
        .filter(|c| !c.is_empty())
    else {
        report(Check::fail(
            "EKS Auth",
            "no cluster name to ask about",
            "pass --cluster-name or set CLUSTER_NAME",
        ));
        return;
    };
    let region = args
        .region
        .clone()
        .or_else(|| agent.and_then(|a| a.region.clone()));
    let fips = args.fips || agent.is_some_and(|a| a.fips);
    let endpoint = args
        .eks_auth_endpoint
        .clone()
        .or_else(|| agent.and_then(|a| a.eks_auth_endpoint.clone()));
    report(if credentials_found {
        check_eks_auth(&cluster, region.clone(), endpoint, fips).await
    } else {
        Check::fail(
            "EKS Auth",
            "not tried: no node credentials to sign with",
            "fix the node credentials first",
        )
    });
    let cluster = ClusterArgs {
        cluster_name: Some(cluster),
        region,
        eks_endpoint: args.eks_endpoint.clone(),
    };
    match Eks::connect(&cluster, "pod-identity-agent-doctor").await {
        Ok(eks) => {
            report(check_cluster(&eks).await);
            report(check_addon(&eks).await);
            if agent.is_some() {
                report(sessions::check_eks(&eks, args.probe_addr).await);
            }
        }
        Err(e) => report(Check::warn(
            "cluster",
            format!("cannot build an EKS client: {e:#}"),
            "set a region (--region or AWS_REGION)",
        )),
    }
}

/// The running agent's own account of itself, if it is alive and ready; else the failed check
/// that says what is wrong.
fn running_agent(probe: SocketAddr) -> Result<AgentInfo, Check> {
    const NAME: &str = "agent";
    match super::http_get(probe, "/healthz") {
        Ok((200, _)) => {}
        other => {
            return Err(Check::fail(
                NAME,
                format!("no agent answers on {probe} ({})", describe(&other)),
                "start the agent (kubectl -n kube-system get pods -l app.kubernetes.io/name=pod-identity-agent), or pass --probe-addr",
            ));
        }
    }
    match super::http_get(probe, "/readyz") {
        Ok((200, _)) => {}
        other => {
            return Err(Check::fail(
                NAME,
                format!("{probe}: alive but {}", describe(&other)),
                "read the agent's log: it says why it is not ready",
            ));
        }
    }
    let info = super::http_get(probe, "/v1/agent").and_then(|(status, body)| {
        anyhow::ensure!(
            status == 200,
            "/v1/agent answered {status}: {}",
            body.trim()
        );
        Ok(serde_json::from_str::<AgentInfo>(&body)?)
    });
    info.map_err(|e| {
        Check::fail(
            NAME,
            format!("{probe}: cannot read /v1/agent: {e:#}"),
            "run a doctor of the same version as the agent",
        )
    })
}

fn check_cgroup_root(root: Option<&Path>) -> Check {
    const NAME: &str = "cgroup root";
    let Some(root) = root else {
        return Check::fail(
            NAME,
            "no cgroup2 filesystem is mounted",
            "the agent needs cgroup v2: boot the node with the unified hierarchy",
        );
    };
    match attribution::CgroupIndex::build(root, root).map(|index| (index.len(), index.pods())) {
        Ok((cgroups, pods)) => Check::ok(
            NAME,
            format!(
                "{} is readable: {cgroups} cgroups, {pods} pods",
                root.display()
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("cannot read {}: {e}", root.display()),
            "mount the host's /sys/fs/cgroup (read-only is enough) and pass it as --cgroup-root",
        ),
    }
}

/// Loads the programs and attaches them to a scratch cgroup, detached after; where no cgroup can
/// be created (a read-only mount in the agent's pod) it loads them only.
async fn check_kernel(root: Option<&Path>, agent: Option<&AgentInfo>) -> Check {
    const NAME: &str = "kernel programs";
    kernel::raise_memlock_limit();
    let scratch = root.map(|r| r.join(format!("pod-identity-doctor-{}", std::process::id())));
    let created = scratch
        .as_ref()
        .map(|dir| fs::create_dir(dir).map(|()| dir.clone()));
    let result = match &created {
        Some(Ok(dir)) => kernel::dry_run(Some(dir)),
        _ => kernel::dry_run(None),
    };
    if let Some(Ok(dir)) = &created {
        let _ = fs::remove_dir(dir);
    }
    match (result, created) {
        (Ok(()), Some(Ok(dir))) => Check::ok(
            NAME,
            format!(
                "connect4, connect6 and sock_ops load and attach (dry run on {}, detached)",
                dir.display()
            ),
        ),
        (Ok(()), other) => {
            let why = match other {
                Some(Err(e)) => format!("cannot create a scratch cgroup: {e}"),
                _ => "no cgroup root".to_owned(),
            };
            // Where nothing can be attached (the agent's container: a read-only cgroup mount),
            // the running agent's own attachments show that attaching works here.
            let cgroup_programs = [names::CONNECT4, names::CONNECT6, names::SOCK_OPS];
            if let (Some(root), Some(agent)) = (root, agent)
                && not_attached(agent, root, &cgroup_programs).is_empty()
            {
                return Check::ok(
                    NAME,
                    format!(
                        "connect4, connect6 and sock_ops load (the verifier accepts them), and the running agent's are attached at {}",
                        root.display()
                    ),
                );
            }
            Check::warn(
                NAME,
                format!(
                    "connect4, connect6 and sock_ops load (the verifier accepts them); attaching not tried: {why}"
                ),
                "run the doctor on the node as root to try attaching too",
            )
        }
        (Err(e), _) => Check::fail(
            NAME,
            format!("{e:#}"),
            "run the agent with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN on Linux >= 5.7 with cgroup v2, or use --mode link",
        ),
    }
}

/// A direct request to each credential listener: the agent must answer (a refusal is the right
/// answer, since a direct connection carries no kernel record or no token).
fn check_listeners(agent: &AgentInfo) -> Check {
    const NAME: &str = "listeners";
    if agent.listen.is_empty() {
        return Check::fail(
            NAME,
            "the agent reports no credential listener",
            "read the agent's log",
        );
    }
    if agent.mode == "ebpf" {
        return check_served_addresses(agent);
    }
    for addr in &agent.listen {
        match raw_get(*addr, &addr.to_string(), "/v1/credentials") {
            Ok((status, _)) if status == 400 || status == 403 => {}
            other => {
                return Check::fail(
                    NAME,
                    format!(
                        "the credential listener {addr} did not answer as the agent does ({})",
                        describe(&other)
                    ),
                    "check that nothing else holds the port",
                );
            }
        }
    }
    let answered: Vec<String> = agent.listen.iter().map(ToString::to_string).collect();
    Check::ok(NAME, format!("{} answer", answered.join(", ")))
}

/// eBPF mode: the kernel hands redirected connections to the agent's private sockets, and only
/// those; the served addresses themselves have no listener. Something listening there receives
/// nothing redirected, but is worth a look.
fn check_served_addresses(agent: &AgentInfo) -> Check {
    const NAME: &str = "listeners";
    let sockets: Vec<String> = agent.listen.iter().map(ToString::to_string).collect();
    for addr in &agent.serve {
        // Binding the address (with any port) succeeds only where it is the node's own.
        if std::net::TcpListener::bind((addr.ip(), 0)).is_err() {
            return Check::fail(
                NAME,
                format!(
                    "{addr}, where pods' connects are redirected, is not an address of this node: they cannot reach the agent"
                ),
                "check NODE_IP (the DaemonSet's status.hostIP) or --listen",
            );
        }
        if TcpStream::connect_timeout(addr, Duration::from_secs(2)).is_ok() {
            return Check::warn(
                NAME,
                format!(
                    "another process listens on {addr}, the address the agent serves; it receives no redirected connection (the kernel hands those to the agent's own sockets {})",
                    sockets.join(", ")
                ),
                format!("find it: ss -ltnp 'sport = :{}'", addr.port()),
            );
        }
    }
    let served: Vec<String> = agent.serve.iter().map(ToString::to_string).collect();
    Check::ok(
        NAME,
        format!(
            "connects redirected to {} are handed to the agent's sockets {}",
            served.join(", "),
            sockets.join(", ")
        ),
    )
}

fn check_redirect(agent: &AgentInfo, mount: Option<&Path>) -> Check {
    const NAME: &str = "redirect";
    let Some(target) = agent
        .intercept
        .iter()
        .find(|a| a.is_ipv4())
        .or(agent.intercept.first())
        .copied()
    else {
        return Check::warn(NAME, "the agent intercepts no address", "check --intercept");
    };
    if agent.mode != "ebpf" {
        return Check::warn(
            NAME,
            format!(
                "{} mode: connects are not redirected, the addresses are served on a local interface",
                agent.mode
            ),
            "eBPF mode attributes callers to pods; see the agent's log for why it fell back",
        );
    }
    let own = mount
        .and_then(|m| attribution::own_cgroup(m).ok())
        .map(|(_, id)| id);
    if own.is_some() && own == agent.cgroup_id {
        return redirect_attachments(agent);
    }
    let host = if target.port() == 80 {
        target.ip().to_string()
    } else {
        target.to_string()
    };
    match raw_get(target, &host, "/v1/credentials") {
        // A host process gets "belongs to no pod", a pod without a token "empty token": either
        // way the agent answered a connect to the credential address.
        Ok((status, body)) if status == 400 || status == 403 => Check::ok(
            NAME,
            format!(
                "a connect to {target} reached the agent ({status}: {})",
                first_sentence(&body)
            ),
        ),
        other => Check::fail(
            NAME,
            format!(
                "a connect to {target} did not reach the agent ({})",
                describe(&other)
            ),
            format!(
                "check that the programs are attached to a cgroup above this process: bpftool cgroup tree {}",
                agent
                    .cgroup_root
                    .as_deref()
                    .unwrap_or(Path::new("/sys/fs/cgroup"))
                    .display()
            ),
        ),
    }
}

/// The redirect, judged from the kernel's attachments: what the doctor can verify from the
/// agent's own cgroup (`kubectl exec` into the agent), whose connects are deliberately not
/// redirected, so a connect from here proves nothing.
fn redirect_attachments(agent: &AgentInfo) -> Check {
    const NAME: &str = "redirect";
    let root = agent
        .cgroup_root
        .as_deref()
        .unwrap_or(Path::new("/sys/fs/cgroup"));
    if agent.programs.is_empty() {
        return Check::warn(
            NAME,
            "not tried: the doctor runs in the agent's own cgroup, whose connects are deliberately not redirected, and the agent does not report its programs",
            "run the doctor on the node (or in any other pod) to test the redirect",
        );
    }
    let missing = not_attached(
        agent,
        root,
        &[names::CONNECT4, names::CONNECT6, names::SK_LOOKUP],
    );
    if missing.is_empty() {
        return Check::ok(
            NAME,
            format!(
                "connect4 and connect6 are attached at {} (above every pod) and steer at this network namespace; not tried from here: the doctor shares the agent's cgroup, whose connects are not redirected",
                root.display()
            ),
        );
    }
    Check::fail(
        NAME,
        format!(
            "{} not attached (connect4 and connect6 at {}, steer at the node's network namespace): pods' connects do not reach the agent",
            missing.join(", "),
            root.display()
        ),
        format!(
            "read the agent's log; bpftool cgroup tree {}",
            root.display()
        ),
    )
}

/// Which of `programs` the kernel does not show attached where the running agent's go: the
/// ids it reports against `BPF_PROG_QUERY` at the cgroup root and the network namespace.
fn not_attached<'a>(agent: &AgentInfo, root: &Path, programs: &[&'a str]) -> Vec<&'a str> {
    let attached = kernel::attached(root);
    programs
        .iter()
        .copied()
        .filter(|name| {
            let id = agent.programs.get(*name);
            !attached
                .get(name)
                .is_some_and(|ids| id.is_some_and(|id| ids.contains(id)))
        })
        .collect()
}

fn check_metrics(agent: &AgentInfo) -> Check {
    const NAME: &str = "metrics";
    let mut addr = agent.metrics_addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    match super::http_get(addr, "/metrics") {
        Ok((200, body)) if body.contains("pod_identity_agent_build_info") => Check::ok(
            NAME,
            format!(
                "{addr}/metrics answers ({} series)",
                body.lines().filter(|l| !l.starts_with('#')).count()
            ),
        ),
        other => Check::fail(
            NAME,
            format!(
                "{addr}/metrics did not answer with the agent's metrics ({})",
                describe(&other)
            ),
            "check --metrics-addr",
        ),
    }
}

/// The IMDS guard: on, and whether any pod still reaches for the node role's credentials.
fn check_imds(agent: &AgentInfo, probe: SocketAddr) -> Check {
    const NAME: &str = "IMDS guard";
    match agent.imds.as_str() {
        "off" => {
            return Check::ok(
                NAME,
                "off (--imds off): pods' connects to IMDS are neither counted nor refused",
            );
        }
        "audit" | "deny" => {}
        other => {
            return Check::warn(
                NAME,
                format!(
                    "{other}: pods that fall back to IMDS get the node role's credentials unnoticed"
                ),
                "run in eBPF mode (the connect programs count and refuse IMDS connects)",
            );
        }
    }
    let pods = match super::pods::fetch(probe) {
        Ok((_, pods)) => pods,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot read the pods' counts: {e:#}"),
                "read the agent's log",
            );
        }
    };
    let reaching: Vec<String> = pods
        .iter()
        .filter(|p| p.imds_connects > p.imds_denied)
        .map(|p| match p.pod.as_str() {
            "" => format!("uid {}", p.pod_uid),
            name => format!("{}/{name}", p.namespace),
        })
        .collect();
    let denied: u64 = pods.iter().map(|p| p.imds_denied).sum();
    let mode = agent.imds.as_str();
    if reaching.is_empty() {
        return Check::ok(
            NAME,
            format!(
                "{mode}: no pod has reached IMDS since it was first seen ({denied} connects refused)"
            ),
        );
    }
    Check::warn(
        NAME,
        format!(
            "{mode}: {} pods reached IMDS and so get the node role's credentials: {}",
            reaching.len(),
            super::printable(&reaching.join(", "))
        ),
        "give them an association (pod-identity-agent associations --pods shows how), then consider --imds deny",
    )
}

/// The node's own credentials, as the default chain finds them. Returns whether it found any.
async fn check_node_credentials(region: Option<&str>, report: &mut dyn FnMut(Check)) -> bool {
    let config = match aws::sdk_config(&aws::AwsOptions {
        region: region.map(str::to_owned),
        ..Default::default()
    })
    .await
    {
        Ok(c) => c,
        Err(e) => {
            report(Check::fail(
                "node credentials",
                format!("{e:#}"),
                "check the AWS configuration of the node",
            ));
            return false;
        }
    };
    match config.region() {
        Some(r) => report(Check::ok("region", r.to_string())),
        None => report(Check::fail(
            "region",
            "no region found (flags, AWS_REGION, the profile and IMDS have none)",
            "set AWS_REGION, or --region; on EC2 make sure IMDS answers",
        )),
    }
    const NAME: &str = "node credentials";
    let Some(provider) = config.credentials_provider() else {
        report(Check::fail(
            NAME,
            "no credential provider is configured",
            "give the node an instance role, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
        ));
        return false;
    };
    match aws_credential_types::provider::ProvideCredentials::provide_credentials(&provider).await {
        Ok(creds) => {
            let key = creds.access_key_id();
            let tail = &key[key.len().saturating_sub(4)..];
            let expiry = match creds
                .expiry()
                .and_then(|t| t.duration_since(SystemTime::now()).ok())
            {
                Some(left) => format!("expire in {}", human(left)),
                None if creds.expiry().is_some() => "expired".to_owned(),
                None => "do not expire".to_owned(),
            };
            report(Check::ok(
                NAME,
                format!(
                    "found through {}: access key ****{tail}, {expiry}",
                    aws::credential_source(&creds)
                ),
            ));
            true
        }
        Err(e) => {
            report(Check::fail(
                NAME,
                format!("none found: {}", aws::error_chain(Some(&e))),
                "give the node an instance role (IMDS), or on hybrid nodes a credentials file or credential_process profile",
            ));
            false
        }
    }
}

/// `sts:GetCallerIdentity` with the node's credentials: STS is reachable, and the identity it
/// names is the principal association roles must trust.
async fn check_sts(region: Option<String>) -> Check {
    const NAME: &str = "STS";
    let options = aws::AwsOptions {
        region,
        app_name: Some("pod-identity-agent-doctor".into()),
        sdk_retries: true,
        ..Default::default()
    };
    let config = match aws::sdk_config(&options).await {
        Ok(c) => c,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("{e:#}"),
                "check the AWS configuration of the node",
            );
        }
    };
    let client = aws_sdk_sts::Client::new(&config);
    match client.get_caller_identity().send().await {
        Ok(id) => Check::ok(
            NAME,
            format!(
                "reachable; the node signs as {}: every association role must trust it for sts:AssumeRole and sts:TagSession",
                id.arn().unwrap_or("an unnamed identity")
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            aws::api_error(e).to_string(),
            "check the node credentials, the region, and that STS is reachable (AWS_ENDPOINT_URL_STS, the proxy)",
        ),
    }
}

async fn check_eks_auth(
    cluster: &str,
    region: Option<String>,
    endpoint: Option<String>,
    fips: bool,
) -> Check {
    const NAME: &str = "EKS Auth";
    let client = match EksAuth::new(EksAuthOptions {
        cluster_name: cluster.to_owned(),
        region,
        endpoint,
        fips,
        node_name: Some("doctor".into()),
        // The probe's token is meant to reach EKS Auth, to be refused there.
        check: None,
    })
    .await
    {
        Ok(c) => c,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("{e:#}"),
                "check the AWS configuration of the node",
            );
        }
    };
    let result = client.assume_role(PROBE_TOKEN).await;
    let at = client
        .last_endpoint()
        .unwrap_or_else(|| "its endpoint".into());
    judge_eks_auth(result.map(drop), &at, cluster)
}

/// What EKS Auth's answer to the probe token says of the node's set-up.
fn judge_eks_auth(
    result: Result<(), crate::upstream::UpstreamError>,
    at: &str,
    cluster: &str,
) -> Check {
    const NAME: &str = "EKS Auth";
    match result {
        Ok(()) => Check::fail(
            NAME,
            format!("{at} accepted a deliberately invalid token"),
            "this is not EKS Auth: check --eks-auth-endpoint",
        ),
        Err(e) if e.code() == "InvalidTokenException" => Check::ok(
            NAME,
            format!(
                "{at} is reachable, signed requests are accepted and the node may call AssumeRoleForPodIdentity (a probe token came back InvalidTokenException)"
            ),
        ),
        Err(e) if e.code() == "AccessDeniedException" => Check::fail(
            NAME,
            format!("{at} refused the node: {e}"),
            "grant the node role eks-auth:AssumeRoleForPodIdentity (AmazonEKSWorkerNodePolicy includes it)",
        ),
        // The client has already told a refused signature from a refused token, and dropped the
        // node's credentials for a reload: these codes are its, not EKS Auth's.
        Err(e) if e.code() == "NodeCredentialsRejected" => Check::fail(
            NAME,
            format!("{at} rejected the node's credentials: {}", full_message(&e)),
            "the node credentials are invalid or expired: check the instance role or the credentials source",
        ),
        Err(e) if e.code() == "NodeCredentialsUnavailable" => Check::fail(
            NAME,
            format!("not tried: {}", full_message(&e)),
            "give the node an instance role, or credentials (see the node credentials check)",
        ),
        Err(e) if e.code() == "NodeRegionUnavailable" => Check::fail(
            NAME,
            format!("not tried: {}", full_message(&e)),
            "set AWS_REGION or --region",
        ),
        Err(e) if e.code() == "ResourceNotFoundException" => Check::fail(
            NAME,
            format!("{at} does not know cluster {cluster}: {e}"),
            "check CLUSTER_NAME and the region",
        ),
        Err(e) if e.status() == 502 || e.status() == 504 => Check::fail(
            NAME,
            format!("cannot reach {at}: {}", full_message(&e)),
            "check DNS, the proxy (HTTPS_PROXY, NO_PROXY), the CA bundle, and that the node may reach eks-auth (security groups, VPC endpoint)",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{at} answered {}: {e}", e.status()),
            "read the message; it is EKS Auth's own",
        ),
    }
}

async fn check_cluster(eks: &Eks) -> Check {
    const NAME: &str = "cluster";
    match eks.cluster().await {
        Ok(c) if c.status == "ACTIVE" => Check::ok(
            NAME,
            format!("{} is ACTIVE (Kubernetes {})", eks.cluster, c.version),
        ),
        Ok(c) => Check::fail(
            NAME,
            format!("{} is {}", eks.cluster, c.status),
            "wait for the cluster to become ACTIVE, or check CLUSTER_NAME",
        ),
        Err(e) => not_checked(NAME, &eks.cluster, e, "eks:DescribeCluster", || {
            Check::fail(
                NAME,
                format!(
                    "no cluster {} in {}",
                    eks.cluster,
                    eks.region.as_deref().unwrap_or("this region")
                ),
                "check CLUSTER_NAME and the region",
            )
        }),
    }
}

async fn check_addon(eks: &Eks) -> Check {
    const NAME: &str = "stock add-on";
    match eks.addon(STOCK_ADDON).await {
        Ok(None) => Check::ok(
            NAME,
            format!(
                "the {STOCK_ADDON} add-on is not installed in {}",
                eks.cluster
            ),
        ),
        Ok(Some(addon)) => Check::fail(
            NAME,
            format!(
                "the {STOCK_ADDON} add-on is installed ({}, {}): it serves the same addresses as this agent",
                addon.status, addon.version
            ),
            format!(
                "remove it: aws eks delete-addon --cluster-name {} --addon-name {STOCK_ADDON}",
                eks.cluster
            ),
        ),
        Err(e) => not_checked(NAME, &eks.cluster, e, "eks:DescribeAddon", || {
            Check::fail(
                NAME,
                format!("no cluster {}", eks.cluster),
                "check CLUSTER_NAME and the region",
            )
        }),
    }
}

/// A control-plane check the node may not be allowed to make: a warning, not a failure.
fn not_checked(
    name: &'static str,
    cluster: &str,
    e: aws::ApiError,
    action: &str,
    not_found: impl FnOnce() -> Check,
) -> Check {
    match (e.kind, e.code.as_str()) {
        (ApiErrorKind::Service, "AccessDeniedException") => Check::warn(
            name,
            format!("not checked: the caller may not call {action} on {cluster}"),
            format!("grant {action} to check this (optional)"),
        ),
        (ApiErrorKind::Service, "ResourceNotFoundException") => not_found(),
        _ => Check::warn(
            name,
            format!("not checked: {e}"),
            "check the node's access to the EKS API (optional)",
        ),
    }
}

/// GET with a chosen Host header, no Authorization: what a client without a token sends.
fn raw_get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP answer"))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn describe(result: &anyhow::Result<(u16, String)>) -> String {
    match result {
        Ok((status, body)) => format!("{status}: {}", first_sentence(body)),
        Err(e) => format!("{e:#}"),
    }
}

fn first_sentence(body: &str) -> String {
    let line = body.lines().next().unwrap_or("").trim();
    if line.len() > 120 {
        format!("{}...", &line[..line.floor_char_boundary(120)])
    } else {
        line.to_owned()
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        _ => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

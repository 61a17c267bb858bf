//! Command line and the defaults derived from the node.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::{
    cache::CacheSettings,
    issuer::{KeySource, TokenCheck},
    node_ip,
};

/// Port of the agent's credential listener when `--listen` is not given.
pub const DEFAULT_PORT: u16 = 2704;

/// How pods' connections reach the agent.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Kernel programs redirect connects and attribute each connection to its pod.
    Ebpf,
    /// The credential addresses on a local interface, token-only checks (the reference agent's
    /// way).
    Link,
    /// eBPF when the programs load and attach, else link mode (saying why).
    Auto,
}

/// Where pods' credentials come from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// EKS Auth `AssumeRoleForPodIdentity`: EKS verifies the token and holds the associations.
    EksAuth,
    /// Any cluster: the token verified here against the issuer's keys, associations from
    /// --associations-file, STS `AssumeRole` with EKS's session tags.
    Sts,
}

/// What the connect programs do with pods' connects to the instance metadata service.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImdsMode {
    /// Leave them alone: not counted, not refused.
    Off,
    /// Count them per pod (pods, /v1/pods, metrics, the log) and let them through.
    Audit,
    /// Count them, and refuse them (EPERM) from pods with a network namespace of their own;
    /// hostNetwork pods and node processes still reach IMDS.
    Deny,
}

impl ImdsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ImdsMode::Off => "off",
            ImdsMode::Audit => "audit",
            ImdsMode::Deny => "deny",
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// EKS cluster name sent to EKS Auth.
    #[arg(long, env = "CLUSTER_NAME")]
    pub cluster_name: String,
    /// AWS region of the cluster (default: the AWS SDK chain, e.g. AWS_REGION or IMDS).
    #[arg(long)]
    pub region: Option<String>,
    /// EKS Auth endpoint URL (default: AWS_ENDPOINT_URL_EKS_AUTH, else https://eks-auth.REGION.api.aws).
    #[arg(long)]
    pub eks_auth_endpoint: Option<String>,
    /// Address the agent serves credentials at; repeat for dual stack (default: NODE_IP, else
    /// the default-route interface's address, port 2704). In eBPF mode pods' connects are
    /// redirected here and handed to the agent's own sockets by the kernel, so nothing binds
    /// it and no other process can receive them.
    #[arg(long = "listen", value_name = "IP:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Where intercepted connects are sent, one per address family (default: the listen addresses).
    #[arg(long = "redirect-target", value_name = "IP:PORT")]
    pub redirect_target: Vec<SocketAddr>,
    /// Credential addresses whose TCP connects are redirected (an IPv4 address also matches its
    /// v4-mapped IPv6 form).
    #[arg(long = "intercept", value_name = "IP:PORT", default_values = ["169.254.170.23:80", "[fd00:ec2::23]:80"])]
    pub intercept: Vec<SocketAddr>,
    /// cgroup2 directory the programs attach to; it and all cgroups below are covered (default:
    /// the cgroup2 mount root from /proc/self/mountinfo).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Address of /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:2703")]
    pub probe_addr: SocketAddr,
    /// Address of /metrics.
    #[arg(long, default_value = "0.0.0.0:2705")]
    pub metrics_addr: SocketAddr,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 20)]
    pub shutdown_grace_seconds: u64,
    /// Most credentials kept in the cache; the least recently used go first.
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    pub max_cache_entries: usize,
    /// Deadline of one EKS Auth call, retries included (e.g. 5s, 1500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// During an EKS Auth outage, cached credentials are served while more than this is left.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub min_remaining: Duration,
    /// How long a terminal EKS Auth error (AccessDenied, ExpiredToken, InvalidToken,
    /// ResourceNotFound) is answered from memory for the same token.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub negative_ttl: Duration,
    /// Node-wide EKS Auth calls per second (sustained).
    #[arg(long, default_value_t = 10.0)]
    pub upstream_qps: f64,
    /// Node-wide EKS Auth calls allowed at once before --upstream-qps applies (a node's pods
    /// starting together).
    #[arg(long, default_value_t = 250)]
    pub upstream_burst: u32,
    /// Requests per second one pod may make (sustained); over it the pod gets 429.
    #[arg(long, default_value_t = 20.0)]
    pub pod_rps: f64,
    /// Requests one pod may make at once before --pod-rps applies (50 SDK processes starting
    /// together fit with room to spare).
    #[arg(long, default_value_t = 200)]
    pub pod_burst: u32,
    /// EKS Auth calls one pod's requests may start, per second sustained (coalesced waits and
    /// background refreshes are free): a pod needs about one per token.
    #[arg(long, default_value_t = 0.2)]
    pub pod_upstream_qps: f64,
    /// EKS Auth calls one pod's requests may start at once, before --pod-upstream-qps applies.
    #[arg(long, default_value_t = 5)]
    pub pod_upstream_burst: u32,
    /// Most open connections on the credential listeners; more are closed at accept.
    #[arg(long, default_value_t = 8192, value_parser = at_least_one)]
    pub max_connections: usize,
    /// Most open connections one pod may hold; more are closed at accept (eBPF mode).
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    pub max_connections_per_pod: usize,
    /// Use the FIPS endpoint of EKS Auth (also AWS_USE_FIPS_ENDPOINT=true).
    #[arg(long)]
    pub fips: bool,
    /// This node's name, sent in the User-Agent of EKS Auth calls.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Add per-pod series (namespace, pod labels) to /metrics. One series per pod and status
    /// code: for small clusters only.
    #[arg(long)]
    pub metrics_per_pod: bool,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or filter directives (e.g. `info`, `debug`, `info,pod_identity_agent::server=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// If --cgroup-root does not exist yet (kubelet creates kubepods.slice), wait this long for it,
    /// not ready meanwhile, before giving up.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub cgroup_root_wait: Duration,
    /// How pods' connections reach the agent.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// The IMDS guard (eBPF mode): pods' connects to the instance metadata service
    /// (169.254.169.254, [fd00:ec2::254], port 80), where the node role's credentials are.
    /// `audit` counts them per pod; `deny` also refuses them from pods with their own network
    /// namespace (hostNetwork pods and node processes always get through); `off` leaves them
    /// alone.
    #[arg(long, value_enum, env = "IMDS_MODE", default_value_t = ImdsMode::Audit)]
    pub imds: ImdsMode,
    /// Pin the programs' links and maps in this bpffs directory, so a restarted agent takes them
    /// over without a gap in interception (eBPF mode). Without it, exit leaves nothing attached.
    #[arg(long, value_name = "DIR")]
    pub pin: Option<PathBuf>,
    /// Where pods' credentials come from.
    #[arg(long, value_enum, default_value_t = SourceKind::EksAuth)]
    pub credential_source: SourceKind,
    /// sts: the associations (YAML: a list under `associations:` of namespace, serviceAccount,
    /// roleArn, targetRoleArn, tags), re-read when it changes.
    #[arg(long, value_name = "PATH")]
    pub associations_file: Option<PathBuf>,
    /// The service-account issuer's public keys (JWKS), re-read when it changes: tokens are
    /// verified locally (required with sts; with eks-auth a forged token then costs no call).
    #[arg(long, value_name = "PATH", conflicts_with = "jwks_url")]
    pub jwks_file: Option<PathBuf>,
    /// https URL of the issuer's JWKS (e.g. the API server's /openid/v1/jwks), fetched
    /// every 5 minutes and when a token names an unknown key.
    #[arg(long, value_name = "URL")]
    pub jwks_url: Option<http::Uri>,
    /// A bearer token file sent with each --jwks-url fetch (the agent's service-account
    /// token, for the API server).
    #[arg(long, value_name = "PATH", requires = "jwks_url")]
    pub jwks_token_file: Option<PathBuf>,
    /// CA certificates (PEM) trusted for --jwks-url besides the system's.
    #[arg(long, value_name = "PATH", requires = "jwks_url")]
    pub jwks_ca_file: Option<PathBuf>,
    /// The issuer tokens must carry (`iss`), e.g. https://kubernetes.default.svc.cluster.local
    /// (required with sts; with eks-auth, checked when given).
    #[arg(long, value_name = "URL")]
    pub token_issuer: Option<String>,
    /// The audience tokens must carry (`aud`), when they are verified locally.
    #[arg(long, value_name = "AUD", default_value = "pods.eks.amazonaws.com")]
    pub token_audience: String,
    /// sts: tagged on every session as `eks-cluster-arn`.
    #[arg(long, value_name = "ARN")]
    pub cluster_arn: Option<String>,
}

/// A count that must be at least 1 (a cache or a limit of zero would refuse everything).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

/// The flags, and what was derived from them and from the node.
#[derive(Debug)]
pub struct Settings {
    /// The flags as given.
    pub flags: RunArgs,
    /// The addresses the agent serves (`--listen`, else the node's addresses): where redirected
    /// connects arrive, handed to its own sockets (eBPF mode).
    pub listen: Vec<SocketAddr>,
    /// Where intercepted IPv4 (and v4-mapped) connects go; `None`: not intercepted.
    pub target_v4: Option<SocketAddr>,
    /// Where intercepted IPv6 connects go; `None`: not intercepted.
    pub target_v6: Option<SocketAddr>,
    pub source: SourceSettings,
}

/// The credential source's own settings.
#[derive(Debug)]
pub enum SourceSettings {
    EksAuth {
        check: Option<TokenCheck>,
    },
    Sts {
        associations_file: PathBuf,
        check: TokenCheck,
        cluster_arn: Option<String>,
    },
}

impl SourceSettings {
    fn resolve(args: &RunArgs) -> anyhow::Result<SourceSettings> {
        let keys = key_source(args)?;
        let issuer = args.token_issuer.clone().filter(|i| !i.trim().is_empty());
        match args.credential_source {
            SourceKind::EksAuth => {
                let sts_only = [
                    ("--associations-file", args.associations_file.is_some()),
                    ("--cluster-arn", args.cluster_arn.is_some()),
                ];
                if let Some((flag, _)) = sts_only.iter().find(|(_, set)| *set) {
                    bail!(
                        "{flag} applies only to --credential-source sts (EKS Auth holds the associations)"
                    );
                }
                if keys.is_none() && issuer.is_some() {
                    bail!("--token-issuer needs the issuer's keys: --jwks-file or --jwks-url");
                }
                let audience = args.token_audience.clone();
                Ok(SourceSettings::EksAuth {
                    check: keys.map(|keys| TokenCheck {
                        keys,
                        issuer,
                        audience,
                    }),
                })
            }
            SourceKind::Sts => {
                if args.eks_auth_endpoint.is_some() {
                    bail!(
                        "--eks-auth-endpoint applies only to --credential-source eks-auth (the STS endpoint follows AWS_ENDPOINT_URL_STS)"
                    );
                }
                let associations_file = args
                    .associations_file
                    .clone()
                    .context("--credential-source sts needs --associations-file")?;
                let keys = keys.context(
                    "--credential-source sts needs the issuer's keys: --jwks-file or --jwks-url",
                )?;
                let issuer = issuer.context(
                    "--credential-source sts needs --token-issuer (the cluster's service-account issuer: kubectl get --raw /.well-known/openid-configuration)",
                )?;
                if let Some(arn) = &args.cluster_arn
                    && !arn.starts_with("arn:")
                {
                    bail!("--cluster-arn {arn:?} is not an ARN");
                }
                let audience = args.token_audience.clone();
                Ok(SourceSettings::Sts {
                    associations_file,
                    check: TokenCheck {
                        keys,
                        issuer: Some(issuer),
                        audience,
                    },
                    cluster_arn: args.cluster_arn.clone(),
                })
            }
        }
    }
}

/// Where the issuer's keys come from, if given: `--jwks-file` or `--jwks-url`.
fn key_source(args: &RunArgs) -> anyhow::Result<Option<KeySource>> {
    match (&args.jwks_file, &args.jwks_url) {
        (Some(file), None) => Ok(Some(KeySource::File(file.clone()))),
        (None, Some(url)) => {
            // The keys are what every token is checked against, and the fetch may carry the
            // agent's own token: neither goes over plain HTTP.
            if url.scheme_str() != Some("https") || url.host().is_none() {
                bail!(
                    "--jwks-url: an https URL is needed (the issuer's keys decide which tokens are trusted)"
                );
            }
            Ok(Some(KeySource::Url {
                url: url.clone(),
                token_file: args.jwks_token_file.clone(),
                ca_file: args.jwks_ca_file.clone(),
            }))
        }
        _ => Ok(None),
    }
}

impl Settings {
    pub fn resolve(flags: RunArgs) -> anyhow::Result<Settings> {
        if flags.cluster_name.trim().is_empty() {
            bail!("--cluster-name (or CLUSTER_NAME) must not be empty");
        }
        let source = SourceSettings::resolve(&flags)?;
        if flags.mode == Mode::Link && flags.imds == ImdsMode::Deny {
            bail!(
                "--imds deny needs eBPF mode: in link mode the agent does not see pods' connects, so IMDS would stay open to them; use --mode ebpf, or --imds audit or off"
            );
        }
        let listen = if flags.listen.is_empty() {
            node_ip::node_ips()?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
                .collect()
        } else {
            flags.listen.clone()
        };
        let targets = if flags.redirect_target.is_empty() {
            listen.clone()
        } else {
            flags.redirect_target.clone()
        };
        for t in &targets {
            if t.ip().is_unspecified() || t.ip().is_loopback() {
                bail!(
                    "redirect target {t} must be a concrete address that pods route to the node (a wildcard or loopback address would point each pod at itself); set --redirect-target"
                );
            }
        }
        let target_v4 = targets.iter().copied().find(SocketAddr::is_ipv4);
        let target_v6 = targets.iter().copied().find(SocketAddr::is_ipv6);
        if target_v4.is_none() && flags.intercept.iter().any(SocketAddr::is_ipv4) {
            tracing::warn!(
                "no IPv4 redirect target: connects to IPv4 credential addresses are not intercepted"
            );
        }
        if target_v6.is_none() && flags.intercept.iter().any(SocketAddr::is_ipv6) {
            tracing::warn!(
                "no IPv6 redirect target: connects to IPv6 credential addresses are not intercepted"
            );
        }
        Ok(Settings {
            flags,
            listen,
            target_v4,
            target_v6,
            source,
        })
    }

    /// The cache's settings from the flags.
    pub fn cache(&self) -> CacheSettings {
        let f = &self.flags;
        CacheSettings {
            max_entries: f.max_cache_entries,
            upstream_timeout: f.upstream_timeout,
            min_remaining: f.min_remaining,
            negative_ttl: f.negative_ttl,
            pod_upstream_qps: f.pod_upstream_qps,
            pod_upstream_burst: f.pod_upstream_burst,
            ..CacheSettings::default()
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.flags.shutdown_grace_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["run", "--cluster-name", "c"];
        argv.extend_from_slice(extra);
        <Run as clap::Parser>::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn targets_default_to_listen_addresses_per_family() {
        let s = Settings::resolve(args(&[
            "--listen",
            "198.18.0.1:2704",
            "--listen",
            "[2001:2::1]:2704",
        ]))
        .unwrap();
        assert_eq!(s.target_v4, Some("198.18.0.1:2704".parse().unwrap()));
        assert_eq!(s.target_v6, Some("[2001:2::1]:2704".parse().unwrap()));
        assert_eq!(s.flags.intercept.len(), 2);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn imds_deny_needs_ebpf_mode() {
        let e = Settings::resolve(args(&[
            "--listen",
            "198.18.0.1:2704",
            "--mode",
            "link",
            "--imds",
            "deny",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("--imds deny needs eBPF mode"), "{e}");
        let audit = Settings::resolve(args(&["--listen", "198.18.0.1:2704", "--mode", "link"]));
        assert_eq!(audit.unwrap().flags.imds, ImdsMode::Audit);
    }

    #[test]
    fn wildcard_or_loopback_target_is_refused() {
        let e = Settings::resolve(args(&["--listen", "0.0.0.0:2704"])).unwrap_err();
        assert!(e.to_string().contains("--redirect-target"), "{e}");
        let e = Settings::resolve(args(&["--listen", "127.0.0.1:2704"])).unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        let ok = Settings::resolve(args(&[
            "--listen",
            "0.0.0.0:2704",
            "--redirect-target",
            "198.18.0.1:2704",
        ]))
        .unwrap();
        assert_eq!(ok.target_v4, Some("198.18.0.1:2704".parse().unwrap()));
        assert_eq!(ok.target_v6, None);
    }
}

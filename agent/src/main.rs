//! pod-identity-agent: hands EKS Pod Identity credentials to the pods of one node.
//!
//! `main` parses the command line and hands over: `run` to [`daemon`], the operator's commands
//! (`pods`, `associations`, `doctor`) to [`operator`], `cleanup` to [`kernel`]. The module map,
//! with what each room does and one request's walk through them, is `docs/architecture.md`.
#![warn(clippy::too_many_lines)]

mod allocator;
mod attribution;
mod aws;
mod cache;
mod config;
mod connlimit;
mod credentials;
mod daemon;
mod eks_auth;
mod file_stamp;
mod imds;
mod issuer;
mod kernel;
mod link;
mod metrics;
mod node_ip;
mod operator;
mod ops;
mod ratelimit;
mod request;
mod server;
mod source;
mod stats;
mod sts;
mod token;
mod upstream;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "pod-identity-agent",
    version,
    about = "Serves EKS Pod Identity credentials to pods through an eBPF redirect"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once; `run`'s flags are the large one"
)]
enum Command {
    /// Run the node agent: attach the kernel programs and serve credentials.
    Run(config::RunArgs),
    /// Show per-pod statistics of a running agent (reads /v1/pods on its probe address).
    Pods(operator::pods::PodsArgs),
    /// List the cluster's pod identity associations (EKS API), join a node's pods to them, or
    /// create and delete them.
    Associations(operator::associations::AssociationsArgs),
    /// Check this node's set-up end to end: cgroups, kernel programs, the running agent, node
    /// credentials, EKS Auth, the cluster.
    Doctor(operator::doctor::DoctorArgs),
    /// Remove what `run --pin DIR` left pinned (detaches the programs): for uninstalling.
    Cleanup {
        /// The directory given to `run --pin`.
        #[arg(long)]
        pin: PathBuf,
    },
}

fn main() -> ExitCode {
    #[cfg(feature = "dhat-heap")]
    let _profile = allocator::profile();
    let cli = Cli::parse();
    let (name, result) = match cli.command {
        Command::Run(args) => return daemon::run(args),
        Command::Pods(args) => (
            "pods",
            operator::pods::run(&args).map(|()| ExitCode::SUCCESS),
        ),
        Command::Associations(args) => ("associations", operator::associations::run(args)),
        Command::Doctor(args) => ("doctor", operator::doctor::run(args)),
        Command::Cleanup { pin } => ("cleanup", cleanup(&pin)),
    };
    result.unwrap_or_else(|e| {
        eprintln!("pod-identity-agent {name}: {e:#}");
        ExitCode::FAILURE
    })
}

fn cleanup(pin: &std::path::Path) -> anyhow::Result<ExitCode> {
    let removed = kernel::cleanup(pin)?;
    println!("removed {removed} pinned objects from {}", pin.display());
    Ok(ExitCode::SUCCESS)
}

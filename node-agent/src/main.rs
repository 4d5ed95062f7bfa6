//! Command line of causeway-agent.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

/// Programs Services into iptables on this node, like kube-proxy.
#[derive(Parser)]
#[command(name = "causeway-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watch the API and program this node (not built yet).
    Run,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run => anyhow::bail!(
            "this build of causeway-agent has no data path yet: see the open agent issues"
        ),
    }
}

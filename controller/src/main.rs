//! Command line of causeway-controller.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

/// Gives Kubernetes LoadBalancer Services a real AWS Network Load Balancer.
#[derive(Parser)]
#[command(name = "causeway-controller", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile owned LoadBalancer Services into NLBs (not built yet).
    Run,
    /// Print the actions the next reconcile would take (not built yet).
    Plan,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run | Command::Plan => anyhow::bail!(
            "this build of causeway-controller has no reconciler yet: see the open controller issues"
        ),
    }
}

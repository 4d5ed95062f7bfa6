//! `causeway-env`: brings the local environment up and down for people and
//! scripts (`make up`, `make down`, `make demo`). Tests use the same harness
//! through `causeway_tests::Cluster` directly.
#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use causeway_tests::cluster::{self, Cluster, ClusterOptions, DetachedInfo};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "causeway-env",
    about = "The local Causeway environment: real control plane, moto, namespace nodes"
)]
struct Cli {
    /// Where the running environment is recorded (`env`, `kubeconfig`, pointer to its state).
    #[arg(
        long,
        env = "CAUSEWAY_ENV_DIR",
        default_value = ".causeway",
        global = true
    )]
    env_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start an environment and leave it running (a previous one is torn down first).
    Up(UpArgs),
    /// Tear the environment down; nothing is left behind. Safe when none runs.
    Down,
    /// Add echo pods to the running environment: NAME=NODE pairs.
    AddPods(AddPodsArgs),
}

#[derive(clap::Args)]
struct UpArgs {
    /// Number of node namespaces.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Cluster name (the kubernetes.io/cluster/<name> tag in moto).
    #[arg(long, default_value = "causeway-local")]
    cluster_name: String,
}

#[derive(clap::Args)]
struct AddPodsArgs {
    /// Kubernetes namespace of the pods.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Labels for every pod, `key=value`.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// `pod-name=node-name` pairs.
    #[arg(required = true)]
    pods: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let Cli { env_dir, command } = Cli::parse();
    match command {
        Command::Up(args) => up(&env_dir, args).await,
        Command::Down => down(&env_dir),
        Command::AddPods(args) => add_pods(&env_dir, args).await,
    }
}

async fn up(
    env_dir: &Path,
    UpArgs {
        nodes,
        cluster_name,
    }: UpArgs,
) -> Result<()> {
    if down(env_dir).is_err() {
        eprintln!(
            "causeway-env: could not fully remove the previous environment; starting a new one anyway"
        );
    }
    fs::create_dir_all(env_dir)?;
    eprintln!(
        "causeway-env: starting etcd, kube-apiserver, kube-controller-manager, moto and {nodes} node namespaces…"
    );
    let started = std::time::Instant::now();
    let cluster = Cluster::start(ClusterOptions {
        nodes,
        cluster_name,
    })
    .await?;
    let env_file = env_dir.join("env");
    let mut exports = String::from("# Source this file: . .causeway/env\n");
    for (key, value) in cluster.env_vars() {
        exports.push_str(&format!("export {key}='{value}'\n"));
    }
    exports.push_str(&format!(
        "export PATH='{}':\"$PATH\"\n",
        cluster.bin_dir().display()
    ));
    fs::write(&env_file, exports)?;
    let nodes_summary: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("{} {} ({})", n.name, n.ip, n.instance_id))
        .collect();
    let endpoint = cluster.aws_endpoint();
    let dir = cluster.detach()?;
    fs::write(env_dir.join("state-dir"), dir.display().to_string())?;
    let absolute = fs::canonicalize(&env_file).unwrap_or(env_file);
    println!(
        "Environment up in {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    println!("  nodes:        {}", nodes_summary.join(", "));
    println!("  AWS (moto):   {endpoint}");
    println!("  logs, state:  {}", dir.display());
    println!(
        "Use it:  . {}   then e.g.  kubectl get nodes",
        absolute.display()
    );
    println!("Stop it: make down");
    Ok(())
}

fn down(env_dir: &Path) -> Result<()> {
    let pointer = env_dir.join("state-dir");
    let Ok(dir) = fs::read_to_string(&pointer) else {
        return Ok(());
    };
    cluster::teardown_dir(Path::new(dir.trim()))?;
    fs::remove_file(&pointer)?;
    let _ = fs::remove_file(env_dir.join("env"));
    eprintln!("causeway-env: environment torn down");
    Ok(())
}

/// Pods for a detached environment: the same code path as `Cluster::add_pod`,
/// run from a short-lived process that attaches to the recorded state.
async fn add_pods(
    env_dir: &Path,
    AddPodsArgs {
        namespace,
        labels,
        pods,
    }: AddPodsArgs,
) -> Result<()> {
    let dir = fs::read_to_string(env_dir.join("state-dir"))
        .context("no environment is up: run `make up` first")?;
    let dir = PathBuf::from(dir.trim());
    let info: DetachedInfo = serde_json::from_slice(&fs::read(dir.join("info.json"))?)?;
    let cluster = Cluster::attach(&dir, &info).await?;
    let labels: Vec<(String, String)> = labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => bail!("--label takes key=value, not {l:?}"),
        })
        .collect::<Result<_>>()?;
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for pair in &pods {
        let Some((name, node)) = pair.split_once('=') else {
            bail!("pods are given as NAME=NODE, not {pair:?}")
        };
        let pod = cluster.add_pod_in(&namespace, node, name, &labels).await?;
        println!(
            "pod {}/{} on {} at {}",
            pod.namespace, pod.name, pod.node, pod.ip
        );
    }
    cluster.detach()?;
    Ok(())
}

//! `causeway-env`: brings the local environment up and down for people and
//! scripts (`make up`, `make down`, `make demo`). Tests use the same harness
//! through `causeway_tests::Cluster` directly.
#![forbid(unsafe_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use causeway_tests::cluster::{self, Cluster, ClusterOptions, DetachedInfo};
use causeway_tests::paths;
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
    /// Also run Causeway: `causeway-agent run` in every node namespace and two
    /// leader-elected `causeway-controller run` replicas against the apiserver
    /// and moto (logs in the state directory; `down` stops them).
    #[arg(long)]
    with_causeway: bool,
    /// Controller replicas started by `--with-causeway`.
    #[arg(long, default_value_t = 2, requires = "with_causeway")]
    controllers: usize,
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
        with_causeway,
        controllers,
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
    let started = Instant::now();
    let cluster = Cluster::start(ClusterOptions {
        cluster_name,
        ..ClusterOptions::nodes(nodes)
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
    exports.push_str(&format!(
        "export CAUSEWAY_STATE_DIR='{}'\n",
        cluster.dir().display()
    ));
    exports.push_str(&format!(
        "export CAUSEWAY_EXTERNAL_NETNS='{}'\n",
        cluster.external_netns()
    ));
    let causeway = if with_causeway {
        let started = start_causeway(&cluster, controllers).await?;
        let list: Vec<String> = started
            .controllers
            .iter()
            .map(|(name, addr)| format!("{name}={addr}"))
            .collect();
        exports.push_str(&format!(
            "# causeway-controller replicas: identity=metrics address (/metrics, /readyz)\n\
             export CAUSEWAY_CONTROLLERS='{}'\n",
            list.join(" ")
        ));
        Some(started)
    } else {
        None
    };
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
    if let Some(started) = &causeway {
        println!(
            "  agents:       causeway-agent run in {} (health :10256 on each node)",
            started.agents.join(", ")
        );
        for (name, addr) in &started.controllers {
            let role = if Some(name) == started.leader.as_ref() {
                "leader"
            } else {
                "follower"
            };
            println!("  controller:   {name} ({role}), metrics http://{addr}/metrics");
        }
    }
    println!("  logs, state:  {}", dir.display());
    println!(
        "Use it:  . {}   then e.g.  kubectl get nodes",
        absolute.display()
    );
    println!("Stop it: make down");
    Ok(())
}

/// What `--with-causeway` started.
struct Started {
    agents: Vec<String>,
    /// (identity, metrics address) per controller replica.
    controllers: Vec<(String, String)>,
    leader: Option<String>,
}

/// Starts the agents and the controller replicas, recorded in the environment
/// (so tear-down stops them), and waits until every agent answers its health
/// port, every replica is ready and one holds the lease. On error the caller
/// drops the environment, which tears everything down.
async fn start_causeway(cluster: &Cluster, replicas: usize) -> Result<Started> {
    if replicas == 0 {
        bail!("--controllers must be at least 1");
    }
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let agent = paths::workspace_bin("causeway-agent");
    let controller = paths::workspace_bin("causeway-controller");
    eprintln!(
        "causeway-env: starting causeway-agent on {} nodes and {replicas} causeway-controller replicas…",
        cluster.nodes().len()
    );
    let mut agents = Vec::new();
    let mut agent_pids = Vec::new();
    for node in cluster.nodes() {
        let pid = cluster.spawn_agent(
            &node.name,
            &format!("agent-{}", node.name),
            &agent,
            &[
                "--healthz-bind-address",
                "0.0.0.0:10256",
                "--metrics-bind-address",
                "127.0.0.1:10249",
            ],
        )?;
        agents.push(node.name.clone());
        agent_pids.push((format!("agent-{}", node.name), pid));
    }
    let mut controllers = Vec::new();
    let mut controller_pids = Vec::new();
    for i in 1..=replicas {
        let identity = format!("causeway-controller-{i}");
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let address = format!("127.0.0.1:{port}");
        let mut envs = cluster.env_vars();
        envs.push(("POD_NAME".into(), identity.clone()));
        envs.push(("RUST_LOG".into(), "info".into()));
        let pid = cluster.spawn_host(
            &identity,
            &controller,
            &[
                "run",
                "--cluster-name",
                cluster.cluster_name(),
                "--kubeconfig",
                &kubeconfig,
                "--metrics-addr",
                &address,
                "--health-addr",
                &address,
            ],
            &envs,
        )?;
        controllers.push((identity.clone(), address));
        controller_pids.push((identity, pid));
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let alive = |dir: &Path, procs: &[(String, u32)]| -> Result<()> {
        for (log, pid) in procs {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let text = fs::read_to_string(dir.join(format!("{log}.log"))).unwrap_or_default();
                let last = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("(empty log)");
                bail!("{log} exited while starting: {last}");
            }
        }
        Ok(())
    };
    let dir = cluster.dir();
    for node in cluster.nodes() {
        let address = SocketAddr::from((node.ip, 10256));
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            alive(&dir, &agent_pids)?;
            if Instant::now() > deadline {
                bail!(
                    "causeway-agent on {} did not answer on {address} within 60 s (log: {})",
                    node.name,
                    dir.join(format!("agent-{}.log", node.name)).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let leader = loop {
        alive(&dir, &controller_pids)?;
        let mut ready = 0;
        let mut leader = None;
        for (identity, address) in &controllers {
            if http_get(address, "/readyz").is_ok_and(|b| b.trim() == "ok") {
                ready += 1;
            }
            if http_get(address, "/metrics")
                .is_ok_and(|m| m.lines().any(|l| l.trim() == "causeway_leader 1"))
            {
                leader = Some(identity.clone());
            }
        }
        if ready == controllers.len() && leader.is_some() {
            break leader;
        }
        if Instant::now() > deadline {
            bail!(
                "the controllers were not ready with a leader within 60 s ({ready}/{} ready, leader: {}); logs in {}",
                controllers.len(),
                leader.as_deref().unwrap_or("none"),
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    Ok(Started {
        agents,
        controllers,
        leader,
    })
}

/// A minimal HTTP/1.0 GET against `address`; the body of a 200 answer.
fn http_get(address: &str, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&address.parse()?, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
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

//! Command line of causeway-controller: `run` (the controller) and `plan`
//! (what the next reconcile would do, writing nothing). SPEC 1.6.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use causeway_controller::aws::{Aws, DEFAULT_INVENTORY_TTL, RateLimits};
use causeway_controller::desired::{
    ClusterConfig, SERVICE_NAME_LABEL, desired, may_use_ip_targets, owns,
};
use causeway_controller::leader::{self, LeaseSettings};
use causeway_controller::metrics::{self, Metrics};
use causeway_controller::model::Scheme;
use causeway_controller::plan::{plan, replacements};
use causeway_controller::reconcile::{
    self, Context, FINALIZER, OrphanSweep, Settings, node_fingerprint,
};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};

/// Gives Kubernetes LoadBalancer Services a real AWS Network Load Balancer.
#[derive(Parser)]
#[command(name = "causeway-controller", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reconcile owned LoadBalancer Services into NLBs.
    Run(RunArgs),
    /// Print the actions the next reconcile would take; writes nothing.
    Plan(PlanArgs),
}

/// What both commands need to see the cluster and AWS as the controller does.
#[derive(Args)]
struct ClusterArgs {
    /// Cluster name: in tags, names and subnet discovery.
    #[arg(long, env = "CAUSEWAY_CLUSTER_NAME")]
    cluster_name: String,
    /// Kubeconfig file (default: in-cluster or $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// AWS region (default: the SDK's configuration, e.g. AWS_REGION).
    #[arg(long)]
    region: Option<String>,
    /// The spec.loadBalancerClass this controller owns.
    #[arg(long, default_value = "causeway.dev/nlb")]
    load_balancer_class: String,
    /// Also own LoadBalancer Services without a class.
    #[arg(long)]
    default_class: bool,
    /// Scheme when no annotation says: internet-facing or internal.
    #[arg(long, default_value = "internet-facing", value_parser = parse_scheme)]
    default_scheme: Scheme,
    /// The agent's health port, probed for externalTrafficPolicy: Cluster.
    #[arg(long, default_value_t = 10256)]
    node_health_port: u16,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Services reconciled in parallel.
    #[arg(long, default_value_t = 4)]
    workers: u16,
    /// Read back every Service's resources this often, correcting drift (Go
    /// syntax: 10m, 1h30m, 90s; not zero).
    #[arg(long, default_value = "10m", value_parser = parse_period)]
    drift_audit_period: Duration,
    /// Delete resources tagged with our cluster whose Service no longer
    /// exists, at start and every drift-audit period (`dry-run`: only log).
    #[arg(long, value_enum, default_value = "on")]
    orphan_sweep: OrphanSweep,
    /// Client-side limit on AWS Describe calls per second (0: none).
    #[arg(long, default_value_t = RateLimits::default().describe)]
    aws_describe_rate: f64,
    /// Client-side limit on RegisterTargets/DeregisterTargets per second (0: none).
    #[arg(long, default_value_t = RateLimits::default().register)]
    aws_register_rate: f64,
    /// Client-side limit on other AWS writes per second (0: none).
    #[arg(long, default_value_t = RateLimits::default().modify)]
    aws_modify_rate: f64,
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:8081")]
    health_addr: SocketAddr,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Elect a leader on a Lease; only the leader writes. `--leader-elect=false` for one replica.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    leader_elect: bool,
    /// Namespace of the `causeway-controller` Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    leader_election_namespace: String,
    /// Seconds a lease stays valid after its last renewal.
    #[arg(long, default_value_t = 15)]
    leader_election_lease_duration: u64,
    /// Seconds between renewals by the leader.
    #[arg(long, default_value_t = 10)]
    leader_election_renew_deadline: u64,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Only Services in this namespace.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Service names (default: every owned Service).
    services: Vec<String>,
}

fn parse_scheme(s: &str) -> Result<Scheme, String> {
    match s {
        "internet-facing" => Ok(Scheme::InternetFacing),
        "internal" => Ok(Scheme::Internal),
        _ => Err(format!("{s:?}: accepted: internet-facing, internal")),
    }
}

/// A period in Go's syntax (`10m`, `1h30m`, `90s`, or plain seconds); zero
/// would audit without pause and spend the Describe budget.
fn parse_period(s: &str) -> Result<Duration, String> {
    let period = causeway_telemetry::duration::parse_duration(s)?;
    if period.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(period)
}

impl ClusterArgs {
    fn config(&self) -> ClusterConfig {
        ClusterConfig {
            cluster_name: self.cluster_name.clone(),
            load_balancer_class: self.load_balancer_class.clone(),
            default_class: self.default_class,
            default_scheme: self.default_scheme,
            node_health_port: self.node_health_port,
        }
    }

    /// A client whose requests `metrics` counts.
    async fn client(&self, metrics: &Metrics) -> Result<kube::Client> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await?
            }
            None => kube::Config::infer().await?,
        };
        Ok(causeway_telemetry::rest_client::client(
            config,
            &metrics.rest_client,
        )?)
    }
}

/// Stack of each runtime thread. The AWS SDK's request futures are large
/// in debug builds, and a periodic orphan sweep (a spawned task, so on a
/// worker thread) overflowed tokio's default of 2 MiB deleting a listener.
/// Only the pages a thread touches are ever allocated.
const THREAD_STACK: usize = 8 << 20;

fn main() -> Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK)
        .build()?
        .block_on(async {
            match cli.command {
                Command::Run(args) => run(args).await,
                Command::Plan(args) => plan_command(args).await,
            }
        })
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let RunArgs {
        cluster,
        workers,
        drift_audit_period,
        orphan_sweep,
        aws_describe_rate,
        aws_register_rate,
        aws_modify_rate,
        metrics_addr,
        health_addr,
        log_json,
        leader_elect,
        leader_election_namespace,
        leader_election_lease_duration,
        leader_election_renew_deadline,
    } = args;
    if leader_elect && leader_election_renew_deadline >= leader_election_lease_duration {
        bail!(
            "--leader-election-renew-deadline must be shorter than --leader-election-lease-duration"
        );
    }
    init_logs(log_json);
    let metrics = Arc::new(Metrics::default());
    let client = cluster.client(&metrics).await?;
    let aws = Aws::from_env(
        &cluster.cluster_name,
        cluster.region.clone(),
        metrics.aws_calls.clone(),
    )
    .await
    .with_rate_limits(RateLimits {
        describe: aws_describe_rate,
        register: aws_register_rate,
        modify: aws_modify_rate,
    })
    // Out-of-band changes stay unseen for at most a tenth of an audit period.
    .with_inventory_ttl(DEFAULT_INVENTORY_TTL.min(drift_audit_period / 10));

    for addr in
        std::iter::once(metrics_addr).chain((health_addr != metrics_addr).then_some(health_addr))
    {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, metrics).await {
                tracing::error!(%addr, error = %e, "cannot serve metrics/health");
                std::process::exit(1);
            }
        });
    }

    // Node cache, fed by its own task so it syncs whatever the controller
    // does. Each change (applied to the cache first) triggers a reconcile of
    // every Service, so a reconcile never sees an older node list than its trigger.
    let (nodes, node_writer) = reflector::store::<Node>();
    let (node_tx, node_rx) = tokio::sync::mpsc::channel::<()>(1);
    let node_watch = reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let node_store = nodes.clone();
    tokio::spawn(async move {
        let mut node_watch = std::pin::pin!(node_watch);
        // What each node looked like to the targets at the last trigger: a
        // status heartbeat changes nothing a target depends on, so it does
        // not reconcile every Service.
        let mut seen: std::collections::HashMap<String, u64> = Default::default();
        while let Some(event) = node_watch.next().await {
            match event {
                Ok(node) => {
                    let name = node.name_any();
                    let present = node_store.get(&reflector::ObjectRef::new(&name)).is_some();
                    let changed = if present {
                        let print = node_fingerprint(&node);
                        seen.insert(name, print) != Some(print)
                    } else {
                        seen.remove(&name).is_some()
                    };
                    // A full channel already holds a pending "reconcile all".
                    if changed {
                        let _ = node_tx.try_send(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "node watch"),
            }
        }
    });
    let node_changes = futures::stream::unfold(node_rx, |mut rx| async move {
        rx.recv().await.map(|()| ((), rx))
    });

    // EndpointSlice cache (ip targets), fed like the node cache by its own
    // task: each change, applied to the cache first, triggers a reconcile of
    // its Service only. Unbounded, so the cache never waits for the controller
    // (which waits for the cache to be ready before its first reconcile).
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let (slice_tx, slice_rx) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<Service>>();
    let slice_changes = futures::stream::unfold(slice_rx, |mut rx| async move {
        rx.recv().await.map(|service| (service, rx))
    });

    let settings = Settings {
        cluster: cluster.config(),
        drift_audit_period,
        // Half the workers at most: the rest stay free for changes.
        max_concurrent_audits: usize::from(workers / 2).max(1),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        aws,
        settings,
        nodes.clone(),
        slices.clone(),
        metrics.clone(),
    ));
    let controller = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(kube::runtime::controller::Config::default().concurrency(workers))
    .reconcile_all_on(node_changes)
    .reconcile_on(slice_changes)
    .shutdown_on_signal();

    let services = controller.store();
    let cfg = cluster.config();
    let slice_watch = reflector(
        slice_writer,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
        )
        .modify(|slice| slice.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();
    tokio::spawn(async move {
        let mut slice_watch = std::pin::pin!(slice_watch);
        while let Some(event) = slice_watch.next().await {
            let slice = match event {
                Ok(slice) => slice,
                Err(e) => {
                    tracing::warn!(error = %e, "endpointslice watch");
                    continue;
                }
            };
            let (Some(namespace), Some(name)) = (
                slice.metadata.namespace.as_deref(),
                slice.labels().get(SERVICE_NAME_LABEL),
            ) else {
                continue;
            };
            let service = ObjectRef::<Service>::new(name).within(namespace);
            // Endpoints cannot change an instance-target Service: no reconcile.
            // A Service not cached yet is reconciled when it is.
            if services
                .get(&service)
                .is_none_or(|svc| may_use_ip_targets(&svc, &cfg))
            {
                let _ = slice_tx.send(service);
            }
        }
    });

    // Reconciling before the node (or slice) list is known would deregister
    // every node (or pod).
    let ready_nodes = nodes.clone();
    let ready_slices = slices.clone();
    let ready_flag = metrics.clone();
    tokio::spawn(async move {
        if ready_nodes.wait_until_ready().await.is_ok()
            && ready_slices.wait_until_ready().await.is_ok()
        {
            ready_flag.ready.store(true, Ordering::Relaxed);
        }
    });
    if leader_elect {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        leader::acquire(
            client.clone(),
            LeaseSettings {
                name: "causeway-controller".into(),
                namespace: leader_election_namespace,
                identity,
                duration_seconds: leader_election_lease_duration,
                renew_seconds: leader_election_renew_deadline,
            },
            metrics.clone(),
        )
        .await?;
    }
    // Leader only: followers call no AWS API.
    ctx.aws.warm_up().await;
    // The first orphan sweep runs before any reconcile, then one per
    // drift-audit period.
    if orphan_sweep != OrphanSweep::Off {
        let ctx = ctx.clone();
        let sweep = async move || match reconcile::sweep_orphans(&ctx, orphan_sweep).await {
            Ok(swept) if !swept.is_empty() => {
                tracing::info!(?swept, mode = ?orphan_sweep, "orphan sweep done");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "orphan sweep failed; next period retries"),
        };
        sweep().await;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(drift_audit_period).await;
                // Its reads give way to the changes of Services.
                causeway_controller::aws::in_background(sweep()).await;
            }
        });
    }
    let gate_nodes = nodes.clone();
    let gate_slices = slices.clone();
    tracing::info!(cluster = %cluster.cluster_name, class = %cluster.load_balancer_class, "causeway-controller running");
    controller
        .run(
            move |svc, ctx: Arc<Context>| {
                let gate_nodes = gate_nodes.clone();
                let gate_slices = gate_slices.clone();
                async move {
                    let _ = gate_nodes.wait_until_ready().await;
                    let _ = gate_slices.wait_until_ready().await;
                    reconcile::reconcile(svc, ctx).await
                }
            },
            reconcile::error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller");
            }
        })
        .await;
    Ok(())
}

async fn plan_command(args: PlanArgs) -> Result<()> {
    let PlanArgs {
        cluster,
        namespace,
        services,
    } = args;
    let metrics = Metrics::default();
    let client = cluster.client(&metrics).await?;
    let cfg = cluster.config();
    let aws = Aws::from_env(
        &cluster.cluster_name,
        cluster.region.clone(),
        metrics.aws_calls.clone(),
    )
    .await;
    let api: Api<Service> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut listed = api.list(&ListParams::default()).await?.items;
    if !services.is_empty() {
        listed.retain(|s| services.contains(&s.name_any()));
        if listed.is_empty() {
            bail!("no Service named {} found", services.join(", "));
        }
    }
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let slice_api: Api<EndpointSlice> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let slices = slice_api
        .list(&ListParams::default().labels(SERVICE_NAME_LABEL))
        .await?
        .items;
    for svc in &listed {
        let name = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        let uid = svc.uid().unwrap_or_default();
        let ours = owns(svc, &cfg) && svc.metadata.deletion_timestamp.is_none();
        let has_finalizer = svc.finalizers().iter().any(|f| f == FINALIZER);
        let (actions, replaced) = if ours {
            match desired(svc, &nodes, &slices, &cfg) {
                Ok(d) => {
                    let observed = aws.observe(&uid, Some(&d)).await?;
                    (plan(Some(&d), &observed), replacements(&d, &observed))
                }
                Err(e) => {
                    println!("{name}: not reconciled: {e}");
                    continue;
                }
            }
        } else if has_finalizer {
            (plan(None, &aws.observe(&uid, None).await?), Vec::new())
        } else {
            if !services.is_empty() {
                println!("{name}: not owned by this controller");
            }
            continue;
        };
        if actions.is_empty() {
            println!("{name}: up to date");
        } else {
            println!("{name}: {} action(s)", actions.len());
            for r in &replaced {
                println!("  ! {r}");
            }
            for (i, action) in actions.iter().enumerate() {
                println!("  {}. {action}", i + 1);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drift_audit_period_takes_go_durations_but_not_zero() {
        // The syntax is causeway_telemetry::duration's, tested there.
        assert_eq!(parse_period("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(
            parse_period("0m0s"),
            Err("\"0m0s\": must be more than zero".to_string())
        );
        assert!(parse_period("often").is_err());
    }
}

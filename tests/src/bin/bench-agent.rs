//! bench-agent: `causeway-agent run` at scale on the real control plane.
//!
//! For each S it starts a one-node environment, creates S selector-less
//! ClusterIP Services with one EndpointSlice of E (remote, fake) endpoints
//! each through the apiserver, plus one real Service backed by an echo pod,
//! placed so that its dispatch entry is the last one a packet reaches: named
//! so that its chain hash is the lowest (the agent writes entries in
//! descending order of it) and given a cluster IP in the last dispatch
//! bucket (which decides once the agent uses buckets, from 1 000 Service
//! addresses). The bench prints the path from the applied
//! ruleset. It then starts the agent in the node namespace and reports:
//! the first (full) sync's duration, the agent's RSS, the network programming
//! latency of endpoint changes (API write → sync applied, read from the
//! agent's `kubeproxy_sync_proxy_rules_last_timestamp_seconds`) with the
//! restore payload size of those syncs, and the first-connection latency to
//! the target from a pod (median/p90/p99 of 1 000 connects). Every size's
//! environment stays up until the end, and the connects are timed in rounds
//! that take turns between the sizes, so the sizes are compared on the same
//! machine state.
//!
//! Run as root: `cargo build --release -p causeway-agent -p causeway-tests`
//! then `target/release/bench-agent [--services 100,10000] [--endpoints 10]
//! [--backend nft|legacy]`.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use causeway_agent::addr::{IpFamily, parse_cidr};
use causeway_agent::model::{Protocol, ServicePortName};
use causeway_agent::netfilter::{Backend, Netfilter};
use causeway_agent::rules::names::ServiceChains;
use causeway_tests::cluster::{Cluster, ClusterOptions};
use causeway_tests::paths::workspace_bin;
use causeway_tests::{metrics, netns};
use clap::Parser;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

#[derive(Parser)]
#[command(name = "bench-agent")]
struct Args {
    /// Service counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,10000")]
    services: Vec<usize>,
    /// Endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Endpoint changes timed per size.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Connections timed per size.
    #[arg(long, default_value_t = 1000)]
    connects: usize,
    /// Rounds the connections are split into, taking turns between the
    /// sizes once every size's environment is up.
    #[arg(long, default_value_t = 10)]
    connect_rounds: usize,
    /// The causeway-agent binary (default: next to this program).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Copy each size's agent log here (`agent-<S>.log`) before the
    /// environment is torn down, for its per-sync timings.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// The iptables backend the agent programs (its `--iptables-backend`).
    #[arg(long, value_enum, default_value_t = Backend::Nft)]
    backend: Backend,
}

/// Past the agent's `--min-sync-period` (1 s): a change made after this long
/// is synced on its own, without waiting for the period.
const PAST_MIN_SYNC_PERIOD: Duration = Duration::from_millis(1100);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let agent = match &args.agent {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join("causeway-agent"),
    };
    println!(
        "agent: {} (--iptables-backend {})",
        agent.display(),
        args.backend
    );
    println!(
        "| S × E | first full sync s | agent RSS MB (peak) | programming latency ms median / p90 | sync payload bytes median | first connect µs median / p90 / p99 |"
    );
    println!("|---|---|---|---|---|---|");
    let mut measured = Vec::new();
    for &services in &args.services {
        measured.push(
            measure(&args, &agent, services)
                .await
                .with_context(|| format!("S = {services}"))?,
        );
    }
    let connects = connect_rounds(&measured, args.connects, args.connect_rounds)?;
    for (m, times) in measured.iter().zip(&connects) {
        println!(
            "{} {:.0} / {:.0} / {:.0} |",
            m.row,
            quantile(times, 0.5),
            quantile(times, 0.9),
            quantile(times, 0.99)
        );
    }
    if let (Some(first), Some(last)) = (connects.first(), connects.last())
        && measured.len() > 1
    {
        eprintln!(
            "first connect median, {} against {} Services: {:.2}×",
            measured[measured.len() - 1].services,
            measured[0].services,
            quantile(last, 0.5) / quantile(first, 0.5)
        );
    }
    Ok(())
}

/// One size's environment, kept up until every size's connects are timed.
struct Measured {
    services: usize,
    /// The table row up to the first-connect column.
    row: String,
    client_netns: String,
    target: String,
    _cluster: Cluster,
}

/// Times `connects` new connections to each size's target, in `rounds`
/// rounds that take turns between the sizes (in reverse order every other
/// round), so each size sees the same machine (its speed here drifts by half
/// over an afternoon). Returns each size's connect times in µs, sorted.
fn connect_rounds(measured: &[Measured], connects: usize, rounds: usize) -> Result<Vec<Vec<f64>>> {
    let echo = workspace_bin("causeway-echo").display().to_string();
    let rounds = rounds.clamp(1, connects.max(1));
    let mut times = vec![Vec::with_capacity(connects); measured.len()];
    for round in 0..rounds {
        let count = connects / rounds + usize::from(round < connects % rounds);
        if count == 0 {
            continue;
        }
        let mut order: Vec<usize> = (0..measured.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for index in order {
            let (m, times) = (&measured[index], &mut times[index]);
            let out = netns::exec_in(
                &m.client_netns,
                &echo,
                &[
                    "connect-time",
                    &m.target,
                    "--count",
                    &count.to_string(),
                    "--raw",
                ],
            )?;
            let mut lines = out.lines();
            let summary: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
            if summary.get(3).is_some_and(|f| *f != "0") {
                bail!(
                    "S = {}: {} of {count} connections to the target failed",
                    m.services,
                    summary[3]
                );
            }
            for sample in lines.next().unwrap_or("").split_whitespace() {
                times.push(sample.parse::<f64>().context("a connect time")?);
            }
        }
    }
    for times in &mut times {
        times.sort_by(f64::total_cmp);
    }
    Ok(times)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn slice_json(name: &str, endpoints: usize, generation: usize) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = (0..endpoints)
        .map(|i| {
            json!({
                "addresses": [format!("10.{}.{}.{}", 200 + generation % 50, (i / 250) % 250, i % 250 + 1)],
                "nodeName": "node-elsewhere",
                "conditions": {"ready": true}
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-1"),
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "bench-agent"
            }
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    })
}

/// A free cluster IP in `service_cidr` whose low six bits are 63: in the
/// agent's last dispatch bucket when it uses buckets (in the flat layout the
/// address does not decide the position).
async fn last_bucket_ip(services: &Api<Service>, service_cidr: &str) -> Result<Ipv4Addr> {
    let cidr = parse_cidr(service_cidr).context("the Service CIDR")?;
    let IpAddr::V4(network) = cidr.network() else {
        bail!("an IPv4 Service CIDR: {service_cidr}");
    };
    let (network, size) = (u32::from(network), 1u32 << (32 - cidr.prefix_len()));
    let used: std::collections::BTreeSet<Ipv4Addr> = services
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter_map(|s| s.spec.as_ref()?.cluster_ip.as_ref()?.parse().ok())
        .collect();
    (0..size / 64)
        .map(|k| network + k * 64 + 63)
        .filter(|ip| *ip != network + size - 1)
        .map(Ipv4Addr::from)
        .find(|ip| !used.contains(ip))
        .context("no free cluster IP ends in 63")
}

async fn measure(args: &Args, agent: &std::path::Path, count: usize) -> Result<Measured> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let client = cluster.client();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");

    let target_pod = cluster
        .add_pod("node-1", "target", &[("app", "target")])
        .await?;
    let client_pod = cluster
        .add_pod("node-1", "client", &[("app", "client")])
        .await?;

    let started = Instant::now();
    let creates = futures::stream::iter(0..count)
        .map(|i| {
            let services = services.clone();
            let slices = slices.clone();
            let endpoints = args.endpoints;
            async move {
                let name = format!("svc-{i:05}");
                let svc: Service = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name},
                    "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
                }))?;
                services.create(&PostParams::default(), &svc).await?;
                let slice: EndpointSlice = serde_json::from_value(slice_json(&name, endpoints, 0))?;
                slices.create(&PostParams::default(), &slice).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(24)
        .collect::<Vec<_>>()
        .await;
    for result in creates {
        result?;
    }
    // The smallest hash goes last; find a name whose chain hash is below all.
    let chain_of = |name: &str, port: &str| {
        ServiceChains::new(
            &ServicePortName {
                namespace: "default".into(),
                name: name.into(),
                port: port.into(),
            },
            Protocol::Tcp,
        )
        .cluster
    };
    let lowest = (0..count)
        .map(|i| chain_of(&format!("svc-{i:05}"), "http"))
        .min()
        .unwrap_or_default();
    let target_name = (0..)
        .map(|k| format!("target-{k}"))
        .find(|name| count == 0 || chain_of(name, "") < lowest)
        .expect("some name hashes lowest");
    let target_chain = chain_of(&target_name, "");
    // With dispatch buckets the last bucket is the one whose address bits
    // are 63: give the target a free cluster IP there.
    let target_ip = last_bucket_ip(&services, &cluster.service_cidr()).await?;
    let spec = json!({
        "selector": {"app": "target"},
        "clusterIP": target_ip.to_string(),
        "ports": [{"port": 80, "targetPort": 80}]
    });
    let target: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": target_name},
        "spec": spec
    }))?;
    services.create(&PostParams::default(), &target).await?;
    eprintln!(
        "S = {count}: created {count} Services and EndpointSlices in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let node = cluster.node("node-1").clone();
    let pid = cluster.spawn_agent(
        "node-1",
        "agent",
        agent,
        &[
            "--sync-period",
            "30m",
            "--iptables-backend",
            &args.backend.to_string(),
        ],
    )?;
    let metrics = || -> Result<String> {
        netns::exec_in(
            &node.netns,
            "curl",
            &["-s", "--max-time", "5", "http://127.0.0.1:10249/metrics"],
        )
    };

    // The first sync: everything, in one restore.
    let deadline = Instant::now() + Duration::from_secs(600);
    let first_sync = loop {
        if let Ok(text) = metrics()
            && let Some(n) = metrics::value(
                &text,
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
            )
            && n >= 1.0
        {
            break metrics::value(
                &text,
                "kubeproxy_sync_full_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}",
            )
            .unwrap_or(0.0);
        }
        if Instant::now() > deadline {
            bail!("the agent did not finish its first sync in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // After the first sync too: a change right after it would wait for the
    // period, not for the sync.
    tokio::time::sleep(PAST_MIN_SYNC_PERIOD).await;

    // Endpoint changes: API write → the sync that applied it.
    let mut latencies = Vec::new();
    let mut payloads = Vec::new();
    for change in 0..args.changes {
        let name = format!("svc-{:05}", change % count.max(1));
        let before = metrics()?;
        let last_before = metrics::value(
            &before,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        )
        .unwrap_or(0.0);
        let bytes_before =
            metrics::value(&before, "causeway_agent_restore_bytes_sum").unwrap_or(0.0);
        let written = now_seconds();
        let patch = slice_json(&name, args.endpoints, change + 1);
        slices
            .patch(
                &format!("{name}-1"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = metrics()?;
            let last = metrics::value(
                &text,
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
            )
            .unwrap_or(0.0);
            if last > last_before && last >= written {
                latencies.push((last - written) * 1000.0);
                payloads.push(
                    metrics::value(&text, "causeway_agent_restore_bytes_sum").unwrap_or(0.0)
                        - bytes_before,
                );
                break;
            }
            if Instant::now() > deadline {
                bail!("change {change} was not applied within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // So that every change is its own sync.
        tokio::time::sleep(PAST_MIN_SYNC_PERIOD).await;
    }
    latencies.sort_by(f64::total_cmp);
    payloads.sort_by(f64::total_cmp);

    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let (rss, peak) = (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0);

    // How many dispatch rules a new connection to the target passes, as
    // applied: its entry's position in nat KUBE-SERVICES, or the position of
    // its bucket's jump plus its entry's position in the bucket.
    let save = netns::exec_in(
        &node.netns,
        Netfilter::new(IpFamily::V4, args.backend).save_program(),
        &["-t", "nat"],
    )?;
    let rules_of = |chain: &str| -> Vec<&str> {
        let prefix = format!("-A {chain} ");
        save.lines().filter(|l| l.starts_with(&prefix)).collect()
    };
    let top = rules_of("KUBE-SERVICES");
    let holds_target = |l: &&str| l.ends_with(&format!("-j {target_chain}"));
    let path = if let Some(at) = top.iter().position(holds_target) {
        format!("entry {} of {} in nat KUBE-SERVICES", at + 1, top.len())
    } else {
        let (jump, bucket, at, entries) = top
            .iter()
            .enumerate()
            .find_map(|(jump, l)| {
                let bucket = l.split_whitespace().last()?;
                let entries = rules_of(bucket);
                let at = entries.iter().position(holds_target)?;
                Some((jump, bucket.to_string(), at, entries.len()))
            })
            .context("the target has no dispatch entry")?;
        format!(
            "jump {} of {} in nat KUBE-SERVICES, then entry {} of {entries} in {bucket}",
            jump + 1,
            top.len(),
            at + 1
        )
    };
    eprintln!("S = {count}: a new connection to the target passes {path}");

    if let Some(dir) = &args.keep_logs {
        std::fs::create_dir_all(dir)?;
        let kept = dir.join(format!("agent-{count}.log"));
        std::fs::copy(cluster.dir().join("agent.log"), &kept)?;
        eprintln!("S = {count}: agent log kept at {}", kept.display());
    }
    drop(target_pod);
    Ok(Measured {
        services: count,
        row: format!(
            "| {count} × {} | {first_sync:.2} | {rss:.0} ({peak:.0}) | {:.0} / {:.0} | {:.0} |",
            args.endpoints,
            quantile(&latencies, 0.5),
            quantile(&latencies, 0.9),
            quantile(&payloads, 0.5),
        ),
        client_netns: client_pod.netns,
        target: format!("{target_ip}:80"),
        _cluster: cluster,
    })
}

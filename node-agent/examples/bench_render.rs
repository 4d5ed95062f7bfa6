//! Render benchmark: a synthetic cluster of S Services × E endpoints (ClusterIP,
//! or `--service-type node-port|load-balancer [--etp-local]`)
//! → model build time, render time, payload size, and chain/rule counts per
//! table against kube-proxy's shape (nat rules 5 + 2S + 3SE, one chain per
//! Service and per endpoint). `--apply nft,legacy` also times loading the
//! payload into a throwaway network namespace with each iptables backend.
//!
//! cargo run --release -p causeway-agent --example bench_render -- --services 10000 --endpoints 10

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort as ApiServicePort, ServiceSpec,
    ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use causeway_agent::addr::IpFamily;
use causeway_agent::config::ProxyOptions;
use causeway_agent::model::cache::ModelCache;
use causeway_agent::model::{self, LABEL_SERVICE_NAME, NodeInfo};
use causeway_agent::netfilter::{Backend, Netfilter};
use causeway_agent::rules::{self, Partial, RenderOptions};

#[derive(Parser)]
struct Args {
    /// Services (one TCP port each).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Ready endpoints per Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Nodes the endpoints are spread over; this node is node-0.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Render runs to time.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Also time `iptables-restore --noflush` into a fresh netns with these
    /// backends (comma-separated: nft, legacy). Needs root.
    #[arg(long, value_enum, value_delimiter = ',')]
    apply: Vec<Backend>,
    /// Write the payload here.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Layout of nat KUBE-SERVICES: the agent's choice for the model, or a
    /// forced one, to compare them.
    #[arg(long, value_enum, default_value_t = DispatchArg::Auto)]
    dispatch: DispatchArg,
    /// Type of every Service. NodePorts are 20000 + i (as with
    /// `--service-node-port-range 20000-39999`); LoadBalancers get one
    /// ingress IP each and no NodePort (`allocateLoadBalancerNodePorts: false`).
    #[arg(long, value_enum, default_value_t = TypeArg::ClusterIp)]
    service_type: TypeArg,
    /// `externalTrafficPolicy: Local` on NodePort and LoadBalancer Services.
    #[arg(long)]
    etp_local: bool,
    /// Count into kube-proxy's nfacct counters, as `run` does where `nfacct`
    /// is installed (the INVALID drop, and a counting rule first in each
    /// NodePort's KUBE-EXT- chain); `--apply` creates them in its namespace.
    #[arg(long)]
    nfacct: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TypeArg {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

impl TypeArg {
    fn api_name(self) -> &'static str {
        match self {
            TypeArg::ClusterIp => "ClusterIP",
            TypeArg::NodePort => "NodePort",
            TypeArg::LoadBalancer => "LoadBalancer",
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DispatchArg {
    Auto,
    Flat,
    Buckets,
}

fn ip(index: usize, base: u32) -> String {
    let value = base + index as u32;
    std::net::Ipv4Addr::from(value).to_string()
}

fn objects(args: &Args) -> (Vec<Service>, Vec<EndpointSlice>) {
    let cluster_base = u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0));
    let pod_base = u32::from(std::net::Ipv4Addr::new(10, 128, 0, 0));
    let ingress_base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0));
    let mut services = Vec::with_capacity(args.services);
    let mut slices = Vec::with_capacity(args.services);
    for s in 0..args.services {
        let name = format!("svc-{s}");
        services.push(Service {
            metadata: ObjectMeta {
                namespace: Some("bench".into()),
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(args.service_type.api_name().into()),
                cluster_ip: Some(ip(s + 1, cluster_base)),
                external_traffic_policy: (args.etp_local
                    && !matches!(args.service_type, TypeArg::ClusterIp))
                .then(|| "Local".into()),
                allocate_load_balancer_node_ports: matches!(
                    args.service_type,
                    TypeArg::LoadBalancer
                )
                .then_some(false),
                ports: Some(vec![ApiServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    node_port: matches!(args.service_type, TypeArg::NodePort)
                        .then_some(20_000 + s as i32),
                    ..ApiServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: matches!(args.service_type, TypeArg::LoadBalancer).then(|| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress {
                        ip: Some(ip(s + 1, ingress_base)),
                        ..LoadBalancerIngress::default()
                    }]),
                }),
                ..ServiceStatus::default()
            }),
        });
        let endpoints = (0..args.endpoints)
            .map(|e| {
                let index = s * args.endpoints + e;
                Endpoint {
                    addresses: vec![ip(index + 1, pod_base)],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(format!("node-{}", index % args.nodes.max(1))),
                    ..Endpoint::default()
                }
            })
            .collect();
        slices.push(EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("bench".into()),
                name: Some(format!("{name}-abcde")),
                labels: Some([(LABEL_SERVICE_NAME.to_string(), name)].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                app_protocol: None,
            }]),
        });
    }
    (services, slices)
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Applies each payload in turn into one fresh network namespace and times
/// each apply.
fn apply(netfilter: &Netfilter, payloads: &[&str]) -> Result<Vec<Duration>, String> {
    let program = netfilter.restore_program();
    let namespace = format!("cwbench-{}", std::process::id());
    let status = Command::new("ip")
        .args(["netns", "add", &namespace])
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("ip netns add {namespace} failed"));
    }
    let result = (|| {
        for counter in [
            causeway_agent::nfacct::CT_STATE_INVALID_DROPPED,
            causeway_agent::nfacct::LOCALHOST_NODEPORTS_ACCEPTED,
        ] {
            if payloads.iter().any(|p| p.contains(counter)) {
                let status = Command::new("ip")
                    .args(["netns", "exec", &namespace, "nfacct", "add", counter])
                    .status()
                    .map_err(|e| format!("nfacct: {e}"))?;
                if !status.success() {
                    return Err(format!("nfacct add {counter} failed"));
                }
            }
        }
        let mut times = Vec::new();
        for payload in payloads {
            let start = Instant::now();
            let mut command = Command::new("ip");
            // As the agent runs it.
            netfilter.tune_restore(&mut command);
            let mut child = command
                .args(["netns", "exec", &namespace, program, "--noflush"])
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())?;
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(payload.as_bytes())
                .map_err(|e| e.to_string())?;
            let status = child.wait().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("{program} failed: {status}"));
            }
            times.push(start.elapsed());
        }
        Ok(times)
    })();
    let _ = Command::new("ip")
        .args(["netns", "del", &namespace])
        .status();
    result
}

fn main() {
    let args = Args::parse();
    let (s, e) = (args.services, args.endpoints);
    println!(
        "synthetic cluster: {s} {} services × {e} ready endpoints over {} nodes",
        args.service_type.api_name(),
        args.nodes
    );

    let (services, slices) = objects(&args);
    let node = NodeInfo::named("node-0");
    let start = Instant::now();
    let (model, issues) = model::build(&services, &slices, &node, IpFamily::V4);
    let build_time = start.elapsed();
    assert!(issues.is_empty(), "{issues:?}");
    println!(
        "model build from Service/EndpointSlice objects: {}",
        millis(build_time)
    );
    // What `run` does per sync: the per-Service cache, after one slice
    // changed (objects from the API carry resourceVersions).
    let versioned = |mut meta: ObjectMeta| {
        meta.resource_version = Some("1".into());
        meta
    };
    // Shared, as the agent's caches hold them: a change is a new allocation.
    let services: Vec<Arc<Service>> = services
        .into_iter()
        .map(|mut s| {
            s.metadata = versioned(s.metadata);
            Arc::new(s)
        })
        .collect();
    let mut slices: Vec<Arc<EndpointSlice>> = slices
        .into_iter()
        .map(|mut s| {
            s.metadata = versioned(s.metadata);
            Arc::new(s)
        })
        .collect();
    let mut cache = ModelCache::new(IpFamily::V4);
    cache.build(&services, &slices, &node);
    let mut times = Vec::new();
    for run in 0..args.runs.max(1) {
        let changed = Arc::make_mut(&mut slices[run % s.max(1)]);
        changed.metadata.resource_version = Some(format!("{}", run + 2));
        changed.endpoints.pop();
        let start = Instant::now();
        let (_, issues) = cache.build(&services, &slices, &node);
        times.push(start.elapsed());
        assert!(issues.is_empty() && cache.rebuilt == 1);
    }
    times.sort();
    println!(
        "incremental model build after one EndpointSlice changed: median {} ({} runs)",
        millis(times[times.len() / 2]),
        times.len()
    );

    let options = ProxyOptions {
        cluster_cidrs: vec!["10.128.0.0/9".into()],
        accounting: rules::Accounting {
            invalid_dropped: args.nfacct,
            localhost_nodeports: args.nfacct,
        },
        ..ProxyOptions::default()
    };
    let config = options.render_config(IpFamily::V4, &node).expect("config");
    let jumps = rules::builtin_jumps(&config);
    let dispatch = match args.dispatch {
        DispatchArg::Auto => rules::Dispatch::for_model(&model, rules::Dispatch::Flat),
        DispatchArg::Flat => rules::Dispatch::Flat,
        DispatchArg::Buckets => rules::Dispatch::Buckets,
    };
    println!("dispatch layout: {dispatch:?}");
    let render_options = RenderOptions {
        builtin_jumps: &jumps,
        dispatch,
        ..RenderOptions::default()
    };
    let mut times = Vec::new();
    let mut payload = rules::render(&model, &config, &render_options);
    for _ in 0..args.runs.max(1) {
        let start = Instant::now();
        payload = rules::render(&model, &config, &render_options);
        times.push(start.elapsed());
    }
    times.sort();
    println!(
        "render: min {}, median {}, max {} ({} runs)",
        millis(times[0]),
        millis(times[times.len() / 2]),
        millis(times[times.len() - 1]),
        times.len()
    );
    println!(
        "payload: {} bytes ({:.1} MiB), {} lines",
        payload.text.len(),
        payload.text.len() as f64 / 1_048_576.0,
        payload.text.lines().count()
    );
    for (table, stats) in [
        ("mangle", payload.mangle),
        ("filter", payload.filter),
        ("nat", payload.nat),
    ] {
        println!(
            "  {table:6} chains {:>7}  rules {:>7}",
            stats.chains, stats.rules
        );
    }
    let kube_proxy_rules = 5 + 2 * s + 3 * s * e;
    let kube_proxy_chains = 4 + s + s * e;
    println!(
        "nat rules: {} vs kube-proxy 5 + 2S + 3SE = {} ({:.2}×)",
        payload.nat.rules,
        kube_proxy_rules,
        payload.nat.rules as f64 / kube_proxy_rules as f64
    );
    println!(
        "nat chains: {} vs kube-proxy ≈ 4 + S + SE = {} (one chain per Service and per endpoint)",
        payload.nat.chains, kube_proxy_chains
    );
    let problems = rules::check::check(&payload.text);
    println!("consistency check: {} problem(s)", problems.len());
    if let Some(path) = &args.out {
        std::fs::write(path, &payload.text).expect("write payload");
    }
    // A partial sync as `run` makes it when one Service gains an endpoint:
    // that port's chains plus the dispatch chains.
    let mut changed_model = model.clone();
    let first = Arc::make_mut(&mut changed_model.service_ports[0]);
    let mut extra = first.cluster_endpoints[0].clone();
    extra.ip = "10.255.255.254".parse().expect("literal");
    first.cluster_endpoints.push(extra);
    let only = std::collections::BTreeSet::from([(first.name.clone(), first.protocol)]);
    let start = Instant::now();
    let partial = rules::render(
        &changed_model,
        &config,
        &RenderOptions {
            builtin_jumps: &[],
            delete_nat_chains: &payload.service_chains,
            partial: Some(Partial {
                only: &only,
                previous: &model,
                applied_chains: &payload.service_chains,
                applied_totals: payload.totals,
            }),
            dispatch,
        },
    );
    println!(
        "partial render (one Service changed): {}, {} bytes, {} nat rules written",
        millis(start.elapsed()),
        partial.text.len(),
        partial.nat.rules
    );
    for &backend in &args.apply {
        let netfilter = Netfilter::new(IpFamily::V4, backend);
        match apply(&netfilter, &[&payload.text, &partial.text]) {
            Ok(times) => println!(
                "apply ({} --noflush, fresh netns): full {:.2} s, then partial {:.2} s",
                netfilter.restore_program(),
                times[0].as_secs_f64(),
                times[1].as_secs_f64()
            ),
            Err(error) => println!("apply with {backend}: {error}"),
        }
    }
}

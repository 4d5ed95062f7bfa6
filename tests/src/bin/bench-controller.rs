//! bench-controller: causeway-controller creating many LoadBalancer Services
//! at once against moto (issue 5, performance).
//!
//! Starts an environment (real kube-apiserver + moto), measures moto's own
//! rate for the calls one create makes (boto3 replaying them sequentially),
//! then starts the controller, creates `--services` one-port Services at once
//! and reports: time until each has its ingress hostname (median, p99, all),
//! AWS calls in total and per Service, the time moto alone would need for those
//! calls, the controller's CPU time and peak RSS, and the AWS calls of one
//! no-op resync of every Service. Prints Markdown for docs/benchmarks.md.
//!
//! Run as root: `cargo build --release -p causeway-controller -p causeway-tests`
//! then `target/release/bench-controller [--services 200]`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use causeway_tests::controller::{ControllerProcess, calls_between, moto_python};
use causeway_tests::{Cluster, ClusterOptions};
use clap::Parser;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

#[derive(Parser)]
#[command(name = "bench-controller")]
struct Args {
    /// Services created at once.
    #[arg(long, default_value_t = 200)]
    services: usize,
    /// Nodes (targets per target group).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Creates boto3 replays to measure moto's own rate.
    #[arg(long, default_value_t = 30)]
    replay: usize,
    /// Arguments for `causeway-controller run` (default: no client-side rate
    /// limit, so the benchmark measures the controller against moto).
    #[arg(
        long,
        allow_hyphen_values = true,
        default_value = "--leader-elect=false --workers 4 --aws-describe-rate 0 --aws-register-rate 0 --aws-modify-rate 0"
    )]
    controller_args: String,
    /// Annotate the Services with
    /// `aws-load-balancer-manage-backend-security-group-rules: "false"` (no
    /// node-SG rules: each Service adds two, and AWS's default quota is 60
    /// rules per security group, which moto enforces too).
    #[arg(long)]
    no_backend_rules: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// boto3 replaying, sequentially, the seven calls one create makes.
fn moto_rate(cluster: &Cluster, creates: usize) -> Result<(u64, f64)> {
    let snippet = format!(
        r#"
import time
ours = 'kubernetes.io/cluster/{name}'
subnets = [s for s in ec2.describe_subnets()['Subnets'] if any(t['Key'] == ours for t in s.get('Tags', []))]
vpc = subnets[0]['VpcId']
# The second authorize of a create goes to the node SG; the replay uses a
# scratch group so as not to eat the node SG's rule quota.
node_sg = ec2.create_security_group(GroupName='replay-nodes', Description='replay', VpcId=vpc)['GroupId']
instances = [i['InstanceId'] for r in ec2.describe_instances()['Reservations'] for i in r['Instances']]
made = []
start = time.monotonic()
calls = 0
for n in range({creates}):
    tags = [{{'Key': 'bench', 'Value': str(n)}}]
    sg = ec2.create_security_group(GroupName='replay-%d' % n, Description='replay', VpcId=vpc,
        TagSpecifications=[{{'ResourceType': 'security-group', 'Tags': tags}}])['GroupId']
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[{{'IpProtocol': 'tcp', 'FromPort': 80, 'ToPort': 80,
        'IpRanges': [{{'CidrIp': '0.0.0.0/0', 'Description': 'replay'}}]}}])
    ec2.authorize_security_group_ingress(GroupId=node_sg, IpPermissions=[{{'IpProtocol': 'tcp', 'FromPort': 31000 + n, 'ToPort': 31000 + n,
        'UserIdGroupPairs': [{{'GroupId': sg, 'Description': 'replay %d' % n}}]}}])
    lb = elb.create_load_balancer(Name='replay-%d' % n, Type='network', Scheme='internet-facing',
        Subnets=[s['SubnetId'] for s in subnets], SecurityGroups=[sg], Tags=tags)['LoadBalancers'][0]['LoadBalancerArn']
    tg = elb.create_target_group(Name='replay-%d' % n, Protocol='TCP', Port=31000 + n, VpcId=vpc, TargetType='instance',
        HealthCheckProtocol='HTTP', HealthCheckPort='10256', HealthCheckPath='/healthz', Tags=tags)['TargetGroups'][0]['TargetGroupArn']
    elb.register_targets(TargetGroupArn=tg, Targets=[{{'Id': i, 'Port': 31000 + n}} for i in instances])
    l = elb.create_listener(LoadBalancerArn=lb, Protocol='TCP', Port=80,
        DefaultActions=[{{'Type': 'forward', 'TargetGroupArn': tg}}])['Listeners'][0]['ListenerArn']
    calls += 7
    made.append((sg, lb, tg, l, 31000 + n))
elapsed = time.monotonic() - start
for sg, lb, tg, l, port in made:
    elb.delete_listener(ListenerArn=l)
    elb.delete_load_balancer(LoadBalancerArn=lb)
    elb.delete_target_group(TargetGroupArn=tg)
    # Best effort: what stays carries no tag of ours.
    try:
        ec2.revoke_security_group_ingress(GroupId=node_sg, IpPermissions=[{{'IpProtocol': 'tcp', 'FromPort': port, 'ToPort': port,
            'UserIdGroupPairs': [{{'GroupId': sg, 'Description': 'replay %d' % (port - 31000)}}]}}])
        ec2.delete_security_group(GroupId=sg)
    except Exception:
        pass
print(calls, elapsed)
"#,
        name = cluster.cluster_name(),
    );
    let out = moto_python(cluster, &snippet)?;
    let mut it = out.split_whitespace();
    let calls: u64 = it.next().unwrap_or("0").parse()?;
    let secs: f64 = it.next().unwrap_or("0").parse()?;
    Ok((calls, secs))
}

fn service(n: usize, no_backend_rules: bool) -> Result<Service> {
    let annotations = if no_backend_rules {
        json!({"service.beta.kubernetes.io/aws-load-balancer-manage-backend-security-group-rules": "false"})
    } else {
        json!({})
    };
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("bench-{n}"), "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": "causeway.dev/nlb",
            "selector": {"run": format!("bench-{n}")},
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]
        }
    }))?)
}

/// utime + stime (seconds) and peak RSS (MiB) of a process.
fn cpu_and_rss(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command: state is index 0, utime 11, stime 12; 100 ticks/s.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, hwm_kib / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = Cluster::start(ClusterOptions::nodes(args.nodes)).await?;
    let (replay_calls, replay_secs) = moto_rate(&cluster, args.replay)?;
    let moto_rate = replay_calls as f64 / replay_secs;
    eprintln!("moto alone: {replay_calls} calls in {replay_secs:.2} s = {moto_rate:.1} calls/s");

    let controller_args: Vec<&str> = args.controller_args.split_whitespace().collect();
    let controller = ControllerProcess::start(&cluster, &controller_args)?;
    controller.wait_ready(Duration::from_secs(60))?;
    // Start-up lookups (node SG, subnets) and the first orphan sweep done.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !controller.log().contains("causeway-controller running") {
        if Instant::now() > deadline {
            bail!("no start-up lookups; log:\n{}", controller.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (cpu_start, _) = cpu_and_rss(controller.pid());
    let calls_before = controller.aws_calls()?;

    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let start = Instant::now();
    let mut creates = Vec::new();
    for n in 0..args.services {
        let services = services.clone();
        let no_backend_rules = args.no_backend_rules;
        creates.push(tokio::spawn(async move {
            services
                .create(&PostParams::default(), &service(n, no_backend_rules)?)
                .await?;
            Ok::<(usize, Duration), anyhow::Error>((n, start.elapsed()))
        }));
    }
    let mut created_at = BTreeMap::new();
    for c in creates {
        let (n, at) = c.await??;
        created_at.insert(format!("bench-{n}"), at);
    }
    let all_created = start.elapsed();

    let mut ready_at: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while ready_at.len() < args.services {
        if Instant::now() > deadline {
            bail!(
                "{} of {} Services have ingress after {}s",
                ready_at.len(),
                args.services,
                args.timeout
            );
        }
        for svc in services.list(&ListParams::default()).await?.items {
            let name = svc.metadata.name.clone().unwrap_or_default();
            let has = svc
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .is_some_and(|i| i.iter().any(|i| i.hostname.is_some()));
            if has && created_at.contains_key(&name) && !ready_at.contains_key(&name) {
                ready_at.insert(name, start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = start.elapsed();
    let calls = calls_between(&calls_before, &controller.aws_calls()?);
    let (cpu_end, rss) = cpu_and_rss(controller.pid());
    let total_calls: u64 = calls.values().sum();

    let mut per_service: Vec<f64> = ready_at
        .iter()
        .map(|(name, at)| (at.saturating_sub(created_at[name])).as_secs_f64())
        .collect();
    per_service.sort_by(f64::total_cmp);

    // One no-op resync of every Service: touch each, wait for the reconciles.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls_before = controller.aws_calls()?;
    let reconciles_before = controller.reconciles()?;
    for n in 0..args.services {
        services
            .patch(
                &format!("bench-{n}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
            )
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while controller.reconciles()? < reconciles_before + args.services as u64 {
        if Instant::now() > deadline {
            bail!("resync did not finish");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resync_calls: u64 = calls_between(&calls_before, &controller.aws_calls()?)
        .values()
        .sum();

    let moto_floor = total_calls as f64 / moto_rate;
    println!("| Services created at once | {} |", args.services);
    println!("| controller args | `{}` |", args.controller_args);
    println!("| node-SG rules managed | {} |", !args.no_backend_rules);
    println!(
        "| all Service objects created (apiserver) | {:.2} s |",
        all_created.as_secs_f64()
    );
    println!(
        "| time until every Service has ingress | {:.2} s |",
        total.as_secs_f64()
    );
    println!(
        "| per Service, create → ingress: median / p99 / max | {:.2} s / {:.2} s / {:.2} s |",
        percentile(&per_service, 50.0),
        percentile(&per_service, 99.0),
        percentile(&per_service, 100.0)
    );
    println!(
        "| AWS calls in total (per Service) | {total_calls} ({:.2}) |",
        total_calls as f64 / args.services as f64
    );
    println!("| AWS calls by operation | {calls:?} |");
    println!(
        "| moto alone, same calls replayed by boto3 | {moto_rate:.1} calls/s ({replay_calls} calls in {replay_secs:.2} s) |"
    );
    println!(
        "| total calls ÷ moto's rate | {moto_floor:.2} s → ratio {:.2} (target ≤ 1.5) |",
        total.as_secs_f64() / moto_floor
    );
    println!(
        "| controller CPU time during the creates / peak RSS | {:.2} s / {rss:.1} MiB |",
        cpu_end - cpu_start
    );
    println!(
        "| AWS calls of one no-op resync of all {} Services | {resync_calls} |",
        args.services
    );
    Ok(())
}

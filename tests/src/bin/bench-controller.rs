//! bench-controller: causeway-controller with many LoadBalancer Services
//! against moto (issue 5, performance).
//!
//! Starts an environment (real kube-apiserver + moto), measures moto's own
//! rate for the calls one create makes (boto3 replaying them sequentially, as
//! many creates as the run makes, so moto holds as much state as during the
//! run), then starts the controller and measures, in order:
//!
//! 1. **creates**: `--services` one-port Services created at once; time until
//!    each has its ingress hostname (seen through a watch; median, p99, all),
//!    AWS calls in total, by operation and per Service, the time moto alone
//!    would need for those calls, and why the two differ: where the CPU went
//!    (controller, moto, apiserver, etcd, this program), how much of the time
//!    moto ran and had a runnable thread (had work), how much of the time
//!    some task waited for a CPU (PSI), the apiserver writes and reconciles;
//! 2. **steady resyncs**: every Service touched (a label) and then one Node
//!    labelled (which makes the controller reconcile every Service): AWS calls
//!    made (target 0), the controller's CPU time and the wall time until every
//!    reconcile finished; and the reconciles a Node heartbeat causes (none);
//! 3. **node added**: a moto instance and a Node with its providerID; time
//!    until every target group has it registered, AWS calls by operation
//!    (target: one RegisterTargets per target group, nothing else), checked
//!    in moto afterwards;
//! 4. the controller's CPU time over the whole run and its RSS (VmRSS, VmHWM);
//! 5. **restart**: a new controller process reads every Service back (no
//!    cache, so each is observed): time until every target group's targets
//!    were read, AWS calls by operation and per Service, writes (target 0).
//!
//! Prints Markdown for docs/benchmarks.md on stdout, progress on stderr.
//!
//! Run as root: `cargo build [--release] -p causeway-controller -p causeway-tests`
//! then `<target>/{debug,release}/bench-controller [--services 200] [--no-backend-rules]`
//! (it starts the `causeway-controller` built next to it). More than 29
//! Services need `--no-backend-rules` (see [`Args`]).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use causeway_tests::controller::{ControllerProcess, calls_between, moto_python};
use causeway_tests::{Cluster, ClusterOptions};
use clap::Parser;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;

/// Services whose node-SG rules fit the default quota of 60 rules per
/// security group (two rules each, plus what the node SG starts with).
const MAX_SERVICES_WITH_BACKEND_RULES: usize = 29;

#[derive(Parser)]
#[command(name = "bench-controller")]
struct Args {
    /// Services created at once.
    #[arg(long, default_value_t = 200)]
    services: usize,
    /// Nodes (targets per target group) before one is added.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Creates boto3 replays to measure moto's own rate (default: as many as
    /// `--services`, so that moto holds as much state as during the run).
    #[arg(long)]
    replay: Option<usize>,
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
    /// rules per security group, which moto enforces too). Needed above 29
    /// Services.
    #[arg(long)]
    no_backend_rules: bool,
    /// Give up waiting for any one phase after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// What boto3 measured replaying the creates.
struct Replay {
    calls: u64,
    secs: f64,
    /// moto's CPU time during the replay.
    moto_cpu: f64,
}

impl Replay {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.secs
    }
}

/// boto3 replaying, sequentially, the calls one create makes (six, seven
/// with the node-SG rule), `creates` times; everything is deleted afterwards.
fn moto_rate(
    cluster: &Cluster,
    creates: usize,
    backend_rules: bool,
    moto_pid: u32,
) -> Result<Replay> {
    let snippet = format!(
        r#"
import os, time
def moto_cpu():
    f = open('/proc/{moto_pid}/stat').read().rsplit(') ', 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')
ours = 'kubernetes.io/cluster/{name}'
subnets = [s for s in ec2.describe_subnets()['Subnets'] if any(t['Key'] == ours for t in s.get('Tags', []))]
vpc = subnets[0]['VpcId']
backend_rules = {backend_rules}
# The node-SG authorize goes to scratch groups (50 rules each), so as not to
# eat the node SG's quota of 60 rules.
scratch = [ec2.create_security_group(GroupName='replay-nodes-%d' % i, Description='replay', VpcId=vpc)['GroupId']
           for i in range(({creates} + 49) // 50 if backend_rules else 0)]
instances = [i['InstanceId'] for r in ec2.describe_instances()['Reservations'] for i in r['Instances']]
made = []
cpu_start = moto_cpu()
start = time.monotonic()
calls = 0
for n in range({creates}):
    tags = [{{'Key': 'bench', 'Value': str(n)}}]
    sg = ec2.create_security_group(GroupName='replay-%d' % n, Description='replay', VpcId=vpc,
        TagSpecifications=[{{'ResourceType': 'security-group', 'Tags': tags}}])['GroupId']
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[{{'IpProtocol': 'tcp', 'FromPort': 80, 'ToPort': 80,
        'IpRanges': [{{'CidrIp': '0.0.0.0/0', 'Description': 'replay'}}]}}])
    if backend_rules:
        ec2.authorize_security_group_ingress(GroupId=scratch[n // 50], IpPermissions=[{{'IpProtocol': 'tcp', 'FromPort': 31000 + n, 'ToPort': 31000 + n,
            'UserIdGroupPairs': [{{'GroupId': sg, 'Description': 'replay %d' % n}}]}}])
        calls += 1
    lb = elb.create_load_balancer(Name='replay-%d' % n, Type='network', Scheme='internet-facing',
        Subnets=[s['SubnetId'] for s in subnets], SecurityGroups=[sg], Tags=tags)['LoadBalancers'][0]['LoadBalancerArn']
    tg = elb.create_target_group(Name='replay-%d' % n, Protocol='TCP', Port=31000 + n, VpcId=vpc, TargetType='instance',
        HealthCheckProtocol='HTTP', HealthCheckPort='10256', HealthCheckPath='/healthz', Tags=tags)['TargetGroups'][0]['TargetGroupArn']
    elb.register_targets(TargetGroupArn=tg, Targets=[{{'Id': i, 'Port': 31000 + n}} for i in instances])
    l = elb.create_listener(LoadBalancerArn=lb, Protocol='TCP', Port=80,
        DefaultActions=[{{'Type': 'forward', 'TargetGroupArn': tg}}])['Listeners'][0]['ListenerArn']
    calls += 6
    made.append((sg, lb, tg, l, 31000 + n))
elapsed = time.monotonic() - start
cpu = moto_cpu() - cpu_start
for sg, lb, tg, l, port in made:
    elb.delete_listener(ListenerArn=l)
    elb.delete_load_balancer(LoadBalancerArn=lb)
    elb.delete_target_group(TargetGroupArn=tg)
    # Best effort: what stays carries no tag of ours.
    try:
        if backend_rules:
            n = port - 31000
            ec2.revoke_security_group_ingress(GroupId=scratch[n // 50], IpPermissions=[{{'IpProtocol': 'tcp', 'FromPort': port, 'ToPort': port,
                'UserIdGroupPairs': [{{'GroupId': sg, 'Description': 'replay %d' % n}}]}}])
        ec2.delete_security_group(GroupId=sg)
    except Exception:
        pass
for g in scratch:
    try:
        ec2.delete_security_group(GroupId=g)
    except Exception:
        pass
print(calls, elapsed, cpu)
"#,
        name = cluster.cluster_name(),
        backend_rules = if backend_rules { "True" } else { "False" },
    );
    let out = moto_python(cluster, &snippet)?;
    let mut it = out.split_whitespace();
    Ok(Replay {
        calls: it.next().unwrap_or("0").parse()?,
        secs: it.next().unwrap_or("0").parse()?,
        moto_cpu: it.next().unwrap_or("0").parse()?,
    })
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

/// Fields of /proc/<pid>/stat after the command (state is index 0).
fn stat_fields(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_default()
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').map(str::to_string).collect())
        .unwrap_or_default()
}

/// utime + stime of a process in seconds (100 ticks/s), 0 when it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let fields = stat_fields(pid);
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// VmRSS and VmHWM (peak RSS) of a process, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// The processes whose CPU time is reported, by name.
struct Processes(Vec<(&'static str, u32)>);

impl Processes {
    fn sample(&self) -> Vec<f64> {
        self.0.iter().map(|(_, pid)| cpu_seconds(*pid)).collect()
    }

    /// `controller 1.20 s · moto 3.40 s · …` between two samples.
    fn between(&self, before: &[f64], after: &[f64]) -> String {
        self.0
            .iter()
            .zip(before.iter().zip(after))
            .map(|((name, _), (b, a))| format!("{name} {:.2} s", a - b))
            .collect::<Vec<_>>()
            .join(" · ")
    }
}

/// The apiserver's writes so far (`apiserver_request_total`, verbs other
/// than GET, LIST and WATCH), by `VERB resource[/subresource]`.
async fn apiserver_writes(client: &kube::Client) -> Result<BTreeMap<String, u64>> {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new())?)
        .await?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |key: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
                .and_then(|v| v.split('"').next())
                .unwrap_or_default()
                .to_string()
        };
        let verb = label("verb");
        if matches!(verb.as_str(), "GET" | "LIST" | "WATCH" | "CONNECT") {
            continue;
        }
        let sub = label("subresource");
        let key = if sub.is_empty() {
            format!("{verb} {}", label("resource"))
        } else {
            format!("{verb} {}/{sub}", label("resource"))
        };
        *out.entry(key).or_insert(0) += value.parse::<f64>().unwrap_or(0.0) as u64;
    }
    Ok(out)
}

/// Time (µs) during which some runnable task waited for a CPU, system-wide
/// (`/proc/pressure/cpu`, "some"); 0 without PSI.
fn cpu_pressure_us() -> f64 {
    std::fs::read_to_string("/proc/pressure/cpu")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("some "))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Samples, every 10 ms on its own thread, whether any thread of a process
/// is runnable (state R: running or waiting for a CPU), until stopped.
/// Runnable but not running = starved of CPU; neither = idle, waiting for
/// requests.
struct RunnableSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl RunnableSampler {
    fn start(pid: u32) -> RunnableSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut samples, mut runnable) = (0u64, 0u64);
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                    .into_iter()
                    .flatten()
                    .flatten();
                let any = tasks.into_iter().any(|t| {
                    std::fs::read_to_string(t.path().join("stat"))
                        .ok()
                        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('R')))
                        .unwrap_or(false)
                });
                samples += 1;
                runnable += u64::from(any);
                std::thread::sleep(Duration::from_millis(10));
            }
            (samples, runnable)
        });
        RunnableSampler { stop, thread }
    }

    /// The fraction of samples in which the process had a runnable thread.
    fn finish(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (samples, runnable) = self.thread.join().unwrap_or((0, 0));
        runnable as f64 / samples.max(1) as f64
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Calls by operation as `Op n, Op n` (or `none`).
fn by_operation(calls: &BTreeMap<String, u64>) -> String {
    if calls.is_empty() {
        return "none".into();
    }
    calls
        .iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// When each Service first had an ingress hostname, as a watch saw it (a
/// list every 100 ms would cost the apiserver, and this program, more CPU
/// than the controller at 1 000 Services).
fn watch_ingress(services: Api<Service>) -> Arc<Mutex<BTreeMap<String, Instant>>> {
    let ready = Arc::new(Mutex::new(BTreeMap::new()));
    let seen = ready.clone();
    tokio::spawn(async move {
        let stream = watcher(services, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let Ok(svc) = event else { continue };
            let has = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .is_some_and(|i| i.iter().any(|i| i.hostname.is_some()));
            if has {
                seen.lock()
                    .expect("ready lock")
                    .entry(svc.name_any())
                    .or_insert_with(Instant::now);
            }
        }
    });
    ready
}

/// Polls `done` every 50 ms until it holds; fails after `timeout`.
async fn wait_for(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done()? {
        if Instant::now() > deadline {
            bail!("{what}: not done after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A new moto instance in the first public subnet, in the node SG; its ID,
/// zone and private IP.
fn run_instance(cluster: &Cluster, name: &str) -> Result<(String, String, String)> {
    let aws = cluster.aws();
    let subnet = aws
        .subnets
        .iter()
        .find(|s| s.role == "elb")
        .context("no public subnet seeded")?;
    let out = moto_python(
        cluster,
        &format!(
            r#"
i = ec2.run_instances(ImageId='ami-12c6146b', InstanceType='t3.medium', MinCount=1, MaxCount=1,
    SubnetId='{subnet}', SecurityGroupIds=['{sg}'],
    TagSpecifications=[{{'ResourceType': 'instance', 'Tags': [{{'Key': 'Name', 'Value': '{name}'}}]}}])['Instances'][0]
print(i['InstanceId'], '{zone}', i['PrivateIpAddress'])
"#,
            subnet = subnet.id,
            sg = aws.node_security_group,
            zone = subnet.zone,
        ),
    )?;
    let mut it = out.split_whitespace().map(str::to_string);
    match (it.next(), it.next(), it.next()) {
        (Some(id), Some(zone), Some(ip)) => Ok((id, zone, ip)),
        _ => bail!("run_instances printed {out:?}"),
    }
}

/// A Node as the harness writes them (no kubelet): created, then its status
/// patched Ready.
async fn create_node(
    cluster: &Cluster,
    name: &str,
    instance: &str,
    zone: &str,
    ip: &str,
) -> Result<()> {
    let api: Api<Node> = Api::all(cluster.client());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "topology.kubernetes.io/zone": zone, "node.kubernetes.io/instance-type": "t3.medium"
        }},
        "spec": {"providerID": format!("aws:///{zone}/{instance}")}
    }))?;
    api.create(&PostParams::default(), &node).await?;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "bench node", "lastHeartbeatTime": now, "lastTransitionTime": now}]
        }})),
    )
    .await?;
    Ok(())
}

/// A kubelet-style heartbeat: the Ready condition's lastHeartbeatTime moves.
async fn heartbeat(cluster: &Cluster, name: &str) -> Result<()> {
    let api: Api<Node> = Api::all(cluster.client());
    let node = api.get(name).await?;
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut conditions = node
        .status
        .and_then(|s| s.conditions)
        .context("node has no conditions")?;
    for c in &mut conditions {
        c.last_heartbeat_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conditions}})),
    )
    .await?;
    Ok(())
}

/// Whether a measurement met its target, for the tables.
fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// One no-op resync: what it cost.
struct Resync {
    calls: BTreeMap<String, u64>,
    cpu: f64,
    wall: Duration,
}

/// Runs `trigger`, waits until `expected` more reconciles finished, and
/// measures the AWS calls and controller CPU time in between.
async fn resync<F: std::future::Future<Output = Result<()>>>(
    controller: &ControllerProcess,
    expected: u64,
    timeout: Duration,
    trigger: F,
) -> Result<Resync> {
    let calls_before = controller.aws_calls()?;
    let reconciles_before = controller.reconciles()?;
    let cpu_before = cpu_seconds(controller.pid());
    let start = Instant::now();
    trigger.await?;
    wait_for("resync", timeout, || {
        Ok(controller.reconciles()? >= reconciles_before + expected)
    })
    .await?;
    let wall = start.elapsed();
    let cpu = cpu_seconds(controller.pid()) - cpu_before;
    // Calls a reconcile might still make after the counter moved.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Resync {
        calls: calls_between(&calls_before, &controller.aws_calls()?),
        cpu,
        wall,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.no_backend_rules && args.services > MAX_SERVICES_WITH_BACKEND_RULES {
        bail!(
            "{} Services with node-SG rules exceed the node SG's quota of 60 rules \
             (two per Service; at most {MAX_SERVICES_WITH_BACKEND_RULES} fit): add --no-backend-rules",
            args.services
        );
    }
    let timeout = Duration::from_secs(args.timeout);
    let cluster = Cluster::start(ClusterOptions::nodes(args.nodes)).await?;
    let pid_of = |name: &str| {
        cluster
            .recorded()
            .processes
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.pid)
            .with_context(|| format!("{name} is not running"))
    };
    let moto_pid = pid_of("moto_server")?;

    let replay_creates = args.replay.unwrap_or(args.services);
    eprintln!("replaying {replay_creates} creates with boto3…");
    let replay = moto_rate(&cluster, replay_creates, !args.no_backend_rules, moto_pid)?;
    eprintln!(
        "moto alone: {} calls in {:.2} s = {:.1} calls/s",
        replay.calls,
        replay.secs,
        replay.rate()
    );

    let controller_args: Vec<&str> = args.controller_args.split_whitespace().collect();
    let controller = ControllerProcess::start(&cluster, &controller_args)?;
    controller.wait_ready(Duration::from_secs(60))?;
    // Start-up lookups (node SG, subnets) and the first orphan sweep done.
    wait_for("controller start-up", Duration::from_secs(30), || {
        Ok(controller.log().contains("causeway-controller running"))
    })
    .await
    .with_context(|| controller.log())?;
    let processes = Processes(vec![
        ("controller", controller.pid()),
        ("moto", moto_pid),
        ("kube-apiserver", pid_of("kube-apiserver")?),
        ("etcd", pid_of("etcd")?),
        ("bench-controller", std::process::id()),
    ]);

    // 1. Creates.
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let ready = watch_ingress(services.clone());
    eprintln!("creating {} Services…", args.services);
    let cpu_before = processes.sample();
    let pressure_before = cpu_pressure_us();
    let moto_runnable = RunnableSampler::start(moto_pid);
    let writes_before = apiserver_writes(&cluster.client()).await?;
    let reconciles_before = controller.reconciles()?;
    let calls_before = controller.aws_calls()?;
    let start = Instant::now();
    let creates = futures::stream::iter(0..args.services)
        .map(|n| {
            let services = services.clone();
            let no_backend_rules = args.no_backend_rules;
            async move {
                services
                    .create(&PostParams::default(), &service(n, no_backend_rules)?)
                    .await?;
                Ok::<_, anyhow::Error>((format!("bench-{n}"), Instant::now()))
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut created_at = BTreeMap::new();
    for c in creates {
        let (name, at) = c?;
        created_at.insert(name, at);
    }
    let all_created = start.elapsed();
    wait_for("every Service has ingress", timeout, || {
        let ready = ready.lock().expect("ready lock");
        Ok(created_at.keys().all(|name| ready.contains_key(name)))
    })
    .await?;
    let ready_at = ready.lock().expect("ready lock").clone();
    let total = ready_at
        .values()
        .max()
        .map_or(Duration::ZERO, |last| last.duration_since(start));
    let calls = calls_between(&calls_before, &controller.aws_calls()?);
    let cpu_after = processes.sample();
    let pressure = (cpu_pressure_us() - pressure_before) / 1e6 / start.elapsed().as_secs_f64();
    let moto_runnable = moto_runnable.finish();
    let reconciles = controller.reconciles()? - reconciles_before;
    let writes = calls_between(&writes_before, &apiserver_writes(&cluster.client()).await?);
    let total_calls: u64 = calls.values().sum();
    let mut per_service: Vec<f64> = created_at
        .iter()
        .map(|(name, at)| ready_at[name].saturating_duration_since(*at).as_secs_f64())
        .collect();
    per_service.sort_by(f64::total_cmp);
    let moto_cpu_creates = cpu_after[1] - cpu_before[1];

    // 2. Steady resyncs: every Service touched, then one node heartbeat.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = args.services as u64;
    eprintln!("touching every Service…");
    let touch = resync(&controller, n, timeout, async {
        let patched = futures::stream::iter(0..args.services)
            .map(|i| {
                let services = services.clone();
                async move {
                    services
                        .patch(
                            &format!("bench-{i}"),
                            &PatchParams::default(),
                            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
                        )
                        .await
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        for p in patched {
            p?;
        }
        Ok(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("one node labelled…");
    let first_node = cluster.nodes()[0].name.clone();
    let labelled = resync(&controller, n, timeout, async {
        Api::<Node>::all(cluster.client())
            .patch(
                &first_node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"bench-touched": "yes"}}})),
            )
            .await?;
        Ok(())
    })
    .await?;
    // A kubelet heartbeat changes nothing targets depend on: no reconcile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reconciles_before_beat = controller.reconciles()?;
    heartbeat(&cluster, &first_node).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let beat_reconciles = controller.reconciles()? - reconciles_before_beat;

    // 3. One node added.
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("adding a node…");
    let (instance, zone, ip) = run_instance(&cluster, "node-added")?;
    let calls_before = controller.aws_calls()?;
    let cpu_before_add = cpu_seconds(controller.pid());
    let registers = |calls: &BTreeMap<String, u64>| calls.get("RegisterTargets").copied();
    let registers_before = registers(&calls_before).unwrap_or(0);
    let start_add = Instant::now();
    create_node(&cluster, "node-added", &instance, &zone, &ip).await?;
    wait_for("every target group has the new node", timeout, || {
        Ok(registers(&controller.aws_calls()?).unwrap_or(0) >= registers_before + n)
    })
    .await?;
    let node_add_wall = start_add.elapsed();
    // The Node's status patch triggers a second resync, which must cost nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node_add_calls = calls_between(&calls_before, &controller.aws_calls()?);
    let node_add_cpu = cpu_seconds(controller.pid()) - cpu_before_add;
    let check = moto_python(
        &cluster,
        &format!(
            r#"
tgs = [tg for page in elb.get_paginator('describe_target_groups').paginate() for tg in page['TargetGroups']]
have = sum(1 for tg in tgs if any(d['Target']['Id'] == '{instance}'
    for d in elb.describe_target_health(TargetGroupArn=tg['TargetGroupArn'])['TargetHealthDescriptions']))
print(have, len(tgs))
"#
        ),
    )?;
    let (tgs_with_node, tgs) = match check
        .split_whitespace()
        .map(str::parse::<u64>)
        .collect::<Result<Vec<_>, _>>()?[..]
    {
        [have, all] => (have, all),
        _ => bail!("target check printed {check:?}"),
    };

    // 4. The controller over the whole run.
    let controller_cpu = cpu_seconds(controller.pid());
    let (rss, hwm) = memory_mib(controller.pid());

    // 5. A restart reads every Service back.
    drop(controller);
    eprintln!("restarting the controller…");
    let start_restart = Instant::now();
    let restarted = ControllerProcess::start(&cluster, &controller_args)?;
    wait_for("every Service read back", timeout, || {
        let calls = restarted.aws_calls().unwrap_or_default();
        Ok(calls.get("DescribeTargetHealth").copied().unwrap_or(0) >= n
            && restarted.reconciles().unwrap_or(0) >= n)
    })
    .await
    .with_context(|| restarted.log())?;
    let restart_wall = start_restart.elapsed();
    let restart_cpu = cpu_seconds(restarted.pid());
    // Calls a reconcile might still make after the counters moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restart_calls = restarted.aws_calls()?;
    let restart_total: u64 = restart_calls.values().sum();
    let restart_writes = causeway_tests::controller::writes(&restart_calls);

    let moto_floor = total_calls as f64 / replay.rate();
    let ratio = total.as_secs_f64() / moto_floor;
    let per_create = total_calls as f64 / args.services as f64;
    println!(
        "**{} one-port Services created at once** (node-SG rules {})",
        args.services,
        if args.no_backend_rules {
            "off: `--no-backend-rules`"
        } else {
            "on"
        }
    );
    println!();
    println!("| | |");
    println!("|---|---|");
    println!("| controller args | `{}` |", args.controller_args);
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
        "| AWS calls in total (per Service) | {total_calls} ({per_create:.2}; target ≤ 8: {}) |",
        verdict(per_create <= 8.0)
    );
    println!("| AWS calls by operation | {} |", by_operation(&calls));
    println!(
        "| moto alone, same calls replayed by boto3 ({replay_creates} creates) | {:.1} calls/s ({} calls in {:.2} s) |",
        replay.rate(),
        replay.calls,
        replay.secs
    );
    println!(
        "| total calls ÷ moto's rate | {moto_floor:.2} s → ratio **{ratio:.2}** (target ≤ 1.5: {}) |",
        verdict(ratio <= 1.5)
    );
    println!(
        "| moto's CPU time per call: replay / controller run | {:.2} ms / {:.2} ms |",
        1000.0 * replay.moto_cpu / replay.calls as f64,
        1000.0 * moto_cpu_creates / total_calls.max(1) as f64
    );
    println!(
        "| while the Services converged, moto ran / had a runnable thread | {:.0} % / {:.0} % of the time |",
        100.0 * moto_cpu_creates / total.as_secs_f64(),
        100.0 * moto_runnable
    );
    println!(
        "| while the Services converged, some task waited for a CPU (PSI) | {:.0} % of the time |",
        100.0 * pressure
    );
    println!(
        "| CPU time while the Services converged | {} |",
        processes.between(&cpu_before, &cpu_after)
    );
    println!(
        "| apiserver writes while the Services converged (the creates included) | {} |",
        by_operation(&writes)
    );
    println!(
        "| reconciles while the Services converged | {reconciles} ({:.1} per Service) |",
        reconciles as f64 / args.services as f64
    );
    println!();
    println!(
        "**Steady state: {} Services, one resync of each**",
        args.services
    );
    println!();
    println!("| trigger | AWS calls (target 0) | reconciles done after | controller CPU |");
    println!("|---|---|---|---|");
    for (what, r) in [
        ("every Service touched (a label)", &touch),
        ("one Node labelled (reconciles every Service)", &labelled),
    ] {
        println!(
            "| {what} | {} | {:.2} s | {:.2} s |",
            by_operation(&r.calls),
            r.wall.as_secs_f64(),
            r.cpu
        );
    }
    println!();
    println!("A Node status heartbeat caused {beat_reconciles} reconciles (target 0).");
    println!();
    println!("**One node added** ({} target groups)", args.services);
    println!();
    println!("| | |");
    println!("|---|---|");
    let only_registers = node_add_calls.len() == 1 && registers(&node_add_calls) == Some(n);
    println!(
        "| AWS calls by operation (target: RegisterTargets {n}, nothing else) | {} ({}) |",
        by_operation(&node_add_calls),
        verdict(only_registers)
    );
    println!(
        "| Node created → every target group has it (RegisterTargets counted) | {:.2} s |",
        node_add_wall.as_secs_f64()
    );
    println!("| target groups with the new instance, read from moto | {tgs_with_node} of {tgs} |");
    println!("| controller CPU time | {node_add_cpu:.2} s |");
    println!();
    println!("**The controller over the whole run**");
    println!();
    println!("| | |");
    println!("|---|---|");
    println!("| CPU time (utime + stime), start-up included | {controller_cpu:.2} s |");
    println!("| RSS now / peak (VmRSS / VmHWM) | {rss:.1} MiB / {hwm:.1} MiB |");
    println!();
    println!(
        "**A restarted controller reads the {} Services back**",
        args.services
    );
    println!();
    println!("| | |");
    println!("|---|---|");
    println!(
        "| process start → every Service's targets read | {:.2} s |",
        restart_wall.as_secs_f64()
    );
    println!(
        "| AWS calls, start-up lookups and orphan sweep included (per Service) | {restart_total} ({:.2}) |",
        restart_total as f64 / args.services as f64
    );
    println!(
        "| AWS calls by operation | {} |",
        by_operation(&restart_calls)
    );
    println!(
        "| writes (target: none) | {} ({}) |",
        by_operation(&restart_writes),
        verdict(restart_writes.is_empty())
    );
    println!("| controller CPU time | {restart_cpu:.2} s |");
    Ok(())
}

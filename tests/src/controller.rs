//! Helpers for the controller's integration tests: run `causeway-controller`
//! against an environment, read its `/metrics`, and read moto's state the way
//! a user would check their account (boto3 from the moto venv), by tags.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Cluster;
use crate::cluster::REGION;

/// A running `causeway-controller run`, killed when dropped.
pub struct ControllerProcess {
    child: Child,
    metrics_port: u16,
    log: std::path::PathBuf,
}

impl ControllerProcess {
    /// Starts the controller in the root namespace (where moto and the
    /// apiserver are reachable), with the environment's AWS and kube settings.
    pub fn start(cluster: &Cluster, extra_args: &[&str]) -> Result<ControllerProcess> {
        ControllerProcess::start_with_env(cluster, extra_args, &[])
    }

    /// [`ControllerProcess::start`] with extra environment variables (e.g. the
    /// test-only stop point `CAUSEWAY_TEST_EXIT_AFTER_WRITES`).
    pub fn start_with_env(
        cluster: &Cluster,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<ControllerProcess> {
        let metrics_port = free_port()?;
        let addr = format!("127.0.0.1:{metrics_port}");
        let log = cluster.dir().join(format!("controller-{metrics_port}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(crate::paths::workspace_bin("causeway-controller"))
            .args([
                "run",
                "--cluster-name",
                cluster.cluster_name(),
                "--kubeconfig",
                &cluster.kubeconfig().display().to_string(),
                "--metrics-addr",
                &addr,
                "--health-addr",
                &addr,
            ])
            .args(extra_args)
            .envs(cluster.env_vars())
            .env("RUST_LOG", "info,causeway_controller=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("cannot start causeway-controller")?;
        Ok(ControllerProcess {
            child,
            metrics_port,
            log,
        })
    }

    /// The process ID (for CPU time and RSS from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The controller's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics`, parsed into `name{labels}` → value.
    pub fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let body = http_get(self.metrics_port, "/metrics")?;
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect())
    }

    /// AWS calls so far by operation (all outcomes).
    pub fn aws_calls(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for (name, value) in self.metrics()? {
            if let Some(labels) = name.strip_prefix("causeway_aws_calls_total{")
                && let Some(op) = labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("operation=\""))
                    .and_then(|v| v.split('"').next())
            {
                *out.entry(op.to_string()).or_insert(0) += value as u64;
            }
        }
        Ok(out)
    }

    /// Reconciles finished so far (any outcome).
    pub fn reconciles(&self) -> Result<u64> {
        Ok(self
            .metrics()?
            .iter()
            .filter(|(k, _)| k.starts_with("causeway_reconciles_total"))
            .map(|(_, v)| *v as u64)
            .sum())
    }

    /// Whether this replica holds the leader lease (`causeway_leader`).
    pub fn is_leader(&self) -> Result<bool> {
        Ok(self.metrics()?.get("causeway_leader") == Some(&1.0))
    }

    /// Waits until the process exits by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "controller still running after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if http_get(self.metrics_port, "/readyz").is_ok_and(|b| b.trim() == "ok") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "controller not ready after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until this controller has read the targets of `target_groups`
    /// target groups (`DescribeTargetHealth`): after a restart, that many
    /// have been read back. Only name lookups and the plan follow in each
    /// Service's reconcile.
    pub async fn wait_targets_read(&self, target_groups: u64, timeout: Duration) -> Result<()> {
        crate::wait::eventually(timeout, "the Services read back", || async {
            let read = self.aws_calls()?.get("DescribeTargetHealth").copied();
            Ok((read >= Some(target_groups)).then_some(()))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", self.log()))
    }
}

/// The writes among AWS calls by operation: every operation but `Describe*`.
pub fn writes(calls: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    calls
        .iter()
        .filter(|(op, _)| !op.starts_with("Describe"))
        .map(|(op, n)| (op.clone(), *n))
        .collect()
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `causeway-controller plan ARGS…` against the environment; its stdout.
pub fn plan(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let out = Command::new(crate::paths::workspace_bin("causeway-controller"))
        .args([
            "plan",
            "--cluster-name",
            cluster.cluster_name(),
            "--kubeconfig",
            &cluster.kubeconfig().display().to_string(),
        ])
        .args(args)
        .envs(cluster.env_vars())
        .stdin(Stdio::null())
        .output()
        .context("cannot run causeway-controller plan")?;
    if !out.status.success() {
        bail!(
            "causeway-controller plan failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes, behind the controller's back, every load balancer tagged with `uid`.
pub fn delete_load_balancers_of(cluster: &Cluster, uid: &str) -> Result<()> {
    let snippet = format!(
        r#"
for lb in elb.describe_load_balancers()['LoadBalancers']:
    tags = elb.describe_tags(ResourceArns=[lb['LoadBalancerArn']])['TagDescriptions'][0]['Tags']
    if any(t['Key'] == 'causeway.dev/service-uid' and t['Value'] == '{uid}' for t in tags):
        elb.delete_load_balancer(LoadBalancerArn=lb['LoadBalancerArn'])
"#
    );
    moto_python(cluster, &snippet)?;
    Ok(())
}

/// Calls made between two [`ControllerProcess::aws_calls`] readings.
pub fn calls_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(op, n)| (op.clone(), n - before.get(op).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A minimal HTTP/1.0 GET; returns the body of a 200 answer.
fn http_get(port: u16, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
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

/// The ports of the rules on the nodes' security group in an
/// [`aws_resources_of`] snapshot (the rules whose description names the UID).
pub fn node_sg_rule_ports(cluster: &Cluster, aws: &Value) -> Vec<u64> {
    aws["rules_naming_uid"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["group"] == cluster.aws().node_security_group.as_str())
        .filter_map(|r| r["port"].as_u64())
        .collect()
}

/// Everything in moto tagged with `causeway.dev/service-uid=<uid>`: load
/// balancers (with tags, attributes, subnets, security groups and listeners
/// with their TLS settings, SNI certificates and attributes), target groups (with tags,
/// attributes, health check and registered targets), security groups, and the rules on
/// any security group whose description names the UID.
pub fn aws_resources_of(cluster: &Cluster, uid: &str) -> Result<Value> {
    let body = format!(
        r#"
uid = '{uid}'
out = {{'load_balancers': [], 'target_groups': [], 'security_groups': [], 'rules_naming_uid': []}}
for lb in lbs:
    t = lb_tags.get(lb['LoadBalancerArn'], {{}})
    if t.get('causeway.dev/service-uid') != uid:
        continue
    listeners = elb.describe_listeners(LoadBalancerArn=lb['LoadBalancerArn'])['Listeners']
    out['load_balancers'].append({{
        'name': lb['LoadBalancerName'], 'arn': lb['LoadBalancerArn'], 'dns': lb['DNSName'],
        'type': lb['Type'], 'scheme': lb['Scheme'], 'tags': t,
        'ip_address_type': lb.get('IpAddressType'),
        'subnets': sorted(az['SubnetId'] for az in lb['AvailabilityZones']),
        'security_groups': lb.get('SecurityGroups', []),
        'attributes': {{a['Key']: a['Value'] for a in elb.describe_load_balancer_attributes(
            LoadBalancerArn=lb['LoadBalancerArn'])['Attributes']}},
        'listeners': [{{'port': l['Port'], 'protocol': l['Protocol'],
                        'target_group': l['DefaultActions'][0].get('TargetGroupArn'),
                        'certificates': [c['CertificateArn'] for c in l.get('Certificates', [])],
                        'sni_certificates': [c['CertificateArn'] for c in elb.describe_listener_certificates(
                            ListenerArn=l['ListenerArn'])['Certificates'] if not c.get('IsDefault')]
                            if l['Protocol'] == 'TLS' else [],
                        'ssl_policy': l.get('SslPolicy'), 'alpn_policy': l.get('AlpnPolicy', []),
                        'attributes': {{a['Key']: a['Value'] for a in elb.describe_listener_attributes(
                            ListenerArn=l['ListenerArn'])['Attributes']}}}} for l in listeners],
    }})
for tg in tgs:
    t = tg_tags.get(tg['TargetGroupArn'], {{}})
    if t.get('causeway.dev/service-uid') != uid:
        continue
    health = elb.describe_target_health(TargetGroupArn=tg['TargetGroupArn'])['TargetHealthDescriptions']
    out['target_groups'].append({{
        'name': tg['TargetGroupName'], 'arn': tg['TargetGroupArn'], 'port': tg['Port'],
        'protocol': tg['Protocol'], 'target_type': tg.get('TargetType'), 'tags': t,
        'health_check': {{'protocol': tg.get('HealthCheckProtocol'), 'port': tg.get('HealthCheckPort'),
            'path': tg.get('HealthCheckPath'), 'interval': tg.get('HealthCheckIntervalSeconds'),
            'timeout': tg.get('HealthCheckTimeoutSeconds'), 'healthy': tg.get('HealthyThresholdCount'),
            'unhealthy': tg.get('UnhealthyThresholdCount'),
            'codes': tg.get('Matcher', {{}}).get('HttpCode')}},
        'attributes': {{a['Key']: a['Value'] for a in elb.describe_target_group_attributes(
            TargetGroupArn=tg['TargetGroupArn'])['Attributes']}},
        'targets': sorted([h['Target']['Id'], h['Target']['Port']] for h in health
                          if h.get('TargetHealth', {{}}).get('State') != 'draining'),
    }})
for sg in ec2.describe_security_groups()['SecurityGroups']:
    t = {{x['Key']: x['Value'] for x in sg.get('Tags', [])}}
    if t.get('causeway.dev/service-uid') == uid:
        out['security_groups'].append({{'id': sg['GroupId'], 'name': sg['GroupName'], 'tags': t}})
    for p in sg.get('IpPermissions', []):
        for source in p.get('IpRanges', []) + p.get('UserIdGroupPairs', []):
            if uid in source.get('Description', ''):
                out['rules_naming_uid'].append({{'group': sg['GroupId'], 'port': p.get('FromPort'),
                                                 'description': source.get('Description')}})
print(json.dumps(out))
"#
    );
    let out = read_snapshot(cluster, &body)?;
    Ok(serde_json::from_str(out.trim())?)
}

/// Runs `body` after [`moto_python`]'s clients and [`MOTO_LISTING`]: a
/// read-only inventory script. The controller may delete a resource
/// between the script's list and its per-resource reads (moto answers
/// `…NotFound`); such a snapshot is simply taken again.
fn read_snapshot(cluster: &Cluster, body: &str) -> Result<String> {
    let script = format!("{MOTO_LISTING}{body}");
    let mut attempt = 0;
    loop {
        match moto_python(cluster, &script) {
            Err(e) if attempt < 5 && e.to_string().contains("NotFound") => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn run_python(python: &Path, script: &str) -> Result<String> {
    let out = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!("python failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every resource in moto that carries a `causeway.dev/service-uid` tag,
/// counted by UID and kind (`lb`, `listener`, `tg`, `target`, `sg`), plus the
/// SG rules whose description names the UID (`rule`). What a leak or a
/// duplicate would show up in.
pub fn tagged_inventory(cluster: &Cluster) -> Result<BTreeMap<String, BTreeMap<String, u64>>> {
    let body = r#"
KEY = 'causeway.dev/service-uid'
out = collections.defaultdict(lambda: collections.defaultdict(int))
for lb in lbs:
    uid = lb_tags.get(lb['LoadBalancerArn'], {}).get(KEY)
    if uid:
        out[uid]['lb'] += 1
        out[uid]['listener'] += len(elb.describe_listeners(LoadBalancerArn=lb['LoadBalancerArn'])['Listeners'])
for tg in tgs:
    uid = tg_tags.get(tg['TargetGroupArn'], {}).get(KEY)
    if uid:
        out[uid]['tg'] += 1
        out[uid]['target'] += len(elb.describe_target_health(TargetGroupArn=tg['TargetGroupArn'])['TargetHealthDescriptions'])
for sg in ec2.describe_security_groups()['SecurityGroups']:
    uid = {x['Key']: x['Value'] for x in sg.get('Tags', [])}.get(KEY)
    if uid:
        out[uid]['sg'] += 1
    for p in sg.get('IpPermissions', []):
        for source in p.get('IpRanges', []) + p.get('Ipv6Ranges', []) + p.get('UserIdGroupPairs', []):
            d = source.get('Description', '')
            if d.startswith('causeway '):
                out[d.split(' ')[1]]['rule'] += 1
print(json.dumps(out))
"#;
    let out = read_snapshot(cluster, body)?;
    Ok(serde_json::from_str(out.trim())?)
}

/// Runs a Python snippet against moto with `elb` (elbv2) and `ec2` boto3
/// clients already defined; its stdout. For tests that set up AWS state
/// behind the controller's back.
pub fn moto_python(cluster: &Cluster, snippet: &str) -> Result<String> {
    let script = format!(
        r#"
import boto3, collections, json
kw = dict(endpoint_url='{endpoint}', region_name='{REGION}', aws_access_key_id='testing', aws_secret_access_key='testing')
elb = boto3.client('elbv2', **kw)
ec2 = boto3.client('ec2', **kw)
{snippet}
"#,
        endpoint = cluster.aws_endpoint(),
    );
    run_python(&crate::cluster::moto_venv()?.join("bin/python"), &script)
}

/// Python after [`moto_python`]'s clients: every load balancer and target
/// group (`lbs`, `tgs`) with their tags (`lb_tags`, `tg_tags`, by ARN).
const MOTO_LISTING: &str = r#"
def tags_of(arns):
    res = {}
    for i in range(0, len(arns), 20):
        for d in elb.describe_tags(ResourceArns=arns[i:i+20])['TagDescriptions']:
            res[d['ResourceArn']] = {t['Key']: t['Value'] for t in d['Tags']}
    return res
lbs = [lb for page in elb.get_paginator('describe_load_balancers').paginate() for lb in page['LoadBalancers']]
tgs = [tg for page in elb.get_paginator('describe_target_groups').paginate() for tg in page['TargetGroups']]
lb_tags = tags_of([lb['LoadBalancerArn'] for lb in lbs])
tg_tags = tags_of([tg['TargetGroupArn'] for tg in tgs])
"#;

/// The Events about the object with `uid` in namespace `default`, as
/// (type, reason, note), oldest first.
pub async fn events_of(client: &kube::Client, uid: &str) -> Result<Vec<(String, String, String)>> {
    events_reported_by(client, uid, None).await
}

/// [`events_of`], only those `reporter` (the `reportingController`) wrote
/// when given: other components write about a Service too (the apiserver's
/// ClusterIP repair loop, for one).
pub async fn events_reported_by(
    client: &kube::Client,
    uid: &str,
    reporter: Option<&str>,
) -> Result<Vec<(String, String, String)>> {
    use k8s_openapi::api::events::v1::Event;
    use kube::api::{Api, ListParams};
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let mut items = events.list(&ListParams::default()).await?.items;
    items.sort_by(|a, b| {
        a.event_time
            .as_ref()
            .map(|t| t.0)
            .cmp(&b.event_time.as_ref().map(|t| t.0))
    });
    Ok(items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid))
        .filter(|e| reporter.is_none() || e.reporting_controller.as_deref() == reporter)
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect())
}

/// Waits for an Event of `type_` and `reason` about the object with `uid`
/// (namespace `default`); its note.
pub async fn wait_for_event(
    client: &kube::Client,
    uid: &str,
    type_: &str,
    reason: &str,
    timeout: Duration,
) -> Result<String> {
    crate::wait::eventually(timeout, &format!("a {type_} {reason} event"), || async {
        Ok(events_of(client, uid)
            .await?
            .into_iter()
            .find(|(t, r, _)| t == type_ && r == reason)
            .map(|(_, _, note)| note))
    })
    .await
}

/// Waits until the Service `name` has an ingress hostname; the hostname.
pub async fn wait_for_hostname(
    services: &kube::Api<k8s_openapi::api::core::v1::Service>,
    name: &str,
    timeout: Duration,
) -> Result<String> {
    crate::wait::eventually(timeout, &format!("{name}'s ingress hostname"), || async {
        let svc = services.get(name).await?;
        Ok(svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|l| l.ingress)
            .and_then(|i| i.first().and_then(|i| i.hostname.clone())))
    })
    .await
}

/// Waits until the Service `name` is gone (its finalizer removed).
pub async fn wait_until_deleted(
    services: &kube::Api<k8s_openapi::api::core::v1::Service>,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    crate::wait::eventually(timeout, &format!("{name} to be gone"), || async {
        Ok(services.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// The registered (non-draining) targets of a target group from
/// [`aws_resources_of`], as (id, port), sorted.
pub fn targets(tg: &Value) -> Vec<(String, u64)> {
    tg["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t[0].as_str().unwrap_or_default().to_string(),
                t[1].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

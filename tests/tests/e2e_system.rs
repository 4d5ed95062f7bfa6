//! Full-system e2e: three nodes, causeway-agent in every node namespace and two
//! leader-elected causeway-controller replicas, against the real apiserver and
//! moto. A LoadBalancer Service is created, updated (port added, annotation
//! changed in place), switched to `externalTrafficPolicy: Local`, its nodes
//! drained (autoscaler taint, exclusion label) while the controller leader is
//! killed, and deleted. At each step the test reads AWS state from moto and
//! sends real traffic from an external namespace to every registered target
//! (`nodeIP:nodePort` of each instance in the target groups), as the NLB would.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use causeway_tests::controller::{
    ControllerProcess, aws_resources_of, moto_python, tagged_inventory, targets, wait_for_hostname,
    wait_until_deleted,
};
use causeway_tests::paths::workspace_bin;
use causeway_tests::wait::eventually;
use causeway_tests::{Cluster, ClusterOptions, netns};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const CLASS: &str = "causeway.dev/nlb";
const EXCLUDE: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
const TG_ATTRIBUTES: &str = "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes";
const WAIT: Duration = Duration::from_secs(60);

fn tally(ns: &str, target: &str, count: usize) -> Result<BTreeMap<String, usize>> {
    netns::tally_by_pod(ns, "tcp", target, count)
}

/// Probes until every attempt lands on one of `pods` and each answered once.
fn wait_for_pods(ns: &str, target: &str, pods: &[&str], what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = tally(ns, target, 24)?;
        let only_expected = counts.keys().all(|k| pods.contains(&k.as_str()));
        let all_seen = pods.iter().all(|p| counts.contains_key(*p));
        if only_expected && all_seen {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: after 30 s {target} still answers {counts:?}, expected only {pods:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Probes until no pod answers `target` any more; `dropped` requires every
/// attempt to time out (a DROP, not a refusal).
fn wait_no_answer(ns: &str, target: &str, dropped: bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = tally(ns, target, 3)?;
        let ok = if dropped {
            counts.keys().all(|k| k == "timeout")
        } else {
            counts.keys().all(|k| k == "timeout" || k == "refused")
        };
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: after 30 s {target} still answers {counts:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `GET url` from namespace `ns` with curl: status and body.
fn http_get(ns: &str, url: &str) -> Result<(u16, String)> {
    let out = netns::exec_in(ns, "curl", &["-s", "-i", "--max-time", "3", url])?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Polls `url` until it answers `status` with a body containing `needle`.
fn wait_http(ns: &str, url: &str, status: u16, needle: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = http_get(ns, url);
        if let Ok((got, body)) = &last
            && *got == status
            && body.contains(needle)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url}: expected HTTP {status} with {needle:?}, last answer {last:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The node ports of the Service, by service port, and its healthCheckNodePort.
async fn node_ports(services: &Api<Service>) -> Result<(BTreeMap<i32, u16>, Option<u16>)> {
    let spec = services.get("web").await?.spec.unwrap_or_default();
    let ports = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| Some((p.port, u16::try_from(p.node_port?).ok()?)))
        .collect();
    let health = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok());
    Ok((ports, health))
}

/// What moto must show for the Service: one NLB whose listeners are exactly
/// `ports` (service port → node port), each forwarding to its own target
/// group whose targets are `instances` on that node port. Returns the
/// resources once they match.
async fn wait_aws(
    cluster: &Cluster,
    uid: &str,
    ports: &BTreeMap<i32, u16>,
    instances: &[String],
    what: &str,
) -> Result<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let aws = aws_resources_of(cluster, uid)?;
        if aws_matches(&aws, ports, instances) {
            return Ok(aws);
        }
        if Instant::now() > deadline {
            bail!("timed out after {WAIT:?} waiting for {what}; last moto state: {aws:#}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn aws_matches(aws: &Value, ports: &BTreeMap<i32, u16>, instances: &[String]) -> bool {
    let lbs = aws["load_balancers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if lbs.len() != 1 {
        return false;
    }
    let tgs = aws["target_groups"].as_array().cloned().unwrap_or_default();
    let listeners = lbs[0]["listeners"].as_array().cloned().unwrap_or_default();
    if listeners.len() != ports.len() || tgs.len() != ports.len() {
        return false;
    }
    ports.iter().all(|(port, node_port)| {
        let Some(listener) = listeners.iter().find(|l| l["port"] == json!(port)) else {
            return false;
        };
        let Some(tg) = tgs.iter().find(|t| t["arn"] == listener["target_group"]) else {
            return false;
        };
        let mut want: Vec<(String, u64)> = instances
            .iter()
            .map(|i| (i.clone(), u64::from(*node_port)))
            .collect();
        want.sort();
        targets(tg) == want
    })
}

/// Sends traffic from the external namespace to every registered target of
/// every target group: a node listed in `answering` must answer from exactly
/// those pods; any other registered node must drop the traffic.
fn check_traffic(
    cluster: &Cluster,
    aws: &Value,
    answering: &BTreeMap<&str, Vec<&str>>,
    what: &str,
) -> Result<usize> {
    let external = cluster.external_netns();
    let mut probed = 0;
    for tg in aws["target_groups"].as_array().into_iter().flatten() {
        for (instance, port) in targets(tg) {
            let node = cluster
                .nodes()
                .iter()
                .find(|n| n.instance_id == instance)
                .with_context(|| format!("target {instance} is no node"))?;
            let target = format!("{}:{port}", node.ip);
            let what = format!("{what}: {} ({target})", node.name);
            match answering.get(node.name.as_str()) {
                Some(pods) => wait_for_pods(&external, &target, pods, &what)?,
                None => wait_no_answer(&external, &target, true, &what)?,
            }
            probed += 1;
        }
    }
    Ok(probed)
}

/// Every target group's attributes, by target group ARN.
fn tg_attributes(cluster: &Cluster, aws: &Value) -> Result<BTreeMap<String, Value>> {
    let arns: Vec<&str> = aws["target_groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["arn"].as_str())
        .collect();
    let out = moto_python(
        cluster,
        &format!(
            "print(json.dumps({{arn: {{a['Key']: a['Value'] for a in elb.describe_target_group_attributes(TargetGroupArn=arn)['Attributes']}} for arn in {arns:?}}}))"
        ),
    )?;
    Ok(serde_json::from_str(out.trim())?)
}

fn tg_arns(aws: &Value) -> Vec<String> {
    let mut arns: Vec<String> = aws["target_groups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["arn"].as_str().map(str::to_string))
        .collect();
    arns.sort();
    arns
}

fn start_agents(cluster: &Cluster) -> Result<()> {
    let agent = workspace_bin("causeway-agent");
    for node in cluster.nodes() {
        cluster.spawn_agent(
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
    }
    for node in cluster.nodes() {
        wait_http(
            &cluster.external_netns(),
            &format!("http://{}:10256/healthz", node.ip),
            200,
            "\"nodeEligible\":true",
        )
        .with_context(|| format!("agent on {}", node.name))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_service_end_to_end_through_agents_and_a_failing_over_controller()
-> Result<()> {
    let started = Instant::now();
    let cluster = Cluster::start(ClusterOptions::nodes(3)).await?;
    let client = cluster.client();
    let external = cluster.external_netns();
    let nodes = cluster.nodes().to_vec();
    let instance = |name: &str| cluster.node(name).instance_id.clone();
    let all_instances: Vec<String> = nodes.iter().map(|n| n.instance_id.clone()).collect();

    start_agents(&cluster)?;
    let mut controllers = Vec::new();
    for identity in ["causeway-controller-1", "causeway-controller-2"] {
        let controller =
            ControllerProcess::start_with_env(&cluster, &[], &[("POD_NAME", identity)])?;
        controller.wait_ready(WAIT)?;
        controllers.push(controller);
    }
    let logs = |controllers: &[ControllerProcess]| -> String {
        controllers
            .iter()
            .map(|c| c.log())
            .collect::<Vec<_>>()
            .join("\n-----\n")
    };
    eventually(WAIT, "one controller replica to lead", || {
        let leaders: Result<Vec<bool>> = controllers.iter().map(|c| c.is_leader()).collect();
        async move { Ok((leaders?.iter().filter(|l| **l).count() == 1).then_some(())) }
    })
    .await?;

    // Three backend pods: two on node-1, one on node-2, none on node-3.
    cluster
        .add_pod("node-1", "web-1", &[("app", "web")])
        .await?;
    cluster
        .add_pod("node-1", "web-2", &[("app", "web")])
        .await?;
    cluster
        .add_pod("node-2", "web-3", &[("app", "web")])
        .await?;
    let all_pods = vec!["web-1", "web-2", "web-3"];
    let everywhere: BTreeMap<&str, Vec<&str>> = nodes
        .iter()
        .map(|n| (n.name.as_str(), all_pods.clone()))
        .collect();

    // 1. Create: an ingress hostname, an NLB with one listener and one target
    // group of every node, and every node's NodePort answers from the pods.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"}]
        }
    }))?;
    let uid = services
        .create(&PostParams::default(), &service)
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    let hostname = wait_for_hostname(&services, "web", WAIT)
        .await
        .with_context(|| logs(&controllers))?;
    let (ports, _) = node_ports(&services).await?;
    let aws = wait_aws(&cluster, &uid, &ports, &all_instances, "the NLB").await?;
    assert_eq!(aws["load_balancers"][0]["dns"], json!(hostname));
    assert_eq!(aws["load_balancers"][0]["type"], "network");
    let probed = check_traffic(&cluster, &aws, &everywhere, "created")?;
    assert_eq!(probed, 3);
    let first_node_port = ports[&80];

    // 2a. Update: a second port gets its own listener and target group, and
    // its NodePort answers on every node.
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ports": [
                {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP",
                 "nodePort": first_node_port},
                {"name": "alt", "port": 8080, "targetPort": 8080, "protocol": "TCP"}
            ]}})),
        )
        .await?;
    let (ports, _) = node_ports(&services).await?;
    assert_eq!(ports.len(), 2);
    assert_eq!(
        ports[&80], first_node_port,
        "the first port keeps its NodePort"
    );
    let aws = wait_aws(
        &cluster,
        &uid,
        &ports,
        &all_instances,
        "the second listener",
    )
    .await
    .with_context(|| logs(&controllers))?;
    let probed = check_traffic(&cluster, &aws, &everywhere, "port added")?;
    assert_eq!(probed, 6);

    // 2b. An annotation applied in place: the target groups' deregistration
    // delay changes in moto, and the target groups are kept.
    let arns_before = tg_arns(&aws);
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                TG_ATTRIBUTES: "deregistration_delay.timeout_seconds=17"}}})),
        )
        .await?;
    eventually(WAIT, "deregistration delay 17 on every TG", || {
        let attributes = tg_attributes(&cluster, &aws);
        async move {
            let attributes = attributes?;
            Ok((attributes.len() == 2
                && attributes
                    .values()
                    .all(|a| a["deregistration_delay.timeout_seconds"] == "17"))
            .then_some(()))
        }
    })
    .await
    .with_context(|| logs(&controllers))?;
    let aws = wait_aws(&cluster, &uid, &ports, &all_instances, "the same NLB").await?;
    assert_eq!(tg_arns(&aws), arns_before, "target groups changed in place");
    check_traffic(&cluster, &aws, &everywhere, "annotation changed")?;

    // 3. externalTrafficPolicy: Local — the health checks go to the
    // healthCheckNodePort, which answers 200 only where a pod runs; traffic
    // reaches only local pods and is dropped on node-3.
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"externalTrafficPolicy": "Local"}})),
        )
        .await?;
    let (ports, health_port) = node_ports(&services).await?;
    let health_port = health_port.context("a healthCheckNodePort was allocated")?;
    let aws = eventually(WAIT, "health checks on the healthCheckNodePort", || {
        let aws = aws_resources_of(&cluster, &uid);
        async move {
            let aws = aws?;
            let tgs = aws["target_groups"].as_array().cloned().unwrap_or_default();
            Ok((tgs.len() == 2
                && tgs
                    .iter()
                    .all(|t| t["health_check"]["port"] == json!(health_port.to_string())))
            .then_some(aws))
        }
    })
    .await
    .with_context(|| logs(&controllers))?;
    let aws_local = wait_aws(&cluster, &uid, &ports, &all_instances, "ETP Local").await?;
    assert_eq!(tg_arns(&aws_local), tg_arns(&aws));
    for (node, status, local) in [("node-1", 200, 2), ("node-2", 200, 1), ("node-3", 503, 0)] {
        wait_http(
            &external,
            &format!("http://{}:{health_port}/", cluster.node(node).ip),
            status,
            &format!("\"localEndpoints\": {local}"),
        )
        .with_context(|| format!("health check of {node}"))?;
    }
    let local: BTreeMap<&str, Vec<&str>> = [
        ("node-1", vec!["web-1", "web-2"]),
        ("node-2", vec!["web-3"]),
    ]
    .into_iter()
    .collect();
    check_traffic(&cluster, &aws, &local, "ETP Local")?;

    // 4. Drain: the autoscaler taints node-1 and node-3 is excluded by label;
    // meanwhile the controller leader is killed, and the follower finishes:
    // both instances are deregistered, node-1's agent says 503 on /healthz.
    let node_api: Api<Node> = Api::all(client.clone());
    node_api
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler",
                "value": "1700000000", "effect": "NoSchedule"}]}}),
            ),
        )
        .await?;
    let leader = controllers
        .iter()
        .position(|c| c.is_leader().unwrap_or(false))
        .context("a leader")?;
    let killed_at = Instant::now();
    drop(controllers.remove(leader));
    node_api
        .patch(
            "node-3",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {EXCLUDE: "true"}}})),
        )
        .await?;
    let follower = &controllers[0];
    eventually(Duration::from_secs(30), "the follower to lead", || {
        let leading = follower.is_leader();
        async move { Ok(leading?.then_some(())) }
    })
    .await
    .with_context(|| follower.log())?;
    let failover = killed_at.elapsed();
    let aws = wait_aws(
        &cluster,
        &uid,
        &ports,
        &[instance("node-2")],
        "drained nodes",
    )
    .await
    .with_context(|| follower.log())?;
    wait_http(
        &external,
        &format!("http://{}:10256/healthz", cluster.node("node-1").ip),
        503,
        "\"nodeEligible\":false",
    )?;
    // The exclusion label only concerns load balancers: node-3's agent is fine.
    wait_http(
        &external,
        &format!("http://{}:10256/healthz", cluster.node("node-3").ip),
        200,
        "\"nodeEligible\":true",
    )?;
    let probed = check_traffic(&cluster, &aws, &local, "drained")?;
    assert_eq!(probed, 2);

    // 5. Delete: the follower removes everything tagged with the UID, then
    // the finalizer; the NodePorts stop answering on every node.
    services.delete("web", &DeleteParams::default()).await?;
    wait_until_deleted(&services, "web", WAIT)
        .await
        .with_context(|| follower.log())?;
    let aws = aws_resources_of(&cluster, &uid)?;
    assert_eq!(
        aws,
        json!({"load_balancers": [], "target_groups": [], "security_groups": [], "rules_naming_uid": []}),
        "nothing tagged with (or describing) the UID remains"
    );
    let inventory = tagged_inventory(&cluster)?;
    assert!(
        !inventory.contains_key(&uid),
        "left in moto: {:?}",
        inventory.get(&uid)
    );
    for node in &nodes {
        for port in ports.values() {
            wait_no_answer(
                &external,
                &format!("{}:{port}", node.ip),
                false,
                &format!("deleted: {}", node.name),
            )?;
        }
    }
    eprintln!(
        "e2e_system: leader failover {failover:?}, total {:?}",
        started.elapsed()
    );
    Ok(())
}

//! causeway-controller against a real kube-apiserver and moto: a LoadBalancer
//! Service becomes an NLB with the right listener, target group, targets,
//! health check and tags; a no-op resync costs no AWS call; excluding a node
//! only deregisters it; deleting the Service leaves nothing tagged with its UID;
//! an invalid annotation is reported and writes nothing; an AWS refusal is a
//! Warning event and an Error condition on its Service while others proceed.

use std::time::{Duration, Instant};

use anyhow::Result;
use causeway_tests::controller::{
    ControllerProcess, aws_resources_of, calls_between, delete_load_balancers_of, events_of,
    node_sg_rule_ports, plan, targets, wait_for_event, wait_for_hostname, wait_until_deleted,
    writes,
};
use causeway_tests::wait::eventually;
use causeway_tests::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const CLASS: &str = "causeway.dev/nlb";
const FINALIZER: &str = "causeway.dev/load-balancer-cleanup";
const EXCLUDE: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The seed article's `service-python` LoadBalancer Service, with our class.
fn service_python(annotations: Value) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "service-python", "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            "selector": {"run": "pod-python"},
            "ports": [{"port": 3000, "protocol": "TCP", "targetPort": 443, "nodePort": 30080}]
        }
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_python_gets_an_nlb_follows_nodes_and_is_cleaned_up() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(3)).await?;
    let client = cluster.client();
    let controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    // The leader looks up the node SG and the public subnets once at start,
    // and sweeps orphans, before it reports running.
    eventually(Duration::from_secs(30), "the start-up lookups", || {
        let running = controller.log().contains("causeway-controller running");
        async move { Ok(running.then_some(())) }
    })
    .await?;
    let calls_before_create = controller.aws_calls()?;

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let created = services
        .create(&PostParams::default(), &service_python(json!({}))?)
        .await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();

    // The Service gets the NLB's hostname and its port in its status.
    let hostname = eventually(Duration::from_secs(60), "an ingress hostname", || {
        let services = services.clone();
        async move {
            let svc = services.get("service-python").await?;
            let ingress = svc
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .unwrap_or_default();
            Ok(ingress.first().and_then(|i| {
                let ports: Vec<(i32, String)> = i
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| (p.port, p.protocol.clone()))
                    .collect();
                assert_eq!(ports, [(3000, "TCP".to_string())]);
                i.hostname.clone()
            }))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;

    // Creating a one-port Service costs its seven writes and nothing else:
    // no read-back (the plan's effect is known), tags passed at creation,
    // default attributes not set.
    let create_calls = calls_between(&calls_before_create, &controller.aws_calls()?);
    assert_eq!(
        create_calls,
        [
            ("CreateSecurityGroup", 1),
            ("AuthorizeSecurityGroupIngress", 2),
            ("CreateLoadBalancer", 1),
            ("CreateTargetGroup", 1),
            ("RegisterTargets", 1),
            ("CreateListener", 1),
        ]
        .into_iter()
        .map(|(op, n)| (op.to_string(), n))
        .collect(),
        "AWS calls for one create; controller log:\n{}",
        controller.log()
    );
    assert!(create_calls.values().sum::<u64>() <= 8);

    // Beside its own metrics, the controller exports the process's and its
    // API client's, under the names dashboards expect: the PATCHes that
    // added the finalizer and wrote the status answered 200, and were timed.
    let metrics = controller.metrics()?;
    let sum = |prefix: &str, has: &[&str]| -> f64 {
        metrics
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && has.iter().all(|h| k.contains(h)))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(
        sum(
            "rest_client_requests_total{",
            &["code=\"200\"", "method=\"PATCH\""]
        ) >= 2.0,
        "{metrics:?}"
    );
    assert!(
        sum(
            "rest_client_request_duration_seconds_count{",
            &["verb=\"PATCH\""]
        ) >= 2.0,
        "{metrics:?}"
    );
    assert!(
        metrics.get("process_resident_memory_bytes") > Some(&1e6),
        "{metrics:?}"
    );

    // moto holds exactly one NLB, one TCP listener on 3000, one target group
    // whose targets are every node's instance on NodePort 30080.
    let aws = aws_resources_of(&cluster, &uid)?;
    let lbs = aws["load_balancers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(lbs.len(), 1, "{aws:#}");
    let lb = &lbs[0];
    assert_eq!(lb["dns"].as_str(), Some(hostname.as_str()));
    assert_eq!(lb["type"], "network");
    assert_eq!(lb["scheme"], "internet-facing");
    let public = cluster.aws().subnet_ids("elb");
    assert_eq!(lb["subnets"], json!(public), "one public subnet per zone");
    let tgs = aws["target_groups"].as_array().cloned().unwrap_or_default();
    assert_eq!(tgs.len(), 1, "{aws:#}");
    let tg = &tgs[0];
    let listeners = lb["listeners"].as_array().cloned().unwrap_or_default();
    assert_eq!(listeners.len(), 1, "{aws:#}");
    assert_eq!(
        (
            &listeners[0]["port"],
            &listeners[0]["protocol"],
            &listeners[0]["target_group"]
        ),
        (&json!(3000), &json!("TCP"), &tg["arn"])
    );
    assert_eq!(tg["protocol"], "TCP");
    assert_eq!(tg["target_type"], "instance");
    let mut every_node: Vec<(String, u64)> = cluster
        .nodes()
        .iter()
        .map(|n| (n.instance_id.clone(), 30080))
        .collect();
    every_node.sort();
    assert_eq!(targets(tg), every_node);
    // externalTrafficPolicy Cluster: the agent's /healthz on 10256, 10 s, 3/3.
    assert_eq!(
        tg["health_check"],
        json!({"protocol": "HTTP", "port": "10256", "path": "/healthz", "interval": 10,
               "timeout": 6, "healthy": 3, "unhealthy": 3, "codes": "200-399"})
    );
    for (resource, tags) in [("lb", &lb["tags"]), ("tg-3000-tcp", &tg["tags"])] {
        assert_eq!(
            tags[format!("kubernetes.io/cluster/{}", cluster.cluster_name())],
            "owned"
        );
        assert_eq!(tags["kubernetes.io/service-name"], "default/service-python");
        assert_eq!(tags["causeway.dev/service-uid"], uid.as_str());
        assert_eq!(tags["causeway.dev/resource"], resource);
    }
    let sgs = aws["security_groups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(sgs.len(), 1, "the managed frontend SG: {aws:#}");
    assert_eq!(lb["security_groups"], json!([sgs[0]["id"]]));
    let rule_ports = node_sg_rule_ports(&cluster, &aws);
    assert_eq!(
        rule_ports.len(),
        2,
        "NodePort and health port on the node SG: {aws:#}"
    );
    assert!(rule_ports.contains(&30080) && rule_ports.contains(&10256));

    let svc = services.get("service-python").await?;
    assert!(
        svc.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == FINALIZER)
    );
    let events = events_of(&client, &uid).await?;
    assert!(
        events
            .iter()
            .any(|(_, reason, _)| reason == "EnsuredLoadBalancer"),
        "{events:?}"
    );

    // A resync that changes nothing the LB depends on makes no AWS call.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls_before = controller.aws_calls()?;
    let reconciles_before = controller.reconciles()?;
    services
        .patch(
            "service-python",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await?;
    eventually(
        Duration::from_secs(20),
        "a reconcile after the touch",
        || {
            let n = controller.reconciles();
            async move { Ok((n? > reconciles_before).then_some(())) }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        calls_between(&calls_before, &controller.aws_calls()?),
        Default::default(),
        "a no-op reconcile must not call AWS"
    );

    // Excluding a node deregisters it, and that is the only AWS call.
    let excluded = cluster.nodes()[0].clone();
    let calls_before = controller.aws_calls()?;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            &excluded.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {EXCLUDE: "true"}}})),
        )
        .await?;
    let remaining: Vec<(String, u64)> = every_node
        .iter()
        .filter(|(id, _)| *id != excluded.instance_id)
        .cloned()
        .collect();
    eventually(
        Duration::from_secs(30),
        "the excluded node deregistered",
        || {
            let remaining = remaining.clone();
            let cluster = &cluster;
            let uid = uid.clone();
            async move {
                let aws = aws_resources_of(cluster, &uid)?;
                Ok((targets(&aws["target_groups"][0]) == remaining).then_some(()))
            }
        },
    )
    .await?;
    assert_eq!(
        calls_between(&calls_before, &controller.aws_calls()?),
        [("DeregisterTargets".to_string(), 1)].into_iter().collect(),
        "a node change touches only targets; controller log:\n{}",
        controller.log()
    );

    // Bringing the node back registers it, and that is the only AWS call.
    let calls_before = controller.aws_calls()?;
    nodes
        .patch(
            &excluded.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {EXCLUDE: null}}})),
        )
        .await?;
    eventually(Duration::from_secs(30), "the node registered again", || {
        let every_node = every_node.clone();
        let cluster = &cluster;
        let uid = uid.clone();
        async move {
            let aws = aws_resources_of(cluster, &uid)?;
            Ok((targets(&aws["target_groups"][0]) == every_node).then_some(()))
        }
    })
    .await?;
    assert_eq!(
        calls_between(&calls_before, &controller.aws_calls()?),
        [("RegisterTargets".to_string(), 1)].into_iter().collect(),
        "a node change touches only targets"
    );

    // Deleting the Service deletes everything tagged with its UID, then the finalizer.
    services
        .delete("service-python", &Default::default())
        .await?;
    wait_until_deleted(&services, "service-python", Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;
    let aws = aws_resources_of(&cluster, &uid)?;
    assert_eq!(
        aws,
        json!({"load_balancers": [], "target_groups": [], "security_groups": [], "rules_naming_uid": []}),
        "nothing tagged with (or describing) the UID remains"
    );
    let events = events_of(&client, &uid).await?;
    assert!(
        events
            .iter()
            .any(|(_, reason, _)| reason == "DeletedLoadBalancer"),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_annotation_is_a_warning_event_and_no_aws_write() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let client = cluster.client();
    let controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let created = services
        .create(
            &PostParams::default(),
            &service_python(
                json!({"service.beta.kubernetes.io/aws-load-balancer-scheme": "public"}),
            )?,
        )
        .await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();

    let note = wait_for_event(
        &client,
        &uid,
        "Warning",
        "InvalidAnnotation",
        Duration::from_secs(30),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;
    for needle in [
        "service.beta.kubernetes.io/aws-load-balancer-scheme",
        "\"public\"",
        "internet-facing",
        "internal",
    ] {
        assert!(note.contains(needle), "{needle:?} not in {note:?}");
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = controller.aws_calls()?;
    assert!(
        writes(&calls).is_empty(),
        "no AWS write for an invalid Service: {calls:?}"
    );
    let svc = services.get("service-python").await?;
    assert!(
        !svc.metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == FINALIZER),
        "no finalizer without an AWS write"
    );
    assert!(
        svc.status
            .and_then(|s| s.load_balancer)
            .and_then(|l| l.ingress)
            .is_none()
    );
    let aws = aws_resources_of(&cluster, &uid)?;
    assert_eq!(aws["load_balancers"], json!([]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_the_next_actions_and_drift_is_corrected() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let client = cluster.client();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let created = services
        .create(&PostParams::default(), &service_python(json!({}))?)
        .await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();

    // Before any controller runs, `plan` says what it would build, and builds nothing.
    let printed = plan(&cluster, &["--namespace", "default"])?;
    assert!(
        printed.starts_with("default/service-python: 7 action(s)"),
        "{printed}"
    );
    for needle in [
        "create security group k8s-default-servicep-",
        "create load balancer k8s-default-servicep-",
        "create listener TCP 3000",
    ] {
        assert!(printed.contains(needle), "{needle:?} not in {printed}");
    }
    let aws = aws_resources_of(&cluster, &uid)?;
    assert_eq!(aws["load_balancers"], json!([]));
    assert_eq!(aws["security_groups"], json!([]));

    let controller = ControllerProcess::start(&cluster, &["--drift-audit-period", "3s"])?;
    controller.wait_ready(Duration::from_secs(60))?;
    let first = eventually(Duration::from_secs(60), "an NLB", || {
        let cluster = &cluster;
        let uid = uid.clone();
        async move {
            let aws = aws_resources_of(cluster, &uid)?;
            Ok(aws["load_balancers"][0]["arn"].as_str().map(str::to_string))
        }
    })
    .await?;
    eventually(Duration::from_secs(30), "plan to say up to date", || {
        let printed = plan(&cluster, &["service-python", "-n", "default"]);
        async move { Ok((printed?.trim() == "default/service-python: up to date").then_some(())) }
    })
    .await?;

    // Someone deletes the NLB in the console: the next drift audit recreates it.
    delete_load_balancers_of(&cluster, &uid)?;
    let second = eventually(Duration::from_secs(30), "a recreated NLB", || {
        let cluster = &cluster;
        let uid = uid.clone();
        let first = first.clone();
        async move {
            let aws = aws_resources_of(cluster, &uid)?;
            let listeners = aws["load_balancers"][0]["listeners"]
                .as_array()
                .map_or(0, Vec::len);
            Ok(aws["load_balancers"][0]["arn"]
                .as_str()
                .filter(|arn| *arn != first && listeners == 1)
                .map(str::to_string))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;
    assert_ne!(second, first);
    let events = events_of(&client, &uid).await?;
    assert!(
        events
            .iter()
            .any(|(_, reason, _)| reason == "DriftCorrected"),
        "{events:?}"
    );
    let aws = aws_resources_of(&cluster, &uid)?;
    assert_eq!(aws["load_balancers"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        aws["target_groups"].as_array().map(Vec::len),
        Some(1),
        "the TG was reused"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_follower_takes_over() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let client = cluster.client();
    let leader = ControllerProcess::start(&cluster, &[])?;
    leader.wait_ready(Duration::from_secs(60))?;
    eventually(Duration::from_secs(30), "the first replica to lead", || {
        let leading = leader.is_leader();
        async move { Ok(leading?.then_some(())) }
    })
    .await?;
    let follower = ControllerProcess::start(&cluster, &[])?;
    follower.wait_ready(Duration::from_secs(60))?;

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let created = services
        .create(&PostParams::default(), &service_python(json!({}))?)
        .await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();
    eventually(Duration::from_secs(60), "an NLB", || {
        let cluster = &cluster;
        let uid = uid.clone();
        async move {
            let aws = aws_resources_of(cluster, &uid)?;
            Ok((aws["load_balancers"].as_array().map(Vec::len) == Some(1)).then_some(()))
        }
    })
    .await?;
    assert!(!follower.is_leader()?);
    assert_eq!(
        follower.aws_calls()?,
        Default::default(),
        "a follower calls no AWS API"
    );

    // SIGKILL the leader: the follower leads within the lease duration + 5 s
    // and finishes the job (here: the Service's deletion).
    let killed_at = Instant::now();
    drop(leader);
    eventually(Duration::from_secs(20), "the follower to lead", || {
        let leading = follower.is_leader();
        async move { Ok(leading?.then_some(())) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; follower log:\n{}", follower.log()))?;
    assert!(killed_at.elapsed() <= Duration::from_secs(20));
    services
        .delete("service-python", &Default::default())
        .await?;
    wait_until_deleted(&services, "service-python", Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}; follower log:\n{}", follower.log()))?;
    let aws = aws_resources_of(&cluster, &uid)?;
    assert_eq!(aws["load_balancers"], json!([]));
    assert_eq!(aws["target_groups"], json!([]));
    assert_eq!(aws["security_groups"], json!([]));
    Ok(())
}

/// A Service named differently, for tests that need two.
fn named(name: &str, annotations: Value) -> Result<Service> {
    let mut svc = service_python(annotations)?;
    svc.metadata.name = Some(name.into());
    if let Some(port) = svc.spec.as_mut().and_then(|s| s.ports.as_mut()) {
        // Let the apiserver pick the NodePort: two Services cannot share 30080.
        port[0].node_port = None;
    }
    Ok(svc)
}

/// Creates `web-0` … `web-{count-1}` and waits until each has its hostname.
async fn create_web_services(
    services: &Api<Service>,
    controller: &ControllerProcess,
    count: usize,
) -> Result<()> {
    for i in 0..count {
        services
            .create(
                &PostParams::default(),
                &named(&format!("web-{i}"), json!({}))?,
            )
            .await?;
    }
    for i in 0..count {
        wait_for_hostname(services, &format!("web-{i}"), Duration::from_secs(180))
            .await
            .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;
    }
    Ok(())
}

/// The edit the tests make to an existing Service: a tag for its resources.
async fn tag_for_checkout(services: &Api<Service>, name: &str) -> Result<()> {
    services
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags": "team=checkout"
            }}})),
        )
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aws_refusal_is_reported_on_its_service_and_others_proceed() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let client = cluster.client();
    let controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");

    // A subnet that does not exist: AWS refuses the create, not the parser.
    let broken = services
        .create(
            &PostParams::default(),
            &named(
                "broken",
                json!({"service.beta.kubernetes.io/aws-load-balancer-subnets": "subnet-0deadbeef, subnet-0feedface"}),
            )?,
        )
        .await?;
    let fine = services
        .create(&PostParams::default(), &named("fine", json!({}))?)
        .await?;
    let broken_uid = broken.metadata.uid.clone().unwrap_or_default();

    // The other Service gets its load balancer.
    wait_for_hostname(&services, "fine", Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;

    // The broken one: a Warning event and a condition, both with AWS's words.
    let note = wait_for_event(
        &client,
        &broken_uid,
        "Warning",
        "SyncLoadBalancerFailed",
        Duration::from_secs(30),
    )
    .await?;
    assert!(
        note.contains("CreateLoadBalancer") && note.contains("subnet-0deadbeef"),
        "the event carries AWS's message: {note}"
    );
    // The condition says so too, and keeps saying so across retries.
    for _ in 0..2 {
        let message = eventually(Duration::from_secs(30), "an Error condition", || {
            let services = services.clone();
            async move {
                let svc = services.get("broken").await?;
                Ok(svc
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .into_iter()
                    .find(|c| {
                        c.type_ == "causeway.dev/LoadBalancerReady"
                            && c.status == "False"
                            && c.reason == "Error"
                    })
                    .map(|c| c.message))
            }
        })
        .await?;
        assert!(
            message.contains("subnet-0deadbeef") && message.contains("retry in"),
            "{message}"
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    let fine_uid = fine.metadata.uid.clone().unwrap_or_default();
    assert_eq!(
        aws_resources_of(&cluster, &fine_uid)?["load_balancers"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    Ok(())
}

/// A restarted controller reads every Service's resources back. The region's
/// NLBs and target groups, and the cluster's security groups, are listed once
/// for all of them (a listing per Service made a restart, or a drift-audit
/// round, cost calls in the square of the number of Services).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_lists_the_load_balancers_once_for_every_service() -> Result<()> {
    const SERVICES: usize = 12;
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    create_web_services(&services, &controller, SERVICES).await?;
    drop(controller);

    let controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    controller
        .wait_targets_read(SERVICES as u64, Duration::from_secs(60))
        .await?;
    // Nothing more is coming: no Service has anything to change.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = controller.aws_calls()?;
    // Each Service's own details are still read: its listeners once each.
    assert_eq!(
        calls.get("DescribeListeners"),
        Some(&(SERVICES as u64)),
        "{calls:?}"
    );
    // The listing: one page of each, and the tags of 24 resources in batches
    // of 20, at start (the orphan sweep) and for the observes, which may
    // outlive one listing's 30 s on a slow machine. The security groups (the
    // node SG and 12 frontend SGs) come in the same listing.
    for (operation, once) in [
        ("DescribeLoadBalancers", 1),
        ("DescribeTargetGroups", 1),
        ("DescribeTags", 2),
        ("DescribeSecurityGroups", 1),
    ] {
        let n = calls.get(operation).copied().unwrap_or(0);
        assert!(
            (once..=2 * once).contains(&n),
            "{operation}: {n} calls for {SERVICES} Services: {calls:?}"
        );
    }
    assert!(writes(&calls).is_empty(), "nothing to change: {calls:?}");
    Ok(())
}

/// Drift audits give way to changes. Eight Services under a Describe limit
/// of one call per second and a 10 s audit period: each audit reads about
/// ten things back, so the audits are always late. A Service edited then is
/// applied at once. (When audits queued like changes, the edit waited for a
/// worker behind every overdue audit, and its reads behind theirs: minutes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_goes_ahead_of_overdue_drift_audits() -> Result<()> {
    const SERVICES: usize = 8;
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let client = cluster.client();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let controller = ControllerProcess::start(
        &cluster,
        &["--drift-audit-period", "10s", "--aws-describe-rate", "1"],
    )?;
    controller.wait_ready(Duration::from_secs(60))?;
    create_web_services(&services, &controller, SERVICES).await?;
    // Audits under way, and calls waiting for the Describe limit.
    eventually(Duration::from_secs(120), "audits to queue", || async {
        let metrics = controller.metrics()?;
        let waited = metrics
            .get("causeway_aws_throttle_wait_seconds_total{category=\"describe\"}")
            .copied()
            .unwrap_or(0.0);
        let audited = controller
            .aws_calls()?
            .get("DescribeTargetHealth")
            .copied()
            .unwrap_or(0);
        Ok((waited >= 20.0 && audited >= 4).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;

    let edited = services.get("web-3").await?;
    let uid = edited.metadata.uid.clone().unwrap_or_default();
    let targets_read = |calls: &std::collections::BTreeMap<String, u64>| {
        calls.get("DescribeTargetHealth").copied().unwrap_or(0)
    };
    let audited_before = targets_read(&controller.aws_calls()?);
    let started = Instant::now();
    tag_for_checkout(&services, "web-3").await?;
    wait_for_event(
        &client,
        &uid,
        "Normal",
        "UpdatedLoadBalancer",
        Duration::from_secs(120),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;
    let took = started.elapsed();
    eprintln!("the edit was applied {took:?} after it was made");
    let aws = aws_resources_of(&cluster, &uid)?;
    assert_eq!(
        aws["load_balancers"][0]["tags"]["team"], "checkout",
        "{aws}"
    );
    // About ten reads at one per second, and the writes; the audits that were
    // due before it would have taken minutes.
    assert!(
        took < Duration::from_secs(40),
        "the edit took {took:?} to apply; controller log:\n{}",
        controller.log()
    );
    // The audits still run, two at a time (half the four workers); the
    // others are put off. They find nothing to change.
    eventually(Duration::from_secs(60), "more audits", || async {
        let audited = targets_read(&controller.aws_calls()?);
        Ok((audited >= audited_before + 3).then_some(()))
    })
    .await?;
    let metrics = controller.metrics()?;
    let postponed = metrics
        .get("causeway_drift_audits_postponed_total")
        .copied()
        .unwrap_or(0.0);
    assert!(postponed > 0.0, "{metrics:?}");
    for svc in services.list(&Default::default()).await? {
        let events = events_of(&client, &svc.metadata.uid.unwrap_or_default()).await?;
        assert!(
            !events
                .iter()
                .any(|(_, reason, _)| reason == "DriftCorrected"),
            "{events:?}"
        );
    }
    Ok(())
}

/// An NLB deleted behind the controller's back while the listing it read
/// still names it: the next observe finds it gone (a NotFound on its
/// attributes), lists again at once and creates a new one, with no failed
/// reconcile. (Without the second listing the Service failed until the
/// listing expired, 30 s later.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nlb_deleted_since_the_listing_is_listed_again_and_recreated() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let client = cluster.client();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    let svc = services
        .create(&PostParams::default(), &named("web", json!({}))?)
        .await?;
    let uid = svc.metadata.uid.clone().unwrap_or_default();
    wait_for_hostname(&services, "web", Duration::from_secs(120)).await?;
    let first = aws_resources_of(&cluster, &uid)?["load_balancers"][0]["arn"].clone();
    drop(controller);

    // A restarted controller lists everything once and reads the Service
    // back, writing nothing: its listing stays in use for 30 s.
    let controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    controller
        .wait_targets_read(1, Duration::from_secs(30))
        .await?;
    let before = controller.aws_calls()?;
    delete_load_balancers_of(&cluster, &uid)?;
    tag_for_checkout(&services, "web").await?;
    let second = eventually(Duration::from_secs(60), "a new NLB", || {
        let cluster = &cluster;
        let uid = uid.clone();
        async move {
            let aws = aws_resources_of(cluster, &uid)?;
            let lb = &aws["load_balancers"][0];
            let listeners = lb["listeners"].as_array().map_or(0, Vec::len);
            Ok((lb["tags"]["team"] == "checkout" && listeners == 1)
                .then(|| (lb["arn"].clone(), lb["dns"].clone())))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;
    assert_ne!(second.0, first, "a new NLB");
    let hostname = wait_for_hostname(&services, "web", Duration::from_secs(30)).await?;
    assert_eq!(second.1, hostname.as_str());

    // The deleted NLB was found gone through its attributes, and the region
    // listed once more.
    let metrics = controller.metrics()?;
    let not_found = metrics
        .iter()
        .filter(|(k, _)| {
            k.contains("operation=\"DescribeLoadBalancerAttributes\"")
                && k.contains("outcome=\"error\"")
        })
        .map(|(_, v)| *v)
        .sum::<f64>();
    assert_eq!(not_found, 1.0, "{metrics:?}");
    let calls = calls_between(&before, &controller.aws_calls()?);
    assert!(
        calls.get("DescribeLoadBalancers") >= Some(&1),
        "listed again: {calls:?}"
    );
    let events = events_of(&client, &uid).await?;
    assert!(
        !events.iter().any(|(kind, _, _)| kind == "Warning"),
        "no failed reconcile: {events:?}"
    );
    Ok(())
}

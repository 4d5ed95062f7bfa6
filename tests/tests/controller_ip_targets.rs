//! causeway-controller with `aws-load-balancer-nlb-target-type: ip`, against a
//! real kube-apiserver (whose EndpointSlice controller publishes the pods) and
//! moto: the target group holds exactly the ready pod IPs on the target port;
//! a pod turning unready, ready again, added or deleted costs exactly one
//! DeregisterTargets or RegisterTargets, and the same pod changes cost an
//! instance-target Service selecting the same pods nothing; deleting the
//! Services leaves nothing tagged with their UIDs.

use std::time::Duration;

use anyhow::Result;
use causeway_tests::controller::{
    ControllerProcess, aws_resources_of, calls_between, node_sg_rule_ports, tagged_inventory,
    targets as tg_targets, wait_for_hostname,
};
use causeway_tests::wait::eventually;
use causeway_tests::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};

const CLASS: &str = "causeway.dev/nlb";
const TARGET_TYPE: &str = "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type";
/// The pods' port behind Service port 80 (causeway-echo listens on it).
const POD_PORT: u64 = 8080;

/// A LoadBalancer Service of our class selecting `app=web`, port 80 → 8080.
fn web_service(name: &str, annotations: Value) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": POD_PORT}]
        }
    }))?)
}

/// The registered targets of the Service's only target group, sorted.
fn targets(aws: &Value) -> Vec<(String, u64)> {
    tg_targets(&aws["target_groups"][0])
}

fn pod_targets(ips: &[std::net::Ipv4Addr]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = ips.iter().map(|ip| (ip.to_string(), POD_PORT)).collect();
    out.sort();
    out
}

/// Waits until the Service's target group holds exactly `want`.
async fn wait_targets(
    cluster: &Cluster,
    controller: &ControllerProcess,
    uid: &str,
    want: &[(String, u64)],
    what: &str,
) -> Result<()> {
    eventually(Duration::from_secs(60), what, || async move {
        let aws = aws_resources_of(cluster, uid)?;
        Ok(
            (aws["target_groups"].as_array().map(Vec::len) == Some(1) && targets(&aws) == want)
                .then_some(()),
        )
    })
    .await
    .map_err(|e| {
        let aws = aws_resources_of(cluster, uid).unwrap_or_default();
        anyhow::anyhow!(
            "{e}; want {want:?}, moto has {aws:#}; controller log:\n{}",
            controller.log()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_targets_are_the_ready_pods_and_follow_them_one_call_at_a_time() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let client = cluster.client();
    let web1 = cluster
        .add_pod("node-1", "web-1", &[("app", "web")])
        .await?;
    let web2 = cluster
        .add_pod("node-2", "web-2", &[("app", "web")])
        .await?;
    // Not selected by the Service: never a target.
    let other = cluster
        .add_pod("node-1", "other", &[("app", "other")])
        .await?;

    let controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let ip_uid = services
        .create(
            &PostParams::default(),
            &web_service("web", json!({TARGET_TYPE: "ip"}))?,
        )
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    // The same pods behind instance targets: their endpoint changes must cost
    // this Service no AWS call at all.
    let instance_uid = services
        .create(
            &PostParams::default(),
            &web_service("web-nodes", json!({}))?,
        )
        .await?
        .metadata
        .uid
        .unwrap_or_default();

    // The ip Service: an NLB whose target group holds the two ready pods on
    // their port, as ip targets with a TCP check on that port.
    wait_targets(
        &cluster,
        &controller,
        &ip_uid,
        &pod_targets(&[web1.ip, web2.ip]),
        "the two pods registered",
    )
    .await?;
    let aws = aws_resources_of(&cluster, &ip_uid)?;
    let tg = &aws["target_groups"][0];
    assert_eq!(tg["target_type"], "ip", "{aws:#}");
    assert_eq!(tg["port"], 80);
    assert_eq!(tg["protocol"], "TCP");
    assert_eq!(tg["health_check"]["protocol"], "TCP");
    assert_eq!(tg["health_check"]["port"], "traffic-port");
    let listener = &aws["load_balancers"][0]["listeners"][0];
    assert_eq!(
        aws["load_balancers"][0]["listeners"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        (
            &listener["port"],
            &listener["protocol"],
            &listener["target_group"]
        ),
        (&json!(80), &json!("TCP"), &tg["arn"])
    );
    assert!(
        !targets(&aws)
            .iter()
            .any(|(ip, _)| *ip == other.ip.to_string()),
        "a pod the Service does not select is no target"
    );
    // Traffic and health checks reach the pods' port from the NLB's SG.
    let rule_ports = node_sg_rule_ports(&cluster, &aws);
    assert_eq!(rule_ports, [POD_PORT], "{aws:#}");
    let hostname = wait_for_hostname(&services, "web", Duration::from_secs(30)).await?;
    assert_eq!(aws["load_balancers"][0]["dns"], hostname.as_str());
    // The instance Service is fully built (nodes on the NodePort) before the
    // call counting starts.
    eventually(
        Duration::from_secs(60),
        "the instance Service's NLB",
        || async {
            let aws = aws_resources_of(&cluster, &instance_uid)?;
            Ok((aws["load_balancers"].as_array().map(Vec::len) == Some(1)
                && aws["target_groups"][0]["target_type"] == "instance"
                && targets(&aws).len() == 2)
                .then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let node1 = cluster.node("node-1").clone();
    let only = |op: &str| -> std::collections::BTreeMap<String, u64> {
        [(op.to_string(), 1)].into_iter().collect()
    };

    // web-1 turns unready: deregistered, one call.
    let before = controller.aws_calls()?;
    cluster
        .set_pod_ready("default", "web-1", web1.ip, &node1, false)
        .await?;
    wait_targets(
        &cluster,
        &controller,
        &ip_uid,
        &pod_targets(&[web2.ip]),
        "the unready pod deregistered",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        calls_between(&before, &controller.aws_calls()?),
        only("DeregisterTargets"),
        "an unready pod costs one DeregisterTargets; controller log:\n{}",
        controller.log()
    );

    // web-1 is ready again: registered, one call.
    let before = controller.aws_calls()?;
    cluster
        .set_pod_ready("default", "web-1", web1.ip, &node1, true)
        .await?;
    wait_targets(
        &cluster,
        &controller,
        &ip_uid,
        &pod_targets(&[web1.ip, web2.ip]),
        "the ready pod registered again",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        calls_between(&before, &controller.aws_calls()?),
        only("RegisterTargets"),
        "a pod turning ready costs one RegisterTargets"
    );

    // A third pod: registered, one call.
    let before = controller.aws_calls()?;
    let web3 = cluster
        .add_pod("node-2", "web-3", &[("app", "web")])
        .await?;
    wait_targets(
        &cluster,
        &controller,
        &ip_uid,
        &pod_targets(&[web1.ip, web2.ip, web3.ip]),
        "the new pod registered",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        calls_between(&before, &controller.aws_calls()?),
        only("RegisterTargets"),
        "a new pod costs one RegisterTargets"
    );

    // web-2 is deleted: deregistered, one call.
    let before = controller.aws_calls()?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.delete(
        "web-2",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    wait_targets(
        &cluster,
        &controller,
        &ip_uid,
        &pod_targets(&[web1.ip, web3.ip]),
        "the deleted pod deregistered",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        calls_between(&before, &controller.aws_calls()?),
        only("DeregisterTargets"),
        "a deleted pod costs one DeregisterTargets"
    );

    // Deleting the Services deletes everything tagged with their UIDs.
    for name in ["web", "web-nodes"] {
        services.delete(name, &Default::default()).await?;
    }
    eventually(Duration::from_secs(60), "the Services to be gone", || {
        let services = services.clone();
        async move {
            Ok((services.get_opt("web").await?.is_none()
                && services.get_opt("web-nodes").await?.is_none())
            .then_some(()))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;
    for uid in [&ip_uid, &instance_uid] {
        assert_eq!(
            aws_resources_of(&cluster, uid)?,
            json!({"load_balancers": [], "target_groups": [], "security_groups": [], "rules_naming_uid": []}),
            "nothing tagged with (or describing) {uid} remains"
        );
    }
    let inventory = tagged_inventory(&cluster)?;
    assert!(
        !inventory.contains_key(&ip_uid) && !inventory.contains_key(&instance_uid),
        "{inventory:?}"
    );
    Ok(())
}

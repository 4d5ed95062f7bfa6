//! The orphan sweep of causeway-controller against a real kube-apiserver and
//! moto: resources tagged with our cluster for a Service UID that does not
//! exist (made here with boto3, as a controller that died with a finalizer
//! removed by hand would leave them) are deleted on the next sweep; those of
//! a live Service and those of another cluster are left alone.

use std::time::Duration;

use anyhow::{Result, ensure};
use causeway_tests::controller::{
    ControllerProcess, moto_python, tagged_inventory, wait_for_hostname,
};
use causeway_tests::wait::eventually;
use causeway_tests::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use serde_json::json;

const ORPHAN: &str = "00000000-dead-4bad-8000-000000000001";
const OTHER_CLUSTER: &str = "00000000-dead-4bad-8000-000000000002";

/// An NLB with a listener, a target group, a frontend SG and a node-SG rule
/// naming `uid`, all tagged like the controller tags them, for `cluster`.
fn make_resources(cluster: &Cluster, cluster_name: &str, uid: &str, suffix: &str) -> Result<()> {
    let snippet = format!(
        r#"
ours = 'kubernetes.io/cluster/{real}'
tags = [{{'Key': 'kubernetes.io/cluster/{cluster_name}', 'Value': 'owned'}},
        {{'Key': 'causeway.dev/service-uid', 'Value': '{uid}'}},
        {{'Key': 'kubernetes.io/service-name', 'Value': 'default/gone'}}]
subnets = [s for s in ec2.describe_subnets()['Subnets']
           if any(t['Key'] == ours for t in s.get('Tags', []))]
vpc = subnets[0]['VpcId']
node_sg = [g for g in ec2.describe_security_groups()['SecurityGroups']
           if any(t['Key'] == ours for t in g.get('Tags', []))
           and not any(t['Key'] == 'causeway.dev/resource' for t in g.get('Tags', []))][0]
sg = ec2.create_security_group(GroupName='orphan-{suffix}', Description='orphan', VpcId=vpc,
    TagSpecifications=[{{'ResourceType': 'security-group',
                         'Tags': tags + [{{'Key': 'causeway.dev/resource', 'Value': 'sg'}}]}}])['GroupId']
ec2.authorize_security_group_ingress(GroupId=node_sg['GroupId'], IpPermissions=[{{
    'IpProtocol': 'tcp', 'FromPort': 31999, 'ToPort': 31999,
    'UserIdGroupPairs': [{{'GroupId': sg, 'Description': 'causeway {uid} nodeport 31999/tcp'}}]}}])
lb = elb.create_load_balancer(Name='orphan-{suffix}', Type='network', Scheme='internet-facing',
    Subnets=[s['SubnetId'] for s in subnets[:1]], SecurityGroups=[sg],
    Tags=tags + [{{'Key': 'causeway.dev/resource', 'Value': 'lb'}}])['LoadBalancers'][0]['LoadBalancerArn']
tg = elb.create_target_group(Name='orphan-{suffix}', Protocol='TCP', Port=31999, VpcId=vpc,
    TargetType='instance', Tags=tags + [{{'Key': 'causeway.dev/resource', 'Value': 'tg-80-tcp'}}]
    )['TargetGroups'][0]['TargetGroupArn']
elb.create_listener(LoadBalancerArn=lb, Protocol='TCP', Port=80,
    DefaultActions=[{{'Type': 'forward', 'TargetGroupArn': tg}}])
"#,
        real = cluster.cluster_name(),
    );
    moto_python(cluster, &snippet)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_of_a_service_that_no_longer_exists_are_swept() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let controller = ControllerProcess::start(&cluster, &["--drift-audit-period", "3s"])?;
    controller.wait_ready(Duration::from_secs(60))?;

    // A live Service, converged.
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let live: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "live"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "causeway.dev/nlb",
                 "selector": {"run": "live"},
                 "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]}
    }))?;
    let live_uid = services
        .create(&PostParams::default(), &live)
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    wait_for_hostname(&services, "live", Duration::from_secs(60)).await?;
    let live_resources = tagged_inventory(&cluster)?.remove(&live_uid);
    ensure!(live_resources.is_some());

    // Behind its back: a dead Service's resources, and another cluster's.
    make_resources(&cluster, cluster.cluster_name(), ORPHAN, "dead")?;
    make_resources(&cluster, "someone-else", OTHER_CLUSTER, "other")?;
    // (Checking the set-up here would race the sweep; boto3 raised if any
    // of it failed.)

    // The next sweep (every drift-audit period) deletes the orphan's.
    eventually(Duration::from_secs(30), "the orphan swept", || async {
        Ok((!tagged_inventory(&cluster)?.contains_key(ORPHAN)).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;

    let inventory = tagged_inventory(&cluster)?;
    ensure!(
        inventory.get(&live_uid) == live_resources.as_ref(),
        "the live Service's resources changed: {inventory:?}"
    );
    ensure!(
        inventory
            .get(OTHER_CLUSTER)
            .is_some_and(|c| c.get("lb") == Some(&1) && c.get("tg") == Some(&1)),
        "another cluster's resources must stay: {inventory:?}"
    );
    ensure!(
        controller.log().contains("orphan sweep: deleting"),
        "{}",
        controller.log()
    );
    Ok(())
}

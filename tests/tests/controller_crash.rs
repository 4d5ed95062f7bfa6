//! Crash safety of causeway-controller against a real kube-apiserver and moto:
//! the controller is killed (it aborts itself through the test-only stop point
//! `CAUSEWAY_TEST_EXIT_AFTER_WRITES=N`, right after its Nth successful AWS
//! write) between every pair of AWS writes of a create and of a delete; a
//! fresh controller started afterwards converges, and moto holds, by tags,
//! exactly what one uninterrupted create holds: no duplicate, no leak.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Result, ensure};
use causeway_tests::controller::{
    ControllerProcess, calls_between, tagged_inventory, wait_for_hostname, wait_until_deleted,
};
use causeway_tests::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

const CLASS: &str = "causeway.dev/nlb";
/// One replica at a time: no lease to wait out after a kill. Every restart
/// reads back every Service, so reads are not rate-limited (moto is not an
/// AWS account shared with others).
const ARGS: &[&str] = &["--leader-elect=false", "--aws-describe-rate", "0"];
const STOP_POINT: &str = "CAUSEWAY_TEST_EXIT_AFTER_WRITES";

fn service(name: &str) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            "selector": {"run": name},
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]
        }
    }))?)
}

async fn create(services: &Api<Service>, name: &str) -> Result<String> {
    let created = services
        .create(&PostParams::default(), &service(name)?)
        .await?;
    Ok(created.metadata.uid.unwrap_or_default())
}

async fn wait_ingress(
    services: &Api<Service>,
    name: &str,
    controller: &ControllerProcess,
) -> Result<()> {
    wait_for_hostname(services, name, Duration::from_secs(60))
        .await
        .map(drop)
        .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))
}

async fn wait_gone(
    services: &Api<Service>,
    name: &str,
    controller: &ControllerProcess,
) -> Result<()> {
    wait_until_deleted(services, name, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))
}

/// Starts a controller that aborts right after its `n`th AWS write, does
/// `change` to the Service `name`, and checks that it stopped exactly there.
async fn crash_at_write<T>(
    cluster: &Cluster,
    n: u64,
    name: &str,
    change: impl std::future::Future<Output = Result<T>>,
) -> Result<()> {
    let mut crashing =
        ControllerProcess::start_with_env(cluster, ARGS, &[(STOP_POINT, &n.to_string())])?;
    crashing.wait_ready(Duration::from_secs(60))?;
    change.await?;
    let status = crashing.wait_exit(Duration::from_secs(60))?;
    ensure!(
        !status.success(),
        "{name}: the controller exited cleanly instead of at write {n}"
    );
    let stopped = format!("{STOP_POINT}={n}: aborting after");
    ensure!(
        crashing.log().contains(&stopped),
        "{name}: not stopped at write {n}; log:\n{}",
        crashing.log()
    );
    Ok(())
}

fn writes(calls: &BTreeMap<String, u64>) -> u64 {
    causeway_tests::controller::writes(calls).values().sum()
}

/// Every live Service has exactly `expected` in moto; nothing else is tagged.
async fn check_no_duplicate_no_leak(
    cluster: &Cluster,
    services: &Api<Service>,
    expected: &BTreeMap<String, u64>,
    context: &str,
) -> Result<()> {
    let live: BTreeSet<String> = services
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|s| s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer"))
        .filter_map(|s| s.metadata.uid)
        .collect();
    let inventory = tagged_inventory(cluster)?;
    let tagged: BTreeSet<String> = inventory.keys().cloned().collect();
    ensure!(
        tagged == live,
        "{context}: resources tagged for {tagged:?}, live Services {live:?}"
    );
    for (uid, counts) in &inventory {
        ensure!(
            counts == expected,
            "{context}: Service {uid} has {counts:?} in moto, one create makes {expected:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_any_two_writes_the_controller_converges_without_duplicates_or_leaks()
-> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");

    // Reference: what one uninterrupted create writes and leaves in moto, and
    // how many writes one delete takes.
    let controller = ControllerProcess::start(&cluster, ARGS)?;
    controller.wait_ready(Duration::from_secs(60))?;
    let before = controller.aws_calls()?;
    let reference = create(&services, "reference").await?;
    wait_ingress(&services, "reference", &controller).await?;
    let create_writes = writes(&calls_between(&before, &controller.aws_calls()?));
    let expected = tagged_inventory(&cluster)?
        .remove(&reference)
        .unwrap_or_default();
    ensure!(
        expected.get("lb") == Some(&1) && expected.get("tg") == Some(&1),
        "{expected:?}"
    );

    let probe = create(&services, "probe").await?;
    wait_ingress(&services, "probe", &controller).await?;
    let before = controller.aws_calls()?;
    services.delete("probe", &DeleteParams::default()).await?;
    wait_gone(&services, "probe", &controller).await?;
    let delete_writes = writes(&calls_between(&before, &controller.aws_calls()?));
    ensure!(
        !tagged_inventory(&cluster)?.contains_key(&probe),
        "probe left resources"
    );
    eprintln!("one create = {create_writes} writes, one delete = {delete_writes} writes");
    ensure!(create_writes >= 5 && delete_writes >= 4);

    // The Services the delete phase kills the controller in.
    for n in 1..=delete_writes {
        create(&services, &format!("delete-{n}")).await?;
    }
    for n in 1..=delete_writes {
        wait_ingress(&services, &format!("delete-{n}"), &controller).await?;
    }
    drop(controller);
    check_no_duplicate_no_leak(&cluster, &services, &expected, "before the kills").await?;

    // Create: killed right after write n, for every n.
    for n in 1..=create_writes {
        let name = format!("create-{n}");
        crash_at_write(&cluster, n, &name, create(&services, &name)).await?;
        let controller = ControllerProcess::start(&cluster, ARGS)?;
        wait_ingress(&services, &name, &controller).await?;
        check_no_duplicate_no_leak(
            &cluster,
            &services,
            &expected,
            &format!("killed after write {n} of a create"),
        )
        .await?;
    }

    // Delete: killed right after write n, for every n.
    for n in 1..=delete_writes {
        let name = format!("delete-{n}");
        crash_at_write(&cluster, n, &name, async {
            Ok(services.delete(&name, &DeleteParams::default()).await?)
        })
        .await?;
        let controller = ControllerProcess::start(&cluster, ARGS)?;
        wait_gone(&services, &name, &controller).await?;
        check_no_duplicate_no_leak(
            &cluster,
            &services,
            &expected,
            &format!("killed after write {n} of a delete"),
        )
        .await?;
    }
    Ok(())
}

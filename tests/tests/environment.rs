//! The local environment itself: a real apiserver whose real EndpointSlice
//! controllers publish the harness's pods, moto seeded as a cluster's AWS
//! account, namespace nodes that reach each other's pods, and a tear-down that
//! leaves nothing behind.

use std::time::Duration;

use anyhow::Result;
use causeway_tests::cluster::{ClusterOptions, REGION};
use causeway_tests::wait::eventually;
use causeway_tests::{Cluster, netns};
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slice_lists_pods_on_two_nodes_as_ready() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let client = cluster.client();

    // The Node objects mirror the namespaces and moto's instances.
    let nodes: Api<Node> = Api::all(client.clone());
    let listed = nodes.list(&ListParams::default()).await?;
    let mut names: Vec<String> = listed
        .items
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["node-1", "node-2"]);
    for node in &listed.items {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let info = cluster.node(name);
        let provider = node
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.clone())
            .unwrap_or_default();
        assert_eq!(
            provider,
            format!("aws:///{}/{}", info.zone, info.instance_id)
        );
        let addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.clone())
            .unwrap_or_default();
        assert!(
            addresses
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == info.ip.to_string()),
            "{addresses:?}"
        );
    }

    let web1 = cluster
        .add_pod("node-1", "web-1", &[("app", "web")])
        .await?;
    let web2 = cluster
        .add_pod("node-2", "web-2", &[("app", "web")])
        .await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 80}]}
    }))?;
    services.create(&PostParams::default(), &service).await?;

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let endpoints = eventually(
        Duration::from_secs(30),
        "an EndpointSlice with both pods ready",
        || {
            let slices = slices.clone();
            async move {
                let list = slices
                    .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                    .await?;
                let mut ready: Vec<(String, String)> = list
                    .items
                    .iter()
                    .flat_map(|s| s.endpoints.iter())
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .map(|e| {
                        (
                            e.addresses.join(","),
                            e.node_name.clone().unwrap_or_default(),
                        )
                    })
                    .collect();
                ready.sort();
                Ok((ready.len() == 2).then_some(ready))
            }
        },
    )
    .await?;
    assert_eq!(
        endpoints,
        vec![
            (web1.ip.to_string(), "node-1".to_string()),
            (web2.ip.to_string(), "node-2".to_string())
        ]
    );

    // The pods are real: node-1 reaches the pod on node-2 across the node network,
    // and the pod reports the address it saw.
    let reply = netns::exec_in(
        &cluster.node("node-1").netns,
        &causeway_tests::paths::workspace_bin("causeway-echo")
            .display()
            .to_string(),
        &["probe", "--tcp", &format!("{}:80", web2.ip)],
    )?;
    let expected = format!("ok web-2 {}:", cluster.node("node-1").ip);
    assert!(
        reply.starts_with(&expected),
        "expected {expected}<port>, got {reply:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectorless_service_with_endpoints_gets_a_mirrored_slice() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let client = cluster.client();
    // The seed article's selector-less Service and its hand-written Endpoints.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "my-service"},
                "spec": {"ports": [{"protocol": "TCP", "port": 80, "targetPort": 9376}]}
            }))?,
        )
        .await?;
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    endpoints
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": "my-service"},
                "subsets": [{"addresses": [{"ip": "192.0.2.42"}], "ports": [{"port": 9376}]}]
            }))?,
        )
        .await?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice = eventually(
        Duration::from_secs(30),
        "a mirrored EndpointSlice for my-service",
        || {
            let slices = slices.clone();
            async move {
                let list = slices
                    .list(&ListParams::default().labels("kubernetes.io/service-name=my-service"))
                    .await?;
                Ok(list.items.into_iter().next())
            }
        },
    )
    .await?;
    let labels = slice.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("endpointslice.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("endpointslicemirroring-controller.k8s.io")
    );
    let addresses: Vec<String> = slice
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.clone())
        .collect();
    assert_eq!(addresses, ["192.0.2.42"]);
    let ports: Vec<i32> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.port)
        .collect();
    assert_eq!(ports, [9376]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_answers_describe_subnets_with_the_tagged_subnets() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    // Ask moto the way a controller discovers subnets: by the role and cluster tags.
    let venv = causeway_tests::cluster::moto_venv()?;
    let script = format!(
        "import boto3, json\n\
         ec2 = boto3.client('ec2', endpoint_url='{endpoint}', region_name='{REGION}', \
         aws_access_key_id='testing', aws_secret_access_key='testing')\n\
         r = ec2.describe_subnets(Filters=[{{'Name': 'tag:kubernetes.io/role/elb', 'Values': ['1']}}, \
         {{'Name': 'tag-key', 'Values': ['kubernetes.io/cluster/{cluster}']}}])\n\
         print(json.dumps(sorted([(s['SubnetId'], s['AvailabilityZone']) for s in r['Subnets']])))\n",
        endpoint = cluster.aws_endpoint(),
        cluster = cluster.cluster_name(),
    );
    let out = netns::run(
        &venv.join("bin/python").display().to_string(),
        &["-c", &script],
    )?;
    let found: Vec<(String, String)> = serde_json::from_str(out.trim())?;
    let mut expected: Vec<(String, String)> = cluster
        .aws()
        .subnets
        .iter()
        .filter(|s| s.role == "elb")
        .map(|s| (s.id.clone(), s.zone.clone()))
        .collect();
    expected.sort();
    assert_eq!(found, expected);
    let zones: std::collections::BTreeSet<&str> = found.iter().map(|(_, z)| z.as_str()).collect();
    assert_eq!(
        zones.len(),
        2,
        "one public subnet in each of two zones: {found:?}"
    );
    // Every node has its instance, in the zone its Node object says.
    assert_eq!(cluster.aws().instances.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_leaves_no_namespace_link_or_process() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    cluster
        .add_pod("node-2", "lonely", &[("app", "lonely")])
        .await?;
    let recorded = cluster.recorded();
    let dir = cluster.dir();
    assert!(
        recorded.netns.len() >= 4,
        "two nodes, the external client and a pod: {:?}",
        recorded.netns
    );
    assert!(
        recorded.processes.len() >= 5,
        "etcd, apiserver, controller-manager, moto, echo: {:?}",
        recorded.processes
    );
    for p in &recorded.processes {
        assert!(
            std::path::Path::new(&format!("/proc/{}", p.pid)).exists(),
            "{} should run before tear-down",
            p.name
        );
    }
    drop(cluster);

    let namespaces = netns::list_netns();
    for ns in &recorded.netns {
        assert!(
            !namespaces.contains(ns),
            "namespace {ns} survived tear-down"
        );
    }
    let links = netns::list_links();
    for link in &recorded.links {
        assert!(!links.contains(link), "link {link} survived tear-down");
    }
    let prefix = format!("cw{}", recorded.slot);
    assert!(
        !links.iter().any(|l| l.starts_with(&prefix)
            && l[prefix.len()..].starts_with(|c: char| !c.is_ascii_digit())),
        "a link of slot {} survived: {links:?}",
        recorded.slot
    );
    for p in &recorded.processes {
        let alive = std::fs::read(format!("/proc/{}/cmdline", p.pid))
            .map(|c| String::from_utf8_lossy(&c).contains(&p.name))
            .unwrap_or(false);
        assert!(!alive, "{} (pid {}) survived tear-down", p.name, p.pid);
    }
    assert!(!dir.exists(), "state directory {} survived", dir.display());
    Ok(())
}

//! A node switched from the real kube-proxy (v1.34.4 in iptables mode, built
//! from the Kubernetes Go modules by e2e/build-k8s.sh) to causeway-agent and
//! back, on the real control plane, with clients connecting all along:
//!
//! - the agent takes kube-proxy's rules over under kube-proxy's own chain
//!   names, and its rules differ from kube-proxy's only where docs/agent.md
//!   says they do;
//! - its health and metrics servers answer as kube-proxy's;
//! - session affinity lives on in the same `-m recent` lists;
//! - kube-proxy takes the node back with a successful restore, and deletes
//!   everything of the agent's, dispatch buckets included;
//! - on a dual-stack node both write the same rules for both families, with
//!   each way of detecting pod traffic (rules and health answers only: the
//!   pods here are IPv4; `agent_cluster` sends IPv6 packets through `run`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use causeway_agent::rules::{DISPATCH_BUCKET_PREFIX, is_dispatch_bucket};
use causeway_tests::cluster::{ClusterOptions, Pod, kube_proxy_binary, process_running};
use causeway_tests::metrics;
use causeway_tests::paths::workspace_bin;
use causeway_tests::wait::eventually;
use causeway_tests::{Cluster, netns};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// The per-Service chains kube-proxy and the agent both write.
const SERVICE_CHAINS: [&str; 4] = ["KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_takes_a_node_over_from_kube_proxy_and_gives_it_back() -> Result<()> {
    switch_there_and_back("nft", 0, &[]).await
}

/// kube-proxy on a legacy node (as EKS on Amazon Linux 2): the agent's
/// `auto` backend finds kube-proxy's rules there and keeps to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_takes_a_legacy_node_over_from_kube_proxy_and_gives_it_back() -> Result<()> {
    switch_there_and_back("legacy", 0, &[]).await
}

/// Both proxies with `--nodeport-addresses primary`: NodePorts and the
/// Service health checks on the node's IP alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_and_kube_proxy_agree_on_nodeport_addresses() -> Result<()> {
    switch_there_and_back("nft", 0, &["--nodeport-addresses=primary"]).await
}

/// With 1 000 more Services the agent dispatches through its buckets, which
/// kube-proxy does not know; it must still take the node back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxy_takes_a_node_back_from_the_agents_dispatch_buckets() -> Result<()> {
    switch_there_and_back("nft", 1000, &[]).await
}

/// The IPv6 cluster CIDR of the dual-stack run: node `i`'s (made-up) pods
/// in `fd00:244:0:<i>::/64`.
const CLUSTER_CIDR_V6: &str = "fd00:244::/56";

/// Both families on one node: kube-proxy and the agent with an IPv4 and an
/// IPv6 cluster CIDR, and the Services of [`create_dual_stack_services`].
/// No packets: rules, health answers, and kube-proxy's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_and_kube_proxy_agree_on_both_families() -> Result<()> {
    agree_on_both_families(&[]).await
}

/// The same with kube-proxy's other ways to mark traffic for masquerading:
/// all of it, on another mark bit, and pods told by their interfaces' names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_families_agree_masquerading_all_and_by_interface_prefix() -> Result<()> {
    agree_on_both_families(&[
        "--masquerade-all",
        "--iptables-masquerade-bit=10",
        "--detect-local-mode=InterfaceNamePrefix",
        "--pod-interface-name-prefix=veth",
    ])
    .await
}

/// The same with pods told by their bridge, and then by the Node's pod
/// CIDR (which the harness's Node objects give for IPv4 alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_families_agree_on_bridge_and_node_cidr_detection() -> Result<()> {
    agree_on_both_families(&[
        "--detect-local-mode=BridgeInterface",
        "--pod-bridge-interface=cbr0",
    ])
    .await?;
    agree_on_both_families(&["--detect-local-mode=NodeCIDR"]).await
}

/// The same with NodePorts on the node's network and an IPv6 range the
/// node has no address in, and then on every address but without
/// localhost NodePorts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_families_agree_on_nodeport_addresses() -> Result<()> {
    agree_on_both_families(&["--nodeport-addresses=NODE_NETWORK,fd00:1::/64"]).await?;
    agree_on_both_families(&["--iptables-localhost-nodeports=false"]).await
}

/// The agent's partial syncs end where kube-proxy's full computation
/// starts: the agent programs the dual-stack Services of
/// [`create_dual_stack_services`], then follows a round of changes made
/// through the apiserver, each family in partial syncs; kube-proxy, started
/// after it, computes the same Services from scratch. Their rules must
/// differ only as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_partial_syncs_end_where_kube_proxy_starts() -> Result<()> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let ns = cluster.node("node-1").netns.clone();
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client(), "default");
    let local_endpoints = create_dual_stack_services(&cluster, &services).await?;
    let cidrs = both_cluster_cidrs(&cluster);
    let both = [cidrs.as_str()];

    // On an empty node `auto` would follow the host's iptables; the rules
    // are read, and kube-proxy runs, with nft.
    let agent = start_agent(&cluster, &[&cidrs, "--iptables-backend", "nft"], &FAMILIES).await?;
    // The count of full syncs once the first ones are recorded (a sync's
    // durations are observed after its timestamp): none may follow.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sync_counts = |metrics: &str, kind: &str| -> Vec<f64> {
        FAMILIES
            .iter()
            .map(|f| {
                metrics::value(
                    metrics,
                    &format!("kubeproxy_sync_{kind}_proxy_rules_duration_seconds_count{{ip_family=\"{f}\"}}"),
                )
                .unwrap_or(0.0)
            })
            .collect()
    };
    let before = metrics_text(&ns)?;
    let full_syncs = sync_counts(&before, "full");
    let partial_syncs = sync_counts(&before, "partial");

    let merge = |value: serde_json::Value| Patch::Merge(value);
    let params = PatchParams::default();
    // Endpoints: web loses one on each family; empty gains one; draining's
    // terminating endpoint is ready again.
    for family in ["ipv4", "ipv6"] {
        let name = format!("web-{family}-0");
        let mut slice = slices.get(&name).await?;
        slice.endpoints.truncate(1);
        slices
            .replace(&name, &PostParams::default(), &slice)
            .await?;
        for (service, ready_again) in [("empty", false), ("draining", true)] {
            let name = format!("{service}-{family}-0");
            let mut slice = slices.get(&name).await?;
            if ready_again {
                let conditions = slice.endpoints[0]
                    .conditions
                    .get_or_insert_with(Default::default);
                conditions.ready = Some(true);
                conditions.terminating = Some(false);
            } else {
                let mut endpoint =
                    slices.get(&format!("web-{family}-0")).await?.endpoints[0].clone();
                endpoint.hints = None;
                slice.endpoints.push(endpoint);
            }
            slices
                .replace(&name, &PostParams::default(), &slice)
                .await?;
        }
    }
    // Services: a type, a policy, affinity, a port, a source range and an
    // ingress IP change; one goes, one comes.
    let changes = [
        (
            "web-np",
            json!({"spec": {"type": "ClusterIP", "ports": [
            {"port": 80, "targetPort": 80, "protocol": "TCP", "nodePort": null}]}}),
        ),
        ("far", json!({"spec": {"externalTrafficPolicy": "Cluster"}})),
        ("sticky", json!({"spec": {"sessionAffinity": "None"}})),
        (
            "multi",
            json!({"spec": {"ports": [
            {"name": "http", "port": 8080, "targetPort": 80, "protocol": "TCP"}]}}),
        ),
        (
            "lb-cluster",
            json!({"spec": {"loadBalancerSourceRanges": [
            "198.51.100.128/25", "2001:db8:200::/64"]}}),
        ),
    ];
    for (name, patch) in changes {
        services.patch(name, &params, &merge(patch)).await?;
    }
    services
        .patch_status(
            "web-lb",
            &params,
            &merge(json!({"status": {"loadBalancer": {"ingress": [
                {"ip": "203.0.113.11"}, {"ip": "2001:db8::11"}]}}})),
        )
        .await?;
    services.delete("zoned", &DeleteParams::default()).await?;
    let late: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "late"},
        "spec": {"type": "NodePort", "ipFamilyPolicy": "RequireDualStack",
                 "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}
    }))?;
    services.create(&PostParams::default(), &late).await?;
    for family in ["ipv4", "ipv6"] {
        let mut slice = slices.get(&format!("web-{family}-0")).await?;
        slice.metadata = serde_json::from_value(json!({
            "name": format!("late-{family}-0"),
            "labels": {"kubernetes.io/service-name": "late",
                       "endpointslice.kubernetes.io/managed-by": "causeway-tests"}}))?;
        slices.create(&PostParams::default(), &slice).await?;
    }
    let changed = now()?;

    // Synced and at rest: nothing pending, each family's last sync after
    // the last change and after its last queued change, and no sync in the
    // 1.5 s after that (more than --min-sync-period, so a change received
    // meanwhile would have been synced); the newest Service programmed.
    let at_rest = |metrics: &str| -> Option<Vec<f64>> {
        let value = |name: &str| metrics::value(metrics, name);
        let pending = value("kubeproxy_sync_proxy_rules_service_changes_pending")?
            + value("kubeproxy_sync_proxy_rules_endpoint_changes_pending")?;
        let stamps: Vec<f64> = FAMILIES
            .iter()
            .map(|f| {
                let last = value(&format!(
                    "kubeproxy_sync_proxy_rules_last_timestamp_seconds{{ip_family=\"{f}\"}}"
                ))?;
                let queued = value(&format!(
                    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{{ip_family=\"{f}\"}}"
                ))?;
                (last > changed && last >= queued).then_some(last)
            })
            .collect::<Option<_>>()?;
        (pending == 0.0).then_some(stamps)
    };
    let (synced, by_agent) = eventually(
        Duration::from_secs(30),
        "the agent's syncs of the changes",
        || async {
            let Some(first) = at_rest(&metrics_text(&ns).unwrap_or_default()) else {
                return Ok(None);
            };
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let metrics = metrics_text(&ns).unwrap_or_default();
            if at_rest(&metrics) != Some(first) {
                return Ok(None);
            }
            let Ok(rules) = Rules::save_families(&ns, "nft") else {
                return Ok(None);
            };
            let programmed = rules.iter().all(|r| {
                r.nat.iter().any(|l| l.contains("default/late cluster IP"))
                    && !r.nat.iter().any(|l| l.contains("default/zoned"))
            });
            Ok(programmed.then_some((metrics, rules)))
        },
    )
    .await?;
    // Followed in partial syncs, with no full one.
    assert_eq!(
        sync_counts(&synced, "full"),
        full_syncs,
        "full syncs:\n{synced}"
    );
    let partial_now = sync_counts(&synced, "partial");
    assert!(
        partial_now
            .iter()
            .zip(&partial_syncs)
            .all(|(now, before)| now > before),
        "partial syncs of each family: {partial_syncs:?} then {partial_now:?}"
    );
    stop(&cluster, &agent)?;

    start_kube_proxy(&cluster, "kube-proxy", "nft", &both, &FAMILIES).await?;
    for ((family, agents), kube_proxys) in FAMILIES
        .iter()
        .zip(&by_agent)
        .zip(Rules::save_families(&ns, "nft")?)
    {
        assert_same_family_rules(&ns, family, &kube_proxys, agents, &local_endpoints)?;
    }
    Ok(())
}

/// The same on a legacy node (kube-proxy on iptables-legacy and
/// ip6tables-legacy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_families_agree_on_a_legacy_node() -> Result<()> {
    agree_on_both_families_with("legacy", &[]).await
}

/// While the cluster autoscaler is taking node-1 away (its taint), both
/// proxies answer `/healthz` with 503 and the same body, and the rest as
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_agree_while_the_autoscaler_removes_the_node() -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    create_dual_stack_services(&cluster, &services).await?;
    let nodes: Api<Node> = Api::all(cluster.client());
    nodes
        .patch(
            "node-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": [{
                "key": "ToBeDeletedByClusterAutoscaler", "value": "1764670000",
                "effect": "NoSchedule"}]}})),
        )
        .await?;
    let cidrs = both_cluster_cidrs(&cluster);
    let both = [cidrs.as_str()];

    let (kube_proxy, _) = start_kube_proxy(&cluster, "kube-proxy", "nft", &both, &FAMILIES).await?;
    let kube_proxys_answers = http_answers(&cluster, &services, true, 503).await?;
    stop(&cluster, &kube_proxy)?;

    start_agent(&cluster, &both, &FAMILIES).await?;
    let agents_answers = http_answers(&cluster, &services, true, 503).await?;
    assert_eq!(
        agents_answers, kube_proxys_answers,
        "HTTP answers: the agent's, then kube-proxy's"
    );
    Ok(())
}

/// kube-proxy started on a node the agent already runs (on other ports, as
/// when its DaemonSet comes back beside the chart's): the agent says so, in
/// its log and in a Warning event on the Node, within its check period; and
/// once kube-proxy stops, the agent's rules are again exactly what they were
/// before, without kube-proxy's endpoint chains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_says_when_kube_proxy_runs_beside_it() -> Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let ns = cluster.node("node-1").netns.clone();
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    create_dual_stack_services(&cluster, &services).await?;
    let cidrs = both_cluster_cidrs(&cluster);
    let agent = start_agent(
        &cluster,
        &[&cidrs, "--iptables-backend", "nft", "--sync-period", "3s"],
        &FAMILIES,
    )
    .await?;
    let ours = || -> Result<Vec<Vec<String>>> {
        Ok(Rules::save_families(&ns, "nft")?
            .iter()
            .map(Rules::agents_chains)
            .collect())
    };
    let before = ours()?;
    assert!(
        !before.concat().iter().any(|l| l.contains(":KUBE-SEP-")),
        "the agent writes no KUBE-SEP- chains"
    );

    // On ports of its own: the agent holds kube-proxy's.
    let (kube_proxy, _) = start_kube_proxy(
        &cluster,
        "kube-proxy",
        "nft",
        &[
            &cidrs,
            "--healthz-bind-address=0.0.0.0:10257",
            "--metrics-bind-address=127.0.0.1:10250",
        ],
        &FAMILIES,
    )
    .await?;
    let node: Node = Api::all(cluster.client()).get("node-1").await?;
    let uid = node.metadata.uid.unwrap_or_default();
    let note = causeway_tests::controller::wait_for_event(
        &cluster.client(),
        &uid,
        "Warning",
        "KubeProxyRunning",
        Duration::from_secs(30),
    )
    .await?;
    assert!(
        note.contains("kube-proxy is running on this node too") && note.contains("KUBE-SEP-"),
        "{note}"
    );
    let log = std::fs::read_to_string(cluster.dir().join("agent.log"))?;
    assert!(
        log.contains("kube-proxy is running on this node too"),
        "{log}"
    );
    // After the agent's repair, kube-proxy's later (partial) syncs are seen
    // too: here for a Service changed, then changed back.
    let damaged = || -> Result<f64> {
        Ok(
            metrics::value(&metrics_text(&ns)?, "causeway_agent_rules_damaged_total")
                .unwrap_or(0.0),
        )
    };
    for affinity in ["None", "ClientIP"] {
        let seen = damaged()?;
        services
            .patch(
                "sticky",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"sessionAffinity": affinity}})),
            )
            .await?;
        eventually(
            Duration::from_secs(30),
            "the agent seeing kube-proxy's next sync",
            || async { Ok((damaged()? > seen).then_some(())) },
        )
        .await?;
    }

    stop(&cluster, &kube_proxy)?;
    eventually(
        Duration::from_secs(30),
        "the agent's rules as before kube-proxy",
        || async { Ok((ours()? == before).then_some(())) },
    )
    .await?;
    assert!(process_running(agent.pid), "the agent kept running");
    Ok(())
}

/// Runs kube-proxy, then the agent, then kube-proxy again on node-1, all
/// with `flags` and both cluster CIDRs, and compares what they write.
async fn agree_on_both_families(flags: &[&str]) -> Result<()> {
    agree_on_both_families_with("nft", flags).await
}

/// [`agree_on_both_families`] with kube-proxy on `backend`'s iptables (the
/// agent, with `auto`, keeps to it).
async fn agree_on_both_families_with(backend: &str, flags: &[&str]) -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let ns = cluster.node("node-1").netns.clone();
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let local_endpoints = create_dual_stack_services(&cluster, &services).await?;
    let cidrs = both_cluster_cidrs(&cluster);
    // NODE_NETWORK in a flag: the /24 of node-1's address.
    let [a, b, c, _] = cluster.node("node-1").ip.octets();
    let flags: Vec<String> = flags
        .iter()
        .map(|f| f.replace("NODE_NETWORK", &format!("{a}.{b}.{c}.0/24")))
        .collect();
    let mut both = vec![cidrs.as_str()];
    both.extend(flags.iter().map(String::as_str));

    let (kube_proxy, _) =
        start_kube_proxy(&cluster, "kube-proxy-1", backend, &both, &FAMILIES).await?;
    let by_kube_proxy = topology_applied(&ns, backend).await?;
    let kube_proxys_answers = http_answers(&cluster, &services, true, 200).await?;
    let kube_proxys_metrics = metrics_text(&ns)?;
    stop(&cluster, &kube_proxy)?;

    let agent = start_agent(&cluster, &both, &FAMILIES).await?;
    for ((family, kube_proxys), agents) in FAMILIES
        .iter()
        .zip(&by_kube_proxy)
        .zip(Rules::save_families(&ns, backend)?)
    {
        assert_same_family_rules(&ns, family, kube_proxys, &agents, &local_endpoints)?;
    }
    let agents_answers = http_answers(&cluster, &services, true, 200).await?;
    assert_eq!(
        agents_answers, kube_proxys_answers,
        "HTTP answers: the agent's, then kube-proxy's"
    );
    let theirs = kubeproxy_series(&kube_proxys_metrics, true);
    let ours = kubeproxy_series(&metrics_text(&ns)?, true);
    let missing: Vec<&String> = theirs.difference(&ours).collect();
    assert!(
        missing.is_empty(),
        "kube-proxy's metrics the agent lacks: {missing:?}"
    );
    stop(&cluster, &agent)?;

    // kube-proxy takes both families back to exactly its own rules.
    let (_, metrics) =
        start_kube_proxy(&cluster, "kube-proxy-2", backend, &both, &FAMILIES).await?;
    assert_no_restore_failures(&metrics);
    for ((family, before), again) in FAMILIES
        .iter()
        .zip(&by_kube_proxy)
        .zip(topology_applied(&ns, backend).await?)
    {
        assert_eq!(
            sorted(again.nat),
            sorted(before.nat.clone()),
            "{family} nat after kube-proxy's return"
        );
        assert_eq!(
            sorted(again.filter),
            sorted(before.filter.clone()),
            "{family} filter after kube-proxy's return"
        );
    }
    Ok(())
}

/// Both families' rules once kube-proxy routes `default/zoned` by its zone
/// hint (one endpoint). kube-proxy can sync before its Node informer has the
/// node's zone, and then routes to every endpoint until the next sync; one
/// CI run caught kube-proxy's second start in between. After 20 s the rules
/// are returned as they are, for the caller's comparison to show.
async fn topology_applied(ns: &str, backend: &str) -> Result<Vec<Rules>> {
    let zoned_endpoints = |rules: &Rules| {
        rules
            .nat
            .iter()
            .filter(|l| l.starts_with("-A KUBE-SVC-") && l.contains("\"default/zoned -> "))
            .count()
    };
    let settled = eventually(Duration::from_secs(20), "zone-aware rules", || async {
        let saved = Rules::save_families(ns, backend)?;
        Ok(saved
            .iter()
            .all(|r| zoned_endpoints(r) == 1)
            .then_some(saved))
    })
    .await;
    match settled {
        Ok(saved) => Ok(saved),
        Err(_) => Rules::save_families(ns, backend),
    }
}

/// The Services of [`service_specs`] made dual-stack, and more:
/// - `draining`: only serving-but-terminating and non-serving endpoints;
/// - `zoned` and `same-node`: zone and node hints;
/// - `sctp`: an SCTP port; `sticky-short`: affinity for 60 s;
/// - `lb-cluster`: a LoadBalancer with `externalTrafficPolicy: Cluster`, a
///   source range, and a hostname beside its IPs in the status; `lb-proxy`:
///   its ingress IPs with `ipMode: Proxy` (not programmed);
/// - `headless`, and `other-proxy` (labelled for another proxy): ignored;
/// - `lb-no-nodeports`: a LoadBalancer without NodePorts; `ext-local`: an
///   external IP, `externalTrafficPolicy: Local` and affinity;
/// - `named`: a named target port that is 8080 on one endpoint and 9090 on
///   the other; `unset-conditions`: an endpoint without conditions (ready);
///   `duplicated`: an endpoint in two slices.
///
/// The pods here are IPv4 alone, so these Services have no selectors: their
/// EndpointSlices, one per family, written here as the EndpointSlice
/// controller writes them, name made-up endpoints on node-1 and node-2.
/// Returns the addresses of the endpoints on node-1.
async fn create_dual_stack_services(
    cluster: &Cluster,
    services: &Api<Service>,
) -> Result<BTreeSet<String>> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client(), "default");
    let (zone_1, zone_2) = (&cluster.node("node-1").zone, &cluster.node("node-2").zone);
    assert_ne!(zone_1, zone_2, "the nodes' zones");
    // Per family: two endpoints on node-1 and one on node-2.
    // A made-up address in `node`'s pod CIDR (IPv4: `a.b.c.0/24`).
    let pod_ip = |node: &str, family: &str, last: u8| -> String {
        if family == "IPv6" {
            format!("fd00:244:0:{}::{last:x}", node.trim_start_matches("node-"))
        } else {
            let cidr = &cluster.node(node).pod_cidr;
            let network = cidr.rsplit_once(".0/").map_or(cidr.as_str(), |(n, _)| n);
            format!("{network}.{last}")
        }
    };
    let addresses = |family: &str| -> [String; 3] {
        [
            pod_ip("node-1", family, 200),
            pod_ip("node-1", family, 201),
            pod_ip("node-2", family, 200),
        ]
    };
    let endpoint = |address: &str, node: &str, zone: &str, conditions: serde_json::Value| json!({"addresses": [address], "conditions": conditions, "nodeName": node, "zone": zone});
    let ready = json!({"ready": true, "serving": true, "terminating": false});
    let mut specs = service_specs();
    specs.push((
        "draining",
        json!({"selector": {"app": "draining"},
        "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}),
    ));
    specs.push((
        "zoned",
        json!({"selector": {"app": "zoned"}, "trafficDistribution": "PreferClose",
        "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}),
    ));
    specs.push((
        "same-node",
        json!({"selector": {"app": "same-node"},
        "trafficDistribution": "PreferSameNode",
        "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}),
    ));
    let web_ports =
        |protocol: &str, port: u16| json!([{"port": port, "targetPort": 80, "protocol": protocol}]);
    let web = json!({"app": "web"});
    specs.extend([
        (
            "sctp",
            json!({"selector": web, "ports": web_ports("SCTP", 9000)}),
        ),
        (
            "sticky-short",
            json!({"selector": web, "ports": web_ports("TCP", 80), "sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
        ),
        (
            "lb-cluster",
            json!({"type": "LoadBalancer", "selector": web, "ports": web_ports("TCP", 80),
                   "loadBalancerSourceRanges": ["198.51.100.0/24"]}),
        ),
        (
            "lb-proxy",
            json!({"type": "LoadBalancer", "selector": web, "ports": web_ports("TCP", 80)}),
        ),
        (
            "headless",
            json!({"clusterIP": "None", "selector": web, "ports": web_ports("TCP", 80)}),
        ),
        (
            "other-proxy",
            json!({"selector": web, "ports": web_ports("TCP", 80)}),
        ),
        (
            "lb-no-nodeports",
            json!({"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                   "selector": web, "ports": web_ports("TCP", 80)}),
        ),
        (
            "ext-local",
            json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                   "sessionAffinity": "ClientIP", "externalIPs": ["203.0.113.21"],
                   "selector": web, "ports": web_ports("TCP", 80)}),
        ),
        (
            "named",
            json!({"selector": {"app": "named"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "web-port", "protocol": "TCP"}]}),
        ),
        (
            "unset-conditions",
            json!({"selector": {"app": "unset-conditions"}, "ports": web_ports("TCP", 80)}),
        ),
        (
            "duplicated",
            json!({"selector": {"app": "duplicated"}, "ports": web_ports("TCP", 80)}),
        ),
    ]);
    let mut local = BTreeSet::new();
    for (name, mut spec) in specs {
        let app = spec["selector"]["app"].as_str().unwrap_or("").to_string();
        let spec_map = spec.as_object_mut().context("a Service spec")?;
        spec_map.remove("selector");
        spec_map.insert("ipFamilyPolicy".into(), json!("RequireDualStack"));
        // 203.0.113.N has the twin 2001:db8::N.
        if let Some(ips) = spec_map
            .get_mut("externalIPs")
            .and_then(|v| v.as_array_mut())
        {
            let twins: Vec<serde_json::Value> = ips
                .iter()
                .filter_map(|ip| ip.as_str()?.rsplit('.').next())
                .map(|last| json!(format!("2001:db8::{last}")))
                .collect();
            ips.extend(twins);
        }
        if let Some(ranges) = spec_map
            .get_mut("loadBalancerSourceRanges")
            .and_then(|v| v.as_array_mut())
        {
            ranges.push(json!("2001:db8:100::/64"));
        }
        let ports: Vec<serde_json::Value> = spec["ports"]
            .as_array()
            .context("ports")?
            .iter()
            .map(|p| {
                json!({"name": p.get("name").cloned().unwrap_or(json!("")),
                            "port": p["targetPort"], "protocol": p["protocol"]})
            })
            .collect();
        let ports = json!(ports);
        let labels = if name == "other-proxy" {
            json!({"service.kubernetes.io/service-proxy-name": "other"})
        } else {
            json!({})
        };
        let service: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": labels}, "spec": spec
        }))?;
        services.create(&PostParams::default(), &service).await?;
        for family in FAMILIES {
            let [l1, l2, r1] = addresses(family);
            let mut ports = ports.clone();
            let mut endpoints = match app.as_str() {
                "web" => {
                    local.extend([l1.clone(), l2.clone()]);
                    vec![
                        endpoint(&l1, "node-1", zone_1, ready.clone()),
                        endpoint(&l2, "node-1", zone_1, ready.clone()),
                    ]
                }
                "far" => vec![endpoint(&r1, "node-2", zone_2, ready.clone())],
                "draining" => {
                    local.insert(l1.clone());
                    vec![
                        endpoint(
                            &l1,
                            "node-1",
                            zone_1,
                            json!({"ready": false, "serving": true, "terminating": true}),
                        ),
                        endpoint(
                            &l2,
                            "node-1",
                            zone_1,
                            json!({"ready": false, "serving": false, "terminating": true}),
                        ),
                        endpoint(
                            &r1,
                            "node-2",
                            zone_2,
                            json!({"ready": false, "serving": true, "terminating": true}),
                        ),
                    ]
                }
                "zoned" | "same-node" => {
                    local.insert(l1.clone());
                    let hinted = |address: &str, node: &str, zone: &str| {
                        let mut e = endpoint(address, node, zone, ready.clone());
                        e["hints"] = if app == "zoned" {
                            json!({"forZones": [{"name": zone}]})
                        } else {
                            json!({"forZones": [{"name": zone}], "forNodes": [{"name": node}]})
                        };
                        e
                    };
                    vec![hinted(&l1, "node-1", zone_1), hinted(&r1, "node-2", zone_2)]
                }
                // Conditions left out: ready (and so serving), as the API
                // reads them.
                "unset-conditions" => {
                    local.insert(l1.clone());
                    vec![endpoint(&l1, "node-1", zone_1, json!({}))]
                }
                _ => vec![],
            };
            // Slices beside the first: (ports, endpoints).
            let mut more = Vec::new();
            match app.as_str() {
                // The named target port is 8080 on one endpoint, 9090 on
                // the other.
                "named" => {
                    local.extend([l1.clone(), l2.clone()]);
                    let named_port =
                        |port: u16| json!([{"name": "http", "port": port, "protocol": "TCP"}]);
                    endpoints.push(endpoint(&l1, "node-1", zone_1, ready.clone()));
                    ports = named_port(8080);
                    more.push((
                        named_port(9090),
                        vec![endpoint(&l2, "node-1", zone_1, ready.clone())],
                    ));
                }
                // An endpoint in two slices (as while the controller moves
                // it) counts once.
                "duplicated" => {
                    local.extend([l1.clone(), l2.clone()]);
                    endpoints.extend([
                        endpoint(&l1, "node-1", zone_1, ready.clone()),
                        endpoint(&l2, "node-1", zone_1, ready.clone()),
                    ]);
                    more.push((
                        ports.clone(),
                        vec![endpoint(&l1, "node-1", zone_1, ready.clone())],
                    ));
                }
                _ => {}
            }
            let family_name = family.to_ascii_lowercase();
            let all = std::iter::once((ports.clone(), endpoints)).chain(more);
            for (i, (ports, endpoints)) in all.enumerate() {
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("{name}-{family_name}-{i}"),
                        "labels": {"kubernetes.io/service-name": name,
                                   "endpointslice.kubernetes.io/managed-by": "causeway-tests"}},
                    "addressType": family, "endpoints": endpoints, "ports": ports,
                }))?;
                slices.create(&PostParams::default(), &slice).await?;
            }
        }
    }
    for (name, ingress) in [
        (
            "web-lb",
            json!([{"ip": "203.0.113.10"}, {"ip": "2001:db8::10"}]),
        ),
        (
            "lb-cluster",
            json!([{"ip": "203.0.113.40"}, {"ip": "2001:db8::40"},
                   {"hostname": "lb-cluster.example.com"}]),
        ),
        (
            "lb-no-nodeports",
            json!([{"ip": "203.0.113.50"}, {"ip": "2001:db8::50"}]),
        ),
        (
            "lb-proxy",
            json!([{"ip": "203.0.113.30", "ipMode": "Proxy"},
                   {"ip": "2001:db8::30", "ipMode": "Proxy"}]),
        ),
    ] {
        services
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": ingress}}})),
            )
            .await?;
    }
    Ok(local)
}

/// kube-proxy runs with `backend`'s iptables; the agent with its default,
/// `auto`. Both get the flags `both`.
async fn switch_there_and_back(backend: &str, fillers: usize, both: &[&str]) -> Result<()> {
    // node-1 switches proxies; node-2 holds an endpoint that is remote
    // from it (node-2's own proxy does not matter here).
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let ns = cluster.node("node-1").netns.clone();
    let client = cluster
        .add_pod("node-1", "client", &[("app", "client")])
        .await?;
    for web in ["web-1", "web-2"] {
        cluster.add_pod("node-1", web, &[("app", "web")]).await?;
    }
    cluster
        .add_pod("node-2", "far-1", &[("app", "far")])
        .await?;
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    create_services(&services, fillers).await?;
    let web = format!("{}:80", cluster_ip(&services, "web").await?);
    let sticky = format!("{}:80", cluster_ip(&services, "sticky").await?);

    let two = ["web", "web-np", "web-lb", "sticky", "multi", "np-local"];
    let mut expected: Vec<(&str, usize)> = two.iter().map(|s| (*s, 2)).collect();
    expected.extend([("far", 1), ("far-cluster", 1), ("empty", 0)]);
    wait_for_endpoints(&cluster, &expected).await?;

    // 1. kube-proxy programs the node.
    let (kube_proxy, _) =
        start_kube_proxy(&cluster, "kube-proxy-1", backend, both, &["IPv4"]).await?;
    let by_kube_proxy = Rules::save(&ns, backend)?;
    let kube_proxys_answers = http_answers(&cluster, &services, false, 200).await?;
    // Read after the sync has finished: a scrape right after the sync's
    // timestamp may come before its durations are observed.
    let kube_proxys_metrics = metrics_text(&ns)?;
    let pinned = pinned_pod(&client, &sticky, "through kube-proxy's rules")?;
    let list = recent_lists_holding(&ns, client.ip)?;
    assert_eq!(list.len(), 1, "the client in one affinity list: {list:?}");

    // 2. The agent takes over while the client connects every 20 ms.
    let probe = paced(&client, &web, 400);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(&cluster, &kube_proxy)?;
    let agent = start_agent(&cluster, both, &["IPv4"]).await?;
    assert_all_answered(probe, 400, "while the agent took over")?;
    let by_agent = Rules::save(&ns, backend)?;
    assert_eq!(
        by_agent.nat_chains().iter().any(|c| is_dispatch_bucket(c)),
        fillers > 0,
        "dispatch buckets with {fillers} more Services"
    );
    let local_endpoints: BTreeSet<String> = cluster
        .pods()
        .iter()
        .filter(|p| p.name.starts_with("web-"))
        .map(|p| p.ip.to_string())
        .collect();
    assert_same_rules(
        &by_kube_proxy,
        &by_agent,
        &local_endpoints,
        &node_addresses(&ns, "IPv4")?,
    );
    let other = if backend == "nft" { "legacy" } else { "nft" };
    // (A whole save: asked for one table, legacy would make it.)
    let elsewhere = netns::exec_in(&ns, &format!("iptables-{other}-save"), &[])?;
    assert!(
        !elsewhere.contains(":KUBE-SERVICES"),
        "the agent kept to kube-proxy's backend, {backend}:\n{elsewhere}"
    );
    let agents_answers = http_answers(&cluster, &services, false, 200).await?;
    assert_eq!(
        agents_answers, kube_proxys_answers,
        "HTTP answers: the agent's, then kube-proxy's"
    );
    // Every kube-proxy series kube-proxy exported, the agent exports too.
    let agents_metrics = metrics_text(&ns)?;
    let theirs = kubeproxy_series(&kube_proxys_metrics, false);
    assert!(
        theirs.contains("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family}"),
        "{theirs:#?}"
    );
    let ours = kubeproxy_series(&agents_metrics, false);
    let missing: Vec<&String> = theirs.difference(&ours).collect();
    assert!(
        missing.is_empty(),
        "kube-proxy's metrics the agent lacks: {missing:?}"
    );
    assert_affinity_kept(
        &ns,
        &client,
        &sticky,
        (&list, &pinned),
        "the agent's takeover",
    )?;

    // 3. Back to kube-proxy, with a Service deleted while neither runs:
    // kube-proxy's first sync must delete its chain.
    let probe = paced(&client, &web, 400);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(&cluster, &agent)?;
    services.delete("web-np", &DeleteParams::default()).await?;
    let (_, metrics) = start_kube_proxy(&cluster, "kube-proxy-2", backend, both, &["IPv4"]).await?;
    assert_all_answered(probe, 400, "while kube-proxy took the node back")?;
    assert_no_restore_failures(&metrics);
    let again = Rules::save(&ns, backend)?;
    let gone: BTreeSet<String> = by_agent
        .nat_chains()
        .difference(&again.nat_chains())
        .cloned()
        .collect();
    let web_np = by_kube_proxy.chains_of("default/web-np cluster IP");
    assert_eq!(
        web_np.len(),
        2,
        "web-np's KUBE-SVC- and KUBE-EXT-: {web_np:?}"
    );
    let buckets: BTreeSet<String> = by_agent
        .nat_chains()
        .into_iter()
        .filter(|c| is_dispatch_bucket(c))
        .collect();
    assert_eq!(
        gone,
        web_np.union(&buckets).cloned().collect(),
        "kube-proxy deleted the chains of the deleted Service and the agent's buckets"
    );
    assert!(
        !again.nat.iter().any(|l| l.contains("masquerade hairpin")),
        "the agent's hairpin rules are gone"
    );
    assert_affinity_kept(
        &ns,
        &client,
        &sticky,
        (&list, &pinned),
        "kube-proxy's return",
    )?;
    Ok(())
}

/// Services covering kube-proxy's chain kinds, selecting web-1 and web-2:
/// `web` (ClusterIP), `web-np` (NodePort), `web-lb` (LoadBalancer with an
/// ingress IP, `externalTrafficPolicy: Local` and a source range), `sticky`
/// (ClientIP affinity), `empty` (a NodePort without endpoints), `multi` (a
/// TCP and a UDP port, an external IP), `np-local` (a NodePort, both
/// traffic policies Local), and `far` (a LoadBalancer, both policies Local)
/// and `far-cluster` (a NodePort) selecting far-1 on node-2; then `fillers`
/// selector-less Services.
async fn create_services(services: &Api<Service>, fillers: usize) -> Result<()> {
    for (name, spec) in service_specs() {
        create(services, name, spec).await?;
    }
    services
        .patch_status(
            "web-lb",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}}),
            ),
        )
        .await?;
    let created = futures::stream::iter(0..fillers)
        .map(|i| {
            let services = services.clone();
            async move {
                create(
                    &services,
                    &format!("filler-{i}"),
                    json!({"ports": [{"port": 80, "protocol": "TCP"}]}),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    created.into_iter().collect()
}

/// The Services [`create_services`] describes, by name.
fn service_specs() -> Vec<(&'static str, serde_json::Value)> {
    let ports = json!([{"port": 80, "targetPort": 80, "protocol": "TCP"}]);
    let selector = json!({"app": "web"});
    vec![
        ("web", json!({"selector": selector, "ports": ports})),
        (
            "web-np",
            json!({"type": "NodePort", "selector": selector, "ports": ports}),
        ),
        (
            "web-lb",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "loadBalancerSourceRanges": ["198.51.100.0/24"],
                   "selector": selector, "ports": ports}),
        ),
        (
            "sticky",
            json!({"sessionAffinity": "ClientIP", "selector": selector, "ports": ports}),
        ),
        (
            "empty",
            json!({"type": "NodePort", "selector": {"app": "nobody"}, "ports": ports}),
        ),
        (
            "multi",
            json!({"selector": selector, "externalIPs": ["203.0.113.20"], "ports": [
                {"name": "http", "port": 8080, "targetPort": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": 80, "protocol": "UDP"}]}),
        ),
        // Only a remote endpoint: Local policies find none on node-1.
        (
            "far",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                   "internalTrafficPolicy": "Local", "selector": {"app": "far"},
                   "ports": ports}),
        ),
        (
            "far-cluster",
            json!({"type": "NodePort", "selector": {"app": "far"}, "ports": ports}),
        ),
        (
            "np-local",
            json!({"type": "NodePort", "externalTrafficPolicy": "Local",
                   "internalTrafficPolicy": "Local", "selector": selector, "ports": ports}),
        ),
    ]
}

async fn create(services: &Api<Service>, name: &str, spec: serde_json::Value) -> Result<()> {
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec
    }))?;
    services.create(&PostParams::default(), &svc).await?;
    Ok(())
}

async fn cluster_ip(services: &Api<Service>, name: &str) -> Result<String> {
    services
        .get(name)
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .with_context(|| format!("{name} has no cluster IP"))
}

fn now() -> Result<f64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64())
}

/// Both IP families, as the proxies' metrics name them.
const FAMILIES: [&str; 2] = ["IPv4", "IPv6"];

/// `--cluster-cidr` with the environment's IPv4 range and [`CLUSTER_CIDR_V6`].
fn both_cluster_cidrs(cluster: &Cluster) -> String {
    format!(
        "--cluster-cidr={},{CLUSTER_CIDR_V6}",
        cluster.cluster_cidr()
    )
}

/// Starts kube-proxy as [`spawn_kube_proxy`] does, and waits for its first
/// sync of `families`; the proxy and its metrics then.
async fn start_kube_proxy(
    cluster: &Cluster,
    log_name: &'static str,
    backend: &str,
    extra: &[&str],
    families: &[&str],
) -> Result<(Proxy, String)> {
    let since = now()?;
    let proxy = spawn_kube_proxy(cluster, log_name, backend, extra)?;
    let metrics =
        wait_for_sync(cluster, &proxy, since, families, "kube-proxy's first sync").await?;
    Ok((proxy, metrics))
}

/// Starts the agent in node-1's namespace (log `agent`) with `flags`, and
/// waits for its first sync of `families`.
async fn start_agent(cluster: &Cluster, flags: &[&str], families: &[&str]) -> Result<Proxy> {
    let since = now()?;
    let agent = Proxy {
        pid: cluster.spawn_agent("node-1", "agent", &workspace_bin("causeway-agent"), flags)?,
        log: "agent",
        metrics: DEFAULT_METRICS.to_string(),
    };
    wait_for_sync(cluster, &agent, since, families, "the agent's first sync").await?;
    Ok(agent)
}

/// Starts the real kube-proxy in iptables mode in node-1's namespace, on
/// `backend`'s iptables, kept
/// off the host's own settings: the conntrack table size (a host-wide
/// sysctl, and the module's hash size) and timeouts are left alone.
fn spawn_kube_proxy(
    cluster: &Cluster,
    log_name: &'static str,
    backend: &str,
    extra: &[&str],
) -> Result<Proxy> {
    let kubeconfig = format!("--kubeconfig={}", cluster.kubeconfig().display());
    let cidr = format!("--cluster-cidr={}", cluster.cluster_cidr());
    // kube-proxy runs plain `iptables`: the backend's, through PATH.
    let path = netns::iptables_path(backend, &cluster.dir())?;
    let mut args = vec![
        kubeconfig.as_str(),
        &cidr,
        "--hostname-override=node-1",
        "--proxy-mode=iptables",
        "--conntrack-max-per-core=0",
        "--conntrack-tcp-timeout-established=0",
        "--conntrack-tcp-timeout-close-wait=0",
        "--oom-score-adj=0",
        "--v=2",
    ];
    args.extend_from_slice(extra);
    let pid = cluster.spawn_in_with_env(
        &cluster.node("node-1").netns.clone(),
        log_name,
        &kube_proxy_binary()?,
        &args,
        &[("PATH", &path)],
    )?;
    let metrics = extra
        .iter()
        .find_map(|f| f.strip_prefix("--metrics-bind-address="))
        .unwrap_or(DEFAULT_METRICS)
        .to_string();
    Ok(Proxy {
        pid,
        log: log_name,
        metrics,
    })
}

/// Where both proxies serve `/metrics` unless told otherwise.
const DEFAULT_METRICS: &str = "127.0.0.1:10249";

/// A proxy process of this test: its pid, the name of its log and where it
/// serves its metrics.
struct Proxy {
    pid: u32,
    log: &'static str,
    metrics: String,
}

/// Waits for `proxy` to finish a sync of each of `families` after `since`
/// (kube-proxy's metric, which both proxies export, is set by syncs that
/// succeed); the metrics. Fails at once if the proxy exits, and with the end
/// of its log either way.
async fn wait_for_sync(
    cluster: &Cluster,
    proxy: &Proxy,
    since: f64,
    families: &[&str],
    what: &str,
) -> Result<String> {
    let ns = cluster.node("node-1").netns.as_str();
    let log_tail = || {
        let log = std::fs::read_to_string(cluster.dir().join(format!("{}.log", proxy.log)))
            .unwrap_or_else(|e| format!("(no log: {e})"));
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    };
    let waited = eventually(Duration::from_secs(60), what, || async {
        if !process_running(proxy.pid) {
            bail!("{} exited", proxy.log);
        }
        // Nothing listening yet is not a failure.
        let metrics = metrics_at(ns, &proxy.metrics).unwrap_or_default();
        let synced = families.iter().all(|family| {
            metrics::value(
                &metrics,
                &format!(
                    "kubeproxy_sync_proxy_rules_last_timestamp_seconds{{ip_family=\"{family}\"}}"
                ),
            )
            .is_some_and(|t| t > since)
        });
        Ok(synced.then_some(metrics))
    })
    .await;
    waited.map_err(|e| e.context(format!("the end of {}.log:\n{}", proxy.log, log_tail())))
}

/// No restore of the proxy whose `metrics` these are has failed, in either
/// family.
fn assert_no_restore_failures(metrics: &str) {
    assert_eq!(
        metrics::value(
            metrics,
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
        )
        .unwrap_or(0.0),
        0.0,
        "restores failed:\n{metrics}"
    );
}

/// SIGTERM to `proxy`, then waits until it is gone. Neither proxy removes
/// its rules when it stops.
fn stop(cluster: &Cluster, proxy: &Proxy) -> Result<()> {
    tokio::task::block_in_place(|| cluster.terminate(proxy.pid, Duration::from_secs(15)))
}

/// Waits until the EndpointSlice controller has published each Service's
/// ready endpoints, so that the first proxy's rules are whole.
async fn wait_for_endpoints(cluster: &Cluster, expected: &[(&str, usize)]) -> Result<()> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices: Api<EndpointSlice> = Api::namespaced(cluster.client(), "default");
    eventually(
        Duration::from_secs(30),
        "the Services' EndpointSlices",
        || async {
            let list = slices.list(&Default::default()).await?;
            let ready = |service: &str| -> usize {
                list.items
                    .iter()
                    .filter(|s| {
                        s.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get("kubernetes.io/service-name"))
                            .is_some_and(|n| n == service)
                    })
                    .flat_map(|s| &s.endpoints)
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                    .count()
            };
            Ok(expected
                .iter()
                .all(|(service, count)| ready(service) == *count)
                .then_some(()))
        },
    )
    .await
}

type Tally = std::thread::JoinHandle<Result<BTreeMap<String, usize>>>;

/// `count` connections from `client` to `target`, one every 20 ms, in the
/// background.
fn paced(client: &Pod, target: &str, count: usize) -> Tally {
    let (ns, target) = (client.netns.clone(), target.to_string());
    std::thread::spawn(move || netns::paced_tally_by_pod(&ns, "tcp", &target, count, Some(20)))
}

fn assert_all_answered(probe: Tally, count: usize, what: &str) -> Result<()> {
    assert!(
        !probe.is_finished(),
        "{what}: the client was done before the new proxy's first sync, so the switch went untested"
    );
    let tally = probe.join().expect("the client thread")?;
    let answered: usize = ["web-1", "web-2"]
        .iter()
        .map(|pod| tally.get(*pod).copied().unwrap_or(0))
        .sum();
    assert_eq!(answered, count, "{what}: {tally:?}");
    Ok(())
}

/// The one pod that answers 10 connections to the ClientIP-affinity Service.
fn pinned_pod(client: &Pod, sticky: &str, what: &str) -> Result<String> {
    let tally = netns::tally_by_pod(&client.netns, "tcp", sticky, 10)?;
    let pod = tally.keys().next().cloned().unwrap_or_default();
    assert!(
        tally.len() == 1 && ["web-1", "web-2"].contains(&pod.as_str()),
        "{what}: affinity holds: {tally:?}"
    );
    Ok(pod)
}

/// The client's entry in its affinity list `kept.0` survived `switch`, and
/// the client's connections to `sticky` still land on pod `kept.1`. (The
/// list is looked at before any new connection could have filled it again.)
fn assert_affinity_kept(
    ns: &str,
    client: &Pod,
    sticky: &str,
    kept: (&BTreeSet<String>, &str),
    switch: &str,
) -> Result<()> {
    assert_eq!(
        &recent_lists_holding(ns, client.ip)?,
        kept.0,
        "the affinity list survives {switch}"
    );
    assert_eq!(
        pinned_pod(client, sticky, switch)?,
        kept.1,
        "after {switch}"
    );
    Ok(())
}

/// The `-m recent` lists (`/proc/net/xt_recent/<name>`) in `ns` holding
/// `address`.
fn recent_lists_holding(ns: &str, address: std::net::Ipv4Addr) -> Result<BTreeSet<String>> {
    let out = netns::exec_in(
        ns,
        "sh",
        &[
            "-c",
            &format!("grep -l 'src={address} ' /proc/net/xt_recent/* || true"),
        ],
    )?;
    Ok(out
        .lines()
        .filter_map(|path| path.rsplit('/').next())
        .map(str::to_string)
        .collect())
}

/// One node's nat and filter rules as `iptables-save` prints them, counters
/// left out.
struct Rules {
    nat: Vec<String>,
    filter: Vec<String>,
}

impl Rules {
    fn save(ns: &str, backend: &str) -> Result<Rules> {
        Rules::save_family(ns, backend, "IPv4")
    }

    /// The rules of `family` ("IPv4" or "IPv6").
    fn save_family(ns: &str, backend: &str, family: &str) -> Result<Rules> {
        let program = if family == "IPv6" {
            "ip6tables"
        } else {
            "iptables"
        };
        let save = format!("{program}-{backend}-save");
        let table = |name: &str| -> Result<Vec<String>> {
            Ok(netns::exec_in(ns, &save, &["-t", name])?
                .lines()
                .filter(|l| l.starts_with(':') || l.starts_with("-A "))
                .map(|l| match l.split_once(" [") {
                    Some((declaration, _)) if l.starts_with(':') => declaration.to_string(),
                    _ => l.to_string(),
                })
                .collect())
        };
        Ok(Rules {
            nat: table("nat")?,
            filter: table("filter")?,
        })
    }

    /// The rules of each of [`FAMILIES`].
    fn save_families(ns: &str, backend: &str) -> Result<Vec<Rules>> {
        FAMILIES
            .iter()
            .map(|f| Rules::save_family(ns, backend, f))
            .collect()
    }

    /// The rules and declarations of the `KUBE-` chains the agent writes,
    /// sorted (kubelet's `KUBE-FIREWALL` aside, which kube-proxy also makes
    /// sure of and the agent leaves).
    fn agents_chains(&self) -> Vec<String> {
        sorted(
            self.nat
                .iter()
                .chain(&self.filter)
                .filter(|l| {
                    let chain = chain_of(l);
                    chain.starts_with("KUBE-") && chain != "KUBE-FIREWALL"
                })
                .cloned()
                .collect(),
        )
    }

    fn nat_chains(&self) -> BTreeSet<String> {
        self.nat
            .iter()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// The per-Service chains of the service port whose `KUBE-SERVICES`
    /// entry has the comment `comment`: the chains named with its hash.
    fn chains_of(&self, comment: &str) -> BTreeSet<String> {
        let entry = format!("--comment \"{comment}\"");
        let hash = self
            .chain("KUBE-SERVICES")
            .into_iter()
            .find(|l| l.contains(&entry))
            .and_then(|l| l.rsplit_once(" -j KUBE-SVC-"))
            .map(|(_, hash)| hash.to_string())
            .unwrap_or_default();
        self.nat_chains()
            .into_iter()
            .filter(|c| {
                SERVICE_CHAINS
                    .iter()
                    .any(|p| c.strip_prefix(p) == Some(&hash))
            })
            .collect()
    }

    /// The rules of `chain`, in order.
    fn chain(&self, chain: &str) -> Vec<&str> {
        let prefix = format!("-A {chain} ");
        self.nat
            .iter()
            .filter(|l| l.starts_with(&prefix))
            .map(String::as_str)
            .collect()
    }
}

/// The chain a saved line declares (`:NAME …`) or appends to (`-A NAME …`).
fn chain_of(line: &str) -> &str {
    line.strip_prefix("-A ")
        .or_else(|| line.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("")
}

fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

/// The addresses of `family` in namespace `ns`.
fn node_addresses(ns: &str, family: &str) -> Result<BTreeSet<std::net::IpAddr>> {
    let inet = if family == "IPv6" {
        " inet6 "
    } else {
        " inet "
    };
    Ok(netns::exec_in(ns, "ip", &["-o", "addr", "show"])?
        .lines()
        .filter_map(|l| l.split_once(inet)?.1.split('/').next())
        .filter_map(|a| a.parse().ok())
        .collect())
}

/// [`assert_same_rules`] for `family`, with the endpoints among
/// `local_endpoints` of that family and node-1's addresses (namespace
/// `ns`); says which family differs.
fn assert_same_family_rules(
    ns: &str,
    family: &str,
    kube_proxy: &Rules,
    agent: &Rules,
    local_endpoints: &BTreeSet<String>,
) -> Result<()> {
    let local: BTreeSet<String> = local_endpoints
        .iter()
        .filter(|ip| ip.contains(':') == (family == "IPv6"))
        .cloned()
        .collect();
    let addresses = node_addresses(ns, family)?;
    let compared =
        std::panic::catch_unwind(|| assert_same_rules(kube_proxy, agent, &local, &addresses));
    if let Err(panic) = compared {
        eprintln!("{family} rules differ");
        std::panic::resume_unwind(panic);
    }
    Ok(())
}

/// Asserts that the agent's rules are kube-proxy's but for the differences
/// docs/agent.md gives:
/// - no `KUBE-SEP-` chains: each DNAT candidate sits in the service chain,
///   with `-p <proto>` and no `-m <proto>`, and affinity refreshes its list
///   with `--update` where kube-proxy jumps to a chain that `--set`s it;
/// - hairpin masquerading in `KUBE-POSTROUTING`;
/// - the localhost NodePort counting rule first in `KUBE-EXT-` instead of a
///   second `KUBE-NODEPORTS` entry;
/// - from 1 000 Service addresses, `KUBE-SERVICES`' entries in buckets;
/// - with `--nodeport-addresses` CIDRs, a jump to `KUBE-NODEPORTS` per CIDR;
/// - no jumps to kubelet's `KUBE-FIREWALL` where it holds no rule.
fn assert_same_rules(
    kube_proxy: &Rules,
    agent: &Rules,
    local_endpoints: &BTreeSet<String>,
    node_addresses: &BTreeSet<std::net::IpAddr>,
) {
    // The filter table is kube-proxy's, rule for rule; in order, but for
    // the chains of one entry per Service, whose entries match different
    // packets.
    let unordered = |chain: &str| {
        [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
        ]
        .contains(&chain)
    };
    // kube-proxy makes sure kubelet's KUBE-FIREWALL chain and the jumps to
    // it exist even where it writes no rule there (IPv6, or no localhost
    // NodePorts); the agent only where it writes the localnet guard there.
    // Jumps to an empty chain do nothing.
    let firewall_empty = !kube_proxy
        .filter
        .iter()
        .any(|l| l.starts_with("-A KUBE-FIREWALL "));
    let filter = |rules: &Rules| -> Vec<String> {
        rules
            .filter
            .iter()
            .filter(|l| {
                !(firewall_empty
                    && ["-A INPUT -j KUBE-FIREWALL", "-A OUTPUT -j KUBE-FIREWALL"]
                        .contains(&l.as_str()))
            })
            .cloned()
            .collect()
    };
    assert_same_chains(
        "filter",
        &by_chain(&filter(agent), unordered),
        &by_chain(&filter(kube_proxy), unordered),
    );
    // The same chains under the same names, but for the endpoint chains and
    // the buckets.
    let named = |rules: &Rules| -> BTreeSet<String> {
        rules
            .nat_chains()
            .into_iter()
            .filter(|c| !c.starts_with("KUBE-SEP-") && !is_dispatch_bucket(c))
            .collect()
    };
    let (agents_named, kube_proxys_named) = (named(agent), named(kube_proxy));
    assert_eq!(agents_named, kube_proxys_named, "nat chains");
    assert!(
        agents_named.iter().any(|c| c.starts_with("KUBE-FW-"))
            && agents_named.iter().any(|c| c.starts_with("KUBE-SVL-")),
        "every kind of service chain is compared"
    );
    // Every nat rule outside the service chains, with the documented
    // differences taken out here and checked below: the entries in the
    // buckets count as KUBE-SERVICES', without the jumps to the buckets;
    // no hairpin or counting rules.
    let outside = |rules: &Rules| -> Vec<String> {
        rules
            .nat
            .iter()
            .filter(|l| l.starts_with("-A "))
            .filter(|l| {
                let chain = l.split_whitespace().nth(1).unwrap_or("");
                !["KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-"]
                    .iter()
                    .any(|p| chain.starts_with(p))
                    || is_dispatch_bucket(chain)
            })
            .filter(|l| !l.contains("-m nfacct") && !l.contains("masquerade hairpin"))
            .filter(|l| {
                !(l.starts_with("-A KUBE-SERVICES ")
                    && l.contains(&format!("-j {DISPATCH_BUCKET_PREFIX}")))
            })
            .filter(|l| !is_nodeports_jump(l))
            .map(|l| {
                let chain = l.split_whitespace().nth(1).unwrap_or("");
                if is_dispatch_bucket(chain) {
                    l.replacen(chain, "KUBE-SERVICES", 1)
                } else {
                    l.clone()
                }
            })
            .collect()
    };
    let nat_unordered = |chain: &str| chain == "KUBE-SERVICES" || chain == "KUBE-NODEPORTS";
    assert_same_chains(
        "nat",
        &by_chain(&outside(agent), nat_unordered),
        &by_chain(&outside(kube_proxy), nat_unordered),
    );
    assert_same_nodeport_jumps(kube_proxy, agent, node_addresses);
    // Each bucket holds the addresses of its number.
    for line in &agent.nat {
        let Some(bucket) = line
            .strip_prefix("-A ")
            .and_then(|l| l.split_whitespace().next())
            .filter(|c| is_dispatch_bucket(c))
        else {
            continue;
        };
        let number: u8 = bucket
            .rsplit('-')
            .next()
            .unwrap_or("")
            .parse()
            .unwrap_or(255);
        let address = line
            .split_once(" -d ")
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        assert_eq!(address.octets()[3] % 64, number, "{line}");
    }
    // Hairpin traffic: kube-proxy masquerades it in each endpoint's chain,
    // the agent in KUBE-POSTROUTING for the endpoints that can be local.
    let source = |l: &str| -> Option<String> {
        l.split_once(" -s ")?
            .1
            .split('/')
            .next()
            .map(str::to_string)
    };
    let masqueraded_sources: BTreeSet<String> = kube_proxy
        .nat
        .iter()
        .filter(|l| l.starts_with("-A KUBE-SEP-") && l.ends_with("-j KUBE-MARK-MASQ"))
        .filter_map(|l| source(l))
        .collect();
    let hairpins: BTreeSet<String> = agent
        .chain("KUBE-POSTROUTING")
        .into_iter()
        .filter(|l| l.contains("masquerade hairpin"))
        .filter_map(source)
        .collect();
    assert!(
        local_endpoints.is_subset(&hairpins) && hairpins.is_subset(&masqueraded_sources),
        "hairpin rules: local {local_endpoints:?}, the agent's {hairpins:?}, kube-proxy's {masqueraded_sources:?}"
    );
    // Localhost NodePort packets: counted by kube-proxy in a second
    // KUBE-NODEPORTS entry, by the agent first in the port's KUBE-EXT-.
    let counted_ports = |rules: &Rules, chains: &str| -> BTreeSet<String> {
        rules
            .nat
            .iter()
            .filter(|l| l.starts_with(chains) && l.contains("-m nfacct"))
            .filter_map(|l| {
                l.split_once("--dport ")?
                    .1
                    .split(' ')
                    .next()
                    .map(str::to_string)
            })
            .collect()
    };
    let theirs = counted_ports(kube_proxy, "-A KUBE-NODEPORTS ");
    let ours = counted_ports(agent, "-A KUBE-EXT-");
    assert_eq!(ours, theirs, "NodePorts counted on 127.0.0.0/8");
    // Each service chain, in order, with kube-proxy's jumps to its endpoint
    // chains resolved: the protocol and DNAT of the endpoint chain's rule,
    // and its affinity `--set` where the service chain's rule has no
    // affinity match of its own. The agent refreshes a returning client
    // with `--update` where kube-proxy checks (`--rcheck`) and sets again.
    let mut compared = 0;
    for chain in kube_proxys_named
        .iter()
        .filter(|c| c.starts_with("KUBE-SVC-") || c.starts_with("KUBE-SVL-"))
    {
        let theirs: Vec<(String, Option<String>)> = kube_proxy
            .chain(chain)
            .into_iter()
            .map(|rule| {
                let (rule, recent) = without_recent(rule);
                let Some((head, sep)) = rule.rsplit_once(" -j KUBE-SEP-") else {
                    return (rule, recent);
                };
                let dnat_rule = kube_proxy
                    .chain(&format!("KUBE-SEP-{sep}"))
                    .into_iter()
                    .find(|l| l.contains(" -j DNAT "))
                    .unwrap_or("");
                let (dnat_rule, set) = without_recent(dnat_rule);
                let proto = dnat_rule
                    .split_once(" -p ")
                    .and_then(|(_, rest)| rest.split(' ').next())
                    .unwrap_or("?");
                let to = dnat_rule.split_once(" -j DNAT ").map_or("", |(_, to)| to);
                let head = head.replacen(
                    &format!("-A {chain} "),
                    &format!("-A {chain} -p {proto} "),
                    1,
                );
                (format!("{head} -j DNAT {to}"), recent.or(set))
            })
            .collect();
        let ours: Vec<(String, Option<String>)> = agent
            .chain(chain)
            .into_iter()
            .map(|rule| {
                let (rule, recent) = without_recent(rule);
                (rule, recent.map(|r| r.replace("--update", "--rcheck")))
            })
            .collect();
        assert_eq!(ours, theirs, "{chain}");
        compared += 1;
    }
    assert!(compared >= 8, "{compared} service chains compared");
}

/// Whether `rule` is one of the jumps that end nat `KUBE-SERVICES` and lead
/// packets for the node's addresses on to `KUBE-NODEPORTS`.
fn is_nodeports_jump(rule: &str) -> bool {
    rule.starts_with("-A KUBE-SERVICES ") && rule.contains("\"kubernetes service nodeports;")
}

/// The jumps to `KUBE-NODEPORTS` end `KUBE-SERVICES` in both rulesets, and
/// are the same, but for one documented difference: with
/// `--nodeport-addresses` CIDRs, kube-proxy writes a jump per node address
/// it finds inside them (`-d <address>`), the agent one per CIDR (`-d <cidr>
/// -m addrtype --dst-type LOCAL`), so that an address added later needs no
/// sync. Then the addresses they match must be the same.
fn assert_same_nodeport_jumps(
    kube_proxy: &Rules,
    agent: &Rules,
    node_addresses: &BTreeSet<std::net::IpAddr>,
) {
    let jumps = |rules: &Rules| -> Vec<String> {
        let entries = rules.chain("KUBE-SERVICES");
        let tail: Vec<String> = entries
            .iter()
            .rev()
            .take_while(|l| is_nodeports_jump(l))
            .map(|l| l.to_string())
            .collect();
        assert_eq!(
            tail.len(),
            entries.iter().filter(|l| is_nodeports_jump(l)).count(),
            "the NodePort jumps end KUBE-SERVICES: {entries:#?}"
        );
        let mut tail = tail;
        tail.sort();
        tail
    };
    let (ours, theirs) = (jumps(agent), jumps(kube_proxy));
    if ours == theirs {
        return;
    }
    let destination = |rule: &str| -> Option<String> {
        rule.split_once(" -d ")
            .filter(|(head, _)| !head.ends_with(" !"))
            .and_then(|(_, rest)| rest.split(' ').next())
            .map(str::to_string)
    };
    let theirs_matched: BTreeSet<std::net::IpAddr> = theirs
        .iter()
        .map(|rule| {
            assert!(
                !rule.contains("addrtype"),
                "kube-proxy's jumps: {theirs:#?}"
            );
            let address = destination(rule).unwrap_or_default();
            address
                .split('/')
                .next()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("kube-proxy's jump to one address: {rule}"))
        })
        .collect();
    let ours_matched: BTreeSet<std::net::IpAddr> = node_addresses
        .iter()
        .filter(|address| {
            ours.iter().any(|rule| {
                let cidr = destination(rule)
                    .and_then(|d| causeway_agent::addr::parse_cidr(&d))
                    .unwrap_or_else(|| panic!("the agent's jump to a CIDR: {rule}"));
                cidr.contains(address)
                    && (cidr.is_host() || rule.contains("-m addrtype --dst-type LOCAL"))
            })
        })
        .copied()
        .collect();
    assert_eq!(
        ours_matched, theirs_matched,
        "the node addresses NodePorts answer on: the agent's {ours:#?}, kube-proxy's {theirs:#?}"
    );
}

/// A table's rules per chain: in order, or sorted for the chains
/// `unordered` names.
fn by_chain(lines: &[String], unordered: impl Fn(&str) -> bool) -> BTreeMap<String, Vec<String>> {
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in lines.iter().filter(|l| l.starts_with("-A ")) {
        chains
            .entry(chain_of(line).to_string())
            .or_default()
            .push(line.clone());
    }
    for (chain, rules) in &mut chains {
        if unordered(chain) {
            rules.sort();
        }
    }
    chains
}

fn assert_same_chains(
    table: &str,
    ours: &BTreeMap<String, Vec<String>>,
    theirs: &BTreeMap<String, Vec<String>>,
) {
    let names: BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
    for chain in names {
        assert_eq!(
            ours.get(chain),
            theirs.get(chain),
            "{table} {chain}: the agent's rules, then kube-proxy's"
        );
    }
}

/// `rule` without its `-m recent … --rsource` match, and that match.
fn without_recent(rule: &str) -> (String, Option<String>) {
    match rule.split_once(" -m recent ") {
        Some((head, rest)) => match rest.split_once(" --rsource") {
            Some((recent, tail)) => (format!("{head}{tail}"), Some(recent.to_string())),
            None => (rule.to_string(), None),
        },
        None => (rule.to_string(), None),
    }
}

/// What the proxy in `ns` serves on 127.0.0.1:10249/metrics.
fn metrics_text(ns: &str) -> Result<String> {
    metrics_at(ns, DEFAULT_METRICS)
}

/// What `ns` serves at `address` (`IP:port`) on `/metrics`.
fn metrics_at(ns: &str, address: &str) -> Result<String> {
    let url = format!("http://{address}/metrics");
    netns::exec_in(ns, "curl", &["-sf", "--max-time", "3", &url])
}

/// The `kubeproxy_*` series of a metrics text: name and label names (label
/// values such as a table's rule count differ), and with
/// `keep_ip_family_value`, the value of `ip_family`.
fn kubeproxy_series(metrics: &str, keep_ip_family_value: bool) -> BTreeSet<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("kubeproxy_"))
        .filter_map(|l| l.split_whitespace().next())
        .map(|series| match series.split_once('{') {
            Some((name, labels)) => {
                let names: Vec<&str> = labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter_map(|pair| {
                        let (key, _) = pair.split_once('=')?;
                        Some(if keep_ip_family_value && key == "ip_family" {
                            pair
                        } else {
                            key
                        })
                    })
                    .filter(|k| *k != "le")
                    .collect();
                format!("{name}{{{}}}", names.join(","))
            }
            None => series.to_string(),
        })
        .collect()
}

/// What a proxy's HTTP servers answer in `ns`: per request, the status,
/// the headers kube-proxy sets (the date aside) and the body, with every
/// time in it replaced by `<time>`. `/healthz` must answer `healthz`.
async fn http_answers(
    cluster: &Cluster,
    services: &Api<Service>,
    both_families: bool,
    healthz: u16,
) -> Result<BTreeMap<String, String>> {
    let (ns, node_ip) = (&cluster.node("node-1").netns, cluster.node("node-1").ip);
    let health_check_of = |name: &'static str| async move {
        services
            .get(name)
            .await?
            .spec
            .and_then(|s| s.health_check_node_port)
            .with_context(|| format!("{name}'s healthCheckNodePort"))
    };
    let health_check = health_check_of("web-lb").await?;
    let far_check = health_check_of("far").await?;
    // With the status each must have, where it does not depend on
    // `--nodeport-addresses` (which may keep 127.0.0.1 and ::1 out).
    let requests = [
        (
            "GET",
            "http://127.0.0.1:10256/healthz".to_string(),
            Some(healthz),
        ),
        ("GET", "http://127.0.0.1:10256/livez".to_string(), Some(200)),
        (
            "POST",
            "http://127.0.0.1:10256/healthz".to_string(),
            Some(healthz),
        ),
        ("GET", "http://127.0.0.1:10256/other".to_string(), Some(404)),
        // Over IPv6 too: kube-proxy's 0.0.0.0 takes both families.
        ("GET", "http://[::1]:10256/livez".to_string(), Some(200)),
        (
            "GET",
            format!("http://{node_ip}:{health_check}/"),
            Some(200),
        ),
        ("GET", format!("http://127.0.0.1:{health_check}/"), None),
        ("GET", format!("http://[::1]:{health_check}/anything"), None),
        ("POST", format!("http://127.0.0.1:{health_check}/"), None),
        // No local endpoint.
        ("GET", format!("http://{node_ip}:{far_check}/"), Some(503)),
        (
            "GET",
            "http://127.0.0.1:10249/proxyMode".to_string(),
            Some(200),
        ),
        (
            "GET",
            "http://127.0.0.1:10249/healthz".to_string(),
            Some(200),
        ),
        ("GET", "http://127.0.0.1:10249/other".to_string(), Some(404)),
    ];
    let mut answers = BTreeMap::new();
    for (method, url, status) in requests {
        let raw = netns::exec_in(
            ns,
            "curl",
            &["-s", "-i", "--max-time", "3", "-X", method, &url],
        )
        .unwrap_or_else(|e| format!("no answer: {e}"));
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        if let Some(status) = status {
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status} ")),
                "{method} {url}: expected {status}, got {raw}"
            );
        }
        // The proxy's own health: its times and their length vary.
        let timed = body.contains("\"currentTime\"");
        let mut head: Vec<String> = head
            .lines()
            .map(|l| l.trim().to_ascii_lowercase())
            .filter(|l| !l.starts_with("date:"))
            .filter(|l| !(timed && l.starts_with("content-length:")))
            .collect();
        head.sort();
        let body = if timed {
            without_times(body, both_families)
        } else {
            body.to_string()
        };
        answers.insert(
            format!("{method} {url}"),
            format!("{}\n\n{body}", head.join("\n")),
        );
    }
    Ok(answers)
}

/// The JSON `body` with its times replaced by `<time>`, and unless
/// `both_families`, the `status` of IPv6 left out: kube-proxy runs an IPv6
/// proxier on any node with ip6tables, the agent only for a family the node
/// or the cluster has.
fn without_times(body: &str, both_families: bool) -> String {
    let Ok(mut json) = serde_json::from_str::<serde_json::Value>(body) else {
        return body.to_string();
    };
    if !both_families && let Some(status) = json.get_mut("status").and_then(|s| s.as_object_mut()) {
        status.remove("IPv6");
    }
    let mut out = json.to_string();
    // RFC 3339 times as Go and the agent write them.
    while let Some(at) = out.find("\"20") {
        let Some(len) = out[at + 1..].find('"') else {
            break;
        };
        out.replace_range(at..at + len + 2, "<time>");
    }
    out
}

//! causeway-agent on the real control plane: `causeway-agent run` inside a node
//! namespace watches the real apiserver, and real packets from a pod follow the
//! Service and EndpointSlice changes made through it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use causeway_tests::cluster::{ClusterOptions, Pod};
use causeway_tests::datapath::Outcome;
use causeway_tests::metrics;
use causeway_tests::paths::workspace_bin;
use causeway_tests::wait::eventually;
use causeway_tests::{Cluster, netns};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn tally(ns: &str, proto: &str, target: &str, count: usize) -> Result<BTreeMap<String, usize>> {
    netns::tally_by_pod(ns, proto, target, count)
}

/// Probes until every one of `count` attempts lands on one of `pods` and each
/// of them answered at least once.
fn wait_for_pods(
    ns: &str,
    proto: &str,
    target: &str,
    pods: &[&str],
    what: &str,
) -> Result<BTreeMap<String, usize>> {
    wait_for_pods_within(Duration::from_secs(30), ns, proto, target, pods, what)
}

/// [`wait_for_pods`], giving up after `limit`.
fn wait_for_pods_within(
    limit: Duration,
    ns: &str,
    proto: &str,
    target: &str,
    pods: &[&str],
    what: &str,
) -> Result<BTreeMap<String, usize>> {
    let deadline = Instant::now() + limit;
    loop {
        let counts = tally(ns, proto, target, 30)?;
        let only_expected = counts.keys().all(|k| pods.contains(&k.as_str()));
        let all_seen = pods.iter().all(|p| counts.contains_key(*p));
        if only_expected && all_seen {
            return Ok(counts);
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: after {limit:?} {target} still answers {counts:?}, expected only {pods:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `GET url` from namespace `ns` with curl: status, raw headers, body.
fn http_get(ns: &str, url: &str) -> Result<(u16, String, String)> {
    let out = netns::exec_in(ns, "curl", &["-s", "-i", "--max-time", "3", url])?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_string(), body.to_string()))
}

/// Polls `url` until it answers `status` with a body containing `needle`.
fn wait_http(ns: &str, url: &str, status: u16, needle: &str) -> Result<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = http_get(ns, url);
        if let Ok((got, head, body)) = &last
            && *got == status
            && body.contains(needle)
        {
            return Ok((head.clone(), body.clone()));
        }
        if Instant::now() > deadline {
            bail!("{url}: expected HTTP {status} with {needle:?}, last answer {last:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Makes Service `name` a LoadBalancer with `externalTrafficPolicy: Local`;
/// its healthCheckNodePort.
async fn make_etp_local(services: &Api<Service>, name: &str) -> Result<u16> {
    let patch = json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}});
    services
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let health_port = services
        .get(name)
        .await?
        .spec
        .and_then(|s| s.health_check_node_port)
        .expect("a healthCheckNodePort was allocated");
    Ok(u16::try_from(health_port)?)
}

async fn cluster_ip(services: &Api<Service>, name: &str) -> Result<String> {
    let svc = services.get(name).await?;
    Ok(svc.spec.and_then(|s| s.cluster_ip).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_run_follows_services_and_endpoint_slices_from_the_apiserver() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let node1 = cluster.node("node-1").clone();
    let agent = workspace_bin("causeway-agent");
    // Configured as kube-proxy is, from its configuration file: no periodic
    // full sync during the test (every sync it sees is caused by an API
    // change), and /metrics open to the network, as the Helm chart's pod
    // monitor wants it (checked from another host below; the address has no
    // port, so kube-proxy's 10249 is added, as kube-proxy adds it). Its klog
    // verbosity 4 turns on the agent's debug lines. Its conntrack section is
    // applied in the node's namespace at start, as kube-proxy applies it: a
    // maxPerCore of 0 and a 0s timeout leave a setting alone. A field the
    // agent has no use for, and one the API dropped long ago, are logged and
    // ignored. kube-proxy's --proxy-mode flag is taken as it is.
    let config = cluster.dir().join("kube-proxy.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         kind: KubeProxyConfiguration\n\
         mode: iptables\n\
         metricsBindAddress: 0.0.0.0\n\
         iptables: {syncPeriod: 10m0s, minSyncPeriod: 1s}\n\
         conntrack: {maxPerCore: 0, tcpEstablishedTimeout: 2h0m0s, tcpCloseWaitTimeout: 0s,\n\
                     udpStreamTimeout: 3m0s}\n\
         ipvs: {scheduler: rr}\n\
         logging: {verbosity: 4}\n\
         resourceContainer: /kube-proxy\n",
    )?;
    let conntrack_setting = |name: &str| -> Result<String> {
        Ok(netns::exec_in(
            &node1.netns,
            "cat",
            &[&format!("/proc/sys/net/netfilter/{name}")],
        )?
        .trim()
        .to_string())
    };
    // The kernel's values, in this namespace as on a new node.
    let kernel_defaults = [
        ("nf_conntrack_tcp_timeout_established", "432000"),
        ("nf_conntrack_tcp_timeout_close_wait", "60"),
        ("nf_conntrack_udp_timeout", "30"),
        ("nf_conntrack_udp_timeout_stream", "120"),
    ];
    for (name, value) in kernel_defaults {
        assert_eq!(conntrack_setting(name)?, value, "{name} before the agent");
    }
    // The node ran kube-proxy's nftables mode before: its tables are left,
    // one dropping what would reach a Service on port 80, beside another
    // program's table. The agent deletes kube-proxy's, as kube-proxy does
    // when it starts in iptables mode, and leaves the other.
    let leftovers = cluster.dir().join("nftables-leftovers.nft");
    std::fs::write(
        &leftovers,
        "table ip kube-proxy {\n\
         \tchain filter-prerouting {\n\
         \t\ttype filter hook prerouting priority -110; policy accept;\n\
         \t\ttcp dport 80 drop\n\
         \t}\n\
         }\n\
         table ip6 kube-proxy {\n}\n\
         table inet other-program {\n\tchain idle {\n\t}\n}\n",
    )?;
    netns::exec_in(
        &node1.netns,
        "nft",
        &["-f", &leftovers.display().to_string()],
    )?;
    let agent_pid = cluster.spawn_agent(
        "node-1",
        "agent-node-1",
        &agent,
        &[
            "--config",
            &config.display().to_string(),
            "--proxy-mode=iptables",
        ],
    )?;

    let client_pod = cluster
        .add_pod("node-1", "client", &[("app", "client")])
        .await?;
    let web1 = cluster
        .add_pod("node-1", "web-1", &[("app", "web")])
        .await?;
    eventually(
        Duration::from_secs(10),
        "the file's conntrack timeouts",
        || async {
            Ok(
                (conntrack_setting("nf_conntrack_tcp_timeout_established")? == "7200")
                    .then_some(()),
            )
        },
    )
    .await?;
    assert_eq!(conntrack_setting("nf_conntrack_udp_timeout_stream")?, "180");
    // 0s and kube-proxy's unset UDP timeout: left as they were.
    assert_eq!(
        conntrack_setting("nf_conntrack_tcp_timeout_close_wait")?,
        "60"
    );
    assert_eq!(conntrack_setting("nf_conntrack_udp_timeout")?, "30");
    let web2 = cluster
        .add_pod("node-2", "web-2", &[("app", "web")])
        .await?;

    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [
            {"name": "http", "port": 80, "targetPort": 80, "protocol": "TCP"},
            {"name": "dns", "port": 53, "targetPort": 9376, "protocol": "UDP"}
        ]}
    }))?;
    services.create(&PostParams::default(), &service).await?;
    let ip = cluster_ip(&services, "web").await?;

    // New Service: both pods answer on its ClusterIP, over TCP and UDP.
    wait_for_pods(
        &client_pod.netns,
        "tcp",
        &format!("{ip}:80"),
        &["web-1", "web-2"],
        "Service created",
    )?;
    wait_for_pods(
        &client_pod.netns,
        "udp",
        &format!("{ip}:53"),
        &["web-1", "web-2"],
        "UDP port",
    )?;

    // web-2 stops being ready: the EndpointSlice drops it and so do the rules.
    cluster
        .set_pod_ready("default", "web-2", web2.ip, cluster.node("node-2"), false)
        .await?;
    wait_for_pods(
        &client_pod.netns,
        "tcp",
        &format!("{ip}:80"),
        &["web-1"],
        "endpoint became unready",
    )?;

    // `trace` asks the running agent for its rules and agrees with the packets.
    let traced = netns::exec_in(
        &node1.netns,
        &agent.display().to_string(),
        &[
            "trace",
            "--src",
            &client_pod.ip.to_string(),
            "--dst",
            &ip,
            "--dport",
            "80",
        ],
    )?;
    assert!(
        traced.contains(&format!("{}:80", web1.ip)) && !traced.contains(&web2.ip.to_string()),
        "live trace lists web-1 only:\n{traced}"
    );

    // Metrics: kube-proxy's names, with the programming latency measured
    // from the EndpointSlice controller's trigger time. A sync records it
    // once its restore has succeeded, which may be just after its rules
    // answer packets.
    let metrics = eventually(
        Duration::from_secs(10),
        "a network programming latency in /metrics",
        || async {
            let (status, _, metrics) = http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?;
            assert_eq!(status, 200);
            let programmed = metrics::value(
                &metrics,
                "kubeproxy_network_programming_duration_seconds_count",
            )
            .unwrap_or(0.0);
            Ok((programmed > 0.0).then_some(metrics))
        },
    )
    .await?;
    assert!(
        metrics.contains(
            "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"}"
        )
    );
    // Changes since the first sync were applied as partial syncs.
    let partial: u64 = metrics::value(
        &metrics,
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
    )
    .unwrap_or(0.0) as u64;
    assert!(partial > 0, "no partial sync:\n{metrics}");
    // The rest of kube-proxy's metrics server: the mode, as the Kubernetes
    // docs check it, and the settings from the file, as kube-proxy shows them.
    let (status, head, mode) = http_get(&node1.netns, "http://127.0.0.1:10249/proxyMode")?;
    assert_eq!((status, mode.as_str()), (200, "iptables"), "{head}");
    let (status, _, configz) = http_get(&node1.netns, "http://127.0.0.1:10249/configz")?;
    assert_eq!(status, 200);
    let configz: serde_json::Value = serde_json::from_str(&configz)?;
    let shown = &configz["kubeproxy.config.k8s.io"];
    assert_eq!(shown["SyncPeriod"], "10m0s", "{configz}");
    assert_eq!(shown["MetricsBindAddress"], "0.0.0.0:10249", "{configz}");
    assert_eq!(
        shown["Linux"]["Conntrack"]["TCPEstablishedTimeout"], "2h0m0s",
        "{configz}"
    );
    assert_eq!(shown["Logging"]["verbosity"], 4, "{configz}");
    // As kube-proxy does, the agent says on the Node that it started.
    let node: k8s_openapi::api::core::v1::Node = Api::all(cluster.client()).get("node-1").await?;
    let uid = node.metadata.uid.unwrap_or_default();
    let events = causeway_tests::controller::events_reported_by(
        &cluster.client(),
        &uid,
        Some("causeway-agent"),
    )
    .await?;
    assert!(
        events.iter().any(|(type_, reason, note)| type_ == "Normal"
            && reason == "Starting"
            && note.starts_with("Starting causeway-agent")),
        "{events:?}"
    );
    // The configuration file's field the agent does not use, and the one
    // kube-proxy's API no longer has, were named.
    let log = std::fs::read_to_string(cluster.dir().join("agent-node-1.log"))?;
    assert!(
        log.lines()
            .any(|l| l.contains("not used by causeway-agent") && l.contains("ipvs")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("not known to kube-proxy") && l.contains("resourceContainer")),
        "{log}"
    );
    assert!(
        log.lines().any(
            |l| l.contains("deleted the tables of kube-proxy's nftables mode")
                && l.contains("ip kube-proxy, ip6 kube-proxy")
        ),
        "{log}"
    );
    let tables = netns::exec_in(&node1.netns, "nft", &["list", "tables"])?;
    assert!(
        !tables.contains("kube-proxy") && tables.contains("table inet other-program"),
        "{tables}"
    );

    // The agent's own health, as the NLB and kubelet probe it.
    let (_, body) = wait_http(
        &cluster.external_netns(),
        &format!("http://{}:10256/healthz", node1.ip),
        200,
        "\"nodeEligible\":true",
    )?;
    assert!(body.contains("lastUpdated"), "{body}");

    // A NodePort reaches the Service from outside the cluster. Just before,
    // the localhost NodePort counter, which no rule uses yet, is deleted
    // behind the agent's back: the restore that counts into it fails, and the
    // full sync after it makes the counter again.
    netns::exec_in(
        &node1.netns,
        "nfacct",
        &["del", "localhost_nps_accepted_pkts"],
    )?;
    let patch = json!({"spec": {"type": "NodePort"}});
    services
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let svc = services.get("web").await?;
    let node_port = svc
        .spec
        .and_then(|s| s.ports)
        .and_then(|ports| ports.into_iter().find(|p| p.port == 80))
        .and_then(|p| p.node_port)
        .expect("a nodePort was allocated");
    wait_for_pods(
        &cluster.external_netns(),
        "tcp",
        &format!("{}:{node_port}", node1.ip),
        &["web-1"],
        "NodePort",
    )?;

    // kube-proxy's nfacct counters, which tell whether a node depends on
    // what only the iptables mode does. None of those connections came to
    // 127.0.0.1; the node's own to 127.0.0.1:<nodePort> are counted.
    let nfacct_count = |name: &str| -> Result<f64> {
        let text = http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?.2;
        metrics::value(&text, name).with_context(|| format!("no {name} in\n{text}"))
    };
    assert!(
        nfacct_count("kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total")? >= 1.0
    );
    let localhost = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total";
    assert_eq!(nfacct_count(localhost)?, 0.0);
    wait_for_pods(
        &node1.netns,
        "tcp",
        &format!("127.0.0.1:{node_port}"),
        &["web-1"],
        "NodePort on 127.0.0.1",
    )?;
    let counted = nfacct_count(localhost)?;
    assert!(
        counted >= 1.0,
        "{counted}: {}",
        netns::exec_in(
            &node1.netns,
            "iptables",
            &["-t", "nat", "-v", "-n", "-L", "KUBE-NODEPORTS"]
        )?
    );
    // Forwarded packets conntrack finds INVALID (here SYN and FIN at once,
    // from a pod to a pod on node-2) are dropped in KUBE-FORWARD and counted.
    let invalid = "kubeproxy_iptables_ct_state_invalid_dropped_packets_total";
    let dropped_before = nfacct_count(invalid)?;
    send_syn_fin(&client_pod.netns, client_pod.ip, web2.ip, 5)?;
    eventually(
        Duration::from_secs(5),
        "5 INVALID packets counted",
        || async { Ok((nfacct_count(invalid)? >= dropped_before + 5.0).then_some(())) },
    )
    .await?;

    // externalTrafficPolicy: Local — the health-check node port answers 200
    // with the local endpoint count while web-1 (on node-1) is ready, 503 after.
    let health_port = make_etp_local(&services, "web").await?;
    let url = format!("http://{}:{health_port}/", node1.ip);
    let (head, body) = wait_http(
        &cluster.external_netns(),
        &url,
        200,
        "\"localEndpoints\": 1",
    )?;
    assert!(
        head.to_ascii_lowercase()
            .contains("x-load-balancing-endpoint-weight: 1"),
        "weight header: {head}"
    );
    assert!(body.contains("\"name\": \"web\""), "{body}");
    cluster
        .set_pod_ready("default", "web-1", web1.ip, cluster.node("node-1"), false)
        .await?;
    wait_http(
        &cluster.external_netns(),
        &url,
        503,
        "\"localEndpoints\": 0",
    )?;

    // kube-proxy's other sync and probe metrics. web has no endpoints at
    // all now: REJECTed, so not among the Local-policy ports without local
    // endpoints. Once web-2 (on node-2) is ready again, both of web's ports
    // drop external traffic on node-1 and are counted; the endpoint change
    // is counted too.
    let scrape =
        || -> Result<String> { Ok(http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?.2) };
    let no_local = |text: &str, policy: &str| {
        metrics::value(
            text,
            &format!(
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{ip_family=\"IPv4\",traffic_policy=\"{policy}\"}}"
            ),
        )
    };
    let before = scrape()?;
    assert_eq!(no_local(&before, "external"), Some(0.0), "{before}");
    let endpoint_changes =
        |text: &str| metrics::value(text, "kubeproxy_sync_proxy_rules_endpoint_changes_total");
    cluster
        .set_pod_ready("default", "web-2", web2.ip, cluster.node("node-2"), true)
        .await?;
    let metrics = eventually(
        Duration::from_secs(10),
        "web's two ports counted without local endpoints",
        || async {
            let text = scrape()?;
            Ok((no_local(&text, "external") == Some(2.0)).then_some(text))
        },
    )
    .await?;
    assert_eq!(no_local(&metrics, "internal"), Some(0.0), "{metrics}");
    assert!(
        endpoint_changes(&metrics) > endpoint_changes(&before),
        "endpoint changes not counted:\n{before}\n{metrics}"
    );
    for (name, at_least) in [
        ("kubeproxy_proxy_healthz_total{code=\"200\"}", 1.0),
        (
            "kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"nat\"}",
            1.0,
        ),
        ("process_resident_memory_bytes", 1e6),
        ("process_open_fds", 3.0),
    ] {
        let value = metrics::value(&metrics, name).unwrap_or(-1.0);
        assert!(
            value >= at_least,
            "{name} = {value}, want >= {at_least}:\n{metrics}"
        );
    }
    // client-go's request metrics, with the apiserver's address as host:
    // the lists and watches that started the caches answered 200.
    let kubeconfig = std::fs::read_to_string(cluster.kubeconfig())?;
    let api_host = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .expect("the kubeconfig names its server")
        .to_string();
    let gets = metrics::value(
        &metrics,
        &format!("rest_client_requests_total{{code=\"200\",host=\"{api_host}\",method=\"GET\"}}"),
    )
    .unwrap_or(0.0);
    // A list and a watch for each of Services, EndpointSlices and the Node.
    assert!(gets >= 6.0, "{gets} GETs answered 200:\n{metrics}");
    let timed = metrics::value(
        &metrics,
        &format!("rest_client_request_duration_seconds_count{{host=\"{api_host}\",verb=\"GET\"}}"),
    )
    .unwrap_or(0.0);
    // The lists are timed, the watches (still open) are not.
    assert!(
        (3.0..gets).contains(&timed),
        "{timed} of {gets} GETs timed:\n{metrics}"
    );
    cluster
        .set_pod_ready("default", "web-2", web2.ip, cluster.node("node-2"), false)
        .await?;
    eventually(
        Duration::from_secs(10),
        "web without endpoints again",
        || async { Ok((no_local(&scrape()?, "external") == Some(0.0)).then_some(())) },
    )
    .await?;

    // A change that does not touch the rules (a label) applies nothing.
    let restores = |metrics: &str| -> u64 {
        metrics::value(metrics, "causeway_agent_restore_bytes_count").unwrap_or(0.0) as u64
    };
    let before = restores(&http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?.2);
    let patch = json!({"metadata": {"labels": {"team": "payments"}}});
    services
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    std::thread::sleep(Duration::from_secs(3));
    let after = restores(&http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?.2);
    assert_eq!(after, before, "a no-op change ran iptables-restore");
    // At the file's verbosity 4 the sync said why it wrote nothing.
    let log = std::fs::read_to_string(cluster.dir().join("agent-node-1.log"))?;
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("nothing changed")),
        "{log}"
    );

    // A burst is batched (--min-sync-period 1s): ten Services created back
    // to back cost a few restores, not ten.
    for i in 0..10 {
        let burst: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("burst-{i}")},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 80}]}
        }))?;
        services.create(&PostParams::default(), &burst).await?;
    }
    eventually(
        Duration::from_secs(20),
        "the ten Services' rules",
        || async {
            // (No endpoint is ready by now: their entries are filter REJECTs.)
            let rules = iptables_save(&node1.netns)?;
            Ok((0..10)
                .all(|i| rules.contains(&format!("\"default/burst-{i} has no endpoints\"")))
                .then_some(()))
        },
    )
    .await?;
    let burst = restores(&http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?.2) - after;
    assert!(
        (1..=5).contains(&burst),
        "{burst} restores for a burst of ten Services"
    );

    // Garbage on the health ports takes nothing down: a half-sent request
    // held open, random bytes and a 1 MiB header, while probes go on.
    let healthz = format!("http://{}:10256/healthz", node1.ip);
    let mut held = Vec::new();
    for port in [10256u16, health_port] {
        let address = std::net::SocketAddr::new(node1.ip.into(), port);
        let mut slow = std::net::TcpStream::connect(address)?;
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")?;
        held.push(slow);
        let mut noise = std::net::TcpStream::connect(address)?;
        noise.write_all(
            &(0..4096u32)
                .map(|i| (i * 7919 % 251) as u8)
                .collect::<Vec<_>>(),
        )?;
        held.push(noise);
        let mut huge = std::net::TcpStream::connect(address)?;
        let _ = huge
            .write_all(format!("GET / HTTP/1.1\r\nX-Big: {}\r\n", "a".repeat(1 << 20)).as_bytes());
        held.push(huge);
    }
    wait_http(&cluster.external_netns(), &healthz, 200, "lastUpdated")?;
    wait_http(
        &cluster.external_netns(),
        &url,
        503,
        "\"localEndpoints\": 0",
    )?;
    // The server closes a request head that is not complete in 5 s.
    let slow = &mut held[0];
    slow.set_read_timeout(Some(Duration::from_secs(15)))?;
    let waited = Instant::now();
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(slow, &mut rest);
    // Closed shows as the end of the stream or a reset; still open, as the
    // read timing out.
    let still_open = read.as_ref().is_err_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    });
    assert!(
        !still_open && waited.elapsed() < Duration::from_secs(10),
        "a half-sent request still open after {:?}: {read:?}",
        waited.elapsed()
    );
    drop(held);

    // With the agent held to 128 open files, 200 idle connections to :10256
    // would use them all up and no port could accept (kube-proxy's Go
    // servers raise the limit, axum::serve does neither). One port holds at
    // most 64, closing its oldest for a new one: :10256 and the Service's
    // health port both answer at once, with the idle connections still open.
    netns::run(
        "prlimit",
        &["--pid", &agent_pid.to_string(), "--nofile=128:128"],
    )?;
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect((node1.ip, 10256)))
        .collect::<std::io::Result<_>>()?;
    std::thread::sleep(Duration::from_millis(300));
    let (status, _, body) = http_get(&cluster.external_netns(), &healthz)?;
    assert_eq!(status, 200, "/healthz while :10256 is flooded: {body}");
    let (status, _, body) = http_get(&cluster.external_netns(), &url)?;
    assert_eq!(
        status, 503,
        "the Service health port beside a flooded :10256: {body}"
    );
    drop(idle);

    // /metrics may be served to the network, /debug/rules only on the node.
    let remote = format!("http://{}:10249", node1.ip);
    let (status, _, _) = http_get(&cluster.external_netns(), &format!("{remote}/metrics"))?;
    assert_eq!(status, 200, "/metrics from another host");
    let (status, _, body) = http_get(&cluster.external_netns(), &format!("{remote}/debug/rules"))?;
    assert_eq!(status, 403, "/debug/rules from another host: {body}");
    let (status, _, body) = http_get(&node1.netns, "http://127.0.0.1:10249/debug/rules")?;
    assert!(
        status == 200 && body.contains("*nat"),
        "/debug/rules on the node: {status} {body}"
    );

    // The autoscaler is about to remove node-1: /healthz says 503 so load
    // balancers drain it, /livez stays 200 (the agent itself is fine).
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(cluster.client());
    let taint = json!({"spec": {"taints": [
        {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}});
    nodes
        .patch("node-1", &PatchParams::default(), &Patch::Merge(&taint))
        .await?;
    wait_http(
        &cluster.external_netns(),
        &healthz,
        503,
        "\"nodeEligible\":false",
    )?;
    wait_http(
        &cluster.external_netns(),
        &format!("http://{}:10256/livez", node1.ip),
        200,
        "lastUpdated",
    )?;
    let untaint = json!({"spec": {"taints": null}});
    nodes
        .patch("node-1", &PatchParams::default(), &Patch::Merge(&untaint))
        .await?;
    wait_http(
        &cluster.external_netns(),
        &healthz,
        200,
        "\"nodeEligible\":true",
    )?;

    // Service deleted: its ClusterIP no longer leads anywhere.
    services.delete("web", &DeleteParams::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = tally(&client_pod.netns, "tcp", &format!("{ip}:80"), 5)?;
        if !counts.contains_key("web-1") && !counts.contains_key("web-2") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the deleted Service still answers: {counts:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    // The configuration file changes: as kube-proxy does, the agent exits
    // (for its DaemonSet to start it with the new file), leaving the rules.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)?.replace("minSyncPeriod: 1s", "minSyncPeriod: 2s"),
    )?;
    eventually(Duration::from_secs(20), "the agent to exit", || async {
        // Exited: gone, or a zombie until the environment reaps it.
        let state = std::fs::read_to_string(format!("/proc/{agent_pid}/stat")).unwrap_or_default();
        let exited = state.is_empty() || state.split_whitespace().nth(2) == Some("Z");
        Ok(exited.then_some(()))
    })
    .await?;
    let log = std::fs::read_to_string(cluster.dir().join("agent-node-1.log"))?;
    assert!(
        log.contains("kube-proxy.conf changed; exiting so that it is read again at restart"),
        "{log}"
    );
    assert!(
        iptables_save(&node1.netns)?.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ),
        "the rules went with the agent"
    );
    Ok(())
}

/// `iptables-save` of a namespace, for comparing before and after.
fn iptables_save(ns: &str) -> Result<String> {
    netns::exec_in(ns, "iptables-save", &[])
}

/// The rules and user-defined chains, per table; built-in chains and empty
/// tables (which merely exist once any program used them) are left out.
fn rule_lines(save: &str) -> Vec<String> {
    let mut table = "";
    let mut lines = Vec::new();
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name;
        } else if line.starts_with("-A ") {
            lines.push(format!("{table}: {line}"));
        } else if let Some(decl) = line.strip_prefix(':')
            && decl.split_whitespace().nth(1) == Some("-")
        {
            let chain = decl.split_whitespace().next().unwrap_or("");
            lines.push(format!("{table}: chain {chain}"));
        }
    }
    lines.sort();
    lines
}

/// On node-1: a client pod, a pod `web-1` and the Service `web` (port 80)
/// selecting it; returns the client, the Services API and web's cluster IP.
async fn client_and_web(cluster: &Cluster) -> Result<(Pod, Api<Service>, String)> {
    let client = cluster
        .add_pod("node-1", "client", &[("app", "client")])
        .await?;
    cluster
        .add_pod("node-1", "web-1", &[("app", "web")])
        .await?;
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let web: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 80}]}
    }))?;
    services.create(&PostParams::default(), &web).await?;
    let ip = cluster_ip(&services, "web").await?;
    Ok((client, services, ip))
}

/// One node running the agent with `--sync-period` `sync_period` (changes
/// that wait longer than twice that make it unhealthy), a client pod, and
/// Service `web` (cluster IP `ip`) answering at `web` from web-1.
struct AgentAndWeb {
    cluster: Cluster,
    node1: causeway_tests::cluster::NodeInfo,
    agent_pid: u32,
    client: Pod,
    services: Api<Service>,
    ip: String,
    web: String,
}

async fn agent_and_web(sync_period: &str) -> Result<AgentAndWeb> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let node1 = cluster.node("node-1").clone();
    let agent = workspace_bin("causeway-agent");
    let agent_pid =
        cluster.spawn_agent("node-1", "agent-1", &agent, &["--sync-period", sync_period])?;
    let (client, services, ip) = client_and_web(&cluster).await?;
    let web = format!("{ip}:80");
    wait_for_pods(&client.netns, "tcp", &web, &["web-1"], "web")?;
    Ok(AgentAndWeb {
        cluster,
        node1,
        agent_pid,
        client,
        services,
        ip,
        web,
    })
}

/// kube-proxy's `--bind-address`: one address is the node's IP of its family,
/// in place of the Node's InternalIP, so `--nodeport-addresses primary`
/// answers there and not on the InternalIP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_address_is_the_node_ip_that_primary_node_ports_answer_on() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let node1 = cluster.node("node-1").clone();
    // A second address on the node's interface, in the same subnet.
    let (device, prefix) = netns::exec_in(&node1.netns, "ip", &["-o", "-4", "addr", "show"])?
        .lines()
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (ip, prefix) = words.get(3)?.split_once('/')?;
            (ip == node1.ip.to_string()).then(|| (words[1].to_string(), prefix.to_string()))
        })
        .context("the node's interface")?;
    let octets = node1.ip.octets();
    let bind = std::net::Ipv4Addr::new(octets[0], octets[1], octets[2], 222);
    netns::exec_in(
        &node1.netns,
        "ip",
        &["addr", "add", &format!("{bind}/{prefix}"), "dev", &device],
    )?;
    let agent = workspace_bin("causeway-agent");
    cluster.spawn_agent(
        "node-1",
        "agent-1",
        &agent,
        &[
            &format!("--bind-address={bind}"),
            "--nodeport-addresses=primary",
        ],
    )?;
    let (_client, services, _ip) = client_and_web(&cluster).await?;
    let patch = json!({"spec": {"type": "NodePort"}});
    services
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let node_port = services
        .get("web")
        .await?
        .spec
        .and_then(|s| s.ports)
        .and_then(|ports| ports.first().and_then(|p| p.node_port))
        .context("a nodePort")?;
    wait_for_pods(
        &cluster.external_netns(),
        "tcp",
        &format!("{bind}:{node_port}"),
        &["web-1"],
        "the NodePort on the bind address",
    )?;
    // The InternalIP is no longer the node's IP: nothing answers there.
    let on_internal_ip = tally(
        &cluster.external_netns(),
        "tcp",
        &format!("{}:{node_port}", node1.ip),
        5,
    )?;
    assert!(!on_internal_ip.contains_key("web-1"), "{on_internal_ip:?}");
    Ok(())
}

/// The apiserver goes away and comes back, as in a crash or a control-plane
/// upgrade. Meanwhile the rules stay and answer, the agent keeps running and
/// healthy, and once the apiserver is back it follows what changes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_rides_out_an_apiserver_restart() -> Result<()> {
    // The outage below lasts longer than twice the sync period.
    let AgentAndWeb {
        cluster,
        node1,
        agent_pid,
        client,
        services,
        web,
        ..
    } = agent_and_web("2s").await?;
    let healthz = format!("http://{}:10256/healthz", node1.ip);

    let stopped = cluster.stop_component("kube-apiserver")?;
    assert!(
        services.get("web").await.is_err(),
        "the apiserver still answers"
    );
    std::thread::sleep(Duration::from_secs(6));
    let during = tally(&client.netns, "tcp", &web, 10)?;
    assert_eq!(
        during.get("web-1"),
        Some(&10),
        "during the outage: {during:?}"
    );
    let (status, _, body) = http_get(&cluster.external_netns(), &healthz)?;
    assert_eq!(status, 200, "/healthz during the outage: {body}");
    assert!(
        causeway_tests::cluster::process_running(agent_pid),
        "the agent exited while the apiserver was away"
    );

    cluster.start_component(stopped).await?;
    // An endpoint added, and a Service created, after the restart.
    cluster
        .add_pod("node-1", "web-2", &[("app", "web")])
        .await?;
    // The agent's watches and the EndpointSlice controller's come back
    // after a pause of up to a minute (client-go's, and the agent's, with
    // their random part).
    wait_for_pods_within(
        Duration::from_secs(90),
        &client.netns,
        "tcp",
        &web,
        &["web-1", "web-2"],
        "web's new endpoint after the restart",
    )?;
    let api: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 8080, "targetPort": 80}]}
    }))?;
    services.create(&PostParams::default(), &api).await?;
    let api_ip = cluster_ip(&services, "api").await?;
    wait_for_pods(
        &client.netns,
        "tcp",
        &format!("{api_ip}:8080"),
        &["web-1", "web-2"],
        "a Service created after the restart",
    )?;
    let (status, _, body) = http_get(&cluster.external_netns(), &healthz)?;
    assert_eq!(status, 200, "/healthz after the restart: {body}");
    let log = std::fs::read_to_string(cluster.dir().join("agent-1.log"))?;
    assert!(!log.contains("panicked"), "{log}");
    // It said why it was retrying.
    assert!(log.contains("watching Services failed; retrying"), "{log}");
    Ok(())
}

/// A kube-proxy DaemonSet with only its image changed. The image links
/// `kube-proxy` to the agent; started by that name with kubeadm's arguments
/// and kubeadm's configuration file, under kube-proxy's own RBAC (the
/// bootstrap ClusterRole `system:node-proxier`, bound to a `kube-proxy`
/// ServiceAccount as kubeadm binds it), the agent proxies Services and is
/// refused nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_as_kube_proxy_with_kubeadms_arguments_and_rbac_it_proxies() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let node1 = cluster.node("node-1").clone();
    cluster.kubectl(&[
        "create",
        "serviceaccount",
        "kube-proxy",
        "-n",
        "kube-system",
    ])?;
    cluster.kubectl(&[
        "create",
        "clusterrolebinding",
        "kubeadm:node-proxier",
        "--clusterrole=system:node-proxier",
        "--serviceaccount=kube-system:kube-proxy",
    ])?;
    let token = cluster.kubectl(&[
        "create",
        "token",
        "kube-proxy",
        "-n",
        "kube-system",
        "--duration=1h",
    ])?;
    // As kubeadm's kubeconfig for kube-proxy: the token read from a file.
    let token_file = cluster.dir().join("kube-proxy-token");
    std::fs::write(&token_file, token.trim())?;
    let kubeconfig = cluster.kubeconfig_with_token_file("kube-proxy", &token_file)?;
    // What `kubeadm init` writes into the kube-proxy ConfigMap (kubeadm
    // 1.34's defaults), with the cluster's pod CIDR and the kubeconfig.
    let config = cluster.dir().join("config.conf");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
             bindAddress: 0.0.0.0\n\
             bindAddressHardFail: false\n\
             clientConnection:\n  acceptContentTypes: \"\"\n  burst: 0\n  contentType: \"\"\n  \
               kubeconfig: {kubeconfig}\n  qps: 0\n\
             clusterCIDR: {cidr}\n\
             configSyncPeriod: 0s\n\
             conntrack:\n  maxPerCore: null\n  min: null\n  tcpBeLiberal: false\n  \
               tcpCloseWaitTimeout: null\n  tcpEstablishedTimeout: null\n  \
               udpStreamTimeout: 0s\n  udpTimeout: 0s\n\
             detectLocal:\n  bridgeInterface: \"\"\n  interfaceNamePrefix: \"\"\n\
             detectLocalMode: \"\"\n\
             enableProfiling: false\n\
             healthzBindAddress: \"\"\n\
             hostnameOverride: \"\"\n\
             iptables:\n  localhostNodePorts: null\n  masqueradeAll: false\n  \
               masqueradeBit: null\n  minSyncPeriod: 0s\n  syncPeriod: 0s\n\
             ipvs:\n  excludeCIDRs: null\n  minSyncPeriod: 0s\n  scheduler: \"\"\n  \
               strictARP: false\n  syncPeriod: 0s\n  tcpFinTimeout: 0s\n  tcpTimeout: 0s\n  \
               udpTimeout: 0s\n\
             kind: KubeProxyConfiguration\n\
             logging:\n  flushFrequency: 0\n  options:\n    json:\n      infoBufferSize: \"0\"\n    \
               text:\n      infoBufferSize: \"0\"\n  verbosity: 0\n\
             metricsBindAddress: \"\"\n\
             mode: \"\"\n\
             nftables:\n  masqueradeAll: false\n  masqueradeBit: null\n  minSyncPeriod: 0s\n  \
               syncPeriod: 0s\n\
             nodePortAddresses: null\n\
             oomScoreAdj: null\n\
             portRange: \"\"\n\
             showHiddenMetricsForVersion: \"\"\n\
             winkernel:\n  enableDSR: false\n  forwardHealthCheckVip: false\n  networkName: \"\"\n  \
               rootHnsEndpointName: \"\"\n  sourceVip: \"\"\n",
            cidr = cluster.cluster_cidr(),
        ),
    )?;
    // The image's `kube-proxy`: a link to the agent.
    let image_bin = cluster.dir().join("image-bin");
    std::fs::create_dir_all(&image_bin)?;
    let kube_proxy = image_bin.join("kube-proxy");
    std::os::unix::fs::symlink(workspace_bin("causeway-agent"), &kube_proxy)?;
    // kubeadm's DaemonSet command, $(NODE_NAME) filled in by the kubelet.
    cluster.spawn_in(
        &node1.netns,
        "kube-proxy",
        &kube_proxy,
        &[
            &format!("--config={}", config.display()),
            "--hostname-override=node-1",
        ],
    )?;
    let (client, _services, ip) = client_and_web(&cluster).await?;
    wait_for_pods(
        &client.netns,
        "tcp",
        &format!("{ip}:80"),
        &["web-1"],
        "web, proxied by `kube-proxy`",
    )?;
    let (status, _, mode) = http_get(&node1.netns, "http://127.0.0.1:10249/proxyMode")?;
    assert_eq!((status, mode.as_str()), (200, "iptables"));
    // The Starting event, written with kube-proxy's RBAC.
    let node: k8s_openapi::api::core::v1::Node = Api::all(cluster.client()).get("node-1").await?;
    let uid = node.metadata.uid.unwrap_or_default();
    eventually(
        Duration::from_secs(10),
        "the agent's Starting event on the Node",
        || async {
            let events = causeway_tests::controller::events_reported_by(
                &cluster.client(),
                &uid,
                Some("causeway-agent"),
            )
            .await?;
            Ok(events
                .iter()
                .any(|(_, reason, _)| reason == "Starting")
                .then_some(()))
        },
    )
    .await?;
    let log = std::fs::read_to_string(cluster.dir().join("kube-proxy.log"))?;
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "refused something under system:node-proxier:\n{log}"
    );
    Ok(())
}

/// The `KUBE-SVC-` chain the nat `KUBE-SERVICES` entry of `ns/name` jumps to.
fn service_chain(netns_name: &str, service: &str) -> Result<Option<String>> {
    let entries = netns::exec_in(
        netns_name,
        "iptables",
        &["-t", "nat", "-S", "KUBE-SERVICES"],
    )?;
    Ok(entries
        .lines()
        .find(|l| l.contains(&format!("\"{service} cluster IP\"")))
        .and_then(|l| l.split_whitespace().last())
        .map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_restore_applies_nothing_keeps_health_servers_and_is_retried() -> Result<()> {
    let AgentAndWeb {
        cluster,
        node1,
        client,
        services,
        web,
        ..
    } = agent_and_web("2s").await?;
    let health_port = make_etp_local(&services, "web").await?;
    let health = format!("http://{}:{health_port}/", node1.ip);
    wait_http(
        &cluster.external_netns(),
        &health,
        200,
        "\"localEndpoints\": 1",
    )?;

    let doomed: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "doomed"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 81, "targetPort": 80}]}
    }))?;
    services.create(&PostParams::default(), &doomed).await?;
    let chain = eventually(
        Duration::from_secs(30),
        "default/doomed's service chain",
        || async { service_chain(&node1.netns, "default/doomed") },
    )
    .await?;

    // Another program jumps to that chain, so deleting it (the Service goes)
    // is refused by the kernel, every time, until that rule goes.
    let foreign = ["-t", "nat", "OUTPUT", "-d", "192.0.2.1/32", "-j", &chain];
    let with_op = |op: &'static str| {
        let mut args = foreign.to_vec();
        args.insert(2, op);
        args
    };
    netns::exec_in(&node1.netns, "iptables", &with_op("-A"))?;
    services.delete("doomed", &DeleteParams::default()).await?;
    let failures = |metrics: &str| {
        metrics::value(
            metrics,
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        )
        .unwrap_or(0.0)
    };
    eventually(Duration::from_secs(15), "refused restores", || async {
        let (_, _, metrics) = http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?;
        Ok((failures(&metrics) >= 2.0).then_some(()))
    })
    .await?;
    // Refused in nat, which comes first: nothing of the payload applied.
    assert_eq!(
        service_chain(&node1.netns, "default/doomed")?.as_deref(),
        Some(chain.as_str()),
        "the refused payload changed nat"
    );
    let (status, _, refused) = http_get(
        &node1.netns,
        "http://127.0.0.1:10249/debug/rules?which=failed",
    )?;
    assert!(
        status == 200 && refused.contains(&format!("-X {chain}")),
        "the refused payload is kept: {status} {refused}"
    );
    // The Service keeps working on the rules that stand. Once the change has
    // waited 2 × --sync-period, /healthz says 503, and the Service health
    // server, still up, says 503 with the agent unhealthy and its local
    // endpoint still counted (kube-proxy's answers).
    wait_for_pods(&client.netns, "tcp", &web, &["web-1"], "while refused")?;
    let healthz = format!("http://{}:10256/healthz", node1.ip);
    wait_http(&cluster.external_netns(), &healthz, 503, "lastUpdated")?;
    wait_http(
        &cluster.external_netns(),
        &health,
        503,
        "\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": false",
    )?;

    // The other program lets go: the next retry applies, the chain goes.
    netns::exec_in(&node1.netns, "iptables", &with_op("-D"))?;
    eventually(Duration::from_secs(15), "the retried restore", || async {
        Ok(service_chain(&node1.netns, "default/doomed")?
            .is_none()
            .then_some(()))
    })
    .await?;
    let nat = netns::exec_in(&node1.netns, "iptables", &["-t", "nat", "-S"])?;
    assert!(!nat.contains(&chain), "{chain} is still there:\n{nat}");
    wait_http(&cluster.external_netns(), &healthz, 200, "lastUpdated")?;
    wait_http(
        &cluster.external_netns(),
        &health,
        200,
        "\"serviceProxyHealthy\": true",
    )?;
    Ok(())
}

/// Chains from before the agent (kube-proxy's here) that its first sync
/// cannot read, because `iptables-save` fails then, stay only until a
/// sync can read them: that sync is a full one and deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_the_first_sync_could_not_read_go_once_a_sync_can() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let ns = cluster.node("node-1").netns.clone();
    let stale = ["KUBE-SVC-AAAAAAAAAAAAAAAA", "KUBE-SEP-AAAAAAAAAAAAAAAA"];
    let payload = cluster.dir().join("stale.rules");
    std::fs::write(
        &payload,
        format!(
            "*nat\n:{svc} - [0:0]\n:{sep} - [0:0]\n-A {svc} -j {sep}\n\
             -A {sep} -p tcp -j DNAT --to-destination 192.0.2.1:80\nCOMMIT\n",
            svc = stale[0],
            sep = stale[1]
        ),
    )?;
    netns::exec_in(
        &ns,
        "iptables-nft-restore",
        &["--noflush", &payload.display().to_string()],
    )?;
    // An iptables-nft-save that fails on the nat table while `broken` exists.
    let bin = cluster.dir().join("failing-save");
    std::fs::create_dir_all(&bin)?;
    let broken = cluster.dir().join("broken");
    std::fs::write(&broken, "")?;
    let real = netns::which("iptables-nft-save").context("iptables-nft-save")?;
    let wrapper = bin.join("iptables-nft-save");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ -e '{}' ] && [ \"$*\" = '-t nat' ]; then\n  \
             echo 'injected failure' >&2; exit 1\nfi\nexec '{}' \"$@\"\n",
            broken.display(),
            real.display()
        ),
    )?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let path = netns::path_with(&bin);
    cluster.spawn_agent_with_env(
        "node-1",
        "agent",
        &workspace_bin("causeway-agent"),
        &["--iptables-backend", "nft", "--sync-period", "2s"],
        &[("PATH", &path)],
    )?;
    let (client, _services, ip) = client_and_web(&cluster).await?;
    wait_for_pods(&client.netns, "tcp", &format!("{ip}:80"), &["web-1"], "web")?;
    let log = std::fs::read_to_string(cluster.dir().join("agent.log"))?;
    assert!(
        log.contains("existing chains") && log.contains("injected failure"),
        "the agent could not read the chains:\n{log}"
    );
    let nat = netns::exec_in(&ns, "iptables-nft", &["-t", "nat", "-S"])?;
    assert!(
        stale.iter().all(|c| nat.contains(&format!("-N {c}"))),
        "the chains stay while they cannot be read:\n{nat}"
    );

    std::fs::remove_file(&broken)?;
    eventually(
        Duration::from_secs(20),
        "the stale chains deleted",
        || async {
            let nat = netns::exec_in(&ns, "iptables-nft", &["-t", "nat", "-S"])?;
            Ok(stale.iter().all(|c| !nat.contains(c)).then_some(()))
        },
    )
    .await?;
    wait_for_pods(
        &client.netns,
        "tcp",
        &format!("{ip}:80"),
        &["web-1"],
        "web, afterwards",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_health_port_is_a_warning_event_and_health_servers_follow_services() -> Result<()> {
    let AgentAndWeb {
        cluster,
        node1,
        services,
        ..
    } = agent_and_web("2s").await?;

    // A health-check port another process holds: a Warning on the Service;
    // once the port is free, the server starts (the agent tries each sync).
    let echo = workspace_bin("causeway-echo");
    let busy = 31555;
    let holder = cluster.spawn_in(
        &node1.netns,
        "port-holder",
        &echo,
        &["serve", "--name", "holder", "--port", &busy.to_string()],
    )?;
    let local: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "local"},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                 "healthCheckNodePort": busy, "selector": {"app": "web"},
                 "ports": [{"port": 83, "targetPort": 80}]}
    }))?;
    let local = services.create(&PostParams::default(), &local).await?;
    let note = causeway_tests::controller::wait_for_event(
        &cluster.client(),
        &local.metadata.uid.clone().unwrap_or_default(),
        "Warning",
        "HealthCheckBindFailed",
        Duration::from_secs(20),
    )
    .await?;
    assert!(note.contains(&busy.to_string()), "{note}");
    netns::run("kill", &["-TERM", &holder.to_string()])?;
    let health = format!("http://{}:{busy}/", node1.ip);
    let (head, body) = wait_http(
        &cluster.external_netns(),
        &health,
        200,
        "\"localEndpoints\": 1",
    )?;
    assert!(
        body.contains("\"name\": \"local\"")
            && head
                .to_ascii_lowercase()
                .contains("x-content-type-options: nosniff"),
        "{head}\n{body}"
    );

    // The Service goes: so does its health server.
    services.delete("local", &DeleteParams::default()).await?;
    eventually(
        Duration::from_secs(20),
        "the health server to stop",
        || async {
            Ok(http_get(&cluster.external_netns(), &health)
                .is_err()
                .then_some(()))
        },
    )
    .await?;

    // The Node is being deleted (a finalizer holds it): /healthz says 503 so
    // load balancers drain the node; /livez stays 200.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(cluster.client());
    let hold = json!({"metadata": {"finalizers": ["causeway.dev/test-hold"]}});
    nodes
        .patch("node-1", &PatchParams::default(), &Patch::Merge(&hold))
        .await?;
    nodes.delete("node-1", &DeleteParams::default()).await?;
    let proxy = format!("http://{}:10256", node1.ip);
    wait_http(
        &cluster.external_netns(),
        &format!("{proxy}/healthz"),
        503,
        "\"nodeEligible\":false",
    )?;
    wait_http(
        &cluster.external_netns(),
        &format!("{proxy}/livez"),
        200,
        "lastUpdated",
    )?;
    let release = json!({"metadata": {"finalizers": null}});
    nodes
        .patch("node-1", &PatchParams::default(), &Patch::Merge(&release))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_heals_flushed_rules_restarts_without_loss_and_cleans_up() -> Result<()> {
    heals_restarts_and_cleans_up("nft", "iptables").await
}

/// The same with iptables-legacy, whose damage check reads saved tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_heals_flushed_rules_restarts_without_loss_and_cleans_up_with_legacy() -> Result<()> {
    heals_restarts_and_cleans_up("legacy", "iptables-legacy").await
}

/// `backend` is the agent's `--iptables-backend`; `iptables` the program
/// that plays the other programs (kubelet, a flush) in the same backend.
async fn heals_restarts_and_cleans_up(backend: &str, iptables: &str) -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let node1 = cluster.node("node-1").clone();
    let agent = workspace_bin("causeway-agent");
    // A rule and a chain of another program, and kubelet's KUBE-FIREWALL
    // with its localnet guard: the agent must not take any of them away.
    for kubelet in [
        &["-N", "KUBE-FIREWALL"][..],
        &[
            "-A",
            "KUBE-FIREWALL",
            "!",
            "-s",
            "127.0.0.0/8",
            "-d",
            "127.0.0.0/8",
            "-m",
            "comment",
            "--comment",
            "block incoming localnet connections",
            "-m",
            "conntrack",
            "!",
            "--ctstate",
            "RELATED,ESTABLISHED,DNAT",
            "-j",
            "DROP",
        ],
        &["-I", "INPUT", "-j", "KUBE-FIREWALL"],
        &["-I", "OUTPUT", "-j", "KUBE-FIREWALL"],
    ] {
        netns::exec_in(&node1.netns, iptables, kubelet)?;
    }
    let before = {
        netns::exec_in(
            &node1.netns,
            iptables,
            &["-t", "nat", "-N", "OTHER-PROGRAM"],
        )?;
        netns::exec_in(
            &node1.netns,
            iptables,
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                "198.51.100.0/24",
                "-j",
                "OTHER-PROGRAM",
            ],
        )?;
        rule_lines(&netns::exec_in(
            &node1.netns,
            &format!("{iptables}-save"),
            &[],
        )?)
    };
    let args = ["--sync-period", "3s", "--iptables-backend", backend];
    let first = cluster.spawn_agent("node-1", "agent-1", &agent, &args)?;

    let (client, _services, ip) = client_and_web(&cluster).await?;
    let target = format!("{ip}:80");
    // Wait for the rules before the first connection: a connection attempted
    // before them leaves an un-DNATed SYN_SENT conntrack entry behind for two
    // minutes, which is not what this test is about.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !netns::exec_in(
        &node1.netns,
        iptables,
        &["-t", "nat", "-S", "KUBE-SERVICES"],
    )?
    .contains("default/web cluster IP")
    {
        if Instant::now() > deadline {
            bail!("the agent did not program default/web within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_pods(&client.netns, "tcp", &target, &["web-1"], "Service created")?;

    // Restart while a client opens 50 connections per second (one every
    // 20 ms for 12 s): the agent stops after 1 s, a new one starts after 2 s
    // and makes its first, full, sync while the client goes on. Every
    // connection lands (the rules stay until replaced atomically).
    let paced = {
        let (ns, target) = (client.netns.clone(), target.clone());
        std::thread::spawn(move || netns::paced_tally_by_pod(&ns, "tcp", &target, 600, Some(20)))
    };
    // Not liberal (the namespace's default): INVALID packets are dropped.
    let forward = netns::exec_in(&node1.netns, iptables, &["-S", "KUBE-FORWARD"])?;
    assert!(
        forward
            .lines()
            .any(|l| l.contains("--ctstate INVALID") && l.ends_with("-j DROP")),
        "{forward}"
    );
    std::thread::sleep(Duration::from_secs(1));
    netns::run("kill", &["-TERM", &first.to_string()])?;
    std::thread::sleep(Duration::from_secs(1));
    let now = || -> Result<f64> {
        Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64())
    };
    // The new agent starts as a kops static pod starts kube-proxy: the API
    // server from --master (its kubeconfig names a port nothing listens
    // on), its OOM score set, conntrack's liberal TCP mode asked for, and
    // kube-proxy flags it has no use for. (kops
    // passes -998; lowering the score needs CAP_SYS_RESOURCE, which this
    // machine withholds even from root, so the test raises it.)
    let kubeconfig = std::fs::read_to_string(cluster.kubeconfig())?;
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .context("the kubeconfig's server")?
        .to_string();
    let (scheme_and_host, _port) = server.rsplit_once(':').context("the server's port")?;
    let stale = cluster.dir().join("kubeconfig-stale-server");
    std::fs::write(
        &stale,
        kubeconfig.replace(&server, &format!("{scheme_and_host}:1")),
    )?;
    let (stale, master, cidr) = (
        stale.display().to_string(),
        format!("--master={server}"),
        cluster.cluster_cidr(),
    );
    let mut kops_style = vec![
        "run",
        "--hostname-override=node-1",
        "--kubeconfig",
        &stale,
        &master,
        "--cluster-cidr",
        &cidr,
        "--oom-score-adj=500",
        "--kube-api-qps=20",
        "--conntrack-tcp-be-liberal",
        "--v=2",
    ];
    kops_style.extend_from_slice(&args);
    // With legacy, the new agent runs as it would in a container with
    // NET_ADMIN only: /proc/sys read-only. The sysctls its rules need were
    // set before (by the first agent, and here as an init container would),
    // so it needs to write none of them; a conntrack default put back below
    // is out of its reach.
    let read_only_proc_sys = backend == "legacy";
    let read_only_start = "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$0\" \"$@\"";
    let agent_path = agent.display().to_string();
    if read_only_proc_sys {
        netns::exec_in(
            &node1.netns,
            "sh",
            &[
                "-c",
                "echo 1 > /proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal",
            ],
        )?;
    }
    // The first agent set kube-proxy's conntrack timeouts; put one back to
    // the kernel's default, as on a node kube-proxy never ran on. The new
    // agent sets it again at start, or, with /proc/sys read-only, says it
    // cannot (a default out of reach does not stop it).
    let established = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established";
    assert_eq!(
        netns::exec_in(&node1.netns, "cat", &[established])?.trim(),
        "86400"
    );
    netns::sysctl_in(
        &node1.netns,
        "net.netfilter.nf_conntrack_tcp_timeout_established",
        "432000",
    )?;
    let spawned = now()?;
    let second = if read_only_proc_sys {
        let mut wrapped = vec!["--mount", "sh", "-c", read_only_start, &agent_path];
        wrapped.extend_from_slice(&kops_style);
        cluster.spawn_in(
            &node1.netns,
            "agent-2",
            std::path::Path::new("unshare"),
            &wrapped,
        )?
    } else {
        cluster.spawn_in(&node1.netns, "agent-2", &agent, &kops_style)?
    };
    // (A sync after the spawn: the old agent may still be answering.)
    let last_sync = |metrics: &str| {
        metrics::value(
            metrics,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        )
        .filter(|t| *t > spawned)
    };
    let first_sync = eventually(
        Duration::from_secs(9),
        "the new agent's first sync",
        || async {
            Ok(http_get(&node1.netns, "http://127.0.0.1:10249/metrics")
                .ok()
                .and_then(|(_, _, metrics)| last_sync(&metrics)))
        },
    )
    .await?;
    let tally = paced.join().expect("the client thread")?;
    let client_done = now()?;
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{second}/oom_score_adj"))?.trim(),
        "500"
    );
    let log = std::fs::read_to_string(cluster.dir().join("agent-2.log"))?;
    assert!(
        log.lines()
            .any(|l| l.contains("kube-proxy flags are not used") && l.contains("--kube-api-qps")),
        "{log}"
    );
    // klog's verbosity 2 is the usual log: no debug lines.
    assert!(!log.contains("DEBUG"), "{log}");
    if read_only_proc_sys {
        let mounts = std::fs::read_to_string(format!("/proc/{second}/mountinfo"))?;
        assert!(
            mounts
                .lines()
                .any(|l| l.split(' ').nth(4) == Some("/proc/sys")
                    && l.split(' ').nth(5).is_some_and(|o| o.starts_with("ro"))),
            "{mounts}"
        );
        assert!(!log.contains("route_localnet"), "{log}");
        assert_eq!(
            netns::exec_in(&node1.netns, "cat", &[established])?.trim(),
            "432000"
        );
        let problem = "cannot set net.netfilter.nf_conntrack_tcp_timeout_established to 86400";
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(problem)),
            "{log}"
        );
        let node: k8s_openapi::api::core::v1::Node =
            Api::all(cluster.client()).get("node-1").await?;
        // (Among the Node's events: on a host whose own table is smaller than
        // kube-proxy's size for its CPUs, one about the table comes first.)
        let uid = node.metadata.uid.unwrap_or_default();
        let note = eventually(
            Duration::from_secs(20),
            "a ConntrackNotTuned event on the Node",
            || async {
                Ok(
                    causeway_tests::controller::events_of(&cluster.client(), &uid)
                        .await?
                        .into_iter()
                        .find(|(type_, reason, note)| {
                            type_ == "Warning"
                                && reason == "ConntrackNotTuned"
                                && note.contains(problem)
                        })
                        .map(|(_, _, note)| note),
                )
            },
        )
        .await?;
        assert!(
            note.contains("--conntrack-tcp-timeout-established=0"),
            "{note}"
        );
    } else {
        assert_eq!(
            netns::exec_in(&node1.netns, "cat", &[established])?.trim(),
            "86400"
        );
    }
    // Liberal TCP tracking is on in the node's namespace, so the new agent's
    // first sync left out the drop of INVALID packets the first one had.
    assert_eq!(
        netns::exec_in(
            &node1.netns,
            "cat",
            &["/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"]
        )?
        .trim(),
        "1"
    );
    let forward = netns::exec_in(&node1.netns, iptables, &["-S", "KUBE-FORWARD"])?;
    assert!(
        forward.contains("KUBE-FORWARD") && !forward.contains("INVALID"),
        "{forward}"
    );
    assert_eq!(
        tally,
        BTreeMap::from([("web-1".to_string(), 600)]),
        "connections during the restart"
    );
    assert!(
        client_done - first_sync > 1.0,
        "the new agent's first sync ({first_sync}) came {:.2} s before the client's end",
        client_done - first_sync
    );

    // With nothing changed and nothing damaged, the periodic checks (every
    // 3 s here) write nothing: the new agent's only full sync is its first.
    std::thread::sleep(Duration::from_secs(7));
    let full_syncs = |metrics: &str| {
        metrics::value(
            metrics,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
        )
        .unwrap_or(0.0)
    };
    let (_, _, quiet) = http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?;
    assert_eq!(full_syncs(&quiet), 1.0, "periodic full syncs:\n{quiet}");

    // Another program flushes our dispatch chain (the canary chains stay):
    // the next periodic check (--sync-period 3s) finds it empty and restores
    // it, with no API change to trigger it. (This comes last: connections
    // attempted while the chain is empty leave un-DNATed SYN_SENT conntrack
    // entries for 2 minutes, and a later connection that reuses one of their
    // source ports would stall.)
    netns::exec_in(
        &node1.netns,
        iptables,
        &["-t", "nat", "-F", "KUBE-SERVICES"],
    )?;
    let flushed = netns::exec_in(
        &node1.netns,
        iptables,
        &["-t", "nat", "-S", "KUBE-SERVICES"],
    )?;
    assert!(
        !flushed.contains("default/web"),
        "the flush took effect: {flushed}"
    );
    wait_for_pods(&client.netns, "tcp", &target, &["web-1"], "after a flush")?;
    let (_, _, metrics) = http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?;
    assert!(
        metrics.contains("causeway_agent_rules_damaged_total 1"),
        "the flush is counted:\n{metrics}"
    );
    // (The sync's durations are recorded just after its rules are live.)
    eventually(
        Duration::from_secs(5),
        "one full sync to repair it",
        || async {
            let (_, _, metrics) = http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?;
            let full = full_syncs(&metrics);
            assert!(full <= 2.0, "more full syncs than the repair:\n{metrics}");
            Ok((full == 2.0).then_some(()))
        },
    )
    .await?;
    netns::exec_in(
        &node1.netns,
        iptables,
        &["-t", "mangle", "-S", "KUBE-PROXY-CANARY"],
    )?;

    // Stop, clean up: exactly what was there before the agent remains.
    netns::run("kill", &["-TERM", &second.to_string()])?;
    std::thread::sleep(Duration::from_millis(500));
    // With legacy, as kube-proxy spells it: `run --cleanup`.
    let cleanup: &[&str] = if backend == "legacy" {
        &["run", "--cleanup", "--iptables-backend", backend]
    } else {
        &["cleanup", "--iptables-backend", backend]
    };
    let counters = || -> Result<String> {
        Ok(
            String::from_utf8_lossy(&netns::exec_in_raw(&node1.netns, "nfacct", &["list"])?.stdout)
                .into_owned(),
        )
    };
    let held = counters()?;
    assert!(
        held.contains("= ct_state_invalid_dropped_pkts;"),
        "the agent's nfacct counters: {held}"
    );
    let report = netns::exec_in(&node1.netns, &agent.display().to_string(), cleanup)?;
    assert!(
        report.contains("chain(s)")
            && report.contains("kept filter/KUBE-FIREWALL")
            && report.contains("kept nfacct counter ct_state_invalid_dropped_pkts")
            && report.contains("kept nfacct counter localhost_nps_accepted_pkts"),
        "{report}"
    );
    // kube-proxy's too, by name: a proxy still running may count into them.
    let kept = counters()?;
    assert!(
        kept.contains("= ct_state_invalid_dropped_pkts;")
            && kept.contains("= localhost_nps_accepted_pkts;"),
        "{kept}"
    );
    let after = rule_lines(&netns::exec_in(
        &node1.netns,
        &format!("{iptables}-save"),
        &[],
    )?);
    assert_eq!(
        after, before,
        "cleanup left exactly the other programs' rules, kubelet's guard included"
    );
    Ok(())
}

/// Sends `count` TCP packets with SYN and FIN both set (a combination
/// conntrack calls INVALID) from `ns`, whose address is `src`, to `dst`.
fn send_syn_fin(
    ns: &str,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    count: u32,
) -> Result<()> {
    const SEND: &str = "import socket, struct, sys\n\
src, dst, count = sys.argv[1], sys.argv[2], int(sys.argv[3])\n\
header = struct.pack('!HHIIBBHHH', 40999, 80, 1, 0, 0x50, 0x03, 64240, 0, 0)\n\
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!BBH', 0, 6, len(header))\n\
total = sum(struct.unpack('!16H', pseudo + header))\n\
while total >> 16:\n    total = (total & 0xffff) + (total >> 16)\n\
header = header[:16] + struct.pack('!H', ~total & 0xffff) + header[18:]\n\
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)\n\
for _ in range(count):\n    raw.sendto(header, (dst, 0))\n";
    netns::exec_in(
        ns,
        "python3",
        &[
            "-c",
            SEND,
            &src.to_string(),
            &dst.to_string(),
            &count.to_string(),
        ],
    )?;
    Ok(())
}

/// One UDP probe from a fixed source port: the pod that answered, or
/// `timeout`/`refused`.
fn udp_from_port(ns: &str, target: &str, source_port: u16) -> Result<String> {
    let echo = workspace_bin("causeway-echo").display().to_string();
    let out = netns::exec_in(
        ns,
        &echo,
        &[
            "probe",
            "--udp",
            target,
            "--source-port",
            &source_port.to_string(),
            "--timeout-ms",
            "700",
        ],
    )?;
    let mut words = out.split_whitespace();
    Ok(match words.next() {
        Some("ok") => words.next().unwrap_or("").to_string(),
        other => other.unwrap_or("").to_string(),
    })
}

/// Probes from `source_port` until `pod` answers (30 s at most).
fn wait_udp_answer(ns: &str, target: &str, source_port: u16, pod: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = udp_from_port(ns, target, source_port)?;
        if got == pod {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: {target} from port {source_port} still answers {got:?}, expected {pod}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_clients_are_moved_off_stale_conntrack_entries() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    let node1 = cluster.node("node-1").clone();
    let agent = workspace_bin("causeway-agent");
    let client = cluster
        .add_pod("node-1", "client", &[("app", "client")])
        .await?;
    let dns_a = cluster
        .add_pod("node-1", "dns-a", &[("app", "dns")])
        .await?;
    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "dns"},
        "spec": {"selector": {"app": "dns"}, "ports": [
            {"name": "dns", "port": 53, "targetPort": 9376, "protocol": "UDP"}]}
    }))?;
    services.create(&PostParams::default(), &service).await?;
    let target = format!("{}:53", cluster_ip(&services, "dns").await?);

    // No agent yet, so no rules: the client's datagrams to the cluster IP are
    // tracked un-DNATed and go nowhere. Without cleanup that entry would keep
    // the client (same source port) blackholed for as long as it sends.
    // (A real node's conntrack is always on, for its CNI's and kubelet's
    // rules; this fresh namespace gets one such rule to switch it on.)
    netns::exec_in(
        &node1.netns,
        "iptables",
        &[
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ],
    )?;
    assert_eq!(udp_from_port(&client.netns, &target, 40053)?, "timeout");
    let tracked = netns::exec_in(&node1.netns, "conntrack", &["-L", "-p", "udp"])?;
    assert!(
        tracked.contains("sport=40053") && tracked.contains("UNREPLIED"),
        "an un-DNATed entry exists: {tracked}"
    );

    // The agent starts: its first sync deletes the un-DNATed entry, so the
    // same client reaches the endpoint right away.
    cluster.spawn_agent("node-1", "agent", &agent, &[])?;
    wait_udp_answer(
        &client.netns,
        &target,
        40053,
        "dns-a",
        "after the first sync",
    )?;

    // The endpoint stops serving, another one takes over: the client's entry
    // to dns-a (which still answers, it is only unready) is deleted and the
    // same source port lands on dns-b.
    cluster
        .add_pod("node-1", "dns-b", &[("app", "dns")])
        .await?;
    cluster
        .set_pod_ready("default", "dns-a", dns_a.ip, cluster.node("node-1"), false)
        .await?;
    wait_udp_answer(
        &client.netns,
        &target,
        40053,
        "dns-b",
        "after dns-a stopped serving",
    )?;
    let (_, _, metrics) = http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?;
    let deleted: u64 = metrics::value(&metrics, "causeway_agent_conntrack_entries_deleted_total")
        .unwrap_or(0.0) as u64;
    assert!(deleted >= 2, "conntrack deletions counted: {deleted}");
    // kube-proxy's name for the count, per family.
    assert_eq!(
        metrics::value(
            &metrics,
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"}"
        ),
        Some(deleted as f64),
        "{metrics}"
    );
    Ok(())
}

/// One TCP probe from `ns`: the pod that answered and the client address it
/// saw.
fn answer_and_source(ns: &str, target: &str) -> Result<(String, IpAddr)> {
    let echo = workspace_bin("causeway-echo").display().to_string();
    let out = netns::exec_in(
        ns,
        &echo,
        &["probe", "--tcp", target, "--timeout-ms", "700"],
    )?;
    match Outcome::parse(&out) {
        Outcome::Answered { pod, source } => Ok((pod, source)),
        other => bail!("{target} from {ns}: {other:?}"),
    }
}

/// The IPv6 half of a dual-stack cluster, end to end: dual-stack pods on two
/// nodes, a dual-stack Service written through the apiserver, and real IPv6
/// packets from a pod, from the node and from outside, while the agent
/// programs ip6tables from what it watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_run_proxies_the_ipv6_side_of_a_dual_stack_service() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2).dual_stack()).await?;
    let node1 = cluster.node("node-1").clone();
    let node1_ip6 = cluster.node_ip6("node-1");
    let external = cluster.external_netns();
    let client = cluster
        .add_pod("node-1", "client", &[("app", "client")])
        .await?;
    let web1 = cluster
        .add_pod("node-1", "web-1", &[("app", "web")])
        .await?;
    let web2 = cluster
        .add_pod("node-2", "web-2", &[("app", "web")])
        .await?;
    let client_ip6 = IpAddr::V6(client.ip6.context("the client has an IPv6 address")?);
    // Pod to pod over IPv6, across the nodes, needs no agent: the harness's
    // routes carry it, and the pod sees the client's own address.
    let web2_ip6 = web2.ip6.context("web-2 has an IPv6 address")?;
    assert_eq!(
        answer_and_source(&client.netns, &format!("[{web2_ip6}]:8080"))?,
        ("web-2".to_string(), client_ip6)
    );

    let services: Api<Service> = Api::namespaced(cluster.client(), "default");
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {
            "type": "NodePort", "selector": {"app": "web"},
            "ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"],
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": 9376, "protocol": "UDP"}]}
    }))?;
    services.create(&PostParams::default(), &service).await?;
    let spec = services.get("web").await?.spec.context("web has a spec")?;
    let cluster_ip6 = spec
        .cluster_ips
        .unwrap_or_default()
        .into_iter()
        .find(|ip| ip.contains(':'))
        .context("web has an IPv6 cluster IP")?;
    let node_port = spec
        .ports
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some("http"))
        .and_then(|p| p.node_port)
        .context("http has a NodePort")?;
    let agent = workspace_bin("causeway-agent");
    let agent_pid = cluster.spawn_agent("node-1", "agent", &agent, &[])?;

    // From a pod on node-1: both endpoints answer at the IPv6 cluster IP, and
    // each sees the pod's own address (no masquerade inside the cluster CIDR).
    let http6 = format!("[{cluster_ip6}]:80");
    wait_for_pods(
        &client.netns,
        "tcp",
        &http6,
        &["web-1", "web-2"],
        "the IPv6 cluster IP from a pod",
    )?;
    let mut answered = BTreeMap::new();
    for _ in 0..20 {
        let (pod, seen) = answer_and_source(&client.netns, &http6)?;
        assert_eq!(seen, client_ip6, "{pod} saw the client pod's address");
        *answered.entry(pod).or_insert(0) += 1;
    }
    assert_eq!(answered.len(), 2, "both endpoints answered: {answered:?}");
    // From node-1 itself.
    wait_for_pods(
        &node1.netns,
        "tcp",
        &http6,
        &["web-1", "web-2"],
        "the IPv6 cluster IP from node-1",
    )?;
    // From outside, at node-1's IPv6 address and the NodePort: both endpoints,
    // each seeing an address of node-1 (masqueraded, so that the answer goes
    // back through node-1), never the client's.
    let nodeport6 = format!("[{node1_ip6}]:{node_port}");
    wait_for_pods(
        &external,
        "tcp",
        &nodeport6,
        &["web-1", "web-2"],
        "the NodePort at node-1's IPv6 address",
    )?;
    let node1_addresses = netns::exec_in(&node1.netns, "ip", &["-6", "-o", "addr", "show"])?;
    for _ in 0..10 {
        let (pod, seen) = answer_and_source(&external, &nodeport6)?;
        assert!(
            node1_addresses.contains(&format!(" {seen}/")),
            "{pod} saw {seen}, not an address of node-1: {node1_addresses}"
        );
    }
    // NodePorts answer on every local address by default, the pod bridge's
    // gateway among them.
    let pod_cidr6 = node1
        .pod_cidr6
        .as_deref()
        .context("node-1 has an IPv6 pod CIDR")?;
    let gateway_nodeport6 = format!("[{}]:{node_port}", pod_cidr6.replace("::/64", "::1"));
    answer_and_source(&node1.netns, &gateway_nodeport6)?;

    // externalTrafficPolicy: Local: node-1 sends outside clients to web-1
    // alone, which sees their own address, and the Service's health check
    // answers on node-1's IPv6 address.
    let health_port = make_etp_local(&services, "web").await?;
    wait_http(
        &external,
        &format!("http://[{node1_ip6}]:{health_port}/"),
        200,
        "\"localEndpoints\": 1",
    )?;
    wait_for_pods(
        &external,
        "tcp",
        &nodeport6,
        &["web-1"],
        "the NodePort with externalTrafficPolicy: Local",
    )?;
    assert_eq!(
        answer_and_source(&external, &nodeport6)?,
        ("web-1".to_string(), IpAddr::V6(cluster.external_ip6()))
    );

    // UDP: a client keeps its source port while the endpoint its conntrack
    // entry points at stops serving. The agent deletes that IPv6 entry, so the
    // next datagram from the same port reaches the other endpoint.
    let dns6 = format!("[{cluster_ip6}]:53");
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let got = udp_from_port(&client.netns, &dns6, 40053)?;
        if got == "web-1" || got == "web-2" {
            break got;
        }
        if Instant::now() > deadline {
            bail!("{dns6} from port 40053 answers {got:?}");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    for _ in 0..3 {
        assert_eq!(
            udp_from_port(&client.netns, &dns6, 40053)?,
            first,
            "conntrack keeps the client on one endpoint"
        );
    }
    let (stopping, other) = if first == "web-1" {
        (&web1, "web-2")
    } else {
        (&web2, "web-1")
    };
    cluster
        .set_pod_ready(
            "default",
            &first,
            stopping.ip,
            cluster.node(&stopping.node),
            false,
        )
        .await?;
    wait_udp_answer(
        &client.netns,
        &dns6,
        40053,
        other,
        "after the first endpoint stopped serving",
    )?;
    let (_, _, metrics) = http_get(&node1.netns, "http://127.0.0.1:10249/metrics")?;
    let deleted = metrics::value(
        &metrics,
        "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv6\"}",
    )
    .unwrap_or(0.0);
    assert!(
        deleted >= 1.0,
        "IPv6 conntrack deletions counted: {metrics}"
    );

    // Restarted with `--nodeport-addresses primary`, the agent takes the
    // Node's IPv6 InternalIP: NodePorts answer there and no longer on the
    // pod bridge's gateway. (Back to externalTrafficPolicy: Cluster first:
    // with Local and no local endpoint left, kube-proxy's rules, and so the
    // agent's, drop NodePort traffic to every local address.)
    let patch = json!({"spec": {"externalTrafficPolicy": "Cluster"}});
    services
        .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    cluster.terminate(agent_pid, Duration::from_secs(10))?;
    cluster.spawn_agent(
        "node-1",
        "agent-primary",
        &agent,
        &["--nodeport-addresses", "primary"],
    )?;
    // Every attempt refused: nothing listens there once the rules are gone.
    wait_for_pods(
        &node1.netns,
        "tcp",
        &gateway_nodeport6,
        &["refused"],
        "the NodePort on the pod bridge's gateway with primary addresses",
    )?;
    wait_for_pods(
        &node1.netns,
        "tcp",
        &nodeport6,
        &[other],
        "the NodePort on node-1's IPv6 InternalIP with primary addresses",
    )?;
    Ok(())
}

/// The nat dispatch buckets (`KUBE-SVC-0BUCKET-<n>`) declared in `save`.
fn dispatch_buckets(save: &str) -> usize {
    save.lines()
        .filter(|l| l.starts_with(":KUBE-SVC-0BUCKET-"))
        .count()
}

/// Waits until namespace `ns` holds `count` dispatch buckets.
async fn wait_for_buckets(ns: &str, count: usize, what: &str) -> Result<()> {
    eventually(Duration::from_secs(60), what, || async {
        Ok((dispatch_buckets(&iptables_save(ns)?) == count).then_some(()))
    })
    .await
}

/// Whether `save` has a rule in `chain` for destination `ip`.
fn has_entry(save: &str, chain: &str, ip: &str) -> bool {
    let (rule, destination) = (format!("-A {chain} "), format!("-d {ip}/32"));
    save.lines()
        .any(|l| l.starts_with(&rule) && l.contains(&destination))
}

/// Creates (or deletes) the selector-less Services `filler-<i>` for `range`.
async fn fillers(
    services: &Api<Service>,
    range: std::ops::Range<usize>,
    create: bool,
) -> Result<()> {
    use futures::StreamExt as _;
    let results = futures::stream::iter(range)
        .map(|i| {
            let services = services.clone();
            async move {
                let name = format!("filler-{i}");
                if create {
                    let svc: Service = serde_json::from_value(json!({
                        "apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": name},
                        "spec": {"ports": [{"port": 80, "protocol": "TCP"}]}
                    }))?;
                    services.create(&PostParams::default(), &svc).await?;
                } else {
                    services.delete(&name, &DeleteParams::default()).await?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    results.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_switches_to_dispatch_buckets_at_1000_addresses_and_back_below_500() -> Result<()> {
    let AgentAndWeb {
        cluster,
        node1: node,
        agent_pid: first,
        client: client_pod,
        services,
        ip,
        web: target,
    } = agent_and_web("10m").await?;
    let agent = workspace_bin("causeway-agent");
    assert_eq!(dispatch_buckets(&iptables_save(&node.netns)?), 0);

    // web, the kubernetes Service and 998 more: 1 000 addresses.
    fillers(&services, 0..998, true).await?;
    wait_for_buckets(
        &node.netns,
        64,
        "the agent to switch to 64 dispatch buckets",
    )
    .await?;
    let save = iptables_save(&node.netns)?;
    let bucket = format!(
        "KUBE-SVC-0BUCKET-{:02}",
        ip.parse::<std::net::Ipv4Addr>()?.octets()[3] % 64
    );
    assert!(
        has_entry(&save, &bucket, &ip),
        "web's entry is not in {bucket}:\n{save}"
    );
    wait_for_pods(&client_pod.netns, "tcp", &target, &["web-1"], "bucketed")?;

    // Down to 599 addresses: still bucketed (no flapping at the threshold) …
    fillers(&services, 597..998, false).await?;
    let save = eventually(
        Duration::from_secs(60),
        "the agent to drop the deleted Services",
        || async {
            // Each filler has one rule: its REJECT (it has no endpoints).
            let save = iptables_save(&node.netns)?;
            let left = save
                .lines()
                .filter(|l| l.contains("default/filler-"))
                .count();
            Ok((left == 597).then_some(save))
        },
    )
    .await?;
    assert_eq!(dispatch_buckets(&save), 64, "{save}");
    // … also across a restart: the new agent keeps the layout it finds …
    netns::run("kill", &["-TERM", &first.to_string()])?;
    cluster.spawn_agent("node-1", "agent-2", &agent, &["--sync-period", "10m"])?;
    let log = cluster.dir().join("agent-2.log");
    eventually(
        Duration::from_secs(30),
        "the restarted agent's first sync",
        || async {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text.contains("rewritten_service_ports").then_some(()))
        },
    )
    .await?;
    let save = iptables_save(&node.netns)?;
    assert_eq!(dispatch_buckets(&save), 64, "after the restart:\n{save}");
    // … and below 500 goes back to kube-proxy's flat layout, buckets deleted.
    fillers(&services, 400..597, false).await?;
    wait_for_buckets(&node.netns, 0, "the agent to go back to the flat layout").await?;
    let save = iptables_save(&node.netns)?;
    assert!(
        has_entry(&save, "KUBE-SERVICES", &ip),
        "web's entry is not back in KUBE-SERVICES:\n{save}"
    );
    wait_for_pods(&client_pod.netns, "tcp", &target, &["web-1"], "flat again")?;
    Ok(())
}

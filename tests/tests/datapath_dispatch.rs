//! Large rulesets dispatch through buckets (`KUBE-SVC-0BUCKET-<n>`, chosen by
//! the low six bits of the destination), proven with real packets: with 1 100
//! other Services rendered beside them, a ClusterIP, an external IP, a
//! load-balancer IP, a NodePort and a Service without endpoints behave exactly
//! as in a small ruleset, with both backends and both IP families; `trace`
//! agrees with every probe and walks the bucket netfilter holds each
//! address's entry in.

use causeway_tests::datapath::{
    AgentFlags, Backend, DataPath, EchoPod, EndpointSlice, Family, Manifests, NODE_IP, Origin,
    Placement, PodNetwork, Proto, Service, ServicePort, v6,
};

const ECHO: &str = env!("CARGO_BIN_EXE_causeway-echo");

/// More Services than the agent's threshold for buckets (1 000 addresses),
/// each with one endpoint on the other node, so every bucket holds entries.
const FILLER: usize = 1100;

fn filler(family: Family) -> String {
    let mut docs = Vec::new();
    for i in 0..FILLER {
        let (cluster_ip, endpoint, address_type) = match family {
            Family::V4 => (
                format!("100.126.{}.{}", i / 250, i % 250 + 1),
                format!("100.96.1.{}", i % 200 + 20),
                "IPv4",
            ),
            Family::V6 => (
                format!("2001:db8:126::{:x}", i + 1),
                format!("2001:db8:96:1::{:x}", i % 200 + 20),
                "IPv6",
            ),
        };
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: filler-{i}, namespace: fill}}\n\
             spec:\n  clusterIP: {cluster_ip}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: filler-{i}-1, namespace: fill, labels: {{kubernetes.io/service-name: filler-{i}}}}}\n\
             addressType: {address_type}\nports: [{{name: http, port: 8080}}]\n\
             endpoints:\n- {{addresses: [\"{endpoint}\"], nodeName: node-b}}\n"
        ));
    }
    docs.join("---\n")
}

/// The nat rules of chain `chain` in `save` output.
fn rules_of<'a>(save: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    let mut table = "";
    save.lines()
        .filter(|line| {
            if let Some(name) = line.strip_prefix('*') {
                table = name;
            }
            table == "nat" && line.starts_with(&prefix)
        })
        .collect()
}

fn bucketed(family: Family, backend: Backend, network: PodNetwork) {
    let six = family == Family::V6;
    let addr = |v4: &str, v6: &str| -> String { if six { v6.to_string() } else { v4.to_string() } };
    let target = |ip: &str, port: u16| -> String {
        if six {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    let mut dp = DataPath::new(ECHO, network).expect("building the packet-test namespaces");
    let a = dp.add_pod("big-a", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("big-r", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    // Low six bits: cluster IP 10 (0x10 = 16 for IPv6), load balancer 10,
    // external IP 20 (0x20 = 32): three different buckets.
    let cluster_ip = addr("100.127.0.10", "2001:db8:127::10");
    let ingress_ip = addr("203.0.113.10", "2001:db8:113::10");
    let external_ip = addr("203.0.113.20", "2001:db8:113::20");
    let empty_ip = addr("100.127.0.11", "2001:db8:127::11");
    let svc = Service::load_balancer("big", &cluster_ip)
        .port(ServicePort::tcp(80, 8080).named("http").node_port(30095))
        .ingress_ip(&ingress_ip)
        .external_ip(&external_ip);
    let endpoint = |pod: &EchoPod| {
        if six { pod.ready6() } else { pod.ready() }
    };
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(Some("http"), 8080, "TCP")
        .endpoint(endpoint(&a))
        .endpoint(endpoint(&r));
    let empty = Service::cluster_ip("big-empty", &empty_ip).port(ServicePort::tcp(80, 8080));
    dp.focus("default/big");
    let flags = match family {
        Family::V4 => AgentFlags::default(),
        Family::V6 => AgentFlags::ipv6(),
    };
    dp.apply(
        &Manifests::new()
            .service(&svc)
            .slice(&slice)
            .service(&empty)
            .yaml(&filler(family)),
        &AgentFlags { backend, ..flags },
    )
    .expect("render and load");

    // The layout netfilter holds: 64 bucket jumps then the NodePort
    // catch-all; each of the Service's addresses in its own bucket.
    let save = dp.saved_rules(family, backend);
    let top = rules_of(&save, "KUBE-SERVICES");
    assert_eq!(top.len(), 65, "{top:#?}");
    assert!(top[64].contains("-j KUBE-NODEPORTS"), "{}", top[64]);
    let (cluster_bucket, lb_bucket, external_bucket) = if six {
        (
            "KUBE-SVC-0BUCKET-16",
            "KUBE-SVC-0BUCKET-16",
            "KUBE-SVC-0BUCKET-32",
        )
    } else {
        (
            "KUBE-SVC-0BUCKET-10",
            "KUBE-SVC-0BUCKET-10",
            "KUBE-SVC-0BUCKET-20",
        )
    };
    for (bucket, ip) in [
        (cluster_bucket, &cluster_ip),
        (lb_bucket, &ingress_ip),
        (external_bucket, &external_ip),
    ] {
        let entries = rules_of(&save, bucket);
        assert!(
            entries.iter().any(|l| l.contains(&format!("-d {ip}/"))),
            "{ip} has no entry in {bucket}: {entries:#?}"
        );
        assert!(
            entries.len() < 40,
            "{bucket} holds {} entries; the buckets should split ~1 100 evenly",
            entries.len()
        );
    }

    let pods = ["big-a", "big-r"];
    let (client_origin, node_ip) = if six {
        (Origin::client6(), v6::NODE_IP)
    } else {
        (Origin::client(), NODE_IP)
    };
    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        &target(&cluster_ip, 80),
        30,
        &pods,
    );
    dp.expect_spread(
        &Origin::Node,
        Proto::Tcp,
        &target(&cluster_ip, 80),
        20,
        &pods,
    );
    for ip in [&ingress_ip, &external_ip] {
        dp.expect_spread(&client_origin, Proto::Tcp, &target(ip, 80), 30, &pods);
    }
    dp.expect_spread(
        &client_origin,
        Proto::Tcp,
        &target(node_ip, 30095),
        30,
        &pods,
    );
    // `trace` (already held to each answer above) walks the bucket
    // netfilter holds the entry in.
    for (origin, ip, bucket) in [
        (client.origin(), &cluster_ip, cluster_bucket),
        (client_origin.clone(), &ingress_ip, lb_bucket),
        (client_origin.clone(), &external_ip, external_bucket),
    ] {
        let traced = dp
            .trace(&origin, Proto::Tcp, &target(ip, 80))
            .expect("trace");
        assert!(
            traced
                .trace
                .steps
                .iter()
                .any(|s| s.table == "nat" && s.chain == bucket),
            "{ip}: the trace does not pass {bucket}:\n{}",
            traced.trace
        );
    }
    dp.expect_refused(&client.origin(), Proto::Tcp, &target(&empty_ip, 80));
    // A port the Service does not have passes its bucket untouched.
    dp.expect_no_answer(&client.origin(), Proto::Tcp, &target(&cluster_ip, 81));
}

#[test]
fn a_large_ipv4_ruleset_dispatches_through_buckets_with_nft() {
    bucketed(Family::V4, Backend::Nft, PodNetwork::Bridge);
}

#[test]
fn a_large_ipv4_ruleset_dispatches_through_buckets_with_legacy() {
    bucketed(Family::V4, Backend::Legacy, PodNetwork::PointToPoint);
}

#[test]
fn a_large_ipv6_ruleset_dispatches_through_buckets_with_nft() {
    bucketed(Family::V6, Backend::Nft, PodNetwork::Bridge);
}

#[test]
fn a_large_ipv6_ruleset_dispatches_through_buckets_with_legacy() {
    bucketed(Family::V6, Backend::Legacy, PodNetwork::PointToPoint);
}

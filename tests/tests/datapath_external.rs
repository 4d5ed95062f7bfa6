//! Traffic from outside the Service's ClusterIP, proven with real packets (SPEC
//! 2.1): NodePorts on node addresses and on 127.0.0.1, `--nodeport-addresses`,
//! LoadBalancer ingress IPs (and `ipMode: Proxy`), externalIPs, REJECT without
//! endpoints, externalTrafficPolicy and internalTrafficPolicy Local, and
//! loadBalancerSourceRanges.

use std::net::IpAddr;

use causeway_tests::datapath::{
    AgentFlags, Backend, CLIENT_IP, CLIENT_IP_OTHER, DataPath, EndpointSlice, Family, Manifests,
    NODE_IP, NODE_IP_SECONDARY, Origin, POD_GATEWAY, Placement, PodNetwork, Proto, Service,
    ServicePort,
};

const ECHO: &str = env!("CARGO_BIN_EXE_causeway-echo");

fn fixture() -> DataPath {
    DataPath::new(ECHO, PodNetwork::Bridge).expect("building the packet-test namespaces")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The addresses node-a can masquerade to: towards its pods, towards node-b.
fn node_addresses() -> [IpAddr; 2] {
    [ip(POD_GATEWAY), ip(NODE_IP)]
}

#[test]
fn node_ports_answer_on_every_node_address_and_masquerade_external_clients() {
    let mut dp = fixture();
    let a = dp.add_pod("np-a", Placement::Local, &[8080, 5353]).unwrap();
    let r = dp
        .add_pod("np-r", Placement::Remote, &[8080, 5353])
        .unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::node_port("np", "100.127.1.10")
        .port(ServicePort::tcp(80, 8080).named("http").node_port(30080))
        .port(ServicePort::udp(53, 5353).named("dns").node_port(30053));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(Some("http"), 8080, "TCP")
        .port(Some("dns"), 5353, "UDP")
        .endpoint(a.ready())
        .endpoint(r.ready());
    dp.focus("default/np");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    let pods = ["np-a", "np-r"];
    for target in [
        format!("{NODE_IP}:30080"),
        format!("{NODE_IP_SECONDARY}:30080"),
    ] {
        let seen = dp.expect_answers(&Origin::client(), Proto::Tcp, &target, 30, &pods);
        // ETP=Cluster: the client's address is hidden behind the node's.
        assert!(
            seen.iter().all(|(_, s)| node_addresses().contains(s)),
            "client → {target}: sources seen {seen:?}, expected node-a's addresses\nrules involved:\n{}",
            dp.explain(&target)
        );
        let pods_seen: std::collections::BTreeSet<_> =
            seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            pods_seen.len(),
            2,
            "client → {target}: only {pods_seen:?} answered in 30 tries"
        );
    }
    dp.expect_spread(
        &Origin::client(),
        Proto::Udp,
        &format!("{NODE_IP}:30053"),
        30,
        &pods,
    );
    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        &format!("{NODE_IP}:30080"),
        30,
        &pods,
    );
    dp.expect_spread(
        &Origin::Node,
        Proto::Tcp,
        &format!("{NODE_IP}:30080"),
        30,
        &pods,
    );
    // The NodePort is a port of the node, not of the ClusterIP.
    dp.expect_no_answer(&client.origin(), Proto::Tcp, "100.127.1.10:30080");
}

#[test]
fn localhost_node_ports_answer_on_127_0_0_1_unless_disabled() {
    let mut dp = fixture();
    let a = dp.add_pod("lh", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("lh-r", Placement::Remote, &[8080]).unwrap();
    let svc =
        Service::node_port("lh", "100.127.1.20").port(ServicePort::tcp(80, 8080).node_port(30081));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready())
        .endpoint(r.ready());
    let manifests = Manifests::new().service(&svc).slice(&slice);
    dp.focus("default/lh");

    dp.apply(&manifests, &AgentFlags::default())
        .expect("render and load");
    // 127.0.0.1 cannot leave the node: the endpoint must see a node address.
    let seen = dp.expect_answers(
        &Origin::Node,
        Proto::Tcp,
        "127.0.0.1:30081",
        20,
        &["lh", "lh-r"],
    );
    assert!(
        seen.iter().all(|(_, s)| node_addresses().contains(s)),
        "127.0.0.1:30081: sources seen {seen:?}\nrules involved:\n{}",
        dp.explain("127.0.0.1:30081")
    );

    dp.clear_rules(Family::V4, Backend::Nft).unwrap();
    dp.apply(
        &manifests,
        &AgentFlags::default().localhost_nodeports(false),
    )
    .expect("render and load with --localhost-nodeports=false");
    // Nothing listens on node-a's port 30081: the kernel refuses.
    dp.expect_refused(&Origin::Node, Proto::Tcp, "127.0.0.1:30081");
    // The NodePort still answers on the node's real address. The Service is
    // externalTrafficPolicy: Cluster with one local and one remote endpoint, so
    // (as with kube-proxy) each connection lands on either of them at random;
    // expecting only the local one failed half the time.
    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30081"),
        20,
        &["lh", "lh-r"],
    );
}

#[test]
fn nodeport_addresses_limit_where_node_ports_answer() {
    let mut dp = fixture();
    let a = dp.add_pod("npa", Placement::Local, &[8080]).unwrap();
    let svc =
        Service::node_port("npa", "100.127.1.30").port(ServicePort::tcp(80, 8080).node_port(30082));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready());
    let manifests = Manifests::new().service(&svc).slice(&slice);
    dp.focus("default/npa");

    dp.apply(
        &manifests,
        &AgentFlags::default().nodeport_addresses(&["primary"]),
    )
    .expect("render and load with --nodeport-addresses primary");
    dp.expect_answer(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30082"),
        "npa",
    );
    dp.expect_refused(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP_SECONDARY}:30082"),
    );

    dp.clear_rules(Family::V4, Backend::Nft).unwrap();
    dp.apply(
        &manifests,
        &AgentFlags::default().nodeport_addresses(&[&format!("{NODE_IP_SECONDARY}/32")]),
    )
    .expect("render and load with --nodeport-addresses <cidr>");
    dp.expect_answer(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP_SECONDARY}:30082"),
        "npa",
    );
    dp.expect_refused(&Origin::client(), Proto::Tcp, &format!("{NODE_IP}:30082"));
}

#[test]
fn load_balancer_ingress_ips_and_external_ips_reach_the_endpoints() {
    let mut dp = fixture();
    let a = dp.add_pod("lb-a", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("lb-r", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let lb = Service::load_balancer("lb", "100.127.1.40")
        .port(ServicePort::tcp(80, 8080).node_port(30083))
        .ingress_ip("203.0.113.10");
    // ipMode Proxy: the load balancer proxies, so the node must not short-cut the IP.
    let proxied = Service::load_balancer("proxied", "100.127.1.41")
        .port(ServicePort::tcp(80, 8080).node_port(30084))
        .ingress_ip_mode("203.0.113.11", "Proxy");
    let ext = Service::cluster_ip("ext", "100.127.1.42")
        .port(ServicePort::tcp(80, 8080))
        .external_ip("203.0.113.20");
    let mut manifests = Manifests::new();
    for svc in [&lb, &proxied, &ext] {
        let slice = EndpointSlice::for_service(svc, "1")
            .port(None, 8080, "TCP")
            .endpoint(a.ready())
            .endpoint(r.ready());
        manifests = manifests.service(svc).slice(&slice);
        dp.focus(&svc.key());
    }
    dp.apply(&manifests, &AgentFlags::default())
        .expect("render and load");

    let pods = ["lb-a", "lb-r"];
    for target in ["203.0.113.10:80", "203.0.113.20:80"] {
        let seen = dp.expect_answers(&Origin::client(), Proto::Tcp, target, 30, &pods);
        assert!(
            seen.iter().all(|(_, s)| node_addresses().contains(s)),
            "client → {target}: sources seen {seen:?}, expected node-a's addresses\nrules involved:\n{}",
            dp.explain(target)
        );
        dp.expect_spread(&client.origin(), Proto::Tcp, target, 30, &pods);
        dp.expect_spread(&Origin::Node, Proto::Tcp, target, 30, &pods);
    }
    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30083"),
        30,
        &pods,
    );
    dp.expect_no_answer(&Origin::client(), Proto::Tcp, "203.0.113.11:80");
    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30084"),
        30,
        &pods,
    );
}

#[test]
fn without_endpoints_node_ports_load_balancer_ips_and_external_ips_are_refused() {
    let mut dp = fixture();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::load_balancer("void", "100.127.1.50")
        .port(ServicePort::tcp(80, 8080).named("http").node_port(30085))
        .port(ServicePort::udp(53, 5353).named("dns").node_port(30086))
        .ingress_ip("203.0.113.30")
        .external_ip("203.0.113.31");
    dp.focus("default/void");
    dp.apply(&Manifests::new().service(&svc), &AgentFlags::default())
        .expect("render and load");

    for target in [
        "100.127.1.50:80".to_string(),
        format!("{NODE_IP}:30085"),
        "203.0.113.30:80".into(),
        "203.0.113.31:80".into(),
    ] {
        dp.expect_refused(&Origin::client(), Proto::Tcp, &target);
    }
    dp.expect_refused(&Origin::client(), Proto::Udp, &format!("{NODE_IP}:30086"));
    dp.expect_refused(&Origin::client(), Proto::Udp, "203.0.113.30:53");
    dp.expect_refused(&client.origin(), Proto::Tcp, "100.127.1.50:80");
    dp.expect_refused(&client.origin(), Proto::Tcp, "203.0.113.30:80");
    dp.expect_refused(&Origin::Node, Proto::Tcp, &format!("{NODE_IP}:30085"));
}

#[test]
fn external_traffic_policy_local_preserves_the_client_ip_and_uses_only_local_endpoints() {
    let mut dp = fixture();
    let a = dp.add_pod("etp-a", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("etp-r", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::load_balancer("etp", "100.127.1.60")
        .port(ServicePort::tcp(80, 8080).node_port(30087))
        .ingress_ip("203.0.113.40")
        .external_ip("203.0.113.41")
        .etp_local();
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready())
        .endpoint(r.ready());
    dp.focus("default/etp");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    for target in [
        format!("{NODE_IP}:30087"),
        "203.0.113.40:80".into(),
        "203.0.113.41:80".into(),
    ] {
        // External clients: only the local endpoint, and it sees the real client.
        let seen = dp.expect_answers(&Origin::client(), Proto::Tcp, &target, 20, &["etp-a"]);
        assert_eq!(
            seen.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
            vec![ip(CLIENT_IP)],
            "client → {target}: ETP=Local must preserve the client IP\nrules involved:\n{}",
            dp.explain(&target)
        );
        let seen = dp.expect_answers(
            &Origin::Client(CLIENT_IP_OTHER.into()),
            Proto::Tcp,
            &target,
            5,
            &["etp-a"],
        );
        assert!(
            seen.iter().all(|(_, s)| *s == ip(CLIENT_IP_OTHER)),
            "{seen:?}"
        );
        // Pods and the node itself reach every endpoint.
        dp.expect_spread(
            &client.origin(),
            Proto::Tcp,
            &target,
            30,
            &["etp-a", "etp-r"],
        );
        dp.expect_spread(&Origin::Node, Proto::Tcp, &target, 30, &["etp-a", "etp-r"]);
    }
    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.1.60:80",
        30,
        &["etp-a", "etp-r"],
    );
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops_only_external_traffic() {
    let mut dp = fixture();
    let r = dp.add_pod("far", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::load_balancer("far", "100.127.1.70")
        .port(ServicePort::tcp(80, 8080).node_port(30088))
        .ingress_ip("203.0.113.42")
        .etp_local();
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(None, 8080, "TCP")
        .endpoint(r.ready());
    dp.focus("default/far");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    // DROP, not REJECT: the load balancer's health check must fail, not the client.
    dp.expect_timeout(&Origin::client(), Proto::Tcp, &format!("{NODE_IP}:30088"));
    dp.expect_timeout(&Origin::client(), Proto::Tcp, "203.0.113.42:80");
    dp.expect_answer_from(
        &client.origin(),
        Proto::Tcp,
        &format!("{NODE_IP}:30088"),
        "far",
        &client.ip,
    );
    dp.expect_answer(&client.origin(), Proto::Tcp, "203.0.113.42:80", "far");
    dp.expect_answer(
        &Origin::Node,
        Proto::Tcp,
        &format!("{NODE_IP}:30088"),
        "far",
    );
    dp.expect_answer(&client.origin(), Proto::Tcp, "100.127.1.70:80", "far");
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_the_node() {
    let mut dp = fixture();
    let a = dp.add_pod("itp-a", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("itp-r", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let both = Service::node_port("itp", "100.127.1.80")
        .port(ServicePort::tcp(80, 8080).node_port(30089))
        .itp_local();
    let both_slice = EndpointSlice::for_service(&both, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready())
        .endpoint(r.ready());
    let remote_only = Service::node_port("itp-far", "100.127.1.81")
        .port(ServicePort::tcp(80, 8080).node_port(30090))
        .itp_local();
    let remote_slice = EndpointSlice::for_service(&remote_only, "1")
        .port(None, 8080, "TCP")
        .endpoint(r.ready());
    dp.focus("default/itp");
    dp.apply(
        &Manifests::new()
            .service(&both)
            .slice(&both_slice)
            .service(&remote_only)
            .slice(&remote_slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.1.80:80",
        30,
        &["itp-a"],
    );
    dp.expect_spread(&Origin::Node, Proto::Tcp, "100.127.1.80:80", 10, &["itp-a"]);
    dp.expect_timeout(&client.origin(), Proto::Tcp, "100.127.1.81:80");
    // The policy is about ClusterIP traffic: external traffic still uses every endpoint.
    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30089"),
        30,
        &["itp-a", "itp-r"],
    );
    dp.expect_answer(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30090"),
        "itp-r",
    );
}

#[test]
fn load_balancer_source_ranges_admit_only_listed_clients_but_not_at_the_node_port() {
    let mut dp = fixture();
    let a = dp.add_pod("ranged", Placement::Local, &[8080]).unwrap();
    let svc = Service::load_balancer("ranged", "100.127.1.90")
        .port(ServicePort::tcp(80, 8080).node_port(30091))
        .ingress_ip("203.0.113.50")
        .source_range(&format!("{CLIENT_IP}/32"));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready());
    dp.focus("default/ranged");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    dp.expect_answer(&Origin::client(), Proto::Tcp, "203.0.113.50:80", "ranged");
    dp.expect_timeout(
        &Origin::Client(CLIENT_IP_OTHER.into()),
        Proto::Tcp,
        "203.0.113.50:80",
    );
    // kube-proxy semantics: the NodePort is not restricted.
    dp.expect_answer(
        &Origin::Client(CLIENT_IP_OTHER.into()),
        Proto::Tcp,
        &format!("{NODE_IP}:30091"),
        "ranged",
    );
}

//! IPv6: the same data path rendered with `--ip-family 6` and loaded with
//! `ip6tables-restore`, proven with real IPv6 packets.

use causeway_tests::datapath::{
    AgentFlags, Backend, DataPath, EndpointSlice, Manifests, Origin, Placement, PodNetwork, Proto,
    Service, ServicePort, v6,
};

const ECHO: &str = env!("CARGO_BIN_EXE_causeway-echo");

fn ipv6_services(network: PodNetwork, backend: Backend) {
    let mut dp = DataPath::new(ECHO, network).expect("building the packet-test namespaces");
    let a = dp.add_pod("six-a", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("six-r", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::load_balancer("six", "2001:db8:127::10")
        .port(ServicePort::tcp(80, 8080).named("http").node_port(30093))
        .port(ServicePort::udp(53, 8080).named("dns").node_port(30094))
        .ingress_ip("2001:db8:113::10");
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(Some("http"), 8080, "TCP")
        .port(Some("dns"), 8080, "UDP")
        .endpoint(a.ready6())
        .endpoint(r.ready6());
    let empty =
        Service::cluster_ip("six-empty", "2001:db8:127::11").port(ServicePort::tcp(80, 8080));
    let solo = Service::cluster_ip("six-solo", "2001:db8:127::12").port(ServicePort::tcp(80, 8080));
    let solo_slice = EndpointSlice::for_service(&solo, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready6());
    dp.focus("default/six");
    dp.apply(
        &Manifests::new()
            .service(&svc)
            .slice(&slice)
            .service(&empty)
            .service(&solo)
            .slice(&solo_slice),
        &AgentFlags {
            backend,
            ..AgentFlags::ipv6()
        },
    )
    .expect("render with --ip-family 6 and load with ip6tables-restore");

    let pods = ["six-a", "six-r"];
    let vip = "[2001:db8:127::10]:80";
    let seen = dp.expect_answers(&client.origin(), Proto::Tcp, vip, 20, &pods);
    assert!(
        seen.iter().all(|(_, s)| s.to_string() == client.ip6),
        "pod → {vip}: sources seen {seen:?}, expected the pod's own {}",
        client.ip6
    );
    dp.expect_spread(
        &client.origin(),
        Proto::Udp,
        "[2001:db8:127::10]:53",
        30,
        &pods,
    );
    let node_port = format!("[{}]:30093", v6::NODE_IP);
    let seen = dp.expect_answers(&Origin::client6(), Proto::Tcp, &node_port, 30, &pods);
    assert!(
        seen.iter().all(|(_, s)| s.to_string() != v6::CLIENT_IP),
        "client → {node_port}: ETP=Cluster must masquerade, saw {seen:?}\nrules involved:\n{}",
        dp.explain(&node_port)
    );
    dp.expect_spread(
        &Origin::client6(),
        Proto::Tcp,
        "[2001:db8:113::10]:80",
        30,
        &pods,
    );
    dp.expect_refused(&client.origin(), Proto::Tcp, "[2001:db8:127::11]:80");
    // Hairpin over IPv6.
    dp.expect_answer_from(
        &a.origin(),
        Proto::Tcp,
        "[2001:db8:127::12]:80",
        "six-a",
        v6::POD_GATEWAY,
    );
}

#[test]
fn ipv6_services_work_with_ip6tables_nft() {
    ipv6_services(PodNetwork::Bridge, Backend::Nft);
}

#[test]
fn ipv6_services_work_with_ip6tables_legacy_on_ptp_veths() {
    ipv6_services(PodNetwork::PointToPoint, Backend::Legacy);
}

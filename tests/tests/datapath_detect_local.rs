//! `--detect-local-mode`, proven with real packets: which traffic counts as
//! "from a local pod" decides whether ClusterIP traffic is masqueraded and
//! whether pods get the externalTrafficPolicy=Local short-circuit.
//!
//! Every mode gets the same two Services: `plain` (ClusterIP, endpoint on
//! node-a) and `web` (NodePort, externalTrafficPolicy Local, endpoint only on
//! node-b) and the same four probes:
//!
//! | mode | pod → plain | client → plain | node-b pod → plain | pod → web NodePort |
//! |---|---|---|---|---|
//! | ClusterCIDR | pod IP | masqueraded | pod IP (in cluster CIDR) | served |
//! | NodeCIDR | pod IP | masqueraded | masqueraded | served |
//! | BridgeInterface | pod IP | masqueraded | masqueraded | served |
//! | InterfaceNamePrefix | pod IP | masqueraded | masqueraded | served |
//! | None | pod IP | client IP | pod IP | dropped (treated as external) |

use causeway_tests::datapath::{
    AgentFlags, CLIENT_IP, DataPath, EndpointSlice, Manifests, NODE_IP, Origin, POD_GATEWAY,
    Placement, PodNetwork, Proto, Service, ServicePort,
};

const ECHO: &str = env!("CARGO_BIN_EXE_causeway-echo");

/// What the four probes must show for one mode.
struct Expect {
    /// Source the `plain` endpoint sees from the external client.
    client_seen_as: &'static str,
    /// Whether a pod on node-b is "local" (not masqueraded).
    remote_pod_is_local: bool,
    /// Whether node-a's pods get the ETP=Local short-circuit.
    pods_short_circuit: bool,
}

fn check_mode(network: PodNetwork, flags: AgentFlags, expect: Expect) {
    let mut dp = DataPath::new(ECHO, network).expect("building the packet-test namespaces");
    let a = dp.add_pod("plain-a", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("web-r", Placement::Remote, &[8080]).unwrap();
    let pod = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let far_pod = dp.add_pod("far-client", Placement::Remote, &[9]).unwrap();
    let plain = Service::cluster_ip("plain", "100.127.2.10").port(ServicePort::tcp(80, 8080));
    let plain_slice = EndpointSlice::for_service(&plain, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready());
    let web = Service::node_port("web", "100.127.2.11")
        .port(ServicePort::tcp(80, 8080).node_port(30092))
        .etp_local();
    let web_slice = EndpointSlice::for_service(&web, "1")
        .port(None, 8080, "TCP")
        .endpoint(r.ready());
    dp.focus("default/plain");
    dp.focus("default/web");
    dp.focus("KUBE-MARK-MASQ");
    dp.apply(
        &Manifests::new()
            .service(&plain)
            .slice(&plain_slice)
            .service(&web)
            .slice(&web_slice),
        &flags,
    )
    .expect("render and load");

    dp.expect_answer_from(
        &pod.origin(),
        Proto::Tcp,
        "100.127.2.10:80",
        "plain-a",
        &pod.ip,
    );
    dp.expect_answer_from(
        &Origin::client(),
        Proto::Tcp,
        "100.127.2.10:80",
        "plain-a",
        expect.client_seen_as,
    );
    let far_seen_as = if expect.remote_pod_is_local {
        far_pod.ip.as_str()
    } else {
        POD_GATEWAY
    };
    dp.expect_answer_from(
        &far_pod.origin(),
        Proto::Tcp,
        "100.127.2.10:80",
        "plain-a",
        far_seen_as,
    );
    let node_port = format!("{NODE_IP}:30092");
    if expect.pods_short_circuit {
        dp.expect_answer_from(&pod.origin(), Proto::Tcp, &node_port, "web-r", &pod.ip);
    } else {
        dp.expect_timeout(&pod.origin(), Proto::Tcp, &node_port);
    }
    // Whatever the mode, the external client is external.
    dp.expect_timeout(&Origin::client(), Proto::Tcp, &node_port);
}

#[test]
fn cluster_cidr_mode_treats_every_pod_address_as_local() {
    check_mode(
        PodNetwork::Bridge,
        AgentFlags::default().detect_local_mode("ClusterCIDR"),
        Expect {
            client_seen_as: POD_GATEWAY,
            remote_pod_is_local: true,
            pods_short_circuit: true,
        },
    );
}

#[test]
fn node_cidr_mode_treats_only_this_nodes_pods_as_local() {
    check_mode(
        PodNetwork::Bridge,
        AgentFlags::default().detect_local_mode("NodeCIDR"),
        Expect {
            client_seen_as: POD_GATEWAY,
            remote_pod_is_local: false,
            pods_short_circuit: true,
        },
    );
}

#[test]
fn bridge_interface_mode_treats_traffic_from_cbr0_as_local() {
    check_mode(
        PodNetwork::Bridge,
        AgentFlags::default().detect_local_mode("BridgeInterface"),
        Expect {
            client_seen_as: POD_GATEWAY,
            remote_pod_is_local: false,
            pods_short_circuit: true,
        },
    );
}

#[test]
fn interface_name_prefix_mode_treats_traffic_from_veth_interfaces_as_local() {
    check_mode(
        PodNetwork::PointToPoint,
        AgentFlags::default().detect_local_mode("InterfaceNamePrefix"),
        Expect {
            client_seen_as: POD_GATEWAY,
            remote_pod_is_local: false,
            pods_short_circuit: true,
        },
    );
}

#[test]
fn none_mode_masquerades_nothing_and_gives_pods_no_short_circuit() {
    check_mode(
        PodNetwork::Bridge,
        AgentFlags::default().detect_local_mode("None"),
        Expect {
            client_seen_as: CLIENT_IP,
            remote_pod_is_local: true,
            pods_short_circuit: false,
        },
    );
}

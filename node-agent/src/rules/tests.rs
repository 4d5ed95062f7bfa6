use super::check::check;
use super::*;
use crate::addr::parse_cidr;
use crate::model::fixtures::{EndpointBuilder as Ep, NodeBuilder, ServiceBuilder, SliceBuilder};
use crate::model::{self, NodeInfo};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

fn node(family: IpFamily) -> NodeInfo {
    let builder = match family {
        IpFamily::V4 => NodeBuilder::new("node-a")
            .internal_ip("192.168.0.10")
            .pod_cidrs(&["10.244.1.0/24"]),
        IpFamily::V6 => NodeBuilder::new("node-a")
            .internal_ip("fd00::10")
            .pod_cidrs(&["fd00:244:1::/64"]),
    };
    NodeInfo::from_node(&builder.build(), &mut Vec::new())
}

fn config() -> RenderConfig {
    RenderConfig {
        local_traffic: LocalTraffic::Cidr(parse_cidr("10.244.0.0/16").unwrap()),
        node_ips: vec!["192.168.0.10".parse().unwrap()],
        ..RenderConfig::new(IpFamily::V4)
    }
}

/// Renders with every jump rule, and asserts the payload is consistent.
fn render_with(services: &[Service], slices: &[EndpointSlice], config: &RenderConfig) -> Payload {
    let (model, issues) = model::build(services, slices, &node(config.family), config.family);
    assert!(issues.is_empty(), "{issues:?}");
    let jumps = builtin_jumps(config);
    let payload = render(
        &model,
        config,
        &RenderOptions {
            builtin_jumps: &jumps,
            ..RenderOptions::default()
        },
    );
    let problems = check(&payload.text);
    assert!(problems.is_empty(), "{problems:#?}\n{}", payload.text);
    payload
}

fn lines_with<'a>(payload: &'a Payload, needle: &str) -> Vec<&'a str> {
    payload
        .text
        .lines()
        .filter(|l| l.contains(needle))
        .collect()
}

fn web() -> ServiceBuilder {
    ServiceBuilder::new("default", "web").port("http", 80, "TCP")
}

fn slice(endpoints: &[(&str, &str)]) -> EndpointSlice {
    let mut builder = SliceBuilder::new("default", "web", "web-1").port("http", 8080, "TCP");
    for (ip, node) in endpoints {
        builder = builder.endpoint(Ep::new(ip).node(node));
    }
    builder.build()
}

const SVC: &str = "KUBE-SVC-CDGGSHYLG3RE2FKL";

#[test]
fn cluster_ip_spreads_uniformly_over_ready_endpoints() {
    let payload = render_with(
        &[web().build()],
        &[slice(&[
            ("10.244.2.1", "node-b"),
            ("10.244.2.2", "node-b"),
            ("10.244.3.1", "node-c"),
        ])],
        &config(),
    );
    let chain = names::ServiceChains::new(
        &model::ServicePortName {
            namespace: "default".into(),
            name: "web".into(),
            port: "http".into(),
        },
        model::Protocol::Tcp,
    )
    .cluster;
    assert_eq!(chain, SVC);
    assert_eq!(
        lines_with(&payload, &format!("-A {SVC}")),
        [
            "-A KUBE-SVC-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http -> 10.244.2.1:8080\" -m statistic --mode random --probability 0.3333333333 -p tcp -j DNAT --to-destination 10.244.2.1:8080",
            "-A KUBE-SVC-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http -> 10.244.2.2:8080\" -m statistic --mode random --probability 0.5000000000 -p tcp -j DNAT --to-destination 10.244.2.2:8080",
            "-A KUBE-SVC-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http -> 10.244.3.1:8080\" -p tcp -j DNAT --to-destination 10.244.3.1:8080",
        ]
    );
    assert_eq!(
        lines_with(
            &payload,
            "-A KUBE-SERVICES -m comment --comment \"default/web"
        ),
        [
            "-A KUBE-SERVICES -m comment --comment \"default/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-CDGGSHYLG3RE2FKL"
        ]
    );
    assert!(
        lines_with(&payload, "KUBE-SEP-").is_empty(),
        "no per-endpoint chains"
    );
    assert!(
        lines_with(&payload, "hairpin").is_empty(),
        "remote endpoints cannot hairpin here"
    );
}

#[test]
fn no_endpoints_reject_every_entry_point() {
    let service = web()
        .type_("LoadBalancer")
        .node_port(30080)
        .external_ips(&["192.0.2.1"])
        .ingress("198.51.100.1", None)
        .build();
    let payload = render_with(&[service], &[], &config());
    assert_eq!(
        lines_with(&payload, "has no endpoints"),
        [
            "-A KUBE-SERVICES -m comment --comment \"default/web:http has no endpoints\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j REJECT",
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/web:http has no endpoints\" -m tcp -p tcp -d 192.0.2.1 --dport 80 -j REJECT",
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/web:http has no endpoints\" -m tcp -p tcp -d 198.51.100.1 --dport 80 -j REJECT",
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/web:http has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j REJECT",
        ]
    );
    assert!(payload.service_chains.is_empty());
    assert_eq!(payload.nat.chains, 5, "only the top-level nat chains");
}

#[test]
fn internal_traffic_policy_local_without_local_endpoints_drops() {
    let payload = render_with(
        &[web().internal_traffic_policy("Local").build()],
        &[slice(&[("10.244.2.1", "node-b")])],
        &config(),
    );
    assert_eq!(
        lines_with(&payload, "has no local endpoints"),
        [
            "-A KUBE-SERVICES -m comment --comment \"default/web:http has no local endpoints\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j DROP"
        ]
    );
    assert!(payload.service_chains.is_empty());
}

#[test]
fn internal_traffic_policy_local_uses_the_local_chain() {
    let payload = render_with(
        &[web().internal_traffic_policy("Local").build()],
        &[slice(&[("10.244.2.1", "node-b"), ("10.244.1.7", "node-a")])],
        &config(),
    );
    assert_eq!(payload.service_chains, ["KUBE-SVL-CDGGSHYLG3RE2FKL"]);
    assert_eq!(
        lines_with(&payload, "-j DNAT"),
        [
            "-A KUBE-SVL-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http -> 10.244.1.7:8080\" -p tcp -j DNAT --to-destination 10.244.1.7:8080"
        ]
    );
}

#[test]
fn external_traffic_policy_local_short_circuits_pods_and_the_node() {
    let service = web()
        .type_("NodePort")
        .node_port(30080)
        .external_traffic_policy("Local")
        .build();
    let payload = render_with(
        &[service],
        &[slice(&[("10.244.2.1", "node-b"), ("10.244.1.7", "node-a")])],
        &config(),
    );
    assert_eq!(
        lines_with(&payload, "-A KUBE-EXT-"),
        [
            "-A KUBE-EXT-CDGGSHYLG3RE2FKL -m comment --comment \"pod traffic for default/web:http external destinations\" -s 10.244.0.0/16 -j KUBE-SVC-CDGGSHYLG3RE2FKL",
            "-A KUBE-EXT-CDGGSHYLG3RE2FKL -m comment --comment \"masquerade LOCAL traffic for default/web:http external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
            "-A KUBE-EXT-CDGGSHYLG3RE2FKL -m comment --comment \"route LOCAL traffic for default/web:http external destinations\" -m addrtype --src-type LOCAL -j KUBE-SVC-CDGGSHYLG3RE2FKL",
            "-A KUBE-EXT-CDGGSHYLG3RE2FKL -j KUBE-SVL-CDGGSHYLG3RE2FKL",
        ]
    );
    assert_eq!(
        lines_with(&payload, "-A KUBE-SVL-"),
        [
            "-A KUBE-SVL-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http -> 10.244.1.7:8080\" -p tcp -j DNAT --to-destination 10.244.1.7:8080"
        ]
    );
    assert_eq!(
        lines_with(&payload, "-A KUBE-NODEPORTS"),
        [
            "-A KUBE-NODEPORTS -m comment --comment \"default/web:http\" -m tcp -p tcp --dport 30080 -j KUBE-EXT-CDGGSHYLG3RE2FKL"
        ]
    );
    assert_eq!(
        lines_with(&payload, "hairpin"),
        [
            "-A KUBE-POSTROUTING -m comment --comment \"masquerade hairpin traffic to 10.244.1.7\" -s 10.244.1.7 -d 10.244.1.7 -m conntrack --ctstate DNAT -j MASQUERADE --random-fully"
        ]
    );
}

/// A LoadBalancer with NodePort 30080, `externalTrafficPolicy: Local` and
/// health-check NodePort 32000, at 198.51.100.1.
fn local_load_balancer() -> Service {
    web()
        .type_("LoadBalancer")
        .node_port(30080)
        .external_traffic_policy("Local")
        .health_check_node_port(32000)
        .ingress("198.51.100.1", None)
        .build()
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops_external_traffic_only() {
    let payload = render_with(
        &[local_load_balancer()],
        &[slice(&[("10.244.2.1", "node-b")])],
        &config(),
    );
    assert_eq!(
        lines_with(&payload, "has no local endpoints"),
        [
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/web:http has no local endpoints\" -m tcp -p tcp -d 198.51.100.1 --dport 80 -j DROP",
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/web:http has no local endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j DROP",
        ]
    );
    // Pods and the node still get through the EXT chain to the cluster endpoints.
    assert_eq!(lines_with(&payload, "-A KUBE-EXT-").len(), 3);
    assert_eq!(
        lines_with(&payload, "health check node port"),
        [
            "-A KUBE-NODEPORTS -m comment --comment \"default/web:http health check node port\" -m tcp -p tcp --dport 32000 -j ACCEPT"
        ]
    );
}

#[test]
fn external_traffic_policy_cluster_masquerades_external_traffic() {
    let service = web().type_("NodePort").node_port(30080).build();
    let payload = render_with(&[service], &[slice(&[("10.244.2.1", "node-b")])], &config());
    assert_eq!(
        lines_with(&payload, "-A KUBE-EXT-"),
        [
            "-A KUBE-EXT-CDGGSHYLG3RE2FKL -m comment --comment \"masquerade traffic for default/web:http external destinations\" -j KUBE-MARK-MASQ",
            "-A KUBE-EXT-CDGGSHYLG3RE2FKL -j KUBE-SVC-CDGGSHYLG3RE2FKL",
        ]
    );
}

#[test]
fn source_ranges_filter_load_balancer_traffic_but_not_node_ports() {
    let service = web()
        .type_("LoadBalancer")
        .node_port(30080)
        .ingress("198.51.100.1", None)
        .source_ranges(&["203.0.113.0/25", "192.168.0.0/24"])
        .build();
    let payload = render_with(&[service], &[slice(&[("10.244.2.1", "node-b")])], &config());
    assert_eq!(
        lines_with(&payload, "KUBE-FW-CDGGSHYLG3RE2FKL"),
        [
            ":KUBE-FW-CDGGSHYLG3RE2FKL - [0:0]",
            "-A KUBE-FW-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http loadbalancer IP\" -s 203.0.113.0/25 -j KUBE-EXT-CDGGSHYLG3RE2FKL",
            "-A KUBE-FW-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http loadbalancer IP\" -s 192.168.0.0/24 -j KUBE-EXT-CDGGSHYLG3RE2FKL",
            "-A KUBE-FW-CDGGSHYLG3RE2FKL -m comment --comment \"default/web:http loadbalancer IP\" -s 198.51.100.1 -j KUBE-EXT-CDGGSHYLG3RE2FKL",
            "-A KUBE-FW-CDGGSHYLG3RE2FKL -m comment --comment \"other traffic to default/web:http will be dropped by KUBE-PROXY-FIREWALL\"",
            "-A KUBE-SERVICES -m comment --comment \"default/web:http loadbalancer IP\" -m tcp -p tcp -d 198.51.100.1 --dport 80 -j KUBE-FW-CDGGSHYLG3RE2FKL",
            "-A KUBE-PROXY-FIREWALL -m comment --comment \"default/web:http traffic not accepted by KUBE-FW-CDGGSHYLG3RE2FKL\" -m tcp -p tcp -d 198.51.100.1 --dport 80 -j DROP",
        ]
    );
    // The NodePort goes straight to the EXT chain.
    assert_eq!(
        lines_with(&payload, "--dport 30080 -j KUBE-EXT-CDGGSHYLG3RE2FKL").len(),
        1
    );
}

#[test]
fn client_ip_affinity_uses_kube_proxy_recent_lists() {
    let service = web().client_ip_affinity(Some(300)).build();
    let payload = render_with(
        &[service],
        &[slice(&[("10.244.2.1", "node-b"), ("10.244.2.2", "node-b")])],
        &config(),
    );
    let dnat = lines_with(&payload, "-j DNAT");
    assert_eq!(dnat.len(), 4);
    assert!(
        dnat[0].contains("-m recent --name KUBE-SEP-")
            && dnat[0].contains("--update --seconds 300 --reap")
    );
    assert!(dnat[0].ends_with("--to-destination 10.244.2.1:8080"));
    assert!(dnat[1].ends_with("--to-destination 10.244.2.2:8080"));
    assert!(
        dnat[2].contains("--probability 0.5000000000 -m recent --name KUBE-SEP-")
            && dnat[2].contains("--set")
    );
    assert!(dnat[3].contains("--set") && !dnat[3].contains("statistic"));
    // The list that remembers a client is the one its endpoint's DNAT sets.
    let list = |line: &str| split_list(line);
    assert_eq!(list(dnat[0]), list(dnat[2]));
    assert_eq!(list(dnat[1]), list(dnat[3]));
    assert_ne!(list(dnat[0]), list(dnat[1]));
}

fn split_list(line: &str) -> String {
    let words = check::split_words(line);
    let i = words.iter().position(|w| w == "--name").unwrap();
    words[i + 1].clone()
}

#[test]
fn hairpin_masquerade_covers_local_and_unknown_endpoints_once() {
    let other = ServiceBuilder::new("default", "other")
        .cluster_ip("10.96.0.11")
        .port("http", 80, "TCP")
        .build();
    let other_slice = SliceBuilder::new("default", "other", "other-1")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.1.7").node("node-a"))
        .endpoint(Ep::new("192.0.2.42"))
        .build();
    let payload = render_with(
        &[web().build(), other],
        &[
            slice(&[("10.244.1.7", "node-a"), ("10.244.2.1", "node-b")]),
            other_slice,
        ],
        &config(),
    );
    let hairpin = lines_with(&payload, "hairpin");
    assert_eq!(hairpin.len(), 2, "{hairpin:#?}");
    assert!(hairpin[0].contains("-s 10.244.1.7 -d 10.244.1.7"));
    assert!(hairpin[1].contains("-s 192.0.2.42 -d 192.0.2.42"));
    let postrouting = lines_with(&payload, "-A KUBE-POSTROUTING");
    assert!(
        postrouting[2].contains("! --mark 0x4000/0x4000 -j RETURN"),
        "hairpin rules come before the mark check"
    );
}

#[test]
fn masquerade_all_bit_and_random_fully_are_configurable() {
    let config = RenderConfig {
        masquerade_all: true,
        masquerade_bit: 10,
        random_fully: false,
        ..config()
    };
    let payload = render_with(
        &[web().build()],
        &[slice(&[("10.244.2.1", "node-b")])],
        &config,
    );
    assert_eq!(
        lines_with(&payload, "-A KUBE-MARK-MASQ"),
        ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x400"]
    );
    assert!(lines_with(&payload, "--random-fully").is_empty());
    assert_eq!(
        lines_with(
            &payload,
            "cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-MARK-MASQ"
        )
        .len(),
        1,
        "masquerade-all marks every cluster IP packet"
    );
}

#[test]
fn local_traffic_detection_modes() {
    let cases = [
        (
            LocalTraffic::Bridge("cbr0".into()),
            "! -i cbr0 -j KUBE-MARK-MASQ",
        ),
        (
            LocalTraffic::InterfacePrefix("veth".into()),
            "! -i veth+ -j KUBE-MARK-MASQ",
        ),
        (
            LocalTraffic::Cidr(parse_cidr("10.244.1.0/24").unwrap()),
            "! -s 10.244.1.0/24 -j KUBE-MARK-MASQ",
        ),
    ];
    for (local_traffic, expected) in cases {
        let config = RenderConfig {
            local_traffic,
            ..config()
        };
        let payload = render_with(
            &[web().build()],
            &[slice(&[("10.244.2.1", "node-b")])],
            &config,
        );
        assert_eq!(lines_with(&payload, expected).len(), 1, "{expected}");
    }
    let config = RenderConfig {
        local_traffic: LocalTraffic::None,
        ..config()
    };
    let payload = render_with(
        &[web().build()],
        &[slice(&[("10.244.2.1", "node-b")])],
        &config,
    );
    assert!(
        lines_with(
            &payload,
            "cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 ! "
        )
        .is_empty()
    );
    assert!(lines_with(&payload, "-j KUBE-MARK-MASQ").is_empty());
}

#[test]
fn node_ports_on_all_local_addresses_with_localhost_guard() {
    let payload = render_with(&[web().build()], &[], &config());
    assert_eq!(
        lines_with(&payload, "-j KUBE-NODEPORTS"),
        [
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
            "-I INPUT 1 -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
        ]
    );
    assert_eq!(
        lines_with(&payload, "-A KUBE-FIREWALL"),
        [
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        ]
    );

    let no_localhost = RenderConfig {
        localhost_nodeports: false,
        ..config()
    };
    let payload = render_with(&[web().build()], &[], &no_localhost);
    assert_eq!(
        lines_with(
            &payload,
            "--dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"
        )
        .len(),
        1
    );
    assert!(lines_with(&payload, "KUBE-FIREWALL").is_empty());

    // As kube-proxy: NodePort addresses without the loopback range (such as
    // `primary`) turn localhost NodePorts off, and with them the guard;
    // with it, they stay on.
    for (cidrs, guarded) in [
        (vec!["192.168.0.10/32"], false),
        (vec!["192.168.0.10/32", "127.0.0.0/8"], true),
        (vec!["127.0.0.1/32"], true),
        (vec!["0.0.0.0/0"], true),
    ] {
        let limited = RenderConfig {
            nodeport_addresses: NodePortAddresses::Cidrs(
                cidrs.iter().map(|c| parse_cidr(c).unwrap()).collect(),
            ),
            ..config()
        };
        assert_eq!(
            limited.localhost_nodeports_effective(),
            guarded,
            "{cidrs:?}"
        );
        let payload = render_with(&[web().build()], &[], &limited);
        assert_eq!(
            lines_with(&payload, "block incoming localnet").len(),
            usize::from(guarded),
            "{cidrs:?}"
        );
    }
}

#[test]
fn nfacct_counters_count_invalid_drops_and_localhost_node_ports() {
    let service = web().type_("NodePort").node_port(30080).build();
    let slices = [slice(&[("10.244.2.1", "node-b")])];
    let counting = RenderConfig {
        accounting: Accounting {
            invalid_dropped: true,
            localhost_nodeports: true,
        },
        ..config()
    };
    let payload = render_with(std::slice::from_ref(&service), &slices, &counting);
    assert_eq!(
        lines_with(&payload, "INVALID"),
        [
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -m nfacct --nfacct-name ct_state_invalid_dropped_pkts -j DROP"
        ]
    );
    // One entry per NodePort, as without counting; the chain it leads to
    // counts what came for 127.0.0.0/8 first, then goes on as before.
    assert_eq!(
        lines_with(&payload, "-A KUBE-NODEPORTS"),
        [
            "-A KUBE-NODEPORTS -m comment --comment \"default/web:http\" -m tcp -p tcp --dport 30080 -j KUBE-EXT-CDGGSHYLG3RE2FKL"
        ]
    );
    assert_eq!(
        lines_with(&payload, "-A KUBE-EXT-"),
        [
            "-A KUBE-EXT-CDGGSHYLG3RE2FKL -m comment --comment \"count default/web:http NodePort packets to 127.0.0.0/8\" -m tcp -p tcp -d 127.0.0.0/8 --dport 30080 -m nfacct --nfacct-name localhost_nps_accepted_pkts",
            "-A KUBE-EXT-CDGGSHYLG3RE2FKL -m comment --comment \"masquerade traffic for default/web:http external destinations\" -j KUBE-MARK-MASQ",
            "-A KUBE-EXT-CDGGSHYLG3RE2FKL -j KUBE-SVC-CDGGSHYLG3RE2FKL",
        ]
    );
    // No counting rule where NodePorts do not answer on 127.0.0.1, nor
    // where the counter does not exist, nor for a load balancer without a
    // NodePort.
    let load_balancer_only = web()
        .type_("LoadBalancer")
        .ingress("198.51.100.1", None)
        .build();
    for (service, config) in [
        (
            &service,
            RenderConfig {
                localhost_nodeports: false,
                ..counting.clone()
            },
        ),
        (
            &service,
            RenderConfig {
                nodeport_addresses: NodePortAddresses::Cidrs(vec![
                    parse_cidr("192.168.0.10/32").unwrap(),
                ]),
                ..counting.clone()
            },
        ),
        (&service, config()),
        (&load_balancer_only, counting.clone()),
    ] {
        let payload = render_with(std::slice::from_ref(service), &slices, &config);
        assert!(lines_with(&payload, "nfacct-name localhost").is_empty());
        assert_eq!(lines_with(&payload, "-A KUBE-EXT-").len(), 2);
    }
    let plain = render_with(std::slice::from_ref(&service), &slices, &config());
    assert_eq!(
        lines_with(&plain, "INVALID"),
        ["-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"]
    );
    // A LoadBalancer with a NodePort and externalTrafficPolicy: Local: the
    // counting rule comes before the short circuits for pods and the node,
    // and the load-balancer IP's entry is unchanged.
    let local_lb = local_load_balancer();
    let local_slices = [slice(&[("10.244.1.7", "node-a")])];
    let counted = render_with(std::slice::from_ref(&local_lb), &local_slices, &counting);
    let uncounted = render_with(std::slice::from_ref(&local_lb), &local_slices, &config());
    let ext = lines_with(&counted, "-A KUBE-EXT-");
    assert!(
        ext[0].contains("-d 127.0.0.0/8 --dport 30080 -m nfacct"),
        "{ext:#?}"
    );
    assert_eq!(ext[1..], lines_with(&uncounted, "-A KUBE-EXT-")[..]);
    assert_eq!(
        lines_with(&counted, "-d 198.51.100.1"),
        lines_with(&uncounted, "-d 198.51.100.1")
    );
}

#[test]
fn node_port_addresses_restrict_destinations() {
    let config = RenderConfig {
        nodeport_addresses: NodePortAddresses::Cidrs(vec![
            parse_cidr("192.168.0.10/32").unwrap(),
            parse_cidr("10.0.0.0/8").unwrap(),
            parse_cidr("127.0.0.0/8").unwrap(),
            parse_cidr("fd00::/8").unwrap(),
        ]),
        localhost_nodeports: false,
        ..config()
    };
    let payload = render_with(&[web().build()], &[], &config);
    let jumps: Vec<String> = lines_with(
        &payload,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports",
    )
    .iter()
    .map(|l| l.split("chain\" ").nth(1).unwrap().to_string())
    .collect();
    assert_eq!(
        jumps,
        [
            "-d 192.168.0.10/32 -j KUBE-NODEPORTS",
            "-d 10.0.0.0/8 -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
        ]
    );
}

#[test]
fn ipv6_payload() {
    let service = ServiceBuilder::new("default", "web")
        .cluster_ip("fd00:96::10")
        .type_("NodePort")
        .port("http", 80, "TCP")
        .node_port(30080)
        .build();
    let slice = SliceBuilder::new("default", "web", "web-1")
        .address_type("IPv6")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("fd00:244:2::1").node("node-b"))
        .build();
    let config = RenderConfig {
        local_traffic: LocalTraffic::Cidr(parse_cidr("fd00:244::/48").unwrap()),
        ..RenderConfig::new(IpFamily::V6)
    };
    let payload = render_with(&[service], &[slice], &config);
    assert!(lines_with(&payload, "KUBE-FIREWALL").is_empty());
    assert_eq!(
        lines_with(&payload, "--dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS").len(),
        1
    );
    assert_eq!(
        lines_with(&payload, "--to-destination [fd00:244:2::1]:8080").len(),
        1
    );
    assert_eq!(
        lines_with(
            &payload,
            "-d fd00:96::10 --dport 80 ! -s fd00:244::/48 -j KUBE-MARK-MASQ"
        )
        .len(),
        1
    );
}

#[test]
fn sctp_and_udp_match_their_own_protocol() {
    let service = ServiceBuilder::new("default", "multi")
        .port("sctp", 9000, "SCTP")
        .port("dns", 53, "UDP")
        .build();
    let slice = SliceBuilder::new("default", "multi", "multi-1")
        .port("sctp", 9000, "SCTP")
        .port("dns", 53, "UDP")
        .endpoint(Ep::new("10.244.2.1").node("node-b"))
        .build();
    let payload = render_with(&[service], &[slice], &config());
    assert_eq!(
        lines_with(&payload, "-p sctp -j DNAT --to-destination 10.244.2.1:9000").len(),
        1
    );
    assert_eq!(
        lines_with(&payload, "-p udp -j DNAT --to-destination 10.244.2.1:53").len(),
        1
    );
    assert_eq!(
        lines_with(
            &payload,
            "-m sctp -p sctp -d 10.96.0.10 --dport 9000 -j KUBE-SVC-"
        )
        .len(),
        1
    );
}

#[test]
fn jump_rules_can_be_left_out_and_stale_chains_deleted() {
    let (model, _) = model::build(
        &[web().build()],
        &[slice(&[("10.244.2.1", "node-b")])],
        &node(IpFamily::V4),
        IpFamily::V4,
    );
    let stale = vec!["KUBE-SVC-OLDOLDOLDOLDOLDO".to_string(), SVC.to_string()];
    let payload = render(
        &model,
        &config(),
        &RenderOptions {
            builtin_jumps: &[],
            delete_nat_chains: &stale,
            ..RenderOptions::default()
        },
    );
    assert!(lines_with(&payload, "-I ").is_empty());
    assert_eq!(
        lines_with(&payload, "KUBE-SVC-OLDOLDOLDOLDOLDO"),
        [
            ":KUBE-SVC-OLDOLDOLDOLDOLDO - [0:0]",
            "-X KUBE-SVC-OLDOLDOLDOLDOLDO"
        ]
    );
    assert!(
        lines_with(&payload, &format!("-X {SVC}")).is_empty(),
        "a chain still in use is never deleted"
    );
}

#[test]
fn jump_rules_match_kube_proxy() {
    let jumps = builtin_jumps(&config());
    let lines: Vec<String> = jumps.iter().map(JumpRule::restore_line).collect();
    assert_eq!(lines.len(), 14);
    assert_eq!(
        lines[10],
        "-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    assert_eq!(
        jumps[0].args,
        [
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-m",
            "comment",
            "--comment",
            "kubernetes externally-visible service portals",
            "-j",
            "KUBE-EXTERNAL-SERVICES"
        ]
    );
    assert_eq!(
        builtin_jumps(&RenderConfig::new(IpFamily::V6)).len(),
        12,
        "no martian guard for IPv6"
    );
}

#[test]
fn large_clusters_drop_per_endpoint_comments() {
    let services: Vec<Service> = (0..101)
        .map(|i| {
            ServiceBuilder::new("default", &format!("s{i}"))
                .cluster_ip(&format!("10.96.1.{i}"))
                .port("", 80, "TCP")
                .build()
        })
        .collect();
    let slices: Vec<EndpointSlice> = (0..101)
        .map(|i| {
            let mut b = SliceBuilder::new("default", &format!("s{i}"), &format!("s{i}-1"))
                .port("", 80, "TCP");
            for e in 0..10 {
                b = b.endpoint(Ep::new(&format!("10.245.{i}.{e}")).node("node-b"));
            }
            b.build()
        })
        .collect();
    let payload = render_with(&services, &slices, &config());
    assert_eq!(lines_with(&payload, "-j DNAT").len(), 1010);
    assert!(lines_with(&payload, " -> ").is_empty());
}

fn two_services(api_endpoints: &[&str], with_api: bool) -> Model {
    let mut services = vec![web().build()];
    let mut slices = vec![slice(&[("10.244.2.1", "node-b")])];
    if with_api {
        services.push(
            ServiceBuilder::new("default", "api")
                .cluster_ip("10.96.0.20")
                .port("http", 80, "TCP")
                .build(),
        );
        let mut api_slice = SliceBuilder::new("default", "api", "api-1").port("http", 8080, "TCP");
        for ip in api_endpoints {
            api_slice = api_slice.endpoint(Ep::new(ip).node("node-b"));
        }
        slices.push(api_slice.build());
    }
    model::build(&services, &slices, &node(IpFamily::V4), IpFamily::V4).0
}

fn api_key(model: &Model) -> (ServicePortName, Protocol) {
    let port = model
        .service_ports
        .iter()
        .find(|p| p.name.name == "api")
        .expect("api port");
    (port.name.clone(), port.protocol)
}

/// The partial render of `key`'s change after a full render of `before`;
/// the chains and the rule counts it reports must be a full render's of
/// `after`.
fn partial(before: &Model, after: &Model, key: &(ServicePortName, Protocol)) -> Payload {
    let only = BTreeSet::from([key.clone()]);
    let applied = render(before, &config(), &RenderOptions::default());
    let payload = render(
        after,
        &config(),
        &RenderOptions {
            delete_nat_chains: &applied.service_chains,
            partial: Some(Partial {
                only: &only,
                previous: before,
                applied_chains: &applied.service_chains,
                applied_totals: applied.totals,
            }),
            ..RenderOptions::default()
        },
    );
    let full = render(after, &config(), &RenderOptions::default());
    assert_eq!(
        payload.totals,
        RuleCounts {
            nat: full.nat.rules,
            filter: full.filter.rules
        }
    );
    let chains: BTreeSet<&String> = payload.service_chains.iter().collect();
    assert_eq!(chains, full.service_chains.iter().collect());
    payload
}

#[test]
fn a_partial_render_rewrites_only_the_changed_ports_chains_and_entries() {
    let before = two_services(&["10.244.2.7"], true);
    let after = two_services(&["10.244.2.7", "10.244.2.8"], true);
    let key = api_key(&after);
    let api_chain = names::ServiceChains::new(&key.0, key.1).cluster;
    let payload = partial(&before, &after, &key);
    // The changed port's chain is declared and refilled…
    assert_eq!(lines_with(&payload, &format!(":{api_chain} ")).len(), 1);
    assert!(!lines_with(&payload, "--to-destination 10.244.2.8:8080").is_empty());
    // …nothing else of any Service is touched: an endpoint change leaves the
    // dispatch entries as they are.
    assert!(lines_with(&payload, SVC).is_empty(), "{}", payload.text);
    assert!(
        lines_with(&payload, "KUBE-SERVICES").is_empty(),
        "{}",
        payload.text
    );
    assert!(
        lines_with(&payload, "KUBE-NODEPORTS").is_empty(),
        "{}",
        payload.text
    );
    assert!(payload.text.len() < 16 * 1024);
    // (`partial` checked the chains and the rule count against a full render.)
    // And back: the previous port had more endpoints than any port has now.
    let back = partial(&after, &before, &key);
    assert!(lines_with(&back, "10.244.2.8").is_empty(), "{}", back.text);
    assert_eq!(
        back.totals.nat,
        render(&before, &config(), &RenderOptions::default())
            .nat
            .rules
    );
}

#[test]
fn a_partial_render_inserts_and_deletes_dispatch_entries() {
    let without = two_services(&[], false);
    let with = two_services(&["10.244.2.7"], true);
    let key = api_key(&with);
    let api_chain = names::ServiceChains::new(&key.0, key.1).cluster;

    let added = partial(&without, &with, &key);
    assert_eq!(
        lines_with(&added, "KUBE-SERVICES"),
        [format!(
            "-I KUBE-SERVICES 1 -m comment --comment \"default/api:http cluster IP\" -m tcp -p tcp -d 10.96.0.20 --dport 80 -j {api_chain}"
        )]
    );
    assert_eq!(
        added.totals.nat,
        render(&with, &config(), &RenderOptions::default())
            .nat
            .rules
    );

    let removed = partial(&with, &without, &key);
    assert_eq!(
        lines_with(&removed, "KUBE-SERVICES"),
        [format!(
            "-D KUBE-SERVICES -m comment --comment \"default/api:http cluster IP\" -m tcp -p tcp -d 10.96.0.20 --dport 80 -j {api_chain}"
        )]
    );
    assert_eq!(lines_with(&removed, &format!("-X {api_chain}")).len(), 1);
    assert_eq!(
        removed.totals.nat,
        render(&without, &config(), &RenderOptions::default())
            .nat
            .rules
    );

    // Losing every endpoint swaps the DNAT entry for the filter REJECT.
    let empty = two_services(&[], true);
    let emptied = partial(&with, &empty, &key);
    assert_eq!(lines_with(&emptied, "-D KUBE-SERVICES").len(), 1);
    assert_eq!(
        lines_with(&emptied, "-I KUBE-SERVICES 1")
            .iter()
            .filter(|l| l.contains("-j REJECT"))
            .count(),
        1,
        "{}",
        emptied.text
    );
    // And back: the REJECT goes (the helper checks both tables' totals).
    let refilled = partial(&empty, &with, &key);
    assert_eq!(
        lines_with(&refilled, "-D KUBE-SERVICES")
            .iter()
            .filter(|l| l.contains("-j REJECT"))
            .count(),
        1,
        "{}",
        refilled.text
    );
}

#[test]
fn a_full_render_writes_ports_in_descending_chain_order_external_chains_last() {
    // The order iptables-nft-restore needs to stay near linear (see `render`):
    // every port's cluster part in descending order of the chain hash, then
    // every port's external part in the same order; each chain declared just
    // before its rules.
    let services: Vec<Service> = (0..20)
        .map(|i| {
            ServiceBuilder::new("default", &format!("svc-{i}"))
                .cluster_ip(&format!("10.96.1.{i}"))
                .type_("NodePort")
                .port("http", 80, "TCP")
                .node_port(30000 + i)
                .build()
        })
        .collect();
    let slices: Vec<EndpointSlice> = (0..20)
        .map(|i| {
            SliceBuilder::new("default", &format!("svc-{i}"), &format!("svc-{i}-1"))
                .port("http", 8080, "TCP")
                .endpoint(Ep::new(&format!("10.244.2.{i}")).node("node-b"))
                .build()
        })
        .collect();
    let payload = render_with(&services, &slices, &config());
    let nat = payload.text.split("*nat\n").nth(1).expect("nat table");
    // The hash of each service chain, in the order the chains first appear.
    let mut seen: Vec<String> = Vec::new();
    for line in nat.lines() {
        let chain = line
            .strip_prefix(':')
            .or_else(|| line.strip_prefix("-A "))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("");
        if !names::is_service_chain(chain) {
            continue;
        }
        let hash = |c: &str| c.rsplit('-').next().unwrap().to_string();
        if line.starts_with("-A ") {
            assert!(
                seen.last().is_some_and(|c| hash(c) == hash(chain)),
                "{chain} has a rule outside its port's block or before its declaration"
            );
        } else {
            seen.push(chain.to_string());
        }
    }
    assert_eq!(
        seen.len(),
        40,
        "an EXT and a SVC chain per Service: {seen:?}"
    );
    let (cluster, external) = seen.split_at(20);
    assert!(
        cluster.iter().all(|c| c.starts_with("KUBE-SVC-"))
            && external.iter().all(|c| c.starts_with("KUBE-EXT-")),
        "the external chains are not all after the cluster chains: {seen:?}"
    );
    for part in [cluster, external] {
        let hashes: Vec<&str> = part.iter().map(|c| c.rsplit('-').next().unwrap()).collect();
        assert!(
            hashes.windows(2).all(|w| w[0] > w[1]),
            "not in descending order: {hashes:?}"
        );
    }
    // The NodePort entries come with the external part.
    let first_ext = nat.find(":KUBE-EXT-").unwrap();
    assert!(
        nat.match_indices("-A KUBE-NODEPORTS ")
            .all(|(at, _)| at > first_ext),
        "a NodePort entry before the external part"
    );
    // The NodePort catch-all is still the last rule of KUBE-SERVICES.
    let last = nat
        .lines()
        .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
        .unwrap();
    assert!(last.ends_with("-j KUBE-NODEPORTS"), "{last}");
}

#[test]
fn stale_chains_are_flushed_before_deletion_and_endpoint_chains_go_one_by_one() {
    let (model, _) = model::build(
        &[web().build()],
        &[slice(&[("10.244.2.1", "node-b")])],
        &node(IpFamily::V4),
        IpFamily::V4,
    );
    let stale: Vec<String> = [
        "KUBE-SEP-AAAAAAAAAAAAAAAA",
        "KUBE-SVC-OLDOLDOLDOLDOLDO",
        "KUBE-SEP-ZZZZZZZZZZZZZZZZ",
        "KUBE-EXT-OLDOLDOLDOLDOLDO",
    ]
    .map(String::from)
    .to_vec();
    let payload = render(
        &model,
        &config(),
        &RenderOptions {
            delete_nat_chains: &stale,
            ..RenderOptions::default()
        },
    );
    let tail: Vec<&str> = payload
        .text
        .lines()
        .filter(|l| l.contains("OLD") || l.contains("KUBE-SEP-"))
        .collect();
    assert_eq!(
        tail,
        [
            ":KUBE-SVC-OLDOLDOLDOLDOLDO - [0:0]",
            ":KUBE-EXT-OLDOLDOLDOLDOLDO - [0:0]",
            "-X KUBE-SVC-OLDOLDOLDOLDOLDO",
            "-X KUBE-EXT-OLDOLDOLDOLDOLDO",
            ":KUBE-SEP-ZZZZZZZZZZZZZZZZ - [0:0]",
            "-X KUBE-SEP-ZZZZZZZZZZZZZZZZ",
            ":KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]",
            "-X KUBE-SEP-AAAAAAAAAAAAAAAA",
        ]
    );
}

/// `count` ClusterIP Services, one endpoint each, cluster IPs from
/// 10.96.0.1 up, plus one LoadBalancer Service with an external IP.
fn many_services(count: usize) -> Model {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..count {
        let name = format!("svc-{i}");
        services.push(
            ServiceBuilder::new("bulk", &name)
                .cluster_ip(&format!("10.96.{}.{}", (i + 1) / 256, (i + 1) % 256))
                .port("http", 80, "TCP")
                .build(),
        );
        slices.push(
            SliceBuilder::new("bulk", &name, &format!("{name}-1"))
                .port("http", 8080, "TCP")
                .endpoint(Ep::new(&format!("10.245.{}.{}", i / 256, i % 256)).node("node-b"))
                .build(),
        );
    }
    services.push(
        web()
            .type_("LoadBalancer")
            .cluster_ip("10.96.200.5")
            .node_port(30080)
            .ingress("198.51.100.7", None)
            .external_ips(&["203.0.113.9"])
            .build(),
    );
    slices.push(slice(&[("10.244.2.1", "node-b")]));
    model::build(&services, &slices, &node(IpFamily::V4), IpFamily::V4).0
}

#[test]
fn the_dispatch_layout_switches_to_buckets_at_1000_addresses_and_back_below_500() {
    use Dispatch::{Buckets, Flat};
    // 998 Services + web's cluster, LB and external IP = 1001 addresses.
    assert_eq!(Dispatch::for_model(&many_services(998), Flat), Buckets);
    assert_eq!(Dispatch::for_model(&many_services(996), Flat), Flat);
    // Once bucketed, it stays so down to 500 addresses.
    assert_eq!(Dispatch::for_model(&many_services(600), Buckets), Buckets);
    assert_eq!(Dispatch::for_model(&many_services(497), Buckets), Buckets);
    assert_eq!(Dispatch::for_model(&many_services(495), Buckets), Flat);
}

#[test]
fn the_applied_layout_is_read_from_the_applied_chains() {
    let model = many_services(300);
    for dispatch in [Dispatch::Flat, Dispatch::Buckets] {
        let options = RenderOptions {
            dispatch,
            ..RenderOptions::default()
        };
        let payload = render(&model, &config(), &options);
        assert_eq!(Dispatch::of_chains(&payload.service_chains), dispatch);
    }
}

#[test]
fn buckets_hold_the_flat_entries_each_in_the_bucket_of_its_address() {
    let model = many_services(300);
    let jumps = builtin_jumps(&config());
    let render_as = |dispatch| {
        let payload = render(
            &model,
            &config(),
            &RenderOptions {
                builtin_jumps: &jumps,
                dispatch,
                ..RenderOptions::default()
            },
        );
        let problems = check(&payload.text);
        assert!(problems.is_empty(), "{dispatch:?}: {problems:#?}");
        payload
    };
    let flat = render_as(Dispatch::Flat);
    let buckets = render_as(Dispatch::Buckets);

    // KUBE-SERVICES: one jump per bucket, then the NodePort catch-all.
    let top = lines_with(&buckets, "-A KUBE-SERVICES ");
    assert_eq!(top.len(), 65);
    assert!(
        top[5].contains("-d 0.0.0.5/0.0.0.63 -j KUBE-SVC-0BUCKET-05"),
        "{}",
        top[5]
    );
    assert!(top[64].contains("-j KUBE-NODEPORTS"));
    // Every flat entry is in the bucket its destination's low 6 bits name,
    // and nothing else changed.
    let mut moved = BTreeSet::new();
    for line in lines_with(&flat, "-A KUBE-SERVICES ") {
        if line.contains("-j KUBE-NODEPORTS") {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "-d").expect("-d");
        let ip: IpAddr = words[at + 1].parse().expect("address");
        let bucket = dispatch_bucket_chain(crate::addr::low_bits_of(&ip, 6));
        moved.insert(line.replacen("KUBE-SERVICES", &bucket, 1));
    }
    let in_buckets: BTreeSet<String> = buckets
        .text
        .lines()
        .filter(|l| l.starts_with("-A KUBE-SVC-0BUCKET-"))
        .map(String::from)
        .collect();
    assert_eq!(moved.len(), 303);
    assert_eq!(in_buckets, moved);
    let rest = |p: &Payload| -> BTreeSet<String> {
        p.text
            .lines()
            .filter(|l| !l.contains("KUBE-SERVICES") && !l.contains(DISPATCH_BUCKET_PREFIX))
            .map(String::from)
            .collect()
    };
    assert_eq!(rest(&flat), rest(&buckets));
    assert_eq!(buckets.nat.rules, flat.nat.rules + 64);
    assert_eq!(
        buckets
            .service_chains
            .iter()
            .filter(|c| c.starts_with(DISPATCH_BUCKET_PREFIX))
            .count(),
        64,
        "the buckets come and go like the service chains"
    );
}

#[test]
fn a_partial_render_edits_the_bucket_of_a_changed_address() {
    let before = many_services(100);
    let mut after = before.clone();
    let web = after
        .service_ports
        .iter_mut()
        .find(|p| p.name.name == "web")
        .expect("web");
    Arc::make_mut(web).external_ips = vec!["203.0.113.70".parse().unwrap()];
    let key = (web.name.clone(), web.protocol);
    let options = |dispatch| RenderOptions {
        dispatch,
        ..RenderOptions::default()
    };
    let applied = render(&before, &config(), &options(Dispatch::Buckets));
    let only = BTreeSet::from([key]);
    let payload = render(
        &after,
        &config(),
        &RenderOptions {
            delete_nat_chains: &applied.service_chains,
            partial: Some(Partial {
                only: &only,
                previous: &before,
                applied_chains: &applied.service_chains,
                applied_totals: applied.totals,
            }),
            dispatch: Dispatch::Buckets,
            ..RenderOptions::default()
        },
    );
    // 203.0.113.9 (bucket 9) leaves, 203.0.113.70 (bucket 6) comes.
    let edits: Vec<&str> = lines_with(&payload, "external IP\"");
    assert_eq!(edits.len(), 2, "{}", payload.text);
    assert!(edits[0].starts_with("-D KUBE-SVC-0BUCKET-09 ") && edits[0].contains("203.0.113.9 "));
    assert!(
        edits[1].starts_with("-I KUBE-SVC-0BUCKET-06 1 ") && edits[1].contains("203.0.113.70 ")
    );
    assert!(!payload.text.contains(":KUBE-SERVICES"), "{}", payload.text);
    let full = render(&after, &config(), &options(Dispatch::Buckets));
    assert_eq!(payload.totals.nat, full.nat.rules);
}

#[test]
fn a_full_render_of_no_services_fills_every_never_empty_chain() {
    // The periodic check reads an empty one as "flushed by another program"
    // and starts a full sync: a chain listed here that a render may leave
    // empty would mean a full sync every --sync-period.
    for family in [IpFamily::V4, IpFamily::V6] {
        let config = match family {
            IpFamily::V4 => config(),
            IpFamily::V6 => RenderConfig::new(IpFamily::V6),
        };
        let chains = never_empty_chains(&config);
        assert!(
            chains.contains(&(Table::Nat, KUBE_SERVICES)),
            "the NodePort catch-all counts: {chains:?}"
        );
        let payload = render_with(&[], &[], &config);
        for (table, chain) in chains {
            let section = payload
                .text
                .split("COMMIT\n")
                .find(|s| s.starts_with(&format!("*{}\n", table.as_str())))
                .unwrap_or_else(|| panic!("no {} section", table.as_str()));
            assert!(
                section
                    .lines()
                    .any(|l| l.starts_with(&format!("-A {chain} "))),
                "{family:?} {} {chain} is empty:\n{}",
                table.as_str(),
                payload.text
            );
        }
    }
}

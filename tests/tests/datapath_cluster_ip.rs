//! ClusterIP behaviour of causeway-agent's rules, proven with real packets
//! (SPEC 2.1): DNAT to ready endpoints, TCP/UDP/SCTP kept apart, REJECT without
//! endpoints, terminating fallback, named targetPorts, uniform spreading,
//! ClientIP affinity, topology hints, hairpin, --masquerade-all, ignored
//! Services, and the legacy backend.

use std::net::IpAddr;

use causeway_tests::datapath::{
    AgentFlags, Backend, DataPath, EndpointSlice, Family, Manifests, NODE_IP, NODE_NAME, NODE_ZONE,
    Origin, POD_GATEWAY, Placement, PodNetwork, Proto, REMOTE_NODE_NAME, REMOTE_NODE_ZONE, Seen,
    Service, ServicePort,
};

const ECHO: &str = env!("CARGO_BIN_EXE_causeway-echo");

fn fixture(network: PodNetwork) -> DataPath {
    DataPath::new(ECHO, network).expect("building the packet-test namespaces")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn cluster_ip_spreads_tcp_and_udp_over_every_endpoint_and_keeps_protocols_apart() {
    let mut dp = fixture(PodNetwork::Bridge);
    let a = dp
        .add_pod("web-a", Placement::Local, &[8080, 5353])
        .unwrap();
    let b = dp
        .add_pod("web-b", Placement::Local, &[8080, 5353])
        .unwrap();
    let r = dp
        .add_pod("web-r", Placement::Remote, &[8080, 5353])
        .unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::cluster_ip("web", "100.127.0.10")
        .port(ServicePort::tcp(80, 8080).named("http"))
        .port(ServicePort::udp(53, 5353).named("dns"));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(Some("http"), 8080, "TCP")
        .port(Some("dns"), 5353, "UDP")
        .endpoint(a.ready())
        .endpoint(b.ready())
        .endpoint(r.ready());
    dp.focus("default/web");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    let pods = ["web-a", "web-b", "web-r"];
    dp.expect_spread(&client.origin(), Proto::Tcp, "100.127.0.10:80", 60, &pods);
    dp.expect_spread(&client.origin(), Proto::Udp, "100.127.0.10:53", 60, &pods);
    dp.expect_spread(&Origin::Node, Proto::Tcp, "100.127.0.10:80", 30, &pods);
    // Pod-to-Service traffic is not masqueraded: every endpoint sees the pod.
    let seen = dp.expect_answers(&client.origin(), Proto::Tcp, "100.127.0.10:80", 20, &pods);
    assert!(
        seen.iter().all(|(_, source)| *source == ip(&client.ip)),
        "sources seen: {seen:?}"
    );
    // A port of one protocol never catches another, and other ports are not forwarded.
    dp.expect_no_answer(&client.origin(), Proto::Tcp, "100.127.0.10:53");
    dp.expect_no_answer(&client.origin(), Proto::Udp, "100.127.0.10:80");
    dp.expect_no_answer(&client.origin(), Proto::Tcp, "100.127.0.10:8080");
}

#[test]
fn a_service_without_usable_endpoints_is_refused_at_once() {
    let mut dp = fixture(PodNetwork::Bridge);
    let gone = dp.add_pod("gone", Placement::Local, &[8080, 5353]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    // No EndpointSlice at all.
    let empty = Service::cluster_ip("empty", "100.127.0.20")
        .port(ServicePort::tcp(80, 8080))
        .port(ServicePort::udp(53, 5353));
    // Only a non-serving endpoint (not ready, not terminating): never used,
    // even though the pod would answer.
    let unready = Service::cluster_ip("unready", "100.127.0.21").port(ServicePort::tcp(80, 8080));
    let unready_slice = EndpointSlice::for_service(&unready, "1")
        .port(None, 8080, "TCP")
        .endpoint(gone.ready().not_ready());
    dp.focus("default/empty");
    dp.focus("default/unready");
    dp.apply(
        &Manifests::new()
            .service(&empty)
            .service(&unready)
            .slice(&unready_slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    dp.expect_refused(&client.origin(), Proto::Tcp, "100.127.0.20:80");
    dp.expect_refused(&client.origin(), Proto::Udp, "100.127.0.20:53");
    dp.expect_refused(&Origin::Node, Proto::Tcp, "100.127.0.20:80");
    dp.expect_refused(&client.origin(), Proto::Tcp, "100.127.0.21:80");
}

#[test]
fn terminating_endpoints_serve_only_when_no_endpoint_is_ready() {
    let mut dp = fixture(PodNetwork::Bridge);
    let ready = dp.add_pod("ready", Placement::Local, &[8080]).unwrap();
    let draining = dp.add_pod("draining", Placement::Remote, &[8080]).unwrap();
    let draining2 = dp.add_pod("draining2", Placement::Local, &[8080]).unwrap();
    let dead = dp.add_pod("dead", Placement::Local, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();

    // One ready endpoint beside a serving terminating one: only the ready one.
    let mixed = Service::cluster_ip("mixed", "100.127.0.30").port(ServicePort::tcp(80, 8080));
    let mixed_slice = EndpointSlice::for_service(&mixed, "1")
        .port(None, 8080, "TCP")
        .endpoint(ready.ready())
        .endpoint(draining.ready().terminating(true));
    // No ready endpoint: the serving terminating ones, never the non-serving one.
    let rolling = Service::cluster_ip("rolling", "100.127.0.31").port(ServicePort::tcp(80, 8080));
    let rolling_slice = EndpointSlice::for_service(&rolling, "1")
        .port(None, 8080, "TCP")
        .endpoint(draining.ready().terminating(true))
        .endpoint(draining2.ready().terminating(true))
        .endpoint(dead.ready().terminating(false));
    dp.focus("default/mixed");
    dp.focus("default/rolling");
    dp.apply(
        &Manifests::new()
            .service(&mixed)
            .slice(&mixed_slice)
            .service(&rolling)
            .slice(&rolling_slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.30:80",
        40,
        &["ready"],
    );
    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.31:80",
        60,
        &["draining", "draining2"],
    );
}

#[test]
fn a_named_target_port_resolves_per_endpoint() {
    let mut dp = fixture(PodNetwork::Bridge);
    // Two generations of a Deployment whose container port "web" moved.
    let old = dp.add_pod("old", Placement::Local, &[8081]).unwrap();
    let new = dp.add_pod("new", Placement::Remote, &[8082]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::cluster_ip("named", "100.127.0.40")
        .port(ServicePort::tcp(80, 0).named("http").target_name("web"));
    let slice_old = EndpointSlice::for_service(&svc, "old")
        .port(Some("http"), 8081, "TCP")
        .endpoint(old.ready());
    let slice_new = EndpointSlice::for_service(&svc, "new")
        .port(Some("http"), 8082, "TCP")
        .endpoint(new.ready());
    dp.focus("default/named");
    dp.apply(
        &Manifests::new()
            .service(&svc)
            .slice(&slice_old)
            .slice(&slice_new),
        &AgentFlags::default(),
    )
    .expect("render and load");

    // Each pod only listens on its own port: any wrong pairing is refused.
    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.40:80",
        40,
        &["new", "old"],
    );
}

#[test]
fn three_endpoints_share_3000_connections_evenly() {
    let mut dp = fixture(PodNetwork::Bridge);
    let a = dp.add_pod("even-a", Placement::Local, &[8080]).unwrap();
    let b = dp.add_pod("even-b", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("even-r", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::cluster_ip("even", "100.127.0.50").port(ServicePort::tcp(80, 8080));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready())
        .endpoint(b.ready())
        .endpoint(r.ready());
    dp.focus("default/even");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    let tally = dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.50:80",
        3000,
        &["even-a", "even-b", "even-r"],
    );
    for pod in ["even-a", "even-b", "even-r"] {
        let share = tally.count(pod) as f64 / 3000.0;
        // 33 ± 3 %: about 3.5 standard deviations of a fair three-way split.
        assert!(
            (0.30..=0.3633).contains(&share),
            "{pod} got {:.1} % of 3000 connections: {tally:?}\nrules involved:\n{}",
            share * 100.0,
            dp.explain("100.127.0.50:80")
        );
    }
}

#[test]
fn client_ip_affinity_keeps_each_client_on_one_pod() {
    let mut dp = fixture(PodNetwork::Bridge);
    let a = dp.add_pod("sticky-a", Placement::Local, &[8080]).unwrap();
    let b = dp.add_pod("sticky-b", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("sticky-r", Placement::Remote, &[8080]).unwrap();
    let c1 = dp.add_pod("client1", Placement::Local, &[9]).unwrap();
    let c2 = dp.add_pod("client2", Placement::Local, &[9]).unwrap();
    let sticky = Service::cluster_ip("sticky", "100.127.0.60")
        .port(ServicePort::tcp(80, 8080))
        .client_ip_affinity(Some(600));
    let sticky_slice = EndpointSlice::for_service(&sticky, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready())
        .endpoint(b.ready())
        .endpoint(r.ready());
    dp.focus("default/sticky");
    dp.apply(
        &Manifests::new().service(&sticky).slice(&sticky_slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    // Without affinity, 30 connections landing on one of three pods would
    // happen once in 3^29 runs.
    for client in [&c1, &c2] {
        let tally = dp.tally(&client.origin(), Proto::Tcp, "100.127.0.60:80", 30);
        assert!(
            tally.answered() == 30 && tally.by_pod.len() == 1,
            "{} → sticky ×30: expected one pod every time, got {tally:?}\nrules involved:\n{}",
            client.name,
            dp.explain("100.127.0.60:80")
        );
        // trace models a first connection only (`recent --update` never
        // matches), so it can only be held to the one pod being a candidate;
        // check_trace relaxes "exactly these pods" for affinity Services.
        let pods = tally.by_pod.keys().cloned().collect();
        dp.check_trace(
            &client.origin(),
            Proto::Tcp,
            "100.127.0.60:80",
            &[Seen::Pods(pods)],
        );
    }
}

fn hairpin(network: PodNetwork) {
    let mut dp = fixture(network);
    let a = dp.add_pod("solo", Placement::Local, &[8080]).unwrap();
    let other = dp.add_pod("other", Placement::Local, &[9]).unwrap();
    // Hairpin is checked for TCP and UDP, so the Service needs a port of each
    // protocol: a UDP probe to a Service with only a TCP port matches no rule
    // and is lost under kube-proxy too (that is not hairpin, it is "no port").
    let svc = Service::cluster_ip("solo", "100.127.0.70")
        .port(ServicePort::tcp(80, 8080).named("tcp"))
        .port(ServicePort::udp(80, 8080).named("udp"));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(Some("tcp"), 8080, "TCP")
        .port(Some("udp"), 8080, "UDP")
        .endpoint(a.ready());
    dp.focus("default/solo");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    // The pod reaches itself through its Service and sees the node's address
    // (without masquerade its reply would bypass the node and be dropped).
    dp.expect_answer_from(
        &a.origin(),
        Proto::Tcp,
        "100.127.0.70:80",
        "solo",
        POD_GATEWAY,
    );
    dp.expect_answer_from(
        &a.origin(),
        Proto::Udp,
        "100.127.0.70:80",
        "solo",
        POD_GATEWAY,
    );
    // Another pod is not masqueraded.
    dp.expect_answer_from(
        &other.origin(),
        Proto::Tcp,
        "100.127.0.70:80",
        "solo",
        &other.ip,
    );
}

#[test]
fn hairpin_on_a_bridge_lands_on_the_pod_itself_masqueraded() {
    hairpin(PodNetwork::Bridge);
}

#[test]
fn hairpin_on_ptp_veths_lands_on_the_pod_itself_masqueraded() {
    hairpin(PodNetwork::PointToPoint);
}

#[test]
fn masquerade_all_masquerades_pod_traffic_too() {
    let mut dp = fixture(PodNetwork::Bridge);
    let r = dp.add_pod("far", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::cluster_ip("far", "100.127.0.80").port(ServicePort::tcp(80, 8080));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(None, 8080, "TCP")
        .endpoint(r.ready());
    let manifests = Manifests::new().service(&svc).slice(&slice);
    dp.focus("default/far");

    dp.apply(&manifests, &AgentFlags::default())
        .expect("render and load");
    dp.expect_answer_from(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.80:80",
        "far",
        &client.ip,
    );

    dp.clear_rules(Family::V4, Backend::Nft).unwrap();
    dp.apply(&manifests, &AgentFlags::default().masquerade_all())
        .expect("render and load with --masquerade-all");
    dp.expect_answer_from(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.80:80",
        "far",
        NODE_IP,
    );
}

#[test]
fn services_for_another_proxy_and_external_names_are_ignored() {
    let mut dp = fixture(PodNetwork::Bridge);
    let a = dp.add_pod("theirs", Placement::Local, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let theirs = Service::cluster_ip("theirs", "100.127.0.90")
        .port(ServicePort::tcp(80, 8080))
        .label("service.kubernetes.io/service-proxy-name", "someone-else");
    let theirs_slice = EndpointSlice::for_service(&theirs, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready());
    let mine = Service::cluster_ip("mine", "100.127.0.91").port(ServicePort::tcp(80, 8080));
    let mine_slice = EndpointSlice::for_service(&mine, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready());
    let external_name = r#"
apiVersion: v1
kind: Service
metadata:
  name: elsewhere
  namespace: default
spec:
  type: ExternalName
  externalName: remote.server.url.com
  ports:
  - port: 3000
    protocol: TCP
    targetPort: 443
"#;
    dp.apply(
        &Manifests::new()
            .service(&theirs)
            .slice(&theirs_slice)
            .service(&mine)
            .slice(&mine_slice)
            .yaml(external_name),
        &AgentFlags::default(),
    )
    .expect("render and load");

    for ignored in ["default/theirs", "default/elsewhere", "100.127.0.90"] {
        assert!(
            !dp.payload().contains(ignored),
            "the payload programs {ignored}:\n{}",
            dp.payload_lines(ignored)
        );
    }
    dp.expect_no_answer(&client.origin(), Proto::Tcp, "100.127.0.90:80");
    dp.expect_answer(&client.origin(), Proto::Tcp, "100.127.0.91:80", "theirs");
}

#[test]
fn the_legacy_backend_loads_the_same_payload_with_the_same_answers() {
    let mut dp = fixture(PodNetwork::Bridge);
    let a = dp.add_pod("legacy-a", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("legacy-r", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::node_port("legacy", "100.127.0.100")
        .port(ServicePort::tcp(80, 8080).node_port(30100));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready())
        .endpoint(r.ready());
    let empty =
        Service::cluster_ip("legacy-empty", "100.127.0.101").port(ServicePort::tcp(80, 8080));
    dp.focus("default/legacy");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice).service(&empty),
        &AgentFlags::default().backend(Backend::Legacy),
    )
    .expect("render and load with iptables-legacy-restore");

    assert!(
        dp.saved_rules(Family::V4, Backend::Legacy)
            .contains("KUBE-SERVICES"),
        "iptables-legacy-save shows no KUBE-SERVICES chain"
    );
    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.100:80",
        30,
        &["legacy-a", "legacy-r"],
    );
    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30100"),
        30,
        &["legacy-a", "legacy-r"],
    );
    dp.expect_refused(&client.origin(), Proto::Tcp, "100.127.0.101:80");
}

#[test]
fn client_ip_affinity_ends_after_its_timeout() {
    let mut dp = fixture(PodNetwork::Bridge);
    let pods: Vec<_> = ["brief-a", "brief-b", "brief-c"]
        .into_iter()
        .map(|name| dp.add_pod(name, Placement::Local, &[8080]).unwrap())
        .collect();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let brief = Service::cluster_ip("brief", "100.127.0.61")
        .port(ServicePort::tcp(80, 8080))
        .client_ip_affinity(Some(1));
    let slice = pods.iter().fold(
        EndpointSlice::for_service(&brief, "1").port(None, 8080, "TCP"),
        |slice, pod| slice.endpoint(pod.ready()),
    );
    dp.focus("default/brief");
    dp.apply(
        &Manifests::new().service(&brief).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");
    let target = "100.127.0.61:80";

    // Within the 1 s timeout: one pod.
    let first = dp.tally(&client.origin(), Proto::Tcp, target, 10);
    assert!(
        first.answered() == 10 && first.by_pod.len() == 1,
        "within the timeout: {first:?}\n{}",
        dp.explain(target)
    );
    let stuck = first.by_pod.keys().next().cloned().unwrap_or_default();
    // After 1.5 s of silence a new connection is balanced afresh. Eight such
    // connections all landing on the same pod again would happen once in
    // 3^8 = 6 561 runs; with the affinity never ending, every time.
    let mut later = Vec::new();
    for _ in 0..8 {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let one = dp.tally(&client.origin(), Proto::Tcp, target, 1);
        assert_eq!(one.answered(), 1, "{one:?}");
        later.extend(one.by_pod.into_keys());
    }
    assert!(
        later.iter().any(|pod| *pod != stuck),
        "still on {stuck} after each timeout: {later:?}\n{}",
        dp.explain(target)
    );
}

#[test]
fn topology_hints_steer_only_when_every_endpoint_carries_them() {
    let mut dp = fixture(PodNetwork::Bridge);
    let a1 = dp.add_pod("zone-a1", Placement::Local, &[8080]).unwrap();
    let a2 = dp.add_pod("zone-a2", Placement::Local, &[8080]).unwrap();
    let b1 = dp.add_pod("zone-b1", Placement::Remote, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let service = |name: &str, ip: &str, endpoints: [causeway_tests::datapath::Endpoint; 3]| {
        let svc = Service::cluster_ip(name, ip).port(ServicePort::tcp(80, 8080));
        let slice = endpoints.into_iter().fold(
            EndpointSlice::for_service(&svc, "1").port(None, 8080, "TCP"),
            EndpointSlice::endpoint,
        );
        (svc, slice)
    };
    // PreferSameZone: node-a is in zone-a, and every endpoint has a zone.
    let zoned = service(
        "zoned",
        "100.127.0.130",
        [
            a1.ready().for_zone(NODE_ZONE),
            a2.ready().for_zone(NODE_ZONE),
            b1.ready().for_zone(REMOTE_NODE_ZONE),
        ],
    );
    // One endpoint without a hint: the hints are ignored.
    let partly = service(
        "partly",
        "100.127.0.131",
        [
            a1.ready().for_zone(NODE_ZONE),
            a2.ready(),
            b1.ready().for_zone(REMOTE_NODE_ZONE),
        ],
    );
    // PreferSameNode: only zone-a1 is meant for node-a (zone-a2 runs on
    // node-a but is hinted for node-b).
    let noded = service(
        "noded",
        "100.127.0.132",
        [
            a1.ready().for_node(NODE_NAME),
            a2.ready().for_node(REMOTE_NODE_NAME),
            b1.ready().for_node(REMOTE_NODE_NAME),
        ],
    );
    let manifests = [&zoned, &partly, &noded]
        .into_iter()
        .fold(Manifests::new(), |m, (svc, slice)| {
            m.service(svc).slice(slice)
        });
    dp.focus("default/zoned");
    dp.apply(&manifests, &AgentFlags::default())
        .expect("render and load");

    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.130:80",
        30,
        &["zone-a1", "zone-a2"],
    );
    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.131:80",
        60,
        &["zone-a1", "zone-a2", "zone-b1"],
    );
    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.0.132:80",
        20,
        &["zone-a1"],
    );
}

/// This kernel has no SCTP sockets (CONFIG_IP_SCTP is off), so no SCTP packet
/// can be sent; what can be proven is that SCTP rules load and catch no TCP.
#[test]
fn sctp_ports_load_and_catch_no_tcp() {
    let mut dp = fixture(PodNetwork::Bridge);
    let a = dp.add_pod("sctp", Placement::Local, &[8080, 8081]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let svc = Service::cluster_ip("sctp", "100.127.0.110")
        .port(ServicePort::new("SCTP", 80, 8080).named("sig"))
        .port(ServicePort::tcp(81, 8081).named("web"));
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(Some("sig"), 8080, "SCTP")
        .port(Some("web"), 8081, "TCP")
        .endpoint(a.ready());
    dp.focus("default/sctp");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    assert!(
        dp.payload()
            .lines()
            .any(|l| l.contains("100.127.0.110") && l.contains("-p sctp")),
        "no SCTP rule for 100.127.0.110:\n{}",
        dp.payload_lines("default/sctp")
    );
    dp.expect_no_answer(&client.origin(), Proto::Tcp, "100.127.0.110:80");
    dp.expect_answer(&client.origin(), Proto::Tcp, "100.127.0.110:81", "sctp");
}

#[test]
fn addresses_with_leading_zeros_and_whitespace_are_normalized() {
    let mut dp = fixture(PodNetwork::Bridge);
    let a = dp.add_pod("zeros", Placement::Local, &[8080]).unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    // Legacy objects written before the apiserver rejected such spellings.
    let svc = Service::cluster_ip("zeros", "100.127.000.120")
        .port(ServicePort::tcp(80, 8080))
        .external_ip(" 203.0.113.021 ");
    let slice = EndpointSlice::for_service(&svc, "1")
        .port(None, 8080, "TCP")
        .endpoint(a.ready());
    dp.focus("default/zeros");
    dp.apply(
        &Manifests::new().service(&svc).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    dp.expect_answer(&client.origin(), Proto::Tcp, "100.127.0.120:80", "zeros");
    dp.expect_answer(&Origin::client(), Proto::Tcp, "203.0.113.21:80", "zeros");
}

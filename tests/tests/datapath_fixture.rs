//! The packet-test fixture itself, without the agent: every namespace reaches
//! the pods, and a hand-written payload loads with both backends and DNATs,
//! including hairpin. When these pass and an agent test fails, the rules are
//! at fault, not the topology.

use causeway_tests::datapath::{
    Backend, CLIENT_IP, DataPath, Family, NODE_IP, Origin, Outcome, POD_GATEWAY, Placement,
    PodNetwork, Proto, v6,
};

const ECHO: &str = env!("CARGO_BIN_EXE_causeway-echo");

fn answered_by(outcome: &Outcome, pod: &str) -> bool {
    outcome.pod() == Some(pod)
}

fn reaches_pods_directly(network: PodNetwork) {
    let mut dp = DataPath::new(ECHO, network).expect("fixture");
    let a = dp.add_pod("pod-a", Placement::Local, &[8080]).unwrap();
    let b = dp.add_pod("pod-b", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("pod-r", Placement::Remote, &[8080]).unwrap();

    // Without any rule, the client's address arrives unchanged everywhere.
    for pod in [&a, &b, &r] {
        for proto in [Proto::Tcp, Proto::Udp] {
            let got = dp.probe(&Origin::client(), proto, &format!("{}:8080", pod.ip));
            assert_eq!(
                got.pod(),
                Some(pod.name.as_str()),
                "client → {} ({proto:?}): {got}",
                pod.name
            );
            assert_eq!(got.source(), Some(CLIENT_IP.parse().unwrap()), "{got}");
        }
        let got = dp.probe(
            &Origin::Client(v6::CLIENT_IP.into()),
            Proto::Tcp,
            &format!("[{}]:8080", pod.ip6),
        );
        assert_eq!(
            got.source(),
            Some(v6::CLIENT_IP.parse().unwrap()),
            "client → {} over IPv6: {got}",
            pod.name
        );
    }
    let got = dp.probe(
        &Origin::Pod(a.clone()),
        Proto::Tcp,
        &format!("{}:8080", r.ip),
    );
    assert!(
        answered_by(&got, "pod-r") && got.source() == Some(a.ip.parse().unwrap()),
        "{got}"
    );
    let got = dp.probe(
        &Origin::Pod(a.clone()),
        Proto::Tcp,
        &format!("{}:8080", b.ip),
    );
    assert!(
        answered_by(&got, "pod-b") && got.source() == Some(a.ip.parse().unwrap()),
        "{got}"
    );
    let got = dp.probe(&Origin::Node, Proto::Tcp, &format!("{}:8080", r.ip));
    assert_eq!(
        got.source(),
        Some(NODE_IP.parse().unwrap()),
        "node → remote pod: {got}"
    );
    // Nothing listens on the node itself: refused, not a timeout.
    assert_eq!(
        dp.probe(&Origin::client(), Proto::Tcp, &format!("{NODE_IP}:30080")),
        Outcome::Refused
    );
}

#[test]
fn bridge_pods_are_reachable_from_every_namespace() {
    reaches_pods_directly(PodNetwork::Bridge);
}

#[test]
fn ptp_pods_are_reachable_from_every_namespace() {
    reaches_pods_directly(PodNetwork::PointToPoint);
}

/// A minimal hand-written DNAT + masquerade ruleset for 100.127.0.1:80 → pod-a.
fn hand_written_payload(pod_ip: &str) -> String {
    format!(
        "*nat\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         -A PREROUTING -j KUBE-SERVICES\n\
         -A OUTPUT -j KUBE-SERVICES\n\
         -A POSTROUTING -j KUBE-POSTROUTING\n\
         -A KUBE-SERVICES -s {pod_ip}/32 -d 100.127.0.1/32 -p tcp --dport 80 -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-SERVICES -d 100.127.0.1/32 -p tcp --dport 80 -j DNAT --to-destination {pod_ip}:8080\n\
         -A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE\n\
         COMMIT\n"
    )
}

fn hand_written_rules_load_and_hairpin(network: PodNetwork, backend: Backend) {
    let mut dp = DataPath::new(ECHO, network).expect("fixture");
    let a = dp.add_pod("pod-a", Placement::Local, &[8080]).unwrap();
    let b = dp.add_pod("pod-b", Placement::Local, &[8080]).unwrap();
    dp.load(&hand_written_payload(&a.ip), Family::V4, backend)
        .expect("load");

    let got = dp.probe(&Origin::Pod(b.clone()), Proto::Tcp, "100.127.0.1:80");
    assert!(answered_by(&got, "pod-a"), "pod-b → VIP: {got}");
    assert_eq!(
        got.source(),
        Some(b.ip.parse().unwrap()),
        "pod-b → VIP unmasqueraded: {got}"
    );
    // Hairpin: pod-a reaches itself through the VIP and sees the node's address.
    let got = dp.probe(&Origin::Pod(a.clone()), Proto::Tcp, "100.127.0.1:80");
    assert!(
        answered_by(&got, "pod-a"),
        "hairpin ({network:?}, {backend:?}): {got}"
    );
    assert_eq!(
        got.source(),
        Some(POD_GATEWAY.parse().unwrap()),
        "hairpin masqueraded: {got}"
    );
    assert!(dp.saved_rules(Family::V4, backend).contains("100.127.0.1"));
}

#[test]
fn hand_written_rules_load_with_nft_and_hairpin_on_the_bridge() {
    hand_written_rules_load_and_hairpin(PodNetwork::Bridge, Backend::Nft);
}

#[test]
fn hand_written_rules_load_with_legacy_and_hairpin_on_ptp_veths() {
    hand_written_rules_load_and_hairpin(PodNetwork::PointToPoint, Backend::Legacy);
}

#[test]
fn a_rejected_payload_names_the_offending_line() {
    let mut dp = DataPath::new(ECHO, PodNetwork::Bridge).expect("fixture");
    let err = dp
        .load(
            "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j NO-SUCH-CHAIN\nCOMMIT\n",
            Family::V4,
            Backend::Nft,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("NO-SUCH-CHAIN"), "{err}");
}

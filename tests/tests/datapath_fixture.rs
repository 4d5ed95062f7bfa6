//! The packet-test fixture itself, without the agent: every namespace reaches
//! the pods, and a hand-written payload loads with both backends and DNATs,
//! including hairpin. When these pass and an agent test fails, the rules are
//! at fault, not the topology.
//!
//! Every probe goes through the fixture's `expect_*` assertions, so that each
//! is also traced (`causeway-agent trace`) and must get the same answer: with
//! no payload loaded, "untouched" everywhere.

use causeway_tests::datapath::{
    Backend, CLIENT_IP, DataPath, Family, NODE_IP, Origin, POD_GATEWAY, Placement, PodNetwork,
    Proto, v6,
};

const ECHO: &str = env!("CARGO_BIN_EXE_causeway-echo");

fn reaches_pods_directly(network: PodNetwork) {
    let mut dp = DataPath::new(ECHO, network).expect("fixture");
    let a = dp.add_pod("pod-a", Placement::Local, &[8080]).unwrap();
    let b = dp.add_pod("pod-b", Placement::Local, &[8080]).unwrap();
    let r = dp.add_pod("pod-r", Placement::Remote, &[8080]).unwrap();

    // Without any rule, the client's address arrives unchanged everywhere.
    for pod in [&a, &b, &r] {
        for proto in [Proto::Tcp, Proto::Udp] {
            dp.expect_answer_from(
                &Origin::client(),
                proto,
                &pod.at(8080),
                &pod.name,
                CLIENT_IP,
            );
        }
        dp.expect_answer_from(
            &Origin::client6(),
            Proto::Tcp,
            &format!("[{}]:8080", pod.ip6),
            &pod.name,
            v6::CLIENT_IP,
        );
    }
    dp.expect_answer_from(&a.origin(), Proto::Tcp, &r.at(8080), "pod-r", &a.ip);
    dp.expect_answer_from(&a.origin(), Proto::Tcp, &b.at(8080), "pod-b", &a.ip);
    dp.expect_answer_from(&Origin::Node, Proto::Tcp, &r.at(8080), "pod-r", NODE_IP);
    // Nothing listens on the node itself: refused, not a timeout.
    dp.expect_refused(&Origin::client(), Proto::Tcp, &format!("{NODE_IP}:30080"));
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

    // pod-b → VIP, unmasqueraded.
    dp.expect_answer_from(&b.origin(), Proto::Tcp, "100.127.0.1:80", "pod-a", &b.ip);
    // Hairpin: pod-a reaches itself through the VIP
    // and sees the node's address.
    dp.expect_answer_from(
        &a.origin(),
        Proto::Tcp,
        "100.127.0.1:80",
        "pod-a",
        POD_GATEWAY,
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

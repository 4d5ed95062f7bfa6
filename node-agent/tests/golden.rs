//! Golden tests: manifests in tests/golden/*.yaml → the exact payload in
//! tests/golden/*.txt, and every payload passes the consistency check.
//! Regenerate after an intended change with `UPDATE_GOLDEN=1 cargo test`.

use std::path::{Path, PathBuf};

use causeway_agent::addr::IpFamily;
use causeway_agent::config::ProxyOptions;
use causeway_agent::manifests;
use causeway_agent::model::{self, NodeInfo};
use causeway_agent::rules::{self, RenderOptions, check::check};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn render_case(name: &str, family: IpFamily) -> String {
    let yaml = golden_dir().join(format!("{name}.yaml"));
    let manifests = manifests::load(&[yaml]).expect("manifests load");
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        internal_ips: vec!["192.168.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
        pod_cidrs: Vec::new(),
    };
    let (model, issues) = model::build(
        &manifests.services,
        &manifests.endpoint_slices,
        &node,
        family,
    );
    assert!(issues.is_empty(), "{name}: {issues:?}");
    let options = ProxyOptions {
        cluster_cidrs: vec!["10.244.0.0/16".into(), "fd00:244::/48".into()],
        ..ProxyOptions::default()
    };
    let config = options.render_config(family, &node).expect("config");
    let jumps = rules::builtin_jumps(&config);
    let payload = rules::render(
        &model,
        &config,
        &RenderOptions {
            builtin_jumps: &jumps,
            ..RenderOptions::default()
        },
    );
    let problems = check(&payload.text);
    assert!(problems.is_empty(), "{name}: {problems:#?}");
    payload.text
}

fn assert_golden(name: &str, family: IpFamily) {
    let actual = render_case(name, family);
    let path = golden_dir().join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
            path.display()
        )
    });
    if actual != expected {
        let first_difference = actual
            .lines()
            .zip(expected.lines())
            .enumerate()
            .find(|(_, (a, e))| a != e)
            .map(|(i, (a, e))| format!("line {}:\n  actual:   {a}\n  expected: {e}", i + 1))
            .unwrap_or_else(|| "one payload is a prefix of the other".into());
        panic!(
            "{name} differs from {} at {first_difference}",
            path.display()
        );
    }
}

#[test]
fn cluster_ip_with_three_endpoints() {
    assert_golden("clusterip-3-endpoints", IpFamily::V4);
}

#[test]
fn node_port_with_external_traffic_policy_local() {
    assert_golden("nodeport-etp-local", IpFamily::V4);
}

#[test]
fn load_balancer_with_source_ranges() {
    assert_golden("loadbalancer-source-ranges", IpFamily::V4);
}

#[test]
fn session_affinity() {
    assert_golden("session-affinity", IpFamily::V4);
}

#[test]
fn no_endpoints() {
    assert_golden("no-endpoints", IpFamily::V4);
}

#[test]
fn ipv6_node_port() {
    assert_golden("ipv6-nodeport", IpFamily::V6);
}

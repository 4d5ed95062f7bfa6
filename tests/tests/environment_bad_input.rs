//! A half-started environment is cleaned up and reported, not left running.
//! This file is its own test binary so that the port it occupies in the host
//! namespace cannot disturb environments started by other tests (cargo runs test
//! binaries one after another).

use std::net::TcpListener;

use causeway_tests::cluster::{ClusterOptions, env_root};
use causeway_tests::{Cluster, netns};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_stops_the_start_with_a_clear_error_and_nothing_left() {
    // kube-apiserver binds <slot address>:6443, which a wildcard listener blocks.
    let _squatter = TcpListener::bind("0.0.0.0:6443").expect("port 6443 free for the test");
    let namespaces_before = netns::list_netns();
    let links_before = netns::list_links();

    let err = match Cluster::start(ClusterOptions::nodes(1)).await {
        Ok(_) => panic!("the environment started although its apiserver port was taken"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("kube-apiserver exited"),
        "the error names the component: {err}"
    );
    assert!(
        err.contains("address already in use"),
        "the error says why: {err}"
    );
    assert!(
        err.contains("torn down"),
        "the error says what happened to the rest: {err}"
    );

    assert_eq!(
        netns::list_netns(),
        namespaces_before,
        "no namespace left behind"
    );
    assert_eq!(netns::list_links(), links_before, "no link left behind");
    let leftovers: Vec<_> = std::fs::read_dir(env_root())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.iter().all(|dir| dir.join("state.json").exists()),
        "no half-written environment directory left: {leftovers:?}"
    );
    assert!(
        std::process::Command::new("pgrep")
            .args(["-f", "--", "--etcd-servers=http://100."])
            .status()
            .map(|s| !s.success())
            .unwrap_or(true),
        "no kube-apiserver left running"
    );
}

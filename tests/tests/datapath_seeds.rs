//! The seed articles' own manifests (../shared/seeds), as users wrote them,
//! rendered by causeway-agent and proven with real packets. Each manifest is
//! quoted literally; the only additions are what the apiserver fills in
//! (`clusterIP`, an allocated `nodePort`) and, for LoadBalancers, the status the
//! load balancer controller writes. The EndpointSlices are what the
//! endpointslice controller would publish for pods matching the selectors.

use causeway_tests::datapath::{
    AgentFlags, DataPath, EndpointSlice, Manifests, NODE_IP, Origin, Placement, PodNetwork, Proto,
    Service, ServicePort,
};

const ECHO: &str = env!("CARGO_BIN_EXE_causeway-echo");

fn fixture() -> DataPath {
    DataPath::new(ECHO, PodNetwork::Bridge).expect("building the packet-test namespaces")
}

/// Seed 000's `service-python` in its ClusterIP, NodePort and LoadBalancer forms.
fn service_python(type_: &str) -> String {
    let node_port = if type_ == "ClusterIP" {
        ""
    } else {
        "\n    nodePort: 30080"
    };
    format!(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: service-python
spec:
  clusterIP: 100.127.30.10   # allocated by the apiserver
  ports:
  - port: 3000
    protocol: TCP
    targetPort: 443{node_port}
  selector:
    run: pod-python
  type: {type_}
"#
    )
}

/// Two `run: pod-python` pods listening on 443, one per node, and their slice.
fn python_pods(dp: &mut DataPath) -> EndpointSlice {
    let local = dp
        .add_pod("pod-python-1", Placement::Local, &[443])
        .unwrap();
    let remote = dp
        .add_pod("pod-python-2", Placement::Remote, &[443])
        .unwrap();
    EndpointSlice::new("service-python", "abcde")
        .port(None, 443, "TCP")
        .endpoint(local.ready())
        .endpoint(remote.ready())
}

const PYTHON_PODS: [&str; 2] = ["pod-python-1", "pod-python-2"];

#[test]
fn seed_service_python_cluster_ip_forwards_port_3000_to_443() {
    let mut dp = fixture();
    let slice = python_pods(&mut dp);
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    dp.focus("service-python");
    dp.apply(
        &Manifests::new()
            .yaml(&service_python("ClusterIP"))
            .slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.30.10:3000",
        30,
        &PYTHON_PODS,
    );
    dp.expect_no_answer(&client.origin(), Proto::Tcp, "100.127.30.10:443");
    // ClusterIP only: nothing on the node's port 30080.
    dp.expect_refused(&Origin::client(), Proto::Tcp, &format!("{NODE_IP}:30080"));
}

#[test]
fn seed_service_python_node_port_30080_is_reachable_from_outside() {
    let mut dp = fixture();
    let slice = python_pods(&mut dp);
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    dp.focus("service-python");
    dp.apply(
        &Manifests::new()
            .yaml(&service_python("NodePort"))
            .slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30080"),
        30,
        &PYTHON_PODS,
    );
    dp.expect_spread(
        &client.origin(),
        Proto::Tcp,
        "100.127.30.10:3000",
        30,
        &PYTHON_PODS,
    );
}

#[test]
fn seed_service_python_load_balancer_serves_its_node_port_and_ingress() {
    let mut dp = fixture();
    let slice = python_pods(&mut dp);
    // An NLB reports a hostname, which no node programs; kind-style load
    // balancers report an IP, which every node short-cuts.
    let with_status = format!(
        "{}status:\n  loadBalancer:\n    ingress:\n    - hostname: k8s-default-servicep-0123456789.elb.us-east-1.amazonaws.com\n    - ip: 203.0.113.60\n",
        service_python("LoadBalancer").trim_start()
    );
    dp.focus("service-python");
    dp.apply(
        &Manifests::new().yaml(&with_status).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30080"),
        30,
        &PYTHON_PODS,
    );
    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        "203.0.113.60:3000",
        30,
        &PYTHON_PODS,
    );
}

#[test]
fn seed_external_name_service_python_programs_nothing() {
    let mut dp = fixture();
    let external_name = r#"
kind: Service
apiVersion: v1
metadata:
  name: service-python
spec:
  ports:
  - port: 3000
    protocol: TCP
    targetPort: 443
  type: ExternalName
  externalName: remote.server.url.com
"#;
    let other = Service::cluster_ip("other", "100.127.30.11").port(ServicePort::tcp(80, 8080));
    dp.apply(
        &Manifests::new().yaml(external_name).service(&other),
        &AgentFlags::default(),
    )
    .expect("render and load");
    assert!(
        !dp.payload().contains("service-python"),
        "an ExternalName Service got rules:\n{}",
        dp.payload_lines("service-python")
    );
}

#[test]
fn seed_selectorless_my_service_reaches_its_hand_written_endpoint_192_0_2_42() {
    let mut dp = fixture();
    // The article's backend outside the cluster: an address beyond node-b.
    dp.add_pod_with_ip(
        "backend-42",
        Placement::Remote,
        &[9376],
        "192.0.2.42",
        "2001:db8:42::42",
    )
    .unwrap();
    let client = dp.add_pod("client", Placement::Local, &[9]).unwrap();
    let manifests = r#"
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  clusterIP: 100.127.30.20   # allocated by the apiserver
  ports:
  - protocol: TCP
    port: 80
    targetPort: 9376
---
apiVersion: v1
kind: Endpoints
metadata:
  name: my-service
subsets:
- addresses:
  - ip: 192.0.2.42
  ports:
  - port: 9376
"#;
    dp.focus("my-service");
    dp.apply(&Manifests::new().yaml(manifests), &AgentFlags::default())
        .expect("render and load");

    dp.expect_answer_from(
        &client.origin(),
        Proto::Tcp,
        "100.127.30.20:80",
        "backend-42",
        &client.ip,
    );
    dp.expect_answer(&Origin::Node, Proto::Tcp, "100.127.30.20:80", "backend-42");
}

#[test]
fn seed_my_service_load_balancer_ip_192_0_2_127_and_node_port_30007() {
    let mut dp = fixture();
    let a = dp
        .add_pod("myapp-1", Placement::Local, &[9376, 80])
        .unwrap();
    let r = dp
        .add_pod("myapp-2", Placement::Remote, &[9376, 80])
        .unwrap();
    let load_balancer = r#"
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  clusterIP: 100.127.30.30   # allocated by the apiserver
  selector:
    app: MyApp
  ports:
  - protocol: TCP
    port: 80
    targetPort: 9376
    nodePort: 31007          # allocated by the apiserver
  type: LoadBalancer
status:
  loadBalancer:
    ingress:
    - ip: 192.0.2.127
"#;
    let node_port = r#"
apiVersion: v1
kind: Service
metadata:
  name: my-nodeport-service  # renamed: the article reuses my-service
spec:
  clusterIP: 100.127.30.31   # allocated by the apiserver
  type: NodePort
  selector:
    app: MyApp
  ports:
  - port: 80
    targetPort: 80
    nodePort: 30007
"#;
    let lb_slice = EndpointSlice::new("my-service", "x1")
        .port(None, 9376, "TCP")
        .endpoint(a.ready())
        .endpoint(r.ready());
    let np_slice = EndpointSlice::new("my-nodeport-service", "x2")
        .port(None, 80, "TCP")
        .endpoint(a.ready())
        .endpoint(r.ready());
    dp.focus("my-service");
    dp.focus("my-nodeport-service");
    dp.apply(
        &Manifests::new()
            .yaml(load_balancer)
            .slice(&lb_slice)
            .yaml(node_port)
            .slice(&np_slice),
        &AgentFlags::default(),
    )
    .expect("render and load");

    let pods = ["myapp-1", "myapp-2"];
    dp.expect_spread(&Origin::client(), Proto::Tcp, "192.0.2.127:80", 30, &pods);
    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:31007"),
        30,
        &pods,
    );
    dp.expect_spread(
        &Origin::client(),
        Proto::Tcp,
        &format!("{NODE_IP}:30007"),
        30,
        &pods,
    );
}

#[test]
fn seed_headless_service_is_ignored() {
    let mut dp = fixture();
    let curl = dp.add_pod("curl", Placement::Local, &[80]).unwrap();
    let headless = r#"
apiVersion: v1
kind: Service
metadata:
  name: my-headless-service
spec:
  clusterIP: None
  selector:
    run: curl
  ports:
  - port: 80
    protocol: TCP
    targetPort: 80
"#;
    let slice = EndpointSlice::new("my-headless-service", "h1")
        .port(None, 80, "TCP")
        .endpoint(curl.ready());
    dp.apply(
        &Manifests::new().yaml(headless).slice(&slice),
        &AgentFlags::default(),
    )
    .expect("render and load");
    assert!(
        !dp.payload().contains("my-headless-service"),
        "a headless Service got rules:\n{}",
        dp.payload_lines("my-headless-service")
    );
    // Clients of a headless Service dial pod IPs (DNS A records); nothing in
    // the way.
    dp.expect_answer_from(
        &Origin::client(),
        Proto::Tcp,
        &curl.at(80),
        "curl",
        causeway_tests::datapath::CLIENT_IP,
    );
}

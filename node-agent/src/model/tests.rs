use super::fixtures::{EndpointBuilder as Ep, NodeBuilder, ServiceBuilder, SliceBuilder};
use super::*;

fn node() -> NodeInfo {
    let mut issues = Vec::new();
    let info = NodeInfo::from_node(
        &NodeBuilder::new("node-a")
            .internal_ip("192.168.0.10")
            .pod_cidrs(&["10.244.1.0/24"])
            .zone("zone-a")
            .build(),
        &mut issues,
    );
    assert!(issues.is_empty(), "{issues:?}");
    info
}

fn build_v4(services: &[Service], slices: &[EndpointSlice]) -> (Model, Vec<Issue>) {
    build(services, slices, &node(), IpFamily::V4)
}

fn addresses(endpoints: &[Endpoint]) -> Vec<String> {
    endpoints.iter().map(Endpoint::address).collect()
}

fn web() -> ServiceBuilder {
    ServiceBuilder::new("default", "web").port("http", 80, "TCP")
}

#[test]
fn ready_endpoints_are_used_and_sorted_like_kube_proxy() {
    let slice = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.2.9").node("node-b"))
        .endpoint(Ep::new("10.244.1.10").node("node-a"))
        .endpoint(Ep::new("10.244.3.1").not_serving())
        .build();
    let (model, issues) = build_v4(&[web().build()], &[slice]);
    assert!(issues.is_empty());
    let port = &model.service_ports[0];
    assert_eq!(port.name.to_string(), "default/web:http");
    assert_eq!(
        addresses(&port.cluster_endpoints),
        ["10.244.1.10:8080", "10.244.2.9:8080"]
    );
    assert!(port.has_endpoints);
    assert!(
        port.local_endpoints.is_empty(),
        "ITP/ETP Cluster need no local list"
    );
    assert_eq!(port.local_ready_endpoints, 1);
    assert_eq!(port.cluster_endpoints[0].locality, Locality::Local);
    assert_eq!(port.cluster_endpoints[1].locality, Locality::Remote);
}

#[test]
fn missing_conditions_mean_ready() {
    let slice = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.2.9").no_conditions())
        .build();
    let (model, _) = build_v4(&[web().build()], &[slice]);
    assert_eq!(
        addresses(&model.service_ports[0].cluster_endpoints),
        ["10.244.2.9:8080"]
    );
}

#[test]
fn terminating_serving_endpoints_are_a_fallback_chosen_per_list() {
    let service = web()
        .type_("NodePort")
        .node_port(30080)
        .external_traffic_policy("Local")
        .build();
    // A ready endpoint elsewhere and a terminating one here: the cluster list
    // takes the ready one, the local list falls back to the terminating one.
    let slice = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.2.9").node("node-b"))
        .endpoint(Ep::new("10.244.1.10").node("node-a").terminating())
        .endpoint(Ep::new("10.244.1.11").node("node-a").not_serving())
        .build();
    let (model, _) = build_v4(&[service], &[slice]);
    let port = &model.service_ports[0];
    assert_eq!(addresses(&port.cluster_endpoints), ["10.244.2.9:8080"]);
    assert_eq!(addresses(&port.local_endpoints), ["10.244.1.10:8080"]);
    assert_eq!(port.local_ready_endpoints, 0);
    assert!(port.has_endpoints);
}

#[test]
fn only_not_serving_endpoints_mean_no_endpoints() {
    let slice = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.1.10").node("node-a").not_serving())
        .build();
    let (model, _) = build_v4(&[web().build()], &[slice]);
    let port = &model.service_ports[0];
    assert!(port.cluster_endpoints.is_empty());
    assert!(!port.has_endpoints);
}

#[test]
fn terminating_endpoints_serve_when_nothing_is_ready() {
    let slice = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.2.9").node("node-b").terminating())
        .endpoint(Ep::new("10.244.2.8").node("node-b").not_serving())
        .build();
    let (model, _) = build_v4(&[web().build()], &[slice]);
    assert_eq!(
        addresses(&model.service_ports[0].cluster_endpoints),
        ["10.244.2.9:8080"]
    );
}

#[test]
fn named_target_ports_resolve_per_endpoint_from_slice_ports() {
    // The endpointslice controller puts pods whose named port resolves to
    // different numbers into different slices.
    let a = SliceBuilder::new("default", "web", "web-a")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.1.10"))
        .build();
    let b = SliceBuilder::new("default", "web", "web-b")
        .port("http", 9090, "TCP")
        .port("metrics", 9100, "TCP")
        .endpoint(Ep::new("10.244.2.10"))
        .build();
    let service = web().port("metrics", 9100, "TCP").build();
    let (model, _) = build_v4(&[service], &[a, b]);
    let http = &model.service_ports[0];
    assert_eq!(http.name.port, "http");
    assert_eq!(
        addresses(&http.cluster_endpoints),
        ["10.244.1.10:8080", "10.244.2.10:9090"]
    );
    let metrics = &model.service_ports[1];
    assert_eq!(addresses(&metrics.cluster_endpoints), ["10.244.2.10:9100"]);
}

#[test]
fn protocols_never_share_endpoints() {
    let service = ServiceBuilder::new("kube-system", "dns")
        .port("dns", 53, "UDP")
        .port("dns-tcp", 53, "TCP")
        .build();
    let slice = SliceBuilder::new("kube-system", "dns", "dns-1")
        .port("dns", 5353, "UDP")
        .port("dns-tcp", 5353, "TCP")
        .endpoint(Ep::new("10.244.1.5"))
        .build();
    let wrong_protocol = SliceBuilder::new("kube-system", "dns", "dns-2")
        .port("dns", 6000, "TCP")
        .endpoint(Ep::new("10.244.1.6"))
        .build();
    let (model, _) = build_v4(&[service], &[slice, wrong_protocol]);
    let ports: Vec<(String, Protocol, Vec<String>)> = model
        .service_ports
        .iter()
        .map(|p| {
            (
                p.name.to_string(),
                p.protocol,
                addresses(&p.cluster_endpoints),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            (
                "kube-system/dns:dns".to_string(),
                Protocol::Udp,
                vec!["10.244.1.5:5353".to_string()]
            ),
            (
                "kube-system/dns:dns-tcp".to_string(),
                Protocol::Tcp,
                vec!["10.244.1.5:5353".to_string()]
            ),
        ]
    );
}

#[test]
fn duplicate_endpoints_across_slices_count_once() {
    let a = SliceBuilder::new("default", "web", "web-a")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.1.10"))
        .build();
    let b = SliceBuilder::new("default", "web", "web-b")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.1.10"))
        .build();
    let (model, _) = build_v4(&[web().build()], &[a, b]);
    assert_eq!(model.service_ports[0].cluster_endpoints.len(), 1);
}

#[test]
fn zone_hints_apply_only_when_every_ready_endpoint_has_them() {
    let hinted = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(
            Ep::new("10.244.1.10")
                .node("node-a")
                .zone_hints(&["zone-a"]),
        )
        .endpoint(
            Ep::new("10.244.2.10")
                .node("node-b")
                .zone_hints(&["zone-b"]),
        )
        .endpoint(Ep::new("10.244.2.11").node("node-b").not_serving())
        .build();
    let (model, _) = build_v4(&[web().build()], &[hinted]);
    assert_eq!(
        addresses(&model.service_ports[0].cluster_endpoints),
        ["10.244.1.10:8080"]
    );

    let partly = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(
            Ep::new("10.244.1.10")
                .node("node-a")
                .zone_hints(&["zone-a"]),
        )
        .endpoint(Ep::new("10.244.2.10").node("node-b"))
        .build();
    let (model, _) = build_v4(&[web().build()], &[partly]);
    assert_eq!(model.service_ports[0].cluster_endpoints.len(), 2);
}

#[test]
fn zone_hints_for_other_zones_only_are_ignored() {
    let slice = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.2.10").zone_hints(&["zone-b"]))
        .endpoint(Ep::new("10.244.3.10").zone_hints(&["zone-c"]))
        .build();
    let (model, _) = build_v4(&[web().build()], &[slice]);
    assert_eq!(model.service_ports[0].cluster_endpoints.len(), 2);
}

#[test]
fn node_hints_win_over_zone_hints() {
    let slice = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(
            Ep::new("10.244.1.10")
                .node("node-a")
                .zone_hints(&["zone-a"])
                .node_hints(&["node-a"]),
        )
        .endpoint(
            Ep::new("10.244.1.11")
                .node("node-c")
                .zone_hints(&["zone-a"])
                .node_hints(&["node-c"]),
        )
        .build();
    let (model, _) = build_v4(&[web().build()], &[slice]);
    assert_eq!(
        addresses(&model.service_ports[0].cluster_endpoints),
        ["10.244.1.10:8080"]
    );
}

#[test]
fn headless_external_name_and_other_proxies_are_ignored() {
    let services = [
        web().cluster_ip("None").build(),
        ServiceBuilder::new("default", "ext")
            .type_("ExternalName")
            .port("", 80, "TCP")
            .build(),
        ServiceBuilder::new("default", "other")
            .port("", 80, "TCP")
            .label(LABEL_SERVICE_PROXY_NAME, "someone-else")
            .build(),
        ServiceBuilder::new("default", "pending")
            .cluster_ip("")
            .port("", 80, "TCP")
            .build(),
    ];
    let (model, issues) = build_v4(&services, &[]);
    assert!(model.service_ports.is_empty());
    assert!(issues.is_empty());
}

#[test]
fn addresses_are_normalized() {
    let service = web()
        .cluster_ip(" 010.096.000.010 ")
        .type_("LoadBalancer")
        .node_port(30080)
        .external_ips(&["192.000.002.001"])
        .source_ranges(&[" 203.0.113.7/24 "])
        .ingress("198.051.100.001", None)
        .build();
    let slice = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("010.244.001.010"))
        .build();
    let (model, issues) = build_v4(&[service], &[slice]);
    assert!(issues.is_empty(), "{issues:?}");
    let port = &model.service_ports[0];
    assert_eq!(port.cluster_ip.to_string(), "10.96.0.10");
    assert_eq!(port.external_ips[0].to_string(), "192.0.2.1");
    assert_eq!(port.load_balancer_ips[0].to_string(), "198.51.100.1");
    assert_eq!(
        port.load_balancer_source_ranges[0].to_string(),
        "203.0.113.0/24"
    );
    assert_eq!(addresses(&port.cluster_endpoints), ["10.244.1.10:8080"]);
}

#[test]
fn load_balancer_fields_are_read() {
    let service = web()
        .type_("LoadBalancer")
        .node_port(30080)
        .external_traffic_policy("Local")
        .health_check_node_port(32000)
        .ingress("198.51.100.1", Some("VIP"))
        .ingress("198.51.100.2", Some("Proxy"))
        .ingress("2001:db8::1", None)
        .annotation(ANNOTATION_SOURCE_RANGES, "203.0.113.0/24, 2001:db8::/32")
        .client_ip_affinity(None)
        .build();
    let (model, issues) = build_v4(&[service], &[]);
    assert!(issues.is_empty(), "{issues:?}");
    let port = &model.service_ports[0];
    assert_eq!(port.node_port, Some(30080));
    assert_eq!(port.health_check_node_port, Some(32000));
    assert_eq!(port.external_policy, TrafficPolicy::Local);
    assert_eq!(
        port.load_balancer_ips,
        ["198.51.100.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        port.load_balancer_source_ranges.len(),
        1,
        "annotation, IPv4 part only"
    );
    assert_eq!(
        port.affinity_timeout_seconds,
        Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
    );
}

#[test]
fn external_traffic_policy_local_needs_an_externally_reachable_service() {
    let service = web().external_traffic_policy("Local").build();
    let (model, _) = build_v4(&[service], &[]);
    assert_eq!(
        model.service_ports[0].external_policy,
        TrafficPolicy::Cluster
    );
    assert!(!model.service_ports[0].externally_accessible());
}

#[test]
fn node_ports_of_cluster_ip_services_are_ignored() {
    let service = web().node_port(30080).build();
    let (model, _) = build_v4(&[service], &[]);
    assert_eq!(model.service_ports[0].node_port, None);
}

#[test]
fn families_get_separate_models() {
    let service = web()
        .cluster_ips(&["10.96.0.10", "fd00:96::10"])
        .external_ips(&["192.0.2.1", "2001:db8::1"])
        .build();
    let v4 = SliceBuilder::new("default", "web", "web-v4")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.1.10"))
        .build();
    let v6 = SliceBuilder::new("default", "web", "web-v6")
        .address_type("IPv6")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("fd00:244:1::10"))
        .build();
    let fqdn = SliceBuilder::new("default", "web", "web-fqdn")
        .address_type("FQDN")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("example.com"))
        .build();
    let slices = [v4, v6, fqdn];
    let service = [service];
    let (model4, issues4) = build(&service, &slices, &node(), IpFamily::V4);
    let (model6, issues6) = build(&service, &slices, &node(), IpFamily::V6);
    assert!(issues4.is_empty() && issues6.is_empty());
    assert_eq!(model4.service_ports[0].cluster_ip.to_string(), "10.96.0.10");
    assert_eq!(
        addresses(&model4.service_ports[0].cluster_endpoints),
        ["10.244.1.10:8080"]
    );
    assert_eq!(model4.service_ports[0].external_ips.len(), 1);
    assert_eq!(
        model6.service_ports[0].cluster_ip.to_string(),
        "fd00:96::10"
    );
    assert_eq!(
        addresses(&model6.service_ports[0].cluster_endpoints),
        ["[fd00:244:1::10]:8080"]
    );
    assert_eq!(
        model6.service_ports[0].external_ips[0].to_string(),
        "2001:db8::1"
    );

    let v4_only = [web().build()];
    let (model6, _) = build(&v4_only, &slices, &node(), IpFamily::V6);
    assert!(model6.service_ports.is_empty());
}

#[test]
fn bad_fields_are_reported_with_object_and_field() {
    let services = [
        ServiceBuilder::new("default", "bad-ip")
            .cluster_ip("10.96.0.300")
            .port("", 80, "TCP")
            .build(),
        ServiceBuilder::new("default", "bad-range")
            .type_("LoadBalancer")
            .port("", 80, "TCP")
            .source_ranges(&["not-a-cidr"])
            .build(),
        ServiceBuilder::new("default", "bad-proto")
            .port("a", 80, "ICMP")
            .port("b", 81, "TCP")
            .build(),
    ];
    let slice = SliceBuilder::new("default", "bad-proto", "s1")
        .port("b", 81, "TCP")
        .endpoint(Ep::new("10.244.1.999"))
        .build();
    let (model, issues) = build_v4(&services, &[slice]);
    let messages: Vec<String> = issues.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 4, "{messages:#?}");
    assert!(messages[0].starts_with("EndpointSlice default/s1: endpoints[0].addresses[0]:"));
    assert!(messages[1].starts_with("Service default/bad-ip: spec.clusterIP:"));
    assert!(
        messages[2].starts_with("Service default/bad-range: spec.loadBalancerSourceRanges[0]:")
    );
    assert!(messages[3].starts_with("Service default/bad-proto: spec.ports[0].protocol:"));
    // Everything usable is still there.
    assert_eq!(model.service_ports.len(), 1);
    assert_eq!(
        model.service_ports[0].name.to_string(),
        "default/bad-proto:b"
    );
}

#[test]
fn slices_of_headless_services_or_other_proxies_are_ignored() {
    let headless = SliceBuilder::new("default", "web", "web-1")
        .label(LABEL_HEADLESS, "")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.1.10"))
        .build();
    let (model, _) = build_v4(&[web().build()], &[headless]);
    assert!(!model.service_ports[0].has_endpoints);
}

#[test]
fn internal_traffic_policy_local_uses_local_endpoints_only() {
    let service = web().internal_traffic_policy("Local").build();
    let slice = SliceBuilder::new("default", "web", "web-1")
        .port("http", 8080, "TCP")
        .endpoint(Ep::new("10.244.2.10").node("node-b"))
        .build();
    let (model, _) = build_v4(&[service], &[slice]);
    let port = &model.service_ports[0];
    assert!(port.has_endpoints, "endpoints exist elsewhere");
    assert!(
        port.cluster_endpoints.is_empty(),
        "ITP=Local without external access needs no cluster list"
    );
    assert!(port.local_endpoints.is_empty());
}

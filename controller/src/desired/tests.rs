//! What a user's Service turns into: exact load balancer, listeners, target
//! groups, health checks, tags and SG rules.

use super::*;
use crate::annotations::keys;
use crate::fixtures::{EndpointSliceBuilder, NodeBuilder, ServiceBuilder, cluster_config, port};
use crate::model::{SecurityGroupRef, SubnetRef};

// Names pinned from an independent computation (Python hashlib), so a change
// to the naming scheme — which would replace every user's NLB — fails here.
const LB_NAME: &str = "k8s-default-web-232ef101b7";
const TG80_NAME: &str = "k8s-default-web-8c557551d4";
const SG_NAME: &str = "k8s-default-web-18e1e651d4";

fn nodes() -> Vec<Node> {
    vec![
        NodeBuilder::new("node-b", "i-0bbb").build(),
        NodeBuilder::new("node-a", "i-0aaa").build(),
    ]
}

fn build(svc: Service) -> Desired {
    desired(&svc, &nodes(), &[], &cluster_config()).unwrap()
}

fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn tags_for(resource: &str) -> BTreeMap<String, String> {
    strings(&[
        ("causeway.dev/resource", resource),
        ("causeway.dev/service-uid", "uid-web"),
        ("kubernetes.io/cluster/prod", "owned"),
        ("kubernetes.io/service-name", "default/web"),
    ])
}

fn targets(pairs: &[(&str, u16)]) -> Vec<Target> {
    pairs
        .iter()
        .map(|(id, port)| Target {
            id: id.to_string(),
            port: *port,
        })
        .collect()
}

#[test]
fn ownership_follows_type_and_class() {
    let cfg = cluster_config();
    let default_cfg = ClusterConfig {
        default_class: true,
        ..cluster_config()
    };
    let cases = [
        (ServiceBuilder::new().build(), &cfg, Ok(())),
        (
            ServiceBuilder::new().type_("NodePort").build(),
            &cfg,
            Err("spec.type is NodePort, not LoadBalancer"),
        ),
        (
            ServiceBuilder::new()
                .class(Some("service.k8s.aws/nlb"))
                .build(),
            &default_cfg,
            Err("spec.loadBalancerClass is service.k8s.aws/nlb, not causeway.dev/nlb"),
        ),
        (
            ServiceBuilder::new().class(None).build(),
            &cfg,
            Err(
                "spec.loadBalancerClass is unset and --default-class is off (want causeway.dev/nlb)",
            ),
        ),
        (
            ServiceBuilder::new().class(None).build(),
            &default_cfg,
            Ok(()),
        ),
    ];
    for (svc, cfg, want) in cases {
        assert_eq!(ownership(&svc, cfg), want.map_err(str::to_string));
    }
    assert_eq!(
        desired(
            &ServiceBuilder::new().type_("ClusterIP").build(),
            &[],
            &[],
            &cfg
        ),
        Err(DesiredError::NotOwned {
            reason: "spec.type is ClusterIP, not LoadBalancer".into()
        })
    );
}

#[test]
fn node_eligibility_rules() {
    let pool_web = [NodeLabelRequirement {
        key: "pool".into(),
        value: Some("web".into()),
    }];
    let cases: Vec<(Node, &[NodeLabelRequirement], NodeEligibility)> = vec![
        (
            NodeBuilder::new("n", "i-0abc").build(),
            &[],
            NodeEligibility::Eligible {
                instance_id: "i-0abc".into(),
            },
        ),
        (
            NodeBuilder::new("n", "i-0abc").deleting().build(),
            &[],
            NodeEligibility::Ineligible {
                reason: "being deleted",
            },
        ),
        (
            NodeBuilder::new("n", "i-0abc")
                .label(EXCLUDE_LABEL, "")
                .build(),
            &[],
            NodeEligibility::Ineligible {
                reason: "labelled node.kubernetes.io/exclude-from-external-load-balancers",
            },
        ),
        (
            NodeBuilder::new("n", "i-0abc")
                .taint(AUTOSCALER_TAINT, "NoSchedule")
                .build(),
            &[],
            NodeEligibility::Ineligible {
                reason: "tainted ToBeDeletedByClusterAutoscaler",
            },
        ),
        (
            NodeBuilder::new("n", "i-0abc")
                .taint(KARPENTER_TAINT, "NoSchedule")
                .build(),
            &[],
            NodeEligibility::Ineligible {
                reason: "tainted karpenter.sh/disrupted",
            },
        ),
        (
            NodeBuilder::new("n", "i-0abc").label("pool", "db").build(),
            &pool_web,
            NodeEligibility::Ineligible {
                reason: "does not match aws-load-balancer-target-node-labels",
            },
        ),
        (
            NodeBuilder::new("n", "i-0abc").label("pool", "web").build(),
            &pool_web,
            NodeEligibility::Eligible {
                instance_id: "i-0abc".into(),
            },
        ),
        (
            NodeBuilder::new("n", "").provider_id(None).build(),
            &[],
            NodeEligibility::NoInstanceId { provider_id: None },
        ),
        (
            NodeBuilder::new("n", "")
                .provider_id(Some("kind://docker/kind/kind-worker"))
                .build(),
            &[],
            NodeEligibility::NoInstanceId {
                provider_id: Some("kind://docker/kind/kind-worker".into()),
            },
        ),
    ];
    for (node, labels, want) in cases {
        assert_eq!(node_eligibility(&node, labels), want);
    }
}

#[test]
fn provider_id_parsing() {
    let cases = [
        (
            "aws:///us-east-1a/i-0123456789abcdef0",
            Some("i-0123456789abcdef0"),
        ),
        ("aws:////i-0abc", Some("i-0abc")),
        ("aws:///us-east-1a/i-", None),
        ("aws:///us-east-1a/i-xyz", None),
        ("aws:///us-east-1a/fargate-ip-10-0-0-1", None),
        ("gce://project/zone/i-0abc", None),
        ("", None),
    ];
    for (input, want) in cases {
        assert_eq!(instance_id_from_provider_id(input), want, "{input}");
    }
}

#[test]
fn names_are_short_stable_and_sanitised() {
    assert_eq!(
        resource_name("default", "web", &["prod", "uid-web", "internet-facing"]),
        LB_NAME
    );
    let long = resource_name(
        "kube-system",
        "my.very-long-service",
        &["prod", "u", "internal"],
    );
    assert_eq!(long, "k8s-kubesyst-myverylo-11a0e61eb7");
    assert_eq!(long.len(), 32);
    assert!(annotations::valid_lb_name(&long));
}

#[test]
fn one_port_service_etp_cluster() {
    let d = desired(
        &ServiceBuilder::new().build(),
        &[
            NodeBuilder::new("node-b", "i-0bbb").build(),
            NodeBuilder::new("node-a", "i-0aaa").build(),
            NodeBuilder::new("kind-node", "")
                .provider_id(Some("kind://x"))
                .build(),
            NodeBuilder::new("draining", "i-0ccc")
                .taint(AUTOSCALER_TAINT, "NoSchedule")
                .build(),
        ],
        &[],
        &cluster_config(),
    )
    .unwrap();
    assert_eq!(
        d.load_balancer,
        LoadBalancer {
            name: LB_NAME.into(),
            name_is_generated: true,
            scheme: Scheme::InternetFacing,
            ip_address_type: IpAddressType::Ipv4,
            subnets: SubnetSelection::Discover,
            security_groups: vec![SecurityGroupSelection::Managed],
            attributes: strings(&[
                ("access_logs.s3.bucket", ""),
                ("access_logs.s3.enabled", "false"),
                ("access_logs.s3.prefix", ""),
                ("deletion_protection.enabled", "false"),
                ("dns_record.client_routing_policy", "any_availability_zone"),
                ("ipv6.deny_all_igw_traffic", "false"),
                ("load_balancing.cross_zone.enabled", "false"),
                ("zonal_shift.config.enabled", "false"),
            ]),
            enforce_sg_inbound_rules_on_private_link: true,
            tags: tags_for("lb"),
        }
    );
    assert_eq!(
        d.listeners,
        vec![Listener {
            port: 80,
            protocol: Protocol::Tcp,
            certificates: vec![],
            ssl_policy: None,
            alpn_policy: None,
            target_group: TG80_NAME.into(),
            attributes: strings(&[("tcp.idle_timeout.seconds", "350")]),
        }]
    );
    assert_eq!(
        d.target_groups,
        vec![TargetGroup {
            name: TG80_NAME.into(),
            port: 80,
            protocol: Protocol::Tcp,
            target_type: TargetType::Instance,
            ip_address_type: TargetGroupIpAddressType::Ipv4,
            health_check: HealthCheck {
                protocol: HealthCheckProtocol::Http,
                port: HealthCheckPort::Port(10256),
                path: Some("/healthz".into()),
                interval_seconds: 10,
                timeout_seconds: 6,
                healthy_threshold: 3,
                unhealthy_threshold: 3,
                success_codes: Some("200-399".into()),
            },
            attributes: strings(&[
                (
                    "deregistration_delay.connection_termination.enabled",
                    "false"
                ),
                ("deregistration_delay.timeout_seconds", "300"),
                (
                    "load_balancing.cross_zone.enabled",
                    "use_load_balancer_configuration"
                ),
                ("preserve_client_ip.enabled", "true"),
                ("proxy_protocol_v2.enabled", "false"),
                ("stickiness.enabled", "false"),
                ("stickiness.type", "source_ip"),
                (
                    "target_group_health.dns_failover.minimum_healthy_targets.count",
                    "1"
                ),
                (
                    "target_group_health.dns_failover.minimum_healthy_targets.percentage",
                    "off"
                ),
                (
                    "target_group_health.unhealthy_state_routing.minimum_healthy_targets.count",
                    "1"
                ),
                (
                    "target_group_health.unhealthy_state_routing.minimum_healthy_targets.percentage",
                    "off"
                ),
                (
                    "target_health_state.unhealthy.connection_termination.enabled",
                    "true"
                ),
                (
                    "target_health_state.unhealthy.draining_interval_seconds",
                    "0"
                ),
            ]),
            targets: targets(&[("i-0aaa", 30080), ("i-0bbb", 30080)]),
            tags: tags_for("tg-80-tcp"),
        }]
    );
    assert_eq!(
        d.skipped_nodes,
        vec![SkippedNode {
            node: "kind-node".into(),
            reason: "spec.providerID \"kind://x\" is not aws:///<zone>/i-<id>".into(),
        }]
    );
    let sg = d.frontend_security_group.as_ref().unwrap();
    assert_eq!(sg.name, SG_NAME);
    assert_eq!(sg.tags, tags_for("sg"));
    assert_eq!(
        sg.ingress,
        vec![SgRule {
            protocol: IpProtocol::Tcp,
            from_port: 80,
            to_port: 80,
            source: RuleSource::Cidr(Cidr::ANY_V4),
            description: "causeway uid-web listener 80/tcp".into(),
        }]
    );
    assert_eq!(
        d.backend_rules
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["tcp 10256 from managed-sg", "tcp 30080 from managed-sg"]
    );
    assert!(!d.has_no_targets());
}

#[test]
fn etp_local_checks_the_health_check_node_port() {
    let d = build(ServiceBuilder::new().etp_local(32000).build());
    assert_eq!(
        d.target_groups[0].health_check,
        HealthCheck {
            protocol: HealthCheckProtocol::Http,
            port: HealthCheckPort::Port(32000),
            path: Some("/healthz".into()),
            interval_seconds: 10,
            timeout_seconds: 6,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            success_codes: Some("200-399".into()),
        }
    );
    assert_eq!(
        d.backend_rules
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["tcp 30080 from managed-sg", "tcp 32000 from managed-sg"]
    );
}

#[test]
fn health_check_annotations_override_defaults() {
    let d = build(
        ServiceBuilder::new()
            .etp_local(32000)
            .annotation(keys::HEALTHCHECK_PROTOCOL, "TCP")
            .annotation(keys::HEALTHCHECK_PORT, "traffic-port")
            .annotation(keys::HEALTHCHECK_INTERVAL, "30")
            .annotation(keys::HEALTHCHECK_HEALTHY_THRESHOLD, "5")
            .build(),
    );
    assert_eq!(
        d.target_groups[0].health_check,
        HealthCheck {
            protocol: HealthCheckProtocol::Tcp,
            port: HealthCheckPort::TrafficPort,
            path: None,
            interval_seconds: 30,
            timeout_seconds: 6,
            healthy_threshold: 5,
            unhealthy_threshold: 2,
            success_codes: None,
        }
    );
    let d = build(
        ServiceBuilder::new()
            .annotation(keys::HEALTHCHECK_PATH, "/ready")
            .annotation(keys::HEALTHCHECK_SUCCESS_CODES, "200")
            .build(),
    );
    assert_eq!(
        d.target_groups[0].health_check.path.as_deref(),
        Some("/ready")
    );
    assert_eq!(
        d.target_groups[0].health_check.success_codes.as_deref(),
        Some("200")
    );
}

#[test]
fn tcp_and_udp_on_one_number_make_one_tcp_udp_listener() {
    let d = build(
        ServiceBuilder::new()
            .ports(vec![
                port("dns-udp", 53, "UDP", 30053),
                port("dns-tcp", 53, "TCP", 30053),
            ])
            .port("metrics", 9100, "TCP", 30100)
            .build(),
    );
    assert_eq!(
        d.listeners
            .iter()
            .map(|l| (l.port, l.protocol))
            .collect::<Vec<_>>(),
        vec![(53, Protocol::TcpUdp), (9100, Protocol::Tcp)]
    );
    let tg = &d.target_groups[0];
    assert_eq!((tg.port, tg.protocol), (53, Protocol::TcpUdp));
    assert_eq!(tg.tags["causeway.dev/resource"], "tg-53-tcp_udp");
    assert_eq!(tg.targets, targets(&[("i-0aaa", 30053), ("i-0bbb", 30053)]));
    assert_eq!(
        d.frontend_security_group
            .unwrap()
            .ingress
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![
            "tcp 53 from 0.0.0.0/0",
            "tcp 9100 from 0.0.0.0/0",
            "udp 53 from 0.0.0.0/0"
        ]
    );
    assert_eq!(
        d.backend_rules
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec![
            "tcp 10256 from managed-sg",
            "tcp 30053 from managed-sg",
            "tcp 30100 from managed-sg",
            "udp 30053 from managed-sg"
        ]
    );
}

#[test]
fn tcp_udp_needs_one_node_port() {
    let svc = ServiceBuilder::new()
        .ports(vec![
            port("dns-udp", 53, "UDP", 30053),
            port("dns-tcp", 53, "TCP", 30054),
        ])
        .build();
    assert_eq!(
        desired(&svc, &nodes(), &[], &cluster_config())
            .unwrap_err()
            .to_string(),
        "spec.ports: TCP and UDP port 53 share one TCP_UDP listener, so they need the same nodePort (have 30053 and 30054); set nodePort explicitly on both"
    );
    let sctp = ServiceBuilder::new().port("sctp", 9, "SCTP", 30009).build();
    assert_eq!(
        desired(&sctp, &nodes(), &[], &cluster_config())
            .unwrap_err()
            .to_string(),
        "spec.ports: port 9 uses SCTP; a Network Load Balancer carries TCP and UDP only"
    );
}

#[test]
fn tls_listeners_from_ssl_annotations() {
    let cert = "arn:aws:acm:us-east-1:123456789012:certificate/abc";
    let svc = ServiceBuilder::new()
        .port("https", 443, "TCP", 30443)
        .annotation(keys::SSL_CERT, cert)
        .annotation(keys::SSL_PORTS, "https")
        .annotation(keys::ALPN_POLICY, "HTTP2Preferred")
        .build();
    let d = build(svc.clone());
    let tls = &d.listeners[1];
    assert_eq!(
        (
            tls.port,
            tls.protocol,
            tls.certificates.clone(),
            tls.ssl_policy.as_deref(),
            tls.alpn_policy
        ),
        (
            443,
            Protocol::Tls,
            vec![cert.to_string()],
            Some("ELBSecurityPolicy-TLS13-1-2-2021-06"),
            Some(AlpnPolicyForTest::Http2Preferred)
        )
    );
    assert_eq!(d.listeners[0].protocol, Protocol::Tcp);
    // TLS terminates at the NLB; targets get plain TCP unless backend-protocol ssl.
    assert_eq!(d.target_groups[1].protocol, Protocol::Tcp);
    let mut with_ssl_backend = svc;
    with_ssl_backend
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert(keys::BACKEND_PROTOCOL.into(), "ssl".into());
    let d2 = build(with_ssl_backend);
    assert_eq!(d2.target_groups[1].protocol, Protocol::Tls);
    assert_eq!(
        d2.target_groups[1].tags["causeway.dev/resource"],
        "tg-443-tls"
    );
    // Protocol is immutable on a target group, so it is in the name.
    assert_ne!(d2.target_groups[1].name, d.target_groups[1].name);
    assert_eq!(d2.target_groups[0].name, d.target_groups[0].name);
}

use crate::model::AlpnPolicy as AlpnPolicyForTest;

#[test]
fn ip_targets_use_ready_pod_ips_from_this_services_slices() {
    let svc = ServiceBuilder::new()
        .annotation(keys::NLB_TARGET_TYPE, "ip")
        .build();
    let slices = vec![
        EndpointSliceBuilder::new("web", "web-1")
            .port("http", 8080, "TCP")
            .endpoint("10.1.0.5", true)
            .endpoint("10.1.0.6", false)
            .build(),
        EndpointSliceBuilder::new("web", "web-2")
            .port("http", 8080, "TCP")
            .endpoint("10.1.1.7", true)
            .build(),
        EndpointSliceBuilder::new("other", "other-1")
            .port("http", 9999, "TCP")
            .endpoint("10.9.9.9", true)
            .build(),
    ];
    let d = desired(&svc, &nodes(), &slices, &cluster_config()).unwrap();
    let tg = &d.target_groups[0];
    assert_eq!(tg.target_type, TargetType::Ip);
    assert_eq!(
        tg.targets,
        targets(&[("10.1.0.5", 8080), ("10.1.1.7", 8080)])
    );
    assert_eq!(tg.attributes["preserve_client_ip.enabled"], "false");
    assert_eq!(
        tg.health_check,
        HealthCheck {
            protocol: HealthCheckProtocol::Tcp,
            port: HealthCheckPort::TrafficPort,
            path: None,
            interval_seconds: 10,
            timeout_seconds: 10,
            healthy_threshold: 3,
            unhealthy_threshold: 3,
            success_codes: None,
        }
    );
    assert_eq!(
        d.backend_rules
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["tcp 8080 from managed-sg"]
    );
    // Target type is immutable on a target group: a different name.
    assert_ne!(tg.name, TG80_NAME);
}

fn ip_service() -> ServiceBuilder {
    ServiceBuilder::new().annotation(keys::NLB_TARGET_TYPE, "ip")
}

fn ip_desired(svc: Service, slices: &[EndpointSlice]) -> Desired {
    desired(&svc, &nodes(), slices, &cluster_config()).unwrap()
}

#[test]
fn ip_targets_skip_terminating_endpoints_and_take_unknown_readiness_as_ready() {
    let d = ip_desired(
        ip_service().build(),
        &[EndpointSliceBuilder::new("web", "web-1")
            .port("http", 8080, "TCP")
            .endpoint("10.1.0.5", true)
            .terminating_endpoint("10.1.0.6")
            .endpoint("10.1.0.7", false)
            // Hand-written: no conditions (ready unknown ⇒ ready), and only
            // the first of fungible addresses is a target.
            .raw_endpoint(&["10.1.0.8", "10.1.0.9"])
            .build()],
    );
    assert_eq!(
        d.target_groups[0].targets,
        targets(&[("10.1.0.5", 8080), ("10.1.0.8", 8080)])
    );
}

#[test]
fn ip_targets_are_deduplicated_and_sorted_across_slices() {
    // An endpoint moving between slices shows up in both for a moment.
    let d = ip_desired(
        ip_service().build(),
        &[
            EndpointSliceBuilder::new("web", "web-2")
                .port("http", 8080, "TCP")
                .endpoint("10.1.0.30", true)
                .endpoint("10.1.0.4", true)
                .build(),
            EndpointSliceBuilder::new("web", "web-1")
                .port("http", 8080, "TCP")
                .endpoint("10.1.0.4", true)
                .endpoint("10.1.0.200", true)
                .build(),
        ],
    );
    let tg = &d.target_groups[0];
    assert_eq!(
        tg.targets,
        targets(&[
            ("10.1.0.200", 8080),
            ("10.1.0.30", 8080),
            ("10.1.0.4", 8080)
        ])
    );
    assert!(tg.targets.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn ip_target_port_comes_from_the_slice_port_named_like_the_service_port() {
    let mut http = port("http", 80, "TCP", 30080);
    http.target_port = Some(IntOrString::String("web".into()));
    let mut metrics = port("metrics", 9090, "TCP", 30090);
    metrics.target_port = Some(IntOrString::Int(9100));
    let svc = ip_service().ports(vec![http, metrics]).build();
    let d = ip_desired(
        svc,
        &[
            // A named targetPort resolves per pod: two generations of pods,
            // two slices, two ports.
            EndpointSliceBuilder::new("web", "web-old")
                .port("metrics", 9100, "TCP")
                .port("http", 8080, "TCP")
                .endpoint("10.1.0.5", true)
                .build(),
            EndpointSliceBuilder::new("web", "web-new")
                .port("http", 8081, "TCP")
                .port("metrics", 9100, "TCP")
                .endpoint("10.1.0.6", true)
                .build(),
            // Pods without the named port: the controller publishes no port
            // for it, so they serve `metrics` only, never `http`.
            EndpointSliceBuilder::new("web", "web-sidecar")
                .port("metrics", 9100, "TCP")
                .endpoint("10.1.0.7", true)
                .build(),
            // Same name, other protocol: not this port.
            EndpointSliceBuilder::new("web", "web-udp")
                .port("http", 5353, "UDP")
                .endpoint("10.1.0.8", true)
                .build(),
        ],
    );
    let by_port: BTreeMap<u16, Vec<Target>> = d
        .target_groups
        .iter()
        .map(|tg| (tg.port, tg.targets.clone()))
        .collect();
    assert_eq!(
        by_port[&80],
        targets(&[("10.1.0.5", 8080), ("10.1.0.6", 8081)])
    );
    assert_eq!(
        by_port[&9090],
        targets(&[("10.1.0.5", 9100), ("10.1.0.6", 9100), ("10.1.0.7", 9100)])
    );
    let rules: Vec<String> = d.backend_rules.iter().map(ToString::to_string).collect();
    assert_eq!(
        rules,
        [
            "tcp 8080 from managed-sg",
            "tcp 8081 from managed-sg",
            "tcp 9100 from managed-sg"
        ]
    );
}

#[test]
fn ip_target_security_rules_do_not_follow_endpoint_readiness() {
    let slice = |ready: bool| {
        EndpointSliceBuilder::new("web", "web-1")
            .port("http", 80, "TCP")
            .endpoint("10.1.0.5", ready)
            .build()
    };
    let ready = ip_desired(ip_service().build(), &[slice(true)]);
    let unready = ip_desired(ip_service().build(), &[slice(false)]);
    // No slice yet: a numeric targetPort still says which port pods listen on.
    let none = ip_desired(ip_service().build(), &[]);
    assert!(unready.has_no_targets());
    assert_eq!(ready.backend_rules, unready.backend_rules);
    assert_eq!(ready.backend_rules, none.backend_rules);
    assert_eq!(
        ready
            .backend_rules
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["tcp 80 from managed-sg"]
    );
}

#[test]
fn ip_targets_use_the_family_of_the_target_group() {
    let slices = [
        EndpointSliceBuilder::new("web", "web-v4")
            .port("http", 80, "TCP")
            .endpoint("10.1.0.5", true)
            .build(),
        EndpointSliceBuilder::new("web", "web-v6")
            .ipv6()
            .port("http", 80, "TCP")
            .endpoint("fd00:0:0:0::5", true)
            .build(),
    ];
    // IPv4 Service (or an ipv4 NLB): ipv4 group, IPv4 slices.
    for svc in [
        ip_service().ip_families(&["IPv4"]).build(),
        ip_service().ip_families(&["IPv4", "IPv6"]).build(),
        ip_service().build(),
    ] {
        let d = ip_desired(svc, &slices);
        let tg = &d.target_groups[0];
        assert_eq!(tg.ip_address_type, TargetGroupIpAddressType::Ipv4);
        assert_eq!(tg.targets, targets(&[("10.1.0.5", 80)]));
    }
    let v4_name = ip_desired(ip_service().build(), &slices).target_groups[0]
        .name
        .clone();

    // IPv6 on a dualstack NLB (as aws-load-balancer-controller): ipv6 group,
    // IPv6 slices, addresses in canonical form, a group of its own.
    for families in [&["IPv6"][..], &["IPv4", "IPv6"][..]] {
        let svc = ip_service()
            .annotation(keys::IP_ADDRESS_TYPE, "dualstack")
            .ip_families(families)
            .build();
        let d = ip_desired(svc, &slices);
        let tg = &d.target_groups[0];
        assert_eq!(tg.ip_address_type, TargetGroupIpAddressType::Ipv6);
        assert_eq!(tg.targets, targets(&[("fd00::5", 80)]));
        assert_ne!(tg.name, v4_name, "the family cannot change in place");
    }

    // IPv6-only on an ipv4 NLB has no usable address: said, not left empty.
    let err = desired(
        &ip_service().ip_families(&["IPv6"]).build(),
        &nodes(),
        &slices,
        &cluster_config(),
    )
    .unwrap_err();
    assert_eq!(err.label(), "invalid_service");
    assert!(err.to_string().contains(keys::IP_ADDRESS_TYPE), "{err}");

    // Instance targets stay ipv4 whatever the families.
    let d = build(
        ServiceBuilder::new()
            .annotation(keys::IP_ADDRESS_TYPE, "dualstack")
            .ip_families(&["IPv6"])
            .build(),
    );
    assert_eq!(
        d.target_groups[0].ip_address_type,
        TargetGroupIpAddressType::Ipv4
    );
    assert_eq!(d.target_groups[0].name, TG80_NAME);
}

#[test]
fn ip_targets_need_no_node_port() {
    // `allocateLoadBalancerNodePorts: false`: fine for pods, not for nodes.
    let mut http = port("http", 80, "TCP", 0);
    http.node_port = None;
    let slices = [EndpointSliceBuilder::new("web", "web-1")
        .port("http", 80, "TCP")
        .endpoint("10.1.0.5", true)
        .build()];
    let d = ip_desired(ip_service().ports(vec![http.clone()]).build(), &slices);
    assert_eq!(d.target_groups[0].targets, targets(&[("10.1.0.5", 80)]));
    let err = desired(
        &ServiceBuilder::new().ports(vec![http]).build(),
        &nodes(),
        &slices,
        &cluster_config(),
    )
    .unwrap_err();
    assert_eq!(err.label(), "invalid_service");
}

#[test]
fn endpoints_matter_only_to_owned_ip_target_services() {
    let cfg = cluster_config();
    assert!(may_use_ip_targets(&ip_service().build(), &cfg));
    assert!(may_use_ip_targets(
        &ServiceBuilder::new()
            .annotation(keys::TYPE, "nlb-ip")
            .build(),
        &cfg
    ));
    assert!(!may_use_ip_targets(&ServiceBuilder::new().build(), &cfg));
    assert!(!may_use_ip_targets(
        &ip_service().class(Some("other")).build(),
        &cfg
    ));
    // An instance-target Service ignores slices entirely.
    let slices = [EndpointSliceBuilder::new("web", "web-1")
        .port("http", 80, "TCP")
        .endpoint("10.1.0.5", true)
        .build()];
    let svc = ServiceBuilder::new().build();
    assert_eq!(
        desired(&svc, &nodes(), &slices, &cfg).unwrap(),
        desired(&svc, &nodes(), &[], &cfg).unwrap()
    );
}

#[test]
fn source_ranges_spec_wins_over_annotation() {
    let d = build(
        ServiceBuilder::new()
            .source_ranges(&["203.0.113.0/24", " 198.51.100.7/32"])
            .annotation(annotations::SOURCE_RANGES, "10.0.0.0/8")
            .build(),
    );
    assert_eq!(
        d.frontend_security_group
            .unwrap()
            .ingress
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["tcp 80 from 198.51.100.7/32", "tcp 80 from 203.0.113.0/24"]
    );
    let d = build(
        ServiceBuilder::new()
            .annotation(annotations::SOURCE_RANGES, "10.0.0.0/8")
            .annotation(keys::IP_ADDRESS_TYPE, "dualstack")
            .build(),
    );
    assert_eq!(
        d.frontend_security_group.unwrap().ingress[0].source,
        RuleSource::Cidr(Cidr::parse("10.0.0.0/8").unwrap())
    );
    let d = build(
        ServiceBuilder::new()
            .annotation(keys::IP_ADDRESS_TYPE, "dualstack")
            .build(),
    );
    assert_eq!(
        d.frontend_security_group
            .unwrap()
            .ingress
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["tcp 80 from 0.0.0.0/0", "tcp 80 from ::/0"]
    );
    let bad = ServiceBuilder::new().source_ranges(&["10.0.0.0"]).build();
    assert_eq!(
        desired(&bad, &nodes(), &[], &cluster_config())
            .unwrap_err()
            .to_string(),
        "spec.loadBalancerSourceRanges: \"10.0.0.0\" is not a CIDR (e.g. 203.0.113.0/24)"
    );
}

#[test]
fn user_security_groups_replace_the_managed_one() {
    let d = build(
        ServiceBuilder::new()
            .annotation(keys::SECURITY_GROUPS, "sg-0aaa")
            .annotation(keys::EXTRA_SECURITY_GROUPS, "extra")
            .build(),
    );
    assert_eq!(d.frontend_security_group, None);
    assert_eq!(
        d.load_balancer.security_groups,
        vec![
            SecurityGroupSelection::User(SecurityGroupRef::Id("sg-0aaa".into())),
            SecurityGroupSelection::User(SecurityGroupRef::Name("extra".into())),
        ]
    );
    assert!(d.backend_rules.is_empty());
    let d = build(
        ServiceBuilder::new()
            .annotation(keys::SECURITY_GROUPS, "sg-0aaa")
            .annotation(keys::MANAGE_BACKEND_SG_RULES, "true")
            .build(),
    );
    assert_eq!(
        d.backend_rules
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["tcp 10256 from sg-0aaa", "tcp 30080 from sg-0aaa"]
    );
}

#[test]
fn name_scheme_subnets_addresses_attributes_tags_from_annotations() {
    let d = build(
        ServiceBuilder::new()
            .annotation(keys::NAME, "web-public")
            .annotation(keys::SUBNETS, "subnet-0a,public-b")
            .annotation(keys::EIP_ALLOCATIONS, "eipalloc-01,eipalloc-02")
            .annotation(keys::CROSS_ZONE, "true")
            .annotation(
                keys::TARGET_GROUP_ATTRIBUTES,
                "deregistration_delay.timeout_seconds=30",
            )
            .annotation(keys::ADDITIONAL_RESOURCE_TAGS, "team=web")
            .build(),
    );
    let lb = &d.load_balancer;
    assert_eq!(
        (lb.name.as_str(), lb.name_is_generated),
        ("web-public", false)
    );
    assert_eq!(
        lb.subnets,
        SubnetSelection::Explicit(vec![
            SubnetMapping {
                subnet: SubnetRef::Id("subnet-0a".into()),
                allocation_id: Some("eipalloc-01".into()),
                private_ipv4: None,
                ipv6: None,
            },
            SubnetMapping {
                subnet: SubnetRef::Name("public-b".into()),
                allocation_id: Some("eipalloc-02".into()),
                private_ipv4: None,
                ipv6: None,
            },
        ])
    );
    assert_eq!(lb.attributes["load_balancing.cross_zone.enabled"], "true");
    assert_eq!(
        d.target_groups[0].attributes["deregistration_delay.timeout_seconds"],
        "30"
    );
    for t in [
        &lb.tags,
        &d.target_groups[0].tags,
        &d.frontend_security_group.as_ref().unwrap().tags,
    ] {
        assert_eq!(t["team"], "web");
    }
    // Internal scheme: a different generated LB name, hence different TG names.
    let internal = build(
        ServiceBuilder::new()
            .annotation(keys::SCHEME, "internal")
            .build(),
    );
    assert_ne!(internal.load_balancer.name, LB_NAME);
    assert_ne!(internal.target_groups[0].name, TG80_NAME);
}

#[test]
fn node_port_change_keeps_the_target_group() {
    let before = build(ServiceBuilder::new().build());
    let after = build(
        ServiceBuilder::new()
            .ports(vec![port("http", 80, "TCP", 31000)])
            .build(),
    );
    assert_eq!(before.target_groups[0].name, after.target_groups[0].name);
    assert_eq!(
        after.target_groups[0].targets,
        targets(&[("i-0aaa", 31000), ("i-0bbb", 31000)])
    );
}

#[test]
fn invalid_annotations_are_an_error_not_a_partial_result() {
    let svc = ServiceBuilder::new()
        .annotation(keys::SCHEME, "public")
        .build();
    let err = desired(&svc, &nodes(), &[], &cluster_config()).unwrap_err();
    assert_eq!(err.label(), "invalid_value");
    assert_eq!(
        err.to_string(),
        "service.beta.kubernetes.io/aws-load-balancer-scheme: invalid value \"public\"; accepted: internet-facing, internal"
    );
}

#[test]
fn no_eligible_nodes_is_reported_not_an_error() {
    let d = desired(&ServiceBuilder::new().build(), &[], &[], &cluster_config()).unwrap();
    assert!(d.has_no_targets());
    // SG rules do not depend on nodes, so a node joining later changes targets only.
    assert_eq!(
        d.backend_rules,
        build(ServiceBuilder::new().build()).backend_rules
    );
}

#[test]
fn etp_local_without_health_check_node_port_is_explained() {
    let mut svc = ServiceBuilder::new().etp_local(0).build();
    svc.spec.as_mut().unwrap().health_check_node_port = None;
    assert_eq!(
        desired(&svc, &nodes(), &[], &cluster_config())
            .unwrap_err()
            .to_string(),
        "spec.healthCheckNodePort: externalTrafficPolicy is Local but no healthCheckNodePort is allocated yet"
    );
}

#[test]
fn a_health_check_timeout_longer_than_its_interval_is_refused_before_any_write() {
    let refused = |pairs: &[(&str, &str)]| {
        let mut svc = ServiceBuilder::new();
        for (k, v) in pairs {
            svc = svc.annotation(k, v);
        }
        match desired(&svc.build(), &nodes(), &[], &cluster_config()) {
            Err(DesiredError::InvalidAnnotations(errors)) => errors.to_string(),
            other => panic!("{pairs:?}: {other:?}"),
        }
    };
    // Against the default interval (10 s), the timeout is to blame...
    assert_eq!(
        refused(&[(keys::HEALTHCHECK_TIMEOUT, "30")]),
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-timeout: value \"30\" conflicts with service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval; accepted: a health-check timeout no longer than its interval (here timeout 30 s, interval 10 s)"
    );
    // ... against the default timeout (6 s for HTTP), the interval.
    assert_eq!(
        refused(&[(keys::HEALTHCHECK_INTERVAL, "5")]),
        "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval: value \"5\" conflicts with service.beta.kubernetes.io/aws-load-balancer-healthcheck-timeout; accepted: a health-check timeout no longer than its interval (here timeout 6 s, interval 5 s)"
    );
    // Equal is accepted (aws-load-balancer-controller's NLB defaults are 10/10).
    let d = build(
        ServiceBuilder::new()
            .annotation(keys::HEALTHCHECK_INTERVAL, "5")
            .annotation(keys::HEALTHCHECK_TIMEOUT, "5")
            .build(),
    );
    let hc = &d.target_groups[0].health_check;
    assert_eq!((hc.interval_seconds, hc.timeout_seconds), (5, 5));
}

#[test]
fn alpn_none_is_no_policy() {
    let cert = "arn:aws:acm:us-east-1:123456789012:certificate/a";
    let with_alpn = |alpn: &str| {
        build(
            ServiceBuilder::new()
                .annotation(keys::SSL_CERT, cert)
                .annotation(keys::ALPN_POLICY, alpn)
                .build(),
        )
    };
    assert_eq!(with_alpn("None").listeners[0].alpn_policy, None);
    assert_eq!(
        with_alpn("HTTP2Preferred").listeners[0].alpn_policy,
        Some(crate::model::AlpnPolicy::Http2Preferred)
    );
}

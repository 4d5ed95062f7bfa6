//! Table-driven tests: one table per annotation (valid → typed value, invalid →
//! the exact message a user sees in the InvalidAnnotation event), then conflicts.

use super::*;
use crate::fixtures::{port, service_ports};

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parses against the standard fixture ports: 80/TCP http, 443/TCP https, 53/UDP dns.
fn parse_pairs(pairs: &[(&str, &str)]) -> Result<LbSpec, Vec<String>> {
    parse_with_ports(pairs, &service_ports())
}

fn parse_with_ports(pairs: &[(&str, &str)], ports: &[ServicePort]) -> Result<LbSpec, Vec<String>> {
    parse(&annotations(pairs), ports, ParseDefaults::default())
        .map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

/// Runs `cases` for one annotation key: `Ok(v)` expects `field(spec) == v`,
/// `Err(msg)` expects exactly that one error message.
fn check<T: PartialEq + fmt::Debug>(
    key: &str,
    field: impl Fn(&LbSpec) -> T,
    cases: Vec<(&str, Result<T, &str>)>,
) {
    for (value, want) in cases {
        let got = parse_pairs(&[(key, value)]);
        match (got, want) {
            (Ok(spec), Ok(want)) => assert_eq!(field(&spec), want, "{key}={value:?}"),
            (Err(errors), Err(want)) => assert_eq!(errors, vec![want], "{key}={value:?}"),
            (got, want) => panic!("{key}={value:?}: got {got:?}, want {want:?}"),
        }
    }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    annotations(pairs)
}

#[test]
fn no_annotations_gives_defaults() {
    let spec = parse_pairs(&[]).unwrap();
    assert_eq!(spec.lb_type, None);
    assert_eq!(spec.target_type, TargetType::Instance);
    assert_eq!(spec.scheme, Scheme::InternetFacing);
    assert_eq!(spec.ip_address_type, IpAddressType::Ipv4);
    assert_eq!(spec.ssl_negotiation_policy, DEFAULT_SSL_POLICY);
    assert_eq!(spec.backend_protocol, BackendProtocol::Tcp);
    assert!(spec.manage_backend_sg_rules);
    assert!(spec.subnets.is_empty());
    assert!(spec.tls_ports.is_empty());
    assert_eq!(spec.health_check, HealthCheckOverrides::default());
    assert_eq!(spec.source_ranges, None);
    assert!(spec.ignored.is_empty());
}

#[test]
fn default_scheme_comes_from_the_flag() {
    let spec = parse(
        &BTreeMap::new(),
        &service_ports(),
        ParseDefaults {
            scheme: Scheme::Internal,
        },
    )
    .unwrap();
    assert_eq!(spec.scheme, Scheme::Internal);
}

#[test]
fn other_prefixes_are_not_ours() {
    let spec = parse_pairs(&[
        (
            "service.beta.kubernetes.io/azure-load-balancer-internal",
            "true",
        ),
        ("example.com/aws-load-balancer-type", "elb"),
    ]);
    assert!(spec.is_ok());
}

#[test]
fn lb_type() {
    check(
        keys::TYPE,
        |s| (s.lb_type, s.target_type),
        vec![
            ("nlb", Ok((Some(LbType::Nlb), TargetType::Instance))),
            (
                "external",
                Ok((Some(LbType::External), TargetType::Instance)),
            ),
            ("nlb-ip", Ok((Some(LbType::NlbIp), TargetType::Ip))),
            ("NLB", Ok((Some(LbType::Nlb), TargetType::Instance))),
            ("", Ok((None, TargetType::Instance))),
            (
                "classic",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-type: invalid value \"classic\"; accepted: nlb, external, nlb-ip",
                ),
            ),
        ],
    );
}

#[test]
fn target_type() {
    check(
        keys::NLB_TARGET_TYPE,
        |s| s.target_type,
        vec![
            ("instance", Ok(TargetType::Instance)),
            ("ip", Ok(TargetType::Ip)),
            (
                "pod",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type: invalid value \"pod\"; accepted: instance, ip",
                ),
            ),
        ],
    );
}

#[test]
fn scheme_and_legacy_internal() {
    check(
        keys::SCHEME,
        |s| s.scheme,
        vec![
            ("internet-facing", Ok(Scheme::InternetFacing)),
            ("internal", Ok(Scheme::Internal)),
            (
                "public",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-scheme: invalid value \"public\"; accepted: internet-facing, internal",
                ),
            ),
        ],
    );
    check(
        keys::INTERNAL,
        |s| s.scheme,
        vec![
            ("true", Ok(Scheme::Internal)),
            ("0.0.0.0/0", Ok(Scheme::Internal)),
            ("false", Ok(Scheme::InternetFacing)),
            ("", Ok(Scheme::InternetFacing)),
        ],
    );
}

#[test]
fn name() {
    let bad = |v: &str| {
        format!(
            "service.beta.kubernetes.io/aws-load-balancer-name: invalid value {v:?}; accepted: 1 to 32 characters a-z, A-Z, 0-9 and '-', not starting or ending with '-', not starting with 'internal-'"
        )
    };
    let cases = [
        ("my-nlb", Ok(Some("my-nlb".to_string()))),
        (
            "a234567890123456789012345678901b",
            Ok(Some("a234567890123456789012345678901b".to_string())),
        ),
        (
            "a2345678901234567890123456789012c",
            Err(bad("a2345678901234567890123456789012c")),
        ),
        ("internal-web", Err(bad("internal-web"))),
        ("-web", Err(bad("-web"))),
        ("web-", Err(bad("web-"))),
        ("web_1", Err(bad("web_1"))),
        ("web.prod", Err(bad("web.prod"))),
    ];
    for (value, want) in cases {
        let got = parse_pairs(&[(keys::NAME, value)]);
        match want {
            Ok(n) => assert_eq!(got.unwrap().name, n, "{value}"),
            Err(msg) => assert_eq!(got.unwrap_err(), vec![msg], "{value}"),
        }
    }
}

#[test]
fn subnets() {
    check(
        keys::SUBNETS,
        |s| s.subnets.clone(),
        vec![
            (
                "subnet-0a1b2c, public-b , ,subnet-x",
                Ok(vec![
                    SubnetRef::Id("subnet-0a1b2c".into()),
                    SubnetRef::Name("public-b".into()),
                    SubnetRef::Name("subnet-x".into()),
                ]),
            ),
            (
                "subnet-0a,subnet-0a",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-subnets: invalid value \"subnet-0a\"; accepted: each subnet once",
                ),
            ),
        ],
    );
}

#[test]
fn ip_address_type() {
    check(
        keys::IP_ADDRESS_TYPE,
        |s| s.ip_address_type,
        vec![
            ("ipv4", Ok(IpAddressType::Ipv4)),
            ("dualstack", Ok(IpAddressType::Dualstack)),
            (
                "ipv6",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-ip-address-type: invalid value \"ipv6\"; accepted: ipv4, dualstack",
                ),
            ),
        ],
    );
}

#[test]
fn eip_allocations() {
    let spec = parse_pairs(&[
        (keys::SUBNETS, "subnet-0a,subnet-0b"),
        (keys::EIP_ALLOCATIONS, "eipalloc-0a1,eipalloc-0b2"),
    ])
    .unwrap();
    assert_eq!(spec.eip_allocations, ["eipalloc-0a1", "eipalloc-0b2"]);
    assert_eq!(
        parse_pairs(&[
            (keys::SUBNETS, "subnet-0a,subnet-0b"),
            (keys::EIP_ALLOCATIONS, "eipalloc-0a1,203.0.113.7"),
        ])
        .unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-eip-allocations: invalid value \"203.0.113.7\"; accepted: EIP allocation IDs eipalloc-<hex>"
        ]
    );
}

#[test]
fn private_and_ipv6_addresses() {
    let spec = parse_pairs(&[
        (keys::SCHEME, "internal"),
        (keys::SUBNETS, "subnet-0a,subnet-0b"),
        (keys::PRIVATE_IPV4_ADDRESSES, "10.0.1.10, 10.0.2.010"),
    ])
    .unwrap();
    assert_eq!(
        spec.private_ipv4_addresses,
        vec![Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 2, 10)]
    );
    assert_eq!(
        parse_pairs(&[
            (keys::SCHEME, "internal"),
            (keys::PRIVATE_IPV4_ADDRESSES, "10.0.1")
        ])
        .unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-private-ipv4-addresses: invalid value \"10.0.1\"; accepted: IPv4 addresses"
        ]
    );
    let spec = parse_pairs(&[
        (keys::IP_ADDRESS_TYPE, "dualstack"),
        (keys::SUBNETS, "subnet-0a"),
        (keys::IPV6_ADDRESSES, "2600:1f13::10"),
    ])
    .unwrap();
    assert_eq!(
        spec.ipv6_addresses,
        vec!["2600:1f13::10".parse::<Ipv6Addr>().unwrap()]
    );
}

#[test]
fn ssl_cert_and_ports() {
    let cert = "arn:aws:acm:us-east-1:123456789012:certificate/abc-123";
    let cert2 = "arn:aws:acm:us-east-1:123456789012:certificate/def-456";
    // No ssl-ports: every TCP-only port.
    let spec = parse_pairs(&[(keys::SSL_CERT, cert)]).unwrap();
    assert_eq!(spec.ssl_certificates, vec![cert.to_string()]);
    assert_eq!(spec.tls_ports, BTreeSet::from([80, 443]));
    // By name and number; first certificate is the default, order kept.
    let spec = parse_pairs(&[
        (keys::SSL_CERT, &format!("{cert},{cert2}")),
        (keys::SSL_PORTS, "https"),
    ])
    .unwrap();
    assert_eq!(
        spec.ssl_certificates,
        vec![cert.to_string(), cert2.to_string()]
    );
    assert_eq!(spec.tls_ports, BTreeSet::from([443]));
    let spec = parse_pairs(&[(keys::SSL_CERT, cert), (keys::SSL_PORTS, "443, 80")]).unwrap();
    assert_eq!(spec.tls_ports, BTreeSet::from([80, 443]));
    let spec = parse_pairs(&[(keys::SSL_CERT, cert), (keys::SSL_PORTS, "*")]).unwrap();
    assert_eq!(spec.tls_ports, BTreeSet::from([80, 443]));

    assert_eq!(
        parse_pairs(&[(keys::SSL_CERT, "my-cert")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-ssl-cert: invalid value \"my-cert\"; accepted: ACM or IAM certificate ARNs (arn:<partition>:acm:<region>:<account>:certificate/<id>)"
        ]
    );
    assert_eq!(
        parse_pairs(&[(keys::SSL_CERT, cert), (keys::SSL_PORTS, "8443")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-ssl-ports: invalid value \"8443\"; accepted: \"*\" or port numbers or names of this Service: 80 (http), 443 (https), 53 (dns)"
        ]
    );
}

#[test]
fn ssl_ports_without_cert_is_ignored_and_said() {
    let spec = parse_pairs(&[
        (keys::SSL_PORTS, "443"),
        (keys::ALPN_POLICY, "HTTP2Preferred"),
    ])
    .unwrap();
    assert!(spec.tls_ports.is_empty());
    assert_eq!(
        spec.ignored,
        vec![
            IgnoredAnnotation {
                key: keys::SSL_PORTS.to_string(),
                reason: "no aws-load-balancer-ssl-cert, so no port gets TLS",
            },
            IgnoredAnnotation {
                key: keys::ALPN_POLICY.to_string(),
                reason: "applies to TLS listeners only, and aws-load-balancer-ssl-cert is not set",
            },
        ]
    );
}

#[test]
fn ssl_policy_alpn_backend() {
    check(
        keys::SSL_NEGOTIATION_POLICY,
        |s| s.ssl_negotiation_policy.clone(),
        vec![
            (
                "ELBSecurityPolicy-TLS-1-2-2017-01",
                Ok("ELBSecurityPolicy-TLS-1-2-2017-01".into()),
            ),
            (
                "TLS 1.2",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-ssl-negotiation-policy: invalid value \"TLS 1.2\"; accepted: an ELBv2 security policy name, e.g. ELBSecurityPolicy-TLS13-1-2-2021-06",
                ),
            ),
        ],
    );
    check(
        keys::ALPN_POLICY,
        |s| s.alpn_policy,
        vec![
            ("HTTP2Preferred", Ok(Some(AlpnPolicy::Http2Preferred))),
            ("http1only", Ok(Some(AlpnPolicy::Http1Only))),
            ("None", Ok(Some(AlpnPolicy::None))),
            (
                "h2",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-alpn-policy: invalid value \"h2\"; accepted: HTTP1Only, HTTP2Only, HTTP2Optional, HTTP2Preferred, None",
                ),
            ),
        ],
    );
    check(
        keys::BACKEND_PROTOCOL,
        |s| s.backend_protocol,
        vec![
            ("tcp", Ok(BackendProtocol::Tcp)),
            ("ssl", Ok(BackendProtocol::Ssl)),
            (
                "http",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-backend-protocol: invalid value \"http\"; accepted: tcp, ssl",
                ),
            ),
        ],
    );
}

#[test]
fn cross_zone_and_lb_attributes() {
    check(
        keys::CROSS_ZONE,
        |s| s.lb_attributes.clone(),
        vec![
            (
                "true",
                Ok(map(&[("load_balancing.cross_zone.enabled", "true")])),
            ),
            (
                "False",
                Ok(map(&[("load_balancing.cross_zone.enabled", "false")])),
            ),
            (
                "yes",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-cross-zone-load-balancing-enabled: invalid value \"yes\"; accepted: true or false",
                ),
            ),
        ],
    );
    check(
        keys::ATTRIBUTES,
        |s| s.lb_attributes.clone(),
        vec![
            (
                "deletion_protection.enabled=TRUE, access_logs.s3.bucket=logs",
                Ok(map(&[
                    ("access_logs.s3.bucket", "logs"),
                    ("deletion_protection.enabled", "true"),
                ])),
            ),
            (
                "deletion_protection.enabled=maybe",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-attributes: invalid value \"deletion_protection.enabled=maybe\"; accepted: deletion_protection.enabled: true or false",
                ),
            ),
            (
                "idle_timeout.timeout_seconds=60",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-attributes: invalid value \"idle_timeout.timeout_seconds=60\"; accepted: attributes access_logs.s3.bucket, access_logs.s3.enabled, access_logs.s3.prefix, dns_record.client_routing_policy, deletion_protection.enabled, ipv6.deny_all_igw_traffic, load_balancing.cross_zone.enabled, secondary_ips.auto_assigned.per_subnet, zonal_shift.config.enabled",
                ),
            ),
            (
                "deletion_protection.enabled",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-attributes: invalid value \"deletion_protection.enabled\"; accepted: comma-separated key=value pairs",
                ),
            ),
            (
                "deletion_protection.enabled=true,deletion_protection.enabled=false",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-attributes: invalid value \"deletion_protection.enabled=false\"; accepted: each key once",
                ),
            ),
        ],
    );
}

#[test]
fn access_log_annotations_fold_into_attributes() {
    let spec = parse_pairs(&[
        (keys::ACCESS_LOG_ENABLED, "true"),
        (keys::ACCESS_LOG_BUCKET, "my-logs"),
        (keys::ACCESS_LOG_PREFIX, "nlb/web"),
    ])
    .unwrap();
    assert_eq!(
        spec.lb_attributes,
        map(&[
            ("access_logs.s3.bucket", "my-logs"),
            ("access_logs.s3.enabled", "true"),
            ("access_logs.s3.prefix", "nlb/web"),
        ])
    );
}

#[test]
fn target_group_attributes_and_proxy_protocol() {
    check(
        keys::TARGET_GROUP_ATTRIBUTES,
        |s| s.tg_attributes.clone(),
        vec![
            (
                "deregistration_delay.timeout_seconds=30,preserve_client_ip.enabled=false,stickiness.enabled=true,stickiness.type=source_ip",
                Ok(map(&[
                    ("deregistration_delay.timeout_seconds", "30"),
                    ("preserve_client_ip.enabled", "false"),
                    ("stickiness.enabled", "true"),
                    ("stickiness.type", "source_ip"),
                ])),
            ),
            (
                "deregistration_delay.timeout_seconds=3601",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes: invalid value \"deregistration_delay.timeout_seconds=3601\"; accepted: deregistration_delay.timeout_seconds: an integer from 0 to 3600",
                ),
            ),
            (
                "stickiness.type=lb_cookie",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes: invalid value \"stickiness.type=lb_cookie\"; accepted: stickiness.type: source_ip",
                ),
            ),
        ],
    );
    check(
        keys::PROXY_PROTOCOL,
        |s| s.tg_attributes.clone(),
        vec![
            ("*", Ok(map(&[("proxy_protocol_v2.enabled", "true")]))),
            (
                "true",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol: invalid value \"true\"; accepted: \"*\" (proxy protocol v2 on every target group)",
                ),
            ),
        ],
    );
}

#[test]
fn listener_attributes() {
    let key = "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80";
    let spec = parse_pairs(&[(key, "tcp.idle_timeout.seconds=600")]).unwrap();
    assert_eq!(
        spec.listener_attributes,
        BTreeMap::from([(
            (Protocol::Tcp, 80),
            map(&[("tcp.idle_timeout.seconds", "600")])
        )])
    );
    assert_eq!(
        parse_pairs(&[(key, "tcp.idle_timeout.seconds=30")]).unwrap_err(),
        vec![format!(
            "{key}: invalid value \"tcp.idle_timeout.seconds=30\"; accepted: tcp.idle_timeout.seconds: an integer from 60 to 6000"
        )]
    );
    let wrong_port = "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-8080";
    assert_eq!(
        parse_pairs(&[(wrong_port, "tcp.idle_timeout.seconds=600")]).unwrap_err(),
        vec![format!(
            "{wrong_port}: value \"tcp.idle_timeout.seconds=600\" conflicts with spec.ports (no port 8080); accepted: a key naming one of this Service's ports"
        )]
    );
    // AWS has listener attributes for TCP listeners only.
    let only_tcp = "accepted: service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-<port> for a TCP-only port: AWS offers listener attributes for TCP listeners only";
    for key in [
        "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TLS-443",
        "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.UDP-53",
    ] {
        assert_eq!(
            parse_pairs(&[(key, "tcp.idle_timeout.seconds=600")]).unwrap_err(),
            vec![format!(
                "{key}: invalid value \"tcp.idle_timeout.seconds=600\"; {only_tcp}"
            )]
        );
    }
    let tls = "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-443";
    assert_eq!(
        parse_pairs(&[
            (tls, "tcp.idle_timeout.seconds=600"),
            (
                keys::SSL_CERT,
                "arn:aws:acm:us-east-1:123456789012:certificate/abc"
            ),
            (keys::SSL_PORTS, "443"),
        ])
        .unwrap_err(),
        vec![format!(
            "{tls}: value \"tcp.idle_timeout.seconds=600\" conflicts with service.beta.kubernetes.io/aws-load-balancer-ssl-ports; accepted: no listener attributes on port 443: it has a TLS listener (ssl-ports), and AWS offers listener attributes for TCP listeners only"
        )]
    );
}

#[test]
fn health_check_protocol_port_path() {
    check(
        keys::HEALTHCHECK_PROTOCOL,
        |s| s.health_check.protocol,
        vec![
            ("HTTP", Ok(Some(HealthCheckProtocol::Http))),
            ("https", Ok(Some(HealthCheckProtocol::Https))),
            ("tcp", Ok(Some(HealthCheckProtocol::Tcp))),
            (
                "UDP",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-healthcheck-protocol: invalid value \"UDP\"; accepted: TCP, HTTP, HTTPS",
                ),
            ),
        ],
    );
    check(
        keys::HEALTHCHECK_PORT,
        |s| s.health_check.port,
        vec![
            ("traffic-port", Ok(Some(HealthCheckPort::TrafficPort))),
            ("8080", Ok(Some(HealthCheckPort::Port(8080)))),
            (
                "0",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-healthcheck-port: invalid value \"0\"; accepted: traffic-port or a port number from 1 to 65535",
                ),
            ),
            (
                "http",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-healthcheck-port: invalid value \"http\"; accepted: traffic-port or a port number from 1 to 65535",
                ),
            ),
        ],
    );
    check(
        keys::HEALTHCHECK_PATH,
        |s| s.health_check.path.clone(),
        vec![
            ("/ready", Ok(Some("/ready".into()))),
            (
                "ready",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-healthcheck-path: invalid value \"ready\"; accepted: a path starting with '/', at most 1024 printable characters, no spaces",
                ),
            ),
        ],
    );
}

#[test]
fn health_check_ranges() {
    let range = |key: &str, v: &str, lo: u16, hi: u16| {
        format!("{key}: value {v:?} is out of range; accepted: an integer from {lo} to {hi}")
    };
    let interval = keys::HEALTHCHECK_INTERVAL;
    for (v, want) in [
        ("5", Ok(Some(5))),
        ("300", Ok(Some(300))),
        ("4", Err(range(interval, "4", 5, 300))),
        ("301", Err(range(interval, "301", 5, 300))),
        (
            "10s",
            Err(format!(
                "{interval}: invalid value \"10s\"; accepted: an integer from 5 to 300"
            )),
        ),
    ] {
        let got = parse_pairs(&[(interval, v)]);
        match want {
            Ok(n) => assert_eq!(got.unwrap().health_check.interval_seconds, n, "{v}"),
            Err(msg) => assert_eq!(got.unwrap_err(), vec![msg], "{v}"),
        }
    }
    let timeout = keys::HEALTHCHECK_TIMEOUT;
    assert_eq!(
        parse_pairs(&[(timeout, "2")])
            .unwrap()
            .health_check
            .timeout_seconds,
        Some(2)
    );
    assert_eq!(
        parse_pairs(&[(timeout, "120")])
            .unwrap()
            .health_check
            .timeout_seconds,
        Some(120)
    );
    assert_eq!(
        parse_pairs(&[(timeout, "1")]).unwrap_err(),
        vec![range(timeout, "1", 2, 120)]
    );
    assert_eq!(
        parse_pairs(&[(timeout, "121")]).unwrap_err(),
        vec![range(timeout, "121", 2, 120)]
    );
    for key in [
        keys::HEALTHCHECK_HEALTHY_THRESHOLD,
        keys::HEALTHCHECK_UNHEALTHY_THRESHOLD,
    ] {
        let spec = parse_pairs(&[(key, "2")]).unwrap();
        let spec10 = parse_pairs(&[(key, "10")]).unwrap();
        if key == keys::HEALTHCHECK_HEALTHY_THRESHOLD {
            assert_eq!(spec.health_check.healthy_threshold, Some(2));
            assert_eq!(spec10.health_check.healthy_threshold, Some(10));
        } else {
            assert_eq!(spec.health_check.unhealthy_threshold, Some(2));
            assert_eq!(spec10.health_check.unhealthy_threshold, Some(10));
        }
        assert_eq!(
            parse_pairs(&[(key, "1")]).unwrap_err(),
            vec![range(key, "1", 2, 10)]
        );
        assert_eq!(
            parse_pairs(&[(key, "11")]).unwrap_err(),
            vec![range(key, "11", 2, 10)]
        );
    }
}

#[test]
fn health_check_success_codes() {
    let bad = |v: &str| {
        format!(
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-success-codes: invalid value {v:?}; accepted: HTTP codes 200-599: a code (200), a list (200,202) or a range (200-399)"
        )
    };
    for v in ["200", "200,202", "200-399", "599"] {
        assert_eq!(
            parse_pairs(&[(keys::HEALTHCHECK_SUCCESS_CODES, v)])
                .unwrap()
                .health_check
                .success_codes
                .as_deref(),
            Some(v)
        );
    }
    for v in ["199", "600", "399-200", "2xx", "200-", "200,,202"] {
        assert_eq!(
            parse_pairs(&[(keys::HEALTHCHECK_SUCCESS_CODES, v)]).unwrap_err(),
            vec![bad(v)],
            "{v}"
        );
    }
}

#[test]
fn tcp_health_check_ignores_path_and_codes() {
    let spec = parse_pairs(&[
        (keys::HEALTHCHECK_PROTOCOL, "TCP"),
        (keys::HEALTHCHECK_PATH, "/healthz"),
        (keys::HEALTHCHECK_SUCCESS_CODES, "200"),
    ])
    .unwrap();
    assert_eq!(spec.health_check.path, None);
    assert_eq!(spec.health_check.success_codes, None);
    assert_eq!(
        spec.ignored
            .iter()
            .map(|i| i.key.as_str())
            .collect::<Vec<_>>(),
        vec![keys::HEALTHCHECK_PATH, keys::HEALTHCHECK_SUCCESS_CODES]
    );
}

#[test]
fn additional_resource_tags() {
    check(
        keys::ADDITIONAL_RESOURCE_TAGS,
        |s| s.additional_tags.clone(),
        vec![
            (
                "team=web, cost-center = 42,flag",
                Ok(map(&[("cost-center", "42"), ("flag", ""), ("team", "web")])),
            ),
            (
                "kubernetes.io/cluster/other=owned",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags: value \"kubernetes.io/cluster/other=owned\" conflicts with Causeway's identity tags; accepted: tags other than kubernetes.io/cluster/*, kubernetes.io/service-name and causeway.dev/*, which Causeway sets itself",
                ),
            ),
            (
                "kubernetes.io/service-name=x/y",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags: value \"kubernetes.io/service-name=x/y\" conflicts with Causeway's identity tags; accepted: tags other than kubernetes.io/cluster/*, kubernetes.io/service-name and causeway.dev/*, which Causeway sets itself",
                ),
            ),
            (
                "causeway.dev/service-uid=1",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags: value \"causeway.dev/service-uid=1\" conflicts with Causeway's identity tags; accepted: tags other than kubernetes.io/cluster/*, kubernetes.io/service-name and causeway.dev/*, which Causeway sets itself",
                ),
            ),
            (
                "aws:cloudformation:stack-name=x",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags: invalid value \"aws:cloudformation:stack-name=x\"; accepted: tag keys not starting with aws: (reserved by AWS)",
                ),
            ),
            // AWS's tag alphabet: letters (any script), digits, spaces, _.:/=+-@.
            (
                "owner=ops@example.com, path=/a/b+c, équipe=café 2",
                Ok(map(&[
                    ("owner", "ops@example.com"),
                    ("path", "/a/b+c"),
                    ("équipe", "café 2"),
                ])),
            ),
            (
                "ticket=x#1",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags: invalid value \"ticket=x#1\"; accepted: keys and values of letters, digits, spaces and _ . : / = + - @",
                ),
            ),
            // Letters are \p{L}: a Devanagari vowel sign (U+093E, a mark) and a
            // circled letter (U+24D0, a symbol) are alphabetic to Rust, not to AWS.
            (
                "team=\u{915}\u{93e}",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags: invalid value \"team=\u{915}\u{93e}\"; accepted: keys and values of letters, digits, spaces and _ . : / = + - @",
                ),
            ),
            (
                "\u{24d0}=x",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags: invalid value \"\u{24d0}=x\"; accepted: keys and values of letters, digits, spaces and _ . : / = + - @",
                ),
            ),
            // Separators are \p{Z}: a no-break space is one, a tab is not.
            ("note=a\u{a0}b", Ok(map(&[("note", "a\u{a0}b")]))),
        ],
    );
    let many = (0..47)
        .map(|i| format!("k{i}=v"))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        parse_pairs(&[(keys::ADDITIONAL_RESOURCE_TAGS, &many)]).unwrap_err(),
        vec![format!(
            "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags: value {many:?} is out of range; accepted: at most 46 tags (AWS allows 50; Causeway sets 4)"
        )]
    );
}

#[test]
fn security_groups_and_backend_rules() {
    let spec = parse_pairs(&[(keys::SECURITY_GROUPS, "sg-0abc, web-frontend")]).unwrap();
    assert_eq!(
        spec.security_groups,
        vec![
            SecurityGroupRef::Id("sg-0abc".into()),
            SecurityGroupRef::Name("web-frontend".into())
        ]
    );
    // Bring-your-own SGs: backend rules off unless asked (aws-load-balancer-controller).
    assert!(!spec.manage_backend_sg_rules);
    let spec = parse_pairs(&[
        (keys::SECURITY_GROUPS, "sg-0abc"),
        (keys::MANAGE_BACKEND_SG_RULES, "true"),
    ])
    .unwrap();
    assert!(spec.manage_backend_sg_rules);
    let spec = parse_pairs(&[(keys::MANAGE_BACKEND_SG_RULES, "false")]).unwrap();
    assert!(!spec.manage_backend_sg_rules);
    let spec = parse_pairs(&[(keys::EXTRA_SECURITY_GROUPS, "sg-0def")]).unwrap();
    assert_eq!(
        spec.extra_security_groups,
        vec![SecurityGroupRef::Id("sg-0def".into())]
    );
    assert!(spec.manage_backend_sg_rules);
    assert_eq!(
        parse_pairs(&[(keys::MANAGE_BACKEND_SG_RULES, "on")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-manage-backend-security-group-rules: invalid value \"on\"; accepted: true or false"
        ]
    );
    check(
        keys::SECURITY_GROUP_PREFIX_LISTS,
        |s| s.security_group_prefix_lists.clone(),
        vec![
            ("pl-0a1b", Ok(vec!["pl-0a1b".to_string()])),
            (
                "com.amazonaws.global.cloudfront",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-security-group-prefix-lists: invalid value \"com.amazonaws.global.cloudfront\"; accepted: managed prefix list IDs pl-<hex>",
                ),
            ),
        ],
    );
    check(
        keys::INBOUND_SG_RULES_ON_PRIVATE_LINK,
        |s| s.enforce_sg_inbound_rules_on_private_link,
        vec![("on", Ok(Some(true))), ("off", Ok(Some(false)))],
    );
    check(
        keys::ICMP_PATH_MTU,
        |s| s.icmp_path_mtu_discovery,
        vec![("on", Ok(true)), ("off", Ok(false))],
    );
}

#[test]
fn target_node_labels() {
    check(
        keys::TARGET_NODE_LABELS,
        |s| s.target_node_labels.clone(),
        vec![
            (
                "pool=web, example.com/edge",
                Ok(vec![
                    NodeLabelRequirement {
                        key: "pool".into(),
                        value: Some("web".into()),
                    },
                    NodeLabelRequirement {
                        key: "example.com/edge".into(),
                        value: None,
                    },
                ]),
            ),
            (
                "bad key=x",
                Err(
                    "service.beta.kubernetes.io/aws-load-balancer-target-node-labels: invalid value \"bad key\"; accepted: label keys ([prefix/]name, name up to 63 characters of a-z, A-Z, 0-9, '-', '_', '.')",
                ),
            ),
        ],
    );
    let req = NodeLabelRequirement {
        key: "pool".into(),
        value: Some("web".into()),
    };
    assert!(req.matches(&map(&[("pool", "web")])));
    assert!(!req.matches(&map(&[("pool", "db")])));
    assert!(!req.matches(&map(&[])));
    let exists = NodeLabelRequirement {
        key: "pool".into(),
        value: None,
    };
    assert!(exists.matches(&map(&[("pool", "")])));
}

#[test]
fn legacy_source_ranges() {
    check(
        SOURCE_RANGES,
        |s| {
            s.source_ranges
                .clone()
                .map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>())
        },
        vec![
            (
                "203.0.113.0/24, 10.0.0.1/8,2001:db8::/32",
                Ok(Some(vec![
                    "10.0.0.0/8".to_string(),
                    "203.0.113.0/24".to_string(),
                    "2001:db8::/32".to_string(),
                ])),
            ),
            (
                "203.0.113.0",
                Err(
                    "service.beta.kubernetes.io/load-balancer-source-ranges: invalid value \"203.0.113.0\"; accepted: comma-separated IPv4 or IPv6 CIDRs, e.g. 203.0.113.0/24",
                ),
            ),
        ],
    );
}

#[test]
fn ignored_and_rejected_keys() {
    let spec = parse_pairs(&[
        (keys::CONNECTION_IDLE_TIMEOUT, "60"),
        (keys::ACCESS_LOG_EMIT_INTERVAL, "5"),
    ])
    .unwrap();
    assert_eq!(
        spec.ignored,
        vec![
            IgnoredAnnotation {
                key: keys::ACCESS_LOG_EMIT_INTERVAL.into(),
                reason: "Classic Load Balancer only; an NLB delivers access logs every 5 minutes",
            },
            IgnoredAnnotation {
                key: keys::CONNECTION_IDLE_TIMEOUT.into(),
                reason: "Classic Load Balancer only; use aws-load-balancer-listener-attributes.TCP-<port>: tcp.idle_timeout.seconds=N",
            },
        ]
    );
    assert_eq!(
        parse_pairs(&[(keys::MULTI_CLUSTER_TARGET_GROUP, "true")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-multi-cluster-target-group: not supported (value \"true\"); Causeway owns the full target set of each target group it creates; remove the annotation"
        ]
    );
}

#[test]
fn unknown_keys_are_errors_with_a_suggestion() {
    assert_eq!(
        parse_pairs(&[(
            "service.beta.kubernetes.io/aws-load-balancer-schme",
            "internal"
        )])
        .unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-schme: unknown annotation (value \"internal\"); accepted: a known aws-load-balancer-* key; did you mean service.beta.kubernetes.io/aws-load-balancer-scheme?"
        ]
    );
    assert_eq!(
        parse_pairs(&[(
            "service.beta.kubernetes.io/aws-load-balancer-wafv2-acl-arn",
            "x"
        )])
        .unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-wafv2-acl-arn: unknown annotation (value \"x\"); accepted: the aws-load-balancer-* keys listed in docs/annotations.md"
        ]
    );
}

// ----- conflicts -----

#[test]
fn conflict_eips_with_internal_scheme() {
    assert_eq!(
        parse_pairs(&[
            (keys::SCHEME, "internal"),
            (keys::EIP_ALLOCATIONS, "eipalloc-01")
        ])
        .unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-eip-allocations: value \"eipalloc-01\" conflicts with service.beta.kubernetes.io/aws-load-balancer-scheme=internal; accepted: EIP allocations only on internet-facing load balancers"
        ]
    );
    // The legacy `internal` annotation has the same effect.
    assert_eq!(
        parse_pairs(&[
            (keys::INTERNAL, "true"),
            (keys::EIP_ALLOCATIONS, "eipalloc-01")
        ])
        .unwrap_err()
        .len(),
        1
    );
}

#[test]
fn pinned_addresses_need_named_subnets() {
    // Discovered subnets: which address would go where is not the user's to
    // know, and AWS would assign others silently.
    assert_eq!(
        parse_pairs(&[(keys::EIP_ALLOCATIONS, "eipalloc-01,eipalloc-02")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-eip-allocations: value \"eipalloc-01,eipalloc-02\" conflicts with service.beta.kubernetes.io/aws-load-balancer-subnets not being set (subnets are discovered); accepted: one address per subnet named in service.beta.kubernetes.io/aws-load-balancer-subnets, in the same order"
        ]
    );
    for (key, value, other) in [
        (
            keys::PRIVATE_IPV4_ADDRESSES,
            "10.0.1.10",
            (keys::SCHEME, "internal"),
        ),
        (
            keys::IPV6_ADDRESSES,
            "2600:1f13::10",
            (keys::IP_ADDRESS_TYPE, "dualstack"),
        ),
    ] {
        let errors = parse_pairs(&[(key, value), other]).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(&format!(
                "{key}: value {value:?} conflicts with {}",
                keys::SUBNETS
            )),
            "{errors:?}"
        );
    }
}

#[test]
fn conflict_address_counts_differ_from_subnets() {
    assert_eq!(
        parse_pairs(&[
            (keys::SUBNETS, "subnet-0a,subnet-0b"),
            (keys::EIP_ALLOCATIONS, "eipalloc-01"),
        ])
        .unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-eip-allocations: value \"eipalloc-01\" conflicts with service.beta.kubernetes.io/aws-load-balancer-subnets (2 subnets); accepted: exactly one per subnet (2)"
        ]
    );
    assert_eq!(
        parse_pairs(&[
            (keys::SCHEME, "internal"),
            (keys::SUBNETS, "subnet-0a"),
            (keys::PRIVATE_IPV4_ADDRESSES, "10.0.0.5,10.0.1.5"),
        ])
        .unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-private-ipv4-addresses: value \"10.0.0.5,10.0.1.5\" conflicts with service.beta.kubernetes.io/aws-load-balancer-subnets (1 subnets); accepted: exactly one per subnet (1)"
        ]
    );
    // Matching counts are fine.
    let spec = parse_pairs(&[
        (keys::SUBNETS, "subnet-0a,subnet-0b"),
        (keys::EIP_ALLOCATIONS, "eipalloc-01,eipalloc-02"),
    ])
    .unwrap();
    assert_eq!(spec.eip_allocations.len(), 2);
}

#[test]
fn conflict_private_ipv4_with_internet_facing() {
    assert_eq!(
        parse_pairs(&[(keys::PRIVATE_IPV4_ADDRESSES, "10.0.0.5")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-private-ipv4-addresses: value \"10.0.0.5\" conflicts with service.beta.kubernetes.io/aws-load-balancer-scheme=internet-facing; accepted: private IPv4 addresses only on internal load balancers"
        ]
    );
    assert_eq!(
        parse_pairs(&[(keys::IPV6_ADDRESSES, "2600::1")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-ipv6-addresses: value \"2600::1\" conflicts with service.beta.kubernetes.io/aws-load-balancer-ip-address-type=ipv4; accepted: IPv6 addresses only with aws-load-balancer-ip-address-type dualstack"
        ]
    );
}

#[test]
fn conflict_tls_on_udp_port() {
    let cert = "arn:aws:acm:us-east-1:123456789012:certificate/abc";
    assert_eq!(
        parse_pairs(&[(keys::SSL_CERT, cert), (keys::SSL_PORTS, "dns")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-ssl-ports: value \"dns\" conflicts with spec.ports: port 53 is UDP; accepted: TCP-only ports (TLS cannot carry UDP)"
        ]
    );
    // TCP and UDP sharing 53 become one TCP_UDP listener: no TLS there either.
    let ports = vec![
        port("dns-tcp", 53, "TCP", 30053),
        port("dns", 53, "UDP", 30053),
    ];
    assert_eq!(
        parse_with_ports(&[(keys::SSL_CERT, cert), (keys::SSL_PORTS, "53")], &ports).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-ssl-ports: value \"53\" conflicts with spec.ports: port 53 is both TCP and UDP; accepted: TCP-only ports (TLS cannot carry UDP)"
        ]
    );
    // Without ssl-ports, the shared port is simply not TLS.
    let spec = parse_with_ports(&[(keys::SSL_CERT, cert)], &ports).unwrap();
    assert!(spec.tls_ports.is_empty());
}

#[test]
fn conflict_more_than_50_listeners() {
    let ports: Vec<ServicePort> = (0..51)
        .map(|i| port(&format!("p{i}"), 1000 + i, "TCP", 30000 + i))
        .collect();
    assert_eq!(
        parse_with_ports(&[], &ports).unwrap_err(),
        vec![
            "spec.ports: value \"51 listener ports\" is out of range; accepted: at most 50 distinct port numbers (one NLB listener each)"
        ]
    );
    assert!(parse_with_ports(&[], &ports[..50]).is_ok());
}

#[test]
fn conflict_scheme_and_legacy_internal_disagree() {
    assert_eq!(
        parse_pairs(&[(keys::SCHEME, "internet-facing"), (keys::INTERNAL, "true")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-internal: value \"true\" conflicts with service.beta.kubernetes.io/aws-load-balancer-scheme=internet-facing; accepted: the same scheme in both, or only service.beta.kubernetes.io/aws-load-balancer-scheme"
        ]
    );
    assert!(parse_pairs(&[(keys::SCHEME, "internal"), (keys::INTERNAL, "true")]).is_ok());
}

#[test]
fn conflict_type_nlb_ip_with_instance_targets() {
    assert_eq!(
        parse_pairs(&[(keys::TYPE, "nlb-ip"), (keys::NLB_TARGET_TYPE, "instance")]).unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type: value \"instance\" conflicts with service.beta.kubernetes.io/aws-load-balancer-type=nlb-ip; accepted: ip (or remove it), since aws-load-balancer-type nlb-ip means ip targets"
        ]
    );
}

#[test]
fn conflict_dedicated_and_generic_attribute_disagree() {
    assert_eq!(
        parse_pairs(&[
            (keys::CROSS_ZONE, "true"),
            (keys::ATTRIBUTES, "load_balancing.cross_zone.enabled=false"),
        ])
        .unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-cross-zone-load-balancing-enabled: value \"true\" conflicts with service.beta.kubernetes.io/aws-load-balancer-attributes load_balancing.cross_zone.enabled=false; accepted: the same load_balancing.cross_zone.enabled in both, or only one of them"
        ]
    );
    assert_eq!(
        parse_pairs(&[
            (keys::PROXY_PROTOCOL, "*"),
            (
                keys::TARGET_GROUP_ATTRIBUTES,
                "proxy_protocol_v2.enabled=false"
            ),
        ])
        .unwrap_err(),
        vec![
            "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol: value \"*\" conflicts with service.beta.kubernetes.io/aws-load-balancer-target-group-attributes proxy_protocol_v2.enabled=false; accepted: the same proxy_protocol_v2.enabled in both, or only one of them"
        ]
    );
}

#[test]
fn every_error_is_reported_at_once_in_key_order() {
    let errors = parse(
        &annotations(&[
            (keys::SCHEME, "public"),
            (keys::HEALTHCHECK_INTERVAL, "1"),
            (keys::TYPE, "elb"),
        ]),
        &service_ports(),
        ParseDefaults::default(),
    )
    .unwrap_err();
    assert_eq!(
        errors
            .0
            .iter()
            .map(|e| (e.key.as_str(), e.kind.label()))
            .collect::<Vec<_>>(),
        vec![
            (keys::HEALTHCHECK_INTERVAL, "out_of_range"),
            (keys::SCHEME, "invalid_value"),
            (keys::TYPE, "invalid_value"),
        ]
    );
}

#[test]
fn realistic_set_parses() {
    // The "realistic set": internal, TLS on 443, cross-zone,
    // deregistration delay 30, proxy protocol, custom health check, extra tags.
    let spec = parse_pairs(&[
        (keys::TYPE, "external"),
        (keys::NLB_TARGET_TYPE, "instance"),
        (keys::SCHEME, "internal"),
        (
            keys::SSL_CERT,
            "arn:aws:acm:us-east-1:123456789012:certificate/abc",
        ),
        (keys::SSL_PORTS, "443"),
        (keys::CROSS_ZONE, "true"),
        (
            keys::TARGET_GROUP_ATTRIBUTES,
            "deregistration_delay.timeout_seconds=30",
        ),
        (keys::PROXY_PROTOCOL, "*"),
        (keys::HEALTHCHECK_PROTOCOL, "HTTP"),
        (keys::HEALTHCHECK_PATH, "/ready"),
        (keys::HEALTHCHECK_INTERVAL, "15"),
        (keys::ADDITIONAL_RESOURCE_TAGS, "team=web,env=prod"),
    ])
    .unwrap();
    assert_eq!(spec.scheme, Scheme::Internal);
    assert_eq!(spec.tls_ports, BTreeSet::from([443]));
    assert_eq!(
        spec.tg_attributes,
        map(&[
            ("deregistration_delay.timeout_seconds", "30"),
            ("proxy_protocol_v2.enabled", "true"),
        ])
    );
    assert_eq!(
        spec.lb_attributes,
        map(&[("load_balancing.cross_zone.enabled", "true")])
    );
    assert_eq!(
        spec.health_check,
        HealthCheckOverrides {
            protocol: Some(HealthCheckProtocol::Http),
            path: Some("/ready".into()),
            interval_seconds: Some(15),
            ..Default::default()
        }
    );
    assert_eq!(
        spec.additional_tags,
        map(&[("env", "prod"), ("team", "web")])
    );
}

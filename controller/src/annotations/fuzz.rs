//! Property tests ("fuzzing") of [`parse`]: arbitrary annotation maps and
//! Service ports must never make the parser panic, and every error must name
//! the annotation (or `spec.ports`) it is about.
//!
//! The default case count (proptest's 256) keeps `cargo test` fast; the long
//! run documented in docs/annotations.md ("Fuzzing") raises it:
//!
//! ```text
//! PROPTEST_CASES=400000 cargo test -p causeway-controller --lib annotations::fuzz
//! ```

use proptest::prelude::*;

use super::*;

/// Values that are valid, or nearly valid, for some key: the fuzzer mixes and
/// mutates them so that most keys see both sides of their checks.
const SEEDS: &[&str] = &[
    "",
    " ",
    ",",
    ",,, ,",
    "=",
    "=v",
    "k=",
    "*",
    "nlb",
    "NLB",
    "external",
    "nlb-ip",
    "instance",
    "ip",
    "internal",
    "internet-facing",
    "true",
    "false",
    "TRUE",
    "False",
    "1",
    "0",
    "t",
    "yes",
    "on",
    "off",
    "ipv4",
    "dualstack",
    "tcp",
    "ssl",
    "TCP",
    "HTTP",
    "https",
    "traffic-port",
    "/healthz",
    "/",
    "/a b",
    "200-399",
    "200,202",
    "599-200",
    "2000",
    "10",
    "2",
    "300",
    "3600",
    "-1",
    "+5",
    "0x10",
    "99999999999999999999999",
    "my-lb",
    "internal-lb",
    "-lb-",
    "abcdefghijabcdefghijabcdefghijabc",
    "subnet-0abc,subnet-1def",
    "subnet-0abc,subnet-0abc",
    "private-a, private-b, private-c",
    "eipalloc-0abc,eipalloc-1def",
    "eipalloc-xyz",
    "10.0.0.1,10.0.1.1",
    "010.000.000.001",
    "256.0.0.1",
    "2001:db8::1,2001:db8::2",
    "2001:db8::zz",
    "arn:aws:acm:us-east-1:123456789012:certificate/abc",
    "arn:aws:iam::123456789012:server-certificate/x",
    "arn:aws:acm:us-east-1:123456789012:",
    "443,https,80",
    "http,dns",
    "53",
    "65536",
    "ELBSecurityPolicy-TLS13-1-2-2021-06",
    "HTTP2Preferred",
    "None",
    "k=v,k2",
    "foo=bar,foo=baz",
    "deregistration_delay.timeout_seconds=30,proxy_protocol_v2.enabled=true",
    "deregistration_delay.timeout_seconds=3601",
    "stickiness.type=source_ip",
    "target_group_health.dns_failover.minimum_healthy_targets.count=off",
    "load_balancing.cross_zone.enabled=true",
    "load_balancing.cross_zone.enabled=use_load_balancer_configuration",
    "access_logs.s3.enabled=true,access_logs.s3.bucket=b",
    "deletion_protection.enabled=true",
    "secondary_ips.auto_assigned.per_subnet=8",
    "proxy_protocol_v2.enabled=false",
    "tcp.idle_timeout.seconds=120",
    "tcp.idle_timeout.seconds=59",
    "kubernetes.io/cluster/x=owned",
    "causeway.dev/resource=lb",
    "aws:foo=bar",
    "AWS:foo=bar",
    "team=a,env=prod",
    "sg-0abc,my-sg",
    "sg-0abc,sg-0abc",
    "pl-0abc,pl-zz",
    "node.kubernetes.io/pool=a,bare",
    "-bad-",
    "a/b/c=d",
    "203.0.113.0/24,2001:db8::/32",
    "203.0.113.0/33",
];

/// Characters that tend to break naive string handling.
const ODD: &[&str] = &[
    "\u{0}", "\t", "\n", "\u{a0}", "\u{200b}", "\u{feff}", "é", "ß", "İ", "ﬁ", "🦀", "\u{301}",
    "𝟘", "٣", "＝", "，", "\u{202e}",
];

fn known_key() -> impl Strategy<Value = String> {
    prop::sample::select(
        KNOWN_KEYS
            .iter()
            .map(|(k, _)| k.to_string())
            .collect::<Vec<_>>(),
    )
}

/// Any key the parser might see.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => known_key(),
        1 => Just(SOURCE_RANGES.to_string()),
        // Listener attributes: near-valid and arbitrary suffixes.
        1 => (
            prop::sample::select(vec!["TCP", "tcp", "UDP", "TCP_UDP", "TLS", "tls", "SCTP", "", "🦀"]),
            prop::sample::select(vec!["-", "_", "", "--"]),
            prop::sample::select(vec!["80", "443", "53", "0", "65535", "65536", "-1", "x", ""]),
        )
            .prop_map(|(p, s, n)| format!("{LISTENER_ATTRIBUTES_PREFIX}{p}{s}{n}")),
        1 => any::<String>().prop_map(|s| format!("{LISTENER_ATTRIBUTES_PREFIX}{s}")),
        // Unknown aws-load-balancer-* keys: arbitrary, and near misses of known ones.
        1 => any::<String>().prop_map(|s| format!("{AWS_PREFIX}{s}")),
        2 => (known_key(), any::<prop::sample::Index>(), prop::sample::select(ODD.to_vec()))
            .prop_map(|(k, i, odd)| mutate(&k, i, odd)),
        // Keys that are not ours at all.
        1 => any::<String>(),
        1 => Just(format!("{PREFIX}load-balancer-source-range")),
    ]
}

/// One of: drop, double or replace the character at `i`, or insert `odd` there.
fn mutate(s: &str, i: prop::sample::Index, odd: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return odd.to_string();
    }
    let at = i.index(chars.len());
    let mut out = String::new();
    for (n, c) in chars.iter().enumerate() {
        if n == at {
            match at % 4 {
                0 => {}
                1 => {
                    out.push(*c);
                    out.push(*c);
                }
                2 => out.push_str(odd),
                _ => {
                    out.push_str(odd);
                    out.push(*c);
                }
            }
        } else {
            out.push(*c);
        }
    }
    out
}

/// Any value: seeds, seeds mixed with each other and with odd characters,
/// arbitrary unicode, and huge values.
fn value() -> impl Strategy<Value = String> {
    let seed = || prop::sample::select(SEEDS.to_vec()).prop_map(str::to_string);
    prop_oneof![
        4 => seed(),
        2 => prop::collection::vec(
            (seed(), prop::sample::select(vec![",", " , ", "=", ",=", ", ", "\t,", "-", "/"])),
            1..8,
        )
        .prop_map(|parts| parts.into_iter().map(|(s, sep)| format!("{s}{sep}")).collect()),
        2 => (seed(), any::<prop::sample::Index>(), prop::sample::select(ODD.to_vec()))
            .prop_map(|(s, i, odd)| mutate(&s, i, odd)),
        2 => any::<String>(),
        1 => "[ -~]{0,200}",
        // Huge: up to 64 KiB, and long comma lists (many subnets, tags, ports).
        1 => (seed(), 1usize..4096).prop_map(|(s, n)| format!("{s},").repeat(n)),
        1 => (prop::sample::select(ODD.to_vec()), 1usize..16384).prop_map(|(c, n)| c.repeat(n)),
        1 => (0usize..2000).prop_map(|n| {
            (0..n).map(|i| format!("k{i}=v{i}")).collect::<Vec<_>>().join(",")
        }),
    ]
}

fn ports() -> impl Strategy<Value = Vec<ServicePort>> {
    let port = (
        prop_oneof![
            4 => prop::sample::select(vec![80, 443, 53, 8080, 1, 65535]),
            1 => any::<i32>(),
            1 => 0i32..70_000,
        ],
        prop::option::of(prop_oneof![
            prop::sample::select(vec!["http", "https", "dns", "80", "*"]).prop_map(str::to_string),
            any::<String>(),
        ]),
        prop::option::of(prop::sample::select(vec!["TCP", "UDP", "SCTP", "tcp", ""])),
        prop::option::of(any::<i32>()),
    )
        .prop_map(|(port, name, protocol, node_port)| ServicePort {
            name,
            port,
            protocol: protocol.map(str::to_string),
            node_port,
            ..Default::default()
        });
    prop_oneof![
        4 => prop::collection::vec(port.clone(), 0..6),
        1 => prop::collection::vec(port, 0..80),
    ]
}

fn annotation_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop_oneof![
        4 => prop::collection::btree_map(key(), value(), 0..8),
        1 => prop::collection::btree_map(key(), value(), 0..80),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Shrinking huge maps can take long; the failure is what matters.
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn parser_never_panics_and_errors_name_their_key(
        annotations in annotation_map(),
        ports in ports(),
        internal_default in any::<bool>(),
    ) {
        let defaults = ParseDefaults {
            scheme: if internal_default { Scheme::Internal } else { Scheme::InternetFacing },
        };
        let result = parse(&annotations, &ports, defaults);
        // Pure: the same input gives the same answer.
        prop_assert_eq!(&result, &parse(&annotations, &ports, defaults));
        match &result {
            Ok(spec) => {
                for ignored in &spec.ignored {
                    prop_assert!(annotations.contains_key(&ignored.key), "ignored {:?}", ignored.key);
                }
                if let Some(name) = &spec.name {
                    prop_assert!(valid_lb_name(name), "name {name:?}");
                }
            }
            Err(AnnotationErrors(errors)) => {
                prop_assert!(!errors.is_empty());
                for e in errors {
                    let shown = e.to_string();
                    prop_assert!(shown.starts_with(&format!("{}: ", e.key)), "{shown}");
                    if e.key == "spec.ports" {
                        prop_assert!(port_protocols(&ports).len() > MAX_LISTENERS, "{shown}");
                    } else {
                        prop_assert!(annotations.contains_key(&e.key), "error about a key not given: {shown}");
                        prop_assert!(
                            !annotations[&e.key].trim().is_empty()
                                || matches!(e.kind, ErrorKind::Unknown | ErrorKind::Unsupported)
                                || e.key.starts_with(LISTENER_ATTRIBUTES_PREFIX),
                            "error about an empty (unset) annotation: {shown}"
                        );
                    }
                }
            }
        }
        // Every unknown or rejected aws-load-balancer-* key is an error naming it.
        for key in annotations.keys() {
            let known = KNOWN_KEYS.iter().find(|(k, _)| k == key);
            let must_fail = key.starts_with(AWS_PREFIX)
                && !key.starts_with(LISTENER_ATTRIBUTES_PREFIX)
                && matches!(known, None | Some((_, Disposition::Rejected(_))));
            if must_fail {
                let named = matches!(&result, Err(AnnotationErrors(es)) if es.iter().any(|e| &e.key == key));
                prop_assert!(named, "{key:?} accepted without an error");
            }
        }
    }
}

//! Service annotations → typed [`LbSpec`], before any AWS call (SPEC 1.3).
//!
//! Parsing is pure and collects *every* problem at once, so one Warning event can
//! list them all; any error means no AWS write for that Service. Empty values
//! (after trimming) count as "not set", which is what both anchors do. List
//! values are comma-separated, items trimmed, empty items dropped.
//!
//! # Which `aws-load-balancer-*` keys are accepted
//!
//! Both anchors know more keys than SPEC 1.3 lists. Each key has one of three
//! dispositions; anything not in this table is an `unknown_annotation` error.
//!
//! | key (after `service.beta.kubernetes.io/aws-load-balancer-`) | disposition |
//! |---|---|
//! | `type` | applied: `nlb`, `external`, `nlb-ip` (⇒ ip targets) |
//! | `nlb-target-type` | applied: `instance` / `ip` |
//! | `scheme`, `internal` | applied (`internal` is the legacy form; both set and disagreeing is a conflict) |
//! | `name` | applied, create-only |
//! | `subnets`, `ip-address-type` | applied |
//! | `eip-allocations`, `private-ipv4-addresses`, `ipv6-addresses` | applied, create-only, one per subnet |
//! | `ssl-cert`, `ssl-ports`, `ssl-negotiation-policy`, `alpn-policy`, `backend-protocol` | applied |
//! | `cross-zone-load-balancing-enabled` | applied, as LB attribute `load_balancing.cross_zone.enabled` |
//! | `attributes`, `target-group-attributes` | applied; keys and values checked against the NLB attribute list |
//! | `proxy-protocol` | applied, as TG attribute `proxy_protocol_v2.enabled=true` |
//! | `healthcheck-protocol`, `-port`, `-path`, `-interval`, `-timeout`, `-healthy-threshold`, `-unhealthy-threshold`, `-success-codes` | applied |
//! | `additional-resource-tags` | applied; our identity tags and `aws:` keys cannot be set |
//! | `security-groups` | applied: bring-your-own frontend SGs, replaces the managed one |
//! | `extra-security-groups` | applied: attached next to the frontend SG(s) (cloud-provider-aws key) |
//! | `manage-backend-security-group-rules` | applied; default true, but false when `security-groups` is set (aws-load-balancer-controller's rule: we do not open nodes to SGs we do not own unless asked) |
//! | `target-node-labels` | applied |
//! | `access-log-enabled`, `access-log-s3-bucket-name`, `access-log-s3-bucket-prefix` | applied, as LB attributes `access_logs.s3.*` (aws-load-balancer-controller's deprecated form) |
//! | `security-group-prefix-lists` | applied: frontend SG rules from these prefix lists |
//! | `inbound-sg-rules-on-private-link-traffic` | applied: `on` / `off` |
//! | `enable-icmp-for-path-mtu-discovery` | applied: ICMP "fragmentation needed" allowed from the source ranges |
//! | `listener-attributes.<PROTO>-<port>` | applied: listener attributes (`tcp.idle_timeout.seconds`) |
//! | `access-log-emit-interval` | accepted, ignored: Classic LB only (NLB delivers logs every 5 min) |
//! | `connection-draining-enabled`, `connection-draining-timeout` | accepted, ignored: Classic LB only; use TG attribute `deregistration_delay.timeout_seconds` |
//! | `connection-idle-timeout` | accepted, ignored: Classic LB only; use `listener-attributes.TCP-<port>: tcp.idle_timeout.seconds=N` |
//! | `multi-cluster-target-group` | rejected: Causeway owns each target group's full target set |
//! | `enable-prefix-for-ipv6-source-nat`, `source-nat-ipv6-prefixes` | rejected: not supported yet |
//! | `minimum-load-balancer-capacity` | rejected: not supported yet |
//!
//! Ignored keys are reported in [`LbSpec::ignored`] (for a Normal event); rejected
//! keys are errors, because silently building something other than what was
//! asked for is worse than building nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::ServicePort;

use crate::model::{
    AlpnPolicy, Cidr, HealthCheckPort, HealthCheckProtocol, IpAddressType, Protocol, Scheme,
    SecurityGroupRef, SubnetRef, TargetType, parse_ipv4_lenient, tags,
};

/// Every key we read starts with this.
pub const PREFIX: &str = "service.beta.kubernetes.io/";
/// The family of keys we own (unknown ones are errors).
pub const AWS_PREFIX: &str = "service.beta.kubernetes.io/aws-load-balancer-";
/// Legacy form of `spec.loadBalancerSourceRanges`.
pub const SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// Prefix of the per-listener attribute keys, followed by `<PROTO>-<port>`.
pub const LISTENER_ATTRIBUTES_PREFIX: &str =
    "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.";

/// Full annotation keys, so code and tests never spell them twice.
pub mod keys {
    macro_rules! key {
        ($($name:ident = $suffix:literal;)*) => {
            $(pub const $name: &str = concat!("service.beta.kubernetes.io/aws-load-balancer-", $suffix);)*
        };
    }
    key! {
        TYPE = "type";
        NLB_TARGET_TYPE = "nlb-target-type";
        SCHEME = "scheme";
        INTERNAL = "internal";
        NAME = "name";
        SUBNETS = "subnets";
        IP_ADDRESS_TYPE = "ip-address-type";
        EIP_ALLOCATIONS = "eip-allocations";
        PRIVATE_IPV4_ADDRESSES = "private-ipv4-addresses";
        IPV6_ADDRESSES = "ipv6-addresses";
        SSL_CERT = "ssl-cert";
        SSL_PORTS = "ssl-ports";
        SSL_NEGOTIATION_POLICY = "ssl-negotiation-policy";
        ALPN_POLICY = "alpn-policy";
        BACKEND_PROTOCOL = "backend-protocol";
        CROSS_ZONE = "cross-zone-load-balancing-enabled";
        ATTRIBUTES = "attributes";
        TARGET_GROUP_ATTRIBUTES = "target-group-attributes";
        PROXY_PROTOCOL = "proxy-protocol";
        HEALTHCHECK_PROTOCOL = "healthcheck-protocol";
        HEALTHCHECK_PORT = "healthcheck-port";
        HEALTHCHECK_PATH = "healthcheck-path";
        HEALTHCHECK_INTERVAL = "healthcheck-interval";
        HEALTHCHECK_TIMEOUT = "healthcheck-timeout";
        HEALTHCHECK_HEALTHY_THRESHOLD = "healthcheck-healthy-threshold";
        HEALTHCHECK_UNHEALTHY_THRESHOLD = "healthcheck-unhealthy-threshold";
        HEALTHCHECK_SUCCESS_CODES = "healthcheck-success-codes";
        ADDITIONAL_RESOURCE_TAGS = "additional-resource-tags";
        SECURITY_GROUPS = "security-groups";
        EXTRA_SECURITY_GROUPS = "extra-security-groups";
        MANAGE_BACKEND_SG_RULES = "manage-backend-security-group-rules";
        TARGET_NODE_LABELS = "target-node-labels";
        ACCESS_LOG_ENABLED = "access-log-enabled";
        ACCESS_LOG_BUCKET = "access-log-s3-bucket-name";
        ACCESS_LOG_PREFIX = "access-log-s3-bucket-prefix";
        SECURITY_GROUP_PREFIX_LISTS = "security-group-prefix-lists";
        INBOUND_SG_RULES_ON_PRIVATE_LINK = "inbound-sg-rules-on-private-link-traffic";
        ICMP_PATH_MTU = "enable-icmp-for-path-mtu-discovery";
        ACCESS_LOG_EMIT_INTERVAL = "access-log-emit-interval";
        CONNECTION_DRAINING_ENABLED = "connection-draining-enabled";
        CONNECTION_DRAINING_TIMEOUT = "connection-draining-timeout";
        CONNECTION_IDLE_TIMEOUT = "connection-idle-timeout";
        MULTI_CLUSTER_TARGET_GROUP = "multi-cluster-target-group";
        IPV6_SOURCE_NAT = "enable-prefix-for-ipv6-source-nat";
        IPV6_SOURCE_NAT_PREFIXES = "source-nat-ipv6-prefixes";
        MINIMUM_CAPACITY = "minimum-load-balancer-capacity";
    }
}

/// The ELBv2 default TLS policy (SPEC 1.3).
pub const DEFAULT_SSL_POLICY: &str = "ELBSecurityPolicy-TLS13-1-2-2021-06";
/// ELBv2 quota: listeners per NLB.
pub const MAX_LISTENERS: usize = 50;
/// AWS allows 50 tags per resource; we write 4 of our own.
pub const MAX_USER_TAGS: usize = 46;

enum Disposition {
    Applied,
    Ignored(&'static str),
    Rejected(&'static str),
}

const KNOWN_KEYS: &[(&str, Disposition)] = {
    use Disposition::*;
    &[
        (keys::TYPE, Applied),
        (keys::NLB_TARGET_TYPE, Applied),
        (keys::SCHEME, Applied),
        (keys::INTERNAL, Applied),
        (keys::NAME, Applied),
        (keys::SUBNETS, Applied),
        (keys::IP_ADDRESS_TYPE, Applied),
        (keys::EIP_ALLOCATIONS, Applied),
        (keys::PRIVATE_IPV4_ADDRESSES, Applied),
        (keys::IPV6_ADDRESSES, Applied),
        (keys::SSL_CERT, Applied),
        (keys::SSL_PORTS, Applied),
        (keys::SSL_NEGOTIATION_POLICY, Applied),
        (keys::ALPN_POLICY, Applied),
        (keys::BACKEND_PROTOCOL, Applied),
        (keys::CROSS_ZONE, Applied),
        (keys::ATTRIBUTES, Applied),
        (keys::TARGET_GROUP_ATTRIBUTES, Applied),
        (keys::PROXY_PROTOCOL, Applied),
        (keys::HEALTHCHECK_PROTOCOL, Applied),
        (keys::HEALTHCHECK_PORT, Applied),
        (keys::HEALTHCHECK_PATH, Applied),
        (keys::HEALTHCHECK_INTERVAL, Applied),
        (keys::HEALTHCHECK_TIMEOUT, Applied),
        (keys::HEALTHCHECK_HEALTHY_THRESHOLD, Applied),
        (keys::HEALTHCHECK_UNHEALTHY_THRESHOLD, Applied),
        (keys::HEALTHCHECK_SUCCESS_CODES, Applied),
        (keys::ADDITIONAL_RESOURCE_TAGS, Applied),
        (keys::SECURITY_GROUPS, Applied),
        (keys::EXTRA_SECURITY_GROUPS, Applied),
        (keys::MANAGE_BACKEND_SG_RULES, Applied),
        (keys::TARGET_NODE_LABELS, Applied),
        (keys::ACCESS_LOG_ENABLED, Applied),
        (keys::ACCESS_LOG_BUCKET, Applied),
        (keys::ACCESS_LOG_PREFIX, Applied),
        (keys::SECURITY_GROUP_PREFIX_LISTS, Applied),
        (keys::INBOUND_SG_RULES_ON_PRIVATE_LINK, Applied),
        (keys::ICMP_PATH_MTU, Applied),
        (
            keys::ACCESS_LOG_EMIT_INTERVAL,
            Ignored("Classic Load Balancer only; an NLB delivers access logs every 5 minutes"),
        ),
        (
            keys::CONNECTION_DRAINING_ENABLED,
            Ignored(
                "Classic Load Balancer only; use aws-load-balancer-target-group-attributes deregistration_delay.timeout_seconds",
            ),
        ),
        (
            keys::CONNECTION_DRAINING_TIMEOUT,
            Ignored(
                "Classic Load Balancer only; use aws-load-balancer-target-group-attributes deregistration_delay.timeout_seconds",
            ),
        ),
        (
            keys::CONNECTION_IDLE_TIMEOUT,
            Ignored(
                "Classic Load Balancer only; use aws-load-balancer-listener-attributes.TCP-<port>: tcp.idle_timeout.seconds=N",
            ),
        ),
        (
            keys::MULTI_CLUSTER_TARGET_GROUP,
            Rejected(
                "Causeway owns the full target set of each target group it creates; remove the annotation",
            ),
        ),
        (
            keys::IPV6_SOURCE_NAT,
            Rejected("IPv6 source NAT prefixes are not supported yet; remove the annotation"),
        ),
        (
            keys::IPV6_SOURCE_NAT_PREFIXES,
            Rejected("IPv6 source NAT prefixes are not supported yet; remove the annotation"),
        ),
        (
            keys::MINIMUM_CAPACITY,
            Rejected("capacity reservations are not supported yet; remove the annotation"),
        ),
    ]
};

/// What kind of mistake an [`AnnotationError`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The value does not parse.
    Invalid,
    /// The value parses but is outside the range AWS accepts.
    OutOfRange,
    /// An `aws-load-balancer-*` key no anchor knows (probably a typo).
    Unknown,
    /// A known key Causeway refuses; `accepted` says what to do instead.
    Unsupported,
    /// The value contradicts another annotation or the Service spec, named here.
    Conflict(String),
}

impl ErrorKind {
    /// Bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid_value",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::Unknown => "unknown_annotation",
            ErrorKind::Unsupported => "unsupported_annotation",
            ErrorKind::Conflict(_) => "conflicting_annotations",
        }
    }
}

/// One problem with one annotation (or with `spec.ports` where a limit is
/// shared with annotations). `value` is the offending value or list item.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub accepted: String,
    pub kind: ErrorKind,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let AnnotationError {
            key,
            value,
            accepted,
            kind,
        } = self;
        match kind {
            ErrorKind::Invalid => write!(f, "{key}: invalid value {value:?}; accepted: {accepted}"),
            ErrorKind::OutOfRange => {
                write!(
                    f,
                    "{key}: value {value:?} is out of range; accepted: {accepted}"
                )
            }
            ErrorKind::Unknown => {
                write!(
                    f,
                    "{key}: unknown annotation (value {value:?}); accepted: {accepted}"
                )
            }
            ErrorKind::Unsupported => {
                write!(f, "{key}: not supported (value {value:?}); {accepted}")
            }
            ErrorKind::Conflict(with) => write!(
                f,
                "{key}: value {value:?} conflicts with {with}; accepted: {accepted}"
            ),
        }
    }
}

/// All problems found in one Service's annotations, in key order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct AnnotationErrors(pub Vec<AnnotationError>);

impl AnnotationErrors {
    pub const LABEL: &'static str = "invalid_annotation";
}

impl fmt::Display for AnnotationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            e.fmt(f)?;
        }
        Ok(())
    }
}

/// An annotation accepted for compatibility but without effect on an NLB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredAnnotation {
    pub key: String,
    pub reason: &'static str,
}

/// `aws-load-balancer-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbType {
    Nlb,
    External,
    NlbIp,
}

/// `aws-load-balancer-backend-protocol`: plain TCP to targets, or TLS re-encryption.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendProtocol {
    #[default]
    Tcp,
    Ssl,
}

/// One term of `aws-load-balancer-target-node-labels`: `key=value` or bare `key` (exists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeLabelRequirement {
    pub key: String,
    pub value: Option<String>,
}

impl NodeLabelRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match (&self.value, labels.get(&self.key)) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(want), Some(have)) => want == have,
        }
    }
}

/// Health-check settings the user overrode; `None` keeps SPEC 1.2's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheckOverrides {
    pub protocol: Option<HealthCheckProtocol>,
    pub port: Option<HealthCheckPort>,
    pub path: Option<String>,
    pub interval_seconds: Option<u16>,
    pub timeout_seconds: Option<u16>,
    pub healthy_threshold: Option<u8>,
    pub unhealthy_threshold: Option<u8>,
    pub success_codes: Option<String>,
}

/// A Service's load-balancer settings, typed. Defaults for everything not set
/// are applied here (scheme, target type, ip-address type, TLS policy) or in
/// [`crate::desired`] (health checks, attribute defaults, names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbSpec {
    pub lb_type: Option<LbType>,
    pub target_type: TargetType,
    pub scheme: Scheme,
    pub name: Option<String>,
    /// Empty = discover by tags.
    pub subnets: Vec<SubnetRef>,
    pub ip_address_type: IpAddressType,
    pub eip_allocations: Vec<String>,
    pub private_ipv4_addresses: Vec<Ipv4Addr>,
    pub ipv6_addresses: Vec<Ipv6Addr>,
    pub ssl_certificates: Vec<String>,
    /// Service port numbers that get TLS listeners (resolved from
    /// `ssl-ports` against the Service's ports; empty without a certificate).
    pub tls_ports: BTreeSet<u16>,
    pub ssl_negotiation_policy: String,
    pub alpn_policy: Option<AlpnPolicy>,
    pub backend_protocol: BackendProtocol,
    /// User LB attributes, with `cross-zone-…` and `access-log-…` folded in.
    pub lb_attributes: BTreeMap<String, String>,
    /// User TG attributes, with `proxy-protocol` folded in.
    pub tg_attributes: BTreeMap<String, String>,
    /// Per listener `(protocol, port)`.
    pub listener_attributes: BTreeMap<(Protocol, u16), BTreeMap<String, String>>,
    pub health_check: HealthCheckOverrides,
    pub additional_tags: BTreeMap<String, String>,
    /// Bring-your-own frontend SGs; empty = a managed one.
    pub security_groups: Vec<SecurityGroupRef>,
    pub extra_security_groups: Vec<SecurityGroupRef>,
    pub manage_backend_sg_rules: bool,
    pub security_group_prefix_lists: Vec<String>,
    pub enforce_sg_inbound_rules_on_private_link: Option<bool>,
    pub icmp_path_mtu_discovery: bool,
    pub target_node_labels: Vec<NodeLabelRequirement>,
    /// From the legacy annotation; `spec.loadBalancerSourceRanges` wins over it.
    pub source_ranges: Option<Vec<Cidr>>,
    pub ignored: Vec<IgnoredAnnotation>,
}

/// Defaults that come from controller flags rather than from the Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseDefaults {
    /// `--default-scheme`.
    pub scheme: Scheme,
}

impl Default for ParseDefaults {
    fn default() -> Self {
        ParseDefaults {
            scheme: Scheme::InternetFacing,
        }
    }
}

/// Parses a Service's annotations against its ports (needed for `ssl-ports`
/// and the listener limit). Returns every error found.
pub fn parse(
    annotations: &BTreeMap<String, String>,
    ports: &[ServicePort],
    defaults: ParseDefaults,
) -> Result<LbSpec, AnnotationErrors> {
    let mut p = Parser {
        annotations,
        errors: Vec::new(),
    };
    let spec = p.spec(ports, defaults);
    if p.errors.is_empty() {
        Ok(spec)
    } else {
        p.errors.sort_by(|a, b| a.key.cmp(&b.key));
        Err(AnnotationErrors(p.errors))
    }
}

struct Parser<'a> {
    annotations: &'a BTreeMap<String, String>,
    errors: Vec<AnnotationError>,
}

const BOOL_ACCEPTED: &str = "true or false";

impl<'a> Parser<'a> {
    fn get(&self, key: &str) -> Option<&'a str> {
        self.annotations
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn error(&mut self, key: &str, value: &str, accepted: impl Into<String>, kind: ErrorKind) {
        self.errors.push(AnnotationError {
            key: key.to_string(),
            value: value.to_string(),
            accepted: accepted.into(),
            kind,
        });
    }

    fn invalid(&mut self, key: &str, value: &str, accepted: impl Into<String>) {
        self.error(key, value, accepted, ErrorKind::Invalid);
    }

    fn list(&self, key: &str) -> Vec<&'a str> {
        self.get(key).map(split_list).unwrap_or_default()
    }

    fn one_of<T: Copy>(&mut self, key: &str, choices: &[(&str, T)]) -> Option<T> {
        let value = self.get(key)?;
        if let Some((_, t)) = choices.iter().find(|(s, _)| s.eq_ignore_ascii_case(value)) {
            return Some(*t);
        }
        let accepted = choices
            .iter()
            .map(|(s, _)| *s)
            .collect::<Vec<_>>()
            .join(", ");
        self.invalid(key, value, accepted);
        None
    }

    fn bool(&mut self, key: &str) -> Option<bool> {
        let value = self.get(key)?;
        let parsed = parse_bool(value);
        if parsed.is_none() {
            self.invalid(key, value, BOOL_ACCEPTED);
        }
        parsed
    }

    fn int_in_range<T: TryFrom<i64> + Copy>(&mut self, key: &str, lo: i64, hi: i64) -> Option<T> {
        let value = self.get(key)?;
        let accepted = format!("an integer from {lo} to {hi}");
        match value.parse::<i64>() {
            Ok(n) if (lo..=hi).contains(&n) => T::try_from(n).ok(),
            Ok(_) => {
                self.error(key, value, accepted, ErrorKind::OutOfRange);
                None
            }
            Err(_) => {
                self.invalid(key, value, accepted);
                None
            }
        }
    }

    fn spec(&mut self, ports: &[ServicePort], defaults: ParseDefaults) -> LbSpec {
        let mut ignored = Vec::new();
        let mut listener_attributes = BTreeMap::new();
        // (key, value) of each accepted listener-attributes key, by its port.
        let mut listener_attribute_keys = Vec::new();
        for (key, value) in self.annotations {
            if let Some(rest) = key.strip_prefix(LISTENER_ATTRIBUTES_PREFIX) {
                if let Some((k, attrs)) = self.listener_attributes(key, rest, value, ports) {
                    listener_attribute_keys.push((k.1, key, value));
                    listener_attributes.insert(k, attrs);
                }
                continue;
            }
            if !key.starts_with(AWS_PREFIX) {
                continue;
            }
            match KNOWN_KEYS.iter().find(|(k, _)| k == key) {
                Some((_, Disposition::Applied)) => {}
                Some((_, Disposition::Ignored(reason))) => ignored.push(IgnoredAnnotation {
                    key: key.clone(),
                    reason,
                }),
                Some((_, Disposition::Rejected(instead))) => {
                    self.error(key, value.trim(), *instead, ErrorKind::Unsupported)
                }
                None => {
                    let accepted = match closest_known_key(key) {
                        Some(k) => format!("a known aws-load-balancer-* key; did you mean {k}?"),
                        None => {
                            "the aws-load-balancer-* keys listed in docs/annotations.md".to_string()
                        }
                    };
                    self.error(key, value.trim(), accepted, ErrorKind::Unknown);
                }
            }
        }

        let lb_type = self.one_of(
            keys::TYPE,
            &[
                ("nlb", LbType::Nlb),
                ("external", LbType::External),
                ("nlb-ip", LbType::NlbIp),
            ],
        );
        let target_type = self.target_type(lb_type);
        let scheme = self.scheme(defaults.scheme);
        let name = self.name();
        let subnets = self.subnets();
        let ip_address_type = self
            .one_of(
                keys::IP_ADDRESS_TYPE,
                &[
                    ("ipv4", IpAddressType::Ipv4),
                    ("dualstack", IpAddressType::Dualstack),
                ],
            )
            .unwrap_or_default();
        let eip_allocations = self.eip_allocations(scheme, subnets.len());
        let private_ipv4_addresses = self.private_ipv4_addresses(scheme, subnets.len());
        let ipv6_addresses = self.ipv6_addresses(ip_address_type, subnets.len());
        let ssl_certificates = self.ssl_certificates();
        let tls_ports = self.tls_ports(ports, !ssl_certificates.is_empty(), &mut ignored);
        for (port, key, value) in listener_attribute_keys {
            if tls_ports.contains(&port) {
                self.error(
                    key,
                    value.trim(),
                    format!(
                        "no listener attributes on port {port}: it has a TLS listener (ssl-ports), and AWS offers listener attributes for TCP listeners only"
                    ),
                    ErrorKind::Conflict(keys::SSL_PORTS.to_string()),
                );
            }
        }
        let ssl_negotiation_policy = self.ssl_policy();
        let alpn_policy = self.one_of(keys::ALPN_POLICY, &AlpnPolicy::ALL.map(|p| (p.as_str(), p)));
        if ssl_certificates.is_empty() {
            for key in [keys::SSL_NEGOTIATION_POLICY, keys::ALPN_POLICY] {
                if self.get(key).is_some() {
                    ignored.push(IgnoredAnnotation {
                        key: key.to_string(),
                        reason: "applies to TLS listeners only, and aws-load-balancer-ssl-cert is not set",
                    });
                }
            }
        }
        let backend_protocol = self
            .one_of(
                keys::BACKEND_PROTOCOL,
                &[("tcp", BackendProtocol::Tcp), ("ssl", BackendProtocol::Ssl)],
            )
            .unwrap_or_default();
        let lb_attributes = self.lb_attributes();
        let tg_attributes = self.tg_attributes();
        let health_check = self.health_check(&mut ignored);
        let additional_tags = self.additional_tags();
        let security_groups = self.security_groups(keys::SECURITY_GROUPS);
        let extra_security_groups = self.security_groups(keys::EXTRA_SECURITY_GROUPS);
        let manage_backend_sg_rules = self
            .bool(keys::MANAGE_BACKEND_SG_RULES)
            .unwrap_or(security_groups.is_empty());
        let security_group_prefix_lists = self.prefix_lists();
        let enforce_sg_inbound_rules_on_private_link = self.one_of(
            keys::INBOUND_SG_RULES_ON_PRIVATE_LINK,
            &[("on", true), ("off", false)],
        );
        let icmp_path_mtu_discovery = self
            .one_of(keys::ICMP_PATH_MTU, &[("on", true), ("off", false)])
            .unwrap_or(false);
        let target_node_labels = self.target_node_labels();
        let source_ranges = self.source_ranges();
        self.listener_limit(ports);

        LbSpec {
            lb_type,
            target_type,
            scheme,
            name,
            subnets,
            ip_address_type,
            eip_allocations,
            private_ipv4_addresses,
            ipv6_addresses,
            ssl_certificates,
            tls_ports,
            ssl_negotiation_policy,
            alpn_policy,
            backend_protocol,
            lb_attributes,
            tg_attributes,
            listener_attributes,
            health_check,
            additional_tags,
            security_groups,
            extra_security_groups,
            manage_backend_sg_rules,
            security_group_prefix_lists,
            enforce_sg_inbound_rules_on_private_link,
            icmp_path_mtu_discovery,
            target_node_labels,
            source_ranges,
            ignored,
        }
    }

    fn target_type(&mut self, lb_type: Option<LbType>) -> TargetType {
        let explicit = self.one_of(
            keys::NLB_TARGET_TYPE,
            &[("instance", TargetType::Instance), ("ip", TargetType::Ip)],
        );
        match (lb_type, explicit) {
            (Some(LbType::NlbIp), Some(TargetType::Instance)) => {
                self.error(
                    keys::NLB_TARGET_TYPE,
                    "instance",
                    "ip (or remove it), since aws-load-balancer-type nlb-ip means ip targets",
                    ErrorKind::Conflict(format!("{}=nlb-ip", keys::TYPE)),
                );
                TargetType::Ip
            }
            (Some(LbType::NlbIp), _) => TargetType::Ip,
            (_, Some(t)) => t,
            (_, None) => TargetType::Instance,
        }
    }

    fn scheme(&mut self, default: Scheme) -> Scheme {
        let scheme = self.one_of(
            keys::SCHEME,
            &[
                ("internet-facing", Scheme::InternetFacing),
                ("internal", Scheme::Internal),
            ],
        );
        let legacy = self.get(keys::INTERNAL).map(|v| {
            if v.eq_ignore_ascii_case("false") {
                Scheme::InternetFacing
            } else {
                Scheme::Internal
            }
        });
        match (scheme, legacy) {
            (Some(s), Some(l)) if s != l => {
                let value = self.get(keys::INTERNAL).unwrap_or_default().to_string();
                self.error(
                    keys::INTERNAL,
                    &value,
                    format!("the same scheme in both, or only {}", keys::SCHEME),
                    ErrorKind::Conflict(format!("{}={s}", keys::SCHEME)),
                );
                s
            }
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => default,
        }
    }

    fn name(&mut self) -> Option<String> {
        let value = self.get(keys::NAME)?;
        if valid_lb_name(value) {
            Some(value.to_string())
        } else {
            self.invalid(
                keys::NAME,
                value,
                "1 to 32 characters a-z, A-Z, 0-9 and '-', not starting or ending with '-', not starting with 'internal-'",
            );
            None
        }
    }

    fn subnets(&mut self) -> Vec<SubnetRef> {
        let mut out: Vec<SubnetRef> = Vec::new();
        let mut seen = BTreeSet::new();
        for item in self.list(keys::SUBNETS) {
            let r = SubnetRef::parse(item);
            if !seen.insert(r.clone()) {
                self.invalid(keys::SUBNETS, item, "each subnet once");
            } else {
                out.push(r);
            }
        }
        out
    }

    /// Checks a per-subnet address list: scheme or ip-address-type allowed,
    /// and one per named subnet. Discovered subnets take no pinned address:
    /// their number and order are not the user's to know.
    fn check_per_subnet(
        &mut self,
        key: &str,
        count: usize,
        subnet_count: usize,
        blocked_by: Option<(String, &str)>,
    ) {
        let value = self.get(key).unwrap_or_default().to_string();
        if let Some((with, accepted)) = blocked_by {
            self.error(key, &value, accepted, ErrorKind::Conflict(with));
        } else if subnet_count == 0 {
            self.error(
                key,
                &value,
                format!(
                    "one address per subnet named in {}, in the same order",
                    keys::SUBNETS
                ),
                ErrorKind::Conflict(format!(
                    "{} not being set (subnets are discovered)",
                    keys::SUBNETS
                )),
            );
        } else if count != subnet_count {
            self.error(
                key,
                &value,
                format!("exactly one per subnet ({subnet_count})"),
                ErrorKind::Conflict(format!("{} ({subnet_count} subnets)", keys::SUBNETS)),
            );
        }
    }

    fn eip_allocations(&mut self, scheme: Scheme, subnet_count: usize) -> Vec<String> {
        let mut out = Vec::new();
        for item in self.list(keys::EIP_ALLOCATIONS) {
            if is_aws_id(item, "eipalloc-") {
                out.push(item.to_string());
            } else {
                self.invalid(
                    keys::EIP_ALLOCATIONS,
                    item,
                    "EIP allocation IDs eipalloc-<hex>",
                );
            }
        }
        if !out.is_empty() {
            let blocked = (scheme == Scheme::Internal).then(|| {
                (
                    format!("{}=internal", keys::SCHEME),
                    "EIP allocations only on internet-facing load balancers",
                )
            });
            let n = self.list(keys::EIP_ALLOCATIONS).len();
            self.check_per_subnet(keys::EIP_ALLOCATIONS, n, subnet_count, blocked);
        }
        out
    }

    fn private_ipv4_addresses(&mut self, scheme: Scheme, subnet_count: usize) -> Vec<Ipv4Addr> {
        let mut out = Vec::new();
        for item in self.list(keys::PRIVATE_IPV4_ADDRESSES) {
            match parse_ipv4_lenient(item) {
                Some(ip) => out.push(ip),
                None => self.invalid(keys::PRIVATE_IPV4_ADDRESSES, item, "IPv4 addresses"),
            }
        }
        if !out.is_empty() {
            let blocked = (scheme == Scheme::InternetFacing).then(|| {
                (
                    format!("{}=internet-facing", keys::SCHEME),
                    "private IPv4 addresses only on internal load balancers",
                )
            });
            let n = self.list(keys::PRIVATE_IPV4_ADDRESSES).len();
            self.check_per_subnet(keys::PRIVATE_IPV4_ADDRESSES, n, subnet_count, blocked);
        }
        out
    }

    fn ipv6_addresses(&mut self, ip_type: IpAddressType, subnet_count: usize) -> Vec<Ipv6Addr> {
        let mut out = Vec::new();
        for item in self.list(keys::IPV6_ADDRESSES) {
            match item.parse::<Ipv6Addr>() {
                Ok(ip) => out.push(ip),
                Err(_) => self.invalid(keys::IPV6_ADDRESSES, item, "IPv6 addresses"),
            }
        }
        if !out.is_empty() {
            let blocked = (ip_type == IpAddressType::Ipv4).then(|| {
                (
                    format!("{}=ipv4", keys::IP_ADDRESS_TYPE),
                    "IPv6 addresses only with aws-load-balancer-ip-address-type dualstack",
                )
            });
            let n = self.list(keys::IPV6_ADDRESSES).len();
            self.check_per_subnet(keys::IPV6_ADDRESSES, n, subnet_count, blocked);
        }
        out
    }

    fn ssl_certificates(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for item in self.list(keys::SSL_CERT) {
            if is_certificate_arn(item) {
                out.push(item.to_string());
            } else {
                self.invalid(
                    keys::SSL_CERT,
                    item,
                    "ACM or IAM certificate ARNs (arn:<partition>:acm:<region>:<account>:certificate/<id>)",
                );
            }
        }
        out
    }

    fn tls_ports(
        &mut self,
        ports: &[ServicePort],
        have_cert: bool,
        ignored: &mut Vec<IgnoredAnnotation>,
    ) -> BTreeSet<u16> {
        let protocols = port_protocols(ports);
        let listed = self.get(keys::SSL_PORTS).map(|v| v.to_string());
        if !have_cert {
            if listed.is_some() {
                ignored.push(IgnoredAnnotation {
                    key: keys::SSL_PORTS.to_string(),
                    reason: "no aws-load-balancer-ssl-cert, so no port gets TLS",
                });
            }
            return BTreeSet::new();
        }
        let all_tcp = || {
            protocols
                .iter()
                .filter(|(_, p)| **p == PortProtocols::Tcp)
                .map(|(n, _)| *n)
                .collect::<BTreeSet<u16>>()
        };
        let Some(listed) = listed else {
            return all_tcp();
        };
        let items = split_list(&listed);
        if items == ["*"] {
            return all_tcp();
        }
        let mut out = BTreeSet::new();
        for item in items {
            let number = match item.parse::<i32>() {
                Ok(n) => ports.iter().find(|p| p.port == n),
                Err(_) => ports.iter().find(|p| p.name.as_deref() == Some(item)),
            }
            .and_then(|p| u16::try_from(p.port).ok());
            let Some(number) = number else {
                let names = ports
                    .iter()
                    .map(|p| match &p.name {
                        Some(n) => format!("{} ({n})", p.port),
                        None => p.port.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                self.invalid(
                    keys::SSL_PORTS,
                    item,
                    format!("\"*\" or port numbers or names of this Service: {names}"),
                );
                continue;
            };
            match protocols.get(&number) {
                Some(PortProtocols::Tcp) => {
                    out.insert(number);
                }
                Some(other) => self.error(
                    keys::SSL_PORTS,
                    item,
                    "TCP-only ports (TLS cannot carry UDP)",
                    ErrorKind::Conflict(format!(
                        "spec.ports: port {number} is {}",
                        other.describe()
                    )),
                ),
                None => {}
            }
        }
        out
    }

    fn ssl_policy(&mut self) -> String {
        match self.get(keys::SSL_NEGOTIATION_POLICY) {
            None => DEFAULT_SSL_POLICY.to_string(),
            Some(v)
                if v.len() <= 128
                    && v.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
                    }) =>
            {
                v.to_string()
            }
            Some(v) => {
                let v = v.to_string();
                self.invalid(
                    keys::SSL_NEGOTIATION_POLICY,
                    &v,
                    format!("an ELBv2 security policy name, e.g. {DEFAULT_SSL_POLICY}"),
                );
                DEFAULT_SSL_POLICY.to_string()
            }
        }
    }

    /// `k=v` pairs, each key once. `allow_bare` lets `k` mean `k=""`.
    fn pairs(&mut self, key: &str, allow_bare: bool) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        // A set, not a scan of `out`: values may hold thousands of pairs.
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for item in self.list(key) {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None if allow_bare => (item, ""),
                None => {
                    self.invalid(key, item, "comma-separated key=value pairs");
                    continue;
                }
            };
            if k.is_empty() {
                self.invalid(key, item, "comma-separated key=value pairs");
            } else if !seen.insert(k.to_string()) {
                self.invalid(key, item, "each key once");
            } else {
                out.push((k.to_string(), v.to_string()));
            }
        }
        out
    }

    fn attributes(&mut self, key: &str, known: &[(&str, AttrValue)]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, v) in self.pairs(key, false) {
            let item = format!("{k}={v}");
            match known.iter().find(|(name, _)| *name == k) {
                None => {
                    let names = known.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
                    self.invalid(key, &item, format!("attributes {names}"));
                }
                Some((_, kind)) => match kind.normalise(&v) {
                    Some(v) => {
                        out.insert(k, v);
                    }
                    None => self.invalid(key, &item, format!("{k}: {}", kind.describe())),
                },
            }
        }
        out
    }

    fn lb_attributes(&mut self) -> BTreeMap<String, String> {
        let mut attrs = self.attributes(keys::ATTRIBUTES, LB_ATTRIBUTES);
        let folded = [
            (keys::CROSS_ZONE, "load_balancing.cross_zone.enabled", true),
            (keys::ACCESS_LOG_ENABLED, "access_logs.s3.enabled", true),
            (keys::ACCESS_LOG_BUCKET, "access_logs.s3.bucket", false),
            (keys::ACCESS_LOG_PREFIX, "access_logs.s3.prefix", false),
        ];
        for (key, attr, is_bool) in folded {
            let value = if is_bool {
                self.bool(key).map(|b| b.to_string())
            } else {
                self.get(key).map(str::to_string)
            };
            let Some(value) = value else { continue };
            self.fold_attribute(key, keys::ATTRIBUTES, attr, value, &mut attrs);
        }
        attrs
    }

    fn tg_attributes(&mut self) -> BTreeMap<String, String> {
        let mut attrs = self.attributes(keys::TARGET_GROUP_ATTRIBUTES, TG_ATTRIBUTES);
        if let Some(v) = self.get(keys::PROXY_PROTOCOL) {
            if v == "*" {
                self.fold_attribute(
                    keys::PROXY_PROTOCOL,
                    keys::TARGET_GROUP_ATTRIBUTES,
                    "proxy_protocol_v2.enabled",
                    "true".to_string(),
                    &mut attrs,
                );
            } else {
                let v = v.to_string();
                self.invalid(
                    keys::PROXY_PROTOCOL,
                    &v,
                    "\"*\" (proxy protocol v2 on every target group)",
                );
            }
        }
        attrs
    }

    /// A dedicated annotation that sets an attribute the generic one may also set.
    fn fold_attribute(
        &mut self,
        key: &str,
        generic_key: &str,
        attr: &str,
        value: String,
        attrs: &mut BTreeMap<String, String>,
    ) {
        match attrs.get(attr) {
            Some(existing) if *existing != value => {
                let shown = self.get(key).unwrap_or_default().to_string();
                self.error(
                    key,
                    &shown,
                    format!("the same {attr} in both, or only one of them"),
                    ErrorKind::Conflict(format!("{generic_key} {attr}={existing}")),
                );
            }
            _ => {
                attrs.insert(attr.to_string(), value);
            }
        }
    }

    fn listener_attributes(
        &mut self,
        key: &str,
        rest: &str,
        value: &str,
        ports: &[ServicePort],
    ) -> Option<((Protocol, u16), BTreeMap<String, String>)> {
        let value = value.trim();
        let parsed = rest.split_once('-').and_then(|(proto, port)| {
            let proto = match proto.to_ascii_uppercase().as_str() {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                "TCP_UDP" => Protocol::TcpUdp,
                "TLS" => Protocol::Tls,
                _ => return None,
            };
            Some((proto, port.parse::<u16>().ok()?))
        });
        let Some((proto, port)) = parsed else {
            self.error(
                key,
                value,
                format!("{LISTENER_ATTRIBUTES_PREFIX}<TCP|UDP|TCP_UDP|TLS>-<port>"),
                ErrorKind::Unknown,
            );
            return None;
        };
        if !ports.iter().any(|p| p.port == i32::from(port)) {
            self.error(
                key,
                value,
                "a key naming one of this Service's ports",
                ErrorKind::Conflict(format!("spec.ports (no port {port})")),
            );
            return None;
        }
        // AWS has listener attributes (tcp.idle_timeout.seconds) for TCP
        // listeners only: a TLS idle timeout is fixed at 350 s, UDP has none.
        let udp_too = ports
            .iter()
            .any(|p| p.port == i32::from(port) && p.protocol.as_deref() == Some("UDP"));
        if proto != Protocol::Tcp || udp_too {
            self.error(
                key,
                value,
                format!(
                    "{LISTENER_ATTRIBUTES_PREFIX}TCP-<port> for a TCP-only port: AWS offers listener attributes for TCP listeners only"
                ),
                ErrorKind::Invalid,
            );
            return None;
        }
        let attrs = self.attributes(key, LISTENER_ATTRIBUTES);
        Some(((proto, port), attrs))
    }

    fn health_check(&mut self, ignored: &mut Vec<IgnoredAnnotation>) -> HealthCheckOverrides {
        let protocol = self.one_of(
            keys::HEALTHCHECK_PROTOCOL,
            &[
                ("TCP", HealthCheckProtocol::Tcp),
                ("HTTP", HealthCheckProtocol::Http),
                ("HTTPS", HealthCheckProtocol::Https),
            ],
        );
        let port = self.get(keys::HEALTHCHECK_PORT).and_then(|v| {
            if v == "traffic-port" {
                return Some(HealthCheckPort::TrafficPort);
            }
            match v.parse::<u16>() {
                Ok(p) if p > 0 => Some(HealthCheckPort::Port(p)),
                _ => {
                    let v = v.to_string();
                    self.invalid(
                        keys::HEALTHCHECK_PORT,
                        &v,
                        "traffic-port or a port number from 1 to 65535",
                    );
                    None
                }
            }
        });
        let mut path = self.get(keys::HEALTHCHECK_PATH).and_then(|v| {
            if v.starts_with('/') && v.len() <= 1024 && v.bytes().all(|b| b.is_ascii_graphic()) {
                Some(v.to_string())
            } else {
                let v = v.to_string();
                self.invalid(
                    keys::HEALTHCHECK_PATH,
                    &v,
                    "a path starting with '/', at most 1024 printable characters, no spaces",
                );
                None
            }
        });
        let mut success_codes = self.get(keys::HEALTHCHECK_SUCCESS_CODES).and_then(|v| {
            if valid_success_codes(v) {
                Some(v.to_string())
            } else {
                let v = v.to_string();
                self.invalid(
                    keys::HEALTHCHECK_SUCCESS_CODES,
                    &v,
                    "HTTP codes 200-599: a code (200), a list (200,202) or a range (200-399)",
                );
                None
            }
        });
        if protocol == Some(HealthCheckProtocol::Tcp) {
            // Both anchors ignore these for TCP checks; refusing would break
            // Services that work with them today.
            for (key, slot) in [
                (keys::HEALTHCHECK_PATH, &mut path),
                (keys::HEALTHCHECK_SUCCESS_CODES, &mut success_codes),
            ] {
                if slot.take().is_some() {
                    ignored.push(IgnoredAnnotation {
                        key: key.to_string(),
                        reason: "applies to HTTP and HTTPS health checks only, and aws-load-balancer-healthcheck-protocol is TCP",
                    });
                }
            }
        }
        HealthCheckOverrides {
            protocol,
            port,
            path,
            interval_seconds: self.int_in_range(keys::HEALTHCHECK_INTERVAL, 5, 300),
            timeout_seconds: self.int_in_range(keys::HEALTHCHECK_TIMEOUT, 2, 120),
            healthy_threshold: self.int_in_range(keys::HEALTHCHECK_HEALTHY_THRESHOLD, 2, 10),
            unhealthy_threshold: self.int_in_range(keys::HEALTHCHECK_UNHEALTHY_THRESHOLD, 2, 10),
            success_codes,
        }
    }

    fn additional_tags(&mut self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, v) in self.pairs(keys::ADDITIONAL_RESOURCE_TAGS, true) {
            let item = format!("{k}={v}");
            if k.starts_with(tags::CLUSTER_PREFIX)
                || k == tags::SERVICE_NAME
                || k.starts_with(tags::CAUSEWAY_PREFIX)
            {
                self.error(
                    keys::ADDITIONAL_RESOURCE_TAGS,
                    &item,
                    "tags other than kubernetes.io/cluster/*, kubernetes.io/service-name and causeway.dev/*, which Causeway sets itself",
                    ErrorKind::Conflict("Causeway's identity tags".to_string()),
                );
            } else if k.to_ascii_lowercase().starts_with("aws:") {
                self.invalid(
                    keys::ADDITIONAL_RESOURCE_TAGS,
                    &item,
                    "tag keys not starting with aws: (reserved by AWS)",
                );
            } else if !(is_tag_text(&k) && is_tag_text(&v)) {
                self.invalid(
                    keys::ADDITIONAL_RESOURCE_TAGS,
                    &item,
                    "keys and values of letters, digits, spaces and _ . : / = + - @",
                );
            } else if k.chars().count() > 128 || v.chars().count() > 256 {
                self.error(
                    keys::ADDITIONAL_RESOURCE_TAGS,
                    &item,
                    "keys up to 128 and values up to 256 characters",
                    ErrorKind::OutOfRange,
                );
            } else {
                out.insert(k, v);
            }
        }
        if out.len() > MAX_USER_TAGS {
            let value = self
                .get(keys::ADDITIONAL_RESOURCE_TAGS)
                .unwrap_or_default()
                .to_string();
            self.error(
                keys::ADDITIONAL_RESOURCE_TAGS,
                &value,
                format!("at most {MAX_USER_TAGS} tags (AWS allows 50; Causeway sets 4)"),
                ErrorKind::OutOfRange,
            );
        }
        out
    }

    fn security_groups(&mut self, key: &str) -> Vec<SecurityGroupRef> {
        let mut out: Vec<SecurityGroupRef> = Vec::new();
        let mut seen = BTreeSet::new();
        for item in self.list(key) {
            let r = SecurityGroupRef::parse(item);
            if !seen.insert(r.clone()) {
                self.invalid(key, item, "each security group once");
            } else {
                out.push(r);
            }
        }
        out
    }

    fn prefix_lists(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for item in self.list(keys::SECURITY_GROUP_PREFIX_LISTS) {
            if is_aws_id(item, "pl-") {
                out.push(item.to_string());
            } else {
                self.invalid(
                    keys::SECURITY_GROUP_PREFIX_LISTS,
                    item,
                    "managed prefix list IDs pl-<hex>",
                );
            }
        }
        out
    }

    fn target_node_labels(&mut self) -> Vec<NodeLabelRequirement> {
        let mut out = Vec::new();
        let items: BTreeSet<&str> = self.list(keys::TARGET_NODE_LABELS).into_iter().collect();
        for (k, v) in self.pairs(keys::TARGET_NODE_LABELS, true) {
            let bare = items.contains(k.as_str());
            if !valid_label_key(&k) {
                self.invalid(
                    keys::TARGET_NODE_LABELS,
                    &k,
                    "label keys ([prefix/]name, name up to 63 characters of a-z, A-Z, 0-9, '-', '_', '.')",
                );
                continue;
            }
            out.push(NodeLabelRequirement {
                key: k,
                value: (!bare).then_some(v),
            });
        }
        out
    }

    fn source_ranges(&mut self) -> Option<Vec<Cidr>> {
        let items = self.get(SOURCE_RANGES).map(split_list)?;
        let mut out = Vec::new();
        for item in items {
            match Cidr::parse(item) {
                Some(c) => out.push(c),
                None => self.invalid(
                    SOURCE_RANGES,
                    item,
                    "comma-separated IPv4 or IPv6 CIDRs, e.g. 203.0.113.0/24",
                ),
            }
        }
        out.sort();
        out.dedup();
        Some(out)
    }

    fn listener_limit(&mut self, ports: &[ServicePort]) {
        let listeners = port_protocols(ports).len();
        if listeners > MAX_LISTENERS {
            self.error(
                "spec.ports",
                &format!("{listeners} listener ports"),
                format!("at most {MAX_LISTENERS} distinct port numbers (one NLB listener each)"),
                ErrorKind::OutOfRange,
            );
        }
    }
}

/// Which protocols a Service uses on one port number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PortProtocols {
    Tcp,
    Udp,
    TcpUdp,
    /// SCTP or anything else an NLB cannot carry.
    Other,
}

impl PortProtocols {
    fn describe(self) -> &'static str {
        match self {
            PortProtocols::Tcp => "TCP",
            PortProtocols::Udp => "UDP",
            PortProtocols::TcpUdp => "both TCP and UDP",
            PortProtocols::Other => "neither TCP nor UDP",
        }
    }
}

/// Port number → protocols on it (TCP and UDP on one number merge into TCP_UDP).
pub(crate) fn port_protocols(ports: &[ServicePort]) -> BTreeMap<u16, PortProtocols> {
    let mut out = BTreeMap::new();
    for p in ports {
        let Ok(number) = u16::try_from(p.port) else {
            continue;
        };
        let this = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => PortProtocols::Tcp,
            "UDP" => PortProtocols::Udp,
            _ => PortProtocols::Other,
        };
        let merged = match (out.get(&number), this) {
            (None, t) => t,
            (Some(PortProtocols::Tcp), PortProtocols::Udp)
            | (Some(PortProtocols::Udp), PortProtocols::Tcp) => PortProtocols::TcpUdp,
            (Some(PortProtocols::Other), _) | (Some(_), PortProtocols::Other) => {
                PortProtocols::Other
            }
            (Some(prev), _) => *prev,
        };
        out.insert(number, merged);
    }
    out
}

/// How an attribute's value is checked; values are normalised (booleans lower-case).
enum AttrValue {
    Bool,
    Int(i64, i64),
    OneOf(&'static [&'static str]),
    OffOrInt(i64, i64),
    Text,
}

impl AttrValue {
    fn normalise(&self, v: &str) -> Option<String> {
        match self {
            AttrValue::Bool => parse_bool(v).map(|b| b.to_string()),
            AttrValue::Int(lo, hi) => v
                .parse::<i64>()
                .ok()
                .filter(|n| (*lo..=*hi).contains(n))
                .map(|n| n.to_string()),
            AttrValue::OneOf(choices) => choices.iter().find(|c| **c == v).map(|c| c.to_string()),
            AttrValue::OffOrInt(..) if v == "off" => Some("off".to_string()),
            AttrValue::OffOrInt(lo, hi) => AttrValue::Int(*lo, *hi).normalise(v),
            AttrValue::Text => Some(v.to_string()),
        }
    }

    fn describe(&self) -> String {
        match self {
            AttrValue::Bool => BOOL_ACCEPTED.to_string(),
            AttrValue::Int(lo, hi) => format!("an integer from {lo} to {hi}"),
            AttrValue::OneOf(choices) => choices.join(", "),
            AttrValue::OffOrInt(lo, hi) => format!("off or an integer from {lo} to {hi}"),
            AttrValue::Text => "any text".to_string(),
        }
    }
}

const LB_ATTRIBUTES: &[(&str, AttrValue)] = &[
    ("access_logs.s3.bucket", AttrValue::Text),
    ("access_logs.s3.enabled", AttrValue::Bool),
    ("access_logs.s3.prefix", AttrValue::Text),
    (
        "dns_record.client_routing_policy",
        AttrValue::OneOf(&[
            "any_availability_zone",
            "availability_zone_affinity",
            "partial_availability_zone_affinity",
        ]),
    ),
    ("deletion_protection.enabled", AttrValue::Bool),
    ("ipv6.deny_all_igw_traffic", AttrValue::Bool),
    ("load_balancing.cross_zone.enabled", AttrValue::Bool),
    (
        "secondary_ips.auto_assigned.per_subnet",
        AttrValue::Int(0, 7),
    ),
    ("zonal_shift.config.enabled", AttrValue::Bool),
];

const TG_ATTRIBUTES: &[(&str, AttrValue)] = &[
    (
        "deregistration_delay.connection_termination.enabled",
        AttrValue::Bool,
    ),
    (
        "deregistration_delay.timeout_seconds",
        AttrValue::Int(0, 3600),
    ),
    (
        "load_balancing.cross_zone.enabled",
        AttrValue::OneOf(&["true", "false", "use_load_balancer_configuration"]),
    ),
    ("preserve_client_ip.enabled", AttrValue::Bool),
    ("proxy_protocol_v2.enabled", AttrValue::Bool),
    ("stickiness.enabled", AttrValue::Bool),
    ("stickiness.type", AttrValue::OneOf(&["source_ip"])),
    (
        "target_group_health.dns_failover.minimum_healthy_targets.count",
        AttrValue::OffOrInt(1, 1_000_000),
    ),
    (
        "target_group_health.dns_failover.minimum_healthy_targets.percentage",
        AttrValue::OffOrInt(1, 100),
    ),
    (
        "target_group_health.unhealthy_state_routing.minimum_healthy_targets.count",
        AttrValue::Int(1, 1_000_000),
    ),
    (
        "target_group_health.unhealthy_state_routing.minimum_healthy_targets.percentage",
        AttrValue::OffOrInt(1, 100),
    ),
    (
        "target_health_state.unhealthy.connection_termination.enabled",
        AttrValue::Bool,
    ),
    (
        "target_health_state.unhealthy.draining_interval_seconds",
        AttrValue::Int(0, 360_000),
    ),
];

const LISTENER_ATTRIBUTES: &[(&str, AttrValue)] =
    &[("tcp.idle_timeout.seconds", AttrValue::Int(60, 6000))];

fn split_list(v: &str) -> Vec<&str> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Go's `strconv.ParseBool`, which both anchors use.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A tag key or value that ELBv2 and EC2 both accept: ELBv2's own pattern.
/// Letters are `\p{L}` only: marks such as Devanagari vowel signs and
/// symbols such as circled letters, which Rust's `is_alphanumeric` counts
/// as alphabetic, are refused by AWS.
fn is_tag_text(text: &str) -> bool {
    static TAG: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"^[\p{L}\p{Z}\p{N}_.:/=+\-@]*$").expect("AWS's tag pattern")
    });
    TAG.is_match(text)
}

fn is_aws_id(v: &str, prefix: &str) -> bool {
    v.strip_prefix(prefix)
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_certificate_arn(v: &str) -> bool {
    let parts: Vec<&str> = v.splitn(6, ':').collect();
    parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && matches!(parts[2], "acm" | "iam")
        && !parts[5].is_empty()
        && !v.contains(char::is_whitespace)
}

/// ELBv2 load balancer (and target group) name rules.
pub fn valid_lb_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 32
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-')
        && !v.starts_with("internal-")
}

fn valid_success_codes(v: &str) -> bool {
    let code = |s: &str| s.len() == 3 && s.parse::<u16>().is_ok_and(|n| (200..=599).contains(&n));
    if let Some((lo, hi)) = v.split_once('-') {
        return code(lo) && code(hi) && lo <= hi;
    }
    v.split(',').all(code)
}

fn valid_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
    });
    name_ok && prefix_ok
}

/// The known key nearest to a misspelt one, if any is close (edit distance ≤ 3).
fn closest_known_key(key: &str) -> Option<&'static str> {
    // A common prefix does not change the distance, and lengths that differ by
    // more than 3 rule a key out: both keep long or odd keys cheap.
    let key = key.strip_prefix(AWS_PREFIX).unwrap_or(key);
    let len = key.chars().count();
    KNOWN_KEYS
        .iter()
        .filter_map(|(k, _)| {
            let suffix = k.strip_prefix(AWS_PREFIX).unwrap_or(k);
            (suffix.chars().count().abs_diff(len) <= 3).then(|| (*k, edit_distance(suffix, key)))
        })
        .filter(|(_, d)| *d <= 3)
        .min_by_key(|(_, d)| *d)
        .map(|(k, _)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz;

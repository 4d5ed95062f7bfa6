//! The controller's vocabulary: what one Service's AWS resources should look like
//! (`Desired`, computed by [`crate::desired`]) and what the AWS adapter read back
//! (`Observed`, consumed by [`crate::plan`]).
//!
//! Everything here is a plain value: no SDK types, no I/O. Collections are kept
//! sorted (`BTreeMap`, sorted `Vec`s) so that two computations of the same input
//! compare equal and plans come out in a stable order.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Tag keys Causeway writes on everything it creates. Identity lives in these
/// tags (SPEC 1.2), so users may not override them through
/// `aws-load-balancer-additional-resource-tags`.
pub mod tags {
    /// `kubernetes.io/cluster/<cluster>=owned`.
    pub const CLUSTER_PREFIX: &str = "kubernetes.io/cluster/";
    /// `<namespace>/<name>` of the Service.
    pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
    /// The Service UID; the key the orphan sweep and the finalizer rely on.
    pub const SERVICE_UID: &str = "causeway.dev/service-uid";
    /// `lb`, `sg` or `tg-<port>-<protocol>`.
    pub const RESOURCE: &str = "causeway.dev/resource";
    /// Everything under this prefix is Causeway's.
    pub const CAUSEWAY_PREFIX: &str = "causeway.dev/";
}

/// Load balancer scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scheme {
    InternetFacing,
    Internal,
}

impl Scheme {
    /// The ELBv2 API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::InternetFacing => "internet-facing",
            Scheme::Internal => "internal",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `ipv4` or `dualstack` (ELBv2 `IpAddressType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum IpAddressType {
    #[default]
    Ipv4,
    Dualstack,
}

impl IpAddressType {
    pub fn as_str(self) -> &'static str {
        match self {
            IpAddressType::Ipv4 => "ipv4",
            IpAddressType::Dualstack => "dualstack",
        }
    }
}

impl fmt::Display for IpAddressType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Address family of a target group's targets (ELBv2 `TargetGroupIpAddressType`).
/// Cannot change in place. Instance targets are always `ipv4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum TargetGroupIpAddressType {
    #[default]
    Ipv4,
    Ipv6,
}

impl TargetGroupIpAddressType {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetGroupIpAddressType::Ipv4 => "ipv4",
            TargetGroupIpAddressType::Ipv6 => "ipv6",
        }
    }

    /// The EndpointSlice `addressType` whose addresses fit this family.
    pub fn slice_address_type(self) -> &'static str {
        match self {
            TargetGroupIpAddressType::Ipv4 => "IPv4",
            TargetGroupIpAddressType::Ipv6 => "IPv6",
        }
    }
}

impl fmt::Display for TargetGroupIpAddressType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a target group's targets are: nodes (on their NodePort) or pod IPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum TargetType {
    #[default]
    Instance,
    Ip,
}

impl TargetType {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetType::Instance => "instance",
            TargetType::Ip => "ip",
        }
    }
}

impl fmt::Display for TargetType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Listener and target-group protocols an NLB supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    TcpUdp,
    Tls,
}

impl Protocol {
    /// The ELBv2 API spelling (`TCP`, `UDP`, `TCP_UDP`, `TLS`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::TcpUdp => "TCP_UDP",
            Protocol::Tls => "TLS",
        }
    }

    /// Lower-case spelling used in the `causeway.dev/resource` tag.
    pub fn tag_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::TcpUdp => "tcp_udp",
            Protocol::Tls => "tls",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// TLS listener ALPN policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlpnPolicy {
    Http1Only,
    Http2Only,
    Http2Optional,
    Http2Preferred,
    None,
}

impl AlpnPolicy {
    pub const ALL: [AlpnPolicy; 5] = [
        AlpnPolicy::Http1Only,
        AlpnPolicy::Http2Only,
        AlpnPolicy::Http2Optional,
        AlpnPolicy::Http2Preferred,
        AlpnPolicy::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlpnPolicy::Http1Only => "HTTP1Only",
            AlpnPolicy::Http2Only => "HTTP2Only",
            AlpnPolicy::Http2Optional => "HTTP2Optional",
            AlpnPolicy::Http2Preferred => "HTTP2Preferred",
            AlpnPolicy::None => "None",
        }
    }
}

impl fmt::Display for AlpnPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A subnet named by ID (`subnet-…`) or by its `Name` tag; the adapter resolves names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubnetRef {
    Id(String),
    Name(String),
}

impl SubnetRef {
    /// `subnet-` followed by hex is an ID; anything else is a Name tag
    /// (the rule cloud-provider-aws and aws-load-balancer-controller use).
    pub fn parse(s: &str) -> SubnetRef {
        match s.strip_prefix("subnet-") {
            Some(rest) if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()) => {
                SubnetRef::Id(s.to_string())
            }
            _ => SubnetRef::Name(s.to_string()),
        }
    }
}

impl fmt::Display for SubnetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubnetRef::Id(id) => f.write_str(id),
            SubnetRef::Name(name) => write!(f, "Name={name}"),
        }
    }
}

/// A security group named by ID (`sg-…`) or by its `Name` tag.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SecurityGroupRef {
    Id(String),
    Name(String),
}

impl SecurityGroupRef {
    pub fn parse(s: &str) -> SecurityGroupRef {
        match s.strip_prefix("sg-") {
            Some(rest) if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_hexdigit()) => {
                SecurityGroupRef::Id(s.to_string())
            }
            _ => SecurityGroupRef::Name(s.to_string()),
        }
    }
}

impl fmt::Display for SecurityGroupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecurityGroupRef::Id(id) => f.write_str(id),
            SecurityGroupRef::Name(name) => write!(f, "Name={name}"),
        }
    }
}

/// An IPv4 or IPv6 CIDR, normalised: host bits cleared, leading zeros in IPv4
/// octets accepted (as Kubernetes does for `loadBalancerSourceRanges`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub const ANY_V4: Cidr = Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        prefix: 0,
    };
    pub const ANY_V6: Cidr = Cidr {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        prefix: 0,
    };

    /// Parses `a.b.c.d/n` or `x::y/n`; `None` if it is not a CIDR.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = s.trim().split_once('/')?;
        let prefix: u8 = prefix.trim().parse().ok()?;
        let addr = addr.trim();
        let addr = if addr.contains(':') {
            IpAddr::V6(addr.parse().ok()?)
        } else {
            IpAddr::V4(parse_ipv4_lenient(addr)?)
        };
        Cidr::new(addr, prefix)
    }

    /// The network containing `addr` with `prefix` bits; `None` if the prefix is too long.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let addr = match addr {
            IpAddr::V4(a) => {
                if prefix > 32 {
                    return None;
                }
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                if prefix > 128 {
                    return None;
                }
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Some(Cidr { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

/// IPv4 with optional leading zeros per octet (`010.001.2.3`), read as decimal.
pub fn parse_ipv4_lenient(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which Service a set of resources belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything one Service should have in AWS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub service: ServiceRef,
    pub load_balancer: LoadBalancer,
    /// Sorted by port.
    pub listeners: Vec<Listener>,
    /// Sorted by port; exactly one per listener, same port.
    pub target_groups: Vec<TargetGroup>,
    /// The managed frontend security group; `None` when the user brings their
    /// own (`aws-load-balancer-security-groups`).
    pub frontend_security_group: Option<SecurityGroup>,
    /// Rules on the cluster's node security group (found by the adapter by the
    /// cluster tag) letting the NLB reach NodePorts and health ports. Empty when
    /// `aws-load-balancer-manage-backend-security-group-rules` is false.
    pub backend_rules: Vec<SgRule>,
    /// Nodes that could not be targets because their providerID does not parse;
    /// the caller emits one Warning event naming them.
    pub skipped_nodes: Vec<SkippedNode>,
    /// Annotations accepted but without effect, with the reason (for a Normal event).
    pub ignored_annotations: Vec<crate::annotations::IgnoredAnnotation>,
}

impl Desired {
    /// True when no target group has a target: the caller reports
    /// `UnAvailableLoadBalancer`.
    pub fn has_no_targets(&self) -> bool {
        self.target_groups.iter().all(|tg| tg.targets.is_empty())
    }
}

/// A node left out of the targets with the reason, e.g. an unparsable providerID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedNode {
    pub node: String,
    pub reason: String,
}

/// The Network Load Balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancer {
    pub name: String,
    /// False when the name came from `aws-load-balancer-name`: a replacement must
    /// then delete the old LB first, because ELBv2 names are unique per region.
    pub name_is_generated: bool,
    pub scheme: Scheme,
    pub ip_address_type: IpAddressType,
    pub subnets: SubnetSelection,
    pub security_groups: Vec<SecurityGroupSelection>,
    /// Full NLB attribute set we manage (defaults included, so removing an
    /// annotation restores the default).
    pub attributes: BTreeMap<String, String>,
    /// `EnforceSecurityGroupInboundRulesOnPrivateLinkTraffic` (AWS default: on).
    pub enforce_sg_inbound_rules_on_private_link: bool,
    pub tags: BTreeMap<String, String>,
}

/// Where the NLB lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubnetSelection {
    /// From `aws-load-balancer-subnets`, with optional pinned addresses.
    Explicit(Vec<SubnetMapping>),
    /// Subnets tagged for the scheme's role and the cluster, one per AZ; the
    /// adapter discovers them and reports the result in [`Observed::discovered_subnets`].
    Discover,
}

/// One subnet of the NLB and the addresses pinned in it (create-only in AWS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetMapping {
    pub subnet: SubnetRef,
    pub allocation_id: Option<String>,
    pub private_ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

impl SubnetMapping {
    pub fn pins_an_address(&self) -> bool {
        self.allocation_id.is_some() || self.private_ipv4.is_some() || self.ipv6.is_some()
    }
}

/// A security group of the NLB: ours (created by the plan) or one the user named.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecurityGroupSelection {
    Managed,
    User(SecurityGroupRef),
}

impl fmt::Display for SecurityGroupSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecurityGroupSelection::Managed => f.write_str("managed"),
            SecurityGroupSelection::User(r) => r.fmt(f),
        }
    }
}

/// A listener: one per (merged) Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    pub protocol: Protocol,
    /// ACM/IAM certificate ARNs; the first is the default certificate. TLS only.
    pub certificates: Vec<String>,
    /// TLS only.
    pub ssl_policy: Option<String>,
    /// TLS only.
    pub alpn_policy: Option<AlpnPolicy>,
    /// Name of the target group it forwards to.
    pub target_group: String,
    /// From `aws-load-balancer-listener-attributes.<PROTO>-<port>`.
    pub attributes: BTreeMap<String, String>,
}

/// A target group: one per listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetGroup {
    pub name: String,
    /// The Service (= listener) port. Targets carry their own port (the NodePort
    /// or pod port), so a NodePort change re-registers targets instead of
    /// replacing the group.
    pub port: u16,
    pub protocol: Protocol,
    pub target_type: TargetType,
    pub ip_address_type: TargetGroupIpAddressType,
    pub health_check: HealthCheck,
    /// Full attribute set we manage (defaults included).
    pub attributes: BTreeMap<String, String>,
    /// Sorted.
    pub targets: Vec<Target>,
    pub tags: BTreeMap<String, String>,
}

/// A registered target: EC2 instance ID or pod IP, and the port traffic goes to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    pub id: String,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.id, self.port)
    }
}

/// Health-check protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthCheckProtocol {
    Tcp,
    Http,
    Https,
}

impl HealthCheckProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthCheckProtocol::Tcp => "TCP",
            HealthCheckProtocol::Http => "HTTP",
            HealthCheckProtocol::Https => "HTTPS",
        }
    }
}

impl fmt::Display for HealthCheckProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Health-check port: the port each target receives traffic on, or a fixed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthCheckPort {
    TrafficPort,
    Port(u16),
}

impl fmt::Display for HealthCheckPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheckPort::TrafficPort => f.write_str("traffic-port"),
            HealthCheckPort::Port(p) => p.fmt(f),
        }
    }
}

/// A target group's health check, fully specified so drift compares exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub protocol: HealthCheckProtocol,
    pub port: HealthCheckPort,
    /// HTTP/HTTPS only.
    pub path: Option<String>,
    pub interval_seconds: u16,
    pub timeout_seconds: u16,
    pub healthy_threshold: u8,
    pub unhealthy_threshold: u8,
    /// HTTP/HTTPS only, e.g. `200-399`.
    pub success_codes: Option<String>,
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.protocol, self.port)?;
        if let Some(path) = &self.path {
            f.write_str(path)?;
        }
        write!(
            f,
            " every {}s timeout {}s healthy {} unhealthy {}",
            self.interval_seconds,
            self.timeout_seconds,
            self.healthy_threshold,
            self.unhealthy_threshold
        )?;
        if let Some(codes) = &self.success_codes {
            write!(f, " codes {codes}")?;
        }
        Ok(())
    }
}

/// The managed frontend security group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroup {
    pub name: String,
    pub description: String,
    /// Sorted ingress rules.
    pub ingress: Vec<SgRule>,
    pub tags: BTreeMap<String, String>,
}

/// IP protocol of a security-group rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpProtocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl IpProtocol {
    /// The EC2 API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IpProtocol::Tcp => "tcp",
            IpProtocol::Udp => "udp",
            IpProtocol::Icmp => "icmp",
            IpProtocol::Icmpv6 => "icmpv6",
        }
    }
}

/// Where a rule admits traffic from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleSource {
    Cidr(Cidr),
    PrefixList(String),
    /// The managed frontend SG (its ID is known only once it exists).
    ManagedSecurityGroup,
    /// A user-supplied frontend SG.
    SecurityGroup(SecurityGroupRef),
}

impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleSource::Cidr(c) => c.fmt(f),
            RuleSource::PrefixList(p) => f.write_str(p),
            RuleSource::ManagedSecurityGroup => f.write_str("managed-sg"),
            RuleSource::SecurityGroup(r) => r.fmt(f),
        }
    }
}

/// One ingress rule. For ICMP, `from_port`/`to_port` are type/code as in EC2.
/// The description carries the Service UID: it is how the adapter recognises
/// rules it owns on the shared node SG, and it never touches others.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SgRule {
    pub protocol: IpProtocol,
    pub from_port: i32,
    pub to_port: i32,
    pub source: RuleSource,
    pub description: String,
}

impl SgRule {
    /// Rules are equal for planning when they admit the same traffic;
    /// descriptions are labels, not semantics.
    pub fn same_traffic(&self, other: &SgRule) -> bool {
        self.protocol == other.protocol
            && self.from_port == other.from_port
            && self.to_port == other.to_port
            && self.source == other.source
    }
}

impl fmt::Display for SgRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.from_port == self.to_port {
            write!(
                f,
                "{} {} from {}",
                self.protocol.as_str(),
                self.from_port,
                self.source
            )
        } else {
            write!(
                f,
                "{} {}-{} from {}",
                self.protocol.as_str(),
                self.from_port,
                self.to_port,
                self.source
            )
        }
    }
}

// ---------------------------------------------------------------------------
// Observed state: what the AWS adapter reads back (by tags and cached ARNs).
// ---------------------------------------------------------------------------

/// Everything tagged with one Service's UID that exists in AWS, plus the
/// adapter's resolution of names the desired state refers to. Several load
/// balancers or target groups per port only appear half-way through a
/// replacement; the plan finishes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub load_balancers: Vec<ObservedLoadBalancer>,
    pub listeners: Vec<ObservedListener>,
    pub target_groups: Vec<ObservedTargetGroup>,
    /// Frontend SGs tagged with the Service UID (normally 0 or 1).
    pub security_groups: Vec<ObservedSecurityGroup>,
    /// Rules on the node SG whose description marks them as this Service's.
    pub backend_rules: Vec<ObservedSgRule>,
    /// Result of subnet discovery (IDs) when the desired LB uses
    /// [`SubnetSelection::Discover`]; `None` if the adapter did not discover.
    pub discovered_subnets: Option<Vec<String>>,
    /// Availability zone of each discovered subnet, by ID.
    pub discovered_zones: BTreeMap<String, String>,
}

impl Observed {
    /// Records a discovery result: (subnet ID, availability zone) pairs.
    pub fn set_discovered(&mut self, subnets: Vec<(String, String)>) {
        self.discovered_zones = subnets.iter().cloned().collect();
        self.discovered_subnets = Some(subnets.into_iter().map(|(id, _)| id).collect());
    }
}

/// A load balancer as ELBv2 reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedLoadBalancer {
    pub arn: String,
    pub dns_name: String,
    pub name: String,
    pub scheme: Scheme,
    pub ip_address_type: IpAddressType,
    pub subnets: Vec<ObservedSubnetMapping>,
    pub security_groups: Vec<ObservedSecurityGroupRef>,
    pub attributes: BTreeMap<String, String>,
    pub enforce_sg_inbound_rules_on_private_link: Option<bool>,
    pub tags: BTreeMap<String, String>,
}

/// A subnet of an existing LB, with its Name tag so desired `Name=` references compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedSubnetMapping {
    pub subnet_id: String,
    pub subnet_name: Option<String>,
    /// Availability zone, when reported.
    pub zone: Option<String>,
    /// Whether AWS reported the subnet's addresses at all (moto does not):
    /// without them, pinned addresses are unknown rather than absent.
    pub addresses_reported: bool,
    pub allocation_id: Option<String>,
    pub private_ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

impl ObservedSubnetMapping {
    pub fn matches(&self, r: &SubnetRef) -> bool {
        match r {
            SubnetRef::Id(id) => &self.subnet_id == id,
            SubnetRef::Name(name) => self.subnet_name.as_deref() == Some(name.as_str()),
        }
    }
}

/// A security group attached to an existing LB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedSecurityGroupRef {
    pub id: String,
    pub name: Option<String>,
    /// True when it carries our Service-UID tag with `causeway.dev/resource=sg`.
    pub managed: bool,
}

impl ObservedSecurityGroupRef {
    pub fn matches(&self, s: &SecurityGroupSelection) -> bool {
        match s {
            SecurityGroupSelection::Managed => self.managed,
            SecurityGroupSelection::User(SecurityGroupRef::Id(id)) => &self.id == id,
            SecurityGroupSelection::User(SecurityGroupRef::Name(n)) => {
                self.name.as_deref() == Some(n.as_str())
            }
        }
    }
}

/// A listener as ELBv2 reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedListener {
    pub arn: String,
    pub load_balancer_arn: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Default certificate first, then the additional ones.
    pub certificates: Vec<String>,
    pub ssl_policy: Option<String>,
    pub alpn_policy: Option<AlpnPolicy>,
    /// ARN of the target group the default action forwards to.
    pub target_group_arn: String,
    pub attributes: BTreeMap<String, String>,
}

/// A target group as ELBv2 reports it, with its registered targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedTargetGroup {
    pub arn: String,
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_type: TargetType,
    pub health_check: HealthCheck,
    pub attributes: BTreeMap<String, String>,
    pub targets: Vec<Target>,
    pub tags: BTreeMap<String, String>,
}

/// The managed frontend SG as EC2 reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedSecurityGroup {
    pub id: String,
    pub name: String,
    pub ingress: Vec<ObservedSgRule>,
    pub tags: BTreeMap<String, String>,
}

/// An existing rule with its EC2 rule ID (what RevokeSecurityGroupIngress takes).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObservedSgRule {
    pub rule_id: String,
    pub rule: SgRule,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_normalises_host_bits_and_leading_zeros() {
        let cases = [
            ("10.0.0.1/8", Some("10.0.0.0/8")),
            (" 010.001.2.3/32 ", Some("10.1.2.3/32")),
            ("0.0.0.0/0", Some("0.0.0.0/0")),
            ("2001:db8::1/32", Some("2001:db8::/32")),
            ("::/0", Some("::/0")),
            ("10.0.0.0/33", None),
            ("10.0.0/8", None),
            ("10.0.0.0", None),
            ("1.2.3.256/32", None),
            ("fe80::/129", None),
        ];
        for (input, want) in cases {
            let got = Cidr::parse(input).map(|c| c.to_string());
            assert_eq!(got.as_deref(), want, "{input}");
        }
    }

    #[test]
    fn subnet_and_sg_refs_split_ids_from_names() {
        assert_eq!(
            SubnetRef::parse("subnet-0abc123"),
            SubnetRef::Id("subnet-0abc123".into())
        );
        assert_eq!(
            SubnetRef::parse("subnet-public-a"),
            SubnetRef::Name("subnet-public-a".into())
        );
        assert_eq!(
            SubnetRef::parse("public-a"),
            SubnetRef::Name("public-a".into())
        );
        assert_eq!(
            SecurityGroupRef::parse("sg-0123abcd"),
            SecurityGroupRef::Id("sg-0123abcd".into())
        );
        assert_eq!(
            SecurityGroupRef::parse("web-frontend"),
            SecurityGroupRef::Name("web-frontend".into())
        );
    }
}

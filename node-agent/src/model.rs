//! Services + EndpointSlices + this Node → the service ports this node proxies,
//! each with the endpoints cluster-wide and node-local traffic may reach.
//!
//! Pure: plain Kubernetes objects in, plain values out. The selection rules are
//! kube-proxy's (`pkg/proxy/topology.go`, `endpointslicecache.go`): ready
//! endpoints, else serving+terminating ones (chosen separately for the cluster
//! and the local list), never non-serving ones; topology hints only when every
//! ready endpoint carries them. One model is built per IP family.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::addr::{Cidr, IpFamily, join_host_port, parse_cidr, parse_ip};

/// Services carrying this label belong to another proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// EndpointSlices of headless Services carry this label; no proxy uses them.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Links an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The node label the topology hints of `PreferSameZone` refer to.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Legacy form of `spec.loadBalancerSourceRanges`.
pub const ANNOTATION_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API's `TCP`/`UDP`/`SCTP`; absent means TCP.
    pub fn from_api(value: Option<&str>) -> Option<Self> {
        match value.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The lower-case name iptables and the chain hashes use.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

/// `namespace/name:port`, kube-proxy's `ServicePortName` (the `:port` part is
/// omitted for an unnamed port). Used in comments and chain-name hashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// Where an endpoint runs relative to this node. Hand-written EndpointSlices
/// and Endpoints often have no `nodeName`; such endpoints are never counted as
/// local, but the data path still treats them as possibly on this node where
/// that is the safe choice (hairpin masquerade).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Locality {
    Local,
    Remote,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub locality: Locality,
}

impl Endpoint {
    /// `ip:port` (`[ip]:port` for IPv6), as kube-proxy prints and hashes it.
    pub fn address(&self) -> String {
        join_host_port(&self.ip, self.port)
    }
}

/// One port of one Service, with everything the data path needs.
/// `Eq` lets `Arc<ServicePort>` compare by pointer first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub protocol: Protocol,
    pub cluster_ip: IpAddr,
    pub port: u16,
    /// `spec.ports[].nodePort`, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
    /// `spec.healthCheckNodePort`, for LoadBalancer Services with ETP=Local.
    pub health_check_node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of this family, except `ipMode: Proxy`.
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<Cidr>,
    pub internal_policy: TrafficPolicy,
    /// `Local` only when the Service is externally accessible at all.
    pub external_policy: TrafficPolicy,
    /// `Some(timeout seconds)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout_seconds: Option<u32>,
    /// Endpoints for traffic subject to the `Cluster` policy (topology applied).
    pub cluster_endpoints: Vec<Endpoint>,
    /// This node's endpoints, for traffic subject to the `Local` policy.
    pub local_endpoints: Vec<Endpoint>,
    /// Any usable endpoint anywhere; false means "REJECT, no endpoints".
    pub has_endpoints: bool,
    /// Ready local endpoints, which is what a health-check node port reports.
    pub local_ready_endpoints: usize,
}

impl ServicePort {
    /// NodePort, LoadBalancer IP or external IP traffic reaches this port.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.load_balancer_ips.is_empty()
            || !self.external_ips.is_empty()
    }

    pub fn internal_policy_local(&self) -> bool {
        self.internal_policy == TrafficPolicy::Local
    }

    pub fn external_policy_local(&self) -> bool {
        self.external_policy == TrafficPolicy::Local
    }

    /// Cluster endpoints serve ITP=Cluster traffic, and any external traffic
    /// (even with ETP=Local, pods and the node are short-circuited to them).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local() || self.externally_accessible()
    }

    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local()
            || (self.external_policy_local() && self.externally_accessible())
    }
}

/// What the model needs to know about the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `topology.kubernetes.io/zone`, for `PreferSameZone` hints.
    pub zone: Option<String>,
    /// `status.addresses` of type InternalIP (the "primary" addresses).
    pub internal_ips: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), for `--detect-local-mode NodeCIDR`.
    pub pod_cidrs: Vec<Cidr>,
}

impl NodeInfo {
    pub fn named(name: impl Into<String>) -> Self {
        NodeInfo {
            name: name.into(),
            ..NodeInfo::default()
        }
    }

    /// Reads the Node object; unparsable addresses are reported and skipped.
    pub fn from_node(node: &Node, issues: &mut Vec<Issue>) -> Self {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut info = NodeInfo::named(name.clone());
        let object = ObjectRef::new("Node", None, &name);
        info.zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(LABEL_ZONE))
            .cloned();
        if let Some(addresses) = node.status.as_ref().and_then(|s| s.addresses.as_ref()) {
            for (i, address) in addresses.iter().enumerate() {
                if address.type_ != "InternalIP" {
                    continue;
                }
                match parse_ip(&address.address) {
                    Some(ip) => info.internal_ips.push(ip),
                    None => issues.push(object.issue(
                        format!("status.addresses[{i}].address"),
                        format!("{:?} is not an IP address", address.address),
                    )),
                }
            }
        }
        if let Some(spec) = &node.spec {
            let cidrs: Vec<(String, &String)> = match (&spec.pod_cidrs, &spec.pod_cidr) {
                (Some(list), _) if !list.is_empty() => list
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c))
                    .collect(),
                (_, Some(single)) => vec![("spec.podCIDR".to_string(), single)],
                _ => Vec::new(),
            };
            for (field, text) in cidrs {
                match parse_cidr(text) {
                    Some(cidr) => info.pod_cidrs.push(cidr),
                    None => issues.push(object.issue(field, format!("{text:?} is not a CIDR"))),
                }
            }
        }
        info
    }
}

/// The kind, namespace and name of an API object, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: &'static str, namespace: Option<&str>, name: &str) -> Self {
        ObjectRef {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }

    fn issue(&self, field: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue {
            object: self.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {}/{}", self.kind, ns, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Part of an object the model could not use; the rest of the model is intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub object: ObjectRef,
    pub field: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

/// Everything one node proxies for one IP family.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub family: IpFamily,
    pub node: NodeInfo,
    /// Sorted by name then protocol, so rendering is deterministic. Shared,
    /// so that the model of a sync reuses every port that did not change.
    pub service_ports: Vec<Arc<ServicePort>>,
}

/// Builds the model for `family`. Objects or fields that cannot be used are
/// skipped and reported in the returned issues.
pub fn build(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    node: &NodeInfo,
    family: IpFamily,
) -> (Model, Vec<Issue>) {
    let mut issues = Vec::new();
    let endpoints = collect_endpoints(slices, family, &node.name, &mut issues);
    let mut service_ports = Vec::new();
    for service in services.iter().map(Borrow::borrow) {
        service_ports_of(
            service,
            family,
            node,
            &endpoints,
            &mut service_ports,
            &mut issues,
        );
    }
    service_ports.sort_by(|a, b| (&a.name, a.protocol).cmp(&(&b.name, b.protocol)));
    let model = Model {
        family,
        node: node.clone(),
        service_ports: service_ports.into_iter().map(Arc::new).collect(),
    };
    (model, issues)
}

/// One endpoint of one slice port, before selection.
#[derive(Debug, Clone)]
struct CandidateEndpoint {
    endpoint: Endpoint,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
}

/// (namespace, service, port name, protocol) → candidates, deduplicated by
/// address (first slice by name wins) and sorted by address like kube-proxy.
type EndpointIndex = BTreeMap<(String, String, String, Protocol), Vec<CandidateEndpoint>>;

fn collect_endpoints(
    slices: &[impl Borrow<EndpointSlice>],
    family: IpFamily,
    node_name: &str,
    issues: &mut Vec<Issue>,
) -> EndpointIndex {
    let mut ordered: Vec<&EndpointSlice> = slices.iter().map(Borrow::borrow).collect();
    ordered.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut index: EndpointIndex = BTreeMap::new();
    let mut seen: HashSet<(String, String, String, Protocol, IpAddr, u16)> = HashSet::new();
    for slice in ordered {
        let labels = slice.metadata.labels.as_ref();
        let label = |key: &str| labels.and_then(|l| l.get(key));
        if label(LABEL_SERVICE_PROXY_NAME).is_some() || label(LABEL_HEADLESS).is_some() {
            continue;
        }
        let Some(service_name) = label(LABEL_SERVICE_NAME) else {
            continue;
        };
        if slice.address_type != family.address_type() {
            continue;
        }
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let object = ObjectRef::new(
            "EndpointSlice",
            Some(&namespace),
            slice.metadata.name.as_deref().unwrap_or(""),
        );
        for (pi, port) in slice.ports.iter().flatten().enumerate() {
            let Some(number) = port.port else { continue };
            let Ok(number) = u16::try_from(number) else {
                issues.push(object.issue(
                    format!("ports[{pi}].port"),
                    format!("{number} is not a port number"),
                ));
                continue;
            };
            if number == 0 {
                continue;
            }
            let Some(protocol) = Protocol::from_api(port.protocol.as_deref()) else {
                issues.push(object.issue(
                    format!("ports[{pi}].protocol"),
                    format!(
                        "{:?} is not TCP, UDP or SCTP",
                        port.protocol.as_deref().unwrap_or("")
                    ),
                ));
                continue;
            };
            let port_name = port.name.clone().unwrap_or_default();
            let key = (namespace.clone(), service_name.clone(), port_name, protocol);
            for (ei, ep) in slice.endpoints.iter().enumerate() {
                // kube-proxy uses the first address only; the others are for DNS.
                let Some(text) = ep.addresses.first() else {
                    continue;
                };
                let Some(ip) = parse_ip(text) else {
                    if pi == 0 {
                        issues.push(object.issue(
                            format!("endpoints[{ei}].addresses[0]"),
                            format!("{text:?} is not an IP address"),
                        ));
                    }
                    continue;
                };
                if IpFamily::of(&ip) != family {
                    continue;
                }
                if !seen.insert((
                    key.0.clone(),
                    key.1.clone(),
                    key.2.clone(),
                    protocol,
                    ip,
                    number,
                )) {
                    continue;
                }
                let conditions = ep.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
                let serving = conditions.and_then(|c| c.serving).unwrap_or(true);
                let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
                let locality = match ep.node_name.as_deref() {
                    None | Some("") => Locality::Unknown,
                    Some(n) if n == node_name => Locality::Local,
                    Some(_) => Locality::Remote,
                };
                let hints = ep.hints.as_ref();
                let zone_hints = hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default();
                let node_hints = hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect())
                    .unwrap_or_default();
                index
                    .entry(key.clone())
                    .or_default()
                    .push(CandidateEndpoint {
                        endpoint: Endpoint {
                            ip,
                            port: number,
                            locality,
                        },
                        ready,
                        serving,
                        terminating,
                        zone_hints,
                        node_hints,
                    });
            }
        }
    }
    for candidates in index.values_mut() {
        candidates.sort_by_cached_key(|c| c.endpoint.address());
    }
    index
}

fn service_ports_of(
    service: &Service,
    family: IpFamily,
    node: &NodeInfo,
    endpoints: &EndpointIndex,
    out: &mut Vec<ServicePort>,
    issues: &mut Vec<Issue>,
) {
    let meta = &service.metadata;
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let object = ObjectRef::new("Service", Some(&namespace), &name);
    if meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME))
    {
        return;
    }
    let Some(spec) = &service.spec else { return };
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return;
    }

    // The cluster IP of this family; a single-stack Service of the other
    // family has none and is not ours to program here.
    let cluster_ip_texts: Vec<(String, &String)> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(list), _) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip))
            .collect(),
        (_, Some(ip)) => vec![("spec.clusterIP".to_string(), ip)],
        _ => Vec::new(),
    };
    let mut cluster_ip = None;
    for (field, text) in cluster_ip_texts {
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed == "None" {
            return; // headless, or not allocated yet
        }
        match parse_ip(trimmed) {
            Some(ip) if IpFamily::of(&ip) == family => {
                cluster_ip.get_or_insert(ip);
            }
            Some(_) => {}
            None => {
                issues.push(object.issue(
                    field,
                    format!("{text:?} is not an IP address; Service skipped"),
                ));
                return;
            }
        }
    }
    let Some(cluster_ip) = cluster_ip else { return };

    let mut external_ips = Vec::new();
    for (i, text) in spec.external_ips.iter().flatten().enumerate() {
        match parse_ip(text) {
            Some(ip) if IpFamily::of(&ip) == family => external_ips.push(ip),
            Some(_) => {}
            None => issues.push(object.issue(
                format!("spec.externalIPs[{i}]"),
                format!("{text:?} is not an IP address; ignored"),
            )),
        }
    }

    let mut load_balancer_ips = Vec::new();
    if service_type == "LoadBalancer" {
        let ingress = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, entry) in ingress.into_iter().flatten().enumerate() {
            // With ipMode Proxy the load balancer delivers to the node, not to
            // the VIP, so capturing the VIP here would break its health checks.
            if entry.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            let Some(text) = entry.ip.as_deref().filter(|t| !t.trim().is_empty()) else {
                continue;
            };
            match parse_ip(text) {
                Some(ip) if IpFamily::of(&ip) == family => load_balancer_ips.push(ip),
                Some(_) => {}
                None => issues.push(object.issue(
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    format!("{text:?} is not an IP address; ignored"),
                )),
            }
        }
    }

    // An unreadable source range must not widen access, so it skips the Service.
    let annotation_ranges: Vec<String> = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SOURCE_RANGES))
        .map(|v| {
            v.split(',')
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let (range_field, range_texts) = match &spec.load_balancer_source_ranges {
        Some(list) if !list.is_empty() => ("spec.loadBalancerSourceRanges", list.clone()),
        _ => (ANNOTATION_SOURCE_RANGES, annotation_ranges),
    };
    let mut load_balancer_source_ranges = Vec::new();
    for (i, text) in range_texts.iter().enumerate() {
        match parse_cidr(text) {
            Some(cidr) if cidr.family() == family => load_balancer_source_ranges.push(cidr),
            Some(_) => {}
            None => {
                let field = if range_field == ANNOTATION_SOURCE_RANGES {
                    format!("metadata.annotations[{ANNOTATION_SOURCE_RANGES}]")
                } else {
                    format!("{range_field}[{i}]")
                };
                issues
                    .push(object.issue(field, format!("{text:?} is not a CIDR; Service skipped")));
                return;
            }
        }
    }

    let internal_policy = match spec.internal_traffic_policy.as_deref() {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let externally_accessible_type = matches!(service_type, "NodePort" | "LoadBalancer")
        || (service_type == "ClusterIP"
            && spec.external_ips.as_ref().is_some_and(|e| !e.is_empty()));
    let external_policy = match spec.external_traffic_policy.as_deref() {
        Some("Local") if externally_accessible_type => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let health_check_node_port =
        if service_type == "LoadBalancer" && external_policy == TrafficPolicy::Local {
            spec.health_check_node_port
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
        } else {
            None
        };
    let affinity_timeout_seconds =
        (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
        });

    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let Some(protocol) = Protocol::from_api(port.protocol.as_deref()) else {
            issues.push(object.issue(
                format!("spec.ports[{i}].protocol"),
                format!(
                    "{:?} is not TCP, UDP or SCTP; port skipped",
                    port.protocol.as_deref().unwrap_or("")
                ),
            ));
            continue;
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
            issues.push(object.issue(
                format!("spec.ports[{i}].port"),
                format!("{} is not a port number; port skipped", port.port),
            ));
            continue;
        };
        let node_port = if matches!(service_type, "NodePort" | "LoadBalancer") {
            match port.node_port {
                None | Some(0) => None,
                Some(p) => match u16::try_from(p) {
                    Ok(p) => Some(p),
                    Err(_) => {
                        issues.push(object.issue(
                            format!("spec.ports[{i}].nodePort"),
                            format!("{p} is not a port number; port skipped"),
                        ));
                        continue;
                    }
                },
            }
        } else {
            None
        };
        let port_name = port.name.clone().unwrap_or_default();
        let mut service_port = ServicePort {
            name: ServicePortName {
                namespace: namespace.clone(),
                name: name.clone(),
                port: port_name.clone(),
            },
            protocol,
            cluster_ip,
            port: number,
            node_port,
            health_check_node_port,
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            internal_policy,
            external_policy,
            affinity_timeout_seconds,
            cluster_endpoints: Vec::new(),
            local_endpoints: Vec::new(),
            has_endpoints: false,
            local_ready_endpoints: 0,
        };
        let key = (namespace.clone(), name.clone(), port_name, protocol);
        let candidates = endpoints.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        categorize(&mut service_port, candidates, node);
        out.push(service_port);
    }
}

/// Fills the cluster and local endpoint lists (kube-proxy's `CategorizeEndpoints`).
fn categorize(port: &mut ServicePort, candidates: &[CandidateEndpoint], node: &NodeInfo) {
    let serving_terminating = |c: &&CandidateEndpoint| c.serving && c.terminating;
    let is_local = |c: &&CandidateEndpoint| c.endpoint.locality == Locality::Local;
    port.local_ready_endpoints = candidates
        .iter()
        .filter(|c| c.ready)
        .filter(is_local)
        .count();

    if port.uses_cluster_endpoints() {
        let topology = topology_mode(candidates, node);
        let mut cluster: Vec<Endpoint> = candidates
            .iter()
            .filter(|c| c.ready && topology.admits(c, node))
            .map(|c| c.endpoint.clone())
            .collect();
        // Terminating-but-serving endpoints are a last resort to avoid dropping
        // connections; topology is not applied to them.
        if cluster.is_empty() {
            cluster = candidates
                .iter()
                .filter(serving_terminating)
                .map(|c| c.endpoint.clone())
                .collect();
        }
        port.has_endpoints = !cluster.is_empty();
        port.cluster_endpoints = cluster;
    }

    if port.uses_local_endpoints() {
        if candidates
            .iter()
            .any(|c| c.ready || (c.serving && c.terminating))
        {
            port.has_endpoints = true;
        }
        let local_ready: Vec<Endpoint> = candidates
            .iter()
            .filter(is_local)
            .filter(|c| c.ready)
            .map(|c| c.endpoint.clone())
            .collect();
        port.local_endpoints = if local_ready.is_empty() {
            candidates
                .iter()
                .filter(is_local)
                .filter(serving_terminating)
                .map(|c| c.endpoint.clone())
                .collect()
        } else {
            local_ready
        };
    }
}

/// Which topology hints, if any, restrict the cluster endpoints.
enum TopologyMode {
    None,
    SameNode,
    SameZone(String),
}

impl TopologyMode {
    fn admits(&self, candidate: &CandidateEndpoint, node: &NodeInfo) -> bool {
        match self {
            TopologyMode::None => true,
            TopologyMode::SameNode => candidate.node_hints.contains(&node.name),
            TopologyMode::SameZone(zone) => candidate.zone_hints.iter().any(|z| z == zone),
        }
    }
}

/// Hints are honoured only if every ready endpoint carries them and at least one
/// is meant for this node (or zone); otherwise traffic would have nowhere to go.
/// Node hints (`PreferSameNode`) win over zone hints (`PreferSameZone`).
fn topology_mode(candidates: &[CandidateEndpoint], node: &NodeInfo) -> TopologyMode {
    let ready: Vec<&CandidateEndpoint> = candidates.iter().filter(|c| c.ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    let all_node_hints = ready.iter().all(|c| !c.node_hints.is_empty());
    if all_node_hints && ready.iter().any(|c| c.node_hints.contains(&node.name)) {
        return TopologyMode::SameNode;
    }
    let all_zone_hints = ready.iter().all(|c| !c.zone_hints.is_empty());
    if all_zone_hints
        && let Some(zone) = &node.zone
        && ready.iter().any(|c| c.zone_hints.iter().any(|z| z == zone))
    {
        return TopologyMode::SameZone(zone.clone());
    }
    TopologyMode::None
}

pub mod cache;

#[cfg(test)]
pub(crate) mod fixtures;

#[cfg(test)]
mod tests;

//! Packet-test fixture: one node namespace with local pods, "remote" pods on a
//! second node, and an external client, loaded with a payload rendered by
//! `causeway-agent render`; probes that send real TCP/UDP traffic and report
//! which pod answered, which source address it saw, or refused versus timeout.
//!
//! Topology (every piece is a network namespace named `cwdp<pid>n<k>-…`, so that
//! tests run side by side and a crashed run can be swept; every link is created
//! directly inside these namespaces, never in the host's):
//!
//! ```text
//!             lan (bridge lan0, 100.64.0.0/24, 2001:db8:64::/64)
//!        ┌──────────────┬───────────────────┬─────────────────┐
//!   node-a .10 (+.12)   node-b .11          client .100 (+.200)
//!   iptables under test no rules            default route → node-a
//!   pods 100.96.0.0/24  pods 100.96.1.0/24
//!   (cbr0 bridge or     (point-to-point veths)
//!    ptp veths "veth*")
//! ```
//!
//! Nothing here ever runs iptables, or adds addresses or routes, in the host's
//! own namespace, and all addresses are CGNAT (100.64.0.0/10) or documentation
//! ranges. Dropping the fixture (also while a test panics) kills its servers and
//! deletes its namespaces, which deletes every link in them.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use causeway_agent::trace;
use serde_json::{Value, json};

use crate::netns::{
    add_netns, del_netns, exec_in, exec_in_raw, ip, list_netns, spawn_in, sysctl_in,
};

/// The node whose netfilter is under test.
pub const NODE_NAME: &str = "node-a";
/// The other node, hosting "remote" endpoints; it has no rules.
pub const REMOTE_NODE_NAME: &str = "node-b";
/// The zones of node-a and node-b (`topology.kubernetes.io/zone`).
pub const NODE_ZONE: &str = "zone-a";
pub const REMOTE_NODE_ZONE: &str = "zone-b";
/// node-a's InternalIP on the node network.
pub const NODE_IP: &str = "100.64.0.10";
/// A second address of node-a on the node network (not its InternalIP): NodePorts
/// answer on it unless `--nodeport-addresses` says otherwise.
pub const NODE_IP_SECONDARY: &str = "100.64.0.12";
/// node-b's address.
pub const REMOTE_NODE_IP: &str = "100.64.0.11";
/// The external client's main address.
pub const CLIENT_IP: &str = "100.64.0.100";
/// A second address of the external client, used as "outside the source range".
pub const CLIENT_IP_OTHER: &str = "100.64.0.200";
/// node-a's address towards its pods (cbr0, or every ptp veth): a masqueraded
/// packet from node-a to a local pod carries this source.
pub const POD_GATEWAY: &str = "100.96.0.1";
/// node-b's address towards its pods.
pub const REMOTE_POD_GATEWAY: &str = "100.96.1.1";
/// node-a's pod CIDR (`spec.podCIDR` of its Node object).
pub const NODE_POD_CIDR: &str = "100.96.0.0/24";
/// node-b's pod CIDR.
pub const REMOTE_POD_CIDR: &str = "100.96.1.0/24";
/// The cluster CIDR passed as `--cluster-cidr`.
pub const CLUSTER_CIDR: &str = "100.96.0.0/16";

/// IPv6 counterparts of the addresses above (documentation prefix 2001:db8::/32).
pub mod v6 {
    pub const NODE_IP: &str = "2001:db8:64::10";
    pub const REMOTE_NODE_IP: &str = "2001:db8:64::11";
    pub const CLIENT_IP: &str = "2001:db8:64::100";
    pub const CLIENT_IP_OTHER: &str = "2001:db8:64::200";
    pub const POD_GATEWAY: &str = "2001:db8:96::1";
    pub const REMOTE_POD_GATEWAY: &str = "2001:db8:96:1::1";
    pub const NODE_POD_CIDR: &str = "2001:db8:96::/64";
    pub const REMOTE_POD_CIDR: &str = "2001:db8:96:1::/64";
    pub const CLUSTER_CIDR: &str = "2001:db8:96::/48";
}

/// The bridge that joins node-a's pods in [`PodNetwork::Bridge`] mode.
pub const POD_BRIDGE: &str = "cbr0";
/// The name prefix of node-a's pod-side interfaces in both modes.
pub const POD_INTERFACE_PREFIX: &str = "veth";

/// How node-a's pods are wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// All pod veths on one bridge `cbr0` holding the gateway address (kubenet,
    /// kindnet-style); hairpin mode on for every port, as kubelet sets it.
    Bridge,
    /// One routed veth per pod, named `veth<k>` in node-a, each holding the
    /// gateway address as a /32 (Calico-style point-to-point).
    PointToPoint,
}

/// Which node a pod runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Local,
    Remote,
}

/// Address family of a render and load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// iptables backend used to load the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-restore` (nf_tables, the default here).
    Nft,
    /// `iptables-legacy-restore`.
    Legacy,
}

impl Backend {
    /// The restore program for this backend and family.
    pub fn restore_program(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::V4) => "iptables-restore",
            (Backend::Nft, Family::V6) => "ip6tables-restore",
            (Backend::Legacy, Family::V4) => "iptables-legacy-restore",
            (Backend::Legacy, Family::V6) => "ip6tables-legacy-restore",
        }
    }
}

/// Flags passed to `causeway-agent render` besides manifests and node identity.
#[derive(Clone, Debug)]
pub struct AgentFlags {
    pub family: Family,
    pub backend: Backend,
    /// `--cluster-cidr`; defaults to [`CLUSTER_CIDR`] (or its IPv6 twin).
    pub cluster_cidr: Option<String>,
    /// `--detect-local-mode`; `None` leaves the agent's default (ClusterCIDR).
    pub detect_local_mode: Option<String>,
    pub masquerade_all: bool,
    /// `--nodeport-addresses` values (CIDRs or `primary`); empty = not given.
    pub nodeport_addresses: Vec<String>,
    /// `--localhost-nodeports=…`; `None` = not given (default on).
    pub localhost_nodeports: Option<bool>,
    /// Anything else, appended verbatim.
    pub extra: Vec<String>,
}

impl Default for AgentFlags {
    fn default() -> Self {
        AgentFlags {
            family: Family::V4,
            backend: Backend::Nft,
            cluster_cidr: Some(CLUSTER_CIDR.to_string()),
            detect_local_mode: None,
            masquerade_all: false,
            nodeport_addresses: Vec::new(),
            localhost_nodeports: None,
            extra: Vec::new(),
        }
    }
}

impl AgentFlags {
    /// IPv6 defaults: `--ip-family 6`, the IPv6 cluster CIDR, ip6tables.
    pub fn ipv6() -> Self {
        AgentFlags {
            family: Family::V6,
            cluster_cidr: Some(v6::CLUSTER_CIDR.to_string()),
            ..AgentFlags::default()
        }
    }

    pub fn detect_local_mode(mut self, mode: &str) -> Self {
        self.detect_local_mode = Some(mode.to_string());
        self
    }

    pub fn masquerade_all(mut self) -> Self {
        self.masquerade_all = true;
        self
    }

    pub fn nodeport_addresses(mut self, values: &[&str]) -> Self {
        self.nodeport_addresses = values.iter().map(|v| v.to_string()).collect();
        self
    }

    pub fn localhost_nodeports(mut self, on: bool) -> Self {
        self.localhost_nodeports = Some(on);
        self
    }

    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    pub fn no_cluster_cidr(mut self) -> Self {
        self.cluster_cidr = None;
        self
    }

    fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(cidr) = &self.cluster_cidr {
            args.extend(["--cluster-cidr".to_string(), cidr.clone()]);
        }
        if let Some(mode) = &self.detect_local_mode {
            args.extend(["--detect-local-mode".to_string(), mode.clone()]);
            // Only the modes that need them get these flags, so a renderer that
            // does not know them yet fails only the tests that are about them.
            match mode.as_str() {
                "BridgeInterface" => {
                    args.extend(["--pod-bridge-interface".into(), POD_BRIDGE.into()])
                }
                "InterfaceNamePrefix" => args.extend([
                    "--pod-interface-name-prefix".into(),
                    POD_INTERFACE_PREFIX.into(),
                ]),
                _ => {}
            }
        }
        if self.masquerade_all {
            args.push("--masquerade-all".into());
        }
        for value in &self.nodeport_addresses {
            args.extend(["--nodeport-addresses".to_string(), value.clone()]);
        }
        if let Some(on) = self.localhost_nodeports {
            args.push(format!("--localhost-nodeports={on}"));
        }
        if self.family == Family::V6 {
            args.extend(["--ip-family".into(), "6".into()]);
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

// ---------------------------------------------------------------------------
// Manifests: builder-style fixtures that serialize to JSON, which is YAML.
// ---------------------------------------------------------------------------

/// A Service port's `targetPort`.
#[derive(Clone, Debug)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: Option<String>,
    pub protocol: String,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

impl ServicePort {
    /// An unnamed port of `protocol` (`TCP`, `UDP`, `SCTP`).
    pub fn new(protocol: &str, port: u16, target_port: u16) -> Self {
        ServicePort {
            name: None,
            protocol: protocol.to_string(),
            port,
            target_port: TargetPort::Number(target_port),
            node_port: None,
        }
    }
    pub fn tcp(port: u16, target_port: u16) -> Self {
        Self::new("TCP", port, target_port)
    }
    pub fn udp(port: u16, target_port: u16) -> Self {
        Self::new("UDP", port, target_port)
    }
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }
    pub fn target_name(mut self, name: &str) -> Self {
        self.target_port = TargetPort::Name(name.to_string());
        self
    }
    pub fn node_port(mut self, port: u16) -> Self {
        self.node_port = Some(port);
        self
    }

    fn to_json(&self) -> Value {
        let mut v = json!({ "protocol": self.protocol, "port": self.port });
        if let Some(name) = &self.name {
            v["name"] = json!(name);
        }
        v["targetPort"] = match &self.target_port {
            TargetPort::Number(n) => json!(n),
            TargetPort::Name(n) => json!(n),
        };
        if let Some(np) = self.node_port {
            v["nodePort"] = json!(np);
        }
        v
    }
}

/// A Service, as the apiserver would hold it after defaulting (cluster IP
/// allocated, `ipFamilies` set).
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub type_: String,
    pub cluster_ip: String,
    pub family: Family,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<String>,
    /// `status.loadBalancer.ingress` IPs with their optional `ipMode`.
    pub ingress: Vec<(String, Option<String>)>,
    pub source_ranges: Vec<String>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub health_check_node_port: Option<u16>,
    /// `Some(None)` = ClientIP with the default timeout.
    pub session_affinity: Option<Option<u32>>,
    pub labels: BTreeMap<String, String>,
}

impl Service {
    /// A ClusterIP Service in namespace `default`.
    pub fn cluster_ip(name: &str, ip: &str) -> Self {
        let family = if ip.contains(':') {
            Family::V6
        } else {
            Family::V4
        };
        Service {
            namespace: "default".into(),
            name: name.into(),
            type_: "ClusterIP".into(),
            cluster_ip: ip.into(),
            family,
            ports: Vec::new(),
            external_ips: Vec::new(),
            ingress: Vec::new(),
            source_ranges: Vec::new(),
            external_traffic_policy: None,
            internal_traffic_policy: None,
            health_check_node_port: None,
            session_affinity: None,
            labels: BTreeMap::new(),
        }
    }
    pub fn node_port(name: &str, ip: &str) -> Self {
        Service {
            type_: "NodePort".into(),
            ..Self::cluster_ip(name, ip)
        }
    }
    pub fn load_balancer(name: &str, ip: &str) -> Self {
        Service {
            type_: "LoadBalancer".into(),
            ..Self::cluster_ip(name, ip)
        }
    }
    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }
    pub fn port(mut self, port: ServicePort) -> Self {
        self.ports.push(port);
        self
    }
    pub fn external_ip(mut self, ip: &str) -> Self {
        self.external_ips.push(ip.into());
        self
    }
    pub fn ingress_ip(mut self, ip: &str) -> Self {
        self.ingress.push((ip.into(), None));
        self
    }
    /// An ingress IP with `ipMode` (`VIP` or `Proxy`).
    pub fn ingress_ip_mode(mut self, ip: &str, mode: &str) -> Self {
        self.ingress.push((ip.into(), Some(mode.into())));
        self
    }
    pub fn source_range(mut self, cidr: &str) -> Self {
        self.source_ranges.push(cidr.into());
        self
    }
    /// `externalTrafficPolicy: Local`, with a `healthCheckNodePort` as the
    /// apiserver would allocate it.
    pub fn etp_local(mut self) -> Self {
        self.external_traffic_policy = Some("Local".into());
        self.health_check_node_port = Some(32000);
        self
    }
    pub fn itp_local(mut self) -> Self {
        self.internal_traffic_policy = Some("Local".into());
        self
    }
    pub fn client_ip_affinity(mut self, timeout_seconds: Option<u32>) -> Self {
        self.session_affinity = Some(timeout_seconds);
        self
    }
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// `"<ns>/<name>"`, as the agent's rule comments name the Service.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn to_json(&self) -> Value {
        let family = match self.family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        let mut spec = json!({
            "type": self.type_,
            "clusterIP": self.cluster_ip,
            "clusterIPs": [self.cluster_ip],
            "ipFamilies": [family],
            "ipFamilyPolicy": "SingleStack",
            "ports": self.ports.iter().map(ServicePort::to_json).collect::<Vec<_>>(),
            "sessionAffinity": "None",
            "internalTrafficPolicy": self.internal_traffic_policy.clone().unwrap_or_else(|| "Cluster".into()),
        });
        if self.type_ != "ClusterIP" {
            spec["externalTrafficPolicy"] = json!(
                self.external_traffic_policy
                    .clone()
                    .unwrap_or_else(|| "Cluster".into())
            );
        }
        if let Some(port) = self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(port);
        }
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(self.external_ips);
        }
        if !self.source_ranges.is_empty() {
            spec["loadBalancerSourceRanges"] = json!(self.source_ranges);
        }
        if let Some(timeout) = self.session_affinity {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] =
                json!({ "clientIP": { "timeoutSeconds": timeout.unwrap_or(10800) } });
        }
        let mut obj = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": self.name, "namespace": self.namespace },
            "spec": spec,
        });
        if !self.labels.is_empty() {
            obj["metadata"]["labels"] = json!(self.labels);
        }
        if !self.ingress.is_empty() {
            let ingress: Vec<Value> = self
                .ingress
                .iter()
                .map(|(ip, mode)| match mode {
                    Some(mode) => json!({ "ip": ip, "ipMode": mode }),
                    None => json!({ "ip": ip }),
                })
                .collect();
            obj["status"] = json!({ "loadBalancer": { "ingress": ingress } });
        }
        obj
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: String,
    pub node_name: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Topology hints: `hints.forZones` and `hints.forNodes`.
    pub for_zones: Vec<String>,
    pub for_nodes: Vec<String>,
}

impl Endpoint {
    /// A `hints.forZones` entry, as the EndpointSlice controller writes for
    /// `trafficDistribution: PreferSameZone`.
    pub fn for_zone(mut self, zone: &str) -> Self {
        self.for_zones.push(zone.to_string());
        self
    }
    /// A `hints.forNodes` entry (`trafficDistribution: PreferSameNode`).
    pub fn for_node(mut self, node: &str) -> Self {
        self.for_nodes.push(node.to_string());
        self
    }
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self.serving = false;
        self
    }
    /// Terminating; `serving` says whether it still passes its readiness probe.
    pub fn terminating(mut self, serving: bool) -> Self {
        self.ready = false;
        self.serving = serving;
        self.terminating = true;
        self
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "addresses": [self.ip],
            "conditions": { "ready": self.ready, "serving": self.serving, "terminating": self.terminating },
        });
        if let Some(node) = &self.node_name {
            v["nodeName"] = json!(node);
        }
        let names = |names: &[String]| -> Vec<Value> {
            names.iter().map(|n| json!({ "name": n })).collect()
        };
        if !self.for_zones.is_empty() {
            v["hints"]["forZones"] = json!(names(&self.for_zones));
        }
        if !self.for_nodes.is_empty() {
            v["hints"]["forNodes"] = json!(names(&self.for_nodes));
        }
        v
    }
}

/// An EndpointSlice for one Service.
#[derive(Clone, Debug)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub family: Family,
    /// `(name, port, protocol)`.
    pub ports: Vec<(Option<String>, u16, String)>,
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSlice {
    /// A slice of `service` (namespace `default`), named `<service>-<suffix>`.
    pub fn new(service: &str, suffix: &str) -> Self {
        EndpointSlice {
            namespace: "default".into(),
            name: format!("{service}-{suffix}"),
            service: service.into(),
            family: Family::V4,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }
    }
    /// A slice for `svc`, in its namespace and family.
    pub fn for_service(svc: &Service, suffix: &str) -> Self {
        EndpointSlice {
            namespace: svc.namespace.clone(),
            family: svc.family,
            ..Self::new(&svc.name, suffix)
        }
    }
    /// A port: `name` must equal the Service port's name (`None` if unnamed).
    pub fn port(mut self, name: Option<&str>, port: u16, protocol: &str) -> Self {
        self.ports
            .push((name.map(str::to_string), port, protocol.into()));
        self
    }
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.push(endpoint);
        self
    }

    pub fn to_json(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|(name, port, protocol)| {
                let mut v = json!({ "port": port, "protocol": protocol });
                if let Some(name) = name {
                    v["name"] = json!(name);
                }
                v
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {
                    "kubernetes.io/service-name": self.service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": match self.family { Family::V4 => "IPv4", Family::V6 => "IPv6" },
            "endpoints": self.endpoints.iter().map(Endpoint::to_json).collect::<Vec<_>>(),
            "ports": ports,
        })
    }
}

/// The manifests given to one render: objects and literal YAML documents.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    docs: Vec<String>,
}

impl Manifests {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn service(mut self, svc: &Service) -> Self {
        self.docs.push(svc.to_json().to_string());
        self
    }
    pub fn slice(mut self, slice: &EndpointSlice) -> Self {
        self.docs.push(slice.to_json().to_string());
        self
    }
    /// Literal YAML (one or more documents separated by `---`).
    pub fn yaml(mut self, text: &str) -> Self {
        self.docs.push(text.trim().to_string());
        self
    }
    /// One multi-document YAML file.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for doc in &self.docs {
            out.push_str("---\n");
            out.push_str(doc);
            out.push('\n');
        }
        out
    }
}

/// The Node objects of both nodes, with pod CIDRs and InternalIPs, as kubelet
/// and the node-ipam controller would have set them.
fn node_objects() -> String {
    let node = |name: &str, zone: &str, ip4: &str, ip6: &str, cidr4: &str, cidr6: &str| {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "labels": {
                "kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone } },
            "spec": { "podCIDR": cidr4, "podCIDRs": [cidr4, cidr6] },
            "status": { "addresses": [
                { "type": "InternalIP", "address": ip4 },
                { "type": "InternalIP", "address": ip6 },
                { "type": "Hostname", "address": name },
            ] },
        })
        .to_string()
    };
    format!(
        "---\n{}\n---\n{}\n",
        node(
            NODE_NAME,
            NODE_ZONE,
            NODE_IP,
            v6::NODE_IP,
            NODE_POD_CIDR,
            v6::NODE_POD_CIDR
        ),
        node(
            REMOTE_NODE_NAME,
            REMOTE_NODE_ZONE,
            REMOTE_NODE_IP,
            v6::REMOTE_NODE_IP,
            REMOTE_POD_CIDR,
            v6::REMOTE_POD_CIDR
        )
    )
}

// ---------------------------------------------------------------------------
// Probes and their results.
// ---------------------------------------------------------------------------

/// Transport protocol of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Where a probe is sent from.
#[derive(Clone, Debug)]
pub enum Origin {
    /// From inside a pod's namespace.
    Pod(EchoPod),
    /// From node-a itself (any source address the kernel picks; send to
    /// 127.0.0.1 for localhost NodePorts).
    Node,
    /// From the external client, bound to this source address.
    Client(String),
}

impl Origin {
    /// The external client at [`CLIENT_IP`].
    pub fn client() -> Self {
        Origin::Client(CLIENT_IP.into())
    }
    /// The external client at [`v6::CLIENT_IP`].
    pub fn client6() -> Self {
        Origin::Client(v6::CLIENT_IP.into())
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Pod(pod) => write!(f, "pod {} ({}, on {})", pod.name, pod.ip, pod.node_name),
            Origin::Node => write!(f, "{NODE_NAME} itself"),
            Origin::Client(ip) => write!(f, "external client {ip}"),
        }
    }
}

/// What a probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A pod answered; `source` is the client address it saw.
    Answered { pod: String, source: IpAddr },
    /// RST or ICMP unreachable: an active rejection.
    Refused,
    /// No answer within the probe timeout: a drop.
    Timeout,
    /// Anything else (no route, unexpected text).
    Error(String),
}

impl Outcome {
    pub fn pod(&self) -> Option<&str> {
        match self {
            Outcome::Answered { pod, .. } => Some(pod),
            _ => None,
        }
    }
    pub fn source(&self) -> Option<IpAddr> {
        match self {
            Outcome::Answered { source, .. } => Some(*source),
            _ => None,
        }
    }
    /// A line of `causeway-echo probe`.
    pub fn parse(line: &str) -> Outcome {
        let line = line.trim();
        if line == "refused" {
            return Outcome::Refused;
        }
        if line == "timeout" {
            return Outcome::Timeout;
        }
        if let Some(rest) = line.strip_prefix("ok ") {
            let mut words = rest.split_whitespace();
            if let (Some(pod), Some(addr)) = (words.next(), words.next())
                && let Ok(sa) = addr.parse::<std::net::SocketAddr>()
            {
                return Outcome::Answered {
                    pod: pod.into(),
                    source: sa.ip(),
                };
            }
        }
        Outcome::Error(line.to_string())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Answered { pod, source } => {
                write!(f, "answered by {pod} (saw source {source})")
            }
            Outcome::Refused => f.write_str("refused"),
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// Many probes counted by outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Answers per pod name.
    pub by_pod: BTreeMap<String, usize>,
    pub refused: usize,
    pub timeout: usize,
    /// Other lines and their counts.
    pub errors: BTreeMap<String, usize>,
}

impl Tally {
    pub fn total(&self) -> usize {
        self.by_pod.values().sum::<usize>()
            + self.refused
            + self.timeout
            + self.errors.values().sum::<usize>()
    }
    pub fn answered(&self) -> usize {
        self.by_pod.values().sum()
    }
    pub fn count(&self, pod: &str) -> usize {
        self.by_pod.get(pod).copied().unwrap_or(0)
    }
    fn parse(text: &str) -> Tally {
        let mut t = Tally::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (n, rest) = line.trim().split_once(' ').unwrap_or(("0", line));
            let n: usize = n.parse().unwrap_or(0);
            if let Some(pod) = rest.strip_prefix("ok ") {
                *t.by_pod.entry(pod.trim().to_string()).or_default() += n;
            } else if rest == "refused" {
                t.refused += n;
            } else if rest == "timeout" {
                t.timeout += n;
            } else {
                *t.errors.entry(rest.to_string()).or_default() += n;
            }
        }
        t
    }
}

// ---------------------------------------------------------------------------
// The fixture.
// ---------------------------------------------------------------------------

/// A pod: a namespace running `causeway-echo serve --name <name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EchoPod {
    pub name: String,
    pub netns: String,
    pub ip: String,
    pub ip6: String,
    pub node_name: String,
    pub ports: Vec<u16>,
    /// The pod's veth in its node's namespace (`veth<k>`); on node-a, bridged
    /// pods' packets arrive on [`POD_BRIDGE`] instead.
    pub host_interface: String,
}

impl EchoPod {
    /// A ready endpoint for this pod's IPv4 address.
    pub fn ready(&self) -> Endpoint {
        Endpoint {
            ip: self.ip.clone(),
            node_name: Some(self.node_name.clone()),
            ready: true,
            serving: true,
            terminating: false,
            for_zones: Vec::new(),
            for_nodes: Vec::new(),
        }
    }
    /// Probes sent from inside this pod.
    pub fn origin(&self) -> Origin {
        Origin::Pod(self.clone())
    }
    /// `ip:port` of this pod.
    pub fn at(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }
    /// A ready endpoint for this pod's IPv6 address.
    pub fn ready6(&self) -> Endpoint {
        Endpoint {
            ip: self.ip6.clone(),
            ..self.ready()
        }
    }
}

static NEXT_FIXTURE: AtomicUsize = AtomicUsize::new(0);

/// One node under test with its neighbours; see the module documentation.
pub struct DataPath {
    base: String,
    echo: PathBuf,
    pod_network: PodNetwork,
    dir: tempfile::TempDir,
    /// Namespaces in creation order; deleted in reverse.
    namespaces: Vec<String>,
    servers: Vec<Child>,
    pods: Vec<EchoPod>,
    local_pods: usize,
    remote_pods: usize,
    payload: Option<String>,
    /// The address family `payload` was loaded with.
    payload_family: Family,
    focus: Vec<String>,
    probe_timeout: Duration,
}

impl DataPath {
    /// Builds the topology. `echo` is the `causeway-echo` binary (integration tests
    /// pass `env!("CARGO_BIN_EXE_causeway-echo")`); the agent is found with
    /// [`crate::paths::workspace_bin`] unless `CAUSEWAY_AGENT` names it.
    pub fn new(echo: impl AsRef<Path>, pod_network: PodNetwork) -> Result<DataPath> {
        check_prerequisites()?;
        sweep_stale();
        let base = format!(
            "cwdp{}n{}",
            std::process::id(),
            NEXT_FIXTURE.fetch_add(1, Ordering::SeqCst)
        );
        let mut dp = DataPath {
            base,
            echo: echo.as_ref().to_path_buf(),
            pod_network,
            dir: tempfile::Builder::new()
                .prefix("causeway-datapath")
                .tempdir()?,
            namespaces: Vec::new(),
            servers: Vec::new(),
            pods: Vec::new(),
            local_pods: 0,
            remote_pods: 0,
            payload: None,
            payload_family: Family::V4,
            focus: Vec::new(),
            probe_timeout: Duration::from_millis(1500),
        };
        dp.build_nodes().context("building the node namespaces")?;
        Ok(dp)
    }

    /// The namespace of node-a (the node under test).
    pub fn node_ns(&self) -> String {
        format!("{}-node", self.base)
    }
    fn lan_ns(&self) -> String {
        format!("{}-lan", self.base)
    }
    fn remote_ns(&self) -> String {
        format!("{}-remote", self.base)
    }
    /// The namespace of the external client.
    pub fn client_ns(&self) -> String {
        format!("{}-client", self.base)
    }

    /// How long a probe waits before it reports a timeout.
    pub fn set_probe_timeout(&mut self, timeout: Duration) {
        self.probe_timeout = timeout;
    }

    fn new_ns(&mut self, name: &str) -> Result<()> {
        // add_netns turns duplicate address detection off, so addresses are
        // usable at once.
        add_netns(name)?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    fn build_nodes(&mut self) -> Result<()> {
        let (lan, node, remote, client) = (
            self.lan_ns(),
            self.node_ns(),
            self.remote_ns(),
            self.client_ns(),
        );
        for ns in [&lan, &node, &remote, &client] {
            self.new_ns(ns)?;
        }
        ipn(&lan, &["link", "add", "lan0", "type", "bridge"])?;
        ipn(&lan, &["link", "set", "lan0", "up"])?;
        // Frames crossing the node network are not the business of any netfilter.
        sysctl_in(&lan, "net.bridge.bridge-nf-call-iptables", "0")?;
        sysctl_in(&lan, "net.bridge.bridge-nf-call-ip6tables", "0")?;
        for (port, ns) in [
            ("to-node", &node),
            ("to-remote", &remote),
            ("to-client", &client),
        ] {
            ipn(
                &lan,
                &[
                    "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            ipn(&lan, &["link", "set", port, "master", "lan0", "up"])?;
            ipn(ns, &["link", "set", "eth0", "up"])?;
        }

        // node-a: the node under test.
        for (addr, six) in [
            (format!("{NODE_IP}/24"), false),
            (format!("{NODE_IP_SECONDARY}/24"), false),
            (format!("{}/64", v6::NODE_IP), true),
        ] {
            add_addr(&node, &addr, "eth0", six)?;
        }
        // No real router: unmatched traffic is simply lost, but the node must have
        // a route for Service IPs so that OUTPUT (where DNAT happens) is reached.
        ipn(&node, &["route", "add", "default", "via", "100.64.0.1"])?;
        ipn(
            &node,
            &["-6", "route", "add", "default", "via", "2001:db8:64::1"],
        )?;
        ipn(
            &node,
            &["route", "add", REMOTE_POD_CIDR, "via", REMOTE_NODE_IP],
        )?;
        ipn(
            &node,
            &[
                "-6",
                "route",
                "add",
                v6::REMOTE_POD_CIDR,
                "via",
                v6::REMOTE_NODE_IP,
            ],
        )?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            // kube-proxy sets this itself for localhost NodePorts; the agent's
            // renderer cannot (it only prints rules), so the node does.
            ("net.ipv4.conf.all.route_localnet", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            // The external client sits on node-a's own LAN with node-a as its
            // gateway, and node-a's default route points back into that LAN (at
            // a router that does not exist). A packet node-a forwards out of the
            // interface it came in by (a Service IP with no endpoints, REJECTed in
            // FORWARD) therefore draws an ICMP redirect to the client first, and
            // the redirect spends the client's ICMP rate-limit token (shared
            // inet_peer, net.ipv4.icmp_ratelimit = 1 s): the REJECT's
            // port-unreachable is suppressed and the client sees a timeout. A
            // real client reaches the node through a router or load balancer on
            // another subnet, where the kernel sends no redirect and the REJECT
            // arrives at once; stop redirects so the fixture behaves like that.
            // (IPv4 only: IPv6 has no such switch, and no IPv6 test forwards out
            // of the ingress interface.)
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
            ("net.ipv4.conf.eth0.send_redirects", "0"),
            // Bridged pod-to-pod frames must pass iptables (kube-proxy needs br_netfilter).
            ("net.bridge.bridge-nf-call-iptables", "1"),
            ("net.bridge.bridge-nf-call-ip6tables", "1"),
        ] {
            sysctl_in(&node, key, value)?;
        }
        if self.pod_network == PodNetwork::Bridge {
            ipn(&node, &["link", "add", POD_BRIDGE, "type", "bridge"])?;
            add_addr(&node, &format!("{POD_GATEWAY}/24"), POD_BRIDGE, false)?;
            add_addr(&node, &format!("{}/64", v6::POD_GATEWAY), POD_BRIDGE, true)?;
            ipn(&node, &["link", "set", POD_BRIDGE, "up"])?;
        }

        // node-b: routes only.
        add_addr(&remote, &format!("{REMOTE_NODE_IP}/24"), "eth0", false)?;
        add_addr(&remote, &format!("{}/64", v6::REMOTE_NODE_IP), "eth0", true)?;
        ipn(&remote, &["route", "add", NODE_POD_CIDR, "via", NODE_IP])?;
        ipn(
            &remote,
            &["-6", "route", "add", v6::NODE_POD_CIDR, "via", v6::NODE_IP],
        )?;
        // Pods on node-b that reach Services through node-a (node-b has no rules
        // of its own), so that "pod traffic from another node" can be tested.
        ipn(&remote, &["route", "add", "100.127.0.0/16", "via", NODE_IP])?;
        sysctl_in(&remote, "net.ipv4.ip_forward", "1")?;
        sysctl_in(&remote, "net.ipv6.conf.all.forwarding", "1")?;
        sysctl_in(&remote, "net.ipv4.conf.all.rp_filter", "0")?;

        // The external client: everything beyond the LAN goes through node-a, as
        // if node-a were the load balancer's target.
        for (addr, six) in [
            (format!("{CLIENT_IP}/24"), false),
            (format!("{CLIENT_IP_OTHER}/24"), false),
            (format!("{}/64", v6::CLIENT_IP), true),
            (format!("{}/64", v6::CLIENT_IP_OTHER), true),
        ] {
            add_addr(&client, &addr, "eth0", six)?;
        }
        ipn(&client, &["route", "add", "default", "via", NODE_IP])?;
        ipn(
            &client,
            &["-6", "route", "add", "default", "via", v6::NODE_IP],
        )?;
        Ok(())
    }

    /// Starts a pod on node-a or node-b, listening on `ports` (TCP and UDP), with
    /// the next free address of that node's pod CIDR.
    pub fn add_pod(&mut self, name: &str, placement: Placement, ports: &[u16]) -> Result<EchoPod> {
        let k = match placement {
            Placement::Local => self.local_pods + 10,
            Placement::Remote => self.remote_pods + 10,
        };
        let (ip, ip6) = match placement {
            Placement::Local => (format!("100.96.0.{k}"), format!("2001:db8:96::{k}")),
            Placement::Remote => (format!("100.96.1.{k}"), format!("2001:db8:96:1::{k}")),
        };
        self.add_pod_with_ip(name, placement, ports, &ip, &ip6)
    }

    /// Starts a pod with the given addresses. An address outside the node's pod
    /// CIDR (e.g. the seed's 192.0.2.42 "external" endpoint) gets a host route on
    /// node-a too.
    pub fn add_pod_with_ip(
        &mut self,
        name: &str,
        placement: Placement,
        ports: &[u16],
        ip: &str,
        ip6: &str,
    ) -> Result<EchoPod> {
        let idx = self.pods.len();
        let netns = format!("{}-p{idx}", self.base);
        self.new_ns(&netns)?;
        let (host, gw, gw6, node_name) = match placement {
            Placement::Local => (self.node_ns(), POD_GATEWAY, v6::POD_GATEWAY, NODE_NAME),
            Placement::Remote => (
                self.remote_ns(),
                REMOTE_POD_GATEWAY,
                v6::REMOTE_POD_GATEWAY,
                REMOTE_NODE_NAME,
            ),
        };
        let host_if = format!("{POD_INTERFACE_PREFIX}{idx}");
        ipn(
            &host,
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        ipn(&netns, &["link", "set", "eth0", "up"])?;
        let bridged = placement == Placement::Local && self.pod_network == PodNetwork::Bridge;
        if bridged {
            ipn(&host, &["link", "set", &host_if, "master", POD_BRIDGE])?;
            // Hairpin: a pod's packet DNATed back to itself leaves by the port it came in.
            ipn(
                &host,
                &[
                    "link",
                    "set",
                    &host_if,
                    "type",
                    "bridge_slave",
                    "hairpin",
                    "on",
                ],
            )?;
            ipn(&host, &["link", "set", &host_if, "up"])?;
            add_addr(&netns, &format!("{ip}/24"), "eth0", false)?;
            add_addr(&netns, &format!("{ip6}/64"), "eth0", true)?;
            ipn(&netns, &["route", "add", "default", "via", gw])?;
            ipn(&netns, &["-6", "route", "add", "default", "via", gw6])?;
        } else {
            add_addr(&host, &format!("{gw}/32"), &host_if, false)?;
            add_addr(&host, &format!("{gw6}/128"), &host_if, true)?;
            ipn(&host, &["link", "set", &host_if, "up"])?;
            ipn(
                &host,
                &["route", "add", &format!("{ip}/32"), "dev", &host_if],
            )?;
            ipn(
                &host,
                &["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if],
            )?;
            add_addr(&netns, &format!("{ip}/32"), "eth0", false)?;
            add_addr(&netns, &format!("{ip6}/128"), "eth0", true)?;
            ipn(&netns, &["route", "add", gw, "dev", "eth0"])?;
            ipn(&netns, &["route", "add", "default", "via", gw])?;
            ipn(&netns, &["-6", "route", "add", gw6, "dev", "eth0"])?;
            ipn(&netns, &["-6", "route", "add", "default", "via", gw6])?;
        }
        if placement == Placement::Remote && !ip.starts_with("100.96.1.") {
            ipn(
                &self.node_ns(),
                &["route", "add", &format!("{ip}/32"), "via", REMOTE_NODE_IP],
            )?;
        }
        match placement {
            Placement::Local => self.local_pods += 1,
            Placement::Remote => self.remote_pods += 1,
        }

        let log = self.dir.path().join(format!("{name}.log"));
        let mut args = vec!["serve".to_string(), "--name".into(), name.into()];
        for p in ports {
            args.extend(["--port".to_string(), p.to_string()]);
        }
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let echo = self.echo.to_string_lossy().into_owned();
        let child = spawn_in(&netns, &echo, &arg_refs, &log)?;
        self.servers.push(child);
        wait_for_line(&log, "serving", Duration::from_secs(10))
            .with_context(|| format!("pod {name}: causeway-echo did not start"))?;
        let pod = EchoPod {
            name: name.into(),
            netns,
            ip: ip.into(),
            ip6: ip6.into(),
            node_name: node_name.into(),
            ports: ports.to_vec(),
            host_interface: host_if.clone(),
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Renders `manifests` (plus both Node objects) with `causeway-agent render`
    /// and returns the payload; an error carries the agent's stderr.
    pub fn render(&self, manifests: &Manifests, flags: &AgentFlags) -> Result<String> {
        let file = self.dir.path().join("manifests.yaml");
        std::fs::write(&file, format!("{}{}", node_objects(), manifests.to_yaml()))?;
        let node_ip = match flags.family {
            Family::V4 => NODE_IP,
            Family::V6 => v6::NODE_IP,
        };
        let mut args: Vec<String> = vec![
            "render".into(),
            "--manifests".into(),
            file.to_string_lossy().into_owned(),
            "--node-name".into(),
            NODE_NAME.into(),
            "--node-ip".into(),
            node_ip.into(),
        ];
        args.extend(flags.to_args());
        let agent = agent_binary();
        // Rendered inside node-a, as the agent runs there: whatever it learns
        // from the system (local addresses, iptables features) is node-a's.
        let out = Command::new("ip")
            .args(["netns", "exec", &self.node_ns()])
            .arg(&agent)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", agent.display()))?;
        if !out.status.success() {
            bail!(
                "`causeway-agent {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Renders and loads into node-a's netfilter with `<backend>-restore --noflush`.
    pub fn apply(&mut self, manifests: &Manifests, flags: &AgentFlags) -> Result<String> {
        let payload = self.render(manifests, flags)?;
        self.load(&payload, flags.family, flags.backend)?;
        Ok(payload)
    }

    /// Loads a payload into node-a with `--noflush`; an error quotes the line
    /// iptables-restore complained about.
    pub fn load(&mut self, payload: &str, family: Family, backend: Backend) -> Result<()> {
        restore_into(&self.node_ns(), payload, family, backend)?;
        self.payload = Some(payload.to_string());
        self.payload_family = family;
        Ok(())
    }

    /// The last loaded payload.
    pub fn payload(&self) -> &str {
        self.payload.as_deref().unwrap_or("")
    }

    /// Lines of the loaded payload mentioning `needle` (e.g. a Service's
    /// `ns/name`), for failure messages that show the rules involved.
    pub fn payload_lines(&self, needle: &str) -> String {
        let lines: Vec<&str> = self
            .payload()
            .lines()
            .filter(|l| l.contains(needle))
            .collect();
        if lines.is_empty() {
            format!("(no payload line mentions {needle:?})")
        } else {
            lines.join("\n")
        }
    }

    /// Removes every rule and chain from node-a's filter, nat and mangle tables
    /// (no `--noflush`), so that one fixture can compare two configurations.
    pub fn clear_rules(&mut self, family: Family, backend: Backend) -> Result<()> {
        let program = backend.restore_program(family);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns(), program, "--wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(b"*filter\nCOMMIT\n*nat\nCOMMIT\n*mangle\nCOMMIT\n")?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{program} could not clear node-a: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.payload = None;
        Ok(())
    }

    /// Adds `needle` (e.g. a Service's `ns/name`) to what failure messages quote
    /// from the payload.
    pub fn focus(&mut self, needle: &str) {
        self.focus.push(needle.to_string());
    }

    /// The payload lines involved in a probe to `target`: those naming its IP or
    /// any focused needle.
    pub fn explain(&self, target: &str) -> String {
        let ip = normalize_target(target)
            .ok()
            .and_then(|t| t.parse::<std::net::SocketAddr>().ok())
            .map(|sa| sa.ip().to_string());
        let lines: Vec<&str> = self
            .payload()
            .lines()
            .filter(|l| {
                ip.as_deref().is_some_and(|ip| l.contains(ip))
                    || self.focus.iter().any(|f| l.contains(f.as_str()))
            })
            .take(80)
            .collect();
        if self.payload.is_none() {
            "(no payload loaded)".into()
        } else if lines.is_empty() {
            format!("(no payload line names {target} or {:?})", self.focus)
        } else {
            lines.join("\n")
        }
    }

    /// Asserts that `pod` answers; returns the source address the pod saw.
    #[track_caller]
    pub fn expect_answer(&self, from: &Origin, proto: Proto, target: &str, pod: &str) -> IpAddr {
        let got = self.probe(from, proto, target);
        match &got {
            Outcome::Answered { pod: p, source } if p == pod => {
                self.check_trace(from, proto, target, &[Seen::One(got.clone())]);
                *source
            }
            _ => panic!(
                "{from} → {target} ({proto:?}): expected an answer from {pod}, got {got}\nrules involved:\n{}",
                self.explain(target)
            ),
        }
    }

    /// Asserts that `pod` answers and saw `source`.
    #[track_caller]
    pub fn expect_answer_from(
        &self,
        from: &Origin,
        proto: Proto,
        target: &str,
        pod: &str,
        source: &str,
    ) {
        let saw = self.expect_answer(from, proto, target, pod);
        assert_eq!(
            saw.to_string(),
            source,
            "{from} → {target} ({proto:?}): {pod} saw source {saw}, expected {source}\nrules involved:\n{}",
            self.explain(target)
        );
    }

    /// Asserts an active rejection that arrives at once (well within the probe
    /// timeout): REJECT, or nothing listening.
    ///
    /// "At once" is before TCP's first SYN retransmission (1 s), except for TCP
    /// over IPv6, where it is that retransmission: on veths the REJECT's
    /// ICMPv6 error reaches the client inside its own `connect()` call, while
    /// the socket is still locked, and `tcp_v6_err` then only records a soft
    /// error (`TcpExtLockDroppedIcmps`); the connection fails with
    /// ECONNREFUSED when the retransmitted SYN is rejected again, ~1.02 s in.
    /// Every IPv6 client of a kube-proxy node sees the same (IPv4's handler
    /// fails the connect at the first error on the same kernel). A DROP still
    /// shows as a timeout, and a refusal can only come from an ICMP error or
    /// a RST, so the assertion keeps its teeth.
    #[track_caller]
    pub fn expect_refused(&self, from: &Origin, proto: Proto, target: &str) {
        let tcp_over_ipv6 = proto == Proto::Tcp
            && normalize_target(target)
                .ok()
                .and_then(|t| t.parse::<std::net::SocketAddr>().ok())
                .is_some_and(|a| a.is_ipv6());
        let limit = if tcp_over_ipv6 {
            Duration::from_millis(1400)
        } else {
            Duration::from_millis(1000)
        };
        let (got, took) = self.probe_timed(from, proto, target);
        assert!(
            got == Outcome::Refused && took < limit,
            "{from} → {target} ({proto:?}): expected refused at once (within {limit:?}), got {got} after {took:?}\nrules involved:\n{}",
            self.explain(target)
        );
        self.check_trace(from, proto, target, &[Seen::One(got)]);
    }

    /// Asserts silence: the packet was dropped.
    #[track_caller]
    pub fn expect_timeout(&self, from: &Origin, proto: Proto, target: &str) {
        let got = self.probe(from, proto, target);
        assert!(
            got == Outcome::Timeout,
            "{from} → {target} ({proto:?}): expected a timeout (DROP), got {got}\nrules involved:\n{}",
            self.explain(target)
        );
        self.check_trace(from, proto, target, &[Seen::One(got)]);
    }

    /// Asserts that no pod answers (refused, dropped or unroutable alike).
    #[track_caller]
    pub fn expect_no_answer(&self, from: &Origin, proto: Proto, target: &str) {
        let got = self.probe(from, proto, target);
        assert!(
            got.pod().is_none(),
            "{from} → {target} ({proto:?}): expected no pod to answer, got {got}\nrules involved:\n{}",
            self.explain(target)
        );
        self.check_trace(from, proto, target, &[Seen::One(got)]);
    }

    /// `count` separate probes; asserts every one is answered by one of `pods`
    /// and returns the distinct `(pod, source seen)` pairs.
    #[track_caller]
    pub fn expect_answers(
        &self,
        from: &Origin,
        proto: Proto,
        target: &str,
        count: usize,
        pods: &[&str],
    ) -> std::collections::BTreeSet<(String, IpAddr)> {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..count {
            match self.probe(from, proto, target) {
                Outcome::Answered { pod, source } if pods.contains(&pod.as_str()) => {
                    seen.insert((pod, source));
                }
                got => panic!(
                    "{from} → {target} ({proto:?}): expected an answer from one of {pods:?}, got {got}\nrules involved:\n{}",
                    self.explain(target)
                ),
            }
        }
        let each: Vec<Seen> = seen
            .iter()
            .map(|(pod, source)| {
                Seen::One(Outcome::Answered {
                    pod: pod.clone(),
                    source: *source,
                })
            })
            .collect();
        self.check_trace(from, proto, target, &each);
        seen
    }

    /// `count` probes that must all be answered, each pod in `pods` at least
    /// once and no other pod; returns the tally.
    #[track_caller]
    pub fn expect_spread(
        &self,
        from: &Origin,
        proto: Proto,
        target: &str,
        count: usize,
        pods: &[&str],
    ) -> Tally {
        let tally = self.tally(from, proto, target, count);
        let seen: Vec<&str> = tally.by_pod.keys().map(String::as_str).collect();
        let mut want: Vec<&str> = pods.to_vec();
        want.sort_unstable();
        assert!(
            tally.answered() == count && seen == want,
            "{from} → {target} ({proto:?}) ×{count}: expected answers from exactly {want:?}, got {tally:?}\nrules involved:\n{}",
            self.explain(target)
        );
        let pods = want.iter().map(|p| p.to_string()).collect();
        self.check_trace(from, proto, target, &[Seen::Pods(pods)]);
        tally
    }

    /// What node-a's netfilter holds now (`iptables-save` of the family and
    /// backend), for failure messages.
    pub fn saved_rules(&self, family: Family, backend: Backend) -> String {
        let program = backend.restore_program(family).replace("-restore", "-save");
        match exec_in(&self.node_ns(), &program, &[]) {
            Ok(text) => text,
            Err(e) => format!("({program} failed: {e})"),
        }
    }

    fn probe_args(
        &self,
        from: &Origin,
        proto: Proto,
        target: &str,
    ) -> Result<(String, Vec<String>)> {
        let proto_flag = match proto {
            Proto::Tcp => "--tcp",
            Proto::Udp => "--udp",
        };
        let target = normalize_target(target)?;
        let mut args = vec![
            "probe".to_string(),
            proto_flag.into(),
            target,
            "--timeout-ms".into(),
            self.probe_timeout.as_millis().to_string(),
        ];
        let ns = match from {
            Origin::Pod(pod) => pod.netns.clone(),
            Origin::Node => self.node_ns(),
            Origin::Client(ip) => {
                args.extend(["--bind".to_string(), ip.clone()]);
                self.client_ns()
            }
        };
        Ok((ns, args))
    }

    /// One connection (TCP) or datagram (UDP) to `target` (`ip:port`, or
    /// `[ip6]:port`, or `ip6:port`).
    pub fn probe(&self, from: &Origin, proto: Proto, target: &str) -> Outcome {
        let (ns, args) = match self.probe_args(from, proto, target) {
            Ok(v) => v,
            Err(e) => return Outcome::Error(e.to_string()),
        };
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        match exec_in_raw(&ns, &self.echo.to_string_lossy(), &refs) {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                match text.lines().next() {
                    Some(line) => Outcome::parse(line),
                    None => Outcome::Error(format!(
                        "probe printed nothing: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )),
                }
            }
            Err(e) => Outcome::Error(e.to_string()),
        }
    }

    /// Like [`probe`](Self::probe), also returning how long it took.
    pub fn probe_timed(&self, from: &Origin, proto: Proto, target: &str) -> (Outcome, Duration) {
        let start = Instant::now();
        let outcome = self.probe(from, proto, target);
        (outcome, start.elapsed())
    }

    /// `count` probes from one process, counted per answering pod (each a new
    /// connection or socket, so each a new conntrack entry and a fresh choice).
    pub fn tally(&self, from: &Origin, proto: Proto, target: &str, count: usize) -> Tally {
        let (ns, mut args) = match self.probe_args(from, proto, target) {
            Ok(v) => v,
            Err(e) => {
                let mut t = Tally::default();
                t.errors.insert(e.to_string(), count);
                return t;
            }
        };
        args.extend([
            "--count".to_string(),
            count.to_string(),
            "--tally-by-name".into(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        match exec_in_raw(&ns, &self.echo.to_string_lossy(), &refs) {
            Ok(out) => {
                let tally = Tally::parse(&String::from_utf8_lossy(&out.stdout));
                // With --tally-by-name a line is "<n> ok <pod> <ip>" for no
                // source port; keep only the pod name as the key.
                let mut by_pod = BTreeMap::new();
                for (k, v) in tally.by_pod {
                    let pod = k.split_whitespace().next().unwrap_or("").to_string();
                    *by_pod.entry(pod).or_default() += v;
                }
                Tally { by_pod, ..tally }
            }
            Err(e) => {
                let mut t = Tally::default();
                t.errors.insert(e.to_string(), count);
                t
            }
        }
    }

    /// The pods started so far.
    pub fn pods(&self) -> &[EchoPod] {
        &self.pods
    }
}

// ---------------------------------------------------------------------------
// `causeway-agent trace`, side by side with every packet assertion.
// ---------------------------------------------------------------------------

/// What real packets showed, for [`DataPath::check_trace`] to hold the trace to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The outcome of one probe (with the source the pod saw, when answered).
    One(Outcome),
    /// Many probes, every one answered, by exactly these pods (sources unknown:
    /// a tally does not report them).
    Pods(std::collections::BTreeSet<String>),
}

/// The trace of one probe, with the inputs it was computed from.
#[derive(Debug)]
pub struct TracedProbe {
    pub packet: trace::Packet,
    pub node: trace::NodeView,
    pub trace: trace::Trace,
}

impl DataPath {
    /// Traces the first packet of `from → target` through the loaded payload
    /// with the agent's own evaluator (`causeway-agent trace`), describing node-a
    /// as the probe finds it: its addresses (`ip addr`), the source address the
    /// packet leaves with (`ip route get` for the node's own packets, the pod's or
    /// client's address otherwise) and the interface it arrives on (the bridge
    /// `cbr0` or the pod's own veth for node-a's pods, the uplink `eth0` for
    /// node-b's pods and for the external client).
    pub fn trace(&self, from: &Origin, proto: Proto, target: &str) -> Result<TracedProbe> {
        let dst: std::net::SocketAddr = normalize_target(target)?.parse()?;
        let six = dst.is_ipv6();
        let family = if six { Family::V6 } else { Family::V4 };
        let node_ns = self.node_ns();
        let (src, in_interface): (IpAddr, Option<String>) = match from {
            Origin::Pod(pod) => {
                let ip = if six { &pod.ip6 } else { &pod.ip };
                let iface = if pod.node_name != NODE_NAME {
                    "eth0".to_string()
                } else if self.pod_network == PodNetwork::Bridge {
                    POD_BRIDGE.to_string()
                } else {
                    pod.host_interface.clone()
                };
                (ip.parse()?, Some(iface))
            }
            Origin::Client(ip) => (ip.parse()?, Some("eth0".to_string())),
            Origin::Node => {
                // The kernel picks the source from the route to the original
                // destination, before OUTPUT's DNAT.
                let dst_ip = dst.ip().to_string();
                let route = ipn(&node_ns, &["route", "get", &dst_ip])?;
                let src = route
                    .split_whitespace()
                    .skip_while(|w| *w != "src")
                    .nth(1)
                    .with_context(|| format!("no source in `ip route get {dst_ip}`: {route}"))?;
                (src.parse()?, None)
            }
        };
        let local_addresses = ipn(&node_ns, &["-o", "addr", "show"])?
            .lines()
            .filter_map(|l| {
                let mut words = l
                    .split_whitespace()
                    .skip_while(|w| *w != "inet" && *w != "inet6");
                words.next()?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect();
        let node = trace::NodeView {
            local_addresses,
            in_interface,
        };
        let packet = trace::Packet {
            src,
            dst: dst.ip(),
            dport: dst.port(),
            proto: match proto {
                Proto::Tcp => trace::Proto::Tcp,
                Proto::Udp => trace::Proto::Udp,
            },
        };
        // The other family's tables hold nothing of ours (only one payload is
        // loaded at a time, with one family's restore program).
        let payload = match &self.payload {
            Some(p) if self.payload_family == family => p.as_str(),
            _ => "",
        };
        let rules = trace::Ruleset::parse(payload)
            .map_err(|e| anyhow::anyhow!("trace cannot parse the loaded payload: {e}"))?;
        let trace = trace::trace(&rules, &packet, &node);
        Ok(TracedProbe {
            packet,
            node,
            trace,
        })
    }

    /// Requires the trace of `from → target` to give the answer real packets
    /// gave (`seen`); panics with both when they disagree. Every `expect_*`
    /// assertion calls it once its own check has passed. Agreement means:
    ///
    /// - answered by pod P: verdict DNAT with P's address and one of P's ports
    ///   among the candidates (probability > 0); or, for a probe sent straight
    ///   to P's own address, no rule touched it (verdict untouched).
    /// - the source P saw: the candidate's masquerade flag says masqueraded iff
    ///   P saw an address of node-a; not masqueraded iff P saw the packet's own
    ///   source. (For the node's own packets the two can coincide: a masquerade
    ///   to the address the node already used is invisible, so then seeing a
    ///   node address is all that can be required.)
    /// - many probes answered by exactly the pods S: every outcome is DNAT and
    ///   the candidates are exactly S's endpoints, unless the Service has
    ///   ClientIP affinity: trace models a first connection (`recent --rcheck`
    ///   / `--update` never match), later ones stick to the first choice, so S
    ///   need only be among the candidates.
    /// - refused at once: REJECT; or untouched with a destination that is an
    ///   address of node-a (delivered locally, nothing listens: the kernel
    ///   refuses, as for a NodePort that `--nodeport-addresses` excludes).
    /// - timeout: DROP; or untouched with a destination that is neither node-a's
    ///   nor a pod's (routed to the node's default gateway, which does not exist
    ///   in this fixture: lost).
    /// - any other failure (no route, …): anything but DNAT.
    #[track_caller]
    pub fn check_trace(&self, from: &Origin, proto: Proto, target: &str, seen: &[Seen]) {
        let traced = match self.trace(from, proto, target) {
            Ok(t) => t,
            Err(e) => panic!("{from} → {target} ({proto:?}): cannot trace the probe: {e:#}"),
        };
        for s in seen {
            let agreed = self
                .agrees(&traced, s)
                .and_then(|()| self.verdict_names_the_service(&traced.trace));
            if let Err(why) = agreed {
                panic!(
                    "{from} → {target} ({proto:?}): trace disagrees with real packets: {why}\n\
                     packet: {:?}\nnode view: {:?}\n--- trace ---\n{}\n--- rules involved ---\n{}",
                    traced.packet,
                    traced.node,
                    traced.trace,
                    self.explain(target)
                );
            }
            eprintln!(
                "trace agrees: {from} → {target} ({proto:?}): {s:?} ~ {}",
                traced.trace.verdict.text
            );
        }
    }

    fn agrees(&self, traced: &TracedProbe, seen: &Seen) -> std::result::Result<(), String> {
        use trace::VerdictKind as K;
        let TracedProbe {
            packet,
            node,
            trace: t,
        } = traced;
        let kind = t.verdict.kind;
        let is_local = |ip: &IpAddr| ip.is_loopback() || node.local_addresses.contains(ip);
        let pod_at = |ip: &IpAddr| {
            self.pods
                .iter()
                .find(|p| p.ip.parse().ok() == Some(*ip) || p.ip6.parse().ok() == Some(*ip))
        };
        // DNAT candidates with a probability: (pod name or "?", port ok, masquerade).
        let candidates: Vec<(String, bool, bool)> = t
            .outcomes
            .iter()
            .filter(|o| o.kind == K::Dnat && o.probability > 1e-9)
            .map(|o| {
                let endpoint = o.endpoint.as_deref().and_then(parse_endpoint);
                match endpoint.and_then(|(ip, port)| pod_at(&ip).map(|p| (p, port))) {
                    Some((pod, port)) => {
                        (pod.name.clone(), pod.ports.contains(&port), o.masquerade)
                    }
                    None => (
                        format!("? ({})", o.endpoint.as_deref().unwrap_or("")),
                        false,
                        o.masquerade,
                    ),
                }
            })
            .collect();
        let masquerade_agrees = |masquerade: bool, source: &IpAddr| {
            if masquerade {
                is_local(source)
            } else {
                *source == packet.src
            }
        };
        match seen {
            Seen::One(Outcome::Answered { pod, source }) => {
                let direct = pod_at(&packet.dst).is_some_and(|p| &p.name == pod);
                if kind == K::Untouched && direct {
                    let masquerade = t.outcomes.first().is_some_and(|o| o.masquerade);
                    return if masquerade_agrees(masquerade, source) {
                        Ok(())
                    } else {
                        Err(format!(
                            "{pod} saw source {source}; trace says masquerade: {masquerade}"
                        ))
                    };
                }
                if kind != K::Dnat {
                    return Err(format!(
                        "{pod} answered; trace's verdict is {kind:?}, not DNAT"
                    ));
                }
                let theirs: Vec<&(String, bool, bool)> =
                    candidates.iter().filter(|c| &c.0 == pod).collect();
                if theirs.is_empty() {
                    return Err(format!(
                        "{pod} answered; it is not among trace's candidates {candidates:?}"
                    ));
                }
                if !theirs.iter().any(|c| c.1) {
                    return Err(format!(
                        "{pod} answered; trace DNATs it to a port it does not listen on"
                    ));
                }
                if !theirs.iter().any(|c| masquerade_agrees(c.2, source)) {
                    return Err(format!(
                        "{pod} saw source {source} (packet source {}); trace says masquerade: {}",
                        packet.src, theirs[0].2
                    ));
                }
                Ok(())
            }
            Seen::One(Outcome::Refused) => match kind {
                K::Reject => Ok(()),
                K::Untouched if is_local(&packet.dst) => Ok(()),
                _ => Err(format!(
                    "refused at once; trace's verdict is {kind:?} (REJECT, or untouched to an address of the node, expected)"
                )),
            },
            Seen::One(Outcome::Timeout) => match kind {
                K::Drop => Ok(()),
                K::Untouched if !is_local(&packet.dst) && pod_at(&packet.dst).is_none() => Ok(()),
                _ => Err(format!(
                    "timed out; trace's verdict is {kind:?} (DROP, or untouched to an address nobody has, expected)"
                )),
            },
            Seen::One(Outcome::Error(e)) => match kind {
                K::Dnat => Err(format!("failed ({e}); trace DNATs it")),
                _ => Ok(()),
            },
            Seen::Pods(pods) => {
                if kind != K::Dnat {
                    return Err(format!(
                        "{pods:?} answered every probe; trace's verdict is {kind:?}, not DNAT"
                    ));
                }
                if let Some(o) = t
                    .outcomes
                    .iter()
                    .find(|o| o.kind != K::Dnat && o.probability > 1e-9)
                {
                    return Err(format!(
                        "every probe was answered; trace gives {:?} a probability of {:.3}",
                        o.kind, o.probability
                    ));
                }
                if let Some(c) = candidates.iter().find(|c| !c.1) {
                    return Err(format!(
                        "trace DNATs to {} on a port it does not listen on",
                        c.0
                    ));
                }
                let traced: std::collections::BTreeSet<String> =
                    candidates.iter().map(|c| c.0.clone()).collect();
                let exact = traced == *pods;
                let subset = pods.is_subset(&traced);
                if exact || (subset && self.has_affinity(t)) {
                    Ok(())
                } else {
                    Err(format!(
                        "answers came from exactly {pods:?}; trace's candidates are {traced:?}"
                    ))
                }
            }
        }
    }

    /// A DNAT, REJECT or DROP verdict must name the Service responsible (SPEC
    /// 2.4: "REJECT: default/web:http has no endpoints"): a `ns/name[:port]`
    /// that the payload's comments use, and for a DNAT one whose rules DNAT to
    /// a candidate endpoint.
    fn verdict_names_the_service(&self, t: &trace::Trace) -> std::result::Result<(), String> {
        use trace::VerdictKind as K;
        let payload = self.payload();
        // A hand-written payload without comments names no Service to report.
        if t.verdict.kind == K::Untouched || !payload.contains("--comment") {
            return Ok(());
        }
        let named: Vec<&str> = t
            .verdict
            .text
            .split_whitespace()
            .map(|w| w.trim_end_matches([',', '.', ';', ')']))
            .filter(|w| w.contains('/') && w.starts_with(|c: char| c.is_ascii_alphabetic()))
            .filter(|w| payload.contains(&format!("\"{w}")) || payload.contains(&format!(" {w} ")))
            .collect();
        let names_one = |line: &str| {
            named
                .iter()
                .any(|n| line.contains(&format!("\"{n} ")) || line.contains(&format!("\"{n}\"")))
        };
        let ok = match t.verdict.kind {
            // The DNAT rule names the Service, or (above 1 000 endpoints,
            // where DNAT rules carry no comment, as with kube-proxy) the
            // dispatch entry that jumps to its chain does.
            K::Dnat => t
                .outcomes
                .iter()
                .filter_map(|o| o.endpoint.as_deref())
                .any(|ep| {
                    let to = format!("--to-destination {ep}");
                    payload.lines().filter(|l| l.contains(&to)).any(|l| {
                        let chain = l.split_whitespace().nth(1).unwrap_or("");
                        let jump = format!("-j {chain}");
                        names_one(l) || payload.lines().any(|e| e.ends_with(&jump) && names_one(e))
                    })
                }),
            _ => !named.is_empty(),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "the verdict {:?} does not name the Service whose rules decided",
                t.verdict.text
            ))
        }
    }

    /// Whether a chain on the traced path holds a `recent --rcheck` or
    /// `--update` rule (ClientIP session affinity).
    fn has_affinity(&self, t: &trace::Trace) -> bool {
        let payload = self.payload();
        t.steps.iter().any(|s| {
            let prefix = format!("-A {} ", s.chain);
            payload.lines().any(|l| {
                l.starts_with(&prefix)
                    && l.contains("-m recent")
                    && (l.contains("--rcheck") || l.contains("--update"))
            })
        })
    }
}

/// `ip:port` or `[ip6]:port`.
fn parse_endpoint(text: &str) -> Option<(IpAddr, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.parse().ok()?, port.parse().ok()?))
}

impl Drop for DataPath {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            del_netns(ns);
        }
    }
}

/// The `causeway-agent` binary: `$CAUSEWAY_AGENT`, else the one built next to
/// the running test (`cargo build -p causeway-agent`).
pub fn agent_binary() -> PathBuf {
    match std::env::var_os("CAUSEWAY_AGENT") {
        Some(p) => PathBuf::from(p),
        None => crate::paths::workspace_bin("causeway-agent"),
    }
}

/// Loads `payload` into namespace `ns` with `--noflush --wait`.
pub fn restore_into(ns: &str, payload: &str, family: Family, backend: Backend) -> Result<()> {
    let program = backend.restore_program(family);
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program, "--noflush", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program} in {ns}"))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(payload.as_bytes())
        .with_context(|| format!("writing the payload to {program}"))?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // iptables-restore names the failing line: "line N failed".
        let offending = stderr
            .split_whitespace()
            .skip_while(|w| *w != "line")
            .nth(1)
            .and_then(|n| n.trim_end_matches(':').parse::<usize>().ok())
            .and_then(|n| payload.lines().nth(n.saturating_sub(1)))
            .map(|l| format!("\noffending line: {l}"))
            .unwrap_or_default();
        bail!(
            "{program} --noflush rejected the payload ({}): {stderr}{offending}",
            out.status
        );
    }
    Ok(())
}

/// `ip -n <ns> args…`.
fn ipn(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full)
}

fn add_addr(ns: &str, cidr: &str, dev: &str, six: bool) -> Result<()> {
    if six {
        ipn(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"])?;
    } else {
        ipn(ns, &["addr", "add", cidr, "dev", dev])?;
    }
    Ok(())
}

/// Accepts `ip:port`, `[ip6]:port` and the bracket-less `ip6:port`.
fn normalize_target(target: &str) -> Result<String> {
    if target.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(target.to_string());
    }
    if let Some((host, port)) = target.rsplit_once(':')
        && let Ok(ip) = host.parse::<IpAddr>()
        && port.parse::<u16>().is_ok()
    {
        return Ok(std::net::SocketAddr::new(ip, port.parse()?).to_string());
    }
    bail!("not an address and port: {target}")
}

fn wait_for_line(log: &Path, needle: &str, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if start.elapsed() > limit {
            bail!("no {needle:?} in {} after {limit:?}: {text}", log.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Root and the tools the fixture shells out to; one sentence per missing piece.
/// Checked once per process: `preflight` creates a namespace whose name is
/// unique per process only, so test threads must not run it side by side.
fn check_prerequisites() -> Result<()> {
    static CHECKED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        crate::netns::preflight().map_err(|e| e.to_string())?;
        for tool in ["iptables-legacy-restore", "ip6tables-restore"] {
            if crate::netns::which(tool).is_none() {
                return Err(format!(
                    "`{tool}` is missing: install the Debian package iptables"
                ));
            }
        }
        Ok(())
    });
    match checked {
        Ok(()) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

/// Deletes namespaces of earlier runs whose test process is gone (a run killed
/// with SIGKILL cannot clean up after itself).
fn sweep_stale() {
    for ns in list_netns() {
        let Some(rest) = ns.strip_prefix("cwdp") else {
            continue;
        };
        let Some(pid) = rest.split('n').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            del_netns(&ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probe_lines() {
        assert_eq!(
            Outcome::parse("ok pod-a 100.96.0.1:40000"),
            Outcome::Answered {
                pod: "pod-a".into(),
                source: "100.96.0.1".parse().unwrap()
            }
        );
        assert_eq!(
            Outcome::parse("ok pod-a [2001:db8::1]:40000").source(),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(Outcome::parse("refused"), Outcome::Refused);
        assert_eq!(Outcome::parse("timeout"), Outcome::Timeout);
        assert!(matches!(
            Outcome::parse("error no route"),
            Outcome::Error(_)
        ));
    }

    #[test]
    fn parses_tallies() {
        let t = Tally::parse("990 ok a\n1010 ok b\n3 timeout\n2 refused\n1 error x\n");
        assert_eq!(
            (t.count("a"), t.count("b"), t.timeout, t.refused),
            (990, 1010, 3, 2)
        );
        assert_eq!(t.total(), 2006);
    }

    #[test]
    fn normalizes_targets() {
        assert_eq!(
            normalize_target("100.64.0.10:80").unwrap(),
            "100.64.0.10:80"
        );
        assert_eq!(
            normalize_target("2001:db8::1:80").unwrap(),
            "[2001:db8::1]:80"
        );
        assert!(normalize_target("nonsense").is_err());
    }

    #[test]
    fn flags_only_name_what_is_set() {
        let args = AgentFlags::default()
            .detect_local_mode("BridgeInterface")
            .to_args();
        assert_eq!(
            args,
            [
                "--cluster-cidr",
                CLUSTER_CIDR,
                "--detect-local-mode",
                "BridgeInterface",
                "--pod-bridge-interface",
                "cbr0"
            ]
        );
    }
}

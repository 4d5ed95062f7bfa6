//! Builder-style fixtures for Services, Nodes and EndpointSlices, shared by the
//! unit tests of the pure core. Defaults describe the common case (an owned
//! one-port LoadBalancer Service, a healthy node with an AWS providerID) so a
//! test states only what it is about.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSpec, Service, ServicePort, ServiceSpec, Taint};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::desired::ClusterConfig;
use crate::model::Scheme;

pub const CLUSTER: &str = "prod";
pub const CLASS: &str = "causeway.dev/nlb";

pub fn cluster_config() -> ClusterConfig {
    ClusterConfig {
        cluster_name: CLUSTER.to_string(),
        load_balancer_class: CLASS.to_string(),
        default_class: false,
        default_scheme: Scheme::InternetFacing,
        node_health_port: 10256,
    }
}

/// A Service port.
pub fn port(name: &str, port: i32, protocol: &str, node_port: i32) -> ServicePort {
    ServicePort {
        name: (!name.is_empty()).then(|| name.to_string()),
        port,
        protocol: Some(protocol.to_string()),
        node_port: Some(node_port),
        target_port: Some(IntOrString::Int(port)),
        ..Default::default()
    }
}

/// 80/TCP http, 443/TCP https, 53/UDP dns.
pub fn service_ports() -> Vec<ServicePort> {
    vec![
        port("http", 80, "TCP", 30080),
        port("https", 443, "TCP", 30443),
        port("dns", 53, "UDP", 30053),
    ]
}

pub struct ServiceBuilder {
    svc: Service,
}

impl ServiceBuilder {
    /// `default/web`, UID `uid-web`, type LoadBalancer, our class, 80/TCP → 30080,
    /// `externalTrafficPolicy: Cluster`.
    pub fn new() -> Self {
        ServiceBuilder {
            svc: Service {
                metadata: ObjectMeta {
                    namespace: Some("default".into()),
                    name: Some("web".into()),
                    uid: Some("uid-web".into()),
                    ..Default::default()
                },
                spec: Some(ServiceSpec {
                    type_: Some("LoadBalancer".into()),
                    load_balancer_class: Some(CLASS.into()),
                    external_traffic_policy: Some("Cluster".into()),
                    ports: Some(vec![port("http", 80, "TCP", 30080)]),
                    ..Default::default()
                }),
                status: None,
            },
        }
    }

    fn spec(&mut self) -> &mut ServiceSpec {
        self.svc.spec.get_or_insert_with(Default::default)
    }

    pub fn named(mut self, namespace: &str, name: &str) -> Self {
        self.svc.metadata.namespace = Some(namespace.into());
        self.svc.metadata.name = Some(name.into());
        self
    }

    pub fn uid(mut self, uid: &str) -> Self {
        self.svc.metadata.uid = Some(uid.into());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.svc
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn type_(mut self, t: &str) -> Self {
        self.spec().type_ = Some(t.into());
        self
    }

    pub fn class(mut self, class: Option<&str>) -> Self {
        self.spec().load_balancer_class = class.map(Into::into);
        self
    }

    /// Replaces all ports.
    pub fn ports(mut self, ports: Vec<ServicePort>) -> Self {
        self.spec().ports = Some(ports);
        self
    }

    /// Adds a port.
    pub fn port(mut self, name: &str, number: i32, protocol: &str, node_port: i32) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(port(name, number, protocol, node_port));
        self
    }

    /// `externalTrafficPolicy: Local` with this `healthCheckNodePort`.
    pub fn etp_local(mut self, health_check_node_port: i32) -> Self {
        let spec = self.spec();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(health_check_node_port);
        self
    }

    /// `spec.ipFamilies`, e.g. `["IPv6", "IPv4"]`.
    pub fn ip_families(mut self, families: &[&str]) -> Self {
        self.spec().ip_families = Some(families.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn source_ranges(mut self, ranges: &[&str]) -> Self {
        self.spec().load_balancer_source_ranges =
            Some(ranges.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn build(self) -> Service {
        self.svc
    }
}

pub struct NodeBuilder {
    node: Node,
}

impl NodeBuilder {
    /// A node whose providerID is `aws:///us-east-1a/<instance>`.
    pub fn new(name: &str, instance: &str) -> Self {
        NodeBuilder {
            node: Node {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(NodeSpec {
                    provider_id: Some(format!("aws:///us-east-1a/{instance}")),
                    ..Default::default()
                }),
                status: None,
            },
        }
    }

    pub fn provider_id(mut self, id: Option<&str>) -> Self {
        self.node
            .spec
            .get_or_insert_with(Default::default)
            .provider_id = id.map(Into::into);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.node
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn taint(mut self, key: &str, effect: &str) -> Self {
        self.node
            .spec
            .get_or_insert_with(Default::default)
            .taints
            .get_or_insert_with(Vec::new)
            .push(Taint {
                key: key.into(),
                effect: effect.into(),
                ..Default::default()
            });
        self
    }

    pub fn deleting(mut self) -> Self {
        self.node.metadata.deletion_timestamp = Some(Time(Default::default()));
        self
    }

    pub fn build(self) -> Node {
        self.node
    }
}

pub struct EndpointSliceBuilder {
    slice: EndpointSlice,
}

impl EndpointSliceBuilder {
    /// An IPv4 slice of `default/<service>`.
    pub fn new(service: &str, name: &str) -> Self {
        EndpointSliceBuilder {
            slice: EndpointSlice {
                address_type: "IPv4".into(),
                endpoints: Vec::new(),
                metadata: ObjectMeta {
                    namespace: Some("default".into()),
                    name: Some(name.into()),
                    labels: Some(BTreeMap::from([(
                        "kubernetes.io/service-name".to_string(),
                        service.to_string(),
                    )])),
                    ..Default::default()
                },
                ports: Some(Vec::new()),
            },
        }
    }

    pub fn port(mut self, name: &str, number: i32, protocol: &str) -> Self {
        self.slice
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: Some(name.into()),
                port: Some(number),
                protocol: Some(protocol.into()),
                ..Default::default()
            });
        self
    }

    /// `addressType: IPv6`.
    pub fn ipv6(mut self) -> Self {
        self.slice.address_type = "IPv6".into();
        self
    }

    pub fn endpoint(mut self, ip: &str, ready: bool) -> Self {
        self.slice.endpoints.push(Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(ready),
                terminating: Some(false),
            }),
            ..Default::default()
        });
        self
    }

    /// A pod being deleted that still serves, as the EndpointSlice controller
    /// publishes it: not ready, serving, terminating.
    pub fn terminating_endpoint(mut self, ip: &str) -> Self {
        self.slice.endpoints.push(Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready: Some(false),
                serving: Some(true),
                terminating: Some(true),
            }),
            ..Default::default()
        });
        self
    }

    /// An endpoint as a hand-written slice may have it: these addresses, no conditions.
    pub fn raw_endpoint(mut self, addresses: &[&str]) -> Self {
        self.slice.endpoints.push(Endpoint {
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            conditions: None,
            ..Default::default()
        });
        self
    }

    pub fn build(self) -> EndpointSlice {
        self.slice
    }
}

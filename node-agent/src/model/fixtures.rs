//! Builder-style fixtures for Services, EndpointSlices and Nodes in unit tests.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeSpec,
    NodeStatus, Service, ServicePort as ApiServicePort, ServiceSpec, ServiceStatus,
    SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as ApiEndpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice,
    ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

pub struct ServiceBuilder(Service);

impl ServiceBuilder {
    /// A ClusterIP Service at 10.96.0.10 with no ports yet.
    pub fn new(namespace: &str, name: &str) -> Self {
        ServiceBuilder(Service {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                cluster_ip: Some("10.96.0.10".into()),
                ..ServiceSpec::default()
            }),
            status: None,
        })
    }

    fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_with(ServiceSpec::default)
    }

    pub fn type_(mut self, type_: &str) -> Self {
        self.spec().type_ = Some(type_.into());
        self
    }

    pub fn cluster_ip(mut self, ip: &str) -> Self {
        self.spec().cluster_ip = Some(ip.into());
        self
    }

    pub fn cluster_ips(mut self, ips: &[&str]) -> Self {
        self.spec().cluster_ip = ips.first().map(|s| s.to_string());
        self.spec().cluster_ips = Some(ips.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Adds a port; `name` may be empty for an unnamed port.
    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.spec()
            .ports
            .get_or_insert_with(Vec::new)
            .push(ApiServicePort {
                name: (!name.is_empty()).then(|| name.to_string()),
                port,
                protocol: Some(protocol.into()),
                ..ApiServicePort::default()
            });
        self
    }

    /// Sets the node port of the last port added.
    pub fn node_port(mut self, node_port: i32) -> Self {
        if let Some(last) = self.spec().ports.as_mut().and_then(|p| p.last_mut()) {
            last.node_port = Some(node_port);
        }
        self
    }

    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().external_traffic_policy = Some(policy.into());
        self
    }

    pub fn internal_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().internal_traffic_policy = Some(policy.into());
        self
    }

    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.spec().health_check_node_port = Some(port);
        self
    }

    pub fn external_ips(mut self, ips: &[&str]) -> Self {
        self.spec().external_ips = Some(ips.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn source_ranges(mut self, ranges: &[&str]) -> Self {
        self.spec().load_balancer_source_ranges =
            Some(ranges.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn client_ip_affinity(mut self, timeout_seconds: Option<i32>) -> Self {
        self.spec().session_affinity = Some("ClientIP".into());
        self.spec().session_affinity_config = timeout_seconds.map(|t| SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(t),
            }),
        });
        self
    }

    /// Adds a load balancer ingress IP; `ip_mode` is `VIP`, `Proxy` or absent.
    pub fn ingress(mut self, ip: &str, ip_mode: Option<&str>) -> Self {
        let status = self.0.status.get_or_insert_with(ServiceStatus::default);
        let lb = status
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default);
        lb.ingress
            .get_or_insert_with(Vec::new)
            .push(LoadBalancerIngress {
                ip: Some(ip.into()),
                ip_mode: ip_mode.map(str::to_string),
                ..LoadBalancerIngress::default()
            });
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn build(self) -> Service {
        self.0
    }
}

pub struct SliceBuilder(EndpointSlice);

impl SliceBuilder {
    /// An IPv4 slice of Service `namespace/service`.
    pub fn new(namespace: &str, service: &str, name: &str) -> Self {
        let mut labels = BTreeMap::new();
        labels.insert(
            crate::model::LABEL_SERVICE_NAME.to_string(),
            service.to_string(),
        );
        SliceBuilder(EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                labels: Some(labels),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            ports: None,
        })
    }

    pub fn address_type(mut self, address_type: &str) -> Self {
        self.0.address_type = address_type.into();
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.0
            .ports
            .get_or_insert_with(Vec::new)
            .push(EndpointPort {
                name: (!name.is_empty()).then(|| name.to_string()),
                port: Some(port),
                protocol: Some(protocol.into()),
                app_protocol: None,
            });
        self
    }

    pub fn endpoint(mut self, endpoint: EndpointBuilder) -> Self {
        self.0.endpoints.push(endpoint.0);
        self
    }

    pub fn build(self) -> EndpointSlice {
        self.0
    }
}

pub struct EndpointBuilder(ApiEndpoint);

impl EndpointBuilder {
    /// A ready endpoint with no node.
    pub fn new(ip: &str) -> Self {
        EndpointBuilder(ApiEndpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            ..ApiEndpoint::default()
        })
    }

    pub fn node(mut self, node: &str) -> Self {
        self.0.node_name = Some(node.into());
        self
    }

    fn conditions(&mut self) -> &mut EndpointConditions {
        self.0
            .conditions
            .get_or_insert_with(EndpointConditions::default)
    }

    /// Not ready, serving and terminating: a pod shutting down gracefully.
    pub fn terminating(mut self) -> Self {
        *self.conditions() = EndpointConditions {
            ready: Some(false),
            serving: Some(true),
            terminating: Some(true),
        };
        self
    }

    /// Not ready and not serving.
    pub fn not_serving(mut self) -> Self {
        *self.conditions() = EndpointConditions {
            ready: Some(false),
            serving: Some(false),
            terminating: Some(false),
        };
        self
    }

    pub fn no_conditions(mut self) -> Self {
        self.0.conditions = None;
        self
    }

    pub fn zone_hints(mut self, zones: &[&str]) -> Self {
        self.0
            .hints
            .get_or_insert_with(EndpointHints::default)
            .for_zones = Some(
            zones
                .iter()
                .map(|z| ForZone {
                    name: z.to_string(),
                })
                .collect(),
        );
        self
    }

    pub fn node_hints(mut self, nodes: &[&str]) -> Self {
        self.0
            .hints
            .get_or_insert_with(EndpointHints::default)
            .for_nodes = Some(
            nodes
                .iter()
                .map(|n| ForNode {
                    name: n.to_string(),
                })
                .collect(),
        );
        self
    }
}

pub struct NodeBuilder(Node);

impl NodeBuilder {
    pub fn new(name: &str) -> Self {
        NodeBuilder(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus::default()),
        })
    }

    pub fn internal_ip(mut self, ip: &str) -> Self {
        let status = self.0.status.get_or_insert_with(NodeStatus::default);
        status
            .addresses
            .get_or_insert_with(Vec::new)
            .push(NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            });
        self
    }

    pub fn pod_cidrs(mut self, cidrs: &[&str]) -> Self {
        let spec = self.0.spec.get_or_insert_with(NodeSpec::default);
        spec.pod_cidr = cidrs.first().map(|c| c.to_string());
        spec.pod_cidrs = Some(cidrs.iter().map(|c| c.to_string()).collect());
        self
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(crate::model::LABEL_ZONE.into(), zone.into());
        self
    }

    pub fn build(self) -> Node {
        self.0
    }
}

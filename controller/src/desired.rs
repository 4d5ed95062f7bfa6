//! `desired = f(Service, Nodes, EndpointSlices, config)`: what one Service's AWS
//! resources should be (SPEC 1.1, 1.2). Pure: no I/O, no clock.
//!
//! Decisions worth knowing when reading a plan:
//! - **Target-group port = the Service port**, and every target carries its own
//!   port (NodePort for instance targets, pod port for ip targets). So a NodePort
//!   change only re-registers targets; the group is kept.
//! - **Names encode what cannot change in place.** The LB hash covers cluster,
//!   UID and scheme; a TG hash covers cluster, UID, the LB name, port, protocol,
//!   target type and (for ipv6 groups) the family. A changed name therefore means "replace", and because the
//!   new name differs from the old one, the replacement can be created before the
//!   old resource is deleted (ELBv2 names are unique per region, and a target
//!   group can serve only one NLB — hence the LB name in the TG hash).
//! - **Every attribute an annotation can set has its AWS default here**, so
//!   removing the annotation restores the default (`*_attribute_defaults`).
//! - **Nodes are not filtered by readiness** (as the k8s service controller since
//!   1.27): the health check decides; only the SPEC 1.2 eligibility rules do.
//! - **Health-check defaults are complete values** (timeout and success codes
//!   included, AWS's own defaults where SPEC is silent) so drift compares exactly.
//!   ip targets default to a TCP check on the traffic port: pods do not serve the
//!   agent's `/healthz`.
//! - **ip targets are the ready endpoints**, as aws-load-balancer-controller
//!   registers them (not kube-proxy's terminating fallback: a deregistered
//!   target drains its connections anyway): the first address of
//!   each ready, non-terminating endpoint of this Service's slices, on the port
//!   the slice publishes for the Service port's name and protocol. The family
//!   follows the Service's IP families as aws-load-balancer-controller does: an
//!   IPv6 Service on a dualstack NLB gets `ipv6` target groups and IPv6 slices.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use crate::annotations::{
    self, AnnotationError, AnnotationErrors, BackendProtocol, ErrorKind, LbSpec,
    NodeLabelRequirement, ParseDefaults,
};
use crate::model::{
    AlpnPolicy, Cidr, Desired, HealthCheck, HealthCheckPort, HealthCheckProtocol, IpAddressType,
    IpProtocol, Listener, LoadBalancer, Protocol, RuleSource, Scheme, SecurityGroup,
    SecurityGroupSelection, ServiceRef, SgRule, SkippedNode, SubnetMapping, SubnetSelection,
    Target, TargetGroup, TargetGroupIpAddressType, TargetType, tags,
};

/// Label that excludes a node from every external load balancer.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// Taint the cluster autoscaler puts on a node it is about to delete.
pub const AUTOSCALER_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// Taint Karpenter puts on a node it is disrupting.
pub const KARPENTER_TAINT: &str = "karpenter.sh/disrupted";
/// Label by which an EndpointSlice names its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Health-check path the agent (and kube-proxy) serve.
pub const HEALTH_PATH: &str = "/healthz";
/// Success codes ELBv2 uses by default for HTTP checks.
pub const DEFAULT_SUCCESS_CODES: &str = "200-399";

/// Controller-wide settings that shape the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `--cluster-name`: in tags, names and subnet discovery.
    pub cluster_name: String,
    /// `--load-balancer-class` (`causeway.dev/nlb`).
    pub load_balancer_class: String,
    /// `--default-class`: also own LoadBalancer Services without a class.
    pub default_class: bool,
    /// `--default-scheme`.
    pub default_scheme: Scheme,
    /// The agent's health port (10256), probed for `externalTrafficPolicy: Cluster`.
    pub node_health_port: u16,
}

/// Why `desired` produced nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DesiredError {
    /// Not ours (type or class): the caller cleans up whatever we still own.
    #[error("not owned by this controller: {reason}")]
    NotOwned { reason: String },
    /// The object lacks something the API server always sets.
    #[error("Service has no {field}")]
    MissingField { field: &'static str },
    /// Annotation errors; Warning event `InvalidAnnotation`, no AWS write.
    #[error("{0}")]
    InvalidAnnotations(AnnotationErrors),
    /// The Service spec cannot be built as an NLB (e.g. SCTP, mismatched
    /// TCP/UDP NodePorts); same handling as annotation errors.
    #[error("{field}: {problem}")]
    InvalidService { field: String, problem: String },
}

impl DesiredError {
    /// Bounded label for metrics (`causeway_reconciles_total{outcome}`): for
    /// annotation errors, the first one's kind (docs/annotations.md, Errors).
    pub fn label(&self) -> &'static str {
        match self {
            DesiredError::NotOwned { .. } => "not_owned",
            DesiredError::MissingField { .. } => "missing_field",
            DesiredError::InvalidAnnotations(errors) => errors
                .0
                .first()
                .map_or(AnnotationErrors::LABEL, |e| e.kind.label()),
            DesiredError::InvalidService { .. } => "invalid_service",
        }
    }
}

/// Whether this controller owns the Service (SPEC 1.1); `Err` says why not.
pub fn ownership(service: &Service, cfg: &ClusterConfig) -> Result<(), String> {
    let Some(spec) = &service.spec else {
        return Err("Service has no spec".into());
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return Err(format!(
            "spec.type is {}, not LoadBalancer",
            spec.type_.as_deref().unwrap_or("ClusterIP")
        ));
    }
    match spec.load_balancer_class.as_deref() {
        Some(class) if class == cfg.load_balancer_class => Ok(()),
        Some(class) => Err(format!(
            "spec.loadBalancerClass is {class}, not {}",
            cfg.load_balancer_class
        )),
        None if cfg.default_class => Ok(()),
        None => Err(format!(
            "spec.loadBalancerClass is unset and --default-class is off (want {})",
            cfg.load_balancer_class
        )),
    }
}

/// Convenience form of [`ownership`].
pub fn owns(service: &Service, cfg: &ClusterConfig) -> bool {
    ownership(service, cfg).is_ok()
}

/// Whether endpoints can matter to this Service: owned, and its annotations
/// ask for ip targets (whether or not the rest of them parse). Endpoint
/// changes of any other Service trigger no reconcile, and its reconciles read
/// no slices.
pub fn may_use_ip_targets(service: &Service, cfg: &ClusterConfig) -> bool {
    let annotations = service.metadata.annotations.as_ref();
    let is = |key: &str, value: &str| {
        annotations
            .and_then(|a| a.get(key))
            .is_some_and(|v| v.trim().eq_ignore_ascii_case(value))
    };
    owns(service, cfg)
        && (is(annotations::keys::NLB_TARGET_TYPE, "ip") || is(annotations::keys::TYPE, "nlb-ip"))
}

/// Whether a node may be a target, and as which EC2 instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEligibility {
    Eligible {
        instance_id: String,
    },
    /// Excluded by a SPEC 1.2 rule (deleting, label, taint, target-node-labels).
    Ineligible {
        reason: &'static str,
    },
    /// Eligible but unusable: no parsable `spec.providerID` (Warning event).
    NoInstanceId {
        provider_id: Option<String>,
    },
}

/// SPEC 1.2 eligibility for one node.
pub fn node_eligibility(
    node: &Node,
    target_node_labels: &[NodeLabelRequirement],
) -> NodeEligibility {
    if node.metadata.deletion_timestamp.is_some() {
        return NodeEligibility::Ineligible {
            reason: "being deleted",
        };
    }
    let no_labels = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&no_labels);
    if labels.contains_key(EXCLUDE_LABEL) {
        return NodeEligibility::Ineligible {
            reason: "labelled node.kubernetes.io/exclude-from-external-load-balancers",
        };
    }
    let spec = node.spec.as_ref();
    let taints = spec.and_then(|s| s.taints.as_deref()).unwrap_or_default();
    if taints.iter().any(|t| t.key == AUTOSCALER_TAINT) {
        return NodeEligibility::Ineligible {
            reason: "tainted ToBeDeletedByClusterAutoscaler",
        };
    }
    if taints.iter().any(|t| t.key == KARPENTER_TAINT) {
        return NodeEligibility::Ineligible {
            reason: "tainted karpenter.sh/disrupted",
        };
    }
    if !target_node_labels.iter().all(|r| r.matches(labels)) {
        return NodeEligibility::Ineligible {
            reason: "does not match aws-load-balancer-target-node-labels",
        };
    }
    let provider_id = spec.and_then(|s| s.provider_id.as_deref());
    match provider_id.and_then(instance_id_from_provider_id) {
        Some(id) => NodeEligibility::Eligible {
            instance_id: id.to_string(),
        },
        None => NodeEligibility::NoInstanceId {
            provider_id: provider_id.map(str::to_string),
        },
    }
}

/// EC2 instance ID from `aws:///<az>/i-…` (also `aws:////i-…`, seen on
/// clusters without zone information).
pub fn instance_id_from_provider_id(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    let hex = id.strip_prefix("i-")?;
    (!hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// `k8s-<ns≤8>-<name≤8>-<hash10>`: ≤ 32 characters of `[a-zA-Z0-9-]`.
pub fn resource_name(namespace: &str, name: &str, hash_input: &[&str]) -> String {
    let short = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_alphanumeric)
            .take(8)
            .collect()
    };
    let mut hasher = Sha256::new();
    for part in hash_input {
        hasher.update(part.as_bytes());
        // A separator that cannot appear in any part keeps ("ab","c") ≠ ("a","bc").
        hasher.update([0u8]);
    }
    let hash = data_encoding::HEXLOWER.encode(&hasher.finalize());
    format!("k8s-{}-{}-{}", short(namespace), short(name), &hash[..10])
}

/// Builds the desired state of an owned Service. `endpoint_slices` may hold
/// slices of any Service; only this Service's are used, and only for ip targets.
pub fn desired(
    service: &Service,
    nodes: &[Node],
    endpoint_slices: &[EndpointSlice],
    cfg: &ClusterConfig,
) -> Result<Desired, DesiredError> {
    ownership(service, cfg).map_err(|reason| DesiredError::NotOwned { reason })?;
    let meta = &service.metadata;
    let svc = ServiceRef {
        namespace: meta.namespace.clone().ok_or(DesiredError::MissingField {
            field: "metadata.namespace",
        })?,
        name: meta.name.clone().ok_or(DesiredError::MissingField {
            field: "metadata.name",
        })?,
        uid: meta.uid.clone().ok_or(DesiredError::MissingField {
            field: "metadata.uid",
        })?,
    };
    let spec = service
        .spec
        .as_ref()
        .ok_or(DesiredError::MissingField { field: "spec" })?;
    let ports = spec.ports.as_deref().unwrap_or_default();
    let no_annotations = BTreeMap::new();
    let lb_spec = annotations::parse(
        meta.annotations.as_ref().unwrap_or(&no_annotations),
        ports,
        ParseDefaults {
            scheme: cfg.default_scheme,
        },
    )
    .map_err(DesiredError::InvalidAnnotations)?;

    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = if etp_local && lb_spec.target_type == TargetType::Instance {
        let port = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0);
        Some(port.ok_or_else(|| DesiredError::InvalidService {
            field: "spec.healthCheckNodePort".into(),
            problem:
                "externalTrafficPolicy is Local but no healthCheckNodePort is allocated yet".into(),
        })?)
    } else {
        None
    };
    let source_ranges = source_ranges(spec.load_balancer_source_ranges.as_deref(), &lb_spec)?;

    let base_tags = |resource: String| {
        let mut t = lb_spec.additional_tags.clone();
        t.insert(
            format!("{}{}", tags::CLUSTER_PREFIX, cfg.cluster_name),
            "owned".into(),
        );
        t.insert(tags::SERVICE_NAME.into(), svc.to_string());
        t.insert(tags::SERVICE_UID.into(), svc.uid.clone());
        t.insert(tags::RESOURCE.into(), resource);
        t
    };

    let load_balancer = load_balancer(&svc, &lb_spec, cfg, base_tags("lb".into()));

    // Targets shared by every instance target group.
    let mut instances = Vec::new();
    let mut skipped_nodes = Vec::new();
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        match node_eligibility(node, &lb_spec.target_node_labels) {
            NodeEligibility::Eligible { instance_id } => instances.push(instance_id),
            NodeEligibility::Ineligible { .. } => {}
            NodeEligibility::NoInstanceId { provider_id } => skipped_nodes.push(SkippedNode {
                node: name,
                reason: match provider_id {
                    Some(p) => format!("spec.providerID {p:?} is not aws:///<zone>/i-<id>"),
                    None => "no spec.providerID".to_string(),
                },
            }),
        }
    }
    instances.sort();
    instances.dedup();
    let tg_ip_address_type = target_group_ip_address_type(spec, &lb_spec)?;
    let slices: Vec<&EndpointSlice> = endpoint_slices
        .iter()
        .filter(|s| {
            slice_of(s, &svc.namespace, &svc.name)
                && s.address_type == tg_ip_address_type.slice_address_type()
        })
        .collect();

    let mut listeners = Vec::new();
    let mut target_groups = Vec::new();
    let mut backend_ports = BTreeSet::new();
    for (number, group) in group_ports(ports)? {
        if lb_spec.target_type == TargetType::Instance && group.node_port == 0 {
            return Err(DesiredError::InvalidService {
                field: "spec.ports".into(),
                problem: format!(
                    "port {number} has no nodePort (allocateLoadBalancerNodePorts: false?); instance targets need one, or use aws-load-balancer-nlb-target-type: ip"
                ),
            });
        }
        let listener_protocol = match group.protocol {
            Protocol::Tcp if lb_spec.tls_ports.contains(&number) => Protocol::Tls,
            p => p,
        };
        let tg_protocol = match listener_protocol {
            Protocol::Tls if lb_spec.backend_protocol == BackendProtocol::Ssl => Protocol::Tls,
            Protocol::Tls => Protocol::Tcp,
            p => p,
        };
        let number_str = number.to_string();
        let mut name_inputs = vec![
            cfg.cluster_name.as_str(),
            &svc.uid,
            &load_balancer.name,
            &number_str,
            tg_protocol.as_str(),
            lb_spec.target_type.as_str(),
        ];
        // Only a non-default family joins the hash: existing ipv4 groups keep their names.
        if tg_ip_address_type != TargetGroupIpAddressType::Ipv4 {
            name_inputs.push(tg_ip_address_type.as_str());
        }
        let tg_name = resource_name(&svc.namespace, &svc.name, &name_inputs);
        let (targets, pod_ports) = match lb_spec.target_type {
            TargetType::Instance => (
                instances
                    .iter()
                    .map(|id| Target {
                        id: id.clone(),
                        port: group.node_port,
                    })
                    .collect(),
                BTreeSet::new(),
            ),
            TargetType::Ip => {
                let backends = pod_backends(&slices, group.first, tg_ip_address_type);
                (backends.targets, backends.ports)
            }
        };
        let health_check = health_check(
            lb_spec.target_type,
            health_check_node_port,
            cfg.node_health_port,
            &lb_spec,
        );
        check_timeout_within_interval(&health_check, &lb_spec)?;
        // Not from the targets: a node or pod coming, going or turning
        // unready must never change security-group rules.
        let traffic_ports: BTreeSet<u16> = match lb_spec.target_type {
            TargetType::Instance => BTreeSet::from([group.node_port]),
            TargetType::Ip => pod_ports,
        };
        for port in &traffic_ports {
            for proto in ip_protocols(tg_protocol) {
                backend_ports.insert((*proto, *port, "traffic"));
            }
            if health_check.port == HealthCheckPort::TrafficPort {
                backend_ports.insert((IpProtocol::Tcp, *port, "health"));
            }
        }
        if let HealthCheckPort::Port(p) = health_check.port {
            backend_ports.insert((IpProtocol::Tcp, p, "health"));
        }
        let mut attributes = tg_attribute_defaults(lb_spec.target_type, tg_protocol);
        attributes.extend(lb_spec.tg_attributes.clone());
        target_groups.push(TargetGroup {
            name: tg_name.clone(),
            port: number,
            protocol: tg_protocol,
            target_type: lb_spec.target_type,
            ip_address_type: tg_ip_address_type,
            health_check,
            attributes,
            targets,
            tags: base_tags(format!("tg-{number}-{}", tg_protocol.tag_str())),
        });
        let tls = listener_protocol == Protocol::Tls;
        listeners.push(Listener {
            port: number,
            protocol: listener_protocol,
            certificates: if tls {
                lb_spec.ssl_certificates.clone()
            } else {
                Vec::new()
            },
            ssl_policy: tls.then(|| lb_spec.ssl_negotiation_policy.clone()),
            // `None` is how AWS reports no policy; one spelling, so that the
            // plan compares like with like.
            alpn_policy: lb_spec
                .alpn_policy
                .filter(|p| tls && *p != AlpnPolicy::None),
            target_group: tg_name,
            attributes: {
                let mut attributes = listener_attribute_defaults(listener_protocol);
                if let Some(set) = lb_spec
                    .listener_attributes
                    .get(&(listener_protocol, number))
                {
                    attributes.extend(set.clone());
                }
                attributes
            },
        });
    }

    let frontend_security_group = lb_spec.security_groups.is_empty().then(|| SecurityGroup {
        name: resource_name(
            &svc.namespace,
            &svc.name,
            &[&cfg.cluster_name, &svc.uid, "sg"],
        ),
        description: format!("Causeway NLB frontend for Service {svc}"),
        ingress: frontend_rules(&svc, &listeners, &source_ranges, &lb_spec),
        tags: base_tags("sg".into()),
    });
    let backend_rules = if lb_spec.manage_backend_sg_rules {
        backend_rules(&svc, &lb_spec, backend_ports)
    } else {
        Vec::new()
    };

    Ok(Desired {
        service: svc,
        load_balancer,
        listeners,
        target_groups,
        frontend_security_group,
        backend_rules,
        skipped_nodes,
        ignored_annotations: lb_spec.ignored,
    })
}

fn load_balancer(
    svc: &ServiceRef,
    spec: &LbSpec,
    cfg: &ClusterConfig,
    tags: BTreeMap<String, String>,
) -> LoadBalancer {
    let (name, name_is_generated) = match &spec.name {
        Some(n) => (n.clone(), false),
        None => (
            resource_name(
                &svc.namespace,
                &svc.name,
                &[&cfg.cluster_name, &svc.uid, spec.scheme.as_str()],
            ),
            true,
        ),
    };
    let subnets = if spec.subnets.is_empty() {
        SubnetSelection::Discover
    } else {
        SubnetSelection::Explicit(
            spec.subnets
                .iter()
                .enumerate()
                .map(|(i, subnet)| SubnetMapping {
                    subnet: subnet.clone(),
                    allocation_id: spec.eip_allocations.get(i).cloned(),
                    private_ipv4: spec.private_ipv4_addresses.get(i).copied(),
                    ipv6: spec.ipv6_addresses.get(i).copied(),
                })
                .collect(),
        )
    };
    let mut security_groups: Vec<SecurityGroupSelection> = if spec.security_groups.is_empty() {
        vec![SecurityGroupSelection::Managed]
    } else {
        spec.security_groups
            .iter()
            .cloned()
            .map(SecurityGroupSelection::User)
            .collect()
    };
    security_groups.extend(
        spec.extra_security_groups
            .iter()
            .cloned()
            .map(SecurityGroupSelection::User),
    );
    security_groups.sort();
    security_groups.dedup();
    let mut attributes = lb_attribute_defaults(spec.scheme);
    attributes.extend(spec.lb_attributes.clone());
    LoadBalancer {
        name,
        name_is_generated,
        scheme: spec.scheme,
        ip_address_type: spec.ip_address_type,
        subnets,
        security_groups,
        attributes,
        // AWS's default is "on"; removing the annotation restores it.
        enforce_sg_inbound_rules_on_private_link: spec
            .enforce_sg_inbound_rules_on_private_link
            .unwrap_or(true),
        tags,
    }
}

/// Service ports sharing one number (one listener, one target group).
struct PortGroup<'a> {
    protocol: Protocol,
    node_port: u16,
    /// The first Service port of the group (TCP for TCP_UDP): its name and
    /// target port select pod ports for ip targets.
    first: &'a ServicePort,
}

fn group_ports(ports: &[ServicePort]) -> Result<BTreeMap<u16, PortGroup<'_>>, DesiredError> {
    let mut by_number: BTreeMap<u16, Vec<&ServicePort>> = BTreeMap::new();
    for p in ports {
        let number = u16::try_from(p.port).map_err(|_| DesiredError::InvalidService {
            field: "spec.ports".into(),
            problem: format!("port {} is not a valid port number", p.port),
        })?;
        by_number.entry(number).or_default().push(p);
    }
    let mut out = BTreeMap::new();
    for (number, mut group) in by_number {
        // TCP first, so a TCP_UDP group takes the TCP port's name.
        group.sort_by_key(|p| p.protocol.as_deref() != Some("TCP") && p.protocol.is_some());
        let mut protocols = BTreeSet::new();
        for p in &group {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            if proto != "TCP" && proto != "UDP" {
                return Err(DesiredError::InvalidService {
                    field: "spec.ports".into(),
                    problem: format!(
                        "port {number} uses {proto}; a Network Load Balancer carries TCP and UDP only"
                    ),
                });
            }
            protocols.insert(proto);
        }
        let node_ports: BTreeSet<i32> = group.iter().filter_map(|p| p.node_port).collect();
        let node_port = match node_ports.iter().collect::<Vec<_>>()[..] {
            [one] => u16::try_from(*one).unwrap_or(0),
            [] => 0,
            _ => {
                return Err(DesiredError::InvalidService {
                    field: "spec.ports".into(),
                    problem: format!(
                        "TCP and UDP port {number} share one TCP_UDP listener, so they need the same nodePort (have {}); set nodePort explicitly on both",
                        node_ports
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ),
                });
            }
        };
        let protocol = if protocols.len() == 2 {
            Protocol::TcpUdp
        } else if protocols.contains("UDP") {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        out.insert(
            number,
            PortGroup {
                protocol,
                node_port,
                first: group[0],
            },
        );
    }
    Ok(out)
}

/// Whether `slice` belongs to the Service `namespace/name`.
pub fn slice_of(slice: &EndpointSlice, namespace: &str, name: &str) -> bool {
    slice.metadata.namespace.as_deref() == Some(namespace)
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .is_some_and(|n| n == name)
}

/// ip targets follow the Service's IP families, as in
/// aws-load-balancer-controller: with IPv6 among them and a dualstack NLB, the
/// target groups are `ipv6` (an `ipv4` NLB cannot forward to IPv6 targets);
/// otherwise `ipv4`. An IPv6-only Service on an `ipv4` NLB has no usable pod
/// address, which is an error rather than an empty target group.
fn target_group_ip_address_type(
    spec: &ServiceSpec,
    lb_spec: &LbSpec,
) -> Result<TargetGroupIpAddressType, DesiredError> {
    if lb_spec.target_type != TargetType::Ip {
        return Ok(TargetGroupIpAddressType::Ipv4);
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    let ipv6 = families.iter().any(|f| f == "IPv6");
    // The API server always sets ipFamilies; unset means the IPv4 default.
    let ipv4 = families.is_empty() || families.iter().any(|f| f == "IPv4");
    match (ipv6, ipv4, lb_spec.ip_address_type) {
        (true, _, IpAddressType::Dualstack) => Ok(TargetGroupIpAddressType::Ipv6),
        (_, true, _) => Ok(TargetGroupIpAddressType::Ipv4),
        _ => Err(DesiredError::InvalidService {
            field: "spec.ipFamilies".into(),
            problem: format!(
                "the Service is IPv6-only, and ip targets on IPv6 pod addresses need a dualstack load balancer: set {}: dualstack",
                annotations::keys::IP_ADDRESS_TYPE
            ),
        }),
    }
}

/// What one Service port reaches through its slices.
struct PodBackends {
    /// Ready endpoints on their pod port: sorted, without duplicates.
    targets: Vec<Target>,
    /// Every pod port the slices publish for the Service port, ready or not
    /// (the backend security-group rules), else a numeric targetPort.
    ports: BTreeSet<u16>,
}

/// The ip targets of one Service port, ready endpoints only: the slice
/// port with the Service port's name and protocol gives the pod port (a named
/// targetPort can resolve differently per slice); a slice without that port
/// does not serve it. Only the first address of an endpoint counts (the API
/// says they are fungible), only ready and not terminating endpoints (`ready`
/// unset means unknown, taken as ready as the API asks), and only addresses
/// of the target group's family.
fn pod_backends(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    family: TargetGroupIpAddressType,
) -> PodBackends {
    let mut targets = BTreeSet::new();
    let mut ports = BTreeSet::new();
    let want_name = port.name.as_deref().unwrap_or("");
    let want_protocol = port.protocol.as_deref().unwrap_or("TCP");
    for slice in slices {
        let number = slice
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| {
                p.name.as_deref().unwrap_or("") == want_name
                    && p.protocol.as_deref().unwrap_or("TCP") == want_protocol
            })
            .and_then(|p| p.port)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0);
        let Some(number) = number else { continue };
        ports.insert(number);
        for ep in &slice.endpoints {
            let conditions = ep.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            let Some(address) = ep.addresses.first() else {
                continue;
            };
            // Canonical text, so the same address always compares equal.
            let id = match family {
                TargetGroupIpAddressType::Ipv4 => {
                    address.parse::<Ipv4Addr>().ok().map(|ip| ip.to_string())
                }
                TargetGroupIpAddressType::Ipv6 => {
                    address.parse::<Ipv6Addr>().ok().map(|ip| ip.to_string())
                }
            };
            if let Some(id) = id {
                targets.insert(Target { id, port: number });
            }
        }
    }
    if ports.is_empty()
        && let Some(IntOrString::Int(n)) = &port.target_port
        && let Ok(n) = u16::try_from(*n)
        && n > 0
    {
        ports.insert(n);
    }
    PodBackends {
        targets: targets.into_iter().collect(),
        ports,
    }
}

/// SPEC 1.2 health-check defaults, then the annotation overrides.
fn health_check(
    target_type: TargetType,
    health_check_node_port: Option<u16>,
    node_health_port: u16,
    spec: &LbSpec,
) -> HealthCheck {
    let http = |port: u16, healthy: u8, unhealthy: u8| HealthCheck {
        protocol: HealthCheckProtocol::Http,
        port: HealthCheckPort::Port(port),
        path: Some(HEALTH_PATH.into()),
        interval_seconds: 10,
        timeout_seconds: 6,
        healthy_threshold: healthy,
        unhealthy_threshold: unhealthy,
        success_codes: Some(DEFAULT_SUCCESS_CODES.into()),
    };
    let mut hc = match (target_type, health_check_node_port) {
        (TargetType::Ip, _) => HealthCheck {
            protocol: HealthCheckProtocol::Tcp,
            port: HealthCheckPort::TrafficPort,
            path: None,
            interval_seconds: 10,
            timeout_seconds: 10,
            healthy_threshold: 3,
            unhealthy_threshold: 3,
            success_codes: None,
        },
        (TargetType::Instance, Some(port)) => http(port, 2, 2),
        (TargetType::Instance, None) => http(node_health_port, 3, 3),
    };
    let o = &spec.health_check;
    if let Some(protocol) = o.protocol {
        hc.protocol = protocol;
        if protocol == HealthCheckProtocol::Tcp {
            hc.path = None;
            hc.success_codes = None;
        } else {
            hc.path.get_or_insert_with(|| "/".into());
            hc.success_codes
                .get_or_insert_with(|| DEFAULT_SUCCESS_CODES.into());
        }
    }
    if let Some(port) = o.port {
        hc.port = port;
    }
    if hc.protocol != HealthCheckProtocol::Tcp {
        if let Some(path) = &o.path {
            hc.path = Some(path.clone());
        }
        if let Some(codes) = &o.success_codes {
            hc.success_codes = Some(codes.clone());
        }
    }
    hc.interval_seconds = o.interval_seconds.unwrap_or(hc.interval_seconds);
    hc.timeout_seconds = o.timeout_seconds.unwrap_or(hc.timeout_seconds);
    hc.healthy_threshold = o.healthy_threshold.unwrap_or(hc.healthy_threshold);
    hc.unhealthy_threshold = o.unhealthy_threshold.unwrap_or(hc.unhealthy_threshold);
    hc
}

/// ELBv2 refuses a health-check timeout longer than the interval. The two
/// annotations are valid alone (or with the other's default), so the pair is
/// checked here, before any AWS write; the error names the one that was set
/// (the timeout when both were).
fn check_timeout_within_interval(hc: &HealthCheck, spec: &LbSpec) -> Result<(), DesiredError> {
    if hc.timeout_seconds <= hc.interval_seconds {
        return Ok(());
    }
    let (key, value, other) = if spec.health_check.timeout_seconds.is_some() {
        (
            annotations::keys::HEALTHCHECK_TIMEOUT,
            hc.timeout_seconds,
            annotations::keys::HEALTHCHECK_INTERVAL,
        )
    } else {
        (
            annotations::keys::HEALTHCHECK_INTERVAL,
            hc.interval_seconds,
            annotations::keys::HEALTHCHECK_TIMEOUT,
        )
    };
    Err(DesiredError::InvalidAnnotations(AnnotationErrors(vec![
        AnnotationError {
            key: key.to_string(),
            value: value.to_string(),
            accepted: format!(
                "a health-check timeout no longer than its interval (here timeout {} s, interval {} s)",
                hc.timeout_seconds, hc.interval_seconds
            ),
            kind: ErrorKind::Conflict(other.to_string()),
        },
    ])))
}

/// ELBv2 defaults for every NLB attribute the `attributes` annotation accepts
/// (and the keys other annotations set): what a new LB has before any
/// ModifyLoadBalancerAttributes, and what removing an annotation restores.
/// `secondary_ips.auto_assigned.per_subnet` is absent on purpose: AWS cannot
/// lower it once raised, so it keeps its last value.
pub fn lb_attribute_defaults(scheme: Scheme) -> BTreeMap<String, String> {
    // AWS blocks internet-gateway IPv6 traffic to internal NLBs by default.
    let deny_igw = match scheme {
        Scheme::Internal => "true",
        Scheme::InternetFacing => "false",
    };
    [
        ("access_logs.s3.bucket", ""),
        ("access_logs.s3.enabled", "false"),
        ("access_logs.s3.prefix", ""),
        ("deletion_protection.enabled", "false"),
        ("dns_record.client_routing_policy", "any_availability_zone"),
        ("ipv6.deny_all_igw_traffic", deny_igw),
        ("load_balancing.cross_zone.enabled", "false"),
        ("zonal_shift.config.enabled", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// ELBv2 defaults for every TG attribute the `target-group-attributes`
/// annotation accepts, so removing an annotation restores the default instead
/// of leaving the old value. Also what a new target group has, so creating one
/// with defaults needs no extra call.
pub fn tg_attribute_defaults(
    target_type: TargetType,
    protocol: Protocol,
) -> BTreeMap<String, String> {
    let udp = matches!(protocol, Protocol::Udp | Protocol::TcpUdp);
    let preserve_client_ip = match (target_type, protocol) {
        (TargetType::Instance, _) | (TargetType::Ip, Protocol::Udp | Protocol::TcpUdp) => "true",
        (TargetType::Ip, _) => "false",
    };
    let mut defaults: BTreeMap<String, String> = [
        (
            "deregistration_delay.connection_termination.enabled",
            "false",
        ),
        ("deregistration_delay.timeout_seconds", "300"),
        (
            "load_balancing.cross_zone.enabled",
            "use_load_balancer_configuration",
        ),
        ("preserve_client_ip.enabled", preserve_client_ip),
        ("proxy_protocol_v2.enabled", "false"),
        ("stickiness.enabled", "false"),
        ("stickiness.type", "source_ip"),
        (
            "target_group_health.dns_failover.minimum_healthy_targets.count",
            "1",
        ),
        (
            "target_group_health.dns_failover.minimum_healthy_targets.percentage",
            "off",
        ),
        (
            "target_group_health.unhealthy_state_routing.minimum_healthy_targets.count",
            "1",
        ),
        (
            "target_group_health.unhealthy_state_routing.minimum_healthy_targets.percentage",
            "off",
        ),
        (
            "target_health_state.unhealthy.draining_interval_seconds",
            "0",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    // AWS terminates connections to unhealthy TCP/TLS targets by default; UDP
    // groups cannot enable it, and their default is not documented, so the
    // key is left alone there.
    if !udp {
        defaults.insert(
            "target_health_state.unhealthy.connection_termination.enabled".into(),
            "true".into(),
        );
    }
    defaults
}

/// ELBv2 defaults for listener attributes: the TCP idle timeout of a TCP
/// listener is 350 s. Other listeners have no attribute we manage.
pub fn listener_attribute_defaults(protocol: Protocol) -> BTreeMap<String, String> {
    match protocol {
        Protocol::Tcp => BTreeMap::from([("tcp.idle_timeout.seconds".into(), "350".into())]),
        _ => BTreeMap::new(),
    }
}

/// `spec.loadBalancerSourceRanges`, else the legacy annotation, else everyone.
fn source_ranges(
    spec_ranges: Option<&[String]>,
    lb_spec: &LbSpec,
) -> Result<Vec<Cidr>, DesiredError> {
    let mut out = Vec::new();
    match spec_ranges.filter(|r| !r.is_empty()) {
        Some(ranges) => {
            for r in ranges {
                out.push(Cidr::parse(r).ok_or_else(|| DesiredError::InvalidService {
                    field: "spec.loadBalancerSourceRanges".into(),
                    problem: format!("{r:?} is not a CIDR (e.g. 203.0.113.0/24)"),
                })?);
            }
        }
        None => match &lb_spec.source_ranges {
            Some(ranges) if !ranges.is_empty() => out.extend(ranges.iter().copied()),
            _ => {
                out.push(Cidr::ANY_V4);
                if lb_spec.ip_address_type == IpAddressType::Dualstack {
                    out.push(Cidr::ANY_V6);
                }
            }
        },
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn ip_protocols(p: Protocol) -> &'static [IpProtocol] {
    match p {
        Protocol::Tcp | Protocol::Tls => &[IpProtocol::Tcp],
        Protocol::Udp => &[IpProtocol::Udp],
        Protocol::TcpUdp => &[IpProtocol::Tcp, IpProtocol::Udp],
    }
}

/// Managed frontend SG: listener ports from the source ranges (and prefix lists).
fn frontend_rules(
    svc: &ServiceRef,
    listeners: &[Listener],
    ranges: &[Cidr],
    spec: &LbSpec,
) -> Vec<SgRule> {
    let mut sources: Vec<RuleSource> = ranges.iter().copied().map(RuleSource::Cidr).collect();
    sources.extend(
        spec.security_group_prefix_lists
            .iter()
            .cloned()
            .map(RuleSource::PrefixList),
    );
    let mut rules = BTreeSet::new();
    for l in listeners {
        for proto in ip_protocols(l.protocol) {
            for source in &sources {
                rules.insert(SgRule {
                    protocol: *proto,
                    from_port: i32::from(l.port),
                    to_port: i32::from(l.port),
                    source: source.clone(),
                    description: format!(
                        "causeway {} listener {}/{}",
                        svc.uid,
                        l.port,
                        proto.as_str()
                    ),
                });
            }
        }
    }
    if spec.icmp_path_mtu_discovery {
        for cidr in ranges {
            // "Fragmentation needed" (v4 type 3 code 4) / "packet too big" (v6 type 2).
            let (protocol, icmp_type, code) = if cidr.is_ipv6() {
                (IpProtocol::Icmpv6, 2, 0)
            } else {
                (IpProtocol::Icmp, 3, 4)
            };
            rules.insert(SgRule {
                protocol,
                from_port: icmp_type,
                to_port: code,
                source: RuleSource::Cidr(*cidr),
                description: format!("causeway {} path MTU discovery", svc.uid),
            });
        }
    }
    rules.into_iter().collect()
}

/// Node SG rules: NodePorts (or pod ports) and health ports, from the NLB's SGs only.
fn backend_rules(
    svc: &ServiceRef,
    spec: &LbSpec,
    ports: BTreeSet<(IpProtocol, u16, &'static str)>,
) -> Vec<SgRule> {
    let sources: Vec<RuleSource> = if spec.security_groups.is_empty() {
        vec![RuleSource::ManagedSecurityGroup]
    } else {
        spec.security_groups
            .iter()
            .cloned()
            .map(RuleSource::SecurityGroup)
            .collect()
    };
    // One rule per (protocol, port, source): a port used both for traffic and
    // health needs a single rule.
    let mut rules: BTreeMap<(IpProtocol, u16, RuleSource), SgRule> = BTreeMap::new();
    for (proto, port, what) in ports {
        for source in &sources {
            rules
                .entry((proto, port, source.clone()))
                .or_insert_with(|| SgRule {
                    protocol: proto,
                    from_port: i32::from(port),
                    to_port: i32::from(port),
                    source: source.clone(),
                    description: format!("causeway {} {what} {port}/{}", svc.uid, proto.as_str()),
                });
        }
    }
    rules.into_values().collect()
}

#[cfg(test)]
mod tests;

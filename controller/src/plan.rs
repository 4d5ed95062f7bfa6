//! `plan = diff(desired, observed)`: the ordered AWS actions that take one
//! Service's resources from what the adapter observed to what `desired` says
//! (SPEC 1.4). Pure: no I/O. The same list is what `causeway-controller plan`
//! prints and what the adapter executes.
//!
//! Order matters and is fixed here, not in the adapter:
//! 1. LBs that block the desired one (same name, different scheme) are deleted;
//! 2. targets of ineligible nodes are deregistered first (drain-safe);
//! 3. the frontend SG and its rules, then the node-SG rules, exist before the
//!    NLB (an NLB's SGs can only be set at creation);
//! 4. the NLB (created, or changed in place: attributes, security groups,
//!    subnets, then dualstack), its target groups and targets, then listeners
//!    (a listener needs both ends); back to ipv4 only after the listeners have
//!    left any ipv6 target group;
//! 5. whatever is no longer desired goes last, in the deletion order
//!    listeners → LBs → TGs → SG rules → SGs, so a replacement is created
//!    before the old resource is deleted.
//!
//! `desired = None` means "the Service should have nothing" (deleted or no
//! longer ours): the plan is the deletion state machine over whatever is observed,
//! so a deletion that stopped half-way just continues.

use std::collections::BTreeMap;
use std::fmt;

use crate::desired::{lb_attribute_defaults, listener_attribute_defaults, tg_attribute_defaults};
use crate::model::{
    Desired, HealthCheck, IpAddressType, Listener, LoadBalancer, Observed, ObservedListener,
    ObservedLoadBalancer, ObservedSgRule, ObservedTargetGroup, Protocol, SecurityGroup,
    SecurityGroupSelection, SgRule, SubnetMapping, SubnetRef, SubnetSelection, Target, TargetGroup,
};

/// An ELBv2 resource: one that exists (by ARN), or one an earlier action of the
/// same plan creates (by name; the adapter learns its ARN when it creates it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ref {
    Arn(String),
    New(String),
}

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ref::Arn(arn) => f.write_str(arn),
            Ref::New(name) => write!(f, "{name} (new)"),
        }
    }
}

/// A security group an action works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SgRef {
    /// An existing group (the managed frontend SG).
    Id(String),
    /// The managed frontend SG created earlier in this plan.
    New(String),
    /// The cluster's node SG, which the adapter finds by the cluster tag.
    Nodes,
}

impl fmt::Display for SgRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SgRef::Id(id) => f.write_str(id),
            SgRef::New(name) => write!(f, "{name} (new)"),
            SgRef::Nodes => f.write_str("node security group"),
        }
    }
}

/// One AWS change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    CreateSecurityGroup {
        name: String,
        description: String,
        tags: BTreeMap<String, String>,
    },
    AuthorizeIngress {
        group: SgRef,
        rules: Vec<SgRule>,
    },
    RevokeIngress {
        group: SgRef,
        rules: Vec<ObservedSgRule>,
    },
    /// The LB with its subnets resolved (discovered ones included) and its SGs.
    CreateLoadBalancer {
        load_balancer: LoadBalancer,
        subnets: Vec<SubnetMapping>,
    },
    ModifyLoadBalancerAttributes {
        load_balancer: Ref,
        attributes: BTreeMap<String, String>,
    },
    /// The security groups of an existing NLB, and whether they also filter
    /// PrivateLink traffic (both are one ELBv2 call).
    SetSecurityGroups {
        load_balancer: Ref,
        security_groups: Vec<SecurityGroupSelection>,
        enforce_inbound_rules_on_private_link: bool,
    },
    /// The subnets of an existing NLB.
    SetSubnets {
        load_balancer: Ref,
        subnets: Vec<SubnetMapping>,
    },
    SetIpAddressType {
        load_balancer: Ref,
        ip_address_type: IpAddressType,
    },
    /// Targets are registered by a separate [`Action::RegisterTargets`];
    /// `target_group.targets` is empty here.
    CreateTargetGroup {
        target_group: TargetGroup,
    },
    ModifyTargetGroupHealthCheck {
        target_group: Ref,
        health_check: HealthCheck,
    },
    ModifyTargetGroupAttributes {
        target_group: Ref,
        attributes: BTreeMap<String, String>,
    },
    RegisterTargets {
        target_group: Ref,
        targets: Vec<Target>,
    },
    DeregisterTargets {
        target_group: Ref,
        targets: Vec<Target>,
    },
    CreateListener {
        load_balancer: Ref,
        listener: Listener,
        target_group: Ref,
    },
    ModifyListener {
        arn: String,
        listener: Listener,
        target_group: Ref,
    },
    /// SNI certificates beside the default one, on a listener that exists
    /// (`Ref::Arn`) or that this plan creates (`Ref::New(listener_key(port))`).
    AddListenerCertificates {
        listener: Ref,
        port: u16,
        certificates: Vec<String>,
    },
    RemoveListenerCertificates {
        arn: String,
        port: u16,
        certificates: Vec<String>,
    },
    /// A listener that exists (`Ref::Arn`) or that this plan creates
    /// (`Ref::New(listener_key(port))`).
    ModifyListenerAttributes {
        listener: Ref,
        port: u16,
        attributes: BTreeMap<String, String>,
    },
    AddTags {
        resource: Ref,
        tags: BTreeMap<String, String>,
    },
    RemoveTags {
        resource: Ref,
        keys: Vec<String>,
    },
    /// Tags of the managed frontend security group (EC2 `CreateTags`).
    TagSecurityGroup {
        id: String,
        tags: BTreeMap<String, String>,
    },
    /// EC2 `DeleteTags` on the managed frontend security group.
    UntagSecurityGroup {
        id: String,
        keys: Vec<String>,
    },
    DeleteListener {
        arn: String,
        port: u16,
    },
    DeleteLoadBalancer {
        arn: String,
        name: String,
    },
    DeleteTargetGroup {
        arn: String,
        name: String,
    },
    DeleteSecurityGroup {
        id: String,
        name: String,
    },
}

impl Action {
    /// The ELBv2/EC2 operation, as counted by the adapter's metrics.
    pub fn operation(&self) -> &'static str {
        match self {
            Action::CreateSecurityGroup { .. } => "CreateSecurityGroup",
            Action::AuthorizeIngress { .. } => "AuthorizeSecurityGroupIngress",
            Action::RevokeIngress { .. } => "RevokeSecurityGroupIngress",
            Action::CreateLoadBalancer { .. } => "CreateLoadBalancer",
            Action::ModifyLoadBalancerAttributes { .. } => "ModifyLoadBalancerAttributes",
            Action::SetSecurityGroups { .. } => "SetSecurityGroups",
            Action::SetSubnets { .. } => "SetSubnets",
            Action::SetIpAddressType { .. } => "SetIpAddressType",
            Action::CreateTargetGroup { .. } => "CreateTargetGroup",
            Action::ModifyTargetGroupHealthCheck { .. } => "ModifyTargetGroup",
            Action::ModifyTargetGroupAttributes { .. } => "ModifyTargetGroupAttributes",
            Action::RegisterTargets { .. } => "RegisterTargets",
            Action::DeregisterTargets { .. } => "DeregisterTargets",
            Action::CreateListener { .. } => "CreateListener",
            Action::ModifyListener { .. } => "ModifyListener",
            Action::AddListenerCertificates { .. } => "AddListenerCertificates",
            Action::RemoveListenerCertificates { .. } => "RemoveListenerCertificates",
            Action::ModifyListenerAttributes { .. } => "ModifyListenerAttributes",
            Action::AddTags { .. } => "AddTags",
            Action::RemoveTags { .. } => "RemoveTags",
            Action::TagSecurityGroup { .. } => "CreateTags",
            Action::UntagSecurityGroup { .. } => "DeleteTags",
            Action::DeleteListener { .. } => "DeleteListener",
            Action::DeleteLoadBalancer { .. } => "DeleteLoadBalancer",
            Action::DeleteTargetGroup { .. } => "DeleteTargetGroup",
            Action::DeleteSecurityGroup { .. } => "DeleteSecurityGroup",
        }
    }

    /// True for actions that only move targets: a plan made of these alone
    /// is a node change, which the reconciler applies without re-reading AWS.
    pub fn is_target_change(&self) -> bool {
        matches!(
            self,
            Action::RegisterTargets { .. } | Action::DeregisterTargets { .. }
        )
    }
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn pairs(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::CreateSecurityGroup { name, .. } => {
                write!(f, "create security group {name}")
            }
            Action::AuthorizeIngress { group, rules } => {
                write!(f, "authorize on {group}: {}", join(rules))
            }
            Action::RevokeIngress { group, rules } => {
                let rules: Vec<&SgRule> = rules.iter().map(|r| &r.rule).collect();
                write!(f, "revoke on {group}: {}", join(&rules))
            }
            Action::CreateLoadBalancer {
                load_balancer,
                subnets,
            } => {
                let subnets: Vec<&SubnetRef> = subnets.iter().map(|s| &s.subnet).collect();
                write!(
                    f,
                    "create load balancer {} ({}, {}, subnets {}, security groups {})",
                    load_balancer.name,
                    load_balancer.scheme,
                    load_balancer.ip_address_type,
                    join(&subnets),
                    join(&load_balancer.security_groups)
                )
            }
            Action::ModifyLoadBalancerAttributes {
                load_balancer,
                attributes,
            } => write!(
                f,
                "set attributes of load balancer {load_balancer}: {}",
                pairs(attributes)
            ),
            Action::SetSecurityGroups {
                load_balancer,
                security_groups,
                enforce_inbound_rules_on_private_link,
            } => write!(
                f,
                "set security groups of load balancer {load_balancer}: {} (PrivateLink traffic filtered: {})",
                join(security_groups),
                if *enforce_inbound_rules_on_private_link {
                    "on"
                } else {
                    "off"
                }
            ),
            Action::SetSubnets {
                load_balancer,
                subnets,
            } => {
                let subnets: Vec<&SubnetRef> = subnets.iter().map(|s| &s.subnet).collect();
                write!(
                    f,
                    "set subnets of load balancer {load_balancer}: {}",
                    join(&subnets)
                )
            }
            Action::SetIpAddressType {
                load_balancer,
                ip_address_type,
            } => write!(
                f,
                "set IP address type of load balancer {load_balancer}: {ip_address_type}"
            ),
            Action::CreateTargetGroup { target_group: tg } => write!(
                f,
                "create target group {} ({} {} {} targets, health check {})",
                tg.name, tg.protocol, tg.port, tg.target_type, tg.health_check
            ),
            Action::ModifyTargetGroupHealthCheck {
                target_group,
                health_check,
            } => write!(
                f,
                "set health check of target group {target_group}: {health_check}"
            ),
            Action::ModifyTargetGroupAttributes {
                target_group,
                attributes,
            } => write!(
                f,
                "set attributes of target group {target_group}: {}",
                pairs(attributes)
            ),
            Action::RegisterTargets {
                target_group,
                targets,
            } => write!(
                f,
                "register in target group {target_group}: {}",
                join(targets)
            ),
            Action::DeregisterTargets {
                target_group,
                targets,
            } => write!(
                f,
                "deregister from target group {target_group}: {}",
                join(targets)
            ),
            Action::CreateListener {
                load_balancer,
                listener,
                target_group,
            } => write!(
                f,
                "create listener {} {} on {load_balancer} → {target_group}",
                listener.protocol, listener.port
            ),
            Action::ModifyListener {
                arn,
                listener,
                target_group,
            } => write!(
                f,
                "modify listener {arn}: {} {} → {target_group}",
                listener.protocol, listener.port
            ),
            Action::AddListenerCertificates {
                listener,
                port,
                certificates,
            } => match listener {
                Ref::Arn(arn) => write!(
                    f,
                    "add certificates to listener {port} ({arn}): {}",
                    certificates.join(", ")
                ),
                Ref::New(_) => write!(
                    f,
                    "add certificates to listener {port} (new): {}",
                    certificates.join(", ")
                ),
            },
            Action::RemoveListenerCertificates {
                arn,
                port,
                certificates,
            } => write!(
                f,
                "remove certificates from listener {port} ({arn}): {}",
                certificates.join(", ")
            ),
            Action::ModifyListenerAttributes {
                listener,
                port,
                attributes,
            } => match listener {
                Ref::Arn(arn) => write!(
                    f,
                    "set attributes of listener {port} ({arn}): {}",
                    pairs(attributes)
                ),
                Ref::New(_) => write!(
                    f,
                    "set attributes of listener {port} (new): {}",
                    pairs(attributes)
                ),
            },
            Action::AddTags { resource, tags } => {
                write!(f, "tag {resource}: {}", pairs(tags))
            }
            Action::TagSecurityGroup { id, tags } => {
                write!(f, "tag security group {id}: {}", pairs(tags))
            }
            Action::UntagSecurityGroup { id, keys } => {
                write!(f, "untag security group {id}: {}", keys.join(", "))
            }
            Action::RemoveTags { resource, keys } => {
                write!(f, "untag {resource}: {}", keys.join(", "))
            }
            Action::DeleteListener { arn, port } => write!(f, "delete listener {port} ({arn})"),
            Action::DeleteLoadBalancer { arn, name } => {
                write!(f, "delete load balancer {name} ({arn})")
            }
            Action::DeleteTargetGroup { arn, name } => {
                write!(f, "delete target group {name} ({arn})")
            }
            Action::DeleteSecurityGroup { id, name } => {
                write!(f, "delete security group {name} ({id})")
            }
        }
    }
}

/// The actions that take `observed` to `desired` (`None`: to nothing).
/// An empty list means converged.
pub fn plan(desired: Option<&Desired>, observed: &Observed) -> Vec<Action> {
    match desired {
        Some(desired) => converge(desired, observed),
        None => delete_all(observed),
    }
}

/// A resource the plan replaces because AWS cannot make the change in place,
/// with the reason in words: what `causeway-controller plan` announces and
/// what the reconciler reports in a `ReplacingLoadBalancer` event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    /// `load balancer` or `target group <port>`.
    pub resource: String,
    pub old: String,
    pub new: String,
    pub reason: String,
    /// True when the new resource exists before the old one is deleted; false
    /// when the old one must go first (same name: ELBv2 names are unique).
    pub create_before_delete: bool,
}

impl fmt::Display for Replacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replace {} {} with {}: {} ({})",
            self.resource,
            self.old,
            self.new,
            self.reason,
            if self.create_before_delete {
                "the new one is created before the old one is deleted"
            } else {
                "same name, so the old one is deleted first"
            }
        )
    }
}

/// The replacements `plan(Some(desired), observed)` makes, explained.
/// Resources that simply go away (a removed port) are not replacements.
pub fn replacements(d: &Desired, o: &Observed) -> Vec<Replacement> {
    let want = &d.load_balancer;
    let mut out = Vec::new();
    let kept = o.load_balancers.iter().any(|lb| keeps(want, lb));
    if !kept {
        for lb in &o.load_balancers {
            let mut why = Vec::new();
            if lb.scheme != want.scheme {
                why.push(format!("scheme {} → {}", lb.scheme, want.scheme));
            }
            if lb.name != want.name && (!want.name_is_generated || !lb.name.starts_with("k8s-")) {
                why.push(format!("name {} → {}", lb.name, want.name));
            }
            if lb.name == want.name && lb.scheme == want.scheme && pins_conflict(want, lb) {
                why.push(
                    "pinned addresses (eip-allocations, private-ipv4-addresses, ipv6-addresses) cannot change on a live NLB"
                        .into(),
                );
            }
            if why.is_empty() {
                why.push(format!("name {} → {}", lb.name, want.name));
            }
            out.push(Replacement {
                resource: "load balancer".into(),
                old: lb.name.clone(),
                new: want.name.clone(),
                reason: why.join(", "),
                create_before_delete: lb.name != want.name,
            });
        }
    }
    for tg in &d.target_groups {
        for old in o
            .target_groups
            .iter()
            .filter(|t| t.port == tg.port && t.name != tg.name)
        {
            let mut why = Vec::new();
            if old.target_type != tg.target_type {
                why.push(format!(
                    "target type {} → {}",
                    old.target_type, tg.target_type
                ));
            }
            if old.protocol != tg.protocol {
                why.push(format!("protocol {} → {}", old.protocol, tg.protocol));
            }
            if why.is_empty() {
                // The name also hashes the LB name and the IP address family.
                why.push(if kept {
                    "IP address family changed".into()
                } else {
                    "its load balancer is replaced".into()
                });
            }
            out.push(Replacement {
                resource: format!("target group {}", tg.port),
                old: old.name.clone(),
                new: tg.name.clone(),
                reason: why.join(", "),
                create_before_delete: true,
            });
        }
    }
    out
}

/// Whether the plan could not create the NLB because subnet discovery found
/// nothing: the caller reports it instead of executing (SPEC 1.2).
pub fn lacks_subnets(desired: &Desired, observed: &Observed) -> bool {
    let exists = observed
        .load_balancers
        .iter()
        .any(|lb| lb.name == desired.load_balancer.name);
    !exists && resolved_subnets(&desired.load_balancer, observed).is_empty()
}

fn resolved_subnets(lb: &LoadBalancer, observed: &Observed) -> Vec<SubnetMapping> {
    match &lb.subnets {
        SubnetSelection::Explicit(mappings) => mappings.clone(),
        SubnetSelection::Discover => observed
            .discovered_subnets
            .iter()
            .flatten()
            .map(|id| SubnetMapping {
                subnet: SubnetRef::Id(id.clone()),
                allocation_id: None,
                private_ipv4: None,
                ipv6: None,
            })
            .collect(),
    }
}

/// Attributes of `desired` whose value differs from `current`, where a key
/// `current` does not report has AWS's default (moto reports only attributes
/// that were set).
fn changed_from_defaults(
    desired: &BTreeMap<String, String>,
    mut defaults: BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    defaults.extend(current.iter().map(|(k, v)| (k.clone(), v.clone())));
    changed(desired, &defaults)
}

/// Attributes of `desired` whose value differs from `current`.
fn changed(
    desired: &BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    desired
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Tags to set and tag keys to remove so that `current` becomes `desired`;
/// `aws:` tags are AWS's and stay.
fn tag_changes(
    desired: &BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let remove = current
        .keys()
        .filter(|k| !desired.contains_key(*k) && !k.starts_with("aws:"))
        .cloned()
        .collect();
    (changed(desired, current), remove)
}

/// Tag actions for one resource.
fn tag_actions(
    resource: &Ref,
    desired: &BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
    out: &mut Vec<Action>,
) {
    let (add, remove) = tag_changes(desired, current);
    if !add.is_empty() {
        out.push(Action::AddTags {
            resource: resource.clone(),
            tags: add,
        });
    }
    if !remove.is_empty() {
        out.push(Action::RemoveTags {
            resource: resource.clone(),
            keys: remove,
        });
    }
}

fn converge(d: &Desired, o: &Observed) -> Vec<Action> {
    let mut out = Vec::new();
    let want_lb = &d.load_balancer;

    // An LB is kept only if it is the desired one; anything else is replaced.
    let current_lb = o.load_balancers.iter().find(|lb| keeps(want_lb, lb));
    let (blocking, stale_lbs): (Vec<&ObservedLoadBalancer>, Vec<&ObservedLoadBalancer>) = o
        .load_balancers
        .iter()
        .filter(|lb| Some(lb.arn.as_str()) != current_lb.map(|c| c.arn.as_str()))
        .partition(|lb| lb.name == want_lb.name);
    // 1. Same name, different scheme: names are unique per region, so the old
    //    one must go before the new one can exist.
    for lb in &blocking {
        delete_load_balancer(lb, o, &mut out);
    }

    let current_tg = |tg: &TargetGroup| o.target_groups.iter().find(|t| t.name == tg.name);

    // 2. Drain first.
    for tg in &d.target_groups {
        if let Some(have) = current_tg(tg) {
            let gone: Vec<Target> = have
                .targets
                .iter()
                .filter(|t| !tg.targets.contains(t))
                .cloned()
                .collect();
            if !gone.is_empty() {
                out.push(Action::DeregisterTargets {
                    target_group: Ref::Arn(have.arn.clone()),
                    targets: gone,
                });
            }
        }
    }

    // 3. Security groups and rules.
    let current_sg = d
        .frontend_security_group
        .as_ref()
        .and_then(|want| o.security_groups.iter().find(|sg| sg.name == want.name));
    if let Some(want) = &d.frontend_security_group {
        frontend_sg_actions(want, current_sg, &mut out);
    }
    let missing_backend: Vec<SgRule> = d
        .backend_rules
        .iter()
        .filter(|r| !o.backend_rules.iter().any(|h| h.rule.same_traffic(r)))
        .cloned()
        .collect();
    if !missing_backend.is_empty() {
        out.push(Action::AuthorizeIngress {
            group: SgRef::Nodes,
            rules: missing_backend,
        });
    }

    // 4a. The load balancer.
    let lb_ref = match current_lb {
        Some(lb) => {
            let lb_ref = Ref::Arn(lb.arn.clone());
            let attributes = changed_from_defaults(
                &want_lb.attributes,
                lb_attribute_defaults(want_lb.scheme),
                &lb.attributes,
            );
            if !attributes.is_empty() {
                out.push(Action::ModifyLoadBalancerAttributes {
                    load_balancer: lb_ref.clone(),
                    attributes,
                });
            }
            // An emulator that does not report the PrivateLink setting is
            // taken to have AWS's default (on).
            let enforce_now = lb.enforce_sg_inbound_rules_on_private_link.unwrap_or(true);
            if !same_security_groups(want_lb, lb)
                || enforce_now != want_lb.enforce_sg_inbound_rules_on_private_link
            {
                out.push(Action::SetSecurityGroups {
                    load_balancer: lb_ref.clone(),
                    security_groups: want_lb.security_groups.clone(),
                    enforce_inbound_rules_on_private_link: want_lb
                        .enforce_sg_inbound_rules_on_private_link,
                });
            }
            // Subnets before going dualstack: it needs IPv6 subnets.
            if let Some(subnets) = subnet_change(want_lb, lb, o) {
                out.push(Action::SetSubnets {
                    load_balancer: lb_ref.clone(),
                    subnets,
                });
            }
            if lb.ip_address_type != want_lb.ip_address_type
                && want_lb.ip_address_type == IpAddressType::Dualstack
            {
                out.push(Action::SetIpAddressType {
                    load_balancer: lb_ref.clone(),
                    ip_address_type: want_lb.ip_address_type,
                });
            }
            tag_actions(&lb_ref, &want_lb.tags, &lb.tags, &mut out);
            lb_ref
        }
        None => {
            out.push(Action::CreateLoadBalancer {
                load_balancer: want_lb.clone(),
                subnets: resolved_subnets(want_lb, o),
            });
            let lb_ref = Ref::New(want_lb.name.clone());
            let attributes = changed(&want_lb.attributes, &lb_attribute_defaults(want_lb.scheme));
            if !attributes.is_empty() {
                out.push(Action::ModifyLoadBalancerAttributes {
                    load_balancer: lb_ref.clone(),
                    attributes,
                });
            }
            // CreateLoadBalancer cannot turn the PrivateLink filter off.
            if !want_lb.enforce_sg_inbound_rules_on_private_link {
                out.push(Action::SetSecurityGroups {
                    load_balancer: lb_ref.clone(),
                    security_groups: want_lb.security_groups.clone(),
                    enforce_inbound_rules_on_private_link: false,
                });
            }
            lb_ref
        }
    };

    // 4b. Target groups and their targets.
    let mut tg_refs: BTreeMap<&str, Ref> = BTreeMap::new();
    for tg in &d.target_groups {
        let tg_ref = match current_tg(tg) {
            Some(have) => {
                let tg_ref = Ref::Arn(have.arn.clone());
                if have.health_check != tg.health_check {
                    out.push(Action::ModifyTargetGroupHealthCheck {
                        target_group: tg_ref.clone(),
                        health_check: tg.health_check.clone(),
                    });
                }
                let attributes = changed_from_defaults(
                    &tg.attributes,
                    tg_attribute_defaults(tg.target_type, tg.protocol),
                    &have.attributes,
                );
                if !attributes.is_empty() {
                    out.push(Action::ModifyTargetGroupAttributes {
                        target_group: tg_ref.clone(),
                        attributes,
                    });
                }
                tag_actions(&tg_ref, &tg.tags, &have.tags, &mut out);
                register_missing(&tg_ref, tg, &have.targets, &mut out);
                tg_ref
            }
            None => {
                out.push(Action::CreateTargetGroup {
                    target_group: TargetGroup {
                        targets: Vec::new(),
                        ..tg.clone()
                    },
                });
                let tg_ref = Ref::New(tg.name.clone());
                let attributes = changed(
                    &tg.attributes,
                    &tg_attribute_defaults(tg.target_type, tg.protocol),
                );
                if !attributes.is_empty() {
                    out.push(Action::ModifyTargetGroupAttributes {
                        target_group: tg_ref.clone(),
                        attributes,
                    });
                }
                register_missing(&tg_ref, tg, &[], &mut out);
                tg_ref
            }
        };
        tg_refs.insert(tg.name.as_str(), tg_ref);
    }

    // 4c. Listeners: drop ports no longer served, then create or fix the rest.
    let current_listeners: Vec<&ObservedListener> = match current_lb {
        Some(lb) => o
            .listeners
            .iter()
            .filter(|l| l.load_balancer_arn == lb.arn)
            .collect(),
        None => Vec::new(),
    };
    for have in &current_listeners {
        if !d.listeners.iter().any(|l| l.port == have.port) {
            out.push(Action::DeleteListener {
                arn: have.arn.clone(),
                port: have.port,
            });
        }
    }
    for want in &d.listeners {
        let tg_ref = tg_refs
            .get(want.target_group.as_str())
            .cloned()
            .unwrap_or_else(|| Ref::New(want.target_group.clone()));
        match current_listeners.iter().find(|l| l.port == want.port) {
            None => {
                out.push(Action::CreateListener {
                    load_balancer: lb_ref.clone(),
                    listener: want.clone(),
                    target_group: tg_ref,
                });
                let (add, _) = sni_certificate_changes(want, &[]);
                if !add.is_empty() {
                    out.push(Action::AddListenerCertificates {
                        listener: Ref::New(listener_key(want.port)),
                        port: want.port,
                        certificates: add,
                    });
                }
                let attributes = changed(
                    &want.attributes,
                    &listener_attribute_defaults(want.protocol),
                );
                if !attributes.is_empty() {
                    out.push(Action::ModifyListenerAttributes {
                        listener: Ref::New(listener_key(want.port)),
                        port: want.port,
                        attributes,
                    });
                }
            }
            Some(have) => {
                let forwards_right =
                    matches!(&tg_ref, Ref::Arn(arn) if *arn == have.target_group_arn);
                // ModifyListener sets the default certificate; the others
                // are the listener's certificate list, changed on their own.
                let same = forwards_right
                    && have.protocol == want.protocol
                    && have.certificates.first() == want.certificates.first()
                    && have.ssl_policy == want.ssl_policy
                    && have.alpn_policy == want.alpn_policy;
                if !same {
                    out.push(Action::ModifyListener {
                        arn: have.arn.clone(),
                        listener: want.clone(),
                        target_group: tg_ref,
                    });
                }
                // A default that ModifyListener replaces stays in the
                // listener's list as an SNI certificate (AWS's behaviour),
                // so it counts among the ones to compare.
                let mut have_extra = have.certificates.get(1..).unwrap_or_default().to_vec();
                if let Some(old_default) = have.certificates.first()
                    && have.protocol == Protocol::Tls
                    && want.certificates.first() != Some(old_default)
                    && !have_extra.contains(old_default)
                {
                    have_extra.push(old_default.clone());
                }
                let (add, remove) = sni_certificate_changes(want, &have_extra);
                // Removals first: a listener at its certificate quota can
                // still swap one.
                if !remove.is_empty() {
                    out.push(Action::RemoveListenerCertificates {
                        arn: have.arn.clone(),
                        port: want.port,
                        certificates: remove,
                    });
                }
                if !add.is_empty() {
                    out.push(Action::AddListenerCertificates {
                        listener: Ref::Arn(have.arn.clone()),
                        port: want.port,
                        certificates: add,
                    });
                }
                let attributes = changed_from_defaults(
                    &want.attributes,
                    listener_attribute_defaults(have.protocol),
                    &have.attributes,
                );
                if !attributes.is_empty() {
                    out.push(Action::ModifyListenerAttributes {
                        listener: Ref::Arn(have.arn.clone()),
                        port: want.port,
                        attributes,
                    });
                }
            }
        }
    }

    // 4d. Back to ipv4 only once no listener forwards to an ipv6 group.
    if let Some(lb) = current_lb
        && lb.ip_address_type != want_lb.ip_address_type
        && want_lb.ip_address_type == IpAddressType::Ipv4
    {
        out.push(Action::SetIpAddressType {
            load_balancer: Ref::Arn(lb.arn.clone()),
            ip_address_type: want_lb.ip_address_type,
        });
    }

    // 5. Whatever is not desired, in deletion order.
    for lb in &stale_lbs {
        delete_load_balancer(lb, o, &mut out);
    }
    for tg in &o.target_groups {
        if !d.target_groups.iter().any(|t| t.name == tg.name) {
            out.push(delete_target_group(tg));
        }
    }
    let extra_backend: Vec<ObservedSgRule> = o
        .backend_rules
        .iter()
        .filter(|h| !d.backend_rules.iter().any(|r| r.same_traffic(&h.rule)))
        .cloned()
        .collect();
    if !extra_backend.is_empty() {
        out.push(Action::RevokeIngress {
            group: SgRef::Nodes,
            rules: extra_backend,
        });
    }
    for sg in &o.security_groups {
        if Some(sg.id.as_str()) != current_sg.map(|c| c.id.as_str()) {
            out.push(Action::DeleteSecurityGroup {
                id: sg.id.clone(),
                name: sg.name.clone(),
            });
        }
    }
    out
}

/// The name under which a plan refers to a listener it creates.
pub fn listener_key(port: u16) -> String {
    format!("listener:{port}")
}

/// The SNI certificates to add to and remove from a listener whose
/// non-default certificates are `have_extra`, so that it serves every
/// certificate of `want` (the first being the default, which ModifyListener
/// and CreateListener set). Only TLS listeners have them; a listener turning
/// to TCP loses its certificates with ModifyListener.
fn sni_certificate_changes(want: &Listener, have_extra: &[String]) -> (Vec<String>, Vec<String>) {
    if want.protocol != Protocol::Tls {
        return (Vec::new(), Vec::new());
    }
    let default = want.certificates.first();
    let mut want_extra: Vec<&String> = Vec::new();
    for certificate in want.certificates.iter().skip(1) {
        if Some(certificate) != default && !want_extra.contains(&certificate) {
            want_extra.push(certificate);
        }
    }
    let add = want_extra
        .iter()
        .filter(|c| !have_extra.contains(c))
        .map(|c| (*c).clone())
        .collect();
    // AWS refuses to remove the default certificate from the list.
    let remove = have_extra
        .iter()
        .filter(|c| !want_extra.contains(c) && Some(*c) != default)
        .cloned()
        .collect();
    (add, remove)
}

/// Whether the NLB has exactly the desired security groups.
fn same_security_groups(want: &LoadBalancer, have: &ObservedLoadBalancer) -> bool {
    want.security_groups.len() == have.security_groups.len()
        && want
            .security_groups
            .iter()
            .all(|s| have.security_groups.iter().any(|h| h.matches(s)))
}

/// Whether the NLB is in exactly the desired subnets.
fn same_subnets(want: &[SubnetMapping], have: &ObservedLoadBalancer) -> bool {
    want.len() == have.subnets.len()
        && want
            .iter()
            .all(|m| have.subnets.iter().any(|h| h.matches(&m.subnet)))
}

/// The subnets a kept NLB should be set to, if they differ from its own.
/// Explicit subnets are applied as given (AWS refuses to swap a subnet
/// within one zone in one call; its message then names the problem).
/// Discovered subnets only ever *add* a zone the NLB does not cover yet:
/// tagging another subnet in a covered zone must not move a live NLB.
fn subnet_change(
    want: &LoadBalancer,
    have: &ObservedLoadBalancer,
    o: &Observed,
) -> Option<Vec<SubnetMapping>> {
    let by_id = |id: &str| SubnetMapping {
        subnet: SubnetRef::Id(id.to_string()),
        allocation_id: None,
        private_ipv4: None,
        ipv6: None,
    };
    match &want.subnets {
        SubnetSelection::Explicit(mappings) => {
            (!same_subnets(mappings, have)).then(|| mappings.clone())
        }
        SubnetSelection::Discover => {
            let discovered = o.discovered_subnets.as_ref()?;
            let covered: Vec<&str> = have
                .subnets
                .iter()
                .map(|s| s.zone.as_deref())
                .collect::<Option<_>>()?;
            let added: Vec<&String> = discovered
                .iter()
                .filter(|id| {
                    o.discovered_zones
                        .get(*id)
                        .is_some_and(|zone| !covered.contains(&zone.as_str()))
                })
                .collect();
            (!added.is_empty()).then(|| {
                have.subnets
                    .iter()
                    .map(|s| by_id(&s.subnet_id))
                    .chain(added.into_iter().map(|id| by_id(id)))
                    .collect()
            })
        }
    }
}

/// Whether the existing NLB `have` can become `want` in place: same name and
/// scheme, and no pinned address that would have to change.
fn keeps(want: &LoadBalancer, have: &ObservedLoadBalancer) -> bool {
    have.name == want.name && have.scheme == want.scheme && !pins_conflict(want, have)
}

/// Whether a subnet the NLB keeps has a pinned address (EIP, private IPv4 or
/// IPv6) other than the desired one: AWS cannot change it in place, so the
/// NLB is replaced, old one first (its name, and maybe its addresses, are
/// what the new one needs). A subnet whose addresses are not reported at all
/// (moto) is unknown, not a conflict.
fn pins_conflict(want: &LoadBalancer, have: &ObservedLoadBalancer) -> bool {
    let SubnetSelection::Explicit(mappings) = &want.subnets else {
        return false;
    };
    fn differs<T: PartialEq>(want: &Option<T>, have: &Option<T>) -> bool {
        want.as_ref().is_some_and(|w| have.as_ref() != Some(w))
    }
    mappings.iter().any(|m| {
        have.subnets
            .iter()
            .filter(|h| h.matches(&m.subnet) && h.addresses_reported)
            .any(|h| {
                differs(&m.allocation_id, &h.allocation_id)
                    || differs(&m.private_ipv4, &h.private_ipv4)
                    || differs(&m.ipv6, &h.ipv6)
            })
    })
}

fn register_missing(tg_ref: &Ref, tg: &TargetGroup, have: &[Target], out: &mut Vec<Action>) {
    let missing: Vec<Target> = tg
        .targets
        .iter()
        .filter(|t| !have.contains(t))
        .cloned()
        .collect();
    if !missing.is_empty() {
        out.push(Action::RegisterTargets {
            target_group: tg_ref.clone(),
            targets: missing,
        });
    }
}

fn frontend_sg_actions(
    want: &SecurityGroup,
    have: Option<&crate::model::ObservedSecurityGroup>,
    out: &mut Vec<Action>,
) {
    match have {
        None => {
            out.push(Action::CreateSecurityGroup {
                name: want.name.clone(),
                description: want.description.clone(),
                tags: want.tags.clone(),
            });
            if !want.ingress.is_empty() {
                out.push(Action::AuthorizeIngress {
                    group: SgRef::New(want.name.clone()),
                    rules: want.ingress.clone(),
                });
            }
        }
        Some(have) => {
            let missing: Vec<SgRule> = want
                .ingress
                .iter()
                .filter(|r| !have.ingress.iter().any(|h| h.rule.same_traffic(r)))
                .cloned()
                .collect();
            if !missing.is_empty() {
                out.push(Action::AuthorizeIngress {
                    group: SgRef::Id(have.id.clone()),
                    rules: missing,
                });
            }
            let extra: Vec<ObservedSgRule> = have
                .ingress
                .iter()
                .filter(|h| !want.ingress.iter().any(|r| r.same_traffic(&h.rule)))
                .cloned()
                .collect();
            if !extra.is_empty() {
                out.push(Action::RevokeIngress {
                    group: SgRef::Id(have.id.clone()),
                    rules: extra,
                });
            }
            // As for the NLB and target groups (EC2 has its own calls).
            let (tags, keys) = tag_changes(&want.tags, &have.tags);
            if !tags.is_empty() {
                out.push(Action::TagSecurityGroup {
                    id: have.id.clone(),
                    tags,
                });
            }
            if !keys.is_empty() {
                out.push(Action::UntagSecurityGroup {
                    id: have.id.clone(),
                    keys,
                });
            }
        }
    }
}

fn delete_load_balancer(lb: &ObservedLoadBalancer, o: &Observed, out: &mut Vec<Action>) {
    for l in o.listeners.iter().filter(|l| l.load_balancer_arn == lb.arn) {
        out.push(Action::DeleteListener {
            arn: l.arn.clone(),
            port: l.port,
        });
    }
    out.push(Action::DeleteLoadBalancer {
        arn: lb.arn.clone(),
        name: lb.name.clone(),
    });
}

fn delete_target_group(tg: &ObservedTargetGroup) -> Action {
    Action::DeleteTargetGroup {
        arn: tg.arn.clone(),
        name: tg.name.clone(),
    }
}

/// Deletion state machine: listeners → LBs → TGs → SG rules → SGs. Each step
/// is derived from what still exists, so a rerun resumes where it stopped.
fn delete_all(o: &Observed) -> Vec<Action> {
    let mut out = Vec::new();
    for l in &o.listeners {
        out.push(Action::DeleteListener {
            arn: l.arn.clone(),
            port: l.port,
        });
    }
    for lb in &o.load_balancers {
        out.push(Action::DeleteLoadBalancer {
            arn: lb.arn.clone(),
            name: lb.name.clone(),
        });
    }
    for tg in &o.target_groups {
        out.push(delete_target_group(tg));
    }
    if !o.backend_rules.is_empty() {
        out.push(Action::RevokeIngress {
            group: SgRef::Nodes,
            rules: o.backend_rules.clone(),
        });
    }
    for sg in &o.security_groups {
        out.push(Action::DeleteSecurityGroup {
            id: sg.id.clone(),
            name: sg.name.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests;

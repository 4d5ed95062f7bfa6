//! Performing a plan, action by action, in the plan's order. Each action is
//! idempotent where AWS allows: a rule that already exists, or a resource that
//! is already gone, counts as done, so a plan cut short by a crash or an error
//! is finished by the next reconcile (which plans again from what it observes).

use std::collections::{BTreeMap, HashMap};

use aws_sdk_ec2::types::{
    IpPermission, IpRange, Ipv6Range, PrefixListId, ResourceType, TagSpecification, UserIdGroupPair,
};
use aws_sdk_elasticloadbalancingv2::types::{
    ActionTypeEnum, Certificate, EnforceSecurityGroupInboundRulesOnPrivateLinkTrafficEnum,
    IpAddressType as ElbIpAddressType, ListenerAttribute, LoadBalancerAttribute,
    LoadBalancerSchemeEnum, LoadBalancerTypeEnum, Matcher, ProtocolEnum,
    SubnetMapping as ElbSubnetMapping, Tag, TargetDescription, TargetGroupAttribute,
    TargetGroupIpAddressTypeEnum, TargetTypeEnum,
};

use super::observe::filter;
use super::{Aws, AwsError, AwsErrorKind};
use crate::model::{
    AlpnPolicy, HealthCheck, HealthCheckPort, HealthCheckProtocol, Listener, Observed,
    ObservedListener, ObservedLoadBalancer, ObservedSecurityGroup, ObservedSecurityGroupRef,
    ObservedSgRule, ObservedSubnetMapping, ObservedTargetGroup, RuleSource, SecurityGroupRef,
    SecurityGroupSelection, SgRule, SubnetMapping, SubnetRef, Target, TargetGroupIpAddressType,
};
use crate::plan::{Action, Ref, SgRef, listener_key};

/// Sets every health-check field on a Create/ModifyTargetGroup request; path
/// and matcher only for HTTP(S), which is all ELBv2 accepts.
macro_rules! apply_health_check {
    ($request:expr, $hc:expr) => {{
        let hc: &HealthCheck = $hc;
        let http = hc.protocol != HealthCheckProtocol::Tcp;
        $request
            .health_check_protocol(ProtocolEnum::from(hc.protocol.as_str()))
            .health_check_port(health_check_port(hc.port))
            .health_check_interval_seconds(i32::from(hc.interval_seconds))
            .health_check_timeout_seconds(i32::from(hc.timeout_seconds))
            .healthy_threshold_count(i32::from(hc.healthy_threshold))
            .unhealthy_threshold_count(i32::from(hc.unhealthy_threshold))
            .set_health_check_path(if http { hc.path.clone() } else { None })
            .set_matcher(if http {
                hc.success_codes
                    .as_ref()
                    .map(|c| Matcher::builder().http_code(c).build())
            } else {
                None
            })
    }};
}

/// ARNs and IDs known while a plan runs: observed ones, then created ones.
#[derive(Default)]
struct Known {
    /// LB and TG names → ARNs.
    arns: HashMap<String, String>,
    /// Managed SG name → ID.
    groups: HashMap<String, String>,
    managed_sg: Option<String>,
    node_sg: Option<String>,
    /// LB name → DNS name, from CreateLoadBalancer.
    dns: HashMap<String, String>,
    /// ARN of the listener the last CreateListener made.
    listener_arn: Option<String>,
}

impl Known {
    /// A security group of an NLB as an ID.
    fn security_group(&self, s: &SecurityGroupSelection) -> Option<String> {
        match s {
            SecurityGroupSelection::Managed => self.managed_sg.clone(),
            SecurityGroupSelection::User(_) => None,
        }
    }
}

impl Known {
    fn arn(&self, r: &Ref) -> Result<String, AwsError> {
        match r {
            Ref::Arn(arn) => Ok(arn.clone()),
            Ref::New(name) => self.arns.get(name).cloned().ok_or_else(|| {
                AwsError::setup(
                    "plan",
                    format!("the plan refers to {name}, which no earlier action created"),
                )
            }),
        }
    }

    fn managed_sg(&self) -> Result<String, AwsError> {
        self.managed_sg.clone().ok_or_else(|| {
            AwsError::setup(
                "plan",
                "the plan needs the managed security group, which does not exist".into(),
            )
        })
    }
}

/// A failure that means the step is already done.
fn already_done(e: &AwsError, codes: &[&str]) -> bool {
    e.kind == AwsErrorKind::NotFound || e.code.as_deref().is_some_and(|c| codes.contains(&c))
}

fn done_if(result: Result<(), AwsError>, codes: &[&str]) -> Result<(), AwsError> {
    match result {
        Err(e) if already_done(&e, codes) => Ok(()),
        other => other,
    }
}

fn elb_tags(tags: &std::collections::BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn health_check_port(port: HealthCheckPort) -> String {
    match port {
        HealthCheckPort::TrafficPort => "traffic-port".into(),
        HealthCheckPort::Port(p) => p.to_string(),
    }
}

fn targets(targets: &[Target]) -> Vec<TargetDescription> {
    targets
        .iter()
        .map(|t| {
            TargetDescription::builder()
                .id(&t.id)
                .port(i32::from(t.port))
                .build()
        })
        .collect()
}

impl Aws {
    /// Executes `actions` (from [`crate::plan::plan`] against `observed`), in order,
    /// stopping at the first failure. On success, returns `observed` with every
    /// action's effect applied (ARNs, IDs and DNS names from the create
    /// responses), so the caller need not read everything back: the drift
    /// audit does that periodically.
    pub async fn execute(
        &self,
        actions: &[Action],
        observed: &Observed,
    ) -> Result<Observed, AwsError> {
        let mut state = observed.clone();
        let mut known = Known::default();
        for lb in &observed.load_balancers {
            known.arns.insert(lb.name.clone(), lb.arn.clone());
        }
        for tg in &observed.target_groups {
            known.arns.insert(tg.name.clone(), tg.arn.clone());
        }
        for sg in &observed.security_groups {
            known.groups.insert(sg.name.clone(), sg.id.clone());
        }
        known.managed_sg = observed.security_groups.first().map(|g| g.id.clone());
        for action in actions {
            tracing::debug!(%action, "executing");
            // Boxed: one future per kind of action makes a large state,
            // and debug builds overflowed a worker thread's stack with it.
            Box::pin(self.execute_one(action, &mut known)).await?;
            apply(action, &known, &mut state);
        }
        Ok(state)
    }

    async fn execute_one(&self, action: &Action, known: &mut Known) -> Result<(), AwsError> {
        match action {
            Action::CreateSecurityGroup {
                name,
                description,
                tags,
            } => {
                let vpc = self.vpc().await?;
                let mut spec =
                    TagSpecification::builder().resource_type(ResourceType::SecurityGroup);
                for (k, v) in tags {
                    spec = spec.tags(aws_sdk_ec2::types::Tag::builder().key(k).value(v).build());
                }
                let resp = self
                    .call(
                        "CreateSecurityGroup",
                        self.ec2
                            .create_security_group()
                            .group_name(name)
                            .description(description)
                            .vpc_id(vpc)
                            .tag_specifications(spec.build())
                            .send(),
                    )
                    .await?;
                let id = resp.group_id().unwrap_or_default().to_string();
                known.groups.insert(name.clone(), id.clone());
                known.managed_sg = Some(id);
            }
            Action::AuthorizeIngress { group, rules } => {
                let group_id = self.group_id(group, known).await?;
                let mut permissions = Vec::new();
                for rule in rules {
                    permissions.push(self.permission(rule, known).await?);
                }
                let result = self
                    .call(
                        "AuthorizeSecurityGroupIngress",
                        self.ec2
                            .authorize_security_group_ingress()
                            .group_id(group_id)
                            .set_ip_permissions(Some(permissions))
                            .send(),
                    )
                    .await
                    .map(|_| ());
                done_if(result, &["InvalidPermission.Duplicate"])?;
            }
            Action::RevokeIngress { group, rules } => {
                let group_id = self.group_id(group, known).await?;
                let mut permissions = Vec::new();
                for rule in rules {
                    permissions.push(self.permission(&rule.rule, known).await?);
                }
                let result = self
                    .call(
                        "RevokeSecurityGroupIngress",
                        self.ec2
                            .revoke_security_group_ingress()
                            .group_id(group_id)
                            .set_ip_permissions(Some(permissions))
                            .send(),
                    )
                    .await
                    .map(|_| ());
                done_if(result, &["InvalidPermission.NotFound"])?;
            }
            Action::CreateLoadBalancer {
                load_balancer: lb,
                subnets,
            } => {
                let mappings = self.subnet_mappings(subnets).await?;
                let mut groups = Vec::new();
                for sg in &lb.security_groups {
                    groups.push(match sg {
                        SecurityGroupSelection::Managed => known.managed_sg()?,
                        SecurityGroupSelection::User(r) => self.security_group_id(r).await?,
                    });
                }
                let resp = self
                    .call(
                        "CreateLoadBalancer",
                        self.elb
                            .create_load_balancer()
                            .name(&lb.name)
                            .r#type(LoadBalancerTypeEnum::Network)
                            .scheme(LoadBalancerSchemeEnum::from(lb.scheme.as_str()))
                            .ip_address_type(ElbIpAddressType::from(lb.ip_address_type.as_str()))
                            .set_subnet_mappings(Some(mappings))
                            .set_security_groups(Some(groups))
                            .set_tags(Some(elb_tags(&lb.tags)))
                            .send(),
                    )
                    .await?;
                let arn = resp
                    .load_balancers()
                    .first()
                    .and_then(|l| l.load_balancer_arn())
                    .unwrap_or_default();
                known.arns.insert(lb.name.clone(), arn.to_string());
                let dns = resp
                    .load_balancers()
                    .first()
                    .and_then(|l| l.dns_name())
                    .unwrap_or_default();
                known.dns.insert(lb.name.clone(), dns.to_string());
            }
            Action::ModifyLoadBalancerAttributes {
                load_balancer,
                attributes,
            } => {
                let arn = known.arn(load_balancer)?;
                self.call(
                    "ModifyLoadBalancerAttributes",
                    self.elb
                        .modify_load_balancer_attributes()
                        .load_balancer_arn(arn)
                        .set_attributes(Some(
                            attributes
                                .iter()
                                .map(|(k, v)| {
                                    LoadBalancerAttribute::builder().key(k).value(v).build()
                                })
                                .collect(),
                        ))
                        .send(),
                )
                .await?;
            }
            Action::SetSecurityGroups {
                load_balancer,
                security_groups,
                enforce_inbound_rules_on_private_link,
            } => {
                let arn = known.arn(load_balancer)?;
                let mut groups = Vec::new();
                for sg in security_groups {
                    groups.push(match sg {
                        SecurityGroupSelection::Managed => known.managed_sg()?,
                        SecurityGroupSelection::User(r) => self.security_group_id(r).await?,
                    });
                }
                self.call(
                    "SetSecurityGroups",
                    self.elb
                        .set_security_groups()
                        .load_balancer_arn(arn)
                        .set_security_groups(Some(groups))
                        .enforce_security_group_inbound_rules_on_private_link_traffic(
                            if *enforce_inbound_rules_on_private_link {
                                EnforceSecurityGroupInboundRulesOnPrivateLinkTrafficEnum::On
                            } else {
                                EnforceSecurityGroupInboundRulesOnPrivateLinkTrafficEnum::Off
                            },
                        )
                        .send(),
                )
                .await?;
            }
            Action::SetSubnets {
                load_balancer,
                subnets,
            } => {
                let arn = known.arn(load_balancer)?;
                let mappings = self.subnet_mappings(subnets).await?;
                self.call(
                    "SetSubnets",
                    self.elb
                        .set_subnets()
                        .load_balancer_arn(arn)
                        .set_subnet_mappings(Some(mappings))
                        .send(),
                )
                .await?;
            }
            Action::SetIpAddressType {
                load_balancer,
                ip_address_type,
            } => {
                let arn = known.arn(load_balancer)?;
                self.call(
                    "SetIpAddressType",
                    self.elb
                        .set_ip_address_type()
                        .load_balancer_arn(arn)
                        .ip_address_type(ElbIpAddressType::from(ip_address_type.as_str()))
                        .send(),
                )
                .await?;
            }
            Action::ModifyListenerAttributes {
                listener,
                attributes,
                ..
            } => {
                let arn = known.arn(listener)?;
                self.call(
                    "ModifyListenerAttributes",
                    self.elb
                        .modify_listener_attributes()
                        .listener_arn(arn)
                        .set_attributes(Some(
                            attributes
                                .iter()
                                .map(|(k, v)| ListenerAttribute::builder().key(k).value(v).build())
                                .collect(),
                        ))
                        .send(),
                )
                .await?;
            }
            Action::CreateTargetGroup { target_group: tg } => {
                let vpc = self.vpc().await?;
                let hc = &tg.health_check;
                let mut request = self
                    .elb
                    .create_target_group()
                    .name(&tg.name)
                    .protocol(ProtocolEnum::from(tg.protocol.as_str()))
                    .port(i32::from(tg.port))
                    .vpc_id(vpc)
                    .target_type(TargetTypeEnum::from(tg.target_type.as_str()))
                    .set_tags(Some(elb_tags(&tg.tags)));
                // ipv4 is the default: the request stays as it always was.
                if tg.ip_address_type != TargetGroupIpAddressType::Ipv4 {
                    request = request.ip_address_type(TargetGroupIpAddressTypeEnum::from(
                        tg.ip_address_type.as_str(),
                    ));
                }
                request = apply_health_check!(request, hc);
                let resp = self.call("CreateTargetGroup", request.send()).await?;
                let arn = resp
                    .target_groups()
                    .first()
                    .and_then(|t| t.target_group_arn())
                    .unwrap_or_default();
                known.arns.insert(tg.name.clone(), arn.to_string());
            }
            Action::ModifyTargetGroupHealthCheck {
                target_group,
                health_check: hc,
            } => {
                let arn = known.arn(target_group)?;
                let mut request = self.elb.modify_target_group().target_group_arn(arn);
                request = apply_health_check!(request, hc);
                self.call("ModifyTargetGroup", request.send()).await?;
            }
            Action::ModifyTargetGroupAttributes {
                target_group,
                attributes,
            } => {
                let arn = known.arn(target_group)?;
                self.call(
                    "ModifyTargetGroupAttributes",
                    self.elb
                        .modify_target_group_attributes()
                        .target_group_arn(arn)
                        .set_attributes(Some(
                            attributes
                                .iter()
                                .map(|(k, v)| {
                                    TargetGroupAttribute::builder().key(k).value(v).build()
                                })
                                .collect(),
                        ))
                        .send(),
                )
                .await?;
            }
            Action::RegisterTargets {
                target_group,
                targets: t,
            } => {
                let arn = known.arn(target_group)?;
                self.call(
                    "RegisterTargets",
                    self.elb
                        .register_targets()
                        .target_group_arn(arn)
                        .set_targets(Some(targets(t)))
                        .send(),
                )
                .await?;
            }
            Action::DeregisterTargets {
                target_group,
                targets: t,
            } => {
                let arn = known.arn(target_group)?;
                let result = self
                    .call(
                        "DeregisterTargets",
                        self.elb
                            .deregister_targets()
                            .target_group_arn(arn)
                            .set_targets(Some(targets(t)))
                            .send(),
                    )
                    .await
                    .map(|_| ());
                done_if(result, &["InvalidTarget"])?;
            }
            Action::CreateListener {
                load_balancer,
                listener,
                target_group,
            } => {
                let lb_arn = known.arn(load_balancer)?;
                let tg_arn = known.arn(target_group)?;
                let (certificates, alpn) = listener_tls(listener);
                let resp = self
                    .call(
                        "CreateListener",
                        self.elb
                            .create_listener()
                            .load_balancer_arn(lb_arn)
                            .protocol(ProtocolEnum::from(listener.protocol.as_str()))
                            .port(i32::from(listener.port))
                            .default_actions(forward(tg_arn))
                            .set_certificates(certificates)
                            .set_ssl_policy(listener.ssl_policy.clone())
                            .set_alpn_policy(alpn)
                            .send(),
                    )
                    .await?;
                known.listener_arn = resp
                    .listeners()
                    .first()
                    .and_then(|l| l.listener_arn())
                    .map(str::to_string);
                if let Some(arn) = &known.listener_arn {
                    known.arns.insert(listener_key(listener.port), arn.clone());
                }
            }
            Action::ModifyListener {
                arn,
                listener,
                target_group,
            } => {
                let tg_arn = known.arn(target_group)?;
                let (certificates, alpn) = listener_tls(listener);
                self.call(
                    "ModifyListener",
                    self.elb
                        .modify_listener()
                        .listener_arn(arn)
                        .protocol(ProtocolEnum::from(listener.protocol.as_str()))
                        .port(i32::from(listener.port))
                        .default_actions(forward(tg_arn))
                        .set_certificates(certificates)
                        .set_ssl_policy(listener.ssl_policy.clone())
                        .set_alpn_policy(alpn)
                        .send(),
                )
                .await?;
            }
            Action::TagSecurityGroup { id, tags } => {
                let mut request = self.ec2.create_tags().resources(id);
                for (k, v) in tags {
                    request =
                        request.tags(aws_sdk_ec2::types::Tag::builder().key(k).value(v).build());
                }
                self.call("CreateTags", request.send()).await?;
            }
            Action::UntagSecurityGroup { id, keys } => {
                let mut request = self.ec2.delete_tags().resources(id);
                for k in keys {
                    request = request.tags(aws_sdk_ec2::types::Tag::builder().key(k).build());
                }
                self.call("DeleteTags", request.send()).await?;
            }
            // ELBv2 takes one certificate per call for both.
            Action::AddListenerCertificates {
                listener,
                certificates,
                ..
            } => {
                let arn = known.arn(listener)?;
                for certificate in certificates {
                    self.call(
                        "AddListenerCertificates",
                        self.elb
                            .add_listener_certificates()
                            .listener_arn(&arn)
                            .certificates(certificate_of(certificate))
                            .send(),
                    )
                    .await?;
                }
            }
            Action::RemoveListenerCertificates {
                arn, certificates, ..
            } => {
                for certificate in certificates {
                    let result = self
                        .call(
                            "RemoveListenerCertificates",
                            self.elb
                                .remove_listener_certificates()
                                .listener_arn(arn)
                                .certificates(certificate_of(certificate))
                                .send(),
                        )
                        .await
                        .map(|_| ());
                    // Gone with its listener, or not in its list: nothing
                    // left to remove.
                    done_if(result, &["ListenerNotFound", "CertificateNotFound"])?;
                }
            }
            Action::AddTags { resource, tags } => {
                let arn = known.arn(resource)?;
                self.call(
                    "AddTags",
                    self.elb
                        .add_tags()
                        .resource_arns(arn)
                        .set_tags(Some(elb_tags(tags)))
                        .send(),
                )
                .await?;
            }
            Action::RemoveTags { resource, keys } => {
                let arn = known.arn(resource)?;
                self.call(
                    "RemoveTags",
                    self.elb
                        .remove_tags()
                        .resource_arns(arn)
                        .set_tag_keys(Some(keys.clone()))
                        .send(),
                )
                .await?;
            }
            Action::DeleteListener { arn, .. } => {
                let result = self
                    .call(
                        "DeleteListener",
                        self.elb.delete_listener().listener_arn(arn).send(),
                    )
                    .await
                    .map(|_| ());
                done_if(result, &[])?;
            }
            Action::DeleteLoadBalancer { arn, .. } => {
                let result = self
                    .call(
                        "DeleteLoadBalancer",
                        self.elb
                            .delete_load_balancer()
                            .load_balancer_arn(arn)
                            .send(),
                    )
                    .await
                    .map(|_| ());
                done_if(result, &[])?;
            }
            Action::DeleteTargetGroup { arn, .. } => {
                let result = self
                    .call(
                        "DeleteTargetGroup",
                        self.elb.delete_target_group().target_group_arn(arn).send(),
                    )
                    .await
                    .map(|_| ());
                done_if(result, &[])?;
            }
            Action::DeleteSecurityGroup { id, .. } => {
                let result = self
                    .call(
                        "DeleteSecurityGroup",
                        self.ec2.delete_security_group().group_id(id).send(),
                    )
                    .await
                    .map(|_| ());
                done_if(result, &["InvalidGroup.NotFound"])?;
            }
        }
        Ok(())
    }

    /// The cluster's VPC: from the node SG, else from the tagged subnets.
    async fn vpc(&self) -> Result<String, AwsError> {
        if let Some(vpc) = self.vpc_id.get() {
            return Ok(vpc.clone());
        }
        self.node_security_group_opt().await?;
        if let Some(vpc) = self.vpc_id.get() {
            return Ok(vpc.clone());
        }
        self.discover_subnets(crate::model::Scheme::InternetFacing)
            .await?;
        self.vpc_id.get().cloned().ok_or_else(|| {
            AwsError::setup(
                "DescribeSubnets",
                format!(
                    "cannot tell the cluster's VPC: no security group or subnet carries the tag {}",
                    self.cluster_tag()
                ),
            )
        })
    }

    async fn group_id(&self, group: &SgRef, known: &mut Known) -> Result<String, AwsError> {
        match group {
            SgRef::Id(id) => Ok(id.clone()),
            SgRef::New(name) => known.groups.get(name).cloned().ok_or_else(|| {
                AwsError::setup(
                    "plan",
                    format!(
                        "the plan refers to security group {name}, which no earlier action created"
                    ),
                )
            }),
            SgRef::Nodes => {
                if let Some(id) = &known.node_sg {
                    return Ok(id.clone());
                }
                if let Some(id) = self.node_sg_id.lock().expect("node sg lock").clone() {
                    known.node_sg = Some(id.clone());
                    return Ok(id);
                }
                let sg = self.node_security_group_opt().await?.ok_or_else(|| {
                    AwsError::setup(
                        "DescribeSecurityGroups",
                        format!(
                            "no node security group carries the tag {}; tag it, or set aws-load-balancer-manage-backend-security-group-rules: \"false\"",
                            self.cluster_tag()
                        ),
                    )
                })?;
                let id = sg.group_id().unwrap_or_default().to_string();
                known.node_sg = Some(id.clone());
                Ok(id)
            }
        }
    }

    async fn permission(&self, rule: &SgRule, known: &Known) -> Result<IpPermission, AwsError> {
        let mut p = IpPermission::builder()
            .ip_protocol(rule.protocol.as_str())
            .from_port(rule.from_port)
            .to_port(rule.to_port);
        let description = rule.description.clone();
        p = match &rule.source {
            RuleSource::Cidr(c) if c.is_ipv6() => p.ipv6_ranges(
                Ipv6Range::builder()
                    .cidr_ipv6(c.to_string())
                    .description(description)
                    .build(),
            ),
            RuleSource::Cidr(c) => p.ip_ranges(
                IpRange::builder()
                    .cidr_ip(c.to_string())
                    .description(description)
                    .build(),
            ),
            RuleSource::PrefixList(id) => p.prefix_list_ids(
                PrefixListId::builder()
                    .prefix_list_id(id)
                    .description(description)
                    .build(),
            ),
            RuleSource::ManagedSecurityGroup => p.user_id_group_pairs(
                UserIdGroupPair::builder()
                    .group_id(known.managed_sg()?)
                    .description(description)
                    .build(),
            ),
            RuleSource::SecurityGroup(r) => p.user_id_group_pairs(
                UserIdGroupPair::builder()
                    .group_id(self.security_group_id(r).await?)
                    .description(description)
                    .build(),
            ),
        };
        Ok(p.build())
    }

    async fn subnet_mappings(
        &self,
        subnets: &[SubnetMapping],
    ) -> Result<Vec<ElbSubnetMapping>, AwsError> {
        let mut mappings = Vec::new();
        for m in subnets {
            let id = self.subnet_id(&m.subnet).await?;
            mappings.push(
                ElbSubnetMapping::builder()
                    .subnet_id(id)
                    .set_allocation_id(m.allocation_id.clone())
                    .set_private_ipv4_address(m.private_ipv4.map(|a| a.to_string()))
                    .set_ipv6_address(m.ipv6.map(|a| a.to_string()))
                    .build(),
            );
        }
        Ok(mappings)
    }

    pub(super) async fn security_group_id(&self, r: &SecurityGroupRef) -> Result<String, AwsError> {
        match r {
            SecurityGroupRef::Id(id) => Ok(id.clone()),
            SecurityGroupRef::Name(name) => {
                let resp = self
                    .call(
                        "DescribeSecurityGroups",
                        self.ec2
                            .describe_security_groups()
                            .filters(filter("tag:Name", &[name]))
                            .send(),
                    )
                    .await?;
                match resp.security_groups() {
                    [one] => Ok(one.group_id().unwrap_or_default().to_string()),
                    found => Err(AwsError::setup(
                        "DescribeSecurityGroups",
                        format!(
                            "security group Name={name} matches {} groups; name exactly one, or use its ID",
                            found.len()
                        ),
                    )),
                }
            }
        }
    }

    pub(super) async fn subnet_id(&self, r: &SubnetRef) -> Result<String, AwsError> {
        match r {
            SubnetRef::Id(id) => Ok(id.clone()),
            SubnetRef::Name(name) => {
                let resp = self
                    .call(
                        "DescribeSubnets",
                        self.ec2
                            .describe_subnets()
                            .filters(filter("tag:Name", &[name]))
                            .send(),
                    )
                    .await?;
                match resp.subnets() {
                    [one] => Ok(one.subnet_id().unwrap_or_default().to_string()),
                    found => Err(AwsError {
                        operation: "DescribeSubnets",
                        code: None,
                        message: format!(
                            "subnet Name={name} matches {} subnets; name exactly one, or use its ID",
                            found.len()
                        ),
                        kind: AwsErrorKind::Refused,
                    }),
                }
            }
        }
    }
}

/// Applies the effect of a successful `action` to `state`, so that `state`
/// is what a Describe would now report (as far as planning compares it).
fn apply(action: &Action, known: &Known, state: &mut Observed) {
    let arn_of = |r: &Ref| known.arn(r).unwrap_or_default();
    match action {
        Action::CreateSecurityGroup { name, tags, .. } => {
            state.security_groups.push(ObservedSecurityGroup {
                id: known.groups.get(name).cloned().unwrap_or_default(),
                name: name.clone(),
                ingress: Vec::new(),
                tags: tags.clone(),
            });
        }
        Action::AuthorizeIngress { group, rules } => {
            let list = ingress_mut(state, group);
            if let Some(list) = list {
                for rule in rules {
                    if !list.iter().any(|h| h.rule.same_traffic(rule)) {
                        list.push(super::observe::observed_rule(rule.clone()));
                    }
                }
                list.sort();
            }
        }
        Action::RevokeIngress { group, rules } => {
            let list = ingress_mut(state, group);
            if let Some(list) = list {
                list.retain(|h| !rules.iter().any(|r| r.rule.same_traffic(&h.rule)));
            }
        }
        Action::CreateLoadBalancer {
            load_balancer: lb,
            subnets,
        } => {
            state.load_balancers.push(ObservedLoadBalancer {
                arn: known.arns.get(&lb.name).cloned().unwrap_or_default(),
                dns_name: known.dns.get(&lb.name).cloned().unwrap_or_default(),
                name: lb.name.clone(),
                scheme: lb.scheme,
                ip_address_type: lb.ip_address_type,
                subnets: observed_subnets(subnets),
                security_groups: observed_security_groups(&lb.security_groups, known),
                attributes: BTreeMap::new(),
                enforce_sg_inbound_rules_on_private_link: None,
                tags: lb.tags.clone(),
            });
        }
        Action::ModifyLoadBalancerAttributes {
            load_balancer,
            attributes,
        } => {
            if let Some(lb) = load_balancer_mut(state, &arn_of(load_balancer)) {
                lb.attributes.extend(attributes.clone());
            }
        }
        Action::SetSecurityGroups {
            load_balancer,
            security_groups,
            enforce_inbound_rules_on_private_link,
        } => {
            if let Some(lb) = load_balancer_mut(state, &arn_of(load_balancer)) {
                lb.security_groups = observed_security_groups(security_groups, known);
                lb.enforce_sg_inbound_rules_on_private_link =
                    Some(*enforce_inbound_rules_on_private_link);
            }
        }
        Action::SetSubnets {
            load_balancer,
            subnets,
        } => {
            if let Some(lb) = load_balancer_mut(state, &arn_of(load_balancer)) {
                lb.subnets = observed_subnets(subnets);
            }
        }
        Action::SetIpAddressType {
            load_balancer,
            ip_address_type,
        } => {
            if let Some(lb) = load_balancer_mut(state, &arn_of(load_balancer)) {
                lb.ip_address_type = *ip_address_type;
            }
        }
        Action::ModifyListenerAttributes {
            listener,
            attributes,
            ..
        } => {
            if let Some(l) = listener_mut(state, &arn_of(listener)) {
                l.attributes.extend(attributes.clone());
            }
        }
        Action::CreateTargetGroup { target_group: tg } => {
            state.target_groups.push(ObservedTargetGroup {
                arn: known.arns.get(&tg.name).cloned().unwrap_or_default(),
                name: tg.name.clone(),
                port: tg.port,
                protocol: tg.protocol,
                target_type: tg.target_type,
                health_check: tg.health_check.clone(),
                attributes: BTreeMap::new(),
                targets: Vec::new(),
                tags: tg.tags.clone(),
            });
        }
        Action::ModifyTargetGroupHealthCheck {
            target_group,
            health_check,
        } => {
            if let Some(tg) = target_group_mut(state, &arn_of(target_group)) {
                tg.health_check = health_check.clone();
            }
        }
        Action::ModifyTargetGroupAttributes {
            target_group,
            attributes,
        } => {
            if let Some(tg) = target_group_mut(state, &arn_of(target_group)) {
                tg.attributes.extend(attributes.clone());
            }
        }
        Action::RegisterTargets {
            target_group,
            targets,
        } => {
            if let Some(tg) = target_group_mut(state, &arn_of(target_group)) {
                tg.targets.extend(targets.iter().cloned());
                tg.targets.sort();
                tg.targets.dedup();
            }
        }
        Action::DeregisterTargets {
            target_group,
            targets,
        } => {
            if let Some(tg) = target_group_mut(state, &arn_of(target_group)) {
                tg.targets.retain(|t| !targets.contains(t));
            }
        }
        Action::CreateListener {
            load_balancer,
            listener,
            target_group,
        } => {
            state.listeners.push(observed_listener(
                known.listener_arn.clone().unwrap_or_default(),
                arn_of(load_balancer),
                listener,
                arn_of(target_group),
            ));
        }
        Action::ModifyListener {
            arn,
            listener,
            target_group,
        } => {
            if let Some(l) = listener_mut(state, arn) {
                // ModifyListener leaves the listener's attributes and its
                // other certificates as they were; a replaced default stays
                // in the list (the plan removes it next when unwanted).
                let attributes = std::mem::take(&mut l.attributes);
                let others: Vec<String> = l.certificates.drain(..).collect();
                *l = observed_listener(
                    arn.clone(),
                    l.load_balancer_arn.clone(),
                    listener,
                    arn_of(target_group),
                );
                l.attributes = attributes;
                if l.protocol == crate::model::Protocol::Tls {
                    let default = l.certificates.first().cloned();
                    l.certificates
                        .extend(others.into_iter().filter(|c| Some(c) != default.as_ref()));
                }
            }
        }
        Action::TagSecurityGroup { id, tags } => {
            if let Some(g) = state.security_groups.iter_mut().find(|g| &g.id == id) {
                g.tags.extend(tags.clone());
            }
        }
        Action::UntagSecurityGroup { id, keys } => {
            if let Some(g) = state.security_groups.iter_mut().find(|g| &g.id == id) {
                g.tags.retain(|k, _| !keys.contains(k));
            }
        }
        Action::AddListenerCertificates {
            listener,
            certificates,
            ..
        } => {
            if let Some(l) = listener_mut(state, &arn_of(listener)) {
                for certificate in certificates {
                    if !l.certificates.contains(certificate) {
                        l.certificates.push(certificate.clone());
                    }
                }
            }
        }
        Action::RemoveListenerCertificates {
            arn, certificates, ..
        } => {
            if let Some(l) = listener_mut(state, arn) {
                let default = l.certificates.first().cloned();
                l.certificates
                    .retain(|c| Some(c) == default.as_ref() || !certificates.contains(c));
            }
        }
        Action::AddTags { resource, tags } => {
            let arn = arn_of(resource);
            if let Some(lb) = load_balancer_mut(state, &arn) {
                lb.tags.extend(tags.clone());
            }
            if let Some(tg) = target_group_mut(state, &arn) {
                tg.tags.extend(tags.clone());
            }
        }
        Action::RemoveTags { resource, keys } => {
            let arn = arn_of(resource);
            if let Some(lb) = load_balancer_mut(state, &arn) {
                lb.tags.retain(|k, _| !keys.contains(k));
            }
            if let Some(tg) = target_group_mut(state, &arn) {
                tg.tags.retain(|k, _| !keys.contains(k));
            }
        }
        Action::DeleteListener { arn, .. } => state.listeners.retain(|l| &l.arn != arn),
        Action::DeleteLoadBalancer { arn, .. } => {
            state.load_balancers.retain(|l| &l.arn != arn);
            // Deleting an LB deletes its listeners.
            state.listeners.retain(|l| &l.load_balancer_arn != arn);
        }
        Action::DeleteTargetGroup { arn, .. } => state.target_groups.retain(|t| &t.arn != arn),
        Action::DeleteSecurityGroup { id, .. } => state.security_groups.retain(|g| &g.id != id),
    }
}

fn load_balancer_mut<'a>(
    state: &'a mut Observed,
    arn: &str,
) -> Option<&'a mut ObservedLoadBalancer> {
    state.load_balancers.iter_mut().find(|l| l.arn == arn)
}

/// The ingress rules of `group` as observed: the nodes' backend rules, or a
/// security group's found by id or (just created) by name.
fn ingress_mut<'a>(state: &'a mut Observed, group: &SgRef) -> Option<&'a mut Vec<ObservedSgRule>> {
    match group {
        SgRef::Nodes => Some(&mut state.backend_rules),
        SgRef::Id(id) => state
            .security_groups
            .iter_mut()
            .find(|g| &g.id == id)
            .map(|g| &mut g.ingress),
        SgRef::New(name) => state
            .security_groups
            .iter_mut()
            .find(|g| &g.name == name)
            .map(|g| &mut g.ingress),
    }
}

fn target_group_mut<'a>(state: &'a mut Observed, arn: &str) -> Option<&'a mut ObservedTargetGroup> {
    state.target_groups.iter_mut().find(|t| t.arn == arn)
}

fn listener_mut<'a>(state: &'a mut Observed, arn: &str) -> Option<&'a mut ObservedListener> {
    state.listeners.iter_mut().find(|l| l.arn == arn)
}

/// Subnet mappings as a Describe reports them (a `Name=` subnet by its name:
/// the plan compares with `ObservedSubnetMapping::matches`).
fn observed_subnets(subnets: &[SubnetMapping]) -> Vec<ObservedSubnetMapping> {
    subnets
        .iter()
        .map(|m| ObservedSubnetMapping {
            subnet_id: match &m.subnet {
                SubnetRef::Id(id) => id.clone(),
                SubnetRef::Name(_) => String::new(),
            },
            subnet_name: match &m.subnet {
                SubnetRef::Name(n) => Some(n.clone()),
                SubnetRef::Id(_) => None,
            },
            zone: None,
            addresses_reported: m.pins_an_address(),
            allocation_id: m.allocation_id.clone(),
            private_ipv4: m.private_ipv4,
            ipv6: m.ipv6,
        })
        .collect()
}

/// An NLB's security groups as a Describe reports them.
fn observed_security_groups(
    groups: &[SecurityGroupSelection],
    known: &Known,
) -> Vec<ObservedSecurityGroupRef> {
    groups
        .iter()
        .filter_map(|s| match s {
            SecurityGroupSelection::Managed => {
                known.security_group(s).map(|id| ObservedSecurityGroupRef {
                    id,
                    name: None,
                    managed: true,
                })
            }
            SecurityGroupSelection::User(SecurityGroupRef::Id(id)) => {
                Some(ObservedSecurityGroupRef {
                    id: id.clone(),
                    name: None,
                    managed: false,
                })
            }
            SecurityGroupSelection::User(SecurityGroupRef::Name(n)) => {
                Some(ObservedSecurityGroupRef {
                    id: String::new(),
                    name: Some(n.clone()),
                    managed: false,
                })
            }
        })
        .collect()
}

/// A listener as a Describe would report what `listener` asked for.
fn observed_listener(
    arn: String,
    load_balancer_arn: String,
    listener: &Listener,
    target_group_arn: String,
) -> ObservedListener {
    let tls = listener.protocol == crate::model::Protocol::Tls;
    ObservedListener {
        arn,
        load_balancer_arn,
        port: listener.port,
        protocol: listener.protocol,
        // The default certificate; the others follow with
        // AddListenerCertificates.
        certificates: if tls {
            listener.certificates.iter().take(1).cloned().collect()
        } else {
            Vec::new()
        },
        ssl_policy: listener.ssl_policy.clone().filter(|_| tls),
        alpn_policy: listener.alpn_policy.filter(|_| tls),
        target_group_arn,
        attributes: BTreeMap::new(),
    }
}

fn certificate_of(arn: &str) -> Certificate {
    Certificate::builder().certificate_arn(arn).build()
}

/// The ELBv2 forward action to one target group.
fn forward(tg_arn: String) -> aws_sdk_elasticloadbalancingv2::types::Action {
    aws_sdk_elasticloadbalancingv2::types::Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(tg_arn)
        .build()
}

/// Default certificate and ALPN policy of a TLS listener (None otherwise).
fn listener_tls(listener: &Listener) -> (Option<Vec<Certificate>>, Option<Vec<String>>) {
    let certificates = listener
        .certificates
        .first()
        .map(|arn| vec![certificate_of(arn)]);
    // Always said on a TLS listener: a ModifyListener without it would keep
    // a policy the annotation no longer asks for.
    let alpn = (listener.protocol == crate::model::Protocol::Tls).then(|| {
        let policy = listener.alpn_policy.unwrap_or(AlpnPolicy::None);
        vec![policy.as_str().to_string()]
    });
    (certificates, alpn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::desired;
    use crate::fixtures::{NodeBuilder, ServiceBuilder, cluster_config};
    use crate::plan::plan;

    /// Runs `actions` without AWS: what `execute_one` learns from each
    /// response is made up, then `apply` updates the state.
    fn simulate(actions: &[Action], observed: &Observed) -> Observed {
        let mut known = Known::default();
        for lb in &observed.load_balancers {
            known.arns.insert(lb.name.clone(), lb.arn.clone());
        }
        for tg in &observed.target_groups {
            known.arns.insert(tg.name.clone(), tg.arn.clone());
        }
        known.managed_sg = observed.security_groups.first().map(|g| g.id.clone());
        let mut state = observed.clone();
        for (i, action) in actions.iter().enumerate() {
            match action {
                Action::CreateSecurityGroup { name, .. } => {
                    known.groups.insert(name.clone(), format!("sg-{i}"));
                    known.managed_sg = Some(format!("sg-{i}"));
                }
                Action::CreateLoadBalancer { load_balancer, .. } => {
                    known
                        .arns
                        .insert(load_balancer.name.clone(), format!("arn:lb/{i}"));
                    known
                        .dns
                        .insert(load_balancer.name.clone(), format!("lb-{i}.example"));
                }
                Action::CreateTargetGroup { target_group } => {
                    known
                        .arns
                        .insert(target_group.name.clone(), format!("arn:tg/{i}"));
                }
                Action::CreateListener { listener, .. } => {
                    known.listener_arn = Some(format!("arn:listener/{i}"));
                    known
                        .arns
                        .insert(listener_key(listener.port), format!("arn:listener/{i}"));
                }
                _ => {}
            }
            apply(action, &known, &mut state);
        }
        state
    }

    #[test]
    fn the_applied_state_of_a_plan_needs_no_further_action() {
        let cfg = cluster_config();
        let nodes = [
            NodeBuilder::new("a", "i-0a").build(),
            NodeBuilder::new("b", "i-0b").build(),
        ];
        let services = [
            ServiceBuilder::new().build(),
            ServiceBuilder::new().port("dns", 53, "UDP", 30053).build(),
            ServiceBuilder::new()
                .etp_local(32000)
                .source_ranges(&["10.0.0.0/8"])
                .build(),
            ServiceBuilder::new()
                .annotation(
                    "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes",
                    "deregistration_delay.timeout_seconds=10",
                )
                .annotation(
                    "service.beta.kubernetes.io/aws-load-balancer-cross-zone-load-balancing-enabled",
                    "true",
                )
                .build(),
            ServiceBuilder::new()
                .annotation(
                    "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80",
                    "tcp.idle_timeout.seconds=600",
                )
                .annotation(
                    "service.beta.kubernetes.io/aws-load-balancer-inbound-sg-rules-on-private-link-traffic",
                    "off",
                )
                .annotation(
                    "service.beta.kubernetes.io/aws-load-balancer-subnets",
                    "subnet-0a,public-b",
                )
                .annotation(
                    "service.beta.kubernetes.io/aws-load-balancer-extra-security-groups",
                    "sg-0123,web-frontend",
                )
                .build(),
        ];
        for svc in &services {
            let d = desired(svc, &nodes, &[], &cfg).unwrap();
            let empty = Observed {
                discovered_subnets: Some(vec!["subnet-0a".into(), "subnet-0b".into()]),
                ..Observed::default()
            };
            let actions = plan(Some(&d), &empty);
            assert!(!actions.is_empty());
            let created = simulate(&actions, &empty);
            assert_eq!(plan(Some(&d), &created), [], "after {actions:#?}");
            assert!(
                created
                    .load_balancers
                    .iter()
                    .all(|lb| !lb.arn.is_empty() && !lb.dns_name.is_empty())
            );
            assert!(created.listeners.iter().all(|l| !l.arn.is_empty()));

            // A node leaves, then the Service goes: each plan's effect is
            // again all there is to do.
            let fewer = desired(svc, &nodes[..1], &[], &cfg).unwrap();
            let actions = plan(Some(&fewer), &created);
            assert!(actions.iter().all(Action::is_target_change));
            let drained = simulate(&actions, &created);
            assert_eq!(plan(Some(&fewer), &drained), []);
            let deleted = simulate(&plan(None, &drained), &drained);
            assert_eq!(plan(None, &deleted), []);
        }
    }
}

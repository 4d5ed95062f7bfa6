//! Reading one Service's resources back from AWS. Identity is in tags
//! (SPEC 1.2): a load balancer or target group is the Service's when it
//! carries our cluster tag and its UID tag; never by name alone. moto pages
//! Describe calls at 50 and ignores missing ARNs, so every listing follows
//! `NextMarker` and every result is filtered by tag.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_ec2::operation::describe_security_groups::DescribeSecurityGroupsOutput;
use aws_sdk_ec2::types::{Filter, IpPermission, SecurityGroup as Ec2SecurityGroup};
use aws_sdk_elasticloadbalancingv2::operation::describe_listener_certificates::DescribeListenerCertificatesOutput;
use aws_sdk_elasticloadbalancingv2::operation::describe_listeners::DescribeListenersOutput;
use aws_sdk_elasticloadbalancingv2::operation::describe_load_balancers::DescribeLoadBalancersOutput;
use aws_sdk_elasticloadbalancingv2::operation::describe_target_groups::DescribeTargetGroupsOutput;
use aws_sdk_elasticloadbalancingv2::types::{
    LoadBalancer as ElbLoadBalancer, TargetGroup as ElbTargetGroup, TargetHealthStateEnum,
};

use super::{Aws, AwsError};
use crate::model::{
    AlpnPolicy, Cidr, Desired, HealthCheck, HealthCheckPort, HealthCheckProtocol, IpAddressType,
    IpProtocol, Observed, ObservedListener, ObservedLoadBalancer, ObservedSecurityGroup,
    ObservedSecurityGroupRef, ObservedSgRule, ObservedSubnetMapping, ObservedTargetGroup, Protocol,
    RuleSource, Scheme, SecurityGroupRef, SecurityGroupSelection, SgRule, SubnetRef,
    SubnetSelection, Target, TargetType, tags,
};

/// DescribeTags takes at most 20 ARNs.
const TAG_BATCH: usize = 20;

/// Subnet discovery's choice: one subnet per availability zone, the lowest
/// subnet ID winning a tie, so repeated discoveries agree.
/// Takes and returns (subnet ID, availability zone) pairs, sorted by ID.
pub fn pick_subnets(mut candidates: Vec<(String, String)>) -> Vec<(String, String)> {
    candidates.sort_by(|(id_a, az_a), (id_b, az_b)| az_a.cmp(az_b).then(id_a.cmp(id_b)));
    let mut seen = std::collections::BTreeSet::new();
    let mut out: Vec<(String, String)> = candidates
        .into_iter()
        .filter(|(_, az)| seen.insert(az.clone()))
        .collect();
    out.sort();
    out
}

fn tag_map<'a>(
    pairs: impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>,
) -> BTreeMap<String, String> {
    pairs
        .filter_map(|(k, v)| Some((k?.to_string(), v.unwrap_or_default().to_string())))
        .collect()
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p? {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "TCP_UDP" => Some(Protocol::TcpUdp),
        "TLS" => Some(Protocol::Tls),
        _ => None,
    }
}

fn health_check_protocol(p: Option<&str>) -> HealthCheckProtocol {
    match p {
        Some("HTTP") => HealthCheckProtocol::Http,
        Some("HTTPS") => HealthCheckProtocol::Https,
        _ => HealthCheckProtocol::Tcp,
    }
}

fn health_check(tg: &ElbTargetGroup) -> HealthCheck {
    let protocol = health_check_protocol(tg.health_check_protocol().map(|p| p.as_str()));
    let http = protocol != HealthCheckProtocol::Tcp;
    let small = |v: Option<i32>| v.and_then(|v| u16::try_from(v).ok()).unwrap_or(0);
    HealthCheck {
        protocol,
        port: match tg.health_check_port() {
            Some(p) => p
                .parse()
                .map(HealthCheckPort::Port)
                .unwrap_or(HealthCheckPort::TrafficPort),
            None => HealthCheckPort::TrafficPort,
        },
        path: if http {
            tg.health_check_path().map(str::to_string)
        } else {
            None
        },
        interval_seconds: small(tg.health_check_interval_seconds()),
        timeout_seconds: small(tg.health_check_timeout_seconds()),
        healthy_threshold: small(tg.healthy_threshold_count()).try_into().unwrap_or(0),
        unhealthy_threshold: small(tg.unhealthy_threshold_count())
            .try_into()
            .unwrap_or(0),
        success_codes: if http {
            tg.matcher().and_then(|m| m.http_code()).map(str::to_string)
        } else {
            None
        },
    }
}

fn ip_protocol(p: Option<&str>) -> Option<IpProtocol> {
    match p? {
        "tcp" | "6" => Some(IpProtocol::Tcp),
        "udp" | "17" => Some(IpProtocol::Udp),
        "icmp" | "1" => Some(IpProtocol::Icmp),
        "icmpv6" | "58" => Some(IpProtocol::Icmpv6),
        _ => None,
    }
}

/// Every (source, description) of an EC2 permission as our rule type.
/// `managed_sg` turns a reference to the Service's own SG back into
/// [`RuleSource::ManagedSecurityGroup`], as `desired` writes it.
fn rules_of(perm: &IpPermission, managed_sg: Option<&str>) -> Vec<SgRule> {
    let Some(protocol) = ip_protocol(perm.ip_protocol()) else {
        return Vec::new();
    };
    let mut sources: Vec<(RuleSource, Option<&str>)> = Vec::new();
    for r in perm.ip_ranges() {
        if let Some(c) = r.cidr_ip().and_then(Cidr::parse) {
            sources.push((RuleSource::Cidr(c), r.description()));
        }
    }
    for r in perm.ipv6_ranges() {
        if let Some(c) = r.cidr_ipv6().and_then(Cidr::parse) {
            sources.push((RuleSource::Cidr(c), r.description()));
        }
    }
    for p in perm.prefix_list_ids() {
        if let Some(id) = p.prefix_list_id() {
            sources.push((RuleSource::PrefixList(id.to_string()), p.description()));
        }
    }
    for g in perm.user_id_group_pairs() {
        if let Some(id) = g.group_id() {
            let source = if Some(id) == managed_sg {
                RuleSource::ManagedSecurityGroup
            } else {
                RuleSource::SecurityGroup(SecurityGroupRef::Id(id.to_string()))
            };
            sources.push((source, g.description()));
        }
    }
    sources
        .into_iter()
        .map(|(source, description)| SgRule {
            protocol,
            from_port: perm.from_port().unwrap_or(0),
            to_port: perm.to_port().unwrap_or(0),
            source,
            description: description.unwrap_or_default().to_string(),
        })
        .collect()
}

/// EC2 has no IDs for rules in DescribeSecurityGroups; revocation goes by the
/// rule's content, so the "ID" is its printed form (for plans and logs).
pub(super) fn observed_rule(rule: SgRule) -> ObservedSgRule {
    ObservedSgRule {
        rule_id: rule.to_string(),
        rule,
    }
}

pub(super) fn filter(name: &str, values: &[&str]) -> Filter {
    let mut f = Filter::builder().name(name);
    for v in values {
        f = f.values(*v);
    }
    f.build()
}

fn sg_tags(sg: &Ec2SecurityGroup) -> BTreeMap<String, String> {
    tag_map(sg.tags().iter().map(|t| (t.key(), t.value())))
}

/// The UID of the Service whose managed frontend SG `sg` is: ours (the
/// cluster tag `owned`) and tagged with a UID.
fn frontend_of(sg: &Ec2SecurityGroup, cluster_tag: &str) -> Option<String> {
    let mut tags = sg_tags(sg);
    (tags.get(cluster_tag).map(String::as_str) == Some("owned"))
        .then(|| tags.remove(tags::SERVICE_UID))
        .flatten()
}

/// Every NLB and target group of the region with its tags, and every
/// security group carrying our cluster tag: what each Service's observe
/// filters by its UID. Listing them costs a call per page and one
/// `DescribeTags` per 20 resources, so a listing per observe made a
/// drift-audit round, or a restart, cost calls in the square of the number
/// of Services (the node SG's listing alone returned every Service's
/// frontend SG, since they carry the cluster tag too). One listing now
/// serves every observe for the inventory TTL, unless this client writes in
/// between: a write makes it stale, so a Service's own changes are always
/// seen, and other programs' changes within the TTL. The details of a Service's own resources (attributes, listeners,
/// targets) are still read for each observe: ELBv2 lists them per resource.
#[derive(Debug)]
pub(super) struct Inventory {
    taken_at: std::time::Instant,
    /// This client's write count when the listing started.
    writes: u64,
    load_balancers: Vec<ElbLoadBalancer>,
    target_groups: Vec<ElbTargetGroup>,
    tags: HashMap<String, BTreeMap<String, String>>,
    /// The node SG and every Service's frontend SG, with their rules.
    security_groups: Vec<Ec2SecurityGroup>,
}

impl Aws {
    /// The current inventory: the last listing while it is fresh, else a new
    /// one. Observes running at once wait for one listing and share it.
    async fn inventory(&self) -> Result<std::sync::Arc<Inventory>, AwsError> {
        let mut slot = self.inventory.lock().await;
        if let Some(inventory) = slot.as_ref()
            && inventory.writes == self.calls.writes()
            && inventory.taken_at.elapsed() < self.inventory_ttl
        {
            return Ok(inventory.clone());
        }
        // In the foreground lane even for an audit: every observe waits for
        // the listing while this one holds the lock.
        let inventory = super::in_foreground(self.list_inventory()).await?;
        let inventory = std::sync::Arc::new(inventory);
        *slot = Some(inventory.clone());
        Ok(inventory)
    }

    async fn list_inventory(&self) -> Result<Inventory, AwsError> {
        let taken_at = std::time::Instant::now();
        let writes = self.calls.writes();
        let load_balancers = self.all_load_balancers().await?;
        let target_groups = self.all_target_groups().await?;
        let tags = self
            .tags_of(
                load_balancers
                    .iter()
                    .filter_map(|l| l.load_balancer_arn())
                    .chain(target_groups.iter().filter_map(|t| t.target_group_arn())),
            )
            .await?;
        let security_groups = self.cluster_security_groups().await?;
        Ok(Inventory {
            taken_at,
            writes,
            load_balancers,
            target_groups,
            tags,
            security_groups,
        })
    }

    /// Everything tagged with `uid` in our cluster, plus subnet discovery when
    /// `desired` needs an LB created from discovered subnets.
    pub async fn observe(
        &self,
        uid: &str,
        desired: Option<&Desired>,
    ) -> Result<Observed, AwsError> {
        // Boxed, as in `execute`: the state is large in debug builds.
        match Box::pin(self.observe_listed(uid, desired)).await {
            // A resource the inventory lists is gone (deleted out of band
            // since the listing): list again, once.
            Err(e) if e.kind == super::AwsErrorKind::NotFound => {
                *self.inventory.lock().await = None;
                Box::pin(self.observe_listed(uid, desired)).await
            }
            other => other,
        }
    }

    /// [`Self::observe`] from a new listing, for decisions that must not
    /// rest on one made up to a TTL ago (removing the finalizer).
    pub async fn observe_fresh(&self, uid: &str) -> Result<Observed, AwsError> {
        *self.inventory.lock().await = None;
        self.observe(uid, None).await
    }

    async fn observe_listed(
        &self,
        uid: &str,
        desired: Option<&Desired>,
    ) -> Result<Observed, AwsError> {
        let cluster_tag = self.cluster_tag();
        let ours = |t: &BTreeMap<String, String>| {
            t.contains_key(&cluster_tag)
                && t.get(tags::SERVICE_UID).map(String::as_str) == Some(uid)
        };

        let inventory = self.inventory().await?;
        let frontend: Vec<&Ec2SecurityGroup> = inventory
            .security_groups
            .iter()
            .filter(|g| frontend_of(g, &cluster_tag).as_deref() == Some(uid))
            .collect();
        let managed_sg = frontend
            .first()
            .and_then(|g| g.group_id())
            .map(str::to_string);
        let mut observed = Observed::default();
        for lb in &inventory.load_balancers {
            let Some(arn) = lb.load_balancer_arn() else {
                continue;
            };
            let Some(tags) = inventory.tags.get(arn).filter(|t| ours(t)) else {
                continue;
            };
            observed.load_balancers.push(ObservedLoadBalancer {
                arn: arn.to_string(),
                dns_name: lb.dns_name().unwrap_or_default().to_string(),
                name: lb.load_balancer_name().unwrap_or_default().to_string(),
                scheme: match lb.scheme().map(|s| s.as_str()) {
                    Some("internal") => Scheme::Internal,
                    _ => Scheme::InternetFacing,
                },
                ip_address_type: match lb.ip_address_type().map(|t| t.as_str()) {
                    Some("dualstack") => IpAddressType::Dualstack,
                    _ => IpAddressType::Ipv4,
                },
                subnets: lb
                    .availability_zones()
                    .iter()
                    .map(|az| {
                        let addresses = az.load_balancer_addresses();
                        ObservedSubnetMapping {
                            subnet_id: az.subnet_id().unwrap_or_default().to_string(),
                            subnet_name: None,
                            zone: az.zone_name().map(str::to_string),
                            addresses_reported: !addresses.is_empty(),
                            allocation_id: addresses
                                .iter()
                                .find_map(|a| a.allocation_id())
                                .map(str::to_string),
                            private_ipv4: addresses
                                .iter()
                                .find_map(|a| a.private_ipv4_address())
                                .and_then(|a| a.parse().ok()),
                            ipv6: addresses
                                .iter()
                                .find_map(|a| a.ipv6_address())
                                .and_then(|a| a.parse().ok()),
                        }
                    })
                    .collect(),
                security_groups: lb
                    .security_groups()
                    .iter()
                    .map(|id| ObservedSecurityGroupRef {
                        id: id.clone(),
                        name: None,
                        managed: Some(id) == managed_sg.as_ref(),
                    })
                    .collect(),
                attributes: self.load_balancer_attributes(arn).await?,
                enforce_sg_inbound_rules_on_private_link: lb
                    .enforce_security_group_inbound_rules_on_private_link_traffic()
                    .map(|v| v == "on"),
                tags: tags.clone(),
            });
            observed.listeners.extend(self.listeners(arn).await?);
        }

        for tg in &inventory.target_groups {
            let Some(arn) = tg.target_group_arn() else {
                continue;
            };
            let Some(tags) = inventory.tags.get(arn).filter(|t| ours(t)) else {
                continue;
            };
            observed.target_groups.push(ObservedTargetGroup {
                arn: arn.to_string(),
                name: tg.target_group_name().unwrap_or_default().to_string(),
                port: tg.port().and_then(|p| u16::try_from(p).ok()).unwrap_or(0),
                protocol: protocol(tg.protocol().map(|p| p.as_str())).unwrap_or(Protocol::Tcp),
                target_type: match tg.target_type().map(|t| t.as_str()) {
                    Some("ip") => TargetType::Ip,
                    _ => TargetType::Instance,
                },
                health_check: health_check(tg),
                attributes: self.target_group_attributes(arn).await?,
                targets: self.targets(arn).await?,
                tags: tags.clone(),
            });
        }

        for sg in frontend {
            let id = sg.group_id().unwrap_or_default();
            let mut ingress: Vec<ObservedSgRule> = sg
                .ip_permissions()
                .iter()
                .flat_map(|p| rules_of(p, Some(id)))
                .map(observed_rule)
                .collect();
            ingress.sort();
            observed.security_groups.push(ObservedSecurityGroup {
                id: id.to_string(),
                name: sg.group_name().unwrap_or_default().to_string(),
                ingress,
                tags: sg_tags(sg),
            });
        }

        // Always, even when no backend rule is desired: rules left from an
        // earlier spec (e.g. from the managed SG before the user brought
        // their own) must be found to be revoked.
        {
            let owned_prefix = format!("causeway {uid} ");
            if let Some(node_sg) = self.node_security_group_in(&inventory)? {
                let mut rules: Vec<ObservedSgRule> = node_sg
                    .ip_permissions()
                    .iter()
                    .flat_map(|p| rules_of(p, managed_sg.as_deref()))
                    .filter(|r| r.description.starts_with(&owned_prefix))
                    .map(observed_rule)
                    .collect();
                rules.sort();
                observed.backend_rules = rules;
            }
        }

        if let Some(d) = desired {
            // Discovery also runs for an existing NLB, so that it gains a
            // subnet in a zone it does not cover yet (discovery is cached,
            // so this is cheap).
            if d.load_balancer.subnets == SubnetSelection::Discover {
                observed.set_discovered(self.discover_subnets(d.load_balancer.scheme).await?);
            }
            self.name_references(d, &mut observed).await?;
        }
        Ok(observed)
    }

    /// Fills in the names of the NLB's subnets and security groups that the
    /// desired state refers to by `Name` tag, so the plan can compare them.
    /// Costs one Describe per name, and nothing when every reference is an ID.
    async fn name_references(&self, d: &Desired, observed: &mut Observed) -> Result<(), AwsError> {
        if let SubnetSelection::Explicit(mappings) = &d.load_balancer.subnets {
            for m in mappings {
                if let SubnetRef::Name(name) = &m.subnet {
                    let Ok(id) = self.subnet_id(&m.subnet).await else {
                        continue;
                    };
                    for lb in &mut observed.load_balancers {
                        for s in lb.subnets.iter_mut().filter(|s| s.subnet_id == id) {
                            s.subnet_name = Some(name.clone());
                        }
                    }
                }
            }
        }
        for sg in &d.load_balancer.security_groups {
            if let SecurityGroupSelection::User(r @ SecurityGroupRef::Name(name)) = sg {
                let Ok(id) = self.security_group_id(r).await else {
                    continue;
                };
                for lb in &mut observed.load_balancers {
                    for g in lb.security_groups.iter_mut().filter(|g| g.id == id) {
                        g.name = Some(name.clone());
                    }
                }
            }
        }
        Ok(())
    }

    /// Service UIDs that anything of our cluster is tagged with (LBs, TGs,
    /// frontend SGs) or that a node-SG rule description names: the
    /// candidates of the orphan sweep.
    pub async fn tagged_uids(&self) -> Result<std::collections::BTreeSet<String>, AwsError> {
        let cluster_tag = self.cluster_tag();
        let mut uids = std::collections::BTreeSet::new();
        let inventory = self.inventory().await?;
        for tags in inventory.tags.values() {
            if tags.contains_key(&cluster_tag)
                && let Some(uid) = tags.get(tags::SERVICE_UID)
            {
                uids.insert(uid.clone());
            }
        }
        uids.extend(
            inventory
                .security_groups
                .iter()
                .filter_map(|g| frontend_of(g, &cluster_tag)),
        );
        if let Some(node_sg) = self.node_security_group_in(&inventory)? {
            for rule in node_sg
                .ip_permissions()
                .iter()
                .flat_map(|p| rules_of(p, None))
            {
                if let Some(uid) = rule
                    .description
                    .strip_prefix("causeway ")
                    .and_then(|rest| rest.split(' ').next())
                    .filter(|uid| !uid.is_empty())
                {
                    uids.insert(uid.to_string());
                }
            }
        }
        Ok(uids)
    }

    /// What a Service that never had an AWS write has: nothing, plus subnet
    /// discovery for its LB.
    pub async fn observe_nothing(&self, desired: &Desired) -> Result<Observed, AwsError> {
        let mut observed = Observed::default();
        if desired.load_balancer.subnets == SubnetSelection::Discover {
            observed.set_discovered(self.discover_subnets(desired.load_balancer.scheme).await?);
        }
        Ok(observed)
    }

    /// Looks up, once, what every Service needs (node SG, VPC, public
    /// subnets), so that the first creates do not each pay for it. Failures
    /// are only logged: the lookups are repeated when a Service needs them.
    pub async fn warm_up(&self) {
        if let Err(e) = self.node_security_group_opt().await {
            tracing::warn!(error = %e, "cannot find the node security group yet");
        }
        if let Err(e) = self.discover_subnets(Scheme::InternetFacing).await {
            tracing::warn!(error = %e, "cannot discover subnets yet");
        }
    }

    async fn all_load_balancers(&self) -> Result<Vec<ElbLoadBalancer>, AwsError> {
        let pages = self
            .all_pages(
                "DescribeLoadBalancers",
                |marker| self.elb.describe_load_balancers().set_marker(marker).send(),
                DescribeLoadBalancersOutput::next_marker,
            )
            .await?;
        Ok(pages
            .iter()
            .flat_map(|p| p.load_balancers())
            .cloned()
            .collect())
    }

    async fn all_target_groups(&self) -> Result<Vec<ElbTargetGroup>, AwsError> {
        let pages = self
            .all_pages(
                "DescribeTargetGroups",
                |marker| self.elb.describe_target_groups().set_marker(marker).send(),
                DescribeTargetGroupsOutput::next_marker,
            )
            .await?;
        Ok(pages
            .iter()
            .flat_map(|p| p.target_groups())
            .cloned()
            .collect())
    }

    async fn tags_of<'a>(
        &self,
        arns: impl Iterator<Item = &'a str>,
    ) -> Result<HashMap<String, BTreeMap<String, String>>, AwsError> {
        let arns: Vec<String> = arns.map(str::to_string).collect();
        let mut out = HashMap::new();
        for batch in arns.chunks(TAG_BATCH) {
            let resp = self
                .call(
                    "DescribeTags",
                    self.elb
                        .describe_tags()
                        .set_resource_arns(Some(batch.to_vec()))
                        .send(),
                )
                .await?;
            for d in resp.tag_descriptions() {
                if let Some(arn) = d.resource_arn() {
                    out.insert(
                        arn.to_string(),
                        tag_map(d.tags().iter().map(|t| (t.key(), t.value()))),
                    );
                }
            }
        }
        Ok(out)
    }

    async fn load_balancer_attributes(
        &self,
        arn: &str,
    ) -> Result<BTreeMap<String, String>, AwsError> {
        let resp = self
            .call(
                "DescribeLoadBalancerAttributes",
                self.elb
                    .describe_load_balancer_attributes()
                    .load_balancer_arn(arn)
                    .send(),
            )
            .await?;
        Ok(tag_map(
            resp.attributes().iter().map(|a| (a.key(), a.value())),
        ))
    }

    async fn target_group_attributes(
        &self,
        arn: &str,
    ) -> Result<BTreeMap<String, String>, AwsError> {
        let resp = self
            .call(
                "DescribeTargetGroupAttributes",
                self.elb
                    .describe_target_group_attributes()
                    .target_group_arn(arn)
                    .send(),
            )
            .await?;
        Ok(tag_map(
            resp.attributes().iter().map(|a| (a.key(), a.value())),
        ))
    }

    async fn listeners(&self, lb_arn: &str) -> Result<Vec<ObservedListener>, AwsError> {
        let pages = self
            .all_pages(
                "DescribeListeners",
                |marker| {
                    self.elb
                        .describe_listeners()
                        .load_balancer_arn(lb_arn)
                        .set_marker(marker)
                        .send()
                },
                DescribeListenersOutput::next_marker,
            )
            .await?;
        let mut out = Vec::new();
        for l in pages.iter().flat_map(|p| p.listeners()) {
            let Some(protocol) = protocol(l.protocol().map(|p| p.as_str())) else {
                continue;
            };
            // The default certificate (AWS reports no other here, moto
            // all of them, the default first; the rest are read below).
            let default_certificate = l
                .certificates()
                .iter()
                .find(|c| c.is_default().unwrap_or(false))
                .or_else(|| l.certificates().first())
                .and_then(|c| c.certificate_arn())
                .map(str::to_string);
            // TLS settings mean nothing on other listeners; moto reports
            // a policy anyway.
            let tls = protocol == Protocol::Tls;
            out.push(ObservedListener {
                arn: l.listener_arn().unwrap_or_default().to_string(),
                load_balancer_arn: lb_arn.to_string(),
                port: l.port().and_then(|p| u16::try_from(p).ok()).unwrap_or(0),
                protocol,
                certificates: default_certificate.filter(|_| tls).into_iter().collect(),
                ssl_policy: l.ssl_policy().filter(|_| tls).map(str::to_string),
                alpn_policy: l
                    .alpn_policy()
                    .first()
                    .filter(|_| tls)
                    .and_then(|p| AlpnPolicy::ALL.into_iter().find(|a| a.as_str() == p))
                    .filter(|p| *p != AlpnPolicy::None),
                target_group_arn: l
                    .default_actions()
                    .iter()
                    .find_map(|a| {
                        a.target_group_arn().map(str::to_string).or_else(|| {
                            a.forward_config()?
                                .target_groups()
                                .first()?
                                .target_group_arn()
                                .map(str::to_string)
                        })
                    })
                    .unwrap_or_default(),
                attributes: BTreeMap::new(),
            });
        }
        for listener in &mut out {
            if listener.protocol == Protocol::Tls {
                let others = self.sni_certificates(&listener.arn).await?;
                let default = listener.certificates.first().cloned();
                for certificate in others {
                    if Some(&certificate) != default.as_ref()
                        && !listener.certificates.contains(&certificate)
                    {
                        listener.certificates.push(certificate);
                    }
                }
            }
            let resp = self
                .call(
                    "DescribeListenerAttributes",
                    self.elb
                        .describe_listener_attributes()
                        .listener_arn(&listener.arn)
                        .send(),
                )
                .await?;
            listener.attributes = tag_map(resp.attributes().iter().map(|a| (a.key(), a.value())));
        }
        Ok(out)
    }

    /// The certificates of a TLS listener's list that are not its default
    /// one (the SNI certificates), in the order AWS reports them.
    async fn sni_certificates(&self, listener_arn: &str) -> Result<Vec<String>, AwsError> {
        let pages = self
            .all_pages(
                "DescribeListenerCertificates",
                |marker| {
                    self.elb
                        .describe_listener_certificates()
                        .listener_arn(listener_arn)
                        .set_marker(marker)
                        .send()
                },
                DescribeListenerCertificatesOutput::next_marker,
            )
            .await?;
        Ok(pages
            .iter()
            .flat_map(|p| p.certificates())
            .filter(|c| !c.is_default().unwrap_or(false))
            .filter_map(|c| c.certificate_arn().map(str::to_string))
            .collect())
    }

    /// Registered targets, without those already draining (they are leaving).
    async fn targets(&self, tg_arn: &str) -> Result<Vec<Target>, AwsError> {
        let resp = self
            .call(
                "DescribeTargetHealth",
                self.elb
                    .describe_target_health()
                    .target_group_arn(tg_arn)
                    .send(),
            )
            .await?;
        let mut out: Vec<Target> = resp
            .target_health_descriptions()
            .iter()
            .filter(|d| {
                d.target_health().and_then(|h| h.state()) != Some(&TargetHealthStateEnum::Draining)
            })
            .filter_map(|d| {
                let t = d.target()?;
                Some(Target {
                    id: t.id()?.to_string(),
                    port: u16::try_from(t.port()?).ok()?,
                })
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Every security group carrying our cluster tag, whatever its value.
    async fn cluster_security_groups(&self) -> Result<Vec<Ec2SecurityGroup>, AwsError> {
        let cluster_tag = self.cluster_tag();
        let pages = self
            .all_pages(
                "DescribeSecurityGroups",
                |token| {
                    self.ec2
                        .describe_security_groups()
                        .filters(filter("tag-key", &[&cluster_tag]))
                        .set_next_token(token)
                        .send()
                },
                DescribeSecurityGroupsOutput::next_token,
            )
            .await?;
        Ok(pages
            .iter()
            .flat_map(|p| p.security_groups())
            .cloned()
            .collect())
    }

    /// The node SG, from the current inventory: see [`node_security_group`].
    /// (A write makes the inventory stale, so the first lookup after one
    /// lists the region again; the writes that need the node SG's ID or the
    /// VPC look it up only until it is known.)
    pub(super) async fn node_security_group_opt(
        &self,
    ) -> Result<Option<Ec2SecurityGroup>, AwsError> {
        let inventory = self.inventory().await?;
        Ok(self.node_security_group_in(&inventory)?.cloned())
    }

    /// [`node_security_group`] in `inventory`, remembering the node SG's ID
    /// and VPC for the writes that need them.
    fn node_security_group_in<'a>(
        &self,
        inventory: &'a Inventory,
    ) -> Result<Option<&'a Ec2SecurityGroup>, AwsError> {
        let sg = node_security_group(&self.cluster_tag(), &inventory.security_groups)?;
        if let Some(sg) = sg {
            if let Some(vpc) = sg.vpc_id() {
                let _ = self.vpc_id.set(vpc.to_string());
            }
            if let Some(id) = sg.group_id() {
                *self.node_sg_id.lock().expect("node sg lock") = Some(id.to_string());
            }
        }
        Ok(sg)
    }

    /// Subnets tagged for the scheme's role and our cluster (SPEC 1.2).
    /// (subnet ID, availability zone) pairs, one per zone.
    pub(super) async fn discover_subnets(
        &self,
        scheme: Scheme,
    ) -> Result<Vec<(String, String)>, AwsError> {
        if let Some((at, subnets)) = self.subnets.lock().expect("subnet cache lock").get(&scheme)
            && at.elapsed() < super::SUBNET_CACHE_TTL
        {
            return Ok(subnets.clone());
        }
        let role = match scheme {
            Scheme::InternetFacing => "kubernetes.io/role/elb",
            Scheme::Internal => "kubernetes.io/role/internal-elb",
        };
        let resp = self
            .call(
                "DescribeSubnets",
                self.ec2
                    .describe_subnets()
                    .filters(filter("tag-key", &[role]))
                    .filters(filter(
                        &format!("tag:{}", self.cluster_tag()),
                        &["owned", "shared"],
                    ))
                    .send(),
            )
            .await?;
        if let Some(vpc) = resp.subnets().iter().find_map(|s| s.vpc_id()) {
            let _ = self.vpc_id.set(vpc.to_string());
        }
        let picked = pick_subnets(
            resp.subnets()
                .iter()
                .filter_map(|s| {
                    Some((
                        s.subnet_id()?.to_string(),
                        s.availability_zone()?.to_string(),
                    ))
                })
                .collect(),
        );
        if !picked.is_empty() {
            self.subnets
                .lock()
                .expect("subnet cache lock")
                .insert(scheme, (std::time::Instant::now(), picked.clone()));
        }
        Ok(picked)
    }
}

/// The node SG among the cluster's security groups: the one carrying the
/// cluster tag that is not one of ours. None when there is none; an error
/// when the choice is ambiguous.
fn node_security_group<'a>(
    cluster_tag: &str,
    groups: &'a [Ec2SecurityGroup],
) -> Result<Option<&'a Ec2SecurityGroup>, AwsError> {
    let nodes: Vec<&Ec2SecurityGroup> = groups
        .iter()
        .filter(|g| !g.tags().iter().any(|t| t.key() == Some(tags::RESOURCE)))
        .collect();
    match nodes.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => Err(AwsError::setup(
            "DescribeSecurityGroups",
            format!(
                "{} security groups carry the tag {cluster_tag} ({}); tag exactly one node security group, or set aws-load-balancer-manage-backend-security-group-rules: \"false\"",
                many.len(),
                many.iter()
                    .filter_map(|g| g.group_id())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_subnet_per_zone_lowest_id_first() {
        let picked = pick_subnets(vec![
            ("subnet-0c".into(), "us-east-1b".into()),
            ("subnet-0b".into(), "us-east-1a".into()),
            ("subnet-0a".into(), "us-east-1a".into()),
            ("subnet-0d".into(), "us-east-1b".into()),
        ]);
        assert_eq!(
            picked,
            [
                ("subnet-0a".to_string(), "us-east-1a".to_string()),
                ("subnet-0c".to_string(), "us-east-1b".to_string())
            ]
        );
        assert!(pick_subnets(Vec::new()).is_empty());
    }

    fn group(id: &str, tags: &[(&str, &str)]) -> Ec2SecurityGroup {
        let mut g = Ec2SecurityGroup::builder().group_id(id);
        for (k, v) in tags {
            g = g.tags(aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build());
        }
        g.build()
    }

    #[test]
    fn the_node_security_group_is_the_one_not_made_for_a_service() {
        let cluster = "kubernetes.io/cluster/demo";
        let frontend = group(
            "sg-front",
            &[(cluster, "owned"), (tags::RESOURCE, "security-group")],
        );
        let nodes = group("sg-nodes", &[(cluster, "owned")]);
        assert_eq!(node_security_group(cluster, &[]).unwrap(), None);
        assert_eq!(
            node_security_group(cluster, std::slice::from_ref(&frontend)).unwrap(),
            None
        );
        let both = [frontend.clone(), nodes.clone()];
        let found = node_security_group(cluster, &both).unwrap();
        assert_eq!(found.and_then(|g| g.group_id()), Some("sg-nodes"));

        let other = group("sg-other", &[(cluster, "shared")]);
        let err = node_security_group(cluster, &[nodes, frontend, other]).unwrap_err();
        assert_eq!(err.kind, crate::aws::AwsErrorKind::Setup);
        assert!(
            err.message.contains(
                "2 security groups carry the tag kubernetes.io/cluster/demo (sg-nodes, sg-other)"
            ),
            "{}",
            err.message
        );
    }
}

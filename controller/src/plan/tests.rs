//! Exact action lists for the changes users make: create, nothing, ports,
//! nodes, traffic policy, deletion. Plans are compared as the lines
//! `causeway-controller plan` prints, so a test reads like the plan a user sees.

use super::*;
use crate::annotations::keys;
use crate::desired::desired;
use crate::fixtures::{NodeBuilder, ServiceBuilder, cluster_config, port};
use crate::model::{
    ObservedSecurityGroup, ObservedSecurityGroupRef, ObservedSubnetMapping, Scheme,
};
use k8s_openapi::api::core::v1::{Node, Service};

const LB: &str = "k8s-default-web-232ef101b7";
const TG80: &str = "k8s-default-web-8c557551d4";
const SG: &str = "k8s-default-web-18e1e651d4";

fn nodes(instances: &[&str]) -> Vec<Node> {
    instances
        .iter()
        .enumerate()
        .map(|(i, id)| NodeBuilder::new(&format!("node-{i}"), id).build())
        .collect()
}

fn build(svc: Service, instances: &[&str]) -> Desired {
    desired(&svc, &nodes(instances), &[], &cluster_config()).unwrap()
}

fn web() -> Desired {
    build(ServiceBuilder::new().build(), &["i-0aaa", "i-0bbb"])
}

/// What the adapter would observe once `d` is fully applied.
fn converged(d: &Desired) -> Observed {
    let lb_arn = format!("arn:lb/{}", d.load_balancer.name);
    let tg_arn = |name: &str| format!("arn:tg/{name}");
    let mut rule_ids = 0;
    let mut observe_rule = |rule: &SgRule| {
        rule_ids += 1;
        ObservedSgRule {
            rule_id: format!("sgr-{rule_ids}"),
            rule: rule.clone(),
        }
    };
    Observed {
        load_balancers: vec![ObservedLoadBalancer {
            arn: lb_arn.clone(),
            dns_name: format!("{}.elb.example", d.load_balancer.name),
            name: d.load_balancer.name.clone(),
            scheme: d.load_balancer.scheme,
            ip_address_type: d.load_balancer.ip_address_type,
            subnets: ["subnet-1", "subnet-2"]
                .into_iter()
                .map(|id| ObservedSubnetMapping {
                    subnet_id: id.into(),
                    subnet_name: None,
                    zone: Some(format!("zone-{id}")),
                    addresses_reported: false,
                    allocation_id: None,
                    private_ipv4: None,
                    ipv6: None,
                })
                .collect(),
            security_groups: d
                .load_balancer
                .security_groups
                .iter()
                .map(|s| ObservedSecurityGroupRef {
                    id: "sg-0f1".into(),
                    name: None,
                    managed: *s == SecurityGroupSelection::Managed,
                })
                .collect(),
            attributes: d.load_balancer.attributes.clone(),
            enforce_sg_inbound_rules_on_private_link: None,
            tags: d.load_balancer.tags.clone(),
        }],
        listeners: d
            .listeners
            .iter()
            .map(|l| ObservedListener {
                arn: format!("arn:listener/{}", l.port),
                load_balancer_arn: lb_arn.clone(),
                port: l.port,
                protocol: l.protocol,
                certificates: l.certificates.clone(),
                ssl_policy: l.ssl_policy.clone(),
                alpn_policy: l.alpn_policy,
                target_group_arn: tg_arn(&l.target_group),
                attributes: l.attributes.clone(),
            })
            .collect(),
        target_groups: d
            .target_groups
            .iter()
            .map(|tg| ObservedTargetGroup {
                arn: tg_arn(&tg.name),
                name: tg.name.clone(),
                port: tg.port,
                protocol: tg.protocol,
                target_type: tg.target_type,
                health_check: tg.health_check.clone(),
                attributes: tg.attributes.clone(),
                targets: tg.targets.clone(),
                tags: tg.tags.clone(),
            })
            .collect(),
        security_groups: d
            .frontend_security_group
            .iter()
            .map(|sg| ObservedSecurityGroup {
                id: "sg-0f1".into(),
                name: sg.name.clone(),
                ingress: sg.ingress.iter().map(&mut observe_rule).collect(),
                tags: sg.tags.clone(),
            })
            .collect(),
        backend_rules: d.backend_rules.iter().map(&mut observe_rule).collect(),
        discovered_subnets: Some(vec!["subnet-1".into(), "subnet-2".into()]),
        discovered_zones: [
            ("subnet-1".into(), "zone-subnet-1".into()),
            ("subnet-2".into(), "zone-subnet-2".into()),
        ]
        .into(),
    }
}

fn lines(actions: &[Action]) -> Vec<String> {
    actions.iter().map(ToString::to_string).collect()
}

fn plan_lines(d: Option<&Desired>, o: &Observed) -> Vec<String> {
    lines(&plan(d, o))
}

#[test]
fn create_builds_sg_rules_lb_tg_targets_listener_in_order() {
    let d = web();
    let observed = Observed {
        discovered_subnets: Some(vec!["subnet-1".into(), "subnet-2".into()]),
        ..Observed::default()
    };
    let actions = plan(Some(&d), &observed);
    assert_eq!(
        lines(&actions),
        [
            format!("create security group {SG}"),
            format!("authorize on {SG} (new): tcp 80 from 0.0.0.0/0"),
            "authorize on node security group: tcp 10256 from managed-sg, tcp 30080 from managed-sg"
                .to_string(),
            format!(
                "create load balancer {LB} (internet-facing, ipv4, subnets subnet-1, subnet-2, security groups managed)"
            ),
            format!(
                "create target group {TG80} (TCP 80 instance targets, health check HTTP:10256/healthz every 10s timeout 6s healthy 3 unhealthy 3 codes 200-399)"
            ),
            format!("register in target group {TG80} (new): i-0aaa:30080, i-0bbb:30080"),
            format!("create listener TCP 80 on {LB} (new) → {TG80} (new)"),
        ]
    );
    // The create actions carry the full desired resources, tags included.
    let Action::CreateTargetGroup { target_group } = &actions[4] else {
        panic!("{:?}", actions[4]);
    };
    assert_eq!(target_group.tags, d.target_groups[0].tags);
    assert!(target_group.targets.is_empty());
    let Action::CreateSecurityGroup { tags, .. } = &actions[0] else {
        panic!("{:?}", actions[0]);
    };
    assert_eq!(
        tags.get("causeway.dev/service-uid").map(String::as_str),
        Some("uid-web")
    );
}

#[test]
fn converged_state_plans_nothing() {
    let d = web();
    assert_eq!(plan(Some(&d), &converged(&d)), []);
    let two_ports = build(
        ServiceBuilder::new()
            .port("dns", 53, "UDP", 30053)
            .etp_local(32000)
            .build(),
        &["i-0aaa"],
    );
    assert_eq!(plan(Some(&two_ports), &converged(&two_ports)), []);
}

#[test]
fn port_added_creates_only_its_target_group_listener_and_rules() {
    let before = web();
    let after = build(
        ServiceBuilder::new()
            .port("https", 443, "TCP", 30443)
            .build(),
        &["i-0aaa", "i-0bbb"],
    );
    let tg443 = &after.target_groups[1].name;
    assert_eq!(
        plan_lines(Some(&after), &converged(&before)),
        [
            "authorize on sg-0f1: tcp 443 from 0.0.0.0/0".to_string(),
            "authorize on node security group: tcp 30443 from managed-sg".to_string(),
            format!(
                "create target group {tg443} (TCP 443 instance targets, health check HTTP:10256/healthz every 10s timeout 6s healthy 3 unhealthy 3 codes 200-399)"
            ),
            format!("register in target group {tg443} (new): i-0aaa:30443, i-0bbb:30443"),
            format!("create listener TCP 443 on arn:lb/{LB} → {tg443} (new)"),
        ]
    );
}

#[test]
fn port_removed_deletes_listener_then_target_group_then_rules() {
    let before = build(
        ServiceBuilder::new()
            .port("https", 443, "TCP", 30443)
            .build(),
        &["i-0aaa", "i-0bbb"],
    );
    let tg443 = before.target_groups[1].name.clone();
    let after = web();
    let observed = converged(&before);
    assert_eq!(
        plan_lines(Some(&after), &observed),
        [
            "revoke on sg-0f1: tcp 443 from 0.0.0.0/0".to_string(),
            "delete listener 443 (arn:listener/443)".to_string(),
            format!("delete target group {tg443} (arn:tg/{tg443})"),
            "revoke on node security group: tcp 30443 from managed-sg".to_string(),
        ]
    );
}

#[test]
fn node_port_changed_moves_targets_and_rules_but_keeps_the_group() {
    let before = web();
    let after = build(
        ServiceBuilder::new()
            .ports(vec![port("http", 80, "TCP", 30081)])
            .build(),
        &["i-0aaa", "i-0bbb"],
    );
    assert_eq!(
        plan_lines(Some(&after), &converged(&before)),
        [
            format!("deregister from target group arn:tg/{TG80}: i-0aaa:30080, i-0bbb:30080"),
            "authorize on node security group: tcp 30081 from managed-sg".to_string(),
            format!("register in target group arn:tg/{TG80}: i-0aaa:30081, i-0bbb:30081"),
            "revoke on node security group: tcp 30080 from managed-sg".to_string(),
        ]
    );
}

#[test]
fn service_port_changed_replaces_listener_and_group_create_before_delete() {
    let before = web();
    let after = build(
        ServiceBuilder::new()
            .ports(vec![port("http", 8080, "TCP", 30080)])
            .build(),
        &["i-0aaa"],
    );
    let tg8080 = &after.target_groups[0].name;
    assert_ne!(tg8080, TG80);
    assert_eq!(
        plan_lines(Some(&after), &converged(&before)),
        [
            "authorize on sg-0f1: tcp 8080 from 0.0.0.0/0".to_string(),
            "revoke on sg-0f1: tcp 80 from 0.0.0.0/0".to_string(),
            format!(
                "create target group {tg8080} (TCP 8080 instance targets, health check HTTP:10256/healthz every 10s timeout 6s healthy 3 unhealthy 3 codes 200-399)"
            ),
            format!("register in target group {tg8080} (new): i-0aaa:30080"),
            "delete listener 80 (arn:listener/80)".to_string(),
            format!("create listener TCP 8080 on arn:lb/{LB} → {tg8080} (new)"),
            format!("delete target group {TG80} (arn:tg/{TG80})"),
        ]
    );
}

#[test]
fn node_added_only_registers_it() {
    let before = web();
    let after = build(
        ServiceBuilder::new().build(),
        &["i-0aaa", "i-0bbb", "i-0ccc"],
    );
    assert_eq!(
        plan(Some(&after), &converged(&before)),
        [Action::RegisterTargets {
            target_group: Ref::Arn(format!("arn:tg/{TG80}")),
            targets: vec![Target {
                id: "i-0ccc".into(),
                port: 30080
            }],
        }]
    );
}

#[test]
fn node_removed_or_excluded_only_deregisters_it() {
    let before = web();
    let removed = build(ServiceBuilder::new().build(), &["i-0aaa"]);
    let deregister_b = [Action::DeregisterTargets {
        target_group: Ref::Arn(format!("arn:tg/{TG80}")),
        targets: vec![Target {
            id: "i-0bbb".into(),
            port: 30080,
        }],
    }];
    assert_eq!(plan(Some(&removed), &converged(&before)), deregister_b);

    let excluded = desired(
        &ServiceBuilder::new().build(),
        &[
            NodeBuilder::new("node-0", "i-0aaa").build(),
            NodeBuilder::new("node-1", "i-0bbb")
                .label(crate::desired::EXCLUDE_LABEL, "")
                .build(),
        ],
        &[],
        &cluster_config(),
    )
    .unwrap();
    assert_eq!(plan(Some(&excluded), &converged(&before)), deregister_b);
}

#[test]
fn traffic_policy_switch_modifies_health_check_and_health_port_rule() {
    let cluster = web();
    let local = build(
        ServiceBuilder::new().etp_local(32000).build(),
        &["i-0aaa", "i-0bbb"],
    );
    assert_eq!(
        plan_lines(Some(&local), &converged(&cluster)),
        [
            "authorize on node security group: tcp 32000 from managed-sg".to_string(),
            format!(
                "set health check of target group arn:tg/{TG80}: HTTP:32000/healthz every 10s timeout 6s healthy 2 unhealthy 2 codes 200-399"
            ),
            "revoke on node security group: tcp 10256 from managed-sg".to_string(),
        ]
    );
    // And back.
    assert_eq!(
        plan_lines(Some(&cluster), &converged(&local)),
        [
            "authorize on node security group: tcp 10256 from managed-sg".to_string(),
            format!(
                "set health check of target group arn:tg/{TG80}: HTTP:10256/healthz every 10s timeout 6s healthy 3 unhealthy 3 codes 200-399"
            ),
            "revoke on node security group: tcp 32000 from managed-sg".to_string(),
        ]
    );
}

#[test]
fn deleted_service_is_torn_down_listeners_lb_tgs_rules_sgs() {
    let d = web();
    assert_eq!(
        plan_lines(None, &converged(&d)),
        [
            "delete listener 80 (arn:listener/80)".to_string(),
            format!("delete load balancer {LB} (arn:lb/{LB})"),
            format!("delete target group {TG80} (arn:tg/{TG80})"),
            "revoke on node security group: tcp 10256 from managed-sg, tcp 30080 from managed-sg"
                .to_string(),
            format!("delete security group {SG} (sg-0f1)"),
        ]
    );
}

#[test]
fn deletion_stopped_half_way_resumes_with_what_is_left() {
    let mut observed = converged(&web());
    observed.listeners.clear();
    observed.load_balancers.clear();
    observed.backend_rules.clear();
    assert_eq!(
        plan_lines(None, &observed),
        [
            format!("delete target group {TG80} (arn:tg/{TG80})"),
            format!("delete security group {SG} (sg-0f1)"),
        ]
    );
    assert_eq!(plan(None, &Observed::default()), []);
}

#[test]
fn lb_deleted_out_of_band_is_recreated_and_relinked() {
    let d = web();
    let mut observed = converged(&d);
    observed.load_balancers.clear();
    observed.listeners.clear();
    assert_eq!(
        plan_lines(Some(&d), &observed),
        [
            format!(
                "create load balancer {LB} (internet-facing, ipv4, subnets subnet-1, subnet-2, security groups managed)"
            ),
            format!("create listener TCP 80 on {LB} (new) → arn:tg/{TG80}"),
        ]
    );
}

#[test]
fn tags_and_attributes_follow_annotations_both_ways() {
    let plain = web();
    let tagged = build(
        ServiceBuilder::new()
            .annotation(keys::ADDITIONAL_RESOURCE_TAGS, "team=web")
            .annotation(keys::CROSS_ZONE, "true")
            .build(),
        &["i-0aaa", "i-0bbb"],
    );
    let lb_arn = format!("arn:lb/{LB}");
    let tg_arn = format!("arn:tg/{TG80}");
    // The managed frontend SG (sg-0f1 in `converged`) follows first: the
    // plan handles security groups before the NLB.
    assert_eq!(
        plan_lines(Some(&tagged), &converged(&plain)),
        [
            "tag security group sg-0f1: team=web".to_string(),
            format!(
                "set attributes of load balancer {lb_arn}: load_balancing.cross_zone.enabled=true"
            ),
            format!("tag {lb_arn}: team=web"),
            format!("tag {tg_arn}: team=web"),
        ]
    );
    assert_eq!(
        plan_lines(Some(&plain), &converged(&tagged)),
        [
            "untag security group sg-0f1: team".to_string(),
            format!(
                "set attributes of load balancer {lb_arn}: load_balancing.cross_zone.enabled=false"
            ),
            format!("untag {lb_arn}: team"),
            format!("untag {tg_arn}: team"),
        ]
    );
    // Tags AWS sets on its own are left alone.
    let mut with_aws_tag = converged(&plain);
    with_aws_tag.security_groups[0]
        .tags
        .insert("aws:cloudformation:stack-name".into(), "x".into());
    assert_eq!(
        plan_lines(Some(&plain), &with_aws_tag),
        Vec::<String>::new()
    );
}

#[test]
fn scheme_change_replaces_the_lb_create_before_delete() {
    let before = web();
    let after = build(
        ServiceBuilder::new()
            .annotation(keys::SCHEME, "internal")
            .build(),
        &["i-0aaa", "i-0bbb"],
    );
    assert_eq!(after.load_balancer.scheme, Scheme::Internal);
    let new_lb = &after.load_balancer.name;
    let new_tg = &after.target_groups[0].name;
    let got = plan_lines(Some(&after), &converged(&before));
    let position = |needle: &str| {
        got.iter()
            .position(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {got:#?}"))
    };
    assert!(position(&format!("create load balancer {new_lb}")) < position("delete listener 80"));
    assert!(
        position(&format!(
            "create listener TCP 80 on {new_lb} (new) → {new_tg} (new)"
        )) < position(&format!("delete load balancer {LB}"))
    );
    assert!(position(&format!("delete load balancer {LB}")) < position("delete target group"));
}

#[test]
fn no_discovered_subnet_means_no_create() {
    let d = web();
    let none_found = Observed {
        discovered_subnets: Some(Vec::new()),
        ..Observed::default()
    };
    assert!(lacks_subnets(&d, &none_found));
    assert!(!lacks_subnets(&d, &converged(&d)));
}

#[test]
fn another_service_gets_its_own_names_and_tags() {
    let d = build(
        ServiceBuilder::new()
            .named("shop", "checkout-api")
            .uid("uid-checkout")
            .build(),
        &["i-0aaa"],
    );
    let actions = plan(Some(&d), &Observed::default());
    let Some(Action::CreateLoadBalancer { load_balancer, .. }) = actions
        .iter()
        .find(|a| matches!(a, Action::CreateLoadBalancer { .. }))
    else {
        panic!("{actions:#?}");
    };
    assert!(
        load_balancer.name.starts_with("k8s-shop-checkout-"),
        "{}",
        load_balancer.name
    );
    assert_ne!(load_balancer.name, LB);
    assert_eq!(
        load_balancer
            .tags
            .get("kubernetes.io/service-name")
            .map(String::as_str),
        Some("shop/checkout-api")
    );
}

#[test]
fn attributes_aws_does_not_report_count_as_defaults() {
    let d = web();
    let mut observed = converged(&d);
    observed.load_balancers[0].attributes.clear();
    observed.target_groups[0].attributes.clear();
    assert_eq!(plan(Some(&d), &observed), []);
}

fn web_with(annotations: &[(&str, &str)]) -> Desired {
    let mut svc = ServiceBuilder::new();
    for (k, v) in annotations {
        svc = svc.annotation(k, v);
    }
    build(svc.build(), &["i-0aaa", "i-0bbb"])
}

#[test]
fn bringing_own_security_groups_swaps_them_in_place_then_drops_the_managed_one() {
    let before = web();
    let after = web_with(&[(keys::SECURITY_GROUPS, "sg-0abc")]);
    let lb_arn = format!("arn:lb/{LB}");
    assert_eq!(
        plan_lines(Some(&after), &converged(&before)),
        [
            format!(
                "set security groups of load balancer {lb_arn}: sg-0abc (PrivateLink traffic filtered: on)"
            ),
            "revoke on node security group: tcp 10256 from managed-sg, tcp 30080 from managed-sg"
                .to_string(),
            format!("delete security group {SG} (sg-0f1)"),
        ]
    );
    // And back: the managed SG is created before the NLB is pointed at it.
    let mut user = converged(&after);
    user.load_balancers[0].security_groups = vec![ObservedSecurityGroupRef {
        id: "sg-0abc".into(),
        name: None,
        managed: false,
    }];
    let back = plan_lines(Some(&before), &user);
    assert_eq!(back[0], format!("create security group {SG}"));
    assert_eq!(
        back.last().unwrap(),
        &format!(
            "set security groups of load balancer {lb_arn}: managed (PrivateLink traffic filtered: on)"
        )
    );
    assert!(replacements(&after, &converged(&before)).is_empty());
}

#[test]
fn private_link_filter_is_set_after_create_and_restored_on_removal() {
    let off = web_with(&[(keys::INBOUND_SG_RULES_ON_PRIVATE_LINK, "off")]);
    let created = plan_lines(
        Some(&off),
        &Observed {
            discovered_subnets: Some(vec!["subnet-1".into(), "subnet-2".into()]),
            ..Observed::default()
        },
    );
    let create = created
        .iter()
        .position(|l| l.starts_with("create load balancer"))
        .unwrap();
    assert_eq!(
        created[create + 1],
        format!(
            "set security groups of load balancer {LB} (new): managed (PrivateLink traffic filtered: off)"
        )
    );
    let mut live = converged(&off);
    live.load_balancers[0].enforce_sg_inbound_rules_on_private_link = Some(false);
    assert_eq!(plan_lines(Some(&off), &live), Vec::<String>::new());
    assert_eq!(
        plan_lines(Some(&web()), &live),
        [format!(
            "set security groups of load balancer arn:lb/{LB}: managed (PrivateLink traffic filtered: on)"
        )]
    );
}

#[test]
fn subnets_and_address_type_change_in_place() {
    let before = web();
    let lb_arn = format!("arn:lb/{LB}");
    let named = web_with(&[(keys::SUBNETS, "subnet-1, subnet-3")]);
    assert_eq!(
        plan_lines(Some(&named), &converged(&before)),
        [format!(
            "set subnets of load balancer {lb_arn}: subnet-1, subnet-3"
        )]
    );
    // Removing the annotation adds the discovered subnet of a zone the NLB
    // left; it never moves it within a zone.
    let mut moved = converged(&before);
    moved.load_balancers[0].subnets.truncate(1);
    moved.set_discovered(vec![
        ("subnet-1".into(), "zone-subnet-1".into()),
        ("subnet-2".into(), "zone-subnet-2".into()),
    ]);
    assert_eq!(
        plan_lines(Some(&before), &moved),
        [format!(
            "set subnets of load balancer {lb_arn}: subnet-1, subnet-2"
        )]
    );
    // Not discovered (no observe): nothing is assumed.
    moved.discovered_subnets = None;
    assert_eq!(plan_lines(Some(&before), &moved), Vec::<String>::new());

    let dual = web_with(&[(keys::IP_ADDRESS_TYPE, "dualstack")]);
    let got = plan_lines(Some(&dual), &converged(&before));
    assert!(got.contains(&format!(
        "set IP address type of load balancer {lb_arn}: dualstack"
    )));
    assert!(got.iter().all(|l| !l.starts_with("create")), "{got:#?}");
}

#[test]
fn listener_attributes_are_set_on_create_and_restored_on_removal() {
    let key = format!("{}TCP-80", crate::annotations::LISTENER_ATTRIBUTES_PREFIX);
    let idle = web_with(&[(key.as_str(), "tcp.idle_timeout.seconds=600")]);
    let created = plan_lines(
        Some(&idle),
        &Observed {
            discovered_subnets: Some(vec!["subnet-1".into(), "subnet-2".into()]),
            ..Observed::default()
        },
    );
    assert_eq!(
        &created[created.len() - 2..],
        [
            format!("create listener TCP 80 on {LB} (new) → {TG80} (new)"),
            "set attributes of listener 80 (new): tcp.idle_timeout.seconds=600".to_string(),
        ]
    );
    assert_eq!(
        plan_lines(Some(&web()), &converged(&idle)),
        ["set attributes of listener 80 (arn:listener/80): tcp.idle_timeout.seconds=350"]
    );
    // A listener whose attributes AWS does not report has the defaults.
    let mut unreported = converged(&web());
    unreported.listeners[0].attributes.clear();
    assert_eq!(plan_lines(Some(&web()), &unreported), Vec::<String>::new());
}

#[test]
fn every_attribute_returns_to_its_default_when_removed() {
    let tuned = web_with(&[
        (
            keys::ATTRIBUTES,
            "zonal_shift.config.enabled=true,dns_record.client_routing_policy=availability_zone_affinity,access_logs.s3.enabled=true,access_logs.s3.bucket=logs",
        ),
        (
            keys::TARGET_GROUP_ATTRIBUTES,
            "target_health_state.unhealthy.connection_termination.enabled=false,target_health_state.unhealthy.draining_interval_seconds=60,stickiness.enabled=true",
        ),
    ]);
    let lb_arn = format!("arn:lb/{LB}");
    let tg_arn = format!("arn:tg/{TG80}");
    assert_eq!(
        plan_lines(Some(&web()), &converged(&tuned)),
        [
            format!(
                "set attributes of load balancer {lb_arn}: access_logs.s3.bucket=, access_logs.s3.enabled=false, dns_record.client_routing_policy=any_availability_zone, zonal_shift.config.enabled=false"
            ),
            format!(
                "set attributes of target group {tg_arn}: stickiness.enabled=false, target_health_state.unhealthy.connection_termination.enabled=true, target_health_state.unhealthy.draining_interval_seconds=0"
            ),
        ]
    );
}

#[test]
fn replacements_are_explained_before_they_happen() {
    let before = web();
    let internal = web_with(&[(keys::SCHEME, "internal")]);
    let got: Vec<String> = replacements(&internal, &converged(&before))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got,
        [
            format!(
                "replace load balancer {LB} with {}: scheme internet-facing → internal (the new one is created before the old one is deleted)",
                internal.load_balancer.name
            ),
            format!(
                "replace target group 80 {TG80} with {}: its load balancer is replaced (the new one is created before the old one is deleted)",
                internal.target_groups[0].name
            ),
        ]
    );
    let ip = web_with(&[(keys::NLB_TARGET_TYPE, "ip")]);
    let got: Vec<String> = replacements(&ip, &converged(&before))
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got,
        [format!(
            "replace target group 80 {TG80} with {}: target type instance → ip (the new one is created before the old one is deleted)",
            ip.target_groups[0].name
        )]
    );
    assert!(replacements(&before, &converged(&before)).is_empty());
}

#[test]
fn pinned_addresses_replace_the_load_balancer_old_one_first() {
    let pinned = |eips: &str| {
        web_with(&[
            (keys::SUBNETS, "subnet-1,subnet-2"),
            (keys::EIP_ALLOCATIONS, eips),
        ])
    };
    let a = pinned("eipalloc-0a,eipalloc-0b");
    let b = pinned("eipalloc-0a,eipalloc-0c");
    // The name stays: the new NLB may need the old one's addresses, so the
    // old one goes first.
    assert_eq!(a.load_balancer.name, b.load_balancer.name);
    let mut live = converged(&a);
    assert_eq!(
        plan_lines(Some(&b), &live),
        Vec::<String>::new(),
        "addresses AWS does not report are unknown, not different"
    );
    for (subnet, eip) in live.load_balancers[0]
        .subnets
        .iter_mut()
        .zip(["eipalloc-0a", "eipalloc-0b"])
    {
        subnet.addresses_reported = true;
        subnet.allocation_id = Some(eip.into());
    }
    assert_eq!(plan_lines(Some(&a), &live), Vec::<String>::new());
    let got = plan_lines(Some(&b), &live);
    assert_eq!(got[0], "delete listener 80 (arn:listener/80)");
    assert_eq!(got[1], format!("delete load balancer {LB} (arn:lb/{LB})"));
    assert!(
        got.iter()
            .any(|l| l.starts_with(&format!("create load balancer {LB}"))),
        "{got:#?}"
    );
    let why = &replacements(&b, &live)[0];
    assert!(!why.create_before_delete);
    assert!(why.reason.starts_with("pinned addresses"), "{why}");

    // An NLB whose addresses AWS reports without an EIP gains one by
    // replacement, not silently never.
    for subnet in &mut live.load_balancers[0].subnets {
        subnet.allocation_id = None;
    }
    assert_eq!(
        plan_lines(Some(&a), &live)[1],
        format!("delete load balancer {LB} (arn:lb/{LB})")
    );
}

#[test]
fn discovery_only_adds_zones_a_live_nlb_does_not_cover() {
    let d = web();
    let mut live = converged(&d);
    // Another subnet tagged in a covered zone: the NLB stays where it is.
    live.set_discovered(vec![
        ("subnet-0".into(), "zone-subnet-1".into()),
        ("subnet-2".into(), "zone-subnet-2".into()),
    ]);
    assert_eq!(plan_lines(Some(&d), &live), Vec::<String>::new());
    // A subnet in a new zone is added, the others kept.
    live.set_discovered(vec![
        ("subnet-1".into(), "zone-subnet-1".into()),
        ("subnet-2".into(), "zone-subnet-2".into()),
        ("subnet-3".into(), "zone-c".into()),
    ]);
    assert_eq!(
        plan_lines(Some(&d), &live),
        [format!(
            "set subnets of load balancer arn:lb/{LB}: subnet-1, subnet-2, subnet-3"
        )]
    );
}

#[test]
fn sni_certificates_are_added_and_removed_beside_the_default() {
    let arn = |id: &str| format!("arn:aws:acm:us-east-1:123456789012:certificate/{id}");
    let tls = |ids: &[&str]| {
        let list: Vec<String> = ids.iter().map(|id| arn(id)).collect();
        web_with(&[(keys::SSL_CERT, list.join(",").as_str())])
    };
    let listener = "listener 80 (arn:listener/80)";

    // A new listener gets its default certificate, then the others.
    let created = plan_lines(
        Some(&tls(&["a", "b", "c"])),
        &Observed {
            discovered_subnets: Some(vec!["subnet-1".into(), "subnet-2".into()]),
            ..Observed::default()
        },
    );
    assert_eq!(
        &created[created.len() - 2..],
        [
            format!("create listener TLS 80 on {LB} (new) → {TG80} (new)"),
            format!(
                "add certificates to listener 80 (new): {}, {}",
                arn("b"),
                arn("c")
            ),
        ]
    );

    // Others swapped: no ModifyListener, which would only set the default;
    // removals first, so that a listener at its quota can swap.
    assert_eq!(
        plan_lines(Some(&tls(&["a", "c"])), &converged(&tls(&["a", "b"]))),
        [
            format!("remove certificates from {listener}: {}", arn("b")),
            format!("add certificates to {listener}: {}", arn("c")),
        ]
    );
    // The list's order and repeats mean nothing.
    assert_eq!(
        plan_lines(
            Some(&tls(&["a", "b", "c", "b"])),
            &converged(&tls(&["a", "c", "b"]))
        ),
        Vec::<String>::new()
    );
    // An SNI certificate that becomes the default is not removed (AWS
    // refuses to remove a listener's default certificate); the replaced
    // default, which AWS keeps in the list, is.
    assert_eq!(
        plan_lines(Some(&tls(&["b"])), &converged(&tls(&["a", "b"]))),
        [
            format!("modify listener arn:listener/80: TLS 80 → arn:tg/{TG80}"),
            format!("remove certificates from {listener}: {}", arn("a")),
        ]
    );
    // A rotation of the only certificate, likewise.
    assert_eq!(
        plan_lines(Some(&tls(&["b"])), &converged(&tls(&["a"]))),
        [
            format!("modify listener arn:listener/80: TLS 80 → arn:tg/{TG80}"),
            format!("remove certificates from {listener}: {}", arn("a")),
        ]
    );
    // The old default kept as the new list's SNI certificate stays.
    assert_eq!(
        plan_lines(Some(&tls(&["b", "a"])), &converged(&tls(&["a"]))),
        [format!(
            "modify listener arn:listener/80: TLS 80 → arn:tg/{TG80}"
        )]
    );
    // Back to TCP: ModifyListener drops the certificates with TLS (and the
    // TCP listener gets its idle timeout back).
    assert_eq!(
        plan_lines(Some(&web()), &converged(&tls(&["a", "b"]))),
        [
            format!("modify listener arn:listener/80: TCP 80 → arn:tg/{TG80}"),
            format!("set attributes of {listener}: tcp.idle_timeout.seconds=350"),
        ]
    );
}

//! Annotations on a live Service, against a real kube-apiserver and moto: a
//! realistic set (internal scheme, TLS with an ACM certificate, cross-zone,
//! deregistration delay, proxy protocol, a custom health check, extra tags,
//! a listener idle timeout) shapes exactly those AWS settings; editing them
//! converges in place; removing them restores AWS's defaults; an invalid value
//! is a Warning event and writes nothing; a scheme change is announced by
//! `causeway-controller plan` and by an event, then replaces the NLB. And the
//! NLB Services of cloud-provider-aws's and aws-load-balancer-controller's
//! documentation reconcile without a single Warning.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use causeway_tests::controller::{
    ControllerProcess, aws_resources_of, calls_between, events_of, moto_python, plan,
    wait_for_event, wait_for_hostname, wait_until_deleted, writes,
};
use causeway_tests::wait::eventually;
use causeway_tests::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const CLASS: &str = "causeway.dev/nlb";
const PREFIX: &str = "service.beta.kubernetes.io/aws-load-balancer-";

fn key(suffix: &str) -> String {
    format!("{PREFIX}{suffix}")
}

/// A certificate in moto's ACM (ELBv2 in moto refuses unknown ARNs).
fn acm_certificate(cluster: &Cluster, domain: &str) -> Result<String> {
    let out = moto_python(
        cluster,
        &format!(
            "acm = boto3.client('acm', **kw)\nprint(acm.request_certificate(DomainName='{domain}')['CertificateArn'])"
        ),
    )?;
    Ok(out.trim().to_string())
}

/// A two-port shop front: HTTPS on 443 (named `https`) and HTTP on 80.
fn shop(annotations: &BTreeMap<String, String>) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "shop", "annotations": annotations},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            "selector": {"app": "shop"},
            "ports": [
                {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443, "nodePort": 30443},
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30081}
            ]
        }
    }))?)
}

/// Sets (`Some`) or removes (`None`) annotations with a merge patch.
async fn annotate(
    services: &Api<Service>,
    name: &str,
    changes: &[(String, Option<&str>)],
) -> Result<()> {
    let annotations: serde_json::Map<String, Value> = changes
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.map_or(Value::Null, |v| Value::String(v.into())),
            )
        })
        .collect();
    services
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await?;
    Ok(())
}

/// Waits until moto holds exactly one NLB for `uid` and `check` accepts it.
async fn until_aws(
    cluster: &Cluster,
    controller: &ControllerProcess,
    uid: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let check = &check;
    eventually(Duration::from_secs(60), what, || async move {
        let aws = aws_resources_of(cluster, uid)?;
        let one = aws["load_balancers"].as_array().map_or(0, Vec::len) == 1;
        Ok((one && check(&aws)).then_some(aws))
    })
    .await
    .map_err(|e| {
        let last = aws_resources_of(cluster, uid).unwrap_or_default();
        anyhow::anyhow!(
            "{e}\nmoto holds: {last:#}\ncontroller log:\n{}",
            controller.log()
        )
    })
}

fn listener(aws: &Value, port: u64) -> &Value {
    aws["load_balancers"][0]["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["port"] == port))
        .unwrap_or(&Value::Null)
}

fn target_group(aws: &Value, port: u64) -> &Value {
    aws["target_groups"]
        .as_array()
        .and_then(|tgs| tgs.iter().find(|t| t["port"] == port))
        .unwrap_or(&Value::Null)
}

/// The tags a user added, without Causeway's own.
fn user_tags(tags: &Value) -> BTreeMap<String, String> {
    tags.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| {
            !k.starts_with("kubernetes.io/")
                && !k.starts_with("causeway.dev/")
                && !k.starts_with("aws:")
        })
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> BTreeMap<String, String> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Everything the apply wrote: operations other than Describe*.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realistic_annotation_set_is_applied_edited_in_place_and_restored() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let client = cluster.client();
    let first_cert = acm_certificate(&cluster, "shop.example.com")?;
    let second_cert = acm_certificate(&cluster, "shop.example.org")?;
    let third_cert = acm_certificate(&cluster, "shop.example.net")?;
    let two_certs = format!("{first_cert},{second_cert}");
    let mut controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    let private_subnets = cluster.aws().subnet_ids("internal-elb");

    let idle_80 = format!("{PREFIX}listener-attributes.TCP-80");
    let realistic: BTreeMap<String, String> = [
        (key("scheme"), "internal"),
        (key("ssl-cert"), two_certs.as_str()),
        (key("ssl-ports"), "https"),
        (key("cross-zone-load-balancing-enabled"), "true"),
        (
            key("target-group-attributes"),
            "deregistration_delay.timeout_seconds=30",
        ),
        (key("proxy-protocol"), "*"),
        (key("healthcheck-path"), "/ready"),
        (key("healthcheck-interval"), "15"),
        (key("healthcheck-timeout"), "5"),
        (key("healthcheck-healthy-threshold"), "2"),
        (key("healthcheck-unhealthy-threshold"), "4"),
        (key("healthcheck-success-codes"), "200-299"),
        (
            key("additional-resource-tags"),
            "team=payments,cost-center=42",
        ),
        (idle_80.clone(), "tcp.idle_timeout.seconds=600"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect();

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let created = services
        .create(&PostParams::default(), &shop(&realistic)?)
        .await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();

    // 1. Created with exactly these settings.
    let aws = until_aws(&cluster, &controller, &uid, "the NLB", |aws| {
        aws["target_groups"].as_array().map_or(0, Vec::len) == 2
            && listener(aws, 443)["protocol"] == "TLS"
    })
    .await?;
    let lb = &aws["load_balancers"][0];
    assert_eq!(lb["scheme"], "internal");
    assert_eq!(lb["subnets"], json!(private_subnets), "internal subnets");
    assert_eq!(
        lb["attributes"]["load_balancing.cross_zone.enabled"],
        "true"
    );
    assert_eq!(
        user_tags(&lb["tags"]),
        pairs(&[("cost-center", "42"), ("team", "payments")])
    );
    assert_eq!(
        user_tags(&aws["security_groups"][0]["tags"]),
        pairs(&[("cost-center", "42"), ("team", "payments")])
    );
    let https = listener(&aws, 443);
    // The first ARN is the default certificate, the others are served by SNI.
    assert_eq!(https["certificates"][0], json!(first_cert));
    assert_eq!(https["sni_certificates"], json!([second_cert]));
    assert_eq!(https["ssl_policy"], "ELBSecurityPolicy-TLS13-1-2-2021-06");
    assert_eq!(https["attributes"]["tcp.idle_timeout.seconds"], "350");
    let http = listener(&aws, 80);
    assert_eq!(http["protocol"], "TCP");
    assert_eq!(http["attributes"]["tcp.idle_timeout.seconds"], "600");
    for port in [443, 80] {
        let tg = target_group(&aws, port);
        assert_eq!(tg["protocol"], "TCP", "TLS terminates at the NLB");
        assert_eq!(
            tg["attributes"]["deregistration_delay.timeout_seconds"],
            "30"
        );
        assert_eq!(tg["attributes"]["proxy_protocol_v2.enabled"], "true");
        assert_eq!(
            tg["health_check"],
            json!({"protocol": "HTTP", "port": "10256", "path": "/ready", "interval": 15,
                   "timeout": 5, "healthy": 2, "unhealthy": 4, "codes": "200-299"})
        );
        assert_eq!(
            user_tags(&tg["tags"]),
            pairs(&[("cost-center", "42"), ("team", "payments")])
        );
        assert_eq!(tg["targets"].as_array().map(Vec::len), Some(2));
    }

    // 2. Every value edited on the live Service converges in place: no
    //    resource is created or deleted. (Not the TLS listener's default
    //    certificate or policy: moto 5.2.5 refuses any ModifyListener on a TLS
    //    listener with UnsupportedProtocol; the plan tests cover those edits.
    //    The SNI certificates change without one.)
    let new_certs = format!("{first_cert},{third_cert}");
    let before = controller.aws_calls()?;
    annotate(
        &services,
        "shop",
        &[
            (key("cross-zone-load-balancing-enabled"), Some("false")),
            (
                key("target-group-attributes"),
                Some("deregistration_delay.timeout_seconds=60"),
            ),
            (key("healthcheck-path"), Some("/livez")),
            (key("healthcheck-interval"), Some("20")),
            (key("additional-resource-tags"), Some("team=checkout")),
            (idle_80.clone(), Some("tcp.idle_timeout.seconds=900")),
            (key("ssl-cert"), Some(new_certs.as_str())),
        ],
    )
    .await?;
    // The listeners' changes are the plan's last actions (port 80's
    // attribute, port 443's certificates); the assertions below then check
    // every value.
    let aws = until_aws(&cluster, &controller, &uid, "the edited values", |aws| {
        listener(aws, 80)["attributes"]["tcp.idle_timeout.seconds"] == "900"
            && listener(aws, 443)["sni_certificates"] == json!([third_cert])
    })
    .await?;
    let https = listener(&aws, 443);
    assert_eq!(https["certificates"][0], json!(first_cert));
    assert_eq!(https["sni_certificates"], json!([third_cert]));
    let lb = &aws["load_balancers"][0];
    assert_eq!(
        lb["attributes"]["load_balancing.cross_zone.enabled"],
        "false"
    );
    assert_eq!(user_tags(&lb["tags"]), pairs(&[("team", "checkout")]));
    assert_eq!(
        user_tags(&aws["security_groups"][0]["tags"]),
        pairs(&[("team", "checkout")]),
        "the managed SG's tags follow too"
    );
    for port in [443, 80] {
        let tg = target_group(&aws, port);
        assert_eq!(
            tg["attributes"]["deregistration_delay.timeout_seconds"],
            "60"
        );
        assert_eq!(tg["health_check"]["path"], "/livez");
    }
    let edit_writes = writes(&calls_between(&before, &controller.aws_calls()?));
    assert!(
        edit_writes.keys().all(|op| op.starts_with("Modify")
            || [
                "AddTags",
                "RemoveTags",
                "CreateTags",
                "DeleteTags",
                "AddListenerCertificates",
                "RemoveListenerCertificates"
            ]
            .contains(&op.as_str())),
        "an edit changes resources in place: {edit_writes:?}"
    );
    for op in ["AddListenerCertificates", "RemoveListenerCertificates"] {
        assert_eq!(edit_writes.get(op), Some(&1), "{op}: {edit_writes:?}");
    }

    // 2b. A restarted controller reads everything back, SNI certificates
    //     included, and finds nothing to change.
    drop(controller);
    controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    // Its two target groups read back. (The count of reconciles could not
    // tell: the apiserver's own `kubernetes` Service is reconciled too, with
    // no AWS call.)
    controller
        .wait_targets_read(2, Duration::from_secs(30))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls = controller.aws_calls()?;
    assert!(
        calls.get("DescribeListenerCertificates") >= Some(&1),
        "the TLS listener's certificate list is read: {calls:?}"
    );
    let restart_writes = writes(&calls);
    assert!(
        restart_writes.is_empty(),
        "nothing to change after a restart: {restart_writes:?}\n{}",
        controller.log()
    );

    // 3. Removing the annotations restores AWS's defaults (the scheme stays,
    //    so the NLB is kept).
    let removed: Vec<(String, Option<&str>)> = realistic
        .keys()
        .filter(|k| **k != key("scheme"))
        .map(|k| (k.clone(), None))
        .collect();
    let before = controller.aws_calls()?;
    annotate(&services, "shop", &removed).await?;
    let aws = until_aws(&cluster, &controller, &uid, "the defaults", |aws| {
        listener(aws, 443)["protocol"] == "TCP"
            && listener(aws, 80)["attributes"]["tcp.idle_timeout.seconds"] == "350"
    })
    .await?;
    let lb = &aws["load_balancers"][0];
    assert_eq!(lb["scheme"], "internal");
    assert_eq!(
        lb["attributes"]["load_balancing.cross_zone.enabled"],
        "false"
    );
    // (moto keeps reporting the old certificate on the now-TCP listener; AWS
    // drops it. The protocol is what matters.)
    assert_eq!(listener(&aws, 443)["protocol"], "TCP");
    for port in [443, 80] {
        let tg = target_group(&aws, port);
        assert_eq!(
            tg["attributes"]["deregistration_delay.timeout_seconds"],
            "300"
        );
        assert_eq!(tg["attributes"]["proxy_protocol_v2.enabled"], "false");
        // Not the success codes: moto 5.2.5's ModifyTargetGroup ignores the
        // matcher of a TCP target group (AWS applies it to HTTP checks).
        let mut health_check = tg["health_check"].clone();
        health_check.as_object_mut().map(|h| h.remove("codes"));
        assert_eq!(
            health_check,
            json!({"protocol": "HTTP", "port": "10256", "path": "/healthz", "interval": 10,
                   "timeout": 6, "healthy": 3, "unhealthy": 3})
        );
        assert!(user_tags(&tg["tags"]).is_empty());
    }
    assert!(user_tags(&aws["security_groups"][0]["tags"]).is_empty());
    let restore_writes = writes(&calls_between(&before, &controller.aws_calls()?));
    assert!(
        restore_writes.keys().all(|op| op.starts_with("Modify")
            || ["AddTags", "RemoveTags", "DeleteTags"].contains(&op.as_str())),
        "restoring defaults changes resources in place: {restore_writes:?}"
    );

    // 4. An invalid value on the live Service: a Warning naming the key, the
    //    value and what is accepted; no AWS write; the NLB stays as it is.
    let before = controller.aws_calls()?;
    annotate(
        &services,
        "shop",
        &[(key("healthcheck-interval"), Some("often"))],
    )
    .await?;
    let note = wait_for_event(
        &client,
        &uid,
        "Warning",
        "InvalidAnnotation",
        Duration::from_secs(30),
    )
    .await?;
    for needle in [
        key("healthcheck-interval").as_str(),
        "\"often\"",
        "5 to 300",
    ] {
        assert!(note.contains(needle), "{needle:?} not in {note:?}");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Counted by the error's kind, as docs/annotations.md says.
    let invalid = controller
        .metrics()?
        .get("causeway_reconciles_total{outcome=\"invalid_value\"}")
        .copied();
    assert!(
        invalid >= Some(1.0),
        "reconciles: {:?}",
        controller.metrics()?
    );
    let invalid_writes = writes(&calls_between(&before, &controller.aws_calls()?));
    assert!(
        invalid_writes.is_empty(),
        "no AWS write for an invalid value: {invalid_writes:?}"
    );
    assert_eq!(
        aws_resources_of(&cluster, &uid)?,
        aws,
        "the NLB is untouched"
    );
    annotate(&services, "shop", &[(key("healthcheck-interval"), None)]).await?;

    // 5. A change AWS cannot make in place: `plan` announces the replacement
    //    before anything happens, the controller says so in an event, and the
    //    new NLB replaces the old one.
    drop(controller);
    annotate(
        &services,
        "shop",
        &[(key("scheme"), Some("internet-facing"))],
    )
    .await?;
    let planned = plan(&cluster, &["--namespace", "default", "shop"])?;
    assert!(
        planned.contains("! replace load balancer")
            && planned.contains("scheme internal → internet-facing")
            && planned.contains("the new one is created before the old one is deleted"),
        "plan output:\n{planned}"
    );
    assert_eq!(
        aws_resources_of(&cluster, &uid)?,
        aws,
        "plan writes nothing"
    );
    controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;
    let replaced = until_aws(
        &cluster,
        &controller,
        &uid,
        "the internet-facing NLB",
        |aws| {
            aws["load_balancers"][0]["scheme"] == "internet-facing"
                && aws["target_groups"].as_array().map_or(0, Vec::len) == 2
        },
    )
    .await?;
    assert_ne!(
        replaced["load_balancers"][0]["name"],
        aws["load_balancers"][0]["name"]
    );
    let events = events_of(&client, &uid).await?;
    let replacing: Vec<&String> = events
        .iter()
        .filter(|(_, reason, _)| reason == "ReplacingLoadBalancer")
        .map(|(_, _, note)| note)
        .collect();
    assert!(
        replacing
            .iter()
            .any(|n| n.contains("scheme internal → internet-facing")),
        "events: {events:#?}"
    );

    // 6. Deleting the Service leaves nothing behind.
    services.delete("shop", &DeleteParams::default()).await?;
    wait_until_deleted(&services, "shop", Duration::from_secs(60)).await?;
    let left = aws_resources_of(&cluster, &uid)?;
    assert_eq!(left["load_balancers"], json!([]));
    assert_eq!(left["target_groups"], json!([]));
    assert_eq!(left["security_groups"], json!([]));
    Ok(())
}

/// Our own equivalents of the NLB Service examples in cloud-provider-aws's
/// and aws-load-balancer-controller's documentation, unchanged apart from the
/// certificate ARN (ours comes from moto's ACM) and subnet names (moto's).
fn documented_examples(cert: &str, private_subnets: &str) -> Result<Vec<Service>> {
    let service = |name: &str, annotations: Value, extra_spec: Value| -> Result<Service> {
        let mut spec = json!({
            "type": "LoadBalancer",
            "selector": {"app": name},
            "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
            spec.extend(extra.clone());
        }
        Ok(serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "annotations": annotations},
            "spec": spec
        }))?)
    };
    Ok(vec![
        // cloud-provider-aws / Kubernetes docs: "Network Load Balancer support on AWS".
        service(
            "cpa-nlb",
            json!({"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}),
            json!({}),
        )?,
        // cloud-provider-aws: internal NLB with the legacy boolean annotation.
        service(
            "cpa-internal",
            json!({
                "service.beta.kubernetes.io/aws-load-balancer-type": "nlb",
                "service.beta.kubernetes.io/aws-load-balancer-internal": "true"
            }),
            json!({}),
        )?,
        // cloud-provider-aws: health check tuning, extra tags and the Classic
        // idle timeout people carry over (accepted, no effect on an NLB).
        service(
            "cpa-tuned",
            json!({
                "service.beta.kubernetes.io/aws-load-balancer-type": "nlb",
                "service.beta.kubernetes.io/aws-load-balancer-healthcheck-healthy-threshold": "2",
                "service.beta.kubernetes.io/aws-load-balancer-healthcheck-unhealthy-threshold": "3",
                "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "20",
                "service.beta.kubernetes.io/aws-load-balancer-healthcheck-timeout": "5",
                "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags": "environment=prod,owner=devops",
                "service.beta.kubernetes.io/aws-load-balancer-connection-idle-timeout": "60"
            }),
            json!({"externalTrafficPolicy": "Local"}),
        )?,
        // cloud-provider-aws: source ranges, both the field and the legacy annotation.
        service(
            "cpa-ranges",
            json!({
                "service.beta.kubernetes.io/aws-load-balancer-type": "nlb",
                "service.beta.kubernetes.io/load-balancer-source-ranges": "203.0.113.0/24"
            }),
            json!({"loadBalancerSourceRanges": ["198.51.100.0/24"]}),
        )?,
        // aws-load-balancer-controller: "instance mode" NLB.
        service(
            "lbc-instance",
            json!({
                "service.beta.kubernetes.io/aws-load-balancer-type": "external",
                "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "instance",
                "service.beta.kubernetes.io/aws-load-balancer-scheme": "internet-facing"
            }),
            json!({}),
        )?,
        // aws-load-balancer-controller: TLS termination with a TLS policy,
        // attributes and target-group attributes.
        service(
            "lbc-tls",
            json!({
                "service.beta.kubernetes.io/aws-load-balancer-type": "external",
                "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "instance",
                "service.beta.kubernetes.io/aws-load-balancer-ssl-cert": cert,
                "service.beta.kubernetes.io/aws-load-balancer-ssl-ports": "443",
                "service.beta.kubernetes.io/aws-load-balancer-ssl-negotiation-policy": "ELBSecurityPolicy-TLS13-1-2-2021-06",
                "service.beta.kubernetes.io/aws-load-balancer-attributes": "load_balancing.cross_zone.enabled=true",
                "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes": "preserve_client_ip.enabled=true,deregistration_delay.timeout_seconds=120"
            }),
            json!({"ports": [{"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}]}),
        )?,
        // aws-load-balancer-controller: internal NLB in named subnets with
        // pinned private addresses and a TCP health check.
        service(
            "lbc-internal-pinned",
            json!({
                "service.beta.kubernetes.io/aws-load-balancer-type": "external",
                "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "instance",
                "service.beta.kubernetes.io/aws-load-balancer-scheme": "internal",
                "service.beta.kubernetes.io/aws-load-balancer-subnets": private_subnets,
                "service.beta.kubernetes.io/aws-load-balancer-private-ipv4-addresses": "10.0.100.50, 10.0.101.50",
                "service.beta.kubernetes.io/aws-load-balancer-healthcheck-protocol": "tcp",
                "service.beta.kubernetes.io/aws-load-balancer-healthcheck-port": "traffic-port"
            }),
            json!({}),
        )?,
        // aws-load-balancer-controller: UDP and TCP on one port number (TCP_UDP).
        service(
            "lbc-dns",
            json!({
                "service.beta.kubernetes.io/aws-load-balancer-type": "external",
                "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "instance"
            }),
            json!({"ports": [
                {"name": "dns-udp", "port": 53, "targetPort": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "targetPort": 53, "protocol": "TCP"}
            ]}),
        )?,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_nlb_examples_reconcile_without_a_warning() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let client = cluster.client();
    let cert = acm_certificate(&cluster, "example.com")?;
    let mut names: Vec<&str> = cluster
        .aws()
        .subnets
        .iter()
        .filter(|s| s.role == "internal-elb")
        .map(|s| s.name.as_str())
        .collect();
    names.sort();
    let private_subnets = names.join(", ");
    // The examples carry no loadBalancerClass: they are what users already
    // have, served by a controller that owns class-less Services.
    let controller = ControllerProcess::start(&cluster, &["--default-class"])?;
    controller.wait_ready(Duration::from_secs(60))?;

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let mut uids = Vec::new();
    for svc in documented_examples(&cert, &private_subnets)? {
        let created = services.create(&PostParams::default(), &svc).await?;
        uids.push((
            created.metadata.name.clone().unwrap_or_default(),
            created.metadata.uid.clone().unwrap_or_default(),
        ));
    }
    for (name, uid) in &uids {
        wait_for_hostname(&services, name, Duration::from_secs(120))
            .await
            .with_context(|| format!("controller log:\n{}", controller.log()))?;
        // The controller's own: the apiserver's ClusterIP repair loop, racing
        // a Service's creation, once wrote "ClusterIPNotAllocated" here.
        let events = causeway_tests::controller::events_reported_by(
            &client,
            uid,
            Some("causeway-controller"),
        )
        .await?;
        // (Its Normal events are there, so the filter finds its events.)
        assert!(
            events.iter().any(|(t, _, _)| t == "Normal"),
            "{name}: {events:#?}"
        );
        let warnings: Vec<_> = events.iter().filter(|(t, _, _)| t == "Warning").collect();
        assert!(warnings.is_empty(), "{name}: {warnings:#?}");
    }

    // Spot checks that the examples meant what they say.
    let by_name: BTreeMap<&str, &str> =
        uids.iter().map(|(n, u)| (n.as_str(), u.as_str())).collect();
    let internal = aws_resources_of(&cluster, by_name["cpa-internal"])?;
    assert_eq!(internal["load_balancers"][0]["scheme"], "internal");
    let tls = aws_resources_of(&cluster, by_name["lbc-tls"])?;
    assert_eq!(listener(&tls, 443)["protocol"], "TLS");
    assert_eq!(
        target_group(&tls, 443)["attributes"]["deregistration_delay.timeout_seconds"],
        "120"
    );
    let dns = aws_resources_of(&cluster, by_name["lbc-dns"])?;
    assert_eq!(listener(&dns, 53)["protocol"], "TCP_UDP");
    // The Classic-only idle timeout is not silently dropped: a Normal event
    // says it has no effect and what to use instead.
    let tuned_events = events_of(&client, by_name["cpa-tuned"]).await?;
    assert!(
        tuned_events.iter().any(|(t, reason, note)| t == "Normal"
            && reason == "IgnoredAnnotation"
            && note.contains("aws-load-balancer-connection-idle-timeout")
            && note.contains("listener-attributes")),
        "{tuned_events:#?}"
    );
    let tuned = aws_resources_of(&cluster, by_name["cpa-tuned"])?;
    assert_eq!(
        user_tags(&tuned["load_balancers"][0]["tags"]),
        pairs(&[("environment", "prod"), ("owner", "devops")])
    );

    for (name, _) in &uids {
        services.delete(name, &DeleteParams::default()).await?;
    }
    for (name, uid) in &uids {
        wait_until_deleted(&services, name, Duration::from_secs(120)).await?;
        let left = aws_resources_of(&cluster, uid)?;
        assert_eq!(left["load_balancers"], json!([]), "{name}");
        assert_eq!(left["target_groups"], json!([]), "{name}");
    }
    Ok(())
}

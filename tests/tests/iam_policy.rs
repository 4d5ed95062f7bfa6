//! docs/iam-policy.json against the controller: the policy parses, grants
//! exactly the actions the controller's source can call (plus the implicit
//! tag-on-create action), conditions every write on the cluster tag except the
//! documented few, and covers every operation the controller actually called
//! while one LoadBalancer Service went through create, in-place updates, a
//! port added and removed, node exclusion and delete against moto.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use causeway_tests::controller::{ControllerProcess, aws_resources_of, wait_until_deleted};
use causeway_tests::wait::eventually;
use causeway_tests::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const CLASS: &str = "causeway.dev/nlb";
const EXCLUDE: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
const ANNOTATION: &str = "service.beta.kubernetes.io/aws-load-balancer-";

/// Actions AWS authorizes without a call of their own: tags passed in
/// `CreateSecurityGroup`'s `TagSpecifications` are checked as `ec2:CreateTags`.
const IMPLIED: &[&str] = &["ec2:CreateTags"];

/// Writes left unconditioned, as docs/iam-policy.md explains: listeners carry
/// no tag of ours.
const UNCONDITIONED_WRITES: &[&str] = &[
    "elasticloadbalancing:AddListenerCertificates",
    "elasticloadbalancing:DeleteListener",
    "elasticloadbalancing:ModifyListener",
    "elasticloadbalancing:ModifyListenerAttributes",
    "elasticloadbalancing:RemoveListenerCertificates",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn read(relative: &str) -> Result<String> {
    let path = workspace().join(relative);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

const AWS_SOURCES: &[&str] = &[
    "controller/src/aws.rs",
    "controller/src/aws/observe.rs",
    "controller/src/aws/execute.rs",
];

/// `describe_load_balancers` → `DescribeLoadBalancers`.
fn camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Every SDK operation the controller's AWS adapter calls, as IAM actions,
/// read from the source: `self.elb.<op>()` / `self.ec2.<op>()` (whitespace
/// ignored, so chains split over lines count). Also checks that the operation
/// names the adapter counts (`self.call("Op", …)`, `self.all_pages("Op", …)`)
/// are exactly these.
fn actions_in_source() -> Result<BTreeSet<String>> {
    let mut actions = BTreeSet::new();
    let mut counted = BTreeSet::new();
    for file in AWS_SOURCES {
        let text: String = read(file)?.chars().filter(|c| !c.is_whitespace()).collect();
        for (client, prefix) in [("self.elb.", "elasticloadbalancing"), ("self.ec2.", "ec2")] {
            for (at, _) in text.match_indices(client) {
                let rest = &text[at + client.len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .unwrap_or(rest.len());
                if rest[end..].starts_with("()") && end > 0 {
                    actions.insert(format!("{prefix}:{}", camel(&rest[..end])));
                }
            }
        }
        // `all_pages` counts each page through `call`.
        for label in [".call(\"", ".all_pages(\""] {
            for (at, _) in text.match_indices(label) {
                let rest = &text[at + label.len()..];
                if let Some(end) = rest.find('"') {
                    counted.insert(rest[..end].to_string());
                }
            }
        }
    }
    let operations: BTreeSet<String> = actions
        .iter()
        .filter_map(|a| a.split_once(':').map(|(_, op)| op.to_string()))
        .collect();
    assert_eq!(
        counted, operations,
        "the operation labels the adapter counts must be the SDK calls it makes"
    );
    if actions.len() < 20 {
        bail!(
            "found only {} SDK calls in the source: {actions:?}",
            actions.len()
        );
    }
    Ok(actions)
}

/// The policy's statements as (actions, has a condition, condition text).
fn statements(policy: &Value) -> Result<Vec<(Vec<String>, bool, String)>> {
    assert_eq!(policy["Version"], "2012-10-17");
    let list = policy["Statement"]
        .as_array()
        .context("Statement is not a list")?;
    let mut out = Vec::new();
    for s in list {
        assert_eq!(s["Effect"], "Allow", "{s}");
        assert!(
            s.get("Resource").is_some(),
            "a statement without Resource: {s}"
        );
        assert!(s.get("NotAction").is_none() && s.get("NotResource").is_none());
        let actions: Vec<String> = match &s["Action"] {
            Value::String(a) => vec![a.clone()],
            Value::Array(a) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .context("an action is not a string")
                })
                .collect::<Result<_>>()?,
            other => bail!("Action is neither a string nor a list: {other}"),
        };
        for a in &actions {
            assert!(
                !a.contains('*'),
                "wildcard action {a}: list actions exactly"
            );
        }
        let condition = s.get("Condition");
        out.push((
            actions,
            condition.is_some(),
            condition.map(Value::to_string).unwrap_or_default(),
        ));
    }
    Ok(out)
}

fn policy() -> Result<Value> {
    serde_json::from_str(&read("docs/iam-policy.json")?).context("docs/iam-policy.json")
}

fn policy_actions() -> Result<BTreeSet<String>> {
    Ok(statements(&policy()?)?
        .into_iter()
        .flat_map(|(actions, _, _)| actions)
        .collect())
}

#[test]
fn the_policy_grants_exactly_what_the_code_can_call() -> Result<()> {
    let code = actions_in_source()?;
    let granted = policy_actions()?;
    let mut expected = code.clone();
    expected.extend(IMPLIED.iter().map(|a| a.to_string()));
    let missing: Vec<&String> = expected.difference(&granted).collect();
    let extra: Vec<&String> = granted.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docs/iam-policy.json: missing {missing:?}; granted but never called {extra:?}"
    );

    let statements = statements(&policy()?)?;
    for action in &expected {
        let is_read = action
            .split(':')
            .nth(1)
            .is_some_and(|op| op.starts_with("Describe"));
        let holders: Vec<&(Vec<String>, bool, String)> = statements
            .iter()
            .filter(|(actions, _, _)| actions.contains(action))
            .collect();
        if is_read {
            assert!(
                holders.iter().all(|(_, conditioned, _)| !conditioned),
                "{action} is a read and is granted without condition"
            );
        } else if UNCONDITIONED_WRITES.contains(&action.as_str()) {
            assert!(holders.iter().all(|(_, conditioned, _)| !conditioned));
        } else {
            assert!(
                holders
                    .iter()
                    .any(|(_, conditioned, condition)| *conditioned
                        && condition.contains("/kubernetes.io/cluster/CLUSTER_NAME")),
                "{action} is a write and must be conditioned on the cluster tag"
            );
        }
    }
    Ok(())
}

/// Waits until the controller has called every one of `ops` at least once.
async fn called(controller: &ControllerProcess, ops: &[&str]) -> Result<()> {
    eventually(Duration::from_secs(60), &format!("calls {ops:?}"), || {
        let calls = controller.aws_calls();
        async move {
            let calls = calls?;
            Ok(ops.iter().all(|op| calls.contains_key(*op)).then_some(()))
        }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))
}

/// Waits until moto shows `n` target groups for the Service, each with
/// `targets` registered targets, and `n` listeners.
async fn shape(cluster: &Cluster, uid: &str, n: usize, targets: usize) -> Result<()> {
    eventually(
        Duration::from_secs(60),
        &format!("{n} listeners and target groups of {targets} targets"),
        || async move {
            let aws = aws_resources_of(cluster, uid)?;
            let tgs = aws["target_groups"].as_array().cloned().unwrap_or_default();
            let listeners = aws["load_balancers"][0]["listeners"]
                .as_array()
                .map_or(0, Vec::len);
            Ok((tgs.len() == n
                && listeners == n
                && tgs
                    .iter()
                    .all(|tg| tg["targets"].as_array().map_or(0, Vec::len) == targets))
            .then_some(()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_of_a_service_lifecycle_is_in_the_policy() -> Result<()> {
    let code = actions_in_source()?;
    let granted = policy_actions()?;
    let cluster = Cluster::start(ClusterOptions::nodes(2)).await?;
    let client = cluster.client();
    let controller = ControllerProcess::start(&cluster, &[])?;
    controller.wait_ready(Duration::from_secs(60))?;

    // Create.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let service: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "iam-lifecycle"},
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": CLASS,
            "selector": {"run": "iam"},
            "ports": [{"name": "a", "port": 3000, "protocol": "TCP", "nodePort": 30080}]
        }
    }))?;
    let uid = services
        .create(&PostParams::default(), &service)
        .await?
        .metadata
        .uid
        .unwrap_or_default();
    called(
        &controller,
        &["CreateLoadBalancer", "CreateListener", "RegisterTargets"],
    )
    .await?;
    shape(&cluster, &uid, 1, 2).await?;

    // In-place updates: health check, NLB and TG attributes, extra tags.
    let merge = |patch: Value| {
        let services = services.clone();
        async move {
            services
                .patch(
                    "iam-lifecycle",
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await
        }
    };
    let annotate = |annotations: Value| merge(json!({"metadata": {"annotations": annotations}}));
    annotate(json!({
        format!("{ANNOTATION}healthcheck-interval"): "20",
        format!("{ANNOTATION}cross-zone-load-balancing-enabled"): "true",
        format!("{ANNOTATION}proxy-protocol"): "*",
        format!("{ANNOTATION}additional-resource-tags"): "team=iam",
    }))
    .await?;
    called(
        &controller,
        &[
            "ModifyTargetGroup",
            "ModifyLoadBalancerAttributes",
            "ModifyTargetGroupAttributes",
            "AddTags",
        ],
    )
    .await?;
    annotate(json!({format!("{ANNOTATION}additional-resource-tags"): null})).await?;
    called(&controller, &["RemoveTags"]).await?;

    // A port added, then removed.
    let ports = |ports: Value| merge(json!({"spec": {"ports": ports}}));
    let port_a = json!({"name": "a", "port": 3000, "protocol": "TCP", "nodePort": 30080});
    let port_b = json!({"name": "b", "port": 3001, "protocol": "TCP", "nodePort": 30081});
    ports(json!([port_a.clone(), port_b])).await?;
    shape(&cluster, &uid, 2, 2).await?;
    ports(json!([port_a])).await?;
    shape(&cluster, &uid, 1, 2).await?;

    // Node exclusion.
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            &cluster.nodes()[0].name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {EXCLUDE: "true"}}})),
        )
        .await?;
    shape(&cluster, &uid, 1, 1).await?;

    // Delete.
    services
        .delete("iam-lifecycle", &Default::default())
        .await?;
    wait_until_deleted(&services, "iam-lifecycle", Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}; controller log:\n{}", controller.log()))?;

    // Every operation called, with any outcome, maps to a granted action.
    let calls: BTreeMap<String, u64> = controller.aws_calls()?;
    let mut missing = Vec::new();
    let mut exercised = BTreeSet::new();
    for op in calls.keys() {
        let actions: Vec<&String> = code
            .iter()
            .filter(|a| a.split_once(':').is_some_and(|(_, o)| o == op))
            .collect();
        if actions.is_empty() {
            bail!("the controller called {op}, which the source scan did not find");
        }
        for action in actions {
            exercised.insert(action.clone());
            if !granted.contains(action) {
                missing.push(action.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "called but not in docs/iam-policy.json: {missing:?}"
    );
    for op in [
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "RevokeSecurityGroupIngress",
        "DeleteSecurityGroup",
        "CreateLoadBalancer",
        "DeleteLoadBalancer",
        "CreateTargetGroup",
        "DeleteTargetGroup",
        "CreateListener",
        "DeleteListener",
        "RegisterTargets",
        "DeregisterTargets",
    ] {
        assert!(
            calls.contains_key(op),
            "the run should have called {op}: {calls:?}"
        );
    }
    let not_exercised: Vec<&String> = code.difference(&exercised).collect();
    eprintln!("AWS operations called: {calls:?}");
    eprintln!("callable in the source but not exercised by this run: {not_exercised:?}");
    Ok(())
}

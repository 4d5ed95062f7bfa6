//! The Helm chart `charts/causeway`: `helm lint`, `helm template` with the
//! default values and with `ci/full-values.yaml`, every flag it renders is a real
//! flag of the binary it is passed to, every rendered object is accepted by the
//! real apiserver (server-side dry run), and the RBAC it renders is enough for
//! `causeway-controller run` to list/watch and take the lease with its own
//! ServiceAccount's token instead of the admin one. Values reach the containers
//! as the environment variables the programs and the AWS SDK read, values the
//! programs would refuse stop the rendering with a message, and the install
//! notes warn when the agent would depend on the ClusterIP it programs.
//!
//! `helm` is built from its Go module by `e2e/build-helm.sh` (which `e2e/deps.sh`
//! runs) and cached under `<cache>/helm/<version>/helm`; a missing helm fails
//! these tests, it never skips them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use causeway_tests::cluster::{Cluster, ClusterOptions};
use causeway_tests::paths::{cache_dir, repo_root, workspace_bin};
use k8s_openapi::api::core::v1::PodSpec;

const RELEASE: &str = "causeway";
const NAMESPACE: &str = "causeway-system";
/// The Lease namespace `ci/full-values.yaml` sets.
const LEASE_NAMESPACE: &str = "causeway-leases";

fn chart_dir() -> PathBuf {
    repo_root().join("charts/causeway")
}

fn full_values() -> PathBuf {
    chart_dir().join("ci/full-values.yaml")
}

/// The helm that `e2e/build-helm.sh` builds, at the version pinned in
/// `e2e/helm-bin/go.mod`.
fn helm() -> Result<PathBuf> {
    let go_mod = repo_root().join("e2e/helm-bin/go.mod");
    let text = std::fs::read_to_string(&go_mod)
        .with_context(|| format!("cannot read {}", go_mod.display()))?;
    let version = text
        .lines()
        .map(|l| l.trim().trim_start_matches("require").trim())
        .find_map(|l| l.strip_prefix("helm.sh/helm/v3 "))
        .map(|v| v.split_whitespace().next().unwrap_or_default().to_string())
        .with_context(|| format!("no helm.sh/helm/v3 requirement in {}", go_mod.display()))?;
    let path = cache_dir().join("helm").join(&version).join("helm");
    ensure!(
        path.is_file(),
        "helm {version} is missing at {}: run `sudo e2e/deps.sh` (or `bash e2e/build-helm.sh`) to build it",
        path.display()
    );
    Ok(path)
}

/// Runs helm; returns stdout, or fails with its stderr.
fn run_helm(args: &[&str]) -> Result<String> {
    let out = Command::new(helm()?)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run helm")?;
    if !out.status.success() {
        bail!(
            "helm {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm template` of the chart with extra arguments (values).
fn template(extra: &[&str]) -> Result<String> {
    let chart = chart_dir().display().to_string();
    let mut args = vec!["template", RELEASE, &chart, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    run_helm(&args)
}

/// The two renderings every check runs on: defaults (plus the one required
/// value) and every option set.
fn renderings() -> Result<Vec<(&'static str, String)>> {
    let full = full_values().display().to_string();
    Ok(vec![
        ("default", template(&["--set", "clusterName=demo"])?),
        ("full", template(&["--values", &full])?),
    ])
}

/// The rendered documents, as (kind, name) pairs, in order.
fn objects(rendered: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for doc in rendered.split("\n---") {
        let mut kind = None;
        let mut name = None;
        let mut in_metadata = false;
        for line in doc.lines() {
            if let Some(k) = line.strip_prefix("kind: ") {
                kind = Some(k.trim().to_string());
            }
            if line == "metadata:" {
                in_metadata = true;
            } else if in_metadata && let Some(n) = line.strip_prefix("  name: ") {
                name.get_or_insert_with(|| n.trim().to_string());
            } else if !line.starts_with(' ') && !line.is_empty() {
                in_metadata = false;
            }
        }
        if let (Some(k), Some(n)) = (kind, name) {
            out.push((k, n));
        }
    }
    out
}

/// The rendered document of the template `source` (e.g.
/// `agent-daemonset.yaml`), if it rendered one.
fn document<'a>(rendered: &'a str, source: &str) -> Option<&'a str> {
    let marker = format!("# Source: causeway/templates/{source}");
    rendered.split("\n---").find(|d| d.contains(&marker))
}

/// The `--flags` in the container args of the template `source` (e.g.
/// `agent-daemonset.yaml`).
fn rendered_flags(rendered: &str, source: &str) -> Vec<Vec<String>> {
    let Some(doc) = document(rendered, source) else {
        return Vec::new();
    };
    // One list per container: each `args:` starts one.
    let mut containers: Vec<Vec<String>> = Vec::new();
    for line in doc.lines() {
        if line.trim() == "args:" {
            containers.push(Vec::new());
            continue;
        }
        let Some(item) = line.trim().strip_prefix("- ").map(|i| i.trim_matches('"')) else {
            continue;
        };
        if let (Some(flag), Some(container)) = (item.strip_prefix("--"), containers.last_mut()) {
            container.push(flag.split('=').next().unwrap_or_default().to_string());
        }
    }
    containers
}

/// The pod spec of the Deployment or DaemonSet the template `source`
/// rendered.
fn rendered_pod_spec(rendered: &str, source: &str) -> Option<PodSpec> {
    let object: serde_json::Value = serde_yaml::from_str(document(rendered, source)?).ok()?;
    serde_json::from_value(object["spec"]["template"]["spec"].clone()).ok()
}

/// The environment of each container of the template `source`, in order
/// (init containers first): name to value, "" for a `valueFrom`.
fn rendered_env(rendered: &str, source: &str) -> Vec<BTreeMap<String, String>> {
    let Some(spec) = rendered_pod_spec(rendered, source) else {
        return Vec::new();
    };
    spec.init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(spec.containers)
        .map(|container| {
            container
                .env
                .unwrap_or_default()
                .into_iter()
                .map(|var| (var.name, var.value.unwrap_or_default()))
                .collect()
        })
        .collect()
}

/// `helm template` with `clusterName=demo` and each of `sets` as a `--set`.
fn template_with(sets: &[&str]) -> Result<String> {
    let mut args = vec!["--set", "clusterName=demo"];
    for set in sets {
        args.extend(["--set", set]);
    }
    template(&args)
}

/// The long flags `<binary> run --help` lists.
fn help_flags(binary: &str) -> Result<BTreeSet<String>> {
    let out = Command::new(workspace_bin(binary))
        .args(["run", "--help"])
        .output()
        .with_context(|| format!("cannot run {binary} run --help"))?;
    ensure!(out.status.success(), "{binary} run --help failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let flag = l.trim().strip_prefix("--")?;
            Some(
                flag.split([' ', '=', '['])
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect())
}

#[test]
fn chart_lints_renders_and_passes_only_real_flags() -> Result<()> {
    let chart = chart_dir().display().to_string();
    let full = full_values().display().to_string();
    run_helm(&["lint", &chart, "--strict", "--set", "clusterName=demo"])?;
    run_helm(&["lint", &chart, "--strict", "--values", &full])?;

    let controller_flags = help_flags("causeway-controller")?;
    let agent_flags = help_flags("causeway-agent")?;
    for (what, rendered) in renderings()? {
        let kinds: BTreeSet<String> = objects(&rendered).into_iter().map(|(k, _)| k).collect();
        for want in [
            "Deployment",
            "DaemonSet",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "PodDisruptionBudget",
        ] {
            assert!(
                kinds.contains(want),
                "{what} values render no {want}: {kinds:?}"
            );
        }
        for (source, help) in [
            ("controller-deployment.yaml", &controller_flags),
            ("agent-daemonset.yaml", &agent_flags),
        ] {
            let containers = rendered_flags(&rendered, source);
            assert!(
                containers.iter().any(|flags| !flags.is_empty()),
                "{what}: no flags rendered in {source}"
            );
            for flags in &containers {
                let mut seen = BTreeSet::new();
                for flag in flags {
                    assert!(
                        help.contains(flag),
                        "{what}: {source} passes --{flag}, which `run --help` does not list: {help:?}"
                    );
                    assert!(
                        seen.insert(flag),
                        "{what}: {source} passes --{flag} twice (clap rejects that)"
                    );
                }
            }
        }
    }
    let full_rendered = template(&["--values", &full])?;
    for monitor in ["ServiceMonitor", "PodMonitor"] {
        assert!(
            full_rendered.contains(&format!("kind: {monitor}")),
            "full values render no {monitor}"
        );
        assert!(
            !template(&["--set", "clusterName=demo"])?.contains(&format!("kind: {monitor}")),
            "{monitor} is on by default"
        );
    }
    assert!(full_rendered.contains("eks.amazonaws.com/role-arn"));
    // The init container (kube-proxy's --init-only) runs the agent's own
    // arguments; by default there is none.
    let agent_containers = rendered_flags(&full_rendered, "agent-daemonset.yaml");
    assert_eq!(agent_containers.len(), 2, "{agent_containers:?}");
    let (init, agent) = (&agent_containers[0], &agent_containers[1]);
    assert_eq!(
        init.last().map(String::as_str),
        Some("init-only"),
        "{init:?}"
    );
    assert_eq!(init[..init.len() - 1], agent[..]);
    assert_eq!(
        rendered_flags(
            &template(&["--set", "clusterName=demo"])?,
            "agent-daemonset.yaml"
        )
        .len(),
        1
    );
    assert!(full_rendered.contains(&format!("namespace: {LEASE_NAMESPACE}")));

    // Bad values stop the rendering with a sentence that says what to fix.
    let err = template(&[]).expect_err("renders without clusterName");
    assert!(err.to_string().contains("clusterName is required"), "{err}");
    let err = template(&["--set", "clusterName=demo,controller.orphanSweep=maybe"])
        .expect_err("schema accepts orphanSweep=maybe");
    assert!(err.to_string().contains("orphanSweep"), "{err}");
    let err = template(&["--set", "clusterName=demo,controller.typo=1"])
        .expect_err("schema accepts an unknown key");
    assert!(err.to_string().contains("typo"), "{err}");
    let err = template(&[
        "--set",
        "clusterName=demo,controller.leaderElection.enabled=false",
    ])
    .expect_err("two replicas without leader election");
    assert!(err.to_string().contains("leaderElection"), "{err}");
    Ok(())
}

#[test]
fn api_server_values_reach_the_agent_and_its_init_container() -> Result<()> {
    // By default the agent uses the in-cluster defaults (the ClusterIP).
    let default = template_with(&[])?;
    let envs = rendered_env(&default, "agent-daemonset.yaml");
    assert_eq!(envs.len(), 1, "{envs:?}");
    assert!(
        !envs[0].contains_key("KUBERNETES_SERVICE_HOST")
            && !envs[0].contains_key("KUBERNETES_SERVICE_PORT"),
        "{envs:?}"
    );

    // kind / kubeadm: a control-plane address and 6443, in both containers,
    // so that `--init-only` reaches the same API server.
    let kind = template_with(&[
        "agent.initContainer=true",
        "agent.apiServer.host=172.18.0.2",
        "agent.apiServer.port=6443",
    ])?;
    let envs = rendered_env(&kind, "agent-daemonset.yaml");
    assert_eq!(envs.len(), 2, "init and agent: {envs:?}");
    for env in &envs {
        assert_eq!(
            env.get("KUBERNETES_SERVICE_HOST").map(String::as_str),
            Some("172.18.0.2"),
            "{env:?}"
        );
        assert_eq!(
            env.get("KUBERNETES_SERVICE_PORT").map(String::as_str),
            Some("6443"),
            "{env:?}"
        );
        assert!(env.contains_key("NODE_NAME"), "{env:?}");
    }
    // The controller is an ordinary pod: the ClusterIP works for it once the
    // agent runs.
    for env in rendered_env(&kind, "controller-deployment.yaml") {
        assert!(!env.contains_key("KUBERNETES_SERVICE_HOST"), "{env:?}");
    }

    // EKS: the cluster endpoint's host and the default port, 443; an IPv6
    // address goes in bare, as kube-rs and client-go bracket it themselves.
    for (host, port) in [
        ("0123456789ABCDEF.gr7.eu-west-1.eks.amazonaws.com", "443"),
        ("fd00:10:96::1", "443"),
    ] {
        let rendered = template_with(&[&format!("agent.apiServer.host={host}")])?;
        let env = &rendered_env(&rendered, "agent-daemonset.yaml")[0];
        assert_eq!(env["KUBERNETES_SERVICE_HOST"], host);
        assert_eq!(env["KUBERNETES_SERVICE_PORT"], port);
    }

    // A URL or a host:port is not a host.
    for host in ["https://172.18.0.2", "172.18.0.2:6443"] {
        let err = template_with(&[&format!("agent.apiServer.host={host}")])
            .expect_err("schema accepts a host with a scheme or port");
        assert!(err.to_string().contains("agent/apiServer/host"), "{err}");
    }
    Ok(())
}

#[test]
fn aws_endpoint_values_set_the_sdks_global_and_per_service_variables() -> Result<()> {
    let controller_env = |rendered: &str| -> BTreeMap<String, String> {
        let envs = rendered_env(rendered, "controller-deployment.yaml");
        assert_eq!(envs.len(), 1, "{envs:?}");
        envs.into_iter().next().unwrap_or_default()
    };
    let endpoints = |env: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        env.iter()
            .filter(|(k, _)| k.starts_with("AWS_ENDPOINT_URL"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert!(endpoints(&controller_env(&template_with(&[])?)).is_empty());

    // An emulator for every service.
    let env = controller_env(&template_with(&["awsEndpoint=http://moto:5000"])?);
    assert_eq!(
        endpoints(&env),
        BTreeMap::from([("AWS_ENDPOINT_URL".into(), "http://moto:5000".into())])
    );

    // VPC interface endpoints for ELBv2 and EC2 only: STS (IRSA) keeps its own.
    let elbv2 = "https://vpce-1-elasticloadbalancing.eu-west-1.vpce.amazonaws.com";
    let ec2 = "https://vpce-1-ec2.eu-west-1.vpce.amazonaws.com";
    let env = controller_env(&template_with(&[
        &format!("awsServiceEndpoints.elbv2={elbv2}"),
        &format!("awsServiceEndpoints.ec2={ec2}"),
    ])?);
    assert_eq!(
        endpoints(&env),
        BTreeMap::from([
            (
                "AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING_V2".into(),
                elbv2.into()
            ),
            ("AWS_ENDPOINT_URL_EC2".into(), ec2.into()),
        ])
    );

    let err = template_with(&["awsServiceEndpoints.ec2=ec2.example.com"])
        .expect_err("schema accepts an endpoint without a scheme");
    assert!(err.to_string().contains("awsServiceEndpoints/ec2"), "{err}");
    Ok(())
}

#[test]
fn a_loopback_metrics_address_is_never_scraped_in_either_family() -> Result<()> {
    let has_metrics_port = |rendered: &str| {
        document(rendered, "agent-daemonset.yaml").is_some_and(|d| d.contains("- name: metrics"))
    };
    for loopback in ["127.0.0.1:10249", "[::1]:10249", "[0:0:0:0:0:0:0:1]:10249"] {
        let rendered = template_with(&[&format!("agent.metricsBindAddress={loopback}")])?;
        assert!(
            !has_metrics_port(&rendered),
            "{loopback} is exposed as a containerPort"
        );
        let err = template_with(&[
            &format!("agent.metricsBindAddress={loopback}"),
            "agent.podMonitor.enabled=true",
        ])
        .expect_err("a PodMonitor of a loopback address");
        assert!(
            err.to_string()
                .contains(&format!("not the loopback address {loopback}")),
            "{err}"
        );
    }
    for reachable in ["0.0.0.0:10249", "[::]:10249"] {
        let rendered = template_with(&[
            &format!("agent.metricsBindAddress={reachable}"),
            "agent.podMonitor.enabled=true",
        ])?;
        let agent = document(&rendered, "agent-daemonset.yaml").unwrap_or_default();
        assert!(
            agent.contains("- name: metrics\n              containerPort: 10249\n"),
            "{reachable}: no metrics port 10249:\n{agent}"
        );
        assert!(
            document(&rendered, "agent-podmonitor.yaml").is_some(),
            "{reachable}: no PodMonitor"
        );
    }
    // The agent takes an IP, as kube-proxy does: a host name is refused here
    // rather than at the agent's start.
    let err = template_with(&["agent.metricsBindAddress=localhost:10249"])
        .expect_err("schema accepts a host name");
    assert!(
        err.to_string().contains("agent/metricsBindAddress"),
        "{err}"
    );
    Ok(())
}

#[test]
fn values_the_controller_would_refuse_stop_the_rendering() -> Result<()> {
    // The controller exits at start when the lease would expire before the
    // leader renews it.
    for renew in ["15", "20"] {
        let err = template_with(&[&format!("controller.leaderElection.renewDeadline={renew}")])
            .expect_err("renewDeadline >= leaseDuration");
        assert!(
            err.to_string().contains(&format!(
                "controller.leaderElection.renewDeadline ({renew}) must be shorter than controller.leaderElection.leaseDuration (15)"
            )),
            "{err}"
        );
    }
    // Without leader election the timings are not used.
    template_with(&[
        "controller.replicas=1",
        "controller.leaderElection.enabled=false",
        "controller.leaderElection.renewDeadline=20",
    ])?;

    // Go durations reach the flag as written; zero is refused.
    for period in ["10m", "1h30m", "500ms", "10m0s", "90s"] {
        let rendered = template_with(&[&format!("controller.driftAuditPeriod={period}")])?;
        assert!(
            rendered.contains(&format!("- --drift-audit-period={period}\n")),
            "{period} is not passed as --drift-audit-period"
        );
    }
    for period in ["0s", "0m0s", "00h", "10", "1d"] {
        let err = template_with(&[&format!("controller.driftAuditPeriod={period}")])
            .expect_err("schema accepts a zero or malformed drift-audit period");
        assert!(
            err.to_string().contains("controller/driftAuditPeriod"),
            "{period}: {err}"
        );
    }

    // EKS cluster names go up to 100 characters.
    template_with(&[&format!("clusterName={}", "c".repeat(100))])?;
    let err = template_with(&[&format!("clusterName={}", "c".repeat(101))])
        .expect_err("schema accepts a 101-character cluster name");
    assert!(err.to_string().contains("clusterName"), "{err}");
    Ok(())
}

/// Minimal CRDs for the Prometheus operator's ServiceMonitor and PodMonitor, so
/// that the apiserver can validate the objects the chart renders for them.
fn monitoring_crds() -> String {
    ["ServiceMonitor", "PodMonitor"]
        .iter()
        .map(|kind| {
            let plural = format!("{}s", kind.to_lowercase());
            format!(
                "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {plural}.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {{kind: {kind}, listKind: {kind}List, plural: {plural}, singular: {singular}}}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          x-kubernetes-preserve-unknown-fields: true
",
                singular = kind.to_lowercase()
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Writes `text` to a file in the environment's directory; returns its path.
fn write(cluster: &Cluster, name: &str, text: &str) -> Result<String> {
    let path = cluster.dir().join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_accepts_every_rendered_object_and_the_rbac_runs_both_programs() -> Result<()> {
    let renderings = renderings()?;
    let cluster = Cluster::start(ClusterOptions::nodes(1)).await?;
    cluster.kubectl(&["create", "namespace", NAMESPACE])?;
    cluster.kubectl(&["create", "namespace", LEASE_NAMESPACE])?;
    let crds = write(&cluster, "monitoring-crds.yaml", &monitoring_crds())?;
    cluster.kubectl(&["apply", "-f", &crds])?;
    cluster.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/podmonitors.monitoring.coreos.com",
    ])?;

    for (what, rendered) in &renderings {
        let file = write(&cluster, &format!("chart-{what}.yaml"), rendered)?;
        let accepted =
            cluster.kubectl(&["apply", "--dry-run=server", "-f", &file, "-o", "name"])?;
        let accepted: BTreeSet<String> = accepted
            .lines()
            .map(|l| l.rsplit('/').next().unwrap_or_default().to_string())
            .collect();
        let expected = objects(rendered);
        assert!(expected.len() >= 10, "{what}: only {expected:?}");
        for (kind, name) in &expected {
            assert!(
                accepted.contains(name),
                "{what}: the apiserver's dry run did not accept {kind} {name}: {accepted:?}"
            );
        }
        // The dry run created nothing.
        assert!(
            cluster
                .kubectl(&["get", "deployments,daemonsets", "-A", "-o", "name"])?
                .trim()
                .is_empty()
        );
    }

    // The notes `helm install` prints warn about the agent's API server
    // address while it is left to the ClusterIP the agent programs itself.
    let chart = chart_dir().display().to_string();
    let admin_kubeconfig = cluster.kubeconfig().display().to_string();
    let notes = |extra: &[&str]| -> Result<String> {
        let mut args = vec![
            "install",
            RELEASE,
            &chart,
            "--namespace",
            NAMESPACE,
            "--kubeconfig",
            &admin_kubeconfig,
            "--dry-run=server",
            "--set",
            "clusterName=demo",
        ];
        args.extend_from_slice(extra);
        let out = run_helm(&args)?;
        Ok(out
            .split_once("NOTES:")
            .map(|(_, n)| n.to_string())
            .unwrap_or_default())
    };
    let default_notes = notes(&[])?;
    assert!(
        default_notes.contains("WARNING: agent.apiServer.host is empty"),
        "{default_notes}"
    );
    let set_notes = notes(&["--set", "agent.apiServer.host=172.18.0.2"])?;
    assert!(set_notes.contains("health checks"), "{set_notes}");
    assert!(!set_notes.contains("WARNING"), "{set_notes}");

    // RBAC sufficiency: apply the default rendering's ServiceAccount and RBAC
    // for real, and run the controller with that ServiceAccount's token.
    let (_, default) = &renderings[0];
    let rbac: Vec<&str> = default
        .split("\n---")
        .filter(|d| {
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
            ]
            .iter()
            .any(|k| d.contains(&format!("\nkind: {k}\n")))
        })
        .collect();
    let rbac_file = write(&cluster, "chart-rbac.yaml", &rbac.join("\n---"))?;
    cluster.kubectl(&["apply", "-f", &rbac_file])?;
    let sa = format!("{RELEASE}-controller");
    let token = cluster.kubectl(&["create", "token", &sa, "-n", NAMESPACE, "--duration=1h"])?;
    let kubeconfig = cluster.kubeconfig_with_token("controller", token.trim())?;
    // The ServiceAccount can do exactly what the controller needs, and no more.
    for (verb, resource, ns, want) in [
        ("watch", "services", "", "yes"),
        ("patch", "services/status", "", "yes"),
        ("watch", "nodes", "", "yes"),
        ("watch", "endpointslices.discovery.k8s.io", "", "yes"),
        ("patch", "leases/causeway-controller", NAMESPACE, "yes"),
        ("patch", "leases/other", NAMESPACE, "no"),
        ("create", "services", "", "no"),
        ("list", "secrets", "", "no"),
        ("patch", "nodes", "", "no"),
        ("create", "events.events.k8s.io", "", "yes"),
    ] {
        let mut args = vec!["auth", "can-i", verb, resource];
        if ns.is_empty() {
            args.push("--all-namespaces");
        } else {
            args.extend(["-n", ns]);
        }
        let out = kubectl_as(&cluster, &kubeconfig, &args);
        assert_eq!(
            out.trim(),
            want,
            "controller ServiceAccount: can-i {verb} {resource}"
        );
    }

    let health = free_port()?;
    let metrics = free_port()?;
    let mut env = cluster.env_vars();
    env.retain(|(k, _)| k != "KUBECONFIG");
    env.push(("POD_NAMESPACE".into(), NAMESPACE.into()));
    env.push(("RUST_LOG".into(), "info".into()));
    let controller_bin = workspace_bin("causeway-controller");
    cluster.spawn_host(
        "chart-controller",
        &controller_bin,
        &[
            "run",
            "--cluster-name",
            cluster.cluster_name(),
            "--kubeconfig",
            &kubeconfig,
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
            "--health-addr",
            &format!("127.0.0.1:{health}"),
        ],
        &env,
    )?;
    let log = cluster.dir().join("chart-controller.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let leader = http_get(metrics, "/metrics")
            .map(|m| m.lines().any(|l| l == "causeway_leader 1"))
            .unwrap_or(false);
        let ready = http_get(health, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200"));
        if leader && ready {
            assert!(
                !text.contains("forbidden") && !text.contains("Forbidden"),
                "the controller was refused something with the chart's RBAC:\n{text}"
            );
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "with the chart's ServiceAccount the controller did not take the lease and sync (leader {leader}, ready {ready}):\n{text}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let holder = cluster.kubectl(&[
        "get",
        "lease",
        "causeway-controller",
        "-n",
        NAMESPACE,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    assert!(!holder.trim().is_empty(), "the Lease has no holder");

    // A LoadBalancer Service of our class: the controller builds its NLB in
    // moto and records the event, all under the chart's RBAC.
    let lb = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"lb","namespace":"default"},
        "spec":{"type":"LoadBalancer","loadBalancerClass":"causeway.dev/nlb",
                "ports":[{"port":80,"targetPort":80}]}}"#;
    let lb_file = write(&cluster, "chart-lb.json", lb)?;
    cluster.kubectl(&["apply", "-f", &lb_file])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hostname = cluster.kubectl(&[
            "get",
            "svc",
            "lb",
            "-n",
            "default",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].hostname}",
        ])?;
        let events = cluster.kubectl(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            "involvedObject.name=lb",
            "-o",
            "jsonpath={.items[*].reason}",
        ])?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !text.contains("forbidden") && !text.contains("Forbidden"),
            "the controller was refused something with the chart's RBAC:\n{text}"
        );
        if !hostname.trim().is_empty() && events.contains("EnsuredLoadBalancer") {
            break;
        }
        if Instant::now() > deadline {
            bail!("under the chart's RBAC: hostname {hostname:?}, events {events:?}\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The agent, under its own ServiceAccount, in node-1's namespace: it
    // syncs a Service's rules and reports a skipped object with an event
    // without being refused anything.
    let agent_sa = format!("{RELEASE}-agent");
    let token = cluster.kubectl(&[
        "create",
        "token",
        &agent_sa,
        "-n",
        NAMESPACE,
        "--duration=1h",
    ])?;
    let agent_kubeconfig = cluster.kubeconfig_with_token("agent", token.trim())?;
    for (verb, resource, want) in [
        ("watch", "services", "yes"),
        ("watch", "endpointslices.discovery.k8s.io", "yes"),
        ("watch", "nodes", "yes"),
        ("create", "events.events.k8s.io", "yes"),
        ("patch", "services", "no"),
        ("list", "secrets", "no"),
    ] {
        let out = kubectl_as(
            &cluster,
            &agent_kubeconfig,
            &["auth", "can-i", verb, resource, "--all-namespaces"],
        );
        assert_eq!(
            out.trim(),
            want,
            "agent ServiceAccount: can-i {verb} {resource}"
        );
    }
    let node = cluster.node("node-1").clone();
    cluster.spawn_in(
        &node.netns,
        "chart-agent",
        &workspace_bin("causeway-agent"),
        &[
            "run",
            "--node-name",
            "node-1",
            "--kubeconfig",
            &agent_kubeconfig,
            "--cluster-cidr",
            &cluster.cluster_cidr(),
        ],
    )?;
    let web = cluster
        .add_pod("node-1", "web-1", &[("app", "web")])
        .await?;
    let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"default"},
        "spec":{"selector":{"app":"web"},"ports":[{"port":80,"targetPort":80}]}}"#;
    let svc_file = write(&cluster, "chart-web.json", svc)?;
    cluster.kubectl(&["apply", "-f", &svc_file])?;
    let log = cluster.dir().join("chart-agent.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let rules = causeway_tests::netns::exec_in(&node.netns, "iptables-save", &["-t", "nat"])
            .unwrap_or_default();
        if rules.contains("default/web cluster IP") && rules.contains(&format!("{}:80", web.ip)) {
            assert!(
                !text.contains("forbidden") && !text.contains("Forbidden"),
                "the agent was refused something with the chart's RBAC:\n{text}"
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("with the chart's ServiceAccount the agent did not program default/web:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// kubectl with another kubeconfig; stdout whatever the exit status (`auth
/// can-i` exits 1 when the answer is no).
fn kubectl_as(cluster: &Cluster, kubeconfig: &str, args: &[&str]) -> String {
    Command::new(cluster.bin_dir().join("kubectl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A plain HTTP/1.1 GET on localhost; the whole response (status line first).
fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

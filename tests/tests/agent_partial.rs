//! A partial sync leaves netfilter exactly as a full sync would: one
//! namespace gets the full ruleset of "before" and then the partial payload
//! for "after"; another gets the full ruleset of "after"; their rules must be
//! the same, with both iptables backends.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, bail};
use causeway_agent::addr::IpFamily;
use causeway_agent::manifests;
use causeway_agent::model::{self, Model, NodeInfo};
use causeway_agent::rules::{
    self, DISPATCH_BUCKET_PREFIX, Dispatch, FORMER_DISPATCH_BUCKET_PREFIX, Partial, RenderConfig,
    RenderOptions,
};
use causeway_tests::netns;

const BEFORE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
- {addresses: [10.244.2.5], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: shop}
spec:
  clusterIP: 10.96.0.53
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: shop, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5353, protocol: TCP}]
endpoints:
- {addresses: [10.244.2.9], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: gone, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.77
  ports: [{name: http, port: 80, nodePort: 30077}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: gone-1, namespace: shop, labels: {kubernetes.io/service-name: gone}}
addressType: IPv4
ports: [{name: http, port: 80}]
endpoints:
- {addresses: [10.244.1.7], nodeName: node-a}
"#;

const AFTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
- {addresses: [10.244.3.5], nodeName: node-c}
- {addresses: [10.244.3.6], nodeName: node-c}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: shop}
spec:
  clusterIP: 10.96.0.53
  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: shop-lb, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.88
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports: [{name: https, port: 443, nodePort: 30443}]
status:
  loadBalancer: {ingress: [{ip: 198.51.100.7}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: shop-lb-1, namespace: shop, labels: {kubernetes.io/service-name: shop-lb}}
addressType: IPv4
ports: [{name: https, port: 443}]
endpoints:
- {addresses: [10.244.1.8], nodeName: node-a}
"#;

fn model_of(yaml: &str, dir: &std::path::Path, name: &str) -> Result<Model> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml)?;
    let manifests = manifests::load(&[path])?;
    let node = NodeInfo {
        name: "node-a".into(),
        zone: None,
        internal_ips: vec!["192.168.0.10".parse()?],
        pod_cidrs: Vec::new(),
    };
    let (model, issues) = model::build(
        &manifests.services,
        &manifests.endpoint_slices,
        &node,
        IpFamily::V4,
    );
    if !issues.is_empty() {
        bail!("{issues:?}");
    }
    Ok(model)
}

fn restore(ns: &str, program: &str, payload: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program, "--noflush"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(payload.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program}: {}\n{payload}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Chains and rules of the filter and nat tables, order within a chain kept
/// only where it matters to us: compared as sets (of rules with their
/// copies counted), since a partial sync
/// inserts new dispatch entries first. The NodePort catch-all must still be
/// the last rule of nat KUBE-SERVICES, checked separately.
fn ruleset(ns: &str, save: &str) -> Result<BTreeSet<String>> {
    let mut set = BTreeSet::new();
    for table in ["filter", "nat"] {
        let text = netns::exec_in(ns, save, &["-t", table])?;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with("-A ") {
                // A rule written twice is two entries.
                let rule = format!("{table} {line}");
                let copies = seen.entry(rule.clone()).or_default();
                *copies += 1;
                set.insert(match *copies {
                    1 => rule,
                    n => format!("{rule} (copy {n})"),
                });
            } else if let Some(decl) = line.strip_prefix(':') {
                set.insert(format!(
                    "{table} chain {}",
                    decl.split_whitespace().next().unwrap_or("")
                ));
            }
        }
    }
    Ok(set)
}

/// Loads `steps` one after the other into one namespace and `want` alone
/// into another, with each backend; the rules must end the same, and the
/// NodePort catch-all last in nat KUBE-SERVICES.
fn assert_steps_end_as(steps: &[&str], want: &str) -> Result<()> {
    assert_ends_as(want, |ns, restore_program, _| {
        steps
            .iter()
            .try_for_each(|step| restore(ns, restore_program, step))
    })
}

/// Runs `steps(namespace, restore program, save program)` in one namespace
/// and loads `want` alone into another, with each backend; the rules must
/// end the same, and the NodePort catch-all last in nat KUBE-SERVICES.
fn assert_ends_as(want: &str, steps: impl Fn(&str, &str, &str) -> Result<()>) -> Result<()> {
    for (restore_program, save) in [
        ("iptables-nft-restore", "iptables-nft-save"),
        ("iptables-legacy-restore", "iptables-legacy-save"),
    ] {
        // Tests run in parallel threads of one process.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let stepped = netns::Scoped::add(format!("cwpa-{id}"))?;
        let direct = netns::Scoped::add(format!("cwpb-{id}"))?;
        steps(&stepped.0, restore_program, save)?;
        restore(&direct.0, restore_program, want)?;
        let got = ruleset(&stepped.0, save)?;
        let want = ruleset(&direct.0, save)?;
        let missing: Vec<&String> = want.difference(&got).collect();
        let extra: Vec<&String> = got.difference(&want).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{restore_program}: after the steps\n  missing {missing:#?}\n  extra {extra:#?}"
        );
        let services = netns::exec_in(&stepped.0, save, &["-t", "nat"])?;
        let last = services
            .lines()
            .rfind(|l| l.starts_with("-A KUBE-SERVICES "))
            .unwrap_or("");
        assert!(
            last.contains("-j KUBE-NODEPORTS"),
            "{restore_program}: last rule {last}"
        );
    }
    Ok(())
}

/// A full payload of `model` as `run` writes its first: built-in jumps
/// included, the `stale` nat chains deleted.
fn full_payload(
    model: &Model,
    config: &RenderConfig,
    dispatch: Dispatch,
    stale: &[String],
) -> rules::Payload {
    rules::render(
        model,
        config,
        &RenderOptions {
            builtin_jumps: &rules::builtin_jumps(config),
            delete_nat_chains: stale,
            dispatch,
            ..RenderOptions::default()
        },
    )
}

/// The nat service chains namespace `ns` holds, listed as the agent lists
/// them at start.
fn service_chains_in(ns: &str, save: &str) -> Result<Vec<String>> {
    Ok(causeway_agent::netfilter::service_chains_in_save(
        &netns::exec_in(ns, save, &["-t", "nat"])?,
    ))
}

fn node_config() -> Result<RenderConfig> {
    Ok(RenderConfig {
        node_ips: vec!["192.168.0.10".parse()?],
        ..RenderConfig::new(IpFamily::V4)
    })
}

#[test]
fn a_partial_sync_ends_where_a_full_sync_would_with_both_backends_and_layouts() -> Result<()> {
    netns::preflight()?;
    let dir = tempfile::tempdir()?;
    let before = model_of(BEFORE, dir.path(), "before")?;
    let after = model_of(AFTER, dir.path(), "after")?;
    let config = node_config()?;
    let jumps = rules::builtin_jumps(&config);
    for dispatch in [Dispatch::Flat, Dispatch::Buckets] {
        let full = |model: &Model| {
            rules::render(
                model,
                &config,
                &RenderOptions {
                    builtin_jumps: &jumps,
                    dispatch,
                    ..RenderOptions::default()
                },
            )
        };
        let first = full(&before);
        let changed = rules::changed_ports(&before, &after);
        assert_eq!(changed.len(), 5, "web, dns ×2, gone, shop-lb: {changed:?}");
        let partial = rules::render(
            &after,
            &config,
            &RenderOptions {
                delete_nat_chains: &first.service_chains,
                partial: Some(Partial {
                    only: &changed,
                    previous: &before,
                    applied_chains: &first.service_chains,
                    applied_totals: first.totals,
                }),
                dispatch,
                ..RenderOptions::default()
            },
        );
        assert!(
            !partial.text.contains(":KUBE-SERVICES")
                && !partial.text.contains(&format!(":{DISPATCH_BUCKET_PREFIX}")),
            "{dispatch:?}: a partial payload never flushes a dispatch chain or bucket"
        );
        if dispatch == Dispatch::Buckets {
            // shop-lb's cluster IP 10.96.0.88 is in bucket 88 % 64 = 24.
            assert!(
                partial.text.contains("-I KUBE-SVC-0BUCKET-24 1 "),
                "{}",
                partial.text
            );
        }
        let whole = full(&after);
        // What the metrics report: the rules each table holds afterwards.
        assert_eq!(
            partial.totals, whole.totals,
            "{dispatch:?}: rule totals after the partial sync"
        );
        assert_steps_end_as(&[&first.text, &partial.text], &whole.text)?;
    }
    Ok(())
}

#[test]
fn a_full_sync_that_changes_the_dispatch_layout_leaves_no_trace_of_the_old_one() -> Result<()> {
    netns::preflight()?;
    let dir = tempfile::tempdir()?;
    let model = model_of(AFTER, dir.path(), "after")?;
    let config = node_config()?;
    let jumps = rules::builtin_jumps(&config);
    let render = |dispatch: Dispatch, jumps: &[rules::JumpRule], stale: &[String]| {
        rules::render(
            &model,
            &config,
            &RenderOptions {
                builtin_jumps: jumps,
                delete_nat_chains: stale,
                dispatch,
                ..RenderOptions::default()
            },
        )
    };
    for (from, to) in [
        (Dispatch::Flat, Dispatch::Buckets),
        (Dispatch::Buckets, Dispatch::Flat),
    ] {
        let first = render(from, &jumps, &[]);
        // As `run` does it: the built-in jumps exist already; the chains
        // applied before are candidates for deletion.
        let second = render(to, &[], &first.service_chains);
        let fresh = render(to, &jumps, &[]);
        assert_steps_end_as(&[&first.text, &second.text], &fresh.text)?;
    }
    Ok(())
}

/// The nat table kube-proxy would leave for BEFORE's `web` plus a Service
/// that is gone: a chain per endpoint, and chains jumping to chains.
fn kube_proxy_ruleset(web_chain: &str) -> String {
    format!(
        "*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-MARK-MASQ - [0:0]
:{web_chain} - [0:0]
:KUBE-SEP-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-ZZZZZZZZZZZZZZZZ - [0:0]
:KUBE-EXT-OLDOLDOLDOLDOLDO - [0:0]
:KUBE-SVC-OLDOLDOLDOLDOLDO - [0:0]
:KUBE-SEP-MMMMMMMMMMMMMMMM - [0:0]
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j {web_chain}
-A KUBE-SERVICES -d 10.96.0.99/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-OLDOLDOLDOLDOLDO
-A KUBE-NODEPORTS -p tcp -m tcp --dport 30099 -j KUBE-EXT-OLDOLDOLDOLDOLDO
-A KUBE-EXT-OLDOLDOLDOLDOLDO -j KUBE-MARK-MASQ
-A KUBE-EXT-OLDOLDOLDOLDOLDO -j KUBE-SVC-OLDOLDOLDOLDOLDO
-A {web_chain} -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-AAAAAAAAAAAAAAAA
-A {web_chain} -j KUBE-SEP-ZZZZZZZZZZZZZZZZ
-A KUBE-SVC-OLDOLDOLDOLDOLDO -j KUBE-SEP-MMMMMMMMMMMMMMMM
-A KUBE-SEP-AAAAAAAAAAAAAAAA -s 10.244.1.5/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-AAAAAAAAAAAAAAAA -p tcp -m tcp -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SEP-ZZZZZZZZZZZZZZZZ -s 10.244.2.5/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-ZZZZZZZZZZZZZZZZ -p tcp -m tcp -j DNAT --to-destination 10.244.2.5:8080
-A KUBE-SEP-MMMMMMMMMMMMMMMM -p tcp -m tcp -j DNAT --to-destination 10.244.1.9:80
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
COMMIT
"
    )
}

#[test]
fn taking_over_from_kube_proxy_deletes_its_chains_in_one_restore_with_both_backends() -> Result<()>
{
    netns::preflight()?;
    let dir = tempfile::tempdir()?;
    let after = model_of(AFTER, dir.path(), "after")?;
    let web = after
        .service_ports
        .iter()
        .find(|p| p.name.name == "web")
        .expect("web in AFTER");
    let web_chain = rules::names::ServiceChains::new(&web.name, web.protocol).cluster;
    let config = node_config()?;
    let render = |stale: &[String]| full_payload(&after, &config, Dispatch::Flat, stale);
    assert_ends_as(&render(&[]).text, |ns, restore_program, save| {
        restore(ns, restore_program, &kube_proxy_ruleset(&web_chain))?;
        // What the agent does at start: list the service chains that exist,
        // then one full restore that deletes those it does not declare.
        let existing = service_chains_in(ns, save)?;
        assert_eq!(existing.len(), 6, "{existing:?}");
        restore(ns, restore_program, &render(&existing).text)
    })?;
    Ok(())
}

/// Earlier versions named the buckets `KUBE-SERVICES-<n>`. An upgraded
/// agent's first sync finds them, as any service chain, and deletes them in
/// the restore that writes the buckets under their new names.
#[test]
fn an_upgraded_agent_deletes_the_buckets_of_their_former_names_with_both_backends() -> Result<()> {
    netns::preflight()?;
    let dir = tempfile::tempdir()?;
    let model = model_of(AFTER, dir.path(), "after")?;
    let config = node_config()?;
    let full = full_payload(&model, &config, Dispatch::Buckets, &[]).text;
    let former = full.replace(DISPATCH_BUCKET_PREFIX, FORMER_DISPATCH_BUCKET_PREFIX);
    assert_ends_as(&full, |ns, restore_program, save| {
        restore(ns, restore_program, &former)?;
        let existing = service_chains_in(ns, save)?;
        assert!(
            existing.iter().any(|c| c == "KUBE-SERVICES-24"),
            "{existing:?}"
        );
        assert_eq!(
            Dispatch::of_chains(&existing),
            Dispatch::Buckets,
            "the former buckets are a bucket layout"
        );
        // As `run` renders it: the built-in jumps are there already.
        let upgrade = rules::render(
            &model,
            &config,
            &RenderOptions {
                delete_nat_chains: &existing,
                dispatch: Dispatch::Buckets,
                ..RenderOptions::default()
            },
        );
        restore(ns, restore_program, &upgrade.text)
    })?;
    Ok(())
}

/// `kube-proxy --cleanup` (v1.34.4, the real one) removes a bucketed
/// ruleset of the agent's: kube-proxy deletes every `KUBE-SVC-` chain, and
/// the buckets are among them. With buckets named outside kube-proxy's
/// prefixes, the cleanup could not delete the service chains they jump to.
#[test]
fn kube_proxys_cleanup_removes_a_bucketed_ruleset_with_both_backends() -> Result<()> {
    netns::preflight()?;
    let dir = tempfile::tempdir()?;
    let model = model_of(AFTER, dir.path(), "after")?;
    let payload = full_payload(&model, &node_config()?, Dispatch::Buckets, &[]);
    let kube_proxy = causeway_tests::cluster::kube_proxy_binary()?;
    for backend in ["nft", "legacy"] {
        let ns = netns::Scoped::add(format!("cwpk-{}-{backend}", std::process::id()))?;
        restore(&ns.0, &format!("iptables-{backend}-restore"), &payload.text)?;
        let save = format!("iptables-{backend}-save");
        assert!(
            netns::exec_in(&ns.0, &save, &["-t", "nat"])?
                .contains(&format!(":{}", rules::dispatch_bucket_chain(24))),
            "{backend}: the buckets are loaded"
        );
        // kube-proxy runs plain `iptables`, `iptables-save` and so on.
        let path = netns::iptables_path(backend, dir.path())?;
        let out = Command::new("timeout")
            .args(["60", "ip", "netns", "exec", &ns.0])
            .arg(&kube_proxy)
            .args(["--cleanup", "--v=2"])
            .env("PATH", path)
            .env_remove("KUBECONFIG")
            .output()?;
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{backend}: kube-proxy --cleanup:\n{log}"
        );
        assert!(!log.contains("Failed to execute"), "{backend}:\n{log}");
        let left: Vec<String> = netns::exec_in(&ns.0, &save, &[])?
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|chain| chain.starts_with("KUBE-"))
            .map(str::to_string)
            .collect();
        // KUBE-FIREWALL, the localhost guard, is kubelet's chain as well,
        // which kube-proxy leaves.
        assert_eq!(left, ["KUBE-FIREWALL"], "{backend}: chains left");
    }
    Ok(())
}

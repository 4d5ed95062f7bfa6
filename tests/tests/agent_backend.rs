//! The agent refuses to program one iptables backend while the other already
//! holds Service rules (SPEC 2.2), and `cleanup` takes exactly those away.

use anyhow::Result;
use causeway_tests::netns;
use causeway_tests::paths::workspace_bin;

fn agent(ns: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = netns::exec_in_raw(
        ns,
        &workspace_bin("causeway-agent").display().to_string(),
        args,
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn rules_in_the_other_backend_stop_the_agent_with_a_clear_message() -> Result<()> {
    netns::preflight()?;
    let ns = netns::Scoped::add(format!("cwbk-{}", std::process::id()))?;
    // What kube-proxy in legacy mode leaves behind, plus a rule of its own
    // that cleanup must keep.
    netns::exec_in(
        &ns.0,
        "iptables-legacy",
        &["-t", "nat", "-N", "KUBE-SERVICES"],
    )?;
    netns::exec_in(
        &ns.0,
        "iptables-legacy",
        &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
    )?;
    netns::exec_in(
        &ns.0,
        "iptables-legacy",
        &["-t", "filter", "-N", "SOMEONE-ELSE"],
    )?;

    let run = [
        "run",
        "--node-name",
        "node-1",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
        "--iptables-backend",
        "nft",
    ];
    let (ok, text) = agent(&ns.0, &run)?;
    assert!(!ok, "the agent must not start: {text}");
    assert!(
        text.contains("iptables-legacy-save already holds Service rules (nat/KUBE-SERVICES)")
            && text.contains("causeway-agent cleanup --iptables-backend legacy"),
        "{text}"
    );
    let nft = netns::exec_in(&ns.0, "iptables-nft-save", &[])?;
    assert!(!nft.contains("KUBE-"), "nothing was written to nft: {nft}");

    let (ok, text) = agent(&ns.0, &["cleanup", "--iptables-backend", "legacy"])?;
    assert!(ok, "{text}");
    let legacy = netns::exec_in(&ns.0, "iptables-legacy-save", &[])?;
    assert!(!legacy.contains("KUBE-"), "{legacy}");
    assert!(
        legacy.contains(":SOMEONE-ELSE"),
        "cleanup kept the other chain: {legacy}"
    );

    // Now the backend check passes and the agent gets as far as its kubeconfig.
    let (ok, text) = agent(&ns.0, &run)?;
    assert!(!ok && text.contains("/nonexistent/kubeconfig"), "{text}");
    Ok(())
}

/// A program and its arguments.
type Command<'a> = (&'a str, &'a [&'a str]);

/// `auto`, the default, keeps Service rules where they are when one
/// backend holds them (kube-proxy's on legacy iptables, or the agent's own
/// from before), else picks the backend as kube-proxy's image does: the one
/// kubelet marked with its hint chain, else the one holding more rules, else
/// the one `iptables` here uses. So the agent goes on where kube-proxy's
/// rules are instead of refusing.
#[test]
fn auto_picks_the_backend_kubelet_and_kube_proxy_used() -> Result<()> {
    netns::preflight()?;
    let here = netns::run("iptables", &["--version"])?;
    let here = if here.contains("(legacy)") {
        "Legacy"
    } else {
        "Nft"
    };
    let kube_proxy_rules: &[Command] = &[
        ("iptables-legacy", &["-t", "nat", "-N", "KUBE-SERVICES"]),
        (
            "iptables-legacy",
            &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
        ),
    ];
    // An agent's own rules in nft, on a node whose kubelet uses legacy.
    let agent_rules_against_the_hint: &[Command] = &[
        ("iptables-nft", &["-t", "nat", "-N", "KUBE-SERVICES"]),
        (
            "iptables-nft",
            &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
        ),
        (
            "iptables-legacy",
            &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
        ),
    ];
    // (what, commands, the backend chosen, why)
    let cases: [(&str, &[Command], &str, &str); 6] = [
        (
            "kubelet's hint in legacy",
            &[(
                "iptables-legacy",
                &["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"],
            )],
            "Legacy",
            "kubelet's hint chain",
        ),
        (
            "kubelet's canary in nft",
            &[(
                "iptables-nft",
                &["-t", "mangle", "-N", "KUBE-KUBELET-CANARY"],
            )],
            "Nft",
            "kubelet's hint chain",
        ),
        (
            "kube-proxy's legacy rules",
            kube_proxy_rules,
            "Legacy",
            "the backend holding Service rules",
        ),
        (
            "the agent's nft rules, kubelet on legacy",
            agent_rules_against_the_hint,
            "Nft",
            "though kubelet's hint chain is in the other",
        ),
        (
            "another program's legacy rule",
            &[
                ("iptables-legacy", &["-t", "filter", "-N", "SOMEONE-ELSE"]),
                (
                    "iptables-legacy",
                    &["-t", "filter", "-A", "INPUT", "-j", "SOMEONE-ELSE"],
                ),
            ],
            "Legacy",
            "the backend holding more rules",
        ),
        ("nothing yet", &[], here, "no rules yet"),
    ];
    for (k, (what, setup, backend, reason)) in cases.into_iter().enumerate() {
        let ns = netns::Scoped::add(format!("cwbk-{}-{k}", std::process::id()))?;
        for (program, args) in setup {
            netns::exec_in(&ns.0, program, args)?;
        }
        let (ok, text) = agent(
            &ns.0,
            &[
                "run",
                "--node-name",
                "node-1",
                "--kubeconfig",
                "/nonexistent/kubeconfig",
            ],
        )?;
        // Past the backend check, as far as the kubeconfig.
        assert!(
            !ok && text.contains("/nonexistent/kubeconfig"),
            "{what}: {text}"
        );
        let line = text
            .lines()
            .find(|l| l.contains("iptables backend"))
            .unwrap_or_default();
        assert!(
            line.contains(backend) && line.contains(reason),
            "{what}: expected {backend} ({reason}): {text}"
        );
    }
    Ok(())
}

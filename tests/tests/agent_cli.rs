//! Bad input to the agent's command line: clear errors, never a panic.

use anyhow::Result;
use causeway_tests::paths::workspace_bin;
use std::process::Command;

fn agent(args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(workspace_bin("causeway-agent"))
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

#[test]
fn trace_with_an_address_that_is_not_an_ip_is_a_usage_error() -> Result<()> {
    let (code, text) = agent(&[
        "trace",
        "--src",
        "10.0.0.300",
        "--dst",
        "10.96.0.1",
        "--dport",
        "80",
    ])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("invalid value '10.0.0.300' for '--src <SRC>'"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    let (code, text) = agent(&[
        "trace",
        "--src",
        "10.0.0.1",
        "--dst",
        "10.96.0.1",
        "--dport",
        "80",
        "--proto",
        "icmp",
    ])?;
    assert_ne!(code, 0);
    assert!(
        text.contains("--proto \"icmp\": use tcp, udp or sctp"),
        "{text}"
    );
    // Two valid addresses that no one packet can carry.
    let (code, text) = agent(&[
        "trace",
        "--src",
        "fd00::1",
        "--dst",
        "10.96.0.10",
        "--dport",
        "53",
    ])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("--src fd00::1 and --dst 10.96.0.10 are of different IP families")
            && text.contains("Usage: causeway-agent trace"),
        "{text}"
    );
    Ok(())
}

#[test]
fn render_names_the_file_the_object_and_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("web.yaml");
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, protocol: QUIC}\n",
    )?;
    let file = path.display().to_string();
    let (code, text) = agent(&["render", "--manifests", &file, "--node-name", "n"])?;
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains(&file)
            && text.contains("Service shop/web")
            && text.contains("spec.ports[0].protocol"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");

    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Service\nmetadata: [not, a, map]\n",
    )?;
    let (code, text) = agent(&["render", "--manifests", &file, "--node-name", "n"])?;
    assert_ne!(code, 0, "{text}");
    assert!(text.contains(&file) && !text.contains("panicked"), "{text}");
    Ok(())
}

/// kube-proxy's configuration file (`--config`) sets the data path; a flag
/// given beside it wins; a bad file is refused with the file, field and line.
#[test]
fn a_kube_proxy_configuration_file_drives_the_agent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let service = dir.path().join("web.yaml");
    std::fs::write(
        &service,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n\
         ---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports: [{name: http, port: 8080}]\n\
         endpoints: [{addresses: [10.244.1.5]}]\n",
    )?;
    let config = dir.path().join("config.conf");
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         kind: KubeProxyConfiguration\n\
         clusterCIDR: 10.244.0.0/16\n\
         iptables:\n  masqueradeBit: 13\n  syncPeriod: 1m0s\n\
         ipvs: {scheduler: \"\"}\n",
    )?;
    let (service, config) = (service.display().to_string(), config.display().to_string());
    // `run --write-config-to` writes the settings run would go by (the file,
    // the flags over it) and exits; that file drives render alike.
    let written = dir.path().join("written.conf").display().to_string();
    let (code, text) = agent(&[
        "run",
        "--config",
        &config,
        "--node-name=node-1",
        "--masquerade-bit=11",
        "--write-config-to",
        &written,
    ])?;
    assert_eq!(code, 0, "{text}");
    let written_text = std::fs::read_to_string(&written)?;
    assert!(
        written_text.contains("masqueradeBit: 11")
            && written_text.contains("syncPeriod: 1m0s")
            && written_text.contains("clusterCIDR: 10.244.0.0/16"),
        "{written_text}"
    );
    let (code, text) = agent(&[
        "render",
        "--manifests",
        &service,
        "--node-name",
        "node-1",
        "--config",
        &written,
    ])?;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x800")
            && text.contains("! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"),
        "{text}"
    );
    let render = |extra: &[&str]| -> Result<(i32, String)> {
        let mut args = vec![
            "render",
            "--manifests",
            &service,
            "--node-name",
            "n",
            "--node-ip",
            "192.168.0.10",
            "--config",
            &config,
        ];
        args.extend_from_slice(extra);
        agent(&args)
    };
    let (code, text) = render(&[])?;
    assert_eq!(code, 0, "{text}");
    // Bit 13 of the file, and its cluster CIDR in the Service's masquerade rule.
    assert!(
        text.contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x2000"),
        "{text}"
    );
    assert!(
        text.contains("--dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"),
        "{text}"
    );
    let (code, text) = render(&["--masquerade-bit", "12"])?;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x1000"),
        "{text}"
    );
    // conntrack's liberal TCP mode, from the flag or the file, leaves out
    // the rule dropping INVALID forwarded packets, as in kube-proxy.
    let invalid_drop = "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP";
    assert!(text.contains(invalid_drop), "{text}");
    let (code, text) = render(&["--conntrack-tcp-be-liberal"])?;
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains(invalid_drop), "{text}");
    let config_text = std::fs::read_to_string(&config)?;
    std::fs::write(
        &config,
        format!("{config_text}conntrack: {{tcpBeLiberal: true, maxPerCore: 0}}\n"),
    )?;
    let (code, text) = render(&[])?;
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains(invalid_drop), "{text}");
    std::fs::write(&config, &config_text)?;

    // A misspelt field, or one dropped from the API: named in a warning and
    // ignored, as kube-proxy's lenient decoding does; the rest still applies.
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         kind: KubeProxyConfiguration\n\
         resourceContainer: /kube-proxy\n\
         iptables:\n  masqueradeBit: 13\n  syncPeriode: 30s\n",
    )?;
    let (code, text) = render(&[])?;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!(
            "warning: {config}: fields not known to kube-proxy, ignored: \
             resourceContainer, iptables.syncPeriode"
        )),
        "{text}"
    );
    assert!(text.contains("--or-mark 0x2000"), "{text}");
    // A value of the wrong type: the file, the field and the line.
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
         kind: KubeProxyConfiguration\n\
         iptables:\n  masqueradeBit: 13\n  syncPeriod: [30s]\n",
    )?;
    let (code, text) = agent(&["run", "--config", &config, "--node-name", "n"])?;
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains(&config)
            && text.contains("iptables.syncPeriod: invalid type")
            && text.contains("line 5"),
        "{text}"
    );
    // A mode the agent is not.
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\n",
    )?;
    let (code, text) = agent(&["run", "--config", &config, "--node-name", "n"])?;
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("mode: \"ipvs\""), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    // So is kube-proxy's --proxy-mode flag: a usage error, before anything runs.
    let (code, text) = agent(&["run", "--node-name", "n", "--proxy-mode", "ipvs"])?;
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("\"ipvs\": causeway-agent is kube-proxy's iptables mode"),
        "{text}"
    );
    // And a logging format the file cannot have.
    std::fs::write(
        &config,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         logging: {format: xml}\n",
    )?;
    let (code, text) = agent(&["run", "--config", &config, "--node-name", "n"])?;
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains(&config) && text.contains("logging.format: \"xml\" is not text or json"),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_conntrack_table_size_that_cannot_be_set_stops_run_and_says_how_to_leave_it() -> Result<()> {
    use causeway_tests::netns;
    // A network namespace other than the node's, where the kernel keeps
    // nf_conntrack_max read-only (named so that the data-path sweep removes
    // it if this run is killed).
    let ns = netns::Scoped::add(format!("cwdp{}n999-conntrack", std::process::id()))?;
    let max = netns::exec_in(&ns.0, "cat", &["/proc/sys/net/netfilter/nf_conntrack_max"])?;
    let wanted = max.trim().parse::<u64>()? + 1;
    // No API server: the check comes first, and a run that got past it
    // would fail on the connection instead, with another message.
    let out = run_without_api(
        &ns.0,
        &[
            "--healthz-bind-address=127.0.0.1:10256",
            &format!("--conntrack-min={wanted}"),
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot raise net.netfilter.nf_conntrack_max from ")
            && stderr.contains("at least --conntrack-min ")
            && stderr.contains("pass --conntrack-max-per-core=0 to leave it"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}

/// `causeway-agent run` for node-1 in namespace `ns`, with `extra` flags and
/// no API server at its address, stopped after 10 s at most.
fn run_without_api(ns: &str, extra: &[&str]) -> Result<std::process::Output> {
    let agent = workspace_bin("causeway-agent").display().to_string();
    let mut args = vec![
        "10",
        agent.as_str(),
        "run",
        "--node-name=node-1",
        "--master=http://127.0.0.1:1",
    ];
    args.extend_from_slice(extra);
    causeway_tests::netns::exec_in_raw(ns, "timeout", &args)
}

/// kube-proxy still running on the node holds 10256: `run` stops at once
/// and says what is probably wrong, before it writes any rule.
#[test]
fn run_says_kube_proxy_may_still_run_when_its_health_port_is_taken() -> Result<()> {
    use causeway_tests::netns;
    let ns = netns::Scoped::add(format!("cwdp{}n998-bind", std::process::id()))?;
    let log = tempfile::NamedTempFile::new()?;
    let mut holder = netns::spawn_in(
        &ns.0,
        &workspace_bin("causeway-echo").display().to_string(),
        &["serve", "--name", "kube-proxy", "--port", "10256"],
        log.path(),
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(log.path())?.contains("serving") {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "causeway-echo did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = run_without_api(&ns.0, &[]);
    let _ = holder.kill();
    let _ = holder.wait();
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("binding the health server to 0.0.0.0:10256")
            && stderr.contains("Is kube-proxy (or another causeway-agent) still running"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn run_init_only_sets_the_nodes_settings_and_exits_without_the_api() -> Result<()> {
    use causeway_tests::netns;
    let settings = [
        "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
        "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait",
        "/proc/sys/net/ipv4/conf/all/route_localnet",
    ];
    // (args, the settings after) in a fresh namespace each; the kernel's
    // defaults before: 432000, 60, 0.
    for (k, (extra, expected)) in [
        (&[][..], ["86400", "3600", "1"]),
        (
            &[
                "--conntrack-tcp-timeout-close-wait=2h",
                "--localhost-nodeports=false",
            ][..],
            ["86400", "7200", "0"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let ns = netns::Scoped::add(format!("cwdp{}n99{k}-init", std::process::id()))?;
        // A new namespace takes net.ipv4.conf.all from the host's: start from 0.
        netns::sysctl_in(&ns.0, "net.ipv4.conf.all.route_localnet", "0")?;
        let read = || -> Result<Vec<String>> {
            settings
                .iter()
                .map(|path| Ok(netns::exec_in(&ns.0, "cat", &[path])?.trim().to_string()))
                .collect()
        };
        assert_eq!(read()?, ["432000", "60", "0"], "{extra:?}");
        // No API server at that address: --init-only must not need one.
        let out = run_without_api(&ns.0, &[&["--init-only"][..], extra].concat())?;
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {log}");
        assert!(log.contains("exiting (--init-only)"), "{log}");
        assert_eq!(read()?, expected, "{extra:?}: {log}");
    }
    Ok(())
}

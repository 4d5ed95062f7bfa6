//! Network namespaces, veth pairs and bridges for the local environment and the
//! packet tests: thin wrappers over `ip`, plus running commands inside a namespace.
//!
//! Nothing here touches the host's firewall. The only things created in the host
//! namespace are a bridge and the host ends of veth pairs, named with the
//! environment's prefix so that tear-down (and the sweep of a crashed run) can
//! find them.

use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}: is it installed?"))?;
    check(program, args, out)
}

fn check(program: &str, args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip` with the given arguments.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// Runs `program args…` inside network namespace `ns`.
pub fn exec_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Like [`exec_in`], but returns the raw output whatever the exit status.
pub fn exec_in_raw(ns: &str, program: &str, args: &[&str]) -> Result<Output> {
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} in namespace {ns}"))
}

/// Starts a long-running process inside a namespace, output to `log`.
pub fn spawn_in(
    ns: &str,
    program: &str,
    args: &[&str],
    log: &std::path::Path,
) -> Result<std::process::Child> {
    spawn_in_with_env(ns, program, args, log, &[])
}

/// [`spawn_in`] with environment variables `envs` set.
pub fn spawn_in_with_env(
    ns: &str,
    program: &str,
    args: &[&str],
    log: &std::path::Path,
    envs: &[(&str, &str)],
) -> Result<std::process::Child> {
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        // A program logs as its own flags say, not as the test runner's
        // RUST_LOG would have it; and it finds its cluster and node from its
        // flags, not from a KUBECONFIG or NODE_NAME the runner happens to have.
        .env_remove("RUST_LOG")
        .env_remove("KUBECONFIG")
        .env_remove("NODE_NAME")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("cannot start {program} in namespace {ns}"))
}

/// Creates a namespace with its loopback up and IPv6 duplicate address
/// detection off.
pub fn add_netns(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    // IPv6 duplicate address detection off for the links made here after:
    // it would hold every link-local address back for a second or more,
    // and neighbour discovery with it, and each address here is unique.
    exec_in(
        name,
        "sh",
        &[
            "-c",
            "ip link set lo up && { [ ! -d /proc/sys/net/ipv6 ] || \
             for c in all default; do \
             echo 0 > /proc/sys/net/ipv6/conf/$c/accept_dad || exit 1; done; }",
        ],
    )?;
    Ok(())
}

/// A namespace a test made, deleted (with what runs in it) when this is
/// dropped, also when the test fails.
pub struct Scoped(pub String);

impl Scoped {
    /// Creates namespace `name` with its loopback up.
    pub fn add(name: impl Into<String>) -> Result<Self> {
        let scoped = Scoped(name.into());
        add_netns(&scoped.0)?;
        Ok(scoped)
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        del_netns(&self.0);
    }
}

/// Deletes a namespace after killing whatever still runs in it. Missing is fine.
pub fn del_netns(name: &str) {
    if let Ok(pids) = ip(&["netns", "pids", name]) {
        for pid in pids.split_whitespace() {
            let _ = run("kill", &["-9", pid]);
        }
    }
    let _ = ip(&["netns", "del", name]);
}

/// Deletes a link in the host namespace. Missing is fine.
pub fn del_link(name: &str) {
    let _ = ip(&["link", "del", name]);
}

/// Names of the namespaces that currently exist.
pub fn list_netns() -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Names of the links in the host namespace.
pub fn list_links() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect()
}

/// Sets a sysctl inside a namespace (sysctls under net/ are per namespace).
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    exec_in(ns, "sh", &["-c", &format!("echo {value} > {path}")])?;
    Ok(())
}

/// Creates a veth pair: `outer` stays where it is created (the host namespace)
/// unless `outer_ns` is given, `inner` moves into `inner_ns` and is renamed
/// `inner_name` there.
pub fn add_veth(
    outer: &str,
    outer_ns: Option<&str>,
    tmp_inner: &str,
    inner_ns: &str,
    inner_name: &str,
) -> Result<()> {
    ip(&[
        "link", "add", outer, "type", "veth", "peer", "name", tmp_inner,
    ])?;
    if let Some(ns) = outer_ns {
        ip(&["link", "set", outer, "netns", ns])?;
    }
    ip(&["link", "set", tmp_inner, "netns", inner_ns])?;
    exec_in(
        inner_ns,
        "ip",
        &["link", "set", tmp_inner, "name", inner_name],
    )?;
    exec_in(inner_ns, "ip", &["link", "set", inner_name, "up"])?;
    Ok(())
}

/// The checks every environment needs before it creates anything, each failing
/// with one sentence that names what is missing.
pub fn preflight() -> Result<()> {
    if !is_root() {
        bail!("the local environment needs root (network namespaces, iptables): run as root");
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("iptables-restore", "iptables"),
        ("conntrack", "conntrack"),
        ("openssl", "openssl"),
    ] {
        if which(tool).is_none() {
            bail!(
                "`{tool}` is missing: install the Debian package {package} (make test does this itself)"
            );
        }
    }
    static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("cwprobe{}-{n}", std::process::id());
    if ip(&["netns", "add", &probe]).is_err() {
        bail!(
            "this machine cannot create network namespaces (`ip netns add` failed): the local environment needs them"
        );
    }
    let _ = ip(&["netns", "del", &probe]);
    Ok(())
}

fn is_root() -> bool {
    run("id", &["-u"]).map(|s| s.trim() == "0").unwrap_or(false)
}

/// Finds a program on PATH (including the sbin directories root normally has).
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// A `PATH` on which `iptables`, `ip6tables` and their `-save` and
/// `-restore` are `backend`'s (`nft` or `legacy`), through links made in
/// `dir`: for programs that run plain `iptables`, such as kube-proxy.
pub fn iptables_path(backend: &str, dir: &std::path::Path) -> Result<String> {
    let bin = dir.join(format!("iptables-{backend}-bin"));
    std::fs::create_dir_all(&bin)?;
    for family in ["iptables", "ip6tables"] {
        for suffix in ["", "-save", "-restore"] {
            let program = format!("{family}-{backend}{suffix}");
            let target = which(&program).ok_or_else(|| anyhow::anyhow!("{program} is missing"))?;
            let link = bin.join(format!("{family}{suffix}"));
            if !link.exists() {
                std::os::unix::fs::symlink(target, link)?;
            }
        }
    }
    Ok(path_with(&bin))
}

/// This process's `PATH` with `dir` first.
pub fn path_with(dir: &std::path::Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Probes `target` `count` times (`proto` is `tcp` or `udp`) from namespace
/// `ns` with `causeway-echo`, 700 ms per attempt; the replies tallied by pod
/// name (`refused`/`timeout` for failures).
pub fn tally_by_pod(
    ns: &str,
    proto: &str,
    target: &str,
    count: usize,
) -> Result<std::collections::BTreeMap<String, usize>> {
    paced_tally_by_pod(ns, proto, target, count, None)
}

/// [`tally_by_pod`], starting one attempt every `interval_ms` (each waits
/// for the one before) when given.
pub fn paced_tally_by_pod(
    ns: &str,
    proto: &str,
    target: &str,
    count: usize,
    interval_ms: Option<u64>,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let echo = crate::paths::workspace_bin("causeway-echo")
        .display()
        .to_string();
    let (proto, count) = (format!("--{proto}"), count.to_string());
    let mut args = vec![
        "probe",
        &proto,
        target,
        "--count",
        &count,
        "--tally-by-name",
        "--timeout-ms",
        "700",
    ];
    let interval = interval_ms.map(|ms| ms.to_string());
    if let Some(interval) = &interval {
        args.extend(["--interval-ms", interval]);
    }
    let out = exec_in(ns, &echo, &args)?;
    let mut counts = std::collections::BTreeMap::new();
    for line in out.lines() {
        // "<n> ok <pod> <src>" or "<n> refused"
        let mut words = line.split_whitespace();
        let n: usize = words.next().unwrap_or("0").parse()?;
        let outcome = match (words.next(), words.next()) {
            (Some("ok"), Some(pod)) => pod.to_string(),
            (Some(other), _) => other.to_string(),
            _ => continue,
        };
        *counts.entry(outcome).or_insert(0) += n;
    }
    Ok(counts)
}

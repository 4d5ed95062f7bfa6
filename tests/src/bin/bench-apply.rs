//! bench-apply: how long causeway-agent's ruleset takes to render and to apply
//! at scale, with both iptables backends.
//!
//! For each S (Services) × E (endpoints per Service) it writes S ClusterIP
//! Services and their EndpointSlices as YAML, runs `causeway-agent render` on
//! them (wall time and peak RSS of the whole command, YAML parsing included),
//! counts the payload's chains and rules per table, and times
//! `iptables-nft-restore --noflush` and `iptables-legacy-restore --noflush`
//! loading it into a fresh network namespace (one per apply, deleted after).
//! Prints one Markdown table row per size, ready for docs/benchmarks.md.
//!
//! Run as root: `cargo build --release -p causeway-agent -p causeway-tests` then
//! `target/release/bench-apply [--services 1000,5000,10000] [--endpoints 5,10]`.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use causeway_agent::addr::IpFamily;
use causeway_agent::netfilter::{Backend, Netfilter};
use clap::Parser;

/// Renders S services × E endpoints with causeway-agent and times the apply.
#[derive(Parser)]
#[command(name = "bench-apply")]
struct Args {
    /// Service counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    services: Vec<usize>,
    /// Endpoints per Service (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "5,10")]
    endpoints: Vec<usize>,
    /// Backends to apply with: nft, legacy.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "nft,legacy")]
    backends: Vec<Backend>,
    /// Give up on one apply after this many seconds (reported as "> N").
    #[arg(long, default_value_t = 300)]
    apply_timeout: u64,
    /// Nodes the endpoints are spread over; this node is one of them, so
    /// 1/N of the endpoints are local.
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// The causeway-agent binary (default: next to this program).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Keep manifests and payloads in this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
}

const NODE_IP: &str = "100.80.0.1";
const CLUSTER_CIDR: &str = "100.64.0.0/12";

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-apply: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    causeway_tests::netns::preflight()?;
    let agent = match &args.agent {
        Some(p) => p.clone(),
        None => causeway_tests::paths::workspace_bin("causeway-agent"),
    };
    let scratch = tempfile::Builder::new().prefix("bench-apply").tempdir()?;
    let dir = args
        .keep
        .clone()
        .unwrap_or_else(|| scratch.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let time = Path::new("/usr/bin/time").is_file();

    println!("agent: {}", agent.display());
    println!(
        "| S × E | render s (CLI, incl. YAML) | agent peak RSS MB | payload MB | nat chains | nat rules | \
         kube-proxy nat rules (5+2S+3SE) | filter chains | filter rules | {} |",
        args.backends
            .iter()
            .map(|b| format!("apply {b} s"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!(
        "|---|---|---|---|---|---|---|---|---|{}",
        "---|".repeat(args.backends.len())
    );
    for &s in &args.services {
        for &e in &args.endpoints {
            let manifests = dir.join(format!("manifests-{s}x{e}.yaml"));
            std::fs::write(&manifests, manifests_yaml(s, e, args.nodes))?;
            let ns = Netns::new(&format!("cwbench{}r", std::process::id()))?;
            let (payload, render_s, rss_kb) = render(&ns.0, &agent, &manifests, time)?;
            drop(ns);
            if args.keep.is_some() {
                std::fs::write(dir.join(format!("payload-{s}x{e}.txt")), &payload)?;
            }
            let _ = std::fs::remove_file(&manifests);
            let counts = count(&payload);
            let mut applies = Vec::new();
            for &backend in &args.backends {
                let netfilter = Netfilter::new(IpFamily::V4, backend);
                let ns = Netns::new(&format!("cwbench{}a", std::process::id()))?;
                let result = apply(
                    &ns.0,
                    &netfilter,
                    &payload,
                    Duration::from_secs(args.apply_timeout),
                )
                .with_context(|| format!("{s} × {e} with {}", netfilter.restore_program()))?;
                applies.push(match result {
                    Some(took) => format!("{:.2}", took.as_secs_f64()),
                    None => format!("> {}", args.apply_timeout),
                });
            }
            println!(
                "| {s} × {e} | {render_s:.2} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
                rss_kb
                    .map(|kb| format!("{:.0}", kb as f64 / 1024.0))
                    .unwrap_or_else(|| "?".into()),
                payload.len() as f64 / 1e6,
                counts.nat_chains,
                counts.nat_rules,
                5 + 2 * s + 3 * s * e,
                counts.filter_chains,
                counts.filter_rules,
                applies.join(" | ")
            );
        }
    }
    Ok(())
}

/// S ClusterIP Services, each with one EndpointSlice of E ready endpoints
/// spread round-robin over `nodes` nodes (this node is node-0).
fn manifests_yaml(services: usize, endpoints: usize, nodes: usize) -> String {
    let mut out = String::with_capacity(services * (700 + endpoints * 170));
    out.push_str(&format!(
        "---\n{{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{{\"name\":\"node-0\"}},\
         \"spec\":{{\"podCIDR\":\"100.64.0.0/24\"}},\"status\":{{\"addresses\":[{{\"type\":\"InternalIP\",\"address\":\"{NODE_IP}\"}}]}}}}\n"
    ));
    let mut next_endpoint: u32 = 1;
    for i in 0..services {
        let cluster_ip = ip_from(0x6460_0000 + i as u32); // 100.96.0.0 + i
        let name = format!("svc-{i}");
        out.push_str(&format!(
            "---\n{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"bench\"}},\
             \"spec\":{{\"type\":\"ClusterIP\",\"clusterIP\":\"{cluster_ip}\",\"clusterIPs\":[\"{cluster_ip}\"],\
             \"ipFamilies\":[\"IPv4\"],\"ports\":[{{\"name\":\"http\",\"protocol\":\"TCP\",\"port\":80,\"targetPort\":8080}}]}}}}\n"
        ));
        let eps: Vec<String> = (0..endpoints)
            .map(|k| {
                let ip = ip_from(0x6440_0000 + next_endpoint); // 100.64.0.0 + n
                next_endpoint += 1;
                format!(
                    "{{\"addresses\":[\"{ip}\"],\"conditions\":{{\"ready\":true,\"serving\":true,\"terminating\":false}},\
                     \"nodeName\":\"node-{}\"}}",
                    (i + k) % nodes.max(1)
                )
            })
            .collect();
        out.push_str(&format!(
            "---\n{{\"apiVersion\":\"discovery.k8s.io/v1\",\"kind\":\"EndpointSlice\",\
             \"metadata\":{{\"name\":\"{name}-1\",\"namespace\":\"bench\",\"labels\":{{\"kubernetes.io/service-name\":\"{name}\"}}}},\
             \"addressType\":\"IPv4\",\"endpoints\":[{}],\"ports\":[{{\"name\":\"http\",\"protocol\":\"TCP\",\"port\":8080}}]}}\n",
            eps.join(",")
        ));
    }
    out
}

fn ip_from(n: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(n)
}

/// Runs `causeway-agent render` inside `ns` (as on a node); returns the
/// payload, wall seconds and peak RSS in KiB (when GNU time is there).
fn render(
    ns: &str,
    agent: &Path,
    manifests: &Path,
    time: bool,
) -> Result<(String, f64, Option<u64>)> {
    let rss_file = manifests.with_extension("rss");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    if time {
        cmd.arg("/usr/bin/time")
            .arg("-f")
            .arg("%M")
            .arg("-o")
            .arg(&rss_file);
    }
    cmd.arg(agent)
        .arg("render")
        .arg("--manifests")
        .arg(manifests)
        .args([
            "--node-name",
            "node-0",
            "--node-ip",
            NODE_IP,
            "--cluster-cidr",
            CLUSTER_CIDR,
        ])
        .stdin(Stdio::null());
    let start = Instant::now();
    let out = cmd.output().context("running causeway-agent render")?;
    let took = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "causeway-agent render failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let rss = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| l.trim().parse().ok()));
    let _ = std::fs::remove_file(&rss_file);
    Ok((
        String::from_utf8(out.stdout).context("payload is not UTF-8")?,
        took,
        rss,
    ))
}

#[derive(Default)]
struct Counts {
    nat_chains: usize,
    nat_rules: usize,
    filter_chains: usize,
    filter_rules: usize,
}

fn count(payload: &str) -> Counts {
    let mut counts = Counts::default();
    let mut table = "";
    for line in payload.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = match t {
                "nat" => "nat",
                "filter" => "filter",
                _ => "",
            };
            continue;
        }
        let chain = line.starts_with(':');
        let rule = line.starts_with("-A ") || line.starts_with("-I ");
        match (table, chain, rule) {
            ("nat", true, _) => counts.nat_chains += 1,
            ("nat", _, true) => counts.nat_rules += 1,
            ("filter", true, _) => counts.filter_chains += 1,
            ("filter", _, true) => counts.filter_rules += 1,
            _ => {}
        }
    }
    counts
}

/// Times the restore program of `netfilter`, run as the agent runs it,
/// loading `payload` into `ns` with `--noflush`; `None` if it ran longer than
/// `limit` (it is killed).
fn apply(
    ns: &str,
    netfilter: &Netfilter,
    payload: &str,
    limit: Duration,
) -> Result<Option<Duration>> {
    let program = netfilter.restore_program();
    let start = Instant::now();
    let mut command = Command::new("ip");
    netfilter.tune_restore(&mut command);
    let mut child = command
        .args(["netns", "exec", ns, program, "--noflush", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let text = payload.to_string();
    // A writer thread: a slow restore must not block the clock below.
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    loop {
        if let Some(status) = child.try_wait()? {
            let took = start.elapsed();
            let _ = writer.join();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("{program} failed ({status}): {}", err.trim());
            }
            return Ok(Some(took));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let _ = writer.join();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A fresh network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Result<Netns> {
        causeway_tests::netns::del_netns(name);
        causeway_tests::netns::add_netns(name)?;
        Ok(Netns(name.to_string()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        causeway_tests::netns::del_netns(&self.0);
    }
}

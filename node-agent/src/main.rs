//! Command line of causeway-agent: `render` (manifests → payload, no cluster)
//! and `run` (watch the API, program this node).
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{
    ArgAction, ArgMatches, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand,
};

use causeway_agent::addr::IpFamily;
use causeway_agent::agent::{self, RunConfig};
use causeway_agent::config::{
    DetectLocalMode, LogFormat, ProxyOptions, check_proxy_mode, log_filter, parse_go_bool,
};
use causeway_agent::conntrack_tuning::{self, Tuning};
use causeway_agent::kube_proxy_config::{self, FileSettings};
use causeway_agent::manifests;
use causeway_agent::metrics::Metrics;
use causeway_agent::model::{self, NodeInfo};
use causeway_agent::netfilter::Backend;
use causeway_agent::nfacct;
use causeway_agent::rules::{self, Accounting, RenderOptions};
use causeway_agent::trace;
use causeway_telemetry::duration::parse_duration;

/// Programs Services into iptables on this node, like kube-proxy.
#[derive(Parser)]
#[command(name = "causeway-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the iptables-restore payload for YAML manifests, without a cluster.
    #[command(args_override_self = true)]
    Render(RenderArgs),
    /// Watch the API server and keep this node's iptables rules in sync.
    // A flag given twice takes its last value, as kube-proxy's flags do: a
    // chart's fixed arguments are often extended by the user's.
    #[command(args_override_self = true)]
    Run(RunArgs),
    /// Explain one packet's fate through the rules: the running agent's
    /// (live), a saved payload, or one rendered from manifests.
    #[command(args_override_self = true)]
    Trace(TraceArgs),
    /// Remove every rule and chain the agent created (both IP families), and
    /// nothing else; run after stopping the agent.
    Cleanup(CleanupArgs),
}

#[derive(Args, Debug)]
struct CleanupArgs {
    /// Which iptables to clean: auto (as `run` picks it), nft or legacy.
    #[arg(long, env = "CAUSEWAY_IPTABLES_BACKEND", value_enum, default_value_t = Backend::Auto)]
    iptables_backend: Backend,
}

/// Data-path flags shared by `render` and `run` (kube-proxy's names).
#[derive(Args, Debug, Clone)]
struct ProxyFlags {
    /// Pod network CIDR(s), at most one per IP family; used by
    /// `--detect-local-mode ClusterCIDR`.
    // One comma-separated value as in kube-proxy, so that a second
    // --cluster-cidr replaces the first instead of adding to it.
    #[arg(long, env = "CAUSEWAY_CLUSTER_CIDR", value_delimiter = ',', action = ArgAction::Set)]
    cluster_cidr: Vec<String>,
    /// How traffic from local pods is recognised:
    /// ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix or None.
    #[arg(
        long,
        env = "CAUSEWAY_DETECT_LOCAL_MODE",
        default_value = "ClusterCIDR"
    )]
    detect_local_mode: DetectLocalMode,
    /// The pod bridge, for `--detect-local-mode BridgeInterface`.
    #[arg(long, env = "CAUSEWAY_POD_BRIDGE_INTERFACE")]
    pod_bridge_interface: Option<String>,
    /// The pod interface name prefix, for `--detect-local-mode InterfaceNamePrefix`.
    #[arg(long, env = "CAUSEWAY_POD_INTERFACE_NAME_PREFIX")]
    pod_interface_name_prefix: Option<String>,
    /// Masquerade all traffic sent to cluster IPs.
    #[arg(long, env = "CAUSEWAY_MASQUERADE_ALL", action = ArgAction::Set, num_args = 0..=1, value_parser = parse_go_bool,
          default_value_t = false, default_missing_value = "true")]
    masquerade_all: bool,
    /// The fwmark bit that marks packets to masquerade (mark 1<<bit);
    /// kube-proxy's --iptables-masquerade-bit is accepted too.
    #[arg(long, alias = "iptables-masquerade-bit", env = "CAUSEWAY_MASQUERADE_BIT", default_value_t = 14,
          value_parser = clap::value_parser!(u8).range(0..=31))]
    masquerade_bit: u8,
    /// Addresses NodePorts answer on: CIDRs, or `primary` for the node's
    /// InternalIP(s). Default: every local address.
    #[arg(long, env = "CAUSEWAY_NODEPORT_ADDRESSES", value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// Answer IPv4 NodePorts on 127.0.0.1 (sets net.ipv4.conf.all.route_localnet=1);
    /// kube-proxy's --iptables-localhost-nodeports is accepted too.
    #[arg(long, alias = "iptables-localhost-nodeports", env = "CAUSEWAY_LOCALHOST_NODEPORTS", action = ArgAction::Set, num_args = 0..=1, value_parser = parse_go_bool,
          default_value_t = true, default_missing_value = "true")]
    localhost_nodeports: bool,
    /// As kube-proxy's: conntrack tracks TCP liberally, so forwarded packets
    /// it finds INVALID are not dropped. `run` sets
    /// net.netfilter.nf_conntrack_tcp_be_liberal=1 and then goes by the
    /// sysctl, as kube-proxy does; `render` by this flag.
    #[arg(long, env = "CAUSEWAY_CONNTRACK_TCP_BE_LIBERAL", action = ArgAction::Set, num_args = 0..=1, value_parser = parse_go_bool,
          default_value_t = false, default_missing_value = "true")]
    conntrack_tcp_be_liberal: bool,
}

/// Sets a field from the configuration file's value unless the user gave its
/// flag (on the command line or in the environment), which wins. The flag's
/// id is the field's name, as clap derives it.
macro_rules! fill {
    ($given:expr, $self:ident . $field:ident, $from_file:expr) => {
        if let Some(value) = $from_file
            && !$given.contains(stringify!($field))
        {
            $self.$field = value;
        }
    };
}

/// The flags of subcommand `name` that the user gave, on the command line or
/// in the environment; the others are at their defaults.
fn given_flags(matches: &ArgMatches, name: &str) -> BTreeSet<String> {
    let Some(sub) = matches.subcommand_matches(name) else {
        return BTreeSet::new();
    };
    sub.ids()
        .map(|id| id.as_str())
        .filter(|id| {
            matches!(
                sub.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(str::to_string)
        .collect()
}

/// Loads `--config` if given, with the text it was read from.
fn config_file(path: Option<&std::path::Path>) -> anyhow::Result<(FileSettings, String)> {
    match path {
        Some(path) => Ok(kube_proxy_config::load(path)?),
        None => Ok((FileSettings::default(), String::new())),
    }
}

impl ProxyFlags {
    /// Takes what the configuration file sets, except where a flag was given.
    fn apply_file(&mut self, file: &FileSettings, given: &BTreeSet<String>) {
        let f = file.clone();
        fill!(given, self.cluster_cidr, f.cluster_cidrs);
        fill!(given, self.detect_local_mode, f.detect_local_mode);
        fill!(
            given,
            self.pod_bridge_interface,
            f.pod_bridge_interface.map(Some)
        );
        fill!(
            given,
            self.pod_interface_name_prefix,
            f.pod_interface_name_prefix.map(Some)
        );
        fill!(given, self.masquerade_all, f.masquerade_all);
        fill!(given, self.masquerade_bit, f.masquerade_bit);
        fill!(given, self.nodeport_addresses, f.nodeport_addresses);
        fill!(given, self.localhost_nodeports, f.localhost_nodeports);
        fill!(
            given,
            self.conntrack_tcp_be_liberal,
            f.conntrack_tcp_be_liberal
        );
    }

    fn options(&self, node_ips: &[IpAddr], random_fully: bool) -> ProxyOptions {
        let ProxyFlags {
            cluster_cidr,
            detect_local_mode,
            pod_bridge_interface,
            pod_interface_name_prefix,
            masquerade_all,
            masquerade_bit,
            nodeport_addresses,
            localhost_nodeports,
            conntrack_tcp_be_liberal,
        } = self.clone();
        ProxyOptions {
            cluster_cidrs: cluster_cidr,
            detect_local_mode,
            pod_bridge_interface,
            pod_interface_name_prefix,
            masquerade_all,
            masquerade_bit,
            nodeport_addresses,
            localhost_nodeports,
            random_fully,
            node_ips: node_ips.to_vec(),
            primary_ip: None,
            conntrack_tcp_be_liberal,
            accounting: Accounting::default(),
        }
    }
}

#[derive(Args, Debug)]
struct RenderArgs {
    /// YAML files or directories (multi-document; Service, EndpointSlice,
    /// Endpoints, Node; other kinds are ignored).
    #[arg(long, required = true, num_args = 1.., value_delimiter = ',')]
    manifests: Vec<PathBuf>,
    /// The node to render for: decides which endpoints are local.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This node's IP(s), in addition to a Node manifest's InternalIPs.
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<IpAddr>,
    /// 4 for iptables-restore, 6 for ip6tables-restore.
    #[arg(long, default_value_t = 4, value_parser = parse_ip_family)]
    ip_family: u8,
    /// Add --random-fully to MASQUERADE rules.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, value_parser = parse_go_bool, default_value_t = true, default_missing_value = "true")]
    random_fully: bool,
    /// Include the jump rules from PREROUTING/INPUT/FORWARD/OUTPUT/POSTROUTING
    /// (as `-I CHAIN 1`); load such a payload once into a fresh namespace.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, value_parser = parse_go_bool, default_value_t = true, default_missing_value = "true")]
    jump_rules: bool,
    /// Print the payload even when some objects could not be used (they are
    /// reported on stderr and left out).
    #[arg(long)]
    skip_invalid: bool,
    /// kube-proxy's configuration file (a KubeProxyConfiguration); its
    /// data-path settings apply unless a flag says otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    proxy: ProxyFlags,
}

/// kube-proxy's defaults, for IPv4 (see [`RunArgs::apply_file`] for IPv6).
const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";

#[derive(Args, Debug)]
struct RunArgs {
    /// kube-proxy's configuration file: a KubeProxyConfiguration, as in the
    /// kube-proxy ConfigMap. Flags given on the command line or in the
    /// environment win over it; fields the agent has no use for are logged.
    #[arg(long, env = "CAUSEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name (as in the Node object); kube-proxy's
    /// --hostname-override is accepted too.
    #[arg(long, alias = "hostname-override", env = "NODE_NAME")]
    node_name: Option<String>,
    /// kubeconfig file; default: ~/.kube/config, then the in-cluster config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The API server's URL, over the kubeconfig's (kube-proxy's --master).
    /// Without --kubeconfig it is used alone, with no credentials, as in
    /// kube-proxy. Without a scheme: https when the kubeconfig has TLS
    /// settings, else http, as client-go decides.
    #[arg(long)]
    master: Option<String>,
    /// Extra addresses of this node (default: the Node's InternalIPs).
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<IpAddr>,
    /// kube-proxy's --bind-address: one address is this node's IP of its
    /// family, in place of the Node's InternalIPs of that family (--node-ip
    /// still adds); 0.0.0.0 and :: change nothing.
    #[arg(long)]
    bind_address: Option<IpAddr>,
    /// How often our rules are checked for damage by other programs (a full
    /// sync repairs it), and the longest the agent waits between syncs.
    /// kube-proxy's --iptables-sync-period is accepted too.
    #[arg(long, alias = "iptables-sync-period", env = "CAUSEWAY_SYNC_PERIOD", default_value = "30s", value_parser = parse_duration)]
    sync_period: Duration,
    /// Minimum time between syncs; bursts of changes are batched
    /// (kube-proxy's --iptables-min-sync-period is accepted too).
    #[arg(long, alias = "iptables-min-sync-period", env = "CAUSEWAY_MIN_SYNC_PERIOD", default_value = "1s", value_parser = parse_duration)]
    min_sync_period: Duration,
    /// Log as JSON lines.
    #[arg(long, env = "CAUSEWAY_LOG_JSON")]
    log_json: bool,
    /// kube-proxy's --logging-format: text or json; on the command line it
    /// wins over --log-json and CAUSEWAY_LOG_JSON.
    #[arg(long, value_enum)]
    logging_format: Option<LogFormat>,
    /// Log verbosity, as kube-proxy's -v/--v: up to 3 the usual log, 4 and 5
    /// the agent's debug lines too, 6 and 7 every library's (the API
    /// requests among them), 8 and up trace. RUST_LOG, when set, wins.
    #[arg(short = 'v', long = "v", value_name = "LEVEL", default_value_t = 0)]
    verbosity: u32,
    /// kube-proxy's --proxy-mode: the agent is its iptables mode, so only
    /// `iptables` (or empty) is accepted. Checked, then not needed.
    #[arg(long, value_parser = check_proxy_mode)]
    proxy_mode: Option<String>,
    /// The agent's OOM score adjustment (/proc/self/oom_score_adj), as
    /// kube-proxy's --oom-score-adj; default: left as the process has it.
    #[arg(long, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    oom_score_adj: Option<i32>,
    /// Conntrack table size per CPU, as kube-proxy's: at start,
    /// net.netfilter.nf_conntrack_max is raised (never lowered) to this × the
    /// node's CPUs (at most 1 048 576), at least --conntrack-min, and the
    /// hash size to a quarter of it; 0 leaves both as they are.
    #[arg(long, default_value_t = conntrack_tuning::DEFAULT_MAX_PER_CORE,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(i32::MAX)))]
    conntrack_max_per_core: u32,
    /// The least nf_conntrack_max, whatever the CPUs (unless
    /// --conntrack-max-per-core is 0).
    #[arg(long, default_value_t = conntrack_tuning::DEFAULT_MIN,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(i32::MAX)))]
    conntrack_min: u32,
    /// Idle timeout of established TCP connections in conntrack
    /// (net.netfilter.nf_conntrack_tcp_timeout_established); 0 leaves it.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// Conntrack's timeout for TCP connections in CLOSE_WAIT
    /// (net.netfilter.nf_conntrack_tcp_timeout_close_wait); 0 leaves it.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    conntrack_tcp_timeout_close_wait: Duration,
    /// Conntrack's timeout for UDP flows that have not seen a reply
    /// (net.netfilter.nf_conntrack_udp_timeout); 0, the default, leaves it.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    conntrack_udp_timeout: Duration,
    /// Conntrack's timeout for UDP flows with replies
    /// (net.netfilter.nf_conntrack_udp_timeout_stream); 0, the default,
    /// leaves it.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    conntrack_udp_timeout_stream: Duration,
    /// kube-proxy's --init-only: set what needs a writable /proc/sys (the
    /// conntrack settings, liberal TCP tracking, route_localnet for NodePorts
    /// on 127.0.0.1) and exit, without the API server; a privileged init
    /// container's job, so that the agent itself runs with NET_ADMIN only.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, value_parser = parse_go_bool, default_value_t = false,
          default_missing_value = "true")]
    init_only: bool,
    /// kube-proxy's --write-config-to: write the settings `run` would go by
    /// (flags, --config and defaults) to this file as a
    /// KubeProxyConfiguration, and exit.
    #[arg(long, value_name = "PATH")]
    write_config_to: Option<PathBuf>,
    /// Remove the agent's rules and exit, as `causeway-agent cleanup` (kube-proxy's --cleanup).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, value_parser = parse_go_bool, default_value_t = false,
          default_missing_value = "true")]
    cleanup: bool,
    /// kube-proxy's deprecated --healthz-port: the port for a
    /// --healthz-bind-address without one; 0 turns the server off.
    #[arg(long, hide = true)]
    healthz_port: Option<u16>,
    /// kube-proxy's deprecated --metrics-port: the port for a
    /// --metrics-bind-address without one; 0 turns the server off.
    #[arg(long, hide = true)]
    metrics_port: Option<u16>,
    /// Where /healthz and /livez answer (a port of the address's own, else
    /// 10256).
    #[arg(
        long,
        env = "CAUSEWAY_HEALTHZ_BIND_ADDRESS",
        default_value = DEFAULT_HEALTHZ_BIND_ADDRESS
    )]
    healthz_bind_address: String,
    /// Where /metrics and /debug/rules answer (keep it local: the rules are
    /// an inventory of the cluster).
    #[arg(
        long,
        env = "CAUSEWAY_METRICS_BIND_ADDRESS",
        default_value = DEFAULT_METRICS_BIND_ADDRESS
    )]
    metrics_bind_address: String,
    /// Which iptables to program: auto (the backend kubelet hints at, else the
    /// one holding more rules, else the `iptables` on PATH), nft or legacy.
    #[arg(long, env = "CAUSEWAY_IPTABLES_BACKEND", value_enum, default_value_t = Backend::Auto)]
    iptables_backend: Backend,
    #[command(flatten)]
    proxy: ProxyFlags,
}

#[derive(Args, Debug)]
struct TraceArgs {
    /// Source address of the packet.
    #[arg(long)]
    src: IpAddr,
    /// Destination address (a cluster IP, node IP, load-balancer IP…).
    #[arg(long)]
    dst: IpAddr,
    /// Destination port.
    #[arg(long)]
    dport: u16,
    /// tcp, udp or sctp.
    #[arg(long, default_value = "tcp")]
    proto: String,
    /// Interface the packet arrives on (for interface-based local detection).
    #[arg(long)]
    in_interface: Option<String>,
    /// More addresses of the node (the packet is the node's own when its
    /// source is one of them).
    #[arg(long, value_delimiter = ',')]
    local_address: Vec<IpAddr>,
    /// Trace a saved payload (what `render` printed) instead.
    #[arg(long, conflicts_with = "manifests")]
    payload: Option<PathBuf>,
    /// Trace the rules rendered from these manifests instead (needs --node-name).
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    manifests: Vec<PathBuf>,
    /// With --manifests: the node to render for.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// With --manifests: this node's IP(s).
    #[arg(long, value_delimiter = ',')]
    node_ip: Vec<IpAddr>,
    /// Live: the running agent's debug address (its --metrics-bind-address).
    #[arg(long, default_value = "127.0.0.1:10249")]
    debug_address: String,
    #[command(flatten)]
    proxy: ProxyFlags,
}

/// kube-proxy's flags that `run` takes and has no use for, so that a
/// DaemonSet or static pod written for kube-proxy runs unchanged; each one
/// given is named in a warning at start, as the configuration file's unused
/// fields are. Hidden from --help; docs/agent.md lists them.
const UNUSED_KUBE_PROXY_FLAGS: &[&str] = &[
    "bind-address-hard-fail",
    "config-sync-period",
    "feature-gates",
    "ipvs-exclude-cidrs",
    "ipvs-min-sync-period",
    "ipvs-scheduler",
    "ipvs-strict-arp",
    "ipvs-sync-period",
    "ipvs-tcp-timeout",
    "ipvs-tcpfin-timeout",
    "ipvs-udp-timeout",
    "kube-api-burst",
    "kube-api-content-type",
    "kube-api-qps",
    "log-flush-frequency",
    "log-json-info-buffer-size",
    "log-json-split-stream",
    "log-text-info-buffer-size",
    "log-text-split-stream",
    "profiling",
    "show-hidden-metrics-for-version",
    "vmodule",
];

/// The command line: the derived one, with [`UNUSED_KUBE_PROXY_FLAGS`] on `run`.
fn cli_command() -> clap::Command {
    Cli::command().mut_subcommand("run", |run| {
        UNUSED_KUBE_PROXY_FLAGS.iter().fold(run, |run, name| {
            run.arg(
                clap::Arg::new(*name)
                    .long(*name)
                    .hide(true)
                    .num_args(0..=1)
                    .default_missing_value("true")
                    .allow_negative_numbers(true)
                    .action(ArgAction::Set),
            )
        })
    })
}

/// Which of [`UNUSED_KUBE_PROXY_FLAGS`] the user gave to `run`.
fn unused_flags_given(matches: &ArgMatches) -> Vec<String> {
    let Some(run) = matches.subcommand_matches("run") else {
        return Vec::new();
    };
    UNUSED_KUBE_PROXY_FLAGS
        .iter()
        .filter(|name| run.value_source(name) == Some(ValueSource::CommandLine))
        .map(|name| format!("--{name}"))
        .collect()
}

fn parse_ip_family(text: &str) -> Result<u8, String> {
    match text {
        "4" | "ipv4" | "IPv4" => Ok(4),
        "6" | "ipv6" | "IPv6" => Ok(6),
        _ => Err(format!("{text:?} is not 4 or 6")),
    }
}

/// The command line, with `run` put in when the agent was started as
/// `kube-proxy` (the image links that name to it): a kube-proxy DaemonSet or
/// static pod that runs `kube-proxy --config=… --hostname-override=…` then
/// needs only its image changed. `--version` (true or `raw`) prints ours,
/// and a false one is dropped, as kube-proxy takes them. Also whether it was
/// started so.
fn command_line(mut args: Vec<std::ffi::OsString>) -> (Vec<std::ffi::OsString>, bool) {
    let started_as = args
        .first()
        .and_then(|arg0| Path::new(arg0).file_name())
        .map(|name| name.to_string_lossy().into_owned());
    if started_as.as_deref() != Some("kube-proxy") {
        return (args, false);
    }
    let version_asked = |arg: &std::ffi::OsString| -> Option<bool> {
        let arg = arg.to_string_lossy();
        match arg.strip_prefix("--version")? {
            "" | "=raw" => Some(true),
            value => value
                .strip_prefix('=')
                .and_then(|v| causeway_agent::config::parse_go_bool(v).ok()),
        }
    };
    if args[1..].iter().any(|arg| version_asked(arg) == Some(true)) {
        return (vec!["causeway-agent".into(), "--version".into()], true);
    }
    args.retain(|arg| version_asked(arg) != Some(false));
    args[0] = "causeway-agent".into();
    args.insert(1, "run".into());
    (args, true)
}

/// The command line's definition; started as `kube-proxy`, `run` reads its
/// node name and kubeconfig from flags and the file alone, as kube-proxy
/// does (it ignores NODE_NAME and KUBECONFIG).
fn cli_command_for(as_kube_proxy: bool) -> clap::Command {
    let command = cli_command();
    if !as_kube_proxy {
        return command;
    }
    command.mut_subcommand("run", |run| {
        run.mut_arg("node_name", |arg| arg.env(None))
            .mut_arg("kubeconfig", |arg| arg.env(None))
    })
}

fn main() -> anyhow::Result<()> {
    let (args, as_kube_proxy) = command_line(std::env::args_os().collect());
    let matches = cli_command_for(as_kube_proxy).get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Render(mut args) => {
            let (file, _) = config_file(args.config.as_deref())?;
            args.proxy
                .apply_file(&file, &given_flags(&matches, "render"));
            // Only the data-path fields shape a payload.
            if let Some(path) = &args.config {
                for (what, fields) in [
                    ("not known to kube-proxy", &file.unknown),
                    ("not used by causeway-agent", &file.ignored),
                ] {
                    if !fields.is_empty() {
                        eprintln!(
                            "warning: {}: fields {what}, ignored: {}",
                            path.display(),
                            fields.join(", ")
                        );
                    }
                }
            }
            render(args)
        }
        Command::Run(mut args) => {
            if args.cleanup {
                return cleanup(CleanupArgs {
                    iptables_backend: args.iptables_backend,
                });
            }
            let (file, text) = config_file(args.config.as_deref())?;
            args.apply_file(&file, &given_flags(&matches, "run"));
            if let Some(path) = &args.write_config_to {
                let settings = kube_proxy_config::write(&args.effective_settings());
                std::fs::write(path, settings)
                    .with_context(|| format!("writing {}", path.display()))?;
                return Ok(());
            }
            run(
                args,
                &file,
                text,
                &unused_flags_given(&matches),
                as_kube_proxy,
            )
        }
        Command::Trace(args) => trace(args),
        Command::Cleanup(args) => cleanup(args),
    }
}

impl RunArgs {
    /// Takes what the configuration file sets, except where a flag was given.
    fn apply_file(&mut self, file: &FileSettings, given: &BTreeSet<String>) {
        let f = file.clone();
        // kube-proxy takes --hostname-override over the file only when it
        // is not empty (kubeadm passes $(NODE_NAME), which may expand to "").
        if self
            .node_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
            && f.node_name.is_some()
        {
            self.node_name = f.node_name.clone();
        }
        fill!(given, self.node_name, f.node_name.map(Some));
        fill!(given, self.kubeconfig, f.kubeconfig.map(Some));
        fill!(given, self.sync_period, f.sync_period);
        fill!(given, self.min_sync_period, f.min_sync_period);
        fill!(given, self.healthz_bind_address, f.healthz_bind_address);
        fill!(given, self.metrics_bind_address, f.metrics_bind_address);
        fill!(given, self.verbosity, f.verbosity);
        fill!(given, self.bind_address, f.bind_address.map(Some));
        // kube-proxy's defaulting of the file: with an IPv6 bindAddress (`::`
        // included, as kubeadm writes it for IPv6 clusters) its servers
        // default to IPv6 addresses too.
        if f.bind_address.is_some_and(|ip| ip.is_ipv6()) {
            for (id, field, from_file, default) in [
                (
                    "healthz_bind_address",
                    &mut self.healthz_bind_address,
                    &file.healthz_bind_address,
                    "[::]:10256",
                ),
                (
                    "metrics_bind_address",
                    &mut self.metrics_bind_address,
                    &file.metrics_bind_address,
                    "[::1]:10249",
                ),
            ] {
                if !given.contains(id) && from_file.is_none() {
                    *field = default.to_string();
                }
            }
        }
        fill!(given, self.oom_score_adj, f.oom_score_adj.map(Some));
        fill!(given, self.conntrack_max_per_core, f.conntrack_max_per_core);
        fill!(given, self.conntrack_min, f.conntrack_min);
        fill!(
            given,
            self.conntrack_tcp_timeout_established,
            f.conntrack_tcp_established_timeout
        );
        fill!(
            given,
            self.conntrack_tcp_timeout_close_wait,
            f.conntrack_tcp_close_wait_timeout
        );
        fill!(given, self.conntrack_udp_timeout, f.conntrack_udp_timeout);
        fill!(
            given,
            self.conntrack_udp_timeout_stream,
            f.conntrack_udp_stream_timeout
        );
        // One format, from --log-json or --logging-format if either was given.
        if !given.contains("log_json") {
            fill!(given, self.logging_format, f.log_format.map(Some));
        }
        self.proxy.apply_file(file, given);
    }
}

impl RunArgs {
    /// The conntrack settings to apply at start.
    fn conntrack_tuning(&self) -> Tuning {
        Tuning {
            max_per_core: self.conntrack_max_per_core,
            min: self.conntrack_min,
            tcp_established_timeout: self.conntrack_tcp_timeout_established,
            tcp_close_wait_timeout: self.conntrack_tcp_timeout_close_wait,
            udp_timeout: self.conntrack_udp_timeout,
            udp_stream_timeout: self.conntrack_udp_timeout_stream,
        }
    }

    /// The settings `run` goes by, as a configuration file holds them.
    fn effective_settings(&self) -> FileSettings {
        let p = &self.proxy;
        let non_empty = |list: &Vec<String>| (!list.is_empty()).then(|| list.clone());
        let non_zero = |d: Duration| (!d.is_zero()).then_some(d);
        let log_format = match (self.logging_format, self.log_json) {
            (Some(format), _) => format,
            (None, true) => LogFormat::Json,
            (None, false) => LogFormat::Text,
        };
        FileSettings {
            node_name: self.node_name.clone(),
            kubeconfig: self.kubeconfig.clone(),
            cluster_cidrs: non_empty(&p.cluster_cidr),
            detect_local_mode: Some(p.detect_local_mode),
            pod_bridge_interface: p.pod_bridge_interface.clone(),
            pod_interface_name_prefix: p.pod_interface_name_prefix.clone(),
            masquerade_all: Some(p.masquerade_all),
            masquerade_bit: Some(p.masquerade_bit),
            nodeport_addresses: non_empty(&p.nodeport_addresses),
            localhost_nodeports: Some(p.localhost_nodeports),
            sync_period: Some(self.sync_period),
            min_sync_period: Some(self.min_sync_period),
            healthz_bind_address: Some(self.healthz_bind_address.clone()),
            metrics_bind_address: Some(self.metrics_bind_address.clone()),
            verbosity: Some(self.verbosity),
            log_format: Some(log_format),
            conntrack_tcp_be_liberal: Some(p.conntrack_tcp_be_liberal),
            conntrack_max_per_core: Some(self.conntrack_max_per_core),
            conntrack_min: Some(self.conntrack_min),
            conntrack_tcp_established_timeout: Some(self.conntrack_tcp_timeout_established),
            conntrack_tcp_close_wait_timeout: Some(self.conntrack_tcp_timeout_close_wait),
            conntrack_udp_timeout: non_zero(self.conntrack_udp_timeout),
            conntrack_udp_stream_timeout: non_zero(self.conntrack_udp_timeout_stream),
            oom_score_adj: self.oom_score_adj,
            bind_address: self.bind_address,
            ignored: Vec::new(),
            unknown: Vec::new(),
        }
    }
}

fn render(args: RenderArgs) -> anyhow::Result<()> {
    let rendered = render_manifests(&args)?;
    print!("{}", rendered.payload);
    Ok(())
}

/// A payload rendered from manifests, with what `trace` needs besides it.
struct Rendered {
    payload: String,
    node_ips: Vec<IpAddr>,
}

fn render_manifests(args: &RenderArgs) -> anyhow::Result<Rendered> {
    let family = if args.ip_family == 6 {
        IpFamily::V6
    } else {
        IpFamily::V4
    };
    let manifests = manifests::load(&args.manifests)?;

    let mut issues = Vec::new();
    // Lower-cased, as `run` and kube-proxy take a node name.
    let node_name = args.node_name.trim().to_lowercase();
    let node = match manifests.node(&node_name) {
        Some(node) => NodeInfo::from_node(node, &mut issues),
        None => NodeInfo::named(node_name),
    };
    let (model, model_issues) = model::build(
        &manifests.services,
        &manifests.endpoint_slices,
        &node,
        family,
    );
    issues.extend(model_issues);
    for issue in &issues {
        match manifests.origins.get(&issue.object.to_string()) {
            Some(path) => eprintln!("{}: {issue}", path.display()),
            None => eprintln!("{issue}"),
        }
    }
    if !issues.is_empty() && !args.skip_invalid {
        anyhow::bail!(
            "{} problem(s) in the manifests (listed above); fix them or pass --skip-invalid",
            issues.len()
        );
    }

    let options = args.proxy.options(&args.node_ip, args.random_fully);
    let config = options
        .render_config(family, &node)
        .with_context(|| format!("configuring the IPv{} rules", args.ip_family))?;
    let jumps = if args.jump_rules {
        rules::builtin_jumps(&config)
    } else {
        Vec::new()
    };
    let payload = rules::render(
        &model,
        &config,
        &RenderOptions {
            builtin_jumps: &jumps,
            dispatch: rules::Dispatch::for_model(&model, rules::Dispatch::Flat),
            ..RenderOptions::default()
        },
    );
    Ok(Rendered {
        payload: payload.text,
        node_ips: config.node_ips,
    })
}

fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    // `auto` as `run` resolves it, so that cleanup finds what run wrote;
    // if that fails, the plain `iptables` programs, as before.
    let backend = match args.iptables_backend {
        Backend::Auto => match causeway_agent::netfilter::HostRules::read()
            .and_then(|host| host.resolve(Backend::Auto))
        {
            Ok((backend, why)) => {
                println!("iptables backend: {backend:?} ({why})");
                backend
            }
            Err(e) => {
                eprintln!("cannot tell the iptables backend ({e:#}); using iptables as it is");
                Backend::Auto
            }
        },
        given => given,
    };
    let mut failed = false;
    for family in [IpFamily::V4, IpFamily::V6] {
        let netfilter = causeway_agent::netfilter::Netfilter::new(family, backend);
        match netfilter.cleanup() {
            Ok(report) => {
                println!(
                    "{family:?}: removed {} jump rule(s) and {} chain(s){}",
                    report.jump_rules,
                    report.chains.len(),
                    if report.chains.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", report.chains.join(" "))
                    }
                );
                for chain in &report.kept {
                    println!(
                        "{family:?}: kept {chain}: kubelet's chain too; its rule keeps other hosts \
                         off 127.0.0.0/8 while net.ipv4.conf.all.route_localnet is on"
                    );
                }
            }
            Err(e) => {
                eprintln!("{family:?}: {e:#}");
                failed = true;
            }
        }
    }
    // The nfacct counters stay, as kube-proxy's cleanup leaves them: they
    // are kube-proxy's too, by name, and a proxy still running (the other
    // backend's agent, a kube-proxy) counts into them, which it could no
    // longer do once one is deleted while no rule happens to use it.
    for name in [
        nfacct::CT_STATE_INVALID_DROPPED,
        nfacct::LOCALHOST_NODEPORTS_ACCEPTED,
    ] {
        if nfacct::packets(name).is_ok() {
            println!(
                "kept nfacct counter {name}: kube-proxy's too; `nfacct del {name}` removes it"
            );
        }
    }
    if failed {
        anyhow::bail!("cleanup did not finish (see above)");
    }
    Ok(())
}

fn trace(args: TraceArgs) -> anyhow::Result<()> {
    let TraceArgs {
        src,
        dst,
        dport,
        proto,
        in_interface,
        local_address,
        payload,
        manifests,
        node_name,
        node_ip,
        debug_address,
        proxy,
    } = args;
    if src.is_ipv4() != dst.is_ipv4() {
        // A usage error, as clap gives for an address that is not one.
        let mut cli = Cli::command();
        cli.build();
        cli.find_subcommand_mut("trace")
            .expect("the trace subcommand")
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "--src {src} and --dst {dst} are of different IP families; a packet has one"
                ),
            )
            .exit();
    }
    let proto = trace::Proto::parse(&proto)
        .with_context(|| format!("--proto {proto:?}: use tcp, udp or sctp"))?;
    let (text, mut local_addresses) = if let Some(path) = payload {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        (text, Vec::new())
    } else if !manifests.is_empty() {
        let node_name = node_name.context("--manifests needs --node-name")?;
        let rendered = render_manifests(&RenderArgs {
            manifests,
            node_name,
            node_ip,
            ip_family: if dst.is_ipv6() { 6 } else { 4 },
            random_fully: true,
            jump_rules: true,
            skip_invalid: true,
            config: None,
            proxy,
        })?;
        (rendered.payload, rendered.node_ips)
    } else {
        let text = live_rules(&debug_address, dst.is_ipv6()).with_context(|| {
            format!(
                "asking the running agent at {debug_address} for its rules \
                 (or pass --manifests or --payload)"
            )
        })?;
        (text, causeway_agent::serve::local_addresses())
    };
    local_addresses.extend(local_address);
    // A live payload leaves out the jump rules that already existed when it
    // was applied; kube-proxy's standard ones stand in for them.
    let family = if dst.is_ipv6() {
        IpFamily::V6
    } else {
        IpFamily::V4
    };
    let jumps: Vec<(&str, String)> = rules::builtin_jumps(&rules::RenderConfig::new(family))
        .iter()
        .map(|j| (j.table.as_str(), j.restore_line()))
        .collect();
    let rules = trace::Ruleset::parse(&text)
        .and_then(|r| r.with_builtin_jumps(&jumps))
        .context("the rules do not parse")?;
    let traced = trace::trace(
        &rules,
        &trace::Packet {
            src,
            dst,
            dport,
            proto,
        },
        &trace::NodeView {
            local_addresses,
            in_interface,
        },
    );
    print!("{traced}");
    Ok(())
}

/// The payload the running agent last applied, from its debug endpoint.
fn live_rules(address: &str, ipv6: bool) -> anyhow::Result<String> {
    let family = if ipv6 { "6" } else { "4" };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let text = causeway_agent::debug::fetch(
            address,
            &format!("/debug/rules?family={family}&which=applied"),
        )
        .await?;
        Ok(text)
    })
}

/// How often `run` looks at its `--config` file for a change.
const CONFIG_CHECK_PERIOD: Duration = Duration::from_secs(5);

fn run(
    args: RunArgs,
    file: &FileSettings,
    file_text: String,
    unused_flags: &[String],
    as_kube_proxy: bool,
) -> anyhow::Result<()> {
    let mut shown_settings = args.effective_settings();
    let tuning = args.conntrack_tuning();
    let RunArgs {
        config: config_path,
        node_name,
        kubeconfig,
        master,
        node_ip,
        bind_address,
        sync_period,
        min_sync_period,
        log_json,
        logging_format,
        verbosity,
        proxy_mode: _,
        oom_score_adj,
        conntrack_max_per_core: _,
        conntrack_min: _,
        conntrack_tcp_timeout_established: _,
        conntrack_tcp_timeout_close_wait: _,
        conntrack_udp_timeout: _,
        conntrack_udp_timeout_stream: _,
        init_only,
        write_config_to: _,
        cleanup: _,
        healthz_port,
        metrics_port,
        iptables_backend,
        healthz_bind_address,
        metrics_bind_address,
        proxy,
    } = args;
    init_logging(
        logging_format.map_or(log_json, |format| format == LogFormat::Json),
        verbosity,
    );
    let healthz_bind_address = server_address(
        &healthz_bind_address,
        DEFAULT_HEALTHZ_BIND_ADDRESS,
        healthz_port,
    )
    .context("--healthz-bind-address")?;
    let metrics_bind_address = server_address(
        &metrics_bind_address,
        DEFAULT_METRICS_BIND_ADDRESS,
        metrics_port,
    )
    .context("--metrics-bind-address")?;
    // As kube-proxy shows them: with the port added, or empty when off.
    shown_settings.healthz_bind_address = Some(healthz_bind_address.clone().unwrap_or_default());
    shown_settings.metrics_bind_address = Some(metrics_bind_address.clone().unwrap_or_default());
    let configz = kube_proxy_config::configz(&shown_settings);
    // As in kube-proxy, a specific bind address is this node's IP of its
    // family, in place of the Node's InternalIPs of that family.
    let primary_ip = bind_address.filter(|ip| !ip.is_unspecified());
    let node_name = resolve_node_name(
        node_name,
        std::fs::read_to_string("/proc/sys/kernel/hostname").ok(),
    )?;
    if !unused_flags.is_empty() {
        tracing::warn!(
            flags = unused_flags.join(", "),
            "these kube-proxy flags are not used by causeway-agent"
        );
    }
    if let Some(adj) = oom_score_adj {
        set_oom_score_adj(adj);
    }
    if let Some(path) = &config_path {
        tracing::info!(file = %path.display(), "read kube-proxy's configuration");
        if !file.unknown.is_empty() {
            // kube-proxy, too, goes on without them after its strict check.
            tracing::warn!(
                fields = file.unknown.join(", "),
                "these fields of the configuration file are not known to kube-proxy; ignored"
            );
        }
        if !file.ignored.is_empty() {
            tracing::warn!(
                fields = file.ignored.join(", "),
                "these fields of the configuration file are not used by causeway-agent"
            );
        }
    }
    // Before anything else: two backends with Service rules is a node that
    // silently misroutes, so say so and stop.
    let mut families = vec![IpFamily::V4];
    if node_ip.iter().chain(&primary_ip).any(IpAddr::is_ipv6)
        || proxy.cluster_cidr.iter().any(|c| c.contains(':'))
    {
        families.push(IpFamily::V6);
    }
    let host = causeway_agent::netfilter::HostRules::read()?;
    let (backend, why) = host.resolve(iptables_backend)?;
    tracing::info!(backend = ?backend, reason = %why, "iptables backend");
    for family in families {
        host.refuse_other(backend, family)?;
    }
    drop(host);
    // Then the node's settings, as kube-proxy sets them before its rules.
    let start_warnings = tune_conntrack(&tuning)?;
    let conntrack_tcp_be_liberal = liberal_tcp_tracking(proxy.conntrack_tcp_be_liberal)?;
    if init_only {
        ensure_route_localnet(&proxy, &node_ip, &node_name)?;
        tracing::info!("the node's settings are in place; exiting (--init-only)");
        return Ok(());
    }
    let random_fully = match causeway_agent::netfilter::supports_random_fully(backend) {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!("iptables is older than 1.6.2: masquerading without --random-fully");
            false
        }
        Err(e) => {
            tracing::warn!("{e}: masquerading without --random-fully");
            false
        }
    };
    let accounting = ensure_accounting();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut metrics = Metrics::new();
        metrics.register_accounting(accounting);
        let metrics = Arc::new(metrics);
        let client = kube_client(
            kubeconfig.as_deref(),
            master.as_deref(),
            as_kube_proxy,
            &metrics,
        )
        .await?;
        let config = RunConfig {
            node_name,
            options: ProxyOptions {
                conntrack_tcp_be_liberal,
                accounting,
                primary_ip,
                ..proxy.options(&node_ip, random_fully)
            },
            sync_period,
            min_sync_period,
            backend,
            healthz_bind_address,
            metrics_bind_address,
            start_warnings,
            configz,
        };
        let Some(path) = config_path else {
            return agent::run(client, config, metrics).await;
        };
        // As kube-proxy does: a changed file ends the process (the rules
        // stay), and the DaemonSet starts it again with the new one.
        tokio::select! {
            result = agent::run(client, config, metrics) => result,
            change = kube_proxy_config::changed(&path, &file_text, CONFIG_CHECK_PERIOD) => {
                // In the log too, which may be JSON, not only on stderr.
                tracing::error!(reason = %change, "the configuration file changed; exiting so that it is read again at restart, as kube-proxy does; the rules stay in place");
                anyhow::bail!("{change}; exiting so that it is read again at restart, as kube-proxy does; the rules stay in place")
            }
        }
    })
}

/// The Node this agent serves: the name given (flag, NODE_NAME or the
/// file's `hostnameOverride`), else this machine's hostname, as kube-proxy
/// takes it; lower-cased and trimmed, as kube-proxy does with both.
fn resolve_node_name(given: Option<String>, hostname: Option<String>) -> anyhow::Result<String> {
    let clean = |name: String| Some(name.trim().to_lowercase()).filter(|n| !n.is_empty());
    if let Some(name) = given.and_then(clean) {
        return Ok(name);
    }
    let name = hostname.and_then(clean).context(
        "no node name: pass --node-name, set NODE_NAME, or set hostnameOverride in --config \
         (the hostname, which kube-proxy would use, is empty)",
    )?;
    tracing::info!(node = %name, "no node name given: using the hostname, as kube-proxy does");
    Ok(name)
}

/// Where a server listens, read as kube-proxy reads its bind addresses: an
/// empty one is `default`; one without a port gets `port_flag`'s port (the
/// deprecated `--healthz-port`/`--metrics-port`) or `default`'s, which is
/// kube-proxy's; a port the address has is kept; `port_flag` 0 is no server.
fn server_address(
    address: &str,
    default: &str,
    port_flag: Option<u16>,
) -> anyhow::Result<Option<String>> {
    if port_flag == Some(0) {
        return Ok(None);
    }
    let address = match address.trim() {
        "" => default,
        given => given,
    };
    if let Ok(socket) = address.parse::<std::net::SocketAddr>() {
        return Ok(Some(socket.to_string()));
    }
    let ip: IpAddr = address
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .with_context(|| format!("{address:?} is not an address, with or without a port"))?;
    let default_port = default
        .parse::<std::net::SocketAddr>()
        .context("a default bind address")?
        .port();
    let port = port_flag.unwrap_or(default_port);
    Ok(Some(std::net::SocketAddr::new(ip, port).to_string()))
}

/// Writes the agent's OOM score adjustment. As in kube-proxy, a failure
/// (lowering the score needs CAP_SYS_RESOURCE) is logged, not fatal.
fn set_oom_score_adj(adj: i32) {
    match std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
        Ok(()) => tracing::info!(oom_score_adj = adj, "set the OOM score adjustment"),
        Err(e) => {
            tracing::warn!(error = %e, oom_score_adj = adj, "cannot set the OOM score adjustment")
        }
    }
}

/// Creates kube-proxy's nfacct counters, which the rules then count into
/// and /metrics exports; one that cannot be created is left out of both,
/// with a warning, as in kube-proxy.
fn ensure_accounting() -> Accounting {
    let ensure = |name: &str| match nfacct::ensure(name) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(counter = name, error = %e, "cannot create an nfacct counter; its rules count nothing and its kubeproxy_iptables_* metric is not exported (install nfacct)");
            false
        }
    };
    Accounting {
        invalid_dropped: ensure(nfacct::CT_STATE_INVALID_DROPPED),
        localhost_nodeports: ensure(nfacct::LOCALHOST_NODEPORTS_ACCEPTED),
    }
}

/// Sets conntrack's table size and timeouts as kube-proxy does at start; the
/// defaults that could not be set are logged and returned (for Node events).
fn tune_conntrack(tuning: &Tuning) -> anyhow::Result<Vec<String>> {
    let cpus = conntrack_tuning::node_cpus();
    let applied = conntrack_tuning::apply(tuning, cpus, &conntrack_tuning::Paths::default())
        .map_err(anyhow::Error::msg)?;
    for (setting, value) in &applied.set {
        tracing::info!(
            setting,
            value,
            "set conntrack's setting, as kube-proxy does"
        );
    }
    for warning in &applied.warnings {
        tracing::warn!("{warning}");
    }
    Ok(applied.warnings)
}

/// For --init-only: `route_localnet`, if NodePorts are to answer on
/// 127.0.0.1, as the first sync would set it (and stop there if it cannot:
/// setting it is this run's whole job).
fn ensure_route_localnet(
    proxy: &ProxyFlags,
    node_ip: &[IpAddr],
    node_name: &str,
) -> anyhow::Result<()> {
    use causeway_agent::sysctl::{self, ROUTE_LOCALNET};
    // Only the NodePort addresses matter, and 127.0.0.1 is never the node's
    // `primary` address: a node without its IPs or pod CIDRs (which NodeCIDR
    // detection needs) decides the same.
    let node = NodeInfo::named(node_name.to_string());
    let options = ProxyOptions {
        detect_local_mode: DetectLocalMode::None,
        ..proxy.options(node_ip, false)
    };
    let config = options
        .render_config(IpFamily::V4, &node)
        .context("the NodePort addresses")?;
    if config.localhost_nodeports_effective() {
        sysctl::ensure(ROUTE_LOCALNET, "1").with_context(|| {
            format!(
                "setting {ROUTE_LOCALNET} to 1 for NodePorts on 127.0.0.1 (--localhost-nodeports=false \
                 turns them off)"
            )
        })?;
        tracing::info!("net.ipv4.conf.all.route_localnet is 1, for NodePorts on 127.0.0.1");
    }
    Ok(())
}

/// Whether conntrack tracks TCP liberally in this network namespace, after
/// turning that on if `set` (--conntrack-tcp-be-liberal or the file's
/// conntrack.tcpBeLiberal). As in kube-proxy, the sysctl's value, not the
/// setting, decides whether forwarded packets conntrack finds INVALID are
/// dropped, and a failed write stops the agent.
fn liberal_tcp_tracking(set: bool) -> anyhow::Result<bool> {
    use causeway_agent::sysctl::{self, CONNTRACK_TCP_BE_LIBERAL};
    if set {
        sysctl::ensure(CONNTRACK_TCP_BE_LIBERAL, "1").with_context(|| {
            format!(
                "conntrack's liberal TCP mode (--conntrack-tcp-be-liberal, conntrack.tcpBeLiberal): \
                 setting {CONNTRACK_TCP_BE_LIBERAL} to 1; set it on the node beforehand, run the \
                 agent with a writable /proc/sys (privileged), or load nf_conntrack first"
            )
        })?;
    }
    // Unreadable (conntrack not loaded yet): not liberal, so the drop stays.
    Ok(sysctl::read(CONNTRACK_TCP_BE_LIBERAL).is_ok_and(|value| value != "0"))
}

/// A client from `--kubeconfig` (at `--master` if given), else one for
/// `--master` alone with no credentials (as kube-proxy makes it), else from
/// KUBECONFIG, ~/.kube/config or the in-cluster config; started as
/// `kube-proxy`, from the in-cluster config alone, as kube-proxy. Its
/// requests are counted in `metrics`.
async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    master: Option<&str>,
    as_kube_proxy: bool,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<kube::Client> {
    let config = match (kubeconfig, master) {
        (Some(path), master) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            let mut config = kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?;
            if let Some(master) = master {
                let tls = config.root_cert.is_some()
                    || config.accept_invalid_certs
                    || config.auth_info.client_certificate.is_some()
                    || config.auth_info.client_certificate_data.is_some();
                config.cluster_url = master_url(master, tls)?;
            }
            config
        }
        (None, Some(master)) => kube::Config::new(master_url(master, false)?),
        (None, None) if as_kube_proxy => kube::Config::incluster().context(
            "no kubeconfig: pass --kubeconfig or --master, set clientConnection.kubeconfig in \
             --config, or run in a pod",
        )?,
        (None, None) => kube::Config::infer()
            .await
            .context("no kubeconfig: pass --kubeconfig or --master, or run in a pod")?,
    };
    Ok(causeway_telemetry::rest_client::client(
        config,
        &metrics.rest_client,
    )?)
}

/// kube-proxy's `--master` as a URL. Without a scheme it is https when the
/// client has TLS settings, else http, as client-go defaults it.
fn master_url(text: &str, tls: bool) -> anyhow::Result<http::Uri> {
    let text = text.trim();
    let url = if text.contains("://") {
        text.to_string()
    } else if text.contains('/') {
        anyhow::bail!("--master {text:?}: give a URL or a host:port pair");
    } else {
        format!("{}://{text}", if tls { "https" } else { "http" })
    };
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("--master {text:?} is not a URL"))?;
    match uri.authority() {
        None => anyhow::bail!("--master {text:?} names no host"),
        Some(authority) if authority.host().is_empty() => {
            anyhow::bail!("--master {text:?} names no host")
        }
        // Credentials go in the kubeconfig, not in a URL that is logged and
        // labels the request metrics.
        Some(authority) if authority.as_str().contains('@') => {
            anyhow::bail!("--master: a user or password in the URL is not taken; use --kubeconfig")
        }
        Some(_) => Ok(uri),
    }
}

/// Logs to stderr, filtered by RUST_LOG if set, else by the klog verbosity.
fn init_logging(json: bool, verbosity: u32) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(verbosity)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_fills_only_what_no_flag_gave() {
        let matches = Cli::command()
            .try_get_matches_from([
                "causeway-agent",
                "run",
                "--config",
                "kube-proxy.conf",
                "--sync-period",
                "10s",
                "--masquerade-bit",
                "12",
            ])
            .unwrap();
        let Command::Run(mut args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("run")
        };
        let file = kube_proxy_config::parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
             kind: KubeProxyConfiguration\n\
             hostnameOverride: node-a\n\
             metricsBindAddress: 0.0.0.0:10249\n\
             nodePortAddresses: [primary]\n\
             iptables: {masqueradeBit: 13, syncPeriod: 1m0s, minSyncPeriod: 2s, masqueradeAll: true}\n",
        )
        .unwrap();
        args.apply_file(&file, &given_flags(&matches, "run"));
        // Given on the command line: the flags win.
        assert_eq!(args.sync_period, Duration::from_secs(10));
        assert_eq!(args.proxy.masquerade_bit, 12);
        // Left at their defaults: the file fills them.
        assert_eq!(args.min_sync_period, Duration::from_secs(2));
        assert!(args.proxy.masquerade_all);
        assert_eq!(args.proxy.nodeport_addresses, ["primary"]);
        assert_eq!(args.metrics_bind_address, "0.0.0.0:10249");
        // Not in the file: the defaults stay.
        assert_eq!(args.healthz_bind_address, "0.0.0.0:10256");
        assert!(args.proxy.localhost_nodeports);
        // NODE_NAME, where this test runs with it, counts as given.
        if std::env::var_os("NODE_NAME").is_none() {
            assert_eq!(args.node_name.as_deref(), Some("node-a"));
        }
    }

    #[test]
    fn flags_accept_kube_proxy_spellings() {
        let cli = Cli::try_parse_from([
            "causeway-agent",
            "render",
            "--manifests",
            "a.yaml",
            "b",
            "--node-name",
            "n1",
            "--localhost-nodeports=false",
            "--masquerade-all",
            "--detect-local-mode",
            "NodeCIDR",
            "--nodeport-addresses",
            "primary,10.0.0.0/8",
            "--cluster-cidr=10.244.0.0/16,fd00::/48",
        ])
        .unwrap();
        let Command::Render(args) = cli.command else {
            panic!("render")
        };
        assert_eq!(
            args.manifests,
            [PathBuf::from("a.yaml"), PathBuf::from("b")]
        );
        assert!(!args.proxy.localhost_nodeports);
        assert!(args.proxy.masquerade_all);
        assert_eq!(args.proxy.detect_local_mode, DetectLocalMode::NodeCidr);
        assert_eq!(args.proxy.nodeport_addresses, ["primary", "10.0.0.0/8"]);
        assert_eq!(args.proxy.cluster_cidr.len(), 2);
        assert_eq!(args.ip_family, 4);
        assert!(
            Cli::try_parse_from([
                "causeway-agent",
                "render",
                "--manifests",
                "a",
                "--node-name",
                "n",
                "--ip-family",
                "5"
            ])
            .is_err()
        );
        // kube-proxy's iptables-mode names for the sync periods and the mark.
        let cli = Cli::try_parse_from([
            "causeway-agent",
            "run",
            "--node-name",
            "n1",
            "--iptables-sync-period",
            "45s",
            "--iptables-min-sync-period=2s",
            "--iptables-masquerade-bit",
            "13",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        assert_eq!(args.sync_period, Duration::from_secs(45));
        assert_eq!(args.min_sync_period, Duration::from_secs(2));
        assert_eq!(args.proxy.masquerade_bit, 13);
        assert_eq!(args.verbosity, 0);

        // What kube-proxy DaemonSets pass (EKS: --v=2), klog's short form,
        // and the rest of kube-proxy's logging and mode flags.
        for verbosity in [["--v=2"], ["-v=2"]] {
            let cli = Cli::try_parse_from(
                ["causeway-agent", "run", "--hostname-override", "N1"]
                    .into_iter()
                    .chain(verbosity),
            )
            .unwrap();
            let Command::Run(args) = cli.command else {
                panic!("run")
            };
            assert_eq!(args.verbosity, 2);
        }
        let cli = Cli::try_parse_from([
            "causeway-agent",
            "run",
            "-v",
            "4",
            "--proxy-mode=iptables",
            "--logging-format",
            "json",
            "--iptables-localhost-nodeports=false",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        assert_eq!(args.verbosity, 4);
        assert_eq!(args.logging_format, Some(LogFormat::Json));
        assert!(!args.proxy.localhost_nodeports);
        let error = Cli::try_parse_from(["causeway-agent", "run", "--proxy-mode", "ipvs"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("\"ipvs\": causeway-agent is kube-proxy's iptables mode"),
            "{error}"
        );
        // On the command line --logging-format wins over --log-json (the
        // Helm chart passes --log-json; a user may add kube-proxy's flag).
        let cli = Cli::try_parse_from([
            "causeway-agent",
            "run",
            "--log-json",
            "--logging-format=text",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        assert!(args.log_json);
        assert_eq!(args.logging_format, Some(LogFormat::Text));
    }

    #[test]
    fn conntrack_settings_come_from_flags_then_the_file_then_kube_proxys_defaults() {
        let args = run_with_file(
            "conntrack: {maxPerCore: 0, min: null, tcpCloseWaitTimeout: 0s, udpTimeout: 45s}\n",
            &[
                "--conntrack-min=65536",
                "--conntrack-udp-timeout=10s",
                "--conntrack-tcp-timeout-established=2h",
            ],
        );
        assert_eq!(args.conntrack_max_per_core, 0);
        assert_eq!(args.conntrack_min, 65_536);
        assert_eq!(
            args.conntrack_tcp_timeout_established,
            Duration::from_secs(7200)
        );
        // 0s in the file: leave it, not kube-proxy's default of 1 h.
        assert_eq!(args.conntrack_tcp_timeout_close_wait, Duration::ZERO);
        assert_eq!(args.conntrack_udp_timeout, Duration::from_secs(10));
        assert_eq!(args.conntrack_udp_timeout_stream, Duration::ZERO);
        // Nothing given: kube-proxy's defaults, which the tuning takes for
        // best effort (what differs from them must take effect).
        let args = run_with_file("", &[]);
        assert_eq!(args.conntrack_tuning(), Tuning::default());
        assert_eq!(args.conntrack_max_per_core, 32_768);
        assert_eq!(
            args.conntrack_tcp_timeout_established,
            Duration::from_secs(86_400)
        );
        for bad in [
            "--conntrack-max-per-core=-1",
            // kube-proxy's are int32.
            "--conntrack-min=2147483648",
            "--conntrack-udp-timeout=soon",
        ] {
            assert!(
                cli_command()
                    .try_get_matches_from(["causeway-agent", "run", bad])
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn without_a_node_name_the_hostname_is_used_as_kube_proxy_does() {
        let name = |given: Option<&str>, host: Option<&str>| {
            resolve_node_name(given.map(Into::into), host.map(Into::into))
                .map_err(|e| e.to_string())
        };
        assert_eq!(name(Some(" Node-A "), Some("host")).unwrap(), "node-a");
        assert_eq!(
            name(None, Some("IP-10-0-1-5.ec2.internal\n")).unwrap(),
            "ip-10-0-1-5.ec2.internal"
        );
        assert_eq!(name(Some(""), Some("host")).unwrap(), "host");
        assert!(
            name(None, Some("\n"))
                .unwrap_err()
                .starts_with("no node name")
        );
        assert!(name(None, None).unwrap_err().starts_with("no node name"));
    }

    #[test]
    fn an_empty_hostname_override_leaves_the_files() {
        for (flag, want) in [
            ("--hostname-override=", "node-from-file"),
            ("--hostname-override=  ", "node-from-file"),
            ("--hostname-override=node-b", "node-b"),
        ] {
            let args = run_with_file("hostnameOverride: node-from-file\n", &[flag]);
            assert_eq!(args.node_name.as_deref(), Some(want), "{flag:?}");
        }
    }

    #[test]
    fn started_as_kube_proxy_it_runs() {
        let line = |args: &[&str]| -> (Vec<String>, bool) {
            let (line, as_kube_proxy) = command_line(args.iter().map(Into::into).collect());
            (
                line.into_iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
                as_kube_proxy,
            )
        };
        let run = |rest: &[&str]| {
            let mut line = vec!["causeway-agent".to_string(), "run".to_string()];
            line.extend(rest.iter().map(|a| a.to_string()));
            (line, true)
        };
        assert_eq!(
            line(&["/usr/local/bin/kube-proxy", "--config=/c", "--v=2"]),
            run(&["--config=/c", "--v=2"])
        );
        assert_eq!(line(&["kube-proxy"]), run(&[]));
        let version = (
            vec!["causeway-agent".to_string(), "--version".to_string()],
            true,
        );
        for asks in [
            "--version",
            "--version=raw",
            "--version=true",
            "--version=1",
        ] {
            assert_eq!(line(&["kube-proxy", "--v=2", asks]), version, "{asks}");
        }
        // A false one is dropped, as kube-proxy then just runs.
        for declines in ["--version=false", "--version=0", "--version=F"] {
            assert_eq!(
                line(&["kube-proxy", declines, "--v=2"]),
                run(&["--v=2"]),
                "{declines}"
            );
        }
        // Under its own name, nothing changes.
        assert_eq!(
            line(&["/bin/causeway-agent", "--version"]),
            (
                vec!["/bin/causeway-agent".to_string(), "--version".to_string()],
                false
            )
        );
        let (args, as_kube_proxy) = command_line(vec![
            "kube-proxy".into(),
            "--hostname-override=node-1".into(),
        ]);
        let matches = cli_command_for(as_kube_proxy)
            .try_get_matches_from(args)
            .unwrap();
        let Command::Run(args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("run")
        };
        assert_eq!(args.node_name.as_deref(), Some("node-1"));
    }

    #[test]
    fn started_as_kube_proxy_the_environment_does_not_name_the_node() {
        // kube-proxy ignores NODE_NAME and KUBECONFIG; under its own name
        // the agent reads them (the chart sets NODE_NAME).
        let command = cli_command_for(true);
        let run_command = command.find_subcommand("run").unwrap();
        for id in ["node_name", "kubeconfig"] {
            let arg = run_command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap();
            assert_eq!(arg.get_env(), None, "{id}");
        }
        let own = cli_command_for(false);
        let own_run = own.find_subcommand("run").unwrap();
        assert_eq!(
            own_run
                .get_arguments()
                .find(|a| a.get_id() == "node_name")
                .and_then(|a| a.get_env()),
            Some(std::ffi::OsStr::new("NODE_NAME"))
        );
    }

    #[test]
    fn write_config_to_writes_what_run_goes_by_and_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kube-proxy.conf");
        std::fs::write(
            &file,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
             kind: KubeProxyConfiguration\n\
             clusterCIDR: 10.244.0.0/16\n\
             iptables: {masqueradeBit: 13, syncPeriod: 1m0s}\n\
             conntrack: {maxPerCore: 0, tcpCloseWaitTimeout: 0s}\n",
        )
        .unwrap();
        let file = file.display().to_string();
        let effective = |argv: &[&str]| run_args(argv).effective_settings();
        let first = effective(&[
            "--config",
            &file,
            "--hostname-override=node-a",
            "--masquerade-bit=12",
            "--v=4",
            "--logging-format=json",
            "--nodeport-addresses=primary,127.0.0.0/8",
            "--conntrack-udp-timeout=45s",
            "--oom-score-adj=-998",
        ]);
        // The file's values, the flags over them, and kube-proxy's defaults.
        assert_eq!(first.masquerade_bit, Some(12));
        assert_eq!(first.sync_period, Some(Duration::from_secs(60)));
        assert_eq!(first.conntrack_max_per_core, Some(0));
        assert_eq!(first.conntrack_min, Some(131_072));
        assert_eq!(first.conntrack_tcp_close_wait_timeout, Some(Duration::ZERO));
        // /configz shows the same settings, in kube-proxy's internal shape.
        let configz: serde_json::Value =
            serde_json::from_str(&kube_proxy_config::configz(&first)).unwrap();
        let shown = &configz["kubeproxy.config.k8s.io"];
        assert_eq!(shown["Mode"], "iptables");
        assert_eq!(shown["HostnameOverride"], "node-a");
        assert_eq!(shown["IPTables"]["MasqueradeBit"], 12);
        assert_eq!(shown["IPTables"]["LocalhostNodePorts"], true);
        assert_eq!(shown["SyncPeriod"], "1m0s");
        assert_eq!(shown["MinSyncPeriod"], "1s");
        assert_eq!(
            shown["DetectLocal"]["ClusterCIDRs"],
            serde_json::json!(["10.244.0.0/16"])
        );
        assert_eq!(
            shown["NodePortAddresses"],
            serde_json::json!(["primary", "127.0.0.0/8"])
        );
        let conntrack = &shown["Linux"]["Conntrack"];
        assert_eq!(conntrack["MaxPerCore"], 0);
        assert_eq!(conntrack["Min"], 131_072);
        assert_eq!(conntrack["TCPEstablishedTimeout"], "24h0m0s");
        assert_eq!(conntrack["TCPCloseWaitTimeout"], "0s");
        assert_eq!(conntrack["UDPTimeout"], "45s");
        assert_eq!(shown["Linux"]["OOMScoreAdj"], -998);
        assert_eq!(shown["Logging"]["format"], "json");
        assert_eq!(shown["Logging"]["verbosity"], 4);
        assert_eq!(shown["MetricsBindAddress"], "127.0.0.1:10249");
        let written = dir.path().join("written.conf");
        std::fs::write(&written, kube_proxy_config::write(&first)).unwrap();
        let again = effective(&["--config", &written.display().to_string()]);
        assert_eq!(
            again,
            first,
            "{}",
            std::fs::read_to_string(&written).unwrap()
        );
    }

    #[test]
    fn a_kube_proxy_static_pods_flags_are_taken() {
        // kops-style: every flag kube-proxy has, those the agent does not
        // use included, with negative numbers and bare booleans.
        let matches = cli_command()
            .try_get_matches_from([
                "causeway-agent",
                "run",
                "--master=https://api.internal.example:443",
                "--hostname-override=ip-10-0-1-5.ec2.internal",
                "--conntrack-max-per-core=131072",
                "--oom-score-adj=-998",
                "--kube-api-qps",
                "20",
                "--profiling",
                "--feature-gates=A=true,B=false",
                "--conntrack-tcp-be-liberal",
                "--v=2",
            ])
            .unwrap();
        assert_eq!(
            unused_flags_given(&matches),
            ["--feature-gates", "--kube-api-qps", "--profiling"]
        );
        let Command::Run(args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("run")
        };
        assert_eq!(
            args.master.as_deref(),
            Some("https://api.internal.example:443")
        );
        assert_eq!(args.oom_score_adj, Some(-998));
        assert!(args.proxy.conntrack_tcp_be_liberal);
        assert_eq!(args.conntrack_max_per_core, 131_072);
        assert!(!args.cleanup);
        assert_eq!(args.verbosity, 2);
        // The unused flags stay out of --help, which lists what the agent does.
        let help = cli_command()
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("--master"), "{help}");
        assert!(!help.contains("--kube-api-qps"), "{help}");
        for bad in [
            &["--oom-score-adj=-1001"][..],
            &["--no-such-flag"],
            // Windows-only in kube-proxy.
            &["--windows-service"],
            &["--bind-address=all"],
        ] {
            assert!(
                cli_command()
                    .try_get_matches_from(["causeway-agent", "run"].iter().chain(bad))
                    .is_err(),
                "{bad:?}"
            );
        }
        // Booleans as Go's flag package takes them.
        for (flags, cleanup) in [
            (&["--cleanup"][..], true),
            (&["--cleanup=true"], true),
            (&["--cleanup=false"], false),
            (&["--cleanup=1"], true),
            (&["--cleanup=F"], false),
        ] {
            let matches = cli_command()
                .try_get_matches_from(["causeway-agent", "run"].iter().chain(flags))
                .unwrap();
            let Command::Run(args) = Cli::from_arg_matches(&matches).unwrap().command else {
                panic!("run")
            };
            assert_eq!(args.cleanup, cleanup, "{flags:?}");
            assert!(unused_flags_given(&matches).is_empty());
        }
        // Given twice, the last one counts, as in kube-proxy; lists add up.
        let matches = cli_command()
            .try_get_matches_from([
                "causeway-agent",
                "run",
                "--v=2",
                "--hostname-override=a",
                "--feature-gates=A=true",
                "--v=4",
                "--hostname-override=b",
                "--feature-gates=B=true",
                "--bind-address=10.0.1.5",
                "--healthz-port=10356",
                "--node-ip=10.0.2.5",
                "--node-ip=fd00::5",
                "--cluster-cidr=10.0.0.0/8",
                "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
                "--masquerade-all=1",
                "--nodeport-addresses=primary",
                "--nodeport-addresses=127.0.0.0/8",
            ])
            .unwrap();
        assert_eq!(unused_flags_given(&matches), ["--feature-gates"]);
        let Command::Run(args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("run")
        };
        assert_eq!(args.verbosity, 4);
        assert_eq!(args.node_name.as_deref(), Some("b"));
        assert_eq!(args.node_ip.len(), 2);
        assert_eq!(args.bind_address, Some("10.0.1.5".parse().unwrap()));
        assert_eq!(args.healthz_port, Some(10356));
        // --cluster-cidr is one value in kube-proxy, --nodeport-addresses a list.
        assert_eq!(
            args.proxy.cluster_cidr,
            ["10.244.0.0/16", "fd00:10:244::/56"]
        );
        assert_eq!(args.proxy.nodeport_addresses, ["primary", "127.0.0.0/8"]);
        assert!(args.proxy.masquerade_all);
    }

    #[test]
    fn bind_addresses_read_as_kube_proxy_reads_them() {
        let healthz =
            |address: &str, port| server_address(address, DEFAULT_HEALTHZ_BIND_ADDRESS, port);
        let some = |text: &str| Some(text.to_string());
        assert_eq!(
            healthz("0.0.0.0:10256", None).unwrap(),
            some("0.0.0.0:10256")
        );
        // Empty is the default, not "off".
        assert_eq!(healthz("", None).unwrap(), some("0.0.0.0:10256"));
        // No port: kube-proxy's, or the deprecated port flag's.
        assert_eq!(healthz("10.0.1.5", None).unwrap(), some("10.0.1.5:10256"));
        assert_eq!(healthz("::", Some(10356)).unwrap(), some("[::]:10356"));
        assert_eq!(healthz("[::1]", None).unwrap(), some("[::1]:10256"));
        // A port of its own is kept, as kube-proxy keeps it.
        assert_eq!(
            healthz("0.0.0.0:10256", Some(10356)).unwrap(),
            some("0.0.0.0:10256")
        );
        // Port 0: no server.
        assert_eq!(healthz("0.0.0.0:10256", Some(0)).unwrap(), None);
        let error = healthz("localhost:10256", None).unwrap_err().to_string();
        assert!(
            error.contains("\"localhost:10256\" is not an address"),
            "{error}"
        );
    }

    /// `run` with `flags` as `main` reads them: the file of their
    /// `--config`, if any, read and applied under them.
    fn run_args(flags: &[&str]) -> RunArgs {
        let matches = cli_command()
            .try_get_matches_from(["causeway-agent", "run"].iter().chain(flags))
            .unwrap();
        let Command::Run(mut args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("run")
        };
        let (file, _) = config_file(args.config.as_deref()).unwrap();
        args.apply_file(&file, &given_flags(&matches, "run"));
        args
    }

    /// `run` with `flags`, and a configuration file of `fields` applied.
    fn run_with_file(fields: &str, flags: &[&str]) -> RunArgs {
        let file = kube_proxy_config::parse(&format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
             kind: KubeProxyConfiguration\n{fields}"
        ))
        .unwrap();
        let matches = cli_command()
            .try_get_matches_from(["causeway-agent", "run"].iter().chain(flags))
            .unwrap();
        let Command::Run(mut args) = Cli::from_arg_matches(&matches).unwrap().command else {
            panic!("run")
        };
        args.apply_file(&file, &given_flags(&matches, "run"));
        args
    }

    #[test]
    fn an_ipv6_bind_address_in_the_file_moves_the_servers_defaults() {
        let parse = run_with_file;
        let args = parse("bindAddress: \"::\"\n", &[]);
        assert_eq!(args.healthz_bind_address, "[::]:10256");
        assert_eq!(args.metrics_bind_address, "[::1]:10249");
        // kubeadm's IPv4 file changes nothing.
        let args = parse("bindAddress: 0.0.0.0\n", &[]);
        assert_eq!(args.healthz_bind_address, "0.0.0.0:10256");
        // The file's own address, or a flag, wins over that default.
        let args = parse(
            "bindAddress: \"::\"\nmetricsBindAddress: \"[::]:10249\"\n",
            &["--healthz-bind-address=[fd00::5]:10256"],
        );
        assert_eq!(args.healthz_bind_address, "[fd00::5]:10256");
        assert_eq!(args.metrics_bind_address, "[::]:10249");
    }

    #[test]
    fn master_urls_get_client_gos_default_scheme() {
        let url = |text, tls| master_url(text, tls).map(|u| u.to_string());
        assert_eq!(
            url("https://api.internal.example", false).unwrap(),
            "https://api.internal.example/"
        );
        assert_eq!(
            url("10.0.0.1:6443", true).unwrap(),
            "https://10.0.0.1:6443/"
        );
        assert_eq!(
            url("10.0.0.1:8080", false).unwrap(),
            "http://10.0.0.1:8080/"
        );
        assert_eq!(
            url("[fd00::1]:6443", true).unwrap(),
            "https://[fd00::1]:6443/"
        );
        for bad in [
            "https://",
            "http://[::1",
            "a b",
            "10.0.0.1:6443/prefix",
            "https://admin:secret@10.0.0.1:6443",
        ] {
            assert!(master_url(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_files_logging_settings_apply_unless_a_flag_says_otherwise() {
        let parse =
            |flags: &[&str]| run_with_file("logging: {format: json, verbosity: 4}\n", flags);
        let args = parse(&[]);
        assert_eq!(args.verbosity, 4);
        assert_eq!(args.logging_format, Some(LogFormat::Json));
        let args = parse(&["--v=2", "--logging-format=text"]);
        assert_eq!(args.verbosity, 2);
        assert_eq!(args.logging_format, Some(LogFormat::Text));
        // --log-json and the file agree; the flag alone decides either way.
        let args = parse(&["--log-json"]);
        assert!(args.log_json);
        assert_eq!(args.logging_format, None);
    }
}

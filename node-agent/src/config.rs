//! kube-proxy style settings (`--cluster-cidr`, `--detect-local-mode`,
//! `--nodeport-addresses`, …) + this node → the [`RenderConfig`] of one IP
//! family. Shared by `render` and `run`, so both build the same rules. Also
//! how kube-proxy's flag and file values read: Go durations and booleans,
//! the proxy mode, the log format and klog's verbosity.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::addr::{Cidr, IpFamily, parse_cidr};
use crate::model::NodeInfo;
use crate::rules::{Accounting, LocalTraffic, NodePortAddresses, RenderConfig};

/// `--detect-local-mode`, with kube-proxy's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectLocalMode {
    #[default]
    ClusterCidr,
    NodeCidr,
    BridgeInterface,
    InterfaceNamePrefix,
    None,
}

impl FromStr for DetectLocalMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "ClusterCIDR" | "" => Ok(DetectLocalMode::ClusterCidr),
            "NodeCIDR" => Ok(DetectLocalMode::NodeCidr),
            "BridgeInterface" => Ok(DetectLocalMode::BridgeInterface),
            "InterfaceNamePrefix" => Ok(DetectLocalMode::InterfaceNamePrefix),
            "None" => Ok(DetectLocalMode::None),
            other => Err(format!(
                "{other:?} is not one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix, None"
            )),
        }
    }
}

impl fmt::Display for DetectLocalMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DetectLocalMode::ClusterCidr => "ClusterCIDR",
            DetectLocalMode::NodeCidr => "NodeCIDR",
            DetectLocalMode::BridgeInterface => "BridgeInterface",
            DetectLocalMode::InterfaceNamePrefix => "InterfaceNamePrefix",
            DetectLocalMode::None => "None",
        })
    }
}

/// The data-path flags, as typed values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyOptions {
    /// `--cluster-cidr`: at most one per family.
    pub cluster_cidrs: Vec<String>,
    pub detect_local_mode: DetectLocalMode,
    pub pod_bridge_interface: Option<String>,
    pub pod_interface_name_prefix: Option<String>,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    /// `--nodeport-addresses`: CIDRs, or `primary` for the node's InternalIPs.
    pub nodeport_addresses: Vec<String>,
    pub localhost_nodeports: bool,
    pub random_fully: bool,
    /// `--node-ip`: addresses of this node in addition to its InternalIPs.
    pub node_ips: Vec<IpAddr>,
    /// kube-proxy's `--bind-address` (a specific address): this node's IP of
    /// its family, in place of the Node's InternalIPs of that family.
    pub primary_ip: Option<IpAddr>,
    pub conntrack_tcp_be_liberal: bool,
    /// The nfacct counters that exist, for the rules to count into.
    pub accounting: Accounting,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            cluster_cidrs: Vec::new(),
            detect_local_mode: DetectLocalMode::ClusterCidr,
            pod_bridge_interface: None,
            pod_interface_name_prefix: None,
            masquerade_all: false,
            masquerade_bit: 14,
            nodeport_addresses: Vec::new(),
            localhost_nodeports: true,
            random_fully: true,
            node_ips: Vec::new(),
            primary_ip: None,
            conntrack_tcp_be_liberal: false,
            accounting: Accounting::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--cluster-cidr: {0:?} is not a CIDR")]
    BadClusterCidr(String),
    #[error("--cluster-cidr: more than one {0} CIDR ({1} and {2}); give at most one per family")]
    TwoClusterCidrs(IpFamily, Cidr, Cidr),
    #[error("--nodeport-addresses: {0:?} is neither a CIDR nor \"primary\"")]
    BadNodePortAddress(String),
    #[error("--masquerade-bit: {0} is not in 0..=31")]
    BadMasqueradeBit(u8),
    #[error("--detect-local-mode NodeCIDR: node {node} has no podCIDR yet")]
    NoPodCidr { node: String },
    #[error("--detect-local-mode BridgeInterface needs --pod-bridge-interface")]
    NoBridgeInterface,
    #[error("--detect-local-mode InterfaceNamePrefix needs --pod-interface-name-prefix")]
    NoInterfacePrefix,
}

impl ConfigError {
    /// A bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::BadClusterCidr(_) | ConfigError::TwoClusterCidrs(..) => "cluster_cidr",
            ConfigError::BadNodePortAddress(_) => "nodeport_addresses",
            ConfigError::BadMasqueradeBit(_) => "masquerade_bit",
            ConfigError::NoPodCidr { .. } => "no_pod_cidr",
            ConfigError::NoBridgeInterface | ConfigError::NoInterfacePrefix => "detect_local_mode",
        }
    }
}

impl ProxyOptions {
    /// The render configuration for `family` on `node`.
    pub fn render_config(
        &self,
        family: IpFamily,
        node: &NodeInfo,
    ) -> Result<RenderConfig, ConfigError> {
        if self.masquerade_bit > 31 {
            return Err(ConfigError::BadMasqueradeBit(self.masquerade_bit));
        }
        let node_ips: Vec<IpAddr> = {
            // As kube-proxy's node IP: a bind address replaces the Node's
            // InternalIPs of its family (`--node-ip` still adds).
            let primary = self.primary_ip.filter(|ip| IpFamily::of(ip) == family);
            let internal = node.internal_ips.iter().filter(|_| primary.is_none());
            let mut ips: Vec<IpAddr> = Vec::new();
            for ip in primary.iter().chain(&self.node_ips).chain(internal) {
                if IpFamily::of(ip) == family && !ips.contains(ip) {
                    ips.push(*ip);
                }
            }
            ips
        };
        let local_traffic = match self.detect_local_mode {
            DetectLocalMode::ClusterCidr => {
                let mut found: Option<Cidr> = None;
                for text in &self.cluster_cidrs {
                    let cidr = parse_cidr(text)
                        .ok_or_else(|| ConfigError::BadClusterCidr(text.clone()))?;
                    if cidr.family() != family {
                        continue;
                    }
                    if let Some(first) = found {
                        return Err(ConfigError::TwoClusterCidrs(family, first, cidr));
                    }
                    found = Some(cidr);
                }
                // kube-proxy, too, runs without detection when no CIDR is given.
                found.map_or(LocalTraffic::None, LocalTraffic::Cidr)
            }
            DetectLocalMode::NodeCidr => {
                match node.pod_cidrs.iter().find(|c| c.family() == family) {
                    Some(cidr) => LocalTraffic::Cidr(*cidr),
                    // As kube-proxy: it waits for the node's first podCIDR,
                    // then proxies a family without one with no detection.
                    None if !node.pod_cidrs.is_empty() => LocalTraffic::None,
                    None => {
                        return Err(ConfigError::NoPodCidr {
                            node: node.name.clone(),
                        });
                    }
                }
            }
            DetectLocalMode::BridgeInterface => LocalTraffic::Bridge(
                self.pod_bridge_interface
                    .clone()
                    .filter(|s| !s.is_empty())
                    .ok_or(ConfigError::NoBridgeInterface)?,
            ),
            DetectLocalMode::InterfaceNamePrefix => LocalTraffic::InterfacePrefix(
                self.pod_interface_name_prefix
                    .clone()
                    .filter(|s| !s.is_empty())
                    .ok_or(ConfigError::NoInterfacePrefix)?,
            ),
            DetectLocalMode::None => LocalTraffic::None,
        };
        let nodeport_addresses = if self.nodeport_addresses.is_empty() {
            NodePortAddresses::All
        } else {
            let mut cidrs = Vec::new();
            for entry in &self.nodeport_addresses {
                if entry.trim() == "primary" {
                    cidrs.extend(node_ips.iter().map(|ip| Cidr::host(*ip)));
                    continue;
                }
                let cidr = parse_cidr(entry)
                    .ok_or_else(|| ConfigError::BadNodePortAddress(entry.clone()))?;
                if cidr.family() == family {
                    cidrs.push(cidr);
                }
            }
            NodePortAddresses::Cidrs(cidrs)
        };
        Ok(RenderConfig {
            family,
            masquerade_bit: self.masquerade_bit,
            masquerade_all: self.masquerade_all,
            random_fully: self.random_fully,
            local_traffic,
            nodeport_addresses,
            localhost_nodeports: self.localhost_nodeports && family == IpFamily::V4,
            node_ips,
            conntrack_tcp_be_liberal: self.conntrack_tcp_be_liberal,
            accounting: self.accounting,
        })
    }
}

/// How `run` writes its log: kube-proxy's `--logging-format` (and the
/// configuration file's `logging.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// As the configuration file writes it.
    pub fn parse(text: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(text.trim(), false)
            .map_err(|_| format!("{:?} is not text or json", text.trim()))
    }

    /// As the configuration file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The log filter (`RUST_LOG` syntax) that kube-proxy's klog verbosity
/// (`-v`, `logging.verbosity`) stands for. klog logs routine messages at 0–2,
/// debugging detail at 4, and from 6 the API requests it makes; the agent's
/// own debug lines come at 4, every library's (the kube client's requests
/// among them) at 6, and trace at 8.
pub fn log_filter(verbosity: u32) -> &'static str {
    match verbosity {
        0..=3 => "info",
        4..=5 => "info,causeway_agent=debug,causeway_telemetry=debug",
        6..=7 => "debug",
        _ => "trace",
    }
}

/// A boolean flag's value as Go's flag package reads it (`strconv.ParseBool`),
/// so `--masquerade-all=1` means what it means to kube-proxy.
pub fn parse_go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

/// kube-proxy's `--proxy-mode` and `mode`, checked: the agent is its iptables
/// mode, so only that (or kube-proxy's "unset", empty) is accepted.
pub fn check_proxy_mode(text: &str) -> Result<String, String> {
    match text.trim() {
        "" | "iptables" => Ok("iptables".to_string()),
        other => Err(format!(
            "{other:?}: causeway-agent is kube-proxy's iptables mode; \
             use \"iptables\" or leave it empty"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klog_verbosity_maps_to_log_levels() {
        // kube-proxy DaemonSets run with --v=2 (EKS): the agent's usual log.
        for v in [0, 2, 3] {
            assert_eq!(log_filter(v), "info");
        }
        assert_eq!(
            log_filter(4),
            "info,causeway_agent=debug,causeway_telemetry=debug"
        );
        assert_eq!(log_filter(6), "debug");
        assert_eq!(log_filter(10), "trace");
        for v in 0..12 {
            assert!(tracing_subscriber::EnvFilter::try_new(log_filter(v)).is_ok());
        }
    }

    #[test]
    fn only_the_iptables_proxy_mode_is_accepted() {
        assert_eq!(check_proxy_mode("iptables").as_deref(), Ok("iptables"));
        assert_eq!(check_proxy_mode("").as_deref(), Ok("iptables"));
        for other in ["ipvs", "nftables", "kernelspace", "userspace"] {
            let error = check_proxy_mode(other).unwrap_err();
            assert!(
                error.starts_with(&format!(
                    "{other:?}: causeway-agent is kube-proxy's iptables mode"
                )),
                "{error}"
            );
        }
    }

    #[test]
    fn booleans_read_as_go_reads_them() {
        for yes in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_go_bool(yes), Ok(true), "{yes}");
        }
        for no in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_go_bool(no), Ok(false), "{no}");
        }
        assert_eq!(
            parse_go_bool("yes"),
            Err("\"yes\" is not true or false".to_string())
        );
    }

    #[test]
    fn log_formats_read_as_the_file_writes_them() {
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse(" text "), Ok(LogFormat::Text));
        assert_eq!(
            LogFormat::parse("xml"),
            Err("\"xml\" is not text or json".to_string())
        );
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            zone: None,
            internal_ips: vec!["192.168.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            pod_cidrs: vec![parse_cidr("10.244.1.0/24").unwrap()],
        }
    }

    #[test]
    fn cluster_cidr_detection_picks_the_family() {
        let options = ProxyOptions {
            cluster_cidrs: vec!["10.244.0.0/16".into(), "fd00:244::/48".into()],
            ..ProxyOptions::default()
        };
        let v4 = options.render_config(IpFamily::V4, &node()).unwrap();
        assert_eq!(
            v4.local_traffic,
            LocalTraffic::Cidr(parse_cidr("10.244.0.0/16").unwrap())
        );
        assert_eq!(v4.node_ips, ["192.168.0.10".parse::<IpAddr>().unwrap()]);
        assert!(v4.localhost_nodeports);
        let v6 = options.render_config(IpFamily::V6, &node()).unwrap();
        assert_eq!(
            v6.local_traffic,
            LocalTraffic::Cidr(parse_cidr("fd00:244::/48").unwrap())
        );
        assert!(!v6.localhost_nodeports);
        let none = ProxyOptions::default()
            .render_config(IpFamily::V4, &node())
            .unwrap();
        assert_eq!(none.local_traffic, LocalTraffic::None);
    }

    #[test]
    fn detection_modes_need_their_inputs() {
        let mode = |detect_local_mode| ProxyOptions {
            detect_local_mode,
            ..ProxyOptions::default()
        };
        assert_eq!(
            mode(DetectLocalMode::NodeCidr)
                .render_config(IpFamily::V4, &node())
                .unwrap()
                .local_traffic,
            LocalTraffic::Cidr(parse_cidr("10.244.1.0/24").unwrap())
        );
        // A family the node has no podCIDR for goes without detection, as
        // with kube-proxy; a node with none at all is waited for.
        assert_eq!(
            mode(DetectLocalMode::NodeCidr)
                .render_config(IpFamily::V6, &node())
                .unwrap()
                .local_traffic,
            LocalTraffic::None
        );
        let unallocated = NodeInfo {
            pod_cidrs: Vec::new(),
            ..node()
        };
        assert_eq!(
            mode(DetectLocalMode::NodeCidr)
                .render_config(IpFamily::V4, &unallocated)
                .unwrap_err()
                .kind(),
            "no_pod_cidr"
        );
        assert_eq!(
            mode(DetectLocalMode::BridgeInterface).render_config(IpFamily::V4, &node()),
            Err(ConfigError::NoBridgeInterface)
        );
        let bridge = ProxyOptions {
            pod_bridge_interface: Some("cbr0".into()),
            ..mode(DetectLocalMode::BridgeInterface)
        };
        assert_eq!(
            bridge
                .render_config(IpFamily::V4, &node())
                .unwrap()
                .local_traffic,
            LocalTraffic::Bridge("cbr0".into())
        );
        let two = ProxyOptions {
            cluster_cidrs: vec!["10.0.0.0/8".into(), "172.16.0.0/12".into()],
            ..ProxyOptions::default()
        };
        assert_eq!(
            two.render_config(IpFamily::V4, &node()).unwrap_err().kind(),
            "cluster_cidr"
        );
        assert!(
            "Bogus"
                .parse::<DetectLocalMode>()
                .unwrap_err()
                .contains("ClusterCIDR")
        );
    }

    #[test]
    fn nodeport_addresses_resolve_primary_and_filter_family() {
        let options = ProxyOptions {
            nodeport_addresses: vec!["primary".into(), "10.0.0.0/8".into(), "fd00::/8".into()],
            ..ProxyOptions::default()
        };
        let v4 = options.render_config(IpFamily::V4, &node()).unwrap();
        assert_eq!(
            v4.nodeport_addresses,
            NodePortAddresses::Cidrs(vec![
                parse_cidr("192.168.0.10/32").unwrap(),
                parse_cidr("10.0.0.0/8").unwrap()
            ])
        );
        assert!(
            !v4.localhost_nodeports_effective(),
            "loopback not in the addresses"
        );
        let all = ProxyOptions::default()
            .render_config(IpFamily::V4, &node())
            .unwrap();
        assert!(all.localhost_nodeports_effective());
        let bad = ProxyOptions {
            nodeport_addresses: vec!["eth0".into()],
            ..ProxyOptions::default()
        };
        assert_eq!(
            bad.render_config(IpFamily::V4, &node()).unwrap_err().kind(),
            "nodeport_addresses"
        );
    }

    #[test]
    fn a_bind_address_is_the_node_ip_of_its_family() {
        let options = ProxyOptions {
            nodeport_addresses: vec!["primary".into()],
            primary_ip: Some("192.168.7.7".parse().unwrap()),
            node_ips: vec!["192.168.9.9".parse().unwrap()],
            ..ProxyOptions::default()
        };
        let v4 = options.render_config(IpFamily::V4, &node()).unwrap();
        // The Node's InternalIP 192.168.0.10 is replaced; --node-ip adds.
        assert_eq!(
            v4.node_ips,
            [
                "192.168.7.7".parse::<IpAddr>().unwrap(),
                "192.168.9.9".parse().unwrap()
            ]
        );
        assert_eq!(
            v4.nodeport_addresses,
            NodePortAddresses::Cidrs(vec![
                parse_cidr("192.168.7.7/32").unwrap(),
                parse_cidr("192.168.9.9/32").unwrap()
            ])
        );
        // The other family keeps the Node's addresses.
        let v6_bind = ProxyOptions {
            primary_ip: Some("fd00::7".parse().unwrap()),
            ..ProxyOptions::default()
        };
        let v4 = v6_bind.render_config(IpFamily::V4, &node()).unwrap();
        assert_eq!(v4.node_ips, ["192.168.0.10".parse::<IpAddr>().unwrap()]);
    }
}

//! kube-proxy's configuration file (`--config`): a `KubeProxyConfiguration`
//! (`kubeproxy.config.k8s.io/v1alpha1`), as kubeadm and EKS keep it in the
//! `kube-proxy` ConfigMap, read into the agent's settings so that a kube-proxy
//! DaemonSet's configuration drives the agent unchanged.
//!
//! Decoding is lenient, as kube-proxy's is when its strict decoding fails:
//! files of long-lived clusters still carry fields the API has since dropped.
//! Unknown fields are reported back by path, and so are fields the agent has
//! no use for (IPVS, Windows, client rate limits, …), so the caller can name
//! them. A value of the wrong type, or a mode other than iptables, is an error
//! that names the field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml::Value;

use crate::config::{DetectLocalMode, LogFormat, check_proxy_mode};
use causeway_telemetry::duration::parse_duration;

const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";

/// What a configuration file sets, in the agent's terms; `None` is "not set"
/// (kube-proxy's zero values: `""`, `null`, `0s`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FileSettings {
    pub node_name: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub cluster_cidrs: Option<Vec<String>>,
    pub detect_local_mode: Option<DetectLocalMode>,
    pub pod_bridge_interface: Option<String>,
    pub pod_interface_name_prefix: Option<String>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<u8>,
    pub nodeport_addresses: Option<Vec<String>>,
    pub localhost_nodeports: Option<bool>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    /// `logging.verbosity`: klog's `-v`.
    pub verbosity: Option<u32>,
    /// `logging.format`.
    pub log_format: Option<LogFormat>,
    /// `conntrack.tcpBeLiberal`.
    pub conntrack_tcp_be_liberal: Option<bool>,
    /// `conntrack.maxPerCore` and `conntrack.min`; `null` is the default,
    /// and a `maxPerCore` of 0 leaves the table size alone.
    pub conntrack_max_per_core: Option<u32>,
    pub conntrack_min: Option<u32>,
    /// `conntrack.tcpEstablishedTimeout` and `conntrack.tcpCloseWaitTimeout`:
    /// unlike the other durations, `0s` here is not the default (that is
    /// `null`) but "leave it as the node has it", as in kube-proxy.
    pub conntrack_tcp_established_timeout: Option<Duration>,
    pub conntrack_tcp_close_wait_timeout: Option<Duration>,
    /// `conntrack.udpTimeout` and `conntrack.udpStreamTimeout`; kube-proxy's
    /// default, and `0s`, leave them.
    pub conntrack_udp_timeout: Option<Duration>,
    pub conntrack_udp_stream_timeout: Option<Duration>,
    /// `oomScoreAdj`.
    pub oom_score_adj: Option<i32>,
    /// `bindAddress`. One address (not 0.0.0.0 or ::) is the node's IP of
    /// its family to kube-proxy; an IPv6 one (:: included) moves the servers'
    /// defaults to IPv6.
    pub bind_address: Option<std::net::IpAddr>,
    /// Fields set in the file that the agent does not use, by path
    /// (`ipvs.scheduler`, `clientConnection.qps`).
    pub ignored: Vec<String>,
    /// Fields kube-proxy's v1alpha1 does not have (misspelt, or dropped
    /// from the API), by path (`iptables.syncPeriode`).
    pub unknown: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Reads and checks the file at `path`; returns its text too, which
/// [`changed`] compares with.
pub fn load(path: &Path) -> Result<(FileSettings, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let settings = parse(&text).map_err(|message| ConfigError::Invalid {
        path: path.display().to_string(),
        message,
    })?;
    Ok((settings, text))
}

/// Resolves once the file at `path` no longer holds `read` (changed, or
/// gone), checking every `every`. kube-proxy exits then, so that its
/// DaemonSet restarts it with the new file; the agent does the same. The
/// text is compared, not the modification time: a ConfigMap volume swaps a
/// symlink.
pub async fn changed(path: &Path, read: &str, every: std::time::Duration) -> String {
    loop {
        tokio::time::sleep(every).await;
        match std::fs::read_to_string(path) {
            Ok(now) if now == read => continue,
            Ok(_) => return format!("{} changed", path.display()),
            Err(e) => return format!("{} can no longer be read: {e}", path.display()),
        }
    }
}

/// `settings` as a KubeProxyConfiguration file, for kube-proxy's
/// `--write-config-to`: [`parse`] reads it back as the same settings, and
/// kube-proxy reads it as it would its own. Unset fields are left out.
pub fn write(settings: &FileSettings) -> String {
    use serde_yaml::Mapping;
    fn put(map: &mut Mapping, key: &str, value: Option<Value>) {
        if let Some(value) = value {
            map.insert(Value::from(key), value);
        }
    }
    fn section(parent: &mut Mapping, key: &str, section: Mapping) {
        if !section.is_empty() {
            parent.insert(Value::from(key), Value::Mapping(section));
        }
    }
    let text = |value: &Option<String>| value.clone().map(Value::from);
    let duration = |value: Option<Duration>| value.map(|d| Value::from(go_duration(d)));
    let f = settings;
    let mut root = Mapping::new();
    put(&mut root, "apiVersion", Some(API_VERSION.into()));
    put(&mut root, "kind", Some("KubeProxyConfiguration".into()));
    put(&mut root, "mode", Some("iptables".into()));
    put(&mut root, "hostnameOverride", text(&f.node_name));
    put(
        &mut root,
        "bindAddress",
        f.bind_address.map(|ip| ip.to_string().into()),
    );
    let mut client = Mapping::new();
    put(
        &mut client,
        "kubeconfig",
        f.kubeconfig
            .as_ref()
            .map(|p| p.display().to_string().into()),
    );
    section(&mut root, "clientConnection", client);
    put(
        &mut root,
        "clusterCIDR",
        f.cluster_cidrs.as_ref().map(|c| c.join(",").into()),
    );
    put(
        &mut root,
        "detectLocalMode",
        f.detect_local_mode.map(|m| m.to_string().into()),
    );
    let mut detect_local = Mapping::new();
    put(
        &mut detect_local,
        "bridgeInterface",
        text(&f.pod_bridge_interface),
    );
    put(
        &mut detect_local,
        "interfaceNamePrefix",
        text(&f.pod_interface_name_prefix),
    );
    section(&mut root, "detectLocal", detect_local);
    put(
        &mut root,
        "healthzBindAddress",
        text(&f.healthz_bind_address),
    );
    put(
        &mut root,
        "metricsBindAddress",
        text(&f.metrics_bind_address),
    );
    put(
        &mut root,
        "nodePortAddresses",
        f.nodeport_addresses
            .as_ref()
            .map(|a| Value::Sequence(a.iter().map(|s| Value::from(s.as_str())).collect())),
    );
    let mut iptables = Mapping::new();
    put(
        &mut iptables,
        "masqueradeAll",
        f.masquerade_all.map(Value::from),
    );
    put(
        &mut iptables,
        "masqueradeBit",
        f.masquerade_bit.map(Value::from),
    );
    put(
        &mut iptables,
        "localhostNodePorts",
        f.localhost_nodeports.map(Value::from),
    );
    put(&mut iptables, "syncPeriod", duration(f.sync_period));
    put(&mut iptables, "minSyncPeriod", duration(f.min_sync_period));
    section(&mut root, "iptables", iptables);
    let mut conntrack = Mapping::new();
    put(
        &mut conntrack,
        "maxPerCore",
        f.conntrack_max_per_core.map(Value::from),
    );
    put(&mut conntrack, "min", f.conntrack_min.map(Value::from));
    put(
        &mut conntrack,
        "tcpBeLiberal",
        f.conntrack_tcp_be_liberal.map(Value::from),
    );
    put(
        &mut conntrack,
        "tcpEstablishedTimeout",
        duration(f.conntrack_tcp_established_timeout),
    );
    put(
        &mut conntrack,
        "tcpCloseWaitTimeout",
        duration(f.conntrack_tcp_close_wait_timeout),
    );
    put(
        &mut conntrack,
        "udpTimeout",
        duration(f.conntrack_udp_timeout),
    );
    put(
        &mut conntrack,
        "udpStreamTimeout",
        duration(f.conntrack_udp_stream_timeout),
    );
    section(&mut root, "conntrack", conntrack);
    let mut logging = Mapping::new();
    put(
        &mut logging,
        "format",
        f.log_format.map(|format| Value::from(format.as_str())),
    );
    put(&mut logging, "verbosity", f.verbosity.map(Value::from));
    section(&mut root, "logging", logging);
    put(&mut root, "oomScoreAdj", f.oom_score_adj.map(Value::from));
    serde_yaml::to_string(&Value::Mapping(root)).expect("a mapping of plain values")
}

/// What kube-proxy serves on `/configz`: its configuration under the API
/// group's name, in the shape of its internal type, whose fields have no JSON
/// tags (so `IPTables.MasqueradeBit`, not `iptables.masqueradeBit`; only
/// `Logging`, a versioned type, keeps lower-case keys). Only the settings the
/// agent goes by are shown; kube-proxy's others (`IPVS`, `ClientConnection.QPS`,
/// …) would show values nothing here uses.
pub fn configz(settings: &FileSettings) -> String {
    let f = settings;
    let duration = |value: Option<Duration>| go_duration(value.unwrap_or_default());
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    let configuration = serde_json::json!({
        "Linux": {
            "Conntrack": {
                "MaxPerCore": f.conntrack_max_per_core,
                "Min": f.conntrack_min,
                "TCPEstablishedTimeout": f.conntrack_tcp_established_timeout.map(go_duration),
                "TCPCloseWaitTimeout": f.conntrack_tcp_close_wait_timeout.map(go_duration),
                "TCPBeLiberal": f.conntrack_tcp_be_liberal.unwrap_or_default(),
                "UDPTimeout": duration(f.conntrack_udp_timeout),
                "UDPStreamTimeout": duration(f.conntrack_udp_stream_timeout),
            },
            "MasqueradeAll": f.masquerade_all.unwrap_or_default(),
            "OOMScoreAdj": f.oom_score_adj,
        },
        "ClientConnection": {
            "Kubeconfig": f.kubeconfig.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        },
        "Logging": {
            "format": f.log_format.unwrap_or(LogFormat::Text).as_str(),
            "verbosity": f.verbosity.unwrap_or_default(),
        },
        "HostnameOverride": text(&f.node_name),
        "BindAddress": f.bind_address.map_or_else(|| "0.0.0.0".to_string(), |ip| ip.to_string()),
        "HealthzBindAddress": text(&f.healthz_bind_address),
        "MetricsBindAddress": text(&f.metrics_bind_address),
        "Mode": "iptables",
        "IPTables": {
            "MasqueradeBit": f.masquerade_bit,
            "LocalhostNodePorts": f.localhost_nodeports,
        },
        "DetectLocalMode": f.detect_local_mode.map(|m| m.to_string()).unwrap_or_default(),
        "DetectLocal": {
            "BridgeInterface": text(&f.pod_bridge_interface),
            "ClusterCIDRs": f.cluster_cidrs.clone().unwrap_or_default(),
            "InterfaceNamePrefix": text(&f.pod_interface_name_prefix),
        },
        "NodePortAddresses": f.nodeport_addresses,
        "SyncPeriod": duration(f.sync_period),
        "MinSyncPeriod": duration(f.min_sync_period),
    });
    serde_json::json!({ "kubeproxy.config.k8s.io": configuration }).to_string()
}

/// A duration as Go prints one (`24h0m0s`, `1m30s`, `45s`, `1.5s`, `500ms`),
/// which is how kube-proxy writes its file.
pub fn go_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".into();
    }
    let nanos = duration.subsec_nanos();
    let secs = duration.as_secs();
    if secs == 0 {
        return if nanos.is_multiple_of(1_000_000) {
            format!("{}ms", nanos / 1_000_000)
        } else if nanos.is_multiple_of(1_000) {
            format!("{}µs", nanos / 1_000)
        } else {
            format!("{nanos}ns")
        };
    }
    let seconds = if nanos == 0 {
        format!("{}s", secs % 60)
    } else {
        let fraction = format!("{nanos:09}");
        format!("{}.{}s", secs % 60, fraction.trim_end_matches('0'))
    };
    match (secs / 3600, secs / 60 % 60) {
        (0, 0) => seconds,
        (0, minutes) => format!("{minutes}m{seconds}"),
        (hours, minutes) => format!("{hours}h{minutes}m{seconds}"),
    }
}

/// The file's text into settings; the error names the field.
pub fn parse(text: &str) -> Result<FileSettings, String> {
    // YAML merge keys (`<<: *defaults`) are applied to a parsed value, then
    // written back as text: the text decoder reads scalars as kube-proxy's
    // does and names lines in its errors (of the merged text, then).
    let merged;
    let text = if text.contains("<<") {
        let mut value: Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        value.apply_merge().map_err(|e| e.to_string())?;
        merged = serde_yaml::to_string(&value).map_err(|e| e.to_string())?;
        merged.as_str()
    } else {
        text
    };
    let (file, unknown) = decode(serde_yaml::Deserializer::from_str(text))?;
    let mut settings = file.settings()?;
    settings.unknown = unknown;
    Ok(settings)
}

/// The file, and the paths of the fields it has that v1alpha1 does not.
fn decode<'de, D>(from: D) -> Result<(KubeProxyConfiguration, Vec<String>), String>
where
    D: serde::Deserializer<'de>,
    D::Error: std::fmt::Display,
{
    let mut unknown = Vec::new();
    let file = serde_ignored::deserialize(from, |path| unknown.push(field_path(&path)))
        .map_err(|e| e.to_string())?;
    Ok((file, unknown))
}

/// `iptables.syncPeriode`, as a user writes it: serde_ignored also shows the
/// `Option`s and newtypes the field sits in.
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            parent if parent.is_empty() => key.to_string(),
            parent => format!("{parent}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => field_path(parent),
    }
}

// The shape of v1alpha1 as of Kubernetes 1.34.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KubeProxyConfiguration {
    api_version: String,
    kind: String,
    #[serde(default)]
    hostname_override: Option<String>,
    #[serde(default)]
    client_connection: Option<ClientConnection>,
    #[serde(default, rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    #[serde(default)]
    detect_local_mode: Option<String>,
    #[serde(default)]
    detect_local: Option<DetectLocal>,
    #[serde(default)]
    healthz_bind_address: Option<String>,
    #[serde(default)]
    metrics_bind_address: Option<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    node_port_addresses: Option<Vec<String>>,
    #[serde(default)]
    iptables: Option<Iptables>,
    // Known to kube-proxy, of no use to the agent.
    #[serde(default)]
    feature_gates: Option<Value>,
    #[serde(default)]
    bind_address: Option<String>,
    #[serde(default)]
    bind_address_hard_fail: Option<Value>,
    #[serde(default)]
    enable_profiling: Option<Value>,
    #[serde(default)]
    show_hidden_metrics_for_version: Option<Value>,
    #[serde(default)]
    ipvs: Option<Value>,
    #[serde(default)]
    nftables: Option<Value>,
    #[serde(default)]
    winkernel: Option<Value>,
    #[serde(default)]
    windows_run_as_service: Option<Value>,
    #[serde(default)]
    conntrack: Option<Conntrack>,
    #[serde(default)]
    oom_score_adj: Option<i32>,
    #[serde(default)]
    config_sync_period: Option<Value>,
    #[serde(default)]
    port_range: Option<Value>,
    #[serde(default)]
    logging: Option<Logging>,
}

/// The conntrack sysctls kube-proxy sets at start.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conntrack {
    #[serde(default)]
    tcp_be_liberal: Option<bool>,
    #[serde(default)]
    max_per_core: Option<i64>,
    #[serde(default)]
    min: Option<i64>,
    #[serde(default)]
    tcp_established_timeout: Option<String>,
    #[serde(default)]
    tcp_close_wait_timeout: Option<String>,
    #[serde(default)]
    udp_timeout: Option<String>,
    #[serde(default)]
    udp_stream_timeout: Option<String>,
}

/// [`Conntrack`]'s sizes and timeouts, checked.
#[derive(Debug, Default)]
struct ConntrackTuning {
    max_per_core: Option<u32>,
    min: Option<u32>,
    tcp_established_timeout: Option<Duration>,
    tcp_close_wait_timeout: Option<Duration>,
    udp_timeout: Option<Duration>,
    udp_stream_timeout: Option<Duration>,
}

impl Conntrack {
    /// The sizes and timeouts, checked as kube-proxy's validation does.
    fn tuning(&self) -> Result<ConntrackTuning, String> {
        let count = |field: &str, value: Option<i64>| -> Result<Option<u32>, String> {
            match value {
                None => Ok(None),
                // int32 in kube-proxy.
                Some(n @ 0..=0x7fff_ffff) => Ok(Some(n as u32)),
                Some(n) => Err(format!("{field}: {n} is not between 0 and {}", i32::MAX)),
            }
        };
        // `null` is the default; `0s` is "leave it".
        let timeout = |field: &str, value: &Option<String>| -> Result<Option<Duration>, String> {
            match non_empty(value.clone()) {
                None => Ok(None),
                Some(text) => parse_duration(&text)
                    .map(Some)
                    .map_err(|e| format!("{field}: {e}")),
            }
        };
        Ok(ConntrackTuning {
            max_per_core: count("conntrack.maxPerCore", self.max_per_core)?,
            min: count("conntrack.min", self.min)?,
            tcp_established_timeout: timeout(
                "conntrack.tcpEstablishedTimeout",
                &self.tcp_established_timeout,
            )?,
            tcp_close_wait_timeout: timeout(
                "conntrack.tcpCloseWaitTimeout",
                &self.tcp_close_wait_timeout,
            )?,
            udp_timeout: duration("conntrack.udpTimeout", self.udp_timeout.clone())?,
            udp_stream_timeout: duration(
                "conntrack.udpStreamTimeout",
                self.udp_stream_timeout.clone(),
            )?,
        })
    }
}

/// component-base's `LoggingConfiguration`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Logging {
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    verbosity: Option<u32>,
    #[serde(default)]
    flush_frequency: Option<Value>,
    #[serde(default)]
    vmodule: Option<Value>,
    #[serde(default)]
    options: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientConnection {
    #[serde(default)]
    kubeconfig: Option<String>,
    #[serde(default)]
    accept_content_types: Option<Value>,
    #[serde(default)]
    content_type: Option<Value>,
    #[serde(default)]
    qps: Option<Value>,
    #[serde(default)]
    burst: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DetectLocal {
    #[serde(default)]
    bridge_interface: Option<String>,
    #[serde(default)]
    interface_name_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Iptables {
    #[serde(default)]
    masquerade_all: Option<bool>,
    #[serde(default)]
    masquerade_bit: Option<i64>,
    #[serde(default)]
    localhost_node_ports: Option<bool>,
    #[serde(default)]
    sync_period: Option<String>,
    #[serde(default)]
    min_sync_period: Option<String>,
}

/// `None` for kube-proxy's "unset" string.
fn non_empty(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A Go duration (`30s`, `1m0s`); `0s` means "the default".
fn duration(field: &str, value: Option<String>) -> Result<Option<Duration>, String> {
    let Some(text) = non_empty(value) else {
        return Ok(None);
    };
    let parsed = parse_duration(&text).map_err(|e| format!("{field}: {e}"))?;
    Ok((!parsed.is_zero()).then_some(parsed))
}

/// Whether a value says anything: not null, `""`, `0`, `"0"`, `0s`, `false`,
/// or a map or list of only such values (kubeadm writes every field).
fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !matches!(s.trim(), "" | "0" | "0s"),
        Value::Sequence(items) => items.iter().any(is_set),
        Value::Mapping(map) => map.values().any(is_set),
        Value::Tagged(tagged) => is_set(&tagged.value),
    }
}

impl KubeProxyConfiguration {
    fn settings(self) -> Result<FileSettings, String> {
        if self.api_version != API_VERSION {
            return Err(format!(
                "apiVersion: {:?} is not {API_VERSION}, the version kube-proxy reads",
                self.api_version
            ));
        }
        if self.kind != "KubeProxyConfiguration" {
            return Err(format!(
                "kind: {:?} is not KubeProxyConfiguration",
                self.kind
            ));
        }
        if let Some(mode) = non_empty(self.mode) {
            check_proxy_mode(&mode).map_err(|e| format!("mode: {e}"))?;
        }
        let mut ignored = Vec::new();
        let mut note = |name: &str, value: &Option<Value>| {
            if value.as_ref().is_some_and(is_set) {
                ignored.push(name.to_string());
            }
        };
        note("featureGates", &self.feature_gates);
        note("bindAddressHardFail", &self.bind_address_hard_fail);
        note("enableProfiling", &self.enable_profiling);
        note(
            "showHiddenMetricsForVersion",
            &self.show_hidden_metrics_for_version,
        );
        note("ipvs", &self.ipvs);
        note("nftables", &self.nftables);
        note("winkernel", &self.winkernel);
        note("windowsRunAsService", &self.windows_run_as_service);
        let tuning = match &self.conntrack {
            Some(conntrack) => conntrack.tuning()?,
            None => ConntrackTuning::default(),
        };
        note("configSyncPeriod", &self.config_sync_period);
        note("portRange", &self.port_range);
        let (verbosity, log_format) = match &self.logging {
            Some(logging) => {
                note("logging.flushFrequency", &logging.flush_frequency);
                note("logging.vmodule", &logging.vmodule);
                note("logging.options", &logging.options);
                let format = match non_empty(logging.format.clone()) {
                    Some(format) => Some(
                        LogFormat::parse(&format).map_err(|e| format!("logging.format: {e}"))?,
                    ),
                    None => None,
                };
                (logging.verbosity.filter(|v| *v > 0), format)
            }
            None => (None, None),
        };
        if let Some(client) = &self.client_connection {
            note(
                "clientConnection.acceptContentTypes",
                &client.accept_content_types,
            );
            note("clientConnection.contentType", &client.content_type);
            note("clientConnection.qps", &client.qps);
            note("clientConnection.burst", &client.burst);
        }

        let iptables = self.iptables.unwrap_or(Iptables {
            masquerade_all: None,
            masquerade_bit: None,
            localhost_node_ports: None,
            sync_period: None,
            min_sync_period: None,
        });
        let masquerade_bit = match iptables.masquerade_bit {
            None => None,
            Some(bit @ 0..=31) => Some(bit as u8),
            Some(bit) => {
                return Err(format!(
                    "iptables.masqueradeBit: {bit} is not a bit of the mark (0 to 31)"
                ));
            }
        };
        let detect_local_mode = match non_empty(self.detect_local_mode) {
            None => None,
            Some(mode) => Some(
                mode.parse::<DetectLocalMode>()
                    .map_err(|e| format!("detectLocalMode: {e}"))?,
            ),
        };
        let (pod_bridge_interface, pod_interface_name_prefix) = match self.detect_local {
            Some(d) => (
                non_empty(d.bridge_interface),
                non_empty(d.interface_name_prefix),
            ),
            None => (None, None),
        };
        let bind_address = match non_empty(self.bind_address) {
            None => None,
            Some(text) => {
                let ip: std::net::IpAddr = text
                    .parse()
                    .map_err(|_| format!("bindAddress: {text:?} is not an IP address"))?;
                Some(ip)
            }
        };
        if let Some(adj) = self.oom_score_adj
            && !(-1000..=1000).contains(&adj)
        {
            return Err(format!("oomScoreAdj: {adj} is not between -1000 and 1000"));
        }
        let sync_period = duration("iptables.syncPeriod", iptables.sync_period)?;
        let min_sync_period = duration("iptables.minSyncPeriod", iptables.min_sync_period)?;
        Ok(FileSettings {
            node_name: non_empty(self.hostname_override).map(|n| n.to_lowercase()),
            kubeconfig: self
                .client_connection
                .and_then(|c| non_empty(c.kubeconfig))
                .map(PathBuf::from),
            cluster_cidrs: non_empty(self.cluster_cidr).map(|c| {
                c.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }),
            detect_local_mode,
            pod_bridge_interface,
            pod_interface_name_prefix,
            masquerade_all: iptables.masquerade_all,
            masquerade_bit,
            nodeport_addresses: self.node_port_addresses.filter(|a| !a.is_empty()),
            localhost_nodeports: iptables.localhost_node_ports,
            sync_period,
            min_sync_period,
            healthz_bind_address: non_empty(self.healthz_bind_address),
            metrics_bind_address: non_empty(self.metrics_bind_address),
            verbosity,
            log_format,
            conntrack_tcp_be_liberal: self.conntrack.as_ref().and_then(|c| c.tcp_be_liberal),
            conntrack_max_per_core: tuning.max_per_core,
            conntrack_min: tuning.min,
            conntrack_tcp_established_timeout: tuning.tcp_established_timeout,
            conntrack_tcp_close_wait_timeout: tuning.tcp_close_wait_timeout,
            conntrack_udp_timeout: tuning.udp_timeout,
            conntrack_udp_stream_timeout: tuning.udp_stream_timeout,
            oom_score_adj: self.oom_score_adj,
            bind_address,
            ignored,
            unknown: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ConfigMap kubeadm writes (every field, most at their zero value),
    /// with a cluster's choices filled in.
    const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: false
  masqueradeAll: false
  masqueradeBit: 13
  minSyncPeriod: 2s
  syncPeriod: 1m0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 0.0.0.0:10249
mode: iptables
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses:
- primary
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn durations_are_written_as_go_prints_them() {
        for (seconds, millis, text) in [
            (0, 0, "0s"),
            (86_400, 0, "24h0m0s"),
            (3_600, 0, "1h0m0s"),
            (90, 0, "1m30s"),
            (45, 0, "45s"),
            (1, 500, "1.5s"),
            (0, 500, "500ms"),
            (3_661, 250, "1h1m1.25s"),
        ] {
            let duration = Duration::from_secs(seconds) + Duration::from_millis(millis);
            assert_eq!(go_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration), "{text}");
        }
        assert_eq!(go_duration(Duration::from_micros(250)), "250µs");
        assert_eq!(parse_duration("250µs"), Ok(Duration::from_micros(250)));
    }

    #[test]
    fn a_written_file_reads_back_as_the_same_settings() {
        let mut settings = parse(KUBEADM).unwrap();
        settings.node_name = Some("node-a".into());
        settings.detect_local_mode = Some(DetectLocalMode::InterfaceNamePrefix);
        settings.pod_interface_name_prefix = Some("veth".into());
        settings.verbosity = Some(4);
        settings.log_format = Some(LogFormat::Json);
        settings.oom_score_adj = Some(-998);
        settings.conntrack_max_per_core = Some(0);
        settings.conntrack_min = Some(131_072);
        settings.conntrack_tcp_established_timeout = Some(Duration::from_secs(86_400));
        settings.conntrack_tcp_close_wait_timeout = Some(Duration::ZERO);
        settings.conntrack_udp_timeout = Some(Duration::from_secs(45));
        let text = write(&settings);
        assert!(text.contains("tcpEstablishedTimeout: 24h0m0s"), "{text}");
        assert!(text.contains("mode: iptables"), "{text}");
        let read = parse(&text).unwrap();
        assert!(
            read.unknown.is_empty() && read.ignored.is_empty(),
            "{read:?}"
        );
        assert_eq!(read, settings, "{text}");
        // Nothing set: only what names the file.
        assert_eq!(
            write(&FileSettings::default()),
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: iptables\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_or_removed_file_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.conf");
        std::fs::write(&path, KUBEADM).unwrap();
        let every = std::time::Duration::from_secs(5);
        // Unchanged: still waiting after many checks.
        let waiting = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            changed(&path, KUBEADM, every),
        )
        .await;
        assert!(waiting.is_err());
        std::fs::write(
            &path,
            KUBEADM.replace("masqueradeBit: 13", "masqueradeBit: 12"),
        )
        .unwrap();
        assert!(
            changed(&path, KUBEADM, every)
                .await
                .ends_with("config.conf changed")
        );
        std::fs::remove_file(&path).unwrap();
        assert!(
            changed(&path, KUBEADM, every)
                .await
                .contains("can no longer be read")
        );
    }

    #[test]
    fn a_kubeadm_config_map_becomes_the_agents_settings() {
        let settings = parse(KUBEADM).unwrap();
        assert_eq!(
            settings,
            FileSettings {
                node_name: None,
                kubeconfig: Some("/var/lib/kube-proxy/kubeconfig.conf".into()),
                cluster_cidrs: Some(vec![
                    "10.244.0.0/16".to_string(),
                    "fd00:10:244::/56".to_string()
                ]),
                detect_local_mode: None,
                pod_bridge_interface: None,
                pod_interface_name_prefix: None,
                masquerade_all: Some(false),
                masquerade_bit: Some(13),
                nodeport_addresses: Some(vec!["primary".to_string()]),
                localhost_nodeports: Some(false),
                sync_period: Some(Duration::from_secs(60)),
                min_sync_period: Some(Duration::from_secs(2)),
                healthz_bind_address: None,
                metrics_bind_address: Some("0.0.0.0:10249".to_string()),
                // verbosity 0 and the zero buffer sizes are kube-proxy's unset.
                verbosity: None,
                log_format: None,
                conntrack_tcp_be_liberal: Some(false),
                // null: kube-proxy's defaults; 0s UDP timeouts: left alone.
                conntrack_max_per_core: None,
                conntrack_min: None,
                conntrack_tcp_established_timeout: None,
                conntrack_tcp_close_wait_timeout: None,
                conntrack_udp_timeout: None,
                conntrack_udp_stream_timeout: None,
                oom_score_adj: None,
                // kubeadm's: every IPv4 address.
                bind_address: Some("0.0.0.0".parse().unwrap()),
                ignored: Vec::new(),
                unknown: Vec::new(),
            }
        );
    }

    #[test]
    fn unknown_fields_are_reported_not_fatal_as_in_kube_proxy() {
        // Fields dropped from the API over the years, a misspelling, and
        // the rest still read.
        let settings = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
             kind: KubeProxyConfiguration\n\
             resourceContainer: /kube-proxy\n\
             udpIdleTimeout: 250ms\n\
             hostnameOverride: Node-A\n\
             detectLocalMode: InterfaceNamePrefix\n\
             detectLocal: {interfaceNamePrefix: veth}\n\
             iptables: {syncPeriode: 45s, minSyncPeriod: 500ms}\n\
             ipvs: {scheduler: rr}\n",
        )
        .unwrap();
        assert_eq!(
            settings.unknown,
            [
                "resourceContainer",
                "udpIdleTimeout",
                "iptables.syncPeriode"
            ]
        );
        assert_eq!(settings.ignored, ["ipvs"]);
        assert_eq!(settings.node_name.as_deref(), Some("node-a"));
        assert_eq!(settings.sync_period, None);
        assert_eq!(settings.min_sync_period, Some(Duration::from_millis(500)));
        assert_eq!(
            settings.detect_local_mode,
            Some(DetectLocalMode::InterfaceNamePrefix)
        );
        assert_eq!(settings.pod_interface_name_prefix.as_deref(), Some("veth"));
    }

    #[test]
    fn logging_bind_address_conntrack_and_oom_score_are_read() {
        let settings = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
             kind: KubeProxyConfiguration\n\
             bindAddress: 10.0.1.5\n\
             oomScoreAdj: -998\n\
             conntrack: {tcpBeLiberal: true, maxPerCore: 0, min: 65536, tcpEstablishedTimeout: 2h0m0s,\n\
                         tcpCloseWaitTimeout: 0s, udpTimeout: 45s}\n\
             logging: {format: json, verbosity: 4, vmodule: [{filePattern: proxier, verbosity: 6}]}\n",
        )
        .unwrap();
        assert_eq!(settings.bind_address, Some("10.0.1.5".parse().unwrap()));
        assert_eq!(settings.oom_score_adj, Some(-998));
        assert_eq!(settings.conntrack_tcp_be_liberal, Some(true));
        assert_eq!(settings.conntrack_max_per_core, Some(0));
        assert_eq!(settings.conntrack_min, Some(65536));
        assert_eq!(
            settings.conntrack_tcp_established_timeout,
            Some(Duration::from_secs(7200))
        );
        // 0s: leave it, which is not the default (24 h).
        assert_eq!(
            settings.conntrack_tcp_close_wait_timeout,
            Some(Duration::ZERO)
        );
        assert_eq!(
            settings.conntrack_udp_timeout,
            Some(Duration::from_secs(45))
        );
        assert_eq!(settings.conntrack_udp_stream_timeout, None);
        assert_eq!(settings.verbosity, Some(4));
        assert_eq!(settings.log_format, Some(LogFormat::Json));
        assert_eq!(settings.ignored, ["logging.vmodule"]);
        assert!(settings.unknown.is_empty(), "{:?}", settings.unknown);
    }

    #[test]
    fn yaml_merge_keys_are_applied() {
        let settings = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n\
             kind: KubeProxyConfiguration\n\
             x-defaults: &defaults {masqueradeBit: 13, syncPeriod: 1m0s}\n\
             hostnameOverride: 12345\n\
             iptables:\n  <<: *defaults\n  syncPeriod: 45s\n",
        )
        .unwrap();
        // A number where a string goes reads as it does without merge keys.
        assert_eq!(settings.node_name.as_deref(), Some("12345"));
        assert_eq!(settings.masquerade_bit, Some(13));
        // The key written beside the merge wins, as YAML says.
        assert_eq!(settings.sync_period, Some(Duration::from_secs(45)));
        assert_eq!(settings.unknown, ["x-defaults"]);
    }

    #[test]
    fn bad_files_name_the_field_and_what_is_accepted() {
        let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        for (body, expected) in [
            (
                "iptables: {masqueradeBit: high}\n",
                "iptables.masqueradeBit: invalid type",
            ),
            (
                "nodePortAddresses: 10.0.0.0/8\n",
                "nodePortAddresses: invalid type",
            ),
            (
                "mode: ipvs\n",
                "mode: \"ipvs\": causeway-agent is kube-proxy's iptables mode",
            ),
            (
                "iptables: {masqueradeBit: 32}\n",
                "iptables.masqueradeBit: 32 is not a bit",
            ),
            (
                "iptables: {syncPeriod: soon}\n",
                "iptables.syncPeriod: \"soon\"",
            ),
            (
                "bindAddress: all\n",
                "bindAddress: \"all\" is not an IP address",
            ),
            (
                "oomScoreAdj: -1001\n",
                "oomScoreAdj: -1001 is not between -1000 and 1000",
            ),
            (
                "logging: {format: xml}\n",
                "logging.format: \"xml\" is not text or json",
            ),
            (
                "conntrack: {maxPerCore: -1}\n",
                "conntrack.maxPerCore: -1 is not between 0 and 2147483647",
            ),
            (
                "conntrack: {tcpEstablishedTimeout: -1s}\n",
                "conntrack.tcpEstablishedTimeout: \"-1s\"",
            ),
            (
                "logging: {verbosity: -1}\n",
                "logging.verbosity: invalid type: integer `-1`, expected u32",
            ),
            (
                "detectLocalMode: Bridge\n",
                "detectLocalMode: \"Bridge\" is not one of ClusterCIDR, NodeCIDR",
            ),
        ] {
            let error = parse(&format!("{head}{body}")).unwrap_err();
            assert!(error.contains(expected), "{body}: {error}");
        }
        let error = parse("apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
        assert!(error.contains("apiVersion: \"v1\""), "{error}");
        let error =
            parse("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n")
                .unwrap_err();
        assert!(
            error.contains("is not kubeproxy.config.k8s.io/v1alpha1"),
            "{error}"
        );
        let error =
            parse("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n")
                .unwrap_err();
        assert!(error.contains("kind: \"KubeletConfiguration\""), "{error}");
        // The line is named too, for a file of any size.
        let error = parse(&format!("{head}\n\nhostnameOverride: [a, b]\n")).unwrap_err();
        assert!(error.contains("line 5"), "{error}");
    }
}

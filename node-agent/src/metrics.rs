//! Prometheus metrics with kube-proxy's names (SPEC 2.3), so dashboards and
//! alerts written for kube-proxy keep working, plus Causeway's own and the
//! standard `process_*` metrics that kube-proxy's dashboards chart too.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use causeway_telemetry::process::ProcessCollector;
use causeway_telemetry::rest_client::RestClientMetrics;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::addr::IpFamily;
use crate::model::Model;
use crate::nfacct;
use crate::rules::Accounting;

type Labels = Vec<(String, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;
type Timestamps = Family<Labels, Gauge<f64, AtomicU64>>;

/// kube-proxy's `ip_family` label, which its per-family metrics carry.
fn family_labels(family: IpFamily) -> Labels {
    vec![("ip_family".to_string(), family.address_type().to_string())]
}

fn family_labels_and(family: IpFamily, key: &str, value: &str) -> Labels {
    let mut labels = family_labels(family);
    labels.push((key.to_string(), value.to_string()));
    labels
}

/// Every metric the agent exports. Those kube-proxy labels by IP family are
/// set through the methods, which take the family.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histograms,
    sync_full_duration: Histograms,
    sync_partial_duration: Histograms,
    network_programming_duration: Histograms,
    rules_total: Family<Labels, Gauge>,
    restore_failures: Family<Labels, Counter>,
    partial_restore_failures: Family<Labels, Counter>,
    pub service_changes_pending: Gauge,
    pub endpoint_changes_pending: Gauge,
    pub service_changes: Counter,
    pub endpoint_changes: Counter,
    rules_last: Family<Labels, Gauge>,
    no_local_endpoints: Family<Labels, Gauge>,
    pub healthz_answers: Family<Labels, Counter>,
    pub livez_answers: Family<Labels, Counter>,
    /// The API client's requests; [`causeway_telemetry::rest_client::client`]
    /// records into it.
    pub rest_client: Arc<RestClientMetrics>,
    last_sync_timestamp: Timestamps,
    last_queued_timestamp: Timestamps,
    /// The families synced, and when a change was last queued: a change
    /// queues a sync of every family.
    queued: Mutex<(Vec<IpFamily>, Option<f64>)>,
    pub restore_bytes: Histogram,
    conntrack_deleted: Counter,
    conntrack_reconciler_deleted: Family<Labels, Counter>,
    conntrack_reconciler_duration: Histograms,
    pub rules_damaged: Counter,
}

/// kube-proxy's sync-duration buckets: 1 ms doubling to about 16 s.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let sync_histograms =
            || Histograms::new_with_constructor(|| Histogram::new(duration_buckets()));
        let sync_duration = sync_histograms();
        let sync_full_duration = sync_histograms();
        let sync_partial_duration = sync_histograms();
        let network_programming_duration = Histograms::new_with_constructor(|| {
            Histogram::new([
                0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0,
            ])
        });
        let rules_total = Family::<Labels, Gauge>::default();
        let restore_failures = Family::<Labels, Counter>::default();
        let partial_restore_failures = Family::<Labels, Counter>::default();
        let service_changes_pending = Gauge::default();
        let endpoint_changes_pending = Gauge::default();
        let service_changes = Counter::default();
        let endpoint_changes = Counter::default();
        let rules_last = Family::<Labels, Gauge>::default();
        let no_local_endpoints = Family::<Labels, Gauge>::default();
        let healthz_answers = Family::<Labels, Counter>::default();
        let livez_answers = Family::<Labels, Counter>::default();
        let rest_client = Arc::new(RestClientMetrics::default());
        let last_sync_timestamp = Timestamps::default();
        let last_queued_timestamp = Timestamps::default();
        let restore_bytes = Histogram::new(exponential_buckets(1024.0, 4.0, 10));
        let conntrack_deleted = Counter::default();
        let conntrack_reconciler_deleted = Family::<Labels, Counter>::default();
        let conntrack_reconciler_duration = sync_histograms();
        let rules_damaged = Counter::default();

        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            sync_full_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            sync_partial_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by the agent",
            rules_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            restore_failures.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            partial_restore_failures.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            service_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            endpoint_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_last",
            "Number of iptables rules written by the agent in the last sync",
            rules_last.clone(),
        );
        // kube-proxy's name ends in _total although it is a gauge.
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of service ports with a Local traffic policy and no local endpoints",
            no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            healthz_answers.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            livez_answers.clone(),
        );
        rest_client.register(&mut registry);
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last_sync_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            last_queued_timestamp.clone(),
        );
        registry.register(
            "causeway_agent_restore_bytes",
            "Size of each iptables-restore input",
            restore_bytes.clone(),
        );
        registry.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            conntrack_reconciler_deleted.clone(),
        );
        registry.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            conntrack_reconciler_duration.clone(),
        );
        registry.register(
            "causeway_agent_conntrack_entries_deleted",
            "Stale UDP conntrack entries deleted after syncs",
            conntrack_deleted.clone(),
        );
        registry.register(
            "causeway_agent_rules_damaged",
            "Periodic checks that found our rules damaged by another program (a canary chain deleted, a chain flushed, a jump gone); each starts a full sync",
            rules_damaged.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry,
            sync_duration,
            sync_full_duration,
            sync_partial_duration,
            network_programming_duration,
            rules_total,
            restore_failures,
            partial_restore_failures,
            service_changes_pending,
            endpoint_changes_pending,
            service_changes,
            endpoint_changes,
            rules_last,
            no_local_endpoints,
            healthz_answers,
            livez_answers,
            rest_client,
            last_sync_timestamp,
            last_queued_timestamp,
            queued: Mutex::new((Vec::new(), None)),
            restore_bytes,
            conntrack_deleted,
            conntrack_reconciler_deleted,
            conntrack_reconciler_duration,
            rules_damaged,
        }
    }

    /// Records one family's sync: how long it took, and whether it applied
    /// a full payload (`Some(true)`), a partial one, or nothing.
    pub fn observe_sync(&self, family: IpFamily, seconds: f64, applied: Option<bool>) {
        let labels = family_labels(family);
        self.sync_duration.get_or_create(&labels).observe(seconds);
        match applied {
            Some(true) => self
                .sync_full_duration
                .get_or_create(&labels)
                .observe(seconds),
            Some(false) => self
                .sync_partial_duration
                .get_or_create(&labels)
                .observe(seconds),
            None => {}
        }
    }

    /// Counts a refused restore of `family`'s rules (`partial` or full).
    pub fn count_restore_failure(&self, family: IpFamily, partial: bool) {
        let labels = family_labels(family);
        self.restore_failures.get_or_create(&labels).inc();
        if partial {
            self.partial_restore_failures.get_or_create(&labels).inc();
        }
    }

    /// Sets the rule count of one table of `family`.
    pub fn set_rules(&self, family: IpFamily, table: &str, rules: usize) {
        self.rules_total
            .get_or_create(&family_labels_and(family, "table", table))
            .set(rules as i64);
    }

    /// Sets the rules one sync wrote into one table of `family`.
    pub fn set_rules_written(&self, family: IpFamily, table: &str, rules: usize) {
        self.rules_last
            .get_or_create(&family_labels_and(family, "table", table))
            .set(rules as i64);
    }

    /// One cleanup of stale conntrack flows of `family` after a sync: what it
    /// deleted, and how long it took (kube-proxy's conntrack reconciler
    /// metrics, and ours).
    pub fn observe_conntrack_cleanup(&self, family: IpFamily, deleted: u64, seconds: f64) {
        let labels = family_labels(family);
        self.conntrack_deleted.inc_by(deleted);
        self.conntrack_reconciler_deleted
            .get_or_create(&labels)
            .inc_by(deleted);
        self.conntrack_reconciler_duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// `family`'s rules are in place as of `at` (seconds since the epoch).
    pub fn synced(&self, family: IpFamily, at: f64) {
        self.last_sync_timestamp
            .get_or_create(&family_labels(family))
            .set(at);
    }

    /// A change was queued at `at` (seconds since the epoch), for every
    /// family the agent syncs.
    pub fn queued_at(&self, at: f64) {
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        queued.1 = Some(at);
        for family in &queued.0 {
            self.last_queued_timestamp
                .get_or_create(&family_labels(*family))
                .set(at);
        }
    }

    /// The families the agent syncs (known from its first sync on).
    pub fn set_families(&self, families: &[IpFamily]) {
        let mut queued = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        if queued.0 == families {
            return;
        }
        queued.0 = families.to_vec();
        // From 0, so that a family's first failure is an increase; and the
        // conntrack cleanup's series exist before any cleanup ran, as
        // kube-proxy's, whose reconciler runs every sync.
        for family in families {
            let labels = family_labels(*family);
            let _ = self.restore_failures.get_or_create(&labels);
            let _ = self.partial_restore_failures.get_or_create(&labels);
            let _ = self.conntrack_reconciler_deleted.get_or_create(&labels);
            let _ = self.conntrack_reconciler_duration.get_or_create(&labels);
        }
        if let Some(at) = queued.1 {
            for family in families {
                self.last_queued_timestamp
                    .get_or_create(&family_labels(*family))
                    .set(at);
            }
        }
    }

    /// An EndpointSlice change of `family` was live `seconds` after its
    /// trigger time.
    pub fn observe_network_programming(&self, family: IpFamily, seconds: f64) {
        self.network_programming_duration
            .get_or_create(&family_labels(family))
            .observe(seconds);
    }

    /// Sets the Local-policy ports without local endpoints from the models
    /// the rules now follow, per family.
    pub fn set_no_local_endpoints(&self, models: &[&Model]) {
        for model in models {
            let counts = NoLocalEndpoints::of(model);
            for (policy, count) in [("internal", counts.internal), ("external", counts.external)] {
                self.no_local_endpoints
                    .get_or_create(&family_labels_and(model.family, "traffic_policy", policy))
                    .set(count as i64);
            }
        }
    }

    /// Counts one answer of `/healthz` (`healthz` true) or `/livez`.
    pub fn count_health_answer(&self, healthz: bool, status: u16) {
        let family = if healthz {
            &self.healthz_answers
        } else {
            &self.livez_answers
        };
        family
            .get_or_create(&vec![("code".to_string(), status.to_string())])
            .inc();
    }

    /// Exports kube-proxy's nfacct counters that exist (read at each
    /// scrape, as kube-proxy reads them).
    pub fn register_accounting(&mut self, accounting: Accounting) {
        let mut counters = Vec::new();
        if accounting.invalid_dropped {
            counters.push(NfacctMetric {
                name: "kubeproxy_iptables_ct_state_invalid_dropped_packets",
                help: "packets dropped by iptables to work around conntrack problems",
                counter: nfacct::CT_STATE_INVALID_DROPPED,
            });
        }
        if accounting.localhost_nodeports {
            counters.push(NfacctMetric {
                name: "kubeproxy_iptables_localhost_nodeports_accepted_packets",
                help: "Number of packets accepted on nodeports of loopback interface",
                counter: nfacct::LOCALHOST_NODEPORTS_ACCEPTED,
            });
        }
        if !counters.is_empty() {
            self.registry
                .register_collector(Box::new(NfacctCollector { counters }));
        }
    }

    /// The OpenMetrics text exposition. It may run `nfacct`: call it where
    /// blocking is allowed.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// One nfacct counter exported as a Prometheus counter.
#[derive(Debug)]
struct NfacctMetric {
    name: &'static str,
    help: &'static str,
    counter: &'static str,
}

/// Reads the nfacct counters at each scrape, all with one `nfacct list`;
/// one that cannot be read is left out of that scrape (and logged), as
/// kube-proxy does.
#[derive(Debug)]
struct NfacctCollector {
    counters: Vec<NfacctMetric>,
}

impl prometheus_client::collector::Collector for NfacctCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::counter::ConstCounter;
        let counts = match nfacct::all_packets(std::time::Duration::from_secs(2)) {
            Ok(counts) => counts,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the nfacct counters");
                return Ok(());
            }
        };
        for metric in &self.counters {
            let Some(packets) = counts.get(metric.counter) else {
                tracing::warn!(counter = metric.counter, "an nfacct counter is gone");
                continue;
            };
            let counter = ConstCounter::new(*packets);
            counter.encode(encoder.encode_descriptor(
                metric.name,
                metric.help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Service ports with `internalTrafficPolicy: Local` (`internal`) or
/// `externalTrafficPolicy: Local` (`external`) that have endpoints, none of
/// them local, so that traffic under that policy is dropped on this node,
/// as kube-proxy counts them (a port with no endpoints at all is rejected,
/// not counted), in one family's model.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    pub internal: usize,
    pub external: usize,
}

impl NoLocalEndpoints {
    pub fn of(model: &Model) -> Self {
        let dropped = || {
            model
                .service_ports
                .iter()
                .filter(|port| port.has_endpoints && port.local_endpoints.is_empty())
        };
        NoLocalEndpoints {
            internal: dropped().filter(|p| p.internal_policy_local()).count(),
            external: dropped().filter(|p| p.external_policy_local()).count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_names_are_exported() {
        let metrics = Metrics::new();
        metrics.count_restore_failure(IpFamily::V4, false);
        metrics.count_restore_failure(IpFamily::V6, true);
        metrics.set_rules(IpFamily::V4, "nat", 42);
        metrics.observe_sync(IpFamily::V4, 0.05, Some(true));
        metrics.observe_sync(IpFamily::V6, 0.01, None);
        metrics.observe_network_programming(IpFamily::V6, 1.5);
        metrics.synced(IpFamily::V4, 1_700_000_000.0);
        metrics.observe_conntrack_cleanup(IpFamily::V4, 3, 0.002);
        let text = metrics.encode();
        // kube-proxy's names, with its ip_family label where it has one.
        for expected in [
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 42",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1",
            "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1700000000.0",
            "causeway_agent_conntrack_entries_deleted_total 3",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 3",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv4\"} 1",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
        // A sync that applied nothing is neither full nor partial.
        assert!(!text.contains(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"}"
        ));
        assert!(!text.contains(
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"}"
        ));
    }

    #[test]
    fn a_queued_change_stamps_every_family_synced() {
        let metrics = Metrics::new();
        let stamp = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds";
        // Before the first sync the families are not known yet.
        metrics.queued_at(100.0);
        assert!(!metrics.encode().contains(stamp));
        metrics.set_families(&[IpFamily::V4, IpFamily::V6]);
        assert!(
            metrics
                .encode()
                .contains(&format!("{stamp}{{ip_family=\"IPv6\"}} 100.0"))
        );
        metrics.queued_at(200.0);
        let text = metrics.encode();
        for family in ["IPv4", "IPv6"] {
            assert!(
                text.contains(&format!("{stamp}{{ip_family=\"{family}\"}} 200.0")),
                "{text}"
            );
            // The failure and conntrack counters start at 0 once a family
            // is synced.
            for counter in [
                "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
                "kubeproxy_conntrack_reconciler_deleted_entries_total",
                "kubeproxy_conntrack_reconciler_sync_duration_seconds_count",
            ] {
                assert!(
                    text.contains(&format!("{counter}{{ip_family=\"{family}\"}} 0")),
                    "{counter}: {text}"
                );
            }
        }
    }

    fn sample(text: &str, name: &str) -> f64 {
        causeway_telemetry::sample(text, name)
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
    }

    #[test]
    fn kube_proxy_sync_and_probe_counters_are_exported() {
        let metrics = Metrics::new();
        metrics.endpoint_changes.inc();
        metrics.endpoint_changes.inc();
        metrics.service_changes.inc();
        metrics.set_rules_written(IpFamily::V4, "nat", 12);
        metrics.count_health_answer(true, 200);
        metrics.count_health_answer(true, 503);
        metrics.count_health_answer(true, 503);
        metrics.count_health_answer(false, 200);
        let text = metrics.encode();
        for (name, value) in [
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", 2.0),
            ("kubeproxy_sync_proxy_rules_service_changes_total", 1.0),
            (
                "kubeproxy_sync_proxy_rules_iptables_last{ip_family=\"IPv4\",table=\"nat\"}",
                12.0,
            ),
            ("kubeproxy_proxy_healthz_total{code=\"200\"}", 1.0),
            ("kubeproxy_proxy_healthz_total{code=\"503\"}", 2.0),
            ("kubeproxy_proxy_livez_total{code=\"200\"}", 1.0),
        ] {
            assert_eq!(sample(&text, name), value, "{name} in:\n{text}");
        }
    }

    #[test]
    fn local_policy_ports_without_local_endpoints_are_counted_once_per_port() {
        use crate::addr::IpFamily;
        use crate::model::fixtures::{EndpointBuilder, NodeBuilder, ServiceBuilder, SliceBuilder};
        use crate::model::{NodeInfo, build};

        let node = NodeInfo::from_node(
            &NodeBuilder::new("node-a")
                .internal_ip("192.168.0.10")
                .build(),
            &mut Vec::new(),
        );
        let remote_only = |service: &str| {
            SliceBuilder::new("default", service, &format!("{service}-1"))
                .port("http", 8080, "TCP")
                .endpoint(EndpointBuilder::new("10.244.2.9").node("node-b"))
                .build()
        };
        let service = |name: &str, ip: &str| {
            ServiceBuilder::new("default", name)
                .cluster_ip(ip)
                .port("http", 80, "TCP")
        };
        let etp_local_node_port = |name: &str, ip: &str, node_port: i32| {
            service(name, ip)
                .type_("NodePort")
                .node_port(node_port)
                .external_traffic_policy("Local")
                .build()
        };
        let services = [
            // ITP=Local, its only endpoint elsewhere: internal traffic drops.
            service("itp", "10.96.0.11")
                .internal_traffic_policy("Local")
                .build(),
            // ETP=Local, endpoint elsewhere: external traffic drops.
            etp_local_node_port("etp", "10.96.0.12", 30080),
            // ETP=Local with a local endpoint: not counted.
            etp_local_node_port("served", "10.96.0.13", 30081),
            // Local policies and no endpoints anywhere: REJECTed, not counted.
            etp_local_node_port("empty", "10.96.0.15", 30082),
            service("empty-itp", "10.96.0.16")
                .internal_traffic_policy("Local")
                .build(),
            // Cluster policies: never counted.
            service("cluster", "10.96.0.14").build(),
        ];
        let slices = [
            remote_only("itp"),
            remote_only("etp"),
            remote_only("cluster"),
            SliceBuilder::new("default", "served", "served-1")
                .port("http", 8080, "TCP")
                .endpoint(EndpointBuilder::new("10.244.1.9").node("node-a"))
                .build(),
        ];
        let (model, issues) = build(&services, &slices, &node, IpFamily::V4);
        assert!(issues.is_empty(), "{issues:?}");
        assert_eq!(
            NoLocalEndpoints::of(&model),
            NoLocalEndpoints {
                internal: 1,
                external: 1
            }
        );
        // The metric counts per family, as kube-proxy's per-family proxiers do.
        let metrics = Metrics::new();
        metrics.set_no_local_endpoints(&[&model]);
        let text = metrics.encode();
        for policy in ["internal", "external"] {
            let name = format!(
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{ip_family=\"IPv4\",traffic_policy=\"{policy}\"}}"
            );
            assert_eq!(sample(&text, &name), 1.0, "{text}");
        }
        assert!(!text.contains("IPv6"), "{text}");
    }
}

//! Prometheus metrics with kube-proxy's names (SPEC 2.3), so dashboards and
//! alerts written for kube-proxy keep working, plus Causeway's own.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub network_programming_duration: Histogram,
    pub rules_total: Family<Labels, Gauge>,
    pub restore_failures: Counter,
    pub partial_restore_failures: Counter,
    pub service_changes_pending: Gauge,
    pub endpoint_changes_pending: Gauge,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    pub restore_bytes: Histogram,
    pub conntrack_deleted: Counter,
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
        let sync_duration = Histogram::new(duration_buckets());
        let sync_full_duration = Histogram::new(duration_buckets());
        let sync_partial_duration = Histogram::new(duration_buckets());
        let network_programming_duration = Histogram::new([
            0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0,
        ]);
        let rules_total = Family::<Labels, Gauge>::default();
        let restore_failures = Counter::default();
        let partial_restore_failures = Counter::default();
        let service_changes_pending = Gauge::default();
        let endpoint_changes_pending = Gauge::default();
        let last_sync_timestamp = Gauge::<f64, AtomicU64>::default();
        let last_queued_timestamp = Gauge::<f64, AtomicU64>::default();
        let restore_bytes = Histogram::new(exponential_buckets(1024.0, 4.0, 10));
        let conntrack_deleted = Counter::default();
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
            "causeway_agent_conntrack_entries_deleted",
            "Stale UDP conntrack entries deleted after syncs",
            conntrack_deleted.clone(),
        );
        registry.register(
            "causeway_agent_rules_damaged",
            "Periodic checks that found our rules damaged by another program (a canary chain deleted, a chain flushed, a jump gone); each starts a full sync",
            rules_damaged.clone(),
        );
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
            last_sync_timestamp,
            last_queued_timestamp,
            restore_bytes,
            conntrack_deleted,
            rules_damaged,
        }
    }

    /// Sets the rule count of one table.
    pub fn set_rules(&self, table: &str, rules: usize) {
        self.rules_total
            .get_or_create(&vec![("table".to_string(), table.to_string())])
            .set(rules as i64);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_names_are_exported() {
        let metrics = Metrics::new();
        metrics.restore_failures.inc();
        metrics.set_rules("nat", 42);
        metrics.sync_full_duration.observe(0.05);
        let text = metrics.encode();
        for expected in [
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1",
            "kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\"} 42",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_network_programming_duration_seconds_count 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "causeway_agent_conntrack_entries_deleted_total 0",
        ] {
            assert!(text.contains(expected), "{expected} missing from:\n{text}");
        }
    }
}

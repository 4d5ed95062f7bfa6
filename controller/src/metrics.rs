//! The controller's Prometheus metrics (one struct, one registry, with the
//! standard `process_*` and client-go's `rest_client_*` beside its own) and
//! the small HTTP server for `/metrics`, `/healthz` and `/readyz` (SPEC 1.6).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use causeway_telemetry::process::ProcessCollector;
use causeway_telemetry::rest_client::RestClientMetrics;

use crate::aws::AwsCalls;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `ok` or the error's bounded label.
    pub outcome: &'static str,
}

/// Everything the controller exports.
pub struct Metrics {
    registry: Registry,
    pub aws_calls: Arc<AwsCalls>,
    /// The API client's requests; [`causeway_telemetry::rest_client::client`]
    /// records into it.
    pub rest_client: Arc<RestClientMetrics>,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// Drift audits put off because as many as allowed were running.
    pub audits_postponed: Counter,
    /// Set once the caches are synced and reconciling has started.
    pub ready: AtomicBool,
    /// Set while this replica holds the leader lease.
    pub leader: Arc<AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let aws_calls = Arc::new(AwsCalls::default());
        aws_calls.register(&mut registry);
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "causeway_reconciles",
            "Service reconciles by outcome",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "causeway_reconcile_duration_seconds",
            "Time one Service reconcile took",
            reconcile_duration.clone(),
        );
        let audits_postponed = Counter::default();
        registry.register(
            "causeway_drift_audits_postponed",
            "Drift audits put off because as many as allowed (half the workers) were running",
            audits_postponed.clone(),
        );
        let leader = Arc::new(AtomicBool::new(false));
        let leader_gauge = leader.clone();
        registry.register_collector(Box::new(LeaderCollector(leader_gauge)));
        let rest_client = Arc::new(RestClientMetrics::default());
        rest_client.register(&mut registry);
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry,
            aws_calls,
            rest_client,
            reconciles,
            reconcile_duration,
            audits_postponed,
            ready: AtomicBool::new(false),
            leader,
        }
    }
}

impl Metrics {
    /// Starts timing a reconcile; the guard records its outcome when dropped.
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        ReconcileTimer {
            metrics: self,
            start: Instant::now(),
            outcome: "ok",
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `causeway_leader` (1 while leading), read at scrape time.
#[derive(Debug)]
struct LeaderCollector(Arc<AtomicBool>);

impl prometheus_client::collector::Collector for LeaderCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let gauge = prometheus_client::metrics::gauge::ConstGauge::new(i64::from(
            self.0.load(Ordering::Relaxed),
        ));
        let metric = encoder.encode_descriptor(
            "causeway_leader",
            "1 while this replica holds the leader lease",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

/// Drop guard: duration and outcome of one reconcile.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
    outcome: &'static str,
}

impl ReconcileTimer<'_> {
    pub fn failed(&mut self, label: &'static str) {
        self.outcome = label;
    }
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .observe(self.start.elapsed().as_secs_f64());
        self.metrics
            .reconciles
            .get_or_create(&ReconcileLabels {
                outcome: self.outcome,
            })
            .inc();
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        m.encode(),
    )
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process
/// ends. `0.0.0.0` takes IPv6 clients too, as in Go controllers: kubelet
/// probes a pod on an IPv6-only cluster at its IPv6 address.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(metrics);
    let listener = causeway_telemetry::listen::listen(addr, false)?;
    axum::serve(listener, app).await
}

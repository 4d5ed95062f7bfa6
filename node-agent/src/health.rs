//! Health checks (SPEC 2.3): the agent's own `/healthz` and `/livez` with
//! kube-proxy's semantics and JSON, and one HTTP server per
//! `externalTrafficPolicy: Local` Service on its `healthCheckNodePort`, which
//! is what the NLB probes to decide whether this node gets that Service's
//! traffic.
//!
//! The decisions (healthy or not, what each probe answers) are pure functions;
//! the servers are thin axum routers around them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::json;
use tokio::task::JoinHandle;
use tracing::info;

use crate::metrics::Metrics;
use crate::model::Model;
use crate::serve::{ConnectionBudget, serve};

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Sync progress as kube-proxy's health server sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthState {
    /// The last successful sync.
    pub last_updated: Option<Timestamp>,
    /// The oldest change not yet applied.
    pub oldest_pending: Option<Timestamp>,
    /// False while the Node is being deleted or drained by the autoscaler.
    pub node_eligible: bool,
}

/// kube-proxy's rule: unhealthy when a change has waited longer than the
/// timeout (2 × `--sync-period`) without a sync applying it.
pub fn is_healthy(state: &HealthState, now: Timestamp, timeout: Duration) -> bool {
    match state.oldest_pending {
        None => true,
        Some(queued) => {
            let waited = now.duration_since(queued);
            waited < SignedDuration::try_from(timeout).unwrap_or(SignedDuration::MAX)
        }
    }
}

/// Whether `node` may keep receiving load-balancer traffic: not being deleted,
/// not tainted for removal by the cluster autoscaler.
pub fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    !deleting && !tainted
}

/// The agent's health, shared by the sync loop and the servers.
#[derive(Debug)]
pub struct ProxyHealth {
    state: Mutex<HealthState>,
    timeout: Duration,
}

impl ProxyHealth {
    pub fn new(sync_period: Duration) -> Self {
        ProxyHealth {
            state: Mutex::new(HealthState {
                node_eligible: true,
                ..HealthState::default()
            }),
            timeout: sync_period * 2,
        }
    }

    /// A change arrived that the next sync must apply.
    pub fn queued(&self) {
        let mut state = self.lock();
        if state.oldest_pending.is_none() {
            state.oldest_pending = Some(Timestamp::now());
        }
    }

    /// A sync applied everything queued before it started.
    pub fn updated(&self, sync_started: Timestamp) {
        let mut state = self.lock();
        state.last_updated = Some(Timestamp::now());
        if state.oldest_pending.is_some_and(|q| q <= sync_started) {
            state.oldest_pending = None;
        }
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn snapshot(&self) -> HealthState {
        *self.lock()
    }

    pub fn healthy(&self) -> bool {
        is_healthy(&self.snapshot(), Timestamp::now(), self.timeout)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `/healthz` (`with_node` = true) or `/livez`: status and JSON body.
pub fn proxy_answer(
    state: &HealthState,
    now: Timestamp,
    timeout: Duration,
    with_node: bool,
) -> (StatusCode, serde_json::Value) {
    let healthy = is_healthy(state, now, timeout);
    let last = state
        .last_updated
        .map(|t| t.to_string())
        .unwrap_or_default();
    let mut body = json!({"lastUpdated": last, "currentTime": now.to_string()});
    let ok = if with_node {
        body["nodeEligible"] = json!(state.node_eligible);
        healthy && state.node_eligible
    } else {
        healthy
    };
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// What one Service's health check answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceHealth {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// The health-check answer for a Service: 200 iff it has a local ready
/// endpoint and the agent is healthy (kube-proxy's rule).
pub fn service_answer(service: &ServiceHealth, proxy_healthy: bool) -> Response {
    let status = if service.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": service.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(service.local_endpoints),
    );
    (status, headers, body.to_string()).into_response()
}

/// The health-check ports the model asks for, with what each answers. Ports
/// of one Service share its `healthCheckNodePort`.
pub fn wanted_service_checks(models: &[&Model]) -> BTreeMap<u16, ServiceHealth> {
    let mut wanted: BTreeMap<u16, ServiceHealth> = BTreeMap::new();
    for port in models.iter().flat_map(|m| &m.service_ports) {
        let Some(hc) = port.health_check_node_port else {
            continue;
        };
        if !port.external_policy_local() {
            continue;
        }
        let entry = wanted.entry(hc).or_insert_with(|| ServiceHealth {
            namespace: port.name.namespace.clone(),
            name: port.name.name.clone(),
            local_endpoints: 0,
        });
        entry.local_endpoints = entry.local_endpoints.max(port.local_ready_endpoints);
    }
    wanted
}

/// The router of the agent's own health server; each answer is counted in
/// kube-proxy's `kubeproxy_proxy_healthz_total` / `_livez_total`.
pub fn proxy_router(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state((health, metrics))
}

type ProxyState = (Arc<ProxyHealth>, Arc<Metrics>);

async fn healthz(State((health, metrics)): State<ProxyState>) -> Response {
    answer_proxy_probe(&health, &metrics, true)
}

async fn livez(State((health, metrics)): State<ProxyState>) -> Response {
    answer_proxy_probe(&health, &metrics, false)
}

fn answer_proxy_probe(health: &ProxyHealth, metrics: &Metrics, with_node: bool) -> Response {
    let (status, body) = proxy_answer(
        &health.snapshot(),
        Timestamp::now(),
        health.timeout,
        with_node,
    );
    metrics.count_health_answer(with_node, status.as_u16());
    (status, axum::Json(body)).into_response()
}

/// One server per health-check node port, started and stopped as Services
/// come and go.
pub struct ServiceHealthServers {
    health: Arc<ProxyHealth>,
    answers: Arc<RwLock<BTreeMap<u16, ServiceHealth>>>,
    running: BTreeMap<u16, JoinHandle<()>>,
    connections: ConnectionBudget,
}

/// A health-check port that could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindFailure {
    pub port: u16,
    pub service: ServiceHealth,
    pub message: String,
}

impl ServiceHealthServers {
    pub fn new(health: Arc<ProxyHealth>, connections: ConnectionBudget) -> Self {
        ServiceHealthServers {
            health,
            answers: Arc::default(),
            running: BTreeMap::new(),
            connections,
        }
    }

    /// Makes the servers match `wanted`; returns the ports that could not be
    /// bound (tried again on the next sync).
    pub async fn sync(&mut self, wanted: BTreeMap<u16, ServiceHealth>) -> Vec<BindFailure> {
        let gone: Vec<u16> = self
            .running
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(task) = self.running.remove(&port) {
                task.abort();
                info!(port, "stopped a Service health check server");
            }
        }
        *self.answers.write().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
        let mut failures = Vec::new();
        for (port, service) in wanted {
            if self.running.contains_key(&port) {
                continue;
            }
            match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
                Ok(listener) => {
                    let router = Router::new().fallback(get(service_check)).with_state((
                        self.health.clone(),
                        self.answers.clone(),
                        port,
                    ));
                    self.running.insert(
                        port,
                        tokio::spawn(serve(listener, router, self.connections.clone())),
                    );
                    info!(port, service = %format!("{}/{}", service.namespace, service.name), "serving a Service health check");
                }
                Err(e) => failures.push(BindFailure {
                    port,
                    service,
                    message: e.to_string(),
                }),
            }
        }
        failures
    }
}

type ServiceCheckState = (
    Arc<ProxyHealth>,
    Arc<RwLock<BTreeMap<u16, ServiceHealth>>>,
    u16,
);

async fn service_check(State((health, answers, port)): State<ServiceCheckState>) -> Response {
    let service = answers
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&port)
        .cloned();
    match service {
        Some(service) => service_answer(&service, health.healthy()),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    #[test]
    fn a_change_waiting_longer_than_twice_the_sync_period_is_unhealthy() {
        let timeout = Duration::from_secs(60);
        let idle = HealthState {
            last_updated: Some(at(0)),
            oldest_pending: None,
            node_eligible: true,
        };
        assert!(is_healthy(&idle, at(10_000), timeout));
        let waiting = HealthState {
            oldest_pending: Some(at(100)),
            ..idle
        };
        assert!(is_healthy(&waiting, at(159), timeout));
        assert!(!is_healthy(&waiting, at(160), timeout));
    }

    #[test]
    fn healthz_fails_for_an_ineligible_node_but_livez_does_not() {
        let state = HealthState {
            last_updated: Some(at(0)),
            oldest_pending: None,
            node_eligible: false,
        };
        let (status, body) = proxy_answer(&state, at(5), Duration::from_secs(60), true);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["nodeEligible"], json!(false));
        assert_eq!(body["lastUpdated"], json!(at(0).to_string()));
        assert_eq!(body["currentTime"], json!(at(5).to_string()));
        let (status, body) = proxy_answer(&state, at(5), Duration::from_secs(60), false);
        assert_eq!(status, StatusCode::OK);
        assert!(body.get("nodeEligible").is_none());
    }

    #[test]
    fn deleting_or_autoscaler_tainted_nodes_are_not_eligible() {
        let mut node = Node::default();
        assert!(node_eligible(&node));
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TAINT_TO_BE_DELETED.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert!(!node_eligible(&node));
        let mut node = Node::default();
        node.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(0)));
        assert!(!node_eligible(&node));
    }

    #[test]
    fn a_service_check_answers_with_its_local_endpoints() {
        let service = ServiceHealth {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let answer = service_answer(&service, true);
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(
            answer.headers()["X-Load-Balancing-Endpoint-Weight"],
            HeaderValue::from(2)
        );
        assert_eq!(answer.headers()["X-Content-Type-Options"], "nosniff");
        assert_eq!(
            service_answer(&service, false).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let none = ServiceHealth {
            local_endpoints: 0,
            ..service
        };
        assert_eq!(
            service_answer(&none, true).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}

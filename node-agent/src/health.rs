//! Health checks (SPEC 2.3): the agent's own `/healthz` and `/livez` with
//! kube-proxy's semantics and JSON, and one HTTP server per
//! `externalTrafficPolicy: Local` Service on its `healthCheckNodePort`, which
//! is what the NLB probes to decide whether this node gets that Service's
//! traffic.
//!
//! The decisions (healthy or not, what each probe answers) are pure functions;
//! the servers are thin axum routers around them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::info;

use crate::addr::IpFamily;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::rules::NodePortAddresses;
use crate::serve::{ConnectionBudget, serve_port};
use causeway_telemetry::listen::listen;

/// The taint the cluster autoscaler puts on a node it is about to remove.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Sync progress as kube-proxy's health server sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthState {
    /// The last successful sync.
    pub last_updated: Option<Timestamp>,
    /// The families that sync applied (kube-proxy reports each).
    pub families: FamilySet,
    /// The oldest change not yet applied.
    pub oldest_pending: Option<Timestamp>,
    /// False while the Node is being deleted or drained by the autoscaler.
    pub node_eligible: bool,
}

/// IPv4 and/or IPv6.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FamilySet {
    pub v4: bool,
    pub v6: bool,
}

impl FamilySet {
    pub fn of(families: &[IpFamily]) -> FamilySet {
        FamilySet {
            v4: families.contains(&IpFamily::V4),
            v6: families.contains(&IpFamily::V6),
        }
    }

    fn iter(self) -> impl Iterator<Item = IpFamily> {
        [(self.v4, IpFamily::V4), (self.v6, IpFamily::V6)]
            .into_iter()
            .filter_map(|(on, family)| on.then_some(family))
    }
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

    /// A sync of `families` applied everything queued before it started.
    pub fn updated(&self, sync_started: Timestamp, families: &[IpFamily]) {
        let mut state = self.lock();
        state.last_updated = Some(Timestamp::now());
        state.families = FamilySet::of(families);
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

/// The JSON body of `/healthz` and `/livez`: kube-proxy's `ProxyHealth`,
/// its fields in kube-proxy's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyHealthBody {
    /// The time of the last sync; the time of the answer when it is 200, as
    /// in kube-proxy, which keeps the meaning older releases gave it ("the
    /// sync loop ran recently").
    pub last_updated: String,
    pub current_time: String,
    /// `/healthz` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_eligible: Option<bool>,
    /// The proxy's own health, without the Node's eligibility.
    pub healthy: bool,
    /// Per family synced: its last sync and health.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub status: BTreeMap<&'static str, FamilyHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyHealth {
    pub last_updated: String,
    pub healthy: bool,
}

/// How Go writes a time that was never set, which Go clients parse back.
const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `/healthz` (`with_node` = true) or `/livez`: status and JSON body.
pub fn proxy_answer(
    state: &HealthState,
    now: Timestamp,
    timeout: Duration,
    with_node: bool,
) -> (StatusCode, ProxyHealthBody) {
    let healthy = is_healthy(state, now, timeout);
    let last = state
        .last_updated
        .map_or_else(|| GO_ZERO_TIME.to_string(), |t| t.to_string());
    let ok = healthy && (!with_node || state.node_eligible);
    let body = ProxyHealthBody {
        last_updated: if ok { now.to_string() } else { last.clone() },
        current_time: now.to_string(),
        node_eligible: with_node.then_some(state.node_eligible),
        healthy,
        status: state
            .families
            .iter()
            .map(|family| {
                let health = FamilyHealth {
                    last_updated: last.clone(),
                    healthy,
                };
                (family.address_type(), health)
            })
            .collect(),
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
    // kube-proxy's text, byte for byte: indented with tabs, in this order.
    let quoted = |text: &str| serde_json::to_string(text).unwrap_or_default();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\
         \"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quoted(&service.namespace),
        quoted(&service.name),
        service.local_endpoints,
    );
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
    (status, headers, body).into_response()
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
/// As kube-proxy's, they answer every method, and any other path gets Go's
/// 404.
pub fn proxy_router(health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(livez))
        .fallback(go_not_found)
        .with_state((health, metrics))
}

/// The answer of Go's `http.ServeMux` to a path it has no handler for, which
/// kube-proxy's servers give.
pub async fn go_not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        "404 page not found\n",
    )
        .into_response()
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
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        serde_json::to_string(&body).unwrap_or_default(),
    )
        .into_response()
}

/// Where the Service health checks listen. As kube-proxy's: on every
/// address, unless `--nodeport-addresses` limits the NodePorts; then on this
/// node's addresses inside those ranges (and on every address of a family
/// it does not limit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CheckAddresses {
    /// Both families' every address, through one socket.
    #[default]
    Any,
    /// These; none when no address of the node falls inside the ranges.
    Only(Vec<IpAddr>),
}

impl CheckAddresses {
    /// From each synced family's NodePort addresses; `local` (the node's
    /// addresses) is asked only when some family limits them.
    pub fn of(
        limits: &[(IpFamily, NodePortAddresses)],
        local: impl FnOnce() -> Vec<IpAddr>,
    ) -> CheckAddresses {
        // A range of length 0 is every address, as for the rules (and
        // kube-proxy): the family's wildcard, not a list that would change
        // with every pod's interface.
        let matches_all = |limit: &NodePortAddresses, family: IpFamily| match limit {
            NodePortAddresses::All => true,
            NodePortAddresses::Cidrs(cidrs) => cidrs
                .iter()
                .any(|c| c.family() == family && c.prefix_len() == 0),
        };
        if limits.iter().all(|(family, l)| matches_all(l, *family)) {
            return CheckAddresses::Any;
        }
        let local = local();
        let mut addresses: Vec<IpAddr> = Vec::new();
        for (family, limit) in limits {
            match limit {
                _ if matches_all(limit, *family) => addresses.push(match family {
                    IpFamily::V4 => Ipv4Addr::UNSPECIFIED.into(),
                    IpFamily::V6 => Ipv6Addr::UNSPECIFIED.into(),
                }),
                // (Every address: the guard above took it.)
                NodePortAddresses::All => {}
                NodePortAddresses::Cidrs(cidrs) => addresses.extend(
                    local
                        .iter()
                        .filter(|ip| IpFamily::of(ip) == *family)
                        // A link-local address needs its interface to be
                        // bound, and every pod's veth has one.
                        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
                        .filter(|ip| cidrs.iter().any(|c| c.contains(ip))),
                ),
            }
        }
        addresses.sort();
        addresses.dedup();
        CheckAddresses::Only(addresses)
    }

    fn sockets(&self, port: u16) -> Vec<(SocketAddr, bool)> {
        match self {
            CheckAddresses::Any => vec![((Ipv4Addr::UNSPECIFIED, port).into(), false)],
            CheckAddresses::Only(addresses) => addresses
                .iter()
                .map(|ip| (SocketAddr::new(*ip, port), true))
                .collect(),
        }
    }
}

/// One server per health-check node port, started and stopped as Services
/// come and go.
pub struct ServiceHealthServers {
    health: Arc<ProxyHealth>,
    answers: Arc<RwLock<BTreeMap<u16, ServiceHealth>>>,
    /// Per port: where it listens, and a server per socket.
    running: BTreeMap<u16, (CheckAddresses, Vec<JoinHandle<()>>)>,
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

    /// Makes the servers match `wanted`, listening on `addresses`; returns
    /// the ports that could not be bound (tried again on the next sync).
    pub async fn sync(
        &mut self,
        wanted: BTreeMap<u16, ServiceHealth>,
        addresses: &CheckAddresses,
    ) -> Vec<BindFailure> {
        // Gone, or to listen elsewhere (restarted below).
        let stale: Vec<u16> = self
            .running
            .iter()
            .filter(|(port, (at, _))| !wanted.contains_key(port) || at != addresses)
            .map(|(port, _)| *port)
            .collect();
        for port in stale {
            if let Some((_, tasks)) = self.running.remove(&port) {
                // Awaited: an aborted task drops its listener only when it
                // next runs, and a listener still open would refuse the new
                // binding below.
                for task in tasks {
                    task.abort();
                    let _ = task.await;
                }
                info!(port, "stopped a Service health check server");
            }
        }
        *self.answers.write().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
        let mut failures = Vec::new();
        for (port, service) in wanted {
            if self.running.contains_key(&port) {
                continue;
            }
            let sockets = addresses.sockets(port);
            let opened: std::io::Result<Vec<tokio::net::TcpListener>> = if sockets.is_empty() {
                Err(std::io::Error::new(
                    std::io::ErrorKind::AddrNotAvailable,
                    "no address of this node is inside --nodeport-addresses",
                ))
            } else {
                sockets
                    .iter()
                    .map(|(at, family_only)| listen(*at, *family_only))
                    .collect()
            };
            match opened {
                Ok(listeners) => {
                    // Every path and method, as kube-proxy's.
                    let router = Router::new().fallback(service_check).with_state((
                        self.health.clone(),
                        self.answers.clone(),
                        port,
                    ));
                    // One port for the connection caps, however many sockets.
                    let id = self.connections.port_id();
                    let tasks = listeners
                        .into_iter()
                        .map(|listener| {
                            let (router, budget) = (router.clone(), self.connections.clone());
                            tokio::spawn(serve_port(listener, router, budget, id))
                        })
                        .collect();
                    self.running.insert(port, (addresses.clone(), tasks));
                    info!(port, service = %format!("{}/{}", service.namespace, service.name), on = ?addresses, "serving a Service health check");
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
            families: FamilySet::default(),
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
            families: FamilySet::of(&[IpFamily::V4]),
            oldest_pending: None,
            node_eligible: false,
        };
        let (status, body) = proxy_answer(&state, at(5), Duration::from_secs(60), true);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        // kube-proxy's text: its fields in its order; the last sync's time
        // when the answer is not 200; `healthy` is the proxy's alone.
        let (last, now) = (at(0).to_string(), at(5).to_string());
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            format!(
                "{{\"lastUpdated\":\"{last}\",\"currentTime\":\"{now}\",\"nodeEligible\":false,\
                 \"healthy\":true,\"status\":{{\"IPv4\":{{\"lastUpdated\":\"{last}\",\"healthy\":true}}}}}}"
            )
        );
        // /livez: no eligibility, 200, and then lastUpdated is the answer's
        // time, as kube-proxy keeps it for older clients.
        let (status, body) = proxy_answer(&state, at(5), Duration::from_secs(60), false);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.node_eligible, None);
        assert_eq!(body.last_updated, now);
        assert_eq!(body.status["IPv4"].last_updated, last);
    }

    #[test]
    fn a_late_change_makes_every_family_unhealthy_and_before_any_sync_times_are_gos_zero() {
        let state = HealthState {
            last_updated: None,
            families: FamilySet::default(),
            oldest_pending: Some(at(0)),
            node_eligible: true,
        };
        let (status, body) = proxy_answer(&state, at(120), Duration::from_secs(60), false);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body.last_updated, "0001-01-01T00:00:00Z");
        assert!(!body.healthy);
        assert!(
            !serde_json::to_string(&body).unwrap().contains("status"),
            "no family synced yet"
        );
        let synced = HealthState {
            last_updated: Some(at(10)),
            families: FamilySet::of(&[IpFamily::V4, IpFamily::V6]),
            ..state
        };
        let (_, body) = proxy_answer(&synced, at(120), Duration::from_secs(60), true);
        assert_eq!(
            body.status.keys().copied().collect::<Vec<_>>(),
            ["IPv4", "IPv6"]
        );
        assert!(body.status.values().all(|f| !f.healthy));
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
    fn checks_listen_everywhere_unless_nodeport_addresses_limit_them() {
        let cidr = |c: &str| NodePortAddresses::Cidrs(vec![crate::addr::parse_cidr(c).unwrap()]);
        let local = || -> Vec<IpAddr> {
            ["127.0.0.1", "10.0.0.5", "192.168.1.9", "::1", "fd00::5"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect()
        };
        let unasked = || -> Vec<IpAddr> { panic!("the addresses are not needed") };
        assert_eq!(
            CheckAddresses::of(
                &[
                    (IpFamily::V4, NodePortAddresses::All),
                    (IpFamily::V6, NodePortAddresses::All)
                ],
                unasked
            ),
            CheckAddresses::Any
        );
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        assert_eq!(
            CheckAddresses::of(&[(IpFamily::V4, cidr("10.0.0.0/8"))], local),
            CheckAddresses::Only(vec![ip("10.0.0.5")])
        );
        // A family without limits keeps its every address.
        assert_eq!(
            CheckAddresses::of(
                &[
                    (IpFamily::V4, cidr("10.0.0.0/8")),
                    (IpFamily::V6, NodePortAddresses::All)
                ],
                local
            ),
            CheckAddresses::Only(vec![ip("10.0.0.5"), ip("::")])
        );
        assert_eq!(
            CheckAddresses::of(&[(IpFamily::V4, cidr("172.16.0.0/12"))], local),
            CheckAddresses::Only(Vec::new())
        );
        // A range of length 0 is the family's wildcard; link-local
        // addresses (every pod's veth has one) are never listed.
        assert_eq!(
            CheckAddresses::of(&[(IpFamily::V4, cidr("0.0.0.0/0"))], unasked),
            CheckAddresses::Any
        );
        let with_link_local = || -> Vec<IpAddr> {
            let mut addresses = local();
            addresses.push(ip("fe80::1"));
            addresses
        };
        assert_eq!(
            CheckAddresses::of(
                &[
                    (IpFamily::V4, cidr("10.0.0.0/8")),
                    (IpFamily::V6, cidr("::/0"))
                ],
                with_link_local
            ),
            CheckAddresses::Only(vec![ip("10.0.0.5"), ip("::")])
        );
        assert_eq!(
            CheckAddresses::of(&[(IpFamily::V6, cidr("fe80::/10"))], with_link_local),
            CheckAddresses::Only(Vec::new())
        );
    }

    #[tokio::test]
    async fn a_limited_check_listens_only_on_the_addresses_inside_the_ranges() {
        let health = Arc::new(ProxyHealth::new(Duration::from_secs(30)));
        let mut servers = ServiceHealthServers::new(health, ConnectionBudget::default());
        // A free port, found by binding 0 and letting go.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let service = ServiceHealth {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 1,
        };
        let only = CheckAddresses::Only(vec!["127.0.0.1".parse().unwrap()]);
        let failures = servers
            .sync(BTreeMap::from([(port, service.clone())]), &only)
            .await;
        assert!(failures.is_empty(), "{failures:?}");
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        );
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.2", port))
                .await
                .is_err()
        );
        // Moved to more addresses, then to all: each old listener is gone
        // before the new ones bind, so each move succeeds at once.
        let more = CheckAddresses::Only(vec![
            "127.0.0.1".parse().unwrap(),
            "127.0.0.2".parse().unwrap(),
        ]);
        for (addresses, also) in [(&more, "127.0.0.2"), (&CheckAddresses::Any, "127.0.0.3")] {
            let failures = servers
                .sync(BTreeMap::from([(port, service.clone())]), addresses)
                .await;
            assert!(failures.is_empty(), "{addresses:?}: {failures:?}");
            assert!(tokio::net::TcpStream::connect((also, port)).await.is_ok());
        }
        // Nothing inside the ranges: a failure to report, not a silent gap.
        let failures = servers
            .sync(
                BTreeMap::from([(port, service)]),
                &CheckAddresses::Only(Vec::new()),
            )
            .await;
        assert_eq!(failures.len(), 1);
        assert!(
            failures[0].message.contains("--nodeport-addresses"),
            "{failures:?}"
        );
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_service_check_writes_kube_proxys_text() {
        let service = ServiceHealth {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let body = axum::body::to_bytes(service_answer(&service, true).into_body(), 4096)
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&body),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\
             \"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
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
        assert_eq!(answer.headers()["Content-Type"], "application/json");
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

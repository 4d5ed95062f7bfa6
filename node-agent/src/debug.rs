//! The local metrics and debug server (`--metrics-bind-address`, localhost by
//! default): `/metrics`, and `/debug/rules` with the payload the agent last
//! applied and the last one iptables refused (SPEC 2.4) — what
//! `causeway-agent trace` reads for a live trace, and kube-proxy's
//! `/proxyMode`, `/healthz` and `/configz`. Also the small client that
//! `trace` uses to fetch it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::Extension;
use axum::Router;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::addr::IpFamily;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::rules::{Dispatch, RenderConfig, RenderOptions, render};
use crate::serve::LocalAddr;

/// The payloads worth looking at when something is wrong.
#[derive(Debug, Default)]
pub struct RulesLog {
    inner: Mutex<RulesInner>,
}

#[derive(Debug, Default)]
struct RulesInner {
    /// What was last applied, as the model, configuration and dispatch
    /// layout it was rendered from: after partial syncs no single payload
    /// holds the whole ruleset, so `/debug/rules` renders it whole on request.
    applied: BTreeMap<u8, (Arc<Model>, RenderConfig, Dispatch)>,
    failed: BTreeMap<u8, (String, String)>,
}

fn family_number(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => 4,
        IpFamily::V6 => 6,
    }
}

impl RulesLog {
    pub fn applied(
        &self,
        family: IpFamily,
        model: Arc<Model>,
        config: RenderConfig,
        dispatch: Dispatch,
    ) {
        let mut inner = self.lock();
        inner
            .applied
            .insert(family_number(family), (model, config, dispatch));
    }

    pub fn failed(&self, family: IpFamily, payload: &str, error: &str) {
        let mut inner = self.lock();
        inner.failed.insert(
            family_number(family),
            (payload.to_string(), error.to_string()),
        );
    }

    /// The model last applied for `family`; a failed restore leaves it.
    pub fn applied_model(&self, family: IpFamily) -> Option<Arc<Model>> {
        self.lock()
            .applied
            .get(&family_number(family))
            .map(|(model, _, _)| model.clone())
    }

    /// The applied or failed payload of one family.
    pub fn get(&self, family: u8, which: Which) -> Option<String> {
        let inner = self.lock();
        match which {
            // The jump rules from the built-in chains are left out, as in a
            // live payload; `trace` adds kube-proxy's standard ones.
            Which::Applied => inner.applied.get(&family).map(|(model, config, dispatch)| {
                let options = RenderOptions {
                    dispatch: *dispatch,
                    ..RenderOptions::default()
                };
                render(model, config, &options).text
            }),
            Which::Failed => inner
                .failed
                .get(&family)
                .map(|(payload, error)| format!("# {}\n{payload}", error.replace('\n', "\n# "))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RulesInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    #[default]
    Applied,
    Failed,
}

#[derive(Debug, Deserialize)]
struct RulesQuery {
    #[serde(default = "default_family")]
    family: u8,
    #[serde(default)]
    which: Which,
}

fn default_family() -> u8 {
    4
}

type DebugState = (Arc<Metrics>, Arc<RulesLog>);

/// `/metrics` and `/debug/rules?family=4|6&which=applied|failed`, and what
/// else kube-proxy's metrics server answers: `/proxyMode`, `/healthz` and
/// `/configz` (`configz`, the JSON of [`crate::kube_proxy_config::configz`]).
pub fn router(metrics: Arc<Metrics>, rules: Arc<RulesLog>, configz: String) -> Router {
    let configz: Arc<str> = configz.into();
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/debug/rules", get(debug_rules))
        // `curl localhost:10249/proxyMode`, as the Kubernetes docs tell
        // people to check which mode the proxy runs in.
        .route("/proxyMode", get(|| async { plain_text("iptables") }))
        // kube-proxy's metrics server has the generic liveness check of
        // every Kubernetes component, with no checks but "ping".
        .route("/healthz", get(generic_healthz))
        .route("/healthz/ping", get(|| async { plain_text("ok") }))
        .route(
            "/configz",
            get(move || async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    configz.to_string(),
                )
            }),
        )
        .fallback(crate::health::go_not_found)
        .with_state((metrics, rules))
}

fn plain_text(text: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        text,
    )
        .into_response()
}

async fn generic_healthz(Query(query): Query<BTreeMap<String, String>>) -> Response {
    if query.contains_key("verbose") {
        plain_text("[+]ping ok\nhealthz check passed\n")
    } else {
        plain_text("ok")
    }
}

async fn metrics_text(State((metrics, _)): State<DebugState>) -> Response {
    // Off the async workers: the nfacct counters are read by a program.
    let Ok(text) = tokio::task::spawn_blocking(move || metrics.encode()).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn debug_rules(
    State((_, rules)): State<DebugState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(LocalAddr(local)): Extension<LocalAddr>,
    Query(query): Query<RulesQuery>,
) -> Response {
    if !may_read_rules(peer.ip(), local.ip()) {
        return (
            StatusCode::FORBIDDEN,
            "/debug/rules answers only clients on this node\n",
        )
            .into_response();
    }
    match rules.get(query.family, query.which) {
        Some(text) => text.into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no {:?} IPv{} payload yet\n", query.which, query.family).to_lowercase(),
        )
            .into_response(),
    }
}

/// The rules are the whole inventory of Services and endpoints: they are for
/// this node only (SPEC 2.4), even when /metrics is served to the network.
/// A client is on this node when it comes from loopback, or from the very
/// address it connected to (`trace --debug-address <node IP>:10249` on the
/// node). (An IPv4 client of a `[::]` listener shows as `::ffff:a.b.c.d`.)
fn may_read_rules(peer: IpAddr, local: IpAddr) -> bool {
    let peer = peer.to_canonical();
    peer.is_loopback() || peer == local.to_canonical()
}

/// GETs `path` from the agent's debug server at `address` (`host:port`).
pub async fn fetch(address: &str, path: &str) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(header::HOST, address)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        anyhow::bail!("{path}: HTTP {status}: {}", text.trim());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeInfo;

    #[test]
    fn only_clients_on_this_node_may_read_the_rules() {
        let node: IpAddr = "10.0.0.5".parse().unwrap();
        for allowed in [
            "127.0.0.1",
            "127.0.0.53",
            "::1",
            "::ffff:127.0.0.1",
            "10.0.0.5",
            "::ffff:10.0.0.5",
        ] {
            assert!(may_read_rules(allowed.parse().unwrap(), node), "{allowed}");
        }
        for refused in ["10.0.0.1", "0.0.0.0", "::ffff:10.0.0.1", "fd00::1"] {
            assert!(!may_read_rules(refused.parse().unwrap(), node), "{refused}");
        }
    }

    #[tokio::test]
    async fn the_last_applied_and_failed_payloads_are_served() {
        let metrics = Arc::new(Metrics::new());
        let rules = Arc::new(RulesLog::default());
        let empty = Model {
            family: IpFamily::V4,
            node: NodeInfo::named("n"),
            service_ports: Vec::new(),
        };
        rules.applied(
            IpFamily::V4,
            Arc::new(empty),
            RenderConfig::new(IpFamily::V4),
            Dispatch::Buckets,
        );
        rules.failed(IpFamily::V4, "*nat\n-A BAD\nCOMMIT\n", "line 2 failed");
        // A failure leaves the applied model, which the health servers follow.
        assert!(rules.applied_model(IpFamily::V4).is_some());
        assert!(rules.applied_model(IpFamily::V6).is_none());
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        tokio::spawn(crate::serve::serve(
            listener,
            router(metrics, rules, "{\"kubeproxy.config.k8s.io\":{}}".into()),
            crate::serve::ConnectionBudget::default(),
        ));
        let applied = fetch(&address, "/debug/rules?family=4").await.unwrap();
        assert!(
            applied.contains("*nat\n") && applied.contains(":KUBE-SERVICES - [0:0]"),
            "{applied}"
        );
        assert!(
            applied.contains(":KUBE-SVC-0BUCKET-63 - [0:0]"),
            "rendered with the applied layout: {applied}"
        );
        assert_eq!(
            fetch(&address, "/debug/rules?family=4&which=failed")
                .await
                .unwrap(),
            "# line 2 failed\n*nat\n-A BAD\nCOMMIT\n"
        );
        let missing = fetch(&address, "/debug/rules?family=6").await.unwrap_err();
        assert!(missing.to_string().contains("404"), "{missing}");
        let metrics = fetch(&address, "/metrics").await.unwrap();
        assert!(metrics.contains("kubeproxy_sync_proxy_rules_service_changes_total"));
        // What kube-proxy's metrics server answers beside /metrics.
        assert_eq!(fetch(&address, "/proxyMode").await.unwrap(), "iptables");
        assert_eq!(fetch(&address, "/healthz").await.unwrap(), "ok");
        assert_eq!(fetch(&address, "/healthz/ping").await.unwrap(), "ok");
        assert!(
            fetch(&address, "/healthz?verbose")
                .await
                .unwrap()
                .ends_with("healthz check passed\n")
        );
        assert_eq!(
            fetch(&address, "/configz").await.unwrap(),
            "{\"kubeproxy.config.k8s.io\":{}}"
        );
    }
}

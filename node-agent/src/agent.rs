//! `causeway-agent run`: watch Services, EndpointSlices and this Node through
//! the API server and keep this node's rules in sync.
//!
//! Three reflectors fill in-memory caches; nothing is applied before all three
//! have listed once, because a payload built from a half-filled cache would
//! REJECT traffic to Services that merely have not arrived yet. Each sync
//! builds the model from the caches, renders one payload per IP family and
//! applies it with `iptables-restore --noflush --wait`: chains we declare are
//! replaced atomically, nothing is flushed first, so traffic never sees an
//! empty ruleset, not even across an agent restart.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::addr::IpFamily;
use crate::config::ProxyOptions;
use crate::conntrack;
use crate::debug::{self, RulesLog};
use crate::health::{
    self, BindFailure, CheckAddresses, ProxyHealth, ServiceHealth, ServiceHealthServers,
};
use crate::metrics::Metrics;
use crate::model::cache::ModelCache;
use crate::model::{Issue, Model, NodeInfo, Protocol, ServicePortName};
use crate::netfilter::{Backend, Netfilter, NftablesLeftovers};
use crate::rules::{
    self, Dispatch, NodePortAddresses, Partial, RenderConfig, RenderOptions, RuleCounts,
};
use crate::serve::{self, ConnectionBudget};
use crate::sysctl;
use causeway_telemetry::listen::listen;

/// A full sync also runs this often, whatever else happens (kube-proxy's
/// `FullSyncPeriod`): it repairs rules another program deleted without
/// touching the canary chains.
const FULL_SYNC_PERIOD: Duration = Duration::from_secs(3600);

/// Services kube-proxy does not program either: another proxy's, and
/// headless ones (the model ignores them too; the selector saves the memory).
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

const SERVICE_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// What `run` needs besides the API client.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub node_name: String,
    pub options: ProxyOptions,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub backend: Backend,
    /// Where `/healthz` and `/livez` answer (kube-proxy: 0.0.0.0:10256);
    /// `None`: nowhere (kube-proxy's `--healthz-port 0`).
    pub healthz_bind_address: Option<String>,
    /// Where `/metrics` and `/debug/rules` answer (kube-proxy:
    /// 127.0.0.1:10249); `None`: nowhere.
    pub metrics_bind_address: Option<String>,
    /// What went wrong before the API could be reached (conntrack defaults
    /// out of reach): each becomes a Warning event on the Node.
    pub start_warnings: Vec<String>,
    /// The settings as kube-proxy's `/configz` shows them (JSON).
    pub configz: String,
}

/// State the sync loop shares with the HTTP servers.
pub struct Shared {
    pub health: Arc<ProxyHealth>,
    pub metrics: Arc<Metrics>,
    pub rules: Arc<RulesLog>,
    /// Connection slots shared by all of the agent's HTTP servers.
    pub connections: ConnectionBudget,
    /// Trigger times of EndpointSlice changes not yet applied; a sync that
    /// applies them turns each into a network programming latency.
    triggers: std::sync::Mutex<Vec<(IpFamily, Timestamp)>>,
    started: Timestamp,
}

impl Shared {
    fn new(sync_period: Duration, metrics: Arc<Metrics>) -> Self {
        Shared {
            health: Arc::new(ProxyHealth::new(sync_period)),
            metrics,
            rules: Arc::new(RulesLog::default()),
            connections: ConnectionBudget::default(),
            triggers: std::sync::Mutex::default(),
            started: Timestamp::now(),
        }
    }

    /// Notes a slice's trigger time when it is new to us. Changes from
    /// before this agent started are not its latency, and a re-list shows
    /// the same value again, so neither counts.
    fn note_trigger(&self, slice: &EndpointSlice, seen: &mut HashMap<String, String>) {
        let (Some(uid), Some(trigger)) = (
            slice.metadata.uid.as_ref(),
            slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION)),
        ) else {
            return;
        };
        if seen.get(uid) == Some(trigger) {
            return;
        }
        seen.insert(uid.clone(), trigger.clone());
        let Some(family) = IpFamily::of_address_type(&slice.address_type) else {
            return;
        };
        if let Ok(at) = trigger.parse::<Timestamp>()
            && at >= self.started
        {
            self.lock_triggers().push((family, at));
        }
    }

    fn lock_triggers(&self) -> std::sync::MutexGuard<'_, Vec<(IpFamily, Timestamp)>> {
        self.triggers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A watch event arrived: the next sync must apply it. `object` is false
    /// for a re-list's start and end markers, which wake the sync loop but
    /// are no object's change.
    fn queued(&self, kind: ChangeKind, object: bool) {
        self.health.queued();
        self.metrics
            .queued_at(Timestamp::now().as_millisecond() as f64 / 1000.0);
        if !object {
            return;
        }
        // The pending counts live in the gauges that export them.
        match kind {
            ChangeKind::Service => {
                self.metrics.service_changes_pending.inc();
                self.metrics.service_changes.inc();
            }
            ChangeKind::Endpoints => {
                self.metrics.endpoint_changes_pending.inc();
                self.metrics.endpoint_changes.inc();
            }
            ChangeKind::Node => {}
        }
    }

    /// A sync is taking every pending change.
    fn take_pending(&self) {
        self.metrics.service_changes_pending.set(0);
        self.metrics.endpoint_changes_pending.set(0);
    }
}

#[derive(Debug, Clone, Copy)]
enum ChangeKind {
    Service,
    Endpoints,
    Node,
}

/// The caches the model is built from.
#[derive(Clone)]
struct Caches {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
}

/// Watches the API and syncs until the process is stopped. Rules stay in
/// place on exit: the next agent replaces them atomically. `metrics` is
/// where the client counts its requests too.
pub async fn run(client: Client, config: RunConfig, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::new(config.sync_period, metrics));
    // The servers start first: a probe during the cache sync should get an
    // answer (unhealthy until the first sync), not a refused connection.
    serve_in_background(
        config.healthz_bind_address.as_deref(),
        health::proxy_router(shared.health.clone(), shared.metrics.clone()),
        "health",
        &shared.connections,
    )
    .await?;
    serve_in_background(
        config.metrics_bind_address.as_deref(),
        debug::router(
            shared.metrics.clone(),
            shared.rules.clone(),
            config.configz.clone(),
        ),
        "metrics",
        &shared.connections,
    )
    .await?;
    shared.health.queued();
    let changed = Arc::new(Changes::default());
    let (services, services_writer) = reflector::store();
    let (slices, slices_writer) = reflector::store();
    let (nodes, nodes_writer) = reflector::store();

    let service_watch = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_SELECTOR),
    );
    let slice_watch = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    );
    let node_watch = watcher(
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", config.node_name)),
    );
    tokio::spawn(drive(
        ChangeKind::Service,
        reflector::reflector(
            services_writer,
            service_watch.default_backoff().modify(|s: &mut Service| {
                slim(s);
                // The endpoints are in the EndpointSlices; the selector is
                // the EndpointSlice controller's business.
                if let Some(spec) = s.spec.as_mut() {
                    spec.selector = None;
                }
            }),
        ),
        changed.clone(),
        shared.clone(),
    ));
    tokio::spawn(drive(
        ChangeKind::Endpoints,
        reflector::reflector(
            slices_writer,
            slice_watch.default_backoff().modify({
                let shared = shared.clone();
                let mut seen = HashMap::new();
                move |slice: &mut EndpointSlice| {
                    shared.note_trigger(slice, &mut seen);
                    slim(slice);
                    // Which pod an endpoint is (targetRef) is never used here.
                    for endpoint in &mut slice.endpoints {
                        endpoint.target_ref = None;
                        endpoint.deprecated_topology = None;
                    }
                }
            }),
        ),
        changed.clone(),
        shared.clone(),
    ));
    tokio::spawn(drive(
        ChangeKind::Node,
        reflector::reflector(nodes_writer, node_watch.default_backoff()),
        changed.clone(),
        shared.clone(),
    ));

    info!("waiting for the Service, EndpointSlice and Node caches to sync");
    services.wait_until_ready().await?;
    slices.wait_until_ready().await?;
    nodes.wait_until_ready().await?;
    info!(
        services = services.state().len(),
        endpoint_slices = slices.state().len(),
        "caches synced"
    );

    let caches = Caches {
        services,
        slices,
        nodes,
    };
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "causeway-agent".into(),
            instance: Some(config.node_name.clone()),
        },
    );
    // As kube-proxy does at start, where `kubectl describe node` shows
    // when the node's proxy (re)started; in the background, as kube-proxy's
    // are, so that a slow apiserver does not hold back the first sync.
    tokio::spawn({
        let (recorder, caches, node) = (recorder.clone(), caches.clone(), config.node_name.clone());
        let warnings = config.start_warnings.clone();
        async move {
            publish_event(
                &recorder,
                &caches,
                ("Node", None, &node),
                EventType::Normal,
                "Starting",
                "Start",
                format!(
                    "Starting causeway-agent {} (kube-proxy's iptables mode)",
                    env!("CARGO_PKG_VERSION")
                ),
            )
            .await;
            for warning in &warnings {
                publish_start_warning(&recorder, &caches, &node, warning).await;
            }
        }
    });
    let mut syncer = Syncer::new(config.clone(), shared.clone());
    let mut health_checks =
        ServiceHealthServers::new(shared.health.clone(), shared.connections.clone());
    let mut reported_bind_failures = BTreeSet::new();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        // Before the caches are read: a change counted after this is one
        // this sync may have missed.
        let seen = changed.seen();
        let started = Instant::now();
        let outcome = tokio::task::block_in_place(|| syncer.sync(&caches));
        for issue in &outcome.new_issues {
            publish_issue(&recorder, &caches, issue).await;
        }
        if let Some(sign) = &outcome.kube_proxy_seen {
            publish_warning(
                &recorder,
                &caches,
                ("Node", None, &config.node_name),
                "KubeProxyRunning",
                "Sync",
                format!("{KUBE_PROXY_BESIDE} ({sign}); causeway-agent restores its rules, and both keep rewriting them until kube-proxy stops"),
            )
            .await;
        }
        let failures = health_checks
            .sync(outcome.service_checks, &outcome.check_addresses)
            .await;
        let mut still_failing = BTreeSet::new();
        for failure in failures {
            let key = (
                failure.port,
                failure.service.namespace.clone(),
                failure.service.name.clone(),
            );
            if !reported_bind_failures.contains(&key) {
                publish_bind_failure(&recorder, &caches, &failure).await;
            }
            still_failing.insert(key);
        }
        reported_bind_failures = still_failing;
        // A failed restore is retried soon; otherwise wait for a change, or
        // for the sync period that bounds how stale the rules can get.
        let idle = if outcome.failed {
            config.min_sync_period.max(Duration::from_secs(1))
        } else {
            syncer.until_next_check()
        };
        tokio::select! {
            _ = changed.after(seen, Instant::now() + idle) => {}
            _ = &mut shutdown => {
                info!("stopping; the rules stay in place");
                return Ok(());
            }
        }
        // Batch bursts: no two syncs closer than --min-sync-period.
        let next = started + config.min_sync_period;
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = &mut shutdown => {
                info!("stopping; the rules stay in place");
                return Ok(());
            }
        }
    }
}

/// Binds `address` and serves `router` in the background.
async fn serve_in_background(
    address: Option<&str>,
    router: axum::Router,
    what: &str,
    connections: &ConnectionBudget,
) -> anyhow::Result<()> {
    let Some(address) = address else {
        info!("the {what} server is off");
        return Ok(());
    };
    let listener = listen_on(address).map_err(|e| {
        let mut message = format!("binding the {what} server to {address}: {e}");
        if e.kind() == std::io::ErrorKind::AddrInUse {
            // kube-proxy listens on the same ports (10256, 10249).
            message.push_str(
                ". Is kube-proxy (or another causeway-agent) still running on this \
                     node? Stop it first: two proxies would rewrite the same chains \
                     (docs/agent.md, \"Replacing kube-proxy\")",
            );
        }
        anyhow::anyhow!(message)
    })?;
    info!(address = %address, "serving {what}");
    tokio::spawn(serve::serve(listener, router, connections.clone()));
    Ok(())
}

/// Listens on `address`: `IP:port`, as kube-proxy's flags take, or else a
/// name looked up, whose addresses are tried in turn.
fn listen_on(address: &str) -> std::io::Result<tokio::net::TcpListener> {
    use std::net::ToSocketAddrs as _;
    if let Ok(parsed) = address.parse() {
        return listen(parsed, false);
    }
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address");
    for resolved in address.to_socket_addrs()? {
        match listen(resolved, false) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Makes the nfacct counters the rules count into again if they are gone (an
/// `nfacct del`, another program's cleanup): a restore that counts into a
/// missing counter fails, and the full sync that follows a failure comes here.
fn ensure_counters(accounting: crate::rules::Accounting) {
    for (wanted, name) in [
        (
            accounting.invalid_dropped,
            crate::nfacct::CT_STATE_INVALID_DROPPED,
        ),
        (
            accounting.localhost_nodeports,
            crate::nfacct::LOCALHOST_NODEPORTS_ACCEPTED,
        ),
    ] {
        if wanted && let Err(e) = crate::nfacct::ensure(name) {
            error!(counter = name, error = %e, "cannot create an nfacct counter the rules count into");
        }
    }
}

/// Deletes the tables kube-proxy's nftables mode left, as kube-proxy does when
/// it starts in iptables mode: their chains would steer Service packets
/// beside ours. Called once our rules are in place, so the node is never
/// without Service rules in between. Best effort, as in kube-proxy: a
/// failure is logged.
fn remove_kube_proxy_nftables_tables() {
    match crate::netfilter::remove_kube_proxy_nftables_tables() {
        Ok(NftablesLeftovers::Deleted(tables)) if !tables.is_empty() => warn!(
            tables = tables.join(", "),
            "deleted the tables of kube-proxy's nftables mode, as kube-proxy does when it starts in iptables mode"
        ),
        Ok(NftablesLeftovers::Deleted(_)) => {}
        Ok(NftablesLeftovers::NoNft) => warn!(
            "no nft program: tables kube-proxy's nftables mode may have left (ip and ip6 kube-proxy) cannot be looked for"
        ),
        Err(e) => error!(
            error = %e,
            "cannot delete the tables kube-proxy's nftables mode left; if they hold rules they steer Service packets beside ours"
        ),
    }
}

/// Drops what the agent never reads before an object enters a cache: the
/// managed-fields bookkeeping and kubectl's last-applied copy are often
/// larger than the rest of a Service or EndpointSlice.
fn slim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The watchers' changes, counted, and the sync loop's wake-up. The count
/// tells a change the last sync already read (its wake-up left behind
/// because it came while the loop was busy) from one it did not. Only the
/// latter starts a sync: an empty one would hold the next real change back
/// by `--min-sync-period`.
#[derive(Default)]
struct Changes {
    count: AtomicU64,
    wake: Notify,
}

impl Changes {
    fn note(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn seen(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits for a change counted after `seen`; false if `deadline` came first.
    async fn after(&self, seen: u64, deadline: Instant) -> bool {
        loop {
            let woken = self.wake.notified();
            if self.seen() != seen {
                return true;
            }
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(deadline.into()) => return false,
            }
        }
    }
}

/// Drives one reflector, waking the sync loop on every change.
async fn drive<S, K>(kind: ChangeKind, stream: S, changed: Arc<Changes>, shared: Arc<Shared>)
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let what = match kind {
        ChangeKind::Service => "Services",
        ChangeKind::Endpoints => "EndpointSlices",
        ChangeKind::Node => "the Node",
    };
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let object = matches!(
                    event,
                    watcher::Event::Apply(_)
                        | watcher::Event::Delete(_)
                        | watcher::Event::InitApply(_)
                );
                shared.queued(kind, object);
                changed.note();
            }
            // The backoff retries; say why the cache may be stale meanwhile.
            Err(e) => warn!(error = %e, "watching {what} failed; retrying"),
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The uid of a cached object. An Event's reference needs it: `kubectl
/// describe` selects the Events of an object by uid as well as by name.
fn uid_of(caches: &Caches, kind: &str, namespace: Option<&str>, name: &str) -> Option<String> {
    fn find<K>(store: &Store<K>, namespace: Option<&str>, name: &str) -> Option<String>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        let mut key = reflector::ObjectRef::<K>::new(name);
        if let Some(namespace) = namespace {
            key = key.within(namespace);
        }
        store.get(&key).and_then(|o| o.meta().uid.clone())
    }
    match kind {
        "Service" => find(&caches.services, namespace, name),
        "EndpointSlice" => find(&caches.slices, namespace, name),
        "Node" => find(&caches.nodes, None, name),
        _ => None,
    }
}

/// What a sign of kube-proxy in our rules means.
const KUBE_PROXY_BESIDE: &str = "kube-proxy is running on this node too: it rewrites the Service rules the agent writes; stop it (docs/agent.md, \"Replacing kube-proxy\")";

/// Publishes a Warning event about the `kind` object `namespace`/`name` (its
/// uid from the caches); a failure to publish is logged.
async fn publish_warning(
    recorder: &Recorder,
    caches: &Caches,
    object: (&'static str, Option<&str>, &str),
    reason: &str,
    action: &str,
    note: String,
) {
    publish_event(
        recorder,
        caches,
        object,
        EventType::Warning,
        reason,
        action,
        note,
    )
    .await;
}

async fn publish_event(
    recorder: &Recorder,
    caches: &Caches,
    (kind, namespace, name): (&'static str, Option<&str>, &str),
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let api_version = match kind {
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => "v1",
    };
    let reference = ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        namespace: namespace.map(str::to_string),
        name: Some(name.to_string()),
        uid: uid_of(caches, kind, namespace, name),
        ..ObjectReference::default()
    };
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        warn!(kind, name, reason, error = %e, "could not publish an event");
    }
}

/// A Warning event on the object the agent had to skip (or partly skip).
async fn publish_issue(recorder: &Recorder, caches: &Caches, issue: &Issue) {
    let object = &issue.object;
    publish_warning(
        recorder,
        caches,
        (object.kind, object.namespace.as_deref(), &object.name),
        "InvalidObject",
        "Sync",
        format!(
            "{}: {} (skipped by causeway-agent)",
            issue.field, issue.message
        ),
    )
    .await;
}

/// A Warning event on a Service whose health-check port could not be opened.
async fn publish_bind_failure(recorder: &Recorder, caches: &Caches, failure: &BindFailure) {
    warn!(port = failure.port, error = %failure.message, "cannot serve a Service health check");
    publish_warning(
        recorder,
        caches,
        (
            "Service",
            Some(&failure.service.namespace),
            &failure.service.name,
        ),
        "HealthCheckBindFailed",
        "Serve",
        format!(
            "cannot serve the health check on healthCheckNodePort {}: {}",
            failure.port, failure.message
        ),
    )
    .await;
}

/// A Warning event on this Node about the agent's start, where `kubectl
/// describe node` shows it (kube-proxy, too, reports there the conntrack
/// limits it could not raise).
async fn publish_start_warning(recorder: &Recorder, caches: &Caches, node: &str, warning: &str) {
    publish_warning(
        recorder,
        caches,
        ("Node", None, node),
        "ConntrackNotTuned",
        "Start",
        warning.to_string(),
    )
    .await;
}

/// What one sync did, for the loop.
#[derive(Debug, Default)]
struct SyncOutcome {
    /// Problems not reported before (they become events once each).
    new_issues: Vec<Issue>,
    failed: bool,
    /// The health-check servers the Services ask for: for a family whose
    /// restore failed, as its last applied model says (the one `RulesLog`
    /// keeps; kube-proxy leaves them alone then): the rules they answer for
    /// still stand.
    service_checks: BTreeMap<u16, ServiceHealth>,
    /// Where they listen (`--nodeport-addresses`).
    check_addresses: CheckAddresses,
    /// kube-proxy's sign in our rules, when this sync's check found one.
    kube_proxy_seen: Option<String>,
}

/// Per-family state between syncs.
struct FamilyState {
    netfilter: Netfilter,
    /// Per-service nat chains in the last applied payload; `None` before
    /// the first applied payload and after a failed restore (the next sync
    /// then reads what exists).
    applied_chains: Option<Vec<String>>,
    /// When reading what exists last failed: chains from before (an earlier
    /// run's, kube-proxy's) may be left. A sync reads again once per
    /// `--sync-period` (a read of a large nat table takes seconds), and the
    /// first whose read succeeds is a full sync that deletes them.
    chains_unread_since: Option<Instant>,
    /// The nat and filter rules the last applied payload left, the base of
    /// the next partial sync's counts.
    applied_totals: RuleCounts,
    /// The model per Service, rebuilt only where an object changed.
    model_cache: ModelCache,
    /// The model of the last applied payload: the base of partial syncs and
    /// of the conntrack cleanup. `None` forces a full sync.
    applied_model: Option<Arc<Model>>,
    /// The configuration it was rendered with; a change forces a full sync.
    applied_config: Option<RenderConfig>,
    /// When the last full sync was applied.
    last_full: Option<Instant>,
    /// When the canary chains were last known to be there.
    last_check: Option<Instant>,
}

/// Builds and applies the payloads; remembers what it applied.
struct Syncer {
    config: RunConfig,
    shared: Arc<Shared>,
    families: Vec<FamilyState>,
    reported: BTreeSet<String>,
    route_localnet_set: bool,
    /// Whether kube-proxy's nftables-mode tables were looked for: once,
    /// after the first sync that applied everything.
    nftables_leftovers_checked: bool,
    /// Whether the nfacct counters are known to be there: `run` has just
    /// made them, so the first full sync need not look again.
    counters_made: bool,
    /// Each family's last `--nodeport-addresses`, resolved: where the
    /// Service health checks listen.
    nodeport_limits: BTreeMap<IpFamily, NodePortAddresses>,
}

impl Syncer {
    fn new(config: RunConfig, shared: Arc<Shared>) -> Self {
        Syncer {
            config,
            shared,
            families: Vec::new(),
            reported: BTreeSet::new(),
            route_localnet_set: false,
            nftables_leftovers_checked: false,
            counters_made: true,
            nodeport_limits: BTreeMap::new(),
        }
    }

    /// Until the periodic check of our rules is due (at most the sync
    /// period): a sync caused by a change does not put the check off.
    fn until_next_check(&self) -> Duration {
        self.families
            .iter()
            .filter_map(|f| f.last_check)
            .map(|t| self.config.sync_period.saturating_sub(t.elapsed()))
            .min()
            .unwrap_or(self.config.sync_period)
    }

    fn sync(&mut self, caches: &Caches) -> SyncOutcome {
        let started = Instant::now();
        let started_at = Timestamp::now();
        self.shared.take_pending();
        let triggers = std::mem::take(&mut *self.shared.lock_triggers());
        let mut issues = Vec::new();
        let node_object = caches.nodes.state().first().cloned();
        self.shared
            .health
            .set_node_eligible(node_object.as_deref().is_none_or(health::node_eligible));
        let node = match node_object.as_deref() {
            Some(node) => NodeInfo::from_node(node, &mut issues),
            None => {
                warn!(node = %self.config.node_name, "no Node object by this name; using --node-ip only");
                NodeInfo::named(self.config.node_name.clone())
            }
        };
        let services = caches.services.state();
        let slices = caches.slices.state();

        for family in wanted_families(&self.config.options, &node) {
            if !self.families.iter().any(|f| f.netfilter.family == family) {
                self.families.push(FamilyState {
                    netfilter: Netfilter::new(family, self.config.backend),
                    applied_chains: None,
                    chains_unread_since: None,
                    applied_totals: RuleCounts::default(),
                    model_cache: ModelCache::new(family),
                    applied_model: None,
                    applied_config: None,
                    last_full: None,
                    last_check: None,
                });
            }
        }

        let families: Vec<IpFamily> = self.families.iter().map(|f| f.netfilter.family).collect();
        self.shared.metrics.set_families(&families);
        let mut failed = false;
        let mut models = Vec::new();
        let mut rule_counts: BTreeMap<(IpFamily, &str), usize> = BTreeMap::new();
        let mut rules_written: BTreeMap<(IpFamily, &str), usize> = families
            .iter()
            .flat_map(|f| ["filter", "nat", "mangle"].map(|table| ((*f, table), 0)))
            .collect();
        let mut stale_flows = Vec::new();
        // Per family, as kube-proxy's per-family proxiers time their syncs:
        // when its part began, and whether it applied a full payload or a
        // partial one. A part ends where the next begins.
        let mut timings: Vec<(IpFamily, Instant, Option<bool>)> = Vec::new();
        let mut counters_checked = false;
        let mut kube_proxy_seen = None;
        for state in &mut self.families {
            let family = state.netfilter.family;
            // The first part also carries the reading of the caches above.
            let began = if timings.is_empty() {
                started
            } else {
                Instant::now()
            };
            timings.push((family, began, None));
            let model_started = Instant::now();
            let (model, model_issues) = state.model_cache.build(&services, &slices, &node);
            let model_ms = model_started.elapsed().as_millis() as u64;
            issues.extend(model_issues);
            let render_config = match self.config.options.render_config(family, &node) {
                Ok(c) => c,
                Err(e) => {
                    error!(family = ?family, error = %e, "cannot configure the rules; not syncing this family");
                    failed = true;
                    models.extend(self.shared.rules.applied_model(family));
                    continue;
                }
            };
            self.nodeport_limits
                .insert(family, render_config.nodeport_addresses.clone());
            if render_config.localhost_nodeports_effective() && !self.route_localnet_set {
                match sysctl::ensure(sysctl::ROUTE_LOCALNET, "1") {
                    Ok(_) => self.route_localnet_set = true,
                    Err(e) => {
                        warn!(error = %e, "cannot set net.ipv4.conf.all.route_localnet=1; NodePorts on 127.0.0.1 will not answer")
                    }
                }
            }
            // Once per --sync-period: has another program changed our rules
            // (a canary chain deleted, a chain flushed, a jump gone, or
            // kube-proxy running beside us)? Then the full sync reads what
            // exists again, so that it also deletes what that program added.
            let mut damaged = false;
            if let Some(applied) = state.applied_model.as_deref()
                && state
                    .last_check
                    .is_some_and(|t| t.elapsed() >= self.config.sync_period)
            {
                state.last_check = Some(Instant::now());
                if let Some(damage) = state.netfilter.damage(
                    &rules::never_empty_chains(&render_config),
                    &rules::builtin_jumps(&render_config),
                    rules::kube_proxy_probe(applied).as_deref(),
                    rules::writes_hairpin_rules(applied),
                ) {
                    if damage.kube_proxy {
                        error!(family = ?family, sign = %damage.what, "{KUBE_PROXY_BESIDE}; restoring our rules with a full sync");
                        kube_proxy_seen = Some(damage.what.clone());
                    } else {
                        warn!(family = ?family, damage = %damage.what, "another program changed our rules; restoring them with a full sync");
                    }
                    self.shared.metrics.rules_damaged.inc();
                    damaged = true;
                }
            }
            // Full: at start, after a failure, when the configuration or the
            // dispatch layout changed, when another program damaged our rules
            // (above), and once per FULL_SYNC_PERIOD for damage the check
            // does not see. Otherwise only what changed is written.
            let periodic = state
                .last_full
                .is_some_and(|t| t.elapsed() >= FULL_SYNC_PERIOD);
            // What exists is read at start, after a failed restore, after
            // damage and hourly (so chains another program left go too), and
            // once per --sync-period while reading fails.
            let was_unread = state.chains_unread_since.is_some();
            let read_again = damaged
                || periodic
                || state
                    .chains_unread_since
                    .is_some_and(|t| t.elapsed() >= self.config.sync_period);
            let previous: Cow<'_, [String]> = match &state.applied_chains {
                Some(chains) if !read_again => Cow::Borrowed(chains),
                applied => match state.netfilter.existing_service_chains() {
                    Ok(chains) => {
                        state.chains_unread_since = None;
                        Cow::Owned(chains)
                    }
                    Err(e) => {
                        warn!(family = ?family, error = %e, "cannot list the existing chains; stale ones stay until a sync can (tried again each --sync-period)");
                        state.chains_unread_since = Some(Instant::now());
                        applied
                            .as_deref()
                            .map_or(Cow::Owned(Vec::new()), Cow::Borrowed)
                    }
                },
            };
            // The layout the applied chains show (after a restart, the one
            // netfilter holds); a change of layout is a full sync.
            let applied_dispatch = Dispatch::of_chains(&previous);
            let dispatch = Dispatch::for_model(&model, applied_dispatch);
            let full = state.applied_model.is_none()
                || state.applied_config.as_ref() != Some(&render_config)
                || applied_dispatch != dispatch
                || state.last_full.is_none()
                || damaged
                || periodic
                // The chains could be read at last: delete the stale ones.
                || (was_unread && state.chains_unread_since.is_none());
            // Once per sync: the counters are the namespace's, not a family's.
            if full && !counters_checked {
                counters_checked = true;
                if !std::mem::take(&mut self.counters_made) {
                    ensure_counters(render_config.accounting);
                }
            }
            let changed: BTreeSet<(ServicePortName, Protocol)> = match (&state.applied_model, full)
            {
                (Some(before), false) => rules::changed_ports(before, &model),
                _ => BTreeSet::new(),
            };
            if !full && changed.is_empty() && state.applied_model.as_deref() == Some(&model) {
                debug!(family = ?family, "nothing changed");
                models.push(Arc::new(model));
                continue;
            }
            let jumps = if full {
                state
                    .netfilter
                    .missing_jumps(&rules::builtin_jumps(&render_config))
            } else {
                Vec::new()
            };
            let payload = rules::render(
                &model,
                &render_config,
                &RenderOptions {
                    builtin_jumps: &jumps,
                    delete_nat_chains: &previous,
                    partial: match (&state.applied_model, &state.applied_chains) {
                        (Some(model), Some(chains)) if !full => Some(Partial {
                            only: &changed,
                            previous: model,
                            applied_chains: chains,
                            applied_totals: state.applied_totals,
                        }),
                        _ => None,
                    },
                    dispatch,
                },
            );
            if let Some(timing) = timings.last_mut() {
                timing.2 = Some(full);
            }
            self.shared
                .metrics
                .restore_bytes
                .observe(payload.text.len() as f64);
            let restore_started = Instant::now();
            let restored_result = state.netfilter.restore(&payload.text);
            let restore_ms = restore_started.elapsed().as_millis() as u64;
            match restored_result {
                Ok(()) => {
                    let model = Arc::new(model);
                    self.shared.rules.applied(
                        family,
                        model.clone(),
                        render_config.clone(),
                        dispatch,
                    );
                    // What each table holds now, and what this sync wrote.
                    for (table, held, written) in [
                        ("filter", payload.totals.filter, payload.filter.rules),
                        ("nat", payload.totals.nat, payload.nat.rules),
                        ("mangle", payload.mangle.rules, payload.mangle.rules),
                    ] {
                        *rule_counts.entry((family, table)).or_default() += held;
                        *rules_written.entry((family, table)).or_default() += written;
                    }
                    info!(
                        family = ?family,
                        full,
                        rewritten_service_ports = if full { model.service_ports.len() } else { changed.len() },
                        service_ports = model.service_ports.len(),
                        rebuilt_services = state.model_cache.rebuilt,
                        nat_rules = payload.nat.rules,
                        filter_rules = payload.filter.rules,
                        bytes = payload.text.len(),
                        model_ms,
                        restore_ms,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "synced"
                    );
                    state.applied_chains = Some(payload.service_chains);
                    state.applied_totals = payload.totals;
                    // Only now do the new rules steer fresh packets, so only
                    // now may the stale flows go (after the metrics below).
                    // After a (re)start the previous rules are unknown: every
                    // UDP Service counts as new, whose un-DNATed flows (from
                    // before its rules existed) may go.
                    {
                        let empty = Model {
                            family,
                            node: model.node.clone(),
                            service_ports: Vec::new(),
                        };
                        let previous = state.applied_model.as_deref().unwrap_or(&empty);
                        let stale = conntrack::stale_udp_flows(previous, &model);
                        if !stale.is_empty() {
                            stale_flows.push((family, stale));
                        }
                    }
                    state.applied_model = Some(model.clone());
                    state.applied_config = Some(render_config);
                    if full {
                        state.last_full = Some(Instant::now());
                        state.last_check = state.last_full;
                    }
                    models.push(model);
                }
                Err(e) => {
                    // iptables-restore commits table by table. Refused in
                    // nat, which comes first, nothing was applied; refused
                    // later, nat is new and the rest is not. Either way the
                    // rules stand whole, and the retry, soon, is a full sync
                    // that rewrites every table.
                    error!("{e}");
                    self.shared
                        .rules
                        .failed(family, &payload.text, &e.to_string());
                    self.shared.metrics.count_restore_failure(family, !full);
                    state.applied_chains = None;
                    state.applied_model = None;
                    models.extend(self.shared.rules.applied_model(family));
                    failed = true;
                }
            }
        }

        let loop_end = Instant::now();
        if failed {
            // The changes stay pending: health turns 503 if this persists.
            self.shared.health.queued();
            self.shared.lock_triggers().extend(triggers);
        } else {
            for ((family, table), rules) in &rule_counts {
                self.shared.metrics.set_rules(*family, table, *rules);
            }
            for ((family, table), rules) in &rules_written {
                self.shared
                    .metrics
                    .set_rules_written(*family, table, *rules);
            }
            self.shared.health.updated(started_at, &families);
            if !self.nftables_leftovers_checked {
                self.nftables_leftovers_checked = true;
                remove_kube_proxy_nftables_tables();
            }
            let now = Timestamp::now();
            for family in &families {
                self.shared
                    .metrics
                    .synced(*family, now.as_millisecond() as f64 / 1000.0);
            }
            // A slice of a family this node does not program (an IPv6 one
            // on an IPv4-only node) made no rule here.
            for (family, at) in triggers.into_iter().filter(|(f, _)| families.contains(f)) {
                self.shared.metrics.observe_network_programming(
                    family,
                    now.duration_since(at).as_secs_f64().max(0.0),
                );
            }
        }
        let mut seconds: BTreeMap<IpFamily, f64> = BTreeMap::new();
        for (i, (family, began, _)) in timings.iter().enumerate() {
            let ended = timings.get(i + 1).map_or(loop_end, |next| next.1);
            seconds.insert(*family, ended.duration_since(*began).as_secs_f64());
        }
        // After the metrics, as kube-proxy does: the rules are live already,
        // and the conntrack tool takes its time (counted in its family's sync).
        for (family, stale) in stale_flows {
            let deleting = Instant::now();
            let deleted = conntrack::delete(&stale, family);
            let took = deleting.elapsed().as_secs_f64();
            self.shared
                .metrics
                .observe_conntrack_cleanup(family, deleted, took);
            *seconds.entry(family).or_default() += took;
            debug!(filters = stale.len(), deleted, "deleted stale UDP flows");
        }
        for (family, _, applied) in &timings {
            let elapsed = seconds.get(family).copied().unwrap_or_default();
            self.shared.metrics.observe_sync(*family, elapsed, *applied);
        }
        let model_refs: Vec<&Model> = models.iter().map(|m| m.as_ref()).collect();
        self.shared.metrics.set_no_local_endpoints(&model_refs);
        let service_checks = health::wanted_service_checks(&model_refs);
        // A family whose configuration failed this time keeps its last
        // limits: the health checks do not move for a passing error.
        let nodeport_limits: Vec<(IpFamily, NodePortAddresses)> = families
            .iter()
            .filter_map(|f| Some((*f, self.nodeport_limits.get(f)?.clone())))
            .collect();
        // The node's addresses are read only when some check needs them.
        let check_addresses = if service_checks.is_empty() {
            CheckAddresses::Any
        } else {
            CheckAddresses::of(&nodeport_limits, serve::local_addresses)
        };
        SyncOutcome {
            new_issues: self.remember(issues),
            failed,
            service_checks,
            check_addresses,
            kube_proxy_seen,
        }
    }

    /// Logs every issue, and returns those not reported before; forgets the
    /// ones that went away, so a problem that comes back is reported again.
    fn remember(&mut self, issues: Vec<Issue>) -> Vec<Issue> {
        let current: BTreeSet<String> = issues.iter().map(Issue::to_string).collect();
        let fresh: Vec<Issue> = issues
            .into_iter()
            .filter(|i| !self.reported.contains(&i.to_string()))
            .collect();
        for issue in &fresh {
            warn!("skipped: {issue}");
        }
        debug!(count = current.len(), "objects with problems");
        self.reported = current;
        let mut seen = BTreeSet::new();
        fresh
            .into_iter()
            .filter(|i| seen.insert(i.to_string()))
            .collect()
    }
}

/// The IP families this node proxies: those of its addresses and of the
/// cluster CIDRs; IPv4 when nothing says otherwise.
fn wanted_families(options: &ProxyOptions, node: &NodeInfo) -> Vec<IpFamily> {
    let mut families: Vec<IpFamily> = options
        .node_ips
        .iter()
        .chain(&options.primary_ip)
        .chain(&node.internal_ips)
        .map(IpFamily::of)
        .chain(
            options
                .cluster_cidrs
                .iter()
                .filter_map(|c| crate::addr::parse_cidr(c))
                .map(|c| c.family()),
        )
        .collect();
    families.sort_by_key(|f| matches!(f, IpFamily::V6));
    families.dedup();
    if families.is_empty() {
        families.push(IpFamily::V4);
    }
    families
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DetectLocalMode;
    use crate::model;
    use std::net::IpAddr;

    #[tokio::test]
    async fn a_change_the_last_sync_read_does_not_wake_the_loop() {
        let changes = Changes::default();
        // Counted (and its wake-up left behind) before the sync read the caches.
        changes.note();
        let seen = changes.seen();
        let waited = Instant::now();
        assert!(
            !changes
                .after(seen, Instant::now() + Duration::from_millis(50))
                .await
        );
        assert!(waited.elapsed() >= Duration::from_millis(50));

        // One counted after that wakes it at once, wake-up used or not.
        changes.note();
        assert!(
            changes
                .after(seen, Instant::now() + Duration::from_secs(5))
                .await
        );
        assert!(
            changes
                .after(seen, Instant::now() + Duration::from_secs(5))
                .await
        );
    }

    #[tokio::test]
    async fn a_change_while_waiting_wakes_the_loop() {
        let changes = Arc::new(Changes::default());
        let seen = changes.seen();
        let noter = {
            let changes = changes.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                changes.note();
            })
        };
        let waited = Instant::now();
        assert!(
            changes
                .after(seen, Instant::now() + Duration::from_secs(5))
                .await
        );
        assert!(waited.elapsed() < Duration::from_secs(5));
        noter.await.unwrap();
    }

    fn options(node_ips: &[&str], cidrs: &[&str]) -> ProxyOptions {
        ProxyOptions {
            node_ips: node_ips
                .iter()
                .map(|s| s.parse::<IpAddr>().unwrap())
                .collect(),
            cluster_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            detect_local_mode: DetectLocalMode::ClusterCidr,
            pod_bridge_interface: None,
            pod_interface_name_prefix: None,
            masquerade_all: false,
            masquerade_bit: 14,
            nodeport_addresses: Vec::new(),
            localhost_nodeports: true,
            random_fully: true,
            primary_ip: None,
            conntrack_tcp_be_liberal: false,
            accounting: Default::default(),
        }
    }

    #[test]
    fn families_follow_node_addresses_and_cluster_cidrs() {
        let node = NodeInfo::named("n");
        assert_eq!(wanted_families(&options(&[], &[]), &node), [IpFamily::V4]);
        assert_eq!(
            wanted_families(&options(&["fd00::1"], &["10.0.0.0/8"]), &node),
            [IpFamily::V4, IpFamily::V6]
        );
        assert_eq!(
            wanted_families(&options(&["fd00::1"], &[]), &node),
            [IpFamily::V6]
        );
    }

    #[test]
    fn only_added_and_changed_ports_count_as_changed() {
        use crate::model::fixtures::{EndpointBuilder, ServiceBuilder, SliceBuilder};
        let node = NodeInfo::named("node-a");
        let build = |endpoints: &[&str], extra: bool| {
            let mut services = vec![
                ServiceBuilder::new("default", "web")
                    .cluster_ip("10.96.0.10")
                    .port("http", 80, "TCP")
                    .build(),
            ];
            if extra {
                services.push(
                    ServiceBuilder::new("default", "api")
                        .cluster_ip("10.96.0.20")
                        .port("http", 80, "TCP")
                        .build(),
                );
            }
            let mut slice = SliceBuilder::new("default", "web", "web-1").port("http", 8080, "TCP");
            for ip in endpoints {
                slice = slice.endpoint(EndpointBuilder::new(ip).node("node-b"));
            }
            model::build(&services, &[slice.build()], &node, IpFamily::V4).0
        };
        let before = build(&["10.244.2.1"], false);
        assert!(rules::changed_ports(&before, &before).is_empty());
        let names = |set: BTreeSet<(ServicePortName, Protocol)>| -> Vec<String> {
            set.into_iter().map(|(n, _)| n.to_string()).collect()
        };
        assert_eq!(
            names(rules::changed_ports(
                &before,
                &build(&["10.244.2.1", "10.244.2.2"], false)
            )),
            ["default/web:http"]
        );
        let with_api = build(&["10.244.2.1"], true);
        assert_eq!(
            names(rules::changed_ports(&before, &with_api)),
            ["default/api:http"]
        );
        assert_eq!(
            names(rules::changed_ports(&with_api, &before)),
            ["default/api:http"],
            "a removed port counts too"
        );
    }
}

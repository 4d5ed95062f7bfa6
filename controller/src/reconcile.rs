//! The reconciler: kube-runtime Controller wiring over Services (Nodes and
//! EndpointSlices watched), the finalizer protocol, status, events and the
//! per-Service cache that makes a steady state cost no AWS call (SPEC 1.2, 1.4).
//!
//! One reconcile of a live, owned Service:
//! 1. `desired` from the Service, the node cache and (ip targets only) its
//!    slices in the EndpointSlice cache; a parse error is a Warning event and
//!    nothing else (no AWS call, the LB stays as it is);
//! 2. unchanged since the last successful apply and audited recently → done;
//!    unchanged but due for a drift audit → read back in the background lane
//!    of the rate limits, or put off while as many audits as allowed run;
//! 3. only targets changed (a node, or a pod for ip targets) → the target
//!    actions are planned against the cached observation and executed (one
//!    call per target group);
//! 4. otherwise: finalizer, observe, plan, execute, observe again, status.
//!
//! A deleted or no-longer-owned Service with our finalizer runs the deletion
//! plan until nothing tagged with its UID remains, then drops the finalizer.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Node, PortStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::aws::{Aws, AwsError};
use crate::desired::{
    ClusterConfig, DesiredError, desired, may_use_ip_targets, ownership, slice_of,
};
use crate::metrics::{Metrics, ReconcileTimer};
use crate::model::{Desired, Observed, Protocol, TargetType};
use crate::plan::{Action, lacks_subnets, plan, replacements};

/// Added before the first AWS write; removed when nothing tagged with the UID remains.
pub const FINALIZER: &str = "causeway.dev/load-balancer-cleanup";
/// The Service condition reporting provisioning state.
pub const READY_CONDITION: &str = "causeway.dev/LoadBalancerReady";

/// Event reasons (as in the Kubernetes service controller, SPEC 1.2).
pub mod reasons {
    pub const ENSURING: &str = "EnsuringLoadBalancer";
    pub const ENSURED: &str = "EnsuredLoadBalancer";
    pub const SYNC_FAILED: &str = "SyncLoadBalancerFailed";
    pub const UPDATED: &str = "UpdatedLoadBalancer";
    pub const DELETING: &str = "DeletingLoadBalancer";
    pub const DELETED: &str = "DeletedLoadBalancer";
    pub const DELETE_FAILED: &str = "DeleteLoadBalancerFailed";
    pub const UNAVAILABLE: &str = "UnAvailableLoadBalancer";
    pub const INVALID_ANNOTATION: &str = "InvalidAnnotation";
    pub const DRIFT_CORRECTED: &str = "DriftCorrected";
    /// Not in the k8s service controller: an annotation change that AWS
    /// cannot apply in place, announced before the replacement starts.
    pub const REPLACING: &str = "ReplacingLoadBalancer";
    /// Not in the k8s service controller: annotations accepted for
    /// compatibility that have no effect on an NLB (Normal, not Warning).
    pub const IGNORED_ANNOTATION: &str = "IgnoredAnnotation";
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Deletion ran but AWS still lists resources tagged with the Service UID.
    #[error("{0} resource(s) tagged with the Service UID remain after deletion; retrying")]
    Remaining(usize),
}

impl Error {
    /// Bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Aws(e) => e.label(),
            Error::Kube(_) => "kube_api",
            Error::Remaining(_) => "cleanup_incomplete",
        }
    }
}

/// Controller settings beyond the desired-state config.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cluster: ClusterConfig,
    /// How long a cached observation is trusted before it is read back (drift audit).
    pub drift_audit_period: Duration,
    /// Drift audits that may run at once: fewer than the workers (with two
    /// or more), so that audits alone never hold every worker a changed
    /// Service could use.
    pub max_concurrent_audits: usize,
}

/// What the last successful reconcile of one Service applied and saw.
struct Applied {
    desired: Desired,
    observed: Observed,
    audited_at: Instant,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub aws: Aws,
    pub settings: Settings,
    pub nodes: Store<Node>,
    /// Slices labelled `kubernetes.io/service-name`; read for ip targets only.
    pub endpoint_slices: Store<EndpointSlice>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    applied: Mutex<HashMap<String, Applied>>,
    failures: Mutex<HashMap<String, Failure>>,
    audits_running: AtomicUsize,
}

/// A running drift audit's place among [`Settings::max_concurrent_audits`].
struct AuditSlot<'a>(&'a AtomicUsize);

impl Drop for AuditSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A Service in retry backoff.
struct Failure {
    count: u32,
    retry_at: Instant,
    /// What the failed reconcile saw; a different Service is retried at once.
    fingerprint: u64,
}

/// What a user changes on a Service (not its status, which we write).
fn fingerprint(svc: &Service) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&svc.spec)
        .unwrap_or_default()
        .hash(&mut h);
    svc.metadata.annotations.hash(&mut h);
    svc.metadata.finalizers.hash(&mut h);
    svc.metadata.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// What of a Node its targets depend on (labels, taints, providerID,
/// deletion), so that a status heartbeat is not a node change.
pub fn node_fingerprint(node: &Node) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.metadata.labels.hash(&mut h);
    node.metadata.deletion_timestamp.is_some().hash(&mut h);
    if let Some(spec) = &node.spec {
        spec.provider_id.hash(&mut h);
        for taint in spec.taints.iter().flatten() {
            (&taint.key, &taint.value, &taint.effect).hash(&mut h);
        }
    }
    h.finish()
}

impl Context {
    pub fn new(
        client: kube::Client,
        aws: Aws,
        settings: Settings,
        nodes: Store<Node>,
        endpoint_slices: Store<EndpointSlice>,
        metrics: Arc<Metrics>,
    ) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "causeway-controller".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Context {
            client,
            aws,
            settings,
            nodes,
            endpoint_slices,
            recorder,
            metrics,
            applied: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            audits_running: AtomicUsize::new(0),
        }
    }

    /// A place for one more drift audit, unless as many as allowed run.
    fn start_audit(&self) -> Option<AuditSlot<'_>> {
        let max = self.settings.max_concurrent_audits.max(1);
        self.audits_running
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| AuditSlot(&self.audits_running))
    }

    async fn event(&self, svc: &Service, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &svc.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish event");
        }
    }

    fn forget(&self, uid: &str) {
        self.applied.lock().expect("cache lock").remove(uid);
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Per-Service retry delay: 5 s doubling to 5 min.
pub fn retry_delay(failures: u32) -> Duration {
    let secs = 5u64.saturating_mul(1 << failures.min(6));
    Duration::from_secs(secs.min(300))
}

/// Spreads drift audits of many Services over the period.
fn audit_requeue(period: Duration, uid: &str) -> Duration {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    uid.hash(&mut h);
    let spread = period.as_millis() as u64 / 10;
    period + Duration::from_millis(h.finish() % spread.max(1))
}

/// When a postponed audit tries again: a tenth of the period (at least a
/// second, at most a minute), spread over as much again so the postponed
/// do not return together.
fn audit_postponement(period: Duration, uid: &str) -> Duration {
    let base = (period / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (uid, "postponed").hash(&mut h);
    base + Duration::from_millis(h.finish() % (base.as_millis() as u64).max(1))
}

/// Same resources, possibly different targets: a node change.
fn same_except_targets(a: &Desired, b: &Desired) -> bool {
    let strip = |d: &Desired| {
        let mut d = d.clone();
        for tg in &mut d.target_groups {
            tg.targets.clear();
        }
        d.skipped_nodes.clear();
        d
    };
    strip(a) == strip(b)
}

/// Entry point for the kube-runtime Controller.
pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    let uid = svc.uid().unwrap_or_default();
    // Our own status writes trigger reconciles too; they must not cut a
    // backoff short (only a change to the Service itself does).
    if let Some(f) = ctx.failures.lock().expect("failures lock").get(&uid)
        && f.fingerprint == fingerprint(&svc)
        && let Some(wait) = f.retry_at.checked_duration_since(Instant::now())
    {
        return Ok(Requeue::requeue(wait));
    }
    let mut timer = ctx.metrics.reconcile_timer();
    let result = reconcile_inner(&svc, &ctx, &mut timer).await;
    match &result {
        Ok(_) => {
            ctx.failures.lock().expect("failures lock").remove(&uid);
        }
        Err(e) => {
            timer.failed(e.label());
            ctx.forget(&uid);
        }
    }
    result
}

/// Entry point for the Controller's error policy: event, condition, backoff.
pub fn error_policy(svc: Arc<Service>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let uid = svc.uid().unwrap_or_default();
    let failures = {
        let mut f = ctx.failures.lock().expect("failures lock");
        let count = f.get(&uid).map_or(0, |f| f.count) + 1;
        f.insert(
            uid,
            Failure {
                count,
                retry_at: Instant::now() + retry_delay(count - 1),
                fingerprint: fingerprint(&svc),
            },
        );
        count
    };
    let delay = retry_delay(failures - 1);
    tracing::warn!(service = %svc.name_any(), namespace = svc.namespace().unwrap_or_default(), error = %error, label = error.label(), retry_in = ?delay, "reconcile failed");
    let deleting = svc.metadata.deletion_timestamp.is_some()
        || ownership(&svc, &ctx.settings.cluster).is_err();
    let ctx2 = ctx.clone();
    let message = format!("{error} (retry in {}s)", delay.as_secs());
    tokio::spawn(async move {
        let reason = if deleting {
            reasons::DELETE_FAILED
        } else {
            reasons::SYNC_FAILED
        };
        ctx2.event(&svc, EventType::Warning, reason, message.clone())
            .await;
        if !deleting && let Err(e) = set_condition(&ctx2, &svc, false, "Error", &message).await {
            tracing::warn!(error = %e, "cannot set condition");
        }
    });
    Requeue::requeue(delay)
}

async fn reconcile_inner(
    svc: &Service,
    ctx: &Context,
    timer: &mut ReconcileTimer<'_>,
) -> Result<Requeue, Error> {
    let uid = svc.uid().unwrap_or_default();
    let has_finalizer = svc.finalizers().iter().any(|f| f == FINALIZER);
    let owned = ownership(svc, &ctx.settings.cluster).is_ok();
    if svc.metadata.deletion_timestamp.is_some() || !owned {
        if has_finalizer {
            cleanup(svc, ctx, &uid).await?;
        }
        return Ok(Requeue::await_change());
    }

    let nodes = ctx.nodes.state();
    let nodes: Vec<Node> = nodes.iter().map(|n| (**n).clone()).collect();
    let slices = service_slices(svc, ctx);
    let desired = match desired(svc, &nodes, &slices, &ctx.settings.cluster) {
        Ok(d) => d,
        Err(e @ (DesiredError::InvalidAnnotations(_) | DesiredError::InvalidService { .. })) => {
            // Nothing is written: the existing LB (if any) stays as it is
            // until the Service is fixed, which triggers the next reconcile.
            let reason = match e {
                DesiredError::InvalidAnnotations(_) => reasons::INVALID_ANNOTATION,
                _ => reasons::SYNC_FAILED,
            };
            timer.failed(e.label());
            ctx.event(svc, EventType::Warning, reason, e.to_string())
                .await;
            set_condition(ctx, svc, false, "InvalidSpec", &e.to_string()).await?;
            ctx.forget(&uid);
            return Ok(Requeue::await_change());
        }
        Err(e) => {
            tracing::info!(error = %e, "not reconciling");
            return Ok(Requeue::await_change());
        }
    };
    let audit = audit_requeue(ctx.settings.drift_audit_period, &uid);

    // Steady state and node changes: work from the cache.
    // A drift audit: the Service is as last applied, and that was read back
    // longer than a period ago. (A change whose Service was also due for
    // an audit is a change: it is applied and reported as one.)
    let (cached, drift_audit) = {
        let cache = ctx.applied.lock().expect("cache lock");
        match cache.get(&uid) {
            Some(a) if a.audited_at.elapsed() < ctx.settings.drift_audit_period => {
                (Some((a.desired.clone(), a.observed.clone())), false)
            }
            Some(a) => (None, a.desired == desired),
            None => (None, false),
        }
    };
    // An audit of a Service nobody changed waits its turn while the allowed
    // number of audits run: queued, it would hold a worker that a changed
    // Service needs. Its reads come after every change's (background lane).
    // Changes run at once, whatever is due.
    let _audit_slot = if drift_audit {
        let Some(slot) = ctx.start_audit() else {
            ctx.metrics.audits_postponed.inc();
            return Ok(Requeue::requeue(audit_postponement(
                ctx.settings.drift_audit_period,
                &uid,
            )));
        };
        Some(slot)
    } else {
        None
    };
    if let Some((cached_desired, cached_observed)) = &cached {
        if *cached_desired == desired {
            return Ok(Requeue::requeue(audit));
        }
        if same_except_targets(cached_desired, &desired) {
            let actions = plan(Some(&desired), cached_observed);
            if actions.iter().all(Action::is_target_change) {
                report_nodes(svc, ctx, &desired).await;
                let observed = ctx.aws.execute(&actions, cached_observed).await?;
                tracing::info!(service = %desired.service, actions = actions.len(), "targets updated");
                remember(ctx, &uid, desired, observed, cached_at(ctx, &uid));
                return Ok(Requeue::requeue(audit));
            }
        }
    }

    report_nodes(svc, ctx, &desired).await;
    if !drift_audit && !desired.ignored_annotations.is_empty() {
        let list = desired
            .ignored_annotations
            .iter()
            .map(|i| format!("{} ({})", i.key, i.reason))
            .collect::<Vec<_>>()
            .join("; ");
        ctx.event(
            svc,
            EventType::Normal,
            reasons::IGNORED_ANNOTATION,
            format!("Accepted without effect on an NLB: {list}"),
        )
        .await;
    }
    let calls_before = ctx.aws.calls().total();
    // The finalizer goes on before the first AWS write and comes off only
    // when nothing tagged with the UID is left: without it there is nothing
    // to read back, only subnets to discover. (Should something exist anyway,
    // a create fails and the retry, with the finalizer, observes everything.)
    let first_write = !svc.finalizers().iter().any(|f| f == FINALIZER);
    let mut observed = if first_write {
        ctx.aws.observe_nothing(&desired).await?
    } else if drift_audit {
        // Reading back what should not have changed: after every change's calls.
        crate::aws::in_background(ctx.aws.observe(&uid, Some(&desired))).await?
    } else {
        ctx.aws.observe(&uid, Some(&desired)).await?
    };
    if lacks_subnets(&desired, &observed) {
        let message = format!(
            "no subnet found for a {} load balancer: tag subnets kubernetes.io/role/{} and kubernetes.io/cluster/{} (owned or shared), or set service.beta.kubernetes.io/aws-load-balancer-subnets",
            desired.load_balancer.scheme,
            match desired.load_balancer.scheme {
                crate::model::Scheme::InternetFacing => "elb",
                crate::model::Scheme::Internal => "internal-elb",
            },
            ctx.settings.cluster.cluster_name
        );
        ctx.event(
            svc,
            EventType::Warning,
            reasons::SYNC_FAILED,
            message.clone(),
        )
        .await;
        set_condition(ctx, svc, false, "NoSubnets", &message).await?;
        return Ok(Requeue::requeue(Duration::from_secs(60)));
    }
    let actions = plan(Some(&desired), &observed);
    if !actions.is_empty() {
        let creating = observed.load_balancers.is_empty();
        ensure_finalizer(svc, ctx).await?;
        let summary = actions
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        if creating {
            ctx.event(
                svc,
                EventType::Normal,
                reasons::ENSURING,
                "Ensuring load balancer".into(),
            )
            .await;
        }
        for replacement in replacements(&desired, &observed) {
            ctx.event(
                svc,
                EventType::Normal,
                reasons::REPLACING,
                replacement.to_string(),
            )
            .await;
        }
        // A retry keeps the last error (and its retry time) on show until it
        // succeeds: flipping to Provisioning on every attempt would hide it.
        let failing = svc
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == READY_CONDITION && c.reason == "Error");
        if !failing && let Err(e) = set_condition(ctx, svc, false, "Provisioning", &summary).await {
            tracing::warn!(error = %e, "cannot set condition");
        }
        tracing::info!(service = %desired.service, actions = actions.len(), plan = %summary, "applying");
        observed = ctx.aws.execute(&actions, &observed).await?;
        let mut left = plan(Some(&desired), &observed);
        if !left.is_empty() {
            // The plan did not describe its own effect: read AWS back.
            tracing::warn!(service = %desired.service, left = ?left, "applied state differs from desired; reading back");
            observed = ctx.aws.observe(&uid, Some(&desired)).await?;
            left = plan(Some(&desired), &observed);
        }
        if !left.is_empty() {
            // AWS did not keep what we set. What it reports is cached: the
            // next change to the Service plans against it, and until then
            // the drift audit reads it back and tries again.
            tracing::warn!(service = %desired.service, left = ?left, "not converged after apply");
        }
        let (reason, note) = if drift_audit {
            (
                reasons::DRIFT_CORRECTED,
                format!("Corrected drift: {summary}"),
            )
        } else if creating {
            (reasons::ENSURED, "Ensured load balancer".to_string())
        } else {
            (
                reasons::UPDATED,
                format!("Updated load balancer: {summary}"),
            )
        };
        ctx.event(svc, EventType::Normal, reason, note).await;
    }
    tracing::info!(
        service = %desired.service,
        actions = actions.len(),
        aws_calls = ctx.aws.calls().total() - calls_before,
        "reconciled"
    );
    let dns = observed
        .load_balancers
        .iter()
        .find(|lb| lb.name == desired.load_balancer.name)
        .map(|lb| lb.dns_name.clone());
    if let Some(dns) = &dns {
        set_ready(svc, ctx, dns).await?;
    }
    remember(ctx, &uid, desired, observed, Instant::now());
    Ok(Requeue::requeue(audit))
}

/// This Service's slices from the cache; none when it cannot use ip targets.
fn service_slices(svc: &Service, ctx: &Context) -> Vec<EndpointSlice> {
    if !may_use_ip_targets(svc, &ctx.settings.cluster) {
        return Vec::new();
    }
    let namespace = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    ctx.endpoint_slices
        .state_filter(|s| slice_of(s, &namespace, &name))
        .iter()
        .map(|s| (**s).clone())
        .collect()
}

fn cached_at(ctx: &Context, uid: &str) -> Instant {
    ctx.applied
        .lock()
        .expect("cache lock")
        .get(uid)
        .map_or_else(Instant::now, |a| a.audited_at)
}

fn remember(ctx: &Context, uid: &str, desired: Desired, observed: Observed, audited_at: Instant) {
    ctx.applied.lock().expect("cache lock").insert(
        uid.to_string(),
        Applied {
            desired,
            observed,
            audited_at,
        },
    );
}

/// Target warnings: unusable nodes and an LB with no target at all.
async fn report_nodes(svc: &Service, ctx: &Context, desired: &Desired) {
    if !desired.skipped_nodes.is_empty() {
        let names = desired
            .skipped_nodes
            .iter()
            .map(|n| format!("{} ({})", n.node, n.reason))
            .collect::<Vec<_>>()
            .join(", ");
        ctx.event(
            svc,
            EventType::Warning,
            reasons::SYNC_FAILED,
            format!("Nodes skipped as targets: {names}"),
        )
        .await;
    }
    if desired.has_no_targets() {
        let ip = desired
            .target_groups
            .iter()
            .any(|tg| tg.target_type == TargetType::Ip);
        let note = if ip {
            "There are no ready endpoints for the load balancer"
        } else {
            "There are no available nodes for the load balancer"
        };
        ctx.event(svc, EventType::Warning, reasons::UNAVAILABLE, note.into())
            .await;
    }
}

/// Deletes everything tagged with the Service UID, then drops the finalizer.
async fn cleanup(svc: &Service, ctx: &Context, uid: &str) -> Result<(), Error> {
    // Fresh: the finalizer comes off on what this observe finds.
    let observed = ctx.aws.observe_fresh(uid).await?;
    let actions = plan(None, &observed);
    if !actions.is_empty() {
        ctx.event(
            svc,
            EventType::Normal,
            reasons::DELETING,
            "Deleting load balancer".into(),
        )
        .await;
        ctx.aws.execute(&actions, &observed).await?;
        // Read back: the finalizer comes off only when AWS says nothing is left.
        let left = plan(None, &ctx.aws.observe(uid, None).await?);
        if !left.is_empty() {
            return Err(Error::Remaining(left.len()));
        }
    }
    ctx.forget(uid);
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let name = svc.name_any();
    if svc.metadata.deletion_timestamp.is_none() {
        // No longer ours but still alive: its status no longer describes an LB.
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": null}}})),
        )
        .await?;
    }
    let remaining: Vec<String> = svc
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "resourceVersion": svc.resource_version(),
            "finalizers": remaining,
        }})),
    )
    .await?;
    ctx.event(
        svc,
        EventType::Normal,
        reasons::DELETED,
        "Deleted load balancer".into(),
    )
    .await;
    Ok(())
}

/// What the orphan sweep does with what it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OrphanSweep {
    /// Delete resources of Services that no longer exist.
    On,
    /// Only log what would be deleted.
    DryRun,
    Off,
}

/// Deletes everything tagged with our cluster whose Service UID no longer
/// exists in the API (a Service deleted while no controller ran, a finalizer
/// removed by hand). The UIDs are read from AWS *before* the Services are
/// listed, so a Service created meanwhile is in the list. Returns the UIDs
/// swept (or, in dry-run, that would be).
pub async fn sweep_orphans(ctx: &Context, mode: OrphanSweep) -> Result<Vec<String>, Error> {
    if mode == OrphanSweep::Off {
        return Ok(Vec::new());
    }
    let tagged = ctx.aws.tagged_uids().await?;
    if tagged.is_empty() {
        return Ok(Vec::new());
    }
    let live: std::collections::BTreeSet<String> = Api::<Service>::all(ctx.client.clone())
        .list_metadata(&kube::api::ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.uid)
        .collect();
    let mut swept = Vec::new();
    for uid in tagged.difference(&live) {
        let observed = ctx.aws.observe(uid, None).await?;
        let actions = plan(None, &observed);
        let summary = actions
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        if mode == OrphanSweep::DryRun {
            tracing::info!(%uid, plan = %summary, "orphan sweep (dry run) would delete");
        } else {
            tracing::info!(%uid, plan = %summary, "orphan sweep: deleting resources of a Service that no longer exists");
            ctx.aws.execute(&actions, &observed).await?;
            ctx.forget(uid);
        }
        swept.push(uid.clone());
    }
    Ok(swept)
}

/// Adds the finalizer (optimistically, by resourceVersion) before any AWS write.
async fn ensure_finalizer(svc: &Service, ctx: &Context) -> Result<(), Error> {
    if svc.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut finalizers = svc.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    api.patch(
        &svc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "resourceVersion": svc.resource_version(),
            "finalizers": finalizers,
        }})),
    )
    .await?;
    Ok(())
}

/// `status.loadBalancer.ingress`: the NLB hostname and the Service's ports.
pub fn ingress(svc: &Service, hostname: &str) -> Vec<LoadBalancerIngress> {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|ports| {
            ports
                .iter()
                .map(|p| PortStatus {
                    port: p.port,
                    protocol: p
                        .protocol
                        .clone()
                        .unwrap_or_else(|| Protocol::Tcp.as_str().into()),
                    error: None,
                })
                .collect()
        });
    vec![LoadBalancerIngress {
        hostname: Some(hostname.to_string()),
        ports,
        ..Default::default()
    }]
}

/// The ingress status for `hostname`, if the Service does not have it yet.
fn ingress_change(svc: &Service, hostname: &str) -> Option<Vec<LoadBalancerIngress>> {
    let want = ingress(svc, hostname);
    let have = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default();
    (have != want).then_some(want)
}

/// The Service's conditions with ours set, if its status, reason or message
/// changed.
fn condition_change(
    svc: &Service,
    ready: bool,
    reason: &str,
    message: &str,
) -> Option<Vec<Condition>> {
    let status = if ready { "True" } else { "False" };
    let message = truncate(message.to_string(), 32 * 1024);
    let mut conditions = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let current = conditions.iter().find(|c| c.type_ == READY_CONDITION);
    if current.is_some_and(|c| c.status == status && c.reason == reason && c.message == message) {
        return None;
    }
    let last_transition_time = match current {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(k8s_openapi::jiff::Timestamp::now()),
    };
    conditions.retain(|c| c.type_ != READY_CONDITION);
    conditions.push(Condition {
        type_: READY_CONDITION.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: svc.metadata.generation,
    });
    Some(conditions)
}

async fn patch_status(
    ctx: &Context,
    svc: &Service,
    status: serde_json::Value,
) -> Result<(), Error> {
    let api: Api<Service> =
        Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    api.patch_status(
        &svc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// The hostname and the Ready condition, in one status write (each write is
/// a watch event, and so another reconcile).
async fn set_ready(svc: &Service, ctx: &Context, hostname: &str) -> Result<(), Error> {
    let mut status = serde_json::Map::new();
    if let Some(ingress) = ingress_change(svc, hostname) {
        status.insert("loadBalancer".into(), json!({ "ingress": ingress }));
    }
    let message = format!("Load balancer {hostname} is ready");
    if let Some(conditions) = condition_change(svc, true, "Ready", &message) {
        status.insert("conditions".into(), json!(conditions));
    }
    if status.is_empty() {
        return Ok(());
    }
    patch_status(ctx, svc, status.into()).await
}

/// Sets our condition when its status, reason or message changed.
async fn set_condition(
    ctx: &Context,
    svc: &Service,
    ready: bool,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    match condition_change(svc, ready, reason, message) {
        Some(conditions) => patch_status(ctx, svc, json!({ "conditions": conditions })).await,
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{EndpointSliceBuilder, NodeBuilder, ServiceBuilder, cluster_config};

    #[test]
    fn retry_grows_from_five_seconds_to_five_minutes() {
        let delays: Vec<u64> = (0..9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn postponed_audits_come_back_spread_over_a_tenth_of_the_period() {
        let minute = Duration::from_secs(60);
        let delays: Vec<Duration> = (0..200)
            .map(|i| audit_postponement(Duration::from_secs(600), &format!("uid-{i}")))
            .collect();
        assert!(delays.iter().all(|d| (minute..2 * minute).contains(d)));
        // Spread, not together: 200 Services over more than 40 of the 60 seconds.
        let seconds: std::collections::BTreeSet<u64> =
            delays.iter().map(Duration::as_secs).collect();
        assert!(seconds.len() > 40, "{seconds:?}");
        // A long period still comes back within two minutes; a short one soon.
        let long = audit_postponement(Duration::from_secs(36_000), "uid");
        assert!((minute..2 * minute).contains(&long));
        let short = audit_postponement(Duration::from_secs(10), "uid");
        assert!((Duration::from_secs(1)..Duration::from_secs(2)).contains(&short));
        // Never a busy loop, however short the period.
        let tiny = audit_postponement(Duration::from_millis(10), "uid");
        assert!((Duration::from_secs(1)..Duration::from_secs(2)).contains(&tiny));
    }

    #[test]
    fn our_status_writes_do_not_change_the_backoff_fingerprint() {
        let svc = ServiceBuilder::new().build();
        let mut with_status = svc.clone();
        with_status.status = Some(Default::default());
        assert_eq!(fingerprint(&svc), fingerprint(&with_status));
        let edited = ServiceBuilder::new()
            .annotation(
                "service.beta.kubernetes.io/aws-load-balancer-scheme",
                "internal",
            )
            .build();
        assert_ne!(fingerprint(&svc), fingerprint(&edited));
    }

    #[test]
    fn a_heartbeat_is_not_a_node_change_but_a_label_or_taint_is() {
        let node = NodeBuilder::new("a", "i-0a").build();
        let mut heartbeat = node.clone();
        heartbeat.metadata.resource_version = Some("42".into());
        heartbeat.status = Some(Default::default());
        assert_eq!(node_fingerprint(&node), node_fingerprint(&heartbeat));
        let excluded = NodeBuilder::new("a", "i-0a")
            .label(
                "node.kubernetes.io/exclude-from-external-load-balancers",
                "",
            )
            .build();
        let draining = NodeBuilder::new("a", "i-0a")
            .taint("ToBeDeletedByClusterAutoscaler", "NoSchedule")
            .build();
        let moved = NodeBuilder::new("a", "i-0b").build();
        for other in [excluded, draining, moved] {
            assert_ne!(node_fingerprint(&node), node_fingerprint(&other));
        }
    }

    #[test]
    fn a_node_change_is_recognised_as_targets_only() {
        let svc = ServiceBuilder::new().build();
        let cfg = cluster_config();
        let two = desired(
            &svc,
            &[
                NodeBuilder::new("a", "i-0a").build(),
                NodeBuilder::new("b", "i-0b").build(),
            ],
            &[],
            &cfg,
        )
        .unwrap();
        let one = desired(&svc, &[NodeBuilder::new("a", "i-0a").build()], &[], &cfg).unwrap();
        assert!(same_except_targets(&two, &one));
        let local = desired(
            &ServiceBuilder::new().etp_local(32000).build(),
            &[NodeBuilder::new("a", "i-0a").build()],
            &[],
            &cfg,
        )
        .unwrap();
        assert!(!same_except_targets(&one, &local));
    }

    #[test]
    fn a_pod_change_is_recognised_as_targets_only() {
        let svc = ServiceBuilder::new()
            .annotation(crate::annotations::keys::NLB_TARGET_TYPE, "ip")
            .build();
        let cfg = cluster_config();
        let slice = |ready: bool| {
            EndpointSliceBuilder::new("web", "web-1")
                .port("http", 80, "TCP")
                .endpoint("10.1.0.5", true)
                .endpoint("10.1.0.6", ready)
                .build()
        };
        let both = desired(&svc, &[], &[slice(true)], &cfg).unwrap();
        let one = desired(&svc, &[], &[slice(false)], &cfg).unwrap();
        let none = desired(&svc, &[], &[], &cfg).unwrap();
        assert_ne!(both, one);
        assert!(same_except_targets(&both, &one));
        assert!(same_except_targets(&both, &none));
    }

    #[test]
    fn ingress_lists_hostname_and_every_port() {
        let svc = ServiceBuilder::new().port("dns", 53, "UDP", 30053).build();
        let got = ingress(&svc, "lb.example");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].hostname.as_deref(), Some("lb.example"));
        let ports: Vec<(i32, String)> = got[0]
            .ports
            .iter()
            .flatten()
            .map(|p| (p.port, p.protocol.clone()))
            .collect();
        assert_eq!(ports, [(80, "TCP".to_string()), (53, "UDP".to_string())]);
    }
}

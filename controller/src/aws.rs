//! The only code that talks to AWS (ELBv2 and EC2): [`Aws::observe`] reads one
//! Service's resources by their tags, [`Aws::execute`] performs a plan.
//!
//! The endpoint, region and credentials come from the standard SDK
//! configuration (`AWS_ENDPOINT_URL`, `AWS_REGION`, profiles, IRSA), which is
//! how tests point the controller at moto. Every call goes through
//! [`Aws::call`], which counts it by operation and outcome ([`AwsCalls`]) and
//! turns SDK errors into [`AwsError`] with a bounded label.
//!
//! The SDK's standard retry mode (jittered exponential backoff) retries
//! throttling, 5xx and transport errors inside one call; a failure that
//! survives it fails the reconcile, which is retried per Service. Before a
//! call is sent it takes a token from its category's client-side bucket
//! ([`RateLimits`]: Describe, Register, Modify), so many Services at once
//! queue here rather than get throttled by AWS. Calls made inside
//! [`in_background`] (drift audits, periodic orphan sweeps) take a token
//! only when no other call wants it ([`Lane`]).

mod execute;
mod observe;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_sdk_elasticloadbalancingv2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::OnceCell;

pub use observe::pick_subnets;

/// Client-side rate limits (calls per second; 0 = unlimited), one token
/// bucket per category, each with a burst of twice its rate (at least 1).
#[derive(Clone, Copy, Debug)]
pub struct RateLimits {
    /// Describe* calls (ELBv2 and EC2).
    pub describe: f64,
    /// RegisterTargets and DeregisterTargets.
    pub register: f64,
    /// Every other write.
    pub modify: f64,
}

impl Default for RateLimits {
    /// Below AWS's per-account ELBv2 request limits, which a whole account
    /// shares: 10/s for reads and writes, 4/s for target registration.
    fn default() -> Self {
        RateLimits {
            describe: 10.0,
            register: 4.0,
            modify: 10.0,
        }
    }
}

/// The category an operation's token comes from.
fn category(operation: &str) -> &'static str {
    if is_read(operation) {
        "describe"
    } else if operation == "RegisterTargets" || operation == "DeregisterTargets" {
        "register"
    } else {
        "modify"
    }
}

/// Who is waiting for an AWS call's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// A change someone waits for: a Service edited, a node or a pod come or
    /// gone, a deletion. The default.
    Foreground,
    /// Reading back what should not have changed: a drift audit, a periodic
    /// orphan sweep. At a thousand Services an audit round is thousands of
    /// Describe calls; in the foreground lane they would be ahead of a
    /// user's change for minutes.
    Background,
}

tokio::task_local! {
    static LANE: Lane;
}

/// Runs `work` with its AWS calls in the background lane: each takes a
/// token only when one is free, after every foreground call waiting.
pub async fn in_background<F: Future>(work: F) -> F::Output {
    LANE.scope(Lane::Background, work).await
}

/// Runs `work` in the foreground lane whoever asks: for work that others
/// wait for, such as the inventory's listing, which a change may be blocked
/// on while an audit makes it.
async fn in_foreground<F: Future>(work: F) -> F::Output {
    LANE.scope(Lane::Foreground, work).await
}

fn current_lane() -> Lane {
    LANE.try_with(|lane| *lane).unwrap_or(Lane::Foreground)
}

/// A token bucket with two lanes. A foreground caller takes a reservation:
/// its token now (the level may go negative), then it sleeps until that
/// token would have been there, so foreground callers are served in order
/// and the rate holds under any concurrency. Background callers queue
/// behind each other and take a token only when one is there, so they never
/// hold a reservation ahead of a foreground caller that comes later.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens and when they were counted (tokio's clock, so tests can pause it).
    level: std::sync::Mutex<(f64, tokio::time::Instant)>,
    /// The background queue: one background caller at a time waits for a token.
    background: tokio::sync::Mutex<()>,
}

impl TokenBucket {
    fn new(rate: f64) -> Option<TokenBucket> {
        (rate > 0.0).then(|| {
            let burst = (2.0 * rate).max(1.0);
            TokenBucket {
                rate,
                burst,
                level: std::sync::Mutex::new((burst, tokio::time::Instant::now())),
                background: tokio::sync::Mutex::new(()),
            }
        })
    }

    /// The level now, refilled since it was last counted.
    fn refilled(&self, level: &mut (f64, tokio::time::Instant)) -> f64 {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(level.1).as_secs_f64() * self.rate;
        *level = ((level.0 + refill).min(self.burst), now);
        level.0
    }

    /// Foreground: how long the caller must wait for its token (already taken).
    fn reserve(&self) -> std::time::Duration {
        let mut level = self.level.lock().expect("token bucket lock");
        let tokens = self.refilled(&mut level) - 1.0;
        level.0 = tokens;
        if tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-tokens / self.rate)
        }
    }

    /// A token if one is there; else how long until one will be, unless a
    /// foreground caller takes it first.
    fn try_take(&self) -> Result<(), std::time::Duration> {
        let mut level = self.level.lock().expect("token bucket lock");
        let tokens = self.refilled(&mut level);
        if tokens >= 1.0 {
            level.0 = tokens - 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64(
                (1.0 - tokens) / self.rate,
            ))
        }
    }

    /// Background: waits in the queue, then until a token is there; returns
    /// how long it waited (zero when it did not).
    async fn take_background(&self) -> std::time::Duration {
        let started = tokio::time::Instant::now();
        let mut waited = false;
        let _turn = match self.background.try_lock() {
            Ok(turn) => turn,
            Err(_) => {
                waited = true;
                self.background.lock().await
            }
        };
        while let Err(wait) = self.try_take() {
            waited = true;
            tokio::time::sleep(wait).await;
        }
        if waited {
            started.elapsed()
        } else {
            std::time::Duration::ZERO
        }
    }
}

/// The three buckets.
#[derive(Debug)]
struct Limiter {
    describe: Option<TokenBucket>,
    register: Option<TokenBucket>,
    modify: Option<TokenBucket>,
}

impl Limiter {
    fn new(limits: RateLimits) -> Limiter {
        Limiter {
            describe: TokenBucket::new(limits.describe),
            register: TokenBucket::new(limits.register),
            modify: TokenBucket::new(limits.modify),
        }
    }

    fn bucket(&self, category: &str) -> Option<&TokenBucket> {
        match category {
            "describe" => self.describe.as_ref(),
            "register" => self.register.as_ref(),
            _ => self.modify.as_ref(),
        }
    }
}

/// Label set of `causeway_aws_throttle_waits_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThrottleLabels {
    pub category: &'static str,
}

/// Label set of `causeway_aws_calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsCallLabels {
    pub operation: &'static str,
    pub outcome: &'static str,
}

/// AWS calls made, by operation and outcome. Read by `/metrics` (and by the
/// integration tests through it) and by the reconciler's logs.
#[derive(Debug, Default)]
pub struct AwsCalls {
    by_operation: Family<AwsCallLabels, Counter>,
    total: AtomicU64,
    writes: AtomicU64,
    /// Writes that succeeded (for the test-only stop point).
    ok_writes: AtomicU64,
    throttle_waits: Family<ThrottleLabels, Counter>,
    throttle_wait_seconds: Family<ThrottleLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
}

impl AwsCalls {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "causeway_aws_calls",
            "AWS API calls by operation and outcome",
            self.by_operation.clone(),
        );
        registry.register(
            "causeway_aws_throttle_waits",
            "AWS calls that waited for the client-side rate limit, by category",
            self.throttle_waits.clone(),
        );
        registry.register(
            "causeway_aws_throttle_wait_seconds",
            "Time AWS calls waited for the client-side rate limit, by category",
            self.throttle_wait_seconds.clone(),
        );
    }

    fn throttled(&self, category: &'static str, waited: std::time::Duration) {
        let labels = ThrottleLabels { category };
        self.throttle_waits.get_or_create(&labels).inc();
        self.throttle_wait_seconds
            .get_or_create(&labels)
            .inc_by(waited.as_secs_f64());
    }

    fn record(&self, operation: &'static str, outcome: &'static str) {
        self.by_operation
            .get_or_create(&AwsCallLabels { operation, outcome })
            .inc();
        self.total.fetch_add(1, Ordering::Relaxed);
        if !is_read(operation) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// All calls so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Calls that change something (everything but Describe*).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

fn is_read(operation: &str) -> bool {
    operation.starts_with("Describe")
}

/// What kind of failure an [`AwsError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AwsErrorKind {
    /// Throttling, 5xx, timeouts, transport: retry later.
    Retryable,
    /// The resource is gone (e.g. deleted out of band): re-observe.
    NotFound,
    /// AWS refused the request (quota, invalid subnet, permissions).
    Refused,
    /// Something this controller needs is missing or ambiguous in the account.
    Setup,
}

/// A failed AWS call, or an account that lacks what we need.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct AwsError {
    pub operation: &'static str,
    pub code: Option<String>,
    pub message: String,
    pub kind: AwsErrorKind,
}

impl AwsError {
    /// Bounded label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self.kind {
            AwsErrorKind::Retryable => "aws_retryable",
            AwsErrorKind::NotFound => "aws_not_found",
            AwsErrorKind::Refused => "aws_refused",
            AwsErrorKind::Setup => "aws_setup",
        }
    }

    fn setup(operation: &'static str, message: String) -> AwsError {
        AwsError {
            operation,
            code: None,
            message,
            kind: AwsErrorKind::Setup,
        }
    }
}

const RETRYABLE_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
    // An NLB's ENIs hold its SG for a while after the NLB is deleted.
    "DependencyViolation",
    "ResourceInUse",
];

/// A discovery result, (subnet ID, availability zone) pairs, and when it was made.
type DiscoveredAt = (std::time::Instant, Vec<(String, String)>);

/// Clients and what the adapter learned once about the account.
pub struct Aws {
    elb: aws_sdk_elasticloadbalancingv2::Client,
    ec2: aws_sdk_ec2::Client,
    cluster_name: String,
    calls: std::sync::Arc<AwsCalls>,
    /// The cluster's VPC (target groups need it), from the node SG.
    vpc_id: OnceCell<String>,
    /// The node SG's ID, from its last lookup (its rules come from the
    /// inventory, like the frontend SGs').
    node_sg_id: std::sync::Mutex<Option<String>>,
    /// Subnet discovery results by scheme, reused for [`SUBNET_CACHE_TTL`].
    subnets: std::sync::Mutex<std::collections::HashMap<crate::model::Scheme, DiscoveredAt>>,
    /// The region's NLBs and target groups with their tags, and the
    /// cluster's security groups, shared by the observes of every Service
    /// (`observe::Inventory`). An async lock: one observe lists while the
    /// others wait for its listing.
    inventory: tokio::sync::Mutex<Option<std::sync::Arc<observe::Inventory>>>,
    inventory_ttl: std::time::Duration,
    /// Test-only stop point: abort the process after this many successful
    /// writes (`CAUSEWAY_TEST_EXIT_AFTER_WRITES`), to test crash safety.
    exit_after_writes: Option<u64>,
    limiter: Limiter,
}

/// How long a listing of NLBs, target groups and security groups is reused
/// at most (the controller shortens it to a tenth of the drift-audit period).
pub const DEFAULT_INVENTORY_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a subnet discovery is reused for new load balancers.
const SUBNET_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl Aws {
    /// Clients from the standard SDK configuration; `region` overrides it.
    pub async fn from_env(
        cluster_name: &str,
        region: Option<String>,
        calls: std::sync::Arc<AwsCalls>,
    ) -> Aws {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(5));
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region));
        }
        let config = loader.load().await;
        Aws {
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&config),
            ec2: aws_sdk_ec2::Client::new(&config),
            cluster_name: cluster_name.to_string(),
            calls,
            vpc_id: OnceCell::new(),
            node_sg_id: Default::default(),
            subnets: Default::default(),
            inventory: Default::default(),
            inventory_ttl: DEFAULT_INVENTORY_TTL,
            exit_after_writes: std::env::var("CAUSEWAY_TEST_EXIT_AFTER_WRITES")
                .ok()
                .and_then(|v| v.parse().ok()),
            limiter: Limiter::new(RateLimits::default()),
        }
    }

    /// How long one listing of the region's NLBs, target groups and the
    /// cluster's security groups serves every Service's observe, unless this
    /// client writes meanwhile.
    pub fn with_inventory_ttl(mut self, ttl: std::time::Duration) -> Aws {
        self.inventory_ttl = ttl;
        self
    }

    /// Replaces the client-side rate limits.
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Aws {
        self.limiter = Limiter::new(limits);
        self
    }

    pub fn calls(&self) -> &AwsCalls {
        &self.calls
    }

    fn cluster_tag(&self) -> String {
        format!(
            "{}{}",
            crate::model::tags::CLUSTER_PREFIX,
            self.cluster_name
        )
    }

    /// Every page of a listing, each page one [`Self::call`]. `request`
    /// sends the request for a page marker (none for the first page), and
    /// `next` reads the marker of the page after it: ELBv2's `NextMarker`,
    /// EC2's `NextToken` (an empty one ends the listing too).
    async fn all_pages<P, E, R, Fut>(
        &self,
        operation: &'static str,
        request: impl Fn(Option<String>) -> Fut,
        next: impl Fn(&P) -> Option<&str>,
    ) -> Result<Vec<P>, AwsError>
    where
        Fut: Future<Output = Result<P, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        let mut pages = Vec::new();
        let mut marker = None;
        loop {
            let page = self.call(operation, request(marker)).await?;
            marker = next(&page).filter(|m| !m.is_empty()).map(str::to_string);
            pages.push(page);
            if marker.is_none() {
                return Ok(pages);
            }
        }
    }

    /// Runs one SDK call, counting it and classifying its error.
    async fn call<T, E, R>(
        &self,
        operation: &'static str,
        request: impl Future<Output = Result<T, SdkError<E, R>>>,
    ) -> Result<T, AwsError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        let category = category(operation);
        if let Some(bucket) = self.limiter.bucket(category) {
            let waited = match current_lane() {
                Lane::Foreground => {
                    let wait = bucket.reserve();
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    wait
                }
                Lane::Background => bucket.take_background().await,
            };
            if !waited.is_zero() {
                self.calls.throttled(category, waited);
            }
        }
        match request.await {
            Ok(v) => {
                self.calls.record(operation, "ok");
                if let Some(limit) = self.exit_after_writes
                    && !is_read(operation)
                    && self.calls.ok_writes.fetch_add(1, Ordering::Relaxed) + 1 >= limit
                {
                    // Like SIGKILL: no cleanup, no flush, nothing after this write.
                    eprintln!(
                        "CAUSEWAY_TEST_EXIT_AFTER_WRITES={limit}: aborting after {operation}"
                    );
                    std::process::abort();
                }
                Ok(v)
            }
            Err(err) => {
                let code = err.code().map(str::to_string);
                let kind = match (&err, code.as_deref()) {
                    (SdkError::TimeoutError(_) | SdkError::DispatchFailure(_), _) => {
                        AwsErrorKind::Retryable
                    }
                    (_, Some(c)) if RETRYABLE_CODES.contains(&c) => AwsErrorKind::Retryable,
                    (_, Some(c)) if c.ends_with("NotFound") || c.ends_with(".NotFound") => {
                        AwsErrorKind::NotFound
                    }
                    _ => AwsErrorKind::Refused,
                };
                self.calls.record(
                    operation,
                    if kind == AwsErrorKind::Retryable {
                        "retryable_error"
                    } else {
                        "error"
                    },
                );
                let message = match err.message() {
                    Some(m) => format!("{} ({m})", code.as_deref().unwrap_or("error")),
                    None => DisplayErrorContext(&err).to_string(),
                };
                Err(AwsError {
                    operation,
                    code,
                    message,
                    kind,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let bucket = TokenBucket::new(10.0).unwrap();
        let waits: Vec<std::time::Duration> = (0..25).map(|_| bucket.reserve()).collect();
        assert!(waits[..20].iter().all(|w| w.is_zero()), "{waits:?}");
        // The 21st token is 0.1 s away, the 25th 0.5 s (less the time the
        // loop took, which a busy machine can stretch).
        assert!(waits[20].as_secs_f64() > 0.05 && waits[20].as_secs_f64() <= 0.1);
        assert!(waits[24].as_secs_f64() > 0.45 && waits[24].as_secs_f64() <= 0.5);
        assert!(TokenBucket::new(0.0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_foreground_call_passes_queued_background_calls() {
        let bucket = std::sync::Arc::new(TokenBucket::new(10.0).unwrap());
        let start = tokio::time::Instant::now();
        // An audit round: 60 background calls, 20 from the burst, then 10/s.
        let audits: Vec<_> = (0..60)
            .map(|_| {
                let bucket = bucket.clone();
                tokio::spawn(async move {
                    bucket.take_background().await;
                    start.elapsed()
                })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(bucket.background.try_lock().is_err(), "audits queue");
        // About 30 background calls still wait; a change waits for one token
        // at most (it waited 3 s behind them when all calls queued in order).
        let wait = bucket.reserve();
        assert!(wait <= std::time::Duration::from_millis(100), "{wait:?}");
        let mut done = Vec::new();
        for audit in audits {
            done.push(audit.await.unwrap());
        }
        done.sort();
        // The rate held for both lanes together: 61 tokens, 20 of them the
        // burst, so the last at 4.1 s.
        let last = done[59].as_millis();
        assert!((4050..=4200).contains(&last), "{last} ms");
        assert!(bucket.background.try_lock().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_background_call_waits_for_foreground_reservations() {
        let bucket = TokenBucket::new(10.0).unwrap();
        // The burst of 20 and 5 tokens more reserved by foreground calls.
        for _ in 0..25 {
            bucket.reserve();
        }
        let waited = bucket.take_background().await;
        // Those 5 tokens first (0.5 s), then its own (0.1 s).
        assert!((590..=610).contains(&waited.as_millis()), "{waited:?}");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert_eq!(bucket.take_background().await, std::time::Duration::ZERO);
    }

    #[tokio::test]
    async fn calls_are_foreground_unless_run_in_background() {
        assert_eq!(current_lane(), Lane::Foreground);
        assert_eq!(
            in_background(async { current_lane() }).await,
            Lane::Background
        );
        assert_eq!(current_lane(), Lane::Foreground);
    }

    #[test]
    fn operations_fall_into_three_categories() {
        assert_eq!(category("DescribeTags"), "describe");
        assert_eq!(category("DeregisterTargets"), "register");
        assert_eq!(category("CreateLoadBalancer"), "modify");
        assert_eq!(category("AuthorizeSecurityGroupIngress"), "modify");
    }
}

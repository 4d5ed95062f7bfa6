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
//! survives it fails the reconcile, which is retried per Service.

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
}

impl AwsCalls {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "causeway_aws_calls",
            "AWS API calls by operation and outcome",
            self.by_operation.clone(),
        );
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

/// Clients and what the adapter learned once about the account.
pub struct Aws {
    elb: aws_sdk_elasticloadbalancingv2::Client,
    ec2: aws_sdk_ec2::Client,
    cluster_name: String,
    calls: std::sync::Arc<AwsCalls>,
    /// The cluster's VPC (target groups need it), from the node SG.
    vpc_id: OnceCell<String>,
}

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
        }
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
        match request.await {
            Ok(v) => {
                self.calls.record(operation, "ok");
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

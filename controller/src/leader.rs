//! Leader election on a coordination.k8s.io Lease (SPEC 1.5), behind one
//! function: [`acquire`] returns once this process leads. From then on, losing
//! the lease exits the process at once, so a former leader never writes and
//! restarts clean. Followers wait in [`acquire`] with their caches warm.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kube_lease_manager::LeaseManagerBuilder;

use crate::metrics::Metrics;

/// Lease name, timing and this replica's identity.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    /// Seconds a lease is valid after its last renewal.
    pub duration_seconds: u64,
    /// Seconds between renewals (must be shorter than the duration).
    pub renew_seconds: u64,
}

/// Blocks until this process holds the lease; then watches it and exits the
/// process if it is lost.
pub async fn acquire(
    client: kube::Client,
    settings: LeaseSettings,
    metrics: Arc<Metrics>,
) -> Result<(), kube_lease_manager::LeaseManagerError> {
    let LeaseSettings {
        name,
        namespace,
        identity,
        duration_seconds,
        renew_seconds,
    } = settings;
    // The manager renews `grace` seconds before expiry.
    let grace = duration_seconds.saturating_sub(renew_seconds).max(1);
    let manager = LeaseManagerBuilder::new(client, &name)
        .with_namespace(&namespace)
        .with_identity(&identity)
        .with_duration(duration_seconds)
        .with_grace(grace)
        .build()
        .await?;
    let (mut leading, _task) = manager.watch().await;
    tracing::info!(lease = %format!("{namespace}/{name}"), %identity, "waiting for the lease");
    while !*leading.borrow_and_update() {
        if leading.changed().await.is_err() {
            tracing::error!("lease watcher stopped before acquiring the lease");
            std::process::exit(1);
        }
    }
    metrics.leader.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "acquired the lease; reconciling");
    tokio::spawn(async move {
        loop {
            let lost = leading.changed().await.is_err() || !*leading.borrow();
            if lost {
                tracing::error!(%identity, "lost the lease; exiting so that no write happens without it");
                std::process::exit(1);
            }
        }
    });
    Ok(())
}

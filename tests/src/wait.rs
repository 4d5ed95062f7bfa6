//! Waiting for what a user would wait for: poll until a condition holds, or
//! fail with what was awaited.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Polls `check` every 200 ms until it returns `Some`, or fails after `timeout`
/// naming `what` was awaited.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

//! Metrics both programs export beside their own, under the names every
//! Prometheus client and client-go use, so that the dashboards built for
//! kube-proxy and for Kubernetes controllers chart them: the process's CPU,
//! memory and file descriptors, and the API client's requests.
#![forbid(unsafe_code)]

pub mod process;
pub mod rest_client;

/// The value of the sample named exactly `name` (labels included, as
/// written) in a text exposition, for tests that read `/metrics`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
}

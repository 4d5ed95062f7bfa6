//! What both programs share around their own work. Mostly metrics exported
//! beside their own, under the names every Prometheus client and client-go
//! use, so that the dashboards built for kube-proxy and for Kubernetes
//! controllers chart them: the process's CPU, memory and file descriptors,
//! and the API client's requests. Also the sockets their metrics and health
//! servers listen on, and the Go-syntax durations of their flags, so that
//! both behave as the Go programs they sit beside.
#![forbid(unsafe_code)]

pub mod duration;
pub mod listen;
pub mod process;
pub mod rest_client;

/// The value of the sample named exactly `name` (labels included, as
/// written) in a text exposition, for tests that read `/metrics`.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
}

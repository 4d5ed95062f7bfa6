//! The `process_*` metrics every Prometheus client library exports: CPU
//! time, resident and virtual memory, open and maximum file descriptors,
//! start time and threads, read from /proc at each scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The `process_*` metrics of this process, read from /proc at each scrape
/// (the names every Prometheus client library uses).
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = metrics_process::collector::collect();
        if let Some(seconds) = now.cpu_seconds_total {
            let counter = ConstCounter::new(seconds);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                counter.metric_type(),
            )?)?;
        }
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                now.resident_memory_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                now.virtual_memory_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                now.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                now.max_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                now.start_time_seconds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process",
                now.threads,
            ),
        ] {
            let Some(value) = value else { continue };
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    fn sample(text: &str, name: &str) -> f64 {
        crate::sample(text, name).unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
    }

    #[test]
    fn process_metrics_describe_this_process() {
        // Spend some CPU first: the kernel counts it in 10 ms ticks.
        let started = std::time::Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(50) {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        // This test process holds far more than a megabyte and at least
        // stdin, stdout and stderr.
        assert!(
            sample(&text, "process_resident_memory_bytes") > 1e6,
            "{text}"
        );
        assert!(sample(&text, "process_open_fds") >= 3.0, "{text}");
        assert!(sample(&text, "process_cpu_seconds_total") > 0.0, "{text}");
        assert!(
            text.contains("# TYPE process_cpu_seconds counter"),
            "{text}"
        );
        let started = sample(&text, "process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            started <= now && started > now - 3600.0,
            "{started} vs {now}"
        );
    }
}

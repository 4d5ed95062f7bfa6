//! kube-proxy's conntrack tuning, done once at start: the table's size
//! (`nf_conntrack_max`, only ever raised, and the hash size with it) and the
//! TCP and UDP timeouts, from kube-proxy's flags or its file's `conntrack`
//! section, with kube-proxy's defaults. A node that moves from kube-proxy to
//! the agent keeps the values it had, and a new node gets them too.
//!
//! A value the user gave that cannot be set stops the agent, as in
//! kube-proxy; one that restates kube-proxy's default (EKS's ConfigMap spells
//! them all out) counts as the default. A default that cannot be set is a
//! warning: the agent may run
//! where these are out of its reach (a network namespace other than the
//! node's, where `nf_conntrack_max` is read-only, or a container without a
//! writable /proc/sys), and a tuning default is no reason to leave a node
//! without Service rules.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::sysctl;

/// kube-proxy's defaults (v1alpha1).
pub const DEFAULT_MAX_PER_CORE: u32 = 32 * 1024;
pub const DEFAULT_MIN: u32 = 128 * 1024;
pub const DEFAULT_TCP_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_TCP_CLOSE_WAIT_TIMEOUT: Duration = Duration::from_secs(3600);

/// kube-proxy caps the per-CPU product here, so that a machine with many
/// CPUs does not get a table of many millions of entries.
const SCALED_MAX_CAP: u64 = 1024 * 1024;

/// The flags, by kube-proxy's names (the file's fields are named with them
/// in the messages).
pub const MAX_PER_CORE: &str = "conntrack-max-per-core";
pub const MIN: &str = "conntrack-min";
pub const TCP_ESTABLISHED_TIMEOUT: &str = "conntrack-tcp-timeout-established";
pub const TCP_CLOSE_WAIT_TIMEOUT: &str = "conntrack-tcp-timeout-close-wait";
pub const UDP_TIMEOUT: &str = "conntrack-udp-timeout";
pub const UDP_STREAM_TIMEOUT: &str = "conntrack-udp-timeout-stream";

/// What to set; zero leaves a setting as the node has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    pub max_per_core: u32,
    pub min: u32,
    pub tcp_established_timeout: Duration,
    pub tcp_close_wait_timeout: Duration,
    pub udp_timeout: Duration,
    pub udp_stream_timeout: Duration,
}

impl Tuning {
    /// Whether `flag`'s setting is other than kube-proxy's default: then the
    /// user asked for it (a flag or the file; one that restates the default
    /// counts as the default), and it must take effect.
    fn insists_on(&self, flag: &str) -> bool {
        let defaults = Tuning::default();
        match flag {
            MAX_PER_CORE => self.max_per_core != defaults.max_per_core,
            MIN => self.min != defaults.min,
            TCP_ESTABLISHED_TIMEOUT => {
                self.tcp_established_timeout != defaults.tcp_established_timeout
            }
            TCP_CLOSE_WAIT_TIMEOUT => {
                self.tcp_close_wait_timeout != defaults.tcp_close_wait_timeout
            }
            UDP_TIMEOUT => self.udp_timeout != defaults.udp_timeout,
            UDP_STREAM_TIMEOUT => self.udp_stream_timeout != defaults.udp_stream_timeout,
            _ => false,
        }
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            max_per_core: DEFAULT_MAX_PER_CORE,
            min: DEFAULT_MIN,
            tcp_established_timeout: DEFAULT_TCP_ESTABLISHED_TIMEOUT,
            tcp_close_wait_timeout: DEFAULT_TCP_CLOSE_WAIT_TIMEOUT,
            udp_timeout: Duration::ZERO,
            udp_stream_timeout: Duration::ZERO,
        }
    }
}

/// The table size kube-proxy aims for: `max_per_core` × `cpus`, capped at
/// 1 048 576, and at least `min`; `None` when `max_per_core` is 0 (leave it).
/// (kube-proxy lets the cap win over a larger `min`; here `min` wins, as its
/// flag's help promises: "regardless of conntrack-max-per-core".)
pub fn table_size(max_per_core: u32, min: u32, cpus: u64) -> Option<u64> {
    (max_per_core > 0).then(|| {
        (u64::from(max_per_core) * cpus)
            .min(SCALED_MAX_CAP)
            .max(u64::from(min))
    })
}

/// The node's CPUs, online ones, not only those this process may run on:
/// the table serves the whole node (kube-proxy counts them from sysfs too).
pub fn node_cpus() -> u64 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|list| count_cpu_list(&list))
        .or_else(|| {
            std::thread::available_parallelism()
                .ok()
                .map(|n| n.get() as u64)
        })
        .unwrap_or(1)
}

/// Counts a kernel CPU list such as `0-3,8,10-11`.
pub fn count_cpu_list(list: &str) -> Option<u64> {
    let mut count = 0;
    for range in list.trim().split(',').filter(|r| !r.is_empty()) {
        let (first, last) = match range.split_once('-') {
            Some((first, last)) => (first.parse::<u64>().ok()?, last.parse::<u64>().ok()?),
            None => {
                let cpu = range.parse::<u64>().ok()?;
                (cpu, cpu)
            }
        };
        count += last.checked_sub(first)? + 1;
    }
    (count > 0).then_some(count)
}

/// Where the settings live; tests point these elsewhere.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `/proc/sys/net/netfilter` (this network namespace's).
    pub netfilter: PathBuf,
    /// The nf_conntrack module's `hashsize` parameter (the whole node's).
    pub hashsize: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            netfilter: PathBuf::from("/proc/sys/net/netfilter"),
            hashsize: PathBuf::from("/sys/module/nf_conntrack/parameters/hashsize"),
        }
    }
}

/// What [`apply`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Settings written, as `(sysctl, value)`.
    pub set: Vec<(String, u64)>,
    /// Defaults that could not be set, and the hash size left small; each
    /// says why and what to do.
    pub warnings: Vec<String>,
}

/// Sets what `tuning` asks for, each setting only where it differs (the
/// table size only where it is smaller). Errs on the first setting the user
/// gave that cannot be set.
pub fn apply(tuning: &Tuning, cpus: u64, paths: &Paths) -> Result<Applied, String> {
    let mut applied = Applied::default();
    if let Some(target) = table_size(tuning.max_per_core, tuning.min, cpus) {
        let given = tuning.insists_on(MAX_PER_CORE) || tuning.insists_on(MIN);
        raise_table_size(paths, target, cpus, tuning, given, &mut applied)?;
    }
    for (flag, field, setting, timeout) in [
        (
            TCP_ESTABLISHED_TIMEOUT,
            "conntrack.tcpEstablishedTimeout",
            "nf_conntrack_tcp_timeout_established",
            tuning.tcp_established_timeout,
        ),
        (
            TCP_CLOSE_WAIT_TIMEOUT,
            "conntrack.tcpCloseWaitTimeout",
            "nf_conntrack_tcp_timeout_close_wait",
            tuning.tcp_close_wait_timeout,
        ),
        (
            UDP_TIMEOUT,
            "conntrack.udpTimeout",
            "nf_conntrack_udp_timeout",
            tuning.udp_timeout,
        ),
        (
            UDP_STREAM_TIMEOUT,
            "conntrack.udpStreamTimeout",
            "nf_conntrack_udp_timeout_stream",
            tuning.udp_stream_timeout,
        ),
    ] {
        if timeout.is_zero() {
            continue;
        }
        // Whole seconds, as the kernel takes them; a fraction rounds up, so
        // that a timeout given is never written as 0.
        let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        match sysctl::ensure(paths.netfilter.join(setting), &seconds.to_string()) {
            Ok(false) => {}
            Ok(true) => applied
                .set
                .push((format!("net.netfilter.{setting}"), seconds)),
            Err(e) => {
                let hint = if refused_by_the_kernel(&e) {
                    ""
                } else {
                    "run the agent with a writable /proc/sys (privileged), or "
                };
                let problem = format!(
                    "cannot set net.netfilter.{setting} to {seconds} (--{flag}, {field}): {}; \
                     {hint}pass --{flag}=0 to leave it as the node has it",
                    describe(&e)
                );
                fail(tuning.insists_on(flag), problem, &mut applied)?;
            }
        }
    }
    Ok(applied)
}

/// Raises `nf_conntrack_max` to `target` if it is lower, and the hash size
/// to a quarter of it, as kube-proxy does.
fn raise_table_size(
    paths: &Paths,
    target: u64,
    cpus: u64,
    tuning: &Tuning,
    given: bool,
    applied: &mut Applied,
) -> Result<(), String> {
    let path = paths.netfilter.join("nf_conntrack_max");
    let current = sysctl::read_number(&path);
    // Large enough already, or 0, which is no limit at all: never lowered.
    if current
        .as_ref()
        .is_ok_and(|current| *current >= target || *current == 0)
    {
    } else if let Err(e) = std::fs::write(&path, target.to_string()) {
        let from = match &current {
            Ok(current) => format!(" from {current}"),
            Err(_) => String::new(),
        };
        let hint = if refused_by_the_kernel(&e) {
            ""
        } else {
            "only the node's own network namespace can set it, with a writable /proc/sys. \
             Set it on the node, or "
        };
        let problem = format!(
            "cannot raise net.netfilter.nf_conntrack_max{from} to {target} \
             (--{MAX_PER_CORE} {} × {cpus} CPUs, at least --{MIN} {}; conntrack.maxPerCore, \
             conntrack.min): {}; {hint}pass --{MAX_PER_CORE}=0 to leave it",
            tuning.max_per_core,
            tuning.min,
            describe(&e)
        );
        return fail(given, problem, applied);
    } else {
        applied
            .set
            .push(("net.netfilter.nf_conntrack_max".to_string(), target));
    }
    // The buckets: a table filled beyond four entries per bucket slows every
    // new connection's lookup. Only the node's own namespace may resize it,
    // and only with a writable /sys; kube-proxy, too, went on without.
    let wanted = target / 4;
    match sysctl::read_number(&paths.hashsize) {
        Ok(hashsize) if hashsize >= wanted => {}
        Ok(hashsize) => match std::fs::write(&paths.hashsize, wanted.to_string()) {
            Ok(()) => applied
                .set
                .push(("nf_conntrack hashsize".to_string(), wanted)),
            Err(e) => applied.warnings.push(format!(
                "cannot raise conntrack's hash size ({}) from {hashsize} to {wanted}: {}; \
                 lookups slow down as the table fills beyond {}",
                paths.hashsize.display(),
                describe(&e),
                hashsize * 4
            )),
        },
        Err(e) => applied.warnings.push(format!(
            "cannot read conntrack's hash size ({}): {}",
            paths.hashsize.display(),
            describe(&e)
        )),
    }
    Ok(())
}

/// A setting the user gave is an error; a default, a warning.
fn fail(given: bool, problem: String, applied: &mut Applied) -> Result<(), String> {
    if given {
        return Err(problem);
    }
    applied
        .warnings
        .push(format!("{problem} (a kube-proxy default)"));
    Ok(())
}

/// Whether the kernel took the write and refused the value itself (out of
/// its range), rather than the write being denied.
fn refused_by_the_kernel(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::InvalidInput
}

/// An I/O error in words, with the likely cause.
fn describe(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => format!("{error} (is nf_conntrack loaded?)"),
        io::ErrorKind::InvalidInput => format!("{error} (the kernel refuses this value)"),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc/sys/net/netfilter and hashsize, as the kernel writes them.
    fn node(max: u64, hashsize: u64) -> (tempfile::TempDir, Paths) {
        let dir = tempfile::tempdir().unwrap();
        let netfilter = dir.path().join("netfilter");
        std::fs::create_dir(&netfilter).unwrap();
        for (name, value) in [
            ("nf_conntrack_max", max),
            ("nf_conntrack_tcp_timeout_established", 432_000),
            ("nf_conntrack_tcp_timeout_close_wait", 60),
            ("nf_conntrack_udp_timeout", 30),
            ("nf_conntrack_udp_timeout_stream", 120),
        ] {
            std::fs::write(netfilter.join(name), format!("{value}\n")).unwrap();
        }
        let hashsize_path = dir.path().join("hashsize");
        std::fs::write(&hashsize_path, format!("{hashsize}\n")).unwrap();
        (
            dir,
            Paths {
                netfilter,
                hashsize: hashsize_path,
            },
        )
    }

    fn value(paths: &Paths, name: &str) -> u64 {
        sysctl::read_number(paths.netfilter.join(name)).unwrap()
    }

    #[test]
    fn the_table_size_scales_with_cpus_between_min_and_the_cap() {
        // kube-proxy's defaults on 2, 8 and 64 CPUs.
        assert_eq!(table_size(32_768, 131_072, 2), Some(131_072));
        assert_eq!(table_size(32_768, 131_072, 8), Some(262_144));
        assert_eq!(table_size(32_768, 131_072, 64), Some(1_048_576));
        // 0 per core: left alone, whatever the minimum.
        assert_eq!(table_size(0, 131_072, 8), None);
        // A minimum above the cap is kept.
        assert_eq!(table_size(32_768, 2_000_000, 64), Some(2_000_000));
        assert_eq!(table_size(u32::MAX, 0, 4096), Some(1_048_576));
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn defaults_set_kube_proxys_values_and_raise_a_small_table() {
        let (_dir, paths) = node(65_536, 16_384);
        let applied = apply(&Tuning::default(), 2, &paths).unwrap();
        assert_eq!(
            applied.set,
            [
                ("net.netfilter.nf_conntrack_max".to_string(), 131_072),
                ("nf_conntrack hashsize".to_string(), 32_768),
                (
                    "net.netfilter.nf_conntrack_tcp_timeout_established".to_string(),
                    86_400
                ),
                (
                    "net.netfilter.nf_conntrack_tcp_timeout_close_wait".to_string(),
                    3_600
                ),
            ]
        );
        assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
        assert_eq!(value(&paths, "nf_conntrack_max"), 131_072);
        assert_eq!(sysctl::read_number(&paths.hashsize).unwrap(), 32_768);
        assert_eq!(
            value(&paths, "nf_conntrack_tcp_timeout_established"),
            86_400
        );
        // UDP: kube-proxy's default is to leave them.
        assert_eq!(value(&paths, "nf_conntrack_udp_timeout"), 30);
        // Everything in place: nothing is written the second time.
        assert_eq!(
            apply(&Tuning::default(), 2, &paths).unwrap(),
            Applied::default()
        );
    }

    #[test]
    fn a_larger_table_is_never_lowered() {
        let (_dir, paths) = node(262_144, 65_536);
        let applied = apply(&Tuning::default(), 2, &paths).unwrap();
        assert!(
            applied
                .set
                .iter()
                .all(|(name, _)| !name.contains("max") && !name.contains("hash")),
            "{:?}",
            applied.set
        );
        assert_eq!(value(&paths, "nf_conntrack_max"), 262_144);
    }

    #[test]
    fn zero_leaves_a_setting_and_given_values_are_written() {
        let (_dir, paths) = node(65_536, 16_384);
        let tuning = Tuning {
            max_per_core: 0,
            tcp_established_timeout: Duration::from_secs(7200),
            tcp_close_wait_timeout: Duration::ZERO,
            udp_timeout: Duration::from_millis(44_500),
            udp_stream_timeout: Duration::from_secs(180),
            ..Tuning::default()
        };
        apply(&tuning, 2, &paths).unwrap();
        assert_eq!(value(&paths, "nf_conntrack_max"), 65_536);
        assert_eq!(value(&paths, "nf_conntrack_tcp_timeout_established"), 7200);
        assert_eq!(value(&paths, "nf_conntrack_tcp_timeout_close_wait"), 60);
        // 44.5 s: rounded up, never down to a shorter timeout than asked.
        assert_eq!(value(&paths, "nf_conntrack_udp_timeout"), 45);
        assert_eq!(value(&paths, "nf_conntrack_udp_timeout_stream"), 180);
    }

    #[test]
    fn what_cannot_be_set_stops_the_agent_if_given_and_warns_if_a_default() {
        // A missing file stands for one that cannot be written (conntrack
        // not loaded); root ignores file modes, so a read-only file would not.
        let (_dir, mut paths) = node(65_536, 65_536);
        paths.netfilter = paths.netfilter.join("missing");
        let applied = apply(&Tuning::default(), 2, &paths).unwrap();
        assert_eq!(applied.set, []);
        assert_eq!(applied.warnings.len(), 3, "{:?}", applied.warnings);
        assert!(
            applied.warnings[0]
                .starts_with("cannot raise net.netfilter.nf_conntrack_max to 131072")
                && applied.warnings[0].contains("--conntrack-max-per-core=0")
                && applied.warnings[0].contains("is nf_conntrack loaded?")
                && applied.warnings[0].ends_with("(a kube-proxy default)"),
            "{}",
            applied.warnings[0]
        );
        assert!(
            applied.warnings[1]
                .contains("net.netfilter.nf_conntrack_tcp_timeout_established to 86400")
                && applied.warnings[1].contains("--conntrack-tcp-timeout-established=0"),
            "{}",
            applied.warnings[1]
        );

        let given_min = Tuning {
            min: 4_000_000,
            ..Tuning::default()
        };
        let error = apply(&given_min, 2, &paths).unwrap_err();
        assert!(
            error.starts_with("cannot raise net.netfilter.nf_conntrack_max to 4000000")
                && error.contains("at least --conntrack-min 4000000"),
            "{error}"
        );
        let given_timeout = Tuning {
            max_per_core: 0,
            tcp_close_wait_timeout: Duration::from_secs(600),
            ..Tuning::default()
        };
        let error = apply(&given_timeout, 2, &paths).unwrap_err();
        assert!(
            error.contains("nf_conntrack_tcp_timeout_close_wait to 600 (--conntrack-tcp-timeout-close-wait, conntrack.tcpCloseWaitTimeout)"),
            "{error}"
        );
        // Off the default by a second is asked for, and must take effect.
        let other = Tuning {
            tcp_established_timeout: Duration::from_secs(86_401),
            ..Tuning::default()
        };
        assert!(apply(&other, 2, &paths).is_err());
    }

    #[test]
    fn an_unlimited_table_stays_unlimited() {
        let (_dir, paths) = node(0, 16_384);
        apply(&Tuning::default(), 2, &paths).unwrap();
        assert_eq!(value(&paths, "nf_conntrack_max"), 0);
    }

    #[test]
    fn a_hash_size_that_cannot_grow_is_a_warning() {
        let (_dir, mut paths) = node(65_536, 16_384);
        paths.hashsize = paths.hashsize.with_file_name("missing/hashsize");
        let applied = apply(&Tuning::default(), 2, &paths).unwrap();
        assert_eq!(value(&paths, "nf_conntrack_max"), 131_072);
        assert_eq!(applied.warnings.len(), 1, "{:?}", applied.warnings);
        assert!(applied.warnings[0].starts_with("cannot read conntrack's hash size"));
    }
}

//! kube-proxy's two netfilter accounting counters, which tell a user whether
//! the node depends on what only the iptables mode does: packets dropped as
//! conntrack INVALID (kubernetes#74839's workaround) and packets accepted on
//! NodePorts at 127.0.0.1. Rules count into them with `-m nfacct`; the
//! objects live in the network namespace and survive rule rewrites, so the
//! counts keep growing across syncs. Driven through the `nfacct` program
//! (Debian package `nfacct`), as conntrack is through `conntrack`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::program;

/// kube-proxy's counter for the INVALID drop in `KUBE-FORWARD`.
pub const CT_STATE_INVALID_DROPPED: &str = "ct_state_invalid_dropped_pkts";
/// kube-proxy's counter for NodePort packets to 127.0.0.0/8.
pub const LOCALHOST_NODEPORTS_ACCEPTED: &str = "localhost_nps_accepted_pkts";

/// Creates the counter `name` unless it exists.
pub fn ensure(name: &str) -> Result<(), String> {
    if packets(name).is_ok() {
        return Ok(());
    }
    let out = Command::new("nfacct")
        .args(["add", name])
        .output()
        .map_err(|e| format!("cannot run nfacct: {e}"))?;
    // Another agent may have added it in between.
    if out.status.success() || packets(name).is_ok() {
        return Ok(());
    }
    Err(format!(
        "nfacct add {name}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// The packets counted so far by `name`.
pub fn packets(name: &str) -> Result<u64, String> {
    let out = Command::new("nfacct")
        .args(["get", name])
        .output()
        .map_err(|e| format!("cannot run nfacct: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nfacct get {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_packets(&String::from_utf8_lossy(&out.stdout), name)
        .ok_or_else(|| format!("nfacct get {name}: no packet count in its output"))
}

/// Every counter's packets, by name, from one `nfacct list`, which is
/// killed after `timeout`: a scrape must not wait on it for long.
pub fn all_packets(timeout: Duration) -> Result<BTreeMap<String, u64>, String> {
    match program::run_within("nfacct", &["list"], timeout) {
        Ok(done) => Ok(parse_list(&done.stdout)),
        Err(program::Failure::TimedOut) => {
            Err(format!("nfacct list: no answer within {timeout:?}"))
        }
        Err(program::Failure::Missing) => Err("cannot run nfacct: not found".to_string()),
        Err(program::Failure::Spawn(e)) => Err(format!("cannot run nfacct: {e}")),
    }
}

/// `nfacct`'s lines, `{ pkts = 00000000000000000042, bytes =
/// 00000000000000002520 } = name;`, as packets by counter name.
pub fn parse_list(output: &str) -> BTreeMap<String, u64> {
    output
        .lines()
        .filter_map(|line| {
            let (counts, counter) = line.rsplit_once(" = ")?;
            let packets = counts.split("pkts = ").nth(1)?;
            let packets = packets.split(',').next()?.trim().parse().ok()?;
            Some((counter.trim().trim_end_matches(';').to_string(), packets))
        })
        .collect()
}

/// The packet count in `nfacct get`'s line for `name`.
pub fn parse_packets(output: &str, name: &str) -> Option<u64> {
    parse_list(output).get(name).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packet_count_is_read_from_nfacct_get() {
        let out = "{ pkts = 00000000000000000042, bytes = 00000000000000002520 } = \
                   ct_state_invalid_dropped_pkts;\n";
        assert_eq!(parse_packets(out, CT_STATE_INVALID_DROPPED), Some(42));
        assert_eq!(parse_packets(out, LOCALHOST_NODEPORTS_ACCEPTED), None);
        assert_eq!(parse_packets("", CT_STATE_INVALID_DROPPED), None);
        let list = format!(
            "{out}{{ pkts = 00000000000000000007, bytes = 00000000000000000420 }} = \
             localhost_nps_accepted_pkts;\n"
        );
        assert_eq!(
            parse_list(&list),
            BTreeMap::from([
                (CT_STATE_INVALID_DROPPED.to_string(), 42),
                (LOCALHOST_NODEPORTS_ACCEPTED.to_string(), 7)
            ])
        );
        assert_eq!(
            parse_packets(
                "{ pkts = x, bytes = 0 } = ct_state_invalid_dropped_pkts;",
                CT_STATE_INVALID_DROPPED
            ),
            None
        );
    }
}

//! The kernel settings under /proc/sys that the agent needs, written only
//! when they differ, as kube-proxy's EnsureSysctl does: an agent whose
//! /proc/sys is read-only (a container with NET_ADMIN only) then runs on a
//! node where they were set before, by an earlier agent or an init container.

use std::io;
use std::path::Path;

/// `net.ipv4.conf.all.route_localnet`, which NodePorts on 127.0.0.1 need.
pub const ROUTE_LOCALNET: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";

/// `net.netfilter.nf_conntrack_tcp_be_liberal`: conntrack's liberal TCP mode.
pub const CONNTRACK_TCP_BE_LIBERAL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";

/// The setting at `path`, without its newline.
pub fn read(path: impl AsRef<Path>) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

/// The numeric setting at `path`.
pub fn read_number(path: impl AsRef<Path>) -> io::Result<u64> {
    read(path)?
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sets `path` to `value` unless it holds that already; true if it wrote.
pub fn ensure(path: impl AsRef<Path>, value: &str) -> io::Result<bool> {
    let path = path.as_ref();
    if read(path).is_ok_and(|current| current == value) {
        return Ok(false);
    }
    std::fs::write(path, value)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_is_written_only_when_it_differs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("setting");
        let path = path.to_str().unwrap();
        std::fs::write(path, "0\n").unwrap();
        assert!(ensure(path, "1").unwrap());
        assert_eq!(std::fs::read_to_string(path).unwrap(), "1");
        // Already 1: left as the kernel wrote it, newline and all.
        std::fs::write(path, "1\n").unwrap();
        assert!(!ensure(path, "1").unwrap());
        assert_eq!(std::fs::read_to_string(path).unwrap(), "1\n");
        assert_eq!(read(path).unwrap(), "1");
        assert_eq!(read_number(path).unwrap(), 1);
        // Nothing there (a module not loaded): the write's error.
        let missing = dir.path().join("missing/setting");
        let error = ensure(missing.to_str().unwrap(), "1").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}

//! kube-proxy's chain names, so `iptables-save | grep KUBE-SVC-…` runbooks and
//! `-m recent` affinity lists keep working across a switch from kube-proxy.
//!
//! `<h>` is the first 16 characters of base32(sha256(`"ns/name:port" + "tcp"`));
//! endpoint names hash the same string followed by `ip:port`.

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use crate::model::{Endpoint, Protocol, ServicePortName};

fn hash16(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
    }
    let mut encoded = BASE32.encode(&hasher.finalize());
    encoded.truncate(16);
    encoded
}

/// The chain names of one service port, computed once per render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChains {
    /// `KUBE-SVC-<h>`: endpoints for the Cluster traffic policy.
    pub cluster: String,
    /// `KUBE-SVL-<h>`: endpoints for the Local traffic policy.
    pub local: String,
    /// `KUBE-EXT-<h>`: entry for NodePort, LoadBalancer and external IP traffic.
    pub external: String,
    /// `KUBE-FW-<h>`: loadBalancerSourceRanges.
    pub firewall: String,
}

impl ServiceChains {
    pub fn new(name: &ServicePortName, protocol: Protocol) -> Self {
        let h = hash16(&[&name.to_string(), protocol.as_str()]);
        ServiceChains {
            cluster: format!("KUBE-SVC-{h}"),
            local: format!("KUBE-SVL-{h}"),
            external: format!("KUBE-EXT-{h}"),
            firewall: format!("KUBE-FW-{h}"),
        }
    }
}

/// `KUBE-SEP-<h>` of one endpoint of a service port. The agent has no chain
/// of this name; it names the endpoint's `-m recent` session-affinity list,
/// exactly as kube-proxy does, so affinity survives a switch between the two.
pub fn endpoint_chain(name: &ServicePortName, protocol: Protocol, endpoint: &Endpoint) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&[&name.to_string(), protocol.as_str(), &endpoint.address()])
    )
}

/// Prefixes of the nat chains that come and go with the Services, which any
/// version of kube-proxy or this agent created, for finding stale ones: the
/// per-service chains and the dispatch buckets (whose names start with
/// `KUBE-SVC-`, and formerly with `KUBE-SERVICES-`).
pub const SERVICE_CHAIN_PREFIXES: [&str; 7] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
    "KUBE-XLB-",
    super::FORMER_DISPATCH_BUCKET_PREFIX,
];

pub fn is_service_chain(chain: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Locality;

    fn name(ns: &str, svc: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: svc.into(),
            port: port.into(),
        }
    }

    #[test]
    fn service_chain_matches_kube_proxy_test_vector() {
        let chains = ServiceChains::new(&name("ns1", "svc1", "p80"), Protocol::Tcp);
        assert_eq!(chains.cluster, "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(chains.local, "KUBE-SVL-XPGD46QRK7WJZT7O");
        assert_eq!(chains.external, "KUBE-EXT-XPGD46QRK7WJZT7O");
        assert_eq!(chains.firewall, "KUBE-FW-XPGD46QRK7WJZT7O");
    }

    #[test]
    fn protocol_and_port_name_change_the_hash() {
        let tcp = ServiceChains::new(&name("ns1", "svc1", "p80"), Protocol::Tcp);
        let udp = ServiceChains::new(&name("ns1", "svc1", "p80"), Protocol::Udp);
        let unnamed = ServiceChains::new(&name("ns1", "svc1", ""), Protocol::Tcp);
        assert_ne!(tcp.cluster, udp.cluster);
        assert_ne!(tcp.cluster, unnamed.cluster);
        // Unnamed ports hash "ns1/svc1" + "tcp", with no trailing colon.
        assert_eq!(
            unnamed.cluster,
            format!("KUBE-SVC-{}", hash16(&["ns1/svc1tcp"]))
        );
    }

    #[test]
    fn endpoint_chain_hashes_port_name_protocol_and_address() {
        // kube-proxy's own test vector (proxier_test.go): ns1/svc1:p80 tcp to
        // 10.180.0.1:80 is KUBE-SEP-SXIVWICOYRO3J4NJ.
        let endpoint = Endpoint {
            ip: "10.180.0.1".parse().unwrap(),
            port: 80,
            locality: Locality::Unknown,
        };
        let sep = endpoint_chain(&name("ns1", "svc1", "p80"), Protocol::Tcp, &endpoint);
        assert_eq!(sep, "KUBE-SEP-SXIVWICOYRO3J4NJ");
    }
}

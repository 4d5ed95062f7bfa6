//! UDP conntrack cleanup after a sync (SPEC 2.2).
//!
//! A UDP "connection" lives as long as its client keeps sending, so without
//! help a client stays stuck on an endpoint that stopped serving, or on the
//! un-DNATed entry it created while its Service had no endpoints (DNS clients
//! are the classic victims). After each successful sync we delete exactly
//! those entries; TCP is never touched (its clients reconnect on a reset).
//!
//! Which entries to delete is decided purely from the previous and the
//! current model; the `conntrack` tool does the deleting.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;
use std::sync::Arc;

use crate::addr::IpFamily;
use crate::model::{Model, Protocol, ServicePort, ServicePortName};

/// One `conntrack -D` filter, always for UDP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StaleFlows {
    /// Entries DNATed to an endpoint that no longer serves this port:
    /// reply source is the endpoint, original destination port the
    /// Service's port (or node port).
    Endpoint {
        endpoint: IpAddr,
        endpoint_port: u16,
        service_port: u16,
    },
    /// Entries created while the Service had no endpoints: addressed to one
    /// of its IPs and never DNATed (reply source = original destination).
    Undnated { address: IpAddr, port: u16 },
    /// The same for a node port: never DNATed, so the reply comes from the
    /// node port itself.
    UndnatedNodePort { port: u16 },
}

/// Serving endpoints (`ip`, `port`) of one service port.
fn serving(port: &ServicePort) -> BTreeSet<(IpAddr, u16)> {
    port.cluster_endpoints
        .iter()
        .chain(&port.local_endpoints)
        .map(|e| (e.ip, e.port))
        .collect()
}

/// The UDP flows a sync from `previous` to `current` leaves stale.
pub fn stale_udp_flows(previous: &Model, current: &Model) -> BTreeSet<StaleFlows> {
    fn udp(model: &Model) -> BTreeMap<&ServicePortName, &Arc<ServicePort>> {
        model
            .service_ports
            .iter()
            .filter(|p| p.protocol == Protocol::Udp)
            .map(|p| (&p.name, p))
            .collect()
    }
    let before = udp(previous);
    let after = udp(current);
    let mut stale = BTreeSet::new();

    for (name, old) in &before {
        let new = after.get(name);
        // A port the model cache did not rebuild is the same allocation.
        if new.is_some_and(|new| Arc::ptr_eq(old, new)) {
            continue;
        }
        let still = new.map(|p| serving(p)).unwrap_or_default();
        for (endpoint, endpoint_port) in serving(old).difference(&still) {
            for service_port in std::iter::once(old.port).chain(old.node_port) {
                stale.insert(StaleFlows::Endpoint {
                    endpoint: *endpoint,
                    endpoint_port: *endpoint_port,
                    service_port,
                });
            }
        }
    }
    for (name, new) in &after {
        let old = before.get(name);
        // Unchanged: either it had endpoints already or it has none now.
        if old.is_some_and(|old| Arc::ptr_eq(old, new)) {
            continue;
        }
        let had_endpoints = old.is_some_and(|old| !serving(old).is_empty());
        if had_endpoints || serving(new).is_empty() {
            continue;
        }
        let addresses = std::iter::once(new.cluster_ip)
            .chain(new.external_ips.iter().copied())
            .chain(new.load_balancer_ips.iter().copied());
        for address in addresses {
            stale.insert(StaleFlows::Undnated {
                address,
                port: new.port,
            });
        }
        if let Some(port) = new.node_port {
            stale.insert(StaleFlows::UndnatedNodePort { port });
        }
    }
    stale
}

/// One UDP conntrack entry, as `conntrack -L` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub orig_src: IpAddr,
    pub orig_dst: IpAddr,
    pub orig_sport: u16,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

/// The entries in `conntrack -L` output (lines it cannot read are skipped).
pub fn parse_flows(text: &str) -> Vec<Flow> {
    text.lines()
        .filter_map(|line| {
            let mut src = Vec::new();
            let mut dst = Vec::new();
            let mut sport = Vec::new();
            let mut dport = Vec::new();
            for word in line.split_whitespace() {
                match word.split_once('=') {
                    Some(("src", v)) => src.push(v.parse::<IpAddr>().ok()?),
                    Some(("dst", v)) => dst.push(v.parse::<IpAddr>().ok()?),
                    Some(("sport", v)) => sport.push(v.parse::<u16>().ok()?),
                    Some(("dport", v)) => dport.push(v.parse::<u16>().ok()?),
                    _ => {}
                }
            }
            Some(Flow {
                orig_src: *src.first()?,
                orig_dst: *dst.first()?,
                orig_sport: *sport.first()?,
                orig_dport: *dport.first()?,
                reply_src: *src.get(1)?,
                reply_sport: *sport.get(1)?,
            })
        })
        .collect()
}

impl StaleFlows {
    pub fn matches(&self, flow: &Flow) -> bool {
        match self {
            StaleFlows::Endpoint {
                endpoint,
                endpoint_port,
                service_port,
            } => {
                flow.reply_src == *endpoint
                    && flow.reply_sport == *endpoint_port
                    && flow.orig_dport == *service_port
            }
            StaleFlows::Undnated { address, port } => {
                flow.orig_dst == *address && flow.reply_src == *address && flow.orig_dport == *port
            }
            StaleFlows::UndnatedNodePort { port } => {
                flow.orig_dport == *port && flow.reply_sport == *port
            }
        }
    }
}

/// The `conntrack` arguments that delete exactly `flow`.
pub fn delete_args(flow: &Flow, family: IpFamily) -> Vec<String> {
    let family = match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    };
    [
        "-D".to_string(),
        "-f".into(),
        family.into(),
        "-p".into(),
        "udp".into(),
        "--orig-src".into(),
        flow.orig_src.to_string(),
        "--orig-dst".into(),
        flow.orig_dst.to_string(),
        "--orig-port-src".into(),
        flow.orig_sport.to_string(),
        "--orig-port-dst".into(),
        flow.orig_dport.to_string(),
    ]
    .to_vec()
}

/// Deletes the UDP entries any of `stale` matches; returns how many went.
/// One listing per call, then one delete per matching entry (usually none),
/// so the cost does not grow with the number of Services. Failures are
/// logged, not fatal: the entries time out on their own eventually.
pub fn delete(stale: &BTreeSet<StaleFlows>, family: IpFamily) -> u64 {
    let family_name = match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    };
    let listed = match Command::new("conntrack")
        .args(["-L", "-f", family_name, "-p", "udp"])
        .output()
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot run conntrack; stale UDP flows stay until they time out");
            return 0;
        }
    };
    let mut deleted = 0;
    for flow in parse_flows(&listed) {
        if !stale.iter().any(|s| s.matches(&flow)) {
            continue;
        }
        let args = delete_args(&flow, family);
        match Command::new("conntrack").args(&args).output() {
            Ok(out) => match deleted_count(&String::from_utf8_lossy(&out.stderr)) {
                Some(n) => deleted += n,
                None => tracing::warn!(
                    args = %args.join(" "),
                    error = %String::from_utf8_lossy(&out.stderr).trim(),
                    "conntrack cleanup failed"
                ),
            },
            Err(e) => tracing::warn!(error = %e, "cannot run conntrack"),
        }
    }
    deleted
}

/// `N` from conntrack's "N flow entries have been deleted." (it exits 1
/// when N is 0, so the message, not the status, says whether it worked).
pub fn deleted_count(stderr: &str) -> Option<u64> {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words.windows(4).find_map(|w| {
        (w[1] == "flow" && w[2] == "entries" && w[3] == "have")
            .then(|| w[0].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Locality, TrafficPolicy};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn dns(endpoints: &[&str], node_port: Option<u16>) -> ServicePort {
        let eps: Vec<Endpoint> = endpoints
            .iter()
            .map(|e| Endpoint {
                ip: ip(e),
                port: 5353,
                locality: Locality::Remote,
            })
            .collect();
        ServicePort {
            name: ServicePortName {
                namespace: "kube-system".into(),
                name: "dns".into(),
                port: "dns".into(),
            },
            protocol: Protocol::Udp,
            cluster_ip: ip("10.96.0.10"),
            port: 53,
            node_port,
            health_check_node_port: None,
            external_ips: vec![ip("203.0.113.5")],
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            internal_policy: TrafficPolicy::Cluster,
            external_policy: TrafficPolicy::Cluster,
            affinity_timeout_seconds: None,
            has_endpoints: !eps.is_empty(),
            cluster_endpoints: eps,
            local_endpoints: Vec::new(),
            local_ready_endpoints: 0,
        }
    }

    fn model(ports: Vec<ServicePort>) -> Model {
        Model {
            family: IpFamily::V4,
            node: crate::model::NodeInfo::named("n"),
            service_ports: ports.into_iter().map(Arc::new).collect(),
        }
    }

    #[test]
    fn a_removed_endpoint_loses_its_flows_via_port_and_node_port() {
        let before = model(vec![dns(&["10.244.1.5", "10.244.2.5"], Some(30053))]);
        let after = model(vec![dns(&["10.244.2.5"], Some(30053))]);
        let stale: Vec<StaleFlows> = stale_udp_flows(&before, &after).into_iter().collect();
        assert_eq!(
            stale,
            [53, 30053].map(|service_port| StaleFlows::Endpoint {
                endpoint: ip("10.244.1.5"),
                endpoint_port: 5353,
                service_port
            })
        );
    }

    #[test]
    fn a_service_that_gets_endpoints_loses_its_undnated_flows() {
        let before = model(vec![dns(&[], Some(30053))]);
        let after = model(vec![dns(&["10.244.2.5"], Some(30053))]);
        let stale: Vec<StaleFlows> = stale_udp_flows(&before, &after).into_iter().collect();
        assert_eq!(
            stale,
            [
                StaleFlows::Undnated {
                    address: ip("10.96.0.10"),
                    port: 53
                },
                StaleFlows::Undnated {
                    address: ip("203.0.113.5"),
                    port: 53
                },
                StaleFlows::UndnatedNodePort { port: 30053 },
            ]
        );
        // A brand-new Service counts as having had none.
        assert_eq!(stale_udp_flows(&model(vec![]), &after).len(), 3);
    }

    #[test]
    fn nothing_changes_nothing_is_deleted_and_tcp_is_never_touched() {
        let same = model(vec![dns(&["10.244.2.5"], None)]);
        assert!(stale_udp_flows(&same, &same).is_empty());
        let mut tcp = dns(&["10.244.1.5"], None);
        tcp.protocol = Protocol::Tcp;
        let mut tcp_after = tcp.clone();
        tcp_after.cluster_endpoints.clear();
        assert!(stale_udp_flows(&model(vec![tcp]), &model(vec![tcp_after])).is_empty());
    }

    #[test]
    fn listed_flows_are_matched_precisely() {
        let listed = "\
udp      17 25 src=10.244.0.7 dst=10.96.0.10 sport=40000 dport=53 src=10.244.1.5 dst=10.244.0.7 sport=5353 dport=40000 mark=0 use=1
udp      17 28 src=10.244.0.7 dst=10.96.0.10 sport=40002 dport=53 [UNREPLIED] src=10.96.0.10 dst=10.244.0.7 sport=53 dport=40002 mark=0 use=1
udp      17 28 src=192.0.2.9 dst=192.168.0.10 sport=40003 dport=30053 [UNREPLIED] src=192.168.0.10 dst=192.0.2.9 sport=30053 dport=40003 mark=0 use=1
udp      17 29 src=10.244.0.7 dst=10.244.1.5 sport=40001 dport=5353 src=10.244.1.5 dst=10.244.0.7 sport=5353 dport=40001 mark=0 use=1
";
        let flows = parse_flows(listed);
        assert_eq!(flows.len(), 4);
        assert_eq!(flows[0].reply_src, ip("10.244.1.5"));
        let gone = StaleFlows::Endpoint {
            endpoint: ip("10.244.1.5"),
            endpoint_port: 5353,
            service_port: 53,
        };
        // Only the flow through the Service, not the direct one to the pod.
        assert_eq!(flows.iter().filter(|f| gone.matches(f)).count(), 1);
        let undnated = StaleFlows::Undnated {
            address: ip("10.96.0.10"),
            port: 53,
        };
        assert_eq!(
            flows
                .iter()
                .filter(|f| undnated.matches(f))
                .map(|f| f.orig_sport)
                .collect::<Vec<_>>(),
            [40002]
        );
        let node_port = StaleFlows::UndnatedNodePort { port: 30053 };
        assert!(node_port.matches(&flows[2]) && !node_port.matches(&flows[0]));
        assert_eq!(
            delete_args(&flows[1], IpFamily::V4).join(" "),
            "-D -f ipv4 -p udp --orig-src 10.244.0.7 --orig-dst 10.96.0.10 --orig-port-src 40002 --orig-port-dst 53"
        );
    }

    #[test]
    fn the_deleted_count_is_read_from_the_message() {
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"
            ),
            Some(3)
        );
        assert_eq!(
            deleted_count("conntrack v1.4.7 (conntrack-tools): Operation failed"),
            None
        );
    }
}

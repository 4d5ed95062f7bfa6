//! causeway-agent: the kube-proxy compatible iptables data path of every node,
//! and the health checks the NLB probes.
#![forbid(unsafe_code)]

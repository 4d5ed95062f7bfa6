//! causeway-agent: the kube-proxy compatible iptables data path of every node,
//! and the health checks the NLB probes.
#![forbid(unsafe_code)]

pub mod addr;
pub mod agent;
pub mod config;
pub mod conntrack;
pub mod conntrack_tuning;
pub mod debug;
pub mod health;
pub mod kube_proxy_config;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netfilter;
pub mod nfacct;
pub mod program;
pub mod rules;
pub mod serve;
pub mod sysctl;
pub mod trace;

//! causeway-tests: the harness that starts Causeway's local environment (a real
//! kube-apiserver and controller-manager, moto, nodes and pods as network
//! namespaces) and the helpers the integration tests share.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod controller;
pub mod datapath;
pub mod metrics;
pub mod netns;
pub mod paths;
pub mod wait;

pub use cluster::{Cluster, ClusterOptions, Pod};

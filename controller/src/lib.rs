//! causeway-controller: reconciles `type: LoadBalancer` Services into AWS Network
//! Load Balancers whose targets are the nodes' NodePorts.
//!
//! The crate is shaped as DESIGN.md describes: pure modules compute the desired
//! load balancer and the plan to reach it; one adapter talks to AWS.
#![forbid(unsafe_code)]

pub mod annotations;
pub mod aws;
pub mod desired;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod reconcile;

#[cfg(test)]
pub(crate) mod fixtures;

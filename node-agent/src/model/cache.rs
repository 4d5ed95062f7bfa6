//! The model, rebuilt per Service: what `run` uses on every sync.
//!
//! A full [`build`](super::build) parses every Service and EndpointSlice; at
//! 10 000 Services that is a quarter of a second per sync, for a change that
//! touched one of them. The model of a Service depends only on the Service,
//! the EndpointSlices labelled with its name, and this node, so the cache
//! keeps each Service's ports and issues with the resourceVersions they were
//! built from, and rebuilds a Service only when one of those changed. The
//! model equals a full build of the same objects; the issues are the same,
//! in another order.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Issue, LABEL_SERVICE_NAME, Model, NodeInfo, ServicePort, build};
use crate::addr::IpFamily;

/// One Service (or an orphan group of EndpointSlices) as last built.
struct Entry {
    /// `None` when an object had no resourceVersion (manifests from files):
    /// such a group is rebuilt every time.
    versions: Option<Vec<(String, String)>>,
    ports: Vec<Arc<ServicePort>>,
    issues: Vec<Issue>,
}

/// Per-Service model pieces for one IP family, kept between syncs.
pub struct ModelCache {
    family: IpFamily,
    node: Option<NodeInfo>,
    entries: HashMap<(String, String), Entry>,
    /// Services rebuilt by the last [`ModelCache::build`], for the log.
    pub rebuilt: usize,
}

/// The objects of one Service key in this sync.
#[derive(Default)]
struct Group<'a> {
    service: Option<&'a Service>,
    slices: Vec<&'a EndpointSlice>,
}

impl Group<'_> {
    /// (name, resourceVersion) of the Service (if any) then of each slice.
    fn metas(&self) -> impl Iterator<Item = &ObjectMeta> {
        self.service
            .map(|s| &s.metadata)
            .into_iter()
            .chain(self.slices.iter().map(|s| &s.metadata))
    }

    /// Whether these are the objects `versions` was taken from; compared
    /// without allocating, since most groups are unchanged in most syncs.
    fn matches(&self, versions: &[(String, String)]) -> bool {
        let mut metas = self.metas();
        versions.iter().all(|(name, rv)| {
            metas.next().is_some_and(|m| {
                m.name.as_deref() == Some(name.as_str())
                    && m.resource_version.as_deref() == Some(rv.as_str())
            })
        }) && metas.next().is_none()
    }

    fn versions(&self) -> Option<Vec<(String, String)>> {
        self.metas()
            .map(|m| {
                let rv = m.resource_version.clone()?;
                Some((m.name.clone().unwrap_or_default(), rv))
            })
            .collect()
    }
}

impl ModelCache {
    pub fn new(family: IpFamily) -> Self {
        ModelCache {
            family,
            node: None,
            entries: HashMap::new(),
            rebuilt: 0,
        }
    }

    /// The model of these objects, as [`build`] makes it.
    pub fn build(
        &mut self,
        services: &[impl Borrow<Service>],
        slices: &[impl Borrow<EndpointSlice>],
        node: &NodeInfo,
    ) -> (Model, Vec<Issue>) {
        // Locality and topology depend on the node: all of it is stale.
        if self.node.as_ref() != Some(node) {
            self.entries.clear();
            self.node = Some(node.clone());
        }
        // Sorted by namespace and name, which sorts the ports as `build` does
        // (each Service's own ports come sorted from it).
        let mut groups: BTreeMap<(&str, &str), Group<'_>> = BTreeMap::new();
        for service in services.iter().map(Borrow::borrow) {
            let meta = &service.metadata;
            let key = (
                meta.namespace.as_deref().unwrap_or(""),
                meta.name.as_deref().unwrap_or(""),
            );
            groups.entry(key).or_default().service = Some(service);
        }
        for slice in slices.iter().map(Borrow::borrow) {
            let meta = &slice.metadata;
            // A slice without the label belongs to no Service; `build`
            // ignores it too.
            let Some(service) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
                continue;
            };
            let key = (meta.namespace.as_deref().unwrap_or(""), service.as_str());
            groups.entry(key).or_default().slices.push(slice);
        }

        let mut previous = std::mem::take(&mut self.entries);
        let mut service_ports = Vec::new();
        let mut issues = Vec::new();
        self.rebuilt = 0;
        for ((namespace, name), mut group) in groups {
            group
                .slices
                .sort_unstable_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            let key = (namespace.to_string(), name.to_string());
            let entry = match previous.remove(&key) {
                Some(entry) if entry.versions.as_deref().is_some_and(|v| group.matches(v)) => entry,
                _ => {
                    self.rebuilt += 1;
                    let versions = group.versions();
                    let services: Vec<&Service> = group.service.into_iter().collect();
                    let (model, issues) = build(&services, &group.slices, node, self.family);
                    Entry {
                        versions,
                        ports: model.service_ports,
                        issues,
                    }
                }
            };
            service_ports.extend(entry.ports.iter().cloned());
            issues.extend(entry.issues.iter().cloned());
            self.entries.insert(key, entry);
        }
        let model = Model {
            family: self.family,
            node: node.clone(),
            service_ports,
        };
        (model, issues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{
        EndpointBuilder as Ep, NodeBuilder, ServiceBuilder, SliceBuilder,
    };

    fn versioned<K: kube::Resource>(mut object: K, rv: &str) -> K {
        object.meta_mut().resource_version = Some(rv.into());
        object
    }

    fn node() -> NodeInfo {
        let mut issues = Vec::new();
        NodeInfo::from_node(
            &NodeBuilder::new("node-a")
                .internal_ip("192.168.0.10")
                .build(),
            &mut issues,
        )
    }

    fn cluster(web_endpoints: &[&str], rv: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
        let services = vec![
            versioned(
                ServiceBuilder::new("shop", "web")
                    .cluster_ip("10.96.0.10")
                    .port("http", 80, "TCP")
                    .build(),
                "1",
            ),
            versioned(
                ServiceBuilder::new("shop", "db")
                    .cluster_ip("10.96.0.20")
                    .port("pg", 5432, "TCP")
                    .build(),
                "2",
            ),
        ];
        let mut web = SliceBuilder::new("shop", "web", "web-1").port("http", 8080, "TCP");
        for ip in web_endpoints {
            web = web.endpoint(Ep::new(ip).node("node-b"));
        }
        let slices = vec![
            versioned(web.build(), rv),
            versioned(
                SliceBuilder::new("shop", "db", "db-1")
                    .port("pg", 5432, "TCP")
                    .endpoint(Ep::new("10.244.1.9").node("node-a"))
                    .build(),
                "4",
            ),
            // An orphan slice with a bad address: its issue is still reported.
            versioned(
                SliceBuilder::new("shop", "gone", "gone-1")
                    .port("http", 80, "TCP")
                    .endpoint(Ep::new("not-an-ip"))
                    .build(),
                "5",
            ),
        ];
        (services, slices)
    }

    #[test]
    fn equals_a_full_build_and_rebuilds_only_what_changed() {
        let node = node();
        let mut cache = ModelCache::new(IpFamily::V4);
        let (services, slices) = cluster(&["10.244.2.1"], "3");
        let (model, issues) = cache.build(&services, &slices, &node);
        let (want, want_issues) = build(&services, &slices, &node, IpFamily::V4);
        assert_eq!(model, want);
        assert_eq!(issues, want_issues);
        assert_eq!(cache.rebuilt, 3);

        let (again, _) = cache.build(&services, &slices, &node);
        assert_eq!(again, want);
        assert_eq!(cache.rebuilt, 0, "nothing changed");

        let (services, slices) = cluster(&["10.244.2.1", "10.244.3.1"], "6");
        let (model, issues) = cache.build(&services, &slices, &node);
        let (want, want_issues) = build(&services, &slices, &node, IpFamily::V4);
        assert_eq!(model, want);
        assert_eq!(issues, want_issues);
        assert_eq!(cache.rebuilt, 1, "only web's slice changed");
        assert_eq!(
            model.service_ports[1].cluster_endpoints.len(),
            2,
            "shop/web has its new endpoint"
        );

        // A deleted Service leaves the model.
        let (model, _) = cache.build(&services[1..], &slices, &node);
        let (want, _) = build(&services[1..], &slices, &node, IpFamily::V4);
        assert_eq!(model, want);
        assert_eq!(model.service_ports.len(), 1);
    }

    #[test]
    fn a_new_node_or_objects_without_versions_are_rebuilt() {
        let mut cache = ModelCache::new(IpFamily::V4);
        let (services, slices) = cluster(&["10.244.2.1"], "3");
        cache.build(&services, &slices, &node());
        let mut other = node();
        other.name = "node-b".into();
        let (model, _) = cache.build(&services, &slices, &other);
        assert_eq!(cache.rebuilt, 3);
        assert_eq!(model, build(&services, &slices, &other, IpFamily::V4).0);

        let unversioned: Vec<Service> = services
            .into_iter()
            .map(|mut s| {
                s.metadata.resource_version = None;
                s
            })
            .collect();
        cache.build(&unversioned, &slices, &other);
        cache.build(&unversioned, &slices, &other);
        assert_eq!(cache.rebuilt, 2, "web and db, every time");
    }
}

//! The model, rebuilt per Service: what `run` uses on every sync.
//!
//! A full [`build`](super::build) parses every Service and EndpointSlice; at
//! 10 000 Services that is a quarter of a second per sync, for a change that
//! touched one of them. The model of a Service depends only on the Service,
//! the EndpointSlices labelled with its name, and this node, so the cache
//! keeps each Service's objects and the ports and issues built from them,
//! and rebuilds a Service only when one of its objects changed.
//!
//! Finding what changed must not cost a walk over every object's fields
//! either (grouping 20 000 objects by name took 30–50 ms). The reflector
//! replaces an object's `Arc` whenever the object changes, and the cache's
//! groups hold the `Arc`s they were built from (which keeps those addresses
//! from being reused), so an allocation it already tracks is the version it
//! built from: one pointer lookup per object. A new allocation
//! with the resourceVersion already held (a re-list) changes nothing; one
//! without a resourceVersion (manifests from files) is always rebuilt. The
//! model equals a full build of the same objects; the issues are the same,
//! in another order.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Issue, LABEL_SERVICE_NAME, Model, NodeInfo, ServicePort, build};
use crate::addr::IpFamily;

/// `(namespace, Service name)`: the model's order.
type GroupKey = (String, String);

/// One Service (or an orphan group of EndpointSlices), its current objects
/// and what was last built from them.
#[derive(Default)]
struct Group {
    service: Option<Arc<Service>>,
    /// By slice name, as `build` reads them.
    slices: BTreeMap<String, Arc<EndpointSlice>>,
    ports: Vec<Arc<ServicePort>>,
    issues: Vec<Issue>,
    /// Objects changed since `ports` was built.
    dirty: bool,
}

/// Where a tracked allocation sits.
enum Place {
    Service(GroupKey),
    Slice(GroupKey, String),
}

/// An object version a group holds, by its address.
struct Tracked {
    place: Place,
    /// The [`ModelCache::build`] that last saw it.
    generation: u64,
}

/// Per-Service model pieces for one IP family, kept between syncs.
pub struct ModelCache {
    family: IpFamily,
    node: Option<NodeInfo>,
    groups: BTreeMap<GroupKey, Group>,
    /// Every object version in `groups`, by address. The group's `Arc`
    /// keeps the allocation alive, so the address names that version alone.
    tracked: HashMap<usize, Tracked>,
    generation: u64,
    /// Services rebuilt by the last [`ModelCache::build`], for the log.
    pub rebuilt: usize,
}

/// Whether `object` is the allocation at `address`.
fn is_at<T>(object: Option<&Arc<T>>, address: usize) -> bool {
    object.is_some_and(|o| Arc::as_ptr(o) as usize == address)
}

fn key_of(meta: &ObjectMeta, name: &str) -> GroupKey {
    (meta.namespace.clone().unwrap_or_default(), name.to_string())
}

/// Whether `new` is a version already built from: same resourceVersion.
fn same_version(old: Option<&ObjectMeta>, new: &ObjectMeta) -> bool {
    old.is_some_and(|old| {
        new.resource_version.is_some() && old.resource_version == new.resource_version
    })
}

impl ModelCache {
    pub fn new(family: IpFamily) -> Self {
        ModelCache {
            family,
            node: None,
            groups: BTreeMap::new(),
            tracked: HashMap::new(),
            generation: 0,
            rebuilt: 0,
        }
    }

    /// Marks the object at `address` as seen by this build; false when the
    /// cache does not know it (new, or a new version).
    fn seen(&mut self, address: usize) -> bool {
        let generation = self.generation;
        self.tracked
            .get_mut(&address)
            .map(|tracked| tracked.generation = generation)
            .is_some()
    }

    /// The model of these objects, as [`build`] makes it.
    pub fn build(
        &mut self,
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        node: &NodeInfo,
    ) -> (Model, Vec<Issue>) {
        // Locality and topology depend on the node: all of it is stale.
        if self.node.as_ref() != Some(node) {
            self.groups.clear();
            self.tracked.clear();
            self.node = Some(node.clone());
        }
        self.generation += 1;
        let generation = self.generation;

        for service in services {
            let address = Arc::as_ptr(service) as usize;
            if self.seen(address) {
                continue;
            }
            let meta = &service.metadata;
            let key = key_of(meta, meta.name.as_deref().unwrap_or(""));
            let group = self.groups.entry(key.clone()).or_default();
            if !same_version(group.service.as_ref().map(|s| &s.metadata), meta) {
                group.dirty = true;
            }
            group.service = Some(service.clone());
            self.tracked.insert(
                address,
                Tracked {
                    place: Place::Service(key),
                    generation,
                },
            );
        }
        for slice in slices {
            let address = Arc::as_ptr(slice) as usize;
            if self.seen(address) {
                continue;
            }
            let meta = &slice.metadata;
            // A slice without the label belongs to no Service; `build`
            // ignores it too.
            let Some(service) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
                continue;
            };
            let key = key_of(meta, service);
            let name = meta.name.clone().unwrap_or_default();
            let group = self.groups.entry(key.clone()).or_default();
            if !same_version(group.slices.get(&name).map(|s| &s.metadata), meta) {
                group.dirty = true;
            }
            group.slices.insert(name.clone(), slice.clone());
            self.tracked.insert(
                address,
                Tracked {
                    place: Place::Slice(key, name),
                    generation,
                },
            );
        }

        // Versions no longer present: replaced above (their group holds the
        // new one already) or deleted (their group loses them). A replaced
        // version may be freed by now, but its address is no other object's
        // in this build: every object passed in was alive beside it when the
        // build began.
        let groups = &mut self.groups;
        self.tracked.retain(|address, tracked| {
            if tracked.generation == generation {
                return true;
            }
            match &tracked.place {
                Place::Service(key) => {
                    if let Some(group) = groups.get_mut(key)
                        && is_at(group.service.as_ref(), *address)
                    {
                        group.service = None;
                        group.dirty = true;
                    }
                }
                Place::Slice(key, name) => {
                    if let Some(group) = groups.get_mut(key)
                        && is_at(group.slices.get(name), *address)
                    {
                        group.slices.remove(name);
                        group.dirty = true;
                    }
                }
            }
            false
        });

        self.rebuilt = 0;
        let mut service_ports = Vec::with_capacity(self.groups.len());
        let mut issues = Vec::new();
        self.groups
            .retain(|_, group| group.service.is_some() || !group.slices.is_empty());
        for group in self.groups.values_mut() {
            if group.dirty {
                self.rebuilt += 1;
                let services: Vec<&Service> = group.service.as_deref().into_iter().collect();
                let slices: Vec<&EndpointSlice> = group.slices.values().map(|s| &**s).collect();
                let (model, built_issues) = build(&services, &slices, node, self.family);
                group.ports = model.service_ports;
                group.issues = built_issues;
                group.dirty = false;
            }
            service_ports.extend(group.ports.iter().cloned());
            issues.extend(group.issues.iter().cloned());
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

    /// Fresh allocations, as a re-list gives them.
    fn arcs<T: Clone>(objects: &[T]) -> Vec<Arc<T>> {
        objects.iter().cloned().map(Arc::new).collect()
    }

    /// Issues in a stable order (the cache reports them per Service).
    fn sorted(issues: Vec<Issue>) -> Vec<String> {
        let mut issues: Vec<String> = issues.iter().map(|i| format!("{i:?}")).collect();
        issues.sort();
        issues
    }

    #[test]
    fn equals_a_full_build_and_rebuilds_only_what_changed() {
        let node = node();
        let mut cache = ModelCache::new(IpFamily::V4);
        let (services, slices) = cluster(&["10.244.2.1"], "3");
        let (services, slices) = (arcs(&services), arcs(&slices));
        let (model, issues) = cache.build(&services, &slices, &node);
        let (want, want_issues) = build(&services, &slices, &node, IpFamily::V4);
        assert_eq!(model, want);
        assert_eq!(issues, want_issues);
        assert_eq!(cache.rebuilt, 3);

        let (again, _) = cache.build(&services, &slices, &node);
        assert_eq!(again, want);
        assert_eq!(cache.rebuilt, 0, "nothing changed");
        // A re-list: new allocations, same resourceVersions.
        let (again, _) = cache.build(
            &arcs(&services.iter().map(|s| (**s).clone()).collect::<Vec<_>>()),
            &slices,
            &node,
        );
        assert_eq!(again, want);
        assert_eq!(cache.rebuilt, 0, "same versions");

        let (services, slices) = cluster(&["10.244.2.1", "10.244.3.1"], "6");
        let (services, slices) = (arcs(&services), arcs(&slices));
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
        cache.build(&arcs(&services), &arcs(&slices), &node());
        let mut other = node();
        other.name = "node-b".into();
        let (model, _) = cache.build(&arcs(&services), &arcs(&slices), &other);
        assert_eq!(cache.rebuilt, 3);
        assert_eq!(model, build(&services, &slices, &other, IpFamily::V4).0);

        let unversioned: Vec<Service> = services
            .into_iter()
            .map(|mut s| {
                s.metadata.resource_version = None;
                s
            })
            .collect();
        let slices = arcs(&slices);
        cache.build(&arcs(&unversioned), &slices, &other);
        cache.build(&arcs(&unversioned), &slices, &other);
        assert_eq!(cache.rebuilt, 2, "web and db, every time");
    }

    /// xorshift64: deterministic and dependency-free.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn random_changes_keep_the_model_equal_to_a_full_build() {
        // A store as the reflector keeps it: identity → current version.
        let mut services: BTreeMap<String, Arc<Service>> = BTreeMap::new();
        let mut slices: BTreeMap<String, Arc<EndpointSlice>> = BTreeMap::new();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut version = 0u64;
        let node = node();
        let mut cache = ModelCache::new(IpFamily::V4);
        for step in 0..2000 {
            version += 1;
            let rv = version.to_string();
            let ns = ["a", "b"][rng.below(2) as usize];
            let svc = format!("s{}", rng.below(4));
            match rng.below(7) {
                0 | 1 => {
                    let service = ServiceBuilder::new(ns, &svc)
                        .cluster_ip(&format!("10.96.{}.{}", rng.below(3), rng.below(200) + 1))
                        .port("http", 80 + rng.below(2) as i32, "TCP")
                        .build();
                    services.insert(format!("{ns}/{svc}"), Arc::new(versioned(service, &rv)));
                }
                2 => {
                    services.remove(&format!("{ns}/{svc}"));
                }
                3 | 4 => {
                    // Labelled with a Service that may not exist, or none.
                    let name = format!("{svc}-{}", rng.below(3));
                    let label = if rng.below(8) == 0 {
                        format!("s{}", rng.below(4))
                    } else {
                        svc.clone()
                    };
                    let mut builder =
                        SliceBuilder::new(ns, &label, &name).port("http", 8080, "TCP");
                    for _ in 0..rng.below(4) {
                        let ip = format!("10.244.{}.{}", rng.below(3), rng.below(250) + 1);
                        builder = builder.endpoint(
                            Ep::new(&ip).node(["node-a", "node-b"][rng.below(2) as usize]),
                        );
                    }
                    let mut slice = versioned(builder.build(), &rv);
                    if rng.below(10) == 0 {
                        slice.metadata.labels = None;
                    }
                    slices.insert(format!("{ns}/{name}"), Arc::new(slice));
                }
                5 => {
                    let name = format!("{svc}-{}", rng.below(3));
                    slices.remove(&format!("{ns}/{name}"));
                }
                _ => {
                    // A re-list: every object in a new allocation.
                    for object in services.values_mut() {
                        *object = Arc::new((**object).clone());
                    }
                    for object in slices.values_mut() {
                        *object = Arc::new((**object).clone());
                    }
                }
            }
            let services: Vec<Arc<Service>> = services.values().cloned().collect();
            let slices: Vec<Arc<EndpointSlice>> = slices.values().cloned().collect();
            let (model, issues) = cache.build(&services, &slices, &node);
            let (want, want_issues) = build(&services, &slices, &node, IpFamily::V4);
            assert_eq!(model, want, "step {step}");
            assert_eq!(sorted(issues), sorted(want_issues), "step {step}");
        }
    }
}

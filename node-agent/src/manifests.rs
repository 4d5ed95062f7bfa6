//! YAML manifests (files, directories, multi-document, `kind: List`) → the
//! Services, EndpointSlices and Nodes the model is built from, for `render`.
//!
//! Hand-written `kind: Endpoints` are converted into EndpointSlices the way the
//! EndpointSlice mirroring controller would, so selector-less Services work
//! without a cluster. Other kinds (Pods, Deployments, …) are ignored.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;

use crate::addr::{IpFamily, parse_ip};
use crate::model::LABEL_SERVICE_NAME;

/// Endpoints labelled so are not mirrored by the controller, nor by us.
const LABEL_SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";
const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const MIRRORING_CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {object}: {message}")]
    Invalid {
        path: PathBuf,
        /// `kind namespace/name`, or `document N` when even that is unreadable.
        object: String,
        /// What is wrong, naming the field where serde_yaml could tell.
        message: String,
    },
}

impl ManifestError {
    /// A bounded label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ManifestError::Read { .. } => "read",
            ManifestError::Invalid { .. } => "invalid",
        }
    }
}

/// Everything read from the manifests, with where each object came from.
#[derive(Debug, Default)]
pub struct Manifests {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    /// `kind namespace/name` → the file it came from, for error messages.
    pub origins: BTreeMap<String, PathBuf>,
}

impl Manifests {
    /// The Node called `name`, if the manifests have one.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
    }
}

/// Reads every path; directories are walked for `*.yaml`, `*.yml` and `*.json`
/// files in name order.
pub fn load(paths: &[PathBuf]) -> Result<Manifests, ManifestError> {
    let mut files = Vec::new();
    for path in paths {
        collect_files(path, &mut files)?;
    }
    let mut manifests = Manifests::default();
    let mut endpoints = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| ManifestError::Read {
            path: file.clone(),
            source,
        })?;
        parse_file(file, &text, &mut manifests, &mut endpoints)?;
    }
    // Mirror only Endpoints whose Service has no EndpointSlices of its own, as
    // the mirroring controller skips Services that have a selector.
    let sliced: HashSet<(String, String)> = manifests
        .endpoint_slices
        .iter()
        .filter_map(|s| {
            let service = s.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
            Some((
                s.metadata.namespace.clone().unwrap_or_default(),
                service.clone(),
            ))
        })
        .collect();
    for endpoint in endpoints {
        let key = (
            endpoint.metadata.namespace.clone().unwrap_or_default(),
            endpoint.metadata.name.clone().unwrap_or_default(),
        );
        if !sliced.contains(&key) {
            manifests
                .endpoint_slices
                .extend(mirror_endpoints(&endpoint));
        }
    }
    Ok(manifests)
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let read_error = |source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if !metadata.is_dir() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_error)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_error)?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_files(&entry, files)?;
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            files.push(entry);
        }
    }
    Ok(())
}

/// Splits a YAML stream into documents, keeping each one's first line number
/// so errors point into the file, not into the document.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_separator || line == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs
}

struct Document<'a> {
    path: &'a Path,
    index: usize,
    first_line: usize,
}

impl Document<'_> {
    fn invalid(&self, object: impl fmt::Display, message: impl Into<String>) -> ManifestError {
        ManifestError::Invalid {
            path: self.path.to_path_buf(),
            object: object.to_string(),
            message: message.into(),
        }
    }

    /// serde_yaml names the field (`spec.ports[0].port: invalid type …`) and a
    /// line relative to the text it parsed; make the line absolute.
    fn yaml_error(
        &self,
        object: impl fmt::Display,
        error: &serde_yaml::Error,
        line_offset: usize,
    ) -> ManifestError {
        let mut message = error.to_string();
        if let Some(location) = error.location() {
            let relative = format!(" at line {} column {}", location.line(), location.column());
            let absolute = format!(
                " at line {} column {}",
                location.line() + line_offset,
                location.column()
            );
            message = message.replace(&relative, &absolute);
        }
        self.invalid(object, message)
    }
}

fn parse_file(
    path: &Path,
    text: &str,
    manifests: &mut Manifests,
    endpoints: &mut Vec<Endpoints>,
) -> Result<(), ManifestError> {
    for (index, (first_line, doc)) in documents(text).into_iter().enumerate() {
        let document = Document {
            path,
            index: index + 1,
            first_line,
        };
        let value: serde_yaml::Value = serde_yaml::from_str(&doc).map_err(|e| {
            document.yaml_error(format!("document {}", document.index), &e, first_line - 1)
        })?;
        if value.is_null() {
            continue;
        }
        add_object(&document, &value, Some(&doc), manifests, endpoints)?;
    }
    Ok(())
}

fn add_object(
    document: &Document<'_>,
    value: &serde_yaml::Value,
    text: Option<&str>,
    manifests: &mut Manifests,
    endpoints: &mut Vec<Endpoints>,
) -> Result<(), ManifestError> {
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_string);
    let kind = field("kind");
    let metadata = value.get("metadata");
    let meta_field = |name: &str| metadata.and_then(|m| m.get(name)).and_then(|v| v.as_str());
    let name = meta_field("name").unwrap_or("").to_string();
    let namespace = meta_field("namespace").unwrap_or("default").to_string();
    let object = match (&kind, name.is_empty()) {
        (Some(kind), false) if kind == "Node" => format!("{kind} {name}"),
        (Some(kind), false) => format!("{kind} {namespace}/{name}"),
        _ => format!("document {}", document.index),
    };
    let Some(kind) = kind else {
        if !value.is_mapping() {
            return Err(document.invalid(object, "not a Kubernetes object (expected a mapping)"));
        }
        return Err(document.invalid(object, "kind: missing"));
    };
    // Typed parsing from the document's own text keeps serde_yaml's field path
    // and line numbers; items of a List are re-serialized first.
    let parse = |target: &str| -> Result<String, ManifestError> {
        if name.is_empty() && target != "List" {
            return Err(document.invalid(&object, "metadata.name: missing"));
        }
        Ok(match text {
            Some(text) => text.to_string(),
            None => serde_yaml::to_string(value)
                .map_err(|e| document.invalid(&object, e.to_string()))?,
        })
    };
    // k8s-openapi refuses any other apiVersion, but its message names
    // neither the field nor the version to use; say both here.
    let expected_api_version = match kind.as_str() {
        "Service" | "Endpoints" | "Node" => Some("v1"),
        "EndpointSlice" => Some("discovery.k8s.io/v1"),
        _ => None,
    };
    if let (Some(expected), Some(found)) = (expected_api_version, value.get("apiVersion"))
        && found.as_str() != Some(expected)
    {
        let found = serde_yaml::to_string(found).unwrap_or_default();
        return Err(document.invalid(
            &object,
            format!(
                "apiVersion: {} is not supported for {kind}; use {expected}",
                found.trim()
            ),
        ));
    }
    let offset = if text.is_some() {
        document.first_line - 1
    } else {
        0
    };
    match kind.as_str() {
        "Service" => {
            let mut service: Service = typed(document, &object, &parse("Service")?, offset)?;
            service.metadata.namespace.get_or_insert(namespace);
            manifests
                .origins
                .insert(object, document.path.to_path_buf());
            manifests.services.push(service);
        }
        "EndpointSlice" => {
            let mut slice: EndpointSlice =
                typed(document, &object, &parse("EndpointSlice")?, offset)?;
            slice.metadata.namespace.get_or_insert(namespace);
            manifests
                .origins
                .insert(object, document.path.to_path_buf());
            manifests.endpoint_slices.push(slice);
        }
        "Endpoints" => {
            let mut endpoint: Endpoints = typed(document, &object, &parse("Endpoints")?, offset)?;
            endpoint.metadata.namespace.get_or_insert(namespace);
            manifests
                .origins
                .insert(object, document.path.to_path_buf());
            endpoints.push(endpoint);
        }
        "Node" => {
            let node: Node = typed(document, &object, &parse("Node")?, offset)?;
            manifests
                .origins
                .insert(object, document.path.to_path_buf());
            manifests.nodes.push(node);
        }
        "List" | "ServiceList" | "EndpointSliceList" | "EndpointsList" | "NodeList" => {
            let items = value.get("items").and_then(|i| i.as_sequence());
            for item in items.into_iter().flatten() {
                add_object(document, item, None, manifests, endpoints)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn typed<T: DeserializeOwned>(
    document: &Document<'_>,
    object: &str,
    text: &str,
    line_offset: usize,
) -> Result<T, ManifestError> {
    serde_yaml::from_str(text).map_err(|e| document.yaml_error(object, &e, line_offset))
}

/// The EndpointSlices the mirroring controller makes of hand-written
/// Endpoints: one per subset and IP family, addresses ready, notReadyAddresses
/// neither ready nor serving.
pub fn mirror_endpoints(endpoints: &Endpoints) -> Vec<EndpointSlice> {
    let meta = &endpoints.metadata;
    if meta
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SKIP_MIRROR))
        .is_some_and(|v| v == "true")
    {
        return Vec::new();
    }
    let name = meta.name.clone().unwrap_or_default();
    let mut slices = Vec::new();
    for (subset_index, subset) in endpoints.subsets.iter().flatten().enumerate() {
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: p.name.clone(),
                port: Some(p.port),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        for family in [IpFamily::V4, IpFamily::V6] {
            let mut slice_endpoints = Vec::new();
            let ready = subset.addresses.iter().flatten().map(|a| (a, true));
            let not_ready = subset
                .not_ready_addresses
                .iter()
                .flatten()
                .map(|a| (a, false));
            for (address, is_ready) in ready.chain(not_ready) {
                let Some(ip) = parse_ip(&address.ip) else {
                    continue;
                };
                if IpFamily::of(&ip) != family {
                    continue;
                }
                slice_endpoints.push(SliceEndpoint {
                    addresses: vec![address.ip.trim().to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(is_ready),
                        serving: Some(is_ready),
                        terminating: Some(false),
                    }),
                    hostname: address.hostname.clone(),
                    node_name: address.node_name.clone(),
                    target_ref: address.target_ref.clone(),
                    ..SliceEndpoint::default()
                });
            }
            if slice_endpoints.is_empty() {
                continue;
            }
            let mut labels = meta.labels.clone().unwrap_or_default();
            labels.insert(LABEL_SERVICE_NAME.into(), name.clone());
            labels.insert(LABEL_MANAGED_BY.into(), MIRRORING_CONTROLLER.into());
            let suffix = match family {
                IpFamily::V4 => "",
                IpFamily::V6 => "-v6",
            };
            slices.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-mirror-{subset_index}{suffix}")),
                    namespace: meta.namespace.clone(),
                    labels: Some(labels),
                    ..ObjectMeta::default()
                },
                address_type: family.address_type().into(),
                endpoints: slice_endpoints,
                ports: Some(ports.clone()),
            });
        }
    }
    slices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const SEED: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  clusterIP: 10.96.0.20
  ports:
  - protocol: TCP
    port: 80
    targetPort: 9376
---
apiVersion: v1
kind: Endpoints
metadata:
  name: my-service
subsets:
- addresses:
  - ip: 192.0.2.42
  ports:
  - port: 9376
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: ignored
spec: {}
---
";

    #[test]
    fn multi_document_files_and_directories_are_read() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", SEED);
        std::fs::create_dir(dir.path().join("nested")).unwrap();
        write(
            &dir.path().join("nested"),
            "node.yml",
            "kind: Node\napiVersion: v1\nmetadata:\n  name: node-a\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.0.10\n",
        );
        write(dir.path(), "notes.txt", "not yaml: [");
        let manifests = load(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(manifests.services.len(), 1);
        assert_eq!(
            manifests.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
        assert!(manifests.node("node-a").is_some());
        let slices = &manifests.endpoint_slices;
        assert_eq!(slices.len(), 1, "Endpoints mirrored into one slice");
        assert_eq!(slices[0].endpoints[0].addresses, ["192.0.2.42"]);
        assert_eq!(slices[0].ports.as_ref().unwrap()[0].port, Some(9376));
        assert_eq!(
            slices[0]
                .metadata
                .labels
                .as_ref()
                .unwrap()
                .get(LABEL_SERVICE_NAME)
                .map(String::as_str),
            Some("my-service")
        );
    }

    #[test]
    fn endpoints_are_not_mirrored_when_slices_exist() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", SEED);
        write(
            dir.path(),
            "b.yaml",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: my-service-abc\n  labels:\n    kubernetes.io/service-name: my-service\naddressType: IPv4\nendpoints:\n- addresses: [10.244.1.5]\nports:\n- port: 9376\n",
        );
        let manifests = load(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(manifests.endpoint_slices.len(), 1);
        assert_eq!(
            manifests.endpoint_slices[0].endpoints[0].addresses,
            ["10.244.1.5"]
        );
    }

    #[test]
    fn lists_are_unpacked() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a, namespace: x}\n  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
        );
        let manifests = load(&[path]).unwrap();
        assert_eq!(manifests.services[0].metadata.name.as_deref(), Some("a"));
    }

    #[test]
    fn malformed_manifests_name_file_object_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "bad.yaml",
            "kind: Service\nmetadata:\n  name: ok\nspec: {}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  ports:\n  - port: eighty\n",
        );
        let error = load(std::slice::from_ref(&path)).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!(
                "{}: Service shop/web: spec.ports[0].port: invalid type",
                path.display()
            )),
            "{error}"
        );
        assert!(
            error.contains("line 13"),
            "line number within the file: {error}"
        );

        let path = write(
            dir.path(),
            "broken.yaml",
            "kind: Service\nmetadata: [unclosed\n",
        );
        let error = load(std::slice::from_ref(&path)).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("{}: document 1: ", path.display())),
            "{error}"
        );

        let path = write(dir.path(), "nokind.yaml", "---\nmetadata:\n  name: x\n");
        let error = load(std::slice::from_ref(&path)).unwrap_err().to_string();
        assert_eq!(
            error,
            format!("{}: document 2: kind: missing", path.display())
        );

        let path = write(
            dir.path(),
            "beta.yaml",
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n",
        );
        let error = load(std::slice::from_ref(&path)).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "{}: EndpointSlice default/s: apiVersion: discovery.k8s.io/v1beta1 is not supported for EndpointSlice; use discovery.k8s.io/v1",
                path.display()
            )
        );

        let missing = dir.path().join("missing.yaml");
        let error = load(std::slice::from_ref(&missing))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(&missing.display().to_string()), "{error}");
    }

    #[test]
    fn not_ready_addresses_are_mirrored_as_not_serving() {
        let endpoints: Endpoints = serde_yaml::from_str(
            "metadata: {name: e, namespace: d}\nsubsets:\n- addresses: [{ip: 10.0.0.1, nodeName: n1}, {ip: 'fd00::1'}]\n  notReadyAddresses: [{ip: 10.0.0.2}]\n  ports: [{name: http, port: 80, protocol: TCP}]\n",
        )
        .unwrap();
        let slices = mirror_endpoints(&endpoints);
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[0].address_type, "IPv4");
        assert_eq!(slices[0].endpoints.len(), 2);
        assert_eq!(slices[0].endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(
            slices[0].endpoints[1].conditions.as_ref().unwrap().serving,
            Some(false)
        );
        assert_eq!(slices[1].address_type, "IPv6");
    }
}

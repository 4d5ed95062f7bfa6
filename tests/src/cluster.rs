//! The local environment: a real control plane (etcd, kube-apiserver,
//! kube-controller-manager built from the Kubernetes Go modules), moto as AWS,
//! and nodes and pods as network namespaces on a bridge.
//!
//! Every environment takes a free *slot* and lives entirely inside it: addresses
//! `100.(64+slot).0.0/16` (node network `.0.0/24` with the bridge at `.0.1`, node
//! `i` at `.0.(10+i)` with pod CIDR `.(128+i).0/24`, Service range `.64.0/18` (16 382 addresses)),
//! an IPv6 Service range beside it (`fd00:96:<slot>::/112`: the apiserver is
//! dual-stack, so that tests can write IPv6 Services), names prefixed `cw<slot>`,
//! and a state directory under `/tmp/causeway-env`. Nodes and pods are IPv4
//! alone unless the options ask for a dual-stack environment
//! ([`ClusterOptions::dual_stack`]): then the node network also has
//! `fd00:10:<slot>::/64` (node `i` at `::(0x10 + i)`, so node-1 at `::11`, the
//! external client at `::200`), node `i` the IPv6 pod CIDR
//! `fd00:244:<slot>:<i>::/64`, and every pod an address in its node's.
//! Each thing is written to the state file *before* it is created, so tear-down
//! (on drop, on `causeway-env down`, or the sweep of an environment whose owner
//! died) removes exactly what exists and nothing else. Environments on distinct
//! slots share nothing, so tests run side by side.
//!
//! There is no kubelet: the harness writes Node objects (addresses, Ready, the
//! `providerID` of the node's moto instance) and Pod objects, and patches pod status
//! to Running/Ready so the real EndpointSlice controller publishes endpoints.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod as PodObject, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::netns::{self, add_netns, add_veth, del_link, del_netns, exec_in, ip, sysctl_in};
use crate::paths;

/// Highest slot: `100.(64+slot)` must stay inside 100.64.0.0/10.
const SLOTS: u8 = 63;
const APISERVER_PORT: u16 = 6443;
const MOTO_PORT: u16 = 5000;
/// Ports every echo pod listens on (TCP and UDP): common service ports and the
/// seed articles' target ports.
pub const ECHO_PORTS: &[u16] = &[80, 443, 3000, 8080, 9376];
pub const REGION: &str = "us-east-1";
/// The Kubernetes release e2e/k8s-bins builds; Node objects report it.
pub const K8S_VERSION: &str = "1.34.4";

/// How to build an environment.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub cluster_name: String,
    /// IPv6 beside IPv4 on the node network, the pods and the Node objects.
    pub dual_stack: bool,
}

impl ClusterOptions {
    pub fn nodes(nodes: usize) -> Self {
        Self {
            nodes,
            cluster_name: "causeway-e2e".to_string(),
            dual_stack: false,
        }
    }

    /// A dual-stack environment, as a kubelet on a dual-stack node reports
    /// it: each Node has an IPv6 InternalIP and IPv6 pod CIDR beside its IPv4
    /// ones, each pod an IPv6 address in its status (so the EndpointSlice
    /// controller publishes it in dual-stack Services), and agents get both
    /// cluster CIDRs.
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }
}

/// One node: a network namespace, a Node object and a moto EC2 instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub zone: String,
    pub instance_id: String,
    /// Its IPv6 address and pod CIDR, in a dual-stack environment.
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    #[serde(default)]
    pub pod_cidr6: Option<String>,
}

/// One pod: a network namespace behind a veth in its node, running causeway-echo.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack environment.
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
}

/// What moto was seeded with (see e2e/moto/seed.py).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AwsSeed {
    pub vpc: String,
    pub subnets: Vec<SeedSubnet>,
    pub node_security_group: String,
    pub instances: Vec<SeedInstance>,
}

impl AwsSeed {
    /// The ids of the subnets with `role` (`elb`, `internal-elb`, …), sorted.
    pub fn subnet_ids(&self, role: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .subnets
            .iter()
            .filter(|s| s.role == role)
            .map(|s| s.id.clone())
            .collect();
        ids.sort();
        ids
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedSubnet {
    pub id: String,
    pub zone: String,
    pub role: String,
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedInstance {
    pub node: String,
    pub id: String,
    pub zone: String,
}

/// A control-plane component [`Cluster::stop_component`] stopped, and how to
/// start it again.
#[derive(Debug)]
pub struct StoppedComponent {
    name: String,
    argv: Vec<String>,
    cwd: PathBuf,
}

/// Everything an environment created, recorded before it is created.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EnvState {
    pub slot: u8,
    pub dir: PathBuf,
    /// The process whose exit means the environment is abandoned; `None` once
    /// `causeway-env up` has handed it over to `causeway-env down`.
    pub owner_pid: Option<u32>,
    pub processes: Vec<RecordedProcess>,
    pub netns: Vec<String>,
    pub links: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordedProcess {
    pub name: String,
    pub pid: u32,
}

impl EnvState {
    fn save(&self) -> Result<()> {
        let tmp = self.dir.join("state.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        fs::rename(&tmp, self.dir.join("state.json"))?;
        Ok(())
    }

    fn load(dir: &Path) -> Result<Self> {
        let text = fs::read(dir.join("state.json"))
            .with_context(|| format!("no environment state in {}", dir.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }

    /// Removes everything recorded, in an order that never strands a process:
    /// processes, then namespaces (their veth ends go with them), then host links,
    /// then the directory.
    pub fn teardown(&self) {
        for p in self.processes.iter().rev() {
            if process_matches(p) {
                let _ = Command::new("kill")
                    .args(["-9", &p.pid.to_string()])
                    .status();
            }
        }
        for ns in self.netns.iter().rev() {
            del_netns(ns);
        }
        for link in self.links.iter().rev() {
            del_link(link);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// True when `pid` is alive and still runs the program recorded for it (pids get
/// reused; never kill a stranger).
fn process_matches(p: &RecordedProcess) -> bool {
    match fs::read(format!("/proc/{}/cmdline", p.pid)) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains(&p.name),
        Err(_) => false,
    }
}

/// True while `pid` runs: it exists and is not a zombie waiting to be
/// reaped (a child of the test that exited shows so until it is waited for).
pub fn process_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Where every environment keeps its state.
pub fn env_root() -> PathBuf {
    std::env::temp_dir().join("causeway-env")
}

/// Tears down environments whose owner process is gone (a test run that was
/// killed): they would otherwise hold their slot, namespaces and processes.
/// Returns the slots it cleaned.
pub fn sweep_abandoned() -> Vec<u8> {
    let mut cleaned = Vec::new();
    let Ok(entries) = fs::read_dir(env_root()) else {
        return cleaned;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let state = match EnvState::load(&dir) {
            Ok(s) => s,
            // A slot directory without state: its creator died before recording
            // anything, so there is nothing but the directory to remove. Leave
            // very young ones alone: their creator may be writing right now.
            Err(_) => {
                let young = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .map(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(30))
                    .unwrap_or(true);
                if !young {
                    let _ = fs::remove_dir_all(&dir);
                }
                continue;
            }
        };
        if let Some(owner) = state.owner_pid
            && !pid_alive(owner)
        {
            state.teardown();
            cleaned.push(state.slot);
        }
    }
    cleaned
}

/// Claims a free slot by creating its directory (atomic: two claimants cannot
/// both succeed).
fn claim_slot() -> Result<(u8, PathBuf)> {
    let root = env_root();
    fs::create_dir_all(&root)?;
    let start = (std::process::id() % u32::from(SLOTS)) as u8;
    for i in 0..SLOTS {
        let slot = (start + i) % SLOTS;
        let dir = root.join(format!("slot-{slot}"));
        if fs::create_dir(&dir).is_ok() {
            // A bridge of this slot left by something that escaped the sweep means
            // the addresses are in use: skip the slot rather than fight over it.
            if netns::list_links().iter().any(|l| l == &bridge_name(slot)) {
                let _ = fs::remove_dir(&dir);
                continue;
            }
            return Ok((slot, dir));
        }
    }
    bail!(
        "all {SLOTS} environment slots under {} are in use: run `make down` or remove stale ones",
        root.display()
    )
}

fn bridge_name(slot: u8) -> String {
    format!("cw{slot}br")
}

/// Address `100.(64+slot).a.b`.
fn addr(slot: u8, a: u8, b: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64 + slot, a, b)
}

/// `fd00:<net>:<slot>:<subnet>::<host>`: the IPv6 plan of a slot (module header).
fn addr6(net: u16, slot: u8, subnet: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, net, u16::from(slot), subnet, 0, 0, 0, host)
}

/// The node network's IPv6 prefix (`fd00:10:<slot>::`).
const NODE_NET6: u16 = 0x10;
/// The pods' IPv6 prefix (`fd00:244:<slot>:<node>::/64`).
const POD_NET6: u16 = 0x244;

fn service_cidr_v6(slot: u8) -> String {
    format!("fd00:96:{slot:x}::/112")
}

/// A running environment. Dropping it tears everything down, also when the
/// test that owns it panics; [`Cluster::detach`] hands it over to
/// `causeway-env down` instead.
pub struct Cluster {
    state: Mutex<EnvState>,
    children: Mutex<Vec<Child>>,
    options: ClusterOptions,
    slot: u8,
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    token: String,
    nodes: Vec<NodeInfo>,
    pods: Mutex<Vec<Pod>>,
    aws: AwsSeed,
    client: kube::Client,
    detached: bool,
}

impl Cluster {
    /// Starts a fresh environment with `options.nodes` nodes: control plane,
    /// moto (seeded), node namespaces and their Node objects. Anything that fails
    /// half-way is torn down before the error is returned.
    pub async fn start(options: ClusterOptions) -> Result<Cluster> {
        netns::preflight()?;
        if options.nodes == 0 || options.nodes > 60 {
            bail!("an environment has 1 to 60 nodes, not {}", options.nodes);
        }
        let bin_dir = k8s_binaries()?;
        let venv = moto_venv()?;
        sweep_abandoned();
        let (slot, dir) = claim_slot()?;
        let state = EnvState {
            slot,
            dir: dir.clone(),
            owner_pid: Some(std::process::id()),
            ..Default::default()
        };
        state.save()?;
        let mut partial = Partial {
            state,
            children: Vec::new(),
            armed: true,
        };
        match Self::build(&mut partial, options, bin_dir, venv).await {
            Ok(cluster) => Ok(cluster),
            Err(e) => {
                let logs = tail_logs(&partial.state.dir);
                Err(e.context(format!(
                    "the environment in slot {slot} did not start; it was torn down{logs}"
                )))
            }
        }
    }

    async fn build(
        p: &mut Partial,
        options: ClusterOptions,
        bin_dir: PathBuf,
        venv: PathBuf,
    ) -> Result<Cluster> {
        let slot = p.state.slot;
        let dir = p.state.dir.clone();
        let host = addr(slot, 0, 1);

        // The node network: a bridge holding the address every server binds to.
        let bridge = bridge_name(slot);
        p.record_link(&bridge)?;
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{host}/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;

        let pki = Pki::generate(&dir.join("pki"), host, addr(slot, 64, 1))?;
        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, host, &pki)?;

        // etcd, then the apiserver, then the controller-manager.
        let etcd_url = format!("http://{host}:2379");
        p.spawn(
            "etcd",
            &bin_dir.join("etcd"),
            &[
                "--name=causeway",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls=http://{host}:2380"),
                &format!("--initial-advertise-peer-urls=http://{host}:2380"),
                &format!("--initial-cluster=causeway=http://{host}:2380"),
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            &dir,
        )?;
        wait_tcp(
            &format!("{host}:2379"),
            Duration::from_secs(30),
            "etcd",
            &mut || p.ensure_running(),
        )?;
        p.spawn(
            "kube-apiserver",
            &bin_dir.join("kube-apiserver"),
            &[
                &format!("--etcd-servers={etcd_url}"),
                &format!("--bind-address={host}"),
                &format!("--advertise-address={host}"),
                &format!("--secure-port={APISERVER_PORT}"),
                &format!("--tls-cert-file={}", pki.server_cert.display()),
                &format!("--tls-private-key-file={}", pki.server_key.display()),
                &format!("--client-ca-file={}", pki.ca_cert.display()),
                &format!("--token-auth-file={}", pki.tokens.display()),
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                &format!("--service-account-key-file={}", pki.sa_public.display()),
                &format!(
                    "--service-account-signing-key-file={}",
                    pki.sa_key.display()
                ),
                &format!(
                    "--service-cluster-ip-range={}/18,{}",
                    addr(slot, 64, 0),
                    service_cidr_v6(slot)
                ),
                "--service-node-port-range=30000-32767",
                // As in real clusters: kube-proxy and our agent run privileged.
                "--allow-privileged=true",
                &format!("--cert-dir={}", dir.join("apiserver-certs").display()),
                "--enable-priority-and-fairness=false",
                "--profiling=false",
            ],
            &dir,
        )?;
        let client = wait_apiserver(&kubeconfig, &mut || p.ensure_running()).await?;
        p.spawn(
            "kube-controller-manager",
            &bin_dir.join("kube-controller-manager"),
            &[
                &format!("--kubeconfig={}", kubeconfig.display()),
                &format!("--authentication-kubeconfig={}", kubeconfig.display()),
                &format!("--authorization-kubeconfig={}", kubeconfig.display()),
                "--controllers=endpointslice-controller,endpointslice-mirroring-controller,namespace-controller,\
                 garbage-collector-controller,serviceaccount-controller,serviceaccount-token-controller",
                &format!("--service-account-private-key-file={}", pki.sa_key.display()),
                &format!("--root-ca-file={}", pki.ca_cert.display()),
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                &format!("--bind-address={host}"),
                &format!("--cluster-name={}", options.cluster_name),
                "--profiling=false",
            ],
            &dir,
        )?;

        // moto, while the controller-manager starts.
        let moto_addr = format!("{host}:{MOTO_PORT}");
        p.spawn(
            "moto_server",
            &venv.join("bin/moto_server"),
            &["-H", &host.to_string(), "-p", &MOTO_PORT.to_string()],
            &dir,
        )?;
        wait_tcp(&moto_addr, Duration::from_secs(60), "moto", &mut || {
            p.ensure_running()
        })?;
        let node_names: Vec<String> = (1..=options.nodes).map(|i| format!("node-{i}")).collect();
        let aws = seed_moto(
            &venv,
            &format!("http://{moto_addr}"),
            &options.cluster_name,
            &node_names,
        )?;

        // Nodes: a namespace each on the bridge, a bridge `cbr0` for its pods, and
        // routes to the other nodes' pod CIDRs.
        let mut nodes = Vec::new();
        for (i, name) in node_names.iter().enumerate() {
            let index = u8::try_from(i + 1)?;
            let instance = aws
                .instances
                .iter()
                .find(|inst| &inst.node == name)
                .ok_or_else(|| anyhow!("moto has no instance for {name}"))?;
            let node = NodeInfo {
                name: name.clone(),
                netns: format!("cw{slot}-{name}"),
                ip: addr(slot, 0, 10 + index),
                pod_cidr: format!("{}/24", addr(slot, 128 + index, 0)),
                zone: instance.zone.clone(),
                instance_id: instance.id.clone(),
                ip6: options
                    .dual_stack
                    .then(|| addr6(NODE_NET6, slot, 0, 0x10 + u16::from(index))),
                pod_cidr6: options
                    .dual_stack
                    .then(|| format!("{}/64", addr6(POD_NET6, slot, u16::from(index), 0))),
            };
            p.record_netns(&node.netns)?;
            add_netns(&node.netns)?;
            let outer = format!("cw{slot}n{index}");
            p.record_link(&outer)?;
            add_veth(
                &outer,
                None,
                &format!("cw{slot}t{index}"),
                &node.netns,
                "eth0",
            )?;
            ip(&["link", "set", &outer, "master", &bridge, "up"])?;
            exec_in(
                &node.netns,
                "ip",
                &["addr", "add", &format!("{}/24", node.ip), "dev", "eth0"],
            )?;
            exec_in(
                &node.netns,
                "ip",
                &["route", "add", "default", "via", &host.to_string()],
            )?;
            exec_in(
                &node.netns,
                "ip",
                &["link", "add", "cbr0", "type", "bridge"],
            )?;
            exec_in(
                &node.netns,
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/24", addr(slot, 128 + index, 1)),
                    "dev",
                    "cbr0",
                ],
            )?;
            exec_in(&node.netns, "ip", &["link", "set", "cbr0", "up"])?;
            sysctl_in(&node.netns, "net.ipv4.ip_forward", "1")?;
            nodes.push(node);
        }
        for node in &nodes {
            for other in nodes.iter().filter(|o| o.name != node.name) {
                exec_in(
                    &node.netns,
                    "ip",
                    &[
                        "route",
                        "add",
                        &other.pod_cidr,
                        "via",
                        &other.ip.to_string(),
                    ],
                )?;
            }
        }
        // An external client (what the NLB or the internet would be) on the node
        // network, with a few extra addresses for source-range tests.
        let external = format!("cw{slot}-external");
        p.record_netns(&external)?;
        add_netns(&external)?;
        let outer = format!("cw{slot}x");
        p.record_link(&outer)?;
        add_veth(&outer, None, &format!("cw{slot}xt"), &external, "eth0")?;
        ip(&["link", "set", &outer, "master", &bridge, "up"])?;
        for last in 200..=203 {
            exec_in(
                &external,
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/24", addr(slot, 0, last)),
                    "dev",
                    "eth0",
                ],
            )?;
        }

        register_nodes(&client, &nodes).await?;
        wait_namespaces(&client).await?;

        let token = pki.token.clone();
        let state = p.disarm();
        let cluster = Cluster {
            state: Mutex::new(state),
            children: Mutex::new(std::mem::take(&mut p.children)),
            options,
            slot,
            bin_dir,
            kubeconfig,
            token,
            nodes,
            pods: Mutex::new(Vec::new()),
            aws,
            client,
            detached: false,
        };
        // Dropped on failure, which tears everything down.
        if cluster.dual_stack() {
            cluster.set_up_ipv6()?;
        }
        Ok(cluster)
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The admin bearer token (system:masters).
    pub fn admin_token(&self) -> &str {
        &self.token
    }

    pub fn cluster_name(&self) -> &str {
        &self.options.cluster_name
    }

    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    pub fn node(&self, name: &str) -> &NodeInfo {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn aws(&self) -> &AwsSeed {
        &self.aws
    }

    /// The bridge address the apiserver and moto listen on.
    pub fn host_ip(&self) -> Ipv4Addr {
        addr(self.slot, 0, 1)
    }

    pub fn aws_endpoint(&self) -> String {
        format!("http://{}:{MOTO_PORT}", self.host_ip())
    }

    /// The namespace of the external client, and its addresses.
    pub fn external_netns(&self) -> String {
        format!("cw{}-external", self.slot)
    }

    pub fn external_ips(&self) -> Vec<Ipv4Addr> {
        (200..=203).map(|last| addr(self.slot, 0, last)).collect()
    }

    /// The Service ClusterIP range given to the apiserver.
    pub fn service_cidr(&self) -> String {
        format!("{}/18", addr(self.slot, 64, 0))
    }

    /// The apiserver's IPv6 Service range, for IPv6 Services.
    pub fn service_cidr_v6(&self) -> String {
        service_cidr_v6(self.slot)
    }

    /// The range every pod address of this environment falls in.
    pub fn cluster_cidr(&self) -> String {
        format!("{}/17", addr(self.slot, 128, 0))
    }

    /// Whether the environment is dual-stack ([`ClusterOptions::dual_stack`]).
    pub fn dual_stack(&self) -> bool {
        self.options.dual_stack
    }

    /// The range every pod's IPv6 address falls in, in a dual-stack
    /// environment.
    pub fn cluster_cidr_v6(&self) -> String {
        format!("{}/48", addr6(POD_NET6, self.slot, 0, 0))
    }

    /// `node`'s IPv6 address on the node network (a dual-stack environment).
    pub fn node_ip6(&self, node: &str) -> Ipv6Addr {
        self.node(node)
            .ip6
            .unwrap_or_else(|| panic!("{node} has no IPv6 address: the environment is IPv4 alone"))
    }

    /// The external client's IPv6 address (a dual-stack environment).
    pub fn external_ip6(&self) -> Ipv6Addr {
        addr6(NODE_NET6, self.slot, 0, 0x200)
    }

    /// 1 for node-1, and so on.
    fn node_index(&self, node: &str) -> u16 {
        let position = self
            .nodes
            .iter()
            .position(|n| n.name == node)
            .unwrap_or_else(|| panic!("no node {node}"));
        u16::try_from(position + 1).expect("few nodes")
    }

    /// The IPv6 half of a dual-stack environment's network: the nodes'
    /// addresses, their pod bridges' gateways, an on-link default route and
    /// routes to the other nodes' pod CIDRs, forwarding, and the external
    /// client's address. (Every namespace here has duplicate address detection
    /// off: [`netns::add_netns`].)
    fn set_up_ipv6(&self) -> Result<()> {
        for node in &self.nodes {
            let index = self.node_index(&node.name);
            sysctl_in(&node.netns, "net.ipv6.conf.all.forwarding", "1")?;
            for (address, dev) in [
                (self.node_ip6(&node.name), "eth0"),
                (addr6(POD_NET6, self.slot, index, 1), "cbr0"),
            ] {
                exec_in(
                    &node.netns,
                    "ip",
                    &["-6", "addr", "add", &format!("{address}/64"), "dev", dev],
                )?;
            }
            // A default route, as every node has one: the kernel routes a
            // packet the node sends before nat OUTPUT rewrites its address,
            // so without one a cluster IP would be unreachable from the
            // node. On-link, so that the host namespace stays untouched.
            exec_in(
                &node.netns,
                "ip",
                &["-6", "route", "add", "default", "dev", "eth0"],
            )?;
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                let (Some(pod_cidr6), Some(ip6)) = (&other.pod_cidr6, other.ip6) else {
                    bail!("{} has no IPv6 address", other.name);
                };
                exec_in(
                    &node.netns,
                    "ip",
                    &["-6", "route", "add", pod_cidr6, "via", &ip6.to_string()],
                )?;
            }
        }
        exec_in(
            &self.external_netns(),
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{}/64", self.external_ip6()),
                "dev",
                "eth0",
            ],
        )?;
        Ok(())
    }

    /// Directory with etcd, kube-apiserver, kube-controller-manager and kubectl.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The environment's own directory (logs, pki, state).
    pub fn dir(&self) -> PathBuf {
        self.state.lock().expect("state lock").dir.clone()
    }

    /// What this environment has created: for tests that check tear-down.
    pub fn recorded(&self) -> EnvState {
        self.state.lock().expect("state lock").clone()
    }

    /// Environment variables a program needs to talk to this cluster and its AWS.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            ("KUBECONFIG".into(), self.kubeconfig.display().to_string()),
            ("AWS_ENDPOINT_URL".into(), self.aws_endpoint()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_DEFAULT_REGION".into(), REGION.into()),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            (
                "CAUSEWAY_CLUSTER_NAME".into(),
                self.options.cluster_name.clone(),
            ),
        ]
    }

    /// Runs a command inside one of this environment's namespaces.
    pub fn exec(&self, netns: &str, cmd: &[&str]) -> Result<String> {
        let (program, args) = cmd.split_first().ok_or_else(|| anyhow!("empty command"))?;
        exec_in(netns, program, args)
    }

    /// Runs kubectl against this cluster; returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.bin_dir.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A kubeconfig for this environment that authenticates as `who` with
    /// `token` (a ServiceAccount's, from `kubectl create token`).
    pub fn kubeconfig_with_token(&self, who: &str, token: &str) -> Result<String> {
        self.kubeconfig_as(
            who,
            &[
                "config",
                "set-credentials",
                who,
                &format!("--token={token}"),
            ],
        )
    }

    /// [`Cluster::kubeconfig_with_token`], the token read from `file` (as
    /// kubeadm's kubeconfig for kube-proxy reads its ServiceAccount token).
    pub fn kubeconfig_with_token_file(&self, who: &str, file: &Path) -> Result<String> {
        self.kubeconfig_as(
            who,
            &[
                "config",
                "set",
                &format!("users.{who}.tokenFile"),
                &file.display().to_string(),
            ],
        )
    }

    /// A copy of the admin kubeconfig whose current user is `who`, with the
    /// credential `set_credential` (kubectl arguments) gives it.
    fn kubeconfig_as(&self, who: &str, set_credential: &[&str]) -> Result<String> {
        let path = self.dir().join(format!("kubeconfig-{who}"));
        fs::copy(self.kubeconfig(), &path)?;
        let path = path.display().to_string();
        for args in [
            set_credential,
            &[
                "config",
                "set-context",
                "--current",
                &format!("--user={who}"),
            ],
        ] {
            let out = Command::new(self.bin_dir().join("kubectl"))
                .args(args)
                .env("KUBECONFIG", &path)
                .output()?;
            anyhow::ensure!(out.status.success(), "kubectl {}: {out:?}", args[1]);
        }
        Ok(path)
    }

    /// Stops process `pid`, started by [`Cluster::spawn_in`], as a service
    /// manager would: SIGTERM, then waits up to `limit` for it to exit (and
    /// kills it if it does not), and forgets it.
    pub fn terminate(&self, pid: u32, limit: Duration) -> Result<()> {
        let mut child = self.take_child(pid)?;
        netns::run("kill", &["-TERM", &pid.to_string()])?;
        let deadline = Instant::now() + limit;
        let exited = loop {
            if child.try_wait()?.is_some() {
                break true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                child.wait()?;
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.forget_process(pid)?;
        if !exited {
            bail!("process {pid} did not stop within {limit:?} of SIGTERM; killed");
        }
        Ok(())
    }

    /// The child process `pid`, no longer killed at tear-down by this handle.
    fn take_child(&self, pid: u32) -> Result<Child> {
        let mut children = self.children.lock().expect("children lock");
        let index = children
            .iter()
            .position(|c| c.id() == pid)
            .with_context(|| format!("{pid} is not a child of this test"))?;
        Ok(children.remove(index))
    }

    /// Takes `pid` off the recorded processes (it is gone).
    fn forget_process(&self, pid: u32) -> Result<()> {
        let mut state = self.state.lock().expect("state lock");
        state.processes.retain(|p| p.pid != pid);
        state.save()
    }

    /// Stops a component of the control plane (`kube-apiserver`, `etcd`,
    /// `kube-controller-manager`, `moto_server`) as a crash or an upgrade
    /// would: killed. [`Cluster::start_component`] starts it again, with the
    /// same command line, read from `/proc` before the kill.
    pub fn stop_component(&self, name: &str) -> Result<StoppedComponent> {
        let pid = {
            let state = self.state.lock().expect("state lock");
            state
                .processes
                .iter()
                .rev()
                .find(|p| p.name == name)
                .map(|p| p.pid)
                .with_context(|| format!("no {name} in this environment"))?
        };
        // NUL-terminated arguments; an empty one stays.
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))?;
        let argv: Vec<String> = cmdline
            .strip_suffix(&[0])
            .unwrap_or(&cmdline)
            .split(|b| *b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let cwd = fs::read_link(format!("/proc/{pid}/cwd"))?;
        let mut child = self
            .take_child(pid)
            .with_context(|| format!("stopping {name}"))?;
        let killed = child.kill();
        child.wait()?;
        killed?;
        self.forget_process(pid)?;
        Ok(StoppedComponent {
            name: name.to_string(),
            argv,
            cwd,
        })
    }

    /// Starts a component [`Cluster::stop_component`] stopped, its output
    /// appended to its log; for the apiserver, waits until it is ready.
    pub async fn start_component(&self, stopped: StoppedComponent) -> Result<()> {
        let log = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir().join(format!("{}.log", stopped.name)))?;
        let (program, args) = stopped
            .argv
            .split_first()
            .context("an empty command line")?;
        let child = Command::new(program)
            .args(args)
            .current_dir(&stopped.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        {
            let mut state = self.state.lock().expect("state lock");
            state.processes.push(RecordedProcess {
                name: stopped.name.clone(),
                pid: child.id(),
            });
            state.save()?;
        }
        let pid = child.id();
        self.children.lock().expect("children lock").push(child);
        if stopped.name == "kube-apiserver" {
            let log = self.dir().join("kube-apiserver.log");
            wait_apiserver(&self.kubeconfig, &mut || {
                if process_running(pid) {
                    return Ok(());
                }
                let log = fs::read_to_string(&log).unwrap_or_default();
                bail!(
                    "kube-apiserver exited after its restart: {}",
                    log.lines().last().unwrap_or("(empty log)")
                )
            })
            .await?;
        }
        Ok(())
    }

    /// Starts a long-running program inside a namespace of this environment; it
    /// is killed at tear-down. Output goes to `<dir>/<log_name>.log`.
    pub fn spawn_in(
        &self,
        netns: &str,
        log_name: &str,
        program: &Path,
        args: &[&str],
    ) -> Result<u32> {
        self.spawn_in_with_env(netns, log_name, program, args, &[])
    }

    /// [`Cluster::spawn_in`] with environment variables `envs` set.
    pub fn spawn_in_with_env(
        &self,
        netns: &str,
        log_name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<u32> {
        let dir = self.dir();
        let child = netns::spawn_in_with_env(
            netns,
            &program.display().to_string(),
            args,
            &dir.join(format!("{log_name}.log")),
            envs,
        )?;
        let pid = child.id();
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        {
            let mut state = self.state.lock().expect("state lock");
            state.processes.push(RecordedProcess { name, pid });
            state.save()?;
        }
        self.children.lock().expect("children lock").push(child);
        Ok(pid)
    }

    /// Starts `causeway-agent run` (the binary at `program`) in `node`'s
    /// namespace, pointed at this environment (`--node-name`, `--kubeconfig`,
    /// `--cluster-cidr`), then `extra`; like [`Cluster::spawn_in`] otherwise.
    pub fn spawn_agent(
        &self,
        node: &str,
        log_name: &str,
        program: &Path,
        extra: &[&str],
    ) -> Result<u32> {
        self.spawn_agent_with_env(node, log_name, program, extra, &[])
    }

    /// [`Cluster::spawn_agent`] with extra environment variables.
    pub fn spawn_agent_with_env(
        &self,
        node: &str,
        log_name: &str,
        program: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<u32> {
        let netns = self.node(node).netns.clone();
        let kubeconfig = self.kubeconfig().display().to_string();
        let cluster_cidr = if self.dual_stack() {
            format!("{},{}", self.cluster_cidr(), self.cluster_cidr_v6())
        } else {
            self.cluster_cidr()
        };
        let mut args = vec![
            "run",
            "--node-name",
            node,
            "--kubeconfig",
            &kubeconfig,
            "--cluster-cidr",
            &cluster_cidr,
        ];
        args.extend_from_slice(extra);
        self.spawn_in_with_env(&netns, log_name, program, &args, env)
    }

    /// Starts a long-running program in the host namespace (where the apiserver
    /// and moto are reachable), with extra environment variables; it is recorded
    /// and killed at tear-down like the environment's own processes. Output goes
    /// to `<dir>/<log_name>.log`.
    pub fn spawn_host(
        &self,
        log_name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(String, String)],
    ) -> Result<u32> {
        let log_path = self.dir().join(format!("{log_name}.log"));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let child = Command::new(program)
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let pid = child.id();
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        {
            let mut state = self.state.lock().expect("state lock");
            state.processes.push(RecordedProcess { name, pid });
            state.save()?;
        }
        self.children.lock().expect("children lock").push(child);
        Ok(pid)
    }

    /// Adds a pod on `node`: a namespace behind a veth on the node's `cbr0`,
    /// running causeway-echo on [`ECHO_PORTS`], a Pod object bound to the node,
    /// and its status patched Running/Ready with its IP.
    pub async fn add_pod(&self, node: &str, name: &str, labels: &[(&str, &str)]) -> Result<Pod> {
        self.add_pod_in("default", node, name, labels).await
    }

    pub async fn add_pod_in(
        &self,
        namespace: &str,
        node: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        let node_info = self.node(node).clone();
        let (pod, index, node_index) = {
            let mut pods = self.pods.lock().expect("pods lock");
            let index = pods.len() + 1;
            let on_node = pods.iter().filter(|p| p.node == node).count();
            if on_node >= 250 {
                bail!("node {node} has no free pod address");
            }
            let node_index = self
                .nodes
                .iter()
                .position(|n| n.name == node)
                .expect("node exists") as u8
                + 1;
            let ip = addr(self.slot, 128 + node_index, 2 + on_node as u8);
            let ip6 = self.dual_stack().then(|| {
                addr6(
                    POD_NET6,
                    self.slot,
                    u16::from(node_index),
                    2 + on_node as u16,
                )
            });
            let pod = Pod {
                namespace: namespace.to_string(),
                name: name.to_string(),
                node: node.to_string(),
                netns: format!("cw{}-{namespace}-{name}", self.slot),
                ip,
                ip6,
            };
            pods.push(pod.clone());
            (pod, index, u16::from(node_index))
        };
        let (pod_ip, pod_ip6) = (pod.ip, pod.ip6);
        let netns_name = format!("cw{}-{namespace}-{name}", self.slot);
        let outer = format!("cw{}p{index}", self.slot);
        {
            let mut state = self.state.lock().expect("state lock");
            state.netns.push(netns_name.clone());
            state.save()?;
        }
        add_netns(&netns_name)?;
        add_veth(
            &outer,
            Some(&node_info.netns),
            &format!("cw{}q{index}", self.slot),
            &netns_name,
            "eth0",
        )?;
        exec_in(
            &node_info.netns,
            "ip",
            &["link", "set", &outer, "master", "cbr0", "up"],
        )?;
        let gateway = node_info.pod_cidr.replace(".0/24", ".1");
        exec_in(
            &netns_name,
            "ip",
            &["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"],
        )?;
        exec_in(
            &netns_name,
            "ip",
            &["route", "add", "default", "via", &gateway],
        )?;
        if let Some(ip6) = pod_ip6 {
            exec_in(
                &netns_name,
                "ip",
                &["-6", "addr", "add", &format!("{ip6}/64"), "dev", "eth0"],
            )?;
            exec_in(
                &netns_name,
                "ip",
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &addr6(POD_NET6, self.slot, node_index, 1).to_string(),
                ],
            )?;
        }
        let echo = paths::workspace_bin("causeway-echo");
        let mut args = vec!["serve".to_string(), "--name".into(), name.to_string()];
        for port in ECHO_PORTS {
            args.extend(["--port".to_string(), port.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn_in(
            &netns_name,
            &format!("pod-{namespace}-{name}"),
            &echo,
            &args,
        )?;

        let pods: Api<PodObject> = Api::namespaced(self.client.clone(), namespace);
        wait_default_service_account(&self.client, namespace).await?;
        let label_map: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let container_ports: Vec<_> = ECHO_PORTS
            .iter()
            .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
            .collect();
        let object: PodObject = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": label_map},
            "spec": {
                "nodeName": node,
                "terminationGracePeriodSeconds": 0,
                "automountServiceAccountToken": false,
                "containers": [{"name": "echo", "image": "causeway-echo", "ports": container_ports}]
            }
        }))?;
        pods.create(&PostParams::default(), &object)
            .await
            .with_context(|| format!("creating pod {namespace}/{name}"))?;
        self.set_pod_ready(namespace, name, pod_ip, &node_info, true)
            .await?;
        Ok(pod)
    }

    /// Patches a pod's status as its kubelet would: Running, with its IP (and
    /// its IPv6 address, if it has one), and Ready or not.
    pub async fn set_pod_ready(
        &self,
        namespace: &str,
        name: &str,
        pod_ip: Ipv4Addr,
        node: &NodeInfo,
        ready: bool,
    ) -> Result<()> {
        let pods: Api<PodObject> = Api::namespaced(self.client.clone(), namespace);
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let flag = if ready { "True" } else { "False" };
        let ip6 = self
            .pods
            .lock()
            .expect("pods lock")
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .and_then(|p| p.ip6);
        let mut pod_ips = vec![json!({"ip": pod_ip.to_string()})];
        pod_ips.extend(ip6.map(|ip| json!({"ip": ip.to_string()})));
        let status = json!({
            "status": {
                "phase": "Running",
                "hostIP": node.ip.to_string(),
                "hostIPs": [{"ip": node.ip.to_string()}],
                "podIP": pod_ip.to_string(),
                "podIPs": pod_ips,
                "startTime": now,
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                    {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                    {"type": "Ready", "status": flag, "lastTransitionTime": now}
                ],
                "containerStatuses": [{
                    "name": "echo", "image": "causeway-echo", "imageID": "", "ready": ready,
                    "restartCount": 0, "started": true, "state": {"running": {"startedAt": now}}
                }]
            }
        });
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("patching status of pod {namespace}/{name}"))?;
        Ok(())
    }

    /// Pods added so far.
    pub fn pods(&self) -> Vec<Pod> {
        self.pods.lock().expect("pods lock").clone()
    }

    /// Takes a detached environment back (to add pods, say); hand it over again
    /// with [`Cluster::detach`], or drop it to tear it down.
    pub async fn attach(dir: &Path, info: &DetachedInfo) -> Result<Cluster> {
        let state = EnvState::load(dir)?;
        let client = wait_apiserver(&info.kubeconfig, &mut || Ok(())).await?;
        Ok(Cluster {
            state: Mutex::new(state),
            children: Mutex::new(Vec::new()),
            options: ClusterOptions {
                nodes: info.nodes.len(),
                cluster_name: info.cluster_name.clone(),
                dual_stack: info.nodes.iter().any(|n| n.ip6.is_some()),
            },
            slot: info.slot,
            bin_dir: info.bin_dir.clone(),
            kubeconfig: info.kubeconfig.clone(),
            token: info.token.clone(),
            nodes: info.nodes.clone(),
            pods: Mutex::new(info.pods.clone()),
            aws: info.aws.clone(),
            client,
            detached: false,
        })
    }

    /// Hands the environment over: it keeps running after this process exits,
    /// and `causeway-env down` (make down) tears it down. Returns its directory.
    pub fn detach(mut self) -> Result<PathBuf> {
        let dir = {
            let mut state = self.state.lock().expect("state lock");
            state.owner_pid = None;
            state.save()?;
            state.dir.clone()
        };
        let info = DetachedInfo {
            slot: self.slot,
            cluster_name: self.options.cluster_name.clone(),
            token: self.token.clone(),
            kubeconfig: self.kubeconfig.clone(),
            bin_dir: self.bin_dir.clone(),
            aws_endpoint: self.aws_endpoint(),
            env: self.env_vars(),
            nodes: self.nodes.clone(),
            pods: self.pods(),
            external_netns: self.external_netns(),
            external_ips: self.external_ips(),
            cluster_cidr: self.cluster_cidr(),
            service_cidr: self.service_cidr(),
            aws: self.aws.clone(),
        };
        fs::write(dir.join("info.json"), serde_json::to_vec_pretty(&info)?)?;
        self.detached = true;
        Ok(dir)
    }
}

/// What a detached environment tells the scripts that use it.
#[derive(Debug, Serialize, Deserialize)]
pub struct DetachedInfo {
    pub slot: u8,
    pub cluster_name: String,
    pub token: String,
    pub kubeconfig: PathBuf,
    pub bin_dir: PathBuf,
    pub aws_endpoint: String,
    pub env: Vec<(String, String)>,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<Pod>,
    pub external_netns: String,
    pub external_ips: Vec<Ipv4Addr>,
    pub cluster_cidr: String,
    pub service_cidr: String,
    pub aws: AwsSeed,
}

/// Tears down a detached environment by its directory. Missing is fine.
pub fn teardown_dir(dir: &Path) -> Result<()> {
    match EnvState::load(dir) {
        Ok(state) => {
            state.teardown();
            Ok(())
        }
        Err(_) if !dir.exists() => Ok(()),
        Err(e) => Err(e),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        for child in self
            .children
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(state) = self.state.lock() {
            state.teardown();
        }
    }
}

/// An environment being built: torn down on drop unless disarmed.
struct Partial {
    state: EnvState,
    children: Vec<Child>,
    armed: bool,
}

impl Partial {
    fn record_link(&mut self, name: &str) -> Result<()> {
        self.state.links.push(name.to_string());
        self.state.save()
    }

    fn record_netns(&mut self, name: &str) -> Result<()> {
        self.state.netns.push(name.to_string());
        self.state.save()
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[&str], dir: &Path) -> Result<()> {
        let log = fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        self.state.processes.push(RecordedProcess {
            name: name.to_string(),
            pid: child.id(),
        });
        self.children.push(child);
        self.state.save()
    }

    /// Fails when a component has already exited: there is no point waiting for
    /// a server whose process died (a port in use, a bad flag); its log says why.
    fn ensure_running(&mut self) -> Result<()> {
        for (child, recorded) in self.children.iter_mut().zip(&self.state.processes) {
            if let Some(status) = child.try_wait()? {
                let log = fs::read_to_string(self.state.dir.join(format!("{}.log", recorded.name)))
                    .unwrap_or_default();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("(empty log)");
                bail!(
                    "{} exited ({status}) while the environment was starting: {last}",
                    recorded.name
                );
            }
        }
        Ok(())
    }

    fn disarm(&mut self) -> EnvState {
        self.armed = false;
        self.state.clone()
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.state.teardown();
    }
}

/// The last lines of each component's log, for an error message.
fn tail_logs(dir: &Path) -> String {
    let mut out = String::new();
    for name in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "moto_server",
    ] {
        if let Ok(text) = fs::read_to_string(dir.join(format!("{name}.log"))) {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(5)..].join("\n    ");
            if !tail.is_empty() {
                out.push_str(&format!("\n  {name}.log:\n    {tail}"));
            }
        }
    }
    out
}

/// The directory holding the Kubernetes binaries: built (once, cached by
/// version) by e2e/build-k8s.sh, or `CAUSEWAY_K8S_BIN` when set.
pub fn k8s_binaries() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CAUSEWAY_K8S_BIN") {
        return Ok(PathBuf::from(dir));
    }
    script_output("e2e/build-k8s.sh")
}

/// The real kube-proxy, built beside the other Kubernetes binaries; the
/// environment does not run it, tests that compare the agent with it do.
pub fn kube_proxy_binary() -> Result<PathBuf> {
    Ok(k8s_binaries()?.join("kube-proxy"))
}

/// The venv holding moto's server: created once by e2e/install-moto.sh.
pub fn moto_venv() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CAUSEWAY_MOTO_VENV") {
        return Ok(PathBuf::from(dir));
    }
    script_output("e2e/install-moto.sh")
}

fn script_output(script: &str) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(paths::repo_root().join(script))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {script}"))?;
    if !out.status.success() {
        bail!("{script} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(text.lines().last().unwrap_or("").trim()))
}

struct Pki {
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    sa_key: PathBuf,
    sa_public: PathBuf,
    tokens: PathBuf,
    token: String,
}

impl Pki {
    /// A CA, a serving certificate for the apiserver (its bridge address, the
    /// `kubernetes` Service address and names), a service-account key pair and a
    /// static admin token. kube-rs verifies the server against a real CA, so the
    /// serving certificate is never self-signed.
    fn generate(dir: &Path, host: Ipv4Addr, kubernetes_service_ip: Ipv4Addr) -> Result<Pki> {
        fs::create_dir_all(dir)?;
        let p = |name: &str| dir.join(name);
        let s = |path: PathBuf| path.display().to_string();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        let (ca_key, ca_cert) = (s(p("ca.key")), s(p("ca.crt")));
        args.extend([
            "-keyout",
            &ca_key,
            "-out",
            &ca_cert,
            "-days",
            "30",
            "-subj",
            "/CN=causeway-local-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        netns::run("openssl", &args)?;
        let (server_key, server_csr, server_cert) = (
            s(p("apiserver.key")),
            s(p("apiserver.csr")),
            s(p("apiserver.crt")),
        );
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend([
            "-keyout",
            &server_key,
            "-out",
            &server_csr,
            "-subj",
            "/CN=kube-apiserver",
        ]);
        netns::run("openssl", &args)?;
        let ext = p("apiserver.ext");
        fs::write(
            &ext,
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName=IP:{host},IP:{kubernetes_service_ip},IP:127.0.0.1,\
                 DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
                 DNS:kubernetes.default.svc.cluster.local\n"
            ),
        )?;
        netns::run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &server_csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-out",
                &server_cert,
                "-days",
                "30",
                "-extfile",
                &s(ext),
            ],
        )?;
        let (sa_key, sa_public) = (s(p("sa.key")), s(p("sa.pub")));
        netns::run("openssl", &["genrsa", "-out", &sa_key, "2048"])?;
        netns::run(
            "openssl",
            &["rsa", "-in", &sa_key, "-pubout", "-out", &sa_public],
        )?;
        let token: String = {
            use rand::Rng as _;
            let mut rng = rand::rng();
            (0..32)
                .map(|_| format!("{:x}", rng.random_range(0..16u8)))
                .collect()
        };
        let tokens = p("tokens.csv");
        let mut f = fs::File::create(&tokens)?;
        writeln!(
            f,
            "{token},causeway-admin,causeway-admin,\"system:masters\""
        )?;
        Ok(Pki {
            ca_cert: p("ca.crt"),
            server_cert: p("apiserver.crt"),
            server_key: p("apiserver.key"),
            sa_key: p("sa.key"),
            sa_public: p("sa.pub"),
            tokens,
            token,
        })
    }
}

fn write_kubeconfig(path: &Path, host: Ipv4Addr, pki: &Pki) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: causeway\n  cluster:\n    server: https://{host}:{APISERVER_PORT}\n    \
         certificate-authority: {ca}\nusers:\n- name: causeway-admin\n  user:\n    token: {token}\ncontexts:\n- name: causeway\n  \
         context:\n    cluster: causeway\n    user: causeway-admin\ncurrent-context: causeway\n",
        ca = pki.ca_cert.display(),
        token = pki.token
    );
    fs::write(path, text)?;
    Ok(())
}

/// Waits until `address` accepts connections; `alive` fails early when the
/// process that should listen there has died (a port taken, a bad flag).
fn wait_tcp(
    address: &str,
    timeout: Duration,
    what: &str,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let sock = address
        .parse()
        .with_context(|| format!("bad address {address}"))?;
    loop {
        if TcpStream::connect_timeout(&sock, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        alive()?;
        if Instant::now() > deadline {
            bail!("{what} did not listen on {address} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for `/readyz` to answer `ok`.
async fn wait_apiserver(
    kubeconfig: &Path,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let request = http::Request::get("/readyz").body(Vec::new())?;
        // A bounded wait per attempt: whatever holds the port may accept and
        // never answer.
        let last = match tokio::time::timeout(Duration::from_secs(2), client.request_text(request))
            .await
        {
            Ok(Ok(body)) if body.trim() == "ok" => return Ok(client),
            Ok(Ok(body)) => body,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 2 s".to_string(),
        };
        alive()?;
        if Instant::now() > deadline {
            bail!("kube-apiserver was not ready within 90 s: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the `default` and `kube-system` namespaces exist.
async fn wait_namespaces(client: &kube::Client) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let default = namespaces.get_opt("default").await?.is_some();
        let system = namespaces.get_opt("kube-system").await?.is_some();
        if default && system {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("namespaces default and kube-system did not appear within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pods cannot be created before the ServiceAccount admission plugin finds the
/// namespace's `default` ServiceAccount, which the serviceaccount controller makes.
async fn wait_default_service_account(client: &kube::Client, namespace: &str) -> Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let deadline = Instant::now() + Duration::from_secs(60);
    while accounts.get_opt("default").await?.is_none() {
        if Instant::now() > deadline {
            bail!(
                "ServiceAccount {namespace}/default did not appear within 60 s: is kube-controller-manager running?"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn register_nodes(client: &kube::Client, nodes: &[NodeInfo]) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    for node in nodes {
        let object: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                    "topology.kubernetes.io/region": REGION,
                    "topology.kubernetes.io/zone": node.zone,
                    "node.kubernetes.io/instance-type": "t3.medium"
                }
            },
            "spec": {
                "providerID": format!("aws:///{}/{}", node.zone, node.instance_id),
                "podCIDR": node.pod_cidr,
                "podCIDRs": std::iter::once(&node.pod_cidr).chain(&node.pod_cidr6).collect::<Vec<_>>()
            }
        }))?;
        api.create(&PostParams::default(), &object)
            .await
            .with_context(|| format!("creating node {}", node.name))?;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({
            "status": {
                "addresses": std::iter::once(node.ip.to_string())
                    .chain(node.ip6.map(|ip| ip.to_string()))
                    .map(|ip| json!({"type": "InternalIP", "address": ip}))
                    .chain([json!({"type": "Hostname", "address": node.name})])
                    .collect::<Vec<_>>(),
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "node namespace is up", "lastHeartbeatTime": now, "lastTransitionTime": now
                }],
                "nodeInfo": {
                    "machineID": node.instance_id, "systemUUID": node.instance_id, "bootID": node.netns,
                    "kernelVersion": "", "osImage": "causeway namespace node", "containerRuntimeVersion": "none",
                    "kubeletVersion": format!("v{K8S_VERSION}"), "kubeProxyVersion": "",
                    "operatingSystem": "linux", "architecture": "amd64"
                },
                "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"}
            }
        });
        api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("patching status of node {}", node.name))?;
    }
    Ok(())
}

fn seed_moto(venv: &Path, endpoint: &str, cluster: &str, nodes: &[String]) -> Result<AwsSeed> {
    let mut cmd = Command::new(venv.join("bin/python"));
    cmd.arg(paths::repo_root().join("e2e/moto/seed.py"))
        .args([endpoint, REGION, cluster])
        .args(nodes);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("cannot run e2e/moto/seed.py")?;
    if !out.status.success() {
        bail!(
            "seeding moto failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("seed.py printed something that is not its JSON")
}

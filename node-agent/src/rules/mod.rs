//! The model → one `iptables-restore` payload (mangle canary, filter, nat),
//! with kube-proxy's chain layout and names.
//!
//! Pure. The shape differs from kube-proxy's in one place, because it decides
//! whether a node can carry 10 000 Services (DESIGN.md, "Measured here"):
//! there is no `KUBE-SEP-` chain per endpoint. Each `KUBE-SVC-`/`KUBE-SVL-`
//! chain holds its DNAT candidates directly; session affinity keeps kube-proxy's
//! `-m recent` list names (`KUBE-SEP-<h>`) inside those rules; and hairpin
//! traffic (an endpoint reaching itself through a Service) is masqueraded by one
//! rule per possibly-local endpoint IP in `KUBE-POSTROUTING`, matching
//! post-DNAT `source == destination`, which is exact where kube-proxy's
//! per-endpoint `-s <ip> -j KUBE-MARK-MASQ` is.
//!
//! Large rulesets add one level: nat `KUBE-SERVICES` jumps by the low bits of
//! the destination to one of 64 buckets holding kube-proxy's entries
//! ([`Dispatch`]), so that a new connection does not walk every entry.
//!
//! Jump rules from the built-in chains cannot be made idempotent inside an
//! `iptables-restore --noflush` (a second `-I` duplicates them), so the caller
//! chooses which to include: `render` prints all of them for a fresh netns;
//! `run` checks which exist (`iptables -C`, like kube-proxy's EnsureRule) and
//! includes only the missing ones.

pub mod check;
pub mod names;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use crate::addr::{Cidr, IpFamily, MaskedAddr, low_bits_of};
use crate::model::{Endpoint, Locality, Model, Protocol, ServicePort, ServicePortName};
use crate::nfacct;
use names::{ServiceChains, endpoint_chain};

pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";
/// kubelet's chain holding the martian-packet guard; kube-proxy writes the
/// same rule when it enables localhost NodePorts.
pub const KUBE_FIREWALL: &str = "KUBE-FIREWALL";

/// kube-proxy stops writing per-endpoint comments above this many endpoints
/// ("large cluster mode"); they repeat what `--to-destination` already says.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

const NODEPORTS_COMMENT: &str =
    "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Mangle,
    Filter,
    Nat,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

/// How traffic from this node's pods is told apart (`--detect-local-mode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalTraffic {
    /// No detection: no masquerade of off-cluster ClusterIP traffic and no
    /// ETP=Local short-circuit for pods (the node is still short-circuited).
    None,
    /// `ClusterCIDR` or `NodeCIDR`: sources inside the CIDR.
    Cidr(Cidr),
    /// `BridgeInterface`: packets arriving on the pod bridge.
    Bridge(String),
    /// `InterfaceNamePrefix`: packets arriving on interfaces named `prefix*`.
    InterfacePrefix(String),
}

impl LocalTraffic {
    fn if_local(&self) -> Option<String> {
        match self {
            LocalTraffic::None => None,
            LocalTraffic::Cidr(cidr) => Some(format!("-s {cidr}")),
            LocalTraffic::Bridge(name) => Some(format!("-i {name}")),
            LocalTraffic::InterfacePrefix(prefix) => Some(format!("-i {prefix}+")),
        }
    }

    fn if_not_local(&self) -> Option<String> {
        self.if_local().map(|m| format!("! {m}"))
    }
}

/// Which destinations NodePorts answer on (`--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every local address (`-m addrtype --dst-type LOCAL`).
    All,
    /// Local addresses inside these prefixes; a host prefix is one address
    /// (`primary` resolves to the node's InternalIP this way).
    Cidrs(Vec<Cidr>),
}

/// How nat `KUBE-SERVICES` leads a new connection to its Service's entry.
///
/// kube-proxy puts one entry per Service address and port in
/// `KUBE-SERVICES`, and the first packet of every connection walks them in
/// order: at 10 000 Services a connect to the last one took 3.9 times as
/// long as with 100 (docs/benchmarks.md). Large rulesets therefore spread the
/// entries over [`DISPATCH_BUCKETS`] chains by the low bits of the
/// destination address, which Service IP allocation spreads evenly, and
/// `KUBE-SERVICES` jumps to the one bucket that can hold the packet's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// kube-proxy's layout: every entry in `KUBE-SERVICES`.
    #[default]
    Flat,
    /// Entries in `KUBE-SVC-0BUCKET-<n>`, `n` the destination's low bits.
    Buckets,
}

/// The low address bits that pick a bucket, and so the bucket count.
pub const DISPATCH_BUCKET_BITS: u8 = 6;
pub const DISPATCH_BUCKETS: u32 = 1 << DISPATCH_BUCKET_BITS;
/// Prefix of the bucket chains' names (`KUBE-SVC-0BUCKET-05`).
///
/// - `KUBE-SVC-` is a prefix kube-proxy deletes as its own when no Service
///   needs the chain. So a node given back to kube-proxy, or cleaned with
///   `kube-proxy --cleanup`, loses the buckets with the rest. A bucket left
///   behind would still jump to service chains; kube-proxy could then not
///   delete those chains when their Services go, and every restore of its
///   would fail (tests/tests/kube_proxy_switch.rs).
/// - `0` is not in the base32 alphabet of kube-proxy's hashes, so no service
///   chain has such a name. It also sorts after `KUBE-SERVICES` and before
///   every `KUBE-SVC-<hash>`, which keeps iptables-nft-restore's chain walk
///   short (see [`render`]).
pub const DISPATCH_BUCKET_PREFIX: &str = "KUBE-SVC-0BUCKET-";
/// The buckets' former prefix, still recognised so that an upgraded agent
/// deletes the buckets an earlier one left.
pub const FORMER_DISPATCH_BUCKET_PREFIX: &str = "KUBE-SERVICES-";

/// Whether `chain` is a dispatch bucket, of this version or a former one.
pub fn is_dispatch_bucket(chain: &str) -> bool {
    chain.starts_with(DISPATCH_BUCKET_PREFIX) || chain.starts_with(FORMER_DISPATCH_BUCKET_PREFIX)
}
/// Entries from which the buckets pay off (a walk of 64 jump rules replaces
/// a walk of up to this many entries) ...
const BUCKETS_FROM_ENTRIES: usize = 1000;
/// ... and below which an existing bucket layout goes back to flat. The gap
/// keeps a cluster near the threshold from switching back and forth, since
/// each switch is a full sync.
const FLAT_BELOW_ENTRIES: usize = 500;

impl Dispatch {
    /// The layout for `model`, given the layout applied before (`Flat` when
    /// nothing was).
    pub fn for_model(model: &Model, applied: Dispatch) -> Dispatch {
        let entries: usize = model
            .service_ports
            .iter()
            .map(|p| 1 + p.external_ips.len() + p.load_balancer_ips.len())
            .sum();
        match applied {
            Dispatch::Buckets if entries >= FLAT_BELOW_ENTRIES => Dispatch::Buckets,
            _ if entries >= BUCKETS_FROM_ENTRIES => Dispatch::Buckets,
            _ => Dispatch::Flat,
        }
    }

    /// The layout that the nat chains `applied` (a [`Payload::service_chains`],
    /// or the service chains read back from netfilter) belong to.
    pub fn of_chains(applied: &[String]) -> Dispatch {
        if applied.iter().any(|chain| is_dispatch_bucket(chain)) {
            Dispatch::Buckets
        } else {
            Dispatch::Flat
        }
    }
}

/// The name of bucket `index` (`KUBE-SVC-0BUCKET-05`).
pub fn dispatch_bucket_chain(index: u32) -> String {
    format!("{DISPATCH_BUCKET_PREFIX}{index:02}")
}

/// Everything besides the model that shapes the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    pub family: IpFamily,
    /// `--masquerade-bit` (default 14, mark 0x4000).
    pub masquerade_bit: u8,
    pub masquerade_all: bool,
    /// Add `--random-fully` to MASQUERADE (iptables ≥ 1.6.2 and a kernel that
    /// supports it; the caller finds out).
    pub random_fully: bool,
    pub local_traffic: LocalTraffic,
    pub nodeport_addresses: NodePortAddresses,
    /// NodePorts on 127.0.0.1 (IPv4 only; needs `route_localnet=1`, which the
    /// agent sets, and brings the martian-packet guard).
    pub localhost_nodeports: bool,
    /// This node's addresses of the family; a source range that contains one
    /// also admits traffic the node sends to its own LoadBalancer IPs.
    pub node_ips: Vec<IpAddr>,
    /// `nf_conntrack_tcp_be_liberal` is set, so INVALID packets need no DROP.
    pub conntrack_tcp_be_liberal: bool,
    /// The nfacct counters the rules count into.
    pub accounting: Accounting,
}

/// kube-proxy's nfacct counters (see [`crate::nfacct`]) that exist on this
/// node, so that rules may count into them; kube-proxy, too, leaves the
/// `-m nfacct` out where a counter could not be created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accounting {
    /// `ct_state_invalid_dropped_pkts`, on the INVALID drop in `KUBE-FORWARD`.
    pub invalid_dropped: bool,
    /// `localhost_nps_accepted_pkts`, on NodePorts at 127.0.0.0/8.
    pub localhost_nodeports: bool,
}

impl RenderConfig {
    /// kube-proxy's defaults for `family`.
    pub fn new(family: IpFamily) -> Self {
        RenderConfig {
            family,
            masquerade_bit: 14,
            masquerade_all: false,
            random_fully: true,
            local_traffic: LocalTraffic::None,
            nodeport_addresses: NodePortAddresses::All,
            localhost_nodeports: family == IpFamily::V4,
            node_ips: Vec::new(),
            conntrack_tcp_be_liberal: false,
            accounting: Accounting::default(),
        }
    }

    pub fn masquerade_mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit)
    }

    /// Whether NodePorts answer on 127.0.0.0/8 (kube-proxy's localhost
    /// NodePorts), which needs `net.ipv4.conf.all.route_localnet=1` and
    /// brings the localnet guard. As in kube-proxy: IPv4 only, and only
    /// while the NodePort addresses include the loopback range; kube-proxy
    /// turns the setting off otherwise (`--nodeport-addresses primary`, say).
    pub fn localhost_nodeports_effective(&self) -> bool {
        if !self.localhost_nodeports || self.family != IpFamily::V4 {
            return false;
        }
        let loopback_start = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0));
        match &self.nodeport_addresses {
            NodePortAddresses::All => true,
            NodePortAddresses::Cidrs(cidrs) => cidrs.iter().any(|c| {
                c.family() == IpFamily::V4
                    && (c.network().is_loopback() || c.contains(&loopback_start))
            }),
        }
    }
}

/// A rule in a built-in chain that links it to one of ours.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JumpRule {
    pub table: Table,
    pub chain: &'static str,
    /// The rule's arguments as separate words, as `iptables -C` takes them.
    pub args: Vec<String>,
}

impl JumpRule {
    pub(crate) fn new(
        table: Table,
        chain: &'static str,
        extra: &[&str],
        comment: Option<&str>,
        target: &str,
    ) -> Self {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if let Some(comment) = comment {
            args.extend([
                "-m".into(),
                "comment".into(),
                "--comment".into(),
                comment.into(),
            ]);
        }
        args.extend(["-j".into(), target.into()]);
        JumpRule { table, chain, args }
    }

    /// The rule as an `iptables-restore` line inserting it at the top.
    pub fn restore_line(&self) -> String {
        let mut line = format!("-I {} 1", self.chain);
        for arg in &self.args {
            line.push(' ');
            if arg.contains(' ') {
                let _ = write!(line, "\"{arg}\"");
            } else {
                line.push_str(arg);
            }
        }
        line
    }
}

/// kube-proxy's jump rules (`iptablesJumpChains`, plus kubelet's KUBE-FIREWALL
/// jumps when the martian guard is needed), in the order that inserting each
/// at position 1 leaves them where kube-proxy leaves them.
pub fn builtin_jumps(config: &RenderConfig) -> Vec<JumpRule> {
    const NEW: &[&str] = &["-m", "conntrack", "--ctstate", "NEW"];
    let external = Some("kubernetes externally-visible service portals");
    let portals = Some("kubernetes service portals");
    let firewall = Some("kubernetes load balancer firewall");
    let mut jumps = vec![
        JumpRule::new(
            Table::Filter,
            "INPUT",
            NEW,
            external,
            KUBE_EXTERNAL_SERVICES,
        ),
        JumpRule::new(
            Table::Filter,
            "FORWARD",
            NEW,
            external,
            KUBE_EXTERNAL_SERVICES,
        ),
        JumpRule::new(
            Table::Filter,
            "INPUT",
            &[],
            Some("kubernetes health check service ports"),
            KUBE_NODEPORTS,
        ),
        JumpRule::new(Table::Filter, "FORWARD", NEW, portals, KUBE_SERVICES),
        JumpRule::new(Table::Filter, "OUTPUT", NEW, portals, KUBE_SERVICES),
        JumpRule::new(
            Table::Filter,
            "FORWARD",
            &[],
            Some("kubernetes forwarding rules"),
            KUBE_FORWARD,
        ),
        JumpRule::new(Table::Filter, "INPUT", NEW, firewall, KUBE_PROXY_FIREWALL),
        JumpRule::new(Table::Filter, "OUTPUT", NEW, firewall, KUBE_PROXY_FIREWALL),
        JumpRule::new(Table::Filter, "FORWARD", NEW, firewall, KUBE_PROXY_FIREWALL),
        JumpRule::new(Table::Nat, "OUTPUT", &[], portals, KUBE_SERVICES),
        JumpRule::new(Table::Nat, "PREROUTING", &[], portals, KUBE_SERVICES),
        JumpRule::new(
            Table::Nat,
            "POSTROUTING",
            &[],
            Some("kubernetes postrouting rules"),
            KUBE_POSTROUTING,
        ),
    ];
    if config.localhost_nodeports_effective() {
        jumps.push(JumpRule::new(
            Table::Filter,
            "INPUT",
            &[],
            None,
            KUBE_FIREWALL,
        ));
        jumps.push(JumpRule::new(
            Table::Filter,
            "OUTPUT",
            &[],
            None,
            KUBE_FIREWALL,
        ));
    }
    jumps
}

/// One of our service chains in `model` that holds DNAT candidates: kube-proxy,
/// running beside us, rewrites it to jump to its `KUBE-SEP-` chains, which the
/// periodic check looks for (a `KUBE-SVC-` chain first, else a `KUBE-SVL-`).
pub fn kube_proxy_probe(model: &Model) -> Option<String> {
    let chains = |port: &ServicePort| ServiceChains::new(&port.name, port.protocol);
    let ports = &model.service_ports;
    ports
        .iter()
        .find(|p| !p.cluster_endpoints.is_empty() && p.uses_cluster_endpoints())
        .map(|p| chains(p).cluster)
        .or_else(|| {
            ports
                .iter()
                .find(|p| !p.local_endpoints.is_empty() && p.uses_local_endpoints())
                .map(|p| chains(p).local)
        })
}

/// Whether a payload of `model` writes hairpin rules into `KUBE-POSTROUTING`
/// (which kube-proxy's every sync rewrites without them).
pub fn writes_hairpin_rules(model: &Model) -> bool {
    !hairpin_ips(model).is_empty()
}

/// Our chains that a full render always fills, whatever the Services: found
/// empty, they were flushed by another program (`iptables -F`), and the
/// periodic check restores them with a full sync. (The canary chains only
/// show chains deleted; a flush leaves the chains in place.)
pub fn never_empty_chains(config: &RenderConfig) -> Vec<(Table, &'static str)> {
    let mut chains = vec![
        (Table::Nat, KUBE_POSTROUTING),
        (Table::Nat, KUBE_MARK_MASQ),
        (Table::Filter, KUBE_FORWARD),
    ];
    // The NodePort catch-all, its last rule.
    if config.nodeport_addresses == NodePortAddresses::All {
        chains.push((Table::Nat, KUBE_SERVICES));
    }
    if config.localhost_nodeports_effective() {
        chains.push((Table::Filter, KUBE_FIREWALL));
    }
    chains
}

/// What this render adds to the model's own rules.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions<'a> {
    /// Jump rules to insert into the built-in chains (see the module docs).
    pub builtin_jumps: &'a [JumpRule],
    /// Per-service nat chains applied before and no longer wanted: flushed and
    /// deleted in the same transaction.
    pub delete_nat_chains: &'a [String],
    /// A partial sync; `None` writes everything.
    pub partial: Option<Partial<'a>>,
    /// The layout of nat `KUBE-SERVICES`; a partial sync must keep the one
    /// applied.
    pub dispatch: Dispatch,
}

/// A partial sync: the own chains (`KUBE-SVC-`, `KUBE-SVL-`, `KUBE-EXT-`,
/// `KUBE-FW-`) of the ports in `only` are written whole, their dispatch
/// entries and the hairpin rules as a delta against `previous`; every other
/// port's chains and entries stay as applied, untouched by `--noflush`.
#[derive(Debug, Clone, Copy)]
pub struct Partial<'a> {
    pub only: &'a BTreeSet<(ServicePortName, Protocol)>,
    /// The model last applied.
    pub previous: &'a Model,
    /// [`Payload::service_chains`] of the payload last applied.
    pub applied_chains: &'a [String],
    /// [`Payload::totals`] of the payload last applied.
    pub applied_totals: RuleCounts,
}

/// Rule counts of the nat and filter tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounts {
    pub nat: usize,
    pub filter: usize,
}

impl std::ops::AddAssign for RuleCounts {
    fn add_assign(&mut self, other: RuleCounts) {
        self.nat += other.nat;
        self.filter += other.filter;
    }
}

/// The port `key` of a model (sorted by name then protocol).
fn find_port<'m>(
    model: &'m Model,
    name: &ServicePortName,
    protocol: Protocol,
) -> Option<&'m ServicePort> {
    model
        .service_ports
        .binary_search_by(|p| (&p.name, p.protocol).cmp(&(name, protocol)))
        .ok()
        .map(|i| &*model.service_ports[i])
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Chains declared (`:CHAIN - [0:0]`).
    pub chains: usize,
    /// Rules written (`-A`/`-I`).
    pub rules: usize,
}

/// One `iptables-restore` input, and what it contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub text: String,
    pub mangle: TableStats,
    pub filter: TableStats,
    pub nat: TableStats,
    /// The per-service nat chains of the whole model, and the dispatch
    /// buckets if any (declared here, or left in place by a partial render);
    /// whatever was applied before and is not here is stale next time.
    pub service_chains: Vec<String>,
    /// The rules the nat and filter tables hold once this payload is applied
    /// (for a partial render, more than it writes).
    pub totals: RuleCounts,
}

/// One table's section while it is being written: chain declarations first,
/// then rules, as iptables-restore wants them.
#[derive(Default)]
struct TableWriter {
    chains: String,
    rules: String,
    stats: TableStats,
}

impl TableWriter {
    fn chain(&mut self, name: &str) {
        self.chains.push(':');
        self.chains.push_str(name);
        self.chains.push_str(" - [0:0]\n");
        self.stats.chains += 1;
    }

    /// Starts `-A chain`; the caller finishes the line with [`TableWriter::end`].
    fn append(&mut self, chain: &str) -> &mut String {
        self.stats.rules += 1;
        self.rules.push_str("-A ");
        self.rules.push_str(chain);
        &mut self.rules
    }

    fn end(&mut self) {
        self.rules.push('\n');
    }

    fn line(&mut self, line: &str) {
        self.rules.push_str(line);
        self.rules.push('\n');
    }

    /// Appends what `other` holds into the rule stream, each chain declared
    /// just before its rules (see [`render`] on why), emptying it.
    fn take_inline(&mut self, other: &mut TableWriter) {
        self.rules.push_str(&other.chains);
        self.rules.push_str(&other.rules);
        self.stats.chains += other.stats.chains;
        self.stats.rules += other.stats.rules;
        other.clear();
    }

    fn clear(&mut self) {
        self.chains.clear();
        self.rules.clear();
        self.stats = TableStats::default();
    }

    /// Appends what `other` holds (declarations and rules), emptying it.
    fn take_from(&mut self, other: &mut TableWriter) {
        self.chains.push_str(&other.chains);
        self.rules.push_str(&other.rules);
        self.stats.chains += other.stats.chains;
        self.stats.rules += other.stats.rules;
        other.clear();
    }

    fn finish(self, name: &str, out: &mut String) -> TableStats {
        out.push('*');
        out.push_str(name);
        out.push('\n');
        out.push_str(&self.chains);
        out.push_str(&self.rules);
        out.push_str("COMMIT\n");
        self.stats
    }
}

/// `1/n` with 10 decimals, as kube-proxy prints it; index = n.
fn probabilities(max: usize) -> Vec<String> {
    (0..=max)
        .map(|n| {
            if n == 0 {
                String::new()
            } else {
                format!("{:.10}", 1.0 / n as f64)
            }
        })
        .collect()
}

/// The service ports whose rules differ between two models: added, changed
/// or removed.
pub fn changed_ports(before: &Model, after: &Model) -> BTreeSet<(ServicePortName, Protocol)> {
    // Both lists are sorted by (name, protocol): one merge walk. A port the
    // model cache did not rebuild is the same allocation in both.
    let key = |p: &ServicePort| (p.name.clone(), p.protocol);
    let mut changed = BTreeSet::new();
    let (mut old, mut new) = (
        before.service_ports.iter().peekable(),
        after.service_ports.iter().peekable(),
    );
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(o), None) => {
                changed.insert(key(o));
                old.next();
            }
            (None, Some(n)) => {
                changed.insert(key(n));
                new.next();
            }
            (Some(o), Some(n)) => match (&o.name, o.protocol).cmp(&(&n.name, n.protocol)) {
                std::cmp::Ordering::Less => {
                    changed.insert(key(o));
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.insert(key(n));
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(o, n) && o != n {
                        changed.insert(key(n));
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    changed
}

/// Renders the whole ruleset this node needs for `model`.
pub fn render(model: &Model, config: &RenderConfig, options: &RenderOptions<'_>) -> Payload {
    let mark = config.masquerade_mark();
    let random_fully = if config.random_fully {
        " --random-fully"
    } else {
        ""
    };
    let mut filter = TableWriter::default();
    let mut nat = TableWriter::default();
    let mut mangle = TableWriter::default();
    mangle.chain(KUBE_PROXY_CANARY);

    // A partial render edits the dispatch chains rule by rule instead of
    // declaring (and so flushing) them.
    let partial = options.partial.is_some();
    for chain in [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
        KUBE_PROXY_CANARY,
    ] {
        if !(partial && FILTER_DISPATCH.contains(&chain)) {
            filter.chain(chain);
        }
    }
    for chain in [
        KUBE_SERVICES,
        KUBE_NODEPORTS,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
        KUBE_PROXY_CANARY,
    ] {
        if !(partial && NAT_DISPATCH.contains(&chain)) {
            nat.chain(chain);
        }
    }

    // Hairpin first: those packets carry no mark, and the next rule returns
    // every unmarked packet.
    let hairpin = hairpin_ips(model);
    for ip in &hairpin {
        let r = nat.append(KUBE_POSTROUTING);
        r.push_str(&hairpin_spec(ip, random_fully));
        nat.end();
    }
    let r = nat.append(KUBE_POSTROUTING);
    let _ = write!(r, " -m mark ! --mark {mark}/{mark} -j RETURN");
    nat.end();
    // Clear the mark so a packet that traverses the stack again is not
    // masqueraded twice.
    let r = nat.append(KUBE_POSTROUTING);
    let _ = write!(r, " -j MARK --xor-mark {mark}");
    nat.end();
    let r = nat.append(KUBE_POSTROUTING);
    let _ = write!(
        r,
        " -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE{random_fully}"
    );
    nat.end();
    let r = nat.append(KUBE_MARK_MASQ);
    let _ = write!(r, " -j MARK --or-mark {mark}");
    nat.end();

    if config.localhost_nodeports_effective() {
        // route_localnet lets remote hosts reach 127.0.0.0/8 services; only
        // DNATed (NodePort) traffic may pass (https://issues.k8s.io/90259).
        filter.chain(KUBE_FIREWALL);
        let r = filter.append(KUBE_FIREWALL);
        r.push_str(
            " -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        );
        filter.end();
    }

    // A partial render leaves these chains alone (they follow from the
    // configuration, which has not changed) except for the hairpin rules,
    // which follow the endpoints and are edited one by one, new ones first
    // (they must precede KUBE-POSTROUTING's RETURN).
    let previous_hairpin = options
        .partial
        .map(|p| hairpin_ips(p.previous))
        .unwrap_or_default();
    if partial {
        filter.clear();
        nat.clear();
        mangle.clear();
        for ip in previous_hairpin.difference(&hairpin) {
            nat.line(&format!(
                "-D {KUBE_POSTROUTING}{}",
                hairpin_spec(ip, random_fully)
            ));
            nat.stats.rules += 1;
        }
        for ip in hairpin.difference(&previous_hairpin) {
            nat.line(&format!(
                "-I {KUBE_POSTROUTING} 1{}",
                hairpin_spec(ip, random_fully)
            ));
            nat.stats.rules += 1;
        }
    }

    let total_endpoints: usize = model
        .service_ports
        .iter()
        .map(|p| p.cluster_endpoints.len() + p.local_endpoints.len())
        .sum();
    let max_endpoints = model
        .service_ports
        .iter()
        .map(|p| p.cluster_endpoints.len().max(p.local_endpoints.len()))
        .max()
        .unwrap_or(0);
    let bucket_chains: Vec<String> = match options.dispatch {
        Dispatch::Flat => Vec::new(),
        Dispatch::Buckets => (0..DISPATCH_BUCKETS).map(dispatch_bucket_chain).collect(),
    };
    let mut ctx = ServiceContext {
        config,
        probabilities: probabilities(max_endpoints),
        endpoint_comments: total_endpoints <= LARGE_CLUSTER_ENDPOINTS,
        local_if: config.local_traffic.if_local(),
        not_local_if: config.local_traffic.if_not_local(),
        service_chains: Vec::new(),
        bucket_chains: &bucket_chains,
    };
    // The buckets and the jumps to them follow from the layout, which a
    // partial sync keeps: only a full one writes them. The jumps precede the
    // NodePort catch-all, which stays last.
    if !partial {
        for (index, chain) in (0..).zip(&bucket_chains) {
            nat.chain(chain);
            let r = nat.append(KUBE_SERVICES);
            let _ = write!(
                r,
                " -m comment --comment \"service addresses in bucket {index} of {DISPATCH_BUCKETS}\" -d {} -j {chain}",
                MaskedAddr::low_bits(config.family, index, DISPATCH_BUCKET_BITS)
            );
            nat.end();
        }
        ctx.service_chains.extend(bucket_chains.iter().cloned());
    }
    // Each port's rules are written aside: its own chains, and its entries
    // in the dispatch chains. A full render keeps all of them. A partial one
    // keeps the own chains of the ports in `only`, and turns their dispatch
    // entries into a delta against the previous model: `-D` for entries that
    // went, `-I … 1` for new ones (first, so the NodePort catch-all stays
    // last in nat KUBE-SERVICES; the entries of different ports match
    // different packets, so their order is free).
    let mut own = TableWriter::default();
    let mut port_filter = TableWriter::default();
    let mut port_nat = TableWriter::default();
    let mut external = ExternalPart::default();
    // The order of a full render is chosen for iptables-nft-restore, whose
    // cost is otherwise quadratic in the chains. Each command adds its chain
    // (and jump target) to a list kept sorted by name, found by walking it
    // from the smallest name (iptables 1.8.9, nft-cache.c). Writing the ports
    // in descending order of their chains' hash, each chain declared just
    // before its rules, makes every walk stop after the few static chains:
    // 3.5 s instead of 15 s at 10 000 × 10 (docs/benchmarks.md). All chains of
    // a port share the hash, and the order of dispatch entries is free (they
    // match different packets), so nothing else changes.
    //
    // `KUBE-EXT-` and `KUBE-FW-` sort before every other name, so once they
    // are in the list every later walk to another name passes all of them.
    // They are written last, after every port's cluster part: 6 s instead of
    // 48 s for 10 000 NodePort Services × 10 (docs/benchmarks.md).
    let mut external_part = TableWriter::default();
    let ports: Vec<&ServicePort> = match options.partial {
        Some(p) => p
            .only
            .iter()
            .filter_map(|(name, protocol)| find_port(model, name, *protocol))
            .collect(),
        None => model.service_ports.iter().map(|p| &**p).collect(),
    };
    let mut ports: Vec<(&ServicePort, ServiceChains)> = ports
        .into_iter()
        .map(|p| (p, ServiceChains::new(&p.name, p.protocol)))
        .collect();
    if !partial {
        ports.sort_unstable_by(|a, b| b.1.cluster.cmp(&a.1.cluster));
    }
    // The rules the ports in `only` had before and have now: a partial
    // render counts each table as what was applied plus the difference.
    let mut rules_before = RuleCounts::default();
    let mut rules_after = RuleCounts::default();
    for (port, chains) in &ports {
        let port = *port;
        render_service_port(
            port,
            chains,
            &mut ctx,
            &mut port_filter,
            &mut port_nat,
            &mut own,
            &mut external,
        );
        let Some(p) = options.partial else {
            filter.take_from(&mut port_filter);
            nat.take_inline(&mut own);
            nat.take_inline(&mut port_nat);
            external_part.take_inline(&mut external.own);
            external_part.take_inline(&mut external.entries);
            continue;
        };
        external.merge_into(&mut own, &mut port_nat);
        rules_after += RuleCounts {
            nat: own.stats.rules + port_nat.stats.rules,
            filter: port_filter.stats.rules,
        };
        nat.take_from(&mut own);
        rules_before += dispatch_delta(
            find_port(p.previous, &port.name, port.protocol),
            Some(port),
            &ctx,
            &mut port_filter,
            &mut port_nat,
            &mut filter,
            &mut nat,
        );
    }
    // Ports that are gone: their dispatch entries go too (their chains are
    // deleted through `delete_nat_chains`).
    if let Some(p) = options.partial {
        for (name, protocol) in p.only {
            if find_port(model, name, *protocol).is_some() {
                continue;
            }
            rules_before += dispatch_delta(
                find_port(p.previous, name, *protocol),
                None,
                &ctx,
                &mut port_filter,
                &mut port_nat,
                &mut filter,
                &mut nat,
            );
        }
    }

    nat.take_inline(&mut external_part);
    // A partial render leaves it: it follows from the configuration.
    if !partial {
        render_nodeports_jump(config, &mut nat);
    }

    if !partial {
        if !config.conntrack_tcp_be_liberal {
            // INVALID packets would otherwise reach pods un-NATed and reset
            // connections (kubernetes#74839).
            let r = filter.append(KUBE_FORWARD);
            r.push_str(" -m conntrack --ctstate INVALID");
            if config.accounting.invalid_dropped {
                let _ = write!(
                    r,
                    " -m nfacct --nfacct-name {}",
                    nfacct::CT_STATE_INVALID_DROPPED
                );
            }
            r.push_str(" -j DROP");
            filter.end();
        }
        let r = filter.append(KUBE_FORWARD);
        let _ = write!(
            r,
            " -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
        );
        filter.end();
        let r = filter.append(KUBE_FORWARD);
        r.push_str(
            " -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        );
        filter.end();
    }

    let totals = match options.partial {
        Some(p) => RuleCounts {
            nat: (p.applied_totals.nat + rules_after.nat + hairpin.len())
                .saturating_sub(rules_before.nat + previous_hairpin.len()),
            filter: (p.applied_totals.filter + rules_after.filter)
                .saturating_sub(rules_before.filter),
        },
        None => RuleCounts {
            nat: nat.stats.rules,
            filter: filter.stats.rules,
        },
    };
    let service_chains = match options.partial {
        Some(p) => {
            // The applied chains, less every chain the ports in `only` may
            // have had (all four share the port's hash), plus what they have now.
            let replaced: BTreeSet<String> = p
                .only
                .iter()
                .flat_map(|(name, protocol)| {
                    let c = ServiceChains::new(name, *protocol);
                    [c.cluster, c.local, c.external, c.firewall]
                })
                .collect();
            let mut chains: Vec<String> = p
                .applied_chains
                .iter()
                .filter(|c| !replaced.contains(*c))
                .cloned()
                .collect();
            chains.append(&mut ctx.service_chains);
            chains
        }
        None => std::mem::take(&mut ctx.service_chains),
    };
    delete_stale_chains(&mut nat, options.delete_nat_chains, &service_chains);

    for jump in options.builtin_jumps {
        let writer = match jump.table {
            Table::Filter => &mut filter,
            Table::Nat => &mut nat,
            Table::Mangle => &mut mangle,
        };
        writer.stats.rules += 1;
        writer.line(&jump.restore_line());
    }

    // nat comes first. iptables-restore commits table by table, and nat is
    // where a restore gets refused (a stale chain that another program still
    // jumps to, a rule the kernel rejects): refused there, nothing of the
    // payload is applied. Then filter, then mangle (only the canary).
    //
    // nat's rules are nearly all of the payload (16 MB at 10 000 × 10): their
    // buffer becomes the payload, its head inserted in front and the other
    // tables appended, so that the payload is not held twice at the peak of
    // a full sync. (The insert moves the text within the buffer; it
    // reallocates only when the spare capacity, which doubling growth
    // leaves, is shorter than the head.)
    let mut head = String::with_capacity(nat.chains.len() + 8);
    head.push_str("*nat\n");
    head.push_str(&nat.chains);
    let mut text = std::mem::take(&mut nat.rules);
    text.insert_str(0, &head);
    text.push_str("COMMIT\n");
    let filter = filter.finish("filter", &mut text);
    let mangle = mangle.finish("mangle", &mut text);
    let nat = nat.stats;
    Payload {
        text,
        mangle,
        filter,
        nat,
        service_chains,
        totals,
    }
}

/// Flushes and deletes the per-service chains in `stale` that `current` does
/// not redeclare, after everything else, so that iptables-nft's sorted walk
/// (see [`render`]) does not pass them for every rule. Chains that may jump to
/// other chains are all flushed before any is deleted (a chain still jumped
/// to cannot go). kube-proxy's per-endpoint `KUBE-SEP-` chains, of which a
/// takeover may find 100 000, are jumped to only by chains flushed by then;
/// each is flushed and deleted at once, in descending order, which keeps
/// every walk short.
fn delete_stale_chains(nat: &mut TableWriter, stale: &[String], current: &[String]) {
    let current: BTreeSet<&str> = current.iter().map(String::as_str).collect();
    let mut stale: Vec<&str> = stale
        .iter()
        .map(String::as_str)
        .filter(|chain| !current.contains(chain))
        .collect();
    stale.sort_unstable_by(|a, b| b.cmp(a));
    stale.dedup();
    let (endpoint_chains, others): (Vec<&str>, Vec<&str>) = stale
        .into_iter()
        .partition(|chain| chain.starts_with("KUBE-SEP-"));
    let mut flushes = TableWriter::default();
    for chain in &others {
        flushes.chain(chain);
    }
    nat.take_inline(&mut flushes);
    for chain in &others {
        nat.line(&format!("-X {chain}"));
    }
    for chain in &endpoint_chains {
        flushes.chain(chain);
        nat.take_inline(&mut flushes);
        nat.line(&format!("-X {chain}"));
    }
}

/// The arguments of the hairpin masquerade rule for endpoint `ip`.
fn hairpin_spec(ip: &IpAddr, random_fully: &str) -> String {
    format!(
        " -m comment --comment \"masquerade hairpin traffic to {ip}\" -s {ip} -d {ip} -m conntrack --ctstate DNAT -j MASQUERADE{random_fully}"
    )
}

/// The dispatch chains: one entry per Service address, in every sync.
const FILTER_DISPATCH: [&str; 4] = [
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
];
const NAT_DISPATCH: [&str; 2] = [KUBE_SERVICES, KUBE_NODEPORTS];

/// Writes the edits that turn `before`'s dispatch entries into `after`'s
/// (either may be absent) into `filter` and `nat`; returns the rules
/// `before` had (in nat, its own chains' and its entries). `port_filter`/`port_nat`
/// hold `after`'s entries on entry and are left empty.
fn dispatch_delta(
    before: Option<&ServicePort>,
    after: Option<&ServicePort>,
    ctx: &ServiceContext<'_>,
    port_filter: &mut TableWriter,
    port_nat: &mut TableWriter,
    filter: &mut TableWriter,
    nat: &mut TableWriter,
) -> RuleCounts {
    let mut old_filter = TableWriter::default();
    let mut old_nat = TableWriter::default();
    let mut old_own = TableWriter::default();
    let mut old_external = ExternalPart::default();
    if let Some(before) = before {
        // The previous entries, rendered as they were applied; the scratch
        // context keeps this from counting as a chain of the new model.
        let mut scratch = ServiceContext {
            config: ctx.config,
            // The old port may have had more endpoints than any port now.
            probabilities: probabilities(
                before
                    .cluster_endpoints
                    .len()
                    .max(before.local_endpoints.len()),
            ),
            endpoint_comments: ctx.endpoint_comments,
            local_if: ctx.local_if.clone(),
            not_local_if: ctx.not_local_if.clone(),
            service_chains: Vec::new(),
            bucket_chains: ctx.bucket_chains,
        };
        render_service_port(
            before,
            &ServiceChains::new(&before.name, before.protocol),
            &mut scratch,
            &mut old_filter,
            &mut old_nat,
            &mut old_own,
            &mut old_external,
        );
        old_external.merge_into(&mut old_own, &mut old_nat);
    }
    if after.is_none() {
        port_filter.clear();
        port_nat.clear();
    }
    for (old, new, out) in [
        (&old_filter, &*port_filter, &mut *filter),
        (&old_nat, &*port_nat, &mut *nat),
    ] {
        let old_lines: Vec<&str> = old.rules.lines().collect();
        let new_lines: Vec<&str> = new.rules.lines().collect();
        for line in &old_lines {
            if !new_lines.contains(line)
                && let Some(rule) = line.strip_prefix("-A ")
            {
                out.line(&format!("-D {rule}"));
                out.stats.rules += 1;
            }
        }
        for line in &new_lines {
            if !old_lines.contains(line)
                && let Some(rule) = line.strip_prefix("-A ")
                && let Some((chain, spec)) = rule.split_once(' ')
            {
                out.line(&format!("-I {chain} 1 {spec}"));
                out.stats.rules += 1;
            }
        }
    }
    port_filter.clear();
    port_nat.clear();
    RuleCounts {
        nat: old_nat.stats.rules + old_own.stats.rules,
        filter: old_filter.stats.rules,
    }
}

/// Endpoint IPs that may be on this node and so may reach themselves through a
/// Service. Endpoints without a node name (hand-written ones) count as local:
/// masquerading one too many hairpin never breaks a connection.
fn hairpin_ips(model: &Model) -> BTreeSet<IpAddr> {
    let mut ips = BTreeSet::new();
    for port in &model.service_ports {
        for endpoint in port.cluster_endpoints.iter().chain(&port.local_endpoints) {
            if endpoint.locality != Locality::Remote {
                ips.insert(endpoint.ip);
            }
        }
    }
    ips
}

/// The last rule of nat KUBE-SERVICES: local destinations go on to NodePorts.
fn render_nodeports_jump(config: &RenderConfig, nat: &mut TableWriter) {
    let loopback: Cidr = match config.family {
        IpFamily::V4 => Cidr::new("127.0.0.0".parse().expect("literal"), 8),
        IpFamily::V6 => Cidr::new("::1".parse().expect("literal"), 128),
    }
    .expect("valid prefix");
    let loopback_allowed = config.localhost_nodeports_effective();
    let exclude_loopback = if loopback_allowed {
        String::new()
    } else {
        format!(" ! -d {loopback}")
    };
    let all = |nat: &mut TableWriter| {
        let r = nat.append(KUBE_SERVICES);
        let _ = write!(
            r,
            " -m comment --comment {NODEPORTS_COMMENT} -m addrtype --dst-type LOCAL{exclude_loopback} -j {KUBE_NODEPORTS}"
        );
        nat.end();
    };
    match &config.nodeport_addresses {
        NodePortAddresses::All => all(nat),
        NodePortAddresses::Cidrs(cidrs) => {
            for cidr in cidrs.iter().filter(|c| c.family() == config.family) {
                if cidr.prefix_len() == 0 {
                    all(nat);
                    continue;
                }
                let within_loopback = cidr.prefix_len() >= loopback.prefix_len()
                    && loopback.contains(&cidr.network());
                if within_loopback && !loopback_allowed {
                    continue;
                }
                let r = nat.append(KUBE_SERVICES);
                if cidr.is_host() {
                    let _ = write!(
                        r,
                        " -m comment --comment {NODEPORTS_COMMENT} -d {cidr} -j {KUBE_NODEPORTS}"
                    );
                } else {
                    let _ = write!(
                        r,
                        " -m comment --comment {NODEPORTS_COMMENT} -d {cidr} -m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}"
                    );
                }
                nat.end();
            }
        }
    }
}

struct ServiceContext<'a> {
    config: &'a RenderConfig,
    probabilities: Vec<String>,
    endpoint_comments: bool,
    local_if: Option<String>,
    not_local_if: Option<String>,
    service_chains: Vec<String>,
    /// The [`Dispatch::Buckets`] chains by index; empty for a flat layout.
    bucket_chains: &'a [String],
}

impl ServiceContext<'_> {
    /// The nat chain that holds the dispatch entry for destination `ip`.
    fn dispatch_chain(&self, ip: &IpAddr) -> &str {
        if self.bucket_chains.is_empty() {
            KUBE_SERVICES
        } else {
            &self.bucket_chains[low_bits_of(ip, DISPATCH_BUCKET_BITS) as usize]
        }
    }
}

/// What a port writes to nat about its external traffic: its `KUBE-EXT-`
/// and `KUBE-FW-` chains, and the NodePort, load-balancer IP and external IP
/// entries that lead to them. A full render writes these after every port's
/// cluster part (see [`render`]); a partial one merges them back.
#[derive(Default)]
struct ExternalPart {
    own: TableWriter,
    entries: TableWriter,
}

impl ExternalPart {
    /// Moves both parts into the port's other nat writers.
    fn merge_into(&mut self, own: &mut TableWriter, entries: &mut TableWriter) {
        own.take_from(&mut self.own);
        entries.take_from(&mut self.entries);
    }
}

/// kube-proxy's `syncProxyRules` body for one service port. The cluster IP's
/// dispatch entry goes to `nat` and the port's KUBE-SVC/SVL chains to `own`;
/// everything external to `external`.
fn render_service_port(
    port: &ServicePort,
    chains: &ServiceChains,
    ctx: &mut ServiceContext<'_>,
    filter: &mut TableWriter,
    nat: &mut TableWriter,
    own: &mut TableWriter,
    external: &mut ExternalPart,
) {
    let name = port.name.to_string();
    let proto = port.protocol.as_str();
    let has_endpoints = port.has_endpoints;

    let uses_cluster_chain = !port.cluster_endpoints.is_empty() && port.uses_cluster_endpoints();
    let uses_local_chain = !port.local_endpoints.is_empty() && port.uses_local_endpoints();

    let (internal_chain, has_internal_endpoints) = if port.internal_policy_local() {
        (
            &chains.local,
            has_endpoints && !port.local_endpoints.is_empty(),
        )
    } else {
        (&chains.cluster, has_endpoints)
    };
    let (external_policy_chain, has_external_endpoints) = if port.external_policy_local() {
        (
            &chains.local,
            has_endpoints && !port.local_endpoints.is_empty(),
        )
    } else {
        (&chains.cluster, has_endpoints)
    };
    // Needed even without externally usable endpoints: the EXT chain carries
    // the short-circuit for pods and the node.
    let uses_external_chain = has_endpoints && port.externally_accessible();
    let uses_firewall_chain = has_endpoints
        && !port.load_balancer_ips.is_empty()
        && !port.load_balancer_source_ranges.is_empty();
    let load_balancer_chain = if uses_firewall_chain {
        &chains.firewall
    } else {
        &chains.external
    };

    let no_endpoints = format!("\"{name} has no endpoints\"");
    let no_local_endpoints = format!("\"{name} has no local endpoints\"");
    let (internal_filter, external_filter) = if !has_endpoints {
        (
            Some(("REJECT", &no_endpoints)),
            Some(("REJECT", &no_endpoints)),
        )
    } else {
        (
            (!has_internal_endpoints).then_some(("DROP", &no_local_endpoints)),
            (!has_external_endpoints).then_some(("DROP", &no_local_endpoints)),
        )
    };
    let match_proto = format!("-m {proto} -p {proto}");

    // Cluster IP.
    if has_internal_endpoints {
        let r = nat.append(ctx.dispatch_chain(&port.cluster_ip));
        let _ = write!(
            r,
            " -m comment --comment \"{name} cluster IP\" {match_proto} -d {} --dport {} -j {internal_chain}",
            port.cluster_ip, port.port
        );
        nat.end();
    } else if let Some((target, comment)) = internal_filter {
        let r = filter.append(KUBE_SERVICES);
        let _ = write!(
            r,
            " -m comment --comment {comment} {match_proto} -d {} --dport {} -j {target}",
            port.cluster_ip, port.port
        );
        filter.end();
    }

    // External IPs.
    for ip in &port.external_ips {
        if has_endpoints {
            let entries = &mut external.entries;
            let r = entries.append(ctx.dispatch_chain(ip));
            let _ = write!(
                r,
                " -m comment --comment \"{name} external IP\" {match_proto} -d {ip} --dport {} -j {}",
                port.port, chains.external
            );
            entries.end();
        }
        if let Some((target, comment)) = external_filter {
            let r = filter.append(KUBE_EXTERNAL_SERVICES);
            let _ = write!(
                r,
                " -m comment --comment {comment} {match_proto} -d {ip} --dport {} -j {target}",
                port.port
            );
            filter.end();
        }
    }

    // Load balancer IPs.
    for ip in &port.load_balancer_ips {
        if has_endpoints {
            let entries = &mut external.entries;
            let r = entries.append(ctx.dispatch_chain(ip));
            let _ = write!(
                r,
                " -m comment --comment \"{name} loadbalancer IP\" {match_proto} -d {ip} --dport {} -j {load_balancer_chain}",
                port.port
            );
            entries.end();
        }
        if uses_firewall_chain {
            // Whatever the KUBE-FW chain did not DNAT is still addressed to the
            // load balancer IP when it reaches filter, and is dropped here.
            let r = filter.append(KUBE_PROXY_FIREWALL);
            let _ = write!(
                r,
                " -m comment --comment \"{name} traffic not accepted by {}\" {match_proto} -d {ip} --dport {} -j DROP",
                chains.firewall, port.port
            );
            filter.end();
        }
    }
    if let Some((target, comment)) = external_filter {
        for ip in &port.load_balancer_ips {
            let r = filter.append(KUBE_EXTERNAL_SERVICES);
            let _ = write!(
                r,
                " -m comment --comment {comment} {match_proto} -d {ip} --dport {} -j {target}",
                port.port
            );
            filter.end();
        }
    }

    // NodePort. Not subject to loadBalancerSourceRanges (kube-proxy semantics).
    if let Some(node_port) = port.node_port {
        if has_endpoints {
            let entries = &mut external.entries;
            let r = entries.append(KUBE_NODEPORTS);
            let _ = write!(
                r,
                " -m comment --comment \"{name}\" {match_proto} --dport {node_port} -j {}",
                chains.external
            );
            entries.end();
        }
        if let Some((target, comment)) = external_filter {
            let r = filter.append(KUBE_EXTERNAL_SERVICES);
            let _ = write!(
                r,
                " -m comment --comment {comment} -m addrtype --dst-type LOCAL {match_proto} --dport {node_port} -j {target}"
            );
            filter.end();
        }
    }

    // The health check server for ETP=Local answers whether or not endpoints exist.
    if let Some(health_port) = port.health_check_node_port {
        let r = filter.append(KUBE_NODEPORTS);
        let _ = write!(
            r,
            " -m comment --comment \"{name} health check node port\" -m tcp -p tcp --dport {health_port} -j ACCEPT"
        );
        filter.end();
    }

    // Internal traffic: masquerade what did not come from a local pod, since
    // the reply may otherwise bypass this node.
    if has_internal_endpoints {
        let masquerade_match = if ctx.config.masquerade_all {
            Some(String::new())
        } else {
            ctx.not_local_if.as_ref().map(|m| format!(" {m}"))
        };
        if let Some(extra) = masquerade_match {
            let r = own.append(internal_chain);
            let _ = write!(
                r,
                " -m comment --comment \"{name} cluster IP\" {match_proto} -d {} --dport {}{extra} -j {KUBE_MARK_MASQ}",
                port.cluster_ip, port.port
            );
            own.end();
        }
    }

    let ext_own = &mut external.own;
    if uses_external_chain {
        ext_own.chain(&chains.external);
        ctx.service_chains.push(chains.external.clone());
        // Counts the NodePort's packets to 127.0.0.0/8 and goes on. kube-proxy
        // counts them with a second KUBE-NODEPORTS entry; here it is the first
        // rule of the chain that entry leads to, matching what the entry
        // matches (only a load-balancer IP in 127.0.0.0/8 with the NodePort's
        // number as its port could add to it; external IPs cannot be
        // loopback). Each KUBE-NODEPORTS entry costs iptables-nft-restore a
        // walk past every KUBE-EXT- chain, so a second one per NodePort took
        // a full apply of 10 000 NodePorts from 6.4-7.2 s to 11.4-12.4 s
        // (docs/benchmarks.md); a rule here costs no such walk.
        if let Some(node_port) = port.node_port
            && has_endpoints
            && ctx.config.accounting.localhost_nodeports
            && ctx.config.localhost_nodeports_effective()
        {
            let r = ext_own.append(&chains.external);
            let _ = write!(
                r,
                " -m comment --comment \"count {name} NodePort packets to 127.0.0.0/8\" {match_proto} -d 127.0.0.0/8 --dport {node_port} -m nfacct --nfacct-name {}",
                nfacct::LOCALHOST_NODEPORTS_ACCEPTED
            );
            ext_own.end();
        }
        if !port.external_policy_local() {
            // Endpoints may be on other nodes, so the reply must come back here.
            let r = ext_own.append(&chains.external);
            let _ = write!(
                r,
                " -m comment --comment \"masquerade traffic for {name} external destinations\" -j {KUBE_MARK_MASQ}"
            );
            ext_own.end();
        } else {
            // Pods and the node itself reach every endpoint, as if they had gone
            // out to the load balancer and come back in.
            if let Some(local_if) = &ctx.local_if {
                let r = ext_own.append(&chains.external);
                let _ = write!(
                    r,
                    " -m comment --comment \"pod traffic for {name} external destinations\" {local_if} -j {}",
                    chains.cluster
                );
                ext_own.end();
            }
            // The node's source address would be the service IP itself.
            let r = ext_own.append(&chains.external);
            let _ = write!(
                r,
                " -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
            );
            ext_own.end();
            let r = ext_own.append(&chains.external);
            let _ = write!(
                r,
                " -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {}",
                chains.cluster
            );
            ext_own.end();
        }
        if has_external_endpoints {
            let r = ext_own.append(&chains.external);
            let _ = write!(r, " -j {external_policy_chain}");
            ext_own.end();
        }
    }

    if uses_firewall_chain {
        ext_own.chain(&chains.firewall);
        ctx.service_chains.push(chains.firewall.clone());
        let mut allow_from_node = false;
        for cidr in &port.load_balancer_source_ranges {
            let r = ext_own.append(&chains.firewall);
            let _ = write!(
                r,
                " -m comment --comment \"{name} loadbalancer IP\" -s {cidr} -j {}",
                chains.external
            );
            ext_own.end();
            allow_from_node |= ctx.config.node_ips.iter().any(|ip| cidr.contains(ip));
        }
        // A node reaching its own LB IP (often a local address) arrives with the
        // LB IP as source; admit it when the node itself is admitted.
        if allow_from_node {
            for ip in &port.load_balancer_ips {
                let r = ext_own.append(&chains.firewall);
                let _ = write!(
                    r,
                    " -m comment --comment \"{name} loadbalancer IP\" -s {ip} -j {}",
                    chains.external
                );
                ext_own.end();
            }
        }
        let r = ext_own.append(&chains.firewall);
        let _ = write!(
            r,
            " -m comment --comment \"other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL\""
        );
        ext_own.end();
    }

    if uses_cluster_chain {
        own.chain(&chains.cluster);
        ctx.service_chains.push(chains.cluster.clone());
        write_endpoint_rules(
            own,
            ctx,
            port,
            &name,
            proto,
            &chains.cluster,
            &port.cluster_endpoints,
        );
    }
    if uses_local_chain {
        own.chain(&chains.local);
        ctx.service_chains.push(chains.local.clone());
        write_endpoint_rules(
            own,
            ctx,
            port,
            &name,
            proto,
            &chains.local,
            &port.local_endpoints,
        );
    }
}

/// The DNAT candidates of one service chain: affinity rules first (a client
/// seen recently goes back to its endpoint), then a uniform random choice
/// where candidate `i` of `n` matches with probability `1/(n-i)`.
fn write_endpoint_rules(
    nat: &mut TableWriter,
    ctx: &ServiceContext<'_>,
    port: &ServicePort,
    name: &str,
    proto: &str,
    chain: &str,
    endpoints: &[Endpoint],
) {
    let comment = |r: &mut String, address: &str| {
        if ctx.endpoint_comments {
            let _ = write!(r, " -m comment --comment \"{name} -> {address}\"");
        }
    };
    let addresses: Vec<String> = endpoints.iter().map(Endpoint::address).collect();
    let affinity_lists: Vec<String> = if port.affinity_timeout_seconds.is_some() {
        endpoints
            .iter()
            .map(|e| endpoint_chain(&port.name, port.protocol, e))
            .collect()
    } else {
        Vec::new()
    };
    if let Some(timeout) = port.affinity_timeout_seconds {
        for (address, list) in addresses.iter().zip(&affinity_lists) {
            let r = nat.append(chain);
            comment(r, address);
            let _ = write!(
                r,
                " -m recent --name {list} --update --seconds {timeout} --reap -p {proto} -j DNAT --to-destination {address}"
            );
            nat.end();
        }
    }
    let n = endpoints.len();
    for (i, address) in addresses.iter().enumerate() {
        let r = nat.append(chain);
        comment(r, address);
        if i + 1 < n {
            let _ = write!(
                r,
                " -m statistic --mode random --probability {}",
                ctx.probabilities[n - i]
            );
        }
        if let Some(list) = affinity_lists.get(i) {
            let _ = write!(r, " -m recent --name {list} --set");
        }
        // `-p` alone: DNAT to a port needs it, and kube-proxy's extra `-m tcp`
        // costs iptables-nft one more kernel expression per endpoint.
        let _ = write!(r, " -p {proto} -j DNAT --to-destination {address}");
        nat.end();
    }
}

#[cfg(test)]
mod tests;

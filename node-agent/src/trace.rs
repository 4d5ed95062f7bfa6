//! A packet's fate through a rendered ruleset, explained.
//!
//! Pure: parses an `iptables-restore` payload (what `render` prints, or what the
//! running agent last applied) and walks one packet through the hooks it would
//! traverse, as the kernel does for the first packet of a connection: nat
//! PREROUTING (or OUTPUT for the node's own traffic), the routing decision, filter
//! INPUT / FORWARD / OUTPUT, nat POSTROUTING. A `statistic` rule forks the walk,
//! so every DNAT candidate comes out with its probability, and each one says
//! whether it would be masqueraded. The verdict is one sentence that names the
//! Service (from kube-proxy's rule comments) and the reason.
//!
//! What cannot be known from the rules alone is an input: the node's local
//! addresses (for `addrtype LOCAL`) and the interface the packet arrives on (for
//! `--detect-local-mode BridgeInterface|InterfaceNamePrefix`). Session affinity is
//! traced for a first connection (`recent --rcheck` does not match yet).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use crate::addr::{Cidr, MaskedAddr, parse_cidr, parse_ip, parse_masked};
use crate::rules::{KUBE_NODEPORTS, KUBE_SERVICES, is_dispatch_bucket};

/// What `-s`/`-d` match.
#[derive(Debug, Clone)]
enum Address {
    Prefix(Cidr),
    /// `addr/mask` with the mask written as an address (dispatch buckets).
    Masked(MaskedAddr),
}

impl Address {
    fn contains(&self, ip: &IpAddr) -> bool {
        match self {
            Address::Prefix(cidr) => cidr.contains(ip),
            Address::Masked(masked) => masked.contains(ip),
        }
    }

    /// The single address this matches, if it is one.
    fn host(&self) -> Option<&Cidr> {
        match self {
            Address::Prefix(cidr) if cidr.is_host() => Some(cidr),
            _ => None,
        }
    }
}

/// `-s`/`-d` take a CIDR, a bare address (as iptables prints a `/32`), or an
/// address and a mask.
fn parse_address(text: &str) -> Option<Address> {
    if !text.contains('/') {
        parse_ip(text).map(|ip| Address::Prefix(Cidr::host(ip)))
    } else if let Some(cidr) = parse_cidr(text) {
        Some(Address::Prefix(cidr))
    } else {
        parse_masked(text).map(Address::Masked)
    }
}

/// A transport protocol a Service port can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn parse(text: &str) -> Option<Proto> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            "sctp" => Some(Proto::Sctp),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

/// The first packet of a connection.
#[derive(Debug, Clone)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: Proto,
}

/// What the rules cannot say about the node.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Addresses of the node's interfaces; loopback is always local.
    pub local_addresses: Vec<IpAddr>,
    /// Interface a packet from elsewhere arrives on (`-i` matches); `eth0` if unset.
    pub in_interface: Option<String>,
}

impl NodeView {
    fn is_local(&self, ip: &IpAddr) -> bool {
        ip.is_loopback() || self.local_addresses.contains(ip)
    }
}

/// A payload that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}: {text}")]
pub struct ParseError {
    pub line: usize,
    pub message: &'static str,
    pub text: String,
}

/// A parsed `iptables-restore` payload: table → chain → rules.
#[derive(Debug, Default, Clone)]
pub struct Ruleset {
    tables: BTreeMap<String, BTreeMap<String, Vec<Rule>>>,
}

#[derive(Debug, Clone)]
struct Rule {
    text: String,
    matches: Vec<Match>,
    target: Target,
    comment: Option<String>,
}

#[derive(Debug, Clone)]
enum Match {
    Src(Address, bool),
    Dst(Address, bool),
    Proto(Option<Proto>, bool),
    DPort(u16, bool),
    InIface(String, bool),
    OutIface(String, bool),
    DstTypeLocal(bool),
    SrcTypeLocal(bool),
    Mark {
        value: u32,
        mask: u32,
        negated: bool,
    },
    CtState(Vec<String>, bool),
    Random(f64),
    RecentCheck,
    /// A match the tracer does not model; it is assumed not to match, and said so.
    Unknown(String),
}

#[derive(Debug, Clone)]
enum Target {
    None,
    Chain(String),
    Accept,
    Drop,
    Reject,
    Return,
    Dnat(String),
    Masquerade,
    Mark { value: u32, mask: u32 },
}

impl Ruleset {
    /// Parses a payload; `*table` … `COMMIT` sections, `:CHAIN` declarations and
    /// `-A CHAIN …` rules. `-X` lines and comments are ignored.
    pub fn parse(payload: &str) -> Result<Ruleset, ParseError> {
        let mut set = Ruleset::default();
        let mut table: Option<String> = None;
        for (index, raw) in payload.lines().enumerate() {
            let line = raw.trim();
            let err = |message| ParseError {
                line: index + 1,
                message,
                text: raw.to_string(),
            };
            if line.is_empty() || line.starts_with('#') || line == "COMMIT" {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                table = Some(name.to_string());
                set.tables.entry(name.to_string()).or_default();
                continue;
            }
            let Some(current) = table.as_ref() else {
                return Err(err("a rule before any *table line"));
            };
            let chains = set
                .tables
                .get_mut(current)
                .expect("table entry made at *table");
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl
                    .split_whitespace()
                    .next()
                    .ok_or_else(|| err("empty chain declaration"))?;
                chains.entry(name.to_string()).or_default();
                continue;
            }
            let words = split_words(line).ok_or_else(|| err("unbalanced quotes"))?;
            match words.first().map(String::as_str) {
                Some("-A") | Some("-I") => {
                    let chain = words
                        .get(1)
                        .ok_or_else(|| err("rule without a chain"))?
                        .clone();
                    // `-I CHAIN [N] …`: N is 1-based and optional.
                    let position = match (words[0].as_str(), words.get(2)) {
                        ("-I", Some(n)) if n.bytes().all(|b| b.is_ascii_digit()) => {
                            Some(n.parse::<usize>().map_err(|_| err("a bad rule number"))?)
                        }
                        ("-I", _) => Some(1),
                        _ => None,
                    };
                    let first_arg = if position.is_some()
                        && words
                            .get(2)
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    {
                        3
                    } else {
                        2
                    };
                    let rule = parse_rule(line, &words[first_arg..]).map_err(err)?;
                    let rules = chains.entry(chain).or_default();
                    match position {
                        Some(n) => rules.insert(n.saturating_sub(1).min(rules.len()), rule),
                        None => rules.push(rule),
                    }
                }
                Some("-X") | Some("-F") => {}
                _ => return Err(err("not a rule, chain or table line")),
            }
        }
        Ok(set)
    }

    /// Adds jump rules from the built-in chains (restore lines such as
    /// `-A PREROUTING … -j KUBE-SERVICES`) to tables whose built-in chain the
    /// payload leaves empty: a live payload omits the jumps that already exist.
    pub fn with_builtin_jumps(
        mut self,
        table_lines: &[(&str, String)],
    ) -> Result<Ruleset, ParseError> {
        let mut missing: BTreeMap<&str, String> = BTreeMap::new();
        for (table, line) in table_lines {
            let words = split_words(line).unwrap_or_default();
            let chain = words.get(1).cloned().unwrap_or_default();
            let present = self
                .tables
                .get(*table)
                .and_then(|t| t.get(&chain))
                .is_some_and(|r| !r.is_empty());
            if !present {
                missing
                    .entry(table)
                    .or_default()
                    .push_str(&format!("{line}\n"));
            }
        }
        for (table, lines) in missing {
            let extra = Ruleset::parse(&format!("*{table}\n{lines}COMMIT\n"))?;
            for (chain, rules) in extra.tables.into_values().flatten() {
                self.tables
                    .entry(table.to_string())
                    .or_default()
                    .entry(chain)
                    .or_default()
                    .extend(rules);
            }
        }
        Ok(self)
    }

    fn chain(&self, table: &str, chain: &str) -> &[Rule] {
        self.tables
            .get(table)
            .and_then(|t| t.get(chain))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The Services (from rule comments) that use `ip` as a destination, with
    /// their ports: for "port N is not a port of ns/name" verdicts.
    fn services_at(&self, ip: &IpAddr) -> Vec<(String, Option<u16>)> {
        let mut found = Vec::new();
        for rules in self.tables.values().flat_map(|t| t.values()) {
            for rule in rules {
                let dst = rule
                    .matches
                    .iter()
                    .any(|m| matches!(m, Match::Dst(a, false) if a.host().is_some_and(|c| c.contains(ip))));
                if let (true, Some(comment)) = (dst, &rule.comment) {
                    let port = rule.matches.iter().find_map(|m| match m {
                        Match::DPort(p, false) => Some(*p),
                        _ => None,
                    });
                    let name = service_name(comment);
                    if !found.contains(&(name.clone(), port)) {
                        found.push((name, port));
                    }
                }
            }
        }
        found
    }
}

/// Splits a rule line into words, keeping double-quoted strings whole.
fn split_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return None;
    }
    if in_word {
        words.push(current);
    }
    Some(words)
}

fn parse_number(text: &str) -> Option<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

fn parse_value_mask(text: &str) -> Option<(u32, u32)> {
    match text.split_once('/') {
        Some((v, m)) => Some((parse_number(v)?, parse_number(m)?)),
        None => Some((parse_number(text)?, u32::MAX)),
    }
}

fn parse_rule(line: &str, words: &[String]) -> Result<Rule, &'static str> {
    let mut matches = Vec::new();
    let mut target = Target::None;
    let mut comment = None;
    let mut negate = false;
    let mut i = 0;
    let value = |i: usize| {
        words
            .get(i + 1)
            .map(String::as_str)
            .ok_or("an option without its value")
    };
    while i < words.len() {
        let word = words[i].as_str();
        let mut step = 2;
        match word {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-m" => {}
            "-s" | "--source" => matches.push(Match::Src(
                parse_address(value(i)?).ok_or("a bad source address")?,
                negate,
            )),
            "-d" | "--destination" => matches.push(Match::Dst(
                parse_address(value(i)?).ok_or("a bad destination address")?,
                negate,
            )),
            "-p" | "--protocol" => matches.push(Match::Proto(Proto::parse(value(i)?), negate)),
            "--dport" | "--destination-port" => matches.push(Match::DPort(
                value(i)?.parse().map_err(|_| "a bad port")?,
                negate,
            )),
            "-i" | "--in-interface" => matches.push(Match::InIface(value(i)?.to_string(), negate)),
            "-o" | "--out-interface" => {
                matches.push(Match::OutIface(value(i)?.to_string(), negate))
            }
            "--dst-type" => match value(i)? {
                "LOCAL" => matches.push(Match::DstTypeLocal(negate)),
                other => matches.push(Match::Unknown(format!("--dst-type {other}"))),
            },
            "--src-type" => match value(i)? {
                "LOCAL" => matches.push(Match::SrcTypeLocal(negate)),
                other => matches.push(Match::Unknown(format!("--src-type {other}"))),
            },
            "--mark" => {
                let (value, mask) = parse_value_mask(value(i)?).ok_or("a bad mark")?;
                matches.push(Match::Mark {
                    value,
                    mask,
                    negated: negate,
                });
            }
            "--ctstate" => {
                let states = value(i)?.split(',').map(str::to_string).collect();
                matches.push(Match::CtState(states, negate));
            }
            "--probability" => matches.push(Match::Random(
                value(i)?.parse().map_err(|_| "a bad probability")?,
            )),
            // Accounting (`-m nfacct`) counts and always matches.
            "--mode" | "--name" | "--seconds" | "--mask" | "--nfacct-name" => {}
            "--rcheck" | "--update" => {
                matches.push(Match::RecentCheck);
                step = 1;
            }
            "--set" | "--reap" | "--rsource" | "--random-fully" => step = 1,
            "--comment" => comment = Some(value(i)?.to_string()),
            "-j" | "--jump" | "-g" | "--goto" => {
                target = match value(i)? {
                    "ACCEPT" => Target::Accept,
                    "DROP" => Target::Drop,
                    "REJECT" => Target::Reject,
                    "RETURN" => Target::Return,
                    "MASQUERADE" => Target::Masquerade,
                    "DNAT" => Target::Dnat(String::new()),
                    "MARK" => Target::Mark { value: 0, mask: 0 },
                    chain => Target::Chain(chain.to_string()),
                }
            }
            "--to-destination" => {
                if let Target::Dnat(to) = &mut target {
                    *to = value(i)?.to_string();
                }
            }
            "--or-mark" => {
                let v = parse_number(value(i)?).ok_or("a bad mark")?;
                target = Target::Mark { value: v, mask: v };
            }
            "--set-xmark" | "--set-mark" => {
                let (v, m) = parse_value_mask(value(i)?).ok_or("a bad mark")?;
                target = Target::Mark { value: v, mask: m };
            }
            "--xor-mark" => {
                let v = parse_number(value(i)?).ok_or("a bad mark")?;
                target = Target::Mark { value: v, mask: 0 };
            }
            "--reject-with" => {}
            other if other.starts_with('-') => {
                // An option with a value we do not model (e.g. --sport): keep the
                // rule honest by never letting it match silently.
                matches.push(Match::Unknown(format!(
                    "{other} {}",
                    words.get(i + 1).map(String::as_str).unwrap_or("")
                )));
            }
            _ => step = 1,
        }
        // `-m name` consumes the module name; values were consumed above.
        i += step;
        negate = false;
    }
    Ok(Rule {
        text: line.to_string(),
        matches,
        target,
        comment,
    })
}

/// The packet's state as it moves through the hooks.
#[derive(Debug, Clone)]
struct State {
    dst: IpAddr,
    dport: u16,
    mark: u32,
    dnat: Option<String>,
    masquerade: bool,
    steps: Vec<Step>,
    unknown: Vec<String>,
}

/// One rule the packet matched.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub table: String,
    pub chain: String,
    pub rule: String,
    /// Probability of taking this rule, for `statistic` rules.
    pub probability: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    FellOff,
    Return,
    Accept,
    Drop,
    Reject,
    Dnat,
    Masquerade,
}

#[derive(Debug, Clone)]
struct Branch {
    probability: f64,
    state: State,
    end: End,
    deciding_comment: Option<String>,
}

/// The outcome of a trace.
#[derive(Debug, Clone)]
pub struct Trace {
    pub packet: Packet,
    pub origin: Origin,
    /// Rules matched on the most likely path.
    pub steps: Vec<Step>,
    pub outcomes: Vec<Outcome>,
    pub verdict: Verdict,
    /// Matches the tracer could not evaluate (assumed not to match).
    pub unmodelled: Vec<String>,
}

/// Where the packet starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Sent by a process on the node (its source is a local address).
    Node,
    /// Arriving from a pod or another host on the given interface.
    Arriving(String),
}

/// One possible fate, with its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub probability: f64,
    pub kind: VerdictKind,
    /// `ip:port` after DNAT, when DNATed.
    pub endpoint: Option<String>,
    pub masquerade: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictKind {
    /// DNATed to an endpoint.
    Dnat,
    /// Rejected at once (ICMP port unreachable / TCP reset).
    Reject,
    /// Dropped silently.
    Drop,
    /// No Service rule touched it: delivered to the node or routed onwards.
    Untouched,
}

/// The verdict in words, with its kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub kind: VerdictKind,
    pub text: String,
}

/// Traces `packet` through `rules` on a node described by `node`.
pub fn trace(rules: &Ruleset, packet: &Packet, node: &NodeView) -> Trace {
    let origin = if node.is_local(&packet.src) {
        Origin::Node
    } else {
        Origin::Arriving(
            node.in_interface
                .clone()
                .unwrap_or_else(|| "eth0".to_string()),
        )
    };
    let start = State {
        dst: packet.dst,
        dport: packet.dport,
        mark: 0,
        dnat: None,
        masquerade: false,
        steps: Vec::new(),
        unknown: Vec::new(),
    };
    let walker = Walker {
        rules,
        packet,
        node,
        origin: &origin,
    };
    let (nat_hook, filter_hooks): (&str, &[&str]) = match origin {
        Origin::Node => ("OUTPUT", &["OUTPUT"]),
        Origin::Arriving(_) => ("PREROUTING", &[]),
    };
    let mut finished = Vec::new();
    for branch in walker.hook("nat", nat_hook, start, 1.0) {
        if branch.end != End::Dnat && terminal(branch.end) {
            finished.push(branch);
            continue;
        }
        // Routing decision: after DNAT, a local destination is delivered to the
        // node (filter INPUT), anything else is forwarded (filter FORWARD). The
        // node's own packet for a local destination passes OUTPUT and then, over
        // loopback, INPUT too (where e.g. a NodePort without endpoints is
        // rejected: KUBE-EXTERNAL-SERVICES hangs off INPUT and FORWARD only).
        let filter: Vec<&str> = match origin {
            Origin::Node if node.is_local(&branch.state.dst) => {
                filter_hooks.iter().copied().chain(["INPUT"]).collect()
            }
            Origin::Node => filter_hooks.to_vec(),
            Origin::Arriving(_) if node.is_local(&branch.state.dst) => vec!["INPUT"],
            Origin::Arriving(_) => vec!["FORWARD"],
        };
        let mut after_filter = vec![branch];
        for hook in filter {
            after_filter = after_filter
                .into_iter()
                .flat_map(|b| walker.continue_hook("filter", hook, b))
                .collect();
        }
        for branch in after_filter {
            if matches!(branch.end, End::Drop | End::Reject) {
                finished.push(branch);
                continue;
            }
            let delivered_locally = node.is_local(&branch.state.dst) && origin != Origin::Node;
            if delivered_locally {
                finished.push(branch);
            } else {
                finished.extend(walker.continue_hook("nat", "POSTROUTING", branch));
            }
        }
    }
    summarize(rules, packet, node, origin, finished)
}

fn terminal(end: End) -> bool {
    !matches!(end, End::FellOff | End::Return)
}

struct Walker<'a> {
    rules: &'a Ruleset,
    packet: &'a Packet,
    node: &'a NodeView,
    origin: &'a Origin,
}

impl Walker<'_> {
    /// Runs a built-in chain; a branch that ends in a non-final verdict of that
    /// hook (ACCEPT, DNAT, MASQUERADE, or falling off) carries on to the next hook.
    fn hook(&self, table: &str, chain: &str, state: State, probability: f64) -> Vec<Branch> {
        self.chain(table, chain, state, probability, 0)
    }

    fn continue_hook(&self, table: &str, chain: &str, branch: Branch) -> Vec<Branch> {
        let Branch {
            probability,
            state,
            end,
            deciding_comment,
        } = branch;
        self.hook(table, chain, state, probability)
            .into_iter()
            .map(|mut b| {
                // Keep the DNAT decision as the outcome when the later hook only accepted.
                if matches!(b.end, End::FellOff | End::Return | End::Accept) {
                    b.end = if end == End::Dnat { End::Dnat } else { b.end };
                    if b.deciding_comment.is_none() {
                        b.deciding_comment = deciding_comment.clone();
                    }
                }
                b
            })
            .collect()
    }

    fn chain(
        &self,
        table: &str,
        chain: &str,
        state: State,
        probability: f64,
        depth: usize,
    ) -> Vec<Branch> {
        let rules = self.rules.chain(table, chain);
        let mut out = Vec::new();
        let mut work = vec![(0usize, state, probability, None::<String>)];
        while let Some((mut index, mut st, mut p, mut deciding)) = work.pop() {
            loop {
                let Some(rule) = rules.get(index) else {
                    out.push(Branch {
                        probability: p,
                        state: st,
                        end: End::FellOff,
                        deciding_comment: deciding,
                    });
                    break;
                };
                index += 1;
                let Some(random) = self.matches(rule, &mut st) else {
                    continue;
                };
                let mut taken = None;
                if let Some(q) = random {
                    // Fork: the packet skips this rule with probability 1 - q.
                    if q < 1.0 {
                        work.push((index, st.clone(), p * (1.0 - q), deciding.clone()));
                    }
                    p *= q;
                    taken = Some(p);
                }
                st.steps.push(Step {
                    table: table.to_string(),
                    chain: chain.to_string(),
                    rule: rule.text.clone(),
                    probability: taken,
                });
                if rule.comment.is_some() {
                    deciding = rule.comment.clone();
                }
                let end = match &rule.target {
                    Target::None => continue,
                    Target::Mark { value, mask } => {
                        st.mark = (st.mark & !mask) ^ value;
                        continue;
                    }
                    Target::Chain(next) => {
                        if depth > 32 {
                            st.unknown.push(format!("jump depth exceeded at {chain}"));
                            out.push(Branch {
                                probability: p,
                                state: st,
                                end: End::Drop,
                                deciding_comment: deciding,
                            });
                            break;
                        }
                        for b in self.chain(table, next, st.clone(), p, depth + 1) {
                            if terminal(b.end) {
                                out.push(b);
                            } else {
                                let comment = b.deciding_comment.or(deciding.clone());
                                work.push((index, b.state, b.probability, comment));
                            }
                        }
                        break;
                    }
                    Target::Return => End::Return,
                    Target::Accept => End::Accept,
                    Target::Drop => End::Drop,
                    Target::Reject => End::Reject,
                    Target::Masquerade => {
                        st.masquerade = true;
                        End::Masquerade
                    }
                    Target::Dnat(to) => {
                        let (ip, port) = split_host_port(to).unwrap_or((st.dst, st.dport));
                        st.dst = ip;
                        st.dport = port;
                        st.dnat = Some(to.clone());
                        End::Dnat
                    }
                };
                out.push(Branch {
                    probability: p,
                    state: st,
                    end,
                    deciding_comment: deciding,
                });
                break;
            }
        }
        out
    }

    /// `None`: the rule does not match. `Some(None)`: it matches. `Some(Some(q))`:
    /// it matches with probability `q` (a `statistic` rule).
    fn matches(&self, rule: &Rule, st: &mut State) -> Option<Option<f64>> {
        let mut random = None;
        for m in &rule.matches {
            let ok = match m {
                Match::Src(c, neg) => c.contains(&self.packet.src) != *neg,
                Match::Dst(c, neg) => c.contains(&st.dst) != *neg,
                Match::Proto(p, neg) => (*p == Some(self.packet.proto)) != *neg,
                Match::DPort(port, neg) => (*port == st.dport) != *neg,
                Match::InIface(pattern, neg) => match self.origin {
                    Origin::Arriving(iface) => interface_matches(pattern, iface) != *neg,
                    // Locally generated packets have no input interface.
                    Origin::Node => *neg,
                },
                Match::OutIface(pattern, neg) => {
                    st.unknown
                        .push(format!("-o {pattern} (output interface not modelled)"));
                    *neg
                }
                Match::DstTypeLocal(neg) => self.node.is_local(&st.dst) != *neg,
                Match::SrcTypeLocal(neg) => self.node.is_local(&self.packet.src) != *neg,
                Match::Mark {
                    value,
                    mask,
                    negated,
                } => ((st.mark & mask) == (value & mask)) != *negated,
                Match::CtState(states, neg) => {
                    let has = |s: &str| states.iter().any(|x| x == s);
                    let state_matches = has("NEW") || (has("DNAT") && st.dnat.is_some());
                    state_matches != *neg
                }
                Match::Random(q) => {
                    random = Some(*q);
                    true
                }
                Match::RecentCheck => false,
                Match::Unknown(what) => {
                    if !st.unknown.contains(what) {
                        st.unknown.push(what.clone());
                    }
                    false
                }
            };
            if !ok {
                return None;
            }
        }
        Some(random)
    }
}

fn interface_matches(pattern: &str, iface: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => iface.starts_with(prefix),
        None => pattern == iface,
    }
}

fn split_host_port(text: &str) -> Option<(IpAddr, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((parse_ip(host)?, port.parse().ok()?))
}

/// The Service a kube-proxy comment is about: `ns/name:port …` → `ns/name:port`.
fn service_name(comment: &str) -> String {
    comment
        .split_whitespace()
        .next()
        .unwrap_or(comment)
        .to_string()
}

fn summarize(
    rules: &Ruleset,
    packet: &Packet,
    node: &NodeView,
    origin: Origin,
    mut branches: Vec<Branch>,
) -> Trace {
    branches.sort_by(|a, b| b.probability.total_cmp(&a.probability));
    let mut outcomes: Vec<Outcome> = Vec::new();
    for b in &branches {
        let kind = match b.end {
            End::Dnat => VerdictKind::Dnat,
            End::Reject => VerdictKind::Reject,
            End::Drop => VerdictKind::Drop,
            _ if b.state.dnat.is_some() => VerdictKind::Dnat,
            _ => VerdictKind::Untouched,
        };
        let outcome = Outcome {
            probability: b.probability,
            kind,
            endpoint: b.state.dnat.clone(),
            masquerade: b.state.masquerade,
        };
        // Forks that rejoin (e.g. a masquerade decided per path) add up.
        match outcomes.iter_mut().find(|o| {
            o.kind == outcome.kind
                && o.endpoint == outcome.endpoint
                && o.masquerade == outcome.masquerade
        }) {
            Some(o) => o.probability += outcome.probability,
            None => outcomes.push(outcome),
        }
    }
    outcomes.sort_by(|a, b| {
        b.probability
            .total_cmp(&a.probability)
            .then(a.endpoint.cmp(&b.endpoint))
    });
    let best = branches.first();
    let steps = best.map(|b| b.state.steps.clone()).unwrap_or_default();
    let mut unmodelled: Vec<String> = branches
        .iter()
        .flat_map(|b| b.state.unknown.clone())
        .collect();
    unmodelled.sort();
    unmodelled.dedup();
    let verdict = verdict(rules, packet, node, &outcomes, best);
    Trace {
        packet: packet.clone(),
        origin,
        steps,
        outcomes,
        verdict,
        unmodelled,
    }
}

fn verdict(
    rules: &Ruleset,
    packet: &Packet,
    node: &NodeView,
    outcomes: &[Outcome],
    best: Option<&Branch>,
) -> Verdict {
    let comment = best
        .and_then(|b| b.deciding_comment.clone())
        .unwrap_or_default();
    let kind = outcomes
        .first()
        .map(|o| o.kind)
        .unwrap_or(VerdictKind::Untouched);
    let text = match kind {
        VerdictKind::Dnat => {
            let service = dnat_service(best).unwrap_or_else(|| service_name(&comment));
            let endpoints: Vec<&Outcome> = outcomes
                .iter()
                .filter(|o| o.kind == VerdictKind::Dnat)
                .collect();
            if endpoints.len() == 1 {
                format!(
                    "DNAT: {service} → {}",
                    endpoints[0].endpoint.as_deref().unwrap_or("?")
                )
            } else {
                format!(
                    "DNAT: {service} → one of {} endpoints, chosen at random",
                    endpoints.len()
                )
            }
        }
        VerdictKind::Reject => match comment.strip_suffix(" has no endpoints") {
            Some(service) => format!("REJECT: {service} has no endpoints"),
            None => format!("REJECT: {comment}"),
        },
        VerdictKind::Drop => drop_reason(packet, &comment),
        VerdictKind::Untouched => untouched_reason(rules, packet, node),
    };
    Verdict { kind, text }
}

/// The Service named by the dispatch rule that led to the DNAT: the rule in
/// KUBE-SERVICES (ClusterIP, external and load-balancer IPs) or KUBE-NODEPORTS
/// whose comment names a Service (`ns/name[:port] …`); the jump from
/// KUBE-SERVICES to KUBE-NODEPORTS ("kubernetes service nodeports") names none.
fn dnat_service(best: Option<&Branch>) -> Option<String> {
    best?
        .state
        .steps
        .iter()
        .filter(|s| {
            s.chain == KUBE_SERVICES || s.chain == KUBE_NODEPORTS || is_dispatch_bucket(&s.chain)
        })
        .filter_map(|s| {
            let words = split_words(&s.rule)?;
            let at = words.iter().position(|w| w == "--comment")?;
            words.get(at + 1).map(|c| service_name(c))
        })
        .find(|name| name.contains('/'))
}

fn drop_reason(packet: &Packet, comment: &str) -> String {
    if comment.contains("traffic not accepted by") || comment.contains("will be dropped by") {
        let service = service_name(comment.trim_start_matches("other traffic to "));
        format!(
            "DROP: {} is outside loadBalancerSourceRanges of {service}",
            packet.src
        )
    } else if let Some(service) = comment.strip_suffix(" has no local endpoints") {
        format!("DROP: {service} has no local endpoints (traffic policy Local)")
    } else if comment.contains("localnet") {
        format!(
            "DROP: {} is a loopback destination reached from outside the node (martian guard)",
            packet.dst
        )
    } else if comment.is_empty() {
        "DROP: by a rule without a comment".to_string()
    } else {
        format!("DROP: {comment}")
    }
}

fn untouched_reason(rules: &Ruleset, packet: &Packet, node: &NodeView) -> String {
    let services = rules.services_at(&packet.dst);
    let same_port = services.iter().any(|(_, port)| *port == Some(packet.dport));
    match services.first() {
        Some((service, _)) if !same_port => {
            let name = service.rsplit_once(':').map(|(n, _)| n).unwrap_or(service);
            format!("no rule: port {} is not a port of {name}", packet.dport)
        }
        Some((service, _)) => format!(
            "no rule matched {} {}:{} although {service} uses that address (check protocol and source)",
            packet.proto.as_str(),
            packet.dst,
            packet.dport
        ),
        None if node.is_local(&packet.dst) => format!(
            "no rule: {} is an address of this node with no Service on port {}; delivered to the node itself",
            packet.dst, packet.dport
        ),
        None => format!(
            "no rule: {} is not a Service address on this node; routed normally",
            packet.dst
        ),
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.packet;
        let origin = match &self.origin {
            Origin::Node => "sent by the node itself".to_string(),
            Origin::Arriving(iface) => format!("arriving on {iface}"),
        };
        writeln!(
            f,
            "packet: {} {} -> {}:{} ({origin})",
            p.proto.as_str(),
            p.src,
            p.dst,
            p.dport
        )?;
        writeln!(f, "rules matched:")?;
        for step in &self.steps {
            let mut line = format!("  {}/{}", step.table, step.chain);
            if let Some(prob) = step.probability {
                let _ = write!(line, " [p={prob:.4}]");
            }
            writeln!(f, "{line:<40} {}", step.rule)?;
        }
        if self.steps.is_empty() {
            writeln!(f, "  (none)")?;
        }
        let dnat: Vec<&Outcome> = self
            .outcomes
            .iter()
            .filter(|o| o.endpoint.is_some())
            .collect();
        if !dnat.is_empty() {
            writeln!(f, "candidate endpoints:")?;
            for o in dnat {
                let masq = if o.masquerade { "yes" } else { "no" };
                writeln!(
                    f,
                    "  {:<24} {:>6.2} %   masquerade: {masq}",
                    o.endpoint.as_deref().unwrap_or(""),
                    o.probability * 100.0
                )?;
            }
        } else if let Some(o) = self.outcomes.first() {
            writeln!(f, "masquerade: {}", if o.masquerade { "yes" } else { "no" })?;
        }
        for what in &self.unmodelled {
            writeln!(f, "note: not modelled, assumed not to match: {what}")?;
        }
        write!(f, "verdict: {}", self.verdict.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn node() -> NodeView {
        NodeView {
            local_addresses: vec![ip("10.0.0.11")],
            in_interface: Some("cbr0".into()),
        }
    }

    fn packet(src: &str, dst: &str, dport: u16) -> Packet {
        Packet {
            src: ip(src),
            dst: ip(dst),
            dport,
            proto: Proto::Tcp,
        }
    }

    /// A hand-written ruleset in kube-proxy's layout: one Service with two
    /// endpoints, one without endpoints, one with source ranges.
    const RULES: &str = r#"*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -m comment --comment "default/empty:http has no endpoints" -m tcp -p tcp -d 10.96.0.20 --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-PROXY-FIREWALL -m comment --comment "default/lb:http traffic not accepted by KUBE-FW-LB" -m tcp -p tcp -d 203.0.113.10 --dport 80 -j DROP
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-WEB - [0:0]
:KUBE-FW-LB - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-SERVICES -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 -j KUBE-SVC-WEB
-A KUBE-SERVICES -m comment --comment "default/lb:http loadbalancer IP" -m tcp -p tcp -d 203.0.113.10 --dport 80 -j KUBE-FW-LB
-A KUBE-SVC-WEB -m comment --comment "default/web:http cluster IP" -m tcp -p tcp -d 10.96.0.10 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SVC-WEB -m comment --comment "default/web:http -> 10.244.1.5:8080" -m statistic --mode random --probability 0.5000000000 -j DNAT --to-destination 10.244.1.5:8080
-A KUBE-SVC-WEB -m comment --comment "default/web:http -> 10.244.2.5:8080" -j DNAT --to-destination 10.244.2.5:8080
-A KUBE-FW-LB -m comment --comment "default/lb:http loadbalancer IP" -s 198.51.100.0/24 -j KUBE-SVC-WEB
-A KUBE-FW-LB -m comment --comment "other traffic to default/lb:http will be dropped by KUBE-PROXY-FIREWALL"
COMMIT
"#;

    #[test]
    fn cluster_ip_from_a_pod_lists_both_endpoints_unmasqueraded() {
        let rules = Ruleset::parse(RULES).unwrap();
        let t = trace(&rules, &packet("10.244.1.9", "10.96.0.10", 80), &node());
        assert_eq!(t.verdict.kind, VerdictKind::Dnat);
        assert_eq!(
            t.verdict.text,
            "DNAT: default/web:http → one of 2 endpoints, chosen at random"
        );
        let endpoints: Vec<(Option<&str>, String, bool)> = t
            .outcomes
            .iter()
            .map(|o| {
                (
                    o.endpoint.as_deref(),
                    format!("{:.2}", o.probability),
                    o.masquerade,
                )
            })
            .collect();
        assert_eq!(
            endpoints,
            [
                (Some("10.244.1.5:8080"), "0.50".to_string(), false),
                (Some("10.244.2.5:8080"), "0.50".to_string(), false)
            ]
        );
    }

    #[test]
    fn cluster_ip_from_outside_the_cluster_cidr_is_masqueraded() {
        let rules = Ruleset::parse(RULES).unwrap();
        let t = trace(&rules, &packet("192.168.5.5", "10.96.0.10", 80), &node());
        assert!(
            t.outcomes
                .iter()
                .all(|o| o.masquerade && o.kind == VerdictKind::Dnat),
            "{t}"
        );
    }

    #[test]
    fn the_node_itself_reaches_the_cluster_ip_through_output() {
        let rules = Ruleset::parse(RULES).unwrap();
        let t = trace(&rules, &packet("10.0.0.11", "10.96.0.10", 80), &node());
        assert_eq!(t.origin, Origin::Node);
        assert_eq!(t.verdict.kind, VerdictKind::Dnat);
        assert_eq!(t.steps.first().map(|s| s.chain.as_str()), Some("OUTPUT"));
    }

    #[test]
    fn no_endpoints_is_a_reject_naming_the_service() {
        let rules = Ruleset::parse(RULES).unwrap();
        let t = trace(&rules, &packet("10.244.1.9", "10.96.0.20", 80), &node());
        assert_eq!(
            t.verdict,
            Verdict {
                kind: VerdictKind::Reject,
                text: "REJECT: default/empty:http has no endpoints".into()
            }
        );
    }

    #[test]
    fn a_source_outside_the_ranges_is_dropped_with_the_reason() {
        let rules = Ruleset::parse(RULES).unwrap();
        let inside = trace(&rules, &packet("198.51.100.7", "203.0.113.10", 80), &node());
        assert_eq!(inside.verdict.kind, VerdictKind::Dnat, "{inside}");
        let outside = trace(
            &rules,
            &packet("203.0.113.130", "203.0.113.10", 80),
            &node(),
        );
        assert_eq!(
            outside.verdict,
            Verdict {
                kind: VerdictKind::Drop,
                text: "DROP: 203.0.113.130 is outside loadBalancerSourceRanges of default/lb:http"
                    .into()
            }
        );
    }

    #[test]
    fn a_wrong_port_names_the_service_it_is_not_a_port_of() {
        let rules = Ruleset::parse(RULES).unwrap();
        let t = trace(&rules, &packet("10.244.1.9", "10.96.0.10", 8443), &node());
        assert_eq!(t.verdict.kind, VerdictKind::Untouched);
        assert_eq!(
            t.verdict.text,
            "no rule: port 8443 is not a port of default/web"
        );
    }

    #[test]
    fn an_address_of_no_service_is_routed_normally() {
        let rules = Ruleset::parse(RULES).unwrap();
        let t = trace(&rules, &packet("10.244.1.9", "8.8.8.8", 53), &node());
        assert_eq!(
            t.verdict.text,
            "no rule: 8.8.8.8 is not a Service address on this node; routed normally"
        );
    }

    #[test]
    fn missing_builtin_jumps_are_added_from_the_given_lines() {
        let without_jumps: String = RULES
            .lines()
            .filter(|l| !l.starts_with("-A PREROUTING"))
            .map(|l| format!("{l}\n"))
            .collect();
        let rules = Ruleset::parse(&without_jumps).unwrap();
        assert_eq!(
            trace(&rules, &packet("10.244.1.9", "10.96.0.10", 80), &node())
                .verdict
                .kind,
            VerdictKind::Untouched
        );
        let jumps = [(
            "nat",
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
                .to_string(),
        )];
        let rules = rules.with_builtin_jumps(&jumps).unwrap();
        assert_eq!(
            trace(&rules, &packet("10.244.1.9", "10.96.0.10", 80), &node())
                .verdict
                .kind,
            VerdictKind::Dnat
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let err = Ruleset::parse("*nat\n-A KUBE-SERVICES -d 10.96.0.300 -j ACCEPT\nCOMMIT\n")
            .unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(err.message, "a bad destination address");
        let err = Ruleset::parse("-A X -j ACCEPT\n").unwrap_err();
        assert_eq!(err.message, "a rule before any *table line");
    }

    /// A payload exactly as `render` prints it (built-in jumps as `-I CHAIN 1`).
    #[test]
    fn a_rendered_payload_with_inserted_jumps_is_traced() {
        let payload = include_str!("../tests/golden/clusterip-3-endpoints.txt");
        let rules = Ruleset::parse(payload).unwrap();
        let traced = trace(
            &rules,
            &packet("10.244.1.9", "10.96.0.10", 80),
            &NodeView {
                local_addresses: vec![ip("192.168.0.10")],
                in_interface: Some("cbr0".into()),
            },
        );
        assert_eq!(traced.verdict.kind, VerdictKind::Dnat, "{traced}");
        let mut endpoints: Vec<(String, u32)> = traced
            .outcomes
            .iter()
            .map(|o| {
                (
                    o.endpoint.clone().unwrap_or_default(),
                    (o.probability * 1000.0).round() as u32,
                )
            })
            .collect();
        endpoints.sort();
        assert_eq!(
            endpoints,
            [
                ("10.244.1.5:8080".to_string(), 333),
                ("10.244.2.5:8080".to_string(), 333),
                ("10.244.3.5:8080".to_string(), 333)
            ]
        );
        assert!(traced.outcomes.iter().all(|o| !o.masquerade), "{traced}");
    }

    /// Found side by side with real packets: a NodePort's DNAT verdict named
    /// "kubernetes" (the comment of the jump to KUBE-NODEPORTS), not the Service.
    #[test]
    fn a_node_port_verdict_names_the_service_not_the_nodeports_jump() {
        let payload = include_str!("../tests/golden/ipv6-nodeport.txt");
        let rules = Ruleset::parse(payload).unwrap();
        let traced = trace(
            &rules,
            &Packet {
                src: ip("2001:db8::99"),
                dst: ip("fd00:10::1"),
                dport: 30082,
                proto: Proto::Tcp,
            },
            &NodeView {
                local_addresses: vec![ip("fd00:10::1")],
                in_interface: Some("eth0".into()),
            },
        );
        assert_eq!(traced.verdict.kind, VerdictKind::Dnat, "{traced}");
        assert_eq!(
            traced.verdict.text,
            "DNAT: default/web6 → one of 2 endpoints, chosen at random"
        );
        assert!(traced.outcomes.iter().all(|o| o.masquerade), "{traced}");
    }

    /// A rule that only counts (`-m nfacct`, no target: the localhost NodePort
    /// counter) is passed through.
    #[test]
    fn a_counting_rule_matches_and_leads_on() {
        let chain = ":KUBE-EXT-BL4VTDSJDQ5TV32O - [0:0]";
        let counting = "-A KUBE-EXT-BL4VTDSJDQ5TV32O -m comment --comment \"count default/api NodePort packets to 127.0.0.0/8\" -m tcp -p tcp -d 127.0.0.0/8 --dport 30443 -m nfacct --nfacct-name localhost_nps_accepted_pkts";
        let golden = include_str!("../tests/golden/nodeport-etp-local.txt");
        assert!(golden.contains(chain));
        let payload = golden.replace(chain, &format!("{chain}\n{counting}"));
        let rules = Ruleset::parse(&payload).unwrap();
        let t = trace(
            &rules,
            &packet("127.0.0.1", "127.0.0.1", 30443),
            &NodeView {
                local_addresses: vec![ip("127.0.0.1"), ip("192.168.0.10")],
                in_interface: None,
            },
        );
        assert_eq!(t.verdict.kind, VerdictKind::Dnat, "{t}");
        assert!(t.to_string().contains("localhost_nps_accepted_pkts"), "{t}");
    }

    /// Found side by side with real packets: a packet for one of the node's own
    /// addresses that no rule touches is delivered to the node (and refused
    /// there when nothing listens), not "routed normally".
    #[test]
    fn an_untouched_packet_for_a_node_address_is_delivered_to_the_node() {
        let rules = Ruleset::parse(RULES).unwrap();
        let t = trace(&rules, &packet("192.168.5.5", "10.0.0.11", 30080), &node());
        assert_eq!(t.verdict.kind, VerdictKind::Untouched);
        assert_eq!(
            t.verdict.text,
            "no rule: 10.0.0.11 is an address of this node with no Service on port 30080; delivered to the node itself"
        );
    }

    /// Found side by side with real packets: the node's own connection to one
    /// of its NodePorts without endpoints is refused by the REJECT in
    /// KUBE-EXTERNAL-SERVICES, which only INPUT reaches; trace walked OUTPUT
    /// alone and called the packet untouched.
    #[test]
    fn the_nodes_own_packet_to_a_local_node_port_also_passes_input() {
        let payload = include_str!("../tests/golden/no-endpoints.txt");
        let rules = Ruleset::parse(payload).unwrap();
        let t = trace(
            &rules,
            &packet("192.168.0.10", "192.168.0.10", 30081),
            &NodeView {
                local_addresses: vec![ip("192.168.0.10")],
                in_interface: None,
            },
        );
        assert_eq!(t.origin, Origin::Node);
        assert_eq!(
            t.verdict,
            Verdict {
                kind: VerdictKind::Reject,
                text: "REJECT: default/empty:http has no endpoints".into()
            },
            "{t}"
        );
    }
}

//! Structural check of a rendered payload: every jump lands on a declared
//! chain that does something, and every declared chain is reachable.
//!
//! This catches the renderer bugs that iptables itself accepts silently (a
//! jump to an empty chain is a no-op; an unreferenced chain is dead weight) or
//! rejects only at apply time on a node (a jump to an undeclared chain).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::{
    KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_NODEPORTS,
    KUBE_POSTROUTING, KUBE_PROXY_CANARY, KUBE_PROXY_FIREWALL, KUBE_SERVICES, is_dispatch_bucket,
};

const BUILTIN_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
const BUILTIN_TARGETS: [&str; 12] = [
    "ACCEPT",
    "DROP",
    "REJECT",
    "RETURN",
    "DNAT",
    "SNAT",
    "MASQUERADE",
    "MARK",
    "CONNMARK",
    "LOG",
    "NOTRACK",
    "CT",
];
/// Entry chains that are linked from built-in chains and may legitimately be
/// empty (a cluster without NodePorts has an empty KUBE-NODEPORTS).
const TOP_LEVEL_CHAINS: [&str; 9] = [
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_NODEPORTS,
    KUBE_FORWARD,
    KUBE_PROXY_FIREWALL,
    KUBE_POSTROUTING,
    KUBE_MARK_MASQ,
    KUBE_FIREWALL,
    KUBE_PROXY_CANARY,
];

/// One thing wrong with a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub table: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "table {}: {}", self.table, self.message)
    }
}

/// Splits a restore line into words; double quotes group words.
pub fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut current));
                    has_word = false;
                }
            }
            c => {
                current.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(current);
    }
    words
}

#[derive(Default)]
struct TableState {
    declared: BTreeSet<String>,
    rules_per_chain: BTreeMap<String, usize>,
    /// target → chains jumping to it.
    jumps: BTreeMap<String, BTreeSet<String>>,
    deleted: BTreeSet<String>,
}

/// Checks `payload`; an empty result means it is consistent.
pub fn check(payload: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut tables: Vec<(String, TableState)> = Vec::new();
    let mut current: Option<(String, TableState)> = None;
    for (number, line) in payload.lines().enumerate() {
        let number = number + 1;
        let problem = |table: &str, message: String| Problem {
            table: table.to_string(),
            message: format!("line {number}: {message}"),
        };
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if let Some((table, _)) = &current {
                problems.push(problem(table, "table not committed".into()));
            }
            current = Some((name.to_string(), TableState::default()));
            continue;
        }
        let Some((table, state)) = current.as_mut() else {
            problems.push(problem("-", format!("line outside a table: {line}")));
            continue;
        };
        if line == "COMMIT" {
            tables.push(current.take().expect("current table"));
            continue;
        }
        if let Some(rest) = line.strip_prefix(':') {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            if !state.declared.insert(chain.to_string()) {
                problems.push(problem(table, format!("chain {chain} declared twice")));
            }
            continue;
        }
        let words = split_words(line);
        match words.first().map(String::as_str) {
            Some("-X") => {
                if let Some(chain) = words.get(1) {
                    state.deleted.insert(chain.clone());
                }
            }
            Some("-A") | Some("-I") => {
                let Some(chain) = words.get(1) else {
                    problems.push(problem(table, format!("rule without chain: {line}")));
                    continue;
                };
                let builtin = BUILTIN_CHAINS.contains(&chain.as_str());
                if !builtin && !state.declared.contains(chain) {
                    problems.push(problem(table, format!("rule in undeclared chain {chain}")));
                }
                *state.rules_per_chain.entry(chain.clone()).or_default() += 1;
                let target = words
                    .iter()
                    .position(|w| w == "-j" || w == "-g")
                    .and_then(|i| words.get(i + 1));
                if let Some(target) = target
                    && !BUILTIN_TARGETS.contains(&target.as_str())
                {
                    state
                        .jumps
                        .entry(target.clone())
                        .or_default()
                        .insert(chain.clone());
                }
            }
            _ => problems.push(problem(table, format!("unrecognized line: {line}"))),
        }
    }
    if let Some((table, _)) = current {
        problems.push(Problem {
            table,
            message: "table not committed".into(),
        });
    }

    for (table, state) in &tables {
        let problem = |message: String| Problem {
            table: table.clone(),
            message,
        };
        for (target, sources) in &state.jumps {
            let from = sources.iter().cloned().collect::<Vec<_>>().join(", ");
            if !state.declared.contains(target) {
                problems.push(problem(format!(
                    "{from} jumps to undeclared chain {target}"
                )));
            } else if state.deleted.contains(target) {
                problems.push(problem(format!("{from} jumps to deleted chain {target}")));
            } else if !TOP_LEVEL_CHAINS.contains(&target.as_str())
                // A dispatch bucket is empty when no Service address falls in it.
                && !is_dispatch_bucket(target)
                && state.rules_per_chain.get(target).copied().unwrap_or(0) == 0
            {
                problems.push(problem(format!("{from} jumps to empty chain {target}")));
            }
        }
        for chain in &state.declared {
            let used = state.jumps.contains_key(chain);
            // KUBE-MARK-MASQ is part of kube-proxy's fixed layout even when no
            // Service needs it yet; the canary is unreferenced by design.
            let exempt = chain == KUBE_PROXY_CANARY
                || chain == KUBE_MARK_MASQ
                || state.deleted.contains(chain);
            if !used && !exempt {
                problems.push(problem(format!(
                    "chain {chain} is declared but nothing jumps to it"
                )));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_respect_quotes() {
        assert_eq!(
            split_words(r#"-A X -m comment --comment "a b:c cluster IP" -j Y"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a b:c cluster IP",
                "-j",
                "Y"
            ]
        );
        assert_eq!(split_words(r#"--comment """#), ["--comment", ""]);
    }

    #[test]
    fn consistent_payload_passes() {
        let payload = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-A - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-A\n-A KUBE-SVC-A -j DNAT --to-destination 1.2.3.4:80\n-I PREROUTING 1 -j KUBE-SERVICES\nCOMMIT\n";
        assert_eq!(check(payload), []);
    }

    #[test]
    fn each_kind_of_inconsistency_is_reported() {
        let payload = "\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-EMPTY - [0:0]
:KUBE-SVC-UNUSED - [0:0]
:KUBE-SVC-GONE - [0:0]
-A KUBE-SERVICES -j KUBE-SVC-EMPTY
-A KUBE-SERVICES -j KUBE-SVC-MISSING
-A KUBE-SERVICES -j KUBE-SVC-GONE
-A KUBE-SVC-UNUSED -j DNAT --to-destination 1.2.3.4:80
-A KUBE-UNDECLARED -j ACCEPT
-X KUBE-SVC-GONE
-I PREROUTING 1 -j KUBE-SERVICES
COMMIT
*filter
";
        let mut problems: Vec<String> = check(payload).iter().map(ToString::to_string).collect();
        problems.sort();
        assert_eq!(
            problems,
            [
                "table filter: table not committed",
                "table nat: KUBE-SERVICES jumps to deleted chain KUBE-SVC-GONE",
                "table nat: KUBE-SERVICES jumps to empty chain KUBE-SVC-EMPTY",
                "table nat: KUBE-SERVICES jumps to undeclared chain KUBE-SVC-MISSING",
                "table nat: chain KUBE-SVC-UNUSED is declared but nothing jumps to it",
                "table nat: line 10: rule in undeclared chain KUBE-UNDECLARED",
            ]
        );
    }
}

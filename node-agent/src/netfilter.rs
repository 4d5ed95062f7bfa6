//! The I/O edge to netfilter: `iptables-restore --noflush --wait` for the
//! payload, `iptables -C` for the jump rules in the built-in chains (kube-proxy's
//! EnsureRule), one `iptables-save` at start to learn which service chains
//! an earlier run (or kube-proxy) left behind, and `nft` for the tables
//! kube-proxy's nftables mode leaves.
//!
//! Everything that interprets the tools' output is a pure function below, so
//! it is unit-tested without netfilter.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::addr::IpFamily;
use crate::program;

use crate::rules::{
    JumpRule, KUBE_EXTERNAL_SERVICES, KUBE_FIREWALL, KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_NODEPORTS,
    KUBE_POSTROUTING, KUBE_PROXY_CANARY, KUBE_PROXY_FIREWALL, KUBE_SERVICES, Table,
    names::is_service_chain,
};

/// Which iptables binaries to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Backend {
    /// The host's: resolved by [`HostRules::resolve`].
    #[default]
    Auto,
    /// `iptables-nft*`.
    Nft,
    /// `iptables-legacy*`.
    Legacy,
}

/// The name `--iptables-backend` takes (`auto`, `nft`, `legacy`).
impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum as _;
        match self.to_possible_value() {
            Some(value) => f.write_str(value.get_name()),
            None => Ok(()),
        }
    }
}

/// The iptables tools of one IP family and backend.
#[derive(Debug, Clone)]
pub struct Netfilter {
    pub family: IpFamily,
    backend: Backend,
    iptables: String,
    restore: String,
    save: String,
}

/// A restore that iptables refused. A restore is one transaction per table:
/// the tables before the refused one are applied, the rest is not (the
/// payload puts nat first, where refusals happen, so usually nothing is).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{program} failed: {message}{}", context_text(.context))]
pub struct RestoreError {
    pub program: String,
    pub message: String,
    /// The line iptables named, 1-based, when it named one.
    pub line: Option<usize>,
    /// The offending line and its neighbours, numbered, for the log.
    pub context: Vec<String>,
}

fn context_text(context: &[String]) -> String {
    if context.is_empty() {
        String::new()
    } else {
        format!("\n{}", context.join("\n"))
    }
}

impl Netfilter {
    pub fn new(family: IpFamily, backend: Backend) -> Self {
        let base = match family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        let suffix = match backend {
            Backend::Auto => "",
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
        };
        Netfilter {
            family,
            backend,
            iptables: format!("{base}{suffix}"),
            restore: format!("{base}{suffix}-restore"),
            save: format!("{base}{suffix}-save"),
        }
    }

    /// The restore program's name, for logs.
    pub fn restore_program(&self) -> &str {
        &self.restore
    }

    /// The save program's name.
    pub fn save_program(&self) -> &str {
        &self.save
    }

    /// Sets up `command`, which runs the restore program (directly or
    /// through `ip netns exec`), as the agent runs it: for nft, with the
    /// agent's `GLIBC_TUNABLES` plus fastbins off, unless those already say
    /// how big fastbins are. A value that is not UTF-8 is left as it is:
    /// nothing we can add to.
    pub fn tune_restore(&self, command: &mut Command) {
        if self.backend != Backend::Nft {
            return;
        }
        let own = match std::env::var(GLIBC_TUNABLES) {
            Ok(own) => own,
            Err(std::env::VarError::NotPresent) => String::new(),
            Err(std::env::VarError::NotUnicode(_)) => return,
        };
        command.env(GLIBC_TUNABLES, with_fastbins_off(&own));
    }

    /// Applies `payload` with `--noflush --wait`: chains the payload declares
    /// are flushed and refilled, every other chain is left alone.
    pub fn restore(&self, payload: &str) -> Result<(), RestoreError> {
        let failed = |message: String| RestoreError {
            program: self.restore.clone(),
            message,
            line: None,
            context: Vec::new(),
        };
        let mut command = Command::new(&self.restore);
        self.tune_restore(&mut command);
        let mut child = command
            .args(["--noflush", "--wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot start it: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error shows up as the exit status and stderr below.
            let _ = stdin.write_all(payload.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|e| failed(format!("waiting for it: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let line = failed_line(&stderr);
        Err(RestoreError {
            context: line
                .map(|n| lines_around(payload, n, 2))
                .unwrap_or_default(),
            line,
            ..failed(if stderr.is_empty() {
                format!("exit status {}", out.status)
            } else {
                stderr
            })
        })
    }

    /// The jump rules among `jumps` that are not in their built-in chain.
    pub fn missing_jumps(&self, jumps: &[JumpRule]) -> Vec<JumpRule> {
        jumps
            .iter()
            .filter(|jump| !self.has_rule(jump))
            .cloned()
            .collect()
    }

    fn has_rule(&self, jump: &JumpRule) -> bool {
        // `-C` also fails when the target chain does not exist yet; then the
        // rule is indeed missing, and the payload creates both.
        Command::new(&self.iptables)
            .args(["-w", "-t", jump.table.as_str(), "-C", jump.chain])
            .args(&jump.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// What another program did to our rules, if anything, as the first
    /// sign found (see [`damage_in_listing`] and [`kube_proxy_sign`]), table
    /// by table, nat first. `probe` is one of our service chains with
    /// endpoints, which kube-proxy, running beside us, would rewrite to jump
    /// to `KUBE-SEP-` chains; `hairpins`, whether our `KUBE-POSTROUTING`
    /// holds hairpin rules.
    ///
    /// iptables-legacy reads and parses the whole table for every command
    /// (1.37 s for 22 commands at 10 000 × 10), so with it each table is saved
    /// once (nat: 0.37 s). iptables-nft reads only the chain a command names,
    /// so with it only the chains the checks look at are listed, one small
    /// `iptables -S` each.
    pub fn damage(
        &self,
        never_empty: &[(Table, &str)],
        jumps: &[JumpRule],
        probe: Option<&str>,
        hairpins: bool,
    ) -> Option<Damage> {
        // nat first: its signs say the most (kube-proxy's among them).
        [Table::Nat, Table::Mangle, Table::Filter]
            .into_iter()
            .find_map(|table| {
                let listing = if self.backend == Backend::Legacy {
                    match self.save(&["-t", table.as_str()]) {
                        Ok(saved) => saved,
                        Err(e) => {
                            return Some(Damage {
                                what: format!("cannot read {}: {e:#}", table.as_str()),
                                kube_proxy: false,
                            });
                        }
                    }
                } else {
                    let mut chains = vec![KUBE_PROXY_CANARY];
                    if table == Table::Nat {
                        chains.extend(probe);
                    }
                    let looked_at = never_empty
                        .iter()
                        .filter(|(t, _)| *t == table)
                        .map(|(_, chain)| *chain)
                        .chain(jumps.iter().filter(|j| j.table == table).map(|j| j.chain));
                    for chain in looked_at {
                        if !chains.contains(&chain) {
                            chains.push(chain);
                        }
                    }
                    chains
                        .into_iter()
                        .filter_map(|chain| self.list_chain(table, chain))
                        .collect()
                };
                let kube_proxy = (table == Table::Nat)
                    .then(|| kube_proxy_sign(&listing))
                    .flatten();
                match kube_proxy {
                    Some(what) => Some(Damage {
                        what,
                        kube_proxy: true,
                    }),
                    None => damage_in_listing(table, &listing, never_empty, jumps, hairpins).map(
                        |what| Damage {
                            what,
                            kube_proxy: false,
                        },
                    ),
                }
            })
    }

    /// `iptables -S chain`: the chain's rules, or `None` when it does not exist.
    fn list_chain(&self, table: Table, chain: &str) -> Option<String> {
        let out = Command::new(&self.iptables)
            .args(["-w", "-t", table.as_str(), "-S", chain])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Per-service nat chains that exist now (ours from an earlier run, or
    /// kube-proxy's), so the first sync can delete the ones no longer wanted.
    pub fn existing_service_chains(&self) -> anyhow::Result<Vec<String>> {
        Ok(service_chains_in_save(
            &self.save(&["-t", Table::Nat.as_str()])?,
        ))
    }
}

const GLIBC_TUNABLES: &str = "GLIBC_TUNABLES";

/// glibc's fastbins off, for `iptables-nft-restore`. `perf` put glibc's
/// `malloc_consolidate` and `unlink_chunk` at a fifth of its user time on a
/// 130 000-line payload: glibc merges the free fastbin chunks before it serves
/// a large request, and the restore keeps asking. Without fastbins its user
/// time fell from 1.2–1.7 s to 0.9–1.0 s (docs/benchmarks.md).
/// `iptables-legacy-restore` got slower with it, so it is not set there.
const NO_FASTBINS: &str = "glibc.malloc.mxfast=0";

fn with_fastbins_off(own: &str) -> String {
    let own = own.trim().trim_end_matches(':');
    if own.is_empty() {
        NO_FASTBINS.to_string()
    } else if own
        .split(':')
        .any(|t| t.starts_with("glibc.malloc.mxfast="))
    {
        own.to_string()
    } else {
        format!("{own}:{NO_FASTBINS}")
    }
}

/// The chains kubelet creates in the mangle table of the backend it uses,
/// for other programs to follow.
const KUBELET_HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// How long one iptables program may take at start before the agent gives
/// up: iptables-nft 1.8.3 could loop forever (kube-proxy's wrapper bounds
/// its saves for that reason).
const SAVE_LIMIT: Duration = Duration::from_secs(20);

/// What each backend holds, as far as choosing between them needs, read
/// once at start. Legacy is read whole, both IP families: asking legacy
/// iptables for one table, even to list it, makes the kernel create that
/// table on a node that had none, and a full legacy save is quick. nft is
/// asked for the few chains that matter: its full save takes about 1.8 s
/// at 10 000 Services × 10 endpoints (measured 2026-12-02).
#[derive(Debug, Default)]
pub struct HostRules {
    /// Legacy saves, by family; a backend this machine cannot read holds
    /// nothing.
    legacy: Vec<(IpFamily, String)>,
    /// Whether nft holds nat `KUBE-SERVICES` (in either family): kube-proxy
    /// and the agent always make it.
    nft_services: bool,
    /// Whether nft's mangle holds one of kubelet's hint chains.
    nft_hint: bool,
}

impl HostRules {
    pub fn read() -> anyhow::Result<Self> {
        let mut legacy = Vec::new();
        let mut nft_services = false;
        let mut nft_hint = false;
        for family in [IpFamily::V4, IpFamily::V6] {
            let program = Netfilter::new(family, Backend::Legacy).save;
            legacy.push((family, read_save(&program, &[])?));
            let nft = Netfilter::new(family, Backend::Nft).iptables;
            nft_services |= chain_exists(&nft, "nat", KUBE_SERVICES)?;
            for hint in KUBELET_HINT_CHAINS {
                nft_hint |= chain_exists(&nft, "mangle", hint)?;
            }
        }
        Ok(HostRules {
            legacy,
            nft_services,
            nft_hint,
        })
    }

    /// Resolves `auto` as kube-proxy's image does (its iptables wrapper
    /// picks the host's backend), and keeps an agent's rules where they are:
    /// the one backend holding Service chains, if only one does; else the
    /// one kubelet marked with its hint chain (nft first, as the wrapper
    /// looks); else the one holding more rules; else the one `iptables` here
    /// uses. A node whose kube-proxy ran on legacy iptables stays on legacy.
    /// Returns the backend and why, for the log.
    pub fn resolve(&self, backend: Backend) -> anyhow::Result<(Backend, String)> {
        if backend != Backend::Auto {
            return Ok((backend, "as given".into()));
        }
        let legacy_services = self
            .legacy
            .iter()
            .any(|(_, save)| !owned_chains(save).is_empty());
        let legacy_hint = self.legacy.iter().any(|(_, save)| holds_kubelet_hint(save));
        // Only when neither holds Service chains nor a hint: then nft's
        // save is small.
        let rule_counts = || -> anyhow::Result<[usize; 2]> {
            let rules = |save: &str| save.lines().filter(|l| l.starts_with("-A ")).count();
            let mut nft = 0;
            for family in [IpFamily::V4, IpFamily::V6] {
                nft += rules(&read_save(&Netfilter::new(family, Backend::Nft).save, &[])?);
            }
            let legacy = self.legacy.iter().map(|(_, save)| rules(save)).sum();
            Ok([nft, legacy])
        };
        if let Some(chosen) = choose_backend(
            [self.nft_services, legacy_services],
            [self.nft_hint, legacy_hint],
            rule_counts,
        )? {
            return Ok(chosen);
        }
        let out = Command::new("iptables")
            .arg("--version")
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run iptables: {e}"))?;
        let version = String::from_utf8_lossy(&out.stdout);
        let backend = backend_in_version(&version).ok_or_else(|| {
            anyhow::anyhow!("cannot tell the backend of iptables from {version:?}")
        })?;
        Ok((backend, "no rules yet: the backend of iptables here".into()))
    }

    /// Refuses to run when the other backend holds kube-proxy's (or our)
    /// chains: both would steer packets, and whichever the kernel consults
    /// first wins.
    pub fn refuse_other(&self, chosen: Backend, family: IpFamily) -> anyhow::Result<()> {
        let other = match chosen {
            Backend::Nft => Backend::Legacy,
            Backend::Legacy => Backend::Nft,
            Backend::Auto => return Ok(()),
        };
        let netfilter = Netfilter::new(family, other);
        let saved = match other {
            Backend::Legacy => self
                .legacy
                .iter()
                .find(|(f, _)| *f == family)
                .map(|(_, save)| save.clone())
                .unwrap_or_default(),
            // Read whole only when it holds Service chains, to name them.
            _ if self.nft_services => read_save(&netfilter.save, &[])?,
            _ => return Ok(()),
        };
        let found: Vec<String> = owned_chains(&saved)
            .into_iter()
            .flat_map(|(table, chains)| chains.into_iter().map(move |c| format!("{table}/{c}")))
            .collect();
        if found.is_empty() {
            return Ok(());
        }
        let name = |b: Backend| match b {
            Backend::Nft => "nft",
            _ => "legacy",
        };
        anyhow::bail!(
            "{} already holds Service rules ({}{}), probably from kube-proxy or an agent run with \
             --iptables-backend {}; programming {} as well would leave two rulesets steering packets. \
             Remove them with `causeway-agent cleanup --iptables-backend {}`, or run with \
             --iptables-backend {}",
            netfilter.save,
            found.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            if found.len() > 3 { ", …" } else { "" },
            name(other),
            name(chosen),
            name(other),
            name(other),
        )
    }
}

/// The choice of [`HostRules::resolve`], from whether each backend (nft,
/// legacy) holds Service chains and kubelet's hint, and, asked only when
/// those do not decide, how many rules each holds; `None` when nothing
/// tells them apart.
pub fn choose_backend(
    services: [bool; 2],
    hints: [bool; 2],
    rule_counts: impl FnOnce() -> anyhow::Result<[usize; 2]>,
) -> anyhow::Result<Option<(Backend, String)>> {
    let backends = [Backend::Nft, Backend::Legacy];
    let hinted = (0..2).find(|&i| hints[i]);
    if services[0] != services[1] {
        let i = if services[0] { 0 } else { 1 };
        let mut why = "the backend holding Service rules".to_string();
        if hinted.is_some_and(|h| h != i) {
            why.push_str(", though kubelet's hint chain is in the other");
        }
        return Ok(Some((backends[i], why)));
    }
    if let Some(i) = hinted {
        return Ok(Some((backends[i], "kubelet's hint chain".into())));
    }
    let [nft, legacy] = rule_counts()?;
    let why = || "the backend holding more rules".to_string();
    Ok(match nft.cmp(&legacy) {
        std::cmp::Ordering::Greater => Some((Backend::Nft, why())),
        std::cmp::Ordering::Less => Some((Backend::Legacy, why())),
        std::cmp::Ordering::Equal => None,
    })
}

/// Whether a save holds one of kubelet's hint chains in its mangle table.
fn holds_kubelet_hint(save: &str) -> bool {
    declared_chains(save)
        .into_iter()
        .any(|(table, name)| table == "mangle" && KUBELET_HINT_CHAINS.contains(&name))
}

/// Whether `table` holds `chain`, asked of the iptables program `iptables`
/// (`-S` of that chain alone: quick however large the table). A program
/// this machine lacks holds nothing.
fn chain_exists(iptables: &str, table: &str, chain: &str) -> anyhow::Result<bool> {
    match program::run_within(iptables, &["-t", table, "-S", chain], SAVE_LIMIT) {
        Ok(done) => Ok(done.success),
        Err(program::Failure::Missing | program::Failure::Spawn(_)) => Ok(false),
        Err(program::Failure::TimedOut) => {
            anyhow::bail!("{iptables} -t {table} -S {chain} gave no answer within {SAVE_LIMIT:?}")
        }
    }
}

/// One save program's output. A program this machine lacks, or one whose
/// backend the kernel does not offer, gives nothing; another failure is
/// tried once more, then named. A save that hangs stops the start.
fn read_save(save: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut last = String::new();
    for attempt in 0..2 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        let stderr = match program::run_within(save, args, SAVE_LIMIT) {
            Ok(done) if done.success => return Ok(done.stdout),
            Ok(done) => done.stderr,
            Err(program::Failure::Missing) => return Ok(String::new()),
            Err(program::Failure::TimedOut) => {
                anyhow::bail!("{save} gave no answer within {SAVE_LIMIT:?}")
            }
            Err(program::Failure::Spawn(e)) => e,
        };
        if BACKEND_ABSENT.iter().any(|sign| stderr.contains(sign)) {
            return Ok(String::new());
        }
        last = stderr;
    }
    anyhow::bail!("{save} failed twice: {}", last.trim())
}

/// What save programs say when the kernel lacks their backend.
const BACKEND_ABSENT: [&str; 3] = [
    "Protocol not supported",
    "can't initialize",
    "Could not fetch rule set generation id",
];

/// Whether this backend's iptables takes MASQUERADE `--random-fully`, which
/// came with iptables 1.6.2 (kube-proxy checks the same version). An error
/// says why the version is unknown; the caller then goes without (a rule
/// iptables rejects would refuse every restore).
pub fn supports_random_fully(backend: Backend) -> Result<bool, String> {
    let netfilter = Netfilter::new(IpFamily::V4, backend);
    let out = Command::new(&netfilter.iptables)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", netfilter.iptables))?;
    let version = String::from_utf8_lossy(&out.stdout);
    if random_fully_in_version(&version) {
        Ok(true)
    } else if version.contains(" v") {
        Ok(false)
    } else {
        Err(format!("cannot read a version in {version:?}"))
    }
}

/// Whether `iptables --version` output names 1.6.2 or later.
pub fn random_fully_in_version(version: &str) -> bool {
    let Some(number) = version
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))
    else {
        return false;
    };
    let parts: Vec<u32> = number
        .split('.')
        .map_while(|part| part.parse().ok())
        .collect();
    parts.len() >= 2 && parts >= vec![1, 6, 2]
}

/// `nf_tables` or `legacy` from `iptables --version` ("iptables v1.8.9 (nf_tables)").
pub fn backend_in_version(version: &str) -> Option<Backend> {
    if version.contains("(nf_tables)") {
        Some(Backend::Nft)
    } else if version.contains("(legacy)") {
        Some(Backend::Legacy)
    } else {
        None
    }
}

/// The tables kube-proxy's nftables mode keeps its rules in: family, name.
const KUBE_PROXY_NFT_TABLES: [(&str, &str); 2] = [("ip", "kube-proxy"), ("ip6", "kube-proxy")];

/// Which of kube-proxy's nftables-mode tables an `nft list tables` listing
/// holds (one `table <family> <name>` per line).
pub fn kube_proxy_tables_in_listing(listing: &str) -> Vec<(&'static str, &'static str)> {
    KUBE_PROXY_NFT_TABLES
        .into_iter()
        .filter(|(family, name)| {
            listing.lines().any(|line| {
                let mut words = line.split_whitespace();
                words.next() == Some("table")
                    && words.next() == Some(*family)
                    && words.next() == Some(*name)
                    && words.next().is_none()
            })
        })
        .collect()
}

/// What became of kube-proxy's nftables-mode tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftablesLeftovers {
    /// No `nft` program here: they cannot be looked for.
    NoNft,
    /// Those found, deleted (`ip kube-proxy`); often none.
    Deleted(Vec<String>),
}

/// Deletes the tables kube-proxy's nftables mode left behind. A table gone
/// between the listing and the deletion (another cleanup) counts as deleted.
pub fn remove_kube_proxy_nftables_tables() -> anyhow::Result<NftablesLeftovers> {
    let nft = |args: &[&str]| Command::new("nft").args(args).output();
    let failure = |args: &[&str], output: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = match stderr.trim() {
            "" => output.status.to_string(),
            text => text.to_string(),
        };
        anyhow::anyhow!("nft {}: {why}", args.join(" "))
    };
    let list = ["list", "tables"];
    let listing = match nft(&list) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(NftablesLeftovers::NoNft);
        }
        result => result.context("running nft list tables")?,
    };
    if !listing.status.success() {
        return Err(failure(&list, &listing));
    }
    let mut deleted = Vec::new();
    for (family, name) in kube_proxy_tables_in_listing(&String::from_utf8_lossy(&listing.stdout)) {
        let delete = ["delete", "table", family, name];
        let output = nft(&delete).context("running nft delete table")?;
        if !output.status.success()
            && !String::from_utf8_lossy(&output.stderr).contains("No such file or directory")
        {
            return Err(failure(&delete, &output));
        }
        deleted.push(format!("{family} {name}"));
    }
    Ok(NftablesLeftovers::Deleted(deleted))
}

/// What `cleanup` removed from one family.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    pub jump_rules: usize,
    /// `table/CHAIN` of every chain deleted.
    pub chains: Vec<String>,
    /// `table/CHAIN` of chains the agent writes but leaves (see `cleanup`).
    pub kept: Vec<String>,
}

impl Netfilter {
    /// Removes everything the agent creates in this family, and nothing else:
    /// every rule elsewhere that jumps to one of its chains (kube-proxy's
    /// jump rules, whatever their comments), then its chains.
    ///
    /// Except filter `KUBE-FIREWALL`, which stays as it is, as kube-proxy's
    /// cleanup leaves it. It is kubelet's chain too, with the same rule in it,
    /// and its guard is what keeps other hosts off the node's 127.0.0.0/8
    /// services while `route_localnet` is on (the agent turns it on, and
    /// nothing turns it off).
    pub fn cleanup(&self) -> anyhow::Result<CleanupReport> {
        let saved = self.save(&[])?;
        let owned = owned_chains(&saved);
        let (payload, mut report) = cleanup_payload(&saved, &owned);
        if !payload.is_empty() {
            self.restore(&payload)?;
        }
        if self.family == IpFamily::V4
            && declared_chains(&saved)
                .into_iter()
                .any(|(table, name)| table == "filter" && name == KUBE_FIREWALL)
        {
            report.kept.push(format!("filter/{KUBE_FIREWALL}"));
        }
        Ok(report)
    }

    /// `iptables-save` with `args` (e.g. `-t nat`; none for every table).
    fn save(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.save)
            .args(args)
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", self.save))?;
        if !out.status.success() {
            anyhow::bail!(
                "{} {} failed: {}",
                self.save,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The restore input that deletes `owned` chains and every other rule that
/// jumps to them, from `iptables-save` output; empty when there is nothing.
pub fn cleanup_payload(
    save: &str,
    owned: &BTreeMap<String, Vec<String>>,
) -> (String, CleanupReport) {
    let mut report = CleanupReport::default();
    let mut payload = String::new();
    for (table, chains) in owned {
        let mut section = format!("*{table}\n");
        for chain in chains {
            section.push_str(&format!(":{chain} - [0:0]\n"));
        }
        let mut current = "";
        for line in save.lines() {
            if let Some(name) = line.strip_prefix('*') {
                current = name.trim();
                continue;
            }
            let Some(rule) = line.strip_prefix("-A ") else {
                continue;
            };
            let chain = rule.split_whitespace().next().unwrap_or("");
            if current != table || chains.iter().any(|c| c == chain) {
                continue;
            }
            let words: Vec<&str> = rule.split_whitespace().collect();
            let target = words
                .windows(2)
                .find(|w| w[0] == "-j" || w[0] == "-g")
                .map(|w| w[1]);
            if target.is_some_and(|t| chains.iter().any(|c| c == t)) {
                section.push_str(&format!("-D {rule}\n"));
                report.jump_rules += 1;
            }
        }
        for chain in chains {
            section.push_str(&format!("-X {chain}\n"));
            report.chains.push(format!("{table}/{chain}"));
        }
        section.push_str("COMMIT\n");
        payload.push_str(&section);
    }
    (payload, report)
}

/// The chains in `iptables-save` output that the agent created, per table.
pub fn owned_chains(save: &str) -> BTreeMap<String, Vec<String>> {
    const FIXED: [&str; 8] = [
        KUBE_SERVICES,
        KUBE_EXTERNAL_SERVICES,
        KUBE_FORWARD,
        KUBE_NODEPORTS,
        KUBE_PROXY_FIREWALL,
        KUBE_PROXY_CANARY,
        KUBE_POSTROUTING,
        KUBE_MARK_MASQ,
    ];
    let mut owned: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (table, name) in declared_chains(save) {
        let ours = FIXED.contains(&name) || (table == "nat" && is_service_chain(name));
        if ours {
            owned
                .entry(table.to_string())
                .or_default()
                .push(name.to_string());
        }
    }
    owned
}

/// What [`Netfilter::damage`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The first sign, in words.
    pub what: String,
    /// Whether it is kube-proxy's work: it runs on this node too.
    pub kube_proxy: bool,
}

/// A sign in nat `listing` (`iptables-save -t nat`, or `iptables -S` of
/// some chains) that kube-proxy runs beside the agent: a jump to a
/// `KUBE-SEP-` chain. Only kube-proxy writes them, and the service chains it
/// rewrites jump to them. (A `KUBE-SEP-` chain that nothing jumps to is only
/// left over: [`damage_in_listing`].)
pub fn kube_proxy_sign(listing: &str) -> Option<String> {
    listing.lines().find_map(|line| {
        let (head, target) = line.rsplit_once(" -j ")?;
        let target = target.split_whitespace().next()?;
        let chain = head.strip_prefix("-A ")?.split_whitespace().next()?;
        target
            .starts_with("KUBE-SEP-")
            .then(|| format!("nat {chain} jumps to {target}"))
    })
}

fn jump_gone(jump: &JumpRule) -> String {
    format!(
        "the jump from {} {} to {} is gone",
        jump.table.as_str(),
        jump.chain,
        jump.args.last().map_or("?", String::as_str)
    )
}

/// [`Netfilter::damage`]'s checks of one table, in that table's
/// `iptables-save -t` text or in `iptables -S <chain>` listings of the chains
/// they look at. The first sign found:
/// - the table's KUBE-PROXY-CANARY chain (empty, and only we write it) is
///   gone: its chains were deleted (a firewall reload, `iptables -X`);
/// - one of `never_empty` holds no rule: it was flushed (`iptables -F`);
/// - one of `jumps` is gone. It counts as there when its built-in chain has
///   any rule that jumps to the target; the full sync that damage starts
///   checks them exactly.
pub fn damage_in_listing(
    table: Table,
    listing: &str,
    never_empty: &[(Table, &str)],
    jumps: &[JumpRule],
    hairpins: bool,
) -> Option<String> {
    // Chains as `iptables-save` (`:NAME`) or `iptables -S` (`-N NAME`)
    // declare them.
    let mut declared = listing.lines().filter_map(|l| {
        l.strip_prefix(':')
            .or_else(|| l.strip_prefix("-N "))
            .and_then(|rest| rest.split_whitespace().next())
    });
    if !declared.clone().any(|c| c == KUBE_PROXY_CANARY) {
        return Some(format!("{} {KUBE_PROXY_CANARY} is gone", table.as_str()));
    }
    let has_rule = |chain: &str, ends_with: &str| {
        let start = format!("-A {chain} ");
        listing
            .lines()
            .any(|l| l.starts_with(&start) && l.ends_with(ends_with))
    };
    for (_, chain) in never_empty.iter().filter(|(t, _)| *t == table) {
        if !has_rule(chain, "") {
            return Some(format!("{} {chain} was flushed", table.as_str()));
        }
    }
    if let Some(gone) = jumps
        .iter()
        .filter(|jump| jump.table == table)
        .find(|jump| {
            let target = jump.args.last().map_or("", String::as_str);
            !has_rule(jump.chain, &format!(" -j {target}"))
        })
    {
        return Some(jump_gone(gone));
    }
    if table != Table::Nat {
        return None;
    }
    let postrouting = format!("-A {KUBE_POSTROUTING} ");
    if hairpins
        && !listing
            .lines()
            .any(|l| l.starts_with(&postrouting) && l.contains("masquerade hairpin"))
    {
        return Some(format!(
            "nat {KUBE_POSTROUTING} lost our hairpin rules (kube-proxy's syncs, if it runs here too, rewrite it so)"
        ));
    }
    declared
        .find(|c| c.starts_with("KUBE-SEP-"))
        .map(|c| format!("nat holds {c}, an endpoint chain kube-proxy left"))
}

/// The line number in iptables-restore's "line N failed" message.
pub fn failed_line(stderr: &str) -> Option<usize> {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words.windows(3).find_map(|w| {
        (w[0] == "line" && w[2].starts_with("failed"))
            .then(|| w[1].trim_end_matches(':').parse().ok())
            .flatten()
    })
}

/// Lines `n - around ..= n + around` of `text` (1-based), numbered, the
/// offending one marked.
pub fn lines_around(text: &str, n: usize, around: usize) -> Vec<String> {
    let first = n.saturating_sub(around).max(1);
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line))
        .filter(|(i, _)| *i >= first && *i <= n + around)
        .map(|(i, line)| {
            let mark = if i == n { ">" } else { " " };
            format!("{mark}{i:>6} | {line}")
        })
        .collect()
}

/// `(table, chain)` of every chain declaration in `iptables-save` output.
fn declared_chains(save: &str) -> Vec<(&str, &str)> {
    let mut table = "";
    let mut chains = Vec::new();
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.trim();
        } else if let Some(decl) = line.strip_prefix(':') {
            chains.push((table, decl.split_whitespace().next().unwrap_or("")));
        }
    }
    chains
}

/// The per-Service nat chains declared in `iptables-save` output.
pub fn service_chains_in_save(text: &str) -> Vec<String> {
    declared_chains(text)
        .into_iter()
        .filter(|(table, name)| *table == "nat" && is_service_chain(name))
        .map(|(_, name)| name.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxys_nftables_mode_tables_are_found_in_a_listing() {
        let listing = "table ip filter\ntable ip kube-proxy\ntable inet other\n\
                       table ip6 kube-proxy\ntable ip kube-proxy-x\n";
        assert_eq!(
            kube_proxy_tables_in_listing(listing),
            [("ip", "kube-proxy"), ("ip6", "kube-proxy")]
        );
        assert!(kube_proxy_tables_in_listing("table inet kube-proxy\ntable ip nat\n").is_empty());
        assert!(kube_proxy_tables_in_listing("").is_empty());
    }

    #[test]
    fn the_failed_line_is_found_in_both_backends_messages() {
        assert_eq!(failed_line("iptables-restore: line 12 failed"), Some(12));
        assert_eq!(
            failed_line(
                "iptables-restore v1.8.9 (nf_tables): line 7: RULE_APPEND failed (No such file or directory): rule in chain KUBE-SVC-X\nline 9 failed"
            ),
            Some(9)
        );
        assert_eq!(
            failed_line("iptables-restore: unable to initialize table 'nat'"),
            None
        );
    }

    #[test]
    fn context_marks_the_offending_line() {
        let text = "*nat\n:A - [0:0]\n-A A -j BAD\n-A A -j ACCEPT\nCOMMIT\n";
        assert_eq!(
            lines_around(text, 3, 1),
            [
                "      2 | :A - [0:0]",
                ">     3 | -A A -j BAD",
                "      4 | -A A -j ACCEPT"
            ]
        );
        assert_eq!(lines_around(text, 1, 2).len(), 3);
    }

    #[test]
    fn only_per_service_nat_chains_are_listed() {
        let save = "\
# Generated by iptables-save
*filter
:KUBE-SVC-IGNORED - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-SEP-QRSTUVWXYZ234567 - [0:0]
:KUBE-EXT-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-SERVICES -j KUBE-SVC-ABCDEFGHIJKLMNOP
COMMIT
";
        assert_eq!(
            service_chains_in_save(save),
            [
                "KUBE-SVC-ABCDEFGHIJKLMNOP",
                "KUBE-SEP-QRSTUVWXYZ234567",
                "KUBE-EXT-ABCDEFGHIJKLMNOP"
            ]
        );
    }

    #[test]
    fn cleanup_takes_only_our_chains() {
        let save = "\
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:MY-CHAIN - [0:0]
-A KUBE-FIREWALL -j DROP
COMMIT
*nat
:KUBE-SVC-ABCDEFGHIJKLMNOP - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVCX - [0:0]
COMMIT
*filter
";
        let owned = owned_chains(save);
        assert_eq!(owned["filter"], ["KUBE-SERVICES"]);
        assert_eq!(
            owned["nat"],
            ["KUBE-SVC-ABCDEFGHIJKLMNOP", "KUBE-MARK-MASQ"]
        );
    }

    #[test]
    fn cleanup_deletes_every_jump_to_our_chains_and_only_those() {
        let save = "\
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:OTHER - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -j OTHER
-A OTHER -g KUBE-SERVICES
-A KUBE-SERVICES -j RETURN
COMMIT
";
        let owned = owned_chains(save);
        let (payload, report) = cleanup_payload(save, &owned);
        assert_eq!(
            payload,
            "*nat\n:KUBE-SERVICES - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -D OTHER -g KUBE-SERVICES\n-X KUBE-SERVICES\nCOMMIT\n"
        );
        assert_eq!(report.jump_rules, 2);
        assert_eq!(report.chains, ["nat/KUBE-SERVICES"]);
        assert_eq!(cleanup_payload("*nat\nCOMMIT\n", &BTreeMap::new()).0, "");
    }

    #[test]
    fn damage_is_read_from_a_saved_table_or_chain_listings() {
        let never_empty = [
            (Table::Nat, "KUBE-MARK-MASQ"),
            (Table::Filter, "KUBE-FORWARD"),
        ];
        let jumps = [JumpRule::new(
            Table::Nat,
            "PREROUTING",
            &[],
            Some("kubernetes service portals"),
            "KUBE-SERVICES",
        )];
        let intact = "\
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-PROXY-CANARY - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
COMMIT
";
        let damage =
            |table, listing: &str| damage_in_listing(table, listing, &never_empty, &jumps, false);
        assert_eq!(damage(Table::Nat, intact), None);
        let without = |line: &str| intact.replace(line, "");
        let jump_line =
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n";
        assert_eq!(
            damage(Table::Nat, &without(":KUBE-PROXY-CANARY - [0:0]\n")).as_deref(),
            Some("nat KUBE-PROXY-CANARY is gone")
        );
        assert_eq!(
            damage(
                Table::Nat,
                &without("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n")
            )
            .as_deref(),
            Some("nat KUBE-MARK-MASQ was flushed")
        );
        assert_eq!(
            damage(Table::Nat, &without(jump_line)).as_deref(),
            Some("the jump from nat PREROUTING to KUBE-SERVICES is gone")
        );
        // The same chains as `iptables -S <chain>` lists them (nft).
        let listed = "\
-N KUBE-PROXY-CANARY
-N KUBE-MARK-MASQ
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-P PREROUTING ACCEPT
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
";
        assert_eq!(damage(Table::Nat, listed), None);
        assert_eq!(
            damage(Table::Nat, &listed.replace("-N KUBE-PROXY-CANARY\n", "")).as_deref(),
            Some("nat KUBE-PROXY-CANARY is gone")
        );
        // Another table's chains are that table's business.
        assert_eq!(
            damage(
                Table::Filter,
                "*filter\n:KUBE-PROXY-CANARY - [0:0]\n:KUBE-FORWARD - [0:0]\nCOMMIT\n"
            )
            .as_deref(),
            Some("filter KUBE-FORWARD was flushed")
        );
        // kube-proxy's traces: KUBE-POSTROUTING rewritten without our hairpin
        // rules, and an endpoint chain it left.
        let with_hairpin = intact.replace(
            "COMMIT",
            "-A KUBE-POSTROUTING -m comment --comment \"masquerade hairpin traffic to 10.0.0.1\" -s 10.0.0.1 -d 10.0.0.1 -m conntrack --ctstate DNAT -j MASQUERADE\nCOMMIT",
        );
        let hairpin_damage =
            |listing: &str| damage_in_listing(Table::Nat, listing, &never_empty, &jumps, true);
        assert_eq!(hairpin_damage(&with_hairpin), None);
        assert_eq!(
            hairpin_damage(intact).as_deref(),
            Some(
                "nat KUBE-POSTROUTING lost our hairpin rules (kube-proxy's syncs, if it runs here too, rewrite it so)"
            )
        );
        assert_eq!(
            damage(
                Table::Nat,
                &intact.replace("COMMIT", ":KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\nCOMMIT")
            )
            .as_deref(),
            Some("nat holds KUBE-SEP-BBBBBBBBBBBBBBBB, an endpoint chain kube-proxy left")
        );
    }

    #[test]
    fn kube_proxys_endpoint_chains_are_its_sign() {
        // The agent's own rules: affinity lists named KUBE-SEP-, no chain.
        let ours = "\
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
-A KUBE-SVC-AAAAAAAAAAAAAAAA -p tcp -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-BBBBBBBBBBBBBBBB --mask 255.255.255.255 --rsource -j DNAT --to-destination 10.0.0.1:80
";
        assert_eq!(kube_proxy_sign(ours), None);
        // kube-proxy's, as iptables-save and as iptables -S list them.
        assert_eq!(
            kube_proxy_sign(&format!(
                "{ours}-A KUBE-SVC-AAAAAAAAAAAAAAAA -m comment --comment \"default/web -> 10.0.0.1:80\" -j KUBE-SEP-BBBBBBBBBBBBBBBB\n"
            ))
            .as_deref(),
            Some("nat KUBE-SVC-AAAAAAAAAAAAAAAA jumps to KUBE-SEP-BBBBBBBBBBBBBBBB")
        );
        // A chain nothing jumps to is a leftover, not kube-proxy at work.
        assert_eq!(
            kube_proxy_sign(":KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]\n"),
            None
        );
    }

    #[test]
    fn random_fully_needs_iptables_1_6_2() {
        for (version, supported) in [
            ("iptables v1.8.9 (nf_tables)\n", true),
            ("iptables v1.6.2\n", true),
            ("iptables v1.10.0 (legacy)\n", true),
            ("iptables v1.6.1\n", false),
            ("iptables v1.4.21\n", false),
            ("iptables v1.6\n", false),
            ("no version here\n", false),
            ("", false),
        ] {
            assert_eq!(random_fully_in_version(version), supported, "{version:?}");
        }
    }

    #[test]
    fn the_backend_is_read_from_the_version() {
        assert_eq!(
            backend_in_version("iptables v1.8.9 (nf_tables)\n"),
            Some(Backend::Nft)
        );
        assert_eq!(
            backend_in_version("iptables v1.8.9 (legacy)\n"),
            Some(Backend::Legacy)
        );
        assert_eq!(backend_in_version("iptables v1.4.21\n"), None);
    }

    #[test]
    fn auto_keeps_service_rules_then_follows_kubelets_hint_then_the_rules() {
        let choose = |services: [bool; 2], hints: [bool; 2], rules: [usize; 2]| {
            choose_backend(services, hints, || Ok(rules)).unwrap()
        };
        let picked = |services, hints, rules| choose(services, hints, rules).map(|(b, _)| b);
        let none = [false, false];
        // (nft, legacy) each.
        assert_eq!(picked(none, [false, true], [0, 0]), Some(Backend::Legacy));
        assert_eq!(picked(none, [true, false], [0, 0]), Some(Backend::Nft));
        // Both hinted: nft, as kube-proxy's wrapper looks there first.
        assert_eq!(picked(none, [true, true], [0, 0]), Some(Backend::Nft));
        // Service rules in one backend keep it, against kubelet's hint, and
        // the reason says so: an agent upgraded on a node it has run on.
        let (backend, why) = choose([true, false], [false, true], [0, 0]).unwrap();
        assert_eq!(backend, Backend::Nft);
        assert!(
            why.contains("kubelet's hint chain is in the other"),
            "{why}"
        );
        assert_eq!(
            picked([false, true], [false, true], [0, 0]),
            Some(Backend::Legacy)
        );
        // Service rules in both: the hint decides (and the check refuses).
        assert_eq!(
            picked([true, true], [false, true], [0, 0]),
            Some(Backend::Legacy)
        );
        // No hint, no Service rules: the one holding more rules.
        assert_eq!(picked(none, none, [0, 2]), Some(Backend::Legacy));
        assert_eq!(picked(none, none, [2, 0]), Some(Backend::Nft));
        assert_eq!(picked(none, none, [2, 2]), None);
        // The rules are counted only when nothing else decides.
        assert!(
            choose_backend([true, false], none, || anyhow::bail!("counted"))
                .unwrap()
                .is_some()
        );
        // The hint chains count in mangle only.
        assert!(holds_kubelet_hint(
            "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n"
        ));
        assert!(!holds_kubelet_hint(
            "*nat\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
        ));
    }

    #[test]
    fn nft_restore_turns_fastbins_off_and_keeps_the_agents_own_tunables() {
        assert_eq!(with_fastbins_off(""), "glibc.malloc.mxfast=0");
        assert_eq!(with_fastbins_off(" "), "glibc.malloc.mxfast=0");
        assert_eq!(
            with_fastbins_off("glibc.malloc.arena_max=2"),
            "glibc.malloc.arena_max=2:glibc.malloc.mxfast=0"
        );
        assert_eq!(
            with_fastbins_off("glibc.malloc.arena_max=2:"),
            "glibc.malloc.arena_max=2:glibc.malloc.mxfast=0"
        );
        // Someone who sized fastbins themselves keeps their choice.
        assert_eq!(
            with_fastbins_off("glibc.malloc.mxfast=64:glibc.malloc.arena_max=2"),
            "glibc.malloc.mxfast=64:glibc.malloc.arena_max=2"
        );
    }

    #[test]
    fn only_the_nft_restore_runs_with_fastbins_off() {
        let tunables = |backend| {
            let mut command = Command::new("true");
            Netfilter::new(IpFamily::V4, backend).tune_restore(&mut command);
            command
                .get_envs()
                .find(|(key, _)| *key == GLIBC_TUNABLES)
                .and_then(|(_, value)| value?.to_str().map(String::from))
        };
        let nft = tunables(Backend::Nft).expect("set for nft");
        assert!(nft.contains("glibc.malloc.mxfast="), "{nft}");
        assert_eq!(tunables(Backend::Legacy), None);
        assert_eq!(Backend::Legacy.to_string(), "legacy");
    }

    #[test]
    fn binaries_follow_family_and_backend() {
        let nf = Netfilter::new(IpFamily::V6, Backend::Legacy);
        assert_eq!(nf.restore_program(), "ip6tables-legacy-restore");
        assert_eq!(nf.iptables, "ip6tables-legacy");
        let nf = Netfilter::new(IpFamily::V4, Backend::Auto);
        assert_eq!(nf.save, "iptables-save");
    }
}

//! IP addresses and CIDRs as Kubernetes writes them, normalized.
//!
//! The API server historically accepted IPv4 octets with leading zeros
//! (`010.000.000.001`) and kube-proxy parses them "sloppily" as decimal, so a
//! drop-in replacement must too; whitespace around values is trimmed the same
//! way kube-proxy trims `loadBalancerSourceRanges`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The IP family one ruleset is rendered for (`iptables` or `ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The EndpointSlice `addressType` that carries this family.
    pub fn address_type(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// The family an EndpointSlice `addressType` carries (`FQDN` has none).
    pub fn of_address_type(address_type: &str) -> Option<Self> {
        [IpFamily::V4, IpFamily::V6]
            .into_iter()
            .find(|family| family.address_type() == address_type)
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.address_type())
    }
}

/// Parses an IP address the way kube-proxy's `ParseIPSloppy` does: surrounding
/// whitespace ignored, IPv4 octets with leading zeros read as decimal.
pub fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    if text.contains(':') {
        return text.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// A network prefix with its host bits cleared (`10.1.2.3/8` becomes `10.0.0.0/8`,
/// as Go's `net.ParseCIDR` returns it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    pub fn new(ip: IpAddr, prefix_len: u8) -> Option<Self> {
        let max = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix_len > max {
            return None;
        }
        let network = match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        };
        Some(Cidr {
            network,
            prefix_len,
        })
    }

    /// A single-address prefix (`/32` or `/128`).
    pub fn host(ip: IpAddr) -> Self {
        let len = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        Cidr {
            network: ip,
            prefix_len: len,
        }
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// True for `/32` (IPv4) or `/128` (IPv6).
    pub fn is_host(&self) -> bool {
        match self.network {
            IpAddr::V4(_) => self.prefix_len == 32,
            IpAddr::V6(_) => self.prefix_len == 128,
        }
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.network)
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Cidr::new(*ip, self.prefix_len).is_some_and(|c| c.network == self.network)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Parses `addr/len` sloppily (see [`parse_ip`]); a bare address is not a CIDR.
pub fn parse_cidr(text: &str) -> Option<Cidr> {
    let (ip, len) = text.trim().split_once('/')?;
    let ip = parse_ip(ip)?;
    let len = len.trim();
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Cidr::new(ip, len.parse().ok()?)
}

/// An address under an arbitrary bit mask, as iptables takes `-d addr/mask`
/// with a mask written as an address: `0.0.0.5/0.0.0.63` matches every IPv4
/// address whose low six bits are 5 (`::5/::3f` for IPv6). Prefixes cannot
/// say "low bits", which spread Service addresses evenly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaskedAddr {
    value: u128,
    mask: u128,
    family: IpFamily,
}

impl MaskedAddr {
    /// The addresses of `family` whose low `bits` bits equal `value`.
    pub fn low_bits(family: IpFamily, value: u32, bits: u8) -> Self {
        let mask = (1u128 << bits) - 1;
        MaskedAddr {
            value: u128::from(value) & mask,
            mask,
            family,
        }
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        IpFamily::of(ip) == self.family && bits_of(ip) & self.mask == self.value
    }

    fn address(&self, bits: u128) -> IpAddr {
        match self.family {
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(bits as u32)),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(bits)),
        }
    }
}

/// The low `bits` bits of `ip` (at most 32).
pub fn low_bits_of(ip: &IpAddr, bits: u8) -> u32 {
    (bits_of(ip) & ((1u128 << bits) - 1)) as u32
}

fn bits_of(ip: &IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(*v4)),
        IpAddr::V6(v6) => u128::from(*v6),
    }
}

impl fmt::Display for MaskedAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.address(self.value),
            self.address(self.mask)
        )
    }
}

/// Parses `addr/mask` with the mask written as an address of the same family.
pub fn parse_masked(text: &str) -> Option<MaskedAddr> {
    let (ip, mask) = text.trim().split_once('/')?;
    let (ip, mask) = (parse_ip(ip)?, parse_ip(mask)?);
    let family = IpFamily::of(&ip);
    if IpFamily::of(&mask) != family {
        return None;
    }
    let mask = bits_of(&mask);
    Some(MaskedAddr {
        value: bits_of(&ip) & mask,
        mask,
        family,
    })
}

/// `ip:port` as kube-proxy prints an endpoint (`[ip]:port` for IPv6); this
/// string is also part of the `KUBE-SEP-` hash.
pub fn join_host_port(ip: &IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zeros_and_whitespace_are_normalized() {
        assert_eq!(
            parse_ip(" 010.000.000.001 "),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(parse_ip("fd00::0001"), Some("fd00::1".parse().unwrap()));
        assert_eq!(parse_ip("1.2.3"), None);
        assert_eq!(parse_ip("1.2.3.4.5"), None);
        assert_eq!(parse_ip("256.1.1.1"), None);
        assert_eq!(parse_ip("1.2.3.-4"), None);
        assert_eq!(parse_ip(""), None);
    }

    #[test]
    fn cidrs_are_masked_and_trimmed() {
        let cidr = parse_cidr(" 010.001.002.003/8\t").unwrap();
        assert_eq!(cidr.to_string(), "10.0.0.0/8");
        assert!(cidr.contains(&"10.200.0.1".parse().unwrap()));
        assert!(!cidr.contains(&"11.0.0.1".parse().unwrap()));
        assert!(!cidr.contains(&"::1".parse().unwrap()));
        assert_eq!(parse_cidr("fd00::1/64").unwrap().to_string(), "fd00::/64");
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert!(
            parse_cidr("0.0.0.0/0")
                .unwrap()
                .contains(&"8.8.8.8".parse().unwrap())
        );
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("10.0.0.0"), None);
        assert_eq!(parse_cidr("10.0.0.0/"), None);
    }

    #[test]
    fn masked_addresses_print_and_parse_as_iptables_writes_them() {
        let v4 = MaskedAddr::low_bits(IpFamily::V4, 5, 6);
        assert_eq!(v4.to_string(), "0.0.0.5/0.0.0.63");
        assert!(v4.contains(&"10.96.3.69".parse().unwrap()), "69 = 64 + 5");
        assert!(!v4.contains(&"10.96.3.6".parse().unwrap()));
        assert!(!v4.contains(&"::5".parse().unwrap()));
        assert_eq!(parse_masked("0.0.0.5/0.0.0.63"), Some(v4));
        let v6 = MaskedAddr::low_bits(IpFamily::V6, 63, 6);
        assert_eq!(v6.to_string(), "::3f/::3f");
        assert!(v6.contains(&"fd00::10:ff".parse().unwrap()));
        assert_eq!(parse_masked("::3f/::3f"), Some(v6));
        assert_eq!(parse_masked("0.0.0.5/::3f"), None);
        assert_eq!(
            parse_masked("10.0.0.0/8"),
            None,
            "a prefix length is not a mask"
        );
    }

    #[test]
    fn endpoints_print_like_go_join_host_port() {
        assert_eq!(
            join_host_port(&"10.0.0.1".parse().unwrap(), 80),
            "10.0.0.1:80"
        );
        assert_eq!(
            join_host_port(&"fd00::1".parse().unwrap(), 80),
            "[fd00::1]:80"
        );
    }
}

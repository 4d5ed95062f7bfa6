//! The test pods' program, and the client that probes them.
//!
//! `causeway-echo serve --name POD --port P…` answers every TCP connection and
//! UDP datagram on each port with one line, `<name> <source ip>:<source port>`,
//! so a test sees which pod answered and which client address it saw (masquerade
//! or not).
//!
//! `causeway-echo probe --tcp|--udp ADDR:PORT [--count N] [--bind IP]` connects
//! and prints one line per attempt: `ok <reply>`, `refused` (RST or ICMP port
//! unreachable: REJECT), `timeout` (no answer: DROP) or `error <text>`. With
//! `--count` it prints a tally instead, one `<count> <result>` line per outcome.
//!
//! `causeway-echo connect-time ADDR:PORT [--count N] [--raw]` opens N TCP
//! connections one after another and prints the connect time's median, p90 and
//! p99 in µs and the number that failed; `--raw` adds a second line with every
//! time, so a caller can pool several runs.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

fn usage() -> ExitCode {
    eprintln!(
        "usage: causeway-echo serve --name NAME --port PORT [--port PORT…]\n       \
         causeway-echo probe (--tcp|--udp) ADDR:PORT [--count N] [--bind IP] [--source-port N] [--timeout-ms MS] [--tally-by-name] [--interval-ms MS]\n       \
         causeway-echo connect-time ADDR:PORT [--count N] [--raw]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("probe") => probe(&args[1..]),
        Some("connect-time") => connect_time(&args[1..]),
        _ => usage(),
    }
}

fn serve(args: &[String]) -> ExitCode {
    let mut name = None;
    let mut ports = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--name", Some(v)) => name = Some(v.clone()),
            ("--port", Some(v)) => match v.parse::<u16>() {
                Ok(p) => ports.push(p),
                Err(_) => return usage(),
            },
            _ => return usage(),
        }
    }
    let Some(name) = name else { return usage() };
    if ports.is_empty() {
        return usage();
    }
    let mut workers = Vec::new();
    for port in ports {
        // One dual-stack socket per protocol: [::] also accepts IPv4 clients
        // (as v4-mapped addresses, which `canonical` turns back into IPv4).
        let bind: SocketAddr = (IpAddr::from([0u16; 8]), port).into();
        let tcp = match TcpListener::bind(bind).or_else(|_| TcpListener::bind(("0.0.0.0", port))) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("causeway-echo: cannot listen on tcp port {port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let udp = match UdpSocket::bind(bind).or_else(|_| UdpSocket::bind(("0.0.0.0", port))) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("causeway-echo: cannot listen on udp port {port}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let tcp_name = name.clone();
        workers.push(thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                let name = tcp_name.clone();
                thread::spawn(move || answer_tcp(stream, &name));
            }
        }));
        let udp_name = name.clone();
        workers.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let reply = format!("{udp_name} {}\n", canonical(from));
                let _ = udp.send_to(reply.as_bytes(), from);
            }
        }));
    }
    println!("causeway-echo: {name} serving");
    for w in workers {
        let _ = w.join();
    }
    ExitCode::SUCCESS
}

fn answer_tcp(mut stream: TcpStream, name: &str) {
    if let Ok(peer) = stream.peer_addr() {
        let _ = stream.write_all(format!("{name} {}\n", canonical(peer)).as_bytes());
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// TCP connect latency (SYN to established), measured `count` times one
/// after another: prints `median_us p90_us p99_us failures`.
fn connect_time(args: &[String]) -> ExitCode {
    let Some(target) = args.first().and_then(|a| a.parse::<SocketAddr>().ok()) else {
        return usage();
    };
    let mut count = 1000;
    let mut raw = false;
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--count" => match it.next().and_then(|v| v.parse::<usize>().ok()) {
                Some(n) if n > 0 => count = n,
                _ => return usage(),
            },
            "--raw" => raw = true,
            _ => return usage(),
        }
    }
    let mut times = Vec::with_capacity(count);
    let mut failures = 0;
    for _ in 0..count {
        let start = std::time::Instant::now();
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(stream) => {
                times.push(start.elapsed().as_micros());
                drop(stream);
            }
            Err(_) => failures += 1,
        }
    }
    times.sort_unstable();
    let at = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!("{} {} {} {failures}", at(0.5), at(0.9), at(0.99));
    if raw {
        let all: Vec<String> = times.iter().map(u128::to_string).collect();
        println!("{}", all.join(" "));
    }
    ExitCode::SUCCESS
}

struct Probe {
    target: SocketAddr,
    udp: bool,
    bind: Option<IpAddr>,
    /// UDP: send from this source port, so repeated probes share one
    /// conntrack entry, as a long-lived UDP client would.
    source_port: u16,
    timeout: Duration,
}

fn probe(args: &[String]) -> ExitCode {
    let mut target = None;
    let mut udp = false;
    let mut count = None;
    let mut bind = None;
    let mut source_port = 0;
    let mut timeout = Duration::from_millis(1500);
    let mut tally_by_name = false;
    let mut interval = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let parsed = match flag.as_str() {
            "--tally-by-name" => {
                tally_by_name = true;
                Some(())
            }
            "--tcp" | "--udp" => {
                udp = flag == "--udp";
                it.next()
                    .and_then(|v| v.parse().ok())
                    .map(|a| target = Some(a))
            }
            "--count" => it
                .next()
                .and_then(|v| v.parse().ok())
                .map(|n: usize| count = Some(n)),
            "--bind" => it
                .next()
                .and_then(|v| v.parse().ok())
                .map(|ip| bind = Some(ip)),
            "--source-port" => it
                .next()
                .and_then(|v| v.parse().ok())
                .map(|p| source_port = p),
            "--timeout-ms" => it
                .next()
                .and_then(|v| v.parse().ok())
                .map(|ms| timeout = Duration::from_millis(ms)),
            "--interval-ms" => it
                .next()
                .and_then(|v| v.parse().ok())
                .map(|ms| interval = Some(Duration::from_millis(ms))),
            _ => None,
        };
        if parsed.is_none() {
            return usage();
        }
    }
    let Some(target) = target else { return usage() };
    let p = Probe {
        target,
        udp,
        bind,
        source_port,
        timeout,
    };
    match count {
        None => {
            let line = p.once();
            println!("{line}");
            ExitCode::SUCCESS
        }
        Some(n) => {
            let mut tally: BTreeMap<String, usize> = BTreeMap::new();
            let started = std::time::Instant::now();
            for i in 0..n {
                // Paced: attempt i starts i intervals after the first.
                if let Some(interval) = interval {
                    let due = started + interval * u32::try_from(i).unwrap_or(u32::MAX);
                    std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
                }
                let mut line = p.once();
                if tally_by_name && line.starts_with("ok ") {
                    // Keep only the pod name: the source port differs each time.
                    line = line
                        .split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ");
                }
                *tally.entry(line).or_default() += 1;
            }
            for (line, n) in tally {
                println!("{n} {line}");
            }
            ExitCode::SUCCESS
        }
    }
}

impl Probe {
    fn once(&self) -> String {
        let result = if self.udp {
            self.udp_once()
        } else {
            self.tcp_once()
        };
        match result {
            Ok(reply) => format!("ok {}", reply.trim_end()),
            Err(e) => match e.kind() {
                ErrorKind::ConnectionRefused => "refused".to_string(),
                ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout".to_string(),
                _ => format!("error {e}"),
            },
        }
    }

    fn tcp_once(&self) -> std::io::Result<String> {
        let mut stream = match self.bind {
            None => TcpStream::connect_timeout(&self.target, self.timeout)?,
            Some(ip) => bound_connect(ip, self.target, self.timeout)?,
        };
        stream.set_read_timeout(Some(self.timeout))?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        if reply.is_empty() {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed without a reply",
            ));
        }
        Ok(reply)
    }

    fn udp_once(&self) -> std::io::Result<String> {
        let local: SocketAddr = match (self.bind, self.target) {
            (Some(ip), _) => (ip, self.source_port).into(),
            (None, SocketAddr::V4(_)) => ([0, 0, 0, 0], self.source_port).into(),
            (None, SocketAddr::V6(_)) => (IpAddr::from([0u16; 8]), self.source_port).into(),
        };
        let sock = UdpSocket::bind(local)?;
        sock.connect(self.target)?;
        sock.set_read_timeout(Some(self.timeout))?;
        sock.send(b"ping\n")?;
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// Connects from a chosen source address (bind before connect), so one client
/// namespace holding several addresses can test source-range rules.
fn bound_connect(ip: IpAddr, target: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(target);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect_timeout(&target.into(), timeout)?;
    Ok(socket.into())
}

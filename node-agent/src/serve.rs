//! Serving the agent's HTTP ports, which anything on the network can reach:
//! a deadline for the request head, a lifetime per connection, and caps on
//! open connections, per port and over all ports, so that slow or idle
//! clients cannot hold the agent's file descriptors or keep health answers
//! from being read. At either cap a new connection is let in, and the
//! busiest client's oldest connection is closed instead: a probe always gets
//! in, and a client that holds or floods connections only churns its own, on
//! any number of ports.
//!
//! `axum::serve` sets none of these (it gives hyper no timer, so even hyper's
//! own header timeout never fires), hence this small accept loop.
//!
//! The sockets are opened as Go opens kube-proxy's ([`listen`]): an
//! unspecified address takes both IP families.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tracing::debug;

/// A client must send its whole request head within this. Load balancers'
/// probes and scrapers send theirs at once.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection stays open longer, idle keep-alive included; a scraper
/// simply opens a new one.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Open connections per listening port: one port's clients cannot use up
/// what another port's need.
pub const CONNECTIONS_PER_PORT: usize = 64;
/// Open connections over all ports, well under the usual 1 024 open files.
pub const CONNECTIONS_TOTAL: usize = 512;

/// How long a new connection waits for the socket of one closed to make room
/// for it to be gone (its task dropped, which the runtime does promptly).
const SOCKET_RELEASE_WAIT: Duration = Duration::from_secs(1);

/// The open connections of every server of one agent.
#[derive(Debug, Clone)]
pub struct ConnectionBudget {
    /// The connections, oldest first.
    open: Arc<Mutex<OpenConnections>>,
    /// One permit per socket, held by its connection's task until the task
    /// is dropped. A connection closed to make room leaves the list at once
    /// but keeps its permit until its socket is really closed, so there are
    /// never more sockets than the budget, however fast clients connect.
    sockets: Arc<Semaphore>,
}

impl ConnectionBudget {
    /// At most `total` connections over all ports.
    pub fn new(total: usize) -> Self {
        ConnectionBudget {
            open: Arc::new(Mutex::new(OpenConnections {
                total,
                ..OpenConnections::default()
            })),
            sockets: Arc::new(Semaphore::new(total)),
        }
    }

    /// A new port, as the per-port cap counts them; the sockets of one
    /// port (one per address) share it through [`serve_port`].
    pub fn port_id(&self) -> u64 {
        self.lock().next_id()
    }

    fn lock(&self) -> MutexGuard<'_, OpenConnections> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for ConnectionBudget {
    fn default() -> Self {
        ConnectionBudget::new(CONNECTIONS_TOTAL)
    }
}

/// The address a client reached the agent at: the client is on this node
/// when its own address is this one.
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub SocketAddr);

#[derive(Debug)]
struct Connection {
    id: u64,
    /// Which `serve` (listening port) it belongs to.
    port: u64,
    /// The client's address, and its group: the address itself for IPv4,
    /// its /64 for IPv6.
    client: IpAddr,
    group: IpAddr,
    task: AbortHandle,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    next_id: u64,
    open: VecDeque<Connection>,
    /// Accept loops that made room and wait for a socket to be freed: they
    /// count against the total, or another port's loop would wait for the
    /// same socket instead of making room of its own.
    reserved: usize,
}

impl OpenConnections {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Makes room for one more connection on `port`: closes connections
    /// while the port or the whole is at its cap.
    fn make_room(&mut self, port: u64) {
        loop {
            let on_port = self.open.iter().filter(|c| c.port == port).count();
            let evicted = if on_port >= CONNECTIONS_PER_PORT {
                self.evict(|c| c.port == port)
            } else if self.open.len() + self.reserved >= self.total {
                self.evict(|_| true)
            } else {
                return;
            };
            match evicted {
                // Dropping the task closes the socket.
                Some(task) => task.abort(),
                None => return,
            }
        }
    }

    /// Takes off the list, among the connections `among` picks, the oldest
    /// of the busiest client: the one whose group (IPv6 /64) holds the most
    /// of them, and within that, whose address does; the oldest on a tie.
    /// Closing simply the oldest would let a client that opens connections
    /// faster than a probe sends its request close the probe's; going by the
    /// group alone would let a pod close the probes of its own /64 (one
    /// subnet in a VPC).
    fn evict(&mut self, among: impl Fn(&Connection) -> bool) -> Option<AbortHandle> {
        let mut groups: HashMap<IpAddr, usize> = HashMap::new();
        let mut clients: HashMap<IpAddr, usize> = HashMap::new();
        for connection in self.open.iter().filter(|c| among(c)) {
            *groups.entry(connection.group).or_default() += 1;
            *clients.entry(connection.client).or_default() += 1;
        }
        let mut chosen: Option<(usize, (usize, usize))> = None;
        for (position, connection) in self.open.iter().enumerate() {
            if !among(connection) {
                continue;
            }
            let weight = (groups[&connection.group], clients[&connection.client]);
            if chosen.is_none_or(|(_, best)| weight > best) {
                chosen = Some((position, weight));
            }
        }
        let (position, _) = chosen?;
        self.open.remove(position).map(|c| c.task)
    }
}

/// The room an accept loop made for a new connection, counted against the
/// total while the loop waits for a socket. Dropped unreleased (the server
/// stopped during the wait: a Service's health check went away), it gives
/// the room back itself.
struct Reservation {
    budget: ConnectionBudget,
    held: bool,
}

impl Reservation {
    fn make(budget: &ConnectionBudget, port: u64) -> Self {
        let mut open = budget.lock();
        open.make_room(port);
        open.reserved += 1;
        Reservation {
            budget: budget.clone(),
            held: true,
        }
    }

    /// Gives the room to the connection being listed under `open`.
    fn release(mut self, open: &mut OpenConnections) {
        open.reserved -= 1;
        self.held = false;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held {
            self.budget.lock().reserved -= 1;
        }
    }
}

/// The address a connection counts against: an IPv4 client's own (mapped
/// ones included), an IPv6 client's /64, which one host usually has whole.
fn client_group(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

/// The addresses of this node's interfaces (none when they cannot be read).
pub fn local_addresses() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces.iter().map(|i| i.ip()).collect(),
        Err(e) => {
            debug!(error = %e, "cannot list the interfaces' addresses");
            Vec::new()
        }
    }
}

/// Serves `router` on `listener` until the task is dropped. Handlers can
/// read the client's address with `ConnectInfo<SocketAddr>`, and the address
/// it connected to with `Extension<LocalAddr>`.
pub async fn serve(listener: TcpListener, router: Router, budget: ConnectionBudget) {
    let port = budget.port_id();
    serve_port(listener, router, budget, port).await;
}

/// [`serve`], counting the connections against port `port` (a
/// [`ConnectionBudget::port_id`]).
pub async fn serve_port(
    listener: TcpListener,
    router: Router,
    budget: ConnectionBudget,
    port: u64,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors or a reset before accept: keep serving.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A dual-stack socket (see [`listen`]) sees IPv4 clients as
        // IPv4-mapped IPv6 addresses; handlers and the caps want them plain.
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let peer = canonical(peer);
        let local = canonical(stream.local_addr().unwrap_or(peer));
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(ConnectInfo::<SocketAddr>(peer)))
                .layer(axum::Extension(LocalAddr(local))),
        );
        let reservation = Reservation::make(&budget, port);
        let socket =
            tokio::time::timeout(SOCKET_RELEASE_WAIT, budget.sockets.clone().acquire_owned()).await;
        // Held while the task is spawned and listed: a task that ends at
        // once waits here before it takes itself off the list. (This loop
        // alone adds to this port, so the room made above is still there.)
        let mut open = budget.lock();
        reservation.release(&mut open);
        let Ok(Ok(socket)) = socket else {
            debug!(%peer, "no socket freed in time; closing a new connection");
            continue;
        };
        let id = open.next_id();
        let registry = budget.clone();
        let task = tokio::spawn(async move {
            let _socket = socket;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            registry.lock().open.retain(|c| c.id != id);
        });
        open.open.push_back(Connection {
            id,
            port,
            client: peer.ip(),
            group: client_group(peer.ip()),
            task: task.abort_handle(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::routing::get;
    use causeway_telemetry::listen::listen;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn handlers_see_ipv4_clients_of_a_dual_stack_socket_as_ipv4() {
        let listener = listen("0.0.0.0:0".parse().unwrap(), false).unwrap();
        let port = listener.local_addr().unwrap().port();
        let router = Router::new().route(
            "/",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
        );
        tokio::spawn(serve(listener, router, ConnectionBudget::default()));
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.ends_with("\r\n\r\n127.0.0.1"), "{answer}");
    }

    async fn started(budget: ConnectionBudget) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        );
        tokio::spawn(serve(listener, router, budget));
        address
    }

    /// The answer to `GET /`; empty when the server closed (or reset) the
    /// connection without one.
    async fn get_root(address: SocketAddr) -> String {
        ask(&mut tokio::net::TcpStream::connect(address).await.unwrap()).await
    }

    /// Sends `GET /` on a connection already open: the answer, or empty.
    async fn ask(stream: &mut tokio::net::TcpStream) -> String {
        let mut answer = String::new();
        if stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .is_ok()
        {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut answer))
                    .await;
        }
        answer
    }

    /// A connection to `address` from the loopback address `client`.
    async fn connect_from(client: &str, address: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{client}:0").parse().unwrap()).unwrap();
        socket.connect(address).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_sent_request_is_closed_after_the_header_deadline() {
        let address = started(ConnectionBudget::default()).await;
        let mut slow = tokio::net::TcpStream::connect(address).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").await.unwrap();
        let started = tokio::time::Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(HEADER_READ_TIMEOUT * 3, slow.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "still open after three times the deadline");
        let waited = started.elapsed();
        assert!(
            waited >= HEADER_READ_TIMEOUT && waited < HEADER_READ_TIMEOUT * 2,
            "closed after {waited:?}"
        );
    }

    #[tokio::test]
    async fn a_full_port_closes_its_oldest_connection_for_a_new_one() {
        let address = started(ConnectionBudget::default()).await;
        let mut idle = Vec::new();
        for _ in 0..CONNECTIONS_PER_PORT {
            idle.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        // Every slot is held by an idle client, yet a new request is answered,
        // and the client that waited longest is the one let go.
        let answer = get_root(address).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("\r\n\r\n127.0.0.1:"),
            "the handler sees the client: {answer}"
        );
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(2), idle[0].read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the oldest idle connection is still open");
        // The newest idle one is not.
        let last = idle.last_mut().unwrap();
        let open =
            tokio::time::timeout(Duration::from_millis(200), last.read_to_end(&mut rest)).await;
        assert!(
            open.is_err(),
            "a newer idle connection was closed: {open:?}"
        );
    }

    #[tokio::test]
    async fn a_flood_from_one_address_closes_only_its_own_connections() {
        let address = started(ConnectionBudget::default()).await;
        // A probe from another address connects first, and is the oldest
        // connection when one address fills the port.
        let mut probe = connect_from("127.0.0.2", address).await;
        let mut flood = Vec::new();
        for _ in 0..CONNECTIONS_PER_PORT * 2 {
            flood.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        // Until the server has accepted them all (an answer proves the
        // accept loop got past every earlier connection).
        assert!(get_root(address).await.starts_with("HTTP/1.1 200"));
        let answer = ask(&mut probe).await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("127.0.0.2:"),
            "the probe's connection was closed by the flood: {answer:?}"
        );
        // The flood's first connections went instead.
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(2), flood[0].read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "the flood's oldest connection is still open"
        );
    }

    #[tokio::test]
    async fn the_shared_budget_caps_all_ports_together() {
        let budget = ConnectionBudget::new(2);
        let first = started(budget.clone()).await;
        let second = started(budget.clone()).await;
        let mut a = tokio::net::TcpStream::connect(first).await.unwrap();
        let _b = tokio::net::TcpStream::connect(first).await.unwrap();
        // Until the server has accepted both.
        while budget.lock().open.len() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The other port still answers: the oldest idle connection makes room.
        assert!(get_root(second).await.starts_with("HTTP/1.1 200"));
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), a.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the oldest connection is still open");
    }

    #[test]
    fn the_busiest_group_then_its_busiest_address_loses_its_oldest() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut open = OpenConnections {
            total: 8,
            ..OpenConnections::default()
        };
        for client in [
            // A probe, then a pod flooding from the same /64, then another
            // client elsewhere.
            "2001:db8:0:1::100",
            "2001:db8:0:1::7",
            "2001:db8:0:1::7",
            "2001:db8:0:1::7",
            "2001:db8:0:2::1",
            "2001:db8:0:2::1",
        ] {
            let client: IpAddr = client.parse().unwrap();
            let id = open.next_id();
            let task = runtime.spawn(std::future::pending::<()>()).abort_handle();
            open.open.push_back(Connection {
                id,
                port: 1,
                client,
                group: client_group(client),
                task,
            });
        }
        let left = |open: &OpenConnections| {
            open.open
                .iter()
                .map(|c| c.client.to_string())
                .collect::<Vec<_>>()
        };
        open.evict(|_| true).unwrap();
        // The flood's oldest went, not the older probe in its /64.
        assert_eq!(
            left(&open),
            [
                "2001:db8:0:1::100",
                "2001:db8:0:1::7",
                "2001:db8:0:1::7",
                "2001:db8:0:2::1",
                "2001:db8:0:2::1"
            ]
        );
        open.evict(|_| true).unwrap();
        open.evict(|_| true).unwrap();
        // The flood's next; then, the groups even (two and two), the
        // address holding two rather than the probe.
        assert_eq!(
            left(&open),
            ["2001:db8:0:1::100", "2001:db8:0:1::7", "2001:db8:0:2::1"]
        );
    }

    #[test]
    fn a_reservation_dropped_unreleased_gives_its_room_back() {
        let budget = ConnectionBudget::new(4);
        let reservation = Reservation::make(&budget, 1);
        assert_eq!(budget.lock().reserved, 1);
        drop(reservation);
        assert_eq!(budget.lock().reserved, 0);
        let reservation = Reservation::make(&budget, 1);
        let mut open = budget.lock();
        reservation.release(&mut open);
        assert_eq!(open.reserved, 0);
    }

    #[test]
    fn an_ipv6_client_counts_by_its_slash_64() {
        let group = |ip: &str| client_group(ip.parse().unwrap()).to_string();
        assert_eq!(group("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(group("2001:db8:1:2:bbbb::7"), "2001:db8:1:2::");
        assert_eq!(group("::ffff:10.0.0.5"), "10.0.0.5");
        assert_eq!(group("10.0.0.5"), "10.0.0.5");
    }

    #[tokio::test]
    async fn a_flood_over_many_ports_closes_only_its_own_connections() {
        // One client holds every slot of the whole budget over several
        // ports; a probe from another address to yet another port is
        // answered, and no connection of another client is closed for it.
        let budget = ConnectionBudget::new(CONNECTIONS_PER_PORT * 3);
        let flooded: Vec<SocketAddr> = started_ports(&budget, 3).await;
        let probed = started(budget.clone()).await;
        let mut bystander = connect_from("127.0.0.3", probed).await;
        let mut flood = Vec::new();
        for port in &flooded {
            for _ in 0..CONNECTIONS_PER_PORT {
                flood.push(tokio::net::TcpStream::connect(port).await.unwrap());
            }
        }
        while budget.lock().open.len() < CONNECTIONS_PER_PORT * 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut probe = connect_from("127.0.0.2", probed).await;
        let answer = ask(&mut probe).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        let answer = ask(&mut bystander).await;
        assert!(
            answer.contains("127.0.0.3:"),
            "the other client's idle connection was closed: {answer:?}"
        );
    }

    async fn started_ports(budget: &ConnectionBudget, count: usize) -> Vec<SocketAddr> {
        let mut ports = Vec::new();
        for _ in 0..count {
            ports.push(started(budget.clone()).await);
        }
        ports
    }
}

//! Serving the agent's HTTP ports, which anything on the network can reach:
//! a deadline for the request head, a lifetime per connection, and caps on
//! open connections, so that slow or idle clients cannot hold the agent's
//! file descriptors or keep health answers from being read. A port that is
//! full closes its oldest connection for a new one: a probe always gets in,
//! and a client that holds connections open only churns them.
//!
//! `axum::serve` sets none of these (it gives hyper no timer, so even hyper's
//! own header timeout never fires), hence this small accept loop.

use std::collections::VecDeque;
use std::net::SocketAddr;
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
/// what another port's need. A new connection beyond it closes the oldest.
pub const CONNECTIONS_PER_PORT: usize = 64;
/// Open connections over all ports, well under the usual 1 024 open files;
/// beyond it a new connection is closed at once.
pub const CONNECTIONS_TOTAL: usize = 512;

/// Connection slots shared by every server of one agent.
#[derive(Debug, Clone)]
pub struct ConnectionBudget(Arc<Semaphore>);

impl ConnectionBudget {
    pub fn new(total: usize) -> Self {
        ConnectionBudget(Arc::new(Semaphore::new(total)))
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

/// One port's open connections, oldest first.
#[derive(Default)]
struct OpenConnections {
    next_id: u64,
    open: VecDeque<(u64, AbortHandle)>,
}

fn lock(open: &Mutex<OpenConnections>) -> MutexGuard<'_, OpenConnections> {
    open.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves `router` on `listener` until the task is dropped. Handlers can
/// read the client's address with `ConnectInfo<SocketAddr>`, and the address
/// it connected to with `Extension<LocalAddr>`.
pub async fn serve(listener: TcpListener, router: Router, budget: ConnectionBudget) {
    let connections = Arc::new(Mutex::new(OpenConnections::default()));
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
        let Ok(total_slot) = budget.0.clone().try_acquire_owned() else {
            debug!(%peer, "too many open connections on all ports; closing a new one");
            continue;
        };
        let local = stream.local_addr().unwrap_or(peer);
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(ConnectInfo::<SocketAddr>(peer)))
                .layer(axum::Extension(LocalAddr(local))),
        );
        // Held while the task is spawned and listed: a task that ends at
        // once waits here before it takes itself off the list.
        let mut open = lock(&connections);
        if open.open.len() >= CONNECTIONS_PER_PORT
            && let Some((_, oldest)) = open.open.pop_front()
        {
            // Dropping the task closes the socket and frees its slot.
            oldest.abort();
            debug!(%peer, "port full; closed its oldest connection");
        }
        open.next_id += 1;
        let id = open.next_id;
        let registry = connections.clone();
        let task = tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(total_slot);
            lock(&registry).open.retain(|(open_id, _)| *open_id != id);
        });
        open.open.push_back((id, task.abort_handle()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut answer = String::new();
        if stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .is_ok()
        {
            let _ = stream.read_to_string(&mut answer).await;
        }
        answer
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
    async fn the_shared_budget_caps_all_ports_together() {
        let budget = ConnectionBudget::new(2);
        let first = started(budget.clone()).await;
        let second = started(budget.clone()).await;
        let _a = tokio::net::TcpStream::connect(first).await.unwrap();
        let _b = tokio::net::TcpStream::connect(first).await.unwrap();
        // Until the server has accepted both.
        while budget.0.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(get_root(second).await, "", "the other port took a third");
    }
}

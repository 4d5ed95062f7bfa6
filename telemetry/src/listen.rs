//! Listening sockets for both programs' metrics and health servers, opened
//! as Go's `net.Listen("tcp", …)` opens kube-proxy's and client-go
//! controllers': an unspecified address takes both IP families.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpListener;

/// Opens a listening socket on `address` as Go's `net.Listen("tcp", …)`,
/// which kube-proxy's servers use, does. An unspecified address (`0.0.0.0`
/// or `[::]`) listens on both families through one IPv6 socket that takes
/// IPv4 clients too, whatever the node's `net.ipv6.bindv6only`, or on IPv4
/// alone where the node has no IPv6. With `family_only`, an unspecified
/// address keeps to its own family, so that specific addresses of the other
/// family can be bound beside it on the same port.
pub fn listen(address: SocketAddr, family_only: bool) -> std::io::Result<TcpListener> {
    if address.ip().is_unspecified() && !family_only {
        let both = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), address.port());
        match open_listener(both, Some(false)) {
            Err(e) if no_ipv6(&e) => {
                tracing::warn!(error = %e, port = address.port(), "no IPv6 here; listening on IPv4 alone");
                let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), address.port());
                return open_listener(v4, None);
            }
            opened => return opened,
        }
    }
    open_listener(address, address.is_ipv6().then_some(true))
}

/// The errors of a node without IPv6 (the kernel's `ipv6.disable=1`, or no
/// IPv6 module), as Linux numbers them; any other error is the caller's.
fn no_ipv6(error: &std::io::Error) -> bool {
    const EPROTONOSUPPORT: i32 = 93;
    const EAFNOSUPPORT: i32 = 97;
    const EADDRNOTAVAIL: i32 = 99;
    matches!(
        error.raw_os_error(),
        Some(EPROTONOSUPPORT | EAFNOSUPPORT | EADDRNOTAVAIL)
    )
}

fn open_listener(address: SocketAddr, v6_only: Option<bool>) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(only) = v6_only {
        socket.set_only_v6(only)?;
    }
    // As tokio's and Go's listeners: a restart need not wait for the old
    // connections' TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::net::TcpStream;

    #[tokio::test]
    async fn an_unspecified_address_listens_on_both_families_as_go_does() {
        let both = listen("0.0.0.0:0".parse().unwrap(), false).unwrap();
        let port = both.local_addr().unwrap().port();
        assert!(TcpStream::connect(("127.0.0.1", port)).await.is_ok());
        assert!(TcpStream::connect(("::1", port)).await.is_ok());
        let (_, peer) = both.accept().await.unwrap();
        assert!(peer.is_ipv6(), "IPv4 clients arrive mapped: {peer}");
        let v4 = listen("0.0.0.0:0".parse().unwrap(), true).unwrap();
        let port = v4.local_addr().unwrap().port();
        assert!(TcpStream::connect(("127.0.0.1", port)).await.is_ok());
        assert!(TcpStream::connect(("::1", port)).await.is_err());
        // Family-only, the IPv6 wildcard leaves the port's IPv4 side free.
        let v6 = listen("[::]:0".parse().unwrap(), true).unwrap();
        let port = v6.local_addr().unwrap().port();
        assert!(listen(SocketAddr::from(([127, 0, 0, 1], port)), true).is_ok());
    }
}

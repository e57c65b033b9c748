//! Byte-stream transport: the small set of socket operations the ring backend
//! and other network code need, behind traits so that a simulated network can
//! stand in for the real one.
//!
//! [`TokioNet`] implements the traits over tokio TCP. A simulated
//! implementation (over `turmoil::net`) implements the same traits and returns
//! the same [`io::ErrorKind`] values, listed on each method, so code above the
//! traits cannot tell them apart.
//!
//! Addresses are [`SocketAddr`] values. A listener binds the address it is
//! given, which need not be the address other hosts use to reach it: the ring
//! backend keeps the advertised address (from the hostfile) and the bind
//! address apart, because a simulator may bind only `0.0.0.0` or localhost.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

/// A network on which a process can listen for and open byte streams.
///
/// Implementations are cheap handles (`Clone`) shared by every task of a
/// process.
pub trait Net: Clone + Send + Sync + 'static {
    /// A connected, bidirectional byte stream.
    ///
    /// Reading returns `Ok(0)` once the peer has closed its side. Reading or
    /// writing after the peer reset the connection or exited fails with
    /// [`io::ErrorKind::ConnectionReset`] or [`io::ErrorKind::BrokenPipe`].
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// A bound listening socket.
    type Listener: Listener<Stream = Self::Stream>;

    /// Binds a listening socket to `addr` (port 0 picks a free port).
    ///
    /// Errors: [`io::ErrorKind::AddrInUse`] when another socket already
    /// listens on the port, [`io::ErrorKind::AddrNotAvailable`] when the IP
    /// is not an address of this host, [`io::ErrorKind::PermissionDenied`]
    /// for a privileged port.
    fn bind(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// Opens a stream to `addr`, with Nagle's algorithm disabled.
    ///
    /// Errors: [`io::ErrorKind::ConnectionRefused`] when nothing listens on
    /// `addr` yet (callers may retry), [`io::ErrorKind::TimedOut`],
    /// [`io::ErrorKind::HostUnreachable`] or
    /// [`io::ErrorKind::NetworkUnreachable`] when the host cannot be reached.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// A listening socket returned by [`Net::bind`].
pub trait Listener: Send + 'static {
    /// The stream type of accepted connections.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next connection and returns it with the peer's address.
    ///
    /// The stream has Nagle's algorithm disabled. Cancel-safe: dropping the
    /// future loses no connection. Errors are per-connection failures such as
    /// [`io::ErrorKind::ConnectionAborted`]; the listener stays usable.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;

    /// The address the socket is bound to, with the real port when port 0
    /// was requested.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// The real network: tokio TCP sockets.
///
/// Listeners set `SO_REUSEADDR` (so a port in `TIME_WAIT` from an earlier job
/// can be bound again) but never `SO_REUSEPORT`, so binding a port on which
/// another process listens fails with [`io::ErrorKind::AddrInUse`] instead of
/// sharing its connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioNet;

impl Net for TokioNet {
    type Stream = tokio::net::TcpStream;
    type Listener = TokioListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<TokioListener> {
        let inner = tokio::net::TcpListener::bind(addr).await?;
        Ok(TokioListener { inner })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// A tokio TCP listener; see [`TokioNet`].
#[derive(Debug)]
pub struct TokioListener {
    inner: tokio::net::TcpListener,
}

impl Listener for TokioListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(tokio::net::TcpStream, SocketAddr)> {
        let (stream, peer) = self.inner.accept().await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn tokio_net_carries_bytes_both_ways() {
        let net = TokioNet;
        let mut listener = net.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        assert_ne!(addr.port(), 0);

        let (client, accepted) = tokio::join!(net.connect(addr), listener.accept());
        let mut client = client.unwrap();
        let (mut server, _peer) = accepted.unwrap();

        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[tokio::test]
    async fn tokio_net_bind_of_busy_port_is_addr_in_use() {
        let net = TokioNet;
        let listener = net.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();

        let err = net.bind(addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[tokio::test]
    async fn tokio_net_connect_without_listener_is_refused() {
        let net = TokioNet;
        let addr = {
            let listener = net.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            listener.local_addr().unwrap()
        };

        let err = net.connect(addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }
}

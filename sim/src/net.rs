//! [`SimNet`]: the launcher's byte-stream traits over `turmoil::net`, so the
//! ring backend runs unchanged on simulated hosts.
//!
//! Error kinds match [`TokioNet`](ringleader::net::TokioNet): turmoil itself
//! reports `AddrInUse`, `AddrNotAvailable` (it binds only `0.0.0.0` and
//! localhost, which is why ranks set `RingOptions::bind_ip`),
//! `ConnectionRefused`, `ConnectionReset` and `BrokenPipe`. A turmoil
//! connect to a crashed host waits forever, where a real one gives up after
//! the kernel's SYN retries, so `connect` adds that limit and returns
//! [`io::ErrorKind::TimedOut`].
//!
//! NOTE: one kind still differs. turmoil drops a SYN at a partition together
//! with its reply channel, so a connect across a partition fails at once
//! with `ConnectionRefused`, where real TCP would time out. Callers that
//! retry refused connections (the ring backend does, until its connect
//! timeout) behave the same; only the error text and timing differ.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ringleader::net::{Listener, Net};
use turmoil::net::{TcpListener, TcpStream};

/// How long a connect waits for the peer's SYN-ACK by default. Linux gives
/// up after about two minutes; the simulation uses a shorter, fixed limit.
pub const DEFAULT_SYN_TIMEOUT: Duration = Duration::from_secs(10);

/// The simulated network; usable only inside a turmoil host.
#[derive(Clone, Copy, Debug)]
pub struct SimNet {
    /// How long `connect` waits before failing with `TimedOut`.
    pub syn_timeout: Duration,
}

impl Default for SimNet {
    fn default() -> Self {
        SimNet {
            syn_timeout: DEFAULT_SYN_TIMEOUT,
        }
    }
}

impl Net for SimNet {
    type Stream = TcpStream;
    type Listener = SimListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<SimListener> {
        let inner = TcpListener::bind(addr).await?;
        Ok(SimListener { inner })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = match tokio::time::timeout(self.syn_timeout, TcpStream::connect(addr)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out"),
                ));
            }
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// A turmoil TCP listener; see [`SimNet`].
pub struct SimListener {
    inner: TcpListener,
}

impl Listener for SimListener {
    type Stream = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = self.inner.accept().await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

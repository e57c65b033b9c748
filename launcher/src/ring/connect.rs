//! Forming the ring: listening, accepting and connecting, with deadlines.
//!
//! MLX forms the ring in a fixed order. Every rank but the last accepts one
//! connection on each of its own addresses, in order, then connects once to
//! each address of its right neighbour, in order. The last rank connects
//! first and accepts afterwards. Each accepted connection becomes the left
//! socket with the same index, each opened one the right socket.
//!
//! This module keeps that pairing (connection `k` to the right is the right
//! neighbour's accepted connection `k`) but binds all of its listeners first
//! and then accepts and connects at the same time, which meets an MLX peer in
//! whatever order it works and cannot deadlock. Unlike MLX it retries
//! connecting with backoff until a deadline instead of five times, gives up
//! accepting at the same deadline instead of waiting forever, and keeps its
//! listeners open after the ring is formed so that a connection from another
//! job that reuses the same ports is closed at once instead of being taken
//! for a neighbour.

use std::io;
use std::net::SocketAddr;

use tokio::io::{ReadHalf, WriteHalf};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use super::config::{AddressTable, RingOptions};
use super::error::RingError;
use crate::net::{Listener, Net};

/// First pause between two connection attempts; it doubles up to
/// [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(10);
const MAX_RETRY_DELAY: Duration = Duration::from_millis(500);

/// One TCP connection to a neighbour, split so that two passes can use its
/// two directions at once.
pub(crate) struct Link<S> {
    pub reader: ReadHalf<S>,
    pub writer: WriteHalf<S>,
    /// Rank at the other end.
    pub peer: usize,
    /// Address at the other end: the neighbour's listening address for a
    /// connection this rank opened, the neighbour's source address for an
    /// accepted one.
    pub addr: SocketAddr,
}

/// The connections of a formed ring.
pub(crate) struct Links<S> {
    /// Connections accepted from the left neighbour, in address order.
    pub left: Vec<Link<S>>,
    /// Connections opened to the right neighbour, in address order.
    pub right: Vec<Link<S>>,
}

/// Background tasks that keep this rank's listeners open after the ring is
/// formed and close every further connection; aborted on drop.
pub(crate) struct ListenerGuard {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds one listener per address (or per port on `options.bind_ip`), in
/// order.
pub(crate) async fn bind_all<N: Net>(
    net: &N,
    addrs: &[SocketAddr],
    options: &RingOptions,
) -> Result<Vec<N::Listener>, RingError> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let bind_addr = options
            .bind_ip
            .map_or(addr, |ip| SocketAddr::new(ip, addr.port()));
        let listener = net
            .bind(bind_addr)
            .await
            .map_err(|source| RingError::Bind {
                addr: bind_addr,
                source,
            })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Forms the ring for `rank` of `table` (with at least two ranks) on
/// `listeners`, one per address of `rank` in the table.
pub(crate) async fn form_ring<N: Net>(
    net: &N,
    rank: usize,
    table: &AddressTable,
    options: &RingOptions,
    mut listeners: Vec<N::Listener>,
) -> Result<(Links<N::Stream>, ListenerGuard), RingError> {
    let size = table.size();
    let left = (rank + size - 1) % size;
    let right = (rank + 1) % size;
    let deadline = Instant::now() + options.connect_timeout;
    tracing::debug!(
        rank,
        left,
        right,
        "accepting from the left and connecting to the right"
    );

    let accept_all = async {
        let mut links = Vec::new();
        for (listener, &addr) in listeners.iter_mut().zip(table.addrs(rank)) {
            let (stream, peer_addr) =
                accept_before(listener, addr, left, deadline, options).await?;
            tracing::debug!(rank, peer = left, %peer_addr, on = %addr, "accepted ring connection");
            links.push(split_link(stream, left, peer_addr));
        }
        Ok::<_, RingError>(links)
    };
    let connect_all = async {
        let mut links = Vec::new();
        for &addr in table.addrs(right) {
            let stream = connect_before(net, addr, right, deadline, options).await?;
            tracing::debug!(rank, peer = right, %addr, "connected to ring neighbour");
            links.push(split_link(stream, right, addr));
        }
        Ok::<_, RingError>(links)
    };
    let (left_links, right_links) = tokio::try_join!(accept_all, connect_all)?;

    let tasks = listeners
        .into_iter()
        .zip(table.addrs(rank).to_vec())
        .map(|(listener, addr)| tokio::spawn(reject_further_connections(listener, addr, rank)))
        .collect();
    let links = Links {
        left: left_links,
        right: right_links,
    };
    Ok((links, ListenerGuard { tasks }))
}

fn split_link<S: tokio::io::AsyncRead + tokio::io::AsyncWrite>(
    stream: S,
    peer: usize,
    addr: SocketAddr,
) -> Link<S> {
    let (reader, writer) = tokio::io::split(stream);
    Link {
        reader,
        writer,
        peer,
        addr,
    }
}

async fn accept_before<L: Listener>(
    listener: &mut L,
    addr: SocketAddr,
    peer: usize,
    deadline: Instant,
    options: &RingOptions,
) -> Result<(L::Stream, SocketAddr), RingError> {
    match tokio::time::timeout_at(deadline, listener.accept()).await {
        Ok(Ok(accepted)) => Ok(accepted),
        Ok(Err(source)) => Err(RingError::Accept { peer, addr, source }),
        Err(_) => Err(RingError::AcceptTimeout {
            peer,
            addr,
            after: options.connect_timeout,
        }),
    }
}

/// Connects to `addr`, retrying with backoff while the peer is not
/// listening yet, until `deadline`.
async fn connect_before<N: Net>(
    net: &N,
    addr: SocketAddr,
    peer: usize,
    deadline: Instant,
    options: &RingOptions,
) -> Result<N::Stream, RingError> {
    let mut delay = FIRST_RETRY_DELAY;
    let mut last_error = None;
    loop {
        match tokio::time::timeout_at(deadline, net.connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(source)) if is_fatal(&source) => {
                return Err(RingError::Connect { peer, addr, source });
            }
            Ok(Err(err)) => {
                tracing::trace!(peer, %addr, error = %err, "connection attempt failed, retrying");
                last_error = Some(err);
            }
            Err(_) => break,
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep_until((now + delay).min(deadline)).await;
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
    Err(RingError::ConnectTimeout {
        peer,
        addr,
        after: options.connect_timeout,
        last_error,
    })
}

/// Errors that retrying cannot fix.
fn is_fatal(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
    )
}

async fn reject_further_connections<L: Listener>(mut listener: L, addr: SocketAddr, rank: usize) {
    loop {
        match listener.accept().await {
            Ok((stream, peer_addr)) => {
                tracing::warn!(
                    rank,
                    %addr,
                    %peer_addr,
                    "closed an unexpected connection to a formed ring; another job may use the same ports"
                );
                drop(stream);
            }
            Err(err) => {
                tracing::debug!(rank, %addr, error = %err, "accept failed on a formed ring's listener");
                tokio::time::sleep(MAX_RETRY_DELAY).await;
            }
        }
    }
}

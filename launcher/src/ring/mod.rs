//! An MLX-compatible ring backend: collectives between the ranks of a job over
//! TCP, wire-compatible with MLX 0.32's `ring` backend so that Rust ranks and
//! MLX Python ranks can share one ring.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ringleader::ring::RingError> {
//! let mut group = ringleader::ring::Group::init().await?;
//! let mut grads = vec![1.0f32; 1024];
//! group.all_sum(&mut grads).await?;
//! assert_eq!(grads[0], group.size() as f32);
//! # Ok(()) }
//! ```
//!
//! [`Group::init`] reads `MLX_RANK` and `MLX_HOSTFILE` as MLX does (both unset
//! gives a one-rank group with no sockets); [`Group::connect`] takes the rank,
//! the [`AddressTable`] and the [`Net`] explicitly. Every collective works in
//! place on the caller's slice. The library's own memory is one staging
//! buffer of [`STAGING_BYTES`] per reducing pass, and there are at most two
//! such passes per connection to a neighbour, so `2 * connections *
//! STAGING_BYTES` in all. All-reduces shorter than the group also make a
//! zero-padded copy of `size` elements.
//!
//! Each rank holds `connections` TCP connections to each neighbour; a
//! collective cuts its buffer across all of them and both directions
//! exactly as MLX does (see [`schedule`]) and drives them from the calling
//! task, reading and writing as much per call as the sockets take.
//!
//! # Failures
//!
//! A peer that closes, resets or exits makes the running collective fail with
//! [`RingError::PeerLost`], naming the neighbour and its address. The failing
//! rank then closes all of its connections so that its other neighbour fails
//! too: an error travels round the ring within a few round trips, and every
//! survivor's error names the neighbour it lost, which is not necessarily the
//! rank that died. After any failure, timeout or cancelled operation the
//! group refuses further operations ([`RingError::Unusable`]). A peer that
//! stays connected but stops sending is caught only by the optional
//! per-operation timeout ([`RingOptions::op_timeout`],
//! `RINGLEADER_RING_OP_TIMEOUT`); waiting costs no CPU.
//!
//! # Limitations
//!
//! - Like MLX, ranks exchange no handshake, because MLX would not understand
//!   one. What ringleader does against a second job on the same ports: its
//!   listeners never set `SO_REUSEPORT` and stay bound while the group
//!   lives, so the other job's ranks fail to bind (with an error naming the
//!   port) instead of sharing connections, and a connection that arrives
//!   after the ring is formed is closed at once. What remains: a connection
//!   from another job that reaches a listener before the real neighbour does
//!   is taken for the neighbour, and a rank that connects cannot tell whose
//!   listener answered. Give concurrent jobs disjoint `--starting-port`
//!   ranges.
//! - `send` and `recv` reach the two neighbours only, as in MLX.
//! - Element bytes travel in native order; every MLX platform is
//!   little-endian.

mod config;
mod connect;
mod element;
mod error;
pub mod schedule;
mod transfer;

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;

use tokio::io::{ReadHalf, WriteHalf};

pub use config::{
    AddressTable, RingOptions, CONNECT_TIMEOUT_VAR, DEFAULT_CONNECT_TIMEOUT, HOSTFILE_VAR,
    OP_TIMEOUT_VAR, RANK_VAR,
};
pub use element::{Complex64, Element, Ordered};
pub use error::RingError;

use crate::net::{Listener, Net, TokioNet};
use connect::{Link, Links, ListenerGuard};
use element::{ReduceFn, ReduceOp};
use schedule::{Pass, Side};
use transfer::{JoinTransfers, SharedBuf, Staging, Transfer, TransferError};

/// Bytes in each staging buffer that received data waits in before it is
/// reduced.
pub const STAGING_BYTES: usize = Staging::BYTES;

/// A rank's membership in a ring of `size` ranks.
///
/// Collectives take `&mut self`: every rank must issue the same collectives
/// in the same order, and one rank runs one collective at a time.
pub struct Group<N: Net = TokioNet> {
    rank: usize,
    size: usize,
    /// Connections per neighbour.
    connections: usize,
    options: RingOptions,
    /// The sockets; `None` for a one-rank group and after a failure, which
    /// closes them so that the neighbours notice.
    links: Option<Links<N::Stream>>,
    /// One staging buffer per reducing pass, allocated on first use.
    staging: Vec<Staging>,
    /// Reason the group rejects operations, once one failed or was cancelled.
    broken: Option<String>,
    /// Set while a collective runs. Still set when the next one starts means
    /// the caller dropped the previous one midway, leaving the byte streams
    /// at an unknown position.
    in_flight: bool,
    _listeners: Option<ListenerGuard>,
}

impl Group<TokioNet> {
    /// Joins the ring described by `MLX_RANK` and `MLX_HOSTFILE` over TCP,
    /// with options from the environment ([`RingOptions::from_env`]).
    ///
    /// Without either variable, or with an empty hostfile, returns a one-rank
    /// group.
    pub async fn init() -> Result<Self, RingError> {
        let options = RingOptions::from_env()?;
        match config::rank_and_table_from_env()? {
            Some((rank, Some(table))) => Group::connect(rank, &table, TokioNet, options).await,
            Some((rank, None)) if rank != 0 => Err(RingError::InvalidTable(format!(
                "rank {rank} is outside the one-rank group of the empty {HOSTFILE_VAR}"
            ))),
            _ => Ok(Group::single()),
        }
    }
}

/// A rank whose listeners are bound but which has not joined a ring yet.
///
/// Binding first lets a caller listen on port 0 and put the real ports into
/// the address table before any rank connects, as in-process tests do.
pub struct BoundRank<N: Net> {
    net: N,
    options: RingOptions,
    listeners: Vec<N::Listener>,
}

impl<N: Net> BoundRank<N> {
    /// Binds one listener per address, in order (see
    /// [`RingOptions::bind_ip`]).
    pub async fn bind(
        net: N,
        addrs: &[SocketAddr],
        options: RingOptions,
    ) -> Result<Self, RingError> {
        let listeners = connect::bind_all(&net, addrs, &options).await?;
        Ok(BoundRank {
            net,
            options,
            listeners,
        })
    }

    /// Returns the bound addresses, with the real ports.
    pub fn local_addrs(&self) -> io::Result<Vec<SocketAddr>> {
        self.listeners.iter().map(|l| l.local_addr()).collect()
    }

    /// Joins the ring as `rank` of `table`, whose entry for `rank` must list
    /// as many addresses as were bound.
    pub async fn join(self, rank: usize, table: &AddressTable) -> Result<Group<N>, RingError> {
        let size = table.size();
        if rank >= size {
            return Err(RingError::InvalidTable(format!(
                "rank {rank} is outside the table of {size} ranks"
            )));
        }
        if self.listeners.len() != table.connections() {
            return Err(RingError::InvalidTable(format!(
                "rank {rank} bound {} listeners but the table lists {} addresses per rank",
                self.listeners.len(),
                table.connections()
            )));
        }
        if size == 1 {
            return Ok(Group::single());
        }
        let (links, guard) =
            connect::form_ring(&self.net, rank, table, &self.options, self.listeners).await?;
        Ok(Group::formed(rank, table, self.options, links, guard))
    }
}

impl<N: Net> Group<N> {
    /// A group of one rank, with no sockets; collectives return their input.
    pub fn single() -> Self {
        Group {
            rank: 0,
            size: 1,
            connections: 0,
            options: RingOptions::default(),
            links: None,
            staging: Vec::new(),
            broken: None,
            in_flight: false,
            _listeners: None,
        }
    }

    /// Joins the ring as `rank` of `table` over `net`: listens on the rank's
    /// own addresses and connects to every address of the next rank.
    pub async fn connect(
        rank: usize,
        table: &AddressTable,
        net: N,
        options: RingOptions,
    ) -> Result<Self, RingError> {
        let size = table.size();
        if rank >= size {
            return Err(RingError::InvalidTable(format!(
                "rank {rank} is outside the table of {size} ranks"
            )));
        }
        if size == 1 {
            return Ok(Group::single());
        }

        BoundRank::bind(net, table.addrs(rank), options)
            .await?
            .join(rank, table)
            .await
    }

    fn formed(
        rank: usize,
        table: &AddressTable,
        options: RingOptions,
        links: Links<N::Stream>,
        listeners: ListenerGuard,
    ) -> Self {
        let size = table.size();
        let connections = table.connections();
        tracing::debug!(rank, size, connections, "ring formed");
        Group {
            rank,
            size,
            connections,
            options,
            links: Some(links),
            staging: (0..2 * connections).map(|_| Staging::default()).collect(),
            broken: None,
            in_flight: false,
            _listeners: Some(listeners),
        }
    }

    /// This process's rank, from 0.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Number of TCP connections to each neighbour (0 in a one-rank group).
    pub fn connections(&self) -> usize {
        self.connections
    }

    /// Replaces every element with its sum over all ranks.
    pub async fn all_sum<T: Element>(&mut self, data: &mut [T]) -> Result<(), RingError> {
        self.all_reduce(ReduceOp::Sum, data, element::sum_fn::<T>())
            .await
    }

    /// Replaces every element with its maximum over all ranks.
    pub async fn all_max<T: Ordered>(&mut self, data: &mut [T]) -> Result<(), RingError> {
        self.all_reduce(ReduceOp::Max, data, element::max_fn::<T>())
            .await
    }

    /// Replaces every element with its minimum over all ranks.
    pub async fn all_min<T: Ordered>(&mut self, data: &mut [T]) -> Result<(), RingError> {
        self.all_reduce(ReduceOp::Min, data, element::min_fn::<T>())
            .await
    }

    /// Concatenates every rank's `input`, in rank order, into `output`, which
    /// must hold `size * input.len()` elements.
    pub async fn all_gather<T: Element>(
        &mut self,
        input: &[T],
        output: &mut [T],
    ) -> Result<(), RingError> {
        const OP: &str = "all_gather";
        if output.len() != input.len() * self.size {
            return Err(RingError::InvalidArgument {
                op: OP,
                reason: format!(
                    "output holds {} elements but {} ranks of {} elements need {}",
                    output.len(),
                    self.size,
                    input.len(),
                    input.len() * self.size
                ),
            });
        }
        self.check_usable(OP)?;

        let own = self.rank * input.len();
        output[own..own + input.len()].copy_from_slice(input);
        if self.size == 1 {
            return Ok(());
        }
        let nbytes = std::mem::size_of_val(input);
        let passes = schedule::all_gather(self.rank, self.size, nbytes, self.connections);
        let buf = SharedBuf::new(bytemuck::cast_slice_mut(output));
        self.run(OP, buf, &passes, None).await
    }

    /// Sends `data` to `dst`, which must be the left or right neighbour. The
    /// neighbour receives it with [`Group::recv`] into a slice of the same
    /// byte length.
    ///
    /// A message larger than the socket buffers completes only while the
    /// neighbour receives it, so two ranks that exchange messages must not
    /// both send first (MLX has the same rule); for example, let even ranks
    /// send first and odd ranks receive first.
    pub async fn send<T: Element>(&mut self, data: &[T], dst: usize) -> Result<(), RingError> {
        const OP: &str = "send";
        // MLX checks the right neighbour first, which matters with two ranks.
        let side = self.neighbour_side(OP, dst, [Side::Right, Side::Left])?;
        self.check_usable(OP)?;
        let passes =
            schedule::point_to_point(size_of_val(data), self.connections, Some(side), None);
        let buf = SharedBuf::read_only(bytemuck::cast_slice(data));
        self.run(OP, buf, &passes, None).await
    }

    /// Receives into `data` what `src`, the left or right neighbour, sent
    /// with [`Group::send`].
    pub async fn recv<T: Element>(&mut self, data: &mut [T], src: usize) -> Result<(), RingError> {
        const OP: &str = "recv";
        // MLX checks the left neighbour first, the opposite of `send`, so
        // that two ranks pair one's right sockets with the other's left.
        let side = self.neighbour_side(OP, src, [Side::Left, Side::Right])?;
        self.check_usable(OP)?;
        let passes =
            schedule::point_to_point(size_of_val(data), self.connections, None, Some(side));
        let buf = SharedBuf::new(bytemuck::cast_slice_mut(data));
        self.run(OP, buf, &passes, None).await
    }

    /// Waits until every rank has called `barrier`.
    ///
    /// This is an `all_sum` of one `float32` equal to 1, so an MLX rank meets
    /// it with `mx.eval(mx.distributed.all_sum(mx.array(1.0)))`. A result
    /// other than the group size means the ranks disagree on the sequence of
    /// operations.
    pub async fn barrier(&mut self) -> Result<(), RingError> {
        let mut one = [1.0f32];
        self.all_sum(&mut one).await?;
        if one[0] != self.size as f32 {
            return Err(RingError::BarrierMismatch {
                got: one[0],
                size: self.size,
            });
        }
        Ok(())
    }

    async fn all_reduce<T: Element>(
        &mut self,
        op: ReduceOp,
        data: &mut [T],
        reduce: ReduceFn,
    ) -> Result<(), RingError> {
        self.check_usable(op.name())?;
        if self.size == 1 {
            return Ok(());
        }

        let elem_size = size_of::<T>();
        let plan = schedule::all_reduce(
            self.rank,
            self.size,
            data.len(),
            elem_size,
            self.connections,
        );
        let reduce = Some((reduce, elem_size));
        if plan.padded_len == data.len() {
            let buf = SharedBuf::new(bytemuck::cast_slice_mut(data));
            return self.run(op.name(), buf, &plan.passes, reduce).await;
        }

        // Fewer elements than ranks: MLX reduces a zero-padded copy.
        let mut padded = vec![T::zeroed(); plan.padded_len];
        padded[..data.len()].copy_from_slice(data);
        let buf = SharedBuf::new(bytemuck::cast_slice_mut(&mut padded));
        self.run(op.name(), buf, &plan.passes, reduce).await?;
        data.copy_from_slice(&padded[..data.len()]);
        Ok(())
    }

    fn neighbour_side(
        &self,
        op: &'static str,
        peer: usize,
        order: [Side; 2],
    ) -> Result<Side, RingError> {
        if self.size == 1 {
            return Err(RingError::InvalidArgument {
                op,
                reason: "a one-rank group has no peer".into(),
            });
        }
        let left = (self.rank + self.size - 1) % self.size;
        let right = (self.rank + 1) % self.size;
        let rank_of = |side| if side == Side::Left { left } else { right };
        order.into_iter().find(|&side| rank_of(side) == peer).ok_or_else(|| {
            RingError::InvalidArgument {
                op,
                reason: format!(
                    "rank {peer} is not a neighbour of rank {}; the ring backend reaches ranks {left} and {right} only",
                    self.rank
                ),
            }
        })
    }

    fn check_usable(&mut self, op: &'static str) -> Result<(), RingError> {
        if self.in_flight {
            self.fail("an earlier operation was cancelled before it completed".into());
        }
        match &self.broken {
            Some(reason) => Err(RingError::Unusable {
                op,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Marks the group unusable and closes its sockets.
    fn fail(&mut self, reason: String) {
        self.in_flight = false;
        self.links = None;
        self.broken.get_or_insert(reason);
    }

    /// Runs `passes` over `buf` with the per-operation timeout, and breaks
    /// the group if they fail.
    async fn run(
        &mut self,
        op: &'static str,
        buf: SharedBuf<'_>,
        passes: &[Pass],
        reduce: Option<(ReduceFn, usize)>,
    ) -> Result<(), RingError> {
        let links = self
            .links
            .as_mut()
            .expect("a usable group of two or more ranks has links");
        self.in_flight = true;
        let transfers = JoinTransfers::new(build_transfers(
            links,
            &mut self.staging,
            buf,
            passes,
            reduce,
        ));
        let outcome = match self.options.op_timeout {
            Some(after) => tokio::time::timeout(after, transfers).await.ok(),
            None => Some(transfers.await),
        };
        self.in_flight = false;

        let err = match outcome {
            Some(Ok(())) => return Ok(()),
            Some(Err(err)) => self.peer_lost(op, err),
            None => RingError::OpTimeout {
                op,
                after: self.options.op_timeout.unwrap_or_default(),
            },
        };
        tracing::debug!(rank = self.rank, error = %err, "ring operation failed, closing connections");
        self.fail(err.to_string());
        Err(err)
    }

    fn peer_lost(&self, op: &'static str, err: TransferError) -> RingError {
        let links = self
            .links
            .as_ref()
            .expect("links are kept until the failure is recorded");
        let side = if err.side == Side::Left {
            &links.left
        } else {
            &links.right
        };
        let link = &side[err.link];
        RingError::PeerLost {
            op,
            peer: link.peer,
            addr: link.addr,
            source: err.source,
        }
    }
}

type Halves<'a, S> = (
    Vec<Option<&'a mut ReadHalf<S>>>,
    Vec<Option<&'a mut WriteHalf<S>>>,
);

fn halves<S>(links: &mut [Link<S>]) -> Halves<'_, S> {
    links
        .iter_mut()
        .map(|link| (Some(&mut link.reader), Some(&mut link.writer)))
        .unzip()
}

/// Hands every pass the socket halves and staging buffer it uses; each socket
/// direction serves one pass at most.
fn build_transfers<'a, S>(
    links: &'a mut Links<S>,
    staging: &'a mut [Staging],
    buf: SharedBuf<'a>,
    passes: &'a [Pass],
    reduce: Option<(ReduceFn, usize)>,
) -> Vec<Transfer<'a, ReadHalf<S>, WriteHalf<S>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let (mut left_readers, mut left_writers) = halves(&mut links.left);
    let (mut right_readers, mut right_writers) = halves(&mut links.right);
    let mut staging = staging.iter_mut();

    passes
        .iter()
        .map(|pass| {
            let reader = pass.recv_from.map(|side| {
                let readers = if side == Side::Left {
                    &mut left_readers
                } else {
                    &mut right_readers
                };
                readers[pass.link]
                    .take()
                    .expect("each socket direction serves one pass")
            });
            let writer = pass.send_to.map(|side| {
                let writers = if side == Side::Left {
                    &mut left_writers
                } else {
                    &mut right_writers
                };
                writers[pass.link]
                    .take()
                    .expect("each socket direction serves one pass")
            });
            let staging = (pass.reduce_items > 0).then(|| {
                staging
                    .next()
                    .expect("at most two reducing passes per connection")
            });
            Transfer::new(pass, buf, reader, writer, reduce, staging)
        })
        .collect()
}

//! The transfer engine: drives the passes of one collective over their
//! sockets, all in the caller's task.
//!
//! Each [`Transfer`] runs one [`Pass`]. It writes the pass's send ranges
//! straight from the caller's buffer. It reads received ranges straight into
//! the buffer too, except for items that must be reduced: those go to a
//! bounded staging buffer, which is folded into the buffer as whole elements
//! arrive. Reads and writes are as large as the socket accepts and the
//! dependencies allow, so a pass makes progress in both directions at once
//! without waiting for fixed-size packets.
//!
//! Two counters keep the buffer consistent (see [`Pass::send_lead`] and
//! [`Pass::recv_lead`]): a byte is sent only after the received byte it
//! depends on was applied, and a received byte overwrites the buffer only
//! after the byte it replaces was sent.

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::element::ReduceFn;
use super::schedule::{Pass, Side};

/// Largest single read or write. Linux transfers at most about 2 GiB per
/// call, and smaller calls let the other direction make progress.
const MAX_IO_BYTES: usize = 1 << 30;

/// The caller's buffer, shared by the passes of one collective.
///
/// Passes touch disjoint byte ranges at any moment (the schedule and the
/// counters above guarantee it), and every slice made from the pointer lives
/// only inside one `poll` call, so no two live slices overlap.
#[derive(Clone, Copy)]
pub(crate) struct SharedBuf<'a> {
    ptr: *mut u8,
    len: usize,
    /// False for a buffer made from a shared slice, which only sends.
    writable: bool,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: `SharedBuf` stands for a `&'a mut [u8]` or a `&'a [u8]`, both
// `Send`; the passes using it are polled from one task at a time.
unsafe impl Send for SharedBuf<'_> {}

impl<'a> SharedBuf<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        SharedBuf {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            writable: true,
            _borrow: PhantomData,
        }
    }

    /// Wraps a shared slice, which passes may only send from.
    pub(crate) fn read_only(buf: &'a [u8]) -> Self {
        SharedBuf {
            ptr: buf.as_ptr().cast_mut(),
            len: buf.len(),
            writable: false,
            _borrow: PhantomData,
        }
    }

    /// # Safety
    /// No mutable slice of an overlapping range may be alive.
    unsafe fn slice(&self, start: usize, len: usize) -> &[u8] {
        assert!(start + len <= self.len, "pass range outside the buffer");
        std::slice::from_raw_parts(self.ptr.add(start), len)
    }

    /// # Safety
    /// No other slice of an overlapping range may be alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, start: usize, len: usize) -> &mut [u8] {
        assert!(self.writable, "a read-only buffer is only sent from");
        assert!(start + len <= self.len, "pass range outside the buffer");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
    }
}

/// A socket failure in a pass: the failed side and link, and the I/O error.
#[derive(Debug)]
pub(crate) struct TransferError {
    pub side: Side,
    pub link: usize,
    pub source: io::Error,
}

/// A staging buffer for received bytes awaiting reduction, 8-byte aligned.
#[derive(Debug, Default)]
pub(crate) struct Staging {
    words: Vec<u64>,
}

impl Staging {
    /// Bytes each staging buffer holds.
    pub(crate) const BYTES: usize = 4 << 20;

    fn bytes(&mut self) -> &mut [u8] {
        if self.words.is_empty() {
            self.words = vec![0; Self::BYTES / 8];
        }
        bytemuck::cast_slice_mut(&mut self.words)
    }
}

/// One pass in progress.
pub(crate) struct Transfer<'a, R, W> {
    pass: &'a Pass,
    buf: SharedBuf<'a>,
    reader: Option<&'a mut R>,
    writer: Option<&'a mut W>,
    /// Reduction for the first `pass.reduce_items` received items.
    reduce: Option<(ReduceFn, usize)>,
    staging: Option<&'a mut [u8]>,

    send_item: usize,
    send_offset: usize,
    /// Bytes written to the socket so far.
    sent: usize,

    recv_item: usize,
    /// Bytes of the current received item already applied to the buffer.
    recv_offset: usize,
    /// Bytes received and applied to the buffer so far.
    applied: usize,
    /// Bytes at the start of the staging buffer not yet applied (at most one
    /// partial element once a read has been folded in).
    staged: usize,
    flushed: bool,
}

impl<'a, R, W> Transfer<'a, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Prepares `pass` over `buf`. `reduce` is the reduction and element
    /// size, needed when the pass has reduce items, as is `staging`.
    pub(crate) fn new(
        pass: &'a Pass,
        buf: SharedBuf<'a>,
        reader: Option<&'a mut R>,
        writer: Option<&'a mut W>,
        reduce: Option<(ReduceFn, usize)>,
        staging: Option<&'a mut Staging>,
    ) -> Self {
        assert_eq!(
            reader.is_some(),
            !pass.recvs.is_empty(),
            "reader matches the pass"
        );
        assert_eq!(
            writer.is_some(),
            !pass.sends.is_empty(),
            "writer matches the pass"
        );
        let needs_staging = pass.reduce_items > 0;
        assert!(
            !needs_staging || (reduce.is_some() && staging.is_some()),
            "reduce pass has a reduction"
        );
        Transfer {
            pass,
            buf,
            reader,
            writer,
            reduce,
            staging: staging.filter(|_| needs_staging).map(|s| s.bytes()),
            send_item: 0,
            send_offset: 0,
            sent: 0,
            recv_item: 0,
            recv_offset: 0,
            applied: 0,
            staged: 0,
            flushed: false,
        }
    }

    fn error(&self, side: Option<Side>, source: io::Error) -> TransferError {
        TransferError {
            side: side.expect("a socket that failed belongs to the pass"),
            link: self.pass.link,
            source,
        }
    }

    /// Writes as much as the socket takes and the schedule allows. Returns
    /// whether any byte was written; `blocked` is set when the socket is full.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        blocked: &mut bool,
    ) -> Result<bool, TransferError> {
        let mut progress = false;
        while let Some(range) = self.pass.sends.get(self.send_item) {
            let remaining = range.len() - self.send_offset;
            if remaining == 0 {
                self.send_item += 1;
                self.send_offset = 0;
                continue;
            }
            let allowed = self
                .pass
                .send_lead
                .saturating_add(self.applied)
                .saturating_sub(self.sent);
            let len = remaining.min(allowed).min(MAX_IO_BYTES);
            if len == 0 {
                break;
            }

            // SAFETY: bytes up to `applied + send_lead` are final until the
            // receive side overwrites them, which waits for this write.
            let bytes = unsafe { self.buf.slice(range.start + self.send_offset, len) };
            let writer = self.writer.as_mut().expect("pass with sends has a writer");
            match Pin::new(&mut **writer).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => {
                    let err = io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes");
                    return Err(self.error(self.pass.send_to, err));
                }
                Poll::Ready(Ok(n)) => {
                    self.send_offset += n;
                    self.sent += n;
                    progress = true;
                }
                Poll::Ready(Err(err)) => return Err(self.error(self.pass.send_to, err)),
                Poll::Pending => {
                    *blocked = true;
                    break;
                }
            }
        }
        Ok(progress)
    }

    /// Reads as much as has arrived and the schedule allows. Returns whether
    /// any byte was read; `blocked` is set when no data is waiting.
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        blocked: &mut bool,
    ) -> Result<bool, TransferError> {
        let mut progress = false;
        while let Some(range) = self.pass.recvs.get(self.recv_item) {
            let remaining = range.len() - self.recv_offset;
            if remaining == 0 {
                self.recv_item += 1;
                self.recv_offset = 0;
                continue;
            }
            let received = self.applied + self.staged;
            let allowed = self
                .pass
                .recv_lead
                .saturating_add(self.sent)
                .saturating_sub(received);
            let reducing = self.recv_item < self.pass.reduce_items;

            let read = if reducing {
                let staging = self.staging.as_mut().expect("reduce pass has staging");
                let len = (remaining - self.staged)
                    .min(allowed)
                    .min(staging.len() - self.staged);
                if len == 0 {
                    break;
                }
                let target = &mut staging[self.staged..self.staged + len];
                poll_read_into(
                    self.reader.as_mut().expect("pass with recvs has a reader"),
                    cx,
                    target,
                )
            } else {
                let len = remaining.min(allowed).min(MAX_IO_BYTES);
                if len == 0 {
                    break;
                }
                // SAFETY: the range was sent before (see `recv_lead`), and
                // no send reads it until this item is applied.
                let target = unsafe { self.buf.slice_mut(range.start + self.recv_offset, len) };
                poll_read_into(
                    self.reader.as_mut().expect("pass with recvs has a reader"),
                    cx,
                    target,
                )
            };

            match read {
                Poll::Ready(Ok(0)) => {
                    let err = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by the peer",
                    );
                    return Err(self.error(self.pass.recv_from, err));
                }
                Poll::Ready(Ok(n)) if reducing => {
                    self.staged += n;
                    self.apply_staged(range.start);
                    progress = true;
                }
                Poll::Ready(Ok(n)) => {
                    self.recv_offset += n;
                    self.applied += n;
                    progress = true;
                }
                Poll::Ready(Err(err)) => return Err(self.error(self.pass.recv_from, err)),
                Poll::Pending => {
                    *blocked = true;
                    break;
                }
            }
        }
        Ok(progress)
    }

    /// Folds the whole elements at the start of the staging buffer into the
    /// current received item and keeps any trailing partial element.
    fn apply_staged(&mut self, item_start: usize) {
        let (reduce, elem_size) = self.reduce.expect("reduce pass has a reduction");
        let whole = self.staged / elem_size * elem_size;
        if whole == 0 {
            return;
        }
        let staging = self.staging.as_mut().expect("reduce pass has staging");

        // SAFETY: the target range belongs to the item being received; no
        // send reads it before `applied` covers it.
        let dst = unsafe { self.buf.slice_mut(item_start + self.recv_offset, whole) };
        reduce(dst, &staging[..whole]);
        staging.copy_within(whole..self.staged, 0);

        self.staged -= whole;
        self.recv_offset += whole;
        self.applied += whole;
    }

    fn done(&self) -> bool {
        self.send_item >= self.pass.sends.len() && self.recv_item >= self.pass.recvs.len()
    }

    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransferError>> {
        loop {
            let mut blocked = false;
            let sent = self.poll_send(cx, &mut blocked)?;
            let received = self.poll_recv(cx, &mut blocked)?;
            if self.done() {
                return self.poll_finish(cx);
            }
            if sent || received {
                continue;
            }
            if blocked {
                return Poll::Pending;
            }
            let err = io::Error::other(format!(
                "internal error: transfer stalled with {} bytes sent and {} applied",
                self.sent, self.applied
            ));
            return Poll::Ready(Err(
                self.error(self.pass.send_to.or(self.pass.recv_from), err)
            ));
        }
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransferError>> {
        if self.flushed {
            return Poll::Ready(Ok(()));
        }
        if let Some(writer) = self.writer.as_mut() {
            if let Err(err) = std::task::ready!(Pin::new(&mut **writer).poll_flush(cx)) {
                return Poll::Ready(Err(self.error(self.pass.send_to, err)));
            }
        }
        self.flushed = true;
        Poll::Ready(Ok(()))
    }
}

fn poll_read_into<R: AsyncRead + Unpin>(
    reader: &mut &mut R,
    cx: &mut Context<'_>,
    target: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut buf = ReadBuf::new(target);
    std::task::ready!(Pin::new(&mut **reader).poll_read(cx, &mut buf))?;
    Poll::Ready(Ok(buf.filled().len()))
}

/// Runs all transfers to completion, or until the first one fails.
pub(crate) struct JoinTransfers<'a, R, W> {
    transfers: Vec<(Transfer<'a, R, W>, bool)>,
}

impl<'a, R, W> JoinTransfers<'a, R, W> {
    pub(crate) fn new(transfers: Vec<Transfer<'a, R, W>>) -> Self {
        JoinTransfers {
            transfers: transfers.into_iter().map(|t| (t, false)).collect(),
        }
    }
}

impl<R, W> Future for JoinTransfers<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    type Output = Result<(), TransferError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut all_done = true;
        for (transfer, done) in &mut this.transfers {
            if *done {
                continue;
            }
            match transfer.poll_step(cx) {
                Poll::Ready(Ok(())) => *done = true,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => all_done = false,
            }
        }
        if all_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}

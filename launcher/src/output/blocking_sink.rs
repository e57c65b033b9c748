//! The launcher's own stdout and stderr as async writers that copy each byte
//! once.
//!
//! `tokio::io::stdout()` copies every write into a buffer of its own before
//! a blocking-pool thread writes it, so behind the output writer's buffer
//! each byte was copied twice. A [`BlockingSink`] is that buffer: writes
//! collect in a vector it owns, and a flush hands the vector itself to a
//! blocking-pool thread, which writes it while the next one fills.

use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;
use tokio::task::JoinHandle;

/// Bytes collected before they go out in one write.
pub const BUFFER_BYTES: usize = 256 * 1024;

/// An async writer for a file descriptor whose writes may block, such as a
/// terminal, a pipe or a file on a slow disk. It has two buffers of
/// [`BUFFER_BYTES`] at most, one being written while the other fills, and a
/// write waits only when both are full. A failed write reports its error on
/// the next write or flush.
pub struct BlockingSink {
    file: Arc<File>,
    filling: Vec<u8>,
    /// The buffer of the last finished write, kept for reuse.
    spare: Vec<u8>,
    /// The write in progress, which returns its buffer when it ends.
    writing: Option<JoinHandle<(Vec<u8>, io::Result<()>)>>,
}

impl BlockingSink {
    /// Writes to a duplicate of `fd`, which shares the file offset and flags.
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(BlockingSink {
            file: Arc::new(File::from(fd.try_clone_to_owned()?)),
            filling: Vec::new(),
            spare: Vec::new(),
            writing: None,
        })
    }

    pub fn stdout() -> io::Result<Self> {
        Self::new(io::stdout().as_fd())
    }

    pub fn stderr() -> io::Result<Self> {
        Self::new(io::stderr().as_fd())
    }

    /// Waits for the write in progress, if any, and returns its result.
    fn poll_written(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(writing) = self.writing.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let joined = ready!(Pin::new(writing).poll(cx));
        self.writing = None;
        Poll::Ready(match joined {
            Ok((mut buffer, result)) => {
                buffer.clear();
                self.spare = buffer;
                result
            }
            Err(error) => Err(io::Error::other(error)),
        })
    }

    /// Starts writing the filled buffer once the write before it has ended.
    fn poll_start(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_written(cx))?;
        if !self.filling.is_empty() {
            let buffer = std::mem::replace(&mut self.filling, std::mem::take(&mut self.spare));
            let file = self.file.clone();
            self.writing = Some(tokio::task::spawn_blocking(move || {
                let result = write_all(&file, &buffer);
                (buffer, result)
            }));
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes all of `bytes`, waiting for the descriptor if another program left
/// it non-blocking.
fn write_all(file: &File, mut bytes: &[u8]) -> io::Result<()> {
    let mut file = file;
    while !bytes.is_empty() {
        match file.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                let mut poll = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, which the call only writes `revents` of.
                unsafe { libc::poll(&mut poll, 1, -1) };
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

impl AsyncWrite for BlockingSink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.filling.len() + buf.len() > BUFFER_BYTES && !this.filling.is_empty() {
            ready!(this.poll_start(cx))?;
        }
        let n = buf.len().min(BUFFER_BYTES - this.filling.len());
        this.filling.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_start(cx))?;
        this.poll_written(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::OwnedFd;

    use tokio::io::AsyncWriteExt;

    use super::*;

    fn pipe() -> (File, OwnedFd) {
        let (reader, writer) = nix::unistd::pipe().expect("pipe");
        (File::from(reader), writer)
    }

    /// Writes of many sizes arrive whole and in order through a pipe that a
    /// thread drains in small reads, so the writes run ahead of the reader.
    #[tokio::test]
    async fn writes_arrive_in_order_through_a_pipe() {
        let (mut reader, writer) = pipe();
        let drain = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match reader.read(&mut chunk).expect("read") {
                    0 => return bytes,
                    n => bytes.extend_from_slice(&chunk[..n]),
                }
            }
        });
        let mut sink = BlockingSink::new(writer.as_fd()).expect("sink");
        drop(writer);

        let sizes = [
            1,
            100,
            4096,
            70_000,
            BUFFER_BYTES,
            BUFFER_BYTES + 3,
            3 * BUFFER_BYTES,
        ];
        let mut expected = Vec::new();
        for round in 0..40 {
            let size = sizes[round % sizes.len()];
            let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + round) as u8).collect();
            sink.write_all(&bytes).await.expect("write");
            expected.extend_from_slice(&bytes);
            if round % 5 == 0 {
                sink.flush().await.expect("flush");
            }
        }
        sink.flush().await.expect("flush");
        drop(sink);

        let received = drain.join().expect("drain thread");
        assert_eq!(received.len(), expected.len());
        assert!(
            received == expected,
            "bytes arrived out of order or changed"
        );
    }

    #[tokio::test]
    async fn closed_reader_shows_as_a_broken_pipe() {
        let (reader, writer) = pipe();
        drop(reader);
        let mut sink = BlockingSink::new(writer.as_fd()).expect("sink");
        sink.write_all(b"nobody reads this\n")
            .await
            .expect("writes collect in the buffer");
        let error = sink.flush().await.expect_err("the reader is gone");
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
    }

    /// A descriptor another program made non-blocking still takes every byte.
    #[tokio::test]
    async fn non_blocking_descriptor_is_waited_for() {
        let (mut reader, writer) = pipe();
        let flags =
            nix::fcntl::fcntl(writer.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).expect("flags");
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(writer.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
            .expect("set O_NONBLOCK");
        let mut sink = BlockingSink::new(writer.as_fd()).expect("sink");
        drop(writer);
        // Far more than a pipe holds, so writes meet EAGAIN until the reader drains.
        let bytes = vec![b'x'; 4 * BUFFER_BYTES];
        let write = async {
            sink.write_all(&bytes).await.expect("write");
            sink.flush().await.expect("flush");
            drop(sink);
        };
        let read = tokio::task::spawn_blocking(move || {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).expect("read");
            received
        });
        write.await;
        assert_eq!(read.await.expect("reader").len(), bytes.len());
    }
}

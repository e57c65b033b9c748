//! Output forwarding: every byte a rank writes reaches the launcher's matching
//! stream in order, and lines of different ranks are never spliced together.
//!
//! Each rank stream has a pump task that reads chunks and sends them to the
//! stream's writer task, cut after the last complete line when more bytes
//! are on the way. The writer owns the sink (the launcher's stdout or
//! stderr). A rank whose last chunk ended mid-line (not after `\n` or `\r`)
//! owns the sink until it finishes the line, so its partial line shows at
//! once while other ranks' chunks wait. When other ranks wait and the owner
//! added nothing for [`LINE_HOLD`] (or held the sink for [`LINE_HOLD_MAX`]),
//! or the owning rank's stream ends without a final newline, the writer ends the partial line with a `\n` of its own; those
//! are the only bytes it adds (besides `--tag-output` prefixes).
//!
//! Memory stays bounded: a pump may have [`QUEUED_BYTES_PER_STREAM`] bytes
//! on the way, plus one chunk of [`CHUNK_SIZE`] it is reading, and waits for
//! the writer before it queues more, so a slow reader of the launcher's
//! output slows the ranks down through their pipes instead of growing buffers.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::exec::{ByteReader, ByteWriter};

/// Bytes the writer collects before it writes to the launcher's stream.
const SINK_BUFFER: usize = 256 * 1024;

/// Largest chunk a pump reads at once.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Bytes one rank stream may have queued for its writer. A rank whose
/// chunks wait behind another rank's partial line keeps running until it
/// has this much queued, which keeps two ranks that each hold one of the
/// two streams from waiting on each other.
pub const QUEUED_BYTES_PER_STREAM: usize = 4 * CHUNK_SIZE;

/// How long a pump waits for the rest of a partial line before sending what it has.
pub const PARTIAL_LINE_DELAY: Duration = Duration::from_millis(10);

/// How long other ranks wait for a rank that has written nothing more of its
/// partial line before the writer ends that line for it.
pub const LINE_HOLD: Duration = Duration::from_secs(1);

/// How long other ranks wait for one partial line at most, even while its
/// rank keeps adding to it (a row of progress dots, say).
pub const LINE_HOLD_MAX: Duration = Duration::from_secs(3);

/// A message from a pump to its writer.
enum Message {
    Data {
        rank: usize,
        bytes: Vec<u8>,
        /// Returned to the pump's semaphore once the bytes are written.
        _permit: OwnedSemaphorePermit,
    },
    /// The rank's stream reached end of file; `drained` fires once everything
    /// before it has been written to the sink.
    End { rank: usize, drained: oneshot::Sender<()> },
}

impl Message {
    fn rank(&self) -> usize {
        match self {
            Message::Data { rank, .. } | Message::End { rank, .. } => *rank,
        }
    }
}

/// The sending side of one launcher stream (stdout or stderr), cloned per rank.
#[derive(Clone)]
pub struct StreamWriter {
    tx: mpsc::UnboundedSender<Message>,
    /// Set once the launcher's stream is a broken pipe (its reader is gone).
    broken: Arc<AtomicBool>,
}

/// Starts the writer task of one launcher stream. Labels, if given, prefix
/// every line of rank `i` with `labels[i]`. The task returns the sink once
/// every [`StreamWriter`] is dropped and all messages are written.
pub fn start_writer(
    sink: ByteWriter,
    labels: Option<Vec<String>>,
) -> (StreamWriter, tokio::task::JoinHandle<ByteWriter>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let broken = Arc::new(AtomicBool::new(false));
    let ranks = labels.as_ref().map_or(0, Vec::len);
    let writer = Writer {
        sink: BufWriter::with_capacity(SINK_BUFFER, sink),
        labels,
        at_line_start: vec![true; ranks],
        owner: None,
        owner_since: Instant::now(),
        owner_active: Instant::now(),
        held: VecDeque::new(),
        scratch: Vec::new(),
        broken: broken.clone(),
    };
    let handle = tokio::spawn(writer.run(rx));
    (StreamWriter { tx, broken }, handle)
}

impl StreamWriter {
    /// Forwards everything `reader` yields as rank `rank`'s output, copying
    /// it to `copy` as well if given. Resolves once the stream ended and its
    /// last byte reached the sink.
    ///
    /// Complete lines go out as soon as they are read. A partial line at the
    /// end of a read waits up to [`PARTIAL_LINE_DELAY`] for the rest, then
    /// goes out on its own, so a prompt or progress bar shows at once while
    /// a line written in several pieces is sent whole.
    pub async fn pump(&self, rank: usize, mut reader: ByteReader, mut copy: Option<ByteWriter>) {
        let credits = Arc::new(Semaphore::new(QUEUED_BYTES_PER_STREAM));
        let mut buffer = vec![0u8; CHUNK_SIZE];
        // Bytes read but not yet sent: the start of a line.
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let read = if pending.is_empty() {
                Some(reader.read(&mut buffer).await)
            } else {
                // `read` is cancel-safe, so timing it out loses nothing.
                tokio::time::timeout(PARTIAL_LINE_DELAY, reader.read(&mut buffer)).await.ok()
            };
            let n = match read {
                None => {
                    self.send(&credits, rank, std::mem::take(&mut pending)).await;
                    continue;
                }
                Some(Ok(0)) => break,
                // The launcher's reader is gone: closing the rank's pipe gives
                // the rank the EPIPE or SIGPIPE it would get writing there itself.
                Some(Ok(_)) if self.broken.load(Ordering::Relaxed) => break,
                Some(Ok(n)) => n,
                Some(Err(error)) => {
                    tracing::warn!(rank, %error, "reading rank output failed");
                    break;
                }
            };
            if let Some(file) = copy.as_mut() {
                if let Err(error) = file.write_all(&buffer[..n]).await {
                    tracing::warn!(rank, %error, "writing the rank's output file failed; the file is incomplete");
                    copy = None;
                }
            }
            pending.extend_from_slice(&buffer[..n]);
            match pending.iter().rposition(|&b| b == b'\n') {
                Some(last) => {
                    let tail = pending.split_off(last + 1);
                    self.send(&credits, rank, std::mem::replace(&mut pending, tail)).await;
                }
                // A line longer than a chunk streams through in pieces.
                None if pending.len() >= CHUNK_SIZE => self.send(&credits, rank, std::mem::take(&mut pending)).await,
                None => {}
            }
        }
        if !pending.is_empty() {
            self.send(&credits, rank, pending).await;
        }
        if let Some(mut file) = copy {
            let _ = file.flush().await;
        }
        let (drained, done) = oneshot::channel();
        if self.tx.send(Message::End { rank, drained }).is_ok() {
            let _ = done.await;
        }
    }

    /// Queues `bytes` for the writer once the stream's byte budget allows.
    async fn send(&self, credits: &Arc<Semaphore>, rank: usize, bytes: Vec<u8>) {
        // Chunks never exceed two reads, so they always fit the budget.
        let size = bytes.len().min(QUEUED_BYTES_PER_STREAM) as u32;
        let permit = credits.clone().acquire_many_owned(size).await.expect("the semaphore is never closed");
        let _ = self.tx.send(Message::Data { rank, bytes, _permit: permit });
    }
}

struct Writer {
    sink: BufWriter<ByteWriter>,
    labels: Option<Vec<String>>,
    /// Per rank, whether its next byte starts a line (for labels).
    at_line_start: Vec<bool>,
    /// The rank whose partial line is on the sink, if any.
    owner: Option<usize>,
    /// When the current owner took the sink.
    owner_since: Instant,
    /// When the current owner last wrote.
    owner_active: Instant,
    /// Messages of other ranks waiting for the owner to end its line.
    held: VecDeque<Message>,
    /// Reused buffer for labelled output.
    scratch: Vec<u8>,
    /// Shared with the pumps; see [`StreamWriter`].
    broken: Arc<AtomicBool>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Message>) -> ByteWriter {
        let mut open = true;
        while open || !self.held.is_empty() {
            let hold_deadline = (self.owner_active + LINE_HOLD).min(self.owner_since + LINE_HOLD_MAX);
            tokio::select! {
                message = rx.recv(), if open => match message {
                    Some(message) => {
                        self.accept(message).await;
                        // Writes collect in the buffer while more are queued;
                        // the sink sees them as soon as the queue runs dry.
                        if rx.is_empty() {
                            self.flush().await;
                        }
                    }
                    None => open = false,
                },
                _ = tokio::time::sleep_until(hold_deadline), if !self.held.is_empty() => {
                    self.release_owner().await;
                }
                // With the channel closed only held messages remain.
                _ = std::future::ready(()), if !open => self.release_owner().await,
            }
        }
        self.flush().await;
        self.sink.into_inner()
    }

    async fn flush(&mut self) {
        if let Err(error) = self.sink.flush().await {
            self.on_error(&error);
        }
    }

    /// Writes `message` now, or queues it while another rank owns the sink.
    async fn accept(&mut self, message: Message) {
        match self.owner {
            Some(owner) if owner != message.rank() => self.held.push_back(message),
            _ => {
                self.write(message).await;
                self.write_held().await;
            }
        }
    }

    /// Ends the owner's partial line and writes what waited for it.
    async fn release_owner(&mut self) {
        if let Some(owner) = self.owner.take() {
            tracing::debug!(rank = owner, waiting = self.held.len(), "ending a partial line that others waited for");
            self.end_line(owner).await;
        }
        self.write_held().await;
    }

    /// Writes held messages in arrival order until one leaves a partial line;
    /// messages of other ranks then keep waiting.
    async fn write_held(&mut self) {
        let mut index = 0;
        while index < self.held.len() {
            let rank = self.held[index].rank();
            if self.owner.is_some_and(|owner| owner != rank) {
                index += 1;
                continue;
            }
            let message = self.held.remove(index).expect("index is in bounds");
            self.write(message).await;
            index = 0;
        }
    }

    async fn write(&mut self, message: Message) {
        match message {
            Message::Data { rank, bytes, _permit } => {
                let now = Instant::now();
                if self.owner != Some(rank) {
                    self.owner_since = now;
                }
                self.owner_active = now;
                self.write_bytes(rank, &bytes).await;
                // A carriage return also frees the sink: progress bars
                // redraw with `\r`, and the next line simply follows it.
                self.owner = (!matches!(bytes.last(), Some(b'\n' | b'\r'))).then_some(rank);
            }
            Message::End { rank, drained } => {
                if self.owner == Some(rank) {
                    tracing::debug!(rank, "ending the unterminated last line");
                    self.owner = None;
                    self.end_line(rank).await;
                }
                self.flush().await;
                let _ = drained.send(());
            }
        }
    }

    async fn end_line(&mut self, rank: usize) {
        self.write_bytes(rank, b"\n").await;
    }

    async fn write_bytes(&mut self, rank: usize, bytes: &[u8]) {
        let result = match &self.labels {
            None => self.sink.write_all(bytes).await,
            Some(labels) => {
                self.scratch.clear();
                let label = labels[rank].as_bytes();
                for line in bytes.split_inclusive(|&b| b == b'\n') {
                    if self.at_line_start[rank] {
                        self.scratch.extend_from_slice(label);
                    }
                    self.scratch.extend_from_slice(line);
                    self.at_line_start[rank] = line.last() == Some(&b'\n');
                }
                self.sink.write_all(&self.scratch).await
            }
        };
        if let Err(error) = result {
            self.on_error(&error);
        }
    }

    /// Records a failed write. Bytes that cannot be written are dropped; a
    /// broken pipe also makes the pumps close the ranks' pipes.
    fn on_error(&self, error: &std::io::Error) {
        tracing::debug!(%error, "writing to the launcher's output failed");
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            self.broken.store(true, Ordering::Relaxed);
        }
    }
}


/// Opens `DIR/rank-N.stdout` and `DIR/rank-N.stderr` for `--output-dir`.
pub async fn open_rank_files(dir: &PathBuf, rank: usize) -> std::io::Result<(ByteWriter, ByteWriter)> {
    let stdout = tokio::fs::File::create(dir.join(format!("rank-{rank}.stdout"))).await?;
    let stderr = tokio::fs::File::create(dir.join(format!("rank-{rank}.stderr"))).await?;
    Ok((Box::new(stdout), Box::new(stderr)))
}

#[cfg(test)]
mod tests;

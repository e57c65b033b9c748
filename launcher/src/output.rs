//! Output forwarding: every byte a rank writes reaches the launcher's matching
//! stream in order, and lines of different ranks are never spliced together.
//!
//! Each rank stream has a pump task that reads chunks and sends them to the
//! stream's writer task. The writer owns the sink (the launcher's stdout or
//! stderr). A rank whose last write did not end a line owns the sink until it
//! finishes the line, so its partial line shows at once (progress bars keep
//! updating) while other ranks' chunks wait. When another rank has been
//! waiting for [`LINE_HOLD`], or the owning rank's stream ends without a final
//! newline, the writer ends the partial line with a `\n` of its own; those
//! are the only bytes it adds (besides `--tag-output` prefixes).
//!
//! Memory stays bounded: a pump may have [`CHUNKS_IN_FLIGHT`] chunks of at
//! most [`CHUNK_SIZE`] bytes on the way, and waits for the writer before it
//! reads more, so a slow reader of the launcher's output slows the ranks down
//! through their pipes instead of growing buffers.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::exec::{ByteReader, ByteWriter};

/// Largest chunk a pump reads at once.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Chunks one rank stream may have queued for its writer.
pub const CHUNKS_IN_FLIGHT: usize = 2;

/// How long other ranks wait for a rank to finish a partial line before the
/// writer ends that line for it.
pub const LINE_HOLD: Duration = Duration::from_millis(100);

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
}

/// Starts the writer task of one launcher stream. Labels, if given, prefix
/// every line of rank `i` with `labels[i]`. The task returns the sink once
/// every [`StreamWriter`] is dropped and all messages are written.
pub fn start_writer(
    sink: ByteWriter,
    labels: Option<Vec<String>>,
) -> (StreamWriter, tokio::task::JoinHandle<ByteWriter>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let ranks = labels.as_ref().map_or(0, Vec::len);
    let writer = Writer {
        sink,
        labels,
        at_line_start: vec![true; ranks],
        owner: None,
        held: VecDeque::new(),
        scratch: Vec::new(),
    };
    let handle = tokio::spawn(writer.run(rx));
    (StreamWriter { tx }, handle)
}

impl StreamWriter {
    /// Forwards everything `reader` yields as rank `rank`'s output, copying
    /// it to `copy` as well if given. Resolves once the stream ended and its
    /// last byte reached the sink.
    pub async fn pump(&self, rank: usize, mut reader: ByteReader, mut copy: Option<ByteWriter>) {
        let credits = Arc::new(Semaphore::new(CHUNKS_IN_FLIGHT));
        loop {
            let permit = credits.clone().acquire_owned().await.expect("the semaphore is never closed");
            let mut bytes = vec![0u8; CHUNK_SIZE];
            let n = match reader.read(&mut bytes).await {
                Ok(n) => n,
                Err(error) => {
                    tracing::warn!(rank, %error, "reading rank output failed");
                    0
                }
            };
            if n == 0 {
                break;
            }
            bytes.truncate(n);
            if let Some(file) = copy.as_mut() {
                if let Err(error) = file.write_all(&bytes).await {
                    tracing::warn!(rank, %error, "writing the rank's output file failed; the file is incomplete");
                    copy = None;
                }
            }
            if self.tx.send(Message::Data { rank, bytes, _permit: permit }).is_err() {
                return;
            }
        }
        if let Some(mut file) = copy {
            let _ = file.flush().await;
        }
        let (drained, done) = oneshot::channel();
        if self.tx.send(Message::End { rank, drained }).is_ok() {
            let _ = done.await;
        }
    }
}

struct Writer {
    sink: ByteWriter,
    labels: Option<Vec<String>>,
    /// Per rank, whether its next byte starts a line (for labels).
    at_line_start: Vec<bool>,
    /// The rank whose partial line is on the sink, if any.
    owner: Option<usize>,
    /// Messages of other ranks waiting for the owner to end its line.
    held: VecDeque<Message>,
    /// Reused buffer for labelled output.
    scratch: Vec<u8>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Message>) -> ByteWriter {
        let mut open = true;
        // When the oldest held message started waiting.
        let mut held_since: Option<Instant> = None;
        while open || !self.held.is_empty() {
            let hold_deadline = held_since.map_or_else(Instant::now, |since| since + LINE_HOLD);
            tokio::select! {
                message = rx.recv(), if open => match message {
                    Some(message) => self.accept(message).await,
                    None => open = false,
                },
                _ = tokio::time::sleep_until(hold_deadline), if !self.held.is_empty() => {
                    self.release_owner().await;
                    held_since = None;
                }
                // With the channel closed only held messages remain.
                _ = std::future::ready(()), if !open => {
                    self.release_owner().await;
                    held_since = None;
                }
            }
            held_since = match (self.held.is_empty(), held_since) {
                (true, _) => None,
                (false, None) => Some(Instant::now()),
                (false, since) => since,
            };
        }
        let _ = self.sink.flush().await;
        self.sink
    }

    /// Writes `message` now, or holds it while another rank owns the sink.
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
                self.write_bytes(rank, &bytes).await;
                self.owner = (bytes.last() != Some(&b'\n')).then_some(rank);
            }
            Message::End { rank, drained } => {
                if self.owner == Some(rank) {
                    self.owner = None;
                    self.end_line(rank).await;
                }
                let _ = self.sink.flush().await;
                let _ = drained.send(());
            }
        }
    }

    async fn end_line(&mut self, rank: usize) {
        self.write_bytes(rank, b"\n").await;
    }

    async fn write_bytes(&mut self, rank: usize, bytes: &[u8]) {
        let result = match &self.labels {
            None => write_flush(&mut self.sink, bytes).await,
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
                write_flush(&mut self.sink, &self.scratch).await
            }
        };
        // A closed launcher stdout must not stop the job or block the ranks:
        // the bytes are dropped and the rank's own output file, if any, keeps them.
        if let Err(error) = result {
            tracing::debug!(rank, %error, "writing to the launcher's output failed");
        }
    }
}

async fn write_flush(sink: &mut (dyn AsyncWrite + Send + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    sink.write_all(bytes).await?;
    sink.flush().await
}

/// Opens `DIR/rank-N.stdout` and `DIR/rank-N.stderr` for `--output-dir`.
pub async fn open_rank_files(dir: &PathBuf, rank: usize) -> std::io::Result<(ByteWriter, ByteWriter)> {
    let stdout = tokio::fs::File::create(dir.join(format!("rank-{rank}.stdout"))).await?;
    let stderr = tokio::fs::File::create(dir.join(format!("rank-{rank}.stderr"))).await?;
    Ok((Box::new(stdout), Box::new(stderr)))
}

#[cfg(test)]
mod tests;

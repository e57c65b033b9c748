//! Output forwarding: every byte a rank writes reaches the launcher's matching
//! stream in order, and lines of different ranks are never spliced together.
//!
//! A *source* is one rank's stdout or stderr, numbered by the caller. Each
//! source has a pump task that reads chunks and sends them to a writer task,
//! cut after the last complete line when more bytes are on the way. A writer
//! owns one sink (the launcher's stdout or stderr, or both when they are the
//! same file). A source whose last chunk ended mid-line (not after `\n` or
//! `\r`) owns the sink until it finishes the line, so its partial line shows
//! at once while other sources' chunks wait.
//!
//! The writer ends a partial line with a `\n` of its own in two cases. In the
//! first, other sources wait and the owner added nothing for [`LINE_HOLD`],
//! owned the sink for [`LINE_HOLD_MAX`], or starts redrawing with `\r`. In the
//! second, the owner's stream ended mid-line and another source writes next.
//! Those newlines and `--tag-output` labels are the only bytes it adds.
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

mod blocking_sink;

pub use blocking_sink::BlockingSink;

/// Bytes the writer collects before it writes to a sink that does not
/// collect writes itself (see [`start_writer`]).
pub const SINK_BUFFER: usize = 256 * 1024;

/// Largest chunk a pump reads at once.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Bytes one source may have queued for its writer. A rank whose chunks wait
/// behind another rank's partial line keeps running until it has this much
/// queued, which keeps two ranks that each hold one of the two streams from
/// waiting on each other.
pub const QUEUED_BYTES_PER_STREAM: usize = 4 * CHUNK_SIZE;

/// How long a pump waits for the rest of a partial line before sending what it has.
pub const PARTIAL_LINE_DELAY: Duration = Duration::from_millis(10);

/// How long other sources wait for a source that has written nothing more of its
/// partial line before the writer ends that line for it.
pub const LINE_HOLD: Duration = Duration::from_secs(1);

/// How long other sources wait for one partial line at most, even while its
/// source keeps adding to it (a row of progress dots, say).
pub const LINE_HOLD_MAX: Duration = Duration::from_secs(3);

/// A message from a pump to its writer.
enum Message {
    Data {
        source: usize,
        bytes: Vec<u8>,
        /// Returned to the pump's semaphore once the bytes are written.
        _permit: OwnedSemaphorePermit,
    },
    /// The source's stream reached end of file; `drained` fires once everything
    /// before it has been written to the sink.
    End { source: usize, drained: oneshot::Sender<()> },
}

impl Message {
    fn source(&self) -> usize {
        match self {
            Message::Data { source, .. } | Message::End { source, .. } => *source,
        }
    }
}

/// The result of a writer task, once every [`StreamWriter`] is gone.
pub struct WriterEnd {
    pub sink: ByteWriter,
    /// Whether the last bytes written ended mid-line.
    pub mid_line: bool,
}

/// The sending side of one writer, cloned per source.
#[derive(Clone)]
pub struct StreamWriter {
    tx: mpsc::UnboundedSender<Message>,
    /// Set once the launcher's stream is a broken pipe (its reader is gone).
    broken: Arc<AtomicBool>,
    /// Set once output was lost for another reason; see [`StreamWriter::lost`].
    lost: Arc<AtomicBool>,
}

/// Starts the writer task of one sink for `sources` sources. The writer
/// collects up to `buffer` bytes before it writes to the sink: [`SINK_BUFFER`],
/// or 0 for a sink that collects writes itself, such as a [`BlockingSink`].
/// Labels, if given, prefix every line of source `i` with `labels[i]`. The
/// task returns the sink once every [`StreamWriter`] is dropped and all
/// messages are written.
pub fn start_writer(
    sink: ByteWriter,
    buffer: usize,
    sources: usize,
    labels: Option<Vec<String>>,
) -> (StreamWriter, tokio::task::JoinHandle<WriterEnd>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let broken = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicBool::new(false));
    let writer = Writer {
        sink: BufWriter::with_capacity(buffer, sink),
        labels,
        line_position: vec![LinePosition::Start; sources],
        dangling: None,
        owner: None,
        owner_since: Instant::now(),
        owner_active: Instant::now(),
        held: VecDeque::new(),
        scratch: Vec::new(),
        broken: broken.clone(),
        lost: lost.clone(),
    };
    let handle = tokio::spawn(writer.run(rx));
    (StreamWriter { tx, broken, lost }, handle)
}

impl StreamWriter {
    /// Returns a flag that becomes true once some output of the ranks could
    /// not be written: to this writer's sink, or to a rank's `--output-dir`
    /// file. A broken pipe does not set it.
    pub fn lost(&self) -> Arc<AtomicBool> {
        self.lost.clone()
    }

    /// Forwards everything `reader` yields as the output of `source`, copying
    /// it to `copy` as well if given. Resolves once the stream ended and its
    /// last byte reached the sink.
    ///
    /// Complete lines go out as soon as they are read. A partial line at the
    /// end of a read waits up to [`PARTIAL_LINE_DELAY`] for the rest and then
    /// goes out on its own. A prompt or progress bar thus shows at once, and
    /// a line written in several pieces is sent whole.
    pub async fn pump(&self, source: usize, mut reader: ByteReader, mut copy: Option<ByteWriter>) {
        let credits = Arc::new(Semaphore::new(QUEUED_BYTES_PER_STREAM));
        // Bytes read but not yet sent: the start of a line, then what the
        // next read appends, so reads land where they are sent from.
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let start = pending.len();
            pending.reserve(CHUNK_SIZE);
            let mut chunk = (&mut reader).take(CHUNK_SIZE as u64);
            let read = if start == 0 {
                Some(chunk.read_buf(&mut pending).await)
            } else {
                // `read_buf` is cancel-safe, so timing it out loses nothing.
                tokio::time::timeout(PARTIAL_LINE_DELAY, chunk.read_buf(&mut pending)).await.ok()
            };
            let n = match read {
                None => {
                    self.send(&credits, source, std::mem::take(&mut pending)).await;
                    continue;
                }
                Some(Ok(0)) => break,
                // The launcher's reader is gone: closing the rank's pipe gives
                // the rank the EPIPE or SIGPIPE it would get writing there itself.
                Some(Ok(_)) if self.broken.load(Ordering::Relaxed) => break,
                Some(Ok(n)) => n,
                Some(Err(error)) => {
                    tracing::warn!(source, %error, "reading rank output failed");
                    break;
                }
            };
            if let Some(file) = copy.as_mut() {
                if let Err(error) = file.write_all(&pending[start..start + n]).await {
                    let (rank, stream) = (source / 2, if source % 2 == 0 { "stdout" } else { "stderr" });
                    tracing::warn!(rank, stream, %error, "writing the rank's output file failed; the file is incomplete");
                    self.lost.store(true, Ordering::Relaxed);
                    copy = None;
                }
            }
            match pending.iter().rposition(|&b| b == b'\n') {
                Some(last) => {
                    let tail = pending.split_off(last + 1);
                    self.send(&credits, source, std::mem::replace(&mut pending, tail)).await;
                }
                // A line longer than a chunk streams through in pieces.
                None if pending.len() >= CHUNK_SIZE => self.send(&credits, source, std::mem::take(&mut pending)).await,
                None => {}
            }
        }
        if !pending.is_empty() {
            self.send(&credits, source, pending).await;
        }
        if let Some(mut file) = copy {
            let _ = file.flush().await;
        }
        let (drained, done) = oneshot::channel();
        if self.tx.send(Message::End { source, drained }).is_ok() {
            let _ = done.await;
        }
    }

    /// Queues `bytes` for the writer once the stream's byte budget allows.
    async fn send(&self, credits: &Arc<Semaphore>, source: usize, bytes: Vec<u8>) {
        // Chunks never exceed two reads, so they always fit the budget.
        let size = bytes.len().min(QUEUED_BYTES_PER_STREAM) as u32;
        let permit = credits.clone().acquire_many_owned(size).await.expect("the semaphore is never closed");
        let _ = self.tx.send(Message::Data { source, bytes, _permit: permit });
    }
}

/// The position of a source's next byte in its line, for `--tag-output` labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinePosition {
    /// At the start of a line, before its label.
    Start,
    /// After a `\r` that followed text: a redraw, unless `\n` comes next.
    AfterCarriageReturn,
    /// After the label and some text.
    Middle,
}

struct Writer {
    sink: BufWriter<ByteWriter>,
    labels: Option<Vec<String>>,
    /// Per source, where its next byte goes in the line (for labels).
    line_position: Vec<LinePosition>,
    /// The source whose partial line is on the sink, if any.
    owner: Option<usize>,
    /// A source whose stream ended mid-line; its line is ended only if
    /// another source writes after it, so a lone rank's bytes stay exact.
    dangling: Option<usize>,
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
    /// Shared with the pumps and set on the first failed write other than a
    /// broken pipe, which is reported once.
    lost: Arc<AtomicBool>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Message>) -> WriterEnd {
        let mut open = true;
        while open || !self.held.is_empty() {
            let hold_deadline = (self.owner_active + LINE_HOLD).min(self.owner_since + LINE_HOLD_MAX);
            tokio::select! {
                message = rx.recv(), if open => match message {
                    Some(message) => {
                        self.accept(message).await;
                        // Writes collect in the buffer while more are queued,
                        // and reach the sink as soon as the queue runs dry.
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
        WriterEnd {
            mid_line: self.dangling.is_some() || self.owner.is_some(),
            sink: self.sink.into_inner(),
        }
    }

    async fn flush(&mut self) {
        if let Err(error) = self.sink.flush().await {
            self.on_error(&error);
        }
    }

    /// Writes `message` now, or queues it while another source owns the sink.
    async fn accept(&mut self, message: Message) {
        // A redraw that starts with `\r` (as tqdm writes) begins a new frame,
        // so the owner's current frame is a whole line for waiting sources.
        if let Message::Data { source, bytes, .. } = &message {
            if self.owner == Some(*source) && bytes.first() == Some(&b'\r') && !self.held.is_empty() {
                self.release_owner().await;
            }
        }
        match self.owner {
            Some(owner) if owner != message.source() => self.held.push_back(message),
            _ => {
                self.write(message).await;
                self.write_held().await;
            }
        }
    }

    /// Ends the owner's partial line and writes what waited for it. When what
    /// waited starts with `\r`, it redraws the line anyway (two ranks' progress
    /// bars, say), so no newline is added and the frames share one line.
    async fn release_owner(&mut self) {
        if let Some(owner) = self.owner.take() {
            let redraw_next = matches!(self.held.front(), Some(Message::Data { bytes, .. }) if bytes.first() == Some(&b'\r'));
            if !redraw_next {
                tracing::debug!(source = owner, waiting = self.held.len(), "ending a partial line that others waited for");
                self.end_line(owner).await;
            }
        }
        self.write_held().await;
    }

    /// Writes held messages in arrival order until one leaves a partial line;
    /// messages of other ranks then keep waiting.
    async fn write_held(&mut self) {
        let mut index = 0;
        while index < self.held.len() {
            let source = self.held[index].source();
            if self.owner.is_some_and(|owner| owner != source) {
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
            Message::Data { source, bytes, _permit } => {
                if let Some(ended) = self.dangling.take() {
                    self.end_line(ended).await;
                }
                let now = Instant::now();
                if self.owner != Some(source) {
                    self.owner_since = now;
                }
                self.owner_active = now;
                self.write_bytes(source, &bytes).await;
                // A carriage return also frees the sink: progress bars
                // redraw with `\r`, and the next line simply follows it.
                self.owner = (!matches!(bytes.last(), Some(b'\n' | b'\r'))).then_some(source);
            }
            Message::End { source, drained } => {
                if self.owner == Some(source) {
                    self.owner = None;
                    self.dangling = Some(source);
                }
                self.flush().await;
                let _ = drained.send(());
            }
        }
    }

    async fn end_line(&mut self, source: usize) {
        self.write_bytes(source, b"\n").await;
    }

    async fn write_bytes(&mut self, source: usize, bytes: &[u8]) {
        let result = match &self.labels {
            None => self.sink.write_all(bytes).await,
            Some(labels) => {
                self.scratch.clear();
                let label = labels[source].as_bytes();
                // A `\r` (a progress bar's redraw) also starts a line on a
                // terminal, so the label follows it too, unless the `\r` ends
                // the line with a `\n` ("\r\n") or repeats.
                for &byte in bytes {
                    let position = self.line_position[source];
                    let labelled = match position {
                        LinePosition::Start => byte != b'\r',
                        LinePosition::AfterCarriageReturn => byte != b'\r' && byte != b'\n',
                        LinePosition::Middle => false,
                    };
                    if labelled {
                        self.scratch.extend_from_slice(label);
                    }
                    self.scratch.push(byte);
                    self.line_position[source] = match byte {
                        b'\n' => LinePosition::Start,
                        b'\r' if position != LinePosition::Start => LinePosition::AfterCarriageReturn,
                        b'\r' => LinePosition::Start,
                        _ => LinePosition::Middle,
                    };
                }
                self.sink.write_all(&self.scratch).await
            }
        };
        if let Err(error) = result {
            self.on_error(&error);
        }
    }

    /// Records a failed write. Bytes that cannot be written are dropped; a
    /// broken pipe also makes the pumps close the ranks' pipes. Other errors
    /// (a full disk, a closed descriptor) are reported once.
    fn on_error(&mut self, error: &std::io::Error) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            tracing::debug!(%error, "writing to the launcher's output failed");
            self.broken.store(true, Ordering::Relaxed);
            return;
        }
        if !self.lost.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "writing the ranks' output failed; output that cannot be written is lost");
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

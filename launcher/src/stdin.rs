//! Broadcasting the launcher's stdin to the ranks that take it.
//!
//! Reading starts only once every rank has started or failed to, so no rank
//! misses the beginning. Each rank gets its own writer task with a small
//! queue. A rank that does not read its stdin slows the broadcast down once
//! its queue and pipe are full, and a rank that exited is dropped from it. EOF
//! on the launcher's stdin closes every rank's stdin.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::exec::{ByteReader, ByteWriter};

/// Chunks queued per rank before the broadcast waits for it.
const QUEUE_CHUNKS: usize = 4;

const READ_SIZE: usize = 64 * 1024;

/// The place where rank tasks hand over their stdin writers. Dropping every
/// clone signals the broadcaster that all ranks have started.
#[derive(Clone)]
pub struct Registry {
    tx: Option<mpsc::UnboundedSender<(usize, ByteWriter)>>,
}

impl Registry {
    pub fn register(&self, rank: usize, writer: ByteWriter) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((rank, writer));
        }
    }
}

/// Starts the broadcast task. Without `stdin`, or when no rank takes stdin,
/// the launcher's stdin is never read and registered writers are closed.
pub fn start_broadcast(stdin: Option<ByteReader>, any_rank_reads: bool) -> Registry {
    let Some(stdin) = stdin.filter(|_| any_rank_reads) else {
        return Registry { tx: None };
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(broadcast(stdin, rx));
    Registry { tx: Some(tx) }
}

async fn broadcast(mut stdin: ByteReader, mut registrations: mpsc::UnboundedReceiver<(usize, ByteWriter)>) {
    let mut queues = Vec::new();
    while let Some((rank, writer)) = registrations.recv().await {
        let (tx, rx) = mpsc::channel::<Arc<[u8]>>(QUEUE_CHUNKS);
        tokio::spawn(feed_rank(rank, writer, rx));
        queues.push(tx);
    }
    if queues.is_empty() {
        return;
    }

    let mut buffer = vec![0u8; READ_SIZE];
    loop {
        let n = match stdin.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(%error, "reading the launcher's stdin failed; closing the ranks' stdin");
                break;
            }
        };
        let chunk: Arc<[u8]> = Arc::from(&buffer[..n]);
        let mut live = Vec::with_capacity(queues.len());
        for queue in queues {
            if queue.send(chunk.clone()).await.is_ok() {
                live.push(queue);
            }
        }
        queues = live;
        if queues.is_empty() {
            return;
        }
    }
    // Dropping the queues ends each feeder, which closes its rank's stdin.
}

async fn feed_rank(rank: usize, mut writer: ByteWriter, mut chunks: mpsc::Receiver<Arc<[u8]>>) {
    while let Some(chunk) = chunks.recv().await {
        if let Err(error) = writer.write_all(&chunk).await {
            // The rank closed its stdin or exited; it gets no more input.
            tracing::debug!(rank, %error, "rank stdin closed");
            return;
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

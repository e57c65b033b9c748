use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

/// Runs a writer over a duplex sink and returns what reached the sink.
struct Harness {
    writer: Option<StreamWriter>,
    handle: tokio::task::JoinHandle<WriterEnd>,
    sink_reader: DuplexStream,
}

impl Harness {
    fn new(labels: Option<Vec<String>>) -> Harness {
        let (sink, sink_reader) = duplex(16 * 1024 * 1024);
        let sources = labels.as_ref().map_or(2, Vec::len);
        let (writer, handle) = start_writer(Box::new(sink), SINK_BUFFER, sources, labels);
        Harness { writer: Some(writer), handle, sink_reader }
    }

    /// Returns a pipe whose far end is pumped as rank `rank`.
    fn rank(&self, rank: usize) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (rank_end, pumped_end) = duplex(64 * 1024);
        let writer = self.writer.clone().unwrap();
        let pump = tokio::spawn(async move { writer.pump(rank, Box::new(pumped_end), None).await });
        (rank_end, pump)
    }

    /// Queues `bytes` from `source` exactly as a pump would, in call order.
    async fn chunk(&self, source: usize, bytes: &[u8]) {
        let credits = Arc::new(Semaphore::new(QUEUED_BYTES_PER_STREAM));
        self.writer.as_ref().unwrap().send(&credits, source, bytes.to_vec()).await;
    }

    /// Queues the end of `source`'s stream without waiting for it to drain.
    async fn end(&self, source: usize) {
        let (drained, _) = oneshot::channel();
        let _ = self.writer.as_ref().unwrap().tx.send(Message::End { source, drained });
    }

    async fn finish(self) -> String {
        String::from_utf8(self.finish_bytes().await).unwrap()
    }

    async fn finish_bytes(mut self) -> Vec<u8> {
        self.writer.take();
        let end = self.handle.await.unwrap();
        drop(end.sink);
        let mut bytes = Vec::new();
        self.sink_reader.read_to_end(&mut bytes).await.unwrap();
        bytes
    }
}

#[tokio::test]
async fn partial_line_owns_the_sink_until_finished() {
    let harness = Harness::new(None);
    let (mut a, pump_a) = harness.rank(0);
    let (mut b, pump_b) = harness.rank(1);

    a.write_all(b"a-start ").await.unwrap();
    a.flush().await.unwrap();
    tokio::task::yield_now().await;
    b.write_all(b"b-line\n").await.unwrap();
    a.write_all(b"a-end\n").await.unwrap();
    drop(a);
    drop(b);
    pump_a.await.unwrap();
    pump_b.await.unwrap();

    let text = harness.finish().await;
    assert!(text == "a-start a-end\nb-line\n" || text == "b-line\na-start a-end\n", "{text:?}");
}

#[tokio::test]
async fn unterminated_last_line_is_ended_before_other_output() {
    let harness = Harness::new(None);
    let (mut a, pump_a) = harness.rank(0);
    a.write_all(b"no newline").await.unwrap();
    drop(a);
    pump_a.await.unwrap();

    let (mut b, pump_b) = harness.rank(1);
    b.write_all(b"b\n").await.unwrap();
    drop(b);
    pump_b.await.unwrap();

    assert_eq!(harness.finish().await, "no newline\nb\n");
}

#[tokio::test]
async fn stalled_partial_line_is_ended_after_hold() {
    let harness = Harness::new(None);
    let (mut a, pump_a) = harness.rank(0);
    let (mut b, pump_b) = harness.rank(1);

    a.write_all(b"Continue? ").await.unwrap();
    a.flush().await.unwrap();
    // Rank 0 never finishes its line; rank 1's line must still get through.
    b.write_all(b"b-line\n").await.unwrap();
    drop(b);
    tokio::time::timeout(Duration::from_secs(10), pump_b).await.expect("rank 1 was starved").unwrap();

    a.write_all(b"done\n").await.unwrap();
    drop(a);
    pump_a.await.unwrap();
    let text = harness.finish().await;
    assert!(text.contains("b-line\n"), "{text:?}");
    for line in text.lines() {
        let spliced = line.contains("Continue") && line.contains("b-line");
        assert!(!spliced, "spliced: {text:?}");
    }
}

#[tokio::test]
async fn labels_prefix_every_line() {
    let harness = Harness::new(Some(vec!["[0] ".into(), "[1] ".into()]));
    let (mut a, pump_a) = harness.rank(0);
    a.write_all(b"x\ny\nz").await.unwrap();
    drop(a);
    pump_a.await.unwrap();
    assert_eq!(harness.finish().await, "[0] x\n[0] y\n[0] z");
}

#[tokio::test]
async fn long_line_arrives_whole() {
    let harness = Harness::new(None);
    let (mut a, pump_a) = harness.rank(0);
    let (mut b, pump_b) = harness.rank(1);
    let long = "x".repeat(1 << 20);
    let writer_a = tokio::spawn(async move {
        a.write_all(format!("{long}\n").as_bytes()).await.unwrap();
    });
    for _ in 0..100 {
        b.write_all(b"short\n").await.unwrap();
    }
    drop(b);
    writer_a.await.unwrap();
    pump_a.await.unwrap();
    pump_b.await.unwrap();
    let text = harness.finish().await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 101);
    assert_eq!(lines.iter().filter(|l| l.len() == 1 << 20).count(), 1);
    assert_eq!(lines.iter().filter(|l| **l == "short").count(), 100);
}

#[tokio::test]
async fn lone_unterminated_output_stays_byte_exact() {
    let harness = Harness::new(None);
    let (mut a, pump_a) = harness.rank(0);
    a.write_all(b"\x00binary\xff").await.unwrap();
    drop(a);
    pump_a.await.unwrap();
    assert_eq!(harness.finish_bytes().await, b"\x00binary\xff");
}

#[tokio::test]
async fn redraw_with_leading_carriage_return_lets_others_through() {
    let harness = Harness::new(None);
    harness.chunk(0, b"\r 10%").await;
    harness.chunk(1, b"b-line\n").await;
    harness.chunk(0, b"\r 20%").await;
    harness.end(0).await;
    harness.end(1).await;
    assert_eq!(harness.finish().await, "\r 10%\nb-line\n\r 20%");
}

/// Two ranks' progress bars take turns on one line: each frame starts with
/// `\r` and replaces the line, so no newline goes between them.
#[tokio::test]
async fn progress_bars_of_two_ranks_share_a_line() {
    let harness = Harness::new(None);
    harness.chunk(0, b"\r 10%").await;
    harness.chunk(1, b"\r 50%").await;
    harness.chunk(0, b"\r 20%\n").await;
    harness.chunk(1, b"\r 60%\n").await;
    harness.end(0).await;
    harness.end(1).await;
    assert_eq!(harness.finish().await, "\r 10%\r 50%\r 20%\n\r 60%\n");
}

#[tokio::test]
async fn chunk_ending_in_carriage_return_does_not_hold_others() {
    let harness = Harness::new(None);
    harness.chunk(0, b"10%\r").await;
    harness.chunk(1, b"b-line\n").await;
    harness.chunk(0, b"20%\r").await;
    harness.end(0).await;
    harness.end(1).await;
    assert_eq!(harness.finish().await, "10%\rb-line\n20%\r");
}

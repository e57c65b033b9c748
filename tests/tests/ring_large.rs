//! Transfers above 2 GiB, which a single send(2) or recv(2) cannot carry.

mod ring_support;

use ring_support::{loopback_ring, on_every_rank};
use ringleader::ring::RingOptions;

/// Bytes between two markers.
const STRIDE: usize = 1 << 16;

/// Writes the stride index at the start of every stride (and its complement
/// at the end) so that misplaced or missing pieces show without filling
/// gigabytes element by element.
fn mark(buf: &mut [u8], salt: u64) {
    for (i, chunk) in buf.chunks_mut(STRIDE).enumerate() {
        let value = (i as u64) ^ salt;
        let n = chunk.len().min(8);
        chunk[..n].copy_from_slice(&value.to_le_bytes()[..n]);
        let end = chunk.len();
        if end >= 16 {
            chunk[end - 8..].copy_from_slice(&(!value).to_le_bytes());
        }
    }
}

fn first_bad_stride(buf: &[u8], salt: u64) -> Option<usize> {
    buf.chunks(STRIDE).enumerate().position(|(i, chunk)| {
        let value = (i as u64) ^ salt;
        let n = chunk.len().min(8);
        let head_ok = chunk[..n] == value.to_le_bytes()[..n];
        let tail_ok = chunk.len() < 16 || chunk[chunk.len() - 8..] == (!value).to_le_bytes();
        !(head_ok && tail_ok)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_recv_of_2_5_gib_arrives_intact() {
    let len = (5usize << 30) / 2 + 12_345;
    let groups = loopback_ring(2, 1, RingOptions::default()).await;
    let results = on_every_rank(groups, move |mut group| async move {
        if group.rank() == 0 {
            let mut data = vec![0u8; len];
            mark(&mut data, 7);
            group.send(&data, 1).await.map(|()| None)
        } else {
            let mut data = vec![0u8; len];
            group
                .recv(&mut data, 0)
                .await
                .map(|()| first_bad_stride(&data, 7))
        }
    })
    .await;
    assert_eq!(results[0].as_ref().unwrap(), &None);
    assert_eq!(
        results[1].as_ref().unwrap(),
        &None,
        "first corrupted stride"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_gather_into_2_2_gib_arrives_intact() {
    // 1.1 GiB per rank, two connections: four passes of 275 MiB.
    let len = (11usize << 30) / 10;
    let groups = loopback_ring(2, 2, RingOptions::default()).await;
    let results = on_every_rank(groups, move |mut group| async move {
        let rank = group.rank();
        let mut input = vec![0u8; len];
        mark(&mut input, rank as u64);
        let mut output = vec![0u8; 2 * len];
        group.all_gather(&input, &mut output).await.map(|()| {
            drop(input);
            (0..2)
                .map(|r| first_bad_stride(&output[r * len..(r + 1) * len], r as u64))
                .collect::<Vec<_>>()
        })
    })
    .await;
    for (rank, result) in results.into_iter().enumerate() {
        assert_eq!(
            result.unwrap(),
            vec![None, None],
            "rank {rank}: first corrupted stride per block"
        );
    }
}

//! Rings of 1 to 8 ranks inside one process over loopback TCP, checked
//! against a sequential reference.

mod ring_support;

use half::{bf16, f16};
use ring_support::{input, loopback_ring, on_every_rank, reference, Op, Rng, TestValue};
use ringleader::ring::{Group, RingOptions};

const DTYPES: [&str; 12] = [
    "float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
    "uint16", "uint32", "uint64",
];

#[derive(Debug, Clone, Copy)]
struct Case {
    index: usize,
    dtype: &'static str,
    op: Op,
    len: usize,
}

/// Random cases that every rank derives identically from `seed`: lengths
/// around the group size, odd lengths and lengths large enough to split
/// across connections.
fn cases(seed: u64, size: usize, count: usize) -> Vec<Case> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|index| {
            let len = match rng.below(6) {
                0 => rng.below(size as u64 + 2) as usize,
                1 => size * (1 + rng.below(4) as usize) + rng.below(size as u64) as usize,
                2 => 1 + rng.below(5000) as usize,
                3 => 60_000 + rng.below(300_000) as usize,
                4 => 700_000 + rng.below(600_000) as usize,
                _ => 0,
            };
            let op = [Op::Sum, Op::Max, Op::Min, Op::Gather][rng.below(4) as usize];
            let dtype = DTYPES[rng.below(DTYPES.len() as u64) as usize];
            Case {
                index,
                dtype,
                op,
                len,
            }
        })
        .collect()
}

async fn check<T: TestValue>(group: &mut Group, seed: u64, case: Case) -> Result<(), String> {
    let (rank, size) = (group.rank(), group.size());
    let mine: Vec<T> = input(seed, case.index, rank, case.len);
    let outcome = match case.op {
        Op::Sum | Op::Max | Op::Min => {
            let mut data = mine.clone();
            let result = match case.op {
                Op::Sum => group.all_sum(&mut data).await,
                Op::Max => group.all_max(&mut data).await,
                _ => group.all_min(&mut data).await,
            };
            result.map(|()| data)
        }
        Op::Gather => {
            let mut output = vec![T::zeroed(); case.len * size];
            group.all_gather(&mine, &mut output).await.map(|()| output)
        }
    };
    let got = outcome.map_err(|err| format!("rank {rank}: {case:?} failed: {err}"))?;

    let want: Vec<T> = reference(case.op, seed, case.index, size, case.len);
    if let Some(i) =
        (0..want.len()).find(|&i| bytemuck::bytes_of(&got[i]) != bytemuck::bytes_of(&want[i]))
    {
        return Err(format!(
            "rank {rank} of {size}: {case:?} differs at element {i}: got {:?}, expected {:?}",
            got[i], want[i]
        ));
    }
    Ok(())
}

async fn run_case(group: &mut Group, seed: u64, case: Case) -> Result<(), String> {
    match case.dtype {
        "float32" => check::<f32>(group, seed, case).await,
        "float64" => check::<f64>(group, seed, case).await,
        "float16" => check::<f16>(group, seed, case).await,
        "bfloat16" => check::<bf16>(group, seed, case).await,
        "int8" => check::<i8>(group, seed, case).await,
        "int16" => check::<i16>(group, seed, case).await,
        "int32" => check::<i32>(group, seed, case).await,
        "int64" => check::<i64>(group, seed, case).await,
        "uint8" => check::<u8>(group, seed, case).await,
        "uint16" => check::<u16>(group, seed, case).await,
        "uint32" => check::<u32>(group, seed, case).await,
        _ => check::<u64>(group, seed, case).await,
    }
}

async fn run_random_cases(size: usize, connections: usize, seed: u64, count: usize) {
    println!("ring of {size} ranks, {connections} connections, seed {seed}");
    let groups = loopback_ring(size, connections, RingOptions::default()).await;
    let results = on_every_rank(groups, move |mut group| async move {
        for case in cases(seed, group.size(), count) {
            run_case(&mut group, seed, case).await?;
        }
        Ok::<_, String>(())
    })
    .await;
    for result in results {
        result.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_collectives_match_reference() {
    for size in 1..=8 {
        let connections = 1 + size % 3;
        run_random_cases(size, connections, 1000 + size as u64, 14).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_sum_over_three_connections() {
    // 3 ranks, 3 connections, 12 MiB of f32: six passes over both
    // directions of every connection.
    let size = 3;
    let len = 3 << 20;
    let groups = loopback_ring(size, 3, RingOptions::default()).await;
    let results = on_every_rank(groups, move |mut group| async move {
        let case = Case {
            index: 0,
            dtype: "float32",
            op: Op::Sum,
            len,
        };
        run_case(&mut group, 7, case).await
    })
    .await;
    for result in results {
        result.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_recv_between_neighbours_delivers_every_byte() {
    for size in 2..=4 {
        for connections in 1..=3 {
            for len in [0usize, 5, 1023, 1025, 4097, 300_001] {
                let groups = loopback_ring(size, connections, RingOptions::default()).await;
                let results = on_every_rank(groups, move |mut group| async move {
                    shift_right(&mut group, len).await
                })
                .await;
                for result in results {
                    result.unwrap_or_else(|err| {
                        panic!("{size} ranks, {connections} connections, {len} bytes: {err}")
                    });
                }
            }
        }
    }
}

/// Sends `len` bytes to the right neighbour and receives as many from the
/// left one. Even ranks send first so that the ring cannot deadlock.
async fn shift_right(group: &mut Group, len: usize) -> Result<(), String> {
    let (rank, size) = (group.rank(), group.size());
    let right = (rank + 1) % size;
    let left = (rank + size - 1) % size;
    let mine: Vec<u8> = input(99, len, rank, len);
    let mut received = vec![0u8; len];

    let result = if rank % 2 == 0 {
        match group.send(&mine, right).await {
            Ok(()) => group.recv(&mut received, left).await,
            Err(err) => Err(err),
        }
    } else {
        match group.recv(&mut received, left).await {
            Ok(()) => group.send(&mine, right).await,
            Err(err) => Err(err),
        }
    };
    result.map_err(|err| format!("rank {rank}: {err}"))?;

    let want: Vec<u8> = input(99, len, left, len);
    if received != want {
        return Err(format!("rank {rank} received wrong bytes from rank {left}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_non_neighbour_is_rejected() {
    let groups = loopback_ring(4, 1, RingOptions::default()).await;
    let mut group = groups.into_iter().next().unwrap();
    let err = group.send(&[1u8], 2).await.unwrap_err().to_string();
    assert!(err.contains("rank 2 is not a neighbour of rank 0"), "{err}");
}

#[tokio::test]
async fn one_rank_group_needs_no_socket() {
    let mut group: Group = Group::single();
    assert_eq!((group.rank(), group.size()), (0, 1));

    let mut data = [1.5f32, -2.0];
    group.all_sum(&mut data).await.unwrap();
    assert_eq!(data, [1.5, -2.0]);

    let mut gathered = [0i32; 2];
    group.all_gather(&[3, 4], &mut gathered).await.unwrap();
    assert_eq!(gathered, [3, 4]);
    group.barrier().await.unwrap();
}

#[tokio::test]
async fn init_without_ring_variables_is_one_rank() {
    if std::env::var_os("MLX_RANK").is_some() || std::env::var_os("MLX_HOSTFILE").is_some() {
        println!("skipped: the test environment sets MLX_RANK or MLX_HOSTFILE");
        return;
    }
    let group = Group::init().await.unwrap();
    assert_eq!(group.size(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_returns_on_every_rank() {
    let groups = loopback_ring(5, 2, RingOptions::default()).await;
    let results = on_every_rank(groups, |mut group| async move {
        for _ in 0..3 {
            group.barrier().await?;
        }
        Ok::<_, ringleader::ring::RingError>(())
    })
    .await;
    for result in results {
        result.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_gather_with_wrong_output_length_is_rejected() {
    let mut group = loopback_ring(2, 1, RingOptions::default()).await.remove(0);
    let mut output = [0u8; 3];
    let err = group
        .all_gather(&[1u8, 2], &mut output)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("output holds 3 elements"), "{err}");
}

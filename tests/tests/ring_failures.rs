//! How the ring fails: dead and silent peers, missing neighbours, busy
//! ports, stray connections. MLX 0.32 hangs or spins in most of these cases;
//! ringleader must return an error promptly on every surviving rank.

mod ring_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ring_support::{loopback_ring, on_every_rank};
use ringleader::net::{Listener, Net, TokioNet};
use ringleader::ring::{AddressTable, BoundRank, Group, RingError, RingOptions};
use tokio::io::AsyncReadExt;

/// How long survivors may take to notice a dead peer; far above the few
/// round trips the failure needs to travel round a loopback ring.
const NOTICE_LIMIT: Duration = Duration::from_secs(10);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Returns a loopback address that was free a moment ago and on which
/// nothing listens now, in place of a rank that never started.
async fn released_port() -> SocketAddr {
    let listener = TokioNet.bind(any_port()).await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_fail_when_rank_dies() {
    let groups = loopback_ring(4, 2, RingOptions::default()).await;
    let len = 16 << 20;
    let results = on_every_rank(groups, move |mut group| async move {
        let mut data = vec![1.0f32; len];
        if group.rank() == 2 {
            // Rank 2 dies 50 ms into the collective: its future is dropped
            // and its sockets close, as when the process is killed.
            let cut =
                tokio::time::timeout(Duration::from_millis(50), group.all_sum(&mut data)).await;
            assert!(
                cut.is_err(),
                "the all_sum was still running when rank 2 died"
            );
            drop(group);
            return (2, Instant::now(), None);
        }
        let result = group.all_sum(&mut data).await;
        (group.rank(), Instant::now(), Some(result))
    })
    .await;

    let died_at = results[2].1;
    for (rank, finished_at, result) in results {
        let Some(result) = result else { continue };
        let err = result.expect_err("a survivor's all_sum fails");
        let message = err.to_string();
        println!("rank {rank}: {message}");
        assert!(
            matches!(err, RingError::PeerLost { .. }),
            "rank {rank}: {message}"
        );
        assert!(
            message.contains("lost the connection to rank"),
            "rank {rank}: {message}"
        );
        assert!(message.contains("127.0.0.1:"), "rank {rank}: {message}");
        let waited = finished_at.saturating_duration_since(died_at);
        assert!(
            waited < NOTICE_LIMIT,
            "rank {rank} noticed after {waited:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbours_of_dead_rank_name_it() {
    let groups = loopback_ring(3, 1, RingOptions::default()).await;
    let results = on_every_rank(groups, |mut group| async move {
        if group.rank() == 1 {
            drop(group);
            return None;
        }
        let mut data = vec![1i64; 100_000];
        Some((group.rank(), group.all_sum(&mut data).await))
    })
    .await;

    // Ranks 0 and 2 are both neighbours of rank 1 in a ring of three; at
    // least one of them reads the close of rank 1's sockets (the other may
    // first get the close from its other neighbour).
    let messages: Vec<String> = results
        .into_iter()
        .flatten()
        .map(|(rank, result)| format!("rank {rank}: {}", result.unwrap_err()))
        .collect();
    println!("{messages:#?}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains("connection to rank 1 at 127.0.0.1:")),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_group_rejects_further_operations() {
    let groups = loopback_ring(2, 1, RingOptions::default()).await;
    let results = on_every_rank(groups, |mut group| async move {
        if group.rank() == 1 {
            return None;
        }
        let mut data = vec![0u8; 10];
        let first = group.all_sum(&mut data).await;
        let second = group.all_sum(&mut data).await;
        Some((first, second))
    })
    .await;

    let (first, second) = results.into_iter().flatten().next().unwrap();
    assert!(
        matches!(first, Err(RingError::PeerLost { .. })),
        "{first:?}"
    );
    let second = second.unwrap_err().to_string();
    assert!(second.contains("group is unusable"), "{second}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_hits_the_operation_timeout() {
    let options = RingOptions {
        op_timeout: Some(Duration::from_millis(300)),
        ..RingOptions::default()
    };
    let groups = loopback_ring(2, 1, options).await;
    let mut groups = groups.into_iter();
    let mut active = groups.next().unwrap();
    let mut silent = groups.next().unwrap();

    // Rank 1 stays connected but takes part only after rank 0 gave up.
    let (gave_up, wait) = tokio::sync::oneshot::channel::<()>();
    let silent_task = tokio::spawn(async move {
        let _ = wait.await;
        let mut data = [1u32; 4];
        silent.all_sum(&mut data).await
    });

    let started = Instant::now();
    let mut data = [1u32; 4];
    let err = active.all_sum(&mut data).await.unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err, RingError::OpTimeout { .. }), "{err}");
    assert!(
        waited >= Duration::from_millis(300),
        "timed out early, after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "timed out late, after {waited:?}"
    );

    // Rank 0 closed its sockets on the timeout, so rank 1 fails at once.
    gave_up.send(()).unwrap();
    let late = silent_task.await.unwrap().unwrap_err();
    assert!(
        matches!(late, RingError::PeerLost { peer: 0, .. }),
        "{late}"
    );
}

#[tokio::test]
async fn connect_gives_up_when_neighbour_never_starts() {
    let options = RingOptions {
        connect_timeout: Duration::from_secs(1),
        ..RingOptions::default()
    };
    let rank0 = BoundRank::bind(TokioNet, &[any_port()], options.clone())
        .await
        .unwrap();
    let absent = released_port().await;
    let table = AddressTable::new(vec![rank0.local_addrs().unwrap(), vec![absent]]).unwrap();

    let started = Instant::now();
    let err = match rank0.join(0, &table).await {
        Ok(_) => panic!("rank 0 formed a ring without rank 1"),
        Err(err) => err,
    };
    let waited = started.elapsed();
    let message = err.to_string();
    println!("{message}");
    assert!(
        waited >= Duration::from_millis(900),
        "gave up early, after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "gave up late, after {waited:?}"
    );
    assert!(message.contains("rank 1"), "{message}");
    assert!(
        message.contains("RINGLEADER_RING_CONNECT_TIMEOUT"),
        "{message}"
    );
}

#[tokio::test]
async fn accept_gives_up_when_left_neighbour_never_connects() {
    let options = RingOptions {
        connect_timeout: Duration::from_secs(1),
        ..RingOptions::default()
    };
    // Ranks 0 and 1 of three start; rank 2 never does.
    let rank0 = BoundRank::bind(TokioNet, &[any_port()], options.clone())
        .await
        .unwrap();
    let rank1 = BoundRank::bind(TokioNet, &[any_port()], options.clone())
        .await
        .unwrap();
    let table = AddressTable::new(vec![
        rank0.local_addrs().unwrap(),
        rank1.local_addrs().unwrap(),
        vec![released_port().await],
    ])
    .unwrap();

    let joining1 = tokio::spawn({
        let table = table.clone();
        async move { rank1.join(1, &table).await.err().map(|e| e.to_string()) }
    });
    let err = rank0
        .join(0, &table)
        .await
        .err()
        .expect("rank 0 cannot form the ring")
        .to_string();
    println!("rank 0: {err}");
    assert!(err.contains("waiting for rank 2 to connect"), "{err}");
    let err1 = joining1
        .await
        .unwrap()
        .expect("rank 1 cannot form the ring either");
    println!("rank 1: {err1}");
    assert!(err1.contains("connecting to rank 2"), "{err1}");
}

#[tokio::test]
async fn busy_port_error_names_the_port() {
    let taken = TokioNet.bind(any_port()).await.unwrap();
    let addr = taken.local_addr().unwrap();
    let table = AddressTable::new(vec![vec![addr], vec![any_port()]]).unwrap();

    let err = match Group::connect(0, &table, TokioNet, RingOptions::default()).await {
        Ok(_) => panic!("bound a port that is in use"),
        Err(err) => err,
    };
    let message = err.to_string();
    assert!(matches!(err, RingError::Bind { .. }), "{message}");
    assert!(message.contains(&addr.to_string()), "{message}");
    assert!(
        message.contains(&format!("port {}", addr.port())),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_connection_to_formed_ring_is_closed() {
    // Another job reusing this job's ports connects after the ring formed:
    // it must be turned away, not left hanging or taken for a neighbour.
    let any = any_port();
    let bound = BoundRank::bind(TokioNet, &[any], RingOptions::default())
        .await
        .unwrap();
    let other = BoundRank::bind(TokioNet, &[any], RingOptions::default())
        .await
        .unwrap();
    let addrs = vec![bound.local_addrs().unwrap(), other.local_addrs().unwrap()];
    let table = AddressTable::new(addrs.clone()).unwrap();
    let (a, b) = tokio::join!(bound.join(0, &table), other.join(1, &table));
    let (mut a, mut b) = (a.unwrap(), b.unwrap());

    let mut stray = TokioNet.connect(addrs[0][0]).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(NOTICE_LIMIT, stray.read(&mut byte)).await;
    let closed = matches!(read, Ok(Ok(0)) | Ok(Err(_)));
    assert!(closed, "the stray connection was not closed: {read:?}");

    // The ring itself still works.
    let (x, y) = tokio::join!(a.barrier(), b.barrier());
    x.unwrap();
    y.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_operation_makes_group_unusable() {
    let mut groups = loopback_ring(2, 1, RingOptions::default()).await;
    let mut group = groups.remove(0);
    let mut data = vec![0u8; 1 << 20];
    let cut = tokio::time::timeout(Duration::from_millis(20), group.all_sum(&mut data)).await;
    assert!(cut.is_err(), "the all_sum completed without its peer");
    let err = group.all_sum(&mut data).await.unwrap_err().to_string();
    assert!(err.contains("cancelled"), "{err}");
}

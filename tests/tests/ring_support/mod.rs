//! Helpers shared by the ring tests: loopback rings in one process,
//! deterministic test data and a sequential reference.

#![allow(dead_code)]

pub mod interop;
pub mod launch;

use std::future::Future;
use std::net::SocketAddr;

use half::{bf16, f16};
use ringleader::net::TokioNet;
use ringleader::ring::{AddressTable, BoundRank, Group, Ordered, RingOptions};

/// Forms a ring of `size` ranks with `connections` loopback connections per
/// neighbour, binding port 0 first and building the table from the real ports.
pub async fn loopback_ring(size: usize, connections: usize, options: RingOptions) -> Vec<Group> {
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut bound = Vec::new();
    for _ in 0..size {
        let addrs = vec![any_port; connections];
        bound.push(
            BoundRank::bind(TokioNet, &addrs, options.clone())
                .await
                .unwrap(),
        );
    }
    let table =
        AddressTable::new(bound.iter().map(|b| b.local_addrs().unwrap()).collect()).unwrap();

    let joins: Vec<_> = bound
        .into_iter()
        .enumerate()
        .map(|(rank, b)| {
            let table = table.clone();
            tokio::spawn(async move { b.join(rank, &table).await })
        })
        .collect();
    let mut groups = Vec::new();
    for join in joins {
        groups.push(join.await.unwrap().expect("loopback ring forms"));
    }
    groups
}

/// Runs `body` on every rank at once and returns the results in rank order.
pub async fn on_every_rank<F, Fut, T>(groups: Vec<Group>, body: F) -> Vec<T>
where
    F: Fn(Group) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = groups.into_iter().map(|g| tokio::spawn(body(g))).collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("rank task does not panic"));
    }
    results
}

/// A small deterministic generator (xorshift64*), so that every rank derives
/// the same cases and the reference can recompute every rank's input.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An element type the tests can fill with small integers, whose sums over
/// at most eight ranks are exact in every type.
pub trait TestValue: Ordered + std::fmt::Debug {
    fn from_small(value: i8) -> Self;
}

macro_rules! test_values {
    ($($t:ty => $conv:expr),* $(,)?) => {$(
        impl TestValue for $t {
            fn from_small(value: i8) -> Self {
                let convert: fn(i8) -> $t = $conv;
                convert(value)
            }
        }
    )*};
}

test_values! {
    f32 => |v| v as f32,
    f64 => |v| v as f64,
    f16 => |v| f16::from_f32(v as f32),
    bf16 => |v| bf16::from_f32(v as f32),
    i8 => |v| v,
    i16 => |v| v as i16,
    i32 => |v| v as i32,
    i64 => |v| v as i64,
    u8 => |v| v.unsigned_abs(),
    u16 => |v| v.unsigned_abs() as u16,
    u32 => |v| v.unsigned_abs() as u32,
    u64 => |v| v.unsigned_abs() as u64,
}

/// Returns the input of `rank` for case `case` of a run with `seed`.
pub fn input<T: TestValue>(seed: u64, case: usize, rank: usize, len: usize) -> Vec<T> {
    let mut rng = Rng::new(seed ^ ((case as u64) << 20) ^ ((rank as u64) << 40));
    (0..len)
        .map(|_| T::from_small(rng.below(9) as i8 - 4))
        .collect()
}

/// The operations the in-process and interop tests check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Sum,
    Max,
    Min,
    Gather,
}

/// What `op` returns on every rank, computed one rank after another.
pub fn reference<T: TestValue>(op: Op, seed: u64, case: usize, size: usize, len: usize) -> Vec<T> {
    let inputs: Vec<Vec<T>> = (0..size).map(|rank| input(seed, case, rank, len)).collect();
    if op == Op::Gather {
        return inputs.concat();
    }
    let mut result = inputs[0].clone();
    for other in &inputs[1..] {
        for (r, &x) in result.iter_mut().zip(other) {
            *r = match op {
                Op::Sum => r.sum(x),
                Op::Max if *r < x => x,
                Op::Min if x < *r => x,
                _ => *r,
            };
        }
    }
    result
}

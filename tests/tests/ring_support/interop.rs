//! The Rust side of the MLX interop test: the case list, the inputs (the same
//! formulas as tests/python/ring_interop.py) and one rank's run.

use half::{bf16, f16};
use ringleader::ring::{Group, Ordered, RingError};

/// One collective of the interop run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// `sum`, `max`, `min`, `gather` or `sendrecv`.
    pub op: String,
    /// An MLX dtype name.
    pub dtype: String,
    /// Elements per rank.
    pub len: usize,
}

impl Case {
    pub fn new(op: &str, dtype: &str, len: usize) -> Self {
        Case {
            op: op.into(),
            dtype: dtype.into(),
            len,
        }
    }

    /// Bytes of this case's result on one rank of `size`.
    pub fn result_bytes(&self, size: usize) -> usize {
        let per_rank = self.len * dtype_size(&self.dtype);
        if self.op == "gather" {
            per_rank * size
        } else {
            per_rank
        }
    }
}

pub fn dtype_size(dtype: &str) -> usize {
    match dtype {
        "int8" | "uint8" => 1,
        "int16" | "uint16" | "float16" | "bfloat16" => 2,
        "int32" | "uint32" | "float32" => 4,
        _ => 8,
    }
}

pub fn cases_to_json(cases: &[Case]) -> String {
    let list: Vec<_> = cases
        .iter()
        .map(|c| serde_json::json!({"op": c.op, "dtype": c.dtype, "len": c.len}))
        .collect();
    serde_json::Value::Array(list).to_string()
}

pub fn cases_from_json(text: &str) -> Vec<Case> {
    let list: Vec<serde_json::Value> = serde_json::from_str(text).expect("the case list is JSON");
    list.iter()
        .map(|c| Case {
            op: c["op"].as_str().expect("op").into(),
            dtype: c["dtype"].as_str().expect("dtype").into(),
            len: c["len"].as_u64().expect("len") as usize,
        })
        .collect()
}

/// An element the interop inputs can be made of.
pub trait InteropValue: Ordered {
    fn from_key(key: u64) -> Self;
}

macro_rules! integer_values {
    ($($t:ty),*) => {$(
        impl InteropValue for $t {
            fn from_key(key: u64) -> Self {
                // Wrapping product, then truncation, as the MLX side does.
                key.wrapping_mul(2_654_435_761) as $t
            }
        }
    )*};
}
integer_values!(i8, i16, i32, i64, u8, u16, u32, u64);

fn double_of(key: u64) -> f64 {
    (key % 1000) as f64 / 7.0 - 50.0
}

impl InteropValue for f64 {
    fn from_key(key: u64) -> Self {
        double_of(key)
    }
}
impl InteropValue for f32 {
    fn from_key(key: u64) -> Self {
        double_of(key) as f32
    }
}
impl InteropValue for f16 {
    fn from_key(key: u64) -> Self {
        f16::from_f32(double_of(key) as f32)
    }
}
impl InteropValue for bf16 {
    fn from_key(key: u64) -> Self {
        bf16::from_f32(double_of(key) as f32)
    }
}

/// Returns the input of `rank` for case number `case`.
pub fn input_of<T: InteropValue>(case: usize, rank: usize, len: usize) -> Vec<T> {
    let base = (rank as u64) * 1_000_003 + (case as u64) * 7919;
    (0..len as u64)
        .map(|i| T::from_key(i.wrapping_mul(31).wrapping_add(base)))
        .collect()
}

async fn run_typed<T: InteropValue>(
    group: &mut Group,
    case: &Case,
    number: usize,
) -> Result<Vec<u8>, RingError> {
    let (rank, size) = (group.rank(), group.size());
    let mut data: Vec<T> = input_of(number, rank, case.len);
    match case.op.as_str() {
        "sum" => group.all_sum(&mut data).await?,
        "max" => group.all_max(&mut data).await?,
        "min" => group.all_min(&mut data).await?,
        "gather" => {
            let mut output = vec![T::zeroed(); case.len * size];
            group.all_gather(&data, &mut output).await?;
            data = output;
        }
        "sendrecv" => {
            let (right, left) = ((rank + 1) % size, (rank + size - 1) % size);
            let mut received = vec![T::zeroed(); case.len];
            if rank % 2 == 0 {
                group.send(&data, right).await?;
                group.recv(&mut received, left).await?;
            } else {
                group.recv(&mut received, left).await?;
                group.send(&data, right).await?;
            }
            data = received;
        }
        other => panic!("unknown op {other}"),
    }
    Ok(bytemuck::cast_slice(&data).to_vec())
}

/// Runs case number `number` on this rank and returns the result's bytes.
pub async fn run_case(group: &mut Group, case: &Case, number: usize) -> Result<Vec<u8>, RingError> {
    match case.dtype.as_str() {
        "float32" => run_typed::<f32>(group, case, number).await,
        "float64" => run_typed::<f64>(group, case, number).await,
        "float16" => run_typed::<f16>(group, case, number).await,
        "bfloat16" => run_typed::<bf16>(group, case, number).await,
        "int8" => run_typed::<i8>(group, case, number).await,
        "int16" => run_typed::<i16>(group, case, number).await,
        "int32" => run_typed::<i32>(group, case, number).await,
        "int64" => run_typed::<i64>(group, case, number).await,
        "uint8" => run_typed::<u8>(group, case, number).await,
        "uint16" => run_typed::<u16>(group, case, number).await,
        "uint32" => run_typed::<u32>(group, case, number).await,
        "uint64" => run_typed::<u64>(group, case, number).await,
        other => panic!("unknown dtype {other}"),
    }
}

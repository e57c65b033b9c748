//! Element types the ring backend can move and reduce, and the reductions.
//!
//! Elements travel as their in-memory bytes (little-endian on every platform
//! MLX supports), exactly as MLX sends them. The reductions apply the same
//! expressions as MLX's `SumOp`, `MaxOp` and `MinOp`, so a sum, maximum or
//! minimum gives the same bits whether a Rust or an MLX rank computes it:
//! `out = out + in` (wrapping for integers), `out = if out < in { in } else
//! { out }` and `out = if in < out { in } else { out }`.

use half::{bf16, f16};

/// A type that can be sent, gathered and summed.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    /// The MLX dtype name, for messages.
    const DTYPE: &'static str;

    /// Returns `self + other` the way MLX computes it.
    fn sum(self, other: Self) -> Self;
}

/// An element with an order, usable with `all_max` and `all_min`.
pub trait Ordered: Element + PartialOrd {}

macro_rules! integer_elements {
    ($($t:ty => $name:literal),* $(,)?) => {$(
        impl Element for $t {
            const DTYPE: &'static str = $name;
            fn sum(self, other: Self) -> Self {
                self.wrapping_add(other)
            }
        }
        impl Ordered for $t {}
    )*};
}

macro_rules! float_elements {
    ($($t:ty => $name:literal),* $(,)?) => {$(
        impl Element for $t {
            const DTYPE: &'static str = $name;
            fn sum(self, other: Self) -> Self {
                self + other
            }
        }
        impl Ordered for $t {}
    )*};
}

integer_elements! {
    i8 => "int8", i16 => "int16", i32 => "int32", i64 => "int64",
    u8 => "uint8", u16 => "uint16", u32 => "uint32", u64 => "uint64",
}

// half's f16 and bf16 add in f32 and round to nearest even, which gives the
// correctly rounded half-precision sum, as MLX does.
float_elements! {
    f32 => "float32", f64 => "float64", f16 => "float16", bf16 => "bfloat16",
}

/// A single-precision complex number laid out as MLX's `complex64`: the real
/// part, then the imaginary part. It can be summed and gathered but has no
/// order.
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct Complex64 {
    pub re: f32,
    pub im: f32,
}

impl Element for Complex64 {
    const DTYPE: &'static str = "complex64";
    fn sum(self, other: Self) -> Self {
        Complex64 {
            re: self.re + other.re,
            im: self.im + other.im,
        }
    }
}

/// A reduction over byte slices of whole elements: `dst[i] = op(dst[i],
/// src[i])`. Both slices hold the same number of elements and `dst` is
/// aligned for the element type.
pub(crate) type ReduceFn = fn(dst: &mut [u8], src: &[u8]);

/// The three reductions of the ring backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReduceOp {
    Sum,
    Max,
    Min,
}

impl ReduceOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "all_sum",
            ReduceOp::Max => "all_max",
            ReduceOp::Min => "all_min",
        }
    }
}

/// Reinterprets staged bytes as elements. The staging buffer is 8-byte
/// aligned and every element type here has an alignment of at most 8, but
/// `src` may start anywhere a previous partial element was moved to, so
/// fall back to an unaligned copy when needed.
fn for_each_pair<T: Element>(dst: &mut [u8], src: &[u8], mut f: impl FnMut(&mut T, T)) {
    let dst: &mut [T] = bytemuck::cast_slice_mut(dst);
    match bytemuck::try_cast_slice::<u8, T>(src) {
        Ok(src) => dst.iter_mut().zip(src).for_each(|(d, s)| f(d, *s)),
        Err(_) => {
            let size = std::mem::size_of::<T>();
            for (d, chunk) in dst.iter_mut().zip(src.chunks_exact(size)) {
                f(d, bytemuck::pod_read_unaligned(chunk));
            }
        }
    }
}

pub(crate) fn sum_fn<T: Element>() -> ReduceFn {
    |dst, src| for_each_pair::<T>(dst, src, |d, s| *d = d.sum(s))
}

pub(crate) fn max_fn<T: Ordered>() -> ReduceFn {
    |dst, src| {
        for_each_pair::<T>(dst, src, |d, s| {
            if *d < s {
                *d = s;
            }
        })
    }
}

pub(crate) fn min_fn<T: Ordered>() -> ReduceFn {
    |dst, src| {
        for_each_pair::<T>(dst, src, |d, s| {
            if s < *d {
                *d = s;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply<T: Element>(f: ReduceFn, dst: &mut [T], src: &[T]) {
        f(bytemuck::cast_slice_mut(dst), bytemuck::cast_slice(src));
    }

    #[test]
    fn integer_sum_wraps_like_mlx() {
        let mut dst = [i8::MAX, 5];
        apply(sum_fn::<i8>(), &mut dst, &[1, -7]);
        assert_eq!(dst, [i8::MIN, -2]);
    }

    #[test]
    fn max_nan_follows_std_max() {
        // std::max(out, in) returns `out` unless `out < in`.
        let mut dst = [f32::NAN, 1.0, 2.0];
        apply(max_fn::<f32>(), &mut dst, &[3.0, f32::NAN, 5.0]);
        assert!(dst[0].is_nan());
        assert_eq!(dst[1], 1.0);
        assert_eq!(dst[2], 5.0);
    }

    #[test]
    fn min_keeps_first_of_signed_zeros() {
        let mut dst = [0.0f32, -1.0];
        apply(min_fn::<f32>(), &mut dst, &[-0.0, 3.0]);
        assert!(dst[0].is_sign_positive());
        assert_eq!(dst[1], -1.0);
    }

    #[test]
    fn half_sum_rounds_to_nearest_even() {
        // 2048 + 1 is exactly between two float16 values; ties go to even.
        let mut dst = [f16::from_f32(2048.0)];
        apply(sum_fn::<f16>(), &mut dst, &[f16::from_f32(1.0)]);
        assert_eq!(dst[0].to_f32(), 2048.0);
    }

    #[test]
    fn unaligned_source_is_read_correctly() {
        let mut dst = [1.0f64, 2.0];
        let mut bytes = [0u8; 17];
        bytes[1..9].copy_from_slice(&10.0f64.to_ne_bytes());
        bytes[9..17].copy_from_slice(&20.0f64.to_ne_bytes());
        sum_fn::<f64>()(bytemuck::cast_slice_mut(&mut dst), &bytes[1..]);
        assert_eq!(dst, [11.0, 22.0]);
    }

    #[test]
    fn complex_sum_adds_parts() {
        let mut dst = [Complex64 { re: 1.0, im: 2.0 }];
        apply(
            sum_fn::<Complex64>(),
            &mut dst,
            &[Complex64 { re: 0.5, im: -2.0 }],
        );
        assert_eq!(dst[0], Complex64 { re: 1.5, im: 0.0 });
    }
}

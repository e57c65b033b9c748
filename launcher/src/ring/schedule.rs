//! The wire schedule: which bytes each rank sends and receives on which
//! connection, in which order, for every collective.
//!
//! Everything here is a pure function of the rank, the group size, the buffer
//! size and the number of connections per neighbour, and it reproduces the
//! schedule of MLX's ring backend (`mlx/distributed/ring/ring.cpp`, MLX
//! 0.32). TCP carries a byte stream, so only the order and content of the
//! bytes on each socket matter for compatibility. How a rank cuts them into
//! `send`/`recv` calls does not, and the transfer engine chooses its own
//! chunk sizes.
//!
//! Terms used below:
//!
//! - A *link* is one connection index `k`: the `k`-th connection to the right
//!   neighbour (which this rank opened) together with the `k`-th connection
//!   from the left neighbour (which this rank accepted).
//! - A *pass* is one ring algorithm running on one link in one direction over
//!   one part of the buffer. Several passes run at the same time, each on its
//!   own socket direction, so every TCP byte stream carries one pass at most.
//! - An *item* is one step of a pass: one contiguous byte range sent and one
//!   received.

use std::ops::Range;

/// Transfers below this many bytes per rank (MLX's `min_send_size`) are not
/// split across connections.
pub const MIN_SPLIT_BYTES: usize = 262_144;

/// Point-to-point messages are split across connections in pieces of at least
/// this many bytes.
pub const MIN_P2P_PIECE_BYTES: usize = 1024;

/// The neighbour a socket leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Rank `(rank + size - 1) % size`, whose connections this rank accepted.
    Left,
    /// Rank `(rank + 1) % size`, to which this rank connected.
    Right,
}

/// One pass: what one socket direction sends and another receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    /// The connection index used on both sides.
    pub link: usize,
    /// The side this pass writes to, if it sends.
    pub send_to: Option<Side>,
    /// The side this pass reads from, if it receives.
    pub recv_from: Option<Side>,
    /// Byte ranges of the buffer sent, in wire order.
    pub sends: Vec<Range<usize>>,
    /// Byte ranges of the buffer received, in wire order.
    pub recvs: Vec<Range<usize>>,
    /// How many leading items of `recvs` are combined into the buffer with
    /// the reduction; later items overwrite the buffer.
    pub reduce_items: usize,
    /// Maximum lead, in bytes, of the sent stream over the received bytes
    /// already applied to the buffer. Ring passes send item `t + 1`
    /// from the range that item `t` received, so the lead is the length of
    /// the first sent item.
    pub send_lead: usize,
    /// Maximum lead, in bytes, of the received stream over the sent stream. In an all-reduce, the all-gather half overwrites a segment
    /// that this rank sent `size` items earlier, which bounds the lead by the
    /// pass's buffer size minus its first sent item.
    pub recv_lead: usize,
}

/// The passes of one all-reduce, and whether the input must be padded first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllReducePlan {
    /// Number of elements the passes work on: the input's length, or the
    /// group size when the input is shorter than that and is padded with
    /// zeros.
    pub padded_len: usize,
    pub passes: Vec<Pass>,
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

/// Direction of a pass as MLX numbers it: `+1` sends to the left neighbour
/// and walks segments upwards, `-1` sends to the right and walks downwards.
/// Even pass indices run `+1`, odd ones `-1`.
fn direction_of(pass_index: usize) -> isize {
    if pass_index % 2 == 1 {
        -1
    } else {
        1
    }
}

fn sides_of(direction: isize) -> (Side, Side) {
    if direction < 0 {
        (Side::Right, Side::Left)
    } else {
        (Side::Left, Side::Right)
    }
}

/// Returns the segment a rank handles `step` steps after its own, in
/// `direction`.
fn segment_at(rank: usize, size: usize, direction: isize, step: usize) -> usize {
    let offset = (step % size) as isize * direction;
    (rank as isize + offset).rem_euclid(size as isize) as usize
}

/// Plans an all-reduce (sum, max or min) of `len` elements of `elem_size`
/// bytes on a group of `size >= 2` ranks with `connections` links.
///
/// Inputs of at least `size` elements are cut into up to `2 * connections`
/// contiguous parts, one pass each; parts get at least [`MIN_SPLIT_BYTES`]
/// per rank. Shorter inputs are padded with zeros to `size` elements and
/// reduced in one pass on link 0 that sends to the right.
pub fn all_reduce(
    rank: usize,
    size: usize,
    len: usize,
    elem_size: usize,
    connections: usize,
) -> AllReducePlan {
    if len < size {
        let pass = reduce_pass(rank, size, 0, size, elem_size, 0, -1);
        return AllReducePlan {
            padded_len: size,
            passes: vec![pass],
        };
    }

    let nbytes = len * elem_size;
    let parts = (2 * connections)
        .min(nbytes / (size * MIN_SPLIT_BYTES))
        .max(1);
    let step = ceil_div(len, parts);
    let passes = (0..parts)
        .map(|i| {
            let start = (i * step).min(len);
            let end = ((i + 1) * step).min(len);
            reduce_pass(rank, size, start, end, elem_size, i / 2, direction_of(i))
        })
        .collect();
    AllReducePlan {
        padded_len: len,
        passes,
    }
}

/// Plans one reduce-scatter followed by an all-gather over elements
/// `start..end`, cut into `size` segments of `ceil((end - start) / size)`
/// elements (the last ones may be shorter or empty).
fn reduce_pass(
    rank: usize,
    size: usize,
    start: usize,
    end: usize,
    elem_size: usize,
    link: usize,
    direction: isize,
) -> Pass {
    let len = end - start;
    let segment_len = ceil_div(len, size);
    let segment_bytes = |segment: usize| {
        let first = (segment * segment_len).min(len);
        let last = ((segment + 1) * segment_len).min(len);
        (start + first) * elem_size..(start + last) * elem_size
    };

    let steps = 2 * (size - 1);
    let sends: Vec<_> = (0..steps)
        .map(|t| segment_bytes(segment_at(rank, size, direction, t)))
        .collect();
    let recvs = (0..steps)
        .map(|t| segment_bytes(segment_at(rank, size, direction, t + 1)))
        .collect();

    let first_send = sends[0].len();
    let (send_to, recv_from) = sides_of(direction);
    Pass {
        link,
        send_to: Some(send_to),
        recv_from: Some(recv_from),
        sends,
        recvs,
        reduce_items: size - 1,
        send_lead: first_send,
        recv_lead: len * elem_size - first_send,
    }
}

/// Plans an all-gather of `nbytes` bytes per rank into an output of
/// `size * nbytes` bytes, where rank `r`'s input lands at `r * nbytes`.
///
/// Each rank's block is cut into up to `2 * connections` byte ranges of at
/// least [`MIN_SPLIT_BYTES`]; pass `i` moves range `i` of every block.
pub fn all_gather(rank: usize, size: usize, nbytes: usize, connections: usize) -> Vec<Pass> {
    let parts = (2 * connections).min(nbytes / MIN_SPLIT_BYTES).max(1);
    let part_len = ceil_div(nbytes, parts);

    (0..parts)
        .map(|i| {
            let offset = (i * part_len).min(nbytes);
            let len = part_len.min(nbytes - offset);
            let direction = direction_of(i);
            let block = |segment: usize| {
                let start = segment * nbytes + offset;
                start..start + len
            };

            let steps = size - 1;
            let sends = (0..steps)
                .map(|t| block(segment_at(rank, size, direction, t)))
                .collect();
            let recvs = (0..steps)
                .map(|t| block(segment_at(rank, size, direction, t + 1)))
                .collect();

            let (send_to, recv_from) = sides_of(direction);
            Pass {
                link: i / 2,
                send_to: Some(send_to),
                recv_from: Some(recv_from),
                sends,
                recvs,
                reduce_items: 0,
                send_lead: len,
                recv_lead: usize::MAX,
            }
        })
        .collect()
}

/// Plans sending (`to` is `Some`) or receiving (`from` is `Some`) `nbytes`
/// bytes to or from a neighbour, cut into one piece per connection of at
/// least [`MIN_P2P_PIECE_BYTES`]; small messages use fewer connections.
pub fn point_to_point(
    nbytes: usize,
    connections: usize,
    to: Option<Side>,
    from: Option<Side>,
) -> Vec<Pass> {
    let piece = MIN_P2P_PIECE_BYTES.max(ceil_div(nbytes, connections));

    (0..connections)
        .take_while(|i| i * piece < nbytes)
        .map(|i| {
            let range = i * piece..((i + 1) * piece).min(nbytes);
            Pass {
                link: i,
                send_to: to,
                recv_from: from,
                sends: if to.is_some() {
                    vec![range.clone()]
                } else {
                    Vec::new()
                },
                recvs: if from.is_some() {
                    vec![range]
                } else {
                    Vec::new()
                },
                reduce_items: 0,
                send_lead: usize::MAX,
                recv_lead: usize::MAX,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_two_ranks_hand_schedule() {
        // 10 f32 on 2 ranks: one pass (40 bytes < the split threshold),
        // direction +1, segments of 5 elements.
        let plan = all_reduce(0, 2, 10, 4, 1);
        assert_eq!(plan.padded_len, 10);
        assert_eq!(plan.passes.len(), 1);
        let pass = &plan.passes[0];
        assert_eq!(pass.link, 0);
        assert_eq!(pass.send_to, Some(Side::Left));
        assert_eq!(pass.recv_from, Some(Side::Right));
        // Rank 0 sends segment 0, receives segment 1 and reduces it, then
        // sends the reduced segment 1 and receives the reduced segment 0.
        assert_eq!(pass.sends, vec![0..20, 20..40]);
        assert_eq!(pass.recvs, vec![20..40, 0..20]);
        assert_eq!(pass.reduce_items, 1);
        assert_eq!(pass.send_lead, 20);
        assert_eq!(pass.recv_lead, 20);
    }

    #[test]
    fn all_reduce_three_ranks_walks_segments_upwards() {
        // 7 i32 on 3 ranks: segments of 3 elements: 0..3, 3..6, 6..7.
        let plan = all_reduce(1, 3, 7, 4, 1);
        let pass = &plan.passes[0];
        assert_eq!(pass.sends, vec![12..24, 24..28, 0..12, 12..24]);
        assert_eq!(pass.recvs, vec![24..28, 0..12, 12..24, 24..28]);
        assert_eq!(pass.reduce_items, 2);
    }

    #[test]
    fn all_reduce_short_input_pads() {
        // 2 elements on 4 ranks: padded to 4 elements, one segment each.
        let plan = all_reduce(2, 4, 2, 8, 3);
        assert_eq!(plan.padded_len, 4);
        assert_eq!(plan.passes.len(), 1);
        let pass = &plan.passes[0];
        assert_eq!(pass.link, 0);
        assert_eq!(pass.send_to, Some(Side::Right));
        assert_eq!(pass.recv_from, Some(Side::Left));
        // Direction -1 from rank 2: segments 2, 1, 0, 3, 2, 1.
        assert_eq!(pass.sends, vec![16..24, 8..16, 0..8, 24..32, 16..24, 8..16]);
        assert_eq!(pass.recvs, vec![8..16, 0..8, 24..32, 16..24, 8..16, 0..8]);
    }

    #[test]
    fn all_reduce_empty_segments_at_the_end() {
        // 5 elements on 4 ranks: segments of 2: 0..2, 2..4, 4..5, and empty.
        let plan = all_reduce(3, 4, 5, 1, 1);
        let pass = &plan.passes[0];
        assert_eq!(pass.sends[0], 5..5);
        assert_eq!(pass.recvs[0], 0..2);
        assert_eq!(pass.send_lead, 0);
        assert_eq!(pass.recv_lead, 5);
    }

    #[test]
    fn all_reduce_splits_across_links() {
        // 2 ranks, 2 connections: 8 MiB of f32 allows 16 parts, capped at 4.
        let len = 2 * 1024 * 1024;
        let plan = all_reduce(1, 2, len, 4, 2);
        assert_eq!(plan.passes.len(), 4);
        let part_bytes = len;
        let half = part_bytes / 2;
        let expected = [
            (0, Side::Left, Side::Right),
            (0, Side::Right, Side::Left),
            (1, Side::Left, Side::Right),
            (1, Side::Right, Side::Left),
        ];
        for (i, (pass, (link, to, from))) in plan.passes.iter().zip(expected).enumerate() {
            assert_eq!(pass.link, link, "pass {i}");
            assert_eq!(pass.send_to, Some(to), "pass {i}");
            assert_eq!(pass.recv_from, Some(from), "pass {i}");
            // Rank 1 of 2 starts with the upper half of its part.
            let start = i * part_bytes;
            assert_eq!(pass.sends[0], start + half..start + part_bytes, "pass {i}");
            assert_eq!(pass.recvs[0], start..start + half, "pass {i}");
        }
    }

    #[test]
    fn all_reduce_part_count_follows_bytes_per_rank() {
        // 3 ranks, 4 connections: 2 parts need 2 * 3 * 256 KiB = 1.5 MiB.
        let just_below = 3 * 2 * MIN_SPLIT_BYTES - 1;
        assert_eq!(all_reduce(0, 3, just_below, 1, 4).passes.len(), 1);
        assert_eq!(all_reduce(0, 3, just_below + 1, 1, 4).passes.len(), 2);
        assert_eq!(all_reduce(0, 3, 1 << 30, 1, 4).passes.len(), 8);
    }

    #[test]
    fn all_reduce_uneven_parts_tile_the_buffer() {
        // The first `size` items of every pass send each of its segments
        // once, and the passes' parts tile the whole buffer.
        let (size, len, elem_size) = (3, 3 * 1024 * 1024 + 7, 2);
        let plan = all_reduce(2, size, len, elem_size, 2);
        assert_eq!(plan.passes.len(), 4);
        let mut ranges: Vec<_> = plan
            .passes
            .iter()
            .flat_map(|pass| pass.sends[..size].iter().cloned())
            .collect();
        ranges.sort_by_key(|r| r.start);
        let mut next = 0;
        for range in ranges {
            assert_eq!(range.start, next);
            next = range.end;
        }
        assert_eq!(next, len * elem_size);
    }

    #[test]
    fn all_gather_small_single_pass() {
        let passes = all_gather(1, 3, 10, 2);
        assert_eq!(passes.len(), 1);
        let pass = &passes[0];
        assert_eq!(pass.send_to, Some(Side::Left));
        assert_eq!(pass.recv_from, Some(Side::Right));
        // Rank 1 sends its block, then the block of rank 2 it received.
        assert_eq!(pass.sends, vec![10..20, 20..30]);
        assert_eq!(pass.recvs, vec![20..30, 0..10]);
        assert_eq!(pass.reduce_items, 0);
    }

    #[test]
    fn all_gather_splits_each_block_into_parts() {
        // 1 MiB + 1 byte per rank with 2 connections: 4 parts of 262145
        // bytes, the last one 262141 bytes.
        let nbytes = 4 * MIN_SPLIT_BYTES + 1;
        let passes = all_gather(0, 2, nbytes, 2);
        assert_eq!(passes.len(), 4);
        let part = 262_145;
        assert_eq!(passes[0].sends, vec![0..part]);
        assert_eq!(passes[0].recvs, vec![nbytes..nbytes + part]);
        assert_eq!(passes[1].link, 0);
        assert_eq!(passes[1].send_to, Some(Side::Right));
        assert_eq!(passes[1].sends, vec![part..2 * part]);
        assert_eq!(passes[3].link, 1);
        assert_eq!(passes[3].sends, vec![3 * part..nbytes]);
        assert_eq!(passes[3].recvs, vec![nbytes + 3 * part..2 * nbytes]);
    }

    #[test]
    fn point_to_point_small_message_uses_first_link_only() {
        let passes = point_to_point(1500, 4, Some(Side::Right), None);
        assert_eq!(passes.len(), 2);
        assert_eq!(passes[0].sends, vec![0..1024]);
        assert_eq!(passes[1].sends, vec![1024..1500]);
        assert!(passes[0].recvs.is_empty());
    }

    #[test]
    fn point_to_point_splits_evenly_across_links() {
        let passes = point_to_point(10_000, 3, None, Some(Side::Left));
        let ranges: Vec<_> = passes.iter().map(|p| p.recvs[0].clone()).collect();
        assert_eq!(ranges, vec![0..3334, 3334..6668, 6668..10_000]);
        assert!(passes.iter().all(|p| p.recv_from == Some(Side::Left)));
    }

    #[test]
    fn point_to_point_empty_message_has_no_passes() {
        assert!(point_to_point(0, 2, Some(Side::Left), None).is_empty());
    }
}

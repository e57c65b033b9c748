//! ringleader: a launcher for distributed programs and an MLX-compatible ring backend.
//!
//! Concept map:
//!
//! - [`exec`]: the process transport. A `Spawner` starts one rank on one host
//!   (local child processes here; OpenSSH and the simulator elsewhere).

pub mod exec;

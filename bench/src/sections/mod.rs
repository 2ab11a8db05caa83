//! One module per area of the benchmark; each `run` adds its figures and
//! targets to the shared report.

pub mod bulk;
pub mod cold_start;
pub mod memory;
pub mod propagation;
pub mod read;
pub mod redis;
pub mod scale;
pub mod warmup;
pub mod write;

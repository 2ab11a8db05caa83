//! The contract between `presence-operator` and `presence-service`.
//!
//! The operator renders environment variables and provisions the KV bucket;
//! the service reads those variables and may create the same bucket. Each
//! fact both sides depend on is written here once, so that renaming a
//! variable or changing the bucket's settings on one side alone is a compile
//! error or a failing test rather than a silently ignored setting.

pub mod bucket;
pub mod env;
pub mod rules;
pub mod tools;

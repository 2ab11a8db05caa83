//! PresenceCluster operator: the custom resource, the one renderer that
//! turns it into NATS configs and Kubernetes objects, the controller that
//! applies them, and the local runner.

// Functions stay under about 100 lines (clippy.toml); tests are exempt.
#![warn(clippy::too_many_lines)]

pub mod controller;
pub mod crd;
pub mod credentials;
#[cfg(test)]
mod fixtures;
pub mod kv;
pub mod lease;
pub mod local;
pub mod local_diagnose;
pub mod local_security;
pub mod local_status;
pub mod local_web;
pub mod manager;
pub mod manifest;
pub mod metrics;
pub mod monitor;
pub mod pki;
pub mod render;

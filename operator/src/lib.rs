//! PresenceCluster operator: the custom resource, the one renderer that
//! turns it into NATS configs and Kubernetes objects, and the local runner.

pub mod crd;
pub mod local;
pub mod render;

//! The generated JWT Secret, and where the data plane finds its secret.

use super::{Inputs, Scope, meta};
use crate::crd::PresenceClusterSpec;
use k8s_openapi::api::core::v1::{Secret, SecretKeySelector};
use std::collections::BTreeMap;

/// Key of the generated Secret that holds the JWT secret.
pub const JWT_KEY: &str = "jwt-secret";
/// Key of a NATS identity Secret that holds the nkey seed.
pub const SEED_KEY: &str = "seed";
/// Key of the routes Secret that holds the route password.
pub const PASSWORD_KEY: &str = "password";

/// A Secret the operator generates, owned by the PresenceCluster.
pub fn generated(ctx: &Scope, name: &str, data: BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: meta(ctx, name, "auth", None),
        type_: Some("Opaque".into()),
        string_data: Some(data),
        ..Default::default()
    }
}

/// Where every presence-service reads `JWT_SECRET` from: the user's Secret
/// when referenced, else the generated one.
pub fn jwt_secret_source(ctx: &Scope, spec: &PresenceClusterSpec) -> SecretKeySelector {
    match spec.auth.as_ref().and_then(|a| a.jwt_secret_ref.as_ref()) {
        Some(reference) => SecretKeySelector {
            name: reference.name.clone(),
            key: reference.key.clone(),
            optional: Some(false),
        },
        None => SecretKeySelector {
            name: ctx.names.jwt_secret(),
            key: JWT_KEY.into(),
            optional: Some(false),
        },
    }
}

/// The Secret to create when the CR references none; `None` when it does
/// (a referenced Secret is only ever read).
pub fn generated_jwt_secret(
    ctx: &Scope,
    spec: &PresenceClusterSpec,
    inputs: &Inputs,
) -> Option<Secret> {
    if spec
        .auth
        .as_ref()
        .is_some_and(|a| a.jwt_secret_ref.is_some())
    {
        return None;
    }
    let value = inputs.generated_jwt_secret.clone().unwrap_or_default();
    Some(Secret {
        metadata: meta(ctx, &ctx.names.jwt_secret(), "auth", None),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(JWT_KEY.to_owned(), value)])),
        ..Default::default()
    })
}

/// A fresh random secret (64 hex characters) from the OS.
pub fn random_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

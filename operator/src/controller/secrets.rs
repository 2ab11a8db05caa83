//! Step 2: the JWT Secret. A referenced Secret is only read; otherwise the
//! operator generates one, once, and never rewrites it.

use super::conditions::Reason;
use super::events::{EventReason, publish};
use super::{Context, Error};
use crate::crd::PresenceCluster;
use crate::render::{self, secrets};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use presence_contract::rules;

/// What the secret step found.
pub enum SecretState {
    /// Usable; carries a digest of the secret's value (never the value).
    Ready(String),
    /// Not usable; nothing should be applied until someone fixes it.
    Problem { reason: Reason, message: String },
}

/// A short digest of `key` in `secret`, so that rotating it rolls the pods
/// that use it without the value ever leaving the Secret.
pub fn digest_of(secret: &Secret, key: &str) -> Option<String> {
    value_of(secret, key).map(|bytes| render::config_hash(&bytes))
}

/// The value under `key`, from `data` or else `stringData`.
fn value_of(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    if let Some(value) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(value.0.clone());
    }
    let text = secret.string_data.as_ref()?.get(key)?;
    Some(text.clone().into_bytes())
}

/// Reads the referenced JWT Secret, or creates the generated one.
pub async fn ensure_jwt_secret(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
) -> Result<SecretState, Error> {
    let ns = scope.namespace.as_str();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let reference = pc
        .spec
        .auth
        .as_ref()
        .and_then(|a| a.jwt_secret_ref.as_ref());
    let Some(reference) = reference else {
        return generated(pc, ctx, scope, &api).await;
    };
    Ok(match api.get_opt(&reference.name).await? {
        None => SecretState::Problem {
            reason: Reason::SecretNotFound,
            message: format!(
                "Secret {ns}/{} named by spec.auth.jwtSecretRef does not exist; create it with the HS256 secret under key {:?}",
                reference.name, reference.key
            ),
        },
        Some(secret) => match value_of(&secret, &reference.key) {
            None => SecretState::Problem {
                reason: Reason::SecretKeyMissing,
                message: format!(
                    "Secret {ns}/{} has no key {:?}",
                    reference.name, reference.key
                ),
            },
            // presence-service would refuse it at start, in every pod.
            Some(value) => match rules::jwt_secret_problem(&value) {
                Some(problem) => SecretState::Problem {
                    reason: Reason::InvalidSecret,
                    message: format!(
                        "Secret {ns}/{} key {:?}: the JWT secret {problem}",
                        reference.name, reference.key
                    ),
                },
                None => SecretState::Ready(render::config_hash(&value)),
            },
        },
    })
}

/// The generated Secret: created once, never updated, because rotating it
/// would invalidate every token.
async fn generated(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
    api: &Api<Secret>,
) -> Result<SecretState, Error> {
    let name = scope.names.jwt_secret();
    let secret = match api.get_opt(&name).await? {
        Some(existing) => existing,
        None => {
            let value = secrets::random_secret().map_err(|e| Error::Random(e.to_string()))?;
            let inputs = render::Inputs {
                generated_jwt_secret: Some(value),
                ..Default::default()
            };
            let Some(secret) = secrets::generated_jwt_secret(scope, &pc.spec, &inputs) else {
                return Ok(SecretState::Ready(String::new()));
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    let note = format!("generated JWT Secret {}/{name}", scope.namespace);
                    publish(ctx, pc, EventReason::SecretGenerated, "CreateSecret", note).await;
                    secret
                }
                // Created concurrently: use what won.
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok(SecretState::Ready(
        digest_of(&secret, secrets::JWT_KEY).unwrap_or_default(),
    ))
}

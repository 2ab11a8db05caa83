//! Step 2b: the NATS credentials. Generated Secrets are created once (a new
//! leaf gets its own) and never rewritten; the servers' certificate is
//! renewed well before it expires. Referenced Secrets are only read. What
//! comes out: the public identities for the renderer, and the operator's
//! own way into the hub.

use super::conditions::Reason;
use super::events::{EventReason, publish};
use super::{Context, Error};
use crate::crd::PresenceCluster;
use crate::credentials::{self, Kind, SecretData};
use crate::kv::ClientAuth;
use crate::render::{self, NatsIdentities, secrets};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// What the credentials step found.
pub enum NatsCredentials {
    Ready {
        ids: NatsIdentities,
        /// How the operator reaches the hub.
        auth: ClientAuth,
        /// The servers' certificate's expiry.
        certificate_expiry: Option<OffsetDateTime>,
    },
    Problem {
        reason: Reason,
        message: String,
    },
}

/// A Secret's contents as text.
pub fn contents(secret: &Secret) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone());
    }
    out
}

/// Reads (or makes) every NATS Secret of `pc`.
pub async fn ensure(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
) -> Result<NatsCredentials, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let now = OffsetDateTime::now_utc();
    let mut data = SecretData::new();
    let here = ctx.cluster_name.as_deref();
    for (name, kind) in credentials::generated(scope, &pc.spec, here) {
        let ca = data.get(&scope.names.nats_ca_secret()).cloned();
        let current = match api.get_opt(&name).await? {
            Some(existing) => contents(&existing),
            None => create(pc, ctx, scope, &api, (&name, &kind), ca.as_ref()).await?,
        };
        let names = credentials::names_of(scope, &pc.spec);
        let current = if kind == Kind::Tls && credentials::certificate_due(&current, &names, now) {
            renew(pc, ctx, scope, &api, &name, ca.as_ref()).await?
        } else {
            current
        };
        data.insert(name, current);
    }
    if let Some(problem) = read_referenced(pc, scope, &api, &mut data, here).await? {
        return Ok(problem);
    }
    let ids = match credentials::identities(scope, &pc.spec, &data, here) {
        Ok(ids) => ids,
        Err(err) => {
            let reason = match err {
                credentials::IdentityError::Missing(_) => Reason::SecretKeyMissing,
                credentials::IdentityError::Invalid(_) => Reason::InvalidSecret,
            };
            return Ok(NatsCredentials::Problem {
                reason,
                message: err.to_string(),
            });
        }
    };
    let tls = data.get(&render::nats::tls_secret_name(scope, &pc.spec));
    let auth = ClientAuth {
        nkey_seed: data
            .get(&scope.names.nats_operator_secret())
            .and_then(|d| d.get(secrets::SEED_KEY))
            .map(|s| s.trim().to_owned()),
        ca_pem: pc
            .spec
            .client_tls()
            .then(|| tls.and_then(|d| d.get(credentials::CA_CRT)).cloned())
            .flatten(),
    };
    Ok(NatsCredentials::Ready {
        ids,
        auth,
        certificate_expiry: tls
            .and_then(|d| d.get(credentials::TLS_CRT))
            .and_then(|pem| crate::pki::not_after(pem)),
    })
}

/// Creates a generated Secret (or reads the one a concurrent reconcile made).
async fn create(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
    api: &Api<Secret>,
    (name, kind): (&str, &Kind),
    ca: Option<&BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, Error> {
    let now = OffsetDateTime::now_utc();
    let fresh = credentials::new_data(scope, &pc.spec, kind, ca, now)
        .map_err(|e| Error::Random(e.to_string()))?;
    match api
        .create(
            &PostParams::default(),
            &secrets::generated(scope, name, fresh.clone()),
        )
        .await
    {
        Ok(_) => {
            let note = format!("generated NATS Secret {}/{name}", scope.namespace);
            publish(ctx, pc, EventReason::SecretGenerated, "CreateSecret", note).await;
            Ok(fresh)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(contents(&api.get(name).await?)),
        Err(e) => Err(e.into()),
    }
}

/// Issues the servers' certificate again, before it expires; the pods roll
/// (their config hash includes the Secret's digest), one at a time.
async fn renew(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
    api: &Api<Secret>,
    name: &str,
    ca: Option<&BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, Error> {
    let now = OffsetDateTime::now_utc();
    let fresh = credentials::new_data(scope, &pc.spec, &Kind::Tls, ca, now)
        .map_err(|e| Error::Random(e.to_string()))?;
    let patch = serde_json::json!({"stringData": fresh});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let note = format!(
        "issued a new NATS certificate in {}/{name}",
        scope.namespace
    );
    publish(
        ctx,
        pc,
        EventReason::CertificateRenewed,
        "RenewCertificate",
        note,
    )
    .await;
    Ok(fresh)
}

/// Reads the Secrets the spec references; a missing one is a problem to
/// report, not an error to retry fast.
async fn read_referenced(
    pc: &PresenceCluster,
    scope: &render::Scope,
    api: &Api<Secret>,
    data: &mut SecretData,
    here: Option<&str>,
) -> Result<Option<NatsCredentials>, Error> {
    let needed = render::needed_leaves(&pc.spec, here);
    let mut referenced: Vec<String> = pc
        .spec
        .leaves
        .iter()
        .filter(|l| needed.contains(&l.name))
        .filter_map(|l| {
            l.nats
                .as_ref()?
                .credentials_secret_ref
                .as_ref()
                .map(|r| r.name.clone())
        })
        .collect();
    referenced.extend(pc.spec.tls.as_ref().and_then(|t| t.secret_name.clone()));
    for name in referenced {
        match api.get_opt(&name).await? {
            Some(secret) => {
                data.insert(name, contents(&secret));
            }
            None => {
                return Ok(Some(NatsCredentials::Problem {
                    reason: Reason::SecretNotFound,
                    message: format!(
                        "Secret {}/{name} named by the spec does not exist; create it",
                        scope.namespace
                    ),
                }));
            }
        }
    }
    Ok(None)
}

/// The operator's way into the hub, read without making anything (for
/// deletion, when nothing should be created); empty when unreadable, and
/// the hub then refuses the connection, which deletion reports.
pub async fn operator_auth(
    pc: &PresenceCluster,
    ctx: &Context,
    scope: &render::Scope,
) -> ClientAuth {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &scope.namespace);
    let read = |name: String, key: &'static str| {
        let api = api.clone();
        async move {
            let secret = api.get_opt(&name).await.ok().flatten()?;
            contents(&secret).get(key).map(|v| v.trim().to_owned())
        }
    };
    ClientAuth {
        nkey_seed: read(scope.names.nats_operator_secret(), secrets::SEED_KEY).await,
        ca_pem: if pc.spec.client_tls() {
            read(
                render::nats::tls_secret_name(scope, &pc.spec),
                credentials::CA_CRT,
            )
            .await
        } else {
            None
        },
    }
}

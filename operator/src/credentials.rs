//! The NATS credentials of a PresenceCluster: which Secrets it needs, what
//! a new one holds, and the public identities read back from them. Secrets
//! are generated once and never rewritten, except the servers' certificate,
//! which is renewed well before it expires. Secrets the user references are
//! only read.

use crate::crd::PresenceClusterSpec;
use crate::pki::{self, PkiError};
use crate::render::{NatsIdentities, Scope, secrets};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// Keys of the CA and certificate Secrets (as cert-manager writes them).
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

/// What a Secret is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// presence-service's nkey seed.
    Presence,
    /// The operator's nkey seed.
    Operator,
    /// A leaf region's nkey seed.
    Leaf(String),
    /// The route password.
    Routes,
    /// The generated CA (only the operator reads it).
    Ca,
    /// The servers' certificate, signed by the CA.
    Tls,
}

/// The Secrets the operator generates for `spec` in the cluster `here`
/// (every cluster when `None`), by name, in the order they must be made
/// (the CA before the certificate it signs). Secrets the user references
/// instead are left out.
pub fn generated(
    scope: &Scope,
    spec: &PresenceClusterSpec,
    here: Option<&str>,
) -> Vec<(String, Kind)> {
    let names = &scope.names;
    let mut out = vec![(names.nats_presence_secret(), Kind::Presence)];
    if hub_here(spec, here) {
        out.push((names.nats_operator_secret(), Kind::Operator));
    }
    let needed = crate::render::needed_leaves(spec, here);
    for leaf in spec.leaves.iter().filter(|l| needed.contains(&l.name)) {
        if leaf
            .nats
            .as_ref()
            .and_then(|n| n.credentials_secret_ref.as_ref())
            .is_none()
        {
            out.push((
                names.nats_leaf_secret(&leaf.name),
                Kind::Leaf(leaf.name.clone()),
            ));
        }
    }
    out.push((names.nats_routes_secret(), Kind::Routes));
    if spec
        .tls
        .as_ref()
        .and_then(|t| t.secret_name.as_ref())
        .is_none()
    {
        out.push((names.nats_ca_secret(), Kind::Ca));
        out.push((names.nats_tls_secret(), Kind::Tls));
    }
    out
}

/// Stand-in contents for the Secrets the spec references (leaf seeds, a
/// certificate of the user's), so `render` works without a cluster to read
/// them from; what is rendered from them (public keys, digests) differs
/// from what the operator renders with the real ones. Never applied.
pub fn stand_ins(
    scope: &Scope,
    spec: &PresenceClusterSpec,
    here: Option<&str>,
    now: OffsetDateTime,
) -> Result<SecretData, PkiError> {
    let mut out = SecretData::new();
    let needed = crate::render::needed_leaves(spec, here);
    for region in spec
        .regions()
        .iter()
        .filter(|r| needed.iter().any(|n| n == r.name))
    {
        if let Some(source) = region.leaf_credentials {
            let seed = pki::new_user()?.seed;
            out.entry(source.name.clone())
                .or_default()
                .insert(source.key.clone(), seed);
        }
    }
    if let Some(name) = spec.tls.as_ref().and_then(|t| t.secret_name.clone()) {
        let ca = new_data(scope, spec, &Kind::Ca, None, now)?;
        let tls = new_data(scope, spec, &Kind::Tls, Some(&ca), now)?;
        out.insert(name, tls);
    }
    Ok(out)
}

/// Whether the hub runs in the cluster `here`.
pub fn hub_here(spec: &PresenceClusterSpec, here: Option<&str>) -> bool {
    spec.center_runs_in(here)
}

/// The contents of a new Secret of `kind`; a certificate needs the CA's
/// Secret.
pub fn new_data(
    scope: &Scope,
    spec: &PresenceClusterSpec,
    kind: &Kind,
    ca: Option<&BTreeMap<String, String>>,
    now: OffsetDateTime,
) -> Result<BTreeMap<String, String>, PkiError> {
    let one = |k: &str, v: String| BTreeMap::from([(k.to_owned(), v)]);
    Ok(match kind {
        Kind::Presence | Kind::Operator | Kind::Leaf(_) => {
            one(secrets::SEED_KEY, pki::new_user()?.seed)
        }
        Kind::Routes => one(
            secrets::PASSWORD_KEY,
            secrets::random_secret().map_err(|e| PkiError::Generate(e.to_string()))?,
        ),
        Kind::Ca => {
            let ca = pki::new_ca(&scope.name, now)?;
            BTreeMap::from([(CA_CRT.to_owned(), ca.cert), (CA_KEY.to_owned(), ca.key)])
        }
        Kind::Tls => {
            let ca =
                ca.ok_or_else(|| PkiError::Generate("the CA Secret is not there yet".into()))?;
            let key = ca
                .get(CA_KEY)
                .ok_or_else(|| PkiError::Generate("the CA Secret has no ca.key".into()))?;
            let issued = pki::issue(&scope.name, key, &pki::nats_sans(scope, spec), now)?;
            BTreeMap::from([
                (TLS_CRT.to_owned(), issued.cert),
                (TLS_KEY.to_owned(), issued.key),
                (
                    CA_CRT.to_owned(),
                    ca.get(CA_CRT).cloned().unwrap_or_default(),
                ),
                (NAMES_KEY.to_owned(), names_of(scope, spec)),
            ])
        }
    })
}

/// Whether the certificate in `data` must be issued again (missing,
/// unreadable or close to expiry).
pub fn certificate_due(data: &BTreeMap<String, String>, names: &str, now: OffsetDateTime) -> bool {
    let expiring = data
        .get(TLS_CRT)
        .and_then(|pem| pki::not_after(pem))
        .is_none_or(|expiry| pki::needs_renewal(expiry, now));
    expiring || data.get(NAMES_KEY).map(String::as_str) != Some(names)
}

/// Secret contents by Secret name, as read from the API.
pub type SecretData = BTreeMap<String, BTreeMap<String, String>>;

/// Why the identities can't be read from the Secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Invalid(String),
}

/// Key of the certificate Secret listing the names it was issued for, so a
/// new region's names get a new certificate.
pub const NAMES_KEY: &str = "names";

/// The names a certificate for `spec` must carry, as stored in its Secret.
pub fn names_of(scope: &Scope, spec: &PresenceClusterSpec) -> String {
    pki::nats_sans(scope, spec).join(",")
}

/// The public identities and digests the renderer needs, from the
/// Secrets' contents; an error names what is missing or unusable.
pub fn identities(
    scope: &Scope,
    spec: &PresenceClusterSpec,
    data: &SecretData,
    here: Option<&str>,
) -> Result<NatsIdentities, IdentityError> {
    let names = &scope.names;
    let value = |secret: &str, key: &str| -> Result<&String, IdentityError> {
        data.get(secret).and_then(|d| d.get(key)).ok_or_else(|| {
            IdentityError::Missing(format!(
                "Secret {}/{secret} has no key {key:?}",
                scope.namespace
            ))
        })
    };
    let public = |secret: &str, key: &str| -> Result<String, IdentityError> {
        pki::public_of(value(secret, key)?, secret).map_err(|e| {
            IdentityError::Invalid(format!("Secret {}/{secret}: {e}", scope.namespace))
        })
    };
    let mut ids = NatsIdentities {
        presence: public(&names.nats_presence_secret(), secrets::SEED_KEY)?,
        operator: if hub_here(spec, here) {
            public(&names.nats_operator_secret(), secrets::SEED_KEY)?
        } else {
            String::new()
        },
        ..Default::default()
    };
    let needed = crate::render::needed_leaves(spec, here);
    for region in spec
        .regions()
        .iter()
        .filter(|r| r.role == crate::crd::Role::Leaf && needed.iter().any(|n| n == r.name))
    {
        let source = crate::render::nats::leaf_seed_source(scope, region);
        ids.leaves
            .insert(region.name.to_owned(), public(&source.name, &source.key)?);
    }
    let mut seen = BTreeMap::new();
    for (who, key) in [
        ("presence-service", &ids.presence),
        ("the operator", &ids.operator),
    ]
    .into_iter()
    .filter(|(_, key)| !key.is_empty())
    .chain(ids.leaves.iter().map(|(r, k)| (r.as_str(), k)))
    {
        if let Some(other) = seen.insert(key.clone(), who) {
            return Err(IdentityError::Invalid(format!(
                "{other} and {who} use the same NATS identity; each needs its own nkey"
            )));
        }
    }
    let tls = crate::render::nats::tls_secret_name(scope, spec);
    for key in [TLS_CRT, TLS_KEY, CA_CRT] {
        value(&tls, key)?;
    }
    for (name, contents) in data {
        let mut bytes = Vec::new();
        for (k, v) in contents {
            bytes.extend(k.bytes());
            bytes.extend(v.bytes());
            // Each key too, for pods that read only one of them.
            ids.digests.insert(
                format!("{name}/{k}"),
                crate::render::config_hash(v.as_bytes()),
            );
        }
        ids.digests
            .insert(name.clone(), crate::render::config_hash(&bytes));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PresenceCluster;

    fn cluster() -> PresenceCluster {
        serde_yaml::from_str("metadata: {name: p, namespace: ns}\nspec:\n  center: {}\n  leaves: [{name: eu}, {name: us}]\n").unwrap()
    }

    /// Every generated Secret of `pc`, made fresh.
    fn made(pc: &PresenceCluster) -> (Scope, SecretData) {
        let scope = Scope::new(pc, "ns").unwrap();
        let now = OffsetDateTime::now_utc();
        let mut data = SecretData::new();
        for (name, kind) in generated(&scope, &pc.spec, None) {
            let ca = data.get(&scope.names.nats_ca_secret()).cloned();
            data.insert(
                name,
                new_data(&scope, &pc.spec, &kind, ca.as_ref(), now).unwrap(),
            );
        }
        (scope, data)
    }

    #[test]
    fn identities_come_from_the_seeds_and_must_differ() {
        let pc = cluster();
        let (scope, mut data) = made(&pc);
        let ids = identities(&scope, &pc.spec, &data, None).unwrap();
        assert_eq!(ids.leaves.len(), 2);
        assert!(ids.leaves.values().all(|k| k.starts_with('U')));
        assert!(ids.digests.contains_key("p-nats-tls/ca.crt"));
        // The same seed for two leaves is refused, a non-seed too.
        let eu = data["p-eu-nats-leaf"].clone();
        data.insert("p-us-nats-leaf".into(), eu);
        assert!(
            matches!(identities(&scope, &pc.spec, &data, None), Err(IdentityError::Invalid(m)) if m.contains("same NATS identity"))
        );
        data.insert(
            "p-us-nats-leaf".into(),
            BTreeMap::from([("seed".into(), "not-a-seed".into())]),
        );
        assert!(matches!(
            identities(&scope, &pc.spec, &data, None),
            Err(IdentityError::Invalid(_))
        ));
        data.remove("p-nats-presence");
        assert!(matches!(
            identities(&scope, &pc.spec, &data, None),
            Err(IdentityError::Missing(_))
        ));
    }

    #[test]
    fn a_certificate_is_due_when_it_expires_soon_or_lacks_a_name() {
        let pc = cluster();
        let (scope, data) = made(&pc);
        let tls = &data["p-nats-tls"];
        let now = OffsetDateTime::now_utc();
        let names = names_of(&scope, &pc.spec);
        assert!(!certificate_due(tls, &names, now));
        assert!(certificate_due(
            tls,
            &names,
            now + time::Duration::days(340)
        ));
        assert!(certificate_due(tls, &format!("{names},p-ap-nats"), now));
    }
}

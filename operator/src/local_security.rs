//! The NATS credentials and certificate of a local cluster (`presence-operator
//! dev`): the same identities, permissions and TLS a cluster gets, made once
//! and kept in `<data dir>/secrets/`, so `make dev` is secured like a
//! cluster. The certificate is for 127.0.0.1 and localhost.

use crate::crd::PresenceClusterSpec;
use crate::pki;
use crate::render::NatsIdentities;
use crate::render::nats_auth::TlsFiles;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

/// Why local credentials could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LocalSecurityError {
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

/// What the local processes need: public keys for the configs, and the
/// secrets they read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSecurity {
    pub ids: NatsIdentities,
    /// File with presence-service's seed (`NATS_NKEY_SEED_FILE`).
    pub presence_seed_file: PathBuf,
    /// Each leaf region's seed (`$LEAF_NKEY_SEED`).
    pub leaf_seeds: BTreeMap<String, String>,
    pub route_password: String,
    pub tls: TlsFiles,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> LocalSecurityError {
    move |error| LocalSecurityError::Io { what, error }
}

/// The seed in `path`, made first if it isn't there.
fn seed_in(path: &Path) -> Result<pki::Identity, LocalSecurityError> {
    if let Ok(seed) = std::fs::read_to_string(path)
        && let Ok(public) = pki::public_of(&seed, &path.display().to_string())
    {
        return Ok(pki::Identity {
            seed: seed.trim().to_owned(),
            public,
        });
    }
    let user = pki::new_user()?;
    write_private(path, &user.seed)?;
    Ok(user)
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, text: &str) -> Result<(), LocalSecurityError> {
    std::fs::write(path, text).map_err(io(format!("cannot write {}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("cannot restrict {}", path.display())))?;
    }
    Ok(())
}

/// The copies of one referenced seed in each of `clusters`' folders
/// (`secrets/clusters/<cluster>/<file>`): made once and copied to the
/// clusters that lack it, as an administrator places one Secret in several
/// clusters. Changing one copy makes the clusters disagree, as for real.
fn shared_seed(
    dir: &Path,
    clusters: &[&str],
    file: &str,
) -> Result<Vec<pki::Identity>, LocalSecurityError> {
    let path = |cluster: &str| {
        let name = if cluster.is_empty() {
            "default"
        } else {
            cluster
        };
        dir.join("clusters").join(name).join(file)
    };
    let existing = clusters
        .iter()
        .find_map(|c| std::fs::read_to_string(path(c)).ok());
    let seed = match existing {
        Some(seed) => seed,
        None => pki::new_user()?.seed,
    };
    let mut out = Vec::new();
    for cluster in clusters {
        let path = path(cluster);
        if !path.is_file() {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io(format!("cannot create {}", parent.display())))?;
            }
            write_private(&path, &seed)?;
        }
        out.push(seed_in(&path)?);
    }
    Ok(out)
}

/// The CA (made once) and a certificate for loopback (made again when it
/// is missing or due for renewal).
fn certificate(dir: &Path, cluster: &str) -> Result<TlsFiles, LocalSecurityError> {
    let now = OffsetDateTime::now_utc();
    let files = TlsFiles {
        cert: dir.join("tls.crt").display().to_string(),
        key: dir.join("tls.key").display().to_string(),
        ca: dir.join("ca.crt").display().to_string(),
    };
    let ca_key_path = dir.join("ca.key");
    let ca_key = match std::fs::read_to_string(&ca_key_path) {
        Ok(key) if Path::new(&files.ca).is_file() => key,
        _ => {
            let ca = pki::new_ca(cluster, now)?;
            write_private(&ca_key_path, &ca.key)?;
            std::fs::write(&files.ca, &ca.cert)
                .map_err(io(format!("cannot write {}", files.ca)))?;
            // A new CA makes any old certificate useless.
            let _ = std::fs::remove_file(&files.cert);
            ca.key
        }
    };
    let current = std::fs::read_to_string(&files.cert).ok();
    let fresh = current
        .as_deref()
        .and_then(pki::not_after)
        .is_some_and(|expiry| !pki::needs_renewal(expiry, now));
    if !fresh {
        let sans = ["127.0.0.1".to_owned(), "localhost".to_owned()];
        let issued = pki::issue(cluster, &ca_key, &sans, now)?;
        write_private(Path::new(&files.key), &issued.key)?;
        std::fs::write(&files.cert, &issued.cert)
            .map_err(io(format!("cannot write {}", files.cert)))?;
    }
    Ok(files)
}

/// Loads the local cluster's credentials from `data_dir/secrets`, making
/// what is missing (a new leaf's seed, an expiring certificate).
pub fn load_or_create(
    data_dir: &Path,
    cluster: &str,
    spec: &PresenceClusterSpec,
) -> Result<LocalSecurity, LocalSecurityError> {
    let dir = data_dir.join("secrets");
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let presence_seed_file = dir.join("presence.seed");
    let presence = seed_in(&presence_seed_file)?;
    let operator = seed_in(&dir.join("operator.seed"))?;
    let mut ids = NatsIdentities {
        presence: presence.public,
        operator: operator.public,
        ..Default::default()
    };
    let mut leaf_seeds = BTreeMap::new();
    for region in spec
        .regions()
        .iter()
        .filter(|r| r.role == crate::crd::Role::Leaf)
    {
        let (hub_copy, leaf_copy) = match region.leaf_credentials {
            // A referenced Secret: each "cluster" has its own copy, as real
            // clusters would (made once, then placed in both).
            Some(reference) => {
                let file = format!("{}.{}", reference.name, reference.key);
                let copies = shared_seed(&dir, &[spec.center_cluster(), region.cluster], &file)?;
                (copies[0].clone(), copies[1].clone())
            }
            None => {
                let user = seed_in(&dir.join(format!("leaf-{}.seed", region.name)))?;
                (user.clone(), user)
            }
        };
        ids.leaves.insert(region.name.to_owned(), hub_copy.public);
        leaf_seeds.insert(region.name.to_owned(), leaf_copy.seed);
    }
    let password_file = dir.join("route-password");
    let route_password = match std::fs::read_to_string(&password_file) {
        Ok(p) if p.trim().len() >= 32 => p.trim().to_owned(),
        _ => {
            let p = crate::render::secrets::random_secret()
                .map_err(io("cannot read /dev/urandom".into()))?;
            write_private(&password_file, &p)?;
            p
        }
    };
    Ok(LocalSecurity {
        ids,
        presence_seed_file,
        leaf_seeds,
        route_password,
        tls: certificate(&dir, cluster)?,
    })
}

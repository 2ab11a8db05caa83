//! The presence KV bucket at the hub: create it, bring its settings to the
//! spec, delete it on request. The operator compares with the server's state
//! first and changes only what differs; it never touches stored presences.

use async_nats::jetstream::{self, ErrorCode, context::GetStreamErrorKind, kv, stream};
use std::time::Duration;

/// Longest any one NATS request of the operator may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the bucket could not be brought to the spec.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("cannot reach the hub at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("JetStream at the hub refused the request: {0}")]
    JetStream(String),
    #[error(
        "bucket {0} was created without per-key TTL markers, which can't be enabled later; \
         sessions expiry needs them (recreate the bucket to enable them)"
    )]
    MarkersMissing(String),
}

/// The bucket as the spec wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredBucket {
    pub name: String,
    pub replicas: usize,
}

/// What `ensure_bucket` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketOutcome {
    Created,
    Updated(String),
    Unchanged,
}

/// The change needed to bring `current` to `desired`; pure, so the
/// comparison is unit tested without a server.
pub fn needed_change(
    current: &stream::Config,
    desired: &DesiredBucket,
) -> Result<Option<String>, KvError> {
    if !current.allow_message_ttl {
        return Err(KvError::MarkersMissing(desired.name.clone()));
    }
    if current.num_replicas != desired.replicas {
        return Ok(Some(format!(
            "replicas {} -> {}",
            current.num_replicas, desired.replicas
        )));
    }
    Ok(None)
}

fn bucket_config(desired: &DesiredBucket) -> kv::Config {
    presence_contract::bucket::config(&desired.name, desired.replicas)
}

/// How the operator proves itself to the hub and checks it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAuth {
    /// The operator's nkey seed (never logged).
    pub nkey_seed: Option<String>,
    /// The servers' CA (PEM), when client ports take TLS.
    pub ca_pem: Option<String>,
}

fn tls_config(ca_pem: &str) -> Result<async_nats::rustls::ClientConfig, String> {
    use async_nats::rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = async_nats::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the NATS CA is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the NATS CA is unusable: {e}"))?;
    }
    Ok(async_nats::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn connect_options(auth: &ClientAuth) -> Result<async_nats::ConnectOptions, String> {
    let mut options = match &auth.nkey_seed {
        Some(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(ca) = &auth.ca_pem {
        options = options.tls_client_config(tls_config(ca)?).require_tls(true);
    }
    Ok(options
        .name("presence-operator")
        .connection_timeout(REQUEST_TIMEOUT))
}

/// A JetStream context at the hub.
pub async fn connect(
    url: &str,
    domain: &str,
    auth: &ClientAuth,
) -> Result<jetstream::Context, KvError> {
    let unreachable = |reason: String| KvError::Unreachable {
        url: url.to_owned(),
        reason,
    };
    let options = connect_options(auth).map_err(unreachable)?;
    let client = tokio::time::timeout(REQUEST_TIMEOUT, options.connect(url))
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let mut js = jetstream::with_domain(client, domain);
    js.set_timeout(REQUEST_TIMEOUT);
    Ok(js)
}

fn stream_name(bucket: &str) -> String {
    presence_contract::bucket::stream_name(bucket)
}

fn is_not_found(err: &jetstream::context::GetStreamError) -> bool {
    matches!(err.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// Creates the bucket, or updates its replicas to the spec.
pub async fn ensure_bucket(
    js: &jetstream::Context,
    desired: &DesiredBucket,
) -> Result<BucketOutcome, KvError> {
    let js_err = |e: &dyn std::fmt::Display| KvError::JetStream(e.to_string());
    match js.get_stream(stream_name(&desired.name)).await {
        Ok(stream) => {
            let current = &stream.cached_info().config;
            match needed_change(current, desired)? {
                None => Ok(BucketOutcome::Unchanged),
                Some(change) => {
                    let mut config = current.clone();
                    config.num_replicas = desired.replicas;
                    js.update_stream(config).await.map_err(|e| js_err(&e))?;
                    Ok(BucketOutcome::Updated(change))
                }
            }
        }
        Err(err) if is_not_found(&err) => {
            js.create_key_value(bucket_config(desired))
                .await
                .map_err(|e| js_err(&e))?;
            Ok(BucketOutcome::Created)
        }
        Err(err) => Err(js_err(&err)),
    }
}

/// Deletes the bucket and every presence in it. `Ok(false)` when it was
/// already gone.
pub async fn delete_bucket(js: &jetstream::Context, bucket: &str) -> Result<bool, KvError> {
    match js.get_stream(stream_name(bucket)).await {
        Err(err) if is_not_found(&err) => Ok(false),
        Err(err) => Err(KvError::JetStream(err.to_string())),
        Ok(_) => js
            .delete_stream(stream_name(bucket))
            .await
            .map(|_| true)
            .map_err(|e| KvError::JetStream(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(replicas: usize, ttl: bool) -> stream::Config {
        stream::Config {
            num_replicas: replicas,
            allow_message_ttl: ttl,
            ..Default::default()
        }
    }

    fn desired(replicas: usize) -> DesiredBucket {
        DesiredBucket {
            name: "PRESENCE".into(),
            replicas,
        }
    }

    #[test]
    fn compares_before_changing() {
        assert_eq!(needed_change(&config(1, true), &desired(1)).unwrap(), None);
        assert_eq!(
            needed_change(&config(1, true), &desired(3))
                .unwrap()
                .as_deref(),
            Some("replicas 1 -> 3")
        );
        assert!(matches!(
            needed_change(&config(1, false), &desired(1)),
            Err(KvError::MarkersMissing(_))
        ));
    }
}

#[cfg(test)]
mod real_nats {
    //! Provisioning against a real nats-server hub.

    use super::*;

    #[tokio::test]
    async fn create_then_unchanged_then_delete() {
        let dir = tempfile::tempdir().unwrap();
        let hub = testkit::Nats::hub(dir.path()).await;
        let js = connect(&hub.url(), "hub", &ClientAuth::default())
            .await
            .unwrap();
        let desired = DesiredBucket {
            name: "PRESENCE".into(),
            replicas: 1,
        };
        assert_eq!(
            ensure_bucket(&js, &desired).await.unwrap(),
            BucketOutcome::Created
        );
        assert_eq!(
            ensure_bucket(&js, &desired).await.unwrap(),
            BucketOutcome::Unchanged
        );
        // Stored presences survive re-provisioning.
        let kv = js.get_key_value("PRESENCE").await.unwrap();
        kv.put("ann", "x".into()).await.unwrap();
        assert_eq!(
            ensure_bucket(&js, &desired).await.unwrap(),
            BucketOutcome::Unchanged
        );
        assert_eq!(kv.get("ann").await.unwrap().as_deref(), Some(&b"x"[..]));
        // A single server can't hold 3 replicas: the refusal is reported.
        let three = DesiredBucket {
            replicas: 3,
            ..desired.clone()
        };
        assert!(matches!(
            ensure_bucket(&js, &three).await,
            Err(KvError::JetStream(_))
        ));
        assert!(delete_bucket(&js, "PRESENCE").await.unwrap());
        assert!(
            !delete_bucket(&js, "PRESENCE").await.unwrap(),
            "already gone"
        );
    }

    #[tokio::test]
    async fn a_bucket_without_markers_is_reported_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let hub = testkit::Nats::hub(dir.path()).await;
        let js = connect(&hub.url(), "hub", &ClientAuth::default())
            .await
            .unwrap();
        js.create_key_value(kv::Config {
            bucket: "OLD".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
        let err = ensure_bucket(
            &js,
            &DesiredBucket {
                name: "OLD".into(),
                replicas: 1,
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, KvError::MarkersMissing(_)), "{err}");
        assert!(
            js.get_stream("KV_OLD").await.is_ok(),
            "never deleted behind the user's back"
        );
    }

    #[tokio::test]
    async fn an_unreachable_hub_is_reported_with_its_address() {
        let err = connect("nats://127.0.0.1:1", "hub", &ClientAuth::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    }
}

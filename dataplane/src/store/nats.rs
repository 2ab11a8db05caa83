//! The production store: a NATS JetStream KV bucket at the hub.
//!
//! A node talks to its regional NATS server. When a JetStream domain is
//! configured (every leaf), the hub's JetStream API is addressed through
//! `$JS.<domain>.API`, because a leaf's plain `$JS.API` does not cross the
//! leafnode connection. The center creates the bucket when it is missing;
//! leaves only wait for it.

use super::{
    BucketIdentity, Change, ChangeStream, Connectivity, EchoFilter, Entry, Expect, PresenceStore,
    StoreError, WatchStart, decode_entry, encode_value,
};
use crate::config::{NodeType, Settings};
use crate::keys::{Part, encode_key, key_of, others_filter};
use crate::metrics::Metrics;
use crate::record::Update;
use async_nats::connection::State;
use async_nats::jetstream::context::{GetStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, ErrorCode, kv};
use futures::{StreamExt, TryStreamExt};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Connection, JetStream context and (once open) the bucket.
pub struct NatsStore {
    client: async_nats::Client,
    js: jetstream::Context,
    bucket: String,
    create_bucket: bool,
    replicas: usize,
    write_timeout: Duration,
    read_timeout: Duration,
    kv: OnceLock<kv::Store>,
    opened: OnceLock<time::OffsetDateTime>,
    metrics: Metrics,
    /// Subject prefix of writes: `$KV.<bucket>.` through the hub's domain
    /// API when there is one, so TTL'd publishes reach the hub from a leaf.
    put_prefix: String,
}

/// The header that marks a KV removal.
const KV_OPERATION: &str = "KV-Operation";

/// Concurrent key reads of one user's load.
const LOAD_CONCURRENCY: usize = 16;

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

impl NatsStore {
    /// Starts connecting to NATS; returns at once and keeps retrying in the
    /// background, so the HTTP server (liveness) comes up even while NATS is
    /// down. Call [`NatsStore::open_bucket_until_ready`] next.
    pub async fn connect(settings: &Settings, metrics: Metrics) -> Result<Self, StoreError> {
        let mut options = match &settings.nats_creds {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    StoreError::Unavailable(format!(
                        "cannot read NATS credentials {}: {e}",
                        path.display()
                    ))
                })?,
            None => match &settings.nats_auth.nkey_seed {
                Some(seed) => async_nats::ConnectOptions::with_nkey(seed.clone()),
                None => async_nats::ConnectOptions::new(),
            },
        };
        if let Some(ca) = &settings.nats_auth.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &settings.nats_auth.tls_client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options = options
            .name(format!("presence-service/{}", settings.node_id))
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(10))
            // First (re)connect at once, then 50 ms doubling to 2 s.
            .reconnect_delay_callback(|attempts| match attempts {
                0 | 1 => Duration::ZERO,
                n => {
                    let exp = u32::try_from(n - 2).unwrap_or(u32::MAX).min(6);
                    Duration::from_millis(50 * 2u64.pow(exp)).min(Duration::from_secs(2))
                }
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected"),
                    other => tracing::info!(event = %other, "NATS event"),
                }
            });
        let servers: Vec<&str> = settings
            .nats_url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let client = options.connect(servers).await.map_err(unavailable)?;
        let mut js = match &settings.nats_js_domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };
        // Our own per-operation timeouts must fire first: they report an
        // unknown outcome as `Timeout`, which async-nats' errors don't tell
        // apart from a refusal.
        js.set_timeout(settings.write_timeout.max(settings.read_timeout) + Duration::from_secs(1));
        Ok(NatsStore {
            client,
            js,
            bucket: settings.kv_bucket.clone(),
            create_bucket: settings.node_type == NodeType::Center,
            replicas: settings.kv_replicas,
            write_timeout: settings.write_timeout,
            read_timeout: settings.read_timeout,
            kv: OnceLock::new(),
            opened: OnceLock::new(),
            metrics,
            put_prefix: match &settings.nats_js_domain {
                Some(domain) => format!("$JS.{domain}.API.$KV.{}.", settings.kv_bucket),
                None => format!("$KV.{}.", settings.kv_bucket),
            },
        })
    }

    fn stream_name(&self) -> String {
        presence_contract::bucket::stream_name(&self.bucket)
    }

    fn kv(&self) -> Result<&kv::Store, StoreError> {
        self.kv.get().ok_or_else(|| {
            StoreError::NotReady(format!("KV bucket {} is not open yet", self.bucket))
        })
    }

    /// One attempt to open (center: or create) the bucket.
    async fn open_bucket(&self) -> Result<kv::Store, StoreError> {
        match self.js.get_stream(self.stream_name()).await {
            Ok(_) => self
                .js
                .get_key_value(&self.bucket)
                .await
                .map_err(unavailable),
            Err(err) => {
                if !is_missing(&err) {
                    return Err(unavailable(err));
                }
                if !self.create_bucket {
                    return Err(StoreError::NotReady(format!(
                        "KV bucket {} does not exist at the hub yet; the center creates it",
                        self.bucket
                    )));
                }
                let config = presence_contract::bucket::config(&self.bucket, self.replicas);
                match self.js.create_key_value(config).await {
                    Ok(store) => {
                        tracing::info!(bucket = %self.bucket, replicas = self.replicas, "created KV bucket");
                        Ok(store)
                    }
                    // Another center won the race: open what it created.
                    Err(create_err) => self
                        .js
                        .get_key_value(&self.bucket)
                        .await
                        .map_err(|_| unavailable(create_err)),
                }
            }
        }
    }

    /// Retries opening the bucket until it succeeds, with capped backoff.
    pub async fn open_bucket_until_ready(&self) {
        let mut attempt: u32 = 0;
        loop {
            match self.open_bucket().await {
                Ok(store) => {
                    let _ = self.opened.set(store.stream.cached_info().created);
                    let _ = self.kv.set(store);
                    tracing::info!(bucket = %self.bucket, "KV bucket open");
                    return;
                }
                Err(err) => {
                    if attempt.is_multiple_of(10) {
                        tracing::warn!(bucket = %self.bucket, error = %err, attempt, "KV bucket not available yet; retrying");
                    }
                }
            }
            // 10 ms doubling to 2 s: quick while the connection is still
            // being made at start, gentle while the hub is really away.
            let delay = Duration::from_millis(10 * 2u64.pow(attempt.min(8)));
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(delay.min(Duration::from_secs(2))).await;
        }
    }

    async fn timed<T, E: std::fmt::Display>(
        &self,
        op: &'static str,
        limit: Duration,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(limit, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(unavailable(err)),
            Err(_) => Err(StoreError::Timeout(limit)),
        };
        self.metrics.observe_kv(op, result.is_ok(), started);
        result
    }
}

fn is_missing(err: &jetstream::context::GetStreamError) -> bool {
    matches!(err.kind(), GetStreamErrorKind::JetStream(e)
        if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

/// Reads a watched bucket entry; one `echoes` claims is left undecoded,
/// and a value this service can't use is skipped, logged and counted,
/// never an error (see [`decode_entry`]).
fn read_entry(metrics: &Metrics, entry: &kv::Entry, echoes: &EchoFilter) -> Entry {
    let bytes = match entry.operation {
        kv::Operation::Put => Some(entry.value.as_ref()),
        kv::Operation::Delete | kv::Operation::Purge => None,
    };
    let position = (entry.revision, entry.created, entry.delta);
    read_value(metrics, &entry.key, bytes, position, echoes.as_ref())
}

/// Reads the stream message that holds `key`'s last value, as
/// [`read_entry`] reads a KV entry. A removal is a `KV-Operation` of `DEL`
/// or `PURGE`, or a marker the server left when a TTL or limit removed the
/// key (`Nats-Marker-Reason`), as the KV client reads them.
fn read_message(metrics: &Metrics, key: &str, message: &StreamMessage) -> Entry {
    let header = |name: &str| message.headers.get(name).map(|value| value.as_str());
    let removed = matches!(header(KV_OPERATION), Some("DEL" | "PURGE"))
        || (header(KV_OPERATION).is_none() && header("Nats-Marker-Reason").is_some());
    let bytes = (!removed).then_some(message.payload.as_ref());
    let position = (message.sequence, message.time, 0);
    read_value(metrics, key, bytes, position, &|_, _| false)
}

/// Decodes a key's value (`None`: removed), skipping, logging and counting
/// one this service can't use.
fn read_value(
    metrics: &Metrics,
    key: &str,
    bytes: Option<&[u8]>,
    position: (u64, time::OffsetDateTime, u64),
    echoes: &dyn Fn(u64, &str) -> bool,
) -> Entry {
    let decoded = decode_entry(key, bytes, position, echoes);
    if let Some(err) = decoded.skipped {
        let revision = position.0;
        tracing::warn!(error = %err, revision, "skipping a stored value this service can't use");
        metrics.kv_values_skipped.inc();
    }
    decoded.entry
}

impl NatsStore {
    /// The keys under `<user>.>` (seen, sessions), removal markers included.
    async fn other_keys(&self, kv: &kv::Store, user_id: &str) -> Result<Vec<String>, StoreError> {
        let filter = format!("{}{}", kv.prefix, others_filter(user_id));
        let subjects = async {
            let info = kv.stream.info_with_subjects(&filter).await?;
            info.map_ok(|(subject, _count)| subject)
                .try_collect::<Vec<String>>()
                .await
        };
        let subjects = self.timed("list", self.read_timeout, subjects).await?;
        Ok(subjects
            .into_iter()
            .filter_map(|s| s.strip_prefix(kv.prefix.as_str()).map(str::to_owned))
            .collect())
    }

    /// The last value of `key`, as the stream's leader holds it. Not a KV
    /// direct get: any replica may answer those, and nats-server lets a
    /// replica serve them once it is 90% synchronized and keeps it serving
    /// if it falls behind later, so a miss could cache (and a write that
    /// lost a race could decide again from) a value the bucket has since
    /// replaced. STREAM.MSG.GET is answered by the leader.
    async fn read_key(&self, kv: &kv::Store, key: String) -> Result<Option<Change>, StoreError> {
        let last = async {
            let found = kv
                .stream
                .raw_message_builder()
                .last_by_subject(format!("{}{}", kv.prefix, key))
                .send()
                .await;
            match found {
                Ok(message) => Ok(Some(message)),
                Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
                Err(err) => Err(err),
            }
        };
        let message = self.timed("get", self.read_timeout, last).await?;
        Ok(message.and_then(
            |message| match read_message(&self.metrics, &key, &message) {
                Entry::Change(change) => Some(change),
                Entry::Echo { .. } | Entry::Other { .. } => None,
            },
        ))
    }
}

impl NatsStore {
    /// Publishes one write and waits for its acknowledgement, within the
    /// write timeout from `started`. `message` builds the write's message:
    /// once, and again only for another attempt.
    ///
    /// At the center, "no responders" is tried again until the timeout:
    /// its NATS server is the hub, so nobody answering means the bucket's
    /// stream has no leader for the moment (an election after a hub server
    /// died, about 1.5 s of a 5 s failover in `dev-ha`, or the bucket being
    /// created again) and nothing was stored, so the same write, with the
    /// same expectation, is safe to send again. A leaf gets the same answer
    /// when its link to the hub is down, and must fail at once.
    async fn publish(
        &self,
        subject: String,
        message: impl Fn() -> PublishMessage,
        started: Instant,
    ) -> Result<u64, StoreError> {
        let deadline = tokio::time::Instant::from_std(started + self.write_timeout);
        let mut pause = Duration::from_millis(25);
        // Shared bytes: another attempt's copy costs no allocation.
        let subject = async_nats::Subject::from(subject);
        loop {
            let attempt = async {
                let ack = self.js.send_publish(subject.clone(), message()).await?;
                ack.await.map(|ack| ack.sequence)
            };
            let err = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(revision)) => return Ok(revision),
                Ok(Err(err)) if err.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(StoreError::Conflict);
                }
                Ok(Err(err)) => err,
                Err(_) => return Err(StoreError::Timeout(self.write_timeout)),
            };
            let unheard = err.kind() == PublishErrorKind::StreamNotFound;
            let in_time = tokio::time::Instant::now() + pause < deadline;
            if !(self.create_bucket && unheard && in_time) {
                return Err(unavailable(err));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
    }
}

#[async_trait::async_trait]
impl PresenceStore for NatsStore {
    async fn load(&self, user_id: &str) -> Result<Vec<Change>, StoreError> {
        let kv = self.kv()?;
        let manual = self.read_key(kv, key_of(user_id, &Part::Manual));
        let (manual, others) = futures::future::join(manual, self.other_keys(kv, user_id)).await;
        let mut changes: Vec<Change> = manual?.into_iter().collect();
        let others: Vec<Option<Change>> = futures::stream::iter(others?)
            .map(|key| self.read_key(kv, key))
            .buffer_unordered(LOAD_CONCURRENCY)
            .try_collect()
            .await?;
        changes.extend(others.into_iter().flatten());
        Ok(changes)
    }

    async fn write(
        &self,
        user_id: &str,
        update: &Update,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        self.kv()?;
        let value = encode_value(user_id, update)?.map(bytes::Bytes::from);
        let subject = format!("{}{}", self.put_prefix, key_of(user_id, &update.part()));
        // Built per attempt (only the center makes more than one), so a
        // write that goes through at once copies nothing for a retry.
        let message = || {
            let mut message = PublishMessage::build();
            message = match &value {
                Some(bytes) => message.payload(bytes.clone()),
                None => message.header(KV_OPERATION, "DEL"),
            };
            if let Some(ttl) = ttl {
                message = message.ttl(ttl);
            }
            // JetStream checks the expectation when the message arrives, so
            // a publish the client library delivers late (after a
            // reconnect, long after we answered 503) is refused if anything
            // changed since.
            match expect {
                Expect::Key(revision) => message.expected_last_subject_sequence(revision),
                Expect::Sessions(revision) => {
                    message.expected_last_subject_sequence(revision).header(
                        "Nats-Expected-Last-Subject-Sequence-Subject",
                        format!("$KV.{}.{}.s.>", self.bucket, encode_key(user_id)),
                    )
                }
            }
        };
        let started = Instant::now();
        let result = self.publish(subject, message, started).await;
        let answered = !matches!(
            result,
            Err(StoreError::Unavailable(_) | StoreError::Timeout(_))
        );
        self.metrics.observe_kv("put", answered, started);
        result
    }

    async fn watch(
        &self,
        start: WatchStart,
        echoes: EchoFilter,
    ) -> Result<ChangeStream, StoreError> {
        let kv = self.kv()?;
        let watch = match start {
            WatchStart::LatestPerKey => {
                self.timed("watch", self.read_timeout, kv.watch_with_history(">"))
                    .await?
            }
            WatchStart::After(revision) => {
                self.timed(
                    "watch",
                    self.read_timeout,
                    kv.watch_all_from_revision(revision + 1),
                )
                .await?
            }
        };
        let metrics = self.metrics.clone();
        Ok(watch
            .map(move |item| match item {
                Ok(entry) => Ok(read_entry(&metrics, &entry, &echoes)),
                Err(err) => Err(unavailable(err)),
            })
            .boxed())
    }

    async fn identity(&self) -> Result<BucketIdentity, StoreError> {
        self.kv()?;
        let started = Instant::now();
        let result =
            tokio::time::timeout(self.read_timeout, self.js.get_stream(self.stream_name())).await;
        self.metrics
            .observe_kv("info", matches!(result, Ok(Ok(_))), started);
        match result {
            Ok(Ok(stream)) => {
                let info = stream.cached_info();
                Ok(BucketIdentity {
                    created: info.created,
                    last_revision: info.state.last_sequence,
                    messages: info.state.messages,
                })
            }
            Ok(Err(err)) if is_missing(&err) => Err(StoreError::NotReady(format!(
                "KV bucket {} does not exist at the hub",
                self.bucket
            ))),
            Ok(Err(err)) => Err(unavailable(err)),
            Err(_) => Err(StoreError::Timeout(self.read_timeout)),
        }
    }

    async fn first_after(&self, revision: u64) -> Result<Option<u64>, StoreError> {
        let kv = self.kv()?;
        // STREAM.MSG.GET, which the stream's leader answers, not a direct
        // get, which any replica may answer: the question is what a lagging
        // replica does not know. Allowed by the rendered permissions.
        let next = async {
            let found = kv
                .stream
                .raw_message_builder()
                .sequence(revision.saturating_add(1))
                .next_by_subject(format!("{}>", kv.prefix))
                .send()
                .await;
            match found {
                Ok(message) => Ok(Some(message.sequence)),
                Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
                Err(err) => Err(err),
            }
        };
        self.timed("next", self.read_timeout, next).await
    }

    fn opened_bucket(&self) -> Option<time::OffsetDateTime> {
        self.opened.get().copied()
    }

    async fn ensure_bucket(&self) -> Result<(), StoreError> {
        // The `kv::Store` handle addresses the bucket by name, so it keeps
        // working once the bucket exists again.
        self.open_bucket().await.map(|_| ())
    }

    fn connectivity(&self) -> Connectivity {
        Connectivity {
            connected: self.client.connection_state() == State::Connected,
            bucket_open: self.kv.get().is_some(),
        }
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;

    fn message(headers: &[(&str, &str)], payload: &'static [u8]) -> StreamMessage {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        StreamMessage {
            subject: "$KV.PRESENCE.ann".into(),
            sequence: 7,
            headers: map,
            payload: bytes::Bytes::from_static(payload),
            time: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    /// What a leader-answered read makes of a key's last message: a value,
    /// an explicit removal, or the marker a TTL left, as the KV client
    /// reads them.
    #[test]
    fn a_keys_last_message_reads_as_a_value_or_a_removal() {
        let metrics = Metrics::new().expect("metrics");
        let stored = br#"{"userID":"ann","status":"online","message":"hi","lastSeen":"2026-12-07T00:00:00Z","updatedAt":"2026-12-07T00:00:00Z","nodeID":"n"}"#;
        let read = |headers: &[(&str, &str)], payload| match read_message(
            &metrics,
            "ann",
            &message(headers, payload),
        ) {
            Entry::Change(change) => {
                assert_eq!((change.revision, change.user_id.as_str()), (7, "ann"));
                match change.update {
                    Update::Manual(value) => value.map(|p| p.message.clone()),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(read(&[], stored).as_deref(), Some("hi"));
        assert_eq!(
            read(&[(KV_OPERATION, "PUT")], stored).as_deref(),
            Some("hi")
        );
        assert_eq!(read(&[(KV_OPERATION, "DEL")], b""), None);
        assert_eq!(read(&[(KV_OPERATION, "PURGE")], b""), None);
        assert_eq!(read(&[("Nats-Marker-Reason", "MaxAge")], b""), None);
        assert_eq!(metrics.kv_values_skipped.get(), 0);
    }
}

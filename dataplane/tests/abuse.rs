//! The abuse suite (issue #14): every way an outside client, or a bad value
//! in the bucket, could crash a node, exhaust it or make it lie, driven
//! against real `presence-service` processes and real `nats-server`s.
//!
//! Each test waits by polling with a deadline; none asserts how fast
//! something happened.

mod common;

use clap::Parser;
use common::*;
use futures::StreamExt;
use jsonwebtoken::{EncodingKey, Header};
use presence_dataplane::config::Cli;
use presence_dataplane::metrics::Metrics;
use presence_dataplane::record::Update;
use presence_dataplane::session::Seen;
use presence_dataplane::store::memory::MemoryStore;
use presence_dataplane::store::nats::NatsStore;
use presence_dataplane::store::{
    BucketIdentity, Change, ChangeStream, Connectivity, EchoFilter, Entry, Expect, PresenceStore,
    StoreError, WatchStart,
};
use presence_dataplane::{api, build_with_store};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

// ---------------------------------------------------------------- helpers

/// A node serving from memory (no NATS needed), with `env` on top.
async fn memory_node(
    dir: &Path,
    node_id: &'static str,
    env: Vec<(&'static str, String)>,
) -> Service {
    let mut extra_env = vec![("STORE", "memory".to_owned())];
    extra_env.extend(env);
    Service::start(
        dir,
        ServiceSpec {
            node_id,
            node_type: "center",
            nats_url: "nats://127.0.0.1:1".into(),
            extra_env,
        },
    )
    .await
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// An HS256 token with exactly these claims, signed with the test secret.
fn signed(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

/// The sum of every sample of `name` (any labels) in `/metrics`.
async fn metric(client: &reqwest::Client, service: &Service, name: &str) -> f64 {
    metric_where(client, service, name, "").await
}

/// The sum of the samples of `name` whose labels contain `labels`.
async fn metric_where(
    client: &reqwest::Client,
    service: &Service,
    name: &str,
    labels: &str,
) -> f64 {
    let text = client
        .get(service.url("/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                && line.contains(labels)
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn connect(service: &Service) -> TcpStream {
    TcpStream::connect(("127.0.0.1", service.port))
        .await
        .expect("connect")
}

/// Reads a response head (up to the blank line); `None` if none arrived in time.
async fn read_head(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Reads until the server closes the connection; `false` if it is still
/// open at the deadline.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

fn stream_url(service: &Service, users: &[&str]) -> String {
    service.url(&format!(
        "/api/v2/presence/stream?users={}",
        users
            .iter()
            .map(|u| encode_path(u))
            .collect::<Vec<_>>()
            .join(",")
    ))
}

fn session_url(service: &Service, user: &str, session: &str) -> String {
    service.url(&format!(
        "/api/v2/presence/{}/sessions/{}",
        encode_path(user),
        encode_path(session)
    ))
}

/// Sets every user in `users` to busy with `message` in one batch.
async fn batch(client: &reqwest::Client, service: &Service, users: &[String], message: &str) {
    let presences: Vec<Value> = users
        .iter()
        .map(|u| json!({"userID": u, "status": "busy", "message": message}))
        .collect();
    let response = client
        .post(service.url("/api/v2/presence/batch"))
        .header("Authorization", bearer("svc", "presence:write"))
        .json(&json!({ "presences": presences }))
        .send()
        .await
        .expect("batch completes");
    assert_eq!(response.status(), 200);
}

// ------------------------------------------------ 8. configuration numbers

#[test]
fn numeric_settings_out_of_range_are_refused_at_start() {
    let port = free_port().to_string();
    for (name, value) in [
        ("RATE_LIMIT_WRITES_PER_SECOND", "1e-20"),
        ("RATE_LIMIT_WRITES_PER_SECOND", "1e12"),
        ("RATE_LIMIT_BURST", "4000000000"),
        ("SHUTDOWN_TIMEOUT_SECS", "18446744073709551615"),
        ("CORS_MAX_AGE", "18446744073709551615"),
        ("CACHE_MAX_COST", "18446744073709551615"),
        ("CACHE_NUM_COUNTERS", "0"),
        ("SERVICE_PORT", "0"),
        ("STREAM_MAX_CONNECTIONS", "18446744073709551615"),
        ("STREAM_KEEPALIVE_SECS", "0"),
        ("STREAM_MAX_PER_CALLER", "0"),
        ("STREAM_EVENT_LOG_MAX_BYTES", "10"),
        ("HTTP_HEADER_READ_TIMEOUT_SECS", "0"),
        ("HTTP_KEEPALIVE_TIMEOUT_SECS", "99999"),
        ("HTTP_MAX_CONNECTIONS", "0"),
        ("HTTP_SEND_TIMEOUT_SECS", "0"),
        ("JWT_MAX_LIFETIME", "0"),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_presence-service"))
            .env_clear()
            .env("JWT_SECRET", SECRET)
            .env("STORE", "memory")
            .env("SERVICE_HOST", "127.0.0.1")
            .env("SERVICE_PORT", &port)
            .env(name, value)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start presence-service");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{name}={value} must be refused at start; stderr: {stderr}"
        );
        assert!(
            stderr.contains(name) && stderr.lines().count() == 1,
            "{name}={value}: {stderr}"
        );
    }
}

// ------------------------------------------------- 1. bad data in the bucket

#[tokio::test(flavor = "multi_thread")]
async fn poisoned_bucket_values_are_skipped_and_counted() {
    let c = Cluster::start().await;
    let client = http();
    let nats = async_nats::connect(c.hub.url()).await.unwrap();
    let kv = async_nats::jetstream::new(nats)
        .get_key_value("PRESENCE")
        .await
        .unwrap();
    let session = |last_seen: &str, ttl: Value| {
        json!({"device": "d", "status": "online", "lastSeen": last_seen, "ttlSeconds": ttl, "nodeID": "x"})
            .to_string()
    };
    let manual = |user: &str, message: &str| {
        json!({"userID": user, "status": "busy", "message": message,
               "lastSeen": "2026-01-01T00:00:00Z", "updatedAt": "2026-01-01T00:00:00Z"})
        .to_string()
    };
    // Values another writer could have left: each is valid JSON or a valid
    // key at most, never both valid and in range.
    let poison = [
        (
            "huge-ttl.s.x",
            session("2026-01-01T00:00:00Z", json!(i64::MAX)),
        ),
        (
            "end-of-time.s.x",
            session("9999-12-31T23:59:59Z", json!(300)),
        ),
        (
            "negative-ttl.s.x",
            session("2026-01-01T00:00:00Z", json!(-5)),
        ),
        ("garbage", "not json".to_owned()),
        ("wrong-owner", manual("someone-else", "")),
        ("long-message", manual("long-message", &"m".repeat(5000))),
        ("a.b.c.d", "{}".to_owned()),
    ];
    for (key, value) in &poison {
        kv.put(*key, value.clone().into()).await.unwrap();
    }
    // Every node keeps following the bucket.
    assert_eq!(
        set(&client, &c.eu, "after-poison", "online", "still here")
            .await
            .status(),
        200
    );
    for svc in c.services() {
        wait_until(
            &format!("{} to see a later write", svc.node_id),
            READY_TIMEOUT,
            || async { get(&client, svc, "after-poison").await.1["message"] == "still here" },
        )
        .await;
        for user in [
            "huge-ttl",
            "end-of-time",
            "negative-ttl",
            "garbage",
            "wrong-owner",
            "long-message",
        ] {
            let response = client
                .get(svc.presence_url(user))
                .header("Authorization", bearer("reader", ""))
                .send()
                .await
                .expect("the node answers instead of dropping the connection");
            assert_eq!(response.status(), 404, "{user} at {}", svc.node_id);
        }
        let ready = client
            .get(svc.url("/health/readiness"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200);
        wait_until(
            "every poisoned value to be counted",
            READY_TIMEOUT,
            || async {
                metric(&client, svc, "presence_kv_values_skipped_total").await
                    >= poison.len() as f64
            },
        )
        .await;
        assert!(!svc.log().contains("panicked"), "{}", svc.log());
    }
}

/// What a write to a key that holds nothing expects.
const NEW: Expect = Expect::Key(0);

/// A memory store whose watches, reads and leader questions go through a
/// fault `F`; everything else is the store's own.
#[derive(Default)]
struct FaultyStore<F>(MemoryStore, F);

/// What a [`FaultyStore`] does to each watch the service starts, and to
/// its reads of a user.
#[async_trait::async_trait]
trait StoreFault: Default + Send + Sync + 'static {
    /// A watch's changes (the store's own unless the fault changes them).
    async fn alter(
        &self,
        _store: &MemoryStore,
        entries: ChangeStream,
    ) -> Result<ChangeStream, StoreError> {
        Ok(entries)
    }

    /// A read of one user (the store's own unless the fault changes it).
    async fn load(&self, store: &MemoryStore, user_id: &str) -> Result<Vec<Change>, StoreError> {
        store.load(user_id).await
    }

    /// A write (the store's own unless the fault changes it).
    async fn write(
        &self,
        store: &MemoryStore,
        user_id: &str,
        update: &Update,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        store.write(user_id, update, ttl, expect).await
    }

    /// The leader's answer (the store's own unless the fault changes it).
    async fn first_after(
        &self,
        store: &MemoryStore,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        store.first_after(revision).await
    }
}

#[async_trait::async_trait]
impl<F: StoreFault> PresenceStore for FaultyStore<F> {
    async fn load(&self, user_id: &str) -> Result<Vec<Change>, StoreError> {
        self.1.load(&self.0, user_id).await
    }
    async fn write(
        &self,
        user_id: &str,
        update: &Update,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        self.1.write(&self.0, user_id, update, ttl, expect).await
    }
    async fn watch(
        &self,
        start: WatchStart,
        echoes: EchoFilter,
    ) -> Result<ChangeStream, StoreError> {
        let entries = self.0.watch(start, echoes).await?;
        self.1.alter(&self.0, entries).await
    }
    async fn identity(&self) -> Result<BucketIdentity, StoreError> {
        self.0.identity().await
    }
    async fn first_after(&self, revision: u64) -> Result<Option<u64>, StoreError> {
        self.1.first_after(&self.0, revision).await
    }
    async fn ensure_bucket(&self) -> Result<(), StoreError> {
        self.0.ensure_bucket().await
    }
    fn opened_bucket(&self) -> Option<time::OffsetDateTime> {
        self.0.opened_bucket()
    }
    fn connectivity(&self) -> Connectivity {
        self.0.connectivity()
    }
    fn kind(&self) -> &'static str {
        "faulty"
    }
}

/// Panics on the first two changes of the user `boom` a watch delivers,
/// as a bug in a store would.
#[derive(Default)]
struct Crashing(Arc<std::sync::atomic::AtomicU32>);

#[async_trait::async_trait]
impl StoreFault for Crashing {
    async fn alter(
        &self,
        _: &MemoryStore,
        entries: ChangeStream,
    ) -> Result<ChangeStream, StoreError> {
        let crashes = self.0.clone();
        Ok(entries
            .map(move |entry| {
                if entry.as_ref().ok().and_then(Entry::user_id) == Some("boom")
                    && crashes.fetch_add(1, std::sync::atomic::Ordering::AcqRel) < 2
                {
                    panic!("a change the watch can't take");
                }
                entry
            })
            .boxed())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_watch_is_restarted_and_readiness_says_so() {
    let settings =
        Cli::try_parse_from(["presence-service", "--store=memory", "--jwt-secret", SECRET])
            .unwrap()
            .serve
            .validate()
            .unwrap();
    let store = Arc::new(FaultyStore::<Crashing>::default());
    let state = build_with_store(settings, store.clone(), Metrics::new().unwrap());
    let router = api::router(state.clone());
    let call = |path: &'static str| {
        let router = router.clone();
        async move {
            let request = axum::http::Request::get(path)
                .header("Authorization", bearer("reader", ""))
                .body(axum::body::Body::empty())
                .unwrap();
            let response = router.oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let seen = || {
        Update::Seen(Some(Seen {
            last_seen: time::OffsetDateTime::now_utc(),
            node_id: "n".into(),
        }))
    };
    wait_until("ready", READY_TIMEOUT, || async {
        call("/health/readiness").await.0 == 200
    })
    .await;
    store.write("boom", &seen(), None, NEW).await.unwrap();
    wait_until(
        "not ready while the watch is down",
        READY_TIMEOUT,
        || async { call("/health/readiness").await.0 == 503 },
    )
    .await;
    // Restarted from the last revision it applied, the watch follows the
    // bucket again: it applies the change it crashed on, and later ones.
    let after = store.write("after", &seen(), None, NEW).await.unwrap();
    wait_until(
        "the watch to get past the crashes",
        READY_TIMEOUT,
        || async { state.watch.applied_revision() >= after },
    )
    .await;
    assert_eq!(call("/health/readiness").await.0, 200);
    let metrics = call("/metrics").await.1;
    assert!(
        metrics.contains("presence_watch_crashes_total 2"),
        "{metrics}"
    );
}

/// Serves a first watch the way a replica behind the stream's leader
/// serves an R1 ordered consumer: it ends its replay (nothing pending) at
/// the oldest change, or at once when the bucket is empty, and then only
/// waits. Later watches are sound.
#[derive(Default)]
struct LaggingReplica(std::sync::atomic::AtomicBool);

#[async_trait::async_trait]
impl StoreFault for LaggingReplica {
    async fn alter(
        &self,
        store: &MemoryStore,
        mut entries: ChangeStream,
    ) -> Result<ChangeStream, StoreError> {
        if self.0.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Ok(entries);
        }
        let first = match store.identity().await?.messages {
            0 => None,
            _ => entries.next().await.map(|entry| {
                entry.map(|entry| match entry {
                    Entry::Change(change) => Entry::Change(Change {
                        pending: 0,
                        ..change
                    }),
                    other => other,
                })
            }),
        };
        Ok(futures::stream::iter(first)
            .chain(futures::stream::pending())
            .boxed())
    }
}

fn memory_settings() -> presence_dataplane::config::Settings {
    Cli::try_parse_from(["presence-service", "--store=memory", "--jwt-secret", SECRET])
        .unwrap()
        .serve
        .validate()
        .unwrap()
}

fn seen_now() -> Update {
    Update::Seen(Some(Seen {
        last_seen: time::OffsetDateTime::now_utc(),
        node_id: "n".into(),
    }))
}

/// A [`LaggingReplica`] whose leader can't be asked at first: the first
/// two questions time out.
#[derive(Default)]
struct LaggingReplicaUnsureLeader(LaggingReplica, std::sync::atomic::AtomicU32);

#[async_trait::async_trait]
impl StoreFault for LaggingReplicaUnsureLeader {
    async fn alter(
        &self,
        store: &MemoryStore,
        entries: ChangeStream,
    ) -> Result<ChangeStream, StoreError> {
        self.0.alter(store, entries).await
    }

    async fn first_after(
        &self,
        store: &MemoryStore,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        if self.1.fetch_add(1, std::sync::atomic::Ordering::AcqRel) < 2 {
            return Err(StoreError::Timeout(Duration::from_secs(2)));
        }
        store.first_after(revision).await
    }
}

/// Starts a node whose first watch ends its replay short of the bucket and
/// waits until it caught up, checking that the user the short replay
/// missed is never answered as unknown meanwhile. Returns the node.
async fn short_replay_caught_up<F: StoreFault>() -> presence_dataplane::AppState {
    let store = Arc::new(FaultyStore::<F>::default());
    store.write("early", &seen_now(), None, NEW).await.unwrap();
    let last = store.write("late", &seen_now(), None, NEW).await.unwrap();
    let state = build_with_store(memory_settings(), store.clone(), Metrics::new().unwrap());
    // No read before the short replay ended: a read would load `late`.
    wait_until("the short replay's change", READY_TIMEOUT, || async {
        state.watch.applied_revision() >= 1
    })
    .await;
    wait_until(
        "the replay to reach the bucket's last change",
        READY_TIMEOUT,
        || async {
            let late = state.service.get_json("late").await;
            assert!(
                matches!(late, Ok(Some(_))),
                "a user the replay had not reached was answered as {late:?}"
            );
            state.watch.applied_revision() >= last && !state.watch.replaying()
        },
    )
    .await;
    state
}

/// A replay that ends before the bucket's last change must not make the
/// cache a replica; the watch resumes after what it applied. At no point
/// is the user the short replay missed answered as unknown (a cache that
/// took itself for a replica would say so until the quiet watch is found
/// out, seconds later).
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_that_ends_short_of_the_bucket_is_watched_again() {
    let state = short_replay_caught_up::<LaggingReplica>().await;
    let stalls = |kind| state.metrics.watch_stalls.with_label_values(&[kind]).get();
    assert_eq!(stalls("replay_incomplete"), 1);
    assert_eq!(stalls("stood_still"), 1);
}

/// A replay that ends short while the leader can't be asked is not trusted
/// either: the node keeps replaying until the leader answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_replay_is_not_trusted_while_the_leader_cannot_be_asked() {
    let state = short_replay_caught_up::<LaggingReplicaUnsureLeader>().await;
    let stalls = |kind| state.metrics.watch_stalls.with_label_values(&[kind]).get();
    assert_eq!(stalls("replay_incomplete"), 0);
    assert_eq!(stalls("stood_still"), 1);
}

/// A node's first read fails, as one made before its NATS server links to
/// the hub does, but only once the test says so; the node's first watch
/// holds its replay until that read began.
#[derive(Default)]
struct FirstReadFails {
    read_began: Arc<tokio::sync::Notify>,
    fail_now: tokio::sync::Notify,
    failed: std::sync::atomic::AtomicBool,
    watched: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl StoreFault for FirstReadFails {
    async fn alter(
        &self,
        _: &MemoryStore,
        entries: ChangeStream,
    ) -> Result<ChangeStream, StoreError> {
        if self.watched.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return Ok(entries);
        }
        let read_began = self.read_began.clone();
        let held = futures::stream::once(async move { read_began.notified().await })
            .filter_map(|()| async { None });
        Ok(held.chain(entries).boxed())
    }

    async fn load(&self, store: &MemoryStore, user_id: &str) -> Result<Vec<Change>, StoreError> {
        if self.failed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return store.load(user_id).await;
        }
        self.read_began.notify_one();
        self.fail_now.notified().await;
        Err(StoreError::Unavailable("no route to the hub yet".into()))
    }
}

/// The flake of `regions_in_three_clusters_meet_only_at_the_hubs_exposed_address`,
/// found: a read on a restarted node reserved the user's slot and could
/// not reach the bucket; meanwhile the replay merged the user into that
/// slot and made the cache a replica, which then took the slot, still
/// incomplete, for the user's absence and answered 404 for good.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_that_failed_during_the_replay_does_not_hide_the_user_after_it() {
    let store = Arc::new(FaultyStore::<FirstReadFails>::default());
    let revision = store.write("ann", &seen_now(), None, NEW).await.unwrap();
    let state = build_with_store(memory_settings(), store.clone(), Metrics::new().unwrap());
    let early = tokio::spawn({
        let state = state.clone();
        async move { state.service.get_json("ann").await }
    });
    wait_until("the replay to end", READY_TIMEOUT, || async {
        state.watch.applied_revision() >= revision && !state.watch.replaying()
    })
    .await;
    assert!(state.service.cache().is_replica());
    store.1.fail_now.notify_one();
    let early = early.await.unwrap();
    assert!(
        matches!(early, Err(StoreError::Unavailable(_))),
        "{early:?}"
    );
    let after = state.service.get_json("ann").await;
    assert!(
        matches!(after, Ok(Some(_))),
        "ann was answered as {after:?}"
    );
    // That read completed the slot: the next one is a cache hit.
    let hits = state.service.cache().stats().hits;
    assert!(matches!(state.service.get_json("ann").await, Ok(Some(_))));
    assert_eq!(state.service.cache().stats().hits, hits + 1);
}

/// Once armed, the next write of a user's durable `seen` fails, as a
/// write the hub doesn't answer does.
#[derive(Default)]
struct SeenWriteFailsOnce {
    armed: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl StoreFault for SeenWriteFailsOnce {
    async fn write(
        &self,
        store: &MemoryStore,
        user_id: &str,
        update: &Update,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        if matches!(update, Update::Seen(_))
            && self.armed.swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return Err(StoreError::Unavailable("the hub did not answer".into()));
        }
        store.write(user_id, update, ttl, expect).await
    }
}

/// Ending a session writes the removal and the durable `seen`. When one of
/// them fails the client gets a 503 and retries; the retry must end the
/// session and record the time, not answer 404 for a session the first
/// attempt removed while its `seen` write failed.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_end_that_failed_halfway_can_be_retried() {
    let store = Arc::new(FaultyStore::<SeenWriteFailsOnce>::default());
    let state = build_with_store(memory_settings(), store.clone(), Metrics::new().unwrap());
    let router = api::router(state.clone());
    let end = || {
        let router = router.clone();
        async move {
            let request = axum::http::Request::delete("/api/v2/presence/ann/sessions/laptop")
                .header("Authorization", bearer("ann", ""))
                .body(axum::body::Body::empty())
                .unwrap();
            let response = router.oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            (
                status,
                serde_json::from_slice::<Value>(&body).unwrap_or_default(),
            )
        }
    };
    wait_until("the empty replay to end", READY_TIMEOUT, || async {
        !state.watch.replaying() && state.watch.snapshot().active
    })
    .await;
    // A session last heard of 10 s ago, and no durable `seen` yet: the
    // end has a time of its own to record.
    let heard = time::OffsetDateTime::now_utc() - time::Duration::seconds(10);
    let session = presence_dataplane::session::Session {
        device: "laptop".into(),
        status: presence_dataplane::model::Status::Online,
        last_seen: heard,
        ttl_seconds: 60,
        node_id: "n".into(),
    };
    let update = Update::Session("laptop".into(), Some(Arc::new(session)));
    let written = store
        .write("ann", &update, Some(Duration::from_secs(60)), NEW)
        .await
        .unwrap();
    wait_until("the node to see the session", READY_TIMEOUT, || async {
        state.watch.applied_revision() >= written
    })
    .await;
    store
        .1
        .armed
        .store(true, std::sync::atomic::Ordering::Release);
    let (status, body) = end().await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = end().await;
    assert_eq!(status, 200, "the retry: {body}");
    assert_eq!(body["sessions"], json!([]), "{body}");
    let ended = time::OffsetDateTime::parse(
        body["lastSeen"].as_str().expect("lastSeen"),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(
        ended > heard,
        "lastSeen {ended} is the end's time, after {heard}"
    );
}

/// A live watch that goes quiet (heartbeats, no changes, no error) while
/// the bucket moves on is noticed and replaced.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_that_goes_quiet_while_the_bucket_moves_on_is_watched_again() {
    let store = Arc::new(FaultyStore::<LaggingReplica>::default());
    let state = build_with_store(memory_settings(), store.clone(), Metrics::new().unwrap());
    wait_until("the empty replay to end", READY_TIMEOUT, || async {
        !state.watch.replaying() && state.watch.snapshot().active
    })
    .await;
    let written = store.write("later", &seen_now(), None, NEW).await.unwrap();
    wait_until(
        "the watch to follow the bucket again",
        READY_TIMEOUT,
        || async { state.watch.applied_revision() >= written },
    )
    .await;
    let stalls = |kind| state.metrics.watch_stalls.with_label_values(&[kind]).get();
    assert_eq!(stalls("stood_still"), 1);
    assert_eq!(stalls("replay_incomplete"), 0);
}

// ---------------------------------------------------------------- 5. JWT

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_checked_for_nbf_audience_lists_and_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let plain = memory_node(
        dir.path(),
        "plain",
        vec![("JWT_MAX_LIFETIME", "3600".into())],
    )
    .await;
    let audience = memory_node(dir.path(), "aud", vec![("JWT_AUDIENCE", "presence".into())]).await;
    let client = http();
    let now = now_secs();
    // A reader's GET of an unknown user: 404 when the token is accepted.
    let answer = |svc: &Service, claims: Value| {
        let request = client
            .get(svc.presence_url("nobody"))
            .header("Authorization", format!("Bearer {}", signed(&claims)));
        async move { request.send().await.expect("answer").status().as_u16() }
    };
    for (claims, expected, why) in [
        (
            json!({"sub": "a", "exp": now + 600, "nbf": now + 3600}),
            401,
            "not valid for an hour",
        ),
        (
            json!({"sub": "a", "exp": now + 600, "nbf": now + 10}),
            404,
            "nbf within the leeway",
        ),
        (
            json!({"sub": "a", "exp": now + 600, "nbf": now - 10}),
            404,
            "nbf passed",
        ),
        (
            json!({"sub": "a", "exp": now + 600, "aud": ["x", "y"]}),
            404,
            "aud list, none configured",
        ),
        (
            json!({"sub": "a", "exp": now + 600, "aud": "x"}),
            404,
            "aud string, none configured",
        ),
        (
            json!({"sub": "a", "exp": now + 7200, "iat": now}),
            401,
            "lives 2 h, limit 1 h",
        ),
        (
            json!({"sub": "a", "exp": now + 600, "iat": now - 7200}),
            401,
            "issued 2 h before exp",
        ),
        (
            json!({"sub": "a", "exp": now + 1800, "iat": now - 600}),
            404,
            "lives 40 min",
        ),
        (
            json!({"sub": "a", "exp": now + 7200}),
            401,
            "no iat, 2 h left",
        ),
        (
            json!({"sub": "a", "exp": now + 1800}),
            404,
            "no iat, 30 min left",
        ),
    ] {
        assert_eq!(
            answer(&plain, claims.clone()).await,
            expected,
            "{why}: {claims}"
        );
    }
    for (aud, expected) in [
        (json!(["other", "presence"]), 404),
        (json!("presence"), 404),
        (json!(["other"]), 401),
        (Value::Null, 401),
    ] {
        let mut claims = json!({"sub": "a", "exp": now + 600});
        if !aud.is_null() {
            claims["aud"] = aud.clone();
        }
        assert_eq!(answer(&audience, claims).await, expected, "aud {aud}");
    }
}

// --------------------------------------------------------------- 6. batch

#[tokio::test(flavor = "multi_thread")]
async fn batch_needs_its_scope_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(dir.path(), "solo", vec![]).await;
    let mut stream = connect(&svc).await;
    let head = format!(
        "POST /api/v2/presence/batch HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",
        bearer("plain-user", "")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // No body follows: a node that read it before checking the scope would
    // never answer.
    let response = read_head(&mut stream, Duration::from_secs(10))
        .await
        .expect("an answer without the body being sent");
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");
}

// ---------------------------------------------------- 2. metric label set

#[tokio::test(flavor = "multi_thread")]
async fn made_up_methods_share_one_metric_label() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(dir.path(), "solo", vec![]).await;
    let client = http();
    for i in 0..40 {
        let method = reqwest::Method::from_bytes(format!("FOO{i}").as_bytes()).unwrap();
        for path in ["/health".to_owned(), format!("/nowhere/{i}")] {
            let response = client.request(method.clone(), svc.url(&path)).send().await;
            assert!(response.is_ok(), "{method} {path}: {response:?}");
        }
    }
    let text = client
        .get(svc.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let methods: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("presence_http_requests_total{"))
        .filter_map(|l| l.split("method=\"").nth(1)?.split('"').next())
        .collect();
    let known = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "other",
    ];
    assert!(methods.contains("other"), "{methods:?}");
    assert!(methods.iter().all(|m| known.contains(m)), "{methods:?}");
}

// ---------------------------------------------------------- 3. connections

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(
        dir.path(),
        "solo",
        vec![
            ("HTTP_HEADER_READ_TIMEOUT_SECS", "2".into()),
            ("HTTP_KEEPALIVE_TIMEOUT_SECS", "1".into()),
        ],
    )
    .await;
    // Slowloris: a request head that never ends, one header line at a time.
    let mut slow = connect(&svc).await;
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut closed = false;
    for i in 0.. {
        assert!(
            Instant::now() < deadline,
            "a dripping request head is still being read"
        );
        let line = format!("X-Drip-{i}: y\r\n");
        if slow.write_all(line.as_bytes()).await.is_err()
            || closed_by_server(&mut slow, Duration::from_millis(300)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed);
    // Half a request head, then silence.
    let mut half = connect(&svc).await;
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_by_server(&mut half, Duration::from_secs(30)).await);
    // A kept-alive connection that asks nothing more.
    let mut idle = connect(&svc).await;
    idle.write_all(b"GET /health/liveness HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut idle, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(closed_by_server(&mut idle, Duration::from_secs(30)).await);
    let client = http();
    assert!(
        metric_where(
            &client,
            &svc,
            "presence_http_connections_timed_out_total",
            "reason=\"header\""
        )
        .await
            >= 1.0
    );
    assert!(
        metric_where(
            &client,
            &svc,
            "presence_http_connections_timed_out_total",
            "reason=\"keepalive\""
        )
        .await
            >= 1.0
    );
}

/// Sends `user`'s `POST` announcing a body of `length` bytes but sending
/// only `body`, and reads the whole answer until the node closes the
/// connection (a hang guard of 60 s, not a timing assertion).
async fn post_announcing(svc: &Service, user: &str, length: usize, body: &str) -> String {
    let mut client = connect(svc).await;
    let head = format!(
        "POST /api/v2/presence/{user} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{body}",
        bearer(user, "")
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut answer))
        .await
        .expect("answered, and the connection closed");
    read.expect("read the answer");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A body announced far larger than the limit (beyond what is read and
/// dropped before a 413) is refused at once, and one within that but never
/// sent within the drain time; neither after the body timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_announced_too_large_is_answered_413_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A body timeout longer than the wait below: only the announcement
    // can answer in time.
    let svc = memory_node(
        dir.path(),
        "solo",
        vec![("HTTP_BODY_READ_TIMEOUT_SECS", "600".into())],
    )
    .await;
    for announced in [5_000_000, 2_000_000] {
        let answer = post_announcing(&svc, "big", announced, r#"{"status":"online"}"#).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains(r#""code":"payload_too_large""#), "{answer}");
    }
}

/// Sends `user`'s `POST` with a chunked body (no `Content-Length`) made of
/// `chunks`, all of it before reading, and reads the whole answer until
/// the node closes the connection (a hang guard of 60 s, not a timing
/// assertion). The chunks go a few milliseconds apart, as from a client
/// that makes its body as it sends it, so a node that stopped reading
/// shows as a refused write, an error.
async fn post_chunked(svc: &Service, user: &str, chunks: &[&[u8]]) -> std::io::Result<String> {
    let mut client = connect(svc).await;
    let head = format!(
        "POST /api/v2/presence/{user} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n",
        bearer(user, "")
    );
    client.write_all(head.as_bytes()).await?;
    for chunk in chunks {
        client
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await?;
        client.write_all(chunk).await?;
        client.write_all(b"\r\n").await?;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    client.write_all(b"0\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut answer))
        .await
        .expect("answered, and the connection closed")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A body sent without a length (chunked) that outgrows the limit is read
/// on and dropped before its 413, as one announced too large is: a client
/// that writes all of it before reading gets the answer, not a connection
/// closed under the rest of its body. A chunked body within the limit is
/// taken whole, however it was cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_body_too_large_is_answered_413() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(dir.path(), "solo", vec![]).await;
    let piece = vec![b'a'; 64 * 1024];
    // 3 MiB: past the limit, within what is drained.
    let oversized: Vec<&[u8]> = std::iter::repeat_n(piece.as_slice(), 48).collect();
    for _ in 0..5 {
        let answer = post_chunked(&svc, "big", &oversized)
            .await
            .expect("the node read the whole body");
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains(r#""code":"payload_too_large""#), "{answer}");
    }
    let answer = post_chunked(
        &svc,
        "cut",
        &[b"{\"status\":", b"\"busy\",", b"\"message\":\"x\"}"],
    )
    .await
    .expect("answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (status, body) = get(&http(), &svc, "cut").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("busy")));
}

/// A body that breaks off as HTTP (a chunk size that is no number) is a
/// 400 `invalid_body`, not a 500 and not a hang.
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_chunked_body_is_answered_400() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(dir.path(), "solo", vec![]).await;
    let mut client = connect(&svc).await;
    let head = format!(
        "POST /api/v2/presence/ann HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n",
        bearer("ann", "")
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut answer))
        .await
        .expect("answered, and the connection closed")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"invalid_body""#), "{answer}");
}

/// A JWT secret of at least 16 bytes starts the node, as the Go service
/// took it, but one under the 32 bytes RFC 7518 asks of an HS256 key is
/// named in a warning at start; the tests' own 34-byte secret is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_jwt_secret_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let short = memory_node(
        dir.path(),
        "short",
        vec![("JWT_SECRET", "twenty-bytes-secret!".into())],
    )
    .await;
    let long = memory_node(dir.path(), "long", vec![]).await;
    let warning = "JWT_SECRET is shorter than the 32 bytes";
    assert!(short.log().contains(warning), "{}", short.log());
    assert!(short.log().contains("bytes=20"), "{}", short.log());
    assert!(!long.log().contains(warning), "{}", long.log());
}

/// A body announced but never (or only partly) sent must not hold its
/// connection and handler forever: the request is answered 408 in JSON
/// and the connection closed.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_that_stops_arriving_is_answered_408() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(
        dir.path(),
        "solo",
        vec![("HTTP_BODY_READ_TIMEOUT_SECS", "1".into())],
    )
    .await;
    let answer = post_announcing(&svc, "slow", 100, r#"{"status""#).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"body_timeout""#), "{answer}");
    let client = http();
    assert_eq!(
        metric_where(
            &client,
            &svc,
            "presence_http_connections_timed_out_total",
            "reason=\"body\""
        )
        .await,
        1.0
    );
    // Nothing was stored for the half-sent write.
    assert_eq!(get(&client, &svc, "slow").await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_are_capped_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(
        dir.path(),
        "solo",
        vec![("HTTP_MAX_CONNECTIONS", "8".into())],
    )
    .await;
    let mut held = Vec::new();
    let mut refusal = None;
    for _ in 0..20 {
        let mut stream = connect(&svc).await;
        stream
            .write_all(b"GET /api/v2/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut stream, Duration::from_secs(10))
            .await
            .unwrap_or_default();
        if head.starts_with("HTTP/1.1 200") {
            held.push(stream);
        } else {
            refusal = Some(head);
            break;
        }
    }
    let refusal = refusal.expect("a connection beyond the cap is refused");
    assert!(held.len() <= 8, "{} connections were served", held.len());
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(
        refusal.to_ascii_lowercase().contains("retry-after"),
        "{refusal}"
    );
    // With every place held, the kubelet's probes are still answered (a
    // failed liveness probe would restart the pod and drop every client).
    let client = http();
    for path in ["/health/liveness", "/health/readiness"] {
        let probe = client.get(svc.url(path)).send().await.expect("probe");
        assert_eq!(probe.status(), 200, "{path}");
    }
    assert_eq!(
        client
            .get(svc.url("/api/v2/openapi.json"))
            .send()
            .await
            .expect("answer")
            .status(),
        503,
        "only probes beyond the cap"
    );
    drop(held);
    wait_until("connections to be served again", READY_TIMEOUT, || async {
        client
            .get(svc.url("/api/v2/openapi.json"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(metric(&client, &svc, "presence_http_connections_refused_total").await >= 1.0);
}

// -------------------------------------------------------------- 4. streams

/// A refusal to come back later: its status, `Retry-After`, its code.
async fn assert_refused(refused: reqwest::Response, status: u16, code: &str) {
    assert_eq!(refused.status(), status);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], code);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_caller_cannot_take_every_stream_slot() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(
        dir.path(),
        "solo",
        vec![("STREAM_MAX_PER_CALLER", "3".into())],
    )
    .await;
    let client = http();
    let url = stream_url(&svc, &["a"]);
    let greedy = bearer("greedy", "");
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = EventStream::open_as(&client, &url, None, &greedy).await;
        stream.until_snapshot_end().await;
        streams.push(stream);
    }
    let refused = client
        .get(&url)
        .header("Authorization", &greedy)
        .send()
        .await
        .unwrap();
    assert_refused(refused, 429, "too_many_streams_for_caller").await;
    // Others are not affected.
    let mut other = EventStream::open_as(&client, &url, None, &bearer("modest", "")).await;
    other.until_snapshot_end().await;
    // A closed stream gives its place back.
    drop(streams.pop());
    wait_until(
        "the caller's place to be released",
        READY_TIMEOUT,
        || async {
            client
                .get(&url)
                .header("Authorization", &greedy)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
}

/// Streams are capped, and so are the users they follow together: each
/// follow keeps a user's ID and record for the stream's life.
#[tokio::test(flavor = "multi_thread")]
async fn the_users_all_streams_follow_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(dir.path(), "solo", vec![("STREAM_MAX_FOLLOWS", "5".into())]).await;
    let client = http();
    let mut first = EventStream::open_as(
        &client,
        &stream_url(&svc, &["a", "b", "c"]),
        None,
        &bearer("one", ""),
    )
    .await;
    first.until_snapshot_end().await;
    let refused = client
        .get(stream_url(&svc, &["d", "e", "f"]))
        .header("Authorization", bearer("two", ""))
        .send()
        .await
        .unwrap();
    assert_refused(refused, 503, "too_many_follows").await;
    assert_eq!(metric(&client, &svc, "presence_stream_follows").await, 3.0);
    // Two more users fit; a closed stream gives its users back.
    let mut second = EventStream::open_as(
        &client,
        &stream_url(&svc, &["d", "e"]),
        None,
        &bearer("two", ""),
    )
    .await;
    second.until_snapshot_end().await;
    drop(first);
    wait_until(
        "the closed stream's follows to be released",
        READY_TIMEOUT,
        || async {
            client
                .get(stream_url(&svc, &["f", "g", "h"]))
                .header("Authorization", bearer("three", ""))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_whose_client_stops_reading_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(
        dir.path(),
        "solo",
        vec![
            ("HTTP_SEND_TIMEOUT_SECS", "2".into()),
            ("RATE_LIMIT_WRITES_PER_SECOND", "0".into()),
        ],
    )
    .await;
    let client = http();
    let users: Vec<String> = (0..1000).map(|i| format!("reader-{i}")).collect();
    batch(&client, &svc, &users, &"m".repeat(256)).await;
    // A client with a tiny receive window that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket
        .connect(format!("127.0.0.1:{}", svc.port).parse().unwrap())
        .await
        .unwrap();
    let request = format!(
        "GET /api/v2/presence/stream?users={} HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
        users.join(","),
        bearer("slow", "")
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    wait_until("the stream to open", READY_TIMEOUT, || async {
        metric(&client, &svc, "presence_streams_open").await == 1.0
    })
    .await;
    // Keep changing its users until the node gives up on it. At most a
    // round of 1000 changes per 250 ms: 8000 in the 2 s send timeout, well
    // within the stream's queue of 16 384, so it ends by the timeout under
    // test and not as lagged (a fast machine wrote enough to fill it).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pace = tokio::time::interval(Duration::from_millis(250));
    let mut round = 0;
    while metric(&client, &svc, "presence_streams_open").await > 0.0 {
        pace.tick().await;
        assert!(
            Instant::now() < deadline,
            "the stalled stream is open after {round} rounds"
        );
        round += 1;
        batch(
            &client,
            &svc,
            &users,
            &format!("{round:04}{}", "m".repeat(250)),
        )
        .await;
    }
    assert!(
        metric_where(
            &client,
            &svc,
            "presence_streams_closed_total",
            "reason=\"send_timeout\""
        )
        .await
            >= 1.0
    );
    wait_until(
        "the stalled connection to be closed",
        READY_TIMEOUT,
        || async {
            metric_where(
                &client,
                &svc,
                "presence_http_connections_timed_out_total",
                "reason=\"send\"",
            )
            .await
                >= 1.0
        },
    )
    .await;
    assert!(closed_by_server(&mut stalled, Duration::from_secs(30)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_when_its_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(dir.path(), "solo", vec![]).await;
    // No overall timeout: the stream lives about 10 s (EventStream bounds
    // each wait).
    let client = reqwest::Client::new();
    // Expired 20 s ago: still accepted for the 30 s of leeway.
    let token = signed(&json!({"sub": "short-lived", "exp": now_secs() - 20}));
    let url = stream_url(&svc, &["a"]);
    let mut stream = EventStream::open_as(&client, &url, None, &format!("Bearer {token}")).await;
    stream.until_snapshot_end().await;
    let last = stream.next().await;
    assert_eq!(last.event, "error", "{last:?}");
    assert_eq!(last.data["error"]["code"], "token_expired", "{last:?}");
    assert!(stream.ended().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_log_is_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let svc = memory_node(
        dir.path(),
        "solo",
        vec![
            ("STREAM_EVENT_LOG_MAX_BYTES", "4096".into()),
            ("RATE_LIMIT_WRITES_PER_SECOND", "0".into()),
        ],
    )
    .await;
    let client = http();
    set(&client, &svc, "big", "online", "first").await;
    let url = stream_url(&svc, &["big"]);
    let mut stream = EventStream::open(&client, &url, None).await;
    let start = stream
        .until_snapshot_end()
        .await
        .last()
        .and_then(|e| e.id)
        .expect("an id");
    for i in 1..=3 {
        let message = format!("{i}{}", "x".repeat(250));
        assert_eq!(
            set(&client, &svc, "big", "busy", &message).await.status(),
            200
        );
        assert_eq!(stream.next().await.data["message"], message.as_str());
    }
    // Other users' changes push big's out of the log's byte budget.
    let fillers: Vec<String> = (0..20).map(|i| format!("filler-{i}")).collect();
    batch(&client, &svc, &fillers, &"y".repeat(256)).await;
    let mut caught_up = EventStream::open(&client, &stream_url(&svc, &["filler-19"]), None).await;
    caught_up.until_snapshot_end().await;
    let mut resumed = EventStream::open(&client, &url, Some(start)).await;
    let events = resumed.until_snapshot_end().await;
    let presences: Vec<&SseEvent> = events.iter().filter(|e| e.event == "presence").collect();
    assert_eq!(
        presences.len(),
        1,
        "beyond the byte budget a resume gets the latest state: {events:?}"
    );
    assert!(
        presences[0].data["message"]
            .as_str()
            .unwrap_or("")
            .starts_with('3')
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_bucket_resets_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Nats::hub(dir.path()).await;
    let center = Service::start(
        dir.path(),
        ServiceSpec::new("center-1", "center", hub.url()),
    )
    .await;
    let client = http();
    assert_eq!(
        set(&client, &center, "x", "online", "old").await.status(),
        200
    );
    let mut stream = EventStream::open(&client, &stream_url(&center, &["x"]), None).await;
    stream.until_snapshot_end().await;
    let js = async_nats::jetstream::new(async_nats::connect(hub.url()).await.unwrap());
    js.delete_key_value("PRESENCE").await.unwrap();
    let event = stream.next().await;
    assert_eq!(event.event, "error", "{event:?}");
    assert_eq!(event.data["error"]["code"], "stream_reset", "{event:?}");
    assert!(stream.ended().await);
}

// ---------------------------------------------------------------- 7. races

#[tokio::test(flavor = "multi_thread")]
async fn the_bucket_itself_refuses_writes_with_stale_expectations() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Nats::hub(dir.path()).await;
    let leaf = Nats::leaf(dir.path(), "eu", &hub, None).await;
    // The store as a leaf node uses it: through the hub's JetStream domain.
    let settings = Cli::try_parse_from([
        "presence-service",
        "--jwt-secret",
        SECRET,
        "--nats-url",
        &leaf.url(),
        "--nats-js-domain",
        "hub",
        "--node-type",
        "center",
    ])
    .unwrap()
    .serve
    .validate()
    .unwrap();
    let store = NatsStore::connect(&settings, Metrics::new().unwrap())
        .await
        .unwrap();
    tokio::time::timeout(READY_TIMEOUT, store.open_bucket_until_ready())
        .await
        .expect("the bucket opens");
    let session = |id: &str| {
        Update::Session(
            id.into(),
            Some(Arc::new(presence_dataplane::session::Session {
                device: String::new(),
                status: presence_dataplane::model::Status::Online,
                last_seen: time::OffsetDateTime::now_utc(),
                ttl_seconds: 60,
                node_id: "n".into(),
            })),
        )
    };
    let seen = Update::Seen(Some(Seen {
        last_seen: time::OffsetDateTime::now_utc(),
        node_id: "n".into(),
    }));
    let first = store.write("u", &seen, None, NEW).await.unwrap();
    let late = store.write("u", &seen, None, NEW).await;
    assert!(matches!(late, Err(StoreError::Conflict)), "{late:?}");
    let second = store
        .write("u", &seen, None, Expect::Key(first))
        .await
        .unwrap();
    // A new session must find the user's sessions as they were counted.
    let a = store
        .write("u", &session("a"), None, Expect::Sessions(0))
        .await
        .unwrap();
    let raced = store
        .write("u", &session("b"), None, Expect::Sessions(0))
        .await;
    assert!(matches!(raced, Err(StoreError::Conflict)), "{raced:?}");
    store
        .write("u", &session("b"), None, Expect::Sessions(a))
        .await
        .unwrap();
    // Another user's sessions are another set.
    let last = store
        .write("v", &session("a"), None, Expect::Sessions(0))
        .await
        .unwrap();
    // What the stream's leader stores after a revision: how a watch that
    // stopped short is told apart (asked through the hub's domain too).
    // The bucket keeps one value per key, so `first` was replaced.
    assert_eq!(store.first_after(0).await.unwrap(), Some(second));
    assert_eq!(store.first_after(first).await.unwrap(), Some(second));
    assert_eq!(store.first_after(second).await.unwrap(), Some(a));
    assert_eq!(store.first_after(last).await.unwrap(), None);
    // A user's load reads each key's last value from the leader, removals
    // included, through the hub's domain too.
    let ended = store
        .write(
            "v",
            &Update::Session("a".into(), None),
            Some(Duration::from_secs(60)),
            Expect::Key(last),
        )
        .await
        .unwrap();
    let loaded = |changes: Vec<Change>| {
        let mut found: Vec<(u64, bool)> = changes
            .into_iter()
            .map(|c| {
                let removal = matches!(c.update, Update::Session(_, None));
                (c.revision, removal)
            })
            .collect();
        found.sort_unstable();
        found
    };
    let b = a + 1;
    assert_eq!(
        loaded(store.load("u").await.unwrap()),
        [(second, false), (a, false), (b, false)]
    );
    assert_eq!(loaded(store.load("v").await.unwrap()), [(ended, true)]);
    assert!(store.load("nobody").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_cap_holds_under_concurrent_heartbeats() {
    let c = Cluster::start_with(vec![("RATE_LIMIT_WRITES_PER_SECOND", "0".into())]).await;
    let client = http();
    let nodes = c.services();
    let attempts: Vec<_> = (0..96)
        .map(|i| {
            let request = client
                .put(session_url(nodes[i % 3], "crowd", &format!("s{i}")))
                .header("Authorization", bearer("crowd", ""))
                .json(&json!({"ttlSeconds": 300}));
            tokio::spawn(async move {
                let response = request.send().await.expect("answer");
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or_default();
                (
                    status,
                    body["error"]["code"].as_str().unwrap_or("").to_owned(),
                )
            })
        })
        .collect();
    let (mut created, mut full, mut conflicts) = (0, 0, 0);
    for attempt in attempts {
        match attempt.await.unwrap() {
            (200, _) => created += 1,
            (409, code) if code == "too_many_sessions" => full += 1,
            (503, code) if code == "write_conflict" => conflicts += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    eprintln!("{created} created, {full} refused at the cap, {conflicts} gave up on conflicts");
    assert!(
        (1..=32).contains(&created),
        "{created} sessions were created"
    );
    for svc in nodes {
        wait_until(
            &format!("{} to show every session", svc.node_id),
            READY_TIMEOUT,
            || async {
                get(&client, svc, "crowd").await.1["sessions"]
                    .as_array()
                    .map(Vec::len)
                    == Some(created)
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_answered_503_never_lands_over_a_newer_one() {
    let c = Cluster::start().await;
    let client = http();
    assert_eq!(
        set(&client, &c.eu, "contested", "online", "v0")
            .await
            .status(),
        200
    );
    // eu's NATS server freezes: eu's next write waits in its socket and is
    // answered 503 when the write timeout runs out.
    c.eu_nats.pause();
    let stale = set(&client, &c.eu, "contested", "busy", "stale").await;
    assert_eq!(stale.status(), 503);
    let body: Value = stale.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_timeout");
    // Meanwhile a newer write is made through another region.
    assert_eq!(
        set(&client, &c.us, "contested", "away", "newer")
            .await
            .status(),
        200
    );
    c.eu_nats.resume();
    // eu's connection delivers what it held first: once a later write
    // through eu is acknowledged, the held one has been decided.
    wait_until("a write through eu", Duration::from_secs(30), || async {
        set(&client, &c.eu, "marker", "online", "").await.status() == 200
    })
    .await;
    for svc in c.services() {
        wait_until(
            &format!("{} to see the marker", svc.node_id),
            READY_TIMEOUT,
            || async { get(&client, svc, "marker").await.0 == 200 },
        )
        .await;
        let (_, body) = get(&client, svc, "contested").await;
        assert_eq!(body["message"], "newer", "at {}: {body}", svc.node_id);
    }
}

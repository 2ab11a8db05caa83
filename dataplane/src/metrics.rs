//! Prometheus metrics of one service instance.
//!
//! Each instance owns its registry (no globals), so tests can run several
//! services in one process and `/metrics` shows only this node's numbers.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Latency buckets from 50 µs to 5 s: cache hits sit at the bottom, KV
/// writes through a leaf in the middle, timeouts at the top.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// Cache counters; the `/api/v2/cache/metrics` JSON reads the same values.
#[derive(Clone)]
pub struct CacheCounters {
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub keys_added: IntCounter,
    pub keys_evicted: IntCounter,
    pub cost_added: IntCounter,
    pub cost_evicted: IntCounter,
}

/// Every metric the data plane exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub kv_duration: HistogramVec,
    pub watch_lag: Histogram,
    pub watch_applied_revision: IntGauge,
    pub watch_active: IntGauge,
    pub watch_restarts: IntCounter,
    pub cache: CacheCounters,
    pub cache_entries: IntGauge,
    pub cache_weighted_size: IntGauge,
    pub streams_open: IntGauge,
    pub stream_events: IntCounter,
    pub streams_lagged: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("presence".into()), None)?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP request latency by route and status",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "status"],
        )?;
        let kv_duration = HistogramVec::new(
            HistogramOpts::new(
                "kv_operation_duration_seconds",
                "NATS KV operation latency by operation and outcome",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op", "outcome"],
        )?;
        let watch_lag = Histogram::with_opts(
            HistogramOpts::new(
                "watch_lag_seconds",
                "Time from a KV write at the hub to its application to this node's cache",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let watch_applied_revision = IntGauge::new(
            "watch_applied_revision",
            "Last KV revision applied to the cache by the watch",
        )?;
        let watch_active = IntGauge::new(
            "watch_active",
            "1 while the KV watch is running, 0 while it is being re-established",
        )?;
        let watch_restarts = IntCounter::new(
            "watch_restarts_total",
            "Times the KV watch was re-established after an error",
        )?;
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let cache = CacheCounters {
            hits: counter("cache_hits_total", "Reads answered from the cache")?,
            misses: counter("cache_misses_total", "Reads that went to the KV bucket")?,
            keys_added: counter("cache_keys_added_total", "Keys inserted into the cache")?,
            keys_evicted: counter(
                "cache_keys_evicted_total",
                "Keys evicted to stay within CACHE_MAX_COST",
            )?,
            cost_added: counter("cache_cost_added_total", "Estimated bytes inserted")?,
            cost_evicted: counter("cache_cost_evicted_total", "Estimated bytes evicted")?,
        };
        let cache_entries = IntGauge::new("cache_entries", "Entries in the cache")?;
        let cache_weighted_size = IntGauge::new(
            "cache_weighted_size_bytes",
            "Estimated bytes held by the cache",
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(kv_duration.clone()))?;
        registry.register(Box::new(watch_lag.clone()))?;
        registry.register(Box::new(watch_applied_revision.clone()))?;
        registry.register(Box::new(watch_active.clone()))?;
        registry.register(Box::new(watch_restarts.clone()))?;
        for c in [
            &cache.hits,
            &cache.misses,
            &cache.keys_added,
            &cache.keys_evicted,
            &cache.cost_added,
            &cache.cost_evicted,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        let streams_open = IntGauge::new("streams_open", "Change streams (SSE) open now")?;
        let stream_events = counter(
            "stream_events_total",
            "Presence events sent on change streams",
        )?;
        let streams_lagged = counter(
            "streams_lagged_total",
            "Change streams ended because they fell behind the change feed",
        )?;
        registry.register(Box::new(streams_open.clone()))?;
        registry.register(Box::new(stream_events.clone()))?;
        registry.register(Box::new(streams_lagged.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        registry.register(Box::new(cache_weighted_size.clone()))?;
        Ok(Metrics {
            registry,
            http_requests,
            http_duration,
            kv_duration,
            watch_lag,
            watch_applied_revision,
            watch_active,
            watch_restarts,
            cache,
            cache_entries,
            cache_weighted_size,
            streams_open,
            stream_events,
            streams_lagged,
        })
    }

    /// Times a KV operation into `kv_operation_duration_seconds`.
    pub fn observe_kv(&self, op: &str, ok: bool, started: std::time::Instant) {
        let outcome = if ok { "ok" } else { "error" };
        self.kv_duration
            .with_label_values(&[op, outcome])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

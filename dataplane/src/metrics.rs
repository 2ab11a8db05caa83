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
    pub http_connections_open: IntGauge,
    pub http_connections_refused: IntCounter,
    pub http_connections_timed_out: IntCounterVec,
    pub kv_duration: HistogramVec,
    pub watch_lag: Histogram,
    pub watch_applied_revision: IntGauge,
    pub watch_active: IntGauge,
    pub watch_restarts: IntCounter,
    /// Watches that stopped short of the bucket (see `watch::Progress`).
    pub watch_stalls: IntCounterVec,
    pub watch_crashes: IntCounter,
    /// Own writes' echoes the watch passed over undecoded (see
    /// `store::EchoFilter`): how much of the watch's decoding they save.
    pub watch_echoes_undecoded: IntCounter,
    pub kv_values_skipped: IntCounter,
    pub write_conflicts: IntCounter,
    pub cache: CacheCounters,
    pub cache_entries: IntGauge,
    pub cache_weighted_size: IntGauge,
    pub streams_open: IntGauge,
    pub stream_follows: IntGauge,
    pub stream_events: IntCounter,
    pub stream_event_lag: Histogram,
    pub streams_lagged: IntCounter,
    pub streams_closed: IntCounterVec,
    pub event_log_entries: IntGauge,
    pub event_log_bytes: IntGauge,
}

/// Registers each metric as it is created, so a metric can't be declared
/// and then forgotten.
struct Registrar(Registry);

impl Registrar {
    fn add<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        metric: Result<M, prometheus::Error>,
    ) -> Result<M, prometheus::Error> {
        let metric = metric?;
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.add(IntCounter::new(name, help))
    }

    fn counters(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }

    /// Counters by one label whose values are all known: each series is
    /// shown from the start at 0, so an alert or a dashboard on a reason
    /// that never happened yet has data (a series absent until its first
    /// increase reads as "no data", and `rate()` misses that first one).
    fn reasons(
        &self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        let counters = self.counters(name, help, &[label])?;
        for value in values {
            counters.with_label_values(&[value]);
        }
        Ok(counters)
    }

    fn watch_stalls(&self) -> Result<IntCounterVec, prometheus::Error> {
        self.reasons(
            "watch_stalls_total",
            "KV watches found behind the stream's leader: replay_incomplete (a replay \
             said it was complete before the bucket's last change), stood_still \
             (replaced for delivering nothing while the leader held a later change)",
            "kind",
            &["replay_incomplete", "stood_still"],
        )
    }

    fn streams_closed(&self) -> Result<IntCounterVec, prometheus::Error> {
        self.reasons(
            "streams_closed_total",
            "Change streams the node ended: send_timeout (client not reading), \
             token_expired, bucket_reset (the bucket was recreated)",
            "reason",
            &["send_timeout", "token_expired", "bucket_reset"],
        )
    }

    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.add(IntGauge::new(name, help))
    }

    fn latency(&self, name: &str, help: &str) -> HistogramOpts {
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
    }
}

impl CacheCounters {
    fn new(r: &Registrar) -> Result<Self, prometheus::Error> {
        Ok(CacheCounters {
            hits: r.counter(
                "cache_hits_total",
                "Cache lookups that found the user's complete entry",
            )?,
            misses: r.counter(
                "cache_misses_total",
                "Cache lookups that found no complete entry (the KV bucket is read, unless the cache holds every user)",
            )?,
            keys_added: r.counter("cache_keys_added_total", "Keys inserted into the cache")?,
            keys_evicted: r.counter(
                "cache_keys_evicted_total",
                "Keys evicted to stay within CACHE_MAX_COST",
            )?,
            cost_added: r.counter("cache_cost_added_total", "Estimated bytes inserted")?,
            cost_evicted: r.counter("cache_cost_evicted_total", "Estimated bytes evicted")?,
        })
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registrar(Registry::new_custom(Some("presence".into()), None)?);
        Ok(Metrics {
            http_requests: r.counters(
                "http_requests_total",
                "HTTP requests by route, method and status",
                &["route", "method", "status"],
            )?,
            http_duration: r.add(HistogramVec::new(
                r.latency(
                    "http_request_duration_seconds",
                    "HTTP request latency by route and status",
                ),
                &["route", "status"],
            ))?,
            http_connections_open: r.gauge("http_connections_open", "HTTP connections open now")?,
            http_connections_refused: r.counter(
                "http_connections_refused_total",
                "Connections answered 503 and closed because HTTP_MAX_CONNECTIONS were open",
            )?,
            http_connections_timed_out: r.reasons(
                "http_connections_timed_out_total",
                "Connections closed by a timeout: header (request head too slow), \
                 body (request body too slow), keepalive (idle between requests), \
                 send (client not reading)",
                "reason",
                &["header", "body", "keepalive", "send"],
            )?,
            kv_duration: r.add(HistogramVec::new(
                r.latency(
                    "kv_operation_duration_seconds",
                    "NATS KV operation latency by operation and outcome",
                ),
                &["op", "outcome"],
            ))?,
            watch_lag: r.add(Histogram::with_opts(r.latency(
                "watch_lag_seconds",
                "Time from a KV write at the hub to its application to this node's cache",
            )))?,
            watch_applied_revision: r.gauge(
                "watch_applied_revision",
                "Last KV revision applied to the cache by the watch",
            )?,
            watch_active: r.gauge(
                "watch_active",
                "1 while the KV watch is running, 0 while it is being re-established",
            )?,
            watch_restarts: r.counter(
                "watch_restarts_total",
                "Times the KV watch was re-established after an error",
            )?,
            watch_stalls: r.watch_stalls()?,
            watch_crashes: r.counter(
                "watch_crashes_total",
                "Times the KV watch task panicked and was restarted",
            )?,
            watch_echoes_undecoded: r.counter(
                "watch_echoes_undecoded_total",
                "Echoes of this node's own writes the KV watch passed over without decoding (the cache held them and no stream followed their user)",
            )?,
            kv_values_skipped: r.counter(
                "kv_values_skipped_total",
                "Bucket values skipped because they can't be decoded or are out of range",
            )?,
            write_conflicts: r.counter(
                "write_conflicts_total",
                "Writes the bucket refused because another write changed the key first (each is retried)",
            )?,
            cache: CacheCounters::new(&r)?,
            cache_entries: r.gauge("cache_entries", "Entries in the cache")?,
            cache_weighted_size: r.gauge(
                "cache_weighted_size_bytes",
                "Estimated bytes held by the cache",
            )?,
            streams_open: r.gauge("streams_open", "Change streams (SSE) open now")?,
            stream_follows: r.gauge(
                "stream_follows",
                "Users followed by the open change streams together (STREAM_MAX_FOLLOWS caps it)",
            )?,
            stream_events: r.counter(
                "stream_events_total",
                "Presence events sent on change streams",
            )?,
            stream_event_lag: r.add(Histogram::with_opts(r.latency(
                "stream_event_lag_seconds",
                "Time from a KV write at the hub to its event being handed to a change \
                 stream's connection (live changes only, one per stream)",
            )))?,
            streams_lagged: r.counter(
                "streams_lagged_total",
                "Change streams ended because they fell behind the change feed",
            )?,
            streams_closed: r.streams_closed()?,
            event_log_entries: r.gauge("event_log_entries", "Events in the node's event log")?,
            event_log_bytes: r.gauge(
                "event_log_bytes",
                "Estimated bytes of the node's event log (STREAM_EVENT_LOG_MAX_BYTES bounds it)",
            )?,
            registry: r.0,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason's series is there from the start, at 0.
    #[test]
    fn known_reasons_are_shown_before_they_happen() {
        let text = Metrics::new().expect("metrics").render().expect("text");
        for series in [
            r#"presence_http_connections_timed_out_total{reason="header"} 0"#,
            r#"presence_http_connections_timed_out_total{reason="body"} 0"#,
            r#"presence_http_connections_timed_out_total{reason="keepalive"} 0"#,
            r#"presence_http_connections_timed_out_total{reason="send"} 0"#,
            r#"presence_watch_stalls_total{kind="replay_incomplete"} 0"#,
            r#"presence_watch_stalls_total{kind="stood_still"} 0"#,
            r#"presence_streams_closed_total{reason="send_timeout"} 0"#,
            r#"presence_streams_closed_total{reason="token_expired"} 0"#,
            r#"presence_streams_closed_total{reason="bucket_reset"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing");
        }
    }
}

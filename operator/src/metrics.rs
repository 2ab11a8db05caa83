//! Operator metrics, exported on `/metrics`: how reconciling goes, and what
//! each PresenceCluster's status says, so alerts need no API access.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Counters and timings of reconciles, and each object's readiness.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounter,
    pub errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub leader: IntGauge,
    /// 1 while a PresenceCluster is Ready, by `name` and `namespace`.
    pub cluster_ready: IntGaugeVec,
    /// Regions serving and linked, by `name` and `namespace`.
    pub regions_ready: IntGaugeVec,
    /// Regions in the spec, by `name` and `namespace`.
    pub regions: IntGaugeVec,
    /// 1 while a leaf region's NATS servers are all linked to the hub, by
    /// `name`, `namespace` and `region` (absent while unknown).
    pub leafnode_connected: IntGaugeVec,
    /// When the NATS servers' certificate expires (Unix seconds), by
    /// `name` and `namespace`.
    pub certificate_expiry: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("presence_operator".into()), None)?;
        let add = |c: Box<dyn prometheus::core::Collector>| registry.register(c);
        let reconciles = IntCounter::new("reconciles_total", "Reconciles started")?;
        let errors = IntCounterVec::new(
            Opts::new("reconcile_errors_total", "Failed reconciles by reason"),
            &["reason"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "Time spent in one reconcile")
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        let leader = IntGauge::new("leader", "1 while this replica holds the leader Lease")?;
        let object = &["name", "namespace"];
        let cluster_ready = IntGaugeVec::new(
            Opts::new("cluster_ready", "1 while the PresenceCluster is Ready"),
            object,
        )?;
        let regions_ready = IntGaugeVec::new(
            Opts::new(
                "cluster_regions_ready",
                "Regions of the PresenceCluster serving and linked",
            ),
            object,
        )?;
        let regions = IntGaugeVec::new(
            Opts::new("cluster_regions", "Regions of the PresenceCluster"),
            object,
        )?;
        let leafnode_connected = IntGaugeVec::new(
            Opts::new(
                "leafnode_connected",
                "1 while every NATS server of a leaf region is linked to the hub",
            ),
            &["name", "namespace", "region"],
        )?;
        add(Box::new(reconciles.clone()))?;
        add(Box::new(errors.clone()))?;
        add(Box::new(reconcile_duration.clone()))?;
        add(Box::new(leader.clone()))?;
        add(Box::new(cluster_ready.clone()))?;
        add(Box::new(regions_ready.clone()))?;
        add(Box::new(regions.clone()))?;
        add(Box::new(leafnode_connected.clone()))?;
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "certificate_expiry_timestamp_seconds",
                "When the NATS servers' certificate expires (Unix time)",
            ),
            object,
        )?;
        add(Box::new(certificate_expiry.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            reconcile_duration,
            leader,
            cluster_ready,
            regions_ready,
            regions,
            leafnode_connected,
            certificate_expiry,
        })
    }

    /// Starts every error reason at 0, so `increase()` over it has data (and
    /// an alert on it can tell "no errors" from "no operator").
    pub fn init_error_reasons<'a>(&self, reasons: impl IntoIterator<Item = &'a str>) {
        for reason in reasons {
            self.errors.with_label_values(&[reason]);
        }
    }

    /// Publishes what a reconcile found out about one PresenceCluster;
    /// `leaves` are (region, linked) with `None` while unknown, and
    /// `previous_leaves` the regions published last time (their series go
    /// when a leaf is removed or its link becomes unknown).
    pub fn publish_cluster(
        &self,
        object: [&str; 2],
        ready: bool,
        regions: (usize, usize),
        leaves: &[(String, Option<bool>)],
        previous_leaves: &[String],
    ) {
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.cluster_ready
            .with_label_values(&object)
            .set(i64::from(ready));
        self.regions_ready
            .with_label_values(&object)
            .set(count(regions.0));
        self.regions
            .with_label_values(&object)
            .set(count(regions.1));
        for region in previous_leaves {
            let _ = self
                .leafnode_connected
                .remove_label_values(&[object[0], object[1], region]);
        }
        for (region, linked) in leaves {
            if let Some(linked) = linked {
                self.leafnode_connected
                    .with_label_values(&[object[0], object[1], region])
                    .set(i64::from(*linked));
            }
        }
    }

    /// Forgets a deleted PresenceCluster's series.
    pub fn forget_cluster(&self, object: [&str; 2], leaves: &[String]) {
        for gauge in [
            &self.cluster_ready,
            &self.regions_ready,
            &self.regions,
            &self.certificate_expiry,
        ] {
            let _ = gauge.remove_label_values(&object);
        }
        for region in leaves {
            let _ = self
                .leafnode_connected
                .remove_label_values(&[object[0], object[1], region]);
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

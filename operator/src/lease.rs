//! Leader election with a coordination.k8s.io Lease, so two operator
//! replicas never reconcile at once. The holder renews the Lease; another
//! replica takes over only after it expired. Updates carry the observed
//! `resourceVersion`, so two candidates can't both win a race.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

/// How long a Lease is valid without renewal.
pub const LEASE_DURATION: std::time::Duration = std::time::Duration::from_secs(15);
/// How often the holder renews.
pub const RENEW_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// One candidate for leadership.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl LeaderElector {
    /// Competes for Lease `name` through `api` as `identity` (the pod name).
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> Self {
        LeaderElector {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
        }
    }

    fn spec(&self, acquire: Timestamp, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: i32::try_from(LEASE_DURATION.as_secs()).ok(),
            acquire_time: Some(MicroTime(acquire)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: acquire, renew or observe. `Ok(true)` while we lead.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let duration =
            SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
        let expired = spec
            .renew_time
            .as_ref()
            .and_then(|t| t.0.checked_add(duration).ok())
            .is_none_or(|expiry| expiry < now);
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if holder == self.identity {
            let acquired = spec.acquire_time.map_or(now, |t| t.0);
            self.spec(acquired, now, transitions)
        } else if expired || holder.is_empty() {
            self.spec(now, now, transitions + 1)
        } else {
            return Ok(false);
        };
        let mut updated = current;
        updated.spec = Some(new_spec);
        // `replace` sends our resourceVersion: a concurrent winner makes this a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::FakeApi;
    use serde_json::json;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/leader";

    fn elector(fake: &FakeApi, identity: &str) -> LeaderElector {
        LeaderElector::new(Api::namespaced(fake.client(), "ops"), "leader", identity)
    }

    fn holder(fake: &FakeApi) -> String {
        fake.get(PATH).unwrap()["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    #[tokio::test]
    async fn one_leader_at_a_time_and_takeover_only_after_expiry() {
        let fake = FakeApi::default();
        let a = elector(&fake, "pod-a");
        let b = elector(&fake, "pod-b");
        assert!(
            a.try_acquire_or_renew().await.unwrap(),
            "first candidate creates the Lease"
        );
        assert!(
            !b.try_acquire_or_renew().await.unwrap(),
            "a fresh Lease is respected"
        );
        assert!(a.try_acquire_or_renew().await.unwrap(), "the holder renews");
        assert_eq!(holder(&fake), "pod-a");

        // pod-a stopped renewing long ago: pod-b takes over.
        let mut lease = fake.get(PATH).unwrap();
        lease["spec"]["renewTime"] =
            json!((Timestamp::now() - SignedDuration::from_secs(60)).to_string());
        fake.insert(PATH, lease);
        assert!(b.try_acquire_or_renew().await.unwrap());
        assert_eq!(holder(&fake), "pod-b");
        assert_eq!(fake.get(PATH).unwrap()["spec"]["leaseTransitions"], 1);
        assert!(
            !a.try_acquire_or_renew().await.unwrap(),
            "the old leader learns it lost"
        );
    }

    #[tokio::test]
    async fn updates_carry_the_observed_resource_version() {
        // The API server refuses a replace whose resourceVersion is stale, so
        // of two candidates racing for an expired Lease only one wins.
        let fake = FakeApi::default();
        let a = elector(&fake, "pod-a");
        assert!(a.try_acquire_or_renew().await.unwrap());
        let observed = fake.get(PATH).unwrap()["metadata"]["resourceVersion"].clone();
        fake.clear_requests();
        assert!(a.try_acquire_or_renew().await.unwrap());
        let put = fake
            .requests()
            .into_iter()
            .find(|r| r.method == "PUT")
            .expect("renewal is a replace");
        assert_eq!(put.body["metadata"]["resourceVersion"], observed);
    }
}

//! Heartbeat sessions: one lease per device, kept alive by its client and
//! expired by the KV bucket itself (per-key TTL) when the client goes quiet,
//! so a crashed client stops looking online without any sweeper process.

pub use crate::model::{
    MAX_DEVICE_CHARS, MAX_SESSION_ID_BYTES, MAX_SESSION_TTL_SECS, MIN_SESSION_TTL_SECS,
};
use crate::model::{Status, ValidationError, check_node_id, truncate_to_millis, validate_user_id};
use crate::node_id::NodeId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Lease used when a heartbeat names none.
pub const DEFAULT_SESSION_TTL_SECS: i64 = 30;
/// Most live sessions one user may hold; more is a leak or abuse.
pub const MAX_SESSIONS_PER_USER: usize = 32;
/// Longest lease a stored session may name. Wider than what heartbeats may
/// ask for, so values written under other limits (an older or newer node)
/// still count; anything beyond is not a lease this service wrote.
pub const MAX_STORED_TTL_SECS: i64 = 24 * 3600;
/// The last year RFC 3339 can write: every time we store or show must be in it.
const LAST_YEAR: i32 = 9999;

/// One live session as stored under `<user>.s.<session>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    #[serde(default)]
    pub device: String,
    pub status: Status,
    /// Time of the last heartbeat.
    #[serde(rename = "lastSeen", with = "crate::rfc3339")]
    pub last_seen: OffsetDateTime,
    #[serde(rename = "ttlSeconds")]
    pub ttl_seconds: i64,
    #[serde(rename = "nodeID", default)]
    pub node_id: NodeId,
}

impl Session {
    /// When the lease ends unless refreshed. A session read from the
    /// bucket passed [`Session::check`], so the sum is representable; for
    /// any other, it saturates instead of overflowing.
    pub fn expires_at(&self) -> OffsetDateTime {
        self.last_seen
            .saturating_add(time::Duration::seconds(self.ttl_seconds))
    }

    /// Whether a stored session is one this service can use: a lease of 1
    /// second to [`MAX_STORED_TTL_SECS`] that ends in a year RFC 3339 can
    /// write, and labels within the API's limits. Anything else (another
    /// writer's value) is skipped, not trusted.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=MAX_STORED_TTL_SECS).contains(&self.ttl_seconds) {
            return Err(format!(
                "ttlSeconds {} is not between 1 and {MAX_STORED_TTL_SECS}",
                self.ttl_seconds
            ));
        }
        let ends = self
            .last_seen
            .checked_add(time::Duration::seconds(self.ttl_seconds));
        if ends.is_none_or(|t| t.year() > LAST_YEAR) {
            return Err("the lease ends after the year 9999".into());
        }
        if self.device.chars().count() > MAX_DEVICE_CHARS {
            return Err(format!("device is over {MAX_DEVICE_CHARS} characters"));
        }
        check_node_id(&self.node_id)
    }

    /// Whether the lease is still running at `now`. The bucket deletes the
    /// key at about this time; reads don't wait for that.
    pub fn is_live_at(&self, now: OffsetDateTime) -> bool {
        self.expires_at() > now
    }
}

/// The durable last sign of life, `<user>.seen`: it outlives every session
/// so `lastSeen` stays right after all of them expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    #[serde(rename = "lastSeen", with = "crate::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// The node that took that sign of life.
    #[serde(rename = "nodeID", default)]
    pub node_id: NodeId,
}

impl Seen {
    /// Whether a stored `seen` is one this service can use.
    pub fn check(&self) -> Result<(), String> {
        check_node_id(&self.node_id)
    }
}

/// Body of `PUT /api/v2/presence/{userID}/sessions/{sessionID}`. Fields
/// are optional so missing or bad values get our own error codes, and
/// `ttlSeconds` takes any JSON value (`invalid_ttl` for one that isn't a
/// whole number); a `status` or `device` of the wrong JSON type is
/// `invalid_json`.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
pub struct HeartbeatRequest {
    /// The session's status: `online` (the default) or `away`.
    #[serde(default)]
    #[schemars(with = "Option<String>", extend("enum" = ["online", "away"]))]
    pub status: Option<String>,
    /// What the session runs on, at most 128 characters.
    #[serde(default)]
    #[schemars(length(max = 128))]
    pub device: Option<String>,
    /// Lease length, 5 to 300 seconds (default 30).
    #[serde(rename = "ttlSeconds", default)]
    #[schemars(with = "Option<i64>", range(min = 5, max = 300))]
    pub ttl_seconds: Option<serde_json::Value>,
}

/// A heartbeat that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidHeartbeat {
    pub user_id: String,
    pub session_id: String,
    pub status: Status,
    pub device: String,
    pub ttl_seconds: i64,
}

impl ValidHeartbeat {
    /// The stored session, stamped by `node_id` at `now`.
    pub fn session(&self, node_id: impl Into<NodeId>, now: OffsetDateTime) -> Session {
        Session {
            device: self.device.clone(),
            status: self.status,
            last_seen: truncate_to_millis(now),
            ttl_seconds: self.ttl_seconds,
            node_id: node_id.into(),
        }
    }

    /// The KV TTL of the session key.
    pub fn ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ttl_seconds.unsigned_abs())
    }
}

/// Checks a session ID: same rules as a user ID, shorter.
pub fn validate_session_id(session_id: &str) -> Result<(), ValidationError> {
    if session_id.is_empty()
        || session_id.len() > MAX_SESSION_ID_BYTES
        || session_id.chars().any(char::is_control)
    {
        return Err(ValidationError::InvalidSessionId);
    }
    Ok(())
}

/// A client's JSON value as an error message quotes it: its JSON text, cut
/// to a few dozen characters (a value may be a megabyte long).
fn shown_value(value: &serde_json::Value) -> String {
    crate::model::shown(&value.to_string())
}

/// Validates a heartbeat for `user_id`'s session `session_id`.
pub fn validate_heartbeat(
    user_id: &str,
    session_id: &str,
    request: HeartbeatRequest,
) -> Result<ValidHeartbeat, ValidationError> {
    validate_user_id(user_id)?;
    validate_session_id(session_id)?;
    let status = match request.status.as_deref() {
        None | Some("online") => Status::Online,
        Some("away") => Status::Away,
        Some(other) => {
            return Err(ValidationError::InvalidSessionStatus(crate::model::shown(
                other,
            )));
        }
    };
    let device = request.device.unwrap_or_default();
    let chars = device.chars().count();
    if chars > MAX_DEVICE_CHARS {
        return Err(ValidationError::DeviceTooLong(chars));
    }
    let ttl_seconds = match request.ttl_seconds {
        None | Some(serde_json::Value::Null) => DEFAULT_SESSION_TTL_SECS,
        Some(value) => match value.as_i64() {
            Some(n) if (MIN_SESSION_TTL_SECS..=MAX_SESSION_TTL_SECS).contains(&n) => n,
            _ => return Err(ValidationError::InvalidTtl(shown_value(&value))),
        },
    };
    Ok(ValidHeartbeat {
        user_id: user_id.to_owned(),
        session_id: session_id.to_owned(),
        status,
        device,
        ttl_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(status: Option<&str>, ttl: Option<serde_json::Value>) -> HeartbeatRequest {
        HeartbeatRequest {
            status: status.map(str::to_owned),
            device: Some("phone".into()),
            ttl_seconds: ttl,
        }
    }

    #[test]
    fn heartbeat_rules() {
        let ok = validate_heartbeat("u", "s1", request(None, None)).unwrap();
        assert_eq!((ok.status, ok.ttl_seconds), (Status::Online, 30));
        let ok = validate_heartbeat("u", "s1", request(Some("away"), Some(300.into()))).unwrap();
        assert_eq!((ok.status, ok.ttl_seconds), (Status::Away, 300));
        let code = |r| validate_heartbeat("u", "s1", r).unwrap_err().code();
        assert_eq!(code(request(Some("busy"), None)), "invalid_status");
        assert_eq!(code(request(None, Some(4.into()))), "invalid_ttl");
        assert_eq!(code(request(None, Some(301.into()))), "invalid_ttl");
        assert_eq!(code(request(None, Some("10".into()))), "invalid_ttl");
        assert_eq!(code(request(None, Some(2.5.into()))), "invalid_ttl");
        // The message quotes what was sent, cut short when long.
        let message = |ttl: serde_json::Value| {
            validate_heartbeat("u", "s1", request(None, Some(ttl)))
                .unwrap_err()
                .to_string()
        };
        assert!(
            message("10".into()).ends_with(r#"got "10""#),
            "{}",
            message("10".into())
        );
        assert!(message(2.5.into()).ends_with("got 2.5"));
        assert!(message(u64::MAX.into()).ends_with("got 18446744073709551615"));
        assert!(message("x".repeat(10_000).into()).len() < 200);
        let long_device = HeartbeatRequest {
            device: Some("d".repeat(129)),
            ..HeartbeatRequest::default()
        };
        assert_eq!(code(long_device), "device_too_long");
        let err = validate_heartbeat("u", "", request(None, None)).unwrap_err();
        assert_eq!(err.code(), "invalid_session_id");
        let err = validate_heartbeat("u", &"s".repeat(129), request(None, None)).unwrap_err();
        assert_eq!(err.code(), "invalid_session_id");
    }

    #[test]
    fn lease_ends_ttl_after_the_last_heartbeat() {
        let hb = validate_heartbeat("u", "s", request(None, Some(10.into()))).unwrap();
        let now = OffsetDateTime::UNIX_EPOCH;
        let session = hb.session("n", now);
        assert!(session.is_live_at(now + time::Duration::seconds(9)));
        assert!(!session.is_live_at(now + time::Duration::seconds(10)));
        assert_eq!(hb.ttl(), std::time::Duration::from_secs(10));
    }

    #[test]
    fn stored_sessions_out_of_range_are_refused_and_never_overflow() {
        let mut session = validate_heartbeat("u", "s", request(None, None))
            .unwrap()
            .session("n", OffsetDateTime::UNIX_EPOCH);
        assert!(session.check().is_ok());
        session.ttl_seconds = i64::MAX;
        assert!(session.check().is_err());
        // Not used once refused, but never a panic either.
        assert!(session.is_live_at(OffsetDateTime::UNIX_EPOCH));
        session.ttl_seconds = 0;
        assert!(session.check().is_err());
        session.ttl_seconds = 300;
        session.last_seen = time::macros::datetime!(9999-12-31 23:59:59 UTC);
        assert!(session.check().is_err());
        session.last_seen = OffsetDateTime::UNIX_EPOCH;
        session.node_id = "n".repeat(crate::model::MAX_NODE_ID_BYTES + 1).into();
        assert!(session.check().is_err());
    }
}

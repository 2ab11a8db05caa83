//! The presence data model and its validation rules.
//!
//! Everything here is pure so the rules that clients depend on (what a valid
//! user ID is, how it is stored) are pinned by unit and property tests.

use crate::node_id::NodeId;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Longest user ID accepted, in bytes; matches DESIGN §2.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Longest session ID accepted, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 128;
/// Longest device label accepted, in characters.
pub const MAX_DEVICE_CHARS: usize = 128;
/// Shortest session lease: shorter ones would turn heartbeats into a write flood.
pub const MIN_SESSION_TTL_SECS: i64 = 5;
/// Longest session lease: longer ones would keep a dead client online too long.
pub const MAX_SESSION_TTL_SECS: i64 = 300;
/// Longest status message accepted, in characters (not bytes), so non-ASCII
/// users get the same allowance as ASCII ones.
pub const MAX_MESSAGE_CHARS: usize = 256;

/// The four presence states of the Go service; the wire form is lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Away,
    Busy,
    Offline,
}

impl Status {
    /// Every status, in the order the API documents them.
    pub const ALL: [Status; 4] = [Status::Online, Status::Away, Status::Busy, Status::Offline];

    /// The wire name, used in error messages and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Away => "away",
            Status::Busy => "busy",
            Status::Offline => "offline",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| ValidationError::InvalidStatus(shown(s)))
    }
}

/// One user's manual status, as a node keeps it: the stored value without
/// the user ID, which the cache's key and every caller have already. A
/// million cached users carry no second copy of their IDs, and the value
/// is one small allocation: its times are whole UTC milliseconds (8 bytes
/// each instead of `OffsetDateTime`'s 16), the precision every time this
/// service writes has (see [`Presence::to_stored_json`] for the stored
/// form, and the accessors for the times).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub status: Status,
    /// Empty for most users, which then costs no allocation.
    pub message: Box<str>,
    last_seen: UnixMillis,
    updated_at: UnixMillis,
    pub node_id: NodeId,
    /// When a manual status stops applying (it is stored with a matching
    /// KV TTL, so it also disappears from the bucket by itself);
    /// [`NO_EXPIRY`] when it never does.
    expires_at: UnixMillis,
}

/// A UTC instant in whole milliseconds since the Unix epoch.
type UnixMillis = i64;

/// An `expires_at` that never comes: far outside `OffsetDateTime`'s range,
/// so no real instant is ever mistaken for it (and `Option`'s tag costs no
/// 8 more bytes).
const NO_EXPIRY: UnixMillis = i64::MIN;

/// `t` as whole milliseconds, rounded down (as [`truncate_to_millis`]).
fn to_unix_millis(t: OffsetDateTime) -> UnixMillis {
    let millis = t.unix_timestamp_nanos().div_euclid(1_000_000);
    // OffsetDateTime's years ±9999 are about ±3.2e14 ms: always in range.
    UnixMillis::try_from(millis).unwrap_or(if millis < 0 { i64::MIN + 1 } else { i64::MAX })
}

/// The instant `millis` names. Another writer's time with an offset can
/// name an instant past `time`'s range once moved to UTC (say
/// `9999-12-31T23:30:00-01:00`): such a time is the range's end, so an
/// expiry that far off stays far off.
fn from_unix_millis(millis: UnixMillis) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).unwrap_or_else(|_| {
        if millis > 0 {
            time::PrimitiveDateTime::MAX.assume_utc()
        } else {
            time::PrimitiveDateTime::MIN.assume_utc()
        }
    })
}

/// The stored form of a [`Presence`]: the Go service's JSON, user ID
/// included. The KV revision is not part of it (the bucket assigns it).
#[derive(Serialize)]
struct StoredRef<'a> {
    #[serde(rename = "userID")]
    user_id: &'a str,
    status: Status,
    message: &'a str,
    #[serde(rename = "lastSeen", with = "crate::rfc3339")]
    last_seen: OffsetDateTime,
    #[serde(rename = "updatedAt", with = "crate::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(rename = "nodeID")]
    node_id: &'a str,
    #[serde(
        rename = "expiresAt",
        with = "crate::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    expires_at: Option<OffsetDateTime>,
}

/// [`StoredRef`] as read back; unknown fields (a `revision` some writers
/// store) are ignored. The user ID is only compared with the key's, so it
/// is borrowed from the value where it can be, and the times are read
/// straight into milliseconds: a warm-up decodes every value of the bucket.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(rename = "userID", borrow)]
    user_id: Cow<'a, str>,
    status: Status,
    #[serde(default)]
    message: String,
    #[serde(rename = "lastSeen", deserialize_with = "stored_millis")]
    last_seen: UnixMillis,
    #[serde(rename = "updatedAt", deserialize_with = "stored_millis")]
    updated_at: UnixMillis,
    #[serde(rename = "nodeID", default)]
    node_id: NodeId,
    #[serde(rename = "expiresAt", default, deserialize_with = "stored_expiry")]
    expires_at: Option<UnixMillis>,
}

/// A stored RFC 3339 time as milliseconds: this service's own UTC form
/// read directly, any other (another writer's offset or precision) by
/// `time`, rounded down to the millisecond either way.
fn stored_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<UnixMillis, D::Error> {
    deserializer.deserialize_str(MillisVisitor)
}

/// [`stored_millis`] for an optional time (`null` is none).
fn stored_expiry<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<UnixMillis>, D::Error> {
    deserializer.deserialize_option(OptionalMillis)
}

struct MillisVisitor;

struct OptionalMillis;

impl<'de> Visitor<'de> for MillisVisitor {
    type Value = UnixMillis;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an RFC 3339 time")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<UnixMillis, E> {
        if let Some(millis) = crate::rfc3339::read_utc_millis(text) {
            return Ok(millis);
        }
        OffsetDateTime::parse(text, &Rfc3339)
            .map(to_unix_millis)
            .map_err(E::custom)
    }
}

impl<'de> Visitor<'de> for OptionalMillis {
    type Value = Option<UnixMillis>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an RFC 3339 time or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        stored_millis(deserializer).map(Some)
    }
}

impl Presence {
    /// A new presence accepted by `node_id` at `now`; `lastSeen` is the time
    /// of this update because every update is a sign of life from the user.
    pub fn accepted(update: ValidUpdate, node_id: impl Into<NodeId>, now: OffsetDateTime) -> Self {
        let now = to_unix_millis(now);
        Presence {
            status: update.status,
            message: update.message.into_boxed_str(),
            last_seen: now,
            updated_at: now,
            node_id: node_id.into(),
            expires_at: update.expires_at.map_or(NO_EXPIRY, to_unix_millis),
        }
    }

    /// The time of the update, a sign of life from the user.
    pub fn last_seen(&self) -> OffsetDateTime {
        from_unix_millis(self.last_seen)
    }

    /// When the node that accepted it wrote it.
    pub fn updated_at(&self) -> OffsetDateTime {
        from_unix_millis(self.updated_at)
    }

    /// When this manual status stops applying, if it ever does.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        (self.expires_at != NO_EXPIRY).then(|| from_unix_millis(self.expires_at))
    }

    /// Whether this manual status still applies at `now`. Compared in
    /// whole milliseconds, without building a time: every view and every
    /// watched change asks this. (The expiry is whole milliseconds, so it
    /// is after `now` exactly when it is after `now` rounded down.)
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.expires_at == NO_EXPIRY || self.expires_at > to_unix_millis(now)
    }

    /// The bytes stored under `user_id`'s manual key.
    pub fn to_stored_json(&self, user_id: &str) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&StoredRef {
            user_id,
            status: self.status,
            message: &self.message,
            last_seen: self.last_seen(),
            updated_at: self.updated_at(),
            node_id: &self.node_id,
            expires_at: self.expires_at(),
        })
    }

    /// Reads the manual status stored under `user_id`'s key, if it is one
    /// this service can use: its own user and a message within the API's
    /// limit. Anything else (another writer's value) is refused, not
    /// trusted. Its times are kept as UTC milliseconds, like this
    /// service's own (another writer's finer times are rounded down).
    pub fn from_stored_json(user_id: &str, bytes: &[u8]) -> Result<Presence, String> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if stored.user_id != user_id {
            return Err(format!("value names user {:?}", stored.user_id));
        }
        let chars = stored.message.chars().count();
        if chars > MAX_MESSAGE_CHARS {
            return Err(format!("message is {chars} characters long"));
        }
        check_node_id(&stored.node_id)?;
        Ok(Presence {
            status: stored.status,
            message: stored.message.into_boxed_str(),
            last_seen: stored.last_seen,
            updated_at: stored.updated_at,
            node_id: stored.node_id,
            expires_at: stored.expires_at.unwrap_or(NO_EXPIRY),
        })
    }
}

/// Longest node ID a stored value may name (`NODE_ID`'s own limit).
pub const MAX_NODE_ID_BYTES: usize = 128;

/// A stored node ID within `NODE_ID`'s limit.
pub fn check_node_id(node_id: &str) -> Result<(), String> {
    if node_id.len() > MAX_NODE_ID_BYTES {
        return Err(format!("nodeID is over {MAX_NODE_ID_BYTES} bytes"));
    }
    Ok(())
}

/// Millisecond precision keeps timestamps readable and identical across
/// languages' RFC 3339 parsers.
pub fn truncate_to_millis(t: OffsetDateTime) -> OffsetDateTime {
    let millis = t.nanosecond() / 1_000_000;
    t.replace_nanosecond(millis * 1_000_000).unwrap_or(t)
}

/// Body of `POST /api/v2/presence/{userID}`. Fields are optional so a
/// missing or bad value gets our own error code; a value of the wrong JSON
/// type is `invalid_json`. The schema says what is accepted.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
pub struct SetPresenceRequest {
    /// The manual status (required; missing is `invalid_status`).
    #[schemars(with = "Status")]
    pub status: Option<String>,
    /// A status message, at most 256 characters (default empty).
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub message: Option<String>,
    /// RFC 3339 time when this status ends by itself, 1 s to 30 days ahead.
    #[serde(rename = "expiresAt", default)]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub expires_at: Option<String>,
}

// The fields of a `SetPresenceRequest` are spelled out rather than
// flattened into this item: a flattened struct makes serde buffer every
// item's fields before reading them. (The doc comment below is the
// OpenAPI description.)
/// One item of `POST /api/v2/presence/batch`.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(expecting = "a presence object")]
pub struct BatchItem {
    /// Whose presence this item sets.
    #[serde(rename = "userID")]
    #[schemars(with = "String", length(min = 1, max = 256))]
    pub user_id: Option<String>,
    /// The manual status (required; missing is `invalid_status`).
    #[schemars(with = "Status")]
    pub status: Option<String>,
    /// A status message, at most 256 characters (default empty).
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub message: Option<String>,
    /// RFC 3339 time when this status ends by itself, 1 s to 30 days ahead.
    #[serde(rename = "expiresAt", default)]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub expires_at: Option<String>,
}

impl BatchItem {
    /// The item's update, as `POST /api/v2/presence/{userID}` takes it.
    pub fn request(&self) -> SetPresenceRequest {
        SetPresenceRequest {
            status: self.status.clone(),
            message: self.message.clone(),
            expires_at: self.expires_at.clone(),
        }
    }
}

/// Most items one batch set may carry.
pub const MAX_BATCH: usize = 1000;

/// Body of `POST /api/v2/presence/batch`. Each item is kept as its JSON
/// text and read on its own, so one malformed item fails alone instead of
/// the whole batch.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct BatchRequest {
    /// At most 1000 items; the last valid item for a user wins.
    #[schemars(length(max = 1000), with = "Vec<BatchItem>")]
    pub presences: BatchItems,
}

/// A batch's items as JSON texts: the first [`MAX_BATCH`] are kept, the
/// rest only counted, so a body of tiny items (`[0,0,0,...]`) can't make
/// a request hold hundreds of thousands of them.
#[derive(Debug, Default)]
pub struct BatchItems {
    pub kept: Vec<Box<serde_json::value::RawValue>>,
    /// How many items the batch has, kept or not.
    pub count: usize,
}

impl<'de> Deserialize<'de> for BatchItems {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items;
        impl<'de> serde::de::Visitor<'de> for Items {
            type Value = BatchItems;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of presences")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<BatchItems, A::Error> {
                let mut items = BatchItems::default();
                while items.kept.len() < MAX_BATCH {
                    match seq.next_element::<Box<serde_json::value::RawValue>>()? {
                        Some(item) => items.kept.push(item),
                        None => break,
                    }
                }
                items.count = items.kept.len();
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    items.count += 1;
                }
                Ok(items)
            }
        }
        deserializer.deserialize_seq(Items)
    }
}

/// An update that passed validation, ready to be stamped and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidUpdate {
    pub user_id: String,
    pub status: Status,
    pub message: String,
    pub expires_at: Option<OffsetDateTime>,
}

/// Shortest and longest lifetime of a manual status with `expiresAt`.
pub const MIN_MANUAL_TTL: std::time::Duration = std::time::Duration::from_secs(1);
/// See [`MIN_MANUAL_TTL`]; 30 days covers "busy until after the holidays".
pub const MAX_MANUAL_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

impl ValidUpdate {
    /// The KV TTL that makes the stored status vanish at `expiresAt`
    /// (rounded up to whole seconds, the unit of `Nats-TTL`).
    pub fn ttl(&self, now: OffsetDateTime) -> Option<std::time::Duration> {
        self.expires_at.map(|at| {
            let seconds = (at - now).as_seconds_f64().ceil().max(1.0);
            // Validation keeps `at` within 30 days; the fallback keeps a
            // hand-built update from panicking.
            std::time::Duration::try_from_secs_f64(seconds).unwrap_or(MAX_MANUAL_TTL)
        })
    }
}

/// Why client input was refused; each variant has a stable API code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("userID must not be empty")]
    EmptyUserId,
    #[error("userID is {0} bytes long; the limit is {MAX_USER_ID_BYTES} bytes")]
    UserIdTooLong(usize),
    #[error("userID must not contain control characters")]
    UserIdControlChar,
    #[error("status is required; use one of online, away, busy, offline")]
    MissingStatus,
    #[error("status {0:?} is not valid; use one of online, away, busy, offline")]
    InvalidStatus(String),
    #[error("message is {0} characters long; the limit is {MAX_MESSAGE_CHARS}")]
    MessageTooLong(usize),
    #[error("expiresAt {0:?} is not an RFC 3339 time")]
    ExpiresAtUnreadable(String),
    #[error("expiresAt must be between 1 second and 30 days from now; got {0}")]
    ExpiresAtOutOfRange(String),
    #[error("sessionID must be 1 to {max} bytes without control characters", max = MAX_SESSION_ID_BYTES)]
    InvalidSessionId,
    #[error("a session's status is online or away; got {0:?}")]
    InvalidSessionStatus(String),
    #[error("ttlSeconds must be a whole number of seconds between {min} and {max}; got {0}", min = MIN_SESSION_TTL_SECS, max = MAX_SESSION_TTL_SECS)]
    InvalidTtl(String),
    #[error("device is {0} characters long; the limit is {max}", max = MAX_DEVICE_CHARS)]
    DeviceTooLong(usize),
}

impl ValidationError {
    /// The stable machine-readable code clients branch on.
    pub fn code(&self) -> &'static str {
        match self {
            ValidationError::EmptyUserId
            | ValidationError::UserIdTooLong(_)
            | ValidationError::UserIdControlChar => "invalid_user_id",
            ValidationError::MissingStatus | ValidationError::InvalidStatus(_) => "invalid_status",
            ValidationError::MessageTooLong(_) => "message_too_long",
            ValidationError::ExpiresAtUnreadable(_) | ValidationError::ExpiresAtOutOfRange(_) => {
                "invalid_expires_at"
            }
            ValidationError::InvalidSessionId => "invalid_session_id",
            ValidationError::InvalidSessionStatus(_) => "invalid_status",
            ValidationError::InvalidTtl(_) => "invalid_ttl",
            ValidationError::DeviceTooLong(_) => "device_too_long",
        }
    }
}

/// Checks a user ID against DESIGN §2: any UTF-8 (it is already a `str`),
/// non-empty, at most 256 bytes, no control characters.
pub fn validate_user_id(user_id: &str) -> Result<(), ValidationError> {
    if user_id.is_empty() {
        return Err(ValidationError::EmptyUserId);
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(ValidationError::UserIdTooLong(user_id.len()));
    }
    if user_id.chars().any(char::is_control) {
        return Err(ValidationError::UserIdControlChar);
    }
    Ok(())
}

/// Validates a set request for `user_id` received at `now`, producing the
/// update to store.
pub fn validate_update(
    user_id: &str,
    request: SetPresenceRequest,
    now: OffsetDateTime,
) -> Result<ValidUpdate, ValidationError> {
    validate_user_id(user_id)?;
    let status = match request.status {
        None => return Err(ValidationError::MissingStatus),
        Some(raw) => raw.parse::<Status>()?,
    };
    let message = request.message.unwrap_or_default();
    let chars = message.chars().count();
    if chars > MAX_MESSAGE_CHARS {
        return Err(ValidationError::MessageTooLong(chars));
    }
    let expires_at = match request.expires_at {
        None => None,
        Some(raw) => Some(parse_expiry(&raw, now)?),
    };
    Ok(ValidUpdate {
        user_id: user_id.to_owned(),
        status,
        message,
        expires_at,
    })
}

/// A refused value as an error message shows it: its first 40
/// characters, so a megabyte of bad input isn't sent back (escaped, several
/// times larger) in the answer.
pub fn shown(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

fn parse_expiry(raw: &str, now: OffsetDateTime) -> Result<OffsetDateTime, ValidationError> {
    let at = OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
        .map_err(|_| ValidationError::ExpiresAtUnreadable(shown(raw)))?;
    let ahead = at - now;
    if ahead < MIN_MANUAL_TTL || ahead > MAX_MANUAL_TTL {
        return Err(ValidationError::ExpiresAtOutOfRange(shown(raw)));
    }
    Ok(truncate_to_millis(at.to_offset(time::UtcOffset::UTC)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A refused value is shown in its error by its first 40 characters:
    /// a megabyte of bad input is not sent back in the answer.
    #[test]
    fn errors_show_at_most_the_start_of_a_refused_value() {
        let huge = "\u{1}".repeat(1 << 20);
        let now = OffsetDateTime::now_utc();
        let errors = [
            huge.parse::<Status>().expect_err("not a status"),
            parse_expiry(&huge, now).expect_err("not a time"),
        ];
        for err in errors {
            let text = err.to_string();
            assert!(text.len() < 400, "{} bytes", text.len());
            assert!(text.contains("..."), "{text}");
        }
        assert_eq!(shown("busy-ish"), "busy-ish");
        assert_eq!(shown(&"é".repeat(41)), format!("{}...", "é".repeat(40)));
    }

    /// A batch keeps at most MAX_BATCH items however many it carries, and
    /// still knows how many that was (for `batch_too_large`).
    #[test]
    fn a_batch_keeps_at_most_its_limit_of_items() {
        let tiny = format!(r#"{{"presences":[{}]}}"#, vec!["0"; 5000].join(","));
        let batch: BatchRequest = serde_json::from_str(&tiny).expect("a batch");
        assert_eq!(
            (batch.presences.kept.len(), batch.presences.count),
            (MAX_BATCH, 5000)
        );
        let small: BatchRequest =
            serde_json::from_str(r#"{"presences":[{"userID":"a"}, 7]}"#).expect("a batch");
        assert_eq!(small.presences.count, 2);
        assert_eq!(small.presences.kept[1].get(), "7");
        let refused = serde_json::from_str::<BatchRequest>(r#"{"presences":{}}"#);
        assert!(refused.is_err_and(|e| e.to_string().contains("an array of presences")));
    }

    #[test]
    fn a_cached_manual_status_stays_one_small_allocation() {
        // Boxed in the cached record: at most the allocator's 64-byte
        // class (56 bytes now; record.rs holds that), where OffsetDateTime
        // times took the 112-byte one.
        assert!(std::mem::size_of::<Presence>() <= 64);
    }

    #[test]
    fn another_writers_times_read_as_utc_milliseconds() {
        let stored = br#"{"userID":"u","status":"busy","message":"","lastSeen":"2026-01-15T12:30:00.123456789+02:00","updatedAt":"2026-01-15T10:30:00.5Z","nodeID":"go","expiresAt":"2026-01-15T11:00:00.9999Z"}"#;
        let presence = Presence::from_stored_json("u", stored).expect("a usable value");
        let json = String::from_utf8(presence.to_stored_json("u").expect("serializes")).unwrap();
        assert!(
            json.contains(r#""lastSeen":"2026-01-15T10:30:00.123Z""#),
            "{json}"
        );
        assert!(
            json.contains(r#""updatedAt":"2026-01-15T10:30:00.5Z""#),
            "{json}"
        );
        assert!(
            json.contains(r#""expiresAt":"2026-01-15T11:00:00.999Z""#),
            "{json}"
        );
        let without = br#"{"userID":"u","status":"busy","lastSeen":"2026-01-15T10:30:00Z","updatedAt":"2026-01-15T10:30:00Z"}"#;
        let presence = Presence::from_stored_json("u", without).expect("a usable value");
        assert_eq!(presence.expires_at(), None);
        assert!(presence.is_valid_at(OffsetDateTime::now_utc()));
    }

    #[test]
    fn stored_values_read_the_same_however_their_json_is_spelled() {
        let plain = br#"{"userID":"u-1","status":"busy","lastSeen":"2026-01-15T10:30:00.123Z","updatedAt":"2026-01-15T10:30:00Z","expiresAt":"2026-01-15T11:00:00Z"}"#;
        // Escapes in the ID and a time (no borrowed text), `null` for no
        // expiry, another offset (read by `time`).
        let escaped = br#"{"userID":"u\u002d1","status":"busy","lastSeen":"2026-01-15T10:30:00.123\u005a","updatedAt":"2026-01-15T11:30:00+01:00","expiresAt":null}"#;
        let absent = br#"{"userID":"u-1","status":"busy","lastSeen":"2026-01-15T10:30:00.123Z","updatedAt":"2026-01-15T10:30:00Z"}"#;
        let plain = Presence::from_stored_json("u-1", plain).expect("usable");
        let escaped = Presence::from_stored_json("u-1", escaped).expect("usable");
        let absent = Presence::from_stored_json("u-1", absent).expect("usable");
        assert_eq!(escaped.last_seen, plain.last_seen);
        assert_eq!(escaped.updated_at, plain.updated_at);
        assert_eq!(escaped.expires_at(), None);
        assert_eq!(absent.expires_at(), None);
        assert!(plain.expires_at().is_some());
        assert!(Presence::from_stored_json("u-2", br#"{"userID":"u\u002d1","status":"busy","lastSeen":"2026-01-15T10:30:00Z","updatedAt":"2026-01-15T10:30:00Z"}"#).is_err());
        let bad_time = br#"{"userID":"u-1","status":"busy","lastSeen":"2026-02-30T10:30:00Z","updatedAt":"2026-01-15T10:30:00Z"}"#;
        assert!(Presence::from_stored_json("u-1", bad_time).is_err());
    }

    #[test]
    fn a_time_past_the_range_in_utc_stays_at_its_end() {
        let stored = br#"{"userID":"u","status":"busy","lastSeen":"2026-01-15T10:30:00Z","updatedAt":"2026-01-15T10:30:00Z","expiresAt":"9999-12-31T23:30:00-01:00"}"#;
        let presence = Presence::from_stored_json("u", stored).expect("a usable value");
        let expires = presence.expires_at().expect("an expiry");
        assert_eq!(expires.year(), 9999);
        assert!(presence.is_valid_at(OffsetDateTime::now_utc()));
    }

    proptest! {
        #[test]
        fn validity_in_milliseconds_is_validity_in_time(
            expiry_ms in -1_000_000_i64..1_000_000,
            now_ns in -1_000_000_000_000_i128..1_000_000_000_000,
        ) {
            let at = |ns: i128| OffsetDateTime::from_unix_timestamp_nanos(ns).expect("in range");
            let update = ValidUpdate {
                user_id: "u".into(),
                status: Status::Busy,
                message: String::new(),
                expires_at: Some(at(i128::from(expiry_ms) * 1_000_000)),
            };
            let presence = Presence::accepted(update, "n", at(0));
            let now = at(now_ns);
            let by_time = presence.expires_at().is_none_or(|expiry| expiry > now);
            prop_assert_eq!(presence.is_valid_at(now), by_time);
        }

        #[test]
        fn times_keep_every_millisecond(
            ms in -62_135_596_800_000_i64..253_402_300_799_999_i64,
            sub_ms in 0_i128..1_000_000,
        ) {
            let exact = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                .expect("within time's range");
            let finer = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000 + sub_ms)
                .expect("within time's range");
            prop_assert_eq!(from_unix_millis(to_unix_millis(finer)), exact);
            prop_assert_eq!(truncate_to_millis(finer), exact);
            prop_assert_ne!(to_unix_millis(finer), NO_EXPIRY);
        }
    }

    #[test]
    fn user_id_rules() {
        assert!(validate_user_id("ann@example.com").is_ok());
        assert!(validate_user_id("héllo wörld+1:2/3").is_ok());
        assert_eq!(validate_user_id(""), Err(ValidationError::EmptyUserId));
        assert_eq!(
            validate_user_id("a\nb"),
            Err(ValidationError::UserIdControlChar)
        );
        assert!(validate_user_id(&"x".repeat(256)).is_ok());
        assert_eq!(
            validate_user_id(&"x".repeat(257)),
            Err(ValidationError::UserIdTooLong(257))
        );
    }

    #[test]
    fn update_rules() {
        let req = |status: Option<&str>, message: Option<String>| SetPresenceRequest {
            status: status.map(str::to_owned),
            message,
            expires_at: None,
        };
        let now = OffsetDateTime::UNIX_EPOCH;
        let validate_update = |user: &str, request| validate_update(user, request, now);
        let ok = validate_update("u", req(Some("busy"), Some("focus".into()))).unwrap();
        assert_eq!(ok.status, Status::Busy);
        assert_eq!(
            validate_update("u", req(None, None)).unwrap_err().code(),
            "invalid_status"
        );
        assert_eq!(
            validate_update("u", req(Some("ONLINE"), None))
                .unwrap_err()
                .code(),
            "invalid_status"
        );
        assert!(validate_update("u", req(Some("away"), Some("é".repeat(256)))).is_ok());
        assert_eq!(
            validate_update("u", req(Some("away"), Some("é".repeat(257))))
                .unwrap_err()
                .code(),
            "message_too_long"
        );
    }

    #[test]
    fn stored_form_is_the_go_services_and_round_trips() {
        let update = ValidUpdate {
            user_id: "u@x".into(),
            status: Status::Online,
            message: "hi".into(),
            expires_at: None,
        };
        let presence = Presence::accepted(update, "node-1", OffsetDateTime::UNIX_EPOCH);
        let json = presence.to_stored_json("u@x").unwrap();
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"userID":"u@x","status":"online","message":"hi","lastSeen":"1970-01-01T00:00:00Z","updatedAt":"1970-01-01T00:00:00Z","nodeID":"node-1"}"#
        );
        assert_eq!(Presence::from_stored_json("u@x", &json).unwrap(), presence);
        let err = Presence::from_stored_json("someone-else", &json).unwrap_err();
        assert!(err.contains("u@x"), "{err}");
        // What other writers store besides (a revision) is ignored.
        let with_revision = br#"{"userID":"u@x","status":"away","lastSeen":"1970-01-01T00:00:00Z","updatedAt":"1970-01-01T00:00:00Z","revision":9}"#;
        let read = Presence::from_stored_json("u@x", with_revision).unwrap();
        assert_eq!(
            (read.status, &*read.message, read.node_id.as_str()),
            (Status::Away, "", "")
        );
    }

    #[test]
    fn expiry_rules() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let with_expiry = |raw: &str| SetPresenceRequest {
            status: Some("busy".into()),
            message: None,
            expires_at: Some(raw.into()),
        };
        let ok = validate_update("u", with_expiry("1970-01-01T01:00:00.5+01:00"), now);
        assert_eq!(ok.unwrap_err().code(), "invalid_expires_at");
        let ok = validate_update("u", with_expiry("1970-01-01T00:00:10.5Z"), now).unwrap();
        assert_eq!(ok.ttl(now), Some(std::time::Duration::from_secs(11)));
        let presence = Presence::accepted(ok, "n", now);
        assert!(presence.is_valid_at(now + time::Duration::seconds(10)));
        assert!(!presence.is_valid_at(now + time::Duration::milliseconds(10_500)));
        for bad in ["tomorrow", "1970-01-01T00:00:00Z", "1970-02-01T00:00:01Z"] {
            let err = validate_update("u", with_expiry(bad), now).unwrap_err();
            assert_eq!(err.code(), "invalid_expires_at", "{bad}");
        }
    }
}

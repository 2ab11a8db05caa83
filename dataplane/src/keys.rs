//! The layout of one user's keys in the bucket. An encoded user ID never
//! contains `.` (see `model::encode_key`), so a user's keys are exactly the
//! key `<user>` and the subjects under `<user>.>`:
//!
//! - `<user>`: the manual status set with `POST` (the Go service's record);
//! - `<user>.seen`: the last heartbeat time, durable;
//! - `<user>.s.<session>`: one heartbeat session each, with a TTL.

use crate::model::{KeyDecodeError, decode_key, encode_key};

/// Which of a user's keys a change concerns.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Part {
    Manual,
    Seen,
    Session(String),
}

/// The KV key of `part` of `user_id`.
pub fn key_of(user_id: &str, part: &Part) -> String {
    let user = encode_key(user_id);
    match part {
        Part::Manual => user,
        Part::Seen => format!("{user}.seen"),
        Part::Session(session_id) => format!("{user}.s.{}", encode_key(session_id)),
    }
}

/// The wildcard key matching every key of `user_id` except the manual one.
pub fn others_filter(user_id: &str) -> String {
    format!("{}.>", encode_key(user_id))
}

/// Inverts [`key_of`]; keys of any other shape are refused.
pub fn parse_key(key: &str) -> Result<(String, Part), KeyDecodeError> {
    let err = || KeyDecodeError(key.to_owned());
    let mut tokens = key.split('.');
    let user_id = tokens.next().filter(|t| !t.is_empty()).ok_or_else(err)?;
    let user_id = decode_key(user_id)?;
    let part = match (tokens.next(), tokens.next(), tokens.next()) {
        (None, _, _) => Part::Manual,
        (Some("seen"), None, _) => Part::Seen,
        (Some("s"), Some(session), None) if !session.is_empty() => {
            Part::Session(decode_key(session)?)
        }
        _ => return Err(err()),
    };
    Ok((user_id, part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout() {
        assert_eq!(key_of("a@b", &Part::Manual), "a=40b");
        assert_eq!(key_of("a", &Part::Seen), "a.seen");
        assert_eq!(key_of("a", &Part::Session("x.y".into())), "a.s.x=2Ey");
        assert_eq!(others_filter("a b"), "a=20b.>");
        for bad in [
            "a.", "a.s", "a.s.x.y", "a.other", "a..seen", ".seen", "a.seen.x",
        ] {
            assert!(parse_key(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn every_part_round_trips(user in "\\PC{1,40}", session in "\\PC{1,40}", which in 0..3u8) {
            let part = match which {
                0 => Part::Manual,
                1 => Part::Seen,
                _ => Part::Session(session),
            };
            let key = key_of(&user, &part);
            prop_assert_eq!(parse_key(&key).unwrap(), (user, part));
        }
    }
}

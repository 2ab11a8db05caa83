//! User IDs as KV keys, and the layout of one user's keys in the bucket.
//!
//! An encoded user ID never contains `.` (see [`encode_key`]), so a user's
//! keys are exactly the key `<user>` and the subjects under `<user>.>`:
//!
//! - `<user>`: the manual status set with `POST` (the Go service's record);
//! - `<user>.seen`: the last heartbeat time, durable;
//! - `<user>.s.<session>`: one heartbeat session each, with a TTL.

/// The escape byte of the key encoding; `=` is a legal KV key character that
/// never appears verbatim in an encoded key.
const ESCAPE: u8 = b'=';
const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn is_verbatim(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

/// Encodes a user ID as a NATS KV key.
///
/// KV keys allow only `[-/_=.A-Za-z0-9]`, and `.` separates subject tokens,
/// so letters, digits, `-` and `_` stay as they are and every other byte
/// becomes `=XX` (uppercase hex). The result is never empty for a valid user
/// ID, never contains `.`, and `decode_key` inverts it exactly.
pub fn encode_key(user_id: &str) -> String {
    let mut key = String::with_capacity(user_id.len());
    for &byte in user_id.as_bytes() {
        if is_verbatim(byte) {
            key.push(char::from(byte));
        } else {
            key.push(char::from(ESCAPE));
            key.push(char::from(HEX[usize::from(byte >> 4)]));
            key.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    key
}

/// A KV key that `encode_key` could not have produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV key {0:?} is not an encoded user ID")]
pub struct KeyDecodeError(pub String);

/// Inverts `encode_key`. Only canonical encodings are accepted, so two
/// different keys never decode to the same user ID.
pub fn decode_key(key: &str) -> Result<String, KeyDecodeError> {
    let err = || KeyDecodeError(key.to_owned());
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if is_verbatim(byte) {
            out.push(byte);
            i += 1;
        } else if byte == ESCAPE {
            let hi = bytes
                .get(i + 1)
                .and_then(|b| hex_value(*b))
                .ok_or_else(err)?;
            let lo = bytes
                .get(i + 2)
                .and_then(|b| hex_value(*b))
                .ok_or_else(err)?;
            let decoded = (hi << 4) | lo;
            if is_verbatim(decoded) {
                return Err(err());
            }
            out.push(decoded);
            i += 3;
        } else {
            return Err(err());
        }
    }
    String::from_utf8(out).map_err(|_| err())
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

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

    fn is_valid_nats_key(key: &str) -> bool {
        !key.is_empty()
            && !key.starts_with('.')
            && !key.ends_with('.')
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    #[test]
    fn plain_ids_are_stored_verbatim() {
        assert_eq!(encode_key("user123"), "user123");
        assert_eq!(encode_key("a-b_C"), "a-b_C");
    }

    #[test]
    fn special_characters_are_escaped() {
        assert_eq!(encode_key("a.b"), "a=2Eb");
        assert_eq!(encode_key("ann+x@example.com"), "ann=2Bx=40example=2Ecom");
        assert_eq!(encode_key("urn:x"), "urn=3Ax");
        assert_eq!(encode_key("é"), "=C3=A9");
        assert_eq!(encode_key("="), "=3D");
    }

    #[test]
    fn non_canonical_keys_are_rejected() {
        for key in ["=", "=4", "=zz", "=2e", "=41", "a.b", "a b", "=FF"] {
            assert!(decode_key(key).is_err(), "{key:?} must not decode");
        }
    }

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
        fn key_encoding_round_trips(user_id in "\\PC{1,64}") {
            let key = encode_key(&user_id);
            prop_assert!(is_valid_nats_key(&key), "{key:?} is not a valid KV key");
            prop_assert!(!key.contains('.'));
            prop_assert_eq!(decode_key(&key).unwrap(), user_id);
        }

        #[test]
        fn key_encoding_round_trips_any_string(user_id in any::<String>()) {
            prop_assert_eq!(decode_key(&encode_key(&user_id)).unwrap(), user_id);
        }

        #[test]
        fn decoding_accepts_only_canonical_keys(key in "[-_=A-Fa-z0-9.]{1,24}") {
            if let Ok(user_id) = decode_key(&key) {
                prop_assert_eq!(encode_key(&user_id), key);
            }
        }

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

//! RFC 3339 times as every stored value and answer writes them, made
//! without the `time` crate's general formatter.
//!
//! Every write stores two or three times and every answer shows as many,
//! and `time`'s formatter (which walks a format description for any
//! offset and precision) was about a tenth of a write's serialization.
//! The times this service makes are UTC; for those this writes the same
//! text `time` writes (a property test holds the two equal), and anything
//! else is handed to `time`. Reading stays with `time`.

use serde::Serializer;
use time::OffsetDateTime;

pub use time::serde::rfc3339::deserialize;

/// The longest text [`format_utc`] writes: `YYYY-MM-DDTHH:MM:SS.fffffffffZ`.
const MAX_LEN: usize = 30;

/// `t` as RFC 3339 text, when it is UTC in the years 0 to 9999: the date,
/// the time, the fraction of a second without trailing zeros (none when
/// whole), and `Z`. `None` for any other time.
fn format_utc(t: OffsetDateTime, out: &mut [u8; MAX_LEN]) -> Option<&str> {
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    if !t.offset().is_utc() {
        return None;
    }
    *out = *b"0000-00-00T00:00:00.000000000Z";
    put_digits(out, 0, year, 4);
    put_digits(out, 5, u32::from(u8::from(t.month())), 2);
    put_digits(out, 8, u32::from(t.day()), 2);
    put_digits(out, 11, u32::from(t.hour()), 2);
    put_digits(out, 14, u32::from(t.minute()), 2);
    put_digits(out, 17, u32::from(t.second()), 2);
    let nanos = t.nanosecond();
    if nanos == 0 {
        out[19] = b'Z';
        return std::str::from_utf8(&out[..20]).ok();
    }
    put_digits(out, 20, nanos, 9);
    let mut end = 29;
    while out[end - 1] == b'0' {
        end -= 1;
    }
    out[end] = b'Z';
    std::str::from_utf8(&out[..=end]).ok()
}

/// Writes `value` as `width` decimal digits at `at`, zero-padded.
fn put_digits(out: &mut [u8; MAX_LEN], at: usize, value: u32, width: usize) {
    let mut rest = value;
    for slot in out[at..at + width].iter_mut().rev() {
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
}

/// Serializes `t` as RFC 3339 (for `#[serde(with = "crate::rfc3339")]`).
pub fn serialize<S: Serializer>(t: &OffsetDateTime, serializer: S) -> Result<S::Ok, S::Error> {
    let mut buffer = [0u8; MAX_LEN];
    match format_utc(*t, &mut buffer) {
        Some(text) => serializer.serialize_str(text),
        None => time::serde::rfc3339::serialize(t, serializer),
    }
}

/// The same for an optional time (`null` when absent).
pub mod option {
    use serde::Serializer;
    use time::OffsetDateTime;

    pub use time::serde::rfc3339::option::deserialize;

    /// See [`super::serialize`].
    pub fn serialize<S: Serializer>(
        t: &Option<OffsetDateTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::serialize(t, serializer),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::format_description::well_known::Rfc3339;

    fn ours(t: OffsetDateTime) -> String {
        serde_json::to_value(Wrapped(t))
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    #[derive(serde::Serialize)]
    struct Wrapped(#[serde(with = "super")] OffsetDateTime);

    #[test]
    fn writes_what_time_writes() {
        for (text, expected) in [
            ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"),
            ("2026-12-02T15:47:00.123Z", "2026-12-02T15:47:00.123Z"),
            ("2026-12-02T15:47:00.120Z", "2026-12-02T15:47:00.12Z"),
            (
                "0001-02-03T04:05:06.000000001Z",
                "0001-02-03T04:05:06.000000001Z",
            ),
            ("9999-12-31T23:59:59.999Z", "9999-12-31T23:59:59.999Z"),
        ] {
            let t = OffsetDateTime::parse(text, &Rfc3339).unwrap();
            assert_eq!(ours(t), expected);
            assert_eq!(t.format(&Rfc3339).unwrap(), expected);
        }
        // Not UTC: time's own text, offset kept.
        let t = OffsetDateTime::parse("2026-12-02T15:47:00+01:00", &Rfc3339).unwrap();
        assert_eq!(ours(t), "2026-12-02T15:47:00+01:00");
    }

    proptest! {
        #[test]
        fn every_utc_time_reads_as_time_writes_it(
            seconds in -62_135_596_800i64..253_402_300_799,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000, (0u32..1000).prop_map(|m| m * 1_000_000)],
        ) {
            let t = OffsetDateTime::from_unix_timestamp(seconds).unwrap()
                .replace_nanosecond(nanos).unwrap();
            prop_assert_eq!(ours(t), t.format(&Rfc3339).unwrap());
        }
    }
}

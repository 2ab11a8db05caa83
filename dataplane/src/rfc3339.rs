//! RFC 3339 times as every stored value and answer writes them, made
//! without the `time` crate's general formatter.
//!
//! Every write stores two or three times and every answer shows as many,
//! and `time`'s formatter (which walks a format description for any
//! offset and precision) was about a tenth of a write's serialization.
//! The times this service makes are UTC; for those this writes the same
//! text `time` writes (a property test holds the two equal), and anything
//! else is handed to `time`.
//!
//! Reading the same form back ([`read_utc_millis`]) is equally direct: a
//! node's warm-up reads every stored time of the bucket, and `time`'s
//! parser was a sixth of decoding a stored value. Anything else is left
//! to `time` by the caller.

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

/// The instant a UTC time in exactly the form [`format_utc`] writes names,
/// in whole milliseconds since the Unix epoch, rounded down; `None` for
/// any other text (another offset, a leap second, more than nine digits of
/// fraction, an invalid date), which the caller hands to `time`. It never
/// accepts a text `time` rejects, and agrees with `time` on every text it
/// accepts (property tests hold both).
pub fn read_utc_millis(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let (&b'Z', rest) = b.split_last()? else {
        return None;
    };
    if rest.len() < 19 || [rest[4], rest[7], rest[10], rest[13], rest[16]] != *b"--T::" {
        return None;
    }
    let year = digits(&rest[0..4])?;
    let (month, day) = (digits(&rest[5..7])?, digits(&rest[8..10])?);
    let (hour, minute, second) = (
        digits(&rest[11..13])?,
        digits(&rest[14..16])?,
        digits(&rest[17..19])?,
    );
    let millis = match &rest[19..] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            // The first three digits, as milliseconds; the rest only has
            // to be digits (rounding down drops it).
            digits(fraction)?;
            let mut padded = *b"000";
            let shown = fraction.len().min(3);
            padded[..shown].copy_from_slice(&fraction[..shown]);
            digits(&padded)?
        }
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    Some(seconds * 1000 + i64::from(millis))
}

/// ASCII digits as a number; `None` if any byte is not a digit.
fn digits(bytes: &[u8]) -> Option<u32> {
    bytes.iter().try_fold(0u32, |value, byte| {
        byte.is_ascii_digit()
            .then(|| value * 10 + u32::from(byte - b'0'))
    })
}

fn days_in_month(year: u32, month: u32) -> u32 {
    let leap = year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400));
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (negative
/// before it), counted in 400-year eras of 146097 days whose years begin
/// in March, so the leap day ends a year.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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

    /// What `time` reads from `text`, in milliseconds rounded down.
    fn time_reads(text: &str) -> Option<i64> {
        let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
        i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
    }

    #[test]
    fn reads_the_form_it_writes_and_leaves_the_rest_to_time() {
        for (text, millis) in [
            ("1970-01-01T00:00:00Z", 0),
            ("1970-01-01T00:00:00.001Z", 1),
            ("1969-12-31T23:59:59.9999Z", -1),
            ("2026-12-02T15:47:00.12Z", 1_796_226_420_120),
            ("2000-02-29T00:00:00Z", 951_782_400_000),
            ("0000-01-01T00:00:00Z", -62_167_219_200_000),
        ] {
            assert_eq!(read_utc_millis(text), Some(millis), "{text}");
            assert_eq!(time_reads(text), Some(millis), "{text}");
        }
        for text in [
            "2026-12-02T15:47:00+01:00",
            "2026-12-02t15:47:00z",
            "2026-12-02T15:47:00.Z",
            "2026-12-02T15:47:00.1234567890Z",
            "2016-12-31T23:59:60Z",
            "2100-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-02T24:00:00Z",
            "2026-12-02 15:47:00Z",
            "+2026-12-02T15:47:00Z",
            "2026-12-02T15:47Z",
            "",
            "Z",
        ] {
            assert_eq!(read_utc_millis(text), None, "{text}");
        }
    }

    proptest! {
        #[test]
        fn reads_every_utc_time_as_time_does(
            seconds in -62_167_219_200i64..253_402_300_799,
            nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000, (0u32..1000).prop_map(|m| m * 1_000_000)],
        ) {
            let t = OffsetDateTime::from_unix_timestamp(seconds).unwrap()
                .replace_nanosecond(nanos).unwrap();
            let text = ours(t);
            prop_assert_eq!(read_utc_millis(&text), time_reads(&text));
            prop_assert!(read_utc_millis(&text).is_some(), "{}", text);
        }

        #[test]
        fn never_reads_what_time_would_not(
            // Mostly valid, with every field's first invalid values mixed in.
            text in "[0-9]{4}-(0[0-9]|1[0-3])-([0-2][0-9]|3[0-2])[Tt ]([01][0-9]|2[0-4]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]{0,11})?(Z|z|\\+00:00)",
        ) {
            if let Some(millis) = read_utc_millis(&text) {
                prop_assert_eq!(Some(millis), time_reads(&text), "{}", text);
            }
        }

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

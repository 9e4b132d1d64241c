//! Instants and durations as plain integers: RFC 3339 parsing and formatting, and the
//! rules language's duration syntax (`500ms`, `90s`, `1h30m`, `7d`).
//!
//! Every instant in sagawatch is an `i64` count of nanoseconds since the Unix epoch (UTC),
//! which covers the years 1677 to 2262 exactly. Nothing here reads a clock.

use std::fmt;

/// Nanoseconds since 1970-01-01T00:00:00Z.
pub type Instant = i64;

const NANOS_PER_SEC: i64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// A positive span of time, remembered together with the text it was written as, so that
/// `{{within}}` renders as the rule author wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duration {
    nanos: i64,
    text: String,
}

impl Duration {
    /// Parses `500ms`, `90s`, `15m`, `48h`, `7d` and combinations in descending unit order
    /// such as `1h30m`. The result must be positive.
    pub fn parse(text: &str) -> Result<Duration, String> {
        let t = text.trim();
        // "-1s" is no more allowed than "0s", and said the same way.
        let nanos = if t.starts_with('-') {
            0
        } else {
            Duration::parse_span(t)?
        };
        if nanos <= 0 {
            return Err(format!("duration {:?} must be positive", text.trim()));
        }
        Ok(Duration {
            nanos,
            text: text.trim().to_string(),
        })
    }

    /// Parses the same syntax as [`Duration::parse`] but allows zero (`0s`), for offsets
    /// and settings where zero means "none".
    pub fn parse_span(text: &str) -> Result<i64, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("empty duration (expected e.g. 500ms, 90s, 15m, 48h, 7d, 1h30m)".into());
        }
        if t.starts_with('-') {
            return Err(format!("duration {t:?} must not be negative"));
        }
        let bytes = t.as_bytes();
        let mut i = 0;
        let mut total: i64 = 0;
        let mut last_rank = usize::MAX;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if start == i {
                return Err(format!(
                    "invalid duration {t:?}: expected a number at {:?} (e.g. 500ms, 90s, 15m, 48h, 7d, 1h30m)",
                    &t[start..]
                ));
            }
            let number: i64 = t[start..i]
                .parse()
                .map_err(|_| format!("invalid duration {t:?}: number too large"))?;
            let ustart = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let unit = &t[ustart..i];
            let (rank, scale) = match unit {
                "d" => (0, SECS_PER_DAY * NANOS_PER_SEC),
                "h" => (1, 3_600 * NANOS_PER_SEC),
                "m" => (2, 60 * NANOS_PER_SEC),
                "s" => (3, NANOS_PER_SEC),
                "ms" => (4, 1_000_000),
                "" if bytes.get(i) == Some(&b'.') => {
                    return Err(format!(
                        "invalid duration {t:?}: no fractions; combine units instead (1h30m, 1500ms)"
                    ));
                }
                "" => {
                    return Err(format!(
                        "invalid duration {t:?}: missing unit after {number} (one of ms, s, m, h, d)"
                    ));
                }
                other => {
                    return Err(format!(
                        "invalid duration {t:?}: unknown unit {other:?} (one of ms, s, m, h, d)"
                    ));
                }
            };
            if last_rank != usize::MAX && rank <= last_rank {
                return Err(format!(
                    "invalid duration {t:?}: units must appear once each, largest first (as in 1h30m)"
                ));
            }
            last_rank = rank;
            total = number
                .checked_mul(scale)
                .and_then(|n| total.checked_add(n))
                .ok_or_else(|| format!("invalid duration {t:?}: too large"))?;
        }
        Ok(total)
    }

    /// A duration from nanoseconds, written in canonical form.
    pub fn from_nanos(nanos: i64) -> Duration {
        Duration {
            nanos,
            text: format_duration(nanos),
        }
    }

    pub fn nanos(&self) -> i64 {
        self.nanos
    }

    /// The text the duration was written as.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Writes nanoseconds in the largest units that divide it, e.g. `1h30m`, `500ms`.
pub fn format_duration(nanos: i64) -> String {
    if nanos == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = nanos.unsigned_abs();
    if nanos < 0 {
        out.push('-');
    }
    for (unit, scale) in [
        ("d", 86_400_000_000_000u64),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ] {
        if rest >= scale {
            out.push_str(&(rest / scale).to_string());
            out.push_str(unit);
            rest %= scale;
        }
    }
    out
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    // Howard Hinnant's algorithm: days since 1970-01-01 in the proleptic Gregorian calendar.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let s = b.get(at..at + n)?;
    let mut v = 0i64;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i64::from(c - b'0');
    }
    Some(v)
}

/// Whether `s` is a valid RFC 3339 timestamp that [`parse_rfc3339`] refuses only for its
/// range (the same date parses in a year of the range that is a leap year if its own is:
/// 29 February of 2023 is no date at all).
pub fn rfc3339_out_of_range(s: &str) -> bool {
    let Some(year) = digits(s.as_bytes(), 0, 4) else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let stand_in = if leap { "2000" } else { "2001" };
    parse_rfc3339(s).is_none()
        && s.is_char_boundary(4)
        && parse_rfc3339(&format!("{stand_in}{}", &s[4..])).is_some()
}

/// Parses an RFC 3339 timestamp (`2026-01-02T03:04:05.678Z`, `...+02:00`; `t`, `z` and a
/// space separator are accepted as RFC 3339 allows). Fractions beyond nanoseconds are
/// truncated. Returns `None` for anything else, or a time outside 1677..2262.
pub fn parse_rfc3339(s: &str) -> Option<Instant> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let year = digits(b, 0, 4)?;
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    let second = digits(b, 17, 2)?;
    if b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut frac: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        let mut scale = 100_000_000;
        while i < b.len() && b[i].is_ascii_digit() {
            frac += i64::from(b[i] - b'0') * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset_secs = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() => {
            let oh = digits(b, i + 1, 2)?;
            let om = digits(b, i + 4, 2)?;
            if b[i + 3] != b':' || oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'-' { -o } else { o }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * SECS_PER_DAY + hour * 3600 + minute * 60 + second - offset_secs;
    // In i128: the earliest instant is whole seconds below i64::MIN nanoseconds plus a
    // fraction above it. i64::MIN itself stands for "before any event" in the engine.
    (i128::from(secs) * i128::from(NANOS_PER_SEC) + i128::from(frac))
        .try_into()
        .ok()
        .filter(|&t| t != i64::MIN)
}

/// Formats an instant as RFC 3339 in UTC, with as many fraction digits (0, 3, 6 or 9) as
/// needed to be exact.
pub fn format_rfc3339(t: Instant) -> String {
    let secs = t.div_euclid(NANOS_PER_SEC);
    let nanos = t.rem_euclid(NANOS_PER_SEC);
    let days = secs.div_euclid(SECS_PER_DAY);
    let sod = secs.rem_euclid(SECS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    );
    if nanos != 0 {
        if nanos % 1_000_000 == 0 {
            out.push_str(&format!(".{:03}", nanos / 1_000_000));
        } else if nanos % 1_000 == 0 {
            out.push_str(&format!(".{:06}", nanos / 1_000));
        } else {
            out.push_str(&format!(".{nanos:09}"));
        }
    }
    out.push('Z');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for s in [
            "2026-01-02T03:04:05Z",
            "1970-01-01T00:00:00Z",
            "1969-12-31T23:59:59.999Z",
            "2024-02-29T12:00:00.000001Z",
            "2262-04-11T23:47:16.854775807Z",
            "1677-09-21T00:12:43.145224193Z",
        ] {
            let t = parse_rfc3339(s).unwrap();
            assert_eq!(format_rfc3339(t), s);
        }
        assert_eq!(
            parse_rfc3339("1677-09-21T00:12:43.145224193Z"),
            Some(i64::MIN + 1)
        );
        assert_eq!(parse_rfc3339("1677-09-21T00:12:43.145224192Z"), None);
        assert_eq!(parse_rfc3339("2262-04-11T23:47:16.854775808Z"), None);
    }

    /// Out of range only what would parse in range: not a day the calendar lacks.
    #[test]
    fn out_of_range_is_told_from_no_such_date() {
        for s in [
            "2263-01-01T00:00:00Z",
            "1600-02-29T00:00:00Z",
            "1677-09-21T00:12:43.145224192Z",
            "9999-12-31T23:59:59Z",
        ] {
            assert!(rfc3339_out_of_range(s), "{s}");
        }
        for s in [
            "2023-02-29T00:00:00Z",
            "2300-02-29T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-01-02T03:04:05Z",
            "20x6-01-02T03:04:05Z",
            "",
        ] {
            assert!(!rfc3339_out_of_range(s), "{s}");
        }
    }

    #[test]
    fn rfc3339_offsets_and_variants() {
        let z = parse_rfc3339("2026-01-02T03:04:05Z").unwrap();
        assert_eq!(parse_rfc3339("2026-01-02T05:04:05+02:00"), Some(z));
        assert_eq!(parse_rfc3339("2026-01-02T00:04:05-03:00"), Some(z));
        assert_eq!(parse_rfc3339("2026-01-02t03:04:05z"), Some(z));
        assert_eq!(parse_rfc3339("2026-01-02 03:04:05Z"), Some(z));
        assert_eq!(
            parse_rfc3339("2026-01-02T03:04:05.5Z"),
            Some(z + 500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2026-01-02T03:04:05.1234567891Z"),
            Some(z + 123_456_789)
        );
    }

    #[test]
    fn rfc3339_rejects_garbage() {
        for s in [
            "",
            "2026-01-02",
            "2026-01-02T03:04:05",
            "2026-13-02T03:04:05Z",
            "2026-02-30T03:04:05Z",
            "2026-01-02T24:04:05Z",
            "2026-01-02T03:04:05.Z",
            "2026-01-02T03:04:05+0200",
            "2026-01-02T03:04:05Zjunk",
            "9999-01-02T03:04:05Z",
            "２026-01-02T03:04:05Z",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s}");
        }
    }

    #[test]
    fn durations_parse() {
        let ms = 1_000_000;
        assert_eq!(Duration::parse("500ms").unwrap().nanos(), 500 * ms);
        assert_eq!(Duration::parse("90s").unwrap().nanos(), 90_000 * ms);
        assert_eq!(Duration::parse("15m").unwrap().nanos(), 900_000 * ms);
        assert_eq!(Duration::parse("48h").unwrap().nanos(), 48 * 3_600_000 * ms);
        assert_eq!(Duration::parse("7d").unwrap().nanos(), 7 * 86_400_000 * ms);
        assert_eq!(Duration::parse("1h30m").unwrap().nanos(), 5_400_000 * ms);
        assert_eq!(Duration::parse("1h30m").unwrap().as_str(), "1h30m");
    }

    #[test]
    fn durations_reject() {
        for s in [
            "", "0s", "0h0m", "-5m", "5", "5x", "30m1h", "1h1h", "m", "1.5h",
        ] {
            assert!(Duration::parse(s).is_err(), "{s}");
        }
        // Where zero is allowed, a negative span is refused as negative.
        assert_eq!(
            Duration::parse("-5m").unwrap_err(),
            "duration \"-5m\" must be positive"
        );
        assert_eq!(
            Duration::parse_span("-5m").unwrap_err(),
            "duration \"-5m\" must not be negative"
        );
        assert_eq!(Duration::parse_span("0s"), Ok(0));
        // The message quotes what was written.
        assert_eq!(
            Duration::parse("--1s").unwrap_err(),
            "duration \"--1s\" must be positive"
        );
    }

    #[test]
    fn durations_format() {
        assert_eq!(format_duration(5_400_000_000_000), "1h30m");
        assert_eq!(format_duration(500_000_000), "500ms");
        assert_eq!(format_duration(0), "0s");
    }
}

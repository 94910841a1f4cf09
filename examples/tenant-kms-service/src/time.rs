//! RFC 3339 times for the API (UTC, `2026-12-03T07:01:25Z`).

/// Unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix milliseconds as RFC 3339 UTC (whole seconds).
pub fn rfc3339_ms(ms: i64) -> String {
    rfc3339(u64::try_from(ms / 1000).unwrap_or(0))
}

/// Parses `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339, UTC, whole seconds) into Unix
/// seconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    let out = u64::try_from(secs).ok()?;
    // Reject dates that do not exist (2026-02-30): they do not round-trip.
    (rfc3339(out) == s).then_some(out)
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Rewrites, in `value`, every number under `at` or a key ending in `_at` (Unix
/// seconds, as keyfold's types serialize them) as an RFC 3339 string.
pub fn rfc3339_fields(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                match v {
                    serde_json::Value::Number(n) if k == "at" || k.ends_with("_at") => {
                        if let Some(secs) = n.as_u64() {
                            *v = serde_json::Value::String(rfc3339(secs));
                        }
                    }
                    other => rfc3339_fields(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(rfc3339_fields),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_234_567_890), "2009-02-13T23:31:30Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339_ms(1_234_567_890_999), "2009-02-13T23:31:30Z");
        for secs in [0, 951_782_400, 1_234_567_890, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&rfc3339(secs)), Some(secs));
        }
        for bad in [
            "2026-02-30T00:00:00Z",
            "2026-12-03T07:01:25",
            "2026-12-03 07:01:25Z",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn fields_ending_in_at_become_rfc_3339() {
        let mut v =
            serde_json::json!({"created_at": 0, "n": 5, "keys": [{"retired_at": 1_234_567_890}]});
        rfc3339_fields(&mut v);
        assert_eq!(v["created_at"], "1970-01-01T00:00:00Z");
        assert_eq!(v["n"], 5);
        assert_eq!(v["keys"][0]["retired_at"], "2009-02-13T23:31:30Z");
    }
}

//! Times for people: Unix seconds to `YYYY-MM-DD HH:MM:SS` (UTC), and user input (RFC 3339, or
//! "2 hours ago") to Unix seconds. Shared by the engine (conflicted-copy names) and commands.

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DD` (UTC) of a Unix time.
pub fn date_utc(secs: i64) -> String {
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time.
pub fn datetime_utc(secs: i64) -> String {
    let s = secs.rem_euclid(86_400);
    format!(
        "{} {:02}:{:02}:{:02}",
        date_utc(secs),
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Parses `2026-11-26T10:00:00Z`, `2026-11-26T10:00:00+01:00`, `2026-11-26 10:00:00` (UTC),
/// `2026-11-26` (midnight UTC), or `N UNIT ago` (UNIT: s, sec(ond)(s), m, min(ute)(s), h,
/// hour(s), d, day(s), w, week(s)), relative to `now`.
pub fn parse_time(input: &str, now: i64) -> Result<i64, String> {
    let s = input.trim();
    if let Some(rel) = s.strip_suffix("ago") {
        let rel = rel.trim();
        let split = rel
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{input:?}: say a unit, e.g. \"2 hours ago\""))?;
        let (n, unit) = rel.split_at(split);
        let n: i64 = n
            .parse()
            .map_err(|_| format!("{input:?}: expected a number, e.g. \"2 hours ago\""))?;
        let unit_secs = match unit.trim() {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            "w" | "week" | "weeks" => 604_800,
            u => return Err(format!("{input:?}: unknown unit {u:?}")),
        };
        return Ok(now - n * unit_secs);
    }
    let bad = || {
        format!("{input:?} is not a time: use RFC 3339 (2026-11-26T10:00:00Z) or \"2 hours ago\"")
    };
    let (date, rest) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    };
    let mut dp = date.split('-');
    let (y, m, d) = (
        dp.next()
            .and_then(|v| v.parse::<i64>().ok())
            .ok_or_else(bad)?,
        dp.next()
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(bad)?,
        dp.next()
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(bad)?,
    );
    if dp.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, d) * 86_400;
    if rest.is_empty() {
        return Ok(secs);
    }
    // Time, then an optional offset.
    let (clock, offset) = match rest.find(['Z', 'z', '+', '-']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let clock = clock.split('.').next().unwrap_or("");
    let mut cp = clock.split(':');
    let h: i64 = cp.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let mi: i64 = cp.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let se: i64 = cp
        .next()
        .map_or(Some(0), |v| v.parse().ok())
        .ok_or_else(bad)?;
    if h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    secs += h * 3600 + mi * 60 + se;
    match offset {
        "" | "Z" | "z" => {}
        o => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let mut op = o[1..].split(':');
            let oh: i64 = op.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
            let om: i64 = op
                .next()
                .map_or(Some(0), |v| v.parse().ok())
                .ok_or_else(bad)?;
            secs -= sign * (oh * 3600 + om * 60);
        }
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        assert_eq!(datetime_utc(0), "1970-01-01 00:00:00");
        assert_eq!(datetime_utc(1_795_687_200), "2026-11-26 10:00:00");
        assert_eq!(parse_time("2026-11-26T10:00:00Z", 0), Ok(1_795_687_200));
        assert_eq!(parse_time("2026-11-26 10:00:00", 0), Ok(1_795_687_200));
        assert_eq!(
            parse_time("2026-11-26T11:30:00+01:30", 0),
            Ok(1_795_687_200)
        );
        assert_eq!(parse_time("2026-11-26T10:00:00.250Z", 0), Ok(1_795_687_200));
        assert_eq!(parse_time("2026-11-26", 0), Ok(1_795_687_200 - 36_000));
        assert_eq!(parse_time("2 hours ago", 10_000), Ok(2_800));
        assert_eq!(parse_time("90s ago", 100), Ok(10));
        assert_eq!(parse_time("1 week ago", 604_800), Ok(0));
        assert!(parse_time("yesterday", 0).is_err());
        assert!(parse_time("2026-13-01", 0).is_err());
        assert!(parse_time("3 fortnights ago", 0).is_err());
        for days in [-1000, 0, 59, 60, 365, 10_957, 20_000, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}

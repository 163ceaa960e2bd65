//! `ferry backup`: snapshots named by when they were taken, which one is
//! the newest, and which to keep.
//!
//! A snapshot is a directory `YYYY-MM-DDTHHMMSSZ` (UTC) in the backup
//! directory, there only once it is whole (it is published atomically:
//! until then it is `.NAME.ferry-next`). Keeping follows the usual
//! rotation (restic's, borg's): the newest snapshot of each of the last N
//! days, ISO weeks and months that have one; the newest snapshot is
//! always kept.
//!
//! Pure: names and numbers in, decisions out.

use std::collections::BTreeSet;

use ferry_proto::message::Keep;

/// The civil date and time (UTC) of `secs` since the epoch: year, month,
/// day, hour, minute, second (Howard Hinnant's `civil_from_days`).
pub fn civil(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rest = rest as u32;
    (year, month, day, rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Days since the epoch of a civil date (`days_from_civil`).
fn days_of(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The name of a snapshot taken at `secs` since the epoch.
pub(crate) fn name_at(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// A snapshot's day, as days since the epoch, if `name` is one.
pub(crate) fn day_of(name: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(name).ok()?;
    let b = text.as_bytes();
    let shaped = b.len() == 18 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[17] == b'Z';
    // (Only a name of the right length is indexed.)
    let digits = || {
        [0..4, 5..7, 8..10, 11..17]
            .iter()
            .all(|r| b[r.clone()].iter().all(u8::is_ascii_digit))
    };
    if !shaped || !digits() {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text[r].parse::<u32>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let valid = (1..=12).contains(&month) && (1..=31).contains(&day);
    valid.then(|| days_of(i64::from(year), month, day))
}

/// Whether `name` is a snapshot's.
pub fn is_snapshot(name: &str) -> bool {
    day_of(name.as_bytes()).is_some()
}

/// A backup directory's listing as snapshots: the complete ones and the
/// interrupted ones (their staging directories), each sorted oldest first.
pub(crate) fn sort_listing(
    listed: &[(Vec<u8>, rustix::fs::FileType)],
) -> (Vec<String>, Vec<String>) {
    let mut complete = Vec::new();
    let mut pending = Vec::new();
    for (name, kind) in listed {
        let is_dir = *kind == rustix::fs::FileType::Directory;
        if is_dir && day_of(name).is_some() {
            complete.push(String::from_utf8_lossy(name).into_owned());
        } else if let Some(stem) = crate::names::stem(name, crate::names::NEXT_SUFFIX)
            && is_dir
            && day_of(stem).is_some()
        {
            pending.push(String::from_utf8_lossy(stem).into_owned());
        }
    }
    complete.sort();
    pending.sort();
    (complete, pending)
}

/// The bucket a rotation rule puts a snapshot in, from its name and day.
type Bucket = fn(&String, i64) -> i64;

/// Which snapshots go, of `names` (snapshot names, any order), as `keep`
/// says. Nothing goes when `keep` asks for nothing.
pub(crate) fn to_prune(names: &[String], keep: &Keep) -> Vec<String> {
    if keep.daily.is_none() && keep.weekly.is_none() && keep.monthly.is_none() {
        return Vec::new();
    }
    let mut newest_first: Vec<(&String, i64)> = names
        .iter()
        .filter_map(|n| day_of(n.as_bytes()).map(|d| (n, d)))
        .collect();
    newest_first.sort_by(|a, b| b.0.cmp(a.0));
    let mut kept: BTreeSet<&String> = newest_first.first().map(|(n, _)| *n).into_iter().collect();
    // Each rule: how many buckets, and a snapshot's bucket.
    let rules: [(Option<u32>, Bucket); 3] = [
        (keep.daily, |_, day| day),
        // Weeks from Monday: 1970-01-01 was a Thursday.
        (keep.weekly, |_, day| (day + 3).div_euclid(7)),
        (keep.monthly, |name, _| {
            let year: i64 = name[0..4].parse().unwrap_or(0);
            let month: i64 = name[5..7].parse().unwrap_or(0);
            year * 12 + month
        }),
    ];
    for (count, bucket_of) in rules {
        let Some(count) = count else { continue };
        let mut buckets = Vec::new();
        for (name, day) in &newest_first {
            let bucket = bucket_of(name, *day);
            if buckets.last() != Some(&bucket) && buckets.len() < count as usize {
                buckets.push(bucket);
                kept.insert(name);
            }
        }
    }
    let mut pruned: Vec<String> = newest_first
        .iter()
        .filter(|(n, _)| !kept.contains(n))
        .map(|(n, _)| (*n).clone())
        .collect();
    pruned.sort();
    pruned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dated_and_read_back() {
        assert_eq!(name_at(1_796_534_355), "2026-12-06T051915Z");
        assert_eq!(day_of(b"2026-12-06T051915Z"), Some(1_796_534_355 / 86_400));
        assert_eq!(day_of(b"1970-01-01T000000Z"), Some(0));
        for bad in [
            &b"latest"[..],
            b"2026-12-06",
            b"2026-13-06T051915Z",
            b"2026-12-06T05:915Z",
        ] {
            assert_eq!(day_of(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(civil(-1), (1969, 12, 31, 23, 59, 59));
        assert_eq!(days_of(2000, 2, 29), 11_016);
    }

    fn daily(days: i64) -> Vec<String> {
        (0..days)
            .map(|d| name_at(1_796_534_355 - d * 86_400))
            .collect()
    }

    #[test]
    fn rotation_keeps_the_newest_of_each_bucket() {
        let names = daily(60);
        let nothing = Keep::default();
        assert!(to_prune(&names, &nothing).is_empty(), "no rule keeps all");
        let keep = Keep {
            daily: Some(7),
            ..Keep::default()
        };
        let pruned = to_prune(&names, &keep);
        assert_eq!(pruned.len(), 53);
        assert!(!pruned.contains(&names[0]) && !pruned.contains(&names[6]));
        assert!(pruned.contains(&names[7]));
        let keep = Keep {
            daily: Some(3),
            weekly: Some(4),
            monthly: Some(3),
        };
        let kept = names.len() - to_prune(&names, &keep).len();
        // 3 days, then the newest of 4 weeks (the first overlaps a day),
        // and of 3 months (the first overlaps): at most 3 + 4 + 3.
        assert!((6..=10).contains(&kept), "{kept}");
        let one = Keep {
            daily: Some(0),
            ..Keep::default()
        };
        assert_eq!(to_prune(&names, &one).len(), 59, "the newest always stays");
    }
}

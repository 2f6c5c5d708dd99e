//! HL7 v2 timestamps (`DTM`/`TS`) to and from FHIR `dateTime`, in UK local time.
//!
//! # Why the offset is computed here
//! A PAS writes local wall-clock time, and UK data crosses BST and GMT twice a year. The
//! simulator renders UTC instants as UK local time with an explicit offset (`+0000` GMT,
//! `+0100` BST: BST runs from 01:00 UTC on the last Sunday of March to 01:00 UTC on the last
//! Sunday of October). Parsing keeps the precision the sender gave (`YYYY`, `YYYYMM`,
//! `YYYYMMDD` map to FHIR's partial dates) and the sender's offset; a time without an offset
//! is read as UK local time under the same rule (the October hour that happens twice is read
//! as BST, the March hour that never happens as GMT). The rule is today's: times before 1996
//! are given today's rule too.

use hl7_parser::datetime::{TimeStamp, parse_timestamp};

use crate::synth::model::{Date, DateTime};

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Minutes since the epoch of the UTC instant at 01:00 on the last Sunday of `month`.
fn last_sunday_0100_utc(year: i64, month: u32) -> i64 {
    let last = days_from_civil(year, month, days_in_month(year, month));
    // 1970-01-01 was a Thursday: weekday 0 = Sunday when (days + 4) % 7 == 0.
    let weekday = (last + 4).rem_euclid(7);
    (last - weekday) * 1440 + 60
}

/// True when the UTC instant (minutes since the epoch) falls in British Summer Time.
fn is_bst(utc_minutes: i64) -> bool {
    let (year, _, _) = civil_from_days(utc_minutes.div_euclid(1440));
    utc_minutes >= last_sunday_0100_utc(year, 3) && utc_minutes < last_sunday_0100_utc(year, 10)
}

fn minutes_of(dt: &DateTime) -> i64 {
    days_from_civil(
        i64::from(dt.date.year),
        u32::from(dt.date.month),
        u32::from(dt.date.day),
    ) * 1440
        + i64::from(dt.hour) * 60
        + i64::from(dt.minute)
}

/// The UK offset in minutes (0 or 60) in force at a UTC instant.
pub fn uk_offset_minutes(utc: &DateTime) -> i64 {
    if is_bst(minutes_of(utc)) { 60 } else { 0 }
}

/// Renders a UTC instant as an HL7 `DTM` in UK local time: `YYYYMMDDHHMM+0000` or `+0100`.
pub fn to_hl7_uk(utc: &DateTime) -> String {
    let offset = uk_offset_minutes(utc);
    let local = minutes_of(utc) + offset;
    let (y, m, d) = civil_from_days(local.div_euclid(1440));
    let mins = local.rem_euclid(1440);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}+{:02}00",
        mins / 60,
        mins % 60,
        offset / 60
    )
}

/// The current time as a UTC [`DateTime`] (wall clock: for message headers only).
pub fn now_utc() -> DateTime {
    let minutes = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs() / 60) as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(minutes.div_euclid(1440));
    let mins = minutes.rem_euclid(1440);
    DateTime {
        date: Date {
            year: u16::try_from(y).unwrap_or(1970),
            month: m as u8,
            day: d as u8,
        },
        hour: (mins / 60) as u8,
        minute: (mins % 60) as u8,
    }
}

/// Now, as an HL7 `DTM` in UK local time (MSH-7).
pub fn now_hl7() -> String {
    to_hl7_uk(&now_utc())
}

/// The UK local calendar date of a UTC instant, as an HL7 `DT` (`YYYYMMDD`).
pub fn to_hl7_uk_date(utc: &DateTime) -> String {
    let local = minutes_of(utc) + uk_offset_minutes(utc);
    let (y, m, d) = civil_from_days(local.div_euclid(1440));
    format!("{y:04}{m:02}{d:02}")
}

/// A calendar date as an HL7 `DT`.
pub fn date_to_hl7(date: &Date) -> String {
    format!("{:04}{:02}{:02}", date.year, date.month, date.day)
}

fn parse_ts(raw: &str) -> Option<TimeStamp> {
    // Some senders pad with spaces or add a trailing `^precision` (v2.3 TS.2); `raw` is one
    // component already, so only spaces remain to trim.
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    let ts = parse_timestamp(raw, false).ok()?;
    let month = ts.month.unwrap_or(1);
    let day = ts.day.unwrap_or(1);
    let valid = (1..=12).contains(&month)
        && day >= 1
        && u32::from(day) <= days_in_month(i64::from(ts.year), u32::from(month))
        && ts.hour.is_none_or(|h| h < 24)
        && ts.minute.is_none_or(|m| m < 60)
        && ts.second.is_none_or(|s| s < 60)
        && ts
            .offset
            .is_none_or(|o| o.hours.abs() <= 14 && o.minutes < 60)
        && ts.year >= 1;
    valid.then_some(ts)
}

/// An HL7 `DT`/`DTM`/`TS` as a FHIR `date` (the sender's local calendar date, never shifted:
/// a birth date is the date the family gives, whatever the time zone), at the precision given.
pub fn to_fhir_date(raw: &str) -> Option<String> {
    let ts = parse_ts(raw)?;
    Some(match (ts.month, ts.day) {
        (Some(m), Some(d)) => format!("{:04}-{m:02}-{d:02}", ts.year),
        (Some(m), None) => format!("{:04}-{m:02}", ts.year),
        _ => format!("{:04}", ts.year),
    })
}

/// An HL7 `DTM`/`TS` as a FHIR `dateTime`: partial dates stay partial; a time gets seconds and
/// an offset (the sender's, or UK local time's when absent).
pub fn to_fhir_datetime(raw: &str) -> Option<String> {
    let ts = parse_ts(raw)?;
    let (Some(month), Some(day), Some(hour)) = (ts.month, ts.day, ts.hour) else {
        return to_fhir_date(raw);
    };
    let minute = ts.minute.unwrap_or(0);
    let second = ts.second.unwrap_or(0);
    let frac = match ts.microsecond {
        Some(us) if us > 0 => format!(".{:06}", us).trim_end_matches('0').to_owned(),
        _ => String::new(),
    };
    let offset_minutes = match ts.offset {
        Some(o) => {
            let sign = if o.hours < 0 { -1 } else { 1 };
            i64::from(o.hours) * 60 + sign * i64::from(o.minutes)
        }
        None => uk_offset_for_local(ts.year, month, day, hour, minute),
    };
    let sign = if offset_minutes < 0 { '-' } else { '+' };
    let abs = offset_minutes.abs();
    Some(format!(
        "{:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{frac}{sign}{:02}:{:02}",
        ts.year,
        abs / 60,
        abs % 60
    ))
}

/// The UK offset for a local wall-clock time: BST when reading it as BST lands in BST.
fn uk_offset_for_local(year: u16, month: u8, day: u8, hour: u8, minute: u8) -> i64 {
    let local = days_from_civil(i64::from(year), u32::from(month), u32::from(day)) * 1440
        + i64::from(hour) * 60
        + i64::from(minute);
    if is_bst(local - 60) { 60 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(year: u16, month: u8, day: u8, hour: u8, minute: u8) -> DateTime {
        DateTime {
            date: Date { year, month, day },
            hour,
            minute,
        }
    }

    #[test]
    fn day_arithmetic_round_trips() {
        for z in [-800_000, -1, 0, 1, 10_957, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn bst_switches_at_one_utc_on_the_last_sundays() {
        // 2024: BST from 31 March 01:00 UTC to 27 October 01:00 UTC.
        assert_eq!(to_hl7_uk(&dt(2024, 3, 31, 0, 59)), "202403310059+0000");
        assert_eq!(to_hl7_uk(&dt(2024, 3, 31, 1, 0)), "202403310200+0100");
        assert_eq!(to_hl7_uk(&dt(2024, 10, 27, 0, 59)), "202410270159+0100");
        assert_eq!(to_hl7_uk(&dt(2024, 10, 27, 1, 0)), "202410270100+0000");
        // 2025: 30 March and 26 October.
        assert_eq!(to_hl7_uk(&dt(2025, 3, 30, 1, 0)), "202503300200+0100");
        assert_eq!(to_hl7_uk(&dt(2025, 10, 26, 0, 30)), "202510260130+0100");
        // Late evening in summer crosses midnight locally.
        assert_eq!(to_hl7_uk(&dt(2023, 6, 30, 23, 30)), "202307010030+0100");
        assert_eq!(to_hl7_uk_date(&dt(2023, 6, 30, 23, 30)), "20230701");
        assert_eq!(to_hl7_uk(&dt(2023, 12, 31, 23, 30)), "202312312330+0000");
    }

    #[test]
    fn partial_precision_and_offsets_parse_to_fhir() {
        assert_eq!(to_fhir_datetime("2013").as_deref(), Some("2013"));
        assert_eq!(to_fhir_datetime("201302").as_deref(), Some("2013-02"));
        assert_eq!(to_fhir_datetime("20130211").as_deref(), Some("2013-02-11"));
        assert_eq!(
            to_fhir_datetime("2013021110").as_deref(),
            Some("2013-02-11T10:00:00+00:00")
        );
        assert_eq!(
            to_fhir_datetime("20130211100052").as_deref(),
            Some("2013-02-11T10:00:52+00:00")
        );
        assert_eq!(
            to_fhir_datetime("20130711100052").as_deref(),
            Some("2013-07-11T10:00:52+01:00")
        );
        assert_eq!(
            to_fhir_datetime("202403310200+0100").as_deref(),
            Some("2024-03-31T02:00:00+01:00")
        );
        assert_eq!(
            to_fhir_datetime("20230312195905.1234-0700").as_deref(),
            Some("2023-03-12T19:59:05.1234-07:00")
        );
        assert_eq!(to_fhir_datetime("20130230"), None);
        assert_eq!(to_fhir_datetime("2013021125"), None);
        assert_eq!(to_fhir_datetime("not a date"), None);
        assert_eq!(
            to_fhir_date("19250704044401").as_deref(),
            Some("1925-07-04")
        );
    }

    #[test]
    fn local_times_without_offset_follow_uk_rules() {
        // The October hour that happens twice reads as BST; after it, GMT.
        assert_eq!(
            to_fhir_datetime("202410270130").as_deref(),
            Some("2024-10-27T01:30:00+01:00")
        );
        assert_eq!(
            to_fhir_datetime("202410270230").as_deref(),
            Some("2024-10-27T02:30:00+00:00")
        );
        assert_eq!(
            to_fhir_datetime("202403310030").as_deref(),
            Some("2024-03-31T00:30:00+00:00")
        );
        assert_eq!(
            to_fhir_datetime("202403310230").as_deref(),
            Some("2024-03-31T02:30:00+01:00")
        );
    }

    #[test]
    fn rendered_times_parse_back_to_the_same_instant() {
        for (y, mo, d, h, mi) in [
            (2024, 3, 31, 1, 0),
            (2024, 10, 27, 0, 59),
            (2021, 1, 5, 9, 5),
        ] {
            let utc = dt(y, mo, d, h, mi);
            let fhir = to_fhir_datetime(&to_hl7_uk(&utc)).unwrap_or_default();
            let off = if uk_offset_minutes(&utc) == 60 {
                "+01:00"
            } else {
                "+00:00"
            };
            assert!(fhir.ends_with(off), "{fhir}");
        }
    }
}

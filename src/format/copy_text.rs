//! Writing field values in the text format of `COPY ... FROM`.

use std::fmt::Write as _;

/// Appends `text` as one COPY text field, escaping the characters COPY treats specially.
/// Fails on a NUL character, which no PostgreSQL text value can hold.
pub(crate) fn push_escaped(buf: &mut Vec<u8>, text: &[u8]) -> Result<(), NulByte> {
    let mut start = 0;
    for (i, &b) in text.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0 => return Err(NulByte),
            _ => continue,
        };
        buf.extend_from_slice(&text[start..i]);
        buf.extend_from_slice(escaped);
        start = i + 1;
    }
    buf.extend_from_slice(&text[start..]);
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NulByte;

/// The field that COPY reads as SQL NULL.
pub(crate) const NULL_FIELD: &[u8] = b"\\N";

/// Appends bytes as a bytea hex literal (`\x0a1b...`), escaped for COPY.
pub(crate) fn push_bytea_hex(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.extend_from_slice(b"\\\\x");
    for &b in bytes {
        buf.push(HEX[(b >> 4) as usize]);
        buf.push(HEX[(b & 15) as usize]);
    }
}

/// Formats milliseconds since the Unix epoch as a UTC timestamptz literal.
pub(crate) fn timestamp_literal(epoch_ms: i64) -> String {
    let days = epoch_ms.div_euclid(86_400_000);
    let ms_of_day = epoch_ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let mut s = String::with_capacity(32);
    let secs = ms_of_day / 1000;
    let _ = write!(
        s,
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}+00",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms_of_day % 1000
    );
    s
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
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

/// Converts a JSON array into a PostgreSQL array literal, as `json_populate_record` does for
/// array columns: strings are quoted, `null` becomes NULL, nested arrays nest.
pub(crate) fn array_literal(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Array(items) => {
            out.push('{');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                array_literal(item, out);
            }
            out.push('}');
        }
        serde_json::Value::Null => out.push_str("NULL"),
        serde_json::Value::String(s) => quote_element(s, out),
        other => quote_element(&other.to_string(), out),
    }
}

fn quote_element(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_copy_specials() {
        let mut buf = Vec::new();
        push_escaped(&mut buf, b"a\tb\nc\\d\re").unwrap();
        assert_eq!(buf, b"a\\tb\\nc\\\\d\\re");
        assert_eq!(push_escaped(&mut Vec::new(), b"a\0b"), Err(NulByte));
    }

    #[test]
    fn formats_timestamps() {
        assert_eq!(timestamp_literal(0), "1970-01-01 00:00:00.000+00");
        assert_eq!(timestamp_literal(1_700_000_000_123), "2023-11-14 22:13:20.123+00");
        assert_eq!(timestamp_literal(951_782_400_000), "2000-02-29 00:00:00.000+00");
        assert_eq!(timestamp_literal(-1), "1969-12-31 23:59:59.999+00");
    }

    #[test]
    fn builds_array_literals() {
        let mut s = String::new();
        array_literal(&serde_json::json!([[1, 2], [null, "a\"b"]]), &mut s);
        assert_eq!(s, r#"{{"1","2"},{NULL,"a\"b"}}"#);
    }

    #[test]
    fn hex_for_bytea() {
        let mut buf = Vec::new();
        push_bytea_hex(&mut buf, &[0, 255, 16]);
        assert_eq!(buf, b"\\\\x00ff10");
    }
}

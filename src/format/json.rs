//! Reading a JSON object's fields without building a tree: each field of interest is kept as
//! the raw JSON text it was sent as, borrowed from the message.

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

/// The object keys a message is read for, each with the slot its value goes to.
#[derive(Clone, Debug)]
pub(crate) enum FieldNames {
    /// Below `FIELD_NAMES_HASHED_FROM` names, comparing a key with each name beats hashing it.
    Few(Vec<(String, usize)>),
    Many(HashMap<String, usize>),
}

const FIELD_NAMES_HASHED_FROM: usize = 16;

impl FromIterator<(String, usize)> for FieldNames {
    fn from_iter<I: IntoIterator<Item = (String, usize)>>(pairs: I) -> FieldNames {
        let names: Vec<(String, usize)> = pairs.into_iter().collect();
        if names.len() < FIELD_NAMES_HASHED_FROM {
            FieldNames::Few(names)
        } else {
            FieldNames::Many(names.into_iter().collect())
        }
    }
}

impl FieldNames {
    fn slot(&self, key: &str) -> Option<usize> {
        match self {
            FieldNames::Few(names) => names.iter().find(|(name, _)| name == key).map(|(_, slot)| *slot),
            FieldNames::Many(index) => index.get(key).copied(),
        }
    }
}

/// Fills `out[slot]` with the raw value of every key of `payload` that `fields` maps to a
/// slot. Unknown keys are ignored; of duplicate keys the last wins, as in
/// `json_populate_record`.
pub(crate) fn object_fields<'a>(
    payload: &'a [u8],
    fields: &FieldNames,
    out: &mut [Option<&'a RawValue>],
) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    ObjectFields { fields, out }.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())
}

/// Checks that `payload` is one well-formed JSON value.
pub(crate) fn validate(payload: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<IgnoredAny>(payload).map(drop).map_err(|e| e.to_string())
}

/// The text a JSON scalar stands for: a string unescaped, anything else as written.
/// `None` for `null`.
pub(crate) fn scalar_text(raw: &str) -> Result<Option<Cow<'_, str>>, String> {
    match raw.as_bytes().first() {
        Some(b'n') => Ok(None),
        Some(b'"') if !raw.contains('\\') => Ok(Some(Cow::Borrowed(&raw[1..raw.len() - 1]))),
        Some(b'"') => serde_json::from_str::<String>(raw).map(|s| Some(Cow::Owned(s))).map_err(|e| e.to_string()),
        _ => Ok(Some(Cow::Borrowed(raw))),
    }
}

struct ObjectFields<'m, 'a> {
    fields: &'m FieldNames,
    out: &'m mut [Option<&'a RawValue>],
}

impl<'de, 'm> DeserializeSeed<'de> for ObjectFields<'m, 'de> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'm> Visitor<'de> for ObjectFields<'m, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(slot) = map.next_key_seed(KeyLookup(self.fields))? {
            match slot {
                Some(slot) => self.out[slot] = Some(map.next_value::<&'de RawValue>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

struct KeyLookup<'m>(&'m FieldNames);

impl<'de> DeserializeSeed<'de> for KeyLookup<'_> {
    type Value = Option<usize>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyLookup<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.slot(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_known_keys_last_duplicate_wins() {
        let fields: FieldNames = [("a".into(), 0), ("b".into(), 1)].into_iter().collect();
        let mut out = [None, None];
        object_fields(br#"{"a": 1, "x": {"deep": [1]}, "b": "t\"x", "a": 2}"#, &fields, &mut out).unwrap();
        assert_eq!(out[0].unwrap().get(), "2");
        assert_eq!(out[1].unwrap().get(), r#""t\"x""#);
    }

    #[test]
    fn wide_tables_find_keys_through_the_index() {
        let fields: FieldNames = (0..40).map(|i| (format!("c{i}"), i)).collect();
        assert!(matches!(fields, FieldNames::Many(_)));
        let mut out = vec![None; 40];
        object_fields(br#"{"c39": 1, "c0": 2, "other": 3}"#, &fields, &mut out).unwrap();
        assert_eq!(out[39].unwrap().get(), "1");
        assert_eq!(out[0].unwrap().get(), "2");
        assert_eq!(out.iter().flatten().count(), 2);
    }

    #[test]
    fn rejects_non_objects_and_garbage() {
        let fields = FieldNames::Few(Vec::new());
        assert!(object_fields(b"[1]", &fields, &mut []).unwrap_err().contains("JSON object"));
        assert!(object_fields(b"{\"a\":", &fields, &mut []).is_err());
        assert!(object_fields(b"{} x", &fields, &mut []).is_err());
    }

    #[test]
    fn unescapes_scalars() {
        assert_eq!(scalar_text(r#""a\nb""#).unwrap().unwrap(), "a\nb");
        assert_eq!(scalar_text("12.50").unwrap().unwrap(), "12.50");
        assert_eq!(scalar_text("null").unwrap(), None);
    }
}

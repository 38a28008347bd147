//! `kafka.send()` messages as they travel through the WAL: a transactional logical decoding
//! message with prefix [`PREFIX`] whose content names the publication, the topic, the key
//! and the value. Decoding replays it in commit order with the table changes.

/// Prefix of the logical decoding messages written by `kafka.send()`.
pub(crate) const PREFIX: &std::ffi::CStr = c"pg_kafka_bridge";
const VERSION: u8 = 1;

/// A message for Kafka, as `kafka.send()` was given it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Outgoing<'a> {
    pub(crate) publication_id: i32,
    pub(crate) topic: &'a str,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) value: Option<&'a [u8]>,
}

impl Outgoing<'_> {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            16 + self.topic.len() + self.key.map_or(0, <[u8]>::len) + self.value.map_or(0, <[u8]>::len),
        );
        out.push(VERSION);
        out.extend_from_slice(&self.publication_id.to_le_bytes());
        put_bytes(&mut out, Some(self.topic.as_bytes()));
        put_bytes(&mut out, self.key);
        put_bytes(&mut out, self.value);
        out
    }

    /// Reads a message written by [`Outgoing::encode`]; `None` if it is not one.
    pub(crate) fn decode(mut input: &[u8]) -> Option<Outgoing<'_>> {
        let (&version, rest) = input.split_first()?;
        if version != VERSION || rest.len() < 4 {
            return None;
        }
        let publication_id = i32::from_le_bytes(rest[..4].try_into().ok()?);
        input = &rest[4..];
        let topic = std::str::from_utf8(take_bytes(&mut input)??).ok()?;
        let key = take_bytes(&mut input)?;
        let value = take_bytes(&mut input)?;
        input.is_empty().then_some(Outgoing { publication_id, topic, key, value })
    }
}

/// A length (-1 for none) and the bytes.
fn put_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            out.extend_from_slice(&(b.len() as i32).to_le_bytes());
            out.extend_from_slice(b);
        }
        None => out.extend_from_slice(&(-1i32).to_le_bytes()),
    }
}

fn take_bytes<'a>(input: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    if input.len() < 4 {
        return None;
    }
    let len = i32::from_le_bytes(input[..4].try_into().ok()?);
    *input = &input[4..];
    if len < 0 {
        return Some(None);
    }
    let len = len as usize;
    if input.len() < len {
        return None;
    }
    let (bytes, rest) = input.split_at(len);
    *input = rest;
    Some(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_and_without_key_and_value() {
        for (key, value) in [(Some(&b"k"[..]), Some(&b"v\0x"[..])), (None, Some(&b""[..])), (Some(&b""[..]), None)] {
            let m = Outgoing { publication_id: 7, topic: "orders.events", key, value };
            assert_eq!(Outgoing::decode(&m.encode()), Some(m));
        }
    }

    #[test]
    fn rejects_truncated_and_foreign_content() {
        let encoded = Outgoing { publication_id: 1, topic: "t", key: None, value: Some(b"abc") }.encode();
        for cut in 0..encoded.len() {
            assert_eq!(Outgoing::decode(&encoded[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Outgoing::decode(b"\x02whatever"), None);
    }
}

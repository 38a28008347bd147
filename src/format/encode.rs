//! A batch of messages as COPY text: one line per message that can become a row, grouped
//! into runs of lines that fill the same columns, and the reasons of those that cannot.
//! In upsert mode each line ends with two more fields: the message's index in the batch and
//! whether it is a tombstone (the apply side stages them beside the row).

use super::copy_text::{self, push_bytea_hex, push_escaped, NULL_FIELD};
use super::json::{self, FieldNames};
use super::shape::{ColumnInfo, MetaField, PayloadRule, ShapeColumn, TargetShape, ValueKind};
use super::{Format, Mode};
use serde_json::value::RawValue;
use std::ops::Range;

/// The parts of a change event that decide what it does to the table.
#[derive(serde::Deserialize)]
struct ChangeEvent<'a> {
    #[serde(borrow)]
    op: &'a str,
    #[serde(borrow)]
    after: Option<&'a RawValue>,
}

/// One Kafka message, as the row encoder sees it.
pub(crate) struct Message<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) payload: Option<&'a [u8]>,
    pub(crate) timestamp_ms: Option<i64>,
    /// Filled only when the table has a `_kafka_headers` column.
    pub(crate) headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

/// Which content columns a row fills: a bit per data slot.
type ColumnSet = Vec<u64>;

/// A message that became one line of COPY text, or a TRUNCATE of the table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EncodedRow {
    /// Index of the message in the batch.
    pub(crate) message: usize,
    column_set: usize,
    start: usize,
    end: usize,
}

/// The column set of a TRUNCATE change event, which has no line: it empties the table,
/// in order with the rows around it (a run of its own).
const TRUNCATE: usize = usize::MAX;

impl EncodedRow {
    pub(crate) fn is_truncate(&self) -> bool {
        self.column_set == TRUNCATE
    }
}

/// What a message becomes.
enum Encoded {
    Line,
    Truncate,
}

/// A message that cannot become a row, and why.
#[derive(Debug)]
pub(crate) struct Rejected {
    pub(crate) message: usize,
    pub(crate) error: String,
}

/// The rows of a batch in COPY text form.
#[derive(Default)]
pub(crate) struct EncodedBatch {
    pub(crate) buf: Vec<u8>,
    pub(crate) rows: Vec<EncodedRow>,
    pub(crate) rejected: Vec<Rejected>,
    column_sets: Vec<ColumnSet>,
    scratch_set: ColumnSet,
}

impl EncodedBatch {
    /// The COPY text of `rows[range]`, which are consecutive lines.
    pub(crate) fn text(&self, range: Range<usize>) -> &[u8] {
        match (self.rows.get(range.start), range.end.checked_sub(1).and_then(|l| self.rows.get(l))) {
            (Some(first), Some(last)) if range.start < range.end => &self.buf[first.start..last.end],
            _ => &[],
        }
    }

    /// Splits `range` into runs of rows that fill the same columns, so that each run can be
    /// written with one COPY and a column list.
    pub(crate) fn runs(&self, range: Range<usize>) -> Vec<Range<usize>> {
        let mut runs = Vec::new();
        let mut start = range.start;
        for i in range.clone() {
            if self.rows[i].column_set != self.rows[start].column_set {
                runs.push(start..i);
                start = i;
            }
        }
        if start < range.end {
            runs.push(start..range.end);
        }
        runs
    }

    /// The table columns that the lines of a run fill, in line order (in upsert mode the
    /// lines' last two fields follow them).
    pub(crate) fn column_names<'s>(&self, shape: &'s TargetShape, run_row: usize) -> Vec<&'s str> {
        let set = &self.column_sets[self.rows[run_row].column_set];
        shape
            .columns
            .iter()
            .filter(|c| c.data_slot.is_none_or(|s| set_contains(set, s)))
            .map(|c| c.info.name.as_str())
            .collect()
    }

    /// Encodes message number `index` of the batch, or records why it cannot become a row.
    pub(crate) fn push(&mut self, shape: &TargetShape, index: usize, msg: &Message) {
        let line_start = self.buf.len();
        match self.encode(shape, index, msg) {
            Ok(Encoded::Line) => {
                self.buf.push(b'\n');
                let column_set = self.intern_scratch_set();
                self.rows.push(EncodedRow { message: index, column_set, start: line_start, end: self.buf.len() });
            }
            Ok(Encoded::Truncate) => {
                self.rows.push(EncodedRow { message: index, column_set: TRUNCATE, start: line_start, end: line_start })
            }
            Err(error) => {
                self.buf.truncate(line_start);
                self.rejected.push(Rejected { message: index, error });
            }
        }
    }

    fn intern_scratch_set(&mut self) -> usize {
        if let Some(last) = self.column_sets.last() {
            if *last == self.scratch_set {
                return self.column_sets.len() - 1;
            }
        }
        self.column_sets.push(self.scratch_set.clone());
        self.column_sets.len() - 1
    }

    fn encode(&mut self, shape: &TargetShape, index: usize, msg: &Message) -> Result<Encoded, String> {
        let mut values: Vec<Option<FieldValue>> = vec![None; shape.data_count];
        let tombstone = match msg.payload {
            None if shape.mode == Mode::Insert => {
                return Err("message has no value (a tombstone), which insert mode cannot store".into())
            }
            None => {
                self.key_values(shape, msg, &mut values)?;
                true
            }
            Some(payload) if shape.format == Format::Change => {
                let event: ChangeEvent =
                    serde_json::from_slice(payload).map_err(|e| format!("invalid change event: {e}"))?;
                match (event.op, event.after, &shape.payload) {
                    ("d", _, _) => {
                        self.key_values(shape, msg, &mut values)?;
                        true
                    }
                    ("c" | "u" | "r", Some(after), PayloadRule::Object { fields }) => {
                        let mut raw: Vec<Option<&RawValue>> = vec![None; shape.data_count];
                        json::object_fields(after.get().as_bytes(), fields, &mut raw)
                            .map_err(|e| format!("invalid change event: \"after\": {e}"))?;
                        for (v, r) in values.iter_mut().zip(raw) {
                            *v = r.map(FieldValue::Json);
                        }
                        false
                    }
                    ("c" | "u" | "r", _, _) => return Err("change event has no \"after\" row".into()),
                    ("t", _, _) => return Ok(Encoded::Truncate),
                    (op, _, _) => return Err(format!("change event has unknown op \"{op}\"")),
                }
            }
            Some(payload) => {
                match (&shape.payload, shape.format) {
                    (PayloadRule::Object { fields }, _) => {
                        let mut raw: Vec<Option<&RawValue>> = vec![None; shape.data_count];
                        json::object_fields(payload, fields, &mut raw)
                            .map_err(|e| format!("invalid JSON message: {e}"))?;
                        for (v, r) in values.iter_mut().zip(raw) {
                            *v = r.map(FieldValue::Json);
                        }
                    }
                    (PayloadRule::Whole { slot }, Format::Json) => {
                        json::validate(payload).map_err(|e| format!("invalid JSON message: {e}"))?;
                        values[*slot] = Some(FieldValue::Text(payload));
                    }
                    (PayloadRule::Whole { slot }, Format::Text) => {
                        std::str::from_utf8(payload).map_err(|e| format!("message is not valid UTF-8 text: {e}"))?;
                        values[*slot] = Some(FieldValue::Text(payload));
                    }
                    (PayloadRule::Whole { slot }, Format::Bytea) => values[*slot] = Some(FieldValue::Bytes(payload)),
                    (PayloadRule::Whole { .. }, Format::Change) => {
                        unreachable!("change events map \"after\" to columns, handled above")
                    }
                }
                false
            }
        };
        self.scratch_set.clear();
        self.scratch_set.resize(shape.data_count.div_ceil(64), 0);
        for (slot, v) in values.iter().enumerate() {
            if v.is_some() {
                self.scratch_set[slot / 64] |= 1 << (slot % 64);
            }
        }
        if shape.mode == Mode::Upsert {
            // Key columns are always in the column list, so that every row of a run has them.
            for &i in &shape.key_columns {
                if let Some(slot) = shape.columns[i].data_slot {
                    self.scratch_set[slot / 64] |= 1 << (slot % 64);
                }
            }
        }
        let mut first = true;
        for column in &shape.columns {
            if column.data_slot.is_some_and(|s| !set_contains(&self.scratch_set, s)) {
                continue;
            }
            if !first {
                self.buf.push(b'\t');
            }
            first = false;
            let field_start = self.buf.len();
            let written = match (column.meta, column.data_slot) {
                (Some(meta), _) => self.push_meta(meta, &column.info, msg),
                (None, Some(slot)) => self.push_value(values[slot], &column.info),
                (None, None) => unreachable!("a column is either metadata or content"),
            };
            if let Err(e) = written {
                self.buf.truncate(field_start);
                return Err(format!("column \"{}\": {e}", column.info.name));
            }
        }
        if shape.mode == Mode::Upsert {
            self.buf.extend_from_slice(format!("\t{index}\t{}", if tombstone { 't' } else { 'f' }).as_bytes());
        }
        Ok(Encoded::Line)
    }

    /// Fills the key columns of a tombstone from the message key: a JSON object maps to
    /// columns by name; anything else is the value of the only key column.
    fn key_values<'a>(
        &self,
        shape: &TargetShape,
        msg: &Message<'a>,
        values: &mut [Option<FieldValue<'a>>],
    ) -> Result<(), String> {
        let data_keys: Vec<(usize, &ShapeColumn)> = shape
            .key_columns
            .iter()
            .filter_map(|&i| shape.columns[i].data_slot.map(|s| (s, &shape.columns[i])))
            .collect();
        if data_keys.is_empty() {
            return Ok(());
        }
        let Some(key) = msg.key else {
            return Err("message has neither a value nor a key: nothing identifies the row to delete".into());
        };
        if key.first() == Some(&b'{') {
            let fields: FieldNames = data_keys.iter().map(|(s, c)| (c.info.name.clone(), *s)).collect();
            let mut raw: Vec<Option<&RawValue>> = vec![None; shape.data_count];
            json::object_fields(key, &fields, &mut raw).map_err(|e| format!("invalid JSON message key: {e}"))?;
            for (slot, column) in data_keys {
                let v = raw[slot].ok_or_else(|| format!("message key has no field \"{}\"", column.info.name))?;
                values[slot] = Some(FieldValue::Json(v));
            }
        } else if let [(slot, _)] = data_keys[..] {
            values[slot] = Some(match serde_json::from_slice::<&RawValue>(key) {
                Ok(raw) => FieldValue::Json(raw),
                Err(_) => FieldValue::Text(key),
            });
        } else {
            return Err("message key must be a JSON object naming every key column".into());
        }
        Ok(())
    }

    fn push_value(&mut self, value: Option<FieldValue>, column: &ColumnInfo) -> Result<(), String> {
        match value {
            None => self.buf.extend_from_slice(NULL_FIELD),
            Some(FieldValue::Bytes(b)) => push_bytea_hex(&mut self.buf, b),
            Some(FieldValue::Text(t)) => self.push_text(t)?,
            Some(FieldValue::Json(raw)) => {
                let raw = raw.get();
                if raw == "null" {
                    self.buf.extend_from_slice(NULL_FIELD);
                } else if column.kind == ValueKind::Json {
                    self.push_text(raw.as_bytes())?;
                } else if column.kind == ValueKind::Array && raw.starts_with('[') {
                    let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| e.to_string())?;
                    let mut literal = String::new();
                    copy_text::array_literal(&value, &mut literal);
                    self.push_text(literal.as_bytes())?;
                } else {
                    let text = json::scalar_text(raw)?.unwrap_or_default();
                    self.push_text(text.as_bytes())?;
                }
            }
        }
        Ok(())
    }

    fn push_text(&mut self, text: &[u8]) -> Result<(), String> {
        push_escaped(&mut self.buf, text)
            .map_err(|_| "value contains a NUL character, which PostgreSQL text cannot store".to_string())
    }

    fn push_meta(&mut self, meta: MetaField, column: &ColumnInfo, msg: &Message) -> Result<(), String> {
        match meta {
            MetaField::Topic => self.push_text(msg.topic.as_bytes())?,
            MetaField::Partition => self.buf.extend_from_slice(msg.partition.to_string().as_bytes()),
            MetaField::Offset => self.buf.extend_from_slice(msg.offset.to_string().as_bytes()),
            MetaField::Key => match msg.key {
                None => self.buf.extend_from_slice(NULL_FIELD),
                Some(k) if column.kind == ValueKind::Bytea => push_bytea_hex(&mut self.buf, k),
                Some(k) => {
                    std::str::from_utf8(k).map_err(|_| "message key is not valid UTF-8 text (use a bytea column)")?;
                    self.push_text(k)?;
                }
            },
            MetaField::Timestamp => match msg.timestamp_ms {
                None => self.buf.extend_from_slice(NULL_FIELD),
                Some(ms) => self.buf.extend_from_slice(copy_text::timestamp_literal(ms).as_bytes()),
            },
            MetaField::Headers => {
                let object: serde_json::Map<String, serde_json::Value> = msg
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        let v =
                            value.map_or(serde_json::Value::Null, |v| String::from_utf8_lossy(v).into_owned().into());
                        (name.to_string(), v)
                    })
                    .collect();
                self.push_text(serde_json::Value::Object(object).to_string().as_bytes())?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum FieldValue<'a> {
    /// A raw JSON value from an object field or key.
    Json(&'a RawValue),
    /// Text to be written as it is.
    Text(&'a [u8]),
    /// Bytes for a bytea column.
    Bytes(&'a [u8]),
}

fn set_contains(set: &[u64], slot: usize) -> bool {
    set[slot / 64] & (1 << (slot % 64)) != 0
}

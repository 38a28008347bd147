//! Turning Kafka messages into rows: which column each part of a message fills, and the
//! COPY text that carries a batch of rows into PostgreSQL. Pure Rust, no database access.

pub mod copy_text;
mod json;

use copy_text::{push_bytea_hex, push_escaped, NULL_FIELD};
use json::FieldNames;
use serde_json::value::RawValue;
use std::ops::Range;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    Json,
    Text,
    Bytea,
    /// Change events (`{"op", "before", "after", ...}`, as publications and Debezium write
    /// them): `after` maps to columns like a JSON message; a delete removes its key's row.
    Change,
}

impl Format {
    pub const NAMES: &'static str = "'json', 'text', 'bytea' or 'change'";

    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "json" => Some(Format::Json),
            "text" => Some(Format::Text),
            "bytea" => Some(Format::Bytea),
            "change" => Some(Format::Change),
            _ => None,
        }
    }
}

/// The parts of a change event that decide what it does to the table.
#[derive(serde::Deserialize)]
struct ChangeEvent<'a> {
    #[serde(borrow)]
    op: &'a str,
    #[serde(borrow)]
    after: Option<&'a RawValue>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Insert,
    /// Insert or update on the key columns; a message without a value deletes its key's row.
    Upsert,
}

impl Mode {
    pub const NAMES: &'static str = "'insert' or 'upsert'";

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "insert" => Some(Mode::Insert),
            "upsert" => Some(Mode::Upsert),
            _ => None,
        }
    }
}

/// How a value must be written for the column's type input function to accept it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ValueKind {
    /// `json` or `jsonb`: receives JSON text as sent.
    Json,
    Bytea,
    /// Any array type: a JSON array becomes an array literal.
    Array,
    Other,
}

/// Columns that receive a message's metadata rather than its content.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MetaField {
    Topic,
    Partition,
    Offset,
    Key,
    Timestamp,
    Headers,
}

impl MetaField {
    pub fn from_column_name(name: &str) -> Option<MetaField> {
        Some(match name {
            "_kafka_topic" => MetaField::Topic,
            "_kafka_partition" => MetaField::Partition,
            "_kafka_offset" => MetaField::Offset,
            "_kafka_key" => MetaField::Key,
            "_kafka_timestamp" => MetaField::Timestamp,
            "_kafka_headers" => MetaField::Headers,
            _ => return None,
        })
    }
}

/// A column of the target table that rows can be written to.
#[derive(Clone, Debug)]
pub struct ColumnInfo {
    pub name: String,
    pub kind: ValueKind,
}

/// One Kafka message, as the row encoder sees it.
pub struct Message<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub timestamp_ms: Option<i64>,
    /// Filled only when the table has a `_kafka_headers` column.
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
}

#[derive(Clone, Debug)]
struct ShapeColumn {
    info: ColumnInfo,
    meta: Option<MetaField>,
    /// Index among the columns filled from message content.
    data_slot: Option<usize>,
}

#[derive(Clone, Debug)]
enum PayloadRule {
    /// JSON object keys map to columns by name.
    Object { fields: FieldNames },
    /// The whole payload goes to one column.
    Whole { slot: usize },
}

/// Where each part of a message goes in a given table, for a format and mode.
#[derive(Clone, Debug)]
pub struct TargetShape {
    columns: Vec<ShapeColumn>,
    data_count: usize,
    payload: PayloadRule,
    format: Format,
    mode: Mode,
    /// Upsert: the columns that identify a row (indices into `columns`).
    key_columns: Vec<usize>,
}

/// Names of the two extra columns of the upsert staging table.
pub const STAGING_ORDINAL: &str = "__pgkb_ordinal";
pub const STAGING_TOMBSTONE: &str = "__pgkb_tombstone";

impl TargetShape {
    /// `columns` are the table's writable columns in table order (no dropped or generated
    /// ones). `key_columns` matters in upsert mode only. Errors name what does not fit.
    pub fn new(
        columns: Vec<ColumnInfo>,
        format: Format,
        mode: Mode,
        key_columns: &[String],
    ) -> Result<TargetShape, String> {
        let mut data_count = 0;
        let columns: Vec<ShapeColumn> = columns
            .into_iter()
            .map(|info| {
                let meta = MetaField::from_column_name(&info.name);
                let data_slot = meta.is_none().then(|| {
                    data_count += 1;
                    data_count - 1
                });
                ShapeColumn { info, meta, data_slot }
            })
            .collect();
        let data_columns: Vec<&ShapeColumn> = columns.iter().filter(|c| c.meta.is_none()).collect();
        if data_columns.is_empty() {
            return Err(
                "the table has no column to receive the message content (only _kafka_* metadata columns)".into()
            );
        }
        let payload = match format {
            Format::Json if data_columns.len() == 1 && data_columns[0].info.kind == ValueKind::Json => {
                PayloadRule::Whole { slot: 0 }
            }
            Format::Json | Format::Change => PayloadRule::Object {
                fields: data_columns.iter().map(|c| (c.info.name.clone(), c.data_slot.unwrap())).collect(),
            },
            Format::Text | Format::Bytea => {
                let column = match data_columns.iter().find(|c| c.info.name == "payload") {
                    Some(c) => c,
                    None if data_columns.len() == 1 => data_columns[0],
                    None => {
                        return Err(format!(
                            "format '{}' needs a column named \"payload\" or exactly one column besides the _kafka_* metadata columns",
                            if format == Format::Text { "text" } else { "bytea" }
                        ))
                    }
                };
                if format == Format::Bytea && column.info.kind != ValueKind::Bytea {
                    return Err(format!("format 'bytea' needs column \"{}\" to be of type bytea", column.info.name));
                }
                PayloadRule::Whole { slot: column.data_slot.unwrap() }
            }
        };
        if format == Format::Change && mode != Mode::Upsert {
            return Err("format 'change' needs mode 'upsert': change events update and delete rows".into());
        }
        let mut key_indices = Vec::new();
        if mode == Mode::Upsert {
            if key_columns.is_empty() {
                return Err(
                    "upsert mode needs key columns: the table has no primary key and key_columns is not given".into()
                );
            }
            for name in key_columns {
                let Some(i) = columns.iter().position(|c| &c.info.name == name) else {
                    return Err(format!("key column \"{name}\" is not a writable column of the table"));
                };
                let c = &columns[i];
                if matches!(payload, PayloadRule::Whole { .. }) && c.meta.is_none() {
                    return Err(format!(
                        "key column \"{name}\" cannot be filled: with the whole message in one column, keys must be _kafka_* metadata columns such as _kafka_key"
                    ));
                }
                key_indices.push(i);
            }
        }
        Ok(TargetShape { columns, data_count, payload, format, mode, key_columns: key_indices })
    }

    pub fn wants_headers(&self) -> bool {
        self.columns.iter().any(|c| c.meta == Some(MetaField::Headers))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Names of the key columns (upsert mode).
    pub fn key_column_names(&self) -> impl Iterator<Item = &str> {
        self.key_columns.iter().map(|&i| self.columns[i].info.name.as_str())
    }

    /// Every writable column, in table order.
    pub fn all_columns(&self) -> impl Iterator<Item = &ColumnInfo> {
        self.columns.iter().map(|c| &c.info)
    }
}

/// Which content columns a row fills: a bit per data slot.
type ColumnSet = Vec<u64>;

/// A message that became one line of COPY text.
#[derive(Clone, Copy, Debug)]
pub struct EncodedRow {
    /// Index of the message in the batch.
    pub message: usize,
    pub tombstone: bool,
    column_set: usize,
    start: usize,
    end: usize,
}

/// A message that cannot become a row, and why.
#[derive(Debug)]
pub struct Rejected {
    pub message: usize,
    pub error: String,
}

/// The rows of a batch in COPY text form.
#[derive(Default)]
pub struct EncodedBatch {
    pub buf: Vec<u8>,
    pub rows: Vec<EncodedRow>,
    pub rejected: Vec<Rejected>,
    column_sets: Vec<ColumnSet>,
    scratch_set: ColumnSet,
}

impl EncodedBatch {
    /// The COPY text of `rows[range]`, which are consecutive lines.
    pub fn text(&self, range: Range<usize>) -> &[u8] {
        match (self.rows.get(range.start), range.end.checked_sub(1).and_then(|l| self.rows.get(l))) {
            (Some(first), Some(last)) if range.start < range.end => &self.buf[first.start..last.end],
            _ => &[],
        }
    }

    /// Splits `range` into runs of rows that fill the same columns, so that each run can be
    /// written with one COPY and a column list.
    pub fn runs(&self, range: Range<usize>) -> Vec<Range<usize>> {
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

    /// The COPY column list for the lines of a run.
    pub fn column_names<'s>(&self, shape: &'s TargetShape, run_row: usize) -> Vec<&'s str> {
        let set = &self.column_sets[self.rows[run_row].column_set];
        let mut names: Vec<&str> = shape
            .columns
            .iter()
            .filter(|c| c.data_slot.is_none_or(|s| set_contains(set, s)))
            .map(|c| c.info.name.as_str())
            .collect();
        if shape.mode == Mode::Upsert {
            names.extend([STAGING_ORDINAL, STAGING_TOMBSTONE]);
        }
        names
    }

    /// Encodes message number `index` of the batch, or records why it cannot become a row.
    pub fn push(&mut self, shape: &TargetShape, index: usize, msg: &Message) {
        let line_start = self.buf.len();
        match self.encode(shape, index, msg) {
            Ok(tombstone) => {
                self.buf.push(b'\n');
                let column_set = self.intern_scratch_set();
                self.rows.push(EncodedRow {
                    message: index,
                    tombstone,
                    column_set,
                    start: line_start,
                    end: self.buf.len(),
                });
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

    fn encode(&mut self, shape: &TargetShape, index: usize, msg: &Message) -> Result<bool, String> {
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
        Ok(tombstone)
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

#[cfg(test)]
mod tests;

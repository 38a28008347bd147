//! Which column of a table each part of a message fills, for a format and mode, and the
//! checks that the table can receive the messages at all.

use super::json::FieldNames;
use super::{Format, Mode};

/// How a value must be written for the column's type input function to accept it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ValueKind {
    /// `json` or `jsonb`: receives JSON text as sent.
    Json,
    Bytea,
    /// Any array type: a JSON array becomes an array literal.
    Array,
    Other,
}

/// Columns that receive a message's metadata rather than its content.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum MetaField {
    Topic,
    Partition,
    Offset,
    Key,
    Timestamp,
    Headers,
}

impl MetaField {
    pub(crate) fn from_column_name(name: &str) -> Option<MetaField> {
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
pub(crate) struct ColumnInfo {
    pub(crate) name: String,
    pub(crate) kind: ValueKind,
}

#[derive(Clone, Debug)]
pub(super) struct ShapeColumn {
    pub(super) info: ColumnInfo,
    pub(super) meta: Option<MetaField>,
    /// Index among the columns filled from message content.
    pub(super) data_slot: Option<usize>,
}

#[derive(Clone, Debug)]
pub(super) enum PayloadRule {
    /// JSON object keys map to columns by name.
    Object { fields: FieldNames },
    /// The whole payload goes to one column.
    Whole { slot: usize },
}

/// Where each part of a message goes in a given table, for a format and mode.
#[derive(Clone, Debug)]
pub(crate) struct TargetShape {
    pub(super) columns: Vec<ShapeColumn>,
    pub(super) data_count: usize,
    pub(super) payload: PayloadRule,
    pub(super) format: Format,
    pub(super) mode: Mode,
    /// Upsert: the columns that identify a row (indices into `columns`).
    pub(super) key_columns: Vec<usize>,
}

impl TargetShape {
    /// `columns` are the table's writable columns in table order (no dropped or generated
    /// ones). `key_columns` matters in upsert mode only. Errors name what does not fit.
    pub(crate) fn new(
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

    pub(crate) fn wants_headers(&self) -> bool {
        self.columns.iter().any(|c| c.meta == Some(MetaField::Headers))
    }

    pub(crate) fn mode(&self) -> Mode {
        self.mode
    }

    /// Names of the key columns (upsert mode).
    pub(crate) fn key_column_names(&self) -> impl Iterator<Item = &str> {
        self.key_columns.iter().map(|&i| self.columns[i].info.name.as_str())
    }

    /// Every writable column, in table order.
    pub(crate) fn all_columns(&self) -> impl Iterator<Item = &ColumnInfo> {
        self.columns.iter().map(|c| &c.info)
    }
}

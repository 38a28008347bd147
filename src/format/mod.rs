//! Turning Kafka messages into rows, in pure Rust with no database access: which column
//! each part of a message fills ([`shape`]), and the COPY text that carries a batch of rows
//! into PostgreSQL ([`encode`]). The subscription's options that decide it are here.

pub(crate) mod copy_text;
pub(crate) mod encode;
mod json;
pub(crate) mod shape;

pub(crate) use encode::{EncodedBatch, Message};
pub(crate) use shape::{ColumnInfo, TargetShape, ValueKind};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Format {
    Json,
    Text,
    Bytea,
    /// Change events (`{"op", "before", "after", ...}`, as publications and Debezium write
    /// them): `after` maps to columns like a JSON message; a delete removes its key's row.
    Change,
}

impl Format {
    pub(crate) const NAMES: &'static str = "'json', 'text', 'bytea' or 'change'";

    pub(crate) fn parse(s: &str) -> Option<Format> {
        [Format::Json, Format::Text, Format::Bytea, Format::Change].into_iter().find(|f| f.as_str() == s)
    }

    /// The name the SQL API and the catalog use.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Text => "text",
            Format::Bytea => "bytea",
            Format::Change => "change",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    Insert,
    /// Insert or update on the key columns; a message without a value deletes its key's row.
    Upsert,
}

impl Mode {
    pub(crate) const NAMES: &'static str = "'insert' or 'upsert'";

    pub(crate) fn parse(s: &str) -> Option<Mode> {
        [Mode::Insert, Mode::Upsert].into_iter().find(|m| m.as_str() == s)
    }

    /// The name the SQL API and the catalog use.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Insert => "insert",
            Mode::Upsert => "upsert",
        }
    }
}

/// Where a new subscription starts reading the partitions its topic has at its first start.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum StartFrom {
    Earliest,
    Latest,
}

impl StartFrom {
    pub(crate) const NAMES: &'static str = "'earliest' or 'latest'";

    pub(crate) fn parse(s: &str) -> Option<StartFrom> {
        [StartFrom::Earliest, StartFrom::Latest].into_iter().find(|m| m.as_str() == s)
    }

    /// The name the SQL API and the catalog use.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        }
    }
}

#[cfg(test)]
mod tests;

//! Change events: a decoded row change turned into a Kafka key and value.
//!
//! Key: a JSON object of the table's replica identity columns (its primary key by default).
//! Value: `{"op", "before", "after", "source": {...}}`, the envelope Kafka users know from
//! Debezium. Column values follow their type: numbers and booleans as JSON numbers and
//! booleans, `json`/`jsonb` embedded as JSON, `timestamptz` as RFC 3339 in UTC, everything
//! else as the type's text output (the worker runs with DateStyle ISO).
//! A TOASTed column that an update left unchanged is not in `after`: its name is listed in
//! `unchanged_toast` instead.

use crate::compat;
use crate::format::copy_text::civil_from_days;
use pgrx::pg_sys;
use std::collections::HashMap;
use std::ffi::CStr;

/// The transaction being replayed, as the reorder buffer describes it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TxnInfo {
    /// Start of the commit record: with `seq`, it orders every event.
    pub(crate) commit_lsn: u64,
    /// End of the commit record: where decoding may resume once the transaction is out.
    pub(crate) end_lsn: u64,
    pub(crate) xid: u32,
    pub(crate) commit_time: pg_sys::TimestampTz,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Insert,
    Update,
    Delete,
    /// A row read by a snapshot.
    Read,
}

impl Op {
    fn code(self) -> &'static str {
        match self {
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
        }
    }
}

/// What every event of a published table needs of its relation, worked out once and cached
/// until the relation cache is invalidated (a changed table is looked at again).
pub(crate) struct TableInfo {
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) topic: String,
    /// Per attribute, by its index in the tuple descriptor: its name as a JSON string.
    column_names: Vec<Vec<u8>>,
    /// Per attribute: whether it is a key column (replica identity, else primary key).
    key: Vec<bool>,
    /// REPLICA IDENTITY FULL: old rows carry every column.
    full_identity: bool,
}

impl TableInfo {
    /// # Safety
    /// `relation` must be an open relation.
    pub(crate) unsafe fn of(relation: pg_sys::Relation, template: &str) -> TableInfo {
        let schema = cstr_lossy(pg_sys::get_namespace_name((*(*relation).rd_rel).relnamespace));
        let table = cstr_lossy((*(*relation).rd_rel).relname.data.as_ptr());
        let topic = render_topic(template, &schema, &table);
        let identity = match pg_sys::RelationGetIdentityKeyBitmap(relation) {
            set if set.is_null() => {
                pg_sys::RelationGetIndexAttrBitmap(relation, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY)
            }
            set => set,
        };
        let tupdesc = (*relation).rd_att;
        let attrs: Vec<&pg_sys::FormData_pg_attribute> =
            (0..(*tupdesc).natts as usize).map(|i| compat::attribute(tupdesc, i)).collect();
        let column_names = attrs
            .iter()
            .map(|a| {
                let mut name = Vec::new();
                push_json_string(&mut name, &cstr_lossy(a.attname.data.as_ptr()));
                name
            })
            .collect();
        let key = attrs
            .iter()
            .map(|a| {
                let member = a.attnum as i32 - pg_sys::FirstLowInvalidHeapAttributeNumber;
                !identity.is_null() && pg_sys::bms_is_member(member, identity)
            })
            .collect();
        let full_identity = (*(*relation).rd_rel).relreplident as u8 == pg_sys::REPLICA_IDENTITY_FULL;
        TableInfo { schema, table, topic, column_names, key, full_identity }
    }

    /// The table's info for the rows of a query result with descriptor `result` whose
    /// columns are some of the table's, by name (`SELECT *` leaves dropped columns out).
    ///
    /// # Safety
    /// `relation` must be an open relation and `result` a live tuple descriptor.
    pub(crate) unsafe fn for_result(
        relation: pg_sys::Relation,
        result: pg_sys::TupleDesc,
        template: &str,
    ) -> TableInfo {
        let table = TableInfo::of(relation, template);
        let key_names: Vec<&Vec<u8>> =
            table.column_names.iter().zip(&table.key).filter(|(_, key)| **key).map(|(name, _)| name).collect();
        let column_names: Vec<Vec<u8>> = (0..(*result).natts as usize)
            .map(|i| {
                let mut name = Vec::new();
                push_json_string(&mut name, &cstr_lossy(compat::attribute(result, i).attname.data.as_ptr()));
                name
            })
            .collect();
        let key = column_names.iter().map(|name| key_names.contains(&name)).collect();
        TableInfo { column_names, key, ..table }
    }

    fn has_key(&self) -> bool {
        self.key.contains(&true)
    }

    /// Whether attribute `attribute` (an index in the tuple descriptor) is a key column.
    pub(crate) fn is_key(&self, attribute: usize) -> bool {
        self.key.get(attribute).copied().unwrap_or(false)
    }
}

/// The topic of a table under a template with `{schema}` and `{table}` placeholders.
pub(crate) fn render_topic(template: &str, schema: &str, table: &str) -> String {
    template.replace("{schema}", schema).replace("{table}", table)
}

#[derive(Clone, Copy)]
enum JsonKind {
    Bool,
    Integer,
    /// Numbers whose text output may also be NaN or Infinity, which JSON cannot carry.
    Number,
    Json,
    /// Written as RFC 3339 in UTC, whatever the session's DateStyle and TimeZone.
    TimestampTz,
    Text,
}

struct TypeOutput {
    kind: JsonKind,
    /// Output function, allocated in `TopMemoryContext`: lives as long as the process.
    function: *mut pg_sys::FmgrInfo,
}

/// Output functions by type, looked up once per type.
#[derive(Default)]
pub(crate) struct TypeCache(HashMap<pg_sys::Oid, TypeOutput>);

impl TypeCache {
    /// # Safety
    /// Inside a transaction (catalog lookups), on the main thread; `type_oid` is a type.
    unsafe fn get(&mut self, type_oid: pg_sys::Oid) -> &TypeOutput {
        self.0.entry(type_oid).or_insert_with(|| {
            let (mut function_oid, mut is_varlena) = (pg_sys::Oid::INVALID, false);
            pg_sys::getTypeOutputInfo(type_oid, &mut function_oid, &mut is_varlena);
            let function =
                pg_sys::MemoryContextAllocZero(pg_sys::TopMemoryContext, std::mem::size_of::<pg_sys::FmgrInfo>())
                    as *mut pg_sys::FmgrInfo;
            pg_sys::fmgr_info_cxt(function_oid, function, pg_sys::TopMemoryContext);
            let kind = match type_oid {
                pg_sys::BOOLOID => JsonKind::Bool,
                pg_sys::INT2OID | pg_sys::INT4OID | pg_sys::INT8OID | pg_sys::OIDOID => JsonKind::Integer,
                pg_sys::FLOAT4OID | pg_sys::FLOAT8OID | pg_sys::NUMERICOID => JsonKind::Number,
                pg_sys::JSONOID | pg_sys::JSONBOID => JsonKind::Json,
                pg_sys::TIMESTAMPTZOID => JsonKind::TimestampTz,
                _ => JsonKind::Text,
            };
            TypeOutput { kind, function }
        })
    }
}

/// Which columns of a tuple to write.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Columns {
    All,
    Key,
}

/// Builds keys and values into buffers that are reused from one event to the next.
#[derive(Default)]
pub(crate) struct EventWriter {
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
    types: TypeCache,
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    /// Attributes (by index) of the current row left out as unchanged TOAST values.
    unchanged: Vec<usize>,
    /// Whether values stored out of line are written (rows read from the table) rather
    /// than left out as unchanged (decoded changes).
    fetch_external: bool,
}

impl EventWriter {
    /// Writes the key and value of one row change. Allocates in the current memory context,
    /// which the caller resets after each change.
    ///
    /// # Safety
    /// `tupdesc` must describe the tuples, which must be valid heap tuples.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn row_change(
        &mut self,
        tupdesc: pg_sys::TupleDesc,
        info: &TableInfo,
        txn: &TxnInfo,
        seq: i64,
        op: Op,
        old: Option<*mut pg_sys::HeapTupleData>,
        new: Option<*mut pg_sys::HeapTupleData>,
    ) {
        self.row_change_head(tupdesc, info, op, old, new);
        finish_row_change(&mut self.value, txn, seq);
    }

    /// Writes the key, and the value of a row change up to its position in the stream,
    /// which [`finish_row_change`] adds: a snapshot's rows learn theirs only later.
    ///
    /// # Safety
    /// As [`EventWriter::row_change`].
    pub(crate) unsafe fn row_change_head(
        &mut self,
        tupdesc: pg_sys::TupleDesc,
        info: &TableInfo,
        op: Op,
        old: Option<*mut pg_sys::HeapTupleData>,
        new: Option<*mut pg_sys::HeapTupleData>,
    ) {
        // A snapshot reads rows from the table, where TOASTed values are stored out of line
        // and are to be fetched; in decoded changes such a pointer means "unchanged".
        self.fetch_external = op == Op::Read;
        // The key comes from the new row, or the old one for deletes (where only the
        // identity columns are known unless the identity is FULL).
        let mut buffer = std::mem::take(&mut self.key);
        buffer.clear();
        match new.or(old) {
            Some(tuple) if info.has_key() => self.write_row(&mut buffer, tupdesc, tuple, info, Columns::Key),
            _ => buffer.extend_from_slice(b"null"),
        }
        self.key = buffer;

        let mut out = std::mem::take(&mut self.value);
        out.clear();
        out.extend_from_slice(b"{\"op\":\"");
        out.extend_from_slice(op.code().as_bytes());
        out.extend_from_slice(b"\",\"before\":");
        match old {
            Some(tuple) => {
                let columns = if info.full_identity || !info.has_key() { Columns::All } else { Columns::Key };
                self.write_row(&mut out, tupdesc, tuple, info, columns);
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"after\":");
        self.unchanged.clear();
        match new {
            Some(tuple) => self.write_row(&mut out, tupdesc, tuple, info, Columns::All),
            None => out.extend_from_slice(b"null"),
        }
        if !self.unchanged.is_empty() {
            out.extend_from_slice(b",\"unchanged_toast\":[");
            for (n, &attribute) in self.unchanged.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                push_column_name(&mut out, tupdesc, info, attribute);
            }
            out.push(b']');
        }
        out.extend_from_slice(b",\"source\":{\"schema\":");
        push_json_string(&mut out, &info.schema);
        out.extend_from_slice(b",\"table\":");
        push_json_string(&mut out, &info.table);
        self.value = out;
    }

    /// Writes the value of a TRUNCATE of the table (events of a truncate have no key).
    pub(crate) fn truncate(&mut self, info: &TableInfo, txn: &TxnInfo, seq: i64) {
        let out = &mut self.value;
        out.clear();
        out.extend_from_slice(b"{\"op\":\"t\",\"before\":null,\"after\":null,\"source\":{\"schema\":");
        push_json_string(out, &info.schema);
        out.extend_from_slice(b",\"table\":");
        push_json_string(out, &info.table);
        finish_row_change(out, txn, seq);
    }

    /// The key of an old row, as [`EventWriter::row_change`] writes keys.
    ///
    /// # Safety
    /// `tuple` is a valid heap tuple of `tupdesc`; allocates in the current memory context.
    pub(crate) unsafe fn key_of(
        &mut self,
        tupdesc: pg_sys::TupleDesc,
        info: &TableInfo,
        tuple: *mut pg_sys::HeapTupleData,
    ) -> Vec<u8> {
        let mut key = Vec::new();
        self.write_row(&mut key, tupdesc, tuple, info, Columns::Key);
        key
    }

    /// # Safety
    /// `tuple` is a tuple of `tupdesc`, both alive for the call (the reorder buffer's, during
    /// a change callback); the current memory context is reset by the caller.
    unsafe fn write_row(
        &mut self,
        out: &mut Vec<u8>,
        tupdesc: pg_sys::TupleDesc,
        tuple: *mut pg_sys::HeapTupleData,
        info: &TableInfo,
        columns: Columns,
    ) {
        let natts = (*tupdesc).natts as usize;
        self.values.resize(natts, pg_sys::Datum::from(0));
        self.nulls.resize(natts, true);
        pg_sys::heap_deform_tuple(tuple, tupdesc, self.values.as_mut_ptr(), self.nulls.as_mut_ptr());
        out.push(b'{');
        let mut first = true;
        for i in 0..natts {
            let attr = compat::attribute(tupdesc, i);
            if attr.attisdropped || attr.attnum <= 0 {
                continue;
            }
            if columns == Columns::Key && !info.is_key(i) {
                continue;
            }
            let (datum, null) = (self.values[i], self.nulls[i]);
            if !null && attr.attlen == -1 && !self.fetch_external && is_external_ondisk(datum) {
                self.unchanged.push(i);
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            push_column_name(out, tupdesc, info, i);
            out.push(b':');
            if null {
                out.extend_from_slice(b"null");
                continue;
            }
            let output = self.types.get(attr.atttypid);
            match output.kind {
                JsonKind::Bool => out.extend_from_slice(if datum.value() != 0 { b"true" } else { b"false" }),
                JsonKind::Integer | JsonKind::Json => out.extend_from_slice(output_text(output, datum)),
                JsonKind::Number => {
                    let text = output_text(output, datum);
                    // NaN and the infinities have no JSON number: they go as strings.
                    if text.last().is_some_and(u8::is_ascii_digit) {
                        out.extend_from_slice(text);
                    } else {
                        push_json_string(out, &String::from_utf8_lossy(text));
                    }
                }
                JsonKind::TimestampTz => match datum.value() as i64 {
                    i64::MIN => out.extend_from_slice(b"\"-infinity\""),
                    i64::MAX => out.extend_from_slice(b"\"infinity\""),
                    t => push_json_string(out, &iso_timestamp(t)),
                },
                JsonKind::Text => push_json_string(out, &String::from_utf8_lossy(output_text(output, datum))),
            }
        }
        out.push(b'}');
    }
}

/// The name of attribute `attribute` as a JSON string, from the cache when it has it.
///
/// # Safety
/// `attribute` is an index of an attribute of `tupdesc`, a live tuple descriptor.
unsafe fn push_column_name(out: &mut Vec<u8>, tupdesc: pg_sys::TupleDesc, info: &TableInfo, attribute: usize) {
    match info.column_names.get(attribute) {
        Some(name) => out.extend_from_slice(name),
        None => {
            let attr = compat::attribute(tupdesc, attribute);
            push_json_string(out, &cstr_lossy(attr.attname.data.as_ptr()));
        }
    }
}

/// # Safety
/// `datum` is a non-null value of the type whose output function `output` holds; the text
/// is palloc'd in the current memory context and must not outlive its reset.
unsafe fn output_text<'a>(output: &TypeOutput, datum: pg_sys::Datum) -> &'a [u8] {
    CStr::from_ptr(pg_sys::OutputFunctionCall(output.function, datum)).to_bytes()
}

/// Whether a varlena datum points to a value stored out of line that decoding did not see
/// change: the reorder buffer leaves such pointers in place of unchanged TOASTed values.
///
/// # Safety
/// `datum` is a non-null varlena value (at least two readable bytes).
unsafe fn is_external_ondisk(datum: pg_sys::Datum) -> bool {
    let header = datum.cast_mut_ptr::<u8>();
    // A one-byte header of 0x01 marks an external pointer; the next byte is its tag.
    *header == 0x01 && *header.add(1) == pg_sys::vartag_external::VARTAG_ONDISK as u8
}

/// Ends the value of a row change written by [`EventWriter::row_change_head`] with its
/// position in the stream.
pub(crate) fn finish_row_change(value: &mut Vec<u8>, txn: &TxnInfo, seq: i64) {
    write_source_position(value, txn, seq);
    value.extend_from_slice(b"}}");
}

/// `,"lsn":...,"txid":...,"seq":...,"commit_time":"..."`: the position of an event.
pub(crate) fn write_source_position(out: &mut Vec<u8>, txn: &TxnInfo, seq: i64) {
    use std::io::Write;
    let _ = write!(
        out,
        ",\"lsn\":{},\"txid\":{},\"seq\":{},\"commit_time\":\"{}\"",
        txn.commit_lsn,
        txn.xid,
        seq,
        iso_timestamp(txn.commit_time)
    );
}

pub(crate) fn push_json_string(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01 UTC) as RFC 3339 in UTC.
pub(crate) fn iso_timestamp(t: pg_sys::TimestampTz) -> String {
    const POSTGRES_EPOCH_UNIX_SECONDS: i64 = 946_684_800;
    let micros = t.rem_euclid(1_000_000);
    let seconds = t.div_euclid(1_000_000) + POSTGRES_EPOCH_UNIX_SECONDS;
    let (days, secs_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    )
}

/// # Safety
/// `ptr` must point to a NUL-terminated string.
pub(crate) unsafe fn cstr_lossy(ptr: *const std::ffi::c_char) -> String {
    CStr::from_ptr(ptr).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_timestamps_in_utc() {
        assert_eq!(iso_timestamp(0), "2000-01-01T00:00:00.000000Z");
        // 2026-11-27 03:04:05.123456 UTC
        let t = (1_795_748_645 - 946_684_800) * 1_000_000 + 123_456;
        assert_eq!(iso_timestamp(t), "2026-11-27T03:04:05.123456Z");
        assert_eq!(iso_timestamp(-1), "1999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn renders_topic_templates() {
        assert_eq!(render_topic("{schema}.{table}", "public", "orders"), "public.orders");
        assert_eq!(render_topic("cdc-{table}", "s", "t"), "cdc-t");
    }
}

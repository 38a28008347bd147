//! Logical decoding inside the publication worker, and the extension's output plugin.
//!
//! The worker keeps one decoding context open on its slot (as a walsender does), so a
//! backlog is decoded once, not again on every call as with the SQL peek functions. The
//! output plugin's callbacks run in the worker's own process, on its main thread: they turn
//! each change into an event and hand it to a [`Sink`], the Kafka publisher.
//!
//! The plugin is also usable from SQL (`pg_logical_slot_peek_changes` on a slot created
//! with plugin `pg_kafka_bridge`): each event is then one JSON row, which is how the SQL
//! tests check the events without Kafka.

use super::events::{cstr_lossy, push_json_string, EventWriter, Op, TableInfo, TxnInfo};
use super::outbox::{self, Outgoing};
use crate::catalog::publication::Publication;
use crate::error::{BridgeError, Result};
use crate::worker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where decoded events go. Positions `(txn.commit_lsn, seq)` grow strictly in the order
/// of the calls, and are the same each time the same WAL is decoded.
pub trait Sink {
    fn event(&mut self, txn: &TxnInfo, seq: i64, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<()>;
    /// The transaction's last event has been handed over.
    fn commit(&mut self, txn: &TxnInfo) -> Result<()>;
}

/// What to publish from the slot's changes.
pub struct Selection {
    /// Tables whose changes are published.
    pub tables: HashSet<pg_sys::Oid>,
    /// Publication whose `kafka.send()` messages are published.
    pub publication_id: i32,
    pub topic_template: String,
}

impl Selection {
    pub fn of(publication: &Publication) -> Selection {
        Selection {
            tables: publication.tables.iter().copied().collect(),
            publication_id: publication.id,
            topic_template: publication.topic.clone(),
        }
    }
}

/// The plugin's state in one decoding context.
pub struct PluginState {
    /// `None`: every table and every `kafka.send()` message (SQL use of the plugin).
    selection: Option<Selection>,
    sink: Box<dyn Sink>,
    txn: TxnInfo,
    next_seq: i64,
    tables: HashMap<pg_sys::Oid, TableInfo>,
    writer: EventWriter,
    /// Reset after each change, so that a transaction of any size leaves nothing behind.
    change_context: pg_sys::MemoryContext,
}

impl PluginState {
    pub fn new(selection: Option<Selection>, sink: Box<dyn Sink>) -> PluginState {
        let change_context = unsafe {
            pg_sys::AllocSetContextCreateInternal(
                pg_sys::TopMemoryContext,
                c"pg_kafka_bridge change".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        PluginState {
            selection,
            sink,
            txn: TxnInfo::default(),
            next_seq: 0,
            tables: HashMap::new(),
            writer: EventWriter::default(),
            change_context,
        }
    }

    fn template(&self) -> &str {
        self.selection.as_ref().map_or("{schema}.{table}", |s| s.topic_template.as_str())
    }
}

impl Drop for PluginState {
    fn drop(&mut self) {
        unsafe { pg_sys::MemoryContextDelete(self.change_context) };
    }
}

static RELCACHE_CHANGED: AtomicBool = AtomicBool::new(false);

#[pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    RELCACHE_CHANGED.store(true, Ordering::Relaxed);
}

/// Entry point PostgreSQL looks up when a slot uses plugin `pg_kafka_bridge`.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(callbacks: *mut pg_sys::OutputPluginCallbacks) {
    let cb = &mut *callbacks;
    cb.startup_cb = Some(startup);
    cb.begin_cb = Some(begin);
    cb.change_cb = Some(change);
    cb.commit_cb = Some(commit);
    cb.message_cb = Some(message);
    cb.shutdown_cb = Some(shutdown);
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    options: *mut pg_sys::OutputPluginOptions,
    is_init: bool,
) {
    (*options).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_TEXTUAL_OUTPUT;
    if !(*ctx).output_plugin_options.is_null() {
        BridgeError::InvalidParameter("the pg_kafka_bridge output plugin takes no options".into()).raise();
    }
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if !REGISTERED.swap(true, Ordering::Relaxed) {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0));
    }
    // The worker puts its own state in place; SQL use shows what the publication owning the
    // slot would publish, if there is one.
    let selection = if is_init || !pg_sys::IsTransactionState() { None } else { sql_selection() };
    let state = Box::new(PluginState::new(selection, Box::new(SqlOutput { ctx })));
    (*ctx).output_plugin_private = Box::into_raw(state).cast();
}

unsafe fn sql_selection() -> Option<Selection> {
    let slot_name = cstr_lossy((*pg_sys::MyReplicationSlot).data.name.data.as_ptr());
    let publication = crate::security::as_catalog_owner(|| Publication::by_slot_name(&slot_name)).ok()??;
    Some(Selection::of(&publication))
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(ctx: *mut pg_sys::LogicalDecodingContext) {
    let state = std::mem::replace(&mut (*ctx).output_plugin_private, std::ptr::null_mut());
    if !state.is_null() {
        drop(Box::from_raw(state.cast::<PluginState>()));
    }
}

unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut PluginState {
    &mut *(*ctx).output_plugin_private.cast::<PluginState>()
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(ctx: *mut pg_sys::LogicalDecodingContext, txn: *mut pg_sys::ReorderBufferTXN) {
    let state = state(ctx);
    state.txn = TxnInfo {
        commit_lsn: (*txn).final_lsn,
        end_lsn: (*txn).end_lsn,
        xid: (*txn).xid.into(),
        commit_time: (*txn).xact_time.commit_time,
    };
    state.next_seq = 0;
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
    let state = state(ctx);
    let txn = state.txn;
    state.sink.commit(&txn).unwrap_or_else(|e| e.raise());
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    relation: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    let state = state(ctx);
    let relid = (*relation).rd_id;
    if state.selection.as_ref().is_some_and(|s| !s.tables.contains(&relid)) {
        return;
    }
    let tuples = &(*change).data.tp;
    let tuple = |buf: *mut pg_sys::ReorderBufferTupleBuf| (!buf.is_null()).then(|| &raw mut (*buf).tuple);
    let (op, old, new) = match (*change).action {
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT => (Op::Insert, None, tuple(tuples.newtuple)),
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE => {
            (Op::Update, tuple(tuples.oldtuple), tuple(tuples.newtuple))
        }
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE => (Op::Delete, tuple(tuples.oldtuple), None),
        _ => return,
    };
    if RELCACHE_CHANGED.swap(false, Ordering::Relaxed) {
        state.tables.clear();
    }
    let seq = state.next_seq;
    state.next_seq += 1;
    let previous = pg_sys::MemoryContextSwitchTo(state.change_context);
    if !state.tables.contains_key(&relid) {
        let info = TableInfo::of(relation, state.template());
        state.tables.insert(relid, info);
    }
    let info = &state.tables[&relid];
    state.writer.row_change(relation, info, &state.txn, seq, op, old, new);
    pg_sys::MemoryContextSwitchTo(previous);
    pg_sys::MemoryContextReset(state.change_context);
    let txn = state.txn;
    let writer = &state.writer;
    state.sink.event(&txn, seq, &info.topic, Some(&writer.key), Some(&writer.value)).unwrap_or_else(|e| e.raise());
}

#[pg_guard]
unsafe extern "C-unwind" fn message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _message_lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    size: pg_sys::Size,
    content: *const std::ffi::c_char,
) {
    // kafka.send() writes transactional messages only; anything else is not ours.
    if !transactional || txn.is_null() || CStr::from_ptr(prefix).to_bytes() != outbox::PREFIX.as_bytes() {
        return;
    }
    let state = state(ctx);
    let bytes = std::slice::from_raw_parts(content.cast::<u8>(), size);
    let Some(outgoing) = Outgoing::decode(bytes) else {
        return;
    };
    if state.selection.as_ref().is_some_and(|s| s.publication_id != outgoing.publication_id) {
        return;
    }
    let seq = state.next_seq;
    state.next_seq += 1;
    let txn = state.txn;
    state.sink.event(&txn, seq, outgoing.topic, outgoing.key, outgoing.value).unwrap_or_else(|e| e.raise());
}

/// SQL use of the plugin: each event becomes one row of JSON with its topic, key and value.
struct SqlOutput {
    ctx: *mut pg_sys::LogicalDecodingContext,
}

impl Sink for SqlOutput {
    fn event(&mut self, _txn: &TxnInfo, seq: i64, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<()> {
        let mut line = Vec::new();
        line.extend_from_slice(b"{\"topic\":");
        push_json_string(&mut line, topic);
        for (name, bytes) in [("key", key), ("value", value)] {
            line.extend_from_slice(format!(",\"{name}\":").as_bytes());
            match bytes {
                // Events are JSON already; kafka.send() payloads may be anything.
                Some(b) if serde_json::from_slice::<serde::de::IgnoredAny>(b).is_ok() => line.extend_from_slice(b),
                Some(b) => match std::str::from_utf8(b) {
                    Ok(text) if !text.contains('\0') => push_json_string(&mut line, text),
                    // Binary, shown the way bytea is.
                    _ => {
                        let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
                        push_json_string(&mut line, &format!("\\x{hex}"));
                    }
                },
                None => line.extend_from_slice(b"null"),
            }
        }
        line.extend_from_slice(format!(",\"seq\":{seq}}}").as_bytes());
        unsafe {
            pg_sys::OutputPluginPrepareWrite(self.ctx, true);
            let out = (*self.ctx).out;
            pg_sys::appendBinaryStringInfo(out, line.as_ptr().cast(), line.len() as i32);
            pg_sys::OutputPluginWrite(self.ctx, true);
        }
        Ok(())
    }

    fn commit(&mut self, _txn: &TxnInfo) -> Result<()> {
        Ok(())
    }
}

// Exported by the server. pgrx does not declare the first, and wraps the others in Rust
// functions, while the WAL reader needs the C functions themselves.
extern "C-unwind" {
    fn LogicalDecodingProcessRecord(ctx: *mut pg_sys::LogicalDecodingContext, record: *mut pg_sys::XLogReaderState);
    fn read_local_xlog_page(
        state: *mut pg_sys::XLogReaderState,
        target_page: pg_sys::XLogRecPtr,
        request_length: std::ffi::c_int,
        target_record: pg_sys::XLogRecPtr,
        buffer: *mut std::ffi::c_char,
    ) -> std::ffi::c_int;
    fn wal_segment_open(
        state: *mut pg_sys::XLogReaderState,
        segment: pg_sys::XLogSegNo,
        timeline: *mut pg_sys::TimeLineID,
    );
    fn wal_segment_close(state: *mut pg_sys::XLogReaderState);
}

/// An open decoding context on an acquired slot. Dropping it releases the slot.
pub struct Decoder {
    ctx: *mut pg_sys::LogicalDecodingContext,
    slot_name: String,
}

impl Decoder {
    /// Acquires the slot (failing if another process holds it) and opens a decoding
    /// context at its confirmed position, with `state` for the plugin.
    pub fn open(slot_name: &str, state: PluginState) -> Result<Decoder> {
        let name = CString::new(slot_name).map_err(|_| BridgeError::InvalidParameter("bad slot name".into()))?;
        worker::catch(|| unsafe {
            pg_sys::ReplicationSlotAcquire(name.as_ptr(), true);
            Ok(())
        })?;
        let mut decoder = Decoder { ctx: std::ptr::null_mut(), slot_name: slot_name.to_owned() };
        worker::catch(|| unsafe {
            let mut routine = pg_sys::XLogReaderRoutine {
                page_read: Some(read_local_xlog_page),
                segment_open: Some(wal_segment_open),
                segment_close: Some(wal_segment_close),
            };
            let ctx = pg_sys::CreateDecodingContext(
                0,
                std::ptr::null_mut(),
                false,
                &mut routine,
                Some(ignore_prepare_write),
                Some(ignore_write),
                None,
            );
            decoder.ctx = ctx;
            if CStr::from_ptr((*(*ctx).slot).data.plugin.data.as_ptr()).to_bytes() != b"pg_kafka_bridge" {
                return Err(BridgeError::NotInPrerequisiteState(format!(
                    "replication slot \"{slot_name}\" does not use the pg_kafka_bridge output plugin"
                )));
            }
            // Replace the state the startup callback made for SQL use.
            drop(Box::from_raw((*ctx).output_plugin_private.cast::<PluginState>()));
            (*ctx).output_plugin_private = Box::into_raw(Box::new(state)).cast();
            pg_sys::XLogBeginRead((*ctx).reader, (*pg_sys::MyReplicationSlot).data.restart_lsn);
            pg_sys::InvalidateSystemCaches();
            Ok(())
        })?;
        Ok(decoder)
    }

    /// Decodes the WAL flushed so far, for up to `budget`. Returns whether it reached the
    /// end of the flushed WAL.
    pub fn read(&mut self, budget: Duration) -> Result<bool> {
        let deadline = Instant::now() + budget;
        worker::catch(|| unsafe {
            let reader = (*self.ctx).reader;
            let flushed = pg_sys::GetFlushRecPtr(std::ptr::null_mut());
            let mut records = 0u32;
            // The reader advances `EndRecPtr` behind the compiler's back.
            while std::ptr::read_volatile(&raw const (*reader).EndRecPtr) < flushed {
                let mut error: *mut std::ffi::c_char = std::ptr::null_mut();
                let record = pg_sys::XLogReadRecord(reader, &mut error);
                if !error.is_null() {
                    return Err(BridgeError::NotInPrerequisiteState(format!(
                        "could not read WAL for logical decoding: {}",
                        cstr_lossy(error)
                    )));
                }
                if !record.is_null() {
                    LogicalDecodingProcessRecord(self.ctx, reader);
                }
                records += 1;
                if records.is_multiple_of(256) {
                    pg_sys::check_for_interrupts!();
                    if Instant::now() >= deadline {
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        })
    }

    /// End of the last record decoded.
    pub fn decoded_up_to(&self) -> u64 {
        unsafe { (*(*self.ctx).reader).EndRecPtr }
    }

    /// Tells the slot that everything before `lsn` is published: the WAL before it may go.
    pub fn confirm(&mut self, lsn: u64) -> Result<()> {
        worker::catch(|| unsafe {
            let slot = pg_sys::MyReplicationSlot;
            if lsn > (*slot).data.confirmed_flush {
                pg_sys::LogicalConfirmReceivedLocation(lsn);
                // Written out at the next checkpoint even if the restart point did not move.
                pg_sys::ReplicationSlotMarkDirty();
            }
            Ok(())
        })
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        let ctx = self.ctx;
        let outcome = worker::catch(|| unsafe {
            if !ctx.is_null() {
                pg_sys::FreeDecodingContext(ctx);
            }
            if !pg_sys::MyReplicationSlot.is_null() {
                pg_sys::ReplicationSlotRelease();
            }
            pg_sys::InvalidateSystemCaches();
            Ok(())
        });
        if let Err(e) = outcome {
            // The process cannot go on with a slot it cannot release: exit, and let the
            // launcher start a fresh worker.
            pgrx::log!("pg_kafka_bridge: could not release slot \"{}\": {e}", self.slot_name);
            unsafe { pg_sys::proc_exit(1) };
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn ignore_prepare_write(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _lsn: pg_sys::XLogRecPtr,
    _xid: pg_sys::TransactionId,
    _last_write: bool,
) {
}

#[pg_guard]
unsafe extern "C-unwind" fn ignore_write(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _lsn: pg_sys::XLogRecPtr,
    _xid: pg_sys::TransactionId,
    _last_write: bool,
) {
}

//! The extension's logical decoding output plugin.
//!
//! Its callbacks run in the process that decodes, on its main thread: in the publication
//! worker (see [`super::decoder`]) they turn each change into an event and hand it to a
//! [`Sink`], the Kafka publisher. The plugin is also usable from SQL
//! (`pg_logical_slot_peek_changes` on a slot created with plugin `pg_kafka_bridge`): each
//! event is then one JSON row, which is how the SQL tests check the events without Kafka.

use super::events::{cstr_lossy, finish_row_change, push_json_string, EventWriter, Op, TableInfo, TxnInfo};
use super::outbox::{self, Outgoing};
use super::snapshot::{self, Mark, SnapshotCursor, Window};
use crate::catalog::publication::Publication;
use crate::error::{BridgeError, Result};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};

/// The plugin's name, in `pg_create_logical_replication_slot(slot, PLUGIN)`: the name of the
/// extension's library.
pub(crate) const PLUGIN: &str = "pg_kafka_bridge";

/// Where decoded events go. Positions `(txn.commit_lsn, seq)` grow strictly in the order
/// of the calls, and are the same each time the same WAL is decoded.
pub(crate) trait Sink: Any {
    fn event(&mut self, txn: &TxnInfo, seq: i64, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<()>;
    /// The transaction's last event has been handed over.
    fn commit(&mut self, txn: &TxnInfo) -> Result<()>;
    /// The events up to [`Sink::end_chunk`] are the rows of one snapshot chunk: they are
    /// published together or not at all.
    fn begin_chunk(&mut self) -> Result<()> {
        Ok(())
    }
    /// The chunk's rows are handed over; `cursor` is where its snapshot stands after them,
    /// and `txn` the transaction of the chunk's high watermark.
    fn end_chunk(&mut self, _txn: &TxnInfo, _cursor: SnapshotCursor) -> Result<()> {
        Ok(())
    }
    /// An event for every partition of `topic` (a TRUNCATE: whichever partition a
    /// consumer reads, it sees it in order with that partition's rows).
    fn event_to_every_partition(&mut self, txn: &TxnInfo, seq: i64, topic: &str, value: &[u8]) -> Result<()> {
        self.event(txn, seq, topic, None, Some(value))
    }
    /// A change that is not published went by: a long replay of such changes is a chance to
    /// serve signals and commit what is open.
    fn skipped(&mut self) -> Result<()> {
        Ok(())
    }
    /// The sink as its own type, for the worker that put it in place.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// What to publish from the slot's changes.
pub(crate) struct Selection {
    /// Tables whose changes are published.
    pub(crate) tables: HashSet<pg_sys::Oid>,
    /// Publication whose `kafka.send()` messages are published.
    pub(crate) publication_id: i32,
    pub(crate) topic_template: String,
}

impl Selection {
    pub(crate) fn of(publication: &Publication) -> Selection {
        Selection {
            tables: publication.tables.iter().copied().collect(),
            publication_id: publication.id,
            topic_template: publication.topic.clone(),
        }
    }
}

/// What the worker hands to the startup callback of the decoding context it creates next:
/// what to publish, and where to. Without it, the plugin serves SQL.
pub(crate) struct WorkerSetup {
    pub(crate) selection: Selection,
    pub(crate) sink: Box<dyn Sink>,
}

thread_local! {
    static WORKER_SETUP: RefCell<Option<WorkerSetup>> = const { RefCell::new(None) };
}

/// Makes the next decoding context this process creates use `setup` (see [`startup`]).
/// Returns a guard that withdraws it if the context was not created.
pub(crate) fn offer_worker_setup(setup: WorkerSetup) -> impl Drop {
    WORKER_SETUP.with(|s| *s.borrow_mut() = Some(setup));
    struct Withdraw;
    impl Drop for Withdraw {
        fn drop(&mut self) {
            WORKER_SETUP.with(|s| s.borrow_mut().take());
        }
    }
    Withdraw
}

// Exported by the server, not declared by pgrx; called behind pgrx's FFI guard (the
// callbacks calling it are #[pg_guard]).
// SAFETY: the signature is that of catalog/partition.h in every supported version.
extern "C-unwind" {
    fn get_partition_ancestors(relid: pg_sys::Oid) -> *mut pg_sys::List;
}

/// The plugin's state in one decoding context.
pub(crate) struct PluginState {
    /// `None`: every table and every `kafka.send()` message (SQL use of the plugin).
    selection: Option<Selection>,
    pub(crate) sink: Box<dyn Sink>,
    txn: TxnInfo,
    next_seq: i64,
    tables: HashMap<pg_sys::Oid, TableInfo>,
    /// Per partition: the published partitioned table its changes are published as, if any.
    roots: HashMap<pg_sys::Oid, Option<pg_sys::Oid>>,
    writer: EventWriter,
    /// Reset after each change, so that a transaction of any size leaves nothing behind.
    change_context: pg_sys::MemoryContext,
    /// The snapshot chunk being interleaved with the changes, if any (worker use only).
    pub(crate) window: Option<Window>,
    /// Set when a chunk was handed to the sink: the decoder stops there, so that the
    /// worker commits it before it reads the next.
    pub(crate) chunk_emitted: bool,
}

impl PluginState {
    /// # Safety
    /// `ctx` is the decoding context being started, whose memory context outlives the state
    /// (its shutdown callback drops the state before the context is freed).
    unsafe fn new(
        ctx: *mut pg_sys::LogicalDecodingContext,
        selection: Option<Selection>,
        sink: Box<dyn Sink>,
    ) -> PluginState {
        // SAFETY: a child of the decoding context's memory context, as contrib/test_decoding
        // makes its own; deleted by the state's Drop, or with its parent.
        let change_context = unsafe {
            pg_sys::AllocSetContextCreateInternal(
                (*ctx).context,
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
            roots: HashMap::new(),
            writer: EventWriter::default(),
            change_context,
            window: None,
            chunk_emitted: false,
        }
    }

    fn template(&self) -> &str {
        self.selection.as_ref().map_or("{schema}.{table}", |s| s.topic_template.as_str())
    }

    /// The published table whose events `relation`'s changes are: itself, or the topmost
    /// published partitioned table it is a partition of (as PostgreSQL's
    /// `publish_via_partition_root`); `None` if it is not published.
    ///
    /// # Safety
    /// `relation` is an open relation; called from a decoding callback (catalog access).
    unsafe fn published_as(&mut self, relation: pg_sys::Relation) -> Option<pg_sys::Oid> {
        let relid = (*relation).rd_id;
        let selection = match &self.selection {
            Some(s) if !s.tables.contains(&relid) => s,
            _ => return Some(relid),
        };
        if !(*(*relation).rd_rel).relispartition {
            return None;
        }
        if let Some(root) = self.roots.get(&relid) {
            return *root;
        }
        let ancestors = get_partition_ancestors(relid);
        let mut root = None;
        if !ancestors.is_null() {
            for i in 0..(*ancestors).length as usize {
                // Nearest first: the last published one is the topmost.
                let ancestor = (*(*ancestors).elements.add(i)).oid_value;
                if selection.tables.contains(&ancestor) {
                    root = Some(ancestor);
                }
            }
            pg_sys::list_free(ancestors);
        }
        self.roots.insert(relid, root);
        root
    }

    /// Forgets what was worked out of relations once the relation cache changed (a table
    /// altered, a partition attached or detached).
    fn forget_relations_if_changed(&mut self) {
        if RELCACHE_CHANGED.swap(false, Ordering::Relaxed) {
            self.tables.clear();
            self.roots.clear();
        }
    }
}

impl Drop for PluginState {
    fn drop(&mut self) {
        // SAFETY: the context was created in `new` and is deleted only here; its parent, the
        // decoding context's, is freed after the shutdown callback drops this state.
        unsafe { pg_sys::MemoryContextDelete(self.change_context) };
    }
}

static RELCACHE_CHANGED: AtomicBool = AtomicBool::new(false);

/// # Safety
/// A relcache invalidation callback: PostgreSQL calls it on this process's main thread.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    RELCACHE_CHANGED.store(true, Ordering::Relaxed);
}

/// Entry point PostgreSQL looks up when a slot uses plugin `pg_kafka_bridge`.
///
/// # Safety
/// Called by PostgreSQL's output plugin loader with a valid, writable callback struct.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(callbacks: *mut pg_sys::OutputPluginCallbacks) {
    let cb = &mut *callbacks;
    cb.startup_cb = Some(startup);
    cb.begin_cb = Some(begin);
    cb.change_cb = Some(change);
    cb.truncate_cb = Some(truncate);
    cb.commit_cb = Some(commit);
    cb.message_cb = Some(message);
    cb.shutdown_cb = Some(shutdown);
}

/// # Safety
/// Called by the decoding machinery with the context being created and its options struct.
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
    // The worker offers its own setup; SQL use shows what the publication owning the slot
    // would publish, if there is one.
    let state = match WORKER_SETUP.with(|s| s.borrow_mut().take()) {
        Some(setup) => PluginState::new(ctx, Some(setup.selection), setup.sink),
        None => {
            let selection = if is_init || !pg_sys::IsTransactionState() { None } else { sql_selection() };
            PluginState::new(ctx, selection, Box::new(SqlOutput { ctx }))
        }
    };
    (*ctx).output_plugin_private = Box::into_raw(Box::new(state)).cast();
}

/// # Safety
/// Inside a transaction, with `MyReplicationSlot` acquired (decoding has started).
unsafe fn sql_selection() -> Option<Selection> {
    let slot_name = cstr_lossy((*pg_sys::MyReplicationSlot).data.name.data.as_ptr());
    let publication = crate::security::as_catalog_owner(|| Publication::by_slot_name(&slot_name)).ok()??;
    Some(Selection::of(&publication))
}

/// # Safety
/// Called once by `FreeDecodingContext` with a context this plugin started; the state
/// pointer is then taken and dropped exactly once.
#[pg_guard]
unsafe extern "C-unwind" fn shutdown(ctx: *mut pg_sys::LogicalDecodingContext) {
    let state = std::mem::replace(&mut (*ctx).output_plugin_private, std::ptr::null_mut());
    if !state.is_null() {
        drop(Box::from_raw(state.cast::<PluginState>()));
    }
}

/// # Safety
/// `ctx` is a decoding context of this plugin that was started and not yet shut down.
pub(crate) unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut PluginState {
    &mut *(*ctx).output_plugin_private.cast::<PluginState>()
}

/// # Safety
/// Called by the reorder buffer during decoding, with a context this plugin started and
/// pointers that are valid for the call.
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

/// # Safety
/// Called by the reorder buffer during decoding, with a context this plugin started and
/// pointers that are valid for the call.
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

/// # Safety
/// Called by the reorder buffer during decoding, with a context this plugin started and
/// pointers that are valid for the call.
#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    relation: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    let state = state(ctx);
    state.forget_relations_if_changed();
    let Some(published) = state.published_as(relation) else {
        state.sink.skipped().unwrap_or_else(|e| e.raise());
        return;
    };
    let op = match (*change).action {
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT => Op::Insert,
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE => Op::Update,
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE => Op::Delete,
        _ => return,
    };
    let [mut old, mut new] = crate::compat::change_tuples(change);
    let seq = state.next_seq;
    state.next_seq += 1;
    let previous = pg_sys::MemoryContextSwitchTo(state.change_context);
    // A partition's change is published as a change of its published root: its tuples
    // become tuples of the root's row type (columns matched by name).
    let root = (published != (*relation).rd_id).then(|| pg_sys::RelationIdGetRelation(published));
    let described = root.unwrap_or(relation);
    if let Some(root) = root {
        let map = pg_sys::convert_tuples_by_name((*relation).rd_att, (*root).rd_att);
        if !map.is_null() {
            old = old.map(|t| pg_sys::execute_attr_map_tuple(t, map));
            new = new.map(|t| pg_sys::execute_attr_map_tuple(t, map));
        }
    }
    if !state.tables.contains_key(&published) {
        let info = TableInfo::of(described, state.template());
        state.tables.insert(published, info);
    }
    let info = &state.tables[&published];
    let tupdesc = (*described).rd_att;
    state.writer.row_change(tupdesc, info, &state.txn, seq, op, old, new);
    if let Some(window) = state.window.as_mut().filter(|w| w.watches(published)) {
        // A change of a key in a chunk's window is newer than the chunk's read of it.
        window.changed(&state.writer.key);
        if let (Op::Update, Some(old)) = (op, old) {
            window.changed(&state.writer.key_of(tupdesc, info, old));
        }
    }
    if let Some(root) = root {
        pg_sys::RelationClose(root);
    }
    pg_sys::MemoryContextSwitchTo(previous);
    pg_sys::MemoryContextReset(state.change_context);
    let txn = state.txn;
    let writer = &state.writer;
    state.sink.event(&txn, seq, &info.topic, Some(&writer.key), Some(&writer.value)).unwrap_or_else(|e| e.raise());
}

/// One event per truncated table that is published.
///
/// # Safety
/// Called by the reorder buffer during decoding, with a context this plugin started and
/// `relations` pointing to `count` open relations, valid for the call.
#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    count: std::ffi::c_int,
    relations: *mut pg_sys::Relation,
    _change: *mut pg_sys::ReorderBufferChange,
) {
    let state = state(ctx);
    state.forget_relations_if_changed();
    // Truncating a partitioned table truncates its partitions: one event for the root.
    let mut done = HashSet::new();
    for i in 0..count.max(0) as usize {
        let relation = *relations.add(i);
        let Some(published) = state.published_as(relation) else {
            continue;
        };
        if !done.insert(published) {
            continue;
        }
        if let Some(window) = state.window.as_mut().filter(|w| w.watches(published)) {
            // Every row the chunk in flight read may be gone: none of them is published.
            window.truncated();
        }
        if !state.tables.contains_key(&published) {
            let root = (published != (*relation).rd_id).then(|| pg_sys::RelationIdGetRelation(published));
            let info = TableInfo::of(root.unwrap_or(relation), state.template());
            if let Some(root) = root {
                pg_sys::RelationClose(root);
            }
            state.tables.insert(published, info);
        }
        let info = &state.tables[&published];
        let seq = state.next_seq;
        state.next_seq += 1;
        let txn = state.txn;
        state.writer.truncate(info, &txn, seq);
        let value = &state.writer.value;
        state.sink.event_to_every_partition(&txn, seq, &info.topic, value).unwrap_or_else(|e| e.raise());
    }
}

/// # Safety
/// Called by the reorder buffer during decoding, with a context this plugin started and
/// pointers that are valid for the call.
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
    // The extension writes transactional messages only; anything else is not ours.
    if !transactional || txn.is_null() {
        return;
    }
    let prefix = CStr::from_ptr(prefix).to_bytes();
    let state = state(ctx);
    if prefix == snapshot::MARK_PREFIX.to_bytes() {
        let bytes = std::slice::from_raw_parts(content.cast::<u8>(), size);
        if let Some(mark) = Mark::decode(bytes) {
            snapshot_mark(state, mark).unwrap_or_else(|e| e.raise());
        }
        return;
    }
    if prefix != outbox::PREFIX.to_bytes() {
        return;
    }
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

/// A snapshot watermark was decoded: if it is the high watermark of the chunk in flight,
/// the chunk's rows whose keys did not change in its window are published here, at the
/// watermark's place in the stream; either way a new window opens.
fn snapshot_mark(state: &mut PluginState, mark: Mark) -> Result<()> {
    let Some(window) = state.window.as_mut().filter(|w| w.is_of(&mark)) else {
        return Ok(());
    };
    let Some(chunk) = window.close(mark.number) else {
        return Ok(());
    };
    let txn = state.txn;
    state.sink.begin_chunk()?;
    let mut value = Vec::new();
    let mut published = 0;
    for row in &chunk.rows {
        if window.was_changed(&row.key) {
            continue;
        }
        value.clear();
        value.extend_from_slice(&row.head);
        let seq = state.next_seq;
        state.next_seq += 1;
        finish_row_change(&mut value, &txn, seq);
        state.sink.event(&txn, seq, &chunk.topic, Some(&row.key), Some(&value))?;
        published += 1;
    }
    window.reopen();
    let mut cursor = chunk.cursor;
    cursor.rows += published;
    state.sink.end_chunk(&txn, cursor)?;
    state.chunk_emitted = true;
    Ok(())
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
        // SAFETY: called from a change or message callback of `self.ctx`, the context of the
        // SQL call that is decoding; `line` is alive for the call, which copies it.
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

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

//! Snapshots: publishing the rows a table already holds, interleaved with its live changes,
//! without a long-running transaction (the watermark algorithm of DBLog).
//!
//! The worker reads a table in key order in chunks, each in its own short transaction,
//! which ends by writing a watermark (a transactional logical message) to the WAL. The
//! chunk's read happened after the previous watermark committed and before this one did,
//! so when decoding reaches this watermark, every change committed between the two has
//! been published, and each of the chunk's rows is as new as those changes, except the
//! rows whose keys those changes touched: their change events are newer than the chunk's
//! read. The chunk's other rows are published right there, as events with op `r`, in the
//! watermark's transaction. Applying the stream in order therefore never lets a row read
//! by the snapshot overwrite a newer change of its key.
//!
//! Exactly once: a chunk's events and the snapshot's cursor (table, run, last key) go into
//! one Kafka transaction with the progress record. A new session resumes after the cursor
//! of the last committed progress record, with watermarks of its own (those of earlier
//! sessions, decoded again, are ignored), so a chunk whose transaction was lost is read
//! and published again, and one that committed never is.

use super::events::{cstr_lossy, EventWriter, Op, TableInfo};
use crate::catalog::req;
use crate::catalog::snapshot::{self as queue, SnapshotTask};
use crate::error::{BridgeError, Result};
use crate::security;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::ffi::CString;
use std::time::{Duration, Instant};

/// Prefix of the watermark messages.
pub(crate) const MARK_PREFIX: &std::ffi::CStr = c"pg_kafka_bridge.snapshot";
/// Most bytes of events in one chunk: wide rows make smaller chunks. (A chunk is read while
/// the producer still holds the previous one.)
const CHUNK_BYTES: usize = 8 << 20;
/// Rows fetched from the cursor at a time.
const FETCH_ROWS: i64 = 200;
/// How often a publication without a snapshot to take looks for a new request.
const QUEUE_POLL: Duration = Duration::from_secs(1);

/// Where a snapshot run stands in Kafka: its table and run, the key of the last row read
/// (its columns' text), and how many rows it published. Carried by every progress record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotCursor {
    pub(crate) table: u32,
    pub(crate) run: i32,
    pub(crate) after: Option<Vec<String>>,
    pub(crate) rows: i64,
    pub(crate) done: bool,
}

impl SnapshotCursor {
    fn is_of(&self, task: SnapshotTask) -> bool {
        self.table == u32::from(task.table) && self.run == task.run
    }
}

/// A watermark: which worker session wrote it (earlier sessions' marks are ignored), for
/// which publication, and its number in the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mark {
    pub(crate) publication_id: i32,
    pub(crate) session: u64,
    pub(crate) number: u64,
}

impl Mark {
    fn encode(&self) -> Vec<u8> {
        format!("{} {} {}", self.publication_id, self.session, self.number).into_bytes()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Mark> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(' ');
        let mark = Mark {
            publication_id: parts.next()?.parse().ok()?,
            session: parts.next()?.parse().ok()?,
            number: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(mark)
    }
}

/// One row read by a snapshot: its event's key, and its value up to its position.
pub(crate) struct ChunkRow {
    pub(crate) key: Vec<u8>,
    pub(crate) head: Vec<u8>,
}

/// Rows read between two watermarks, waiting for decoding to reach the second.
pub(crate) struct Chunk {
    /// The number of its high watermark.
    mark: u64,
    pub(crate) topic: String,
    pub(crate) rows: Vec<ChunkRow>,
    /// The cursor after the chunk, before counting its rows that will be published.
    pub(crate) cursor: SnapshotCursor,
}

/// The plugin's side of a snapshot: the keys of the table changed since the last watermark
/// decoded, and the chunk read since.
pub(crate) struct Window {
    mark: Mark,
    table: pg_sys::Oid,
    /// Decoding has passed a watermark of this session: changes are being noted.
    open: bool,
    changed: HashSet<Vec<u8>>,
    /// The table was truncated in the window: no row of the chunk is newer than that.
    truncated: bool,
    chunk: Option<Chunk>,
}

impl Window {
    pub(crate) fn is_of(&self, mark: &Mark) -> bool {
        mark.session == self.mark.session && mark.publication_id == self.mark.publication_id
    }

    pub(crate) fn watches(&self, table: pg_sys::Oid) -> bool {
        self.open && self.table == table
    }

    pub(crate) fn changed(&mut self, key: &[u8]) {
        if !self.changed.contains(key) {
            self.changed.insert(key.to_vec());
        }
    }

    pub(crate) fn truncated(&mut self) {
        self.truncated = true;
    }

    pub(crate) fn was_changed(&self, key: &[u8]) -> bool {
        self.truncated || self.changed.contains(key)
    }

    /// Watermark `number` was decoded: the chunk it ends, if it is the one in flight.
    /// Otherwise it was the low watermark, and the window opens.
    pub(crate) fn close(&mut self, number: u64) -> Option<Chunk> {
        if self.chunk.as_ref().is_some_and(|c| c.mark == number) {
            return self.chunk.take();
        }
        self.reopen();
        None
    }

    /// A new window starts at the watermark just decoded.
    pub(crate) fn reopen(&mut self) {
        self.changed.clear();
        self.truncated = false;
        self.open = true;
    }
}

/// What the snapshot driver needs of the decoding side.
pub(crate) trait WindowHost {
    fn window(&mut self) -> &mut Option<Window>;
    /// The snapshot cursor after the last chunk handed to Kafka, and whether the Kafka
    /// transaction holding that chunk is still open.
    fn snapshot_cursor(&mut self) -> (Option<SnapshotCursor>, bool);
}

/// The worker's side of snapshots: takes the requested runs one at a time, and reads the
/// next chunk of the current one once the previous chunk was handed to Kafka.
pub(crate) struct Snapshotter {
    publication_id: i32,
    owner: pg_sys::Oid,
    template: String,
    session: u64,
    next_mark: u64,
    task: Option<SnapshotTask>,
    /// Where the run stands after the last chunk read.
    cursor: Option<SnapshotCursor>,
    next_poll: Instant,
}

impl Snapshotter {
    pub(crate) fn new(publication_id: i32, owner: pg_sys::Oid, template: &str) -> Snapshotter {
        // Distinct for every session of every worker, so that decoding again the marks of
        // an earlier session never matches this one's.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        // SAFETY: MyProcPid is a plain int set once at process start.
        let pid = unsafe { pg_sys::MyProcPid } as u64;
        Snapshotter {
            publication_id,
            owner,
            template: template.to_owned(),
            session: (now.as_nanos() as u64) ^ (pid << 40),
            next_mark: 0,
            task: None,
            cursor: None,
            next_poll: Instant::now(),
        }
    }

    /// Whether a run is in progress: the worker then does not idle between reads.
    pub(crate) fn busy(&self) -> bool {
        self.task.is_some()
    }

    /// Moves the snapshots on by one step, if decoding is where the step needs it.
    pub(crate) fn step(&mut self, host: &mut impl WindowHost) -> Result<()> {
        let Some(task) = self.task else {
            return self.take_next_task(host);
        };
        let window = host.window().as_ref();
        if window.is_none_or(|w| !w.open || w.chunk.is_some()) {
            return Ok(());
        }
        let (latest, open) = host.snapshot_cursor();
        let Some(cursor) = self.cursor.clone() else {
            return Ok(());
        };
        // The next chunk is read after the last one handed to Kafka, even before that one's
        // transaction commits: if it fails, the session ends, and with it this chunk too.
        let cursor = latest.filter(|c| c.is_of(task)).unwrap_or(cursor);
        if cursor.done && open {
            // The run is done once its last chunk is committed, not before.
            return Ok(());
        }
        if cursor.done {
            crate::worker::transaction(|| queue::finish(self.publication_id, task, cursor.rows))?;
            log!(
                "pg_kafka_bridge: snapshot of {} (run {}) done: {} rows",
                table_name(task.table),
                task.run,
                cursor.rows
            );
            self.end_task(host);
            return Ok(());
        }
        let mark = self.mark();
        let chunk = crate::worker::transaction(|| {
            if !queue::record_progress(self.publication_id, task, cursor.rows)? {
                return Ok(None);
            }
            let chunk = read_chunk(task.table, self.owner, &self.template, &cursor, mark.number)?;
            write_mark(&mark);
            Ok(Some(chunk))
        })?;
        match chunk {
            Some(chunk) => {
                self.cursor = Some(chunk.cursor.clone());
                if let Some(w) = host.window().as_mut() {
                    w.chunk = Some(chunk);
                }
            }
            // The run is no longer wanted; the queue says what is.
            None => self.end_task(host),
        }
        Ok(())
    }

    fn take_next_task(&mut self, host: &mut impl WindowHost) -> Result<()> {
        if Instant::now() < self.next_poll {
            return Ok(());
        }
        self.next_poll = Instant::now() + QUEUE_POLL;
        let Some(task) = crate::worker::transaction(|| queue::next_task(self.publication_id))? else {
            return Ok(());
        };
        // A run that an earlier session began goes on after its committed cursor.
        let (committed, _) = host.snapshot_cursor();
        let cursor = committed.filter(|c| c.is_of(task)).unwrap_or(SnapshotCursor {
            table: u32::from(task.table),
            run: task.run,
            after: None,
            rows: 0,
            done: false,
        });
        let mark = self.mark();
        let exists = crate::worker::transaction(|| {
            if crate::catalog::qualified_table_name(task.table).is_none() {
                // A dropped table has nothing left to read.
                queue::forget(self.publication_id, &[task.table])?;
                return Ok(false);
            }
            queue::record_progress(self.publication_id, task, cursor.rows)?;
            // The low watermark: the first chunk is read once decoding has passed it.
            write_mark(&mark);
            Ok(true)
        })?;
        if exists {
            *host.window() = Some(Window {
                mark,
                table: task.table,
                open: false,
                changed: HashSet::new(),
                truncated: false,
                chunk: None,
            });
            self.task = Some(task);
            self.cursor = Some(cursor);
            self.next_poll = Instant::now();
        }
        Ok(())
    }

    fn end_task(&mut self, host: &mut impl WindowHost) {
        *host.window() = None;
        self.task = None;
        self.cursor = None;
        self.next_poll = Instant::now();
    }

    fn mark(&mut self) -> Mark {
        let mark = Mark { publication_id: self.publication_id, session: self.session, number: self.next_mark };
        self.next_mark += 1;
        mark
    }
}

fn table_name(table: pg_sys::Oid) -> String {
    crate::worker::transaction(|| Ok(crate::catalog::qualified_table_name(table)))
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("OID {table}"))
}

fn write_mark(mark: &Mark) {
    // SAFETY: on the worker's main thread inside its transaction, which the message
    // belongs to.
    unsafe { crate::compat::log_transactional_message(MARK_PREFIX, &mark.encode()) };
}

/// The key columns of `table` (those of its events' keys: the replica identity index, else
/// the primary key) in the order of that index, which the chunks are read in, with their
/// types as SQL.
fn key_columns(table: pg_sys::Oid) -> Result<Vec<(String, String)>> {
    Spi::connect(|client| {
        let rows = client.select(
            "WITH ix AS ( \
                 SELECT i.indkey FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indrelid \
                  WHERE c.oid = $1 \
                    AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END \
                  LIMIT 1) \
             SELECT a.attname::pg_catalog.text, pg_catalog.format_type(a.atttypid, a.atttypmod) \
               FROM ix CROSS JOIN LATERAL pg_catalog.unnest(ix.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, n) \
               JOIN pg_catalog.pg_attribute a ON a.attrelid = $1 AND a.attnum = k.attnum \
              ORDER BY k.n",
            None,
            &[table.into()],
        )?;
        rows.into_iter().map(|row| Ok((req(&row, 1)?, req(&row, 2)?))).collect()
    })
}

/// Reads the chunk of `table` after `cursor` as `owner`, the publication's owner, and
/// encodes its rows as events. `mark` is the number of the watermark that will end it.
fn read_chunk(
    table: pg_sys::Oid,
    owner: pg_sys::Oid,
    template: &str,
    cursor: &SnapshotCursor,
    mark: u64,
) -> Result<Chunk> {
    let name = crate::catalog::qualified_table_name(table).ok_or_else(|| {
        BridgeError::NotInPrerequisiteState(format!("the table with OID {table} of a snapshot no longer exists"))
    })?;
    security::check_reads_every_row(table, owner, &name)?;
    let keys = key_columns(table)?;
    if keys.is_empty() {
        return Err(BridgeError::NotInPrerequisiteState(format!("{name} has no key to read it in order")));
    }
    let list = keys.iter().map(|(k, _)| spi::quote_identifier(k)).collect::<Vec<_>>().join(", ");
    // A partitioned table is read through: its partitions' rows are its rows.
    let rows = crate::catalog::every_row_of(table).unwrap_or_else(|| format!("ONLY {name}"));
    let mut sql = format!("SELECT * FROM {rows}");
    if cursor.after.is_some() {
        let params =
            keys.iter().enumerate().map(|(i, (_, t))| format!("${}::{t}", i + 1)).collect::<Vec<_>>().join(", ");
        sql.push_str(&format!(" WHERE ({list}) > ({params})"));
    }
    // The limit tells the planner how little of the table a chunk reads: an index scan
    // from the cursor, never a sort of the rest of the table.
    let chunk_rows = crate::settings::snapshot_chunk_rows();
    sql.push_str(&format!(" ORDER BY {list} LIMIT {chunk_rows}"));
    security::as_table_owner(owner, || {
        // SAFETY: inside the worker's transaction, on its main thread; see `fetch_rows`.
        unsafe { fetch_rows(table, template, &sql, &keys, cursor, mark, chunk_rows) }
    })
}

/// # Safety
/// Inside a transaction on the main thread. SPI is connected and finished here; an ERROR
/// raised inside unwinds to the caller's transaction, whose abort cleans SPI up.
unsafe fn fetch_rows(
    table: pg_sys::Oid,
    template: &str,
    sql: &str,
    keys: &[(String, String)],
    cursor: &SnapshotCursor,
    mark: u64,
    chunk_rows: usize,
) -> Result<Chunk> {
    let sql = CString::new(sql).map_err(|_| BridgeError::InvalidParameter("table name with NUL".into()))?;
    let after: Vec<CString> =
        cursor.after.iter().flatten().map(|v| CString::new(v.as_str()).unwrap_or_default()).collect();
    let mut types = vec![pg_sys::TEXTOID; after.len()];
    let mut values: Vec<pg_sys::Datum> =
        after.iter().map(|v| pg_sys::Datum::from(pg_sys::cstring_to_text(v.as_ptr()))).collect();
    let nulls = CString::new(" ".repeat(after.len())).unwrap_or_default();
    pg_sys::SPI_connect();
    let portal = pg_sys::SPI_cursor_open_with_args(
        std::ptr::null(),
        sql.as_ptr(),
        after.len() as i32,
        types.as_mut_ptr(),
        values.as_mut_ptr(),
        nulls.as_ptr(),
        true,
        0,
    );
    // Per-row memory: the values fetched from TOAST and the output functions' text.
    let row_context = pg_sys::AllocSetContextCreateInternal(
        pg_sys::CurrentMemoryContext,
        c"pg_kafka_bridge snapshot".as_ptr(),
        pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
        pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
        pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
    );
    let relation = pg_sys::relation_open(table, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    let mut writer = EventWriter::default();
    let mut rows = Vec::new();
    let mut bytes = 0;
    let mut info: Option<TableInfo> = None;
    let mut last_key: Option<Vec<String>> = cursor.after.clone();
    let mut exhausted = false;
    while rows.len() < chunk_rows && bytes < CHUNK_BYTES {
        let want = FETCH_ROWS.min((chunk_rows - rows.len()) as i64);
        pg_sys::SPI_cursor_fetch(portal, true, want);
        let fetched = pg_sys::SPI_processed as usize;
        let tuptable = pg_sys::SPI_tuptable;
        if fetched == 0 || tuptable.is_null() {
            exhausted = true;
            break;
        }
        let tupdesc = (*tuptable).tupdesc;
        let info = info.get_or_insert_with(|| TableInfo::for_result(relation, tupdesc, template));
        let key_numbers: Vec<i32> = keys
            .iter()
            .map(|(k, _)| {
                let k = CString::new(k.as_str()).unwrap_or_default();
                pg_sys::SPI_fnumber(tupdesc, k.as_ptr())
            })
            .collect();
        let previous = pg_sys::MemoryContextSwitchTo(row_context);
        for i in 0..fetched {
            let tuple = *(*tuptable).vals.add(i);
            writer.row_change_head(tupdesc, info, Op::Read, None, Some(tuple));
            pg_sys::MemoryContextReset(row_context);
            bytes += writer.key.len() + writer.value.len();
            rows.push(ChunkRow { key: writer.key.clone(), head: writer.value.clone() });
            if i + 1 == fetched {
                last_key = Some(
                    key_numbers
                        .iter()
                        .map(|&n| {
                            let text = pg_sys::SPI_getvalue(tuple, tupdesc, n);
                            if text.is_null() {
                                String::new()
                            } else {
                                cstr_lossy(text)
                            }
                        })
                        .collect(),
                );
            }
        }
        pg_sys::MemoryContextSwitchTo(previous);
        pg_sys::SPI_freetuptable(tuptable);
        if (fetched as i64) < want {
            exhausted = true;
            break;
        }
    }
    let topic = info.as_ref().map(|i| i.topic.clone()).unwrap_or_else(|| {
        let schema = cstr_lossy(pg_sys::get_namespace_name((*(*relation).rd_rel).relnamespace));
        let name = cstr_lossy((*(*relation).rd_rel).relname.data.as_ptr());
        super::events::render_topic(template, &schema, &name)
    });
    pg_sys::relation_close(relation, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    pg_sys::MemoryContextDelete(row_context);
    pg_sys::SPI_cursor_close(portal);
    pg_sys::SPI_finish();
    Ok(Chunk { mark, topic, rows, cursor: SnapshotCursor { after: last_key, done: exhausted, ..cursor.clone() } })
}

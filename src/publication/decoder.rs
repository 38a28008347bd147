//! Logical decoding inside the publication worker: the worker keeps one decoding context
//! open on its slot (as a walsender does) and reads the WAL as it is flushed, so a backlog
//! is decoded once, not again on every call as with the SQL peek functions. The output
//! plugin's callbacks ([`super::plugin`]) run during [`Decoder::read`].

use super::events::cstr_lossy;
use super::plugin::{self, Selection, Sink, WorkerSetup, PLUGIN};
use super::snapshot::Window;
use crate::error::{BridgeError, Result};
use crate::worker;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

// Exported by the server, not declared by pgrx; called behind the FFI guard.
// SAFETY: the signature is that of replication/decode.h.
extern "C-unwind" {
    fn LogicalDecodingProcessRecord(ctx: *mut pg_sys::LogicalDecodingContext, record: *mut pg_sys::XLogReaderState);
}

// Exported by the server: pgrx wraps them in Rust functions, while the WAL reader needs the
// C functions themselves (it calls them through pointers).
// SAFETY: the signatures are those of access/xlogutils.h.
extern "C-unwind" {
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
pub(crate) struct Decoder {
    ctx: *mut pg_sys::LogicalDecodingContext,
    slot_name: String,
}

impl Decoder {
    /// Acquires the slot (failing if another process holds it) and opens a decoding
    /// context at its confirmed position, whose events go to `sink`.
    pub(crate) fn open(slot_name: &str, selection: Selection, sink: Box<dyn Sink>) -> Result<Decoder> {
        let name = CString::new(slot_name).map_err(|_| BridgeError::InvalidParameter("bad slot name".into()))?;
        // From here on the slot is ours: dropping the decoder releases it.
        let mut decoder = Decoder { ctx: std::ptr::null_mut(), slot_name: slot_name.to_owned() };
        worker::catch(|| {
            // SAFETY: on the main thread, outside a transaction, as a walsender acquires its
            // slot; nowait, so an active slot raises an error (caught) instead of waiting.
            unsafe { crate::compat::acquire_slot(&name) };
            // SAFETY: MyReplicationSlot was set by the acquisition above.
            let plugin = unsafe { CStr::from_ptr((*pg_sys::MyReplicationSlot).data.plugin.data.as_ptr()) };
            if plugin.to_bytes() != PLUGIN.as_bytes() {
                return Err(BridgeError::NotInPrerequisiteState(format!(
                    "replication slot \"{slot_name}\" does not use the {PLUGIN} output plugin"
                )));
            }
            Ok(())
        })?;
        let _setup = plugin::offer_worker_setup(WorkerSetup { selection, sink });
        // SAFETY: the slot is acquired and uses this plugin, whose startup callback takes the
        // setup offered above; the reader callbacks are the server's own for local WAL.
        // XLogBeginRead starts at the slot's restart point, as a walsender does.
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
                Some(ignore_write),
                Some(ignore_write),
                None,
            );
            decoder.ctx = ctx;
            include_in_snapshots();
            pg_sys::XLogBeginRead((*ctx).reader, (*pg_sys::MyReplicationSlot).data.restart_lsn);
            pg_sys::InvalidateSystemCaches();
            Ok(())
        })?;
        Ok(decoder)
    }

    /// The sink the decoder was opened with, as its type.
    pub(crate) fn sink<S: Sink>(&mut self) -> &mut S {
        // SAFETY: the context was created in `open` and is freed only by Drop; its plugin
        // state was made by the startup callback from the offered setup.
        let state = unsafe { plugin::state(self.ctx) };
        state.sink.as_any_mut().downcast_mut::<S>().expect("the decoder's sink has the type it was opened with")
    }

    /// The snapshot window of the plugin (see [`super::snapshot`]).
    pub(crate) fn window(&mut self) -> &mut Option<Window> {
        // SAFETY: as in `sink`.
        unsafe { &mut plugin::state(self.ctx).window }
    }

    /// Decodes the WAL flushed so far, for up to `budget` or until a snapshot chunk was
    /// published. Returns whether it reached the end of the flushed WAL.
    pub(crate) fn read(&mut self, budget: Duration) -> Result<bool> {
        let deadline = Instant::now() + budget;
        // SAFETY: `self.ctx` is the open context (freed only by Drop), its reader owned by it;
        // records are read and decoded on the main thread outside a transaction, as a
        // walsender does. `error` is an out-pointer to a reader-owned message.
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
                    // The guard turns an ERROR raised while decoding (in the plugin's
                    // callbacks too) into a Rust unwind, which `worker::catch` takes.
                    pg_sys::ffi::pg_guard_ffi_boundary(|| LogicalDecodingProcessRecord(self.ctx, reader));
                    let state = plugin::state(self.ctx);
                    if state.chunk_emitted {
                        // A snapshot chunk is out: the worker commits it before going on.
                        state.chunk_emitted = false;
                        return Ok(false);
                    }
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
    pub(crate) fn decoded_up_to(&self) -> u64 {
        // SAFETY: `self.ctx` and its reader are alive until Drop.
        unsafe { (*(*self.ctx).reader).EndRecPtr }
    }

    /// Whether WAL was flushed past the last record decoded.
    pub(crate) fn more_flushed(&self) -> bool {
        // SAFETY: GetFlushRecPtr only reads shared memory under its spinlock (a NULL
        // timeline pointer is allowed); called on the main thread.
        unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) > self.decoded_up_to() }
    }

    /// Tells the slot that everything before `lsn` is published: the WAL before it may go.
    pub(crate) fn confirm(&mut self, lsn: u64) -> Result<()> {
        // SAFETY: this process holds the slot (MyReplicationSlot) while the decoder lives;
        // confirming and marking it dirty is what a walsender does on a feedback message.
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
        // SAFETY: frees the context created in `open` (if it was) exactly once and releases
        // the slot this process acquired; both on the main thread outside a transaction.
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
            // SAFETY: ends the process the normal way, running its exit callbacks.
            unsafe { pg_sys::proc_exit(1) };
        }
    }
}

/// Undoes what creating a decoding context outside a transaction does to the process: the
/// flag PROC_IN_LOGICAL_DECODING, with which other backends leave the process out of their
/// snapshots, as they may for a walsender, which never writes. This worker writes (dead
/// letters, snapshot progress, watermarks) with transaction ids of its own: left out of
/// others' snapshots, a transaction of it that is still running looks aborted to them, and
/// a reader then marks its rows invalid for good.
///
/// # Safety
/// On the main thread, outside a transaction, after `CreateDecodingContext`.
unsafe fn include_in_snapshots() {
    // ProcArrayLock is the fourth of the server's individual LWLocks in every supported
    // version (lwlocklist.h); the flags are changed under it, as the server does.
    const PROC_ARRAY_LOCK: usize = 4;
    let lock = &raw mut (*pg_sys::MainLWLockArray.add(PROC_ARRAY_LOCK)).lock;
    pg_sys::LWLockAcquire(lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
    let proc = pg_sys::MyProc;
    (*proc).statusFlags &= !(pg_sys::PROC_IN_LOGICAL_DECODING as u8);
    *(*pg_sys::ProcGlobal).statusFlags.add((*proc).pgxactoff as usize) = (*proc).statusFlags;
    pg_sys::LWLockRelease(lock);
}

/// The decoding context's output writer, which the worker does not use: events go to the
/// sink from the plugin's callbacks, not through the context's output buffer.
///
/// # Safety
/// Called by the server's decoding machinery only; it touches nothing.
#[pg_guard]
unsafe extern "C-unwind" fn ignore_write(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _lsn: pg_sys::XLogRecPtr,
    _xid: pg_sys::TransactionId,
    _last_write: bool,
) {
}

//! What every background worker of the extension shares: attaching to its slot, signals,
//! transactions that turn PostgreSQL errors into values, and waiting with backoff.

use crate::error::{BridgeError, Result};
use crate::settings;
use crate::shmem::{self, SlotId, WorkerState};
use pgrx::pg_sys;
use pgrx::PgTryBuilder;
use std::ffi::CStr;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Sets up a worker process started by the launcher: signals, the database connection and
/// the claim on its shared-memory slot. Returns `None` if the slot was handed to another
/// worker meanwhile, in which case the process should just exit.
pub(crate) fn attach(database: &str) -> Option<SlotId> {
    install_signal_handlers();
    // SAFETY: only the workers' entry points (`pg_kafka_bridge_{subscription,publication}_main`)
    // call this, on the main thread of a background worker, where the postmaster set
    // MyBgworkerEntry to this worker's (non-NULL) registration before calling the entry
    // point. The launcher filled `bgw_extra` with `SlotId::encode()` (at most 23 bytes) and
    // pgrx zero-fills the rest of the 128-byte array, so it holds a NUL terminator.
    let extra = unsafe { CStr::from_ptr((*pg_sys::MyBgworkerEntry).bgw_extra.as_ptr()) };
    let id = SlotId::decode(extra.to_str().ok()?)?;
    // SAFETY: MyProcPid is a plain int the process sets once at start-up; read on the main thread.
    let pid = unsafe { pg_sys::MyProcPid };
    shmem::update(id, |slot| slot.pid = pid)?;
    ATTACHED_SLOT.set(id).ok()?;
    // SAFETY: registers a `'static` callback with a dummy argument, on the main thread; done
    // once per process (ATTACHED_SLOT.set above fails on a second call), so it stays far
    // below PostgreSQL's MAX_ON_EXITS.
    unsafe {
        pg_sys::on_shmem_exit(Some(mark_slot_exited), pg_sys::Datum::from(0));
    }
    let db = std::ffi::CString::new(database).ok()?;
    // SAFETY: called once, on the main thread of a background worker registered with
    // BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION (`enable_spi_access()` in
    // the launcher); `db` is a NUL-terminated string alive for the call, a NULL user name
    // means the bootstrap superuser, and an unknown database raises an ERROR (no UB).
    unsafe { pg_sys::BackgroundWorkerInitializeConnection(db.as_ptr(), std::ptr::null(), 0) };
    crate::security::pin_session_search_path();
    Some(id)
}

/// [`attach`], then the worker's slot as the launcher filled it (which object, which index).
pub(crate) fn attach_with_slot(database: &str) -> Option<(SlotId, shmem::WorkerSlot)> {
    let id = attach(database)?;
    shmem::snapshot().into_iter().find(|(s, _)| *s == id)
}

static ATTACHED_SLOT: OnceLock<SlotId> = OnceLock::new();

/// Marks the worker's shared-memory slot exited when the process exits (the launcher frees
/// it or starts the next worker). It runs before `ProcKill`
/// (registered earlier by `InitProcess`; on_shmem_exit callbacks run in reverse order), so
/// LWLocks still work. The registry lock cannot already be held by this process here:
/// LWLockAcquire holds interrupts, and nothing run under that lock can raise an error.
///
/// # Safety
///
/// Only PostgreSQL calls it, from `shmem_exit()` in `proc_exit()`, on the main thread, with
/// the exit code and the dummy argument registered in [`attach`] (neither dereferenced).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn mark_slot_exited(code: i32, _arg: pg_sys::Datum) {
    if let Some(id) = ATTACHED_SLOT.get() {
        shmem::mark_exited(*id, code);
    }
}

/// SIGTERM ends the worker at the next interrupt check (between batches, or inside a long
/// statement); SIGHUP reloads the configuration at the next check.
pub(crate) fn install_signal_handlers() {
    // SAFETY: called first thing in a background worker's entry point, on its main thread
    // and before any other thread exists. `die` and `SignalHandlerForConfigReload` are
    // PostgreSQL's own async-signal-safe handlers (they only set flags and the latch), the
    // ones its logical replication workers install; the postmaster starts workers with
    // signals blocked and BackgroundWorkerUnblockSignals lifts that once they are in place.
    unsafe {
        crate::compat::set_signal_handler(pg_sys::SIGTERM, die);
        crate::compat::set_signal_handler(pg_sys::SIGHUP, SignalHandlerForConfigReload);
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

// PostgreSQL's own handlers, installed as they are (pgrx only exposes guarded wrappers).
// SAFETY: the signatures match the server's prototypes `void die(SIGNAL_ARGS)`
// (tcop/tcopprot.h) and `void SignalHandlerForConfigReload(SIGNAL_ARGS)`
// (postmaster/interrupt.h), SIGNAL_ARGS being `int postgres_signal_arg`. They are only
// passed to pqsignal, never called from Rust.
extern "C-unwind" {
    fn die(signal: std::ffi::c_int);
    fn SignalHandlerForConfigReload(signal: std::ffi::c_int);
}

/// Serves a pending SIGTERM (the process exits) or query cancel; safe anywhere on the main
/// thread, including inside decoding callbacks.
pub(crate) fn check_interrupts() {
    pg_sys::check_for_interrupts!();
}

/// Handles pending signals: exits on SIGTERM, reloads the configuration on SIGHUP.
pub(crate) fn check_interrupts_and_reload() {
    pg_sys::check_for_interrupts!();
    // SAFETY: on the main thread, the only one that runs PostgreSQL's signal handlers (the
    // prefetch and librdkafka threads block all signals): ConfigReloadPending is the flag that
    // SignalHandlerForConfigReload sets, and ProcessConfigFile(PGC_SIGHUP) is what
    // PostgreSQL's own workers call from their main loops, outside any critical section.
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

/// Sleeps on the process latch for up to `timeout`; signals cut the sleep short.
pub(crate) fn sleep(timeout: Duration) {
    // SAFETY: on the main thread of a process with a PGPROC, where MyLatch points to the
    // process latch that InitProcess owns (in shared memory, valid for the process's life);
    // the timeout is clamped to the C `long` WaitLatch takes. Resetting the latch before
    // checking for work (check_interrupts_and_reload) is the pattern latch.h prescribes.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis().min(i64::MAX as u128) as i64,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    check_interrupts_and_reload();
}

/// Runs `body` in a transaction of its own. The transaction commits if `body` returns `Ok`
/// and rolls back if it returns `Err` or raises a PostgreSQL error, which comes back as `Err`.
pub(crate) fn transaction<R>(body: impl FnOnce() -> Result<R>) -> Result<R> {
    // SAFETY: on a worker's main thread after BackgroundWorkerInitializeConnection, outside
    // any transaction (workers call this from their loops, between transactions).
    // GetTransactionSnapshot returns a static snapshot that PushActiveSnapshot copies.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    // The commit is inside the catch: a check deferred to commit may still fail.
    let outcome = catch(|| {
        let result = body()?;
        // SAFETY: pops the snapshot pushed above (the body's SPI use leaves the active
        // snapshot stack as it found it) and commits the transaction started above.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(result)
    });
    if outcome.is_err() {
        // SAFETY: the error has been caught and flushed (pgrx's FFI boundary calls
        // FlushErrorState); AbortCurrentTransaction cleans up whatever state the body or a
        // failed commit left, and releases the snapshot, locks and memory.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    outcome
}

/// Runs `body` in a subtransaction of the current transaction; on `Err` (or a PostgreSQL
/// error) only the subtransaction's work is undone.
pub(crate) fn subtransaction<R>(body: impl FnOnce() -> Result<R>) -> Result<R> {
    // SAFETY: plain reads of two backend globals on the main thread; the values belong to
    // the enclosing transaction and stay valid until it ends, after this function returns.
    let (memory_context, resource_owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    // SAFETY: called inside a transaction (callers run in `transaction`); a NULL name is
    // allowed. It switches to the subtransaction's memory context and resource owner.
    unsafe { pg_sys::BeginInternalSubTransaction(std::ptr::null()) };
    let outcome = catch(body);
    // SAFETY: ends the subtransaction begun above (any error in it has been caught and
    // flushed), then restores the outer transaction's memory context and resource owner,
    // still alive, exactly as PL/pgSQL does after an exception block (pl_exec.c).
    unsafe {
        if outcome.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(memory_context);
        pg_sys::CurrentResourceOwner = resource_owner;
    }
    outcome
}

/// Runs `body`, turning a PostgreSQL error (or a Rust panic) it raises into an `Err`.
pub(crate) fn catch<R>(body: impl FnOnce() -> Result<R>) -> Result<R> {
    PgTryBuilder::new(AssertUnwindSafe(body)).catch_others(|caught| Err(BridgeError::from_caught(caught))).execute()
}

/// Doubling waits between attempts after errors, reset by a success.
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Backoff::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    pub(crate) fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }

    /// Records `error` in the worker's slot and sleeps before the next attempt.
    pub(crate) fn wait_after(&mut self, id: SlotId, error: &BridgeError) {
        let message = error.to_string();
        shmem::update(id, |slot| {
            slot.state = WorkerState::Error;
            slot.set_error(&message);
        });
        pgrx::log!("pg_kafka_bridge: {message}; retrying in {} ms", self.next.as_millis());
        sleep(self.next);
        self.next = (self.next * 2).min(settings::retry_backoff_max());
    }
}

/// Rows (or events) per second over the last second or so.
pub(crate) struct RateMeter {
    window_start: Instant,
    window_rows: usize,
    pub(crate) rate: f64,
}

impl Default for RateMeter {
    fn default() -> Self {
        RateMeter { window_start: Instant::now(), window_rows: 0, rate: 0.0 }
    }
}

impl RateMeter {
    pub(crate) fn record(&mut self, rows: usize) {
        self.window_rows += rows;
        let elapsed = self.window_start.elapsed();
        if elapsed >= Duration::from_secs(1) {
            self.rate = self.window_rows as f64 / elapsed.as_secs_f64();
            self.window_rows = 0;
            self.window_start = Instant::now();
        }
    }
}

/// Shows which subscription or publication this worker serves, as
/// `pg_stat_activity.application_name`.
pub(crate) fn report_application_name(name: &str) {
    if let Ok(name) = std::ffi::CString::new(name) {
        // SAFETY: on the worker's main thread; `name` is NUL-terminated and alive for the
        // call, which copies it (truncated to NAMEDATALEN) into this backend's status entry.
        unsafe { pg_sys::pgstat_report_appname(name.as_ptr()) };
    }
}

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
pub fn attach(database: &str) -> Option<SlotId> {
    install_signal_handlers();
    let extra = unsafe { CStr::from_ptr((*pg_sys::MyBgworkerEntry).bgw_extra.as_ptr()) };
    let id = SlotId::decode(extra.to_str().ok()?)?;
    let pid = unsafe { pg_sys::MyProcPid };
    shmem::update(id, |slot| slot.pid = pid)?;
    ATTACHED_SLOT.set(id).ok()?;
    unsafe {
        pg_sys::on_shmem_exit(Some(release_slot_at_exit), pg_sys::Datum::from(0));
    }
    let db = std::ffi::CString::new(database).ok()?;
    unsafe { pg_sys::BackgroundWorkerInitializeConnection(db.as_ptr(), std::ptr::null(), 0) };
    crate::security::pin_session_search_path();
    Some(id)
}

/// [`attach`], then the worker's slot as the launcher filled it (which object, which index).
pub fn attach_with_slot(database: &str) -> Option<(SlotId, shmem::WorkerSlot)> {
    let id = attach(database)?;
    shmem::snapshot().into_iter().find(|(s, _)| *s == id)
}

static ATTACHED_SLOT: OnceLock<SlotId> = OnceLock::new();

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn release_slot_at_exit(_code: i32, _arg: pg_sys::Datum) {
    if let Some(id) = ATTACHED_SLOT.get() {
        shmem::release(*id);
    }
}

/// SIGTERM ends the worker at the next interrupt check (between batches, or inside a long
/// statement); SIGHUP reloads the configuration at the next check.
pub fn install_signal_handlers() {
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(die));
        pg_sys::pqsignal(pg_sys::SIGHUP as i32, Some(SignalHandlerForConfigReload));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

// PostgreSQL's own handlers, installed as they are (pgrx only exposes guarded wrappers).
extern "C-unwind" {
    fn die(signal: std::ffi::c_int);
    fn SignalHandlerForConfigReload(signal: std::ffi::c_int);
}

/// Serves a pending SIGTERM (the process exits) or query cancel; safe anywhere on the main
/// thread, including inside decoding callbacks.
pub fn check_interrupts() {
    pg_sys::check_for_interrupts!();
}

/// Handles pending signals: exits on SIGTERM, reloads the configuration on SIGHUP.
pub fn check_signals() {
    pg_sys::check_for_interrupts!();
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

/// Sleeps on the process latch for up to `timeout`; signals cut the sleep short.
pub fn sleep(timeout: Duration) {
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout.as_millis().min(i64::MAX as u128) as i64,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    check_signals();
}

/// Runs `body` in a transaction of its own. The transaction commits if `body` returns `Ok`
/// and rolls back if it returns `Err` or raises a PostgreSQL error, which comes back as `Err`.
pub fn transaction<R>(body: impl FnOnce() -> Result<R>) -> Result<R> {
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    // The commit is inside the catch: a check deferred to commit may still fail.
    let outcome = catch(|| {
        let result = body()?;
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(result)
    });
    if outcome.is_err() {
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    outcome
}

/// Runs `body` in a subtransaction of the current transaction; on `Err` (or a PostgreSQL
/// error) only the subtransaction's work is undone.
pub fn subtransaction<R>(body: impl FnOnce() -> Result<R>) -> Result<R> {
    let (memory_context, resource_owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe { pg_sys::BeginInternalSubTransaction(std::ptr::null()) };
    let outcome = catch(body);
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
pub fn catch<R>(body: impl FnOnce() -> Result<R>) -> Result<R> {
    PgTryBuilder::new(AssertUnwindSafe(body)).catch_others(|caught| Err(BridgeError::from_caught(caught))).execute()
}

/// Doubling waits between attempts after errors, reset by a success.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Backoff::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    pub fn reset(&mut self) {
        self.next = Backoff::FIRST;
    }

    /// Records `error` in the worker's slot and sleeps before the next attempt.
    pub fn wait_after(&mut self, id: SlotId, error: &BridgeError) {
        let message = error.to_string();
        shmem::update(id, |slot| {
            slot.state = WorkerState::Retrying;
            slot.set_error(&message);
        });
        pgrx::log!("pg_kafka_bridge: {message}; retrying in {} ms", self.next.as_millis());
        sleep(self.next);
        self.next = (self.next * 2).min(settings::retry_backoff_max());
    }
}

/// Rows (or events) per second over the last second or so.
pub struct RateMeter {
    window_start: Instant,
    window_rows: usize,
    pub rate: f64,
}

impl Default for RateMeter {
    fn default() -> Self {
        RateMeter { window_start: Instant::now(), window_rows: 0, rate: 0.0 }
    }
}

impl RateMeter {
    pub fn record(&mut self, rows: usize) {
        self.window_rows += rows;
        let elapsed = self.window_start.elapsed();
        if elapsed >= Duration::from_secs(1) {
            self.rate = self.window_rows as f64 / elapsed.as_secs_f64();
            self.window_rows = 0;
            self.window_start = Instant::now();
        }
    }
}

//! The launcher: a background worker registered at preload that keeps one worker running
//! for each enabled subscription and worker index and for each enabled publication, and
//! stops the workers of those that were stopped or dropped. It never touches Kafka.

use crate::catalog;
use crate::publication::slots;
use crate::settings;
use crate::shmem::{self, SlotId, WorkerKind, WorkerState};
use crate::worker;
use pgrx::bgworkers::{BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker};
use pgrx::prelude::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const LIBRARY: &str = "pg_kafka_bridge";
/// The extension version this library's workers are written for.
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");
/// How often slot drops that wait (for a transaction, or for a worker to exit) are retried.
const DROP_RETRY: Duration = Duration::from_millis(100);
/// The wait before starting again a worker whose process exited, doubled for each exit in a row.
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// How long a worker that could not be started waits before the next attempt.
const LAUNCH_RETRY: Duration = Duration::from_secs(5);

pub(crate) fn register() {
    BackgroundWorkerBuilder::new("pg_kafka_bridge launcher")
        .set_type("pg_kafka_bridge launcher")
        .set_library(LIBRARY)
        .set_function("pg_kafka_bridge_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_kafka_bridge_launcher_main(_arg: pg_sys::Datum) {
    worker::install_signal_handlers();
    let database = std::ffi::CString::new(settings::database()).unwrap_or_default();
    // SAFETY: on the launcher's main thread, once, at start: it was registered with
    // BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION (`enable_spi_access()`),
    // and `database` is a NUL-terminated string alive for the call. MyLatch is then the
    // process latch inside this process's PGPROC in shared memory (InitProcess switched to
    // it), which is what the registry may publish to other processes (see
    // `shmem::wake_launcher`). The exit callback is `'static` and takes a dummy argument.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnection(database.as_ptr(), std::ptr::null(), 0);
        crate::security::pin_session_search_path();
        shmem::set_launcher_latch(pg_sys::MyLatch);
        pg_sys::on_shmem_exit(Some(forget_launcher_latch), pg_sys::Datum::from(0));
    }
    if let Err(e) = worker::transaction(slots::drop_orphans) {
        warning!("pg_kafka_bridge launcher: could not drop unused replication slots: {e}");
    }
    let mut launcher = Launcher::default();
    loop {
        worker::check_interrupts_and_reload();
        launcher.reconcile();
        // After reconciling: the workers of dropped publications have been told to stop.
        let drops_waiting = slots::drop_pending();
        worker::sleep(if drops_waiting { DROP_RETRY } else { settings::launcher_naptime() });
    }
}

/// Withdraws the launcher's latch from the registry when the launcher exits. It runs before
/// `ProcKill` hands the PGPROC, and so the latch, to another process: on_shmem_exit
/// callbacks run in reverse order of registration, and InitProcess registered ProcKill first.
///
/// # Safety
///
/// Only PostgreSQL calls it, from `shmem_exit()` in the launcher's `proc_exit()`, on its
/// main thread, with the dummy argument registered above (never dereferenced).
#[pg_guard]
unsafe extern "C-unwind" fn forget_launcher_latch(_code: i32, _arg: pg_sys::Datum) {
    shmem::set_launcher_latch(std::ptr::null_mut());
}

#[derive(Default)]
struct Launcher {
    handles: HashMap<SlotId, DynamicBackgroundWorker>,
    /// Workers that exited while still wanted, in a row, by the object they serve: the
    /// next start waits 100 ms doubled for each, up to `pg_kafka_bridge.retry_backoff_max`.
    exits_in_a_row: HashMap<WorkerKey, u32>,
    /// The extension version of the database's SQL objects while it differs from the
    /// library's: workers would read and write tables of another shape, so none runs until
    /// `ALTER EXTENSION pg_kafka_bridge UPDATE`.
    held_at_version: Option<String>,
}

impl Launcher {
    /// Whether the worker of `key`, whose process exited as `slot` shows, may be started
    /// again now. A worker that ran longer than the longest backoff starts the count afresh,
    /// so a worker that keeps dying is never restarted in a tight loop.
    fn restart_due(&mut self, key: WorkerKey, slot: &shmem::WorkerSlot, now: pg_sys::TimestampTz) -> bool {
        let longest = settings::retry_backoff_max();
        let ran_for = Duration::from_micros((slot.exited_at - slot.started_at).max(0) as u64);
        let exits = self.exits_in_a_row.entry(key).or_insert(0);
        if ran_for > longest {
            *exits = 0;
        }
        let delay = RESTART_BACKOFF_FIRST.saturating_mul(1 << (*exits).min(20)).min(longest);
        let due = now - slot.exited_at >= delay.as_micros() as i64;
        if due {
            *exits += 1;
        }
        due
    }

    /// Runs no worker while the SQL objects are at `version`, and says so once per version.
    fn hold_for_update(&mut self, version: String) {
        if self.held_at_version.as_ref() != Some(&version) {
            warning!(
                "pg_kafka_bridge: the extension in database \"{}\" is at version {version} and the library at \
                 {LIBRARY_VERSION}; no subscription or publication runs until ALTER EXTENSION pg_kafka_bridge UPDATE",
                settings::database()
            );
            self.held_at_version = Some(version);
        }
    }

    fn reconcile(&mut self) {
        let wanted = match worker::transaction(|| {
            match catalog::installed_version()? {
                None => return Ok(HashSet::new()),
                Some(version) if version != LIBRARY_VERSION => {
                    self.hold_for_update(version);
                    return Ok(HashSet::new());
                }
                Some(_) => self.held_at_version = None,
            }
            let subscriptions = catalog::enabled_subscriptions()?.into_iter().flat_map(|(id, workers)| {
                (0..workers).map(move |index| WorkerKey { kind: WorkerKind::Subscription, object_id: id, index })
            });
            let publications = catalog::publication::enabled_publications()?.into_iter().map(|id| WorkerKey {
                kind: WorkerKind::Publication,
                object_id: id,
                index: 0,
            });
            Ok(subscriptions.chain(publications).collect())
        }) {
            Ok(wanted) => wanted,
            Err(e) => {
                warning!("pg_kafka_bridge launcher: could not read the catalog: {e}");
                return;
            }
        };

        self.exits_in_a_row.retain(|key, _| wanted.contains(key));
        // A worker that exited before it attached (or was killed) has not marked its slot.
        self.handles.retain(|id, handle| {
            let gone =
                matches!(handle.pid(), Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied));
            if gone && shmem::snapshot().iter().any(|(s, slot)| s == id && slot.exited_at == 0) {
                shmem::mark_exited(*id, 1);
            }
            !gone
        });

        // SAFETY: GetCurrentTimestamp only reads the clock; it takes no pointer and cannot fail.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        let mut present = HashSet::new();
        for (id, slot) in shmem::snapshot() {
            let key = WorkerKey { kind: slot.kind, object_id: slot.object_id, index: slot.worker_index };
            if !wanted.contains(&key) {
                if slot.pid > 0 {
                    // SAFETY: kill(2) takes no pointers. The `pid > 0` test keeps it to one
                    // process (0 or -1 would signal a group or every process); the pid is the
                    // one the worker wrote into its slot, cleared when it exits.
                    unsafe { libc::kill(slot.pid, libc::SIGTERM) };
                } else {
                    shmem::release(id);
                }
                continue;
            }
            let retry_due = now - slot.last_error_at >= LAUNCH_RETRY.as_micros() as i64;
            if slot.state == WorkerState::LaunchFailed && retry_due {
                shmem::release(id);
                continue;
            }
            if slot.exited_at != 0 && self.restart_due(key, &slot, now) {
                shmem::release(id);
                continue;
            }
            present.insert(key);
        }

        let mut missing: Vec<_> = wanted.difference(&present).copied().collect();
        missing.sort();
        for key in missing {
            self.start_worker(key);
        }
    }

    fn start_worker(&mut self, key: WorkerKey) {
        let WorkerKey { kind, object_id, index } = key;
        let kind_name = kind.as_str();
        let Some(id) = shmem::claim(kind, object_id, index) else {
            warning!(
                "pg_kafka_bridge launcher: all {} worker slots are in use; {kind_name} {object_id} worker {index} waits",
                shmem::MAX_WORKERS
            );
            return;
        };
        let started = BackgroundWorkerBuilder::new(&format!("pg_kafka_bridge {kind_name} {object_id} worker {index}"))
            .set_type(&format!("pg_kafka_bridge {kind_name}"))
            .set_library(LIBRARY)
            .set_function(&format!("pg_kafka_bridge_{kind_name}_main"))
            .enable_spi_access()
            .set_extra(&id.encode())
            // SAFETY: MyProcPid is a plain int set once at process start; read on the main thread.
            .set_notify_pid(unsafe { pg_sys::MyProcPid })
            .load_dynamic();
        match started {
            Ok(handle) => {
                self.handles.insert(id, handle);
            }
            Err(_) => {
                shmem::update(id, |slot| {
                    slot.state = WorkerState::LaunchFailed;
                    slot.set_error(
                        "could not start a background worker: no free worker process; raise max_worker_processes",
                    );
                });
            }
        }
    }
}

/// One worker the catalog asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct WorkerKey {
    kind: WorkerKind,
    object_id: i32,
    index: i32,
}

/// Has the workers of an object whose definition the current transaction changes start a
/// new session with it once the transaction commits (nothing if it rolls back).
pub(crate) fn reload_at_commit(kind: WorkerKind, object_id: i32) {
    wake_at_commit();
    RELOAD_PENDING.lock().push((kind, object_id));
}

static RELOAD_PENDING: parking_lot::Mutex<Vec<(WorkerKind, i32)>> = parking_lot::Mutex::new(Vec::new());

/// Wakes the launcher when the current transaction commits, so that a subscription or
/// publication created, started or stopped in it takes effect at once, and one rolled back
/// changes nothing.
pub(crate) fn wake_at_commit() {
    register_transaction_callback();
    WAKE_PENDING.store(true, Ordering::Relaxed);
}

fn register_transaction_callback() {
    static REGISTERED: AtomicBool = AtomicBool::new(false);
    if !REGISTERED.swap(true, Ordering::Relaxed) {
        // SAFETY: on the backend's main thread (SQL functions run there); registers a
        // `'static` callback with a NULL argument it never reads, once per process
        // (REGISTERED), in a list PostgreSQL keeps in TopMemoryContext for the process's life.
        unsafe { pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut()) };
    }
}

static WAKE_PENDING: AtomicBool = AtomicBool::new(false);

/// Wakes the launcher at the end of a transaction that asked for it. At XACT_EVENT_COMMIT
/// the transaction is already committed, so nothing here may raise an error:
/// `request_reload` and `wake_launcher` only take the registry lock and set a latch.
///
/// # Safety
///
/// Only PostgreSQL calls it, from `CallXactCallbacks()` on the backend's main thread, with
/// an `XactEvent` and the NULL argument registered above (never read).
#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    let (committed, aborted) =
        (event == pg_sys::XactEvent::XACT_EVENT_COMMIT, event == pg_sys::XactEvent::XACT_EVENT_ABORT);
    // Also after a rollback: a slot made for a publication whose creation rolled back is
    // the launcher's to drop.
    if committed || aborted {
        let reloads = std::mem::take(&mut *RELOAD_PENDING.lock());
        if committed {
            reloads.into_iter().for_each(|(kind, object_id)| shmem::request_reload(kind, object_id));
        }
    }
    if (committed || aborted) && WAKE_PENDING.swap(false, Ordering::Relaxed) {
        shmem::wake_launcher();
    }
}

//! Worker slots in shared memory. The launcher claims a slot before it starts a worker; the
//! worker reports its state, progress and last error there; the status views copy the slots
//! out under a shared lock. Slots are reset with shared memory after a server crash.

use pgrx::lwlock::PgLwLock;
use pgrx::pg_shmem_init;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;

/// Most workers that can run at once.
pub(crate) const MAX_WORKERS: usize = 64;
/// Most partitions per worker whose progress the status view shows.
pub(crate) const MAX_PARTITIONS_SHOWN: usize = 128;
const ERROR_TEXT_LEN: usize = 480;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum WorkerKind {
    Subscription = 1,
    Publication = 2,
}

impl WorkerKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WorkerKind::Subscription => "subscription",
            WorkerKind::Publication => "publication",
        }
    }
}

/// What a worker is doing; only ever in memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum WorkerState {
    /// Claimed by the launcher, process not yet reporting.
    Starting,
    /// Consuming and applying.
    Running,
    /// The last attempt failed; waiting to try again (see `last_error`).
    Error,
    /// The launcher could not start the process (see `last_error`); it tries again later.
    LaunchFailed,
}

impl WorkerState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Running => "running",
            WorkerState::Error => "error",
            WorkerState::LaunchFailed => "failed to start",
        }
    }
}

#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct PartitionProgress {
    pub(crate) partition: i32,
    /// Next offset to consume, as last committed by this worker (-1: unknown yet).
    pub(crate) next_offset: i64,
    /// Broker's high watermark as last seen (-1: unknown yet).
    pub(crate) high_watermark: i64,
}

#[derive(Clone, Copy)]
pub(crate) struct WorkerSlot {
    pub(crate) in_use: bool,
    pub(crate) generation: u64,
    pub(crate) kind: WorkerKind,
    /// Database of the catalog that `object_id` refers to.
    pub(crate) database: pg_sys::Oid,
    pub(crate) object_id: i32,
    pub(crate) worker_index: i32,
    pub(crate) pid: i32,
    pub(crate) state: WorkerState,
    pub(crate) started_at: pg_sys::TimestampTz,
    pub(crate) processed_total: i64,
    pub(crate) processed_per_second: f64,
    pub(crate) last_error_at: pg_sys::TimestampTz,
    last_error: [u8; ERROR_TEXT_LEN],
    last_error_len: u16,
    pub(crate) partition_count: u16,
    pub(crate) partitions: [PartitionProgress; MAX_PARTITIONS_SHOWN],
    /// Publications: position `(commit LSN, seq)` of the last event committed to Kafka.
    pub(crate) published_lsn: u64,
    pub(crate) published_seq: i64,
    /// Publications: commit time of the transaction of that event.
    pub(crate) published_commit_time: pg_sys::TimestampTz,
    /// When the worker's process exited (0 while it runs or has not started): the launcher
    /// starts the next one after a backoff, and the slot keeps the error meanwhile.
    pub(crate) exited_at: pg_sys::TimestampTz,
    /// Set when the object's definition changed (`kafka.alter_*`): the worker starts a new
    /// session with the new definition.
    reload_requested: bool,
}

impl WorkerSlot {
    const EMPTY: WorkerSlot = WorkerSlot {
        in_use: false,
        generation: 0,
        kind: WorkerKind::Subscription,
        database: pg_sys::Oid::INVALID,
        object_id: 0,
        worker_index: 0,
        pid: 0,
        state: WorkerState::Starting,
        started_at: 0,
        processed_total: 0,
        processed_per_second: 0.0,
        last_error_at: 0,
        last_error: [0; ERROR_TEXT_LEN],
        last_error_len: 0,
        partition_count: 0,
        partitions: [PartitionProgress { partition: 0, next_offset: -1, high_watermark: -1 }; MAX_PARTITIONS_SHOWN],
        published_lsn: 0,
        published_seq: -1,
        published_commit_time: 0,
        exited_at: 0,
        reload_requested: false,
    };

    pub(crate) fn last_error(&self) -> Option<String> {
        (self.last_error_len > 0)
            .then(|| String::from_utf8_lossy(&self.last_error[..self.last_error_len as usize]).into_owned())
    }

    pub(crate) fn set_error(&mut self, message: &str) {
        let mut end = message.len().min(ERROR_TEXT_LEN);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.last_error[..end].copy_from_slice(&message.as_bytes()[..end]);
        self.last_error_len = end as u16;
        // SAFETY: GetCurrentTimestamp only reads the clock and cannot raise an error, so it is
        // fine under the registry lock (callers run this inside `update`).
        self.last_error_at = unsafe { pg_sys::GetCurrentTimestamp() };
    }

    pub(crate) fn partitions(&self) -> &[PartitionProgress] {
        &self.partitions[..self.partition_count as usize]
    }

    pub(crate) fn set_partitions(&mut self, progress: impl Iterator<Item = PartitionProgress>) {
        let mut n = 0;
        for (dst, src) in self.partitions.iter_mut().zip(progress) {
            *dst = src;
            n += 1;
        }
        self.partition_count = n;
    }
}

/// Most slot drops that can wait for their transaction's outcome at once.
const MAX_PENDING_SLOT_DROPS: usize = 256;
const SLOT_NAME_LEN: usize = 64;

/// A replication slot to drop once transaction `xid` has ended, if it ended as `when` says.
/// Slots are not transactional; this makes their drops follow the catalog's.
#[derive(Clone, Copy)]
pub(crate) struct PendingSlotDrop {
    pub(crate) xid: pg_sys::TransactionId,
    pub(crate) when: DropWhen,
    slot: [u8; SLOT_NAME_LEN],
    slot_len: u8,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum DropWhen {
    /// The publication (or the extension) was dropped: the slot goes if that commits.
    Committed,
    /// The slot was created for a publication: it goes if that rolls back.
    RolledBack,
}

impl PendingSlotDrop {
    pub(crate) fn slot_name(&self) -> String {
        String::from_utf8_lossy(&self.slot[..self.slot_len as usize]).into_owned()
    }
}

pub(crate) struct Registry {
    /// The launcher's process latch, `&MyProc->procLatch`, 0 while none runs. Kept as an
    /// integer, not a pointer, so that the registry holds no pointers; only
    /// [`wake_launcher`] turns it back into one. The address is valid in every backend: the
    /// PGPROC array lives in the main shared-memory segment, which is mapped at the same
    /// address in every process (children are forked from the postmaster; EXEC_BACKEND
    /// builds re-attach it at the same address) and never freed while the server runs.
    /// PostgreSQL keeps `Latch *` in shared memory the same way (ProcGlobal->walwriterLatch).
    launcher_latch: usize,
    next_generation: u64,
    slots: [WorkerSlot; MAX_WORKERS],
    slot_drops: [Option<PendingSlotDrop>; MAX_PENDING_SLOT_DROPS],
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            launcher_latch: 0,
            next_generation: 1,
            slots: [WorkerSlot::EMPTY; MAX_WORKERS],
            slot_drops: [None; MAX_PENDING_SLOT_DROPS],
        }
    }
}

// Registry is initialised from `Default` at shared-memory start-up and only ever written by
// this code, so every enum field holds a valid discriminant; all access goes through the
// PgLwLock below.
// SAFETY: Registry is plain old data of fixed size (integers, bools, Oids, fieldless enums,
// fixed arrays of `Copy` structs): no pointer, reference or heap allocation, so its bytes
// mean the same in every process loading this library. The one address, the launcher's
// latch, is stored as a `usize` and valid in every backend (see `launcher_latch`).
unsafe impl PGRXSharedMemory for Registry {}

// SAFETY: PgLwLock::new requires a name no other lock or shared-memory segment uses; this
// one is prefixed with the extension's name and used only here.
static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_kafka_bridge_registry") };

pub(crate) fn init() {
    pg_shmem_init!(REGISTRY);
}

/// Identifies one incarnation of a worker in its slot, so that a late update from a worker
/// that has gone never lands in a slot that was handed to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SlotId {
    pub(crate) index: usize,
    pub(crate) generation: u64,
}

impl SlotId {
    /// Encodes the id for a worker's `bgw_extra`.
    pub(crate) fn encode(self) -> String {
        format!("{}:{}", self.index, self.generation)
    }

    pub(crate) fn decode(s: &str) -> Option<SlotId> {
        let (index, generation) = s.split_once(':')?;
        let index = index.parse().ok().filter(|i| *i < MAX_WORKERS)?;
        Some(SlotId { index, generation: generation.parse().ok()? })
    }
}

/// Claims a free slot for a worker the launcher is about to start, for an object of the
/// launcher's database.
pub(crate) fn claim(kind: WorkerKind, object_id: i32, worker_index: i32) -> Option<SlotId> {
    let mut reg = REGISTRY.exclusive();
    let generation = reg.next_generation;
    let index = reg.slots.iter().position(|s| !s.in_use)?;
    reg.next_generation += 1;
    reg.slots[index] = WorkerSlot {
        in_use: true,
        generation,
        kind,
        // SAFETY: a plain Oid set once when the launcher connected; read on its main thread.
        database: unsafe { pg_sys::MyDatabaseId },
        object_id,
        worker_index,
        // SAFETY: only reads the clock; cannot raise an error while the registry lock is held.
        started_at: unsafe { pg_sys::GetCurrentTimestamp() },
        ..WorkerSlot::EMPTY
    };
    Some(SlotId { index, generation })
}

/// Records that the worker's process exited, with `code`: the slot stays claimed (with
/// its last error) until the launcher starts the next worker or lets it go. An exit with an
/// error that the worker did not report itself shows as its last error.
pub(crate) fn mark_exited(id: SlotId, code: i32) {
    update(id, |slot| {
        slot.pid = 0;
        // SAFETY: only reads the clock; cannot raise an error while the registry lock is held.
        slot.exited_at = unsafe { pg_sys::GetCurrentTimestamp() }.max(1);
        if code != 0 {
            if slot.last_error_at < slot.started_at {
                slot.set_error(&format!("the worker process exited with code {code}; see the server log"));
            }
            slot.state = WorkerState::Error;
        }
    });
}

/// Asks every worker of `kind` serving `object_id` in the current database to start a new
/// session with the object's new definition. Takes only the registry lock, so it may run
/// where no error may be raised (at commit).
pub(crate) fn request_reload(kind: WorkerKind, object_id: i32) {
    // SAFETY: a plain Oid set once when this backend connected; read on its main thread.
    let database = unsafe { pg_sys::MyDatabaseId };
    let mut reg = REGISTRY.exclusive();
    for slot in reg.slots.iter_mut().filter(|s| s.in_use && s.kind == kind && s.object_id == object_id) {
        if slot.database == database {
            slot.reload_requested = true;
        }
    }
}

/// Copies of the slots of the current database's workers of one kind.
pub(crate) fn slots_of(kind: WorkerKind) -> impl Iterator<Item = WorkerSlot> {
    // SAFETY: a plain Oid set once when this backend connected; read on its main thread.
    let database = unsafe { pg_sys::MyDatabaseId };
    snapshot().into_iter().map(|(_, s)| s).filter(move |s| s.database == database && s.kind == kind)
}

/// Whether a worker process of `kind` serving `object_id` in the current database runs.
pub(crate) fn has_live_workers(kind: WorkerKind, object_id: i32) -> bool {
    slots_of(kind).any(|s| s.object_id == object_id && s.pid > 0)
}

/// Whether a new session was asked for since the last call.
pub(crate) fn take_reload_request(id: SlotId) -> bool {
    update(id, |slot| std::mem::take(&mut slot.reload_requested)).unwrap_or(false)
}

pub(crate) fn release(id: SlotId) {
    let mut reg = REGISTRY.exclusive();
    let slot = &mut reg.slots[id.index];
    if slot.in_use && slot.generation == id.generation {
        *slot = WorkerSlot::EMPTY;
    }
}

/// Runs `f` on the slot if it still belongs to `id`; returns `None` if it does not.
pub(crate) fn update<R>(id: SlotId, f: impl FnOnce(&mut WorkerSlot) -> R) -> Option<R> {
    let mut reg = REGISTRY.exclusive();
    let slot = &mut reg.slots[id.index];
    (slot.in_use && slot.generation == id.generation).then(|| f(slot))
}

/// A copy of every slot in use, with its id.
pub(crate) fn snapshot() -> Vec<(SlotId, WorkerSlot)> {
    let reg = REGISTRY.share();
    reg.slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.in_use)
        .map(|(index, s)| (SlotId { index, generation: s.generation }, *s))
        .collect()
}

pub(crate) fn set_launcher_latch(latch: *mut pg_sys::Latch) {
    REGISTRY.exclusive().launcher_latch = latch as usize;
}

/// Wakes the launcher, if one runs, so that it looks at the catalog now.
pub(crate) fn wake_launcher() {
    let latch = REGISTRY.share().launcher_latch;
    if latch != 0 {
        // The launcher clears the value (`forget_launcher_latch`) before ProcKill frees its
        // PGPROC, and a crash restart re-creates the registry with 0. If the launcher exits
        // between the read above and SetLatch, the PGPROC may already serve another process:
        // that only wakes it spuriously, which every latch user tolerates.
        // SAFETY: a non-zero value is the launcher's `&MyProc->procLatch`, a latch in shared
        // memory at the same address in every backend (see `Registry::launcher_latch`), and
        // SetLatch may be called on another process's latch from any backend's main thread.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// Asks the launcher to drop replication slot `slot` once the current (sub)transaction ends
/// as `when` says (see [`PendingSlotDrop`]); assigns it an id. The subtransaction's own id
/// counts, so that a drop rolled back to a savepoint is rolled back even if the enclosing
/// transaction commits. Returns `false` if too many drops are waiting already.
pub(crate) fn drop_slot_at_end_of_transaction(slot: &str, when: DropWhen) -> bool {
    let mut name = [0; SLOT_NAME_LEN];
    let slot_len = slot.len().min(SLOT_NAME_LEN);
    name[..slot_len].copy_from_slice(&slot.as_bytes()[..slot_len]);
    // SAFETY: called on the main thread inside a transaction, which may be given an id (it
    // writes anyway); called before taking the registry lock, since it can raise an error.
    let xid = unsafe { pg_sys::GetCurrentTransactionId() };
    let entry = PendingSlotDrop { xid, when, slot: name, slot_len: slot_len as u8 };
    let mut reg = REGISTRY.exclusive();
    let Some(free) = reg.slot_drops.iter_mut().find(|d| d.is_none()) else {
        return false;
    };
    *free = Some(entry);
    true
}

/// The slot drops waiting for their transactions.
pub(crate) fn pending_slot_drops() -> Vec<PendingSlotDrop> {
    REGISTRY.share().slot_drops.iter().flatten().copied().collect()
}

/// Forgets a pending drop that was carried out or no longer applies.
pub(crate) fn forget_slot_drop(drop: &PendingSlotDrop) {
    let mut reg = REGISTRY.exclusive();
    if let Some(entry) =
        reg.slot_drops.iter_mut().find(|d| d.is_some_and(|d| d.xid == drop.xid && d.slot_name() == drop.slot_name()))
    {
        *entry = None;
    }
}

//! Worker slots in shared memory. The launcher claims a slot before it starts a worker; the
//! worker reports its state, progress and last error there; the status views copy the slots
//! out under a shared lock. Slots are reset with shared memory after a server crash.

use pgrx::lwlock::PgLwLock;
use pgrx::pg_shmem_init;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;

/// Most workers that can run at once.
pub const MAX_WORKERS: usize = 64;
/// Most partitions per worker whose progress the status view shows.
pub const MAX_PARTITIONS_SHOWN: usize = 128;
const ERROR_TEXT_LEN: usize = 480;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum WorkerKind {
    Subscription = 1,
    Publication = 2,
}

impl WorkerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerKind::Subscription => "subscription",
            WorkerKind::Publication => "publication",
        }
    }
}

/// What a worker is doing; only ever in memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum WorkerState {
    /// Claimed by the launcher, process not yet reporting.
    Starting,
    /// Consuming and applying.
    Running,
    /// The last attempt failed; waiting to try again (see `last_error`).
    Retrying,
    /// The launcher could not start the process (see `last_error`); it tries again later.
    LaunchFailed,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Running => "running",
            WorkerState::Retrying => "error",
            WorkerState::LaunchFailed => "failed to start",
        }
    }
}

#[derive(Clone, Copy, Default, Debug)]
pub struct PartitionProgress {
    pub partition: i32,
    /// Next offset to consume, as last committed by this worker (-1: unknown yet).
    pub next_offset: i64,
    /// Broker's high watermark as last seen (-1: unknown yet).
    pub high_watermark: i64,
}

#[derive(Clone, Copy)]
pub struct WorkerSlot {
    pub in_use: bool,
    pub generation: u64,
    pub kind: WorkerKind,
    /// Database of the catalog that `object_id` refers to.
    pub database: pg_sys::Oid,
    pub object_id: i32,
    pub worker_index: i32,
    pub pid: i32,
    pub state: WorkerState,
    pub started_at: pg_sys::TimestampTz,
    pub rows_total: i64,
    pub rows_per_second: f64,
    pub last_error_at: pg_sys::TimestampTz,
    last_error: [u8; ERROR_TEXT_LEN],
    last_error_len: u16,
    pub partition_count: u16,
    pub partitions: [PartitionProgress; MAX_PARTITIONS_SHOWN],
    /// Publications: position `(commit LSN, seq)` of the last event committed to Kafka.
    pub published_lsn: u64,
    pub published_seq: i64,
    /// Publications: commit time of the transaction of that event.
    pub published_commit_time: pg_sys::TimestampTz,
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
        rows_total: 0,
        rows_per_second: 0.0,
        last_error_at: 0,
        last_error: [0; ERROR_TEXT_LEN],
        last_error_len: 0,
        partition_count: 0,
        partitions: [PartitionProgress { partition: 0, next_offset: -1, high_watermark: -1 }; MAX_PARTITIONS_SHOWN],
        published_lsn: 0,
        published_seq: -1,
        published_commit_time: 0,
    };

    pub fn last_error(&self) -> Option<String> {
        (self.last_error_len > 0)
            .then(|| String::from_utf8_lossy(&self.last_error[..self.last_error_len as usize]).into_owned())
    }

    pub fn set_error(&mut self, message: &str) {
        let mut end = message.len().min(ERROR_TEXT_LEN);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.last_error[..end].copy_from_slice(&message.as_bytes()[..end]);
        self.last_error_len = end as u16;
        self.last_error_at = unsafe { pg_sys::GetCurrentTimestamp() };
    }

    pub fn partitions(&self) -> &[PartitionProgress] {
        &self.partitions[..self.partition_count as usize]
    }

    pub fn set_partitions(&mut self, progress: impl Iterator<Item = PartitionProgress>) {
        let mut n = 0;
        for (dst, src) in self.partitions.iter_mut().zip(progress) {
            *dst = src;
            n += 1;
        }
        self.partition_count = n;
    }
}

/// Most publications that can be being dropped at once.
const MAX_DROPPING: usize = 16;

/// A publication whose slot a backend is dropping: the launcher must not start its worker.
#[derive(Clone, Copy, Default)]
struct Dropping {
    database: pg_sys::Oid,
    publication_id: i32,
    /// The dropping backend; the entry lapses when that process is gone.
    pid: i32,
}

pub struct Registry {
    /// The launcher's process latch (an address in shared memory), 0 while none runs.
    launcher_latch: usize,
    next_generation: u64,
    slots: [WorkerSlot; MAX_WORKERS],
    dropping: [Dropping; MAX_DROPPING],
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            launcher_latch: 0,
            next_generation: 1,
            slots: [WorkerSlot::EMPTY; MAX_WORKERS],
            dropping: [Dropping::default(); MAX_DROPPING],
        }
    }
}

unsafe impl PGRXSharedMemory for Registry {}

static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_kafka_bridge_registry") };

pub fn init() {
    pg_shmem_init!(REGISTRY);
}

/// Identifies one incarnation of a worker in its slot, so that a late update from a worker
/// that has gone never lands in a slot that was handed to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotId {
    pub index: usize,
    pub generation: u64,
}

impl SlotId {
    /// Encodes the id for a worker's `bgw_extra`.
    pub fn encode(self) -> String {
        format!("{}:{}", self.index, self.generation)
    }

    pub fn decode(s: &str) -> Option<SlotId> {
        let (index, generation) = s.split_once(':')?;
        let index = index.parse().ok().filter(|i| *i < MAX_WORKERS)?;
        Some(SlotId { index, generation: generation.parse().ok()? })
    }
}

/// Claims a free slot for a worker the launcher is about to start, for an object of the
/// launcher's database.
pub fn claim(kind: WorkerKind, object_id: i32, worker_index: i32) -> Option<SlotId> {
    let mut reg = REGISTRY.exclusive();
    let generation = reg.next_generation;
    let index = reg.slots.iter().position(|s| !s.in_use)?;
    reg.next_generation += 1;
    reg.slots[index] = WorkerSlot {
        in_use: true,
        generation,
        kind,
        database: unsafe { pg_sys::MyDatabaseId },
        object_id,
        worker_index,
        started_at: unsafe { pg_sys::GetCurrentTimestamp() },
        ..WorkerSlot::EMPTY
    };
    Some(SlotId { index, generation })
}

pub fn release(id: SlotId) {
    let mut reg = REGISTRY.exclusive();
    let slot = &mut reg.slots[id.index];
    if slot.in_use && slot.generation == id.generation {
        *slot = WorkerSlot::EMPTY;
    }
}

/// Runs `f` on the slot if it still belongs to `id`; returns `None` if it does not.
pub fn update<R>(id: SlotId, f: impl FnOnce(&mut WorkerSlot) -> R) -> Option<R> {
    let mut reg = REGISTRY.exclusive();
    let slot = &mut reg.slots[id.index];
    (slot.in_use && slot.generation == id.generation).then(|| f(slot))
}

/// A copy of every slot in use, with its id.
pub fn snapshot() -> Vec<(SlotId, WorkerSlot)> {
    let reg = REGISTRY.share();
    reg.slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.in_use)
        .map(|(index, s)| (SlotId { index, generation: s.generation }, *s))
        .collect()
}

pub fn set_launcher_latch(latch: *mut pg_sys::Latch) {
    REGISTRY.exclusive().launcher_latch = latch as usize;
}

/// Wakes the launcher, if one runs, so that it looks at the catalog now.
pub fn wake_launcher() {
    let latch = REGISTRY.share().launcher_latch;
    if latch != 0 {
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// Marks a publication of the current database as being dropped by this backend, so that no
/// worker is started for it until [`end_dropping`]. Fails if too many drops run at once.
pub fn begin_dropping(publication_id: i32) -> bool {
    let (database, pid) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
    let mut reg = REGISTRY.exclusive();
    let Some(entry) = reg.dropping.iter_mut().find(|d| d.pid == 0 || !process_alive(d.pid)) else {
        return false;
    };
    *entry = Dropping { database, publication_id, pid };
    true
}

/// Ends every drop this backend began.
pub fn end_dropping() {
    let pid = unsafe { pg_sys::MyProcPid };
    for entry in REGISTRY.exclusive().dropping.iter_mut().filter(|d| d.pid == pid) {
        *entry = Dropping::default();
    }
}

/// Whether a live backend is dropping the publication.
pub fn is_dropping(database: pg_sys::Oid, publication_id: i32) -> bool {
    REGISTRY
        .share()
        .dropping
        .iter()
        .any(|d| d.pid != 0 && d.database == database && d.publication_id == publication_id && process_alive(d.pid))
}

fn process_alive(pid: i32) -> bool {
    unsafe { libc::kill(pid, 0) == 0 }
}

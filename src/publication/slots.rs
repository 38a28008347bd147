//! A publication's logical replication slot: its name, its creation, and its drop.
//!
//! Slots are not transactional, the catalog is. So a slot is never dropped by the
//! transaction that drops its publication (or the extension): that transaction only asks
//! the launcher, through shared memory, to drop the slot once it has committed; a rollback
//! leaves slot and publication as they were. Likewise a slot made for a publication whose
//! creation rolls back is dropped by the launcher after the rollback. Slot names carry the
//! database's OID, so that publications of the same name in two databases never share or
//! drop each other's slot, and a slot of another database is never touched.

use super::plugin::PLUGIN;
use crate::catalog::query_optional;
use crate::compat;
use crate::error::{BridgeError, Result};
use crate::security;
use crate::shmem::{self, DropWhen, PendingSlotDrop};
use crate::worker;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How long `create_publication` waits for the launcher to drop a slot of the same name.
const DROP_WAIT: Duration = Duration::from_secs(30);

/// Slot names: this prefix, the database's OID, `_`, the publication's name. (Version 0.1.0
/// named them with the prefix and the name only; publications upgraded from it keep their
/// slot, so code that looks for the extension's slots goes by prefix, plugin and database.)
const SLOT_PREFIX: &str = "pg_kafka_bridge_";
/// Longest publication name: a slot name has at most 63 bytes, and an OID 10 digits.
pub(crate) const MAX_PUBLICATION_NAME: usize = 63 - SLOT_PREFIX.len() - 10 - 1;

/// The slot of publication `name` in the current database.
pub(crate) fn slot_name(name: &str) -> String {
    // SAFETY: reads a backend-global set at connection start.
    let database = unsafe { pg_sys::MyDatabaseId };
    format!("{SLOT_PREFIX}{}_{name}", database.to_u32())
}

/// Creates slot `slot` for a publication being created in this transaction, and has it
/// dropped again if the transaction rolls back. Only the launcher ever drops a slot, so a
/// slot of that name that is waiting for its drop (a creation that rolled back, a drop that
/// committed) is waited for; one that is not is left alone and reported. Must run before
/// the transaction writes anything (PostgreSQL creates slots only then), after
/// [`lock_publication_catalog`].
pub(crate) fn create(slot: &str) -> Result<()> {
    let deadline = Instant::now() + DROP_WAIT;
    while let Some(pending) = shmem::pending_slot_drops().into_iter().find(|p| p.slot_name() == slot) {
        // SAFETY: a lookup in this backend's transaction state.
        if unsafe { pg_sys::TransactionIdIsCurrentTransactionId(pending.xid) } {
            return Err(BridgeError::NotInPrerequisiteState(format!(
                "a publication with slot \"{slot}\" was dropped in this transaction; create it again after the commit"
            )));
        }
        if Instant::now() > deadline {
            return Err(BridgeError::NotInPrerequisiteState(format!(
                "replication slot \"{slot}\" of a dropped publication is still waiting to be dropped; try again"
            )));
        }
        shmem::wake_launcher();
        // SAFETY: a plain sleep of the calling backend.
        unsafe { pg_sys::pg_usleep(20_000) };
        worker::check_interrupts();
    }
    let exists = query_optional::<bool>(
        "SELECT true FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
        &[slot.into()],
    )?
    .is_some();
    if exists {
        return Err(BridgeError::NotInPrerequisiteState(format!(
            "replication slot \"{slot}\" exists but no publication uses it (left by a server crash during \
             create_publication?); drop it with pg_drop_replication_slot('{slot}') and try again"
        )));
    }
    let failover = crate::settings::failover_slots();
    if failover && !compat::FAILOVER_SLOTS {
        return Err(BridgeError::FeatureNotSupported(
            "pg_kafka_bridge.failover_slots needs PostgreSQL 17 or later; turn it off to create publications".into(),
        ));
    }
    if compat::FAILOVER_SLOTS {
        run_read_only(compat::CREATE_SLOT_SQL, &[slot.into(), PLUGIN.into(), failover.into()])?;
    } else {
        run_read_only(compat::CREATE_SLOT_SQL, &[slot.into(), PLUGIN.into()])?;
    }
    if !shmem::drop_slot_at_end_of_transaction(slot, DropWhen::RolledBack) {
        drop_slot(slot)?;
        return Err(too_many_drops());
    }
    Ok(())
}

/// Has the launcher drop `slot` once the current transaction, which drops its publication,
/// has committed.
pub(crate) fn drop_at_commit(slot: &str) -> Result<()> {
    if shmem::drop_slot_at_end_of_transaction(slot, DropWhen::Committed) {
        // The launcher takes a commit it can see for final: it must be on disk before the
        // slot goes, or a crash could bring the publication back without its slot (as
        // DROP DATABASE does for the same reason).
        // SAFETY: only sets a flag of the current transaction.
        unsafe { pg_sys::ForceSyncCommit() };
        Ok(())
    } else {
        Err(too_many_drops())
    }
}

fn too_many_drops() -> BridgeError {
    BridgeError::NotInPrerequisiteState(
        "too many replication slots are waiting to be dropped; try again in a few seconds".into(),
    )
}

/// Serialises the creation of publications until the transaction ends, and makes it wait
/// for transactions that drop publications.
pub(crate) fn lock_publication_catalog() -> Result<()> {
    let relid =
        query_optional::<pg_sys::Oid>("SELECT 'kafka.publication_catalog'::pg_catalog.regclass::pg_catalog.oid", &[])?
            .ok_or_else(|| BridgeError::UndefinedObject { kind: "table", name: "kafka.publication_catalog".into() })?;
    // SAFETY: locks a relation that exists, by OID, inside a transaction; taking a lock does
    // not give the transaction an id, so a slot can still be created after it.
    unsafe { pg_sys::LockRelationOid(relid, pg_sys::ShareRowExclusiveLock as pg_sys::LOCKMODE) };
    Ok(())
}

/// Runs a query on a slot read-only: pgrx's read-write queries assign a transaction id,
/// and PostgreSQL refuses to create a slot in a transaction that has one.
fn run_read_only(sql: &str, args: &[DatumWithOid]) -> Result<()> {
    Spi::connect(|client| client.select(sql, None, args).map(|_| ()))?;
    Ok(())
}

fn drop_slot(slot: &str) -> Result<()> {
    run_read_only("SELECT pg_catalog.pg_drop_replication_slot($1)", &[slot.into()])
}

/// `DROP EXTENSION`: every slot of the extension's publications in this database is dropped
/// once the dropping transaction commits. Called from the object-access hook.
fn drop_all_at_commit() -> Result<()> {
    let slots: Vec<String> = Spi::connect(|client| {
        let rows = client.select(
            "SELECT slot_name::pg_catalog.text FROM pg_catalog.pg_replication_slots \
              WHERE plugin = $1 AND datoid = $2 AND pg_catalog.starts_with(slot_name::pg_catalog.text, $3)",
            None,
            // SAFETY: reads a backend-global set at connection start.
            &[PLUGIN.into(), unsafe { pg_sys::MyDatabaseId }.into(), SLOT_PREFIX.into()],
        )?;
        rows.into_iter().map(|row| Ok(row.get::<String>(1)?.unwrap_or_default())).collect::<Result<_>>()
    })?;
    slots.iter().try_for_each(|slot| drop_at_commit(slot))
}

/// Drops the slots of this database's publications that no publication uses and no drop is
/// waiting for: drops whose commit the shared-memory queue lost in a server crash. Run by
/// the launcher when it starts; the lock makes creations of publications wait meanwhile, so
/// a slot being created is never mistaken for one.
pub(crate) fn drop_orphans() -> Result<()> {
    if !crate::catalog::extension_installed()? {
        return Ok(());
    }
    lock_publication_catalog()?;
    let orphans: Vec<String> = Spi::connect(|client| {
        let rows = client.select(
            "SELECT r.slot_name::pg_catalog.text FROM pg_catalog.pg_replication_slots r \
              WHERE r.plugin = $1 AND r.datoid = $2 AND r.active_pid IS NULL \
                AND pg_catalog.starts_with(r.slot_name::pg_catalog.text, $3) \
                AND NOT EXISTS (SELECT 1 FROM kafka.publication_catalog p WHERE p.slot_name = r.slot_name)",
            None,
            // SAFETY: reads a backend-global set at connection start.
            &[PLUGIN.into(), unsafe { pg_sys::MyDatabaseId }.into(), SLOT_PREFIX.into()],
        )?;
        rows.into_iter().map(|row| Ok(row.get::<String>(1)?.unwrap_or_default())).collect::<Result<_>>()
    })?;
    let pending = shmem::pending_slot_drops();
    for slot in orphans.iter().filter(|slot| !pending.iter().any(|p| p.slot_name() == **slot)) {
        log!("pg_kafka_bridge launcher: dropping replication slot \"{slot}\", which no publication uses");
        drop_slot(slot)?;
    }
    Ok(())
}

/// Carries out the drops whose transactions have ended (run by the launcher). Returns
/// whether some still wait: for their transaction, or for a worker to let go of the slot.
pub(crate) fn drop_pending() -> bool {
    let mut waiting = false;
    for pending in shmem::pending_slot_drops() {
        match worker::transaction(|| carry_out(&pending)) {
            Ok(true) => shmem::forget_slot_drop(&pending),
            Ok(false) => waiting = true,
            Err(e) => {
                log!("pg_kafka_bridge launcher: dropping replication slot \"{}\": {e}", pending.slot_name());
                waiting = true;
            }
        }
    }
    waiting
}

/// Drops the slot if its transaction ended as the drop asks. `Ok(true)`: done with (dropped,
/// gone already, or not to be dropped); `Ok(false)`: ask again later.
fn carry_out(pending: &PendingSlotDrop) -> Result<bool> {
    // SAFETY: transaction status lookups, in the order PostgreSQL prescribes (in progress
    // first, then committed).
    let committed = unsafe {
        if pg_sys::TransactionIdIsInProgress(pending.xid) {
            return Ok(false);
        }
        pg_sys::TransactionIdDidCommit(pending.xid)
    };
    if committed != (pending.when == DropWhen::Committed) {
        return Ok(true);
    }
    let slot = pending.slot_name();
    let holder = query_optional::<i32>(
        "SELECT coalesce(active_pid, 0) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
        &[slot.as_str().into()],
    )?;
    match holder {
        None => Ok(true),
        // The publication's worker is being stopped.
        Some(pid) if pid != 0 => Ok(false),
        Some(_) => {
            drop_slot(&slot)?;
            Ok(true)
        }
    }
}

static mut PREVIOUS_OBJECT_ACCESS_HOOK: pg_sys::object_access_hook_type = None;

/// Installs the hook that sees `DROP EXTENSION pg_kafka_bridge`; called from `_PG_init`.
pub(crate) fn install_drop_extension_hook() {
    // SAFETY: _PG_init runs once per process, on the main thread, before any hook can fire;
    // the previous hook is kept and called first.
    unsafe {
        PREVIOUS_OBJECT_ACCESS_HOOK = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(on_object_access);
    }
}

/// # Safety
/// Called by PostgreSQL's object-access machinery on the main thread, inside the
/// transaction doing the access, with the arguments it passes on to the previous hook.
#[pg_guard]
unsafe extern "C-unwind" fn on_object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: i32,
    arg: *mut std::ffi::c_void,
) {
    // SAFETY: the previous hook, if any, was installed by another library for this process.
    if let Some(previous) = unsafe { PREVIOUS_OBJECT_ACCESS_HOOK } {
        unsafe { previous(access, class_id, object_id, sub_id, arg) };
    }
    if access != pg_sys::ObjectAccessType::OAT_DROP || class_id != pg_sys::ExtensionRelationId {
        return;
    }
    // SAFETY: a catalog lookup by name inside the dropping transaction; the extension's row
    // is still there while its drop hook runs.
    let ours = unsafe { pg_sys::get_extension_oid(c"pg_kafka_bridge".as_ptr(), true) };
    if object_id == ours {
        security::with_pinned_search_path(drop_all_at_commit).unwrap_or_else(|e| e.raise());
    }
}

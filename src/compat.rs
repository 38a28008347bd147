//! The differences between the supported PostgreSQL versions (15, 16, 17 and 18), one
//! function each, so that the rest of the code is the same for all of them. Each names the
//! versions and the change.

use pgrx::pg_sys;

/// The attribute `index` of a tuple descriptor (PostgreSQL 18 reaches attributes through
/// `TupleDescAttr` only, as it added a compact copy of them).
///
/// # Safety
/// `tupdesc` is a live tuple descriptor and `index < natts`.
pub(crate) unsafe fn attribute<'a>(tupdesc: pg_sys::TupleDesc, index: usize) -> &'a pg_sys::FormData_pg_attribute {
    #[cfg(feature = "pg18")]
    // SAFETY: the caller's bounds; TupleDescAttr returns a pointer into the descriptor.
    unsafe {
        &*pg_sys::TupleDescAttr(tupdesc, index as i32)
    }
    #[cfg(not(feature = "pg18"))]
    // SAFETY: the caller's bounds; `attrs` is the descriptor's trailing array of `natts`.
    unsafe {
        &(*tupdesc).attrs.as_slice(index + 1)[index]
    }
}

/// The old and new tuples of a row change, each null when absent (PostgreSQL 17 replaced
/// the reorder buffer's `ReorderBufferTupleBuf` wrappers with plain heap tuples).
///
/// # Safety
/// `change` is a row change (insert, update, delete) the reorder buffer handed over.
pub(crate) unsafe fn change_tuples(
    change: *mut pg_sys::ReorderBufferChange,
) -> [Option<*mut pg_sys::HeapTupleData>; 2] {
    // SAFETY: for row changes the `tp` member of the union is the one in use.
    let tuples = unsafe { &(*change).data.tp };
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    // SAFETY: a non-null buffer holds its tuple inline.
    let tuple = |buf: *mut pg_sys::ReorderBufferTupleBuf| (!buf.is_null()).then(|| unsafe { &raw mut (*buf).tuple });
    #[cfg(not(any(feature = "pg15", feature = "pg16")))]
    let tuple = |tuple: pg_sys::HeapTuple| (!tuple.is_null()).then_some(tuple);
    [tuple(tuples.oldtuple), tuple(tuples.newtuple)]
}

/// Checks, as COPY FROM does, that the current user may insert into the columns `attnums`
/// of the relation just added to `pstate` as `nsitem`; raises an ERROR if not. (PostgreSQL
/// 16 moved the required permissions from the range table entry to `RTEPermissionInfo`.)
///
/// # Safety
/// `pstate` and `nsitem` come from `addRangeTableEntryForRelation` in this transaction.
pub(crate) unsafe fn check_insert_permission(
    pstate: *mut pg_sys::ParseState,
    nsitem: *mut pg_sys::ParseNamespaceItem,
    attnums: impl Iterator<Item = i16>,
) {
    // SAFETY: the caller's pointers are live; the bitmapset is allocated in the current
    // memory context, as the executor expects.
    unsafe {
        #[cfg(feature = "pg15")]
        let permissions = (*nsitem).p_rte;
        #[cfg(not(feature = "pg15"))]
        let permissions = (*nsitem).p_perminfo;
        (*permissions).requiredPerms = pg_sys::ACL_INSERT as pg_sys::AclMode;
        for attnum in attnums {
            let bit = i32::from(attnum) - pg_sys::FirstLowInvalidHeapAttributeNumber;
            (*permissions).insertedCols = pg_sys::bms_add_member((*permissions).insertedCols, bit);
        }
        #[cfg(feature = "pg15")]
        pg_sys::ExecCheckRTPerms((*pstate).p_rtable, true);
        #[cfg(not(feature = "pg15"))]
        pg_sys::ExecCheckPermissions((*pstate).p_rtable, (*pstate).p_rteperminfos, true);
    }
}

/// Acquires replication slot `name` for this process, failing at once if another holds it
/// (PostgreSQL 18 added whether to fail on an invalidated slot: it does, as before).
///
/// # Safety
/// On the main thread of a process that holds no slot.
pub(crate) unsafe fn acquire_slot(name: &std::ffi::CStr) {
    // SAFETY: the caller's conditions; `name` is NUL-terminated and outlives the call.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), true);
        #[cfg(feature = "pg18")]
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), true, true);
    }
}

/// Installs a signal handler (PostgreSQL 18 renamed the backend's `pqsignal`).
///
/// # Safety
/// `handler` is safe to run as a signal handler of this process.
pub(crate) unsafe fn set_signal_handler(signal: u32, handler: unsafe extern "C-unwind" fn(std::ffi::c_int)) {
    // SAFETY: the caller's condition; pqsignal only installs the handler.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(signal as i32, Some(handler));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(signal as i32, Some(handler));
    }
}

// Exported by the server, not declared by pgrx's bindings.
// SAFETY: the prototypes of replication/message.h: PostgreSQL 17 added `flush`.
extern "C-unwind" {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
    #[cfg(not(any(feature = "pg15", feature = "pg16")))]
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
        flush: bool,
    ) -> pg_sys::XLogRecPtr;
}

/// Writes a transactional logical decoding message into the WAL: decoded, and published,
/// if and only if the current transaction commits, in commit order.
///
/// # Safety
/// On the main thread inside a transaction that may be given a transaction id.
pub(crate) unsafe fn log_transactional_message(prefix: &std::ffi::CStr, message: &[u8]) {
    // SAFETY: the caller's conditions; both buffers outlive the call, which copies them into
    // the WAL record. The FFI guard turns an ERROR raised inside (no transaction id during
    // recovery, say) into a Rust unwind, so the callers' destructors run.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            #[cfg(any(feature = "pg15", feature = "pg16"))]
            LogLogicalMessage(prefix.as_ptr(), message.as_ptr().cast(), message.len(), true);
            // A transactional message is flushed with its transaction's commit record.
            #[cfg(not(any(feature = "pg15", feature = "pg16")))]
            LogLogicalMessage(prefix.as_ptr(), message.as_ptr().cast(), message.len(), true, false);
        })
    };
}

/// Whether logical slots can be marked for synchronisation to standbys (PostgreSQL 17
/// added failover slots).
pub(crate) const FAILOVER_SLOTS: bool = cfg!(not(any(feature = "pg15", feature = "pg16")));

/// The query that creates a logical slot: `$1` the name, `$2` the output plugin, `$3`
/// whether it is a failover slot (only where [`FAILOVER_SLOTS`]; PostgreSQL 17 added the
/// argument).
pub(crate) const CREATE_SLOT_SQL: &str = if FAILOVER_SLOTS {
    "SELECT pg_catalog.pg_create_logical_replication_slot($1, $2, false, false, $3)"
} else {
    "SELECT pg_catalog.pg_create_logical_replication_slot($1, $2)"
};

/// One row per logical slot of output plugin `$1` in database `$2`: name, failover flag,
/// inactive since, invalidation reason, and when an inactive slot will be invalidated for
/// idleness. Columns a version lacks are NULL: failover slots, `inactive_since` and
/// `invalidation_reason` came with PostgreSQL 17 (before it, a slot whose WAL was removed
/// shows `wal_status` `lost`), `idle_replication_slot_timeout` with 18 (the invalidation
/// itself happens at the next checkpoint after that time).
pub(crate) const SLOT_DETAILS_SQL: &str = {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    let sql = "SELECT slot_name::pg_catalog.text, NULL::boolean, NULL::pg_catalog.timestamptz, \
                      CASE WHEN wal_status = 'lost' THEN 'wal_removed' END, NULL::pg_catalog.timestamptz \
                 FROM pg_catalog.pg_replication_slots WHERE plugin = $1 AND datoid = $2";
    #[cfg(feature = "pg17")]
    let sql = "SELECT slot_name::pg_catalog.text, failover, inactive_since, invalidation_reason, \
                      NULL::pg_catalog.timestamptz \
                 FROM pg_catalog.pg_replication_slots WHERE plugin = $1 AND datoid = $2";
    #[cfg(feature = "pg18")]
    let sql = "SELECT slot_name::pg_catalog.text, failover, inactive_since, invalidation_reason, \
                      CASE WHEN invalidation_reason IS NULL \
                            AND pg_catalog.current_setting('idle_replication_slot_timeout') <> '0' \
                           THEN inactive_since \
                                + pg_catalog.current_setting('idle_replication_slot_timeout')::pg_catalog.interval END \
                 FROM pg_catalog.pg_replication_slots WHERE plugin = $1 AND datoid = $2";
    sql
};

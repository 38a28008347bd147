//! The SQL API: thin functions that check their arguments and the caller's rights, write the
//! catalog, and wake the launcher when the transaction commits.

mod publication;
mod status;
mod subscription;

use crate::error::{BridgeError, Result};
use pgrx::prelude::*;

/// Warns when the current database is not the one whose objects the workers serve.
fn warn_if_workers_run_elsewhere(kind: &str, name: &str) {
    let database = crate::settings::database();
    // SAFETY: called from SQL functions, on the backend's main thread inside a transaction
    // (get_database_name reads the syscache). It returns NULL only for a database that does
    // not exist, and MyDatabaseId is the database this backend is connected to, which DROP
    // DATABASE refuses to remove while anyone is (CountOtherDBBackends): so the result is a
    // non-NULL palloc'd NUL-terminated copy, valid until the memory context is reset.
    let current = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_database_name(pg_sys::MyDatabaseId)) }
        .to_string_lossy()
        .into_owned();
    if current != database {
        warning!(
            "{kind} \"{name}\" will not run in this database: workers run only in database \"{database}\" (pg_kafka_bridge.database)"
        );
    }
}

/// Kafka's rules for topic names.
fn check_topic_name(topic: &str) -> Result<()> {
    crate::kafka::topic_name_problem(topic).map_or(Ok(()), |problem| Err(BridgeError::InvalidParameter(problem)))
}

/// Fails unless `caller` has the privileges of `owner`, the owner of object `name`.
fn check_owner(caller: pg_sys::Oid, owner: pg_sys::Oid, kind: &str, name: &str) -> Result<()> {
    // SAFETY: a role-membership lookup by OID (syscache, membership cache) on the main
    // thread inside the calling transaction; takes and returns plain values, and an unknown
    // role simply has no privileges.
    if unsafe { pg_sys::has_privs_of_role(caller, owner) } {
        Ok(())
    } else {
        Err(BridgeError::InsufficientPrivilege(format!("must be owner of {kind} \"{name}\"")))
    }
}

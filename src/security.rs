//! Who runs what. The extension's own SQL runs as the bootstrap superuser (workers, and
//! catalog writes of the SQL functions, whose callers are checked first); everything that
//! touches a user's table, and so may run user-defined code (triggers, defaults, domain
//! checks, input functions of user types), runs as the owner of the subscription in a
//! security-restricted operation.
//!
//! The rule for SQL the extension runs on its own behalf: it runs with `search_path =
//! pg_catalog, pg_temp` (set for the whole session in workers, by `SET` on every SQL
//! function, and again here for catalog writes), and names its own objects schema-qualified.
//! So no object that another role created (an operator `public.=(oid, regtype)`, say) can
//! take the place of a built-in one: operators and functions are never looked up in
//! `pg_temp`, and `pg_catalog` is searched first. Operators of non-built-in types are named
//! with `OPERATOR(schema.op)`.
//!
//! Either way, settings changed inside (a `set_config` in an owner's trigger, say) are undone
//! when the stretch ends, as PostgreSQL does for its own security-restricted operations, so
//! that code of one role never changes what the next statement of another role resolves to.

use crate::error::{BridgeError, Result};
use crate::settings::{set_server_setting, SettingScope};
use pgrx::pg_sys;
use std::ffi::CStr;

/// Runs `f` as `owner`, the owner of a subscription, in a security-restricted operation, so
/// that the owner's code (triggers, defaults, domain checks) runs with the owner's rights
/// and cannot change the session. The previous user and settings are restored when `f`
/// returns; if `f` raises an error, the (sub)transaction's abort restores them.
pub(crate) fn as_table_owner<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    run_as(owner, true, None, f)
}

/// The search path of every statement the extension runs on its own behalf.
pub(crate) const PINNED_SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

/// Runs `f` as the bootstrap superuser, which owns the extension's catalog tables, with a
/// search path that no caller can have put objects of its own on.
pub(crate) fn as_catalog_owner<R>(f: impl FnOnce() -> R) -> R {
    run_as(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), false, Some(PINNED_SEARCH_PATH), f)
}

/// Runs `f` as the current user with the pinned search path: for the extension's own SQL
/// where PostgreSQL calls it with the user's settings (the object-access hook).
pub(crate) fn with_pinned_search_path<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: reads the current user of this backend.
    let user = unsafe { pg_sys::GetUserId() };
    run_as(user, false, Some(PINNED_SEARCH_PATH), f)
}

/// Pins the search path of a background worker's session (see the module's rule). Owner
/// code that the worker runs sees the same path, as with PostgreSQL's own logical
/// replication workers: it cannot be redirected by objects of others either.
pub(crate) fn pin_session_search_path() {
    set_server_setting(c"search_path", PINNED_SEARCH_PATH, SettingScope::Session);
}

/// Runs `f` as `role`, with `search_path` if given, in a security-restricted operation if
/// `restricted`; settings changed inside are undone when `f` returns.
fn run_as<R>(role: pg_sys::Oid, restricted: bool, search_path: Option<&CStr>, f: impl FnOnce() -> R) -> R {
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    let mut flags = pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32;
    if restricted {
        flags |= pg_sys::SECURITY_RESTRICTED_OPERATION as i32;
    }
    // SAFETY: on the main thread inside a transaction, as PostgreSQL's own callers of
    // SetUserIdAndSecContext do (e.g. ExecRefreshMatView): the out-pointers are live locals.
    // The nest level and user are restored below, or by the (sub)transaction abort.
    let nest_level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(role, context | flags);
        pg_sys::NewGUCNestLevel()
    };
    if let Some(path) = search_path {
        set_server_setting(c"search_path", path, SettingScope::NestLevel);
    }
    let result = f();
    // SAFETY: same thread and transaction as above; `nest_level` is the level opened above
    // (an `f` that raised an error never gets here), so AtEOXact_GUC(false) undoes exactly
    // the settings changed since, and the saved user and context are put back.
    unsafe {
        pg_sys::AtEOXact_GUC(false, nest_level);
        pg_sys::SetUserIdAndSecContext(user, context);
    }
    result
}

/// Fails unless `role` may read every row of table `relid` (named `table` in messages):
/// SELECT on the whole table, and no row-level security policy that would hide rows from
/// it. A publication publishes every row from the WAL, so it may only publish tables whose
/// every row its owner could read with a query.
pub(crate) fn check_reads_every_row(relid: pg_sys::Oid, role: pg_sys::Oid, table: &str) -> Result<()> {
    // SAFETY: catalog lookups by OID inside a transaction; both return a status, not a pointer.
    let (readable, rls) = unsafe {
        (
            pg_sys::pg_class_aclcheck(relid, role, pg_sys::ACL_SELECT as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK,
            pg_sys::check_enable_rls(relid, role, true),
        )
    };
    if !readable {
        return Err(BridgeError::InsufficientPrivilege(format!("permission denied to read {table}")));
    }
    if rls == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
        return Err(BridgeError::InsufficientPrivilege(format!(
            "row-level security hides rows of {table} from role \"{}\": publish it as the table's owner or a role with BYPASSRLS",
            role_name(role)
        )));
    }
    Ok(())
}

/// The name of `role`, or its OID for a role that no longer exists.
pub(crate) fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: with noerr, GetUserNameFromId returns NULL for a missing role or a palloc'd,
    // NUL-terminated copy of the name.
    let name = unsafe { pg_sys::GetUserNameFromId(role, true) };
    if name.is_null() {
        return format!("{}", role.to_u32());
    }
    // SAFETY: checked non-NULL above; the string lives until the memory context is reset.
    unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

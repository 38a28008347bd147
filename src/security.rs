//! Switching the current user for a stretch of work: catalog writes run as the bootstrap
//! superuser (callers are checked first); rows are written as the subscription's owner.
//!
//! Either way, settings changed inside (a `set_config` in an owner's trigger, say) are undone
//! when the stretch ends, as PostgreSQL does for its own security-restricted operations, so
//! that code of one role never changes what the next statement of another role resolves to.

use pgrx::pg_sys;
use std::ffi::CStr;

/// Runs `f` with `role` as the current user. With `restricted`, `f` also runs as a
/// security-restricted operation, so that code of the role's (triggers, defaults) cannot
/// change the session. The previous user and settings are restored when `f` returns; if `f`
/// raises an error, the (sub)transaction's abort restores them.
pub fn run_as<R>(role: pg_sys::Oid, restricted: bool, f: impl FnOnce() -> R) -> R {
    run_as_with_search_path(role, restricted, None, f)
}

/// Runs `f` as the bootstrap superuser, which owns the extension's catalog tables, with a
/// search path that no caller can have put objects of its own on.
pub fn as_catalog_owner<R>(f: impl FnOnce() -> R) -> R {
    run_as_with_search_path(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), false, Some(c"pg_catalog, pg_temp"), f)
}

fn run_as_with_search_path<R>(
    role: pg_sys::Oid,
    restricted: bool,
    search_path: Option<&CStr>,
    f: impl FnOnce() -> R,
) -> R {
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    let mut flags = pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32;
    if restricted {
        flags |= pg_sys::SECURITY_RESTRICTED_OPERATION as i32;
    }
    let nest_level = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(role, context | flags);
        let nest_level = pg_sys::NewGUCNestLevel();
        if let Some(path) = search_path {
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                path.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        nest_level
    };
    let result = f();
    unsafe {
        pg_sys::AtEOXact_GUC(false, nest_level);
        pg_sys::SetUserIdAndSecContext(user, context);
    }
    result
}

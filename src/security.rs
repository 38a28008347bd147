//! Switching the current user for a stretch of work: catalog writes run as the bootstrap
//! superuser (callers are checked first); rows are written as the subscription's owner.

use pgrx::pg_sys;

/// Runs `f` with `role` as the current user. With `restricted`, `f` also runs as a
/// security-restricted operation, so that code of the role's (triggers, defaults) cannot
/// change the worker's session. The previous user is restored when `f` returns; if `f`
/// raises an error, the transaction's abort restores it.
pub fn run_as<R>(role: pg_sys::Oid, restricted: bool, f: impl FnOnce() -> R) -> R {
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    let mut flags = pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32;
    if restricted {
        flags |= pg_sys::SECURITY_RESTRICTED_OPERATION as i32;
    }
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(role, context | flags);
    }
    let result = f();
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    result
}

/// Runs `f` as the bootstrap superuser, which owns the extension's catalog tables.
pub fn as_catalog_owner<R>(f: impl FnOnce() -> R) -> R {
    run_as(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), false, f)
}

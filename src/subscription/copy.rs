//! Writing rows with PostgreSQL's own COPY FROM machinery (`BeginCopyFrom` with a data
//! callback, then `CopyFrom`), which brings multi-row inserts, index maintenance, constraints,
//! triggers and partition routing, exactly as `COPY ... FROM STDIN` does.

use pgrx::pg_sys;
use pgrx::PgTupleDesc;
use std::cell::Cell;
use std::ffi::CString;

thread_local! {
    /// The COPY text not yet handed to `CopyFrom`. COPY's data callback takes no argument, so
    /// the data is parked here for the duration of one `copy_rows` call.
    static PENDING: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// Resets [`PENDING`] to `(null, 0)` when dropped, so that it never outlives the text it
/// points to, also when `BeginCopyFrom` or `CopyFrom` raises an ERROR: pgrx turns it into a
/// Rust panic that unwinds through `copy_rows`, running this drop.
struct ClearPending;

impl Drop for ClearPending {
    fn drop(&mut self) {
        PENDING.with(|p| p.set((std::ptr::null(), 0)));
    }
}

/// COPY's data callback: hands out the next bytes of [`PENDING`].
///
/// # Safety
///
/// Only COPY calls it (CopyGetData, COPY_CALLBACK), during the `CopyFrom` of [`copy_rows`]
/// on the same thread, with `outbuf` writable for `maxread` bytes.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn read_pending(outbuf: *mut std::ffi::c_void, _minread: i32, maxread: i32) -> i32 {
    PENDING.with(|pending| {
        let (data, len) = pending.get();
        let n = len.min(maxread.max(0) as usize);
        if n > 0 {
            // SAFETY: n > 0, so PENDING holds the unread rest of `copy_rows`' `text` (`len`
            // readable bytes, borrowed for the whole call); n <= maxread fits `outbuf`, a
            // palloc'd COPY buffer that cannot overlap `text`; n <= len keeps `data + n`
            // within `text` (or one past its end).
            unsafe {
                std::ptr::copy_nonoverlapping(data, outbuf.cast::<u8>(), n);
                pending.set((data.add(n), len - n));
            }
        }
        n as i32
    })
}

/// COPYs `text` (COPY text format, UTF-8, lines for `columns` in that order) into the table,
/// checking the current user's INSERT privilege as COPY does.
pub(crate) fn copy_rows(relid: pg_sys::Oid, columns: &[&str], text: &[u8]) {
    if text.is_empty() {
        return;
    }
    let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    // SAFETY: on the main thread inside a (sub)transaction. table_open locks the table and
    // raises an ERROR if it is gone; rd_att and the parse state's RTE stay valid until the
    // table is closed and the parse state freed at the end. Every string handed over is
    // pstrdup'd; PENDING points into `text`, borrowed for the whole call, and is cleared by
    // `clear` on every exit. The permission check raises an ERROR without INSERT, as DoCopy
    // does.
    unsafe {
        let rel = pg_sys::table_open(relid, lock);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        let nsitem = pg_sys::addRangeTableEntryForRelation(pstate, rel, lock, std::ptr::null_mut(), false, false);
        let tupdesc = PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        let inserted = tupdesc.iter().filter(|a| !a.is_dropped() && columns.contains(&a.name())).map(|a| a.attnum);
        crate::compat::check_insert_permission(pstate, nsitem, inserted);

        let mut names = std::ptr::null_mut::<pg_sys::List>();
        for name in columns {
            let name = CString::new(*name).expect("column names have no NUL");
            names = pg_sys::lappend(names, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
        }

        let encoding = pg_sys::makeDefElem(
            pg_sys::pstrdup(c"encoding".as_ptr()),
            pg_sys::makeString(pg_sys::pstrdup(c"UTF8".as_ptr())).cast(),
            -1,
        );
        let options = pg_sys::lappend(std::ptr::null_mut(), encoding.cast());

        PENDING.with(|p| p.set((text.as_ptr(), text.len())));
        let clear = ClearPending;
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            rel,
            std::ptr::null_mut(),
            std::ptr::null(),
            false,
            Some(read_pending),
            names,
            options,
        );
        pg_sys::CopyFrom(cstate);
        pg_sys::EndCopyFrom(cstate);
        drop(clear);
        pg_sys::free_parsestate(pstate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

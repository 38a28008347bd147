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

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn read_pending(outbuf: *mut std::ffi::c_void, _minread: i32, maxread: i32) -> i32 {
    PENDING.with(|pending| {
        let (data, len) = pending.get();
        let n = len.min(maxread.max(0) as usize);
        if n > 0 {
            unsafe {
                std::ptr::copy_nonoverlapping(data, outbuf.cast::<u8>(), n);
                pending.set((data.add(n), len - n));
            }
        }
        n as i32
    })
}

/// COPYs `text` (COPY text format, UTF-8, lines for `columns` in that order) into the table,
/// checking the current user's INSERT privilege as COPY does. Returns the rows written.
pub fn copy_rows(relid: pg_sys::Oid, columns: &[&str], text: &[u8]) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
    unsafe {
        let rel = pg_sys::table_open(relid, lock);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        let nsitem = pg_sys::addRangeTableEntryForRelation(pstate, rel, lock, std::ptr::null_mut(), false, false);
        let rte = (*nsitem).p_rte;
        (*rte).requiredPerms = pg_sys::ACL_INSERT as pg_sys::AclMode;

        let mut names = std::ptr::null_mut::<pg_sys::List>();
        let tupdesc = PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        for attr in tupdesc.iter().filter(|a| !a.is_dropped()) {
            if columns.contains(&attr.name()) {
                let bit = i32::from(attr.attnum) - pg_sys::FirstLowInvalidHeapAttributeNumber;
                (*rte).insertedCols = pg_sys::bms_add_member((*rte).insertedCols, bit);
            }
        }
        for name in columns {
            let name = CString::new(*name).expect("column names have no NUL");
            names = pg_sys::lappend(names, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
        }
        pg_sys::ExecCheckRTPerms((*pstate).p_rtable, true);

        let encoding = pg_sys::makeDefElem(
            pg_sys::pstrdup(c"encoding".as_ptr()),
            pg_sys::makeString(pg_sys::pstrdup(c"UTF8".as_ptr())).cast(),
            -1,
        );
        let options = pg_sys::lappend(std::ptr::null_mut(), encoding.cast());

        PENDING.with(|p| p.set((text.as_ptr(), text.len())));
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
        let written = pg_sys::CopyFrom(cstate);
        pg_sys::EndCopyFrom(cstate);
        PENDING.with(|p| p.set((std::ptr::null(), 0)));
        pg_sys::free_parsestate(pstate);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        written
    }
}

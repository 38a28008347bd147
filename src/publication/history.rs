//! The WAL history guard: a publication's progress in Kafka must lie in this server's WAL
//! history. After a restore from a backup, a point-in-time recovery, or the promotion of a
//! standby that had not received everything, Kafka can hold events of commits that this
//! server never had, or had on another timeline; new commits at lower positions would then
//! be skipped as published. The worker refuses to go on instead, and says what happened.

use crate::error::{BridgeError, Result};
use crate::worker;
use pgrx::pg_sys;

// Exported by the server, not declared by pgrx's bindings.
// SAFETY: the prototypes of access/timeline.h, the same in PostgreSQL 15 to 18.
extern "C-unwind" {
    fn readTimeLineHistory(target: pg_sys::TimeLineID) -> *mut pg_sys::List;
    fn tliSwitchPoint(
        timeline: pg_sys::TimeLineID,
        history: *mut pg_sys::List,
        next: *mut pg_sys::TimeLineID,
    ) -> pg_sys::XLogRecPtr;
}

/// This server's flushed WAL position and its current timeline.
pub(crate) fn flushed_wal() -> (u64, u32) {
    let mut timeline: pg_sys::TimeLineID = 0;
    // SAFETY: reads shared WAL state under its own spinlock; `timeline` is a writable local.
    let flushed = unsafe { pg_sys::GetFlushRecPtr(&mut timeline) };
    (flushed, timeline)
}

/// Fails unless the progress record's position `lsn`, written on `timeline` (unknown for
/// records of release 0.2 and earlier), lies in this server's WAL history.
pub(crate) fn check_progress(lsn: u64, timeline: Option<u32>) -> Result<()> {
    let (flushed, current) = flushed_wal();
    let advice = "Changes committed from now on could be skipped as already published. Check the \
                  publication's topics for events past this server's position, then drop and create the \
                  publication to publish from now on (see the README, \"Recovering a publication\").";
    if lsn > flushed {
        return Err(BridgeError::NotInPrerequisiteState(format!(
            "the publication's progress in Kafka ({}) is ahead of this server's WAL ({}): the server was restored \
             from a backup or recovered to an earlier point, or a standby that had not received everything was \
             promoted. {advice}",
            lsn_text(lsn),
            lsn_text(flushed)
        )));
    }
    let Some(timeline) = timeline.filter(|t| *t != current) else {
        return Ok(());
    };
    let ended_at = if timeline > current {
        None
    } else {
        // SAFETY: on the worker's main thread inside the catch; reads the timeline history
        // files of this server (an ERROR if one is missing, which the catch turns into Err).
        worker::catch(|| unsafe {
            let history = readTimeLineHistory(current);
            Ok(Some(tliSwitchPoint(timeline, history, std::ptr::null_mut())))
        })
        .ok()
        .flatten()
    };
    match ended_at {
        Some(end) if lsn < end => Ok(()),
        _ => Err(BridgeError::NotInPrerequisiteState(format!(
            "the publication's progress in Kafka ({}) was written on timeline {timeline}, which this server's \
             history (timeline {current}) does not contain up to that point: the server was recovered to an \
             earlier point or another standby was promoted. {advice}",
            lsn_text(lsn)
        ))),
    }
}

/// An LSN as PostgreSQL writes it.
pub(crate) fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn as u32)
}

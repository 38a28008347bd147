//! A workload of inserts, updates and deletes in transactions of varied size, for the
//! publication crash and round-trip tests. Every change is also written, in its own
//! transaction, to a log table that is not published: the log is the truth of what
//! committed, whatever crashes did to the client's view.

use crate::{pg, Rng};
use postgres::Client;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// Shared between a workload and the test that drives it.
#[derive(Default)]
pub struct Control {
    /// Ends the workload once it has attempted its target.
    pub stop: AtomicBool,
    /// Changes attempted so far (committed or rolled back).
    pub attempted: AtomicI64,
    /// Large transactions committed so far.
    pub big_committed: AtomicI64,
    /// Asks for one more large transaction.
    big_wanted: AtomicBool,
    pause: AtomicBool,
    paused: AtomicBool,
}

impl Control {
    /// Holds the workload between two transactions and returns once it is held.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        while !self.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Has the workload run one more large transaction, as soon as it can.
    pub fn request_big_transaction(&self) {
        self.big_wanted.store(true, Ordering::SeqCst);
    }

    fn hold_while_paused(&self) {
        while self.pause.load(Ordering::SeqCst) {
            self.paused.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(10));
        }
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// The changed table (`id`, `version`, `pad`) and its log (`id`, `version`, `op`, `xid`).
/// REPLICA IDENTITY FULL: deletes carry the version of the row they delete.
pub fn create_tables(pg: &mut Client, table: &str, log: &str) {
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, version bigint NOT NULL, pad text);
         ALTER TABLE {table} REPLICA IDENTITY FULL;
         CREATE TABLE {log} (id bigint, version bigint, op text, xid bigint DEFAULT txid_current());"
    ))
    .unwrap();
}

/// Runs transactions until `stop` is set and at least `target` changes were attempted; one of
/// them inserts `big` rows at once, and about one in eight rolls back (their rows have pad
/// "rollback"). Reconnects after a crash restart of the server.
pub fn run(table: &str, log: &str, target: i64, big: i64, control: &Control) {
    let Control { stop, attempted, big_committed, big_wanted, .. } = control;
    let mut rng = Rng::new();
    let mut pg = pg();
    let mut next_id = 1i64;
    let mut big_done = big == 0;
    while !(stop.load(Ordering::SeqCst) && attempted.load(Ordering::SeqCst) >= target && big_done) {
        control.hold_while_paused();
        let big_now =
            (!big_done && attempted.load(Ordering::SeqCst) > 10_000) || big_wanted.swap(false, Ordering::SeqCst);
        let rollback = !big_now && rng.below(8) == 0;
        let n = if big_now { big } else { [1, 10, 100, 1000][rng.below(4) as usize] };
        let pad = if rollback { "rollback" } else { "kept" };
        let statement = match rng.below(4) {
            _ if big_now || next_id < 2000 => {
                let (from, to) = (next_id, next_id + n - 1);
                next_id += n;
                format!(
                    "WITH c AS (INSERT INTO {table} SELECT i, 1, '{pad}' FROM generate_series({from}, {to}) i \
                     ON CONFLICT DO NOTHING RETURNING id, version) INSERT INTO {log} (id, version, op) SELECT id, version, 'c' FROM c"
                )
            }
            0 => format!(
                "WITH d AS (DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE id % 13 = {} LIMIT {}) \
                 RETURNING id, version) INSERT INTO {log} (id, version, op) SELECT id, version, 'd' FROM d",
                rng.below(13),
                (n / 10).max(1)
            ),
            1 => {
                let (from, to) = (next_id, next_id + n - 1);
                next_id += n;
                format!(
                    "WITH c AS (INSERT INTO {table} SELECT i, 1, '{pad}' FROM generate_series({from}, {to}) i \
                     ON CONFLICT DO NOTHING RETURNING id, version) INSERT INTO {log} (id, version, op) SELECT id, version, 'c' FROM c"
                )
            }
            _ => format!(
                "WITH u AS (UPDATE {table} SET version = version + 1, pad = '{pad}' \
                 WHERE id IN (SELECT id FROM {table} WHERE id % 7 = {} LIMIT {n}) RETURNING id, version) \
                 INSERT INTO {log} (id, version, op) SELECT id, version, 'u' FROM u",
                rng.below(7)
            ),
        };
        let end = if rollback { "ROLLBACK" } else { "COMMIT" };
        match pg.batch_execute(&format!("BEGIN; {statement}; {end}")) {
            Ok(()) => {
                attempted.fetch_add(n, Ordering::SeqCst);
                if big_now {
                    big_done = true;
                    big_committed.fetch_add(1, Ordering::SeqCst);
                }
                // About 3,000 changes a second, so that the crashes hit a workload that lasts;
                // at most a second's pause after a large transaction.
                std::thread::sleep(Duration::from_micros(n as u64 * 330).min(Duration::from_secs(1)));
            }
            // The server went down under us (a crash restart): the log says what committed.
            Err(_) => pg = crate::pg(),
        }
    }
}

//! Exactly-once publishing under crashes: while transactions of varied sizes (one of
//! 100,000 rows) change a table, the publication worker is killed with SIGKILL at random
//! moments and the whole server is stopped in immediate mode; afterwards a read_committed
//! consumer sees every committed change exactly once, in commit order per key, and nothing
//! of the transactions that rolled back.
//!
//! Every change is also written, in its own transaction, to a log table that is not
//! published: the log is the truth of what committed, whatever the crashes did to the
//! client's view. `PGKB_SOAK=1` runs the long variant.

use pg_kafka_bridge_e2e::*;
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Plan {
    changes: i64,
    kills: usize,
    server_stops: usize,
}

fn plan() -> Plan {
    if soak() {
        Plan { changes: 1_000_000, kills: 50, server_stops: 5 }
    } else {
        Plan { changes: 150_000, kills: 10, server_stops: 2 }
    }
}

/// A change as the log and the events both identify it.
type Change = (i64, i64, String);

/// Runs transactions until `stop` is set and at least `target` changes were attempted; one of
/// them inserts 100,000 rows at once, and about one in eight rolls back.
fn workload(table: &str, log: &str, target: i64, stop: &AtomicBool, attempted: &AtomicI64) {
    let mut rng = Rng::new();
    let mut pg = pg();
    let mut next_id = 1i64;
    let mut big_done = false;
    while !(stop.load(Ordering::SeqCst) && attempted.load(Ordering::SeqCst) >= target && big_done) {
        let big = !big_done && attempted.load(Ordering::SeqCst) > 10_000;
        let rollback = !big && rng.below(8) == 0;
        let n = if big { 100_000 } else { [1, 10, 100, 1000][rng.below(4) as usize] };
        let pad = if rollback { "rollback" } else { "kept" };
        let statement = match rng.below(4) {
            _ if big || next_id < 2000 => {
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
                big_done |= big && !rollback;
                // About 3,000 changes a second: the crashes hit a workload that lasts.
                std::thread::sleep(Duration::from_micros(n as u64 * 330));
            }
            // The server went down under us (a crash restart): the log says what committed.
            Err(_) => pg = pg_kafka_bridge_e2e::pg(),
        }
    }
}

fn event_change(event: &Event) -> Change {
    let value = event.value.as_ref().expect("a change event");
    let row = if event.op() == "d" { &value["before"] } else { &value["after"] };
    (row["id"].as_i64().unwrap(), row["version"].as_i64().unwrap(), event.op().to_string())
}

#[test]
fn kill_minus_nine_and_immediate_stops_publish_every_change_exactly_once() {
    let plan = plan();
    let mut rng = Rng::new();
    let mut pg = pg();
    let (table, log, name, prefix) = (unique("src"), unique("log"), unique("pub"), unique("crash"));
    // REPLICA IDENTITY FULL: deletes carry the version of the row they delete.
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, version bigint NOT NULL, pad text);
         ALTER TABLE {table} REPLICA IDENTITY FULL;
         CREATE TABLE {log} (id bigint, version bigint, op text, xid bigint DEFAULT txid_current());"
    ))
    .unwrap();
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    let topic = format!("{prefix}.{table}");

    let stop = Arc::new(AtomicBool::new(false));
    let attempted = Arc::new(AtomicI64::new(0));
    let driver = {
        let (table, log, stop, attempted, target) = (table.clone(), log.clone(), stop.clone(), attempted.clone(), plan.changes);
        std::thread::spawn(move || workload(&table, &log, target, &stop, &attempted))
    };

    let mut history = Vec::new();
    let mut kills = 0;
    while kills < plan.kills {
        std::thread::sleep(Duration::from_millis(300 + rng.below(2000)));
        wait_for("a running publication worker", Duration::from_secs(90), || {
            !publication_worker_pids(&mut pg, &name).is_empty() || {
                pg = pg_kafka_bridge_e2e::pg();
                false
            }
        });
        let pid = publication_worker_pids(&mut pg, &name)[0];
        let live = !driver.is_finished();
        let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success();
        history.push(format!("kill -9 {pid} during the workload={live}: {killed}"));
        kills += usize::from(killed && live);
        pg = pg_kafka_bridge_e2e::pg();
    }
    for _ in 0..plan.server_stops {
        std::thread::sleep(Duration::from_millis(500 + rng.below(2000)));
        let live = !driver.is_finished();
        script("cluster", &["kill"]);
        script("cluster", &["start"]);
        history.push(format!("immediate stop and start during the workload={live}"));
        pg = pg_kafka_bridge_e2e::pg();
    }
    println!("{}", history.join("\n"));
    stop.store(true, Ordering::SeqCst);
    driver.join().unwrap();
    assert!(
        history.iter().filter(|h| h.contains("workload=true")).count() >= plan.kills + plan.server_stops,
        "every crash must hit the running workload: {history:?}"
    );

    let committed: Vec<Change> = pg
        .query(&format!("SELECT id, version, op FROM {log}"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    println!("{} changes committed, {} attempted", committed.len(), attempted.load(Ordering::SeqCst));
    let largest = count(&mut pg, &format!("SELECT max(n) FROM (SELECT count(*) AS n FROM {log} GROUP BY xid) t"));
    assert!(largest >= 100_000, "the 100,000-row transaction did not commit (largest: {largest})");
    let started = Instant::now();
    let events = read_events_with_kcat(&topic, committed.len(), Duration::from_secs(600));
    println!("{} events read back after {:?}", events.len(), started.elapsed());

    assert!(events.iter().all(|e| e.after()["pad"] != "rollback"), "an event of a rolled-back transaction");
    let published: Vec<Change> = events.iter().map(event_change).collect();
    let unique_published: HashSet<&Change> = published.iter().collect();
    assert_eq!(unique_published.len(), published.len(), "a change was published twice");
    let expected: HashSet<&Change> = committed.iter().collect();
    let missing: Vec<_> = expected.difference(&unique_published).take(5).collect();
    let extra: Vec<_> = unique_published.difference(&expected).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, not committed {extra:?}");

    // Commit order per key: versions grow, and a delete is the last change of its key.
    let mut last: HashMap<i64, (i64, String)> = HashMap::new();
    for (id, version, op) in &published {
        if let Some((previous, previous_op)) = last.get(id) {
            assert!(previous_op != "d" && version >= previous, "key {id}: {op} {version} after {previous_op} {previous}");
        }
        last.insert(*id, (*version, op.clone()));
    }
    let positions: Vec<_> = events.iter().map(Event::position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "events out of commit order");
    drop_publication(&mut pg, &name);
}

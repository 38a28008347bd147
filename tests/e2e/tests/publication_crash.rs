//! Exactly-once publishing under crashes: while transactions of varied sizes (one of
//! 100,000 rows) change a table, the publication worker is killed with SIGKILL and the whole
//! server is stopped in immediate mode, each time with work in flight (changes decoded but
//! not yet confirmed to the slot) and after progress since the previous crash; one kill lands
//! in the middle of the 100,000-row transaction, after part of it was committed to Kafka.
//! Afterwards a read_committed consumer sees every committed change exactly once, in commit
//! order per key, and nothing of the transactions that rolled back.
//!
//! Every change is also written, in its own transaction, to a log table that is not
//! published: the log is the truth of what committed, whatever the crashes did to the
//! client's view. `PGKB_SOAK=1` runs the long variant.

use pg_kafka_bridge_e2e::workload;
use pg_kafka_bridge_e2e::*;
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows of the one large transaction of the workload.
const BIG_TRANSACTION: i64 = 100_000;

/// A change as the log and the events both identify it.
type Change = (i64, i64, String);

fn event_change(event: &Event) -> Change {
    let value = event.value.as_ref().expect("a change event");
    let row = if event.op() == "d" { &value["before"] } else { &value["after"] };
    (row["id"].as_i64().unwrap(), row["version"].as_i64().unwrap(), event.op().to_string())
}

/// The publication's worker PID, published position and unconfirmed WAL, if it runs. The
/// connection is opened again if a crash restart cut it.
fn worker_progress(pg: &mut postgres::Client, name: &str) -> Option<(i32, (i64, i64), i64)> {
    let row = match pg.query_opt(
            "SELECT pid, coalesce((published_lsn - '0/0')::bigint, 0), coalesce(published_seq, -1), coalesce(lag_bytes, 0) \
               FROM kafka.publication_status WHERE publication = $1 AND pid IS NOT NULL AND state = 'running'",
            &[&name],
    ) {
        Ok(row) => row?,
        Err(_) => {
            *pg = pg_kafka_bridge_e2e::pg();
            return None;
        }
    };
    Some((row.get(0), (row.get(1), row.get(2)), row.get(3)))
}

/// Waits until the worker has published past `before` and has decoded WAL it has not
/// confirmed yet (work in flight); returns its PID and position.
fn kill_target_with_work_in_flight(name: &str, before: (i64, i64)) -> (i32, (i64, i64)) {
    let mut pg = pg_kafka_bridge_e2e::pg();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some((pid, position, unconfirmed)) = worker_progress(&mut pg, name) {
            if position > before && unconfirmed > 0 {
                return (pid, position);
            }
        }
        assert!(Instant::now() < deadline, "the publication made no progress with work in flight since {before:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Has the workload run a large transaction and waits until the worker has committed part
/// of it to Kafka but not all (its published position is inside it); returns the worker's
/// PID and how many of the transaction's changes are published. Asks again if a large
/// transaction was published whole before the position could be seen inside it.
fn kill_target_inside_a_big_transaction(control: &workload::Control, name: &str) -> (i32, i64) {
    let mut pg = pg_kafka_bridge_e2e::pg();
    for _attempt in 0..5 {
        let before = worker_progress(&mut pg, name).map_or(0, |(_, (lsn, _), _)| lsn);
        control.request_big_transaction();
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if let Some((pid, (lsn, seq), _)) = worker_progress(&mut pg, name) {
                // Smaller transactions have at most 1,000 changes.
                if (1_000..BIG_TRANSACTION - 1).contains(&seq) {
                    return (pid, seq + 1);
                }
                if lsn > before && seq == BIG_TRANSACTION - 1 {
                    break; // published whole before it was seen inside: ask again
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    panic!("never saw the publication inside a {BIG_TRANSACTION}-row transaction");
}

#[test]
fn kill_minus_nine_and_immediate_stops_publish_every_change_exactly_once() {
    let plan = CrashPlan::new(150_000);
    let mut rng = Rng::new();
    let mut pg = pg();
    let (table, log, name, prefix) = (unique("src"), unique("log"), unique("pub"), unique("crash"));
    workload::create_tables(&mut pg, &table, &log);
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    let topic = format!("{prefix}.{table}");

    let control = Arc::new(workload::Control::default());
    let driver = {
        let (table, log, control, target) = (table.clone(), log.clone(), control.clone(), plan.volume);
        std::thread::spawn(move || workload::run(&table, &log, target, BIG_TRANSACTION, &control))
    };

    let mut history = Vec::new();
    let mut published = (0, -1);
    let mut kills = 0;
    while kills < plan.kills {
        let pid = if kills == 1 {
            let (pid, seq) = kill_target_inside_a_big_transaction(&control, &name);
            history
                .push(format!("in the middle of a {BIG_TRANSACTION}-row transaction, {seq} of its changes in Kafka"));
            pid
        } else {
            std::thread::sleep(Duration::from_millis(rng.below(1000)));
            let (pid, position) = kill_target_with_work_in_flight(&name, published);
            published = position;
            pid
        };
        let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success();
        history.push(format!("kill -9 {pid}: {killed}"));
        kills += usize::from(killed);
    }
    for _ in 0..plan.server_stops {
        std::thread::sleep(Duration::from_millis(rng.below(1000)));
        let (pid, position) = kill_target_with_work_in_flight(&name, published);
        published = position;
        script("cluster", &["kill"]);
        script("cluster", &["start"]);
        history.push(format!("immediate stop while worker {pid} had work in flight"));
    }
    println!("{}", history.join("\n"));
    control.stop.store(true, Ordering::SeqCst);
    driver.join().unwrap();
    pg = pg_kafka_bridge_e2e::pg();

    let committed: Vec<Change> = pg
        .query(&format!("SELECT id, version, op FROM {log}"), &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    println!("{} changes committed, {} attempted", committed.len(), control.attempted.load(Ordering::SeqCst));
    let largest = count(&mut pg, &format!("SELECT max(n) FROM (SELECT count(*) AS n FROM {log} GROUP BY xid) t"));
    assert!(largest >= BIG_TRANSACTION, "the {BIG_TRANSACTION}-row transaction did not commit (largest: {largest})");
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
            assert!(
                previous_op != "d" && version >= previous,
                "key {id}: {op} {version} after {previous_op} {previous}"
            );
        }
        last.insert(*id, (*version, op.clone()));
    }
    let positions: Vec<_> = events.iter().map(Event::position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "events out of commit order");
    drop_publication(&mut pg, &name);
}

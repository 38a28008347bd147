//! Exactly-once publishing under crashes: while transactions of varied sizes (one of
//! 100,000 rows) change a table, the publication worker is killed with SIGKILL at random
//! moments and the whole server is stopped in immediate mode; afterwards a read_committed
//! consumer sees every committed change exactly once, in commit order per key, and nothing
//! of the transactions that rolled back.
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
    control.stop.store(true, Ordering::SeqCst);
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

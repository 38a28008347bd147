//! Exactly-once under crashes: while messages stream in, the subscription's workers are
//! killed with SIGKILL and the whole server is stopped in immediate mode, each time while a
//! worker is inside a batch transaction (it holds a transaction id: it has written), and
//! only after rows were applied since the previous crash; afterwards every message is in the
//! table exactly once, and every one in 500, which is not valid JSON, is in the dead-letter
//! table exactly once (dead letters commit with the rows of their batch).
//!
//! The bounded variant runs in CI. `PGKB_SOAK=1` runs the long one (1,000,000 messages,
//! 50 kills, 5 immediate stops).

use pg_kafka_bridge_e2e::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// PIDs of the subscription's workers that are inside a batch transaction which has written
/// (offsets or rows). The connection may have been cut by a crash restart that began after
/// it was opened: then it is opened again.
fn workers_applying(pg: &mut postgres::Client, sub: &str) -> Vec<i32> {
    let query = "SELECT pid FROM pg_stat_activity \
                 WHERE backend_type = 'pg_kafka_bridge subscription' AND application_name = $1 \
                   AND backend_xid IS NOT NULL";
    match pg.query(query, &[&sub]) {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(_) => {
            *pg = pg_kafka_bridge_e2e::pg();
            Vec::new()
        }
    }
}

/// Waits until a worker is inside a batch transaction and returns its PID.
fn wait_for_a_worker_applying(pg: &mut postgres::Client, sub: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(&pid) = workers_applying(pg, sub).first() {
            return pid;
        }
        assert!(Instant::now() < deadline, "no worker of {sub} entered a batch transaction in 2 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Rows in the table, waiting until it has more than `before`: the subscription made
/// progress since the last crash.
fn wait_for_progress(table: &str, before: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut pg = pg_kafka_bridge_e2e::pg();
        let now = count(&mut pg, &format!("SELECT count(*) FROM {table}"));
        if now > before {
            return now;
        }
        assert!(Instant::now() < deadline, "no rows applied since the last crash ({before} rows)");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kill_minus_nine_and_immediate_stops_lose_and_duplicate_nothing() {
    let plan = CrashPlan::new(120_000);
    let mut rng = Rng::new();
    let mut pg = pg();
    let (topic, table, sub) = (unique("crash"), unique("crash"), unique("sub"));
    create_topic(&topic, 4);
    // No unique key on purpose: a message applied twice would show as a duplicate row.
    pg.batch_execute(&format!("CREATE TABLE {table} (id bigint, _kafka_partition int, _kafka_offset bigint)")).unwrap();
    create_subscription(&mut pg, &sub, &topic, &table, ", workers => 2, batch_size => 2000");

    // The stream runs until the crashes are over and at least `plan.volume` are written,
    // so that every kill and every stop hits it; the thread returns how many it wrote.
    let crashes_done = Arc::new(AtomicBool::new(false));
    let producer_thread = {
        let (topic, crashes_done, total) = (topic.clone(), crashes_done.clone(), plan.volume);
        std::thread::spawn(move || {
            let p = producer();
            let chunk = (total / 400).max(1);
            let mut id: i64 = 0;
            while id < total || !crashes_done.load(Ordering::SeqCst) {
                for _ in 0..chunk {
                    let value = if id % 500 == 499 { format!("not JSON {id}") } else { format!("{{\"id\": {id}}}") };
                    p.send(&topic, None, Some(id.to_string().as_bytes()), Some(value.as_bytes()));
                    id += 1;
                }
                p.flush();
                std::thread::sleep(Duration::from_millis(120));
            }
            id
        })
    };

    let mut events = Vec::new();
    let mut applied = 0;
    let mut kills = 0;
    while kills < plan.kills {
        applied = wait_for_progress(&table, applied);
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        let pid = wait_for_a_worker_applying(&mut pg, &sub);
        // The process may just have ended (a crash restart is under way): then try again.
        let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success();
        events.push(format!("kill -9 {pid} inside a batch transaction, {applied} rows applied before: {killed}"));
        kills += usize::from(killed);
        pg = pg_kafka_bridge_e2e::pg();
    }
    for _ in 0..plan.server_stops {
        applied = wait_for_progress(&table, applied);
        std::thread::sleep(Duration::from_millis(rng.below(500)));
        let pid = wait_for_a_worker_applying(&mut pg, &sub);
        script("cluster", &["kill"]);
        script("cluster", &["start"]);
        events.push(format!(
            "immediate stop while worker {pid} was inside a batch transaction, {applied} rows applied before"
        ));
        pg = pg_kafka_bridge_e2e::pg();
    }
    println!("{}", events.join("\n"));

    crashes_done.store(true, Ordering::SeqCst);
    let produced = producer_thread.join().unwrap();
    let bad = produced / 500;
    let rows = produced - bad;
    println!("{produced} messages produced, {bad} of them not JSON");
    let started = Instant::now();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), rows, Duration::from_secs(600));
    println!("caught up {:?} after the producer finished", started.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), rows, "no duplicates after catching up");
    assert_eq!(count(&mut pg, &format!("SELECT count(DISTINCT id) FROM {table}")), rows, "every message once");
    assert_eq!(
        count(&mut pg, &format!("SELECT count(*) FROM {table} WHERE id < 0 OR id >= {produced} OR id % 500 = 499")),
        0
    );
    assert_eq!(count(&mut pg, &format!("SELECT count(DISTINCT (_kafka_partition, _kafka_offset)) FROM {table}")), rows);
    let letters = format!("FROM kafka.dead_letters WHERE subscription = '{sub}'");
    assert_eq!(count(&mut pg, &format!("SELECT count(*) {letters}")), bad, "every bad message a dead letter once");
    assert_eq!(count(&mut pg, &format!("SELECT count(DISTINCT (partition, \"offset\")) {letters}")), bad);
    let stored =
        count(&mut pg, &format!("SELECT sum(next_offset)::bigint FROM kafka.offsets WHERE subscription = '{sub}'"));
    assert_eq!(stored, produced, "the stored offsets cover exactly the messages applied and dead letters");
    drop_subscription(&mut pg, &sub);
}

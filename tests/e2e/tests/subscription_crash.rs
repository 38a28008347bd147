//! Exactly-once under crashes: while messages stream in, the subscription's workers are
//! killed with SIGKILL at random moments and the whole server is stopped in immediate mode;
//! afterwards every message is in the table exactly once.
//!
//! The bounded variant runs in CI. `PGKB_SOAK=1` runs the long one (1,000,000 messages,
//! 50 kills, 5 immediate stops).

use pg_kafka_bridge_e2e::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// PIDs of the subscription's workers. The connection may have been cut by a crash restart
/// that began after it was opened: then it is opened again.
fn running_workers(pg: &mut postgres::Client, sub: &str) -> Vec<i32> {
    let query = "SELECT pid FROM pg_stat_activity \
                 WHERE backend_type = 'pg_kafka_bridge subscription' AND application_name = $1";
    match pg.query(query, &[&sub]) {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(_) => {
            *pg = pg_kafka_bridge_e2e::pg();
            Vec::new()
        }
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
    let producing = Arc::new(AtomicBool::new(true));
    let crashes_done = Arc::new(AtomicBool::new(false));
    let producer_thread = {
        let (topic, producing, crashes_done, total) =
            (topic.clone(), producing.clone(), crashes_done.clone(), plan.volume);
        std::thread::spawn(move || {
            let p = producer();
            let chunk = (total / 400).max(1);
            let mut id: i64 = 0;
            while id < total || !crashes_done.load(Ordering::SeqCst) {
                for _ in 0..chunk {
                    p.send(&topic, None, Some(id.to_string().as_bytes()), Some(format!("{{\"id\": {id}}}").as_bytes()));
                    id += 1;
                }
                p.flush();
                std::thread::sleep(Duration::from_millis(120));
            }
            producing.store(false, Ordering::SeqCst);
            id
        })
    };

    let mut events = Vec::new();
    let mut kills = 0;
    for _attempt in 0..plan.kills * 10 {
        if kills == plan.kills {
            break;
        }
        wait_for("a running subscription worker", Duration::from_secs(60), || {
            !running_workers(&mut pg, &sub).is_empty()
        });
        std::thread::sleep(Duration::from_millis(200 + rng.below(1500)));
        // The worker may be gone by now (a crash restart is under way): then try again.
        let pids = running_workers(&mut pg, &sub);
        if let Some(&pid) = pids.get(rng.below(pids.len().max(1) as u64) as usize) {
            let streaming = producing.load(Ordering::SeqCst);
            let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success();
            events.push(format!("kill -9 {pid} while streaming={streaming}: {killed}"));
            kills += usize::from(killed);
        }
        pg = pg_kafka_bridge_e2e::pg();
    }
    for _ in 0..plan.server_stops {
        std::thread::sleep(Duration::from_millis(500 + rng.below(2000)));
        let streaming = producing.load(Ordering::SeqCst);
        script("cluster", &["kill"]);
        script("cluster", &["start"]);
        events.push(format!("immediate stop and start while streaming={streaming}"));
        pg = pg_kafka_bridge_e2e::pg();
    }
    println!("{}", events.join("\n"));
    let kills_while_streaming = events.iter().filter(|e| e.contains("streaming=true: true")).count();
    assert!(kills_while_streaming >= plan.kills, "every kill must hit a live stream: {events:?}");
    let stops_while_streaming =
        events.iter().filter(|e| e.starts_with("immediate") && e.contains("streaming=true")).count();
    assert!(stops_while_streaming >= plan.server_stops, "every stop must hit a live stream: {events:?}");

    crashes_done.store(true, Ordering::SeqCst);
    let produced = producer_thread.join().unwrap();
    println!("{produced} messages produced");
    let started = Instant::now();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), produced, Duration::from_secs(600));
    println!("caught up {:?} after the producer finished", started.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), produced, "no duplicates after catching up");
    assert_eq!(count(&mut pg, &format!("SELECT count(DISTINCT id) FROM {table}")), produced, "every message once");
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table} WHERE id < 0 OR id >= {}", produced)), 0);
    assert_eq!(
        count(&mut pg, &format!("SELECT count(DISTINCT (_kafka_partition, _kafka_offset)) FROM {table}")),
        produced
    );
    let stored =
        count(&mut pg, &format!("SELECT sum(next_offset)::bigint FROM kafka.offsets WHERE subscription = '{sub}'"));
    assert_eq!(stored, produced, "the stored offsets cover exactly the messages applied");
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM kafka.dead_letters WHERE subscription = '{sub}'")), 0);
    drop_subscription(&mut pg, &sub);
}

//! Snapshots: a publication publishes the rows its tables already hold, as `r` events,
//! exactly once, interleaved with the live changes so that applying the topic in order
//! gives the table. Checked with concurrent inserts, updates and deletes, with crashes of
//! the worker and of the server in the middle, while other tables stream, and with rows
//! wide enough that memory matters.

use pg_kafka_bridge_e2e::memory::MemorySampler;
use pg_kafka_bridge_e2e::*;
use postgres::Client;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EXISTING_ROWS: i64 = 200_000;

/// Changes a table (`id`, `version`, `pad`) in small transactions until stopped: updates
/// bump `version`, deletes and inserts of new ids; every touched id is logged in the same
/// transaction. Reconnects after a crash restart.
struct Churn {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Churn {
    fn start(table: &str, log: &str, existing: i64) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let (table, log, flag) = (table.to_owned(), log.to_owned(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new();
            let mut pg = pg();
            let mut next_id = existing + 1;
            let mut committed = 0;
            while !flag.load(Ordering::SeqCst) {
                let id = 1 + rng.below(existing as u64) as i64;
                let statement = match rng.below(3) {
                    0 => format!("UPDATE {table} SET version = version + 1, pad = 'u' WHERE id = {id}"),
                    1 => format!("DELETE FROM {table} WHERE id = {id}"),
                    _ => {
                        next_id += 1;
                        format!("INSERT INTO {table} VALUES ({}, 1, 'c')", next_id - 1)
                    }
                };
                let logged = if statement.starts_with("INSERT") { next_id - 1 } else { id };
                match pg.batch_execute(&format!("BEGIN; {statement}; INSERT INTO {log} VALUES ({logged}); COMMIT")) {
                    Ok(()) => committed += 1,
                    Err(_) => pg = pg_kafka_bridge_e2e::pg(),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            committed
        });
        Churn { stop, thread: Some(thread) }
    }

    /// Stops the changes; returns how many committed.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().map_or(0, |t| t.join().unwrap())
    }
}

/// A test that fails leaves no churn running behind it.
impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn create_filled_table(pg: &mut Client, table: &str, rows: i64) {
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, version bigint NOT NULL, pad text);
         INSERT INTO {table} SELECT g, 1, 'existing' FROM generate_series(1, {rows}) g;"
    ))
    .unwrap();
}

fn snapshot_state(pg: &mut Client, publication: &str, table: &str) -> Option<(String, i64)> {
    pg.query_opt(
        "SELECT state, rows FROM kafka.publication_snapshots WHERE publication = $1 AND \"table\" = $2::text::regclass",
        &[&publication, &table],
    )
    .ok()
    .flatten()
    .map(|r| (r.get(0), r.get(1)))
}

fn wait_for_snapshot_done(publication: &str, table: &str, timeout: Duration) -> i64 {
    let mut pg = pg();
    let deadline = Instant::now() + timeout;
    loop {
        match snapshot_state(&mut pg, publication, table) {
            Some((state, rows)) if state == "done" => return rows,
            other => assert!(
                Instant::now() < deadline,
                "snapshot of {table} not done: {other:?}; status: {}",
                publication_status(&mut pg, publication)
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Inserts a last row and waits until its event is in the topic: everything committed
/// before it is then published. Returns the topic's events.
fn read_all_after_sentinel(pg: &mut Client, table: &str, topic: &str) -> Vec<Event> {
    pg.batch_execute(&format!("INSERT INTO {table} VALUES (-1, 1, 'sentinel')")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let events = read_events_with_kcat(topic, 1, Duration::from_secs(5));
        if events.iter().any(|e| e.after()["id"] == -1) {
            return events;
        }
        assert!(Instant::now() < deadline, "the sentinel row was never published");
    }
}

/// Applies the events in order (r, c and u upsert by key, d deletes) and checks that no
/// event of a key is older than the one before it. Returns id -> version.
fn apply(events: &[Event]) -> BTreeMap<i64, i64> {
    let mut rows = BTreeMap::new();
    for event in events {
        let id = event.key.as_ref().expect("a key")["id"].as_i64().unwrap();
        match event.op() {
            "d" => {
                rows.remove(&id);
            }
            op => {
                let version = event.after()["version"].as_i64().unwrap();
                if let Some(previous) = rows.get(&id) {
                    assert!(version >= *previous, "key {id}: {op} of version {version} after version {previous}");
                }
                rows.insert(id, version);
            }
        }
    }
    rows
}

fn table_rows(pg: &mut Client, table: &str) -> BTreeMap<i64, i64> {
    pg.query(&format!("SELECT id, version FROM {table}"), &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// The topic applied equals the table; every existing row that no change touched has
/// exactly one `r` event, and no row more than one. Returns the number of `r` events.
fn check_snapshot_stream(pg: &mut Client, table: &str, log: &str, topic: &str) -> usize {
    let events = read_all_after_sentinel(pg, table, topic);
    let applied = apply(&events);
    let actual = table_rows(pg, table);
    let differing: Vec<_> = actual
        .iter()
        .filter(|(id, v)| applied.get(id) != Some(v))
        .chain(applied.iter().filter(|(id, _)| !actual.contains_key(id)))
        .take(5)
        .collect();
    assert!(differing.is_empty(), "applied topic differs from the table at {differing:?}");
    assert_eq!(applied.len(), actual.len());

    let touched: HashSet<i64> =
        pg.query(&format!("SELECT id FROM {log}"), &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let mut reads: HashMap<i64, usize> = HashMap::new();
    for event in events.iter().filter(|e| e.op() == "r") {
        *reads.entry(event.key.as_ref().unwrap()["id"].as_i64().unwrap()).or_default() += 1;
    }
    let twice: Vec<_> = reads.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "rows read twice: {twice:?}");
    let unread: Vec<i64> =
        (1..=EXISTING_ROWS).filter(|id| !touched.contains(id) && !reads.contains_key(id)).take(5).collect();
    assert!(unread.is_empty(), "existing rows no change touched and never published as r: {unread:?}");
    println!("{} events, {} r, {} ids touched by changes", events.len(), reads.len(), touched.len());
    reads.len()
}

fn set_chunk_rows(pg: &mut Client, rows: Option<i64>) {
    let setting = match rows {
        Some(n) => format!("ALTER SYSTEM SET pg_kafka_bridge.snapshot_chunk_rows = {n}"),
        None => "ALTER SYSTEM RESET pg_kafka_bridge.snapshot_chunk_rows".into(),
    };
    pg.batch_execute(&setting).unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").unwrap();
}

#[test]
fn initial_snapshot_under_concurrent_changes_applies_to_the_table() {
    let mut pg = pg();
    let (table, log, name, prefix) = (unique("snap"), unique("snaplog"), unique("pub"), unique("snapt"));
    create_filled_table(&mut pg, &table, EXISTING_ROWS);
    pg.batch_execute(&format!("CREATE TABLE {log} (id bigint)")).unwrap();
    let churn = Churn::start(&table, &log, EXISTING_ROWS);
    std::thread::sleep(Duration::from_millis(300));
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    let rows = wait_for_snapshot_done(&name, &table, Duration::from_secs(300));
    let committed = churn.stop();
    println!("snapshot published {rows} rows; {committed} concurrent changes committed");
    assert!(committed > 0);
    let reads = check_snapshot_stream(&mut pg, &table, &log, &format!("{prefix}.{table}"));
    assert_eq!(reads as i64, rows, "the status view's row count is what was published");
    drop_publication(&mut pg, &name);
}

#[test]
fn kill_minus_nine_and_immediate_stops_during_a_snapshot_publish_each_row_once() {
    let plan = CrashPlan::new(0);
    let mut rng = Rng::new();
    let mut pg = pg();
    let (table, log, name, prefix) = (unique("snapk"), unique("snapklog"), unique("pub"), unique("snapk"));
    create_filled_table(&mut pg, &table, EXISTING_ROWS);
    pg.batch_execute(&format!("CREATE TABLE {log} (id bigint)")).unwrap();
    // Small chunks: many commits to crash between.
    set_chunk_rows(&mut pg, Some(1_000));
    let churn = Churn::start(&table, &log, EXISTING_ROWS);
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));

    let mut history = Vec::new();
    let mut rows_at_last_crash = 0;
    let crashes = plan.kills + plan.server_stops;
    let mut crash = 0;
    while crash < crashes {
        // A crash lands in flight: the snapshot is running and has published more since
        // the previous one.
        let deadline = Instant::now() + Duration::from_secs(180);
        let (pid, rows) = loop {
            if pg.is_closed() {
                // A kill -9 of a worker restarts every backend, this connection's too.
                pg = pg_kafka_bridge_e2e::pg();
            }
            let pids = publication_worker_pids(&mut pg, &name);
            match snapshot_state(&mut pg, &name, &table) {
                Some((state, rows)) if state == "running" && rows > rows_at_last_crash && pids.len() == 1 => {
                    break (pids[0], rows)
                }
                Some((state, _)) => assert!(state != "done", "the snapshot finished before crash {crash}"),
                None => {}
            }
            assert!(Instant::now() < deadline, "no snapshot progress before crash {crash}");
            std::thread::sleep(Duration::from_millis(rng.below(50)));
        };
        if crash < plan.kills {
            // The worker may have exited between the look and the kill: that one is not a crash.
            let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success();
            history.push(format!("kill -9 {pid} at {rows} rows: {killed}"));
            if !killed {
                continue;
            }
        } else {
            script("cluster", &["kill"]);
            script("cluster", &["start"]);
            pg = pg_kafka_bridge_e2e::pg();
            history.push(format!("immediate stop at {rows} rows"));
        }
        rows_at_last_crash = rows;
        crash += 1;
    }
    println!("{}", history.join("\n"));
    let rows = wait_for_snapshot_done(&name, &table, Duration::from_secs(600));
    churn.stop();
    set_chunk_rows(&mut pg, None);
    let reads = check_snapshot_stream(&mut pg, &table, &log, &format!("{prefix}.{table}"));
    assert_eq!(reads as i64, rows);
    drop_publication(&mut pg, &name);
}

#[test]
fn snapshot_of_one_table_while_others_stream() {
    let mut pg = pg();
    let (big, small, name, prefix) = (unique("snapbig"), unique("snapsmall"), unique("pub"), unique("snapl"));
    create_filled_table(&mut pg, &big, 100_000);
    create_filled_table(&mut pg, &small, 10);
    create_publication(
        &mut pg,
        &name,
        &[&big, &small],
        &format!(", topic => '{prefix}.{{table}}', snapshot => 'none'"),
    );
    wait_for("the publication to run", Duration::from_secs(60), || {
        publication_status(&mut pg, &name).contains("running")
    });
    assert!(snapshot_state(&mut pg, &name, &big).is_none(), "snapshot 'none' requested a snapshot");
    // The smallest chunks: a snapshot of 1,000 chunks, long enough to change something in
    // the middle of it.
    set_chunk_rows(&mut pg, Some(100));
    pg.batch_execute(&format!("SELECT kafka.snapshot('{name}', ARRAY['{big}']::regclass[])")).unwrap();
    wait_for("the snapshot to run", Duration::from_secs(60), || {
        snapshot_state(&mut pg, &name, &big).is_some_and(|(state, rows)| state == "running" && rows > 0)
    });
    let rate: Option<i64> = pg
        .query_one("SELECT rows_per_second FROM kafka.publication_snapshots WHERE publication = $1", &[&name])
        .unwrap()
        .get(0);
    assert!(rate.is_some_and(|r| r > 0), "rows_per_second of a running snapshot: {rate:?}");

    // A change committed mid-snapshot reaches Kafka within seconds.
    let committed_at = Instant::now();
    pg.batch_execute(&format!("INSERT INTO {small} VALUES (1000, 1, 'live')")).unwrap();
    let small_topic = format!("{prefix}.{small}");
    let live = loop {
        if let Some(live) = read_events_once(&small_topic).into_iter().find(|e| e.after()["id"] == 1000) {
            break live;
        }
        assert!(committed_at.elapsed() < Duration::from_secs(5), "a live change waited for the snapshot");
        std::thread::sleep(Duration::from_millis(100));
    };
    let latency = committed_at.elapsed();
    println!("live change published after {latency:?}");
    assert!(latency < Duration::from_secs(5), "a live change took {latency:?} during the snapshot");

    let rows = wait_for_snapshot_done(&name, &big, Duration::from_secs(300));
    set_chunk_rows(&mut pg, None);
    assert_eq!(rows, 100_000);
    let events = read_events_with_kcat(&format!("{prefix}.{big}"), 100_000, Duration::from_secs(120));
    let ids: HashSet<i64> =
        events.iter().filter(|e| e.op() == "r").map(|e| e.after()["id"].as_i64().unwrap()).collect();
    assert_eq!(events.len(), 100_000, "one event per row of the big table");
    assert_eq!(ids.len(), 100_000);
    // Positions order all events of a publication: the live change came out in the middle
    // of the snapshot, not after it.
    let (first_read, last_read) = (events[0].position(), events[events.len() - 1].position());
    assert!(
        first_read < live.position() && live.position() < last_read,
        "the live change at {:?} is not inside the snapshot ({first_read:?} to {last_read:?})",
        live.position()
    );
    // The small table was not asked for: only its live change is in its topic.
    assert_eq!(read_events_with_kcat(&small_topic, 1, Duration::from_secs(5)).len(), 1);

    // A second run of the same table publishes every row again, once.
    pg.batch_execute(&format!("SELECT kafka.snapshot('{name}')")).unwrap();
    let run: i32 = pg
        .query_one(
            "SELECT run FROM kafka.publication_snapshots WHERE publication = $1 AND \"table\" = $2::text::regclass",
            &[&name, &big],
        )
        .unwrap()
        .get(0);
    assert_eq!(run, 2);
    wait_for_snapshot_done(&name, &big, Duration::from_secs(300));
    wait_for_snapshot_done(&name, &small, Duration::from_secs(60));
    let events = read_events_with_kcat(&format!("{prefix}.{big}"), 200_000, Duration::from_secs(120));
    assert_eq!(events.len(), 200_000, "two runs, each row once per run");
    drop_publication(&mut pg, &name);
}

#[test]
fn tables_added_later_are_snapshotted_and_bad_requests_are_refused() {
    let mut pg = pg();
    let (first, added, other, name, prefix) =
        (unique("snapa"), unique("snapb"), unique("snapc"), unique("pub"), unique("snapa"));
    create_filled_table(&mut pg, &first, 100);
    create_filled_table(&mut pg, &added, 250);
    create_filled_table(&mut pg, &other, 1);
    create_publication(&mut pg, &name, &[&first], &format!(", topic => '{prefix}.{{table}}'"));
    assert_eq!(wait_for_snapshot_done(&name, &first, Duration::from_secs(60)), 100);
    pg.batch_execute(&format!("SELECT kafka.alter_publication('{name}', add_tables => ARRAY['{added}']::regclass[])"))
        .unwrap();
    assert_eq!(wait_for_snapshot_done(&name, &added, Duration::from_secs(60)), 250);
    let events = read_events_with_kcat(&format!("{prefix}.{added}"), 250, Duration::from_secs(60));
    assert_eq!(events.iter().filter(|e| e.op() == "r").count(), 250);

    for (call, expected) in [
        (format!("SELECT kafka.snapshot('{name}', ARRAY['{other}']::regclass[])"), "is not published by"),
        (format!("SELECT kafka.snapshot('{name}x')"), "does not exist"),
        (
            format!(
                "SELECT kafka.create_publication('{name}x', '{}', ARRAY['{other}']::regclass[], snapshot => 'all')",
                brokers()
            ),
            "invalid snapshot \"all\": use 'initial' or 'none'",
        ),
    ] {
        let error = pg.batch_execute(&call).unwrap_err();
        assert!(error.as_db_error().unwrap().message().contains(expected), "{call}: {error:?}");
    }

    // Dropping a table from the publication forgets its snapshot.
    pg.batch_execute(&format!("SELECT kafka.alter_publication('{name}', drop_tables => ARRAY['{added}']::regclass[])"))
        .unwrap();
    assert!(snapshot_state(&mut pg, &name, &added).is_none());
    drop_publication(&mut pg, &name);
    assert!(snapshot_state(&mut pg, &name, &first).is_none(), "a dropped publication's snapshots stay");
}

#[test]
fn snapshot_of_wide_rows_keeps_the_worker_small() {
    let mut pg = pg();
    let (table, name, prefix) = (unique("snapwide"), unique("pub"), unique("snapw"));
    // 700 rows of 200 kB: 140 MB of events, more than the worker may use.
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, version bigint NOT NULL, pad text);
         INSERT INTO {table} SELECT g, 1, repeat(md5(g::text), 6250) FROM generate_series(1, 700) g;"
    ))
    .unwrap();
    let sampler = {
        let name = name.clone();
        MemorySampler::start(move |client| publication_worker_pids(client, &name))
    };
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    let rows = wait_for_snapshot_done(&name, &table, Duration::from_secs(300));
    let (peak_anon, peak_total) = sampler.stop();
    println!("wide snapshot: {rows} rows; worker peak {peak_anon:.1} MB private, {peak_total:.1} MB total");
    assert_eq!(rows, 700);
    assert!(peak_anon > 0.0, "the worker's memory was never sampled");
    assert!(peak_anon < 128.0, "worker used {peak_anon:.1} MB during a snapshot of wide rows");
    let events = read_events_with_kcat(&format!("{prefix}.{table}"), 700, Duration::from_secs(120));
    assert_eq!(events.len(), 700);
    assert!(events.iter().all(|e| e.after()["pad"].as_str().is_some_and(|p| p.len() == 200_000)));
    drop_publication(&mut pg, &name);
}

#[test]
fn partitioned_table_is_published_as_its_root_with_partitions_attached_later() {
    let mut pg = pg();
    let (root, name, prefix) = (unique("parted"), unique("pub"), unique("part"));
    pg.batch_execute(&format!(
        "CREATE TABLE {root} (id bigint, region int, version bigint NOT NULL, pad text, PRIMARY KEY (id, region))
             PARTITION BY LIST (region);
         CREATE TABLE {root}_1 PARTITION OF {root} FOR VALUES IN (1);
         CREATE TABLE {root}_2 PARTITION OF {root} FOR VALUES IN (2);
         INSERT INTO {root} SELECT g, 1 + g % 2, 1, 'existing' FROM generate_series(1, 2000) g;"
    ))
    .unwrap();
    create_publication(&mut pg, &name, &[&root], &format!(", topic => '{prefix}.{{table}}'"));
    assert_eq!(wait_for_snapshot_done(&name, &root, Duration::from_secs(60)), 2000);
    // A partition attached later, whose columns are in another order and not at the same
    // attribute numbers.
    pg.batch_execute(&format!(
        "CREATE TABLE {root}_3 (dropped int, pad text, version bigint NOT NULL, region int NOT NULL, id bigint NOT NULL);
         ALTER TABLE {root}_3 DROP COLUMN dropped;
         ALTER TABLE {root} ATTACH PARTITION {root}_3 FOR VALUES IN (3);
         INSERT INTO {root} SELECT g, 3, 7, 'attached' FROM generate_series(1, 50) g;
         UPDATE {root} SET version = 2 WHERE id = 2 AND region = 1;
         DELETE FROM {root} WHERE id = 1 AND region = 2;
         UPDATE {root} SET pad = 'moved' WHERE id = 3 AND region = 3;"
    ))
    .unwrap();
    let topic = format!("{prefix}.{root}");
    let events = read_events_with_kcat(&topic, 2053, Duration::from_secs(60));
    assert_eq!(events.len(), 2053, "2,000 rows read, 50 inserts, 2 updates and a delete");
    assert!(events.iter().all(|e| e.value.as_ref().unwrap()["source"]["table"] == root.as_str()));
    assert_eq!(events.iter().filter(|e| e.op() == "r").count(), 2000);
    let attached: Vec<&Event> = events.iter().filter(|e| e.op() == "c").collect();
    assert_eq!(attached.len(), 50);
    assert_eq!(attached[0].after(), &serde_json::json!({"id": 1, "region": 3, "version": 7, "pad": "attached"}));
    assert_eq!(attached[0].key, Some(serde_json::json!({"id": 1, "region": 3})));
    let updates: Vec<&Event> = events.iter().filter(|e| e.op() == "u").collect();
    assert_eq!(updates[0].after()["version"], 2);
    assert_eq!(updates[1].after(), &serde_json::json!({"id": 3, "region": 3, "version": 7, "pad": "moved"}));
    let delete = events.iter().find(|e| e.op() == "d").unwrap();
    assert_eq!(delete.key, Some(serde_json::json!({"id": 1, "region": 2})));
    let partition_topic = pg
        .query_opt("SELECT 1 FROM kafka.publication_status WHERE events_total > 2053 AND publication = $1", &[&name])
        .unwrap();
    assert!(partition_topic.is_none(), "events beyond the root's");
    drop_publication(&mut pg, &name);
}

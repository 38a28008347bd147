//! Benchmark of the PostgreSQL-to-Kafka path against its baseline, on the same WAL:
//!
//! A stopped publication and a `test_decoding` slot are created, then N row changes are
//! written (inserts of 5-column orders: one transaction of 100,000 rows, the rest in
//! transactions of 1,000). Baseline: `pg_recvlogical` drains the test_decoding slot to
//! /dev/null up to the end of that WAL. Product: the publication is started and timed until
//! its slot is confirmed past the same point, i.e. until every change is committed to Kafka.
//! Then every event is read back to check that each change is there exactly once.
//!
//! With `--one-transaction`, it measures instead a running publication publishing a single
//! transaction of N rows: the time from the insert to the slot's confirmation, and the
//! worker's peak memory, which `logical_decoding_work_mem` bounds whatever N.
//!
//! With `--snapshot`, one publication publishes the same N rows twice, measured side by
//! side: first streaming them (N inserts of the 5-column rows, written while it is stopped,
//! in transactions of 1,000, then published from the slot), then as a snapshot of the table
//! that holds them (`kafka.snapshot`), with the worker's peak memory during the snapshot.
//! Each phase publishes to an empty broker of its own (the publication is altered to the
//! second, `PGKB_SECOND_BROKERS`, in between): the local broker rewrites its whole store
//! every few seconds, so a phase that came second would compete with a larger store.
//!
//!   pgkb-bench-publication [CHANGES]                     (default 1000000)
//!   pgkb-bench-publication --one-transaction [ROWS]      (default 1000000)
//!   pgkb-bench-publication --snapshot [ROWS]             (default 1000000)

use pg_kafka_bridge_e2e::memory::MemorySampler;
use pg_kafka_bridge_e2e::*;
use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

const BIG_TRANSACTION: i64 = 100_000;
const TRANSACTION: i64 = 1_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |arg: Option<&String>| arg.map(|s| s.parse().expect("a number of changes")).unwrap_or(1_000_000);
    match args.first().map(String::as_str) {
        Some("--one-transaction") => one_transaction(number(args.get(1))),
        Some("--snapshot") => snapshot_against_streaming(number(args.get(1))),
        _ => against_pg_recvlogical(number(args.first())),
    }
}

fn one_transaction(rows: i64) {
    let mut pg = pg();
    let (table, name) = (unique("bench_txn"), unique("bench_txn"));
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, n int, note text) WITH (autovacuum_enabled = false)"
    ))
    .unwrap();
    create_publication(&mut pg, &name, &[&table], ", topic => 'bench.{table}'");
    wait_for("the worker", Duration::from_secs(30), || !publication_worker_pids(&mut pg, &name).is_empty());
    let sampler = MemorySampler::start({
        let name = name.clone();
        move |pg| publication_worker_pids(pg, &name)
    });
    let started = Instant::now();
    pg.batch_execute(&format!(
        "INSERT INTO {table} SELECT i, i % 1000, 'note ' || i FROM generate_series(1, {rows}) i"
    ))
    .unwrap();
    let insert_secs = started.elapsed().as_secs_f64();
    let end_lsn: String = pg.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    let done = format!(
        "SELECT count(*) FROM kafka.publication_status WHERE publication = '{name}' AND confirmed_lsn >= '{end_lsn}'"
    );
    wait_for("the publication to publish everything", Duration::from_secs(900), || count(&mut pg, &done) == 1);
    let publish_secs = started.elapsed().as_secs_f64();
    let memory = sampler.stop();
    println!();
    println!("one transaction of {rows} rows (3 columns), inserted in {insert_secs:.2} s");
    println!("published to Kafka and confirmed {publish_secs:.2} s after the insert began");
    println!(
        "worker peak memory: {:.1} MB private (RssAnon), {:.1} MB RSS incl. shared buffers (VmHWM)",
        memory.0, memory.1
    );
    let events = read_events_with_kcat(&format!("bench.{table}"), rows as usize, Duration::from_secs(600));
    let ids: HashSet<i64> = events.iter().filter_map(|e| e.after()["id"].as_i64()).collect();
    println!("events read back: {} ({} distinct changes)", events.len(), ids.len());
    assert_eq!((events.len() as i64, ids.len() as i64), (rows, rows), "every row once in Kafka");
    drop_publication(&mut pg, &name);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
}

/// Creates the 5-column table of the benchmarks.
fn create_orders_table(pg: &mut postgres::Client, table: &str) {
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, customer text, amount numeric(12,2), \
         created_at timestamptz, payload jsonb) WITH (autovacuum_enabled = false)"
    ))
    .unwrap();
}

/// Inserts `changes` 5-column rows: the first `first` in one transaction, the rest in
/// transactions of 1,000. Returns the end of the WAL written.
fn insert_orders(pg: &mut postgres::Client, table: &str, changes: i64, first: i64) -> String {
    let started = Instant::now();
    let mut next = 0i64;
    while next < changes {
        let size = if next == 0 { first.min(changes) } else { TRANSACTION.min(changes - next) };
        pg.batch_execute(&format!(
            "INSERT INTO {table} SELECT i, 'customer-' || (i % 1000), (i % 100000) / 100.0, \
             '2026-11-27 10:00:00+00'::timestamptz + i * interval '1 second', \
             jsonb_build_object('sku', 'SKU-' || (i % 97), 'qty', i % 5 + 1) \
             FROM generate_series({next}, {}) i",
            next + size - 1
        ))
        .unwrap();
        next += size;
    }
    let end_lsn: String = pg.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    println!("  written in {:.1} s, WAL up to {end_lsn}", started.elapsed().as_secs_f64());
    pg.batch_execute("CHECKPOINT").unwrap();
    end_lsn
}

fn snapshot_against_streaming(rows: i64) {
    let mut pg = pg();
    let (table, name) = (unique("bench_snap"), unique("bench_snap"));
    create_orders_table(&mut pg, &table);
    create_publication(&mut pg, &name, &[&table], ", topic => 'bench.{table}', snapshot => 'none'");
    stop_publication(&mut pg, &name);
    println!("writing {rows} rows in transactions of {TRANSACTION}...");
    let end_lsn = insert_orders(&mut pg, &table, rows, TRANSACTION);

    // Streaming: the publication publishes the inserts from its slot.
    let started = Instant::now();
    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    let done = format!(
        "SELECT count(*) FROM kafka.publication_status WHERE publication = '{name}' AND confirmed_lsn >= '{end_lsn}'"
    );
    wait_for("the publication to publish the inserts", Duration::from_secs(900), || count(&mut pg, &done) == 1);
    let stream_secs = started.elapsed().as_secs_f64();

    // Snapshot: the same publication publishes the rows the table now holds.
    let second = std::env::var("PGKB_SECOND_BROKERS").expect("PGKB_SECOND_BROKERS: the second phase's broker");
    pg.batch_execute(&format!("SELECT kafka.alter_publication('{name}', brokers => '{second}')")).unwrap();
    let sampler = MemorySampler::start({
        let name = name.clone();
        move |pg| publication_worker_pids(pg, &name)
    });
    let requested = Instant::now();
    pg.batch_execute(&format!("SELECT kafka.snapshot('{name}')")).unwrap();
    let state =
        format!("SELECT count(*) FROM kafka.publication_snapshots WHERE publication = '{name}' AND state = 'done'");
    wait_for("the snapshot to complete", Duration::from_secs(900), || count(&mut pg, &state) == 1);
    let request_secs = requested.elapsed().as_secs_f64();
    let memory = sampler.stop();
    let snapshot_secs: f64 = pg
        .query_one(
            "SELECT extract(epoch FROM finished_at - started_at)::float8 FROM kafka.publication_snapshots \
              WHERE publication = $1",
            &[&name],
        )
        .unwrap()
        .get(0);

    let rate = |secs: f64| rows as f64 / secs;
    println!();
    println!("rows: {rows} of 5 columns, the same rows streamed and snapshotted by one publication");
    println!("streaming {rows} inserts (baseline):  {:>9.0} rows/s  ({stream_secs:.2} s)", rate(stream_secs));
    println!(
        "snapshot of the table:                {:>9.0} rows/s  ({snapshot_secs:.2} s; {request_secs:.2} s from the request)",
        rate(snapshot_secs)
    );
    println!("ratio snapshot / streaming:           {:>9.2}", stream_secs / snapshot_secs);
    println!(
        "worker peak memory during the snapshot: {:.1} MB private (RssAnon), {:.1} MB RSS incl. shared buffers (VmHWM)",
        memory.0, memory.1
    );
    // Everything is committed: the snapshot is done only once its last chunk is.
    let (streamed, inserts, _) = tally_events(&brokers(), &format!("bench.{table}"));
    let (snapshotted, _, reads) = tally_events(&second, &format!("bench.{table}"));
    println!(
        "events read back: {streamed} ({inserts} inserts), then {snapshotted} ({} distinct rows read)",
        reads.len()
    );
    assert_eq!((streamed as i64, inserts as i64), (rows, rows), "every insert once in Kafka");
    assert_eq!((snapshotted as i64, reads.len() as i64), (rows, rows), "every row read once in Kafka");
    drop_publication(&mut pg, &name);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
}

/// Reads a single-partition topic with kcat as its output comes (millions of events are not
/// held in memory): the number of events, of inserts, and the ids of the rows read.
fn tally_events(brokers: &str, topic: &str) -> (usize, usize, HashSet<i64>) {
    use std::io::BufRead;
    let mut child = Command::new("kcat")
        .args(["-C", "-b", brokers, "-t", topic, "-p", "0", "-o", "beginning", "-e", "-q"])
        .args(["-X", "isolation.level=read_committed", "-X", "receive.message.max.bytes=2000000000"])
        .args(["-f", "%k\t%s\n"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run kcat");
    let (mut events, mut inserts, mut reads) = (0, 0, HashSet::new());
    for line in std::io::BufReader::new(child.stdout.take().expect("kcat's output")).lines() {
        let line = line.expect("a line of kcat's output");
        let (key, value) = line.split_once('\t').unwrap_or((&line, ""));
        events += 1;
        if value.starts_with(r#"{"op":"c""#) {
            inserts += 1;
        } else if value.starts_with(r#"{"op":"r""#) {
            let key: serde_json::Value = serde_json::from_str(key).expect("a JSON key");
            reads.insert(key["id"].as_i64().expect("an id"));
        }
    }
    child.wait().expect("kcat ends");
    (events, inserts, reads)
}

fn against_pg_recvlogical(changes: i64) {
    let mut pg = pg();
    let (table, name, recv_slot) = (unique("bench_pub"), unique("bench_pub"), unique("bench_recv"));
    create_orders_table(&mut pg, &table);
    create_publication(&mut pg, &name, &[&table], ", topic => 'bench.{table}'");
    stop_publication(&mut pg, &name);
    pg.batch_execute(&format!("SELECT pg_create_logical_replication_slot('{recv_slot}', 'test_decoding')")).unwrap();

    println!("writing {changes} row changes ({BIG_TRANSACTION} in one transaction, the rest {TRANSACTION} per transaction)...");
    let end_lsn = insert_orders(&mut pg, &table, changes, BIG_TRANSACTION);

    // Baseline: the same WAL decoded by pg_recvlogical with test_decoding, output discarded.
    let started = Instant::now();
    let status = Command::new(format!("{}/pg_recvlogical", std::env::var("PG_BIN").unwrap_or_default()))
        .args(["-d", &connection_string(), "--slot", &recv_slot, "--start", "--endpos", &end_lsn, "-f", "/dev/null"])
        .status()
        .expect("run pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed: {status}");
    let recv_secs = started.elapsed().as_secs_f64();
    pg.batch_execute(&format!("SELECT pg_drop_replication_slot('{recv_slot}')")).unwrap();

    // The publication, from the same WAL, until its slot is confirmed past the end.
    let started = Instant::now();
    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    let sampler = MemorySampler::start({
        let name = name.clone();
        move |pg| publication_worker_pids(pg, &name)
    });
    let done = format!(
        "SELECT count(*) FROM kafka.publication_status WHERE publication = '{name}' AND confirmed_lsn >= '{end_lsn}'"
    );
    wait_for("the publication to publish everything", Duration::from_secs(900), || count(&mut pg, &done) == 1);
    let publish_secs = started.elapsed().as_secs_f64();
    let memory = sampler.stop();

    let rate = |secs: f64| changes as f64 / secs;
    println!();
    println!(
        "changes: {changes} inserts of 5-column rows, one transaction of {BIG_TRANSACTION}, the rest of {TRANSACTION}"
    );
    println!("pg_recvlogical, test_decoding (baseline): {:>9.0} changes/s  ({recv_secs:.2} s)", rate(recv_secs));
    println!("publication, to Kafka, exactly once:      {:>9.0} changes/s  ({publish_secs:.2} s)", rate(publish_secs));
    println!("ratio publication / pg_recvlogical:       {:>9.2}", recv_secs / publish_secs);
    println!(
        "worker peak memory: {:.1} MB private (RssAnon), {:.1} MB RSS incl. shared buffers (VmHWM)",
        memory.0, memory.1
    );

    // The local broker is slow to serve a topic this size right after writing it.
    let events = read_events_with_kcat(&format!("bench.{table}"), changes as usize, Duration::from_secs(600));
    let ids: HashSet<i64> = events.iter().filter_map(|e| e.after()["id"].as_i64()).collect();
    println!("events read back: {} ({} distinct changes)", events.len(), ids.len());
    assert_eq!(events.len() as i64, changes, "events in Kafka");
    assert_eq!(ids.len() as i64, changes, "distinct changes in Kafka");
    drop_publication(&mut pg, &name);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
}

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
//! With `--sizes`, the first comparison (inserts in transactions of 1,000) for rows whose
//! events carry about 100 B, 1 KB and 10 KB of data (a bigint key and a text body), each on
//! an empty broker: rows/s and MB/s of the events read back.
//!
//! With `--many`, 4 publications of 4 tables publish N changes in all (N/4 each, written while
//! they are stopped) at once, against `pg_recvlogical` decoding the same WAL once; each
//! publication decodes all of it.
//!
//!   pgkb-bench-publication [CHANGES]                     (default 1000000)
//!   pgkb-bench-publication --sizes
//!   pgkb-bench-publication --many [CHANGES]              (default 1000000)
//!   pgkb-bench-publication --one-transaction [ROWS]      (default 1000000)
//!   pgkb-bench-publication --snapshot [ROWS]             (default 1000000)

use pg_kafka_bridge_e2e::bench::{self, Rows, TABLE_OPTIONS};
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
        Some("--sizes") => sizes(),
        Some("--many") => many(number(args.get(1))),
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

fn create_table(pg: &mut postgres::Client, table: &str, rows: Rows) {
    pg.batch_execute(&format!("CREATE TABLE {table} ({}) {TABLE_OPTIONS}", rows.columns())).unwrap();
}

/// Inserts rows `ids` of `rows`: the first `first` in one transaction, the rest in
/// transactions of 1,000.
fn insert_rows(pg: &mut postgres::Client, table: &str, rows: Rows, ids: std::ops::Range<i64>, first: i64) {
    let mut next = ids.start;
    while next < ids.end {
        let size = if next == ids.start { first } else { TRANSACTION }.min(ids.end - next);
        bench::insert(pg, table, rows, next..next + size);
        next += size;
    }
}

/// [`insert_rows`] of `changes` rows into one table; returns the end of the WAL written.
fn insert_changes(pg: &mut postgres::Client, table: &str, rows: Rows, changes: i64, first: i64) -> String {
    let started = Instant::now();
    insert_rows(pg, table, rows, 0..changes, first);
    wal_end(pg, started)
}

/// The end of the WAL written, after a checkpoint.
fn wal_end(pg: &mut postgres::Client, started: Instant) -> String {
    let end_lsn: String = pg.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    println!("  written in {:.1} s, WAL up to {end_lsn}", started.elapsed().as_secs_f64());
    pg.batch_execute("CHECKPOINT").unwrap();
    end_lsn
}

fn snapshot_against_streaming(rows: i64) {
    let mut pg = pg();
    let (table, name) = (unique("bench_snap"), unique("bench_snap"));
    create_table(&mut pg, &table, Rows::Orders);
    create_publication(&mut pg, &name, &[&table], ", topic => 'bench.{table}', snapshot => 'none'");
    stop_publication(&mut pg, &name);
    println!("writing {rows} rows in transactions of {TRANSACTION}...");
    let end_lsn = insert_changes(&mut pg, &table, Rows::Orders, rows, TRANSACTION);

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
    let (streamed, inserts, _, _) = tally_events(&brokers(), &format!("bench.{table}"));
    let (snapshotted, _, reads, _) = tally_events(&second, &format!("bench.{table}"));
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
/// held in memory): the number of events, of inserts, the distinct ids of the rows inserted
/// or read, and the megabytes of keys and values.
fn tally_events(brokers: &str, topic: &str) -> (usize, usize, HashSet<i64>, f64) {
    use std::io::BufRead;
    let mut child = Command::new("kcat")
        .args(["-C", "-b", brokers, "-t", topic, "-p", "0", "-o", "beginning", "-e", "-q"])
        .args(["-X", "isolation.level=read_committed", "-X", "receive.message.max.bytes=2000000000"])
        .args(["-f", "%k\t%s\n"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run kcat");
    let (mut events, mut inserts, mut ids, mut bytes) = (0, 0, HashSet::new(), 0);
    for line in std::io::BufReader::new(child.stdout.take().expect("kcat's output")).lines() {
        let line = line.expect("a line of kcat's output");
        let (key, value) = line.split_once('\t').unwrap_or((&line, ""));
        events += 1;
        bytes += key.len() + value.len();
        let insert = value.starts_with(r#"{"op":"c""#);
        inserts += usize::from(insert);
        if insert || value.starts_with(r#"{"op":"r""#) {
            let key: serde_json::Value = serde_json::from_str(key).expect("a JSON key");
            ids.insert(key["id"].as_i64().expect("an id"));
        }
    }
    child.wait().expect("kcat ends");
    (events, inserts, ids, bytes as f64 / 1e6)
}

/// One publication against `pg_recvlogical` on the same WAL.
struct Comparison {
    recv_secs: f64,
    publish_secs: f64,
    /// Peak private and total memory of the worker (MB).
    memory: (f64, f64),
    /// Keys and values of the events read back (MB).
    event_mb: f64,
}

fn against_pg_recvlogical(changes: i64) {
    let mut pg = pg();
    println!("writing {changes} row changes ({BIG_TRANSACTION} in one transaction, the rest {TRANSACTION} per transaction)...");
    let c = compare(&mut pg, Rows::Orders, changes, BIG_TRANSACTION);
    let rate = |secs: f64| changes as f64 / secs;
    println!();
    println!(
        "changes: {changes} inserts of 5-column rows, one transaction of {BIG_TRANSACTION}, the rest of {TRANSACTION}"
    );
    println!("pg_recvlogical, test_decoding (baseline): {:>9.0} changes/s  ({:.2} s)", rate(c.recv_secs), c.recv_secs);
    println!(
        "publication, to Kafka, exactly once:      {:>9.0} changes/s  ({:.2} s)",
        rate(c.publish_secs),
        c.publish_secs
    );
    println!("ratio publication / pg_recvlogical:       {:>9.2}", c.recv_secs / c.publish_secs);
    println!(
        "worker peak memory: {:.1} MB private (RssAnon), {:.1} MB RSS incl. shared buffers (VmHWM)",
        c.memory.0, c.memory.1
    );
}

fn sizes() {
    let mut pg = pg();
    let mut lines = Vec::new();
    for (size, changes) in [(100usize, 1_000_000i64), (1_000, 200_000), (10_000, 20_000)] {
        bench::empty_broker();
        let rows = Rows::Sized(size);
        println!("{}: writing {changes} rows in transactions of {TRANSACTION}...", rows.label());
        let c = compare(&mut pg, rows, changes, TRANSACTION);
        lines.push(format!(
            "{} | {:.0} | {:.0} | {:.1} | {:.2} | {:.1} MB",
            rows.label(),
            changes as f64 / c.recv_secs,
            changes as f64 / c.publish_secs,
            c.event_mb / c.publish_secs,
            c.recv_secs / c.publish_secs,
            c.memory.0
        ));
    }
    println!();
    println!("inserts in transactions of {TRANSACTION}, one publication; MB/s counts the events' keys and values");
    println!("rows | pg_recvlogical changes/s | publication changes/s | publication MB/s | ratio | worker peak");
    for line in lines {
        println!("{line}");
    }
}

/// Writes `changes` rows of `rows` (the first `first` in one transaction) while a new
/// publication is stopped, then measures `pg_recvlogical` and the publication on that WAL,
/// and checks that every change is in Kafka once.
fn compare(pg: &mut postgres::Client, rows: Rows, changes: i64, first: i64) -> Comparison {
    let (table, name, recv_slot) = (unique("bench_pub"), unique("bench_pub"), unique("bench_recv"));
    create_table(pg, &table, rows);
    create_publication(pg, &name, &[&table], &format!(", topic => 'bench.{table}', snapshot => 'none'"));
    stop_publication(pg, &name);
    pg.batch_execute(&format!("SELECT pg_create_logical_replication_slot('{recv_slot}', 'test_decoding')")).unwrap();
    let end_lsn = insert_changes(pg, &table, rows, changes, first);
    let recv_secs = pg_recvlogical(pg, &recv_slot, &end_lsn);

    // The publication, from the same WAL, until its slot is confirmed past the end.
    let started = Instant::now();
    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    let sampler = MemorySampler::start({
        let name = name.clone();
        move |pg| publication_worker_pids(pg, &name)
    });
    wait_until_confirmed(pg, std::slice::from_ref(&name), &end_lsn);
    let publish_secs = started.elapsed().as_secs_f64();
    let memory = sampler.stop();

    let (events, inserts, ids, event_mb) = tally_events(&brokers(), &format!("bench.{table}"));
    println!("  events read back: {events} ({inserts} inserts of {} distinct rows)", ids.len());
    let every_change_once = (events as i64, inserts as i64, ids.len() as i64);
    assert_eq!(every_change_once, (changes, changes, changes), "every change once in Kafka");
    drop_publication(pg, &name);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    Comparison { recv_secs, publish_secs, memory, event_mb }
}

/// Baseline: the WAL up to `end_lsn` decoded by pg_recvlogical with test_decoding, output
/// discarded; drops the slot. Returns the seconds it took.
fn pg_recvlogical(pg: &mut postgres::Client, slot: &str, end_lsn: &str) -> f64 {
    let started = Instant::now();
    let status = Command::new(format!("{}/pg_recvlogical", std::env::var("PG_BIN").unwrap_or_default()))
        .args(["-d", &connection_string(), "--slot", slot, "--start", "--endpos", end_lsn, "-f", "/dev/null"])
        .status()
        .expect("run pg_recvlogical");
    assert!(status.success(), "pg_recvlogical failed: {status}");
    let secs = started.elapsed().as_secs_f64();
    pg.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')")).unwrap();
    secs
}

/// Waits until every one of `publications` has its slot confirmed past `end_lsn`, that is
/// until everything before it is committed to Kafka.
fn wait_until_confirmed(pg: &mut postgres::Client, publications: &[String], end_lsn: &str) {
    let names = publications.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
    let done = format!(
        "SELECT count(*) FROM kafka.publication_status WHERE publication IN ({names}) AND confirmed_lsn >= '{end_lsn}'"
    );
    wait_for("the publications to publish everything", Duration::from_secs(900), || {
        count(pg, &done) == publications.len() as i64
    });
}

fn many(changes: i64) {
    const PUBLICATIONS: i64 = 4;
    let mut pg = pg();
    let per_table = changes / PUBLICATIONS;
    let tables: Vec<String> = (0..PUBLICATIONS).map(|_| unique("bench_many")).collect();
    let names: Vec<String> = (0..PUBLICATIONS).map(|_| unique("bench_many")).collect();
    for (table, name) in tables.iter().zip(&names) {
        create_table(&mut pg, table, Rows::Orders);
        create_publication(&mut pg, name, &[table], &format!(", topic => 'bench.{table}', snapshot => 'none'"));
        stop_publication(&mut pg, name);
    }
    let recv_slot = unique("bench_recv");
    pg.batch_execute(&format!("SELECT pg_create_logical_replication_slot('{recv_slot}', 'test_decoding')")).unwrap();
    println!("writing {per_table} rows to each of {PUBLICATIONS} tables in transactions of {TRANSACTION}...");
    let started = Instant::now();
    for (i, table) in tables.iter().enumerate() {
        let first = i as i64 * per_table;
        insert_rows(&mut pg, table, Rows::Orders, first..first + per_table, TRANSACTION);
    }
    let end_lsn = wal_end(&mut pg, started);
    let recv_secs = pg_recvlogical(&mut pg, &recv_slot, &end_lsn);

    let started = Instant::now();
    for name in &names {
        pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    }
    let sampler = MemorySampler::start({
        let names = names.clone();
        move |pg| names.iter().flat_map(|n| publication_worker_pids(pg, n)).collect()
    });
    wait_until_confirmed(&mut pg, &names, &end_lsn);
    let secs = started.elapsed().as_secs_f64();
    let (peak_one, _, peak_all) = sampler.stop_with_sum();
    for (table, name) in tables.iter().zip(&names) {
        let (events, inserts, ids, _) = tally_events(&brokers(), &format!("bench.{table}"));
        let every_change_once = (events as i64, inserts as i64, ids.len() as i64);
        assert_eq!(every_change_once, (per_table, per_table, per_table), "every change once in Kafka");
        drop_publication(&mut pg, name);
        pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    }
    let total = per_table * PUBLICATIONS;
    println!();
    println!("changes: {total} inserts of 5-column rows, {per_table} in each of {PUBLICATIONS} tables, transactions of {TRANSACTION}");
    println!(
        "pg_recvlogical, test_decoding, once (baseline): {:>9.0} changes/s  ({recv_secs:.2} s)",
        total as f64 / recv_secs
    );
    println!(
        "{PUBLICATIONS} publications at once, in all:           {:>9.0} changes/s  ({secs:.2} s, {:.2} of the baseline)",
        total as f64 / secs,
        recv_secs / secs
    );
    println!(
        "workers' peak memory: {peak_one:.1} MB private for the largest, {peak_all:.1} MB for all {PUBLICATIONS} together"
    );
    println!("(each publication decodes the whole WAL: all {total} changes)");
}

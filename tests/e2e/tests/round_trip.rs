//! Both directions at once: a publication feeds a topic with a table's rows (its snapshot)
//! and changes, and a subscription in format 'change' applies them to another table. While
//! the source table changes (and is truncated once), both workers are killed with SIGKILL
//! and the server is stopped in immediate mode; the two tables must end identical.
//!
//! A trigger on the target logs every row it applies (and slows it down, so that the
//! subscription lags behind): a change applied twice (a replay that an upsert would hide)
//! shows as a duplicate there. The subscription's worker is killed inside a batch
//! transaction, with its backlog in flight.
//!
//! Every crash comes while the workload is held and everything written is published, so that
//! the publication has no Kafka transaction open. (A kill -9 of any backend restarts them
//! all, the publication's worker too.) A publication killed in the middle of a Kafka
//! transaction leaves an aborted transaction in the topic,
//! and the local broker then lists that transaction in every later fetch response, which
//! makes librdkafka's consumer skip the same producer's later committed batches: a broker
//! bug (Kafka lists only the aborted transactions a fetch overlaps). Killing the publication
//! at any moment is the publication crash test's job, whose reader starts at the beginning
//! of the topic and so is not affected.

use pg_kafka_bridge_e2e::workload;
use pg_kafka_bridge_e2e::*;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// PIDs of the subscription's workers inside a batch transaction that has written.
fn subscription_workers_applying(pg: &mut postgres::Client, sub: &str) -> Vec<i32> {
    pg.query(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_kafka_bridge subscription' \
           AND application_name = $1 AND backend_xid IS NOT NULL",
        &[&sub],
    )
    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
    .unwrap_or_default()
}

#[test]
fn a_table_copied_through_kafka_ends_identical_after_crashes_on_both_sides() {
    let mut rng = Rng::new();
    let mut pg = pg();
    let (source, log, target, publication, sub, prefix) =
        (unique("source"), unique("log"), unique("target"), unique("pub"), unique("sub"), unique("trip"));
    workload::create_tables(&mut pg, &source, &log);
    // Rows the source holds before the publication exists: its snapshot publishes them.
    // (Negative ids: the workload inserts from 1 up.)
    pg.batch_execute(&format!("INSERT INTO {source} SELECT -g, 1, 'existing' FROM generate_series(1, 20000) g"))
        .unwrap();
    let applied = unique("applied");
    pg.batch_execute(&format!(
        "CREATE TABLE {target} (id bigint PRIMARY KEY, version bigint NOT NULL, pad text);
         CREATE TABLE public.{applied} (id bigint, version bigint, op text);
         CREATE FUNCTION public.{applied}_log() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           PERFORM pg_catalog.pg_sleep(0.0005);
           IF TG_OP = 'DELETE' THEN
             INSERT INTO public.{applied} VALUES (OLD.id, OLD.version, 'd');
           ELSE
             INSERT INTO public.{applied} VALUES (NEW.id, NEW.version, TG_OP);
           END IF;
           RETURN NULL;
         END $$;
         CREATE TRIGGER log_applied AFTER INSERT OR UPDATE OR DELETE ON {target}
           FOR EACH ROW EXECUTE FUNCTION public.{applied}_log();"
    ))
    .unwrap();
    // The topic exists before the first event: a first Kafka transaction failing on a topic
    // being created would be aborted, which the local broker's bug (above) turns into a stall.
    create_topic(&format!("{prefix}.{source}"), 1);
    create_publication(&mut pg, &publication, &[&source], &format!(", topic => '{prefix}.{{table}}'"));
    // The local broker answers a fetch with the whole rest of the topic.
    let options = if local_broker() { r#"{"receive.message.max.bytes": "2000000000"}"# } else { "{}" };
    create_subscription(
        &mut pg,
        &sub,
        &format!("{prefix}.{source}"),
        &target,
        &format!(", format => 'change', mode => 'upsert', options => '{options}'"),
    );

    // The crashes below hit the publication between Kafka transactions (see above), which a
    // running snapshot, always in the middle of one chunk or the next, never is: it comes
    // first. (Crashes in the middle of snapshots are the snapshot test's.)
    wait_for_count(
        &format!(
            "SELECT count(*) FROM kafka.publication_snapshots WHERE publication = '{publication}' AND state = 'done'"
        ),
        1,
        Duration::from_secs(120),
    );
    let control = Arc::new(workload::Control::default());
    let driver = {
        let (source, log, control) = (source.clone(), log.clone(), control.clone());
        std::thread::spawn(move || workload::run(&source, &log, 40_000, 10_000, &control))
    };
    let mut history = Vec::new();
    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1500)));
        if round == 2 {
            // The kill of the round before restarts every backend, maybe this connection's
            // after it was opened again.
            let mut attempts = 0;
            while let Err(e) = pg.batch_execute(&format!("TRUNCATE {source}")) {
                attempts += 1;
                assert!(attempts < 5, "TRUNCATE of the source: {e}");
                pg = pg_kafka_bridge_e2e::pg();
            }
            history.push("TRUNCATE of the source".into());
        }
        if round % 2 == 1 {
            control.pause();
            wait_until_published(&mut pg, &publication);
            let mut pids = Vec::new();
            wait_for("a subscription worker inside a batch transaction", Duration::from_secs(120), || {
                pids = subscription_workers_applying(&mut pg, &sub);
                if pids.is_empty() && pg.is_closed() {
                    pg = pg_kafka_bridge_e2e::pg();
                }
                !pids.is_empty()
            });
            let killed = Command::new("kill").args(["-9", &pids[0].to_string()]).status().unwrap().success();
            history
                .push(format!("kill -9 of the subscription worker {} inside a batch transaction: {killed}", pids[0]));
            pg = pg_kafka_bridge_e2e::pg();
            control.resume();
            continue;
        }
        let mut pids = Vec::new();
        wait_for("a running publication worker", Duration::from_secs(90), || {
            pids = publication_worker_pids(&mut pg, &publication);
            if pids.is_empty() {
                pg = pg_kafka_bridge_e2e::pg();
            }
            !pids.is_empty()
        });
        control.pause();
        wait_until_published(&mut pg, &publication);
        let killed = Command::new("kill").args(["-9", &pids[0].to_string()]).status().unwrap().success();
        history.push(format!("kill -9 of the publication worker {}: {killed}", pids[0]));
        pg = pg_kafka_bridge_e2e::pg();
        if round == 4 {
            script("cluster", &["kill"]);
            script("cluster", &["start"]);
            history.push("immediate stop and start".into());
            pg = pg_kafka_bridge_e2e::pg();
        }
        control.resume();
    }
    control.stop.store(true, Ordering::SeqCst);
    driver.join().unwrap();
    println!("{}", history.join("\n"));
    let kills = |side: &str| history.iter().filter(|h| h.contains(side) && h.ends_with("true")).count();
    assert!(kills("publication") >= 3 && kills("subscription") >= 3, "crashes on both sides: {history:?}");

    let differences = format!(
        "SELECT count(*) FROM ((TABLE {source} EXCEPT TABLE {target}) UNION ALL (TABLE {target} EXCEPT TABLE {source})) d"
    );
    wait_for_count(&differences, 0, Duration::from_secs(300));
    let mut pg = pg_kafka_bridge_e2e::pg();
    let rows = count(&mut pg, &format!("SELECT count(*) FROM {source}"));
    println!("{rows} rows in the source after {} changes", count(&mut pg, &format!("SELECT count(*) FROM {log}")));
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {target}")), rows);
    let applied_rows = count(&mut pg, &format!("SELECT count(*) FROM public.{applied}"));
    let applied_twice = count(
        &mut pg,
        &format!(
            "SELECT count(*) FROM (SELECT 1 FROM public.{applied} GROUP BY id, version, op HAVING count(*) > 1) d"
        ),
    );
    println!("{applied_rows} row changes applied to the target");
    let existing_applied =
        count(&mut pg, &format!("SELECT count(DISTINCT id) FROM public.{applied} WHERE id < 0 AND op = 'INSERT'"));
    assert_eq!(existing_applied, 20_000, "every row of the source's snapshot reached the target");
    let truncated = count(&mut pg, &format!("SELECT count(*) FROM public.{applied} WHERE id < 0 AND op = 'd'"));
    assert!(truncated > 0, "the TRUNCATE of the source deleted the target's rows");
    assert!(applied_rows >= rows, "the trigger logged the applied rows");
    assert_eq!(applied_twice, 0, "a change was applied to the target twice");
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM kafka.dead_letters WHERE subscription = '{sub}'")), 0);
    drop_subscription(&mut pg, &sub);
    drop_publication(&mut pg, &publication);
}

/// Waits until every change written so far is committed to Kafka: the publication's slot is
/// confirmed up to the current end of the WAL (nothing is confirmed before it is in Kafka).
/// Reconnects if a crash restart cut the connection.
fn wait_until_published(pg: &mut postgres::Client, publication: &str) {
    let end: String = loop {
        match pg.query_one("SELECT pg_current_wal_lsn()::text", &[]) {
            Ok(row) => break row.get(0),
            Err(_) => *pg = pg_kafka_bridge_e2e::pg(),
        }
    };
    let done = format!(
        "SELECT count(*) FROM kafka.publication_status WHERE publication = '{publication}' AND confirmed_lsn >= '{end}'"
    );
    wait_for("the publication to catch up", Duration::from_secs(120), || {
        let caught_up = count(pg, &done) == 1;
        if !caught_up && pg.is_closed() {
            *pg = pg_kafka_bridge_e2e::pg();
        }
        caught_up
    });
}

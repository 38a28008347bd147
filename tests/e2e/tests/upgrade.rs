//! Upgrade from release 0.1.0: run by `scripts/upgrade-test.sh`, which runs the first test
//! with release 0.1.0 installed on a fresh cluster and broker, then installs the current
//! build, restarts the cluster and runs the second. Names are fixed: the second test picks
//! up what the first left.

use pg_kafka_bridge_e2e::*;
use postgres::{Client, NoTls};
use serde_json::json;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(90);
const SOURCE_TOPIC: &str = "upgrade_in";
const OUT_TOPIC: &str = "upgrade_out";
/// Messages (and published rows) per phase.
const MESSAGES: i32 = 1000;
const ROWS: i32 = 500;

fn extension_version(pg: &mut Client) -> String {
    pg.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pg_kafka_bridge'", &[]).unwrap().get(0)
}

fn produce_messages(ids: std::ops::Range<i32>) {
    let producer = producer();
    for id in ids {
        producer.send_json(SOURCE_TOPIC, Some(id % 2), &id.to_string(), &json!({"id": id, "note": format!("m{id}")}));
    }
    producer.flush();
}

fn insert_rows(pg: &mut Client, ids: std::ops::Range<i32>) {
    for chunk in ids.collect::<Vec<_>>().chunks(100) {
        let values = chunk.iter().map(|id| format!("({id}, 'r{id}')")).collect::<Vec<_>>().join(", ");
        pg.batch_execute(&format!("INSERT INTO upgrade_out VALUES {values}")).unwrap();
    }
}

#[test]
fn data_moves_with_the_previous_release() {
    let mut pg = pg();
    assert_eq!(extension_version(&mut pg), "0.1.0", "the previous release must be installed");
    create_topic(SOURCE_TOPIC, 2);
    create_topic(OUT_TOPIC, 1);
    pg.batch_execute(
        "CREATE TABLE upgrade_in (id int, note text);
         CREATE TABLE upgrade_out (id int PRIMARY KEY, note text);",
    )
    .unwrap();
    create_subscription(&mut pg, "upgrade_sub", SOURCE_TOPIC, "upgrade_in", "");
    produce_messages(0..MESSAGES);
    let producer = producer();
    producer.send(SOURCE_TOPIC, Some(0), None, Some(br#"{"id": "not a number"}"#));
    producer.flush();
    wait_for_count("SELECT count(*) FROM upgrade_in", i64::from(MESSAGES), TIMEOUT);
    wait_for_count("SELECT count(*) FROM kafka.dead_letters WHERE subscription = 'upgrade_sub'", 1, TIMEOUT);

    create_publication(&mut pg, "upgrade_pub", &["upgrade_out"], &format!(", topic => '{OUT_TOPIC}'"));
    insert_rows(&mut pg, 0..ROWS);
    assert_eq!(published_ids(OUT_TOPIC, ROWS as usize, TIMEOUT).len(), ROWS as usize);
    // The cluster is stopped next, whether or not the slot has confirmed all of it yet: the
    // progress record in Kafka is what the next release must go by.
}

#[test]
fn update_keeps_positions_and_matches_a_fresh_install() {
    let mut pg = pg();
    assert_eq!(extension_version(&mut pg), "0.1.0", "the update must not have run yet");

    // New data while the SQL objects are still those of 0.1.0: no worker may run on them.
    produce_messages(MESSAGES..2 * MESSAGES);
    insert_rows(&mut pg, ROWS..2 * ROWS);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count(&mut pg, "SELECT count(*) FROM upgrade_in"), i64::from(MESSAGES));
    assert_eq!(
        count(
            &mut pg,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type IN \
             ('pg_kafka_bridge subscription', 'pg_kafka_bridge publication')"
        ),
        0,
        "workers run before the update"
    );

    pg.batch_execute("ALTER EXTENSION pg_kafka_bridge UPDATE").unwrap();
    let current: String = pg
        .query_one("SELECT default_version FROM pg_available_extensions WHERE name = 'pg_kafka_bridge'", &[])
        .unwrap()
        .get(0);
    assert_ne!(current, "0.1.0");
    assert_eq!(extension_version(&mut pg), current);

    // Both continue from their positions: every message and row exactly once.
    wait_for_count("SELECT count(*) FROM upgrade_in", i64::from(2 * MESSAGES), TIMEOUT);
    std::thread::sleep(Duration::from_secs(2));
    let (rows, distinct, lowest, highest): (i64, i64, i32, i32) = {
        let row = pg.query_one("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM upgrade_in", &[]).unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    };
    assert_eq!(
        (rows, distinct, lowest, highest),
        (i64::from(2 * MESSAGES), i64::from(2 * MESSAGES), 0, 2 * MESSAGES - 1)
    );
    let ids = published_ids(OUT_TOPIC, 2 * ROWS as usize, TIMEOUT);
    let events = read_events_with_kcat(OUT_TOPIC, 2 * ROWS as usize, TIMEOUT);
    assert!(events.iter().all(|e| e.op() == "c"), "only inserts were made");
    assert_eq!(ids.len(), 2 * ROWS as usize, "published ids: {} of {}", ids.len(), 2 * ROWS);
    assert!(ids.values().all(|&n| n == 1), "ids published more than once: {:?}", ids.iter().filter(|e| *e.1 > 1));
    assert_eq!(slot_of(&mut pg, "upgrade_pub"), "pg_kafka_bridge_upgrade_pub", "the publication keeps its slot");

    // Offsets and dead letters now belong to the subscription by id.
    let subscription_id: i32 =
        pg.query_one("SELECT id FROM kafka.subscription_catalog WHERE name = 'upgrade_sub'", &[]).unwrap().get(0);
    assert_eq!(
        count(&mut pg, &format!("SELECT count(*) FROM kafka.offsets WHERE subscription_id = {subscription_id}")),
        2
    );
    assert_eq!(
        count(&mut pg, &format!("SELECT count(*) FROM kafka.dead_letters WHERE subscription_id = {subscription_id}")),
        1
    );
    let state: String = pg
        .query_one("SELECT state FROM kafka.publication_status WHERE publication = 'upgrade_pub'", &[])
        .unwrap()
        .get(0);
    assert_eq!(state, "running", "{}", publication_status(&mut pg, "upgrade_pub"));

    // The updated objects are those of a fresh install, in another database.
    pg.batch_execute("DROP DATABASE IF EXISTS upgrade_fresh").unwrap();
    pg.batch_execute("CREATE DATABASE upgrade_fresh").unwrap();
    let mut fresh = Client::connect(&format!("{} dbname=upgrade_fresh", connection_string()), NoTls).unwrap();
    fresh.batch_execute("CREATE EXTENSION pg_kafka_bridge").unwrap();
    let (updated, installed) = (schema_of(&mut pg), schema_of(&mut fresh));
    let only = |a: &[String], b: &[String]| a.iter().filter(|x| !b.contains(x)).cloned().collect::<Vec<_>>();
    assert!(
        updated == installed,
        "the updated schema differs from a fresh install:\nonly updated:\n{}\nonly fresh:\n{}",
        only(&updated, &installed).join("\n"),
        only(&installed, &updated).join("\n")
    );
    drop(fresh);
    pg.batch_execute("DROP DATABASE upgrade_fresh").unwrap();

    // DROP EXTENSION finds the slot named the 0.1.0 way and drops it after its commit.
    pg.batch_execute("DROP EXTENSION pg_kafka_bridge CASCADE").unwrap();
    wait_for("the 0.1.0 slot to be dropped with the extension", TIMEOUT, || {
        count(&mut pg, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pg_kafka_bridge_upgrade_pub'") == 0
    });
}

/// Every object of schema kafka and the extension's membership, described independently of
/// column order and object identifiers, sorted.
fn schema_of(pg: &mut Client) -> Vec<String> {
    pg.query(
        "SELECT d FROM (
           SELECT pg_catalog.format('column %s.%s %s not null %s default %s acl %s', c.relname, a.attname,
                                    pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
                                    pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), a.attacl)
             FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
            WHERE c.relnamespace = 'kafka'::regnamespace
           UNION ALL
           SELECT pg_catalog.format('relation %s kind %s acl %s row security %s', relname, relkind, relacl, relrowsecurity)
             FROM pg_catalog.pg_class WHERE relnamespace = 'kafka'::regnamespace
           UNION ALL
           SELECT pg_catalog.format('constraint %s %s %s', conrelid::regclass, conname, pg_catalog.pg_get_constraintdef(oid))
             FROM pg_catalog.pg_constraint WHERE connamespace = 'kafka'::regnamespace
           UNION ALL
           SELECT pg_catalog.pg_get_indexdef(i.indexrelid)
             FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
            WHERE c.relnamespace = 'kafka'::regnamespace
           UNION ALL
           SELECT pg_catalog.format('policy %s %s %s %s %s', tablename, policyname, cmd, qual, with_check)
             FROM pg_catalog.pg_policies WHERE schemaname = 'kafka'
           UNION ALL
           SELECT pg_catalog.format('view %s %s', c.relname, pg_catalog.pg_get_viewdef(c.oid))
             FROM pg_catalog.pg_class c WHERE c.relnamespace = 'kafka'::regnamespace AND c.relkind = 'v'
           UNION ALL
           SELECT pg_catalog.format('function %s acl %s %s', p.oid::regprocedure, p.proacl, pg_catalog.pg_get_functiondef(p.oid))
             FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'kafka'::regnamespace
           UNION ALL
           SELECT pg_catalog.format('member %s', pg_catalog.pg_describe_object(classid, objid, objsubid))
             FROM pg_catalog.pg_depend
            WHERE refclassid = 'pg_catalog.pg_extension'::regclass AND deptype = 'e'
              AND refobjid = (SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'pg_kafka_bridge')
         ) objects(d) ORDER BY d",
        &[],
    )
    .unwrap()
    .iter()
    .map(|row| row.get(0))
    .collect()
}

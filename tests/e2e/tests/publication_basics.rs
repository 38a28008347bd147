//! Publications end to end: table changes and kafka.send() messages published by the worker
//! and read back from the broker with a read_committed consumer.

use pg_kafka_bridge_e2e::*;
use serde_json::json;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn publishes_inserts_updates_and_deletes_of_several_tables_in_commit_order() {
    let mut pg = pg();
    let (items, stock, name, prefix) = (unique("items"), unique("stock"), unique("pub"), unique("cdc"));
    pg.batch_execute(&format!(
        "CREATE TABLE {items} (id int PRIMARY KEY, name text, price numeric(8,2), doc jsonb, at timestamptz);
         CREATE TABLE {stock} (sku text PRIMARY KEY, n bigint);"
    ))
    .unwrap();
    create_publication(&mut pg, &name, &[&items, &stock], &format!(", topic => '{prefix}.{{table}}'"));
    pg.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {items} VALUES (1, 'pen', 1.5, '{{\"colour\": \"blue\"}}', '2026-11-27 10:00:00+01'),
                                    (2, 'ink', 2, NULL, NULL);
         INSERT INTO {stock} VALUES ('pen', 10);
         COMMIT;
         UPDATE {items} SET name = 'fountain pen' WHERE id = 1;
         UPDATE {stock} SET sku = 'pen-1' WHERE sku = 'pen';
         DELETE FROM {items} WHERE id = 2;"
    ))
    .unwrap();

    let events = consume_events(&format!("{prefix}.{items}"), 4, TIMEOUT);
    let summary: Vec<_> = events.iter().map(|e| (e.op().to_string(), e.key.clone().unwrap())).collect();
    assert_eq!(
        summary,
        vec![
            ("c".into(), json!({"id": 1})),
            ("c".into(), json!({"id": 2})),
            ("u".into(), json!({"id": 1})),
            ("d".into(), json!({"id": 2}))
        ],
        "{}",
        publication_status(&mut pg, &name)
    );
    assert_eq!(
        events[0].after(),
        &json!({"id": 1, "name": "pen", "price": 1.50, "doc": {"colour": "blue"}, "at": "2026-11-27T09:00:00.000000Z"})
    );
    assert_eq!(events[2].after()["name"], "fountain pen");
    assert_eq!(events[3].value.as_ref().unwrap()["before"], json!({"id": 2}));
    let source = &events[0].value.as_ref().unwrap()["source"];
    assert_eq!((source["schema"].as_str(), source["table"].as_str()), (Some("public"), Some(items.as_str())));
    // Positions grow in commit order; the first transaction's events share its commit LSN.
    let positions: Vec<_> = events.iter().map(Event::position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "positions out of order: {positions:?}");
    assert_eq!((positions[0].0, positions[0].1, positions[1].1), (positions[1].0, 0, 1));

    let events = consume_events(&format!("{prefix}.{stock}"), 2, TIMEOUT);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].position(), (positions[0].0, 2), "third change of the first transaction");
    let update = events[1].value.as_ref().unwrap();
    assert_eq!((update["op"].as_str(), &update["before"]), (Some("u"), &json!({"sku": "pen"})));
    assert_eq!(
        (&update["after"], events[1].key.as_ref().unwrap()),
        (&json!({"sku": "pen-1", "n": 10}), &json!({"sku": "pen-1"}))
    );

    drop_publication(&mut pg, &name);
}

#[test]
fn send_publishes_if_and_only_if_the_transaction_commits() {
    let mut pg = pg();
    let (table, name, topic) = (unique("orders"), unique("pub"), unique("notes"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)")).unwrap();
    create_publication(&mut pg, &name, &[&table], "");
    // One statement list per call: a list runs as one implicit transaction.
    pg.batch_execute(&format!("BEGIN; SELECT kafka.send('{name}', '{topic}', 'k1', 'rolled back'); ROLLBACK;"))
        .unwrap();
    pg.batch_execute(&format!(
        "BEGIN; INSERT INTO {table} VALUES (1); SELECT kafka.send('{name}', '{topic}', 'k2', '{{\"n\": 2}}'); COMMIT;"
    ))
    .unwrap();
    pg.batch_execute(&format!("SELECT kafka.send('{name}', '{topic}', NULL, '\\x00ff'::bytea)")).unwrap();
    pg.batch_execute(&format!("BEGIN; SELECT kafka.send('{name}', '{topic}', 'k3', 'failed'); SELECT 1/0;"))
        .unwrap_err();
    pg.batch_execute("ROLLBACK").unwrap();
    pg.batch_execute(&format!("SELECT kafka.send('{name}', '{topic}', 'k4', 'last')")).unwrap();

    let messages = consume_all(&topic, 3, TIMEOUT);
    let seen: Vec<_> = messages.iter().map(|m| (m.2.clone(), m.3.clone())).collect();
    assert_eq!(
        seen,
        vec![
            (Some(b"k2".to_vec()), Some(b"{\"n\": 2}".to_vec())),
            (None, Some(vec![0u8, 255])),
            (Some(b"k4".to_vec()), Some(b"last".to_vec())),
        ],
        "{}",
        publication_status(&mut pg, &name)
    );
    drop_publication(&mut pg, &name);
}

#[test]
fn changes_made_while_stopped_are_published_after_start() {
    let mut pg = pg();
    let (table, name, prefix) = (unique("t"), unique("pub"), unique("p"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)")).unwrap();
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    let topic = format!("{prefix}.{table}");
    pg.batch_execute(&format!("INSERT INTO {table} VALUES (1)")).unwrap();
    wait_for("the first event", TIMEOUT, || consume_events(&topic, 1, Duration::from_secs(5)).len() == 1);

    stop_publication(&mut pg, &name);
    pg.batch_execute(&format!("INSERT INTO {table} SELECT generate_series(2, 1000)")).unwrap();
    let state: String =
        pg.query_one("SELECT state FROM kafka.publication_status WHERE publication = $1", &[&name]).unwrap().get(0);
    assert_eq!(state, "stopped");
    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    let events = consume_events(&topic, 1000, TIMEOUT);
    let ids: Vec<i64> = events.iter().map(|e| e.after()["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=1000).collect::<Vec<_>>(), "{}", publication_status(&mut pg, &name));
    drop_publication(&mut pg, &name);
}

#[test]
fn an_unreachable_broker_and_a_missing_slot_show_in_the_status_and_nothing_is_lost() {
    let mut pg = pg();
    let (table, name) = (unique("t"), unique("pub"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)")).unwrap();
    pg.batch_execute(&format!(
        "SELECT kafka.create_publication('{name}', '127.0.0.1:9', ARRAY['{table}']::regclass[], \
         options => '{{\"socket.connection.setup.timeout.ms\": \"1000\"}}')"
    ))
    .unwrap();
    wait_for("the broker error in the status", TIMEOUT, || {
        publication_error(&mut pg, &name).is_some_and(|e| e.contains("Kafka"))
    });
    // Changes made while the broker cannot be reached stay in the slot: once the publication
    // reaches a broker, they are published.
    pg.batch_execute(&format!("INSERT INTO {table} VALUES (1), (2), (3)")).unwrap();
    stop_publication(&mut pg, &name);
    pg.batch_execute(&format!("UPDATE kafka.publication_catalog SET brokers = '{}' WHERE name = '{name}'", brokers()))
        .unwrap();
    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    let events = consume_events(&format!("public.{table}"), 3, TIMEOUT);
    let ids: Vec<_> = events.iter().map(|e| e.after()["id"].clone()).collect();
    assert_eq!(ids, vec![json!(1), json!(2), json!(3)], "{}", publication_status(&mut pg, &name));

    stop_publication(&mut pg, &name);
    let slot = slot_of(&mut pg, &name);
    pg.batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')")).unwrap();
    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    wait_for("the missing slot in the status", TIMEOUT, || {
        publication_error(&mut pg, &name).is_some_and(|e| e.contains("does not exist"))
    });
    let state: String =
        pg.query_one("SELECT state FROM kafka.publication_status WHERE publication = $1", &[&name]).unwrap().get(0);
    assert_eq!(state, "error");
    drop_publication(&mut pg, &name);
}

#[test]
fn an_idle_publication_does_not_hold_back_wal() {
    let mut pg = pg();
    let (quiet, busy, name) = (unique("quiet"), unique("busy"), unique("pub"));
    pg.batch_execute(&format!("CREATE TABLE {quiet} (id int PRIMARY KEY); CREATE TABLE {busy} (id int, pad text)"))
        .unwrap();
    create_publication(&mut pg, &name, &[&quiet], "");
    wait_for("the worker to run", TIMEOUT, || publication_status(&mut pg, &name).contains("running"));
    // About 100 MB of WAL from a table the publication does not publish.
    let before: String = pg.query_one("SELECT pg_current_wal_lsn()::text", &[]).unwrap().get(0);
    for _ in 0..10 {
        pg.batch_execute(&format!("INSERT INTO {busy} SELECT i, repeat('x', 200) FROM generate_series(1, 40000) i"))
            .unwrap();
    }
    let written: i64 = pg
        .query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint", &[&before])
        .unwrap()
        .get(0);
    assert!(written > 50_000_000, "the busy table wrote only {written} bytes of WAL");
    wait_for("the slot to let the WAL go", Duration::from_secs(90), || {
        let retained: Option<i64> = pg
            .query_one("SELECT retained_wal_bytes FROM kafka.publication_status WHERE publication = $1", &[&name])
            .unwrap()
            .get(0);
        retained.is_some_and(|r| r < 16 * 1024 * 1024)
    });
    drop_publication(&mut pg, &name);
}

#[test]
fn an_invalidated_slot_shows_in_the_status() {
    let mut pg = pg();
    let (table, busy, name) = (unique("t"), unique("busy"), unique("pub"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY); CREATE TABLE {busy} (pad text)")).unwrap();
    create_publication(&mut pg, &name, &[&table], "");
    stop_publication(&mut pg, &name);
    // A stopped slot may keep at most 1 MB of WAL: write more, and let a checkpoint invalidate it.
    pg.batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'").unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").unwrap();
    pg.batch_execute(&format!("INSERT INTO {busy} SELECT repeat('x', 1000) FROM generate_series(1, 100000)")).unwrap();
    pg.batch_execute("SELECT pg_switch_wal()").unwrap();
    pg.batch_execute("CHECKPOINT").unwrap();
    pg.batch_execute("ALTER SYSTEM RESET max_slot_wal_keep_size").unwrap();
    pg.batch_execute("SELECT pg_reload_conf()").unwrap();
    let slot = slot_of(&mut pg, &name);
    let wal_status: Option<String> =
        pg.query_one("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).unwrap().get(0);
    assert_eq!(wal_status.as_deref(), Some("lost"));
    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    wait_for("the invalidated slot in the status", TIMEOUT, || {
        publication_error(&mut pg, &name).is_some_and(|e| e.contains("the WAL it needed was removed"))
    });
    let reason: Option<String> = pg
        .query_one("SELECT slot_invalidation_reason FROM kafka.publication_status WHERE publication = $1", &[&name])
        .unwrap()
        .get(0);
    assert_eq!(reason.as_deref(), Some("wal_removed"));
    drop_publication(&mut pg, &name);
}

/// The slot facts of the status view and the failover setting, as the server version has
/// them: failover slots and `inactive_since` from PostgreSQL 17, invalidation for idleness
/// (`idle_replication_slot_timeout`) from 18.
#[test]
fn slot_details_follow_the_server_version() {
    let mut pg = pg();
    let version: i32 = pg.query_one("SELECT current_setting('server_version_num')::int", &[]).unwrap().get(0);
    let (table, name) = (unique("t"), unique("pub"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)")).unwrap();
    pg.batch_execute("SET pg_kafka_bridge.failover_slots = on").unwrap();
    let created = pg.batch_execute(&format!(
        "SELECT kafka.create_publication(name => '{name}', brokers => '{}', tables => ARRAY['{table}']::regclass[])",
        brokers()
    ));
    pg.batch_execute("RESET pg_kafka_bridge.failover_slots").unwrap();
    if version < 170000 {
        let error = created.expect_err("failover slots before PostgreSQL 17");
        let error = error.as_db_error().unwrap();
        assert_eq!(error.code().code(), "0A000");
        assert!(error.message().contains("needs PostgreSQL 17"), "{}", error.message());
        create_publication(&mut pg, &name, &[&table], "");
    } else {
        created.unwrap();
    }
    let slot = slot_of(&mut pg, &name);
    let details = |pg: &mut postgres::Client| -> (Option<bool>, bool, Option<String>, bool) {
        let row = pg
            .query_one(
                "SELECT slot_failover, slot_inactive_since IS NOT NULL, slot_invalidation_reason,                         slot_expires_at IS NOT NULL                    FROM kafka.publication_status WHERE publication = $1",
                &[&name],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    };
    if version < 170000 {
        assert_eq!(details(&mut pg), (None, false, None, false));
    } else {
        let failover: bool =
            pg.query_one("SELECT failover FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).unwrap().get(0);
        assert!(failover, "the slot must be a failover slot");
        wait_for("the worker to hold its slot", TIMEOUT, || details(&mut pg) == (Some(true), false, None, false));
        stop_publication(&mut pg, &name);
        assert_eq!(details(&mut pg), (Some(true), true, None, false), "stopped: inactive, no timeout set");
    }
    if version >= 180000 {
        // An inactive slot is invalidated at the first checkpoint after the timeout.
        pg.batch_execute("ALTER SYSTEM SET idle_replication_slot_timeout = '1s'").unwrap();
        pg.batch_execute("SELECT pg_reload_conf()").unwrap();
        wait_for("the expiry in the status", TIMEOUT, || details(&mut pg).3);
        std::thread::sleep(Duration::from_secs(2));
        pg.batch_execute("CHECKPOINT").unwrap();
        pg.batch_execute("ALTER SYSTEM RESET idle_replication_slot_timeout").unwrap();
        pg.batch_execute("SELECT pg_reload_conf()").unwrap();
        assert_eq!(details(&mut pg).2.as_deref(), Some("idle_timeout"));
        let error = publication_error(&mut pg, &name).unwrap_or_default();
        assert!(error.contains("idle_replication_slot_timeout"), "{error}");
    }
    drop_publication(&mut pg, &name);
}

#[test]
fn truncate_is_published_to_every_partition_and_applied_by_change_subscriptions() {
    let mut pg = pg();
    let (items, target, name, sub, prefix) =
        (unique("trunc"), unique("trunct"), unique("pub"), unique("sub"), unique("trunc"));
    pg.batch_execute(&format!(
        "CREATE TABLE {items} (id int PRIMARY KEY, name text);
         CREATE TABLE {target} (id int PRIMARY KEY, name text);"
    ))
    .unwrap();
    let topic = format!("{prefix}.{items}");
    create_topic(&topic, 3);
    create_publication(&mut pg, &name, &[&items], &format!(", topic => '{prefix}.{{table}}', snapshot => 'none'"));
    pg.batch_execute(&format!(
        "INSERT INTO {items} SELECT g, 'before' FROM generate_series(1, 30) g;
         TRUNCATE {items};
         INSERT INTO {items} SELECT g, 'after' FROM generate_series(100, 104) g;"
    ))
    .unwrap();
    let messages = consume_all(&topic, 38, TIMEOUT);
    let truncates: Vec<_> = messages
        .iter()
        .filter(|m| m.3.as_ref().is_some_and(|v| serde_json::from_slice::<serde_json::Value>(v).unwrap()["op"] == "t"))
        .collect();
    let partitions: std::collections::BTreeSet<i32> = truncates.iter().map(|m| m.0).collect();
    assert_eq!(partitions.len(), 3, "one TRUNCATE event in each partition: {truncates:?}");
    assert!(truncates.iter().all(|m| m.2.is_none()), "TRUNCATE events have no key");
    let value: serde_json::Value = serde_json::from_slice(truncates[0].3.as_ref().unwrap()).unwrap();
    assert_eq!(value["before"], serde_json::Value::Null);
    assert_eq!(value["after"], serde_json::Value::Null);
    assert_eq!(value["source"]["table"], items.as_str());
    // In each partition, the TRUNCATE comes after that partition's earlier rows.
    for partition in 0..3 {
        let ops: Vec<String> = messages
            .iter()
            .filter(|m| m.0 == partition)
            .map(|m| serde_json::from_slice::<serde_json::Value>(m.3.as_ref().unwrap()).unwrap())
            .map(|v| format!("{}:{}", v["op"].as_str().unwrap(), v["after"]["name"].as_str().unwrap_or("")))
            .collect();
        let t = ops.iter().position(|o| o == "t:").expect("a TRUNCATE");
        assert!(ops[..t].iter().all(|o| o == "c:before") && ops[t + 1..].iter().all(|o| o == "c:after"), "{ops:?}");
    }

    // A change subscription of a single-partition copy applies it: only the rows after it stay.
    let copy = unique("truncc");
    let copy_name = format!("{copy}.{items}");
    let name2 = unique("pub");
    pg.batch_execute(&format!("TRUNCATE {items}; INSERT INTO {target} VALUES (-1, 'stale')")).unwrap();
    create_topic(&copy_name, 1);
    pg.batch_execute(&format!("INSERT INTO {items} SELECT g, 'one' FROM generate_series(1, 10) g")).unwrap();
    create_publication(&mut pg, &name2, &[&items], &format!(", topic => '{copy}.{{table}}'"));
    pg.batch_execute(&format!(
        "TRUNCATE {items};
         INSERT INTO {items} SELECT g, 'two' FROM generate_series(20, 22) g;"
    ))
    .unwrap();
    create_subscription(&mut pg, &sub, &copy_name, &target, ", format => 'change', mode => 'upsert'");
    wait_for_count(&format!("SELECT count(*) FROM {target} WHERE name = 'two'"), 3, TIMEOUT);
    wait_for_count(&format!("SELECT count(*) FROM {target}"), 3, TIMEOUT);
    drop_subscription(&mut pg, &sub);
    drop_publication(&mut pg, &name);
    drop_publication(&mut pg, &name2);
}

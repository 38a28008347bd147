//! Kafka to PostgreSQL: messages that cannot become rows go to the dead-letter table with the
//! reason, in the batch's transaction; problems that are not a message's fault (missing
//! table, revoked privilege) hold the offsets, show in the status view, and heal by themselves.

use pg_kafka_bridge_e2e::*;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn every_kind_of_bad_message_is_a_dead_letter_and_nothing_stalls() {
    let mut pg = pg();
    let (topic, table, sub) =
        topic_and_table(&mut pg, "bad", 1, "id bigint PRIMARY KEY, qty int CHECK (qty >= 0), name text NOT NULL");
    create_subscription(&mut pg, &sub, &topic, &table, "");
    let p = producer();
    let good = |id: i64| json!({"id": id, "qty": 1, "name": "ok"}).to_string().into_bytes();
    let cases: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("invalid JSON", Some(b"{not json".to_vec())),
        ("JSON object", Some(b"[1, 2, 3]".to_vec())),
        ("invalid input syntax for type integer", Some(br#"{"id": 101, "qty": "many", "name": "x"}"#.to_vec())),
        ("NUL", Some(br#"{"id": 102, "qty": 1, "name": "a\u0000b"}"#.to_vec())),
        ("violates check constraint", Some(br#"{"id": 103, "qty": -5, "name": "x"}"#.to_vec())),
        ("violates not-null constraint", Some(br#"{"id": 104, "qty": 1}"#.to_vec())),
        ("duplicate key value", Some(good(1))),
        ("tombstone", None),
        ("out of range for type integer", Some(br#"{"id": 105, "qty": 99999999999, "name": "x"}"#.to_vec())),
    ];
    p.send(&topic, None, Some(b"k"), Some(&good(1)));
    for (i, (_, payload)) in cases.iter().enumerate() {
        p.send(&topic, None, Some(b"k"), payload.as_deref());
        p.send(&topic, None, None, Some(&good(1000 + i as i64)));
    }
    p.flush();
    let total = 1 + 2 * cases.len() as i64;
    wait_for_count(&format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'"), total, WAIT);
    let letters: Vec<(i64, Option<Vec<u8>>, String)> = pg
        .query(
            &format!(
                "SELECT \"offset\", payload, error FROM kafka.dead_letters WHERE subscription = '{sub}' ORDER BY 1"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(letters.len(), cases.len(), "{letters:?}");
    for ((expected, payload), (offset, stored, error)) in cases.iter().zip(&letters) {
        assert!(error.contains(expected), "offset {offset}: expected an error about {expected}, got {error}");
        assert_eq!(stored, payload, "the dead letter keeps the raw message at offset {offset}");
        assert_eq!(offset % 2, 1, "bad messages are at odd offsets");
    }
    // The good messages between the bad ones all landed.
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), 1 + cases.len() as i64);
    drop_subscription(&mut pg, &sub);
}

/// Errors of PostgreSQL's class 54 (program limits) are the message's fault too: a value
/// nested deeper than the server's stack allows, a value too large for a btree index on its
/// column (an upsert key included). Each is a dead letter; the rows around it land.
#[test]
fn values_beyond_the_servers_limits_are_dead_letters_in_insert_and_upsert_mode() {
    // Incompressible text of `n` characters: too large for a btree index entry (about 2.7 kB).
    let noise = |n: usize| {
        let mut rng = Rng::new();
        (0..n).map(|_| char::from(b'a' + rng.below(26) as u8)).collect::<String>()
    };
    let deep = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    for mode in ["insert", "upsert"] {
        let mut pg = pg();
        let (topic, table, sub) = topic_and_table(&mut pg, "limits", 1, "id text PRIMARY KEY, doc jsonb, tag text");
        pg.batch_execute(&format!("CREATE INDEX ON {table} (tag)")).unwrap();
        let extra = if mode == "upsert" { ", mode => 'upsert', key_columns => ARRAY['id']" } else { "" };
        create_subscription(&mut pg, &sub, &topic, &table, extra);
        let cases: Vec<(&str, String)> = vec![
            ("stack depth", format!(r#"{{"id": "deep", "doc": {}}}"#, deep(100_000))),
            ("index row size", json!({"id": "wide", "tag": noise(3_000)}).to_string()),
            ("index row size", json!({"id": noise(3_000), "tag": "wide key"}).to_string()),
        ];
        let p = producer();
        let good = |i: usize| json!({"id": format!("good-{i}"), "doc": {"n": i}, "tag": "ok"}).to_string();
        p.send(&topic, None, Some(b"k"), Some(good(0).as_bytes()));
        for (i, (_, payload)) in cases.iter().enumerate() {
            p.send(&topic, None, Some(b"k"), Some(payload.as_bytes()));
            p.send(&topic, None, Some(b"k"), Some(good(i + 1).as_bytes()));
        }
        p.flush();
        let total = 1 + 2 * cases.len() as i64;
        wait_for_count(&format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'"), total, WAIT);
        let errors: Vec<String> = pg
            .query(
                &format!("SELECT error FROM kafka.dead_letters WHERE subscription = '{sub}' ORDER BY \"offset\""),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(errors.len(), cases.len(), "{mode}: {errors:?}");
        for ((expected, _), error) in cases.iter().zip(&errors) {
            // JSON nested beyond the parser's limit may be refused before PostgreSQL sees it.
            let matches = error.contains(expected) || (*expected == "stack depth" && error.contains("recursion limit"));
            assert!(matches, "{mode}: expected an error about {expected}, got {error}");
        }
        assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), 1 + cases.len() as i64, "{mode}");
        assert!(!status(&mut pg, &sub).contains("| error |"), "{mode}: {}", status(&mut pg, &sub));
        drop_subscription(&mut pg, &sub);
    }
}

#[test]
fn a_missing_table_holds_the_offsets_and_heals() {
    let mut pg = pg();
    let (topic, table, sub) = topic_and_table(&mut pg, "gone", 1, "id bigint");
    create_subscription(&mut pg, &sub, &topic, &table, "");
    let p = producer();
    p.send_json(&topic, None, "1", &json!({"id": 1}));
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 1, WAIT);
    pg.batch_execute(&format!("DROP TABLE {table}")).unwrap();
    for i in 2..=5 {
        p.send_json(&topic, None, &i.to_string(), &json!({"id": i}));
    }
    p.flush();
    wait_for("the status view to show the missing table", WAIT, || {
        last_error(&mut pg, &sub).is_some_and(|e| e.contains("does not exist"))
    });
    assert_eq!(count(&mut pg, &format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'")), 1);
    pg.batch_execute(&format!("CREATE TABLE {table} (id bigint)")).unwrap();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 4, WAIT);
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM kafka.dead_letters WHERE subscription = '{sub}'")), 0);
    drop_subscription(&mut pg, &sub);
}

#[test]
fn rows_are_written_with_the_owners_privileges() {
    let mut pg = pg();
    let (topic, table, sub, role) = (unique("priv"), unique("priv"), unique("sub"), unique("owner"));
    create_topic(&topic, 1);
    // The table's default takes a number from a sequence the owner may not use: nothing the
    // extension checks itself, so only PostgreSQL's own check, made as the owner while
    // writing, can stop the row.
    pg.batch_execute(&format!(
        "CREATE SEQUENCE {table}_n; CREATE TABLE {table} (id bigint, n bigint DEFAULT nextval('{table}_n'));
         CREATE ROLE {role}; GRANT INSERT ON {table} TO {role};
         GRANT EXECUTE ON FUNCTION kafka.create_subscription, kafka.drop_subscription TO {role};
         SET ROLE {role};"
    ))
    .unwrap();
    create_subscription(&mut pg, &sub, &topic, &table, "");
    pg.batch_execute("RESET ROLE").unwrap();
    let owner: String =
        pg.query_one(&format!("SELECT owner::text FROM kafka.subscriptions WHERE name = '{sub}'"), &[]).unwrap().get(0);
    assert_eq!(owner, role);
    let p = producer();
    p.send_json(&topic, None, "1", &json!({"id": 1}));
    p.flush();
    wait_for("the status view to show the owner's missing privilege", WAIT, || {
        last_error(&mut pg, &sub).is_some_and(|e| e.contains("permission denied for sequence"))
    });
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), 0);
    assert_eq!(count(&mut pg, &format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'")), 0);
    pg.batch_execute(&format!("GRANT USAGE ON SEQUENCE {table}_n TO {role}")).unwrap();
    wait_for_count(&format!("SELECT count(*) FROM {table} WHERE n IS NOT NULL"), 1, WAIT);
    // A revoked table privilege holds the offsets too, and heals once granted again.
    pg.batch_execute(&format!("REVOKE INSERT ON {table} FROM {role}")).unwrap();
    p.send_json(&topic, None, "2", &json!({"id": 2}));
    p.flush();
    wait_for("the status view to show the revoked privilege", WAIT, || {
        last_error(&mut pg, &sub).is_some_and(|e| e.contains("may not insert"))
    });
    assert_eq!(count(&mut pg, &format!("SELECT next_offset FROM kafka.offsets WHERE subscription = '{sub}'")), 1);
    pg.batch_execute(&format!("GRANT INSERT ON {table} TO {role}")).unwrap();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 2, WAIT);
    drop_subscription(&mut pg, &sub);
}

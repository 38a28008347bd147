//! Attacks by a role that a DBA allowed to manage Kafka objects (EXECUTE on every kafka
//! function, CREATE on schema public) but that is not a superuser. Each test runs the attack
//! and asserts that the role gained nothing: it is still not a superuser, its code ran only
//! as itself, it published no row it may not read, and it cannot reach other owners' slots,
//! dead letters or errors. The synchronous checks (options, row-level security at creation,
//! rolled-back drops) are also in pg_test/sql/publication_api.sql.

use pg_kafka_bridge_e2e::*;
use postgres::Client;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// A role with the rights of a delegated Kafka administrator, and a log table that its
/// "malicious" code writes to: what ran, as whom, and whether that role was a superuser.
struct Attacker {
    role: String,
    log: String,
    evil: String,
}

impl Attacker {
    fn new(pg: &mut Client) -> Attacker {
        let role = unique("attacker");
        let (log, evil) = (format!("public.{}", unique("evil_log")), format!("public.{}", unique("evil")));
        pg.batch_execute(&format!(
            "CREATE ROLE {role};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA kafka TO {role};
             GRANT CREATE ON SCHEMA public TO {role};
             SET ROLE {role};
             CREATE TABLE {log} (what text, who text, was_superuser boolean);
             -- Logs who runs it, then tries to make the attacker a superuser.
             CREATE FUNCTION {evil}(what text) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO {log} SELECT what, current_user, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user;
               BEGIN
                 EXECUTE 'ALTER ROLE {role} SUPERUSER';
               EXCEPTION WHEN insufficient_privilege THEN NULL;
               END;
               RETURN true;
             END $$;
             RESET ROLE;"
        ))
        .unwrap();
        Attacker { role, log, evil }
    }

    /// Runs `sql` as the attacker.
    fn run(&self, pg: &mut Client, sql: &str) -> Result<(), postgres::Error> {
        let result = pg.batch_execute(&format!("SET ROLE {}; {sql}", self.role));
        pg.batch_execute("RESET ROLE").unwrap();
        result
    }

    fn is_superuser(&self, pg: &mut Client) -> bool {
        pg.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&self.role]).unwrap().get(0)
    }

    /// `(what, who, was_superuser)` of every run of the attacker's code.
    fn runs(&self, pg: &mut Client) -> Vec<(String, String, bool)> {
        pg.query(&format!("SELECT what, who, was_superuser FROM {} ORDER BY 1, 2", self.log), &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// Asserts that the attacker's code ran for each of `expected` and never as anyone else.
    fn assert_ran_only_as_itself(&self, pg: &mut Client, expected: &[&str]) {
        let runs = self.runs(pg);
        for what in expected {
            assert!(runs.iter().any(|(w, _, _)| w == what), "the attacker's {what} never ran: {runs:?}");
        }
        assert!(
            runs.iter().all(|(_, who, was_superuser)| *who == self.role && !was_superuser),
            "the attacker's code ran as another role: {runs:?}"
        );
        assert!(!self.is_superuser(pg), "{} became a superuser", self.role);
    }
}

/// Domain checks, column defaults and triggers of the target table are the attacker's code;
/// they run as the attacker in insert and in upsert mode (upsert stages rows first). The
/// worker's catalog queries meanwhile meet the attacker's operator `public.=(oid, regtype)`
/// and function `public.array_position(smallint[], smallint)`, which win over the built-in
/// ones on the default search_path; they must never run.
#[test]
fn owner_code_runs_as_the_owner_and_catalog_queries_cannot_be_hijacked() {
    let mut pg = pg();
    let attacker = Attacker::new(&mut pg);
    let (evil, role) = (&attacker.evil, &attacker.role);
    let (domain, trigger) = (format!("public.{}", unique("dom")), format!("public.{}", unique("trg")));
    let hijack = unique("hijack");
    attacker
        .run(
            &mut pg,
            &format!(
                "CREATE DOMAIN {domain} AS text CHECK ({evil}('domain check'));
                 CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN PERFORM {evil}('trigger'); RETURN NEW; END $$;
                 CREATE FUNCTION public.{hijack}_eq(oid, regtype) RETURNS boolean LANGUAGE plpgsql AS $$
                 BEGIN PERFORM {evil}('operator'); RETURN $1 OPERATOR(pg_catalog.=) $2::oid; END $$;
                 CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regtype, FUNCTION = public.{hijack}_eq);
                 CREATE FUNCTION public.array_position(smallint[], smallint) RETURNS integer LANGUAGE plpgsql AS $$
                 BEGIN PERFORM {evil}('function'); RETURN pg_catalog.array_position($1, $2); END $$;"
            ),
        )
        .unwrap();
    for mode in ["insert", "upsert"] {
        let (topic, table, sub) = (unique("sec"), format!("public.{}", unique("sec")), unique("sub"));
        create_topic(&topic, 1);
        attacker
            .run(
                &mut pg,
                &format!(
                    "CREATE TABLE {table} (id bigint PRIMARY KEY, v {domain},
                                           d text DEFAULT (CASE WHEN {evil}('default') THEN 'd' END));
                     CREATE TRIGGER evil BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION {trigger}();
                     SELECT kafka.create_subscription(name => '{sub}', brokers => '{}', topic => '{topic}',
                                                      target => '{table}'::regclass, mode => '{mode}',
                                                      batch_timeout_ms => 20);",
                    brokers()
                ),
            )
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let p = producer();
        for id in 1..=3 {
            p.send_json(&topic, None, &id.to_string(), &json!({"id": id, "v": format!("value {id}")}));
        }
        p.flush();
        wait_for_count(&format!("SELECT count(*) FROM {table}"), 3, WAIT);
        let defaults = count(&mut pg, &format!("SELECT count(*) FROM {table} WHERE d = 'd' AND v LIKE 'value %'"));
        assert_eq!(defaults, 3, "{mode}: rows applied with the owner's default and domain");
        attacker.run(&mut pg, &format!("SELECT kafka.drop_subscription('{sub}')")).unwrap();
        wait_for("the dropped subscription's workers to exit", WAIT, || worker_pids(&mut pg, &sub).is_empty());
    }
    attacker.assert_ran_only_as_itself(&mut pg, &["default", "domain check", "trigger"]);
    let hijacked: Vec<_> =
        attacker.runs(&mut pg).into_iter().filter(|(what, _, _)| what == "operator" || what == "function").collect();
    assert!(hijacked.is_empty(), "a worker's catalog query ran the attacker's operator or function: {hijacked:?}");
    drop_roles_and_objects(
        &mut pg,
        &format!(
            "DROP OPERATOR public.= (oid, regtype); DROP FUNCTION public.array_position(smallint[], smallint);
         DROP OWNED BY {role} CASCADE; DROP ROLE {role}"
        ),
    );
}

/// Options that name server files, libraries or commands are refused to the attacker, and
/// checked again when a worker starts: a subscription that a superuser gave such an option
/// for its owner does not run once the owner lost the right.
#[test]
fn server_facing_options_are_refused_and_checked_again_at_each_start() {
    let mut pg = pg();
    let attacker = Attacker::new(&mut pg);
    let role = &attacker.role;
    let (topic, table, sub) = (unique("opt"), format!("public.{}", unique("opt")), unique("sub"));
    create_topic(&topic, 1);
    attacker.run(&mut pg, &format!("CREATE TABLE {table} (id bigint PRIMARY KEY, v text)")).unwrap();
    let attempts = [
        ("ssl.key.location", "/etc/ssl/private/ssl-cert-snakeoil.key", "pg_read_server_files"),
        ("ssl.ca.location", "/var/lib/postgresql", "pg_read_server_files"),
        ("plugin.library.paths", "/usr/lib/x86_64-linux-gnu/libz.so.1", "only superusers"),
        ("ssl.engine.location", "/usr/lib/x86_64-linux-gnu/libz.so.1", "only superusers"),
        ("sasl.kerberos.kinit.cmd", "touch /tmp/pgkb-pwned", "pg_execute_server_program"),
        ("sasl.mechanisms", "GSSAPI", "pg_execute_server_program"),
    ];
    for (name, value, needs) in attempts {
        let options = json!({ name: value }).to_string();
        let error = attacker
            .run(
                &mut pg,
                &format!(
                    "SELECT kafka.create_subscription(name => '{sub}', brokers => '{}', topic => '{topic}',
                                                      target => '{table}'::regclass, options => '{options}')",
                    brokers()
                ),
            )
            .expect_err(name);
        let message = error.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
        assert!(message.contains(name) && message.contains(needs), "{name}: {message}");
    }
    // A member of pg_read_server_files may name a CA directory; after a REVOKE its worker
    // refuses to start and says why, and nothing is consumed.
    pg.batch_execute(&format!("GRANT pg_read_server_files TO {role}")).unwrap();
    attacker
        .run(
            &mut pg,
            &format!(
                "SELECT kafka.create_subscription(name => '{sub}', brokers => '{}', topic => '{topic}',
                                                  target => '{table}'::regclass, batch_timeout_ms => 20,
                                                  options => '{{\"ssl.ca.location\": \"/etc/ssl/certs\"}}')",
                brokers()
            ),
        )
        .unwrap();
    let p = producer();
    p.send_json(&topic, None, "1", &json!({"id": 1, "v": "a"}));
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 1, WAIT);
    attacker.run(&mut pg, &format!("SELECT kafka.stop_subscription('{sub}')")).unwrap();
    pg.batch_execute(&format!("REVOKE pg_read_server_files FROM {role}")).unwrap();
    attacker.run(&mut pg, &format!("SELECT kafka.start_subscription('{sub}')")).unwrap();
    p.send_json(&topic, None, "2", &json!({"id": 2, "v": "b"}));
    p.flush();
    wait_for("the revoked right in the status", WAIT, || {
        last_error(&mut pg, &sub).is_some_and(|e| e.contains("ssl.ca.location") && e.contains("pg_read_server_files"))
    });
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM {table}")), 1, "nothing applied without the right");
    drop_subscription(&mut pg, &sub);
    assert!(!attacker.is_superuser(&mut pg));
    drop_roles_and_objects(&mut pg, &format!("DROP OWNED BY {role} CASCADE; DROP ROLE {role}"));
}

/// Row-level security: a publication publishes only tables whose every row its owner may
/// read. Enabled while the publication runs, it stops the worker with an error (checked
/// every `pg_kafka_bridge.metadata_refresh`), keeping the slot; no hidden row reaches Kafka.
#[test]
fn publications_never_publish_rows_hidden_from_their_owner() {
    let mut pg = pg();
    let attacker = Attacker::new(&mut pg);
    let role = &attacker.role;
    let (table, name, prefix) = (format!("public.{}", unique("secret")), unique("pub"), unique("cdc"));
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, who text);
         GRANT SELECT ON {table} TO {role};
         INSERT INTO {table} VALUES (1, 'someone else');"
    ))
    .unwrap();
    attacker
        .run(
            &mut pg,
            &format!(
                "SELECT kafka.create_publication(name => '{name}', brokers => '{}', tables => ARRAY['{table}']::regclass[],
                                                 topic => '{prefix}.{{table}}')",
                brokers()
            ),
        )
        .unwrap();
    wait_for_count(
        &format!("SELECT count(*) FROM kafka.publication_snapshots WHERE publication = '{name}' AND state = 'done'"),
        1,
        WAIT,
    );
    pg.batch_execute(&format!("INSERT INTO {table} VALUES (2, 'visible while no policy')")).unwrap();
    let topic = format!("{prefix}.{}", table.trim_start_matches("public."));
    // The snapshot's read of row 1, then the insert of row 2.
    let events = consume_events(&topic, 2, WAIT);
    let ops: Vec<(&str, i64)> = events.iter().map(|e| (e.op(), e.after()["id"].as_i64().unwrap())).collect();
    assert_eq!(ops, vec![("r", 1), ("c", 2)]);
    pg.batch_execute(&format!(
        "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own_rows ON {table} USING (who = current_user);"
    ))
    .unwrap();
    wait_for("the row-level security error in the status", WAIT, || {
        publication_error(&mut pg, &name).is_some_and(|e| e.contains("row-level security"))
    });
    pg.batch_execute(&format!("INSERT INTO {table} VALUES (3, 'hidden from the attacker')")).unwrap();
    // A snapshot asked for now would read the hidden rows: it waits with the publication.
    attacker.run(&mut pg, &format!("SELECT kafka.snapshot('{name}')")).unwrap();
    let slot = slot_of(&mut pg, &name);
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'")), 1);
    std::thread::sleep(Duration::from_secs(3));
    let events = consume_events(&topic, 2, Duration::from_secs(5));
    assert_eq!(
        events.len(),
        2,
        "a row hidden by row-level security was published: {:?}",
        events.last().map(|e| e.after().clone())
    );
    assert_eq!(
        count(
            &mut pg,
            &format!(
                "SELECT count(*) FROM kafka.publication_snapshots WHERE publication = '{name}' AND state = 'pending'"
            )
        ),
        1
    );
    // The table's owner bypasses the policy: a table it owns may be published again, and its
    // snapshot then runs.
    pg.batch_execute(&format!("ALTER TABLE {table} OWNER TO {role}")).unwrap();
    stop_publication(&mut pg, &name);
    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    let events = consume_events(&topic, 6, WAIT);
    let mut ops: Vec<(&str, i64)> = events.iter().map(|e| (e.op(), e.after()["id"].as_i64().unwrap())).collect();
    ops[2..].sort();
    assert_eq!(ops[2..], [("c", 3), ("r", 1), ("r", 2), ("r", 3)], "the owner's publication and snapshot run");
    drop_publication(&mut pg, &name);
    drop_roles_and_objects(&mut pg, &format!("DROP OWNED BY {role} CASCADE; DROP ROLE {role}"));
}

fn connect_to(database: &str) -> Client {
    // Later keys win: dbname replaces the harness's database.
    let mut client = Client::connect(&format!("{} dbname={database}", connection_string()), postgres::NoTls).unwrap();
    client.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_kafka_bridge").unwrap();
    client
}

/// Slots belong to one publication of one database: a namesake publication in another
/// database gets its own slot and leaves this one's alone, and `DROP EXTENSION` there drops
/// that database's slots, once it commits, and no other.
#[test]
fn slots_belong_to_one_database_and_go_with_the_extension() {
    let mut pg = pg();
    let (table, name, prefix, other_db) = (unique("slotted"), unique("pub"), unique("cdc"), unique("otherdb"));
    pg.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)")).unwrap();
    pg.batch_execute(&format!("CREATE DATABASE {other_db}")).unwrap();
    create_publication(&mut pg, &name, &[&table], &format!(", topic => '{prefix}.{{table}}'"));
    stop_publication(&mut pg, &name);
    let slot = slot_of(&mut pg, &name);
    pg.batch_execute(&format!("INSERT INTO {table} VALUES (1)")).unwrap();

    let mut other = connect_to(&other_db);
    other.batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)")).unwrap();
    create_publication(&mut other, &name, &[&table], "");
    let other_slot = slot_of(&mut other, &name);
    assert_ne!(slot, other_slot);
    let slots = |pg: &mut Client| {
        pg.query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name IN ($1, $2) ORDER BY 1",
            &[&slot, &other_slot],
        )
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
    };
    assert_eq!(slots(&mut pg).len(), 2, "both namesakes have their slot");

    // A DROP EXTENSION that rolls back keeps the slot; one that commits drops it.
    other.batch_execute("BEGIN; DROP EXTENSION pg_kafka_bridge CASCADE; ROLLBACK").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(slots(&mut pg).len(), 2, "a rolled-back DROP EXTENSION dropped a slot");
    other.batch_execute("DROP EXTENSION pg_kafka_bridge CASCADE").unwrap();
    wait_for("the other database's slot to go with its extension", WAIT, || slots(&mut pg) == [slot.clone()]);
    drop(other);
    pg.batch_execute(&format!("DROP DATABASE {other_db}")).unwrap();

    // This database's publication still has its slot and everything committed meanwhile.
    pg.batch_execute(&format!("SELECT kafka.start_publication('{name}')")).unwrap();
    let events = consume_events(&format!("{prefix}.{table}"), 1, WAIT);
    assert_eq!(events.first().map(|e| e.after().clone()), Some(json!({"id": 1})));
    drop_publication(&mut pg, &name);
}

/// Dead letters and errors belong to their subscription's owner: after a drop, a namesake
/// subscription of another role sees none of the old raw payloads; other roles never see a
/// subscription's last error.
#[test]
fn dead_letters_and_errors_stay_with_their_owner() {
    let mut pg = pg();
    let (first, second) = (Attacker::new(&mut pg), Attacker::new(&mut pg));
    let (topic, table, sub) = (unique("dl"), format!("public.{}", unique("dl")), unique("sub"));
    create_topic(&topic, 1);
    pg.batch_execute(&format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, v int);
         GRANT INSERT ON {table} TO {}, {}",
        first.role, second.role
    ))
    .unwrap();
    let create = format!(
        "SELECT kafka.create_subscription(name => '{sub}', brokers => '{}', topic => '{topic}',
                                          target => '{table}'::regclass, batch_timeout_ms => 20)",
        brokers()
    );
    first.run(&mut pg, &create).unwrap();
    let p = producer();
    p.send(&topic, None, Some(b"k"), Some(b"secret payload, not JSON"));
    p.send_json(&topic, None, "1", &json!({"id": 1, "v": 1}));
    p.flush();
    wait_for_count(&format!("SELECT count(*) FROM {table}"), 1, WAIT);
    let seen_by = |pg: &mut Client, who: &Attacker| {
        pg.batch_execute(&format!("SET ROLE {}", who.role)).unwrap();
        let n = count(pg, &format!("SELECT count(*) FROM kafka.dead_letters WHERE subscription = '{sub}'"));
        pg.batch_execute("RESET ROLE").unwrap();
        n
    };
    assert_eq!(seen_by(&mut pg, &first), 1, "the owner sees its dead letter");
    assert_eq!(seen_by(&mut pg, &second), 0);

    // An error of the first owner's subscription: a revoked privilege. Only it sees the text.
    pg.batch_execute(&format!("REVOKE INSERT ON {table} FROM {}", first.role)).unwrap();
    p.send_json(&topic, None, "2", &json!({"id": 2, "v": 2}));
    p.flush();
    wait_for("the privilege error in the status", WAIT, || last_error(&mut pg, &sub).is_some());
    let error_seen_by = |pg: &mut Client, who: &Attacker| {
        pg.batch_execute(&format!("SET ROLE {}", who.role)).unwrap();
        let view = pg
            .query_one("SELECT max(last_error) FROM kafka.subscription_status WHERE subscription = $1", &[&sub])
            .unwrap()
            .get::<_, Option<String>>(0);
        let function = pg
            .query_one("SELECT max(last_error) FROM kafka.subscription_worker_status()", &[])
            .unwrap()
            .get::<_, Option<String>>(0);
        pg.batch_execute("RESET ROLE").unwrap();
        (view.is_some(), function.is_some())
    };
    assert_eq!(error_seen_by(&mut pg, &first), (true, true));
    assert_eq!(error_seen_by(&mut pg, &second), (false, false), "another role read the subscription's error");

    first.run(&mut pg, &format!("SELECT kafka.drop_subscription('{sub}')")).unwrap();
    second.run(&mut pg, &create).unwrap();
    assert_eq!(seen_by(&mut pg, &second), 0, "a namesake subscription sees the old dead letters");
    assert_eq!(seen_by(&mut pg, &first), 0, "dead letters of a dropped subscription are for superusers");
    assert_eq!(count(&mut pg, &format!("SELECT count(*) FROM kafka.dead_letters WHERE subscription = '{sub}'")), 1);
    drop_subscription(&mut pg, &sub);
    drop_roles_and_objects(
        &mut pg,
        &format!(
            "DROP TABLE {table}; DROP OWNED BY {0} CASCADE; DROP ROLE {0}; DROP OWNED BY {1} CASCADE; DROP ROLE {1}",
            first.role, second.role
        ),
    );
}

#[test]
fn publication_dead_letters_stay_with_their_owner() {
    let mut pg = pg();
    let (first, second) = (Attacker::new(&mut pg), Attacker::new(&mut pg));
    let (table, name, prefix) = (format!("public.{}", unique("pdl")), unique("pub"), unique("p"));
    first.run(&mut pg, &format!("CREATE TABLE {table} (id int PRIMARY KEY, doc text)")).unwrap();
    let create = format!(
        "SELECT kafka.create_publication(name => '{name}', brokers => '{}', tables => ARRAY['{table}']::regclass[], \
         topic => '{prefix}.{{table}}')",
        brokers()
    );
    first.run(&mut pg, &create).unwrap();
    let big = "x".repeat(64) + &(0..1_200_000).map(|i| char::from(b'a' + ((i * 7919) % 26) as u8)).collect::<String>();
    first.run(&mut pg, &format!("INSERT INTO {table} VALUES (1, '{big}')")).unwrap();
    wait_for("the dead letter", WAIT, || {
        count(&mut pg, &format!("SELECT count(*) FROM kafka.publication_dead_letters WHERE publication = '{name}'"))
            == 1
    });
    let seen_by = |pg: &mut Client, who: &Attacker| {
        pg.batch_execute(&format!("SET ROLE {}", who.role)).unwrap();
        let rows =
            count(pg, &format!("SELECT count(*) FROM kafka.publication_dead_letters WHERE publication = '{name}'"));
        let counted: Option<i64> = pg
            .query_one("SELECT dead_letters FROM kafka.publication_status WHERE publication = $1", &[&name])
            .unwrap()
            .get(0);
        pg.batch_execute("RESET ROLE").unwrap();
        (rows, counted)
    };
    assert_eq!(seen_by(&mut pg, &first), (1, Some(1)), "the owner sees its dead letter");
    assert_eq!(seen_by(&mut pg, &second), (0, None), "another role saw the publication's dead letters");
    second.run(&mut pg, "DELETE FROM kafka.publication_dead_letters").unwrap();
    assert_eq!(seen_by(&mut pg, &first), (1, Some(1)), "another role deleted the publication's dead letter");
    first.run(&mut pg, &format!("DELETE FROM kafka.publication_dead_letters WHERE publication = '{name}'")).unwrap();
    assert_eq!(seen_by(&mut pg, &first), (0, Some(0)), "the owner may delete its dead letters");
    drop_publication(&mut pg, &name);
    drop_roles_and_objects(
        &mut pg,
        &format!(
            "DROP TABLE {table}; DROP OWNED BY {0} CASCADE; DROP ROLE {0}; DROP OWNED BY {1} CASCADE; DROP ROLE {1}",
            first.role, second.role
        ),
    );
}

/// The change-in-place functions follow the create functions' rules: only the owner's roles
/// may alter or seek, a new target must be writable by the owner, a table added to a
/// publication readable in full by the owner, and options that reach server files refused.
#[test]
fn altering_and_seeking_give_no_more_than_creating() {
    let mut pg = pg();
    let (owner, other) = (Attacker::new(&mut pg), Attacker::new(&mut pg));
    let (topic, table, sub) = (unique("alt"), format!("public.{}", unique("alt")), unique("sub"));
    let (secret, hidden, name) =
        (format!("public.{}", unique("secret")), format!("public.{}", unique("hidden")), unique("pub"));
    create_topic(&topic, 1);
    owner.run(&mut pg, &format!("CREATE TABLE {table} (id bigint PRIMARY KEY)")).unwrap();
    pg.batch_execute(&format!(
        "CREATE TABLE {secret} (id bigint PRIMARY KEY);
         CREATE TABLE {hidden} (id int PRIMARY KEY, owner text);
         GRANT SELECT ON {hidden} TO {0};
         ALTER TABLE {hidden} ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON {hidden} USING (owner = current_user);",
        owner.role
    ))
    .unwrap();
    owner
        .run(
            &mut pg,
            &format!(
                "SELECT kafka.create_subscription(name => '{sub}', brokers => '{}', topic => '{topic}',
                                                  target => '{table}'::regclass)",
                brokers()
            ),
        )
        .unwrap();
    owner
        .run(
            &mut pg,
            &format!(
                "SELECT kafka.create_publication(name => '{name}', brokers => '{}', tables => ARRAY['{table}']::regclass[])",
                brokers()
            ),
        )
        .unwrap();
    let refused = |who: &Attacker, pg: &mut Client, sql: &str, expected: &str| {
        let error = who.run(pg, sql).expect_err(sql);
        let message = error.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
        assert!(message.contains(expected), "{sql}: {message}");
    };
    refused(&other, &mut pg, &format!("SELECT kafka.alter_subscription('{sub}', batch_size => 5)"), "must be owner");
    refused(&other, &mut pg, &format!("SELECT kafka.seek('{sub}', 'earliest')"), "must be owner");
    refused(&other, &mut pg, &format!("SELECT kafka.alter_publication('{name}', brokers => 'x:1')"), "must be owner");
    refused(
        &owner,
        &mut pg,
        &format!("SELECT kafka.alter_subscription('{sub}', target => '{secret}')"),
        "may not insert into",
    );
    refused(
        &owner,
        &mut pg,
        &format!("SELECT kafka.alter_subscription('{sub}', options => '{{\"ssl.key.location\": \"/etc/ssl/private/ssl-cert-snakeoil.key\"}}')"),
        "pg_read_server_files",
    );
    refused(
        &owner,
        &mut pg,
        &format!("SELECT kafka.alter_publication('{name}', add_tables => ARRAY['{hidden}']::regclass[])"),
        "row-level security",
    );
    refused(
        &owner,
        &mut pg,
        &format!("SELECT kafka.alter_publication('{name}', options => '{{\"plugin.library.paths\": \"/usr/lib/x86_64-linux-gnu/libz.so.1\"}}')"),
        "only superusers",
    );
    let target: String =
        pg.query_one("SELECT target FROM kafka.subscriptions WHERE name = $1", &[&sub]).unwrap().get(0);
    assert_eq!(target, table, "the refused alter changed nothing");
    assert!(!owner.is_superuser(&mut pg) && !other.is_superuser(&mut pg));
    drop_subscription(&mut pg, &sub);
    drop_publication(&mut pg, &name);
    drop_roles_and_objects(
        &mut pg,
        &format!(
            "DROP TABLE {secret}, {hidden}, {table}; DROP OWNED BY {0} CASCADE; DROP ROLE {0}; \
             DROP OWNED BY {1} CASCADE; DROP ROLE {1}",
            owner.role, other.role
        ),
    );
}

/// Drops what a test made for its roles, and the roles. Retried: the server's background
/// processes can touch the same catalog rows for a moment after a worker exits.
fn drop_roles_and_objects(pg: &mut Client, sql: &str) {
    let mut attempts = 0;
    while let Err(e) = pg.batch_execute(sql) {
        attempts += 1;
        assert!(attempts < 10, "{sql}: {e}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

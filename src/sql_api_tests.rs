//! SQL API tests, run inside PostgreSQL by `cargo pgrx test`. Each runs in a transaction that
//! is rolled back; workers are not involved (the launcher watches another database).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn create_table() {
        Spi::run("CREATE TABLE public.t (id bigint PRIMARY KEY, name text, doc jsonb)").unwrap();
    }

    fn create(extra: &str) {
        Spi::run(&format!(
            "SELECT kafka.create_subscription('s1', '127.0.0.1:9', 'topic1', 'public.t'::regclass{extra})"
        ))
        .unwrap();
    }

    #[pg_test]
    fn creates_subscription_with_defaults() {
        create_table();
        create("");
        let row = Spi::get_three::<String, String, i32>(
            "SELECT format || '/' || mode, target, batch_size FROM kafka.subscriptions WHERE name = 's1'",
        )
        .unwrap();
        assert_eq!(row, (Some("json/insert".into()), Some("public.t".into()), Some(10000)));
        let enabled = Spi::get_one::<bool>("SELECT enabled FROM kafka.subscriptions WHERE name = 's1'").unwrap();
        assert_eq!(enabled, Some(true));
        Spi::run("SELECT kafka.stop_subscription('s1')").unwrap();
        let enabled = Spi::get_one::<bool>("SELECT enabled FROM kafka.subscriptions WHERE name = 's1'").unwrap();
        assert_eq!(enabled, Some(false));
        let state =
            Spi::get_one::<String>("SELECT state FROM kafka.subscription_status WHERE subscription = 's1'").unwrap();
        assert_eq!(state.as_deref(), Some("stopped"));
        Spi::run("SELECT kafka.drop_subscription('s1')").unwrap();
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM kafka.subscriptions").unwrap(), Some(0));
    }

    #[pg_test(error = "unknown format \"xml\": use 'json', 'text', 'bytea' or 'change'")]
    fn rejects_unknown_format() {
        create_table();
        create(", format => 'xml'");
    }

    #[pg_test(error = "unknown mode \"merge\": use 'insert' or 'upsert'")]
    fn rejects_unknown_mode() {
        create_table();
        create(", mode => 'merge'");
    }

    #[pg_test(error = "workers must be between 1 and 64, not 0")]
    fn rejects_zero_workers() {
        create_table();
        create(", workers => 0");
    }

    #[pg_test(error = "options must be a JSON object of strings, not [1]")]
    fn rejects_options_that_are_not_an_object() {
        create_table();
        create(", options => '[1]'");
    }

    #[pg_test(error = "option \"no.such.property\" is not a librdkafka property that pg_kafka_bridge allows")]
    fn rejects_unknown_librdkafka_property() {
        create_table();
        create(", options => '{\"no.such.property\": \"1\"}'");
    }

    #[pg_test(error = "option \"fetch.wait.max.ms\" must be a JSON string, not 5")]
    fn rejects_non_string_option() {
        create_table();
        create(", options => '{\"fetch.wait.max.ms\": 5}'");
    }

    #[pg_test(error = "option \"isolation.level\" is set by pg_kafka_bridge and cannot be overridden")]
    fn rejects_managed_option() {
        create_table();
        create(", options => '{\"isolation.level\": \"read_uncommitted\"}'");
    }

    #[pg_test(error = "subscription \"nope\" does not exist")]
    fn stop_unknown_subscription() {
        Spi::run("SELECT kafka.stop_subscription('nope')").unwrap();
    }

    #[pg_test(error = "subscription \"s1\" already exists")]
    fn rejects_duplicate_name() {
        create_table();
        create("");
        create("");
    }

    #[pg_test(error = "relation \"public.missing\" does not exist")]
    fn rejects_unknown_table() {
        Spi::run("SELECT kafka.create_subscription('s1', 'b:9', 't', 'public.missing')").unwrap();
    }

    #[pg_test(
        error = "table public.nokey: upsert mode needs key columns: the table has no primary key and key_columns is not given"
    )]
    fn upsert_needs_a_key() {
        Spi::run("CREATE TABLE public.nokey (id bigint, v text)").unwrap();
        Spi::run("SELECT kafka.create_subscription('s1', 'b:9', 't', 'public.nokey', mode => 'upsert')")
            .unwrap_or_default();
    }

    #[pg_test(
        error = "table public.t: format 'text' needs a column named \"payload\" or exactly one column besides the _kafka_* metadata columns"
    )]
    fn text_format_needs_a_payload_column() {
        create_table();
        create(", format => 'text'");
    }

    #[pg_test(error = "invalid subscription name \"bad name\": use 1 to 63 letters, digits, '_', '.' or '-'")]
    fn rejects_bad_name() {
        create_table();
        Spi::run("SELECT kafka.create_subscription('bad name', 'b:9', 't', 'public.t')").unwrap();
    }

    #[pg_test]
    fn options_are_hidden_from_other_roles() {
        create_table();
        create(", options => '{\"sasl.password\": \"hunter2\"}'");
        let own = Spi::get_one::<String>("SELECT options->>'sasl.password' FROM kafka.subscriptions").unwrap();
        assert_eq!(own.as_deref(), Some("hunter2"));
        Spi::run("CREATE ROLE pgkb_other").unwrap();
        Spi::run("SET LOCAL ROLE pgkb_other").unwrap();
        let other = Spi::get_one::<String>("SELECT options->>'sasl.password' FROM kafka.subscriptions").unwrap();
        assert_eq!(other.as_deref(), Some("********"));
        let raw =
            Spi::get_one::<bool>("SELECT has_column_privilege('kafka.subscription_catalog', 'options', 'SELECT')")
                .unwrap();
        assert_eq!(raw, Some(false));
    }

    #[pg_test(error = "permission denied for function create_subscription")]
    fn management_functions_are_not_public() {
        create_table();
        Spi::run("CREATE ROLE pgkb_nogrants").unwrap();
        Spi::run("SET LOCAL ROLE pgkb_nogrants").unwrap();
        create("");
    }

    #[pg_test(error = "the subscription owner may not insert into table public.t")]
    fn owner_must_be_able_to_write_the_table() {
        create_table();
        Spi::run("CREATE ROLE pgkb_writer").unwrap();
        Spi::run("GRANT EXECUTE ON FUNCTION kafka.create_subscription TO pgkb_writer").unwrap();
        Spi::run("SET LOCAL ROLE pgkb_writer").unwrap();
        create("");
    }

    #[pg_test(error = "must be owner of subscription \"s1\"")]
    fn only_the_owner_stops_a_subscription() {
        create_table();
        create("");
        Spi::run("CREATE ROLE pgkb_intruder").unwrap();
        Spi::run("GRANT EXECUTE ON FUNCTION kafka.stop_subscription TO pgkb_intruder").unwrap();
        Spi::run("SET LOCAL ROLE pgkb_intruder").unwrap();
        Spi::run("SELECT kafka.stop_subscription('s1')").unwrap();
    }

    fn create_publication(extra: &str) {
        Spi::run(&format!(
            "SELECT kafka.create_publication('p1', '127.0.0.1:9', ARRAY['public.t']::regclass[]{extra})"
        ))
        .unwrap();
    }

    // The test cluster runs with the default wal_level (replica): arguments are checked first,
    // then the server's configuration, before any slot is made.
    #[pg_test(error = "publications need wal_level = logical in postgresql.conf (and a server restart)")]
    fn publications_need_logical_decoding() {
        create_table();
        create_publication("");
    }

    #[pg_test(error = "invalid topic name \"cdc t\": Kafka topics use 1 to 249 letters, digits, '_', '.' or '-'")]
    fn publication_topics_must_be_valid_names() {
        create_table();
        create_publication(", topic => 'cdc {table}'");
    }

    #[pg_test(
        error = "public.k has no key for its events: add a primary key, or set REPLICA IDENTITY USING INDEX on a unique index"
    )]
    fn published_tables_need_a_key() {
        Spi::run("CREATE TABLE public.k (a int)").unwrap();
        Spi::run("SELECT kafka.create_publication('p1', '127.0.0.1:9', ARRAY['public.k']::regclass[])").unwrap();
    }

    #[pg_test(error = "permission denied for function send")]
    fn send_is_not_public() {
        Spi::run("CREATE ROLE pgkb_sender").unwrap();
        Spi::run("SET LOCAL ROLE pgkb_sender").unwrap();
        Spi::run("SELECT kafka.send('p1', 'topic', 'k', 'v')").unwrap();
    }
}

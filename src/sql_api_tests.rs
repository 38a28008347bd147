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
}

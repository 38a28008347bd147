//! Which librdkafka properties a subscription's or publication's owner may set: an
//! allow-list over every property librdkafka 2.12 knows.
//!
//! Workers run inside the server, as its operating-system user. A property that names a file,
//! a library, an engine, a command or a credential of that machine would let the owner use
//! the server's files and loader, so such properties need what PostgreSQL itself asks for
//! the same power: `pg_read_server_files` for files, `pg_execute_server_program` for
//! commands, superuser for loading code. A property not classified here is refused, so a
//! librdkafka upgrade cannot widen the list unnoticed (a unit test lists every property
//! librdkafka knows and fails on any that is not classified).

/// What setting a property takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Tuning, protocol and inline credentials: any owner.
    Open,
    /// Names a file or directory on the server: superusers and members of
    /// `pg_read_server_files`.
    ServerFiles,
    /// Runs a program on the server, or uses the server's Kerberos identity: superusers and
    /// members of `pg_execute_server_program`.
    ServerProgram,
    /// Loads code into the server process or changes how the process behaves: superusers.
    Superuser,
    /// Set by pg_kafka_bridge itself (its guarantees depend on the value) or meaningful only
    /// to a program using librdkafka's C API (callbacks, opaque pointers): never.
    Managed,
}

impl Access {
    /// Why an owner without the right privileges is refused the property.
    pub(crate) fn requirement(self) -> &'static str {
        match self {
            Access::Open => "",
            Access::ServerFiles => {
                "it names a file on the database server: only superusers and members of pg_read_server_files may set it"
            }
            Access::ServerProgram => {
                "it runs a program or uses a Kerberos identity of the database server: only superusers and members of pg_execute_server_program may set it"
            }
            Access::Superuser => {
                "it loads code into the database server or changes how its processes behave: only superusers may set it"
            }
            Access::Managed => "it is set by pg_kafka_bridge",
        }
    }
}

const MANAGED: &[&str] = &[
    // The extension's guarantees depend on these.
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "auto.commit.enable",
    "enable.auto.offset.store",
    "isolation.level",
    "auto.offset.reset",
    "enable.partition.eof",
    "transactional.id",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "offset.store.method",
    "offset.store.path",
    "offset.store.sync.interval.ms",
    "consume.callback.max.messages",
    "log.queue",
    "enabled_events",
    // Callbacks and pointers of the C API.
    "background_event_cb",
    "closesocket_cb",
    "connect_cb",
    "consume_cb",
    "default_topic_conf",
    "dr_cb",
    "dr_msg_cb",
    "error_cb",
    "interceptors",
    "log_cb",
    "msg_order_cmp",
    "oauthbearer_token_refresh_cb",
    "offset_commit_cb",
    "opaque",
    "open_cb",
    "partitioner_cb",
    "rebalance_cb",
    "resolve_cb",
    "socket_cb",
    "ssl.certificate.verify_cb",
    "ssl_ca",
    "ssl_certificate",
    "ssl_engine_callback_data",
    "ssl_key",
    "stats_cb",
    "throttle_cb",
];

const SERVER_FILES: &[&str] = &[
    "ssl.ca.location",
    "ssl.ca.certificate.stores",
    "ssl.certificate.location",
    "ssl.crl.location",
    "ssl.key.location",
    "ssl.keystore.location",
    "https.ca.location",
    "sasl.oauthbearer.assertion.file",
    "sasl.oauthbearer.assertion.jwt.template.file",
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.kerberos.keytab",
];

const SERVER_PROGRAM: &[&str] = &[
    "sasl.kerberos.kinit.cmd",
    "sasl.kerberos.principal",
    "sasl.kerberos.service.name",
    "sasl.kerberos.min.time.before.relogin",
];

const SUPERUSER: &[&str] = &[
    "plugin.library.paths",
    "ssl.engine.id",
    "ssl.engine.location",
    "ssl.providers",
    "internal.termination.signal",
    // Asks the cloud platform's metadata service for a token: the server machine's identity.
    "sasl.oauthbearer.metadata.authentication.type",
    // Makes the server send HTTP requests to any address, and shows the answer in errors.
    "sasl.oauthbearer.token.endpoint.url",
];

const OPEN: &[&str] = &[
    "acks",
    "allow.auto.create.topics",
    "api.version.fallback.ms",
    "api.version.request",
    "api.version.request.timeout.ms",
    "auto.commit.interval.ms",
    "batch.num.messages",
    "batch.size",
    "broker.address.family",
    "broker.address.ttl",
    "broker.version.fallback",
    "builtin.features",
    "check.crcs",
    "client.dns.lookup",
    "client.id",
    "client.rack",
    "compression.codec",
    "compression.level",
    "compression.type",
    "connections.max.idle.ms",
    "coordinator.query.interval.ms",
    "debug",
    "delivery.report.only.error",
    "delivery.timeout.ms",
    "enable.metrics.push",
    "enable.random.seed",
    "enable.sasl.oauthbearer.unsecure.jwt",
    "enable.ssl.certificate.verification",
    "fetch.error.backoff.ms",
    "fetch.max.bytes",
    "fetch.message.max.bytes",
    "fetch.min.bytes",
    "fetch.queue.backoff.ms",
    "fetch.wait.max.ms",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "heartbeat.interval.ms",
    "https.ca.pem",
    "linger.ms",
    "log.connection.close",
    "log.thread.name",
    "log_level",
    "max.in.flight",
    "max.in.flight.requests.per.connection",
    "max.partition.fetch.bytes",
    "max.poll.interval.ms",
    "message.copy.max.bytes",
    "message.max.bytes",
    "message.send.max.retries",
    "message.timeout.ms",
    "metadata.max.age.ms",
    "metadata.recovery.rebootstrap.trigger.ms",
    "metadata.recovery.strategy",
    "partition.assignment.strategy",
    "partitioner",
    "produce.offset.report",
    "queue.buffering.backpressure.threshold",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "queue.buffering.max.ms",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "queuing.strategy",
    "receive.message.max.bytes",
    "reconnect.backoff.jitter.ms",
    "reconnect.backoff.max.ms",
    "reconnect.backoff.ms",
    "request.required.acks",
    "request.timeout.ms",
    "retries",
    "retry.backoff.max.ms",
    "retry.backoff.ms",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.oauthbearer.assertion.algorithm",
    "sasl.oauthbearer.assertion.claim.aud",
    "sasl.oauthbearer.assertion.claim.exp.seconds",
    "sasl.oauthbearer.assertion.claim.iss",
    "sasl.oauthbearer.assertion.claim.jti.include",
    "sasl.oauthbearer.assertion.claim.nbf.seconds",
    "sasl.oauthbearer.assertion.claim.sub",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "sasl.oauthbearer.client.credentials.client.id",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.client.id",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.extensions",
    "sasl.oauthbearer.grant.type",
    "sasl.oauthbearer.method",
    "sasl.oauthbearer.scope",
    "sasl.password",
    "sasl.username",
    "security.protocol",
    "session.timeout.ms",
    "socket.blocking.max.ms",
    "socket.connection.setup.timeout.ms",
    "socket.keepalive.enable",
    "socket.max.fails",
    "socket.nagle.disable",
    "socket.receive.buffer.bytes",
    "socket.send.buffer.bytes",
    "socket.timeout.ms",
    "ssl.ca.pem",
    "ssl.certificate.pem",
    "ssl.cipher.suites",
    "ssl.curves.list",
    "ssl.endpoint.identification.algorithm",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
    "ssl.sigalgs.list",
    "statistics.interval.ms",
    "sticky.partitioning.linger.ms",
    "topic.blacklist",
    "topic.metadata.propagation.max.ms",
    "topic.metadata.refresh.fast.cnt",
    "topic.metadata.refresh.fast.interval.ms",
    "topic.metadata.refresh.interval.ms",
    "topic.metadata.refresh.sparse",
    "transaction.timeout.ms",
];

/// The access class of property `name` set to `value`, or `None` for a property that is
/// not classified (unknown to librdkafka, or new in a later version).
pub(crate) fn access(name: &str, value: &str) -> Option<Access> {
    let classes = [
        (MANAGED, Access::Managed),
        (SERVER_FILES, Access::ServerFiles),
        (SERVER_PROGRAM, Access::ServerProgram),
        (SUPERUSER, Access::Superuser),
        (OPEN, Access::Open),
    ];
    let class = classes.iter().find(|(names, _)| names.contains(&name)).map(|(_, class)| *class);
    // librdkafka's test brokers listen on the server's network interfaces.
    let class = class.or_else(|| name.starts_with("test.mock.").then_some(Access::Superuser))?;
    // Kerberos (GSSAPI) runs `sasl.kerberos.kinit.cmd` with the server's keytab.
    let kerberos = (name == "sasl.mechanism" || name == "sasl.mechanisms")
        && value.split(',').any(|m| m.trim().eq_ignore_ascii_case("GSSAPI"));
    Some(if kerberos { Access::ServerProgram } else { class })
}

/// Whether `properties` (name, value) make librdkafka use Kerberos without naming it: a
/// SASL protocol with no mechanism set means GSSAPI, librdkafka's default, which runs
/// `sasl.kerberos.kinit.cmd`. Such a set needs [`Access::ServerProgram`].
pub(crate) fn kerberos_by_default(properties: &[(String, String)]) -> bool {
    let sasl = properties
        .iter()
        .any(|(name, value)| name == "security.protocol" && value.trim().to_ascii_lowercase().starts_with("sasl"));
    let mechanism = properties.iter().any(|(name, _)| name == "sasl.mechanism" || name == "sasl.mechanisms");
    sasl && !mechanism
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every property librdkafka documents, from its own table (`rd_kafka_conf_properties_show`).
    fn librdkafka_properties() -> Vec<String> {
        // SAFETY: tmpfile returns a fresh FILE that only this function uses; librdkafka writes
        // its table to it, and it is read back and closed here.
        let table = unsafe {
            let file = libc::tmpfile();
            assert!(!file.is_null(), "tmpfile");
            rdkafka::bindings::rd_kafka_conf_properties_show(file);
            libc::fflush(file);
            libc::rewind(file);
            let mut text = Vec::new();
            let mut buffer = [0u8; 4096];
            loop {
                let n = libc::fread(buffer.as_mut_ptr().cast(), 1, buffer.len(), file);
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&buffer[..n]);
            }
            libc::fclose(file);
            String::from_utf8_lossy(&text).into_owned()
        };
        table
            .lines()
            .filter_map(|line| line.split('|').next())
            .map(str::trim)
            .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || "._".contains(c)))
            .filter(|name| *name != "property")
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_librdkafka_property_is_classified() {
        let properties = librdkafka_properties();
        assert!(properties.len() > 150, "read only {} properties from librdkafka", properties.len());
        let unclassified: Vec<_> = properties.iter().filter(|p| access(p, "").is_none()).collect();
        assert!(unclassified.is_empty(), "classify these librdkafka properties: {unclassified:?}");
    }

    #[test]
    fn server_facing_properties_need_privileges() {
        assert_eq!(access("plugin.library.paths", "x"), Some(Access::Superuser));
        assert_eq!(access("ssl.key.location", "/etc/ssl/private/key.pem"), Some(Access::ServerFiles));
        assert_eq!(access("sasl.kerberos.kinit.cmd", "id"), Some(Access::ServerProgram));
        assert_eq!(access("sasl.mechanisms", "PLAIN, gssapi"), Some(Access::ServerProgram));
        assert_eq!(access("sasl.mechanisms", "SCRAM-SHA-512"), Some(Access::Open));
        assert_eq!(access("test.mock.num.brokers", "3"), Some(Access::Superuser));
        assert_eq!(access("ssl.key.pem", "-----BEGIN"), Some(Access::Open));
        assert_eq!(access("isolation.level", "read_uncommitted"), Some(Access::Managed));
        assert_eq!(access("no.such.property", "1"), None);
        let pairs = |p: &[(&str, &str)]| p.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect::<Vec<_>>();
        assert!(kerberos_by_default(&pairs(&[("security.protocol", "SASL_SSL")])));
        assert!(!kerberos_by_default(&pairs(&[("security.protocol", "sasl_ssl"), ("sasl.mechanism", "PLAIN")])));
        assert!(!kerberos_by_default(&pairs(&[("security.protocol", "ssl")])));
    }
}

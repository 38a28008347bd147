//! The Kafka side of a subscription worker: a consumer with explicit partition assignment,
//! positioned from the offsets stored in PostgreSQL, reading only committed messages.

use crate::catalog::Subscription;
use crate::error::{BridgeError, Result};
use crate::kafka::{BridgeContext, ErrorMailbox, Options};
use crate::settings;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest fetch response asked of the broker (librdkafka's default is 50 MB).
const FETCH_MAX_BYTES: &str = "8388608";
/// Wait before fetching again after the pre-fetch buffer was full.
const FETCH_QUEUE_BACKOFF_MS: &str = "10";
/// Longest a fetch waits at the broker for messages (librdkafka's default is 500 ms). Kafka
/// answers as soon as a message comes; a broker that misses that answers at this time.
const FETCH_WAIT_MAX_MS: &str = "100";

pub(crate) struct TopicConsumer {
    pub(crate) consumer: BaseConsumer<BridgeContext>,
    pub(crate) errors: ErrorMailbox,
    topic: String,
}

impl TopicConsumer {
    pub(crate) fn connect(subscription: &Subscription, options: &Options) -> Result<TopicConsumer> {
        let client_name = format!("pg_kafka_bridge.{}", subscription.name);
        // Memory stays bounded whatever the backlog: what librdkafka pre-fetches, and how big
        // one fetch response may be. Once that buffer was full, librdkafka waits
        // fetch.queue.backoff.ms before fetching again (a whole second by default), which
        // would stall a worker that drains its buffer in milliseconds. A subscription's
        // options override each of these.
        let queue_kbytes = settings::consumer_queue_kbytes().to_string();
        let defaults = [
            ("client.id", client_name.as_str()),
            ("queued.max.messages.kbytes", queue_kbytes.as_str()),
            ("fetch.max.bytes", FETCH_MAX_BYTES),
            ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS),
            ("fetch.wait.max.ms", FETCH_WAIT_MAX_MS),
        ];
        let managed = [
            ("group.id", client_name.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("isolation.level", "read_committed"),
            // A stored position the broker no longer has must stop the subscription with an
            // error, never silently skip or replay messages.
            ("auto.offset.reset", "error"),
            ("enable.partition.eof", "false"),
        ];
        let config = options.client_config(&subscription.brokers, &defaults, &managed);
        let errors = ErrorMailbox::default();
        let consumer = config.create_with_context(BridgeContext { errors: errors.clone() })?;
        Ok(TopicConsumer { consumer, errors, topic: subscription.topic.clone() })
    }

    /// The topic's partitions, from the broker's metadata.
    pub(crate) fn partitions(&self) -> Result<Vec<i32>> {
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), METADATA_TIMEOUT)?;
        let topic = metadata.topics().iter().find(|t| t.name() == self.topic).ok_or_else(|| {
            BridgeError::Kafka(format!("topic \"{}\" is missing from the broker's metadata", self.topic))
        })?;
        if let Some(error) = topic.error() {
            let code = RDKafkaErrorCode::from(error);
            return Err(BridgeError::Kafka(format!("topic \"{}\": {code}", self.topic)));
        }
        let mut partitions: Vec<i32> = topic.partitions().iter().map(|p| p.id()).collect();
        partitions.sort_unstable();
        if partitions.is_empty() {
            return Err(BridgeError::Kafka(format!("topic \"{}\" has no partitions", self.topic)));
        }
        Ok(partitions)
    }

    /// The first or the next-to-be-written offset of a partition, asked of the broker.
    pub(crate) fn boundary(&self, partition: i32, latest: bool) -> Result<i64> {
        let (low, high) = self.consumer.fetch_watermarks(&self.topic, partition, METADATA_TIMEOUT)?;
        Ok(if latest { high } else { low })
    }

    /// The offset `target` names in `partition`.
    pub(crate) fn resolve(&self, partition: i32, target: SeekTarget) -> Result<i64> {
        let (low, high) = self.consumer.fetch_watermarks(&self.topic, partition, METADATA_TIMEOUT)?;
        match target {
            SeekTarget::Earliest => Ok(low),
            SeekTarget::Latest => Ok(high),
            SeekTarget::Offset(offset) if (low..=high).contains(&offset) => Ok(offset),
            SeekTarget::Offset(offset) => Err(BridgeError::InvalidParameter(format!(
                "offset {offset} is not in partition {partition} of topic \"{}\", which holds offsets {low} to {high}",
                self.topic
            ))),
            SeekTarget::Time(millis) => {
                let mut list = TopicPartitionList::new();
                list.add_partition_offset(&self.topic, partition, Offset::Offset(millis))?;
                let found = self.consumer.offsets_for_times(list, METADATA_TIMEOUT)?;
                // No message at or after the time: the end of the partition.
                Ok(match found.find_partition(&self.topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(offset)) => offset,
                    _ => high,
                })
            }
        }
    }

    /// Starts fetching each partition at the given offset, replacing any earlier assignment.
    pub(crate) fn assign(&self, positions: &BTreeMap<i32, i64>) -> Result<()> {
        let mut list = TopicPartitionList::new();
        for (&partition, &offset) in positions {
            list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))?;
        }
        self.consumer.assign(&list)?;
        Ok(())
    }

    /// Tells the broker's consumer group the positions PostgreSQL just committed, so that
    /// Kafka's lag tools see the subscription. Informational only: positions are always read
    /// back from PostgreSQL, and a failed commit here changes nothing.
    pub(crate) fn publish_positions(&self, positions: impl Iterator<Item = (i32, i64)>) {
        let mut list = TopicPartitionList::new();
        for (partition, offset) in positions {
            if list.add_partition_offset(&self.topic, partition, Offset::Offset(offset)).is_err() {
                return;
            }
        }
        let _ = self.consumer.commit(&list, CommitMode::Async);
    }

    /// The partition's high watermark as last seen in a fetch response (no network call).
    pub(crate) fn cached_high_watermark(&self, partition: i32) -> Option<i64> {
        let topic = std::ffi::CString::new(self.topic.as_str()).ok()?;
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client handle belongs to `self.consumer`, alive for the call; `topic`
        // is a NUL-terminated string and `low`/`high` writable locals, all outliving it.
        // librdkafka's function is thread-safe and only reads its cached offsets.
        let code = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
                &mut low,
                &mut high,
            )
        };
        (code == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high)
    }
}

/// Whether an error returned while polling means the assignment cannot go on as it is
/// (as opposed to a passing network problem that librdkafka retries by itself).
pub(crate) fn is_fatal_poll_error(e: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            OffsetOutOfRange
                // What librdkafka reports when a position is out of range and
                // auto.offset.reset=error: it then stops fetching the partition.
                | AutoOffsetReset
                | UnknownTopicOrPartition
                | UnknownTopic
                | UnknownPartition
                | TopicAuthorizationFailed
                | Fatal
        )
    )
}

/// Where `kafka.seek` moves a partition's next offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SeekTarget {
    Earliest,
    Latest,
    Offset(i64),
    /// The first message whose timestamp is at or after this time (ms since the epoch).
    Time(i64),
}

impl SeekTarget {
    /// `'earliest'`, `'latest'`, an offset, or anything PostgreSQL reads as a `timestamptz`.
    pub(crate) fn parse(position: &str) -> Result<SeekTarget> {
        let position = position.trim();
        match position {
            "earliest" => return Ok(SeekTarget::Earliest),
            "latest" => return Ok(SeekTarget::Latest),
            _ => {}
        }
        if let Ok(offset) = position.parse::<i64>() {
            return if offset >= 0 {
                Ok(SeekTarget::Offset(offset))
            } else {
                Err(BridgeError::InvalidParameter(format!("offset {offset} is negative")))
            };
        }
        let millis = crate::worker::subtransaction(|| {
            crate::catalog::query_optional::<i64>(
                "SELECT (pg_catalog.extract('epoch', $1::pg_catalog.timestamptz) * 1000)::pg_catalog.int8",
                &[position.into()],
            )
        });
        match millis {
            Ok(Some(millis)) => Ok(SeekTarget::Time(millis)),
            _ => Err(BridgeError::InvalidParameter(format!(
                "invalid position \"{position}\": use 'earliest', 'latest', an offset, or a timestamp"
            ))),
        }
    }
}

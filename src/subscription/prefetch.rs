//! Reading ahead: a thread of the worker polls the next batch from Kafka and turns it into
//! COPY text while the main thread writes the previous one into PostgreSQL. The thread only
//! touches librdkafka and pure Rust code, never PostgreSQL; at most one finished batch
//! waits for the main thread, so memory stays bounded by about three batches (of at most
//! `batch_size` messages and 4 MB each).

use super::consumer::{self, TopicConsumer};
use crate::error::{BridgeError, Result};
use crate::format::{EncodedBatch, Message as RowMessage, TargetShape};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest a single poll blocks, so that a stop request is seen promptly.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// While a batch is open, polls block at most this long, so that the batch goes as soon as
/// the main thread waits for it.
const OPEN_BATCH_POLL_SLICE: Duration = Duration::from_millis(2);
/// A batch goes before it is full or its `batch_timeout` has passed once nothing more is
/// queued and the main thread waits for it, but not before it is this old: at low rates this
/// bounds the transactions per second, at high rates batches fill while the main thread
/// applies the previous one.
const IDLE_APPLIER_LINGER: Duration = Duration::from_millis(5);
/// A batch also ends once its messages hold this many bytes, so that large messages do not
/// make the batches in flight (one applied, one waiting, one being read) outgrow a worker's
/// memory bound.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// While messages keep coming, how many are taken between two looks at the clock.
const CLOCK_CHECK_INTERVAL: usize = 256;

/// A message of a batch: its position, and where its key and value are in the batch's data.
pub(crate) struct BatchMessage {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    timestamp_ms: Option<i64>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A batch ready to be applied: the messages in the order Kafka gave them, and their rows.
pub(crate) struct Batch {
    pub(crate) messages: Vec<BatchMessage>,
    /// The keys and values of all messages, copied out of librdkafka's buffers into one
    /// allocation rather than two per message.
    data: Vec<u8>,
    pub(crate) encoded: EncodedBatch,
    /// A passing broker problem met while polling (librdkafka retries by itself).
    pub(crate) broker_error: Option<String>,
}

impl Batch {
    fn add(&mut self, m: &BorrowedMessage, wants_headers: bool) {
        // Headers are parsed only for a table that stores them.
        let headers = match wants_headers.then(|| m.headers()).flatten() {
            Some(h) => h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect(),
            None => Vec::new(),
        };
        let key = stash(&mut self.data, m.key());
        let payload = stash(&mut self.data, m.payload());
        self.messages.push(BatchMessage {
            partition: m.partition(),
            offset: m.offset(),
            key,
            payload,
            timestamp_ms: m.timestamp().to_millis(),
            headers,
        });
    }

    /// Message number `index` of the batch, as the row encoder and the dead letters see it.
    pub(crate) fn message<'a>(&'a self, index: usize, topic: &'a str) -> RowMessage<'a> {
        let m = &self.messages[index];
        RowMessage {
            topic,
            partition: m.partition,
            offset: m.offset,
            key: m.key.clone().map(|r| &self.data[r]),
            payload: m.payload.clone().map(|r| &self.data[r]),
            timestamp_ms: m.timestamp_ms,
            headers: m.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect(),
        }
    }
}

fn stash(data: &mut Vec<u8>, bytes: Option<&[u8]>) -> Option<Range<usize>> {
    let bytes = bytes?;
    data.extend_from_slice(bytes);
    Some(data.len() - bytes.len()..data.len())
}

pub(crate) struct Prefetcher {
    batches: Option<Receiver<Result<Batch>>>,
    stop: Arc<AtomicBool>,
    /// Set while the main thread waits for a batch.
    main_waiting: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub(crate) fn start(reader: BatchReader) -> Prefetcher {
        let (sender, batches) = sync_channel(1);
        let stop = reader.stop.clone();
        let main_waiting = reader.main_waiting.clone();
        // The thread starts with every signal blocked, so that PostgreSQL's handlers (SIGTERM,
        // SIGHUP, latches) only ever run on the main thread.
        // SAFETY: sigset_t is a plain C struct of integers, for which all zeroes is a valid
        // value; pthread_sigmask overwrites it below anyway.
        let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `all` is initialised by sigfillset before use, and both pointers are to live
        // locals; pthread_sigmask changes only the calling (main) thread's mask.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        }
        let spawned = std::thread::Builder::new().name("pgkb-prefetch".into()).spawn(move || {
            while !reader.stop.load(Ordering::Relaxed) {
                let batch = reader.read_batch();
                let failed = batch.is_err();
                if sender.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        // SAFETY: `previous` holds the mask pthread_sigmask saved above; restores it on the
        // main thread, the new thread keeping the all-blocked mask it inherited. Done before
        // looking at the outcome, so that a failed spawn leaves the worker's signals working.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
        let thread = spawned.expect("spawn the prefetch thread");
        Prefetcher { batches: Some(batches), stop, main_waiting, thread: Some(thread) }
    }

    /// The next batch (possibly empty), or `None` if none is ready within `timeout`.
    pub(crate) fn next(&self, timeout: Duration) -> Option<Result<Batch>> {
        self.main_waiting.store(true, Ordering::Relaxed);
        let received = self.batches.as_ref()?.recv_timeout(timeout);
        self.main_waiting.store(false, Ordering::Relaxed);
        match received {
            Ok(batch) => Some(batch),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                Some(Err(BridgeError::Kafka("the prefetch thread stopped unexpectedly".into())))
            }
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver fails a send the thread may be blocked in.
        self.batches.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the prefetch thread reads, and how.
pub(crate) struct BatchReader {
    pub(crate) source: Arc<TopicConsumer>,
    pub(crate) shape: Arc<TargetShape>,
    pub(crate) topic: String,
    pub(crate) batch_size: usize,
    pub(crate) batch_timeout: Duration,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) main_waiting: Arc<AtomicBool>,
}

impl BatchReader {
    /// Polls up to `batch_size` messages and encodes them. Returns an empty batch after a
    /// short wait if none come; once the first message is in, waits at most `batch_timeout`
    /// for the batch to fill, and less when the main thread is idle (see
    /// [`IDLE_APPLIER_LINGER`]).
    fn read_batch(&self) -> Result<Batch> {
        let wants_headers = self.shape.wants_headers();
        let mut batch =
            Batch { messages: Vec::new(), data: Vec::new(), encoded: EncodedBatch::default(), broker_error: None };
        // When the first message came, and when the batch must go at the latest.
        let mut opened: Option<(Instant, Instant)> = None;
        loop {
            // What librdkafka has queued already is taken without reading the clock, which
            // costs more than taking a message.
            let polled = match self.source.consumer.poll(Duration::ZERO) {
                Some(polled) => Some(polled),
                None => {
                    let now = Instant::now();
                    let wait = match opened {
                        None => POLL_SLICE,
                        Some((first, _))
                            if now >= first + IDLE_APPLIER_LINGER && self.main_waiting.load(Ordering::Relaxed) =>
                        {
                            break;
                        }
                        Some((_, deadline)) => deadline.saturating_duration_since(now).min(OPEN_BATCH_POLL_SLICE),
                    };
                    self.source.consumer.poll(wait)
                }
            };
            match polled {
                Some(Ok(m)) => {
                    batch.add(&m, wants_headers);
                    if batch.messages.len() >= self.batch_size || batch.data.len() >= MAX_BATCH_BYTES {
                        break;
                    }
                    opened.get_or_insert_with(|| {
                        let now = Instant::now();
                        (now, now + self.batch_timeout)
                    });
                    if !batch.messages.len().is_multiple_of(CLOCK_CHECK_INTERVAL) {
                        continue;
                    }
                }
                Some(Err(e)) if consumer::is_fatal_poll_error(&e) => return Err(BridgeError::from(e)),
                Some(Err(e)) => batch.broker_error = Some(e.to_string()),
                None if opened.is_none() => break,
                None => {}
            }
            if opened.is_some_and(|(_, deadline)| Instant::now() >= deadline) || self.stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let mut encoded = EncodedBatch::default();
        for i in 0..batch.messages.len() {
            encoded.push(&self.shape, i, &batch.message(i, &self.topic));
        }
        batch.encoded = encoded;
        Ok(batch)
    }
}

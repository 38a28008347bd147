//! Reading ahead: a thread of the worker polls the next batch from Kafka and turns it into
//! COPY text while the main thread writes the previous one into PostgreSQL. The thread only
//! touches librdkafka and pure Rust code, never PostgreSQL; at most one finished batch
//! waits for the main thread, so memory stays bounded by about three batches.

use super::consumer::{self, Source};
use crate::error::{BridgeError, Result};
use crate::format::{EncodedBatch, Message as RowMessage, TargetShape};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest a single poll blocks, so that a stop request is seen promptly.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// A message copied out of librdkafka's buffers.
pub struct OwnedMessage {
    pub partition: i32,
    pub offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    timestamp_ms: Option<i64>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl OwnedMessage {
    fn copy(m: &BorrowedMessage, wants_headers: bool) -> OwnedMessage {
        let headers = match (wants_headers, m.headers()) {
            (true, Some(h)) => h.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec))).collect(),
            _ => Vec::new(),
        };
        OwnedMessage {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            timestamp_ms: m.timestamp().to_millis(),
            headers,
        }
    }

    pub fn view<'a>(&'a self, topic: &'a str) -> RowMessage<'a> {
        RowMessage {
            topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            timestamp_ms: self.timestamp_ms,
            headers: self.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect(),
        }
    }
}

/// A batch ready to be applied: the messages in the order Kafka gave them, and their rows.
pub struct Batch {
    pub messages: Vec<OwnedMessage>,
    pub encoded: EncodedBatch,
    /// A passing broker problem met while polling (librdkafka retries by itself).
    pub broker_error: Option<String>,
}

pub struct Prefetcher {
    batches: Option<Receiver<Result<Batch>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub fn start(reader: Reader) -> Prefetcher {
        let (sender, batches) = sync_channel(1);
        let stop = reader.stop.clone();
        // The thread starts with every signal blocked, so that PostgreSQL's handlers (SIGTERM,
        // SIGHUP, latches) only ever run on the main thread.
        let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        }
        let thread = std::thread::Builder::new()
            .name("pgkb-prefetch".into())
            .spawn(move || {
                while !reader.stop.load(Ordering::Relaxed) {
                    let batch = reader.read_batch();
                    let failed = batch.is_err();
                    if sender.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .expect("spawn the prefetch thread");
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
        Prefetcher { batches: Some(batches), stop, thread: Some(thread) }
    }

    /// The next batch (possibly empty), or `None` if none is ready within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Result<Batch>> {
        match self.batches.as_ref()?.recv_timeout(timeout) {
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
pub struct Reader {
    pub source: Arc<Source>,
    pub shape: Arc<TargetShape>,
    pub topic: String,
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub stop: Arc<AtomicBool>,
}

impl Reader {
    /// Polls up to `batch_size` messages and encodes them. Returns an empty batch after a
    /// short wait if none come; once the first message is in, waits at most `batch_timeout`
    /// for the batch to fill.
    fn read_batch(&self) -> Result<Batch> {
        let wants_headers = self.shape.wants_headers();
        let mut messages = Vec::new();
        let mut broker_error = None;
        let mut deadline: Option<Instant> = None;
        loop {
            let wait = match deadline {
                None => POLL_SLICE,
                Some(d) => d.saturating_duration_since(Instant::now()).min(POLL_SLICE),
            };
            match self.source.consumer.poll(wait) {
                Some(Ok(m)) => {
                    messages.push(OwnedMessage::copy(&m, wants_headers));
                    deadline.get_or_insert_with(|| Instant::now() + self.batch_timeout);
                    if messages.len() >= self.batch_size {
                        break;
                    }
                }
                Some(Err(e)) if consumer::is_fatal_poll_error(&e) => return Err(BridgeError::from(e)),
                Some(Err(e)) => broker_error = Some(e.to_string()),
                None if deadline.is_none() => break,
                None => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) || self.stop.load(Ordering::Relaxed) {
                break;
            }
        }
        let mut encoded = EncodedBatch::default();
        for (i, m) in messages.iter().enumerate() {
            encoded.push(&self.shape, i, &m.view(&self.topic));
        }
        Ok(Batch { messages, encoded, broker_error })
    }
}

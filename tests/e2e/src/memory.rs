//! Peak memory of worker processes, sampled from /proc while a benchmark runs.
//!
//! Memory is the private resident memory (RssAnon): a backend's plain RSS also counts the
//! shared buffers it touched, which belong to the whole server.

use crate::pg;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Samples the memory of the processes `pids` names, every 50 ms, until stopped.
pub struct MemorySampler {
    running: Arc<AtomicBool>,
    peak_anon_kb: Arc<AtomicU64>,
    peak_hwm_kb: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl MemorySampler {
    pub fn start(mut pids: impl FnMut(&mut postgres::Client) -> Vec<i32> + Send + 'static) -> MemorySampler {
        let running = Arc::new(AtomicBool::new(true));
        let peak_anon_kb = Arc::new(AtomicU64::new(0));
        let peak_hwm_kb = Arc::new(AtomicU64::new(0));
        let thread = {
            let (running, anon, hwm) = (running.clone(), peak_anon_kb.clone(), peak_hwm_kb.clone());
            std::thread::spawn(move || {
                let mut client = pg();
                while running.load(Ordering::SeqCst) {
                    for pid in pids(&mut client) {
                        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                        anon.fetch_max(status_kb(&status, "RssAnon:"), Ordering::SeqCst);
                        hwm.fetch_max(status_kb(&status, "VmHWM:"), Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        MemorySampler { running, peak_anon_kb, peak_hwm_kb, thread }
    }

    /// Peak private RSS and peak total RSS, in MB.
    pub fn stop(self) -> (f64, f64) {
        self.running.store(false, Ordering::SeqCst);
        self.thread.join().unwrap();
        (
            self.peak_anon_kb.load(Ordering::SeqCst) as f64 / 1024.0,
            self.peak_hwm_kb.load(Ordering::SeqCst) as f64 / 1024.0,
        )
    }
}

fn status_kb(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

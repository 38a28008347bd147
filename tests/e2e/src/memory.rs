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
    peak_total_anon_kb: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl MemorySampler {
    pub fn start(mut pids: impl FnMut(&mut postgres::Client) -> Vec<i32> + Send + 'static) -> MemorySampler {
        let running = Arc::new(AtomicBool::new(true));
        let peak_anon_kb = Arc::new(AtomicU64::new(0));
        let peak_hwm_kb = Arc::new(AtomicU64::new(0));
        let peak_total_anon_kb = Arc::new(AtomicU64::new(0));
        let thread = {
            let (running, anon, hwm) = (running.clone(), peak_anon_kb.clone(), peak_hwm_kb.clone());
            let total = peak_total_anon_kb.clone();
            std::thread::spawn(move || {
                let mut client = pg();
                while running.load(Ordering::SeqCst) {
                    let mut sum = 0;
                    for pid in pids(&mut client) {
                        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                        let private = status_kb(&status, "RssAnon:");
                        sum += private;
                        anon.fetch_max(private, Ordering::SeqCst);
                        hwm.fetch_max(status_kb(&status, "VmHWM:"), Ordering::SeqCst);
                    }
                    total.fetch_max(sum, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        MemorySampler { running, peak_anon_kb, peak_hwm_kb, peak_total_anon_kb, thread }
    }

    /// Peak private RSS and peak total RSS of any one process, in MB.
    pub fn stop(self) -> (f64, f64) {
        let peaks = self.stop_with_sum();
        (peaks.0, peaks.1)
    }

    /// [`MemorySampler::stop`], and the peak of the processes' private RSS added up (MB).
    pub fn stop_with_sum(self) -> (f64, f64, f64) {
        self.running.store(false, Ordering::SeqCst);
        self.thread.join().unwrap();
        let mb = |kb: &AtomicU64| kb.load(Ordering::SeqCst) as f64 / 1024.0;
        (mb(&self.peak_anon_kb), mb(&self.peak_hwm_kb), mb(&self.peak_total_anon_kb))
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

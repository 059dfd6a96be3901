//! What a benchmarked process used, from /proc (Linux).

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// CPU seconds (user + system) of process `pid` so far; `None` once it is gone.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')')?.1;
    let mut fields = after.split_whitespace().skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    Some((user + system) / 100.0)
}

/// A `/proc/<pid>/status` size line (`VmRSS:`, `VmHWM:`) in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// (CPU seconds, user + system; peak RSS in MiB) of process `pid` so far.
pub fn usage(pid: u32) -> (f64, f64) {
    (
        cpu_seconds(pid).unwrap_or(0.0),
        status_mib(pid, "VmHWM:").unwrap_or(0.0),
    )
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: i64,
    cpu_s: f64,
    rss_mib: f64,
}

/// Samples a process's CPU time and resident size every 100 ms, stamped with the wall clock, so
/// that a measured window (say, first to last output, by record timestamps) can be cut out of its
/// life: start-up, JIT and group join fall outside it.
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
}

impl Sampler {
    pub fn start(pid: u32) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (into, stopped) = (samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let at_ms = wall_ms();
                match (cpu_seconds(pid), status_mib(pid, "VmRSS:")) {
                    (Some(cpu_s), Some(rss_mib)) => {
                        if let Ok(mut v) = into.lock() {
                            v.push(Sample {
                                at_ms,
                                cpu_s,
                                rss_mib,
                            });
                        }
                    }
                    _ => return,
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler { samples, stop }
    }

    /// CPU seconds used between `from_ms` and `to_ms` (interpolated between samples) and the
    /// largest resident size sampled in that window, in MiB.
    pub fn window(&self, from_ms: i64, to_ms: i64) -> (f64, f64) {
        let samples = self.samples.lock().map(|v| v.clone()).unwrap_or_default();
        let cpu_at = |t: i64| -> f64 {
            let after = samples.partition_point(|s| s.at_ms < t);
            match (
                after.checked_sub(1).and_then(|i| samples.get(i)),
                samples.get(after),
            ) {
                (Some(a), Some(b)) if b.at_ms > a.at_ms => {
                    a.cpu_s
                        + (b.cpu_s - a.cpu_s) * (t - a.at_ms) as f64 / (b.at_ms - a.at_ms) as f64
                }
                (Some(a), _) => a.cpu_s,
                (None, Some(b)) => b.cpu_s,
                (None, None) => 0.0,
            }
        };
        let peak = samples
            .iter()
            .filter(|s| s.at_ms >= from_ms - 100 && s.at_ms <= to_ms + 100)
            .map(|s| s.rss_mib)
            .fold(0.0, f64::max);
        ((cpu_at(to_ms) - cpu_at(from_ms)).max(0.0), peak)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

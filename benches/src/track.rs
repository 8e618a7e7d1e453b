//! Accounting of one load run: what was sent, acked, delivered, duplicated,
//! and how late each delivery was against its scheduled send time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, up to ten minutes.
const MAX_US: u64 = 600_000_000;

struct Shard {
    all: Histogram<u64>,
    /// One histogram per second of scheduled send time, for the plot.
    per_sec: Vec<Histogram<u64>>,
}

pub struct Tracker {
    pub round: u32,
    pub t0: Instant,
    pub rate: f64,
    pub total: usize,
    /// Deliveries each acked message should get.
    pub expected_per_message: u32,
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    pub deliveries: AtomicU64,
    pub duplicates: AtomicU64,
    delivered: Vec<AtomicU32>,
    shards: Vec<Mutex<Shard>>,
}

fn hist(sigfig: u8) -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_US, sigfig).expect("valid histogram bounds")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Tracker {
    pub fn new(
        round: u32,
        rate: f64,
        total: usize,
        expected_per_message: u32,
        start_in: Duration,
    ) -> Self {
        let secs = (total as f64 / rate).ceil() as usize + 1;
        let shards = (0..8)
            .map(|_| {
                Mutex::new(Shard {
                    all: hist(3),
                    per_sec: (0..secs).map(|_| hist(2)).collect(),
                })
            })
            .collect();
        Tracker {
            round,
            t0: Instant::now() + start_in,
            rate,
            total,
            expected_per_message,
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            delivered: (0..total).map(|_| AtomicU32::new(0)).collect(),
            shards,
        }
    }

    /// When message `i` is due.
    pub fn scheduled(&self, i: usize) -> Instant {
        self.t0 + Duration::from_nanos((i as f64 * 1e9 / self.rate) as u64)
    }

    pub fn on_ack(&self, ok: bool) {
        if ok {
            self.acked.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn on_duplicate(&self) {
        self.duplicates.fetch_add(1, Ordering::Relaxed);
    }

    /// A recipient (`shard` = its connection index) received message `i`.
    pub fn on_delivery(&self, shard: usize, i: usize, now: Instant) {
        let Some(slot) = self.delivered.get(i) else {
            return;
        };
        slot.fetch_add(1, Ordering::Relaxed);
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        let due = self.scheduled(i);
        let us = now
            .saturating_duration_since(due)
            .as_micros()
            .clamp(1, MAX_US as u128) as u64;
        let sec = due.saturating_duration_since(self.t0).as_secs() as usize;
        let mut s = lock(&self.shards[shard % self.shards.len()]);
        s.all.saturating_record(us);
        if let Some(h) = s.per_sec.get_mut(sec) {
            h.saturating_record(us);
        }
    }

    pub fn expected(&self) -> u64 {
        self.acked.load(Ordering::Relaxed) * self.expected_per_message as u64
    }

    /// Deliveries missing among acked messages, counting each message at
    /// most its expected number of times (duplicates do not hide losses).
    pub fn lost(&self) -> u64 {
        let got: u64 = self
            .delivered
            .iter()
            .map(|d| d.load(Ordering::Relaxed).min(self.expected_per_message) as u64)
            .sum();
        self.expected().saturating_sub(got)
    }

    /// Every message answered and every expected delivery made.
    pub fn settled(&self) -> bool {
        let answered = self.acked.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed);
        answered >= self.total as u64 && self.lost() == 0
    }

    pub fn latency(&self) -> Histogram<u64> {
        let mut all = hist(3);
        for s in &self.shards {
            let _ = all.add(&lock(s).all);
        }
        all
    }

    /// (second, count, p50, p99, max) per second of scheduled send time, in µs.
    pub fn timeline(&self) -> Vec<(usize, u64, u64, u64, u64)> {
        let secs = lock(&self.shards[0]).per_sec.len();
        (0..secs)
            .map(|sec| {
                let mut h = hist(2);
                for s in &self.shards {
                    let _ = h.add(&lock(s).per_sec[sec]);
                }
                (
                    sec,
                    h.len(),
                    h.value_at_quantile(0.5),
                    h.value_at_quantile(0.99),
                    h.max(),
                )
            })
            .filter(|t| t.1 > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_ignore_duplicates_and_count_only_acked_messages() {
        let t = Tracker::new(0, 1000.0, 4, 2, Duration::ZERO);
        for _ in 0..3 {
            t.on_ack(true);
        }
        t.on_ack(false);
        let now = Instant::now();
        t.on_delivery(0, 0, now);
        t.on_delivery(1, 0, now);
        t.on_delivery(1, 0, now); // a duplicate does not make up for a loss
        t.on_delivery(0, 1, now);
        assert_eq!(t.expected(), 6);
        assert_eq!(t.lost(), 3);
        assert!(!t.settled());
        assert_eq!(t.latency().len(), 4);
    }
}

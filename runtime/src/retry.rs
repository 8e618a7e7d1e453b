//! Retrying with exponential backoff: how every stage waits out a store or
//! broker that is away, instead of dropping or skipping what it holds.

use std::time::Duration;

/// Delays that double from `first` up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            next: first,
            cap: cap.max(first),
        }
    }

    /// The delay the next [`wait`](Backoff::wait) sleeps.
    pub fn delay(&self) -> Duration {
        self.next
    }

    /// Whether the delays have reached their cap (the trouble is lasting).
    pub fn at_cap(&self) -> bool {
        self.next >= self.cap
    }

    /// Sleep the current delay, then double it (up to the cap).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.cap);
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// One retry loop's bookkeeping: the backoff (50 ms doubling to a cap), a
/// warning per failure naming `what` and the delay, and an error counter.
/// How a stage holds on to what it has while a store is away, never
/// dropping it:
///
/// ```ignore
/// let mut retrying = Retrying::new("hot cache write", Duration::from_secs(2)).counting(&errors);
/// while let Err(e) = hot.insert(&items).await {
///     retrying.failed(&e).await;
/// }
/// ```
pub struct Retrying<'a> {
    what: &'static str,
    backoff: Backoff,
    errors: Option<&'a metrics::Counter>,
}

impl<'a> Retrying<'a> {
    pub fn new(what: &'static str, cap: Duration) -> Self {
        Retrying {
            what,
            backoff: Backoff::new(Duration::from_millis(50), cap),
            errors: None,
        }
    }

    /// Count each failure in `errors` (a stage's `imflow_stage_errors_total`).
    pub fn counting(mut self, errors: &'a metrics::Counter) -> Self {
        self.errors = Some(errors);
        self
    }

    /// Record a failure, then sleep before the next try.
    pub async fn failed(&mut self, error: impl std::fmt::Display) {
        if let Some(c) = self.errors {
            c.increment(1);
        }
        tracing::error!(%error, what = self.what, retry_in_ms = self.backoff.delay().as_millis() as u64, "failed; retrying");
        self.backoff.wait().await;
    }

    /// Whether the delays have reached their cap (the trouble is lasting).
    pub fn at_cap(&self) -> bool {
        self.backoff.at_cap()
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.backoff.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn failures_wait_doubling_delays_up_to_the_cap() {
        let started = tokio::time::Instant::now();
        let errors = metrics::Counter::noop();
        let mut retrying = Retrying::new("a test", Duration::from_millis(150)).counting(&errors);
        let mut tries = 0;
        let attempt = |n: u32| if n < 5 { Err(n) } else { Ok(n) };
        while let Err(e) = attempt({
            tries += 1;
            tries
        }) {
            retrying.failed(e).await;
        }
        assert_eq!(tries, 5);
        assert!(retrying.at_cap());
        // 50 + 100 + 150 + 150: doubled, then held at the cap.
        assert_eq!(started.elapsed(), Duration::from_millis(450));
        retrying.reset();
        assert!(!retrying.at_cap());
    }
}

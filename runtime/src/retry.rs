//! Retrying with exponential backoff: how every stage waits out a store or
//! broker that is away, instead of dropping or skipping what it holds.

use std::future::Future;
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

/// Run `attempt` until it succeeds, waiting `backoff` between tries;
/// `failed` hears of every failure with the delay before the next try.
pub async fn retry<T, E, F, Fut>(
    mut backoff: Backoff,
    mut attempt: F,
    mut failed: impl FnMut(&E, Duration),
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) => {
                failed(&e, backoff.delay());
                backoff.wait().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_with_doubling_delays() {
        let mut delays = Vec::new();
        let mut tries = 0;
        let got = retry(
            Backoff::new(Duration::from_millis(50), Duration::from_millis(150)),
            || {
                tries += 1;
                let n = tries;
                async move {
                    if n < 5 {
                        Err(n)
                    } else {
                        Ok(n)
                    }
                }
            },
            |_, d| delays.push(d.as_millis()),
        )
        .await;
        assert_eq!(got, 5);
        assert_eq!(delays, [50, 100, 150, 150]);
    }
}

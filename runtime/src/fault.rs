//! Fault injection for tests of what a crash at a given point costs.
//!
//! `IMFLOW_FAULTS` (read once per process) lists faults, comma-separated:
//! - `stall-output:STAGE`: the stage's output never sends; what it
//!   processed stays in it, unacknowledged downstream (e.g. a crash after
//!   the history commit and before the next stage has the message).
//! - `delay-presence:MS`: a cluster gateway records each batch of new
//!   connections in the presence registry MS milliseconds late (a slow
//!   Redis), so pushes cannot find them meanwhile.
//!
//! Unset, nothing changes and nothing is paid on the message path.

use std::sync::OnceLock;

fn faults() -> &'static [String] {
    static FAULTS: OnceLock<Vec<String>> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let list: Vec<String> = std::env::var("IMFLOW_FAULTS")
            .unwrap_or_default()
            .split(',')
            .map(|f| f.trim().to_string())
            .filter(|f| !f.is_empty())
            .collect();
        if !list.is_empty() {
            tracing::warn!(faults = ?list, "fault injection is on (IMFLOW_FAULTS)");
        }
        list
    })
}

/// Whether stage `stage`'s output is to stall.
pub fn output_stalled(stage: &str) -> bool {
    faults()
        .iter()
        .any(|f| f.strip_prefix("stall-output:") == Some(stage))
}

/// How late a gateway records new connections, if it is to.
pub fn presence_delay() -> Option<std::time::Duration> {
    faults().iter().find_map(|f| {
        f.strip_prefix("delay-presence:")?
            .parse()
            .ok()
            .map(std::time::Duration::from_millis)
    })
}

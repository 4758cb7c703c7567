//! Fault points: the narrowest windows of the delivery path, where a test can stop ferry on
//! purpose and prove that nothing is lost or done twice when it dies there.
//!
//! A point is armed by the `FERRY_FAULT` environment variable, read once at start:
//! `FERRY_FAULT=after-target-answer` aborts the process the first time a partner has taken a
//! message and ferry has not yet recorded it; `after-target-answer:3` the third time.
//! Unarmed, passing a point costs one read of a value set at start. Operators never set it;
//! the fault tests do.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A place in the message path where ferry can be made to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A target answered an attempt; its outcome is not recorded yet. Dying here, ferry
    /// must deliver again after a restart, with the same `Idempotency-Key`.
    AfterTargetAnswer,
    /// A queue message was handled and committed; the broker has not been told yet. Dying
    /// here, the broker delivers it again, and ferry must handle it once.
    BeforeQueueAck,
    /// An MLLP message was handled and committed; its acknowledgement is not sent yet.
    /// Dying here, the sender sends it again, and ferry must acknowledge it and handle it
    /// once.
    BeforeMllpAck,
}

impl Point {
    /// The name `FERRY_FAULT` uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::AfterTargetAnswer => "after-target-answer",
            Self::BeforeQueueAck => "before-queue-ack",
            Self::BeforeMllpAck => "before-mllp-ack",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [
            Self::AfterTargetAnswer,
            Self::BeforeQueueAck,
            Self::BeforeMllpAck,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

/// The armed point and how many more passes it lets through.
struct Armed {
    point: Point,
    passes_left: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("FERRY_FAULT").ok()?;
            let (name, nth) = spec.split_once(':').unwrap_or((&spec, "1"));
            let Some(point) = Point::parse(name.trim()) else {
                eprintln!("FERRY_FAULT names no fault point: \"{spec}\"");
                return None;
            };
            let nth: u64 = nth.trim().parse().unwrap_or(1).max(1);
            Some(Armed {
                point,
                passes_left: AtomicU64::new(nth - 1),
            })
        })
        .as_ref()
}

/// Passes fault point `point`: aborts the process there when `FERRY_FAULT` arms it.
pub fn pass(point: Point) {
    let Some(armed) = armed().filter(|a| a.point == point) else {
        return;
    };
    let before = armed
        .passes_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    if before.is_err() {
        eprintln!("ferry: fault point {} reached: aborting", point.name());
        std::process::abort();
    }
}

//! Polling: the task that owns one bus ([`BusTask`]) reads its devices on
//! schedule and runs the typed [`job`]s sent to it, one transaction at a
//! time. It decides which device is due, reads its coalesced blocks
//! ([`plan`]), decodes the points, applies the report policy and appends
//! readings and events to the outbox. A device that keeps failing is backed
//! off so that its timeouts do not starve the devices that answer.

mod alarm;
mod device;
pub mod job;
pub mod plan;
pub mod scan;
mod task;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::bus::Bus;
use crate::codec::{self, Value};
use crate::config::{Device, Point};
use crate::modbus::{Reply, TxError};
use plan::Block;
pub use task::{BusHandle, BusTask, DeviceStatus, StopReason};

/// Longest interval a failing device is backed off to (unless its own poll
/// interval is longer).
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The poll interval after `failures` consecutive failed polls: normal for
/// the first three, then one more interval per failure, capped at a minute.
pub fn backoff_interval(poll: Duration, failures: u32) -> Duration {
    let factor = failures.saturating_sub(2).max(1);
    poll.saturating_mul(factor).min(MAX_BACKOFF.max(poll))
}

/// The outcome of reading every block of a device once: per block, the
/// reply or why there is none.
pub struct PollResult {
    pub replies: Vec<Result<Reply, TxError>>,
}

impl PollResult {
    pub fn all_failed(&self) -> bool {
        self.replies.iter().all(Result::is_err)
    }

    /// No block got any answer at all: the slave is silent or unreachable.
    /// (An exception reply proves the slave is alive.)
    pub fn unreachable(&self) -> bool {
        self.replies
            .iter()
            .all(|r| matches!(r, Err(e) if !matches!(e, TxError::Exception(_))))
    }

    /// Every point as read (or why not), by point index: what `read`, the
    /// local API and the console show. `ts_ms` is when the reads started.
    pub fn points(&self, points: &[Point], blocks: &[Block], ts_ms: u64) -> Vec<Option<PointRead>> {
        let values = self.values(points, blocks);
        let mut out = vec![None; points.len()];
        for (block, reply) in blocks.iter().zip(&self.replies) {
            for &i in &block.points {
                let Some(point) = points.get(i) else { continue };
                let mut read = PointRead {
                    name: point.name.clone(),
                    value: None,
                    raw: None,
                    unit: point.unit.clone(),
                    ts_ms,
                    error: None,
                };
                match reply {
                    Ok(reply) => {
                        read.raw = raw_of(point, block, reply).map(|raw| match raw {
                            Raw::Bit(b) => Json::from(vec![b]),
                            Raw::Registers(regs) => Json::from(regs.to_vec()),
                        });
                        let value = values.get(i).and_then(Option::as_ref);
                        read.value = value.and_then(|v| codec::present(point, v));
                        if let (Some(value), None) = (value, &read.value) {
                            read.error = Some(format!("{value} has no JSON form"));
                        }
                    }
                    Err(e) => read.error = Some(e.to_string()),
                }
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(read);
                }
            }
        }
        out
    }

    /// Decoded values by point index; `None` where the block failed.
    pub fn values(&self, points: &[Point], blocks: &[Block]) -> Vec<Option<Value>> {
        let mut out = vec![None; points.len()];
        for (block, reply) in blocks.iter().zip(&self.replies) {
            let Ok(reply) = reply else { continue };
            for &i in &block.points {
                let (Some(point), Some(slot)) = (points.get(i), out.get_mut(i)) else {
                    continue;
                };
                *slot = raw_of(point, block, reply).map(|raw| match raw {
                    Raw::Bit(b) => Value::Bool(b),
                    Raw::Registers(regs) => codec::decode_registers(point, regs),
                });
            }
        }
        out
    }
}

/// One point as read: the value (JSON form), the raw registers or bits, the
/// engineering unit, when, or the error that kept it from being read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRead {
    pub name: String,
    pub value: Option<Json>,
    pub raw: Option<Json>,
    pub unit: Option<String>,
    pub ts_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The part of a block's reply that belongs to one point.
pub enum Raw<'a> {
    Bit(bool),
    Registers(&'a [u16]),
}

/// Cuts `point`'s bit or registers out of its block's reply.
pub fn raw_of<'a>(point: &Point, block: &Block, reply: &'a Reply) -> Option<Raw<'a>> {
    let at = usize::from(point.address.checked_sub(block.start)?);
    match reply {
        Reply::Bits(bits) => bits.get(at).map(|b| Raw::Bit(*b)),
        Reply::Registers(regs) => regs
            .get(at..at + usize::from(point.kind.width()))
            .map(Raw::Registers),
        Reply::Written => None,
    }
}

/// Reads every block of `device` once, one transaction after another.
pub async fn read_device(bus: &mut Bus, device: &Device, blocks: &[Block]) -> PollResult {
    let mut replies = Vec::with_capacity(blocks.len());
    for block in blocks {
        replies.push(
            bus.transact(device.unit, &block.request(), device.timeout)
                .await,
        );
    }
    PollResult { replies }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_spec() {
        let poll = Duration::from_secs(5);
        let got: Vec<u64> = (0..20)
            .map(|f| backoff_interval(poll, f).as_secs())
            .collect();
        assert_eq!(
            got,
            [5, 5, 5, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 60, 60, 60, 60, 60]
        );
        // A device polled less often than the cap keeps its own interval.
        assert_eq!(backoff_interval(Duration::from_secs(120), 9).as_secs(), 120);
        assert_eq!(
            backoff_interval(Duration::from_secs(86_400), u32::MAX).as_secs(),
            86_400
        );
    }
}

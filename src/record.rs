//! The uplink message: what bus owners, the router and the daemon hand to
//! the outbox, and what the platform profiles turn into MQTT publications.
//! It sits below every module that produces or consumes one, so none of
//! them needs to import another to share it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One uplink record, as produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When the sample was taken (ms since the epoch).
    pub taken_ms: u64,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// One device's reading.
    Attributes {
        device: String,
        key: Option<String>,
        values: Map<String, Value>,
    },
    /// Something the platform should know: a rejected or failed write, a
    /// device going offline or online, a raw frame that got no answer.
    Event {
        id: u64,
        method: String,
        params: Map<String, Value>,
    },
    /// The answer to a platform command: `key` is the sub-device it was
    /// sent to, `id` the command id as the platform gave it.
    Reply {
        key: Option<String>,
        id: Value,
        method: String,
        params: Map<String, Value>,
    },
    /// A raw frame's response for `data/<stream>`, already in the stream's
    /// encoding.
    Stream { name: String, payload: Vec<u8> },
    /// A sub-device answered (first poll, or again after being offline) or
    /// went offline: ThingsCloud's `gateway/connect` / `gateway/disconnect`.
    Presence { key: String, online: bool },
    /// The gateway's own health for the generic profile's `<prefix>/stats`
    /// (`[platform] stats`; on ThingsCloud it is gateway attributes).
    Stats { status: Map<String, Value> },
}

/// A device's decoded values from one poll, before it becomes a [`Record`].
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: String,
    /// Platform sub-device key; `None` = the gateway's own attributes.
    pub key: Option<String>,
    /// When the sample was taken.
    pub taken: SystemTime,
    pub values: Map<String, Value>,
}

impl Record {
    /// A record taken now.
    pub fn now(body: Body) -> Self {
        Record {
            taken_ms: now_ms(),
            body,
        }
    }

    /// An event taken now, with a fresh id (ThingsCloud's `event/report/<id>`).
    pub fn event(method: &str, params: Value) -> Self {
        static NEXT_ID: OnceLock<AtomicU64> = OnceLock::new();
        let id = NEXT_ID
            .get_or_init(|| AtomicU64::new(now_ms()))
            .fetch_add(1, Ordering::Relaxed);
        let params = match params {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        Self::now(Body::Event {
            id,
            method: method.to_string(),
            params,
        })
    }
}

impl From<Reading> for Record {
    fn from(r: Reading) -> Self {
        Record {
            taken_ms: ms_since_epoch(r.taken),
            body: Body::Attributes {
                device: r.device,
                key: r.key,
                values: r.values,
            },
        }
    }
}

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn now_ms() -> u64 {
    ms_since_epoch(SystemTime::now())
}

/// `2026-11-23T21:40:05Z` for a time in ms since the epoch.
pub fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

//! What a bus tells the rest of the daemon about its transactions, without
//! waiting for anyone: counters and bus time for the status and `/metrics`,
//! and the live trace. The bus owner only increments atomics and, when
//! someone is watching, hands a trace event to a broadcast channel, which
//! never blocks: a trace consumer that falls behind loses events (counted),
//! never bus time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::config::UnitId;
use crate::modbus::TxError;
use crate::record::ms_since_epoch;
use crate::text::to_hex;

/// Trace events buffered per watcher before the oldest are lost.
const TRACE_BUFFER: usize = 256;
/// The window over which `busy_ratio` is measured.
const BUSY_WINDOW: Duration = Duration::from_secs(10);

/// The outcome label of a transaction in metrics.
const OUTCOMES: [&str; 6] = [
    "ok",
    "timeout",
    "exception",
    "crc",
    "garbled",
    "disconnected",
];

/// Labels of the per-device Modbus metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub bus: String,
    pub device: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub bus: String,
    pub device: String,
}

fn request_histogram() -> Histogram {
    // 1 ms .. ~4 s: a TCP PLC answers in a millisecond, a 9600-baud block
    // read takes a few hundred, a timeout up to the configured limit.
    Histogram::new(exponential_buckets(0.001, 2.0, 13))
}

/// The Modbus metric families shared by every bus of the daemon; the
/// registry of `/metrics` holds clones of the same handles.
#[derive(Clone)]
pub struct ModbusMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub seconds: Family<DeviceLabels, Histogram, fn() -> Histogram>,
}

impl Default for ModbusMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            seconds: Family::new_with_constructor(request_histogram),
        }
    }
}

/// One Modbus transaction as the trace shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceEvent {
    pub ts_ms: u64,
    pub bus: String,
    pub unit: u8,
    pub fc: u8,
    /// The request and the response frames as sent and received, hex with
    /// spaces (the response is empty when none came).
    pub request: String,
    pub response: String,
    pub ms: f64,
    /// `ok`, `timeout`, `exception <code>`, `crc`, `garbled`, `disconnected`.
    pub outcome: String,
}

/// The metric handles of one unit on the bus, resolved once.
struct UnitMetrics {
    unit: u8,
    outcomes: [Counter; OUTCOMES.len()],
    seconds: Histogram,
}

impl UnitMetrics {
    /// The handles of `device` (unit `unit`) on bus `bus`.
    fn new(metrics: &ModbusMetrics, bus: &str, unit: u8, device: &str) -> Self {
        Self {
            unit,
            outcomes: OUTCOMES.map(|outcome| {
                metrics.requests.get_or_create_owned(&RequestLabels {
                    bus: bus.to_string(),
                    device: device.to_string(),
                    outcome: outcome.to_string(),
                })
            }),
            seconds: metrics.seconds.get_or_create_owned(&DeviceLabels {
                bus: bus.to_string(),
                device: device.to_string(),
            }),
        }
    }
}

/// Bus time used, measured over [`BUSY_WINDOW`].
struct Busy {
    window_start: Instant,
    busy_at_start: Duration,
    last_ratio: Option<f64>,
}

/// The live figures of one bus.
pub struct BusStats {
    pub name: String,
    pub transport: String,
    connected: AtomicBool,
    requests: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    busy_ns: AtomicU64,
    busy: Mutex<Busy>,
    trace: broadcast::Sender<Arc<TraceEvent>>,
    /// Trace events evicted before a slow watcher saw them.
    trace_lost: AtomicU64,
    units: Vec<UnitMetrics>,
    /// Metrics of unit ids no device uses (scans, raw frames), labelled
    /// with an empty device, made at first use.
    other: OnceLock<UnitMetrics>,
    families: ModbusMetrics,
}

/// A snapshot of the counters, for the status.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counts {
    pub connected: bool,
    pub requests: u64,
    pub timeouts: u64,
    pub errors: u64,
    pub busy_ratio: f64,
}

impl BusStats {
    /// The stats of bus `name`; `devices` names the device of each unit id
    /// (the label of its metrics).
    pub fn new(
        name: &str,
        transport: &str,
        devices: &[(UnitId, String)],
        metrics: &ModbusMetrics,
    ) -> Self {
        let mut units: Vec<UnitMetrics> = Vec::new();
        for (unit, device) in devices {
            if !units.iter().any(|u| u.unit == unit.get()) {
                units.push(UnitMetrics::new(metrics, name, unit.get(), device));
            }
        }
        Self {
            name: name.to_string(),
            transport: transport.to_string(),
            connected: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            busy: Mutex::new(Busy {
                window_start: Instant::now(),
                busy_at_start: Duration::ZERO,
                last_ratio: None,
            }),
            trace: broadcast::channel(TRACE_BUFFER).0,
            trace_lost: AtomicU64::new(0),
            units,
            other: OnceLock::new(),
            families: metrics.clone(),
        }
    }

    /// Stats that nobody reads (a bus opened by a CLI command).
    pub fn unobserved(name: &str) -> Self {
        Self::new(name, "", &[], &ModbusMetrics::default())
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Whether anyone watches the trace: only then is an event built.
    pub fn traced(&self) -> bool {
        self.trace.receiver_count() > 0
    }

    /// Counts one transaction attempt that took `took`.
    pub fn record(&self, unit: UnitId, took: Duration, outcome: Option<&TxError>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match outcome {
            None => {}
            Some(TxError::Timeout(_)) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let metrics = match self.units.iter().find(|u| u.unit == unit.get()) {
            Some(metrics) => metrics,
            None => self
                .other
                .get_or_init(|| UnitMetrics::new(&self.families, &self.name, 0, "")),
        };
        let label = outcome.map_or("ok", TxError::kind);
        if let Some(i) = OUTCOMES.iter().position(|o| *o == label) {
            if let Some(counter) = metrics.outcomes.get(i) {
                counter.inc();
            }
        }
        metrics.seconds.observe(took.as_secs_f64());
        let took_ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let total = self.busy_ns.fetch_add(took_ns, Ordering::Relaxed);
        let total = Duration::from_nanos(total.saturating_add(took_ns));
        if let Ok(mut busy) = self.busy.lock() {
            let elapsed = busy.window_start.elapsed();
            if elapsed >= BUSY_WINDOW {
                busy.last_ratio = Some(ratio(total.saturating_sub(busy.busy_at_start), elapsed));
                busy.window_start = Instant::now();
                busy.busy_at_start = total;
            }
        }
    }

    /// Publishes one transaction to the trace watchers.
    pub fn trace(
        &self,
        unit: UnitId,
        fc: u8,
        request: &[u8],
        response: &[u8],
        took: Duration,
        outcome: Option<&TxError>,
    ) {
        let event = TraceEvent {
            ts_ms: ms_since_epoch(SystemTime::now()),
            bus: self.name.clone(),
            unit: unit.get(),
            fc,
            request: to_hex(request),
            response: to_hex(response),
            ms: (took.as_secs_f64() * 1e4).round() / 10.0,
            outcome: match outcome {
                None => "ok".to_string(),
                Some(TxError::Exception(code)) => format!("exception {}", u8::from(*code)),
                Some(e) => e.kind().to_string(),
            },
        };
        // A full queue means this event evicts one a watcher has not seen.
        if self.trace.len() >= TRACE_BUFFER {
            self.trace_lost.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.trace.send(Arc::new(event));
    }

    /// A new trace watcher.
    pub fn watch(&self) -> broadcast::Receiver<Arc<TraceEvent>> {
        self.trace.subscribe()
    }

    pub fn trace_lost(&self) -> u64 {
        self.trace_lost.load(Ordering::Relaxed)
    }

    pub fn counts(&self) -> Counts {
        let total = Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed));
        let busy_ratio = self.busy.lock().map_or(0.0, |busy| {
            let elapsed = busy.window_start.elapsed();
            match busy.last_ratio {
                // An idle bus has no transaction to close the window.
                Some(last) if elapsed < BUSY_WINDOW => last,
                _ => ratio(total.saturating_sub(busy.busy_at_start), elapsed),
            }
        });
        Counts {
            connected: self.connected.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            busy_ratio,
        }
    }
}

/// `busy` over `elapsed`, clamped to 0..1.
fn ratio(busy: Duration, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        return 0.0;
    }
    (busy.as_secs_f64() / elapsed.as_secs_f64()).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(id: u8) -> UnitId {
        UnitId::new(id).unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn counts_split_timeouts_from_other_errors_and_label_by_device() {
        let metrics = ModbusMetrics::default();
        let stats = BusStats::new("b", "serial", &[(unit(1), "meter".into())], &metrics);
        let ms = Duration::from_millis(2);
        stats.record(unit(1), ms, None);
        stats.record(unit(1), ms, Some(&TxError::Timeout(ms)));
        stats.record(unit(9), ms, Some(&TxError::Crc));
        let counts = stats.counts();
        assert_eq!((counts.requests, counts.timeouts, counts.errors), (3, 1, 1));
        let get = |device: &str, outcome: &str| {
            metrics
                .requests
                .get(&RequestLabels {
                    bus: "b".into(),
                    device: device.into(),
                    outcome: outcome.into(),
                })
                .map(|c| c.get())
        };
        assert_eq!(get("meter", "ok"), Some(1));
        assert_eq!(get("meter", "timeout"), Some(1));
        assert_eq!(get("", "crc"), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn busy_ratio_is_bus_time_over_wall_time() {
        let stats = BusStats::unobserved("b");
        tokio::time::advance(Duration::from_secs(4)).await;
        stats.record(unit(1), Duration::from_secs(1), None);
        let r = stats.counts().busy_ratio;
        assert!((r - 0.25).abs() < 0.01, "{r}");
        tokio::time::advance(Duration::from_secs(7)).await;
        stats.record(unit(1), Duration::from_secs(1), None);
        // The window closed at 11 s with 2 s busy.
        let r = stats.counts().busy_ratio;
        assert!((r - 2.0 / 11.0).abs() < 0.01, "{r}");
        // Idle for long: the ratio falls.
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(stats.counts().busy_ratio < 0.01);
    }
}

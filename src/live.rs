//! What the running daemon knows of itself right now, gathered for the
//! local API, `/metrics` and `[platform] stats`. Nothing here does I/O or
//! waits: every figure is an atomic, a `watch` snapshot or a bus's own
//! counters, so reading the state never slows the tasks that write it.
//!
//! | figure | written by |
//! |---|---|
//! | buses, devices, last values | the bus owners ([`BusHandle`]) |
//! | uplink | the MQTT task ([`UplinkStats`]) |
//! | outbox | the outbox owner (its stats `watch`) |
//! | the running config | the daemon, at start and on SIGHUP ([`FieldView`]) |

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Map, Value as Json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::bus::tap::ModbusMetrics;
use crate::config::{Config, Device, Library};
use crate::outbox::Outbox;
use crate::poll::{BusHandle, DeviceStatus};
use crate::record::ms_since_epoch;

/// The MQTT connection as the rest of the daemon sees it.
#[derive(Default)]
pub struct UplinkStats {
    connected: AtomicBool,
    /// When the connection last came up or went down; 0 = never.
    since_ms: AtomicU64,
    published: AtomicU64,
    errors: AtomicU64,
    connects: AtomicU64,
}

impl UplinkStats {
    pub fn up(&self) {
        self.connected.store(true, Ordering::Relaxed);
        self.since_ms.store(now_ms(), Ordering::Relaxed);
        self.connects.fetch_add(1, Ordering::Relaxed);
    }

    /// The connection failed (`error`) or was closed.
    pub fn down(&self, error: bool) {
        if self.connected.swap(false, Ordering::Relaxed) {
            self.since_ms.store(now_ms(), Ordering::Relaxed);
        }
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One message acknowledged by the broker.
    pub fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Connections made after the first.
    pub fn reconnects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed).saturating_sub(1)
    }
}

fn now_ms() -> u64 {
    ms_since_epoch(SystemTime::now())
}

/// The bus owners of the running config, replaced on SIGHUP.
pub struct FieldView {
    pub config: Arc<Config>,
    pub buses: Vec<BusHandle>,
}

impl FieldView {
    pub fn bus(&self, name: &str) -> Option<&BusHandle> {
        self.buses.iter().find(|b| b.stats.name == name)
    }

    /// A device's config and its bus owner's view of it.
    pub fn device(&self, name: &str) -> Option<(&Device, Option<DeviceStatus>)> {
        let device = self.config.device(name)?;
        let status = self.bus(&device.bus).and_then(|bus| {
            bus.devices
                .borrow()
                .iter()
                .find(|d| d.name == name)
                .cloned()
        });
        Some((device, status))
    }
}

/// Everything the API reads, shared by its handlers.
pub struct Live {
    pub gateway: String,
    pub data_dir: PathBuf,
    started: Instant,
    field: watch::Receiver<Arc<FieldView>>,
    pub outbox: Outbox,
    pub uplink: Arc<UplinkStats>,
    pub metrics: ModbusMetrics,
    /// The config's profile search path, for `scan` with identify.
    pub profiles: Library,
}

impl Live {
    pub fn new(
        config: &Config,
        field: watch::Receiver<Arc<FieldView>>,
        outbox: Outbox,
        uplink: Arc<UplinkStats>,
        metrics: ModbusMetrics,
    ) -> Self {
        Self {
            gateway: config.gateway.id.clone(),
            data_dir: config.gateway.data_dir.clone(),
            started: Instant::now(),
            field,
            outbox,
            uplink,
            metrics,
            profiles: Library::new(config.gateway.profile_dir.as_deref()),
        }
    }

    pub fn field(&self) -> Arc<FieldView> {
        self.field.borrow().clone()
    }

    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// `GET /api/v1/status` (SPEC §10), plus `data_dir`, by which the CLI
    /// tells its own daemon from another one; `with_values` adds each
    /// device's last values (the console's overview).
    pub fn status(&self, with_values: bool) -> Json {
        let field = self.field();
        let outbox = self.outbox.stats();
        let uplink = &self.uplink;
        let since = uplink.since_ms.load(Ordering::Relaxed);
        let buses: Vec<Json> = field
            .buses
            .iter()
            .map(|bus| {
                let counts = bus.stats.counts();
                json!({
                    "name": bus.stats.name,
                    "transport": bus.stats.transport,
                    "connected": counts.connected,
                    "requests": counts.requests,
                    "timeouts": counts.timeouts,
                    "errors": counts.errors,
                    "busy_ratio": (counts.busy_ratio * 1000.0).round() / 1000.0,
                })
            })
            .collect();
        let devices: Vec<Json> = field
            .config
            .devices
            .iter()
            .filter_map(|d| field.device(&d.name))
            .map(|(device, status)| {
                let mut out = device_json(device, status.as_ref());
                if with_values {
                    let values = status.map(|s| values_json(&s.values)).unwrap_or_default();
                    out["values"] = Json::Object(values);
                }
                out
            })
            .collect();
        json!({
            "gateway": self.gateway,
            "version": env!("CARGO_PKG_VERSION"),
            "data_dir": self.data_dir,
            "uptime_s": self.uptime_s(),
            "uplink": {
                "connected": uplink.connected(),
                "since_ms": (since > 0).then_some(since),
                "published": uplink.published.load(Ordering::Relaxed),
                "errors": uplink.errors.load(Ordering::Relaxed),
            },
            "outbox": {
                "messages": outbox.messages,
                "bytes": outbox.bytes,
                "max_bytes": outbox.max_bytes,
                "oldest_ms": outbox.oldest_ms,
                "dropped": outbox.dropped,
            },
            "buses": buses,
            "devices": devices,
        })
    }

    /// `GET /api/v1/devices/<name>`: the device, its last values, and its
    /// points (what the console's write form offers).
    pub fn device(&self, name: &str) -> Option<Json> {
        let field = self.field();
        let (device, status) = field.device(name)?;
        let mut out = device_json(device, status.as_ref());
        let values = status.map(|s| values_json(&s.values)).unwrap_or_default();
        out["values"] = Json::Object(values);
        out["points"] = device
            .points
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "area": p.area.to_string(),
                    "address": p.address,
                    "type": p.kind.to_string(),
                    "unit": p.unit,
                    "writable": p.writable,
                    "min": p.min,
                    "max": p.max,
                })
            })
            .collect();
        Some(out)
    }

    /// The gateway's health as `[platform] stats` publishes it on
    /// ThingsCloud: attribute name → value.
    pub fn stats_attributes(&self) -> Map<String, Json> {
        let field = self.field();
        let (mut online, mut total, mut errors) = (0u64, 0u64, 0u64);
        for bus in &field.buses {
            let counts = bus.stats.counts();
            errors += counts.timeouts + counts.errors;
            for device in bus.devices.borrow().iter() {
                total += 1;
                online += u64::from(device.online == Some(true));
            }
        }
        let outbox = self.outbox.stats();
        let mut out = Map::new();
        for (name, value) in [
            ("fieldgate_uptime_s", self.uptime_s()),
            ("fieldgate_devices_online", online),
            ("fieldgate_devices_total", total),
            ("fieldgate_outbox_messages", outbox.messages),
            ("fieldgate_outbox_dropped", outbox.dropped),
            ("fieldgate_modbus_errors", errors),
            ("fieldgate_uplink_reconnects", self.uplink.reconnects()),
        ] {
            out.insert(name.to_string(), value.into());
        }
        out
    }

    /// `GET /metrics` in the Prometheus text format (0.0.4). The gauges are
    /// taken now; the Modbus counters are the buses' own.
    pub fn metrics_text(&self) -> String {
        let field = self.field();
        let mut registry = Registry::default();
        registry.register(
            "fieldgate_modbus_requests",
            "Modbus transaction attempts by bus, device and outcome",
            self.metrics.requests.clone(),
        );
        registry.register(
            "fieldgate_modbus_request_seconds",
            "Duration of Modbus transaction attempts",
            self.metrics.seconds.clone(),
        );
        let busy =
            Family::<Vec<(String, String)>, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let online = Family::<Vec<(String, String)>, Gauge>::default();
        let trace_lost = Family::<Vec<(String, String)>, Counter>::default();
        for bus in &field.buses {
            let label = vec![("bus".to_string(), bus.stats.name.clone())];
            busy.get_or_create(&label)
                .set(bus.stats.counts().busy_ratio);
            trace_lost
                .get_or_create(&label)
                .inc_by(bus.stats.trace_lost());
            for device in bus.devices.borrow().iter() {
                online
                    .get_or_create(&vec![("device".to_string(), device.name.clone())])
                    .set(i64::from(device.online == Some(true)));
            }
        }
        registry.register(
            "fieldgate_bus_busy_ratio",
            "Fraction of the last 10 s the bus spent in transactions",
            busy,
        );
        registry.register(
            "fieldgate_device_online",
            "1 when the device answered its last poll",
            online,
        );
        registry.register(
            "fieldgate_trace_dropped",
            "Trace events a slow trace watcher missed",
            trace_lost,
        );
        let outbox = self.outbox.stats();
        let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(value).unwrap_or(i64::MAX));
            registry.register(name, help, g);
        };
        let counter = |registry: &mut Registry, name: &str, help: &str, value: u64| {
            let c = Counter::<u64>::default();
            c.inc_by(value);
            registry.register(name, help, c);
        };
        gauge(
            &mut registry,
            "fieldgate_outbox_messages",
            "Messages held in the outbox",
            outbox.messages,
        );
        gauge(
            &mut registry,
            "fieldgate_outbox_bytes",
            "Bytes held in the outbox",
            outbox.bytes,
        );
        counter(
            &mut registry,
            "fieldgate_outbox_dropped",
            "Messages dropped because the outbox was full",
            outbox.dropped,
        );
        gauge(
            &mut registry,
            "fieldgate_mqtt_connected",
            "1 while connected to the broker",
            u64::from(self.uplink.connected()),
        );
        counter(
            &mut registry,
            "fieldgate_mqtt_published",
            "Messages the broker acknowledged",
            self.uplink.published.load(Ordering::Relaxed),
        );
        gauge(
            &mut registry,
            "fieldgate_uptime_seconds",
            "Seconds since the daemon started",
            self.uptime_s(),
        );
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
            log::error!(target: "api", "encoding metrics: {e}");
        }
        text
    }
}

/// A device entry of the status.
fn device_json(device: &Device, status: Option<&DeviceStatus>) -> Json {
    json!({
        "name": device.name,
        "bus": device.bus,
        "unit": device.unit.get(),
        "key": device.key,
        "online": status.is_some_and(|s| s.online == Some(true)),
        "last_ok_ms": status.and_then(|s| s.last_ok_ms),
        "failures": status.map_or(0, |s| s.failures),
    })
}

/// `values` of a device: point → {value, raw, unit, ts_ms}.
pub fn values_json(reads: &[crate::poll::PointRead]) -> Map<String, Json> {
    reads
        .iter()
        .map(|r| {
            let mut entry = json!({
                "value": r.value,
                "raw": r.raw,
                "unit": r.unit,
                "ts_ms": r.ts_ms,
            });
            if let Some(error) = &r.error {
                entry["error"] = error.as_str().into();
            }
            (r.name.clone(), entry)
        })
        .collect()
}

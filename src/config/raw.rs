//! The TOML file as written, with source spans, and its conversion into the
//! validated model. Every rule of SPEC §3 is enforced here, once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::error::Violation;
use super::model::*;
use super::profile::{Library, LoadError};

type Result<T> = std::result::Result<T, Violation>;

fn violation<T>(span: Range<usize>, message: impl Into<String>) -> Result<T> {
    Err(Violation {
        span,
        message: message.into(),
        cause: None,
    })
}

/// A duration written as `"250ms"`, `"5s"`, `"1m"`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dur(pub(super) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write e.g. \"250ms\", \"5s\", \"1m\""
            ))
        })
    }
}

/// A size written as `"64MiB"`, `"500kB"`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Size(pub(super) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid size {text:?} ({e}); write e.g. \"64MiB\""
                ))
            })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    gateway: RawGateway,
    platform: Option<Spanned<RawPlatform>>,
    #[serde(default)]
    buffer: RawBuffer,
    #[serde(default, rename = "bus")]
    buses: Vec<Spanned<RawBus>>,
    #[serde(default, rename = "device")]
    devices: Vec<Spanned<RawDevice>>,
    #[serde(default, rename = "command")]
    commands: Vec<Spanned<RawCommand>>,
    #[serde(default, rename = "stream")]
    streams: Vec<Spanned<RawStream>>,
    api: Option<Spanned<RawApi>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: Spanned<String>,
    data_dir: Option<PathBuf>,
    profile_dir: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum RawProfile {
    Thingscloud,
    Generic,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlatform {
    profile: Option<RawProfile>,
    host: Spanned<String>,
    port: Option<Spanned<i64>>,
    tls: Option<Spanned<bool>>,
    ca_file: Option<Spanned<PathBuf>>,
    access_token: Option<Spanned<String>>,
    project_key: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    topic_prefix: Option<Spanned<String>>,
    keep_alive: Option<Spanned<Dur>>,
    max_publish_rate: Option<Spanned<f64>>,
    stats: Option<Spanned<Dur>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    max_bytes: Option<Spanned<Size>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBus {
    name: Spanned<String>,
    #[serde(default)]
    transport: RawTransport,
    port: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    registration: Option<Spanned<String>>,
    heartbeat: Option<Spanned<String>>,
    #[serde(default = "default_baud")]
    baud: Spanned<u32>,
    #[serde(default)]
    parity: RawParity,
    data_bits: Option<Spanned<u8>>,
    stop_bits: Option<Spanned<u8>>,
    timeout: Option<Spanned<Dur>>,
    #[serde(default = "default_retries")]
    retries: Spanned<u32>,
    delay: Option<Spanned<Dur>>,
    #[serde(default)]
    mode: RawMode,
}

fn default_baud() -> Spanned<u32> {
    Spanned::new(0..0, 9600)
}

fn default_retries() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawParity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "snake_case")]
enum RawTransport {
    #[default]
    Serial,
    Tcp,
    RtuOverTcp,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum RawMode {
    #[default]
    Rtu,
    Transparent,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum RawReport {
    #[default]
    Always,
    Change,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    name: Spanned<String>,
    bus: Spanned<String>,
    unit: Spanned<i64>,
    poll: Option<Spanned<Dur>>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    report: RawReport,
    heartbeat: Option<Spanned<Dur>>,
    timeout: Option<Spanned<Dur>>,
    profile: Option<Spanned<String>>,
    /// With `profile`: only these of its points.
    #[serde(rename = "points")]
    only: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default, rename = "point")]
    points: Vec<Spanned<RawPoint>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum RawArea {
    Coil,
    Discrete,
    Input,
    Holding,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum RawType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    String,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "UPPERCASE")]
enum RawOrder {
    Abcd,
    Dcba,
    Badc,
    Cdab,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoint {
    name: Spanned<String>,
    area: RawArea,
    address: Spanned<i64>,
    #[serde(rename = "type")]
    kind: Spanned<RawType>,
    order: Option<Spanned<RawOrder>>,
    scale: Option<Spanned<f64>>,
    offset: Option<Spanned<f64>>,
    bit: Option<Spanned<i64>>,
    length: Option<Spanned<i64>>,
    unit: Option<String>,
    writable: Option<Spanned<bool>>,
    min: Option<Spanned<f64>>,
    max: Option<Spanned<f64>>,
    deadband: Option<Spanned<f64>>,
    labels: Option<Spanned<std::collections::BTreeMap<String, Spanned<String>>>>,
    alarm: Option<Spanned<RawAlarm>>,
    poll: Option<Spanned<Dur>>,
    sim: Option<Spanned<RawSim>>,
}

/// `sim = { min = …, max = … }`: the range `simulate` serves a point in.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawSim {
    min: f64,
    max: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlarm {
    above: Option<Spanned<f64>>,
    below: Option<Spanned<f64>>,
    hysteresis: Option<Spanned<f64>>,
    after: Option<Spanned<Dur>>,
    when: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    name: Spanned<String>,
    device: Spanned<String>,
    write: Vec<Spanned<RawCommandWrite>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommandWrite {
    point: Spanned<String>,
    value: Spanned<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    name: Spanned<String>,
    bus: Spanned<String>,
    #[serde(default)]
    encoding: RawEncoding,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawEncoding {
    #[default]
    Binary,
    Hex,
}

/// `[A-Za-z0-9_-]+`: gateway ids, bus/device/command/stream names.
fn check_name(name: &Spanned<String>, what: &str) -> Result<String> {
    let ok = !name.get_ref().is_empty()
        && name
            .get_ref()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(name.get_ref().clone())
    } else {
        violation(
            name.span(),
            format!(
                "{what} {:?} may only contain letters, digits, '_' and '-'",
                name.get_ref()
            ),
        )
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: attribute identifiers.
fn check_identifier(name: &Spanned<String>) -> Result<String> {
    let text = name.get_ref();
    let mut chars = text.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(text.clone())
    } else {
        violation(
            name.span(),
            format!("point name {text:?} must match [A-Za-z_][A-Za-z0-9_]* (it is the attribute identifier)"),
        )
    }
}

/// Longest poll interval and heartbeat: a day.
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Longest response timeout and inter-transaction delay.
const MAX_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_DELAY: Duration = Duration::from_secs(10);
/// MQTT keep-alive is a 16-bit number of seconds.
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(65_535);
/// `[platform] stats` at most once a day.
const MAX_STATS: Duration = Duration::from_secs(86_400);

/// A duration longer than 0 and at most `max`: every later computation on
/// it (deadlines, backoff multiples) stays far from overflow.
fn positive(d: &Spanned<Dur>, what: &str, max: Duration) -> Result<Duration> {
    let value = d.get_ref().0;
    if value.is_zero() {
        violation(d.span(), format!("{what} must be longer than 0"))
    } else if value > max {
        violation(
            d.span(),
            format!("{what} must be at most {}", humantime::format_duration(max)),
        )
    } else {
        Ok(value)
    }
}

/// Remembers the first span of each name and rejects a second one.
struct Unique<'a> {
    what: &'a str,
    seen: HashSet<String>,
}

impl<'a> Unique<'a> {
    fn new(what: &'a str) -> Self {
        Self {
            what,
            seen: HashSet::new(),
        }
    }

    fn insert(&mut self, name: &Spanned<String>, scope: &str) -> Result<()> {
        if self.seen.insert(name.get_ref().clone()) {
            Ok(())
        } else {
            violation(
                name.span(),
                format!("duplicate {} {:?}{scope}", self.what, name.get_ref()),
            )
        }
    }
}

impl RawConfig {
    /// `[gateway] profile_dir`, searched first for device profiles.
    pub(super) fn profile_dir(&self) -> Option<&std::path::Path> {
        self.gateway
            .profile_dir
            .as_ref()
            .map(|d| d.get_ref().as_path())
    }

    pub(super) fn into_config(self, library: &Library) -> Result<Config> {
        let raw_gateway = self.gateway;
        if let Some(dir) = &raw_gateway.profile_dir {
            if !dir.get_ref().is_dir() {
                return violation(
                    dir.span(),
                    format!(
                        "profile_dir {} is not a directory",
                        crate::text::quote(&dir.get_ref().display().to_string())
                    ),
                );
            }
        }
        let gateway = Gateway {
            id: check_name(&raw_gateway.id, "gateway id")?,
            data_dir: raw_gateway
                .data_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/fieldgate")),
            profile_dir: raw_gateway.profile_dir.map(Spanned::into_inner),
        };
        let platform = self
            .platform
            .map(|p| convert_platform(p, &gateway.id))
            .transpose()?;
        let buffer = Buffer {
            max_bytes: match self.buffer.max_bytes {
                Some(s) if s.get_ref().0 < 4096 => {
                    return violation(s.span(), "buffer.max_bytes must be at least 4KiB")
                }
                Some(s) => s.get_ref().0,
                None => 64 * 1024 * 1024,
            },
        };

        let mut bus_names = Unique::new("bus");
        let mut bus_ports = Unique::new("port");
        let mut bus_addresses = Unique::new("address");
        // Buses on one `listen`, told apart by registration.
        let mut listens: HashMap<SocketAddr, Vec<Option<Vec<u8>>>> = HashMap::new();
        let mut buses = Vec::new();
        for raw in self.buses {
            let span = raw.span();
            let raw = raw.into_inner();
            bus_names.insert(&raw.name, "")?;
            if let Some(port) = &raw.port {
                bus_ports.insert(port, ": two buses cannot share a serial port")?;
            }
            if let Some(address) = &raw.address {
                bus_addresses.insert(
                    address,
                    ": two buses cannot share one connection (put both devices on one bus)",
                )?;
            }
            let bus = convert_bus(raw, span.clone())?;
            if let Transport::DialIn {
                listen,
                registration,
                ..
            } = &bus.transport
            {
                let shared = listens.entry(*listen).or_default();
                if !shared.is_empty()
                    && (registration.is_none()
                        || shared.iter().any(|r| r.is_none() || r == registration))
                {
                    return violation(
                        span,
                        format!("bus {:?} shares listen {listen} with another bus: buses on one listen need a registration each, all different", bus.name),
                    );
                }
                shared.push(registration.clone());
            }
            buses.push(bus);
        }

        let mut device_names = Unique::new("device");
        // Attribute names per platform device: `None` is the gateway itself.
        let mut attributes: HashMap<Option<String>, HashSet<String>> = HashMap::new();
        // Forty meters of one model read its profile once.
        let mut profiles: HashMap<String, Arc<DeviceProfile>> = HashMap::new();
        let mut devices = Vec::new();
        for raw in self.devices {
            device_names.insert(&raw.get_ref().name, "")?;
            let (device, names) = convert_device(raw, &buses, library, &mut profiles)?;
            let seen = attributes.entry(device.key.clone()).or_default();
            for (name, span) in names {
                if !seen.insert(name.clone()) {
                    return violation(
                        span,
                        format!(
                            "attribute {name:?} is already defined by another device reporting to {}",
                            match &device.key {
                                Some(k) => format!("sub-device key {k:?}"),
                                None => "the gateway itself (no key)".to_string(),
                            }
                        ),
                    );
                }
            }
            devices.push(device);
        }

        let mut command_names = Unique::new("command");
        let mut commands = Vec::new();
        for raw in self.commands {
            command_names.insert(&raw.get_ref().name, "")?;
            commands.push(convert_command(raw.into_inner(), &devices)?);
        }

        let mut stream_names = Unique::new("stream");
        let mut streams = Vec::new();
        for raw in self.streams {
            let raw = raw.into_inner();
            stream_names.insert(&raw.name, "")?;
            if !buses.iter().any(|b| &b.name == raw.bus.get_ref()) {
                return violation(
                    raw.bus.span(),
                    format!("stream refers to unknown bus {:?}", raw.bus.get_ref()),
                );
            }
            streams.push(Stream {
                name: check_name(&raw.name, "stream name")?,
                bus: raw.bus.into_inner(),
                encoding: match raw.encoding {
                    RawEncoding::Binary => Encoding::Binary,
                    RawEncoding::Hex => Encoding::Hex,
                },
            });
        }

        Ok(Config {
            api: convert_api(self.api)?,
            gateway,
            platform,
            buffer,
            buses,
            devices,
            commands,
            streams,
        })
    }
}

fn convert_platform(raw: Spanned<RawPlatform>, gateway_id: &str) -> Result<Platform> {
    let span = raw.span();
    let raw = raw.into_inner();
    let profile_kind = raw.profile.unwrap_or(RawProfile::Thingscloud);
    let profile = match profile_kind {
        RawProfile::Thingscloud => {
            for (field, name) in [
                (&raw.username, "username"),
                (&raw.password, "password"),
                (&raw.topic_prefix, "topic_prefix"),
            ] {
                if let Some(f) = field {
                    return violation(
                        f.span(),
                        format!("{name} belongs to the generic profile; ThingsCloud uses access_token and project_key"),
                    );
                }
            }
            let need = |f: Option<Spanned<String>>, name: &str| {
                match f {
                Some(v) if !v.get_ref().is_empty() => Ok(v.into_inner()),
                Some(v) => violation(v.span(), format!("{name} must not be empty")),
                None => violation(
                    span.clone(),
                    format!("the thingscloud profile needs {name} (from the device's certificate in the ThingsCloud console)"),
                ),
            }
            };
            Profile::ThingsCloud {
                access_token: need(raw.access_token, "access_token")?,
                project_key: need(raw.project_key, "project_key")?,
            }
        }
        RawProfile::Generic => {
            for (field, name) in [
                (&raw.access_token, "access_token"),
                (&raw.project_key, "project_key"),
            ] {
                if let Some(f) = field {
                    return violation(
                        f.span(),
                        format!("{name} belongs to the thingscloud profile; the generic profile uses username and password"),
                    );
                }
            }
            let topic_prefix = match raw.topic_prefix {
                Some(p) => {
                    let text = p.get_ref().trim_end_matches('/');
                    if text.is_empty() || text.contains(['#', '+']) {
                        return violation(
                            p.span(),
                            "topic_prefix must be a non-empty topic without wildcards",
                        );
                    }
                    text.to_string()
                }
                None => format!("fieldgate/{gateway_id}"),
            };
            Profile::Generic {
                username: raw.username.map(Spanned::into_inner),
                password: raw.password.map(Spanned::into_inner),
                topic_prefix,
            }
        }
    };
    let tls_on = raw.tls.as_ref().is_some_and(|t| *t.get_ref());
    let port = match raw.port {
        Some(p) => u16::try_from(*p.get_ref())
            .ok()
            .filter(|&p| p != 0)
            .map_or_else(|| violation(p.span(), "port must be 1..65535"), Ok)?,
        None if tls_on => 8883,
        None => 1883,
    };
    if raw.host.get_ref().trim().is_empty() {
        return violation(raw.host.span(), "host must not be empty");
    }
    let tls = match (&raw.tls, raw.ca_file) {
        (Some(on), ca) if *on.get_ref() => {
            let span = ca.as_ref().map_or_else(|| on.span(), Spanned::span);
            let ca = ca.map(Spanned::into_inner);
            Some(Tls::load(ca.as_deref()).or_else(|e| violation(span, e))?)
        }
        (_, Some(ca)) => return violation(ca.span(), "ca_file is only used with tls = true"),
        (_, None) => None,
    };
    let max_publish_rate = match raw.max_publish_rate {
        Some(r) if !r.get_ref().is_finite() || *r.get_ref() < 0.0 => {
            return violation(
                r.span(),
                "max_publish_rate must be a number >= 0 (0 = no cap)",
            )
        }
        Some(r) if *r.get_ref() == 0.0 => None,
        Some(r) => Some(*r.get_ref()),
        None if profile_kind == RawProfile::Thingscloud => Some(1.0),
        None => Some(100.0),
    };
    Ok(Platform {
        profile,
        host: raw.host.into_inner(),
        port,
        tls,
        keep_alive: match &raw.keep_alive {
            Some(k) => positive(k, "keep_alive", MAX_KEEP_ALIVE)?,
            None => Duration::from_secs(60),
        },
        max_publish_rate,
        stats: match &raw.stats {
            Some(d) if d.get_ref().0.is_zero() => None,
            Some(d) => Some(positive(d, "stats", MAX_STATS)?),
            None => None,
        },
    })
}

/// `[api]`: where the local API listens, and its token. A listen address
/// beyond loopback without a token would open writes to the network.
fn convert_api(raw: Option<Spanned<RawApi>>) -> Result<Api> {
    let Some(raw) = raw else {
        return Ok(Api::default());
    };
    let span = raw.span();
    let raw = raw.into_inner();
    let token = match raw.token {
        Some(t) if t.get_ref().trim().is_empty() => {
            return violation(t.span(), "token must not be empty (leave it out for none)")
        }
        // It travels in an HTTP header and the console's cookie.
        Some(t)
            if !t
                .get_ref()
                .chars()
                .all(|c| c.is_ascii_graphic() && !matches!(c, ';' | ',' | '"' | '\\')) =>
        {
            return violation(
                t.span(),
                "token may use printable ASCII except ; , \" and \\ (no spaces)",
            )
        }
        Some(t) => Some(t.into_inner()),
        None => None,
    };
    let listen = match &raw.listen {
        Some(l) if l.get_ref().is_empty() => None,
        Some(l) => Some(l.get_ref().parse::<SocketAddr>().or_else(|_| {
            violation(
                l.span(),
                format!(
                    "listen {:?} is not an address:port (e.g. \"127.0.0.1:8480\"; \"\" turns the API off)",
                    l.get_ref()
                ),
            )
        })?),
        None => Some(Api::default_listen()),
    };
    if let Some(listen) = listen {
        if !listen.ip().is_loopback() && token.is_none() {
            let at = raw.listen.as_ref().map_or(span, Spanned::span);
            return violation(
                at,
                format!("the API listens on {listen}, beyond loopback: set [api] token, or listen on 127.0.0.1 and use an SSH tunnel"),
            );
        }
    }
    Ok(Api { listen, token })
}

/// `registration`/`heartbeat` text: bytes as written, or `hex:0A0B…`.
fn packet(text: &Spanned<String>, what: &str) -> Result<Vec<u8>> {
    let value = text.get_ref();
    let bytes = match value.strip_prefix("hex:") {
        Some(hex) => {
            let digits: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
            if digits.is_empty() || digits.len() % 2 != 0 {
                return violation(
                    text.span(),
                    format!("{what} hex: needs an even number of hex digits"),
                );
            }
            (0..digits.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(digits.get(i..i + 2).unwrap_or("zz"), 16))
                .collect::<std::result::Result<Vec<u8>, _>>()
                .or_else(|_| violation(text.span(), format!("{what}: not hex digits after hex:")))?
        }
        None => value.as_bytes().to_vec(),
    };
    if bytes.is_empty() || bytes.len() > 256 {
        return violation(text.span(), format!("{what} must be 1..256 bytes"));
    }
    Ok(bytes)
}

/// `host:port` of a TCP peer, checked as far as it can be without DNS.
fn tcp_address(address: &Spanned<String>) -> Result<String> {
    let text = address.get_ref().trim();
    let ok = text
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if ok {
        Ok(text.to_string())
    } else {
        violation(
            address.span(),
            "address must be host:port, such as \"192.168.1.50:502\"",
        )
    }
}

/// Where a bus's bytes go, from the transport keys (SPEC §3, §9).
fn convert_transport(raw: &RawBus, span: Range<usize>) -> Result<(Transport, String)> {
    let forbid = |field: &Option<Spanned<String>>, why: &str| match field {
        Some(f) => violation(f.span(), why.to_string()),
        None => Ok(()),
    };
    if raw.transport != RawTransport::RtuOverTcp {
        forbid(
            &raw.listen,
            "listen is for dial-in DTUs: transport = \"rtu_over_tcp\"",
        )?;
        forbid(
            &raw.heartbeat,
            "heartbeat is for transport = \"rtu_over_tcp\"",
        )?;
    }
    if raw.listen.is_none() {
        forbid(
            &raw.registration,
            "registration belongs with listen (a dial-in DTU)",
        )?;
    }
    match raw.transport {
        RawTransport::Serial => {
            forbid(
                &raw.address,
                "address is for transport = \"tcp\" or \"rtu_over_tcp\"; a serial bus has a port",
            )?;
            let Some(port) = &raw.port else {
                return violation(span, "a serial bus needs port (such as \"/dev/ttyUSB0\"), or a transport with address");
            };
            Ok((Transport::Serial, port.get_ref().clone()))
        }
        RawTransport::Tcp | RawTransport::RtuOverTcp => {
            forbid(
                &raw.port,
                "port is the serial device of a serial bus; a TCP bus has address (or listen)",
            )?;
            let tcp = raw.transport == RawTransport::Tcp;
            if tcp {
                for (field, name) in [(&raw.data_bits, "data_bits"), (&raw.stop_bits, "stop_bits")]
                {
                    if let Some(f) = field {
                        return violation(
                            f.span(),
                            format!("{name} is a serial line setting; a tcp bus has none"),
                        );
                    }
                }
                if raw.baud.span() != (0..0) {
                    return violation(raw.baud.span(), "baud is a serial line setting; a tcp bus has none (rtu_over_tcp uses it for wire time)");
                }
                if raw.mode == RawMode::Transparent {
                    return violation(span, "mode = \"transparent\" carries raw bytes: use transport = \"rtu_over_tcp\"");
                }
            }
            match (&raw.address, &raw.listen) {
                (Some(address), None) => {
                    let address = tcp_address(address)?;
                    let heartbeat = raw
                        .heartbeat
                        .as_ref()
                        .map(|h| packet(h, "heartbeat"))
                        .transpose()?;
                    Ok(if tcp {
                        (
                            Transport::Tcp {
                                address: address.clone(),
                            },
                            address,
                        )
                    } else {
                        (
                            Transport::RtuOverTcp {
                                address: address.clone(),
                                heartbeat,
                            },
                            address,
                        )
                    })
                }
                (None, Some(listen)) => {
                    let Ok(addr) = listen.get_ref().trim().parse::<SocketAddr>() else {
                        return violation(
                            listen.span(),
                            "listen must be ip:port, such as \"0.0.0.0:9000\"",
                        );
                    };
                    let registration = raw
                        .registration
                        .as_ref()
                        .map(|r| packet(r, "registration"))
                        .transpose()?;
                    let heartbeat = raw
                        .heartbeat
                        .as_ref()
                        .map(|h| packet(h, "heartbeat"))
                        .transpose()?;
                    let shown = match &registration {
                        Some(r) => format!(
                            "listen {addr}, registration {}",
                            crate::text::quote(&String::from_utf8_lossy(r))
                        ),
                        None => format!("listen {addr}"),
                    };
                    Ok((
                        Transport::DialIn {
                            listen: addr,
                            registration,
                            heartbeat,
                        },
                        shown,
                    ))
                }
                (Some(_), Some(listen)) => violation(
                    listen.span(),
                    "a bus has address (we connect) or listen (the DTU connects), not both",
                ),
                (None, None) => violation(
                    span,
                    "a TCP bus needs address (host:port), or listen for a dial-in DTU",
                ),
            }
        }
    }
}

fn convert_parity(raw: RawParity) -> Parity {
    match raw {
        RawParity::None => Parity::None,
        RawParity::Even => Parity::Even,
        RawParity::Odd => Parity::Odd,
    }
}

fn convert_bus(raw: RawBus, span: Range<usize>) -> Result<Bus> {
    let name = check_name(&raw.name, "bus name")?;
    if !(300..=4_000_000).contains(raw.baud.get_ref()) {
        return violation(raw.baud.span(), "baud must be 300..4000000");
    }
    let (transport, port) = convert_transport(&raw, span)?;
    let data_bits = match raw.data_bits {
        Some(b) if !(5..=8).contains(b.get_ref()) => {
            return violation(b.span(), "data_bits must be 5, 6, 7 or 8")
        }
        Some(b) => *b.get_ref(),
        None => 8,
    };
    let stop_bits = match raw.stop_bits {
        Some(b) if !(1..=2).contains(b.get_ref()) => {
            return violation(b.span(), "stop_bits must be 1 or 2")
        }
        Some(b) => *b.get_ref(),
        None => 1,
    };
    let timeout = match &raw.timeout {
        Some(t) => positive(t, "timeout", MAX_TIMEOUT)?,
        None if transport == Transport::Serial => Duration::from_millis(500),
        // Two hops (network and the serial side behind it).
        None => Duration::from_secs(1),
    };
    let delay = match &raw.delay {
        Some(d) if d.get_ref().0 > MAX_DELAY => {
            return violation(d.span(), "delay must be at most 10s")
        }
        Some(d) => d.get_ref().0,
        None => Duration::ZERO,
    };
    Ok(Bus {
        name,
        transport,
        port,
        baud: *raw.baud.get_ref(),
        parity: convert_parity(raw.parity),
        data_bits,
        stop_bits,
        timeout,
        retries: match raw.retries {
            r if *r.get_ref() > 10 => return violation(r.span(), "retries must be 0..10"),
            r => r.into_inner(),
        },
        delay,
        mode: match raw.mode {
            RawMode::Rtu => BusMode::Rtu,
            RawMode::Transparent => BusMode::Transparent,
        },
    })
}

/// A device and, for the attribute rule, each of its point names with the
/// place that defines it (its own point, or its `profile` value).
type DeviceAndNames = (Device, Vec<(String, Range<usize>)>);

fn convert_device(
    raw: Spanned<RawDevice>,
    buses: &[Bus],
    library: &Library,
    profiles: &mut HashMap<String, Arc<DeviceProfile>>,
) -> Result<DeviceAndNames> {
    let raw = raw.into_inner();
    let name = check_name(&raw.name, "device name")?;
    let Some(bus) = buses.iter().find(|b| &b.name == raw.bus.get_ref()) else {
        let known: Vec<&str> = buses.iter().map(|b| b.name.as_str()).collect();
        return violation(
            raw.bus.span(),
            format!(
                "device {name:?} refers to unknown bus {:?} (defined: {})",
                raw.bus.get_ref(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        );
    };
    if bus.mode == BusMode::Transparent {
        return violation(
            raw.bus.span(),
            format!(
                "bus {:?} is transparent; polled devices need an rtu bus",
                bus.name
            ),
        );
    }
    let unit = u8::try_from(*raw.unit.get_ref())
        .ok()
        .and_then(UnitId::new)
        .map_or_else(
            || {
                violation(
                    raw.unit.span(),
                    format!(
                        "unit {} is not a valid slave id (1..247)",
                        raw.unit.get_ref()
                    ),
                )
            },
            Ok,
        )?;
    let poll = match &raw.poll {
        Some(p) => positive(p, "poll", MAX_INTERVAL)?,
        None => Duration::from_secs(5),
    };
    let key = match raw.key {
        Some(k) if k.get_ref().is_empty() => {
            return violation(
                k.span(),
                "key must not be empty (leave it out for the gateway's own attributes)",
            )
        }
        Some(k) => Some(k.into_inner()),
        None => None,
    };
    let heartbeat = match &raw.heartbeat {
        Some(h) => positive(h, "heartbeat", MAX_INTERVAL)?,
        None => Duration::from_secs(300),
    };
    let report = match raw.report {
        RawReport::Always => Report::Always,
        RawReport::Change => Report::Change { heartbeat },
    };
    let timeout = raw
        .timeout
        .as_ref()
        .map(|t| positive(t, "timeout", MAX_TIMEOUT))
        .transpose()?;
    let profile = raw
        .profile
        .as_ref()
        .map(|p| profile_named(p, library, profiles))
        .transpose()?;
    let mut points = match (&profile, &raw.only) {
        (Some(profile), Some(only)) => select_points(profile, only)?,
        (Some(profile), None) => profile.points.clone(),
        (None, Some(only)) => {
            return violation(
                only.span(),
                "points chooses points of a profile; it needs profile = \"…\"",
            )
        }
        (None, None) => Vec::new(),
    };
    let profile_span = raw.profile.as_ref().map_or(0..0, Spanned::span);
    let mut names: Vec<(String, Range<usize>)> = points
        .iter()
        .map(|p| (p.name.clone(), profile_span.clone()))
        .collect();
    let mut point_names = Unique::new("point");
    for p in &raw.points {
        let point_name = &p.get_ref().name;
        if let Some(profile) = &profile {
            if points.iter().any(|q| &q.name == point_name.get_ref()) {
                return violation(
                    point_name.span(),
                    format!(
                        "point {:?} is already defined by profile {:?} (leave it out of the profile's with points = […] to define it here)",
                        point_name.get_ref(),
                        profile.name
                    ),
                );
            }
        }
        point_names.insert(point_name, &format!(" in device {name:?}"))?;
        names.push((point_name.get_ref().clone(), point_name.span()));
    }
    for p in &raw.points {
        points.push(convert_point(p)?);
    }
    if points.is_empty() {
        return violation(
            raw.name.span(),
            format!("device {name:?} has no points: give it a profile or [[device.point]]s"),
        );
    }
    Ok((
        Device {
            name,
            bus: bus.name.clone(),
            unit,
            poll,
            key,
            report,
            timeout,
            points,
            profile,
        },
        names,
    ))
}

/// The profile `name`, read once per config.
fn profile_named(
    name: &Spanned<String>,
    library: &Library,
    cache: &mut HashMap<String, Arc<DeviceProfile>>,
) -> Result<Arc<DeviceProfile>> {
    let text = check_name(name, "profile name")?;
    if let Some(profile) = cache.get(&text) {
        return Ok(profile.clone());
    }
    match library.load(&text) {
        Ok(profile) => {
            let profile = Arc::new(profile);
            cache.insert(text, profile.clone());
            Ok(profile)
        }
        Err(LoadError::NotFound) => violation(
            name.span(),
            format!(
                "no profile {text:?} (searched {}; `fieldgate profiles` lists them)",
                library.describe()
            ),
        ),
        Err(LoadError::Broken(error)) => Err(Violation {
            span: name.span(),
            message: format!("profile {text:?} is used here"),
            cause: Some(Box::new(error)),
        }),
    }
}

/// `points = [...]`: the named points of `profile`, in the profile's order.
fn select_points(
    profile: &DeviceProfile,
    only: &Spanned<Vec<Spanned<String>>>,
) -> Result<Vec<Point>> {
    if only.get_ref().is_empty() {
        return violation(
            only.span(),
            "points is empty (leave it out for all of the profile's points)",
        );
    }
    let mut seen = Unique::new("point");
    for name in only.get_ref() {
        seen.insert(name, " in points")?;
        if !profile.points.iter().any(|p| &p.name == name.get_ref()) {
            let known: Vec<&str> = profile.points.iter().map(|p| p.name.as_str()).collect();
            return violation(
                name.span(),
                format!(
                    "profile {:?} has no point {:?} (it has: {})",
                    profile.name,
                    name.get_ref(),
                    known.join(", ")
                ),
            );
        }
    }
    Ok(profile
        .points
        .iter()
        .filter(|p| only.get_ref().iter().any(|n| n.get_ref() == &p.name))
        .cloned()
        .collect())
}

fn convert_point(raw: &Spanned<RawPoint>) -> Result<Point> {
    let raw = raw.get_ref();
    let name = check_identifier(&raw.name)?;
    let area = match raw.area {
        RawArea::Coil => Area::Coil,
        RawArea::Discrete => Area::Discrete,
        RawArea::Input => Area::Input,
        RawArea::Holding => Area::Holding,
    };
    let ty = *raw.kind.get_ref();
    let address = u16::try_from(*raw.address.get_ref()).map_or_else(
        |_| {
            violation(
                raw.address.span(),
                format!(
                    "address {} is outside 0..65535 (addresses are 0-based protocol addresses)",
                    raw.address.get_ref()
                ),
            )
        },
        Ok,
    )?;
    if area.is_bits() && ty != RawType::Bool {
        return violation(
            raw.kind.span(),
            format!("{} holds one bit; its type must be \"bool\"", area.noun()),
        );
    }
    if let Some(bit) = &raw.bit {
        if area.is_bits() {
            return violation(
                bit.span(),
                format!(
                    "bit selects a bit of a register; {} is already a single bit",
                    area.noun()
                ),
            );
        }
        if ty != RawType::Bool {
            return violation(bit.span(), "bit is only used with type = \"bool\"");
        }
    }
    if raw.length.is_some() && ty != RawType::String {
        if let Some(len) = &raw.length {
            return violation(len.span(), "length is only used with type = \"string\"");
        }
    }
    let kind = match ty {
        RawType::Bool if area.is_bits() => Kind::Bit,
        RawType::Bool => match &raw.bit {
            Some(bit) => match u8::try_from(*bit.get_ref()) {
                Ok(b) if b < 16 => Kind::RegisterBit(b),
                _ => return violation(bit.span(), "bit must be 0..15 (0 = least significant)"),
            },
            None => Kind::RegisterBool,
        },
        RawType::U16 => Kind::U16,
        RawType::I16 => Kind::I16,
        RawType::U32 => Kind::U32,
        RawType::I32 => Kind::I32,
        RawType::U64 => Kind::U64,
        RawType::I64 => Kind::I64,
        RawType::F32 => Kind::F32,
        RawType::F64 => Kind::F64,
        RawType::String => match &raw.length {
            Some(len) => match u16::try_from(*len.get_ref()) {
                Ok(l) if (1..=125).contains(&l) => Kind::String { len: l },
                _ => {
                    return violation(
                        len.span(),
                        "length must be 1..125 registers (two characters each)",
                    )
                }
            },
            None => return violation(raw.kind.span(), "a string point needs length = <registers>"),
        },
    };
    if u32::from(address) + u32::from(kind.width()) > 65536 {
        return violation(
            raw.address.span(),
            format!(
                "{name} occupies {} registers from address {address}, past the end of the address space (65535)",
                kind.width()
            ),
        );
    }
    let number = |f: &Option<Spanned<f64>>, what: &str, default: f64| -> Result<f64> {
        match f {
            Some(v) if !v.get_ref().is_finite() => {
                violation(v.span(), format!("{what} must be a finite number"))
            }
            Some(v) if kind.is_bool() || matches!(kind, Kind::String { .. }) => {
                violation(v.span(), format!("{what} only applies to numeric types"))
            }
            Some(v) => Ok(*v.get_ref()),
            None => Ok(default),
        }
    };
    let scale = number(&raw.scale, "scale", 1.0)?;
    if scale == 0.0 {
        if let Some(s) = &raw.scale {
            return violation(s.span(), "scale must not be 0");
        }
    }
    let offset = number(&raw.offset, "offset", 0.0)?;
    let deadband = number(&raw.deadband, "deadband", 0.0)?;
    if deadband < 0.0 {
        if let Some(d) = &raw.deadband {
            return violation(d.span(), "deadband must be >= 0");
        }
    }
    let writable = match &raw.writable {
        Some(w) if *w.get_ref() && !matches!(area, Area::Holding | Area::Coil) => {
            return violation(
                w.span(),
                format!(
                    "{} is read-only in Modbus; only holding registers and coils can be writable",
                    area.noun()
                ),
            )
        }
        Some(w) if *w.get_ref() && matches!(kind, Kind::String { .. }) => {
            return violation(w.span(), "string points cannot be written")
        }
        Some(w) => *w.get_ref(),
        None => false,
    };
    let min = number(&raw.min, "min", f64::NEG_INFINITY)?;
    let max = number(&raw.max, "max", f64::INFINITY)?;
    for bound in [&raw.min, &raw.max].into_iter().flatten() {
        if !writable {
            return violation(
                bound.span(),
                "min/max is the accepted range for writes; it needs writable = true",
            );
        }
    }
    if min > max {
        if let Some(m) = &raw.min {
            return violation(m.span(), "min is greater than max");
        }
    }
    let order = match raw.order.as_ref().map(|o| *o.get_ref()) {
        None | Some(RawOrder::Abcd) => Order::Abcd,
        Some(RawOrder::Dcba) => Order::Dcba,
        Some(RawOrder::Badc) => Order::Badc,
        Some(RawOrder::Cdab) => Order::Cdab,
    };
    if let Some(o) = &raw.order {
        if area.is_bits() {
            return violation(
                o.span(),
                format!("order has no meaning for {}", area.noun()),
            );
        }
    }
    let labels = match &raw.labels {
        Some(labels) => convert_labels(labels, kind, scale, offset)?,
        None => Vec::new(),
    };
    let alarm = raw
        .alarm
        .as_ref()
        .map(|a| convert_alarm(a, kind))
        .transpose()?;
    let sim = match &raw.sim {
        Some(sim) if kind.is_bool() || matches!(kind, Kind::String { .. }) => {
            return violation(sim.span(), "sim is a range for number points")
        }
        Some(sim) => {
            let RawSim { min, max } = *sim.get_ref();
            if !(min.is_finite() && max.is_finite() && min < max) {
                return violation(sim.span(), "sim needs finite min < max");
            }
            Some((min, max))
        }
        None => None,
    };
    Ok(Point {
        name,
        area,
        address,
        kind,
        order,
        scale,
        offset,
        unit: raw.unit.clone(),
        writable,
        min: raw.min.as_ref().map(|_| min),
        max: raw.max.as_ref().map(|_| max),
        deadband,
        labels,
        alarm,
        poll: raw
            .poll
            .as_ref()
            .map(|p| positive(p, "poll", MAX_INTERVAL))
            .transpose()?,
        sim,
    })
}

/// `labels = { 0 = "stopped", 1 = "running" }`: integer points reported as
/// integers (no scale or offset), each number and each label once.
fn convert_labels(
    raw: &Spanned<std::collections::BTreeMap<String, Spanned<String>>>,
    kind: Kind,
    scale: f64,
    offset: f64,
) -> Result<Vec<(i64, String)>> {
    let integer = matches!(
        kind,
        Kind::U16 | Kind::I16 | Kind::U32 | Kind::I32 | Kind::U64 | Kind::I64
    );
    if !integer || scale != 1.0 || offset != 0.0 {
        return violation(
            raw.span(),
            "labels name the values of an integer point (u16 … i64, without scale or offset)",
        );
    }
    if raw.get_ref().is_empty() {
        return violation(raw.span(), "labels is empty");
    }
    let mut out: Vec<(i64, String)> = Vec::new();
    for (number, label) in raw.get_ref() {
        let Ok(n) = number.trim().parse::<i64>() else {
            return violation(
                label.span(),
                format!("label key {number:?} is not an integer"),
            );
        };
        let text = label.get_ref().trim();
        if text.is_empty() || text.parse::<f64>().is_ok() {
            return violation(
                label.span(),
                "a label is a non-empty name, not a number (writes take either)",
            );
        }
        if out.iter().any(|(m, l)| *m == n || l == text) {
            return violation(
                label.span(),
                format!("label {text:?} or number {n} is given twice"),
            );
        }
        out.push((n, text.to_string()));
    }
    Ok(out)
}

/// `alarm`: thresholds on numbers, `when` on bools; `after` may be 0.
fn convert_alarm(raw: &Spanned<RawAlarm>, kind: Kind) -> Result<Alarm> {
    let span = raw.span();
    let raw = raw.get_ref();
    let after = match &raw.after {
        Some(a) if a.get_ref().0 > MAX_INTERVAL => {
            return violation(a.span(), "after must be at most 24h")
        }
        Some(a) => a.get_ref().0,
        None => Duration::ZERO,
    };
    let boolean = kind.is_bool();
    if let Some(when) = &raw.when {
        if !boolean {
            return violation(
                when.span(),
                "when is for bool points; numbers use above/below",
            );
        }
        if let Some(field) = [&raw.above, &raw.below, &raw.hysteresis]
            .into_iter()
            .flatten()
            .next()
        {
            return violation(
                field.span(),
                "above/below/hysteresis are for numbers; a bool alarm has when",
            );
        }
        return Ok(Alarm::When {
            when: *when.get_ref(),
            after,
        });
    }
    if boolean || matches!(kind, Kind::String { .. }) {
        return violation(
            span,
            "thresholds (above/below) are for number points; a bool alarm is { when = true }",
        );
    }
    let (above, below) = (
        raw.above.as_ref().map(|a| *a.get_ref()),
        raw.below.as_ref().map(|b| *b.get_ref()),
    );
    if above.is_none() && below.is_none() {
        return violation(
            span,
            "an alarm needs above, below (or both), or when for a bool",
        );
    }
    for bound in [&raw.above, &raw.below].into_iter().flatten() {
        if !bound.get_ref().is_finite() {
            return violation(bound.span(), "a threshold must be a finite number");
        }
    }
    if let (Some(a), Some(b), Some(at)) = (above, below, &raw.above) {
        if a <= b {
            return violation(at.span(), "above must be greater than below");
        }
    }
    let hysteresis = match &raw.hysteresis {
        Some(h) if !h.get_ref().is_finite() || *h.get_ref() < 0.0 => {
            return violation(h.span(), "hysteresis must be a number >= 0")
        }
        Some(h) => *h.get_ref(),
        None => 0.0,
    };
    if let (Some(a), Some(b), Some(h)) = (above, below, &raw.hysteresis) {
        if 2.0 * hysteresis >= a - b {
            return violation(
                h.span(),
                "hysteresis must be less than half the band between below and above",
            );
        }
    }
    Ok(Alarm::Range {
        above,
        below,
        hysteresis,
        after,
    })
}

/// A profile file (SPEC §11): one device model's register map.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProfileFile {
    profile: Option<Spanned<RawProfileHeader>>,
    #[serde(default, rename = "point")]
    points: Vec<Spanned<RawPoint>>,
    identify: Option<Spanned<RawIdentify>>,
}

/// Only the points are required: a site's own profile may be terse (the
/// shipped library is held to naming its vendor, model and source by a test).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProfileHeader {
    name: Option<Spanned<String>>,
    vendor: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    description: Option<String>,
    source: Option<Spanned<String>>,
    baud: Option<Spanned<u32>>,
    parity: Option<RawParity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentify {
    area: RawArea,
    address: Spanned<i64>,
    #[serde(rename = "type")]
    kind: Spanned<RawType>,
    order: Option<Spanned<RawOrder>>,
    scale: Option<Spanned<f64>>,
    offset: Option<Spanned<f64>>,
    range: Spanned<[f64; 2]>,
}

impl RawProfileFile {
    /// The profile found at `path`; its name must be the file's (`stem`).
    pub(super) fn into_profile(self, stem: &str, path: PathBuf) -> Result<DeviceProfile> {
        let (span, header) = match self.profile {
            Some(header) => (header.span(), header.into_inner()),
            None => (0..0, RawProfileHeader::default()),
        };
        if let Some(name) = &header.name {
            if name.get_ref() != stem {
                return violation(
                    name.span(),
                    format!("the profile's name must be its file name without .toml ({stem:?})"),
                );
            }
        }
        let text =
            |field: Option<Spanned<String>>| field.map(Spanned::into_inner).unwrap_or_default();
        if let Some(baud) = &header.baud {
            if !(300..=4_000_000).contains(baud.get_ref()) {
                return violation(baud.span(), "baud must be 300..4000000");
            }
        }
        if self.points.is_empty() {
            return violation(span, "a profile needs at least one [[point]]");
        }
        let mut names = Unique::new("point");
        let mut points = Vec::new();
        for p in &self.points {
            names.insert(&p.get_ref().name, " in this profile")?;
            points.push(convert_point(p)?);
        }
        Ok(DeviceProfile {
            name: stem.to_string(),
            vendor: text(header.vendor),
            model: text(header.model),
            description: header.description.unwrap_or_default(),
            source: text(header.source),
            baud: header.baud.map(Spanned::into_inner),
            parity: header.parity.map(convert_parity),
            points,
            identify: self.identify.as_ref().map(convert_identify).transpose()?,
            path,
        })
    }
}

/// `[identify]`: decoded like a point (checked by the same rules), with the
/// range a reading of this model falls in.
fn convert_identify(raw: &Spanned<RawIdentify>) -> Result<Identify> {
    let span = raw.span();
    let raw = raw.get_ref();
    let as_point = RawPoint {
        name: Spanned::new(span.clone(), "identify".to_string()),
        area: raw.area,
        address: raw.address.clone(),
        kind: raw.kind.clone(),
        order: raw.order.clone(),
        scale: raw.scale.clone(),
        offset: raw.offset.clone(),
        bit: None,
        length: None,
        unit: None,
        writable: None,
        min: None,
        max: None,
        deadband: None,
        labels: None,
        alarm: None,
        poll: None,
        sim: None,
    };
    let point = convert_point(&Spanned::new(span, as_point))?;
    if point.kind.is_bool() || matches!(point.kind, Kind::String { .. }) {
        return violation(raw.kind.span(), "identify reads a number");
    }
    let [low, high] = *raw.range.get_ref();
    if !(low.is_finite() && high.is_finite() && low <= high) {
        return violation(raw.range.span(), "range is [low, high] with low <= high");
    }
    Ok(Identify {
        point,
        range: (low, high),
    })
}

fn convert_command(raw: RawCommand, devices: &[Device]) -> Result<Command> {
    let name = check_name(&raw.name, "command name")?;
    let Some(device) = devices.iter().find(|d| &d.name == raw.device.get_ref()) else {
        return violation(
            raw.device.span(),
            format!(
                "command {name:?} refers to unknown device {:?}",
                raw.device.get_ref()
            ),
        );
    };
    if raw.write.is_empty() {
        return violation(raw.name.span(), format!("command {name:?} has no writes"));
    }
    let mut writes = Vec::new();
    for w in raw.write {
        let w = w.into_inner();
        let Some(point) = device.point(w.point.get_ref()) else {
            return violation(
                w.point.span(),
                format!(
                    "device {:?} has no point {:?}",
                    device.name,
                    w.point.get_ref()
                ),
            );
        };
        if !point.writable {
            return violation(
                w.point.span(),
                format!(
                    "point {:?} is not writable (add writable = true)",
                    point.name
                ),
            );
        }
        let value = match w.value.get_ref() {
            toml::Value::Boolean(b) if point.kind.is_bool() => serde_json::Value::from(*b),
            toml::Value::Integer(i) if !point.kind.is_bool() => serde_json::Value::from(*i),
            toml::Value::Float(f) if !point.kind.is_bool() => serde_json::Value::from(*f),
            _ => {
                return violation(
                    w.value.span(),
                    format!(
                        "value for {:?} must be {}",
                        point.name,
                        if point.kind.is_bool() {
                            "true or false"
                        } else {
                            "a number"
                        }
                    ),
                )
            }
        };
        if let Some(v) = value.as_f64() {
            if point.min.is_some_and(|m| v < m) || point.max.is_some_and(|m| v > m) {
                return violation(
                    w.value.span(),
                    format!("value {v} is outside the point's min/max"),
                );
            }
        }
        writes.push(CommandWrite {
            point: point.name.clone(),
            value,
        });
    }
    Ok(Command {
        name,
        device: device.name.clone(),
        writes,
    })
}

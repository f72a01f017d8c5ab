//! The validated configuration: every value here has passed the rules of
//! SPEC §3, so the rest of the daemon never re-checks it.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use crate::modbus::{Address, Area, UnitId};

#[derive(Debug, Clone)]
pub struct Config {
    pub api: Api,
    pub gateway: Gateway,
    pub platform: Option<Platform>,
    pub buffer: Buffer,
    pub buses: Vec<Bus>,
    pub devices: Vec<Device>,
    pub commands: Vec<Command>,
    pub streams: Vec<Stream>,
}

impl Config {
    pub fn bus(&self, name: &str) -> Option<&Bus> {
        self.buses.iter().find(|b| b.name == name)
    }

    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// The device `name` with only the points `names` (all if empty), or
    /// why there is none, for a person.
    pub fn select(&self, name: &str, names: &[String]) -> Result<Device, String> {
        let Some(device) = self.device(name) else {
            let known: Vec<&str> = self.devices.iter().map(|d| d.name.as_str()).collect();
            return Err(format!(
                "no device {} in the config (devices: {})",
                crate::text::quote(name),
                known.join(", ")
            ));
        };
        let mut device = device.clone();
        if let Some(unknown) = names.iter().find(|n| device.point(n).is_none()) {
            return Err(format!(
                "device {} has no point {}",
                device.name,
                crate::text::quote(unknown)
            ));
        }
        if !names.is_empty() {
            device.points.retain(|p| names.contains(&p.name));
        }
        Ok(device)
    }

    /// The devices polled on one bus, in config order.
    pub fn devices_on<'a>(&'a self, bus: &'a str) -> impl Iterator<Item = &'a Device> + 'a {
        self.devices.iter().filter(move |d| d.bus == bus)
    }
}

/// The local API and web console (SPEC §10).
#[derive(Debug, Clone, PartialEq)]
pub struct Api {
    /// `None`: turned off.
    pub listen: Option<std::net::SocketAddr>,
    /// Needed for every POST, and for everything beyond loopback.
    pub token: Option<String>,
}

impl Api {
    pub fn default_listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 8480))
    }
}

impl Default for Api {
    fn default() -> Self {
        Self {
            listen: Some(Self::default_listen()),
            token: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    pub id: String,
    pub data_dir: PathBuf,
    /// Searched first for device profiles.
    pub profile_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Platform {
    pub profile: Profile,
    pub host: String,
    pub port: u16,
    pub tls: Option<Tls>,
    pub keep_alive: Duration,
    /// Messages per second toward the platform; `None` means no cap.
    pub max_publish_rate: Option<f64>,
    /// How often the gateway publishes its own health; `None`: never.
    pub stats: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Profile {
    ThingsCloud {
        access_token: String,
        project_key: String,
    },
    Generic {
        username: Option<String>,
        password: Option<String>,
        topic_prefix: String,
    },
}

/// TLS toward the broker, with the trust anchors read when the config was
/// loaded: a config that names an unreadable or empty CA file never loads,
/// so a reload cannot fail later for want of one.
#[derive(Clone)]
pub struct Tls {
    /// `None`: the system's root certificates.
    pub ca_file: Option<PathBuf>,
    roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// The client configuration built from them.
    pub client: std::sync::Arc<rustls::ClientConfig>,
}

impl Tls {
    /// Reads `ca_file` (or the system roots) and builds the client config.
    pub fn load(ca_file: Option<&std::path::Path>) -> Result<Self, String> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let roots: Vec<CertificateDer<'static>> = match ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        format!("cannot read CA certificates from {}: {e}", path.display())
                    })?;
                if certs.is_empty() {
                    return Err(format!("{} holds no PEM certificate", path.display()));
                }
                certs
            }
            None => rustls_native_certs::load_native_certs().certs,
        };
        let mut store = rustls::RootCertStore::empty();
        for cert in &roots {
            if let Err(e) = store.add(cert.clone()) {
                match ca_file {
                    Some(path) => {
                        return Err(format!("invalid CA certificate in {}: {e}", path.display()))
                    }
                    // A malformed system certificate is skipped, not fatal.
                    None => continue,
                }
            }
        }
        if store.is_empty() {
            return Err(
                "no system root certificates found; install ca-certificates or set ca_file".into(),
            );
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(Self {
            ca_file: ca_file.map(std::path::Path::to_path_buf),
            roots,
            client: std::sync::Arc::new(client),
        })
    }
}

impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file && self.roots == other.roots
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("ca_file", &self.ca_file)
            .field("roots", &self.roots.len())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusMode {
    Rtu,
    Transparent,
}

/// How a bus reaches its slaves (SPEC §9).
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// The serial device in [`Bus::port`].
    Serial,
    /// Modbus TCP (MBAP header) to `host:port`.
    Tcp { address: String },
    /// RTU frames over a TCP stream to a serial server.
    RtuOverTcp {
        address: String,
        heartbeat: Option<Vec<u8>>,
    },
    /// RTU frames over a connection a DTU makes to us.
    DialIn {
        listen: std::net::SocketAddr,
        registration: Option<Vec<u8>>,
        heartbeat: Option<Vec<u8>>,
    },
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Serial => "serial",
            Transport::Tcp { .. } => "tcp",
            Transport::RtuOverTcp { .. } | Transport::DialIn { .. } => "rtu_over_tcp",
        }
    }

    /// Whether the bus carries RTU frames whose wire time `baud` gives
    /// (serial, or a serial line behind a converter).
    pub fn has_wire_time(&self) -> bool {
        !matches!(self, Transport::Tcp { .. })
    }

    /// Packets a DTU or serial server sends that are not frames.
    pub fn not_frames(&self) -> Vec<&[u8]> {
        match self {
            Transport::RtuOverTcp { heartbeat, .. } => {
                heartbeat.iter().map(Vec::as_slice).collect()
            }
            Transport::DialIn {
                registration,
                heartbeat,
                ..
            } => registration
                .iter()
                .chain(heartbeat.iter())
                .map(Vec::as_slice)
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Bus {
    pub name: String,
    pub transport: Transport,
    /// Where the bytes go, for people: the serial device, `host:port`, or
    /// `listen ip:port`.
    pub port: String,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
    pub timeout: Duration,
    pub retries: u32,
    pub delay: Duration,
    pub mode: BusMode,
}

impl Bus {
    /// Bits on the wire per character: start + data + parity + stop.
    pub fn bits_per_char(&self) -> u32 {
        1 + u32::from(self.data_bits)
            + u32::from(self.parity != Parity::None)
            + u32::from(self.stop_bits)
    }

    /// Time to send `bytes` characters at the configured baud.
    pub fn char_time(&self, bytes: usize) -> Duration {
        let bits = bytes as u64 * u64::from(self.bits_per_char());
        Duration::from_nanos(bits * 1_000_000_000 / u64::from(self.baud.max(1)))
    }

    /// The 3.5-character silent interval that delimits RTU frames; fixed at
    /// 1.75 ms above 19200 baud (Modbus over serial line, §2.5.1.1).
    pub fn frame_gap(&self) -> Duration {
        if self.baud > 19_200 {
            Duration::from_micros(1750)
        } else {
            self.char_time(7) / 2
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Always,
    Change { heartbeat: Duration },
}

#[derive(Debug, Clone)]
pub struct Device {
    pub name: String,
    pub bus: String,
    pub unit: UnitId,
    pub poll: Duration,
    /// Platform sub-device key; `None` = the gateway's own attributes.
    pub key: Option<String>,
    pub report: Report,
    pub timeout: Option<Duration>,
    pub points: Vec<Point>,
    /// The device profile its points come from (SPEC §11), if any.
    pub profile: Option<Arc<DeviceProfile>>,
}

impl Device {
    pub fn point(&self, name: &str) -> Option<&Point> {
        self.points.iter().find(|p| p.name == name)
    }
}

/// Byte order of a multi-register value, named by where the big-endian
/// bytes A B C D end up on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Big-endian words, big-endian bytes (Modbus default).
    Abcd,
    /// Little-endian throughout.
    Dcba,
    /// Bytes swapped inside each register.
    Badc,
    /// Registers in reverse order ("word swap").
    Cdab,
}

impl Order {
    pub fn swaps_words(self) -> bool {
        matches!(self, Order::Dcba | Order::Cdab)
    }

    pub fn swaps_bytes(self) -> bool {
        matches!(self, Order::Dcba | Order::Badc)
    }
}

/// What a point's registers or bits mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A coil or discrete input.
    Bit,
    /// One bit (0 = LSB) of an input or holding register.
    RegisterBit(u8),
    /// A whole register read as a boolean: non-zero is true.
    RegisterBool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// ASCII text in `len` registers, two characters each.
    String {
        len: u16,
    },
}

/// The config's `type` name.
impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Bit | Kind::RegisterBit(_) | Kind::RegisterBool => "bool",
            Kind::U16 => "u16",
            Kind::I16 => "i16",
            Kind::U32 => "u32",
            Kind::I32 => "i32",
            Kind::U64 => "u64",
            Kind::I64 => "i64",
            Kind::F32 => "f32",
            Kind::F64 => "f64",
            Kind::String { .. } => "string",
        })
    }
}

impl Kind {
    /// Registers (or bits, for `Bit`) the point occupies.
    pub fn width(self) -> u16 {
        match self {
            Kind::Bit | Kind::RegisterBit(_) | Kind::RegisterBool | Kind::U16 | Kind::I16 => 1,
            Kind::U32 | Kind::I32 | Kind::F32 => 2,
            Kind::U64 | Kind::I64 | Kind::F64 => 4,
            Kind::String { len } => len,
        }
    }

    pub fn is_bool(self) -> bool {
        matches!(self, Kind::Bit | Kind::RegisterBit(_) | Kind::RegisterBool)
    }

    pub fn is_integer(self) -> bool {
        matches!(
            self,
            Kind::U16 | Kind::I16 | Kind::U32 | Kind::I32 | Kind::U64 | Kind::I64
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub name: String,
    pub area: Area,
    pub address: Address,
    pub kind: Kind,
    pub order: Order,
    pub scale: f64,
    pub offset: f64,
    pub unit: Option<String>,
    pub writable: bool,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub deadband: f64,
    /// Integer points: the label reported for a number (writes take either).
    pub labels: Vec<(i64, String)>,
    pub alarm: Option<Alarm>,
    /// Its own interval (slow-changing values); `None`: the device's.
    pub poll: Option<Duration>,
    /// The range `simulate` serves it in.
    pub sim: Option<(f64, f64)>,
}

/// When a point is in alarm (SPEC §3 `alarm`).
#[derive(Debug, Clone, PartialEq)]
pub enum Alarm {
    /// A number outside `below..=above` for `after` raises; back inside by
    /// `hysteresis` clears.
    Range {
        above: Option<f64>,
        below: Option<f64>,
        hysteresis: f64,
        after: Duration,
    },
    /// A bool equal to `when` for `after` raises; the other value clears.
    When { when: bool, after: Duration },
}

impl Point {
    /// One past the last register/bit the point occupies.
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.kind.width())
    }

    /// Integer types with scale 1 and offset 0 are reported as integers.
    pub fn is_unscaled(&self) -> bool {
        self.scale == 1.0 && self.offset == 0.0
    }
}

/// One device model's register map, from a profile file (SPEC §11).
#[derive(Debug, Clone)]
pub struct DeviceProfile {
    pub name: String,
    pub vendor: String,
    pub model: String,
    pub description: String,
    /// The maker's document the register map was transcribed from.
    pub source: String,
    /// Factory line settings.
    pub baud: Option<u32>,
    pub parity: Option<Parity>,
    pub points: Vec<Point>,
    pub identify: Option<Identify>,
    /// Where it was found.
    pub path: PathBuf,
}

/// How `scan --identify` recognises a model: one read, and the range a
/// reading of this model falls in.
#[derive(Debug, Clone)]
pub struct Identify {
    /// The register(s) read and their decoding (named `identify`).
    pub point: Point,
    pub range: (f64, f64),
}

impl Identify {
    pub fn matches(&self, value: f64) -> bool {
        (self.range.0..=self.range.1).contains(&value)
    }
}

#[derive(Debug, Clone)]
pub struct Command {
    pub name: String,
    pub device: String,
    pub writes: Vec<CommandWrite>,
}

#[derive(Debug, Clone)]
pub struct CommandWrite {
    pub point: String,
    pub value: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Binary,
    Hex,
}

#[derive(Debug, Clone)]
pub struct Stream {
    pub name: String,
    pub bus: String,
    pub encoding: Encoding,
}

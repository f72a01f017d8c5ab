//! The simulator: Modbus slaves (tokio-modbus servers) on a
//! pseudo-terminal, on loopback TCP (Modbus TCP, or RTU over TCP as a
//! serial server speaks it), or dialling in as a DTU, so a config can be
//! tried without hardware. Values change
//! over time; writes stick. Tests use the same slaves with fault knobs:
//! silence a unit, answer late, raise an exception for a range, and a log
//! of the requests received (bounded; off for `simulate` and `demo`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::ops::RangeInclusive;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::termios;
use tokio_modbus::{ExceptionCode, Response, SlaveRequest};

use crate::codec::{self, Value};
use crate::config::{self, Area, Device, Kind};
use crate::modbus::Request;

/// One simulated slave's memory and behaviour.
#[derive(Debug, Default, Clone)]
pub struct Unit {
    pub coils: BTreeMap<u16, bool>,
    pub discretes: BTreeMap<u16, bool>,
    pub input: BTreeMap<u16, u16>,
    pub holding: BTreeMap<u16, u16>,
    /// Never answer (a dead or disconnected slave).
    pub silent: bool,
    /// Extra time before answering (a slow slave).
    pub delay: Duration,
    /// Ranges answered only after an extra delay (one slow block).
    pub slow: Vec<(Area, RangeInclusive<u16>, Duration)>,
    /// Ranges answered with an exception instead of data.
    pub exceptions: Vec<(Area, RangeInclusive<u16>, ExceptionCode)>,
    /// Registers that count the reads covering them (1, 2, 3 …): each poll
    /// sees the next value, so a lost or reordered report shows.
    pub read_counters: Vec<(Area, u16)>,
}

/// Whether `range` overlaps `count` addresses from `start` in `area`.
fn overlaps(range: &RangeInclusive<u16>, start: u16, count: u16) -> bool {
    let end = u32::from(start) + u32::from(count.max(1)) - 1;
    u32::from(*range.start()) <= end && u32::from(*range.end()) >= u32::from(start)
}

impl Unit {
    fn registers(&mut self, area: Area) -> &mut BTreeMap<u16, u16> {
        if area == Area::Input {
            &mut self.input
        } else {
            &mut self.holding
        }
    }

    fn bits(&mut self, area: Area) -> &mut BTreeMap<u16, bool> {
        if area == Area::Discrete {
            &mut self.discretes
        } else {
            &mut self.coils
        }
    }

    /// Stores `regs` from `address` on.
    pub fn set_registers(&mut self, area: Area, address: u16, regs: &[u16]) {
        let map = self.registers(area);
        for (i, r) in regs.iter().enumerate() {
            map.insert(address.wrapping_add(i as u16), *r);
        }
    }

    pub fn set_bit(&mut self, area: Area, address: u16, on: bool) {
        self.bits(area).insert(address, on);
    }

    fn exception_for(&self, area: Area, start: u16, count: u16) -> Option<ExceptionCode> {
        self.exceptions
            .iter()
            .find(|(a, r, _)| *a == area && overlaps(r, start, count))
            .map(|(_, _, code)| *code)
    }

    /// How long this unit takes to think about `request`.
    fn delay_for(&self, request: &Request) -> Duration {
        let (area, start, count) = request.span();
        self.delay
            + self
                .slow
                .iter()
                .filter(|(a, r, _)| *a == area && overlaps(r, start, count))
                .map(|(_, _, d)| *d)
                .sum::<Duration>()
    }

    /// Executes one request, then advances the read counters it covered.
    fn execute(&mut self, request: &Request) -> Result<Response, ExceptionCode> {
        let (area, start, count) = request.span();
        for (counter_area, address) in self.read_counters.clone() {
            if counter_area == area && overlaps(&(address..=address), start, count) {
                let map = self.registers(area);
                let next = map.get(&address).copied().unwrap_or(0).wrapping_add(1);
                map.insert(address, next);
            }
        }
        self.answer(request)
    }

    fn answer(&mut self, request: &Request) -> Result<Response, ExceptionCode> {
        let read_regs =
            |u: &mut Unit, area: Area, a: u16, n: u16| -> Result<Vec<u16>, ExceptionCode> {
                if let Some(code) = u.exception_for(area, a, n) {
                    return Err(code);
                }
                let map = u.registers(area);
                Ok((0..n)
                    .map(|i| map.get(&a.wrapping_add(i)).copied().unwrap_or(0))
                    .collect())
            };
        let read_bits =
            |u: &mut Unit, area: Area, a: u16, n: u16| -> Result<Vec<bool>, ExceptionCode> {
                if let Some(code) = u.exception_for(area, a, n) {
                    return Err(code);
                }
                let map = u.bits(area);
                Ok((0..n)
                    .map(|i| map.get(&a.wrapping_add(i)).copied().unwrap_or(false))
                    .collect())
            };
        match request {
            Request::ReadCoils(a, n) => {
                read_bits(self, Area::Coil, *a, *n).map(Response::ReadCoils)
            }
            Request::ReadDiscretes(a, n) => {
                read_bits(self, Area::Discrete, *a, *n).map(Response::ReadDiscreteInputs)
            }
            Request::ReadInput(a, n) => {
                read_regs(self, Area::Input, *a, *n).map(Response::ReadInputRegisters)
            }
            Request::ReadHolding(a, n) => {
                read_regs(self, Area::Holding, *a, *n).map(Response::ReadHoldingRegisters)
            }
            Request::WriteCoil(a, v) => {
                self.exception_for(Area::Coil, *a, 1).map_or(Ok(()), Err)?;
                self.coils.insert(*a, *v);
                Ok(Response::WriteSingleCoil(*a, *v))
            }
            Request::WriteCoils(a, v) => {
                self.exception_for(Area::Coil, *a, v.len() as u16)
                    .map_or(Ok(()), Err)?;
                for (i, b) in v.iter().enumerate() {
                    self.coils.insert(a.wrapping_add(i as u16), *b);
                }
                Ok(Response::WriteMultipleCoils(*a, v.len() as u16))
            }
            Request::WriteRegister(a, v) => {
                self.exception_for(Area::Holding, *a, 1)
                    .map_or(Ok(()), Err)?;
                self.holding.insert(*a, *v);
                Ok(Response::WriteSingleRegister(*a, *v))
            }
            Request::WriteRegisters(a, v) => {
                self.exception_for(Area::Holding, *a, v.len() as u16)
                    .map_or(Ok(()), Err)?;
                self.set_registers(Area::Holding, *a, v);
                Ok(Response::WriteMultipleRegisters(*a, v.len() as u16))
            }
        }
    }
}

/// A request as the slave saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub unit: u8,
    pub request: Request,
    pub at: Instant,
}

/// Requests kept by a test's simulator: the most recent this many.
const LOG_MAX: usize = 100_000;

#[derive(Default)]
struct State {
    units: HashMap<u8, Unit>,
    log: VecDeque<Received>,
    /// How many requests the log keeps (0: no log).
    log_max: usize,
}

/// A set of simulated slaves sharing one line. Cloning gives another handle
/// to the same slaves.
#[derive(Clone, Default)]
pub struct Slaves {
    state: Arc<Mutex<State>>,
    /// When set, answers take the wire time of this bus's line settings.
    wire: Option<Arc<config::Bus>>,
}

impl Slaves {
    /// Slaves that log the requests they receive (the latest 100,000).
    pub fn new() -> Self {
        let slaves = Self::default();
        slaves.lock().log_max = LOG_MAX;
        slaves
    }

    /// Makes every answer wait as long as request and response would take
    /// on a real line with `bus`'s settings (a pty is instantaneous).
    pub fn with_wire_time(mut self, bus: &config::Bus) -> Self {
        self.wire = Some(Arc::new(bus.clone()));
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the maps half-updated in a way that
        // matters to a simulator; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on unit `id`, creating it if needed.
    pub fn unit<R>(&self, id: u8, f: impl FnOnce(&mut Unit) -> R) -> R {
        f(self.lock().units.entry(id).or_default())
    }

    /// Every request received so far (the latest 100,000).
    pub fn received(&self) -> Vec<Received> {
        self.lock().log.iter().cloned().collect()
    }

    /// Slaves for the configured devices, with initial synthetic values,
    /// keeping no log (they serve `simulate` and `demo` for as long as they
    /// run).
    pub fn for_devices<'a>(devices: impl IntoIterator<Item = &'a Device>) -> Self {
        let slaves = Self::default();
        let devices: Vec<&Device> = devices.into_iter().collect();
        slaves.animate(&devices, 0.0);
        slaves
    }

    /// Writes synthetic values for time `t` (seconds) into every non-writable
    /// point: slow sines within a plausible range, toggling bits, counters.
    pub fn animate(&self, devices: &[&Device], t: f64) {
        for device in devices {
            let identify = device.profile.as_ref().and_then(|p| p.identify.as_ref());
            self.unit(device.unit.get(), |unit| {
                for (i, p) in device.points.iter().enumerate() {
                    let seen = match p.kind {
                        Kind::Bit => unit.bits(p.area).contains_key(&p.address),
                        _ => unit.registers(p.area).contains_key(&p.address),
                    };
                    if p.writable && seen {
                        continue; // setpoints keep what was written
                    }
                    let phase = i as f64;
                    let toggle = ((t / (2.0 + phase)).floor() as i64) % 2 == 1;
                    match p.kind {
                        Kind::Bit => unit.set_bit(p.area, p.address, toggle),
                        Kind::String { .. } => {
                            let text = format!("SIM{}", device.unit);
                            unit.set_registers(p.area, p.address, &codec::encode_text(p, &text));
                        }
                        _ => {
                            let value = if p.kind.is_bool() {
                                Value::Bool(toggle)
                            } else {
                                let (lo, hi) = synthetic_range(p, identify);
                                let mid = (lo + hi) / 2.0;
                                Value::Float(mid + (hi - lo) / 2.0 * (t / 30.0 + phase).sin())
                            };
                            let current =
                                unit.registers(p.area).get(&p.address).copied().unwrap_or(0);
                            if let Ok(regs) = codec::encode_registers(p, &value, current) {
                                unit.set_registers(p.area, p.address, &regs);
                            }
                        }
                    }
                }
                // What `scan --identify` reads, in its range, unless a point
                // of the device already serves those registers.
                if let Some(identify) = identify {
                    let p = &identify.point;
                    let served = device
                        .points
                        .iter()
                        .any(|q| q.area == p.area && q.address <= p.address && q.end() >= p.end());
                    if !served {
                        let (lo, hi) = identify.range;
                        let value = Value::Float((lo + hi) / 2.0);
                        if let Ok(regs) = codec::encode_registers(p, &value, 0) {
                            unit.set_registers(p.area, p.address, &regs);
                        }
                    }
                }
            });
        }
    }

    /// Serves these slaves on a new pseudo-terminal; the returned [`Pty`]
    /// names the path a master (fieldgate) opens.
    pub fn serve(&self) -> io::Result<Pty> {
        let (stream, slave, path) = open_line()?;
        let server = tokio_modbus::server::rtu::Server::new(stream);
        let service = Service(self.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = server.serve_forever(service).await {
                log::debug!(target: "sim", "simulator stopped: {e}");
            }
        });
        Ok(Pty {
            path,
            _slave: slave,
            task,
        })
    }
}

/// How a simulated TCP server frames Modbus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpFraming {
    /// Modbus TCP (MBAP).
    Mbap,
    /// RTU frames over TCP (a transparent serial server).
    Rtu,
}

/// A running simulator on a loopback TCP port. Dropping it stops serving.
pub struct Served {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Slaves {
    /// Serves these slaves on `addr` (port 0: any free loopback port).
    pub async fn serve_tcp(&self, framing: TcpFraming, addr: &str) -> io::Result<Served> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let slaves = self.clone();
        let task = tokio::spawn(async move {
            let on_error = |e: io::Error| log::debug!(target: "sim", "simulator connection: {e}");
            let result = match framing {
                TcpFraming::Mbap => {
                    let server = tokio_modbus::server::tcp::Server::new(listener);
                    let connected = |stream, peer| {
                        let slaves = slaves.clone();
                        async move {
                            tokio_modbus::server::tcp::accept_tcp_connection(stream, peer, |_| {
                                Ok(Some(Service(slaves.clone())))
                            })
                        }
                    };
                    server.serve(&connected, on_error).await
                }
                TcpFraming::Rtu => {
                    let server = tokio_modbus::server::rtu_over_tcp::Server::new(listener);
                    let connected = |stream, peer| {
                        let slaves = slaves.clone();
                        async move {
                            tokio_modbus::server::rtu_over_tcp::accept_tcp_connection(
                                stream,
                                peer,
                                |_| Ok(Some(Service(slaves.clone()))),
                            )
                        }
                    };
                    server.serve(&connected, on_error).await
                }
            };
            if let Err(e) = result {
                log::debug!(target: "sim", "simulator stopped: {e}");
            }
        });
        Ok(Served { addr, task })
    }

    /// A DTU: dials in to `gateway`, sends `registration`, then carries RTU
    /// frames between the gateway and these slaves, sending `heartbeat`
    /// every `every`. Reconnects a second after the connection ends.
    pub async fn dial_in(
        &self,
        gateway: std::net::SocketAddr,
        registration: Option<Vec<u8>>,
        heartbeat: Option<(Vec<u8>, Duration)>,
    ) -> io::Result<Served> {
        use tokio::io::AsyncWriteExt;
        let local = self.serve_tcp(TcpFraming::Rtu, "127.0.0.1:0").await?;
        let task = tokio::spawn(async move {
            let local = local;
            loop {
                if let (Ok(mut up), Ok(mut down)) = (
                    tokio::net::TcpStream::connect(gateway).await,
                    tokio::net::TcpStream::connect(local.addr).await,
                ) {
                    let registered = match &registration {
                        Some(r) => up.write_all(r).await.is_ok(),
                        None => true,
                    };
                    if registered {
                        carry(&mut up, &mut down, heartbeat.as_ref()).await;
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(Served {
            addr: gateway,
            task,
        })
    }
}

/// Relays bytes both ways until either side closes, with heartbeats
/// toward `up` between frames.
async fn carry(
    up: &mut tokio::net::TcpStream,
    down: &mut tokio::net::TcpStream,
    heartbeat: Option<&(Vec<u8>, Duration)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut up_rx, mut up_tx) = up.split();
    let (mut down_rx, mut down_tx) = down.split();
    let every = heartbeat.map_or(Duration::from_secs(3600), |(_, every)| *every);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let (mut a, mut b) = ([0u8; 512], [0u8; 512]);
    loop {
        tokio::select! {
            n = up_rx.read(&mut a) => match n {
                Ok(n) if n > 0 => if down_tx.write_all(&a[..n]).await.is_err() { return },
                _ => return,
            },
            n = down_rx.read(&mut b) => match n {
                Ok(n) if n > 0 => if up_tx.write_all(&b[..n]).await.is_err() { return },
                _ => return,
            },
            _ = tick.tick(), if heartbeat.is_some() => {
                if let Some((packet, _)) = heartbeat {
                    if up_tx.write_all(packet).await.is_err() { return }
                }
            }
        }
    }
}

/// A device for a `transparent` bus that sends back every byte it
/// receives, on a new pseudo-terminal.
pub fn echo() -> io::Result<Pty> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    line(|mut stream| async move {
        let mut buf = [0u8; 512];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
}

/// A new pseudo-terminal whose far end is served by `serve` (a slave of
/// the caller's own, such as a test's fault injector).
pub fn line<F, Fut>(serve: F) -> io::Result<Pty>
where
    F: FnOnce(tokio_serial::SerialStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (stream, slave, path) = open_line()?;
    let task = tokio::spawn(serve(stream));
    Ok(Pty {
        path,
        _slave: slave,
        task,
    })
}

/// A new pseudo-terminal in raw mode: our end as a serial stream, the other
/// end's fd (kept open so the line stays up) and path.
fn open_line() -> io::Result<(tokio_serial::SerialStream, OwnedFd, PathBuf)> {
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    // Not inherited by processes we spawn: a child holding the master
    // would keep the line up after we close it.
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    }
    // Raw mode from the start: no echo or line editing before a master
    // opens the port and sets its own line settings.
    let mut tio = termios::tcgetattr(&pty.slave).map_err(io::Error::from)?;
    termios::cfmakeraw(&mut tio);
    termios::tcsetattr(&pty.slave, termios::SetArg::TCSANOW, &tio).map_err(io::Error::from)?;
    let path = nix::unistd::ttyname(&pty.slave).map_err(io::Error::from)?;
    // SAFETY: `into_raw_fd` hands over sole ownership of the master fd,
    // which TTYPort then owns and closes.
    let master = unsafe {
        <serialport::TTYPort as std::os::fd::FromRawFd>::from_raw_fd(pty.master.into_raw_fd())
    };
    let stream = tokio_serial::SerialStream::try_from(master).map_err(io::Error::from)?;
    Ok((stream, pty.slave, path))
}

/// A typical range for a synthetic value: the point's `sim` range, else
/// its profile's identify range if it is what identify reads, else the
/// write range if given, else one that fits the type after scale/offset.
fn synthetic_range(p: &config::Point, identify: Option<&config::Identify>) -> (f64, f64) {
    if let Some(range) = p.sim {
        return range;
    }
    if let Some(identify) = identify {
        let q = &identify.point;
        if (q.area, q.address, q.kind) == (p.area, p.address, p.kind) {
            return identify.range;
        }
    }
    if let (Some(lo), Some(hi)) = (p.min, p.max) {
        return (lo, hi);
    }
    let raw_hi = match p.kind {
        Kind::U16 | Kind::U32 | Kind::U64 => 1000.0,
        _ => 500.0,
    };
    let raw_lo = if matches!(p.kind, Kind::U16 | Kind::U32 | Kind::U64) {
        0.0
    } else {
        -500.0
    };
    let a = raw_lo * p.scale + p.offset;
    let b = raw_hi * p.scale + p.offset;
    (a.min(b), a.max(b))
}

/// A running simulator line. Dropping it stops serving.
pub struct Pty {
    pub path: PathBuf,
    /// Kept open so the line stays up while no master has it open.
    _slave: OwnedFd,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Pty {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Service(Slaves);

type Answer = Result<Option<Response>, ExceptionCode>;

impl tokio_modbus::server::Service for Service {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let slaves = self.0.clone();
        Box::pin(async move {
            let Some(request) = Request::from_modbus(&req.request) else {
                return Err(ExceptionCode::IllegalFunction);
            };
            let (answer, delay) = {
                let mut state = slaves.lock();
                if state.log_max > 0 {
                    if state.log.len() >= state.log_max {
                        state.log.pop_front();
                    }
                    state.log.push_back(Received {
                        unit: req.slave,
                        request: request.clone(),
                        at: Instant::now(),
                    });
                }
                match state.units.get_mut(&req.slave) {
                    Some(unit) if !unit.silent => {
                        (Some(unit.execute(&request)), unit.delay_for(&request))
                    }
                    _ => (None, Duration::ZERO),
                }
            };
            let Some(answer) = answer else {
                return Ok(None);
            };
            let wire = slaves.wire.as_ref().map_or(Duration::ZERO, |bus| {
                let (req_len, resp_len) = request.frame_sizes();
                let resp_len = if answer.is_err() { 5 } else { resp_len };
                bus.char_time(req_len + resp_len) + bus.frame_gap()
            });
            // Precisely: tokio's millisecond timer would add up to 1 ms to
            // every answer, which is not the line's time but the simulator's.
            crate::bus::Gap::new()
                .until(tokio::time::Instant::now() + wire + delay)
                .await;
            answer.map(Some)
        })
    }
}

/// Seconds since the epoch, the clock of the synthetic values.
pub fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

//! The bus: one [`Bus`] owns one transport and runs one Modbus transaction
//! at a time, with the bus's response timeout, retries and
//! inter-transaction delay.
//!
//! The framing is fieldgate's own (RTU: unit, PDU, CRC; the PDUs are
//! [`crate::modbus`]'s), not a codec that stays errored after a bad frame:
//! every transaction discards stale input, writes its request and reads
//! until its reply is found (noise before it is skipped) or its deadline
//! passes. Noise, a garbled, truncated or CRC-failing reply is one failed
//! attempt of that transaction; the port stays open. Only a transport that
//! really failed (the adapter unplugged) is closed, and it is reopened with
//! capped backoff; until then transactions fail fast instead of blocking.
//! A `transparent` bus carries raw bytes instead ([`Bus::exchange`]).

pub(crate) mod dialin;
mod gap;
mod serial;
pub mod tap;
mod tcp;

#[cfg(feature = "sim")]
pub(crate) use gap::Gap;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};

use crate::config::{self, BusMode, Transport, UnitId};
use crate::modbus::mbap;
use crate::modbus::rtu::{self, Scan};
use crate::modbus::{Reply, Request, TxError};
use crate::text::to_hex;

/// A byte stream to the slaves: a serial port, or (in tests) one end of an
/// in-memory pipe.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {
    /// Drops input that arrived before the request about to be written.
    fn discard_input(&mut self) -> io::Result<()>;
}

const REOPEN_MIN: Duration = Duration::from_secs(1);
/// How long a transaction on a dial-in bus waits for a DTU to connect.
const DTU_WAIT: Duration = Duration::from_secs(3);
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// Most bytes of a failed reply the trace shows.
const TRACE_BYTES: usize = 256;

/// Longest reply a transparent bus collects for one request.
pub const RAW_REPLY_MAX: usize = 4096;

/// After a timeout, how long the line must stay untouched before the next
/// request, so that a slow slave's late reply lands (and is discarded)
/// before we transmit again instead of during the next transaction. Behind
/// a serial server or DTU the reply also crosses the network (two hops), so
/// it waits the whole timeout there.
fn settle_time(bus: &config::Bus, timeout: Duration) -> Duration {
    match bus.transport {
        Transport::Serial => (timeout / 2).min(Duration::from_millis(250)),
        _ => timeout.min(Duration::from_secs(1)),
    }
    .max(bus.frame_gap())
}

/// A bus owner's promise to check in again by a deadline. The watchdog
/// reads it: a task stuck for good misses its deadline, while a task that
/// is merely busy (a queue of writes to a dead slave) keeps renewing it,
/// since every attempt is bounded by its timeout.
#[derive(Clone, Debug)]
pub struct Liveness(Arc<AtomicU64>);

/// Slack on top of the longest legitimate wait.
const LIVENESS_MARGIN: Duration = Duration::from_secs(5);

fn clock_ms() -> u64 {
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Liveness {
    pub fn new() -> Self {
        let alive = Self(Arc::default());
        alive.promise(Duration::from_secs(60));
        alive
    }

    /// "I will check in again within `within` (plus a margin)."
    pub fn promise(&self, within: Duration) {
        let within = u64::try_from((within + LIVENESS_MARGIN).as_millis()).unwrap_or(u64::MAX);
        self.0
            .store(clock_ms().saturating_add(within), Ordering::Relaxed);
    }

    /// Whether the last promise has been broken.
    pub fn overdue(&self) -> bool {
        clock_ms() > self.0.load(Ordering::Relaxed)
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

/// How the bus gets its transport.
enum Connector {
    Serial,
    /// We connect to `host:port` (Modbus TCP, or a serial server).
    Tcp(String),
    /// A DTU connects to us: connections arrive from the listener, the
    /// newest replacing the one before.
    DialIn(mpsc::Receiver<TcpStream>),
    /// A stream handed in; once it fails there is no other.
    #[cfg(test)]
    Given(Option<Box<dyn Stream>>),
}

/// How requests and replies are framed on the link.
enum Framing {
    /// Unit, PDU, CRC (serial lines, serial servers, DTUs).
    Rtu,
    /// MBAP header, PDU; the transaction id of the last request.
    Mbap { tid: u16 },
}

/// What one attempt gave: the outcome and, when a well-formed reply frame
/// came (an exception included), its PDU.
pub struct Attempt {
    pub outcome: Result<Reply, TxError>,
    pub pdu: Option<Vec<u8>>,
}

/// The owner of one transport.
pub struct Bus {
    config: config::Bus,
    connector: Connector,
    framing: Framing,
    /// Packets the peer sends that are not frames (a DTU's registration
    /// and heartbeat): removed from the input before it is scanned.
    not_frames: Vec<Vec<u8>>,
    link: Option<Box<dyn Stream>>,
    /// Earliest time the next transaction may start (inter-frame gap, `delay`,
    /// settle time after a timeout).
    quiet_until: Instant,
    reopen_at: Instant,
    reopen_delay: Duration,
    /// The last open error, reported while the port stays down.
    down: Option<String>,
    gap: gap::Gap,
    /// Bytes received for the transaction in progress.
    rx: Vec<u8>,
    alive: Liveness,
    stats: Arc<tap::BusStats>,
}

impl Bus {
    /// A bus whose transport is opened on the first transaction. A dial-in
    /// bus listens on its own (the daemon shares listeners between buses
    /// with [`Bus::dial_in`]).
    pub fn new(config: config::Bus) -> Self {
        let connector = match &config.transport {
            Transport::Serial => Connector::Serial,
            Transport::Tcp { address } | Transport::RtuOverTcp { address, .. } => {
                Connector::Tcp(address.clone())
            }
            Transport::DialIn { .. } => {
                let (incoming, listener) = dialin::Listener::for_buses([&config]);
                tokio::spawn(listener.run());
                return Self::dial_in(config, incoming.into_iter().next().map(|(_, rx)| rx));
            }
        };
        Self::with(config, connector)
    }

    /// A dial-in bus taking the connections a [`dialin::Listener`] accepts
    /// for it.
    pub fn dial_in(config: config::Bus, incoming: Option<mpsc::Receiver<TcpStream>>) -> Self {
        let incoming = incoming.unwrap_or_else(|| mpsc::channel(1).1);
        Self::with(config, Connector::DialIn(incoming))
    }

    /// A bus over `stream` instead of its configured port.
    #[cfg(test)]
    pub(crate) fn over(config: config::Bus, stream: Box<dyn Stream>) -> Self {
        Self::with(config, Connector::Given(Some(stream)))
    }

    fn with(config: config::Bus, connector: Connector) -> Self {
        let now = Instant::now();
        let config_name = config.name.clone();
        let gap = match connector {
            Connector::Serial => gap::Gap::new(),
            // Whatever is behind a TCP link keeps its own line timing.
            _ => gap::Gap::coarse(),
        };
        let framing = match config.transport {
            Transport::Tcp { .. } => Framing::Mbap { tid: 0 },
            _ => Framing::Rtu,
        };
        Self {
            not_frames: config
                .transport
                .not_frames()
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect(),
            config,
            connector,
            framing,
            link: None,
            quiet_until: now,
            reopen_at: now,
            reopen_delay: REOPEN_MIN,
            down: None,
            gap,
            rx: Vec::with_capacity(2 * rtu::MAX_FRAME),
            alive: Liveness::new(),
            stats: Arc::new(tap::BusStats::unobserved(&config_name)),
        }
    }

    pub fn config(&self) -> &config::Bus {
        &self.config
    }

    /// Where this bus counts and traces its transactions.
    pub fn observed_by(&mut self, stats: Arc<tap::BusStats>) {
        stats.set_connected(self.link.is_some());
        self.stats = stats;
    }

    /// The promise this bus renews before every attempt.
    pub fn liveness(&self) -> Liveness {
        self.alive.clone()
    }

    /// Whether the transport is open now.
    pub fn is_open(&self) -> bool {
        self.link.is_some()
    }

    /// Opens a serial port now, so that the daemon reports ready with its
    /// ports open; TCP links connect on their first transaction. A missing
    /// adapter is not fatal: the bus keeps trying to reopen it.
    pub fn open_now(&mut self) {
        if matches!(self.connector, Connector::Serial) && self.link.is_none() {
            let opened = serial::open(&self.config).map(|s| Box::new(s) as Box<dyn Stream>);
            let _ = self.opened(opened);
        }
    }

    /// A DTU that connected again replaces its old connection.
    fn take_replacement(&mut self) {
        let Connector::DialIn(incoming) = &mut self.connector else {
            return;
        };
        let mut newest = None;
        while let Ok(stream) = incoming.try_recv() {
            newest = Some(stream);
        }
        if let Some(stream) = newest {
            if self.link.is_some() {
                log::info!(target: "bus", bus = self.config.name.as_str(); "bus {}: the DTU connected again; the new connection replaces the old", self.config.name);
            }
            self.link = Some(Box::new(stream));
            self.reopen_delay = REOPEN_MIN;
            if self.down.take().is_some() {
                log::info!(target: "bus", bus = self.config.name.as_str(); "bus {}: the DTU is connected ({})", self.config.name, self.config.port);
            }
        }
    }

    /// Opens (connects) the transport if it is closed and its backoff has
    /// passed. Errors are logged once per outage, with the reason.
    pub async fn ensure_open(&mut self) -> Result<(), TxError> {
        self.take_replacement();
        if self.link.is_some() {
            return Ok(());
        }
        let opened: io::Result<Box<dyn Stream>> = match &mut self.connector {
            // A DTU is waited for, not dialled: nothing to back off from,
            // and one that dials in meanwhile is taken at once.
            Connector::DialIn(incoming) => {
                let wait = self.config.timeout.max(DTU_WAIT);
                self.alive.promise(wait);
                match timeout(wait, incoming.recv()).await {
                    Ok(Some(stream)) => Ok(Box::new(stream) as Box<dyn Stream>),
                    _ => Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "no DTU is connected",
                    )),
                }
            }
            _ if Instant::now() < self.reopen_at => {
                return Err(TxError::Port(self.down.clone().unwrap_or_default()))
            }
            Connector::Serial => serial::open(&self.config).map(|s| Box::new(s) as Box<dyn Stream>),
            Connector::Tcp(address) => {
                let limit = self.config.timeout.max(Duration::from_secs(1));
                self.alive.promise(limit);
                tcp::connect(address, limit)
                    .await
                    .map(|s| Box::new(s) as Box<dyn Stream>)
            }
            #[cfg(test)]
            Connector::Given(stream) => stream
                .take()
                .ok_or_else(|| io::Error::other("the stream has closed")),
        };
        self.opened(opened)
    }

    /// Takes the outcome of opening the transport.
    fn opened(&mut self, opened: io::Result<Box<dyn Stream>>) -> Result<(), TxError> {
        let name = &self.config.name;
        let verb = match self.connector {
            Connector::Serial => "open",
            Connector::Tcp(_) => "connect to",
            _ => "reach",
        };
        match opened {
            Ok(stream) => {
                if self.down.take().is_some() {
                    log::info!(target: "bus", bus = name.as_str(); "bus {name}: {} is back", self.config.port);
                }
                self.link = Some(stream);
                self.reopen_delay = REOPEN_MIN;
                Ok(())
            }
            Err(e) => {
                let dial_in = matches!(self.connector, Connector::DialIn(_));
                let reason = if dial_in {
                    format!("no DTU has dialled in ({})", self.config.port)
                } else {
                    format!("cannot {verb} {}: {e}", self.config.port)
                };
                // Logged when the outage starts, not at every reopen attempt.
                if self.down.is_none() && dial_in {
                    log::warn!(target: "bus", bus = name.as_str(); "bus {name}: {reason}; its devices fail until one does");
                } else if self.down.is_none() {
                    log::error!(target: "bus", bus = name.as_str(); "bus {name}: {reason}; retrying with backoff up to {}s", REOPEN_MAX.as_secs());
                } else {
                    log::debug!(target: "bus", "bus {name}: {reason}");
                }
                self.port_lost(reason.clone());
                Err(TxError::Port(reason))
            }
        }
    }

    /// The silent interval between frames: none on Modbus TCP.
    fn frame_gap(&self) -> Duration {
        match self.framing {
            Framing::Mbap { .. } => Duration::ZERO,
            Framing::Rtu => self.config.frame_gap(),
        }
    }

    fn port_lost(&mut self, reason: String) {
        self.link = None;
        self.down = Some(reason);
        self.reopen_at = Instant::now() + self.reopen_delay;
        self.reopen_delay = (self.reopen_delay * 2).min(REOPEN_MAX);
    }

    /// A transport error: the port is closed and reopened with backoff.
    fn transport_failed(&mut self, e: &io::Error) -> TxError {
        let reason = format!("{} failed: {e}", self.config.port);
        log::error!(target: "bus", bus = self.config.name.as_str(); "bus {}: {reason}; reopening", self.config.name);
        self.port_lost(reason.clone());
        TxError::Port(reason)
    }

    /// Renews the liveness promise for one attempt bounded by `limit`.
    fn promise(&self, limit: Duration) {
        let wait = self.quiet_until.saturating_duration_since(Instant::now());
        self.alive.promise(wait + 2 * limit);
    }

    /// Runs `request` on `unit`, retrying per the bus config. `timeout`
    /// overrides the bus timeout (a slow device's own). An exception to a
    /// write is final: the slave is alive and said no.
    pub async fn transact(
        &mut self,
        unit: UnitId,
        request: &Request,
        timeout: Option<Duration>,
    ) -> Result<Reply, TxError> {
        let timeout = timeout.unwrap_or(self.config.timeout);
        let mut attempt = 0;
        loop {
            let result = self.attempt(unit, request, timeout).await.outcome;
            match &result {
                Ok(_) | Err(TxError::Port(_)) => return result,
                Err(TxError::Exception(_)) if request.is_write() => return result,
                Err(_) if attempt >= self.config.retries => return result,
                Err(e) => log::debug!(
                    target: "bus",
                    "bus {} unit {unit}: {request}: {e}; retry {}/{}",
                    self.config.name,
                    attempt + 1,
                    self.config.retries
                ),
            }
            attempt += 1;
        }
    }

    /// One try, no retries: used by `scan`, which probes many silent ids,
    /// and for raw frames, which run as exactly one transaction. Every
    /// attempt is counted and, while someone watches, traced.
    pub async fn attempt(&mut self, unit: UnitId, request: &Request, limit: Duration) -> Attempt {
        let started = Instant::now();
        let (attempt, frame) = self.attempt_untraced(unit, request, limit).await;
        let took = started.elapsed();
        let error = attempt.outcome.as_ref().err();
        self.stats.set_connected(self.link.is_some());
        self.stats.record(unit, took, error);
        if self.stats.traced() {
            let response = match (&attempt.pdu, &self.framing) {
                (Some(pdu), Framing::Rtu) => rtu::adu(unit.get(), pdu),
                (Some(pdu), Framing::Mbap { tid }) => mbap::adu(*tid, unit.get(), pdu),
                (None, _) => self
                    .rx
                    .get(..self.rx.len().min(TRACE_BYTES))
                    .unwrap_or_default()
                    .to_vec(),
            };
            let fc = request.pdu().first().copied().unwrap_or_default();
            self.stats.trace(unit, fc, &frame, &response, took, error);
        }
        attempt
    }

    /// [`Bus::attempt`] without the accounting; also returns the request
    /// frame (empty when none was sent).
    async fn attempt_untraced(
        &mut self,
        unit: UnitId,
        request: &Request,
        limit: Duration,
    ) -> (Attempt, Vec<u8>) {
        let failed = |e| Attempt {
            outcome: Err(e),
            pdu: None,
        };
        self.rx.clear();
        if self.config.mode != BusMode::Rtu {
            let e = TxError::Port("not a Modbus RTU bus (mode = \"transparent\")".into());
            return (failed(e), Vec::new());
        }
        if let Err(e) = self.ensure_open().await {
            return (failed(e), Vec::new());
        }
        self.promise(limit);
        self.gap.until(self.quiet_until).await;
        let frame = match &mut self.framing {
            Framing::Rtu => rtu::adu(unit.get(), &request.pdu()),
            Framing::Mbap { tid } => {
                *tid = tid.wrapping_add(1);
                mbap::adu(*tid, unit.get(), &request.pdu())
            }
        };
        if let Err(e) = self.send(&frame, limit).await {
            return (failed(self.transport_failed(&e)), frame);
        }
        let deadline = Instant::now() + limit;
        let result = match self.framing {
            Framing::Rtu => self.read_reply(unit, request, deadline).await,
            Framing::Mbap { tid } => self.read_mbap_reply(tid, unit, deadline).await,
        };
        self.quiet_until = Instant::now() + self.frame_gap() + self.config.delay;
        let attempt = match result {
            Ok(Some(pdu)) => Attempt {
                outcome: request.decode_reply(&pdu),
                pdu: Some(pdu),
            },
            Ok(None) => {
                // A late RTU reply must land before the next request; on
                // Modbus TCP its transaction id tells it apart.
                if matches!(self.framing, Framing::Rtu) {
                    self.quiet_until += settle_time(&self.config, limit);
                }
                failed(if self.rx.is_empty() {
                    TxError::Timeout(limit)
                } else {
                    TxError::Garbled(self.garbage())
                })
            }
            Err(ReadError::Crc) => failed(TxError::Crc),
            Err(ReadError::Io(e)) => failed(self.transport_failed(&e)),
        };
        (attempt, frame)
    }

    /// Discards stale input, then writes `bytes`, within `limit`.
    async fn send(&mut self, bytes: &[u8], limit: Duration) -> io::Result<()> {
        let link = self
            .link
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        link.discard_input()?;
        match timeout(limit, async {
            link.write_all(bytes).await?;
            link.flush().await
        })
        .await
        {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request could not be written in time",
            )),
        }
    }

    /// Reads until the reply of `unit` to `request` is in `rx` (its PDU is
    /// returned), a whole frame with a bad CRC came, or `deadline` passed
    /// (`None`).
    async fn read_reply(
        &mut self,
        unit: UnitId,
        request: &Request,
        deadline: Instant,
    ) -> Result<Option<Vec<u8>>, ReadError> {
        self.rx.clear();
        loop {
            match rtu::find_reply(&self.rx, unit.get(), request) {
                Scan::Found(range) => {
                    return Ok(self
                        .rx
                        .get(range.start + 1..range.end - 2)
                        .map(<[u8]>::to_vec))
                }
                Scan::BadCrc => return Err(ReadError::Crc),
                Scan::Partial | Scan::Nothing => {}
            }
            if !self.receive(deadline).await? {
                return Ok(None);
            }
            // A slave streaming garbage cannot grow the buffer.
            if self.rx.len() > 2 * rtu::MAX_FRAME {
                let excess = self.rx.len() - rtu::MAX_FRAME;
                self.rx.drain(..excess);
            }
        }
    }

    /// Modbus TCP: reads frames until the one with transaction id `tid`
    /// from `unit` (its PDU), or `deadline` (`None`). Replies to earlier
    /// requests and other units' are dropped and waited past; bytes that
    /// are no MBAP frame put the stream out of step, so the connection is
    /// closed and made again.
    async fn read_mbap_reply(
        &mut self,
        tid: u16,
        unit: UnitId,
        deadline: Instant,
    ) -> Result<Option<Vec<u8>>, ReadError> {
        self.rx.clear();
        loop {
            match mbap::next_frame(&self.rx) {
                mbap::Next::Frame {
                    tid: got,
                    unit: from,
                    pdu,
                    len,
                } => {
                    if got == tid && from == unit.get() {
                        return Ok(self.rx.get(pdu).map(<[u8]>::to_vec));
                    }
                    log::debug!(target: "bus", "bus {}: dropped a reply with transaction id {got} from unit {from} (waiting for {tid} from {unit})", self.config.name);
                    self.rx.drain(..len);
                    continue;
                }
                mbap::Next::Garbage => {
                    return Err(ReadError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("not a Modbus TCP stream ({})", self.garbage()),
                    )))
                }
                mbap::Next::Partial => {}
            }
            if !self.receive(deadline).await? {
                return Ok(None);
            }
        }
    }

    /// Appends what arrives next to `rx`, with the peer's packets that are
    /// not frames removed; `false` when `deadline` passed first.
    async fn receive(&mut self, deadline: Instant) -> Result<bool, ReadError> {
        let link = self
            .link
            .as_mut()
            .ok_or_else(|| ReadError::Io(io::ErrorKind::NotConnected.into()))?;
        let mut chunk = [0u8; rtu::MAX_FRAME + mbap::HEADER];
        match timeout_at(deadline, link.read(&mut chunk)).await {
            Err(_) => Ok(false),
            Ok(Ok(0)) => Err(ReadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the line closed",
            ))),
            Ok(Ok(n)) => {
                self.rx.extend_from_slice(&chunk[..n]);
                strip_packets(&mut self.rx, &self.not_frames);
                Ok(true)
            }
            Ok(Err(e)) => Err(ReadError::Io(e)),
        }
    }

    /// What arrived instead of a reply, for the error message.
    fn garbage(&self) -> String {
        let shown = &self.rx[..self.rx.len().min(16)];
        format!(
            "{} bytes that are no reply ({}{})",
            self.rx.len(),
            to_hex(shown),
            if self.rx.len() > shown.len() {
                " …"
            } else {
                ""
            }
        )
    }

    /// Transparent bus: writes `bytes` as they are and returns what arrives
    /// until the line is idle for 3.5 character times (at most
    /// [`RAW_REPLY_MAX`] bytes). No reply within the bus timeout is
    /// [`TxError::Timeout`].
    pub async fn exchange(&mut self, bytes: &[u8]) -> Result<Vec<u8>, TxError> {
        if self.config.mode != BusMode::Transparent {
            return Err(TxError::Port(
                "not a transparent bus (mode = \"rtu\")".into(),
            ));
        }
        self.ensure_open().await?;
        let limit = self.config.timeout;
        self.promise(limit);
        self.gap.until(self.quiet_until).await;
        // The OS timer cannot resolve less than a millisecond.
        let idle = self.frame_gap().max(Duration::from_millis(1));
        if let Err(e) = self.send(bytes, limit).await {
            return Err(self.transport_failed(&e));
        }
        let Some(link) = self.link.as_mut() else {
            return Err(TxError::Port("the port closed".into()));
        };
        let mut reply = Vec::new();
        let mut buf = [0u8; 256];
        let mut wait = limit;
        let outcome: io::Result<()> = loop {
            if reply.len() >= RAW_REPLY_MAX {
                break Ok(());
            }
            match timeout(wait, link.read(&mut buf)).await {
                Err(_) | Ok(Ok(0)) => break Ok(()),
                Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => break Err(e),
            }
            wait = idle;
        };
        self.quiet_until = Instant::now() + self.frame_gap() + self.config.delay;
        if let Err(e) = outcome {
            return Err(self.transport_failed(&e));
        }
        reply.truncate(RAW_REPLY_MAX);
        if reply.is_empty() {
            return Err(TxError::Timeout(limit));
        }
        Ok(reply)
    }
}

enum ReadError {
    Crc,
    Io(io::Error),
}

/// Removes `packets` (registration, heartbeat) from the front of `rx`, as
/// often as they appear there: they come between frames, never inside one.
fn strip_packets(rx: &mut Vec<u8>, packets: &[Vec<u8>]) {
    while let Some(p) = packets.iter().find(|p| !p.is_empty() && rx.starts_with(p)) {
        rx.drain(..p.len());
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory line and a minimal RTU slave on its far end, for unit
    //! tests that run on tokio's paused clock.

    use super::*;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use tokio::io::{DuplexStream, ReadBuf};

    /// Our end of the line.
    impl Stream for DuplexStream {
        fn discard_input(&mut self) -> io::Result<()> {
            let waker = futures::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            let mut scratch = [0u8; 256];
            loop {
                let mut buf = ReadBuf::new(&mut scratch);
                match Pin::new(&mut *self).poll_read(&mut cx, &mut buf) {
                    Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                    _ => return Ok(()),
                }
            }
        }
    }

    /// What the fake slave answers to one request frame.
    pub(crate) type Answer = Box<dyn FnMut(&[u8]) -> Vec<Vec<u8>> + Send>;

    /// A slave that holds 64 holding registers and answers FC03/FC06/FC16
    /// after `think`, logging every request frame.
    pub(crate) struct Slave {
        pub(crate) holding: [u16; 64],
        pub(crate) log: Vec<Vec<u8>>,
        pub(crate) silent: bool,
    }

    impl Slave {
        pub(crate) fn answer(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
            self.log.push(frame.to_vec());
            if self.silent {
                return None;
            }
            let (unit, request) = rtu::parse_request(frame).ok()?;
            let pdu = match request {
                Request::ReadHolding(a, n) => {
                    let mut pdu = vec![0x03, u8::try_from(n * 2).ok()?];
                    for i in a..a + n {
                        pdu.extend(self.holding.get(usize::from(i))?.to_be_bytes());
                    }
                    pdu
                }
                Request::WriteRegister(a, v) => {
                    *self.holding.get_mut(usize::from(a))? = v;
                    request.pdu()
                }
                Request::WriteRegisters(a, ref v) => {
                    for (i, w) in v.iter().enumerate() {
                        *self.holding.get_mut(usize::from(a) + i)? = *w;
                    }
                    let mut pdu = vec![0x10];
                    pdu.extend(a.to_be_bytes());
                    pdu.extend(u16::try_from(v.len()).ok()?.to_be_bytes());
                    pdu
                }
                _ => vec![request.function_code().value() | 0x80, 0x01],
            };
            Some(rtu::adu(unit.get(), &pdu))
        }
    }

    /// A bus over an in-memory line; the far end answers with `answer`
    /// (every returned chunk is written after `think`).
    pub(crate) fn line(config: config::Bus, think: Duration, mut answer: Answer) -> Bus {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok(n) = theirs.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let chunks = answer(&buf[..n]);
                tokio::time::sleep(think).await;
                for chunk in chunks {
                    if theirs.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            }
        });
        Bus::over(config, Box::new(ours))
    }

    /// A bus over a line to `slave`.
    pub(crate) fn slave(config: config::Bus, think: Duration, slave: Arc<Mutex<Slave>>) -> Bus {
        line(
            config,
            think,
            Box::new(move |frame| {
                let mut s = slave.lock().unwrap_or_else(|e| e.into_inner());
                s.answer(frame).into_iter().collect()
            }),
        )
    }

    pub(crate) fn bus_config() -> config::Bus {
        config::Bus {
            transport: config::Transport::Serial,
            name: "line".into(),
            port: "(memory)".into(),
            baud: 115_200,
            parity: config::Parity::None,
            data_bits: 8,
            stop_bits: 1,
            timeout: Duration::from_millis(100),
            retries: 1,
            delay: Duration::ZERO,
            mode: BusMode::Rtu,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use std::sync::{Arc, Mutex};

    fn unit() -> UnitId {
        UnitId::new(1).unwrap()
    }

    fn reply(regs: &[u16]) -> Vec<u8> {
        let mut pdu = vec![0x03, (regs.len() * 2) as u8];
        pdu.extend(regs.iter().flat_map(|r| r.to_be_bytes()));
        rtu::adu(1, &pdu)
    }

    /// Defect 2: noise, a CRC-failing reply and a CRC-valid reply with a bad
    /// PDU are each one failed attempt; the port stays open and the next
    /// attempt (the retry) succeeds.
    #[tokio::test(start_paused = true)]
    async fn noise_is_one_failed_attempt_and_the_port_stays_open() {
        let good = reply(&[0x1234]);
        let mut bad_crc = good.clone();
        bad_crc[3] ^= 0xFF;
        let bad_pdu = rtu::adu(1, &[0x03, 0x02, 0x12]); // byte count says 2, carries 1
        let garbage = vec![0xA5; 300];
        let faults = vec![bad_crc, bad_pdu, garbage, good[..5].to_vec()];
        for fault in faults {
            let mut calls = 0;
            let good = good.clone();
            let mut bus = line(
                bus_config(),
                Duration::from_millis(1),
                Box::new(move |_| {
                    calls += 1;
                    if calls == 1 {
                        vec![fault.clone()]
                    } else {
                        vec![good.clone()]
                    }
                }),
            );
            let got = bus
                .transact(unit(), &Request::ReadHolding(0, 1), None)
                .await;
            assert_eq!(got, Ok(Reply::Registers(vec![0x1234])));
            assert!(bus.is_open(), "noise must not close the port");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn noise_before_the_reply_is_skipped() {
        let mut noisy = vec![0x00, 0xFF, 0x01, 0x83];
        noisy.extend(reply(&[7, 8]));
        let mut bus = line(
            bus_config(),
            Duration::from_millis(1),
            Box::new(move |_| vec![noisy.clone()]),
        );
        let got = bus
            .transact(unit(), &Request::ReadHolding(0, 2), None)
            .await;
        assert_eq!(got, Ok(Reply::Registers(vec![7, 8])));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_in_pieces_is_assembled_and_an_exception_is_final_for_writes() {
        let frame = reply(&[1, 2, 3]);
        let (a, b) = frame.split_at(4);
        let (a, b) = (a.to_vec(), b.to_vec());
        let mut bus = line(
            bus_config(),
            Duration::from_millis(1),
            Box::new(move |_| vec![a.clone(), b.clone()]),
        );
        let got = bus
            .transact(unit(), &Request::ReadHolding(0, 3), None)
            .await;
        assert_eq!(got, Ok(Reply::Registers(vec![1, 2, 3])));

        let slave = Arc::new(Mutex::new(Slave {
            holding: [0; 64],
            log: vec![],
            silent: false,
        }));
        let mut bus = fake::slave(bus_config(), Duration::from_millis(1), slave.clone());
        let got = bus
            .transact(unit(), &Request::WriteCoil(0, true), None)
            .await;
        assert!(matches!(got, Err(TxError::Exception(_))), "{got:?}");
        assert_eq!(
            slave.lock().unwrap().log.len(),
            1,
            "an exception to a write is not retried"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silence_is_a_timeout_after_every_retry_then_the_line_settles() {
        let slave = Arc::new(Mutex::new(Slave {
            holding: [0; 64],
            log: vec![],
            silent: true,
        }));
        let mut config = bus_config();
        config.retries = 2;
        let mut bus = fake::slave(config, Duration::ZERO, slave.clone());
        let start = Instant::now();
        let got = bus
            .transact(unit(), &Request::ReadHolding(0, 1), None)
            .await;
        assert_eq!(got, Err(TxError::Timeout(Duration::from_millis(100))));
        assert_eq!(slave.lock().unwrap().log.len(), 3);
        // Three timeouts and two settle times of 50 ms between them.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(420),
            "{took:?}"
        );
        assert!(bus.is_open());
    }
}

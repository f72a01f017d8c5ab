//! The serial bus: one [`Bus`] owns one port and runs one Modbus RTU
//! transaction at a time, with the bus's response timeout, retries and
//! inter-transaction delay. A port that disappears is reopened with capped
//! backoff; until then transactions fail fast instead of blocking. A
//! `transparent` bus carries raw bytes instead ([`Bus::exchange`]).

pub mod frame;
mod port;

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use crate::config::{self, Address, Area, UnitId};

use tokio_serial::SerialStream;

/// One Modbus request, as the poller and the downlink express it.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    ReadCoils(Address, u16),
    ReadDiscretes(Address, u16),
    ReadHolding(Address, u16),
    ReadInput(Address, u16),
    WriteCoil(Address, bool),
    WriteCoils(Address, Vec<bool>),
    WriteRegister(Address, u16),
    WriteRegisters(Address, Vec<u16>),
}

impl Request {
    /// The area, first address and count the request touches.
    pub fn span(&self) -> (Area, Address, u16) {
        match self {
            Request::ReadCoils(a, n) => (Area::Coil, *a, *n),
            Request::ReadDiscretes(a, n) => (Area::Discrete, *a, *n),
            Request::ReadHolding(a, n) => (Area::Holding, *a, *n),
            Request::ReadInput(a, n) => (Area::Input, *a, *n),
            Request::WriteCoil(a, _) => (Area::Coil, *a, 1),
            Request::WriteCoils(a, v) => (Area::Coil, *a, v.len() as u16),
            Request::WriteRegister(a, _) => (Area::Holding, *a, 1),
            Request::WriteRegisters(a, v) => (Area::Holding, *a, v.len() as u16),
        }
    }

    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Request::ReadCoils(..)
                | Request::ReadDiscretes(..)
                | Request::ReadHolding(..)
                | Request::ReadInput(..)
        )
    }

    /// Bytes of the RTU request frame and of its normal response frame.
    pub fn frame_sizes(&self) -> (usize, usize) {
        let bits_bytes = |n: u16| usize::from(n).div_ceil(8);
        match self {
            Request::ReadCoils(_, n) | Request::ReadDiscretes(_, n) => (8, 5 + bits_bytes(*n)),
            Request::ReadHolding(_, n) | Request::ReadInput(_, n) => (8, 5 + 2 * usize::from(*n)),
            Request::WriteCoil(..) | Request::WriteRegister(..) => (8, 8),
            Request::WriteCoils(_, v) => (9 + v.len().div_ceil(8), 8),
            Request::WriteRegisters(_, v) => (9 + 2 * v.len(), 8),
        }
    }

    fn to_modbus(&self) -> tokio_modbus::Request<'_> {
        use tokio_modbus::Request as M;
        match self {
            Request::ReadCoils(a, n) => M::ReadCoils(*a, *n),
            Request::ReadDiscretes(a, n) => M::ReadDiscreteInputs(*a, *n),
            Request::ReadHolding(a, n) => M::ReadHoldingRegisters(*a, *n),
            Request::ReadInput(a, n) => M::ReadInputRegisters(*a, *n),
            Request::WriteCoil(a, v) => M::WriteSingleCoil(*a, *v),
            Request::WriteCoils(a, v) => M::WriteMultipleCoils(*a, v.into()),
            Request::WriteRegister(a, v) => M::WriteSingleRegister(*a, *v),
            Request::WriteRegisters(a, v) => M::WriteMultipleRegisters(*a, v.into()),
        }
    }

    /// Checks that `response` answers this request (count, address, echo) and
    /// unpacks it. RTU carries no transaction id, so this is the last line of
    /// defence against a stray frame being taken for our answer.
    fn accept(&self, response: tokio_modbus::Response) -> Result<Reply, TxError> {
        use tokio_modbus::Response as R;
        let mismatch = |what: &str| Err(TxError::Mismatch(what.to_string()));
        match (self, response) {
            (Request::ReadCoils(_, n), R::ReadCoils(mut bits))
            | (Request::ReadDiscretes(_, n), R::ReadDiscreteInputs(mut bits)) => {
                if bits.len() != usize::from(*n).div_ceil(8) * 8 {
                    return mismatch("bit count differs from the request");
                }
                bits.truncate(usize::from(*n));
                Ok(Reply::Bits(bits))
            }
            (Request::ReadHolding(_, n), R::ReadHoldingRegisters(regs))
            | (Request::ReadInput(_, n), R::ReadInputRegisters(regs)) => {
                if regs.len() != usize::from(*n) {
                    return mismatch("register count differs from the request");
                }
                Ok(Reply::Registers(regs))
            }
            (Request::WriteCoil(a, v), R::WriteSingleCoil(ra, rv)) if (*a, *v) == (ra, rv) => {
                Ok(Reply::Written)
            }
            (Request::WriteRegister(a, v), R::WriteSingleRegister(ra, rv))
                if (*a, *v) == (ra, rv) =>
            {
                Ok(Reply::Written)
            }
            (Request::WriteCoils(a, v), R::WriteMultipleCoils(ra, n))
                if *a == ra && v.len() == usize::from(n) =>
            {
                Ok(Reply::Written)
            }
            (Request::WriteRegisters(a, v), R::WriteMultipleRegisters(ra, n))
                if *a == ra && v.len() == usize::from(n) =>
            {
                Ok(Reply::Written)
            }
            _ => mismatch("response does not echo the request"),
        }
    }
}

/// What a successful transaction returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Bits(Vec<bool>),
    Registers(Vec<u16>),
    Written,
}

/// Why a transaction failed after its retries.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TxError {
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("exception {code:#04x} ({name})", code = u8::from(*.0), name = exception_name(*.0))]
    Exception(ExceptionCode),
    #[error("invalid response: {0}")]
    Mismatch(String),
    #[error("serial port unavailable: {0}")]
    Port(String),
}

impl TxError {
    /// A short stable label, so logs can report state changes, not every cycle.
    pub fn kind(&self) -> &'static str {
        match self {
            TxError::Timeout(_) => "timeout",
            TxError::Exception(_) => "exception",
            TxError::Mismatch(_) => "invalid response",
            TxError::Port(_) => "port",
        }
    }
}

fn exception_name(code: ExceptionCode) -> &'static str {
    match code {
        ExceptionCode::IllegalFunction => "illegal function",
        ExceptionCode::IllegalDataAddress => "illegal data address",
        ExceptionCode::IllegalDataValue => "illegal data value",
        ExceptionCode::ServerDeviceFailure => "server device failure",
        ExceptionCode::Acknowledge => "acknowledge",
        ExceptionCode::ServerDeviceBusy => "server device busy",
        ExceptionCode::MemoryParityError => "memory parity error",
        ExceptionCode::GatewayPathUnavailable => "gateway path unavailable",
        ExceptionCode::GatewayTargetDevice => "gateway target device failed to respond",
        _ => "custom",
    }
}

const REOPEN_MIN: Duration = Duration::from_secs(1);
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// After a timeout, how long the line must stay untouched before the next
/// request, so that a slow slave's late reply lands (and is discarded)
/// before we transmit again instead of during the next transaction.
fn settle_time(bus: &config::Bus, timeout: Duration) -> Duration {
    (timeout / 2).clamp(bus.frame_gap(), Duration::from_millis(250))
}

/// Longest reply a transparent bus collects for one request.
pub const RAW_REPLY_MAX: usize = 4096;

/// An open port: a Modbus RTU client, or raw bytes on a transparent bus.
enum Link {
    Rtu(Context),
    Raw(port::Port),
}

/// The owner of one serial port.
pub struct Bus {
    config: config::Bus,
    link: Option<Link>,
    /// Earliest time the next transaction may start (inter-frame gap, `delay`,
    /// settle time after a timeout).
    quiet_until: Instant,
    reopen_at: Instant,
    reopen_delay: Duration,
    /// The last open error, reported while the port stays down.
    down: Option<String>,
}

impl Bus {
    /// A bus whose port is opened on the first transaction.
    pub fn new(config: config::Bus) -> Self {
        let now = Instant::now();
        Self {
            config,
            link: None,
            quiet_until: now,
            reopen_at: now,
            reopen_delay: REOPEN_MIN,
            down: None,
        }
    }

    pub fn config(&self) -> &config::Bus {
        &self.config
    }

    fn attach(&self, stream: SerialStream) -> Link {
        let port = port::Port::new(stream);
        match self.config.mode {
            config::BusMode::Rtu => {
                Link::Rtu(tokio_modbus::client::rtu::attach_slave(port, Slave(0)))
            }
            config::BusMode::Transparent => Link::Raw(port),
        }
    }

    /// Opens the port if it is closed and its backoff has passed. Errors are
    /// logged once per outage, with the reason.
    pub fn ensure_open(&mut self) -> Result<(), TxError> {
        if self.link.is_some() {
            return Ok(());
        }
        let now = Instant::now();
        if now < self.reopen_at {
            return Err(TxError::Port(self.down.clone().unwrap_or_default()));
        }
        match port::open(&self.config) {
            Ok(stream) => {
                if self.down.take().is_some() {
                    log::info!(target: "bus", "bus {}: port {} is back", self.config.name, self.config.port);
                }
                self.link = Some(self.attach(stream));
                self.reopen_delay = REOPEN_MIN;
                Ok(())
            }
            Err(e) => {
                let reason = format!("cannot open {}: {e}", self.config.port);
                // Logged when the outage starts, not at every reopen attempt.
                if self.down.is_none() {
                    log::error!(target: "bus", bus = self.config.name.as_str(); "bus {}: {reason}; retrying with backoff up to {}s", self.config.name, REOPEN_MAX.as_secs());
                } else {
                    log::debug!(target: "bus", "bus {}: {reason}", self.config.name);
                }
                self.port_lost(reason.clone());
                Err(TxError::Port(reason))
            }
        }
    }

    fn port_lost(&mut self, reason: String) {
        self.link = None;
        self.down = Some(reason);
        self.reopen_at = Instant::now() + self.reopen_delay;
        self.reopen_delay = (self.reopen_delay * 2).min(REOPEN_MAX);
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
            let result = self.attempt(unit, request, timeout).await;
            match &result {
                Ok(_) | Err(TxError::Port(_)) => return result,
                Err(TxError::Exception(_)) if request.is_write() => return result,
                Err(_) if attempt >= self.config.retries => return result,
                Err(e) => log::debug!(
                    target: "bus",
                    "bus {} unit {unit}: {e}; retry {}/{}",
                    self.config.name,
                    attempt + 1,
                    self.config.retries
                ),
            }
            attempt += 1;
        }
    }

    /// One try, no retries: used by `scan`, which probes many silent ids,
    /// and for raw frames, which run as exactly one transaction.
    pub async fn attempt(
        &mut self,
        unit: UnitId,
        request: &Request,
        limit: Duration,
    ) -> Result<Reply, TxError> {
        self.ensure_open()?;
        sleep_until(self.quiet_until).await;
        let Some(Link::Rtu(ctx)) = self.link.as_mut() else {
            return Err(TxError::Port(
                "not open as a Modbus RTU bus (mode = \"transparent\"?)".into(),
            ));
        };
        ctx.set_slave(Slave(unit.get()));
        let outcome = timeout(limit, ctx.call(request.to_modbus())).await;
        let gap = self.config.frame_gap() + self.config.delay;
        self.quiet_until = Instant::now() + gap;
        match outcome {
            Err(_) => {
                self.quiet_until += settle_time(&self.config, limit);
                Err(TxError::Timeout(limit))
            }
            Ok(Ok(Ok(response))) => request.accept(response),
            Ok(Ok(Err(code))) => Err(TxError::Exception(code)),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(TxError::Mismatch(e.to_string())),
            Ok(Err(tokio_modbus::Error::Transport(e))) => Err(self.transport_error(e)),
        }
    }

    /// Transparent bus: writes `bytes` as they are and returns what arrives
    /// until the line is idle for 3.5 character times (at most
    /// [`RAW_REPLY_MAX`] bytes). No reply within the bus timeout is
    /// [`TxError::Timeout`].
    pub async fn exchange(&mut self, bytes: &[u8]) -> Result<Vec<u8>, TxError> {
        self.ensure_open()?;
        sleep_until(self.quiet_until).await;
        let limit = self.config.timeout;
        // The OS timer cannot resolve less than a millisecond.
        let idle = self.config.frame_gap().max(Duration::from_millis(1));
        let Some(Link::Raw(port)) = self.link.as_mut() else {
            return Err(TxError::Port(
                "not open as a transparent bus (mode = \"rtu\"?)".into(),
            ));
        };
        let mut reply = Vec::new();
        let outcome: io::Result<()> = async {
            port.write_all(bytes).await?;
            let mut buf = [0u8; 256];
            let mut wait = limit;
            while reply.len() < RAW_REPLY_MAX {
                match timeout(wait, port.read(&mut buf)).await {
                    Err(_) => break,
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
                    Ok(Err(e)) => return Err(e),
                }
                wait = idle;
            }
            Ok(())
        }
        .await;
        self.quiet_until = Instant::now() + self.config.frame_gap() + self.config.delay;
        if let Err(e) = outcome {
            return Err(self.transport_error(e));
        }
        reply.truncate(RAW_REPLY_MAX);
        if reply.is_empty() {
            return Err(TxError::Timeout(limit));
        }
        Ok(reply)
    }

    /// Separates a vanished port (reopen it) from a garbled frame (retry).
    fn transport_error(&mut self, e: io::Error) -> TxError {
        match e.kind() {
            io::ErrorKind::InvalidData => TxError::Mismatch(e.to_string()),
            _ => {
                let reason = format!("{} failed: {e}", self.config.port);
                log::error!(target: "bus", bus = self.config.name.as_str(); "bus {}: {reason}; reopening", self.config.name);
                self.port_lost(reason.clone());
                TxError::Port(reason)
            }
        }
    }
}

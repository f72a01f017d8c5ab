//! One home for Modbus knowledge: the requests fieldgate makes and their
//! per-request limits, how a request PDU is written and a reply PDU read
//! back and checked against its request, and why a transaction failed.
//! [`rtu`] adds RTU framing (unit id, CRC) and the strict parser for raw
//! frames from the platform. Function codes, exception codes and their names,
//! and the decoding of response PDUs come from tokio-modbus; the CRC from
//! the `crc` crate.

pub mod mbap;
pub mod rtu;

use std::fmt;
use std::time::Duration;

use tokio_modbus::bytes::Bytes;
pub use tokio_modbus::{ExceptionCode, FunctionCode};

/// A 0-based Modbus protocol address (register 40001 = holding 0).
pub type Address = u16;

/// Registers in one read (FC03/FC04) and bits in one read (FC01/FC02).
pub const MAX_READ_REGISTERS: u16 = 125;
pub const MAX_READ_BITS: u16 = 2000;
/// Registers in one FC16 and coils in one FC15.
pub const MAX_WRITE_REGISTERS: u16 = 123;
pub const MAX_WRITE_COILS: u16 = 1968;

/// A Modbus slave id, 1..=247.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnitId(u8);

impl UnitId {
    pub const MIN: u8 = 1;
    pub const MAX: u8 = 247;

    pub fn new(id: u8) -> Option<Self> {
        (Self::MIN..=Self::MAX).contains(&id).then_some(Self(id))
    }

    pub fn get(self) -> u8 {
        self.0
    }
}

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The four data areas of a slave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Area {
    Coil,
    Discrete,
    Input,
    Holding,
}

impl Area {
    /// Coils and discrete inputs are bit areas; the others are 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Area::Coil | Area::Discrete)
    }

    /// The protocol's per-read limit: 2000 bits or 125 registers.
    pub fn max_per_read(self) -> u16 {
        if self.is_bits() {
            MAX_READ_BITS
        } else {
            MAX_READ_REGISTERS
        }
    }

    /// "a coil", "an input register": for messages.
    pub fn noun(self) -> &'static str {
        match self {
            Area::Coil => "a coil",
            Area::Discrete => "a discrete input",
            Area::Input => "an input register",
            Area::Holding => "a holding register",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Area::Coil => "coil",
            Area::Discrete => "discrete",
            Area::Input => "input",
            Area::Holding => "holding",
        }
    }
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
    /// A read of `count` registers or bits of `area` from `start`.
    pub fn read(area: Area, start: Address, count: u16) -> Self {
        match area {
            Area::Coil => Request::ReadCoils(start, count),
            Area::Discrete => Request::ReadDiscretes(start, count),
            Area::Input => Request::ReadInput(start, count),
            Area::Holding => Request::ReadHolding(start, count),
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

    /// Our request for one of tokio-modbus's, if it is one we make.
    pub fn from_modbus(request: &tokio_modbus::Request<'_>) -> Option<Self> {
        use tokio_modbus::Request as M;
        Some(match request {
            M::ReadCoils(a, n) => Request::ReadCoils(*a, *n),
            M::ReadDiscreteInputs(a, n) => Request::ReadDiscretes(*a, *n),
            M::ReadHoldingRegisters(a, n) => Request::ReadHolding(*a, *n),
            M::ReadInputRegisters(a, n) => Request::ReadInput(*a, *n),
            M::WriteSingleCoil(a, v) => Request::WriteCoil(*a, *v),
            M::WriteMultipleCoils(a, v) => Request::WriteCoils(*a, v.to_vec()),
            M::WriteSingleRegister(a, v) => Request::WriteRegister(*a, *v),
            M::WriteMultipleRegisters(a, v) => Request::WriteRegisters(*a, v.to_vec()),
            _ => return None,
        })
    }

    pub fn function_code(&self) -> FunctionCode {
        self.to_modbus().function_code()
    }

    /// The area, first address and count the request touches.
    pub fn span(&self) -> (Area, Address, u16) {
        let len = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        match self {
            Request::ReadCoils(a, n) => (Area::Coil, *a, *n),
            Request::ReadDiscretes(a, n) => (Area::Discrete, *a, *n),
            Request::ReadHolding(a, n) => (Area::Holding, *a, *n),
            Request::ReadInput(a, n) => (Area::Input, *a, *n),
            Request::WriteCoil(a, _) => (Area::Coil, *a, 1),
            Request::WriteCoils(a, v) => (Area::Coil, *a, len(v.len())),
            Request::WriteRegister(a, _) => (Area::Holding, *a, 1),
            Request::WriteRegisters(a, v) => (Area::Holding, *a, len(v.len())),
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

    /// The request PDU: function code and data.
    pub fn pdu(&self) -> Vec<u8> {
        let mut out = vec![self.function_code().value()];
        let (_, address, count) = self.span();
        out.extend(address.to_be_bytes());
        match self {
            Request::ReadCoils(..)
            | Request::ReadDiscretes(..)
            | Request::ReadHolding(..)
            | Request::ReadInput(..) => out.extend(count.to_be_bytes()),
            Request::WriteCoil(_, on) => out.extend(coil_word(*on).to_be_bytes()),
            Request::WriteRegister(_, value) => out.extend(value.to_be_bytes()),
            Request::WriteCoils(_, bits) => {
                out.extend(count.to_be_bytes());
                let packed = pack_bits(bits);
                out.push(u8::try_from(packed.len()).unwrap_or(u8::MAX));
                out.extend(packed);
            }
            Request::WriteRegisters(_, words) => {
                out.extend(count.to_be_bytes());
                out.push(u8::try_from(words.len() * 2).unwrap_or(u8::MAX));
                out.extend(words.iter().flat_map(|w| w.to_be_bytes()));
            }
        }
        out
    }

    /// Length of the normal response PDU to this request.
    pub fn response_pdu_len(&self) -> usize {
        match self {
            Request::ReadCoils(_, n) | Request::ReadDiscretes(_, n) => {
                2 + usize::from(*n).div_ceil(8)
            }
            Request::ReadHolding(_, n) | Request::ReadInput(_, n) => 2 + 2 * usize::from(*n),
            _ => 5,
        }
    }

    /// Bytes of the RTU request frame and of its normal response frame.
    pub fn frame_sizes(&self) -> (usize, usize) {
        (self.pdu().len() + 3, self.response_pdu_len() + 3)
    }

    /// Reads a response PDU (normal or exception) and checks that it answers
    /// this request (function, count, address, echo). RTU carries no
    /// transaction id, so this is the last line of defence against a stray
    /// frame being taken for our answer.
    pub fn decode_reply(&self, pdu: &[u8]) -> Result<Reply, TxError> {
        let fc = self.function_code().value();
        match pdu {
            [code, exception] if *code == fc | 0x80 => {
                return Err(TxError::Exception(ExceptionCode::new(*exception)));
            }
            [code, ..] if *code == fc => {}
            _ => return Err(TxError::Garbled("the reply is for another function".into())),
        }
        if pdu.len() != self.response_pdu_len() {
            return Err(TxError::Garbled(format!(
                "a reply of {} bytes, {} expected",
                pdu.len(),
                self.response_pdu_len()
            )));
        }
        let response = tokio_modbus::Response::try_from(Bytes::copy_from_slice(pdu))
            .map_err(|e| TxError::Garbled(e.to_string()))?;
        self.accept(response)
    }

    fn accept(&self, response: tokio_modbus::Response) -> Result<Reply, TxError> {
        use tokio_modbus::Response as R;
        let mismatch = |what: &str| Err(TxError::Garbled(what.to_string()));
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
            _ => mismatch("the reply does not echo the request"),
        }
    }
}

impl fmt::Display for Request {
    /// `FC03 holding 0 +10`: for logs and the trace.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (area, address, count) = self.span();
        write!(
            f,
            "FC{:02X} {area} {address} +{count}",
            self.function_code().value()
        )
    }
}

/// 0xFF00 for on, 0x0000 for off: a coil in FC05.
fn coil_word(on: bool) -> u16 {
    if on {
        0xFF00
    } else {
        0x0000
    }
}

/// Bits packed eight to a byte, LSB first (FC01/02 replies, FC15 requests).
pub fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut packed = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, on)| **on) {
        packed[i / 8] |= 1 << (i % 8);
    }
    packed
}

/// What a successful transaction returned.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Bits(Vec<bool>),
    Registers(Vec<u16>),
    Written,
}

/// Why a transaction failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TxError {
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("exception {code:#04x} ({0})", code = u8::from(*.0))]
    Exception(ExceptionCode),
    #[error("a reply with a bad CRC (noise on the line?)")]
    Crc,
    #[error("invalid response: {0}")]
    Garbled(String),
    #[error("{0}")]
    Port(String),
}

impl TxError {
    /// A short stable label, so logs report state changes, not every cycle;
    /// also the outcome shown by the trace.
    pub fn kind(&self) -> &'static str {
        match self {
            TxError::Timeout(_) => "timeout",
            TxError::Exception(_) => "exception",
            TxError::Crc => "crc",
            TxError::Garbled(_) => "garbled",
            TxError::Port(_) => "disconnected",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdus_of_each_function() {
        assert_eq!(
            Request::ReadHolding(0x6B, 3).pdu(),
            [0x03, 0x00, 0x6B, 0x00, 0x03]
        );
        assert_eq!(
            Request::WriteCoil(0xAC, true).pdu(),
            [0x05, 0x00, 0xAC, 0xFF, 0x00]
        );
        assert_eq!(
            Request::WriteCoils(
                0x13,
                vec![true, false, true, true, false, false, true, true, true, false]
            )
            .pdu(),
            [0x0F, 0x00, 0x13, 0x00, 0x0A, 0x02, 0xCD, 0x01]
        );
        assert_eq!(
            Request::WriteRegisters(1, vec![0x000A, 0x0102]).pdu(),
            [0x10, 0x00, 0x01, 0x00, 0x02, 0x04, 0x00, 0x0A, 0x01, 0x02]
        );
        assert_eq!(Request::ReadInput(8, 1).frame_sizes(), (8, 7));
        assert_eq!(Request::ReadCoils(0, 9).frame_sizes(), (8, 7));
        assert_eq!(
            Request::WriteRegisters(1, vec![1, 2]).frame_sizes(),
            (13, 8)
        );
    }

    #[test]
    fn replies_are_checked_against_their_request() {
        let read = Request::ReadHolding(0x6B, 3);
        assert_eq!(
            read.decode_reply(&[0x03, 0x06, 0x02, 0x2B, 0x00, 0x00, 0x00, 0x64]),
            Ok(Reply::Registers(vec![0x022B, 0, 0x64]))
        );
        assert_eq!(
            read.decode_reply(&[0x83, 0x02]),
            Err(TxError::Exception(ExceptionCode::IllegalDataAddress))
        );
        assert!(matches!(
            read.decode_reply(&[0x03, 0x02, 0, 1]),
            Err(TxError::Garbled(_))
        ));
        assert!(matches!(
            read.decode_reply(&[0x04, 0x06, 0, 0, 0, 0, 0, 0]),
            Err(TxError::Garbled(_))
        ));
        let write = Request::WriteRegister(1, 3);
        assert_eq!(write.decode_reply(&[0x06, 0, 1, 0, 3]), Ok(Reply::Written));
        assert!(write.decode_reply(&[0x06, 0, 1, 0, 4]).is_err());
        let bits = Request::ReadCoils(0x13, 9);
        assert_eq!(
            bits.decode_reply(&[0x01, 0x02, 0xCD, 0x01]),
            Ok(Reply::Bits(vec![
                true, false, true, true, false, false, true, true, true
            ]))
        );
        assert_eq!(
            TxError::Exception(ExceptionCode::ServerDeviceFailure).to_string(),
            "exception 0x04 (Server device failure)"
        );
    }
}

//! Modbus RTU framing: a unit id before the PDU and a CRC-16 after it.
//! [`find_reply`] picks our answer out of whatever the line delivered
//! (noise before it included); [`parse_request`] checks a raw request frame
//! from the platform so strictly that nothing malformed reaches the wire.

use std::ops::Range;

use super::{
    Request, UnitId, MAX_READ_BITS, MAX_READ_REGISTERS, MAX_WRITE_COILS, MAX_WRITE_REGISTERS,
};

const CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS);

/// The longest RTU frame (Modbus over serial line, §2.5.1).
pub const MAX_FRAME: usize = 256;

/// CRC-16/MODBUS of `bytes`; on the wire it is sent low byte first.
pub fn crc16(bytes: &[u8]) -> u16 {
    CRC.checksum(bytes)
}

/// The RTU frame for `pdu` addressed to (or from) `unit`: unit, PDU, CRC.
pub fn adu(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(pdu.len() + 3);
    frame.push(unit);
    frame.extend_from_slice(pdu);
    let crc = crc16(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

/// What [`find_reply`] found in the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// A frame from our unit, of the length our request calls for, with a
    /// good CRC: these bytes of the buffer.
    Found(Range<usize>),
    /// A frame may still be completing.
    Partial,
    /// A frame of the right shape arrived whole, but its CRC is wrong.
    BadCrc,
    /// Nothing that could become our reply.
    Nothing,
}

/// Looks for the reply of `unit` to `request` anywhere in `buf`, so that
/// noise before it (a VFD's burst, a late echo) does not hide it.
pub fn find_reply(buf: &[u8], unit: u8, request: &Request) -> Scan {
    let fc = request.function_code().value();
    let normal = request.response_pdu_len() + 3;
    let byte_count = (!request.is_write()).then(|| normal - 5);
    let mut partial = false;
    let mut bad_crc = false;
    for start in 0..buf.len() {
        let rest = &buf[start..];
        if rest[0] != unit {
            continue;
        }
        let Some(&code) = rest.get(1) else {
            partial = true;
            continue;
        };
        let len = if code == fc {
            match (byte_count, rest.get(2)) {
                (Some(expected), Some(&count)) if usize::from(count) != expected => continue,
                _ => normal,
            }
        } else if code == fc | 0x80 {
            5
        } else {
            continue;
        };
        let Some(frame) = rest.get(..len) else {
            partial = true;
            continue;
        };
        let (body, crc) = frame.split_at(len - 2);
        if crc16(body).to_le_bytes() == [crc[0], crc[1]] {
            return Scan::Found(start..start + len);
        }
        bad_crc = true;
    }
    match (partial, bad_crc) {
        (true, _) => Scan::Partial,
        (false, true) => Scan::BadCrc,
        (false, false) => Scan::Nothing,
    }
}

/// Why a frame from the platform is not put on the wire.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("{0} bytes is too short for an RTU frame")]
    TooShort(usize),
    #[error("{0} bytes is longer than an RTU frame ({MAX_FRAME})")]
    TooLong(usize),
    #[error("CRC mismatch: the frame says {found:#06x}, its bytes give {computed:#06x}")]
    Crc { found: u16, computed: u16 },
    #[error("unit {0} is not a slave id (1..247); broadcasts are not forwarded")]
    Unit(u8),
    #[error("function code {0:#04x} is not supported (01-06, 0F, 10)")]
    Function(u8),
    #[error("{len} bytes does not fit function {fc:#04x}: {why}")]
    Length { fc: u8, len: usize, why: String },
    #[error("coil value {0:#06x} is neither 0xFF00 nor 0x0000")]
    CoilValue(u16),
    #[error("quantity {0} is outside what the function allows")]
    Quantity(u16),
}

fn word(bytes: &[u8], at: usize) -> u16 {
    match bytes.get(at..at + 2) {
        Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
        _ => 0,
    }
}

/// Checks the CRC of one complete RTU frame and returns its unit and PDU.
pub fn split_frame(frame: &[u8]) -> Result<(UnitId, &[u8]), FrameError> {
    let len = frame.len();
    if len < 4 {
        return Err(FrameError::TooShort(len));
    }
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let (body, crc) = frame.split_at(len - 2);
    let found = u16::from_le_bytes([crc[0], crc[1]]);
    let computed = crc16(body);
    if found != computed {
        return Err(FrameError::Crc { found, computed });
    }
    let unit = UnitId::new(body[0]).ok_or(FrameError::Unit(body[0]))?;
    Ok((unit, &body[1..]))
}

/// Parses one complete RTU request frame of a function fieldgate supports,
/// checking quantities, byte counts and length exactly.
pub fn parse_request(frame: &[u8]) -> Result<(UnitId, Request), FrameError> {
    let (unit, pdu) = split_frame(frame)?;
    let len = frame.len();
    let fc = pdu[0];
    let length = |why: String| FrameError::Length { fc, len, why };
    let fixed = |n: usize| {
        if len == n {
            Ok(())
        } else {
            Err(length(format!("expected {n}")))
        }
    };
    let in_space = |address: u16, count: u16| u32::from(address) + u32::from(count) <= 0x1_0000;
    let (address, count) = (word(pdu, 1), word(pdu, 3));
    let request = match fc {
        0x01..=0x04 => {
            fixed(8)?;
            let max = if fc <= 0x02 {
                MAX_READ_BITS
            } else {
                MAX_READ_REGISTERS
            };
            if count == 0 || count > max || !in_space(address, count) {
                return Err(FrameError::Quantity(count));
            }
            match fc {
                0x01 => Request::ReadCoils(address, count),
                0x02 => Request::ReadDiscretes(address, count),
                0x03 => Request::ReadHolding(address, count),
                _ => Request::ReadInput(address, count),
            }
        }
        0x05 => {
            fixed(8)?;
            let on = match count {
                0xFF00 => true,
                0x0000 => false,
                other => return Err(FrameError::CoilValue(other)),
            };
            Request::WriteCoil(address, on)
        }
        0x06 => {
            fixed(8)?;
            Request::WriteRegister(address, count)
        }
        0x0F | 0x10 => {
            if len < 9 {
                return Err(length("at least 9".into()));
            }
            let bytes = usize::from(pdu[5]);
            let (max, needed) = if fc == 0x0F {
                (MAX_WRITE_COILS, usize::from(count).div_ceil(8))
            } else {
                (MAX_WRITE_REGISTERS, usize::from(count) * 2)
            };
            if count == 0 || count > max || !in_space(address, count) {
                return Err(FrameError::Quantity(count));
            }
            if bytes != needed {
                return Err(length(format!(
                    "byte count {bytes}, but {count} items need {needed}"
                )));
            }
            fixed(9 + bytes)?;
            let data = &pdu[6..];
            if fc == 0x0F {
                let bits = (0..usize::from(count))
                    .map(|i| data[i / 8] >> (i % 8) & 1 == 1)
                    .collect();
                Request::WriteCoils(address, bits)
            } else {
                let words = data
                    .chunks_exact(2)
                    .map(|w| u16::from_be_bytes([w[0], w[1]]))
                    .collect();
                Request::WriteRegisters(address, words)
            }
        }
        other => return Err(FrameError::Function(other)),
    };
    Ok((unit, request))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modbus::Request;

    fn with_crc(body: Vec<u8>) -> Vec<u8> {
        adu(body[0], &body[1..])
    }

    fn unit(id: u8) -> UnitId {
        UnitId::new(id).unwrap()
    }

    #[test]
    fn crc_matches_published_frames() {
        // Frames from the Modbus over serial line guide and vendor manuals.
        assert_eq!(crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x02]), 0x0BC4);
        assert_eq!(crc16(&[0x11, 0x03, 0x00, 0x6B, 0x00, 0x03]), 0x8776);
        assert_eq!(
            adu(0x01, &[0x06, 0x00, 0x01, 0x00, 0x03]),
            [0x01, 0x06, 0x00, 0x01, 0x00, 0x03, 0x98, 0x0B]
        );
    }

    #[test]
    fn parses_each_supported_function_and_round_trips_the_pdu() {
        let cases: Vec<(Vec<u8>, Request)> = vec![
            (
                vec![0x01, 0x01, 0x00, 0x13, 0x00, 0x25],
                Request::ReadCoils(0x13, 0x25),
            ),
            (
                vec![0x01, 0x02, 0x00, 0xC4, 0x00, 0x16],
                Request::ReadDiscretes(0xC4, 0x16),
            ),
            (
                vec![0x11, 0x03, 0x00, 0x6B, 0x00, 0x03],
                Request::ReadHolding(0x6B, 3),
            ),
            (
                vec![0x01, 0x04, 0x00, 0x08, 0x00, 0x01],
                Request::ReadInput(8, 1),
            ),
            (
                vec![0x01, 0x05, 0x00, 0xAC, 0xFF, 0x00],
                Request::WriteCoil(0xAC, true),
            ),
            (
                vec![0x01, 0x06, 0x00, 0x01, 0x00, 0x03],
                Request::WriteRegister(1, 3),
            ),
            (
                vec![0x01, 0x0F, 0x00, 0x13, 0x00, 0x0A, 0x02, 0xCD, 0x01],
                Request::WriteCoils(
                    0x13,
                    vec![
                        true, false, true, true, false, false, true, true, true, false,
                    ],
                ),
            ),
            (
                vec![
                    0x01, 0x10, 0x00, 0x01, 0x00, 0x02, 0x04, 0x00, 0x0A, 0x01, 0x02,
                ],
                Request::WriteRegisters(1, vec![0x000A, 0x0102]),
            ),
        ];
        for (body, request) in cases {
            let id = body[0];
            assert_eq!(request.pdu(), body[1..], "{request:?}");
            assert_eq!(parse_request(&with_crc(body)), Ok((unit(id), request)));
        }
    }

    #[test]
    fn rejects_malformed_frames() {
        let good = with_crc(vec![0x01, 0x03, 0x00, 0x00, 0x00, 0x02]);
        let mut bad_crc = good.clone();
        bad_crc[7] ^= 0x01;
        assert!(matches!(
            parse_request(&bad_crc),
            Err(FrameError::Crc { .. })
        ));
        assert_eq!(parse_request(&good[..3]), Err(FrameError::TooShort(3)));
        assert!(matches!(
            parse_request(&[0; 300]),
            Err(FrameError::TooLong(300))
        ));
        let reject = |body: Vec<u8>| parse_request(&with_crc(body)).unwrap_err();
        assert_eq!(reject(vec![0x00, 0x03, 0, 0, 0, 1]), FrameError::Unit(0));
        assert_eq!(reject(vec![0xF8, 0x03, 0, 0, 0, 1]), FrameError::Unit(0xF8));
        assert_eq!(
            reject(vec![0x01, 0x08, 0, 0, 0, 1]),
            FrameError::Function(0x08)
        );
        assert_eq!(
            reject(vec![0x01, 0x03, 0, 0, 0, 0]),
            FrameError::Quantity(0)
        );
        assert_eq!(
            reject(vec![0x01, 0x03, 0, 0, 0, 126]),
            FrameError::Quantity(126)
        );
        assert_eq!(
            reject(vec![0x01, 0x03, 0xFF, 0xFF, 0, 2]),
            FrameError::Quantity(2)
        );
        assert!(matches!(
            reject(vec![0x01, 0x03, 0, 0, 0, 1, 0]),
            FrameError::Length { .. }
        ));
        assert_eq!(
            reject(vec![0x01, 0x05, 0, 1, 0x12, 0x34]),
            FrameError::CoilValue(0x1234)
        );
        assert_eq!(
            reject(vec![0x01, 0x10, 0, 1, 0xFF, 0xFF, 0x02, 0, 1]),
            FrameError::Quantity(0xFFFF)
        );
        // Byte count disagrees with the quantity, or with the frame length.
        assert!(matches!(
            reject(vec![0x01, 0x10, 0, 1, 0, 2, 0x02, 0, 1]),
            FrameError::Length { .. }
        ));
        assert!(matches!(
            reject(vec![0x01, 0x10, 0, 1, 0, 1, 0x02, 0, 1, 0]),
            FrameError::Length { .. }
        ));
        assert!(matches!(
            reject(vec![0x01, 0x0F, 0, 1, 0, 9, 0x01, 0xFF]),
            FrameError::Length { .. }
        ));
    }

    #[test]
    fn finds_the_reply_behind_noise() {
        let request = Request::ReadHolding(0, 2);
        let reply = adu(1, &[0x03, 0x04, 0x12, 0x34, 0x56, 0x78]);
        assert_eq!(find_reply(&reply, 1, &request), Scan::Found(0..9));
        let mut noisy = vec![0xFF, 0x01, 0x00, 0x01, 0x03];
        noisy.extend(&reply);
        assert_eq!(find_reply(&noisy, 1, &request), Scan::Found(5..14));
        assert_eq!(find_reply(&reply[..6], 1, &request), Scan::Partial);
        let mut corrupt = reply.clone();
        corrupt[4] ^= 0x10;
        assert_eq!(find_reply(&corrupt, 1, &request), Scan::BadCrc);
        assert_eq!(find_reply(&[0x55; 20], 1, &request), Scan::Nothing);
        // Another unit's answer is not ours.
        assert_eq!(
            find_reply(&adu(2, &[0x03, 0x04, 0, 0, 0, 0]), 1, &request),
            Scan::Nothing
        );
        // An exception answer is.
        assert_eq!(
            find_reply(&adu(1, &[0x83, 0x02]), 1, &request),
            Scan::Found(0..5)
        );
    }
}

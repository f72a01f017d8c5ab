//! Raw Modbus RTU frames from the platform (`data/<stream>/set`): parsing a
//! request frame strictly (CRC, function code, lengths) so that nothing
//! malformed reaches the wire, and building the response frame from the
//! transaction's outcome.

use super::{Reply, Request, TxError};
use crate::config::UnitId;

/// Why a frame from the platform is not put on the wire.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("{0} bytes is too short for an RTU frame")]
    TooShort(usize),
    #[error("{0} bytes is longer than an RTU frame (256)")]
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

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), sent low byte first.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// `body` with its CRC appended.
pub fn with_crc(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc16(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

fn word(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Parses one complete RTU request frame.
pub fn parse_request(frame: &[u8]) -> Result<(UnitId, Request), FrameError> {
    let len = frame.len();
    if len < 4 {
        return Err(FrameError::TooShort(len));
    }
    if len > 256 {
        return Err(FrameError::TooLong(len));
    }
    let (body, crc) = frame.split_at(len - 2);
    let found = u16::from_le_bytes([crc[0], crc[1]]);
    let computed = crc16(body);
    if found != computed {
        return Err(FrameError::Crc { found, computed });
    }
    let unit = UnitId::new(body[0]).ok_or(FrameError::Unit(body[0]))?;
    let fc = body[1];
    let length = |why: &str| FrameError::Length {
        fc,
        len,
        why: why.to_string(),
    };
    let fixed = |n: usize| {
        if len == n {
            Ok(())
        } else {
            Err(length(&format!("expected {n}")))
        }
    };
    let request = match fc {
        0x01..=0x04 => {
            fixed(8)?;
            let (address, count) = (word(body, 2), word(body, 4));
            let max = if fc <= 0x02 { 2000 } else { 125 };
            if count == 0 || count > max || u32::from(address) + u32::from(count) > 0x1_0000 {
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
            let on = match word(body, 4) {
                0xFF00 => true,
                0x0000 => false,
                other => return Err(FrameError::CoilValue(other)),
            };
            Request::WriteCoil(word(body, 2), on)
        }
        0x06 => {
            fixed(8)?;
            Request::WriteRegister(word(body, 2), word(body, 4))
        }
        0x0F | 0x10 => {
            if len < 9 {
                return Err(length("at least 9"));
            }
            let (address, count, bytes) = (word(body, 2), word(body, 4), usize::from(body[6]));
            let (max, needed) = if fc == 0x0F {
                (1968, usize::from(count).div_ceil(8))
            } else {
                (123, usize::from(count) * 2)
            };
            if count == 0 || count > max || u32::from(address) + u32::from(count) > 0x1_0000 {
                return Err(FrameError::Quantity(count));
            }
            if bytes != needed {
                return Err(length(&format!(
                    "byte count {bytes}, but {count} items need {needed}"
                )));
            }
            fixed(9 + bytes)?;
            let data = &body[7..];
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

fn function_code(request: &Request) -> u8 {
    match request {
        Request::ReadCoils(..) => 0x01,
        Request::ReadDiscretes(..) => 0x02,
        Request::ReadHolding(..) => 0x03,
        Request::ReadInput(..) => 0x04,
        Request::WriteCoil(..) => 0x05,
        Request::WriteRegister(..) => 0x06,
        Request::WriteCoils(..) => 0x0F,
        Request::WriteRegisters(..) => 0x10,
    }
}

/// The response frame (CRC included) a slave sent for `request`: the data
/// reply, or the exception frame. `None` when there was no valid response
/// (timeout, garbled reply, port down).
pub fn response_frame(
    unit: UnitId,
    request: &Request,
    outcome: &Result<Reply, TxError>,
) -> Option<Vec<u8>> {
    let fc = function_code(request);
    let mut out = vec![unit.get(), fc];
    match (outcome, request) {
        (Err(TxError::Exception(code)), _) => {
            out[1] = fc | 0x80;
            out.push(u8::from(*code));
        }
        (Err(_), _) => return None,
        (Ok(Reply::Bits(bits)), _) => {
            let mut packed = vec![0u8; bits.len().div_ceil(8)];
            for (i, _) in bits.iter().enumerate().filter(|(_, on)| **on) {
                packed[i / 8] |= 1 << (i % 8);
            }
            out.push(packed.len() as u8);
            out.extend(packed);
        }
        (Ok(Reply::Registers(regs)), _) => {
            out.push((regs.len() * 2) as u8);
            out.extend(regs.iter().flat_map(|r| r.to_be_bytes()));
        }
        (Ok(Reply::Written), Request::WriteCoil(address, on)) => {
            out.extend(address.to_be_bytes());
            out.extend(if *on { [0xFF, 0x00] } else { [0x00, 0x00] });
        }
        (Ok(Reply::Written), Request::WriteRegister(address, value)) => {
            out.extend(address.to_be_bytes());
            out.extend(value.to_be_bytes());
        }
        (Ok(Reply::Written), _) => {
            let (_, address, count) = request.span();
            out.extend(address.to_be_bytes());
            out.extend(count.to_be_bytes());
        }
    }
    Some(with_crc(out))
}

/// Hex text (any spacing, either case) to bytes.
pub fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() % 2 == 1 {
        return Err("an odd number of hex digits".into());
    }
    digits
        .chunks_exact(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("{:?} is not a hex byte", String::from_utf8_lossy(pair)))
        })
        .collect()
}

/// Bytes as upper-case hex pairs separated by spaces (`01 03 02 00 2A …`).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_modbus::ExceptionCode;

    fn unit(id: u8) -> UnitId {
        UnitId::new(id).unwrap()
    }

    #[test]
    fn crc_matches_published_frames() {
        // Frames from the Modbus over serial line guide and vendor manuals.
        assert_eq!(crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x02]), 0x0BC4);
        assert_eq!(crc16(&[0x11, 0x03, 0x00, 0x6B, 0x00, 0x03]), 0x8776);
        assert_eq!(
            with_crc(vec![0x01, 0x06, 0x00, 0x01, 0x00, 0x03]),
            [0x01, 0x06, 0x00, 0x01, 0x00, 0x03, 0x98, 0x0B]
        );
    }

    #[test]
    fn parses_each_supported_function() {
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
        // Byte count disagrees with the quantity, or with the frame length.
        assert!(matches!(
            reject(vec![0x01, 0x10, 0, 1, 0, 2, 0x02, 0, 1]),
            FrameError::Length { .. }
        ));
        assert!(matches!(
            reject(vec![0x01, 0x10, 0, 1, 0, 1, 0x02, 0, 1, 0]),
            FrameError::Length { .. }
        ));
    }

    #[test]
    fn builds_response_frames() {
        let read = Request::ReadHolding(0x6B, 3);
        let regs = Ok(Reply::Registers(vec![0x022B, 0x0000, 0x0064]));
        assert_eq!(
            response_frame(unit(0x11), &read, &regs).unwrap(),
            with_crc(vec![0x11, 0x03, 0x06, 0x02, 0x2B, 0x00, 0x00, 0x00, 0x64])
        );
        let bits = Ok(Reply::Bits(vec![
            true, false, true, true, false, false, true, true, true,
        ]));
        assert_eq!(
            response_frame(unit(1), &Request::ReadCoils(0x13, 9), &bits).unwrap(),
            with_crc(vec![0x01, 0x01, 0x02, 0xCD, 0x01])
        );
        let exception = Err(TxError::Exception(ExceptionCode::IllegalDataAddress));
        let frame = response_frame(unit(1), &read, &exception).unwrap();
        assert_eq!(frame, with_crc(vec![0x01, 0x83, 0x02]));
        let echo = response_frame(unit(1), &Request::WriteRegister(1, 3), &Ok(Reply::Written));
        assert_eq!(
            echo.unwrap(),
            with_crc(vec![0x01, 0x06, 0x00, 0x01, 0x00, 0x03])
        );
        let multi = response_frame(
            unit(1),
            &Request::WriteRegisters(1, vec![1, 2]),
            &Ok(Reply::Written),
        );
        assert_eq!(
            multi.unwrap(),
            with_crc(vec![0x01, 0x10, 0x00, 0x01, 0x00, 0x02])
        );
        let timeout = Err(TxError::Timeout(std::time::Duration::from_millis(5)));
        assert_eq!(response_frame(unit(1), &read, &timeout), None);
    }

    #[test]
    fn hex_text_any_spacing_either_case() {
        assert_eq!(
            from_hex("01 03 00 00 00 02 C4 0b"),
            Ok(vec![1, 3, 0, 0, 0, 2, 0xC4, 0x0B])
        );
        assert_eq!(from_hex("0103\n0000"), Ok(vec![1, 3, 0, 0]));
        assert!(from_hex("0 1 3").is_err());
        assert!(from_hex("zz").is_err());
        assert_eq!(to_hex(&[0x01, 0xAB]), "01 AB");
    }
}

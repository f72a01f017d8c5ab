//! Modbus TCP framing (Modbus Messaging on TCP/IP, §3.1.3): a 7-byte MBAP
//! header (transaction id, protocol 0, length, unit) before the PDU, no
//! CRC. [`next_frame`] cuts the stream into frames so that a reply to an
//! earlier, timed-out request (another transaction id) or from another unit
//! is recognised and dropped instead of taken as the answer.

use std::ops::Range;

/// Header bytes before the PDU.
pub const HEADER: usize = 7;
/// The longest PDU (253 bytes) plus the unit byte the length counts.
const MAX_LENGTH: usize = 254;

/// The MBAP frame for `pdu` to `unit` under transaction id `tid`.
pub fn adu(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let length = u16::try_from(pdu.len() + 1).unwrap_or(u16::MAX);
    let mut frame = Vec::with_capacity(HEADER + pdu.len());
    frame.extend_from_slice(&tid.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.push(unit);
    frame.extend_from_slice(pdu);
    frame
}

/// The first frame in a receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A whole frame of `len` bytes: its transaction id, unit and the PDU's
    /// bytes in the buffer.
    Frame {
        tid: u16,
        unit: u8,
        pdu: Range<usize>,
        len: usize,
    },
    /// More bytes are needed.
    Partial,
    /// The buffer does not start with an MBAP header (protocol not 0, or a
    /// length no PDU has): the stream is out of step.
    Garbage,
}

/// Cuts the first frame off the front of `buf`.
pub fn next_frame(buf: &[u8]) -> Next {
    let Some(header) = buf.get(..HEADER) else {
        return Next::Partial;
    };
    let tid = u16::from_be_bytes([header[0], header[1]]);
    let protocol = u16::from_be_bytes([header[2], header[3]]);
    let length = usize::from(u16::from_be_bytes([header[4], header[5]]));
    if protocol != 0 || !(2..=MAX_LENGTH).contains(&length) {
        return Next::Garbage;
    }
    let len = HEADER - 1 + length;
    if buf.len() < len {
        return Next::Partial;
    }
    Next::Frame {
        tid,
        unit: header[6],
        pdu: HEADER..len,
        len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_by_their_length() {
        // Read 2 holding registers from 10 (unit 1, tid 7), as in the
        // specification's examples.
        let request = adu(7, 1, &[0x03, 0x00, 0x0A, 0x00, 0x02]);
        assert_eq!(request, [0, 7, 0, 0, 0, 6, 1, 3, 0, 10, 0, 2]);
        let reply = [0, 7, 0, 0, 0, 7, 1, 3, 4, 0, 1, 0, 2, 0xAA];
        assert_eq!(
            next_frame(&reply),
            Next::Frame {
                tid: 7,
                unit: 1,
                pdu: 7..13,
                len: 13
            }
        );
        assert_eq!(next_frame(&reply[..12]), Next::Partial);
        assert_eq!(next_frame(&[0, 7, 0, 1, 0, 7, 1]), Next::Garbage);
        assert_eq!(next_frame(&[0, 7, 0, 0, 1, 0, 1]), Next::Garbage);
    }
}

//! The register codec: registers ⇄ values. A point's type, byte order, bit
//! and scale/offset applied one way for readings (the poller, `read`) and
//! the exact inverse way for writes (the router, the simulator).

use crate::config::{Kind, Order, Point};

/// A decoded reading in engineering units.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
}

impl Value {
    /// The JSON form for reports. JSON has no NaN or infinity, so a
    /// non-finite float has none (`read` still shows it).
    pub fn to_json(&self) -> Option<serde_json::Value> {
        match self {
            Value::Bool(b) => Some((*b).into()),
            Value::Int(i) => Some((*i).into()),
            Value::UInt(u) => Some((*u).into()),
            Value::Float(f) => serde_json::Number::from_f64(*f).map(serde_json::Value::Number),
            Value::Text(t) => Some(t.clone().into()),
        }
    }

    /// The value as a number, for deadband comparisons and range checks.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Text(_) => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Bool(b) => b.fmt(f),
            Value::Int(i) => i.fmt(f),
            Value::UInt(u) => u.fmt(f),
            Value::Float(x) => x.fmt(f),
            Value::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// Registers as received → bytes in ABCD (big-endian) order.
fn to_be_bytes(regs: &[u16], order: Order) -> Vec<u8> {
    let mut words = regs.to_vec();
    if order.swaps_words() {
        words.reverse();
    }
    words
        .iter()
        .flat_map(|w| {
            let w = if order.swaps_bytes() {
                w.swap_bytes()
            } else {
                *w
            };
            w.to_be_bytes()
        })
        .collect()
}

/// Bytes in ABCD order → registers as sent on the wire (the inverse of
/// [`to_be_bytes`]).
fn from_be_bytes(bytes: &[u8], order: Order) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let w = u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]);
            if order.swaps_bytes() {
                w.swap_bytes()
            } else {
                w
            }
        })
        .collect();
    if order.swaps_words() {
        words.reverse();
    }
    words
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// Digits after the decimal point in the shortest form of `x` (0.1 → 1).
fn decimals(x: f64) -> usize {
    let text = x.abs().to_string();
    text.split_once('.').map_or(0, |(_, frac)| frac.len())
}

/// `raw * scale + offset`, rounded to the precision the operands carry, so
/// 2296 × 0.1 reports as 229.6 and not 229.60000000000002.
fn scaled(raw: f64, point: &Point) -> f64 {
    let value = raw * point.scale + point.offset;
    let digits = decimals(raw) + decimals(point.scale).max(decimals(point.offset));
    if digits > 15 || !value.is_finite() {
        return value;
    }
    let factor = 10f64.powi(digits as i32);
    let rounded = (value * factor).round() / factor;
    if rounded.is_finite() {
        rounded
    } else {
        value
    }
}

/// An f32 as the f64 with the same shortest decimal form (229.6f32 → 229.6,
/// not 229.60000610351562), which is what the device meant.
fn widen(x: f32) -> f64 {
    if x.is_finite() {
        x.to_string().parse().unwrap_or(f64::from(x))
    } else {
        f64::from(x)
    }
}

/// Decodes a register point from exactly `point.kind.width()` registers.
/// The JSON form of `point`'s `value` as reported: a labelled number is
/// its label (an unlisted number stays a number).
pub fn present(point: &Point, value: &Value) -> Option<serde_json::Value> {
    let number = match value {
        Value::Int(i) => Some(*i),
        Value::UInt(u) => i64::try_from(*u).ok(),
        _ => None,
    };
    if let Some(n) = number {
        if let Some((_, label)) = point.labels.iter().find(|(m, _)| *m == n) {
            return Some(label.clone().into());
        }
    }
    value.to_json()
}

/// The number a label stands for on `point`.
pub fn label_number(point: &Point, label: &str) -> Option<i64> {
    point
        .labels
        .iter()
        .find(|(_, l)| l == label)
        .map(|(n, _)| *n)
}

pub fn decode_registers(point: &Point, regs: &[u16]) -> Value {
    debug_assert_eq!(regs.len(), usize::from(point.kind.width()));
    let b = to_be_bytes(regs, point.order);
    let int = |raw: i128| -> Value {
        if point.is_unscaled() {
            match i64::try_from(raw) {
                Ok(i) => Value::Int(i),
                Err(_) => Value::UInt(raw as u64),
            }
        } else {
            Value::Float(scaled(raw as f64, point))
        }
    };
    let float = |raw: f64| {
        Value::Float(if point.is_unscaled() {
            raw
        } else {
            scaled(raw, point)
        })
    };
    match point.kind {
        Kind::Bit | Kind::RegisterBool => Value::Bool(u16::from_be_bytes(array(&b)) != 0),
        Kind::RegisterBit(bit) => Value::Bool(u16::from_be_bytes(array(&b)) >> bit & 1 == 1),
        Kind::U16 => int(u16::from_be_bytes(array(&b)).into()),
        Kind::I16 => int(i16::from_be_bytes(array(&b)).into()),
        Kind::U32 => int(u32::from_be_bytes(array(&b)).into()),
        Kind::I32 => int(i32::from_be_bytes(array(&b)).into()),
        Kind::U64 => int(u64::from_be_bytes(array(&b)).into()),
        Kind::I64 => int(i64::from_be_bytes(array(&b)).into()),
        Kind::F32 => float(widen(f32::from_be_bytes(array(&b)))),
        Kind::F64 => float(f64::from_be_bytes(array(&b))),
        Kind::String { .. } => {
            let text = b.split(|&c| c == 0).next().unwrap_or_default();
            Value::Text(text.iter().map(|&c| char::from(c)).collect())
        }
    }
}

/// Why a value cannot be written to a point.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EncodeError {
    #[error("expected {0}")]
    WrongType(&'static str),
    #[error("{value} is outside the accepted range {min}..{max}")]
    OutOfRange { value: f64, min: f64, max: f64 },
    #[error("{0} does not fit the point's type after scale/offset")]
    TypeRange(f64),
}

/// Encodes an engineering value for a register point: the exact inverse of
/// [`decode_registers`], with `(value - offset) / scale` rounded to the
/// nearest integer for integer types. An integer value for an unscaled
/// integer point is written exactly, without a step through `f64`. A
/// `RegisterBit` point encodes the register it lives in, given that
/// register's `current` content as read from the wire: the bit is set in the
/// same logical (byte-order corrected) register that decoding tests.
pub fn encode_registers(
    point: &Point,
    value: &Value,
    current: u16,
) -> Result<Vec<u16>, EncodeError> {
    if point.kind.is_bool() {
        let Value::Bool(on) = value else {
            return Err(EncodeError::WrongType("true or false"));
        };
        let logical = u16::from_be_bytes(array(&to_be_bytes(&[current], point.order)));
        let reg = match point.kind {
            Kind::RegisterBit(bit) if *on => logical | 1 << bit,
            Kind::RegisterBit(bit) => logical & !(1 << bit),
            _ => u16::from(*on),
        };
        return Ok(from_be_bytes(&reg.to_be_bytes(), point.order));
    }
    let exact = match value {
        Value::Int(i) => Some(i128::from(*i)),
        Value::UInt(u) => Some(i128::from(*u)),
        _ => None,
    };
    let Some(v) = value.as_f64().filter(|_| !matches!(value, Value::Bool(_))) else {
        return Err(EncodeError::WrongType("a number"));
    };
    let (min, max) = (
        point.min.unwrap_or(f64::NEG_INFINITY),
        point.max.unwrap_or(f64::INFINITY),
    );
    let below = |bound: f64| match exact {
        Some(i) => less(i, bound),
        None => v < bound,
    };
    let above = |bound: f64| match exact {
        Some(i) => less_f(bound, i),
        None => v > bound,
    };
    if !v.is_finite() || below(min) || above(max) {
        return Err(EncodeError::OutOfRange { value: v, min, max });
    }
    let raw = (v - point.offset) / point.scale;
    // An integer register gets an integer: exact when no scaling applies,
    // otherwise the rounded scaled value, range-checked without wrapping.
    let int = || -> Result<i128, EncodeError> {
        match exact {
            Some(i) if point.is_unscaled() => Ok(i),
            _ if raw.is_finite() && raw.abs() < 1e38 => Ok(raw.round() as i128),
            _ => Err(EncodeError::TypeRange(v)),
        }
    };
    let range = |_| EncodeError::TypeRange(v);
    let bytes: Vec<u8> = match point.kind {
        Kind::U16 => u16::try_from(int()?).map_err(range)?.to_be_bytes().to_vec(),
        Kind::I16 => i16::try_from(int()?).map_err(range)?.to_be_bytes().to_vec(),
        Kind::U32 => u32::try_from(int()?).map_err(range)?.to_be_bytes().to_vec(),
        Kind::I32 => i32::try_from(int()?).map_err(range)?.to_be_bytes().to_vec(),
        Kind::U64 => u64::try_from(int()?).map_err(range)?.to_be_bytes().to_vec(),
        Kind::I64 => i64::try_from(int()?).map_err(range)?.to_be_bytes().to_vec(),
        Kind::F32 => {
            if raw.abs() > f64::from(f32::MAX) {
                return Err(EncodeError::TypeRange(v));
            }
            (raw as f32).to_be_bytes().to_vec()
        }
        Kind::F64 => raw.to_be_bytes().to_vec(),
        Kind::String { .. } | Kind::Bit | Kind::RegisterBit(_) | Kind::RegisterBool => {
            return Err(EncodeError::WrongType("a writable numeric point"))
        }
    };
    Ok(from_be_bytes(&bytes, point.order))
}

/// `a < b`, exactly, for an integer and a float bound.
fn less(a: i128, b: f64) -> bool {
    if b.is_nan() {
        return false;
    }
    let af = a as f64;
    af < b || (af == b && b.abs() < 1e38 && a < b as i128)
}

/// `a < b`, exactly, for a float bound and an integer.
fn less_f(a: f64, b: i128) -> bool {
    if a.is_nan() {
        return false;
    }
    let bf = b as f64;
    a < bf || (a == bf && a.abs() < 1e38 && (a as i128) < b)
}

/// Encodes ASCII text into a string point's registers, NUL-padded.
pub fn encode_text(point: &Point, text: &str) -> Vec<u16> {
    let mut bytes: Vec<u8> = text.bytes().collect();
    bytes.resize(usize::from(point.kind.width()) * 2, 0);
    from_be_bytes(&bytes, point.order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Area;

    fn point(kind: Kind, order: Order) -> Point {
        Point {
            name: "p".into(),
            area: Area::Holding,
            address: 0,
            kind,
            order,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            writable: true,
            min: None,
            max: None,
            deadband: 0.0,
            labels: Vec::new(),
            alarm: None,
            poll: None,
            sim: None,
        }
    }

    fn dec(kind: Kind, order: Order, regs: &[u16]) -> Value {
        decode_registers(&point(kind, order), regs)
    }

    // Expected values below are written from the IEEE-754 / two's-complement
    // definitions (e.g. 10.0f32 = 0x41200000), not produced by our encoder.

    #[test]
    fn u16_i16_including_negative() {
        assert_eq!(dec(Kind::U16, Order::Abcd, &[0xFFFE]), Value::Int(65534));
        assert_eq!(dec(Kind::I16, Order::Abcd, &[0xFFFE]), Value::Int(-2));
        assert_eq!(dec(Kind::I16, Order::Abcd, &[0x8000]), Value::Int(-32768));
        // A single register with byte swap.
        assert_eq!(dec(Kind::U16, Order::Badc, &[0x3412]), Value::Int(0x1234));
        assert_eq!(dec(Kind::U16, Order::Dcba, &[0x3412]), Value::Int(0x1234));
        assert_eq!(dec(Kind::U16, Order::Cdab, &[0x1234]), Value::Int(0x1234));
    }

    #[test]
    fn thirty_two_bit_in_every_order() {
        // 0x12345678 = 305419896; -123456789 = 0xF8A432EB
        let cases = [
            (Order::Abcd, [0x1234, 0x5678]),
            (Order::Cdab, [0x5678, 0x1234]),
            (Order::Badc, [0x3412, 0x7856]),
            (Order::Dcba, [0x7856, 0x3412]),
        ];
        for (order, regs) in cases {
            assert_eq!(
                dec(Kind::U32, order, &regs),
                Value::Int(305_419_896),
                "{order:?}"
            );
        }
        let neg = [
            (Order::Abcd, [0xF8A4, 0x32EB]),
            (Order::Cdab, [0x32EB, 0xF8A4]),
            (Order::Badc, [0xA4F8, 0xEB32]),
            (Order::Dcba, [0xEB32, 0xA4F8]),
        ];
        for (order, regs) in neg {
            assert_eq!(
                dec(Kind::I32, order, &regs),
                Value::Int(-123_456_789),
                "{order:?}"
            );
        }
        // 229.6f32 = 0x4365999A (nearest f32), 10.0f32 = 0x41200000
        assert_eq!(
            dec(Kind::F32, Order::Abcd, &[0x4120, 0x0000]),
            Value::Float(10.0)
        );
        assert_eq!(
            dec(Kind::F32, Order::Cdab, &[0x999A, 0x4365]),
            Value::Float(229.6)
        );
        assert_eq!(
            dec(Kind::F32, Order::Dcba, &[0x0000, 0x2041]),
            Value::Float(10.0)
        );
        assert_eq!(
            dec(Kind::F32, Order::Badc, &[0x2041, 0x0000]),
            Value::Float(10.0)
        );
        // -1.5f32 = 0xBFC00000
        assert_eq!(
            dec(Kind::F32, Order::Abcd, &[0xBFC0, 0x0000]),
            Value::Float(-1.5)
        );
    }

    #[test]
    fn sixty_four_bit_in_every_order() {
        // pi = 0x400921FB54442D18; u64 0x0102030405060708 = 72623859790382856;
        // i64 -2 = 0xFFFFFFFFFFFFFFFE
        let pi = [0x4009, 0x21FB, 0x5444, 0x2D18];
        assert_eq!(
            dec(Kind::F64, Order::Abcd, &pi),
            Value::Float(std::f64::consts::PI)
        );
        assert_eq!(
            dec(Kind::F64, Order::Cdab, &[0x2D18, 0x5444, 0x21FB, 0x4009]),
            Value::Float(std::f64::consts::PI)
        );
        assert_eq!(
            dec(Kind::F64, Order::Badc, &[0x0940, 0xFB21, 0x4454, 0x182D]),
            Value::Float(std::f64::consts::PI)
        );
        assert_eq!(
            dec(Kind::F64, Order::Dcba, &[0x182D, 0x4454, 0xFB21, 0x0940]),
            Value::Float(std::f64::consts::PI)
        );
        assert_eq!(
            dec(Kind::U64, Order::Abcd, &[0x0102, 0x0304, 0x0506, 0x0708]),
            Value::Int(72_623_859_790_382_856)
        );
        assert_eq!(
            dec(Kind::U64, Order::Dcba, &[0x0807, 0x0605, 0x0403, 0x0201]),
            Value::Int(72_623_859_790_382_856)
        );
        assert_eq!(
            dec(Kind::I64, Order::Abcd, &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
            Value::Int(-2)
        );
        // Above i64::MAX stays an exact unsigned integer.
        assert_eq!(
            dec(Kind::U64, Order::Abcd, &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF]),
            Value::UInt(u64::MAX)
        );
    }

    #[test]
    fn every_integer_type_in_every_order() {
        // Wire registers written out by hand from struct.pack('>q', -5000000000)
        // = fffffffed5fa0e00, struct.pack('>Q', 0x0102030405060708) and
        // struct.pack('>h', -300) = fed4.
        let i64_cases = [
            (Order::Abcd, [0xFFFF, 0xFFFE, 0xD5FA, 0x0E00]),
            (Order::Cdab, [0x0E00, 0xD5FA, 0xFFFE, 0xFFFF]),
            (Order::Badc, [0xFFFF, 0xFEFF, 0xFAD5, 0x000E]),
            (Order::Dcba, [0x000E, 0xFAD5, 0xFEFF, 0xFFFF]),
        ];
        for (order, regs) in i64_cases {
            assert_eq!(
                dec(Kind::I64, order, &regs),
                Value::Int(-5_000_000_000),
                "{order:?}"
            );
        }
        let u64_cases = [
            (Order::Abcd, [0x0102, 0x0304, 0x0506, 0x0708]),
            (Order::Cdab, [0x0708, 0x0506, 0x0304, 0x0102]),
            (Order::Badc, [0x0201, 0x0403, 0x0605, 0x0807]),
            (Order::Dcba, [0x0807, 0x0605, 0x0403, 0x0201]),
        ];
        for (order, regs) in u64_cases {
            assert_eq!(
                dec(Kind::U64, order, &regs),
                Value::Int(0x0102_0304_0506_0708),
                "{order:?}"
            );
        }
        for (order, reg) in [
            (Order::Abcd, 0xFED4),
            (Order::Cdab, 0xFED4),
            (Order::Badc, 0xD4FE),
            (Order::Dcba, 0xD4FE),
        ] {
            assert_eq!(dec(Kind::I16, order, &[reg]), Value::Int(-300), "{order:?}");
        }
    }

    #[test]
    fn nan_and_infinity_decode_but_are_not_json() {
        // 0x7FC00000 is the canonical f32 quiet NaN; 0x7FF8... for f64.
        let nan = dec(Kind::F32, Order::Abcd, &[0x7FC0, 0x0000]);
        assert!(matches!(nan, Value::Float(f) if f.is_nan()));
        assert_eq!(nan.to_json(), None);
        let nan64 = dec(Kind::F64, Order::Abcd, &[0x7FF8, 0, 0, 0]);
        assert!(matches!(nan64, Value::Float(f) if f.is_nan()));
        let inf = dec(Kind::F32, Order::Abcd, &[0x7F80, 0x0000]);
        assert_eq!(inf, Value::Float(f64::INFINITY));
        assert_eq!(inf.to_json(), None);
    }

    #[test]
    fn scale_and_offset_turn_integers_into_numbers() {
        let mut p = point(Kind::U16, Order::Abcd);
        p.scale = 0.1;
        // 2296 x 0.1 is 229.60000000000002 in binary; reported as 229.6.
        assert_eq!(decode_registers(&p, &[2296]), Value::Float(229.6));
        assert_eq!(decode_registers(&p, &[101]), Value::Float(10.1));
        p.scale = 0.01;
        assert_eq!(decode_registers(&p, &[65535]), Value::Float(655.35));
        p.scale = 1.0;
        p.offset = -40.0;
        assert_eq!(decode_registers(&p, &[65]), Value::Float(25.0));
        let mut i = point(Kind::I16, Order::Abcd);
        i.scale = 0.5;
        assert_eq!(decode_registers(&i, &[0xFFFC]), Value::Float(-2.0));
        let mut f = point(Kind::F32, Order::Abcd);
        f.scale = 2.0;
        f.offset = 1.0;
        assert_eq!(decode_registers(&f, &[0x4120, 0]), Value::Float(21.0));
        assert_eq!(
            Value::Float(229.6).to_json(),
            Some(serde_json::json!(229.6))
        );
        assert_eq!(Value::Int(5).to_json().unwrap().to_string(), "5");
    }

    #[test]
    fn bits_of_registers() {
        assert_eq!(
            dec(Kind::RegisterBit(0), Order::Abcd, &[0b1000]),
            Value::Bool(false)
        );
        assert_eq!(
            dec(Kind::RegisterBit(3), Order::Abcd, &[0b1000]),
            Value::Bool(true)
        );
        assert_eq!(
            dec(Kind::RegisterBit(15), Order::Abcd, &[0x8000]),
            Value::Bool(true)
        );
        assert_eq!(
            dec(Kind::RegisterBool, Order::Abcd, &[0x0100]),
            Value::Bool(true)
        );
        assert_eq!(
            dec(Kind::RegisterBool, Order::Abcd, &[0]),
            Value::Bool(false)
        );
    }

    #[test]
    fn strings_stop_at_nul() {
        // "AB" "C\0" "XY": text ends at the NUL.
        let regs = [0x4142, 0x4300, 0x5859];
        assert_eq!(
            dec(Kind::String { len: 3 }, Order::Abcd, &regs),
            Value::Text("ABC".into())
        );
        assert_eq!(
            dec(Kind::String { len: 2 }, Order::Abcd, &[0x4142, 0x4344]),
            Value::Text("ABCD".into())
        );
        assert_eq!(
            dec(Kind::String { len: 2 }, Order::Badc, &[0x4241, 0x4443]),
            Value::Text("ABCD".into())
        );
    }

    #[test]
    fn encoding_inverts_decoding() {
        let numeric = [
            Kind::U16,
            Kind::I16,
            Kind::U32,
            Kind::I32,
            Kind::U64,
            Kind::I64,
            Kind::F32,
            Kind::F64,
        ];
        for order in [Order::Abcd, Order::Dcba, Order::Badc, Order::Cdab] {
            for kind in numeric {
                let mut p = point(kind, order);
                p.scale = 0.1;
                p.offset = 2.0;
                let signed = !matches!(kind, Kind::U16 | Kind::U32 | Kind::U64);
                for v in [12.3, if signed { -7.5 } else { 2.0 }] {
                    let regs = encode_registers(&p, &Value::Float(v), 0).unwrap();
                    let back = decode_registers(&p, &regs).as_f64().unwrap();
                    assert!((back - v).abs() < 1e-5, "{kind:?} {order:?}: {v} -> {back}");
                }
            }
        }
        let p = point(Kind::RegisterBit(2), Order::Abcd);
        assert_eq!(
            encode_registers(&p, &Value::Bool(true), 0b0001),
            Ok(vec![0b0101])
        );
        assert_eq!(
            encode_registers(&p, &Value::Bool(false), 0b0101),
            Ok(vec![0b0001])
        );
    }

    #[test]
    fn encoding_rejects_out_of_range() {
        let mut p = point(Kind::U16, Order::Abcd);
        assert_eq!(
            encode_registers(&p, &Value::Int(70_000), 0),
            Err(EncodeError::TypeRange(70_000.0))
        );
        assert_eq!(
            encode_registers(&p, &Value::Int(-1), 0),
            Err(EncodeError::TypeRange(-1.0))
        );
        p.max = Some(100.0);
        assert!(matches!(
            encode_registers(&p, &Value::Float(100.5), 0),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert_eq!(
            encode_registers(&p, &Value::Bool(true), 0),
            Err(EncodeError::WrongType("a number"))
        );
    }

    /// Defect 3: a bit write must change only that bit of the logical
    /// register that decoding tests, in every byte order.
    #[test]
    fn a_bit_write_changes_only_its_bit_in_every_order() {
        for order in [Order::Abcd, Order::Dcba, Order::Badc, Order::Cdab] {
            for bit in [0u8, 3, 8, 15] {
                let p = point(Kind::RegisterBit(bit), order);
                // The register as the slave holds it: logical 0x0012, on the
                // wire in this order.
                let wire = from_be_bytes(&0x0012u16.to_be_bytes(), order)[0];
                let set = encode_registers(&p, &Value::Bool(true), wire).unwrap();
                let logical = u16::from_be_bytes(array(&to_be_bytes(&set, order)));
                assert_eq!(logical, 0x0012 | 1 << bit, "{order:?} bit {bit}");
                assert_eq!(decode_registers(&p, &set), Value::Bool(true), "{order:?}");
                // Every other bit reads as before.
                for other in (0..16u8).filter(|b| *b != bit) {
                    let q = point(Kind::RegisterBit(other), order);
                    assert_eq!(
                        decode_registers(&q, &set),
                        decode_registers(&q, &[wire]),
                        "{order:?}: setting bit {bit} changed bit {other}"
                    );
                }
                let cleared = encode_registers(&p, &Value::Bool(false), set[0]).unwrap();
                assert_eq!(cleared, [wire], "{order:?} bit {bit}");
            }
        }
    }

    /// Defect 7: 64-bit integers are written exactly, never wrapped.
    #[test]
    fn sixty_four_bit_writes_are_exact() {
        let p = point(Kind::I64, Order::Abcd);
        let regs = encode_registers(&p, &Value::Int(i64::MAX), 0).unwrap();
        assert_eq!(regs, [0x7FFF, 0xFFFF, 0xFFFF, 0xFFFF]);
        assert_eq!(decode_registers(&p, &regs), Value::Int(i64::MAX));
        let regs = encode_registers(&p, &Value::Int(i64::MIN), 0).unwrap();
        assert_eq!(regs, [0x8000, 0, 0, 0]);
        assert_eq!(
            encode_registers(&p, &Value::UInt(1 << 63), 0),
            Err(EncodeError::TypeRange(9_223_372_036_854_775_808.0))
        );
        let u = point(Kind::U64, Order::Abcd);
        let regs = encode_registers(&u, &Value::UInt(u64::MAX), 0).unwrap();
        assert_eq!(regs, [0xFFFF; 4]);
        assert_eq!(decode_registers(&u, &regs), Value::UInt(u64::MAX));
        let regs = encode_registers(&u, &Value::UInt(u64::MAX - 1), 0).unwrap();
        assert_eq!(regs, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]);
        // Above 2^53 every integer survives.
        let big = (1u64 << 53) + 1;
        let regs = encode_registers(&u, &Value::UInt(big), 0).unwrap();
        assert_eq!(decode_registers(&u, &regs), Value::Int(big as i64));
        assert!(encode_registers(&u, &Value::Int(-1), 0).is_err());
        // A float just past the type's end is refused, not saturated.
        assert!(encode_registers(&u, &Value::Float(18_446_744_073_709_551_616.0), 0).is_err());
        assert!(encode_registers(&p, &Value::Float(9_223_372_036_854_775_808.0), 0).is_err());
        // min/max bounds are exact for integers too.
        let mut bounded = point(Kind::I64, Order::Abcd);
        bounded.max = Some(9_007_199_254_740_992.0); // 2^53
        assert!(encode_registers(&bounded, &Value::Int(9_007_199_254_740_992), 0).is_ok());
        assert!(encode_registers(&bounded, &Value::Int(9_007_199_254_740_993), 0).is_err());
    }
}

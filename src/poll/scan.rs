//! A scan: which unit ids answer on a bus. Each probe is one read of
//! holding register 0 without retries, run by the bus owner as a job (so a
//! scan through the daemon shares the bus with polling); an exception reply
//! also proves that a slave is there. With `--identify`, each answering unit
//! is then matched against the device profiles' `[identify]` reads, one
//! read per distinct register for all the profiles that read it. `scan` on
//! the command line and the local API tell the answers the same way.

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::config::{Address, Area, DeviceProfile, Identify, UnitId};
use crate::modbus::{Reply, Request, TxError};

/// Parses `A-B` (or a single id) within 1..247.
pub fn parse_units(text: &str) -> Result<RangeInclusive<u8>, String> {
    let (a, b) = text.split_once('-').unwrap_or((text, text));
    let parse = |s: &str| {
        s.trim()
            .parse::<u8>()
            .ok()
            .filter(|u| UnitId::new(*u).is_some())
            .ok_or_else(|| format!("{} is not a unit id (1..247)", crate::text::quote(s)))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a > b {
        return Err(format!("empty range {a}-{b}"));
    }
    Ok(a..=b)
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// A slave answered with holding register 0.
    Registers { registers: Vec<u16> },
    /// A slave answered with an exception (register 0 not readable).
    Exception { code: u8 },
    /// Bytes came that are no reply: probably wrong baud or parity.
    Garbled { error: String },
    /// Nothing answered.
    Silent,
    /// The bus itself failed; the scan stops.
    Disconnected { error: String },
}

/// One unit id and what its probe found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub unit: u8,
    #[serde(flatten)]
    pub answer: Answer,
    /// With identify: the profiles whose `[identify]` read matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<String>>,
}

impl Probe {
    pub fn new(unit: UnitId, outcome: Result<Reply, TxError>) -> Self {
        let answer = match outcome {
            Ok(Reply::Registers(registers)) => Answer::Registers { registers },
            Ok(_) => Answer::Registers {
                registers: Vec::new(),
            },
            Err(TxError::Exception(code)) => Answer::Exception {
                code: u8::from(code),
            },
            Err(e @ (TxError::Garbled(_) | TxError::Crc)) => Answer::Garbled {
                error: e.to_string(),
            },
            Err(TxError::Timeout(_)) => Answer::Silent,
            Err(TxError::Port(error)) => Answer::Disconnected { error },
        };
        Self {
            unit: unit.get(),
            answer,
            matches: None,
        }
    }

    /// Whether a slave is there.
    pub fn answers(&self) -> bool {
        matches!(
            self.answer,
            Answer::Registers { .. } | Answer::Exception { .. }
        )
    }
}

/// The profiles' `[identify]` reads, grouped by the registers they read.
#[derive(Debug, Clone, Default)]
pub struct Identifier {
    groups: Vec<Group>,
}

/// One read, and the profiles that decode it.
#[derive(Debug, Clone)]
struct Group {
    area: Area,
    address: Address,
    count: u16,
    candidates: Vec<(String, Identify)>,
}

impl Identifier {
    pub fn new(profiles: &[DeviceProfile]) -> Self {
        let mut groups: Vec<Group> = Vec::new();
        for profile in profiles {
            let Some(identify) = &profile.identify else {
                continue;
            };
            let p = &identify.point;
            let count = p.kind.width();
            let candidate = (profile.name.clone(), identify.clone());
            match groups
                .iter_mut()
                .find(|g| (g.area, g.address, g.count) == (p.area, p.address, count))
            {
                Some(group) => group.candidates.push(candidate),
                None => groups.push(Group {
                    area: p.area,
                    address: p.address,
                    count,
                    candidates: vec![candidate],
                }),
            }
        }
        Self { groups }
    }

    /// The reads to make of each answering unit.
    pub fn requests(&self) -> impl Iterator<Item = Request> + '_ {
        self.groups.iter().map(|g| match g.area {
            Area::Input => Request::ReadInput(g.address, g.count),
            _ => Request::ReadHolding(g.address, g.count),
        })
    }

    /// The profiles matched by the answer to the `index`th request.
    pub fn matches(&self, index: usize, registers: &[u16]) -> Vec<String> {
        let Some(group) = self.groups.get(index) else {
            return Vec::new();
        };
        if registers.len() != usize::from(group.count) {
            return Vec::new();
        }
        group
            .candidates
            .iter()
            .filter(|(_, identify)| {
                codec::decode_registers(&identify.point, registers)
                    .as_f64()
                    .is_some_and(|v| identify.matches(v))
            })
            .map(|(name, _)| name.clone())
            .collect()
    }
}

//! A fault-injecting RTU slave on a real pseudo-terminal: it answers from a
//! register map like a well-behaved device until told to misbehave, then
//! sends garbage, a noise burst, a CRC-bad, truncated or PDU-garbled frame,
//! a late reply, or nothing — per request, from a script, or per unit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fieldgate::modbus::rtu::{adu, parse_request};
use fieldgate::modbus::{pack_bits, Request};
use fieldgate::sim::{self, Pty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the slave does with one request instead of answering it properly.
#[derive(Debug, Clone)]
pub enum Fault {
    /// `n` bytes of garbage and no reply.
    Garbage(usize),
    /// A burst of noise, then the proper reply.
    NoiseThenReply,
    /// The proper reply with one bit of its data flipped (CRC fails).
    BadCrc,
    /// The first half of the proper reply.
    Truncated,
    /// A frame with a valid CRC whose PDU does not fit the request.
    BadPdu,
    /// The proper reply, after this long.
    Late(Duration),
    /// Nothing.
    Silent,
}

#[derive(Default)]
struct State {
    registers: HashMap<(u8, u16), u16>,
    coils: HashMap<(u8, u16), bool>,
    /// Faults for the next requests, in order.
    script: VecDeque<Fault>,
    /// Faults for the next write requests, in order.
    write_script: VecDeque<Fault>,
    /// Units that never answer.
    silent: HashSet<u8>,
    /// Units that do not answer writes (but answer reads).
    deaf_to_writes: HashSet<u8>,
    /// Every request received, with when.
    log: Vec<(Instant, u8, Request)>,
}

/// The slave and its line. Dropping it stops serving.
pub struct Faulty {
    state: Arc<Mutex<State>>,
    pub pty: Pty,
}

impl Faulty {
    pub fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let serving = state.clone();
        let pty = sim::line(move |mut line| async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 512];
            loop {
                let read =
                    tokio::time::timeout(Duration::from_millis(50), line.read(&mut chunk)).await;
                match read {
                    Err(_) => {
                        buf.clear(); // an idle line ends whatever came
                        continue;
                    }
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                }
                let Ok((unit, request)) = parse_request(&buf) else {
                    if buf.len() > 256 {
                        buf.clear();
                    }
                    continue;
                };
                buf.clear();
                let (fault, proper) = {
                    let mut s = serving.lock().unwrap();
                    s.log.push((Instant::now(), unit.get(), request.clone()));
                    if s.silent.contains(&unit.get())
                        || (request.is_write() && s.deaf_to_writes.contains(&unit.get()))
                    {
                        continue;
                    }
                    let fault = match request.is_write() {
                        true => s.write_script.pop_front().or_else(|| s.script.pop_front()),
                        false => s.script.pop_front(),
                    };
                    (fault, answer(&mut s, unit.get(), &request))
                };
                let out: Vec<u8> = match fault {
                    None => proper,
                    Some(Fault::Garbage(n)) => (0..n).map(|i| (i * 37 + 11) as u8).collect(),
                    Some(Fault::NoiseThenReply) => {
                        let mut noisy = vec![0xFF, 0x00, 0xFE, unit.get(), 0x83, 0x55];
                        noisy.extend(&proper);
                        noisy
                    }
                    Some(Fault::BadCrc) => {
                        let mut bad = proper.clone();
                        let at = bad.len() / 2;
                        bad[at] ^= 0x04;
                        bad
                    }
                    Some(Fault::Truncated) => proper[..proper.len() / 2].to_vec(),
                    Some(Fault::BadPdu) => {
                        // The function's code with a byte count that does not
                        // fit what was asked.
                        adu(unit.get(), &[request.function_code().value(), 0x01, 0x00])
                    }
                    Some(Fault::Late(delay)) => {
                        tokio::time::sleep(delay).await;
                        proper
                    }
                    Some(Fault::Silent) => continue,
                };
                if line.write_all(&out).await.is_err() {
                    return;
                }
            }
        })
        .expect("pty");
        Self { state, pty }
    }

    pub fn set(&self, unit: u8, address: u16, value: u16) {
        self.state
            .lock()
            .unwrap()
            .registers
            .insert((unit, address), value);
    }

    pub fn get(&self, unit: u8, address: u16) -> u16 {
        self.state
            .lock()
            .unwrap()
            .registers
            .get(&(unit, address))
            .copied()
            .unwrap_or(0)
    }

    /// The next requests get these faults, in order.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.lock().unwrap().script.extend(faults);
    }

    /// The next write requests get these faults, in order.
    pub fn script_writes(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.lock().unwrap().write_script.extend(faults);
    }

    pub fn silence(&self, unit: u8, silent: bool) {
        let mut s = self.state.lock().unwrap();
        if silent {
            s.silent.insert(unit);
        } else {
            s.silent.remove(&unit);
        }
    }

    pub fn deaf_to_writes(&self, unit: u8) {
        self.state.lock().unwrap().deaf_to_writes.insert(unit);
    }

    /// Every request received so far.
    pub fn log(&self) -> Vec<(Instant, u8, Request)> {
        self.state.lock().unwrap().log.clone()
    }

    /// The writes received so far.
    pub fn writes(&self) -> Vec<(u8, Request)> {
        self.log()
            .into_iter()
            .filter(|(_, _, r)| r.is_write())
            .map(|(_, u, r)| (u, r))
            .collect()
    }
}

/// The proper reply frame to `request`, applying writes to the map.
fn answer(s: &mut State, unit: u8, request: &Request) -> Vec<u8> {
    let fc = request.function_code().value();
    let pdu = match request {
        Request::ReadHolding(a, n) | Request::ReadInput(a, n) => {
            let mut pdu = vec![fc, (n * 2) as u8];
            for i in 0..*n {
                let value = s.registers.get(&(unit, a + i)).copied().unwrap_or(0);
                pdu.extend(value.to_be_bytes());
            }
            pdu
        }
        Request::ReadCoils(a, n) | Request::ReadDiscretes(a, n) => {
            let bits: Vec<bool> = (0..*n)
                .map(|i| s.coils.get(&(unit, a + i)).copied().unwrap_or(false))
                .collect();
            let packed = pack_bits(&bits);
            let mut pdu = vec![fc, packed.len() as u8];
            pdu.extend(packed);
            pdu
        }
        Request::WriteRegister(a, v) => {
            s.registers.insert((unit, *a), *v);
            request.pdu()
        }
        Request::WriteRegisters(a, values) => {
            for (i, v) in values.iter().enumerate() {
                s.registers.insert((unit, a + i as u16), *v);
            }
            let mut pdu = vec![fc];
            pdu.extend(a.to_be_bytes());
            pdu.extend((values.len() as u16).to_be_bytes());
            pdu
        }
        Request::WriteCoil(a, on) => {
            s.coils.insert((unit, *a), *on);
            request.pdu()
        }
        Request::WriteCoils(a, bits) => {
            for (i, on) in bits.iter().enumerate() {
                s.coils.insert((unit, a + i as u16), *on);
            }
            let mut pdu = vec![fc];
            pdu.extend(a.to_be_bytes());
            pdu.extend((bits.len() as u16).to_be_bytes());
            pdu
        }
    };
    adu(unit, &pdu)
}

//! Dial-in DTUs: 4G/Ethernet modems behind carrier NAT connect to the
//! gateway, not the other way round. One [`Listener`] per `listen` address
//! accepts them and hands each connection to its bus: told apart by the
//! registration packet the DTU sends first when buses share the address,
//! or given to the only bus there. A DTU that connects again replaces its
//! old connection (the bus takes the newest). The listener never stops on
//! an error: an address that cannot be bound is tried again every 30 s.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::config::{self, Transport};
use crate::text::{quote, to_hex};

/// How long a DTU has to send its registration after connecting.
const REGISTRATION_WAIT: Duration = Duration::from_secs(10);
const REBIND_EVERY: Duration = Duration::from_secs(30);
/// Connections waiting for their bus to take them.
const HANDOVER_QUEUE: usize = 4;

/// A bus waiting on this listener.
struct Waiting {
    bus: String,
    registration: Option<Vec<u8>>,
    handover: mpsc::Sender<TcpStream>,
}

/// Accepts the DTUs of one `listen` address.
pub(crate) struct Listener {
    listen: SocketAddr,
    buses: Vec<Waiting>,
}

impl Listener {
    /// A listener for `buses` (dial-in buses with the same `listen`), and
    /// each bus's end of its handover channel.
    pub(crate) fn for_buses<'a>(
        buses: impl IntoIterator<Item = &'a config::Bus>,
    ) -> (Vec<(String, mpsc::Receiver<TcpStream>)>, Self) {
        let mut listen = None;
        let mut waiting = Vec::new();
        let mut receivers = Vec::new();
        for bus in buses {
            let Transport::DialIn {
                listen: addr,
                registration,
                ..
            } = &bus.transport
            else {
                continue;
            };
            listen = Some(*addr);
            let (handover, rx) = mpsc::channel(HANDOVER_QUEUE);
            waiting.push(Waiting {
                bus: bus.name.clone(),
                registration: registration.clone(),
                handover,
            });
            receivers.push((bus.name.clone(), rx));
        }
        let listen = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        (
            receivers,
            Self {
                listen,
                buses: waiting,
            },
        )
    }

    /// Accepts connections until the task is aborted.
    pub(crate) async fn run(self) {
        let mut logged = false;
        loop {
            match TcpListener::bind(self.listen).await {
                Ok(listener) => {
                    log::info!(target: "bus", "listening for DTUs on {} (bus {})", self.listen, self.names());
                    logged = false;
                    self.accept(&listener).await;
                }
                Err(e) if !logged => {
                    log::error!(target: "bus", "cannot listen on {} for bus {}: {e}; trying again every {}s", self.listen, self.names(), REBIND_EVERY.as_secs());
                    logged = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(REBIND_EVERY).await;
        }
    }

    fn names(&self) -> String {
        let names: Vec<&str> = self.buses.iter().map(|b| b.bus.as_str()).collect();
        names.join(", ")
    }

    async fn accept(&self, listener: &TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    log::warn!(target: "bus", "accepting on {}: {e}", self.listen);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = super::tcp::prepare(&stream) {
                log::debug!(target: "bus", "DTU {peer}: socket options: {e}");
            }
            // Identify each DTU on its own: a silent one must not hold up
            // the others.
            let buses: Vec<(String, Option<Vec<u8>>, mpsc::Sender<TcpStream>)> = self
                .buses
                .iter()
                .map(|b| (b.bus.clone(), b.registration.clone(), b.handover.clone()))
                .collect();
            tokio::spawn(identify(stream, peer, buses));
        }
    }
}

/// Reads the DTU's registration (when the buses here have one) and hands
/// the connection to its bus.
async fn identify(
    mut stream: TcpStream,
    peer: SocketAddr,
    buses: Vec<(String, Option<Vec<u8>>, mpsc::Sender<TcpStream>)>,
) {
    let chosen = if buses.iter().all(|(_, r, _)| r.is_none()) {
        buses.first().map(|(bus, _, tx)| (bus.clone(), tx.clone()))
    } else {
        let mut got = Vec::new();
        let mut chunk = [0u8; 256];
        let found = timeout(REGISTRATION_WAIT, async {
            loop {
                let matching = buses
                    .iter()
                    .find(|(_, r, _)| r.as_ref().is_some_and(|r| got.starts_with(r)));
                if let Some((bus, _, tx)) = matching {
                    return Some((bus.clone(), tx.clone()));
                }
                let could = buses
                    .iter()
                    .any(|(_, r, _)| r.as_ref().is_some_and(|r| r.starts_with(&got)));
                if !could {
                    return None;
                }
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .ok()
        .flatten();
        if found.is_none() {
            log::warn!(target: "bus", "a connection from {peer} sent {} instead of a known registration; closed", if got.is_empty() { "nothing".to_string() } else { format!("{} ({})", quote(&String::from_utf8_lossy(&got)), to_hex(&got[..got.len().min(16)])) });
        }
        found
    };
    let Some((bus, handover)) = chosen else {
        return;
    };
    log::info!(target: "bus", bus = bus.as_str(); "bus {bus}: DTU connected from {peer}");
    if handover.try_send(stream).is_err() {
        log::warn!(target: "bus", "bus {bus}: too many DTU connections waiting; the one from {peer} was closed");
    }
}

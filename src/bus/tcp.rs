//! TCP links: to a Modbus TCP device or a serial server (we connect), or
//! from a DTU (it connects to us, see [`super::dialin`]). Every socket gets
//! TCP keepalive, so a peer that vanished without a FIN (a 4G link that
//! dropped, a converter that lost power) is noticed even while the bus has
//! nothing to send; every read and write on it has a deadline of its own.

use std::io;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::TcpStream;

use super::Stream;

/// Keepalive: first probe after this much silence, then every
/// [`KEEPALIVE_EVERY`], given up after [`KEEPALIVE_PROBES`].
const KEEPALIVE_IDLE: u32 = 10;
const KEEPALIVE_EVERY: u32 = 5;
const KEEPALIVE_PROBES: u32 = 3;

/// Connects to `address` within `limit`.
pub(crate) async fn connect(address: &str, limit: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(limit, TcpStream::connect(address))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting timed out"))??;
    prepare(&stream)?;
    Ok(stream)
}

/// Small frames go out at once; a dead peer is found by keepalive.
pub(crate) fn prepare(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let settings = || -> nix::Result<()> {
        setsockopt(stream, sockopt::KeepAlive, &true)?;
        setsockopt(stream, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE)?;
        setsockopt(stream, sockopt::TcpKeepInterval, &KEEPALIVE_EVERY)?;
        setsockopt(stream, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)
    };
    settings().map_err(io::Error::from)
}

impl Stream for TcpStream {
    /// Whatever arrived before the request (a late reply, a heartbeat) is
    /// read and dropped; a peer that closed the connection shows here.
    fn discard_input(&mut self) -> io::Result<()> {
        let mut scratch = [0u8; 512];
        loop {
            match self.try_read(&mut scratch) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection",
                    ))
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

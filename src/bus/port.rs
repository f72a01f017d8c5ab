//! Opening a serial port with the bus settings, and the transport wrapper that
//! keeps a late reply from being taken as the answer to the next request.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_serial::{ClearBuffer, SerialPort, SerialPortBuilderExt, SerialStream};

use crate::config::{self, Parity};

/// Opens `bus.port` in raw mode with the bus's line settings. serialport
/// opens it exclusively (TIOCEXCL, which root bypasses, and a flock, which
/// it does not), so a second opener gets "Unable to acquire exclusive lock
/// on serial port" instead of interleaved frames.
pub fn open(bus: &config::Bus) -> io::Result<SerialStream> {
    let data_bits = match bus.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    tokio_serial::new(&bus.port, bus.baud)
        .data_bits(data_bits)
        .parity(match bus.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        })
        .stop_bits(if bus.stop_bits == 2 {
            tokio_serial::StopBits::Two
        } else {
            tokio_serial::StopBits::One
        })
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(io::Error::from)
}

/// A serial stream that drops whatever input is pending each time a request
/// is written. On a half-duplex line nothing that arrives before our request
/// is complete can be its answer, so such bytes are always stale: typically a
/// slow slave's reply to a request that already timed out.
#[derive(Debug)]
pub struct Port {
    inner: SerialStream,
}

impl Port {
    pub fn new(inner: SerialStream) -> Self {
        Self { inner }
    }
}

impl AsyncRead for Port {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.inner.clear(ClearBuffer::Input) {
            return Poll::Ready(Err(io::Error::from(e)));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

//! Opening a serial port with the bus settings.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_serial::{ClearBuffer, SerialPort, SerialPortBuilderExt, SerialStream};

use super::Stream;
use crate::config::{self, Parity};

/// Opens `bus.port` in raw mode with the bus's line settings. serialport
/// opens it exclusively (TIOCEXCL, which root bypasses, and a flock, which
/// it does not), so a second opener gets "Unable to acquire exclusive lock
/// on serial port" instead of interleaved frames.
pub(crate) fn open(bus: &config::Bus) -> io::Result<Serial> {
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
        .map(Serial)
        .map_err(io::Error::from)
}

/// An open serial port.
pub(crate) struct Serial(SerialStream);

impl Stream for Serial {
    /// On a half-duplex line nothing that arrived before our request can be
    /// its answer: typically a slow slave's reply to a request that already
    /// timed out. The kernel's input queue is flushed.
    fn discard_input(&mut self) -> io::Result<()> {
        self.0.clear(ClearBuffer::Input).map_err(io::Error::from)
    }
}

impl AsyncRead for Serial {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Serial {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

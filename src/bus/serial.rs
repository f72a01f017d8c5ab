//! Opening a serial port with the bus settings.

use std::io;

use tokio_serial::{ClearBuffer, SerialPort, SerialPortBuilderExt, SerialStream};

use super::Stream;
use crate::config::{self, Parity};

/// Opens `bus.port` in raw mode with the bus's line settings. serialport
/// opens it exclusively (TIOCEXCL, which root bypasses, and a flock, which
/// it does not), so a second opener gets "Unable to acquire exclusive lock
/// on serial port" instead of interleaved frames.
pub(crate) fn open(bus: &config::Bus) -> io::Result<SerialStream> {
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

impl Stream for SerialStream {
    /// On a half-duplex line nothing that arrived before our request can be
    /// its answer: typically a slow slave's reply to a request that already
    /// timed out. The kernel's input queue is flushed.
    fn discard_input(&mut self) -> io::Result<()> {
        self.clear(ClearBuffer::Input).map_err(io::Error::from)
    }
}

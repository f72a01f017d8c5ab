//! Waiting out the silent interval between two transactions precisely.
//! Tokio's timers have millisecond granularity, which on a fast line adds up
//! to a millisecond to every 1.75 ms inter-frame gap (the master's own idle
//! time, on top of the wire time). A timerfd wakes within the kernel's timer
//! slack (about 50 µs) instead, at no CPU cost.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Instant;

struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// One bus's gap timer.
pub(crate) struct Gap {
    /// `None` where no timerfd can be had: tokio's timer is used instead.
    timer: Option<AsyncFd<Fd>>,
}

impl Gap {
    pub(crate) fn new() -> Self {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .ok()
        // SAFETY: `Fd` owns the timer's descriptor, and the `AsyncFd` owns
        // the `Fd`: the descriptor stays open for as long as it is
        // registered and is closed only after the `AsyncFd` deregistered it.
        .and_then(|fd| unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE) }.ok());
        Self { timer }
    }

    /// Tokio's timer only: for links whose far end keeps its own line
    /// timing (TCP), and for tests on tokio's paused clock, which a timerfd
    /// does not follow.
    pub(crate) fn coarse() -> Self {
        Self { timer: None }
    }

    /// Resolves at `deadline` (at once if it has passed).
    pub(crate) async fn until(&mut self, deadline: Instant) {
        let Some(wait) = deadline.checked_duration_since(Instant::now()) else {
            return;
        };
        if wait.is_zero() {
            return;
        }
        if let Some(timer) = &self.timer {
            if Self::timerfd(timer, wait).await.is_ok() {
                return;
            }
        }
        tokio::time::sleep_until(deadline).await;
    }

    async fn timerfd(timer: &AsyncFd<Fd>, wait: std::time::Duration) -> io::Result<()> {
        timer
            .get_ref()
            .0
            .set(
                Expiration::OneShot(TimeSpec::from_duration(wait)),
                TimerSetTimeFlags::empty(),
            )
            .map_err(io::Error::from)?;
        loop {
            let mut guard = timer.readable().await?;
            let mut expirations = [0u8; 8];
            match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().0.as_fd(), &mut expirations).map_err(io::Error::from)
            }) {
                Ok(result) => return result.map(drop),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_close_to_the_deadline() {
        let mut gap = Gap::new();
        let mut late = Vec::new();
        for _ in 0..20 {
            let deadline = Instant::now() + Duration::from_micros(1750);
            gap.until(deadline).await;
            late.push(Instant::now().duration_since(deadline));
        }
        late.sort();
        // The median is what matters on a shared, noisy machine.
        assert!(late[10] < Duration::from_micros(900), "{late:?}");
        gap.until(Instant::now()).await;
    }
}

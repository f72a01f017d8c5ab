//! The outbox: every uplink record is appended to a durable store before it
//! is sent, and removed only when the broker has acknowledged it.
//!
//! One owner holds the [`Store`] (sled) on a thread of its own, so disk I/O
//! never runs on the async runtime and no lock is shared with any task.
//! Everything else holds an [`Outbox`] handle and sends it messages: appends
//! from the bus owners, the router and the daemon arrive on one channel, in
//! one order; the publisher reads ahead and acknowledges on the same channel.
//! The owner seals every [`FLUSH_EVERY`] and has a flusher thread sync the
//! disk meanwhile (an fsync on an SD card takes tens of milliseconds; reads
//! and appends do not wait for it), publishes its figures ([`Stats`]) and
//! keeps the status file that `fieldgate buffer` reads while the daemon
//! holds the store.

mod store;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch, Notify};

use crate::record::Record;
pub use store::{read_status, Flush, OutboxError, Stats, Store, FLUSH_EVERY};

/// Appends waiting for the owner. Past this (a disk so slow that the owner
/// cannot keep up) new records are dropped and counted, never blocking the
/// bus owners.
const QUEUE_MAX: usize = 8192;
/// How often the status file is rewritten when its figures changed, and at
/// least how often otherwise (so `buffer` can tell a stale file from a quiet
/// outbox without wearing the SD card).
const STATUS_EVERY: Duration = Duration::from_secs(2);
const STATUS_UNCHANGED_EVERY: Duration = Duration::from_secs(60);

enum Msg {
    Append(Record),
    Read {
        after: Option<u64>,
        limit: usize,
        reply: oneshot::Sender<Vec<(u64, Record)>>,
    },
    Ack(Vec<u64>),
    Discard(Vec<u64>),
    Counts(oneshot::Sender<(u64, u64)>),
    Close(oneshot::Sender<Result<(), OutboxError>>),
}

/// A handle to the outbox owner. Cheap to clone; every method returns at
/// once except [`Outbox::read`] and [`Outbox::close`].
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Msg>,
    queued: Arc<AtomicUsize>,
    lost: Arc<AtomicU64>,
    appended: Arc<Notify>,
    stats: watch::Receiver<Stats>,
}

impl Outbox {
    /// Opens the store under `data_dir` and starts its owner.
    pub fn start(data_dir: &std::path::Path, max_bytes: u64) -> Result<Self, OutboxError> {
        let store = Store::open(data_dir, max_bytes)?;
        let (tx, rx) = mpsc::channel();
        let (flush_tx, flushes) = mpsc::channel::<Flush>();
        let (done, flush_results) = mpsc::channel();
        std::thread::Builder::new()
            .name("outbox-flush".into())
            .spawn(move || {
                for flush in flushes {
                    let result = flush.db.flush().map(drop);
                    if done.send((flush, result)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| OutboxError::Thread(e.to_string()))?;
        let (stats_tx, stats) = watch::channel(store.stats());
        let outbox = Self {
            tx,
            queued: Arc::default(),
            lost: Arc::default(),
            appended: Arc::default(),
            stats,
        };
        let owner = Owner {
            store,
            rx,
            queued: outbox.queued.clone(),
            lost: outbox.lost.clone(),
            appended: outbox.appended.clone(),
            stats: stats_tx,
            status_written: None,
            flusher: flush_tx,
            flush_results,
            flushing: false,
        };
        std::thread::Builder::new()
            .name("outbox".into())
            .spawn(move || owner.run())
            .map_err(|e| OutboxError::Thread(e.to_string()))?;
        Ok(outbox)
    }

    /// Queues `record` for the store, in the order of all appends.
    pub fn append(&self, record: Record) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= QUEUE_MAX {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.tx.send(Msg::Append(record)).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Up to `limit` records after sequence number `after`, oldest first.
    pub async fn read(&self, after: Option<u64>, limit: usize) -> Vec<(u64, Record)> {
        self.request_read(after, limit).await.unwrap_or_default()
    }

    /// The same, as a request whose answer arrives on the returned channel:
    /// for a task that must go on serving other events meanwhile.
    pub fn request_read(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> oneshot::Receiver<Vec<(u64, Record)>> {
        let (reply, answer) = oneshot::channel();
        // If the owner is gone, `reply` is dropped and the answer an error.
        let _ = self.tx.send(Msg::Read {
            after,
            limit,
            reply,
        });
        answer
    }

    /// The broker acknowledged these records.
    pub fn ack(&self, seqs: Vec<u64>) {
        if !seqs.is_empty() {
            let _ = self.tx.send(Msg::Ack(seqs));
        }
    }

    /// These records can never be published: remove and count them.
    pub fn discard(&self, seqs: Vec<u64>) {
        let _ = self.tx.send(Msg::Discard(seqs));
    }

    /// Resolves when a record was appended since the last wait.
    pub async fn appended(&self) {
        self.appended.notified().await;
    }

    /// The figures as of the last flush (at most [`FLUSH_EVERY`] old).
    pub fn stats(&self) -> Stats {
        self.stats.borrow().clone()
    }

    /// Records held and their bytes, as of now.
    pub async fn counts(&self) -> (u64, u64) {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Msg::Counts(reply)).is_err() {
            return (0, 0);
        }
        answer.await.unwrap_or_default()
    }

    /// Stores everything appended so far, flushes and stops the owner.
    /// Call it once every producer has stopped.
    pub async fn close(&self) -> Result<(), OutboxError> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Msg::Close(reply)).is_err() {
            return Ok(());
        }
        answer.await.unwrap_or(Ok(()))
    }
}

/// The owner's side: the store, the inbox and what it publishes.
struct Owner {
    store: Store,
    rx: mpsc::Receiver<Msg>,
    queued: Arc<AtomicUsize>,
    lost: Arc<AtomicU64>,
    appended: Arc<Notify>,
    stats: watch::Sender<Stats>,
    status_written: Option<(Stats, Instant)>,
    flusher: mpsc::Sender<Flush>,
    flush_results: mpsc::Receiver<(Flush, sled::Result<()>)>,
    /// A flush is under way on the flusher thread.
    flushing: bool,
}

impl Owner {
    fn run(mut self) {
        let mut next_flush = Instant::now() + FLUSH_EVERY;
        loop {
            let wait = next_flush.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Append(record)) => {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    self.store.push(&record);
                    self.appended.notify_one();
                }
                Ok(Msg::Read {
                    after,
                    limit,
                    reply,
                }) => {
                    let _ = reply.send(self.store.after(after, limit));
                }
                Ok(Msg::Ack(seqs)) => {
                    if let Err(e) = self.store.remove(&seqs) {
                        log::error!(target: "outbox", "{e}");
                    }
                }
                Ok(Msg::Discard(seqs)) => self.store.discard(&seqs),
                Ok(Msg::Counts(reply)) => {
                    let _ = reply.send(self.store.counts());
                }
                Ok(Msg::Close(reply)) => {
                    let _ = reply.send(self.close());
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.close();
                    return;
                }
            }
            while let Ok((flush, result)) = self.flush_results.try_recv() {
                self.flushing = false;
                self.store.flushed(flush, result);
            }
            if Instant::now() >= next_flush {
                self.flush();
                next_flush = Instant::now() + FLUSH_EVERY;
            }
        }
    }

    fn take_lost(&mut self) {
        let lost = self.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            log::warn!(target: "outbox", "{lost} records could not be queued for the outbox (the disk is not keeping up); counted as dropped");
            self.store.count_lost(lost);
        }
    }

    /// Seals and starts a flush (unless one is under way: what is sealed
    /// now goes with the next), then publishes the figures and keeps the
    /// status file fresh.
    fn flush(&mut self) {
        self.take_lost();
        if !self.flushing {
            if let Some(flush) = self.store.seal_for_flush() {
                match self.flusher.send(flush) {
                    Ok(()) => self.flushing = true,
                    Err(mpsc::SendError(flush)) => {
                        let result = flush.db.flush().map(drop);
                        self.store.flushed(flush, result);
                    }
                }
            }
        }
        let stats = self.store.stats();
        let due = match &self.status_written {
            None => true,
            Some((last, at)) => {
                let changed = Stats {
                    at_ms: last.at_ms,
                    ..stats.clone()
                } != *last;
                at.elapsed()
                    >= if changed {
                        STATUS_EVERY
                    } else {
                        STATUS_UNCHANGED_EVERY
                    }
            }
        };
        if due {
            self.store.write_status(&stats);
            self.status_written = Some((stats.clone(), Instant::now()));
        }
        self.stats.send_replace(stats);
    }

    fn close(&mut self) -> Result<(), OutboxError> {
        self.take_lost();
        // Wait for the flush under way: it holds the database.
        if self.flushing {
            if let Ok((flush, result)) = self.flush_results.recv() {
                self.store.flushed(flush, result);
            }
            self.flushing = false;
        }
        let result = self.store.close();
        self.stats.send_replace(self.store.stats());
        result
    }
}

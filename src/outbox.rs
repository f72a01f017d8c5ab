//! The durable outbox: every uplink record is appended to sled under
//! `gateway.data_dir` before it is sent, and removed only when the broker has
//! acknowledged it. Bounded by `buffer.max_bytes`: past it the oldest records
//! are dropped, counted and logged. Tuned for an SD card: a small cache,
//! appends and deletes only (no rewriting of queues), flushed every 500 ms.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::poll::Reading;

/// sled's background flush interval: a crash or power cut loses at most
/// the records appended in this window.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Page cache for sled; the outbox is written and read sequentially.
const CACHE_BYTES: u64 = 2 * 1024 * 1024;
/// How often the daemon rewrites the status file read by `fieldgate buffer`.
const STATUS_EVERY: Duration = Duration::from_secs(2);
const STATUS_FILE: &str = "outbox-status.json";
/// At most one "dropped" warning per this interval, with the count since.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// One uplink record, as produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When the sample was taken (ms since the epoch).
    pub taken_ms: u64,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// One device's reading.
    Attributes {
        device: String,
        key: Option<String>,
        values: serde_json::Map<String, serde_json::Value>,
    },
}

impl From<Reading> for Record {
    fn from(r: Reading) -> Self {
        Record {
            taken_ms: r
                .taken
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            body: Body::Attributes {
                device: r.device,
                key: r.key,
                values: r.values,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot open the outbox at {path}: {error}. {hint}")]
    Open {
        path: PathBuf,
        error: sled::Error,
        hint: &'static str,
    },
    #[error("outbox at {path}: {source}")]
    Storage { path: PathBuf, source: sled::Error },
}

/// What `fieldgate buffer` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub messages: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Sample time of the oldest record held (ms since the epoch).
    pub oldest_ms: Option<u64>,
    pub dropped: u64,
    /// When these figures were taken (ms since the epoch).
    pub at_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct DropLog {
    since_last: u64,
    last: Option<Instant>,
}

/// The store. Shared (`Arc`) by the pollers, which append, and the
/// publisher, which reads in order and removes what was acknowledged.
pub struct Outbox {
    path: PathBuf,
    /// `None` while a failed store is being reopened.
    store: RwLock<Option<Store>>,
    max_bytes: u64,
    bytes: AtomicU64,
    /// Records held (sled's own `len` walks the whole tree).
    count: AtomicU64,
    next_seq: AtomicU64,
    dropped: AtomicU64,
    appended: Notify,
    drop_log: Mutex<DropLog>,
    /// While appends fail (disk full …): why, and when the store was last
    /// reopened to try again. Logged once per episode.
    failing: Mutex<Option<(String, Instant)>>,
}

/// The open sled database and its two trees.
struct Store {
    db: sled::Db,
    messages: sled::Tree,
    meta: sled::Tree,
}

/// What a store holds, counted when it is opened.
struct Contents {
    bytes: u64,
    count: u64,
    next_seq: u64,
    dropped: u64,
}

/// sled stays failed after an I/O error; the store is reopened this often
/// while appends fail, so the outbox recovers once space returns.
const REOPEN_EVERY: Duration = Duration::from_secs(5);

const DROPPED_KEY: &[u8] = b"dropped";

impl Outbox {
    /// Opens (or creates) the outbox under `data_dir`. A store that cannot
    /// be opened is an error naming the path; it is never wiped.
    pub fn open(data_dir: &Path, max_bytes: u64) -> Result<Self, OutboxError> {
        let path = data_dir.join("outbox");
        let (store, contents) = open_store(&path)?;
        Ok(Self {
            path,
            store: RwLock::new(Some(store)),
            max_bytes,
            bytes: AtomicU64::new(contents.bytes),
            count: AtomicU64::new(contents.count),
            next_seq: AtomicU64::new(contents.next_seq),
            dropped: AtomicU64::new(contents.dropped),
            appended: Notify::new(),
            drop_log: Mutex::new(DropLog {
                since_last: 0,
                last: None,
            }),
            failing: Mutex::new(None),
        })
    }

    /// Runs `f` on the open store; `None` while it is closed for a reopen.
    fn with<T>(&self, f: impl FnOnce(&Store) -> T) -> Option<T> {
        let guard = self.store.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(f)
    }

    /// Closes the failed store and opens it again, recounting what it holds.
    fn reopen(&self) {
        let mut guard = self.store.write().unwrap_or_else(|e| e.into_inner());
        // sled's file lock must be released before the path is opened again.
        drop(guard.take());
        match open_store(&self.path) {
            Ok((store, contents)) => {
                *guard = Some(store);
                self.bytes.store(contents.bytes, Ordering::SeqCst);
                self.count.store(contents.count, Ordering::SeqCst);
                self.next_seq.fetch_max(contents.next_seq, Ordering::SeqCst);
                self.dropped.fetch_max(contents.dropped, Ordering::SeqCst);
                log::info!(target: "outbox", "reopened {} ({} messages held)", self.path.display(), contents.count);
            }
            Err(e) => log::debug!(target: "outbox", "{e}"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record. A failing disk does not stop the daemon: the record
    /// is counted as dropped and the failure logged once until appends work
    /// again.
    pub fn push(&self, record: &Record) {
        let value = match serde_json::to_vec(record) {
            Ok(v) => v,
            Err(e) => {
                log::error!(target: "outbox", "cannot encode a record: {e}");
                return;
            }
        };
        let retry = match lock(&self.failing).as_mut() {
            Some((_, at)) if at.elapsed() >= REOPEN_EVERY => {
                *at = Instant::now();
                true
            }
            _ => false,
        };
        if retry {
            self.reopen();
        }
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let inserted = self
            .with(|store| store.messages.insert(seq.to_be_bytes(), value.as_slice()))
            .unwrap_or_else(|| Err(sled::Error::ReportableBug("store closed".into())));
        match inserted {
            Ok(_) => {
                self.bytes.fetch_add(value.len() as u64, Ordering::SeqCst);
                self.count.fetch_add(1, Ordering::SeqCst);
                if let Some((reason, _)) = lock(&self.failing).take() {
                    log::info!(target: "outbox", "appending works again (after: {reason})");
                }
                self.enforce_bound();
                self.appended.notify_one();
            }
            Err(e) => {
                self.count_dropped(1);
                let mut failing = lock(&self.failing);
                if failing.is_none() {
                    log::error!(target: "outbox", "cannot append to {}: {e}; readings are dropped and counted until it works again", self.path.display());
                    *failing = Some((e.to_string(), Instant::now()));
                }
            }
        }
    }

    /// Drops the oldest records while the store is over `max_bytes`.
    fn enforce_bound(&self) {
        let mut dropped = 0;
        while self.bytes.load(Ordering::SeqCst) > self.max_bytes {
            match self
                .with(|store| store.messages.pop_min())
                .and_then(Result::ok)
            {
                Some(Some((_, value))) => {
                    self.bytes.fetch_sub(value.len() as u64, Ordering::SeqCst);
                    self.count.fetch_sub(1, Ordering::SeqCst);
                    dropped += 1;
                }
                _ => break,
            }
        }
        if dropped > 0 {
            self.count_dropped(dropped);
            let mut log = lock(&self.drop_log);
            log.since_last += dropped;
            if log.last.is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY) {
                let oldest = self.oldest().map(|r| r.taken_ms);
                log::warn!(
                    target: "outbox",
                    "outbox full ({} bytes): dropped the {} oldest messages; {} dropped in all; oldest kept taken at {}",
                    self.max_bytes,
                    log.since_last,
                    self.dropped.load(Ordering::SeqCst),
                    oldest.map_or("-".to_string(), format_ms)
                );
                log.since_last = 0;
                log.last = Some(Instant::now());
            }
        }
    }

    fn count_dropped(&self, n: u64) {
        let total = self.dropped.fetch_add(n, Ordering::SeqCst) + n;
        self.with(|store| store.meta.insert(DROPPED_KEY, &total.to_be_bytes()));
    }

    fn oldest(&self) -> Option<Record> {
        let (_, value) = self.with(|store| store.messages.first())?.ok()??;
        serde_json::from_slice(&value).ok()
    }

    /// Records with sequence numbers above `after` (all if `None`), oldest
    /// first, at most `limit`. Undecodable entries are skipped and logged.
    pub fn after(&self, after: Option<u64>, limit: usize) -> Vec<(u64, Record)> {
        let raw: Vec<(sled::IVec, sled::IVec)> = self
            .with(|store| {
                let iter = match after {
                    Some(seq) => store.messages.range((seq + 1).to_be_bytes()..),
                    None => store.messages.iter(),
                };
                iter.filter_map(Result::ok).take(limit).collect()
            })
            .unwrap_or_default();
        raw.into_iter()
            .filter_map(|(key, value)| match serde_json::from_slice(&value) {
                Ok(record) => Some((seq_of(&key), record)),
                Err(e) => {
                    log::error!(target: "outbox", "skipping unreadable record {}: {e}", seq_of(&key));
                    let _ = self.remove(&[seq_of(&key)]);
                    None
                }
            })
            .collect()
    }

    /// Removes acknowledged records.
    pub fn remove(&self, seqs: &[u64]) -> Result<(), OutboxError> {
        let storage = |source| OutboxError::Storage {
            path: self.path.clone(),
            source,
        };
        for seq in seqs {
            let removed = self
                .with(|store| store.messages.remove(seq.to_be_bytes()))
                .transpose()
                .map_err(storage)?
                .flatten();
            if let Some(value) = removed {
                self.bytes.fetch_sub(value.len() as u64, Ordering::SeqCst);
                self.count.fetch_sub(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Resolves when a record is appended (or one was appended since the
    /// last wait).
    pub async fn appended(&self) {
        self.appended.notified().await;
    }

    pub fn stats(&self) -> Stats {
        Stats {
            messages: self.count.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            max_bytes: self.max_bytes,
            oldest_ms: self.oldest().map(|r| r.taken_ms),
            dropped: self.dropped.load(Ordering::SeqCst),
            at_ms: now_ms(),
        }
    }

    /// Flushes to disk (at shutdown) and writes the status file.
    pub fn flush(&self) -> Result<(), OutboxError> {
        if let Some(result) = self.with(|store| store.db.flush()) {
            result.map_err(|source| OutboxError::Storage {
                path: self.path.clone(),
                source,
            })?;
        }
        self.write_status();
        Ok(())
    }

    /// Writes the figures `fieldgate buffer` shows while the daemon holds
    /// the store's lock.
    pub fn write_status(&self) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        let tmp = dir.join(format!("{STATUS_FILE}.tmp"));
        let json = serde_json::to_vec(&self.stats()).unwrap_or_default();
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(STATUS_FILE));
        }
    }

    /// Keeps the status file fresh until the process ends.
    pub async fn keep_status(&self) {
        let mut tick = tokio::time::interval(STATUS_EVERY);
        loop {
            tick.tick().await;
            self.write_status();
        }
    }
}

/// The status file a running daemon keeps under `data_dir`.
pub fn read_status(data_dir: &Path) -> Option<Stats> {
    let text = std::fs::read(data_dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Opens the sled store at `path` and counts what it holds.
fn open_store(path: &Path) -> Result<(Store, Contents), OutboxError> {
    let open_error = |source: sled::Error| {
        let hint = match &source {
            sled::Error::Io(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                "Check that the service user owns the directory (systemd: StateDirectory=fieldgate)."
            }
            sled::Error::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                "Another fieldgate process has it open; stop it first."
            }
            sled::Error::Io(_) => "Check that the disk is mounted, writable and not full.",
            sled::Error::Corruption { .. } => {
                "The store is damaged. Move the directory aside (it is kept for inspection) and restart to begin a new one."
            }
            _ => "Move the directory aside and restart to begin a new one.",
        };
        OutboxError::Open {
            path: path.to_path_buf(),
            error: source,
            hint,
        }
    };
    std::fs::create_dir_all(path).map_err(|e| open_error(e.into()))?;
    let db = sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
        .flush_every_ms(Some(FLUSH_EVERY.as_millis() as u64))
        .open()
        .map_err(open_error)?;
    let messages = db.open_tree("messages").map_err(open_error)?;
    let meta = db.open_tree("meta").map_err(open_error)?;
    let (mut bytes, mut count) = (0, 0);
    for entry in messages.iter() {
        let (_, value) = entry.map_err(open_error)?;
        bytes += value.len() as u64;
        count += 1;
    }
    let next_seq = match messages.last().map_err(open_error)? {
        Some((key, _)) => seq_of(&key) + 1,
        None => 0,
    };
    let dropped = meta
        .get(DROPPED_KEY)
        .map_err(open_error)?
        .map_or(0, |v| seq_of(&v));
    let contents = Contents {
        bytes,
        count,
        next_seq,
        dropped,
    };
    Ok((Store { db, messages, meta }, contents))
}

fn seq_of(bytes: &[u8]) -> u64 {
    let mut be = [0u8; 8];
    let n = bytes.len().min(8);
    be[8 - n..].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(be)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `2026-11-23 21:40:05 UTC` for a time in ms since the epoch.
pub fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64, key: Option<&str>) -> Record {
        let mut values = serde_json::Map::new();
        values.insert("n".into(), i.into());
        Record {
            taken_ms: 1_700_000_000_000 + i,
            body: Body::Attributes {
                device: "d".into(),
                key: key.map(Into::into),
                values,
            },
        }
    }

    #[test]
    fn records_survive_reopen_in_order_and_are_removed_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), 1 << 20).unwrap();
            for i in 0..5 {
                outbox.push(&record(i, None));
            }
            outbox.remove(&[0, 1]).unwrap();
            outbox.flush().unwrap();
        }
        let outbox = Outbox::open(dir.path(), 1 << 20).unwrap();
        let held: Vec<u64> = outbox
            .after(None, 100)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(held, [2, 3, 4]);
        outbox.push(&record(5, None));
        let after: Vec<u64> = outbox
            .after(Some(3), 100)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(after, [4, 5], "sequence numbers continue after a reopen");
        assert_eq!(outbox.stats().messages, 4);
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        // Records 10..35 all encode to the same size.
        let size = serde_json::to_vec(&record(10, None)).unwrap().len() as u64;
        let outbox = Outbox::open(dir.path(), size * 10).unwrap();
        for i in 10..35 {
            outbox.push(&record(i, None));
        }
        let stats = outbox.stats();
        assert_eq!((stats.messages, stats.dropped), (10, 15));
        assert!(stats.bytes <= size * 10);
        assert_eq!(stats.oldest_ms, Some(1_700_000_000_025));
        drop(outbox);
        assert_eq!(
            Outbox::open(dir.path(), size * 10).unwrap().stats().dropped,
            15
        );
    }

    #[test]
    fn a_locked_store_is_a_clear_error_not_a_wipe() {
        let dir = tempfile::tempdir().unwrap();
        let first = Outbox::open(dir.path(), 1 << 20).unwrap();
        first.push(&record(1, None));
        let err = Outbox::open(dir.path(), 1 << 20).err().expect("locked");
        let text = err.to_string();
        assert!(
            text.contains(&dir.path().join("outbox").display().to_string()),
            "{text}"
        );
        assert_eq!(first.stats().messages, 1);
    }
}

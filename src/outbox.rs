//! The durable outbox: every uplink record is appended to sled under
//! `gateway.data_dir` before it is sent, and removed only when the broker has
//! acknowledged it. Bounded by `buffer.max_bytes`: past it the oldest records
//! are dropped, counted and logged.
//!
//! Layout, tuned for an SD card and little RAM: records are grouped into
//! segments, one sled value per segment, keyed by its first sequence number.
//! New records wait in an open segment in memory, which is sealed with one
//! insert every [`FLUSH_EVERY`] (or when it reaches [`SEGMENT_BYTES`]) and
//! flushed at once. The totals (records, bytes, next sequence number, drops)
//! are written in the same atomic batch as every segment change, so opening a
//! store never walks it. A segment is deleted when all its records are
//! acknowledged; after a crash a partly acknowledged segment is sent again
//! whole (at least once).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::poll::Reading;

/// How often the open segment is sealed and sled flushed: a crash or power
/// cut loses at most the records appended in this window.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// The open segment is sealed early when it reaches this size, which also
/// bounds how much one drop of the oldest segment removes.
pub const SEGMENT_BYTES: u64 = 64 * 1024;
/// Page cache for sled; the outbox is written and read sequentially.
const CACHE_BYTES: u64 = 2 * 1024 * 1024;
/// How often the daemon rewrites the status file read by `fieldgate buffer`
/// when its figures changed, and at least how often otherwise (so `buffer`
/// can tell a stale file from a quiet outbox without wearing the SD card).
const STATUS_EVERY: Duration = Duration::from_secs(2);
const STATUS_UNCHANGED_EVERY: Duration = Duration::from_secs(60);
const STATUS_FILE: &str = "outbox-status.json";
/// At most one "dropped" warning per this interval, with the count since.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);
/// sled stays failed after an I/O error; the store is reopened this often
/// while sealing fails, so the outbox recovers once space returns.
const REOPEN_EVERY: Duration = Duration::from_secs(5);

/// The sled tree, and its keys: `S` + first sequence number (big-endian)
/// for a segment, `M` for the totals.
const TREE: &str = "outbox";
const SEGMENT_PREFIX: u8 = b'S';
const TOTALS_KEY: &[u8] = b"M";
/// A record's frame in a segment: sequence number (u64) and JSON length
/// (u32), big-endian, then the JSON.
const FRAME_HEADER: u64 = 12;

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
    /// Something the platform should know: a rejected or failed write, a
    /// device going offline or online, a raw frame that got no answer.
    Event {
        id: u64,
        method: String,
        params: serde_json::Map<String, serde_json::Value>,
    },
    /// The answer to a platform command: `key` is the sub-device it was
    /// sent to, `id` the command id as the platform gave it.
    Reply {
        key: Option<String>,
        id: serde_json::Value,
        method: String,
        params: serde_json::Map<String, serde_json::Value>,
    },
    /// A raw frame's response for `data/<stream>`, already in the stream's
    /// encoding.
    Stream { name: String, payload: Vec<u8> },
}

impl Record {
    /// A record taken now.
    pub fn now(body: Body) -> Self {
        Record {
            taken_ms: now_ms(),
            body,
        }
    }

    /// An event taken now, with a fresh id (ThingsCloud's `event/report/<id>`).
    pub fn event(method: &str, params: serde_json::Value) -> Self {
        static NEXT_ID: std::sync::OnceLock<std::sync::atomic::AtomicU64> =
            std::sync::OnceLock::new();
        let id = NEXT_ID
            .get_or_init(|| std::sync::atomic::AtomicU64::new(now_ms()))
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let params = match params {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        Self::now(Body::Event {
            id,
            method: method.to_string(),
            params,
        })
    }
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

/// What the sealed segments hold, stored under [`TOTALS_KEY`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    count: u64,
    bytes: u64,
    next_seq: u64,
    dropped: u64,
}

impl Totals {
    fn encode(&self) -> Vec<u8> {
        [self.count, self.bytes, self.next_seq, self.dropped]
            .iter()
            .flat_map(|n| n.to_be_bytes())
            .collect()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 32 {
            return None;
        }
        let n = |i: usize| be(&bytes[i * 8..i * 8 + 8]);
        Some(Self {
            count: n(0),
            bytes: n(1),
            next_seq: n(2),
            dropped: n(3),
        })
    }
}

fn segment_key(first: u64) -> [u8; 9] {
    let mut key = [SEGMENT_PREFIX; 9];
    key[1..].copy_from_slice(&first.to_be_bytes());
    key
}

/// All segment keys, oldest first.
fn segment_range() -> std::ops::RangeInclusive<[u8; 9]> {
    segment_key(0)..=segment_key(u64::MAX)
}

fn push_frame(out: &mut Vec<u8>, seq: u64, json: &[u8]) {
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json);
}

fn frame_len(json: &[u8]) -> u64 {
    FRAME_HEADER + json.len() as u64
}

/// The records of a segment value; a damaged tail is logged and skipped.
fn frames(value: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    let mut rest = value;
    while rest.len() >= FRAME_HEADER as usize {
        let (header, tail) = rest.split_at(FRAME_HEADER as usize);
        let len = be(&header[8..]) as usize;
        let Some(json) = tail.get(..len) else { break };
        out.push((be(&header[..8]), json));
        rest = &tail[len..];
    }
    if !rest.is_empty() {
        log::error!(target: "outbox", "a damaged segment: {} trailing bytes skipped", rest.len());
    }
    out
}

/// A sealed segment the publisher has read: which of its records still
/// wait for an acknowledgement.
struct Partial {
    count: u64,
    bytes: u64,
    pending: BTreeSet<u64>,
}

struct DropLog {
    since_last: u64,
    last: Option<Instant>,
}

/// The open sled database and its tree.
struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

struct State {
    /// `None` while a failed store is being reopened.
    store: Option<Store>,
    /// What sled holds, except drops not yet written with the next batch.
    sealed: Totals,
    /// `sealed.dropped` has grown since the totals were last written.
    drops_unwritten: bool,
    /// Records not sealed yet, oldest first.
    open: VecDeque<(u64, Vec<u8>)>,
    open_bytes: u64,
    next_seq: u64,
    /// The highest sequence number handed to the publisher.
    handed: Option<u64>,
    /// Sealed segments the publisher has read, by first sequence number.
    partial: BTreeMap<u64, Partial>,
    /// While sealing fails (disk full …): why, and when the store was last
    /// reopened to try again. Logged once per episode.
    failing: Option<(String, Instant)>,
    drop_log: DropLog,
}

impl State {
    fn is_pending(&self, first: u64, seq: u64) -> bool {
        self.partial
            .get(&first)
            .is_none_or(|p| p.pending.contains(&seq))
    }

    /// Applies a batch that also writes `totals`; adopts them on success.
    fn apply(&mut self, mut batch: sled::Batch, totals: Totals) -> sled::Result<()> {
        let store = self
            .store
            .as_ref()
            .ok_or_else(|| sled::Error::ReportableBug("the store is closed".into()))?;
        batch.insert(TOTALS_KEY, totals.encode());
        store.tree.apply_batch(batch)?;
        self.sealed = totals;
        self.drops_unwritten = false;
        Ok(())
    }
}

/// The store. Shared (`Arc`) by the pollers, which append, and the
/// publisher, which reads in order and removes what was acknowledged.
pub struct Outbox {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    appended: Notify,
}

impl Outbox {
    /// Opens (or creates) the outbox under `data_dir`. A store that cannot
    /// be opened is an error naming the path; it is never wiped.
    pub fn open(data_dir: &Path, max_bytes: u64) -> Result<Self, OutboxError> {
        let path = data_dir.join("outbox");
        let (store, sealed) = open_store(&path)?;
        Ok(Self {
            path,
            max_bytes,
            state: Mutex::new(State {
                store: Some(store),
                sealed,
                drops_unwritten: false,
                open: VecDeque::new(),
                open_bytes: 0,
                next_seq: sealed.next_seq,
                handed: None,
                partial: BTreeMap::new(),
                failing: None,
                drop_log: DropLog {
                    since_last: 0,
                    last: None,
                },
            }),
            appended: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record to the open segment.
    pub fn push(&self, record: &Record) {
        let json = match serde_json::to_vec(record) {
            Ok(v) => v,
            Err(e) => {
                log::error!(target: "outbox", "cannot encode a record: {e}");
                return;
            }
        };
        let mut s = self.lock();
        let seq = s.next_seq;
        s.next_seq += 1;
        s.open_bytes += frame_len(&json);
        s.open.push_back((seq, json));
        if s.open_bytes >= SEGMENT_BYTES {
            self.seal(&mut s);
        }
        self.enforce_bound(&mut s);
        drop(s);
        self.appended.notify_one();
    }

    /// Writes the open segment to sled with one batch. A failing disk does
    /// not stop the daemon: its records are counted as dropped and the
    /// failure logged once until sealing works again.
    fn seal(&self, s: &mut State) {
        if s.open.is_empty() {
            if s.drops_unwritten {
                let _ = s.apply(sled::Batch::default(), s.sealed);
            }
            return;
        }
        if let Some((_, at)) = &mut s.failing {
            if at.elapsed() >= REOPEN_EVERY {
                *at = Instant::now();
                self.reopen(s);
            }
        }
        let open = std::mem::take(&mut s.open);
        let bytes = std::mem::take(&mut s.open_bytes);
        let mut value = Vec::with_capacity(bytes as usize);
        for (seq, json) in &open {
            push_frame(&mut value, *seq, json);
        }
        let first = open.front().map_or(0, |(seq, _)| *seq);
        let count = open.len() as u64;
        let mut batch = sled::Batch::default();
        batch.insert(&segment_key(first), value);
        let totals = Totals {
            count: s.sealed.count + count,
            bytes: s.sealed.bytes + bytes,
            next_seq: s.next_seq,
            dropped: s.sealed.dropped,
        };
        match s.apply(batch, totals) {
            Ok(()) => {
                if s.handed.is_some_and(|handed| handed >= first) {
                    let pending = open.iter().map(|(seq, _)| *seq).collect();
                    s.partial.insert(
                        first,
                        Partial {
                            count,
                            bytes,
                            pending,
                        },
                    );
                }
                if let Some((reason, _)) = s.failing.take() {
                    log::info!(target: "outbox", "appending works again (after: {reason})");
                }
            }
            Err(e) => {
                s.sealed.dropped += count;
                s.drops_unwritten = true;
                if s.failing.is_none() {
                    log::error!(target: "outbox", "cannot append to {}: {e}; readings are dropped and counted until it works again", self.path.display());
                    s.failing = Some((e.to_string(), Instant::now()));
                }
            }
        }
    }

    /// Closes the failed store and opens it again.
    fn reopen(&self, s: &mut State) {
        // sled's file lock must be released before the path is opened again.
        drop(s.store.take());
        match open_store(&self.path) {
            Ok((store, sealed)) => {
                s.store = Some(store);
                s.partial.clear();
                s.sealed = Totals {
                    dropped: sealed.dropped.max(s.sealed.dropped),
                    ..sealed
                };
                log::info!(target: "outbox", "reopened {} ({} messages held)", self.path.display(), sealed.count);
            }
            Err(e) => log::debug!(target: "outbox", "{e}"),
        }
    }

    /// Drops the oldest records while the outbox is over `max_bytes`: whole
    /// sealed segments first, then the oldest unsealed records.
    fn enforce_bound(&self, s: &mut State) {
        let mut dropped = 0;
        while s.sealed.bytes + s.open_bytes > self.max_bytes {
            if s.sealed.count > 0 {
                match drop_oldest_segment(s) {
                    Some(n) => dropped += n,
                    None => break,
                }
            } else if let Some((_, json)) = s.open.pop_front() {
                s.open_bytes -= frame_len(&json);
                s.sealed.dropped += 1;
                s.drops_unwritten = true;
                dropped += 1;
            } else {
                break;
            }
        }
        if dropped == 0 {
            return;
        }
        s.drop_log.since_last += dropped;
        if s.drop_log
            .last
            .is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY)
        {
            let oldest = oldest(s).map(|r| r.taken_ms);
            log::warn!(
                target: "outbox",
                "outbox full ({} bytes): dropped the {} oldest messages; {} dropped in all; oldest kept taken at {}",
                self.max_bytes,
                s.drop_log.since_last,
                s.sealed.dropped,
                oldest.map_or("-".to_string(), format_ms)
            );
            s.drop_log.since_last = 0;
            s.drop_log.last = Some(Instant::now());
        }
    }

    /// Records with sequence numbers above `after` (all if `None`), oldest
    /// first, at most `limit`, leaving out those already acknowledged.
    /// Undecodable entries are skipped and logged.
    pub fn after(&self, after: Option<u64>, limit: usize) -> Vec<(u64, Record)> {
        let start = after.map_or(0, |seq| seq + 1);
        let mut raw: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut s = self.lock();
        let State {
            store,
            partial,
            open,
            handed,
            ..
        } = &mut *s;
        if let Some(store) = store {
            // The segment holding `start` begins at or before it.
            let from = match store
                .tree
                .range(segment_key(0)..=segment_key(start))
                .next_back()
            {
                Some(Ok((key, _))) => be(&key[1..]),
                _ => start,
            };
            for entry in store.tree.range(segment_key(from)..=segment_key(u64::MAX)) {
                let Ok((key, value)) = entry else { break };
                let frames = frames(&value);
                let segment = partial.entry(be(&key[1..])).or_insert_with(|| Partial {
                    count: frames.len() as u64,
                    bytes: value.len() as u64,
                    pending: frames.iter().map(|(seq, _)| *seq).collect(),
                });
                raw.extend(
                    frames
                        .into_iter()
                        .filter(|(seq, _)| *seq >= start && segment.pending.contains(seq))
                        .map(|(seq, json)| (seq, json.to_vec())),
                );
                if raw.len() >= limit {
                    break;
                }
            }
        }
        raw.extend(
            open.iter()
                .filter(|(seq, _)| *seq >= start)
                .take(limit.saturating_sub(raw.len()))
                .cloned(),
        );
        raw.truncate(limit);
        if let Some((last, _)) = raw.last() {
            *handed = Some(handed.map_or(*last, |h| h.max(*last)));
        }
        drop(s);
        raw.into_iter()
            .filter_map(|(seq, json)| match serde_json::from_slice(&json) {
                Ok(record) => Some((seq, record)),
                Err(e) => {
                    log::error!(target: "outbox", "skipping unreadable record {seq}: {e}");
                    let _ = self.remove(&[seq]);
                    None
                }
            })
            .collect()
    }

    /// Removes acknowledged records; a sealed segment goes when all its
    /// records have been acknowledged.
    pub fn remove(&self, seqs: &[u64]) -> Result<(), OutboxError> {
        let mut s = self.lock();
        for &seq in seqs {
            if let Ok(i) = s.open.binary_search_by_key(&seq, |(q, _)| *q) {
                if let Some((_, json)) = s.open.remove(i) {
                    s.open_bytes -= frame_len(&json);
                }
                continue;
            }
            let Some((&first, segment)) = s.partial.range_mut(..=seq).next_back() else {
                continue;
            };
            if !segment.pending.remove(&seq) || !segment.pending.is_empty() {
                continue;
            }
            let (count, bytes) = (segment.count, segment.bytes);
            s.partial.remove(&first);
            let mut batch = sled::Batch::default();
            batch.remove(&segment_key(first));
            let totals = Totals {
                count: s.sealed.count.saturating_sub(count),
                bytes: s.sealed.bytes.saturating_sub(bytes),
                ..s.sealed
            };
            s.apply(batch, totals)
                .map_err(|source| OutboxError::Storage {
                    path: self.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Resolves when a record is appended (or one was appended since the
    /// last wait).
    pub async fn appended(&self) {
        self.appended.notified().await;
    }

    pub fn stats(&self) -> Stats {
        let s = self.lock();
        let acked: u64 = s
            .partial
            .values()
            .map(|p| p.count - p.pending.len() as u64)
            .sum();
        Stats {
            messages: (s.sealed.count + s.open.len() as u64).saturating_sub(acked),
            bytes: s.sealed.bytes + s.open_bytes,
            max_bytes: self.max_bytes,
            oldest_ms: oldest(&s).map(|r| r.taken_ms),
            dropped: s.sealed.dropped,
            at_ms: now_ms(),
        }
    }

    /// Seals the open segment and flushes sled.
    async fn seal_and_flush(&self) -> Result<(), OutboxError> {
        let db = {
            let mut s = self.lock();
            self.seal(&mut s);
            s.store.as_ref().map(|store| store.db.clone())
        };
        if let Some(db) = db {
            db.flush_async()
                .await
                .map_err(|source| OutboxError::Storage {
                    path: self.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Seals and flushes every [`FLUSH_EVERY`] and keeps the status file
    /// fresh, until the process ends.
    pub async fn maintain(&self) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        let mut written: Option<(Stats, Instant)> = None;
        loop {
            tick.tick().await;
            if let Err(e) = self.seal_and_flush().await {
                log::debug!(target: "outbox", "{e}");
            }
            let stats = self.stats();
            let due = match &written {
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
                self.write_stats(&stats);
                written = Some((stats, Instant::now()));
            }
        }
    }

    /// Seals, writes partly acknowledged segments back without their
    /// acknowledged records (so a restart does not resend them), flushes to
    /// disk and writes the status file. Called at shutdown.
    pub fn flush(&self) -> Result<(), OutboxError> {
        let storage = |source| OutboxError::Storage {
            path: self.path.clone(),
            source,
        };
        let db = {
            let mut s = self.lock();
            self.seal(&mut s);
            trim_partials(&mut s).map_err(storage)?;
            s.store.as_ref().map(|store| store.db.clone())
        };
        if let Some(db) = db {
            db.flush().map_err(storage)?;
        }
        self.write_status();
        Ok(())
    }

    /// Writes the figures `fieldgate buffer` shows while the daemon holds
    /// the store's lock.
    pub fn write_status(&self) {
        self.write_stats(&self.stats());
    }

    fn write_stats(&self, stats: &Stats) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        let tmp = dir.join(format!("{STATUS_FILE}.tmp"));
        let json = serde_json::to_vec(stats).unwrap_or_default();
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(STATUS_FILE));
        }
    }
}

/// Removes the oldest sealed segment; returns how many records it held that
/// were not yet acknowledged (now counted as dropped).
fn drop_oldest_segment(s: &mut State) -> Option<u64> {
    let (key, value) = s.store.as_ref()?.tree.range(segment_range()).next()?.ok()?;
    let first = be(&key[1..]);
    let count = frames(&value).len() as u64;
    let unacked = s
        .partial
        .remove(&first)
        .map_or(count, |p| p.pending.len() as u64);
    let mut batch = sled::Batch::default();
    batch.remove(&key);
    let totals = Totals {
        count: s.sealed.count.saturating_sub(count),
        bytes: s.sealed.bytes.saturating_sub(value.len() as u64),
        dropped: s.sealed.dropped + unacked,
        ..s.sealed
    };
    s.apply(batch, totals).ok()?;
    Some(unacked)
}

/// Rewrites partly acknowledged segments with only their pending records.
fn trim_partials(s: &mut State) -> sled::Result<()> {
    let firsts: Vec<u64> = s
        .partial
        .iter()
        .filter(|(_, p)| (p.pending.len() as u64) < p.count)
        .map(|(first, _)| *first)
        .collect();
    for first in firsts {
        let Some(store) = &s.store else { break };
        let Some(value) = store.tree.get(segment_key(first))? else {
            continue;
        };
        let mut kept = Vec::new();
        let mut count = 0;
        for (seq, json) in frames(&value) {
            if s.is_pending(first, seq) {
                push_frame(&mut kept, seq, json);
                count += 1;
            }
        }
        let mut batch = sled::Batch::default();
        batch.insert(&segment_key(first), kept.as_slice());
        let old = value.len() as u64;
        let old_count = s.partial.get(&first).map_or(0, |p| p.count);
        let totals = Totals {
            count: s.sealed.count.saturating_sub(old_count) + count,
            bytes: s.sealed.bytes.saturating_sub(old) + kept.len() as u64,
            ..s.sealed
        };
        s.apply(batch, totals)?;
        if let Some(p) = s.partial.get_mut(&first) {
            p.count = count;
            p.bytes = kept.len() as u64;
        }
    }
    Ok(())
}

/// The oldest record not yet acknowledged.
fn oldest(s: &State) -> Option<Record> {
    let sealed = s.store.as_ref().and_then(|store| {
        store.tree.range(segment_range()).find_map(|entry| {
            let (key, value) = entry.ok()?;
            let first = be(&key[1..]);
            frames(&value)
                .into_iter()
                .find(|(seq, _)| s.is_pending(first, *seq))
                .and_then(|(_, json)| serde_json::from_slice(json).ok())
        })
    });
    sealed.or_else(|| {
        let (_, json) = s.open.front()?;
        serde_json::from_slice(json).ok()
    })
}

/// The status file a running daemon keeps under `data_dir`.
pub fn read_status(data_dir: &Path) -> Option<Stats> {
    let text = std::fs::read(data_dir.join(STATUS_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Opens the sled store at `path` and reads its totals.
fn open_store(path: &Path) -> Result<(Store, Totals), OutboxError> {
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
        // Flushed by `Outbox::maintain` right after each seal.
        .flush_every_ms(None)
        .open()
        .map_err(open_error)?;
    let tree = db.open_tree(TREE).map_err(open_error)?;
    let totals = match tree.get(TOTALS_KEY).map_err(open_error)? {
        Some(bytes) => Totals::decode(&bytes)
            .ok_or_else(|| open_error(sled::Error::Corruption { at: None, bt: () }))?,
        None => Totals::default(),
    };
    Ok((Store { db, tree }, totals))
}

/// A big-endian unsigned number of up to 8 bytes.
fn be(bytes: &[u8]) -> u64 {
    let mut be = [0u8; 8];
    let n = bytes.len().min(8);
    be[8 - n..].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(be)
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
        let size = frame_len(&serde_json::to_vec(&record(10, None)).unwrap());
        let outbox = Outbox::open(dir.path(), size * 10).unwrap();
        for i in 10..35 {
            outbox.push(&record(i, None));
        }
        let stats = outbox.stats();
        assert_eq!((stats.messages, stats.dropped), (10, 15));
        assert!(stats.bytes <= size * 10);
        assert_eq!(stats.oldest_ms, Some(1_700_000_000_025));
        outbox.flush().unwrap();
        drop(outbox);
        assert_eq!(
            Outbox::open(dir.path(), size * 10).unwrap().stats().dropped,
            15
        );
    }

    #[test]
    fn segments_are_deleted_once_acknowledged_and_trimmed_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let n = 2000; // several segments of SEGMENT_BYTES
        {
            let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
            for i in 0..n {
                outbox.push(&record(i, None));
            }
            let read: Vec<u64> = outbox
                .after(None, 5000)
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            assert_eq!(read, (0..n).collect::<Vec<_>>());
            // Acknowledge out of order within a window, leaving 1500.. held.
            let mut acked: Vec<u64> = (0..1500).collect();
            acked.swap(3, 20);
            outbox.remove(&acked).unwrap();
            assert_eq!(outbox.stats().messages, 500);
            assert_eq!(outbox.stats().oldest_ms, Some(1_700_000_001_500));
            let again: Vec<u64> = outbox.after(None, 10).into_iter().map(|(s, _)| s).collect();
            assert_eq!(
                again,
                (1500..1510).collect::<Vec<_>>(),
                "acknowledged records are not resent"
            );
            outbox.flush().unwrap();
        }
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        let stats = outbox.stats();
        assert_eq!(
            stats.messages, 500,
            "the partly acknowledged segment was trimmed"
        );
        let held: Vec<u64> = outbox
            .after(None, 5000)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(held, (1500..n).collect::<Vec<_>>());
        let bytes: u64 = (1500..n)
            .map(|i| frame_len(&serde_json::to_vec(&record(i, None)).unwrap()))
            .sum();
        assert_eq!(stats.bytes, bytes);
        outbox.remove(&held).unwrap();
        outbox.flush().unwrap();
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 1 << 30).unwrap();
        assert_eq!((outbox.stats().messages, outbox.stats().bytes), (0, 0));
        outbox.push(&record(9, None));
        assert_eq!(outbox.after(None, 10)[0].0, n, "sequence numbers continue");
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

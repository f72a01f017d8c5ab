//! The durable store behind the outbox: uplink records in sled under
//! `gateway.data_dir`, removed only when the broker has acknowledged them.
//! Bounded by `buffer.max_bytes`: past it the oldest records are dropped,
//! counted and logged. A reading that is not stored (a full disk, a flush
//! that failed) is counted as dropped too.
//!
//! Layout, tuned for an SD card and little RAM: records are grouped into
//! segments, one sled value per segment, keyed by its first sequence number.
//! New records wait in memory; every [`FLUSH_EVERY`] those appended before
//! the previous tick are sealed (in segments of at most [`SEGMENT_BYTES`],
//! one insert each) and flushed at once. A record the broker acknowledges
//! within 0.5–1 s of its append is therefore never written, and a power cut
//! loses at most the last second. The totals (records, bytes, next sequence number, drops)
//! are written in the same atomic batch as every segment change, so opening a
//! store never walks it. A segment is deleted when all its records are
//! acknowledged; after a crash a partly acknowledged segment is sent again
//! whole (at least once).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::record::{format_ms, now_ms, Record};

/// How often the open segment is sealed and sled flushed: a crash or power
/// cut loses at most the records appended in this window.
pub const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Sealed records are stored in segments of at most this size, which
/// bounds how much one drop of the oldest segment removes.
pub(crate) const SEGMENT_BYTES: u64 = 64 * 1024;
/// Records waiting in memory are sealed early past this.
const OPEN_MAX_BYTES: u64 = 16 * SEGMENT_BYTES;
/// Page cache for sled; the outbox is written and read sequentially.
const CACHE_BYTES: u64 = 2 * 1024 * 1024;
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
    #[error("cannot start the outbox thread: {0}")]
    Thread(String),
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

/// A flush to run on another thread: a handle to the database and the
/// segments it makes durable.
pub struct Flush {
    pub db: sled::Db,
    segments: Vec<(u64, u64)>,
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
struct Sled {
    db: sled::Db,
    tree: sled::Tree,
}

struct State {
    /// `None` while a failed store is being reopened.
    sled: Option<Sled>,
    /// What sled holds, except drops not yet written with the next batch.
    sealed: Totals,
    /// `sealed.dropped` has grown since the totals were last written.
    drops_unwritten: bool,
    /// Records not sealed yet, oldest first.
    open: VecDeque<(u64, Vec<u8>)>,
    /// The first record appended since the last timed seal: younger ones
    /// wait for the next, so that a record the broker acknowledges within
    /// a window or two never reaches the disk.
    young_from: u64,
    open_bytes: u64,
    next_seq: u64,
    /// The highest sequence number handed to the publisher.
    handed: Option<u64>,
    /// Sealed segments the publisher has read, by first sequence number.
    partial: BTreeMap<u64, Partial>,
    /// Segments sealed since the last successful flush, by first sequence
    /// number, with their record count: applied in sled's memory, not yet
    /// known to be on disk.
    unflushed: Vec<(u64, u64)>,
    /// Segments whose flush failed: whether they reached the disk is only
    /// known once the store has been reopened.
    suspect: Vec<(u64, u64)>,
    /// While storing fails (disk full …): why, and when the store was last
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
        let sled = self
            .sled
            .as_ref()
            .ok_or_else(|| sled::Error::ReportableBug("the store is closed".into()))?;
        batch.insert(TOTALS_KEY, totals.encode());
        sled.tree.apply_batch(batch)?;
        self.sealed = totals;
        self.drops_unwritten = false;
        Ok(())
    }

    /// Counts `n` records as dropped; written with the next batch.
    fn count_dropped(&mut self, n: u64) {
        if n > 0 {
            self.sealed.dropped += n;
            self.drops_unwritten = true;
        }
    }
}

/// The durable store. One task owns it (see [`super`]); every method is
/// synchronous and may touch the disk.
pub struct Store {
    path: PathBuf,
    max_bytes: u64,
    s: State,
}

impl Store {
    /// Opens (or creates) the outbox under `data_dir`. A store that cannot
    /// be opened is an error naming the path; it is never wiped.
    pub fn open(data_dir: &Path, max_bytes: u64) -> Result<Self, OutboxError> {
        let path = data_dir.join("outbox");
        let (sled, sealed) = open_sled(&path)?;
        Ok(Self {
            path,
            max_bytes,
            s: State {
                sled: Some(sled),
                sealed,
                drops_unwritten: false,
                open: VecDeque::new(),
                young_from: sealed.next_seq,
                open_bytes: 0,
                next_seq: sealed.next_seq,
                handed: None,
                partial: BTreeMap::new(),
                unflushed: Vec::new(),
                suspect: Vec::new(),
                failing: None,
                drop_log: DropLog {
                    since_last: 0,
                    last: None,
                },
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record to the open segment.
    pub fn push(&mut self, record: &Record) {
        let json = match serde_json::to_vec(record) {
            Ok(v) => v,
            Err(e) => {
                log::error!(target: "outbox", "cannot encode a record: {e}");
                self.s.count_dropped(1);
                return;
            }
        };
        let seq = self.s.next_seq;
        self.s.next_seq += 1;
        self.s.open_bytes += frame_len(&json);
        self.s.open.push_back((seq, json));
        // Sealed early only past a memory bound: a burst (a round of polls
        // of many devices at once) must not push records to disk that the
        // broker acknowledges a moment later.
        if self.s.open_bytes >= OPEN_MAX_BYTES {
            self.seal(u64::MAX);
        }
        self.enforce_bound();
    }

    /// Counts records lost before they reached the store (a full queue).
    pub fn count_lost(&mut self, n: u64) {
        self.s.count_dropped(n);
    }

    /// Writes the open segment to sled with one batch. A failing disk does
    /// not stop the daemon: its records are counted as dropped and the
    /// failure logged once until storing works again.
    fn seal(&mut self, before: u64) {
        let s = &mut self.s;
        let keep = s.open.partition_point(|(seq, _)| *seq < before);
        if keep == 0 {
            if s.drops_unwritten && s.failing.is_none() {
                let _ = s.apply(sled::Batch::default(), s.sealed);
            }
            return;
        }
        let young = s.open.split_off(keep);
        let mut old = std::mem::replace(&mut s.open, young);
        s.open_bytes = s.open.iter().map(|(_, json)| frame_len(json)).sum();
        // One segment per SEGMENT_BYTES, so that dropping the oldest
        // segment at the bound removes no more than that.
        while !old.is_empty() {
            let mut bytes = 0;
            let n = old
                .iter()
                .take_while(|(_, json)| {
                    bytes += frame_len(json);
                    bytes <= SEGMENT_BYTES
                })
                .count()
                .max(1);
            let rest = old.split_off(n);
            self.seal_segment(std::mem::replace(&mut old, rest));
        }
    }

    /// Writes `records` to sled as one segment with one batch.
    fn seal_segment(&mut self, records: VecDeque<(u64, Vec<u8>)>) {
        let s = &mut self.s;
        let bytes: u64 = records.iter().map(|(_, json)| frame_len(json)).sum();
        let mut value = Vec::with_capacity(usize::try_from(bytes).unwrap_or(0));
        for (seq, json) in &records {
            push_frame(&mut value, *seq, json);
        }
        let first = records.front().map_or(0, |(seq, _)| *seq);
        let count = records.len() as u64;
        if s.failing.is_some() {
            // Until a reopen shows the disk works, nothing is written.
            s.count_dropped(count);
            return;
        }
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
                s.unflushed.push((first, count));
                if s.handed.is_some_and(|handed| handed >= first) {
                    let pending = records.iter().map(|(seq, _)| *seq).collect();
                    s.partial.insert(
                        first,
                        Partial {
                            count,
                            bytes,
                            pending,
                        },
                    );
                }
            }
            Err(e) => {
                s.count_dropped(count);
                self.failed(&e);
            }
        }
    }

    /// Storing failed: logged once per episode; from now on the store is
    /// reopened every [`REOPEN_EVERY`] until it works again.
    fn failed(&mut self, e: &sled::Error) {
        if self.s.failing.is_none() {
            log::error!(target: "outbox", "cannot append to {}: {e}; readings are dropped and counted until it works again", self.path.display());
            self.s.failing = Some((e.to_string(), Instant::now()));
        }
    }

    /// Seals the open segment and flushes sled to disk. A failed flush
    /// leaves the segments sealed since the last good one in doubt: they are
    /// counted as dropped unless the reopened store shows them.
    pub fn seal_and_flush(&mut self) {
        self.seal(u64::MAX);
        if let Some(flush) = self.seal_for_flush() {
            let result = flush.db.flush().map(drop);
            self.flushed(flush, result);
        }
    }

    /// Seals the open segment and hands out what a flush needs, so the
    /// owner can have the disk synced on another thread while it goes on
    /// serving reads and appends. `None` while storing fails (nothing to
    /// flush; the store is reopened every [`REOPEN_EVERY`] instead).
    pub fn seal_for_flush(&mut self) -> Option<Flush> {
        self.retry_if_failing();
        // Records appended in this window wait for the next seal: a record
        // is on disk at most two windows (1 s) after it was appended.
        let young_from = std::mem::replace(&mut self.s.young_from, self.s.next_seq);
        self.seal(young_from);
        let sled = self.s.sled.as_ref()?;
        if self.s.failing.is_some() {
            return None;
        }
        Some(Flush {
            db: sled.db.clone(),
            segments: std::mem::take(&mut self.s.unflushed),
        })
    }

    /// The outcome of a [`Flush`]: on failure its segments are in doubt
    /// until a reopen shows which reached the disk.
    pub fn flushed(&mut self, flush: Flush, result: sled::Result<()>) {
        drop(flush.db);
        if let Err(e) = result {
            self.s.suspect.extend(flush.segments);
            self.failed(&e);
        }
    }

    /// Records held and their bytes, without reading the store (cheap).
    pub fn counts(&self) -> (u64, u64) {
        let s = &self.s;
        let acked: u64 = s
            .partial
            .values()
            .map(|p| p.count - p.pending.len() as u64)
            .sum();
        (
            (s.sealed.count + s.open.len() as u64).saturating_sub(acked),
            s.sealed.bytes + s.open_bytes,
        )
    }

    /// While failing: reopens the store every [`REOPEN_EVERY`].
    fn retry_if_failing(&mut self) {
        let due = match &mut self.s.failing {
            Some((_, at)) if at.elapsed() >= REOPEN_EVERY => {
                *at = Instant::now();
                true
            }
            _ => false,
        };
        if due {
            self.reopen();
        }
    }

    /// Closes the failed store and opens it again. Segments in doubt that
    /// the disk does not have are counted as dropped now.
    fn reopen(&mut self) {
        // sled's file lock must be released before the path is opened
        // again; its I/O threads may hold it for a moment after the handle
        // is dropped.
        drop(self.s.sled.take());
        let mut opened = open_sled(&self.path);
        for _ in 0..10 {
            if opened.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            opened = open_sled(&self.path);
        }
        let (sled, on_disk) = match opened {
            Ok(opened) => opened,
            Err(e) => {
                log::debug!(target: "outbox", "{e}");
                return;
            }
        };
        let s = &mut self.s;
        let mut lost = 0;
        for (first, count) in std::mem::take(&mut s.suspect) {
            if !sled.tree.contains_key(segment_key(first)).unwrap_or(false) {
                lost += s
                    .partial
                    .remove(&first)
                    .map_or(count, |p| p.pending.len() as u64);
            }
        }
        s.partial
            .retain(|first, _| sled.tree.contains_key(segment_key(*first)).unwrap_or(false));
        let dropped = s.sealed.dropped.max(on_disk.dropped) + lost;
        s.sealed = Totals {
            dropped,
            next_seq: on_disk.next_seq.max(s.next_seq),
            ..on_disk
        };
        s.drops_unwritten = true;
        s.sled = Some(sled);
        // Writing the totals proves the disk takes writes again.
        let result = s
            .apply(sled::Batch::default(), s.sealed)
            .and_then(|()| s.sled.as_ref().map_or(Ok(0), |sled| sled.db.flush()));
        match result {
            Ok(_) => {
                if let Some((reason, _)) = s.failing.take() {
                    log::info!(target: "outbox", "appending works again (after: {reason}); {} messages held", s.sealed.count);
                }
            }
            Err(e) => log::debug!(target: "outbox", "still failing: {e}"),
        }
    }

    /// Drops the oldest records while the outbox is over `max_bytes`: whole
    /// sealed segments first, then the oldest unsealed records.
    fn enforce_bound(&mut self) {
        let s = &mut self.s;
        let mut dropped = 0;
        while s.sealed.bytes + s.open_bytes > self.max_bytes {
            if s.sealed.count > 0 {
                match drop_oldest_segment(s) {
                    Some(n) => dropped += n,
                    None => break,
                }
            } else if let Some((_, json)) = s.open.pop_front() {
                s.open_bytes -= frame_len(&json);
                s.count_dropped(1);
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
    pub fn after(&mut self, after: Option<u64>, limit: usize) -> Vec<(u64, Record)> {
        let start = after.map_or(0, |seq| seq + 1);
        let mut raw: Vec<(u64, Vec<u8>)> = Vec::new();
        let State {
            sled,
            partial,
            open,
            handed,
            ..
        } = &mut self.s;
        if let Some(sled) = sled {
            // The segment holding `start` begins at or before it.
            let from = match sled
                .tree
                .range(segment_key(0)..=segment_key(start))
                .next_back()
            {
                Some(Ok((key, _))) => be(&key[1..]),
                _ => start,
            };
            for entry in sled.tree.range(segment_key(from)..=segment_key(u64::MAX)) {
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
        let mut out = Vec::with_capacity(raw.len());
        for (seq, json) in raw {
            match serde_json::from_slice(&json) {
                Ok(record) => out.push((seq, record)),
                Err(e) => {
                    log::error!(target: "outbox", "skipping unreadable record {seq}: {e}");
                    self.discard(&[seq]);
                }
            }
        }
        out
    }

    /// Removes acknowledged records; a sealed segment goes when all its
    /// records have been acknowledged.
    pub fn remove(&mut self, seqs: &[u64]) -> Result<(), OutboxError> {
        let s = &mut self.s;
        if s.sled.is_none() {
            // Being reopened: these are sent again afterwards (at least once).
            return Ok(());
        }
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

    /// Removes records that can never be published, counting them as
    /// dropped.
    pub fn discard(&mut self, seqs: &[u64]) {
        self.s.count_dropped(seqs.len() as u64);
        if let Err(e) = self.remove(seqs) {
            log::warn!(target: "outbox", "{e}");
        }
    }

    /// The figures `fieldgate buffer`, the status line and the API show.
    /// `oldest_ms` reads the store: call it on a timer, not per message.
    pub fn stats(&self) -> Stats {
        let s = &self.s;
        let (messages, bytes) = self.counts();
        Stats {
            messages,
            bytes,
            max_bytes: self.max_bytes,
            oldest_ms: oldest(s).map(|r| r.taken_ms),
            dropped: s.sealed.dropped + s.suspect.iter().map(|(_, n)| n).sum::<u64>(),
            at_ms: now_ms(),
        }
    }

    /// Seals, writes partly acknowledged segments back without their
    /// acknowledged records (so a restart does not resend them), flushes to
    /// disk and writes the status file. Called at shutdown.
    pub fn close(&mut self) -> Result<(), OutboxError> {
        self.seal_and_flush();
        let storage = |source| OutboxError::Storage {
            path: self.path.clone(),
            source,
        };
        if self.s.failing.is_none() {
            trim_partials(&mut self.s).map_err(storage)?;
            if let Some(sled) = &self.s.sled {
                sled.db.flush().map_err(storage)?;
            }
        }
        self.write_status(&self.stats());
        Ok(())
    }

    /// Writes the figures `fieldgate buffer` shows while the daemon holds
    /// the store's lock.
    pub fn write_status(&self, stats: &Stats) {
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
    let (key, value) = s.sled.as_ref()?.tree.range(segment_range()).next()?.ok()?;
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
        let Some(sled) = &s.sled else { break };
        let Some(value) = sled.tree.get(segment_key(first))? else {
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
    let sealed = s.sled.as_ref().and_then(|sled| {
        sled.tree.range(segment_range()).find_map(|entry| {
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
fn open_sled(path: &Path) -> Result<(Sled, Totals), OutboxError> {
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
        // Flushed by the owner right after each seal.
        .flush_every_ms(None)
        .open()
        .map_err(open_error)?;
    let tree = db.open_tree(TREE).map_err(open_error)?;
    let totals = match tree.get(TOTALS_KEY).map_err(open_error)? {
        Some(bytes) => Totals::decode(&bytes)
            .ok_or_else(|| open_error(sled::Error::Corruption { at: None, bt: () }))?,
        None => Totals::default(),
    };
    Ok((Sled { db, tree }, totals))
}

/// A big-endian unsigned number of up to 8 bytes.
fn be(bytes: &[u8]) -> u64 {
    let mut be = [0u8; 8];
    let n = bytes.len().min(8);
    be[8 - n..].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(be)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Body;

    /// Opens the store again once the last one is dropped: sled's I/O
    /// threads may hold it for a moment after the handle is gone.
    fn reopen(dir: &Path, max_bytes: u64) -> Store {
        for _ in 0..100 {
            if let Ok(store) = Store::open(dir, max_bytes) {
                return store;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Store::open(dir, max_bytes).unwrap()
    }

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
            let mut outbox = Store::open(dir.path(), 1 << 20).unwrap();
            for i in 0..5 {
                outbox.push(&record(i, None));
            }
            outbox.remove(&[0, 1]).unwrap();
            outbox.close().unwrap();
        }
        let mut outbox = reopen(dir.path(), 1 << 20);
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

    /// A record appended just before a seal and acknowledged just after
    /// it (the broker's PUBACK takes milliseconds) never reaches sled; one
    /// that waits two windows does.
    #[test]
    fn a_record_acknowledged_within_two_windows_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Store::open(dir.path(), 1 << 20).unwrap();
        let segments = |o: &Store| o.s.sled.as_ref().map_or(0, |s| s.tree.len());
        outbox.push(&record(0, None));
        let _ = outbox.seal_for_flush();
        outbox.remove(&[0]).unwrap();
        let _ = outbox.seal_for_flush();
        assert_eq!(segments(&outbox), 0, "acknowledged in time: not written");
        outbox.push(&record(1, None));
        let _ = outbox.seal_for_flush();
        assert_eq!(segments(&outbox), 0, "still within its grace");
        let _ = outbox.seal_for_flush();
        assert_eq!(
            segments(&outbox),
            2,
            "sealed at the second window (segment and totals)"
        );
        assert_eq!(outbox.stats().messages, 1);
        // A burst over a segment's size (a round of polls of many devices at
        // once), acknowledged a moment later, is not written either.
        let big = |i: u64| {
            let mut r = record(i, None);
            if let Body::Attributes { values, .. } = &mut r.body {
                values.insert("pad".into(), "x".repeat(1000).into());
            }
            r
        };
        for i in 2..202 {
            outbox.push(&big(i));
        }
        let burst: Vec<u64> = (2..202).collect();
        outbox.remove(&burst).unwrap();
        let _ = outbox.seal_for_flush();
        let _ = outbox.seal_for_flush();
        assert_eq!(
            segments(&outbox),
            2,
            "only record 1's segment and the totals"
        );
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        // Records 10..35 all encode to the same size.
        let size = frame_len(&serde_json::to_vec(&record(10, None)).unwrap());
        let mut outbox = Store::open(dir.path(), size * 10).unwrap();
        for i in 10..35 {
            outbox.push(&record(i, None));
        }
        let stats = outbox.stats();
        assert_eq!((stats.messages, stats.dropped), (10, 15));
        assert!(stats.bytes <= size * 10);
        assert_eq!(stats.oldest_ms, Some(1_700_000_000_025));
        outbox.close().unwrap();
        drop(outbox);
        assert_eq!(reopen(dir.path(), size * 10).stats().dropped, 15);
    }

    #[test]
    fn segments_are_deleted_once_acknowledged_and_trimmed_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let n = 2000; // several segments of SEGMENT_BYTES
        {
            let mut outbox = Store::open(dir.path(), 1 << 30).unwrap();
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
            outbox.close().unwrap();
        }
        let mut outbox = reopen(dir.path(), 1 << 30);
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
        outbox.close().unwrap();
        drop(outbox);
        let mut outbox = reopen(dir.path(), 1 << 30);
        assert_eq!((outbox.stats().messages, outbox.stats().bytes), (0, 0));
        outbox.push(&record(9, None));
        assert_eq!(outbox.after(None, 10)[0].0, n, "sequence numbers continue");
    }

    #[test]
    fn a_locked_store_is_a_clear_error_not_a_wipe() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = Store::open(dir.path(), 1 << 20).unwrap();
        first.push(&record(1, None));
        let err = Store::open(dir.path(), 1 << 20).err().expect("locked");
        let text = err.to_string();
        assert!(
            text.contains(&dir.path().join("outbox").display().to_string()),
            "{text}"
        );
        assert_eq!(first.stats().messages, 1);
    }
}

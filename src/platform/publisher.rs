//! The publisher: how the outbox meets a connection that comes and goes,
//! as one state machine with no I/O of its own, so it is tested without a
//! broker. The MQTT task ([`super::run`]) feeds it events and does what it
//! says.
//!
//! - **Backing off**: no connection; the next attempt waits a capped,
//!   doubling delay.
//! - **Catching up**: connected, with a backlog older than the connection:
//!   sent oldest first at up to `max_publish_rate`.
//! - **Live**: connected and caught up; what arrives goes out at once
//!   (within the rate).
//!
//! At most [`WINDOW`] publications wait for PUBACK; a record leaves the
//! outbox only when its PUBACK comes. A message that can never be published
//! is discarded and counted instead of retried: one over our own packet
//! limit at once, and one the broker evidently refuses (MQTT 3.1.1 has no
//! way to learn its limit) once it has closed the connection right after
//! receiving it [`POISON_AFTER`] times in a row, while it was larger than
//! anything the broker ever acknowledged. Its size then becomes the limit.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::profile::{self, Message};
use crate::config::Profile;
use crate::record::{Body, Record};

/// At most this many publications wait for PUBACK at once.
pub const WINDOW: usize = 32;
/// Records read from the outbox at a time.
pub const READ_AHEAD: usize = 512;
pub const RECONNECT_MIN: Duration = Duration::from_secs(1);
pub const RECONNECT_MAX: Duration = Duration::from_secs(60);
/// Connections the broker must close right after one message before it is
/// taken for one the broker refuses.
pub const POISON_AFTER: u32 = 5;
/// "Right after": the connection ended this soon after the message went out.
const POISON_WITHIN: Duration = Duration::from_secs(2);

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    BackingOff,
    CatchingUp,
    Live,
}

/// What to do with the next message.
#[derive(Debug, PartialEq)]
pub enum Outgoing {
    /// Publish it; these records are acknowledged by its PUBACK.
    Publish(Message, Vec<u64>),
    /// It can never be published: remove these records, counted as dropped.
    Discard(Vec<u64>, String),
    /// The profile has no message for these records: remove them.
    Skip(Vec<u64>),
}

/// A publication in flight.
struct Sent {
    seqs: Vec<u64>,
    size: usize,
    at: Instant,
}

pub struct Publisher {
    profile: Profile,
    phase: Phase,
    /// Largest MQTT packet the broker connection takes.
    max_packet: usize,
    spacing: Option<Duration>,
    next_slot: Instant,
    backoff: Duration,
    /// Published, packet id not yet seen (QoS 1 ids are assigned by the
    /// event loop in the order we publish).
    unassigned: VecDeque<Vec<u64>>,
    /// Sent, waiting for PUBACK: packet id → the publication.
    inflight: HashMap<u16, Sent>,
    /// Sizes of the publications in `unassigned`, in the same order.
    sizes: VecDeque<usize>,
    /// The largest message the broker has acknowledged.
    largest_acked: usize,
    /// A message the broker closed the connection after: its first record,
    /// size and how many times in a row.
    suspect: Option<(u64, usize, u32)>,
    /// Messages this large the broker refuses (learned, see above).
    refused_size: Option<usize>,
    /// Sub-devices whose last presence sent was online, announced again
    /// after every (re)connect ahead of the backlog.
    online: BTreeSet<String>,
    announce: VecDeque<String>,
    /// Read ahead from the outbox, in send order.
    ahead: VecDeque<(u64, Record)>,
    /// The last sequence number read from the outbox.
    read_to: Option<u64>,
    /// The outbox had nothing more at the last read.
    drained: bool,
    pub published: u64,
    pub discarded: u64,
}

impl Publisher {
    pub fn new(profile: Profile, max_publish_rate: Option<f64>, max_packet: usize) -> Self {
        Self {
            profile,
            phase: Phase::BackingOff,
            max_packet,
            spacing: max_publish_rate
                .filter(|r| *r > 0.0)
                .map(|rate| Duration::from_secs_f64((1.0 / rate).min(3600.0))),
            next_slot: Instant::now(),
            backoff: RECONNECT_MIN,
            unassigned: VecDeque::new(),
            inflight: HashMap::new(),
            sizes: VecDeque::new(),
            largest_acked: 0,
            suspect: None,
            refused_size: None,
            online: BTreeSet::new(),
            announce: VecDeque::new(),
            ahead: VecDeque::new(),
            read_to: None,
            drained: false,
            published: 0,
            discarded: 0,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The broker accepted the connection.
    pub fn connected(&mut self) {
        self.backoff = RECONNECT_MIN;
        self.phase = Phase::CatchingUp;
        self.announce = self.online.iter().cloned().collect();
    }

    /// The connection failed; returns how long to wait before the next
    /// attempt. Everything unacknowledged is sent again from the oldest.
    pub fn disconnected(&mut self) -> Duration {
        self.judge_suspect();
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
        self.phase = Phase::BackingOff;
        self.announce.clear();
        self.rewind();
        wait
    }

    /// Was the connection closed right after a message larger than any the
    /// broker took? The suspect is the largest such message sent within
    /// [`POISON_WITHIN`] (in flight, or handed over but not yet given a
    /// packet id): a broker closes on the packet it refuses, whatever
    /// smaller ones are still unacknowledged before it. Counts it; the
    /// [`POISON_AFTER`]th time in a row, its size becomes the limit. A drop
    /// with no such message in flight is a link problem, and ends the row.
    fn judge_suspect(&mut self) {
        let in_flight = self
            .inflight
            .values()
            .filter(|s| s.at.elapsed() < POISON_WITHIN)
            .map(|s| (s.seqs.first().copied(), s.size));
        let handed_over = self
            .unassigned
            .iter()
            .zip(&self.sizes)
            .map(|(seqs, size)| (seqs.first().copied(), *size));
        let suspect = in_flight
            .chain(handed_over)
            .filter_map(|(first, size)| Some((first?, size)))
            .filter(|(_, size)| *size > self.largest_acked)
            .max_by_key(|&(first, size)| (size, std::cmp::Reverse(first)));
        let Some((first, size)) = suspect else {
            self.suspect = None;
            return;
        };
        let count = match self.suspect {
            Some((seq, _, n)) if seq == first => n + 1,
            _ => 1,
        };
        self.suspect = Some((first, size, count));
        if count >= POISON_AFTER {
            log::error!(target: "platform", "the broker closed the connection right after a {size}-byte message {count} times in a row, and never took one that large: taking {size} bytes as its packet limit");
            self.refused_size = Some(size);
            self.suspect = None;
        }
    }

    fn connected_now(&self) -> bool {
        self.phase != Phase::BackingOff
    }

    fn window_open(&self) -> bool {
        self.unassigned.len() + self.inflight.len() < WINDOW
    }

    /// Whether to read more from the outbox before going on: connected,
    /// and the read-ahead is running low.
    pub fn wants_records(&self) -> bool {
        self.connected_now() && self.ahead.len() < READ_AHEAD / 2 && !self.drained
    }

    /// The outbox's answer to a read after [`Publisher::read_position`].
    pub fn refill(&mut self, records: Vec<(u64, Record)>) {
        self.drained = records.len() < READ_AHEAD / 2;
        if let Some((seq, _)) = records.last() {
            self.read_to = Some(*seq);
        }
        self.ahead.extend(records);
        if self.ahead.is_empty() && self.phase == Phase::CatchingUp && self.inflight.is_empty() {
            self.phase = Phase::Live;
        }
    }

    /// Something was appended: the next read may find it.
    pub fn appended(&mut self) {
        self.drained = false;
    }

    pub fn read_position(&self) -> Option<u64> {
        self.read_to
    }

    /// When the next message may go: `None` while disconnected, the window
    /// is full or nothing waits.
    pub fn ready_at(&self) -> Option<Instant> {
        if !(self.connected_now() && self.window_open()) {
            return None;
        }
        if self.presence_next() {
            return Some(Instant::now().min(self.next_slot));
        }
        (!self.ahead.is_empty()).then_some(self.next_slot)
    }

    /// Whether the next message is a sub-device's presence. Presence is not
    /// a report: it goes out at once, outside `max_publish_rate` (one per
    /// sub-device state change, and one per sub-device online after a
    /// reconnect), so hundreds of sub-devices do not hold reports back for
    /// minutes after every reconnect.
    fn presence_next(&self) -> bool {
        !self.announce.is_empty()
            || self
                .ahead
                .front()
                .is_some_and(|(_, r)| matches!(r.body, Body::Presence { .. }))
    }

    /// Takes the next message (the caller waited for [`Publisher::ready_at`]).
    pub fn take(&mut self, now: Instant) -> Option<Outgoing> {
        self.ready_at()?;
        let paced = !self.presence_next();
        let (message, seqs) = match self.announce.pop_front() {
            Some(key) => (profile::presence(&key, true), Vec::new()),
            None => {
                let n = profile::batch_len(&self.profile, self.ahead.iter().map(|(_, r)| r));
                let n = n.clamp(1, self.ahead.len());
                let (seqs, records): (Vec<u64>, Vec<Record>) = self.ahead.drain(..n).unzip();
                let Some(message) = profile::message(&self.profile, &records) else {
                    return Some(Outgoing::Skip(seqs));
                };
                for record in &records {
                    if let Body::Presence { key, online } = &record.body {
                        match online {
                            true => self.online.insert(key.clone()),
                            false => self.online.remove(key),
                        };
                    }
                }
                (message, seqs)
            }
        };
        // Fixed header, topic length, packet id: under 16 bytes.
        let size = message.topic.len() + message.payload.len() + 16;
        let limit = self.refused_size.map_or(self.max_packet, |r| {
            r.saturating_sub(1).min(self.max_packet)
        });
        if size > limit {
            self.discarded += seqs.len() as u64;
            let why = format!(
                "a message of {size} bytes on {} is over the {limit}-byte packet limit",
                message.topic
            );
            return Some(Outgoing::Discard(seqs, why));
        }
        if let (Some(spacing), true) = (self.spacing, paced) {
            self.next_slot = now.max(self.next_slot) + spacing;
        }
        self.unassigned.push_back(seqs.clone());
        self.sizes.push_back(size);
        self.published += 1;
        Some(Outgoing::Publish(message, seqs))
    }

    /// A publication that carries no records (the generic profile's
    /// `status`), so that packet ids stay matched.
    pub fn untracked(&mut self) {
        self.unassigned.push_back(Vec::new());
        self.sizes.push_back(0);
    }

    /// The event loop gave the next publication its packet id.
    pub fn assigned(&mut self, pkid: u16) {
        if let Some(seqs) = self.unassigned.pop_front() {
            let size = self.sizes.pop_front().unwrap_or(0);
            self.inflight.insert(
                pkid,
                Sent {
                    seqs,
                    size,
                    at: Instant::now(),
                },
            );
        }
    }

    /// PUBACK: the records to remove from the outbox.
    pub fn acked(&mut self, pkid: u16) -> Vec<u64> {
        let Some(sent) = self.inflight.remove(&pkid) else {
            return Vec::new();
        };
        self.largest_acked = self.largest_acked.max(sent.size);
        let seqs = sent.seqs;
        if self.phase == Phase::CatchingUp
            && self.drained
            && self.ahead.is_empty()
            && self.inflight.is_empty()
        {
            self.phase = Phase::Live;
        }
        seqs
    }

    /// A publish could not be handed to the event loop: resend from the
    /// oldest unacknowledged.
    pub fn rewind(&mut self) {
        self.unassigned.clear();
        self.sizes.clear();
        self.inflight.clear();
        self.ahead.clear();
        self.read_to = None;
        self.drained = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(i: u64, key: Option<&str>) -> (u64, Record) {
        let values = json!({ "n": i }).as_object().cloned().unwrap_or_default();
        (
            i,
            Record {
                taken_ms: 1_700_000_000_000 + i,
                body: Body::Attributes {
                    device: "d".into(),
                    key: key.map(Into::into),
                    values,
                },
            },
        )
    }

    /// A 5 KB report of the gateway's own device.
    fn big(i: u64) -> (u64, Record) {
        let (seq, mut r) = record(i, None);
        if let Body::Attributes { values, .. } = &mut r.body {
            values.insert("text".into(), json!("x".repeat(5000)));
        }
        (seq, r)
    }

    /// Publishes record 0 and has it acknowledged: the broker takes that size.
    fn acknowledge_a_small_one(p: &mut Publisher) {
        p.connected();
        p.refill(vec![record(0, None)]);
        assert!(matches!(
            p.take(Instant::now()),
            Some(Outgoing::Publish(..))
        ));
        p.assigned(1);
        assert_eq!(p.acked(1), [0]);
    }

    fn tc() -> Profile {
        Profile::ThingsCloud {
            access_token: "t".into(),
            project_key: "k".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn catches_up_at_the_rate_then_goes_live() {
        let mut p = Publisher::new(tc(), Some(2.0), 1 << 18);
        assert_eq!(p.ready_at(), None, "nothing goes out before a connection");
        p.connected();
        assert_eq!(p.phase(), Phase::CatchingUp);
        assert!(p.wants_records());
        p.refill((0..3).map(|i| record(i, None)).collect());
        let start = Instant::now();
        let mut sent = Vec::new();
        while let Some(at) = p.ready_at() {
            tokio::time::sleep_until(at).await;
            let Some(Outgoing::Publish(_, seqs)) = p.take(Instant::now()) else {
                panic!("a publication");
            };
            p.assigned(sent.len() as u16 + 1);
            sent.push((Instant::now().duration_since(start), seqs));
        }
        let gaps: Vec<u128> = sent.iter().map(|(t, _)| t.as_millis()).collect();
        assert_eq!(gaps, [0, 500, 1000], "one message per 500 ms");
        for pkid in 1..=3 {
            assert_eq!(p.acked(pkid), [u64::from(pkid) - 1]);
        }
        assert_eq!(p.phase(), Phase::Live);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnect_resends_from_the_oldest_and_backs_off() {
        let mut p = Publisher::new(tc(), None, 1 << 18);
        p.connected();
        p.refill((0..40).map(|i| record(i, None)).collect());
        let mut n = 0;
        while p.take(Instant::now()).is_some() {
            n += 1;
        }
        assert_eq!(n, WINDOW, "the window bounds what is unacknowledged");
        assert_eq!(p.disconnected(), RECONNECT_MIN);
        assert_eq!(p.disconnected(), RECONNECT_MIN * 2);
        assert_eq!(
            p.read_position(),
            None,
            "reading starts again from the oldest"
        );
        assert_eq!(p.ready_at(), None);
        for _ in 0..10 {
            p.disconnected();
        }
        assert_eq!(p.disconnected(), RECONNECT_MAX);
        p.connected();
        assert!(p.wants_records());
    }

    /// Defect 1: a message over the packet limit is discarded, never
    /// retried, and what follows it goes out.
    #[tokio::test(start_paused = true)]
    async fn an_unpublishable_message_is_discarded_not_retried() {
        let mut p = Publisher::new(tc(), None, 200);
        p.connected();
        let (_, mut big) = record(0, None);
        if let Body::Attributes { values, .. } = &mut big.body {
            values.insert("text".into(), json!("x".repeat(300)));
        }
        p.refill(vec![(0, big), record(1, None)]);
        match p.take(Instant::now()) {
            Some(Outgoing::Discard(seqs, why)) => {
                assert_eq!(seqs, [0]);
                assert!(why.contains("packet limit"), "{why}");
            }
            other => panic!("expected a discard, got {other:?}"),
        }
        assert!(matches!(p.take(Instant::now()), Some(Outgoing::Publish(_, seqs)) if seqs == [1]));
        assert_eq!(p.discarded, 1);
    }

    /// Defect 1, a broker with a smaller limit than ours: a message it
    /// closes the connection after, again and again, is discarded after
    /// [`POISON_AFTER`] times; later ones as large go at once.
    #[tokio::test(start_paused = true)]
    async fn a_message_the_broker_keeps_refusing_is_discarded() {
        let mut p = Publisher::new(tc(), None, 1 << 18);
        acknowledge_a_small_one(&mut p);
        for round in 0..POISON_AFTER {
            p.connected();
            p.refill(vec![big(1), record(2, None)]);
            let Some(Outgoing::Publish(_, seqs)) = p.take(Instant::now()) else {
                panic!("round {round}: the big message is tried");
            };
            assert_eq!(seqs, [1]);
            p.assigned(2);
            tokio::time::advance(Duration::from_millis(100)).await;
            p.disconnected();
        }
        p.connected();
        p.refill(vec![big(1), record(2, None), big(3)]);
        assert!(matches!(p.take(Instant::now()), Some(Outgoing::Discard(seqs, _)) if seqs == [1]));
        assert!(matches!(p.take(Instant::now()), Some(Outgoing::Publish(_, seqs)) if seqs == [2]));
        assert!(matches!(p.take(Instant::now()), Some(Outgoing::Discard(seqs, _)) if seqs == [3]));
    }

    /// The same when the broker closes the connection before the big
    /// message's packet id is even seen, with a smaller, older message still
    /// unacknowledged: the big one is the suspect, not the oldest.
    #[tokio::test(start_paused = true)]
    async fn the_refused_message_is_found_behind_an_unacknowledged_small_one() {
        let mut p = Publisher::new(tc(), None, 1 << 18);
        acknowledge_a_small_one(&mut p);
        for round in 0..POISON_AFTER {
            p.connected();
            // Different devices: sent as two messages, small one first.
            p.refill(vec![record(1, Some("other")), big(2)]);
            let Some(Outgoing::Publish(_, seqs)) = p.take(Instant::now()) else {
                panic!("round {round}: the small message goes first");
            };
            assert_eq!(seqs, [1]);
            p.assigned(2);
            let Some(Outgoing::Publish(_, seqs)) = p.take(Instant::now()) else {
                panic!("round {round}: then the big one");
            };
            assert_eq!(seqs, [2]);
            // Closed before its packet id was assigned.
            tokio::time::advance(Duration::from_millis(100)).await;
            p.disconnected();
        }
        p.connected();
        p.refill(vec![record(1, Some("other")), big(2)]);
        let first = p.take(Instant::now());
        assert!(
            matches!(&first, Some(Outgoing::Publish(_, seqs)) if seqs == &[1]),
            "{first:?}"
        );
        assert!(
            matches!(p.take(Instant::now()), Some(Outgoing::Discard(seqs, _)) if seqs == [2]),
            "the big message is discarded"
        );
    }

    /// A connection that drops now and then, at random, never costs a
    /// message: the drops do not follow one message each time.
    #[tokio::test(start_paused = true)]
    async fn a_flaky_link_discards_nothing() {
        let mut p = Publisher::new(tc(), None, 1 << 18);
        for round in 0..20 {
            p.connected();
            p.refill(vec![record(1, None)]);
            assert!(
                matches!(p.take(Instant::now()), Some(Outgoing::Publish(..))),
                "round {round}"
            );
            p.assigned(1);
            // The link lasts long enough that the message is not to blame.
            tokio::time::advance(Duration::from_secs(3)).await;
            p.disconnected();
        }
        assert_eq!(p.discarded, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn sub_device_reports_waiting_together_share_a_message() {
        let mut p = Publisher::new(tc(), Some(1.0), 1 << 18);
        p.connected();
        p.refill(vec![
            record(0, Some("a")),
            record(1, Some("b")),
            record(2, Some("a")),
        ]);
        let Some(Outgoing::Publish(m, seqs)) = p.take(Instant::now()) else {
            panic!("a publication");
        };
        assert_eq!(m.topic, "gateway/attributes");
        assert_eq!(seqs, [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn sub_devices_online_are_announced_again_after_a_reconnect() {
        let presence = |seq, key: &str, online| {
            (
                seq,
                Record::now(Body::Presence {
                    key: key.into(),
                    online,
                }),
            )
        };
        let mut p = Publisher::new(tc(), None, 1 << 18);
        p.connected();
        p.refill(vec![
            presence(0, "a", true),
            presence(1, "b", true),
            presence(2, "a", false),
        ]);
        let mut topics = Vec::new();
        while let Some(Outgoing::Publish(m, _)) = p.take(Instant::now()) {
            topics.push(m.topic);
        }
        assert_eq!(
            topics,
            ["gateway/connect", "gateway/connect", "gateway/disconnect"]
        );
        p.disconnected();
        p.connected();
        let Some(Outgoing::Publish(m, seqs)) = p.take(Instant::now()) else {
            panic!("the announcement");
        };
        assert_eq!(m.topic, "gateway/connect");
        assert_eq!(m.payload, br#"{"device":"b"}"#);
        assert!(seqs.is_empty(), "an announcement carries no outbox record");
        assert_eq!(p.take(Instant::now()), None, "only b is online");
    }

    #[tokio::test(start_paused = true)]
    async fn presence_goes_out_at_once_outside_the_rate() {
        let mut p = Publisher::new(tc(), Some(1.0), 1 << 18);
        p.connected();
        let up = |seq, key: &str| {
            (
                seq,
                Record::now(Body::Presence {
                    key: key.into(),
                    online: true,
                }),
            )
        };
        p.refill(vec![
            up(0, "a"),
            record(1, Some("a")),
            up(2, "b"),
            record(3, Some("b")),
        ]);
        let start = Instant::now();
        let mut sent = Vec::new();
        while let Some(at) = p.ready_at() {
            tokio::time::sleep_until(at).await;
            let Some(Outgoing::Publish(m, _)) = p.take(Instant::now()) else {
                panic!("a publication");
            };
            sent.push((Instant::now().duration_since(start).as_millis(), m.topic));
        }
        let sent: Vec<(u128, &str)> = sent.iter().map(|(t, m)| (*t, m.as_str())).collect();
        assert_eq!(
            sent,
            [
                (0, "gateway/connect"),
                (0, "gateway/attributes"),
                (0, "gateway/connect"),
                (1000, "gateway/attributes")
            ]
        );
    }
}

//! The platform side: one MQTT connection (rumqttc, QoS 1, TLS via rustls)
//! owned by one task. It drives the [`publisher`] state machine — the
//! outbox in order, each record removed when the broker acknowledged it —
//! and hands downlink messages to the router untouched. It never ends on
//! its own: every failure is a reconnect with capped backoff.

pub mod budget;
pub mod profile;
pub mod publisher;
mod response;

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing as MqttOutgoing, Packet,
    QoS, StateError, Transport,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, sleep_until, Instant};

use crate::config::{Platform, Profile};
use crate::live::UplinkStats;
use crate::outbox::Outbox;
use crate::router::Incoming;
use crate::text::quote;
use publisher::{Outgoing, Phase, Publisher, READ_AHEAD, RECONNECT_MAX};

/// Largest packet we publish; a message over it is discarded, not sent.
pub const MAX_OUTGOING_PACKET: usize = 256 * 1024;
/// Largest packet we take from the broker. Larger downlink payloads than
/// 64 KiB are dropped by the router anyway; this only bounds what one
/// message may cost before it is dropped. A bigger one breaks the
/// connection in rumqttc (MQTT 3.1.1 cannot tell the broker a limit), so a
/// topic whose retained message is over it is left unsubscribed.
pub const MAX_INCOMING_PACKET: usize = 1024 * 1024;
/// An oversized packet this soon after a SUBACK is blamed on that topic's
/// retained message.
const RETAINED_WINDOW: Duration = Duration::from_secs(5);

/// MQTT connection options per SPEC §5/§6: client id = gateway id, clean
/// session, credentials and last will per profile.
pub fn mqtt_options(gateway_id: &str, platform: &Platform) -> MqttOptions {
    let mut options = MqttOptions::new(gateway_id, &platform.host, platform.port);
    options
        .set_keep_alive(platform.keep_alive)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET);
    match &platform.profile {
        Profile::ThingsCloud {
            access_token,
            project_key,
        } => {
            options.set_credentials(access_token, project_key);
        }
        Profile::Generic {
            username, password, ..
        } => {
            if let Some(user) = username {
                options.set_credentials(user, password.as_deref().unwrap_or_default());
            }
        }
    }
    if let Some(topic) = profile::status_topic(&platform.profile) {
        options.set_last_will(LastWill::new(topic, "offline", QoS::AtLeastOnce, true));
    }
    if let Some(tls) = &platform.tls {
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.client.clone()),
        ));
    }
    options
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection ({code:?}): check access_token/project_key or username/password")
        }
        other => other.to_string(),
    }
}

/// An incoming packet over [`MAX_INCOMING_PACKET`] broke the connection.
fn oversized_incoming(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::Error::PayloadSizeLimitExceeded(size),
        )) => Some(*size),
        _ => None,
    }
}

/// The downlink topics and which of them are still subscribed to.
struct Subscriptions {
    topics: Vec<String>,
    /// Topics left out: their retained message breaks the connection.
    skipped: Vec<String>,
    /// SUBACKs seen on this connection, and when the last came.
    acked: usize,
    last_ack: Option<StdInstant>,
}

impl Subscriptions {
    fn new(platform: &Platform) -> Self {
        Self {
            topics: profile::downlink_topics(&platform.profile),
            skipped: Vec::new(),
            acked: 0,
            last_ack: None,
        }
    }

    /// One SUBSCRIBE per topic, so a retained message can be told apart.
    fn subscribe(&mut self, client: &AsyncClient) {
        self.acked = 0;
        self.last_ack = None;
        for topic in self.topics.iter().filter(|t| !self.skipped.contains(t)) {
            if let Err(e) = client.try_subscribe(topic, QoS::AtLeastOnce) {
                log::error!(target: "platform", "cannot subscribe to {topic}: {e}");
            }
        }
    }

    fn suback(&mut self) {
        self.acked += 1;
        self.last_ack = Some(StdInstant::now());
    }

    /// An oversized packet broke the connection: if it came right after a
    /// SUBACK, that topic's retained message is the cause; it is left out.
    fn blame(&mut self, size: usize) {
        let recent = self.last_ack.is_some_and(|t| t.elapsed() < RETAINED_WINDOW);
        let active: Vec<&String> = self
            .topics
            .iter()
            .filter(|t| !self.skipped.contains(t))
            .collect();
        match (
            recent,
            self.acked.checked_sub(1).and_then(|i| active.get(i)),
        ) {
            (true, Some(topic)) => {
                let topic = (*topic).clone();
                log::error!(target: "platform", "a {size}-byte message (over the {MAX_INCOMING_PACKET}-byte limit) arrives right after subscribing to {topic}: probably a retained message there. Not subscribing to {topic} until restart; clear the retained message on the broker");
                self.skipped.push(topic);
            }
            _ => {
                log::warn!(target: "platform", "dropped a {size}-byte message from the broker (over the {MAX_INCOMING_PACKET}-byte limit); reconnecting")
            }
        }
    }
}

/// Runs the connection until `shutdown`. `downlink` gets every message the
/// broker delivers (`None`: publish only).
pub async fn run(
    gateway_id: &str,
    platform: &Platform,
    outbox: Outbox,
    downlink: Option<mpsc::Sender<Incoming>>,
    uplink: Arc<UplinkStats>,
    budget: watch::Receiver<Option<budget::Budget>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let options = mqtt_options(gateway_id, platform);
    let (client, mut eventloop) = AsyncClient::new(options, publisher::WINDOW + 8);
    // Small packets (PUBACKs, downlink) must not wait for Nagle's algorithm.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let status = profile::status_topic(&platform.profile);
    let mut publisher = Publisher::new(
        platform.profile.clone(),
        platform.max_publish_rate,
        MAX_OUTGOING_PACKET,
    );
    let mut subscriptions = Subscriptions::new(platform);
    let mut last_error: Option<String> = None;
    // Acknowledged records go to the outbox in batches, whenever the event
    // loop has nothing more ready (or a window's worth is waiting): one
    // message per PUBACK would wake its thread for every record of a replay.
    let mut acks = Acks::default();
    let mut responses = response::Responses::default();
    let mut backlog = budget::BacklogWatch::default();
    let mut sample = tokio::time::interval(budget::SAMPLE_EVERY);
    // A read-ahead request to the outbox, answered while the event loop
    // goes on (the outbox may be busy with the disk for a moment).
    let mut reading: Option<oneshot::Receiver<Vec<(u64, crate::record::Record)>>> = None;
    'run: loop {
        if reading.is_none() && publisher.wants_records() {
            reading = Some(outbox.request_read(publisher.read_position(), READ_AHEAD));
        }
        let ready = publisher.ready_at();
        tokio::select! {
            biased;
            () = crate::stopped(&mut shutdown) => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    log::info!(target: "platform", "connected to the broker");
                    last_error = None;
                    publisher.connected();
                    uplink.up();
                    if let Some(topic) = &status {
                        publisher.untracked();
                        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, "online");
                    }
                    if downlink.is_some() {
                        subscriptions.subscribe(&client);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => subscriptions.suback(),
                Ok(Event::Incoming(Packet::Publish(publish))) if profile::RESPONSE_TOPICS.contains(&publish.topic.as_str()) => {
                    responses.handle(&publish.topic, &publish.payload);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if let Some(downlink) = &downlink {
                        let message = Incoming {
                            topic: publish.topic.clone(),
                            payload: publish.payload.to_vec(),
                        };
                        if downlink.try_send(message).is_err() {
                            log::warn!(target: "platform", "downlink queue full: a message on {} was dropped", quote(&publish.topic));
                        }
                    }
                }
                Ok(Event::Outgoing(MqttOutgoing::Publish(pkid))) => publisher.assigned(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    uplink.published();
                    acks.add(publisher.acked(ack.pkid), &outbox);
                }
                Ok(_) => {}
                Err(e) => {
                    acks.send(&outbox);
                    // rumqttc would resend its own copies; the outbox resends
                    // everything unacknowledged instead, in order.
                    eventloop.pending.clear();
                    uplink.down(true);
                    if let Some(size) = oversized_incoming(&e) {
                        subscriptions.blame(size);
                    }
                    // A read-ahead asked for before the rewind is stale.
                    reading = None;
                    let wait = publisher.disconnected();
                    let text = describe(&e);
                    if last_error.as_deref() != Some(text.as_str()) {
                        log::warn!(target: "platform", "broker connection: {text}; retrying with backoff up to {}s", RECONNECT_MAX.as_secs());
                        last_error = Some(text);
                    }
                    tokio::select! {
                        () = crate::stopped(&mut shutdown) => break 'run,
                        () = sleep(wait) => {}
                    }
                }
            },
            records = async {
                match reading.as_mut() {
                    Some(answer) => answer.await.unwrap_or_default(),
                    None => std::future::pending().await,
                }
            }, if reading.is_some() => {
                reading = None;
                publisher.refill(records);
            }
            () = sleep_until(ready.unwrap_or_else(Instant::now)), if ready.is_some() => {
                match publisher.take(Instant::now()) {
                    Some(Outgoing::Publish(message, _)) => {
                        let sent = client.try_publish(message.topic, QoS::AtLeastOnce, message.retain, message.payload);
                        // A full request channel cannot happen while the window
                        // is smaller than it; resend from the oldest if it does.
                        if sent.is_err() {
                            reading = None;
                            publisher.rewind();
                        }
                    }
                    Some(Outgoing::Skip(seqs)) => outbox.ack(seqs),
                    Some(Outgoing::Discard(seqs, why)) => {
                        log::error!(target: "platform", "dropped {} record(s) that can never be published: {why}", seqs.len());
                        outbox.discard(seqs);
                    }
                    None => {}
                }
            },
            () = sleep_until(acks.due.unwrap_or_else(Instant::now)), if acks.due.is_some() => acks.send(&outbox),
            _ = sample.tick() => {
                let held = outbox.stats().messages;
                let connected = publisher.phase() != Phase::BackingOff;
                if let Some(warning) = backlog.sample(Instant::now(), connected, held, publisher.published, budget.borrow().as_ref()) {
                    log::warn!(target: "platform", "{warning}");
                }
            }
            // New records join the read-ahead before the next slot, so that
            // what waits together is combined.
            () = outbox.appended(), if publisher.phase() != Phase::BackingOff => publisher.appended(),
        }
    }
    uplink.down(false);
    acks.send(&outbox);
    if let Some(topic) = status {
        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, "offline");
    }
    let _ = client.try_disconnect();
    // Let the event loop deliver the last acknowledgements and the goodbye.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    acks.add(publisher.acked(ack.pkid), &outbox)
                }
                Ok(Event::Outgoing(MqttOutgoing::Publish(pkid))) => publisher.assigned(pkid),
                Ok(Event::Outgoing(MqttOutgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    acks.send(&outbox);
}

/// Acknowledged records not yet told to the outbox.
#[derive(Default)]
struct Acks {
    seqs: Vec<u64>,
    /// Set while some wait: the (biased) select tells them as soon as no
    /// event is ready.
    due: Option<Instant>,
}

impl Acks {
    fn add(&mut self, seqs: Vec<u64>, outbox: &Outbox) {
        self.seqs.extend(seqs);
        if self.seqs.len() >= publisher::WINDOW {
            self.send(outbox);
        } else if !self.seqs.is_empty() {
            self.due.get_or_insert_with(Instant::now);
        }
    }

    fn send(&mut self, outbox: &Outbox) {
        self.due = None;
        outbox.ack(std::mem::take(&mut self.seqs));
    }
}

//! The platform side: one MQTT connection (rumqttc, QoS 1, TLS via rustls)
//! that publishes the outbox in order, removes what the broker acknowledged
//! and keeps reconnecting with capped exponential backoff. Downlink messages
//! are handed to the router untouched.

pub mod profile;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport,
};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use std::collections::{HashMap, VecDeque};

use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, Instant};

use crate::config::{Platform, Profile};
use crate::outbox::{Outbox, Record};
use crate::router::Incoming;
use profile::Message;

const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(60);

/// The rustls client config: the CA file if given, else the system roots.
/// The broker's certificate is verified against `host`.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("cannot read CA certificates from {}", path.display()))?;
            if certs.is_empty() {
                anyhow::bail!("{} holds no PEM certificate", path.display());
            }
            for cert in certs {
                roots
                    .add(cert)
                    .with_context(|| format!("invalid CA certificate in {}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A malformed system certificate is skipped, not fatal.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                anyhow::bail!("no system root certificates found; install ca-certificates or set platform.ca_file");
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS setup")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// MQTT connection options per SPEC §5/§6: client id = gateway id, clean
/// session, credentials and last will per profile.
pub fn mqtt_options(gateway_id: &str, platform: &Platform) -> anyhow::Result<MqttOptions> {
    let mut options = MqttOptions::new(gateway_id, &platform.host, platform.port);
    options
        .set_keep_alive(platform.keep_alive.max(Duration::from_secs(1)))
        .set_clean_session(true)
        .set_max_packet_size(256 * 1024, 256 * 1024);
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
        let config = tls_config(tls.ca_file.as_deref())?;
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    Ok(options)
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection ({code:?}): check access_token/project_key or username/password")
        }
        other => other.to_string(),
    }
}

/// Publications handed to rumqttc and not yet acknowledged. QoS 1 packet ids
/// are assigned by the event loop in the order we publish, so the records
/// behind each publication are matched to its id first-in, first-out.
#[derive(Default)]
struct Window {
    /// Published, packet id not yet seen.
    unassigned: VecDeque<Vec<u64>>,
    /// Sent, waiting for PUBACK: packet id → outbox sequence numbers.
    inflight: HashMap<u16, Vec<u64>>,
}

impl Window {
    fn len(&self) -> usize {
        self.unassigned.len() + self.inflight.len()
    }

    fn assigned(&mut self, pkid: u16) {
        if let Some(seqs) = self.unassigned.pop_front() {
            self.inflight.insert(pkid, seqs);
        }
    }

    fn acked(&mut self, pkid: u16) -> Vec<u64> {
        self.inflight.remove(&pkid).unwrap_or_default()
    }

    fn clear(&mut self) {
        self.unassigned.clear();
        self.inflight.clear();
    }
}

/// At most this many publications wait for PUBACK at once.
const WINDOW: usize = 32;
/// Records read from the outbox at a time.
const READ_AHEAD: usize = 512;

/// The outbox in send order, read in chunks so that a message costs one
/// decode, not a scan.
#[derive(Default)]
struct Queue {
    ahead: VecDeque<(u64, Record)>,
    /// The last sequence number read from the outbox.
    read_to: Option<u64>,
}

impl Queue {
    /// Starts again from the oldest record (after a reconnect).
    fn rewind(&mut self) {
        self.ahead.clear();
        self.read_to = None;
    }

    /// The next message and the records it carries.
    fn next(&mut self, outbox: &Outbox, profile: &Profile) -> Option<(Message, Vec<u64>)> {
        if self.ahead.len() < READ_AHEAD / 2 {
            let more = outbox.after(self.read_to, READ_AHEAD);
            if let Some((seq, _)) = more.last() {
                self.read_to = Some(*seq);
            }
            self.ahead.extend(more);
        }
        if self.ahead.is_empty() {
            return None;
        }
        let n = profile::batch_len(profile, self.ahead.iter().map(|(_, r)| r));
        let taken: Vec<(u64, Record)> = self.ahead.drain(..n).collect();
        let (seqs, records): (Vec<u64>, Vec<Record>) = taken.into_iter().unzip();
        Some((profile::message(profile, &records), seqs))
    }
}

/// Publishes the outbox in order until `shutdown`: QoS 1, at most
/// `max_publish_rate` messages per second, at most [`WINDOW`] unacknowledged,
/// each record removed from the outbox when its PUBACK arrives. After a
/// reconnect everything unacknowledged is sent again from the oldest.
pub async fn run(
    gateway_id: &str,
    platform: &Platform,
    outbox: Arc<Outbox>,
    downlink: Option<mpsc::Sender<Incoming>>,
    connected_flag: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let options = mqtt_options(gateway_id, platform)?;
    let (client, mut eventloop) = AsyncClient::new(options, WINDOW + 8);
    // Small packets (PUBACKs, downlink) must not wait for Nagle's algorithm.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let status = profile::status_topic(&platform.profile);
    let spacing = platform
        .max_publish_rate
        .map(|rate| Duration::from_secs_f64(1.0 / rate));
    let mut window = Window::default();
    let mut connected = false;
    let mut queue = Queue::default();
    let mut next: Option<(Message, Vec<u64>)> = None;
    let mut next_slot = Instant::now();
    let mut backoff = RECONNECT_MIN;
    let mut last_error: Option<String> = None;
    'run: loop {
        let open = connected && window.len() < WINDOW;
        if open && next.is_none() {
            next = queue.next(&outbox, &platform.profile);
        }
        tokio::select! {
            biased;
            () = crate::stopped(&mut shutdown) => break,
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    log::info!(target: "platform", "connected to the broker");
                    backoff = RECONNECT_MIN;
                    last_error = None;
                    connected = true;
                    connected_flag.store(true, Ordering::Relaxed);
                    if let Some(topic) = &status {
                        window.unassigned.push_back(Vec::new());
                        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, "online");
                    }
                    if downlink.is_some() {
                        let topics = profile::downlink_topics(&platform.profile)
                            .into_iter()
                            .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
                        if let Err(e) = client.try_subscribe_many(topics) {
                            log::error!(target: "platform", "cannot subscribe to the downlink topics: {e}");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if let Some(downlink) = &downlink {
                        let message = Incoming {
                            topic: publish.topic.clone(),
                            payload: publish.payload.to_vec(),
                        };
                        if downlink.try_send(message).is_err() {
                            log::warn!(target: "platform", "downlink queue full: a message was dropped");
                        }
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => window.assigned(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Err(e) = outbox.remove(&window.acked(ack.pkid)) {
                        log::error!(target: "platform", "{e}");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // rumqttc would resend its own copies; the outbox resends
                    // everything unacknowledged instead, in order.
                    eventloop.pending.clear();
                    window.clear();
                    connected = false;
                    connected_flag.store(false, Ordering::Relaxed);
                    queue.rewind();
                    next = None;
                    let text = describe(&e);
                    if last_error.as_deref() != Some(text.as_str()) {
                        log::warn!(target: "platform", "broker connection: {text}; retrying with backoff up to {}s", RECONNECT_MAX.as_secs());
                        last_error = Some(text);
                    }
                    tokio::select! {
                        () = crate::stopped(&mut shutdown) => break 'run,
                        () = sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            },
            () = sleep_until(next_slot), if open && next.is_some() => {
                if let Some((message, seqs)) = next.take() {
                    window.unassigned.push_back(seqs);
                    if client
                        .try_publish(message.topic, QoS::AtLeastOnce, message.retain, message.payload)
                        .is_err()
                    {
                        // Cannot happen while the window is smaller than the
                        // request channel; resend from the oldest if it does.
                        window.clear();
                        queue.rewind();
                    }
                    if let Some(spacing) = spacing {
                        next_slot = Instant::now().max(next_slot) + spacing;
                    }
                }
            },
            () = outbox.appended(), if open && next.is_none() => {}
        }
    }
    if let Some(topic) = status {
        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, "offline");
    }
    let _ = client.try_disconnect();
    // Let the event loop deliver the last acknowledgements and the goodbye.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let _ = outbox.remove(&window.acked(ack.pkid));
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => window.assigned(pkid),
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(())
}

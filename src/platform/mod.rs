//! The platform side: one MQTT connection (rumqttc, QoS 1, TLS via rustls)
//! that turns readings into profile messages and keeps reconnecting with
//! capped exponential backoff. Readings arrive through one queue; this is
//! where the durable outbox plugs in.

pub mod profile;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{
    AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS, Transport,
};
use rustls::pki_types::{pem::PemObject, CertificateDer};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep, sleep_until, Instant};

use crate::config::{Platform, Profile};
use crate::poll::Reading;
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

/// Drives the connection: reconnects with capped exponential backoff and
/// logs each change of state once. Publishes the retained `online` status
/// (generic profile) on every connect.
async fn drive(mut eventloop: rumqttc::EventLoop, client: AsyncClient, status: Option<String>) {
    let mut backoff = RECONNECT_MIN;
    let mut last_error: Option<String> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                log::info!(target: "platform", "connected to the broker");
                backoff = RECONNECT_MIN;
                last_error = None;
                if let Some(topic) = &status {
                    let _ = client.try_publish(topic, QoS::AtLeastOnce, true, "online");
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                let text = describe(&e);
                if last_error.as_deref() != Some(text.as_str()) {
                    log::warn!(target: "platform", "broker connection: {text}; retrying with backoff up to {}s", RECONNECT_MAX.as_secs());
                    last_error = Some(text);
                }
                sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }
    }
}

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            format!("broker refused the connection ({code:?}): check access_token/project_key or username/password")
        }
        other => other.to_string(),
    }
}

/// Publishes readings until `shutdown`, then says `offline` (generic
/// profile) and disconnects.
pub async fn run(
    gateway_id: &str,
    platform: &Platform,
    mut readings: mpsc::Receiver<Reading>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let options = mqtt_options(gateway_id, platform)?;
    let (client, eventloop) = AsyncClient::new(options, 64);
    let status = profile::status_topic(&platform.profile);
    let driver = tokio::spawn(drive(eventloop, client.clone(), status.clone()));
    let spacing = platform
        .max_publish_rate
        .map(|rate| Duration::from_secs_f64(1.0 / rate));
    let mut next_send = Instant::now();
    loop {
        let reading = tokio::select! {
            biased;
            () = crate::stopped(&mut shutdown) => break,
            r = readings.recv() => match r {
                Some(r) => r,
                None => break,
            },
        };
        if let Some(spacing) = spacing {
            sleep_until(next_send).await;
            next_send = Instant::now().max(next_send) + spacing;
        }
        let Message {
            topic,
            payload,
            retain,
        } = profile::attributes(&platform.profile, &reading);
        client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .context("MQTT client stopped")?;
    }
    if let Some(topic) = status {
        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, "offline");
    }
    let _ = client.try_disconnect();
    // Give the event loop a moment to flush the last packets.
    let abort = driver.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), driver)
        .await
        .is_err()
    {
        abort.abort();
    }
    Ok(())
}

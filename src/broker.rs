//! An embedded MQTT broker (rumqttd) on loopback, for `demo` and for tests:
//! the platform side of the no-hardware quick start.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A listener on `127.0.0.1:port`, serving `tls` when the broker is built
/// with TLS.
pub fn listener(port: u16, tls: Option<TlsConfig>) -> ServerSettings {
    ServerSettings {
        name: format!("v4-{port}"),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// Starts a plain broker on `127.0.0.1:port`; it serves until the process
/// exits.
pub fn start(port: u16) -> std::io::Result<SocketAddr> {
    start_listeners(vec![listener(port, None)])
}

/// Starts one broker with several listeners, in its own thread, and waits
/// until the first accepts connections.
pub fn start_listeners(listeners: Vec<ServerSettings>) -> std::io::Result<SocketAddr> {
    let Some(first) = listeners.first().map(|l| l.listen) else {
        return Err(std::io::Error::other("a broker needs a listener"));
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 500,
            max_segment_size: 16 << 20,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(
            listeners
                .into_iter()
                .map(|l| (l.name.clone(), l))
                .collect::<HashMap<_, _>>(),
        ),
        ..Config::default()
    };
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            if let Err(e) = Broker::new(config).start() {
                log::error!(target: "broker", "embedded broker stopped: {e}");
            }
        })?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(first).is_ok() {
            return Ok(first);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("embedded broker did not start on {first}"),
    ))
}

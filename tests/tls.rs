//! TLS toward the broker: the right CA connects and publishes; a broker
//! whose certificate another CA signed is refused, and the refusal logged.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use fieldgate::broker;
use fieldgate::config::Area;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// A CA, and a server certificate for localhost/127.0.0.1 signed by it;
/// returns the CA certificate's PEM path.
fn make_pki(dir: &Path, name: &str) -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let path = |f: &str| dir.join(format!("{name}-{f}")).display().to_string();
    std::fs::write(path("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(path("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(path("server.key"), server_key.serialize_pem()).unwrap();
    (path("ca.pem"), path("server.pem"), path("server.key"))
}

/// A broker with a TLS listener (for the gateway) and a plain one (for the
/// test's own subscriber). Returns (tls port, plain port).
fn tls_broker(cert: String, key: String) -> (u16, u16) {
    let tls_port = broker::free_port().unwrap();
    let plain_port = broker::free_port().unwrap();
    let tls = rumqttd::TlsConfig::Rustls {
        capath: None,
        certpath: cert,
        keypath: key,
    };
    broker::start_listeners(vec![
        broker::listener(plain_port, None),
        broker::listener(tls_port, Some(tls)),
    ])
    .unwrap();
    (tls_port, plain_port)
}

fn config(tls_port: u16, pty: &Path, ca: &str) -> String {
    header(tls_port, pty, "")
        .replace("host = \"127.0.0.1\"", &format!("host = \"localhost\"\ntls = true\nca_file = \"{ca}\""))
        + "\n[[device]]\nname = \"m\"\nbus = \"line\"\nunit = 1\npoll = \"200ms\"\n\n[[device.point]]\nname = \"v\"\narea = \"holding\"\naddress = 0\ntype = \"u16\"\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_right_ca_connects_and_the_wrong_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(dir.path(), "good");
    let (other_ca, _, _) = make_pki(dir.path(), "other");
    let (tls_port, plain_port) = tls_broker(cert, key);
    let slaves = Slaves::new();
    slaves.unit(1, |u| u.set_registers(Area::Holding, 0, &[42]));
    let pty = slaves.serve().unwrap();
    let platform = Subscriber::connect(plain_port).await;

    let wrong = Gateway::start(&config(tls_port, &pty.path, &other_ca));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        platform.on("attributes").is_empty(),
        "nothing may pass with the wrong CA"
    );
    let refusals = wrong.log_lines("broker connection");
    assert_eq!(
        refusals.len(),
        1,
        "logged once, not per retry: {refusals:#?}"
    );
    assert!(refusals[0].contains("certificate"), "{refusals:?}");
    drop(wrong);

    let right = Gateway::start(&config(tls_port, &pty.path, &ca));
    let seen = platform
        .wait_until(Duration::from_secs(10), "a report over TLS", |s| {
            s.iter().any(|m| m.topic == "attributes")
        })
        .await;
    assert_eq!(
        payloads(&seen, "attributes")[0],
        serde_json::json!({"v": 42})
    );
    assert_eq!(right.log_lines("connected to the broker").len(), 1);
}

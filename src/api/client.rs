//! The CLI's side of the local API: `read`, `write`, `scan` and `trace`
//! find the running daemon of their config through `[api] listen` and go
//! through its bus owners, so nothing interleaves on the wire and nobody
//! has to stop the service to commission a device. A daemon answering there
//! that is not the one of this config (another gateway id or data_dir)
//! counts as no daemon.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpStream;

use crate::bus::tap::TraceEvent;
use crate::config::{Config, Device};
use crate::poll::scan::Probe;
use crate::poll::PointRead;

/// How long finding the daemon may take: it answers from memory at once.
const FIND_WAIT: Duration = Duration::from_secs(2);

/// A write the daemon refused as invalid (`422`): nothing was written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The running daemon of a config.
pub struct Daemon {
    addr: SocketAddr,
    token: Option<String>,
}

impl Daemon {
    /// The daemon of `config`, if it runs and its API is on.
    pub async fn find(config: &Config) -> Option<Self> {
        let addr = config.api.listen?;
        let daemon = Self {
            addr,
            token: config.api.token.clone(),
        };
        let (status, body) =
            tokio::time::timeout(FIND_WAIT, daemon.call(Method::GET, "/api/v1/status", None))
                .await
                .ok()?
                .ok()?;
        let ours = status == StatusCode::OK
            && body["gateway"] == config.gateway.id.as_str()
            && body["data_dir"] == config.gateway.data_dir.display().to_string().as_str();
        if !ours {
            log::warn!(target: "api", "the API on {addr} is another daemon's; not using it");
        }
        ours.then_some(daemon)
    }

    /// One request on a fresh connection; the answer's status and JSON body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, json))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<hyper::Response<Incoming>> {
        let stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to the daemon's API on {}", self.addr))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string());
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        if !body.is_empty() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        Ok(sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?)
    }

    /// A POST whose answer must be `200`.
    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let (status, answer) = self.call(Method::POST, path, Some(body)).await?;
        match status {
            StatusCode::OK => Ok(answer),
            StatusCode::UNPROCESSABLE_ENTITY => Err(Refused(reason(&answer)).into()),
            _ => Err(anyhow!("the daemon answered {status}: {}", reason(&answer))),
        }
    }

    /// Reads `device`'s points through its bus owner.
    pub async fn read(&self, device: &Device) -> anyhow::Result<Vec<PointRead>> {
        let points: Vec<&str> = device.points.iter().map(|p| p.name.as_str()).collect();
        let answer = self
            .post(
                &device_path(&device.name, "read"),
                json!({ "points": points }),
            )
            .await?;
        let Some(values) = answer["values"].as_object() else {
            return Err(anyhow!("the daemon's answer has no values"));
        };
        values
            .iter()
            .map(|(name, entry)| {
                let mut entry = entry.clone();
                entry["name"] = name.as_str().into();
                serde_json::from_value(entry).context("the daemon's answer")
            })
            .collect()
    }

    /// Writes `values` to `device` (validated by the daemon, all or nothing).
    pub async fn write(&self, device: &str, values: &Map<String, Value>) -> anyhow::Result<()> {
        self.post(&device_path(device, "write"), Value::Object(values.clone()))
            .await
            .map(drop)
    }

    /// Scans `units` on `bus` through its bus owner (matching answering
    /// units against the daemon's profiles with `identify`).
    pub async fn scan(
        &self,
        bus: &str,
        units: &RangeInclusive<u8>,
        identify: bool,
    ) -> anyhow::Result<Vec<Probe>> {
        let body = json!({
            "units": format!("{}-{}", units.start(), units.end()),
            "identify": identify,
        });
        let answer = self
            .post(&format!("/api/v1/buses/{bus}/scan"), body)
            .await?;
        serde_json::from_value(answer["probes"].clone()).context("the daemon's answer")
    }

    /// Follows the trace (of one bus, or all), calling `each` per event,
    /// until the daemon closes it.
    pub async fn trace(
        &self,
        bus: Option<&str>,
        mut each: impl FnMut(TraceEvent),
    ) -> anyhow::Result<()> {
        let path = match bus {
            Some(bus) => format!("/api/v1/trace?bus={bus}"),
            None => "/api/v1/trace".to_string(),
        };
        let response = self.send(Method::GET, &path, None).await?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            let answer = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(anyhow!("the daemon answered {status}: {}", reason(&answer)));
        }
        let mut body = response.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let message: Vec<u8> = pending.drain(..end + 2).collect();
                for line in String::from_utf8_lossy(&message).lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        if let Ok(event) = serde_json::from_str::<TraceEvent>(data.trim()) {
                            each(event);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The reason in an error answer.
fn reason(answer: &Value) -> String {
    answer["error"]
        .as_str()
        .map_or_else(|| "no reason given".to_string(), crate::text::clip)
}

/// Config names are `[A-Za-z0-9_-]+`: they go into a path as they are.
fn device_path(device: &str, action: &str) -> String {
    format!("/api/v1/devices/{device}/{action}")
}

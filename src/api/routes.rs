//! The endpoints of SPEC §10. Reads of state answer from [`Live`]; reads,
//! writes and scans are jobs for the bus owner, queued like downlink jobs
//! (a full queue is `503`, never a wait that holds the bus).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Map, Value as JsonValue};
use tokio::sync::{broadcast, oneshot};

use super::auth;
use crate::live::{values_json, Live};
use crate::poll::job::{Job, ReadOutcome, WriteOutcome};
use crate::poll::scan::{parse_units, Answer, Identifier, Probe};
use crate::poll::BusHandle;
use crate::router::downlink::Target;
use crate::router::write;
use crate::text::quote;

/// Largest request body.
const MAX_BODY: usize = 64 * 1024;
/// A request body must arrive within this.
const BODY_WAIT: Duration = Duration::from_secs(10);
/// Longest a read or write waits for its bus owner (a queue of jobs ahead,
/// each bounded by timeouts and retries).
const JOB_WAIT: Duration = Duration::from_secs(60);
/// A comment on an idle trace, so that proxies and browsers keep it open.
const TRACE_KEEPALIVE: Duration = Duration::from_secs(15);

const CONSOLE: &str = include_str!("console.html");

/// What every handler gets.
#[derive(Clone)]
pub(super) struct App {
    pub(super) live: Arc<Live>,
    pub(super) token: Option<String>,
    /// Listening on loopback only: GETs need no token.
    pub(super) loopback: bool,
}

pub(super) fn router(live: Arc<Live>, token: Option<String>, loopback: bool) -> Router {
    let app = App {
        live,
        token,
        loopback,
    };
    Router::new()
        .route("/", get(console))
        .route("/api/v1/status", get(status))
        .route("/api/v1/devices/{name}", get(device))
        .route("/api/v1/devices/{name}/read", post(read))
        .route("/api/v1/devices/{name}/write", post(write))
        .route("/api/v1/buses/{name}/scan", post(scan))
        .route("/api/v1/trace", get(trace))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(axum::middleware::from_fn(buffered))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            auth::check,
        ))
        .with_state(app)
}

/// Takes the whole body (at most [`MAX_BODY`], within [`BODY_WAIT`]) before
/// a handler runs, after the access check: a client that trickles its body
/// cannot hold a connection for long, nor a large one any memory.
async fn buffered(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(BODY_WAIT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(e)) if too_large(&e) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over {} KiB", MAX_BODY / 1024),
        ),
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {}s", BODY_WAIT.as_secs()),
        ),
    }
}

/// Whether reading a body failed on the size limit.
fn too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        if error.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// A JSON error answer: `{"error": reason}`.
pub(super) fn error(status: StatusCode, reason: String) -> Response {
    (status, Json(json!({ "error": reason }))).into_response()
}

/// Why a request got no answer, as a status and a reason.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

async fn console() -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(CONSOLE)).into_response()
}

#[derive(Deserialize)]
struct StatusQuery {
    #[serde(default)]
    values: bool,
}

async fn status(State(app): State<App>, Query(query): Query<StatusQuery>) -> Json<JsonValue> {
    Json(app.live.status(query.values))
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.live.metrics_text(),
    )
        .into_response()
}

async fn device(State(app): State<App>, Path(name): Path<String>) -> Result<Response, Refusal> {
    let device = app.live.device(&name).ok_or_else(|| no_device(&name))?;
    Ok(Json(device).into_response())
}

fn no_device(name: &str) -> Refusal {
    Refusal(StatusCode::NOT_FOUND, format!("no device {}", quote(name)))
}

/// The body as JSON of type `T`; empty is `T::default()`.
fn body<T: for<'de> Deserialize<'de> + Default>(bytes: &Bytes) -> Result<T, Refusal> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON for this request: {e}"),
        )
    })
}

/// Hands `job` to the bus owner of `bus` and waits for its answer.
async fn ask<T>(
    bus: Option<&BusHandle>,
    job: Job,
    answer: oneshot::Receiver<T>,
) -> Result<T, Refusal> {
    let unavailable = |reason: String| Refusal(StatusCode::SERVICE_UNAVAILABLE, reason);
    let bus = bus.ok_or_else(|| unavailable("its bus is not running".into()))?;
    if bus.jobs.try_send(job).is_err() {
        return Err(unavailable(format!(
            "bus {} is busy; try again",
            bus.stats.name
        )));
    }
    match tokio::time::timeout(JOB_WAIT, answer).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(unavailable(
            "the bus owner stopped (the config was reloaded?)".into(),
        )),
        Err(_) => Err(Refusal(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no answer from bus {} within {}s",
                bus.stats.name,
                JOB_WAIT.as_secs()
            ),
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReadBody {
    #[serde(default)]
    points: Vec<String>,
}

async fn read(
    State(app): State<App>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, Refusal> {
    let request: ReadBody = body(&bytes)?;
    let field = app.live.field();
    if field.config.device(&name).is_none() {
        return Err(no_device(&name));
    }
    let device = field
        .config
        .select(&name, &request.points)
        .map_err(|reason| Refusal(StatusCode::UNPROCESSABLE_ENTITY, reason))?;
    let (reply, answer) = oneshot::channel::<ReadOutcome>();
    let job = Job::Read {
        device: device.clone(),
        reply,
    };
    let reads = ask(field.bus(&device.bus), job, answer)
        .await?
        .map_err(|reason| Refusal(StatusCode::SERVICE_UNAVAILABLE, reason))?;
    Ok(Json(json!({ "name": device.name, "values": values_json(&reads) })).into_response())
}

async fn write(
    State(app): State<App>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, Refusal> {
    let values: Map<String, JsonValue> = body(&bytes)?;
    let field = app.live.field();
    if field.config.device(&name).is_none() {
        return Err(no_device(&name));
    }
    if values.is_empty() {
        return Err(Refusal(
            StatusCode::UNPROCESSABLE_ENTITY,
            "nothing to write: the body is {\"<point>\": value, …}".into(),
        ));
    }
    let plans = match write::plan(&field.config, &[(Target::Device(name.clone()), values)]) {
        Ok(plans) => plans,
        Err(r) => {
            let answer = json!({
                "error": format!("{} of {name}: {}", r.attribute, r.reason),
                "attribute": r.attribute,
                "reason": r.reason,
            });
            return Ok((StatusCode::UNPROCESSABLE_ENTITY, Json(answer)).into_response());
        }
    };
    let mut read_back = Map::new();
    for plan in plans {
        let bus = field.bus(&plan.device.bus);
        let points = plan.names();
        let (reply, answer) = oneshot::channel::<WriteOutcome>();
        let job = Job::Write {
            plan,
            reply: Some(reply),
        };
        let reading = ask(bus, job, answer)
            .await?
            .map_err(|reason| Refusal(StatusCode::BAD_GATEWAY, reason))?;
        log::info!(target: "api", "device {name}: wrote {points} (local API)");
        read_back.extend(reading.map(|r| r.values).unwrap_or_default());
    }
    Ok(Json(json!({ "name": name, "values": read_back })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanBody {
    #[serde(default = "all_units")]
    units: String,
    #[serde(default)]
    identify: bool,
}

impl Default for ScanBody {
    fn default() -> Self {
        Self {
            units: all_units(),
            identify: false,
        }
    }
}

fn all_units() -> String {
    "1-247".into()
}

/// One probe per job, so that polls go on between them.
async fn scan(
    State(app): State<App>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, Refusal> {
    let request: ScanBody = body(&bytes)?;
    let invalid = |reason: String| Refusal(StatusCode::UNPROCESSABLE_ENTITY, reason);
    let units = parse_units(&request.units).map_err(invalid)?;
    let identify = if request.identify {
        let library = app.live.profiles.clone();
        let profiles = tokio::task::spawn_blocking(move || library.usable())
            .await
            .map_err(|e| Refusal(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Some(Arc::new(Identifier::new(&profiles)))
    } else {
        None
    };
    let field = app.live.field();
    let bus = field.bus(&name).ok_or_else(|| {
        Refusal(
            StatusCode::NOT_FOUND,
            format!("no running bus {}", quote(&name)),
        )
    })?;
    let mut probes: Vec<Probe> = Vec::new();
    for unit in units.filter_map(crate::config::UnitId::new) {
        let (reply, answer) = oneshot::channel();
        let job = Job::Probe {
            unit,
            identify: identify.clone(),
            reply,
        };
        let probe = ask(Some(bus), job, answer).await?;
        let stop = matches!(probe.answer, Answer::Disconnected { .. });
        probes.push(probe);
        if stop {
            break;
        }
    }
    let found: Vec<u8> = probes
        .iter()
        .filter(|p| p.answers())
        .map(|p| p.unit)
        .collect();
    let shown: Vec<&Probe> = probes
        .iter()
        .filter(|p| p.answer != Answer::Silent)
        .collect();
    Ok(
        Json(json!({ "bus": name, "units": request.units, "found": found, "probes": shown }))
            .into_response(),
    )
}

#[derive(Deserialize)]
struct TraceQuery {
    bus: Option<String>,
}

/// Server-Sent Events, one per transaction of the chosen buses.
async fn trace(
    State(app): State<App>,
    Query(query): Query<TraceQuery>,
) -> Result<Response, Refusal> {
    let field = app.live.field();
    let buses: Vec<&BusHandle> = field
        .buses
        .iter()
        .filter(|b| query.bus.as_ref().is_none_or(|name| &b.stats.name == name))
        .collect();
    if let (Some(name), true) = (&query.bus, buses.is_empty()) {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("no running bus {}", quote(name)),
        ));
    }
    // Only the receivers: when a reload replaces a bus, its trace ends.
    let streams = buses.into_iter().map(|bus| {
        stream::unfold(bus.stats.watch(), |mut events| async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let data = serde_json::to_string(&*event).unwrap_or_default();
                        return Some((Ok::<_, Infallible>(Event::default().data(data)), events));
                    }
                    // Counted by the bus as they were evicted.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    });
    let merged: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(stream::select_all(streams));
    Ok(Sse::new(merged)
        .keep_alive(KeepAlive::new().interval(TRACE_KEEPALIVE))
        .into_response())
}

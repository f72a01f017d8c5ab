//! The local API and web console (SPEC §10): an HTTP/1.1 server on the
//! daemon's runtime that answers from [`crate::live`] and hands reads,
//! writes and scans to the bus owners as jobs — it never touches a bus or
//! the outbox itself, and nothing it does can slow polling.
//!
//! The server is hardened for a plant-room network: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at accept), a client that
//! sends no complete request head within [`HEADER_TIMEOUT`] is dropped,
//! bodies over 64 KiB are refused, and [`auth`] decides who may do what.
//! If the address cannot be bound the daemon runs on without the API and
//! tries again every 30 s.

mod auth;
pub mod client;
mod routes;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::Api;
use crate::live::Live;

/// Connections served at once; a scrape, a console and a trace need three.
pub const MAX_CONNECTIONS: usize = 32;
/// A client must send its request head within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a listen address that could not be bound is tried again.
const REBIND_EVERY: Duration = Duration::from_secs(30);
/// Largest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// The kernel's send buffer per connection (it doubles it), instead of
/// autotuning up to megabytes: a trace client that stops reading holds
/// little memory and starts losing events (counted) within seconds.
const SEND_BUFFER: usize = 64 * 1024;

/// Serves the API on `api.listen` until `shutdown`.
pub async fn serve(api: Api, live: Arc<Live>, mut shutdown: watch::Receiver<bool>) {
    let Some(listen) = api.listen else {
        return;
    };
    let app = routes::router(live, api.token, listen.ip().is_loopback());
    let mut warned = false;
    let listener = loop {
        match TcpListener::bind(listen).await {
            Ok(listener) => break listener,
            Err(e) => {
                if !warned {
                    log::warn!(target: "api", "cannot listen on {listen}: {e}; the daemon runs on without the local API and tries again every {}s", REBIND_EVERY.as_secs());
                    warned = true;
                }
                tokio::select! {
                    () = crate::stopped(&mut shutdown) => return,
                    () = tokio::time::sleep(REBIND_EVERY) => {}
                }
            }
        }
    };
    log::info!(target: "api", "local API and console on http://{listen}/");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = crate::stopped(&mut shutdown) => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, mostly: wait instead of spinning.
                log::warn!(target: "api", "accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            log::debug!(target: "api", "refused a connection from {peer}: {MAX_CONNECTIONS} are open");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            let _ = nix::sys::socket::setsockopt(
                &stream,
                nix::sys::socket::sockopt::SndBuf,
                &SEND_BUFFER,
            );
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = crate::stopped(&mut stop) => {}
            }
        });
    }
}

//! Who may do what (SPEC §10). With a token, every POST needs
//! `Authorization: Bearer <token>`; listening beyond loopback, every path
//! does (the console page, which a browser cannot send a header for, also
//! takes the token from the cookie that its sign-in sets). Without a token
//! (loopback only, by a config rule) everything is open to local users.
//! Tokens are compared in constant time. A POST whose `Origin` is another
//! site is refused, so a web page open in the technician's browser cannot
//! write to a loopback API behind their back.

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::routes::{error, App};

/// The cookie the console's sign-in sets.
const COOKIE: &str = "fieldgate_token";

const SIGN_IN: &str = include_str!("sign_in.html");

pub(super) async fn check(State(app): State<App>, request: Request, next: Next) -> Response {
    let post = request.method() == Method::POST;
    if post && foreign_origin(&request) {
        return error(
            StatusCode::FORBIDDEN,
            "cross-site requests are refused".into(),
        );
    }
    let Some(token) = app.token.as_deref() else {
        return next.run(request).await;
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| same(given, token));
    let needed = post || !app.loopback;
    if !needed || bearer || (!post && cookie(&request).is_some_and(|c| same(c, token))) {
        return next.run(request).await;
    }
    if request.uri().path() == "/" {
        return (StatusCode::UNAUTHORIZED, Html(SIGN_IN)).into_response();
    }
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "this needs the API token: Authorization: Bearer <token>".into(),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Constant-time comparison (the length is not secret).
fn same(given: &str, token: &str) -> bool {
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// The console's token cookie.
fn cookie(request: &Request) -> Option<&str> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// An `Origin` that is not the host the request was sent to.
fn foreign_origin(request: &Request) -> bool {
    let headers = request.headers();
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    host != Some(origin_host)
}

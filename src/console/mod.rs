//! The operator's console, served beside the admin API (under `/console`) when admin tokens
//! are configured: flows with their live counts, finding a message by any of its keys, a
//! message's journey in both directions, and dead letters replayed with a reason.
//!
//! Everything is compiled into ferry: the templates, the style sheet and one small script.
//! Pages are rendered on the server with HTML escaping on by default, so a value from a
//! message is always text; the Content-Security-Policy allows scripts and styles from ferry
//! alone, none inline. Operators log in with an admin token once ([`crate::session`]); every form
//! that changes something carries the session's CSRF token and must come from a page of the
//! same origin.

mod pages;

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use handlebars::Handlebars;
use serde_json::{Value, json};

use crate::admin::AdminTokens;
use crate::runtime::Runtime;
use crate::session::Session;

/// The console's routes, to nest under `/console`.
pub fn router(runtime: Arc<Runtime>, tokens: &AdminTokens) -> Router {
    let console = Arc::new(Console {
        runtime,
        tokens: tokens.clone(),
    });
    let guarded = Router::new()
        .route("/", get(|| async { Redirect::to("/console/flows") }))
        .route("/flows", get(pages::flows))
        .route("/messages", get(pages::search))
        .route("/messages/{id}", get(pages::message))
        .route(
            "/messages/{id}/replay",
            axum::routing::post(pages::replay_one),
        )
        .route("/dead-letters", get(pages::dead_letters))
        .route(
            "/dead-letters/replay",
            axum::routing::post(pages::replay_many),
        )
        .route("/logout", axum::routing::post(logout))
        .layer(middleware::from_fn_with_state(Arc::clone(&console), guard));
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/static/console.css", get(|| asset("text/css", STYLE)))
        .route(
            "/static/console.js",
            get(|| asset("text/javascript", SCRIPT)),
        )
        .merge(guarded)
        .layer(middleware::from_fn(same_origin_only))
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
}

/// What every console handler reads.
pub(crate) struct Console {
    pub(crate) runtime: Arc<Runtime>,
    tokens: AdminTokens,
}

/// How long a refused login waits before its answer.
const REFUSED_LOGIN_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

const STYLE: &str = include_str!("assets/console.css");
const SCRIPT: &str = include_str!("assets/console.js");

/// The pages' templates, compiled once.
static VIEWS: LazyLock<Handlebars<'static>> = LazyLock::new(|| {
    let mut views = Handlebars::new();
    views.set_strict_mode(true);
    for (name, text) in [
        ("layout", include_str!("assets/layout.hbs")),
        ("login", include_str!("assets/login.hbs")),
        ("flows", include_str!("assets/flows.hbs")),
        ("messages", include_str!("assets/messages.hbs")),
        ("message", include_str!("assets/message.hbs")),
        ("dead-letters", include_str!("assets/dead-letters.hbs")),
        ("replayed", include_str!("assets/replayed.hbs")),
        ("failure", include_str!("assets/failure.hbs")),
    ] {
        views
            .register_template_string(name, text)
            .unwrap_or_else(|e| panic!("console template {name}: {e}"));
    }
    views
});

/// Page `view` with `data`, inside the layout (with the operator's name and the CSRF token
/// of the logout form, when logged in).
pub(crate) fn page(
    status: StatusCode,
    view: &str,
    title: &str,
    session: Option<&Session>,
    data: &Value,
) -> Response {
    let rendered = VIEWS.render(view, data).and_then(|content| {
        VIEWS.render(
            "layout",
            &json!({
                "title": title,
                "content": content,
                "operator": session.map(|s| s.operator.as_str()),
                "csrf": session.map(|s| s.csrf.as_str()),
            }),
        )
    });
    match rendered {
        Ok(html) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Err(error) => {
            tracing::error!(%error, view, "console page not rendered");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

/// A page saying what went wrong.
pub(crate) fn failure(status: StatusCode, session: Option<&Session>, message: &str) -> Response {
    page(
        status,
        "failure",
        "Something went wrong",
        session,
        &json!({"message": message}),
    )
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Sends to the login page whoever has no open session.
async fn guard(State(console): State<Arc<Console>>, mut request: Request, next: Next) -> Response {
    match console.tokens.sessions().find(request.headers()) {
        Some(session) => {
            request.extensions_mut().insert(session);
            next.run(request).await
        }
        None if request.method() == Method::GET => Redirect::to("/console/login").into_response(),
        None => failure(
            StatusCode::UNAUTHORIZED,
            None,
            "Your session has ended: log in again.",
        ),
    }
}

/// Refuses a form sent from another site. `SameSite=Strict` keeps the session cookie off
/// such requests already; this also covers the login form, which has no session yet.
async fn same_origin_only(request: Request, next: Next) -> Response {
    if request.method() != Method::GET && !same_origin(request.headers()) {
        return failure(
            StatusCode::FORBIDDEN,
            None,
            "This form was sent from another site.",
        );
    }
    next.run(request).await
}

fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text("sec-fetch-site") {
        return site == "same-origin" || site == "none";
    }
    match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority == host),
        // Browsers send Origin with every POST; a client that does not is no browser.
        (None, _) => true,
        (Some(_), None) => false,
    }
}

/// What every console response carries: no inline script or style, no framing, no caching
/// of pages that show messages, no referrer leaving with a message id.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn login_page(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if console.tokens.sessions().find(&headers).is_some() {
        return Redirect::to("/console/flows").into_response();
    }
    page(StatusCode::OK, "login", "Log in", None, &json!({}))
}

#[derive(Debug, serde::Deserialize)]
struct Login {
    #[serde(default)]
    token: String,
}

async fn login(
    State(console): State<Arc<Console>>,
    axum::Form(form): axum::Form<Login>,
) -> Response {
    let Some(operator) = console.tokens.name_of(form.token.trim()) else {
        tracing::warn!("console login refused: not an admin token");
        // Each wrong guess costs the guesser half a second.
        tokio::time::sleep(REFUSED_LOGIN_DELAY).await;
        return page(
            StatusCode::UNAUTHORIZED,
            "login",
            "Log in",
            None,
            &json!({"refused": true}),
        );
    };
    tracing::info!(operator = %operator, "console login");
    let sessions = console.tokens.sessions();
    let session = sessions.start(operator);
    (
        [(header::SET_COOKIE, sessions.cookie_for(&session))],
        Redirect::to("/console/flows"),
    )
        .into_response()
}

#[derive(Debug, serde::Deserialize)]
struct Logout {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(console): State<Arc<Console>>,
    axum::Extension(session): axum::Extension<Session>,
    axum::Form(form): axum::Form<Logout>,
) -> Response {
    if !session.csrf_matches(&form.csrf) {
        return pages::forged(&session);
    }
    let sessions = console.tokens.sessions();
    sessions.end(&session.id);
    (
        [(header::SET_COOKIE, sessions.cookie_cleared())],
        Redirect::to("/console/login"),
    )
        .into_response()
}

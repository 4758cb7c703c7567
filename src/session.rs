//! The console's sessions. Logging in with an admin token opens one: a random id in a cookie
//! (`HttpOnly`, `SameSite=Strict`, `Secure` over TLS) stands for the token's name from then
//! on, so the token itself never reaches a page, a URL or the browser's storage. Each session
//! carries its own CSRF token for the forms that change something.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use subtle::ConstantTimeEq;

/// The cookie's name.
const COOKIE: &str = "ferry_console";
/// A session unused this long ends.
const IDLE: Duration = Duration::from_secs(60 * 60);
/// No session lasts longer than a long shift.
const LONGEST: Duration = Duration::from_secs(12 * 60 * 60);
/// Sessions open at once; the oldest gives way beyond it.
const MOST: usize = 1024;

/// The open sessions of one ferry process.
#[derive(Debug)]
pub struct Sessions {
    secure: bool,
    open: Mutex<HashMap<String, Open>>,
}

#[derive(Debug)]
struct Open {
    operator: String,
    csrf: String,
    started: Instant,
    seen: Instant,
}

/// A logged-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    /// What the cookie holds.
    pub(crate) id: String,
    /// The name of the token they logged in with.
    pub(crate) operator: String,
    /// What each state-changing form must send back.
    pub(crate) csrf: String,
}

impl Session {
    /// Whether `given` is this session's CSRF token (compared in constant time).
    pub(crate) fn csrf_matches(&self, given: &str) -> bool {
        bool::from(given.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

impl Sessions {
    /// No sessions yet; cookies marked `Secure` when `secure`.
    pub fn new(secure: bool) -> Self {
        Self {
            secure,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a session for `operator`.
    pub(crate) fn start(&self, operator: String) -> Session {
        let now = Instant::now();
        let session = Session {
            id: random_token(),
            operator,
            csrf: random_token(),
        };
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.retain(|_, s| alive(s, now));
        if open.len() >= MOST
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, s)| s.seen)
                .map(|(id, _)| id.clone())
        {
            open.remove(&oldest);
        }
        open.insert(
            session.id.clone(),
            Open {
                operator: session.operator.clone(),
                csrf: session.csrf.clone(),
                started: now,
                seen: now,
            },
        );
        session
    }

    /// The session a request's cookie names, when it is open.
    pub(crate) fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers)?;
        let now = Instant::now();
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = open.get_mut(id)?;
        if !alive(found, now) {
            open.remove(id);
            return None;
        }
        found.seen = now;
        Some(Session {
            id: id.to_owned(),
            operator: found.operator.clone(),
            csrf: found.csrf.clone(),
        })
    }

    /// Ends session `id`.
    pub(crate) fn end(&self, id: &str) {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    /// The `Set-Cookie` value that gives the browser `session`.
    pub(crate) fn cookie_for(&self, session: &Session) -> HeaderValue {
        self.set_cookie(&session.id, LONGEST.as_secs())
    }

    /// The `Set-Cookie` value that makes the browser forget its session.
    pub(crate) fn cookie_cleared(&self) -> HeaderValue {
        self.set_cookie("", 0)
    }

    fn set_cookie(&self, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{COOKIE}={value}; Path=/console; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
        ))
        .expect("a session id is hex")
    }
}

fn alive(session: &Open, now: Instant) -> bool {
    now.duration_since(session.seen) < IDLE && now.duration_since(session.started) < LONGEST
}

/// The session id in a request's `Cookie` headers.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

/// 256 random bits from the operating system, as hex.
fn random_token() -> String {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue, header};

    use super::Sessions;

    fn with_cookie(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn a_session_is_found_by_its_cookie_until_it_ends() {
        let sessions = Sessions::new(true);
        let session = sessions.start("alice".into());
        let cookie = sessions.cookie_for(&session);
        let cookie = cookie.to_str().unwrap();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
        assert!(cookie.ends_with("; Secure"), "{cookie}");
        let headers = with_cookie(&format!("theme=dark; ferry_console={}", session.id));
        let found = sessions.find(&headers).unwrap();
        assert_eq!(found.operator, "alice");
        assert!(found.csrf_matches(&session.csrf));
        assert!(!found.csrf_matches("forged"));
        assert!(sessions.find(&with_cookie("ferry_console=guess")).is_none());
        sessions.end(&session.id);
        assert!(sessions.find(&headers).is_none());
        assert!(
            !Sessions::new(false)
                .cookie_cleared()
                .to_str()
                .unwrap()
                .contains("Secure")
        );
    }
}

//! Helpers, by concern: mock partners, ferry in this process or as a child process, the
//! brokers and stores tests run on, what callers send, waiting, and readable assertions.
//! Fixtures and the loopback server are shared with the benchmarks (`tests/support`).

/// Compares two texts and shows both in full when they differ.
macro_rules! assert_eq_text {
    ($expected:expr, $actual:expr) => {{
        let (expected, actual): (&str, &str) = (&$expected, &$actual);
        if expected != actual {
            panic!("text differs\n--- expected\n{expected}\n--- actual\n{actual}\n---");
        }
    }};
}

/// Makes each `async fn NAME(backend: Backend)` listed a test on SQLite and one on PostgreSQL:
/// `NAME::sqlite` and `NAME::postgres`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(crate::util::Backend::Sqlite).await;
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(crate::util::Backend::Postgres).await;
            }
        }
    )*};
}

#[path = "../../support/mod.rs"]
mod support;

mod brokers;
mod browser;
mod ferry;
mod partner;
pub(crate) mod process;
mod proxy;
mod requests;
mod store;
mod wait;

pub(crate) use brokers::*;
pub(crate) use browser::*;
pub(crate) use ferry::*;
pub(crate) use partner::*;
pub(crate) use proxy::*;
pub(crate) use requests::*;
pub(crate) use store::*;
pub(crate) use support::{listening_url, payload, repo, serve};
pub(crate) use wait::*;

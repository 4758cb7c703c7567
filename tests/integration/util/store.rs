//! The stores tests run on: a SQLite file, or a PostgreSQL schema of their own.

use ferry::store::Store;

use super::{require, unique};

/// The store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A SQLite file in a temporary folder.
    Sqlite,
    /// A schema of its own in the PostgreSQL at 127.0.0.1:5432 (database `test`).
    Postgres,
}

/// The PostgreSQL the tests use, after checking it answers.
pub(crate) fn postgres() -> String {
    require(
        "PostgreSQL",
        5432,
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    );
    std::env::var("FERRY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh, empty store of one backend: a SQLite file in a folder of its own, or a
/// PostgreSQL schema of its own, dropped with this value.
pub(crate) struct TestStore {
    pub(crate) url: String,
    /// Holds the SQLite file.
    _dir: tempfile::TempDir,
    /// The PostgreSQL server and the schema this value drops.
    schema: Option<(String, String)>,
}

impl TestStore {
    pub(crate) async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => Self {
                url: format!("sqlite://{}/ferry.db", dir.path().display()),
                _dir: dir,
                schema: None,
            },
            Backend::Postgres => {
                let schema = unique("ferry_test").replace(['-', '.'], "_");
                let server = postgres();
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&server)
                    .await
                    .unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                // Connections name themselves after the schema, so the end of the test can
                // find and end every one of them, whichever process opened it.
                Self {
                    url: format!(
                        "{server}?application_name={schema}&options=-c%20search_path%3D{schema}"
                    ),
                    _dir: dir,
                    schema: Some((server, schema)),
                }
            }
        }
    }

    /// A store at `url` whose files live in `dir`, dropped with this value.
    pub(crate) fn kept_in(url: String, dir: tempfile::TempDir) -> Self {
        Self {
            url,
            _dir: dir,
            schema: None,
        }
    }

    /// A store at `url` that this value does not own (a second way to reach another one's).
    pub(crate) fn at(url: String) -> Self {
        Self {
            url,
            _dir: tempfile::tempdir().unwrap(),
            schema: None,
        }
    }

    /// Opens the store, as one more process would.
    pub(crate) async fn open(&self) -> Store {
        Store::open(&self.url).await.unwrap()
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let Some((server, schema)) = self.schema.take() else {
            return;
        };
        // Drop runs outside async code: a thread of its own with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let mut conn =
                        <sqlx::PgConnection as sqlx::Connection>::connect(&server).await?;
                    // The test's own tasks are stopped while this runs: a transaction of
                    // theirs left open would hold the schema forever.
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name = '{schema}';
                         DROP SCHEMA {schema} CASCADE"
                    )))
                    .execute(&mut conn)
                    .await
                    .map(|_| ())
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("the test schema could not be dropped: {dropped:?}");
        }
    }
}

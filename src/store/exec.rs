//! Running a statement, the same call on every connection the store writes through: sqlx's
//! connections (PostgreSQL, and SQLite's readers) and SQLite's writer, which calls SQLite
//! directly on its own thread. Through sqlx, each SQLite statement is a round trip to a
//! worker thread, and those hand-offs, not SQLite, were most of a write's cost.
//!
//! Statements use `$1`, `$2`, … placeholders on every connection. Values are typed even when
//! null, as PostgreSQL wants them.

use hashlink::linked_hash_map::RawEntryMut;

use super::StoreError;

/// A value bound to a statement's placeholder.
#[derive(Debug, Clone, Copy)]
pub(super) enum Param<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
}

impl From<i64> for Param<'_> {
    fn from(value: i64) -> Self {
        Self::Int(Some(value))
    }
}

impl From<Option<i64>> for Param<'_> {
    fn from(value: Option<i64>) -> Self {
        Self::Int(value)
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(value: &'a str) -> Self {
        Self::Text(Some(value))
    }
}

impl<'a> From<&'a String> for Param<'a> {
    fn from(value: &'a String) -> Self {
        Self::Text(Some(value))
    }
}

impl<'a> From<Option<&'a str>> for Param<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Self::Text(value)
    }
}

impl<'a> From<&'a Option<String>> for Param<'a> {
    fn from(value: &'a Option<String>) -> Self {
        Self::Text(value.as_deref())
    }
}

/// The placeholders `$1, $2, …` as a list of [`Param`]s: `params![a, b]`.
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        [$($crate::store::exec::Param::from($value)),*]
    };
}
pub(super) use params;

/// A column's value in a row read back.
#[derive(Debug)]
enum Cell {
    Null,
    Int(i64),
    Text(String),
}

/// A row read back, its columns by position.
#[derive(Debug)]
pub(super) struct Row(Vec<Cell>);

impl Row {
    /// Column `index`, an integer.
    pub(super) fn int(&self, index: usize) -> Result<i64, StoreError> {
        self.opt_int(index)?
            .ok_or_else(|| mismatch(index, "an integer"))
    }

    /// Column `index`, an integer or null.
    pub(super) fn opt_int(&self, index: usize) -> Result<Option<i64>, StoreError> {
        match self.0.get(index) {
            Some(Cell::Int(value)) => Ok(Some(*value)),
            Some(Cell::Null) => Ok(None),
            _ => Err(mismatch(index, "an integer")),
        }
    }

    /// Column `index`, text.
    pub(super) fn text(&self, index: usize) -> Result<&str, StoreError> {
        self.opt_text(index)?.ok_or_else(|| mismatch(index, "text"))
    }

    /// Column `index`, text or null.
    pub(super) fn opt_text(&self, index: usize) -> Result<Option<&str>, StoreError> {
        match self.0.get(index) {
            Some(Cell::Text(value)) => Ok(Some(value)),
            Some(Cell::Null) => Ok(None),
            _ => Err(mismatch(index, "text")),
        }
    }
}

fn mismatch(index: usize, wanted: &str) -> StoreError {
    StoreError::Corrupt(format!("column {index} of a stored row is not {wanted}"))
}

/// `$start, $start+1, …` for `rows` rows of `columns` values each: `($1, $2), ($3, $4)`.
pub(super) fn placeholders(start: usize, rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    push_placeholders(&mut sql, start, rows, columns);
    sql
}

/// `head VALUES ($1, …), (…) tail` for `rows` rows of `columns` values each.
fn insert_sql(head: &str, rows: usize, columns: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + rows * columns * 5 + 10);
    sql.push_str(head);
    sql.push_str(" VALUES ");
    push_placeholders(&mut sql, 1, rows, columns);
    sql.push(' ');
    sql.push_str(tail);
    sql
}

/// [`placeholders`], written at the end of `sql`.
fn push_placeholders(sql: &mut String, start: usize, rows: usize, columns: usize) {
    use std::fmt::Write as _;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            // Writing to a String cannot fail.
            let _ = write!(sql, "${}", start + row * columns + column);
        }
        sql.push(')');
    }
}

/// A connection that runs statements.
pub(super) trait Exec {
    /// Runs `sql`, returning how many rows it changed.
    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError>;

    /// Runs `sql`, returning the rows it gives.
    async fn fetch(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError>;

    /// The first row `sql` gives, if any.
    async fn fetch_optional(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.fetch(sql, params).await?.into_iter().next())
    }

    /// The first row `sql` gives; an error when there is none.
    async fn fetch_one(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Row, StoreError> {
        self.fetch_optional(sql, params)
            .await?
            .ok_or_else(|| StoreError::Corrupt("a statement gave no row".into()))
    }

    /// Inserts `rows`, returning how many went in: `head` is the statement up to `VALUES`,
    /// `tail` what follows the rows. One statement for them all: statements, not rows, are
    /// what cost through sqlx.
    async fn insert_rows<const N: usize>(
        &mut self,
        head: &str,
        rows: &[[Param<'_>; N]],
        tail: &str,
    ) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let sql = insert_sql(head, rows.len(), N, tail);
        self.execute(&sql, rows.as_flattened()).await
    }

    /// Runs `sql`, an `INSERT` of one row into a table whose key is an integer `id`, and
    /// returns the new row's id.
    async fn insert_id(&mut self, sql: &str, params: &[Param<'_>]) -> Result<i64, StoreError> {
        self.fetch_one(&format!("{sql} RETURNING id"), params)
            .await?
            .int(0)
    }
}

/// Runs statements through sqlx on `$connection`, a connection of `$database`.
macro_rules! through_sqlx {
    ($connection:ty, $database:ty) => {
        impl Exec for $connection {
            async fn execute(
                &mut self,
                sql: &str,
                params: &[Param<'_>],
            ) -> Result<u64, StoreError> {
                let query = bind::<$database>(sqlx::query(sqlx::AssertSqlSafe(sql)), params);
                Ok(query.execute(self).await?.rows_affected())
            }

            async fn fetch(
                &mut self,
                sql: &str,
                params: &[Param<'_>],
            ) -> Result<Vec<Row>, StoreError> {
                let query = bind::<$database>(sqlx::query(sqlx::AssertSqlSafe(sql)), params);
                query.fetch_all(self).await?.iter().map(from_sqlx).collect()
            }
        }
    };
}

through_sqlx!(sqlx::PgConnection, sqlx::Postgres);
through_sqlx!(sqlx::SqliteConnection, sqlx::Sqlite);

/// `query` with `params` bound in order.
fn bind<'q, Db>(
    mut query: sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments>,
    params: &[Param<'q>],
) -> sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments>
where
    Db: sqlx::Database,
    Option<i64>: sqlx::Encode<'q, Db> + sqlx::Type<Db>,
    Option<&'q str>: sqlx::Encode<'q, Db> + sqlx::Type<Db>,
{
    for param in params {
        query = match *param {
            Param::Int(value) => query.bind(value),
            Param::Text(value) => query.bind(value),
        };
    }
    query
}

/// A row of integers and text read through sqlx.
fn from_sqlx<R>(row: &R) -> Result<Row, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    (0..row.len())
        .map(|index| {
            if let Ok(value) = row.try_get::<Option<i64>, _>(index) {
                return Ok(value.map_or(Cell::Null, Cell::Int));
            }
            Ok(row
                .try_get::<Option<String>, _>(index)?
                .map_or(Cell::Null, Cell::Text))
        })
        .collect::<Result<_, StoreError>>()
        .map(Row)
}

/// SQLite's writer connection, each statement prepared once.
///
/// A statement run again is found by its text, and its values are bound by the positions
/// worked out when it was prepared. rusqlite's own cache copied the text into a new key and
/// cleared the values at every run, and binding asked SQLite for each placeholder's name:
/// together about 23k of the 630k instructions a durable message cost (callgrind, one
/// connection).
pub(super) struct Writing<'c> {
    conn: &'c rusqlite::Connection,
    statements: hashlink::LruCache<String, Prepared<'c>>,
}

/// A prepared statement, and for each of its parameters the index of the value it takes.
struct Prepared<'c> {
    statement: rusqlite::Statement<'c>,
    positions: Vec<usize>,
}

/// The most statements kept prepared, as many as rusqlite's cache kept (each holds memory),
/// the least recently run let go first. The store runs about forty, and one more for each
/// length of a list it names in full (a claim's messages, a step's keys).
const PREPARED: usize = 64;

impl<'c> Writing<'c> {
    /// Statements through `conn`, none prepared yet.
    pub(super) fn new(conn: &'c rusqlite::Connection) -> Self {
        Self {
            conn,
            statements: hashlink::LruCache::new(PREPARED),
        }
    }

    /// The connection, for what is not a statement with values (a transaction's start
    /// and end).
    pub(super) fn conn(&self) -> &'c rusqlite::Connection {
        self.conn
    }

    /// `sql`, prepared when first run, with `params` bound to `$1`, `$2`, ….
    fn bound(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
    ) -> Result<&mut rusqlite::Statement<'c>, StoreError> {
        let prepared = match self.statements.raw_entry_mut().from_key(sql) {
            RawEntryMut::Occupied(mut entry) => {
                entry.to_back();
                entry.into_mut()
            }
            RawEntryMut::Vacant(entry) => {
                entry
                    .insert(sql.to_owned(), Prepared::new(self.conn, sql)?)
                    .1
            }
        };
        for (index, position) in prepared.positions.iter().enumerate() {
            let param = params.get(*position).ok_or_else(|| {
                StoreError::Corrupt(format!("no value for ${} of `{sql}`", position + 1))
            })?;
            let statement = &mut prepared.statement;
            match *param {
                Param::Int(value) => statement.raw_bind_parameter(index + 1, value)?,
                Param::Text(value) => statement.raw_bind_parameter(index + 1, value)?,
            }
        }
        Ok(&mut prepared.statement)
    }
}

impl<'c> Prepared<'c> {
    /// `sql` prepared on `conn`. SQLite numbers named parameters by their first appearance,
    /// not by the number in their name: each is mapped to its `$N` here, once.
    fn new(conn: &'c rusqlite::Connection, sql: &str) -> Result<Self, StoreError> {
        let statement =
            conn.prepare_with_flags(sql, rusqlite::PrepFlags::SQLITE_PREPARE_PERSISTENT)?;
        let positions = (1..=statement.parameter_count())
            .map(|index| {
                statement
                    .parameter_name(index)
                    .and_then(|name| name.strip_prefix('$'))
                    .and_then(|number| number.parse::<usize>().ok())
                    .and_then(|number| number.checked_sub(1))
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("parameter {index} of `{sql}` is not $N"))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            statement,
            positions,
        })
    }
}

/// The writer calls SQLite itself: every future here is ready at once.
impl Exec for Writing<'_> {
    async fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        Ok(self.bound(sql, params)?.raw_execute()? as u64)
    }

    /// One row per run of a one-row statement, prepared once. A statement that inserts
    /// several rows may fail after some, so SQLite opens a statement journal for it and
    /// copies there (4 KiB each) the pages it changes that the transaction had already
    /// changed: dearer than the runs. A failed row still fails the whole write, which the
    /// writer then undoes alone.
    async fn insert_rows<const N: usize>(
        &mut self,
        head: &str,
        rows: &[[Param<'_>; N]],
        tail: &str,
    ) -> Result<u64, StoreError> {
        let sql = insert_sql(head, 1, N, tail);
        let mut inserted = 0;
        for row in rows {
            inserted += self.bound(&sql, row)?.raw_execute()? as u64;
        }
        Ok(inserted)
    }

    /// SQLite keeps a `RETURNING` clause's rows in a temporary table: the id SQLite gave
    /// the row is read back without one.
    async fn insert_id(&mut self, sql: &str, params: &[Param<'_>]) -> Result<i64, StoreError> {
        self.bound(sql, params)?.raw_execute()?;
        Ok(self.conn.last_insert_rowid())
    }

    async fn fetch(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let statement = self.bound(sql, params)?;
        let columns = statement.column_count();
        let mut rows = statement.raw_query();
        let mut read = Vec::new();
        while let Some(row) = rows.next()? {
            let cells = (0..columns)
                .map(|index| {
                    Ok(match row.get_ref(index)? {
                        rusqlite::types::ValueRef::Null => Cell::Null,
                        rusqlite::types::ValueRef::Integer(value) => Cell::Int(value),
                        rusqlite::types::ValueRef::Text(text) => Cell::Text(
                            String::from_utf8(text.to_vec())
                                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                        ),
                        _ => return Err(mismatch(index, "an integer or text")),
                    })
                })
                .collect::<Result<_, StoreError>>()?;
            read.push(Row(cells));
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::ready;

    #[test]
    fn the_writer_binds_by_number_and_prepares_again_what_it_let_go() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (a INTEGER, b TEXT)")
            .unwrap();
        let mut writing = Writing::new(&conn);
        // `$2` comes first, and SQLite numbers it 1: each value still goes to its `$N`.
        let insert = "INSERT INTO t (b, a) VALUES ($2, $1)";
        for n in 0..3 {
            ready(writing.execute(insert, &params![n, "x"])).unwrap();
        }
        // More statements than are kept: the first is let go, and prepared again when run.
        for n in 0..=PREPARED as i64 {
            let sql = format!("SELECT COUNT(*) FROM t WHERE a >= $1 AND {n} = {n}");
            ready(writing.fetch_one(&sql, &params![1])).unwrap();
        }
        assert!(!writing.statements.contains_key(insert));
        ready(writing.execute(insert, &params![7, "y"])).unwrap();
        let row = ready(writing.fetch_one(
            "SELECT COUNT(*), MAX(a) FROM t WHERE b = $2 OR a = $1",
            &params![7, "x"],
        ))
        .unwrap();
        assert_eq!((row.int(0).unwrap(), row.int(1).unwrap()), (4, 7));
        let missing = ready(writing.execute(insert, &params![1])).unwrap_err();
        assert!(missing.to_string().contains("no value for $2"), "{missing}");
    }
}

//! The SQLite side of the log: schema and migrations, batch append with dedupe by
//! id, paged reads, small durable key/values (cursors) and admitted devices.
//! Nothing else in the hub runs SQL against a realm's database.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::event::{encode_stored, NewEvent, Origin};

/// The schema version this build writes. Migrations only ever add tables, columns
/// or indexes, so an older hub (after a rollback) still opens a newer database.
pub const SCHEMA_VERSION: i64 = 1;

/// A database problem; the message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open event log {path}: {source} (check that the data partition is mounted read-write and not full)")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("event log {path} is not a pos-hub database or is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("event log error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Thread(String),
}

/// One row as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub seq: u64,
    pub json: String,
}

/// WAL pages after which the writer checkpoints by itself (only if the
/// checkpointer thread falls behind: about 40 MiB).
const WRITER_AUTOCHECKPOINT: i64 = 10_000;

/// An open realm database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events(
    seq       INTEGER PRIMARY KEY,
    id        TEXT NOT NULL UNIQUE,
    type      TEXT NOT NULL,
    payload   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    ts        TEXT,
    hub_ts    INTEGER NOT NULL,
    origin    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta(
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS set_aside(
    seq    INTEGER PRIMARY KEY,
    id     TEXT NOT NULL,
    reason TEXT NOT NULL,
    at     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices(
    device_id  TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    token_exp  INTEGER NOT NULL
);
";

/// Encodes one `SELECT seq, id, type, payload, device_id, ts, hub_ts, origin` row.
fn row_json(r: &rusqlite::Row<'_>) -> Result<(u64, String), rusqlite::Error> {
    let seq = r.get::<_, i64>(0)? as u64;
    let ts: Option<String> = r.get(5)?;
    let json = encode_stored(
        seq,
        r.get_ref(1)?.as_str().unwrap_or_default(),
        r.get_ref(2)?.as_str().unwrap_or_default(),
        r.get_ref(3)?.as_str().unwrap_or("null"),
        r.get_ref(4)?.as_str().unwrap_or_default(),
        ts.as_deref(),
        r.get(6)?,
        Origin::from_i64(r.get(7)?),
    );
    Ok((seq, json))
}

impl Store {
    /// Opens (creating if needed) the writable database at `path`: WAL, FULL sync.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| LogError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let conn = Connection::open(path).map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let corrupt = |source| LogError::Corrupt {
            path: path.to_path_buf(),
            source,
        };
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(corrupt)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(corrupt)?;
        // The writer folds the WAL back only as a backstop; a checkpointer thread
        // (see `writer::Checkpointer`) does it beside the writer so commits (and
        // the acks waiting on them) never wait for a checkpoint.
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)
            .map_err(corrupt)?;
        conn.pragma_update(None, "foreign_keys", "OFF")
            .map_err(corrupt)?;
        conn.execute_batch(SCHEMA).map_err(corrupt)?;
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(corrupt)?;
        if v < SCHEMA_VERSION {
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(corrupt)?;
        }
        // Test builds of a later version (image/build --test-schema-v2) carry a
        // migration this version does not: it must stay additive (new tables, new
        // nullable columns) so that an older slot still opens the database after a
        // rollback. The older hub only ever raises user_version, never lowers it.
        if Path::new("/etc/pos-hub/test-schema-v2").exists() && v < 2 {
            conn.execute_batch(
                "ALTER TABLE events ADD COLUMN v2_note TEXT;
                 CREATE TABLE IF NOT EXISTS v2_notes(seq INTEGER PRIMARY KEY, note TEXT NOT NULL);
                 PRAGMA user_version = 2;",
            )
            .map_err(corrupt)?;
        }
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Opens the database read-only (for replay and `sync` pages beside the writer).
    pub fn open_reader(path: &Path) -> Result<Self, LogError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn last_seq(&self) -> Result<u64, LogError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// Counts LAN events after `seq` (the outbox depth behind a cursor).
    pub fn count_lan_after(&self, seq: u64) -> Result<u64, LogError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM events WHERE seq > ?1 AND origin = 0",
            [seq as i64],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    pub fn begin(&mut self) -> Result<(), LogError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(())
    }

    pub fn commit(&mut self) -> Result<(), LogError> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    pub fn rollback(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
    }

    /// Inserts one event inside the open transaction with `seq`. Returns `Ok(None)`
    /// if it was stored, `Ok(Some(seq))` with the original seq if the id exists.
    pub fn insert(
        &mut self,
        seq: u64,
        ev: &NewEvent,
        device_id: &str,
        hub_ts: i64,
        origin: Origin,
    ) -> Result<Option<u64>, LogError> {
        let n = {
            let mut st = self.conn.prepare_cached(
                "INSERT INTO events(seq, id, type, payload, device_id, ts, hub_ts, origin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(id) DO NOTHING",
            )?;
            st.execute(params![
                seq as i64,
                ev.id(),
                ev.typ(),
                ev.payload(),
                device_id,
                ev.ts(),
                hub_ts,
                origin as i64
            ])?
        };
        if n == 1 {
            return Ok(None);
        }
        let mut st = self
            .conn
            .prepare_cached("SELECT seq FROM events WHERE id = ?1")?;
        let orig: i64 = st.query_row([ev.id()], |r| r.get(0))?;
        Ok(Some(orig as u64))
    }

    /// The seq of the event with `id`, if stored.
    pub fn seq_of(&self, id: &str) -> Result<Option<u64>, LogError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT seq FROM events WHERE id = ?1")?;
        Ok(st
            .query_row([id], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|s| s as u64))
    }

    /// Calls `f` for each event with `after < seq <= upto`, in seq order, at most
    /// `limit` of them, encoded as devices receive them. Returns how many.
    pub fn read_page(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        mut f: impl FnMut(u64, String),
    ) -> Result<usize, LogError> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, id, type, payload, device_id, ts, hub_ts, origin FROM events
             WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
        )?;
        let mut rows = st.query(params![
            after as i64,
            upto.min(i64::MAX as u64) as i64,
            limit as i64
        ])?;
        let mut n = 0;
        while let Some(r) = rows.next()? {
            let (seq, json) = row_json(r)?;
            f(seq, json);
            n += 1;
        }
        Ok(n)
    }

    /// LAN events after `after`, in seq order, at most `limit` of them and about
    /// `max_bytes` of JSON (always at least one): the outbox of the cloud bridge.
    pub fn read_lan_page(
        &self,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, String)>, LogError> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, id, type, payload, device_id, ts, hub_ts, origin FROM events
             WHERE seq > ?1 AND origin = 0 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = st.query(params![after as i64, limit as i64])?;
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(r) = rows.next()? {
            let (seq, json) = row_json(r)?;
            if !out.is_empty() && bytes + json.len() > max_bytes {
                break;
            }
            bytes += json.len() + 1;
            out.push((seq, json));
        }
        Ok(out)
    }

    /// Records an event the cloud refused, so it no longer blocks the outbox.
    pub fn set_aside(&mut self, seq: u64, id: &str, reason: &str, at: i64) -> Result<(), LogError> {
        self.conn.execute(
            "INSERT INTO set_aside(seq, id, reason, at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(seq) DO UPDATE SET reason = excluded.reason, at = excluded.at",
            params![seq as i64, id, reason, at],
        )?;
        Ok(())
    }

    /// The events set aside, newest first, at most `limit`.
    /// The database's schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64, LogError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// The last seq stored before `hub_ts_ms` (0 if none). Scans back from the newest
    /// event, so it costs as many rows as were stored since then (callers cache it).
    pub fn last_seq_before(&self, hub_ts_ms: i64) -> Result<u64, LogError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM events WHERE hub_ts < ?1 ORDER BY seq DESC LIMIT 1",
                [hub_ts_ms],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    pub fn set_aside_list(
        &self,
        limit: usize,
    ) -> Result<Vec<(u64, String, String, i64)>, LogError> {
        let mut st = self
            .conn
            .prepare("SELECT seq, id, reason, at FROM set_aside ORDER BY seq DESC LIMIT ?1")?;
        let v = st
            .query_map([limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(v)
    }

    pub fn meta_get(&self, key: &str) -> Result<Option<String>, LogError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn meta_set(&mut self, key: &str, value: &str) -> Result<(), LogError> {
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    /// Records that a device was admitted (for offline grace after its token expires).
    pub fn admit(
        &mut self,
        device_id: &str,
        role: &str,
        token_exp: i64,
        now: i64,
    ) -> Result<(), LogError> {
        self.conn
            .prepare_cached(
                "INSERT INTO devices(device_id, role, first_seen, last_seen, token_exp) VALUES (?1, ?2, ?3, ?3, ?4)
                 ON CONFLICT(device_id) DO UPDATE SET role = excluded.role, last_seen = excluded.last_seen,
                 token_exp = MAX(token_exp, excluded.token_exp)",
            )?
            .execute(params![device_id, role, now, token_exp])?;
        Ok(())
    }

    /// Every admitted device id.
    pub fn admitted(&self) -> Result<Vec<String>, LogError> {
        let mut st = self.conn.prepare("SELECT device_id FROM devices")?;
        let v = st
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(v)
    }

    /// Checks that the database can still be written (for `/healthz`).
    pub fn check_writable(&mut self) -> Result<(), LogError> {
        self.conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")?;
        Ok(())
    }

    /// Opens a connection that only checkpoints (beside the writer).
    pub fn open_checkpointer(path: &Path) -> Result<Self, LogError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Copies what it can of the WAL into the main file without blocking the
    /// writer or readers. Returns the WAL's frames and how many are now copied.
    pub fn checkpoint_passive(&self) -> Result<(i64, i64), LogError> {
        Ok(self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })?)
    }

    /// Folds the WAL into the main file (at shutdown).
    pub fn checkpoint(&self) -> Result<(), LogError> {
        self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        Ok(())
    }

    /// Events with seq > `after` stored at or after `from_ms`, counted per hour since
    /// `from_ms`: `(hour index, count)`, and the highest seq counted (the status
    /// page's events-per-hour chart; callers count only what is new since last time).
    pub fn counts_by_hour(
        &self,
        after: u64,
        from_ms: i64,
    ) -> Result<(Vec<(i64, u64)>, u64), LogError> {
        let mut st = self.conn.prepare_cached(
            "SELECT (hub_ts - ?2) / 3600000 AS h, COUNT(*), MAX(seq) FROM events
             WHERE seq > ?1 AND hub_ts >= ?2 GROUP BY h",
        )?;
        let mut rows = st.query(params![after as i64, from_ms])?;
        let (mut out, mut max) = (Vec::new(), after);
        while let Some(r) = rows.next()? {
            out.push((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64));
            max = max.max(r.get::<_, i64>(2)? as u64);
        }
        Ok((out, max))
    }

    /// When the oldest LAN event above `seq` was stored (the cloud bridge's lag).
    pub fn oldest_lan_after(&self, seq: u64) -> Result<Option<i64>, LogError> {
        Ok(self
            .conn
            .query_row(
                "SELECT hub_ts FROM events WHERE seq > ?1 AND origin = 0 ORDER BY seq LIMIT 1",
                [seq as i64],
                |r| r.get(0),
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str) -> NewEvent {
        NewEvent::new(id, "t", r#"{"n":1}"#, None).unwrap()
    }

    #[test]
    fn opens_a_database_a_later_version_migrated_additively() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        {
            let mut s = Store::open(&p).unwrap();
            s.begin().unwrap();
            s.insert(1, &ev("a"), "d1", 10, Origin::Lan).unwrap();
            s.commit().unwrap();
        }
        {
            // What a later version might do: a new nullable column, a new table, a higher version.
            let c = Connection::open(&p).unwrap();
            c.execute_batch("ALTER TABLE events ADD COLUMN later TEXT; CREATE TABLE later_t(x); PRAGMA user_version = 7;").unwrap();
        }
        let mut s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), 7, "never lowered");
        s.begin().unwrap();
        assert_eq!(s.insert(2, &ev("b"), "d1", 11, Origin::Lan).unwrap(), None);
        s.commit().unwrap();
        let mut got = vec![];
        Store::open_reader(&p)
            .unwrap()
            .read_page(0, u64::MAX, 10, |seq, _| got.push(seq))
            .unwrap();
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn append_dedupe_and_page() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        let mut s = Store::open(&p).unwrap();
        s.begin().unwrap();
        assert_eq!(s.insert(1, &ev("a"), "d1", 10, Origin::Lan).unwrap(), None);
        assert_eq!(s.insert(2, &ev("b"), "d1", 10, Origin::Lan).unwrap(), None);
        assert_eq!(
            s.insert(3, &ev("a"), "d2", 11, Origin::Lan).unwrap(),
            Some(1)
        );
        s.commit().unwrap();
        assert_eq!(s.last_seq().unwrap(), 2);
        let r = Store::open_reader(&p).unwrap();
        let mut got = vec![];
        r.read_page(0, u64::MAX, 10, |seq, json| got.push((seq, json)))
            .unwrap();
        assert_eq!(got.len(), 2);
        assert!(got[0].1.contains(r#""deviceId":"d1""#));
        let mut got = vec![];
        r.read_page(1, u64::MAX, 10, |seq, _| got.push(seq))
            .unwrap();
        assert_eq!(got, vec![2]);
        let mut got = vec![];
        r.read_page(0, 1, 10, |seq, _| got.push(seq)).unwrap();
        assert_eq!(got, vec![1]);
        assert_eq!(s.count_lan_after(0).unwrap(), 2);
    }

    #[test]
    fn reopen_keeps_data_and_meta() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        {
            let mut s = Store::open(&p).unwrap();
            s.begin().unwrap();
            s.insert(1, &ev("a"), "d", 1, Origin::Cloud).unwrap();
            s.commit().unwrap();
            s.meta_set("cloud_cursor", "abc").unwrap();
            s.admit("d", "till", 100, 5).unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.last_seq().unwrap(), 1);
        assert_eq!(s.meta_get("cloud_cursor").unwrap().as_deref(), Some("abc"));
        assert_eq!(s.admitted().unwrap(), vec!["d".to_string()]);
        assert_eq!(s.count_lan_after(0).unwrap(), 0);
    }

    #[test]
    fn corrupt_file_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        std::fs::write(&p, vec![0x42u8; 8192]).unwrap();
        let e = Store::open(&p).err().unwrap().to_string();
        assert!(e.contains("r.db"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x42u8; 8192]);
    }
}

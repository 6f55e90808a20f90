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

impl LogError {
    /// True when SQLite reported the disk full (`SQLITE_FULL`: it maps a write's
    /// `ENOSPC` to that code).
    pub fn is_full(&self) -> bool {
        let e = match self {
            LogError::Open { source, .. } | LogError::Corrupt { source, .. } => source,
            LogError::Sql(e) => e,
            LogError::Thread(_) => return false,
        };
        matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull)
    }

    /// True for an I/O error reported by SQLite (`SQLITE_IOERR_*`): with the
    /// partition out of space this is how a failed fsync or truncate shows.
    pub fn is_io(&self) -> bool {
        matches!(self, LogError::Sql(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::SystemIoFailure)
    }
}

/// One row as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub seq: u64,
    pub json: String,
}

/// The meta key of the bridge's durable pushed cursor (written by `bridge::push`).
pub const PUSHED_CURSOR_KEY: &str = "bridge.pushed_cursor";
/// The meta key of the highest seq retention deleted.
pub const PRUNED_KEY: &str = "log.pruned_through";

/// WAL pages after which the writer checkpoints by itself (only if the
/// checkpointer thread falls behind: about 40 MiB).
const WRITER_AUTOCHECKPOINT: i64 = 10_000;

/// An open realm database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// Inserts events inside the writer's open transaction ([`Store::inserter`]).
pub struct Inserter<'a> {
    st: rusqlite::CachedStatement<'a>,
    conn: &'a Connection,
}

impl Inserter<'_> {
    /// Inserts one event with `seq`. Returns `Ok(None)` if it was stored,
    /// `Ok(Some(seq))` with the original seq if the id exists.
    pub fn insert(
        &mut self,
        seq: u64,
        ev: &NewEvent,
        device_id: &str,
        hub_ts: i64,
        origin: Origin,
    ) -> Result<Option<u64>, LogError> {
        let n = self.st.execute(params![
            seq as i64,
            ev.id(),
            ev.typ(),
            ev.payload(),
            device_id,
            ev.ts(),
            hub_ts,
            origin as i64
        ])?;
        if n == 1 {
            return Ok(None);
        }
        let mut st = self
            .conn
            .prepare_cached("SELECT seq FROM events WHERE id = ?1")?;
        let orig: i64 = st.query_row([ev.id()], |r| r.get(0))?;
        Ok(Some(orig as u64))
    }
}

/// The `meta` key of [`Store::ensure_log_id`].
pub const LOG_ID_KEY: &str = "log_id";

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
        // A new database returns the pages the pruner frees to the file system
        // (auto_vacuum can only be chosen before the first table exists).
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(corrupt)?;
        if pages == 0 {
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(corrupt)?;
        }
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
        // After a burst the WAL file keeps its largest size unless told: truncate it
        // to 4 MiB whenever it restarts from the beginning.
        conn.pragma_update(None, "journal_size_limit", 4 << 20)
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
        let mut store = Self {
            conn,
            path: path.to_path_buf(),
        };
        store.convert_to_incremental_vacuum();
        Ok(store)
    }

    /// A database made before retention existed has `auto_vacuum=NONE`: pages the
    /// pruner frees are reused by new events but never returned to the file system.
    /// Switching needs one `VACUUM` (a full copy), done here only while the file is
    /// small enough to copy in a few seconds and the partition has room for it;
    /// otherwise the file keeps its size (it stops growing once retention prunes).
    /// `auto_vacuum` is a file-header setting, not a schema change: an older hub
    /// (after a rollback) opens and writes the converted file unchanged.
    fn convert_to_incremental_vacuum(&mut self) {
        const MAX_CONVERT: u64 = 64 << 20;
        let mode: i64 = self
            .conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap_or(2);
        if mode != 0 {
            return;
        }
        let size = self.db_bytes();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let room = crate::util::fs_space(dir).is_some_and(|(_, free)| free > 3 * size + (8 << 20));
        if size > MAX_CONVERT || !room {
            tracing::info!(path = %self.path.display(), bytes = size, "event log keeps auto_vacuum=none (too large to convert now, or no room): freed pages are reused, not returned");
            return;
        }
        let t = std::time::Instant::now();
        match self
            .conn
            .execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
        {
            Ok(()) => {
                tracing::info!(path = %self.path.display(), bytes = size, ms = t.elapsed().as_millis() as u64, "event log converted to incremental vacuum")
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not convert the event log to incremental vacuum; freed pages are reused instead")
            }
        }
    }

    /// Bytes of the database on disk: the main file and its WAL.
    pub fn db_bytes(&self) -> u64 {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        len(&self.path) + len(Path::new(&wal))
    }

    /// The oldest seq still stored (`None` while the log is empty).
    pub fn oldest_seq(&self) -> Result<Option<u64>, LogError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT MIN(seq) FROM events", [], |r| r.get(0))?;
        Ok(v.map(|s| s as u64))
    }

    /// Deletes, in one short transaction, at most `max` of the oldest events that
    /// are older than `cutoff_ms` (hub time) and, when `bridged`, at or below the
    /// durable pushed cursor (never an event still in the cloud outbox). Only a
    /// prefix of the log is ever deleted, so what is kept stays contiguous, and the
    /// newest event is always kept so the next seq survives a restart (in this
    /// version and an older one). Returns how many went and the oldest seq kept.
    pub fn prune_batch(
        &mut self,
        cutoff_ms: i64,
        bridged: bool,
        max: usize,
    ) -> Result<(u64, Option<u64>), LogError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let r = (|| {
            let last = self.last_seq()?;
            let cap = if bridged {
                self.meta_get(PUSHED_CURSOR_KEY)?
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            } else {
                u64::MAX
            };
            let mut upto = None;
            {
                let mut st = self
                    .conn
                    .prepare_cached("SELECT seq, hub_ts FROM events ORDER BY seq LIMIT ?1")?;
                let mut rows = st.query([max as i64])?;
                while let Some(r) = rows.next()? {
                    let seq = r.get::<_, i64>(0)? as u64;
                    let ts: i64 = r.get(1)?;
                    if ts >= cutoff_ms || seq > cap || seq >= last {
                        break;
                    }
                    upto = Some(seq);
                }
            }
            let n = match upto {
                Some(x) => {
                    let n = self
                        .conn
                        .execute("DELETE FROM events WHERE seq <= ?1", [x as i64])?;
                    self.meta_set(PRUNED_KEY, &x.to_string())?;
                    n as u64
                }
                None => 0,
            };
            Ok((n, self.oldest_seq()?))
        })();
        match r {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Returns up to `pages` free pages to the file system (incremental vacuum;
    /// a no-op on a database without it). Returns the free pages left.
    pub fn vacuum_some(&mut self, pages: u32) -> Result<i64, LogError> {
        // The pragma returns one row per page it frees: step it to the end
        // (execute_batch would step once and free a single page).
        {
            let mut st = self
                .conn
                .prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
            let mut rows = st.query([])?;
            while rows.next()?.is_some() {}
        }
        Ok(self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?)
    }

    /// The database's `auto_vacuum` mode: 0 none, 1 full, 2 incremental.
    pub fn auto_vacuum(&self) -> Result<i64, LogError> {
        Ok(self
            .conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?)
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

    #[cfg(test)]
    pub(crate) fn conn_for_test(&self) -> &Connection {
        &self.conn
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

    /// The insert statement, taken once for a run of events: each `prepare_cached`
    /// hashes the SQL and allocates its cache key, once per event otherwise.
    pub fn inserter(&self) -> Result<Inserter<'_>, LogError> {
        Ok(Inserter {
            st: self.conn.prepare_cached(
                "INSERT INTO events(seq, id, type, payload, device_id, ts, hub_ts, origin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(id) DO NOTHING",
            )?,
            conn: &self.conn,
        })
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

    /// The identity of this log: 32 hex digits drawn when the database got its first
    /// writer, kept in `meta` for its life. A factory reset or a new box starts a new
    /// log (seqs from 1 again) with a new id; devices compare it with the one their
    /// cursor belongs to.
    pub fn ensure_log_id(&mut self) -> Result<String, LogError> {
        if let Some(id) = self.meta_get(LOG_ID_KEY)? {
            return Ok(id);
        }
        use ring::rand::SecureRandom;
        let mut b = [0u8; 16];
        ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| {
            LogError::Thread("no randomness for the log id (getrandom failed)".into())
        })?;
        let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
        self.conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES (?1, ?2)",
            [LOG_ID_KEY, &id],
        )?;
        Ok(self.meta_get(LOG_ID_KEY)?.unwrap_or(id))
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
            s.inserter()
                .unwrap()
                .insert(1, &ev("a"), "d1", 10, Origin::Lan)
                .unwrap();
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
        assert_eq!(
            s.inserter()
                .unwrap()
                .insert(2, &ev("b"), "d1", 11, Origin::Lan)
                .unwrap(),
            None
        );
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
        assert_eq!(
            s.inserter()
                .unwrap()
                .insert(1, &ev("a"), "d1", 10, Origin::Lan)
                .unwrap(),
            None
        );
        assert_eq!(
            s.inserter()
                .unwrap()
                .insert(2, &ev("b"), "d1", 10, Origin::Lan)
                .unwrap(),
            None
        );
        assert_eq!(
            s.inserter()
                .unwrap()
                .insert(3, &ev("a"), "d2", 11, Origin::Lan)
                .unwrap(),
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
            s.inserter()
                .unwrap()
                .insert(1, &ev("a"), "d", 1, Origin::Cloud)
                .unwrap();
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

    /// Retention deletes only an old prefix, never above the pushed cursor when
    /// bridged, never the newest event; the freed pages go back to the file system.
    #[test]
    fn prune_keeps_the_outbox_the_newest_event_and_shrinks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        let mut s = Store::open(&p).unwrap();
        assert_eq!(
            s.auto_vacuum().unwrap(),
            2,
            "new databases use incremental vacuum"
        );
        let big = format!("\"{}\"", "x".repeat(2000));
        s.begin().unwrap();
        for i in 1..=3000u64 {
            let ev = NewEvent::new(&format!("e{i}"), "t", &big, None).unwrap();
            // Events 1..=2000 are old (hub_ts 1000), the rest new (hub_ts 10_000).
            let ts = if i <= 2000 { 1000 } else { 10_000 };
            s.inserter()
                .unwrap()
                .insert(i, &ev, "d", ts, Origin::Lan)
                .unwrap();
        }
        s.commit().unwrap();
        s.checkpoint().unwrap();
        let before = s.db_bytes();
        // Bridged, cursor at 700: nothing above it goes even though it is old.
        s.meta_set(PUSHED_CURSOR_KEY, "700").unwrap();
        assert_eq!(s.prune_batch(5000, true, 500).unwrap(), (500, Some(501)));
        assert_eq!(s.prune_batch(5000, true, 500).unwrap(), (200, Some(701)));
        assert_eq!(s.prune_batch(5000, true, 500).unwrap(), (0, Some(701)));
        // Without a cloud, every old event goes, in batches; new ones stay.
        while s.prune_batch(5000, false, 500).unwrap().0 > 0 {}
        assert_eq!(s.oldest_seq().unwrap(), Some(2001));
        assert_eq!(s.meta_get(PRUNED_KEY).unwrap().as_deref(), Some("2000"));
        // Everything old: the newest event is still kept (the next seq survives).
        while s.prune_batch(i64::MAX, false, 500).unwrap().0 > 0 {}
        assert_eq!(s.oldest_seq().unwrap(), Some(3000));
        assert_eq!(s.last_seq().unwrap(), 3000);
        while s.vacuum_some(256).unwrap() > 0 {}
        s.checkpoint().unwrap();
        let after = s.db_bytes();
        assert!(after * 10 < before, "file {before} -> {after} bytes");
    }

    /// A database made before retention (auto_vacuum none) is converted once.
    #[test]
    fn an_old_database_is_converted_to_incremental_vacuum() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch("PRAGMA journal_mode=WAL;").unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c.execute_batch("PRAGMA user_version = 1").unwrap();
            let v: i64 = c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap();
            assert_eq!(v, 0);
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.auto_vacuum().unwrap(), 2);
        assert_eq!(s.schema_version().unwrap(), 1);
    }

    #[test]
    fn the_log_id_is_drawn_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let id = Store::open(&path).unwrap().ensure_log_id().unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let mut again = Store::open(&path).unwrap();
        assert_eq!(again.ensure_log_id().unwrap(), id);
        assert_eq!(again.ensure_log_id().unwrap(), id);
        let other = Store::open(&dir.path().join("other.db"))
            .unwrap()
            .ensure_log_id()
            .unwrap();
        assert_ne!(other, id);
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

//! The embedded store of standalone mode: SQLite through sqlx, in a data
//! directory, with in-memory caches of what every message needs (users,
//! group membership, token generations).
//!
//! Writes of messages go through one writer task that commits whatever is
//! waiting in one transaction (group commit): many concurrent senders share
//! one fsync, and a message is acknowledged only after its commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::error::{Error, Result};
use async_trait::async_trait;

use super::{
    push_devices_sql, ConversationRow, Device, Directory, Durability, FileRow, GroupChanges,
    GroupInfo, GroupState, History, Profile, PushDevice, Role, Taken, USERS_PER_QUERY,
};

/// Column `i` of `row` as text.
fn text(row: &sqlx::sqlite::SqliteRow, i: usize) -> Result<String> {
    Ok(row.try_get(i)?)
}

/// A value bound into a group change's statement.
enum Bind<'a> {
    Int(i64),
    Text(&'a str),
}
use crate::model::{now_ms, AckInfo, ImError, Sequenced};

struct WriteJob {
    messages: Vec<Sequenced>,
    done: oneshot::Sender<Result<Taken, String>>,
}

pub struct SqliteStore {
    /// The data directory.
    dir: PathBuf,
    write: SqlitePool,
    read: SqlitePool,
    writer: mpsc::Sender<WriteJob>,
    users: DashMap<Arc<str>, ()>,
    groups: DashMap<Arc<str>, Arc<GroupState>>,
    /// Membership changes are serialised so the cache and the table agree.
    group_writes: Mutex<()>,
    generations: DashMap<(Arc<str>, u8), u64>,
    /// Who blocks whom (asked on every single-chat send).
    blocks: DashMap<Arc<str>, std::collections::HashSet<Arc<str>>>,
}

/// Rows per multi-row INSERT of new chats: at 2 parameters a row, far below
/// SQLite's limit. (Messages: `commit_statements`.)
const ROWS_PER_STATEMENT: usize = 128;
/// The writer connection's page cache (`PRAGMA cache_size`, negative: KiB).
const WRITER_CACHE: &str = "-4096";
/// Most messages one group commit takes.
const MAX_COMMIT: usize = 4096;

impl SqliteStore {
    /// The data directory it lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Open with no commit delay (every commit goes as soon as the writer
    /// is free).
    pub async fn open(dir: &Path, durability: Durability) -> Result<Arc<SqliteStore>> {
        Self::open_with(dir, durability, Duration::ZERO).await
    }

    /// Open, holding a commit open up to `commit_delay` for more messages
    /// while they arrive faster than one per `commit_delay` (see
    /// [`Gather`]).
    pub async fn open_with(
        dir: &Path,
        durability: Durability,
        commit_delay: Duration,
    ) -> Result<Arc<SqliteStore>> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Open {
            path: dir.display().to_string(),
            source,
        })?;
        let file = dir.join("imflow.db");
        let base = SqliteConnectOptions::from_str("sqlite://")?
            .filename(&file)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(10))
            // Statement journals of multi-row inserts stay in memory.
            .pragma("temp_store", "memory");
        // The writer's cache stays small: SQLite scans the whole page cache
        // at the end of many write transactions (pcache1TruncateUnsafe), a
        // cost that grows with its size (8.7% of the server's CPU at 8,000
        // msg/s with 64 MiB), while a page it misses is one read from the
        // OS's cache.
        // No ping before each use (`test_before_acquire`): it is a round
        // trip to the connection's worker thread, and an open SQLite file
        // does not go stale as a socket does. (sqlx still pings each
        // connection on its way back to the pool: a call to its worker
        // thread, off the next user's path unless that one waits for this
        // very connection, as the writer's next commit does.)
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(base.clone().pragma("cache_size", WRITER_CACHE))
            .await?;
        sqlx::migrate!("./migrations").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            // Helps reads between commits only: in WAL mode a reader drops
            // its whole cache when it starts after another connection's
            // commit, so under steady writes this is mostly unused.
            .connect_with(base.read_only(true).pragma("cache_size", "-65536"))
            .await?;

        let users = DashMap::new();
        for row in sqlx::query("SELECT user_id FROM users")
            .fetch_all(&read)
            .await?
        {
            let id: String = row.try_get(0)?;
            users.insert(Arc::from(id), ());
        }
        let generations = DashMap::new();
        for row in sqlx::query("SELECT user_id, platform, generation FROM token_generations")
            .fetch_all(&read)
            .await?
        {
            let user: String = row.try_get(0)?;
            let platform: i64 = row.try_get(1)?;
            let generation: i64 = row.try_get(2)?;
            generations.insert((Arc::from(user), platform as u8), generation as u64);
        }
        let blocks: DashMap<Arc<str>, std::collections::HashSet<Arc<str>>> = DashMap::new();
        for row in sqlx::query("SELECT user_id, blocked_id FROM blocks")
            .fetch_all(&read)
            .await?
        {
            let user: String = row.try_get(0)?;
            let other: String = row.try_get(1)?;
            blocks
                .entry(Arc::from(user))
                .or_default()
                .insert(Arc::from(other));
        }
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(message_writer(write.clone(), rx, Gather::new(commit_delay)));
        tracing::info!(path = %file.display(), users = users.len(), ?durability, "embedded store open");
        Ok(Arc::new(SqliteStore {
            dir: dir.to_path_buf(),
            write,
            read,
            writer: tx,
            users,
            groups: DashMap::new(),
            group_writes: Mutex::new(()),
            generations,
            blocks,
        }))
    }

    /// The pool that sees every commit (one connection: writes queue).
    pub(crate) fn write_pool(&self) -> &SqlitePool {
        &self.write
    }

    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.write)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    async fn load_group(&self, group_id: &str) -> Result<Option<GroupState>> {
        let Some(row) = sqlx::query(
            "SELECT name, owner, notice, avatar_url, muted, dismissed FROM groups WHERE group_id = ?",
        )
        .bind(group_id)
        .fetch_optional(&self.write)
        .await?
        else {
            return Ok(None);
        };
        let info = GroupInfo {
            name: row.try_get(0)?,
            owner: row.try_get(1)?,
            notice: row.try_get(2)?,
            avatar_url: row.try_get(3)?,
            muted: row.try_get::<i64, _>(4)? != 0,
            dismissed: row.try_get::<i64, _>(5)? != 0,
        };
        let rows = sqlx::query(
            "SELECT user_id, role, min_seq, muted_until FROM group_members WHERE group_id = ? \
             ORDER BY joined_at, user_id",
        )
        .bind(group_id)
        .fetch_all(&self.write)
        .await?;
        let members = rows
            .into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(GroupState::from_rows(group_id, info, members)))
    }

    /// Run `sql` (binding the group id last) as one change of the group,
    /// then reload it.
    async fn change_group(&self, group_id: &str, sql: &str, binds: &[Bind<'_>]) -> Result<()> {
        let _guard = self.group_writes.lock().await;
        let mut q = sqlx::query(sql);
        for b in binds {
            q = match b {
                Bind::Int(v) => q.bind(*v),
                Bind::Text(v) => q.bind(*v),
            };
        }
        q.bind(group_id).execute(&self.write).await?;
        self.refresh_group(group_id).await
    }

    async fn refresh_group(&self, group_id: &str) -> Result<()> {
        match self.load_group(group_id).await? {
            Some(s) => {
                self.groups.insert(s.group_id.clone(), Arc::new(s));
            }
            None => {
                self.groups.remove(group_id);
            }
        }
        Ok(())
    }

    fn check_users_exist(&self, users: &[String]) -> Result<(), ImError> {
        let unknown: Vec<&str> = users
            .iter()
            .filter(|u| !self.users.contains_key(u.as_str()))
            .map(String::as_str)
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(ImError::not_found(format!(
                "unknown users: {}",
                unknown.join(", ")
            )))
        }
    }
}

#[async_trait]
impl Directory for SqliteStore {
    /// Store `value` unless the key already has one; returns the value in force.
    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query("INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&self.write)
            .await?;
        Ok(self
            .setting(key)
            .await?
            .unwrap_or_else(|| value.to_string()))
    }

    async fn user_exists(&self, user_id: &str) -> Result<bool> {
        Ok(self.users.contains_key(user_id))
    }

    /// Register users; an existing user keeps everything but a new nickname.
    async fn register_users(&self, users: &[(String, Option<String>)]) -> Result<usize> {
        let now = now_ms();
        let mut tx = self.write.begin().await?;
        for (id, nick) in users {
            sqlx::query(
                "INSERT INTO users (user_id, nickname, created_at) VALUES (?, ?, ?) \
                 ON CONFLICT (user_id) DO UPDATE SET nickname = COALESCE(?, nickname)",
            )
            .bind(id)
            .bind(nick.as_deref().unwrap_or(""))
            .bind(now)
            .bind(nick.as_deref())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        for (id, _) in users {
            self.users.insert(Arc::from(id.as_str()), ());
        }
        Ok(users.len())
    }

    async fn profile(&self, user: &str) -> Result<Option<Profile>> {
        let row = sqlx::query("SELECT nickname, avatar_url FROM users WHERE user_id = ?")
            .bind(user)
            .fetch_optional(&self.read)
            .await?;
        row.map(|r| {
            Ok(Profile {
                user_id: user.to_string(),
                nickname: r.try_get(0)?,
                avatar_url: r.try_get(1)?,
            })
        })
        .transpose()
    }

    async fn update_profile(
        &self,
        user: &str,
        nickname: Option<&str>,
        avatar_url: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE users SET nickname = COALESCE(?, nickname), avatar_url = COALESCE(?, avatar_url) \
             WHERE user_id = ?",
        )
        .bind(nickname)
        .bind(avatar_url)
        .bind(user)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn set_block(&self, user: &str, other: &str, blocked: bool) -> Result<()> {
        if blocked {
            sqlx::query(
                "INSERT OR IGNORE INTO blocks (user_id, blocked_id, created_at) VALUES (?, ?, ?)",
            )
            .bind(user)
            .bind(other)
            .bind(now_ms())
            .execute(&self.write)
            .await?;
            self.blocks
                .entry(Arc::from(user))
                .or_default()
                .insert(Arc::from(other));
        } else {
            sqlx::query("DELETE FROM blocks WHERE user_id = ? AND blocked_id = ?")
                .bind(user)
                .bind(other)
                .execute(&self.write)
                .await?;
            if let Some(mut set) = self.blocks.get_mut(user) {
                set.remove(other);
            }
        }
        Ok(())
    }

    async fn blocks_of(&self, user: &str) -> Result<Vec<String>> {
        let mut list: Vec<String> = self
            .blocks
            .get(user)
            .map(|s| s.iter().map(|u| u.to_string()).collect())
            .unwrap_or_default();
        list.sort();
        Ok(list)
    }

    async fn is_blocked(&self, blocker: &str, sender: &str) -> Result<bool> {
        Ok(self.blocks.get(blocker).is_some_and(|s| s.contains(sender)))
    }

    async fn set_device(&self, user: &str, device: &Device) -> Result<()> {
        sqlx::query(
            "INSERT INTO devices (user_id, platform, push_token, provider, updated_at) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (user_id, platform) DO UPDATE SET push_token = excluded.push_token, \
             provider = excluded.provider, updated_at = excluded.updated_at",
        )
        .bind(user)
        .bind(device.platform as i64)
        .bind(&device.push_token)
        .bind(&device.provider)
        .bind(now_ms())
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn create_file(&self, file: &FileRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO files (file_id, owner, name, size, content_type, created_at, complete) \
             VALUES (?, ?, ?, ?, ?, ?, 0)",
        )
        .bind(&file.file_id)
        .bind(&file.owner)
        .bind(&file.name)
        .bind(file.size as i64)
        .bind(&file.content_type)
        .bind(file.created_at)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn file(&self, file_id: &str) -> Result<Option<FileRow>> {
        let row = sqlx::query(
            "SELECT file_id, owner, name, size, content_type, created_at, CAST(complete AS SIGNED) \
             FROM files WHERE file_id = ?",
        )
        .bind(file_id)
        .fetch_optional(&self.read)
        .await?;
        row.map(|r| {
            Ok(FileRow {
                file_id: text(&r, 0)?,
                owner: text(&r, 1)?,
                name: r.try_get(2)?,
                size: r.try_get::<i64, _>(3)? as u64,
                content_type: r.try_get(4)?,
                created_at: r.try_get(5)?,
                complete: r.try_get::<i64, _>(6)? != 0,
            })
        })
        .transpose()
    }

    async fn complete_file(&self, file_id: &str) -> Result<()> {
        sqlx::query("UPDATE files SET complete = 1 WHERE file_id = ?")
            .bind(file_id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn link_file(&self, file_id: &str, conversation_id: &str, members_to: u64) -> Result<()> {
        sqlx::query(
            "INSERT INTO file_conversations (file_id, conversation_id, members_to) VALUES (?, ?, ?) \
             ON CONFLICT (file_id, conversation_id) DO UPDATE SET members_to = MAX(members_to, excluded.members_to)",
        )
        .bind(file_id)
        .bind(conversation_id)
        .bind(members_to as i64)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn file_conversations(&self, file_id: &str) -> Result<Vec<(String, u64)>> {
        let rows = sqlx::query(
            "SELECT conversation_id, members_to FROM file_conversations WHERE file_id = ?",
        )
        .bind(file_id)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| Ok((text(r, 0)?, r.try_get::<i64, _>(1)? as u64)))
            .collect()
    }

    async fn unlink_file(&self, file_id: &str, conversation_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM file_conversations WHERE file_id = ? AND conversation_id = ?")
            .bind(file_id)
            .bind(conversation_id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn devices_of(&self, user: &str) -> Result<Vec<Device>> {
        let rows = sqlx::query(
            "SELECT platform, push_token, provider FROM devices WHERE user_id = ? ORDER BY platform",
        )
        .bind(user)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Device {
                    platform: r.try_get::<i64, _>(0)? as u8,
                    push_token: r.try_get(1)?,
                    provider: r.try_get(2)?,
                })
            })
            .collect()
    }

    async fn push_devices(
        &self,
        conversation_id: &str,
        users: &[Arc<str>],
    ) -> Result<Vec<PushDevice>> {
        let mut found = Vec::new();
        for chunk in users.chunks(USERS_PER_QUERY) {
            let sql = push_devices_sql(chunk.len());
            let mut q = sqlx::query(&sql).bind(conversation_id);
            for u in chunk {
                q = q.bind(&**u);
            }
            for r in q.fetch_all(&self.read).await? {
                found.push(PushDevice {
                    user_id: r.try_get(0)?,
                    device: Device {
                        platform: r.try_get::<i64, _>(1)? as u8,
                        push_token: r.try_get(2)?,
                        provider: r.try_get(3)?,
                    },
                    muted: r.try_get::<i64, _>(4)? != 0,
                });
            }
        }
        Ok(found)
    }

    async fn last_seen(&self, user: &str) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT last_seen FROM users WHERE user_id = ?")
            .bind(user)
            .fetch_optional(&self.read)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn set_last_seen(&self, users: &[(Arc<str>, i64)]) -> Result<()> {
        let mut tx = self.write.begin().await?;
        for (u, at) in users {
            sqlx::query("UPDATE users SET last_seen = MAX(last_seen, ?) WHERE user_id = ?")
                .bind(*at)
                .bind(&**u)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The generation tokens of `user` on `platform` must carry. Every
    /// generation is held in memory (only users who logged out have one), so
    /// the check before a WebSocket upgrade never waits on the disk.
    async fn token_generation(&self, user: &str, platform: u8) -> Result<u64> {
        Ok(self
            .generations
            .get(&(Arc::from(user), platform))
            .map(|g| *g)
            .unwrap_or(0))
    }

    /// Revoke every token issued so far for `user` on `platforms`.
    async fn bump_generation(&self, user: &str, platforms: &[u8]) -> Result<()> {
        let mut tx = self.write.begin().await?;
        let mut new = Vec::new();
        for &p in platforms {
            let g: i64 = sqlx::query_scalar(
                "INSERT INTO token_generations (user_id, platform, generation) VALUES (?, ?, 1) \
                 ON CONFLICT (user_id, platform) DO UPDATE SET generation = generation + 1 \
                 RETURNING generation",
            )
            .bind(user)
            .bind(p as i64)
            .fetch_one(&mut *tx)
            .await?;
            new.push((p, g as u64));
        }
        tx.commit().await?;
        for (p, g) in new {
            self.generations.insert((Arc::from(user), p), g);
        }
        Ok(())
    }

    async fn group(&self, group_id: &str) -> Result<Option<Arc<GroupState>>> {
        if let Some(g) = self.groups.get(group_id) {
            return Ok(Some(g.clone()));
        }
        let Some(state) = self.load_group(group_id).await? else {
            return Ok(None);
        };
        let state = Arc::new(state);
        self.groups.insert(state.group_id.clone(), state.clone());
        Ok(Some(state))
    }

    async fn group_fresh(&self, group_id: &str) -> Result<Option<Arc<GroupState>>> {
        // Every write here reloads the snapshot: the cache is never behind.
        self.group(group_id).await
    }

    async fn create_group(
        &self,
        group_id: &str,
        name: &str,
        owner: &str,
        members: &[String],
    ) -> Result<()> {
        self.check_users_exist(members)?;
        let _guard = self.group_writes.lock().await;
        let now = now_ms();
        let mut tx = self.write.begin().await?;
        let inserted = sqlx::query(
            "INSERT OR IGNORE INTO groups (group_id, name, owner, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(group_id)
        .bind(name)
        .bind(owner)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(ImError::conflict(format!("group {group_id} already exists")).into());
        }
        sqlx::query(
            "INSERT INTO group_members (group_id, user_id, role, joined_at, min_seq) VALUES (?, ?, ?, ?, NULL)",
        )
        .bind(group_id)
        .bind(owner)
        .bind(Role::Owner as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        insert_members(&mut tx, group_id, members, now).await?;
        tx.commit().await?;
        self.refresh_group(group_id).await
    }

    async fn add_members(&self, group_id: &str, users: &[String]) -> Result<Vec<String>> {
        self.check_users_exist(users)?;
        let _guard = self.group_writes.lock().await;
        let mut tx = self.write.begin().await?;
        insert_members(&mut tx, group_id, users, now_ms()).await?;
        let mut waiting = Vec::new();
        for u in users {
            let pending: Option<Option<i64>> = sqlx::query_scalar(
                "SELECT min_seq FROM group_members WHERE group_id = ? AND user_id = ?",
            )
            .bind(group_id)
            .bind(u)
            .fetch_optional(&mut *tx)
            .await?;
            if matches!(pending, Some(None)) && !waiting.contains(u) {
                waiting.push(u.clone());
            }
        }
        tx.commit().await?;
        self.refresh_group(group_id).await?;
        Ok(waiting)
    }

    async fn remove_member(&self, group_id: &str, user: &str) -> Result<bool> {
        let _guard = self.group_writes.lock().await;
        let n = sqlx::query("DELETE FROM group_members WHERE group_id = ? AND user_id = ?")
            .bind(group_id)
            .bind(user)
            .execute(&self.write)
            .await?
            .rows_affected();
        self.refresh_group(group_id).await?;
        Ok(n > 0)
    }

    async fn set_role(&self, group_id: &str, user: &str, role: Role) -> Result<()> {
        self.change_group(
            group_id,
            "UPDATE group_members SET role = ? WHERE user_id = ? AND group_id = ?",
            &[Bind::Int(role as i64), Bind::Text(user)],
        )
        .await
    }

    async fn update_group(&self, group_id: &str, changes: &GroupChanges) -> Result<()> {
        let _guard = self.group_writes.lock().await;
        sqlx::query(
            "UPDATE groups SET name = COALESCE(?, name), notice = COALESCE(?, notice), \
             avatar_url = COALESCE(?, avatar_url) WHERE group_id = ?",
        )
        .bind(changes.name.as_deref())
        .bind(changes.notice.as_deref())
        .bind(changes.avatar_url.as_deref())
        .bind(group_id)
        .execute(&self.write)
        .await?;
        self.refresh_group(group_id).await
    }

    async fn set_group_muted(&self, group_id: &str, muted: bool) -> Result<()> {
        self.change_group(
            group_id,
            "UPDATE groups SET muted = ? WHERE group_id = ?",
            &[Bind::Int(muted as i64)],
        )
        .await
    }

    async fn set_member_muted(&self, group_id: &str, user: &str, until: i64) -> Result<()> {
        self.change_group(
            group_id,
            "UPDATE group_members SET muted_until = ? WHERE user_id = ? AND group_id = ?",
            &[Bind::Int(until), Bind::Text(user)],
        )
        .await
    }

    async fn transfer_group(&self, group_id: &str, from: &str, to: &str) -> Result<()> {
        let _guard = self.group_writes.lock().await;
        let mut tx = self.write.begin().await?;
        for (user, role) in [(from, Role::Admin), (to, Role::Owner)] {
            sqlx::query("UPDATE group_members SET role = ? WHERE group_id = ? AND user_id = ?")
                .bind(role as i64)
                .bind(group_id)
                .bind(user)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE groups SET owner = ? WHERE group_id = ?")
            .bind(to)
            .bind(group_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.refresh_group(group_id).await
    }

    async fn dismiss_group(&self, group_id: &str) -> Result<()> {
        self.change_group(
            group_id,
            "UPDATE groups SET dismissed = 1 WHERE group_id = ?",
            &[],
        )
        .await
    }

    async fn set_min_seq(&self, group_id: &str, users: &[String], seq: u64) -> Result<()> {
        let _guard = self.group_writes.lock().await;
        let mut tx = self.write.begin().await?;
        for u in users {
            sqlx::query(
                "UPDATE group_members SET min_seq = ? WHERE group_id = ? AND user_id = ? AND min_seq IS NULL",
            )
            .bind(seq as i64)
            .bind(group_id)
            .bind(u)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.refresh_group(group_id).await
    }

    async fn groups_of(&self, user: &str) -> Result<Vec<(String, String, Role)>> {
        let rows = sqlx::query(
            "SELECT g.group_id, g.name, gm.role FROM group_members gm \
               JOIN groups g ON g.group_id = gm.group_id \
              WHERE gm.user_id = ? ORDER BY g.group_id",
        )
        .bind(user)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, Role::from_i64(r.try_get(2)?))))
            .collect()
    }

    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationRow>> {
        let rows = sqlx::query(
            "SELECT uc.conversation_id, uc.read_seq, 1, uc.pinned, uc.muted, uc.changed_at \
               FROM user_conversations uc \
              WHERE uc.user_id = ?1 AND uc.conversation_id LIKE 'si\\_%' ESCAPE '\\' \
             UNION ALL \
             SELECT 'sg_' || gm.group_id, COALESCE(uc.read_seq, 0), gm.min_seq, \
                    COALESCE(uc.pinned, 0), COALESCE(uc.muted, 0), COALESCE(uc.changed_at, 0) \
               FROM group_members gm \
               LEFT JOIN user_conversations uc ON uc.user_id = gm.user_id AND uc.conversation_id = 'sg_' || gm.group_id \
              WHERE gm.user_id = ?1 AND gm.min_seq IS NOT NULL",
        )
        .bind(user)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ConversationRow {
                    conversation_id: r.try_get(0)?,
                    read_seq: r.try_get::<i64, _>(1)? as u64,
                    min_seq: r.try_get::<i64, _>(2)?.max(1) as u64,
                    pinned: r.try_get::<i64, _>(3)? != 0,
                    muted: r.try_get::<i64, _>(4)? != 0,
                    changed_at: r.try_get(5)?,
                })
            })
            .collect()
    }

    async fn open_single_chats(&self, conversations: &[Arc<str>]) -> Result<()> {
        let rows = super::single_chat_rows(conversations);
        // One statement per chunk, one transaction: a burst of new chats
        // (every conversation's first message) is a few round trips to the
        // writer, not one per chat.
        let mut tx = self.write.begin().await?;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT OR IGNORE INTO user_conversations (user_id, conversation_id) ",
            );
            q.push_values(chunk, |mut b, (user, conv)| {
                b.push_bind(&**user).push_bind(*conv);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn set_read(&self, user: &str, conversation: &str, seq: u64) -> Result<u64> {
        let v: i64 = sqlx::query_scalar(
            "INSERT INTO user_conversations (user_id, conversation_id, read_seq, changed_at) \
             VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (user_id, conversation_id) DO UPDATE SET read_seq = MAX(read_seq, excluded.read_seq), \
             changed_at = excluded.changed_at \
             RETURNING read_seq",
        )
        .bind(user)
        .bind(conversation)
        .bind(seq.min(i64::MAX as u64) as i64)
        .bind(now_ms())
        .fetch_one(&self.write)
        .await?;
        Ok(v as u64)
    }

    async fn set_conversation_settings(
        &self,
        user: &str,
        conversation: &str,
        pinned: Option<bool>,
        muted: Option<bool>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO user_conversations (user_id, conversation_id, pinned, muted, changed_at) \
             VALUES (?1, ?2, COALESCE(?3, 0), COALESCE(?4, 0), ?5) \
             ON CONFLICT (user_id, conversation_id) DO UPDATE SET \
             pinned = COALESCE(?3, pinned), muted = COALESCE(?4, muted), changed_at = ?5",
        )
        .bind(user)
        .bind(conversation)
        .bind(pinned.map(i64::from))
        .bind(muted.map(i64::from))
        .bind(now_ms())
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

#[async_trait]
impl History for SqliteStore {
    /// Commit a batch of messages durably (shared with every other batch
    /// waiting at the same time). Idempotent: a message already stored with
    /// the same (conversation, seq) and server_msg_id is left as it is; one
    /// whose seq another message holds is reported, not stored.
    async fn commit(&self, messages: Vec<Sequenced>) -> Result<Taken, String> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(WriteJob { messages, done })
            .await
            .map_err(|_| Error::WriterGone.to_string())?;
        wait.await.map_err(|_| Error::WriterGone.to_string())?
    }

    /// Bodies of the stored messages of `conversation` with seq in
    /// `from..=to`, ascending.
    async fn range(&self, conversation: &str, from: u64, to: u64) -> Result<Vec<(u64, Arc<str>)>> {
        let rows = sqlx::query("SELECT seq, body FROM messages WHERE conversation_id = ? AND seq BETWEEN ? AND ? ORDER BY seq")
            .bind(conversation)
            .bind(from as i64)
            .bind(to as i64)
            .fetch_all(&self.read)
            .await?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>(0)? as u64,
                    Arc::from(r.try_get::<String, _>(1)?),
                ))
            })
            .collect()
    }

    async fn last_messages(
        &self,
        conversations: &[Arc<str>],
    ) -> Result<HashMap<Arc<str>, (u64, Arc<str>)>> {
        let list: Vec<&str> = conversations.iter().map(|c| &**c).collect();
        let json = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
        // Through the writer's pool: the latest commit must be seen.
        let rows = sqlx::query(
            "SELECT m.conversation_id, m.seq, m.body FROM json_each(?) j \
               JOIN messages m ON m.conversation_id = j.value \
              AND m.seq = (SELECT MAX(seq) FROM messages WHERE conversation_id = j.value)",
        )
        .bind(json)
        .fetch_all(&self.write)
        .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in rows {
            let c: String = r.try_get(0)?;
            let seq: i64 = r.try_get(1)?;
            let body: String = r.try_get(2)?;
            out.insert(Arc::from(c), (seq as u64, Arc::from(body)));
        }
        Ok(out)
    }

    async fn sent_after(
        &self,
        sender: &str,
        after: &[(Arc<str>, u64)],
    ) -> Result<HashMap<Arc<str>, u64>> {
        if after.is_empty() {
            return Ok(HashMap::new());
        }
        let list: Vec<(&str, u64)> = after.iter().map(|(c, s)| (&**c, *s)).collect();
        let json = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
        let rows = sqlx::query(
            "SELECT json_extract(j.value, '$[0]'), \
                    (SELECT COUNT(*) FROM messages m \
                      WHERE m.conversation_id = json_extract(j.value, '$[0]') \
                        AND m.seq > json_extract(j.value, '$[1]') AND m.sender = ?) \
               FROM json_each(?) j",
        )
        .bind(sender)
        .bind(json)
        .fetch_all(&self.write)
        .await?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in rows {
            let c: String = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            out.insert(Arc::from(c), n as u64);
        }
        Ok(out)
    }

    async fn replace_if(&self, conversation: &str, seq: u64, old: &str, new: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE messages SET body = ? WHERE conversation_id = ? AND seq = ? AND body = ?",
        )
        .bind(new)
        .bind(conversation)
        .bind(seq as i64)
        .bind(old)
        .execute(&self.write)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    /// The `limit` most recent stored messages, oldest first, as
    /// (sender, client_msg_id, ack info): what the resend index remembers.
    async fn recent_sent(&self, limit: usize) -> Result<Vec<(String, String, AckInfo)>> {
        let rows = sqlx::query(
            "SELECT sender, client_msg_id, server_msg_id, conversation_id, send_time \
               FROM messages ORDER BY send_time DESC LIMIT ?",
        )
        .bind(limit.min(i64::MAX as usize) as i64)
        .fetch_all(&self.read)
        .await?;
        let mut out = rows
            .into_iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    r.try_get(1)?,
                    AckInfo {
                        server_msg_id: r.try_get(2)?,
                        conversation_id: r.try_get(3)?,
                        send_time: r.try_get(4)?,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    /// Highest stored seq of each conversation (0 when it has none).
    async fn max_seqs(&self, conversations: &[Arc<str>]) -> Result<HashMap<Arc<str>, u64>> {
        let mut out: HashMap<Arc<str>, u64> =
            conversations.iter().map(|c| (c.clone(), 0)).collect();
        let list: Vec<&str> = conversations.iter().map(|c| &**c).collect();
        let json = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
        // Read through the writer's pool: the value must include the latest
        // commit, which a reader's snapshot might predate.
        let rows = sqlx::query(
            "SELECT j.value, (SELECT MAX(m.seq) FROM messages m WHERE m.conversation_id = j.value) \
               FROM json_each(?) j",
        )
        .bind(json)
        .fetch_all(&self.write)
        .await?;
        for r in rows {
            let c: String = r.try_get(0)?;
            let max: Option<i64> = r.try_get(1)?;
            out.insert(Arc::from(c), max.unwrap_or(0) as u64);
        }
        Ok(out)
    }
}

async fn insert_members(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    group_id: &str,
    users: &[String],
    now: i64,
) -> Result<u64> {
    let mut added = 0;
    for u in users {
        added += sqlx::query("INSERT OR IGNORE INTO group_members (group_id, user_id, role, joined_at, min_seq) VALUES (?, ?, ?, ?, NULL)")
            .bind(group_id)
            .bind(u)
            .bind(Role::Member as i64)
            .bind(now)
            .execute(&mut **tx)
            .await?
            .rows_affected();
    }
    Ok(added)
}

/// When to hold a group commit open for more messages. A commit costs about
/// the same whatever it carries (with `durability: full`, an fsync and the
/// same few WAL pages), so at a steady rate well below the writer's limit
/// each message had a commit of its own: at the seed's 2,300 msg/s the
/// writer thread spent ~130 µs of CPU per message. Waiting a little for the
/// next ones, as MySQL's `binlog_group_commit_sync_delay` and PostgreSQL's
/// `commit_delay` do, shares that cost. The wait is taken only while
/// commits are asked for (each by one stage task, with all the messages it
/// holds) at least once per delay on average, and not after a pause of a
/// few delays, so a quiet server commits at once and no ack waits for
/// company that is not coming. tokio's timer ticks each millisecond, so a
/// wait can last up to a millisecond longer than the delay.
struct Gather {
    delay: Duration,
    /// Commit requests (jobs) per second, smoothed over recent commits.
    rate: f64,
    /// When the previous commit's first job came.
    last: tokio::time::Instant,
}

/// A pause longer than this many delays since the previous commit ends
/// the waiting, whatever the rate was before.
const GATHER_IDLE_DELAYS: u32 = 4;

impl Gather {
    fn new(delay: Duration) -> Self {
        Gather {
            delay,
            rate: 0.0,
            last: tokio::time::Instant::now(),
        }
    }

    /// `jobs` arrived since the previous call.
    fn observe(&mut self, jobs: usize, now: tokio::time::Instant) {
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-6);
        self.last = now;
        self.rate = 0.7 * self.rate + 0.3 * (jobs as f64 / dt);
    }

    /// How long to keep gathering after a commit's first job came at `now`,
    /// if at all.
    fn window(&self, now: tokio::time::Instant) -> Option<Duration> {
        let busy = self.rate * self.delay.as_secs_f64() >= 1.0
            && now.duration_since(self.last) <= self.delay * GATHER_IDLE_DELAYS;
        (!self.delay.is_zero() && busy).then_some(self.delay)
    }
}

/// The group-commit loop: take every job waiting (and, under steady load,
/// those that come within the commit delay), write them in one
/// transaction, answer them all.
async fn message_writer(pool: SqlitePool, mut rx: mpsc::Receiver<WriteJob>, mut gather: Gather) {
    let mut jobs = Vec::new();
    let mut texts = CommitTexts::default();
    while rx.recv_many(&mut jobs, 256).await > 0 {
        let first = tokio::time::Instant::now();
        // Keep taking jobs while the commit stays bounded: those already
        // queued, and under steady load those that come within the window.
        let mut total: usize = jobs.iter().map(|j| j.messages.len()).sum();
        let until = gather.window(first).map(|w| first + w);
        while total < MAX_COMMIT {
            let next = match until {
                Some(until) => tokio::time::timeout_at(until, rx.recv())
                    .await
                    .ok()
                    .flatten(),
                None => rx.try_recv().ok(),
            };
            let Some(j) = next else { break };
            total += j.messages.len();
            jobs.push(j);
        }
        gather.observe(jobs.len(), first);
        let started = std::time::Instant::now();
        let result = write_batch(&pool, &mut texts, &jobs)
            .await
            .map_err(|e| e.to_string());
        metrics::histogram!("imflow_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("imflow_store_commit_messages").record(total as f64);
        if let Err(e) = &result {
            tracing::error!(error = %e, messages = total, "message commit failed");
        }
        let mut at = 0;
        for j in jobs.drain(..) {
            let n = j.messages.len();
            let answer = result.as_ref().map_err(Clone::clone).map(|taken| {
                taken[at..at + n]
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| **t)
                    .map(|(i, _)| i)
                    .collect()
            });
            at += n;
            let _ = j.done.send(answer);
        }
    }
}

/// Columns bound per message row.
const COLUMNS: usize = 7;

/// One INSERT of `rows` messages, first one wins a (conversation, seq)
/// given twice (`ORDER BY` the row's position: literal, so the text is the
/// same for every commit). Padding rows are NULL and filtered out. `WHERE`
/// lets SQLite parse `ON CONFLICT` after a SELECT. `RETURNING` names the
/// rows stored; a row it leaves out found its (conversation, seq) held.
fn insert_statement(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|i| format!("(?, ?, ?, ?, ?, ?, ?, {i})"))
        .collect();
    format!(
        "INSERT INTO messages (conversation_id, seq, server_msg_id, client_msg_id, sender, send_time, body) \
         SELECT column1, column2, column3, column4, column5, column6, column7 \
         FROM (VALUES {}) WHERE column1 IS NOT NULL ORDER BY column8 \
         ON CONFLICT DO NOTHING RETURNING conversation_id, seq;",
        values.join(", ")
    )
}

/// The texts of `commit_statements` made so far, by row count: the writer
/// keeps them rather than formatting up to 512 rows again per commit.
#[derive(Default)]
struct CommitTexts(HashMap<usize, Arc<str>>);

impl CommitTexts {
    /// The statement list for `n` messages and the rows it binds.
    fn get(&mut self, n: usize) -> (Arc<str>, usize) {
        let rows = commit_rows(n);
        let text = self
            .0
            .entry(rows)
            .or_insert_with(|| commit_statements(rows).into())
            .clone();
        (text, rows)
    }
}

/// The rows a commit of `n` messages binds, padding included.
fn commit_rows(n: usize) -> usize {
    n.max(1).next_power_of_two().max(8)
}

/// The statement list of a commit of `n` messages: one transaction, so it
/// is one call to sqlx's worker thread (a `begin()`, the inserts and a
/// `commit()` were one each). Messages are bound as parameters: the JSON
/// array they travelled in before was parsed again for every column of
/// every row, ~a fifth of the writer thread's time.
///
/// `n` is rounded up to a power of two (at least 8), the rest padded with
/// NULL rows, and each size has one shape (8-row statements up to 32
/// rows, 64-row ones up to 256, 512-row ones above), so a commit is one of
/// a handful of texts: sqlx's per-connection statement cache (100) keeps
/// them all with the writer's other statements, and a commit does not
/// prepare its statements again (a 64-row INSERT costs more to prepare
/// than to run). A padded row costs a few NULL binds, far less than a
/// stored one.
fn commit_statements(n: usize) -> String {
    let rows = commit_rows(n);
    let shape = match rows {
        ..=32 => 8,
        33..=256 => 64,
        _ => 512,
    };
    let one = insert_statement(shape);
    let mut text = String::with_capacity(one.len() * (rows / shape) + 16);
    text.push_str("BEGIN; ");
    for _ in 0..rows / shape {
        text.push_str(&one);
    }
    text.push_str(" COMMIT;");
    text
}

/// For each of `keys`, not stored, whether the message holding its
/// (conversation, seq) is another one (1: taken), the same one (0: a
/// replay, done), or none (NULL: a row the INSERT dropped, a bug to
/// report, never to take as stored). Rare (a replay after a restart, or a
/// seq handed out twice), so the rows travel as one JSON array:
/// `[conversation, seq, server_msg_id]` each.
const HELD_BY: &str = "SELECT j.key, m.server_msg_id <> j.value ->> 2 \
    FROM json_each(?1) AS j LEFT JOIN messages AS m \
    ON m.conversation_id = j.value ->> 0 AND m.seq = j.value ->> 1";

/// Write every job's messages in one transaction; for each message, whether
/// its seq is taken by another message (so it was not written). One stored
/// before with the same server_msg_id is a replay: done, not taken.
async fn write_batch(
    pool: &SqlitePool,
    texts: &mut CommitTexts,
    jobs: &[WriteJob],
) -> Result<Vec<bool>> {
    let messages: Vec<&Sequenced> = jobs.iter().flat_map(|j| &j.messages).collect();
    let (text, rows) = texts.get(messages.len());
    let mut query = sqlx::query(&text);
    for m in &messages {
        query = query
            .bind(&*m.msg.conversation_id)
            .bind(m.seq as i64)
            .bind(&*m.msg.server_msg_id)
            .bind(&*m.msg.client_msg_id)
            .bind(&*m.msg.sender)
            .bind(m.msg.send_time)
            .bind(&*m.body);
    }
    for _ in 0..(rows - messages.len()) * COLUMNS {
        query = query.bind(None::<&str>);
    }
    // sqlx binds NULL for a parameter it was not given, and a NULL row is
    // padding: a miscount here would drop messages without an error.
    debug_assert_eq!(text.matches('?').count(), rows * COLUMNS);
    let mut conn = pool.acquire().await?;
    let stored = match query.fetch_all(&mut *conn).await {
        Ok(stored) => stored,
        Err(e) => {
            // The list stopped where it failed, perhaps inside the
            // transaction: end it, or the connection's next user would
            // write into it. If even that fails, the connection is closed
            // (SQLite rolls back what a closing connection left open) and
            // the pool opens another. (The writer task's future is dropped
            // only when the runtime stops, so a commit is never abandoned
            // half-way otherwise.)
            if sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err() {
                conn.close_on_drop();
            }
            return Err(e.into());
        }
    };
    // Each stored (conversation, seq) is claimed by the first message that
    // names it: a second one in the same commit was not stored.
    let mut claims: HashMap<(&str, i64), usize> = HashMap::with_capacity(stored.len());
    for row in &stored {
        *claims
            .entry((row.try_get(0)?, row.try_get(1)?))
            .or_default() += 1;
    }
    let mut unstored = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match claims.get_mut(&(&*m.msg.conversation_id, m.seq as i64)) {
            Some(n) if *n > 0 => *n -= 1,
            _ => unstored.push(i),
        }
    }
    let mut taken = vec![false; messages.len()];
    if unstored.is_empty() {
        return Ok(taken);
    }
    // After COMMIT: a failure here fails the commit although its rows are
    // stored; the persist stage's retry finds them under their own
    // server_msg_id (a replay, done). See `History::commit`.
    let keys: Vec<_> = unstored
        .iter()
        .map(|&i| {
            let m = messages[i];
            (&*m.msg.conversation_id, m.seq as i64, &*m.msg.server_msg_id)
        })
        .collect();
    let keys = serde_json::to_string(&keys).map_err(|e| Error::Encode(e.to_string()))?;
    for row in sqlx::query(HELD_BY)
        .bind(keys)
        .fetch_all(&mut *conn)
        .await?
    {
        let at: i64 = row.try_get(0)?;
        let other: Option<bool> = row.try_get(1)?;
        let Some(&i) = usize::try_from(at).ok().and_then(|k| unstored.get(k)) else {
            continue;
        };
        match other {
            Some(other) => taken[i] = other,
            None => return Err(Error::Unstored(messages[i].msg.server_msg_id.to_string())),
        }
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Stamped, Target};

    fn message(conversation: &str, seq: u64, id: &str) -> Sequenced {
        Sequenced {
            msg: Stamped {
                conversation_id: conversation.into(),
                server_msg_id: id.into(),
                client_msg_id: format!("c-{id}").into(),
                sender: "alice".into(),
                target: Target::User("bob".into()),
                content_type: 101,
                content: r#"{"text":"hi"}"#.into(),
                send_time: 1_700_000_000_000,
            },
            seq,
            body: format!(r#"{{"seq":{seq},"text":"say \"{id}\" \u00e9"}}"#).into(),
        }
    }

    async fn store() -> (tempfile::TempDir, Arc<SqliteStore>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path(), Durability::Normal)
            .await
            .expect("store");
        (dir, store)
    }

    #[tokio::test]
    async fn a_commit_stores_every_message_with_its_body_as_sent() {
        let (_dir, store) = store().await;
        // Sizes on each side of the statements' shapes (padded or not).
        for n in [1, 7, 8, 9, 63, 64, 65, 128, 300] {
            let conv = format!("si_a_{n}");
            let batch: Vec<Sequenced> = (1..=n)
                .map(|s| message(&conv, s, &format!("{n}-{s}")))
                .collect();
            let taken = store.commit(batch.clone()).await.expect("commit");
            assert!(taken.is_empty(), "{n}: {taken:?}");
            let stored = store.range(&conv, 1, 1000).await.expect("range");
            assert_eq!(stored.len() as u64, n);
            for ((seq, body), m) in stored.iter().zip(&batch) {
                assert_eq!(*seq, m.seq);
                assert_eq!(body, &m.body);
            }
        }
    }

    #[tokio::test]
    async fn a_replay_is_done_and_a_seq_held_by_another_message_is_taken() {
        let (_dir, store) = store().await;
        let first = vec![message("si_a_b", 1, "m1"), message("si_a_b", 2, "m2")];
        assert!(store.commit(first).await.expect("commit").is_empty());
        // The same two again (a replay), a new one, and another message
        // that was handed seq 2 too; within one batch, a seq handed to two
        // messages goes to the first.
        let again = vec![
            message("si_a_b", 1, "m1"),
            message("si_a_b", 2, "other"),
            message("si_a_b", 3, "m3"),
            message("si_a_b", 2, "m2"),
            message("si_a_b", 4, "m4"),
            message("si_a_b", 4, "twin"),
        ];
        let taken = store.commit(again).await.expect("commit");
        assert_eq!(taken, vec![1, 5]);
        let stored = store.range("si_a_b", 1, 9).await.expect("range");
        let seqs: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        assert!(stored[1].1.contains("m2"), "{:?}", stored[1]);
        assert!(stored[3].1.contains("m4"), "{:?}", stored[3]);
    }

    #[test]
    fn the_gather_waits_only_while_jobs_come_faster_than_the_delay() {
        let t0 = tokio::time::Instant::now();
        let ms = Duration::from_millis;
        let mut quiet = Gather::new(ms(1));
        quiet.last = t0;
        // One job every 10 ms: no company within 1 ms to wait for.
        for i in 1..=20 {
            quiet.observe(1, t0 + ms(10 * i));
            assert_eq!(
                quiet.window(t0 + ms(10 * i + 1)),
                None,
                "after {i} quiet commits"
            );
        }
        // Then three jobs a millisecond: worth waiting for.
        let mut at = t0 + ms(200);
        for _ in 0..5 {
            at += ms(1);
            quiet.observe(3, at);
        }
        assert_eq!(quiet.window(at + ms(1)), Some(ms(1)));
        // A pause of more than a few delays: the next lone job does not
        // wait, though the rate has not been brought down yet.
        assert_eq!(quiet.window(at + ms(5)), None);
        // And back to quiet: the rate itself comes down within a few commits.
        for _ in 0..5 {
            at += ms(3);
            quiet.observe(1, at);
        }
        assert_eq!(quiet.window(at + ms(1)), None);
        // A delay of zero never waits, however busy.
        let mut off = Gather::new(Duration::ZERO);
        off.observe(1000, t0 + ms(1));
        assert_eq!(off.window(t0 + ms(1)), None);
    }

    #[tokio::test]
    async fn commits_gathered_under_a_delay_answer_each_sender_for_its_own_messages() {
        let (_dir, store) = store().await;
        assert!(store
            .commit(vec![message("si_c_d", 2, "held")])
            .await
            .expect("commit")
            .is_empty());
        // A writer that has seen a high rate, so every commit waits its
        // window for more; many senders at once, one of them handed a seq
        // that is already held.
        let (tx, rx) = mpsc::channel(1024);
        let mut busy = Gather::new(Duration::from_millis(5));
        busy.rate = f64::INFINITY;
        tokio::spawn(message_writer(store.write_pool().clone(), rx, busy));
        let mut senders = tokio::task::JoinSet::new();
        for n in 0..64u64 {
            let tx = tx.clone();
            senders.spawn(async move {
                let messages = if n == 7 {
                    vec![message("si_c_d", 1, "c1"), message("si_c_d", 2, "c2")]
                } else {
                    let conv = format!("si_a_{n}");
                    vec![
                        message(&conv, 1, &format!("{n}-1")),
                        message(&conv, 2, &format!("{n}-2")),
                    ]
                };
                let (done, answer) = oneshot::channel();
                tx.send(WriteJob { messages, done }).await.expect("writer");
                (n, answer.await.expect("answered"))
            });
        }
        while let Some(done) = senders.join_next().await {
            let (n, taken) = done.expect("sender");
            let taken = taken.expect("commit");
            if n == 7 {
                assert_eq!(taken, vec![1], "only the second of its own two is taken");
            } else {
                assert!(taken.is_empty(), "sender {n}: {taken:?}");
                let stored = store
                    .range(&format!("si_a_{n}"), 1, 2)
                    .await
                    .expect("range");
                assert_eq!(stored.len(), 2, "sender {n}");
            }
        }
        let held = store.range("si_c_d", 1, 2).await.expect("range");
        assert!(
            held[0].1.contains("c1") && held[1].1.contains("held"),
            "{held:?}"
        );
    }

    /// Make every insert of `seq` fail, inside the commit's statement list.
    async fn refuse_seq(store: &SqliteStore, seq: u64) {
        sqlx::query(&format!(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.seq = {seq} \
             BEGIN SELECT RAISE(ABORT, 'refused'); END"
        ))
        .execute(store.write_pool())
        .await
        .expect("trigger");
    }

    async fn stop_refusing(store: &SqliteStore) {
        sqlx::query("DROP TRIGGER refuse")
            .execute(store.write_pool())
            .await
            .expect("drop");
    }

    #[tokio::test]
    async fn a_commit_failing_in_a_later_statement_stores_nothing() {
        let (_dir, store) = store().await;
        // 70 messages: two 64-row statements; the second one fails.
        refuse_seq(&store, 70).await;
        let batch: Vec<Sequenced> = (1..=70)
            .map(|s| message("si_a_b", s, &format!("m{s}")))
            .collect();
        let err = store.commit(batch.clone()).await.expect_err("refused");
        assert!(err.contains("refused"), "{err}");
        assert!(store
            .range("si_a_b", 1, 99)
            .await
            .expect("range")
            .is_empty());
        stop_refusing(&store).await;
        assert!(store.commit(batch).await.expect("commit").is_empty());
        assert_eq!(store.range("si_a_b", 1, 99).await.expect("range").len(), 70);
    }

    #[tokio::test]
    async fn a_failed_commit_leaves_no_transaction_open() {
        let (_dir, store) = store().await;
        // Make the insert fail inside the statement list, after BEGIN.
        refuse_seq(&store, 7).await;
        let err = store
            .commit(vec![message("si_a_b", 6, "m6"), message("si_a_b", 7, "m7")])
            .await
            .expect_err("refused");
        assert!(err.contains("refused"), "{err}");
        stop_refusing(&store).await;
        // Nothing of the failed batch was kept, and the next commit is its
        // own transaction.
        assert!(store.range("si_a_b", 1, 9).await.expect("range").is_empty());
        assert!(store
            .commit(vec![message("si_a_b", 7, "m7")])
            .await
            .expect("commit")
            .is_empty());
        assert_eq!(store.range("si_a_b", 1, 9).await.expect("range").len(), 1);
    }
}

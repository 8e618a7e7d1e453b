//! The directory in MySQL (cluster mode): users, groups and members,
//! conversations and read seqs, token revocations, settings. Writes and
//! reads that must see them go to the master; `sync`'s conversation list may
//! come from a replica.
//!
//! Caches in this process: known users (users are never deleted, so a
//! positive answer stays true), group snapshots (replaced after a change made
//! here; dropped when another process announces a change through Redis),
//! token generations (through Redis, so every process sees a logout at
//! once).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{ConnectOptions, Row};
use tokio::sync::Mutex;

use super::redis::Redis;
use super::{
    push_devices_sql, ConversationRow, Device, Directory, FileRow, GroupChanges, GroupInfo,
    GroupState, Profile, PushDevice, Role, USERS_PER_QUERY,
};
use crate::error::{Error, Result};
use crate::model::{now_ms, ImError};

/// Where MySQL is.
#[derive(Debug, Clone)]
pub struct MysqlSettings {
    /// `host:port`; the first is the master, the others replicas.
    pub addrs: Vec<String>,
    pub username: String,
    pub password: String,
    pub database: String,
    pub max_connections: u32,
}

impl Default for MysqlSettings {
    fn default() -> Self {
        MysqlSettings {
            addrs: vec!["127.0.0.1:13306".into()],
            username: "root".into(),
            password: String::new(),
            database: "imflow".into(),
            max_connections: 32,
        }
    }
}

pub struct MysqlDirectory {
    master: MySqlPool,
    replica: MySqlPool,
    redis: Option<Arc<Redis>>,
    users: DashMap<Arc<str>, ()>,
    groups: Arc<DashMap<Arc<str>, Arc<GroupState>>>,
    /// Bumped by every announced change: a snapshot loaded while it moved
    /// may predate the change and is not cached.
    group_epoch: Arc<std::sync::atomic::AtomicU64>,
    group_writes: Mutex<()>,
    /// Whom each user blocks, as last read (dropped when any process
    /// announces a change).
    blocks: Arc<DashMap<Arc<str>, Arc<std::collections::HashSet<String>>>>,
}

fn options(settings: &MysqlSettings, addr: &str) -> Result<MySqlConnectOptions> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| {
        Error::Backend(format!(
            "mysql.dbMysqlAddress: `{addr}` is not host:port, e.g. 127.0.0.1:13306"
        ))
    })?;
    let port: u16 = port.parse().map_err(|_| {
        Error::Backend(format!(
            "mysql.dbMysqlAddress: `{addr}` has no valid port, e.g. 127.0.0.1:13306"
        ))
    })?;
    let opts = MySqlConnectOptions::new()
        .host(host)
        .port(port)
        .username(&settings.username)
        .charset("utf8mb4")
        .log_statements(tracing::log::LevelFilter::Trace);
    // An empty password means none (sent as one, MySQL refuses it).
    Ok(if settings.password.is_empty() {
        opts
    } else {
        opts.password(&settings.password)
    })
}

async fn pool(settings: &MysqlSettings, addr: &str, max: u32) -> Result<MySqlPool> {
    let fail = |e: String| {
        Error::Backend(format!(
            "mysql.dbMysqlAddress ({addr}) as user `{}` (mysql.dbMysqlUserName / dbMysqlPassword): {e}",
            settings.username
        ))
    };
    let opts = options(settings, addr)?;
    // The database is created when missing, as OpenIM does on first start.
    let mut bare = tokio::time::timeout(Duration::from_secs(10), opts.connect())
        .await
        .map_err(|_| fail("no answer within 10 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let db = &settings.database;
    if db.is_empty() || !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(Error::Backend(format!(
            "mysql.dbMysqlDatabaseName: `{db}` must be letters, digits and _"
        )));
    }
    sqlx::query(&format!(
        "CREATE DATABASE IF NOT EXISTS `{db}` CHARACTER SET utf8mb4"
    ))
    .execute(&mut bare)
    .await
    .map_err(|e| fail(format!("creating database {db}: {e}")))?;
    drop(bare);
    MySqlPoolOptions::new()
        .max_connections(max)
        // A MySQL that stops answering costs a request this long, then it
        // is refused as unavailable (a connection is pinged before use).
        .acquire_timeout(Duration::from_secs(5))
        // A host runs many processes; connections a burst opened go back.
        .idle_timeout(Duration::from_secs(60))
        .connect_with(opts.database(db))
        .await
        .map_err(|e| fail(e.to_string()))
}

/// Announces that a user's block list changed (every process drops its
/// cached copy).
const BLOCKS_CHANNEL: &str = "blocks-changed";

/// A value bound into a group change's statement.
enum Bind<'a> {
    Int(i64),
    Text(&'a str),
}

/// An id column: `utf8mb4_bin` (compared byte for byte) reaches sqlx as
/// binary; ids are checked ASCII on the way in.
fn id(row: &sqlx::mysql::MySqlRow, i: usize) -> Result<String> {
    let bytes: Vec<u8> = row.try_get(i)?;
    String::from_utf8(bytes).map_err(|e| Error::Backend(format!("mysql: an id is not UTF-8: {e}")))
}

impl MysqlDirectory {
    pub async fn connect(settings: &MysqlSettings, redis: Option<Arc<Redis>>) -> Result<Arc<Self>> {
        let master_addr = settings.addrs.first().ok_or_else(|| {
            Error::Backend(
                "mysql.dbMysqlAddress: give at least the master, e.g. [127.0.0.1:13306]".into(),
            )
        })?;
        let master = pool(settings, master_addr, settings.max_connections).await?;
        // A cluster's processes start together and migrate the same fresh
        // database; the losers of that race find the work done next time.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match sqlx::migrate!("./migrations-mysql").run(&master).await {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    tracing::info!(error = %e, attempt, "mysql migrations raced another process; trying again");
                    tokio::time::sleep(Duration::from_millis(300 * attempt)).await;
                }
                Err(e) => return Err(Error::Backend(format!("mysql migrations: {e}"))),
            }
        }
        let replica = match settings.addrs.get(1) {
            Some(addr) => pool(settings, addr, settings.max_connections).await?,
            None => master.clone(),
        };
        tracing::info!(master = %master_addr, replicas = settings.addrs.len() - 1, database = %settings.database, "mysql connected");
        let groups: Arc<DashMap<Arc<str>, Arc<GroupState>>> = Arc::new(DashMap::new());
        let group_epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        if let Some(r) = &redis {
            let (groups, epoch) = (groups.clone(), group_epoch.clone());
            r.watch_groups(move |changed| {
                epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match changed {
                    Some(g) => {
                        groups.remove(g);
                    }
                    // Changes may have been missed while not subscribed.
                    None => groups.clear(),
                }
            });
        }
        let blocks: Arc<DashMap<Arc<str>, Arc<std::collections::HashSet<String>>>> =
            Arc::new(DashMap::new());
        if let Some(r) = &redis {
            let blocks = blocks.clone();
            r.watch_channel(BLOCKS_CHANNEL, move |changed| match changed {
                Some(user) => {
                    blocks.remove(user);
                }
                None => blocks.clear(),
            });
        }
        Ok(Arc::new(MysqlDirectory {
            master,
            replica,
            redis,
            users: DashMap::new(),
            groups,
            group_epoch,
            group_writes: Mutex::new(()),
            blocks,
        }))
    }

    async fn load_group(&self, group_id: &str) -> Result<Option<GroupState>> {
        let Some(row) = sqlx::query(
            "SELECT name, owner, notice, avatar_url, muted, dismissed FROM `groups` WHERE group_id = ?",
        )
        .bind(group_id)
        .fetch_optional(&self.master)
        .await?
        else {
            return Ok(None);
        };
        let info = GroupInfo {
            name: row.try_get(0)?,
            owner: id(&row, 1)?,
            notice: row.try_get(2)?,
            avatar_url: row.try_get(3)?,
            muted: row.try_get::<i8, _>(4)? != 0,
            dismissed: row.try_get::<i8, _>(5)? != 0,
        };
        let rows = sqlx::query(
            "SELECT user_id, role, min_seq, muted_until FROM group_members WHERE group_id = ? ORDER BY joined",
        )
        .bind(group_id)
        .fetch_all(&self.master)
        .await?;
        let members = rows
            .into_iter()
            .map(|r| {
                Ok((
                    id(&r, 0)?,
                    r.try_get::<i8, _>(1)? as i64,
                    r.try_get::<Option<u64>, _>(2)?.map(|s| s as i64),
                    r.try_get::<i64, _>(3)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(GroupState::from_rows(group_id, info, members)))
    }

    /// Run `sql` (binding the group id last) as one change of the group,
    /// then reload and announce it.
    async fn change_group(&self, group_id: &str, sql: &str, binds: &[Bind<'_>]) -> Result<()> {
        let _guard = self.group_writes.lock().await;
        let mut q = sqlx::query(sql);
        for b in binds {
            q = match b {
                Bind::Int(v) => q.bind(*v),
                Bind::Text(v) => q.bind(*v),
            };
        }
        q.bind(group_id).execute(&self.master).await?;
        self.refresh_group(group_id).await
    }

    /// After a change made here: reload it, and tell the other processes.
    async fn refresh_group(&self, group_id: &str) -> Result<()> {
        if let Some(r) = &self.redis {
            // Announced even if the reload below fails: the write is done.
            if let Err(e) = r.publish_group_changed(group_id).await {
                tracing::warn!(error = %e, group = group_id, "group change not announced; other processes may serve the old membership until they reload");
            }
        }
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

    async fn check_users_exist(&self, users: &[String]) -> Result<()> {
        let mut unknown = Vec::new();
        for u in users {
            if !self.user_exists(u).await? {
                unknown.push(u.as_str());
            }
        }
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(ImError::not_found(format!("unknown users: {}", unknown.join(", "))).into())
        }
    }

    async fn insert_members(
        tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
        group_id: &str,
        users: &[String],
    ) -> Result<u64> {
        let mut added = 0;
        for u in users {
            added += sqlx::query(
                "INSERT IGNORE INTO group_members (group_id, user_id, role, min_seq) VALUES (?, ?, ?, NULL)",
            )
            .bind(group_id)
            .bind(u)
            .bind(Role::Member as i8)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        }
        Ok(added)
    }
}

#[async_trait]
impl Directory for MysqlDirectory {
    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query("INSERT IGNORE INTO settings (name, value) VALUES (?, ?)")
            .bind(key)
            .bind(value)
            .execute(&self.master)
            .await?;
        let v: Option<String> = sqlx::query_scalar("SELECT value FROM settings WHERE name = ?")
            .bind(key)
            .fetch_optional(&self.master)
            .await?;
        Ok(v.unwrap_or_else(|| value.to_string()))
    }

    async fn user_exists(&self, user: &str) -> Result<bool> {
        if self.users.contains_key(user) {
            return Ok(true);
        }
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM users WHERE user_id = ?")
            .bind(user)
            .fetch_optional(&self.master)
            .await?;
        if found.is_some() {
            self.users.insert(Arc::from(user), ());
        }
        Ok(found.is_some())
    }

    async fn register_users(&self, users: &[(String, Option<String>)]) -> Result<usize> {
        let now = now_ms();
        let mut tx = self.master.begin().await?;
        for (id, nick) in users {
            sqlx::query(
                "INSERT INTO users (user_id, nickname, created_at) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE nickname = COALESCE(?, nickname)",
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
            .fetch_optional(&self.replica)
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
        .execute(&self.master)
        .await?;
        Ok(())
    }

    async fn set_block(&self, user: &str, other: &str, blocked: bool) -> Result<()> {
        if blocked {
            sqlx::query(
                "INSERT IGNORE INTO blocks (user_id, blocked_id, created_at) VALUES (?, ?, ?)",
            )
            .bind(user)
            .bind(other)
            .bind(now_ms())
            .execute(&self.master)
            .await?;
        } else {
            sqlx::query("DELETE FROM blocks WHERE user_id = ? AND blocked_id = ?")
                .bind(user)
                .bind(other)
                .execute(&self.master)
                .await?;
        }
        self.blocks.remove(user);
        if let Some(r) = &self.redis {
            if let Err(e) = r.publish(BLOCKS_CHANNEL, user).await {
                tracing::warn!(error = %e, %user, "block change not announced; other processes may use the old list until they reload");
            }
        }
        Ok(())
    }

    async fn blocks_of(&self, user: &str) -> Result<Vec<String>> {
        let rows: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT blocked_id FROM blocks WHERE user_id = ? ORDER BY blocked_id",
        )
        .bind(user)
        .fetch_all(&self.master)
        .await?;
        rows.into_iter()
            .map(|b| {
                String::from_utf8(b)
                    .map_err(|e| Error::Backend(format!("mysql: an id is not UTF-8: {e}")))
            })
            .collect()
    }

    async fn is_blocked(&self, blocker: &str, sender: &str) -> Result<bool> {
        if let Some(set) = self.blocks.get(blocker) {
            return Ok(set.contains(sender));
        }
        let set: std::collections::HashSet<String> =
            self.blocks_of(blocker).await?.into_iter().collect();
        let hit = set.contains(sender);
        self.blocks.insert(Arc::from(blocker), Arc::new(set));
        Ok(hit)
    }

    async fn set_device(&self, user: &str, device: &Device) -> Result<()> {
        sqlx::query(
            "INSERT INTO devices (user_id, platform, push_token, provider, updated_at) VALUES (?, ?, ?, ?, ?) \
             ON DUPLICATE KEY UPDATE push_token = VALUES(push_token), provider = VALUES(provider), \
             updated_at = VALUES(updated_at)",
        )
        .bind(user)
        .bind(device.platform)
        .bind(&device.push_token)
        .bind(&device.provider)
        .bind(now_ms())
        .execute(&self.master)
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
        .execute(&self.master)
        .await?;
        Ok(())
    }

    async fn file(&self, file_id: &str) -> Result<Option<FileRow>> {
        let row = sqlx::query(
            "SELECT file_id, owner, name, size, content_type, created_at, CAST(complete AS SIGNED) \
             FROM files WHERE file_id = ?",
        )
        .bind(file_id)
        .fetch_optional(&self.master)
        .await?;
        row.map(|r| {
            Ok(FileRow {
                file_id: id(&r, 0)?,
                owner: id(&r, 1)?,
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
            .execute(&self.master)
            .await?;
        Ok(())
    }

    async fn link_file(&self, file_id: &str, conversation_id: &str, members_to: u64) -> Result<()> {
        sqlx::query(
            "INSERT INTO file_conversations (file_id, conversation_id, members_to) VALUES (?, ?, ?) \
             ON DUPLICATE KEY UPDATE members_to = GREATEST(members_to, VALUES(members_to))",
        )
        .bind(file_id)
        .bind(conversation_id)
        .bind(members_to as i64)
        .execute(&self.master)
        .await?;
        Ok(())
    }

    async fn file_conversations(&self, file_id: &str) -> Result<Vec<(String, u64)>> {
        let rows = sqlx::query(
            "SELECT conversation_id, members_to FROM file_conversations WHERE file_id = ?",
        )
        .bind(file_id)
        .fetch_all(&self.master)
        .await?;
        rows.iter()
            .map(|r| Ok((id(r, 0)?, r.try_get::<i64, _>(1)? as u64)))
            .collect()
    }

    async fn unlink_file(&self, file_id: &str, conversation_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM file_conversations WHERE file_id = ? AND conversation_id = ?")
            .bind(file_id)
            .bind(conversation_id)
            .execute(&self.master)
            .await?;
        Ok(())
    }

    async fn devices_of(&self, user: &str) -> Result<Vec<Device>> {
        let rows = sqlx::query(
            "SELECT platform, push_token, provider FROM devices WHERE user_id = ? ORDER BY platform",
        )
        .bind(user)
        .fetch_all(&self.master)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Device {
                    platform: r.try_get::<i8, _>(0)? as u8,
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
            for r in q.fetch_all(&self.master).await? {
                found.push(PushDevice {
                    user_id: id(&r, 0)?,
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
            .fetch_optional(&self.master)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn set_last_seen(&self, users: &[(Arc<str>, i64)]) -> Result<()> {
        let mut tx = self.master.begin().await?;
        for (u, at) in users {
            sqlx::query("UPDATE users SET last_seen = GREATEST(last_seen, ?) WHERE user_id = ?")
                .bind(*at)
                .bind(&**u)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn token_generation(&self, user: &str, platform: u8) -> Result<u64> {
        if let Some(r) = &self.redis {
            match r.cached_generation(user, platform).await {
                Ok(Some(g)) => return Ok(g),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "token cache unavailable; asking mysql"),
            }
        }
        let g: Option<u64> = sqlx::query_scalar(
            "SELECT generation FROM token_generations WHERE user_id = ? AND platform = ?",
        )
        .bind(user)
        .bind(platform)
        .fetch_optional(&self.master)
        .await?;
        let g = g.unwrap_or(0);
        if let Some(r) = &self.redis {
            if let Err(e) = r.cache_generation(user, platform, g).await {
                tracing::warn!(error = %e, "token cache not updated");
            }
        }
        Ok(g)
    }

    async fn bump_generation(&self, user: &str, platforms: &[u8]) -> Result<()> {
        let mut tx = self.master.begin().await?;
        let mut now = Vec::with_capacity(platforms.len());
        for &p in platforms {
            sqlx::query(
                "INSERT INTO token_generations (user_id, platform, generation) VALUES (?, ?, 1) \
                 ON DUPLICATE KEY UPDATE generation = generation + 1",
            )
            .bind(user)
            .bind(p)
            .execute(&mut *tx)
            .await?;
            let g: u64 = sqlx::query_scalar(
                "SELECT generation FROM token_generations WHERE user_id = ? AND platform = ?",
            )
            .bind(user)
            .bind(p)
            .fetch_one(&mut *tx)
            .await?;
            now.push((p, g));
        }
        tx.commit().await?;
        if let Some(r) = &self.redis {
            for (p, g) in now {
                // The new generation goes into the cache (deleting it would
                // let a verify racing this logout cache the old one for an
                // hour). This must succeed, or the logout fails and is
                // retried.
                r.cache_generation(user, p, g).await?;
            }
        }
        Ok(())
    }

    async fn group(&self, group_id: &str) -> Result<Option<Arc<GroupState>>> {
        if let Some(g) = self.groups.get(group_id) {
            return Ok(Some(g.clone()));
        }
        let epoch = self.group_epoch.load(std::sync::atomic::Ordering::SeqCst);
        let Some(state) = self.load_group(group_id).await? else {
            return Ok(None);
        };
        let state = Arc::new(state);
        if self.group_epoch.load(std::sync::atomic::Ordering::SeqCst) == epoch {
            self.groups.insert(state.group_id.clone(), state.clone());
        }
        Ok(Some(state))
    }

    async fn group_fresh(&self, group_id: &str) -> Result<Option<Arc<GroupState>>> {
        let Some(state) = self.load_group(group_id).await? else {
            self.groups.remove(group_id);
            return Ok(None);
        };
        let state = Arc::new(state);
        self.groups.insert(state.group_id.clone(), state.clone());
        Ok(Some(state))
    }

    async fn create_group(
        &self,
        group_id: &str,
        name: &str,
        owner: &str,
        members: &[String],
    ) -> Result<()> {
        self.check_users_exist(members).await?;
        let _guard = self.group_writes.lock().await;
        let mut tx = self.master.begin().await?;
        let inserted = sqlx::query(
            "INSERT IGNORE INTO `groups` (group_id, name, owner, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(group_id)
        .bind(name)
        .bind(owner)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(ImError::conflict(format!("group {group_id} already exists")).into());
        }
        sqlx::query(
            "INSERT INTO group_members (group_id, user_id, role, min_seq) VALUES (?, ?, ?, NULL)",
        )
        .bind(group_id)
        .bind(owner)
        .bind(Role::Owner as i8)
        .execute(&mut *tx)
        .await?;
        Self::insert_members(&mut tx, group_id, members).await?;
        tx.commit().await?;
        self.refresh_group(group_id).await
    }

    async fn add_members(&self, group_id: &str, users: &[String]) -> Result<Vec<String>> {
        self.check_users_exist(users).await?;
        let _guard = self.group_writes.lock().await;
        let mut tx = self.master.begin().await?;
        Self::insert_members(&mut tx, group_id, users).await?;
        let mut waiting = Vec::new();
        for u in users {
            let pending: Option<Option<u64>> = sqlx::query_scalar(
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
            .execute(&self.master)
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
            "UPDATE `groups` SET name = COALESCE(?, name), notice = COALESCE(?, notice), \
             avatar_url = COALESCE(?, avatar_url) WHERE group_id = ?",
        )
        .bind(changes.name.as_deref())
        .bind(changes.notice.as_deref())
        .bind(changes.avatar_url.as_deref())
        .bind(group_id)
        .execute(&self.master)
        .await?;
        self.refresh_group(group_id).await
    }

    async fn set_group_muted(&self, group_id: &str, muted: bool) -> Result<()> {
        self.change_group(
            group_id,
            "UPDATE `groups` SET muted = ? WHERE group_id = ?",
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
        let mut tx = self.master.begin().await?;
        for (user, role) in [(from, Role::Admin), (to, Role::Owner)] {
            sqlx::query("UPDATE group_members SET role = ? WHERE group_id = ? AND user_id = ?")
                .bind(role as i8)
                .bind(group_id)
                .bind(user)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE `groups` SET owner = ? WHERE group_id = ?")
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
            "UPDATE `groups` SET dismissed = 1 WHERE group_id = ?",
            &[],
        )
        .await
    }

    async fn set_min_seq(&self, group_id: &str, users: &[String], seq: u64) -> Result<()> {
        let _guard = self.group_writes.lock().await;
        let mut tx = self.master.begin().await?;
        for u in users {
            sqlx::query(
                "UPDATE group_members SET min_seq = ? WHERE group_id = ? AND user_id = ? AND min_seq IS NULL",
            )
            .bind(seq)
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
               JOIN `groups` g ON g.group_id = gm.group_id \
              WHERE gm.user_id = ? ORDER BY g.group_id",
        )
        .bind(user)
        .fetch_all(&self.master)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    id(&r, 0)?,
                    r.try_get(1)?,
                    Role::from_i64(r.try_get::<i8, _>(2)? as i64),
                ))
            })
            .collect()
    }

    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationRow>> {
        let rows = sqlx::query(
            "SELECT uc.conversation_id, uc.read_seq, CAST(1 AS UNSIGNED), uc.pinned, uc.muted, uc.changed_at \
               FROM user_conversations uc \
              WHERE uc.user_id = ? AND uc.conversation_id LIKE 'si\\_%' \
             UNION ALL \
             SELECT CONCAT('sg_', gm.group_id), CAST(COALESCE(uc.read_seq, 0) AS UNSIGNED), \
                    CAST(gm.min_seq AS UNSIGNED), COALESCE(uc.pinned, 0), COALESCE(uc.muted, 0), \
                    COALESCE(uc.changed_at, 0) \
               FROM group_members gm \
               LEFT JOIN user_conversations uc \
                 ON uc.user_id = gm.user_id AND uc.conversation_id = CONCAT('sg_', gm.group_id) \
              WHERE gm.user_id = ? AND gm.min_seq IS NOT NULL",
        )
        .bind(user)
        .bind(user)
        .fetch_all(&self.replica)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ConversationRow {
                    conversation_id: id(&r, 0)?,
                    read_seq: r.try_get::<u64, _>(1)?,
                    min_seq: r.try_get::<u64, _>(2)?.max(1),
                    pinned: r.try_get::<i64, _>(3)? != 0,
                    muted: r.try_get::<i64, _>(4)? != 0,
                    changed_at: r.try_get(5)?,
                })
            })
            .collect()
    }

    async fn open_single_chats(&self, conversations: &[Arc<str>]) -> Result<()> {
        let rows = super::single_chat_rows(conversations);
        // One statement per chunk: a burst of new chats (a client fleet's
        // first messages) must not cost a round trip each.
        for chunk in rows.chunks(500) {
            let mut q: sqlx::QueryBuilder<sqlx::MySql> = sqlx::QueryBuilder::new(
                "INSERT IGNORE INTO user_conversations (user_id, conversation_id) ",
            );
            q.push_values(chunk, |mut b, (user, conv)| {
                b.push_bind(&**user).push_bind(*conv);
            });
            q.build().execute(&self.master).await?;
        }
        Ok(())
    }

    async fn set_read(&self, user: &str, conversation: &str, seq: u64) -> Result<u64> {
        sqlx::query(
            "INSERT INTO user_conversations (user_id, conversation_id, read_seq, changed_at) VALUES (?, ?, ?, ?) \
             ON DUPLICATE KEY UPDATE read_seq = GREATEST(read_seq, VALUES(read_seq)), changed_at = VALUES(changed_at)",
        )
        .bind(user)
        .bind(conversation)
        .bind(seq)
        .bind(now_ms())
        .execute(&self.master)
        .await?;
        let v: u64 = sqlx::query_scalar(
            "SELECT read_seq FROM user_conversations WHERE user_id = ? AND conversation_id = ?",
        )
        .bind(user)
        .bind(conversation)
        .fetch_one(&self.master)
        .await?;
        Ok(v)
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
             VALUES (?, ?, COALESCE(?, 0), COALESCE(?, 0), ?) \
             ON DUPLICATE KEY UPDATE pinned = COALESCE(?, pinned), muted = COALESCE(?, muted), \
             changed_at = VALUES(changed_at)",
        )
        .bind(user)
        .bind(conversation)
        .bind(pinned.map(i8::from))
        .bind(muted.map(i8::from))
        .bind(now_ms())
        .bind(pinned.map(i8::from))
        .bind(muted.map(i8::from))
        .execute(&self.master)
        .await?;
        Ok(())
    }

    async fn close(&self) {
        self.replica.close().await;
        self.master.close().await;
    }
}

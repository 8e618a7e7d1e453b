//! Bulk setup over REST: users, tokens, groups.

use futures::{stream, StreamExt, TryStreamExt};
use serde_json::{json, Value};

pub struct Rest {
    pub base: String,
    pub admin_secret: String,
    pub http: reqwest::Client,
}

impl Rest {
    pub fn new(base: &str, admin_secret: &str) -> Self {
        Rest {
            base: base.trim_end_matches('/').to_string(),
            admin_secret: admin_secret.to_string(),
            http: reqwest::Client::new(),
        }
    }

    async fn admin(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("X-Admin-Secret", &self.admin_secret)
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            anyhow::bail!("{path}: {status} {v}");
        }
        Ok(v)
    }

    pub async fn register(&self, users: &[String]) -> anyhow::Result<()> {
        for chunk in users.chunks(1000) {
            let list: Vec<Value> = chunk.iter().map(|u| json!({"user_id": u})).collect();
            self.admin("/auth/register", json!({"users": list})).await?;
        }
        Ok(())
    }

    /// A token per user, fetched with bounded concurrency.
    pub async fn tokens(&self, users: &[String], platform: u8) -> anyhow::Result<Vec<String>> {
        stream::iter(users.iter())
            .map(|u| async move {
                let v = self
                    .admin("/auth/token", json!({"user_id": u, "platform": platform}))
                    .await?;
                v["token"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow::anyhow!("no token in {v}"))
            })
            .buffered(32)
            .try_collect()
            .await
    }

    /// Create `group_id` owned by the holder of `owner_token` with `members`.
    pub async fn group(
        &self,
        owner_token: &str,
        group_id: &str,
        members: &[String],
    ) -> anyhow::Result<()> {
        let first = members.len().min(1000);
        let r = self
            .http
            .post(format!("{}/groups", self.base))
            .bearer_auth(owner_token)
            .json(&json!({"group_id": group_id, "name": group_id, "members": &members[..first]}))
            .send()
            .await?;
        if r.status().as_u16() != 201 {
            anyhow::bail!(
                "create group: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        for chunk in members[first..].chunks(1000) {
            let r = self
                .http
                .post(format!("{}/groups/{group_id}/members", self.base))
                .bearer_auth(owner_token)
                .json(&json!({"user_ids": chunk}))
                .send()
                .await?;
            if !r.status().is_success() {
                anyhow::bail!(
                    "add members: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                );
            }
        }
        Ok(())
    }
}

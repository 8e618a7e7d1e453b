//! Finding the other processes of a cluster through etcd.
//!
//! Every process puts one key under a lease: `PREFIX/ROLE/ADDR` → its
//! [`Member`] as JSON. The lease is kept alive while the process runs and
//! revoked when it stops; a process that dies stops renewing it, and etcd
//! deletes the key when the TTL runs out. Readers keep a [`watch`] of the
//! whole prefix, re-listed on every change (processes come and go rarely, so
//! a full list is simpler than applying deltas and cannot drift).

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// Seconds a dead process stays listed at most.
pub const LEASE_TTL_SECS: i64 = 5;

/// One running process, as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its process kind: a process group of `pipeline.yaml`, `gateway` or `api`.
    pub role: String,
    pub index: u32,
    pub host: String,
    /// Where its internal RPC (and /healthz, /metrics) listens, `host:port`.
    pub addr: String,
    pub pid: u32,
    /// The stage kinds it runs (for operators' tools).
    #[serde(default)]
    pub kinds: Vec<String>,
    /// The roles its stages provide, e.g. `ingest-door`: how doors find
    /// the processes that take sends, whatever their group or kinds.
    #[serde(default)]
    pub provides: Vec<String>,
}

#[derive(Clone)]
pub struct Discovery {
    client: Client,
    prefix: String,
    endpoints: String,
}

fn etcd_err(endpoints: &str, e: impl std::fmt::Display) -> Error {
    Error::Discovery(format!("etcd.etcdAddr ({endpoints}): {e}"))
}

impl Discovery {
    /// Connect to etcd (with `user`, a name and password, when its auth is
    /// on); fails within seconds naming the setting.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        user: Option<(&str, &str)>,
    ) -> Result<Discovery, Error> {
        let joined = endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5));
        if let Some((name, password)) = user {
            options = options.with_user(name, password);
        }
        let mut client = tokio::time::timeout(
            Duration::from_secs(5),
            Client::connect(endpoints, Some(options)),
        )
        .await
        .map_err(|_| etcd_err(&joined, "no answer within 5 s"))?
        .map_err(|e| etcd_err(&joined, e))?;
        // connect() is lazy about the server; ask it something.
        client
            .status()
            .await
            .map_err(|e| etcd_err(&joined, format!("not answering: {e}")))?;
        Ok(Discovery {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            endpoints: joined,
        })
    }

    fn key(&self, m: &Member) -> String {
        format!("{}/{}/{}", self.prefix, m.role, m.addr)
    }

    /// Announce `me` until `stop` is cancelled; the key is gone at once on a
    /// clean stop and within [`LEASE_TTL_SECS`] after a crash. A lost lease
    /// (etcd restarted, a long pause) is granted and announced again.
    pub async fn register(
        &self,
        me: Member,
        stop: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, Error> {
        let lease = self.announce(&me).await?;
        let d = self.clone();
        Ok(tokio::spawn(async move {
            let mut lease = Some(lease);
            loop {
                let id = match lease {
                    Some(id) => id,
                    None => match d.announce(&me).await {
                        Ok(id) => id,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot announce this process in etcd; retrying");
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            }
                        }
                    },
                };
                match d.keep_alive(id, &stop).await {
                    Ok(()) => {
                        let mut c = d.client.clone();
                        let _ = c.lease_revoke(id).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd lease lost; announcing again");
                        lease = None;
                    }
                }
            }
        }))
    }

    async fn announce(&self, me: &Member) -> Result<i64, Error> {
        let mut c = self.client.clone();
        let grant = c
            .lease_grant(LEASE_TTL_SECS, None)
            .await
            .map_err(|e| etcd_err(&self.endpoints, e))?;
        let value = serde_json::to_string(me).map_err(|e| etcd_err(&self.endpoints, e))?;
        c.put(
            self.key(me),
            value,
            Some(PutOptions::new().with_lease(grant.id())),
        )
        .await
        .map_err(|e| etcd_err(&self.endpoints, e))?;
        tracing::info!(role = %me.role, addr = %me.addr, "announced in etcd");
        Ok(grant.id())
    }

    /// Renew lease `id` every third of its TTL; Ok when stopped, Err when
    /// the lease is gone.
    async fn keep_alive(&self, id: i64, stop: &CancellationToken) -> Result<(), Error> {
        let mut c = self.client.clone();
        let (mut keeper, mut answers) = c
            .lease_keep_alive(id)
            .await
            .map_err(|e| etcd_err(&self.endpoints, e))?;
        let every = Duration::from_millis((LEASE_TTL_SECS as u64 * 1000) / 3);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(every) => {}
            }
            keeper
                .keep_alive()
                .await
                .map_err(|e| etcd_err(&self.endpoints, e))?;
            match answers.message().await {
                Ok(Some(r)) if r.ttl() > 0 => {}
                Ok(_) => return Err(etcd_err(&self.endpoints, "the lease expired")),
                Err(e) => return Err(etcd_err(&self.endpoints, e)),
            }
        }
    }

    /// Every process announced now.
    pub async fn members(&self) -> Result<(Vec<Member>, i64), Error> {
        let mut c = self.client.clone();
        let resp = c
            .get(
                format!("{}/", self.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| etcd_err(&self.endpoints, e))?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut out: Vec<Member> = resp
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        out.sort_by(|a, b| (&a.role, &a.addr).cmp(&(&b.role, &b.addr)));
        Ok((out, revision))
    }

    /// A live list of every announced process, kept current until `stop`.
    pub async fn watch(
        &self,
        stop: CancellationToken,
    ) -> Result<watch::Receiver<Vec<Member>>, Error> {
        let (first, revision) = self.members().await?;
        let (tx, rx) = watch::channel(first);
        let d = self.clone();
        tokio::spawn(async move {
            let mut from = revision + 1;
            let mut held = Held::default();
            loop {
                let grace_ends = held.next_deadline();
                let lost = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = d.follow(from, &tx, &mut held) => Some(e),
                    // The held members that never came back are dropped.
                    _ = sleep_until(grace_ends), if grace_ends.is_some() => None,
                };
                if let Some(e) = lost {
                    tracing::warn!(error = %e, "etcd watch lost; listing again");
                    held.lost(&tx.borrow());
                    // A watch that fails at once (a proxy ending streams,
                    // no leader) must not spin.
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                // Never follow again before a list succeeded: etcd may have
                // come back with its history gone, and a watch from the old
                // revision would wait for changes that already happened.
                loop {
                    match d.members().await {
                        Ok((list, rev)) => {
                            // etcd answers: the grace of what was lost
                            // starts now, however long it was away.
                            held.arm(Instant::now());
                            tx.send_replace(held.merge(list, Instant::now()));
                            from = rev + 1;
                            break;
                        }
                        Err(e) => tracing::debug!(error = %e, "etcd still away"),
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Watch from revision `from` and re-list on every change, until the
    /// watch fails or ends (what it returns says why).
    async fn follow(&self, from: i64, tx: &watch::Sender<Vec<Member>>, held: &mut Held) -> Error {
        let mut c = self.client.clone();
        let mut stream = match c
            .watch(
                format!("{}/", self.prefix),
                Some(WatchOptions::new().with_prefix().with_start_revision(from)),
            )
            .await
        {
            Ok(stream) => stream,
            Err(e) => return etcd_err(&self.endpoints, e),
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return etcd_err(&self.endpoints, "the watch ended"),
                Err(e) => return etcd_err(&self.endpoints, e),
            };
            if resp.canceled() {
                // Compacted past `from`, or etcd dropped the watch.
                return etcd_err(
                    &self.endpoints,
                    format!("watch cancelled: {}", resp.cancel_reason()),
                );
            }
            if resp.events().is_empty() {
                continue;
            }
            match self.members().await {
                Ok((list, _)) => {
                    tx.send_replace(held.merge(list, Instant::now()));
                }
                Err(e) => return e,
            }
        }
    }
}

/// After etcd was lost, a process it no longer lists may only not have
/// announced itself again yet (etcd came back empty, or the lease ran out
/// while etcd was away; a live process announces again within a second
/// of etcd's return). Dropping it at once would cost its work: a push
/// process forgets every connection of a gateway it drops. So the members
/// known when etcd was lost stay listed until they announce again or a
/// grace ends, counted from etcd's return (however long it was away); a
/// process that really died is then dropped, as its lease would have
/// been. A member keeps the grace it got first: losses in a row do not
/// keep a dead one listed.
const REANNOUNCE_GRACE: Duration = Duration::from_secs(2 * LEASE_TTL_SECS as u64);

#[derive(Default)]
struct Held {
    /// Each held member, and when its grace ends (None: etcd not back yet).
    members: Vec<(Member, Option<Instant>)>,
}

fn same(a: &Member, b: &Member) -> bool {
    (&a.role, &a.addr) == (&b.role, &b.addr)
}

impl Held {
    /// The watch was lost while `known` were listed.
    fn lost(&mut self, known: &[Member]) {
        for m in known {
            if !self.members.iter().any(|(h, _)| same(h, m)) {
                self.members.push((m.clone(), None));
            }
        }
    }

    /// etcd answers again: graces not started start at `now`.
    fn arm(&mut self, now: Instant) {
        for (_, until) in &mut self.members {
            until.get_or_insert(now + REANNOUNCE_GRACE);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.members.iter().filter_map(|(_, t)| *t).min()
    }

    /// `listed` plus the members still held; those listed again or past
    /// their grace are held no more.
    fn merge(&mut self, mut listed: Vec<Member>, now: Instant) -> Vec<Member> {
        self.members.retain(|(m, until)| {
            !listed.iter().any(|l| same(l, m)) && until.is_none_or(|t| now < t)
        });
        if !self.members.is_empty() {
            listed.extend(self.members.iter().map(|(m, _)| m.clone()));
            listed.sort_by(|a, b| (&a.role, &a.addr).cmp(&(&b.role, &b.addr)));
        }
        listed
    }
}

/// Until `t`; forever when there is none (the branch is disabled then).
async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(role: &str, addr: &str) -> Member {
        Member {
            role: role.into(),
            index: 0,
            host: "127.0.0.1".into(),
            addr: addr.into(),
            pid: 1,
            kinds: vec![],
            provides: vec![],
        }
    }

    #[test]
    fn members_known_when_etcd_was_lost_stay_listed_until_the_grace_ends() {
        let gateway = member("gateway", "g:1");
        let push = member("im_push", "p:1");
        let dead = member("im_msg", "m:1");
        let t0 = Instant::now();
        let mut held = Held::default();
        // Before any loss, a list is taken as it is.
        assert_eq!(held.merge(vec![push.clone()], t0), vec![push.clone()]);
        held.lost(&[gateway.clone(), push.clone(), dead.clone()]);
        // etcd is back (however long after): the grace starts now. The
        // push process announced again first.
        let back = t0 + Duration::from_secs(60);
        held.arm(back);
        assert_eq!(
            held.merge(vec![push.clone()], back),
            vec![gateway.clone(), dead.clone(), push.clone()]
        );
        // The gateway announces again; the watch is lost again meanwhile:
        // the dead one keeps its first grace.
        let again = back + Duration::from_secs(5);
        assert_eq!(
            held.merge(vec![gateway.clone(), push.clone()], again),
            vec![gateway.clone(), dead.clone(), push.clone()]
        );
        held.lost(&[gateway.clone(), dead.clone(), push.clone()]);
        held.arm(again + Duration::from_secs(1));
        let late = back + REANNOUNCE_GRACE;
        assert_eq!(
            held.merge(vec![gateway.clone(), push.clone()], late),
            vec![gateway.clone(), push.clone()],
            "the dead member is dropped at the end of its first grace"
        );
        assert_eq!(held.next_deadline(), None);
    }
}

//! Presence across the cluster: who is online anywhere, and one `user.online` /
//! `user.offline` webhook per transition for the whole cluster, not one per node.
//!
//! Each identity with connections has one record in a JetStream key-value bucket
//! (`<stream>_PRESENCE`): its connections per node process, and whether it was announced
//! online. Nodes change their own count with compare-and-set writes, coalesced per identity
//! (a connect storm costs one write per identity and batch, not per connection), so the
//! write that takes the total from 0 is the one that announces `user.online`, once. The write
//! that takes it to 0 stamps the time; `offline_after_secs` later, a check by that node posts
//! `user.offline` only if the total is still 0 and no other node announced it first (a
//! compare-and-set delete decides). A reconnect on any node within the debounce keeps the
//! identity online without a webhook.
//!
//! A node killed without closing its connections stops heartbeating in `<stream>_NODES`
//! (a key per process that expires after [`NODE_TTL`]); the other nodes then count it out
//! and sweep its entries from every record, so its identities go offline once. A drained
//! node deletes its heartbeat as it leaves. Every node also scans all records now and then
//! ([`SCAN_EVERY`]): entries of processes not heartbeating (also ones no living node ever
//! saw, after a whole cluster restarted) are swept, and an offline whose checking node went
//! away before its debounce ended is posted by whichever node gets there first.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Unavailable;
use crate::auth::Identity;
use crate::presence::{Webhooks, unix_now};

/// How often a node renews its heartbeat and lists the others'.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A heartbeat not renewed for this long is gone: its node counts as dead. Several beats
/// and request timeouts long, so a node that is only slow is not counted out.
pub const NODE_TTL: Duration = Duration::from_secs(15);
/// How often every record is looked at (see the module's comment).
const SCAN_EVERY: Duration = Duration::from_secs(60);
/// Compare-and-set attempts before a write is left for the next round.
const WRITE_TRIES: usize = 16;
/// A write or check NATS did not take is tried again after this.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// Records written at once.
const WRITES_IN_FLIGHT: usize = 32;

/// One identity's presence, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    tenant: Option<String>,
    user: String,
    /// Connections per node process (its instance id).
    nodes: BTreeMap<String, u32>,
    /// `user.online` was announced and `user.offline` not yet.
    online: bool,
    /// When the total last went to 0 (Unix seconds): the debounce runs from here.
    #[serde(default)]
    closed_at: f64,
    /// Names the write that last changed `online`: a node whose write NATS applied without
    /// acknowledging it in time finds its own mark and posts the webhook after all.
    #[serde(default)]
    mark: Option<String>,
}

impl Record {
    fn total(&self, dead: &HashSet<String>) -> u64 {
        self.nodes
            .iter()
            .filter(|(node, _)| !dead.contains(*node))
            .map(|(_, n)| u64::from(*n))
            .sum()
    }

    fn identity(&self) -> Identity {
        Identity {
            tenant: self.tenant.clone(),
            user: self.user.clone(),
        }
    }
}

/// The record's key: a digest of the identity (keys have a narrow alphabet; identities are
/// any UTF-8).
fn key_of(identity: &Identity) -> String {
    let mut digest = Sha256::new();
    digest.update(identity.tenant.as_deref().unwrap_or("").as_bytes());
    digest.update([0u8, u8::from(identity.tenant.is_some())]);
    digest.update(identity.user.as_bytes());
    let digest = digest.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// What a successful write did.
#[derive(Default)]
struct Written {
    /// It took the total from 0 with no announcement standing: `user.online` is due.
    announce: bool,
    /// The total is 0 and the identity still announced: an offline check is due then.
    check_at: Option<Instant>,
}

/// The presence of this node's identities in the cluster's shared record.
pub struct ClusterPresence {
    records: kv::Store,
    nodes: kv::Store,
    instance: String,
    /// The latest local connection count per identity, not yet written.
    dirty: Mutex<HashMap<Identity, u32>>,
    wake: Notify,
    /// Node processes seen heartbeating at the last listing.
    seen: Mutex<HashSet<String>>,
    /// Node processes found in records but not heartbeating at the last listing, with when
    /// they were first found so: dead if still absent from a listing made after that.
    suspects: Mutex<HashMap<String, Instant>>,
    /// Node processes gone: their counts no longer count (until one heartbeats again).
    dead: Mutex<HashSet<String>>,
    /// This node's own counts, to write again after its heartbeat lapsed (the others may
    /// have counted it out meanwhile).
    local: Mutex<HashMap<Identity, u32>>,
    /// Nodes to sweep now, from the heartbeat task.
    gone: Mutex<Vec<String>>,
    /// Per identity, the mark of this node's last write that changed `online` and that NATS
    /// did not acknowledge in time.
    uncertain: Mutex<HashMap<Identity, String>>,
    webhooks: Option<Arc<Webhooks>>,
    offline_after: Duration,
    request_timeout: Duration,
    metrics: Arc<crate::metrics::Metrics>,
}

impl std::fmt::Debug for ClusterPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPresence")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl ClusterPresence {
    pub(super) fn new(
        records: kv::Store,
        nodes: kv::Store,
        instance: String,
        request_timeout: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        ClusterPresence {
            records,
            nodes,
            instance,
            dirty: Mutex::default(),
            wake: Notify::new(),
            seen: Mutex::default(),
            suspects: Mutex::default(),
            dead: Mutex::default(),
            local: Mutex::default(),
            gone: Mutex::default(),
            uncertain: Mutex::default(),
            webhooks: None,
            offline_after: Duration::ZERO,
            request_timeout,
            metrics,
        }
    }

    /// Posts the cluster's transitions through `webhooks` (set before the task runs).
    pub fn with_webhooks(mut self, webhooks: Arc<Webhooks>) -> Self {
        self.offline_after = webhooks.offline_after();
        self.webhooks = Some(webhooks);
        self
    }

    /// The identity now has `count` connections on this node. Called by the router under
    /// its shard lock, so counts arrive in order; the write happens in [`Self::run`].
    pub fn changed(&self, identity: &Identity, count: usize) {
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        match count {
            0 => lock(&self.local).remove(identity),
            n => lock(&self.local).insert(identity.clone(), n),
        };
        lock(&self.dirty).insert(identity.clone(), count);
        self.wake.notify_one();
    }

    /// The identity's connections across the cluster (nodes known dead left out).
    pub async fn connections(&self, identity: &Identity) -> Result<u64, Unavailable> {
        let entry = self.entry(&key_of(identity)).await?;
        let dead = lock(&self.dead).clone();
        Ok(entry.map_or(0, |(record, _)| record.total(&dead)))
    }

    /// Renews this node's heartbeat (its own task: nothing here may delay it), writes the
    /// counts that changed, sweeps dead nodes and posts offlines as they fall due, until
    /// shutdown; then leaves (the heartbeat goes, so the others sweep what this node's
    /// connections left).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // Before the first write: no record names this node before its heartbeat exists.
        self.beat().await;
        tokio::spawn(self.clone().heartbeat(shutdown.clone()));
        tokio::spawn(self.clone().scan_now_and_then(shutdown.clone()));
        let mut due: VecDeque<(Instant, Identity)> = VecDeque::new();
        let mut retry: Option<Instant> = None;
        loop {
            let next_due = due.iter().map(|(at, _)| *at).min();
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = sleep_until(next_due), if next_due.is_some() => {}
                () = sleep_until(retry), if retry.is_some() => retry = None,
            }
            let gone = std::mem::take(&mut *lock(&self.gone));
            if !gone.is_empty() {
                self.scan(&mut due).await;
            }
            if !self.write_dirty(&mut due).await {
                retry = Some(Instant::now() + RETRY_AFTER);
            }
            let now = Instant::now();
            let (ready, waiting): (Vec<_>, Vec<_>) = due.drain(..).partition(|(at, _)| *at <= now);
            due.extend(waiting);
            for (_, identity) in ready {
                if due.iter().any(|(_, waiting)| *waiting == identity) {
                    continue; // a later check of the same identity is queued
                }
                match self.check_offline(&identity).await {
                    Ok(None) => {}
                    Ok(Some(later)) => due.push_back((later, identity)),
                    Err(err) => {
                        tracing::debug!(error = %err, "presence: offline check failed; again shortly");
                        due.push_back((now + RETRY_AFTER, identity));
                    }
                }
            }
        }
        let _ = tokio::time::timeout(self.request_timeout, self.nodes.delete(&self.instance)).await;
    }

    /// Beats every [`HEARTBEAT`]; after a lapse long enough for the others to have counted
    /// this node out, writes all its counts again.
    async fn heartbeat(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.beat().await {
                continue;
            }
            if last.elapsed() >= NODE_TTL.saturating_sub(HEARTBEAT) {
                tracing::warn!("presence: this node's heartbeat lapsed; writing its counts again");
                let local = lock(&self.local).clone();
                lock(&self.dirty).extend(local);
            }
            last = Instant::now();
            self.wake.notify_one();
        }
    }

    /// Looks at every record every [`SCAN_EVERY`].
    async fn scan_now_and_then(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SCAN_EVERY);
        tick.tick().await; // the first look is a period after start
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut due = VecDeque::new();
            self.scan(&mut due).await;
            // Offlines found due, or falling due soon, are checked here.
            while let Some((at, identity)) = due.pop_front() {
                tokio::time::sleep_until(at).await;
                if let Ok(Some(later)) = self.check_offline(&identity).await {
                    due.push_back((later, identity));
                }
            }
        }
    }

    /// Writes every count that changed; false if some must be tried again.
    async fn write_dirty(&self, due: &mut VecDeque<(Instant, Identity)>) -> bool {
        let batch: Vec<(Identity, u32)> = std::mem::take(&mut *lock(&self.dirty))
            .into_iter()
            .collect();
        if batch.is_empty() {
            return true;
        }
        let results: Vec<_> = futures_util::stream::iter(batch)
            .map(|(identity, count)| async move {
                let result = self
                    .update(&key_of(&identity), Some(&identity), |record, instance| {
                        match count {
                            0 => record.nodes.remove(instance),
                            n => record.nodes.insert(instance.to_owned(), n),
                        };
                    })
                    .await;
                (identity, count, result)
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        let mut complete = true;
        for (identity, count, result) in results {
            match result {
                Ok(written) => self.after_write(identity, written, due),
                Err(err) => {
                    tracing::debug!(error = %err, "presence: write failed; again shortly");
                    complete = false;
                    // A newer count from meanwhile wins over this one.
                    lock(&self.dirty).entry(identity).or_insert(count);
                }
            }
        }
        complete
    }

    fn after_write(
        &self,
        identity: Identity,
        written: Written,
        due: &mut VecDeque<(Instant, Identity)>,
    ) {
        if written.announce
            && let Some(webhooks) = &self.webhooks
        {
            webhooks.post("user.online", identity.clone(), unix_now(), Instant::now());
        }
        if let Some(at) = written.check_at {
            due.push_back((at, identity));
        }
    }

    /// Reads, changes and writes one record with compare-and-set, until no other node wrote
    /// in between. `identity` makes a missing record (a sweep passes none: a missing record
    /// has nothing to sweep).
    async fn update(
        &self,
        key: &str,
        identity: Option<&Identity>,
        change: impl Fn(&mut Record, &str),
    ) -> Result<Written, Unavailable> {
        for _ in 0..WRITE_TRIES {
            let held = self.entry(key).await?;
            let (mut record, revision) = match (held, identity) {
                (Some((record, revision)), _) => (record, Some(revision)),
                (None, Some(identity)) => (
                    Record {
                        tenant: identity.tenant.clone(),
                        user: identity.user.clone(),
                        nodes: BTreeMap::new(),
                        online: false,
                        closed_at: 0.0,
                        mark: None,
                    },
                    None,
                ),
                (None, None) => return Ok(Written::default()),
            };
            self.suspect_strangers(&record);
            // An earlier write of ours that NATS took without acknowledging it: its webhook
            // is still to post.
            let landed = identity.is_some_and(|identity| self.uncertain_landed(identity, &record));
            if landed && !record.online {
                self.post_offline(&record);
            }
            let landed = landed && record.online;
            let dead = lock(&self.dead).clone();
            let before = record.total(&dead);
            change(&mut record, &self.instance);
            record
                .nodes
                .retain(|node, n| *n > 0 && !dead.contains(node));
            let after = record.total(&dead);
            let mut written = Written {
                announce: landed,
                check_at: None,
            };
            let mut mark = None;
            if after > 0 && !record.online {
                record.online = true;
                written.announce = true;
                mark = Some(uuid::Uuid::new_v4().simple().to_string());
                record.mark = mark.clone();
            }
            if after == 0 && before > 0 {
                record.closed_at = unix_now();
            }
            if after == 0 && record.online {
                written.check_at = Some(Instant::now() + self.offline_after);
            }
            let result = if after == 0 && !record.online {
                // Offline and announced so (or never announced): nothing to keep.
                match revision {
                    Some(revision) => self.delete(key, revision).await,
                    None => return Ok(written),
                }
            } else {
                self.put(key, &record, revision).await
            };
            match result {
                Ok(true) => return Ok(written),
                Ok(false) => continue, // another node wrote in between
                Err(err) => {
                    if let (Some(mark), Some(identity)) = (mark, identity) {
                        lock(&self.uncertain).insert(identity.clone(), mark);
                    }
                    return Err(err);
                }
            }
        }
        Err(Unavailable(
            "the presence record kept changing under concurrent writes".into(),
        ))
    }

    /// Whether this node's unacknowledged write for `identity` is the one `record` shows
    /// (forgotten either way: a record without its mark never got it, or it was replaced).
    fn uncertain_landed(&self, identity: &Identity, record: &Record) -> bool {
        let mark = lock(&self.uncertain).remove(identity);
        mark.is_some() && mark == record.mark
    }

    /// `offline_after` past the last close: `user.offline` if the identity is still away
    /// everywhere and no other node posted it; `Some(when)` if the debounce (run from the
    /// record's last close, wherever it was) has not passed yet.
    async fn check_offline(&self, identity: &Identity) -> Result<Option<Instant>, Unavailable> {
        let key = key_of(identity);
        for _ in 0..WRITE_TRIES {
            let Some((mut record, revision)) = self.entry(&key).await? else {
                lock(&self.uncertain).remove(identity);
                return Ok(None); // another node finished it
            };
            if self.uncertain_landed(identity, &record) && !record.online {
                self.post_offline(&record); // our earlier write took after all
                return Ok(None);
            }
            let dead = lock(&self.dead).clone();
            if record.total(&dead) > 0 || !record.online {
                return Ok(None);
            }
            let left = record.closed_at + self.offline_after.as_secs_f64() - unix_now();
            if left > 0.0 {
                return Ok(Some(Instant::now() + Duration::from_secs_f64(left)));
            }
            // Marked offline, not deleted, so that a write NATS takes without acknowledging
            // it can be recognised; the record goes at its next write or the next scan.
            let mark = uuid::Uuid::new_v4().simple().to_string();
            record.online = false;
            record.mark = Some(mark.clone());
            record.nodes.clear();
            match self.put(&key, &record, Some(revision)).await {
                Ok(true) => {
                    self.post_offline(&record);
                    return Ok(None);
                }
                Ok(false) => continue,
                Err(err) => {
                    lock(&self.uncertain).insert(identity.clone(), mark);
                    return Err(err);
                }
            }
        }
        Err(Unavailable("the presence record kept changing".into()))
    }

    fn post_offline(&self, record: &Record) {
        if let Some(webhooks) = &self.webhooks {
            let ago = Duration::from_secs_f64((unix_now() - record.closed_at).max(0.0));
            let since = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
            webhooks.post("user.offline", record.identity(), record.closed_at, since);
        }
    }

    /// Renews this node's heartbeat and lists the others'. Nodes seen before (or found in
    /// records since an earlier listing) and absent now are dead, and queued to be swept;
    /// a node heartbeating again is alive again. False if NATS did not answer.
    async fn beat(&self) -> bool {
        let started = Instant::now();
        let now = unix_now().to_string();
        let put = self.nodes.put(&self.instance, now.into_bytes().into());
        if !matches!(
            tokio::time::timeout(self.request_timeout, put).await,
            Ok(Ok(_))
        ) {
            return false;
        }
        let listing = async {
            let mut keys = self.nodes.keys().await.ok()?;
            let mut alive = HashSet::new();
            while let Some(key) = keys.next().await {
                alive.insert(key.ok()?);
            }
            Some(alive)
        };
        let Ok(Some(alive)) = tokio::time::timeout(self.request_timeout, listing).await else {
            return false;
        };
        self.metrics.cluster_nodes.set(alive.len() as i64);
        let mut gone: Vec<String> = {
            let seen = lock(&self.seen);
            seen.iter()
                .filter(|node| !alive.contains(*node) && **node != self.instance)
                .cloned()
                .collect()
        };
        {
            let mut suspects = lock(&self.suspects);
            suspects.retain(|node, found| {
                if alive.contains(node) {
                    return false;
                }
                if *found < started {
                    gone.push(node.clone());
                    return false;
                }
                true
            });
        }
        let mut dead = lock(&self.dead);
        dead.retain(|node| !alive.contains(node));
        gone.retain(|node| dead.insert(node.clone()));
        drop(dead);
        *lock(&self.seen) = alive;
        if !gone.is_empty() {
            tracing::info!(nodes = ?gone, "presence: nodes stopped heartbeating; their connections are counted out");
            lock(&self.gone).extend(gone);
            self.wake.notify_one();
        }
        true
    }

    /// Notes the node processes a record names that were not heartbeating at the last
    /// listing (a node that started since, or one that died before this node saw it).
    fn suspect_strangers(&self, record: &Record) {
        let seen = lock(&self.seen);
        if seen.is_empty() {
            return; // no listing yet
        }
        let dead = lock(&self.dead);
        let mut suspects = lock(&self.suspects);
        for node in record.nodes.keys() {
            if !seen.contains(node) && !dead.contains(node) && *node != self.instance {
                suspects.entry(node.clone()).or_insert_with(Instant::now);
            }
        }
    }

    /// Looks at every record: counts of dead nodes are swept (and strangers noted), and an
    /// identity left at 0 and still announced gets its offline check queued.
    async fn scan(&self, due: &mut VecDeque<(Instant, Identity)>) {
        let listing = async {
            let mut keys = self.records.keys().await.ok()?;
            let mut all = Vec::new();
            while let Some(key) = keys.next().await {
                all.push(key.ok()?);
            }
            Some(all)
        };
        let Ok(Some(keys)) = tokio::time::timeout(self.request_timeout * 4, listing).await else {
            tracing::debug!("presence: cannot list the records; the next scan tries again");
            return;
        };
        for key in keys {
            let Ok(Some((record, _))) = self.entry(&key).await else {
                continue;
            };
            self.suspect_strangers(&record);
            let dead = lock(&self.dead).clone();
            let identity = record.identity();
            if record.nodes.keys().any(|node| dead.contains(node)) {
                match self.update(&key, None, |_, _| {}).await {
                    Ok(written) => self.after_write(identity, written, due),
                    Err(err) => tracing::debug!(error = %err, "presence: sweep write failed"),
                }
            } else if record.total(&dead) == 0 {
                match record.online {
                    true => due.push_back((Instant::now(), identity)),
                    // Announced offline: the record goes (unless written meanwhile).
                    false => {
                        let _ = self.update(&key, None, |_, _| {}).await;
                    }
                }
            }
        }
    }

    async fn entry(&self, key: &str) -> Result<Option<(Record, u64)>, Unavailable> {
        let entry = tokio::time::timeout(self.request_timeout, self.records.entry(key))
            .await
            .map_err(|_| Unavailable("presence read timed out".into()))?
            .map_err(|e| Unavailable(e.to_string()))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| Some((serde_json::from_slice(&e.value).ok()?, e.revision))))
    }

    /// Writes `record` if the key is still at `revision` (absent for `None`); false if
    /// another node wrote first.
    async fn put(
        &self,
        key: &str,
        record: &Record,
        revision: Option<u64>,
    ) -> Result<bool, Unavailable> {
        let value = serde_json::to_vec(record)
            .map_err(|e| Unavailable(e.to_string()))?
            .into();
        let write = async {
            match revision {
                Some(revision) => match self.records.update(key, value, revision).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                    Err(e) => Err(Unavailable(e.to_string())),
                },
                None => match self.records.create(key, value).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(Unavailable(e.to_string())),
                },
            }
        };
        tokio::time::timeout(self.request_timeout, write)
            .await
            .map_err(|_| Unavailable("presence write timed out".into()))?
    }

    /// Deletes the key if it is still at `revision`; false if another node wrote first.
    async fn delete(&self, key: &str, revision: u64) -> Result<bool, Unavailable> {
        let delete = self.records.delete_expect_revision(key, Some(revision));
        match tokio::time::timeout(self.request_timeout, delete).await {
            Err(_) => Err(Unavailable("presence delete timed out".into())),
            Ok(Ok(())) => Ok(true),
            // The server answers a stale revision with "wrong last sequence".
            Ok(Err(e)) if e.to_string().contains("wrong last sequence") => Ok(false),
            Ok(Err(e)) => Err(Unavailable(e.to_string())),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tell_identities_apart_and_use_the_key_alphabet() {
        let a = Identity {
            tenant: None,
            user: "alice".into(),
        };
        let b = Identity {
            tenant: Some(String::new()),
            user: "alice".into(),
        };
        let c = Identity {
            tenant: Some("acme".into()),
            user: "alice".into(),
        };
        let keys: HashSet<_> = [&a, &b, &c].map(key_of).into_iter().collect();
        assert_eq!(keys.len(), 3);
        assert!(
            keys.iter()
                .all(|k| k.len() == 32 && k.chars().all(|c| c.is_ascii_hexdigit()))
        );
        assert_eq!(key_of(&a), key_of(&a.clone()));
    }
}

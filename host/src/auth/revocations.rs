//! Tokens revoked before their expiry (`POST /v1/disconnect` with `revoke_secs`), bounded
//! per tenant and in all.

use std::collections::HashMap;
use std::sync::RwLock;

use super::{Claims, Identity, now_secs};

/// Longest a revocation may last: a token outliving it is a token policy problem.
pub const MAX_REVOCATION_SECS: u64 = 30 * 24 * 3600;

/// Tokens refused before their expiry: all of an identity's tokens issued up to a moment
/// (logged out everywhere, account suspended), or those of one token session (`sid`).
/// Each entry lasts until the operator's `until`, which should cover the tokens' lifetime.
///
/// Bounded per tenant (`limits.max_revocations_per_tenant`) and in all
/// (`limits.max_revocations`); past a bound a new revocation is refused, never an old one
/// forgotten early.
#[derive(Debug)]
pub struct Revocations {
    entries: RwLock<RevocationTable>,
    per_tenant: usize,
    total: usize,
}

#[derive(Debug, Default)]
struct RevocationTable {
    entries: HashMap<(Identity, Option<String>), Revocation>,
    /// Entries per tenant, for the quota without a scan.
    per_tenant: HashMap<Option<String>, usize>,
}

#[derive(Debug, Clone, Copy)]
struct Revocation {
    /// When it was made: identity-wide, tokens issued at or before this are refused.
    at: u64,
    until: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RevocationsFull {
    #[error(
        "tenant {tenant:?} holds {limit} revocations in force (limits.max_revocations_per_tenant); \
         the sessions were closed, the tokens are not revoked: retry when some have expired"
    )]
    Tenant {
        tenant: Option<String>,
        limit: usize,
    },
    #[error(
        "{limit} revocations are in force on this node (limits.max_revocations); the sessions \
         were closed, the tokens are not revoked: retry when some have expired"
    )]
    Node { limit: usize },
}

impl Default for Revocations {
    fn default() -> Self {
        let limits = crate::config::Limits::default();
        Self::new(limits.max_revocations_per_tenant, limits.max_revocations)
    }
}

impl Revocations {
    pub fn new(per_tenant: usize, total: usize) -> Self {
        Revocations {
            entries: RwLock::new(RevocationTable::default()),
            per_tenant,
            total,
        }
    }

    /// Refuses, until `until`, the tokens of `sid` (with one) or every token of `identity`
    /// issued up to now (without).
    pub fn revoke(
        &self,
        identity: Identity,
        sid: Option<String>,
        until: u64,
    ) -> Result<(), RevocationsFull> {
        self.revoke_at(identity, sid, now_secs(), until)
    }

    /// Whether a revocation of this target would be held now (one already in force always
    /// is: it is merged).
    pub fn has_room(&self, identity: &Identity, sid: Option<&str>) -> Result<(), RevocationsFull> {
        let table = self.entries.read().unwrap_or_else(|p| p.into_inner());
        self.room(&table, &(identity.clone(), sid.map(str::to_owned)))
    }

    fn room(
        &self,
        table: &RevocationTable,
        key: &(Identity, Option<String>),
    ) -> Result<(), RevocationsFull> {
        if table.entries.contains_key(key) {
            return Ok(());
        }
        let tenant = &key.0.tenant;
        if table.per_tenant.get(tenant).copied().unwrap_or(0) >= self.per_tenant {
            return Err(RevocationsFull::Tenant {
                tenant: tenant.clone(),
                limit: self.per_tenant,
            });
        }
        if table.entries.len() >= self.total {
            return Err(RevocationsFull::Node { limit: self.total });
        }
        Ok(())
    }

    /// [`Revocations::revoke`] as made at `at`: another node's, learnt through the cluster.
    /// A revocation of a target that already has one never weakens it: the two merge into
    /// the later `at` (more tokens refused) and the later `until`.
    pub fn revoke_at(
        &self,
        identity: Identity,
        sid: Option<String>,
        at: u64,
        until: u64,
    ) -> Result<(), RevocationsFull> {
        let mut table = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let key = (identity, sid);
        self.room(&table, &key)?;
        let tenant = key.0.tenant.clone();
        match table.entries.get_mut(&key) {
            Some(held) => {
                held.at = held.at.max(at);
                held.until = held.until.max(until);
            }
            None => {
                table.entries.insert(key, Revocation { at, until });
                *table.per_tenant.entry(tenant).or_default() += 1;
            }
        }
        Ok(())
    }

    /// Whether `claims` belong to a revoked token. A token without `iat` cannot show it
    /// came after an identity-wide revocation, so it is refused while that lasts.
    pub fn refuses(&self, claims: &Claims, now: u64) -> bool {
        let table = self.entries.read().unwrap_or_else(|p| p.into_inner());
        if table.entries.is_empty() {
            return false;
        }
        let identity = claims.identity();
        let whole = table
            .entries
            .get(&(identity.clone(), None))
            .is_some_and(|r| now < r.until && claims.iat.is_none_or(|iat| iat <= r.at));
        let session = claims.sid.as_ref().is_some_and(|sid| {
            table
                .entries
                .get(&(identity, Some(sid.clone())))
                .is_some_and(|r| now < r.until)
        });
        whole || session
    }

    /// Forgets revocations that have run out.
    pub fn expire(&self, now: u64) {
        let mut table = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let RevocationTable {
            entries,
            per_tenant,
        } = &mut *table;
        entries.retain(|(identity, _), r| {
            let keep = now < r.until;
            if !keep && let Some(n) = per_tenant.get_mut(&identity.tenant) {
                *n -= 1;
            }
            keep
        });
        per_tenant.retain(|_, n| *n > 0);
    }

    pub fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

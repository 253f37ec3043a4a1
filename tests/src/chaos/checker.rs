//! The checker: judges the recorded history against the gateway's guarantees.
//!
//! - **misdelivered**: an event frame whose payload names another identity, or an event id
//!   no publisher sent to this identity, or an event frame without a `seq`.
//! - **duplicated**: one connection got a `seq` twice, or an event at or before its `since`,
//!   or one event id under two `seq`s (stored twice despite its `idempotency_key`; in
//!   embedded mode only within one start of the node, since a restart forgets the keys).
//! - **order**: a connection's `seq`s did not strictly increase.
//! - **lost**: each well-behaved client is a chain of connections, each resuming from the
//!   last `seq` the chain received. A connection owes every acknowledged event of its
//!   identity after its `since` when it was told `recovered:true`, and, when it connected
//!   without `since` or was told `recovered:false`, every event first sent after its
//!   welcome. An owed event below a `seq` the connection received is a hole; one not
//!   received before the connection closed passes to the next resume; after the final
//!   catch-up nothing may be left. In cluster mode a `since=0` audit per identity must hold
//!   every acknowledged event.
//! - **false recovered**: `recovered:true` on a resume that then missed an event
//!   acknowledged before it answered, or `recovered:false` where nothing was evicted:
//!   retention is far beyond the run, so only a restarted embedded node (or `too_many`)
//!   excuses it.
//! - **affected**: a well-behaved client's connection closed as if it had misbehaved (1002,
//!   1007, 1008, 1009, 1011, 4000, 4001).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::nemesis::FaultRecord;
use super::workload::{Connection, Publication, Role};
use super::{Identity, Mode, ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Misdelivered,
    Lost,
    Duplicated,
    FalseRecovered,
    Order,
    Affected,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub kind: Kind,
    pub identity: String,
    pub connection: Option<u64>,
    pub seq: Option<u64>,
    pub event: Option<String>,
    pub what: String,
    /// The shortest history that shows it: the publish, the connections involved (their
    /// deliveries near the `seq`), and the faults around them.
    pub excerpt: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    pub deliveries: u64,
    pub connections: u64,
    pub counts: BTreeMap<Kind, u64>,
    pub violations: Vec<Violation>,
    /// Resumes by outcome, e.g. `recovered`, `not_recovered:unknown_position`.
    pub resumes: BTreeMap<String, u64>,
    /// `recovered:false` answers the checker found justified (restarted embedded node).
    pub justified_not_recovered: u64,
    /// Close codes by role (`client:1001`, `flood:1008`, `client:transport`...).
    pub closes: BTreeMap<String, u64>,
    pub published: u64,
    pub acknowledged: u64,
    pub unacknowledged: u64,
    pub duplicate_receipts: u64,
    pub publish_attempts: u64,
}

impl Verdict {
    pub fn count(&self, kind: Kind) -> u64 {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    pub fn clean(&self) -> bool {
        self.counts.values().all(|&n| n == 0)
    }
}

pub struct History<'a> {
    pub mode: Mode,
    pub identities: &'a [Identity],
    pub connections: &'a [Connection],
    pub publications: &'a [Publication],
    pub faults: &'a [FaultRecord],
    pub max_replay_events: usize,
}

/// Violations kept with their excerpts (the counts hold them all).
const MAX_REPORTED: usize = 50;

struct Checker<'a> {
    h: &'a History<'a>,
    by_id: HashMap<&'a str, &'a Publication>,
    /// Each identity's acknowledged events by `seq`.
    acked: Vec<BTreeMap<u64, &'a Publication>>,
    by_connection: HashMap<u64, &'a Connection>,
    verdict: Verdict,
}

pub fn check(h: &History<'_>) -> Verdict {
    let mut acked = vec![BTreeMap::new(); h.identities.len()];
    for p in h.publications {
        if let Some(ack) = &p.ack {
            acked[p.identity].insert(ack.seq, p);
        }
    }
    let mut checker = Checker {
        h,
        by_id: h.publications.iter().map(|p| (p.id.as_str(), p)).collect(),
        acked,
        by_connection: h.connections.iter().map(|c| (c.id, c)).collect(),
        verdict: Verdict::default(),
    };
    checker.publications();
    for c in h.connections {
        checker.connection(c);
    }
    checker.stored_once();
    let mut chains: BTreeMap<usize, Vec<&Connection>> = BTreeMap::new();
    for c in h.connections {
        if let (Some(client), Role::Client | Role::CatchUp) = (c.client, c.role) {
            chains.entry(client).or_default().push(c);
        }
    }
    for chain in chains.values_mut() {
        chain.sort_by_key(|c| (c.t_connect, c.id));
        checker.chain(chain);
    }
    if h.mode == Mode::Cluster {
        let mut audits: BTreeMap<usize, Vec<&Connection>> = BTreeMap::new();
        for c in h.connections.iter().filter(|c| c.role == Role::Audit) {
            audits.entry(c.identity).or_default().push(c);
        }
        for (identity, audit) in audits {
            checker.audit(identity, &audit);
        }
    }
    checker.verdict
}

impl<'a> Checker<'a> {
    fn label(&self, identity: usize) -> String {
        self.h.identities[identity].label()
    }

    fn publications(&mut self) {
        let v = &mut self.verdict;
        for p in self.h.publications {
            v.published += 1;
            v.publish_attempts += u64::from(p.attempts);
            match &p.ack {
                Some(ack) => {
                    v.acknowledged += 1;
                    v.duplicate_receipts += u64::from(ack.duplicate);
                }
                None => v.unacknowledged += 1,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn violation(
        &mut self,
        kind: Kind,
        identity: usize,
        connections: &[&Connection],
        seq: Option<u64>,
        event: Option<&str>,
        what: String,
    ) {
        *self.verdict.counts.entry(kind).or_default() += 1;
        if self.verdict.violations.len() >= MAX_REPORTED {
            return;
        }
        let excerpt = self.excerpt(connections, seq, event);
        self.verdict.violations.push(Violation {
            kind,
            identity: self.label(identity),
            connection: connections.last().map(|c| c.id),
            seq,
            event: event.map(str::to_string),
            what,
            excerpt,
        });
    }

    /// Per connection: identity, order, duplicates; counts deliveries and closes.
    fn connection(&mut self, c: &'a Connection) {
        self.verdict.connections += 1;
        self.verdict.deliveries += c.events.len() as u64;
        let role = serde_json::to_value(c.role).unwrap();
        let code = match c.close_code {
            Some(code) => code.to_string(),
            None => format!("{:?}", c.closed_by).to_lowercase(),
        };
        *self
            .verdict
            .closes
            .entry(format!("{}:{code}", role.as_str().unwrap_or("?")))
            .or_default() += 1;
        if let Some(r) = &c.resumed {
            let key = if r.recovered {
                "recovered".to_string()
            } else {
                format!(
                    "not_recovered:{}",
                    r.reason.as_deref().unwrap_or("no reason")
                )
            };
            *self.verdict.resumes.entry(key).or_default() += 1;
        }
        let me = self.label(c.identity);
        let mut seqs = HashSet::new();
        let mut ids: HashMap<&str, u64> = HashMap::new();
        let mut highest: Option<u64> = None;
        for d in &c.events {
            let known = d.id.as_deref().and_then(|id| self.by_id.get(id).copied());
            if d.who.as_deref() != Some(me.as_str()) {
                self.violation(
                    Kind::Misdelivered,
                    c.identity,
                    &[c],
                    Some(d.seq),
                    d.id.as_deref(),
                    format!(
                        "event for {:?} delivered to a connection of {me}",
                        d.who.as_deref().unwrap_or("nobody")
                    ),
                );
            } else if known.is_none_or(|p| p.identity != c.identity) {
                self.violation(
                    Kind::Misdelivered,
                    c.identity,
                    &[c],
                    Some(d.seq),
                    d.id.as_deref(),
                    "an event id no publisher sent to this identity".into(),
                );
            }
            if !seqs.insert(d.seq) {
                self.violation(
                    Kind::Duplicated,
                    c.identity,
                    &[c],
                    Some(d.seq),
                    d.id.as_deref(),
                    format!("seq {} delivered twice to one connection", d.seq),
                );
                continue;
            }
            if let Some(since) = c.since
                && since > 0
                && d.seq <= since
            {
                self.violation(
                    Kind::Duplicated,
                    c.identity,
                    &[c],
                    Some(d.seq),
                    d.id.as_deref(),
                    format!("seq {} replayed to a resume with since={since}", d.seq),
                );
            }
            if let Some(high) = highest
                && d.seq < high
            {
                self.violation(
                    Kind::Order,
                    c.identity,
                    &[c],
                    Some(d.seq),
                    d.id.as_deref(),
                    format!("seq {} after seq {high}", d.seq),
                );
            }
            highest = highest.max(Some(d.seq));
            if let Some(id) = d.id.as_deref()
                && let Some(other) = ids.insert(id, d.seq)
                && other != d.seq
            {
                self.violation(
                    Kind::Duplicated,
                    c.identity,
                    &[c],
                    Some(d.seq),
                    Some(id),
                    format!("event {id} delivered twice, as seq {other} and {}", d.seq),
                );
            }
        }
        for frame in &c.malformed {
            self.violation(
                Kind::Misdelivered,
                c.identity,
                &[c],
                None,
                None,
                format!("an event frame without a seq: {frame}"),
            );
        }
        let good = matches!(c.role, Role::Client | Role::CatchUp | Role::Audit);
        if good
            && matches!(
                c.close_code,
                Some(1002 | 1007 | 1008 | 1009 | 1011 | 4000 | 4001)
            )
        {
            self.violation(
                Kind::Affected,
                c.identity,
                &[c],
                None,
                None,
                format!(
                    "a well-behaved client closed with {} {:?}",
                    c.close_code.unwrap_or(0),
                    c.close_reason
                ),
            );
        }
    }

    /// Each event id stored under one `seq` (per start of the node in embedded mode).
    fn stored_once(&mut self) {
        // id -> (incarnation or 0) -> seqs, with a connection that saw each.
        let mut seen: BTreeMap<&str, BTreeMap<u64, BTreeMap<u64, Option<u64>>>> = BTreeMap::new();
        let scope = |incarnation: u64| match self.h.mode {
            Mode::Cluster => 0,
            Mode::Embedded => incarnation,
        };
        for p in self.h.publications {
            if let Some(ack) = &p.ack {
                seen.entry(&p.id)
                    .or_default()
                    .entry(scope(ack.incarnation))
                    .or_default()
                    .insert(ack.seq, None);
            }
        }
        for c in self.h.connections {
            for d in &c.events {
                if let Some(id) = d.id.as_deref() {
                    seen.entry(id)
                        .or_default()
                        .entry(scope(c.incarnation))
                        .or_default()
                        .entry(d.seq)
                        .or_insert(Some(c.id));
                }
            }
        }
        let mut found = Vec::new();
        for (id, scopes) in &seen {
            for seqs in scopes.values() {
                if seqs.len() > 1 {
                    found.push((*id, seqs.clone()));
                }
            }
        }
        for (id, seqs) in found {
            let Some(p) = self.by_id.get(id).copied() else {
                continue;
            };
            let connections: Vec<&Connection> = seqs
                .values()
                .flatten()
                .filter_map(|c| self.by_connection.get(c).copied())
                .collect();
            self.violation(
                Kind::Duplicated,
                p.identity,
                &connections,
                seqs.keys().next().copied(),
                Some(id),
                format!(
                    "event {id} stored twice despite its idempotency_key: seqs {:?}",
                    seqs.keys().collect::<Vec<_>>()
                ),
            );
        }
    }

    /// Whether a `recovered:false` answer to connection `k` of `chain` is justified.
    fn justified(&self, chain: &[&Connection], k: usize) -> Result<String, String> {
        let c = chain[k];
        let since = c.since.unwrap_or(0);
        let r = c.resumed.as_ref().unwrap();
        let acked = &self.acked[c.identity];
        if r.reason.as_deref() == Some("too_many") {
            let after = acked.range(since + 1..).count();
            let unsure = self
                .h
                .publications
                .iter()
                .filter(|p| p.identity == c.identity && p.ack.is_none())
                .count();
            return if after + unsure >= self.h.max_replay_events {
                Ok(format!("{after} events after since"))
            } else {
                Err(format!(
                    "too_many with {after} acknowledged events after since={since}, limit {}",
                    self.h.max_replay_events
                ))
            };
        }
        if self.h.mode == Mode::Cluster {
            return Err("nothing is evicted in this run (retention 100000 events, 1 day)".into());
        }
        if since == 0 {
            // An identity the restarted log holds no event of cannot vouch for its start.
            let held = acked.values().any(|p| {
                let ack = p.ack.as_ref().unwrap();
                ack.incarnation == c.incarnation && ack.t < c.t_welcome.unwrap_or(c.t_connect)
            });
            return if held {
                Err(format!(
                    "since=0 while start {} of the node held acknowledged events of it",
                    c.incarnation
                ))
            } else {
                Ok("since=0 on an identity new to this start of the node".into())
            };
        }
        let source = chain[..k]
            .iter()
            .rev()
            .find(|p| p.events.iter().any(|d| d.seq == since));
        match source {
            Some(source) if source.incarnation == c.incarnation => Err(format!(
                "since={since} came from start {} of the node, which still served the resume",
                source.incarnation
            )),
            Some(source) => Ok(format!(
                "since from start {}, resumed on start {}",
                source.incarnation, c.incarnation
            )),
            None => Ok("since of unknown origin".into()),
        }
    }

    /// One client's chain of connections: holes, losses, false recoveries.
    fn chain(&mut self, chain: &[&'a Connection]) {
        let identity = chain[0].identity;
        let acked = self.acked[identity].clone();
        let mut pending: BTreeMap<u64, &Publication> = BTreeMap::new();
        let mut received: HashSet<u64> = HashSet::new();
        // The connection whose start set what is pending.
        let mut origin: Option<usize> = None;
        let mut reported: HashSet<u64> = HashSet::new();
        // The last connection that got a welcome.
        let mut done: Option<usize> = None;
        for (k, &c) in chain.iter().enumerate() {
            let Some(t_welcome) = c.t_welcome else {
                continue;
            };
            let since_welcome = |pending: &mut BTreeMap<u64, &'a Publication>| {
                *pending = acked
                    .iter()
                    .filter(|(seq, p)| p.t_first >= t_welcome && !received.contains(seq))
                    .map(|(s, p)| (*s, *p))
                    .collect();
            };
            match (c.since, &c.resumed) {
                (None, _) => {
                    since_welcome(&mut pending);
                    origin = Some(k);
                }
                (Some(since), Some(r)) if r.recovered => {
                    pending = acked
                        .range(since + 1..)
                        .filter(|(seq, _)| !received.contains(seq))
                        .map(|(s, p)| (*s, *p))
                        .collect();
                    origin = Some(k);
                }
                (Some(since), Some(_)) => {
                    match self.justified(chain, k) {
                        Ok(_) => self.verdict.justified_not_recovered += 1,
                        Err(why) => {
                            let from = k.saturating_sub(1);
                            self.violation(
                                Kind::FalseRecovered,
                                identity,
                                &chain[from..=k],
                                Some(since),
                                None,
                                format!("recovered:false without cause: {why}"),
                            );
                        }
                    }
                    since_welcome(&mut pending);
                    origin = Some(k);
                }
                // Closed before the resume was answered: nothing changes.
                (Some(_), None) => {}
            }
            for d in &c.events {
                pending.remove(&d.seq);
                received.insert(d.seq);
            }
            let highest = c.last_seq();
            let holes: Vec<(u64, &Publication)> = pending
                .iter()
                .filter(|(seq, _)| highest.is_some_and(|h| **seq < h))
                .map(|(s, p)| (*s, *p))
                .collect();
            for (seq, p) in holes {
                pending.remove(&seq);
                let what = format!(
                    "hole: acknowledged seq {seq} missing below seq {} on one connection",
                    highest.unwrap_or(0)
                );
                self.lost(chain, origin.unwrap_or(k), k, seq, p, what, &mut reported);
            }
            done = Some(k);
        }
        // Whatever is still owed after the last connection never arrived.
        let Some(k) = done else {
            return;
        };
        let caught_up = chain[k].role == Role::CatchUp;
        for (seq, p) in std::mem::take(&mut pending) {
            let what = if caught_up {
                format!("acknowledged seq {seq} never arrived, not even at the final catch-up")
            } else {
                format!("acknowledged seq {seq} never arrived; the final catch-up did not connect")
            };
            self.lost(chain, origin.unwrap_or(k), k, seq, p, what, &mut reported);
        }
    }

    /// Reports a lost event, and the resume that vouched for it if there was one: a
    /// `recovered:true` answered after the event was acknowledged.
    #[allow(clippy::too_many_arguments)]
    fn lost(
        &mut self,
        chain: &[&'a Connection],
        from: usize,
        k: usize,
        seq: u64,
        p: &Publication,
        what: String,
        reported: &mut HashSet<u64>,
    ) {
        let from = from.min(k);
        let identity = chain[k].identity;
        self.violation(
            Kind::Lost,
            identity,
            &chain[from..=k],
            Some(seq),
            Some(&p.id),
            what,
        );
        let o = chain[from];
        if let (Some(r), Some(ack)) = (&o.resumed, &p.ack)
            && r.recovered
            && ack.t <= r.t
            && reported.insert(o.id)
        {
            self.violation(
                Kind::FalseRecovered,
                identity,
                &chain[from..=k],
                Some(seq),
                Some(&p.id),
                format!(
                    "recovered:true (since={:?}, head={:?}) but acknowledged seq {seq} was not replayed",
                    o.since, r.head
                ),
            );
        }
    }

    /// A `since=0` read at the end must hold every acknowledged event of the identity.
    fn audit(&mut self, identity: usize, audit: &[&'a Connection]) {
        let Some(c) = audit.iter().rev().find(|c| c.resumed.is_some()).copied() else {
            self.violation(
                Kind::Lost,
                identity,
                audit,
                None,
                None,
                "the since=0 audit never got an answer".into(),
            );
            return;
        };
        let r = c.resumed.as_ref().unwrap();
        if !r.recovered {
            if let Err(why) = self.justified(&[c], 0) {
                self.violation(
                    Kind::FalseRecovered,
                    identity,
                    &[c],
                    None,
                    None,
                    format!("since=0 audit: recovered:false without cause: {why}"),
                );
            }
            return;
        }
        let got: HashSet<u64> = c.events.iter().map(|d| d.seq).collect();
        let missing: Vec<(u64, &Publication)> = self.acked[identity]
            .iter()
            .filter(|(seq, _)| !got.contains(seq))
            .map(|(s, p)| (*s, *p))
            .collect();
        for (seq, p) in missing {
            self.violation(
                Kind::Lost,
                identity,
                &[c],
                Some(seq),
                Some(&p.id),
                format!("acknowledged seq {seq} missing from the stream (since=0 audit)"),
            );
        }
    }

    fn excerpt(
        &self,
        connections: &[&Connection],
        seq: Option<u64>,
        event: Option<&str>,
    ) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(p) = event.and_then(|id| self.by_id.get(id)) {
            let ack = match &p.ack {
                Some(a) => format!(
                    "acknowledged seq {} at {}ms by node {} start {}{}",
                    a.seq,
                    ms(a.t),
                    a.node,
                    a.incarnation,
                    if a.duplicate { " (duplicate)" } else { "" }
                ),
                None => format!("never acknowledged ({:?})", p.errors),
            };
            lines.push(format!(
                "publish {} to {}{}: first sent {}ms, {} attempts, {ack}",
                p.id,
                self.label(p.identity),
                if p.batch { " in a batch" } else { "" },
                ms(p.t_first),
                p.attempts
            ));
        }
        let shown: Vec<&&Connection> = if connections.len() > 6 {
            connections[connections.len() - 6..].iter().collect()
        } else {
            connections.iter().collect()
        };
        for c in &shown {
            let resumed = match &c.resumed {
                Some(r) => format!(
                    " resumed(recovered:{} reason:{:?} head:{:?} earliest:{:?} replayed:{:?} at {}ms)",
                    r.recovered,
                    r.reason,
                    r.head,
                    r.earliest,
                    r.replayed,
                    ms(r.t)
                ),
                None => String::new(),
            };
            lines.push(format!(
                "conn #{} {:?} of {} on node {} start {} since={:?} connect {}ms welcome {:?}ms{resumed}",
                c.id,
                c.role,
                self.label(c.identity),
                c.node,
                c.incarnation,
                c.since,
                ms(c.t_connect),
                c.t_welcome.map(ms),
            ));
            let n = c.events.len();
            let at = seq
                .map(|s| c.events.iter().position(|d| d.seq >= s).unwrap_or(n))
                .unwrap_or(0);
            let from = at.saturating_sub(3);
            let to = (at + 3).min(n);
            if from > 0 {
                lines.push(format!("  ... {from} events before"));
            }
            for d in &c.events[from..to] {
                lines.push(format!(
                    "  seq {} {} for {} at {}ms",
                    d.seq,
                    d.id.as_deref().unwrap_or("?"),
                    d.who.as_deref().unwrap_or("?"),
                    ms(d.t)
                ));
            }
            if to < n {
                lines.push(format!(
                    "  ... {} events after (last seq {})",
                    n - to,
                    c.events[n - 1].seq
                ));
            }
            lines.push(format!(
                "  closed {}ms by {:?} code {:?} {:?}",
                ms(c.t_close),
                c.closed_by,
                c.close_code,
                c.close_reason
            ));
        }
        if let (Some(first), Some(last)) = (shown.first(), shown.last()) {
            let from = first.t_connect.saturating_sub(2_000_000);
            let to = last.t_close + 1_000_000;
            for f in self.h.faults {
                if f.t_healed >= from && f.t_start <= to {
                    lines.push(format!(
                        "fault {:?} {} from {}ms to {}ms ({})",
                        f.fault,
                        f.target,
                        ms(f.t_start),
                        ms(f.t_healed),
                        f.detail
                    ));
                }
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::workload::{Ack, ClosedBy, Delivery, Resumed};

    fn identities() -> Vec<Identity> {
        Identity::all(1)
    }

    /// Event `id` of identity 0 (`ta/u0`), first sent at `t` ms, acknowledged as `seq`.
    fn published(id: &str, seq: u64, t: u64) -> Publication {
        Publication {
            id: id.into(),
            identity: 0,
            batch: false,
            t_first: t * 1000,
            attempts: 1,
            ack: Some(Ack {
                seq,
                t: t * 1000 + 5,
                node: 0,
                incarnation: 1,
                duplicate: false,
            }),
            errors: Vec::new(),
        }
    }

    /// A connection of client 0 (identity 0) open from `from` to `to` ms, with `events`
    /// as (seq, event id), told `recovered` when it resumed.
    fn connection(
        id: u64,
        role: Role,
        since: Option<u64>,
        recovered: Option<bool>,
        (from, to): (u64, u64),
        events: &[(u64, &str)],
    ) -> Connection {
        Connection {
            id,
            client: Some(0),
            role,
            identity: 0,
            node: 0,
            incarnation: 1,
            since,
            t_connect: from * 1000,
            t_welcome: Some(from * 1000 + 1),
            resumed: recovered.map(|recovered| Resumed {
                recovered,
                reason: (!recovered).then(|| "unknown_position".into()),
                head: None,
                earliest: None,
                replayed: None,
                t: from * 1000 + 2,
            }),
            events: events
                .iter()
                .map(|(seq, id)| Delivery {
                    seq: *seq,
                    id: Some((*id).into()),
                    who: Some("ta/u0".into()),
                    t: from * 1000 + 3,
                })
                .collect(),
            malformed: Vec::new(),
            other_frames: 0,
            t_close: to * 1000,
            close_code: None,
            close_reason: String::new(),
            closed_by: ClosedBy::Client,
        }
    }

    fn verdict(mode: Mode, connections: &[Connection], publications: &[Publication]) -> Verdict {
        check(&History {
            mode,
            identities: &identities(),
            connections,
            publications,
            faults: &[],
            max_replay_events: 4000,
        })
    }

    fn events() -> Vec<Publication> {
        vec![
            published("a", 10, 100),
            published("b", 11, 200),
            published("c", 12, 300),
        ]
    }

    #[test]
    fn a_chain_that_resumes_and_catches_up_is_clean() {
        let connections = [
            connection(
                0,
                Role::Client,
                None,
                None,
                (50, 250),
                &[(10, "a"), (11, "b")],
            ),
            connection(1, Role::Client, Some(11), Some(true), (260, 280), &[]),
            connection(
                2,
                Role::CatchUp,
                Some(11),
                Some(true),
                (400, 500),
                &[(12, "c")],
            ),
        ];
        let v = verdict(Mode::Cluster, &connections, &events());
        assert!(v.clean(), "{:?}", v.violations);
        assert_eq!(v.deliveries, 3);
    }

    #[test]
    fn a_hole_a_missed_replay_and_a_missing_catch_up_are_lost() {
        // Connected before every publish, got 10 and 12 but not 11.
        let hole = [connection(
            0,
            Role::Client,
            None,
            None,
            (50, 500),
            &[(10, "a"), (12, "c")],
        )];
        let v = verdict(Mode::Cluster, &hole, &events());
        assert_eq!(v.count(Kind::Lost), 1, "{:?}", v.violations);

        // Resumed after 10 with recovered:true (after 11 was acknowledged): 11 never came.
        let missed = [
            connection(0, Role::Client, None, None, (50, 150), &[(10, "a")]),
            connection(
                1,
                Role::CatchUp,
                Some(10),
                Some(true),
                (250, 500),
                &[(12, "c")],
            ),
        ];
        let v = verdict(Mode::Cluster, &missed, &events());
        assert_eq!(v.count(Kind::Lost), 1, "{:?}", v.violations);
        assert_eq!(v.count(Kind::FalseRecovered), 1, "{:?}", v.violations);

        // The catch-up ended without the last event.
        let short = [
            connection(
                0,
                Role::Client,
                None,
                None,
                (50, 250),
                &[(10, "a"), (11, "b")],
            ),
            connection(1, Role::CatchUp, Some(11), Some(true), (400, 500), &[]),
        ];
        let v = verdict(Mode::Cluster, &short, &events());
        assert_eq!(v.count(Kind::Lost), 1, "{:?}", v.violations);
    }

    #[test]
    fn misdeliveries_and_duplicates_are_found() {
        let mut foreign = connection(0, Role::Client, None, None, (50, 500), &[]);
        foreign.events.push(Delivery {
            seq: 10,
            id: Some("a".into()),
            who: Some("tb/u0".into()),
            t: 60_000,
        });
        let v = verdict(Mode::Cluster, &[foreign], &events());
        assert_eq!(v.count(Kind::Misdelivered), 1, "{:?}", v.violations);

        let twice = [
            connection(
                0,
                Role::Client,
                None,
                None,
                (50, 250),
                &[(10, "a"), (11, "b"), (11, "b")],
            ),
            connection(
                1,
                Role::CatchUp,
                Some(11),
                Some(true),
                (400, 500),
                &[(11, "b"), (12, "c")],
            ),
        ];
        let v = verdict(Mode::Cluster, &twice, &events());
        // Twice on one connection, and once more at or before the resume's since.
        assert_eq!(v.count(Kind::Duplicated), 2, "{:?}", v.violations);

        // One event stored under two seqs.
        let copies = [connection(
            0,
            Role::CatchUp,
            None,
            None,
            (50, 500),
            &[(10, "a"), (11, "b"), (12, "c"), (13, "c")],
        )];
        let v = verdict(Mode::Cluster, &copies, &events());
        assert!(v.count(Kind::Duplicated) >= 1, "{:?}", v.violations);
        assert_eq!(v.count(Kind::Order), 0, "{:?}", v.violations);
    }

    #[test]
    fn recovered_false_is_excused_only_by_a_restarted_embedded_node() {
        let chain = |incarnation: u64| {
            let mut after = connection(1, Role::CatchUp, Some(10), Some(false), (400, 500), &[]);
            after.incarnation = incarnation;
            [
                connection(0, Role::Client, None, None, (50, 150), &[(10, "a")]),
                after,
            ]
        };
        // Only "a" was published: nothing is owed after the recovered:false.
        let only_a = &events()[..1];
        let v = verdict(Mode::Embedded, &chain(2), only_a);
        assert!(v.clean(), "{:?}", v.violations);
        assert_eq!(v.justified_not_recovered, 1);
        let v = verdict(Mode::Embedded, &chain(1), only_a);
        assert_eq!(v.count(Kind::FalseRecovered), 1, "{:?}", v.violations);
        let v = verdict(Mode::Cluster, &chain(2), only_a);
        assert_eq!(v.count(Kind::FalseRecovered), 1, "{:?}", v.violations);
    }
}

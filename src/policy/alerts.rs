//! Privacy Officer alerts: break glass, refused break glass and self-claimed legitimate
//! relationships. Bounded and in memory, newest first; the audit trail makes them durable.
//!
//! An alert carries the caller (sub, role, organisation), the request id (which joins it to the
//! audit record naming the patient) and the stated reason, which the Privacy Officer must read.
//! The reason is free text that may mention the patient, so it is never logged.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::UNIX_EPOCH,
};

use serde::Serialize;

use super::PolicyRequest;

/// Alerts kept in memory; older ones drop off (the audit trail keeps every one).
pub const ALERT_CAPACITY: usize = 1000;
/// Stated reasons are cut to this many characters.
const REASON_MAX_CHARS: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertKind {
    BreakGlass,
    BreakGlassRefused,
    SelfClaimedRelationship,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    /// Increasing id, unique within this process.
    pub seq: u64,
    pub kind: AlertKind,
    /// Seconds since the Unix epoch, from the request's `now`.
    pub at_unix: u64,
    pub request_id: String,
    pub sub: String,
    pub role: String,
    pub org: String,
    pub purpose: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct AlertLog {
    seq: AtomicU64,
    total: AtomicU64,
    ring: Mutex<VecDeque<Alert>>,
}

impl AlertLog {
    pub fn raise(&self, kind: AlertKind, req: &PolicyRequest, reason: &str) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        let p = req.principal;
        let alert = Alert {
            seq,
            kind,
            at_unix: req
                .now
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            request_id: req.request_id.to_string(),
            sub: p.sub.clone(),
            role: p.role.clone(),
            org: p.org.as_str().to_string(),
            purpose: p.purpose.clone(),
            reason: reason.trim().chars().take(REASON_MAX_CHARS).collect(),
        };
        tracing::warn!(
            kind = ?kind,
            request_id = %req.request_id,
            role = %p.role,
            org = %p.org,
            "Privacy Officer alert raised."
        );
        if let Ok(mut ring) = self.ring.lock() {
            if ring.len() == ALERT_CAPACITY {
                ring.pop_back();
            }
            ring.push_front(alert);
        }
    }

    /// Alerts in memory, newest first.
    pub fn recent(&self) -> Vec<Alert> {
        self.ring
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every alert raised since start, including those no longer in memory.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

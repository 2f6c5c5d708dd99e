//! The audit trail: one record per request that reached the data, written before the
//! response leaves. If the record cannot be written, nothing is released.
//!
//! Records are JSON lines in `<audit-dir>/audit.jsonl`, appended and flushed per request.
//! They hold who asked, for which patient (the audit trail is the one place the NHS number is
//! written down), why, what each source did, and how much was released and withheld.
//! Durability (fsync, group commit) and tamper evidence (hash chain) come with the
//! observability and audit issue.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::{fs::OpenOptions, io::AsyncWriteExt, sync::Mutex};

/// One request's record.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub sub: &'a str,
    pub role: &'a str,
    pub org: &'a str,
    pub purpose: &'a str,
    pub patient: String,
    pub action: &'a str,
    pub break_glass: Option<&'a str>,
    pub relationship_claim: Option<&'a str>,
    pub sources: Vec<AuditSource<'a>>,
    pub released: usize,
    pub withheld: bool,
}

#[derive(Debug, Serialize)]
pub struct AuditSource<'a> {
    pub ods: &'a str,
    pub outcome: &'static str,
}

/// Why a record could not be written. The response becomes a 503.
#[derive(Debug, thiserror::Error)]
#[error("audit record could not be written: {0}")]
pub struct AuditError(String);

impl AuditError {
    /// The write did not finish by the request's deadline.
    pub fn timed_out() -> Self {
        Self("the write did not finish before the request's deadline".to_owned())
    }
}

/// The append-only audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<Option<tokio::fs::File>>,
}

impl AuditLog {
    /// Opens (creating) `dir/audit.jsonl`; fails when the directory cannot be written.
    pub async fn open(dir: &Path) -> Result<Self, AuditError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| AuditError(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("audit.jsonl");
        let file = open_append(&path).await?;
        Ok(Self {
            path,
            file: Mutex::new(Some(file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and flushes it to the operating system.
    pub async fn write(&self, record: &AuditRecord<'_>) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(record).map_err(|e| AuditError(e.to_string()))?;
        line.push(b'\n');
        let mut guard = self.file.lock().await;
        if guard.is_none() {
            *guard = Some(open_append(&self.path).await?);
        }
        let Some(file) = guard.as_mut() else {
            return Err(AuditError("audit file unavailable".into()));
        };
        let result = async {
            file.write_all(&line).await?;
            file.flush().await
        }
        .await;
        if let Err(e) = result {
            // Reopen on the next write: the disk may come back.
            *guard = None;
            return Err(AuditError(e.to_string()));
        }
        Ok(())
    }
}

async fn open_append(path: &Path) -> Result<tokio::fs::File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| AuditError(format!("cannot open {}: {e}", path.display())))
}

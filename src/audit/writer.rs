//! The audit writer: one OS thread that owns the files, chains records and commits them in
//! groups.
//!
//! # Why group commit on a thread of its own
//! A response may leave only once its record is on disk, and `fdatasync` costs about as
//! much for one record as for a thousand. So requests hand their record to this thread and
//! wait; the thread takes everything that queued up while the previous `fdatasync` ran,
//! appends it with one `write`, syncs once, and then answers every waiter. Under load the
//! batch grows and the cost per request falls; when idle a lone record is synced at once, so
//! nothing waits on a timer. File I/O is blocking, so it runs off the tokio workers.
//!
//! If a write or sync fails, every record in the batch fails (their responses become 503s)
//! and the file is reopened for the next batch, picking the chain up from what is really on
//! disk: records that did reach the disk before the failure stay (audited, not released,
//! which is harmless); a torn last line, which no response ever waited for successfully, is
//! cut off.
//!
//! Rotation: when `audit.jsonl` passes its size limit after a commit, it is synced, renamed to
//! `audit-<first seq, 12 digits>.jsonl` and the directory synced; the next record, in a new
//! `audit.jsonl`, chains on from the last one renamed.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::{
    Alert,
    chain::{self, GENESIS},
};

/// The file records are appended to.
pub const ACTIVE: &str = "audit.jsonl";
/// Most records committed by one write and one sync.
const MAX_BATCH: usize = 1024;
/// Most break-glass alerts kept in memory (all of them stay in the audit files).
const MAX_ALERTS: usize = 10_000;

/// One record waiting to be committed.
#[derive(Debug)]
pub struct Job {
    pub event: Vec<u8>,
    pub alert: Option<Alert>,
    pub done: oneshot::Sender<Result<(), String>>,
}

#[derive(Debug, Clone, Copy)]
pub struct WriterSettings {
    pub rotate_bytes: u64,
    /// `fdatasync` after every batch. Off only for benchmarks that price the sync.
    pub sync: bool,
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    settings: WriterSettings,
    file: Option<File>,
    next_seq: u64,
    prev: String,
    /// Bytes in the active file and the seq of its first record.
    size: u64,
    first_seq: u64,
    alerts: Arc<Mutex<VecDeque<Alert>>>,
}

/// Starts the writer on its own thread; the returned sender feeds it. Fails if the active
/// file cannot be opened or its chain cannot be read.
pub fn start(
    dir: &Path,
    settings: WriterSettings,
    alerts: Arc<Mutex<VecDeque<Alert>>>,
) -> Result<mpsc::Sender<Job>, String> {
    load_alerts(dir, &alerts);
    let mut writer = Writer {
        dir: dir.to_owned(),
        settings,
        file: None,
        next_seq: 0,
        prev: GENESIS.to_owned(),
        size: 0,
        first_seq: 0,
        alerts,
    };
    writer.reopen()?;
    let (tx, mut rx) = mpsc::channel::<Job>(MAX_BATCH * 4);
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let started = tokio::time::Instant::now();
                let result = writer.commit(&mut batch);
                crate::metrics::global().audit_commit(
                    started.elapsed(),
                    batch.len(),
                    result.is_ok(),
                );
                if let Err(e) = &result {
                    error!(error = %e, records = batch.len(), "Audit commit failed.");
                }
                for job in batch {
                    let _ = job.done.send(result.clone());
                }
            }
        })
        .map_err(|e| format!("cannot start the audit writer: {e}"))?;
    Ok(tx)
}

impl Writer {
    fn active(&self) -> PathBuf {
        self.dir.join(ACTIVE)
    }

    /// Audit files name patients and who looked at them: readable by the gateway's user only.
    const FILE_MODE: u32 = 0o600;

    /// Opens the active file for appending and picks the chain up from the disk.
    fn reopen(&mut self) -> Result<(), String> {
        let path = self.active();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(Self::FILE_MODE)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        let (size, first, last) = if regular {
            recover(&mut file, &path)?
        } else {
            (0, None, None)
        };
        let last = match last {
            Some(l) => Some(l),
            None => newest_rotated_head(&self.dir)?,
        };
        let (next_seq, prev) = last.map_or((0, GENESIS.to_owned()), |(s, h)| (s + 1, h));
        self.next_seq = next_seq;
        self.prev = prev;
        self.size = size;
        self.first_seq = first.unwrap_or(next_seq);
        crate::metrics::global().audit_head(self.next_seq);
        self.file = Some(file);
        Ok(())
    }

    fn commit(&mut self, batch: &mut [Job]) -> Result<(), String> {
        if self.file.is_none() {
            self.reopen()?;
        }
        let mut buf = Vec::with_capacity(batch.len() * 1024);
        let mut seq = self.next_seq;
        let mut prev = self.prev.clone();
        for job in batch.iter() {
            prev = chain::append_line(&mut buf, seq, &prev, &job.event);
            seq += 1;
        }
        let Some(file) = self.file.as_mut() else {
            return Err("audit file unavailable".into());
        };
        let written = file.write_all(&buf).and_then(|()| {
            if self.settings.sync {
                file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            self.file = None;
            return Err(e.to_string());
        }
        for (i, job) in batch.iter_mut().enumerate() {
            if let Some(mut alert) = job.alert.take() {
                alert.seq = self.next_seq + i as u64;
                let mut alerts = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
                if alerts.len() == MAX_ALERTS {
                    alerts.pop_front();
                }
                alerts.push_back(alert);
            }
        }
        self.next_seq = seq;
        self.prev = prev;
        self.size += buf.len() as u64;
        crate::metrics::global().audit_head(self.next_seq);
        if self.size >= self.settings.rotate_bytes
            && let Err(e) = self.rotate()
        {
            warn!(error = %e, "Audit rotation failed; appending to the current file.");
        }
        Ok(())
    }

    /// Moves the active file aside and starts a new one; the chain carries on.
    fn rotate(&mut self) -> Result<(), String> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let io = |e: std::io::Error| e.to_string();
        file.sync_all().map_err(io)?;
        drop(file);
        let target = self.dir.join(format!("audit-{:012}.jsonl", self.first_seq));
        std::fs::rename(self.active(), &target).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(Self::FILE_MODE)
            .open(self.active())
            .map_err(io)?;
        self.file = Some(file);
        self.size = 0;
        self.first_seq = self.next_seq;
        Ok(())
    }
}

/// Reads the active file's chain ends: its size, its first record's seq and its last
/// record's (seq, hash). A torn last line (a crash mid-write) is cut off; anything else that
/// does not verify stops the gateway from writing onto a broken chain.
type Ends = (u64, Option<u64>, Option<(u64, String)>);

fn recover(file: &mut File, path: &Path) -> Result<Ends, String> {
    let io = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok((0, None, None));
    }
    // The first line, for the rotated file's name.
    let mut head = vec![0u8; len.min(64 * 1024) as usize];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.read_exact(&mut head).map_err(io)?;
    let first = head
        .split(|b| *b == b'\n')
        .next()
        .and_then(|l| chain::parse_line(l).ok())
        .map(|l| l.seq);
    // The tail, for the chain's head.
    let tail_len = len.min(1024 * 1024);
    let mut tail = vec![0u8; tail_len as usize];
    file.seek(SeekFrom::Start(len - tail_len)).map_err(io)?;
    file.read_exact(&mut tail).map_err(io)?;
    let mut size = len;
    if !tail.ends_with(b"\n") {
        let keep = tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let cut = tail_len - keep as u64;
        warn!(
            bytes = cut,
            "Audit file ends in a torn record (a crash mid-write); cutting it off."
        );
        size = len - cut;
        file.set_len(size).map_err(io)?;
        file.sync_all().map_err(io)?;
        tail.truncate(keep);
    }
    let last = tail
        .split(|b| *b == b'\n')
        .rfind(|l| !l.is_empty())
        .map(|l| {
            chain::parse_line(l)
                .map(|link| (link.seq, link.hash))
                .map_err(|e| {
                    format!(
                        "{}: the last record does not verify ({e}); run `tributary audit verify`",
                        path.display()
                    )
                })
        })
        .transpose()?;
    file.seek(SeekFrom::End(0)).map_err(io)?;
    Ok((size, first.or(last.as_ref().map(|l| l.0)), last))
}

/// The chain head in the newest rotated file, for an empty active file.
fn newest_rotated_head(dir: &Path) -> Result<Option<(u64, String)>, String> {
    let files = chain_files(dir).map_err(|e| e.to_string())?;
    let Some(newest) = files.into_iter().rev().find(|f| !f.ends_with(ACTIVE)) else {
        return Ok(None);
    };
    let bytes = std::fs::read(&newest).map_err(|e| e.to_string())?;
    Ok(bytes
        .split(|b| *b == b'\n')
        .rfind(|l| !l.is_empty())
        .and_then(|l| chain::parse_line(l).ok())
        .map(|l| (l.seq, l.hash)))
}

/// A directory's audit files in chain order: rotated files by first seq, then the active one.
/// Only regular files: a device standing in for the log (a test's `/dev/full`) is never read.
pub fn chain_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let regular = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file());
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| chain::is_audit_file(p) && !p.ends_with(ACTIVE) && regular(p))
        .collect();
    rotated.sort();
    let active = dir.join(ACTIVE);
    if regular(&active) {
        rotated.push(active);
    }
    Ok(rotated)
}

/// Rebuilds the break-glass alert list from the records already on disk.
fn load_alerts(dir: &Path, alerts: &Mutex<VecDeque<Alert>>) {
    let Ok(files) = chain_files(dir) else { return };
    let mut found = VecDeque::new();
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(link) = chain::parse_line(line) else {
                continue;
            };
            if let Some(mut alert) = Alert::from_event(&link.event) {
                alert.seq = link.seq;
                if found.len() == MAX_ALERTS {
                    found.pop_front();
                }
                found.push_back(alert);
            }
        }
    }
    *alerts.lock().unwrap_or_else(|p| p.into_inner()) = found;
}

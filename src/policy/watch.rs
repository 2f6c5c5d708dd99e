//! Hot reload: watch the policy directory and swap in each valid change.
//!
//! # Why debounced, and why reload the whole directory
//! Editors save through temporary files and renames, and an officer may change a policy and
//! its code set together; the debouncer waits for a quiet 300 ms, then the whole directory is
//! loaded again. A valid result replaces the set in one atomic swap; an invalid one is logged
//! with its errors and counted, and the previous set stays. Requests in flight keep the set
//! they started with, so none fails or is judged by a half-loaded set.

use std::{
    path::{Path, PathBuf},
    sync::Weak,
    time::Duration,
};

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use super::PolicyEngine;

/// How long the directory must be quiet before it is reloaded.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Stops watching when dropped.
pub struct WatchHandle {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    dir: PathBuf,
}

impl std::fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHandle")
            .field("dir", &self.dir)
            .finish()
    }
}

pub fn watch(engine: Weak<PolicyEngine>, dir: &Path) -> Result<WatchHandle, String> {
    let reload_dir = dir.to_path_buf();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        match result {
            Ok(events) if events.iter().all(|e| e.kind.is_access()) => {}
            Ok(_) => {
                // Errors are logged and counted inside reload.
                let _ = engine.reload(&reload_dir);
            }
            Err(errors) => {
                let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                tracing::warn!(errors = ?errors, "Policy directory watch reported errors.");
            }
        }
    })
    .map_err(|e| format!("cannot watch policy directory: {e}"))?;
    debouncer
        .watch(dir, RecursiveMode::Recursive)
        .map_err(|e| format!("cannot watch policy directory {}: {e}", dir.display()))?;
    Ok(WatchHandle {
        _debouncer: debouncer,
        dir: dir.to_path_buf(),
    })
}

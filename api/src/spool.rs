//! The logs being written on this node: each spooled to a file under the node's data dir
//! while its executor appends, with a watch of its size for the readers tailing it (see
//! `objects.rs` for how appends, readers and the final store use it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use flotilla_store::ost::keys::LogStep;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LiveState {
    pub(crate) size: u64,
    pub(crate) stored: bool,
}

pub(crate) struct LiveLog {
    pub(crate) path: PathBuf,
    pub(crate) state: watch::Sender<LiveState>,
    /// Serialises appends to one log.
    pub(crate) write: tokio::sync::Mutex<()>,
}

/// The logs being written on this node.
pub struct LiveLogs {
    dir: PathBuf,
    logs: Mutex<HashMap<(String, LogStep), Arc<LiveLog>>>,
}

impl LiveLogs {
    /// Spools under `dir`, emptied first: what a previous process left is resent by the
    /// executors (they keep their logs until stored).
    pub fn new(dir: PathBuf) -> std::io::Result<LiveLogs> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(LiveLogs { dir, logs: Mutex::new(HashMap::new()) })
    }

    pub(crate) fn get(&self, task_id: &str, step: &LogStep) -> Option<Arc<LiveLog>> {
        self.logs.lock().unwrap().get(&(task_id.to_string(), step.clone())).cloned()
    }

    pub(crate) fn get_or_create(&self, task_id: &str, step: &LogStep) -> Arc<LiveLog> {
        let mut logs = self.logs.lock().unwrap();
        logs.entry((task_id.to_string(), step.clone()))
            .or_insert_with(|| {
                let (state, _) = watch::channel(LiveState { size: 0, stored: false });
                let path = self.dir.join(format!("{task_id}.{step}.log"));
                Arc::new(LiveLog { path, state, write: tokio::sync::Mutex::new(()) })
            })
            .clone()
    }

    pub(crate) fn remove(&self, task_id: &str, step: &LogStep) {
        self.logs.lock().unwrap().remove(&(task_id.to_string(), step.clone()));
    }
}

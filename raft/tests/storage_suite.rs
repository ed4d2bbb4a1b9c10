//! openraft's own conformance suite, run against flotilla's log store (its own segment
//! files) and state machine (snapshots on sled): every rule of the storage API (no holes,
//! vote persistence, purge/truncate, snapshot install and reload) is checked on real files.

use flotilla_raft::log_store::LogStore;
use flotilla_raft::state_machine::StateMachineStore;
use flotilla_raft::{NodeId, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new().path(dir.path()).cache_capacity(8 << 20).open().expect("open sled");
        let log = LogStore::open(&dir.path().join("raft-log"), Some(&db), true).expect("log store");
        let sm = StateMachineStore::open(&db)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_store_passes_the_openraft_storage_suite() {
    Suite::test_all(SledBuilder).expect("storage suite");
}

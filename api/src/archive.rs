//! Reading the run archive on any node: `GET /runs/{id}` and `GET /runs` fall through to
//! it for runs no longer in the state. Index files are cached per node (by key: a data
//! file's index never changes, a new file has a new key), and a few decoded data files.
//! The manifest comes from the same state snapshot as the live runs, so a run moving to
//! the archive is seen in exactly one of the two.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flotilla_store::archive::{read_file, read_index, ArchivedRun, IndexEntry, Manifest};
use flotilla_store::ost::{Ost, OstError};
use flotilla_store::run::RunPhase;

/// Decoded data files kept in memory.
const CACHED_FILES: usize = 8;

/// One archived run in the merged index.
#[derive(Clone, Debug)]
pub struct Row {
    pub id: String,
    pub group: String,
    pub phase: RunPhase,
    pub file: Arc<str>,
}

#[derive(Default)]
struct Cache {
    indexes: HashMap<String, Arc<Vec<IndexEntry>>>,
    /// The merged index of one manifest generation, by id.
    merged: Option<(u64, Arc<Vec<Row>>)>,
    files: Vec<(String, Arc<Vec<ArchivedRun>>)>,
}

pub struct Archive {
    ost: Ost,
    cache: Mutex<Cache>,
}

impl Archive {
    pub fn new(ost: Ost) -> Archive {
        Archive { ost, cache: Mutex::new(Cache::default()) }
    }

    /// Every archived run of `manifest`, sorted by id.
    pub async fn rows(&self, manifest: &Manifest) -> Result<Arc<Vec<Row>>, OstError> {
        if let Some((g, rows)) = &self.cache.lock().unwrap().merged {
            if *g == manifest.generation {
                return Ok(rows.clone());
            }
        }
        let mut rows = Vec::with_capacity(manifest.archived_runs() as usize);
        let mut loaded = HashMap::new();
        for f in &manifest.files {
            let cached = self.cache.lock().unwrap().indexes.get(&f.index_key).cloned();
            let entries = match cached {
                Some(e) => e,
                None => Arc::new(read_index(&self.ost, &f.index_key).await?),
            };
            let file: Arc<str> = Arc::from(f.key.as_str());
            rows.extend(entries.iter().map(|e| Row {
                id: e.id.clone(),
                group: e.group.clone(),
                phase: e.phase,
                file: file.clone(),
            }));
            loaded.insert(f.index_key.clone(), entries);
        }
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        let rows = Arc::new(rows);
        let mut cache = self.cache.lock().unwrap();
        cache.indexes = loaded;
        cache.merged = Some((manifest.generation, rows.clone()));
        Ok(rows)
    }

    async fn file(&self, key: &str) -> Result<Arc<Vec<ArchivedRun>>, OstError> {
        if let Some((_, f)) = self.cache.lock().unwrap().files.iter().find(|(k, _)| k == key) {
            return Ok(f.clone());
        }
        let runs = Arc::new(read_file(&self.ost, key).await?);
        let mut cache = self.cache.lock().unwrap();
        cache.files.retain(|(k, _)| k != key);
        cache.files.push((key.to_string(), runs.clone()));
        if cache.files.len() > CACHED_FILES {
            cache.files.remove(0);
        }
        Ok(runs)
    }

    /// The archived run `id`, if the archive has it.
    pub async fn get(&self, manifest: &Manifest, id: &str) -> Result<Option<ArchivedRun>, OstError> {
        if manifest.files.is_empty() {
            return Ok(None);
        }
        let rows = self.rows(manifest).await?;
        let Ok(i) = rows.binary_search_by(|r| r.id.as_str().cmp(id)) else { return Ok(None) };
        let file = self.file(&rows[i].file).await?;
        Ok(find(&file, id).cloned())
    }

    /// Loads the runs of `rows` (grouped by file), in the order given.
    pub async fn load(&self, rows: &[Row]) -> Result<Vec<ArchivedRun>, OstError> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let file = self.file(&r.file).await?;
            if let Some(a) = find(&file, &r.id) {
                out.push(a.clone());
            }
        }
        Ok(out)
    }
}

/// A run in a data file: files are written sorted by id (binary search), with a linear
/// scan as the fallback for a file that is not.
fn find<'a>(file: &'a [ArchivedRun], id: &str) -> Option<&'a ArchivedRun> {
    match file.binary_search_by(|a| a.run.id.as_str().cmp(id)) {
        Ok(i) => Some(&file[i]),
        Err(_) => file.iter().find(|a| a.run.id == id),
    }
}

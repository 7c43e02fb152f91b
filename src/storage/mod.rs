//! Durable storage of one replica, in one fjall database (one data directory).
//!
//! Keyspaces:
//! * `raft`: this node's identity, the Raft hard state, the compaction point of the
//!   log, and which state-machine generation is current.
//! * `raftlog`: Raft log entries by index.
//! * `sm.<gen>`: the state machine's data *and* its applied index, conf state and
//!   peer addresses, so that the applied index is always stored atomically with the
//!   data it covers. A snapshot received from the leader is written into a fresh
//!   generation and made current by one synced write; older generations are
//!   dropped whole.
//!
//! Durability: Raft log appends and hard-state changes are fsynced before this node
//! acknowledges them (one fsync per Ready). State-machine writes are not fsynced on
//! their own: after a crash the node replays the log from its durable applied index.

mod raft_store;
mod sm_store;

pub use raft_store::{OutgoingSnapshot, RaftStore};
pub use sm_store::{
    ApplyBatch, KeyBounds, Records, SmStore, SnapshotWriter, StagedSnapshot, StoreView,
};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::path::{Path, PathBuf};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine: {0}")]
    Engine(#[from] fjall::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "data directory {dir} belongs to {found}, not to {expected}; \
         point --data-dir at this node's own directory (or an empty one)"
    )]
    WrongDataDir {
        dir: PathBuf,
        found: Box<Identity>,
        expected: Box<Identity>,
    },
    #[error(
        "{identity} was removed from its group and cannot rejoin with data directory {dir}; \
         start it with an empty directory and --join, then add it again"
    )]
    Removed {
        dir: PathBuf,
        identity: Box<Identity>,
    },
    #[error("corrupt record {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

pub type Result<T> = std::result::Result<T, StorageError>;

/// Who a data directory belongs to. A node refuses to open another node's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The cluster name, so two clusters on one machine cannot mix directories.
    pub cluster: String,
    /// "shardmaster" or "kvnode".
    pub role: String,
    /// Raft group: 0 for the shard master, the gid for a kv group.
    pub group: u64,
    pub node: u64,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} node {} of group {} in cluster {:?}",
            self.role, self.node, self.group, self.cluster
        )
    }
}

impl Identity {
    fn encode(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}",
            self.cluster, self.role, self.group, self.node
        )
    }

    fn decode(raw: &[u8]) -> Result<Identity> {
        let corrupt = || StorageError::Corrupt {
            what: "identity",
            detail: String::from_utf8_lossy(raw).into_owned(),
        };
        let text = std::str::from_utf8(raw).map_err(|_| corrupt())?;
        let mut parts = text.split('\n');
        let mut next = || parts.next().ok_or_else(corrupt);
        Ok(Identity {
            cluster: next()?.to_owned(),
            role: next()?.to_owned(),
            group: next()?.parse().map_err(|_| corrupt())?,
            node: next()?.parse().map_err(|_| corrupt())?,
        })
    }
}

const KEY_IDENTITY: &[u8] = b"identity";
const KEY_SM_GEN: &[u8] = b"sm_gen";
const KEY_REMOVED: &[u8] = b"removed";
const SM_PREFIX: &str = "sm.";

/// The open database of one node, before it is split into the Raft log store and the
/// state-machine store.
pub struct Engine {
    db: Database,
    raft: Keyspace,
    log: Keyspace,
    sm_gen: u64,
    sm: Keyspace,
    fresh: bool,
}

impl Engine {
    /// Opens (or creates) the data directory of the node `identity`.
    ///
    /// Fails with [`StorageError::WrongDataDir`] if the directory belongs to another node.
    pub fn open(dir: &Path, identity: &Identity) -> Result<Engine> {
        std::fs::create_dir_all(dir)?;
        let db = Database::builder(dir).open()?;
        let raft = db.keyspace("raft", KeyspaceCreateOptions::default)?;
        let log = db.keyspace("raftlog", KeyspaceCreateOptions::default)?;
        let fresh = match raft.get(KEY_IDENTITY)? {
            Some(raw) => {
                let found = Identity::decode(&raw)?;
                if &found != identity {
                    return Err(StorageError::WrongDataDir {
                        dir: dir.to_owned(),
                        found: Box::new(found),
                        expected: Box::new(identity.clone()),
                    });
                }
                false
            }
            None => true,
        };
        if raft.get(KEY_REMOVED)?.is_some() {
            return Err(StorageError::Removed {
                dir: dir.to_owned(),
                identity: Box::new(identity.clone()),
            });
        }
        let sm_gen = match raft.get(KEY_SM_GEN)? {
            Some(raw) => decode_u64(&raw, "sm_gen")?,
            None => 1,
        };
        // Generations other than the current one are leftovers of a snapshot that was
        // being received or replaced when the process stopped.
        for name in db.list_keyspace_names() {
            if name.starts_with(SM_PREFIX) && *name != *sm_keyspace_name(sm_gen) {
                let stale = db.keyspace(&name, KeyspaceCreateOptions::default)?;
                db.delete_keyspace(stale)?;
            }
        }
        let sm = db.keyspace(&sm_keyspace_name(sm_gen), KeyspaceCreateOptions::default)?;
        if fresh {
            let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
            batch.insert(&raft, KEY_IDENTITY, identity.encode());
            batch.insert(&raft, KEY_SM_GEN, sm_gen.to_be_bytes());
            batch.commit()?;
        }
        Ok(Engine {
            db,
            raft,
            log,
            sm_gen,
            sm,
            fresh,
        })
    }

    /// True if the directory was empty: the node has never run.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// A handle for reading the engine's sizes (for metrics).
    pub fn stats(&self) -> StorageStats {
        StorageStats {
            db: self.db.clone(),
        }
    }

    /// Splits the engine into the Raft log store and the state-machine store, which
    /// share the database (and its journal, so one fsync covers both).
    pub fn into_stores(self) -> Result<(RaftStore, SmStore)> {
        let sm = SmStore::new(self.db.clone(), self.sm_gen, self.sm);
        let raft = RaftStore::open(self.db, self.raft, self.log, sm.clone())?;
        Ok((raft, sm))
    }
}

/// Reads the database's sizes and compaction counts, for the metrics scrape.
#[derive(Clone)]
pub struct StorageStats {
    db: Database,
}

/// The engine's sizes at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSample {
    pub disk_bytes: u64,
    pub memtable_bytes: u64,
    pub journals: u64,
    pub active_compactions: u64,
    pub compactions_completed: u64,
}

impl std::fmt::Debug for StorageStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageStats")
    }
}

impl StorageStats {
    /// The sizes now. fjall's write-buffer and compaction counters are marked
    /// experimental there; the disk size is 0 if a file vanished while it was summed.
    pub fn sample(&self) -> StorageSample {
        StorageSample {
            disk_bytes: self.db.disk_space().unwrap_or(0),
            memtable_bytes: self.db.write_buffer_size(),
            journals: self.db.journal_count() as u64,
            active_compactions: self.db.active_compactions() as u64,
            compactions_completed: self.db.compactions_completed() as u64,
        }
    }
}

fn sm_keyspace_name(gen: u64) -> String {
    format!("{SM_PREFIX}{gen}")
}

fn decode_u64(raw: &[u8], what: &'static str) -> Result<u64> {
    let bytes: [u8; 8] = raw.try_into().map_err(|_| StorageError::Corrupt {
        what,
        detail: format!("{} bytes, expected 8", raw.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(node: u64) -> Identity {
        Identity {
            cluster: "test".into(),
            role: "shardmaster".into(),
            group: 0,
            node,
        }
    }

    #[test]
    fn refuses_another_nodes_directory() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &identity(1)).unwrap();
        assert!(engine.is_fresh());
        drop(engine);
        let reopened = Engine::open(dir.path(), &identity(1)).unwrap();
        assert!(!reopened.is_fresh());
        drop(reopened);
        match Engine::open(dir.path(), &identity(2)) {
            Err(StorageError::WrongDataDir { found, .. }) => assert_eq!(*found, identity(1)),
            other => panic!("expected WrongDataDir, got {:?}", other.err()),
        }
    }
}

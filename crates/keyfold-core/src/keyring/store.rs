//! Persisting keyrings: the [`KeyringStore`] trait with optimistic
//! concurrency, an in-memory store and a file-backed store
//! (docs/LIFECYCLE.md, "Store and concurrency").
//!
//! Every save names the revision it read; a store accepts it only if that is
//! still the current revision, and returns the next one. Two instances that
//! rotate from the same revision cannot both win: the second gets
//! [`StoreError::Conflict`] and the stored keyring is the first one's.
//!
//! The stored form ([`StoredKeyring`]) holds wrapped keys only.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::state::{InvariantViolation, StoredKeyring};

/// A keyring's revision in its store: 1 after creation, +1 per save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

/// A store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The keyring changed since it was read (or exists when creating, or is
    /// gone when updating). Reload and retry.
    #[error("keyring {keyring_id} changed in the store: expected {expected:?}, found {found:?}")]
    Conflict {
        /// The keyring.
        keyring_id: String,
        /// The revision the writer read (`None`: it expected no keyring).
        expected: Option<Revision>,
        /// The revision the store holds (`None`: no keyring).
        found: Option<Revision>,
    },
    /// The stored bytes are not a valid keyring.
    #[error("stored keyring {keyring_id} is invalid: {reason}")]
    Corrupt {
        /// The keyring.
        keyring_id: String,
        /// Why.
        reason: String,
    },
    /// The keyring would break a lifecycle invariant; refused.
    #[error(transparent)]
    Invariant(#[from] InvariantViolation),
    /// An I/O failure.
    #[error("keyring store I/O on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A keyring id that cannot be used as a store key.
    #[error("invalid keyring id {0:?}: use 1..=128 characters of [A-Za-z0-9._-]")]
    InvalidId(String),
    /// A [`FileStore`] directory that group or others can write (Unix
    /// permissions): they could swap keyring files or plant links.
    #[error(
        "keyring store directory {path} is writable by group or others (mode {mode:o}); \
         make it owner-only (chmod 700)"
    )]
    InsecureDirectory {
        /// The directory.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Any other backend failure (hosts' own stores).
    #[error("keyring store: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// Where the host persists keyrings. Implement it over your database with a
/// conditional write (`UPDATE ... WHERE revision = ?`); [`check_save`],
/// [`check_id`], [`to_bytes`] and [`from_bytes`] do what every store must,
/// and [`async_trait`](crate::async_trait) is re-exported for the `impl`.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
///
/// use keyfold_core::async_trait;
/// use keyfold_core::keyring::StoredKeyring;
/// use keyfold_core::store::{check_id, check_save, from_bytes, to_bytes};
/// use keyfold_core::store::{KeyringStore, Revision, StoreError};
///
/// /// Keyrings in a map: a database does the same with one conditional
/// /// `UPDATE ... WHERE keyring_id = $1 AND revision = $expected`.
/// #[derive(Debug, Default)]
/// struct MapStore(Mutex<HashMap<String, (Revision, Vec<u8>)>>);
///
/// #[async_trait]
/// impl KeyringStore for MapStore {
///     async fn load(
///         &self,
///         keyring_id: &str,
///     ) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
///         check_id(keyring_id)?;
///         let map = self.0.lock().unwrap();
///         map.get(keyring_id)
///             .map(|(_, bytes)| from_bytes(keyring_id, bytes))
///             .transpose()
///     }
///
///     async fn save(
///         &self,
///         keyring_id: &str,
///         expected: Option<Revision>,
///         keyring: &StoredKeyring,
///     ) -> Result<Revision, StoreError> {
///         check_save(keyring_id, keyring)?;
///         let mut map = self.0.lock().unwrap();
///         let found = map.get(keyring_id).map(|(revision, _)| *revision);
///         if found != expected {
///             let keyring_id = keyring_id.to_owned();
///             return Err(StoreError::Conflict { keyring_id, expected, found });
///         }
///         let next = Revision(expected.map_or(1, |r| r.0 + 1));
///         map.insert(keyring_id.to_owned(), (next, to_bytes(next, keyring)?));
///         Ok(next)
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = MapStore::default();
/// let keyring = StoredKeyring::new("tenant-42", keyfold_core::time::Timestamp(0));
/// let first = store.save("tenant-42", None, &keyring).await?;
/// // A second writer that also saw no keyring loses.
/// let lost = store.save("tenant-42", None, &keyring).await;
/// assert!(matches!(lost, Err(StoreError::Conflict { .. })));
/// assert_eq!(store.load("tenant-42").await?.unwrap().0, first);
/// # Ok::<(), StoreError>(())
/// # })?;
/// # Ok::<(), StoreError>(())
/// ```
#[async_trait]
pub trait KeyringStore: Send + Sync + fmt::Debug {
    /// The keyring and its revision, or `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError`] on backend failure or invalid stored data.
    async fn load(&self, keyring_id: &str)
    -> Result<Option<(Revision, StoredKeyring)>, StoreError>;

    /// Writes `keyring` if the current revision is `expected` (`None`: only
    /// if there is no keyring yet) and returns the new revision.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the revision moved; nothing is written.
    async fn save(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError>;

    /// Subscribes to this store's change notifications, if it can push them
    /// (a database's `LISTEN`/`NOTIFY`, a file store's poller).
    ///
    /// `None` (the default) means it cannot: instances then rely on the
    /// max-staleness bound alone. A receiver that lags
    /// (`RecvError::Lagged`) or closes must be treated as [`StoreEvent::Resync`]:
    /// a lost notification never removes the staleness bound, it only stops
    /// shortening it.
    fn watch(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        None
    }
}

/// A change notification from a [`KeyringStore`] (see [`KeyringStore::watch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreEvent {
    /// This keyring was saved, by this instance or another one.
    Changed {
        /// The keyring.
        keyring_id: String,
    },
    /// Notifications may have been missed (a connection was lost and
    /// regained): treat every keyring as changed.
    Resync,
}

#[async_trait]
impl<T: KeyringStore + ?Sized> KeyringStore for std::sync::Arc<T> {
    async fn load(
        &self,
        keyring_id: &str,
    ) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        (**self).load(keyring_id).await
    }
    async fn save(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        (**self).save(keyring_id, expected, keyring).await
    }
    fn watch(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        (**self).watch()
    }
}

/// The serialized envelope both shipped stores write: revision + keyring.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    revision: Revision,
    keyring: StoredKeyring,
}

/// Serializes a keyring with its revision (the bytes the shipped stores write).
///
/// # Errors
/// [`StoreError::Invariant`] when the keyring is invalid.
pub fn to_bytes(revision: Revision, keyring: &StoredKeyring) -> Result<Vec<u8>, StoreError> {
    keyring.validate()?;
    serde_json::to_vec_pretty(&EnvelopeRef { revision, keyring }).map_err(|e| StoreError::Corrupt {
        keyring_id: keyring.keyring_id.clone(),
        reason: e.to_string(),
    })
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    revision: Revision,
    keyring: &'a StoredKeyring,
}

/// Parses what [`to_bytes`] wrote and checks the invariants and the id.
///
/// # Errors
/// [`StoreError::Corrupt`] or [`StoreError::Invariant`].
pub fn from_bytes(keyring_id: &str, bytes: &[u8]) -> Result<(Revision, StoredKeyring), StoreError> {
    let env: Envelope = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        keyring_id: keyring_id.to_owned(),
        reason: e.to_string(),
    })?;
    env.keyring.validate()?;
    if env.keyring.keyring_id != keyring_id {
        return Err(StoreError::Corrupt {
            keyring_id: keyring_id.to_owned(),
            reason: format!("holds keyring {:?}", env.keyring.keyring_id),
        });
    }
    Ok((env.revision, env.keyring))
}

/// The keyring ids the shipped stores accept: 1..=128 of `[A-Za-z0-9._-]`,
/// not `.` or `..` (safe as a file name, a row key, a log field). A store of
/// your own can hold to the same rule.
///
/// ```
/// use keyfold_core::store::{StoreError, check_id};
/// assert!(check_id("tenant-42").is_ok());
/// assert!(matches!(check_id("../etc"), Err(StoreError::InvalidId(_))));
/// ```
///
/// # Errors
/// [`StoreError::InvalidId`].
pub fn check_id(keyring_id: &str) -> Result<(), StoreError> {
    let ok = !keyring_id.is_empty()
        && keyring_id.len() <= 128
        && keyring_id != "."
        && keyring_id != ".."
        && keyring_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidId(keyring_id.to_owned()))
    }
}

/// What a store checks before it saves `keyring` under `keyring_id`: a
/// valid id ([`check_id`]) naming that very keyring.
///
/// ```
/// use keyfold_core::keyring::StoredKeyring;
/// use keyfold_core::store::{StoreError, check_save};
/// use keyfold_core::time::Timestamp;
/// let keyring = StoredKeyring::new("tenant-42", Timestamp(0));
/// assert!(check_save("tenant-42", &keyring).is_ok());
/// assert!(matches!(check_save("tenant-7", &keyring), Err(StoreError::Corrupt { .. })));
/// ```
///
/// # Errors
/// [`StoreError::InvalidId`], or [`StoreError::Corrupt`] for another
/// keyring.
pub fn check_save(keyring_id: &str, keyring: &StoredKeyring) -> Result<(), StoreError> {
    check_id(keyring_id)?;
    if keyring.keyring_id != keyring_id {
        return Err(StoreError::Corrupt {
            keyring_id: keyring_id.to_owned(),
            reason: format!("asked to store keyring {:?}", keyring.keyring_id),
        });
    }
    Ok(())
}

fn next_revision(
    keyring_id: &str,
    expected: Option<Revision>,
    found: Option<Revision>,
) -> Result<Revision, StoreError> {
    if expected != found {
        return Err(StoreError::Conflict {
            keyring_id: keyring_id.to_owned(),
            expected,
            found,
        });
    }
    Ok(Revision(found.map_or(1, |r| r.0.saturating_add(1))))
}

/// Keeps keyrings in process memory (serialized, as a real store would).
/// Every keyring built over one `MemoryStore` hears of every save at once
/// ([`KeyringStore::watch`]).
#[derive(Debug)]
pub struct MemoryStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    events: tokio::sync::broadcast::Sender<StoreEvent>,
}

/// How many change notifications a watcher may fall behind before it gets
/// `Lagged` (and then reloads everything).
const EVENT_BUFFER: usize = 1024;

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            map: Mutex::default(),
            events: tokio::sync::broadcast::channel(EVENT_BUFFER).0,
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The serialized bytes held for `keyring_id` (to check what is stored).
    pub fn raw(&self, keyring_id: &str) -> Option<Vec<u8>> {
        self.lock().get(keyring_id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl KeyringStore for MemoryStore {
    async fn load(
        &self,
        keyring_id: &str,
    ) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        match self.lock().get(keyring_id) {
            None => Ok(None),
            Some(bytes) => from_bytes(keyring_id, bytes).map(Some),
        }
    }

    async fn save(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        let mut map = self.lock();
        let found = match map.get(keyring_id) {
            None => None,
            Some(bytes) => Some(from_bytes(keyring_id, bytes)?.0),
        };
        let revision = next_revision(keyring_id, expected, found)?;
        if keyring.keyring_id != keyring_id {
            return Err(StoreError::Corrupt {
                keyring_id: keyring_id.to_owned(),
                reason: format!("asked to store keyring {:?}", keyring.keyring_id),
            });
        }
        map.insert(keyring_id.to_owned(), to_bytes(revision, keyring)?);
        drop(map);
        // No watcher is not an error.
        let _ = self.events.send(StoreEvent::Changed {
            keyring_id: keyring_id.to_owned(),
        });
        Ok(revision)
    }

    fn watch(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        Some(self.events.subscribe())
    }
}

/// Keeps each keyring in `DIR/<keyring_id>.json`.
///
/// A save takes an exclusive OS file lock (`std::fs::File::lock`: `flock`
/// on Unix, `LockFileEx` on Windows) on `<id>.json.lock`, a file that is
/// created once and never deleted, so other writers (threads or processes on
/// the same file system) are excluded for the whole save: the revision is
/// checked, a temporary file written, synced and renamed over the old one,
/// and only then the lock released. A reader sees the old keyring or the new
/// one, never a mix. The OS releases the lock when its holder exits or
/// crashes, so there is no stale lock to take over.
///
/// Uses blocking file I/O on the calling task (files are small); a save
/// waits while another writer holds the lock.
///
/// [`watch`](KeyringStore::watch) notifies this process's saves at once and
/// other processes' saves within [`FILE_POLL_INTERVAL`] (a thread polls the
/// directory while anyone watches).
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    local: Mutex<()>,
    events: Mutex<Option<tokio::sync::broadcast::Sender<StoreEvent>>>,
}

/// How often a watched [`FileStore`] looks for other processes' saves.
pub const FILE_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Size and modification time of each keyring file in a directory.
type DirStamps = HashMap<String, (u64, Option<std::time::SystemTime>)>;

fn scan_dir(dir: &Path) -> DirStamps {
    let mut seen = DirStamps::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return seen;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if let Ok(meta) = entry.metadata() {
            seen.insert(id.to_owned(), (meta.len(), meta.modified().ok()));
        }
    }
    seen
}

/// Polls `dir` for keyring files whose size or modification time changed
/// since `before` and announces them; returns once nobody watches.
fn poll_dir(dir: &Path, mut before: DirStamps, tx: &tokio::sync::broadcast::Sender<StoreEvent>) {
    while tx.receiver_count() > 0 {
        std::thread::sleep(FILE_POLL_INTERVAL);
        let now = scan_dir(dir);
        for (id, stamp) in &now {
            if before.get(id) != Some(stamp) {
                let _ = tx.send(StoreEvent::Changed {
                    keyring_id: id.clone(),
                });
            }
        }
        before = now;
    }
}

impl FileStore {
    /// Unused: lock files were once taken over after this long. The lock is
    /// now an OS file lock, released by the OS when its holder dies.
    #[deprecated(note = "FileStore uses OS file locks; there is no stale lock to take over")]
    pub const STALE_LOCK: std::time::Duration = std::time::Duration::from_secs(60);

    /// Tells this process's watchers that `keyring_id` was saved.
    fn notify(&self, keyring_id: &str) {
        let events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = events.as_ref() {
            let _ = tx.send(StoreEvent::Changed {
                keyring_id: keyring_id.to_owned(),
            });
        }
    }

    /// A store in `dir` (created if missing, owner-only on Unix: the
    /// files hold wrapped keys and key check values). An existing directory
    /// that group or others can write is refused on Unix: they could replace
    /// keyring files or plant links where the store writes.
    ///
    /// # Errors
    /// [`StoreError::Io`] if the directory cannot be created or read;
    /// [`StoreError::InsecureDirectory`] if group or others can write it.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        if !dir.is_dir() {
            // Parents as usual; only the store's own directory owner-only.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| io_err(parent, source))?;
            }
            let mut builder = std::fs::DirBuilder::new();
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            match builder.create(&dir) {
                Ok(()) => {}
                // Made meanwhile by someone else: fine.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
                Err(source) => return Err(io_err(&dir, source)),
            }
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dir)
                .map_err(|source| io_err(&dir, source))?
                .permissions()
                .mode();
            if mode & 0o022 != 0 {
                return Err(StoreError::InsecureDirectory {
                    path: dir.display().to_string(),
                    mode: mode & 0o7777,
                });
            }
        }
        Ok(FileStore {
            dir,
            local: Mutex::new(()),
            events: Mutex::new(None),
        })
    }

    /// The file holding `keyring_id`.
    pub fn path_of(&self, keyring_id: &str) -> PathBuf {
        self.dir.join(format!("{keyring_id}.json"))
    }

    /// The lock file of `keyring_id` (persistent; only its OS lock matters).
    pub fn lock_path_of(&self, keyring_id: &str) -> PathBuf {
        self.dir.join(format!("{keyring_id}.json.lock"))
    }

    fn read(&self, keyring_id: &str) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        check_id(keyring_id)?;
        let path = self.path_of(keyring_id);
        match std::fs::read(&path) {
            Ok(bytes) => from_bytes(keyring_id, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io_err(&path, source)),
        }
    }

    /// Opens a file for writing, owner-only on Unix; `new`: it must not
    /// exist yet (`O_EXCL`: never follows a link planted in its place).
    fn create_private(path: &Path, new: bool) -> std::io::Result<std::fs::File> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true);
        if new {
            options.create_new(true);
        } else {
            options.create(true).truncate(false);
        }
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(path)
    }

    /// Opens (creating it if needed) and exclusively locks the lock file;
    /// the lock is released when the returned file is dropped.
    fn lock(&self, keyring_id: &str) -> Result<std::fs::File, StoreError> {
        let path = self.lock_path_of(keyring_id);
        let file = Self::create_private(&path, false).map_err(|source| io_err(&path, source))?;
        file.lock().map_err(|source| io_err(&path, source))?;
        Ok(file)
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[async_trait]
impl KeyringStore for FileStore {
    async fn load(
        &self,
        keyring_id: &str,
    ) -> Result<Option<(Revision, StoredKeyring)>, StoreError> {
        let found = self.read(keyring_id)?;
        // Every successful save leaves a marker in the lock file, which is
        // never removed: with it and no keyring file, the keyring existed
        // and its file is gone. Answering "none" would let `open_or_create`
        // start an empty keyring over records only the lost one can open.
        // (A first save that failed leaves the lock file empty: no refusal.)
        let stored_before =
            std::fs::metadata(self.lock_path_of(keyring_id)).is_ok_and(|m| m.len() > 0);
        if found.is_none() && stored_before {
            return Err(StoreError::Corrupt {
                keyring_id: keyring_id.to_owned(),
                reason: format!(
                    "{} is missing but its lock file exists: the keyring was stored here; \
                     restore the file from a backup (delete the lock file only if the \
                     keyring was never created)",
                    self.path_of(keyring_id).display()
                ),
            });
        }
        Ok(found)
    }

    async fn save(
        &self,
        keyring_id: &str,
        expected: Option<Revision>,
        keyring: &StoredKeyring,
    ) -> Result<Revision, StoreError> {
        check_save(keyring_id, keyring)?;
        let _local = self
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Held until the end of the save: the revision check and the
        // write-and-rename happen under the lock.
        let lock = self.lock(keyring_id)?;
        let found = self.read(keyring_id)?.map(|(r, _)| r);
        let revision = next_revision(keyring_id, expected, found)?;
        let bytes = to_bytes(revision, keyring)?;
        let path = self.path_of(keyring_id);
        let tmp = self.dir.join(format!("{keyring_id}.json.tmp"));
        let write = || -> std::io::Result<()> {
            // A leftover from a crashed save may have other permissions.
            let _ = std::fs::remove_file(&tmp);
            let mut f = Self::create_private(&tmp, true)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename is durable only once the directory is synced: a
            // save reported done must survive a power loss (a lost rotation
            // would hand its version number to a different key next time).
            #[cfg(unix)]
            match std::fs::File::open(&self.dir)?.sync_all() {
                // Some file systems (FUSE, network mounts) cannot sync a
                // directory; as PostgreSQL does, take that as done.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
                    ) => {}
                other => other?,
            }
            Ok(())
        };
        // An error after the rename (the directory sync) means the new
        // state may be stored; the caller's reload sees which.
        write().map_err(|source| io_err(&path, source))?;
        if lock.metadata().is_ok_and(|m| m.len() == 0) {
            // Marks the keyring as stored (see `load`).
            let mut marker = &lock;
            marker
                .write_all(b"keyring stored\n")
                .and_then(|()| marker.sync_all())
                .map_err(|source| io_err(&self.lock_path_of(keyring_id), source))?;
        }
        self.notify(keyring_id);
        Ok(revision)
    }

    fn watch(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = events.as_ref().filter(|tx| tx.receiver_count() > 0) {
            return Some(tx.subscribe());
        }
        // No poller running (never started, or it stopped when its last
        // watcher left): start one.
        let (tx, rx) = tokio::sync::broadcast::channel(EVENT_BUFFER);
        let poller = tx.clone();
        let dir = self.dir.clone();
        // The baseline is taken now, not when the thread first runs: a save
        // made in between must count as a change.
        let baseline = scan_dir(&dir);
        let started = std::thread::Builder::new()
            .name("keyfold-filestore-watch".into())
            .spawn(move || poll_dir(&dir, baseline, &poller));
        // Without a poller this process's own saves still notify; other
        // processes' fall back to the max-staleness bound.
        drop(started);
        *events = Some(tx);
        Some(rx)
    }
}

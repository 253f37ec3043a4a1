//! Compiled guests on disk (`guest_cache_dir`). Compiling a large component takes seconds
//! at every start and reload (a JavaScript guest of 12 MB: 8-11 s), so the compiled artifact
//! is kept, keyed by the component's SHA-256 and the engine's compatibility hash (wasmtime's
//! version, the target and every setting that changes code), and loaded instead of
//! compiling when both match.
//!
//! Loading compiled code runs it without validation: whoever can put a file where the
//! gateway loads one runs native code as the gateway. So nothing is loaded unless
//!
//! - the directory is the gateway's own: owned by the process's effective uid, not a
//!   symbolic link, not writable by group or others (it is created with mode 0700);
//! - no one else can replace it: every directory above it (symbolic links resolved) is
//!   owned by root or the gateway's user and not writable by group or others, unless it has
//!   the sticky bit, where others may add entries but not rename or remove ours (`/tmp`);
//! - the artifact is one this cache wrote for this component and engine: each carries an
//!   HMAC-SHA256, with a key kept in the directory (`artifacts.key`, mode 0600, created
//!   once with `O_EXCL`), over the component's SHA-256, the engine's compatibility hash and
//!   the compiled code. An artifact that does not verify (damaged, planted, another
//!   component's, another cache's) is not loaded: it is logged, compiled again and replaced.
//!
//! Files (the key, artifacts) are opened with `O_NOFOLLOW`, and written beside their final
//! name and renamed (linked, for the key) into place whole. A directory that fails a check
//! is not used (the caller logs the reason and compiles without the cache).

use std::fs::{DirBuilder, File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::Mac as _;
use sha2::Digest as _;
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where a component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// Loaded from the cache.
    Hit,
    /// Compiled, and stored for next time.
    Stored,
    /// Compiled; storing it failed (logged).
    NotStored,
}

impl Compiled {
    pub fn as_str(self) -> &'static str {
        match self {
            Compiled::Hit => "hit",
            Compiled::Stored => "stored",
            Compiled::NotStored => "not_stored",
        }
    }
}

/// Why `guest_cache_dir` is not used; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("guest_cache_dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "guest_cache_dir {path} may be written by others (mode {mode:o}); compiled code from it \
         would run unchecked, so it is not used: make it private (chmod 700)"
    )]
    NotPrivate { path: PathBuf, mode: u32 },
    #[error(
        "guest_cache_dir: {path} is a symbolic link; compiled code is loaded only from the \
         gateway's own files, so it is not used: set guest_cache_dir to the real directory, or \
         remove the link"
    )]
    Symlink { path: PathBuf },
    #[error("guest_cache_dir {path} is not a directory: remove it or choose another path")]
    NotDirectory { path: PathBuf },
    #[error(
        "guest_cache_dir {path} belongs to uid {owner}, not to the gateway's user (uid {euid}); \
         another user may have put compiled code in it, so it is not used: remove it (the \
         gateway creates it again) or choose another path"
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "guest_cache_dir {path}: the directory {parent} above it (owner uid {owner}, mode \
         {mode:o}) lets another user replace the cache, so it is not used: directories above \
         the cache must belong to root or the gateway's user and not be writable by group or \
         others unless sticky (like /tmp); choose another path or fix {parent}"
    )]
    UnsafeParent {
        path: PathBuf,
        parent: PathBuf,
        owner: u32,
        mode: u32,
    },
    #[error(
        "guest_cache_dir key {path} (owner uid {owner}, mode {mode:o}) must be a regular file of \
         the gateway's user (uid {euid}) that no one else may read; it is not trusted: delete it \
         (a new key is made, and guests are compiled again once)"
    )]
    KeyNotPrivate {
        path: PathBuf,
        owner: u32,
        mode: u32,
        euid: u32,
    },
    #[error(
        "guest_cache_dir key {path} is {len} bytes, not {KEY_LEN}: delete it (a new key is \
         made, and guests are compiled again once)"
    )]
    KeyDamaged { path: PathBuf, len: u64 },
}

/// Why an artifact in the cache is not loaded (logged; the guest is compiled again).
#[derive(Debug, thiserror::Error)]
enum ArtifactError {
    #[error("cannot read it: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error(
        "its MAC does not verify (damaged, or not written by this cache for this component and \
         engine)"
    )]
    Unauthenticated,
    #[error("wasmtime refuses it: {0}")]
    Deserialize(wasmtime::Error),
}

/// Artifacts kept: the most recently used; older ones (guests replaced long ago, or another
/// engine's) are deleted when a new one is stored.
pub const MAX_ARTIFACTS: usize = 8;

/// The file in the cache directory that holds the key artifacts are authenticated with.
pub const KEY_FILE: &str = "artifacts.key";

/// Bytes of the key, and of the MAC in front of every artifact (HMAC-SHA256).
const KEY_LEN: usize = 32;
const MAC_LEN: usize = 32;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// A private directory of compiled components.
pub struct CompileCache {
    /// Absolute, with the directories above it resolved: checked once in `open`, and no one
    /// but root and the gateway's user can change what it names afterwards.
    dir: PathBuf,
    /// Keyed with the cache's key; cloned for every artifact.
    mac: HmacSha256,
}

impl std::fmt::Debug for CompileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the key.
        f.debug_struct("CompileCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl CompileCache {
    /// Opens (creating) the directory and its key, refusing a directory that someone other
    /// than root and the gateway's user could have written to or could replace.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let euid = nix::unistd::geteuid().as_raw();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CacheError::Io { path, source }
        };
        let absolute = std::path::absolute(dir).map_err(io(dir))?;
        let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
            return Err(CacheError::NotDirectory {
                path: dir.to_owned(),
            });
        };
        // Missing directories above it are made like the cache itself (0700, this user's).
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io(parent))?;
        let parent = parent.canonicalize().map_err(io(parent))?;
        for above in parent.ancestors() {
            check_parent(dir, above, euid)?;
        }

        let dir = parent.join(name);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(io(&dir)(err)),
        }
        let meta = std::fs::symlink_metadata(&dir).map_err(io(&dir))?;
        if meta.file_type().is_symlink() {
            return Err(CacheError::Symlink { path: dir });
        }
        if !meta.is_dir() {
            return Err(CacheError::NotDirectory { path: dir });
        }
        if meta.uid() != euid {
            return Err(CacheError::NotOwned {
                path: dir,
                owner: meta.uid(),
                euid,
            });
        }
        if meta.mode() & 0o022 != 0 {
            return Err(CacheError::NotPrivate {
                path: dir,
                mode: meta.mode() & 0o7777,
            });
        }

        let key = read_or_make_key(&dir, euid)?;
        let mac = <HmacSha256 as hmac::Mac>::new_from_slice(&key)
            .expect("HMAC takes a key of any length");
        Ok(CompileCache { dir, mac })
    }

    /// The component for `bytes` (whose SHA-256 is `sha256`): from the cache when an
    /// artifact for this component and engine is there, else compiled and stored.
    pub fn component(
        &self,
        engine: &Engine,
        bytes: &[u8],
        sha256: &str,
    ) -> wasmtime::Result<(Component, Compiled, Duration)> {
        let started = Instant::now();
        let path = self.dir.join(format!("{}.cwasm", key(engine, sha256)));
        match self.load(engine, sha256, &path) {
            Ok(Some((component, file))) => {
                // Marks it recently used, for `prune`.
                let _ = file.set_modified(std::time::SystemTime::now());
                return Ok((component, Compiled::Hit, started.elapsed()));
            }
            Ok(None) => {}
            // A truncated, foreign or planted file: compiled again below, and replaced.
            Err(err) => tracing::warn!(
                path = %path.display(),
                error = %err,
                "compiled guest in the cache is unusable; compiling again"
            ),
        }
        let component = Component::new(engine, bytes)?;
        let compiled = match self.store(engine, sha256, &component, &path) {
            Ok(()) => {
                self.prune();
                Compiled::Stored
            }
            Err(err) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %err,
                    "cannot store the compiled guest; the next start compiles it again"
                );
                Compiled::NotStored
            }
        };
        Ok((component, compiled, started.elapsed()))
    }

    /// The artifact at `path`, if there is one, once its MAC verifies; with the open file.
    fn load(
        &self,
        engine: &Engine,
        sha256: &str,
        path: &Path,
    ) -> Result<Option<(Component, File)>, ArtifactError> {
        let mut file = match open_no_follow(path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(ArtifactError::NotAFile);
        }
        // Read, not mapped: a mapped file that someone truncates would crash the process
        // (SIGBUS).
        let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        file.read_to_end(&mut bytes)?;
        if bytes.len() < MAC_LEN {
            return Err(ArtifactError::Unauthenticated);
        }
        let (tag, artifact) = bytes.split_at(MAC_LEN);
        self.mac(engine, sha256, artifact)
            .verify_slice(tag)
            .map_err(|_| ArtifactError::Unauthenticated)?;
        let component = deserialize(engine, artifact).map_err(ArtifactError::Deserialize)?;
        Ok(Some((component, file)))
    }

    /// Writes the MAC and the compiled code beside `path`, then renames it into place.
    fn store(
        &self,
        engine: &Engine,
        sha256: &str,
        component: &Component,
        path: &Path,
    ) -> std::io::Result<()> {
        let artifact = component.serialize().map_err(std::io::Error::other)?;
        let tag = self.mac(engine, sha256, &artifact).finalize().into_bytes();
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = create_private(&tmp)?;
        file.write_all(&tag)?;
        file.write_all(&artifact)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// The MAC of an artifact: over the component's SHA-256, the engine's compatibility
    /// hash and the compiled code, so that an artifact verifies only under its own name.
    fn mac(&self, engine: &Engine, sha256: &str, artifact: &[u8]) -> HmacSha256 {
        let mut hasher = DigestHasher(self.mac.clone());
        sha256.hash(&mut hasher);
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let mut mac = hasher.0;
        mac.update(artifact);
        mac
    }

    /// Deletes all but the [`MAX_ARTIFACTS`] most recently used artifacts.
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut artifacts: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        artifacts.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
        for (_, old) in artifacts.into_iter().skip(MAX_ARTIFACTS) {
            let _ = std::fs::remove_file(old);
        }
    }
}

/// A directory above the cache (symbolic links resolved) may be changed only by root or the
/// gateway's user: owned by one of them, and not writable by group or others unless sticky
/// (then others can add entries, but not rename or remove the cache).
fn check_parent(cache: &Path, parent: &Path, euid: u32) -> Result<(), CacheError> {
    let meta = std::fs::symlink_metadata(parent).map_err(|source| CacheError::Io {
        path: parent.to_owned(),
        source,
    })?;
    let sticky = meta.mode() & 0o1000 != 0;
    let owner_ok = meta.uid() == 0 || meta.uid() == euid;
    if meta.file_type().is_symlink() || !owner_ok || (meta.mode() & 0o022 != 0 && !sticky) {
        return Err(CacheError::UnsafeParent {
            path: cache.to_owned(),
            parent: parent.to_owned(),
            owner: meta.uid(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// The cache's key: read, or made when there is none yet.
fn read_or_make_key(dir: &Path, euid: u32) -> Result<[u8; KEY_LEN], CacheError> {
    let path = dir.join(KEY_FILE);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CacheError::Io { path, source }
    };
    match open_no_follow(&path) {
        Ok(file) => return read_key(file, &path, euid),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(open_error(&path, err)),
    }
    // Written whole beside its name, then linked into place: a gateway starting at the
    // same time reads either no key or all of one, and the first to link wins.
    let mut key = [0u8; KEY_LEN];
    File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut key))
        .map_err(io(Path::new("/dev/urandom")))?;
    let tmp = dir.join(format!("{KEY_FILE}.tmp{}", std::process::id()));
    let written = create_private(&tmp).and_then(|mut file| {
        file.write_all(&key)?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, &path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(io(&path)(err)),
    }
    let file = open_no_follow(&path).map_err(|err| open_error(&path, err))?;
    read_key(file, &path, euid)
}

/// Reads the key from its open file, once the file is the gateway user's and private.
fn read_key(mut file: File, path: &Path, euid: u32) -> Result<[u8; KEY_LEN], CacheError> {
    let meta = file.metadata().map_err(|source| CacheError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() || meta.uid() != euid || meta.mode() & 0o077 != 0 {
        return Err(CacheError::KeyNotPrivate {
            path: path.to_owned(),
            owner: meta.uid(),
            mode: meta.mode() & 0o7777,
            euid,
        });
    }
    let mut key = [0u8; KEY_LEN];
    if meta.len() != KEY_LEN as u64 || file.read_exact(&mut key).is_err() {
        return Err(CacheError::KeyDamaged {
            path: path.to_owned(),
            len: meta.len(),
        });
    }
    Ok(key)
}

/// Opens a file to read, refusing a symbolic link (`ELOOP`).
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Creates a file only this user may read (`O_EXCL`: never an existing file or link),
/// replacing a leftover of an earlier process with the same id.
fn create_private(path: &Path) -> std::io::Result<File> {
    let _ = std::fs::remove_file(path);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// An error opening a file in the cache; a symbolic link says so.
fn open_error(path: &Path, source: std::io::Error) -> CacheError {
    if source.raw_os_error() == Some(nix::libc::ELOOP) {
        CacheError::Symlink {
            path: path.to_owned(),
        }
    } else {
        CacheError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The artifact's name: the component's hash and everything about the engine that decides
/// whether compiled code fits it.
fn key(engine: &Engine, sha256: &str) -> String {
    let mut hasher = DigestHasher(sha2::Sha256::new());
    sha256.hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher
        .0
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Feeds `Hash` output into a digest or MAC: stable across runs, unlike the std hasher's
/// seeds.
struct DigestHasher<D>(D);

impl<D: sha2::digest::Update> Hasher for DigestHasher<D> {
    fn finish(&self) -> u64 {
        0 // only the digest is read
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Compiled code from the cache, once its MAC has verified.
#[allow(unsafe_code)]
fn deserialize(engine: &Engine, artifact: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: wasmtime runs deserialized code unchecked, so it must come from a trusted
    // source. `artifact` carried a MAC over this component's hash, this engine's
    // compatibility hash and these bytes, made with a key that only the gateway's user can
    // read, in a directory that only it (or root) can write to or replace (`open`): so
    // `store` wrote it, for this component, from a `Component` wasmtime compiled.
    // Deserialization itself also checks the header, the wasmtime version and the engine
    // settings.
    unsafe { Component::deserialize(engine, artifact) }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// The smallest component, and one that differs from it (an empty core module inside).
    const EMPTY: &[u8] = b"\0asm\x0d\x00\x01\x00";
    const WITH_MODULE: &[u8] = b"\0asm\x0d\x00\x01\x00\x01\x08\0asm\x01\0\0\0";

    fn sha256(bytes: &[u8]) -> String {
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A fresh directory of this test's own (mode 0700) under the system's temp dir.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("gateway-cache-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        DirBuilder::new().mode(0o700).create(&dir).unwrap();
        dir
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Compiles `bytes` through the cache in `dir`.
    fn through(dir: &Path, engine: &Engine, bytes: &[u8]) -> Compiled {
        let cache = CompileCache::open(dir).unwrap();
        cache.component(engine, bytes, &sha256(bytes)).unwrap().1
    }

    fn artifact_path(dir: &Path, engine: &Engine, bytes: &[u8]) -> PathBuf {
        let cache = CompileCache::open(dir).unwrap();
        cache
            .dir
            .join(format!("{}.cwasm", key(engine, &sha256(bytes))))
    }

    /// Only root can give a directory to another user.
    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn stores_then_loads_with_a_private_key() {
        let root = scratch("hit");
        let dir = root.join("cache");
        let engine = Engine::default();
        assert_eq!(through(&dir, &engine, EMPTY), Compiled::Stored);
        assert_eq!(through(&dir, &engine, EMPTY), Compiled::Hit);
        let key = std::fs::symlink_metadata(dir.join(KEY_FILE)).unwrap();
        assert!(key.is_file());
        assert_eq!(key.mode() & 0o777, 0o600);
        assert_eq!(key.len(), KEY_LEN as u64);
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let _ = std::fs::remove_dir_all(&root);
    }

    /// Whatever lies under a component's name without this cache's MAC for that component is
    /// not loaded, but compiled again and replaced.
    #[test]
    fn artifacts_without_this_caches_mac_for_this_component_are_not_loaded() {
        let root = scratch("planted");
        let dir = root.join("cache");
        let engine = Engine::default();
        let path = artifact_path(&dir, &engine, EMPTY);
        let other = Component::new(&engine, WITH_MODULE).unwrap();
        let foreign = other.serialize().unwrap();

        let planted: [(&str, Vec<u8>); 4] = [
            ("garbage", b"not compiled code".to_vec()),
            ("short", b"short".to_vec()),
            // Valid compiled code of another component, as a planted file would be.
            ("a bare serialization", foreign.clone()),
            ("a serialization behind a wrong MAC", {
                let mut bytes = vec![0u8; MAC_LEN];
                bytes.extend_from_slice(&foreign);
                bytes
            }),
        ];
        for (what, bytes) in planted {
            std::fs::write(&path, bytes).unwrap();
            assert_eq!(through(&dir, &engine, EMPTY), Compiled::Stored, "{what}");
            assert_eq!(through(&dir, &engine, EMPTY), Compiled::Hit, "{what}");
        }

        // This cache's genuine artifact of another component, under this one's name.
        assert_eq!(through(&dir, &engine, WITH_MODULE), Compiled::Stored);
        let other_path = artifact_path(&dir, &engine, WITH_MODULE);
        std::fs::copy(&other_path, &path).unwrap();
        assert_eq!(
            through(&dir, &engine, EMPTY),
            Compiled::Stored,
            "another component's artifact"
        );

        // Another cache's genuine artifact of this component (another key).
        let elsewhere = root.join("elsewhere");
        assert_eq!(through(&elsewhere, &engine, EMPTY), Compiled::Stored);
        std::fs::copy(artifact_path(&elsewhere, &engine, EMPTY), &path).unwrap();
        assert_eq!(
            through(&dir, &engine, EMPTY),
            Compiled::Stored,
            "another cache's artifact"
        );
        assert_eq!(through(&dir, &engine, EMPTY), Compiled::Hit);
        let _ = std::fs::remove_dir_all(&root);
    }

    /// An artifact that is a symbolic link is not followed, even to a genuine artifact.
    #[test]
    fn a_symlinked_artifact_is_not_loaded() {
        let root = scratch("artifact-link");
        let dir = root.join("cache");
        let engine = Engine::default();
        assert_eq!(through(&dir, &engine, EMPTY), Compiled::Stored);
        let path = artifact_path(&dir, &engine, EMPTY);
        let stash = root.join("stash.cwasm");
        std::fs::rename(&path, &stash).unwrap();
        std::os::unix::fs::symlink(&stash, &path).unwrap();
        assert_eq!(through(&dir, &engine, EMPTY), Compiled::Stored);
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(through(&dir, &engine, EMPTY), Compiled::Hit);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_symlinked_cache_dir_is_refused() {
        let root = scratch("dir-link");
        let real = root.join("real");
        CompileCache::open(&real).unwrap();
        let link = root.join("cache");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = CompileCache::open(&link).unwrap_err();
        assert!(matches!(err, CacheError::Symlink { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_cache_dir_others_may_write_to_is_refused() {
        let root = scratch("shared");
        let dir = root.join("cache");
        CompileCache::open(&dir).unwrap();
        chmod(&dir, 0o770);
        let err = CompileCache::open(&dir).unwrap_err();
        assert!(matches!(err, CacheError::NotPrivate { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_cache_dir_of_another_user_is_refused() {
        if !is_root() {
            eprintln!("skipped: only root can make a directory of another user");
            return;
        }
        let root = scratch("owner");
        let dir = root.join("cache");
        DirBuilder::new().mode(0o700).create(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let err = CompileCache::open(&dir).unwrap_err();
        assert!(
            matches!(err, CacheError::NotOwned { owner: 65534, .. }),
            "{err}"
        );
        assert!(!dir.join(KEY_FILE).exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn directories_above_the_cache_must_not_let_others_replace_it() {
        let root = scratch("parents");
        let parent = root.join("shared");
        let dir = parent.join("cache");
        DirBuilder::new().mode(0o700).create(&parent).unwrap();

        chmod(&parent, 0o775);
        let err = CompileCache::open(&dir).unwrap_err();
        assert!(
            matches!(&err, CacheError::UnsafeParent { parent: p, .. } if p.ends_with("shared")),
            "{err}"
        );
        chmod(&parent, 0o757);
        assert!(CompileCache::open(&dir).is_err(), "world-writable");

        // Sticky, like /tmp: others may add entries but not rename or remove this one.
        chmod(&parent, 0o1777);
        CompileCache::open(&dir).unwrap();

        // Further up counts too.
        chmod(&parent, 0o755);
        chmod(&root, 0o777);
        let err = CompileCache::open(&dir).unwrap_err();
        assert!(matches!(err, CacheError::UnsafeParent { .. }), "{err}");
        chmod(&root, 0o700);
        CompileCache::open(&dir).unwrap();

        if is_root() {
            std::os::unix::fs::chown(&parent, Some(65534), None).unwrap();
            let err = CompileCache::open(&dir).unwrap_err();
            assert!(
                matches!(err, CacheError::UnsafeParent { owner: 65534, .. }),
                "{err}"
            );
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_key_must_be_private() {
        let root = scratch("key");
        let dir = root.join("cache");
        CompileCache::open(&dir).unwrap();
        let key = dir.join(KEY_FILE);

        chmod(&key, 0o640);
        let err = CompileCache::open(&dir).unwrap_err();
        assert!(matches!(err, CacheError::KeyNotPrivate { .. }), "{err}");

        std::fs::remove_file(&key).unwrap();
        let elsewhere = root.join("planted.key");
        std::fs::write(&elsewhere, [7u8; KEY_LEN]).unwrap();
        chmod(&elsewhere, 0o600);
        std::os::unix::fs::symlink(&elsewhere, &key).unwrap();
        let err = CompileCache::open(&dir).unwrap_err();
        assert!(matches!(err, CacheError::Symlink { .. }), "{err}");

        std::fs::remove_file(&key).unwrap();
        std::fs::write(&key, b"short").unwrap();
        chmod(&key, 0o600);
        let err = CompileCache::open(&dir).unwrap_err();
        assert!(
            matches!(err, CacheError::KeyDamaged { len: 5, .. }),
            "{err}"
        );

        // Deleting it makes a new one.
        std::fs::remove_file(&key).unwrap();
        CompileCache::open(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }
}

//! Compiled guests on disk (`guest_cache_dir`). Compiling a large component takes seconds
//! at every start and reload (a JavaScript guest of 12 MB: 8-11 s), so the compiled artifact
//! is kept, keyed by the component's SHA-256 and the engine's compatibility hash (wasmtime's
//! version, the target and every setting that changes code), and loaded instead of
//! compiling when both match.
//!
//! Loading compiled code runs it without validation, so the directory must be private to
//! the gateway's user: it is created with mode 0700, refused if group or others may write
//! to it, and every artifact is written beside its final name and renamed into place.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
}

/// Artifacts kept: the most recently used; older ones (guests replaced long ago, or another
/// engine's) are deleted when a new one is stored.
pub const MAX_ARTIFACTS: usize = 8;

/// A private directory of compiled components.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
}

impl CompileCache {
    /// Opens (creating) the directory, refusing one that others may write to.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let io = |source| CacheError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(dir).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode();
            if mode & 0o022 != 0 {
                return Err(CacheError::NotPrivate {
                    path: dir.to_owned(),
                    mode: mode & 0o7777,
                });
            }
        }
        Ok(CompileCache {
            dir: dir.to_owned(),
        })
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
        if path.is_file() {
            match load(engine, &path) {
                Ok(component) => {
                    // Marks it recently used, for `prune`.
                    let _ = std::fs::File::open(&path)
                        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                    return Ok((component, Compiled::Hit, started.elapsed()));
                }
                // A truncated or foreign file: compiled again below, and replaced.
                Err(err) => tracing::warn!(
                    path = %path.display(),
                    error = %err,
                    "compiled guest in the cache is unusable; compiling again"
                ),
            }
        }
        let component = Component::new(engine, bytes)?;
        let compiled = match store(&component, &path) {
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
}

impl CompileCache {
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

/// The artifact's name: the component's hash and everything about the engine that decides
/// whether compiled code fits it.
fn key(engine: &Engine, sha256: &str) -> String {
    let mut hasher = Sha256Hasher(sha2::Sha256::new());
    sha256.hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher
        .0
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Feeds `Hash` output into SHA-256: stable across runs, unlike the std hasher's seeds.
struct Sha256Hasher(sha2::Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        0 // only the digest is read
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Loads compiled code from the cache. The file is read, not mapped: a mapped file that
/// someone truncates would crash the process (SIGBUS).
#[allow(unsafe_code)]
fn load(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    let artifact = std::fs::read(path)?;
    // SAFETY: wasmtime runs deserialized code unchecked, so it must come from a trusted
    // source. Artifacts here are written only by `store` (renamed into place whole) in a
    // directory `open` made private to this user; deserialization itself checks the
    // header, the wasmtime version and the engine settings.
    unsafe { Component::deserialize(engine, &artifact) }
}

fn store(component: &Component, path: &Path) -> std::io::Result<()> {
    let artifact = component.serialize().map_err(std::io::Error::other)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    std::io::Write::write_all(&mut file, &artifact)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

//! TLS on the public listener (rustls): the certificate and key are re-read when either
//! file changes and on SIGHUP. A reload builds the new configuration completely before it
//! replaces the old one, so a bad file is refused and the certificate in use stays; new
//! handshakes get the new one, and live connections are not touched.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls: {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("tls: the certificate and key cannot serve: {0}")]
    Config(#[from] rustls::Error),
}

/// The files' modification times and sizes at the last load: a change to either reloads.
type Stamp = [(Option<SystemTime>, u64); 2];

/// The configuration new handshakes use, and where it comes from.
pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    loaded: Mutex<Stamp>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// The TLS of `config`, or `None` when it has no certificate (plain HTTP).
    pub fn load(config: &TlsConfig) -> Result<Option<Arc<Tls>>, TlsError> {
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            return Ok(None);
        };
        let stamp = stamp(cert_file, key_file);
        let server = server_config(cert_file, key_file)?;
        Ok(Some(Arc::new(Tls {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            current: RwLock::new(Arc::new(server)),
            loaded: Mutex::new(stamp),
        })))
    }

    /// An acceptor for one handshake, with the configuration current now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// Re-reads both files if either changed (or always, with `force`). `Ok(true)`: new
    /// handshakes use what was read. On error the configuration in use stays.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let now = stamp(&self.cert_file, &self.key_file);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if !force && now == *loaded {
            return Ok(false);
        }
        // Remember the stamp even when the files are bad, so a broken file is reported once
        // per change rather than at every poll.
        *loaded = now;
        let server = server_config(&self.cert_file, &self.key_file)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(server);
        Ok(true)
    }

    pub fn cert_file(&self) -> &Path {
        &self.cert_file
    }
}

fn stamp(cert_file: &Path, key_file: &Path) -> Stamp {
    [cert_file, key_file].map(|path| match std::fs::metadata(path) {
        Ok(meta) => (meta.modified().ok(), meta.len()),
        Err(_) => (None, 0),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn server_config(cert_file: &Path, key_file: &Path) -> Result<ServerConfig, TlsError> {
    let pem_error = |path: &Path, reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&read(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_file, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(cert_file, "no CERTIFICATE block in it".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key_file)?).map_err(|e| {
        pem_error(
            key_file,
            format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // The gateway speaks HTTP/1.1 only (WebSocket upgrades are HTTP/1.1).
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(server)
}

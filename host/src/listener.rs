//! Accepting connections, with every limit that applies before a WebSocket upgrade.
//!
//! A connection that is still HTTP (a handshake in progress, a publisher, a probe) holds one
//! of `limits.max_http_connections` permits, taken before `accept` so that past the bound
//! new connections wait in the kernel's backlog instead of costing a file descriptor and a
//! task each. Its request headers must arrive within `header_read_timeout_secs` (the same
//! bound applies to a keep-alive connection sitting idle between requests). The permit goes
//! back when the connection closes or upgrades: an upgraded socket belongs to its session,
//! which `limits.max_connections` bounds.
//!
//! With TLS, the handshake runs in the connection's own task (never in the accept loop),
//! bounded by `tls.handshake_timeout_secs` and holding the same permit.
//!
//! On drain, every HTTP connection is told to finish its request and close; whatever is
//! still open when the grace period ends is dropped, so no client can hold a shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::tls::Tls;

/// One listening socket and what it serves.
pub struct Listener {
    pub socket: TcpListener,
    pub app: axum::Router,
    /// Connections of this listener still speaking HTTP.
    pub http_connections: usize,
    /// A name for logs: `public` or `ops`.
    pub name: &'static str,
    /// Speaks TLS when set.
    pub tls: Option<Arc<Tls>>,
}

/// What every accept loop shares.
#[derive(Clone)]
pub struct Serving {
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Cancelled when the drain starts: stop accepting, finish requests, close.
    pub draining: CancellationToken,
    /// Cancelled when the grace period is over: drop whatever is left.
    pub stopped: CancellationToken,
    /// Every HTTP connection task, awaited on drain.
    pub connections: TaskTracker,
    pub metrics: Arc<Metrics>,
}

/// Accepts until the drain starts.
pub async fn accept(listener: Listener, serving: Serving) {
    let Listener {
        socket,
        app,
        http_connections,
        name,
        tls,
    } = listener;
    let permits = Arc::new(Semaphore::new(http_connections.max(1)));
    loop {
        let permit = tokio::select! {
            () = serving.draining.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return, // never closed
            },
        };
        let (stream, peer) = tokio::select! {
            () = serving.draining.cancelled() => return,
            accepted = socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors (or a connection reset before it was taken):
                    // wait a little instead of spinning on the same error.
                    tracing::warn!(listener = name, error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let span = tracing::debug_span!("http", listener = name, %peer);
        let serving_conn = serving.clone();
        let app = app.clone();
        let tls = tls.clone();
        serving.connections.spawn(
            async move {
                serving_conn.metrics.http_connections.inc();
                let _ = stream.set_nodelay(true);
                match tls {
                    None => serve_connection(stream, app, &serving_conn).await,
                    Some(tls) => {
                        if let Some(stream) = handshake(stream, &tls, &serving_conn).await {
                            serve_connection(stream, app, &serving_conn).await;
                        }
                    }
                }
                serving_conn.metrics.http_connections.dec();
                drop(permit); // closed or upgraded: another client may be accepted
            }
            .instrument(span),
        );
    }
}

/// The TLS handshake, bounded in time; `None` (counted, logged at debug) when it fails.
async fn handshake(
    stream: TcpStream,
    tls: &Tls,
    serving: &Serving,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let accepting =
        tokio::time::timeout(serving.tls_handshake_timeout, tls.acceptor().accept(stream));
    let result = tokio::select! {
        result = accepting => result,
        () = serving.stopped.cancelled() => return None,
    };
    match result {
        Ok(Ok(stream)) => {
            serving.metrics.tls_handshake("ok");
            Some(stream)
        }
        Ok(Err(err)) => {
            // Scanners, plain HTTP on the TLS port, clients that distrust the certificate.
            serving.metrics.tls_handshake("failed");
            tracing::debug!(error = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            serving.metrics.tls_handshake("timeout");
            None
        }
    }
}

async fn serve_connection<S>(stream: S, app: axum::Router, serving: &Serving)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Some(serving.header_read_timeout));
    let connection = http
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = serving.draining.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                () = serving.stopped.cancelled() => return,
            }
        }
    };
    if let Err(err) = result {
        // Timeouts and resets are what clients do; nothing for an operator to act on.
        tracing::debug!(error = %err, "http connection ended with an error");
    }
}

//! Accepting connections, with every limit that applies before a WebSocket upgrade.
//!
//! A connection that is still HTTP (a handshake in progress, a publisher, a probe) holds one
//! of `limits.max_http_connections` permits, taken before `accept` so that past the bound
//! new connections wait in the kernel's backlog instead of costing a file descriptor and a
//! task each. Its request headers must arrive within `header_read_timeout_secs` (the same
//! bound applies to a keep-alive connection sitting idle between requests). The permit goes
//! back when the connection closes or upgrades, or when it starts an SSE stream ([`HttpSlot`]):
//! from then on it belongs to its session, which `limits.max_connections` bounds.
//!
//! One client address holds at most `limits.max_http_connections_per_address` of those
//! permits: past it, its new connections are answered 429 and closed at once, so a crowd of
//! idle keep-alive connections from one client cannot delay everyone else's requests. A
//! response the client does not read within `limits.write_timeout_secs` ends the connection,
//! so a stalled reader cannot hold a permit either. Backend services and operators have the
//! ops listener (`ops_listen`), which browsers never reach.
//!
//! With TLS, the handshake runs in the connection's own task (never in the accept loop),
//! bounded by `tls.handshake_timeout_secs` and holding the same permit.
//!
//! On drain, every HTTP connection is told to finish its request and close; whatever is
//! still open when the grace period ends is dropped, so no client can hold a shutdown.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
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
    /// Of those, how many one client address may hold (0: no cap).
    pub per_address: usize,
    /// A name for logs: `public` or `ops`.
    pub name: &'static str,
    /// Speaks TLS when set.
    pub tls: Option<Arc<Tls>>,
}

/// What every accept loop shares.
#[derive(Clone)]
pub struct Serving {
    pub header_read_timeout: Duration,
    /// How long a write may wait on a client that does not read.
    pub write_timeout: Duration,
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
        per_address,
        name,
        tls,
    } = listener;
    let permits = Arc::new(Semaphore::new(http_connections.max(1)));
    let addresses = Addresses::default();
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
        let Some(address_slot) = addresses.take(peer.ip(), per_address) else {
            serving.metrics.refusal("address_limit");
            serving
                .connections
                .spawn(refuse_address(stream, permit).instrument(span));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = WriteDeadline::new(stream, serving.write_timeout);
        let serving_conn = serving.clone();
        let app = app.clone();
        let tls = tls.clone();
        serving.metrics.http_connections.inc();
        let slot = HttpSlot(Arc::new(Mutex::new(Some(Held {
            _permit: permit,
            _address: address_slot,
            metrics: serving.metrics.clone(),
        }))));
        serving.connections.spawn(
            async move {
                match tls {
                    None => serve_connection(stream, app, &serving_conn, slot.clone()).await,
                    Some(tls) => {
                        if let Some(stream) = handshake(stream, &tls, &serving_conn).await {
                            serve_connection(stream, app, &serving_conn, slot.clone()).await;
                        }
                    }
                }
                // Closed or upgraded: another client (of this address) may be accepted.
                slot.release();
            }
            .instrument(span),
        );
    }
}

/// What a connection holds while it speaks HTTP: a listener permit and its address's slot.
/// Every request carries it (as an extension), so that a response that turns the connection
/// into a session (an SSE stream) gives it back as an upgrade does.
#[derive(Clone)]
pub struct HttpSlot(Arc<Mutex<Option<Held>>>);

struct Held {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _address: AddressSlot,
    metrics: Arc<Metrics>,
}

impl HttpSlot {
    /// Gives the permit and the address slot back (once; later calls do nothing).
    pub fn release(&self) {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(held);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics.http_connections.dec();
    }
}

/// Connections in the HTTP phase per client address.
#[derive(Clone, Default)]
struct Addresses(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One connection's place in its address's count, given back on drop.
struct AddressSlot {
    addresses: Addresses,
    ip: IpAddr,
}

impl Addresses {
    /// A slot for `ip`, or `None` when it holds `cap` already (0: no cap).
    fn take(&self, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = counts.entry(ip).or_default();
        if cap > 0 && *held >= cap {
            return None;
        }
        *held += 1;
        Some(AddressSlot {
            addresses: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.addresses.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = counts.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Past its address's cap: a 429 the client can read (plain HTTP; over TLS it is simply
/// closed), written within a second, then closed.
async fn refuse_address(mut stream: TcpStream, permit: tokio::sync::OwnedSemaphorePermit) {
    const BODY: &str = "{\"error\":\"address_limit\",\"reason\":\"too many connections from \
                        this address (limits.max_http_connections_per_address)\"}";
    let response = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    drop(permit); // held while refusing, so refusals cannot pile up unbounded
}

/// A stream whose writes fail once they have waited `limit` on a peer that does not read:
/// hyper has no write timeout of its own.
pub struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write is pending; boxed so an idle connection does not carry a timer.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            waiting: None,
        }
    }

    /// Ready(Err) when the pending write has waited past the limit.
    fn expired(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client stopped reading",
        ))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(result) => {
                self.waiting = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.expired(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                self.waiting = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.expired(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(result) => {
                self.waiting = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.expired(cx).map(Err),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The TLS handshake, bounded in time; `None` (counted, logged at debug) when it fails.
async fn handshake(
    stream: WriteDeadline<TcpStream>,
    tls: &Tls,
    serving: &Serving,
) -> Option<tokio_rustls::server::TlsStream<WriteDeadline<TcpStream>>> {
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

async fn serve_connection<S>(stream: S, app: axum::Router, serving: &Serving, slot: HttpSlot)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let app = app.map_request(
        move |mut request: axum::http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(slot.clone());
            request
        },
    );
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

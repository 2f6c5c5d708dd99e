//! The facade's accept loop: TLS (optional), connection cap, header limits and timeouts, and
//! graceful drain, around hyper's HTTP/1.1 and HTTP/2 server.
//!
//! # Why our own loop and not `axum::serve`
//! `axum::serve` has no header read timeout, no header size limit, no TLS and no cap on
//! connections, so one slow or greedy client could hold sockets and memory without end. Each
//! connection here is bounded in time (the TLS handshake and each request head must arrive
//! within their timeouts) and in space (request head at most `max_header_bytes`: more is a
//! 431; HTTP/2 at most 100 concurrent streams and the same header list size).
//!
//! Over `max_connections`, a plain-HTTP connection is answered at once with a 503
//! OperationOutcome, `Retry-After: 1` and `Connection: close`, then closed; a TLS connection
//! is closed before its handshake (a handshake is the expensive part we are refusing to do).
//! At most 64 refusals are answered at once; past that a refused connection is just closed.

use std::{sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::config::Limits;

/// Streams served at once on one HTTP/2 connection.
const H2_MAX_STREAMS: u32 = 100;
/// How long shutdown waits for requests in flight before it closes what is left.
const DRAIN: Duration = Duration::from_secs(30);
/// How long a refused connection may take to read our 503 before it is closed.
const REFUSE_LINGER: Duration = Duration::from_secs(2);
/// Refused connections being answered at once; past this a refused connection is just closed,
/// so a flood of connections cannot grow the refusals themselves without bound.
const MAX_REFUSING: usize = 64;

/// What one listener serves and how.
#[derive(Debug, Clone)]
pub struct Listen {
    pub limits: Limits,
    /// TLS on this listener; plain HTTP without.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Serves `router` on `listener` until `stopped` turns true, then drains.
pub fn serve(
    listener: TcpListener,
    router: axum::Router,
    listen: Listen,
    mut stopped: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>> {
    let max = listen
        .limits
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(max));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let builder = Arc::new(builder(&listen.limits));
    let tls = listen.tls.map(tokio_rustls::TlsAcceptor::from);
    let handshake_timeout = listen.limits.tls_handshake_timeout;
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, or a connection reset before accept: keep
                        // serving the connections we have and try again shortly.
                        warn!(error = %e, "Accept failed.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stopping(&mut stopped) => break,
            };
            let _ = stream.set_nodelay(true);
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                if let (None, Ok(slot)) = (&tls, refusing.clone().try_acquire_owned()) {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(slot);
                    });
                }
                debug!(%peer, "Connection refused: at the connection cap.");
                continue;
            };
            let (builder, router, tls, stop) = (
                builder.clone(),
                router.clone(),
                tls.clone(),
                stopped.clone(),
            );
            tokio::spawn(async move {
                match tls {
                    None => connection(builder, stream, router, stop).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls_stream)) => {
                                connection(builder, tls_stream, router, stop).await
                            }
                            Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed."),
                            Err(_) => debug!(%peer, "TLS handshake timed out."),
                        }
                    }
                }
                drop(permit);
            });
        }
        drop(listener);
        // Every connection holds a permit: all of them back means every connection is done.
        if tokio::time::timeout(DRAIN, permits.acquire_many(max as u32))
            .await
            .is_err()
        {
            info!("Drain time is up; connections still open close when the process exits.");
        }
        Ok(())
    })
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(Limits::MIN_HEADER_BYTES));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(limits.header_read_timeout.max(Duration::from_secs(1)));
    builder
}

/// One connection, served until it ends or the listener stops (then gracefully).
async fn connection<I>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: I,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopping(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Header timeouts, oversized heads and clients that vanish end here; none of it
        // carries request content.
        debug!(error = %e, "Connection ended with an error.");
    }
}

/// Resolves once the listener is told to stop (or its owner is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The answer to a plain-HTTP connection over the cap: a 503 OperationOutcome, then close.
async fn refuse(mut stream: TcpStream) {
    let body = serde_json::to_vec(&crate::fhir::operation_outcome(&[crate::fhir::Issue::new(
        "error",
        "throttled",
        "the gateway has too many connections open: try again after the time in Retry-After",
    )]))
    .unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\ncontent-length: {}\r\nretry-after: 1\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        crate::fhir::FHIR_JSON,
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await?;
        // Read what the client sent, so closing does not reset the connection and lose the
        // answer before the client has read it.
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

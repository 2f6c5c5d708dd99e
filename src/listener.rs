//! The facade's accept loop: TLS (optional), connection cap, header limits and timeouts, and
//! graceful drain, around hyper's HTTP/1.1 and HTTP/2 server.
//!
//! # Why our own loop and not `axum::serve`
//! `axum::serve` has no header read timeout, no header size limit, no TLS and no cap on
//! connections, so one slow or greedy client could hold sockets and memory without end. Each
//! connection here is bounded in time (below) and in space (request head at most
//! `max_header_bytes`: more is a 431; HTTP/2 at most 100 concurrent streams and the same
//! header list size).
//!
//! # Time bounds on every connection
//! hyper's `header_read_timeout` starts only inside its HTTP/1 code, so the listener watches
//! each connection itself ([`Watch`]): the TLS handshake within `tls_handshake_timeout`; the
//! first complete request head within `header_read_timeout` of the connection (a silent
//! socket or a partial HTTP/2 preface is closed, freeing its permit); no request in flight
//! for `idle_timeout` ends the connection gracefully (HTTP/1 keep-alive and HTTP/2 alike; an
//! HTTP/2 client is also pinged, and closed when it stops answering); a write that makes no
//! progress for `write_timeout` (a client that does not read its answers) closes it.
//!
//! A request is in flight until its handler has answered; writing the answer's body is then
//! bounded by `write_timeout` while the socket is full, and by `idle_timeout` plus
//! `header_read_timeout` in all. The second bound is what ends an HTTP/2 stream whose client
//! grants no flow-control window (its socket never fills, so no write stalls); the cost is
//! that an answer still being written to a slow but reading client after that long is cut.
//!
//! Plain listeners speak HTTP/1.1 only; TLS listeners speak what ALPN chose (`h2` or
//! HTTP/1.1). Nothing sniffs the first bytes, so nothing waits on a client without a timer.
//!
//! Over `max_connections`, a plain-HTTP connection is answered at once with a 503
//! OperationOutcome, `Retry-After` (the shed setting) and `Connection: close`, then closed; a
//! TLS connection is closed before its handshake (a handshake is the expensive part we are
//! refusing to do). At most 64 refusals are answered at once; past that a refused connection
//! is just closed.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinHandle,
    time::Instant,
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
    /// What `Retry-After` tells a connection refused at the cap (the shed setting).
    pub retry_after: Duration,
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
    let builders = Arc::new(Builders::new(&listen.limits));
    let tls = listen.tls.map(tokio_rustls::TlsAcceptor::from);
    let handshake_timeout = listen.limits.tls_handshake_timeout;
    let retry_after = listen.retry_after.as_secs().max(1);
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
                        refuse(stream, retry_after).await;
                        drop(slot);
                    });
                }
                debug!(%peer, "Connection refused: at the connection cap.");
                continue;
            };
            let (builders, router, tls, stop) = (
                builders.clone(),
                router.clone(),
                tls.clone(),
                stopped.clone(),
            );
            tokio::spawn(async move {
                match tls {
                    None => connection(&builders.h1, &builders.times, stream, router, stop).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                        {
                            Ok(Ok(tls_stream)) => {
                                // ALPN decided the protocol; a client that offered none gets
                                // HTTP/1.1.
                                let builder = if tls_stream.get_ref().1.alpn_protocol()
                                    == Some(b"h2".as_slice())
                                {
                                    &builders.h2
                                } else {
                                    &builders.h1
                                };
                                connection(builder, &builders.times, tls_stream, router, stop).await
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

/// The time bounds the listener itself keeps on every connection (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Times {
    first_request: Duration,
    idle: Duration,
    write_stall: Duration,
    /// How often a connection's [`Watch`] is looked at.
    tick: Duration,
}

/// One HTTP/1.1-only and one HTTP/2-only connection builder, and the bounds around both.
struct Builders {
    h1: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
    times: Times,
}

impl Builders {
    fn new(limits: &Limits) -> Self {
        let shortest = limits
            .header_read_timeout
            .min(limits.idle_timeout)
            .min(limits.write_timeout);
        Self {
            h1: builder(limits).http1_only(),
            h2: builder(limits).http2_only(),
            times: Times {
                first_request: limits.header_read_timeout,
                idle: limits.idle_timeout,
                write_stall: limits.write_timeout,
                tick: (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
            },
        }
    }
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
        // A client that stops answering pings is closed even while a stream is open.
        .keep_alive_interval(limits.idle_timeout.min(Duration::from_secs(30)))
        .keep_alive_timeout(limits.header_read_timeout.max(Duration::from_secs(1)));
    builder
}

/// One connection, served until it ends, its [`Watch`] finds it stuck or idle, or the
/// listener stops (then gracefully).
async fn connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    times: &Times,
    io: I,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = Arc::new(Watch::new());
    let service = Counted {
        inner: TowerToHyperService::new(router),
        watch: watch.clone(),
    };
    let io = Watched {
        inner: io,
        watch: watch.clone(),
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopping(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        verdict = watch.verdict(times) => match verdict {
            Verdict::Close(why) => {
                debug!(why, "Connection closed.");
                return;
            }
            Verdict::Idle => {
                debug!("Connection idle: closing it gracefully.");
                conn.as_mut().graceful_shutdown();
                // A client that does not take part in the close is not waited for long.
                match tokio::time::timeout(times.first_request, conn).await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
        }
    };
    if let Err(e) = result {
        // Header timeouts, oversized heads and clients that vanish end here; none of it
        // carries request content.
        debug!(error = %e, "Connection ended with an error.");
    }
}

/// What one connection has been doing, shared by its IO ([`Watched`]), its service
/// ([`Counted`]) and the loop that serves it. Times are milliseconds since `opened`.
struct Watch {
    opened: Instant,
    /// Requests whose head was complete (the service was called).
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// When the last request finished (or the connection opened).
    idle_since: AtomicU64,
    /// When a write first found the socket full, plus one; 0 while writes make progress.
    write_blocked: AtomicU64,
}

/// Why [`Watch::verdict`] ended a connection.
enum Verdict {
    /// Close at once: the client broke a bound.
    Close(&'static str),
    /// No request for the idle time: close gracefully.
    Idle,
}

impl Watch {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            requests: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    fn finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(self.now_ms(), Ordering::Release);
        }
    }

    /// A write or flush returned: `pending` when the socket was full.
    fn wrote(&self, pending: bool) {
        if pending {
            let _ = self.write_blocked.compare_exchange(
                0,
                self.now_ms().saturating_add(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        } else {
            self.write_blocked.store(0, Ordering::Release);
        }
    }

    /// Resolves when the connection breaks one of `times`' bounds.
    async fn verdict(&self, times: &Times) -> Verdict {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut tick = tokio::time::interval(times.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = self.now_ms();
            let blocked = self.write_blocked.load(Ordering::Acquire);
            if blocked != 0 && now.saturating_sub(blocked - 1) >= ms(times.write_stall) {
                return Verdict::Close("a write made no progress in the write timeout");
            }
            if self.requests.load(Ordering::Relaxed) == 0 {
                if now >= ms(times.first_request) {
                    return Verdict::Close("no request head arrived in the header read timeout");
                }
            } else if self.in_flight.load(Ordering::Acquire) == 0
                && now.saturating_sub(self.idle_since.load(Ordering::Acquire)) >= ms(times.idle)
            {
                return Verdict::Idle;
            }
        }
    }
}

/// A connection's IO, telling its [`Watch`] when writes stop making progress.
struct Watched<I> {
    inner: I,
    watch: Arc<Watch>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch.wrote(poll.is_pending());
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch.wrote(poll.is_pending());
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch.wrote(poll.is_pending());
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router as a hyper service that tells the connection's [`Watch`] when each request
/// starts and finishes.
struct Counted<S> {
    inner: S,
    watch: Arc<Watch>,
}

/// Marks a request finished when dropped (answered, failed or cancelled).
struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished();
    }
}

impl<S, R> hyper::service::Service<R> for Counted<S>
where
    S: hyper::service::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, req: R) -> Self::Future {
        self.watch.started();
        let guard = InFlight(self.watch.clone());
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            drop(guard);
            r
        })
    }
}

/// Resolves once the listener is told to stop (or its owner is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The answer to a plain-HTTP connection over the cap: a 503 OperationOutcome, then close.
async fn refuse(mut stream: TcpStream, retry_after: u64) {
    let body = serde_json::to_vec(&crate::fhir::operation_outcome(&[crate::fhir::Issue::new(
        "error",
        "throttled",
        "the gateway has too many connections open: try again after the time in Retry-After",
    )]))
    .unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {}\r\ncontent-length: {}\r\nretry-after: {retry_after}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        crate::fhir::FHIR_JSON,
        body.len(),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_connection_over_the_cap_is_told_the_configured_retry_after() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(60),
            ..Limits::default()
        };
        let task = serve(
            listener,
            axum::Router::new(),
            Listen {
                limits,
                tls: None,
                retry_after: Duration::from_secs(7),
            },
            stopped,
        );
        // One connection holds the only place (it has begun a request head).
        let mut held = TcpStream::connect(addr).await.unwrap();
        held.write_all(b"GET / HT").await.unwrap();
        // Until the listener has accepted it another may get in: ask until refused (a
        // generous guard stops a hang).
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out).await;
                let out = String::from_utf8_lossy(&out).into_owned();
                if out.starts_with("HTTP/1.1 503") {
                    break out;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        assert!(answer.contains("retry-after: 7\r\n"), "{answer}");
        drop(held);
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
    }
}

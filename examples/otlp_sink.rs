//! A do-nothing OTLP/HTTP receiver for benchmarks: accepts `POST /v1/traces` on loopback,
//! counts requests and bytes, answers 200. `GET /stats` returns the counts.
//!
//! `cargo run --release --example otlp_sink -- 127.0.0.1:4318`

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use http_body_util::{BodyExt, Full};
use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4318".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("otlp sink on http://{}", listener.local_addr()?);
    let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    loop {
        let (stream, _) = listener.accept().await?;
        let counts = counts.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let counts = counts.clone();
                async move {
                    let stats = req.uri().path() == "/stats";
                    let body = req.into_body().collect().await?.to_bytes();
                    let reply = if stats {
                        format!(
                            "{{\"exports\":{},\"bytes\":{}}}\n",
                            counts.0.load(Ordering::Relaxed),
                            counts.1.load(Ordering::Relaxed)
                        )
                    } else {
                        counts.0.fetch_add(1, Ordering::Relaxed);
                        counts.1.fetch_add(body.len() as u64, Ordering::Relaxed);
                        String::new()
                    };
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(reply))))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

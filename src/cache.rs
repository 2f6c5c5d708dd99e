//! The answer cache: raw upstream answers, before policy, keyed by source and query.
//!
//! # Why before policy
//! A cached answer is what the source said, never what one caller was allowed to see. Policy
//! runs on every response after the cache, so a policy change applies to the very next
//! request, cached or not, and no caller ever reads another caller's filtered view.
//!
//! # How it behaves
//! - One moka cache for the whole gateway, bounded by weight in bytes (`max_bytes`: an
//!   estimate of the heap each parsed answer holds, not its serialised size, which
//!   undercounts it several times), keyed by source id + patient + the types asked (the
//!   query's shape).
//! - Time to live per source kind (`[cache.ttl]`); zero means that kind is not cached.
//! - Concurrent misses for one key are coalesced (`try_get_with`): one upstream call, every
//!   waiter gets its answer. Errors are never cached.
//! - Every answer stored is stamped: each resource gets a `meta` extension
//!   ([`FETCHED_AT_URL`]) with the instant it was fetched; `meta.lastUpdated` is kept as
//!   the source sent it.
//! - Optional stale-if-error: an expired answer younger than `ttl + stale_if_error` is served
//!   when the refresh fails (breaker open included), each resource tagged
//!   [`STALE_TAG_CODE`] in [`CACHE_TAG_SYSTEM`].
//!
//! Freshness is judged on `tokio::time` (so it is tested on a paused clock); moka's own
//! expiry (real time, `ttl + stale_if_error`) only frees the memory.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use connectors::{SourceKind, SourceQuery, SourceRecord};
use futures::FutureExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};

use crate::fanout::{CallFuture, SourceCall, SourceStack};

/// The `meta` extension giving when the gateway fetched a resource from its source.
pub const FETCHED_AT_URL: &str =
    "https://tributary.example.org/fhir/StructureDefinition/fetched-at";
/// The code system of the cache's `meta.tag`s.
pub const CACHE_TAG_SYSTEM: &str = "https://tributary.example.org/fhir/CodeSystem/cache";
/// The tag on a resource served stale because its source failed.
pub const STALE_TAG_CODE: &str = "stale";

/// Cache settings (`[cache]` in config).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// The most the cache holds, in bytes: each answer weighs an estimate of the heap its
    /// parsed JSON holds (several times its serialised size; BENCHMARKS.md, S9).
    pub max_bytes: u64,
    /// How long an expired answer may still be served when its source fails; zero: never.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    pub ttl: TtlSettings,
}

/// Time to live per source kind (`[cache.ttl]`); zero turns caching off for that kind.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct TtlSettings {
    /// For kinds not named below (30 s unless set).
    #[serde(with = "humantime_serde")]
    pub default: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub demographics: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub gp_practice: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub trust: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub council: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub private_provider: Option<Duration>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            stale_if_error: Duration::ZERO,
            ttl: TtlSettings::default(),
        }
    }
}

impl CacheSettings {
    /// No caching at all.
    pub fn off() -> Self {
        Self {
            ttl: TtlSettings {
                default: Some(Duration::ZERO),
                ..TtlSettings::default()
            },
            ..Self::default()
        }
    }

    pub fn ttl_for(&self, kind: SourceKind) -> Duration {
        let t = &self.ttl;
        let by_kind = match kind {
            SourceKind::Demographics => t.demographics,
            SourceKind::GpPractice => t.gp_practice,
            SourceKind::Trust => t.trust,
            SourceKind::Council => t.council,
            SourceKind::PrivateProvider => t.private_provider,
        };
        by_kind.or(t.default).unwrap_or(Duration::from_secs(30))
    }

    /// Problems with these settings, for config validation.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_bytes < 1024 * 1024 && self.max_bytes != 0 {
            p.push(
                "max_bytes below 1 MiB holds almost nothing: use 0 to turn the cache off"
                    .to_owned(),
            );
        }
        p
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    source: Arc<str>,
    query: SourceQuery,
}

/// One stored answer.
struct Entry {
    record: SourceRecord,
    fetched_at: Instant,
    /// The weight: the answer's serialised size.
    bytes: u32,
    /// moka's eviction after `ttl + stale_if_error`.
    keep_for: Duration,
}

struct KeepFor;

// moka's trait names std's Instant; we never read it (freshness is judged on tokio's clock).
#[allow(clippy::disallowed_types)]
impl moka::Expiry<Key, Arc<Entry>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &Key,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }

    fn expire_after_update(
        &self,
        _key: &Key,
        value: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }
}

/// The gateway's answer cache, shared by every source's stack.
#[derive(Clone)]
pub struct AnswerCache {
    settings: Arc<CacheSettings>,
    store: moka::future::Cache<Key, Arc<Entry>>,
}

impl fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnswerCache")
            .field("entries", &self.store.entry_count())
            .field("bytes", &self.store.weighted_size())
            .finish_non_exhaustive()
    }
}

impl AnswerCache {
    pub fn new(settings: CacheSettings) -> Self {
        let store = moka::future::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|_k: &Key, v: &Arc<Entry>| v.bytes)
            .expire_after(KeepFor)
            .build();
        Self {
            settings: Arc::new(settings),
            store,
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// Bytes held now (moka's count, updated lazily).
    pub fn weighted_size(&self) -> u64 {
        self.store.weighted_size()
    }
}

/// Counters a source's status shows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheCounters {
    pub hits: u64,
    pub misses: u64,
    /// Answers served stale because the source failed.
    pub stale: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
}

/// The cache as the outermost layer of one source's stack.
#[derive(Clone)]
pub struct CacheService<S> {
    inner: S,
    cache: AnswerCache,
    source: Arc<str>,
    ttl: Duration,
    counters: Arc<Counters>,
}

/// Reads a source's cache counters.
#[derive(Clone, Debug)]
pub struct CacheProbe(Arc<Counters>);

impl CacheProbe {
    pub fn counters(&self) -> CacheCounters {
        CacheCounters {
            hits: self.0.hits.load(Ordering::Relaxed),
            misses: self.0.misses.load(Ordering::Relaxed),
            stale: self.0.stale.load(Ordering::Relaxed),
        }
    }
}

impl<S> fmt::Debug for CacheService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheService")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<S> CacheService<S> {
    /// `None` when this source kind is not cached.
    pub fn new(
        inner: S,
        cache: &AnswerCache,
        source: &str,
        kind: SourceKind,
    ) -> (Self, CacheProbe) {
        let counters = Arc::new(Counters::default());
        let ttl = if cache.settings.max_bytes == 0 {
            Duration::ZERO
        } else {
            cache.settings.ttl_for(kind)
        };
        (
            Self {
                inner,
                cache: cache.clone(),
                source: source.into(),
                ttl,
                counters: counters.clone(),
            },
            CacheProbe(counters),
        )
    }
}

/// An error shared by the callers of one coalesced miss; `outcome` looks inside it.
#[derive(Debug, Clone)]
pub struct SharedError(pub Arc<BoxError>);

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref().as_ref())
    }
}

impl<S: SourceStack> Service<SourceCall> for CacheService<S> {
    type Response = SourceRecord;
    type Error = BoxError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: SourceCall) -> Self::Future {
        if self.ttl.is_zero() {
            return self.inner.clone().oneshot(call).boxed();
        }
        let this = self.clone();
        async move {
            let deadline = call.deadline;
            // Waiting on someone else's miss counts against this caller's deadline too.
            match tokio::time::timeout_at(deadline, this.lookup(call)).await {
                Ok(result) => result,
                Err(elapsed) => Err(BoxError::from(elapsed)),
            }
        }
        .boxed()
    }
}

impl<S: SourceStack> CacheService<S> {
    async fn lookup(self, call: SourceCall) -> Result<SourceRecord, BoxError> {
        let key = Key {
            source: self.source.clone(),
            query: call.query.clone(),
        };
        let stale_window = self.cache.settings.stale_if_error;
        let mut stale = None;
        if let Some(entry) = self.cache.store.get(&key).await {
            let age = entry.fetched_at.elapsed();
            if age < self.ttl {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                crate::metrics::global().cache_hit();
                return Ok(entry.record.clone());
            }
            if age < self.ttl + stale_window {
                stale = Some(entry);
            }
            // Expired by our clock: make way for a fresh fetch.
            self.cache.store.invalidate(&key).await;
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().cache_miss();
        let keep_for = self.ttl + stale_window;
        let inner = self.inner.clone();
        let fetched = self
            .cache
            .store
            .try_get_with(key.clone(), async move {
                let record = inner.oneshot(call).await?;
                Ok::<_, BoxError>(Arc::new(stamp(record, keep_for)))
            })
            .await;
        match (fetched, stale) {
            (Ok(entry), _) => Ok(entry.record.clone()),
            (Err(_), Some(entry)) => {
                self.counters.stale.fetch_add(1, Ordering::Relaxed);
                let record = label_stale(entry.record.clone());
                // Keep it for the next caller while the source is down.
                self.cache.store.insert(key, entry).await;
                Ok(record)
            }
            (Err(e), None) => Err(BoxError::from(SharedError(e))),
        }
    }
}

/// Stamps every resource with the fetch time and weighs the answer.
fn stamp(mut record: SourceRecord, keep_for: Duration) -> Entry {
    let fetched = crate::fhir::now_rfc3339();
    for resource in &mut record.resources {
        add_to_meta(
            resource,
            "extension",
            json!({"url": FETCHED_AT_URL, "valueInstant": fetched}),
        );
    }
    let heap: usize = record.resources.iter().map(heap_size).sum();
    let bytes = u32::try_from(heap).unwrap_or(u32::MAX);
    Entry {
        record,
        fetched_at: Instant::now(),
        bytes,
        keep_for,
    }
}

/// An estimate of the heap a parsed JSON value holds, itself included: what the cache's
/// byte bound weighs. Serialised size undercounts it several times over (every value is a
/// 32-byte enum, every object entry a B-tree slot and a key string).
fn heap_size(value: &Value) -> usize {
    const VALUE: usize = std::mem::size_of::<Value>();
    /// Per object entry: B-tree node share, the key's `String` header.
    const ENTRY: usize = 48;
    VALUE
        + match value {
            Value::String(s) => s.capacity(),
            Value::Array(items) => items.iter().map(heap_size).sum(),
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| ENTRY + k.capacity() + heap_size(v))
                .sum(),
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        }
}

fn label_stale(mut record: SourceRecord) -> SourceRecord {
    for resource in &mut record.resources {
        add_to_meta(
            resource,
            "tag",
            json!({"system": CACHE_TAG_SYSTEM, "code": STALE_TAG_CODE, "display": "served from cache: the source did not answer"}),
        );
    }
    record
}

/// Appends `item` to the array `meta.<field>` of a resource, making room as needed.
fn add_to_meta(resource: &mut Value, field: &str, item: Value) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let meta = obj.entry("meta").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let list = meta.entry(field).or_insert_with(|| json!([]));
    if !list.is_array() {
        *list = json!([]);
    }
    if let Some(list) = list.as_array_mut() {
        list.push(item);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::{Mutex, atomic::AtomicUsize};

    use connectors::{ConnectorError, NhsNumber};

    use super::*;

    type Upstream = Arc<Mutex<Result<(), ConnectorError>>>;

    /// An upstream that takes 50 ms and answers (or fails, as `state` says), counting calls.
    fn upstream(
        state: Upstream,
    ) -> (
        impl Service<
            SourceCall,
            Response = SourceRecord,
            Error = BoxError,
            Future = crate::fanout::CallFuture,
        > + Clone
        + Send
        + 'static,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let svc = tower::service_fn(move |_call: SourceCall| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let state = state.lock().unwrap().clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                state.map_err(BoxError::from)?;
                Ok(SourceRecord {
                    resources: vec![json!({"resourceType": "Condition", "id": n, "meta": {"lastUpdated": "2020-01-01T00:00:00Z"}})],
                })
            }
            .boxed()
        });
        (svc, calls)
    }

    fn settings(stale_if_error: u64) -> CacheSettings {
        CacheSettings {
            stale_if_error: Duration::from_secs(stale_if_error),
            ttl: TtlSettings {
                default: Some(Duration::from_secs(30)),
                trust: Some(Duration::ZERO),
                ..TtlSettings::default()
            },
            ..CacheSettings::default()
        }
    }

    fn call(nhs: &str) -> SourceCall {
        SourceCall {
            query: SourceQuery::everything(NhsNumber::parse(nhs).unwrap()),
            deadline: Instant::now() + Duration::from_secs(2),
        }
    }

    const A: &str = "9434765919";
    const B: &str = "9990000018";

    #[tokio::test(start_paused = true)]
    async fn a_hit_is_served_without_calling_and_shows_when_it_was_fetched() {
        let state = Upstream::new(Mutex::new(Ok(())));
        let (svc, calls) = upstream(state);
        let (svc, probe) = CacheService::new(
            svc,
            &AnswerCache::new(settings(0)),
            "gp",
            SourceKind::GpPractice,
        );
        let first = svc.clone().oneshot(call(A)).await.unwrap();
        let start = Instant::now();
        let second = svc.clone().oneshot(call(A)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO, "a hit does not wait");
        assert_eq!(first, second);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let meta = &second.resources[0]["meta"];
        assert_eq!(
            meta["lastUpdated"], "2020-01-01T00:00:00Z",
            "kept as the source sent it"
        );
        assert_eq!(meta["extension"][0]["url"], FETCHED_AT_URL);
        assert!(
            meta["extension"][0]["valueInstant"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        svc.clone().oneshot(call(B)).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "another patient is another key"
        );
        assert_eq!(
            probe.counters(),
            CacheCounters {
                hits: 1,
                misses: 2,
                stale: 0
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_are_coalesced_into_one_call() {
        let (svc, calls) = upstream(Upstream::new(Mutex::new(Ok(()))));
        let (svc, _) = CacheService::new(
            svc,
            &AnswerCache::new(settings(0)),
            "gp",
            SourceKind::GpPractice,
        );
        let answers =
            futures::future::join_all((0..10).map(|_| svc.clone().oneshot(call(A)))).await;
        assert!(answers.iter().all(Result::is_ok));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_are_never_cached() {
        let state = Upstream::new(Mutex::new(Err(ConnectorError::Status { status: 503 })));
        let (svc, calls) = upstream(state.clone());
        let (svc, _) = CacheService::new(
            svc,
            &AnswerCache::new(settings(0)),
            "gp",
            SourceKind::GpPractice,
        );
        let err = svc.clone().oneshot(call(A)).await.unwrap_err();
        assert!(err.is::<SharedError>());
        *state.lock().unwrap() = Ok(());
        svc.clone().oneshot(call(A)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the error was not kept");
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_kinds_ttl_and_zero_ttl_kinds_are_not_cached() {
        let (svc, calls) = upstream(Upstream::new(Mutex::new(Ok(()))));
        let cache = AnswerCache::new(settings(0));
        let (gp, _) = CacheService::new(svc.clone(), &cache, "gp", SourceKind::GpPractice);
        gp.clone().oneshot(call(A)).await.unwrap();
        tokio::time::advance(Duration::from_secs(29)).await;
        gp.clone().oneshot(call(A)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "still fresh at 29 s");
        tokio::time::advance(Duration::from_secs(2)).await;
        gp.clone().oneshot(call(A)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "expired at 31 s");

        let (trust, _) = CacheService::new(svc, &cache, "trust", SourceKind::Trust);
        trust.clone().oneshot(call(A)).await.unwrap();
        trust.clone().oneshot(call(A)).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "trusts have ttl 0: never cached"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_if_error_serves_an_expired_answer_labelled_stale_within_its_window() {
        let state = Upstream::new(Mutex::new(Ok(())));
        let (svc, _) = upstream(state.clone());
        let (svc, probe) = CacheService::new(
            svc,
            &AnswerCache::new(settings(60)),
            "gp",
            SourceKind::GpPractice,
        );
        svc.clone().oneshot(call(A)).await.unwrap();
        *state.lock().unwrap() = Err(ConnectorError::Status { status: 503 });
        tokio::time::advance(Duration::from_secs(40)).await;
        for _ in 0..2 {
            let stale = svc.clone().oneshot(call(A)).await.unwrap();
            let tag = &stale.resources[0]["meta"]["tag"][0];
            assert_eq!(tag["system"], CACHE_TAG_SYSTEM);
            assert_eq!(tag["code"], STALE_TAG_CODE);
            assert_eq!(
                stale.resources[0]["meta"]["extension"][0]["url"],
                FETCHED_AT_URL
            );
        }
        assert_eq!(
            probe.counters().stale,
            2,
            "stays available while the source is down"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(
            svc.clone().oneshot(call(A)).await.is_err(),
            "past ttl + stale_if_error"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_weighed_in_bytes_and_the_bound_evicts() {
        let cache = AnswerCache::new(CacheSettings {
            max_bytes: 2048,
            ..settings(0)
        });
        let (svc, calls) = upstream(Upstream::new(Mutex::new(Ok(()))));
        let (svc, _) = CacheService::new(svc, &cache, "gp", SourceKind::GpPractice);
        let entry = stamp(
            SourceRecord {
                resources: vec![json!({"a": "x".repeat(100)})],
            },
            Duration::from_secs(1),
        );
        let serialised = serde_json::to_vec(&entry.record.resources).unwrap().len() as u32;
        assert!(
            entry.bytes > serialised && entry.bytes < 4 * serialised,
            "weighs the parsed heap: {} for {serialised} serialised bytes",
            entry.bytes
        );
        // 40 patients of ~200 bytes each cannot all fit in 2 KiB.
        let mut n = 0u64;
        for i in 0..4000u64 {
            if n == 40 {
                break;
            }
            let nhs = format!("943476{:04}", i);
            if let Ok(nhs) = NhsNumber::parse(&nhs) {
                n += 1;
                let c = SourceCall {
                    query: SourceQuery::everything(nhs),
                    deadline: Instant::now() + Duration::from_secs(2),
                };
                svc.clone().oneshot(c).await.unwrap();
            }
        }
        cache.store.run_pending_tasks().await;
        assert!(cache.weighted_size() <= 2048, "{}", cache.weighted_size());
        let held = cache.store.iter().count() as u64;
        assert!(
            n >= 20 && held > 0 && held < n,
            "evicted to stay under the bound: {held} of {n}"
        );
        assert_eq!(calls.load(Ordering::SeqCst) as u64, n);
    }
}

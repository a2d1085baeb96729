//! HTTP routes: thin handlers that validate input, check the caller, and call the stores.
//!
//! Every path from a client goes through `protocol::normalize_path` before it reaches a store,
//! so no request can name anything outside its namespace. Block bytes are re-hashed before they
//! are stored; a block is recorded in the metadata only after the blob store made it durable.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};

use super::auth::{self, Caller};
use super::blobs::{BlobError, BlobStore};
use super::error::{ApiError, ApiResult};
use super::store::MetaStore;
use super::App;
use crate::protocol::{
    self as p, routes as r, CommitRequest, CommitResponse, DeleteRequest, DeleteResponse,
    HistoryQuery, HistoryResponse, InfoResponse, JournalQuery, JournalResponse, ListQuery,
    ListResponse, LoginRequest, LoginResponse, LongpollQuery, LongpollResponse, MissingRequest,
    MissingResponse, MkdirRequest, MoveRequest, PathQuery, PutBlockResponse, RestoreRequest,
};

/// Request bodies larger than this are refused before they are read (a commit of a 50 GB file
/// lists ~50,000 block ids, about 3.3 MB of JSON).
const MAX_BODY_BYTES: usize = 64 << 20;
const DEFAULT_JOURNAL_PAGE: u32 = 1000;
/// Past this many long polls held at once, new ones are answered at once with a backoff.
const MAX_HELD_POLLS: usize = 100_000;
/// The backoff, in seconds, a busy server asks for.
const BUSY_BACKOFF_SECS: u64 = 15;
const MAX_JOURNAL_PAGE: u32 = 10_000;

type AppState<M, B> = State<Arc<App<M, B>>>;

pub fn router<M: MetaStore, B: BlobStore>(app: Arc<App<M, B>>) -> Router {
    let api = Router::new()
        .route(r::INFO, get(info::<M, B>))
        .route(r::LOGIN, post(login::<M, B>))
        .route(r::BLOCKS_MISSING, post(blocks_missing::<M, B>))
        .route(r::BLOCK, get(get_block::<M, B>).put(put_block::<M, B>))
        .route(r::BLOCKS_BATCH, post(put_blocks::<M, B>))
        .route(r::BLOCKS_FETCH, post(fetch_blocks::<M, B>))
        .route(r::FILES_COMMIT_BATCH, post(commit_batch::<M, B>))
        .route(r::FILES_COMMIT, post(commit::<M, B>))
        .route(r::FILES_MKDIR, post(mkdir::<M, B>))
        .route(r::FILES_DELETE, post(delete::<M, B>))
        .route(r::FILES_MOVE, post(move_path::<M, B>))
        .route(r::FILES_LIST, get(list::<M, B>))
        .route(r::FILES_META, get(meta::<M, B>))
        .route(r::JOURNAL, get(journal::<M, B>))
        .route(r::LONGPOLL, get(longpoll::<M, B>))
        .route(r::FILES_HISTORY, get(history::<M, B>))
        .route(r::FILES_CONTENT, get(content::<M, B>))
        .route(r::FILES_RESTORE, post(restore::<M, B>));
    Router::new()
        .nest(p::API_PREFIX, api)
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

fn check_hash(hash: &str) -> ApiResult<()> {
    if p::is_block_hash(hash) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{hash:?} is not a block id (64 lowercase hex digits)"
        )))
    }
}

async fn info<M: MetaStore, B: BlobStore>(State(app): AppState<M, B>) -> Json<InfoResponse> {
    Json(InfoResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        chunk: app.chunk,
        epoch: app.epoch.clone(),
    })
}

async fn login<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    Json(req): Json<LoginRequest>,
) -> ApiResult<Json<LoginResponse>> {
    let found = app.store.user_by_name(&req.user).await?;
    let refused = || ApiError::Unauthorized("unknown user or wrong password".into());
    let Some((user, phc)) = found else {
        return Err(refused());
    };
    let password = req.password.clone();
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&password, &phc))
        .await
        .unwrap_or(false);
    if !ok {
        return Err(refused());
    }
    if user.disabled {
        return Err(ApiError::Unauthorized(format!(
            "user {} is disabled; ask the server's admin",
            user.name
        )));
    }
    let token = auth::random_secret("dbx_");
    app.store
        .create_token(user.id, &auth::token_hash(&token), req.device.as_deref())
        .await?;
    tracing::info!(user = %user.name, device = ?req.device, "login");
    Ok(Json(LoginResponse {
        token,
        user: user.name,
        root_ns: user.root_ns,
    }))
}

async fn blocks_missing<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Json(req): Json<MissingRequest>,
) -> ApiResult<Json<MissingResponse>> {
    if req.hashes.len() > p::MAX_MISSING_BATCH {
        return Err(ApiError::TooLarge(format!(
            "at most {} hashes per request",
            p::MAX_MISSING_BATCH
        )));
    }
    for h in &req.hashes {
        check_hash(h)?;
    }
    // Only blocks the caller could already read count as present, so nobody can probe for
    // another user's data; a block held only by others is uploaded again (proof of possession).
    let present = app.store.readable_blocks(&caller.user, &req.hashes).await?;
    let mut seen = HashSet::new();
    let missing = req
        .hashes
        .into_iter()
        .filter(|h| !present.contains_key(h) && seen.insert(h.clone()))
        .collect();
    Ok(Json(MissingResponse { missing }))
}

async fn put_block<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Path(hash): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    check_hash(&hash)?;
    if body.len() > p::MAX_BLOCK_SIZE {
        return Err(ApiError::TooLarge(format!(
            "a block is at most {} bytes",
            p::MAX_BLOCK_SIZE
        )));
    }
    let to_hash = body.clone();
    let actual = tokio::task::spawn_blocking(move || p::block_hash(&to_hash))
        .await
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if actual != hash {
        return Err(ApiError::HashMismatch {
            expected: hash,
            actual,
        });
    }
    let size = body.len() as u64;
    let user = caller.user.id;
    let (app2, hash2) = (app.clone(), hash.clone());
    // In a task of its own: a client that disconnects mid-request must not leave bytes on disk
    // without their row.
    let stored = tokio::spawn(async move {
        let held = app2
            .store
            .existing_blocks(std::slice::from_ref(&hash2))
            .await?;
        let stored = !held.contains(&hash2);
        if stored {
            // Durable first, recorded second: a block row always has its bytes behind it.
            app2.blobs.put(&hash2, body).await?;
        }
        app2.store.record_blocks(&[(hash2, size)], user).await?;
        Ok::<_, ApiError>(stored)
    })
    .await
    .map_err(|e| ApiError::BadRequest(e.to_string()))??;
    let status = if stored {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(PutBlockResponse { hash, stored })))
}

async fn get_block<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Path(hash): Path<String>,
    Query(q): Query<p::GetBlockQuery>,
) -> ApiResult<impl IntoResponse> {
    check_hash(&hash)?;
    let not_found = || ApiError::NotFound(format!("block {hash} not found"));
    let readable = app
        .store
        .readable_blocks(&caller.user, std::slice::from_ref(&hash))
        .await?;
    if readable.is_empty() {
        return Err(not_found());
    }
    // Clients verify what they receive; `verify` (asked after a mismatch) checks at the source,
    // quarantining a block damaged at rest and saying so.
    let bytes = if q.verify {
        app.blobs.get(&hash).await?
    } else {
        app.blobs
            .read_many(vec![hash.clone()])
            .await?
            .pop()
            .flatten()
    };
    let bytes = bytes.ok_or_else(|| {
        tracing::error!(block = %hash, "block recorded in metadata but absent from the block store");
        not_found()
    })?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
}

async fn commit<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Json(mut req): Json<CommitRequest>,
) -> ApiResult<Json<CommitResponse>> {
    req.path = p::normalize_path(&req.path)?;
    for h in &req.blocks {
        check_hash(h)?;
    }
    let ns = caller.user.root_ns;
    let (rev, cursor) = app.store.commit_file(ns, &caller.actor(), &req).await?;
    // The journal row is committed: only now may long polls wake.
    app.hub.publish(ns, cursor);
    Ok(Json(CommitResponse { rev, cursor }))
}

async fn mkdir<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Json(req): Json<MkdirRequest>,
) -> ApiResult<Json<CommitResponse>> {
    let path = p::normalize_path(&req.path)?;
    let ns = caller.user.root_ns;
    let (rev, cursor) = app.store.mkdir(ns, &caller.actor(), &path).await?;
    app.hub.publish(ns, cursor);
    Ok(Json(CommitResponse { rev, cursor }))
}

async fn delete<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Json(req): Json<DeleteRequest>,
) -> ApiResult<Json<DeleteResponse>> {
    let path = p::normalize_path(&req.path)?;
    let ns = caller.user.root_ns;
    let (cursor, deleted) = app
        .store
        .delete(ns, &caller.actor(), &path, req.parent_rev)
        .await?;
    app.hub.publish(ns, cursor);
    Ok(Json(DeleteResponse { cursor, deleted }))
}

async fn move_path<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Json(req): Json<MoveRequest>,
) -> ApiResult<Json<CommitResponse>> {
    let from = p::normalize_path(&req.from)?;
    let to = p::normalize_path(&req.to)?;
    let (rev, cursor) = app
        .store
        .move_path(
            caller.user.root_ns,
            &caller.actor(),
            &from,
            &to,
            req.parent_rev,
        )
        .await?;
    Ok(Json(CommitResponse { rev, cursor }))
}

async fn list<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<ListResponse>> {
    let path = p::normalize_path(&q.path)?;
    let (entries, cursor) = app
        .store
        .list(caller.user.root_ns, &path, q.recursive)
        .await?;
    Ok(Json(ListResponse { entries, cursor }))
}

async fn meta<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Query(q): Query<PathQuery>,
) -> ApiResult<Json<p::Entry>> {
    let path = p::normalize_path(&q.path)?;
    app.store
        .meta(caller.user.root_ns, &path)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("/{path} does not exist on the server")))
}

async fn journal<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Query(q): Query<JournalQuery>,
) -> ApiResult<Json<JournalResponse>> {
    let limit = q
        .limit
        .unwrap_or(DEFAULT_JOURNAL_PAGE)
        .clamp(1, MAX_JOURNAL_PAGE);
    let (entries, cursor, has_more) = app
        .store
        .journal(caller.user.root_ns, q.cursor, limit)
        .await?;
    Ok(Json(JournalResponse {
        entries,
        cursor,
        has_more,
    }))
}

/// Counts a held long poll for as long as it lives.
struct Held<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn longpoll<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Query(q): Query<LongpollQuery>,
) -> ApiResult<Json<LongpollResponse>> {
    let held = app.polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _held = Held(&app.polls);
    if held >= MAX_HELD_POLLS {
        return Ok(Json(LongpollResponse {
            changes: false,
            backoff: Some(BUSY_BACKOFF_SECS),
        }));
    }
    let timeout = q
        .timeout
        .unwrap_or(p::DEFAULT_LONGPOLL_SECS)
        .min(p::MAX_LONGPOLL_SECS);
    let ns = caller.user.root_ns;
    // Subscribe first, compare second: a commit between the two still wakes this poll.
    let mut rx = app.hub.subscribe(ns);
    let head = app.store.head(ns).await?;
    // A cursor ahead of the head means the server was replaced: the client must look too.
    if head != q.cursor {
        return Ok(Json(LongpollResponse {
            changes: true,
            backoff: None,
        }));
    }
    let deadline = tokio::time::sleep(std::time::Duration::from_secs(timeout));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                if *rx.borrow_and_update() > q.cursor {
                    return Ok(Json(LongpollResponse { changes: true, backoff: None }));
                }
            }
            _ = &mut deadline => break,
        }
    }
    Ok(Json(LongpollResponse {
        changes: false,
        backoff: None,
    }))
}

async fn history<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<Json<HistoryResponse>> {
    let path = p::normalize_path(&q.path)?;
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_JOURNAL_PAGE);
    let entries = app.store.history(caller.user.root_ns, &path, limit).await?;
    if entries.is_empty() {
        return Err(ApiError::NotFound(format!(
            "/{path} has no history on the server"
        )));
    }
    Ok(Json(HistoryResponse { entries }))
}

async fn restore<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Json(req): Json<RestoreRequest>,
) -> ApiResult<Json<CommitResponse>> {
    let path = p::normalize_path(&req.path)?;
    let ns = caller.user.root_ns;
    let (rev, cursor) = app
        .store
        .restore(ns, &caller.actor(), &path, req.rev)
        .await?;
    app.hub.publish(ns, cursor);
    Ok(Json(CommitResponse { rev, cursor }))
}

/// Many small blocks in one request: verified, stored with one durability pass, recorded in
/// one transaction. Either every block is accepted or none is.
async fn put_blocks<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    body: axum::body::Body,
) -> ApiResult<Json<p::PutBlocksResponse>> {
    let limit = p::MAX_BATCH_BYTES + 68 * p::MAX_BATCH_BLOCKS;
    let too_large = || {
        ApiError::TooLarge(format!(
            "a batch carries at most {} bytes of blocks",
            p::MAX_BATCH_BYTES
        ))
    };
    // Decoded as it arrives, each block into a buffer of its exact size: the request is never
    // held whole and copied again.
    let mut decoder = p::BlockDecoder::default();
    let mut received = 0usize;
    let mut pieces = body.into_data_stream();
    while let Some(piece) = pieces.next().await {
        let piece = piece.map_err(|e| ApiError::BadRequest(format!("reading the request: {e}")))?;
        received += piece.len();
        if received > limit {
            return Err(too_large());
        }
        decoder.feed(&piece).map_err(ApiError::BadRequest)?;
    }
    let blocks = decoder.finish().map_err(ApiError::BadRequest)?;
    if blocks.len() > p::MAX_BATCH_BLOCKS {
        return Err(ApiError::TooLarge(format!(
            "a batch carries at most {} blocks",
            p::MAX_BATCH_BLOCKS
        )));
    }
    let checked = tokio::task::spawn_blocking(move || {
        let bytes: Vec<&[u8]> = blocks.iter().map(|(_, b)| &b[..]).collect();
        let actual = p::block_hashes(&bytes);
        for ((hash, _), actual) in blocks.iter().zip(actual) {
            if actual != *hash {
                return Err(ApiError::HashMismatch {
                    expected: hash.clone(),
                    actual,
                });
            }
        }
        Ok(blocks)
    })
    .await
    .map_err(|e| ApiError::BadRequest(e.to_string()))??;
    let hashes: Vec<String> = checked.iter().map(|(h, _)| h.clone()).collect();
    let held = app.store.existing_blocks(&hashes).await?;
    let mut seen = HashSet::new();
    let new: Vec<(String, Bytes)> = checked
        .iter()
        .filter(|(h, _)| !held.contains(h) && seen.insert(h.clone()))
        .cloned()
        .collect();
    let stored = new.len() as u64;
    let sizes: Vec<(String, u64)> = checked
        .iter()
        .map(|(h, b)| (h.clone(), b.len() as u64))
        .collect();
    let user = caller.user.id;
    // In a task of its own, so a disconnecting client cannot leave bytes without rows.
    tokio::spawn(async move {
        // Durable first, recorded second: a block row always has its bytes behind it.
        app.blobs.put_many(new).await?;
        app.store.record_blocks(&sizes, user).await?;
        Ok::<_, ApiError>(())
    })
    .await
    .map_err(|e| ApiError::BadRequest(e.to_string()))??;
    Ok(Json(p::PutBlocksResponse {
        stored,
        already_held: hashes.len() as u64 - stored,
    }))
}

/// What `blocks/fetch` reads from the block store at once (a bigger block is read alone).
const FETCH_READ_BYTES: u64 = 2 << 20;

/// Many blocks in one response, in the order asked.
async fn fetch_blocks<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Json(req): Json<p::FetchRequest>,
) -> ApiResult<impl IntoResponse> {
    if req.hashes.len() > p::MAX_BATCH_BLOCKS {
        return Err(ApiError::TooLarge(format!(
            "at most {} blocks per request",
            p::MAX_BATCH_BLOCKS
        )));
    }
    for h in &req.hashes {
        check_hash(h)?;
    }
    // What the caller may read, with the sizes: the size limit is checked from the metadata,
    // before any byte is read.
    let sizes = app.store.readable_blocks(&caller.user, &req.hashes).await?;
    if let Some(h) = req.hashes.iter().find(|h| !sizes.contains_key(*h)) {
        return Err(ApiError::NotFound(format!("block {h} not found")));
    }
    let total: u64 = req.hashes.iter().filter_map(|h| sizes.get(h)).sum();
    if total > (p::MAX_BATCH_BYTES + p::MAX_BLOCK_SIZE) as u64 {
        return Err(ApiError::TooLarge(format!(
            "ask for at most {} bytes of blocks at once",
            p::MAX_BATCH_BYTES
        )));
    }
    // Streamed a few blocks at a time (at most [`FETCH_READ_BYTES`], or one bigger block, in
    // memory per request; never copied into one body), in `protocol::block_header`'s framing:
    // small blocks are read many per store call (one index lookup for a run of packed blocks).
    // Not verified here: the client verifies every block, and asks for a damaged one again with
    // `GET blocks/{hash}?verify=true`. A block that vanished from the blob store since the
    // metadata said it is there cuts the response short: the client sees a truncated batch and
    // retries.
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut group_bytes = 0;
    for h in req.hashes {
        let size = sizes.get(&h).copied().unwrap_or(0);
        match groups.last_mut() {
            Some(g) if group_bytes + size <= FETCH_READ_BYTES => {
                g.push(h);
                group_bytes += size;
            }
            _ => {
                groups.push(vec![h]);
                group_bytes = size;
            }
        }
    }
    let body = futures::stream::iter(groups).then(move |group| {
        let app = app.clone();
        async move {
            let read = app.blobs.read_many(group.clone()).await?;
            let blocks = group
                .iter()
                .zip(read)
                .map(|(h, bytes)| {
                    let bytes = bytes
                        .ok_or_else(|| std::io::Error::other(format!("block {h} is missing")))?;
                    Ok::<_, BlobError>((h, bytes))
                })
                .collect::<Result<Vec<_>, BlobError>>()?;
            let parts = p::frame_blocks(blocks).into_iter().map(Ok::<_, BlobError>);
            Ok::<_, BlobError>(futures::stream::iter(parts))
        }
    });
    let body = body.try_flatten();
    axum::response::Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(axum::body::Body::from_stream(body))
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// Many commits in one request and one durable transaction; each succeeds or fails alone.
async fn commit_batch<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Json(req): Json<p::CommitBatchRequest>,
) -> ApiResult<Json<p::CommitBatchResponse>> {
    if req.commits.len() > p::MAX_COMMIT_BATCH {
        return Err(ApiError::TooLarge(format!(
            "at most {} commits per request",
            p::MAX_COMMIT_BATCH
        )));
    }
    let mut commits = req.commits;
    for c in &mut commits {
        c.path = p::normalize_path(&c.path)?;
        for h in &c.blocks {
            check_hash(h)?;
        }
    }
    let ns = caller.user.root_ns;
    let outcomes = app
        .store
        .commit_files(ns, &caller.actor(), &commits)
        .await?;
    let mut head = None;
    let results = outcomes
        .into_iter()
        .map(|o| match o {
            Ok(c) => {
                head = head.max(Some(c.cursor));
                p::CommitResult {
                    rev: Some(c.rev),
                    cursor: Some(c.cursor),
                    error: None,
                    written: c.written,
                    dirs: c.dirs,
                }
            }
            Err(e) => p::CommitResult {
                rev: None,
                cursor: None,
                error: Some(ApiError::from(e).info()),
                written: false,
                dirs: Vec::new(),
            },
        })
        .collect();
    if let Some(head) = head {
        // The transaction is committed: only now may long polls wake.
        app.hub.publish(ns, head);
    }
    Ok(Json(p::CommitBatchResponse { results }))
}

/// A `Range: bytes=…` header resolved against a size: `Ok(None)` for the whole file (no header,
/// or one this server does not serve, such as several ranges), `Err(())` when unsatisfiable.
fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(s), Ok(e)) if s <= e => (s, e.min(size.saturating_sub(1))),
        (Ok(s), Err(_)) if b.is_empty() => (s, size.saturating_sub(1)),
        (Err(_), Ok(n)) if a.is_empty() && n > 0 => {
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        _ => return Ok(None),
    };
    if start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// A whole file, or one byte range of it, streamed block by block (never whole in memory).
async fn content<M: MetaStore, B: BlobStore>(
    State(app): AppState<M, B>,
    caller: Caller,
    Query(q): Query<PathQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult<axum::response::Response> {
    let path = p::normalize_path(&q.path)?;
    let entry = app
        .store
        .meta(caller.user.root_ns, &path)
        .await?
        .filter(|e| e.kind == p::EntryKind::File)
        .ok_or_else(|| ApiError::NotFound(format!("/{path} is not a file on the server")))?;
    let size = entry.size;
    let etag = format!("\"{}\"", entry.content_hash.clone().unwrap_or_default());
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (start, end, status) = match parse_range(range, size) {
        Ok(Some((s, e))) => (s, e, StatusCode::PARTIAL_CONTENT),
        Ok(None) => (0, size.saturating_sub(1), StatusCode::OK),
        Err(()) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response())
        }
    };
    let sizes = app.store.block_sizes(&entry.blocks).await?;
    // The blocks overlapping [start, end], with the part of each to send.
    let mut parts = Vec::new();
    let mut offset = 0u64;
    for h in &entry.blocks {
        let len = *sizes
            .get(h)
            .ok_or_else(|| ApiError::NotFound(format!("block {h} not found")))?;
        let (b_start, b_end) = (offset, offset + len);
        if size > 0 && b_end > start && b_start <= end {
            let from = start.saturating_sub(b_start) as usize;
            let to = ((end + 1).min(b_end) - b_start) as usize;
            parts.push((h.clone(), from, to));
        }
        offset = b_end;
    }
    let length = if size == 0 { 0 } else { end - start + 1 };
    let app2 = app.clone();
    let body = futures::stream::iter(parts).then(move |(h, from, to)| {
        let app = app2.clone();
        async move {
            match app.blobs.get(&h).await {
                Ok(Some(b)) => Ok(b.slice(from..to)),
                Ok(None) => Err(std::io::Error::other(format!("block {h} is missing"))),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            }
        }
    });
    let mut resp = axum::response::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, length)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, etag);
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
    }
    resp.body(axum::body::Body::from_stream(body))
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-0"), 10), Ok(Some((0, 0))));
        assert_eq!(parse_range(Some("bytes=2-5"), 10), Ok(Some((2, 5))));
        assert_eq!(parse_range(Some("bytes=8-"), 10), Ok(Some((8, 9))));
        assert_eq!(parse_range(Some("bytes=5-100"), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=1-2"), 10), Ok(None));
    }
}

//! The HTTP client for the dbx API. Every failure is classified ([`RemoteError`]) so the CLI can
//! map it to the documented exit codes: not logged in / bad token → 3, not found → 4, server
//! unreachable or temporarily unavailable → 5. The token never appears in `Debug` output.

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::{
    self as p, routes as r, CommitRequest, CommitResponse, DeleteRequest, DeleteResponse,
    ErrorBody, InfoResponse, JournalResponse, ListResponse, LoginRequest, LoginResponse,
    MissingRequest, MissingResponse, MkdirRequest, MoveRequest, PutBlockResponse,
};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot reach the server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the server is temporarily unavailable ({status}): {message}")]
    Unavailable { status: u16, message: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    Conflict {
        message: String,
        current_rev: Option<i64>,
    },
    #[error("the server refused the request ({code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        missing: Option<Vec<String>>,
    },
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
}

pub type RemoteResult<T> = Result<T, RemoteError>;

/// Further attempts after a transient failure (network error or 5xx) of a request that is
/// safe to repeat; the wait doubles from [`RETRY_FIRST_WAIT`], with jitter.
const RETRIES: u32 = 4;
const RETRY_FIRST_WAIT: Duration = Duration::from_millis(150);

impl RemoteError {
    /// Worth another attempt: the network or the server may recover.
    pub fn is_transient(&self) -> bool {
        match self {
            RemoteError::Unreachable { .. } | RemoteError::Unavailable { .. } => true,
            // 507: the server's disk is full; retrying will not free it. A block the server
            // found corrupt is quarantined: asking again will not bring it back.
            RemoteError::Refused { status, code, .. } => {
                *status >= 500 && *status != 507 && code != "block_corrupt"
            }
            _ => false,
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or has been retried `retries` times.
async fn retrying<T, F, Fut>(retries: u32, what: &str, mut attempt: F) -> RemoteResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = RemoteResult<T>>,
{
    let mut wait = RETRY_FIRST_WAIT;
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(e) if e.is_transient() && tries < retries => {
                tries += 1;
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let jitter = wait.mul_f64(f64::from(nanos % 500) / 1000.0);
                tracing::warn!(
                    "{what} failed ({e}); retry {tries}/{retries} in {:?}",
                    wait + jitter
                );
                tokio::time::sleep(wait + jitter).await;
                wait *= 2;
            }
            r => return r,
        }
    }
}

#[derive(Clone)]
pub struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// Further attempts after a transient failure (see [`retrying`]).
    retries: u32,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Remote {
    /// A client for the server at `url` (scheme, host, port; any path is ignored).
    pub fn new(url: &str, token: Option<String>) -> RemoteResult<Remote> {
        let parsed = reqwest::Url::parse(url).map_err(|e| RemoteError::Unreachable {
            url: url.to_string(),
            reason: format!("not a valid URL ({e})"),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(RemoteError::Unreachable {
                url: url.to_string(),
                reason: "the URL must start with http:// or https://".into(),
            });
        }
        let base = parsed.origin().ascii_serialization();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("dbx/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RemoteError::Protocol(e.to_string()))?;
        Ok(Remote {
            base,
            token,
            http,
            retries: RETRIES,
        })
    }

    /// The same server, each request tried once: for work that is only a head start on what
    /// a later request does anyway (with retries), so a failing server is not waited for twice.
    pub fn single_attempt(&self) -> Remote {
        Remote {
            retries: 0,
            ..self.clone()
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn url(&self, route: &str) -> String {
        format!("{}{}{}", self.base, p::API_PREFIX, route)
    }

    fn request(&self, method: Method, route: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, self.url(route));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    fn transport(&self, e: reqwest::Error) -> RemoteError {
        if e.is_connect() || e.is_timeout() || e.is_request() {
            RemoteError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            }
        } else {
            RemoteError::Protocol(root_cause(&e))
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> RemoteResult<reqwest::Response> {
        let resp = rb.send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let (code, message, missing, current_rev) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => (
                b.error.code,
                b.error.message,
                b.error.missing,
                b.error.current_rev,
            ),
            Err(_) => (
                status.as_str().to_string(),
                text.chars().take(200).collect(),
                None,
                None,
            ),
        };
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => RemoteError::Unauthorized(message),
            StatusCode::NOT_FOUND => RemoteError::NotFound(message),
            StatusCode::CONFLICT if code == "conflict" => RemoteError::Conflict {
                message,
                current_rev,
            },
            StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => RemoteError::Unavailable {
                status: status.as_u16(),
                message,
            },
            _ => RemoteError::Refused {
                status: status.as_u16(),
                code,
                message,
                missing,
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> RemoteResult<T> {
        let resp = self.send(rb).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes).map_err(|e| RemoteError::Protocol(e.to_string()))
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        route: &str,
        body: &B,
    ) -> RemoteResult<T> {
        self.json(self.request(Method::POST, route).json(body))
            .await
    }

    pub async fn info(&self) -> RemoteResult<InfoResponse> {
        retrying(self.retries, "server info", || {
            self.json(self.request(Method::GET, r::INFO))
        })
        .await
    }

    pub async fn login(&self, req: &LoginRequest) -> RemoteResult<LoginResponse> {
        self.post(r::LOGIN, req).await
    }

    pub async fn missing(&self, hashes: Vec<String>) -> RemoteResult<Vec<String>> {
        let req = MissingRequest { hashes };
        let resp: MissingResponse = retrying(self.retries, "block check", || {
            self.post(r::BLOCKS_MISSING, &req)
        })
        .await?;
        Ok(resp.missing)
    }

    pub async fn put_block(&self, hash: &str, bytes: Bytes) -> RemoteResult<PutBlockResponse> {
        retrying(self.retries, "block upload", || {
            self.json(
                self.request(Method::PUT, &r::block(hash))
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .body(bytes.clone()),
            )
        })
        .await
    }

    /// Uploads several blocks in one request, framed by [`p::frame_blocks`].
    pub async fn put_blocks(
        &self,
        blocks: Vec<(String, Bytes)>,
    ) -> RemoteResult<p::PutBlocksResponse> {
        self.put_framed(p::frame_blocks(blocks)).await
    }

    /// Blocks already framed (see [`p::block_header`]), as the pieces of the request's body.
    pub async fn put_framed(&self, parts: Vec<Bytes>) -> RemoteResult<p::PutBlocksResponse> {
        let length: u64 = parts.iter().map(|b| b.len() as u64).sum();
        retrying(self.retries, "block upload", || {
            let body =
                futures::stream::iter(parts.clone().into_iter().map(Ok::<_, std::io::Error>));
            self.json(
                self.request(Method::POST, r::BLOCKS_BATCH)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .header(reqwest::header::CONTENT_LENGTH, length)
                    .body(reqwest::Body::wrap_stream(body)),
            )
        })
        .await
    }

    /// Several blocks in one request, each verified against its id, in the order asked.
    pub async fn fetch_blocks(&self, hashes: &[String]) -> RemoteResult<Vec<Bytes>> {
        let decoded = self.fetch_decoded(hashes).await?;
        let blocks = tokio::task::spawn_blocking(move || -> Vec<(String, Bytes, bool)> {
            let bytes: Vec<&[u8]> = decoded.iter().map(|(_, b)| &b[..]).collect();
            let actual = p::block_hashes(&bytes);
            decoded
                .into_iter()
                .zip(actual)
                .map(|((hash, bytes), actual)| {
                    let ok = actual == hash;
                    (hash, bytes, ok)
                })
                .collect()
        })
        .await
        .map_err(|e| RemoteError::Protocol(e.to_string()))?;
        // A damaged block is asked for alone, verified at the source (see `get_block`).
        let mut checked = Vec::with_capacity(blocks.len());
        for (hash, bytes, ok) in blocks {
            checked.push(if ok {
                bytes
            } else {
                self.get_block_once(&hash, true).await?
            });
        }
        Ok(checked)
    }

    /// Blocks as the server sent them, in the order asked, their bytes not verified: for a
    /// caller that verifies them before it trusts them (see `sync::download_one`).
    pub async fn fetch_blocks_unverified(&self, hashes: &[String]) -> RemoteResult<Vec<Bytes>> {
        let decoded = self.fetch_decoded(hashes).await?;
        Ok(decoded.into_iter().map(|(_, bytes)| bytes).collect())
    }

    /// One `blocks/fetch` request, decoded: the blocks named as asked, in that order.
    async fn fetch_decoded(&self, hashes: &[String]) -> RemoteResult<Vec<(String, Bytes)>> {
        let req = p::FetchRequest {
            hashes: hashes.to_vec(),
        };
        let decoded = retrying(self.retries, "block download", || async {
            let resp = self
                .send(self.request(Method::POST, r::BLOCKS_FETCH).json(&req))
                .await?;
            let mut decoder = p::BlockDecoder::default();
            let mut body = resp.bytes_stream();
            while let Some(piece) = futures::StreamExt::next(&mut body).await {
                let piece = piece.map_err(|e| self.transport(e))?;
                decoder.feed(&piece).map_err(RemoteError::Protocol)?;
            }
            decoder.finish().map_err(RemoteError::Protocol)
        })
        .await?;
        if decoded.len() != hashes.len() || decoded.iter().zip(hashes).any(|((h, _), w)| h != w) {
            return Err(RemoteError::Protocol(format!(
                "asked for {} blocks, got {} others",
                hashes.len(),
                decoded.len()
            )));
        }
        Ok(decoded)
    }

    /// Commits several files in one request; each outcome separately.
    pub async fn commit_batch(
        &self,
        commits: Vec<CommitRequest>,
    ) -> RemoteResult<Vec<RemoteResult<p::Committed>>> {
        let req = p::CommitBatchRequest { commits };
        let resp: p::CommitBatchResponse = retrying(self.retries, "commit", || {
            self.post(r::FILES_COMMIT_BATCH, &req)
        })
        .await?;
        Ok(resp
            .results
            .into_iter()
            .map(|r| match (r.rev, r.cursor, r.error) {
                (Some(rev), Some(cursor), None) => Ok(p::Committed {
                    rev,
                    cursor,
                    written: r.written,
                    dirs: r.dirs,
                }),
                (_, _, Some(e)) if e.code == "conflict" => Err(RemoteError::Conflict {
                    message: e.message,
                    current_rev: e.current_rev,
                }),
                (_, _, Some(e)) => Err(RemoteError::Refused {
                    status: 400,
                    code: e.code,
                    message: e.message,
                    missing: e.missing,
                }),
                _ => Err(RemoteError::Protocol(
                    "a commit result has neither rev nor error".into(),
                )),
            })
            .collect())
    }

    /// A block's bytes, verified against its id: bytes that do not match are never returned.
    /// A block that arrives damaged is asked for once more with
    /// `verify=true`, which has the server check it at the source: a transfer glitch heals, a
    /// block damaged on the server's disk is quarantined there and reported.
    pub async fn get_block(&self, hash: &str) -> RemoteResult<Bytes> {
        match self.get_block_once(hash, false).await {
            Err(RemoteError::Protocol(_)) => self.get_block_once(hash, true).await,
            other => other,
        }
    }

    async fn get_block_once(&self, hash: &str, verify: bool) -> RemoteResult<Bytes> {
        let url = if verify {
            format!("{}?verify=true", r::block(hash))
        } else {
            r::block(hash)
        };
        let resp = self.send(self.request(Method::GET, &url)).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        let check = bytes.clone();
        let actual = tokio::task::spawn_blocking(move || p::block_hash(&check))
            .await
            .map_err(|e| RemoteError::Protocol(e.to_string()))?;
        if actual != hash {
            return Err(RemoteError::Protocol(format!(
                "block {hash} arrived corrupted (its bytes hash to {actual})"
            )));
        }
        Ok(bytes)
    }

    pub async fn mkdir(&self, path: &str) -> RemoteResult<CommitResponse> {
        self.post(
            r::FILES_MKDIR,
            &MkdirRequest {
                path: path.to_string(),
            },
        )
        .await
    }

    pub async fn delete(
        &self,
        path: &str,
        parent_rev: Option<i64>,
    ) -> RemoteResult<DeleteResponse> {
        self.post(
            r::FILES_DELETE,
            &DeleteRequest {
                path: path.to_string(),
                parent_rev,
            },
        )
        .await
    }

    pub async fn move_path(
        &self,
        from: &str,
        to: &str,
        parent_rev: Option<i64>,
    ) -> RemoteResult<CommitResponse> {
        self.post(
            r::FILES_MOVE,
            &MoveRequest {
                from: from.to_string(),
                to: to.to_string(),
                parent_rev,
            },
        )
        .await
    }

    /// Journal rows after `cursor`, one page.
    pub async fn journal(&self, cursor: i64, limit: u32) -> RemoteResult<JournalResponse> {
        self.json(
            self.request(Method::GET, r::JOURNAL)
                .query(&[("cursor", cursor.to_string()), ("limit", limit.to_string())]),
        )
        .await
    }

    /// Waits (up to `timeout` seconds) until the journal grows past `cursor`.
    pub async fn longpoll(&self, cursor: i64, timeout: u64) -> RemoteResult<p::LongpollResponse> {
        self.json(
            self.request(Method::GET, r::LONGPOLL)
                .timeout(Duration::from_secs(timeout + 30))
                .query(&[("cursor", cursor), ("timeout", timeout as i64)]),
        )
        .await
    }

    /// A file's bytes (or the inclusive byte range `range`, HTTP syntax: `A-B`, `A-`, `-N`),
    /// as a response to stream.
    pub async fn content(
        &self,
        path: &str,
        range: Option<&str>,
    ) -> RemoteResult<reqwest::Response> {
        let mut rb = self
            .request(Method::GET, r::FILES_CONTENT)
            .query(&[("path", path)]);
        if let Some(range) = range {
            rb = rb.header(reqwest::header::RANGE, format!("bytes={range}"));
        }
        let resp = rb.send().await.map_err(|e| self.transport(e))?;
        if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE {
            let size = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes */"))
                .unwrap_or("?")
                .to_string();
            return Err(RemoteError::Refused {
                status: 416,
                code: "range_not_satisfiable".into(),
                message: format!("the range starts past the end of the file ({size} bytes)"),
                missing: None,
            });
        }
        if resp.status().is_success() {
            return Ok(resp);
        }
        // Reuse the common error mapping.
        self.send(
            self.request(Method::GET, r::FILES_CONTENT)
                .query(&[("path", path)]),
        )
        .await
    }

    pub async fn history(&self, path: &str, limit: u32) -> RemoteResult<p::HistoryResponse> {
        self.json(
            self.request(Method::GET, r::FILES_HISTORY)
                .query(&[("path", path.to_string()), ("limit", limit.to_string())]),
        )
        .await
    }

    pub async fn restore(&self, path: &str, rev: i64) -> RemoteResult<CommitResponse> {
        self.post(
            r::FILES_RESTORE,
            &p::RestoreRequest {
                path: path.to_string(),
                rev,
            },
        )
        .await
    }

    pub async fn list(&self, path: &str, recursive: bool) -> RemoteResult<ListResponse> {
        let recursive = if recursive { "true" } else { "false" };
        self.json(
            self.request(Method::GET, r::FILES_LIST)
                .query(&[("path", path), ("recursive", recursive)]),
        )
        .await
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request with 503, counting them.
    async fn unavailable_server() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut seen = Vec::new();
                    // One request per connection: its head, then the answer, then close.
                    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let _ = conn
                        .write_all(
                            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\
                              connection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        (url, count)
    }

    /// A transient failure is retried RETRIES times by default, not at all by a
    /// single-attempt client; both end with the failure.
    #[tokio::test]
    async fn single_attempt_clients_do_not_retry() {
        let (url, count) = unavailable_server().await;
        let remote = Remote::new(&url, None).unwrap();
        let once = remote.single_attempt();
        let err = once.missing(vec!["a".repeat(64)]).await.unwrap_err();
        assert!(
            matches!(err, RemoteError::Unavailable { status: 503, .. }),
            "{err:?}"
        );
        assert_eq!(count.load(Ordering::SeqCst), 1);

        let err = remote.missing(vec!["a".repeat(64)]).await.unwrap_err();
        assert!(
            matches!(err, RemoteError::Unavailable { status: 503, .. }),
            "{err:?}"
        );
        assert_eq!(count.load(Ordering::SeqCst), 2 + RETRIES as usize);
    }
}

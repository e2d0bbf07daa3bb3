//! envd's `/files`: download (`GET`, raw bytes) and upload (`POST`,
//! `multipart/form-data` with one `file` part per file, or a raw
//! `application/octet-stream` body, optionally gzip-encoded). Bodies
//! stream through to the backend in both directions.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use flate2::write::GzDecoder;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{check_path, resolve, token, Proof};
use crate::auth::{constant_time_eq, Authenticator};
use crate::backend::{Backend, ByteStream, EntryInfo, FileType, SandboxScope};
use crate::e2b::body::{check_content_length, next_chunk, query_param, BodyError};
use crate::e2b::multipart::{boundary, Multipart, MultipartError};
use crate::e2b::{AppState, E2bState};
use crate::error::ApiError;

type ApiResult = Result<Response<Body>, ApiError>;

/// The v1 signature of a signed file URL, as the SDK computes it:
/// `v1_` + unpadded base64 of SHA-256 over
/// `path:operation:user:token[:expiration]`.
fn signature(
    path: &str,
    operation: &str,
    user: &str,
    token: &str,
    expiration: Option<&str>,
) -> String {
    let raw = match expiration {
        Some(exp) => format!("{path}:{operation}:{user}:{token}:{exp}"),
        None => format!("{path}:{operation}:{user}:{token}"),
    };
    format!(
        "v1_{}",
        STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes()))
    )
}

/// Authorizes a `/files` request (token header, or a signed URL) and
/// checks its `path`/`username` parameters.
async fn files_scope<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    headers: &HeaderMap,
    uri: &Uri,
    operation: &str,
) -> Result<(SandboxScope, Option<String>), ApiError> {
    let query = uri.query();
    let path = query_param(query, "path");
    let user = query_param(query, "username").filter(|u| !u.is_empty());
    if let Some(p) = &path {
        check_path("path", p).map_err(ApiError::bad_request)?;
    }
    if user.as_deref().is_some_and(|u| u.contains('\0')) {
        return Err(ApiError::bad_request("username contains a NUL byte"));
    }
    let scope = match query_param(query, "signature") {
        None => resolve(state, headers, Proof::Token(token(headers)), user).await?,
        Some(sig) => {
            let expiration = query_param(query, "signature_expiration");
            if let Some(exp) = &expiration {
                let exp: u64 = exp
                    .parse()
                    .map_err(|_| ApiError::bad_request("invalid signature_expiration"))?;
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                if exp < now {
                    crate::e2b::observe::note_auth_failure("expired signed URL", None);
                    return Err(ApiError::unauthorized("the signed URL has expired"));
                }
            }
            let signed_path = path.clone().unwrap_or_default();
            let signed_user = user.clone().unwrap_or_default();
            let check = move |token: &str| {
                let want = signature(
                    &signed_path,
                    operation,
                    &signed_user,
                    token,
                    expiration.as_deref(),
                );
                constant_time_eq(want.as_bytes(), sig.as_bytes())
            };
            resolve(state, headers, Proof::Check(&check), user).await?
        }
    };
    Ok((scope, path))
}

/// `GET /files?path=…&username=…`: the file's bytes.
pub async fn download<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    request: Request,
) -> ApiResult {
    let (scope, path) = files_scope(&state, request.headers(), request.uri(), "read").await?;
    let Some(path) = path else {
        return Err(ApiError::bad_request("path is required"));
    };
    let file = state
        .backend
        .read_file(&scope, &path)
        .await
        .map_err(ApiError::envd)?;
    let mut response = Response::new(Body::from_stream(file.body));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(size) = file.size {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(response)
}

/// The first error a streamed upload body hit (reported instead of what
/// the backend made of the aborted stream).
type Failure = Arc<Mutex<Option<ApiError>>>;

fn record(failure: &Failure, e: ApiError) -> io::Error {
    let message = e.message.clone();
    if let Ok(mut slot) = failure.lock() {
        slot.get_or_insert(e);
    }
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn take_failure(failure: &Failure) -> Option<ApiError> {
    failure.lock().ok().and_then(|mut slot| slot.take())
}

/// An `application/octet-stream` body as a byte stream: bounded, with an
/// idle timeout, gunzipped when `gzip`.
struct RawUpload {
    body: Body,
    gunzip: Option<GzDecoder<Vec<u8>>>,
    limit: u64,
    total: u64,
    idle: std::time::Duration,
    pace: crate::e2b::body::Pace,
    done: bool,
}

impl RawUpload {
    /// The next piece of (decoded) file content; `None` at the end.
    async fn next(&mut self) -> Result<Option<Bytes>, ApiError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let chunk = next_chunk(&mut self.body, self.idle)
                .await
                .map_err(ApiError::from)?;
            if let Some(c) = &chunk {
                self.pace.add(c.len()).map_err(ApiError::from)?;
            }
            let out = match (chunk, &mut self.gunzip) {
                (Some(c), None) => c,
                (Some(c), Some(gz)) => {
                    gz.write_all(&c).map_err(gzip_error)?;
                    Bytes::from(std::mem::take(gz.get_mut()))
                }
                (None, Some(gz)) => {
                    self.done = true;
                    gz.try_finish().map_err(gzip_error)?;
                    Bytes::from(std::mem::take(gz.get_mut()))
                }
                (None, None) => {
                    self.done = true;
                    Bytes::new()
                }
            };
            self.total += out.len() as u64;
            if self.total > self.limit {
                return Err(BodyError::TooLarge { limit: self.limit }.into());
            }
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
    }
}

fn gzip_error(e: io::Error) -> ApiError {
    ApiError::bad_request(format!("invalid gzip body: {e}"))
}

fn raw_stream(upload: RawUpload, failure: Failure) -> ByteStream {
    Box::pin(futures_util::stream::unfold(
        (upload, failure),
        |(mut upload, failure)| async move {
            match upload.next().await {
                Ok(Some(bytes)) => Some((Ok(bytes), (upload, failure))),
                Ok(None) => None,
                Err(e) => {
                    upload.done = true;
                    let err = record(&failure, e);
                    Some((Err(err), (upload, failure)))
                }
            }
        },
    ))
}

fn multipart_error(e: &MultipartError) -> ApiError {
    match e {
        MultipartError::Body(b) => b.clone().into(),
        MultipartError::Malformed(_) => ApiError::bad_request(e.to_string()),
    }
}

/// One part's bytes as a byte stream, reading through the shared reader.
fn part_stream(reader: Arc<tokio::sync::Mutex<Multipart>>, failure: Failure) -> ByteStream {
    Box::pin(
        futures_util::stream::unfold(
            (reader, failure, false),
            |(reader, failure, ended)| async move {
                if ended {
                    return None;
                }
                let next = reader.lock().await.next_data().await;
                match next {
                    Ok(Some(bytes)) => Some((Ok(bytes), (reader, failure, false))),
                    Ok(None) => None,
                    Err(e) => {
                        let err = record(&failure, multipart_error(&e));
                        Some((Err(err), (reader, failure, true)))
                    }
                }
            },
        )
        .fuse(),
    )
}

/// Header prefix of file metadata on uploads.
const METADATA_PREFIX: &str = "x-metadata-";
/// The xattr namespace envd stores metadata under (counted in the limit).
const XATTR_PREFIX_LEN: usize = "user.e2b.".len();
/// Longest metadata key (the VFS xattr-name limit minus the prefix).
const MAX_METADATA_KEY: usize = 246;
/// Most metadata bytes per file (prefix + key + value, summed).
const MAX_METADATA_TOTAL: usize = 4096;

fn printable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// The `X-Metadata-<key>: <value>` headers of an upload, validated as
/// envd does: keys lowercased, keys and values printable ASCII, keys at
/// most 246 bytes, all of it at most 4096 bytes; a repeated key keeps its
/// first value.
fn metadata_from_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    let mut total = 0usize;
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(METADATA_PREFIX) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        let value = value
            .to_str()
            .ok()
            .filter(|v| printable(v))
            .ok_or_else(|| {
                ApiError::bad_request(format!("metadata value of {key:?} must be printable ASCII"))
            })?;
        if key.is_empty() || !printable(&key) || key.len() > MAX_METADATA_KEY {
            return Err(ApiError::bad_request(format!(
                "invalid metadata key {key:?}: 1 to {MAX_METADATA_KEY} printable ASCII bytes"
            )));
        }
        if out.contains_key(&key) {
            continue;
        }
        total += XATTR_PREFIX_LEN + key.len() + value.len();
        if total > MAX_METADATA_TOTAL {
            return Err(ApiError::bad_request(format!(
                "file metadata is over {MAX_METADATA_TOTAL} bytes"
            )));
        }
        out.insert(key, value.to_owned());
    }
    Ok(out)
}

/// E2B's upload answer: `[{"path", "name", "type"}]`.
fn written(entries: &[EntryInfo]) -> Response<Body> {
    let items: Vec<Value> = entries
        .iter()
        .map(|e| {
            let kind = match e.file_type {
                FileType::Directory => "dir",
                FileType::File | FileType::Symlink => "file",
            };
            let mut item = json!({ "path": e.path, "name": e.name, "type": kind });
            if let (false, Some(obj)) = (e.metadata.is_empty(), item.as_object_mut()) {
                obj.insert("metadata".into(), json!(e.metadata));
            }
            item
        })
        .collect();
    (StatusCode::OK, Json(Value::Array(items))).into_response()
}

/// `POST /files?path=…&username=…`: writes one or more files.
pub async fn upload<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    request: Request,
) -> ApiResult {
    let (scope, path) = files_scope(&state, request.headers(), request.uri(), "write").await?;
    let headers = request.headers().clone();
    let metadata = metadata_from_headers(&headers)?;
    check_content_length(&headers, state.limits.upload).map_err(ApiError::from)?;
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = request.into_body();
    if let Some(b) = boundary(&content_type) {
        return upload_multipart(&state, &scope, path, &metadata, body, &b).await;
    }
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media != "application/octet-stream" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported content type {media:?}: send multipart/form-data or application/octet-stream"),
        ));
    }
    let Some(path) = path else {
        return Err(ApiError::bad_request(
            "path is required for an application/octet-stream upload",
        ));
    };
    let gzip = match headers.get(CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        None => false,
        Some(e) if e.trim().eq_ignore_ascii_case("identity") => false,
        Some(e) if e.trim().eq_ignore_ascii_case("gzip") => true,
        Some(e) => {
            return Err(ApiError::bad_request(format!(
                "unsupported Content-Encoding {e:?}: use gzip or identity"
            )))
        }
    };
    let failure = Failure::default();
    let upload = RawUpload {
        body,
        gunzip: gzip.then(|| GzDecoder::new(Vec::new())),
        limit: state.limits.upload,
        total: 0,
        idle: state.limits.body_idle,
        pace: state.limits.pace(),
        done: false,
    };
    let result = state
        .backend
        .write_file(
            &scope,
            &path,
            &metadata,
            raw_stream(upload, Arc::clone(&failure)),
        )
        .await;
    if let Some(e) = take_failure(&failure) {
        return Err(e);
    }
    let entry = result.map_err(ApiError::envd)?;
    Ok(written(&[entry]))
}

async fn upload_multipart<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    scope: &SandboxScope,
    query_path: Option<String>,
    metadata: &BTreeMap<String, String>,
    body: Body,
    boundary: &str,
) -> ApiResult {
    let reader = Arc::new(tokio::sync::Mutex::new(
        Multipart::new(body, boundary, state.limits.upload, state.limits.body_idle)
            .with_pace(state.limits.pace()),
    ));
    let failure = Failure::default();
    let mut entries = Vec::new();
    loop {
        let part = reader.lock().await.next_part().await;
        let headers = match part {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(&e)),
        };
        if headers.name.as_deref() != Some("file") {
            continue;
        }
        let path = match (&query_path, headers.filename) {
            (Some(p), _) if entries.is_empty() => p.clone(),
            (Some(_), _) => {
                return Err(ApiError::bad_request(
                    "the path parameter names one file, but the body has several",
                ))
            }
            (None, Some(name)) => name,
            (None, None) => return Err(ApiError::bad_request("a file part has no filename")),
        };
        check_path("file name", &path).map_err(ApiError::bad_request)?;
        let stream = part_stream(Arc::clone(&reader), Arc::clone(&failure));
        let result = state
            .backend
            .write_file(scope, &path, metadata, stream)
            .await;
        if let Some(e) = take_failure(&failure) {
            return Err(e);
        }
        entries.push(result.map_err(ApiError::envd)?);
    }
    if entries.is_empty() {
        return Err(ApiError::bad_request("no file part in the upload"));
    }
    Ok(written(&entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-metadata-owner", HeaderValue::from_static("alice"));
        h.append("x-metadata-owner", HeaderValue::from_static("bob"));
        h.insert("x-other", HeaderValue::from_static("x"));
        let m = metadata_from_headers(&h).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m["owner"], "alice");
        let mut big = HeaderMap::new();
        big.insert(
            "x-metadata-k",
            HeaderValue::from_str(&"v".repeat(5000)).unwrap(),
        );
        assert!(metadata_from_headers(&big).is_err());
    }

    #[test]
    fn signature_matches_the_sdk() {
        // hashlib.sha256(b"/home/user/a.txt:read::tok").digest(), base64, no padding.
        let sig = signature("/home/user/a.txt", "read", "", "tok", None);
        assert!(sig.starts_with("v1_"));
        assert!(!sig.ends_with('='));
        assert_ne!(sig, signature("/home/user/a.txt", "write", "", "tok", None));
        assert_ne!(
            sig,
            signature("/home/user/a.txt", "read", "", "tok", Some("1"))
        );
    }
}

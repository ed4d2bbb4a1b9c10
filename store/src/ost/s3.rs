//! The S3 backend through aws-sdk-s3. Small objects go up in one request; big ones and
//! streams of unknown size in multipart uploads whose parts are buffered one at a time
//! (so memory stays at one part whatever the object size). Requests are retried with
//! exponential backoff on 5xx, throttling, timeouts and connection errors.

use std::io;
use std::time::Duration;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::{normalize_base, ObjectInfo, ObjectStream, OstError};

/// S3's smallest part (except the last one).
const MIN_PART: u64 = 5 * 1024 * 1024;
/// Part size when the object's size is not known in advance: sized for objects up to
/// 1 GiB (1 GiB / 10,000 parts is under S3's 5 MiB minimum, so the floor wins; we take
/// 8 MiB for fewer requests). Never a buffer sized for S3's 5 TiB maximum.
pub const UNKNOWN_SIZE_PART: u64 = 8 * 1024 * 1024;
/// Objects up to this size (when known) go up in a single PUT.
const SINGLE_PUT_MAX: u64 = UNKNOWN_SIZE_PART;
/// S3's own limits (the protocol's, not flotilla's: those are in `limits.rs`): the most
/// parts of a multipart upload, and the largest object.
const S3_MAX_PARTS: u64 = 10_000;
const S3_MAX_OBJECT: u64 = 5 * 1024 * 1024 * 1024 * 1024;

/// What an `s3://` URL says, plus the retry policy.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub base: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Static credentials (tests, embedders); `None` reads the usual AWS sources.
    pub credentials: Option<(String, String)>,
}

impl S3Settings {
    /// Parses `s3://BUCKET/BASE/PATH?endpoint=URL&region=R&path_style=true`; the tuning
    /// of retries is also readable there (`max_attempts`, `initial_backoff_ms`,
    /// `max_backoff_ms`).
    pub fn from_url(url: &url::Url) -> Result<S3Settings, OstError> {
        let bucket = url.host_str().unwrap_or_default().to_string();
        if bucket.is_empty() {
            return Err(OstError::Config(format!("{url}: missing bucket (s3://BUCKET/base/path)")));
        }
        let path = percent_encoding::percent_decode_str(url.path())
            .decode_utf8()
            .map_err(|_| OstError::Config(format!("{url}: base path is not UTF-8")))?;
        let mut s = S3Settings {
            bucket,
            base: normalize_base(&path)?,
            endpoint: None,
            region: None,
            path_style: false,
            max_attempts: 8,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            credentials: None,
        };
        let num = |k: &str, v: &str| -> Result<u64, OstError> {
            v.parse().map_err(|_| OstError::Config(format!("{url}: {k} must be a number")))
        };
        for (k, v) in url.query_pairs() {
            match &*k {
                "endpoint" => s.endpoint = Some(v.into_owned()),
                "region" => s.region = Some(v.into_owned()),
                "path_style" => {
                    s.path_style = match &*v {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(OstError::Config(format!("{url}: path_style must be true or false")))
                        }
                    }
                }
                "max_attempts" => s.max_attempts = num(&k, &v)?.clamp(1, 100) as u32,
                "initial_backoff_ms" => s.initial_backoff = Duration::from_millis(num(&k, &v)?),
                "max_backoff_ms" => s.max_backoff = Duration::from_millis(num(&k, &v)?),
                other => return Err(OstError::Config(format!("{url}: unknown parameter {other:?}"))),
            }
        }
        Ok(s)
    }
}

pub struct S3Ost {
    client: Client,
    bucket: String,
    /// "" or "a/b/" (with the trailing slash).
    base: String,
    endpoint: Option<String>,
}

impl std::fmt::Debug for S3Ost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl S3Ost {
    /// Builds the client: credentials and region from the environment or a profile
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_PROFILE`...), the
    /// region from the URL when given, `us-east-1` when nothing says.
    pub async fn open(s: S3Settings) -> Result<S3Ost, OstError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &s.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some((id, secret)) = &s.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id, secret, None, None, "flotilla",
            ));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s.path_style)
            // Third-party S3 servers do not all know the newer default checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(s.max_attempts)
                    .with_initial_backoff(s.initial_backoff)
                    .with_max_backoff(s.max_backoff),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(60))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            );
        if shared.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        if let Some(ep) = &s.endpoint {
            b = b.endpoint_url(ep);
        }
        let base = if s.base.is_empty() { String::new() } else { format!("{}/", s.base) };
        Ok(S3Ost { client: Client::from_conf(b.build()), bucket: s.bucket, base, endpoint: s.endpoint })
    }

    pub fn describe(&self) -> String {
        match &self.endpoint {
            Some(ep) => format!("s3://{}/{} at {ep}", self.bucket, self.base),
            None => format!("s3://{}/{}", self.bucket, self.base),
        }
    }

    /// Creates the bucket when it does not exist (tests and `flotilla dev`; production
    /// buckets are made by their owners).
    pub async fn ensure_bucket(&self) -> Result<(), OstError> {
        if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() {
            return Ok(());
        }
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => match e.as_service_error().and_then(|se| se.code()) {
                Some("BucketAlreadyOwnedByYou") | Some("BucketAlreadyExists") => Ok(()),
                _ => Err(backend(&self.bucket, "CreateBucket", e)),
            },
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.base, key)
    }

    pub async fn put(&self, key: &str, mut body: ObjectStream, size: Option<u64>) -> Result<u64, OstError> {
        if let Some(size) = size {
            if size > S3_MAX_OBJECT {
                return Err(OstError::TooLarge { key: key.to_string(), limit: S3_MAX_OBJECT });
            }
        }
        let part_size = match size {
            Some(size) => size.div_ceil(S3_MAX_PARTS).max(UNKNOWN_SIZE_PART).max(MIN_PART),
            None => UNKNOWN_SIZE_PART,
        };
        // Read the first part: if the stream ends within it, one PUT is enough.
        let (first, ended) = read_part(key, &mut body, part_size).await?;
        if ended && size.is_none_or(|s| s <= SINGLE_PUT_MAX || s == first.len() as u64) {
            let len = first.len() as u64;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .content_length(len as i64)
                .body(ByteStream::from(first))
                .send()
                .await
                .map_err(|e| backend(key, "PutObject", e))?;
            return Ok(len);
        }
        self.multipart(key, first, ended, body, part_size).await
    }

    async fn multipart(
        &self,
        key: &str,
        first: Bytes,
        mut ended: bool,
        mut body: ObjectStream,
        part_size: u64,
    ) -> Result<u64, OstError> {
        let full = self.full(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| backend(key, "CreateMultipartUpload", e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = async {
            let mut parts = Vec::new();
            let mut total = 0u64;
            let mut part = first;
            loop {
                let number = parts.len() as i32 + 1;
                if number as u64 > S3_MAX_PARTS {
                    return Err(OstError::TooLarge { key: key.to_string(), limit: S3_MAX_PARTS * part_size });
                }
                total += part.len() as u64;
                let out = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .content_length(part.len() as i64)
                    .body(ByteStream::from(part))
                    .send()
                    .await
                    .map_err(|e| backend(key, "UploadPart", e))?;
                parts.push(CompletedPart::builder().part_number(number).set_e_tag(out.e_tag).build());
                if ended {
                    break;
                }
                let (next, end) = read_part(key, &mut body, part_size).await?;
                if next.is_empty() {
                    break;
                }
                part = next;
                ended = end;
            }
            let completed = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await;
            match completed {
                Ok(_) => Ok(total),
                // Some servers (moto) answer 200 with a body the SDK cannot parse
                // (`CompleteMultipartUploadResponse`); a 200 without an error code is
                // trusted once HEAD shows the whole object.
                Err(e)
                    if status(&e) == Some(200) && e.as_service_error().and_then(|se| se.code()).is_none() =>
                {
                    match self.stat(key).await {
                        Ok(info) if info.size == total => Ok(total),
                        _ => Err(backend(key, "CompleteMultipartUpload", e)),
                    }
                }
                Err(e) => Err(backend(key, "CompleteMultipartUpload", e)),
            }
        }
        .await;
        if result.is_err() {
            let abort =
                self.client.abort_multipart_upload().bucket(&self.bucket).key(&full).upload_id(&upload_id);
            if let Err(e) = abort.send().await {
                tracing::warn!(key, error = %backend(key, "AbortMultipartUpload", e), "could not abort a failed multipart upload");
            }
        }
        result
    }

    pub async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Result<ObjectStream, OstError> {
        if len == Some(0) {
            self.stat(key).await?;
            return Ok(Box::pin(futures::stream::empty()));
        }
        let range = match (offset, len) {
            (0, None) => None,
            (o, None) => Some(format!("bytes={o}-")),
            (o, Some(l)) => Some(format!("bytes={o}-{}", o + l - 1)),
        };
        let out =
            self.client.get_object().bucket(&self.bucket).key(self.full(key)).set_range(range).send().await;
        let out = match out {
            Ok(out) => out,
            // A range starting past the end: the object exists, the answer is empty.
            Err(e) if status(&e) == Some(416) => {
                self.stat(key).await?;
                return Ok(Box::pin(futures::stream::empty()));
            }
            Err(e) => return Err(not_found_or(key, "GetObject", e)),
        };
        Ok(Box::pin(futures::stream::try_unfold(out.body, |mut body| async move {
            match body.try_next().await {
                Ok(Some(chunk)) => Ok(Some((chunk, body))),
                Ok(None) => Ok(None),
                Err(e) => Err(io::Error::other(e)),
            }
        })))
    }

    pub async fn stat(&self, key: &str) -> Result<ObjectInfo, OstError> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
            .map_err(|e| not_found_or(key, "HeadObject", e))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            last_modified_ms: out.last_modified().and_then(|t| t.to_millis().ok()).unwrap_or(0).max(0) as u64,
        })
    }

    pub async fn delete(&self, key: &str) -> Result<(), OstError> {
        match self.client.delete_object().bucket(&self.bucket).key(self.full(key)).send().await {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(backend(key, "DeleteObject", e)),
        }
    }

    pub async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ObjectInfo>, OstError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full(prefix))
                .set_start_after(if token.is_none() { start_after.map(|s| self.full(s)) } else { None })
                .set_continuation_token(token.take())
                .max_keys((limit - out.len()).min(1000) as i32)
                .send()
                .await
                .map_err(|e| backend(prefix, "ListObjectsV2", e))?;
            for obj in page.contents() {
                let Some(full) = obj.key() else { continue };
                let Some(key) = full.strip_prefix(&self.base) else { continue };
                out.push(ObjectInfo {
                    key: key.to_string(),
                    size: obj.size().unwrap_or(0).max(0) as u64,
                    last_modified_ms: obj.last_modified().and_then(|t| t.to_millis().ok()).unwrap_or(0).max(0)
                        as u64,
                });
            }
            token = page.next_continuation_token().map(str::to_string);
            if out.len() >= limit || token.is_none() || !page.is_truncated().unwrap_or(false) {
                out.truncate(limit);
                return Ok(out);
            }
        }
    }
}

/// Reads up to `part_size` bytes; `true` when the stream ended.
async fn read_part(key: &str, body: &mut ObjectStream, part_size: u64) -> Result<(Bytes, bool), OstError> {
    let mut buf = BytesMut::new();
    while (buf.len() as u64) < part_size {
        match body.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(OstError::Io { key: key.to_string(), source: e }),
            None => return Ok((buf.freeze(), true)),
        }
    }
    // A chunk may overshoot the part size; S3 only needs parts of at least 5 MiB.
    Ok((buf.freeze(), false))
}

fn status<E, R>(e: &SdkError<E, R>) -> Option<u16>
where
    R: HttpStatus,
{
    e.raw_response().map(HttpStatus::status_code)
}

trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn not_found_or<E>(key: &str, op: &str, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> OstError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    if status(&e) == Some(404) {
        OstError::NotFound { key: key.to_string() }
    } else {
        backend(key, op, e)
    }
}

fn backend<E>(key: &str, op: &str, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> OstError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    let message = match &e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            format!(
                "{} (HTTP {}): {}",
                err.code().unwrap_or("error"),
                se.raw().status().as_u16(),
                err.message().map(str::to_string).unwrap_or_else(|| format!(
                    "{}",
                    aws_smithy_types::error::display::DisplayErrorContext(err)
                ))
            )
        }
        SdkError::TimeoutError(_) => "timed out (after retries)".to_string(),
        SdkError::DispatchFailure(d) => format!("could not reach the server (after retries): {d:?}"),
        other => format!("{}", aws_smithy_types::error::display::DisplayErrorContext(other)),
    };
    OstError::Backend { key: key.to_string(), message: format!("{op}: {message}") }
}

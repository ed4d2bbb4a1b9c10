//! The HTTP client of small requests: a body and an answer that fit in memory (the JSON
//! API, node-to-node Raft RPCs and forwarded writes). Streams (logs, archives, events,
//! export and import) go through `reqwest` ([`crate::tls::client_builder`]).
//!
//! It is hyper-util's pooled HTTP/1.1 client, the one `reqwest` wraps, used directly:
//! a request's URI is made from a [`Base`] parsed once plus its path, and the answer is
//! collected as it comes. Measured against `reqwest` on the same pool (64 concurrent
//! writers, durable puts to a three-node cluster, the load generator's CPU per request):
//! 35–47 µs through `reqwest`, 24–31 µs this way: `reqwest`'s own layers over that pool
//! (its URL, request and answer types, per-request timers) were a third of it.
//!
//! A process whose environment names a proxy (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`,
//! any case) sends its small requests through `reqwest` too, which applies them and
//! `NO_PROXY` as before: the fast path is for the direct connections a cluster's nodes
//! and executors normally have.

use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use http::header::{self, HeaderName, HeaderValue};
pub use http::{HeaderMap, Method, Uri};

/// A server's URL (`https://host:port`, maybe with a path prefix) parsed once: a request's
/// URI is this plus its path, without parsing the whole URL again.
#[derive(Clone, Debug)]
pub struct Base {
    scheme: Scheme,
    authority: Authority,
    /// The URL's path without a trailing `/` (empty for a server at the root).
    prefix: String,
}

impl Base {
    /// `url` without a query; a trailing `/` is ignored.
    pub fn parse(url: &str) -> Result<Base, String> {
        let uri: Uri = url.trim_end_matches('/').parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let parts = uri.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        };
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("{url:?} is not an http:// or https:// URL"));
        }
        let prefix = match parts.path_and_query {
            Some(p) if p.query().is_some() => return Err(format!("{url:?}: a server URL has no query")),
            Some(p) => p.path().trim_end_matches('/').to_string(),
            None => String::new(),
        };
        Ok(Base { scheme, authority, prefix })
    }

    /// The URI of `path` (absolute, with its query if any) on this server.
    pub fn uri(&self, path: &str) -> Result<Uri, String> {
        let path_and_query = if self.prefix.is_empty() {
            PathAndQuery::try_from(path)
        } else {
            PathAndQuery::try_from(format!("{}{path}", self.prefix))
        }
        .map_err(|e| format!("{path:?} is not a URL path: {e}"))?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| e.to_string())
    }
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No connection was made (refused, no route, no handshake): the request was not sent.
    #[error("{0}")]
    Connect(String),
    /// No answer in time; the request may have been received.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request failed after it may have been sent, or its answer could not be read.
    #[error("{0}")]
    Failed(String),
}

/// A pooled client (keep-alive connections per server, HTTP/1.1, TCP_NODELAY, this
/// process's TLS settings for `https://`). Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct Http {
    inner: hyper_util::client::legacy::Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Set when the environment names a proxy: requests go through it instead.
    proxied: Option<reqwest::Client>,
}

/// Whether `var` (the environment) names a proxy for HTTP clients.
fn proxy_named(var: impl Fn(&str) -> Option<String>) -> bool {
    ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"]
        .iter()
        .any(|name| var(name).is_some_and(|v| !v.trim().is_empty()))
}

impl Http {
    /// `idle`: how long an unused connection stays open; `max_idle`: how many per server.
    pub fn new(connect_timeout: Duration, idle: Duration, max_idle: usize) -> Http {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*crate::tls::client_config()).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle)
            .pool_max_idle_per_host(max_idle)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let proxied = proxy_named(|name| std::env::var(name).ok()).then(|| {
            crate::tls::client_builder()
                .connect_timeout(connect_timeout)
                .pool_idle_timeout(idle)
                .pool_max_idle_per_host(max_idle)
                .tcp_nodelay(true)
                .build()
                .expect("static client settings")
        });
        Http { inner, proxied }
    }

    /// Sends `method uri` with `headers` and `body`, and reads the answer whole, all
    /// within `timeout`.
    pub async fn send(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, HttpError> {
        if let Some(client) = &self.proxied {
            return send_reqwest(client, method, uri, headers, body, timeout).await;
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let exchange = async {
            let resp = self.inner.request(req).await.map_err(|e| {
                let text = describe(&e);
                if e.is_connect() {
                    HttpError::Connect(text)
                } else {
                    HttpError::Failed(text)
                }
            })?;
            let (head, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| HttpError::Failed(describe(&e)))?.to_bytes();
            Ok(Answer { status: head.status.as_u16(), headers: head.headers, body })
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| HttpError::Timeout(timeout))?
    }
}

/// [`Http::send`] through `reqwest` (and the proxy the environment names).
async fn send_reqwest(
    client: &reqwest::Client,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<Answer, HttpError> {
    let failed = |e: reqwest::Error| {
        if e.is_timeout() {
            HttpError::Timeout(timeout)
        } else if e.is_connect() {
            HttpError::Connect(describe(&e))
        } else {
            HttpError::Failed(describe(&e))
        }
    };
    let resp = client
        .request(method, uri.to_string())
        .headers(headers)
        .body(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(failed)?;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = resp.bytes().await.map_err(failed)?;
    Ok(Answer { status, headers, body })
}

/// The `Authorization` header of a bearer token, made once and marked sensitive (never
/// printed), or why the token cannot be sent.
#[derive(Clone, Debug)]
pub struct Auth(Result<Option<HeaderValue>, String>);

impl Auth {
    pub fn new(token: Option<&str>) -> Auth {
        Auth(token.map(bearer).transpose())
    }

    /// The headers of a request: the token's, when there is one.
    pub fn headers(&self) -> Result<HeaderMap, String> {
        let mut headers = HeaderMap::new();
        if let Some(auth) = self.0.clone()? {
            headers.insert(header::AUTHORIZATION, auth);
        }
        Ok(headers)
    }
}

fn bearer(token: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| "the token holds characters an HTTP header cannot carry".to_string())?;
    v.set_sensitive(true);
    Ok(v)
}

/// An error with its causes (a client error's own message stops at "client error
/// (Connect)"; the reason — refused, a certificate the CA does not sign — is in its
/// sources).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_in_the_environment_is_seen_in_any_case() {
        type Env = &'static [(&'static str, &'static str)];
        let env =
            |set: Env| move |name: &str| set.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string());
        assert!(!proxy_named(env(&[])));
        assert!(!proxy_named(env(&[("HTTPS_PROXY", " "), ("NO_PROXY", "*")])));
        let named: [Env; 3] = [
            &[("HTTP_PROXY", "http://proxy:3128")],
            &[("https_proxy", "http://proxy:3128")],
            &[("ALL_PROXY", "http://proxy:3128")],
        ];
        for set in named {
            assert!(proxy_named(env(set)), "{set:?}");
        }
    }

    #[test]
    fn a_base_makes_the_uri_of_each_path() {
        let b = Base::parse("http://127.0.0.1:7700").unwrap();
        assert_eq!(
            b.uri("/api/v1/kv/a%2Fb?prev_revision=3").unwrap(),
            "http://127.0.0.1:7700/api/v1/kv/a%2Fb?prev_revision=3"
        );
        let b = Base::parse("https://ci.example.com/flotilla/").unwrap();
        assert_eq!(b.uri("/healthz").unwrap(), "https://ci.example.com/flotilla/healthz");
        for bad in ["127.0.0.1:7700", "ftp://host", "http://host/?a=1", "not a url", ""] {
            assert!(Base::parse(bad).is_err(), "{bad:?} was taken as a server URL");
        }
        assert!(Base::parse("http://h").unwrap().uri("/a b").is_err(), "a space is no URL path");
    }
}

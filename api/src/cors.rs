//! Cross-origin requests (CORS), off unless `--allowed-origins` names origins.
//!
//! Seed 001: "don't make cors enabled on all by default". With no allowed origin a node
//! sends no CORS header at all and refuses every preflight (403): a page on another
//! origin cannot call the API from a browser, whatever token it holds. With
//! `--allowed-origins https://ci.example.com,https://ops.example.com`, a preflight from
//! one of them is answered (the methods of the route it asks for, the headers the API
//! reads, the origin echoed, never `*`), and answers to that origin carry
//! `Access-Control-Allow-Origin` with `Vary: Origin`. `*` is honoured only when given
//! literally. Credentials (cookies) are never allowed: the API uses bearer tokens.

use flotilla_store::limits::MAX_ALLOWED_ORIGINS;
use warp::http::{HeaderValue, Response};
use warp::reply::Response as Reply;

/// Request headers a browser may send on a cross-origin API call.
const ALLOWED_HEADERS: &str = "authorization, content-type, idempotency-key";
/// How long a browser may cache a preflight answer (10 minutes).
const PREFLIGHT_MAX_AGE_S: u32 = 600;

#[derive(Clone, Debug, Default)]
pub struct Cors {
    origins: Vec<String>,
    any: bool,
}

impl Cors {
    /// From `--allowed-origins` (comma separated). Each is `*` or `scheme://host[:port]`
    /// exactly as browsers send it in `Origin` (no path, no trailing slash).
    pub fn parse(list: &[String]) -> Result<Cors, String> {
        let mut cors = Cors::default();
        for o in list.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
            if o == "*" {
                cors.any = true;
                continue;
            }
            let url = url::Url::parse(o).map_err(|e| format!("allowed origin {o:?} is not a URL: {e}"))?;
            let exact = url.origin().ascii_serialization();
            if !matches!(url.scheme(), "http" | "https") || exact != o {
                return Err(format!(
                    "allowed origin {o:?} must be scheme://host[:port] with no path (like {exact:?})"
                ));
            }
            cors.origins.push(exact);
        }
        if cors.origins.len() > MAX_ALLOWED_ORIGINS {
            return Err(format!("at most {MAX_ALLOWED_ORIGINS} allowed origins"));
        }
        Ok(cors)
    }

    pub fn enabled(&self) -> bool {
        self.any || !self.origins.is_empty()
    }

    /// The `Access-Control-Allow-Origin` value for `origin`, if it is allowed.
    fn allow(&self, origin: Option<&str>) -> Option<HeaderValue> {
        let origin = origin?;
        if self.any {
            return Some(HeaderValue::from_static("*"));
        }
        self.origins.iter().any(|o| o == origin).then(|| HeaderValue::from_str(origin).ok()).flatten()
    }

    /// The answer to a preflight (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`) for a route whose methods are `allow`: 204 with
    /// the CORS headers when the origin and method are allowed, else `None` (the caller
    /// answers 403).
    pub fn preflight(&self, origin: Option<&str>, method: &str, allow: &[&str]) -> Option<Reply> {
        let value = self.allow(origin)?;
        if !allow.contains(&method) {
            return None;
        }
        let mut resp = Reply::new(bytes::Bytes::new().into());
        *resp.status_mut() = warp::http::StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert("access-control-allow-origin", value);
        h.insert("access-control-allow-methods", HeaderValue::from_str(&allow.join(", ")).ok()?);
        h.insert("access-control-allow-headers", HeaderValue::from_static(ALLOWED_HEADERS));
        h.insert("access-control-max-age", HeaderValue::from(PREFLIGHT_MAX_AGE_S));
        h.insert("vary", HeaderValue::from_static("Origin"));
        Some(resp)
    }

    /// Adds `Access-Control-Allow-Origin` (and `Vary: Origin`) to an answer to an allowed
    /// origin; nothing otherwise.
    pub fn decorate<B>(&self, origin: Option<&str>, resp: &mut Response<B>) {
        if let Some(value) = self.allow(origin) {
            let h = resp.headers_mut();
            h.insert("access-control-allow-origin", value);
            h.append("vary", HeaderValue::from_static("Origin"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(list: &[&str]) -> Cors {
        Cors::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn off_by_default_no_origin_is_allowed() {
        let c = cors(&[]);
        assert!(!c.enabled());
        assert!(c.preflight(Some("https://a.example"), "GET", &["GET"]).is_none());
        let mut r = Response::new(());
        c.decorate(Some("https://a.example"), &mut r);
        assert!(r.headers().is_empty());
    }

    #[test]
    fn only_listed_origins_are_echoed_and_never_a_star() {
        let c = cors(&["https://ci.example.com", "http://localhost:8080"]);
        let r = c.preflight(Some("https://ci.example.com"), "PUT", &["GET", "PUT"]).unwrap();
        assert_eq!(r.headers()["access-control-allow-origin"], "https://ci.example.com");
        assert_eq!(r.headers()["access-control-allow-methods"], "GET, PUT");
        assert!(c.preflight(Some("https://evil.example"), "GET", &["GET"]).is_none());
        assert!(c.preflight(Some("https://ci.example.com"), "DELETE", &["GET"]).is_none());
        assert!(c.preflight(None, "GET", &["GET"]).is_none());
        let mut r = Response::new(());
        c.decorate(Some("http://localhost:8080"), &mut r);
        assert_eq!(r.headers()["access-control-allow-origin"], "http://localhost:8080");
    }

    #[test]
    fn a_literal_star_allows_every_origin() {
        let c = cors(&["*"]);
        let r = c.preflight(Some("https://x.example"), "GET", &["GET"]).unwrap();
        assert_eq!(r.headers()["access-control-allow-origin"], "*");
    }

    #[test]
    fn origins_with_paths_or_other_schemes_are_refused() {
        for bad in [
            "https://a.example/",
            "https://a.example/ui",
            "ftp://a.example",
            "a.example",
            "HTTPS://A.example",
        ] {
            assert!(Cors::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}

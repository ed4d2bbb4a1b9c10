//! TLS for every HTTP client of this process: Raft RPC between nodes, forwarded requests,
//! the CLI's and the executor's API calls.
//!
//! One process has one TLS client setting (`--tls-ca`, and for a node its own certificate
//! as client identity for mTLS), set once at start with [`configure`]; every HTTP client
//! of the process takes [`client_config`] (the small-request client of [`crate::http`])
//! or is made with [`client_builder`] (streams, through `reqwest`). Without `--tls-ca`
//! the system's root certificates are trusted; with it, its certificates are trusted too.
//! rustls only: no OpenSSL.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::server_tls::{read_certs, read_key};

/// The rustls settings: before [`configure`] (the system's roots only) and as it set them.
static UNCONFIGURED: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
static CONFIGURED: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Sets this process's TLS client settings: extra trusted CAs (PEM bundle) and a client
/// certificate with its key (PEM) for servers that demand one. Call once, before any
/// client is built; a second call is an error. The settings are built here, so a key that
/// does not match its certificate is refused now, not at the first handshake.
pub fn configure(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<(), String> {
    let mut roots = native_roots();
    if let Some(ca) = ca {
        for cert in read_certs(ca, "--tls-ca")? {
            roots.add(cert).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        }
    }
    let builder = builder(roots)?;
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert, "--tls-cert")?, read_key(key, "--tls-key")?)
            .map_err(|e| {
                format!(
                    "--tls-cert {} and --tls-key {} do not go together: {e}",
                    cert.display(),
                    key.display()
                )
            })?,
    };
    CONFIGURED.set(Arc::new(config)).map_err(|_| "the TLS client settings are already set".to_string())
}

/// This process's rustls client settings: the system's roots, `--tls-ca`'s certificates
/// and the client identity given to [`configure`] (none before it is called).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    match CONFIGURED.get() {
        Some(config) => config.clone(),
        None => UNCONFIGURED
            .get_or_init(|| {
                Arc::new(builder(native_roots()).expect("TLS settings without files").with_no_client_auth())
            })
            .clone(),
    }
}

/// The system's roots, as far as they load (a broken one is skipped, as reqwest does).
fn native_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    roots
}

fn builder(
    roots: rustls::RootCertStore,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?
        .with_root_certificates(roots))
}

/// A `reqwest` client builder with this process's TLS settings.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().use_preconfigured_tls((*client_config()).clone())
}

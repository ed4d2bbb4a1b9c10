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

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

struct ClientTls {
    roots: Vec<CertificateDer<'static>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

static CLIENT: OnceLock<ClientTls> = OnceLock::new();
/// The rustls settings, built once: before [`configure`] (the system's roots only) and
/// after it.
static UNCONFIGURED: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
static CONFIGURED: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Sets this process's TLS client settings: extra trusted CAs (PEM bundle) and a client
/// certificate with its key (PEM) for servers that demand one. Call once, before any
/// client is built; a second call is an error.
pub fn configure(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<(), String> {
    let mut roots = Vec::new();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read --tls-ca {}: {e}", ca.display()))?;
        roots = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--tls-ca {}: not a PEM certificate bundle: {e}", ca.display()))?;
        if roots.is_empty() {
            return Err(format!("--tls-ca {}: no certificate in the file", ca.display()));
        }
    }
    let identity = match identity {
        None => None,
        Some((cert, key_path)) => {
            let bad = |e: String| {
                format!(
                    "--tls-cert {} / --tls-key {}: not a certificate and key: {e}",
                    cert.display(),
                    key_path.display()
                )
            };
            let pem =
                std::fs::read(cert).map_err(|e| format!("cannot read --tls-cert {}: {e}", cert.display()))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no certificate in --tls-cert".into()));
            }
            let pem = std::fs::read(key_path)
                .map_err(|e| format!("cannot read --tls-key {}: {e}", key_path.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad(e.to_string()))?;
            // Checked now (the key matches the certificate), not at the first handshake.
            build(&[], Some(&(certs.clone(), key.clone_key()))).map_err(|e| {
                format!(
                    "--tls-cert {} and --tls-key {} do not go together: {e}",
                    cert.display(),
                    key_path.display()
                )
            })?;
            Some((certs, key))
        }
    };
    CLIENT
        .set(ClientTls { roots, identity })
        .map_err(|_| "the TLS client settings are already set".to_string())
}

/// This process's rustls client settings: the system's roots, `--tls-ca`'s certificates
/// and the client identity given to [`configure`] (none before it is called).
pub fn client_config() -> Arc<rustls::ClientConfig> {
    match CLIENT.get() {
        None => UNCONFIGURED.get_or_init(|| Arc::new(build(&[], None).expect("TLS settings without files"))),
        Some(tls) => CONFIGURED.get_or_init(|| {
            Arc::new(build(&tls.roots, tls.identity.as_ref()).expect("TLS settings checked by configure"))
        }),
    }
    .clone()
}

fn build(
    extra_roots: &[CertificateDer<'static>],
    identity: Option<&(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    // The system's roots, as far as they load (a broken one is skipped, as reqwest does).
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(|e| format!("--tls-ca: {e}"))?;
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?
            .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((certs, key)) => {
            builder.with_client_auth_cert(certs.clone(), key.clone_key()).map_err(|e| e.to_string())
        }
    }
}

/// A `reqwest` client builder with this process's TLS settings.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().use_preconfigured_tls((*client_config()).clone())
}

//! TLS for every HTTP client of this process: Raft RPC between nodes, forwarded requests,
//! the CLI's and the executor's API calls.
//!
//! One process has one TLS client setting (`--tls-ca`, and for a node its own certificate
//! as client identity for mTLS), set once at start with [`configure`]; every HTTP client
//! of the process is made with [`client_builder`]. Without `--tls-ca` the system's root
//! certificates are trusted; with it, its certificates are trusted too. rustls only: no
//! OpenSSL.

use std::path::Path;
use std::sync::OnceLock;

struct ClientTls {
    roots: Vec<reqwest::Certificate>,
    identity: Option<reqwest::Identity>,
}

static CLIENT: OnceLock<ClientTls> = OnceLock::new();

/// Sets this process's TLS client settings: extra trusted CAs (PEM bundle) and a client
/// certificate with its key (PEM) for servers that demand one. Call once, before any
/// client is built; a second call is an error.
pub fn configure(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> Result<(), String> {
    let mut roots = Vec::new();
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read --tls-ca {}: {e}", ca.display()))?;
        roots = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("--tls-ca {}: not a PEM certificate bundle: {e}", ca.display()))?;
        if roots.is_empty() {
            return Err(format!("--tls-ca {}: no certificate in the file", ca.display()));
        }
    }
    let identity = match identity {
        None => None,
        Some((cert, key)) => {
            let mut pem =
                std::fs::read(cert).map_err(|e| format!("cannot read --tls-cert {}: {e}", cert.display()))?;
            pem.push(b'\n');
            pem.extend(
                std::fs::read(key).map_err(|e| format!("cannot read --tls-key {}: {e}", key.display()))?,
            );
            Some(reqwest::Identity::from_pem(&pem).map_err(|e| {
                format!(
                    "--tls-cert {} / --tls-key {}: not a certificate and key: {e}",
                    cert.display(),
                    key.display()
                )
            })?)
        }
    };
    CLIENT
        .set(ClientTls { roots, identity })
        .map_err(|_| "the TLS client settings are already set".to_string())
}

/// A `reqwest` client builder with this process's TLS settings.
pub fn client_builder() -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder().use_rustls_tls();
    if let Some(tls) = CLIENT.get() {
        for root in &tls.roots {
            b = b.add_root_certificate(root.clone());
        }
        if let Some(id) = &tls.identity {
            b = b.identity(id.clone());
        }
    }
    b
}

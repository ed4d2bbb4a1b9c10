//! TLS on a listener (a node's API port, an executor's health port): rustls, certificates
//! and keys in PEM. Only the handshake lives here, no HTTP server: what a node does with
//! a verified client certificate (`/raft/*` needs one) is `flotilla_api::tls`.
//!
//! `--tls-cert`/`--tls-key` turn the listener to HTTPS. `--tls-client-ca` also asks every
//! client for a certificate signed by that CA: a presented one must verify (else the
//! handshake fails); a client presenting none is still accepted, and [`Accepted`] says
//! which it was.
//!
//! A plain-HTTP request to a TLS listener gets a plain `400` saying to use `https://`
//! instead of a handshake that hangs or a reset. Everything about the files is checked at
//! start (readable, PEM, a key matching the certificate, not expired) so a process with a
//! bad certificate refuses to start with a message, instead of failing every handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// How long a client has to finish the TLS handshake (as for a request's headers).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(flotilla_store::limits::HEADER_READ_TIMEOUT_MS);

#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

/// A listener's TLS, ready to accept connections.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Whether clients are asked for certificates (`--tls-client-ca`).
    pub client_auth: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("client_auth", &self.client_auth).finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates of `path` (given as `flag`), each valid now; at least one.
pub(crate) fn read_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{flag} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{flag} {}: no certificate in the file", path.display()));
    }
    for c in &certs {
        check_validity(c).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    }
    Ok(certs)
}

/// The PEM private key of `path` (given as `flag`).
pub(crate) fn read_key(path: &Path, flag: &str) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| format!("{flag} {}: no PEM private key: {e}", path.display()))
}

/// Refuses a certificate that is not valid now (expired, or not yet valid).
fn check_validity(cert: &CertificateDer<'_>) -> Result<(), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let v = parsed.validity();
    if !v.is_valid() {
        return Err(format!(
            "the certificate for {} is not valid now (valid from {} to {})",
            parsed.subject(),
            v.not_before,
            v.not_after
        ));
    }
    Ok(())
}

impl ServerTls {
    /// `None` when neither `--tls-cert` nor `--tls-key` is given.
    pub fn load(files: &TlsFiles) -> Result<Option<ServerTls>, String> {
        let (cert, key) = match (&files.cert, &files.key) {
            (None, None) if files.client_ca.is_some() => {
                return Err("--tls-client-ca needs --tls-cert and --tls-key".into())
            }
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => return Err("--tls-cert and --tls-key go together".into()),
        };
        let certs = read_certs(cert, "--tls-cert")?;
        let key_der = read_key(key, "--tls-key")?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca, "--tls-client-ca")? {
                    roots.add(c).map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                }
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key_der).map_err(|e| {
            format!("--tls-cert {} and --tls-key {} do not go together: {e}", cert.display(), key.display())
        })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            client_auth: files.client_ca.is_some(),
        }))
    }

    /// Completes the handshake of an accepted connection. `Ok(None)`: the client spoke
    /// plain HTTP and was told to use https (or went away).
    pub async fn accept(&self, mut stream: TcpStream) -> Result<Option<Accepted>, String> {
        // A TLS connection starts with a handshake record (0x16); anything else is most
        // likely plain HTTP: answer it in plain HTTP, once, and close.
        let mut first = [0u8; 1];
        let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first))
            .await
            .map_err(|_| "no TLS handshake in time".to_string())?
            .map_err(|e| e.to_string())?;
        if peeked == 0 {
            return Ok(None);
        }
        if first[0] != 0x16 {
            use tokio::io::AsyncWriteExt;
            let body =
                r#"{"code":"bad_request","message":"this listener speaks HTTPS: use an https:// URL"}"#;
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            return Ok(None);
        }
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream))
            .await
            .map_err(|_| "the TLS handshake did not finish in time".to_string())?
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let client_cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
        Ok(Some(Accepted { stream: tls, client_cert }))
    }
}

pub struct Accepted {
    pub stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// The client presented a certificate that verified against `--tls-client-ca`.
    pub client_cert: bool,
}

/// Either kind of accepted connection, for the one serving loop.
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Conn for T {}

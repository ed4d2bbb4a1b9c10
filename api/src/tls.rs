//! TLS on a node's listener. The handshake and the certificate files are
//! `flotilla_client::server_tls` (an executor's health port uses them too); what is the
//! server's own is here: with `--tls-client-ca`, `/raft/*` is refused (403) on a
//! connection that presented no verified certificate, so only nodes holding a
//! certificate can join or append (mTLS between nodes; nodes use their own `--tls-cert`
//! as client certificate). Other routes still accept clients without a certificate (the
//! CLI, browsers), authenticated by their tokens.

pub use flotilla_client::server_tls::{Accepted, Conn, ServerTls, TlsFiles};

/// The header a node sets (and strips from what clients send) when the connection
/// presented a verified client certificate.
pub(crate) const CLIENT_CERT_HEADER: &str = "x-flotilla-client-cert";

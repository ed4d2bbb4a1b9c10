//! TLS for every HTTP client of this process: the settings and the builder live in
//! `flotilla_client::tls` (an executor needs them without linking the server); re-exported
//! here for the Raft network and the paths that already name them.

pub use flotilla_client::tls::{client_builder, configure};

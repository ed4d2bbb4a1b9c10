//! Node-to-node transport: Raft RPCs and leader requests over HTTP, bodies in msgpack.
//!
//! One pooled `reqwest::Client` per node carries everything (keep-alive connections are
//! reused across heartbeats and appends). Every request carries the cluster token. Transport
//! failures are reported to openraft as `Unreachable`, so it backs off instead of spinning
//! on a dead peer.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode};
use crate::{Node, NodeId, TypeConfig};

/// Paths of the node-to-node routes, relative to a node's address.
pub mod paths {
    pub const APPEND: &str = "raft/append";
    pub const VOTE: &str = "raft/vote";
    pub const SNAPSHOT: &str = "raft/snapshot";
    pub const LEADER: &str = "raft/leader";
    /// Asks a follower to campaign now: a leader handing over before it stops.
    pub const ELECT: &str = "raft/elect";
}

pub const MSGPACK: &str = "application/msgpack";

/// The response header in which a node's Raft RPC answers name the [`LOG_FORMAT`] it reads
/// (nodes of releases before it send none: format 1).
pub const LOG_FORMAT_HEADER: &str = "flotilla-log-format";

/// What a node's log may hold and it can decode, and what it answers: 1, every release
/// before `PatchRun`; 2, `Command::PatchRun`; 3, writes forwarded together
/// (`LeaderRequest::Writes`, [`crate::forward`]).
/// A leader proposes a newer form only once every member has answered it with this format
/// or higher ([`PeerClient::read_by`]), so that a rolling upgrade never hands an older node
/// an entry it cannot read.
pub const LOG_FORMAT: u32 = 3;

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The request never reached the peer (connection refused, no route): safe to retry.
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: reqwest::Error },
    /// The request may or may not have reached the peer.
    #[error("request to {addr} failed: {message}")]
    Failed { addr: String, message: String },
}

/// The pooled HTTP client every node uses to reach its peers.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    token: Option<String>,
    /// The log format each peer (by address) named in its last answer.
    formats: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    /// Each peer's address parsed once (with a trailing `/`, so that a route joins under
    /// it): parsing the whole URL, host and IDNA mapping included, for every append was
    /// ~3 % of a leader's CPU under load.
    bases: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, reqwest::Url>>>,
}

impl PeerClient {
    pub fn new(token: Option<String>) -> Self {
        let http = crate::tls::client_builder()
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .build()
            .expect("the HTTP client builds with static settings");
        PeerClient { http, token, formats: Default::default(), bases: Default::default() }
    }

    fn heard(&self, addr: &str, format: u32) {
        let peer = addr.trim_end_matches('/');
        let mut formats = self.formats.lock().unwrap_or_else(|e| e.into_inner());
        if formats.get(peer) != Some(&format) {
            formats.insert(peer.to_string(), format);
        }
    }

    /// Whether the peer at each of `addrs` has answered, last, that it reads `format`.
    pub fn read_by<'a>(&self, format: u32, mut addrs: impl Iterator<Item = &'a str>) -> bool {
        let formats = self.formats.lock().unwrap_or_else(|e| e.into_inner());
        addrs.all(|a| formats.get(a.trim_end_matches('/')).is_some_and(|f| *f >= format))
    }

    /// `addr/path`, `path` being relative (a route of [`paths`]).
    fn url(&self, addr: &str, path: &str) -> Result<reqwest::Url, String> {
        let base = self.bases.lock().unwrap_or_else(|e| e.into_inner()).get(addr).cloned();
        let base = match base {
            Some(b) => b,
            None => {
                let b = reqwest::Url::parse(&format!("{}/", addr.trim_end_matches('/')))
                    .map_err(|e| e.to_string())?;
                self.bases.lock().unwrap_or_else(|e| e.into_inner()).insert(addr.to_string(), b.clone());
                b
            }
        };
        base.join(path).map_err(|e| e.to_string())
    }

    /// POSTs `body` as msgpack to `addr/path` and decodes the msgpack answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let failed = |message: String| TransportError::Failed { addr: addr.to_string(), message };
        let bytes = encode(body).map_err(|e| failed(format!("encode: {e}")))?;
        let url = self.url(addr, path).map_err(|e| failed(format!("{addr}: not a URL: {e}")))?;
        let mut req = self.http.post(url).header("content-type", MSGPACK).body(bytes).timeout(timeout);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                TransportError::Connect { addr: addr.to_string(), source: e }
            } else {
                failed(e.to_string())
            }
        })?;
        let status = resp.status();
        let format =
            resp.headers().get(LOG_FORMAT_HEADER).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1);
        self.heard(addr, format);
        let body = resp.bytes().await.map_err(|e| failed(e.to_string()))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(failed(format!("HTTP {status}: {}", text.chars().take(300).collect::<String>())));
        }
        decode(&body).map_err(|e| failed(format!("decode: {e}")))
    }
}

/// Builds one [`PeerNetwork`] per replication target.
pub struct NetworkFactory {
    pub client: PeerClient,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerNetwork { client: self.client.clone(), target, addr: node.addr.clone() }
    }
}

pub struct PeerNetwork {
    client: PeerClient,
    target: NodeId,
    addr: String,
}

impl PeerNetwork {
    async fn rpc<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<NodeId, E>> =
            self.client.call(&self.addr, path, req, option.hard_ttl()).await.map_err(|e| match e {
                TransportError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                TransportError::Failed { .. } => RPCError::Network(NetworkError::new(&e)),
            })?;
        result.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(self.target, Node::new(&self.addr), e))
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.rpc(paths::APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(paths::SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.rpc(paths::VOTE, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use super::PeerClient;

    #[test]
    fn a_route_joins_under_the_peer_address_as_appending_it_would() {
        let c = PeerClient::new(None);
        for addr in ["http://127.0.0.1:7001", "http://127.0.0.1:7001/", "https://node-b.example:443/base"] {
            for path in [super::paths::APPEND, super::paths::LEADER] {
                let appended = format!("{}/{}", addr.trim_end_matches('/'), path);
                let want = reqwest::Url::parse(&appended).unwrap();
                assert_eq!(c.url(addr, path).unwrap(), want, "{addr} + {path}");
                assert_eq!(c.url(addr, path).unwrap(), want, "{addr} + {path}: from the cached base");
            }
        }
        assert!(c.url("not a url", super::paths::APPEND).is_err());
    }

    #[test]
    fn a_format_counts_as_read_once_every_peer_answered_with_it_last() {
        let c = PeerClient::new(None);
        let peers = || ["http://a:1", "http://b:2/"].into_iter();
        assert!(!c.read_by(2, peers()), "nobody answered yet");
        c.heard("http://a:1/", 2);
        c.heard("http://b:2", 1);
        assert!(!c.read_by(2, peers()), "b is of an older release");
        c.heard("http://b:2", 2);
        assert!(c.read_by(2, peers()));
        assert!(c.read_by(1, peers()));
        c.heard("http://a:1", 1);
        assert!(!c.read_by(2, peers()), "a came back on an older binary");
        assert!(c.read_by(2, std::iter::empty()), "a lone node reads its own");
    }
}

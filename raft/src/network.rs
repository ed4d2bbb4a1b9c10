//! Node-to-node transport: Raft RPCs and leader requests over HTTP, bodies in msgpack.
//!
//! One pooled client per node ([`flotilla_client::http::Http`]) carries everything
//! (keep-alive connections are reused across heartbeats and appends). Every request
//! carries the cluster token. Transport failures are reported to openraft as
//! `Unreachable`, so it backs off instead of spinning on a dead peer.
//!
//! An entry is encoded once: the leader writes an append from the bytes its log holds for
//! each entry ([`EntryBytes`]), byte for byte what encoding the request whole gives, and a
//! follower hands the bytes it received to its log, which writes them as the records
//! ([`decode_append`], `LogStore::offer_encoded`), instead of encoding each entry again per
//! follower and on every follower.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use flotilla_client::http::{header, Auth, Base, HeaderValue, Http, HttpError, Method, Uri};

use crate::codec::{decode, encode};
use crate::log_store::EntryBytes;
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
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    /// The request may or may not have reached the peer.
    #[error("request to {addr} failed: {message}")]
    Failed { addr: String, message: String },
}

/// The pooled HTTP client every node uses to reach its peers.
#[derive(Clone)]
pub struct PeerClient {
    http: Http,
    /// `Authorization: Bearer <cluster token>`, made once, or why it cannot be sent.
    auth: Auth,
    /// The log format each peer (by address) named in its last answer.
    formats: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    /// Each peer's address parsed once (parsing it for every append, as a URL with IDNA
    /// mapping of the host, was ~3 % of a leader's CPU under load).
    bases: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Base>>>,
}

impl PeerClient {
    pub fn new(token: Option<String>) -> Self {
        let http = Http::new(Duration::from_millis(500), Duration::from_secs(60), 32);
        let auth = Auth::new(token.as_deref());
        PeerClient { http, auth, formats: Default::default(), bases: Default::default() }
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
    fn url(&self, addr: &str, path: &str) -> Result<Uri, String> {
        let base = self.bases.lock().unwrap_or_else(|e| e.into_inner()).get(addr).cloned();
        let base = match base {
            Some(b) => b,
            None => {
                let b = Base::parse(addr)?;
                self.bases.lock().unwrap_or_else(|e| e.into_inner()).insert(addr.to_string(), b.clone());
                b
            }
        };
        base.uri(&format!("/{path}"))
    }

    /// POSTs `body` as msgpack to `addr/path` and decodes the msgpack answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let bytes = encode(body).map_err(|e| TransportError::Failed {
            addr: addr.to_string(),
            message: format!("encode: {e}"),
        })?;
        self.call_encoded(addr, path, bytes, timeout).await
    }

    /// [`PeerClient::call`] with the body already encoded.
    pub async fn call_encoded<Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        bytes: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let failed = |message: String| TransportError::Failed { addr: addr.to_string(), message };
        let uri = self.url(addr, path).map_err(|e| failed(format!("{addr}: not a URL: {e}")))?;
        let mut headers = self.auth.headers().map_err(failed)?;
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(MSGPACK));
        let answer =
            self.http.send(Method::POST, uri, headers, bytes.into(), timeout).await.map_err(|e| match e {
                HttpError::Connect(message) => TransportError::Connect { addr: addr.to_string(), message },
                e => failed(e.to_string()),
            })?;
        let format =
            answer.headers.get(LOG_FORMAT_HEADER).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1);
        self.heard(addr, format);
        let body = answer.body;
        if !(200..300).contains(&answer.status) {
            let text = String::from_utf8_lossy(&body);
            let status = answer.status;
            return Err(failed(format!("HTTP {status}: {}", text.chars().take(300).collect::<String>())));
        }
        decode(&body).map_err(|e| failed(format!("decode: {e}")))
    }
}

/// Builds one [`PeerNetwork`] per replication target.
pub struct NetworkFactory {
    pub client: PeerClient,
    /// The log's recent entries, encoded: appends are written from them.
    pub entries: EntryBytes,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerNetwork {
            client: self.client.clone(),
            target,
            addr: node.addr.clone(),
            entries: self.entries.clone(),
        }
    }
}

pub struct PeerNetwork {
    client: PeerClient,
    target: NodeId,
    addr: String,
    entries: EntryBytes,
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
        let body = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.rpc_encoded(path, body, option).await
    }

    async fn rpc_encoded<Resp, E>(
        &self,
        path: &str,
        body: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<NodeId, E>> =
            self.client.call_encoded(&self.addr, path, body, option.hard_ttl()).await.map_err(
                |e| match e {
                    TransportError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                    TransportError::Failed { .. } => RPCError::Network(NetworkError::new(&e)),
                },
            )?;
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
        let encoded = Some(&rpc.entries).filter(|e| !e.is_empty()).and_then(|e| self.entries.get(e));
        let body = match encoded {
            Some(entries) => encode_append(&rpc, &entries),
            None => encode(&rpc),
        }
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.rpc_encoded(paths::APPEND, body, &option).await
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

/// An append encoded as [`encode`] would encode it (a map of its named fields, in their
/// order), its entries written from their encodings (`entries[i]` is `rpc.entries[i]`'s).
fn encode_append(
    rpc: &AppendEntriesRequest<TypeConfig>,
    entries: &[bytes::Bytes],
) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    use rmp::encode::{write_array_len, write_map_len, write_str};
    fn field<T: Serialize>(out: &mut Vec<u8>, name: &str, value: &T) -> Result<(), rmp_serde::encode::Error> {
        write_str(out, name)?;
        rmp_serde::encode::write_named(out, value)
    }
    let mut out = Vec::with_capacity(96 + entries.iter().map(|e| e.len()).sum::<usize>());
    write_map_len(&mut out, 4)?;
    field(&mut out, "vote", &rpc.vote)?;
    field(&mut out, "prev_log_id", &rpc.prev_log_id)?;
    write_str(&mut out, "entries")?;
    write_array_len(&mut out, entries.len() as u32)?;
    for e in entries {
        out.extend_from_slice(e);
    }
    field(&mut out, "leader_commit", &rpc.leader_commit)?;
    Ok(out)
}

/// An append decoded, with each entry's bytes as the sender encoded it (`None` for a body
/// not laid out as [`encode_append`] writes it: it is decoded whole, as before).
pub(crate) fn decode_append(
    body: &[u8],
) -> Result<(AppendEntriesRequest<TypeConfig>, Option<Vec<bytes::Bytes>>), rmp_serde::decode::Error> {
    match decode_append_fields(body) {
        Some(decoded) => Ok(decoded),
        None => decode(body).map(|rpc| (rpc, None)),
    }
}

fn decode_append_fields(
    body: &[u8],
) -> Option<(AppendEntriesRequest<TypeConfig>, Option<Vec<bytes::Bytes>>)> {
    use rmp::decode::{read_array_len, read_map_len, read_str_len};
    fn value<T: DeserializeOwned>(rd: &mut &[u8]) -> Option<T> {
        T::deserialize(&mut rmp_serde::Deserializer::new(rd)).ok()
    }
    let mut rd = body;
    let (mut vote, mut prev_log_id, mut leader_commit, mut entries) = (None, None, None, None);
    for _ in 0..read_map_len(&mut rd).ok()? {
        let len = read_str_len(&mut rd).ok()? as usize;
        let name = rd.get(..len)?;
        rd = &rd[len..];
        match name {
            b"vote" => vote = Some(value(&mut rd)?),
            b"prev_log_id" => prev_log_id = Some(value(&mut rd)?),
            b"leader_commit" => leader_commit = Some(value(&mut rd)?),
            b"entries" => {
                let n = read_array_len(&mut rd).ok()? as usize;
                let (mut decoded, mut encoded) =
                    (Vec::with_capacity(n.min(4096)), Vec::with_capacity(n.min(4096)));
                for _ in 0..n {
                    let start = rd;
                    decoded.push(value::<crate::Entry>(&mut rd)?);
                    encoded.push(bytes::Bytes::copy_from_slice(&start[..start.len() - rd.len()]));
                }
                entries = Some((decoded, encoded));
            }
            _ => return None,
        }
    }
    let (entries, encoded) = entries?;
    if !rd.is_empty() {
        return None;
    }
    let rpc = AppendEntriesRequest {
        vote: vote?,
        prev_log_id: prev_log_id?,
        entries,
        leader_commit: leader_commit?,
    };
    Some((rpc, Some(encoded)))
}

#[cfg(test)]
mod tests {
    use super::PeerClient;

    #[test]
    fn a_route_goes_under_the_peer_address_as_appending_it_would() {
        let c = PeerClient::new(None);
        for addr in ["http://127.0.0.1:7001", "http://127.0.0.1:7001/", "https://node-b.example:443/base"] {
            for path in [super::paths::APPEND, super::paths::LEADER] {
                let want = format!("{}/{}", addr.trim_end_matches('/'), path);
                assert_eq!(c.url(addr, path).unwrap().to_string(), want, "{addr} + {path}");
                assert_eq!(
                    c.url(addr, path).unwrap().to_string(),
                    want,
                    "{addr} + {path}: from the cached base"
                );
            }
        }
        assert!(c.url("not a url", super::paths::APPEND).is_err());
    }

    /// An append written from its entries' encodings is byte for byte what encoding the
    /// request gives (what older nodes send, and what every node decodes).
    #[test]
    fn an_append_written_from_encoded_entries_is_the_encoded_append() {
        use super::{encode, encode_append, AppendEntriesRequest};
        use crate::{Entry, Node, TypeConfig};
        use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, Vote};
        use std::collections::{BTreeMap, BTreeSet};
        use std::sync::Arc;
        let at = |term, index| LogId::new(CommittedLeaderId::new(term, 1), index);
        let members = BTreeMap::from([(1, Node::new("http://127.0.0.1:7001")), (2, Node::new("http://b:2"))]);
        let entries = vec![
            Entry { log_id: at(3, 7), payload: EntryPayload::Blank },
            Entry {
                log_id: at(3, 8),
                payload: EntryPayload::Normal(Arc::new(flotilla_store::command::Command::KvPut {
                    key: "k/ü".into(),
                    value: "v".repeat(70_000),
                    prev_revision: Some(2),
                })),
            },
            Entry {
                log_id: at(3, 9),
                payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1, 2])], members)),
            },
        ];
        let many: Vec<Entry> =
            (10..80).map(|i| Entry { log_id: at(3, i), payload: EntryPayload::Blank }).collect();
        for (vote, prev, commit, entries) in [
            (Vote::new_committed(3, 1), Some(at(2, 6)), Some(at(2, 5)), entries.clone()),
            (Vote::new(4, 2), None, None, entries[1..2].to_vec()),
            (Vote::new_committed(3, 1), Some(at(3, 9)), Some(at(3, 9)), many),
            (Vote::new_committed(3, 1), Some(at(3, 9)), None, Vec::new()),
        ] {
            let rpc = AppendEntriesRequest::<TypeConfig> {
                vote,
                prev_log_id: prev,
                entries,
                leader_commit: commit,
            };
            let encoded: Vec<bytes::Bytes> = rpc.entries.iter().map(|e| encode(e).unwrap().into()).collect();
            let body = encode_append(&rpc, &encoded).unwrap();
            assert_eq!(body, encode(&rpc).unwrap());
            // The receiving end gets the same request back, and each entry's own bytes.
            let (back, raw) = super::decode_append(&body).unwrap();
            assert_eq!(encode(&back).unwrap(), body);
            assert_eq!(raw.expect("laid out as written"), encoded);
        }
        // Another layout (an array, as an unnamed encoding would be) is decoded whole, and
        // a malformed body is refused as before.
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: None,
            entries: entries.clone(),
            leader_commit: None,
        };
        let unnamed = rmp_serde::to_vec(&rpc).unwrap();
        let (back, raw) = super::decode_append(&unnamed).unwrap();
        assert!(raw.is_none());
        assert_eq!(encode(&back).unwrap(), encode(&rpc).unwrap());
        let body = encode(&rpc).unwrap();
        for cut in [1, body.len() / 2, body.len() - 1] {
            assert!(super::decode_append(&body[..cut]).is_err(), "cut at {cut}");
        }
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

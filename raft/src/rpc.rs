//! The receiving side of node-to-node Raft RPCs: msgpack in, msgpack out. The API crate
//! mounts these on `/raft/*` behind the cluster token; this module owns the encoding so
//! that both ends of the wire live in one crate.

use crate::codec::{decode, encode};
use crate::node::LeaderRequest;
use crate::{NodeError, NodeId, RaftNode};
use openraft::raft::VoteRequest;

#[derive(Clone, Copy, Debug)]
pub enum RpcKind {
    Append,
    Vote,
    Snapshot,
    Leader,
    Elect,
}

/// The body could not be decoded: a 400 for the caller.
#[derive(Debug, thiserror::Error)]
#[error("malformed raft RPC body: {0}")]
pub struct MalformedRpc(String);

/// Handles one RPC body and returns the encoded `Result` to send back.
pub async fn handle(node: &RaftNode, kind: RpcKind, body: &[u8]) -> Result<Vec<u8>, MalformedRpc> {
    let bad = |e: rmp_serde::decode::Error| MalformedRpc(e.to_string());
    let encoded = match kind {
        RpcKind::Append => {
            node.contact.heard_from_leader();
            let (req, encoded) = crate::network::decode_append(body).map_err(bad)?;
            if let Some(encoded) = encoded.filter(|e| !e.is_empty()) {
                node.log.offer_encoded(&req.entries, encoded);
            }
            encode(&node.raft.append_entries(req).await)
        }
        RpcKind::Vote => {
            let req: VoteRequest<NodeId> = decode(body).map_err(bad)?;
            let resp = node.raft.vote(req.clone()).await;
            if let Ok(r) = &resp {
                node.after_vote(&req, r);
            }
            encode(&resp)
        }
        RpcKind::Snapshot => encode(&node.raft.install_snapshot(decode(body).map_err(bad)?).await),
        RpcKind::Leader => {
            let req: LeaderRequest = decode(body).map_err(bad)?;
            encode(&node.handle_leader_request(req).await)
        }
        RpcKind::Elect => {
            let () = decode(body).map_err(bad)?;
            encode(&node.campaign().await)
        }
    };
    Ok(encoded.unwrap_or_else(|e| {
        let err: Result<(), NodeError> = Err(NodeError::internal("encoding an RPC response", e));
        encode(&err).unwrap_or_default()
    }))
}

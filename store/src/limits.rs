//! Every bound of the system in one place (TigerBeetle style): a request, a key or a list
//! that crosses one of these is refused at the boundary with a 4xx, never half-processed.

/// Longest coordination key, in bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest coordination value, in bytes of UTF-8.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most items one `GET /api/v1/kv?prefix=` may return.
pub const MAX_LIST_LIMIT: usize = 1000;
/// Items returned by a list when the client names no limit.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Largest body accepted on the public API routes.
pub const MAX_API_BODY_BYTES: u64 = 1024 * 1024;
/// Largest body accepted on the node-to-node Raft routes (append batches, snapshot chunks).
pub const MAX_RAFT_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Most nodes a cluster may have (voters and learners together).
pub const MAX_CLUSTER_NODES: usize = 15;
/// Longest node address (`http://host:port`).
pub const MAX_NODE_ADDR_BYTES: usize = 256;
/// Longest task, run or executor name (and group path component), in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest group path, image name or cache group, in bytes.
pub const MAX_GROUP_BYTES: usize = 512;
/// Most entries in one annotations, environment or labels map.
pub const MAX_MAP_ENTRIES: usize = 256;
/// Longest value in such a map (also a step command, a setup error), in bytes.
pub const MAX_MAP_VALUE_BYTES: usize = 16 * 1024;
/// Most tasks in one run.
pub const MAX_TASKS_PER_RUN: usize = 500;
/// Most steps in one task.
pub const MAX_STEPS_PER_TASK: usize = 100;
/// Most setup errors a run may be created with.
pub const MAX_SETUP_ERRORS: usize = 100;
/// Highest `approvers_required`.
pub const MAX_APPROVERS_REQUIRED: u32 = 100;
/// Most archs one executor may declare.
pub const MAX_ARCHS: usize = 16;
/// Most executors registered at once.
pub const MAX_EXECUTORS: usize = 10_000;
/// Longest an executor's task long-poll may wait, in milliseconds.
pub const MAX_LONG_POLL_MS: u64 = 60_000;
/// Events buffered per server-sent-events subscriber before it is cut off as too slow.
pub const EVENT_BUFFER: usize = 4096;
/// Most event streams one node serves at once (more get 503).
pub const MAX_EVENT_SUBSCRIBERS: usize = 256;

/// Largest workspace archive or cache an executor may upload.
pub const MAX_ARCHIVE_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// zstd level of workspace archives and caches. Measured on a 6 MB source tree (gzip's
/// unpacked sources) and a 100 MB build tree: see `scripts/archive-timing.sh`; level 3
/// (zstd's default) is the knee of size against save time.
pub const ARCHIVE_ZSTD_LEVEL: i32 = 3;
/// Largest log of one step; an executor truncates beyond it.
pub const MAX_LOG_BYTES: u64 = 64 * 1024 * 1024;
/// Largest export accepted by an import (it travels as one Raft entry, under
/// `MAX_RAFT_BODY_BYTES`).
pub const MAX_IMPORT_BYTES: u64 = 48 * 1024 * 1024;

/// Most containers in one task's pod (the steps' container and its services): each is a
/// process tree on the executor host started before the first step.
pub const MAX_CONTAINERS_PER_TASK: usize = 16;
/// Most volumes of one container.
pub const MAX_VOLUMES_PER_CONTAINER: usize = 16;
/// Most registries in one `docker_registries_auth` map.
pub const MAX_REGISTRIES_AUTH: usize = 32;
/// Longest `timeout_s` a task may ask for: a week, longer than any CI job should hang.
pub const MAX_TASK_TIMEOUT_S: u64 = 7 * 24 * 3600;
/// How long after a task's `timeout_s` the leader's scheduler fails it itself. The
/// executor enforces the deadline first (and records `timeout` on the step it stopped);
/// the scheduler's later deadline only catches an executor that cannot report (partitioned,
/// hung), so the two never race on a healthy executor.
pub const TASK_TIMEOUT_GRACE_MS: u64 = 15_000;
/// How long an executor waits for a service container's log to be read and stored when
/// the task ends; a slower store loses that log, not the task's outcome.
pub const SERVICE_LOG_WAIT_MS: u64 = 10_000;
// --- Hostile clients (issue 25). A client holding a token is trusted with its requests,
// not with the node's memory or connections: these bound what one may hold.

/// Bodies larger than this (or of unknown length) are read only with one of the permits
/// below: small requests never wait, large ones cannot pile up in memory.
pub const LARGE_BODY_BYTES: u64 = 64 * 1024;
/// Large API bodies read at once on one node (4 x 48 MiB imports at most in memory).
pub const MAX_LARGE_API_BODIES: usize = 4;
/// Large Raft bodies read at once (a pool of its own, so API clients cannot hold up
/// replication); a node has at most a few peers sending to it.
pub const MAX_LARGE_RAFT_BODIES: usize = 8;
/// How long a large body waits for a permit before the request gets a 503.
pub const BODY_PERMIT_WAIT_MS: u64 = 5_000;
/// A request whose headers have not all arrived after this long is dropped (hyper closes
/// the connection): a trickle of header bytes cannot hold a connection, and neither can
/// an idle keep-alive connection (hyper's own default, which warp leaves off; the typed
/// client drops idle connections sooner, so it never reuses one being closed).
pub const HEADER_READ_TIMEOUT_MS: u64 = 30_000;
/// A body that sends nothing for this long is refused (408): a stalled upload gives its
/// permit and connection back. Also the longest pause between two chunks of a streamed
/// archive upload.
pub const BODY_IDLE_TIMEOUT_MS: u64 = 10_000;
/// Longest a whole buffered body may take (64 MiB at 1 MiB/s): a trickle below the idle
/// timeout still ends.
pub const BODY_READ_TIMEOUT_MS: u64 = 60_000;
/// Open connections one node serves (HTTP/1 keep-alive clients, executors, peers, event
/// streams); above it new connections are closed at once and a warning is logged.
pub const MAX_CONNECTIONS: usize = 4096;
/// An idle event stream sends a comment this often; a write to a departed client fails
/// and frees its slot even when nothing else is sent.
pub const EVENT_KEEPALIVE_MS: u64 = 2_000;

// --- Fields of a run definition (issue 25): each bounded well inside the 1 MiB body, so
// no single field can make a run's stored configuration or an executor's Docker call
// large. Names, maps, commands and counts of tasks/steps are bounded above.

/// Longest path in a task (working_dir, shell, workspace and cache directories, one
/// glob of `paths`): Linux's PATH_MAX is 4096; 1 KiB is far past any real path.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest `user` (`name`, `uid:gid`): Linux user names are at most 32 bytes.
pub const MAX_USER_BYTES: usize = 256;
/// Longest cache key or key template.
pub const MAX_CACHE_KEY_BYTES: usize = 512;
/// Most keys one `restore_cache` tries (each is one lookup in the object storage).
pub const MAX_RESTORE_CACHE_KEYS: usize = 16;
/// Most `contents` entries of one `save_to_workspace`/`save_cache` step.
pub const MAX_SAVE_CONTENTS: usize = 32;
/// Most globs in one `contents` entry's `paths`.
pub const MAX_PATHS_PER_CONTENT: usize = 128;
/// Most conditions of one dependency (there are three kinds).
pub const MAX_CONDITIONS: usize = 3;
/// Highest `max_running_in_group` a run may ask for: more is the same as no limit, and a
/// bound keeps the scheduler's count of older running runs short.
pub const MAX_RUNNING_IN_GROUP: u32 = 10_000;
/// Longest `Idempotency-Key` header, in bytes: room for a UUID or a hash with a prefix,
/// and a bound on what the replicated state keeps per key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// How long an idempotency key is remembered (24 h, as Stripe and the IETF draft do): a
/// retry within it finds the first run.
pub const IDEMPOTENCY_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Most idempotency keys remembered at once (about 200 bytes each in every replica's
/// memory and snapshot: 20 MB at most). Past it the oldest keys are forgotten before
/// their 24 h: refusing creates would hurt a busy CI more than an early expiry, and the
/// retries that matter come seconds after the first attempt, not 100,000 creates later.
pub const MAX_IDEMPOTENCY_KEYS: usize = 100_000;
/// How often the leader proposes pruning the expired idempotency keys.
pub const IDEMPOTENCY_PRUNE_INTERVAL_MS: u64 = 60 * 1000;
/// How long the typed client (and the CLI) keeps retrying a request that may be retried
/// (an idempotent create, `run wait`) on transport errors and 503, across every server
/// given: long enough for a few elections (each about a second) and a node restart.
pub const CLIENT_RETRY_BUDGET_MS: u64 = 30_000;
/// Pause before a retry; it grows with each full pass over the servers, up to 6 times.
pub const CLIENT_RETRY_BACKOFF_MS: u64 = 100;
/// `run wait` without `--timeout-s` gives up (exit 3) once no server answered for this long.
pub const WAIT_UNREACHABLE_GIVE_UP_MS: u64 = 60_000;

// --- Readiness.

/// `/readyz` counts a node as caught up while its applied index is within this many
/// entries of its commit index. Under write load the applier always trails the commit by
/// a few entries: requiring equality made a busy node flap between ready and not ready
/// (found by schemathesis); a node replaying a long log after a restart is far behind.
pub const READY_APPLY_LAG: u64 = 64;

// --- Tokens, CORS and the dashboard.

/// Most tokens in one file (each presented token is compared with all of them).
pub const MAX_TOKENS: usize = 1024;
/// Longest token name (it is recorded on approvals and events).
pub const MAX_TOKEN_NAME_BYTES: usize = 64;
/// Most allowed origins (each is compared on every cross-origin request).
pub const MAX_ALLOWED_ORIGINS: usize = 64;
/// Longest label kept for an unnamed run step's command (a label, not the script).
pub const MAX_STEP_LABEL_CHARS: usize = 80;

// --- Raft: the leader's group commit.

/// The most encoded bytes one proposal batch carries (a single larger command goes alone).
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// The most commands one `Command::Batch` carries.
pub const MAX_BATCH_COMMANDS: usize = 512;

// --- Object storage and the archive.

/// Longest object storage key, in bytes: room for a base path under S3's 1024-byte limit
/// on full keys. (Not `MAX_KEY_BYTES`, which bounds the coordination keys of the kv API.)
pub const MAX_OBJECT_KEY_BYTES: usize = 768;
/// Longest object storage base path, in bytes.
pub const MAX_BASE_BYTES: usize = 255;
/// Most keys one object storage list call returns.
pub const MAX_LIST_PAGE: usize = 10_000;
/// Longest cache key once its template is evaluated (it becomes part of an object storage
/// key; the template itself may be up to `MAX_CACHE_KEY_BYTES`).
pub const MAX_EVALUATED_CACHE_KEY_BYTES: usize = 200;
/// Most runs one archive command moves.
pub const MAX_ARCHIVE_BATCH: usize = 20_000;

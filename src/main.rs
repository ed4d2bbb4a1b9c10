//! The `flotilla` binary: a thin command line over the crates. Servers are assembled in
//! `flotilla_api::server`; client commands go through `flotilla_api::Client`.
//!
//! Exit codes: 0 ok, 1 request refused or failed (message on stderr), 2 usage error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use flotilla_api::server::{serve_node, ServerConfig};
use flotilla_api::types::ClusterStatus;
use flotilla_api::{Client, ClientError};
use flotilla_raft::NodeConfig;
use flotilla_store::defaults;

mod config_file;
mod run_cmd;
mod run_view;
mod wait_cmd;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "A self-contained run scheduler: Raft-replicated servers, Docker executors."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// A TOML file of flag values (`flotilla config example` prints one); flags and
    /// environment variables win over it.
    #[arg(long, global = true, env = "FLOTILLA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// CA certificates (PEM) trusted for https:// servers, besides the system's roots.
    #[arg(long, global = true, env = "FLOTILLA_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Clone)]
struct ClientArgs {
    /// Any server node's URL.
    #[arg(long, global = true, env = "FLOTILLA_SERVER", default_value = "http://127.0.0.1:7700")]
    server: String,
    /// File holding the API token (the FLOTILLA_TOKEN variable may hold the token itself).
    #[arg(long, global = true, env = "FLOTILLA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

/// HTTPS on a listener. A node also shows its certificate to its peers (mTLS), so a
/// node certificate should allow both server and client authentication.
#[derive(clap::Args, Clone, Default)]
struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM, leaf first).
    #[arg(long, env = "FLOTILLA_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "FLOTILLA_TLS_KEY", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Ask clients for certificates signed by this CA (PEM); `/raft/*` then refuses
    /// connections without one (only nodes can join or append).
    #[arg(long, env = "FLOTILLA_TLS_CLIENT_CA", value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn files(&self) -> flotilla_api::tls::TlsFiles {
        flotilla_api::tls::TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: self.tls_client_ca.clone(),
        }
    }

    /// The listener's TLS, checked before anything starts (a bad file: exit 2).
    fn server(&self) -> Result<Option<flotilla_api::tls::ServerTls>, Failure> {
        flotilla_api::tls::ServerTls::load(&self.files()).map_err(Failure::Usage)
    }

    fn scheme(&self) -> &'static str {
        if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Who may call a node: named tokens, and browsers of other origins.
#[derive(clap::Args, Clone, Default)]
struct AccessArgs {
    /// Named tokens with roles (TOML: `[[token]] name, role, sha256|secret`; see
    /// docs/security.md). Re-read on SIGHUP, with the single-token files.
    #[arg(long, env = "FLOTILLA_TOKENS_FILE", value_name = "TOML")]
    tokens_file: Option<PathBuf>,
    /// Origins whose pages may call the API from a browser (CORS), comma separated,
    /// `scheme://host[:port]`; `*` only if given literally. Default: none.
    #[arg(long, env = "FLOTILLA_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
}

impl AccessArgs {
    fn cors(&self) -> Result<flotilla_api::cors::Cors, Failure> {
        flotilla_api::cors::Cors::parse(&self.allowed_origins).map_err(Failure::Usage)
    }
}

#[derive(clap::Args)]
struct RaftTuning {
    /// Raft heartbeat interval; every AppendEntries call must finish within it.
    #[arg(long, env = "FLOTILLA_HEARTBEAT_MS", default_value_t = defaults::HEARTBEAT_MS)]
    heartbeat_ms: u64,
    /// Minimum election timeout (the maximum is 1.5 times this; a follower campaigns after
    /// the maximum plus its own random timeout without hearing from the leader).
    #[arg(long, env = "FLOTILLA_ELECTION_TIMEOUT_MS", default_value_t = defaults::ELECTION_TIMEOUT_MS)]
    election_timeout_ms: u64,
    /// Build a snapshot every this many log entries.
    #[arg(long, env = "FLOTILLA_SNAPSHOT_LOGS", default_value_t = defaults::SNAPSHOT_LOGS)]
    snapshot_logs: u64,
    /// Log entries kept behind the last snapshot for slow followers.
    #[arg(long, env = "FLOTILLA_MAX_LOGS_KEEP", default_value_t = defaults::MAX_LOGS_KEEP)]
    max_logs_keep: u64,
    /// A write or linearizable read that cannot complete within this answers 503
    /// `unavailable` (whether a write was applied is then unknown).
    #[arg(long, env = "FLOTILLA_REQUEST_TIMEOUT_MS", default_value_t = defaults::REQUEST_TIMEOUT_MS)]
    request_timeout_ms: u64,
}

#[derive(clap::Args)]
struct SchedulerTuning {
    /// An executor silent for this long gets no new tasks; a dynamic one is removed.
    #[arg(long, env = "FLOTILLA_EXECUTOR_TIMEOUT_MS", default_value_t = defaults::EXECUTOR_TIMEOUT_MS)]
    executor_timeout_ms: u64,
}

impl SchedulerTuning {
    fn config(&self) -> flotilla_scheduler::SchedulerConfig {
        let mut cfg = flotilla_scheduler::SchedulerConfig::default();
        cfg.settings.executor_timeout_ms = self.executor_timeout_ms;
        cfg
    }
}

#[derive(clap::Args)]
struct OstArgs {
    /// Object storage for logs, archives and caches: file:///abs/path (default
    /// <data-dir>/ost) or s3://BUCKET/BASE?endpoint=URL&region=R&path_style=true
    /// (credentials from the AWS environment variables or profile).
    #[arg(long, env = "FLOTILLA_OST")]
    ost: Option<String>,
    /// Period of the object-storage garbage collector (runs on the leader).
    #[arg(long, env = "FLOTILLA_OST_GC_INTERVAL_S", default_value_t = defaults::OST_GC_INTERVAL_S)]
    ost_gc_interval_s: u64,
    /// Unreferenced logs and archives younger than this are kept.
    #[arg(long, env = "FLOTILLA_OST_GC_GRACE_S", default_value_t = defaults::OST_GC_GRACE_S)]
    ost_gc_grace_s: u64,
    /// Caches older than this are deleted.
    #[arg(long, env = "FLOTILLA_CACHE_MAX_AGE_S", default_value_t = defaults::CACHE_MAX_AGE_S)]
    cache_max_age_s: u64,
    /// Runs finished for this long move from the replicated state to the archive in the ost.
    #[arg(long, env = "FLOTILLA_ARCHIVE_AFTER_S", default_value_t = defaults::ARCHIVE_AFTER_S)]
    archive_after_s: u64,
    /// Period of an archive round (runs on the leader).
    #[arg(long, env = "FLOTILLA_ARCHIVE_INTERVAL_MS", default_value_t = defaults::ARCHIVE_INTERVAL_MS)]
    archive_interval_ms: u64,
    /// Size bound of an archive data file.
    #[arg(long, env = "FLOTILLA_ARCHIVE_MAX_FILE_BYTES", default_value_t = defaults::ARCHIVE_MAX_FILE_BYTES)]
    archive_max_file_bytes: u64,
    /// Period of the full run index dump to the ost (0: only on demand).
    #[arg(long, env = "FLOTILLA_INDEX_DUMP_INTERVAL_S", default_value_t = defaults::INDEX_DUMP_INTERVAL_S)]
    index_dump_interval_s: u64,
}

impl OstArgs {
    fn archive(&self) -> flotilla_scheduler::archive::ArchiveConfig {
        flotilla_scheduler::archive::ArchiveConfig {
            interval_ms: self.archive_interval_ms.max(50),
            after_ms: self.archive_after_s * 1000,
            max_file_bytes: self.archive_max_file_bytes.max(4096),
            batch: defaults::ARCHIVE_BATCH,
            index_interval_ms: self.index_dump_interval_s * 1000,
        }
    }

    fn gc(&self) -> flotilla_scheduler::gc::GcConfig {
        flotilla_scheduler::gc::GcConfig {
            interval_ms: self.ost_gc_interval_s.max(1) * 1000,
            grace_ms: self.ost_gc_grace_s * 1000,
            cache_max_age_ms: self.cache_max_age_s * 1000,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a server node: Raft member, REST API and (when leader) the scheduler.
    Server {
        #[arg(long, env = "FLOTILLA_ID")]
        id: u64,
        #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:7700")]
        listen: SocketAddr,
        #[arg(long, env = "FLOTILLA_DATA_DIR")]
        data_dir: PathBuf,
        /// URL other nodes and clients reach this node at (default http://LISTEN).
        #[arg(long, env = "FLOTILLA_ADVERTISE")]
        advertise: Option<String>,
        /// API token file. Without one, only a loopback listener is allowed.
        #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Token file for Raft RPC between nodes (default: --token-file).
        #[arg(long, env = "FLOTILLA_CLUSTER_TOKEN_FILE")]
        cluster_token_file: Option<PathBuf>,
        /// Token file for the executor routes (default: --token-file).
        #[arg(long, env = "FLOTILLA_EXECUTOR_TOKEN_FILE")]
        executor_token_file: Option<PathBuf>,
        /// Open connections served at once; more are closed at once, with a warning.
        #[arg(long, env = "FLOTILLA_MAX_CONNECTIONS", default_value_t = flotilla_store::limits::MAX_CONNECTIONS)]
        max_connections: usize,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        access: AccessArgs,
        #[command(flatten)]
        tuning: RaftTuning,
        #[command(flatten)]
        scheduler: SchedulerTuning,
        #[command(flatten)]
        ost: OstArgs,
    },
    /// One-process development setup: a self-initialised single-node cluster.
    Dev {
        #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "./.flotilla")]
        data_dir: PathBuf,
        #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:7700")]
        listen: SocketAddr,
        #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        access: AccessArgs,
        #[command(flatten)]
        scheduler: SchedulerTuning,
        #[command(flatten)]
        ost: OstArgs,
    },
    /// An executor agent on a Docker host: runs tasks in containers, reports to the servers.
    Executor {
        #[arg(long, env = "FLOTILLA_EXECUTOR_ID")]
        id: String,
        /// Server URLs, comma separated (any node; requests move on to the next on failure).
        #[arg(long, env = "FLOTILLA_SERVERS", value_delimiter = ',', required = true)]
        servers: Vec<String>,
        /// Health endpoint of this agent.
        #[arg(long, env = "FLOTILLA_LISTEN", default_value = "127.0.0.1:7800")]
        listen: SocketAddr,
        /// Executors of one group on one Docker host are siblings.
        #[arg(long, env = "FLOTILLA_GROUP")]
        group: Option<String>,
        /// Architectures this executor takes tasks for (default: the Docker host's).
        #[arg(long = "arch", env = "FLOTILLA_ARCH", value_delimiter = ',')]
        archs: Vec<String>,
        /// Most tasks at once (0: no limit).
        #[arg(long, env = "FLOTILLA_ACTIVE_TASKS_LIMIT", default_value_t = 0)]
        active_tasks_limit: u32,
        /// Accept tasks asking for privileged containers.
        #[arg(long, env = "FLOTILLA_ALLOW_PRIVILEGED")]
        allow_privileged: bool,
        /// Removed automatically when it stops heartbeating (siblings clean its containers).
        #[arg(long, env = "FLOTILLA_DYNAMIC")]
        dynamic: bool,
        /// Local logs and temporary archives.
        #[arg(long, env = "FLOTILLA_WORK_DIR", default_value = "./.flotilla-executor")]
        work_dir: PathBuf,
        /// The executor token (the servers' --executor-token-file).
        #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Give up pulling a missing image after this long.
        #[arg(long, env = "FLOTILLA_PULL_TIMEOUT_S", default_value_t = 60)]
        pull_timeout_s: u64,
        /// On SIGTERM, how long running tasks may go on to finish before they are stopped
        /// (no new task starts meanwhile); then the executor exits 0.
        #[arg(long, env = "FLOTILLA_DRAIN_TIMEOUT_S", default_value_t = flotilla_executor::DEFAULT_DRAIN_TIMEOUT_S)]
        drain_timeout_s: u64,
        /// Keep started containers of IMAGE ready for tasks (repeatable, or comma
        /// separated): a task whose pod is one plain container of it starts without
        /// Docker's create and start. Missing images are pulled without credentials.
        #[arg(
            long = "warm-image",
            value_name = "IMAGE",
            env = "FLOTILLA_WARM_IMAGES",
            value_delimiter = ','
        )]
        warm_images: Vec<String>,
        /// How many containers each --warm-image keeps ready.
        #[arg(long, env = "FLOTILLA_WARM_PER_IMAGE", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..=flotilla_executor::warm::MAX_PER_IMAGE as i64))]
        warm_per_image: u16,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Runs: create, list, show, logs, stop, approve, wait.
    Run {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: run_cmd::RunCmd,
    },
    /// Cluster bootstrap and membership.
    Cluster {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// The coordination key/value store.
    Kv {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: KvCmd,
    },
    /// Write an export of the whole replicated state to a file.
    Export {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Replace the whole state with an export (the cluster must be in maintenance).
    Import {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(short = 'i', long = "input")]
        input: PathBuf,
    },
    /// Maintenance mode.
    Maintenance {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: MaintenanceCmd,
    },
    /// Probe a node: exit 0 if it is alive (`/healthz`), or with `--ready` if it can serve
    /// linearizable requests (`/readyz`); 1 otherwise. Made for container health checks
    /// (the image has no shell and no curl).
    Health {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        ready: bool,
    },
    /// Configuration files (`--config FILE`).
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Print a shell completion script: `flotilla completions bash > /etc/bash_completion.d/flotilla`.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print a configuration file with every flag of the server, dev, executor and client
    /// commands, its help and its default (all commented out).
    Example,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Bootstrap a new cluster from these nodes (ID=URL, repeatable).
    Init {
        #[arg(long = "node", value_parser = parse_node, required = true)]
        nodes: Vec<(u64, String)>,
        /// Wait up to this long for every node to answer before giving up (0: no wait),
        /// for when nodes start together (compose, systemd).
        #[arg(long, default_value_t = 0)]
        wait_s: u64,
        /// Succeed without changing anything when the cluster is already initialised with
        /// exactly these nodes (a re-run of a deployment's init step).
        #[arg(long)]
        if_needed: bool,
    },
    /// Leader, term, commit index, members and replication lag.
    Status {
        /// This node's own view, without asking the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Add a node as a learner; waits for the change to commit.
    AddLearner {
        #[arg(long = "node", value_parser = parse_node)]
        node: (u64, String),
    },
    /// Make a learner a voter.
    Promote { id: u64 },
    /// Remove a voter or learner from the cluster.
    Remove { id: u64 },
}

#[derive(Subcommand)]
enum KvCmd {
    Get {
        key: String,
        #[arg(long)]
        stale: bool,
    },
    Put {
        key: String,
        value: String,
        /// Only if the key's revision is this (0: only if it does not exist).
        #[arg(long)]
        prev_revision: Option<u64>,
    },
    Del {
        key: String,
        #[arg(long)]
        prev_revision: Option<u64>,
    },
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        start_after: Option<String>,
    },
}

#[derive(Subcommand)]
enum MaintenanceCmd {
    Enable,
    Disable,
    Status,
}

fn parse_node(s: &str) -> Result<(u64, String), String> {
    let (id, url) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ID=URL"))?;
    let id = id.trim().parse().map_err(|_| format!("{id:?} is not a node id"))?;
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("{url:?} is not an http(s):// URL"));
    }
    Ok((id, url.trim_end_matches('/').to_string()))
}

/// A failure the CLI reports: exit 1 for a refused or failed request, 2 for bad usage.
pub(crate) enum Failure {
    Refused(String),
    Usage(String),
    /// Exit 1 with nothing more to say (the output already said it).
    Quiet,
    /// Exit 3: gave up waiting (a timeout, or no server reachable), outcome unknown.
    Timeout(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Refused(e.to_string())
    }
}

fn read_token(path: &Option<PathBuf>) -> Result<Option<String>, Failure> {
    path.as_deref().map(flotilla_api::auth::read_secret).transpose().map_err(Failure::Usage)
}

fn client(args: &ClientArgs) -> Result<Client, Failure> {
    let token = match read_token(&args.token_file)? {
        Some(t) => Some(t),
        None => std::env::var("FLOTILLA_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    Ok(Client::new(&args.server, token))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // warp reports every client that hangs up mid-connection (a CLI exiting, a
        // follower dropping an event stream) as an ERROR; it is the client's business.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,warp::server=off"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process (and anything it starts). mimalloc asks
/// for them on its arenas (`madvise(MADV_HUGEPAGE)`), and a huge page is resident whole
/// once any byte of it is touched: an idle node held 45 MiB of them for 4 MiB of heap, a
/// leader after 100,000 archived runs 141 MiB instead of 100; and where free memory is
/// fragmented the kernel compacts it to make them, on the allocating thread
/// (docs/benchmarks.md, "Transparent huge pages"). Set before anything big is allocated:
/// the flag holds for every later page fault.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("warning: could not turn transparent huge pages off: {e}");
    }
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut command = Cli::command();
    if let Some(path) = config_file::path_from(&args) {
        command = match config_file::apply(command, &path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
    }
    let matches = command.get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Every HTTP client of this process trusts --tls-ca; a node (and an executor with a
    // certificate) shows its own certificate to the servers it calls (mTLS).
    let identity = match &cli.command {
        Cmd::Server { tls, .. } | Cmd::Dev { tls, .. } | Cmd::Executor { tls, .. } => {
            tls.tls_cert.clone().zip(tls.tls_key.clone())
        }
        _ => None,
    };
    if let Err(e) = flotilla_raft::tls::configure(
        cli.tls_ca.as_deref(),
        identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    ) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Quiet) => ExitCode::from(1),
        Err(Failure::Timeout(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(3)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Cmd::Config { command: ConfigCmd::Example } => {
            print!("{}", config_file::example(&Cli::command()));
            Ok(())
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "flotilla", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Server {
            id,
            listen,
            data_dir,
            advertise,
            token_file,
            cluster_token_file,
            executor_token_file,
            max_connections,
            tls,
            access,
            tuning,
            scheduler,
            ost,
        } => {
            init_logging(cli.log_format);
            let server_tls = tls.server()?;
            let cors = access.cors()?;
            let tokens = flotilla_api::auth::TokenFiles {
                tokens_file: access.tokens_file.clone(),
                admin: token_file.clone(),
                // Without their own files, executors and peers use the admin token.
                executor: executor_token_file.clone(),
                cluster: cluster_token_file.clone(),
            };
            let loaded = tokens.load().map_err(Failure::Usage)?;
            // What this node sends to its peers: the cluster token, else the admin token.
            let cluster_token = match cluster_token_file.as_ref().or(token_file.as_ref()) {
                Some(p) => Some(flotilla_api::auth::read_secret(p).map_err(Failure::Usage)?),
                None if !loaded.is_open() => {
                    return Err(Failure::Usage(
                        "with --tokens-file, give --cluster-token-file (or --token-file): the secret this node sends to its peers".into(),
                    ))
                }
                None => None,
            };
            require_token_off_loopback(listen, !loaded.is_open())?;
            let mut cfg = NodeConfig::new(id, data_dir);
            cfg.cluster_token = cluster_token.clone();
            cfg.heartbeat_ms = tuning.heartbeat_ms;
            cfg.election_timeout_min_ms = tuning.election_timeout_ms;
            cfg.election_timeout_max_ms = defaults::election_timeout_max_ms(tuning.election_timeout_ms);
            cfg.snapshot_logs = tuning.snapshot_logs;
            cfg.max_logs_keep = tuning.max_logs_keep;
            cfg.request_timeout_ms = tuning.request_timeout_ms;
            let advertise = advertise.unwrap_or_else(|| format!("{}://{listen}", tls.scheme()));
            let server_cfg = ServerConfig {
                tokens,
                cors,
                scheduler: scheduler.config(),
                gc: ost.gc(),
                archive: ost.archive(),
                ost_url: ost.ost,
                max_connections,
                tls: server_tls,
            };
            serve_node(
                cfg,
                listen,
                server_cfg,
                |_, addr| tracing::info!(id, %addr, %advertise, "node serving"),
                shutdown_signal(),
            )
            .await
            .map_err(|e| Failure::Refused(e.to_string()))
        }
        Cmd::Dev { data_dir, listen, token_file, tls, access, scheduler, ost } => {
            init_logging(cli.log_format);
            dev(data_dir, listen, token_file, &access, &tls, scheduler.config(), ost).await
        }
        Cmd::Executor {
            id,
            servers,
            listen,
            group,
            archs,
            active_tasks_limit,
            allow_privileged,
            dynamic,
            work_dir,
            token_file,
            pull_timeout_s,
            drain_timeout_s,
            warm_images,
            warm_per_image,
            tls,
        } => {
            init_logging(cli.log_format);
            if tls.tls_client_ca.is_some() {
                return Err(Failure::Usage(
                    "--tls-client-ca is for servers; an executor's listener only answers health checks"
                        .into(),
                ));
            }
            let executor_tls = tls.server()?;
            let mut cfg = flotilla_executor::Config::new(
                &id,
                servers,
                std::path::absolute(&work_dir).unwrap_or(work_dir),
            );
            cfg.token = read_token(&token_file)?;
            cfg.listen = Some(listen);
            cfg.group = group;
            cfg.archs = archs;
            cfg.active_tasks_limit = active_tasks_limit;
            cfg.allow_privileged = allow_privileged;
            cfg.dynamic = dynamic;
            cfg.pull_timeout = std::time::Duration::from_secs(pull_timeout_s);
            cfg.drain_timeout = std::time::Duration::from_secs(drain_timeout_s);
            cfg.tls = executor_tls;
            cfg.warm_images = warm_images;
            cfg.warm_per_image = usize::from(warm_per_image);
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = tx.send(true);
            });
            flotilla_executor::run(cfg, rx).await.map_err(|e| Failure::Refused(format!("{e:#}")))
        }
        Cmd::Run { client: args, command } => run_cmd::run(&client(&args)?, args.json, command).await,
        Cmd::Cluster { client: args, command } => cluster(&client(&args)?, args.json, command).await,
        Cmd::Kv { client: args, command } => kv(&client(&args)?, args.json, command).await,
        Cmd::Export { client: args, output } => {
            let mut export = client(&args)?.export().await?;
            // Written beside the target and renamed: a failed export leaves no half file.
            let tmp = output.with_extension("partial");
            let mut file = std::fs::File::create(&tmp)
                .map_err(|e| Failure::Refused(format!("cannot write {}: {e}", tmp.display())))?;
            let mut size = 0;
            while let Some(chunk) = export.chunk().await? {
                size += chunk.len();
                std::io::Write::write_all(&mut file, &chunk)
                    .map_err(|e| Failure::Refused(format!("cannot write {}: {e}", tmp.display())))?;
            }
            file.sync_all().map_err(|e| Failure::Refused(e.to_string()))?;
            std::fs::rename(&tmp, &output).map_err(|e| Failure::Refused(e.to_string()))?;
            eprintln!("exported {size} bytes to {}", output.display());
            Ok(())
        }
        Cmd::Import { client: args, input } => {
            let bytes = std::fs::read(&input)
                .map_err(|e| Failure::Refused(format!("cannot read {}: {e}", input.display())))?;
            client(&args)?.import(bytes.into()).await?;
            eprintln!(
                "imported {}; the cluster stays in maintenance until `flotilla maintenance disable`",
                input.display()
            );
            Ok(())
        }
        Cmd::Maintenance { client: args, command } => {
            let c = client(&args)?;
            match command {
                MaintenanceCmd::Enable => c.set_maintenance(true).await?,
                MaintenanceCmd::Disable => c.set_maintenance(false).await?,
                MaintenanceCmd::Status => {
                    let m = c.maintenance().await?;
                    if args.json {
                        print_json(&m);
                    } else {
                        println!("maintenance: {}", if m.enabled { "enabled" } else { "disabled" });
                        for (id, on) in &m.nodes {
                            println!("  node {id}: {}", if *on { "in maintenance" } else { "serving" });
                        }
                        for id in &m.unreachable {
                            println!("  node {id}: unreachable");
                        }
                    }
                }
            }
            Ok(())
        }
        Cmd::Health { client: args, ready } => {
            let c = client(&args)?;
            let answer = if ready {
                c.ready().await?
            } else {
                serde_json::to_value(c.health().await?).unwrap_or_default()
            };
            if args.json {
                print_json(&answer);
            } else {
                println!("{} is {}", c.base(), if ready { "ready" } else { "alive" });
            }
            Ok(())
        }
    }
}

fn require_token_off_loopback(listen: SocketAddr, has_tokens: bool) -> Result<(), Failure> {
    if !has_tokens && !listen.ip().is_loopback() {
        return Err(Failure::Usage(format!(
            "listening on {listen} (not loopback) needs --token-file: unauthenticated access is only allowed on loopback"
        )));
    }
    Ok(())
}

async fn dev(
    data_dir: PathBuf,
    listen: SocketAddr,
    token_file: Option<PathBuf>,
    access: &AccessArgs,
    tls: &TlsArgs,
    scheduler: flotilla_scheduler::SchedulerConfig,
    ost: OstArgs,
) -> Result<(), Failure> {
    let api_token = read_token(&token_file)?;
    let tokens = flotilla_api::auth::TokenFiles {
        tokens_file: access.tokens_file.clone(),
        admin: token_file,
        ..Default::default()
    };
    let open = tokens.load().map_err(Failure::Usage)?.is_open();
    if !open && api_token.is_none() {
        return Err(Failure::Usage(
            "dev with --tokens-file also needs --token-file (the local executor's token)".into(),
        ));
    }
    require_token_off_loopback(listen, !open)?;
    let cors = access.cors()?;
    let server_tls = tls.server()?;
    let scheme = tls.scheme();
    let cfg = NodeConfig::new(1, data_dir.clone());
    let executor_token = api_token.clone();
    let server_cfg = ServerConfig {
        tokens,
        cors,
        scheduler,
        gc: ost.gc(),
        archive: ost.archive(),
        ost_url: ost.ost,
        max_connections: flotilla_store::limits::MAX_CONNECTIONS,
        tls: server_tls,
    };
    let data_dir_shown = data_dir.display().to_string();
    let executor_dir =
        std::path::absolute(data_dir.join("executor")).unwrap_or_else(|_| data_dir.join("executor"));
    serve_node(
        cfg,
        listen,
        server_cfg,
        move |node, addr| {
            let node = node.clone();
            let url = format!("{scheme}://{addr}");
            tokio::spawn(async move {
                let fresh = node.raft.metrics().borrow().membership_config.membership().nodes().next().is_none();
                if fresh {
                    if let Err(e) = node.initialize([(1, url.clone())].into()).await {
                        tracing::error!(error = %e, "cannot initialise the dev cluster");
                        return;
                    }
                }
                println!("flotilla dev: API at {url} (data in {data_dir_shown})");
                let mut cfg = flotilla_executor::Config::new("local", vec![url], executor_dir);
                cfg.token = executor_token;
                cfg.active_tasks_limit = 4;
                let (_keep, rx) = tokio::sync::watch::channel(false);
                if let Err(e) = flotilla_executor::run(cfg, rx).await {
                    tracing::error!(error = %e, "the local executor cannot run; tasks will wait for an executor");
                }
            });
        },
        shutdown_signal(),
    )
    .await
    .map_err(|e| Failure::Refused(e.to_string()))
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_status(s: &ClusterStatus) {
    let leader = s.leader_id.map_or("none".to_string(), |l| l.to_string());
    println!(
        "leader: {leader}  term: {}  commit index: {}  (answered by node {})",
        s.term, s.commit_index, s.node_id
    );
    println!("{:<6} {:<8} {:<32} {:>10} {:>6}", "ID", "ROLE", "ADDRESS", "MATCHED", "LAG");
    for n in &s.nodes {
        let matched = n.matched_index.map_or("-".into(), |m| m.to_string());
        let lag = n.lag.map_or("-".into(), |l| l.to_string());
        let role = if Some(n.id) == s.leader_id { "leader" } else { n.role.as_str() };
        println!("{:<6} {:<8} {:<32} {:>10} {:>6}", n.id, role, n.addr, matched, lag);
    }
}

async fn cluster(c: &Client, json: bool, cmd: ClusterCmd) -> Result<(), Failure> {
    let status = match cmd {
        ClusterCmd::Init { nodes, wait_s, if_needed } => {
            let deadline = std::time::Instant::now() + Duration::from_secs(wait_s);
            for (id, url) in &nodes {
                loop {
                    match Client::new(url, None).health().await {
                        Ok(_) => break,
                        Err(_) if std::time::Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(500)).await
                        }
                        Err(e) => {
                            return Err(Failure::Refused(format!("node {id} is not reachable at {url}: {e}")))
                        }
                    }
                }
            }
            match c.cluster_init(&nodes).await {
                Ok(status) => status,
                Err(e) if if_needed && e.status() == Some(409) => {
                    let status = c.cluster(false).await?;
                    let mut members: Vec<(u64, String)> =
                        status.nodes.iter().map(|n| (n.id, n.addr.clone())).collect();
                    let mut wanted = nodes.clone();
                    members.sort();
                    wanted.sort();
                    if members != wanted {
                        return Err(Failure::Refused(format!(
                            "the cluster is already initialised with other nodes: {members:?}"
                        )));
                    }
                    eprintln!("the cluster is already initialised with these nodes; nothing changed");
                    status
                }
                Err(e) => return Err(e.into()),
            }
        }
        ClusterCmd::Status { stale } => c.cluster(stale).await?,
        ClusterCmd::AddLearner { node: (id, url) } => c.add_learner(id, &url).await?,
        ClusterCmd::Promote { id } => {
            let current = c.cluster(false).await?;
            if !current.nodes.iter().any(|n| n.id == id) {
                return Err(Failure::Refused(format!(
                    "node {id} is not a member; add it as a learner first"
                )));
            }
            let mut voters: Vec<u64> =
                current.nodes.iter().filter(|n| n.role == "voter").map(|n| n.id).collect();
            if voters.contains(&id) {
                return Err(Failure::Refused(format!("node {id} is already a voter")));
            }
            voters.push(id);
            c.set_voters(&voters).await?
        }
        ClusterCmd::Remove { id } => {
            c.remove_node(id).await?;
            c.cluster(false).await?
        }
    };
    if json {
        print_json(&status);
    } else {
        print_status(&status);
    }
    Ok(())
}

async fn kv(c: &Client, json: bool, cmd: KvCmd) -> Result<(), Failure> {
    match cmd {
        KvCmd::Get { key, stale } => {
            let item = c.kv_get(&key, stale).await?;
            if json {
                print_json(&item);
            } else {
                println!("{}", item.value);
            }
        }
        KvCmd::Put { key, value, prev_revision } => {
            let revision = c.kv_put(&key, &value, prev_revision).await?;
            if json {
                print_json(&serde_json::json!({ "revision": revision }));
            } else {
                println!("revision {revision}");
            }
        }
        KvCmd::Del { key, prev_revision } => c.kv_delete(&key, prev_revision).await?,
        KvCmd::Ls { prefix, limit, start_after } => {
            let list = c.kv_list(&prefix, start_after.as_deref(), limit, false).await?;
            if json {
                print_json(&list);
            } else {
                for item in &list.items {
                    println!("{}\t{}\t{}", item.key, item.revision, item.value);
                }
                if list.more {
                    eprintln!(
                        "(more keys; continue with --start-after {:?})",
                        list.items.last().map(|i| &i.key)
                    );
                }
            }
        }
    }
    Ok(())
}

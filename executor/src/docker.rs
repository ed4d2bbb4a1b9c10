//! The Docker driver: the few Engine API calls the executor makes, through bollard.
//! Every container it creates carries the labels below, so the executor can find its
//! own (orphans after a crash) and its group's (a vanished dynamic sibling's).

use std::collections::HashMap;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, ExecConfig, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RenameContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures::{Stream, StreamExt};

pub const LABEL: &str = "flotilla";
pub const LABEL_EXECUTOR: &str = "flotilla.executor";
pub const LABEL_TASK: &str = "flotilla.task";
pub const LABEL_GROUP: &str = "flotilla.group";
pub const LABEL_DYNAMIC: &str = "flotilla.dynamic";
/// The cluster the container's executor serves (`State::cluster_id`): two clusters (or two
/// `flotilla dev`) on one engine tell their containers apart by it.
pub const LABEL_CLUSTER: &str = "flotilla.cluster";
/// The container's name in its task's pod (`main`, `db`...).
pub const LABEL_CONTAINER: &str = "flotilla.container";
/// `true` on a warm container (`--warm-image`): started before any task asked for it; its
/// `flotilla.task` label stays empty once a task takes it (labels cannot change), its name
/// becomes the task's.
pub const LABEL_WARM: &str = "flotilla.warm";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DockerError(pub String);

fn err(what: &str, e: bollard::errors::Error) -> DockerError {
    DockerError(format!("{what}: {e}"))
}

#[derive(Clone)]
pub struct Driver {
    docker: Docker,
}

/// A container of ours, as listed.
#[derive(Debug, Clone)]
pub struct Ours {
    pub id: String,
    pub cluster: String,
    pub executor: String,
    pub task: String,
    pub dynamic: bool,
    pub running: bool,
}

/// What to create for a task: its steps' container (kept alive by `keep_alive_shell`) or
/// a service of its pod (running its image's entrypoint/command, or the ones given).
pub struct ContainerSpec<'a> {
    pub name: &'a str,
    pub image: &'a str,
    /// `Some(shell)`: PID 1 is `shell -c 'sleep forever'` (the steps are execs in it).
    pub keep_alive_shell: Option<&'a str>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub working_dir: Option<&'a str>,
    pub user: Option<&'a str>,
    pub env: Vec<String>,
    pub privileged: bool,
    pub labels: HashMap<String, String>,
    /// `container:<id>`: share that container's network namespace.
    pub network_mode: Option<String>,
    /// `host:ip` lines added to /etc/hosts.
    pub extra_hosts: Vec<String>,
    /// Mount path → tmpfs options (`size=...,mode=1777`).
    pub tmpfs: HashMap<String, String>,
}

/// Registry credentials for one pull (username and password, as Docker's engine wants).
pub struct PullAuth {
    pub registry: String,
    pub username: String,
    pub password: String,
}

/// One command to run in a running container (a `run` step).
pub struct ExecSpec<'a> {
    pub cmd: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    pub working_dir: &'a str,
    pub user: Option<&'a str>,
    pub tty: bool,
}

impl Driver {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket) and agrees on
    /// an API version both sides speak (the engine may be older than bollard).
    pub async fn connect() -> Result<Driver, DockerError> {
        let docker = Docker::connect_with_defaults().map_err(|e| err("cannot connect to Docker", e))?;
        let docker =
            docker.negotiate_version().await.map_err(|e| err("cannot reach the Docker engine", e))?;
        Ok(Driver { docker })
    }

    /// The engine's architecture in Go's words (`amd64`, `arm64`...).
    pub async fn arch(&self) -> Result<String, DockerError> {
        let info = self.docker.info().await.map_err(|e| err("docker info", e))?;
        Ok(go_arch(info.architecture.as_deref().unwrap_or("")))
    }

    /// The id of `image` on this host (`sha256:...`), `None` if it is not here.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>, DockerError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(Some(i.id.unwrap_or_default())),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(err("inspect image", e)),
        }
    }

    /// Pulls `image`, bounded by `timeout` (a host without a registry must fail fast),
    /// with `auth` if given. The registry's refusal is passed on as it words it.
    pub async fn pull(
        &self,
        image: &str,
        timeout: Duration,
        auth: Option<PullAuth>,
    ) -> Result<(), DockerError> {
        let opts = CreateImageOptionsBuilder::new().from_image(image).build();
        let credentials = auth.map(|a| bollard::auth::DockerCredentials {
            username: Some(a.username),
            password: Some(a.password),
            serveraddress: Some(a.registry),
            ..Default::default()
        });
        let pull = async {
            let mut s = self.docker.create_image(Some(opts), None, credentials);
            while let Some(item) = s.next().await {
                item.map_err(|e| err("pull", e))?;
            }
            Ok::<(), DockerError>(())
        };
        tokio::time::timeout(timeout, pull)
            .await
            .map_err(|_| DockerError(format!("pull of {image} timed out after {} s", timeout.as_secs())))?
    }

    /// Creates and starts a long-lived container (the steps are execs in it).
    pub async fn start(&self, spec: &ContainerSpec<'_>) -> Result<String, DockerError> {
        let (entrypoint, cmd) = match spec.keep_alive_shell {
            // PID 1 only waits; Docker's init reaps the steps' orphans.
            Some(shell) => (
                Some(vec![shell.to_string()]),
                Some(vec!["-c".into(), "while :; do sleep 3600; done".into()]),
            ),
            None => (spec.entrypoint.clone(), spec.cmd.clone()),
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.to_string()),
            entrypoint,
            cmd,
            working_dir: spec.working_dir.map(str::to_string),
            user: spec.user.map(str::to_string),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone()),
            host_config: Some(HostConfig {
                privileged: Some(spec.privileged),
                init: Some(true),
                network_mode: spec.network_mode.clone(),
                extra_hosts: (!spec.extra_hosts.is_empty()).then(|| spec.extra_hosts.clone()),
                tmpfs: (!spec.tmpfs.is_empty()).then(|| spec.tmpfs.clone()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::new().name(spec.name).build();
        let created =
            self.docker.create_container(Some(opts), body).await.map_err(|e| err("create container", e))?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove(&created.id).await;
            return Err(err("start container", e));
        }
        Ok(created.id)
    }

    /// Gives the container a new name.
    pub async fn rename(&self, container: &str, name: &str) -> Result<(), DockerError> {
        let opts = RenameContainerOptionsBuilder::new().name(name).build();
        self.docker.rename_container(container, opts).await.map_err(|e| err("rename container", e))
    }

    /// Runs `spec` in the container, feeding its output to `sink`; returns the exit code.
    pub async fn exec(
        &self,
        container: &str,
        spec: ExecSpec<'_>,
        mut sink: impl FnMut(Bytes),
    ) -> Result<i64, DockerError> {
        let ExecSpec { cmd, env, working_dir, user, tty } = spec;
        let cfg = ExecConfig {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(tty),
            env: Some(env),
            cmd: Some(cmd),
            user: user.map(str::to_string),
            working_dir: Some(working_dir.to_string()),
            ..Default::default()
        };
        let exec = self.docker.create_exec(container, cfg).await.map_err(|e| err("create exec", e))?;
        match self.docker.start_exec(&exec.id, None).await.map_err(|e| err("start exec", e))? {
            bollard::exec::StartExecResults::Attached { mut output, .. } => {
                forward(&mut output, &mut sink, "exec output").await?;
            }
            bollard::exec::StartExecResults::Detached => {}
        }
        let inspect = self.docker.inspect_exec(&exec.id).await.map_err(|e| err("inspect exec", e))?;
        Ok(inspect.exit_code.unwrap_or(-1))
    }

    /// A tar stream of `path` in the container (Docker's archive API).
    pub fn download(
        &self,
        container: &str,
        path: &str,
    ) -> impl Stream<Item = Result<Bytes, DockerError>> + Send + use<> {
        let opts = DownloadFromContainerOptionsBuilder::new().path(path).build();
        self.docker
            .download_from_container(container, Some(opts))
            .map(|r| r.map_err(|e| err("download from container", e)))
    }

    /// Extracts a tar stream at `path` in the container.
    pub async fn upload(
        &self,
        container: &str,
        path: &str,
        tar: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    ) -> Result<(), DockerError> {
        let opts = UploadToContainerOptionsBuilder::new().path(path).build();
        self.docker
            .upload_to_container(container, Some(opts), bollard::body_try_stream(tar))
            .await
            .map_err(|e| err("upload to container", e))
    }

    /// Waits until the container exits; its exit code.
    pub async fn wait_exit(&self, container: &str) -> Result<i64, DockerError> {
        let mut s = self.docker.wait_container(container, None);
        match s.next().await {
            Some(Ok(r)) => Ok(r.status_code),
            // bollard reports a non-zero exit as this error.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(err("wait container", e)),
            None => Err(DockerError("wait container: no answer".into())),
        }
    }

    /// The whole output of a container so far (stdout and stderr, as they came).
    pub async fn logs(&self, container: &str, mut sink: impl FnMut(Bytes)) -> Result<(), DockerError> {
        let opts = LogsOptionsBuilder::new().stdout(true).stderr(true).follow(false).tail("all").build();
        let mut s = self.docker.logs(container, Some(opts));
        forward(&mut s, &mut sink, "container logs").await
    }

    /// Force-removes a container (killing it); a missing one is fine.
    pub async fn remove(&self, container: &str) -> Result<(), DockerError> {
        let opts = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        match self.docker.remove_container(container, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            // Already being removed.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(e) => Err(err("remove container", e)),
        }
    }

    /// Our containers carrying every label `key=value` of `labels`.
    pub async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<Ours>, DockerError> {
        let wanted = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let filters: HashMap<&str, Vec<String>> = HashMap::from([("label", wanted)]);
        let opts = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let list = self.docker.list_containers(Some(opts)).await.map_err(|e| err("list containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                Some(Ours {
                    id: c.id?,
                    cluster: labels.get(LABEL_CLUSTER).cloned().unwrap_or_default(),
                    executor: labels.get(LABEL_EXECUTOR)?.clone(),
                    task: labels.get(LABEL_TASK).cloned().unwrap_or_default(),
                    dynamic: labels.get(LABEL_DYNAMIC).is_some_and(|v| v == "true"),
                    running: c.state == Some(bollard::models::ContainerSummaryStateEnum::RUNNING),
                })
            })
            .collect())
    }
}

/// Feeds an exec's or a container's output (stdout and stderr, as they came) to `sink`
/// until it ends.
async fn forward(
    output: &mut (impl Stream<Item = Result<LogOutput, bollard::errors::Error>> + Unpin),
    sink: &mut impl FnMut(Bytes),
    what: &str,
) -> Result<(), DockerError> {
    while let Some(item) = output.next().await {
        match item.map_err(|e| err(what, e))? {
            LogOutput::StdOut { message }
            | LogOutput::StdErr { message }
            | LogOutput::Console { message } => sink(message),
            LogOutput::StdIn { .. } => {}
        }
    }
    Ok(())
}

/// Docker reports `x86_64`/`aarch64`; tasks name Go architectures.
pub fn go_arch(docker: &str) -> String {
    match docker {
        "x86_64" | "amd64" => "amd64",
        "aarch64" | "arm64" => "arm64",
        "armv7l" | "arm" => "arm",
        "i386" | "i686" => "386",
        "s390x" => "s390x",
        "ppc64le" => "ppc64le",
        other => other,
    }
    .to_string()
}

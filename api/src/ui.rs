//! The web dashboard: `GET /ui/...` on every node serves a small single-page app (plain
//! HTML, CSS and JavaScript modules kept in `api/ui/`), and `GET /api/v1/runs/{id}/graph`
//! gives it a run's task graph.
//!
//! The assets are embedded with `include_bytes!`: a handful of files known at compile time need
//! no crate, no build script and no npm, and a missing file is a compile error. The app's
//! own files need no token (they hold none and reveal nothing); every API call the page
//! makes carries the bearer token the person typed, kept in `sessionStorage`.
//!
//! Any path under `/ui/` that is not an asset answers the app's `index.html`, so a deep
//! link (`/ui/runs/<id>`) works on reload; the app routes it in the page. Every answer
//! carries a Content-Security-Policy allowing scripts, styles and connections from this
//! origin only: no inline script, no other origin, no framing.

use std::collections::BTreeMap;

use flotilla_store::run::{Depend, RunConfig, Step};
use serde::{Deserialize, Serialize};
use warp::http::{HeaderValue, Method};

use crate::error::ApiError;
use crate::handler::{json, read_barrier, Ctx, Reply, Request};
use flotilla_store::limits::MAX_STEP_LABEL_CHARS;

/// Same-origin everything, nothing inline, no plugins, no framing, no form posts.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// An embedded file: name under `/ui/assets/`, content type, bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const INDEX: &[u8] = include_bytes!("../ui/index.html");

macro_rules! asset {
    ($name:literal, $ct:expr) => {
        Asset { name: $name, content_type: $ct, bytes: include_bytes!(concat!("../ui/assets/", $name)) }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("app.css", "text/css; charset=utf-8"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dag.js", JS),
    asset!("runs.js", JS),
    asset!("run.js", JS),
    asset!("nodes.js", JS),
    asset!("dom.js", JS),
    asset!("favicon.svg", "image/svg+xml"),
];

/// `GET /ui/...`: `rest` is the path after `ui`. (The route table sends only GET and HEAD
/// here and answers other methods 405 with `Allow`; the check stays for direct callers.)
pub(crate) fn serve(method: &Method, rest: &[&str]) -> Result<Reply, ApiError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::method_not_allowed());
    }
    let (content_type, bytes) = match rest {
        ["assets", name] => {
            let asset = ASSETS
                .iter()
                .find(|a| a.name == *name)
                .ok_or_else(|| ApiError::not_found(format!("the dashboard has no asset named {name:?}")))?;
            (asset.content_type, asset.bytes)
        }
        ["assets", ..] => return Err(ApiError::not_found("the dashboard has no such asset")),
        _ => ("text/html; charset=utf-8", INDEX),
    };
    let mut resp = warp::reply::Response::new(bytes.into());
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static(content_type));
    h.insert("content-security-policy", HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    // Small files that change with the binary: always revalidate, never a stale app.
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    Ok(Reply::Raw(resp))
}

/// `GET /api/v1/runs/{id}/graph`: what the dashboard draws, taken from the run's
/// configuration (live or archived). Only names, dependencies and step labels: never the
/// environment, images or credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunGraph {
    pub run_id: String,
    /// In the configuration's order.
    pub tasks: Vec<GraphTask>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GraphTask {
    pub name: String,
    pub depends: Vec<Depend>,
    pub needs_approval: bool,
    pub approvers_required: u32,
    /// Column of a layered drawing: 0 for a task with no parent, else one more than its
    /// deepest parent's.
    pub layer: u32,
    pub steps: Vec<GraphStep>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GraphStep {
    /// `run`, `save_to_workspace`, `restore_workspace`, `save_cache` or `restore_cache`.
    pub kind: String,
    /// The step's name, or for an unnamed `run` step the first line of its command.
    pub label: String,
}

impl RunGraph {
    pub fn of(run_id: &str, config: &RunConfig) -> RunGraph {
        let layers = layers(config);
        let tasks = config
            .tasks
            .iter()
            .map(|t| GraphTask {
                name: t.name.clone(),
                depends: t.depends.clone(),
                needs_approval: t.needs_approval,
                approvers_required: t.approvers_required,
                layer: layers.get(t.name.as_str()).copied().unwrap_or(0),
                steps: t.steps.iter().map(step_label).collect(),
            })
            .collect();
        RunGraph { run_id: run_id.to_string(), tasks }
    }
}

fn step_label(step: &Step) -> GraphStep {
    let (kind, label) = match step {
        Step::Run(r) => {
            let label = match &r.name {
                Some(n) => n.clone(),
                None => {
                    let first = r.command.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
                    let mut l: String = first.chars().take(MAX_STEP_LABEL_CHARS).collect();
                    if first.chars().count() > MAX_STEP_LABEL_CHARS || r.command.trim().lines().count() > 1 {
                        l.push('…');
                    }
                    l
                }
            };
            ("run", label)
        }
        Step::SaveToWorkspace(_) => ("save_to_workspace", "save to workspace".to_string()),
        Step::RestoreWorkspace(_) => ("restore_workspace", "restore workspace".to_string()),
        Step::SaveCache(_) => ("save_cache", "save cache".to_string()),
        Step::RestoreCache(_) => ("restore_cache", "restore cache".to_string()),
    };
    GraphStep { kind: kind.to_string(), label }
}

/// Each task's layer (longest path from a task with no parent). The configuration was
/// checked acyclic at creation; a cycle all the same (or an unknown parent) only stops the
/// relaxation after one pass per task, never loops.
fn layers(config: &RunConfig) -> BTreeMap<&str, u32> {
    let mut layer: BTreeMap<&str, u32> = config.tasks.iter().map(|t| (t.name.as_str(), 0)).collect();
    for _ in 0..config.tasks.len() {
        let mut changed = false;
        for t in &config.tasks {
            let want =
                t.depends.iter().filter_map(|d| layer.get(d.task.as_str())).map(|l| l + 1).max().unwrap_or(0);
            if layer[t.name.as_str()] < want {
                layer.insert(t.name.as_str(), want);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    layer
}

pub(crate) async fn graph(ctx: &Ctx, run_id: &str, req: &Request<'_>) -> Result<Reply, ApiError> {
    read_barrier(ctx, req).await?;
    let manifest = {
        let sm = ctx.node.state.read();
        if let Some(config) = sm.state.run_configs.get(run_id) {
            return Ok(json(200, &RunGraph::of(run_id, config)));
        }
        sm.state.archive.clone()
    };
    match ctx.archive.get(&manifest, run_id).await? {
        Some(a) => Ok(json(200, &RunGraph::of(run_id, &a.config))),
        None => Err(ApiError::not_found(format!("run {run_id} not found"))),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_store::run::{Condition, RunCreate, TaskConfig};

    use super::*;

    fn task(name: &str, parents: &[&str]) -> TaskConfig {
        let mut t = TaskConfig::new(name, "busybox", "echo hi\necho there");
        t.depends = parents.iter().map(|p| Depend { task: p.to_string(), conditions: vec![] }).collect();
        t
    }

    #[test]
    fn a_task_sits_one_layer_right_of_its_deepest_parent() {
        // Listed children first, so one pass in order is not enough.
        let config = RunCreate::new(
            "r",
            "/g",
            vec![task("d", &["a", "c"]), task("c", &["b"]), task("b", &["a"]), task("a", &[])],
        );
        let g = RunGraph::of("1", &config);
        let layer = |n: &str| g.tasks.iter().find(|t| t.name == n).unwrap().layer;
        assert_eq!((layer("a"), layer("b"), layer("c"), layer("d")), (0, 1, 2, 3));
        assert_eq!(g.tasks[0].name, "d", "tasks keep the configuration's order");
    }

    #[test]
    fn the_graph_names_steps_and_never_carries_environment() {
        let mut t = task("a", &[]);
        t.environment.insert("SECRET".into(), "hunter2".into());
        t.steps.push(Step::SaveCache(flotilla_store::run::SaveCache { key: "k".into(), contents: vec![] }));
        let mut config = RunCreate::new("r", "/g", vec![t, task("b", &["a"])]);
        config.tasks[1].depends[0].conditions = vec![Condition::OnFailure];
        config.environment.insert("TOKEN".into(), "s3cret".into());
        let g = RunGraph::of("1", &config);
        let text = serde_json::to_string(&g).unwrap();
        assert!(!text.contains("hunter2") && !text.contains("s3cret"), "{text}");
        assert_eq!(g.tasks[0].steps[0], GraphStep { kind: "run".into(), label: "echo hi…".into() });
        assert_eq!(g.tasks[0].steps[1].kind, "save_cache");
        assert!(text.contains("on_failure"), "{text}");
    }

    #[test]
    fn deep_links_get_the_app_and_unknown_assets_a_json_404() {
        for path in [&[][..], &["runs", "0000000000000001"][..], &["cluster"][..]] {
            let Reply::Raw(resp) = serve(&Method::GET, path).unwrap() else { panic!("not raw") };
            assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
            assert!(resp.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("script-src 'self'"));
        }
        let Reply::Raw(resp) = serve(&Method::GET, &["assets", "app.js"]).unwrap() else { panic!() };
        assert_eq!(resp.headers()["content-type"], JS);
        let e = serve(&Method::GET, &["assets", "nope.js"]).err().unwrap();
        assert_eq!(e.status, 404);
        assert_eq!(serve(&Method::POST, &[]).err().unwrap().status, 405);
    }

    #[test]
    fn index_html_has_no_inline_script_or_style() {
        let html = std::str::from_utf8(INDEX).unwrap();
        // Every <script> has a src; no style attribute or <style> block (CSP would drop them).
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..i + html[i..].find('>').unwrap()];
            assert!(tag.contains("src=\"/ui/assets/"), "inline script: {tag}");
        }
        assert!(!html.contains("<style") && !html.contains("style=\""), "inline style in index.html");
        for handler in [" onclick=", " onload=", " onsubmit=", " onerror="] {
            assert!(!html.contains(handler), "inline handler {handler} in index.html");
        }
    }
}

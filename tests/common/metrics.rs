//! Reading one value off a node's `/metrics`, shared by the black-box tests and the
//! benchmarks (each includes this file with `#[path]`, beside `tests/common` as
//! `crate::common`).

use crate::common::TOKEN;

/// The value of the series `name` (a metric's name, with its labels if it has any:
/// `name{label="value"}`) on the node at `url`; 0 when it is missing.
pub async fn metric(url: &str, name: &str) -> u64 {
    let text = reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

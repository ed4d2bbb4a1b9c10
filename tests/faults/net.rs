//! The network the harness builds: one bridge, one network namespace per server node, a
//! veth pair from each namespace to the bridge, and the host on the bridge too (the client
//! workload runs outside the namespaces and reaches every node directly).
//!
//! Every name starts with `flt-` so that a run can find and remove what an earlier run
//! left behind (a crash, a `kill -9` of the harness). [`Net`]'s `Drop` removes everything
//! it made, on success, on a panic and (through the Ctrl-C handler) on an interrupt.

use std::process::Command;

/// Prefix of every namespace, link and rule this harness creates.
pub const PREFIX: &str = "flt-";
pub const BRIDGE: &str = "flt-br0";
/// The harness's private /24 (the host is .254, node N is .N).
pub const SUBNET: &str = "10.213.57";
/// Where the pids of running nodes are kept, so that a later run can stop the nodes an
/// interrupted run left running (and nothing else).
pub const PID_DIR: &str = "/tmp/flt-faults-pids";

pub fn ns(id: u64) -> String {
    format!("{PREFIX}n{id}")
}

pub fn node_ip(id: u64) -> String {
    format!("{SUBNET}.{id}")
}

pub fn host_ip() -> String {
    format!("{SUBNET}.254")
}

/// Runs a command; a failure is an error naming the command and its stderr.
pub fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`sh`], for cleanup: failures are ignored (the thing may already be gone).
fn sh_quiet(args: &[&str]) {
    let _ = sh(args);
}

/// Runs a command inside node `id`'s namespace.
pub fn in_ns(id: u64, args: &[&str]) -> Result<String, String> {
    let ns = ns(id);
    let mut all = vec!["ip", "netns", "exec", ns.as_str()];
    all.extend_from_slice(args);
    sh(&all)
}

const FORWARD_RULE: [&str; 6] = ["-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"];

pub struct Net {
    pub nodes: Vec<u64>,
}

impl Net {
    /// Checks what the harness needs, removes leftovers of earlier runs and builds the
    /// network for `nodes`.
    pub fn create(nodes: &[u64]) -> Result<Net, String> {
        for tool in ["ip", "iptables", "tc"] {
            sh(&["sh", "-c", &format!("command -v {tool}")]).map_err(|_| {
                format!("the fault harness needs `{tool}` (apt-get install -y iproute2 iptables)")
            })?;
        }
        if sh(&["id", "-u"])?.trim() != "0" {
            return Err("the fault harness must run as root (it creates network namespaces)".into());
        }
        cleanup_stale();
        let net = Net { nodes: nodes.to_vec() };
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        sh(&["ip", "addr", "add", &format!("{}/24", host_ip()), "dev", BRIDGE])?;
        sh(&["ip", "link", "set", BRIDGE, "up"])?;
        // Docker sets FORWARD's policy to DROP and br_netfilter sends bridged frames
        // through it: without this rule the nodes cannot reach each other.
        let mut rule = vec!["iptables", "-I", "FORWARD"];
        rule.extend_from_slice(&FORWARD_RULE);
        sh(&rule)?;
        for &id in nodes {
            let (ns, host_end, ns_end) = (ns(id), format!("{PREFIX}v{id}"), format!("{PREFIX}p{id}"));
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &ns_end])?;
            sh(&["ip", "link", "set", &host_end, "master", BRIDGE])?;
            sh(&["ip", "link", "set", &host_end, "up"])?;
            sh(&["ip", "link", "set", &ns_end, "netns", &ns])?;
            in_ns(id, &["ip", "link", "set", &ns_end, "name", "eth0"])?;
            in_ns(id, &["ip", "addr", "add", &format!("{}/24", node_ip(id)), "dev", "eth0"])?;
            in_ns(id, &["ip", "link", "set", "eth0", "up"])?;
            in_ns(id, &["ip", "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Drops every packet between `a` and `b` (both ways; clients still reach both).
    pub fn cut(&self, a: u64, b: u64) -> Result<(), String> {
        for (me, peer) in [(a, b), (b, a)] {
            let peer_ip = node_ip(peer);
            in_ns(me, &["iptables", "-A", "INPUT", "-s", &peer_ip, "-j", "DROP"])?;
            in_ns(me, &["iptables", "-A", "OUTPUT", "-d", &peer_ip, "-j", "DROP"])?;
        }
        Ok(())
    }

    /// Separates `side` from every other node.
    pub fn split(&self, side: &[u64]) -> Result<(), String> {
        for &a in side {
            for &b in self.nodes.iter().filter(|n| !side.contains(n)) {
                self.cut(a, b)?;
            }
        }
        Ok(())
    }

    /// `tc netem` on node `id`'s link (delay, jitter, loss): `spec` like
    /// `["delay", "80ms", "40ms", "loss", "5%"]`.
    pub fn netem(&self, id: u64, spec: &[&str]) -> Result<(), String> {
        let mut args = vec!["tc", "qdisc", "add", "dev", "eth0", "root", "netem"];
        args.extend_from_slice(spec);
        match in_ns(id, &args) {
            Ok(_) => Ok(()),
            // Some kernels (this CI's VMs among them) have no sch_netem: the fault becomes
            // random loss with iptables' statistic match, and says so.
            Err(e) if e.contains("qdisc kind is unknown") => {
                let loss = spec
                    .windows(2)
                    .find(|w| w[0] == "loss")
                    .and_then(|w| w[1].trim_end_matches('%').parse::<f64>().ok())
                    .unwrap_or(5.0);
                let p = format!("{:.3}", (loss / 100.0).max(0.05));
                println!("faults: this kernel has no netem; node {id} gets {p} random packet loss (iptables) instead of {spec:?}");
                for chain in ["INPUT", "OUTPUT"] {
                    in_ns(
                        id,
                        &[
                            "iptables",
                            "-A",
                            chain,
                            "-m",
                            "statistic",
                            "--mode",
                            "random",
                            "--probability",
                            &p,
                            "-j",
                            "DROP",
                        ],
                    )?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Removes every partition and netem rule.
    pub fn heal(&self) -> Result<(), String> {
        for &id in &self.nodes {
            in_ns(id, &["iptables", "-F"])?;
            let _ = in_ns(id, &["tc", "qdisc", "del", "dev", "eth0", "root"]);
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        cleanup_stale();
    }
}

/// Stops node processes an earlier run left (from the pid files), then removes every
/// `flt-` namespace, the bridge and the FORWARD rule. Safe to call any time.
pub fn cleanup_stale() {
    if let Ok(dir) = std::fs::read_dir(PID_DIR) {
        for entry in dir.flatten() {
            if let Ok(pid) = std::fs::read_to_string(entry.path()) {
                let pid = pid.trim();
                // Only if that pid is still one of our server processes.
                let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if cmdline.contains("flotilla") && cmdline.contains(SUBNET) {
                    sh_quiet(&["kill", "-CONT", pid]);
                    sh_quiet(&["kill", "-KILL", pid]);
                }
            }
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if let Ok(list) = sh(&["ip", "netns", "list"]) {
        for line in list.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(PREFIX) {
                sh_quiet(&["ip", "netns", "del", name]);
            }
        }
    }
    sh_quiet(&["ip", "link", "del", BRIDGE]);
    let mut rule = vec!["iptables", "-D", "FORWARD"];
    rule.extend_from_slice(&FORWARD_RULE);
    while sh(&rule).is_ok() {}
}

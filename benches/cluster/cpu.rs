//! CPU time of processes over a measured stretch: what a benchmark's throughput cost in CPU
//! on each process. On this two-core machine every server, the baseline's and the load
//! generator share the cores, so when they are busy the throughput is bounded by CPU per
//! operation; these figures say where it went (the leader, the followers, the client).

use std::future::Future;

/// A process's CPU time (utime + stime) in clock ticks, from `/proc/PID/stat`; 0 when it is gone.
fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line are the 12th and 13th after the name.
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

unsafe extern "C" {
    fn sysconf(name: std::ffi::c_int) -> std::ffi::c_long;
}

/// Linux's `_SC_CLK_TCK` (glibc and musl).
const SC_CLK_TCK: std::ffi::c_int = 2;

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn ticks_per_s() -> f64 {
    // SAFETY: sysconf reads a constant of the C library; no memory is passed.
    let t = unsafe { sysconf(SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Runs `work` and returns its output with the CPU seconds each of `pids` used meanwhile.
pub async fn during<T>(pids: &[u32], work: impl Future<Output = T>) -> (T, Vec<f64>) {
    let before: Vec<u64> = pids.iter().map(|p| ticks(*p)).collect();
    let out = work.await;
    let used = pids.iter().zip(before).map(|(p, b)| ticks(*p).saturating_sub(b) as f64 / ticks_per_s());
    (out, used.collect())
}

/// Where one side's CPU went over a measurement, in seconds: its leader, its other server
/// processes together, and this process (the load generator and its client library).
#[derive(Default, Clone, Copy)]
pub struct Split {
    pub leader: f64,
    pub followers: f64,
    pub client: f64,
}

/// The processes of one side: the leader first, then the other servers.
pub struct Procs {
    pub leader: u32,
    pub followers: Vec<u32>,
}

impl Procs {
    /// A flotilla cluster's running nodes, `leader` first.
    pub fn flotilla(cluster: &crate::common::Cluster, leader: u64) -> Procs {
        let pid = |p: &crate::common::NodeProc| p.child.as_ref().map(|c| c.id());
        let followers = cluster.nodes.values().filter(|p| p.id != leader).filter_map(pid).collect();
        Procs { leader: pid(&cluster.nodes[&leader]).expect("the leader runs"), followers }
    }

    fn pids(&self) -> Vec<u32> {
        let mut all = vec![self.leader, std::process::id()];
        all.extend(&self.followers);
        all
    }

    /// Runs `work`, adding what each process spent meanwhile to `split`.
    pub async fn measure<T>(&self, split: &mut Split, work: impl Future<Output = T>) -> T {
        let (out, used) = during(&self.pids(), work).await;
        split.leader += used[0];
        split.client += used[1];
        split.followers += used[2..].iter().sum::<f64>();
        out
    }
}

impl Split {
    pub fn servers(&self) -> f64 {
        self.leader + self.followers
    }

    /// Microseconds of CPU per operation, for `ops` operations.
    pub fn per_op_us(seconds: f64, ops: f64) -> f64 {
        if ops > 0.0 {
            seconds / ops * 1e6
        } else {
            f64::NAN
        }
    }

    /// One line: µs per operation on the leader, the followers, the servers, the client.
    pub fn line(&self, ops: f64) -> String {
        let us = |s| Split::per_op_us(s, ops);
        format!(
            "leader {:>5.0} followers {:>5.0} servers {:>5.0} client {:>5.0} µs/op",
            us(self.leader),
            us(self.followers),
            us(self.servers()),
            us(self.client)
        )
    }
}

/// The machine's cores (`nproc`), for how busy a measurement kept them.
pub fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}
